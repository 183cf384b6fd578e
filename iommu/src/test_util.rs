//! Test helpers for the iommufd object model, one per command (as the
//! kernel's `iommufd_utils.h` has them), and for IOTLB address spaces. This
//! crate's tests use them, and with feature `testing` so do the backend's
//! tests and the fuzz target (`tests/fuzz`).

use std::fs::File;
use std::mem::size_of;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::device::DeviceHandle;
use crate::io_pagetable::{IovaRange, PAGE_SIZE};
use crate::ioas::IoasError;
use crate::mem::{sealed_memfd, SealPolicy};
use crate::object::Iommufd;
use crate::space::AddressSpace;
use crate::uapi::*;

pub const P: u64 = PAGE_SIZE;
pub const RW: u32 = IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
pub const FIXED: u32 = IOMMU_IOAS_MAP_FIXED_IOVA | RW;

/// Proptest settings for `cases` cases. Under Miri, which runs a test some
/// thousand times slower and may not read the regression files, a few
/// cases and no persistence: the pure parts get checked for UB, the
/// native run keeps the search.
#[cfg(test)]
pub(crate) fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    let native = proptest::test_runner::Config {
        cases,
        ..proptest::test_runner::Config::default()
    };
    if cfg!(miri) {
        proptest::test_runner::Config {
            cases: cases.min(MIRI_PROPTEST_CASES),
            failure_persistence: None,
            ..native
        }
    } else {
        native
    }
}

/// Cases of a proptest under Miri.
#[cfg(test)]
const MIRI_PROPTEST_CASES: u32 = 4;

/// Asserts that a result is the given errno.
#[cfg(test)]
macro_rules! assert_errno {
    ($r:expr, $e:ident) => {
        match $r {
            Ok(_) => panic!("expected {}, got Ok", stringify!($e)),
            Err(err) => assert_eq!(err.errno(), $crate::Errno::$e, "{err:?}"),
        }
    };
}
#[cfg(test)]
pub(crate) use assert_errno;

pub fn ctx() -> Arc<Iommufd> {
    Iommufd::new(SealPolicy::RequireShrinkSeal)
}

pub fn ioas_alloc(ictx: &Iommufd) -> u32 {
    let mut cmd = IommuIoasAlloc {
        size: 12,
        ..Default::default()
    };
    ictx.ioas_alloc(&mut cmd).unwrap();
    cmd.out_ioas_id
}

/// A sealed memfd of `pages` pages; the first 8 bytes of page i hold i.
pub fn memfd(pages: u64) -> OwnedFd {
    let fd = sealed_memfd("test", pages * P).unwrap();
    let f = File::from(fd);
    for i in 0..pages {
        f.write_all_at(&i.to_le_bytes(), i * P).unwrap();
    }
    f.into()
}

pub fn dup(fd: &OwnedFd) -> OwnedFd {
    fd.try_clone().unwrap()
}

pub fn map(
    ictx: &Iommufd,
    ioas: u32,
    flags: u32,
    fd: &OwnedFd,
    user_va: u64,
    length: u64,
    iova: u64,
) -> Result<u64, IoasError> {
    let mut cmd = IommuIoasMap {
        size: 40,
        flags,
        ioas_id: ioas,
        __reserved: 0,
        user_va,
        length,
        iova,
    };
    ictx.ioas_map(&mut cmd, Some(dup(fd)))
}

/// IOMMU_IOAS_MAP_FILE of `length` bytes from `start` of `fd`.
pub fn map_file(
    ictx: &Iommufd,
    ioas: u32,
    flags: u32,
    fd: &OwnedFd,
    start: u64,
    length: u64,
    iova: u64,
) -> Result<u64, IoasError> {
    let mut cmd = IommuIoasMapFile {
        size: size_of::<IommuIoasMapFile>() as u32,
        flags,
        ioas_id: ioas,
        fd: -1,
        start,
        length,
        iova,
    };
    ictx.ioas_map_file(&mut cmd, Some(dup(fd)))
}

pub fn map_fixed(
    ictx: &Iommufd,
    ioas: u32,
    fd: &OwnedFd,
    user_va: u64,
    length: u64,
    iova: u64,
) -> Result<u64, IoasError> {
    map(ictx, ioas, FIXED, fd, user_va, length, iova)
}

