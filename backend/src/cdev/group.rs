//! Feature `group`: the group file (`DIR/vfio/N`) and the container's
//! type1 requests (`DIR/vfio/vfio`), with the semantics of the kernel's
//! iommufd-backed compatibility layer (`drivers/iommu/iommufd/vfio_compat.c`,
//! `drivers/vfio/group.c`): the container is an iommufd context whose
//! type1 maps go to one compat IOAS, made when the first group joins;
//! device files got through the group are bound to that context and
//! attached to the compat IOAS at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use log::{info, warn};
use vcdev_iommu::uapi::{
    IommuIoasMap, IommuIoasUnmap, IOMMU_IOAS_MAP_FIXED_IOVA, IOMMU_IOAS_MAP_READABLE,
    IOMMU_IOAS_MAP_WRITEABLE,
};
use vcdev_iommu::{Errno, PAGE_SIZE};
use vm_memory::ByteValued;

use super::device::CdevDevice;
use super::device_file::DeviceFile;
use super::dispatch::{Arg, Op, Out, Req};
use super::iommufd_file::{sized, IommufdFile};
use super::server::{FileKind, Known, Server};
use super::vfio_uapi::*;
use crate::registry::GroupOwnership;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A device opened through a group: bound to the container's context and
/// attached to its compat IOAS while any of its device files is open.
pub struct GroupDeviceBinding {
    dev: Arc<CdevDevice>,
    _container: Arc<IommufdFile>,
    _group: Arc<GroupOwnership>,
}

impl GroupDeviceBinding {
    /// The device.
    pub fn device(&self) -> &Arc<CdevDevice> {
        &self.dev
    }
}

impl Drop for GroupDeviceBinding {
    fn drop(&mut self) {
        self.dev.quiesce();
        if let Err(e) = self.dev.handle().unbind() {
            warn!("{}: unbind: {e}", self.dev.name());
        }
        info!("{}: last group device file closed", self.dev.name());
    }
}

#[derive(Default)]
struct GroupState {
    container: Option<Arc<IommufdFile>>,
    devices: BTreeMap<String, Weak<GroupDeviceBinding>>,
}

/// A group file.
pub struct GroupFile {
    server: Arc<Server>,
    group: u32,
    own: Arc<GroupOwnership>,
    name: String,
    state: Mutex<GroupState>,
}

impl GroupFile {
    /// Opens group `group` ([`crate::registry::Registry::open_group`]:
    /// EBUSY while it is open or one of its devices has another owner).
    pub fn open(server: &Arc<Server>, group: u32) -> Result<Arc<GroupFile>, Errno> {
        let own = server.registry().open_group(group).map_err(|e| e.errno())?;
        Ok(Arc::new(GroupFile {
            server: server.clone(),
            group,
            own: Arc::new(own),
            name: format!("group{group}#{}", server.next_seq()),
            state: Mutex::new(GroupState::default()),
        }))
    }

    fn any_device_open(st: &GroupState) -> bool {
        st.devices.values().any(|w| w.strong_count() > 0)
    }
}

