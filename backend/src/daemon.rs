//! The daemon: its devices, its nodes, and its one event loop.
//!
//! # The event loop
//!
//! One thread runs rust-vmm's `event-manager`. Its subscribers are every
//! listening node (a `Listener`): each device's vhost-user socket
//! (`DIR/vhost-user/NAME`) and cdev node (`DIR/devices/NAME`), the group
//! nodes (`DIR/vfio/N`), `DIR/iommu`, `DIR/vfio/vfio` and the control
//! socket `DIR/control`. An idle device is two listeners on that loop: it
//! costs no thread. Devices are added and removed at run time from other
//! threads through the loop's remote endpoint.
//!
//! The rule of the loop: **nothing that can block runs on it.** A
//! subscriber accepts on a non-blocking listener until it would block,
//! checks the peer's credentials, and then either
//!
//! - answers at once with one small write on a fresh, non-blocking socket
//!   (the cdev `VCDEV_OPEN` handshake), or
//! - hands the connection to a thread of its own: a vhost-user frontend's
//!   connection thread, a cdev file's thread, a control request's thread.
//!
//! Everything that waits runs on those threads: a frontend waiting for its
//! predecessor's teardown, GET_VRING_BASE draining a queue, an INVALIDATE's
//! grace period, an IOTLB miss, a cdev file's unmap waiting for in-flight
//! requests, `ctl remove --force` quiescing a device. So a connected
//! frontend costs its queue workers (and their capped io_uring workers)
//! and one connection thread; an open cdev file one thread. Those threads
//! write with blocking sockets: a peer that stops reading stalls only its
//! own connection, never the loop or another device.
//!
//! When accepting fails for lack of descriptors (EMFILE, ENFILE), the
//! listener backs off for [`ACCEPT_BACKOFF`] instead of spinning.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, RemoteEndpoint, SubscriberId,
    SubscriberOps,
};
use log::{error, info, warn};
use vcdev_iommu::sync::lock;
use vcdev_iommu::Errno;
use vmm_sys_util::timerfd::TimerFd;

use vcdev_device_model::blk::throttle::Limits;

use crate::access::Access;
use crate::cdev::server::Node;
use crate::config::{ConfigError, DeviceSpec};
use crate::registry::{Device, IommuView, Registry, RegistryError};
use crate::socket::{self, SocketError};
use crate::state::{self, Origin, Planned, State, StateError};
use crate::vhost_user::conn::ConnConfig;

/// What the loop runs.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// A handle on the daemon's event loop, for parts that put descriptors on
/// it from other threads (a backend channel's acks).
#[derive(Clone)]
pub struct LoopHandle(pub RemoteEndpoint<Subscriber>);

impl std::fmt::Debug for LoopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoopHandle")
    }
}

/// How long a listener that ran out of descriptors waits before it accepts
/// again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How long `ctl remove --force` waits for a vhost-user frontend's
/// teardown (its queues drain, its disk is flushed).
pub const FORCE_REMOVE_WAIT: Duration = Duration::from_secs(10);

/// Errors of a change to the daemon's devices (`vcdev ctl add`, `remove`,
/// and the devices built at start-up).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A SPEC or argument is invalid.
    #[error(transparent)]
    Usage(#[from] ConfigError),
    /// A device of that name exists.
    #[error("device {0:?} exists")]
    Exists(String),
    /// No device of that name.
    #[error("no device {0:?}")]
    NoDevice(String),
    /// The device model could not be built (its image, its engine).
    #[error(transparent)]
    Build(Box<crate::Error>),
    /// A node could not be set up.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The cdev function could not be built.
    #[error(transparent)]
    Cdev(#[from] crate::cdev::server::ServerError),
    /// The device is held (and `--force` was not given).
    #[error(transparent)]
    Busy(#[from] RegistryError),
    /// A forced removal's holder did not let go in time.
    #[error("device {name}: its frontend did not let go within {secs} s")]
    NotReleased {
        /// The device.
        name: String,
        /// How long it waited.
        secs: u64,
    },
    /// The event loop is gone or refused the change.
    #[error("event loop: {0}")]
    Loop(String),
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] StateError),
}

