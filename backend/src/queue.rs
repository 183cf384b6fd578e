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
//! # Polling
//!
//! With the device's `poll-us=N` ([`Device::poll`]), a worker that has just
//! taken a request does not go to sleep at once: for up to N us after its
//! last request it busy-polls the avail ring's index through the door's
//! memory view ([`Door::peek`]: no request is walked, nothing is counted),
//! and looks at its event loop without waiting (kicks, completions, a
//! stop). Meanwhile the driver is told not to notify
//! ([`AsyncQueue::set_quiet`]: `avail_event` left behind under EVENT_IDX,
//! else VRING_USED_F_NO_NOTIFY), so a driver that honours it saves its
//! doorbell writes; a request offered meanwhile is taken without waiting
//! for a wake-up, kicked or not. Before it sleeps the worker turns the
//! notifications back on and looks at the ring once more
//! ([`AsyncQueue::rearm`]). Between two looks it yields its CPU, so that on
//! a machine with few CPUs a frontend that shares one with it gets to run.
//! The poll ends early when the door could not run its batch (a miss waited
//! for, memory out of reach), requests wait for the I/O limits, or the
//! queue broke; every look is a session of its own, so an invalidation
//! never waits for more than one look.
//!
//! # Small batches
//!
//! A batch takes at most 8 chains before it completes and notifies what is
//! done, and the worker polls again at once ([`AsyncQueue::poll`]'s
//! `more`): a driver on another CPU refills while the worker goes on,
//! instead of the two taking turns. When the driver shares the worker's
//! CPU, the driver that early notification wakes preempts the worker. So
//! after each early notification the worker looks at its thread's
//! involuntary context switches (one `getrusage`): if it lost its CPU since
//! the last look, twice in a row (once may be any other task's doing), it
//! takes a ring's worth a batch for the next 16 batches (32, 64, ... up to
//! 1024 as the losses go on) and tries small batches again; a look without
//! a loss resets the count. Looks that find no loss thin out (after 2, 4,
//! 8, then every 16 early notifications: a look is a system call, 3-5% of
//! the worker's time when it came after every one on two CPUs); a loss
//! brings the next look at once. The duration of the notifying write cannot
//! tell the two cases apart: waking a driver whose vCPU is halted takes as
//! long.
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
//! The one thing that can keep a worker from seeing its stop is a write to
//! the driver's eventfd that blocks: the eventfd is the peer's, and so is
//! its O_NONBLOCK flag (the open file description is shared), so a hostile
//! peer can make it blocking and fill its counter. The stopper
//! ([`Running::stop`], [`WorkerSet::stop_all`]) then interrupts the
//! worker's thread with a signal ([`crate::sys::interrupt_thread`]): the
//! write fails with EINTR, and the driver, whose counter is full, is
//! signalled already. Such a peer stalls nothing but its own queue.
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
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, warn};
use vcdev_device_model::blk::aio::Engine;
use vcdev_device_model::blk::throttle::Wake;
use vcdev_device_model::blk::{AsyncQueue, BlkDevice, Fault, FaultPolicy, QueueOutcome};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{EventLoop, EventLoopError, EVENT_CONTROL, EVENT_FIRST_DEVICE};
use crate::registry::Device;
use crate::ring::{Held, RingView};
use vcdev_iommu::sync::lock;

/// The I/O engine's completion eventfd in a worker's loop.
const EVENT_ENGINE: u64 = EVENT_FIRST_DEVICE;
/// The door's wake-ups (kicks, ioeventfds, miss answers): from here on.
pub const EVENT_DOOR: u64 = EVENT_FIRST_DEVICE + 1;

/// How soon a worker that could not turn the driver's notifications back on
/// after polling looks again (the driver may not kick meanwhile).
const REARM_RETRY: Duration = Duration::from_millis(10);

/// Batches run again at once when the door asks ([`Door::take_repoll`]).
const MAX_REPOLLS: usize = 8;

/// Batches of a ring's worth after the first early notification that cost
/// the worker its CPU (see "Small batches" in the module doc); doubled at
/// each one after, up to [`BIG_BATCHES_MAX`].
const BIG_BATCHES_FIRST: u32 = 16;
const BIG_BATCHES_MAX: u32 = 1024;

