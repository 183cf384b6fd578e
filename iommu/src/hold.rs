//! Holds: the translated ranges of a request in flight, kept until it
//! completes, and what an edit waits for.
//!
//! A grace period ([`crate::space`]) only covers what a reader does inside a
//! [`Session`](crate::Session). An asynchronous I/O (io_uring) on guest pages
//! outlives the session that translated its buffers, so the request
//! *holds* the ranges it translated until the I/O completed, and an edit
//! that removes a translation overlapping a hold waits for its release.
//!
//! # Invariants
//!
//! - **Who registers.** The reader that translated, inside the same
//!   [`Session`](crate::Session), before that session ends:
//!   [`Session::hold`](crate::Session::hold). The hold records the session's
//!   generation (the one the reader announced when it went online), which is
//!   at most the generation of any translation the session made.
//! - **Who releases.** Whoever completes the request:
//!   [`Reader::release`](crate::Reader::release) on the reader's own thread
//!   (online or not), or a [`HoldReleaser`] (`Send + Sync + Clone`) from
//!   any thread, for engines whose completions are reaped elsewhere. A
//!   release takes only its reader's hold lock and, if an edit waits, the
//!   wake lock: never the writer lock, never a lock an edit holds while
//!   it waits for anything but holds. A thread that still has holds to
//!   release may therefore not call [`AddressSpace::edit`] on the same
//!   space (it would wait for itself).
//! - **When the writer looks.** [`AddressSpace::edit`] publishes, runs its
//!   grace period for generation `T`, drops the writer lock, and only then
//!   reads every reader's holds. It waits for those taken in a generation
//!   before `T` that overlap an extent the edit removed (exactly: the hull
//!   of the removed extents is only a quick filter), and returns when all
//!   of them are released. Only after that are the removed extents (and so
//!   possibly their memory mapping) dropped.
//! - **Why that is enough.** A session that could see a removed
//!   translation went online before `T` was published. The grace period
//!   waited until every such session had ended; each stored its holds
//!   (under its reader's hold lock) before it ended, so the writer, which
//!   takes each hold lock after the grace period, sees them. A session that
//!   went online after the publish announced `T` or later, or (in the race
//!   where it loaded the generation just before the bump) sees only the new
//!   tree: either way it cannot hold a removed translation, and the writer
//!   ignores holds registered after its first look. So the wait is bounded
//!   by the requests in flight at the edit: no livelock from new requests.
//! - **Cheap when nothing overlaps.** An edit that overlaps no earlier hold
//!   costs one uncontended lock per reader with holds and no sleep. A hold
//!   costs the reader one uncontended lock to register and one to release.
//!
//! A [`Reader`](crate::Reader) dropped with holds outstanding stays
//! registered (offline) until its last hold is released through a
//! [`HoldReleaser`], so its holds stay visible to edits.

use std::cell::OnceCell;
use std::sync::{Arc, Mutex};

use smallvec::SmallVec;

use crate::space::{lock, AddressSpace, ReaderSlot};
use crate::tree::Extent;

/// An inclusive range `first..=last` in the space's key domain.
pub type HoldRange = (u64, u64);

/// The inclusive range of `len` bytes at `start`: `None` if `len == 0` or
/// the range would wrap around the end of the 64-bit space.
#[inline]
pub fn hold_range(start: u64, len: u64) -> Option<HoldRange> {
    Some((start, start.checked_add(len.checked_sub(1)?)?))
}

/// A registered hold: give it back to [`Reader::release`](crate::Reader::release)
/// (or a [`HoldReleaser`] of the same reader) when the request completed.
/// Not `Clone`: a hold is released once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a hold must be released, or edits overlapping it wait forever"]
pub struct HoldId {
    /// The reader's slot (its address), to catch a release on the wrong
    /// reader.
    owner: usize,
    index: u32,
    seq: u64,
}

#[derive(Debug)]
struct Entry {
    /// 0: free.
    seq: u64,
    gen: u64,
    /// Hull of `ranges` (`first > last`: none).
    first: u64,
    last: u64,
    ranges: SmallVec<[HoldRange; 4]>,
}

/// One reader's holds: a slab of entries, free ones reused.
#[derive(Debug, Default)]
pub(crate) struct HoldTable {
    entries: Vec<Entry>,
    free: Vec<u32>,
    live: usize,
    next_seq: u64,
    /// The reader was dropped while holds were outstanding: the last
    /// release unregisters its slot.
    orphaned: bool,
}

/// The hold table on its own cache line (apart from the reader's epoch,
/// which grace periods poll).
#[repr(align(64))]
#[derive(Debug, Default)]
pub(crate) struct HoldCell(pub(crate) Mutex<HoldTable>);

/// A hold of an entry, as the writer remembers it while it waits.
pub(crate) type HoldKey = (u32, u64);

