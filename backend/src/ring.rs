//! Ring translations pinned per queue, as Linux vhost's `meta_iotlb`.
//!
//! Under a vIOMMU the descriptor table, avail ring and used ring are IOVAs.
//! virtio-queue hides a failed access to the avail or used ring (it just
//! stops, or fails the queue), so the transport translates the three rings
//! itself before it processes a queue, asking the frontend for the missing
//! pages with the exact access (descriptor table and avail ring read, used
//! ring written), and keeps the host slices ([`RingPins`]).
//!
//! Pins are checked when the session's generation changes (every removal of
//! a translation bumps it): they are redone only when the invalidation log
//! says a generation since removed something under a ring (an INVALIDATE
//! covering a ring page, an UPDATE replacing one, a flush), or no longer
//! remembers; an INVALIDATE of a data page leaves them alone
//! ([`Session::removed_since`]). Within one session they stay valid even if
//! an invalidation runs meanwhile: its ack waits for the session to end,
//! which is the promise.
//!
//! [`RingView`] is the `GuestMemory` the device model walks, for both
//! doors: every access tries the session's front cache first (a few
//! instructions: the data buffers, and the rings while their pages stay
//! cached), then the pins (vhost-user under a vIOMMU: a ring whose cache
//! entry a data page took), then the session's slow path. It is also where
//! a request in flight holds its translated ranges ([`InflightMemory`]):
//! the hold lives in the reader's address space, so an invalidation, unmap
//! or memory-table change that overlaps it waits for the request to
//! complete.

use vcdev_device_model::blk::{InflightMemory, Release};
use vcdev_iommu::{Fault, HoldId, HoldReleaser, HostSlice, Session, SliceIter};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryResult, Permissions};

use crate::vhost_user::iotlb::allows;

/// The byte sizes of the split rings (virtio 1.2 section 2.7): descriptor
/// table, avail ring (with used_event) and used ring (with avail_event).
pub fn ring_sizes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

/// One pinned ring.
#[derive(Debug, Default)]
struct Pin {
    iova: u64,
    len: u64,
    access: Option<Permissions>,
    /// (first IOVA, host slice) of each piece, in IOVA order.
    pieces: Vec<(u64, HostSlice)>,
}

impl Pin {
    /// Puts the piece that holds `addr` back in `s`'s front cache (see
    /// [`Session::refill`]).
    fn refill(&self, s: &Session<'_>, addr: u64) {
        let Some(access) = self.access else {
            return;
        };
        let piece = self
            .pieces
            .iter()
            .find(|(iova, h)| addr.wrapping_sub(*iova) < h.len as u64);
        if let Some(&(iova, h)) = piece {
            // SAFETY: the caller found this pin valid for `s`'s generation
            // (`RingPins::refresh`): each piece lies in one extent that this
            // generation publishes and that allows the pin's access.
            unsafe { s.refill(addr, iova, iova + (h.len as u64 - 1), h.ptr, access) };
        }
    }

    /// Whether `addr..addr+count` lies in the pin and `access` is allowed.
    /// Wrapping offsets: a ring may end at 2^64 (its last byte u64::MAX),
    /// and an `addr` below the pin wraps past its length.
    #[inline(always)]
    fn covers(&self, addr: u64, count: u64, access: Permissions) -> bool {
        let off = addr.wrapping_sub(self.iova);
        count != 0
            && off < self.len
            && count <= self.len - off
            && self.access.is_some_and(|have| allows(have, access))
    }

    fn pin(
        &mut self,
        s: &Session<'_>,
        iova: u64,
        len: u64,
        access: Permissions,
    ) -> Result<(), Fault> {
        self.access = None;
        self.pieces.clear();
        let mut at = iova;
        let pieces = &mut self.pieces;
        s.translate_into(iova, len, access, |h| {
            pieces.push((at, h));
            at = at.wrapping_add(h.len as u64);
        })?;
        self.iova = iova;
        self.len = len;
        self.access = Some(access);
        Ok(())
    }

    /// The slices of `addr..addr+count` (inside the pin), found as they
    /// are iterated.
    fn slices(&self, addr: u64, count: u64) -> Option<PinIter<'_>> {
        // Inclusive ends, as in `covers`: nothing overflows at 2^64.
        let last = addr.checked_add(count.checked_sub(1)?)?;
        Some(PinIter {
            pieces: &self.pieces,
            addr,
            last,
        })
    }
}

