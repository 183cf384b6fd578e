//! The frontend's memory table (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG).
//!
//! Each region is a [`MemObject`] (a shared mapping of the fd that came with
//! it). The table publishes its regions as extents of the connection's
//! guest-physical [`AddressSpace`], keyed by `guest_phys_addr`: without
//! ACCESS_PLATFORM, descriptor addresses are GPAs and are translated there.
//! Every change goes through [`AddressSpace::edit`], so a removal returns
//! only once no queue uses the old translation (a grace period); only then
//! are the old mappings dropped.
//!
//! The table also turns the frontend's user addresses (SET_VRING_ADDR
//! without a vIOMMU; IOTLB entries with one) into GPAs or into
//! `(MemObject, offset)`.
//!
//! # Slots
//!
//! The table holds up to [`MAX_MEM_SLOTS`] (509) regions, what
//! libvhost-user, qemu-storage-daemon and rust-vmm's vhost-user-backend
//! offer, so that memory hotplug (pc-dimm, virtio-mem) has room: with
//! CONFIGURE_MEM_SLOTS, QEMU sends every region with its own ADD_MEM_REG
//! (one descriptor each) and removes them with REM_MEM_REG. A
//! SET_MEM_TABLE carries all its regions' descriptors in one frame, so it
//! is capped by the frame's descriptor cap instead ([`MAX_TABLE_REGIONS`]).
//!
//! Lookups never scan the table: regions are kept sorted by user address
//! and by GPA (two `BTreeMap`s), so finding a region, checking a new one
//! for overlaps and matching a REM_MEM_REG are O(log n). Queue workers do
//! not look here at all: they translate GPAs through the published
//! [`AddressSpace`] (a B+ tree behind their front cache), where adding or
//! removing one region is one extent insert or remove. An add publishes
//! without a grace period; a removal waits for one, and readers then drop
//! only the cache entries inside the removed region.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vcdev_iommu::mem::MemError;
use vcdev_iommu::{AddressSpace, Errno, Extent, MemObject, Permissions, SealPolicy};

/// The most regions a table holds (the answer to GET_MAX_MEM_SLOTS): 509,
/// as libvhost-user, qemu-storage-daemon and vhost-user-backend offer (the
/// KVM memslot count QEMU's own vhost backends were sized for). QEMU caps
/// it at its own limit (512 on x86).
pub const MAX_MEM_SLOTS: usize = 509;

/// The most regions one SET_MEM_TABLE carries: one descriptor each, in one
/// frame, so the frame's descriptor cap. QEMU sends at most
/// VHOST_MEMORY_BASELINE_NREGIONS (8); rust-vmm's vhost frontend up to 32.
pub const MAX_TABLE_REGIONS: usize = crate::wire::MAX_FDS;

const _: () = assert!(MAX_TABLE_REGIONS <= MAX_MEM_SLOTS);

/// Errors of memory-table changes.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region is empty or its ranges wrap.
    #[error("Memory region at GPA {gpa:#x} of {size:#x} bytes is empty or wraps")]
    BadRegion {
        /// Its guest physical address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// The region's fd could not be mapped (unsealed memfd, out of range...).
    #[error("Cannot map memory region at GPA {gpa:#x}")]
    Map {
        /// Its guest physical address.
        gpa: u64,
        /// The cause.
        #[source]
        source: MemError,
    },
    /// The region's fd is not a memfd sealed against shrinking (and the
    /// daemon does not allow unsealed memory).
    #[error(
        "Memory region at GPA {gpa:#x} is not a memfd sealed against shrinking; \
         use QEMU's memory-backend-memfd, or run vcdev with --allow-unsealed-memory"
    )]
    Unsealed {
        /// Its guest physical address.
        gpa: u64,
        /// The cause.
        #[source]
        source: MemError,
    },
    /// The region overlaps another one in guest physical or user space.
    #[error("Memory region at GPA {gpa:#x} overlaps another region")]
    Overlap {
        /// Its guest physical address.
        gpa: u64,
    },
    /// More regions than the table holds ([`MAX_MEM_SLOTS`]) or a
    /// SET_MEM_TABLE carries ([`MAX_TABLE_REGIONS`]).
    #[error("Too many memory regions (at most {max})")]
    TooMany {
        /// The cap that was hit.
        max: usize,
    },
    /// REM_MEM_REG of a region that is not in the table.
    #[error("No memory region at GPA {gpa:#x} of {size:#x} bytes")]
    NoSuchRegion {
        /// Its guest physical address.
        gpa: u64,
        /// Its size.
        size: u64,
    },
    /// A user address range that no region covers.
    #[error("User address {uaddr:#x} is not in the memory table")]
    Unmapped {
        /// The address.
        uaddr: u64,
    },
}

