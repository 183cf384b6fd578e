//! Nodes and the `VCDEV_OPEN` handshake: opening a node makes a file of
//! its kind, which [`super::files`] hands out and serves (see the module
//! doc of [`crate::cdev`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use log::{debug, error, info};
use vcdev_iommu::{Errno, SealPolicy};

use super::device::CdevDevice;
use super::device_file::DeviceFile;
use super::files::Files;
#[cfg(feature = "group")]
use super::group::GroupFile;
use super::iommufd_file::IommufdFile;
use super::vfio_uapi::VCDEV_OPEN;
use crate::registry::{Device, Registry};
use crate::wire::{self, FrameHeader, FLAG_REPLY};

/// Errors of adding a device to the door.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A device's IOMMU view or PCI function is invalid.
    #[error("Device {name}: cannot build its cdev function")]
    Device {
        /// The device.
        name: String,
        /// The cause.
        #[source]
        source: super::device::DeviceError,
    },
}

/// The door: devices, the table of handed-out files, options. Devices
/// come and go with the registry's ([`Server::add_device`],
/// [`Server::remove_device`]); the daemon ([`crate::daemon`]) owns the
/// nodes and hands each accepted client to [`Server::handshake`].
#[derive(Debug)]
pub struct Server {
    registry: Arc<Registry>,
    devices: RwLock<Vec<Arc<CdevDevice>>>,
    files: Arc<Files>,
    seal_policy: SealPolicy,
}

impl Server {
    /// Serves the door's files through the daemon's event loop
    /// ([`Files::set_event_loop`]).
    pub fn set_event_loop(
        &self,
        endpoint: event_manager::RemoteEndpoint<crate::daemon::Subscriber>,
    ) {
        self.files.set_event_loop(endpoint);
    }

    /// A door over the devices of `registry`.
    pub fn new(
        registry: Arc<Registry>,
        seal_policy: SealPolicy,
    ) -> Result<Arc<Server>, ServerError> {
        let server = Arc::new(Server {
            registry: registry.clone(),
            devices: RwLock::new(Vec::new()),
            files: Files::new(),
            seal_policy,
        });
        for d in registry.devices() {
            server.add_device(&d)?;
        }
        Ok(server)
    }

    /// Builds the cdev function of registry device `reg`.
    pub fn add_device(&self, reg: &Arc<Device>) -> Result<Arc<CdevDevice>, ServerError> {
        let d = CdevDevice::new(reg.clone()).map_err(|source| ServerError::Device {
            name: reg.name().to_owned(),
            source,
        })?;
        self.devices
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(d.clone());
        Ok(d)
    }

