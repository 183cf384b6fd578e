//! The vfio uAPI structs and constants the cdev protocol carries
//! (`include/uapi/linux/vfio.h`), byte for byte, each with its minimum
//! size (the end of its last mandatory field, the kernel's `minsz`), plus
//! the protocol's own codes (PROTOCOL.md, "Opening a node gives a file",
//! "Device file requests").

use vcdev_iommu::uapi_struct;

/// `VCDEV_OPEN`: the message that hands out a file.
pub const VCDEV_OPEN: u32 = 0x0001;
/// `VCDEV_REGION_READ` (the kernel's pread on a device fd).
pub const VCDEV_REGION_READ: u32 = 0x200;
/// `VCDEV_REGION_WRITE` (the kernel's pwrite on a device fd).
pub const VCDEV_REGION_WRITE: u32 = 0x201;
/// `VCDEV_CTL`: a `vcdev ctl` command on the control socket (not a file).
pub const VCDEV_CTL: u32 = 0x300;

/// `VFIO_BASE`: request codes are `VFIO_BASE + n`.
const VFIO_BASE: u32 = 100;
/// VFIO_GET_API_VERSION.
pub const VFIO_GET_API_VERSION: u32 = VFIO_BASE;
/// VFIO_CHECK_EXTENSION.
pub const VFIO_CHECK_EXTENSION: u32 = VFIO_BASE + 1;
/// VFIO_SET_IOMMU.
pub const VFIO_SET_IOMMU: u32 = VFIO_BASE + 2;
/// VFIO_GROUP_GET_STATUS.
pub const VFIO_GROUP_GET_STATUS: u32 = VFIO_BASE + 3;
/// VFIO_GROUP_SET_CONTAINER.
pub const VFIO_GROUP_SET_CONTAINER: u32 = VFIO_BASE + 4;
/// VFIO_GROUP_UNSET_CONTAINER.
pub const VFIO_GROUP_UNSET_CONTAINER: u32 = VFIO_BASE + 5;
/// VFIO_GROUP_GET_DEVICE_FD.
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = VFIO_BASE + 6;
/// VFIO_DEVICE_GET_INFO.
pub const VFIO_DEVICE_GET_INFO: u32 = VFIO_BASE + 7;
/// VFIO_DEVICE_GET_REGION_INFO.
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = VFIO_BASE + 8;
/// VFIO_DEVICE_GET_IRQ_INFO.
pub const VFIO_DEVICE_GET_IRQ_INFO: u32 = VFIO_BASE + 9;
/// VFIO_DEVICE_SET_IRQS.
pub const VFIO_DEVICE_SET_IRQS: u32 = VFIO_BASE + 10;
/// VFIO_DEVICE_RESET.
pub const VFIO_DEVICE_RESET: u32 = VFIO_BASE + 11;
/// VFIO_IOMMU_GET_INFO.
pub const VFIO_IOMMU_GET_INFO: u32 = VFIO_BASE + 12;
/// VFIO_IOMMU_MAP_DMA.
pub const VFIO_IOMMU_MAP_DMA: u32 = VFIO_BASE + 13;
/// VFIO_IOMMU_UNMAP_DMA.
pub const VFIO_IOMMU_UNMAP_DMA: u32 = VFIO_BASE + 14;
/// VFIO_DEVICE_GET_PCI_HOT_RESET_INFO (the device file's code 112; the
/// container's 112 is VFIO_IOMMU_GET_INFO).
pub const VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: u32 = VFIO_BASE + 12;
/// VFIO_DEVICE_PCI_HOT_RESET (the device file's code 113).
pub const VFIO_DEVICE_PCI_HOT_RESET: u32 = VFIO_BASE + 13;
/// VFIO_DEVICE_IOEVENTFD.
pub const VFIO_DEVICE_IOEVENTFD: u32 = VFIO_BASE + 16;
/// VFIO_DEVICE_BIND_IOMMUFD.
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = VFIO_BASE + 18;
/// VFIO_DEVICE_ATTACH_IOMMUFD_PT.
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = VFIO_BASE + 19;
/// VFIO_DEVICE_DETACH_IOMMUFD_PT.
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u32 = VFIO_BASE + 20;

