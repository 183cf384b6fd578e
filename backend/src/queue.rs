//! One queue engine for both doors.
//!
//! A running virtqueue is a [`QueueWorker`] on its own thread: it owns the
//! `virtio_queue::Queue`, the device model's [`AsyncQueue`] (requests parsed,
//! translated, held, submitted to the queue's I/O engine, completed in any
//! order) and an event loop that waits for a kick, the engine's completions,
//! a stop, or whatever the door adds. What is the door's own plugs in through
//! [`Door`]:
//!
//! - the memory view of a batch ([`Door::batch`]): the cdev door's reader of
//!   the device's IOAS (none while DMA is blocked), or the vhost-user door's
//!   reader of its memory table or IOTLB with the rings pinned;
//! - what to do with an IOMMU fault: fail the request (cdev), or ask the
//!   frontend for the mapping and park the request meanwhile (vhost-user
//!   under a vIOMMU), so that the requests behind it go on;
//! - how the driver is told (MSI-X vector, call eventfd) and what a broken
//!   queue means (NEEDS_RESET, err eventfd).
//!
//! # Stopping
//!
//! A stop (queue disabled, device reset, disconnect, SIGTERM) waits for
//! every request in flight and completes it, so no I/O is left in flight
//! when the worker returns its queue: nothing writes into memory that is
//! unmapped afterwards, and the final flush covers every completed write.
//! Parked requests were taken from the avail ring but never started: the
//! worker hands their heads back with the queue, so that the door can give
//! them to the worker that resumes the queue (a paused guest that resumes
//! sees no error), or drop them with the queue (a reset).
//! If the memory is out of reach by then (the rings cannot be translated,
//! the device was detached), the I/O in flight is waited for and its holds
//! released without an answer ([`AsyncQueue::abandon`]).
//!
//! # I/O limits
//!
//! A request the device's limits (`iops=`, `bw=`) hold back is parked by
//! the [`AsyncQueue`]; the worker sleeps until
//! [`AsyncQueue::throttle_deadline`] (or the door's own deadline, whichever
//! comes first), and is woken at once when the limits change
//! ([`BlkDevice::set_limits`] wakes every worker of the device through its
//! [`Control`]). Requests held back this way are handed back with the
//! queue like the other parked ones.

use std::fmt::Display;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use log::{error, warn};
use vcdev_device_model::blk::aio::Engine;
use vcdev_device_model::blk::throttle::Wake;
use vcdev_device_model::blk::{AsyncQueue, BlkDevice, Fault, FaultPolicy, QueueOutcome};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{EventLoop, EventLoopError, EVENT_CONTROL, EVENT_FIRST_DEVICE};
use crate::registry::Device;
use crate::ring::{Held, RingView};
use vcdev_iommu::sync::lock;

/// The I/O engine's completion eventfd in a worker's loop.
const EVENT_ENGINE: u64 = EVENT_FIRST_DEVICE;
/// The door's wake-ups (kicks, ioeventfds, miss answers): from here on.
pub const EVENT_DOOR: u64 = EVENT_FIRST_DEVICE + 1;

/// Batches run again at once when the door asks ([`Door::take_repoll`]).
const MAX_REPOLLS: usize = 8;

/// A fault decision: park the request (Retry) or fail it (Fail).
pub type Decide<'d> = dyn FnMut(&Fault) -> FaultPolicy + 'd;

/// What a door could do for one batch.
pub enum Batch<R> {
    /// The batch ran.
    Ran(R),
    /// The memory is not reachable now, but may be later (a ring waits for
    /// an IOTLB miss answer): wait for the next wake-up.
    Blocked,
    /// The memory is out of reach for good (DMA blocked, a ring that will
    /// not translate): abandon what is in flight.
    Lost,
}

/// A queue's ring addresses (in its DMA space) and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rings {
    /// Descriptor table.
    pub desc: u64,
    /// Avail ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Entries.
    pub size: u16,
}

impl Rings {
    fn of(q: &Queue) -> Rings {
        use virtio_queue::QueueT;
        Rings {
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            size: q.size(),
        }
    }
}

