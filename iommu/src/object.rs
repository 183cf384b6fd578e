//! The iommufd context (the kernel's `main.c`): one object table per
//! iommufd file.
//!
//! Ids start at 1, the lowest free first, in one id space shared by every
//! kind; looking an id up as the wrong kind is ENOENT. An object that
//! others still use cannot be destroyed (EBUSY): an IOAS with a HWPT on
//! it, a HWPT with devices attached, a device (it belongs to its device
//! file until unbound).
//!
//! # Lifetime
//!
//! The backend holds an `Arc<Iommufd>` per open iommufd file; a bound
//! device holds one more (the kernel's `iommufd_ctx_get` at bind). Closing
//! the file while a device is bound therefore tears nothing down; when the
//! last `Arc` goes (the file closed and every device unbound), `Drop` runs
//! the release: leaf objects first (HWPTs, then IOASes, each IOAS unmapped
//! through its grace period).
//!
//! # Locks
//!
//! Lock order: a device's state -> `table` -> an IOAS page table's state
//! -> its address space's writer. The object graph (attachments, HWPTs)
//! changes only under `table`. Mapping commands look their IOAS up under
//! `table` and then work without it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::device::DeviceObj;
use crate::errno::Errno;
use crate::hwpt::Hwpt;
use crate::ioas::Ioas;
use crate::mem::SealPolicy;
use crate::space::AddressSpace;
use crate::uapi;

/// An object id of an iommufd file (never 0 for a live object).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId(pub u32);

/// The largest id (the kernel allocates ids below 2^31).
const MAX_ID: u32 = i32::MAX as u32;

/// The kinds of objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// An IO address space.
    Ioas,
    /// A paging HWPT (automatic or allocated).
    HwptPaging,
    /// A bound device.
    Device,
}

/// Errors of the object table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// No object has this id.
    #[error("no object with id {0}")]
    NotFound(u32),
    /// The object is of another kind than asked for.
    #[error("object {id} is a {found:?}, not a {wanted:?}")]
    WrongKind {
        /// The id.
        id: u32,
        /// What it is.
        found: ObjectKind,
        /// What was asked for.
        wanted: ObjectKind,
    },
    /// The object is still used by others.
    #[error("object {0} is in use")]
    Busy(u32),
    /// Every id is taken.
    #[error("no free object id")]
    NoFreeId,
    /// Unknown flags of IOAS_ALLOC.
    #[error("unsupported flags {0:#x}")]
    Flags(u32),
}

impl ObjectError {
    /// The errno for this error.
    pub fn errno(&self) -> Errno {
        match self {
            ObjectError::NotFound(_) | ObjectError::WrongKind { .. } => Errno::ENOENT,
            ObjectError::Busy(_) => Errno::EBUSY,
            ObjectError::NoFreeId => Errno::ENOSPC,
            ObjectError::Flags(_) => Errno::EOPNOTSUPP,
        }
    }
}

#[derive(Debug)]
pub(crate) enum Object {
    Ioas(Arc<Ioas>),
    Hwpt(Arc<Hwpt>),
    Device(DeviceObj),
}

impl Object {
    pub(crate) fn kind(&self) -> ObjectKind {
        match self {
            Object::Ioas(_) => ObjectKind::Ioas,
            Object::Hwpt(_) => ObjectKind::HwptPaging,
            Object::Device(_) => ObjectKind::Device,
        }
    }
}

/// The object table.
#[derive(Debug, Default)]
pub(crate) struct Table {
    pub(crate) objects: BTreeMap<u32, Object>,
    /// IOMMU_OPTION_RLIMIT_MODE: 1 = per-process accounting.
    pub(crate) account_mm: bool,
}

impl Table {
    /// The lowest free id.
    fn free_id(&self) -> Result<u32, ObjectError> {
        let mut want = 1u32;
        for &id in self.objects.keys() {
            if id != want {
                break;
            }
            want = want.checked_add(1).ok_or(ObjectError::NoFreeId)?;
        }
        if want > MAX_ID {
            return Err(ObjectError::NoFreeId);
        }
        Ok(want)
    }

    pub(crate) fn insert(&mut self, obj: Object) -> Result<ObjectId, ObjectError> {
        let id = self.free_id()?;
        self.objects.insert(id, obj);
        Ok(ObjectId(id))
    }

    pub(crate) fn get(&self, id: u32) -> Result<&Object, ObjectError> {
        self.objects.get(&id).ok_or(ObjectError::NotFound(id))
    }

    pub(crate) fn ioas(&self, id: u32) -> Result<&Arc<Ioas>, ObjectError> {
        match self.get(id)? {
            Object::Ioas(i) => Ok(i),
            o => Err(ObjectError::WrongKind {
                id,
                found: o.kind(),
                wanted: ObjectKind::Ioas,
            }),
        }
    }

