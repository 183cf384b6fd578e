//! vcdev's software IOMMU.
pub mod errno;
pub mod iotlb;
pub mod mem;
pub mod space;
pub mod translate;
pub mod tree;

pub use errno::Errno;
pub use mem::{MemObject, SealPolicy};
pub use space::AddressSpace;
pub use translate::{Fault, HostSlice, Reader, Session, Slices};
pub use tree::{Extent, Tree};
pub use vm_memory::Permissions;
