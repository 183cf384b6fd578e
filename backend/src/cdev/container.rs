//! Feature `group`: the container file's type1 requests (`DIR/vfio/vfio`),
//! the role of the kernel's `drivers/iommu/iommufd/vfio_compat.c`. A
//! container is an iommufd context ([`IommufdFile`]) whose type1 maps go
//! to one compat IOAS, made when the first group joins ([`super::group`]).

use std::sync::Arc;

use vcdev_iommu::uapi::{
    IommuIoasMap, IommuIoasUnmap, IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
};
use vcdev_iommu::{Errno, SealPolicy, PAGE_SIZE};
use vm_memory::ByteValued;

use super::dispatch::{sized, Arg, Op, Out, Req};
use super::files::Files;
use super::iommufd_file::{IommufdFile, IommufdKind};
use super::vfio_uapi::*;

/// A fresh container: an empty context answering [`CONTAINER_OPS`].
pub fn open(files: &Files, seal_policy: SealPolicy) -> Arc<IommufdFile> {
    IommufdFile::with_ops(files, seal_policy, IommufdKind::Container, CONTAINER_OPS)
}

fn get_api_version(_c: &IommufdFile, _req: &mut Req) -> Result<Out, Errno> {
    Ok(Out::result(VFIO_API_VERSION))
}

/// VFIO_CHECK_EXTENSION (`iommufd_vfio_check_extension`): TYPE1, TYPE1v2
/// and UNMAP_ALL 1; DMA_CC_IOMMU (`iommufd_vfio_cc_iommu`) ENODEV without
/// the compat IOAS, else 1 (the software IOMMU's DMA is coherent); 0 else.
fn check_extension(c: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let ext = u32::from_le_bytes(req.int_arg()?);
    if ext == VFIO_DMA_CC_IOMMU {
        compat_ioas(c)?;
        return Ok(Out::result(1));
    }
    let yes = matches!(ext, VFIO_TYPE1_IOMMU | VFIO_TYPE1V2_IOMMU | VFIO_UNMAP_ALL);
    Ok(Out::result(i32::from(yes)))
}

/// The compat IOAS, ENODEV before any group joined (`get_compat_ioas`).
fn compat_ioas(c: &IommufdFile) -> Result<u32, Errno> {
    c.compat().ioas.ok_or(Errno::ENODEV)
}

/// VFIO_SET_IOMMU (`iommufd_vfio_set_iommu`): type1 or type1v2, else
/// EINVAL; type1 (v1) disables large pages, as the kernel does.
fn set_iommu(c: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let ty = u32::from_le_bytes(req.int_arg()?);
    if ty != VFIO_TYPE1_IOMMU && ty != VFIO_TYPE1V2_IOMMU {
        return Err(Errno::EINVAL);
    }
    let ioas = compat_ioas(c)?;
    if ty == VFIO_TYPE1_IOMMU {
        let ioas = c.ictx().ioas(ioas).map_err(|e| e.errno())?;
        ioas.iopt().set_large_pages(false).map_err(|e| e.errno())?;
    }
    c.compat().iommu_type = Some(ty);
    Ok(Out::ok())
}

/// VFIO_IOMMU_GET_INFO (`iommufd_vfio_iommu_get_info`): page sizes and
/// the capability chain DMA_AVAIL (U32_MAX, as iommufd reports it), then
/// the IOVA ranges. `argsz` comes back as the size of the struct and every
/// capability; the capabilities follow only when the caller's `argsz`
/// holds them all (`cap_offset` 24), else `cap_offset` is 0.
fn iommu_get_info(c: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut info: VfioIommuType1Info = req.get();
    let ioas = c.ictx().ioas(compat_ioas(c)?).map_err(|e| e.errno())?;
    let (ranges, align) = ioas.iopt().iova_ranges();
    let page = align.max(PAGE_SIZE);
    info.flags = VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS;
    info.iova_pgsizes = if ioas.iopt().large_pages() {
        !(page - 1)
    } else {
        page
    };
    let iova_cap_at = VfioIommuType1Info::SIZE + std::mem::size_of::<VfioCapDmaAvail>();
    let dma = VfioCapDmaAvail {
        id: VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL,
        version: 1,
        next: u32::try_from(iova_cap_at).unwrap_or(0),
        avail: u32::MAX,
        pad: 0,
    };
    let cap = VfioCapIovaRange {
        id: VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
        version: 1,
        next: 0,
        nr_iovas: u32::try_from(ranges.len()).unwrap_or(u32::MAX),
        reserved: 0,
    };
    let mut caps = dma.as_slice().to_vec();
    caps.extend_from_slice(cap.as_slice());
    for r in &ranges {
        caps.extend_from_slice(&r.start.to_le_bytes());
        caps.extend_from_slice(&r.last.to_le_bytes());
    }
    let need = VfioIommuType1Info::SIZE + caps.len();
    let user = usize::try_from(info.argsz).unwrap_or(0);
    info.argsz = u32::try_from(need).unwrap_or(u32::MAX);
    if user < need {
        info.cap_offset = 0;
        return Ok(Out::with(req, &info));
    }
    info.cap_offset = u32::try_from(VfioIommuType1Info::SIZE).unwrap_or(0);
    Ok(Out::with(req, &info).trailing(&caps))
}

