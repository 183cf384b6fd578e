//! The iommufd uAPI structs, byte for byte (`include/uapi/linux/iommufd.h`),
//! as the cdev protocol carries them (PROTOCOL.md, "iommufd file
//! requests").
//!
//! Each struct is defined once with its minimum size: the end of its last
//! mandatory field (the kernel's `IOCTL_OP(..., last)`). A request whose
//! `size` is below it is `EINVAL`; the protocol layer applies that and the
//! E2BIG / EFAULT rules once, then hands the struct to the handler (the
//! `Iommufd::*` methods), which checks reserved fields and flags itself.

use std::mem::{offset_of, size_of};

use vm_memory::ByteValued;

/// `IOMMUFD_CMD_BASE`: the request code of IOMMU_DESTROY.
pub const IOMMUFD_CMD_DESTROY: u32 = 0x80;
/// IOMMU_IOAS_ALLOC.
pub const IOMMUFD_CMD_IOAS_ALLOC: u32 = 0x81;
/// IOMMU_IOAS_ALLOW_IOVAS.
pub const IOMMUFD_CMD_IOAS_ALLOW_IOVAS: u32 = 0x82;
/// IOMMU_IOAS_COPY.
pub const IOMMUFD_CMD_IOAS_COPY: u32 = 0x83;
/// IOMMU_IOAS_IOVA_RANGES.
pub const IOMMUFD_CMD_IOAS_IOVA_RANGES: u32 = 0x84;
/// IOMMU_IOAS_MAP.
pub const IOMMUFD_CMD_IOAS_MAP: u32 = 0x85;
/// IOMMU_IOAS_UNMAP.
pub const IOMMUFD_CMD_IOAS_UNMAP: u32 = 0x86;
/// IOMMU_OPTION.
pub const IOMMUFD_CMD_OPTION: u32 = 0x87;
/// IOMMU_VFIO_IOAS.
pub const IOMMUFD_CMD_VFIO_IOAS: u32 = 0x88;
/// IOMMU_HWPT_ALLOC.
pub const IOMMUFD_CMD_HWPT_ALLOC: u32 = 0x89;
/// IOMMU_GET_HW_INFO.
pub const IOMMUFD_CMD_GET_HW_INFO: u32 = 0x8a;
/// IOMMU_IOAS_MAP_FILE.
pub const IOMMUFD_CMD_IOAS_MAP_FILE: u32 = 0x8f;

/// `IOMMU_IOAS_MAP_FIXED_IOVA`: map at the given IOVA instead of allocating one.
pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
/// `IOMMU_IOAS_MAP_WRITEABLE`: DMA may write.
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
/// `IOMMU_IOAS_MAP_READABLE`: DMA may read.
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;
/// Every flag MAP, MAP_FILE and COPY know.
pub const IOMMU_IOAS_MAP_VALID_FLAGS: u32 =
    IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;

/// `IOMMU_OPTION_RLIMIT_MODE` (global).
pub const IOMMU_OPTION_RLIMIT_MODE: u32 = 0;
/// `IOMMU_OPTION_HUGE_PAGES` (per IOAS).
pub const IOMMU_OPTION_HUGE_PAGES: u32 = 1;
/// `IOMMU_OPTION_OP_SET`.
pub const IOMMU_OPTION_OP_SET: u16 = 0;
/// `IOMMU_OPTION_OP_GET`.
pub const IOMMU_OPTION_OP_GET: u16 = 1;

/// `IOMMU_HWPT_ALLOC_NEST_PARENT`.
pub const IOMMU_HWPT_ALLOC_NEST_PARENT: u32 = 1 << 0;
/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`.
pub const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 = 1 << 1;
/// `IOMMU_HWPT_FAULT_ID_VALID`.
pub const IOMMU_HWPT_FAULT_ID_VALID: u32 = 1 << 2;
/// `IOMMU_HWPT_DATA_NONE`: the only data type the software IOMMU takes.
pub const IOMMU_HWPT_DATA_NONE: u32 = 0;
/// `IOMMU_HW_INFO_TYPE_NONE`.
pub const IOMMU_HW_INFO_TYPE_NONE: u32 = 0;

macro_rules! uapi_struct {
    ($(#[$m:meta])* $name:ident, last = $last:ident, size = $size:expr) => {
        impl $name {
            /// The end of the last mandatory field.
            pub const MIN_SIZE: usize = offset_of!($name, $last) + field_size(|s: &$name| &s.$last);
        }
        const _: () = assert!(size_of::<$name>() == $size);
        // SAFETY: a #[repr(C)] struct of plain integers without padding
        // (its size is asserted above to be the sum the kernel has); every
        // bit pattern is a valid value.
        unsafe impl ByteValued for $name {}
    };
}

/// The size of a field, for MIN_SIZE (const-evaluable).
const fn field_size<S, T>(_: fn(&S) -> &T) -> usize {
    size_of::<T>()
}

/// `struct iommu_destroy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuDestroy {
    /// sizeof.
    pub size: u32,
    /// The object to destroy.
    pub id: u32,
}
uapi_struct!(IommuDestroy, last = id, size = 8);