impl MemoryError {
    /// The errno for this error (sent in a REPLY_ACK).
    pub fn errno(&self) -> Errno {
        match self {
            MemoryError::Map { source, .. } | MemoryError::Unsealed { source, .. } => {
                source.errno()
            }
            MemoryError::TooMany { .. } => Errno(libc::ENOSPC),
            MemoryError::NoSuchRegion { .. } => Errno(libc::ENOENT),
            MemoryError::Unmapped { .. } => Errno::EFAULT,
            MemoryError::BadRegion { .. } | MemoryError::Overlap { .. } => Errno::EINVAL,
        }
    }
}

/// What the frontend says about one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// The frontend's user address of the first byte.
    pub uaddr: u64,
    /// Offset of the first byte in the fd.
    pub mmap_offset: u64,
}

impl RegionDesc {
    fn check(&self) -> Result<(u64, u64), MemoryError> {
        let bad = || MemoryError::BadRegion {
            gpa: self.gpa,
            size: self.size,
        };
        let len_m1 = self.size.checked_sub(1).ok_or_else(bad)?;
        let gpa_last = self.gpa.checked_add(len_m1).ok_or_else(bad)?;
        let ua_last = self.uaddr.checked_add(len_m1).ok_or_else(bad)?;
        Ok((gpa_last, ua_last))
    }
}

/// One mapped region.
#[derive(Debug, Clone)]
struct Region {
    desc: RegionDesc,
    gpa_last: u64,
    uaddr_last: u64,
    mem: Arc<MemObject>,
}

impl Region {
    fn extent(&self) -> Extent {
        Extent::new(
            self.desc.gpa,
            self.gpa_last,
            Permissions::ReadWrite,
            self.mem.clone(),
            0,
        )
    }
}

/// Regions sorted two ways: by user address (owning them) and by GPA
/// (naming the user address of each). Both key sets hold disjoint ranges,
/// which is what makes the neighbour checks below exact.
#[derive(Debug, Default)]
struct Regions {
    by_uaddr: BTreeMap<u64, Region>,
    by_gpa: BTreeMap<u64, u64>,
}

impl Regions {
    fn len(&self) -> usize {
        self.by_uaddr.len()
    }

    /// The region whose user range holds `uaddr`: among disjoint ranges,
    /// only the one starting last at or below `uaddr` can.
    fn at_uaddr(&self, uaddr: u64) -> Option<&Region> {
        self.by_uaddr
            .range(..=uaddr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| uaddr <= r.uaddr_last)
    }

    /// Whether `r` overlaps a region in guest physical or user space. Of
    /// disjoint ranges starting at or below `r`'s last byte, the one
    /// starting last also ends last: it alone can reach `r`.
    fn overlaps(&self, r: &Region) -> bool {
        let gpa = self
            .by_gpa
            .range(..=r.gpa_last)
            .next_back()
            .and_then(|(_, ua)| self.by_uaddr.get(ua))
            .is_some_and(|o| o.gpa_last >= r.desc.gpa);
        let uaddr = self
            .by_uaddr
            .range(..=r.uaddr_last)
            .next_back()
            .is_some_and(|(_, o)| o.uaddr_last >= r.desc.uaddr);
        gpa || uaddr
    }

