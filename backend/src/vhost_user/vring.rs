//! One virtqueue of a vhost-user connection: its configuration (owned by
//! the connection thread) and, while it runs, its worker thread.
//!
//! # Who owns what
//!
//! - The connection thread owns [`Vring`]: size, ring addresses, base, kick
//!   fd, enable bit. Only it starts and stops the worker.
//! - A running worker is the shared queue engine ([`crate::queue`]) with
//!   this door's part, `VhostDoor`: a [`Reader`] of the connection's DMA
//!   address space (online only for one batch), the ring pins, the call and
//!   err eventfds ([`Notifiers`], which the frontend may change while the
//!   queue runs), and the IOTLB misses its parked requests wait for.
//!
//! A worker waits only on its own epoll (kick, completions, control, miss
//! answers): stopping it (GET_VRING_BASE, SET_VRING_ENABLE 0, RESET_DEVICE,
//! disconnect) never waits on the frontend, only for the I/O in flight.
//!
//! # Under a vIOMMU (ACCESS_PLATFORM)
//!
//! The worker pins the rings ([`crate::ring`]). A request whose buffer
//! faults is parked: the door sends the miss (or joins the same pending
//! one) on the backend channel, and the requests behind it go on. The
//! answer (an UPDATE, then the ack) wakes the worker, which walks the parked
//! request again. A miss acked without an UPDATE, or unanswered after the
//! timeout, fails exactly its request with IOERR; a write into a read-only
//! mapping fails at once, without a miss, as in Linux vhost. A worker that
//! waits for a miss holds no session, so an INVALIDATE never waits for it
//! (QEMU acks our miss only after we acked its invalidations); it waits only
//! for the requests in flight that overlap it, which complete on their own.
//! A ring that faults is asked for the same way; the queue waits for it
//! (nothing can be processed without its rings).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use vcdev_device_model::blk::{Fault as BlkFault, FaultPolicy};
use vcdev_iommu::translate::ReaderStats;
use vcdev_iommu::{AddressSpace, Fault, HoldReleaser, Permissions, Reader, Session};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::backend_channel::BackendChannel;
use super::inflight::InflightRegion;
use super::iotlb::{record_wait, Miss, MissTable, IOTLB_PAGE_SIZE};
use crate::event_loop::EventLoopError;
use crate::queue::{Batch, Control, Decide, Door, QueueWorker, Rings, Running};
use crate::registry::{Device, DeviceCounters};
use crate::ring::{RingPins, RingView};
use vcdev_iommu::sync::lock;

/// How many times in a row one page may fault again right after its miss
/// was answered (updated, then invalidated at once) before the request
/// fails: a frontend that keeps doing so must not spin a queue forever.
const MAX_REFAULTS: u32 = 16;

/// A connection's IOTLB machinery, shared by its queues (ACCESS_PLATFORM).
#[derive(Debug)]
pub struct Iotlb {
    /// Misses waiting for an answer.
    pub misses: MissTable,
    /// Where misses are sent.
    pub channel: BackendChannel,
    /// How long a miss may stay unanswered.
    pub timeout: Duration,
}

/// What a queue translates through.
#[derive(Clone, Debug)]
pub struct DmaCtx {
    /// The address space of descriptor and ring addresses.
    pub space: Arc<AddressSpace>,
    /// Under ACCESS_PLATFORM: misses are asked of the frontend.
    pub iotlb: Option<Arc<Iotlb>>,
    /// The registry's entry of the device (its counters).
    pub device: Arc<Device>,
    /// The connection's inflight region (INFLIGHT_SHMFD), if the frontend
    /// asked for one: each queue takes its part with
    /// [`InflightRegion::queue`] when it starts.
    pub inflight: Option<Arc<InflightRegion>>,
}

