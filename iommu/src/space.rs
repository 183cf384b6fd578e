//! An address space: extents published read-copy-update, and the
//! quiescence that makes invalidation a promise.
//!
//! # Invariants
//!
//! - **Writers** serialise on `writer` (a mutex readers never take). Each
//!   [`AddressSpace::edit`] mutates the writer's private [`Tree`] and then
//!   publishes its root with one atomic pointer swap.
//! - **Readers** are [`Reader`](crate::Reader)s (one per queue, single owner). A reader is
//!   *online* inside a [`Session`](crate::Session) and may then dereference the published
//!   root and the host memory it points to; it is *offline* (quiescent)
//!   otherwise. Its slot holds 0 when offline, else the generation it saw
//!   when it went online.
//! - **`generation`** is bumped by every grace period, and only under the
//!   writer lock. A reader's front cache is valid for the generation it was
//!   filled in; one atomic load per translation checks it. When it moved,
//!   the reader drops the entries that overlap what the generations in
//!   between removed (the invalidation log remembers the hull of each of
//!   the last 16), or all of them if the log no longer covers the gap.
//! - **Grace periods.** An edit that removes or changes any translation
//!   bumps the generation and then waits until every reader is offline or
//!   has gone online again since (slot 0 or slot >= the new generation).
//!   Only then does it return, and only then are the old roots and the
//!   removed extents (and so possibly their memory) dropped. Edits that only
//!   add keep old roots on a retired list, freed at the next grace period.
//! - A reader that waits for anything slow (an IOTLB miss answer) must end
//!   its session first, or the invalidator waits for it: QEMU blocks on the
//!   invalidate's ack before it answers the miss.
//! - **Holds** ([`crate::hold`]) extend the promise past a session: a request
//!   whose I/O outlives the session that translated it registers its ranges
//!   in that session ([`Session::hold`](crate::Session::hold)). After its
//!   grace period for generation `T`, an edit that removed anything drops
//!   the writer lock and waits until no hold taken before `T` overlaps a
//!   removed extent; only then does it return and drop the removed
//!   extents. Holds are stored under a per-reader lock before the session
//!   ends, and the writer reads them after the grace period, so it sees
//!   every hold that can reference a removed translation. Releases never
//!   take the writer lock.
//!
//! The memory ordering is the classic QSBR pairing: the reader stores its
//! slot, then a SeqCst fence, then loads the generation and the root; the
//! writer swaps the root, bumps the generation, SeqCst fence, then reads the
//! slots. Either the writer sees the reader online with an old generation
//! (and waits), or the reader sees the new root and generation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::hold::{HoldCell, HoldKey, Removed};
use crate::sync::qsbr::{
    fence, lock, seqcst_pair, spin_until, AtomicPtr, AtomicU32, AtomicU64, Condvar, Mutex, Ordering,
};
use crate::tree::{Extent, Node, Tree};

/// Grace periods are triggered at the latest when this many roots are
/// retired by add-only edits.
const MAX_RETIRED: usize = 64;

/// Generations whose removed range is remembered ([`AddressSpace::removed_in`]). A queue's ring
/// pins ([`crate::translate::Session::removed_since`]) survive this many invalidations between
/// two of its batches: under a strict guest IOMMU at queue depth 32 the worker sleeps through
/// a burst of 32 INVALIDATEs of data pages, and a log of 16 had it redo its pins once a burst.
/// 24 bytes a generation. The front cache reads only the last
/// [`crate::translate::PARTIAL_FLUSH_GENS`] of them (each costs it a pass over its entries).
/// The loom model keeps a short log: its length is no part of the grace period's promise.
#[cfg(not(loom))]
const LOG_LEN: usize = 256;
#[cfg(loom)]
const LOG_LEN: usize = 16;

/// What one generation removed: the hull `first..=last` of the extents a
/// grace period was started for (`first > last`: nothing, a grace period
/// that only retired old roots). Written under the writer lock before the
/// generation moves to `gen`; read seqlock-style.
#[derive(Debug, Default)]
struct LogSlot {
    gen: AtomicU64,
    first: AtomicU64,
    last: AtomicU64,
}

/// How long a grace period spins on a reader before it blocks.
const SPIN_BEFORE_BLOCKING: Duration = Duration::from_micros(20);

