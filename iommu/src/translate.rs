//! Translation: per-queue readers with a front cache, and vm-memory's
//! permission-aware `GuestMemory` on top.
//!
//! A [`Reader`] belongs to one queue (one thread at a time, no locks). Its
//! front cache is direct-mapped by 4 KiB page number and holds whole
//! extents; it is valid for one generation of the address space, checked
//! with one atomic load per translation (see [`crate::space`]). A miss
//! walks the published extent tree.
//!
//! Translations and the host slices they yield are valid only inside the
//! [`Session`] they came from: while it is open the reader is online, and no
//! invalidation of what it uses can complete. A request whose I/O outlives
//! the session holds its ranges ([`Session::hold`], [`crate::hold`]) until
//! it completes ([`Reader::release`]).

use std::cell::{Cell, RefCell};
use std::iter::FusedIterator;
use std::marker::PhantomData;
use std::sync::Arc;

use smallvec::SmallVec;
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::iommu::{Error as IommuError, IovaRange};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, GuestMemoryResult, Permissions,
    VolatileSlice,
};

use crate::hold::{HoldId, HoldRange, HoldReleaser};
use crate::space::{AddressSpace, ReaderSlot};
use crate::sync::qsbr::{fence, AtomicU64, Ordering};
use crate::tree::Node;

/// Entries of the front cache (a power of two).
pub const CACHE_ENTRIES: usize = 64;

/// The generations a session's front cache drops entries for one by one
/// ([`Session::new_generation`]), each a pass over its [`CACHE_ENTRIES`]; after more it drops
/// them all, which costs less than the passes and at most a refill of each.
pub(crate) const PARTIAL_FLUSH_GENS: u64 = 16;
const PAGE_SHIFT: u32 = 12;

/// Why a translation failed; `iova` is the first failing address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// Nothing is mapped at `iova` (for an IOTLB: a miss to report).
    #[error("IOVA {iova:#x} is not mapped")]
    Unmapped {
        /// First unmapped IOVA.
        iova: u64,
    },
    /// `iova` is mapped without the access asked for.
    #[error("IOVA {iova:#x} does not allow {access:?} access")]
    Denied {
        /// First IOVA denying the access.
        iova: u64,
        /// The access asked for.
        access: Permissions,
    },
    /// The range wraps around the end of the 64-bit space.
    #[error("range at IOVA {iova:#x} wraps around")]
    Overflow {
        /// Start of the range.
        iova: u64,
    },
}

impl Fault {
    /// The first failing IOVA.
    pub fn iova(&self) -> u64 {
        match *self {
            Fault::Unmapped { iova } | Fault::Denied { iova, .. } | Fault::Overflow { iova } => {
                iova
            }
        }
    }
}

/// A piece of host memory a translation yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostSlice {
    /// Host address.
    pub ptr: *mut u8,
    /// Bytes.
    pub len: usize,
}

/// The host slices of one buffer, in order (inline up to 4).
pub type Slices = SmallVec<[HostSlice; 4]>;

#[derive(Clone, Copy, Debug)]
struct CacheEntry {
    start: u64,
    last: u64,
    host: usize,
    perm: u8,
}

const INVALID: CacheEntry = CacheEntry {
    start: 1,
    last: 0,
    host: 0,
    perm: 0,
};

/// Per-reader counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Segments translated.
    pub translations: u64,
    /// Of those, found in the front cache.
    pub hits: u64,
    /// Whole front-cache flushes caused by a new generation.
    pub flushes: u64,
    /// New generations handled by dropping only the entries that overlap
    /// what they removed.
    pub partial_flushes: u64,
}

/// A queue's view of an address space: front cache and reader slot.
pub struct Reader {
    space: Arc<AddressSpace>,
    slot: Arc<ReaderSlot>,
    cache: Box<[Cell<CacheEntry>; CACHE_ENTRIES]>,
    cache_gen: Cell<u64>,
    translations: Cell<u64>,
    hits: Cell<u64>,
    flushes: Cell<u64>,
    partial_flushes: Cell<u64>,
    /// The slices after the first of each buffer over several extents
    /// translated in the current session ([`SliceIter`]); cleared when the
    /// next session starts.
    spill: RefCell<Vec<HostSlice>>,
}

