//! vcdev device models: transport-agnostic emulated devices.
//!
//! # Architecture
//!
//! A device model knows virtio rings, descriptor chains and its backing store, and nothing of
//! sockets, vhost-user or the device-cdev door. A transport (the `backend` crate) owns the
//! connection, negotiates features, builds one [`virtio_queue::Queue`] per virtqueue and hands
//! each queue, together with a [`vm_memory::GuestMemory`] view of the driver's memory, to the
//! device. The memory view is where IOMMU translation happens: this crate never assumes that a
//! descriptor address is a guest physical address.
//!
//! [`virtio`] holds the device-independent pieces (feature bits, bounds-checked config-space
//! access). [`blk`] is the virtio-blk device (virtio 1.2 section 5.2): [`blk::BlkDevice`] is the
//! shared, thread-safe device (configuration, config space, backing), [`blk::AsyncQueue`] is the
//! per-queue worker state, the one queue engine that both doors, `vub_blk` and the unit tests
//! drive: requests submitted to the queue's I/O engine ([`blk::aio`]: io_uring or sync) and
//! completed in any order, holding their translations meanwhile ([`blk::InflightMemory`]).
//! Each request goes through two phases: it is parsed and all its buffers are translated
//! through the `GuestMemory` first (so an IOMMU miss or permission fault is found before any
//! side effect), and only then executed against a [`blk::BlockBackend`] (a raw file or RAM).
//! An IOMMU fault is either failed with `VIRTIO_BLK_S_IOERR` or parked while the transport
//! resolves it (the requests behind it go on), as the transport's [`blk::FaultPolicy`] says.
//!
//! [`pci`] is the virtio PCI function (modern, virtio 1.2 section 4.1) that the device-cdev door
//! exposes the way Linux's vfio-pci exposes a PCI device: config space with the virtio and MSI-X
//! capabilities, the BAR layout, regions and interrupt indexes as data, and the register
//! semantics of the common configuration, ISR, doorbells and MSI-X table as
//! [`pci::VirtioPciFunction`]. It has no sockets and no VFIO messages: register writes return
//! [`pci::Event`]s (queue enabled, doorbell, reset, interrupt) for the transport to act on, and
//! the queues it configures are served by the same [`blk::AsyncQueue`] as the vhost-user door's.
//!
//! # Errors
//!
//! Each module has its own `thiserror` enum whose variants name the step that failed and carry
//! the cause as `#[source]`. Request errors are turned into a virtio-blk status byte in exactly
//! one place, [`blk::RequestError::status`].
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod blk;
pub mod pci;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod virtio;