impl HoldTable {
    fn insert(&mut self, gen: u64, ranges: &[HoldRange]) -> (u32, u64) {
        let (mut first, mut last) = (u64::MAX, 0u64);
        let mut kept: SmallVec<[HoldRange; 4]> = SmallVec::new();
        for &(f, l) in ranges {
            debug_assert!(f <= l, "hold range {f:#x}..={l:#x} is empty");
            if f <= l {
                first = first.min(f);
                last = last.max(l);
                kept.push((f, l));
            }
        }
        if kept.is_empty() {
            (first, last) = (1, 0);
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        let e = Entry {
            seq,
            gen,
            first,
            last,
            ranges: kept,
        };
        self.live += 1;
        let index = match self.free.pop() {
            Some(i) => {
                self.entries[i as usize] = e;
                i
            }
            None => {
                let i = u32::try_from(self.entries.len()).expect("fewer than 2^32 holds");
                self.entries.push(e);
                i
            }
        };
        (index, seq)
    }

    fn remove(&mut self, index: u32, seq: u64) -> bool {
        match self.entries.get_mut(index as usize) {
            Some(e) if e.seq == seq && seq != 0 => {
                e.seq = 0;
                e.ranges.clear();
                self.free.push(index);
                self.live -= 1;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn is_live(&self, (index, seq): HoldKey) -> bool {
        self.entries
            .get(index as usize)
            .is_some_and(|e| e.seq == seq && seq != 0)
    }

    /// Pushes the holds taken before generation `target` that overlap
    /// `removed`.
    pub(crate) fn overlapping(
        &self,
        target: u64,
        removed: &Removed<'_>,
        out: &mut SmallVec<[HoldKey; 4]>,
    ) {
        if self.live == 0 {
            return;
        }
        for (i, e) in self.entries.iter().enumerate() {
            if e.seq != 0
                && e.gen < target
                && removed.hull_overlaps(e.first, e.last)
                && e.ranges.iter().any(|&(f, l)| removed.overlaps(f, l))
            {
                // `entries.len()` fits u32 (checked at insert).
                out.push((i as u32, e.seq));
            }
        }
    }
}

/// What an edit removed: the hull for a quick filter, and the exact
/// extents, sorted and merged on first use (a clear may remove 2^18).
pub(crate) struct Removed<'a> {
    extents: &'a [Extent],
    hull: HoldRange,
    merged: OnceCell<Vec<HoldRange>>,
}

impl<'a> Removed<'a> {
    /// `None` if nothing was removed.
    pub(crate) fn new(extents: &'a [Extent]) -> Option<Removed<'a>> {
        let first = extents.iter().map(|e| e.start).min()?;
        let last = extents.iter().map(|e| e.last).max()?;
        Some(Removed {
            extents,
            hull: (first, last),
            merged: OnceCell::new(),
        })
    }

    pub(crate) fn hull(&self) -> HoldRange {
        self.hull
    }

    #[inline]
    fn hull_overlaps(&self, first: u64, last: u64) -> bool {
        first <= last && first <= self.hull.1 && self.hull.0 <= last
    }

    fn merged(&self) -> &[HoldRange] {
        self.merged.get_or_init(|| {
            let mut v: Vec<HoldRange> = self.extents.iter().map(|e| (e.start, e.last)).collect();
            // Already sorted when they came from a clear or an invalidate.
            v.sort_unstable();
            let mut out: Vec<HoldRange> = Vec::with_capacity(v.len());
            for (f, l) in v {
                match out.last_mut() {
                    // Overlapping (one edit may remove what it inserted).
                    Some(p) if f <= p.1 => p.1 = p.1.max(l),
                    _ => out.push((f, l)),
                }
            }
            out
        })
    }

    /// Whether `first..=last` overlaps a removed extent.
    pub(crate) fn overlaps(&self, first: u64, last: u64) -> bool {
        if !self.hull_overlaps(first, last) {
            return false;
        }
        let m = self.merged();
        // Disjoint and sorted: the first range ending at or after `first`
        // is the only candidate.
        let i = m.partition_point(|&(_, l)| l < first);
        i < m.len() && m[i].0 <= last
    }
}

impl ReaderSlot {
    pub(crate) fn hold(&self, gen: u64, ranges: &[HoldRange]) -> HoldId {
        let (index, seq) = lock(&self.holds.0).insert(gen, ranges);
        HoldId {
            owner: self as *const ReaderSlot as usize,
            index,
            seq,
        }
    }

    /// Releases `id`, wakes a waiting edit, and unregisters the slot if its
    /// reader is gone and this was its last hold.
    pub(crate) fn release(self: &Arc<Self>, space: &AddressSpace, id: HoldId) {
        assert_eq!(
            id.owner,
            Arc::as_ptr(self) as usize,
            "hold released on a reader that did not take it"
        );
        let unregister = {
            let mut t = lock(&self.holds.0);
            let found = t.remove(id.index, id.seq);
            debug_assert!(found, "hold {id:?} released twice");
            t.orphaned && t.live == 0
        };
        space.hold_released();
        if unregister {
            space.unregister(self);
        }
    }

    pub(crate) fn holds(&self) -> usize {
        lock(&self.holds.0).live
    }

    /// Called when the reader is dropped: whether it may unregister now
    /// (no hold outstanding); otherwise the last release does.
    pub(crate) fn orphan(&self) -> bool {
        let mut t = lock(&self.holds.0);
        if t.live == 0 {
            true
        } else {
            t.orphaned = true;
            false
        }
    }
}

/// Releases holds of one reader from any thread (an I/O engine reaping
/// completions away from the queue's thread). Get one with
/// [`Reader::hold_releaser`](crate::Reader::hold_releaser).
#[derive(Clone, Debug)]
pub struct HoldReleaser {
    pub(crate) space: Arc<AddressSpace>,
    pub(crate) slot: Arc<ReaderSlot>,
}

impl HoldReleaser {
    /// Releases a hold taken by this releaser's reader. Never blocks on an
    /// edit. Panics if `id` belongs to another reader.
    pub fn release(&self, id: HoldId) {
        self.slot.release(&self.space, id);
    }

    /// Holds of the reader still outstanding.
    pub fn holds(&self) -> usize {
        self.slot.holds()
    }
}
