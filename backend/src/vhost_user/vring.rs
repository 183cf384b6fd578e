//! One virtqueue of a vhost-user connection: its configuration (owned by
//! the connection thread) and, while it runs, its worker thread.
//!
//! # Who owns what
//!
//! - The connection thread owns [`Vring`]: size, ring GPAs, base, kick fd,
//!   enable bit. Only it starts and stops the worker.
//! - A running worker owns the `virtio_queue::Queue`, the device's per-queue
//!   state and a [`Reader`] of the connection's DMA address space. It is
//!   online in that space only while it processes the queue (one
//!   [`vcdev_iommu::Session`] per wake-up), so memory-table edits wait for
//!   at most one batch of requests.
//! - The call and err eventfds are shared ([`Notifiers`]): the frontend may
//!   change them while the queue runs (QEMU masks guest notifiers so).
//!
//! A worker waits only on its own epoll (kick + control + miss wake-up):
//! stopping it (GET_VRING_BASE, SET_VRING_ENABLE 0, RESET_DEVICE,
//! disconnect) never waits on the frontend.
//!
//! # Under a vIOMMU (ACCESS_PLATFORM)
//!
//! The worker pins the rings ([`super::ring`]) and processes the queue with
//! [`FaultPolicy::Retry`]. A fault ends the session first (the worker is
//! then quiescent, so an INVALIDATE never waits for it: QEMU acks our miss
//! only after we acked its invalidations), then joins or sends the miss
//! ([`super::iotlb`]) and waits on its epoll for the answer, the timeout or
//! a stop, whichever comes first. An answered miss retries the request; a
//! refused or timed-out one fails exactly that request with IOERR (the
//! avail index is clamped to it) and the queue goes on. A write into a
//! read-only mapping fails at once, without a miss, as in Linux vhost.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use vcdev_device_model::blk::{BlkDevice, BlkQueue, FaultPolicy};
use vcdev_iommu::translate::ReaderStats;
use vcdev_iommu::{AddressSpace, Fault, Permissions, Reader};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::backend_channel::BackendChannel;
use super::inflight::InflightRegion;
use super::iotlb::{record_wait, MissTable, IOTLB_PAGE_SIZE};
use super::ring::{RingPins, RingView};
use crate::event_loop::{EventLoop, EventLoopError, EVENT_CONTROL, EVENT_FIRST_DEVICE};
use crate::registry::{Device, DeviceCounters};
use vcdev_iommu::sync::lock;

/// The kick eventfd's event id in a worker's loop.
const EVENT_KICK: u64 = EVENT_FIRST_DEVICE;
/// The worker's miss wake-up eventfd (an answer to a miss it waits for).
const EVENT_MISS: u64 = EVENT_FIRST_DEVICE + 1;

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
            match fd.write(1) {
                // Non-blocking (see conn): a full counter is signalled
                // already.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => warn!("failed to signal the {what} eventfd: {e}"),
                Ok(()) => {}
            }
        }
    }
}

/// A worker's control word and the eventfd that wakes it to read it.
#[derive(Debug)]
struct Control {
    wake: EventFd,
    stop: AtomicBool,
}

