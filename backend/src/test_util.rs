//! Builders shared by the backend's unit and property tests.

use std::sync::Arc;

use vcdev_device_model::blk::{BlkConfig, BlkDevice, RamBackend};

/// A 1 MiB RAM disk with the default configuration.
pub fn ram_blk() -> Arc<BlkDevice> {
    Arc::new(
        BlkDevice::new(
            Arc::new(RamBackend::new(1 << 20).unwrap()),
            BlkConfig::default(),
        )
        .unwrap(),
    )
}
