//! Shared test support, and the userspace VFIO virtio-blk driver that runs
//! both on vcdev's cdev door and on Linux's own VFIO (issue #13):
//!
//! - [`mem`]: driver memory in sealed memfds and userspace split rings;
//! - [`vfio`]: the VFIO transport trait ([`vfio::Vfio`]) with its two
//!   implementations, vcdev's socket client and real ioctls on real
//!   descriptors, and the two ways to give a device DMA (an iommufd IOAS,
//!   a type1 container);
//! - [`blk`]: the virtio-blk driver over any of them;
//! - [`cases`]: the group/container errno cases both transports run.

pub mod blk;
pub mod cases;
pub mod mem;
pub mod vfio;
