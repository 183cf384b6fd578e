//! Devices, their names and ownership.
//!
//! A device has one owner at a time: a vhost-user frontend, a device file
//! bound through its cdev, or (feature `group`) the open group file of its
//! IOMMU group. A second claimant is refused and the first is left
//! undisturbed. Every exclusivity rule of PROTOCOL.md ("Container and group
//! files") is one named function here: [`Registry::claim_vhost_user`],
//! [`Registry::claim_cdev_bind`], [`Registry::open_group`]. Handlers ask
//! the registry; they never test flags themselves.
//!
//! All ownership state of a registry sits behind one lock
//! ([`OwnerTable`]), so that a rule spanning a whole group (opening a group
//! file) is atomic against claims on its devices.
//!
//! # Waiting for an owner that is leaving
//!
//! An owner's teardown takes a moment after its client hung up (queues
//! drain, memory goes, the disk is flushed); the kernel's release, by
//! contrast, is done when `close` returns. So a claimant refused by an
//! owner whose peer has hung up ([`Holder::hung_up`]) waits for it, up to
//! [`PREDECESSOR_WAIT`], and one refused by an owner that looks connected
//! waits [`HANG_UP_GRACE`] for it to hang up
//! ([`Device::claim_waiting`], [`Registry::open_group_waiting`]). Only a
//! claimant that arrives while the owner really stays is refused.
//!
//! # Resize and the config notifier
//!
//! [`Device::resize`] (`vcdev ctl resize`) changes the device model's size,
//! then tells the driver through the door that drives the device now: its
//! [`ConfigNotifier`], registered with [`Ownership::set_config_notifier`]
//! (a vhost-user connection, a bound device file) or
//! [`Device::watch_config`] (a device file got through a group) and
//! unregistered when that owner goes. A notifier holds weak references
//! only: one taken just before its owner went finds nothing to tell.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use log::info;
use vcdev_device_model::blk::{BlkDevice, ResizeError};
use vcdev_iommu::sync::lock;
use vcdev_iommu::IovaRange;

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
    /// Another device file of the device is bound through its cdev
    /// (the kernel's `vfio_df_open`: `open_count != 0` is EINVAL).
    #[error("Device {name} is already bound by {owner}")]
    AlreadyBound {
        /// The device.
        name: String,
        /// Who bound it.
        owner: String,
    },
    /// The device has been removed (`vcdev ctl remove`), or never was.
    #[error("Device {name} does not exist (removed)")]
    Removed {
        /// The device.
        name: String,
    },
    /// The group file is open already, or one of its devices has an owner.
    #[error("IOMMU group {group} is busy: {why}")]
    GroupBusy {
        /// The group.
        group: u32,
        /// Who holds it.
        why: String,
    },
}

impl RegistryError {
    /// The errno for this error.
    pub fn errno(&self) -> vcdev_iommu::Errno {
        match self {
            RegistryError::Busy { .. } | RegistryError::GroupBusy { .. } => {
                vcdev_iommu::Errno::EBUSY
            }
            RegistryError::AlreadyBound { .. } => vcdev_iommu::Errno::EINVAL,
            RegistryError::Removed { .. } => vcdev_iommu::Errno::ENODEV,
        }
    }
}

/// Tells the driver of a device that its configuration changed (a
/// resize), through the door that drives it: a vhost-user
/// `CONFIG_CHANGE_MSG`, a config-change MSI-X. Returns whether a message
/// went out (false: nothing to tell it on, such as a frontend without the
/// backend channel, or a driver without a config vector). Runs on the
/// caller's thread (the control socket's) and must not block for long.
pub type ConfigNotifier = Arc<dyn Fn() -> bool + Send + Sync>;

/// The notifier slot of a device: the registration's number, and the
/// notifier.
type NotifierSlot = Mutex<Option<(u64, ConfigNotifier)>>;

/// A registered [`ConfigNotifier`]; dropping it unregisters it, unless a
/// newer registration replaced it already.
pub struct ConfigWatch {
    device: Arc<Device>,
    seq: u64,
}

impl std::fmt::Debug for ConfigWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatch")
            .field("device", &self.device.name)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        let mut slot = lock(&self.device.notifier);
        if slot.as_ref().is_some_and(|(seq, _)| *seq == self.seq) {
            *slot = None;
        }
    }
}