/// `VFIO_API_VERSION`.
pub const VFIO_API_VERSION: i32 = 0;
/// `VFIO_TYPE1_IOMMU`.
pub const VFIO_TYPE1_IOMMU: u32 = 1;
/// `VFIO_TYPE1v2_IOMMU`.
pub const VFIO_TYPE1V2_IOMMU: u32 = 3;
/// `VFIO_DMA_CC_IOMMU`: DMA is cache coherent.
pub const VFIO_DMA_CC_IOMMU: u32 = 4;
/// `VFIO_UNMAP_ALL` (an extension iommufd's compat layer reports).
pub const VFIO_UNMAP_ALL: u32 = 9;

/// `VFIO_DEVICE_FLAGS_RESET`.
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI`.
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

/// `VFIO_IRQ_INFO_EVENTFD`.
pub const VFIO_IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `VFIO_IRQ_INFO_MASKABLE`.
pub const VFIO_IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// `VFIO_IRQ_INFO_AUTOMASKED`.
pub const VFIO_IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// `VFIO_IRQ_INFO_NORESIZE`.
pub const VFIO_IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// `VFIO_IRQ_SET_DATA_NONE`.
pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_BOOL`.
pub const VFIO_IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// `VFIO_IRQ_SET_DATA_EVENTFD`.
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `VFIO_IRQ_SET_ACTION_MASK`.
pub const VFIO_IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// `VFIO_IRQ_SET_ACTION_UNMASK`.
pub const VFIO_IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// `VFIO_IRQ_SET_DATA_TYPE_MASK`.
pub const VFIO_IRQ_SET_DATA_TYPE_MASK: u32 =
    VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD;
/// `VFIO_IRQ_SET_ACTION_TYPE_MASK`.
pub const VFIO_IRQ_SET_ACTION_TYPE_MASK: u32 =
    VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER;

/// `VFIO_DEVICE_IOEVENTFD_SIZE_MASK` (1, 2, 4 or 8 bytes: one bit each).
pub const VFIO_DEVICE_IOEVENTFD_SIZE_MASK: u32 = 0xf;

/// `VFIO_DEVICE_ATTACH_PASID` / `VFIO_DEVICE_DETACH_PASID`.
pub const VFIO_DEVICE_PASID: u32 = 1 << 0;

/// `VFIO_IOMMU_INFO_PGSIZES`.
pub const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
/// `VFIO_IOMMU_INFO_CAPS`.
pub const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
/// `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`.
pub const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;
/// `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`.
pub const VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: u16 = 3;