    /// Forgets device `name` (its files keep their handle, revoked or
    /// released by whoever removes it).
    pub fn remove_device(&self, name: &str) -> Option<Arc<CdevDevice>> {
        let mut v = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        let i = v.iter().position(|d| d.name() == name)?;
        Some(v.remove(i))
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The devices as the door drives them.
    pub fn devices(&self) -> Vec<Arc<CdevDevice>> {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The device named `name`.
    pub fn device(&self, name: &str) -> Option<Arc<CdevDevice>> {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|d| d.name() == name)
            .cloned()
    }

    /// What memory mapped for DMA must satisfy.
    pub fn seal_policy(&self) -> SealPolicy {
        self.seal_policy
    }

    /// The handed-out files.
    pub fn files(&self) -> &Arc<Files> {
        &self.files
    }

    /// Opens node `node` for a client (the file to hand out), or the errno
    /// of the refusal.
    fn open(self: &Arc<Self>, node: &Node, wait: bool) -> Result<OwnedFd, Errno> {
        #[cfg(not(feature = "group"))]
        let _ = wait;
        let io = |e: io::Error| {
            error!("cannot hand out a file: {e}");
            Errno::from_io(&e)
        };
        let files = &self.files;
        match node {
            Node::Iommu => {
                let f = IommufdFile::new(files, self.seal_policy);
                files.hand_out(f).map_err(io)
            }
            Node::Device(dev) => {
                if dev.revoked() {
                    return Err(Errno::ENODEV);
                }
                files
                    .hand_out(DeviceFile::new_cdev(files, dev.clone()))
                    .map_err(io)
            }
            #[cfg(feature = "group")]
            Node::Container => {
                let f = super::container::open(files, self.seal_policy);
                files.hand_out(f).map_err(io)
            }
            #[cfg(feature = "group")]
            Node::Group(g) => {
                let f = self.open_group(*g, wait)?;
                files.hand_out(f).map_err(io)
            }
        }
    }

    /// Opens group `group` ([`Registry::open_group`]: EBUSY while it is
    /// open or one of its devices has another owner), with its devices;
    /// `wait`: while an owner is leaving ([`Registry::open_group_waiting`]).
    #[cfg(feature = "group")]
    pub fn open_group(&self, group: u32, wait: bool) -> Result<Arc<GroupFile>, Errno> {
        let own = if wait {
            self.registry.open_group_waiting(group)
        } else {
            self.registry.open_group(group)
        }
        .map_err(|e| e.errno())?;
        let devices = self
            .devices()
            .into_iter()
            .filter(|d| d.reg().group() == group)
            .collect();
        Ok(GroupFile::new(&self.files, group, own, devices))
    }

    /// The `VCDEV_OPEN` handshake with a client that connected to `node`
    /// (`path` names it in logs): the file, or `refused` (the access
    /// rules), or the errno of the open. Never blocks: the socket is
    /// fresh, its buffer empty, and it is made non-blocking; a group open
    /// refused with EBUSY is tried again on a thread of its own while what
    /// holds the group may be going away ([`Registry::open_group_waiting`]).
    pub fn handshake(self: &Arc<Self>, conn: UnixStream, node: &Node, path: &Path, refused: bool) {
        let _ = conn.set_nonblocking(true);
        let opened = if refused {
            Err(Errno(libc::EACCES))
        } else {
            self.open(node, false)
        };
        #[cfg(feature = "group")]
        if matches!((&opened, node), (Err(Errno::EBUSY), Node::Group(_))) {
            let (server, node, owned) = (self.clone(), node.clone(), path.to_owned());
            let spawned = std::thread::Builder::new()
                .name("cdev-open".into())
                .spawn(move || {
                    let opened = server.open(&node, true);
                    reply_open(&conn, opened, &owned);
                });
            if let Err(e) = spawned {
                error!("{}: cannot spawn a thread: {e}", path.display());
            }
            return;
        }
        reply_open(&conn, opened, path);
    }
}

/// Answers VCDEV_OPEN with the file `opened`, or its errno.
fn reply_open(conn: &UnixStream, opened: Result<OwnedFd, Errno>, path: &Path) {
    let (result, fd) = match opened {
        Ok(fd) => (0i32, Some(fd)),
        Err(e) => {
            info!("{}: open refused: {e}", path.display());
            (e.to_result(), None)
        }
    };
    let raw: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    let hdr = FrameHeader::request(VCDEV_OPEN, FLAG_REPLY, 4);
    if let Err(e) = wire::write_frame(conn, &hdr, &result.to_le_bytes(), &raw) {
        debug!("{}: handshake failed: {e}", path.display());
    }
    // Our copy of the client's end goes now: the file lives in the
    // client's copies only.
    drop(fd);
}

/// A node and what opening it gives.
#[derive(Clone, Debug)]
pub enum Node {
    /// `DIR/iommu`.
    Iommu,
    /// `DIR/devices/NAME`.
    Device(Arc<CdevDevice>),
    /// `DIR/vfio/vfio`.
    #[cfg(feature = "group")]
    Container,
    /// `DIR/vfio/N`.
    #[cfg(feature = "group")]
    Group(u32),
}