/// A running queue.
#[derive(Debug)]
struct Worker {
    control: Arc<Control>,
    join: JoinHandle<Queue>,
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
    notifiers: Arc<Notifiers>,
    worker: Option<Worker>,
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
        self.addr = Some((desc, avail, used));
    }

    /// SET_VRING_BASE.
    pub fn set_base(&mut self, base: u16) {
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
    pub fn maybe_start(
        &mut self,
        device: &Arc<BlkDevice>,
        dma: &DmaCtx,
        owner: &str,
    ) -> Result<(), VringError> {
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

        let kick = kick
            .try_clone()
            .map_err(|source| VringError::EventFd { index, source })?;
        let control = Arc::new(Control {
            wake: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| VringError::EventFd { index, source })?,
            stop: AtomicBool::new(false),
        });
        let miss_wake = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| VringError::EventFd { index, source })?,
        );
        let el = EventLoop::new().map_err(|source| VringError::EventLoop { index, source })?;
        el.add(kick.as_raw_fd(), EVENT_KICK)
            .and_then(|()| el.add(control.wake.as_raw_fd(), EVENT_CONTROL))
            .and_then(|()| el.add(miss_wake.as_raw_fd(), EVENT_MISS))
            .map_err(|source| VringError::EventLoop { index, source })?;
        // TODO(issue 8 wiring): `let inflight = dma.inflight.as_ref().map(|r|
        // r.queue(index, self.size)).transpose()?;` (an InflightError is a
        // start failure), handed to the worker. Before its first avail
        // fetch the worker reads the used ring's idx `u`, resubmits
        // `inflight.resubmit_list(u)` in that order, and sets next_avail to
        // `QueueInflight::next_avail(u, &list)`, next_used to `u`; then
        // `begin(head)` per head popped before submitting it, and
        // `complete(head)` / add_used / `commit(next_used)` per completion
        // (see super::inflight's module doc).
        let reader = dma.space.reader();
        let ctx = WorkerCtx {
            index,
            queue,
            blk: BlkQueue::new(device.clone()),
            last_stats: reader.stats(),
            reader,
            kick,
            el,
            control: control.clone(),
            notifiers: self.notifiers.clone(),
            iotlb: dma.iotlb.clone(),
            device: dma.device.clone(),
            pins: RingPins::default(),
            miss_wake,
            owner: owner.to_owned(),
        };
        let join = std::thread::Builder::new()
            .name(format!("{owner}-q{index}"))
            .spawn(move || ctx.run())
            .map_err(|source| VringError::Spawn { index, source })?;
        debug!("{owner}: queue {index} started");
        self.worker = Some(Worker { control, join });
        Ok(())
    }

    /// Stops the worker (if any) and keeps the queue's position. Returns
    /// promptly: a worker never waits on the frontend.
    pub fn stop(&mut self) {
        let Some(w) = self.worker.take() else {
            return;
        };
        w.control.stop.store(true, Ordering::SeqCst);
        if let Err(e) = w.control.wake.write(1) {
            error!("queue {}: cannot wake its worker: {e}", self.index);
        }
        match w.join.join() {
            Ok(q) => {
                self.next_avail = q.next_avail();
                self.next_used = q.next_used();
            }
            Err(_) => error!("queue {}: worker panicked", self.index),
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

/// Everything a worker thread owns.
struct WorkerCtx {
    index: u16,
    queue: Queue,
    blk: BlkQueue,
    reader: Reader,
    last_stats: ReaderStats,
    kick: EventFd,
    el: EventLoop,
    control: Arc<Control>,
    notifiers: Arc<Notifiers>,
    iotlb: Option<Arc<Iotlb>>,
    device: Arc<Device>,
    pins: RingPins,
    miss_wake: Arc<EventFd>,
    owner: String,
}

/// How a drain of the queue ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drained {
    /// Nothing left to do until the next kick.
    Idle,
    /// The queue is broken until restarted.
    Broken,
    /// A stop request came.
    Stopped,
}

/// Why a fault could not be resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unresolved {
    /// The mapping exists but forbids the access.
    Denied,
    /// The frontend acked the miss without an UPDATE.
    Refused,
    /// No answer before the timeout.
    TimedOut,
    /// No backend channel to ask on, or not under a vIOMMU.
    NoChannel,
    /// The same page keeps faulting right after its UPDATE.
    Refaults,
}

/// The outcome of resolving one fault.
enum Resolution {
    /// The translation is there now: process again.
    Retry,
    /// It will not come: fail the request.
    Fail(Unresolved),
    /// A stop request came while waiting.
    Stopped,
}

impl WorkerCtx {
    fn run(mut self) -> Queue {
        // A kick may have come before the queue was enabled: look now.
        let mut state = self.process();
        while state != Drained::Stopped {
            let mut kicked = false;
            if let Err(e) = self.el.wait(|id| kicked |= id == EVENT_KICK) {
                error!("queue {}: {e}", self.index);
                break;
            }
            // Consume the wake-ups first, then look at the word: a stop set
            // after this look leaves the eventfd readable for the next wait.
            let _ = self.control.wake.read();
            let _ = self.miss_wake.read();
            if self.control.stop.load(Ordering::SeqCst) {
                break;
            }
            if kicked {
                // The count only says "look"; a failed read (EAGAIN) too.
                let _ = self.kick.read();
                if state != Drained::Broken {
                    state = self.process();
                }
            }
        }
        self.account();
        self.queue
    }

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

