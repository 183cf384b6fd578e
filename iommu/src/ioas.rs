//! The IOAS commands (the kernel's `ioas.c`): MAP, MAP_FILE, UNMAP, COPY,
//! ALLOW_IOVAS, IOVA_RANGES and OPTION, each validating in the kernel's
//! order (reserved fields and unknown flags EOPNOTSUPP, out-of-range values
//! EOVERFLOW, bad combinations EINVAL, then the object lookup, then the
//! page table).
//!
//! The structs are the uAPI's ([`crate::uapi`]); the protocol layer has
//! already applied the size rules. Output fields are written into the
//! struct as the kernel writes them.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use vm_memory::Permissions;

use crate::errno::Errno;
use crate::io_pagetable::{IoPageTable, IoptError, IovaRange};
use crate::mem::{MemError, MemObject};
use crate::object::{Iommufd, ObjectError};
use crate::space::AddressSpace;
use crate::uapi::{self, IommuIovaRange};

/// An IO address space: a page table and the address space devices
/// attached to it translate through.
#[derive(Debug, Default)]
pub struct Ioas {
    iopt: IoPageTable,
}

impl Ioas {
    /// An empty IOAS.
    pub fn new() -> Ioas {
        Ioas::default()
    }

    /// Its page table.
    pub fn iopt(&self) -> &IoPageTable {
        &self.iopt
    }

    /// Its address space.
    pub fn space(&self) -> &Arc<AddressSpace> {
        self.iopt.space()
    }
}

