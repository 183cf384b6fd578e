//! Nodes and the `VCDEV_OPEN` handshake: opening a node makes a file of
//! its kind, which [`super::files`] hands out and serves (see the module
//! doc of [`crate::cdev`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, error, info, warn};
use vcdev_iommu::{Errno, SealPolicy};

use super::device::CdevDevice;
use super::device_file::DeviceFile;
use super::files::Files;
#[cfg(feature = "group")]
use super::group::GroupFile;
use super::iommufd_file::IommufdFile;
use super::vfio_uapi::VCDEV_OPEN;
use crate::registry::Registry;
use crate::socket::{create_dir, listen, remove_all, SocketError};
use crate::wire::{self, FrameHeader, FLAG_REPLY};

/// Errors of setting the door up (they end the daemon).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A node or its directory could not be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// A device's IOMMU view or PCI function is invalid.
    #[error("Device {name}: cannot build its cdev function")]
    Device {
        /// The device.
        name: String,
        /// The cause.
        #[source]
        source: super::device::DeviceError,
    },
    /// A thread could not be started.
    #[error("Cannot start a thread")]
    Spawn(#[source] io::Error),
}

/// The door: devices, the table of handed-out files, options.
#[derive(Debug)]
pub struct Server {
    registry: Arc<Registry>,
    devices: Vec<Arc<CdevDevice>>,
    files: Arc<Files>,
    seal_policy: SealPolicy,
}

impl Server {
    /// A door over the devices of `registry`.
    pub fn new(
        registry: Arc<Registry>,
        seal_policy: SealPolicy,
    ) -> Result<Arc<Server>, ServerError> {
        let devices = registry
            .devices()
            .iter()
            .map(|d| {
                CdevDevice::new(d.clone()).map_err(|source| ServerError::Device {
                    name: d.name().to_owned(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Server {
            registry,
            devices,
            files: Files::new(),
            seal_policy,
        }))
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The devices as the door drives them.
    pub fn devices(&self) -> &[Arc<CdevDevice>] {
        &self.devices
    }

    /// The device named `name`.
    pub fn device(&self, name: &str) -> Option<&Arc<CdevDevice>> {
        self.devices.iter().find(|d| d.name() == name)
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
    fn open(self: &Arc<Self>, node: &Node) -> Result<OwnedFd, Errno> {
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
            Node::Device(i) => {
                let dev = self.devices.get(*i).ok_or(Errno::ENODEV)?;
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
                let f = self.open_group(*g)?;
                files.hand_out(f).map_err(io)
            }
        }
    }

    /// Opens group `group` ([`Registry::open_group`]: EBUSY while it is
    /// open or one of its devices has another owner), with its devices.
    #[cfg(feature = "group")]
    pub fn open_group(&self, group: u32) -> Result<Arc<GroupFile>, Errno> {
        let own = self.registry.open_group(group).map_err(|e| e.errno())?;
        let devices = self
            .devices
            .iter()
            .filter(|d| d.reg().group() == group)
            .cloned()
            .collect();
        Ok(GroupFile::new(&self.files, group, own, devices))
    }

    /// Creates every node under `dir` and starts their accept threads.
    /// Returns the node paths (removed at exit).
    pub fn serve(self: &Arc<Self>, dir: &Path) -> Result<Vec<PathBuf>, ServerError> {
        let mut nodes = vec![(dir.join("iommu"), Node::Iommu)];
        let devdir = dir.join("devices");
        create_dir(&devdir)?;
        for (i, d) in self.devices.iter().enumerate() {
            nodes.push((devdir.join(d.name()), Node::Device(i)));
        }
        #[cfg(feature = "group")]
        {
            let vfio = dir.join("vfio");
            create_dir(&vfio)?;
            nodes.push((vfio.join("vfio"), Node::Container));
            for g in self.registry.groups() {
                nodes.push((vfio.join(g.to_string()), Node::Group(g)));
            }
        }
        let mut paths = Vec::new();
        for (path, node) in nodes {
            // Mode 0600: only the daemon's user may open a node.
            let listener = match listen(&path, Some(0o600)) {
                Ok(l) => l,
                Err(e) => {
                    remove_all(&paths);
                    return Err(e.into());
                }
            };
            paths.push(path.clone());
            let server = self.clone();
            std::thread::Builder::new()
                .name("cdev-accept".into())
                .spawn(move || server.accept_loop(&listener, &node, &path))
                .map_err(ServerError::Spawn)?;
        }
        info!("cdev door: {} nodes under {}", paths.len(), dir.display());
        Ok(paths)
    }

    fn accept_loop(self: &Arc<Self>, listener: &UnixListener, node: &Node, path: &Path) {
        loop {
            let conn = match listener.accept() {
                Ok((c, _)) => c,
                Err(e) => {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        warn!("{}: accept failed: {e}", path.display());
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    continue;
                }
            };
            let (result, fd) = match self.open(node) {
                Ok(fd) => (0i32, Some(fd)),
                Err(e) => {
                    info!("{}: open refused: {e}", path.display());
                    (e.to_result(), None)
                }
            };
            let raw: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
            let hdr = FrameHeader::request(VCDEV_OPEN, FLAG_REPLY, 4);
            if let Err(e) = wire::write_frame(&conn, &hdr, &result.to_le_bytes(), &raw) {
                debug!("{}: handshake failed: {e}", path.display());
            }
            // Our copy of the client's end goes now: the file lives in the
            // client's copies only.
            drop(fd);
        }
    }
}

/// A node and what opening it gives.
#[derive(Clone, Copy, Debug)]
enum Node {
    Iommu,
    Device(usize),
    #[cfg(feature = "group")]
    Container,
    #[cfg(feature = "group")]
    Group(u32),
}