/// What a door plugs into a [`QueueWorker`].
pub trait Door: Send + 'static {
    /// Runs `f` on the queue's memory view for one batch, with the door's
    /// fault decision. The view is online (a session) only for the call.
    fn batch<R>(
        &mut self,
        rings: Rings,
        f: impl FnOnce(&RingView<'_, '_>, &mut Decide<'_>) -> R,
    ) -> Batch<R>;

    /// The driver must be notified (a used buffer).
    fn notify(&self);

    /// The queue itself broke (used ring or event fields unwritable).
    fn broken(&self, err: &dyn Display);

    /// Called after each batch with the requests still parked; the door
    /// forgets what they no longer wait for.
    fn after_batch(&mut self, parked: usize) {
        let _ = parked;
    }

    /// When the worker must look again without a wake-up (a miss times out).
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// A fault decided Retry found its translation already there: poll
    /// again at once rather than wait for a wake-up.
    fn take_repoll(&mut self) -> bool {
        false
    }
}

/// A new I/O engine for one queue of `device`, of the kind its `aio=` chose.
pub fn engine_for(device: &Arc<BlkDevice>) -> Engine {
    Engine::new(device.aio(), device.backend().clone(), device.queue_size())
}

/// The queue workers of one device, so that a daemon shutting down can stop
/// them all (each drains its I/O) before it flushes the disk.
#[derive(Debug, Default)]
pub struct WorkerSet {
    running: Mutex<Vec<Weak<Control>>>,
    gone: Condvar,
}

impl WorkerSet {
    fn enter(&self, c: &Arc<Control>) {
        lock(&self.running).push(Arc::downgrade(c));
    }

    fn leave(&self, c: &Arc<Control>) {
        let p = Arc::as_ptr(c);
        lock(&self.running).retain(|w| w.as_ptr() != p);
        self.gone.notify_all();
    }

    /// Stops every worker and waits, at most `timeout`, until each has
    /// drained its I/O and exited. Returns how many are still running.
    pub fn stop_all(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.running);
        // A worker whose thread never started leaves a dead entry.
        g.retain(|w| w.strong_count() > 0);
        for c in g.iter().filter_map(Weak::upgrade) {
            c.stop();
        }
        while !g.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self
                .gone
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        g.len()
    }
}

/// A worker's stop word and the eventfd that wakes it to read it.
#[derive(Debug)]
pub struct Control {
    wake: EventFd,
    stop: AtomicBool,
}

impl Control {
    /// A control block.
    pub fn new() -> std::io::Result<Arc<Control>> {
        Ok(Arc::new(Control {
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
        }))
    }

    /// Asks the worker to stop (it drains first) and wakes it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.wake.write(1) {
            error!("cannot wake a queue worker: {e}");
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

impl Wake for Control {
    /// The limits changed: look at the throttled requests again.
    fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            error!("cannot wake a queue worker: {e}");
        }
    }
}

/// One running queue: see the module doc.
pub struct QueueWorker<D: Door> {
    name: String,
    queue: Queue,
    aq: AsyncQueue<Held>,
    door: D,
    el: EventLoop,
    control: Arc<Control>,
    /// Descriptors that wake the worker: kicks (the frontend's or client's
    /// eventfds, the cdev ioeventfds), miss wake-ups. Watched edge-triggered
    /// and never read ([`EventLoop::add_edge`]): a peer's eventfd may block.
    /// Held only to stay open while the loop watches them.
    _wakes: Vec<EventFd>,
    engine_watched: bool,
    broken: bool,
    /// The last batch could not run ([`Batch::Blocked`]).
    blocked: bool,
    /// The registry's device, whose [`WorkerSet`] lists this worker.
    reg: Arc<Device>,
}

impl<D: Door> QueueWorker<D> {
    /// A worker for `queue` of registry device `reg`, named `name` in logs,
    /// waking on `wakes` (edge-triggered, never read) and `control`.
    pub fn new(
        name: String,
        reg: &Arc<Device>,
        queue: Queue,
        door: D,
        wakes: Vec<EventFd>,
        control: Arc<Control>,
    ) -> Result<Self, EventLoopError> {
        let el = EventLoop::new()?;
        el.add(control.wake.as_raw_fd(), EVENT_CONTROL)?;
        for (i, fd) in wakes.iter().enumerate() {
            let id = EVENT_DOOR.saturating_add(u64::try_from(i).unwrap_or(u64::MAX));
            el.add_edge(fd.as_raw_fd(), id)?;
        }
        let device = reg.blk();
        // Listed before its thread starts, so a shutdown never misses it.
        reg.workers().enter(&control);
        let waker: Weak<Control> = Arc::downgrade(&control);
        device.throttle().add_waker(waker);
        Ok(QueueWorker {
            name,
            queue,
            aq: AsyncQueue::new(device.clone(), engine_for(device)),
            door,
            el,
            control,
            _wakes: wakes,
            engine_watched: false,
            broken: false,
            blocked: false,
            reg: reg.clone(),
        })
    }