pub fn map_auto(
    ictx: &Iommufd,
    ioas: u32,
    fd: &OwnedFd,
    user_va: u64,
    length: u64,
) -> Result<u64, IoasError> {
    map(ictx, ioas, RW, fd, user_va, length, 0)
}

pub fn unmap(ictx: &Iommufd, ioas: u32, iova: u64, length: u64) -> Result<u64, IoasError> {
    let mut cmd = IommuIoasUnmap {
        size: 24,
        ioas_id: ioas,
        iova,
        length,
    };
    ictx.ioas_unmap(&mut cmd)
}

pub fn copy(
    ictx: &Iommufd,
    flags: u32,
    dst: u32,
    dst_iova: u64,
    src: u32,
    src_iova: u64,
    length: u64,
) -> Result<u64, IoasError> {
    let mut cmd = IommuIoasCopy {
        size: 40,
        flags,
        dst_ioas_id: dst,
        src_ioas_id: src,
        length,
        dst_iova,
        src_iova,
    };
    ictx.ioas_copy(&mut cmd)
}

pub fn allow(ictx: &Iommufd, ioas: u32, ranges: &[(u64, u64)]) -> Result<(), IoasError> {
    let list: Vec<IommuIovaRange> = ranges
        .iter()
        .map(|&(start, last)| IommuIovaRange { start, last })
        .collect();
    let cmd = IommuIoasAllowIovas {
        size: 24,
        ioas_id: ioas,
        num_iovas: u32::try_from(list.len()).unwrap(),
        __reserved: 0,
        allowed_iovas: 0,
    };
    ictx.ioas_allow_iovas(&cmd, &list)
}

/// What a device's attach hook saw: one entry per call.
pub type HookLog = Arc<Mutex<Vec<Option<Arc<AddressSpace>>>>>;

pub fn device_with(aperture: IovaRange, reserved: Vec<IovaRange>) -> (Arc<DeviceHandle>, HookLog) {
    let log: HookLog = Arc::default();
    let l = log.clone();
    let dev = DeviceHandle::new(
        "vfio0",
        aperture,
        reserved,
        Box::new(move |s| l.lock().unwrap().push(s)),
    )
    .unwrap();
    (dev, log)
}

pub fn device() -> (Arc<DeviceHandle>, HookLog) {
    device_with(IovaRange::ALL, Vec::new())
}

/// The u64 at `iova` of IOAS `ioas`, read through a reader.
pub fn read_u64(ictx: &Iommufd, ioas: u32, iova: u64) -> Option<u64> {
    let space = ictx.ioas_space(ioas).unwrap();
    let mut r = space.reader();
    let s = r.enter();
    let sl = s.translate(iova, 8, vm_memory::Permissions::Read).ok()?;
    assert_eq!(sl.len(), 1);
    // SAFETY: 8 bytes translated just now, inside the session.
    Some(unsafe { std::ptr::read_unaligned(sl[0].ptr.cast::<u64>()) })
}

/// Writes `v` at `iova` of IOAS `ioas` through a reader's host pointer.
pub fn write_u64(ictx: &Iommufd, ioas: u32, iova: u64, v: u64) {
    let space = ictx.ioas_space(ioas).unwrap();
    let mut r = space.reader();
    let s = r.enter();
    let sl = s.translate(iova, 8, vm_memory::Permissions::Write).unwrap();
    assert_eq!(sl.len(), 1);
    // SAFETY: 8 bytes translated for write just now, inside the session.
    unsafe { std::ptr::write_unaligned(sl[0].ptr.cast::<u64>(), v) };
}

/// IOTLB-maps `pages` consecutive pages from `iova` to scattered pages of
/// `mem`: IOVA page `i` to host page `host_page(i)`, read-write. Rings and
/// buffers laid over them are contiguous to the device, never in host
/// memory.
pub fn map_scattered(
    space: &AddressSpace,
    mem: &Arc<crate::MemObject>,
    iova: u64,
    pages: u64,
    host_page: impl Fn(u64) -> u64,
) {
    for i in 0..pages {
        space
            .iotlb_update(
                iova + i * PAGE_SIZE,
                PAGE_SIZE,
                mem,
                host_page(i) * PAGE_SIZE,
                vm_memory::Permissions::ReadWrite,
            )
            .expect("an IOTLB update inside the memory object");
    }
}
