//! Device options, offered features and the virtio-blk config space.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::{
    virtio_blk_config, virtio_blk_config_virtio_blk_geometry, VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::aio::Aio;
use super::backend::{SECTOR_BYTES, SECTOR_SHIFT};
use crate::virtio::config::put_bytes;
use crate::virtio::features::{feature_mask, features_mask};

/// The largest split virtqueue (virtio 1.2 section 2.7: "Queue Size ... maximum is 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// The largest single data segment a driver may use (`size_max`), in bytes.
pub const SIZE_MAX: u32 = 1 << 20;
/// The most segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEG: u32 = 32;
/// The most sectors in one discard or write-zeroes segment (just under 4 GiB).
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;
/// Discard granularity in bytes, reported in sectors as `discard_sector_alignment`.
pub const DISCARD_ALIGNMENT_BYTES: u32 = 4096;
/// Length of the `GET_ID` serial, in bytes.
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Errors in the device options.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The serial does not fit the `GET_ID` answer.
    #[error("Serial is {0} bytes long, at most 20 fit")]
    SerialTooLong(usize),
    /// The queue size is not a power of two in 4..=32768.
    #[error("Queue size {0} is not a power of two between 4 and 32768")]
    InvalidQueueSize(u16),
    /// No queues were asked for.
    #[error("The number of queues must be at least 1")]
    NoQueues,
    /// The backing is empty or not sector-sized.
    #[error("Backing size {0} is not a non-zero multiple of 512 bytes")]
    InvalidCapacity(u64),
}

/// Options of a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Refuse writes and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// The `GET_ID` answer: at most 20 bytes, NUL-padded on the wire.
    pub serial: Vec<u8>,
    /// Number of request queues (`num_queues`; `VIRTIO_BLK_F_MQ` is always offered).
    pub num_queues: u16,
    /// Maximum size of each queue; `seg_max` is derived from it.
    pub queue_size: u16,
    /// The engine the queues use (`aio=`, resolved with `aio::resolve`; default sync).
    pub aio: Aio,
}

impl Default for BlkConfig {
    fn default() -> Self {
        Self {
            read_only: false,
            serial: Vec::new(),
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            aio: Aio::Sync,
        }
    }
}

impl BlkConfig {
    /// Check the options.
    pub fn validate(&self) -> Result<(), Error> {
        if self.serial.len() > SERIAL_LEN {
            return Err(Error::SerialTooLong(self.serial.len()));
        }
        if !self.queue_size.is_power_of_two()
            || self.queue_size < 4
            || self.queue_size > MAX_QUEUE_SIZE
        {
            return Err(Error::InvalidQueueSize(self.queue_size));
        }
        if self.num_queues == 0 {
            return Err(Error::NoQueues);
        }
        Ok(())
    }

    /// The most data segments a request may have: the queue size less header and status.
    #[must_use]
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The features the device offers.
    #[must_use]
    pub fn device_features(&self) -> u64 {
        let mut features = features_mask(&[
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ]);
        if self.read_only {
            features |= feature_mask(VIRTIO_BLK_F_RO);
        }
        features
    }

    /// The serial as sent by `GET_ID`: NUL-padded to 20 bytes.
    #[must_use]
    pub fn serial_bytes(&self) -> [u8; SERIAL_LEN] {
        let mut id = [0u8; SERIAL_LEN];
        put_bytes(&mut id, 0, &self.serial);
        id
    }