/// Errors of starting a queue.
#[derive(Debug, thiserror::Error)]
pub enum VringError {
    /// The queue configuration is incomplete or invalid.
    #[error("Queue {index} cannot start: {why}")]
    Config {
        /// Queue index.
        index: u16,
        /// What is wrong.
        why: &'static str,
    },
    /// The worker's event loop could not be set up.
    #[error("Queue {index}: event loop setup failed")]
    EventLoop {
        /// Queue index.
        index: u16,
        /// The cause.
        #[source]
        source: EventLoopError,
    },
    /// An eventfd could not be created or duplicated.
    #[error("Queue {index}: eventfd setup failed")]
    EventFd {
        /// Queue index.
        index: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The queue's part of the inflight region is unusable.
    #[error("Queue {index}: inflight region")]
    Inflight {
        /// Queue index.
        index: u16,
        /// The cause.
        #[source]
        source: super::inflight::InflightError,
    },
    /// The worker thread could not be spawned.
    #[error("Queue {index}: cannot spawn its worker")]
    Spawn {
        /// Queue index.
        index: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The eventfds a worker signals, replaceable while it runs.
#[derive(Debug, Default)]
pub struct Notifiers {
    call: Mutex<Option<EventFd>>,
    err: Mutex<Option<EventFd>>,
}

impl Notifiers {
    fn signal(slot: &Mutex<Option<EventFd>>, what: &str) {
        if let Some(fd) = lock(slot).as_ref() {
            // Not through `signal_eventfd` (one more system call a
            // notification): conn made the eventfd non-blocking. A frontend
            // that makes it blocking again and fills it stalls its own
            // queue until it reads it, or until the queue stops
            // (`Control::wait_exit` interrupts the write).
            match crate::sys::write_eventfd(fd) {
                // A full counter is signalled already.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => warn!("failed to signal the {what} eventfd: {e}"),
                Ok(()) => {}
            }
        }
    }
}

/// The state of one virtqueue.
#[derive(Debug)]
pub struct Vring {
    index: u16,
    max_size: u16,
    size: u16,
    /// Descriptor table, avail ring, used ring: addresses in the DMA space.
    addr: Option<(u64, u64, u64)>,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
    kick: Option<EventFd>,
    enabled: bool,
    warned_small: bool,
    /// Requests taken from the avail ring and parked on a miss when the
    /// queue stopped: walked again first when it resumes where it stopped.
    parked: Vec<u16>,
    notifiers: Arc<Notifiers>,
    worker: Option<Running>,
}

impl Vring {
    /// A stopped, disabled queue of at most `max_size` entries.
    pub fn new(index: u16, max_size: u16) -> Vring {
        Vring {
            index,
            max_size,
            size: max_size,
            addr: None,
            next_avail: 0,
            next_used: 0,
            event_idx: false,
            kick: None,
            enabled: false,
            warned_small: false,
            parked: Vec::new(),
            notifiers: Arc::default(),
            worker: None,
        }
    }

    /// Whether a worker runs.
    pub fn running(&self) -> bool {
        self.worker.is_some()
    }

    /// The size set by SET_VRING_NUM (the maximum until then).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// SET_VRING_NUM (the caller checked `size`).
    pub fn set_size(&mut self, size: u16) {
        self.size = size;
    }

    /// Whether the small-queue warning was given.
    pub fn warned_small(&self) -> bool {
        self.warned_small
    }

    /// Remembers that the small-queue warning was given.
    pub fn set_warned_small(&mut self) {
        self.warned_small = true;
    }

    /// SET_VRING_ADDR, addresses already in the DMA space.
    pub fn set_addr(&mut self, desc: u64, avail: u64, used: u64) {
        if self.addr != Some((desc, avail, used)) {
            self.parked.clear();
        }
        self.addr = Some((desc, avail, used));
    }

    /// SET_VRING_BASE. The requests parked when the queue stopped are kept
    /// when it resumes where it stopped, and dropped otherwise (a reset).
    pub fn set_base(&mut self, base: u16) {
        if base != self.next_avail {
            self.parked.clear();
        }
        self.next_avail = base;
        self.next_used = base;
    }

    /// The next avail index (valid when stopped).
    pub fn base(&self) -> u16 {
        self.next_avail
    }

    /// Whether EVENT_IDX was negotiated (applies at the next start).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// SET_VRING_KICK: the queue is started from now on.
    pub fn set_kick(&mut self, kick: Option<EventFd>) {
        self.kick = kick;
    }

    /// SET_VRING_CALL (takes effect at once, even while running).
    pub fn set_call(&self, call: Option<EventFd>) {
        *lock(&self.notifiers.call) = call;
    }

    /// SET_VRING_ERR (takes effect at once).
    pub fn set_err(&self, err: Option<EventFd>) {
        *lock(&self.notifiers.err) = err;
    }

    /// SET_VRING_ENABLE's bit.
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    /// Whether the queue is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the queue has a kick fd (is "started" in vhost-user terms).
    pub fn started(&self) -> bool {
        self.kick.is_some()
    }

    /// Starts the worker if the queue is started and enabled and not yet
    /// running. Reads and writes go through a new reader of `dma.space`.
    pub fn maybe_start(&mut self, dma: &DmaCtx, owner: &str) -> Result<(), VringError> {
        if self.worker.is_some() || !self.enabled {
            return Ok(());
        }
        let Some(kick) = self.kick.as_ref() else {
            return Ok(());
        };
        let index = self.index;
        let cfg = |why| VringError::Config { index, why };
        let (desc, avail, used) = self.addr.ok_or_else(|| cfg("no ring addresses"))?;
        let mut queue = Queue::new(self.max_size).map_err(|_| cfg("invalid maximum size"))?;
        queue
            .try_set_size(self.size)
            .map_err(|_| cfg("invalid size"))?;
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .map_err(|_| cfg("misaligned descriptor table"))?;
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .map_err(|_| cfg("misaligned avail ring"))?;
        queue
            .try_set_used_ring_address(GuestAddress(used))
            .map_err(|_| cfg("misaligned used ring"))?;
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);

        let fd_err = |source| VringError::EventFd { index, source };
        let kick = kick.try_clone().map_err(fd_err)?;
        let control = Control::new().map_err(fd_err)?;
        let miss_wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(fd_err)?);
        let wakes = vec![kick, miss_wake.try_clone().map_err(fd_err)?];
        let inflight = dma
            .inflight
            .as_ref()
            .map(|r| r.queue(index, self.size))
            .transpose()
            .map_err(|source| VringError::Inflight { index, source })?;
        let reader = dma.space.reader();
        let door = VhostDoor {
            who: format!("{owner}: queue {index}"),
            last_stats: reader.stats(),
            releaser: reader.hold_releaser(),
            reader,
            pins: RingPins::default(),
            iotlb: dma.iotlb.clone(),
            device: dma.device.clone(),
            notifiers: self.notifiers.clone(),
            misses: MissWaits {
                waiting: Vec::new(),
                wake: miss_wake,
                repoll: false,
            },
            stopping: false,
        };
        let mut worker = QueueWorker::new(
            format!("{owner}: queue {index}"),
            &dma.device,
            queue,
            door,
            wakes,
            control.clone(),
        )
        .map_err(|source| VringError::EventLoop { index, source })?;
        let parked = std::mem::take(&mut self.parked);
        match inflight {
            // The region records what was taken and not used: it resumes
            // the parked requests, and those of a previous daemon.
            Some(q) => worker.track(Box::new(q)),
            None => worker.resume_parked(parked),
        }
        let running = Running::spawn(format!("{}-q{index}", super::thread_tag(owner)), worker)
            .map_err(|source| VringError::Spawn { index, source })?;
        debug!("{owner}: queue {index} started");
        self.worker = Some(running);
        Ok(())
    }

    /// Stops the worker (if any) and keeps the queue's position. Returns
    /// once the I/O in flight completed: a worker never waits on the
    /// frontend.
    pub fn stop(&mut self) {
        let Some(w) = self.worker.take() else {
            return;
        };
        match w.stop() {
            Some((q, parked)) => {
                self.next_avail = q.next_avail();
                self.next_used = q.next_used();
                self.parked = parked;
            }
            None => error!("queue {}: worker panicked", self.index),
        }
    }

    /// Back to the initial state (RESET_DEVICE, GET_VRING_BASE's stop):
    /// stopped, disabled, no kick; with `all` also size, addresses, base and
    /// notifiers are forgotten.
    pub fn reset(&mut self, all: bool) {
        self.stop();
        self.kick = None;
        self.enabled = false;
        if all {
            self.size = self.max_size;
            self.addr = None;
            self.parked.clear();
            self.next_avail = 0;
            self.next_used = 0;
            self.event_idx = false;
            self.set_call(None);
            self.set_err(None);
        }
    }
}

impl Drop for Vring {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A miss a parked request of this queue waits for.
#[derive(Debug)]
struct Waiting {
    miss: Arc<Miss>,
    start: Instant,
    /// Times the page faulted again right after its UPDATE.
    refaults: u32,
    /// The miss was answered before the current batch began: the batch
    /// retries the requests parked on it with the answer there, so unless
    /// one of them faults on the page again (and replaces this entry), the
    /// miss is done with at the batch's end.
    answered_before_batch: bool,
}

/// The misses of one queue's parked requests.
#[derive(Debug)]
struct MissWaits {
    waiting: Vec<Waiting>,
    /// Woken by an answer to any of them.
    wake: Arc<EventFd>,
    /// A fault's translation was there by the time it was decided on.
    repoll: bool,
}

impl MissWaits {
    /// Decides about a fault of a request (or ring) under ACCESS_PLATFORM:
    /// park it while its miss is pending (sending the miss, or joining the
    /// same one), fail it when the mapping forbids the access, the miss was
    /// refused or timed out, or the page keeps faulting right after its
    /// UPDATE.
    fn decide(
        &mut self,
        session: &Session<'_>,
        io: Option<&Iotlb>,
        counters: &DeviceCounters,
        who: &str,
        fault: &BlkFault,
    ) -> FaultPolicy {
        let Some(io) = io else {
            return FaultPolicy::Fail;
        };
        let (iova, access) = (fault.addr.0, fault.access);
        let page = iova & !(IOTLB_PAGE_SIZE - 1);
        let waiting = self
            .waiting
            .iter()
            .position(|w| w.miss.page == page && w.miss.access == access);
        // The miss's state is read before the translation is tried again:
        // an UPDATE is published before its miss is marked updated, so a
        // miss seen updated here whose page still faults below was
        // invalidated since. Read after, an UPDATE landing between the two
        // would look like such a refault and be asked for again.
        let st = waiting
            .and_then(|i| self.waiting.get(i))
            .map(|w| w.miss.state())
            .unwrap_or_default();
        match session.translate(iova, 1, access) {
            // An UPDATE raced in: look again at once.
            Ok(_) => {
                self.repoll = true;
                return FaultPolicy::Retry;
            }
            Err(Fault::Unmapped { .. }) => {}
            Err(_) => {
                debug!("{who}: IOVA {iova:#x} {access:?} denied by its mapping");
                return FaultPolicy::Fail;
            }
        }
        let Some(i) = waiting else {
            let miss = self.ask(io, counters, who, iova, access);
            self.waiting.push(Waiting {
                miss,
                start: Instant::now(),
                refaults: 0,
                answered_before_batch: false,
            });
            return FaultPolicy::Retry;
        };
        let fail = if st.updated {
            // Answered, and faulting again already (invalidated at once).
            let refaults = self.waiting.get(i).map_or(0, |w| w.refaults + 1);
            if refaults <= MAX_REFAULTS {
                let old = self.waiting.swap_remove(i);
                io.misses.leave(&old.miss, &self.wake);
                let miss = self.ask(io, counters, who, iova, access);
                self.waiting.push(Waiting {
                    miss,
                    start: old.start,
                    refaults,
                    answered_before_batch: false,
                });
                return FaultPolicy::Retry;
            }
            debug!("{who}: IOVA {iova:#x} {access:?} keeps faulting after its UPDATE");
            true
        } else if st.done() {
            DeviceCounters::add(&counters.iotlb_misses_refused, 1);
            debug!("{who}: miss for IOVA {iova:#x} {access:?} refused");
            true
        } else if self
            .waiting
            .get(i)
            .is_some_and(|w| w.start.elapsed() >= io.timeout)
        {
            DeviceCounters::add(&counters.iotlb_misses_timed_out, 1);
            warn!(
                "{who}: IOTLB miss for IOVA {iova:#x} {access:?} unanswered after {:?}",
                io.timeout
            );
            true
        } else {
            false
        };
        if !fail {
            return FaultPolicy::Retry;
        }
        let w = self.waiting.swap_remove(i);
        self.forget(io, counters, w);
        FaultPolicy::Fail
    }

