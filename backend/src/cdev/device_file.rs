//! The device file (`DIR/devices/NAME`, the kernel's
//! `/dev/vfio/devices/vfioX`, or a device fd got through a group).
//!
//! State machine (PROTOCOL.md, "Device file requests", the kernel's
//! `vfio_device_fops_unl_ioctl` and `device_cdev.c`):
//!
//! - a cdev file starts unbound: every request but BIND is EINVAL (the
//!   gate, before even the code is looked up);
//! - BIND takes an iommufd (or container) file, asks the registry
//!   ([`Registry::claim_cdev_bind`]) and binds the device: the device id
//!   comes back; a second BIND is EINVAL;
//! - ATTACH attaches or replaces, DETACH detaches;
//! - release (the last copy closed): queues stop, the function is reset,
//!   the device detaches and unbinds (the IOAS and its mappings stay; the
//!   iommufd lives on while its file or another device holds it).
//!
//! A file got through a group is open at once; BIND is EINVAL on it and
//! ATTACH/DETACH are not its requests (ENOTTY, as vfio-pci answers them).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use log::info;
use vcdev_iommu::sync::lock;
use vcdev_iommu::{Errno, Iommufd};

use super::device::{into_eventfd, CdevDevice, IrqAction};
use super::dispatch::{sized, Arg, Op, Out, Req};
use super::files::{FileKind, Files};
#[cfg(feature = "group")]
use super::group::GroupDeviceBinding;
use super::iommufd_file::IommufdFile;
use super::vfio_uapi::*;
use crate::registry::{DeviceCounters, Holder, Ownership, Registry, RegistryError};
use crate::wire::MAX_PAYLOAD;

/// The largest REGION_READ: its reply (result, header, data) must fit one
/// frame.
pub const MAX_REGION_READ: u32 = MAX_PAYLOAD - 4 - 16;

enum State {
    Unbound,
    Bound {
        ictx: Arc<Iommufd>,
        devid: u32,
        _own: Ownership,
    },
    #[cfg(feature = "group")]
    Group(Arc<GroupDeviceBinding>),
}

/// A device file.
pub struct DeviceFile {
    files: Arc<Files>,
    dev: Arc<CdevDevice>,
    name: String,
    state: Mutex<State>,
    /// The server's end of the file, for the registry to probe.
    link: OnceLock<UnixStream>,
}

/// A bound device file as the registry's [`Holder`]: hung up once every
/// client copy is closed (its release is under way); revoked as PROTOCOL.md
/// says ([`CdevDevice::revoke`]).
#[derive(Debug)]
struct FileHolder {
    link: Option<UnixStream>,
    dev: Arc<CdevDevice>,
}

impl Holder for FileHolder {
    fn hung_up(&self, wait: std::time::Duration) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| crate::sys::peer_hung_up(l.as_fd(), wait))
    }

    fn revoke(&self) {
        self.dev.revoke();
    }
}

impl DeviceFile {
    /// A device file opened through the cdev node: unbound.
    pub fn new_cdev(files: &Arc<Files>, dev: Arc<CdevDevice>) -> Arc<DeviceFile> {
        let name = format!("{}#{}", dev.name(), files.next_seq());
        Arc::new(DeviceFile {
            files: files.clone(),
            dev,
            name,
            state: Mutex::new(State::Unbound),
            link: OnceLock::new(),
        })
    }

