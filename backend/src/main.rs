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
    /// Ask a running daemon: list | show NAME | stats NAME.
    Ctl(CtlArgs),
}

#[derive(Debug, clap::Args)]
struct CtlArgs {
    /// The daemon's runtime directory [default: as for serve].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// list | show NAME | stats NAME
    #[arg(required = true, num_args = 1..=2)]
    command: Vec<String>,
}

/// `vcdev ctl`: prints the daemon's answer; exit 1 on failure.
fn ctl(a: CtlArgs) -> ExitCode {
    let dir = a.dir.unwrap_or_else(vcdev::config::default_dir);
    let path = dir.join(vcdev::ctl::CONTROL_SOCKET);
    match vcdev::ctl::ctl(&path, &a.command.join(" ")) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err((e, text)) => {
            eprint!("vcdev ctl: {e}: {text}");
            if text.is_empty() {
                eprintln!("({})", path.display());
            }
            ExitCode::from(1)
        }
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Runtime directory [default: $XDG_RUNTIME_DIR/vcdev, else /tmp/vcdev-$UID].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// A device: blk[,name=NAME][,path=FILE|ram=SIZE][,readonly=on][,queues=N]
    /// [,queue-size=N][,serial=S][,direct=on|off][,aio=auto|io_uring|sync]
    /// [,iova-aperture=START-LAST][,iova-reserved=START-LAST]...[,group=N]
    /// [,iops=N][,bw=SIZE].
    /// direct=on opens the file with O_DIRECT (not with ram=) and advertises
    /// its logical block size as blk_size; aio= picks the I/O engine: auto
    /// (io_uring if it can be set up, else sync), io_uring (or exit 1), sync.
    /// iops= and bw= limit reads and writes per second and bytes per second
    /// (bw with K/M/G suffixes; 0: no limit), with a burst of one second; requests
    /// over the limit wait. A file is locked as QEMU locks it: writable
    /// exclusively, readonly=on shared; a locked image exits 1. A comma in
    /// a value is written twice. Default: one 64 MiB RAM disk named vfio0.
    #[arg(long = "device", value_name = "SPEC")]
    devices: Vec<String>,
    /// Accept guest memory that is not a memfd sealed against shrinking
    /// (e.g. QEMU's memory-backend-file). A frontend that then shrinks the
    /// file crashes the daemon with SIGBUS.
    #[arg(long)]
    allow_unsealed_memory: bool,
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
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Config, ConfigError> {
        let mut c = Config::new(a.dir, &a.devices, a.allow_unsealed_memory)?;
        c.iotlb_miss_timeout = std::time::Duration::from_millis(a.iotlb_miss_timeout_ms);
        c.iotlb_max_entries = usize::try_from(a.iotlb_max_entries).unwrap_or(usize::MAX);
        Ok(c)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let serve = match args.command {
        Command::Serve(s) => s,
        Command::Ctl(c) => return ctl(c),
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
            ExitCode::from(1)
        }
    }
}