/// `VFIO_DMA_MAP_FLAG_READ`.
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// `VFIO_DMA_MAP_FLAG_WRITE`.
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_DMA_MAP_FLAG_VADDR`.
pub const VFIO_DMA_MAP_FLAG_VADDR: u32 = 1 << 2;
/// `VFIO_DMA_UNMAP_FLAG_ALL`.
pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// `VFIO_GROUP_FLAGS_VIABLE`.
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
/// `VFIO_GROUP_FLAGS_CONTAINER_SET`.
pub const VFIO_GROUP_FLAGS_CONTAINER_SET: u32 = 1 << 1;

uapi_struct!(
    /// `struct vfio_device_info`.
    VfioDeviceInfo {
        /// Size of the struct (and capabilities).
        argsz: u32,
        /// `VFIO_DEVICE_FLAGS_*`.
        flags: u32,
        /// Number of regions.
        num_regions: u32,
        /// Number of irq indexes.
        num_irqs: u32,
        /// Offset of the first capability (none).
        cap_offset: u32,
        /// Padding.
        pad: u32,
    },
    last = num_irqs,
    size = 24
);

uapi_struct!(
    /// `struct vfio_region_info`.
    VfioRegionInfo {
        /// Size of the struct.
        argsz: u32,
        /// `VFIO_REGION_INFO_FLAG_*`.
        flags: u32,
        /// Region index.
        index: u32,
        /// Offset of the first capability (none).
        cap_offset: u32,
        /// Region size.
        size: u64,
        /// Region offset in the device file.
        offset: u64,
    },
    last = offset,
    size = 32
);

uapi_struct!(
    /// `struct vfio_irq_info`.
    VfioIrqInfo {
        /// Size of the struct.
        argsz: u32,
        /// `VFIO_IRQ_INFO_*`.
        flags: u32,
        /// Irq index.
        index: u32,
        /// Number of irqs in it.
        count: u32,
    },
    last = count,
    size = 16
);

uapi_struct!(
    /// `struct vfio_irq_set` (its data follows in the payload).
    VfioIrqSet {
        /// Size of the struct and data.
        argsz: u32,
        /// `VFIO_IRQ_SET_DATA_*` | `VFIO_IRQ_SET_ACTION_*`.
        flags: u32,
        /// Irq index.
        index: u32,
        /// First irq.
        start: u32,
        /// Number of irqs.
        count: u32,
    },
    last = count,
    size = 20
);

uapi_struct!(
    /// `struct vfio_device_ioeventfd`.
    VfioDeviceIoeventfd {
        /// Size of the struct.
        argsz: u32,
        /// Access size (`VFIO_DEVICE_IOEVENTFD_{8,16,32,64}`).
        flags: u32,
        /// Device file offset of the write.
        offset: u64,
        /// Data to write.
        data: u64,
        /// The eventfd, -1 to de-assign.
        fd: i32,
        /// Must be 0.
        reserved: u32,
    },
    last = fd,
    size = 32
);

uapi_struct!(
    /// `struct vfio_device_bind_iommufd`.
    VfioDeviceBindIommufd {
        /// Size of the struct.
        argsz: u32,
        /// Must be 0.
        flags: u32,
        /// The iommufd (its file rides with the message).
        iommufd: i32,
        /// Out: the device's object id.
        out_devid: u32,
    },
    last = out_devid,
    size = 16
);

uapi_struct!(
    /// `struct vfio_device_attach_iommufd_pt`.
    VfioDeviceAttachIommufdPt {
        /// Size of the struct.
        argsz: u32,
        /// `VFIO_DEVICE_ATTACH_PASID`.
        flags: u32,
        /// In: IOAS or HWPT; out: the HWPT attached.
        pt_id: u32,
        /// With the PASID flag.
        pasid: u32,
    },
    last = pt_id,
    size = 16
);

uapi_struct!(
    /// `struct vfio_pci_hot_reset_info` (the `devices` array follows).
    VfioPciHotResetInfo {
        /// Size of the struct and the array.
        argsz: u32,
        /// Out: `VFIO_PCI_HOT_RESET_FLAG_*`.
        flags: u32,
        /// In: room in the array; out: devices affected.
        count: u32,
    },
    last = count,
    size = 12
);

uapi_struct!(
    /// `struct vfio_pci_hot_reset` (the group or iommufd fds follow).
    VfioPciHotReset {
        /// Size of the struct and the array.
        argsz: u32,
        /// Must be 0.
        flags: u32,
        /// Number of fds (0 for a device opened through its cdev).
        count: u32,
    },
    last = count,
    size = 12
);

uapi_struct!(
    /// `struct vfio_device_detach_iommufd_pt`.
    VfioDeviceDetachIommufdPt {
        /// Size of the struct.
        argsz: u32,
        /// `VFIO_DEVICE_DETACH_PASID`.
        flags: u32,
        /// With the PASID flag.
        pasid: u32,
    },
    last = flags,
    size = 12
);

uapi_struct!(
    /// `struct vfio_iommu_type1_info`.
    VfioIommuType1Info {
        /// Size of the struct and capabilities.
        argsz: u32,
        /// `VFIO_IOMMU_INFO_*`.
        flags: u32,
        /// Supported page sizes.
        iova_pgsizes: u64,
        /// Offset of the first capability.
        cap_offset: u32,
        /// Padding.
        pad: u32,
    },
    last = iova_pgsizes,
    size = 24
);

uapi_struct!(
    /// `struct vfio_iommu_type1_dma_map`.
    VfioIommuType1DmaMap {
        /// Size of the struct.
        argsz: u32,
        /// `VFIO_DMA_MAP_FLAG_*`.
        flags: u32,
        /// Offset in the descriptor riding with the message.
        vaddr: u64,
        /// IOVA.
        iova: u64,
        /// Bytes.
        size: u64,
    },
    last = size,
    size = 32
);

uapi_struct!(
    /// `struct vfio_iommu_type1_dma_unmap`.
    VfioIommuType1DmaUnmap {
        /// Size of the struct.
        argsz: u32,
        /// `VFIO_DMA_UNMAP_FLAG_*`.
        flags: u32,
        /// IOVA.
        iova: u64,
        /// In: bytes; out: bytes unmapped.
        size: u64,
    },
    last = size,
    size = 24
);

uapi_struct!(
    /// `struct vfio_group_status`.
    VfioGroupStatus {
        /// Size of the struct.
        argsz: u32,
        /// `VFIO_GROUP_FLAGS_*`.
        flags: u32,
    },
    last = flags,
    size = 8
);

uapi_struct!(
    /// The header of `VCDEV_REGION_READ` / `VCDEV_REGION_WRITE` (no size
    /// field: the kernel's pread/pwrite arguments).
    VcdevRegionRw {
        /// Device file offset (region index << 40 + offset).
        offset: u64,
        /// Bytes.
        count: u32,
        /// Must be 0.
        reserved: u32,
    },
    last = reserved,
    size = 16
);

/// `struct vfio_info_cap_header` + `struct vfio_iommu_type1_info_cap_iova_range`
/// without its ranges.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioCapIovaRange {
    /// `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`.
    pub id: u16,
    /// 1.
    pub version: u16,
    /// Offset of the next capability (0: last).
    pub next: u32,
    /// Ranges that follow.
    pub nr_iovas: u32,
    /// Padding.
    pub reserved: u32,
}
uapi_struct!(VfioCapIovaRange, last = reserved, size = 16);

/// `struct vfio_iommu_type1_info_dma_avail`, padded to 8 bytes as the
/// kernel lays capabilities out (`ALIGN(cap_size, sizeof(u64))`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VfioCapDmaAvail {
    /// `VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`.
    pub id: u16,
    /// 1.
    pub version: u16,
    /// Offset of the next capability.
    pub next: u32,
    /// DMA mappings still available.
    pub avail: u32,
    /// Alignment padding.
    pub pad: u32,
}
uapi_struct!(VfioCapDmaAvail, last = pad, size = 16);

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's `minsz` of each ioctl (`offsetofend` of the last
    /// mandatory field).
    #[test]
    fn min_sizes_are_the_kernels() {
        assert_eq!(VfioDeviceInfo::MIN_SIZE, 16);
        assert_eq!(VfioRegionInfo::MIN_SIZE, 32);
        assert_eq!(VfioIrqInfo::MIN_SIZE, 16);
        assert_eq!(VfioIrqSet::MIN_SIZE, 20);
        assert_eq!(VfioDeviceIoeventfd::MIN_SIZE, 28);
        assert_eq!(VfioDeviceBindIommufd::MIN_SIZE, 16);
        assert_eq!(VfioDeviceAttachIommufdPt::MIN_SIZE, 12);
        assert_eq!(VfioDeviceDetachIommufdPt::MIN_SIZE, 8);
        assert_eq!(VfioIommuType1Info::MIN_SIZE, 16);
        assert_eq!(VfioIommuType1DmaMap::MIN_SIZE, 32);
        assert_eq!(VfioIommuType1DmaUnmap::MIN_SIZE, 24);
        assert_eq!(VfioGroupStatus::MIN_SIZE, 8);
    }
}
