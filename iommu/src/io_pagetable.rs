//! The IO page table of an IOAS (the kernel's `io_pagetable.c`): areas,
//! allowed and reserved IOVA ranges, IOVA allocation, alignment.
//!
//! Areas are the extents of the IOAS's [`AddressSpace`], one extent per
//! area, never merged: unmapping takes whole areas only, so their
//! boundaries are part of the state. Every change of areas goes through
//! [`AddressSpace::edit`], so removals get their grace period.
//!
//! Nothing here knows a wire struct. Ranges use an inclusive `last`; ends
//! are computed with checked arithmetic.
//!
//! # Locks
//!
//! `state` (allowed, reserved, domains, alignment) is held across a whole
//! operation, including the `AddressSpace` edit it makes: `state` ->
//! the address space's writer lock. Readers (queues) take neither.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::Permissions;

use crate::errno::Errno;
use crate::mem::MemObject;
use crate::space::AddressSpace;
use crate::tree::{Extent, Tree};

/// The software IOMMU's page size (PROTOCOL.md): also the kernel's
/// PAGE_SIZE on the hosts we mirror.
pub const PAGE_SIZE: u64 = 4096;

/// The largest alignment automatic IOVA allocation asks for (the kernel's
/// HPAGE_SIZE with transparent huge pages, x86-64).
pub const MAX_ALLOC_ALIGNMENT: u64 = 2 << 20;

/// An IOVA range `start..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

impl IovaRange {
    /// The whole 64-bit IOVA space.
    pub const ALL: IovaRange = IovaRange {
        start: 0,
        last: u64::MAX,
    };

    /// `start..=last`.
    pub const fn new(start: u64, last: u64) -> IovaRange {
        IovaRange { start, last }
    }

    /// Whether the two ranges share an IOVA.
    pub fn overlaps(&self, start: u64, last: u64) -> bool {
        self.start <= last && start <= self.last
    }

    /// Whether `other` lies inside this range.
    pub fn contains(&self, other: &IovaRange) -> bool {
        self.start <= other.start && other.last <= self.last
    }
}

/// Who put a reserved range in place (a domain's aperture, a device's
/// reserved regions): removed together when the owner goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResvOwner(u64);

