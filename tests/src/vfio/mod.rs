//! VFIO as a driver sees it, over two transports.
//!
//! [`Vfio`] is one open VFIO file (container, group, device, iommufd) with
//! the kernel-named calls a userspace driver makes. It has two
//! implementations:
//!
//! - [`vcdev::cdev::client::File`]: vcdev's cdev door, each ioctl a message
//!   on a UNIX socket (PROTOCOL.md);
//! - [`kernel::KernelFile`]: real ioctls, pread, pwrite and mmap on real
//!   descriptors (`/dev/vfio/vfio`, `/dev/vfio/N`, `/dev/iommu`,
//!   `/dev/vfio/devices/vfioN`).
//!
//! The one place the two differ for a driver is how memory is named for
//! DMA: vcdev takes a sealed memfd and an offset in it, the kernel a user
//! virtual address. The calls that map take a [`Region`] and each
//! transport names it its own way.
//!
//! A device gets its DMA either through an iommufd IOAS
//! ([`IommufdBinding`], the cdev path) or through a type1 container
//! ([`GroupBinding`], the group path); both are a [`Transport`], which is
//! what the virtio-blk driver of [`crate::blk`] runs on.

pub mod kernel;
mod mapping;
mod sock;

pub use mapping::Mapping;

use std::os::fd::BorrowedFd;
use std::path::Path;

use vcdev::cdev::vfio_uapi::{
    VfioDeviceInfo, VfioIrqInfo, VfioRegionInfo, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_TYPE1V2_IOMMU,
};
use vcdev_iommu::uapi::{
    IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE,
};
use vcdev_iommu::Errno;

use crate::mem::Region;

/// Map flags for read-write DMA at a fixed IOVA (IOAS_MAP, IOAS_MAP_FILE).
pub const MAP_RW_FIXED: u32 =
    IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;

/// MAP_DMA flags for read-write DMA.
pub const DMA_RW: u32 = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;

/// One open VFIO file: the kernel's ioctls by their names. Every call
/// returns the kernel's errno on failure.
pub trait Vfio: Sized {
    /// Opens node `path` (`open(2)` with O_RDWR).
    fn open(path: &Path) -> Result<Self, Errno>;

    // --- container ----------------------------------------------------------

    /// VFIO_GET_API_VERSION.
    fn get_api_version(&self) -> Result<i32, Errno>;
    /// VFIO_CHECK_EXTENSION.
    fn check_extension(&self, ext: u32) -> Result<i32, Errno>;
    /// VFIO_SET_IOMMU.
    fn set_iommu(&self, ty: u32) -> Result<(), Errno>;
    /// VFIO_IOMMU_GET_INFO: its flags.
    fn iommu_info_flags(&self) -> Result<u32, Errno>;
    /// VFIO_IOMMU_MAP_DMA of `size` bytes of `mem` from `offset` at `iova`.
    fn map_dma(
        &self,
        mem: &Region,
        offset: u64,
        iova: u64,
        size: u64,
        flags: u32,
    ) -> Result<(), Errno>;
    /// VFIO_IOMMU_UNMAP_DMA: the bytes unmapped.
    fn unmap_dma(&self, iova: u64, size: u64, flags: u32) -> Result<u64, Errno>;

    // --- group ----------------------------------------------------------------