    pub(crate) fn hwpt(&self, id: u32) -> Result<&Arc<Hwpt>, ObjectError> {
        match self.get(id)? {
            Object::Hwpt(h) => Ok(h),
            o => Err(ObjectError::WrongKind {
                id,
                found: o.kind(),
                wanted: ObjectKind::HwptPaging,
            }),
        }
    }

    pub(crate) fn device(&self, id: u32) -> Result<&DeviceObj, ObjectError> {
        match self.get(id)? {
            Object::Device(d) => Ok(d),
            o => Err(ObjectError::WrongKind {
                id,
                found: o.kind(),
                wanted: ObjectKind::Device,
            }),
        }
    }

    pub(crate) fn device_mut(&mut self, id: u32) -> Result<&mut DeviceObj, ObjectError> {
        match self.objects.get_mut(&id) {
            Some(Object::Device(d)) => Ok(d),
            Some(o) => Err(ObjectError::WrongKind {
                id,
                found: o.kind(),
                wanted: ObjectKind::Device,
            }),
            None => Err(ObjectError::NotFound(id)),
        }
    }

    /// Devices attached to HWPT `hwpt`.
    pub(crate) fn hwpt_users(&self, hwpt: u32) -> usize {
        self.objects
            .values()
            .filter(|o| matches!(o, Object::Device(d) if d.hwpt == Some(ObjectId(hwpt))))
            .count()
    }