/// One reader's announcement slot, alone on its cache line, and its holds
/// (on the next line).
#[repr(align(64))]
#[derive(Debug, Default)]
pub(crate) struct ReaderSlot {
    pub(crate) epoch: AtomicU64,
    pub(crate) holds: HoldCell,
}

/// Edits that had to wait for holds ([`AddressSpace::hold_waits`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HoldWaits {
    /// Edits that found an overlapping hold and waited for its release.
    pub edits: u64,
    /// Their total time waiting for holds.
    pub total: Duration,
}

#[derive(Debug, Default)]
struct Writer {
    tree: Tree,
    retired: Vec<Arc<Node>>,
}

/// A set of translations (IOVA -> host memory) shared by its readers.
#[derive(Debug)]
pub struct AddressSpace {
    /// The published root; holds one strong count (`Arc::into_raw`).
    root: AtomicPtr<Node>,
    generation: AtomicU64,
    readers: Mutex<Vec<Arc<ReaderSlot>>>,
    writer: Mutex<Writer>,
    /// Invalidators blocked in a grace period; a reader leaving a session
    /// wakes them through `wake` when this is non-zero.
    waiters: AtomicU32,
    wake_lock: Mutex<()>,
    wake: Condvar,
    grace_periods: AtomicU64,
    /// Edits blocked on holds; a release wakes them through `hold_wake`
    /// when this is non-zero.
    hold_waiters: AtomicU32,
    hold_wake_lock: Mutex<()>,
    hold_wake: Condvar,
    hold_wait_edits: AtomicU64,
    hold_wait_ns: AtomicU64,
    /// The ranges the last [`LOG_LEN`] generations removed, so that readers
    /// drop only the cache entries they cover.
    log: [LogSlot; LOG_LEN],
    /// Test-only: skip the wait for readers (the negative test of the
    /// promise, natively and in the loom model). Set before the readers
    /// start: std's atomic even under loom, not part of the model.
    #[cfg(test)]
    skip_quiescence: std::sync::atomic::AtomicBool,
    /// Test-only: skip the wait for holds (the negative test of holds).
    #[cfg(test)]
    skip_hold_wait: std::sync::atomic::AtomicBool,
}

impl Default for AddressSpace {
    fn default() -> Self {
        let tree = Tree::default();
        let root = Arc::into_raw(tree.root.clone()).cast_mut();
        AddressSpace {
            root: AtomicPtr::new(root),
            generation: AtomicU64::new(1),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(Writer {
                tree,
                retired: Vec::new(),
            }),
            grace_periods: AtomicU64::new(0),
            log: std::array::from_fn(|_| LogSlot::default()),
            waiters: AtomicU32::new(0),
            wake_lock: Mutex::new(()),
            wake: Condvar::new(),
            hold_waiters: AtomicU32::new(0),
            hold_wake_lock: Mutex::new(()),
            hold_wake: Condvar::new(),
            hold_wait_edits: AtomicU64::new(0),
            hold_wait_ns: AtomicU64::new(0),
            #[cfg(test)]
            skip_quiescence: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            skip_hold_wait: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        // (A load rather than get_mut: loom's atomics have no get_mut.)
        let root = self.root.load(Ordering::Relaxed);
        // SAFETY: `root` came from Arc::into_raw and nobody can read it any
        // more: readers hold an Arc<AddressSpace>, so none is left.
        drop(unsafe { Arc::from_raw(root) });
    }
}

/// Changes made inside one [`AddressSpace::edit`].
pub struct Txn<'a> {
    tree: &'a mut Tree,
    removed: Vec<Extent>,
    added: bool,
}

impl Txn<'_> {
    /// The current extents (including this transaction's changes).
    pub fn tree(&self) -> &Tree {
        self.tree
    }

    /// Inserts an extent that overlaps none (the caller checked).
    pub fn insert(&mut self, e: Extent) {
        self.tree.insert(e);
        self.added = true;
    }

    /// Removes the extent starting at `start`, returning a copy of it. The
    /// removal takes effect for readers with the grace period at commit.
    pub fn remove(&mut self, start: u64) -> Option<Extent> {
        let e = self.tree.remove(start)?;
        self.removed.push(e.clone());
        Some(e)
    }

    /// Removes every extent.
    pub fn clear(&mut self) -> usize {
        let n = self.tree.len();
        if n > 0 {
            self.tree.for_each(|e| self.removed.push(e.clone()));
            self.tree.clear();
        }
        n
    }
}