/// At most this many early notifications between two looks at the
/// thread's context switches, while the looks find no loss.
const LOOK_STRIDE_MAX: u32 = 16;

/// Whether a worker's batches stop early to notify (see "Small batches" in
/// the module doc).
#[derive(Debug)]
struct EarlyNotify {
    /// Batches left before small batches are tried again.
    big_left: u32,
    /// How many big batches the next preemption buys.
    backoff: u32,
    /// The thread's involuntary context switches at the last look (none
    /// before the first: the count since the thread started says nothing).
    switches: Option<u64>,
    /// Looks in a row that found the CPU lost since the one before.
    lost: u32,
    /// Early notifications between the last look and the next: doubled by
    /// each look without a loss, up to [`LOOK_STRIDE_MAX`], back to 1 at a
    /// loss.
    stride: u32,
    /// Early notifications left before the next look.
    skip: u32,
}

impl EarlyNotify {
    fn new() -> Self {
        EarlyNotify {
            big_left: 0,
            backoff: BIG_BATCHES_FIRST,
            switches: None,
            lost: 0,
            stride: 1,
            skip: 0,
        }
    }

    /// After an early notification: whether to look at the thread's
    /// context switches now ([`EarlyNotify::observed`]).
    fn look(&mut self) -> bool {
        if self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    /// Whether the next batch is a small one; counts it.
    fn small(&mut self) -> bool {
        if self.big_left == 0 {
            return true;
        }
        self.big_left -= 1;
        false
    }

    /// After an early notification: the thread's involuntary context
    /// switches are `switches` now. Two looks in a row that find the CPU
    /// lost: the notifications cost it (one alone may be any other task's
    /// doing).
    fn observed(&mut self, switches: u64) {
        let preempted = self.switches.is_some_and(|before| switches > before);
        self.switches = Some(switches);
        if !preempted {
            self.lost = 0;
            self.backoff = BIG_BATCHES_FIRST;
            self.stride = (self.stride * 2).min(LOOK_STRIDE_MAX);
            self.skip = self.stride - 1;
            return;
        }
        self.stride = 1;
        self.skip = 0;
        self.lost += 1;
        if self.lost >= 2 {
            self.lost = 0;
            self.big_left = self.backoff;
            self.backoff = (self.backoff * 2).min(BIG_BATCHES_MAX);
        }
    }
}

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

    /// The worker stops: the next batch is its last (the drain). The stop
    /// waits for no answer from the driver (what it cannot reach it
    /// abandons), so a door that asks the driver for translations need not
    /// ask for that batch's, and QEMU, stopping the device, would refuse
    /// the question.
    fn stopping(&mut self) {}

    /// Runs `f` on the queue's memory view to look at the rings, without a
    /// batch: no fault is asked about and no batch counted. `None` when the
    /// rings are out of reach now (the worker stops polling and waits).
    fn peek<R>(&mut self, rings: Rings, f: impl FnOnce(&RingView<'_, '_>) -> R) -> Option<R> {
        match self.batch(rings, |view, _| f(view)) {
            Batch::Ran(r) => Some(r),
            Batch::Blocked | Batch::Lost => None,
        }
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
}

impl WorkerSet {
    fn enter(&self, c: &Arc<Control>) {
        let mut g = lock(&self.running);
        g.retain(|w| w.strong_count() > 0);
        g.push(Arc::downgrade(c));
    }

    /// Stops every worker and waits, at most `timeout`, until each has
    /// drained its I/O and exited. Returns how many are still running.
    pub fn stop_all(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let all: Vec<Arc<Control>> = lock(&self.running)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        all.iter().for_each(|c| c.stop());
        all.iter()
            .filter(|c| !c.wait_exit(deadline.saturating_duration_since(Instant::now())))
            .count()
    }
}

/// Where a worker's thread is, for [`Control::wait_exit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThreadState {
    /// Not spawned yet (or never will be).
    Unknown,
    /// Running its loop.
    Running(libc::pthread_t),
    /// Out of its loop: done with its queue, its thread ending.
    Exited,
}

/// How often [`Control::wait_exit`] interrupts a worker blocked signalling
/// its driver.
const UNBLOCK_EVERY: Duration = Duration::from_millis(50);