    /// Inserts `r`, which overlaps none ([`Regions::overlaps`]).
    fn insert(&mut self, r: Region) {
        self.by_gpa.insert(r.desc.gpa, r.desc.uaddr);
        self.by_uaddr.insert(r.desc.uaddr, r);
    }

    /// The region REM_MEM_REG `d` names: same GPA, size and user address
    /// (the mmap offset is ignored, as the vhost-user spec says).
    fn matching(&self, d: &RegionDesc) -> Option<&Region> {
        let ua = self.by_gpa.get(&d.gpa)?;
        self.by_uaddr
            .get(ua)
            .filter(|r| r.desc.size == d.size && r.desc.uaddr == d.uaddr)
    }

    fn remove(&mut self, d: &RegionDesc) -> Option<Region> {
        self.by_gpa.remove(&d.gpa)?;
        self.by_uaddr.remove(&d.uaddr)
    }

    fn iter(&self) -> impl Iterator<Item = &Region> {
        self.by_uaddr.values()
    }
}

/// A connection's memory table and the GPA space it publishes.
#[derive(Debug)]
pub struct MemoryTable {
    regions: Regions,
    gpa_space: Arc<AddressSpace>,
    policy: SealPolicy,
}

impl MemoryTable {
    /// An empty table publishing into `gpa_space`.
    pub fn new(gpa_space: Arc<AddressSpace>, policy: SealPolicy) -> MemoryTable {
        MemoryTable {
            regions: Regions::default(),
            gpa_space,
            policy,
        }
    }

    /// The guest-physical address space.
    pub fn gpa_space(&self) -> &Arc<AddressSpace> {
        &self.gpa_space
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.regions.len() == 0
    }

    fn map(&self, d: &RegionDesc, fd: OwnedFd) -> Result<Region, MemoryError> {
        let (gpa_last, uaddr_last) = d.check()?;
        let mem = MemObject::from_fd(fd, d.mmap_offset, d.size, self.policy).map_err(|source| {
            if matches!(source, MemError::NotSealed { .. }) {
                MemoryError::Unsealed { gpa: d.gpa, source }
            } else {
                MemoryError::Map { gpa: d.gpa, source }
            }
        })?;
        Ok(Region {
            desc: *d,
            gpa_last,
            uaddr_last,
            mem: Arc::new(mem),
        })
    }

    /// SET_MEM_TABLE: maps every region, then replaces the whole table. On
    /// error nothing changes. Returns after the grace period of the removal.
    pub fn replace(&mut self, regions: Vec<(RegionDesc, OwnedFd)>) -> Result<(), MemoryError> {
        if regions.len() > MAX_TABLE_REGIONS {
            return Err(MemoryError::TooMany {
                max: MAX_TABLE_REGIONS,
            });
        }
        let mut new = Regions::default();
        for (d, fd) in regions {
            let r = self.map(&d, fd)?;
            if new.overlaps(&r) {
                return Err(MemoryError::Overlap { gpa: d.gpa });
            }
            new.insert(r);
        }
        self.gpa_space.edit(|txn| {
            txn.clear();
            for r in new.iter() {
                txn.insert(r.extent());
            }
            Ok::<_, MemoryError>(())
        })?;
        // The grace period has passed: the old mappings can go.
        self.regions = new;
        Ok(())
    }