/// The three rings of a queue, translated for one generation.
#[derive(Debug, Default)]
pub struct RingPins {
    pins: [Pin; 3],
    /// The ring addresses and queue size pinned.
    rings: Option<((u64, u64, u64), u16)>,
    generation: Option<u64>,
}

// SAFETY: the host pointers are plain data until dereferenced, which only
// the owning queue worker does, inside one of its sessions, after checking
// that the pins were made for that session's generation (so the memory they
// point into is still mapped); moving them between threads is harmless.
unsafe impl Send for RingPins {}

impl RingPins {
    /// Forgets the pins (the queue's addresses changed).
    pub fn reset(&mut self) {
        self.rings = None;
        self.generation = None;
    }

    /// Makes sure the rings at `desc`, `avail`, `used` of a queue of `size`
    /// are pinned for the session's generation. Returns whether they were
    /// (re)translated, or the fault to resolve first with the access the
    /// ring needs.
    pub fn refresh(
        &mut self,
        s: &Session<'_>,
        (desc, avail, used): (u64, u64, u64),
        size: u16,
    ) -> Result<bool, (Fault, Permissions)> {
        let g = s.generation();
        let same = self.rings == Some(((desc, avail, used), size));
        if same && self.generation == Some(g) {
            return Ok(false);
        }
        if let (true, Some(old)) = (same, self.generation) {
            // The generations since the pins were made removed nothing
            // under the rings (an INVALIDATE of a data page, say): the
            // extents the pins point into are still published, so the pins
            // stay valid for this generation too.
            if !s.removed_since(old, &self.ranges()) {
                self.generation = Some(g);
                return Ok(false);
            }
        }
        let (dl, al, ul) = ring_sizes(size);
        let want = [
            (desc, dl, Permissions::Read),
            (avail, al, Permissions::Read),
            (used, ul, Permissions::Write),
        ];
        self.rings = None;
        self.generation = None;
        for (pin, (iova, len, access)) in self.pins.iter_mut().zip(want) {
            pin.pin(s, iova, len, access).map_err(|f| (f, access))?;
        }
        self.rings = Some(((desc, avail, used), size));
        self.generation = Some(g);
        Ok(true)
    }

    /// The inclusive IOVA ranges of the pinned rings (each piece lies in
    /// its ring's range, and a removed extent that held a piece overlaps
    /// it).
    fn ranges(&self) -> [(u64, u64); 3] {
        self.pins.each_ref().map(|p| {
            let last = p.iova.saturating_add(p.len.saturating_sub(1));
            (p.iova, last)
        })
    }
}

/// The memory a queue is processed through: pinned rings, then the session.
pub struct RingView<'a, 's> {
    session: &'a Session<'s>,
    pins: Option<&'a RingPins>,
    releaser: &'a HoldReleaser,
}

impl<'a, 's> RingView<'a, 's> {
    /// A view of `session`, serving rings from `pins` (if any); holds are
    /// released through `releaser`, the session's reader's.
    pub fn new(
        session: &'a Session<'s>,
        pins: Option<&'a RingPins>,
        releaser: &'a HoldReleaser,
    ) -> Self {
        RingView {
            session,
            pins,
            releaser,
        }
    }

    /// The session (to check a translation while deciding about a fault).
    pub fn session(&self) -> &Session<'s> {
        self.session
    }

    /// [`GuestMemory::get_slices`] past the front cache: the pins (a ring
    /// whose page the cache lost), then the session's slow path. Out of
    /// line, so that the accesses vm-memory inlines stay small.
    #[inline(never)]
    fn uncached(
        &self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<SliceIter<'_>> {
        if let Some((pin, pieces)) = self
            .pin_of(addr.0, count, access)
            .and_then(|pin| Some((pin, pin.slices(addr.0, count as u64)?)))
        {
            pin.refill(self.session, addr.0);
            // SAFETY: the pins were made in the session this view borrows,
            // or in an earlier one whose extents this session's generation
            // still publishes (`RingPins::refresh`), so their memory stays
            // mapped while the session is online; each piece lies in one
            // extent.
            if let Some(it) = unsafe { self.session.slice_iter(pieces) } {
                return Ok(it);
            }
        }
        self.session.slices_slow(addr, count, access)
    }

    /// The pin that serves `addr..addr+count` for `access`, if any.
    #[inline(always)]
    fn pin_of(&self, addr: u64, count: usize, access: Permissions) -> Option<&'a Pin> {
        let count = count as u64;
        self.pins?
            .pins
            .iter()
            .find(|p| p.covers(addr, count, access))
    }
}

