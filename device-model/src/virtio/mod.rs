//! Device-independent virtio pieces: feature bits and config-space access.

pub mod config;
pub mod features;