impl ResvOwner {
    /// A fresh owner, distinct from every other.
    pub fn new() -> ResvOwner {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ResvOwner(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for ResvOwner {
    fn default() -> Self {
        ResvOwner::new()
    }
}

/// Errors of the IO page table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoptError {
    /// A length of 0.
    #[error("length is 0")]
    ZeroLength,
    /// `iova + length - 1` (or another end) wraps past 2^64 - 1.
    #[error("range {iova:#x}+{length:#x} overflows")]
    Overflow {
        /// Start.
        iova: u64,
        /// Length.
        length: u64,
    },
    /// IOVA, length or the backing page offset is not a multiple of the
    /// IOAS alignment.
    #[error("{what} {value:#x} is not aligned to {alignment:#x}")]
    Misaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The IOAS alignment.
        alignment: u64,
    },
    /// The range intersects a reserved range (a device's reserved region,
    /// or outside an attached device's aperture).
    #[error("range {start:#x}..={last:#x} intersects a reserved range")]
    Reserved {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
    },
    /// The range overlaps an existing mapping.
    #[error("range {start:#x}..={last:#x} overlaps an existing mapping")]
    Exists {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
    },
    /// Automatic allocation found no hole.
    #[error("no free IOVA range of {length:#x} bytes")]
    NoSpace {
        /// Length asked for.
        length: u64,
    },
    /// Automatic allocation would align below the IOAS alignment.
    #[error("allocation alignment {alignment:#x} is below the IOAS alignment {required:#x}")]
    AllocAlignment {
        /// The alignment the allocation would use.
        alignment: u64,
        /// The IOAS alignment.
        required: u64,
    },
    /// Automatic allocation of a length >= 2^63.
    #[error("length {length:#x} is too large to allocate")]
    AllocTooLarge {
        /// Length asked for.
        length: u64,
    },
    /// Unmap of a range that contains no mapping.
    #[error("nothing is mapped in {start:#x}..={last:#x}")]
    NotMapped {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
    },
    /// Unmap of a range that would split a mapping.
    #[error("unmap of {start:#x}..={last:#x} would split the mapping at {area:#x}")]
    SplitsArea {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
        /// Start of the mapping it would split.
        area: u64,
    },
    /// The copy source is not fully covered by contiguous mappings.
    #[error("source {start:#x}..={last:#x} is not covered by contiguous mappings")]
    NotContiguous {
        /// First IOVA.
        start: u64,
        /// Last IOVA.
        last: u64,
    },
    /// A writeable copy of memory that was mapped read-only.
    #[error("memory mapped read-only cannot be copied writeable")]
    NotWritable,
    /// A piece that is empty or reaches beyond its memory object.
    #[error("piece {offset:#x}+{length:#x} is empty or outside its memory")]
    OutsideMemory {
        /// Offset in the memory object.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// An allowed range with `start >= last`.
    #[error("allowed range {start:#x}..={last:#x} is empty or reversed")]
    BadAllowedRange {
        /// Start.
        start: u64,
        /// Last.
        last: u64,
    },
    /// Two allowed ranges overlap.
    #[error("allowed range {start:#x}..={last:#x} overlaps another")]
    AllowedOverlap {
        /// Start.
        start: u64,
        /// Last.
        last: u64,
    },
    /// An allowed range intersects a reserved range, or a range to reserve
    /// intersects an allowed range or a mapping.
    #[error("range {start:#x}..={last:#x} is in use")]
    InUse {
        /// Start.
        start: u64,
        /// Last.
        last: u64,
    },
    /// Raising the alignment would leave an existing mapping misaligned.
    #[error("mapping at {iova:#x} does not conform to alignment {alignment:#x}")]
    AreaMisaligned {
        /// The mapping's start.
        iova: u64,
        /// The new alignment.
        alignment: u64,
    },
    /// A domain whose page size exceeds PAGE_SIZE.
    #[error("page size {0:#x} is not supported")]
    PageSize(u64),
    /// Disabling huge pages while domains hold mappings.
    #[error("huge pages cannot be disabled while domains hold mappings")]
    LargePagesBusy,
}

impl IoptError {
    /// The errno for this error (the kernel's, case by case).
    pub fn errno(&self) -> Errno {
        use IoptError::*;
        match self {
            ZeroLength
            | Misaligned { .. }
            | Reserved { .. }
            | AllocAlignment { .. }
            | BadAllowedRange { .. }
            | AllowedOverlap { .. }
            | PageSize(_)
            | LargePagesBusy => Errno::EINVAL,
            Overflow { .. } | AllocTooLarge { .. } => Errno::EOVERFLOW,
            Exists { .. } => Errno::EEXIST,
            NoSpace { .. } => Errno::ENOSPC,
            NotMapped { .. } | SplitsArea { .. } | NotContiguous { .. } => Errno::ENOENT,
            NotWritable => Errno::EPERM,
            OutsideMemory { .. } => Errno::EFAULT,
            InUse { .. } | AreaMisaligned { .. } => Errno::EADDRINUSE,
        }
    }
}

/// A piece of backing memory to map: `length` bytes of `mem` at `offset`.
#[derive(Clone, Debug)]
pub struct Piece {
    /// The memory.
    pub mem: Arc<MemObject>,
    /// Offset in `mem`.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
    /// Whether the memory was mapped writeable (a copy may ask for write
    /// only then).
    pub writable: bool,
}

/// The "user address" of a byte of backing memory, for alignment
/// purposes: the file offset (what `user_va` and `start` are in the
/// protocol), or the host address for anonymous memory.
fn addr_of(mem: &MemObject, offset: u64) -> u64 {
    let base = mem.file_offset().unwrap_or(mem.host_base() as usize as u64);
    base.wrapping_add(offset)
}

#[derive(Clone, Copy, Debug)]
struct Reserved {
    range: IovaRange,
    owner: ResvOwner,
}

#[derive(Clone, Copy, Debug)]
struct Domain {
    owner: ResvOwner,
    page_size: u64,
}

#[derive(Debug)]
struct State {
    /// Sorted, non-overlapping (adjacent allowed).
    allowed: Vec<IovaRange>,
    /// Sorted by start; ranges of different owners may overlap.
    reserved: Vec<Reserved>,
    domains: Vec<Domain>,
    disable_large_pages: bool,
    iova_alignment: u64,
}

impl State {
    fn reserved_hit(&self, start: u64, last: u64) -> Option<IovaRange> {
        self.reserved
            .iter()
            .map(|r| r.range)
            .find(|r| r.overlaps(start, last))
    }

    fn allowed_hit(&self, start: u64, last: u64) -> Option<IovaRange> {
        self.allowed
            .iter()
            .copied()
            .find(|r| r.overlaps(start, last))
    }

    /// The blocker (reserved range or area) with the lowest start among
    /// those ending at or after `pos`.
    fn next_blocker(&self, tree: &Tree, pos: u64) -> Option<IovaRange> {
        let area = tree
            .first_from(pos)
            .map(|e| IovaRange::new(e.start, e.last));
        let resv = self
            .reserved
            .iter()
            .map(|r| r.range)
            .filter(|r| r.last >= pos)
            .min_by_key(|r| r.start);
        match (area, resv) {
            (Some(a), Some(r)) => Some(if r.start < a.start { r } else { a }),
            (a, r) => a.or(r),
        }
    }

    /// Allowed spans clipped to `lo..=hi`, adjacent ranges merged; the
    /// whole window when no allowed list is set.
    fn allowed_spans(&self, lo: u64, hi: u64) -> Vec<IovaRange> {
        if self.allowed.is_empty() {
            return vec![IovaRange::new(lo, hi)];
        }
        let mut out: Vec<IovaRange> = Vec::new();
        for r in &self.allowed {
            let (s, l) = (r.start.max(lo), r.last.min(hi));
            if s > l {
                continue;
            }
            match out.last_mut() {
                Some(prev) if prev.last.checked_add(1) == Some(s) => prev.last = l,
                _ => out.push(IovaRange::new(s, l)),
            }
        }
        out
    }

    fn check_alignment(&self, tree: &Tree, alignment: u64) -> Result<(), IoptError> {
        let mask = alignment - 1;
        let mut bad = None;
        tree.for_each(|e| {
            let len = e.last.wrapping_sub(e.start).wrapping_add(1);
            if bad.is_none()
                && (e.start & mask != 0 || len & mask != 0 || addr_of(&e.mem, e.offset) & mask != 0)
            {
                bad = Some(e.start);
            }
        });
        match bad {
            Some(iova) => Err(IoptError::AreaMisaligned { iova, alignment }),
            None => Ok(()),
        }
    }

    /// The alignment domains and options ask for; raising it checks the
    /// areas first (iopt_calculate_iova_alignment).
    fn recalculate_alignment(&mut self, tree: &Tree) -> Result<(), IoptError> {
        let base = if self.disable_large_pages {
            PAGE_SIZE
        } else {
            1
        };
        let new = self
            .domains
            .iter()
            .map(|d| d.page_size)
            .fold(base, u64::max);
        if new > self.iova_alignment {
            self.check_alignment(tree, new)?;
        }
        self.iova_alignment = new;
        Ok(())
    }

    /// Reserves `range` for `owner`: in use (EADDRINUSE) if a mapping or
    /// an allowed range intersects it (iopt_reserve_iova).
    fn reserve(
        &mut self,
        tree: &Tree,
        range: IovaRange,
        owner: ResvOwner,
    ) -> Result<(), IoptError> {
        if tree.any_overlap(range.start, range.last)
            || self.allowed_hit(range.start, range.last).is_some()
        {
            return Err(IoptError::InUse {
                start: range.start,
                last: range.last,
            });
        }
        let i = self
            .reserved
            .partition_point(|r| r.range.start <= range.start);
        self.reserved.insert(i, Reserved { range, owner });
        Ok(())
    }

    fn remove_reserved(&mut self, owner: ResvOwner) {
        self.reserved.retain(|r| r.owner != owner);
    }

    /// Automatic IOVA placement (iopt_alloc_iova): first fit, above 0 and
    /// below the last page, inside the allowed list, avoiding reserved
    /// ranges and areas, aligned to the smallest power of two >= length
    /// (at most [`MAX_ALLOC_ALIGNMENT`], at most the alignment of `addr`),
    /// keeping `addr`'s offset in its page.
    fn alloc_iova(&self, tree: &Tree, addr: u64, length: u64) -> Result<u64, IoptError> {
        if length == 0 || length >= u64::MAX / 2 {
            return Err(IoptError::AllocTooLarge { length });
        }
        let page_offset = addr % PAGE_SIZE;
        let pow = length.next_power_of_two();
        let mut alignment = if addr == 0 {
            pow
        } else {
            pow.min(1u64 << addr.trailing_zeros())
        };
        alignment = alignment.min(MAX_ALLOC_ALIGNMENT);
        if alignment < self.iova_alignment {
            return Err(IoptError::AllocAlignment {
                alignment,
                required: self.iova_alignment,
            });
        }
        let fit = |start: u64, last: u64| -> Option<u64> {
            let aligned = start.checked_add(alignment - 1)? & !(alignment - 1);
            let aligned = aligned | page_offset;
            (aligned < last && last - aligned >= length - 1).then_some(aligned)
        };
        for span in self.allowed_spans(PAGE_SIZE, u64::MAX - PAGE_SIZE) {
            let Some(lo) = fit(span.start, span.last) else {
                continue;
            };
            let mut pos = lo;
            loop {
                if pos > span.last {
                    break;
                }
                match self.next_blocker(tree, pos) {
                    Some(b) if b.start <= pos => match b.last.checked_add(1) {
                        Some(next) => pos = next,
                        None => break,
                    },
                    blocker => {
                        let hole_last = match blocker {
                            Some(b) if b.start <= span.last => b.start - 1,
                            _ => span.last,
                        };
                        if let Some(iova) = fit(pos, hole_last) {
                            return Ok(iova);
                        }
                        match blocker {
                            Some(b) if b.start <= span.last => pos = b.start,
                            _ => break,
                        }
                    }
                }
            }
        }
        Err(IoptError::NoSpace { length })
    }

    /// A fixed IOVA's checks (iopt_check_iova): alignment, overflow,
    /// reserved, existing areas.
    fn check_iova(&self, tree: &Tree, iova: u64, length: u64) -> Result<u64, IoptError> {
        let a = self.iova_alignment;
        if iova & (a - 1) != 0 {
            return Err(IoptError::Misaligned {
                what: "IOVA",
                value: iova,
                alignment: a,
            });
        }
        let last = iova
            .checked_add(length - 1)
            .ok_or(IoptError::Overflow { iova, length })?;
        if self.reserved_hit(iova, last).is_some() {
            return Err(IoptError::Reserved { start: iova, last });
        }
        if tree.any_overlap(iova, last) {
            return Err(IoptError::Exists { start: iova, last });
        }
        Ok(last)
    }
}

/// An IOAS's page table: its address space and the IOVA bookkeeping.
#[derive(Debug)]
pub struct IoPageTable {
    space: Arc<AddressSpace>,
    state: Mutex<State>,
}

impl Default for IoPageTable {
    fn default() -> Self {
        IoPageTable {
            space: AddressSpace::new(),
            state: Mutex::new(State {
                allowed: Vec::new(),
                reserved: Vec::new(),
                domains: Vec::new(),
                disable_large_pages: false,
                iova_alignment: 1,
            }),
        }
    }
}

fn perm_bits(p: Permissions) -> (bool, bool) {
    match p {
        Permissions::No => (false, false),
        Permissions::Read => (true, false),
        Permissions::Write => (false, true),
        Permissions::ReadWrite => (true, true),
    }
}

impl IoPageTable {
    /// An empty table: no areas, no allowed list, nothing reserved,
    /// alignment 1.
    pub fn new() -> IoPageTable {
        IoPageTable::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address space devices attached to this IOAS translate through.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// The current IOVA alignment.
    pub fn iova_alignment(&self) -> u64 {
        self.state().iova_alignment
    }

    /// The mappings, in order: (first IOVA, last IOVA).
    pub fn areas(&self) -> Vec<IovaRange> {
        self.space.with_tree(|t| {
            let mut v = Vec::with_capacity(t.len());
            t.for_each(|e| v.push(IovaRange::new(e.start, e.last)));
            v
        })
    }

    /// Maps `pieces` back to back, at `iova` or (None) at an allocated
    /// IOVA, each piece one area; returns the first IOVA
    /// (iopt_map_pages). All or nothing. A piece that is empty or not
    /// inside its memory is EFAULT.
    pub fn map_pieces(
        &self,
        pieces: &[Piece],
        iova: Option<u64>,
        perm: Permissions,
    ) -> Result<u64, IoptError> {
        let mut length = 0u64;
        for p in pieces {
            if p.length == 0 || !p.mem.contains(p.offset, p.length) {
                return Err(IoptError::OutsideMemory {
                    offset: p.offset,
                    length: p.length,
                });
            }
            length = length.checked_add(p.length).ok_or(IoptError::Overflow {
                iova: iova.unwrap_or(0),
                length: u64::MAX,
            })?;
        }
        let st = self.state();
        let a = st.iova_alignment;
        if length == 0 {
            return Err(IoptError::ZeroLength);
        }
        if length & (a - 1) != 0 {
            return Err(IoptError::Misaligned {
                what: "length",
                value: length,
                alignment: a,
            });
        }
        let (_, write) = perm_bits(perm);
        self.space.edit(|txn| {
            let start = match iova {
                Some(iova) => {
                    st.check_iova(txn.tree(), iova, length)?;
                    iova
                }
                None => {
                    let first = &pieces[0];
                    st.alloc_iova(txn.tree(), addr_of(&first.mem, first.offset), length)?
                }
            };
            let mut cur = start;
            for p in pieces {
                if write && !p.writable {
                    return Err(IoptError::NotWritable);
                }
                let page_offset = addr_of(&p.mem, p.offset) % PAGE_SIZE;
                if page_offset & (a - 1) != 0 {
                    return Err(IoptError::Misaligned {
                        what: "memory offset",
                        value: page_offset,
                        alignment: a,
                    });
                }
                let last = cur.checked_add(p.length - 1).ok_or(IoptError::Overflow {
                    iova: cur,
                    length: p.length,
                })?;
                txn.insert(Extent::new(cur, last, perm, p.mem.clone(), p.offset));
                cur = last.wrapping_add(1);
            }
            Ok(start)
        })
    }

    /// Maps `length` bytes of `mem` at `offset` (EFAULT if that is not
    /// inside `mem`).
    pub fn map(
        &self,
        mem: Arc<MemObject>,
        offset: u64,
        length: u64,
        iova: Option<u64>,
        perm: Permissions,
    ) -> Result<u64, IoptError> {
        let (_, write) = perm_bits(perm);
        let piece = Piece {
            mem,
            offset,
            length,
            writable: write,
        };
        self.map_pieces(std::slice::from_ref(&piece), iova, perm)
    }

    /// The backing of `iova..iova+length`, which contiguous areas must
    /// cover entirely, as pieces sharing the areas' memory
    /// (iopt_get_pages).
    pub fn get_pieces(&self, iova: u64, length: u64) -> Result<Vec<Piece>, IoptError> {
        if length == 0 {
            return Err(IoptError::ZeroLength);
        }
        let last = iova
            .checked_add(length - 1)
            .ok_or(IoptError::Overflow { iova, length })?;
        let not_contig = IoptError::NotContiguous { start: iova, last };
        self.space.with_tree(|t| {
            let mut out = Vec::new();
            let mut cur = iova;
            loop {
                let e = t.find(cur).ok_or_else(|| not_contig.clone())?;
                let end = e.last.min(last);
                let (_, writable) = perm_bits(e.perm);
                out.push(Piece {
                    mem: e.mem.clone(),
                    offset: e.offset + (cur - e.start),
                    length: end - cur + 1,
                    writable,
                });
                if end == last {
                    return Ok(out);
                }
                cur = end + 1;
            }
        })
    }

    /// Unmaps every area inside `iova..iova+length`; an area only partly
    /// inside, or no area at all, is ENOENT and nothing changes. Returns
    /// the bytes unmapped, after the grace period.
    pub fn unmap(&self, iova: u64, length: u64) -> Result<u64, IoptError> {
        if length == 0 {
            return Err(IoptError::ZeroLength);
        }
        let last = iova
            .checked_add(length - 1)
            .ok_or(IoptError::Overflow { iova, length })?;
        let _st = self.state();
        self.unmap_range(iova, last)
    }

    fn unmap_range(&self, start: u64, last: u64) -> Result<u64, IoptError> {
        self.space.edit(|txn| {
            let hit = txn.tree().overlapping(start, last);
            if hit.is_empty() {
                return Err(IoptError::NotMapped { start, last });
            }
            let mut bytes = 0u64;
            for e in &hit {
                if e.start < start || e.last > last {
                    return Err(IoptError::SplitsArea {
                        start,
                        last,
                        area: e.start,
                    });
                }
                bytes = bytes.saturating_add(e.last - e.start).saturating_add(1);
            }
            for e in &hit {
                txn.remove(e.start);
            }
            Ok(bytes)
        })
    }

    /// Unmaps everything; an empty table is no error. Returns the bytes
    /// unmapped (saturating at 2^64 - 1).
    pub fn unmap_all(&self) -> u64 {
        let _st = self.state();
        self.unmap_range(0, u64::MAX).unwrap_or(0)
    }

    /// Replaces the allowed list (iommufd_ioas_load_iovas +
    /// iopt_set_allow_iova): each range needs `start < last` and no overlap
    /// with another (EINVAL), none may intersect a reserved range
    /// (EADDRINUSE). Existing mappings are not checked, as in the kernel.
    pub fn set_allowed(&self, ranges: &[IovaRange]) -> Result<(), IoptError> {
        let mut sorted: Vec<IovaRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            if r.start >= r.last {
                return Err(IoptError::BadAllowedRange {
                    start: r.start,
                    last: r.last,
                });
            }
            if sorted.iter().any(|o| o.overlaps(r.start, r.last)) {
                return Err(IoptError::AllowedOverlap {
                    start: r.start,
                    last: r.last,
                });
            }
            let i = sorted.partition_point(|o| o.start < r.start);
            sorted.insert(i, *r);
        }
        let mut st = self.state();
        if let Some(r) = sorted
            .iter()
            .find(|r| st.reserved_hit(r.start, r.last).is_some())
        {
            return Err(IoptError::InUse {
                start: r.start,
                last: r.last,
            });
        }
        st.allowed = sorted;
        Ok(())
    }

    /// The allowed list.
    pub fn allowed(&self) -> Vec<IovaRange> {
        self.state().allowed.clone()
    }

    /// The usable IOVA ranges: the holes between reserved ranges, as the
    /// kernel's IOVA_RANGES reports them; and the alignment.
    pub fn iova_ranges(&self) -> (Vec<IovaRange>, u64) {
        let st = self.state();
        let mut out = Vec::new();
        let mut pos = Some(0u64);
        for r in &st.reserved {
            let Some(p) = pos else { break };
            if r.range.start > p {
                out.push(IovaRange::new(p, r.range.start - 1));
            }
            if r.range.last >= p {
                pos = r.range.last.checked_add(1);
            }
        }
        if let Some(p) = pos {
            out.push(IovaRange::new(p, u64::MAX));
        }
        (out, st.iova_alignment)
    }

    /// Reserves `ranges` for `owner`, all or none (iopt_reserve_iova for
    /// each; EADDRINUSE if a mapping or allowed range is in the way).
    pub fn reserve(&self, ranges: &[IovaRange], owner: ResvOwner) -> Result<(), IoptError> {
        let mut st = self.state();
        self.space.with_tree(|tree| {
            for r in ranges {
                if let Err(e) = st.reserve(tree, *r, owner) {
                    st.remove_reserved(owner);
                    return Err(e);
                }
            }
            Ok(())
        })
    }

    /// Drops every reserved range of `owner`.
    pub fn unreserve(&self, owner: ResvOwner) {
        self.state().remove_reserved(owner);
    }

    /// Adds a domain (iopt_table_add_domain): its page size raises the
    /// alignment (EINVAL above PAGE_SIZE, EADDRINUSE if an area does not
    /// conform) and everything outside its aperture becomes reserved
    /// (EADDRINUSE if a mapping or allowed range lies there). All or none.
    pub fn add_domain(
        &self,
        owner: ResvOwner,
        aperture: IovaRange,
        page_size: u64,
    ) -> Result<(), IoptError> {
        let mut st = self.state();
        self.space.with_tree(|tree| {
            let page_size = page_size.max(1);
            let new = page_size.max(st.iova_alignment);
            if !page_size.is_power_of_two() || new > PAGE_SIZE {
                return Err(IoptError::PageSize(page_size));
            }
            if new != st.iova_alignment {
                st.check_alignment(tree, new)?;
            }
            let mut outside = Vec::new();
            if aperture.start != 0 {
                outside.push(IovaRange::new(0, aperture.start - 1));
            }
            if aperture.last != u64::MAX {
                outside.push(IovaRange::new(aperture.last + 1, u64::MAX));
            }
            for r in outside {
                if let Err(e) = st.reserve(tree, r, owner) {
                    st.remove_reserved(owner);
                    return Err(e);
                }
            }
            st.iova_alignment = new;
            st.domains.push(Domain { owner, page_size });
            Ok(())
        })
    }

    /// Removes a domain and its reserved ranges; the alignment may drop
    /// (iopt_table_remove_domain).
    pub fn remove_domain(&self, owner: ResvOwner) {
        let mut st = self.state();
        st.domains.retain(|d| d.owner != owner);
        st.remove_reserved(owner);
        // Lowering the alignment cannot fail.
        let _ = self.space.with_tree(|t| st.recalculate_alignment(t));
    }

    /// Whether huge pages are enabled (IOMMU_OPTION_HUGE_PAGES).
    pub fn large_pages(&self) -> bool {
        !self.state().disable_large_pages
    }

    /// Enables or disables huge pages: disabling raises the alignment to
    /// PAGE_SIZE (EADDRINUSE if an area does not conform) and is refused
    /// while a domain holds mappings (EINVAL).
    pub fn set_large_pages(&self, enable: bool) -> Result<(), IoptError> {
        let mut st = self.state();
        self.space.with_tree(|tree| {
            if enable {
                st.disable_large_pages = false;
                return st.recalculate_alignment(tree);
            }
            if st.disable_large_pages {
                return Ok(());
            }
            if !st.domains.is_empty() && !tree.is_empty() {
                return Err(IoptError::LargePagesBusy);
            }
            st.disable_large_pages = true;
            let r = st.recalculate_alignment(tree);
            if r.is_err() {
                st.disable_large_pages = false;
            }
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kernel `iopt_alloc_iova`: a length of 2^63 or more cannot be
    /// aligned ("Protect roundup_pow_of_two() from overflow"): EOVERFLOW.
    #[test]
    fn alloc_huge_length_is_eoverflow() {
        let iopt = IoPageTable::new();
        let st = iopt.state();
        let e = iopt
            .space
            .with_tree(|t| st.alloc_iova(t, 0, 1 << 63))
            .unwrap_err();
        assert_eq!(e.errno(), Errno::EOVERFLOW);
    }

    /// Pieces handed to the page table must lie inside their memory:
    /// never a host pointer beyond a mapping (EFAULT, as a bad user
    /// pointer).
    #[test]
    fn piece_outside_memory_is_efault() {
        let iopt = IoPageTable::new();
        let mem = Arc::new(MemObject::anonymous(4096).unwrap());
        for (offset, length) in [(0, 4097), (4096, 1), (1, 0), (u64::MAX, 2)] {
            let e = iopt
                .map(
                    mem.clone(),
                    offset,
                    length,
                    Some(PAGE_SIZE),
                    Permissions::Read,
                )
                .unwrap_err();
            assert_eq!(e.errno(), Errno::EFAULT);
        }
        iopt.map(mem, 1, 4095, Some(PAGE_SIZE), Permissions::Read)
            .unwrap();
    }
}