impl OpError {
    /// The errno `vcdev ctl --json` reports.
    pub fn errno(&self) -> Errno {
        match self {
            OpError::Usage(_) => Errno::EINVAL,
            OpError::Exists(_) => Errno::EEXIST,
            OpError::NoDevice(_) => Errno::ENOENT,
            OpError::Busy(e) => e.errno(),
            OpError::NotReleased { .. } => Errno(libc::ETIMEDOUT),
            OpError::Socket(SocketError::InUse(_)) => Errno(libc::EADDRINUSE),
            OpError::Build(e) => e.errno(),
            OpError::Socket(_) | OpError::Cdev(_) | OpError::Loop(_) | OpError::State(_) => {
                Errno::EIO
            }
        }
    }

    /// True for a usage error (`vcdev ctl` exits 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, OpError::Usage(_))
    }
}

/// A listening node on the loop: accepts until the listener would block,
/// hands each connection to `on_accept`, backs off when out of
/// descriptors.
struct Listener {
    listener: UnixListener,
    what: String,
    backoff: Option<TimerFd>,
    on_accept: Box<dyn FnMut(UnixStream) + Send>,
}

impl Listener {
    fn new(
        listener: UnixListener,
        what: String,
        on_accept: Box<dyn FnMut(UnixStream) + Send>,
    ) -> io::Result<Listener> {
        listener.set_nonblocking(true)?;
        Ok(Listener {
            listener,
            what,
            backoff: None,
            on_accept,
        })
    }

    fn back_off(&mut self, ops: &mut EventOps) {
        if self.backoff.is_none() {
            self.backoff = TimerFd::new().ok();
        }
        let Some(t) = self.backoff.as_mut() else {
            return;
        };
        if t.reset(ACCEPT_BACKOFF, None).is_err() {
            return;
        }
        let _ = ops.remove(Events::new(&self.listener, EventSet::IN));
        let _ = ops.add(Events::new(t, EventSet::IN));
    }
}

impl MutEventSubscriber for Listener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            error!("{}: cannot watch the listener: {e}", self.what);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if let Some(t) = self
            .backoff
            .as_mut()
            .filter(|t| t.as_raw_fd() == events.fd())
        {
            let _ = t.clear();
            let _ = ops.remove(Events::new(t, EventSet::IN));
            let _ = ops.add(Events::new(&self.listener, EventSet::IN));
        }
        loop {
            match self.listener.accept() {
                Ok((s, _)) => (self.on_accept)(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    let out_of_fds = matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    );
                    warn!(
                        "{}: accept failed: {e}{}",
                        self.what,
                        if out_of_fds { "; backing off" } else { "" }
                    );
                    self.back_off(ops);
                    break;
                }
            }
        }
    }
}

/// A node the daemon made: its path and its subscriber on the loop.
#[derive(Debug)]
struct NodeEntry {
    path: PathBuf,
    id: SubscriberId,
}

/// A device as the daemon keeps it.
#[derive(Debug)]
struct DeviceEntry {
    planned: Planned,
    vhost_user: NodeEntry,
    cdev: NodeEntry,
}

#[derive(Debug, Default)]
struct Nodes {
    devices: BTreeMap<String, DeviceEntry>,
    /// Group nodes, with how many devices each has.
    groups: BTreeMap<u32, (NodeEntry, usize)>,
    fixed: Vec<NodeEntry>,
    state: State,
}

/// What adding a device made.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Added {
    /// The device's name.
    pub name: String,
    /// Its vhost-user socket.
    pub vhost_user_socket: PathBuf,
    /// Its cdev node.
    pub cdev_node: PathBuf,
    /// The QEMU options that attach it.
    pub qemu: String,
}

