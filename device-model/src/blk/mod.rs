//! The virtio-blk device (virtio 1.2 section 5.2).
//!
//! [`BlkDevice`] is shared by every queue of a device (it is `Send + Sync`): options, offered
//! features, config space and the [`BlockBackend`]. [`AsyncQueue`] is the state of one queue's
//! worker, the one queue engine both doors drive (see [`inflight`]).
//!
//! # Driving a queue
//!
//! The transport sets the negotiated `EVENT_IDX` on the queue (`Queue::set_event_idx`), then on
//! each kick, and when the queue's I/O engine has completions, calls [`AsyncQueue::poll`] with
//! a view of the driver's memory that translates its addresses (through the IOMMU if there is
//! one) and lets a request hold its translations while its I/O is in flight
//! ([`InflightMemory`]). The poll completes what the engine finished, takes the available chains
//! (with `EVENT_IDX`: notifications off while taking them, back on, and a re-check for chains
//! that raced in), submits their I/O, and reports in [`QueueOutcome::notify`] whether the
//! driver must be interrupted.
//!
//! A request whose buffers miss in the IOMMU is shown to the transport's fault decision: under
//! [`FaultPolicy::Retry`] it is parked (taken from the avail ring, never put back) while the
//! requests behind it go on, and walked again at the next poll, once the transport has asked
//! for the translation; under [`FaultPolicy::Fail`] it completes with `VIRTIO_BLK_S_IOERR`.
//!
//! The device's I/O limits (`iops=`, `bw=`: [`throttle`], changed live with
//! [`BlkDevice::set_limits`]) are applied by [`AsyncQueue`]. A file image is locked as QEMU
//! locks it while its [`FileBackend`] lives ([`lock`]).

pub mod aio;
mod backend;
mod bounce;
mod chain;
pub mod config;
mod exec;
pub mod file;
pub mod inflight;
pub mod lock;
pub mod ram;
pub mod request;
mod resize;
pub mod throttle;
mod volatile;

#[cfg(test)]
mod direct_tests;
#[cfg(test)]
mod inflight_tests;
#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;

use std::io;
use std::mem::offset_of;
use std::sync::{Arc, Mutex};

pub use backend::{BlockBackend, SECTOR_SHIFT, SECTOR_SIZE};
pub use config::BlkConfig;
pub use exec::{status_ok, Fault, FaultPolicy, RequestError};
pub use file::{FileBackend, FileOptions};
pub use inflight::{AsyncQueue, InflightMemory, Release, Tracker};
pub use ram::RamBackend;
pub use resize::{ResizeError, Resized};
pub use throttle::{Limits, Throttle};

use config::SERIAL_LEN;
use exec::Target;
use resize::Capacity;
use virtio_bindings::virtio_blk::virtio_blk_config;

/// Errors of the device as a whole (not of one request: those go to the status byte).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options are invalid.
    #[error("Invalid virtio-blk options")]
    Config(#[from] config::Error),
    /// The used ring or the notification fields could not be updated.
    #[error("Failed to update the virtqueue")]
    Queue(#[source] virtio_queue::Error),
}

/// What one [`AsyncQueue::poll`] (or [`AsyncQueue::drain`]) call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Chains put on the used ring.
    pub completed: u32,
    /// Whether the driver must be notified (honours `EVENT_IDX`).
    pub notify: bool,
    /// The first IOMMU fault of the call decided [`FaultPolicy::Retry`]: its request is parked
    /// (off the avail ring) until a later poll finds the translation.
    pub fault: Option<Fault>,
    /// The call stopped taking chains after 8 of them (a ring's worth with small batches
    /// off), or after about 512 KiB of data ([`AsyncQueue::poll`]): more may wait on the
    /// avail ring, with the driver's notifications possibly off. Poll again soon, without
    /// waiting for a kick.
    pub more: bool,
}

/// Where `capacity` sits in the config space.
const CAPACITY_OFFSET: usize = offset_of!(virtio_blk_config, capacity);

/// A virtio-blk device, shared by all its queues.
///
/// Its size can change at run time ([`BlkDevice::resize`]): the bounds check of every request
/// and the config space's `capacity` field read it, an atomic under a sequence count (see
/// [`BlkDevice::config_generation`]).
#[derive(Debug)]
pub struct BlkDevice {
    backend: Arc<dyn BlockBackend>,
    cfg: BlkConfig,
    serial: [u8; SERIAL_LEN],
    /// The config space as made at start-up; `capacity` in it is stale once resized (reads
    /// overlay [`BlkDevice::capacity`]).
    config_space: Vec<u8>,
    features: u64,
    /// The `iops=` / `bw=` limits, shared by every queue ([`throttle`]).
    throttle: Throttle,
    capacity: Capacity,
    /// Serialises resizes.
    resize_lock: Mutex<()>,
}