    /// The devices attached (through a HWPT) to IOAS `ioas`.
    pub(crate) fn devices_on(&self, ioas: u32) -> Vec<Arc<crate::device::DeviceHandle>> {
        self.objects
            .values()
            .filter_map(|o| match o {
                Object::Device(d) => {
                    let h = d.hwpt?;
                    let on = self.hwpt(h.0).ok()?.ioas_id == ObjectId(ioas);
                    on.then(|| d.handle.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// HWPTs on IOAS `ioas`, in id order.
    pub(crate) fn hwpts_of(&self, ioas: u32) -> Vec<(ObjectId, Arc<Hwpt>)> {
        self.objects
            .iter()
            .filter_map(|(id, o)| match o {
                Object::Hwpt(h) if h.ioas_id == ObjectId(ioas) => Some((ObjectId(*id), h.clone())),
                _ => None,
            })
            .collect()
    }

    /// Removes an object nobody uses; the caller finishes its destruction
    /// (after dropping the table lock where that may wait).
    pub(crate) fn remove_unused(&mut self, id: u32) -> Result<Object, ObjectError> {
        let busy = match self.get(id)? {
            Object::Ioas(_) => !self.hwpts_of(id).is_empty(),
            Object::Hwpt(_) => self.hwpt_users(id) > 0,
            // A device belongs to its device file until it unbinds.
            Object::Device(_) => true,
        };
        if busy {
            return Err(ObjectError::Busy(id));
        }
        self.objects.remove(&id).ok_or(ObjectError::NotFound(id))
    }
}

/// Finishes the destruction of a removed object.
pub(crate) fn destroy_object(obj: Object) {
    match obj {
        Object::Ioas(ioas) => {
            ioas.iopt().unmap_all();
        }
        Object::Hwpt(hwpt) => hwpt.destroy(),
        Object::Device(_) => {}
    }
}

/// The context of one iommufd file: its object table.
#[derive(Debug)]
pub struct Iommufd {
    table: Mutex<Table>,
    seal_policy: SealPolicy,
    /// Whole-file mappings shared by the IOAS maps of this context.
    files: crate::mem::FileMappings,
}

impl Iommufd {
    /// A fresh, empty iommufd; memory mapped into it must satisfy
    /// `seal_policy` (PROTOCOL.md, "Struct rules").
    pub fn new(seal_policy: SealPolicy) -> Arc<Iommufd> {
        Arc::new(Iommufd {
            table: Mutex::new(Table::default()),
            seal_policy,
            files: crate::mem::FileMappings::default(),
        })
    }

    /// What memory mapped through this iommufd must satisfy.
    pub fn seal_policy(&self) -> SealPolicy {
        self.seal_policy
    }

    /// The whole-file mappings shared by this context's IOAS maps.
    pub(crate) fn files(&self) -> &crate::mem::FileMappings {
        &self.files
    }

    pub(crate) fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kind of object `id`, if it exists.
    pub fn kind_of(&self, id: u32) -> Option<ObjectKind> {
        self.table().objects.get(&id).map(Object::kind)
    }

    /// Every object, in id order.
    pub fn objects(&self) -> Vec<(ObjectId, ObjectKind)> {
        self.table()
            .objects
            .iter()
            .map(|(id, o)| (ObjectId(*id), o.kind()))
            .collect()
    }

    /// The IOAS `id` (ENOENT if there is none or `id` is another kind).
    pub fn ioas(&self, id: u32) -> Result<Arc<Ioas>, ObjectError> {
        self.table().ioas(id).cloned()
    }

    /// IOMMU_IOAS_ALLOC: a new, empty IOAS; its id goes to `out_ioas_id`.
    pub fn ioas_alloc(&self, cmd: &mut uapi::IommuIoasAlloc) -> Result<ObjectId, ObjectError> {
        if cmd.flags != 0 {
            return Err(ObjectError::Flags(cmd.flags));
        }
        let id = self.table().insert(Object::Ioas(Arc::new(Ioas::new())))?;
        cmd.out_ioas_id = id.0;
        Ok(id)
    }

    /// IOMMU_DESTROY: destroys object `cmd.id` unless it is in use.
    pub fn destroy(&self, cmd: &uapi::IommuDestroy) -> Result<(), ObjectError> {
        let obj = self.table().remove_unused(cmd.id)?;
        destroy_object(obj);
        Ok(())
    }

    /// The address space of IOAS `id` (what devices attached to it
    /// translate through).
    pub fn ioas_space(&self, id: u32) -> Result<Arc<AddressSpace>, ObjectError> {
        Ok(self.ioas(id)?.space().clone())
    }
}

impl Drop for Iommufd {
    /// Release: leaf objects first. No device can be bound any more (a
    /// bound device keeps its iommufd alive), so HWPTs go, then IOASes.
    fn drop(&mut self) {
        let table = self.table.get_mut().unwrap_or_else(|p| p.into_inner());
        let objects = std::mem::take(&mut table.objects);
        let (hwpts, rest): (Vec<_>, Vec<_>) = objects
            .into_values()
            .partition(|o| matches!(o, Object::Hwpt(_)));
        hwpts.into_iter().for_each(destroy_object);
        rest.into_iter().for_each(destroy_object);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::uapi::*;

    /// PROTOCOL.md (object ids) and kernel `iommufd_object_alloc`
    /// (xa_alloc, XA_FLAGS_ALLOC1): ids start at 1, the lowest free first,
    /// one id space for every kind.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn ids_start_at_one_lowest_free_first() {
        let ictx = ctx();
        assert_eq!(
            (ioas_alloc(&ictx), ioas_alloc(&ictx), ioas_alloc(&ictx)),
            (1, 2, 3)
        );
        ictx.destroy(&IommuDestroy { size: 8, id: 2 }).unwrap();
        let (dev, _) = device();
        assert_eq!(dev.bind(&ictx).unwrap(), ObjectId(2));
        assert_eq!(ioas_alloc(&ictx), 4);
        ictx.destroy(&IommuDestroy { size: 8, id: 1 }).unwrap();
        assert_eq!(dev.attach(3).unwrap(), ObjectId(1));
        dev.unbind().unwrap();
    }

    /// TEST_F(iommufd, cmd_fail): DESTROY of id 0 or an unknown id is
    /// ENOENT.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn destroy_unknown_is_enoent() {
        let ictx = ctx();
        assert_errno!(ictx.destroy(&IommuDestroy { size: 8, id: 0 }), ENOENT);
        assert_errno!(ictx.destroy(&IommuDestroy { size: 8, id: 5 }), ENOENT);
    }

    /// Kernel `iommufd_get_object`: an id of the wrong kind is ENOENT.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn wrong_kind_is_enoent() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        assert_errno!(ictx.device(ioas), ENOENT);
        assert_errno!(ictx.hwpt(ioas), ENOENT);
        let (dev, _) = device();
        let d = dev.bind(&ictx).unwrap();
        assert_errno!(ictx.ioas(d.0), ENOENT);
        dev.unbind().unwrap();
    }

    /// Kernel `iommufd_ioas_alloc_ioctl`: flags are EOPNOTSUPP.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn ioas_alloc_flags_is_eopnotsupp() {
        let ictx = ctx();
        let mut cmd = IommuIoasAlloc {
            size: 12,
            flags: 1,
            out_ioas_id: 0,
        };
        assert_errno!(ictx.ioas_alloc(&mut cmd), EOPNOTSUPP);
        assert!(ictx.objects().is_empty());
    }

    /// TEST_F(iommufd_ioas, ioas_area_auto_destroy): closing the iommufd
    /// frees IOASes with their areas (after their grace period).
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn release_destroys_leaf_first() {
        let ictx = ctx();
        let ioas = ioas_alloc(&ictx);
        let fd = memfd(1);
        for i in 0..10 {
            map_fixed(&ictx, ioas, &fd, 0, P, (i + 1) * P).unwrap();
        }
        let space = ictx.ioas_space(ioas).unwrap();
        let before = space.grace_periods();
        drop(ictx);
        assert!(space.with_tree(|t| t.is_empty()));
        assert!(space.grace_periods() > before);
    }
}