/// The daemon.
pub struct Daemon {
    dir: PathBuf,
    registry: Arc<Registry>,
    cdev: Arc<crate::cdev::Server>,
    conn_cfg: ConnConfig,
    access: Access,
    endpoint: RemoteEndpoint<Subscriber>,
    stop: Arc<AtomicBool>,
    nodes: Mutex<Nodes>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// A daemon in `dir` with no devices yet, and its event loop (to run
    /// with [`Daemon::run_loop`] on a thread of its own).
    pub fn new(
        dir: &Path,
        mut conn_cfg: ConnConfig,
        access: Access,
        seal_policy: vcdev_iommu::SealPolicy,
        state: State,
    ) -> Result<(Arc<Daemon>, EventManager<Subscriber>), OpError> {
        access.node_dir(dir, false)?;
        access.node_dir(&dir.join("vhost-user"), true)?;
        access.node_dir(&dir.join("devices"), true)?;
        #[cfg(feature = "group")]
        access.node_dir(&dir.join("vfio"), true)?;
        let em = EventManager::<Subscriber>::new().map_err(|e| OpError::Loop(e.to_string()))?;
        let registry = Arc::new(Registry::default());
        let cdev = crate::cdev::Server::new(registry.clone(), seal_policy)?;
        cdev.set_event_loop(em.remote_endpoint());
        conn_cfg.event_loop = Some(LoopHandle(em.remote_endpoint()));
        let daemon = Arc::new(Daemon {
            dir: dir.to_owned(),
            registry,
            cdev,
            conn_cfg,
            access,
            endpoint: em.remote_endpoint(),
            stop: Arc::new(AtomicBool::new(false)),
            nodes: Mutex::new(Nodes {
                state,
                ..Nodes::default()
            }),
        });
        Ok((daemon, em))
    }

    /// Runs the loop until [`Daemon::stop_loop`].
    pub fn run_loop(stop: Arc<AtomicBool>, mut em: EventManager<Subscriber>) {
        while !stop.load(Ordering::SeqCst) {
            if let Err(e) = em.run() {
                error!("event loop: {e}");
                std::thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }

    /// The flag that stops the loop.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Stops the loop (it returns after its current round).
    pub fn stop_loop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.endpoint.kick();
    }

    /// The runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The cdev door.
    pub fn cdev(&self) -> &Arc<crate::cdev::Server> {
        &self.cdev
    }

    /// Where device `name` comes from and its SPEC, if it exists.
    pub fn planned(&self, name: &str) -> Option<Planned> {
        lock(&self.nodes)
            .devices
            .get(name)
            .map(|d| d.planned.clone())
    }

    fn subscribe(&self, s: Subscriber) -> Result<SubscriberId, OpError> {
        self.endpoint
            .call_blocking(
                move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
                    Ok::<_, event_manager::Error>(ops.add_subscriber(s))
                },
            )
            .map_err(|e| OpError::Loop(e.to_string()))
    }

