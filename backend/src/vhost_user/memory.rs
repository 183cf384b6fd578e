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

use std::os::fd::OwnedFd;
use std::sync::Arc;

use vcdev_iommu::mem::MemError;
use vcdev_iommu::{AddressSpace, Errno, Extent, MemObject, Permissions, SealPolicy};

/// The most regions a table holds (GET_MAX_MEM_SLOTS; SET_MEM_TABLE's fd cap).
pub const MAX_MEM_SLOTS: usize = crate::wire::MAX_FDS;

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
    /// More regions than [`MAX_MEM_SLOTS`].
    #[error("Too many memory regions (at most {MAX_MEM_SLOTS})")]
    TooMany,
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
            MemoryError::TooMany => Errno(libc::ENOSPC),
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

/// A connection's memory table and the GPA space it publishes.
#[derive(Debug)]
pub struct MemoryTable {
    regions: Vec<Region>,
    gpa_space: Arc<AddressSpace>,
    policy: SealPolicy,
}

impl MemoryTable {
    /// An empty table publishing into `gpa_space`.
    pub fn new(gpa_space: Arc<AddressSpace>, policy: SealPolicy) -> MemoryTable {
        MemoryTable {
            regions: Vec::new(),
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
        self.regions.is_empty()
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

    fn overlaps(a: &Region, b: &Region) -> bool {
        (a.desc.gpa <= b.gpa_last && b.desc.gpa <= a.gpa_last)
            || (a.desc.uaddr <= b.uaddr_last && b.desc.uaddr <= a.uaddr_last)
    }

    /// SET_MEM_TABLE: maps every region, then replaces the whole table. On
    /// error nothing changes. Returns after the grace period of the removal.
    pub fn replace(&mut self, regions: Vec<(RegionDesc, OwnedFd)>) -> Result<(), MemoryError> {
        if regions.len() > MAX_MEM_SLOTS {
            return Err(MemoryError::TooMany);
        }
        let mut new: Vec<Region> = Vec::with_capacity(regions.len());
        for (d, fd) in regions {
            let r = self.map(&d, fd)?;
            if new.iter().any(|o| Self::overlaps(o, &r)) {
                return Err(MemoryError::Overlap { gpa: d.gpa });
            }
            new.push(r);
        }
        self.gpa_space.edit(|txn| {
            txn.clear();
            for r in &new {
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
            return Err(MemoryError::TooMany);
        }
        let r = self.map(&d, fd)?;
        if self.regions.iter().any(|o| Self::overlaps(o, &r)) {
            return Err(MemoryError::Overlap { gpa: d.gpa });
        }
        self.gpa_space.edit(|txn| {
            txn.insert(r.extent());
            Ok::<_, MemoryError>(())
        })?;
        self.regions.push(r);
        Ok(())
    }

    /// REM_MEM_REG: the region with the same GPA, size and user address
    /// (the mmap offset is ignored, as the vhost-user spec says). Returns
    /// after the grace period: no queue uses the region any more.
    pub fn remove(&mut self, d: &RegionDesc) -> Result<(), MemoryError> {
        let Some(i) = self
            .regions
            .iter()
            .position(|r| r.desc.gpa == d.gpa && r.desc.size == d.size && r.desc.uaddr == d.uaddr)
        else {
            return Err(MemoryError::NoSuchRegion {
                gpa: d.gpa,
                size: d.size,
            });
        };
        self.gpa_space.edit(|txn| {
            txn.remove(d.gpa);
            Ok::<_, MemoryError>(())
        })?;
        self.regions.swap_remove(i);
        Ok(())
    }

    /// Drops every region (disconnect, RESET_OWNER); quiescent as above.
    pub fn clear(&mut self) {
        let _ = self.gpa_space.edit(|txn| Ok::<_, MemoryError>(txn.clear()));
        self.regions.clear();
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
        self.regions
            .iter()
            .find(|r| r.desc.uaddr <= uaddr && uaddr <= r.uaddr_last)
            .map(|r| {
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
            .iter()
            .find(|r| r.desc.uaddr <= uaddr && last <= r.uaddr_last)
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
