//! `vub_blk`: vcdev's virtio-blk device model served by rust-vmm's `vhost-user-backend` crate,
//! for the storage benchmark (`tests/benches/storage.rs`) only. It is not a second daemon: no
//! IOMMU, no control socket, no cdev door; `vcdev serve` neither installs nor uses it.
//!
//! It shows that the device logic does not depend on vcdev's vhost-user engine: features and
//! config space come from [`BlkDevice`], and each queue is the device model's [`AsyncQueue`]
//! (the same request lifecycle and I/O engine choice as `vcdev serve`) over vm-memory's
//! `GuestMemoryAtomic<GuestMemoryMmap>`, the memory the crate maps from the frontend's table.
//! A request in flight holds the memory snapshot it was translated in (an `Arc`), so a new
//! memory table never unmaps what the kernel still reads or writes. Kicks and the engine's
//! completions are events of the crate's per-queue epoll thread.
//!
//! ```text
//! vub_blk SOCKET (path=FILE | ram=SIZE) [queues=N] [queue-size=N] [direct=on|off]
//!         [aio=auto|io_uring|sync]
//! ```
//!
//! `SIZE` takes a `K`, `M` or `G` suffix. `direct=on` opens the file with `O_DIRECT` (as
//! `vcdev serve` does: alignment from the file, unaligned buffers bounced). `aio=` picks the
//! engine as `vcdev serve` does (`auto`: io_uring, or sync for a file on tmpfs). An invalid
//! argument exits with 2 (the convention of `vcdev serve`), a failure while serving with 1.
//! The daemon serves one frontend after another until it is killed.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use vcdev_device_model::blk::aio::{self, Aio, AioMode, Engine};
use vcdev_device_model::blk::file::FileOptions;
use vcdev_device_model::blk::{
    AsyncQueue, BlkConfig, BlkDevice, BlockBackend, FaultPolicy, FileBackend, InflightMemory,
    RamBackend, Release,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryError, GuestMemoryMmap, Permissions,
};
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
    aio: AioMode,
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
            aio: AioMode::Auto,
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
                "aio" => {
                    cfg.aio = v
                        .parse()
                        .map_err(|()| format!("{opt}: expected auto, io_uring or sync"))?;
                }
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
        let (backend, aio): (Arc<dyn BlockBackend>, Aio) = match &self.disk {
            Disk::Ram(len) => (
                Arc::new(RamBackend::new(*len).map_err(|e| format!("ram: {e}"))?),
                Aio::Sync,
            ),
            Disk::File(path) => {
                let options = FileOptions {
                    read_only: false,
                    direct: self.direct,
                };
                let file = FileBackend::open_with(path, options).map_err(|e| format!("{e}"))?;
                let aio = aio::resolve_for_file(self.aio, "vub_blk", &file)
                    .map_err(|e| format!("{e}"))?;
                (Arc::new(file), aio)
            }
        };
        let cfg = BlkConfig {
            num_queues: self.queues,
            queue_size: self.queue_size,
            aio,
            ..BlkConfig::default()
        };
        BlkDevice::new(backend, cfg).map_err(|e| format!("{e}"))
    }
}

/// The memory snapshot of one batch; a request in flight holds it.
struct Snapshot(Arc<GuestMemoryMmap>);

/// A request's hold on the snapshot it was translated in.
#[derive(Debug)]
struct Pin(#[allow(dead_code)] Arc<GuestMemoryMmap>);

impl Release for Pin {
    fn release(self) {}
}

impl GuestMemory for Snapshot {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        GuestMemoryBackend::check_range(&*self.0, addr, count)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'a, BS<'a, ()>>, GuestMemoryError> {
        Ok(GuestMemoryBackend::get_slices(&*self.0, addr, count))
    }
}

// SAFETY: every translation through a snapshot points into the mappings of
// its `GuestMemoryMmap`, which are unmapped only when the last `Arc` of it is
// dropped; a hold is such an `Arc`, dropped when the request completed.
unsafe impl InflightMemory for Snapshot {
    type Hold = Pin;

    fn hold(&self, _ranges: &[(u64, u64)]) -> Pin {
        Pin(self.0.clone())
    }
}

/// The vhost-user glue: one [`AsyncQueue`] per queue, each served by its own thread of the
/// crate's event loop (its kick, event 0 of that thread, and its engine's completions).
struct VubBlk {
    device: Arc<BlkDevice>,
    queues: Vec<Mutex<AsyncQueue<Pin>>>,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
}

impl VubBlk {
    fn new(device: BlkDevice) -> Self {
        let device = Arc::new(device);
        let queues = (0..device.num_queues())
            .map(|_| {
                let engine =
                    Engine::new(device.aio(), device.backend().clone(), device.queue_size());
                Mutex::new(AsyncQueue::new(device.clone(), engine))
            })
            .collect();
        Self {
            device,
            queues,
            mem: Mutex::new(None),
        }
    }

    /// The event id of queue `q`'s completions.
    fn completion_event(&self, q: usize) -> u64 {
        u64::from(self.device.num_queues()) + 1 + q as u64
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
        // The crate sets EVENT_IDX on each vring's queue, and AsyncQueue reads it from there.
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
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // One queue per thread (`queues_per_thread`): the thread's id is its queue's index and
        // `vrings` holds that queue alone. The crate numbers a thread's kicks from 0 among its
        // own queues, so the kick is event 0; the completions are `completion_event`. Both drain
        // the queue.
        let known =
            device_event == 0 || u64::from(device_event) == self.completion_event(thread_id);
        let (true, Some(vring), Some(worker)) = (known, vrings.first(), self.queues.get(thread_id))
        else {
            return Err(io::Error::other(format!(
                "unknown event {device_event} on thread {thread_id}"
            )));
        };
        let Some(mem) = self
            .mem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Err(io::Error::other("kick before the memory table"));
        };
        let snapshot = Snapshot(mem.memory().into_inner());
        // A poll takes at most 8 chains or about 512 KiB (`more`): poll
        // again while it says more may wait.
        loop {
            let outcome = {
                let mut state = vring.get_mut();
                worker
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .poll(state.get_queue_mut(), &snapshot, &mut |_| FaultPolicy::Fail)
                    .map_err(io::Error::other)?
            };
            // The vring's lock is released: signalling takes it again.
            if outcome.notify {
                vring.signal_used_queue()?;
            }
            if !outcome.more {
                return Ok(());
            }
        }
    }
}

fn serve(cfg: &Config, device: BlkDevice) -> Result<(), String> {
    let backend = Arc::new(VubBlk::new(device));
    // Each queue's engine is set up now, so its completions can be events
    // of the queue's epoll thread.
    let mut completions = Vec::new();
    for (q, worker) in backend.queues.iter().enumerate() {
        let mut aq = worker.lock().unwrap_or_else(PoisonError::into_inner);
        aq.start_engine()
            .map_err(|e| format!("queue {q}: I/O engine: {e}"))?;
        if let Some(fd) = aq.engine().notifier() {
            completions.push((q, fd.as_raw_fd()));
        }
    }
    loop {
        let mut daemon = VhostUserDaemon::new(
            "vub_blk".to_owned(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| format!("creating the daemon: {e}"))?;
        let handlers = daemon.get_epoll_handlers();
        for &(q, fd) in &completions {
            let handler = handlers
                .get(q)
                .ok_or_else(|| format!("no epoll thread for queue {q}"))?;
            handler
                .register_listener(fd, EventSet::IN, backend.completion_event(q))
                .map_err(|e| format!("queue {q}: watching completions: {e}"))?;
        }
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
