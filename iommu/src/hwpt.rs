//! HW page tables (the kernel's `hw_pagetable.c`): a paging domain on an
//! IOAS, allocated for a device.
//!
//! In the software IOMMU a HWPT translates through its IOAS's address
//! space; what it adds is the domain's constraints on that IOAS: its page
//! size (the IOAS alignment rises to [`PAGE_SIZE`]) and its aperture (the
//! device's; everything outside becomes reserved). A HWPT is automatic
//! (made by attaching a device to an IOAS, freed with its last device) or
//! allocated with IOMMU_HWPT_ALLOC (freed by IOMMU_DESTROY once no device
//! uses it).

use std::sync::Arc;

use crate::errno::Errno;
use crate::io_pagetable::{IoptError, IovaRange, ResvOwner, PAGE_SIZE};
use crate::ioas::Ioas;
use crate::object::{Iommufd, Object, ObjectError, ObjectId, Table};
use crate::space::AddressSpace;
use crate::uapi;

/// A paging HWPT.
#[derive(Debug)]
pub struct Hwpt {
    pub(crate) ioas_id: ObjectId,
    pub(crate) ioas: Arc<Ioas>,
    pub(crate) auto: bool,
    pub(crate) aperture: IovaRange,
    pub(crate) owner: ResvOwner,
}

/// Errors of IOMMU_HWPT_ALLOC.
#[derive(Debug, thiserror::Error)]
pub enum HwptError {
    /// `__reserved` is not 0.
    #[error("reserved field is not 0")]
    ReservedField,
    /// data_type NONE with data, or another type without.
    #[error("data type {data_type} with {data_len} bytes of data")]
    DataLen {
        /// Type.
        data_type: u32,
        /// Length.
        data_len: u32,
    },
    /// The device lookup failed.
    #[error("device lookup failed")]
    Device(#[source] ObjectError),
    /// `pt_id` names no object.
    #[error("no page table object {0}")]
    NoPt(u32),
    /// `pt_id` is neither an IOAS nor a HWPT.
    #[error("object {0} is neither an IOAS nor a HWPT")]
    WrongPtKind(u32),
    /// Allocation flags or driver data the software IOMMU does not offer.
    #[error("unsupported flags {flags:#x} or data type {data_type}")]
    Unsupported {
        /// Flags.
        flags: u32,
        /// Data type.
        data_type: u32,
    },
    /// A nested HWPT (pt_id is a HWPT): not offered.
    #[error("nested HWPTs are not supported")]
    Nested,
    /// The IOAS refused the domain.
    #[error("IOAS refused the domain")]
    Iopt(#[source] IoptError),
    /// The object table is full.
    #[error("object table")]
    Object(#[source] ObjectError),
}

impl HwptError {
    /// The errno for this error.
    pub fn errno(&self) -> Errno {
        match self {
            HwptError::ReservedField | HwptError::Unsupported { .. } | HwptError::Nested => {
                Errno::EOPNOTSUPP
            }
            HwptError::DataLen { .. } | HwptError::NoPt(_) | HwptError::WrongPtKind(_) => {
                Errno::EINVAL
            }
            HwptError::Device(e) | HwptError::Object(e) => e.errno(),
            HwptError::Iopt(e) => e.errno(),
        }
    }
}

impl Hwpt {
    /// Makes a HWPT on IOAS `ioas_id` with `aperture`, adds its domain to
    /// the IOAS and enters it into the table (iommufd_hwpt_paging_alloc).
    pub(crate) fn create(
        t: &mut Table,
        ioas_id: ObjectId,
        ioas: Arc<Ioas>,
        aperture: IovaRange,
        auto: bool,
    ) -> Result<(ObjectId, Arc<Hwpt>), HwptError> {
        let owner = ResvOwner::new();
        ioas.iopt()
            .add_domain(owner, aperture, PAGE_SIZE)
            .map_err(HwptError::Iopt)?;
        let hwpt = Arc::new(Hwpt {
            ioas_id,
            ioas,
            auto,
            aperture,
            owner,
        });
        match t.insert(Object::Hwpt(hwpt.clone())) {
            Ok(id) => Ok((id, hwpt)),
            Err(e) => {
                hwpt.destroy();
                Err(HwptError::Object(e))
            }
        }
    }

    /// Takes the domain off its IOAS (iommufd_hwpt_paging_destroy).
    pub(crate) fn destroy(&self) {
        self.ioas.iopt().remove_domain(self.owner);
    }

    /// The IOAS it is on.
    pub fn ioas_id(&self) -> ObjectId {
        self.ioas_id
    }

    /// Whether it was made by attaching a device to an IOAS.
    pub fn is_auto(&self) -> bool {
        self.auto
    }

    /// The domain's aperture.
    pub fn aperture(&self) -> IovaRange {
        self.aperture
    }

    /// The address space it translates through.
    pub fn space(&self) -> &Arc<AddressSpace> {
        self.ioas.space()
    }
}

/// Destroys HWPT `id` if it is automatic and no device uses it any more.
pub(crate) fn put_auto(t: &mut Table, id: ObjectId) {
    let auto = matches!(t.objects.get(&id.0), Some(Object::Hwpt(h)) if h.auto);
    if auto && t.hwpt_users(id.0) == 0 {
        if let Some(Object::Hwpt(h)) = t.objects.remove(&id.0) {
            h.destroy();
        }
    }
}

impl Iommufd {
    /// IOMMU_HWPT_ALLOC: a paging HWPT on IOAS `pt_id` for device
    /// `dev_id`, data type NONE, no flags; its id goes to `out_hwpt_id`.
    pub fn hwpt_alloc(&self, cmd: &mut uapi::IommuHwptAlloc) -> Result<ObjectId, HwptError> {
        if cmd.__reserved != 0 {
            return Err(HwptError::ReservedField);
        }
        let none = cmd.data_type == uapi::IOMMU_HWPT_DATA_NONE;
        if none == (cmd.data_len != 0) {
            return Err(HwptError::DataLen {
                data_type: cmd.data_type,
                data_len: cmd.data_len,
            });
        }
        let mut t = self.table();
        let aperture = t
            .device(cmd.dev_id)
            .map_err(HwptError::Device)?
            .handle
            .aperture();
        let ioas = match t.get(cmd.pt_id) {
            Err(_) => return Err(HwptError::NoPt(cmd.pt_id)),
            Ok(Object::Ioas(ioas)) => ioas.clone(),
            Ok(Object::Hwpt(_)) => return Err(HwptError::Nested),
            Ok(Object::Device(_)) => return Err(HwptError::WrongPtKind(cmd.pt_id)),
        };
        // The software IOMMU has no domain_alloc_paging_flags: any flag or
        // driver data is EOPNOTSUPP, as for such kernel drivers.
        if cmd.flags != 0 || !none {
            return Err(HwptError::Unsupported {
                flags: cmd.flags,
                data_type: cmd.data_type,
            });
        }
        let (id, _) = Hwpt::create(&mut t, ObjectId(cmd.pt_id), ioas, aperture, false)?;
        cmd.out_hwpt_id = id.0;
        Ok(id)
    }
}