/// A worker's stop word and the eventfd that wakes it to read it; whether
/// it is running, and whether it is telling its driver.
#[derive(Debug)]
pub struct Control {
    wake: EventFd,
    stop: AtomicBool,
    /// The worker is in [`Door::notify`]: a write to a peer's eventfd,
    /// which blocks when the peer made it blocking (the open file
    /// description is shared: O_NONBLOCK is the peer's to clear) and filled
    /// its counter. Only that stops the worker from seeing a stop.
    notifying: AtomicBool,
    thread: Mutex<ThreadState>,
    exited: Condvar,
}

impl Control {
    /// A control block.
    pub fn new() -> std::io::Result<Arc<Control>> {
        crate::sys::install_interrupt();
        Ok(Arc::new(Control {
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            notifying: AtomicBool::new(false),
            thread: Mutex::new(ThreadState::Unknown),
            exited: Condvar::new(),
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

    /// Records the worker's thread, unless it already left its loop.
    fn started(&self, t: libc::pthread_t) {
        let mut g = lock(&self.thread);
        if *g == ThreadState::Unknown {
            *g = ThreadState::Running(t);
        }
    }

    /// Waits, at most `timeout`, until the worker has left its loop (or
    /// will never run). Meanwhile a worker stuck in a write to its driver's
    /// eventfd is interrupted every [`UNBLOCK_EVERY`]: the write fails with
    /// EINTR (the driver, which filled its own counter, is signalled
    /// already) and the worker sees the stop. True when it left.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.thread);
        loop {
            if *g == ThreadState::Exited {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .exited
                .wait_timeout(g, left.min(UNBLOCK_EVERY))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if let ThreadState::Running(t) = *g {
                if self.notifying.load(Ordering::SeqCst) {
                    warn!("a queue worker is blocked signalling its driver (a blocking, full eventfd): interrupting it");
                    // The worker marks itself Exited under this lock before
                    // its thread ends: `t` is alive.
                    crate::sys::interrupt_thread(t);
                }
            }
        }
    }
}

/// Marks its worker [`ThreadState::Exited`] when dropped: at the end of the
/// worker's loop, on a panic, or when its thread never starts.
#[derive(Debug)]
struct ExitMark(Arc<Control>);

impl Drop for ExitMark {
    fn drop(&mut self) {
        *lock(&self.0.thread) = ThreadState::Exited;
        self.0.exited.notify_all();
    }
}

/// A queue worker on its thread: see the module doc's "Stopping".
#[derive(Debug)]
pub struct Running {
    control: Arc<Control>,
    join: JoinHandle<(Queue, Vec<u16>)>,
}

impl Running {
    /// Starts `worker` on a thread named `thread`.
    pub fn spawn<D: Door>(thread: String, worker: QueueWorker<D>) -> std::io::Result<Running> {
        let control = worker.control.clone();
        let join = std::thread::Builder::new()
            .name(thread)
            .spawn(move || worker.run())?;
        control.started(join.as_pthread_t());
        Ok(Running { control, join })
    }

    /// Stops the worker and returns its queue (position kept, nothing in
    /// flight) and the heads of its parked requests; `None` if it panicked.
    pub fn stop(self) -> Option<(Queue, Vec<u16>)> {
        self.control.stop();
        while !self.control.wait_exit(Duration::from_secs(3600)) {}
        self.join.join().ok()
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
    /// `poll-us=`: how long to busy-poll after the last request.
    poll_for: Duration,
    /// When the worker last took a request from the avail ring (kept with
    /// `poll-us=` only).
    last_request: Instant,
    /// Polling left the driver's notifications off and could not turn them
    /// back on (rings out of reach): try again within [`REARM_RETRY`].
    rearm_pending: bool,
    early: EarlyNotify,
    /// Marks the worker exited when it is dropped: declared last, so that
    /// it drops after the I/O engine has waited for the I/O in flight.
    _exit: ExitMark,
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
        let exit = ExitMark(control.clone());
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
            poll_for: reg.poll(),
            last_request: Instant::now(),
            rearm_pending: false,
            early: EarlyNotify::new(),
            _exit: exit,
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
        let mut pending = self.poll();
        loop {
            let timeout = if pending {
                // More waits on the ring: look at the events, then poll on.
                Some(Duration::ZERO)
            } else {
                self.busy_poll();
                // A batch the door could not run (memory out of reach for
                // now) waits for the door's wake-up, not for the limits.
                let throttle = self.aq.throttle_deadline().filter(|_| !self.blocked);
                let rearm = self.rearm_pending.then(|| Instant::now() + REARM_RETRY);
                let deadline = [self.door.deadline(), throttle, rearm]
                    .into_iter()
                    .flatten()
                    .min();
                deadline.map(|d| d.saturating_duration_since(Instant::now()))
            };
            let mut control_fired = false;
            let waited = self.el.wait_timeout(timeout, |id| {
                control_fired |= id == EVENT_CONTROL;
            });
            if let Err(e) = waited {
                error!("{}: {e}", self.name);
                break;
            }
            // Consume our own wake-up, then look at the stop word: a stop
            // set after this look leaves the eventfd readable for the next
            // wait. The `wakes` are edge-triggered and never read: a
            // peer's eventfd may block.
            if control_fired {
                let _ = self.control.wake.read();
            }
            if self.control.stopping() {
                break;
            }
            pending = self.poll();
        }
        if !self.poll_for.is_zero() {
            // Leave the ring asking for notifications, for whoever resumes it.
            self.rearm();
        }
        self.stop();
        let parked = self.aq.take_parked();
        (self.queue, parked)
    }

    /// One or more batches, until nothing asks for another at once, or
    /// [`MAX_REPOLLS`] more ran; true in that case: more may wait on the
    /// avail ring, with the driver's notifications maybe off, so the caller
    /// polls again once it has looked at the stop word and its events
    /// (without waiting for them).
    fn poll(&mut self) -> bool {
        if self.broken {
            return false;
        }
        // Polling follows this batch: the driver need not notify.
        self.aq.set_quiet(!self.poll_for.is_zero());
        let taken_before = self.queue.next_avail();
        for i in 0..=MAX_REPOLLS {
            self.aq.set_small_batches(self.early.small());
            let rings = Rings::of(&self.queue);
            let (queue, aq) = (&mut self.queue, &mut self.aq);
            let r = self
                .door
                .batch(rings, |view, decide| aq.poll(queue, view, decide));
            let more = self.after(r);
            self.watch_engine();
            // (A clock read a batch: only `poll-us=` asks for it.)
            if !self.poll_for.is_zero() && self.queue.next_avail() != taken_before {
                self.last_request = Instant::now();
            }
            let repoll = self.door.take_repoll();
            if self.broken || !(repoll || more) {
                return false;
            }
            if more && (i == MAX_REPOLLS || self.control.stopping()) {
                return true;
            }
        }
        false
    }

    /// `poll-us=`: busy-polls until [`QueueWorker::poll_for`] has passed
    /// since the last request taken (see "Polling" in the module doc), then
    /// turns the driver's notifications back on before the caller sleeps.
    /// Returns early, notifications still off, when the event loop has
    /// something (a kick, a completion, a stop: the caller's wait returns at
    /// once and polls, and this runs again).
    fn busy_poll(&mut self) {
        if self.poll_for.is_zero() {
            return;
        }
        loop {
            if self.spin() {
                return;
            }
            if !self.rearm() {
                return;
            }
            // Offered while the notifications were off: take it, poll on
            // (what a long run leaves on the ring, the spin's next look
            // takes).
            self.poll();
        }
    }

    /// The busy loop of [`QueueWorker::busy_poll`]: true when it stopped
    /// on an event.
    fn spin(&mut self) -> bool {
        loop {
            // Requests the limits hold back leave the avail ring untaken:
            // their deadline wakes the worker, not the ring.
            if self.broken || self.blocked || self.aq.throttled() > 0 || self.control.stopping() {
                return false;
            }
            if self.last_request.elapsed() >= self.poll_for {
                return false;
            }
            let rings = Rings::of(&self.queue);
            let next = self.queue.next_avail();
            let queue = &self.queue;
            let offered = self.door.peek(rings, |view| {
                queue
                    .avail_idx(view, Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != next)
            });
            match offered {
                None => return false,
                Some(true) => {
                    self.poll();
                    continue;
                }
                Some(false) => {}
            }
            let mut ready = false;
            if let Err(e) = self.el.wait_timeout(Some(Duration::ZERO), |_| ready = true) {
                error!("{}: {e}", self.name);
                return false;
            }
            if ready {
                // An edge-triggered wake-up (a kick, a miss answered) is
                // reported once, here: act on it now, the blocking wait
                // will not see it again. Our own control eventfd stays
                // readable for that wait.
                if self.control.stopping() {
                    return false;
                }
                self.poll();
                continue;
            }
            std::thread::yield_now();
        }
    }

    /// Turns the driver's notifications back on (polling is over); true
    /// when chains were offered meanwhile. When the rings cannot be reached
    /// now, [`QueueWorker::rearm_pending`] makes the worker try again soon.
    fn rearm(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let rings = Rings::of(&self.queue);
        let (queue, aq) = (&mut self.queue, &mut self.aq);
        match self.door.batch(rings, |view, _| aq.rearm(queue, view)) {
            Batch::Ran(Ok(more)) => {
                self.rearm_pending = false;
                more
            }
            Batch::Ran(Err(e)) => {
                error!("{}: cannot turn notifications back on: {e}", self.name);
                self.rearm_pending = true;
                false
            }
            Batch::Blocked | Batch::Lost => {
                self.rearm_pending = true;
                false
            }
        }
    }

    /// Notifies and accounts for a batch; returns whether it left more to
    /// take at once ([`QueueOutcome::more`]).
    fn after(&mut self, r: Batch<Result<QueueOutcome, vcdev_device_model::blk::Error>>) -> bool {
        self.blocked = matches!(r, Batch::Blocked);
        let mut more = false;
        match r {
            Batch::Ran(Ok(outcome)) => {
                if outcome.notify {
                    self.control.notifying.store(true, Ordering::SeqCst);
                    self.door.notify();
                    self.control.notifying.store(false, Ordering::SeqCst);
                    if outcome.more && self.early.look() {
                        self.early.observed(crate::sys::involuntary_switches());
                    }
                }
                more = outcome.more;
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
        more
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
        self.door.stopping();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two early notifications in a row after which the worker had lost
    /// its CPU buy 16 batches of a ring's worth, the next two 32, ...; one
    /// loss alone buys nothing, and a look without a loss makes the next
    /// two buy 16 again.
    #[test]
    fn early_notifications_back_off_while_they_cost_the_cpu() {
        let big = |e: &mut EarlyNotify| (0..2000).filter(|_| !e.small()).count();
        let mut e = EarlyNotify::new();
        assert!(e.small());
        // The first look only counts (the thread lost its CPU 5 times
        // before), the second finds one loss: nothing yet.
        e.observed(5);
        e.observed(6);
        assert_eq!(big(&mut e), 0);
        // A look without a loss, one with: still nothing.
        e.observed(6);
        e.observed(7);
        assert_eq!(big(&mut e), 0);
        // Two in a row: 16 big batches, two more: 32.
        e.observed(8);
        assert_eq!(big(&mut e), 16);
        e.observed(9);
        e.observed(11);
        assert_eq!(big(&mut e), 32);
        // A look without a loss: the next two buy 16 again.
        e.observed(11);
        e.observed(12);
        e.observed(13);
        assert_eq!(big(&mut e), 16);
        for n in 14..90 {
            e.observed(n);
        }
        assert_eq!((e.backoff, big(&mut e)), (BIG_BATCHES_MAX, 1024));
    }

    /// Looks that find no loss come after 2, 4, 8, then every 16 early
    /// notifications (a look is a system call); a loss brings the next
    /// look at once, so two losses in a row still back off.
    #[test]
    fn looks_thin_out_while_they_find_no_loss() {
        let mut e = EarlyNotify::new();
        // Which of the next `n` early notifications look (none finds a loss).
        let looks = |e: &mut EarlyNotify, n: usize| -> Vec<usize> {
            (0..n)
                .filter(|_| {
                    let look = e.look();
                    if look {
                        e.observed(5);
                    }
                    look
                })
                .collect()
        };
        assert_eq!(looks(&mut e, 63), [0, 2, 6, 14, 30, 46, 62]);
        assert_eq!(looks(&mut e, 32), [15, 31]);
        // 15 notifications without a look, then one that finds a loss; the
        // very next one looks and finds another: back off.
        assert!(looks(&mut e, 15).is_empty());
        assert!(e.look());
        e.observed(6);
        assert!(e.look());
        e.observed(7);
        assert_eq!((0..100).filter(|_| !e.small()).count(), 16);
    }
}
