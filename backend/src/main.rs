//! `vcdev`: the command line. `vcdev serve` runs the daemon with both
//! doors (vhost-user sockets for QEMU, and the VFIO-compatible device-cdev
//! nodes); `vcdev ctl` asks a running daemon through its control socket.
//! Options become a validated [`Config`]; one exit path: invalid options
//! exit 2, a failure at run time exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vcdev::{Config, ConfigError};

/// Out-of-process device backend: virtio-blk over vhost-user and a
/// VFIO-compatible device cdev.
#[derive(Debug, Parser)]
#[command(name = "vcdev", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve devices until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Ask or change a running daemon (exit 0 done, 1 refused or failed,
    /// 2 usage).
    Ctl(CtlArgs),
    /// Run QEMU with a device given to its own vfio-pci (iommufd backend)
    /// through the cdev door: opens DIR/iommu and DIR/devices/NAME, adds
    /// `-object iommufd,fd=N -device vfio-pci,iommufd=..,fd=M` and execs
    /// QEMU with LD_PRELOAD=libvcdev_vfio.so. Guest RAM must be
    /// memory-backend-memfd.
    QemuExec(QemuExecArgs),
}

#[derive(Debug, clap::Args)]
struct QemuExecArgs {
    /// The daemon's runtime directory [default: as for serve].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The preload library [default: libvcdev_vfio.so next to this binary].
    #[arg(long, value_name = "PATH")]
    preload: Option<PathBuf>,
    /// More properties for the vfio-pci device (e.g. `bus=rp0,addr=0`).
    #[arg(long, value_name = "PROPS")]
    props: Option<String>,
    /// Print the command (environment first) instead of running it: a dry
    /// run, the descriptors it names close when vcdev exits.
    #[arg(long)]
    print: bool,
    /// The device's name.
    name: String,
    /// The QEMU program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "QEMU")]
    command: Vec<std::ffi::OsString>,
}

/// `vcdev qemu-exec`: execs QEMU (or prints the command); exit 1 when the
/// door refuses the files or exec fails.
fn qemu_exec(a: QemuExecArgs) -> ExitCode {
    let launch = vcdev::qemu_exec::QemuExec {
        dir: a.dir.unwrap_or_else(vcdev::config::default_dir),
        device: a.name,
        preload: a.preload.unwrap_or_else(vcdev::qemu_exec::default_preload),
        props: a.props,
        command: a.command,
    };
    let prepared = match launch.prepare() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vcdev qemu-exec: {}", vcdev::error_chain(&e));
            return ExitCode::from(1);
        }
    };
    if a.print {
        println!("{}", prepared.shell_line());
        return ExitCode::SUCCESS;
    }
    let e = prepared.exec();
    eprintln!("vcdev qemu-exec: {}", vcdev::error_chain(&e));
    ExitCode::from(1)
}

#[derive(Debug, clap::Args)]
struct CtlArgs {
    /// The daemon's runtime directory [default: as for serve].
    #[arg(long, value_name = "DIR", global = true)]
    dir: Option<PathBuf>,
    /// Print JSON, errors included: {"error": "...", "errno": N}.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: vcdev::ctl::Request,
}

/// `vcdev ctl`: prints the daemon's answer; exit 1 when it refuses or
/// fails, 2 on a usage error.
fn ctl(a: CtlArgs) -> ExitCode {
    use vcdev::ctl::Request;
    let dir = a.dir.unwrap_or_else(vcdev::config::default_dir);
    let path = vcdev::ctl::socket_path(&dir);
    let mut req = a.command;
    if let Request::Add { spec } = &mut req {
        let cwd = std::env::current_dir().unwrap_or_default();
        *spec = vcdev::ctl::absolute_paths(spec, &cwd);
    }
    match vcdev::ctl::request(&path, &req) {
        Ok(v) => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", vcdev::ctl::render(&req, &v));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if a.json {
                println!("{}", json_error(&e.error, e.errno));
            } else {
                eprintln!("vcdev ctl: {}", e.error);
            }
            ExitCode::from(if e.usage { 2 } else { 1 })
        }
    }
}