// SAFETY: a Reader is used by one thread at a time (it is not Sync: the
// Cells see to that); moving it to another thread between sessions is fine,
// its slot is an atomic and its cache and spill only plain data (the spill's
// pointers are used only by iterators borrowing a session, and cleared
// before the next one).
unsafe impl Send for Reader {}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // With holds outstanding the slot stays registered (offline) so
        // that edits still see them; the last release unregisters it.
        if self.slot.orphan() {
            self.space.unregister(&self.slot);
        } else {
            log::warn!(
                "reader dropped with {} hold(s) outstanding",
                self.slot.holds()
            );
        }
    }
}

impl Reader {
    pub(crate) fn new(space: Arc<AddressSpace>, slot: Arc<ReaderSlot>) -> Reader {
        Reader {
            space,
            slot,
            cache: Box::new([const { Cell::new(INVALID) }; CACHE_ENTRIES]),
            cache_gen: Cell::new(0),
            translations: Cell::new(0),
            hits: Cell::new(0),
            flushes: Cell::new(0),
            partial_flushes: Cell::new(0),
            spill: RefCell::new(Vec::new()),
        }
    }

    /// The address space read.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// Goes online: translations may be made until the session ends.
    #[inline]
    pub fn enter(&mut self) -> Session<'_> {
        // No iterator of the last session is left (they borrowed it).
        self.spill.get_mut().clear();
        let g = self.space.generation_relaxed();
        self.slot.epoch.store(g, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Session {
            reader: self,
            generation: self.space.generation_ref(),
            cache: &self.cache,
            _not_send: PhantomData,
        }
    }

    /// Releases a hold taken by [`Session::hold`] on this reader: the
    /// request's I/O completed. Callable while offline, from the thread
    /// that owns the reader; it never waits for an edit and never takes the
    /// writer lock. Online, use [`Session::release`]; from another thread,
    /// a [`Reader::hold_releaser`].
    ///
    /// # Panics
    ///
    /// If `id` was taken on another reader.
    #[inline]
    pub fn release(&self, id: HoldId) {
        self.slot.release(&self.space, id);
    }

    /// Holds of this reader not yet released.
    pub fn holds(&self) -> usize {
        self.slot.holds()
    }

    /// A handle that releases this reader's holds from any thread (an I/O
    /// engine that reaps completions away from the queue's thread). It
    /// keeps the reader's holds visible to edits even after the reader is
    /// dropped.
    pub fn hold_releaser(&self) -> HoldReleaser {
        HoldReleaser {
            space: self.space.clone(),
            slot: self.slot.clone(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            translations: self.translations.get(),
            hits: self.hits.get(),
            flushes: self.flushes.get(),
            partial_flushes: self.partial_flushes.get(),
        }
    }
}

/// An online period of a [`Reader`]; ending it (drop) is a quiescent point.
pub struct Session<'r> {
    reader: &'r Reader,
    // Direct references, so that a probe costs no pointer chasing.
    generation: &'r AtomicU64,
    cache: &'r [Cell<CacheEntry>; CACHE_ENTRIES],
    _not_send: PhantomData<*const ()>,
}

impl Drop for Session<'_> {
    #[inline]
    fn drop(&mut self) {
        self.reader.slot.epoch.store(0, Ordering::SeqCst);
        self.reader.space.reader_left();
    }
}

