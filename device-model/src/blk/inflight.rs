//! The asynchronous request lifecycle of one queue (issue #8's storage engine).
//!
//! A request is parsed, translated, submitted, completed, then returned to the used ring:
//!
//! 1. **Parse and translate** (`exec::start_chain`): every buffer is translated before
//!    anything happens, so an IOMMU fault has no side effect.
//! 2. **Submit and hold**: reads, writes and flushes become one [`IoOp`] each on the queue's
//!    [`Engine`]. A request still in flight when the poll that began it ends *holds* the ranges
//!    it translated ([`InflightMemory::hold`]) so that an invalidation overlapping them waits
//!    for its completion, and only for it. Until then the poll's memory view keeps them valid
//!    (a session that is online: invalidations wait for its end), so a request that completes
//!    within its poll (every one on the sync engine, RAM disks included) takes no hold at all.
//!    Requests without disk I/O (GET_ID, errors) and the rare DISCARD / WRITE_ZEROES run at
//!    once.
//! 3. **Complete** ([`AsyncQueue::poll`] reaps): the status byte is written through the held
//!    translation, the hold released, the chain put on the used ring, in completion order.
//!    Used-ring updates and the notification are batched per poll, with EVENT_IDX honoured.
//!
//! A request can wait without holding up the requests behind it (it is *parked*):
//! - on an IOMMU fault under [`FaultPolicy::Retry`]: it is set aside by head index, the fault
//!   is reported in [`QueueOutcome::fault`], and later chains go on; the next poll walks it
//!   again and asks the transport once more (a refused miss fails it with IOERR);
//! - for a free submission slot, when the engine is full: it is submitted after reaping;
//! - a FLUSH waits until every write in flight when it arrived has completed, then is
//!   submitted, and completes after its `fdatasync`;
//! - for the device's I/O limits ([`super::throttle`]): a read or write the buckets cannot
//!   pay for yet is parked with its descriptors (no translation held), and no new chain is
//!   taken from the avail ring until it has gone, so the requests behind it keep their order.
//!   It goes, first, at a poll once the buckets hold its cost
//!   ([`AsyncQueue::throttle_deadline`] says when); it is never failed.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use log::warn;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::{Bytes, GuestAddress, GuestMemory, VolatileSlice};

use super::aio::{Completion as IoCompletion, Engine, IoOp, IoVec};
use super::bounce::{self, EngineBounce};
use super::chain::{self, Rewalk};
use super::exec::{self, answer, check_range, start_chain, used_len, Completion, Started};
use super::request::{ParseError, RequestType, Segment};
use super::throttle::Cost;
use super::{BlkDevice, Error, Fault, FaultPolicy, QueueOutcome};

/// The data one [`AsyncQueue::poll`] takes from the avail ring before it stops (`more`) to
/// complete and notify what is done. With an engine that completes inline (the sync engine,
/// io_uring reading the page cache) a batch of large requests was copied whole before the
/// driver heard of the first, and the driver, which refills as it hears, waited meanwhile:
/// 128 KiB sequential reads at QD8 on tmpfs went from 0.71x to 0.88x qemu-storage-daemon, on
/// the loop disk's page cache from 29k to 38k IOPS (BENCHMARKS.md, "Large requests"). 4 KiB
/// requests never reach it (a ring of 256 is 1 MiB); smaller budgets cost more notifications
/// than they gained (128 KiB: 0.72x, with a quarter more CPU per request).
const BATCH_BYTES: u64 = 512 << 10;

/// The chains one [`AsyncQueue::poll`] takes before it stops (`more`) to complete and notify
/// what is done, as [`BATCH_BYTES`] does for data. A driver on another CPU then refills while
/// this thread goes on with the rest, and neither side waits for the other to wake up: 4 KiB
/// requests at QD32 on tmpfs went from 260k to 510k IOPS (2 CPUs, BENCHMARKS.md "Small
/// batches"). When the driver shares the queue's CPU each early notification is a context
/// switch (-15% there): the worker then turns small batches off for a while
/// ([`AsyncQueue::set_small_batches`]). Under EVENT_IDX a stop notifies only a driver that
/// waits.
const BATCH_REQUESTS: u16 = 8;

/// A hold on translated ranges; releasing it (once) lets invalidations that overlap it finish.
pub trait Release: std::fmt::Debug + Send {
    /// Release the hold. Must not block on an invalidation.
    fn release(self);
}

/// Guest memory whose translations a request can hold while its I/O is in flight.
///
/// # Safety
///
/// An implementation promises that the host memory of every translation made through this
/// view stays mapped (and keeps meaning the same guest memory) while the view lives, and that
/// of every translation made through it before [`InflightMemory::hold`] returned, and that lies
/// in the held ranges, until the hold is released, even if the view itself is dropped
/// meanwhile: the kernel reads and writes it asynchronously. So a hold may be taken at any time
/// before the view is dropped, for translations it made earlier.
pub unsafe trait InflightMemory: GuestMemory {
    /// What a hold is.
    type Hold: Release;
    /// Hold `ranges` (`(first, last)` addresses, inclusive, in this view's address space).
    fn hold(&self, ranges: &[(u64, u64)]) -> Self::Hold;
}