/// Which door owns a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerKind {
    /// A vhost-user frontend.
    VhostUser,
    /// A device file bound through the device's cdev.
    Cdev,
}

/// The connection or file that owns a device, as the registry sees it:
/// whether its peer has gone, and how to make it let go.
pub trait Holder: Send + Sync + std::fmt::Debug {
    /// True once the holder's peer has hung up: its teardown is under way
    /// and it will release the device soon, so a newcomer may wait for it
    /// instead of being refused. Waits at most `wait` for it.
    fn hung_up(&self, wait: Duration) -> bool;
    /// Asks the holder to let go (`vcdev ctl remove --force`). It returns
    /// once the device's queues are quiesced; the ownership itself ends
    /// when the holder's teardown drops it.
    fn revoke(&self);
}

/// A device's owner.
#[derive(Clone, Debug)]
struct Owner {
    kind: OwnerKind,
    who: String,
    holder: Option<Arc<dyn Holder>>,
}

/// The ownership state of every device of a registry, behind one lock.
#[derive(Debug, Default)]
pub struct OwnerTable {
    /// Per device index: its owner.
    owners: Vec<Option<Owner>>,
    /// Per device index: its IOMMU group.
    groups: Vec<u32>,
    /// Per device index: removed from the registry (claims are ENODEV).
    removed: Vec<bool>,
    /// Groups whose group file is open (with the claims of the device
    /// files got through it).
    open_groups: BTreeSet<u32>,
    /// Releases so far (ownerships and groups), for waiters.
    releases: u64,
}

/// The table and the condition its waiters sleep on (an owner leaving).
#[derive(Debug, Default)]
struct Table {
    state: Mutex<OwnerTable>,
    released: Condvar,
}

impl Table {
    /// How many releases happened so far.
    fn releases(&self) -> u64 {
        lock(&self.state).releases
    }

    /// Notes a release and wakes the waiters.
    fn release(&self, t: std::sync::MutexGuard<'_, OwnerTable>) {
        let mut t = t;
        t.releases = t.releases.wrapping_add(1);
        drop(t);
        self.released.notify_all();
    }

    /// Sleeps until a release after the `seen`-th, at most `d`.
    fn wait_release(&self, seen: u64, d: Duration) {
        let t = lock(&self.state);
        if t.releases == seen {
            let _ = self.released.wait_timeout(t, d);
        }
    }

    /// Retries `attempt` while what refuses it is going away: for up to
    /// [`PREDECESSOR_WAIT`] while `leaving()` (an owner whose peer hung up
    /// is being torn down), else for [`HANG_UP_GRACE`] (an owner that
    /// looks connected may be about to hang up: a client that closes and
    /// reconnects at once can arrive before its old socket is released,
    /// for example while another process holds a copy of it for a moment,
    /// between a fork and an exec). Other refusals return at once.
    fn retry<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, RegistryError>,
        leaving: impl Fn() -> bool,
    ) -> Result<T, RegistryError> {
        let start = Instant::now();
        loop {
            let seen = self.releases();
            let e = match attempt() {
                Ok(v) => return Ok(v),
                Err(e @ RegistryError::Removed { .. }) => return Err(e),
                Err(e) => e,
            };
            let limit = if leaving() {
                PREDECESSOR_WAIT
            } else {
                HANG_UP_GRACE
            };
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(e);
            }
            // A hang-up wakes nobody: look again every few milliseconds.
            self.wait_release(seen, left.min(Duration::from_millis(5)));
        }
    }
}

/// How long a claimant waits for an owner that has hung up to be torn
/// down.
pub const PREDECESSOR_WAIT: Duration = Duration::from_secs(5);

/// How long a claimant waits for an owner that looks connected to hang up
/// before it is refused.
pub const HANG_UP_GRACE: Duration = Duration::from_millis(50);