/// VFIO_IOMMU_MAP_DMA (`iommufd_vfio_map_dma`): flags beyond READ|WRITE
/// EINVAL; a fixed-IOVA map of the descriptor riding with it.
fn map_dma(c: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: VfioIommuType1DmaMap = req.get();
    if cmd.flags & !(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) != 0 {
        return Err(Errno::EINVAL);
    }
    let mut flags = IOMMU_IOAS_MAP_FIXED_IOVA;
    if cmd.flags & VFIO_DMA_MAP_FLAG_READ != 0 {
        flags |= IOMMU_IOAS_MAP_READABLE;
    }
    if cmd.flags & VFIO_DMA_MAP_FLAG_WRITE != 0 {
        flags |= IOMMU_IOAS_MAP_WRITEABLE;
    }
    let mut map = IommuIoasMap {
        size: u32::try_from(IommuIoasMap::MIN_SIZE).unwrap_or(0),
        flags,
        ioas_id: compat_ioas(c)?,
        __reserved: 0,
        user_va: cmd.vaddr,
        length: cmd.size,
        iova: cmd.iova,
    };
    let fd = req.take_fd();
    c.ictx().ioas_map(&mut map, fd).map_err(|e| e.errno())?;
    Ok(Out::with(req, &cmd))
}

/// VFIO_IOMMU_UNMAP_DMA (`iommufd_vfio_unmap_dma`): flags beyond ALL are
/// EINVAL; ALL needs iova and size 0 (EINVAL); whole mappings only.
fn unmap_dma(c: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: VfioIommuType1DmaUnmap = req.get();
    if cmd.flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
        return Err(Errno::EINVAL);
    }
    let ioas_id = compat_ioas(c)?;
    let mut unmap = IommuIoasUnmap {
        size: u32::try_from(IommuIoasUnmap::MIN_SIZE).unwrap_or(0),
        ioas_id,
        iova: cmd.iova,
        length: cmd.size,
    };
    if cmd.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
        if cmd.iova != 0 || cmd.size != 0 {
            return Err(Errno::EINVAL);
        }
        unmap.length = u64::MAX;
    }
    let n = c.ictx().ioas_unmap(&mut unmap).map_err(|e| e.errno())?;
    cmd.size = n;
    Ok(Out::with(req, &cmd))
}

/// The container file's requests (PROTOCOL.md, "Container and group files").
pub static CONTAINER_OPS: &[Op<IommufdFile>] = &[
    Op {
        code: VFIO_GET_API_VERSION,
        name: "VFIO_GET_API_VERSION",
        arg: Arg::Bytes,
        max_fds: 0,
        handler: get_api_version,
    },
    Op {
        code: VFIO_CHECK_EXTENSION,
        name: "VFIO_CHECK_EXTENSION",
        arg: Arg::Fixed(4),
        max_fds: 0,
        handler: check_extension,
    },
    Op {
        code: VFIO_SET_IOMMU,
        name: "VFIO_SET_IOMMU",
        arg: Arg::Fixed(4),
        max_fds: 0,
        handler: set_iommu,
    },
    Op {
        code: VFIO_IOMMU_GET_INFO,
        name: "VFIO_IOMMU_GET_INFO",
        arg: Arg::Flex {
            size: VfioIommuType1Info::SIZE,
            min: VfioIommuType1Info::MIN_SIZE,
        },
        max_fds: 0,
        handler: iommu_get_info,
    },
    Op {
        code: VFIO_IOMMU_MAP_DMA,
        name: "VFIO_IOMMU_MAP_DMA",
        arg: sized!(VfioIommuType1DmaMap),
        max_fds: 1,
        handler: map_dma,
    },
    Op {
        code: VFIO_IOMMU_UNMAP_DMA,
        name: "VFIO_IOMMU_UNMAP_DMA",
        arg: Arg::Flex {
            size: VfioIommuType1DmaUnmap::SIZE,
            min: VfioIommuType1DmaUnmap::MIN_SIZE,
        },
        max_fds: 0,
        handler: unmap_dma,
    },
];