/// `struct iommu_ioas_alloc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuIoasAlloc {
    /// sizeof.
    pub size: u32,
    /// Must be 0.
    pub flags: u32,
    /// Out: the new IOAS.
    pub out_ioas_id: u32,
}
uapi_struct!(IommuIoasAlloc, last = out_ioas_id, size = 12);

/// `struct iommu_iova_range`: `start..=last`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IommuIovaRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}
const _: () = assert!(size_of::<IommuIovaRange>() == 16);
// SAFETY: two u64, no padding; every bit pattern is valid.
unsafe impl ByteValued for IommuIovaRange {}

/// `struct iommu_ioas_iova_ranges`; the ranges follow it in the payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuIoasIovaRanges {
    /// sizeof.
    pub size: u32,
    /// The IOAS.
    pub ioas_id: u32,
    /// In: capacity; out: total number of ranges.
    pub num_iovas: u32,
    /// Must be 0.
    pub __reserved: u32,
    /// User pointer (ignored by the protocol).
    pub allowed_iovas: u64,
    /// Out: alignment of IOVA and length.
    pub out_iova_alignment: u64,
}
uapi_struct!(IommuIoasIovaRanges, last = out_iova_alignment, size = 32);

/// `struct iommu_ioas_allow_iovas`; the ranges follow it in the payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuIoasAllowIovas {
    /// sizeof.
    pub size: u32,
    /// The IOAS.
    pub ioas_id: u32,
    /// Number of ranges.
    pub num_iovas: u32,
    /// Must be 0.
    pub __reserved: u32,
    /// User pointer (ignored by the protocol).
    pub allowed_iovas: u64,
}
uapi_struct!(IommuIoasAllowIovas, last = allowed_iovas, size = 24);

/// `struct iommu_ioas_map`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuIoasMap {
    /// sizeof.
    pub size: u32,
    /// `IOMMU_IOAS_MAP_*`.
    pub flags: u32,
    /// The IOAS.
    pub ioas_id: u32,
    /// Must be 0.
    pub __reserved: u32,
    /// Offset in the descriptor riding with the message.
    pub user_va: u64,
    /// Bytes.
    pub length: u64,
    /// In with FIXED_IOVA, else out.
    pub iova: u64,
}
uapi_struct!(IommuIoasMap, last = iova, size = 40);

/// `struct iommu_ioas_map_file`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuIoasMapFile {
    /// sizeof.
    pub size: u32,
    /// `IOMMU_IOAS_MAP_*`.
    pub flags: u32,
    /// The IOAS.
    pub ioas_id: u32,
    /// Ignored by the protocol (the descriptor rides with the message).
    pub fd: i32,
    /// Offset in the file.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// In with FIXED_IOVA, else out.
    pub iova: u64,
}
uapi_struct!(IommuIoasMapFile, last = iova, size = 40);

/// `struct iommu_ioas_copy`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuIoasCopy {
    /// sizeof.
    pub size: u32,
    /// `IOMMU_IOAS_MAP_*`.
    pub flags: u32,
    /// Destination IOAS.
    pub dst_ioas_id: u32,
    /// Source IOAS.
    pub src_ioas_id: u32,
    /// Bytes.
    pub length: u64,
    /// In with FIXED_IOVA, else out.
    pub dst_iova: u64,
    /// First source IOVA.
    pub src_iova: u64,
}
uapi_struct!(IommuIoasCopy, last = src_iova, size = 40);

/// `struct iommu_ioas_unmap`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuIoasUnmap {
    /// sizeof.
    pub size: u32,
    /// The IOAS.
    pub ioas_id: u32,
    /// First IOVA.
    pub iova: u64,
    /// In: bytes; out: bytes unmapped.
    pub length: u64,
}
uapi_struct!(IommuIoasUnmap, last = length, size = 24);