/// Errors of the IOAS commands.
#[derive(Debug, thiserror::Error)]
pub enum IoasError {
    /// Flags the command does not know.
    #[error("unsupported flags {0:#x}")]
    UnknownFlags(u32),
    /// A reserved field is not 0.
    #[error("reserved field is not 0")]
    ReservedField,
    /// A value is U64_MAX or an end wraps.
    #[error("IOVA or length out of range")]
    Overflow,
    /// Neither READABLE nor WRITEABLE.
    #[error("mapping allows neither read nor write")]
    NoAccess,
    /// A length of 0.
    #[error("length is 0")]
    ZeroLength,
    /// The object lookup failed.
    #[error("object lookup failed")]
    Object(#[source] ObjectError),
    /// MAP without a descriptor riding with it (the kernel's bad user
    /// pointer).
    #[error("no memory descriptor came with the request")]
    NoDescriptor,
    /// MAP_FILE without a descriptor.
    #[error("no file descriptor came with the request")]
    BadFile,
    /// Mapping the backing memory failed (unsealed, beyond its end, ...).
    #[error("cannot map the backing memory")]
    Memory(#[source] MemError),
    /// The page table refused.
    #[error("IO page table")]
    Iopt(#[source] IoptError),
    /// A user array shorter than its count says.
    #[error("array of {count} ranges, {got} present")]
    ShortArray {
        /// Entries announced.
        count: u32,
        /// Entries present.
        got: usize,
    },
    /// IOVA_RANGES with too small a capacity: `cmd.num_iovas` holds the
    /// total, `ranges` the ones that fit.
    #[error("{total} ranges do not fit")]
    RangesTooSmall {
        /// Ranges in total.
        total: u32,
        /// The first ranges, as many as fit.
        ranges: Vec<IommuIovaRange>,
    },
    /// Unknown option id or op, or an object id with a global option.
    #[error("unsupported option {option_id} op {op}")]
    UnknownOption {
        /// Option.
        option_id: u32,
        /// Op.
        op: u16,
    },
    /// A value the option does not take.
    #[error("invalid option value {0}")]
    OptionValue(u64),
    /// RLIMIT_MODE set while objects exist.
    #[error("RLIMIT_MODE can only change while no object exists")]
    RlimitBusy,
}

impl IoasError {
    /// The errno for this error.
    pub fn errno(&self) -> Errno {
        use IoasError::*;
        match self {
            UnknownFlags(_) | ReservedField | UnknownOption { .. } => Errno::EOPNOTSUPP,
            Overflow => Errno::EOVERFLOW,
            NoAccess | ZeroLength | OptionValue(_) => Errno::EINVAL,
            Object(e) => e.errno(),
            NoDescriptor | ShortArray { .. } => Errno::EFAULT,
            BadFile => Errno::EBADF,
            Memory(e) => e.errno(),
            Iopt(e) => e.errno(),
            RangesTooSmall { .. } => Errno::EMSGSIZE,
            RlimitBusy => Errno::EBUSY,
        }
    }
}

impl From<ObjectError> for IoasError {
    fn from(e: ObjectError) -> Self {
        IoasError::Object(e)
    }
}

impl From<IoptError> for IoasError {
    fn from(e: IoptError) -> Self {
        IoasError::Iopt(e)
    }
}

/// Map flags -> (fixed IOVA, permissions), after the kernel's checks:
/// unknown flags EOPNOTSUPP (done by the caller), no access EINVAL.
fn map_perm(flags: u32) -> Result<(bool, Permissions), IoasError> {
    let fixed = flags & uapi::IOMMU_IOAS_MAP_FIXED_IOVA != 0;
    let r = flags & uapi::IOMMU_IOAS_MAP_READABLE != 0;
    let w = flags & uapi::IOMMU_IOAS_MAP_WRITEABLE != 0;
    let perm = match (r, w) {
        (true, true) => Permissions::ReadWrite,
        (true, false) => Permissions::Read,
        (false, true) => Permissions::Write,
        (false, false) => return Err(IoasError::NoAccess),
    };
    Ok((fixed, perm))
}

fn check_map_flags(flags: u32) -> Result<(), IoasError> {
    if flags & !uapi::IOMMU_IOAS_MAP_VALID_FLAGS != 0 {
        return Err(IoasError::UnknownFlags(flags));
    }
    Ok(())
}

impl Iommufd {
    /// IOMMU_IOAS_MAP: maps `length` bytes of the file `fd` (riding with
    /// the message) from offset `user_va`, at `iova` (FIXED_IOVA) or at an
    /// allocated IOVA, written back to `cmd.iova`.
    pub fn ioas_map(
        &self,
        cmd: &mut uapi::IommuIoasMap,
        fd: Option<OwnedFd>,
    ) -> Result<u64, IoasError> {
        check_map_flags(cmd.flags)?;
        if cmd.__reserved != 0 {
            return Err(IoasError::ReservedField);
        }
        let iova = self.map_common(
            cmd.ioas_id,
            cmd.flags,
            cmd.iova,
            cmd.user_va,
            cmd.length,
            || fd.ok_or(IoasError::NoDescriptor),
        )?;
        cmd.iova = iova;
        Ok(iova)
    }

    /// IOMMU_IOAS_MAP_FILE: as MAP, from offset `start` of the file riding
    /// with the message (the `fd` field is ignored; no descriptor is EBADF).
    pub fn ioas_map_file(
        &self,
        cmd: &mut uapi::IommuIoasMapFile,
        fd: Option<OwnedFd>,
    ) -> Result<u64, IoasError> {
        check_map_flags(cmd.flags)?;
        let iova = self.map_common(
            cmd.ioas_id,
            cmd.flags,
            cmd.iova,
            cmd.start,
            cmd.length,
            || fd.ok_or(IoasError::BadFile),
        )?;
        cmd.iova = iova;
        Ok(iova)
    }

    fn map_common(
        &self,
        ioas_id: u32,
        flags: u32,
        iova: u64,
        offset: u64,
        length: u64,
        fd: impl FnOnce() -> Result<OwnedFd, IoasError>,
    ) -> Result<u64, IoasError> {
        if iova == u64::MAX || length == u64::MAX {
            return Err(IoasError::Overflow);
        }
        let (fixed, perm) = map_perm(flags)?;
        let ioas = self.ioas(ioas_id)?;
        // iopt_alloc_pages: a zero length is EINVAL, a wrapping source EOVERFLOW.
        if length == 0 {
            return Err(IoasError::ZeroLength);
        }
        if offset.checked_add(length).is_none() {
            return Err(IoasError::Overflow);
        }
        let mem = MemObject::from_fd(fd()?, offset, length, self.seal_policy())
            .map_err(IoasError::Memory)?;
        Ok(ioas
            .iopt()
            .map(Arc::new(mem), 0, length, fixed.then_some(iova), perm)?)
    }

    /// IOMMU_IOAS_UNMAP: unmaps whole mappings inside `iova..iova+length`
    /// (iova 0, length U64_MAX: everything); the bytes unmapped go to
    /// `cmd.length`. Returns after the grace period.
    pub fn ioas_unmap(&self, cmd: &mut uapi::IommuIoasUnmap) -> Result<u64, IoasError> {
        let ioas = self.ioas(cmd.ioas_id)?;
        let unmapped = if cmd.iova == 0 && cmd.length == u64::MAX {
            ioas.iopt().unmap_all()
        } else {
            if cmd.iova == u64::MAX || cmd.length == u64::MAX {
                return Err(IoasError::Overflow);
            }
            ioas.iopt().unmap(cmd.iova, cmd.length)?
        };
        cmd.length = unmapped;
        Ok(unmapped)
    }

    /// IOMMU_IOAS_COPY: maps `src_iova..src_iova+length` of the source
    /// IOAS, which contiguous mappings must cover, into the destination
    /// (possibly the same IOAS), sharing the backing memory; one new
    /// mapping per source mapping touched. The IOVA goes to `cmd.dst_iova`.
    pub fn ioas_copy(&self, cmd: &mut uapi::IommuIoasCopy) -> Result<u64, IoasError> {
        check_map_flags(cmd.flags)?;
        if cmd.length == u64::MAX || cmd.src_iova == u64::MAX || cmd.dst_iova == u64::MAX {
            return Err(IoasError::Overflow);
        }
        let (fixed, perm) = map_perm(cmd.flags)?;
        let src = self.ioas(cmd.src_ioas_id)?;
        let pieces = src.iopt().get_pieces(cmd.src_iova, cmd.length)?;
        drop(src);
        let dst = self.ioas(cmd.dst_ioas_id)?;
        let iova = dst
            .iopt()
            .map_pieces(&pieces, fixed.then_some(cmd.dst_iova), perm)?;
        cmd.dst_iova = iova;
        Ok(iova)
    }

    /// IOMMU_IOAS_ALLOW_IOVAS: replaces the allowed list with the first
    /// `cmd.num_iovas` of `ranges`.
    pub fn ioas_allow_iovas(
        &self,
        cmd: &uapi::IommuIoasAllowIovas,
        ranges: &[IommuIovaRange],
    ) -> Result<(), IoasError> {
        if cmd.__reserved != 0 {
            return Err(IoasError::ReservedField);
        }
        let ioas = self.ioas(cmd.ioas_id)?;
        let n = usize::try_from(cmd.num_iovas).unwrap_or(usize::MAX);
        let given = ranges.get(..n).ok_or(IoasError::ShortArray {
            count: cmd.num_iovas,
            got: ranges.len(),
        })?;
        let list: Vec<IovaRange> = given
            .iter()
            .map(|r| IovaRange::new(r.start, r.last))
            .collect();
        Ok(ioas.iopt().set_allowed(&list)?)
    }

    /// IOMMU_IOAS_IOVA_RANGES: the usable ranges (everything but the
    /// reserved ranges, which include what lies outside attached devices'
    /// apertures) and the alignment. `cmd.num_iovas` is the capacity on
    /// input and the total on output; with too small a capacity the
    /// ranges that fit come back in [`IoasError::RangesTooSmall`].
    pub fn ioas_iova_ranges(
        &self,
        cmd: &mut uapi::IommuIoasIovaRanges,
    ) -> Result<Vec<IommuIovaRange>, IoasError> {
        if cmd.__reserved != 0 {
            return Err(IoasError::ReservedField);
        }
        let ioas = self.ioas(cmd.ioas_id)?;
        let (ranges, alignment) = ioas.iopt().iova_ranges();
        let capacity = usize::try_from(cmd.num_iovas).unwrap_or(usize::MAX);
        let total = u32::try_from(ranges.len()).unwrap_or(u32::MAX);
        let out: Vec<IommuIovaRange> = ranges
            .iter()
            .take(capacity)
            .map(|r| IommuIovaRange {
                start: r.start,
                last: r.last,
            })
            .collect();
        cmd.num_iovas = total;
        cmd.out_iova_alignment = alignment;
        if ranges.len() > capacity {
            return Err(IoasError::RangesTooSmall { total, ranges: out });
        }
        Ok(out)
    }

    /// IOMMU_OPTION: RLIMIT_MODE (global; object_id must be 0) and
    /// HUGE_PAGES (per IOAS). GET writes `cmd.val64`.
    pub fn option(&self, cmd: &mut uapi::IommuOption) -> Result<(), IoasError> {
        if cmd.__reserved != 0 {
            return Err(IoasError::ReservedField);
        }
        let unknown = IoasError::UnknownOption {
            option_id: cmd.option_id,
            op: cmd.op,
        };
        match cmd.option_id {
            uapi::IOMMU_OPTION_RLIMIT_MODE => {
                if cmd.object_id != 0 {
                    return Err(unknown);
                }
                let mut t = self.table();
                match cmd.op {
                    uapi::IOMMU_OPTION_OP_GET => {
                        cmd.val64 = u64::from(t.account_mm);
                        Ok(())
                    }
                    // The kernel also wants CAP_SYS_RESOURCE; the daemon
                    // has no such notion for its clients.
                    uapi::IOMMU_OPTION_OP_SET => {
                        if !t.objects.is_empty() {
                            return Err(IoasError::RlimitBusy);
                        }
                        t.account_mm = match cmd.val64 {
                            0 => false,
                            1 => true,
                            v => return Err(IoasError::OptionValue(v)),
                        };
                        Ok(())
                    }
                    _ => Err(unknown),
                }
            }
            uapi::IOMMU_OPTION_HUGE_PAGES => {
                let ioas = self.ioas(cmd.object_id)?;
                match cmd.op {
                    uapi::IOMMU_OPTION_OP_GET => {
                        cmd.val64 = u64::from(ioas.iopt().large_pages());
                        Ok(())
                    }
                    uapi::IOMMU_OPTION_OP_SET => match cmd.val64 {
                        0 => Ok(ioas.iopt().set_large_pages(false)?),
                        1 => Ok(ioas.iopt().set_large_pages(true)?),
                        v => Err(IoasError::OptionValue(v)),
                    },
                    _ => Err(unknown),
                }
            }
            _ => Err(unknown),
        }
    }
}