/// The pinned slices of `addr..=last`: the parts of the pieces left that
/// overlap it. A few words, not the slices themselves: vm-memory's helpers
/// move the iterator by value several times per access.
#[derive(Clone, Copy, Debug)]
pub struct PinIter<'a> {
    pieces: &'a [(u64, HostSlice)],
    addr: u64,
    last: u64,
}

impl Iterator for PinIter<'_> {
    type Item = HostSlice;

    #[inline]
    fn next(&mut self) -> Option<HostSlice> {
        while let Some((&(start, h), rest)) = self.pieces.split_first() {
            self.pieces = rest;
            let plen = u64::try_from(h.len).ok()?;
            let Some(plast) = plen.checked_sub(1).and_then(|l| start.checked_add(l)) else {
                continue;
            };
            if plast < self.addr || start > self.last {
                continue;
            }
            let from = self.addr.max(start);
            let to = self.last.min(plast);
            return Some(HostSlice {
                ptr: h.ptr.wrapping_add(usize::try_from(from - start).ok()?),
                len: usize::try_from(to - from).ok()?.checked_add(1)?,
            });
        }
        None
    }
}

impl GuestMemory for RingView<'_, '_> {
    type PhysicalMemory = vm_memory::GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        self.pin_of(addr.0, count, access).is_some()
            || self.session.check_range(addr, count, access)
    }

    // Always inlined, with `Session::cached`: into vm-memory's generic
    // helpers (load, store, read_slice...), whose iterator handling then
    // folds away (with `SliceIter::stop_on_error`). About 450 instructions
    // per 4K request at QD1 (callgrind; LLVM inlined neither on its own).
    // The rest is out of line (`uncached`), so that the inlined code stays
    // small.
    #[inline(always)]
    fn get_slices<'b>(
        &'b self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'b, BS<'b, ()>>> {
        // The front cache first: every data buffer, and the rings while
        // their pages stay cached.
        if let Some(it) = self.session.cached(addr, count, access) {
            return Ok(it);
        }
        self.uncached(addr, count, access)
    }
}

/// A request's hold on its translated ranges, released (once) when it
/// completes, from whatever session or thread; also when dropped unreleased
/// (a worker that panicked), so that no invalidation waits for it forever.
#[derive(Debug)]
pub struct Held {
    id: Option<HoldId>,
    releaser: HoldReleaser,
}

impl Release for Held {
    fn release(self) {}
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.releaser.release(id);
        }
    }
}

// SAFETY: while the view lives its session is online, and an edit that
// removes a translation returns only after the grace period in which every
// online session ends; the session's hold is registered with the
// generation the session went online in, so a hold taken late in the
// session covers what it translated early. A hold is registered in the
// session's reader, in the address space
// the session translates through; every edit of that space that removes a
// translation overlapping it (IOTLB invalidate, unmap, memory-table change,
// disconnect) waits after its grace period until the hold is released
// (vcdev_iommu's hold invariants), and memory is unmapped only after such an
// edit returned. A reader dropped with holds outstanding stays registered
// until they are released through the releaser.
unsafe impl InflightMemory for RingView<'_, '_> {
    type Hold = Held;

