//! The virtio common configuration structure and the device status state machine (virtio 1.2
//! sections 2.1, 3.1 and 4.1.4.3).

use log::debug;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};

use super::regs::{
    VIRTIO_MSI_NO_VECTOR, VIRTIO_PCI_COMMON_CFGGENERATION, VIRTIO_PCI_COMMON_CFG_LEN,
    VIRTIO_PCI_COMMON_DF, VIRTIO_PCI_COMMON_DFSELECT, VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT, VIRTIO_PCI_COMMON_MSIX, VIRTIO_PCI_COMMON_NUMQ,
    VIRTIO_PCI_COMMON_Q_AVAILHI, VIRTIO_PCI_COMMON_Q_AVAILLO, VIRTIO_PCI_COMMON_Q_DESCHI,
    VIRTIO_PCI_COMMON_Q_DESCLO, VIRTIO_PCI_COMMON_Q_ENABLE, VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NOFF, VIRTIO_PCI_COMMON_Q_SELECT, VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_Q_USEDHI, VIRTIO_PCI_COMMON_Q_USEDLO, VIRTIO_PCI_COMMON_STATUS,
};
use super::Event;
use crate::virtio::features::has_feature;

/// Status bits as the one-byte `device_status` register holds them.
const FEATURES_OK: u8 = status_bit(VIRTIO_CONFIG_S_FEATURES_OK);
const DRIVER_OK: u8 = status_bit(VIRTIO_CONFIG_S_DRIVER_OK);
const NEEDS_RESET: u8 = status_bit(VIRTIO_CONFIG_S_NEEDS_RESET);

const fn status_bit(bit: u32) -> u8 {
    // Every VIRTIO_CONFIG_S_* is a bit of the one-byte status.
    match bit {
        0..=0xff => bit as u8,
        _ => 0,
    }
}

/// How a virtqueue is configured, as the driver set it through the common configuration.
///
/// Addresses are what the driver wrote: IOVAs of the IOAS the device is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue size (a power of two, at most the device's maximum).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver area (available ring) address.
    pub driver: u64,
    /// Device area (used ring) address.
    pub device: u64,
    /// MSI-X vector for used-buffer notifications, or [`VIRTIO_MSI_NO_VECTOR`].
    pub msix_vector: u16,
    /// Whether the driver enabled the queue.
    pub enabled: bool,
}

impl QueueConfig {
    fn reset(max_size: u16) -> Self {
        Self {
            size: max_size,
            desc: 0,
            driver: 0,
            device: 0,
            msix_vector: VIRTIO_MSI_NO_VECTOR,
            enabled: false,
        }
    }

    /// A [`virtio_queue::Queue`] set up as this configuration says (ready if enabled), for a
    /// device whose queues hold at most `max_size` entries.
    ///
    /// An error means the driver configured the queue badly (a misaligned ring, an invalid
    /// size): the transport should mark the device `NEEDS_RESET`.
    pub fn to_queue(
        &self,
        max_size: u16,
        event_idx: bool,
    ) -> Result<virtio_queue::Queue, virtio_queue::Error> {
        use virtio_queue::QueueT;
        use vm_memory::GuestAddress;

        let mut queue = virtio_queue::Queue::new(max_size)?;
        queue.try_set_size(self.size)?;
        queue.try_set_desc_table_address(GuestAddress(self.desc))?;
        queue.try_set_avail_ring_address(GuestAddress(self.driver))?;
        queue.try_set_used_ring_address(GuestAddress(self.device))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(self.enabled);
        Ok(queue)
    }
}

/// The virtio state behind the common configuration, and the ISR byte.
#[derive(Clone, Debug)]
pub(crate) struct CommonCfg {
    offered: u64,
    max_queue_size: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    /// The driver set a feature bit past 63 (never offered).
    unoffered_high_features: bool,
    config_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueConfig>,
    isr: u8,
}

