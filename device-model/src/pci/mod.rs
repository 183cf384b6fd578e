//! The virtio PCI function (modern, virtio 1.x; virtio 1.2 section 4.1) through which the
//! device-cdev door exposes a device, as Linux's vfio-pci exposes a PCI device.
//!
//! This is data and register semantics only: no sockets, no VFIO message structs. The
//! transport maps a VFIO user's requests onto it:
//!
//! | VFIO request | here |
//! |---|---|
//! | `GET_INFO` | [`RegionIndex::ALL`], [`IrqIndex::ALL`] (9 regions, 5 irq indexes; PCI, resettable) |
//! | `GET_REGION_INFO` | [`Layout::region_info`] (`None`: `-EINVAL`) |
//! | `GET_IRQ_INFO` | [`Layout::irq_info`] |
//! | region read / write | [`VirtioPciFunction::region_read`] / [`VirtioPciFunction::region_write`] ([`RegionIndex::split_file_offset`] splits the file offset) |
//! | `IOEVENTFD` on a doorbell | [`Layout::queue_for_doorbell`]: a fired eventfd is an [`Event::QueueNotify`] |
//! | `SET_IRQS` on MSI-X | [`VirtioPciFunction::host_msix_enable`], [`VirtioPciFunction::host_msix_mask`]; the transport keeps the eventfds |
//! | `RESET` | [`VirtioPciFunction::reset`] |
//!
//! - [`layout`]: the BAR layout and the region and interrupt tables.
//! - [`config`]: config space (header, capability list, write masks).
//! - [`regs`]: register numbers and bits (`pci_regs.h`, `virtio_pci.h`).
//! - [`VirtioPciFunction`]: the common configuration state machine (feature negotiation,
//!   device status, queue setup), ISR, doorbells and MSI-X, over a [`crate::blk::BlkDevice`].
//!
//! # Driving it
//!
//! Writes return [`Event`]s. On [`Event::QueueEnabled`] the transport builds the queue from
//! [`VirtioPciFunction::queue_config`] ([`QueueConfig::to_queue`]) with the negotiated
//! `EVENT_IDX`, and serves it with [`crate::blk::AsyncQueue::poll`] through the IOAS's memory
//! view; on [`Event::QueueNotify`] it polls that queue; when a queue reports that the
//! driver needs a notification it calls [`VirtioPciFunction::queue_interrupt`] and signals the
//! returned MSI-X vector's eventfd; [`Event::Interrupt`] (a pending vector released by an
//! unmask) is signalled the same way. On [`Event::Reset`] it stops every queue and forgets it
//! before answering the write, so that the driver reading `device_status` back as 0 knows the
//! device is quiet.

pub mod config;
pub mod layout;
pub mod regs;

mod common;
mod function;
mod msix;

#[cfg(test)]
mod tests;

pub use common::QueueConfig;
pub use function::VirtioPciFunction;
pub use layout::{Area, IrqFlags, IrqIndex, IrqInfo, Layout, RegionFlags, RegionIndex, RegionInfo};
pub use msix::MsixEntry;

/// Errors building a function.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The queue count does not fit an MSI-X table (one vector per queue, one for config).
    #[error("A virtio PCI function takes 1 to 2047 queues, not {0}")]
    QueueCount(u16),
    /// The virtio device id does not fit the PCI device id.
    #[error("Virtio device id {0} does not fit a PCI device id")]
    DeviceId(u32),
}

/// An access vfio-pci would refuse. Each variant says which errno vfio-pci gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// A region the device does not have, or of size 0 (`-EINVAL`).
    #[error("Region {0:?} cannot be read or written")]
    NoRegion(RegionIndex),
    /// An offset at or past the end of a BAR (`-EINVAL`).
    #[error("Offset {offset:#x} is past the end of the BAR ({size:#x} bytes)")]
    BarOutOfRange {
        /// Offset inside the region.
        offset: u64,
        /// Size of the BAR.
        size: u64,
    },
    /// An access reaching past the end of config space (`-EFAULT`, `vfio_config_do_rw`).
    #[error("Config space access of {len} bytes at {offset:#x} reaches past its end")]
    ConfigOutOfRange {
        /// Offset inside the region.
        offset: u64,
        /// Length of the access.
        len: u64,
    },
    /// A BAR access while the command register's memory space enable is clear (`-EIO`,
    /// `__vfio_pci_memory_enabled`).
    #[error("Memory space access is disabled in the command register")]
    MemoryDisabled,
}

/// What a register write asks of the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The driver enabled queue `q`: build it from [`VirtioPciFunction::queue_config`] and
    /// start serving it.
    QueueEnabled(u16),
    /// The driver notified queue `q` (a doorbell write).
    QueueNotify(u16),
    /// The driver set `DRIVER_OK`.
    DriverOk,
    /// The device was reset (`device_status` 0, a function level reset, or
    /// [`VirtioPciFunction::reset`]): stop every queue and forget it; the function's virtio
    /// state is back to its initial values.
    Reset,
    /// Signal MSI-X vector `v` now (a pending message released by an unmask or enable).
    Interrupt(u16),
}
