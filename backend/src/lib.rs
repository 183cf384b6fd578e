//! vcdev daemon library: virtio-blk devices, over the software IOMMU,
//! served through two doors at once.
//!
//! # Architecture
//!
//! [`run`] merges the `--device` options with the state file ([`state`]),
//! starts the daemon's one event loop ([`daemon`], rust-vmm's
//! `event-manager`) and adds every device: its model (a
//! [`vcdev_device_model::blk::BlkDevice`] over a file or RAM), its entry
//! in the [`registry`] (which also owns the rule that a device has one
//! owner at a time, whichever door it came through), and its nodes on the
//! loop. `vcdev ctl` adds, changes and removes devices the same way while
//! the daemon runs ([`ctl`]). Two doors:
//!
//! - **vhost-user** ([`vhost_user`]): `DIR/vhost-user/NAME`. The loop
//!   accepts frontends ([`vhost_user::accept`]); each gets a connection
//!   thread ([`vhost_user::conn`], its requests dispatched by one table,
//!   [`vhost_user::dispatch`]); each running queue a worker thread
//!   ([`queue`]) driven by its own epoll ([`event_loop`]). Under a vIOMMU,
//!   addresses are IOVAs translated through an IOTLB the frontend fills
//!   ([`vhost_user::iotlb`]).
//! - **device cdev** ([`cdev`], PROTOCOL.md): a VFIO-compatible protocol
//!   over UNIX sockets. `DIR/iommu` gives an iommufd file, `DIR/devices/NAME`
//!   a vfio device file, and with feature `group` `DIR/vfio/vfio` a type1
//!   container and `DIR/vfio/N` a group file ([`cdev::server`],
//!   [`cdev::files`]). Requests run through one table per file kind
//!   ([`cdev::dispatch`]); a bound device's queues read guest memory
//!   through the iommufd IOAS it is attached to ([`cdev::device`]).
//!
//! Who may connect: [`access`]. The control socket, `DIR/control`
//! ([`ctl`]), answers `vcdev ctl` in JSON. The main thread waits for
//! SIGINT/SIGTERM, then drains every queue, flushes every disk, removes
//! the nodes and returns. What may run on the event loop and what runs on
//! threads of its own is the rule written in [`daemon`].
//!
//! Framing lives in [`wire`], the one codec of the 12-byte header both
//! doors share, each with its own flag policy. The backend's libc calls
//! sit in [`sys`], POD decoding in [`pod`].
//!
//! # Errors
//!
//! Each module has its own `thiserror` enum, variants named after the step
//! that failed, causes as `#[source]`; the ones that cross a protocol
//! boundary have `fn errno()`. [`Error`] is what ends the daemon.

pub mod access;
pub mod cdev;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod event_loop;
pub mod pod;
pub mod qemu_exec;
pub mod queue;
pub mod registry;
pub mod ring;
pub mod socket;
pub mod state;
pub mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vhost_user;
pub mod wire;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use log::{error, info, warn};
use vcdev_device_model::blk::aio::{self, Aio, AioMode};
use vcdev_device_model::blk::file::AlignSource;
use vcdev_device_model::blk::{
    self, BlkConfig, BlkDevice, BlockBackend, FileBackend, FileOptions, RamBackend,
};
use vcdev_iommu::SealPolicy;

pub use config::{Backing, Config, ConfigError, DeviceSpec};
use daemon::{Daemon, OpError};
use state::State;
use vhost_user::conn::ConnConfig;