/// A 32-bit half of a 64-bit value.
fn set_half(value: &mut u64, high: bool, half: u32) {
    if high {
        *value = (*value & u64::from(u32::MAX)) | (u64::from(half) << 32);
    } else {
        *value = (*value & !u64::from(u32::MAX)) | u64::from(half);
    }
}

fn half(value: u64, high: bool) -> u32 {
    let bytes = value.to_le_bytes();
    let (lo, hi) = bytes.split_at(4);
    let pick = if high { hi } else { lo };
    <[u8; 4]>::try_from(pick).map_or(0, u32::from_le_bytes)
}

impl CommonCfg {
    pub(crate) fn new(offered: u64, num_queues: u16, max_queue_size: u16) -> Self {
        Self {
            offered,
            max_queue_size,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            unoffered_high_features: false,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: vec![QueueConfig::reset(max_queue_size); usize::from(num_queues)],
            isr: 0,
        }
    }

    /// Device reset: everything back to its initial value (virtio 1.2 section 2.4).
    pub(crate) fn reset(&mut self) {
        let num_queues = self.num_queues();
        *self = Self::new(self.offered, num_queues, self.max_queue_size);
    }

    pub(crate) fn offered(&self) -> u64 {
        self.offered
    }

    pub(crate) fn num_queues(&self) -> u16 {
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }

    pub(crate) fn status(&self) -> u8 {
        self.status
    }

    pub(crate) fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub(crate) fn config_vector(&self) -> u16 {
        self.config_vector
    }

    pub(crate) fn queue(&self, q: u16) -> Option<QueueConfig> {
        self.queues.get(usize::from(q)).copied()
    }

    /// Set `NEEDS_RESET` (the device hit an error it cannot recover from).
    pub(crate) fn set_needs_reset(&mut self) {
        self.status |= NEEDS_RESET;
    }