impl Session<'_> {
    #[inline]
    fn check_generation(&self) {
        let g = self.generation.load(Ordering::Acquire);
        if g != self.reader.cache_gen.get() {
            self.new_generation(g);
        }
    }

    /// The generation moved from the cache's to `g`: drop the entries that
    /// overlap what the generations in between removed, or all of them when
    /// the log no longer covers them.
    #[cold]
    fn new_generation(&self, g: u64) {
        let r = self.reader;
        let c = r.cache_gen.get();
        let space = &r.space;
        let partial = c != 0
            && g > c
            && g - c <= PARTIAL_FLUSH_GENS.min(AddressSpace::LOG_LEN)
            && (c + 1..=g).all(|x| match space.removed_in(x) {
                Some((first, last)) => {
                    if first <= last {
                        for e in r.cache.iter() {
                            let v = e.get();
                            if v.start <= last && first <= v.last {
                                e.set(INVALID);
                            }
                        }
                    }
                    true
                }
                None => false,
            });
        if partial {
            r.partial_flushes.set(r.partial_flushes.get() + 1);
        } else {
            for e in r.cache.iter() {
                e.set(INVALID);
            }
            r.flushes.set(r.flushes.get() + 1);
        }
        r.cache_gen.set(g);
    }

    /// Probes the front cache only: the host address of `iova` if a cached
    /// extent covers `iova..iova+len` with `access`.
    #[inline]
    pub fn probe(&self, iova: u64, len: u64, access: Permissions) -> Option<*mut u8> {
        self.check_generation();
        let e = self.cache[(iova >> PAGE_SHIFT) as usize & (CACHE_ENTRIES - 1)].get();
        // `end < iova` catches both len == 0 and a wrap; non-short-circuit
        // `&` keeps the hit path free of branches but one.
        let end = iova.wrapping_add(len).wrapping_sub(1);
        let want = access as u8;
        let hit = (e.start <= iova) & (end <= e.last) & (end >= iova) & (e.perm & want == want);
        hit.then(|| e.host.wrapping_add((iova - e.start) as usize) as *mut u8)
    }

    /// [`Session::probe`], the hit counted (a translation, served by the
    /// front cache): the fast path of [`Session::translate`] and
    /// [`Session::cached`].
    #[inline(always)]
    fn probe_counted(&self, iova: u64, len: u64, access: Permissions) -> Option<*mut u8> {
        let ptr = self.probe(iova, len, access)?;
        let r = self.reader;
        r.translations.set(r.translations.get() + 1);
        r.hits.set(r.hits.get() + 1);
        Some(ptr)
    }

    /// Translates the first piece of `iova..`: host address and the bytes
    /// mapped contiguously from there to the end of its extent (saturated).
    #[inline]
    fn segment(&self, iova: u64, access: Permissions) -> Result<(usize, u64), Fault> {
        let r = self.reader;
        r.translations.set(r.translations.get() + 1);
        let slot = &self.cache[(iova >> PAGE_SHIFT) as usize & (CACHE_ENTRIES - 1)];
        let e = slot.get();
        let want = access as u8;
        if e.start <= iova && iova <= e.last && e.perm & want == want {
            r.hits.set(r.hits.get() + 1);
            let host = e.host.wrapping_add((iova - e.start) as usize);
            return Ok((host, (e.last - iova).saturating_add(1)));
        }
        // SAFETY: we are online (a Session exists), so the published root
        // and every node reachable from it stay alive until we go offline.
        let root: &Node = unsafe { &*r.space.root_ptr() };
        let Some(x) = root.find(iova) else {
            return Err(Fault::Unmapped { iova });
        };
        if !x.perm.allow(access) {
            return Err(Fault::Denied { iova, access });
        }
        slot.set(CacheEntry {
            start: x.start,
            last: x.last,
            host: x.host,
            perm: x.perm as u8,
        });
        Ok((x.host_of(iova), (x.last - iova).saturating_add(1)))
    }

    /// Translates `iova..iova+len` for `access` into host slices (several
    /// when the buffer spans mappings). A hole or a denied access fails
    /// with the first failing IOVA. `len == 0` yields no slice.
    #[inline]
    pub fn translate(&self, iova: u64, len: u64, access: Permissions) -> Result<Slices, Fault> {
        if let Some(ptr) = self.probe_counted(iova, len, access) {
            // Fast path: one cached extent covers the whole buffer.
            let mut out = Slices::new();
            // probe() succeeded, so len - 1 fits in the extent: len <= usize.
            out.push(HostSlice {
                ptr,
                len: len as usize,
            });
            return Ok(out);
        }
        self.translate_slow(iova, len, access)
    }

    /// Puts `start..=last`, mapped at `host`, in the front cache for `access`, in the entry of
    /// `at`'s page (an address in the range): a ring's piece that its queue's pins served
    /// because the cache had lost the ring's page (to a data page, or to a flush), so that the
    /// ring's next accesses hit the cache again. Counts no translation.
    ///
    /// # Safety
    ///
    /// `start..=last` must lie within one extent that allows `access` and that this session's
    /// generation publishes, with `start` mapped at `host`: a piece translated in this session,
    /// or in an earlier one whose extents this generation still publishes. The cache then
    /// serves it until an invalidation that overlaps it, as it does the extents it found.
    pub unsafe fn refill(
        &self,
        at: u64,
        start: u64,
        last: u64,
        host: *mut u8,
        access: Permissions,
    ) {
        self.check_generation();
        let slot = &self.cache[(at >> PAGE_SHIFT) as usize & (CACHE_ENTRIES - 1)];
        slot.set(CacheEntry {
            start,
            last,
            host: host as usize,
            perm: access as u8,
        });
    }

    /// [`Session::slices`] past the front cache's one-extent fast path
    /// ([`Session::cached`]), for a caller that probed it already.
    #[inline(never)]
    pub fn slices_slow(
        &self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<SliceIter<'_>> {
        let iova = addr.0;
        let slow = || {
            let slices = self.translate_slow(iova, count as u64, access)?;
            // SAFETY: translated in this session, which the result borrows.
            unsafe { self.slice_iter(slices.into_iter()) }.ok_or(Fault::Overflow { iova })
        };
        slow().map_err(|f| to_guest_error(f, count))
    }

    /// The iterator over `slices` (empty ones skipped): the first inline,
    /// the others in the reader's spill, which the next session clears (no
    /// allocation once the spill has grown to a session's needs). `None`
    /// if the spill would pass 2^32 slices.
    ///
    /// # Safety
    ///
    /// Each slice must lie within one extent and stay mapped while this
    /// session is online: translated in it, or in an earlier session whose
    /// extents this session's generation still publishes.
    pub unsafe fn slice_iter(
        &self,
        slices: impl Iterator<Item = HostSlice>,
    ) -> Option<SliceIter<'_>> {
        let mut slices = slices.filter(|s| s.len != 0);
        let Some(first) = slices.next() else {
            return Some(SliceIter {
                next: EMPTY_SLICE,
                spill: None,
                at: 0,
                end: 0,
            });
        };
        let mut it = SliceIter {
            next: first,
            spill: None,
            at: 0,
            end: 0,
        };
        if let Some(second) = slices.next() {
            let spill = &self.reader.spill;
            let mut v = spill.borrow_mut();
            let at = u32::try_from(v.len()).ok()?;
            v.push(second);
            v.extend(slices);
            it.end = u32::try_from(v.len()).ok()?;
            it.at = at;
            it.spill = Some(spill);
        }
        Some(it)
    }

    #[inline(never)]
    fn translate_slow(&self, iova: u64, len: u64, access: Permissions) -> Result<Slices, Fault> {
        let mut out = Slices::new();
        self.translate_into(iova, len, access, |s| out.push(s))?;
        Ok(out)
    }

    /// As [`Session::translate`], calling `f` for each slice instead.
    #[inline]
    pub fn translate_into(
        &self,
        iova: u64,
        len: u64,
        access: Permissions,
        mut f: impl FnMut(HostSlice),
    ) -> Result<(), Fault> {
        if len == 0 {
            return Ok(());
        }
        if iova.checked_add(len - 1).is_none() {
            return Err(Fault::Overflow { iova });
        }
        self.check_generation();
        let mut at = iova;
        let mut left = len;
        loop {
            let (host, avail) = self.segment(at, access)?;
            let n = avail.min(left);
            let Ok(n_usize) = usize::try_from(n) else {
                return Err(Fault::Overflow { iova });
            };
            f(HostSlice {
                ptr: host as *mut u8,
                len: n_usize,
            });
            left -= n;
            if left == 0 {
                return Ok(());
            }
            at += n;
        }
    }

    /// Holds `ranges` (inclusive, in the space's key domain: see
    /// [`crate::hold::hold_range`]) past the end of this session, for a
    /// request whose I/O outlives it: until [`Reader::release`], every edit
    /// that removes a translation overlapping one of them waits before it
    /// returns. Take the hold in the session that made the translations,
    /// before it ends: the hold is registered with the generation the
    /// session went online in, and edits published after that generation
    /// do not wait for it. A range with `first > last` is ignored (a debug
    /// build panics).
    ///
    /// Costs one uncontended lock of the reader's own hold table.
    #[inline]
    pub fn hold(&self, ranges: &[HoldRange]) -> HoldId {
        let r = self.reader;
        // Our own store (at enter): the session's generation.
        let gen = r.slot.epoch.load(Ordering::Relaxed);
        r.slot.hold(gen, ranges)
    }

    /// Releases a hold of this reader while online (a worker reaping
    /// completions inside a session); as [`Reader::release`].
    #[inline]
    pub fn release(&self, id: HoldId) {
        self.reader.release(id);
    }

    /// The address space's generation seen by this session (changes when
    /// translations were removed; pinned translations must be redone).
    pub fn generation(&self) -> u64 {
        self.check_generation();
        self.reader.cache_gen.get()
    }

    /// Whether translations of `ranges` (inclusive IOVA ranges) made in
    /// generation `since` may have been removed by the generations after
    /// it, up to this session's: true when one of them removed an extent
    /// overlapping a range, or when the invalidation log no longer covers
    /// them all (then nobody knows, so assume it). False means that every
    /// extent those translations came from is still published, so host
    /// slices made from them in generation `since` are still valid in this
    /// session: a pinned translation need not be redone.
    pub fn removed_since(&self, since: u64, ranges: &[(u64, u64)]) -> bool {
        let g = self.generation();
        if since == g {
            return false;
        }
        if since == 0 || since > g || g - since > AddressSpace::LOG_LEN {
            return true;
        }
        let space = &self.reader.space;
        (since + 1..=g).any(|x| match space.removed_in(x) {
            Some((first, last)) => {
                first <= last && ranges.iter().any(|&(a, b)| a <= last && first <= b)
            }
            None => true,
        })
    }
}