/// What a transport records of each request's life, so that a restarted backend can find the
/// requests that were in flight (vhost-user's inflight region, `INFLIGHT_SHMFD`).
pub trait Tracker: std::fmt::Debug + Send {
    /// A chain was taken from the avail ring (before anything of it is submitted).
    fn taken(&mut self, head: u16);
    /// A chain is about to be put on the used ring.
    fn used(&mut self, head: u16);
    /// The used ring's index was written: it is now `next_used`.
    fn committed(&mut self, next_used: u16);
    /// At the queue's first poll, with the used ring's index: the chains that were taken and
    /// never used when the queue last ran (oldest first), and the avail position after them.
    fn restart(&mut self, used_idx: u16) -> (Vec<u16>, u16);
}

/// A request whose I/O is in flight (or waits for a slot or a flush barrier).
#[derive(Debug)]
struct Inflight<H> {
    head: u16,
    status: IoVec,
    /// Bytes the operation must move.
    expect: u64,
    /// Bytes written into the driver's buffers on success.
    written: u64,
    /// Taken at the end of the poll that began the request, if it is still in flight then
    /// ([`AsyncQueue::hold_in_flight`]).
    hold: Option<H>,
    /// For writes: the sequence number in [`AsyncQueue::writes`].
    write_seq: Option<u64>,
    /// The aligned buffer the operation moves data through, when the guest's buffers do not
    /// suit an `O_DIRECT` backing (see [`super::bounce`]). It is freed with the slot; when the
    /// queue is dropped, after `engine` (declared before `slots`) waited for the operation.
    bounce: Option<EngineBounce>,
}

/// An operation prepared but not yet submitted.
#[derive(Debug)]
struct Pending {
    tag: u64,
    op: IoOp,
    iov: Vec<IoVec>,
    /// For flushes: wait until no write with a smaller sequence number is in flight.
    barrier: Option<u64>,
}

/// A request parked by the I/O limits: walked, translated once, and over budget.
#[derive(Debug)]
struct Throttled {
    head: u16,
    descs: Vec<Descriptor>,
    cost: Cost,
}

/// One try at a request under a fault policy: `Some(fault)` when it faulted under Retry.
type Attempt<'a, Q> =
    dyn FnMut(&mut Q, FaultPolicy, &mut QueueOutcome) -> Result<Option<Fault>, Error> + 'a;

/// What the engine did, in order, for tests of ordering rules.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpEvent {
    Submitted { head: u16, op: IoOp },
    Completed { head: u16 },
}

/// One queue's asynchronous worker state: the engine, the requests in flight, the parked ones.
///
/// `H` is the hold type of the memory views it is polled with ([`InflightMemory::Hold`]).
#[derive(Debug)]
pub struct AsyncQueue<H> {
    device: Arc<BlkDevice>,
    engine: Engine,
    /// Indexed by tag.
    slots: Vec<Option<Inflight<H>>>,
    free: Vec<u64>,
    pending: VecDeque<Pending>,
    /// Chains parked on an IOMMU fault, oldest first: the head and, when the chain was walked,
    /// its descriptors (the driver may not change them while the device owns the chain; walking
    /// it again through the IOMMU could fail on a translation that is gone for now).
    parked: VecDeque<(u16, Option<Vec<Descriptor>>)>,
    /// Requests parked by the device's I/O limits, oldest first; while there is one, no new
    /// chain is taken from the avail ring.
    throttled: VecDeque<Throttled>,
    /// Sequence numbers of the writes in flight, in increasing order (they are given out in
    /// order; the buffer is kept, so a warm queue does not allocate).
    writes: VecDeque<u64>,
    next_write_seq: u64,
    descs: Vec<Descriptor>,
    segments: Vec<Segment>,
    reaped: Vec<IoCompletion>,
    spare_iov: Vec<Vec<IoVec>>,
    /// The requests this poll began: (tag, its ranges in `ranges`), for
    /// [`AsyncQueue::hold_in_flight`] at the end of the poll.
    begun: Vec<(u64, std::ops::Range<usize>)>,
    /// The ranges the requests of `begun` would hold, and (empty, see [`recycle`]) the
    /// buffer of a request's translated slices: kept between polls.
    ranges: Vec<(u64, u64)>,
    slices: Vec<SliceStore>,
    /// Whether the queue's next used index was read from the used ring.
    used_synced: bool,
    /// The worker polls the avail ring: the driver need not notify
    /// ([`AsyncQueue::set_quiet`]).
    quiet: bool,
    /// A poll takes at most [`BATCH_REQUESTS`] chains ([`AsyncQueue::set_small_batches`]).
    small_batches: bool,
    tracker: Option<Box<dyn Tracker>>,
    #[cfg(test)]
    gate: Option<u16>,
    #[cfg(test)]
    gated: Vec<IoCompletion>,
    #[cfg(test)]
    pub(crate) log: Vec<OpEvent>,
}

