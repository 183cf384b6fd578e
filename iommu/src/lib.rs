//! vcdev's software IOMMU.
pub mod device;
pub mod errno;
pub mod hwpt;
pub mod io_pagetable;
pub mod ioas;
pub mod iotlb;
pub mod mem;
pub mod object;
pub mod space;
#[cfg(test)]
mod test_util;
pub mod translate;
pub mod tree;
pub mod uapi;

pub use device::{AttachHook, DeviceError, DeviceHandle};
pub use errno::Errno;
pub use hwpt::{Hwpt, HwptError};
pub use io_pagetable::{IoPageTable, IoptError, IovaRange, PAGE_SIZE};
pub use ioas::{Ioas, IoasError};
pub use mem::{MemObject, SealPolicy};
pub use object::{Iommufd, ObjectError, ObjectId, ObjectKind};
pub use space::AddressSpace;
pub use translate::{Fault, HostSlice, Reader, Session, Slices};
pub use tree::{Extent, Tree};
pub use vm_memory::Permissions;