/// Live counters of a device, shown by `vcdev ctl stats` (issue #4's
/// vhost-user IOTLB traffic and the cdev door's requests). Plain relaxed
/// atomics: any door may bump them.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests served through the cdev door (device file messages).
    pub cdev_requests: AtomicU64,
    /// Queue batches processed by cdev queue workers.
    pub cdev_batches: AtomicU64,
    /// Segments translated by queue workers (both doors may add).
    pub translations: AtomicU64,
    /// Of those, served by the per-queue front cache.
    pub cache_hits: AtomicU64,
    /// vhost-user IOTLB UPDATE messages received.
    pub iotlb_updates: AtomicU64,
    /// vhost-user IOTLB INVALIDATE messages received.
    pub iotlb_invalidates: AtomicU64,
    /// vhost-user IOTLB misses sent to the frontend.
    pub iotlb_misses: AtomicU64,
    /// vhost-user faults that joined a miss already pending for their page.
    pub iotlb_misses_joined: AtomicU64,
    /// vhost-user misses acked without an UPDATE (request failed, IOERR).
    pub iotlb_misses_refused: AtomicU64,
    /// vhost-user misses unanswered before the timeout (request failed).
    pub iotlb_misses_timed_out: AtomicU64,
    /// Time INVALIDATEs took to take effect (the grace period, and the
    /// wait for in-flight requests they overlap), in nanoseconds.
    pub iotlb_invalidate_ns: AtomicU64,
    /// The longest of them, in nanoseconds.
    pub iotlb_invalidate_max_ns: AtomicU64,
    /// Whole-IOTLB drops (memory table change, device stop, disconnect).
    pub iotlb_flushes: AtomicU64,
    /// Ring translations redone (queue start, or after an invalidation).
    pub ring_pins: AtomicU64,
    /// Total time queues waited for IOTLB miss answers, in microseconds.
    pub iotlb_miss_wait_us: AtomicU64,
    /// Longest single wait for a miss answer, in microseconds.
    pub iotlb_miss_wait_max_us: AtomicU64,
    /// Polls of the main channel after an IOTLB message that saw the next
    /// message arrive (see `vhost_user::main_poll`).
    pub iotlb_poll_hits: AtomicU64,
    /// Polls that ran out of budget (the thread then slept).
    pub iotlb_poll_misses: AtomicU64,
    /// Time spent in those polls, in microseconds (their CPU cost, less
    /// what `sched_yield` gave to other threads).
    pub iotlb_poll_us: AtomicU64,
    /// cdev door: IOAS map and unmap requests on the address space the
    /// device is attached to (the software IOMMU counts them).
    pub ioas: Arc<vcdev_iommu::MapStats>,
}

impl DeviceCounters {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter with its name, for display.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("cdev_requests", g(&self.cdev_requests)),
            ("cdev_batches", g(&self.cdev_batches)),
            ("translations", g(&self.translations)),
            ("cache_hits", g(&self.cache_hits)),
            ("iotlb_updates", g(&self.iotlb_updates)),
            ("iotlb_invalidates", g(&self.iotlb_invalidates)),
            ("iotlb_misses", g(&self.iotlb_misses)),
            ("iotlb_misses_joined", g(&self.iotlb_misses_joined)),
            ("iotlb_misses_refused", g(&self.iotlb_misses_refused)),
            ("iotlb_misses_timed_out", g(&self.iotlb_misses_timed_out)),
            ("iotlb_invalidate_us", g(&self.iotlb_invalidate_ns) / 1000),
            (
                "iotlb_invalidate_max_us",
                g(&self.iotlb_invalidate_max_ns) / 1000,
            ),
            ("iotlb_flushes", g(&self.iotlb_flushes)),
            ("ring_pins", g(&self.ring_pins)),
            ("iotlb_miss_wait_us", g(&self.iotlb_miss_wait_us)),
            ("iotlb_miss_wait_max_us", g(&self.iotlb_miss_wait_max_us)),
            ("iotlb_poll_hits", g(&self.iotlb_poll_hits)),
            ("iotlb_poll_misses", g(&self.iotlb_poll_misses)),
            ("iotlb_poll_us", g(&self.iotlb_poll_us)),
            ("ioas_maps", g(&self.ioas.maps)),
            ("ioas_unmaps", g(&self.ioas.unmaps)),
            ("ioas_unmap_us", g(&self.ioas.unmap_ns) / 1000),
            ("ioas_unmap_max_us", g(&self.ioas.unmap_max_ns) / 1000),
        ]
    }
}