impl<H: Release> AsyncQueue<H> {
    /// A worker for one queue of `device`, doing its I/O on `engine`, with at most as many
    /// requests in flight as the device's queue size.
    #[must_use]
    pub fn new(device: Arc<BlkDevice>, engine: Engine) -> Self {
        let depth = usize::from(device.queue_size());
        Self {
            device,
            engine,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as u64).rev().collect(),
            pending: VecDeque::new(),
            parked: VecDeque::new(),
            throttled: VecDeque::new(),
            writes: VecDeque::new(),
            next_write_seq: 0,
            descs: Vec::new(),
            segments: Vec::new(),
            reaped: Vec::new(),
            spare_iov: Vec::new(),
            begun: Vec::new(),
            ranges: Vec::new(),
            slices: Vec::new(),
            used_synced: false,
            quiet: false,
            small_batches: true,
            tracker: None,
            #[cfg(test)]
            gate: None,
            #[cfg(test)]
            gated: Vec::new(),
            #[cfg(test)]
            log: Vec::new(),
        }
    }

    /// Record every request's life in `tracker` from now on; at the first poll, the requests it
    /// says were in flight are walked again, oldest first, before new chains.
    pub fn track(&mut self, tracker: Box<dyn Tracker>) {
        self.tracker = Some(tracker);
    }

    /// Set the engine up now (see [`Engine::start`]).
    pub fn start_engine(&mut self) -> std::io::Result<()> {
        self.engine.start()
    }

    /// The engine (its notifier goes in the worker's event loop).
    #[must_use]
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Requests submitted or waiting for a slot or a barrier, not yet completed.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.slots.len().saturating_sub(self.free.len())
    }

    /// Requests parked on an IOMMU fault.
    #[must_use]
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Requests parked by the device's I/O limits.
    #[must_use]
    pub fn throttled(&self) -> usize {
        self.throttled.len()
    }

    /// When the oldest request parked by the I/O limits may go (`None`: none waits, or no
    /// slot is free, and a completion wakes the worker first): the queue's worker polls again
    /// then, or when the limits change.
    #[must_use]
    pub fn throttle_deadline(&self) -> Option<Instant> {
        let t = self.throttled.front().filter(|_| !self.free.is_empty())?;
        Some(self.device.throttle().ready_at(t.cost, Instant::now()))
    }

    /// The heads of the parked requests (on an IOMMU fault, then by the I/O limits), oldest
    /// first, taken out of this queue: a transport that stops the queue keeps them (they were
    /// taken from the avail ring and not answered) and gives them to the queue that resumes it
    /// ([`AsyncQueue::park`]).
    pub fn take_parked(&mut self) -> Vec<u16> {
        let parked = self.parked.drain(..).map(|(head, _)| head);
        parked
            .chain(self.throttled.drain(..).map(|t| t.head))
            .collect()
    }

    /// Parks `heads` (from [`AsyncQueue::take_parked`]): they are walked again at the next poll,
    /// before new chains.
    pub fn park(&mut self, heads: impl IntoIterator<Item = u16>) {
        self.parked
            .extend(heads.into_iter().map(|head| (head, None)));
    }

    /// While `on`, the worker polls the avail ring itself: each batch leaves the driver's
    /// notifications off (under `VIRTIO_RING_F_EVENT_IDX`, `avail_event` is left one behind
    /// the next avail index, which the driver does not cross again for 2^16 requests; without,
    /// the used ring's `VRING_USED_F_NO_NOTIFY`). Turning it off is [`AsyncQueue::rearm`]'s
    /// business, which the worker must call before it sleeps.
    pub fn set_quiet(&mut self, on: bool) {
        self.quiet = on;
    }

    /// Whether a poll stops after [`BATCH_REQUESTS`] chains (the default) or takes up to a
    /// ring's worth: a worker whose early notifications cost it its CPU (the driver it wakes
    /// runs on the same one) turns them off for a while.
    pub fn set_small_batches(&mut self, on: bool) {
        self.small_batches = on;
    }

    /// Turns quiet mode off and the driver's notifications back on; returns whether the avail
    /// ring has chains not yet taken (checked after the notifications are on, so a chain
    /// offered meanwhile is either seen here or notified).
    pub fn rearm<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M) -> Result<bool, Error> {
        self.quiet = false;
        queue.enable_notification(mem).map_err(Error::Queue)
    }

    /// Quiet mode: notifications off for what comes next (see [`AsyncQueue::set_quiet`]).
    fn hush<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<(), Error> {
        if !queue.event_idx_enabled() {
            return queue.disable_notification(mem).map_err(Error::Queue);
        }
        let size = u64::from(queue.size());
        // avail_event: the used ring's trailing u16 (virtio 1.2 section 2.7.8).
        let at = queue
            .used_ring()
            .checked_add(4 + 8 * size)
            .ok_or(Error::Queue(virtio_queue::Error::AddressOverflow))?;
        let behind = queue.next_avail().wrapping_sub(1);
        mem.store(
            behind.to_le(),
            GuestAddress(at),
            std::sync::atomic::Ordering::Relaxed,
        )
        .map_err(|_| Error::Queue(virtio_queue::Error::AddressOverflow))
    }

    /// Complete what the engine finished, retry the parked requests, then take new chains
    /// from the avail ring while there is room, and submit.
    ///
    /// A request that faults is shown to `decide`: under [`FaultPolicy::Retry`] it is parked
    /// and its fault reported in the outcome (the first one of this call); under
    /// [`FaultPolicy::Fail`] it completes with IOERR. An error means the queue itself (used
    /// ring, event fields) could not be updated.
    pub fn poll<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        decide: &mut dyn FnMut(&Fault) -> FaultPolicy,
    ) -> Result<QueueOutcome, Error> {
        let r = self.poll_in(queue, mem, decide);
        // On every way out, errors too: `mem` keeps the translations valid until it is gone.
        self.hold_in_flight(mem);
        r
    }

    /// The requests this poll began that are still in flight hold their ranges now, while
    /// `mem` (the view that translated them) still keeps them valid.
    fn hold_in_flight<M: InflightMemory<Hold = H>>(&mut self, mem: &M) {
        // Newest first: a tag given out twice in this poll belongs to its last request (the
        // first completed before its slot was freed).
        for (tag, at) in self.begun.drain(..).rev() {
            let slot = usize::try_from(tag)
                .ok()
                .and_then(|t| self.slots.get_mut(t))
                .and_then(Option::as_mut);
            if let Some(f) = slot {
                if f.hold.is_none() {
                    f.hold = Some(mem.hold(self.ranges.get(at).unwrap_or_default()));
                }
            }
        }
        self.ranges.clear();
    }

    /// [`AsyncQueue::poll`] before the holds.
    fn poll_in<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        decide: &mut dyn FnMut(&Fault) -> FaultPolicy,
    ) -> Result<QueueOutcome, Error> {
        let mut outcome = QueueOutcome::default();
        if !queue.ready() {
            return Ok(outcome);
        }
        let mut restarted = false;
        if !self.used_synced {
            // The device is the used ring's only writer, but a queue that
            // resumes after requests were parked (taken, not answered) has
            // used fewer chains than it took: its next used index is the
            // ring's, not its next avail index.
            let idx = queue
                .used_idx(mem, std::sync::atomic::Ordering::Acquire)
                .map_err(Error::Queue)?;
            queue.set_next_used(idx.0);
            if !self.quiet && !queue.event_idx_enabled() {
                // A worker that polled before (this daemon's, or one that
                // died) may have left VRING_USED_F_NO_NOTIFY set.
                queue.enable_notification(mem).map_err(Error::Queue)?;
            }
            if let Some(t) = self.tracker.as_mut() {
                let (heads, next_avail) = t.restart(idx.0);
                log::info!(
                    "virtio-blk: {} requests in flight before the restart are submitted again \
                     (used index {}, avail resumes at {next_avail})",
                    heads.len(),
                    idx.0
                );
                // The tracker's record is the truth: it replaces the parked list.
                self.parked = heads.into_iter().map(|head| (head, None)).collect();
                queue.set_next_avail(next_avail);
                restarted = true;
            }
            self.used_synced = true;
        }
        self.reap(queue, mem, &mut outcome)?;
        for _ in 0..self.parked.len() {
            let Some((head, walked)) = self.parked.pop_front() else {
                break;
            };
            if self.free.is_empty() {
                self.parked.push_front((head, walked));
                break;
            }
            self.retry_parked(queue, mem, decide, head, walked, &mut outcome)?;
        }
        self.release_throttled(queue, mem, decide, &mut outcome)?;
        self.take_new(queue, mem, decide, &mut outcome)?;
        self.submit_pending();
        if let Err(e) = self.engine.commit() {
            warn!("virtio-blk: submitting to the I/O engine failed: {e}");
        }
        // The sync engine's completions are ready now.
        self.reap(queue, mem, &mut outcome)?;
        let mut outcome = self.settle(queue, mem, outcome)?;
        // A backend killed between putting chains on the used ring and notifying left the
        // driver waiting for an interrupt that never comes: under EVENT_IDX the chains
        // answered from now on do not cross the `used_event` it asked for either. One
        // notification more is harmless (drivers look at the used ring).
        outcome.notify |= restarted;
        Ok(outcome)
    }

    /// Whether the batch that gave `outcome` must notify the driver.
    fn settle<M: GuestMemory>(
        &self,
        queue: &mut Queue,
        mem: &M,
        mut outcome: QueueOutcome,
    ) -> Result<QueueOutcome, Error> {
        if outcome.completed > 0 {
            outcome.notify = queue.needs_notification(mem).map_err(Error::Queue)?;
        }
        Ok(outcome)
    }

    /// Wait for every request in flight and complete it (a queue stop, a disconnect, SIGTERM:
    /// before any memory goes away). Parked requests stay parked.
    pub fn drain<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<QueueOutcome, Error> {
        let mut outcome = QueueOutcome::default();
        #[cfg(test)]
        self.open_gate();
        while self.in_flight() > 0 {
            self.submit_pending();
            if let Err(e) = self.engine.commit() {
                warn!("virtio-blk: submitting to the I/O engine failed: {e}");
            }
            if let Err(e) = self.engine.wait() {
                warn!("virtio-blk: waiting for the I/O engine failed: {e}");
                break;
            }
            self.reap(queue, mem, &mut outcome)?;
        }
        self.settle(queue, mem, outcome)
    }

    /// Wait for every request in flight and release its hold without answering it: the
    /// driver's memory is out of reach (a device detached from its address space while it had
    /// I/O in flight, or a queue whose rings faulted for good). The requests are lost to the
    /// driver, as on a device reset; their I/O is finished, so nothing writes into memory that
    /// an invalidation may take away. Returns how many were abandoned.
    pub fn abandon(&mut self) -> usize {
        #[cfg(test)]
        self.open_gate();
        let mut n = 0;
        // Not submitted: never run them.
        while let Some(p) = self.pending.pop_front() {
            n += usize::from(self.forget(p.tag));
            self.spare_iov.push(p.iov);
        }
        let mut reaped = std::mem::take(&mut self.reaped);
        loop {
            self.engine.reap(&mut reaped);
            for (tag, _) in reaped.drain(..) {
                n += usize::from(self.forget(tag));
            }
            if self.engine.in_flight() == 0 {
                break;
            }
            if let Err(e) = self.engine.wait() {
                warn!("virtio-blk: waiting for the I/O engine failed: {e}");
                break;
            }
        }
        self.reaped = reaped;
        self.parked.clear();
        self.throttled.clear();
        n
    }

    /// The write with sequence number `seq` is no longer in flight.
    fn write_done(&mut self, seq: u64) {
        if let Ok(i) = self.writes.binary_search(&seq) {
            self.writes.remove(i);
        }
    }

    /// Drop the request of `tag` unanswered, releasing its hold.
    fn forget(&mut self, tag: u64) -> bool {
        let Some(f) = usize::try_from(tag)
            .ok()
            .and_then(|t| self.slots.get_mut(t))
            .and_then(Option::take)
        else {
            return false;
        };
        self.free.push(tag);
        if let Some(seq) = f.write_seq {
            self.write_done(seq);
        }
        if let Some(h) = f.hold {
            h.release();
        }
        true
    }

    fn take_new<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        decide: &mut dyn FnMut(&Fault) -> FaultPolicy,
        outcome: &mut QueueOutcome,
    ) -> Result<(), Error> {
        let seg_max = usize::try_from(self.device.config().seg_max()).unwrap_or(usize::MAX);
        let max_chain = usize::from(queue.size()).max(seg_max.saturating_add(2));
        let desc_table = GuestAddress(queue.desc_table());
        let queue_size = queue.size();
        let event_idx = queue.event_idx_enabled();
        // At most BATCH_REQUESTS chains per call (see there) or a ring's worth, which also
        // bounds a call when a driver keeps the ring full for ever (requests answered at once
        // use no slot; or a used index that aliases the avail index offers a chain with every
        // answer): the caller must get to see a stop. It polls again at once (`more`).
        let mut budget = if self.small_batches {
            BATCH_REQUESTS
        } else {
            queue_size
        };
        // And about BATCH_BYTES of data (see there).
        let mut bytes = 0u64;
        // Behind a request the limits hold back, the avail ring waits.
        while self.throttled.is_empty() {
            if event_idx {
                queue.disable_notification(mem).map_err(Error::Queue)?;
            }
            while !self.free.is_empty() && self.throttled.is_empty() {
                if budget == 0 || bytes >= BATCH_BYTES {
                    outcome.more = true;
                    return Ok(());
                }
                let Some(chain) = chain::pop(queue, mem).map_err(Error::Queue)? else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                if let Some(t) = self.tracker.as_mut() {
                    t.taken(head);
                }
                let mut descs = std::mem::take(&mut self.descs);
                let r = chain::gather(chain, mem, desc_table, queue_size, max_chain, &mut descs);
                bytes += descs.iter().map(|d| u64::from(d.len())).sum::<u64>();
                let res = match r {
                    Ok(()) => self.decided(
                        head,
                        Some(&descs),
                        decide,
                        outcome,
                        &mut |s, policy, out| s.begin(queue, mem, policy, head, &descs, false, out),
                    ),
                    Err(err) => self.decided(head, None, decide, outcome, &mut |s, policy, out| {
                        let c =
                            s.unwalkable(mem, policy, desc_table, queue_size, head, &descs, &err);
                        s.finish(queue, mem, head, c, out)
                    }),
                };
                self.descs = descs;
                res?;
            }
            if self.quiet && !self.free.is_empty() && self.throttled.is_empty() {
                // The worker polls the ring: the driver need not notify.
                return Self::hush(queue, mem);
            }
            // A full queue of requests in flight: the completions poll again. A request
            // held back by the limits: its deadline does (notifications may stay off).
            if self.free.is_empty()
                || !self.throttled.is_empty()
                || !event_idx
                || !queue.enable_notification(mem).map_err(Error::Queue)?
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Starts the requests parked by the I/O limits, oldest first, while the buckets pay for
    /// them and a slot is free.
    fn release_throttled<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        decide: &mut dyn FnMut(&Fault) -> FaultPolicy,
        outcome: &mut QueueOutcome,
    ) -> Result<(), Error> {
        if self.throttled.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        while let Some(t) = self.throttled.front() {
            if self.free.is_empty() || self.device.throttle().try_take(t.cost, now).is_err() {
                break;
            }
            let Some(t) = self.throttled.pop_front() else {
                break;
            };
            let (head, descs) = (t.head, t.descs);
            self.decided(
                head,
                Some(&descs),
                decide,
                outcome,
                &mut |s, policy, out| s.begin(queue, mem, policy, head, &descs, true, out),
            )?;
        }
        Ok(())
    }

    /// A chain virtio-queue could not walk: IOERR through its real status byte if it has one.
    #[allow(clippy::too_many_arguments)]
    fn unwalkable<M: InflightMemory<Hold = H>>(
        &mut self,
        mem: &M,
        policy: FaultPolicy,
        desc_table: GuestAddress,
        queue_size: u16,
        head: u16,
        descs: &[Descriptor],
        err: &ParseError,
    ) -> Completion {
        // `err` is not Clone and an attempt may run twice (Retry, then Fail): rebuild it.
        let err = match err {
            ParseError::TooLong { len, max } => ParseError::TooLong {
                len: *len,
                max: *max,
            },
            ParseError::EmptyChain => ParseError::EmptyChain,
            _ => ParseError::Truncated,
        };
        exec::answer_unwalkable(
            mem,
            policy,
            desc_table,
            queue_size,
            head,
            descs,
            err,
            &mut Vec::new(),
            &mut Vec::new(),
        )
    }

    /// Run `attempt` under Retry; if it faults, ask `decide`: park the request (Retry), with its
    /// descriptors if it was `walked`, or run it again under Fail, which answers it with IOERR.
    fn decided(
        &mut self,
        head: u16,
        walked: Option<&[Descriptor]>,
        decide: &mut dyn FnMut(&Fault) -> FaultPolicy,
        outcome: &mut QueueOutcome,
        attempt: &mut Attempt<'_, Self>,
    ) -> Result<(), Error> {
        let Some(fault) = attempt(self, FaultPolicy::Retry, outcome)? else {
            return Ok(());
        };
        match decide(&fault) {
            FaultPolicy::Retry => {
                log::trace!(
                    "virtio-blk: chain {head} parked (walked: {}) on {fault:?}",
                    walked.is_some()
                );
                self.parked
                    .push_back((head, walked.map(<[Descriptor]>::to_vec)));
                outcome.fault.get_or_insert(fault);
            }
            FaultPolicy::Fail => {
                // Under Fail nothing comes back as a fault.
                let _ = attempt(self, FaultPolicy::Fail, outcome)?;
            }
        }
        Ok(())
    }

    fn retry_parked<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        decide: &mut dyn FnMut(&Fault) -> FaultPolicy,
        head: u16,
        walked: Option<Vec<Descriptor>>,
        outcome: &mut QueueOutcome,
    ) -> Result<(), Error> {
        if let Some(descs) = walked {
            return self.decided(
                head,
                Some(&descs),
                decide,
                outcome,
                &mut |s, policy, out| s.begin(queue, mem, policy, head, &descs, false, out),
            );
        }
        // Parked before it could be walked (a fault on its descriptors), or handed over
        // by a previous worker: walk it now.
        let mut descs = std::mem::take(&mut self.descs);
        let table = GuestAddress(queue.desc_table());
        let size = queue.size();
        let r = self.decided(
            head,
            None,
            decide,
            outcome,
            &mut |s, policy, out| match chain::rewalk(mem, table, size, head, &mut descs) {
                Rewalk::End(_) => {
                    let walked = std::mem::take(&mut descs);
                    let r = s.begin(queue, mem, policy, head, &walked, false, out);
                    descs = walked;
                    r
                }
                Rewalk::Fault(fault) if policy == FaultPolicy::Retry => Ok(Some(fault)),
                Rewalk::Broken if policy == FaultPolicy::Retry => {
                    // A translation gone in the middle of the walk is a
                    // fault (see chain::rewalk), so this chain is broken
                    // for good (a loop or a bad index its first walk could
                    // not reach, or descriptors the driver changed while
                    // the device owned them). It faulted on its descriptors
                    // when it was taken: do not return it unanswered (its
                    // status byte untouched would read as success, and a
                    // write would be lost); look again at the next poll.
                    log::debug!("virtio-blk: parked chain {head} cannot be walked yet");
                    s.parked.push_back((head, None));
                    Ok(None)
                }
                other => {
                    log::debug!(
                        "virtio-blk: parked chain {head} cannot be walked again: {other:?}"
                    );
                    s.finish(queue, mem, head, Completion::Dropped, out)
                }
            },
        );
        self.descs = descs;
        r
    }

    /// Phase one of a walked chain, then its submission or its answer; a read or write the
    /// I/O limits cannot pay for yet (unless already `paid` for) is parked by them.
    #[allow(clippy::too_many_arguments)]
    fn begin<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        policy: FaultPolicy,
        head: u16,
        descs: &[Descriptor],
        paid: bool,
        outcome: &mut QueueOutcome,
    ) -> Result<Option<Fault>, Error> {
        let mut slices = recycle(std::mem::take(&mut self.slices));
        let r = self.begin_with(queue, mem, policy, head, descs, paid, outcome, &mut slices);
        self.slices = recycle(slices);
        r
    }

    /// [`AsyncQueue::begin`] with the vector for the translated slices.
    #[allow(clippy::too_many_arguments)]
    fn begin_with<'m, M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &'m M,
        policy: FaultPolicy,
        head: u16,
        descs: &[Descriptor],
        paid: bool,
        outcome: &mut QueueOutcome,
        slices: &mut Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>,
    ) -> Result<Option<Fault>, Error> {
        let device = self.device.clone();
        let target = device.target();
        let (req, status) = match start_chain(&target, descs, mem, policy, slices) {
            Started::Finished(c) => return self.finish(queue, mem, head, c, outcome),
            Started::Ready(req, status) => (req, status),
        };
        let mut bounce = None;
        let (op, expect, written) = match req.kind {
            RequestType::In | RequestType::Out => {
                let reading = req.kind == RequestType::In;
                let len = if reading {
                    req.writable.len
                } else {
                    req.readable.len
                };
                let offset = match check_range(req.sector, len, target.capacity) {
                    Ok(o) => o,
                    Err(e) => {
                        let c = answer(&status, Err(e));
                        return self.finish(queue, mem, head, c, outcome);
                    }
                };
                let cost = Cost::io(len);
                if !paid
                    && (!self.throttled.is_empty() || device.throttle().try_take_now(cost).is_err())
                {
                    // Nothing of it happened yet: it starts over when its turn comes.
                    self.throttled.push_back(Throttled {
                        head,
                        descs: descs.to_vec(),
                        cost,
                    });
                    return Ok(None);
                }
                if bounce::needs_bounce(target.backend, slices) {
                    bounce = EngineBounce::new(target.backend, slices, len, reading);
                    if bounce.is_none() {
                        // Too large to bounce whole while in flight: bounce it in chunks now.
                        let c = answer(
                            &status,
                            exec::execute(&target, &req, slices, &mut self.segments),
                        );
                        return self.finish(queue, mem, head, c, outcome);
                    }
                }
                if reading {
                    for s in slices.iter() {
                        s.bitmap().mark_dirty(0, s.len());
                    }
                    (IoOp::Read { offset }, len, len)
                } else {
                    (IoOp::Write { offset }, len, 0)
                }
            }
            RequestType::Flush => (IoOp::Flush, 0, 0),
            _ => {
                let c = answer(
                    &status,
                    exec::execute(&target, &req, slices, &mut self.segments),
                );
                return self.finish(queue, mem, head, c, outcome);
            }
        };
        let Some(tag) = self.free.pop() else {
            // Unreachable: the caller checked for a free slot. Answer rather than lose it.
            let c = answer(&status, Err(exec::RequestError::Unsupported(0)));
            return self.finish(queue, mem, head, c, outcome);
        };
        // Every translated range, held if the operation is still in flight when this poll
        // ends.
        let first = self.ranges.len();
        self.ranges.push((req.status.0, req.status.0));
        let (data, _) = req.data();
        for (addr, len) in data.pieces(descs).flatten() {
            self.ranges.push((
                addr.0,
                addr.0.saturating_add(u64::from(len).saturating_sub(1)),
            ));
        }
        self.begun.push((tag, first..self.ranges.len()));
        let mut iov = self.spare_iov.pop().unwrap_or_default();
        iov.clear();
        match &bounce {
            Some(b) => iov.push(b.iovec()),
            None => iov.extend(slices.iter().map(IoVec::of)),
        }
        let write_seq = matches!(op, IoOp::Write { .. }).then(|| {
            let seq = self.next_write_seq;
            self.next_write_seq = self.next_write_seq.wrapping_add(1);
            self.writes.push_back(seq);
            seq
        });
        let barrier = matches!(op, IoOp::Flush).then_some(self.next_write_seq);
        if let Some(slot) = usize::try_from(tag)
            .ok()
            .and_then(|t| self.slots.get_mut(t))
        {
            *slot = Some(Inflight {
                head,
                status: IoVec::of(&status),
                expect,
                written,
                hold: None,
                write_seq,
                bounce,
            });
        }
        self.pending.push_back(Pending {
            tag,
            op,
            iov,
            barrier,
        });
        self.submit_pending();
        Ok(None)
    }

    /// Submit pending operations in order while the engine takes them. A flush whose earlier
    /// writes are still in flight stays pending; what comes after it does not wait for it.
    /// True when it submitted any.
    fn submit_pending(&mut self) -> bool {
        let oldest_write = self.writes.front().copied();
        let mut i = 0;
        let mut submitted = false;
        while let Some(p) = self.pending.get(i) {
            if p.barrier
                .is_some_and(|b| oldest_write.is_some_and(|w| w < b))
            {
                i += 1;
                continue;
            }
            // SAFETY: the buffers are guest memory translated by this poll's view, which keeps
            // them mapped while it lives, and held by this request's `hold` from the end of the
            // poll that began it (the `InflightMemory` contract keeps them mapped until
            // `release`), which is released only after the engine returned the completion for
            // `p.tag`.
            let r = unsafe { self.engine.submit(p.tag, p.op, &p.iov) };
            if r.is_err() {
                return submitted;
            }
            submitted = true;
            if let Some(p) = self.pending.remove(i) {
                #[cfg(test)]
                if let Some(Some(f)) = usize::try_from(p.tag).ok().and_then(|t| self.slots.get(t)) {
                    self.log.push(OpEvent::Submitted {
                        head: f.head,
                        op: p.op,
                    });
                }
                self.spare_iov.push(p.iov);
            }
        }
        submitted
    }

    fn reap<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        outcome: &mut QueueOutcome,
    ) -> Result<(), Error> {
        let mut reaped = std::mem::take(&mut self.reaped);
        let mut r = Ok(());
        loop {
            if reaped.is_empty() && self.engine.in_flight() == 0 {
                break;
            }
            self.engine.reap(&mut reaped);
            if reaped.is_empty() {
                break;
            }
            self.complete_reaped(queue, mem, &mut reaped, &mut r, outcome);
            // A flush whose writes have just completed goes now, and is handed to the kernel
            // now: nothing else may wake this queue for it (the sync engine completes it at
            // once, and the loop reaps it; io_uring's completion descriptor fires only for an
            // entry the kernel was given).
            if self.submit_pending() {
                if let Err(e) = self.engine.commit() {
                    warn!("virtio-blk: submitting to the I/O engine failed: {e}");
                }
            }
        }
        self.reaped = reaped;
        r
    }

    /// Complete (or, once the queue broke, drop) each of `reaped`; `r` keeps the first error.
    fn complete_reaped<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        reaped: &mut Vec<IoCompletion>,
        r: &mut Result<(), Error>,
        outcome: &mut QueueOutcome,
    ) {
        for (tag, result) in reaped.drain(..) {
            #[cfg(test)]
            {
                let gated = usize::try_from(tag)
                    .ok()
                    .and_then(|t| self.slots.get(t))
                    .and_then(|s| s.as_ref())
                    .is_some_and(|f| Some(f.head) == self.gate);
                if gated {
                    self.gated.push((tag, result));
                    continue;
                }
            }
            if r.is_ok() {
                *r = self.complete(queue, mem, tag, result, outcome);
            } else {
                // The queue broke answering an earlier one: this I/O is
                // done and can no longer be answered. Dropped here, as
                // `abandon` would (dropped unforgotten, its slot stayed
                // taken: `in_flight` never went back to 0 and a drain
                // spun forever).
                self.forget(tag);
            }
        }
    }

    fn complete<M: InflightMemory<Hold = H>>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        tag: u64,
        result: std::io::Result<u64>,
        outcome: &mut QueueOutcome,
    ) -> Result<(), Error> {
        let Some(f) = usize::try_from(tag)
            .ok()
            .and_then(|t| self.slots.get_mut(t))
            .and_then(Option::take)
        else {
            warn!("virtio-blk: completion for unknown tag {tag}");
            return Ok(());
        };
        self.free.push(tag);
        if let Some(seq) = f.write_seq {
            self.write_done(seq);
        }
        #[cfg(test)]
        self.log.push(OpEvent::Completed { head: f.head });
        let (status, written) = match result {
            Ok(n) if n == f.expect => (exec::status_ok(), f.written),
            Ok(n) => {
                warn!(
                    "virtio-blk: short transfer of {n} of {} bytes; IOERR",
                    f.expect
                );
                (ioerr(), 0)
            }
            Err(e) => {
                log::debug!("virtio-blk: request failed: {e}");
                (ioerr(), 0)
            }
        };
        if let (Some(b), true) = (&f.bounce, status == exec::status_ok()) {
            // SAFETY: the guest's data buffers were translated for this request and are kept
            // mapped by this poll's view or, from the end of the poll that began the request,
            // by `f.hold`, until the release below.
            unsafe { b.finish() };
        }
        // SAFETY: the status byte was translated for writing and is kept mapped as the data
        // buffers above.
        unsafe { f.status.write_byte(status) };
        if let Some(h) = f.hold {
            h.release();
        }
        self.finish(
            queue,
            mem,
            f.head,
            Completion::Used(used_len(written)),
            outcome,
        )
        .map(drop)
    }

    /// Put a finished chain on the used ring, or give back its fault (under Retry).
    fn finish<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        head: u16,
        completion: Completion,
        outcome: &mut QueueOutcome,
    ) -> Result<Option<Fault>, Error> {
        let len = match completion {
            Completion::Retry(fault) => return Ok(Some(fault)),
            Completion::Used(len) => len,
            Completion::Dropped => 0,
        };
        if let Some(t) = self.tracker.as_mut() {
            t.used(head);
        }
        match queue.add_used(mem, head, len) {
            Ok(()) => {
                outcome.completed = outcome.completed.saturating_add(1);
                if let Some(t) = self.tracker.as_mut() {
                    t.committed(queue.next_used());
                }
            }
            Err(virtio_queue::Error::InvalidDescriptorIndex) => {
                warn!("virtio-blk: driver offered out-of-range head {head}; ignored");
            }
            Err(err) => return Err(Error::Queue(err)),
        }
        Ok(None)
    }

    /// Test-only: hold back the completion of the request with this head until
    /// [`AsyncQueue::open_gate`].
    #[cfg(test)]
    pub(crate) fn set_gate(&mut self, head: u16) {
        self.gate = Some(head);
    }

    /// Test-only: let the gated completion through at the next poll.
    #[cfg(test)]
    pub(crate) fn open_gate(&mut self) {
        self.gate = None;
        let gated = std::mem::take(&mut self.gated);
        self.reaped.extend(gated);
    }
}

