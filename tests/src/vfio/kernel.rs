//! [`Vfio`] over Linux's VFIO: real ioctls, pread and pwrite on real
//! descriptors. Memory for DMA is named by its user virtual address (our
//! shared mapping of the region's memfd), as the kernel wants it.
//!
//! The request numbers are the kernel's `_IO(VFIO_TYPE, nr)` (and
//! `_IO(IOMMUFD_TYPE, nr)`), both types `';'`, with the `nr`s vcdev's uAPI
//! modules carry (they are vcdev's request codes too).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vcdev::cdev::vfio_uapi::*;
use vcdev_iommu::uapi::{
    IommuIoasAlloc, IommuIoasMap, IommuIoasUnmap, IOMMUFD_CMD_IOAS_ALLOC, IOMMUFD_CMD_IOAS_MAP,
    IOMMUFD_CMD_IOAS_UNMAP,
};
use vcdev_iommu::Errno;
use vm_memory::ByteValued;

use super::{Mapping, Vfio};
use crate::mem::Region;

/// `VFIO_TYPE` and `IOMMUFD_TYPE`: `';'`.
const IOCTL_TYPE: u32 = b';' as u32;

/// `_IO(';', nr)`: no direction or size bits, as <linux/vfio.h> and
/// <linux/iommufd.h> define every request.
fn io(nr: u32) -> libc::Ioctl {
    // `Ioctl` is c_ulong on glibc (the only libc these tests link).
    libc::Ioctl::from((IOCTL_TYPE << 8) | nr)
}

/// The errno of the last failed call.
fn last_errno() -> Errno {
    Errno::from_io(&std::io::Error::last_os_error())
}

/// `size_of` a struct as its u32 size word.
fn size32<T>() -> u32 {
    u32::try_from(size_of::<T>()).unwrap_or(u32::MAX)
}

/// One open VFIO or iommufd descriptor.
#[derive(Debug)]
pub struct KernelFile {
    fd: OwnedFd,
}

impl KernelFile {
    /// ioctl `nr` with a plain integer argument: its result.
    fn ioctl_val(&self, nr: u32, arg: libc::c_ulong) -> Result<i32, Errno> {
        // SAFETY: requests that take an integer argument (or none) read
        // nothing from our memory; the descriptor is open.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), io(nr), arg) };
        if r < 0 {
            Err(last_errno())
        } else {
            Ok(r)
        }
    }

    /// ioctl `nr` on the bytes of `buf` (a struct and what follows it),
    /// which the kernel may read and write in place.
    fn ioctl_buf(&self, nr: u32, buf: &mut [u8]) -> Result<i32, Errno> {
        // SAFETY: `buf` is valid and writable for its whole length, which
        // is the argsz/size the struct at its start announces, so the
        // kernel reads and writes only inside it.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), io(nr), buf.as_mut_ptr()) };
        if r < 0 {
            Err(last_errno())
        } else {
            Ok(r)
        }
    }

    /// ioctl `nr` on struct `cmd`: the struct as the kernel left it.
    fn ioctl_struct<T: ByteValued>(&self, nr: u32, mut cmd: T) -> Result<T, Errno> {
        self.ioctl_buf(nr, cmd.as_mut_slice())?;
        Ok(cmd)
    }

    /// A file from a descriptor the kernel returned.
    fn from_raw(fd: i32) -> KernelFile {
        // SAFETY: `fd` is a fresh descriptor the kernel just returned to
        // us; nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        KernelFile { fd }
    }

    /// The descriptor as a `std::fs::File` for pread/pwrite (borrowed: not
    /// closed when dropped).
    fn with_file<R>(&self, f: impl FnOnce(&std::fs::File) -> R) -> R {
        let dup = std::mem::ManuallyDrop::new(
            // SAFETY: the descriptor stays open while `self` lives, and the
            // ManuallyDrop never closes it.
            unsafe { std::fs::File::from_raw_fd(self.fd.as_raw_fd()) },
        );
        f(&dup)
    }
}