    /// Records every request in `tracker` (vhost-user's inflight region);
    /// what it says was in flight is walked again at the first poll.
    pub fn track(&mut self, tracker: Box<dyn vcdev_device_model::blk::Tracker>) {
        self.aq.track(tracker);
    }

    /// Parks `heads` (a previous worker's parked requests) before the first
    /// poll.
    pub fn resume_parked(&mut self, heads: Vec<u16>) {
        self.aq.park(heads);
    }

    /// Runs until stopped; returns the queue, its position kept, with
    /// nothing in flight, and the heads of the requests still parked.
    pub fn run(mut self) -> (Queue, Vec<u16>) {
        // A kick may have come before the queue started: look now.
        self.poll();
        loop {
            // A batch the door could not run (memory out of reach for now)
            // waits for the door's wake-up, not for the limits.
            let throttle = self.aq.throttle_deadline().filter(|_| !self.blocked);
            let deadline = match (self.door.deadline(), throttle) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.el.wait_timeout(timeout, |_| {}) {
                error!("{}: {e}", self.name);
                break;
            }
            // Consume the wake-up first, then look at the stop word: a stop
            // set after this look leaves the eventfd readable for the next
            // wait. (Our own eventfd, non-blocking; the `wakes` are
            // edge-triggered and not read: a peer's may block.)
            let _ = self.control.wake.read();
            if self.control.stopping() {
                break;
            }
            self.poll();
        }
        self.stop();
        self.reg.workers().leave(&self.control);
        let parked = self.aq.take_parked();
        (self.queue, parked)
    }

    /// One or more batches, until nothing asks for another at once (at most
    /// [`MAX_REPOLLS`] more: a door that keeps asking waits for a wake-up).
    fn poll(&mut self) {
        if self.broken {
            return;
        }
        for _ in 0..=MAX_REPOLLS {
            let rings = Rings::of(&self.queue);
            let (queue, aq) = (&mut self.queue, &mut self.aq);
            let r = self
                .door
                .batch(rings, |view, decide| aq.poll(queue, view, decide));
            self.after(r);
            self.watch_engine();
            if self.broken || !self.door.take_repoll() {
                return;
            }
        }
    }

    fn after(&mut self, r: Batch<Result<QueueOutcome, vcdev_device_model::blk::Error>>) {
        self.blocked = matches!(r, Batch::Blocked);
        match r {
            Batch::Ran(Ok(outcome)) => {
                if outcome.notify {
                    self.door.notify();
                }
            }
            Batch::Ran(Err(e)) => {
                error!("{}: {e}; queue stopped until restarted", self.name);
                self.door.broken(&e);
                self.broken = true;
                self.aq.abandon();
            }
            Batch::Blocked => {}
            Batch::Lost => {
                let n = self.aq.abandon();
                if n > 0 {
                    warn!(
                        "{}: memory out of reach: {n} requests in flight dropped",
                        self.name
                    );
                }
            }
        }
        self.door.after_batch(self.aq.parked());
    }

    /// The engine's ring (and its eventfd) exists after its first
    /// submission: watch it from then on.
    fn watch_engine(&mut self) {
        if self.engine_watched {
            return;
        }
        let fd: Option<RawFd> = self.aq.engine().notifier().map(|fd| fd.as_raw_fd());
        if let Some(fd) = fd {
            match self.el.add(fd, EVENT_ENGINE) {
                Ok(()) => self.engine_watched = true,
                Err(e) => error!("{}: cannot watch I/O completions: {e}", self.name),
            }
        }
    }

    /// Completes everything in flight (parked requests stay parked).
    fn stop(&mut self) {
        let rings = Rings::of(&self.queue);
        let (queue, aq) = (&mut self.queue, &mut self.aq);
        let r = self.door.batch(rings, |view, _| aq.drain(queue, view));
        if !matches!(r, Batch::Ran(_)) {
            // The memory is out of reach: finish the I/O, answer nothing.
            let n = self.aq.abandon();
            if n > 0 {
                warn!(
                    "{}: stopped with its memory out of reach: {n} requests dropped",
                    self.name
                );
            }
            return;
        }
        let parked = self.aq.take_parked();
        self.after(r);
        if self.aq.in_flight() > 0 {
            self.aq.abandon();
        }
        self.aq.park(parked);
    }
}