impl AddressSpace {
    /// A new, empty address space.
    pub fn new() -> Arc<AddressSpace> {
        Arc::new(AddressSpace::default())
    }

    /// Runs `f` on the writer's tree. On `Ok` the result is published, and
    /// if anything was removed the call returns only after a grace period
    /// and after every hold taken before it that overlaps a removed extent
    /// was released: no reader and no request in flight uses a removed
    /// translation any more. On `Err` every change `f` made is rolled back.
    ///
    /// Don't call it from a thread that has holds of this space still to
    /// release: it could wait for itself.
    pub fn edit<R, E>(&self, f: impl FnOnce(&mut Txn<'_>) -> Result<R, E>) -> Result<R, E> {
        let mut w = lock(&self.writer);
        let saved = w.tree.clone();
        let mut txn = Txn {
            tree: &mut w.tree,
            removed: Vec::new(),
            added: false,
        };
        let r = f(&mut txn);
        let Txn { removed, added, .. } = txn;
        match r {
            Err(e) => {
                w.tree = saved;
                Err(e)
            }
            Ok(r) => {
                drop(saved);
                let gone = Removed::new(&removed);
                let mut target = None;
                if gone.is_some() || added {
                    target = self.publish(&mut w, gone.as_ref().map(Removed::hull));
                }
                // Other edits need not wait for our requests in flight.
                drop(w);
                if let (Some(target), Some(gone)) = (target, gone) {
                    self.wait_for_holds(target, &gone);
                }
                drop(removed);
                Ok(r)
            }
        }
    }

    /// Number of extents (the latest committed state).
    pub fn len(&self) -> usize {
        self.with_tree(Tree::len)
    }

    /// Whether there is no extent.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the writer's current tree (the latest committed state).
    pub fn with_tree<R>(&self, f: impl FnOnce(&Tree) -> R) -> R {
        f(&lock(&self.writer).tree)
    }

    /// Publishes the writer's tree; `removed` is the hull of what the edit
    /// removed, if anything. Returns the generation of the grace period it
    /// ran, if any.
    fn publish(&self, w: &mut Writer, removed: Option<(u64, u64)>) -> Option<u64> {
        let new = Arc::into_raw(w.tree.root.clone()).cast_mut();
        let old = self.root.swap(new, Ordering::AcqRel);
        // SAFETY: `old` came from Arc::into_raw in a previous publish (or
        // Default) and was owned by `root`, which no longer holds it.
        w.retired.push(unsafe { Arc::from_raw(old) });
        if removed.is_some() || w.retired.len() >= MAX_RETIRED {
            let target = self.synchronize(removed.unwrap_or((1, 0)));
            w.retired.clear();
            return Some(target);
        }
        None
    }

    /// Waits until no hold taken before generation `target` overlaps what
    /// the edit removed. Called after the grace period for `target`, without
    /// the writer lock. Holds registered after the first look are not
    /// waited for (they cannot reference a removed translation).
    fn wait_for_holds(&self, target: u64, removed: &Removed<'_>) {
        #[cfg(test)]
        if self.skip_hold_wait.load(Ordering::Relaxed) {
            return;
        }
        let mut waiting: Vec<(Arc<ReaderSlot>, SmallVec<[HoldKey; 4]>)> = Vec::new();
        // Lock order: readers, then a reader's holds (a release never
        // holds its table lock while it takes another lock).
        for slot in lock(&self.readers).iter() {
            let mut keys = SmallVec::new();
            lock(&slot.holds.0).overlapping(target, removed, &mut keys);
            if !keys.is_empty() {
                waiting.push((slot.clone(), keys));
            }
        }
        if waiting.is_empty() {
            return;
        }
        let start = Instant::now();
        let mut warned = 0;
        self.hold_waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = lock(&self.hold_wake_lock);
        loop {
            waiting.retain_mut(|(slot, keys)| {
                let t = lock(&slot.holds.0);
                keys.retain(|k| t.is_live(*k));
                !keys.is_empty()
            });
            if waiting.is_empty() {
                break;
            }
            let secs = start.elapsed().as_secs();
            if secs > warned {
                warned = secs;
                let n: usize = waiting.iter().map(|(_, k)| k.len()).sum();
                log::warn!(
                    "invalidation of {:#x}..={:#x} waits for {n} request(s) in flight for {secs} s",
                    removed.hull().0,
                    removed.hull().1
                );
            }
            g = self
                .hold_wake
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(g);
        self.hold_waiters.fetch_sub(1, Ordering::SeqCst);
        self.hold_wait_edits.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.hold_wait_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Called after a hold was released (its table lock dropped): wakes
    /// edits waiting for holds. The SeqCst pair (`hold_waiters` increment
    /// before the edit's look at the tables; table change before the load
    /// here) and the wake lock, which the edit holds from its look until it
    /// sleeps, mean a release is either seen by the look or wakes it.
    #[inline]
    pub(crate) fn hold_released(&self) {
        if self.hold_waiters.load(Ordering::SeqCst) != 0 {
            let _g = lock(&self.hold_wake_lock);
            self.hold_wake.notify_all();
        }
    }

    /// Edits that had to wait for holds, and for how long in all.
    pub fn hold_waits(&self) -> HoldWaits {
        HoldWaits {
            edits: self.hold_wait_edits.load(Ordering::Relaxed),
            total: Duration::from_nanos(self.hold_wait_ns.load(Ordering::Relaxed)),
        }
    }

    /// Starts a grace period for the removal of `first..=last` and waits
    /// for its end: every reader online now has gone offline or re-entered.
    /// Called with the writer lock held (the only place the generation
    /// moves). Returns the new generation.
    fn synchronize(&self, (first, last): (u64, u64)) -> u64 {
        let target = self.generation.load(Ordering::Relaxed) + 1;
        let slot = &self.log[target as usize % LOG_LEN];
        slot.gen.store(0, Ordering::Relaxed);
        fence(Ordering::Release);
        slot.first.store(first, Ordering::Relaxed);
        slot.last.store(last, Ordering::Relaxed);
        slot.gen.store(target, Ordering::Release);
        self.generation.store(target, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.grace_periods.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        if self.skip_quiescence.load(Ordering::Relaxed) {
            return target;
        }
        let ready = |slot: &ReaderSlot| {
            let e = slot.epoch.load(Ordering::SeqCst);
            e == 0 || e >= target
        };
        // Those online in an older generation now (a reader found ready
        // stays so for this target: it re-enters in `target` or later).
        // Usually none: no allocation, no clock.
        let online: SmallVec<[Arc<ReaderSlot>; 4]> = lock(&self.readers)
            .iter()
            .filter(|s| !ready(s))
            .cloned()
            .collect();
        for slot in &online {
            // Readers leave sessions within microseconds: spin that long.
            let start = Instant::now();
            if spin_until(|| ready(slot), SPIN_BEFORE_BLOCKING) {
                continue;
            }
            // Then block, to give the CPU to the reader we wait for (it may
            // share a core with us); its session's end wakes us.
            self.waiters.fetch_add(1, Ordering::SeqCst);
            // The SeqCst pair with `reader_left`.
            seqcst_pair();
            let mut g = lock(&self.wake_lock);
            while !ready(slot) {
                g = self
                    .wake
                    .wait_timeout(g, Duration::from_millis(10))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                if start.elapsed() > Duration::from_secs(1) && !ready(slot) {
                    log::warn!("invalidation waits for a reader online for more than 1 s");
                }
            }
            drop(g);
            self.waiters.fetch_sub(1, Ordering::SeqCst);
        }
        fence(Ordering::SeqCst);
        target
    }

    /// The current generation (changes with every grace period).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Grace periods completed so far.
    pub fn grace_periods(&self) -> u64 {
        self.grace_periods.load(Ordering::Relaxed)
    }

    /// The range generation `gen` removed (`first > last`: nothing), if it
    /// is still in the log; `None` means "unknown: assume everything".
    pub(crate) fn removed_in(&self, gen: u64) -> Option<(u64, u64)> {
        let slot = &self.log[gen as usize % LOG_LEN];
        if slot.gen.load(Ordering::Acquire) != gen {
            return None;
        }
        let r = (
            slot.first.load(Ordering::Relaxed),
            slot.last.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        (slot.gen.load(Ordering::Relaxed) == gen).then_some(r)
    }

    /// The number of generations [`AddressSpace::removed_in`] remembers.
    pub(crate) const LOG_LEN: u64 = LOG_LEN as u64;

    /// Registers a new reader (one per queue).
    pub fn reader(self: &Arc<Self>) -> crate::Reader {
        let slot = Arc::new(ReaderSlot::default());
        lock(&self.readers).push(slot.clone());
        crate::Reader::new(self.clone(), slot)
    }

    /// Called by a reader that went offline: wakes blocked invalidators.
    /// The SeqCst pair (slot store by the reader, `waiters` load here;
    /// `waiters` increment, slot load by the invalidator) means one of the
    /// two always sees the other (under loom, with a SeqCst fence on each
    /// side: [`seqcst_pair`]).
    #[inline]
    pub(crate) fn reader_left(&self) {
        seqcst_pair();
        if self.waiters.load(Ordering::SeqCst) != 0 {
            let _g = lock(&self.wake_lock);
            self.wake.notify_all();
        }
    }

    pub(crate) fn unregister(&self, slot: &Arc<ReaderSlot>) {
        lock(&self.readers).retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// Registered reader slots (test-only).
    #[cfg(test)]
    pub(crate) fn reader_count(&self) -> usize {
        lock(&self.readers).len()
    }

    /// The published root. Only for online readers: valid until they go
    /// offline.
    #[inline]
    pub(crate) fn root_ptr(&self) -> *const Node {
        self.root.load(Ordering::Acquire)
    }

    #[inline]
    pub(crate) fn generation_ref(&self) -> &AtomicU64 {
        &self.generation
    }

    #[inline]
    pub(crate) fn generation_relaxed(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Test-only: make edits return without waiting for holds, breaking
    /// the promise for requests in flight on purpose.
    #[cfg(test)]
    pub(crate) fn set_skip_hold_wait_for_test(&self, skip: bool) {
        self.skip_hold_wait.store(skip, Ordering::Relaxed);
    }

    /// Test-only: make grace periods return at once, breaking the promise
    /// on purpose (see the negative stress test).
    #[cfg(test)]
    pub(crate) fn set_skip_quiescence_for_test(&self, skip: bool) {
        self.skip_quiescence.store(skip, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    use std::thread;

    use vm_memory::Permissions;

    use super::*;
    use crate::mem::MemObject;
    use crate::Fault;

    const PAGE: u64 = 4096;
    const SENTINEL: u64 = 0x5e47_1e15_dead_beef;

    fn map(s: &AddressSpace, iova: u64, m: &Arc<MemObject>, off: u64) {
        s.edit(|t| {
            t.insert(Extent::new(
                iova,
                iova + PAGE - 1,
                Permissions::ReadWrite,
                m.clone(),
                off,
            ));
            Ok::<_, ()>(())
        })
        .unwrap();
    }

    fn unmap(s: &AddressSpace, iova: u64) {
        s.edit(|t| {
            t.remove(iova);
            Ok::<_, ()>(())
        })
        .unwrap();
    }

    fn read_u64(m: &MemObject, off: u64) -> u64 {
        // SAFETY: off + 8 lies inside m (callers use page offsets < len).
        unsafe { std::ptr::read_volatile(m.host_base().add(off as usize).cast::<u64>()) }
    }

    fn write_u64(p: *mut u8, v: u64) {
        // SAFETY: p comes from a translation of 8 bytes (or from a page of
        // a MemObject the test holds), so 8 bytes are mapped.
        unsafe { std::ptr::write_volatile(p.cast::<u64>(), v) }
    }

    #[test]
    fn translate_hits_after_first_miss_and_flushes_on_unmap() {
        let m = Arc::new(MemObject::anonymous(1 << 20).unwrap());
        let s = AddressSpace::new();
        map(&s, 0x10000, &m, 0x3000);
        let mut r = s.reader();
        {
            let sess = r.enter();
            let a = sess.translate(0x10010, 16, Permissions::Read).unwrap();
            let b = sess.translate(0x10020, 16, Permissions::Write).unwrap();
            assert_eq!(a[0].ptr as usize, m.host_base() as usize + 0x3010);
            assert_eq!(b[0].ptr as usize, m.host_base() as usize + 0x3020);
            assert!(sess.probe(0x10000, PAGE, Permissions::ReadWrite).is_some());
        }
        assert_eq!(r.stats().hits, 1);
        unmap(&s, 0x10000);
        let sess = r.enter();
        assert!(sess.probe(0x10000, 1, Permissions::Read).is_none());
        assert_eq!(
            sess.translate(0x10000, 1, Permissions::Read),
            Err(Fault::Unmapped { iova: 0x10000 })
        );
    }

    /// An unmap drops only the cache entries it covers: another mapping
    /// cached before still hits afterwards.
    #[test]
    fn unmap_keeps_the_cache_entries_it_does_not_cover() {
        let m = Arc::new(MemObject::anonymous(1 << 20).unwrap());
        let s = AddressSpace::new();
        map(&s, 0x10000, &m, 0x3000);
        map(&s, 0x20000, &m, 0x5000);
        let mut r = s.reader();
        {
            let sess = r.enter();
            sess.translate(0x10000, 8, Permissions::Read).unwrap();
            sess.translate(0x20000, 8, Permissions::Read).unwrap();
        }
        unmap(&s, 0x10000);
        let sess = r.enter();
        assert!(sess.probe(0x20000, 8, Permissions::Read).is_some());
        assert!(sess.probe(0x10000, 8, Permissions::Read).is_none());
        assert_eq!(
            sess.translate(0x10000, 8, Permissions::Read),
            Err(Fault::Unmapped { iova: 0x10000 })
        );
        drop(sess);
        assert_eq!((r.stats().partial_flushes, r.stats().flushes), (1, 1));
    }

    /// An UPDATE replacing the middle of a cached extent: the old entry is
    /// dropped, so neither the replaced nor the kept parts use it again.
    #[test]
    fn replacing_part_of_a_cached_extent_drops_the_entry() {
        let m = Arc::new(MemObject::anonymous(1 << 20).unwrap());
        let s = AddressSpace::new();
        s.iotlb_update(0x1000, 0x3000, &m, 0, Permissions::ReadWrite)
            .unwrap();
        let mut r = s.reader();
        {
            let sess = r.enter();
            for iova in [0x1800u64, 0x2800, 0x3800] {
                sess.translate(iova, 8, Permissions::Read).unwrap();
            }
        }
        s.iotlb_update(0x2000, 0x1000, &m, 0x8000, Permissions::ReadWrite)
            .unwrap();
        let sess = r.enter();
        let host = |iova| sess.translate(iova, 8, Permissions::Read).unwrap()[0].ptr as usize;
        let base = m.host_base() as usize;
        assert_eq!(host(0x2800), base + 0x8800);
        assert_eq!(host(0x1800), base + 0x0800);
        assert_eq!(host(0x3800), base + 0x2800);
    }

    /// `removed_since` answers from the invalidation log: removals elsewhere
    /// do not touch a range, an overlapping one (or an UPDATE replacing part
    /// of it) does, and a gap longer than the log is assumed to.
    #[test]
    fn removed_since_reads_the_invalidation_log() {
        let m = Arc::new(MemObject::anonymous(1 << 20).unwrap());
        let s = AddressSpace::new();
        map(&s, 0x10000, &m, 0);
        let ring = [(0x10000u64, 0x10fffu64)];
        let mut r = s.reader();
        let g0 = r.enter().generation();
        assert!(!r.enter().removed_since(g0, &ring));
        for _ in 0..3 {
            map(&s, 0x90000, &m, 0x1000);
            unmap(&s, 0x90000);
        }
        {
            let sess = r.enter();
            assert!(sess.generation() > g0);
            assert!(!sess.removed_since(g0, &ring));
            // Adjacent ranges are not overlapping ones.
            assert!(!sess.removed_since(g0, &[(0x8f000, 0x8ffff), (0x91000, 0x91fff)]));
            assert!(sess.removed_since(g0, &[(0x90800, 0x90800)]));
            // Unknown generations are assumed to have removed everything.
            assert!(sess.removed_since(0, &ring));
            assert!(sess.removed_since(sess.generation() + 1, &ring));
        }
        let g1 = r.enter().generation();
        s.iotlb_update(0x10800, 0x100, &m, 0x8000, Permissions::ReadWrite)
            .unwrap();
        assert!(r.enter().removed_since(g1, &ring));
        // A queue depth's worth of removals elsewhere (more than the front
        // cache reads) is still known not to touch the ring.
        let g2 = r.enter().generation();
        for _ in 0..64 {
            map(&s, 0x90000, &m, 0);
            unmap(&s, 0x90000);
        }
        assert!(!r.enter().removed_since(g2, &ring));
        let g3 = r.enter().generation();
        for _ in 0..=AddressSpace::LOG_LEN {
            map(&s, 0x90000, &m, 0);
            unmap(&s, 0x90000);
        }
        assert!(r.enter().removed_since(g3, &ring));
    }

    /// More generations than the front cache reads from the log between two
    /// sessions: the whole cache goes.
    #[test]
    fn a_gap_longer_than_the_partial_flush_flushes_the_whole_cache() {
        let m = Arc::new(MemObject::anonymous(1 << 20).unwrap());
        let s = AddressSpace::new();
        map(&s, 0x10000, &m, 0);
        let mut r = s.reader();
        r.enter().translate(0x10000, 8, Permissions::Read).unwrap();
        for _ in 0..=crate::translate::PARTIAL_FLUSH_GENS {
            map(&s, 0x90000, &m, 0);
            unmap(&s, 0x90000);
        }
        let sess = r.enter();
        assert!(sess.probe(0x10000, 8, Permissions::Read).is_none());
        assert!(sess.translate(0x10000, 8, Permissions::Read).is_ok());
        drop(sess);
        assert_eq!((r.stats().partial_flushes, r.stats().flushes), (0, 2));
    }

    #[test]
    fn buffer_spanning_mappings_yields_several_slices_and_names_the_hole() {
        let m = Arc::new(MemObject::anonymous(1 << 20).unwrap());
        let s = AddressSpace::new();
        map(&s, 0x10000, &m, 0x8000);
        map(&s, 0x11000, &m, 0x2000);
        let mut r = s.reader();
        let sess = r.enter();
        let v = sess.translate(0x10ff0, 0x20, Permissions::Read).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].ptr as usize - m.host_base() as usize, v[0].len),
            (0x8ff0, 0x10)
        );
        assert_eq!(
            (v[1].ptr as usize - m.host_base() as usize, v[1].len),
            (0x2000, 0x10)
        );
        assert_eq!(
            sess.translate(0x11ff0, 0x20, Permissions::Read),
            Err(Fault::Unmapped { iova: 0x12000 })
        );
        assert_eq!(
            sess.translate(u64::MAX, 2, Permissions::Read),
            Err(Fault::Overflow { iova: u64::MAX })
        );
    }

    #[test]
    fn write_to_read_only_mapping_is_denied() {
        let m = Arc::new(MemObject::anonymous(1 << 16).unwrap());
        let s = AddressSpace::new();
        s.iotlb_update(0x1000, 0x2000, &m, 0, Permissions::ReadWrite)
            .unwrap();
        s.iotlb_update(0x2000, 0x1000, &m, 0, Permissions::Read)
            .unwrap();
        let mut r = s.reader();
        let sess = r.enter();
        assert!(sess.translate(0x1000, 0x2000, Permissions::Read).is_ok());
        assert_eq!(
            sess.translate(0x1800, 0x1000, Permissions::Write),
            Err(Fault::Denied {
                iova: 0x2000,
                access: Permissions::Write
            })
        );
    }

    /// One reader translates, is parked before it writes, and is released
    /// only after the unmap returned (or could have returned). Returns
    /// whether the sentinel written after the unmap survived.
    fn parked_reader_scenario(skip_quiescence: bool) -> bool {
        let m = Arc::new(MemObject::anonymous(1 << 16).unwrap());
        let s = AddressSpace::new();
        s.set_skip_quiescence_for_test(skip_quiescence);
        map(&s, 0x10000, &m, 0x1000);
        let mut r = s.reader();
        let (translated_tx, translated_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let reader = thread::spawn(move || {
            let sess = r.enter();
            let p = sess.translate(0x10000, 8, Permissions::Write).unwrap()[0].ptr as usize;
            translated_tx.send(()).unwrap();
            // The hook: parked between translate and write.
            go_rx.recv().unwrap();
            write_u64(p as *mut u8, 1);
            drop(sess);
        });
        translated_rx.recv().unwrap();
        let unmapped = Arc::new(AtomicBool::new(false));
        let mut unmapper = Some({
            let (s, unmapped) = (s.clone(), unmapped.clone());
            thread::spawn(move || {
                unmap(&s, 0x10000);
                unmapped.store(true, Ordering::SeqCst);
            })
        });
        if skip_quiescence {
            // Without quiescence the unmap returns while the reader is parked.
            unmapper.take().unwrap().join().unwrap();
        } else {
            // With it, the unmap cannot return while the reader is parked.
            thread::sleep(Duration::from_millis(20));
            assert!(
                !unmapped.load(Ordering::SeqCst),
                "unmap returned under a reader"
            );
        }
        if unmapped.load(Ordering::SeqCst) {
            write_u64(m.host_base().wrapping_add(0x1000), SENTINEL);
        }
        go_tx.send(()).unwrap();
        reader.join().unwrap();
        if let Some(u) = unmapper {
            u.join().unwrap();
            write_u64(m.host_base().wrapping_add(0x1000), SENTINEL);
        }
        read_u64(&m, 0x1000) == SENTINEL
    }

    #[test]
    fn promise_holds_for_a_reader_parked_between_translate_and_write() {
        assert!(parked_reader_scenario(false));
    }

    /// The negative test: without the grace period's wait, the parked reader
    /// writes into memory after the unmap returned. Kept to prove that the
    /// positive test above can fail.
    #[test]
    fn skipping_quiescence_breaks_the_promise() {
        assert!(!parked_reader_scenario(true));
    }

    /// Readers translate and write through their caches while the main
    /// thread maps and unmaps pages; after each unmap returns its page gets
    /// a sentinel that no reader may overwrite.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "400 grace periods with 2 reader threads: too slow under Miri (the loom model covers the grace period)"
    )]
    fn stress_no_write_after_unmap_returns() {
        const PAGES: u64 = 64;
        const ROUNDS: u64 = 400;
        let m = Arc::new(MemObject::anonymous((PAGES * PAGE) as usize).unwrap());
        let s = AddressSpace::new();
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..2)
            .map(|t| {
                let mut r = s.reader();
                let (stop, started) = (stop.clone(), started.clone());
                thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let sess = r.enter();
                        for k in 0..8u64 {
                            let iova = 0x100000 + ((n + k + t) % 4) * PAGE;
                            if let Ok(v) = sess.translate(iova + 64, 8, Permissions::Write) {
                                std::hint::spin_loop();
                                write_u64(v[0].ptr, n);
                            }
                        }
                        drop(sess);
                        if n == 0 {
                            started.fetch_add(1, Ordering::SeqCst);
                        }
                        n += 1;
                    }
                    r.stats()
                })
            })
            .collect();
        // Both readers must have run a session before the churn starts.
        let deadline = Instant::now() + Duration::from_secs(10);
        while started.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            thread::yield_now();
        }
        for round in 0..ROUNDS {
            let slot = 0x100000 + (round % 4) * PAGE;
            let page = round % PAGES;
            map(&s, slot, &m, page * PAGE);
            thread::yield_now();
            unmap(&s, slot);
            write_u64(
                m.host_base().wrapping_add((page * PAGE + 64) as usize),
                SENTINEL,
            );
            if round >= PAGES {
                // A page re-mapped later may legitimately be written again;
                // check pages before their reuse.
                let prev = (round + 1) % PAGES;
                assert_eq!(
                    read_u64(&m, prev * PAGE + 64),
                    SENTINEL,
                    "page {prev} written after unmap"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        let stats: Vec<_> = readers.into_iter().map(|h| h.join().unwrap()).collect();
        for p in 0..PAGES {
            assert_eq!(
                read_u64(&m, p * PAGE + 64),
                SENTINEL,
                "page {p} written after unmap"
            );
        }
        // Each reader ran sessions during the churn (a reader that never
        // translated would prove nothing).
        assert!(stats.iter().all(|st| st.translations > 0), "{stats:?}");
        assert!(s.grace_periods() >= ROUNDS);
    }
}