    /// A device file got through a group: open at once.
    #[cfg(feature = "group")]
    pub fn new_group(files: &Arc<Files>, binding: Arc<GroupDeviceBinding>) -> Arc<DeviceFile> {
        let dev = binding.device().clone();
        let name = format!("{}#g{}", dev.name(), files.next_seq());
        Arc::new(DeviceFile {
            files: files.clone(),
            dev,
            name,
            state: Mutex::new(State::Group(binding)),
            link: OnceLock::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn granted(&self) -> bool {
        !matches!(*self.state(), State::Unbound)
    }

    fn via_group(&self) -> bool {
        #[cfg(feature = "group")]
        if matches!(*self.state(), State::Group(_)) {
            return true;
        }
        false
    }

    /// The device id, when bound through the cdev.
    pub fn devid(&self) -> Option<u32> {
        match &*self.state() {
            State::Bound { devid, .. } => Some(*devid),
            _ => None,
        }
    }
}

impl FileKind for DeviceFile {
    fn ops(&self) -> &'static [Op<Self>] {
        DEVICE_OPS
    }

    /// Before BIND everything else is EINVAL; on a file got through a
    /// group ATTACH/DETACH (cdev-only ioctls) reach vfio-pci, which answers
    /// ENOTTY whatever the payload (`vfio_device_fops_unl_ioctl`).
    fn gate(&self, code: u32) -> Option<Errno> {
        DeviceCounters::add(&self.dev.counters().cdev_requests, 1);
        if self.dev.revoked() {
            return Some(Errno::ENODEV);
        }
        if code != VFIO_DEVICE_BIND_IOMMUFD && !self.granted() {
            return Some(Errno::EINVAL);
        }
        let cdev_only = matches!(
            code,
            VFIO_DEVICE_ATTACH_IOMMUFD_PT | VFIO_DEVICE_DETACH_IOMMUFD_PT
        );
        (cdev_only && self.via_group()).then_some(Errno::ENOTTY)
    }

    fn release(&self) {
        let st = std::mem::replace(&mut *self.state(), State::Unbound);
        match st {
            State::Unbound => {}
            State::Bound { ictx, devid, _own } => {
                self.dev.quiesce();
                if let Err(e) = self.dev.handle().unbind() {
                    log::warn!("{}: unbind: {e}", self.name);
                }
                info!("{}: closed, device {devid} unbound", self.name);
                drop(ictx);
            }
            #[cfg(feature = "group")]
            State::Group(b) => drop(b),
        }
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn opened(&self, ours: &UnixStream) {
        if let Ok(l) = ours.try_clone() {
            let _ = self.link.set(l);
        }
    }
}

/// VFIO_DEVICE_BIND_IOMMUFD (the kernel's `vfio_df_ioctl_bind_iommufd`),
/// in its order: argument EINVAL, a group's device file EINVAL, the group
/// open or a vhost-user frontend EBUSY, this file bound EINVAL, the
/// iommufd file (EBADF / EBADFD), another file bound EINVAL, then the
/// bind.
fn bind(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: VfioDeviceBindIommufd = req.get();
    if cmd.flags != 0 || cmd.iommufd < 0 {
        return Err(Errno::EINVAL);
    }
    if f.via_group() {
        return Err(Errno::EINVAL);
    }
    let mut st = f.state();
    if !matches!(*st, State::Unbound) {
        return Err(Errno::EINVAL);
    }
    // One atomic claim, its refusals reported in the kernel's order:
    // `vfio_device_block_group` (EBUSY) before the iommufd, `vfio_df_open`
    // (another file bound: EINVAL) after it.
    let holder = || -> Arc<dyn Holder> {
        Arc::new(FileHolder {
            link: f.link.get().and_then(|l| l.try_clone().ok()),
            dev: f.dev.clone(),
        })
    };
    let mut claim = Registry::claim_cdev_bind(f.dev.reg(), &f.name, Some(holder()));
    // A file of the device being released (its client gone) is waited
    // for, as a vhost-user frontend waits for its predecessor.
    if claim.is_err() && f.dev.reg().owner_leaving() {
        claim = f
            .dev
            .reg()
            .claim_waiting(|| Registry::claim_cdev_bind(f.dev.reg(), &f.name, Some(holder())));
    }
    if let Err(e) = &claim {
        if !matches!(e, RegistryError::AlreadyBound { .. }) {
            return Err(e.errno());
        }
    }
    let fd = req.take_fd().ok_or(Errno::EBADF)?;
    let ictx = f.files.lookup::<IommufdFile>(&fd)?.ictx().clone();
    drop(fd);
    let mut own = claim.map_err(|e| e.errno())?;
    let devid = f.dev.handle().bind(&ictx).map_err(|e| e.errno())?;
    own.set_config_notifier(f.dev.config_notifier());
    info!("{}: bound as device {}", f.name, devid.0);
    *st = State::Bound {
        ictx,
        devid: devid.0,
        _own: own,
    };
    cmd.out_devid = devid.0;
    Ok(Out::with(req, &cmd))
}

/// VFIO_DEVICE_ATTACH_IOMMUFD_PT (`vfio_df_ioctl_attach_pt`): unknown
/// flags EINVAL, PASID EOPNOTSUPP (no PASID support), then attach or
/// replace; `pt_id` comes back as the HWPT attached.
fn attach(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: VfioDeviceAttachIommufdPt = req.get();
    if cmd.flags & !VFIO_DEVICE_PASID != 0 {
        return Err(Errno::EINVAL);
    }
    // No PASID support (no `pasid_attach_ioas`): EOPNOTSUPP before the
    // kernel would check `argsz` against the end of `pasid`.
    if cmd.flags & VFIO_DEVICE_PASID != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let hwpt = f.dev.handle().attach(cmd.pt_id).map_err(|e| e.errno())?;
    cmd.pt_id = hwpt.0;
    Ok(Out::with(req, &cmd))
}

/// VFIO_DEVICE_DETACH_IOMMUFD_PT (`vfio_df_ioctl_detach_pt`).
fn detach(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: VfioDeviceDetachIommufdPt = req.get();
    if cmd.flags & !VFIO_DEVICE_PASID != 0 {
        return Err(Errno::EINVAL);
    }
    // No PASID support (no `pasid_attach_ioas`): EOPNOTSUPP before the
    // kernel would check `argsz` against the end of `pasid`.
    if cmd.flags & VFIO_DEVICE_PASID != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    f.dev.handle().detach().map_err(|e| e.errno())?;
    Ok(Out::with(req, &cmd))
}

fn get_info(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: VfioDeviceInfo = req.get();
    let mut info = f.dev.info();
    info.argsz = cmd.argsz;
    Ok(Out::with(req, &info))
}

fn get_region_info(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: VfioRegionInfo = req.get();
    let mut info = f.dev.region_info(cmd.index)?;
    info.argsz = cmd.argsz;
    Ok(Out::with(req, &info))
}

fn get_irq_info(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: VfioIrqInfo = req.get();
    let mut info = f.dev.irq_info(cmd.index)?;
    info.argsz = cmd.argsz;
    Ok(Out::with(req, &info))
}

/// VFIO_DEVICE_SET_IRQS: the kernel's
/// `vfio_set_irqs_validate_and_prepare` (all EINVAL: unknown flags, `start`
/// at or past the index's count even with count 0, not one data type, too
/// little data), then `vfio_pci_set_irqs_ioctl`'s choice of a handler (not
/// exactly one action: ENOTTY), then the index.
fn set_irqs(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let hdr: VfioIrqSet = req.get();
    let info = f.dev.irq_info(hdr.index)?;
    if hdr.flags & !(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0 {
        return Err(Errno::EINVAL);
    }
    if hdr.start >= info.count || hdr.count > info.count - hdr.start {
        return Err(Errno::EINVAL);
    }
    let data_type = hdr.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
    let action = hdr.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
    if data_type.count_ones() != 1 {
        return Err(Errno::EINVAL);
    }
    let count = usize::try_from(hdr.count).map_err(|_| Errno::EINVAL)?;
    let elem = match data_type {
        VFIO_IRQ_SET_DATA_BOOL => 1,
        VFIO_IRQ_SET_DATA_EVENTFD => 4,
        _ => 0,
    };
    let need = count.checked_mul(elem).ok_or(Errno::EINVAL)?;
    let data = req.trailing.get(..need).ok_or(Errno::EINVAL)?;
    if action.count_ones() != 1 {
        return Err(Errno::ENOTTY);
    }
    let act = match data_type {
        VFIO_IRQ_SET_DATA_NONE if count == 0 => IrqAction::Disable,
        VFIO_IRQ_SET_DATA_NONE => IrqAction::Fire(vec![true; count]),
        VFIO_IRQ_SET_DATA_BOOL => IrqAction::Fire(data.iter().map(|&b| b != 0).collect()),
        _ => {
            let mut fds: Vec<Option<std::os::fd::OwnedFd>> =
                std::mem::take(&mut req.fds).into_iter().map(Some).collect();
            let mut out = Vec::with_capacity(count);
            for w in data.chunks_exact(4) {
                let i = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                if i == -1 {
                    out.push(None);
                    continue;
                }
                let fd = usize::try_from(i)
                    .ok()
                    .and_then(|i| fds.get_mut(i))
                    .and_then(Option::take)
                    .ok_or(Errno::EBADF)?;
                out.push(Some(into_eventfd(fd)?));
            }
            IrqAction::Assign(out)
        }
    };
    f.dev.set_irqs(&hdr, act)?;
    Ok(Out::with(req, &hdr))
}

fn reset(f: &DeviceFile, _req: &mut Req) -> Result<Out, Errno> {
    f.dev.reset();
    Ok(Out::ok())
}

/// VFIO_DEVICE_GET_PCI_HOT_RESET_INFO
/// (`vfio_pci_ioctl_get_pci_hot_reset_info`): argsz below the header is
/// EINVAL; the emulated function has neither a slot nor a bus that can be
/// reset (VFIO_DEVICE_RESET is its reset), so ENODEV, as vfio-pci answers
/// for a device where `pci_probe_reset_slot` and `pci_probe_reset_bus`
/// both fail.
fn hot_reset_info(_f: &DeviceFile, _req: &mut Req) -> Result<Out, Errno> {
    Err(Errno::ENODEV)
}

/// VFIO_DEVICE_PCI_HOT_RESET (`vfio_pci_ioctl_pci_hot_reset`): argsz below
/// the header or flags EINVAL; a device file opened through its cdev takes
/// a zero-length array and one got through a group a non-empty one (else
/// EINVAL); then ENODEV, as for the info.
fn hot_reset(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: VfioPciHotReset = req.get();
    if cmd.flags != 0 || (cmd.count != 0) != f.via_group() {
        return Err(Errno::EINVAL);
    }
    Err(Errno::ENODEV)
}

/// VFIO_DEVICE_IOEVENTFD (`vfio_pci_ioctl_ioeventfd`): flags, size and
/// `fd` < -1 EINVAL, reserved EINVAL, then [`CdevDevice::ioeventfd`].
fn ioeventfd(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: VfioDeviceIoeventfd = req.get();
    if cmd.flags & !VFIO_DEVICE_IOEVENTFD_SIZE_MASK != 0 {
        return Err(Errno::EINVAL);
    }
    let size_bits = cmd.flags & VFIO_DEVICE_IOEVENTFD_SIZE_MASK;
    if size_bits.count_ones() != 1 || cmd.fd < -1 {
        return Err(Errno::EINVAL);
    }
    // PROTOCOL.md: a non-zero reserved field of a vfio struct is EINVAL.
    if cmd.reserved != 0 {
        return Err(Errno::EINVAL);
    }
    let size = size_bits; // 1, 2, 4 or 8 bytes: the bit is the size.
                          // The descriptor is looked at last, as `vfio_virqfd_enable` does.
    let fd = (cmd.fd != -1).then(|| req.take_fd().ok_or(Errno::EBADF));
    f.dev.ioeventfd(cmd.offset, size, cmd.data, fd)?;
    Ok(Out::with(req, &cmd))
}

/// VCDEV_REGION_READ (pread): the result is the bytes read; they follow
/// the header. As a pread, it may read less than asked: up to the end of
/// the region (`vfio_pci_bar_rw`), and at most [`MAX_REGION_READ`] bytes
/// (what one reply carries).
fn region_read(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: VcdevRegionRw = req.get();
    if cmd.reserved != 0 {
        return Err(Errno::EINVAL);
    }
    let count = usize::try_from(cmd.count.min(MAX_REGION_READ)).map_err(|_| Errno::EINVAL)?;
    let data = f.dev.region_read(cmd.offset, count)?;
    let mut out = Out::with(req, &cmd).trailing(&data);
    out.result = i32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
    Ok(out)
}

/// VCDEV_REGION_WRITE (pwrite): `count` bytes follow the header (fewer:
/// EFAULT); the result is the bytes written.
fn region_write(f: &DeviceFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: VcdevRegionRw = req.get();
    if cmd.reserved != 0 {
        return Err(Errno::EINVAL);
    }
    let count = usize::try_from(cmd.count).map_err(|_| Errno::EINVAL)?;
    let data = req.trailing.get(..count).ok_or(Errno::EFAULT)?;
    let n = f.dev.region_write(cmd.offset, data)?;
    let mut out = Out::with(req, &cmd);
    out.result = i32::try_from(n).map_err(|_| Errno::EINVAL)?;
    Ok(out)
}

/// The device file's requests (PROTOCOL.md, "Device file requests").
pub static DEVICE_OPS: &[Op<DeviceFile>] = &[
    Op {
        code: VFIO_DEVICE_GET_INFO,
        name: "VFIO_DEVICE_GET_INFO",
        arg: Arg::Flex {
            size: VfioDeviceInfo::SIZE,
            min: VfioDeviceInfo::MIN_SIZE,
        },
        max_fds: 0,
        handler: get_info,
    },
    Op {
        code: VFIO_DEVICE_GET_REGION_INFO,
        name: "VFIO_DEVICE_GET_REGION_INFO",
        arg: Arg::Flex {
            size: VfioRegionInfo::SIZE,
            min: VfioRegionInfo::MIN_SIZE,
        },
        max_fds: 0,
        handler: get_region_info,
    },
    Op {
        code: VFIO_DEVICE_GET_IRQ_INFO,
        name: "VFIO_DEVICE_GET_IRQ_INFO",
        arg: sized!(VfioIrqInfo),
        max_fds: 0,
        handler: get_irq_info,
    },
    Op {
        code: VFIO_DEVICE_SET_IRQS,
        name: "VFIO_DEVICE_SET_IRQS",
        arg: Arg::Flex {
            size: VfioIrqSet::SIZE,
            min: VfioIrqSet::MIN_SIZE,
        },
        max_fds: crate::wire::MAX_FDS,
        handler: set_irqs,
    },
    Op {
        code: VFIO_DEVICE_RESET,
        name: "VFIO_DEVICE_RESET",
        arg: Arg::Bytes,
        max_fds: 0,
        handler: reset,
    },
    Op {
        code: VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
        name: "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
        arg: Arg::Flex {
            size: VfioPciHotResetInfo::SIZE,
            min: VfioPciHotResetInfo::MIN_SIZE,
        },
        max_fds: 0,
        handler: hot_reset_info,
    },
    Op {
        code: VFIO_DEVICE_PCI_HOT_RESET,
        name: "VFIO_DEVICE_PCI_HOT_RESET",
        arg: Arg::Flex {
            size: VfioPciHotReset::SIZE,
            min: VfioPciHotReset::MIN_SIZE,
        },
        // The group path's array of group files rides along.
        max_fds: crate::wire::MAX_FDS,
        handler: hot_reset,
    },
    Op {
        code: VFIO_DEVICE_IOEVENTFD,
        name: "VFIO_DEVICE_IOEVENTFD",
        arg: sized!(VfioDeviceIoeventfd),
        max_fds: 1,
        handler: ioeventfd,
    },
    Op {
        code: VFIO_DEVICE_BIND_IOMMUFD,
        name: "VFIO_DEVICE_BIND_IOMMUFD",
        arg: sized!(VfioDeviceBindIommufd),
        max_fds: 1,
        handler: bind,
    },
    Op {
        code: VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        name: "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        arg: sized!(VfioDeviceAttachIommufdPt),
        max_fds: 0,
        handler: attach,
    },
    Op {
        code: VFIO_DEVICE_DETACH_IOMMUFD_PT,
        name: "VFIO_DEVICE_DETACH_IOMMUFD_PT",
        arg: sized!(VfioDeviceDetachIommufdPt),
        max_fds: 0,
        handler: detach,
    },
    Op {
        code: VCDEV_REGION_READ,
        name: "VCDEV_REGION_READ",
        arg: Arg::Fixed(VcdevRegionRw::SIZE),
        max_fds: 0,
        handler: region_read,
    },
    Op {
        code: VCDEV_REGION_WRITE,
        name: "VCDEV_REGION_WRITE",
        arg: Arg::Fixed(VcdevRegionRw::SIZE),
        max_fds: 0,
        handler: region_write,
    },
];