fn to_guest_error(f: Fault, len: usize) -> GuestMemoryError {
    GuestMemoryError::IommuError(IommuError::CannotResolve {
        iova_range: IovaRange {
            base: GuestAddress(f.iova()),
            length: len,
        },
        reason: f.to_string(),
    })
}

/// The slices of a translated buffer, as vm-memory wants them: four
/// words, like vm-memory's own iterator and unlike [`Slices`]. The generic
/// `Bytes` helpers move it by value several times per access; with four
/// slices inline those copies cost more than the translation. A buffer
/// inside one extent (nearly every ring access, header and data buffer) is
/// its first slice alone; the slices after it, for a buffer over several
/// extents, wait in the reader's spill ([`Session::slice_iter`]).
pub struct SliceIter<'a> {
    /// The next slice; `len == 0`: none (then the spilled ones, if any).
    next: HostSlice,
    /// The reader's spill, whose `at..end` are this buffer's other slices.
    spill: Option<&'a RefCell<Vec<HostSlice>>>,
    at: u32,
    end: u32,
}

impl SliceIter<'_> {
    #[cold]
    fn next_spilled(&mut self) -> Option<HostSlice> {
        let spill = self.spill?;
        if self.at >= self.end {
            return None;
        }
        let s = *spill.borrow().get(self.at as usize)?;
        self.at += 1;
        Some(s)
    }
}