/// `struct iommu_option`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuOption {
    /// sizeof.
    pub size: u32,
    /// `IOMMU_OPTION_*`.
    pub option_id: u32,
    /// `IOMMU_OPTION_OP_*`.
    pub op: u16,
    /// Must be 0.
    pub __reserved: u16,
    /// The object, if the option has one.
    pub object_id: u32,
    /// In for SET, out for GET.
    pub val64: u64,
}
uapi_struct!(IommuOption, last = val64, size = 24);

/// `struct iommu_vfio_ioas` (not served by the cdev protocol; here for
/// completeness of the table).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuVfioIoas {
    /// sizeof.
    pub size: u32,
    /// The IOAS.
    pub ioas_id: u32,
    /// `IOMMU_VFIO_IOAS_*`.
    pub op: u16,
    /// Must be 0.
    pub __reserved: u16,
}
uapi_struct!(IommuVfioIoas, last = __reserved, size = 12);

/// `struct iommu_hwpt_alloc` (the 48-byte layout with `fault_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuHwptAlloc {
    /// sizeof.
    pub size: u32,
    /// `IOMMU_HWPT_ALLOC_*`.
    pub flags: u32,
    /// The device to allocate for.
    pub dev_id: u32,
    /// The IOAS (or parent HWPT) to connect to.
    pub pt_id: u32,
    /// Out: the new HWPT.
    pub out_hwpt_id: u32,
    /// Must be 0.
    pub __reserved: u32,
    /// `IOMMU_HWPT_DATA_*`.
    pub data_type: u32,
    /// Length of the type specific data.
    pub data_len: u32,
    /// User pointer to the data.
    pub data_uptr: u64,
    /// Fault queue id, with `IOMMU_HWPT_FAULT_ID_VALID`.
    pub fault_id: u32,
    /// Must be 0.
    pub __reserved2: u32,
}
uapi_struct!(IommuHwptAlloc, last = __reserved, size = 48);

/// `struct iommu_hw_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuHwInfo {
    /// sizeof.
    pub size: u32,
    /// Must be 0 (or `IOMMU_HW_INFO_FLAG_INPUT_TYPE` on newer kernels).
    pub flags: u32,
    /// The device.
    pub dev_id: u32,
    /// In: buffer length; out: bytes the kernel has.
    pub data_len: u32,
    /// User pointer to the buffer.
    pub data_uptr: u64,
    /// Out: `IOMMU_HW_INFO_TYPE_*`.
    pub out_data_type: u32,
    /// Out: PASID width.
    pub out_max_pasid_log2: u8,
    /// Must be 0.
    pub __reserved: [u8; 3],
    /// Out: `IOMMU_HW_CAP_*`.
    pub out_capabilities: u64,
}
uapi_struct!(IommuHwInfo, last = __reserved, size = 40);

#[cfg(test)]
mod tests {
    use super::*;

    /// The minimum sizes are the kernel's `IOCTL_OP(..., last)` ends, as
    /// the selftest `TEST_F(iommufd, cmd_length)` probes them.
    #[test]
    fn min_sizes_are_the_kernels() {
        assert_eq!(IommuDestroy::MIN_SIZE, 8);
        assert_eq!(IommuIoasAlloc::MIN_SIZE, 12);
        assert_eq!(IommuIoasIovaRanges::MIN_SIZE, 32);
        assert_eq!(IommuIoasAllowIovas::MIN_SIZE, 24);
        assert_eq!(IommuIoasMap::MIN_SIZE, 40);
        assert_eq!(IommuIoasMapFile::MIN_SIZE, 40);
        assert_eq!(IommuIoasCopy::MIN_SIZE, 40);
        assert_eq!(IommuIoasUnmap::MIN_SIZE, 24);
        assert_eq!(IommuOption::MIN_SIZE, 24);
        assert_eq!(IommuVfioIoas::MIN_SIZE, 12);
        assert_eq!(IommuHwptAlloc::MIN_SIZE, 24);
        assert_eq!(IommuHwInfo::MIN_SIZE, 32);
    }

    #[test]
    fn round_trips_through_bytes() {
        let m = IommuIoasMap {
            size: 40,
            flags: IOMMU_IOAS_MAP_READABLE,
            ioas_id: 1,
            __reserved: 0,
            user_va: 0x1000,
            length: 0x2000,
            iova: 0x3000,
        };
        let bytes = m.as_slice().to_vec();
        assert_eq!(bytes.len(), 40);
        assert_eq!(&bytes[24..32], &0x2000u64.to_le_bytes());
        let mut back = IommuIoasMap::default();
        back.as_mut_slice().copy_from_slice(&bytes);
        assert_eq!(back, m);
    }
}