    fn hold(&self, ranges: &[(u64, u64)]) -> Held {
        Held {
            id: Some(self.session.hold(ranges)),
            releaser: self.releaser.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vcdev_iommu::{AddressSpace, MemObject};
    use vm_memory::Bytes;

    use super::*;

    /// An INVALIDATE of a data page leaves the ring pins alone (the
    /// invalidation log says no ring was touched); one that covers a ring
    /// page, or an UPDATE replacing one, makes them be redone; a gap longer
    /// than the log too. A ring access served from the pins refills the
    /// front cache.
    #[test]
    fn only_invalidations_under_a_ring_redo_the_pins() {
        const PAGE: u64 = 4096;
        let space = AddressSpace::new();
        let mem = Arc::new(MemObject::anonymous(16 * 4096).unwrap());
        let map = |iova: u64, off: u64| {
            space
                .iotlb_update(iova, PAGE, &mem, off, Permissions::ReadWrite)
                .unwrap();
        };
        // Rings in pages 0 (descriptors), 1 (avail) and 2 (used); data at 8.
        for i in 0..3 {
            map(i * PAGE, i * PAGE);
        }
        let rings = (0, PAGE, 2 * PAGE);
        let mut reader = space.reader();
        let releaser = reader.hold_releaser();
        let mut pins = RingPins::default();
        assert_eq!(pins.refresh(&reader.enter(), rings, 64), Ok(true));
        for _ in 0..10 {
            map(8 * PAGE, 8 * PAGE);
            assert_eq!(space.iotlb_invalidate(8 * PAGE, PAGE), 1);
            let s = reader.enter();
            assert_eq!(pins.refresh(&s, rings, 64), Ok(false), "data page");
            // Still served from the pins, at the same host address.
            let view = RingView::new(&s, Some(&pins), &releaser);
            assert!(view.pin_of(PAGE, 2, Permissions::Read).is_some());
        }
        // The used ring's page: redone (and asked for, being unmapped).
        assert_eq!(space.iotlb_invalidate(2 * PAGE, PAGE), 1);
        let e = pins.refresh(&reader.enter(), rings, 64).unwrap_err();
        assert_eq!(e.1, Permissions::Write);
        map(2 * PAGE, 2 * PAGE);
        assert_eq!(pins.refresh(&reader.enter(), rings, 64), Ok(true));
        // An UPDATE replacing the descriptor page elsewhere: redone.
        map(0, 5 * PAGE);
        assert_eq!(pins.refresh(&reader.enter(), rings, 64), Ok(true));
        // Other addresses (a new queue layout): redone.
        assert_eq!(
            pins.refresh(&reader.enter(), (0, PAGE, 2 * PAGE + 64), 64),
            Ok(true)
        );
        assert_eq!(pins.refresh(&reader.enter(), rings, 64), Ok(true));
        // More generations than the front cache reads from the log (16) and
        // fewer than the log holds (256, a queue's burst of INVALIDATEs and
        // more): the pins stay; the cache lost the rings, and the pins' first
        // access of a ring puts its page back.
        for _ in 0..40 {
            map(8 * PAGE, 8 * PAGE);
            space.iotlb_invalidate(8 * PAGE, PAGE);
        }
        {
            let s = reader.enter();
            assert_eq!(pins.refresh(&s, rings, 64), Ok(false), "40 generations");
            assert!(s.probe(PAGE + 2, 2, Permissions::Read).is_none(), "flushed");
            let view = RingView::new(&s, Some(&pins), &releaser);
            let mut idx = [0u8; 2];
            view.read_slice(&mut idx, GuestAddress(PAGE + 2)).unwrap();
            assert!(
                s.probe(PAGE + 2, 2, Permissions::Read).is_some(),
                "refilled"
            );
            assert!(
                s.probe(PAGE + 2, 2, Permissions::Write).is_none(),
                "the pin's access only"
            );
        }
        // More generations than the log remembers: redone.
        for _ in 0..300 {
            map(8 * PAGE, 8 * PAGE);
            space.iotlb_invalidate(8 * PAGE, PAGE);
        }
        assert_eq!(pins.refresh(&reader.enter(), rings, 64), Ok(true));
    }

    /// The slice lengths `view` serves `addr..addr+count` with, from its
    /// pins (which must cover it).
    fn pinned(view: &RingView<'_, '_>, addr: u64, count: usize, access: Permissions) -> Vec<usize> {
        assert!(view.pin_of(addr, count, access).is_some(), "not pinned");
        view.get_slices(GuestAddress(addr), count, access)
            .unwrap()
            .map(|s| s.unwrap().len())
            .collect()
    }

    /// A ring over scattered pages: an access across a page boundary is
    /// served from the pins as two slices (found as the iterator goes),
    /// with the bytes the session sees; more pieces than the four the
    /// pins once served inline work too.
    #[test]
    fn a_pinned_access_across_pieces() {
        const PAGE: u64 = 4096;
        let space = AddressSpace::new();
        let mem = Arc::new(MemObject::anonymous(16 * 4096).unwrap());
        // IOVA page i -> host page (i * 5 + 3) % 16: nothing contiguous.
        vcdev_iommu::test_util::map_scattered(&space, &mem, 0, 10, |i| (i * 5 + 3) % 16);
        // 1024 entries: the descriptor table spans pages 0..=4 (five
        // pieces), the avail ring is in page 5, the used ring spans 6..=8.
        let rings = (PAGE / 2, 5 * PAGE, 6 * PAGE);
        let mut reader = space.reader();
        let releaser = reader.hold_releaser();
        let s = reader.enter();
        let mut pins = RingPins::default();
        assert_eq!(pins.refresh(&s, rings, 1024), Ok(true));
        let view = RingView::new(&s, Some(&pins), &releaser);
        let bytes: Vec<u8> = (0..32).collect();
        s.write_slice(&bytes, GuestAddress(PAGE - 16)).unwrap();
        assert_eq!(pinned(&view, PAGE - 16, 32, Permissions::Read), [16, 16]);
        let mut got = [0u8; 32];
        view.read_slice(&mut got, GuestAddress(PAGE - 16)).unwrap();
        assert_eq!(&got[..], &bytes[..]);
        // The whole table (five pieces) and the whole used ring (three).
        let whole = pinned(&view, PAGE / 2, 16 * 1024, Permissions::Read);
        assert_eq!(whole, [2048, 4096, 4096, 4096, 2048]);
        let used = pinned(&view, 6 * PAGE, 6 + 8 * 1024, Permissions::Write);
        assert_eq!(used.len(), 3);
        // The avail ring is one piece: one slice, at its offset.
        s.write_slice(&bytes[..4], GuestAddress(5 * PAGE + 2))
            .unwrap();
        assert_eq!(pinned(&view, 5 * PAGE + 2, 4, Permissions::Read), [4]);
        let mut got = [0u8; 4];
        view.read_slice(&mut got, GuestAddress(5 * PAGE + 2))
            .unwrap();
        assert_eq!(got, bytes[..4]);
        // Outside the pins (data pages) or the wrong access: the session.
        assert!(view.pin_of(9 * PAGE, 16, Permissions::Read).is_none());
        assert!(view.pin_of(PAGE, 16, Permissions::Write).is_none());
    }

    /// Rings in the last page of the IOVA space (a frontend may put them
    /// there under a vIOMMU): the pin ends at 2^64, which must not
    /// overflow (it panicked in debug builds) and must still serve the
    /// ring accesses.
    #[test]
    fn rings_at_the_top_of_the_iova_space() {
        let space = AddressSpace::new();
        let mem = Arc::new(MemObject::anonymous(4096).unwrap());
        let top = u64::MAX - 4095;
        space
            .iotlb_update(top, 4096, &mem, 0, Permissions::ReadWrite)
            .unwrap();
        let size = 16;
        let (dl, al, ul) = ring_sizes(size);
        let used = 0u64.wrapping_sub(ul);
        let rings = (top, top + dl, used);
        let mut reader = space.reader();
        let releaser = reader.hold_releaser();
        let s = reader.enter();
        let mut pins = RingPins::default();
        assert_eq!(pins.refresh(&s, rings, size), Ok(true));
        let view = RingView::new(&s, Some(&pins), &releaser);
        // The used ring's flags, its last bytes, and the avail ring.
        assert!(view.check_range(GuestAddress(used), 2, Permissions::Write));
        assert!(view.check_range(GuestAddress(u64::MAX - 1), 2, Permissions::Write));
        assert!(view.check_range(
            GuestAddress(top + dl),
            usize::try_from(al).unwrap(),
            Permissions::Read
        ));
        assert!(view
            .get_slices(
                GuestAddress(used),
                usize::try_from(ul).unwrap(),
                Permissions::Write
            )
            .is_ok());
    }
}