/// `{"error": ..., "errno": N}`.
fn json_error(error: &str, errno: i32) -> String {
    serde_json::json!({ "error": error, "errno": errno }).to_string()
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Runtime directory [default: $XDG_RUNTIME_DIR/vcdev, else /tmp/vcdev-$UID].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// A device: blk[,name=NAME][,path=FILE|ram=SIZE][,readonly=on][,queues=N]
    /// [,queue-size=N][,serial=S][,direct=on|off][,aio=auto|io_uring|sync]
    /// [,iova-aperture=START-LAST][,iova-reserved=START-LAST]...[,group=N]
    /// [,iops=N][,bw=SIZE][,poll-us=N].
    /// direct=on opens the file with O_DIRECT (not with ram=) and advertises
    /// its logical block size as blk_size; aio= picks the I/O engine: auto
    /// (io_uring if it can be set up, else sync; for a file on tmpfs, reads
    /// and writes under 64 KiB inline and larger ones in io_uring's
    /// workers), io_uring (or exit 1), sync.
    /// iops= and bw= limit reads and writes per second and bytes per second
    /// (bw with K/M/G suffixes; 0: no limit), with a burst of one second; requests
    /// over the limit wait. poll-us=N (0 to 1000000, default 0): each queue
    /// worker busy-polls its avail ring for N us after its last request
    /// before it sleeps on the kick (lower latency, a CPU spinning meanwhile).
    /// A file is locked as QEMU locks it: writable
    /// exclusively, readonly=on shared; a locked image exits 1. A comma in
    /// a value is written twice. Default: one 64 MiB RAM disk named vfio0.
    #[arg(long = "device", value_name = "SPEC")]
    devices: Vec<String>,
    /// Accept guest memory that is not a memfd sealed against shrinking
    /// (e.g. QEMU's memory-backend-file). A frontend that then shrinks the
    /// file crashes the daemon with SIGBUS.
    #[arg(long)]
    allow_unsealed_memory: bool,
    /// The file mode of the device nodes (vhost-user sockets, cdev nodes),
    /// in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
    /// The group of the device nodes (a name or a gid).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Serve only these uids on the device nodes (besides root and the
    /// daemon's own uid), checked with SO_PEERCRED at accept.
    #[arg(long, value_name = "UID", value_delimiter = ',')]
    allow_uid: Vec<u32>,
    /// Under a guest vIOMMU: how long a queue waits for the frontend's
    /// answer to an IOTLB miss before the request fails with IOERR.
    #[arg(long, value_name = "MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    iotlb_miss_timeout_ms: u64,
    /// Under a guest vIOMMU: the most IOTLB entries one frontend connection
    /// may fill; an UPDATE that finds the IOTLB full drops it whole first
    /// (the guest's next accesses miss and are fetched again).
    #[arg(long, value_name = "N",
          default_value_t = vcdev::config::DEFAULT_IOTLB_MAX_ENTRIES as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    iotlb_max_entries: u64,
    /// Under a guest vIOMMU: after answering an IOTLB message, a connection
    /// polls its socket for the next one for up to this long before it
    /// sleeps (adaptive: zero while the messages come further apart; 0
    /// turns it off).
    #[arg(long, value_name = "US",
          default_value_t = vcdev::vhost_user::main_poll::DEFAULT_MAX.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    iotlb_poll_us: u64,
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Config, ConfigError> {
        let mut c = Config::new(a.dir, &a.devices, a.allow_unsealed_memory)?;
        c.access.mode = a.socket_mode;
        if let Some(g) = a.socket_group {
            c.access.group =
                Some(vcdev::sys::group_id(&g).ok_or(ConfigError::UnknownGroup(g.clone()))?);
        }
        if !a.allow_uid.is_empty() {
            c.access.allow_uids = Some(a.allow_uid);
        }
        c.iotlb_miss_timeout = std::time::Duration::from_millis(a.iotlb_miss_timeout_ms);
        c.iotlb_max_entries = usize::try_from(a.iotlb_max_entries).unwrap_or(usize::MAX);
        c.iotlb_poll = std::time::Duration::from_micros(a.iotlb_poll_us);
        Ok(c)
    }
}

/// Parses an octal file mode.
fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode (e.g. 0660)"))
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // `vcdev ctl --json` prints even its usage errors as JSON.
            let argv: Vec<String> = std::env::args().collect();
            let is_json_ctl = argv.get(1).is_some_and(|a| a == "ctl")
                && argv.iter().any(|a| a == "--json")
                && e.use_stderr();
            if is_json_ctl {
                println!("{}", json_error(e.to_string().trim(), libc::EINVAL));
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let serve = match args.command {
        Command::Serve(s) => s,
        Command::Ctl(c) => return ctl(c),
        Command::QemuExec(q) => return qemu_exec(q),
    };
    let config = match Config::try_from(serve) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vcdev: {e}");
            return ExitCode::from(2);
        }
    };
    match vcdev::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", vcdev::error_chain(&e));
            if e.is_usage() {
                eprintln!("vcdev: {}", vcdev::error_chain(&e));
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