const EMPTY_SLICE: HostSlice = HostSlice {
    ptr: std::ptr::null_mut(),
    len: 0,
};

impl<'a> Iterator for SliceIter<'a> {
    type Item = GuestMemoryResult<VolatileSlice<'a, ()>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let s = if self.next.len != 0 {
            std::mem::replace(&mut self.next, EMPTY_SLICE)
        } else if self.spill.is_none() {
            return None;
        } else {
            self.next_spilled()?
        };
        // SAFETY: the slice was translated inside the session that borrows
        // 'a (or handed to `Session::slice_iter`, whose caller promised as
        // much), so its memory stays mapped for 'a; it lies inside one
        // extent, i.e. inside the extent's MemObject.
        Some(Ok(unsafe { VolatileSlice::new(s.ptr, s.len) }))
    }
}

impl FusedIterator for SliceIter<'_> {}
impl<'a> GuestMemorySliceIterator<'a, BS<'a, ()>> for SliceIter<'a> {
    /// A `SliceIter` never yields an error: its slices as they are. Always
    /// inlined, so that vm-memory's accessors (`load`, `read_slice`, ...)
    /// do not call out for it: the provided version peeks, and LLVM left it
    /// out of line or inlined it depending on the size of the callers
    /// (about 200 instructions a request when out of line).
    #[inline(always)]
    fn stop_on_error(self) -> GuestMemoryResult<impl Iterator<Item = VolatileSlice<'a, ()>>> {
        Ok(self.map_while(Result::ok))
    }
}

