//! Devices (the kernel's `device.c`): bind a device to an iommufd, attach
//! it to an IOAS or HWPT (attaching again replaces atomically), detach,
//! unbind.
//!
//! The backend makes one [`DeviceHandle`] per emulated device: its name,
//! its DMA aperture, its reserved IOVA ranges and an attach hook. The hook
//! is called synchronously whenever the device's effective address space
//! changes (attach, replace, detach, unbind), with the new one or `None`
//! (DMA blocked), so the backend can quiesce its queues and switch their
//! readers before the call returns. It runs under the iommufd's locks: it
//! must not bind, attach, detach or unbind devices itself;
//! [`DeviceHandle::address_space`] is fine.
//!
//! The cdev-level ownership rules (group files, vhost-user, one device file
//! bound at a time) belong to the backend's registry; this layer checks
//! what the kernel's iommufd layer does: a device bound to another iommufd
//! is EBUSY (DMA ownership).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::errno::Errno;
use crate::hwpt::{put_auto, Hwpt, HwptError};
use crate::io_pagetable::{IoptError, IovaRange, ResvOwner};
use crate::object::{Iommufd, Object, ObjectError, ObjectId, Table};
use crate::space::AddressSpace;

/// Called with the device's new address space (`None`: DMA blocked).
pub type AttachHook = Box<dyn Fn(Option<Arc<AddressSpace>>) + Send + Sync>;

