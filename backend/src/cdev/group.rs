//! Feature `group`: the group file (`DIR/vfio/N`), with the semantics of
//! the kernel's `drivers/vfio/group.c` over the iommufd-backed container
//! ([`super::container`]): setting a container makes its compat IOAS;
//! device files got through the group are bound to that context and
//! attached to the compat IOAS at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use log::{info, warn};
use vcdev_iommu::sync::lock;
use vcdev_iommu::Errno;

use super::device::CdevDevice;
use super::device_file::DeviceFile;
use super::dispatch::{sized, Arg, Op, Out, Req};
use super::files::{FileKind, Files};
use super::iommufd_file::IommufdFile;
use super::vfio_uapi::*;
use crate::registry::{ConfigWatch, GroupOwnership};

/// A device opened through a group: bound to the container's context and
/// attached to its compat IOAS while any of its device files is open.
pub struct GroupDeviceBinding {
    dev: Arc<CdevDevice>,
    _container: Arc<IommufdFile>,
    _group: Arc<GroupOwnership>,
    /// A resize is signalled to this binding's driver while it lasts.
    _config: ConfigWatch,
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
    files: Arc<Files>,
    /// The devices of the group.
    devices: Vec<Arc<CdevDevice>>,
    own: Arc<GroupOwnership>,
    name: String,
    state: Mutex<GroupState>,
}

impl GroupFile {
    /// Group `group`, opened with `own`, holding `devices`.
    pub fn new(
        files: &Arc<Files>,
        group: u32,
        own: GroupOwnership,
        devices: Vec<Arc<CdevDevice>>,
    ) -> Arc<GroupFile> {
        Arc::new(GroupFile {
            files: files.clone(),
            devices,
            own: Arc::new(own),
            name: format!("group{group}#{}", files.next_seq()),
            state: Mutex::new(GroupState::default()),
        })
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
    let c = g.files.lookup::<IommufdFile>(&fd)?;
    drop(fd);
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
        .devices
        .iter()
        .find(|d| d.name() == name)
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
            let config = dev.reg().watch_config(dev.config_notifier());
            let b = Arc::new(GroupDeviceBinding {
                dev,
                _container: container,
                _group: g.own.clone(),
                _config: config,
            });
            st.devices.insert(name.to_owned(), Arc::downgrade(&b));
            b
        }
    };
    drop(st);
    let file = DeviceFile::new_group(&g.files, binding);
    let fd = g.files.hand_out(file).map_err(|e| Errno::from_io(&e))?;
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