impl<H> Drop for AsyncQueue<H> {
    fn drop(&mut self) {
        let in_flight = self.slots.len().saturating_sub(self.free.len());
        if in_flight > 0 {
            // The engine waits for its operations when dropped; the holds are the
            // transport's, released with its reader.
            warn!("virtio-blk: queue dropped with {in_flight} requests in flight");
        }
    }
}

/// Room for one `VolatileSlice` of guest memory without a dirty bitmap (the memory views of
/// both doors), in a type that can move between threads: the element type of the buffer that
/// the slices of each request reuse (see [`recycle`]).
type SliceStore =
    [usize; std::mem::size_of::<VolatileSlice<'static, ()>>() / std::mem::size_of::<usize>()];

const _: () = assert!(
    std::mem::size_of::<SliceStore>() == std::mem::size_of::<VolatileSlice<'static, ()>>()
        && std::mem::align_of::<SliceStore>() == std::mem::align_of::<VolatileSlice<'static, ()>>()
);

/// An empty vector of `U` that keeps the allocation of `v` when `T` and `U` have the same size
/// and alignment (std's in-place collection; `VolatileSlice`s of different lifetimes), else a
/// new one. So the slices of a request, which borrow its memory view, reuse one buffer.
fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}

fn ioerr() -> u8 {
    u8::try_from(VIRTIO_BLK_S_IOERR).unwrap_or(u8::MAX)
}