/// Errors of device binding and attachment.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A reserved range with `start > last`, or an empty aperture.
    #[error("device {name}: invalid range {start:#x}..={last:#x}")]
    BadRange {
        /// Device.
        name: String,
        /// Start.
        start: u64,
        /// Last.
        last: u64,
    },
    /// The device is bound to another iommufd (its DMA has another owner).
    #[error("device is bound to another iommufd")]
    BoundElsewhere,
    /// The device is already bound to this iommufd.
    #[error("device is already bound")]
    AlreadyBound,
    /// The device is not bound.
    #[error("device is not bound")]
    NotBound,
    /// An object lookup failed.
    #[error("object lookup failed")]
    Object(#[source] ObjectError),
    /// `pt_id` is neither an IOAS nor a HWPT.
    #[error("object {0} is neither an IOAS nor a HWPT")]
    WrongPtKind(u32),
    /// The HWPT's aperture is not within the device's: the domain is
    /// incompatible with the device.
    #[error("HWPT aperture {hwpt:?} is incompatible with the device aperture {device:?}")]
    Incompatible {
        /// The HWPT's aperture.
        hwpt: IovaRange,
        /// The device's.
        device: IovaRange,
    },
    /// The IOAS refused the device's reserved ranges.
    #[error("IOAS refused the device's reserved ranges")]
    Iopt(#[source] IoptError),
    /// Making the automatic HWPT failed.
    #[error("automatic HWPT")]
    Hwpt(#[source] HwptError),
}

impl DeviceError {
    /// The errno for this error.
    pub fn errno(&self) -> Errno {
        match self {
            DeviceError::BadRange { .. }
            | DeviceError::AlreadyBound
            | DeviceError::NotBound
            | DeviceError::WrongPtKind(_)
            | DeviceError::Incompatible { .. } => Errno::EINVAL,
            DeviceError::BoundElsewhere => Errno::EBUSY,
            DeviceError::Object(e) => e.errno(),
            DeviceError::Iopt(e) => e.errno(),
            DeviceError::Hwpt(e) => e.errno(),
        }
    }
}

impl From<ObjectError> for DeviceError {
    fn from(e: ObjectError) -> Self {
        DeviceError::Object(e)
    }
}

struct Binding {
    ictx: Arc<Iommufd>,
    id: ObjectId,
}

/// An emulated device as the software IOMMU sees it.
pub struct DeviceHandle {
    name: String,
    aperture: IovaRange,
    reserved: Vec<IovaRange>,
    hook: AttachHook,
    /// The iommufd this device is bound to. Lock order: before the
    /// iommufd's table.
    binding: Mutex<Option<Binding>>,
    /// The current address space (a leaf lock, never held across the hook).
    space: Mutex<Option<Arc<AddressSpace>>>,
}

impl fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceHandle")
            .field("name", &self.name)
            .field("aperture", &self.aperture)
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

/// A bound device in an iommufd's table.
#[derive(Debug)]
pub(crate) struct DeviceObj {
    pub(crate) handle: Arc<DeviceHandle>,
    /// The HWPT it is attached to.
    pub(crate) hwpt: Option<ObjectId>,
    /// Owner of its reserved ranges in the IOAS it is attached to.
    pub(crate) owner: ResvOwner,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DeviceHandle {
    /// A device with DMA aperture `aperture` and `reserved` IOVA ranges
    /// (PROTOCOL.md: by default the full 64-bit space and none reserved).
    pub fn new(
        name: impl Into<String>,
        aperture: IovaRange,
        reserved: Vec<IovaRange>,
        hook: AttachHook,
    ) -> Result<Arc<DeviceHandle>, DeviceError> {
        let name = name.into();
        if let Some(r) = std::iter::once(&aperture)
            .chain(&reserved)
            .find(|r| r.start > r.last)
        {
            return Err(DeviceError::BadRange {
                name,
                start: r.start,
                last: r.last,
            });
        }
        Ok(Arc::new(DeviceHandle {
            name,
            aperture,
            reserved,
            hook,
            binding: Mutex::new(None),
            space: Mutex::new(None),
        }))
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its DMA aperture.
    pub fn aperture(&self) -> IovaRange {
        self.aperture
    }

    /// Its reserved IOVA ranges.
    pub fn reserved(&self) -> &[IovaRange] {
        &self.reserved
    }

    /// The address space its DMA goes through now; `None` while it is not
    /// attached (DMA blocked).
    pub fn address_space(&self) -> Option<Arc<AddressSpace>> {
        lock(&self.space).clone()
    }

    /// Its object id, if bound.
    pub fn bound_id(&self) -> Option<ObjectId> {
        lock(&self.binding).as_ref().map(|b| b.id)
    }

    /// Whether it is bound to `ictx`.
    pub fn is_bound_to(&self, ictx: &Arc<Iommufd>) -> bool {
        lock(&self.binding)
            .as_ref()
            .is_some_and(|b| Arc::ptr_eq(&b.ictx, ictx))
    }

    /// Sets the address space and, if it changed, tells the backend.
    fn switch_space(&self, new: Option<Arc<AddressSpace>>) {
        {
            let mut cur = lock(&self.space);
            let same = match (&*cur, &new) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                return;
            }
            *cur = new.clone();
        }
        (self.hook)(new);
    }

    /// VFIO_DEVICE_BIND_IOMMUFD: binds the device to `ictx`; returns its
    /// object id. The binding keeps `ictx` alive until [`Self::unbind`].
    pub fn bind(self: &Arc<Self>, ictx: &Arc<Iommufd>) -> Result<ObjectId, DeviceError> {
        let mut b = lock(&self.binding);
        if let Some(cur) = &*b {
            return Err(if Arc::ptr_eq(&cur.ictx, ictx) {
                DeviceError::AlreadyBound
            } else {
                DeviceError::BoundElsewhere
            });
        }
        let id = ictx.table().insert(Object::Device(DeviceObj {
            handle: self.clone(),
            hwpt: None,
            owner: ResvOwner::new(),
        }))?;
        log::info!("device {} bound as object {}", self.name, id.0);
        *b = Some(Binding {
            ictx: ictx.clone(),
            id,
        });
        Ok(id)
    }

    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT: attaches to IOAS `pt_id` (through an
    /// automatic HWPT: an existing compatible one, or a new one) or to HWPT
    /// `pt_id`. Attached already, this is an atomic replace: on failure the
    /// old attachment stays. Returns the HWPT's id.
    pub fn attach(&self, pt_id: u32) -> Result<ObjectId, DeviceError> {
        let b = lock(&self.binding);
        let b = b.as_ref().ok_or(DeviceError::NotBound)?;
        let mut t = b.ictx.table();
        attach_locked(&mut t, b.id, pt_id)
    }

    /// VFIO_DEVICE_DETACH_IOMMUFD_PT: DMA blocked; nothing happens if not
    /// attached. An automatic HWPT goes with its last device.
    pub fn detach(&self) -> Result<(), DeviceError> {
        let b = lock(&self.binding);
        let b = b.as_ref().ok_or(DeviceError::NotBound)?;
        let mut t = b.ictx.table();
        detach_locked(&mut t, b.id)
    }

    /// Unbinds (the device file closed): detaches, removes the device
    /// object, and lets go of the iommufd (which may then be released).
    pub fn unbind(&self) -> Result<(), DeviceError> {
        let mut guard = lock(&self.binding);
        let b = guard.take().ok_or(DeviceError::NotBound)?;
        {
            let mut t = b.ictx.table();
            detach_locked(&mut t, b.id)?;
            t.objects.remove(&b.id.0);
        }
        log::info!("device {} unbound from object {}", self.name, b.id.0);
        drop(guard);
        drop(b);
        Ok(())
    }
}

impl Iommufd {
    /// The device bound as object `id` (ENOENT if none).
    pub fn device(&self, id: u32) -> Result<Arc<DeviceHandle>, ObjectError> {
        Ok(self.table().device(id)?.handle.clone())
    }

    /// The HWPT `id` (ENOENT if none).
    pub fn hwpt(&self, id: u32) -> Result<Arc<Hwpt>, ObjectError> {
        self.table().hwpt(id).cloned()
    }
}

fn attach_locked(t: &mut Table, dev: ObjectId, pt_id: u32) -> Result<ObjectId, DeviceError> {
    let aperture = t.device(dev.0)?.handle.aperture();
    match t.get(pt_id)? {
        Object::Device(_) => Err(DeviceError::WrongPtKind(pt_id)),
        Object::Hwpt(h) => {
            let h = h.clone();
            do_attach(t, dev, ObjectId(pt_id), &h)?;
            Ok(ObjectId(pt_id))
        }
        Object::Ioas(ioas) => {
            let ioas = ioas.clone();
            // Any automatic HWPT willing to take the device will do; an
            // incompatible one is skipped (iommufd_device_auto_get_domain).
            for (id, h) in t.hwpts_of(pt_id) {
                if !h.auto {
                    continue;
                }
                match do_attach(t, dev, id, &h) {
                    Ok(()) => return Ok(id),
                    Err(DeviceError::Incompatible { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            let (id, h) = Hwpt::create(t, ObjectId(pt_id), ioas, aperture, true)
                .map_err(DeviceError::Hwpt)?;
            if let Err(e) = do_attach(t, dev, id, &h) {
                t.objects.remove(&id.0);
                h.destroy();
                return Err(e);
            }
            Ok(id)
        }
    }
}

/// Attaches (or replaces with) HWPT `id`; nothing changes on failure.
fn do_attach(
    t: &mut Table,
    dev: ObjectId,
    id: ObjectId,
    new: &Arc<Hwpt>,
) -> Result<(), DeviceError> {
    let d = t.device(dev.0)?;
    let (handle, old, owner) = (d.handle.clone(), d.hwpt, d.owner);
    if !handle.aperture.contains(&new.aperture) {
        return Err(DeviceError::Incompatible {
            hwpt: new.aperture,
            device: handle.aperture,
        });
    }
    if old == Some(id) {
        return Ok(());
    }
    let old_hwpt = old.map(|o| t.hwpt(o.0).cloned()).transpose()?;
    let same_ioas = old_hwpt.as_ref().is_some_and(|o| o.ioas_id == new.ioas_id);
    if !same_ioas {
        new.ioas
            .iopt()
            .reserve(&handle.reserved, owner)
            .map_err(DeviceError::Iopt)?;
    }
    t.device_mut(dev.0)?.hwpt = Some(id);
    if let Some(o) = &old_hwpt {
        if !same_ioas {
            o.ioas.iopt().unreserve(owner);
        }
    }
    handle.switch_space(Some(new.space().clone()));
    if let Some(o) = old {
        put_auto(t, o);
    }
    Ok(())
}

fn detach_locked(t: &mut Table, dev: ObjectId) -> Result<(), DeviceError> {
    let d = t.device_mut(dev.0)?;
    let Some(old) = d.hwpt.take() else {
        return Ok(());
    };
    let (handle, owner) = (d.handle.clone(), d.owner);
    if let Ok(h) = t.hwpt(old.0) {
        h.ioas.iopt().unreserve(owner);
    }
    handle.switch_space(None);
    put_auto(t, old);
    Ok(())
}
