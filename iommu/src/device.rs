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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::errno::Errno;
use crate::hwpt::{put_auto, Hwpt, HwptError};
use crate::io_pagetable::{IoptError, IovaRange, ResvOwner};
use crate::object::{Iommufd, Object, ObjectError, ObjectId, Table};
use crate::space::AddressSpace;
use crate::sync::lock;

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

/// IOAS map and unmap requests on the address space a device is attached
/// to, counted for that device (what `vcdev ctl stats` shows as
/// `ioas_maps`, ...). Relaxed atomics; an unmap's time includes its
/// grace period (the wait for the device's queues to quiesce).
#[derive(Debug, Default)]
pub struct MapStats {
    /// Successful IOMMU_IOAS_MAP / MAP_FILE (and type1 MAP_DMA).
    pub maps: AtomicU64,
    /// Successful IOMMU_IOAS_UNMAP (and type1 UNMAP_DMA).
    pub unmaps: AtomicU64,
    /// Total time in those unmaps, in nanoseconds.
    pub unmap_ns: AtomicU64,
    /// The longest of them, in nanoseconds.
    pub unmap_max_ns: AtomicU64,
}

impl MapStats {
    /// Counts one map.
    pub fn mapped(&self) {
        self.maps.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one unmap that took `ns`.
    pub fn unmapped(&self, ns: u64) {
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        self.unmap_ns.fetch_add(ns, Ordering::Relaxed);
        self.unmap_max_ns.fetch_max(ns, Ordering::Relaxed);
    }
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
    /// Map and unmap requests on that space.
    stats: Arc<MapStats>,
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

impl DeviceHandle {
    /// A device with DMA aperture `aperture` and `reserved` IOVA ranges
    /// (PROTOCOL.md: by default the full 64-bit space and none reserved).
    pub fn new(
        name: impl Into<String>,
        aperture: IovaRange,
        reserved: Vec<IovaRange>,
        hook: AttachHook,
    ) -> Result<Arc<DeviceHandle>, DeviceError> {
        Self::with_stats(name, aperture, reserved, hook, Arc::default())
    }

    /// As [`DeviceHandle::new`], counting map and unmap requests in
    /// `stats` (which the caller may share with its own counters).
    pub fn with_stats(
        name: impl Into<String>,
        aperture: IovaRange,
        reserved: Vec<IovaRange>,
        hook: AttachHook,
        stats: Arc<MapStats>,
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
            stats,
        }))
    }

    /// Its map and unmap counters.
    pub fn map_stats(&self) -> &Arc<MapStats> {
        &self.stats
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::uapi::*;
    use crate::ObjectKind;

    const AP: IovaRange = IovaRange::new(0x10_0000, 0xff_ffff);

    fn hwpt_cmd(dev_id: u32, pt_id: u32) -> IommuHwptAlloc {
        IommuHwptAlloc {
            size: 48,
            dev_id,
            pt_id,
            ..Default::default()
        }
    }

    fn ranges(ictx: &Iommufd, ioas: u32) -> (Vec<IommuIovaRange>, u64) {
        let mut cmd = IommuIoasIovaRanges {
            size: 32,
            ioas_id: ioas,
            num_iovas: 16,
            ..Default::default()
        };
        let r = ictx.ioas_iova_ranges(&mut cmd).unwrap();
        (r, cmd.out_iova_alignment)
    }

    /// Kernel `iommu_device_claim_dma_owner` (via `iommufd_device_bind`):
    /// a device whose DMA another iommufd owns is EBUSY; binding it twice
    /// to the same one is EINVAL (vfio's "already bound", PROTOCOL.md).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn bind_bound_device_is_ebusy() {
        let (a, b) = (ctx(), ctx());
        let (dev, _) = device();
        assert_eq!(dev.bind(&a).unwrap(), ObjectId(1));
        assert_errno!(dev.bind(&b), EBUSY);
        assert_errno!(dev.bind(&a), EINVAL);
        dev.unbind().unwrap();
        assert_errno!(dev.unbind(), EINVAL);
        dev.bind(&b).unwrap();
        dev.unbind().unwrap();
    }

    /// Kernel `iommufd_device_change_pt`: an unknown pt_id is ENOENT, one
    /// that is neither IOAS nor HWPT EINVAL; not bound is EINVAL
    /// (PROTOCOL.md, device file before BIND).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn attach_to_unknown_is_enoent_to_device_is_einval() {
        let ictx = ctx();
        let (dev, _) = device();
        assert_errno!(dev.attach(1), EINVAL);
        let id = dev.bind(&ictx).unwrap();
        assert_errno!(dev.attach(9), ENOENT);
        assert_errno!(dev.attach(id.0), EINVAL);
        assert!(dev.address_space().is_none());
        dev.unbind().unwrap();
    }

    /// TEST_F(iommufd_ioas, ioas_destroy) with a mock domain: an IOAS a
    /// device is attached to (through its HWPT) cannot be destroyed.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn destroy_referenced_ioas_is_ebusy() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let (dev, _) = device();
        dev.bind(&ictx).unwrap();
        let hwpt = dev.attach(ioas).unwrap();
        assert_eq!(ictx.kind_of(hwpt.0), Some(ObjectKind::HwptPaging));
        assert_errno!(ictx.destroy(&IommuDestroy { size: 8, id: ioas }), EBUSY);
        assert_errno!(
            ictx.destroy(&IommuDestroy {
                size: 8,
                id: hwpt.0
            }),
            EBUSY
        );
        dev.detach().unwrap();
        // The automatic HWPT went with its last device.
        assert_eq!(ictx.kind_of(hwpt.0), None);
        ictx.destroy(&IommuDestroy { size: 8, id: ioas }).unwrap();
        dev.unbind().unwrap();
    }

    /// Kernel `iommufd_device_bind` ("the calling driver is a user until
    /// unbind"): DESTROY of a device object is EBUSY.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn destroy_device_is_ebusy() {
        let ictx = ctx();
        let (dev, _) = device();
        let id = dev.bind(&ictx).unwrap();
        assert_errno!(ictx.destroy(&IommuDestroy { size: 8, id: id.0 }), EBUSY);
        dev.unbind().unwrap();
        assert_errno!(ictx.destroy(&IommuDestroy { size: 8, id: id.0 }), ENOENT);
    }

    /// TEST_F(iommufd_ioas, hwpt_attach): a device attaches to an allocated
    /// HWPT; DESTROY of that HWPT is EBUSY until it detaches, and an
    /// allocated HWPT survives its last device.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn destroy_referenced_hwpt_is_ebusy() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let (dev, log) = device();
        let dev_id = dev.bind(&ictx).unwrap();
        let mut cmd = hwpt_cmd(dev_id.0, ioas);
        let hwpt = ictx.hwpt_alloc(&mut cmd).unwrap();
        assert_eq!(cmd.out_hwpt_id, hwpt.0);
        assert_errno!(ictx.destroy(&IommuDestroy { size: 8, id: ioas }), EBUSY);
        assert_eq!(dev.attach(hwpt.0).unwrap(), hwpt);
        assert_errno!(
            ictx.destroy(&IommuDestroy {
                size: 8,
                id: hwpt.0
            }),
            EBUSY
        );
        dev.detach().unwrap();
        assert_eq!(ictx.kind_of(hwpt.0), Some(ObjectKind::HwptPaging));
        ictx.destroy(&IommuDestroy {
            size: 8,
            id: hwpt.0,
        })
        .unwrap();
        ictx.destroy(&IommuDestroy { size: 8, id: ioas }).unwrap();
        assert_eq!(log.lock().unwrap().len(), 2);
        dev.unbind().unwrap();
    }

    /// Kernel `iommufd_hwpt_alloc`: reserved field EOPNOTSUPP, data_len
    /// with DATA_NONE EINVAL, unknown device ENOENT, unknown pt_id EINVAL,
    /// flags (no domain_alloc_paging_flags) and nesting EOPNOTSUPP.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn hwpt_alloc_checks() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let (dev, _) = device();
        let d = dev.bind(&ictx).unwrap().0;
        let mut c = hwpt_cmd(d, ioas);
        c.__reserved = 1;
        assert_errno!(ictx.hwpt_alloc(&mut c), EOPNOTSUPP);
        let mut c = hwpt_cmd(d, ioas);
        c.data_len = 8;
        assert_errno!(ictx.hwpt_alloc(&mut c), EINVAL);
        let mut c = hwpt_cmd(d, ioas);
        c.data_type = 1;
        assert_errno!(ictx.hwpt_alloc(&mut c), EINVAL);
        c.data_len = 8;
        assert_errno!(ictx.hwpt_alloc(&mut c), EOPNOTSUPP);
        assert_errno!(ictx.hwpt_alloc(&mut hwpt_cmd(ioas, ioas)), ENOENT);
        assert_errno!(ictx.hwpt_alloc(&mut hwpt_cmd(d, 99)), EINVAL);
        assert_errno!(ictx.hwpt_alloc(&mut hwpt_cmd(d, d)), EINVAL);
        let mut c = hwpt_cmd(d, ioas);
        c.flags = IOMMU_HWPT_ALLOC_NEST_PARENT;
        assert_errno!(ictx.hwpt_alloc(&mut c), EOPNOTSUPP);
        let h = ictx.hwpt_alloc(&mut hwpt_cmd(d, ioas)).unwrap();
        assert_errno!(ictx.hwpt_alloc(&mut hwpt_cmd(d, h.0)), EOPNOTSUPP);
        dev.unbind().unwrap();
    }

    /// TEST_F(iommufd_ioas, iova_ranges) with a mock domain: attaching
    /// narrows the ranges to the aperture minus reserved ranges, with
    /// alignment 4096; detaching widens them again.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn attach_narrows_iova_ranges_and_aligns() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let resv = IovaRange::new(0x20_0000, 0x2f_ffff);
        let (dev, _) = device_with(AP, vec![resv]);
        dev.bind(&ictx).unwrap();
        dev.attach(ioas).unwrap();
        let (r, align) = ranges(&ictx, ioas);
        let r: Vec<_> = r.iter().map(|r| (r.start, r.last)).collect();
        assert_eq!(
            r,
            vec![(AP.start, resv.start - 1), (resv.last + 1, AP.last)]
        );
        assert_eq!(align, crate::PAGE_SIZE);
        dev.detach().unwrap();
        assert_eq!(
            ranges(&ictx, ioas),
            (
                vec![IommuIovaRange {
                    start: 0,
                    last: u64::MAX
                }],
                1
            )
        );
        dev.unbind().unwrap();
    }

    /// Kernel `iopt_reserve_iova` (via `iopt_table_enforce_dev_resv_regions`):
    /// attaching a device whose reserved range holds a mapping, or lies in
    /// the allowed list, is EADDRINUSE, and the device stays detached.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn attach_reserved_clash_is_eaddrinuse() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(1);
        map_fixed(&ictx, ioas, &fd, 0, P, 0x20_0000).unwrap();
        let (dev, log) = device_with(IovaRange::ALL, vec![IovaRange::new(0x20_0000, 0x20_0fff)]);
        dev.bind(&ictx).unwrap();
        assert_errno!(dev.attach(ioas), EADDRINUSE);
        assert!(dev.address_space().is_none() && log.lock().unwrap().is_empty());
        assert_eq!(ictx.objects().len(), 2, "the automatic HWPT was aborted");
        unmap(&ictx, ioas, 0, u64::MAX).unwrap();
        allow(&ictx, ioas, &[(0x1f_0000, 0x20_0000)]).unwrap();
        assert_errno!(dev.attach(ioas), EADDRINUSE);
        allow(&ictx, ioas, &[]).unwrap();
        dev.attach(ioas).unwrap();
        dev.unbind().unwrap();
    }

    /// TEST_F(iommufd_ioas, area_allowed), "Allowed intersects a
    /// reserved": ALLOW_IOVAS over a device's reserved range is EADDRINUSE.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn allow_iovas_intersecting_reserved_is_eaddrinuse() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let (dev, _) = device_with(IovaRange::ALL, vec![IovaRange::new(4 * P, 104 * P - 1)]);
        dev.bind(&ictx).unwrap();
        dev.attach(ioas).unwrap();
        assert_errno!(allow(&ictx, ioas, &[(P, 600 * P)]), EADDRINUSE);
        allow(&ictx, ioas, &[(200 * P, 600 * P - 1)]).unwrap();
        dev.unbind().unwrap();
    }

    /// Kernel `iopt_table_add_domain`: a mapping outside the device's
    /// aperture makes the attach EADDRINUSE; a mapping not aligned to the
    /// domain's page size too (`iopt_check_iova_alignment`).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn attach_aperture_excludes_mapping_is_eaddrinuse() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(2);
        map_fixed(&ictx, ioas, &fd, 0, P, P).unwrap();
        let (dev, _) = device_with(AP, Vec::new());
        dev.bind(&ictx).unwrap();
        assert_errno!(dev.attach(ioas), EADDRINUSE);
        unmap(&ictx, ioas, 0, u64::MAX).unwrap();
        map_fixed(&ictx, ioas, &fd, 0, P / 2, AP.start).unwrap();
        assert_errno!(dev.attach(ioas), EADDRINUSE);
        unmap(&ictx, ioas, 0, u64::MAX).unwrap();
        dev.attach(ioas).unwrap();
        dev.unbind().unwrap();
    }

    /// Kernel `iopt_check_iova` (reserved -> EINVAL) and TEST_F(iommufd_ioas,
    /// ioas_iova_alloc) with a mock domain: once attached, maps into a
    /// reserved range or outside the aperture are EINVAL, and so are
    /// lengths or IOVAs not aligned to 4096.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn map_into_reserved_or_outside_aperture_is_einval() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(4);
        let resv = IovaRange::new(0x20_0000, 0x20_0fff);
        let (dev, _) = device_with(AP, vec![resv]);
        dev.bind(&ictx).unwrap();
        dev.attach(ioas).unwrap();
        assert_errno!(map_fixed(&ictx, ioas, &fd, 0, P, resv.start), EINVAL);
        assert_errno!(
            map_fixed(&ictx, ioas, &fd, 0, 2 * P, resv.start - P),
            EINVAL
        );
        assert_errno!(map_fixed(&ictx, ioas, &fd, 0, P, AP.start - P), EINVAL);
        assert_errno!(map_fixed(&ictx, ioas, &fd, 0, P, AP.last + 1), EINVAL);
        assert_errno!(map_fixed(&ictx, ioas, &fd, 0, P / 2, AP.start), EINVAL);
        assert_errno!(map_fixed(&ictx, ioas, &fd, 0, P, AP.start + 1), EINVAL);
        assert_errno!(map_auto(&ictx, ioas, &fd, 0, 100), EINVAL);
        assert_errno!(map_fixed(&ictx, ioas, &fd, P / 2, P, AP.start), EINVAL);
        map_fixed(&ictx, ioas, &fd, 0, P, AP.start).unwrap();
        let iova = map_auto(&ictx, ioas, &fd, 0, 2 * P).unwrap();
        assert!(AP.contains(&IovaRange::new(iova, iova + 2 * P - 1)));
        dev.unbind().unwrap();
        // Unbound, the IOAS is unconstrained again.
        map_fixed(&ictx, ioas, &fd, 0, 1, 3).unwrap();
    }

    /// Kernel `iommufd_device_replace` ("If it fails then no change is
    /// made"): attaching while attached replaces atomically; a failed
    /// replace keeps the old attachment; the hook sees every change.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn replace_is_atomic_and_failure_keeps_old() {
        let ictx = ctx();
        let a = ioas_alloc(&ictx);
        let b = ioas_alloc(&ictx);
        let fd = memfd(1);
        map_fixed(&ictx, b, &fd, 0, P, 0x20_0000).unwrap();
        let (dev, log) = device_with(IovaRange::ALL, vec![IovaRange::new(0x20_0000, 0x20_0fff)]);
        dev.bind(&ictx).unwrap();
        let ha = dev.attach(a).unwrap();
        let sa = ictx.ioas_space(a).unwrap();
        assert!(Arc::ptr_eq(&dev.address_space().unwrap(), &sa));
        assert_errno!(dev.attach(b), EADDRINUSE);
        assert!(Arc::ptr_eq(&dev.address_space().unwrap(), &sa));
        assert_eq!(ictx.kind_of(ha.0), Some(ObjectKind::HwptPaging));
        // A mapping in the device's reserved range of A is refused.
        assert_errno!(map_fixed(&ictx, a, &fd, 0, P, 0x20_0000), EINVAL);
        unmap(&ictx, b, 0, u64::MAX).unwrap();
        let hb = dev.attach(b).unwrap();
        assert_ne!(ha, hb);
        // The old automatic HWPT went, and A's reservation with it.
        assert_eq!(ictx.kind_of(ha.0), None);
        map_fixed(&ictx, a, &fd, 0, P, 0x20_0000).unwrap();
        assert_eq!(dev.attach(b).unwrap(), hb);
        let sb = ictx.ioas_space(b).unwrap();
        {
            let log = log.lock().unwrap();
            assert_eq!(log.len(), 2);
            assert!(Arc::ptr_eq(log[0].as_ref().unwrap(), &sa));
            assert!(Arc::ptr_eq(log[1].as_ref().unwrap(), &sb));
        }
        dev.detach().unwrap();
        dev.detach().unwrap();
        assert!(dev.address_space().is_none());
        assert_eq!(log.lock().unwrap().len(), 3);
        // A now maps the device's reserved range.
        assert_errno!(dev.attach(a), EADDRINUSE);
        dev.attach(b).unwrap();
        dev.unbind().unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 5);
        assert!(log[4].is_none());
    }

    /// Kernel `iommufd_device_auto_get_domain`: a second device shares the
    /// IOAS's automatic HWPT when compatible; one whose aperture cannot
    /// hold the HWPT's gets its own.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn auto_hwpt_is_shared_when_compatible() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let (d1, _) = device_with(AP, Vec::new());
        let (d2, _) = device_with(IovaRange::ALL, Vec::new());
        let (d3, _) = device_with(AP, Vec::new());
        for d in [&d1, &d2, &d3] {
            d.bind(&ictx).unwrap();
        }
        let h2 = d2.attach(ioas).unwrap();
        // d1's aperture cannot hold h2's (the full space): a new HWPT.
        let h1 = d1.attach(ioas).unwrap();
        assert_ne!(h1, h2);
        assert_eq!(d3.attach(ioas).unwrap(), h1);
        d1.unbind().unwrap();
        assert_eq!(ictx.kind_of(h1.0), Some(ObjectKind::HwptPaging));
        d3.unbind().unwrap();
        assert_eq!(ictx.kind_of(h1.0), None);
        d2.unbind().unwrap();
        assert_eq!(ictx.objects(), vec![(ObjectId(ioas), ObjectKind::Ioas)]);
    }

    /// PROTOCOL.md "Opening a node gives a file" / kernel
    /// `iommufd_ctx_get` at bind: closing the iommufd while a device is
    /// bound tears nothing down; the release (leaf first) runs when the
    /// device unbinds.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn close_while_bound_keeps_everything_until_unbind() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(1);
        map_fixed(&ictx, ioas, &fd, 0, P, 0x10_0000).unwrap();
        let (dev, log) = device();
        dev.bind(&ictx).unwrap();
        dev.attach(ioas).unwrap();
        let space = dev.address_space().unwrap();
        let weak = Arc::downgrade(&ictx);
        drop(ictx);
        assert!(weak.upgrade().is_some());
        {
            let mut r = space.reader();
            let s = r.enter();
            assert!(s
                .translate(0x10_0000, 8, vm_memory::Permissions::Read)
                .is_ok());
        }
        dev.unbind().unwrap();
        assert!(weak.upgrade().is_none());
        assert!(
            space.with_tree(|t| t.is_empty()),
            "release unmapped the IOAS"
        );
        assert!(log.lock().unwrap().last().unwrap().is_none());
    }

    /// A reserved range with start > last is refused at creation.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn device_with_bad_range_is_einval() {
        let r = DeviceHandle::new(
            "x",
            IovaRange::ALL,
            vec![IovaRange::new(2, 1)],
            Box::new(|_| {}),
        );
        assert_errno!(r, EINVAL);
    }
}
