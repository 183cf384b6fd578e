//! Devices, their names and ownership.
//!
//! A device has one owner at a time. Today the only door is vhost-user: a
//! second frontend connecting while one is attached is refused and the
//! first is left undisturbed. Every exclusivity rule is one named function
//! here; handlers ask the registry, they never test flags themselves.

use std::sync::{Arc, Mutex, MutexGuard};

use vcdev_device_model::blk::BlkDevice;

/// Errors of ownership.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The device already has an owner.
    #[error("Device {name} is busy: owned by {owner}")]
    Busy {
        /// The device.
        name: String,
        /// Who owns it.
        owner: String,
    },
}

impl RegistryError {
    /// The errno for this error.
    pub fn errno(&self) -> vcdev_iommu::Errno {
        vcdev_iommu::Errno(libc::EBUSY)
    }
}

/// One device.
#[derive(Debug)]
pub struct Device {
    name: String,
    blk: Arc<BlkDevice>,
    owner: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Device {
    /// The device's name (`vfio0`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The virtio-blk model.
    pub fn blk(&self) -> &Arc<BlkDevice> {
        &self.blk
    }

    /// Who owns the device now, if anyone.
    pub fn owner(&self) -> Option<String> {
        lock(&self.owner).clone()
    }
}

/// Proof of ownership of a device; ownership ends when it is dropped.
#[derive(Debug)]
pub struct Ownership {
    device: Arc<Device>,
}

impl Ownership {
    /// The owned device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        *lock(&self.device.owner) = None;
    }
}

/// All devices of the daemon.
#[derive(Debug, Default)]
pub struct Registry {
    devices: Vec<Arc<Device>>,
}

impl Registry {
    /// Adds a device (names are checked unique by the configuration).
    pub fn add(&mut self, name: String, blk: Arc<BlkDevice>) -> Arc<Device> {
        let d = Arc::new(Device {
            name,
            blk,
            owner: Mutex::new(None),
        });
        self.devices.push(d.clone());
        d
    }

    /// Every device, in configuration order.
    pub fn devices(&self) -> &[Arc<Device>] {
        &self.devices
    }

    /// The rule of the vhost-user door: a frontend may attach only to a
    /// device nobody owns; `who` names it in logs and errors.
    pub fn claim_vhost_user(device: &Arc<Device>, who: &str) -> Result<Ownership, RegistryError> {
        let mut owner = lock(&device.owner);
        if let Some(o) = owner.as_ref() {
            return Err(RegistryError::Busy {
                name: device.name.clone(),
                owner: o.clone(),
            });
        }
        *owner = Some(who.to_owned());
        Ok(Ownership {
            device: device.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcdev_device_model::blk::{BlkConfig, RamBackend};

    #[test]
    fn second_owner_is_refused_until_the_first_leaves() {
        let blk = BlkDevice::new(
            Arc::new(RamBackend::new(1 << 20).unwrap()),
            BlkConfig::default(),
        )
        .unwrap();
        let mut r = Registry::default();
        let d = r.add("vfio0".into(), Arc::new(blk));
        let first = Registry::claim_vhost_user(&d, "a").unwrap();
        let e = Registry::claim_vhost_user(&d, "b").unwrap_err();
        assert_eq!(e.errno(), vcdev_iommu::Errno(libc::EBUSY));
        assert_eq!(d.owner().as_deref(), Some("a"));
        drop(first);
        assert!(Registry::claim_vhost_user(&d, "b").is_ok());
    }
}
