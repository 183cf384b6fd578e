//! vcdev's software IOMMU.
//!
//! # Architecture
//!
//! One extent store serves both ways into the IOMMU. An [`AddressSpace`]
//! holds non-overlapping extents (IOVA range -> offset in a [`MemObject`],
//! with permissions) in a persistent B+ tree ([`tree`]) whose root is
//! published read-copy-update; writers change it only through
//! [`AddressSpace::edit`], which returns after a grace period whenever a
//! translation was removed or replaced ([`space`] documents the invariants).
//!
//! Two rule sets sit on top of it:
//! - the iommufd object model, Linux's errno for errno: [`object`] (the
//!   object table of one iommufd file, `main.c`), [`ioas`] (the IOAS
//!   commands, `ioas.c`), [`io_pagetable`] (areas, allowed and reserved
//!   ranges, IOVA allocation, `io_pagetable.c`), [`hwpt`] and [`device`]
//!   (bind, attach, replace, detach), [`uapi`] (the kernel structs);
//! - an IOTLB cache of a remote IOMMU for vhost-user ([`iotlb`]): UPDATE
//!   replaces what it overlaps, INVALIDATE removes what it overlaps.
//!
//! Readers are queues: each owns a [`Reader`] with a direct-mapped front
//! cache, goes online with [`Reader::enter`] and translates through the
//! resulting [`Session`], which also implements vm-memory's permission-aware
//! `GuestMemory` so that virtio-queue walks descriptor chains through it
//! ([`translate`]). A hit costs one atomic load (the generation) and one
//! cache probe; no lock is taken on the read side. A request whose I/O
//! outlives its session holds its translated ranges ([`hold`]) until it
//! completes, and edits that remove what it holds wait for it.
//!
//! Every error enum has `fn errno(&self) -> Errno`: the one mapping from a
//! failure to a Linux errno ([`errno`]).
pub mod device;
pub mod errno;
pub mod hold;
#[cfg(test)]
mod hostile_tests;
pub mod hwpt;
pub mod io_pagetable;
pub mod ioas;
pub mod iotlb;
#[cfg(all(test, loom))]
mod loom_tests;
pub mod mem;
#[cfg(any(test, feature = "testing"))]
pub mod model;
pub mod object;
pub mod space;
pub mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod test_util;
pub mod translate;
pub mod tree;
pub mod uapi;

pub use device::{AttachHook, DeviceError, DeviceHandle, MapStats};
pub use errno::Errno;
pub use hold::{hold_range, HoldId, HoldRange, HoldReleaser};
pub use hwpt::{Hwpt, HwptError};
pub use io_pagetable::{IoPageTable, IoptError, IovaRange, PAGE_SIZE};
pub use ioas::{Ioas, IoasError};
pub use mem::{MemObject, SealPolicy};
pub use object::{Iommufd, ObjectError, ObjectId, ObjectKind};
pub use space::{AddressSpace, HoldWaits};
pub use translate::{Fault, HostSlice, Reader, Session, SliceIter, Slices};
pub use tree::{Extent, Tree};
pub use vm_memory::Permissions;
