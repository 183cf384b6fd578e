//! Virtio feature bits.
//!
//! Feature numbers come from `virtio_bindings` as bit positions; these helpers turn them into
//! masks and negotiate them, so no device writes `1 << n` by hand.

/// The mask of feature bit `bit` (a `VIRTIO_F_*`, `VIRTIO_RING_F_*` or device `*_F_*` constant).
///
/// Bits past 63 give an empty mask rather than overflowing.
#[must_use]
pub const fn feature_mask(bit: u32) -> u64 {
    match 1u64.checked_shl(bit) {
        Some(mask) => mask,
        None => 0,
    }
}

/// The mask of all the listed feature bits.
#[must_use]
pub const fn features_mask(bits: &[u32]) -> u64 {
    let mut mask = 0;
    let mut i = 0;
    while i < bits.len() {
        mask |= feature_mask(bits[i]);
        i += 1;
    }
    mask
}

/// Whether `features` has feature bit `bit` set.
#[must_use]
pub const fn has_feature(features: u64, bit: u32) -> bool {
    features & feature_mask(bit) != 0
}

/// The features a driver may keep: what it acked, limited to what the device offered.
#[must_use]
pub const fn negotiate(offered: u64, acked: u64) -> u64 {
    offered & acked
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

    #[test]
    fn masks() {
        assert_eq!(feature_mask(0), 1);
        assert_eq!(feature_mask(64), 0);
        let m = features_mask(&[VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX]);
        assert!(has_feature(m, VIRTIO_F_VERSION_1));
        assert!(has_feature(m, VIRTIO_RING_F_EVENT_IDX));
        assert!(!has_feature(m, 0));
        assert_eq!(negotiate(m, u64::MAX), m);
        assert_eq!(negotiate(m, 0), 0);
    }
}