    /// VFIO_GROUP_GET_STATUS: its flags.
    fn group_get_status(&self) -> Result<u32, Errno>;
    /// VFIO_GROUP_SET_CONTAINER with any descriptor.
    fn group_set_container_fd(&self, fd: BorrowedFd<'_>) -> Result<(), Errno>;
    /// VFIO_GROUP_SET_CONTAINER.
    fn group_set_container(&self, container: &Self) -> Result<(), Errno> {
        self.group_set_container_fd(container.fd())
    }
    /// VFIO_GROUP_UNSET_CONTAINER.
    fn group_unset_container(&self) -> Result<(), Errno>;
    /// VFIO_GROUP_GET_DEVICE_FD: the device file of `name`.
    fn group_get_device_fd(&self, name: &str) -> Result<Self, Errno>;

    // --- device ---------------------------------------------------------------

    /// VFIO_DEVICE_GET_INFO.
    fn device_info(&self) -> Result<VfioDeviceInfo, Errno>;
    /// VFIO_DEVICE_GET_REGION_INFO.
    fn region_info(&self, index: u32) -> Result<VfioRegionInfo, Errno>;
    /// VFIO_DEVICE_GET_IRQ_INFO.
    fn irq_info(&self, index: u32) -> Result<VfioIrqInfo, Errno>;
    /// pread of `count` bytes at device file offset `offset`.
    fn region_read(&self, offset: u64, count: u32) -> Result<Vec<u8>, Errno>;
    /// pwrite of `data` at device file offset `offset`.
    fn region_write(&self, offset: u64, data: &[u8]) -> Result<usize, Errno>;
    /// mmap of `len` bytes at device file offset `offset` (a region whose
    /// info has VFIO_REGION_INFO_FLAG_MMAP).
    fn region_mmap(&self, offset: u64, len: u64) -> Result<Mapping, Errno>;
    /// VFIO_DEVICE_SET_IRQS with DATA_EVENTFD | ACTION_TRIGGER: vectors
    /// `start..` get `fds` (None de-assigns).
    fn set_irqs_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<(), Errno>;
    /// VFIO_DEVICE_SET_IRQS with DATA_NONE | ACTION_TRIGGER and count 0:
    /// disables the index.
    fn set_irqs_disable(&self, index: u32) -> Result<(), Errno>;
    /// VFIO_DEVICE_RESET.
    fn reset(&self) -> Result<(), Errno>;
    /// VFIO_DEVICE_IOEVENTFD: `fd` fires a write of `data` (`size` bytes)
    /// at device file offset `offset`; None de-assigns.
    fn ioeventfd(
        &self,
        offset: u64,
        size: u32,
        data: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), Errno>;
    /// VFIO_DEVICE_BIND_IOMMUFD: the device id.
    fn bind_iommufd(&self, iommufd: &Self) -> Result<u32, Errno>;
    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT: the HWPT id.
    fn attach_pt(&self, pt_id: u32) -> Result<u32, Errno>;

    // --- iommufd --------------------------------------------------------------

    /// IOMMU_IOAS_ALLOC.
    fn ioas_alloc(&self) -> Result<u32, Errno>;
    /// IOMMU_IOAS_MAP of `length` bytes of `mem` from `offset` at `iova`
    /// (FIXED_IOVA in `flags`): the IOVA.
    fn ioas_map(
        &self,
        ioas_id: u32,
        mem: &Region,
        offset: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno>;
    /// IOMMU_IOAS_UNMAP: the bytes unmapped.
    fn ioas_unmap(&self, ioas_id: u32, iova: u64, length: u64) -> Result<u64, Errno>;

    /// The descriptor (to pass as an argument).
    fn fd(&self) -> BorrowedFd<'_>;
}

/// A device with a way to give it DMA: what the driver runs on.
pub trait Transport {
    /// The file type.
    type File: Vfio;
    /// The device file.
    fn device(&self) -> &Self::File;
    /// Maps `len` bytes of `mem` from `offset` at `iova`, read-write.
    fn map(&self, mem: &Region, offset: u64, len: u64, iova: u64) -> Result<(), Errno>;
    /// Unmaps `len` bytes at `iova`: the bytes unmapped.
    fn unmap(&self, iova: u64, len: u64) -> Result<u64, Errno>;
    /// What the transport is, for messages (`iommufd`, `group`).
    fn kind(&self) -> &'static str;
}

/// The cdev path: an iommufd with one IOAS, the device bound to it and
/// attached (the usual sequence of `tools/testing/selftests/vfio` and
/// QEMU's iommufd backend).
#[derive(Debug)]
pub struct IommufdBinding<F> {
    /// The iommufd.
    pub iommufd: F,
    /// The device file.
    pub dev: F,
    /// The device id.
    pub devid: u32,
    /// The IOAS.
    pub ioas: u32,
    /// The HWPT the device is attached to.
    pub hwpt: u32,
}

impl<F: Vfio> IommufdBinding<F> {
    /// Binds `dev` to `iommufd`, allocates an IOAS and attaches to it.
    pub fn bind(iommufd: F, dev: F) -> Result<Self, Errno> {
        let devid = dev.bind_iommufd(&iommufd)?;
        let ioas = iommufd.ioas_alloc()?;
        let hwpt = dev.attach_pt(ioas)?;
        Ok(IommufdBinding {
            iommufd,
            dev,
            devid,
            ioas,
            hwpt,
        })
    }

    /// Opens `iommu` and `device` and binds ([`IommufdBinding::bind`]).
    pub fn open(iommu: &Path, device: &Path) -> Result<Self, Errno> {
        Self::bind(F::open(iommu)?, F::open(device)?)
    }
}

impl<F: Vfio> Transport for IommufdBinding<F> {
    type File = F;

    fn device(&self) -> &F {
        &self.dev
    }

    fn map(&self, mem: &Region, offset: u64, len: u64, iova: u64) -> Result<(), Errno> {
        let got = self
            .iommufd
            .ioas_map(self.ioas, mem, offset, len, iova, MAP_RW_FIXED)?;
        if got == iova {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        }
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, Errno> {
        self.iommufd.ioas_unmap(self.ioas, iova, len)
    }

    fn kind(&self) -> &'static str {
        "iommufd"
    }
}

/// The group path: a container with the device's group in it and the
/// TYPE1v2 IOMMU set, the device file got through the group.
#[derive(Debug)]
pub struct GroupBinding<F> {
    /// The container.
    pub container: F,
    /// The group.
    pub group: F,
    /// The device file.
    pub dev: F,
}

impl<F: Vfio> GroupBinding<F> {
    /// Opens `container` and `group`, puts the group in the container,
    /// sets TYPE1v2 and gets device `name` from the group (the sequence of
    /// Documentation/driver-api/vfio.rst).
    pub fn open(container: &Path, group: &Path, name: &str) -> Result<Self, Errno> {
        let c = F::open(container)?;
        let g = F::open(group)?;
        g.group_set_container(&c)?;
        c.set_iommu(VFIO_TYPE1V2_IOMMU)?;
        let dev = g.group_get_device_fd(name)?;
        Ok(GroupBinding {
            container: c,
            group: g,
            dev,
        })
    }
}

impl<F: Vfio> Transport for GroupBinding<F> {
    type File = F;

    fn device(&self) -> &F {
        &self.dev
    }

    fn map(&self, mem: &Region, offset: u64, len: u64, iova: u64) -> Result<(), Errno> {
        self.container.map_dma(mem, offset, iova, len, DMA_RW)
    }

    fn unmap(&self, iova: u64, len: u64) -> Result<u64, Errno> {
        self.container.unmap_dma(iova, len, 0)
    }

    fn kind(&self) -> &'static str {
        "group"
    }
}