    /// The device configuration changed (virtio 1.2 section 4.1.4.3.1).
    pub(crate) fn bump_generation(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    pub(crate) fn raise_isr(&mut self, bits: u8) {
        self.isr |= bits;
    }

    /// Read the ISR byte, which clears it (virtio 1.2 section 4.1.4.5.1).
    pub(crate) fn take_isr(&mut self) -> u8 {
        std::mem::take(&mut self.isr)
    }

    pub(crate) fn peek_isr(&self) -> u8 {
        self.isr
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The whole structure as the driver reads it. `device_generation` counts the changes of
    /// the device's own configuration (a resize): `config_generation` moves with them too.
    pub(crate) fn snapshot(&self, device_generation: u32) -> [u8; VIRTIO_PCI_COMMON_CFG_LEN] {
        let mut out = [0u8; VIRTIO_PCI_COMMON_CFG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            crate::virtio::config::put_bytes(&mut out, offset, bytes);
        };
        let device_feature = match self.device_feature_select {
            0 => half(self.offered, false),
            1 => half(self.offered, true),
            _ => 0,
        };
        let driver_feature = match self.driver_feature_select {
            0 => half(self.driver_features, false),
            1 => half(self.driver_features, true),
            _ => 0,
        };
        put(
            VIRTIO_PCI_COMMON_DFSELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        put(VIRTIO_PCI_COMMON_DF, &device_feature.to_le_bytes());
        put(
            VIRTIO_PCI_COMMON_GFSELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        put(VIRTIO_PCI_COMMON_GF, &driver_feature.to_le_bytes());
        put(VIRTIO_PCI_COMMON_MSIX, &self.config_vector.to_le_bytes());
        put(VIRTIO_PCI_COMMON_NUMQ, &self.num_queues().to_le_bytes());
        put(VIRTIO_PCI_COMMON_STATUS, &[self.status]);
        // Only the low byte counts: the register is 8 bits wide.
        let generation = self
            .config_generation
            .wrapping_add(device_generation.to_le_bytes()[0]);
        put(VIRTIO_PCI_COMMON_CFGGENERATION, &[generation]);
        put(VIRTIO_PCI_COMMON_Q_SELECT, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            put(VIRTIO_PCI_COMMON_Q_SIZE, &q.size.to_le_bytes());
            put(VIRTIO_PCI_COMMON_Q_MSIX, &q.msix_vector.to_le_bytes());
            put(
                VIRTIO_PCI_COMMON_Q_ENABLE,
                &u16::from(q.enabled).to_le_bytes(),
            );
            put(VIRTIO_PCI_COMMON_Q_NOFF, &self.queue_select.to_le_bytes());
            put(VIRTIO_PCI_COMMON_Q_DESCLO, &q.desc.to_le_bytes());
            put(VIRTIO_PCI_COMMON_Q_AVAILLO, &q.driver.to_le_bytes());
            put(VIRTIO_PCI_COMMON_Q_USEDLO, &q.device.to_le_bytes());
        }
        // A non-existent queue reads as all zeros: queue_size 0 says "not available".
        out
    }

    /// A driver write of `data` at `offset`. Fields must be written whole with their natural
    /// width (64-bit fields also as two 32-bit halves); other writes are dropped.
    /// `msix_vectors` is the MSI-X table size, to validate vector numbers.
    pub(crate) fn write(&mut self, offset: usize, data: &[u8], msix_vectors: u16) -> Vec<Event> {
        let value = match *data {
            [a] => u32::from(a),
            [a, b] => u32::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
            [..] if data.len() == 8 => return self.write64(offset, data),
            _ => {
                debug!(
                    "virtio-pci: common cfg write of {} bytes at {offset:#x} dropped",
                    data.len()
                );
                return Vec::new();
            }
        };
        let width = data.len();
        let as_u16 = || u16::try_from(value).unwrap_or(0);
        match (offset, width) {
            (VIRTIO_PCI_COMMON_DFSELECT, 4) => self.device_feature_select = value,
            (VIRTIO_PCI_COMMON_GFSELECT, 4) => self.driver_feature_select = value,
            (VIRTIO_PCI_COMMON_GF, 4) => self.write_driver_features(value),
            (VIRTIO_PCI_COMMON_MSIX, 2) => {
                self.config_vector = valid_vector(as_u16(), msix_vectors)
            }
            (VIRTIO_PCI_COMMON_STATUS, 1) => {
                return self.write_status(u8::try_from(value).unwrap_or(0));
            }
            (VIRTIO_PCI_COMMON_Q_SELECT, 2) => self.queue_select = as_u16(),
            (VIRTIO_PCI_COMMON_Q_SIZE, 2) => {
                let max = self.max_queue_size;
                let size = as_u16();
                if let Some(q) = self.queue_mut_unless_enabled() {
                    // Split rings: a power of two no larger than the maximum.
                    if size.is_power_of_two() && size <= max {
                        q.size = size;
                    }
                }
            }
            (VIRTIO_PCI_COMMON_Q_MSIX, 2) => {
                let vector = valid_vector(as_u16(), msix_vectors);
                if let Some(q) = self.queues.get_mut(usize::from(self.queue_select)) {
                    q.msix_vector = vector;
                }
            }
            (VIRTIO_PCI_COMMON_Q_ENABLE, 2) => return self.write_queue_enable(value),
            (
                VIRTIO_PCI_COMMON_Q_DESCLO
                | VIRTIO_PCI_COMMON_Q_DESCHI
                | VIRTIO_PCI_COMMON_Q_AVAILLO
                | VIRTIO_PCI_COMMON_Q_AVAILHI
                | VIRTIO_PCI_COMMON_Q_USEDLO
                | VIRTIO_PCI_COMMON_Q_USEDHI,
                4,
            ) => {
                let high = matches!(
                    offset,
                    VIRTIO_PCI_COMMON_Q_DESCHI
                        | VIRTIO_PCI_COMMON_Q_AVAILHI
                        | VIRTIO_PCI_COMMON_Q_USEDHI
                );
                if let Some(q) = self.queue_mut_unless_enabled() {
                    if let Some(field) = address_field(q, offset) {
                        set_half(field, high, value);
                    }
                }
            }
            _ => debug!("virtio-pci: common cfg write of {width} bytes at {offset:#x} dropped"),
        }
        Vec::new()
    }

    fn write64(&mut self, offset: usize, data: &[u8]) -> Vec<Event> {
        let Ok(bytes) = <[u8; 8]>::try_from(data) else {
            return Vec::new();
        };
        let value = u64::from_le_bytes(bytes);
        match offset {
            VIRTIO_PCI_COMMON_Q_DESCLO
            | VIRTIO_PCI_COMMON_Q_AVAILLO
            | VIRTIO_PCI_COMMON_Q_USEDLO => {
                if let Some(q) = self.queue_mut_unless_enabled() {
                    if let Some(field) = address_field(q, offset) {
                        *field = value;
                    }
                }
            }
            _ => debug!("virtio-pci: common cfg write of 8 bytes at {offset:#x} dropped"),
        }
        Vec::new()
    }

    /// The selected queue, if it exists and its configuration may still change.
    fn queue_mut_unless_enabled(&mut self) -> Option<&mut QueueConfig> {
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !q.enabled)
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are fixed once FEATURES_OK is set (virtio 1.2 section 3.1.1).
        if self.status & FEATURES_OK != 0 {
            return;
        }
        match self.driver_feature_select {
            0 => set_half(&mut self.driver_features, false, value),
            1 => set_half(&mut self.driver_features, true, value),
            // Bits past 63 are never offered: accepting one fails FEATURES_OK.
            _ => self.unoffered_high_features |= value != 0,
        }
    }

    fn write_queue_enable(&mut self, value: u32) -> Vec<Event> {
        // Writing 0 is not allowed (without VIRTIO_F_RING_RESET); enabling twice does nothing.
        if value != 1 {
            return Vec::new();
        }
        let select = self.queue_select;
        match self.queues.get_mut(usize::from(select)) {
            Some(q) if !q.enabled => {
                q.enabled = true;
                vec![Event::QueueEnabled(select)]
            }
            _ => Vec::new(),
        }
    }

    fn write_status(&mut self, value: u8) -> Vec<Event> {
        if value == 0 {
            self.reset();
            return vec![Event::Reset];
        }
        let old = self.status;
        let mut new = value;
        if new & FEATURES_OK != 0 && old & FEATURES_OK == 0 && !self.features_acceptable() {
            debug!(
                "virtio-pci: FEATURES_OK refused for driver features {:#x} (offered {:#x})",
                self.driver_features, self.offered
            );
            new &= !FEATURES_OK;
        }
        // NEEDS_RESET is the device's to set; the driver cannot clear it but by a reset.
        new = (new & !NEEDS_RESET) | (old & NEEDS_RESET);
        self.status = new;
        if new & DRIVER_OK != 0 && old & DRIVER_OK == 0 {
            vec![Event::DriverOk]
        } else {
            Vec::new()
        }
    }

    /// The driver's features are a subset of the offer and include `VIRTIO_F_VERSION_1`.
    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered == 0
            && !self.unoffered_high_features
            && has_feature(self.driver_features, VIRTIO_F_VERSION_1)
    }
}

fn address_field(q: &mut QueueConfig, offset: usize) -> Option<&mut u64> {
    match offset {
        VIRTIO_PCI_COMMON_Q_DESCLO | VIRTIO_PCI_COMMON_Q_DESCHI => Some(&mut q.desc),
        VIRTIO_PCI_COMMON_Q_AVAILLO | VIRTIO_PCI_COMMON_Q_AVAILHI => Some(&mut q.driver),
        VIRTIO_PCI_COMMON_Q_USEDLO | VIRTIO_PCI_COMMON_Q_USEDHI => Some(&mut q.device),
        _ => None,
    }
}

/// A vector the table has, or `NO_VECTOR` ("the device MUST return NO_VECTOR" when it cannot
/// map the vector, virtio 1.2 section 4.1.5.1.2.1).
fn valid_vector(vector: u16, msix_vectors: u16) -> u16 {
    if vector < msix_vectors {
        vector
    } else {
        VIRTIO_MSI_NO_VECTOR
    }
}
