//! `vub_blk`: vcdev's virtio-blk device model served by rust-vmm's `vhost-user-backend` crate,
//! for the storage benchmark (`tests/benches/storage.rs`) only. It is not a second daemon: no
//! IOMMU, no control socket, no cdev door; `vcdev serve` neither installs nor uses it.
//!
//! It shows that the device logic does not depend on vcdev's vhost-user engine: features and
//! config space come from [`BlkDevice`], and each kick drains the queue with
//! [`BlkQueue::process`] over vm-memory's `GuestMemoryAtomic<GuestMemoryMmap>`, the memory the
//! crate maps from the frontend's table.
//!
//! ```text
//! vub_blk SOCKET (path=FILE | ram=SIZE) [queues=N] [queue-size=N] [direct=on|off] [aio=sync]
//! ```
//!
//! `SIZE` takes a `K`, `M` or `G` suffix. `direct=on` opens the file with `O_DIRECT` (the
//! driver's buffers must then be aligned, as a guest's page cache and fio's are). `aio=` names
//! the engine: the device model's synchronous queue path is the only one `BlkQueue` drives
//! today, so `aio=io_uring` is refused until it drives the asynchronous one. An invalid
//! argument exits with 2 (the convention of `vcdev serve`), a failure while serving with 1.
//! The daemon serves one frontend after another until it is killed.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use vcdev_device_model::blk::BlockBackend;
use vcdev_device_model::blk::{
    BlkConfig, BlkDevice, BlkQueue, FaultPolicy, FileBackend, RamBackend,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// `VHOST_USER_F_PROTOCOL_FEATURES`, the vhost-user bit in the virtio feature word.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// The exit code of an invalid argument.
const EXIT_USAGE: u8 = 2;

/// Where the disk lives.
#[derive(Debug)]
enum Disk {
    /// `path=FILE`: a file or block device.
    File(PathBuf),
    /// `ram=SIZE`: an anonymous RAM disk.
    Ram(u64),
}

/// The validated arguments.
#[derive(Debug)]
struct Config {
    socket: PathBuf,
    disk: Disk,
    queues: u16,
    queue_size: u16,
    direct: bool,
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn parse_on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

impl Config {
    fn from_args(args: &[String]) -> Result<Config, String> {
        let (socket, opts) = args
            .split_first()
            .ok_or_else(|| "usage: vub_blk SOCKET (path=FILE | ram=SIZE) [queues=N] [queue-size=N] [direct=on|off] [aio=sync]".to_owned())?;
        let mut disk = None;
        let mut cfg = Config {
            socket: PathBuf::from(socket),
            disk: Disk::Ram(0),
            queues: 1,
            queue_size: 256,
            direct: false,
        };
        for opt in opts {
            let (key, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("{opt}: expected KEY=VALUE"))?;
            let bad = || format!("{opt}: invalid value");
            match key {
                "path" => disk = Some(Disk::File(PathBuf::from(v))),
                "ram" => disk = Some(Disk::Ram(parse_size(v).ok_or_else(bad)?)),
                "queues" => cfg.queues = v.parse().map_err(|_| bad())?,
                "queue-size" => cfg.queue_size = v.parse().map_err(|_| bad())?,
                "direct" => cfg.direct = parse_on_off(key, v)?,
                "aio" => match v {
                    "sync" => {}
                    "io_uring" => {
                        return Err(
                            "aio=io_uring: BlkQueue drives the synchronous path only".to_owned()
                        )
                    }
                    _ => return Err(format!("{opt}: expected sync or io_uring")),
                },
                _ => return Err(format!("{opt}: unknown option")),
            }
        }
        cfg.disk = disk.ok_or("one of path=FILE or ram=SIZE is required")?;
        if cfg.direct && matches!(cfg.disk, Disk::Ram(_)) {
            return Err("direct=on needs path=FILE".to_owned());
        }
        Ok(cfg)
    }

    fn device(&self) -> Result<BlkDevice, String> {
        let backend: Arc<dyn BlockBackend> = match &self.disk {
            Disk::Ram(len) => Arc::new(RamBackend::new(*len).map_err(|e| format!("ram: {e}"))?),
            Disk::File(path) => {
                let mut oo = OpenOptions::new();
                oo.read(true).write(true);
                if self.direct {
                    oo.custom_flags(libc::O_DIRECT);
                }
                let file = oo
                    .open(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Arc::new(FileBackend::from_file(file).map_err(|e| format!("{e}"))?)
            }
        };
        let cfg = BlkConfig {
            num_queues: self.queues,
            queue_size: self.queue_size,
            ..BlkConfig::default()
        };
        BlkDevice::new(backend, cfg).map_err(|e| format!("{e}"))
    }
}

/// The vhost-user glue: one [`BlkQueue`] per queue, each served by its own thread of the
/// crate's event loop.
struct VubBlk {
    device: Arc<BlkDevice>,
    queues: Vec<Mutex<BlkQueue>>,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
}

impl VubBlk {
    fn new(device: BlkDevice) -> Self {
        let device = Arc::new(device);
        let queues = (0..device.num_queues())
            .map(|_| Mutex::new(BlkQueue::new(device.clone())))
            .collect();
        Self {
            device,
            queues,
            mem: Mutex::new(None),
        }
    }
}

impl VhostUserBackend for VubBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.device.num_queues())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size())
    }

    fn features(&self) -> u64 {
        self.device.device_features() | VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The crate sets EVENT_IDX on each vring's queue, and BlkQueue reads it from there.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
        self.device.read_config(offset, &mut buf);
        buf
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.num_queues()).map(|i| 1u64 << i).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let idx = usize::from(device_event);
        let (Some(vring), Some(worker)) = (vrings.get(idx), self.queues.get(idx)) else {
            return Err(io::Error::other(format!("unknown event {device_event}")));
        };
        let Some(mem) = self
            .mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Err(io::Error::other("kick before the memory table"));
        };
        let guard = mem.memory();
        let outcome = {
            let mut state = vring.get_mut();
            worker
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .process(state.get_queue_mut(), &*guard, FaultPolicy::Fail)
                .map_err(io::Error::other)?
        };
        // The vring's lock is released: signalling takes it again.
        if outcome.notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

fn serve(cfg: &Config, device: BlkDevice) -> Result<(), String> {
    let backend = Arc::new(VubBlk::new(device));
    loop {
        let mut daemon = VhostUserDaemon::new(
            "vub_blk".to_owned(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| format!("creating the daemon: {e}"))?;
        daemon
            .serve(&cfg.socket)
            .map_err(|e| format!("serving {}: {e}", cfg.socket.display()))?;
        eprintln!("vub_blk: frontend disconnected; waiting for the next");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vub_blk: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let device = match cfg.device() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vub_blk: {e}");
            return ExitCode::FAILURE;
        }
    };
    match serve(&cfg, device) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vub_blk: {e}");
            ExitCode::FAILURE
        }
    }
}
