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
use crate::mem::MemError;
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
    /// IOMMU_IOAS_MAP_FILE of a range that is empty or reaches past the file's end: the kernel
    /// pins the file's pages at map time (`iopt_map_file_pages`) and that fails with EINVAL,
    /// where IOAS_MAP's offset into a passed file stands for a bad user address (EFAULT).
    #[error("IOAS_MAP_FILE range is outside the file")]
    FileRange(#[source] MemError),
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
            FileRange(_) => Errno::EINVAL,
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
        self.count(cmd.ioas_id, |s| s.mapped());
        Ok(iova)
    }

    /// Counts a request on IOAS `ioas_id` for every device attached to it.
    pub(crate) fn count(&self, ioas_id: u32, f: impl Fn(&crate::device::MapStats)) {
        for d in self.table().devices_on(ioas_id) {
            f(d.map_stats());
        }
    }

    /// IOMMU_IOAS_MAP_FILE: as MAP, from offset `start` of the file riding
    /// with the message (the `fd` field is ignored; no descriptor is EBADF).
    pub fn ioas_map_file(
        &self,
        cmd: &mut uapi::IommuIoasMapFile,
        fd: Option<OwnedFd>,
    ) -> Result<u64, IoasError> {
        check_map_flags(cmd.flags)?;
        let iova = self
            .map_common(
                cmd.ioas_id,
                cmd.flags,
                cmd.iova,
                cmd.start,
                cmd.length,
                || fd.ok_or(IoasError::BadFile),
            )
            .map_err(|e| match e {
                IoasError::Memory(m @ MemError::OutOfRange { .. }) => IoasError::FileRange(m),
                e => e,
            })?;
        cmd.iova = iova;
        self.count(cmd.ioas_id, |s| s.mapped());
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
        let (mem, offset) = self
            .files()
            .map(fd()?, offset, length, self.seal_policy())
            .map_err(IoasError::Memory)?;
        Ok(ioas
            .iopt()
            .map(mem, offset, length, fixed.then_some(iova), perm)?)
    }

    /// IOMMU_IOAS_UNMAP: unmaps whole mappings inside `iova..iova+length`
    /// (iova 0, length U64_MAX: everything); the bytes unmapped go to
    /// `cmd.length`. Returns after the grace period.
    pub fn ioas_unmap(&self, cmd: &mut uapi::IommuIoasUnmap) -> Result<u64, IoasError> {
        let started = std::time::Instant::now();
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
        drop(ioas);
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.count(cmd.ioas_id, |s| s.unmapped(ns));
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{Checker, Op};
    use crate::test_util::*;
    use crate::uapi::*;

    fn ranges_cmd(ioas: u32, capacity: u32) -> IommuIoasIovaRanges {
        IommuIoasIovaRanges {
            size: 32,
            ioas_id: ioas,
            num_iovas: capacity,
            ..Default::default()
        }
    }

    fn option_cmd(option_id: u32, op: u16, object_id: u32, val64: u64) -> IommuOption {
        IommuOption {
            size: 24,
            option_id,
            op,
            __reserved: 0,
            object_id,
            val64,
        }
    }

    /// Kernel `iommufd_ioas_map`: flags beyond FIXED_IOVA | WRITEABLE |
    /// READABLE are EOPNOTSUPP (no TEST_F; the uAPI's errno convention).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_unknown_flags_is_eopnotsupp() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(4);
        assert_errno!(map(&ictx, ioas, FIXED | 1 << 3, &fd, 0, P, P), EOPNOTSUPP);
        let mut cmd = IommuIoasCopy {
            flags: 1 << 7,
            ..Default::default()
        };
        assert_errno!(ictx.ioas_copy(&mut cmd), EOPNOTSUPP);
        let mut cmd = IommuIoasMapFile {
            flags: 1 << 9,
            ..Default::default()
        };
        assert_errno!(ictx.ioas_map_file(&mut cmd, Some(dup(&fd))), EOPNOTSUPP);
    }

    /// Kernel `iommufd_ioas_map`: a non-zero `__reserved` is EOPNOTSUPP.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_reserved_field_is_eopnotsupp() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let mut cmd = IommuIoasMap {
            size: 40,
            flags: FIXED,
            ioas_id: ioas,
            __reserved: 1,
            user_va: 0,
            length: P,
            iova: P,
        };
        assert_errno!(ictx.ioas_map(&mut cmd, Some(memfd(1))), EOPNOTSUPP);
    }

    /// Kernel `iommufd_ioas_map`/`_copy`/`_unmap`: an IOVA or length of
    /// U64_MAX is EOVERFLOW.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_u64_max_is_eoverflow() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(1);
        assert_errno!(map_fixed(&ictx, ioas, &fd, 0, u64::MAX, P), EOVERFLOW);
        assert_errno!(map_fixed(&ictx, ioas, &fd, 0, P, u64::MAX), EOVERFLOW);
        assert_errno!(copy(&ictx, FIXED, ioas, u64::MAX, ioas, 0, P), EOVERFLOW);
        assert_errno!(copy(&ictx, FIXED, ioas, 0, ioas, u64::MAX, P), EOVERFLOW);
        assert_errno!(copy(&ictx, FIXED, ioas, 0, ioas, 0, u64::MAX), EOVERFLOW);
    }

    /// Kernel `iopt_check_iova`: an IOVA range that wraps past 2^64 - 1 is
    /// EOVERFLOW; so is a source offset + length that wraps
    /// (`iopt_alloc_user_pages`).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_wrapping_range_is_eoverflow() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(2);
        assert_errno!(
            map_fixed(&ictx, ioas, &fd, 0, 2 * P, u64::MAX - P + 1),
            EOVERFLOW
        );
        assert_errno!(
            map_fixed(&ictx, ioas, &fd, u64::MAX - P + 1, 2 * P, P),
            EOVERFLOW
        );
        assert_errno!(unmap(&ictx, ioas, u64::MAX - P + 1, 2 * P), EOVERFLOW);
    }

    /// Kernel `iommufd_ioas_map`: neither READABLE nor WRITEABLE is EINVAL.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_without_access_is_einval() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(1);
        assert_errno!(
            map(&ictx, ioas, IOMMU_IOAS_MAP_FIXED_IOVA, &fd, 0, P, P),
            EINVAL
        );
        assert_errno!(
            copy(&ictx, IOMMU_IOAS_MAP_FIXED_IOVA, ioas, 0, ioas, 0, P),
            EINVAL
        );
    }

    /// Kernel `iommufd_get_ioas`: an unknown id, or the id of another kind
    /// of object, is ENOENT (TEST_F(iommufd, cmd_fail) for DESTROY).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_unknown_or_wrong_kind_ioas_is_enoent() {
        let ictx = ctx();
        let fd = memfd(1);
        assert_errno!(map_fixed(&ictx, 1, &fd, 0, P, P), ENOENT);
        let (dev, _) = device();
        let dev_id = dev.bind(&ictx).unwrap();
        assert_errno!(map_fixed(&ictx, dev_id.0, &fd, 0, P, P), ENOENT);
        assert_errno!(unmap(&ictx, dev_id.0, 0, u64::MAX), ENOENT);
        dev.unbind().unwrap();
    }

    /// Kernel `iopt_alloc_pages`: a zero length is EINVAL.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_zero_length_is_einval() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(1);
        assert_errno!(map_fixed(&ictx, ioas, &fd, 0, 0, P), EINVAL);
        assert_errno!(map_auto(&ictx, ioas, &fd, 0, 0), EINVAL);
    }

    /// TEST_F(iommufd_ioas, area), "Over map fails": a fixed map that
    /// overlaps an existing mapping is EEXIST.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_overlap_is_eexist() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(4);
        let base = 16 * P;
        map_fixed(&ictx, ioas, &fd, 0, 2 * P, base).unwrap();
        for (len, iova) in [(2, 16), (1, 16), (1, 17), (2, 15), (3, 15)] {
            assert_errno!(map_fixed(&ictx, ioas, &fd, 0, len * P, iova * P), EEXIST);
        }
        map_fixed(&ictx, ioas, &fd, 0, P, 15 * P).unwrap();
        map_fixed(&ictx, ioas, &fd, 0, P, 18 * P).unwrap();
    }

    /// PROTOCOL.md "Struct rules": IOAS_MAP_FILE of a range beyond the
    /// file's end is EINVAL, as the kernel's page pinning at map time gives
    /// it (selftest `iommufd`, `test_basic_file`: MAP_FILE of a length past
    /// the memfd's size).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_file_beyond_file_end_is_einval() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(2);
        assert_errno!(map_file(&ictx, ioas, FIXED, &fd, P, 2 * P, P), EINVAL);
        assert_errno!(map_file(&ictx, ioas, RW, &fd, 3 * P, P, 0), EINVAL);
        assert_errno!(map_file(&ictx, ioas, RW, &fd, 0, 3 * P, 0), EINVAL);
        assert!(ictx.ioas(ioas).unwrap().iopt().areas().is_empty());
        map_file(&ictx, ioas, FIXED, &fd, P, P, P).unwrap();
    }

    /// PROTOCOL.md "User virtual addresses": IOAS_MAP, whose `user_va` is
    /// an offset into the file riding along, is EFAULT past the file's end
    /// (the kernel's bad user pointer).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_beyond_file_end_is_efault() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(2);
        assert_errno!(map_fixed(&ictx, ioas, &fd, P, 2 * P, P), EFAULT);
        assert_errno!(map_auto(&ictx, ioas, &fd, 3 * P, P), EFAULT);
        assert!(ictx.ioas(ioas).unwrap().iopt().areas().is_empty());
    }

    /// PROTOCOL.md "Struct rules": a descriptor that is not a memfd sealed
    /// with F_SEAL_SHRINK is EINVAL.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_unsealed_memfd_is_einval() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let f = tempfile_like();
        assert_errno!(map_fixed(&ictx, ioas, &f, 0, P, P), EINVAL);
        let lenient = Iommufd::new(crate::SealPolicy::AllowUnsealed);
        let ioas = ioas_alloc(&lenient);
        map_fixed(&lenient, ioas, &f, 0, P, P).unwrap();
    }

    fn tempfile_like() -> OwnedFd {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new("unsealed").unwrap();
        // SAFETY: valid name, flags are memfd_create's.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(4 * P).unwrap();
        f.into()
    }

    /// PROTOCOL.md "Struct rules": MAP without a descriptor is EFAULT; the
    /// kernel's `iommufd_ioas_map_file` answers a bad fd with EBADF.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_without_descriptor_is_efault_map_file_is_ebadf() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let mut cmd = IommuIoasMap {
            size: 40,
            flags: FIXED,
            ioas_id: ioas,
            length: P,
            iova: P,
            ..Default::default()
        };
        assert_errno!(ictx.ioas_map(&mut cmd, None), EFAULT);
        let mut cmd = IommuIoasMapFile {
            size: 40,
            flags: FIXED,
            ioas_id: ioas,
            fd: -1,
            start: P,
            length: P,
            iova: P,
        };
        assert_errno!(ictx.ioas_map_file(&mut cmd, None), EBADF);
        ictx.ioas_map_file(&mut cmd, Some(memfd(2))).unwrap();
        assert_eq!(read_u64(&ictx, ioas, P), Some(1));
    }

    /// TEST_F(iommufd_ioas, area_auto_iova): allocated IOVAs are never 0
    /// and aligned to the power of two that covers the length.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_alloc_aligns_and_avoids_zero() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(16);
        let mut iovas = Vec::new();
        for i in 1..=10u64 {
            let iova = map_auto(&ictx, ioas, &fd, 0, i * P).unwrap();
            assert_ne!(iova, 0);
            assert_eq!(iova % (i * P).next_power_of_two(), 0);
            iovas.push((iova, i * P));
        }
        for (iova, len) in iovas {
            assert_eq!(unmap(&ictx, ioas, iova, len).unwrap(), len);
        }
        // The file offset's alignment bounds the IOVA's, and its offset in
        // the page is kept.
        let iova = map_auto(&ictx, ioas, &fd, P, 4 * P).unwrap();
        assert_eq!(iova % P, 0);
        let fd2 = memfd(16);
        let mut cmd = IommuIoasMap {
            size: 40,
            flags: RW,
            ioas_id: ioas,
            user_va: 0x800,
            length: P,
            ..Default::default()
        };
        let iova = ictx.ioas_map(&mut cmd, Some(fd2)).unwrap();
        assert_eq!(iova % P, 0x800);
    }

    /// TEST_F(iommufd_ioas, area_auto_iova), "Allocate from an allowed
    /// region": allocation stays inside the allowed list.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_alloc_stays_in_allowed() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(16);
        let (start, last) = (200 * P, 600 * P - 1);
        allow(&ictx, ioas, &[(start, last)]).unwrap();
        for i in 1..=10u64 {
            let len = i * P;
            let iova = map_auto(&ictx, ioas, &fd, 0, len).unwrap();
            assert_eq!(iova % len.next_power_of_two(), 0);
            assert!(iova >= start && iova + len - 1 <= last, "{iova:#x}");
        }
    }

    /// Kernel `iopt_alloc_iova`: no hole that fits is ENOSPC.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_alloc_without_space_is_enospc() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(4);
        allow(&ictx, ioas, &[(4 * P, 8 * P - 1)]).unwrap();
        let a = map_auto(&ictx, ioas, &fd, 0, 2 * P).unwrap();
        let b = map_auto(&ictx, ioas, &fd, 0, 2 * P).unwrap();
        assert_eq!((a, b), (4 * P, 6 * P));
        assert_errno!(map_auto(&ictx, ioas, &fd, 0, P), ENOSPC);
        unmap(&ictx, ioas, a, 2 * P).unwrap();
        assert_errno!(map_auto(&ictx, ioas, &fd, 0, 4 * P), ENOSPC);
        assert_eq!(map_auto(&ictx, ioas, &fd, 0, P).unwrap(), 4 * P);
    }

    /// TEST_F(iommufd_ioas, ioas_iova_alloc): every length from 1 byte
    /// maps and unmaps without a device (alignment 1).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_alloc_any_length_without_device() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(2);
        for len in (1..2 * P).step_by(97) {
            let iova = map_auto(&ictx, ioas, &fd, 0, len).unwrap();
            assert_eq!(unmap(&ictx, ioas, iova, len).unwrap(), len);
        }
    }

    /// TEST_F(iommufd_ioas, area): unmap of a range where nothing is
    /// mapped is ENOENT.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn unmap_nothing_mapped_is_enoent() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        for i in 0..10 {
            assert_errno!(unmap(&ictx, ioas, i * P, P), ENOENT);
        }
    }

    /// TEST_F(iommufd_ioas, area), "Split fails": unmap of part of a
    /// mapping is ENOENT and leaves it mapped.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn unmap_split_is_enoent() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(2);
        map_fixed(&ictx, ioas, &fd, 0, 2 * P, 16 * P).unwrap();
        assert_errno!(unmap(&ictx, ioas, 16 * P, P), ENOENT);
        assert_errno!(unmap(&ictx, ioas, 17 * P, P), ENOENT);
        assert_eq!(read_u64(&ictx, ioas, 17 * P), Some(1));
    }

    /// TEST_F(iommufd_ioas, unmap_fully_contained_areas): several whole
    /// mappings with gaps unmap at once and the bytes come back; a range
    /// cutting one is ENOENT.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn unmap_fully_contained_areas() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(8);
        let base = 8 * P;
        for i in 0..4 {
            map_fixed(&ictx, ioas, &fd, 0, 8 * P, base + i * 16 * P).unwrap();
        }
        assert_errno!(unmap(&ictx, ioas, base - 4 * P, 8 * P), ENOENT);
        assert_errno!(unmap(&ictx, ioas, base + 3 * 16 * P + 4 * P, 8 * P), ENOENT);
        let n = unmap(&ictx, ioas, base - 4 * P, 3 * 16 * P + 8 * P + 4 * P).unwrap();
        assert_eq!(n, 32 * P);
        assert_eq!(ictx.ioas(ioas).unwrap().iopt().areas().len(), 0);
    }

    /// TEST_F(iommufd_ioas, area), "unmap all works" and "Unmap all
    /// succeeds on an empty IOAS": iova 0, length U64_MAX.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn unmap_all_works_even_when_empty() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(2);
        map_fixed(&ictx, ioas, &fd, 0, 2 * P, P).unwrap();
        map_fixed(&ictx, ioas, &fd, 0, P, 100 * P).unwrap();
        assert_eq!(unmap(&ictx, ioas, 0, u64::MAX).unwrap(), 3 * P);
        assert_eq!(unmap(&ictx, ioas, 0, u64::MAX).unwrap(), 0);
    }

    /// Kernel `iopt_unmap_iova`: a zero length is EINVAL.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn unmap_zero_length_is_einval() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        assert_errno!(unmap(&ictx, ioas, P, 0), EINVAL);
    }

    /// Kernel `iommufd_ioas_unmap`: U64_MAX values other than the
    /// unmap-all pair are EOVERFLOW.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn unmap_u64_max_is_eoverflow() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        assert_errno!(unmap(&ictx, ioas, 1, u64::MAX), EOVERFLOW);
        assert_errno!(unmap(&ictx, ioas, u64::MAX, 1), EOVERFLOW);
    }

    /// TEST_F(iommufd_ioas, copy_sweep): a source range not covered by
    /// contiguous mappings is ENOENT; byte-granular sub-ranges copy.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn copy_noncontiguous_source_is_enoent() {
        let ictx = ctx();
        let src = ioas_alloc(&ictx);
        let dst = ioas_alloc(&ictx);
        let fd = memfd(16);
        let start = 0x10_0000;
        let last = start + 16 * P - 2;
        map_fixed(&ictx, src, &fd, 0, last - start + 1, start).unwrap();
        let len = P / 2;
        let mut iova = start - P;
        while iova <= last {
            let r = copy(&ictx, FIXED, dst, start, src, iova, len);
            if iova < start || iova + len - 1 > last {
                assert_errno!(r, ENOENT);
            } else {
                r.unwrap();
                unmap(&ictx, dst, start, len).unwrap();
            }
            iova += 511;
        }
        // A gap between two mappings.
        map_fixed(&ictx, src, &fd, 0, P, last + 1 + P).unwrap();
        assert_errno!(copy(&ictx, FIXED, dst, start, src, last, 3 * P), ENOENT);
    }

    /// TEST_F(iommufd_ioas, copy_area): COPY shares the backing memory, in
    /// the same IOAS and into another, one mapping per source mapping.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn copy_shares_backing_memory() {
        let ictx = ctx();
        let a = ioas_alloc(&ictx);
        let b = ioas_alloc(&ictx);
        let fd = memfd(4);
        map_fixed(&ictx, a, &fd, 0, 2 * P, 0x10000).unwrap();
        map_fixed(&ictx, a, &fd, 2 * P, 2 * P, 0x12000).unwrap();
        copy(&ictx, FIXED, a, 0x20000, a, 0x10000, P).unwrap();
        let iova = copy(&ictx, RW, b, 0, a, 0x11000, 2 * P).unwrap();
        assert_eq!(ictx.ioas(b).unwrap().iopt().areas().len(), 2);
        assert_eq!(read_u64(&ictx, b, iova), Some(1));
        assert_eq!(read_u64(&ictx, b, iova + P), Some(2));
        write_u64(&ictx, b, iova + P, 0xdead);
        assert_eq!(read_u64(&ictx, a, 0x12000), Some(0xdead));
        write_u64(&ictx, a, 0x20000, 0xbeef);
        assert_eq!(read_u64(&ictx, a, 0x10000), Some(0xbeef));
        let same = |x: u32, xi: u64, y: u32, yi: u64| {
            let ex = ictx
                .ioas_space(x)
                .unwrap()
                .with_tree(|t| t.find(xi).unwrap().mem.clone());
            let ey = ictx
                .ioas_space(y)
                .unwrap()
                .with_tree(|t| t.find(yi).unwrap().mem.clone());
            Arc::ptr_eq(&ex, &ey)
        };
        assert!(same(a, 0x11000, b, iova));
        assert!(same(a, 0x12000, b, iova + P));
        // Copies survive the source's unmap: the memory is shared by Arc.
        unmap(&ictx, a, 0, u64::MAX).unwrap();
        assert_eq!(read_u64(&ictx, b, iova + P), Some(0xdead));
    }

    /// Kernel `iopt_insert_area`: a writeable copy of memory mapped
    /// read-only is EPERM.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn copy_readonly_source_writeable_is_eperm() {
        let ictx = ctx();
        let a = ioas_alloc(&ictx);
        let fd = memfd(1);
        let ro = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE;
        map(&ictx, a, ro, &fd, 0, P, P).unwrap();
        assert_errno!(copy(&ictx, FIXED, a, 4 * P, a, P, P), EPERM);
        copy(&ictx, ro, a, 4 * P, a, P, P).unwrap();
    }

    /// Kernel `iopt_get_pages`: a zero-length copy is EINVAL; an unknown
    /// destination ENOENT.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn copy_zero_length_is_einval_unknown_dst_is_enoent() {
        let ictx = ctx();
        let a = ioas_alloc(&ictx);
        let fd = memfd(1);
        map_fixed(&ictx, a, &fd, 0, P, P).unwrap();
        assert_errno!(copy(&ictx, FIXED, a, 4 * P, a, P, 0), EINVAL);
        assert_errno!(copy(&ictx, FIXED, 77, 4 * P, a, P, P), ENOENT);
        assert_errno!(copy(&ictx, FIXED, a, 4 * P, 77, P, P), ENOENT);
    }

    /// TEST_F(iommufd_ioas, iova_ranges): one range [0, U64_MAX] with
    /// alignment 1; capacity 0 is EMSGSIZE with the total.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn iova_ranges_small_capacity_is_emsgsize() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let mut cmd = ranges_cmd(ioas, 8);
        let r = ictx.ioas_iova_ranges(&mut cmd).unwrap();
        assert_eq!(
            r,
            vec![IommuIovaRange {
                start: 0,
                last: u64::MAX
            }]
        );
        assert_eq!((cmd.num_iovas, cmd.out_iova_alignment), (1, 1));
        let mut cmd = ranges_cmd(ioas, 0);
        match ictx.ioas_iova_ranges(&mut cmd) {
            Err(e @ IoasError::RangesTooSmall { .. }) => {
                assert_eq!(e.errno(), Errno::EMSGSIZE);
                assert!(
                    matches!(e, IoasError::RangesTooSmall { total: 1, ref ranges } if ranges.is_empty())
                );
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(cmd.num_iovas, 1);
        let mut cmd = ranges_cmd(ioas, 1);
        cmd.__reserved = 1;
        assert_errno!(ictx.ioas_iova_ranges(&mut cmd), EOPNOTSUPP);
    }

    /// Kernel `iommufd_ioas_load_iovas`: `start >= last` or ranges that
    /// overlap are EINVAL; an empty list clears.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn allow_iovas_bad_entry_is_einval() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        assert_errno!(allow(&ictx, ioas, &[(P, P)]), EINVAL);
        assert_errno!(allow(&ictx, ioas, &[(2 * P, P)]), EINVAL);
        assert_errno!(allow(&ictx, ioas, &[(P, 4 * P), (4 * P, 8 * P)]), EINVAL);
        allow(
            &ictx,
            ioas,
            &[(8 * P, 9 * P), (P, 4 * P - 1), (4 * P, 5 * P)],
        )
        .unwrap();
        assert_eq!(ictx.ioas(ioas).unwrap().iopt().allowed().len(), 3);
        allow(&ictx, ioas, &[]).unwrap();
        assert!(ictx.ioas(ioas).unwrap().iopt().allowed().is_empty());
    }

    /// PROTOCOL.md: an array shorter than `num_iovas` is EFAULT.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn allow_iovas_short_array_is_efault() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let cmd = IommuIoasAllowIovas {
            size: 24,
            ioas_id: ioas,
            num_iovas: 2,
            ..Default::default()
        };
        assert_errno!(
            ictx.ioas_allow_iovas(&cmd, &[IommuIovaRange { start: 0, last: 9 }]),
            EFAULT
        );
    }

    /// Kernel `iopt_set_allow_iova`: mappings outside the new list stay,
    /// and fixed maps outside it still work (only allocation is bound).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn allow_iovas_keeps_existing_and_fixed_maps() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(1);
        map_fixed(&ictx, ioas, &fd, 0, P, 100 * P).unwrap();
        allow(&ictx, ioas, &[(P, 10 * P)]).unwrap();
        map_fixed(&ictx, ioas, &fd, 0, P, 200 * P).unwrap();
        assert_eq!(ictx.ioas(ioas).unwrap().iopt().areas().len(), 2);
    }

    /// TEST_F(iommufd_ioas, ioas_option_huge_pages): get 1, set 0, get 0,
    /// set 2 is EINVAL, set 1.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn option_huge_pages_get_set() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let mut cmd = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, ioas, 3);
        ictx.option(&mut cmd).unwrap();
        assert_eq!(cmd.val64, 1);
        let mut cmd = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, ioas, 0);
        ictx.option(&mut cmd).unwrap();
        let mut cmd = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, ioas, 3);
        ictx.option(&mut cmd).unwrap();
        assert_eq!(cmd.val64, 0);
        let mut cmd = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, ioas, 2);
        assert_errno!(ictx.option(&mut cmd), EINVAL);
        let mut cmd = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, ioas, 1);
        ictx.option(&mut cmd).unwrap();
        let mut cmd = option_cmd(IOMMU_OPTION_HUGE_PAGES, 7, ioas, 1);
        assert_errno!(ictx.option(&mut cmd), EOPNOTSUPP);
    }

    /// TEST_F(iommufd, global_options): HUGE_PAGES without an IOAS is
    /// ENOENT.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn option_huge_pages_non_ioas_is_enoent() {
        let ictx = ctx();
        let mut cmd = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_GET, 0, 0);
        assert_errno!(ictx.option(&mut cmd), ENOENT);
        let mut cmd = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, 0, 0);
        assert_errno!(ictx.option(&mut cmd), ENOENT);
    }

    /// TEST_F(iommufd, global_options): RLIMIT_MODE get 0, set 1, set 2 is
    /// EINVAL, get 1; an object id is EOPNOTSUPP; with objects set is EBUSY
    /// (kernel `iommufd_option_rlimit_mode`).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn option_rlimit_mode_global() {
        let ictx = ctx();
        let mut cmd = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 1);
        ictx.option(&mut cmd).unwrap();
        assert_eq!(cmd.val64, 0);
        let mut cmd = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 1);
        ictx.option(&mut cmd).unwrap();
        let mut cmd = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 2);
        assert_errno!(ictx.option(&mut cmd), EINVAL);
        let mut cmd = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 0);
        ictx.option(&mut cmd).unwrap();
        assert_eq!(cmd.val64, 1);
        let mut cmd = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 1, 0);
        assert_errno!(ictx.option(&mut cmd), EOPNOTSUPP);
        ioas_alloc(&ictx);
        let mut cmd = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_SET, 0, 0);
        assert_errno!(ictx.option(&mut cmd), EBUSY);
    }

    /// Kernel `iommufd_option`: an unknown option or a reserved field is
    /// EOPNOTSUPP.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn option_unknown_is_eopnotsupp() {
        let ictx = ctx();
        let mut cmd = option_cmd(9, IOMMU_OPTION_OP_GET, 0, 0);
        assert_errno!(ictx.option(&mut cmd), EOPNOTSUPP);
        let mut cmd = option_cmd(IOMMU_OPTION_RLIMIT_MODE, IOMMU_OPTION_OP_GET, 0, 0);
        cmd.__reserved = 1;
        assert_errno!(ictx.option(&mut cmd), EOPNOTSUPP);
    }

    /// TEST_F(iommufd_ioas, ioas_align_change): without huge pages maps
    /// must be page aligned (EINVAL); turning them off with a misaligned
    /// mapping is EADDRINUSE.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn option_huge_pages_off_with_misaligned_area_is_eaddrinuse() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(4);
        let base = 0x10_0000;
        map_fixed(&ictx, ioas, &fd, 0, P, base).unwrap();
        let mut off = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, ioas, 0);
        ictx.option(&mut off).unwrap();
        assert_errno!(map_fixed(&ictx, ioas, &fd, P / 2, P, base + P), EINVAL);
        let mut on = option_cmd(IOMMU_OPTION_HUGE_PAGES, IOMMU_OPTION_OP_SET, ioas, 1);
        ictx.option(&mut on).unwrap();
        map_fixed(&ictx, ioas, &fd, P / 2, P, base + P).unwrap();
        assert_errno!(ictx.option(&mut off), EADDRINUSE);
        unmap(&ictx, ioas, base + P, P).unwrap();
        ictx.option(&mut off).unwrap();
    }

    // ---- reference model (crate::model) --------------------------------

    fn op() -> impl Strategy<Value = Op> {
        use crate::model::PAGES;
        let ioas = 0usize..2;
        prop_oneof![
            3 => (ioas.clone(), 0u64..PAGES, 1u64..5, 0u64..12)
                .prop_map(|(ioas, page, npages, file_page)| Op::MapFixed { ioas, page, npages, file_page }),
            3 => (ioas.clone(), 1u64..6, 0u64..12)
                .prop_map(|(ioas, npages, file_page)| Op::MapAuto { ioas, npages, file_page }),
            3 => (ioas.clone(), 0u64..PAGES, 1u64..8)
                .prop_map(|(ioas, page, npages)| Op::Unmap { ioas, page, npages }),
            1 => ioas.clone().prop_map(|ioas| Op::UnmapAll { ioas }),
            2 => (ioas.clone(), ioas.clone(), 0u64..PAGES, 1u64..5, prop::option::of(0u64..PAGES))
                .prop_map(|(dst, src, src_page, npages, dst_page)| Op::Copy { dst, src, src_page, npages, dst_page }),
            1 => (ioas, 0u64..PAGES, any::<u64>())
                .prop_map(|(ioas, page, value)| Op::Write { ioas, page, value }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Random map (fixed and allocated) / unmap / copy / write against
        /// a page-granular reference model: same results and errors, and
        /// every page translates to the file page the model says (content
        /// tags), with writes visible through every IOVA sharing the page.
        #[test]
        #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
        fn matches_reference_model(ops in prop::collection::vec(op(), 1..40)) {
            let mut check = Checker::new();
            for op in &ops {
                check.apply(op).map_err(TestCaseError::fail)?;
            }
        }
    }
}