    fn unsubscribe(&self, node: &NodeEntry) {
        let id = node.id;
        let r = self.endpoint.call_blocking(
            move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
                ops.remove_subscriber(id).map(drop)
            },
        );
        if let Err(e) = r {
            warn!("{}: cannot leave the event loop: {e}", node.path.display());
        }
        let _ = std::fs::remove_file(&node.path);
    }

    /// Binds `path` with the access rules and puts it on the loop.
    fn listen(
        &self,
        path: PathBuf,
        mode: Option<u32>,
        on_accept: Box<dyn FnMut(UnixStream) + Send>,
    ) -> Result<NodeEntry, OpError> {
        let l = match mode {
            Some(m) => socket::listen(&path, Some(m), None)?,
            None => self.access.listen(&path)?,
        };
        let bind = |source| SocketError::Bind {
            path: path.clone(),
            source,
        };
        let listener = Listener::new(l, path.display().to_string(), on_accept).map_err(bind)?;
        match self.subscribe(Box::new(listener)) {
            Ok(id) => Ok(NodeEntry { path, id }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    fn cdev_node(&self, path: PathBuf, node: Node) -> Result<NodeEntry, OpError> {
        let server = self.cdev.clone();
        let access = self.access.clone();
        let what = path.display().to_string();
        let p = path.clone();
        self.listen(
            path,
            None,
            Box::new(move |sock| {
                let refused = access.admit(&sock, &what).is_err();
                server.handshake(sock, &node, &p, refused);
            }),
        )
    }

    /// Creates the cdev nodes every daemon has: `DIR/iommu` and
    /// `DIR/vfio/vfio` (feature `group`).
    pub fn open_fixed_nodes(&self) -> Result<(), OpError> {
        let iommu = self.cdev_node(self.dir.join("iommu"), Node::Iommu)?;
        lock(&self.nodes).fixed.push(iommu);
        #[cfg(feature = "group")]
        {
            let container = self.cdev_node(self.dir.join("vfio").join("vfio"), Node::Container)?;
            lock(&self.nodes).fixed.push(container);
        }
        Ok(())
    }

    /// Creates the control socket, `DIR/control`: last, so that a client
    /// that waits for it finds every other node made.
    pub fn open_control(self: &Arc<Self>) -> Result<(), OpError> {
        let daemon = Arc::downgrade(self);
        let ctl = self.listen(
            self.dir.join(crate::ctl::CONTROL_SOCKET),
            Some(0o600),
            Box::new(move |sock| {
                if crate::access::admit_control(&sock).is_err() {
                    return;
                }
                let Some(d) = daemon.upgrade() else { return };
                let spawned = std::thread::Builder::new()
                    .name("ctl".into())
                    .spawn(move || crate::ctl::serve_one(&sock, &d));
                if let Err(e) = spawned {
                    error!("control socket: cannot spawn a thread: {e}");
                }
            }),
        );
        lock(&self.nodes).fixed.push(ctl?);
        Ok(())
    }

    /// Adds a device: builds its model, registers it, makes its nodes; a
    /// failure leaves nothing behind. A device added with `ctl add` is
    /// written to the state file.
    pub fn add(&self, planned: Planned) -> Result<Added, OpError> {
        let mut nodes = lock(&self.nodes);
        let spec = planned.spec.clone();
        let name = spec.name.clone();
        if nodes.devices.contains_key(&name) {
            return Err(OpError::Exists(name));
        }
        let blk = crate::build_device(&spec).map_err(|e| OpError::Build(Box::new(e)))?;
        let view = IommuView {
            aperture: spec.iova_aperture,
            reserved: spec.iova_reserved.clone(),
            group: spec.group,
        };
        let dev = self
            .registry
            .add_with_view(name.clone(), Arc::new(blk), view);
        dev.set_poll_us(spec.poll_us);
        let undo_registry = || {
            let _ = self.registry.remove(&name, true);
            self.cdev.remove_device(&name);
        };
        let made = self.make_nodes(&mut nodes, &dev, &spec);
        let (vhost_user, cdev) = match made {
            Ok(n) => n,
            Err(e) => {
                undo_registry();
                return Err(e);
            }
        };
        let added = Added {
            name: name.clone(),
            vhost_user_socket: vhost_user.path.clone(),
            cdev_node: cdev.path.clone(),
            qemu: crate::qemu_options(&spec, &vhost_user.path),
        };
        if planned.origin == Origin::Added {
            let mut st = nodes.state.clone();
            st.added
                .retain(|s| state::spec_name(s).as_deref() != Some(&name));
            st.added.push(planned.source.clone());
            if let Err(e) = st.save(&self.dir) {
                self.drop_nodes(&mut nodes, &dev, vhost_user, cdev);
                undo_registry();
                return Err(e.into());
            }
            nodes.state = st;
        }
        info!(
            "{name}: virtio-blk, {}, {} queue(s) of {}, aio={}{}, listening on {}",
            crate::describe(&spec),
            spec.queues,
            spec.queue_size,
            dev.blk().aio(),
            if spec.read_only { ", read-only" } else { "" },
            vhost_user.path.display()
        );
        nodes.devices.insert(
            name,
            DeviceEntry {
                planned,
                vhost_user,
                cdev,
            },
        );
        Ok(added)
    }

    /// The vhost-user socket, cdev node and (a new group's) group node of
    /// `dev`, on the loop; on failure, none of them.
    fn make_nodes(
        &self,
        nodes: &mut Nodes,
        dev: &Arc<Device>,
        spec: &DeviceSpec,
    ) -> Result<(NodeEntry, NodeEntry), OpError> {
        let cdev_dev = self.cdev.add_device(dev)?;
        let vu_path = self.dir.join("vhost-user").join(&spec.name);
        let vu = {
            let dev = dev.clone();
            let cfg = self.conn_cfg.clone();
            let access = self.access.clone();
            let what = vu_path.display().to_string();
            let mut n = 0u64;
            self.listen(
                vu_path,
                None,
                Box::new(move |sock| {
                    let Ok(peer) = access.admit(&sock, &what) else {
                        return;
                    };
                    crate::vhost_user::accept(sock, &dev, cfg.clone(), n, peer);
                    n += 1;
                }),
            )?
        };
        let cdev_path = self.dir.join("devices").join(&spec.name);
        let cdev = match self.cdev_node(cdev_path, Node::Device(cdev_dev)) {
            Ok(c) => c,
            Err(e) => {
                self.unsubscribe(&vu);
                return Err(e);
            }
        };
        #[cfg(feature = "group")]
        {
            let g = dev.group();
            if let Some((_, count)) = nodes.groups.get_mut(&g) {
                *count += 1;
            } else {
                let path = self.dir.join("vfio").join(g.to_string());
                match self.cdev_node(path, Node::Group(g)) {
                    Ok(n) => {
                        nodes.groups.insert(g, (n, 1));
                    }
                    Err(e) => {
                        self.unsubscribe(&vu);
                        self.unsubscribe(&cdev);
                        return Err(e);
                    }
                }
            }
        }
        #[cfg(not(feature = "group"))]
        let _ = nodes;
        Ok((vu, cdev))
    }

    fn drop_nodes(&self, nodes: &mut Nodes, dev: &Device, vu: NodeEntry, cdev: NodeEntry) {
        self.unsubscribe(&vu);
        self.unsubscribe(&cdev);
        let g = dev.group();
        if let Some((_, count)) = nodes.groups.get_mut(&g) {
            *count -= 1;
            if *count == 0 {
                if let Some((n, _)) = nodes.groups.remove(&g) {
                    self.unsubscribe(&n);
                }
            }
        }
    }

    /// Removes device `name`. While a vhost-user frontend or a cdev file
    /// holds it, it is refused, naming the holder; with `force`, a
    /// frontend is disconnected after its queues are quiesced and its disk
    /// flushed, and a cdev file gets its REQ irq, is quiesced, and answers
    /// ENODEV from then on. Returns who was disconnected.
    pub fn remove(&self, name: &str, force: bool) -> Result<Option<String>, OpError> {
        let mut nodes = lock(&self.nodes);
        if !nodes.devices.contains_key(name) {
            return Err(OpError::NoDevice(name.into()));
        }
        let dev = self
            .registry
            .get(name)
            .ok_or_else(|| OpError::NoDevice(name.into()))?;
        let holder = dev.owner();
        if !force {
            self.registry.remove(name, false)?;
        } else {
            if holder.is_some() {
                info!(
                    "{name}: --force: disconnecting {}",
                    holder.as_deref().unwrap_or("?")
                );
                dev.revoke_owner();
            }
            if let Some(c) = self.cdev.device(name) {
                // Files got through an open group file have no owner slot
                // of their own: revoke the device for them.
                if holder.is_none() && dev.owner_state().1.is_some() {
                    c.revoke();
                }
            }
            let cdev_owned = matches!(
                dev.owner_state().0,
                Some((crate::registry::OwnerKind::Cdev, _))
            );
            if !cdev_owned && !dev.wait_unowned(FORCE_REMOVE_WAIT) {
                return Err(OpError::NotReleased {
                    name: name.into(),
                    secs: FORCE_REMOVE_WAIT.as_secs(),
                });
            }
            self.registry.remove(name, true)?;
        }
        let mut st = nodes.state.clone();
        st.forget(name);
        if st != nodes.state {
            if let Err(e) = st.save(&self.dir) {
                // The device is gone from the registry already: keep its
                // nodes' removal going, and say the state file is stale.
                error!("{name}: removed, but the state file was not updated: {e}");
            }
            nodes.state = st;
        }
        if let Some(entry) = nodes.devices.remove(name) {
            self.drop_nodes(&mut nodes, &dev, entry.vhost_user, entry.cdev);
        }
        self.cdev.remove_device(name);
        dev.workers().stop_all(crate::SHUTDOWN_DRAIN);
        if let Err(e) = dev.blk().flush() {
            warn!("{name}: flush at removal failed: {e}");
        }
        info!("{name}: removed");
        Ok(holder)
    }

    /// `vcdev ctl set NAME iops=N bw=BYTES`: new I/O limits (0: none),
    /// live, kept in the state file; the other limit stays as it was.
    pub fn set_limits(&self, name: &str, options: &[String]) -> Result<Limits, OpError> {
        let mut nodes = lock(&self.nodes);
        let entry = nodes
            .devices
            .get(name)
            .ok_or_else(|| OpError::NoDevice(name.into()))?;
        for o in options {
            match o.split_once('=') {
                Some(("iops" | "bw", _)) => {}
                _ => return Err(ConfigError::NotLive(o.clone()).into()),
            }
        }
        let base = nodes.state.effective(name, &entry.planned.source);
        let spec = DeviceSpec::parse(&format!("{base},{}", options.join(",")), 0)?;
        let dev = self
            .registry
            .get(name)
            .ok_or_else(|| OpError::NoDevice(name.into()))?;
        let mut st = nodes.state.clone();
        for (k, v) in options.iter().filter_map(|o| o.split_once('=')) {
            st.record_change(name, k, v);
        }
        st.save(&self.dir)?;
        nodes.state = st;
        dev.blk().set_limits(spec.limits);
        if let Some(e) = nodes.devices.get_mut(name) {
            e.planned.spec.limits = spec.limits;
        }
        info!(
            "{name}: limits now iops={} bw={} (0: none)",
            spec.limits.iops, spec.limits.bw
        );
        Ok(spec.limits)
    }

    /// Records a run-time change of device `name` (`key=value` of SPEC) in
    /// the state file.
    pub fn record_change(&self, name: &str, key: &str, value: &str) -> Result<(), OpError> {
        let mut nodes = lock(&self.nodes);
        let mut st = nodes.state.clone();
        st.record_change(name, key, value);
        st.save(&self.dir)?;
        nodes.state = st;
        Ok(())
    }

    /// At exit: every node leaves the loop and the file system.
    pub fn close_nodes(&self) {
        let mut nodes = lock(&self.nodes);
        let all: Vec<PathBuf> = nodes
            .devices
            .values()
            .flat_map(|d| [d.vhost_user.path.clone(), d.cdev.path.clone()])
            .chain(nodes.groups.values().map(|(n, _)| n.path.clone()))
            .chain(nodes.fixed.iter().map(|n| n.path.clone()))
            .collect();
        nodes.devices.clear();
        nodes.groups.clear();
        nodes.fixed.clear();
        socket::remove_all(&all);
    }
}
