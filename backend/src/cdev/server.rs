//! Nodes, the `VCDEV_OPEN` handshake, the table of handed-out files and
//! the per-file request loop (see the module doc of [`crate::cdev`]).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use log::{debug, error, info, warn};
use vcdev_iommu::{Errno, SealPolicy};

use super::device::CdevDevice;
use super::device_file::DeviceFile;
use super::dispatch::{dispatch, reply_payload, Op, Out};
#[cfg(feature = "group")]
use super::group::GroupFile;
use super::iommufd_file::{IommufdFile, IommufdKind};
use super::vfio_uapi::VCDEV_OPEN;
use crate::registry::Registry;
use crate::socket::{create_dir, listen, remove_all, SocketError};
use crate::wire::{self, FlagPolicy, FrameHeader, FLAG_REPLY, MAX_PAYLOAD};

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

/// What kind of file a recognised descriptor is.
#[derive(Clone, Debug)]
pub enum Known {
    /// An iommufd or container file.
    Iommufd(Weak<IommufdFile>),
    /// A device file.
    Device(Weak<DeviceFile>),
    /// A group file.
    #[cfg(feature = "group")]
    Group(Weak<GroupFile>),
}

/// A kind of file: its request table, its gate and its release.
pub trait FileKind: Send + Sync + Sized + 'static {
    /// Its requests.
    fn ops(&self) -> &'static [Op<Self>];
    /// An errno for `code` before anything else (a device file before
    /// BIND), or `None`.
    fn gate(&self, _code: u32) -> Option<Errno> {
        None
    }
    /// The kernel's release: the last copy of the file was closed.
    fn release(&self);
    /// Names the file in logs.
    fn describe(&self) -> String;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The door: devices, the table of handed-out files, options.
#[derive(Debug)]
pub struct Server {
    registry: Arc<Registry>,
    devices: Vec<Arc<CdevDevice>>,
    files: Mutex<HashMap<(u64, u64), Known>>,
    seal_policy: SealPolicy,
    seq: AtomicU64,
}

/// The `(st_dev, st_ino)` of a descriptor.
fn inode_key(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: `stat` is plain data; fstat fills it for a descriptor we
    // borrow for the call.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
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
            files: Mutex::new(HashMap::new()),
            seal_policy,
            seq: AtomicU64::new(0),
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

    /// A sequence number for naming files in logs.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Recognises a descriptor the server handed out (PROTOCOL.md,
    /// "Opening a node gives a file"): EBADFD for any other.
    pub fn lookup(&self, fd: &OwnedFd) -> Result<Known, Errno> {
        let key = inode_key(fd.as_fd()).map_err(|_| Errno::EBADFD)?;
        lock(&self.files).get(&key).cloned().ok_or(Errno::EBADFD)
    }

    /// Hands `file` out: makes its socketpair, records the client's end,
    /// starts the thread serving ours. Returns the client's end.
    pub fn hand_out<F: FileKind>(
        self: &Arc<Self>,
        file: Arc<F>,
        known: fn(Weak<F>) -> Known,
    ) -> io::Result<OwnedFd> {
        let (ours, theirs) = UnixStream::pair()?;
        let key = inode_key(theirs.as_fd())?;
        lock(&self.files).insert(key, known(Arc::downgrade(&file)));
        let server = self.clone();
        let name = file.describe();
        let spawned = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                serve_file(&ours, file.as_ref());
                lock(&server.files).remove(&key);
                file.release();
                debug!("{}: released", file.describe());
            });
        if let Err(e) = spawned {
            lock(&self.files).remove(&key);
            return Err(e);
        }
        Ok(theirs.into())
    }

    /// Opens node `node` for a client (the file to hand out), or the errno
    /// of the refusal.
    fn open(self: &Arc<Self>, node: &Node) -> Result<OwnedFd, Errno> {
        let io = |e: io::Error| {
            error!("cannot hand out a file: {e}");
            Errno::from_io(&e)
        };
        match node {
            Node::Iommu => {
                let f = IommufdFile::new(self, IommufdKind::Iommufd);
                self.hand_out(f, Known::Iommufd).map_err(io)
            }
            Node::Device(i) => {
                let dev = self.devices.get(*i).ok_or(Errno::ENODEV)?;
                let f = DeviceFile::new_cdev(self, dev.clone());
                self.hand_out(f, Known::Device).map_err(io)
            }
            #[cfg(feature = "group")]
            Node::Container => {
                let f = IommufdFile::new(self, IommufdKind::Container);
                self.hand_out(f, Known::Iommufd).map_err(io)
            }
            #[cfg(feature = "group")]
            Node::Group(g) => {
                let f = GroupFile::open(self, *g)?;
                self.hand_out(f, Known::Group).map_err(io)
            }
        }
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

/// Serves one file until its last client copy closes or the client breaks
/// the protocol (PROTOCOL.md, "Framing"): then the socket is shut down.
fn serve_file<F: FileKind>(sock: &UnixStream, file: &F) {
    loop {
        let frame = match wire::read_frame(sock, FlagPolicy::CDEV) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                warn!("{}: protocol violation, file closed: {e}", file.describe());
                break;
            }
        };
        let code = frame.header.request;
        if frame.header.is_reply() {
            warn!(
                "{}: request {code:#x} flagged as a reply, file closed",
                file.describe()
            );
            break;
        }
        let out = match dispatch(file.ops(), file, code, frame.payload, frame.fds, |c| {
            file.gate(c)
        }) {
            Ok(o) => o,
            Err(v) => {
                warn!("{}: protocol violation, file closed: {v}", file.describe());
                break;
            }
        };
        let mut payload = reply_payload(&out);
        let mut fds = out.fds;
        if payload.len() > MAX_PAYLOAD as usize {
            // Never happens with the caps the handlers apply; keep the
            // framing promise anyway.
            payload = reply_payload(&Out::result(Errno::EINVAL.to_result()));
            fds.clear();
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        if let Err(e) = wire::write_frame(sock, &frame.header.reply(size), &payload, &raw) {
            debug!("{}: reply failed, file closed: {e}", file.describe());
            break;
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Both);
}