/// How the software IOMMU sees a device (the `--device` options
/// `iova-aperture`, `iova-reserved`, `group`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuView {
    /// The DMA aperture (default: the whole 64-bit space).
    pub aperture: IovaRange,
    /// Reserved IOVA ranges (default: none).
    pub reserved: Vec<IovaRange>,
    /// The IOMMU group (default: alone in its own group).
    pub group: Option<u32>,
}

impl Default for IommuView {
    fn default() -> Self {
        IommuView {
            aperture: IovaRange::new(0, u64::MAX),
            reserved: Vec::new(),
            group: None,
        }
    }
}

/// One device.
pub struct Device {
    name: String,
    blk: Arc<BlkDevice>,
    index: usize,
    group: u32,
    view: IommuView,
    table: Arc<Table>,
    counters: DeviceCounters,
    workers: crate::queue::WorkerSet,
    /// Claimants waiting for the device (a door bounds them).
    waiters: AtomicUsize,
    /// Who to tell of a config change (see the module doc).
    notifier: NotifierSlot,
    /// Numbers the notifier registrations.
    notifier_seq: AtomicU64,
    /// `poll-us=`: how long (us) its queue workers busy-poll after their
    /// last request (read when a worker starts).
    poll_us: AtomicU32,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("group", &self.group)
            .field("view", &self.view)
            .field("notifier", &lock(&self.notifier).as_ref().map(|(s, _)| *s))
            .finish_non_exhaustive()
    }
}

impl Device {
    /// `vcdev ctl resize NAME [SIZE] [--shrink]`: gives the disk `size`
    /// bytes, or without one the size its backing has now (a block device
    /// the operator grew); a smaller size only with `shrink`. Returns the
    /// new size in bytes. The rules and errnos are
    /// [`BlkDevice::resize`]'s ([`ResizeError::errno`]). When the size
    /// changed, the door driving the device tells its driver (see
    /// [`ConfigNotifier`]); a driver that comes later reads the new size.
    pub fn resize(&self, size: Option<u64>, shrink: bool) -> Result<u64, ResizeError> {
        let r = self.blk.resize(size, shrink)?;
        if r.changed() {
            info!("{}: resized from {} to {} bytes", self.name, r.from, r.to);
            self.notify_config_change();
        }
        Ok(r.to)
    }

    /// Tells the device's driver, through its current owner's notifier,
    /// that the configuration changed. Returns whether a message went out.
    pub fn notify_config_change(&self) -> bool {
        // Called outside the lock: the notifier takes its door's locks.
        let notifier = lock(&self.notifier).as_ref().map(|(_, n)| n.clone());
        let Some(notify) = notifier else {
            info!("{}: no driver to tell of the config change", self.name);
            return false;
        };
        let told = notify();
        if !told {
            // Not abnormal: a driver without a config vector, a frontend
            // without a backend channel; it reads the new size when it looks.
            info!("{}: the config change was not signalled", self.name);
        }
        told
    }

    /// Registers `notify` as the device's [`ConfigNotifier`], replacing
    /// any other, until the returned watch drops. For a door that drives
    /// the device without an [`Ownership`] of its own (a device file got
    /// through its group); owners use [`Ownership::set_config_notifier`].
    pub fn watch_config(self: &Arc<Self>, notify: ConfigNotifier) -> ConfigWatch {
        let seq = self.notifier_seq.fetch_add(1, Ordering::Relaxed);
        *lock(&self.notifier) = Some((seq, notify));
        ConfigWatch {
            device: self.clone(),
            seq,
        }
    }

    /// How many claimants wait for the device (counted by the door).
    pub fn waiters(&self) -> &AtomicUsize {
        &self.waiters
    }