    /// Sends the miss for `iova`, or joins the same pending one.
    fn ask(
        &self,
        io: &Iotlb,
        counters: &DeviceCounters,
        who: &str,
        iova: u64,
        access: Permissions,
    ) -> Arc<Miss> {
        let (miss, send) = io.misses.join(iova, access, &self.wake);
        if send {
            if let Err(e) = io.channel.send_miss(&miss, counters) {
                debug!("{who}: {e}");
                miss.unsent();
            }
        } else {
            DeviceCounters::add(&counters.iotlb_misses_joined, 1);
            debug!(
                "{who}: joins the pending miss for IOVA {:#x} {access:?}",
                miss.page
            );
        }
        miss
    }

    fn forget(&self, io: &Iotlb, counters: &DeviceCounters, w: Waiting) {
        io.misses.leave(&w.miss, &self.wake);
        record_wait(counters, w.start.elapsed());
    }

    /// At the start of a batch: marks the misses answered by now.
    fn mark_answered(&mut self) {
        for w in &mut self.waiting {
            if !w.answered_before_batch && w.miss.state().done() {
                w.answered_before_batch = true;
            }
        }
    }

    /// The earliest time a pending miss times out.
    fn deadline(&self, io: Option<&Iotlb>) -> Option<Instant> {
        let io = io?;
        self.waiting
            .iter()
            .filter(|w| !w.miss.state().done())
            .map(|w| w.start + io.timeout)
            .min()
    }
}

/// The vhost-user door of a queue worker: see the module doc.
struct VhostDoor {
    who: String,
    reader: Reader,
    releaser: HoldReleaser,
    last_stats: ReaderStats,
    pins: RingPins,
    iotlb: Option<Arc<Iotlb>>,
    device: Arc<Device>,
    notifiers: Arc<Notifiers>,
    misses: MissWaits,
    /// The worker stops ([`Door::stopping`]): a ring that does not
    /// translate is out of reach, not asked for.
    stopping: bool,
}

impl VhostDoor {
    /// Adds the reader's counts since the last call to the device's.
    fn account(&mut self) {
        let now = self.reader.stats();
        let c = self.device.counters();
        DeviceCounters::add(
            &c.translations,
            now.translations - self.last_stats.translations,
        );
        DeviceCounters::add(&c.cache_hits, now.hits - self.last_stats.hits);
        self.last_stats = now;
    }
}

impl VhostDoor {
    fn forget_misses(&mut self, which: impl Fn(&Waiting) -> bool) {
        let Some(io) = self.iotlb.as_deref() else {
            return;
        };
        // After nearly every batch: nothing to partition.
        if self.misses.waiting.is_empty() {
            return;
        }
        let (gone, keep) = std::mem::take(&mut self.misses.waiting)
            .into_iter()
            .partition(which);
        self.misses.waiting = keep;
        for w in gone {
            self.misses.forget(io, self.device.counters(), w);
        }
    }
}

impl Drop for VhostDoor {
    fn drop(&mut self) {
        self.forget_misses(|_| true);
    }
}

impl Door for VhostDoor {
    fn batch<R>(
        &mut self,
        rings: Rings,
        f: impl FnOnce(&RingView<'_, '_>, &mut Decide<'_>) -> R,
    ) -> Batch<R> {
        let VhostDoor {
            who,
            reader,
            releaser,
            pins,
            iotlb,
            device,
            misses,
            stopping,
            ..
        } = self;
        let counters = device.counters();
        misses.mark_answered();
        let session = reader.enter();
        let pinned = if iotlb.is_some() {
            match pins.refresh(&session, (rings.desc, rings.avail, rings.used), rings.size) {
                Ok(redone) => {
                    if redone {
                        DeviceCounters::add(&counters.ring_pins, 1);
                    }
                    Some(&*pins)
                }
                Err((fault, access)) => {
                    let fault = BlkFault {
                        addr: GuestAddress(fault.iova()),
                        len: 1,
                        access,
                    };
                    // Stopping: nobody waits for an answer (see `Door::stopping`).
                    let policy = (!*stopping)
                        .then(|| misses.decide(&session, iotlb.as_deref(), counters, who, &fault));
                    drop(session);
                    self.account();
                    return match policy {
                        Some(FaultPolicy::Retry) => Batch::Blocked,
                        Some(FaultPolicy::Fail) => {
                            warn!(
                                "{}: ring at IOVA {:#x} not translatable",
                                self.who, fault.addr.0
                            );
                            Batch::Lost
                        }
                        None => {
                            debug!(
                                "{}: stopping with a ring at IOVA {:#x} not translated",
                                self.who, fault.addr.0
                            );
                            Batch::Lost
                        }
                    };
                }
            }
        } else {
            None
        };
        let view = RingView::new(&session, pinned, releaser);
        let io = iotlb.as_deref();
        let mut decide = |fault: &BlkFault| misses.decide(&session, io, counters, who, fault);
        let r = f(&view, &mut decide);
        drop(session);
        self.account();
        Batch::Ran(r)
    }

    /// A look at the rings for `poll-us=`: rings that need translating
    /// again (an invalidation since the last batch) are left to the next
    /// batch, which may have to ask the frontend: `None`.
    fn peek<R>(&mut self, rings: Rings, f: impl FnOnce(&RingView<'_, '_>) -> R) -> Option<R> {
        let session = self.reader.enter();
        let pinned = if self.iotlb.is_some() {
            let (desc, avail, used) = (rings.desc, rings.avail, rings.used);
            match self.pins.refresh(&session, (desc, avail, used), rings.size) {
                Ok(false) => Some(&self.pins),
                Ok(true) => {
                    DeviceCounters::add(&self.device.counters().ring_pins, 1);
                    Some(&self.pins)
                }
                Err(_) => return None,
            }
        } else {
            None
        };
        let view = RingView::new(&session, pinned, &self.releaser);
        let r = f(&view);
        drop(session);
        // A look is not a request's translation: the device's counters
        // leave it out, as the cdev door's do.
        self.last_stats = self.reader.stats();
        Some(r)
    }

    fn notify(&self) {
        Notifiers::signal(&self.notifiers.call, "call");
    }

    fn broken(&self, _err: &dyn std::fmt::Display) {
        Notifiers::signal(&self.notifiers.err, "err");
    }

    fn after_batch(&mut self, parked: usize) {
        // Answered misses are done with once no request waits any more, or
        // once a batch retried their requests with the answer there and
        // none faulted on the page again (one that did replaced its entry
        // with a new miss, its refaults counted). Pending ones stay (a ring
        // may wait for one with nothing parked). Without the second rule,
        // a queue that always has requests parked (strict churn at depth)
        // kept an answered entry per page for ever, and each new request
        // on that page counted as a refault of the old one until, past
        // MAX_REFAULTS, a request failed with IOERR.
        if parked == 0 {
            self.forget_misses(|w| w.miss.state().done());
        } else {
            self.forget_misses(|w| w.answered_before_batch);
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.misses.deadline(self.iotlb.as_deref())
    }

    fn stopping(&mut self) {
        self.stopping = true;
    }

    fn take_repoll(&mut self) -> bool {
        std::mem::take(&mut self.misses.repoll)
    }
}