    /// Drains the queue, resolving IOTLB misses on the way.
    fn process(&mut self) -> Drained {
        // Process only the next chain, failing it if it faults.
        let mut fail_one = false;
        let mut last_fault: Option<(u64, Permissions)> = None;
        let mut refaults = 0u32;
        loop {
            if self.control.stop.load(Ordering::SeqCst) {
                return Drained::Stopped;
            }
            let session = self.reader.enter();
            let pins = if self.iotlb.is_some() {
                let rings = (
                    self.queue.desc_table(),
                    self.queue.avail_ring(),
                    self.queue.used_ring(),
                );
                match self.pins.refresh(&session, rings, self.queue.size()) {
                    Ok(redone) => {
                        if redone {
                            DeviceCounters::add(&self.device.counters().ring_pins, 1);
                        }
                        Some(&self.pins)
                    }
                    Err((fault, access)) => {
                        drop(session);
                        self.account();
                        match self.resolve(&fault, access, &mut last_fault, &mut refaults) {
                            Resolution::Retry => continue,
                            Resolution::Stopped => return Drained::Stopped,
                            Resolution::Fail(why) => {
                                // Nothing to fail: the queue itself is out
                                // of reach. Try again at the next kick.
                                warn!(
                                    "{}: queue {}: ring at IOVA {:#x} not translatable ({why:?})",
                                    self.owner,
                                    self.index,
                                    fault.iova()
                                );
                                return Drained::Idle;
                            }
                        }
                    }
                }
            } else {
                None
            };
            let mut view = RingView::new(&session, pins);
            let policy = if fail_one {
                let at = self.queue.avail_ring().wrapping_add(2);
                view = view.clamp_avail_idx(at, self.queue.next_avail().wrapping_add(1));
                FaultPolicy::Fail
            } else if self.iotlb.is_some() {
                FaultPolicy::Retry
            } else {
                FaultPolicy::Fail
            };
            let r = self.blk.process(&mut self.queue, &view, policy);
            // The view borrows the session: it ends here with it.
            drop(session);
            self.account();
            let outcome = match r {
                Ok(o) => o,
                Err(e) => {
                    error!(
                        "{}: queue {}: {e}; queue stopped until restarted",
                        self.owner, self.index
                    );
                    Notifiers::signal(&self.notifiers.err, "err");
                    return Drained::Broken;
                }
            };
            if outcome.notify {
                Notifiers::signal(&self.notifiers.call, "call");
            }
            if fail_one {
                fail_one = false;
                last_fault = None;
                continue;
            }
            let Some(f) = outcome.fault else {
                return Drained::Idle;
            };
            let fault = Fault::Unmapped { iova: f.addr.0 };
            match self.resolve(&fault, f.access, &mut last_fault, &mut refaults) {
                Resolution::Retry => {}
                Resolution::Stopped => return Drained::Stopped,
                Resolution::Fail(why) => {
                    debug!(
                        "{}: queue {}: request at avail {} fails: IOVA {:#x} {:?} ({why:?})",
                        self.owner,
                        self.index,
                        self.queue.next_avail(),
                        f.addr.0,
                        f.access
                    );
                    fail_one = true;
                }
            }
        }
    }

    /// Resolves a fault at `fault.iova()` for `access`: offline, asks the
    /// frontend (or joins the same pending question) and waits for the
    /// answer, the timeout or a stop.
    fn resolve(
        &mut self,
        fault: &Fault,
        access: Permissions,
        last: &mut Option<(u64, Permissions)>,
        refaults: &mut u32,
    ) -> Resolution {
        let iova = fault.iova();
        let Some(io) = self.iotlb.clone() else {
            return Resolution::Fail(Unresolved::NoChannel);
        };
        // Already there (an UPDATE raced in), or there but not allowed?
        match self.reader.enter().translate(iova, 1, access) {
            Ok(_) => return Resolution::Retry,
            Err(Fault::Unmapped { .. }) => {}
            Err(_) => return Resolution::Fail(Unresolved::Denied),
        }
        let page = (iova & !(IOTLB_PAGE_SIZE - 1), access);
        if *last == Some(page) {
            *refaults += 1;
            if *refaults > MAX_REFAULTS {
                *refaults = 0;
                *last = None;
                return Resolution::Fail(Unresolved::Refaults);
            }
        } else {
            *last = Some(page);
            *refaults = 0;
        }
        let start = Instant::now();
        let (miss, send) = io.misses.join(iova, access, &self.miss_wake);
        if send {
            if let Err(e) = io.channel.send_miss(&miss, self.device.counters()) {
                debug!("{}: queue {}: {e}", self.owner, self.index);
                miss.unsent();
            }
        } else {
            DeviceCounters::add(&self.device.counters().iotlb_misses_joined, 1);
            debug!(
                "{}: queue {}: joins the pending miss for IOVA {:#x} {access:?}",
                self.owner, self.index, miss.page
            );
        }
        let deadline = start + io.timeout;
        let r = loop {
            let st = miss.state();
            if st.updated {
                break Resolution::Retry;
            }
            if st.done() {
                // Acked (or unsendable) without an UPDATE for this page
                // and access: unless another UPDATE brought it meanwhile,
                // the request fails now.
                if self.reader.enter().translate(iova, 1, access).is_ok() {
                    break Resolution::Retry;
                }
                DeviceCounters::add(&self.device.counters().iotlb_misses_refused, 1);
                break Resolution::Fail(if st.unsent {
                    Unresolved::NoChannel
                } else {
                    Unresolved::Refused
                });
            }
            let now = Instant::now();
            if now >= deadline {
                DeviceCounters::add(&self.device.counters().iotlb_misses_timed_out, 1);
                warn!(
                    "{}: queue {}: IOTLB miss for IOVA {iova:#x} {access:?} unanswered after {:?}",
                    self.owner, self.index, io.timeout
                );
                break Resolution::Fail(Unresolved::TimedOut);
            }
            let mut kicked = false;
            if let Err(e) = self
                .el
                .wait_timeout(Some(deadline - now), |id| kicked |= id == EVENT_KICK)
            {
                error!("queue {}: {e}", self.index);
                break Resolution::Stopped;
            }
            let _ = self.miss_wake.read();
            if kicked {
                // The drain that follows the answer sees the new chains.
                let _ = self.kick.read();
            }
            if self.control.stop.load(Ordering::SeqCst) {
                break Resolution::Stopped;
            }
        };
        io.misses.leave(&miss, &self.miss_wake);
        record_wait(self.device.counters(), start.elapsed());
        r
    }
}