impl FileKind for GroupFile {
    fn ops(&self) -> &'static [Op<Self>] {
        GROUP_OPS
    }

    fn release(&self) {
        // Devices got through the group keep the group (and container)
        // until they close, as the kernel's device fds hold the group.
        lock(&self.state).container = None;
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

fn group_get_status(g: &GroupFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: VfioGroupStatus = req.get();
    cmd.flags = VFIO_GROUP_FLAGS_VIABLE;
    if lock(&g.state).container.is_some() {
        cmd.flags |= VFIO_GROUP_FLAGS_CONTAINER_SET;
    }
    Ok(Out::with(req, &cmd))
}

/// VFIO_GROUP_SET_CONTAINER (`vfio_group_ioctl_set_container`): a
/// negative fd or none EBADF, a container already set EINVAL, a file not
/// ours (or not a container / iommufd) EBADFD.
fn group_set_container(g: &GroupFile, req: &mut Req) -> Result<Out, Errno> {
    let fdnum = i32::from_le_bytes(req.int_arg()?);
    if fdnum < 0 {
        return Err(Errno::EBADF);
    }
    let fd = req.take_fd().ok_or(Errno::EBADF)?;
    let mut st = lock(&g.state);
    if st.container.is_some() {
        return Err(Errno::EINVAL);
    }
    let known = g.server.lookup(&fd)?;
    drop(fd);
    let Known::Iommufd(w) = known else {
        return Err(Errno::EBADFD);
    };
    let c = w.upgrade().ok_or(Errno::EBADFD)?;
    c.compat_ioas_create()?;
    st.container = Some(c);
    info!("{}: container set", g.name);
    Ok(Out::ok())
}

/// VFIO_GROUP_UNSET_CONTAINER: none set EINVAL, devices open EBUSY.
fn group_unset_container(g: &GroupFile, _req: &mut Req) -> Result<Out, Errno> {
    let mut st = lock(&g.state);
    if st.container.is_none() {
        return Err(Errno::EINVAL);
    }
    if GroupFile::any_device_open(&st) {
        return Err(Errno::EBUSY);
    }
    st.container = None;
    Ok(Out::ok())
}

/// The longest device name with its NUL (`strndup_user(arg, PAGE_SIZE)`).
const NAME_MAX: usize = 4096;

/// The NUL-terminated name at the start of `payload`, as `strndup_user`
/// reads it from user memory: no NUL within the payload (reading past the
/// end of the user's bytes) EFAULT, longer than a page EINVAL.
fn device_name(payload: &[u8]) -> Result<&[u8], Errno> {
    let head = payload
        .get(..NAME_MAX.min(payload.len()))
        .unwrap_or_default();
    match head.iter().position(|&b| b == 0) {
        Some(nul) => Ok(head.get(..nul).unwrap_or_default()),
        None if payload.len() >= NAME_MAX => Err(Errno::EINVAL),
        None => Err(Errno::EFAULT),
    }
}

/// VFIO_GROUP_GET_DEVICE_FD (`vfio_group_ioctl_get_device_fd`): the
/// NUL-terminated name ([`device_name`]); a device not in the group
/// ENODEV, then no container EINVAL (`vfio_df_group_open`); a device file
/// rides with the reply.
fn group_get_device_fd(g: &GroupFile, req: &mut Req) -> Result<Out, Errno> {
    let name = std::str::from_utf8(device_name(&req.cmd)?).map_err(|_| Errno::ENODEV)?;
    let dev = g
        .server
        .device(name)
        .filter(|d| d.reg().group() == g.group)
        .ok_or(Errno::ENODEV)?
        .clone();
    let mut st = lock(&g.state);
    let container = st.container.clone().ok_or(Errno::EINVAL)?;
    let existing = st.devices.get(name).and_then(Weak::upgrade);
    let binding = match existing {
        Some(b) => b,
        None => {
            let ioas = container.compat_ioas_create()?;
            dev.handle().bind(container.ictx()).map_err(|e| e.errno())?;
            if let Err(e) = dev.handle().attach(ioas) {
                let _ = dev.handle().unbind();
                return Err(e.errno());
            }
            let b = Arc::new(GroupDeviceBinding {
                dev,
                _container: container,
                _group: g.own.clone(),
            });
            st.devices.insert(name.to_owned(), Arc::downgrade(&b));
            b
        }
    };
    drop(st);
    let file = DeviceFile::new_group(&g.server, binding);
    let fd = g
        .server
        .hand_out(file, Known::Device)
        .map_err(|e| Errno::from_io(&e))?;
    Ok(Out {
        result: 0,
        body: Vec::new(),
        fds: vec![fd],
    })
}

/// The group file's requests.
pub static GROUP_OPS: &[Op<GroupFile>] = &[
    Op {
        code: VFIO_GROUP_GET_STATUS,
        name: "VFIO_GROUP_GET_STATUS",
        arg: sized!(VfioGroupStatus),
        max_fds: 0,
        handler: group_get_status,
    },
    Op {
        code: VFIO_GROUP_SET_CONTAINER,
        name: "VFIO_GROUP_SET_CONTAINER",
        arg: Arg::Fixed(4),
        max_fds: 1,
        handler: group_set_container,
    },
    Op {
        code: VFIO_GROUP_UNSET_CONTAINER,
        name: "VFIO_GROUP_UNSET_CONTAINER",
        arg: Arg::Bytes,
        max_fds: 0,
        handler: group_unset_container,
    },
    Op {
        code: VFIO_GROUP_GET_DEVICE_FD,
        name: "VFIO_GROUP_GET_DEVICE_FD",
        arg: Arg::Bytes,
        max_fds: 0,
        handler: group_get_device_fd,
    },
];

// ---------------------------------------------------------------------------
// The container: type1 over the compat IOAS.

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