impl GuestMemory for Session<'_> {
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        self.translate_into(addr.0, count as u64, access, |_| {})
            .is_ok()
    }

    #[inline]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        self.slices(addr, count, access)
    }
}

impl Session<'_> {
    /// [`GuestMemory::get_slices`], with the iterator's type named (for a
    /// `GuestMemory` built on a session). Always inlined: the front-cache
    /// hit is a few instructions, the rest is `slices_slow`.
    #[inline(always)]
    pub fn slices(
        &self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<SliceIter<'_>> {
        if let Some(it) = self.cached(addr, count, access) {
            return Ok(it);
        }
        self.slices_slow(addr, count, access)
    }

    /// The fast path of [`Session::slices`] (of `translate`, without
    /// building a `Slices`): the front cache's hit, counted, or `None`.
    #[inline(always)]
    pub fn cached(
        &self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Option<SliceIter<'_>> {
        let ptr = self.probe_counted(addr.0, count as u64, access)?;
        Some(SliceIter {
            next: HostSlice { ptr, len: count },
            spill: None,
            at: 0,
            end: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

    use crate::{AddressSpace, MemObject};

    const PAGE: u64 = 4096;
    const NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    /// virtio-queue walks a descriptor chain through our translation: the
    /// rings and buffers live at IOVAs whose pages are scattered in host
    /// memory, and a buffer spans two mappings.
    #[test]
    fn virtio_queue_walks_a_chain_through_translation() {
        let mem = Arc::new(MemObject::anonymous(64 * PAGE as usize).unwrap());
        let space = AddressSpace::new();
        // IOVA page i -> host page (i * 5) % 64: nothing contiguous.
        crate::test_util::map_scattered(&space, &mem, 0x10_0000, 16, |i| i * 5 % 64);
        let (desc, avail, used) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64);
        let mut r = space.reader();
        let s = r.enter();
        // Chain: 16 readable bytes spanning pages 3|4, then 8 writable.
        let d0 = Descriptor::new(0x10_4000 - 8, 16, NEXT, 1);
        let d1 = Descriptor::new(0x10_6000, 8, WRITE, 0);
        s.write_obj(d0, GuestAddress(desc)).unwrap();
        s.write_obj(d1, GuestAddress(desc + 16)).unwrap();
        s.write_obj(0u16, GuestAddress(avail)).unwrap(); // flags
        s.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // idx
        s.write_obj(0u16, GuestAddress(avail + 4)).unwrap(); // ring[0]
        s.write_slice(b"0123456789abcdef", GuestAddress(0x10_4000 - 8))
            .unwrap();

        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(&s));
        let chain = q.iter(&s).unwrap().next().unwrap();
        let descs: Vec<_> = chain.collect();
        assert_eq!(descs.len(), 2);
        let mut buf = [0u8; 16];
        s.read_slice(&mut buf, descs[0].addr()).unwrap();
        assert_eq!(&buf, b"0123456789abcdef");
        // The readable buffer really is two host slices.
        let slices: Vec<_> = s
            .get_slices(descs[0].addr(), 16, Permissions::Read)
            .unwrap()
            .collect();
        assert_eq!(slices.len(), 2);
        // One extent: one slice (the front cache's fast path, then the
        // same from the cache); nothing for zero bytes.
        let lens = |addr: u64, len: usize| -> Vec<usize> {
            s.get_slices(GuestAddress(addr), len, Permissions::Read)
                .unwrap()
                .map(|r| r.unwrap().len())
                .collect()
        };
        assert_eq!(lens(0x10_8010, 32), [32]);
        assert_eq!(lens(0x10_8020, 16), [16]);
        assert_eq!(lens(0x10_8000, 0), Vec::<usize>::new());
        assert_eq!(lens(0x10_8ff0, 0x1020), [0x10, 0x1000, 0x10]);
        s.write_slice(b"written!", descs[1].addr()).unwrap();
        q.add_used(&s, 0, 8).unwrap();
        assert_eq!(s.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
    }

    /// Buffers over several extents: their slices after the first wait in
    /// the reader's spill. Two such iterators alive at once each yield
    /// their own slices and bytes, and each session starts with an empty
    /// spill (which keeps its capacity: no allocation once warm).
    #[test]
    fn buffers_over_several_extents_share_the_spill() {
        let mem = Arc::new(MemObject::anonymous(16 * PAGE as usize).unwrap());
        let space = AddressSpace::new();
        // IOVA page i -> host page (i * 5 + 3) % 16: nothing contiguous.
        for i in 0..8u64 {
            space
                .iotlb_update(
                    i * PAGE,
                    PAGE,
                    &mem,
                    (i * 5 + 3) % 16 * PAGE,
                    Permissions::ReadWrite,
                )
                .unwrap();
        }
        let pattern: Vec<u8> = (0..8 * PAGE).map(|i| (i * 7 % 251) as u8).collect();
        let mut r = space.reader();
        r.enter().write_slice(&pattern, GuestAddress(0)).unwrap();
        fn bytes<'a>(
            it: &mut impl Iterator<
                Item = vm_memory::GuestMemoryResult<vm_memory::VolatileSlice<'a, ()>>,
            >,
            n: usize,
        ) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            for sl in it.take(n) {
                let sl = sl.unwrap();
                let mut b = vec![0u8; sl.len()];
                sl.read_slice(&mut b, 0).unwrap();
                out.push(b);
            }
            out
        }
        let mut capacity = 0;
        for round in 0..3 {
            let s = r.enter();
            assert_eq!(s.reader.spill.borrow().len(), 0, "round {round}");
            let (a0, alen) = (PAGE - 8, 16 + PAGE as usize);
            let (b0, blen) = (4 * PAGE - 4, 8);
            let mut a = s.slices(GuestAddress(a0), alen, Permissions::Read).unwrap();
            let first = bytes(&mut a, 1);
            let mut b = s
                .slices(GuestAddress(b0), blen, Permissions::Write)
                .unwrap();
            let got_b = bytes(&mut b, usize::MAX);
            let mut got_a = first;
            got_a.extend(bytes(&mut a, usize::MAX));
            let lens = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
            assert_eq!(lens(&got_a), [8, PAGE as usize, 8]);
            assert_eq!(lens(&got_b), [4, 4]);
            let range = |at: u64, len: usize| pattern[at as usize..at as usize + len].to_vec();
            assert_eq!(got_a.concat(), range(a0, alen));
            assert_eq!(got_b.concat(), range(b0, blen));
            // Two slices of `a` and one of `b` were spilled.
            assert_eq!(s.reader.spill.borrow().len(), 3);
            let cap = s.reader.spill.borrow().capacity();
            if round > 0 {
                assert_eq!(cap, capacity, "the spill grew again");
            }
            capacity = cap;
        }
    }

    /// A write through a read-only mapping, or to an unmapped IOVA, fails
    /// with an IOMMU error that names the first failing address.
    #[test]
    fn guest_memory_errors_name_the_failing_iova() {
        let mem = Arc::new(MemObject::anonymous(4 * PAGE as usize).unwrap());
        let space = AddressSpace::new();
        space
            .iotlb_update(0, PAGE, &mem, 0, Permissions::Read)
            .unwrap();
        let mut r = space.reader();
        let s = r.enter();
        assert!(s.check_range(GuestAddress(0), PAGE as usize, Permissions::Read));
        assert!(!s.check_range(GuestAddress(0), 1, Permissions::Write));
        let e = s.write_obj(1u8, GuestAddress(16)).unwrap_err();
        assert!(matches!(
            e,
            vm_memory::GuestMemoryError::IommuError(vm_memory::iommu::Error::CannotResolve { ref iova_range, .. })
                if iova_range.base == GuestAddress(16)
        ));
        let e = s.read_obj::<u64>(GuestAddress(PAGE - 4)).unwrap_err();
        assert!(matches!(
            e,
            vm_memory::GuestMemoryError::IommuError(vm_memory::iommu::Error::CannotResolve { ref iova_range, .. })
                if iova_range.base == GuestAddress(PAGE)
        ));
    }
}