    /// The whole `struct virtio_blk_config` for a disk of `capacity_bytes` whose logical block
    /// size is `block_size` (`blk_size`, at least 512), little-endian.
    #[must_use]
    pub fn config_space(&self, capacity_bytes: u64, block_size: u32) -> Vec<u8> {
        let mut cfg = vec![0u8; size_of::<virtio_blk_config>()];
        let geometry = offset_of!(virtio_blk_config, geometry);
        let block_size = block_size.max(SECTOR_BYTES);
        let fields: [(usize, &[u8]); 17] = [
            (
                offset_of!(virtio_blk_config, capacity),
                &(capacity_bytes >> SECTOR_SHIFT).to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, size_max),
                &SIZE_MAX.to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, seg_max),
                &self.seg_max().to_le_bytes(),
            ),
            // No VIRTIO_BLK_F_GEOMETRY: the geometry stays zero.
            (
                geometry + offset_of!(virtio_blk_config_virtio_blk_geometry, cylinders),
                &0u16.to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, blk_size),
                &block_size.to_le_bytes(),
            ),
            // Topology: one logical block per physical block, no offset, no preferred sizes.
            (offset_of!(virtio_blk_config, physical_block_exp), &[0]),
            (offset_of!(virtio_blk_config, alignment_offset), &[0]),
            (
                offset_of!(virtio_blk_config, min_io_size),
                &1u16.to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, opt_io_size),
                &0u32.to_le_bytes(),
            ),
            // Writeback: FLUSH is offered and honoured.
            (offset_of!(virtio_blk_config, wce), &[1]),
            (
                offset_of!(virtio_blk_config, num_queues),
                &self.num_queues.to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, max_discard_seg),
                &MAX_DISCARD_SEG.to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, discard_sector_alignment),
                &(DISCARD_ALIGNMENT_BYTES >> SECTOR_SHIFT).to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                &MAX_DISCARD_SEG.to_le_bytes(),
            ),
            (offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]),
        ];
        for (offset, bytes) in fields {
            put_bytes(&mut cfg, offset, bytes);
        }
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::features::has_feature;

    fn le32(cfg: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(cfg[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn validation() {
        assert!(BlkConfig::default().validate().is_ok());
        let bad = |f: fn(&mut BlkConfig)| {
            let mut c = BlkConfig::default();
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.serial = vec![b'x'; 21]));
        assert!(bad(|c| c.queue_size = 100));
        assert!(bad(|c| c.queue_size = 2));
        assert!(bad(|c| c.queue_size = 0));
        assert!(bad(|c| c.num_queues = 0));
    }

    #[test]
    fn features() {
        let rw = BlkConfig::default().device_features();
        assert!(has_feature(rw, VIRTIO_F_VERSION_1));
        assert!(has_feature(rw, VIRTIO_RING_F_EVENT_IDX));
        assert!(has_feature(rw, VIRTIO_BLK_F_WRITE_ZEROES));
        assert!(!has_feature(rw, VIRTIO_BLK_F_RO));
        let ro = BlkConfig {
            read_only: true,
            ..BlkConfig::default()
        };
        assert!(has_feature(ro.device_features(), VIRTIO_BLK_F_RO));
    }

    #[test]
    fn layout() {
        let cfg = BlkConfig {
            num_queues: 3,
            queue_size: 128,
            ..BlkConfig::default()
        }
        .config_space(1 << 30, 512);
        // The offsets QEMU and Linux use (include/uapi/linux/virtio_blk.h).
        assert_eq!(cfg.len(), 96);
        assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 1 << 21);
        assert_eq!(le32(&cfg, 8), SIZE_MAX);
        assert_eq!(le32(&cfg, 12), 126);
        assert_eq!(le32(&cfg, 20), 512);
        assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 3);
        assert_eq!(le32(&cfg, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&cfg, 40), MAX_DISCARD_SEG);
        assert_eq!(le32(&cfg, 44), 8);
        assert_eq!(le32(&cfg, 48), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&cfg, 52), MAX_DISCARD_SEG);
        assert_eq!(cfg[56], 1);
        // direct=on on a 4K-sector disk: blk_size is the disk's; never below 512.
        let cfg = BlkConfig::default().config_space(1 << 30, 4096);
        assert_eq!(le32(&cfg, 20), 4096);
        let cfg = BlkConfig::default().config_space(1 << 30, 1);
        assert_eq!(le32(&cfg, 20), 512);
    }

    #[test]
    fn serial_padding() {
        let c = BlkConfig {
            serial: b"disk0".to_vec(),
            ..BlkConfig::default()
        };
        let id = c.serial_bytes();
        assert_eq!(&id[..5], b"disk0");
        assert!(id[5..].iter().all(|&b| b == 0));
    }
}
