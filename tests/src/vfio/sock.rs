//! [`Vfio`] over vcdev's cdev door: each call is the client's message of
//! the same name (`vcdev::cdev::client`); memory is named by its memfd and
//! an offset in it, the descriptor riding with the message.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use vcdev::cdev::client::File;
use vcdev::cdev::vfio_uapi::{
    VfioDeviceInfo, VfioIommuType1Info, VfioIrqInfo, VfioIrqSet, VfioRegionInfo,
    VFIO_GROUP_SET_CONTAINER, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE,
};
use vcdev_iommu::Errno;

use super::{Mapping, Vfio};
use crate::mem::Region;

/// The offset in `mem`'s file of byte `offset` of the region.
fn file_offset(mem: &Region, offset: u64) -> Result<u64, Errno> {
    mem.offset.checked_add(offset).ok_or(Errno::EOVERFLOW)
}

impl Vfio for File {
    fn open(path: &Path) -> Result<Self, Errno> {
        File::open(path)
    }

    fn get_api_version(&self) -> Result<i32, Errno> {
        File::get_api_version(self)
    }

    fn check_extension(&self, ext: u32) -> Result<i32, Errno> {
        File::check_extension(self, ext)
    }

    fn set_iommu(&self, ty: u32) -> Result<(), Errno> {
        File::set_iommu(self, ty)
    }

    fn iommu_info_flags(&self) -> Result<u32, Errno> {
        let argsz = u32::try_from(VfioIommuType1Info::SIZE).map_err(|_| Errno::EINVAL)?;
        Ok(File::iommu_get_info(self, argsz)?.0.flags)
    }

    fn map_dma(
        &self,
        mem: &Region,
        offset: u64,
        iova: u64,
        size: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        let at = file_offset(mem, offset)?;
        File::map_dma(self, mem.file.as_fd(), at, iova, size, flags)
    }

    fn unmap_dma(&self, iova: u64, size: u64, flags: u32) -> Result<u64, Errno> {
        File::unmap_dma(self, iova, size, flags)
    }

    fn group_get_status(&self) -> Result<u32, Errno> {
        File::group_get_status(self)
    }

    fn group_set_container_fd(&self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        let raw = fd.as_raw_fd();
        self.call(VFIO_GROUP_SET_CONTAINER, &raw.to_le_bytes(), &[raw])?
            .ok()
            .map(|_| ())
    }

    fn group_unset_container(&self) -> Result<(), Errno> {
        File::group_unset_container(self)
    }

    fn group_get_device_fd(&self, name: &str) -> Result<Self, Errno> {
        File::group_get_device_fd(self, name)
    }

    fn device_info(&self) -> Result<VfioDeviceInfo, Errno> {
        File::device_info(self)
    }

    fn region_info(&self, index: u32) -> Result<VfioRegionInfo, Errno> {
        File::region_info(self, index)
    }

    fn irq_info(&self, index: u32) -> Result<VfioIrqInfo, Errno> {
        File::irq_info(self, index)
    }

    fn region_read(&self, offset: u64, count: u32) -> Result<Vec<u8>, Errno> {
        File::region_read(self, offset, count)
    }

    fn region_write(&self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        File::region_write(self, offset, data)
    }

    /// vcdev's regions carry no VFIO_REGION_INFO_FLAG_MMAP (PROTOCOL.md:
    /// region access is VCDEV_REGION_READ/WRITE): EINVAL, vfio-pci's answer
    /// for a region it cannot mmap.
    fn region_mmap(&self, _offset: u64, _len: u64) -> Result<Mapping, Errno> {
        Err(Errno::EINVAL)
    }

    fn set_irqs_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<(), Errno> {
        File::set_irqs_eventfds(self, index, start, fds)
    }

    fn set_irqs_disable(&self, index: u32) -> Result<(), Errno> {
        let hdr = VfioIrqSet {
            argsz: u32::try_from(VfioIrqSet::SIZE).map_err(|_| Errno::EINVAL)?,
            flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 0,
        };
        File::set_irqs_raw(self, &hdr, &[], &[])
    }

    fn reset(&self) -> Result<(), Errno> {
        File::reset(self)
    }

    fn ioeventfd(
        &self,
        offset: u64,
        size: u32,
        data: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), Errno> {
        File::ioeventfd(self, offset, size, data, fd)
    }

    fn bind_iommufd(&self, iommufd: &Self) -> Result<u32, Errno> {
        File::bind_iommufd(self, iommufd)
    }

    fn attach_pt(&self, pt_id: u32) -> Result<u32, Errno> {
        File::attach_pt(self, pt_id)
    }

    fn ioas_alloc(&self) -> Result<u32, Errno> {
        File::ioas_alloc(self)
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
        let at = file_offset(mem, offset)?;
        File::ioas_map_file(self, ioas_id, mem.file.as_fd(), at, length, iova, flags)
    }

    fn ioas_unmap(&self, ioas_id: u32, iova: u64, length: u64) -> Result<u64, Errno> {
        File::ioas_unmap(self, ioas_id, iova, length)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}