impl Vfio for KernelFile {
    fn open(path: &Path) -> Result<Self, Errno> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Errno::from_io(&e))?;
        Ok(KernelFile { fd: f.into() })
    }

    fn get_api_version(&self) -> Result<i32, Errno> {
        self.ioctl_val(VFIO_GET_API_VERSION, 0)
    }

    fn check_extension(&self, ext: u32) -> Result<i32, Errno> {
        self.ioctl_val(VFIO_CHECK_EXTENSION, libc::c_ulong::from(ext))
    }

    fn set_iommu(&self, ty: u32) -> Result<(), Errno> {
        self.ioctl_val(VFIO_SET_IOMMU, libc::c_ulong::from(ty))
            .map(|_| ())
    }

    fn iommu_info_flags(&self) -> Result<u32, Errno> {
        let c = VfioIommuType1Info {
            argsz: size32::<VfioIommuType1Info>(),
            ..Default::default()
        };
        Ok(self.ioctl_struct(VFIO_IOMMU_GET_INFO, c)?.flags)
    }

    fn map_dma(
        &self,
        mem: &Region,
        offset: u64,
        iova: u64,
        size: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        let c = VfioIommuType1DmaMap {
            argsz: size32::<VfioIommuType1DmaMap>(),
            flags,
            vaddr: mem.uaddr().checked_add(offset).ok_or(Errno::EOVERFLOW)?,
            iova,
            size,
        };
        self.ioctl_struct(VFIO_IOMMU_MAP_DMA, c).map(|_| ())
    }

    fn unmap_dma(&self, iova: u64, size: u64, flags: u32) -> Result<u64, Errno> {
        let c = VfioIommuType1DmaUnmap {
            argsz: size32::<VfioIommuType1DmaUnmap>(),
            flags,
            iova,
            size,
        };
        Ok(self.ioctl_struct(VFIO_IOMMU_UNMAP_DMA, c)?.size)
    }

    fn group_get_status(&self) -> Result<u32, Errno> {
        let c = VfioGroupStatus {
            argsz: size32::<VfioGroupStatus>(),
            flags: 0,
        };
        Ok(self.ioctl_struct(VFIO_GROUP_GET_STATUS, c)?.flags)
    }

    fn group_set_container_fd(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        let mut raw = fd.as_raw_fd().to_ne_bytes();
        self.ioctl_buf(VFIO_GROUP_SET_CONTAINER, &mut raw)
            .map(|_| ())
    }

    fn group_unset_container(&self) -> Result<(), Errno> {
        self.ioctl_val(VFIO_GROUP_UNSET_CONTAINER, 0).map(|_| ())
    }

    fn group_get_device_fd(&self, name: &str) -> Result<Self, Errno> {
        let name = CString::new(name).map_err(|_| Errno::EINVAL)?;
        let mut bytes = name.into_bytes_with_nul();
        let fd = self.ioctl_buf(VFIO_GROUP_GET_DEVICE_FD, &mut bytes)?;
        Ok(KernelFile::from_raw(fd))
    }

    fn device_info(&self) -> Result<VfioDeviceInfo, Errno> {
        let c = VfioDeviceInfo {
            argsz: size32::<VfioDeviceInfo>(),
            ..Default::default()
        };
        self.ioctl_struct(VFIO_DEVICE_GET_INFO, c)
    }

    fn region_info(&self, index: u32) -> Result<VfioRegionInfo, Errno> {
        let c = VfioRegionInfo {
            argsz: size32::<VfioRegionInfo>(),
            index,
            ..Default::default()
        };
        self.ioctl_struct(VFIO_DEVICE_GET_REGION_INFO, c)
    }

    fn irq_info(&self, index: u32) -> Result<VfioIrqInfo, Errno> {
        let c = VfioIrqInfo {
            argsz: size32::<VfioIrqInfo>(),
            index,
            ..Default::default()
        };
        self.ioctl_struct(VFIO_DEVICE_GET_IRQ_INFO, c)
    }

    fn region_read(&self, offset: u64, count: u32) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0u8; usize::try_from(count).map_err(|_| Errno::EINVAL)?];
        let n = self
            .with_file(|f| f.read_at(&mut buf, offset))
            .map_err(|e| Errno::from_io(&e))?;
        buf.truncate(n);
        Ok(buf)
    }

    fn region_write(&self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        self.with_file(|f| f.write_at(data, offset))
            .map_err(|e| Errno::from_io(&e))
    }

    fn region_mmap(&self, offset: u64, len: u64) -> Result<Mapping, Errno> {
        Mapping::new(self.fd.as_fd(), offset, len)
    }

    fn set_irqs_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<(), Errno> {
        let count = u32::try_from(fds.len()).map_err(|_| Errno::EINVAL)?;
        let data: Vec<u8> = fds
            .iter()
            .flat_map(|fd| fd.map_or(-1, |f| f.as_raw_fd()).to_ne_bytes())
            .collect();
        let hdr = VfioIrqSet {
            argsz: size32::<VfioIrqSet>() + u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count,
        };
        let mut buf = hdr.as_slice().to_vec();
        buf.extend_from_slice(&data);
        self.ioctl_buf(VFIO_DEVICE_SET_IRQS, &mut buf).map(|_| ())
    }

    fn set_irqs_disable(&self, index: u32) -> Result<(), Errno> {
        let hdr = VfioIrqSet {
            argsz: size32::<VfioIrqSet>(),
            flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 0,
        };
        self.ioctl_struct(VFIO_DEVICE_SET_IRQS, hdr).map(|_| ())
    }

    fn reset(&self) -> Result<(), Errno> {
        self.ioctl_val(VFIO_DEVICE_RESET, 0).map(|_| ())
    }

    fn ioeventfd(
        &self,
        offset: u64,
        size: u32,
        data: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), Errno> {
        let c = VfioDeviceIoeventfd {
            argsz: size32::<VfioDeviceIoeventfd>(),
            flags: size,
            offset,
            data,
            fd: fd.map_or(-1, |f| f.as_raw_fd()),
            reserved: 0,
        };
        self.ioctl_struct(VFIO_DEVICE_IOEVENTFD, c).map(|_| ())
    }

    fn bind_iommufd(&self, iommufd: &Self) -> Result<u32, Errno> {
        let c = VfioDeviceBindIommufd {
            argsz: size32::<VfioDeviceBindIommufd>(),
            flags: 0,
            iommufd: iommufd.fd.as_raw_fd(),
            out_devid: 0,
        };
        Ok(self.ioctl_struct(VFIO_DEVICE_BIND_IOMMUFD, c)?.out_devid)
    }

    fn attach_pt(&self, pt_id: u32) -> Result<u32, Errno> {
        // The 12-byte struct without PASID (argsz = offsetofend(pt_id)).
        let c = VfioDeviceAttachIommufdPt {
            argsz: u32::try_from(VfioDeviceAttachIommufdPt::MIN_SIZE).unwrap_or(u32::MAX),
            flags: 0,
            pt_id,
            pasid: 0,
        };
        Ok(self.ioctl_struct(VFIO_DEVICE_ATTACH_IOMMUFD_PT, c)?.pt_id)
    }

    fn ioas_alloc(&self) -> Result<u32, Errno> {
        let c = IommuIoasAlloc {
            size: size32::<IommuIoasAlloc>(),
            ..Default::default()
        };
        Ok(self.ioctl_struct(IOMMUFD_CMD_IOAS_ALLOC, c)?.out_ioas_id)
    }

    fn ioas_map(
        &self,
        ioas_id: u32,
        mem: &Region,
        offset: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        let c = IommuIoasMap {
            size: size32::<IommuIoasMap>(),
            flags,
            ioas_id,
            __reserved: 0,
            user_va: mem.uaddr().checked_add(offset).ok_or(Errno::EOVERFLOW)?,
            length,
            iova,
        };
        Ok(self.ioctl_struct(IOMMUFD_CMD_IOAS_MAP, c)?.iova)
    }

    fn ioas_unmap(&self, ioas_id: u32, iova: u64, length: u64) -> Result<u64, Errno> {
        let c = IommuIoasUnmap {
            size: size32::<IommuIoasUnmap>(),
            ioas_id,
            iova,
            length,
        };
        Ok(self.ioctl_struct(IOMMUFD_CMD_IOAS_UNMAP, c)?.length)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