    /// The queue workers running on this device, whatever the door.
    pub fn workers(&self) -> &crate::queue::WorkerSet {
        &self.workers
    }

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
        self.owner_state().0.map(|(_, who)| who)
    }

    /// The door that owns the device now, and who; or, when its group
    /// file is open, `None` and `Some(group)` in the second slot.
    pub fn owner_state(&self) -> (Option<(OwnerKind, String)>, Option<u32>) {
        let t = lock(&self.table.state);
        let own = t
            .owners
            .get(self.index)
            .cloned()
            .flatten()
            .map(|o| (o.kind, o.who));
        (
            own,
            t.open_groups.contains(&self.group).then_some(self.group),
        )
    }

    /// Its IOMMU group number (`DIR/vfio/N`).
    pub fn group(&self) -> u32 {
        self.group
    }

    /// Its IOMMU view (aperture, reserved ranges).
    pub fn iommu_view(&self) -> &IommuView {
        &self.view
    }

    /// How long its queue workers busy-poll their avail ring after their
    /// last request before they sleep (`poll-us=`; zero: they sleep at once).
    pub fn poll(&self) -> std::time::Duration {
        std::time::Duration::from_micros(u64::from(self.poll_us.load(Ordering::Relaxed)))
    }

    /// Sets [`Device::poll`] (in us) for the workers started from now on.
    pub fn set_poll_us(&self, us: u32) {
        self.poll_us.store(us, Ordering::Relaxed);
    }

    /// Its live counters.
    pub fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    /// True while the device has an owner whose peer has hung up: it is
    /// being torn down, and a newcomer should wait for it
    /// ([`Device::wait_unowned`]) rather than be refused.
    pub fn owner_leaving(&self) -> bool {
        // Asked outside the lock: a holder's probe is a syscall.
        self.holder().is_some_and(|h| h.hung_up(Duration::ZERO))
    }

    /// The owner's [`Holder`], if it has one.
    fn holder(&self) -> Option<Arc<dyn Holder>> {
        lock(&self.table.state)
            .owners
            .get(self.index)
            .cloned()
            .flatten()
            .and_then(|o| o.holder)
    }

    /// Waits until the device has no owner, at most `timeout`; true when
    /// it has none.
    pub fn wait_unowned(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut t = lock(&self.table.state);
        loop {
            if t.owners.get(self.index).is_none_or(Option::is_none) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            t = self
                .table
                .released
                .wait_timeout(t, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Claims the device with `attempt` (one of [`Registry`]'s claims),
    /// waiting while its owner is going away (see the module doc).
    pub fn claim_waiting(
        &self,
        attempt: impl FnMut() -> Result<Ownership, RegistryError>,
    ) -> Result<Ownership, RegistryError> {
        self.table.retry(attempt, || self.owner_leaving())
    }

    /// Asks the owner to let go (see [`Holder::revoke`]); false when the
    /// owner has no way to be asked (or there is none).
    pub fn revoke_owner(&self) -> bool {
        match self.holder() {
            Some(h) => {
                h.revoke();
                true
            }
            None => false,
        }
    }
}

/// Proof of ownership of a device; ownership ends when it is dropped.
#[derive(Debug)]
pub struct Ownership {
    device: Arc<Device>,
    /// The owner's config notifier, unregistered with the ownership.
    watch: Option<ConfigWatch>,
}

/// Proof that a group file is open; the group is released when it is
/// dropped (shared by the group file and the device files got through it,
/// as the kernel's group stays in use while they are open).
#[derive(Debug)]
pub struct GroupOwnership {
    group: u32,
    table: Arc<Table>,
}

impl GroupOwnership {
    /// The group.
    pub fn group(&self) -> u32 {
        self.group
    }
}

impl Drop for GroupOwnership {
    fn drop(&mut self) {
        let mut t = lock(&self.table.state);
        t.open_groups.remove(&self.group);
        self.table.release(t);
    }
}

impl Ownership {
    /// The owned device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Registers the owner's [`ConfigNotifier`] for as long as it owns
    /// the device (replacing one set before).
    pub fn set_config_notifier(&mut self, notify: ConfigNotifier) {
        self.watch = None;
        self.watch = Some(self.device.watch_config(notify));
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        let mut t = lock(&self.device.table.state);
        if let Some(o) = t.owners.get_mut(self.device.index) {
            *o = None;
        }
        self.device.table.release(t);
    }
}

/// All devices of the daemon. Devices come and go at run time
/// (`vcdev ctl add` / `remove`); a removed device stays valid for whoever
/// still holds it, but can no longer be claimed.
#[derive(Debug, Default)]
pub struct Registry {
    devices: RwLock<Vec<Arc<Device>>>,
    table: Arc<Table>,
}

/// The owner slot of `device` for a claim through its cdev or by a
/// vhost-user frontend. Both count as an open of the device's group
/// (PROTOCOL.md), so both are refused while its group file is open.
fn claimable_slot<'t>(
    t: &'t mut OwnerTable,
    device: &Device,
) -> Result<&'t mut Option<Owner>, RegistryError> {
    if t.removed.get(device.index).copied().unwrap_or(true) {
        return Err(RegistryError::Removed {
            name: device.name.clone(),
        });
    }
    if t.open_groups.contains(&device.group) {
        return Err(RegistryError::Busy {
            name: device.name.clone(),
            owner: format!("the open group file of group {}", device.group),
        });
    }
    t.owners
        .get_mut(device.index)
        .ok_or(RegistryError::Removed {
            name: device.name.clone(),
        })
}

impl Registry {
    /// Adds a device (names are checked unique by the configuration) with
    /// the default IOMMU view.
    pub fn add(&self, name: String, blk: Arc<BlkDevice>) -> Arc<Device> {
        self.add_with_view(name, blk, IommuView::default())
    }

    /// Adds a device with its IOMMU view. A device without a `group` gets
    /// the lowest group number no other device has.
    pub fn add_with_view(&self, name: String, blk: Arc<BlkDevice>, view: IommuView) -> Arc<Device> {
        let mut devices = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        let mut t = lock(&self.table.state);
        let group = view.group.unwrap_or_else(|| {
            let taken: BTreeSet<u32> = devices
                .iter()
                .flat_map(|d| [Some(d.group), d.view.group])
                .flatten()
                .collect();
            (0..).find(|g| !taken.contains(g)).unwrap_or(u32::MAX)
        });
        let index = t.owners.len();
        t.owners.push(None);
        t.groups.push(group);
        t.removed.push(false);
        drop(t);
        let d = Arc::new(Device {
            name,
            blk,
            index,
            group,
            view,
            table: self.table.clone(),
            counters: DeviceCounters::default(),
            workers: crate::queue::WorkerSet::default(),
            waiters: AtomicUsize::new(0),
            notifier: Mutex::new(None),
            notifier_seq: AtomicU64::new(0),
            poll_us: AtomicU32::new(0),
        });
        devices.push(d.clone());
        d
    }

    /// Removes device `name`: refused (EBUSY, naming the holder) while it
    /// has an owner or its group file is open, unless `force` (its owner
    /// was revoked and lets go in its own time); from then on it cannot be
    /// claimed (ENODEV).
    pub fn remove(&self, name: &str, force: bool) -> Result<Arc<Device>, RegistryError> {
        let mut devices = self.devices.write().unwrap_or_else(PoisonError::into_inner);
        let i = devices
            .iter()
            .position(|d| d.name == name)
            .ok_or_else(|| RegistryError::Removed { name: name.into() })?;
        let d = devices[i].clone();
        let mut t = lock(&self.table.state);
        if !force {
            claimable_slot(&mut t, &d)?;
        }
        if let Some(Some(o)) = t.owners.get(d.index).filter(|_| !force) {
            return Err(RegistryError::Busy {
                name: name.into(),
                owner: o.who.clone(),
            });
        }
        if let Some(r) = t.removed.get_mut(d.index) {
            *r = true;
        }
        drop(t);
        devices.remove(i);
        Ok(d)
    }

    /// The device named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Device>> {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|d| d.name == name)
            .cloned()
    }

    /// Every IOMMU group number, ascending, without duplicates.
    pub fn groups(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self.devices().iter().map(|d| d.group).collect();
        set.into_iter().collect()
    }

    /// Every device, in the order they were added.
    pub fn devices(&self) -> Vec<Arc<Device>> {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The rule of the vhost-user door: a frontend may attach only to a
    /// device nobody owns; `who` names it in logs and errors, `holder`
    /// lets the registry probe and revoke it.
    ///
    /// PROTOCOL.md: a vhost-user connection counts as an open of the
    /// device's group file, so it is refused while the device is bound
    /// through its cdev or its group file is open.
    pub fn claim_vhost_user(
        device: &Arc<Device>,
        who: &str,
        holder: Option<Arc<dyn Holder>>,
    ) -> Result<Ownership, RegistryError> {
        let mut t = lock(&device.table.state);
        let slot = claimable_slot(&mut t, device)?;
        if let Some(o) = slot.as_ref() {
            return Err(RegistryError::Busy {
                name: device.name.clone(),
                owner: o.who.clone(),
            });
        }
        *slot = Some(Owner {
            kind: OwnerKind::VhostUser,
            who: who.to_owned(),
            holder,
        });
        Ok(Ownership {
            device: device.clone(),
            watch: None,
        })
    }

    /// The rule of `VFIO_DEVICE_BIND_IOMMUFD` (the kernel's
    /// `vfio_device_block_group`, then `vfio_df_open`): EBUSY while the
    /// device's group file is open or a vhost-user frontend owns it
    /// (it counts as a group open); EINVAL while another device file of the
    /// device is bound.
    pub fn claim_cdev_bind(
        device: &Arc<Device>,
        who: &str,
        holder: Option<Arc<dyn Holder>>,
    ) -> Result<Ownership, RegistryError> {
        let mut t = lock(&device.table.state);
        let slot = claimable_slot(&mut t, device)?;
        match slot.as_ref() {
            Some(Owner {
                kind: OwnerKind::Cdev,
                who: o,
                ..
            }) => Err(RegistryError::AlreadyBound {
                name: device.name.clone(),
                owner: o.clone(),
            }),
            Some(Owner {
                kind: OwnerKind::VhostUser,
                who: o,
                ..
            }) => Err(RegistryError::Busy {
                name: device.name.clone(),
                owner: o.clone(),
            }),
            None => {
                *slot = Some(Owner {
                    kind: OwnerKind::Cdev,
                    who: who.to_owned(),
                    holder,
                });
                Ok(Ownership {
                    device: device.clone(),
                    watch: None,
                })
            }
        }
    }

    /// The rule of opening `DIR/vfio/N` (the kernel's group open): EBUSY
    /// when the group file is open already, or when any of its devices is
    /// bound through its cdev or owned by a vhost-user frontend.
    pub fn open_group(&self, group: u32) -> Result<GroupOwnership, RegistryError> {
        let mut t = lock(&self.table.state);
        if t.open_groups.contains(&group) {
            return Err(RegistryError::GroupBusy {
                group,
                why: "its group file is open".into(),
            });
        }
        let busy = t
            .groups
            .iter()
            .zip(&t.owners)
            .find_map(|(g, o)| o.as_ref().filter(|_| *g == group).cloned());
        if let Some(o) = busy {
            return Err(RegistryError::GroupBusy {
                group,
                why: format!("a device is owned by {}", o.who),
            });
        }
        t.open_groups.insert(group);
        Ok(GroupOwnership {
            group,
            table: self.table.clone(),
        })
    }

    /// Opens group `group` ([`Registry::open_group`]), waiting while an
    /// owner of one of its devices is going away.
    pub fn open_group_waiting(&self, group: u32) -> Result<GroupOwnership, RegistryError> {
        let devices = self.group_devices(group);
        self.table.retry(
            || self.open_group(group),
            || devices.iter().any(|d| d.owner_leaving()),
        )
    }

    /// The devices of IOMMU group `group`.
    pub fn group_devices(&self, group: u32) -> Vec<Arc<Device>> {
        self.devices()
            .into_iter()
            .filter(|d| d.group == group)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcdev_device_model::testing::blk;

    #[test]
    fn second_owner_is_refused_until_the_first_leaves() {
        let r = Registry::default();
        let d = r.add("vfio0".into(), blk());
        let first = Registry::claim_vhost_user(&d, "a", None).unwrap();
        let e = Registry::claim_vhost_user(&d, "b", None).unwrap_err();
        assert_eq!(e.errno(), vcdev_iommu::Errno(libc::EBUSY));
        assert_eq!(d.owner().as_deref(), Some("a"));
        drop(first);
        assert!(Registry::claim_vhost_user(&d, "b", None).is_ok());
    }

    /// `resize` tells the owner's notifier, only while it owns the device;
    /// an older registration going away leaves a newer one in place.
    #[test]
    fn resize_tells_the_current_owner() {
        use std::sync::atomic::AtomicU32;
        let r = Registry::default();
        let d = r.add("vfio0".into(), blk());
        let told = Arc::new(AtomicU32::new(0));
        let counter = |c: &Arc<AtomicU32>| -> ConfigNotifier {
            let c = c.clone();
            Arc::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
                true
            })
        };
        // Nobody to tell: the size still changes.
        assert_eq!(d.resize(Some(2 << 20), false).unwrap(), 2 << 20);
        assert!(!d.notify_config_change());

        let mut own = Registry::claim_vhost_user(&d, "a", None).unwrap();
        own.set_config_notifier(counter(&told));
        assert_eq!(d.resize(Some(4 << 20), false).unwrap(), 4 << 20);
        assert_eq!(told.load(Ordering::SeqCst), 1);
        // Unchanged or refused: nothing is sent.
        d.resize(Some(4 << 20), false).unwrap();
        let e = d.resize(Some(1 << 20), false).unwrap_err();
        assert_eq!(e.errno(), libc::EPERM);
        assert_eq!(d.blk().capacity_bytes(), 4 << 20);
        assert_eq!(told.load(Ordering::SeqCst), 1);
        assert_eq!(d.resize(Some(1 << 20), true).unwrap(), 1 << 20);
        assert_eq!(told.load(Ordering::SeqCst), 2);
        drop(own);
        assert!(!d.notify_config_change());

        let second = Arc::new(AtomicU32::new(0));
        let old = d.watch_config(counter(&told));
        let new = d.watch_config(counter(&second));
        drop(old);
        assert!(d.notify_config_change());
        assert_eq!(second.load(Ordering::SeqCst), 1);
        assert_eq!(told.load(Ordering::SeqCst), 2);
        drop(new);
        assert!(!d.notify_config_change());
    }

    /// PROTOCOL.md exclusivity, both ways: cdev bind vs group open vs
    /// vhost-user.
    #[test]
    fn cdev_group_and_vhost_user_exclude_each_other() {
        let r = Registry::default();
        let a = r.add("a".into(), blk());
        let b = r.add_with_view(
            "b".into(),
            blk(),
            IommuView {
                group: Some(7),
                ..IommuView::default()
            },
        );
        let c = r.add_with_view(
            "c".into(),
            blk(),
            IommuView {
                group: Some(7),
                ..IommuView::default()
            },
        );
        assert_eq!((a.group(), b.group(), c.group()), (0, 7, 7));
        assert_eq!(r.groups(), vec![0, 7]);

        let bound = Registry::claim_cdev_bind(&a, "file1", None).unwrap();
        let e = Registry::claim_cdev_bind(&a, "file2", None).unwrap_err();
        assert_eq!(e.errno(), vcdev_iommu::Errno::EINVAL);
        assert_eq!(
            r.open_group(0).unwrap_err().errno(),
            vcdev_iommu::Errno::EBUSY
        );
        assert_eq!(
            Registry::claim_vhost_user(&a, "qemu", None)
                .unwrap_err()
                .errno(),
            vcdev_iommu::Errno::EBUSY
        );
        drop(bound);

        let g = r.open_group(7).unwrap();
        assert_eq!(
            r.open_group(7).unwrap_err().errno(),
            vcdev_iommu::Errno::EBUSY
        );
        for d in [&b, &c] {
            assert_eq!(
                Registry::claim_cdev_bind(d, "f", None).unwrap_err().errno(),
                vcdev_iommu::Errno::EBUSY
            );
            assert!(Registry::claim_vhost_user(d, "qemu", None).is_err());
        }
        drop(g);
        let vu = Registry::claim_vhost_user(&c, "qemu", None).unwrap();
        assert_eq!(
            r.open_group(7).unwrap_err().errno(),
            vcdev_iommu::Errno::EBUSY
        );
        assert_eq!(
            Registry::claim_cdev_bind(&c, "f", None)
                .unwrap_err()
                .errno(),
            vcdev_iommu::Errno::EBUSY
        );
        drop(vu);
        assert!(r.open_group(7).is_ok());
    }
}