impl BlkDevice {
    /// A device over `backend` with options `cfg`.
    pub fn new(backend: Arc<dyn BlockBackend>, cfg: BlkConfig) -> Result<Self, Error> {
        cfg.validate()?;
        let len = backend.len();
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(config::Error::InvalidCapacity(len).into());
        }
        Ok(Self {
            serial: cfg.serial_bytes(),
            config_space: cfg.config_space(len, backend.block_size()),
            features: cfg.device_features(),
            capacity: Capacity::new(len),
            resize_lock: Mutex::new(()),
            backend,
            cfg,
            throttle: Throttle::default(),
        })
    }

    /// The features the device offers.
    #[must_use]
    pub fn device_features(&self) -> u64 {
        self.features
    }

    /// Number of request queues.
    #[must_use]
    pub fn num_queues(&self) -> u16 {
        self.cfg.num_queues
    }

    /// Maximum size of each queue.
    #[must_use]
    pub fn queue_size(&self) -> u16 {
        self.cfg.queue_size
    }

    /// The options the device was made with.
    #[must_use]
    pub fn config(&self) -> &BlkConfig {
        &self.cfg
    }

    /// The disk size in bytes, as the driver sees it (it changes with [`BlkDevice::resize`]).
    #[must_use]
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.get()
    }

    /// How many times the device configuration changed (each resize that changed the size): a
    /// transport adds it to its `config_generation`. Never returns while a change is half done.
    #[must_use]
    pub fn config_generation(&self) -> u32 {
        self.capacity.generation()
    }

    /// The whole config space (`struct virtio_blk_config`, 96 bytes), with the current
    /// capacity.
    #[must_use]
    pub fn config_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.config_space.len()];
        self.read_config(0, &mut out);
        out
    }

    /// Read config space at `offset`; bytes past its end read as zero. `capacity` is read once,
    /// so one read sees one size.
    pub fn read_config(&self, offset: u32, data: &mut [u8]) {
        crate::virtio::config::read_config(&self.config_space, offset, data);
        let sectors = (self.capacity.get() >> SECTOR_SHIFT).to_le_bytes();
        // The part of `capacity` that `data` covers.
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, b) in sectors.iter().enumerate() {
            let at = CAPACITY_OFFSET.saturating_add(i);
            if let Some(d) = at.checked_sub(start).and_then(|j| data.get_mut(j)) {
                *d = *b;
            }
        }
    }

    /// The I/O limits in force (unlimited unless set).
    #[must_use]
    pub fn limits(&self) -> Limits {
        self.throttle.limits()
    }

    /// Changes the I/O limits, live: requests parked by the old limits are looked at again
    /// under the new ones (their queues' workers are woken). Zero means unlimited.
    pub fn set_limits(&self, limits: Limits) {
        let old = self.throttle.limits();
        self.throttle.set_limits(limits, std::time::Instant::now());
        if old != limits {
            log::info!(
                "virtio-blk: limits changed from {} to {}",
                throttle::describe(old),
                throttle::describe(limits)
            );
        }
    }

    /// The device's token buckets: the queues draw from them, a queue's worker registers to be
    /// woken when the limits change ([`Throttle::add_waker`]).
    #[must_use]
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Make every completed write durable (at shutdown, for example).
    pub fn flush(&self) -> io::Result<()> {
        self.backend.flush()
    }

    /// The backing store.
    #[must_use]
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// The engine each queue does its I/O on (the resolved `aio=` option): build it with
    /// `aio::Engine::new(device.aio(), device.backend().clone(), depth)`.
    #[must_use]
    pub fn aio(&self) -> aio::Aio {
        self.cfg.aio
    }

    /// The logical block size advertised in `blk_size`: the backing's, at least 512.
    #[must_use]
    pub fn block_size(&self) -> u32 {
        self.backend.block_size()
    }

    fn target(&self) -> Target<'_> {
        Target {
            backend: self.backend.as_ref(),
            capacity: self.capacity.get(),
            read_only: self.cfg.read_only,
            serial: &self.serial,
        }
    }
}