    /// ADD_MEM_REG.
    pub fn add(&mut self, d: RegionDesc, fd: OwnedFd) -> Result<(), MemoryError> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany { max: MAX_MEM_SLOTS });
        }
        let r = self.map(&d, fd)?;
        if self.regions.overlaps(&r) {
            return Err(MemoryError::Overlap { gpa: d.gpa });
        }
        self.gpa_space.edit(|txn| {
            txn.insert(r.extent());
            Ok::<_, MemoryError>(())
        })?;
        self.regions.insert(r);
        Ok(())
    }

    /// REM_MEM_REG: the region with the same GPA, size and user address
    /// (the mmap offset is ignored, as the vhost-user spec says). Returns
    /// after the grace period: no queue uses the region any more.
    pub fn remove(&mut self, d: &RegionDesc) -> Result<(), MemoryError> {
        if self.regions.matching(d).is_none() {
            return Err(MemoryError::NoSuchRegion {
                gpa: d.gpa,
                size: d.size,
            });
        }
        self.gpa_space.edit(|txn| {
            txn.remove(d.gpa);
            Ok::<_, MemoryError>(())
        })?;
        // The grace period has passed: the mapping can go.
        self.regions.remove(d);
        Ok(())
    }

    /// Drops every region (disconnect, RESET_OWNER); quiescent as above.
    pub fn clear(&mut self) {
        let _ = self.gpa_space.edit(|txn| Ok::<_, MemoryError>(txn.clear()));
        self.regions = Regions::default();
    }

    /// The GPA of the frontend's user address `uaddr`, if `uaddr..+len` lies
    /// in one region.
    pub fn uaddr_to_gpa(&self, uaddr: u64, len: u64) -> Result<u64, MemoryError> {
        let r = self.uaddr_region(uaddr, len)?;
        Ok(r.desc.gpa + (uaddr - r.desc.uaddr))
    }

    /// The region holding the frontend's user address `uaddr`: its memory,
    /// the offset of `uaddr` in it and the bytes from there to the region's
    /// end (saturated). An IOTLB UPDATE that spans regions maps piecewise.
    pub fn uaddr_piece(&self, uaddr: u64) -> Option<(Arc<MemObject>, u64, u64)> {
        self.regions.at_uaddr(uaddr).map(|r| {
            let off = uaddr - r.desc.uaddr;
            (r.mem.clone(), off, (r.uaddr_last - uaddr).saturating_add(1))
        })
    }

    /// The memory behind the frontend's user range `uaddr..+len`, as
    /// `(object, offset)`: what an IOTLB UPDATE (the vIOMMU issue) maps.
    pub fn uaddr_to_mem(&self, uaddr: u64, len: u64) -> Result<(Arc<MemObject>, u64), MemoryError> {
        let r = self.uaddr_region(uaddr, len)?;
        Ok((r.mem.clone(), uaddr - r.desc.uaddr))
    }

    /// The one region holding all of the frontend's user range
    /// `uaddr..+len`.
    fn uaddr_region(&self, uaddr: u64, len: u64) -> Result<&Region, MemoryError> {
        let last = uaddr
            .checked_add(len.saturating_sub(1))
            .ok_or(MemoryError::Unmapped { uaddr })?;
        self.regions
            .at_uaddr(uaddr)
            .filter(|r| last <= r.uaddr_last)
            .ok_or(MemoryError::Unmapped { uaddr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcdev_iommu::mem::sealed_memfd;

    fn desc(gpa: u64, size: u64, uaddr: u64) -> RegionDesc {
        RegionDesc {
            gpa,
            size,
            uaddr,
            mmap_offset: 0,
        }
    }

    #[test]
    fn table_publishes_gpa_extents_and_converts_user_addresses() {
        let space = AddressSpace::new();
        let mut t = MemoryTable::new(space.clone(), SealPolicy::RequireShrinkSeal);
        let fd = sealed_memfd("a", 0x4000).unwrap();
        t.replace(vec![(desc(0x10000, 0x4000, 0x7000_0000), fd)])
            .unwrap();
        assert_eq!(t.uaddr_to_gpa(0x7000_0010, 16).unwrap(), 0x10010);
        assert!(t.uaddr_to_gpa(0x7000_3ff0, 0x20).is_err());
        let mut r = space.reader();
        assert!(r.enter().translate(0x13000, 8, Permissions::Write).is_ok());
        let fd = sealed_memfd("b", 0x1000).unwrap();
        t.add(desc(0x20000, 0x1000, 0x8000_0000), fd).unwrap();
        let fd = sealed_memfd("c", 0x1000).unwrap();
        assert!(matches!(
            t.add(desc(0x20000, 0x1000, 0x9000_0000), fd),
            Err(MemoryError::Overlap { .. })
        ));
        t.remove(&desc(0x10000, 0x4000, 0x7000_0000)).unwrap();
        assert!(r.enter().translate(0x13000, 8, Permissions::Read).is_err());
        assert!(r.enter().translate(0x20000, 8, Permissions::Read).is_ok());
        assert_eq!(
            t.remove(&desc(0x10000, 0x4000, 0x7000_0000))
                .unwrap_err()
                .errno(),
            Errno(libc::ENOENT)
        );
    }

    /// Page-sized regions for slot tests: region `k` is page `k` of one
    /// memfd, at a GPA and a user address whose orders differ from each
    /// other and from `k` (so nothing works by insertion order), with gaps
    /// between neighbours in both spaces.
    struct Slots {
        file: std::fs::File,
    }

    const PAGE: u64 = 0x1000;
    const GPA_BASE: u64 = 0x1_0000_0000;
    const UA_BASE: u64 = 0x7000_0000_0000;
    const STRIDE: u64 = 0x10000;

    impl Slots {
        fn new(n: u64) -> Slots {
            let fd = sealed_memfd("slots", n * PAGE).unwrap();
            Slots { file: fd.into() }
        }

        fn desc(k: u64) -> RegionDesc {
            // 7 and 37 are prime to every count used here: permutations.
            RegionDesc {
                gpa: GPA_BASE + (k * 7 % MAX_MEM_SLOTS as u64 + 1) * STRIDE,
                size: PAGE,
                uaddr: UA_BASE + (k * 37 % MAX_MEM_SLOTS as u64 + 1) * STRIDE,
                mmap_offset: k * PAGE,
            }
        }

        fn fd(&self) -> OwnedFd {
            self.file.try_clone().unwrap().into()
        }

        fn byte(&self, k: u64) -> u8 {
            use std::os::unix::fs::FileExt;
            let mut b = [0u8];
            self.file.read_exact_at(&mut b, k * PAGE + 0x10).unwrap();
            b[0]
        }
    }

    /// Writes `v` through the GPA translation of region `k`'s byte 0x10;
    /// false if the GPA does not translate.
    fn poke(r: &mut vcdev_iommu::Reader, k: u64, v: u8) -> bool {
        let s = r.enter();
        let Ok(slices) = s.translate(Slots::desc(k).gpa + 0x10, 1, Permissions::Write) else {
            return false;
        };
        // SAFETY: the translation gave one writable byte of a live shared
        // mapping, valid while the session lasts.
        unsafe { slices[0].ptr.write_volatile(v) };
        true
    }

    /// 509 regions by ADD_MEM_REG, the 510th refused (ENOSPC, nothing
    /// published); every region found by user address and by GPA; one
    /// removed in the middle without disturbing its neighbours; its slot
    /// reused.
    #[test]
    fn full_table_of_509_regions() {
        let n = MAX_MEM_SLOTS as u64;
        let slots = Slots::new(n + 1);
        let space = AddressSpace::new();
        let mut t = MemoryTable::new(space.clone(), SealPolicy::RequireShrinkSeal);
        for k in 0..n {
            t.add(Slots::desc(k), slots.fd()).unwrap();
        }
        assert_eq!(t.len(), MAX_MEM_SLOTS);
        // The 510th: refused with ENOSPC, not published.
        let extra = RegionDesc {
            gpa: GPA_BASE + (n + 2) * STRIDE,
            size: PAGE,
            uaddr: UA_BASE + (n + 2) * STRIDE,
            mmap_offset: n * PAGE,
        };
        let e = t.add(extra, slots.fd()).unwrap_err();
        assert!(matches!(e, MemoryError::TooMany { max: 509 }), "{e}");
        assert_eq!(e.errno(), Errno(libc::ENOSPC));
        assert_eq!(t.len(), MAX_MEM_SLOTS);
        let mut r = space.reader();
        assert!(r
            .enter()
            .translate(extra.gpa, 1, Permissions::Read)
            .is_err());
        // Every region, by user address and by GPA (a write through the
        // GPA lands in its own page of the memfd).
        for k in 0..n {
            let d = Slots::desc(k);
            assert_eq!(t.uaddr_to_gpa(d.uaddr + 0x10, 16).unwrap(), d.gpa + 0x10);
            let (_, off, avail) = t.uaddr_piece(d.uaddr + 0x100).unwrap();
            assert_eq!((off, avail), (0x100, PAGE - 0x100));
            // The gaps on either side are in no region.
            assert!(t.uaddr_piece(d.uaddr - 1).is_none());
            assert!(t.uaddr_piece(d.uaddr + PAGE).is_none());
            assert!(t.uaddr_to_gpa(d.uaddr + PAGE - 8, 16).is_err());
            let v = (k % 251) as u8 + 1;
            assert!(poke(&mut r, k, v), "region {k} does not translate");
            assert_eq!(slots.byte(k), v, "region {k}");
        }
        // REM_MEM_REG of one in the middle: it must match GPA, size and
        // user address (not the mmap offset).
        let mid = Slots::desc(254);
        for wrong in [
            RegionDesc {
                size: PAGE * 2,
                ..mid
            },
            RegionDesc {
                uaddr: mid.uaddr + PAGE,
                ..mid
            },
            RegionDesc {
                gpa: mid.gpa + PAGE,
                ..mid
            },
        ] {
            let e = t.remove(&wrong).unwrap_err();
            assert_eq!(e.errno(), Errno(libc::ENOENT), "{wrong:?}");
        }
        t.remove(&RegionDesc {
            mmap_offset: 0,
            ..mid
        })
        .unwrap();
        assert_eq!(t.len(), MAX_MEM_SLOTS - 1);
        assert!(!poke(&mut r, 254, 1), "the removed region still translates");
        assert!(t.uaddr_piece(mid.uaddr).is_none());
        for k in (0..n).filter(|k| *k != 254) {
            assert!(poke(&mut r, k, 0x5a), "region {k} lost with 254");
            assert!(t.uaddr_to_gpa(Slots::desc(k).uaddr, 1).is_ok());
        }
        assert_eq!(t.remove(&mid).unwrap_err().errno(), Errno(libc::ENOENT));
        // Its slot is free again: not for a region overlapping one among
        // hundreds (in either space), but for one region.
        let other = Slots::desc(300);
        for d in [
            RegionDesc {
                gpa: other.gpa + PAGE - 1,
                uaddr: UA_BASE + (n + 5) * STRIDE,
                ..extra
            },
            RegionDesc {
                gpa: GPA_BASE + (n + 5) * STRIDE,
                uaddr: other.uaddr - PAGE + 1,
                ..extra
            },
        ] {
            let e = t.add(d, slots.fd()).unwrap_err();
            assert!(matches!(e, MemoryError::Overlap { .. }), "{d:?}: {e}");
        }
        t.add(extra, slots.fd()).unwrap();
        assert!(r.enter().translate(extra.gpa, 1, Permissions::Read).is_ok());
        let e = t.add(mid, slots.fd()).unwrap_err();
        assert!(matches!(e, MemoryError::TooMany { .. }), "{e}");
    }

    /// Lookup cost with a full table (509 regions) against two regions:
    /// the queue workers' GPA translation (a B+ tree behind the front
    /// cache, here with the cache defeated by cycling over every region)
    /// and the table's user-address lookup (IOTLB UPDATE, SET_VRING_ADDR),
    /// against the linear scan it replaced. Prints ns per lookup:
    /// `cargo test --release -p vcdev --lib full_table_lookup_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "measurement; run in release with --nocapture"]
    fn full_table_lookup_cost() {
        use std::hint::black_box;
        use std::time::Instant;
        const ROUNDS: u64 = 2000;
        for n in [2u64, MAX_MEM_SLOTS as u64] {
            let slots = Slots::new(n);
            let space = AddressSpace::new();
            let mut t = MemoryTable::new(space.clone(), SealPolicy::RequireShrinkSeal);
            for k in 0..n {
                t.add(Slots::desc(k), slots.fd()).unwrap();
            }
            // A fixed pseudo-random visiting order over the regions.
            let order: Vec<RegionDesc> = (0..n).map(|i| Slots::desc(i * 13 % n)).collect();
            let lookups = ROUNDS * n;
            let mut r = space.reader();
            let t0 = Instant::now();
            for _ in 0..ROUNDS {
                let s = r.enter();
                for d in &order {
                    let sl = s.translate(d.gpa + 0x40, 512, Permissions::Read).unwrap();
                    black_box(sl[0].ptr);
                }
            }
            let gpa_ns = t0.elapsed().as_nanos() as f64 / lookups as f64;
            let t0 = Instant::now();
            for _ in 0..ROUNDS {
                for d in &order {
                    black_box(t.uaddr_piece(black_box(d.uaddr + 0x40)).unwrap().1);
                }
            }
            let tree_ns = t0.elapsed().as_nanos() as f64 / lookups as f64;
            // The scan this replaced: the first region whose range holds it.
            let linear: Vec<(u64, u64, Arc<MemObject>)> = t
                .regions
                .iter()
                .map(|r| (r.desc.uaddr, r.uaddr_last, r.mem.clone()))
                .collect();
            let t0 = Instant::now();
            for _ in 0..ROUNDS {
                for d in &order {
                    let ua = black_box(d.uaddr + 0x40);
                    let hit = linear.iter().find(|(f, l, _)| *f <= ua && ua <= *l);
                    black_box(hit.unwrap().2.host_base());
                }
            }
            let scan_ns = t0.elapsed().as_nanos() as f64 / lookups as f64;
            println!(
                "{n:>3} regions: GPA translate {gpa_ns:.1} ns, uaddr lookup {tree_ns:.1} ns \
                 (linear scan {scan_ns:.1} ns)"
            );
        }
    }

    /// SET_MEM_TABLE takes at most [`MAX_TABLE_REGIONS`] regions (its
    /// descriptors travel in one frame); refused, the table is unchanged.
    #[test]
    fn set_mem_table_is_capped_by_the_frame() {
        let n = MAX_TABLE_REGIONS as u64 + 1;
        let slots = Slots::new(n);
        let mut t = MemoryTable::new(AddressSpace::new(), SealPolicy::RequireShrinkSeal);
        let all = |m: u64| (0..m).map(|k| (Slots::desc(k), slots.fd())).collect();
        let e = t.replace(all(n)).unwrap_err();
        assert!(matches!(e, MemoryError::TooMany { max } if max == MAX_TABLE_REGIONS));
        assert!(t.is_empty());
        t.replace(all(n - 1)).unwrap();
        assert_eq!(t.len(), MAX_TABLE_REGIONS);
        // Then ADD_MEM_REG fills the rest of the slots.
        t.add(Slots::desc(n - 1), slots.fd()).unwrap();
        assert_eq!(t.len(), MAX_TABLE_REGIONS + 1);
    }

    #[test]
    fn unsealed_memory_is_refused_by_default() {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new("u").unwrap();
        // SAFETY: valid NUL-terminated name, plain flags.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        f.set_len(0x1000).unwrap();
        let mut t = MemoryTable::new(AddressSpace::new(), SealPolicy::RequireShrinkSeal);
        let e = t.add(desc(0, 0x1000, 0x1000), f.into()).unwrap_err();
        assert!(matches!(e, MemoryError::Unsealed { .. }), "{e}");
        assert!(e.to_string().contains("--allow-unsealed-memory"), "{e}");
    }
}