/// An error and its causes, `: `-separated, for one log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Errors that end the daemon (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The runtime directory or a vhost-user socket could not be set up.
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    /// A disk image could not be opened.
    #[error("Device {name}: cannot open its disk image")]
    File {
        /// The device.
        name: String,
        /// The cause.
        #[source]
        source: blk::file::Error,
    },
    /// The I/O engine asked for (`aio=io_uring`) cannot be set up.
    #[error("Device {name}: cannot set up its I/O engine")]
    Aio {
        /// The device.
        name: String,
        /// The cause.
        #[source]
        source: aio::AioError,
    },
    /// A RAM disk could not be allocated.
    #[error("Device {name}: cannot allocate its RAM disk")]
    Ram {
        /// The device.
        name: String,
        /// The cause.
        #[source]
        source: blk::ram::Error,
    },
    /// The device model refused the options.
    #[error("Device {name}: invalid virtio-blk device")]
    Device {
        /// The device.
        name: String,
        /// The cause.
        #[source]
        source: blk::Error,
    },
    /// A thread could not be started.
    #[error("Cannot start a thread")]
    Spawn(#[source] std::io::Error),
    /// Signal setup or wait failed.
    #[error("Signal handling failed")]
    Signal(#[source] std::io::Error),
    /// The options clash with the state file (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state file cannot be read.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// A device or node could not be set up.
    #[error(transparent)]
    Op(#[from] OpError),
    /// A device of the state file could not be set up again.
    #[error("Device {name} (added at run time, in DIR/state.json) cannot be set up again; remove it from the state file or fix its image")]
    StateDevice {
        /// The device.
        name: String,
        /// The cause.
        #[source]
        source: Box<OpError>,
    },
}

impl Error {
    /// The errno `vcdev ctl` reports for this error when adding a device.
    pub fn errno(&self) -> vcdev_iommu::Errno {
        match self {
            Error::Config(_) => vcdev_iommu::Errno::EINVAL,
            Error::Op(e) => e.errno(),
            Error::File {
                source: blk::file::Error::Locked { .. },
                ..
            } => vcdev_iommu::Errno::EBUSY,
            _ => vcdev_iommu::Errno::EIO,
        }
    }

    /// Options that are wrong (exit code 2) rather than a failure (1).
    pub fn is_usage(&self) -> bool {
        match self {
            Error::Config(_) => true,
            Error::Op(e) => e.is_usage(),
            _ => false,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Builds the device model of one `--device`.
pub fn build_device(spec: &DeviceSpec) -> Result<BlkDevice> {
    let name = spec.name.clone();
    let (backend, aio): (Arc<dyn BlockBackend>, Aio) = match &spec.backing {
        Backing::File(p) => {
            let options = FileOptions {
                read_only: spec.read_only,
                direct: spec.direct,
            };
            let file = FileBackend::open_with(p, options).map_err(|source| Error::File {
                name: name.clone(),
                source,
            })?;
            if let Some(a) = file.direct() {
                let source = match a.source {
                    AlignSource::Statx => "statx STATX_DIOALIGN",
                    AlignSource::BlockDevice => "the block device's logical block size",
                    AlignSource::Default => "defaults, the file system did not say",
                };
                info!(
                    "{name}: direct=on: O_DIRECT alignment {} bytes in memory, {} on disk \
                     (from {source}); blk_size {}",
                    a.mem,
                    a.offset,
                    file.block_size()
                );
            }
            let aio =
                aio::resolve_for_file(spec.aio, &name, &file).map_err(|source| Error::Aio {
                    name: name.clone(),
                    source,
                })?;
            (Arc::new(file), aio)
        }
        Backing::Ram(size) => {
            let ram = RamBackend::new(*size).map_err(|source| Error::Ram {
                name: name.clone(),
                source,
            })?;
            if spec.aio == AioMode::IoUring {
                info!("{name}: aio=io_uring ignored: a RAM disk copies with memcpy");
            }
            (Arc::new(ram), Aio::Sync)
        }
    };
    let cfg = BlkConfig {
        read_only: spec.read_only,
        serial: spec.serial.as_bytes().to_vec(),
        num_queues: spec.queues,
        queue_size: spec.queue_size,
        aio,
    };
    let device = BlkDevice::new(backend, cfg).map_err(|source| Error::Device { name, source })?;
    device.set_limits(spec.limits);
    Ok(device)
}

/// What every guest needs once, printed after the per-device options.
const QEMU_GUEST_OPTIONS: &str = "\
# once per guest: its RAM must be shared memfd memory, e.g.
-object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem
# behind a guest vIOMMU, add iommu_platform=on to each -device, and either
#   -machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,device-iotlb=on
#   (the device behind a pcie-root-port, with iommu_platform=on,ats=on)
# or
#   -device virtio-iommu-pci (the device with iommu_platform=on,disable-legacy=on)
";

/// The QEMU id for device `name`: QEMU ids must start with a letter
/// (`id_wellformed`), device names need not, so those get a prefix.
fn qemu_id(name: &str) -> String {
    if name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name.to_owned()
    } else {
        format!("vcdev-{name}")
    }
}

/// The QEMU options that attach device `spec` served at `socket`. A comma
/// in the path is doubled, QEMU's escape inside an option value.
pub fn qemu_options(spec: &DeviceSpec, socket: &Path) -> String {
    format!(
        "-chardev socket,id={n},path={p},reconnect-ms=1000 \
         -device vhost-user-blk-pci,chardev={n},num-queues={q},queue-size={s}",
        n = qemu_id(&spec.name),
        p = socket.display().to_string().replace(',', ",,"),
        q = spec.queues,
        s = spec.queue_size
    )
}

pub(crate) fn describe(spec: &DeviceSpec) -> String {
    let backing = match &spec.backing {
        Backing::File(p) if spec.direct => format!("file {} (O_DIRECT)", p.display()),
        Backing::File(p) => format!("file {}", p.display()),
        Backing::Ram(s) => format!("{} MiB RAM disk", s >> 20),
    };
    match spec.limits {
        l if l.is_unlimited() => backing,
        l => format!("{backing}, limits iops={} bw={}", l.iops, l.bw),
    }
}

/// How long a shutdown waits for the queues to drain their I/O.
pub(crate) const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the daemon until SIGINT or SIGTERM; then drains every queue,
/// flushes every disk, removes the nodes and returns `Ok`.
pub fn run(config: Config) -> Result<()> {
    let signals = sys::block_signals().map_err(Error::Signal)?;
    match sys::raise_nofile_limit() {
        Ok(n) => info!("descriptor limit {n}"),
        Err(e) => warn!("cannot raise the descriptor limit: {e}"),
    }
    socket::create_dir(&config.dir)?;
    let state = State::load(&config.dir)?;
    let command_line: Vec<(String, DeviceSpec)> = config
        .sources
        .iter()
        .cloned()
        .zip(config.devices.iter().cloned())
        .collect();
    let planned = state::merge(&command_line, config.default_device, &state)?;
    let seal_policy = if config.allow_unsealed_memory {
        log::warn!(
            "--allow-unsealed-memory: a frontend that shrinks its memory file can crash the daemon"
        );
        SealPolicy::AllowUnsealed
    } else {
        SealPolicy::RequireShrinkSeal
    };
    let conn_cfg = ConnConfig {
        event_loop: None,
        seal_policy,
        iotlb_miss_timeout: config.iotlb_miss_timeout,
        iotlb_max_entries: config.iotlb_max_entries,
        iotlb_poll: config.iotlb_poll,
    };
    let (daemon, em) = Daemon::new(
        &config.dir,
        conn_cfg,
        config.access.clone(),
        seal_policy,
        state,
    )?;
    let stop = daemon.stop_flag();
    let event_loop = std::thread::Builder::new()
        .name("vcdev-loop".into())
        .spawn(move || Daemon::run_loop(stop, em))
        .map_err(Error::Spawn)?;
    let result = start(&daemon, planned);
    if result.is_ok() {
        let sig = sys::wait_signal(&signals).map_err(Error::Signal);
        match sig {
            Ok(sig) => info!("signal {sig}: draining the queues, flushing disks and exiting"),
            Err(e) => error!("{}", error_chain(&e)),
        }
    }
    daemon.stop_loop();
    let _ = event_loop.join();
    for dev in daemon.registry().devices() {
        // Every queue completes its I/O in flight before the flush, so the
        // flush covers every write a guest was told is done.
        let left = dev.workers().stop_all(SHUTDOWN_DRAIN);
        if left > 0 {
            warn!("{}: {left} queues did not drain in time", dev.name());
        }
        if let Err(e) = dev.blk().flush() {
            error!("{}: flush failed: {e}", dev.name());
        }
        if result.is_ok() {
            info!(
                "{}: counters: {}",
                dev.name(),
                vhost_user::counters_line(&dev)
            );
        }
    }
    daemon.close_nodes();
    result
}

/// Opens the fixed nodes and adds the planned devices; prints how to
/// attach QEMU.
fn start(daemon: &Arc<Daemon>, planned: Vec<state::Planned>) -> Result<()> {
    daemon.open_fixed_nodes()?;
    let mut out = String::new();
    for p in planned {
        let name = p.spec.name.clone();
        let origin = p.origin;
        let added = daemon.add(p).map_err(|e| match (origin, e) {
            (state::Origin::Added, e) => Error::StateDevice {
                name,
                source: Box::new(e),
            },
            (_, e) => Error::Op(e),
        })?;
        out.push_str(&format!(
            "# {}: attach it with\n{}\n",
            added.name, added.qemu
        ));
    }
    daemon.open_control()?;
    out.push_str(QEMU_GUEST_OPTIONS);
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> DeviceSpec {
        DeviceSpec::parse(s, 0).unwrap()
    }

    /// `aio=auto` takes mixed for a file in memory (tmpfs), io_uring (where it can be set up)
    /// for a file on a disk; an explicit choice is kept on tmpfs.
    #[test]
    fn auto_takes_mixed_on_tmpfs_and_io_uring_on_disk() {
        let on = |dir: &std::path::Path| {
            let img = dir.join(format!("vcdev-auto-{}.img", std::process::id()));
            std::fs::File::create(&img)
                .and_then(|f| f.set_len(1 << 20))
                .unwrap();
            // One device at a time: each locks the image writable.
            let auto = build_device(&spec(&format!("blk,path={}", img.display())))
                .unwrap()
                .aio();
            let uring = build_device(&spec(&format!("blk,path={},aio=io_uring", img.display())))
                .unwrap()
                .aio();
            std::fs::remove_file(&img).unwrap();
            (auto, uring)
        };
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            assert_eq!(on(shm), (Aio::Mixed, Aio::IoUring));
        }
        assert_eq!(
            on(&std::env::current_dir().unwrap()),
            (Aio::IoUring, Aio::IoUring)
        );
    }

    /// A block device's node lives on devtmpfs, yet its data is on a disk:
    /// `aio=auto` takes io_uring for it (the storage bench's loop disk ran
    /// on the sync engine before this).
    #[test]
    fn auto_takes_io_uring_for_a_block_device() {
        let img = std::env::current_dir()
            .unwrap()
            .join(format!("vcdev-loop-{}.img", std::process::id()));
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(1 << 20))
            .unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            _ => {
                std::fs::remove_file(&img).unwrap();
                eprintln!("SKIP auto_takes_io_uring_for_a_block_device: no losetup (root needed)");
                return;
            }
        };
        let built = build_device(&spec(&format!("blk,path={dev}")));
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        std::fs::remove_file(&img).unwrap();
        assert_eq!(built.unwrap().aio(), Aio::IoUring);
    }

    /// RAM disks keep their memcpy path whatever `aio=` says; a file gets the engine asked for;
    /// `direct=on` advertises the file's block size.
    #[test]
    fn devices_carry_their_engine_and_block_size() {
        let ram = build_device(&spec("blk,ram=1M,aio=io_uring")).unwrap();
        assert_eq!((ram.aio(), ram.block_size()), (Aio::Sync, 512));
        let dir = std::env::temp_dir().join(format!("vcdev-lib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(1 << 20))
            .unwrap();
        let file = build_device(&spec(&format!("blk,path={},aio=sync", img.display()))).unwrap();
        assert_eq!((file.aio(), file.block_size()), (Aio::Sync, 512));
        // The image is locked while a device has it open.
        let locked = build_device(&spec(&format!("blk,path={}", img.display())));
        assert!(
            matches!(
                &locked,
                Err(Error::File {
                    source: blk::file::Error::Locked { .. },
                    ..
                })
            ),
            "{locked:?}"
        );
        drop(file);
        let uring = build_device(&spec(&format!("blk,path={},aio=io_uring", img.display())));
        assert_eq!(uring.unwrap().aio(), Aio::IoUring);
        let direct = format!("blk,path={},direct=on", img.display());
        match build_device(&spec(&direct)) {
            Ok(d) => {
                let bs = d.block_size();
                assert!(bs.is_power_of_two() && bs >= 512, "{bs}");
                let mut cfg = [0u8; 4];
                let at =
                    std::mem::offset_of!(virtio_bindings::virtio_blk::virtio_blk_config, blk_size);
                d.read_config(u32::try_from(at).unwrap(), &mut cfg);
                assert_eq!(u32::from_le_bytes(cfg), bs);
            }
            Err(e) => eprintln!("SKIP direct=on: {}", error_chain(&e)),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
