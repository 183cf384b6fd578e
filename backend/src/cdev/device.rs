//! A device as the cdev door drives it: the virtio PCI function of
//! device-model (config space, BAR registers, MSI-X), queue workers over
//! the same [`BlkDevice`] the vhost-user door serves, MSI-X vectors on the
//! client's eventfds and doorbells on its ioeventfds.
//!
//! # DMA and the attach hook
//!
//! Each running queue has a worker thread and a reader slot
//! (`Mutex<Option<Reader>>`). A worker holds its slot while it processes a
//! batch, online in the slot's reader; the [`DeviceHandle`]'s attach hook
//! (called by the iommu crate whenever the device's address space changes:
//! attach, replace, detach, unbind) takes every slot in turn and puts a
//! reader of the new space in it, or `None` (DMA blocked). Taking a slot
//! waits for the batch in progress; the hook then waits until the requests
//! still in flight through the old space completed (their holds are
//! released): when it returns, no queue uses the old space any more.
//!
//! # Locks
//!
//! Order: the iommufd's table (hook) -> `slots` -> one slot; `queues` ->
//! `pci` -> `irqs`. A worker takes its slot, lets go, then `pci` and
//! `irqs` to signal its vector; nobody joins a worker while holding `pci`
//! or a slot.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, error, info, warn};
use vcdev_device_model::blk::{BlkDevice, FaultPolicy};
use vcdev_device_model::pci::{Event, IrqIndex, RegionIndex, VirtioPciFunction};
use vcdev_iommu::{AddressSpace, DeviceHandle, Errno, Reader};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::vfio_uapi::*;
use crate::queue::{Batch, Control, Decide, Door, QueueWorker, Rings, Running};
use crate::registry::{Device, DeviceCounters};
use crate::ring::RingView;
use vcdev_iommu::sync::lock;

/// The most ioeventfds a device takes (the kernel's `VFIO_PCI_IOEVENTFD_MAX`).
pub const IOEVENTFD_MAX: usize = 1000;

/// Errors of building a device's function.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The PCI function refused the device.
    #[error("Invalid virtio PCI function")]
    Pci(#[source] vcdev_device_model::pci::Error),
    /// The software IOMMU refused the device's view.
    #[error("Invalid IOMMU view")]
    Iommu(#[source] vcdev_iommu::DeviceError),
}

/// A queue's reader: `None` while the device's DMA is blocked.
type Slot = Arc<Mutex<Option<Reader>>>;

/// What a worker's setup makes: control word, kick, the descriptors it
/// wakes on (the kick and the ioeventfds).
type WorkerSetup = (Arc<Control>, Arc<EventFd>, Vec<EventFd>);

/// The reader slots of the running queues (see the module doc).
#[derive(Default)]
struct Slots {
    list: Mutex<Vec<Slot>>,
}

impl Slots {
    /// The attach hook: every queue reads through `space` from now on.
    /// Returns once no request that translated through the old space is in
    /// flight any more (its I/O completed): a detach or replace is then
    /// complete for DMA, as the kernel's is.
    fn switch(&self, space: Option<Arc<AddressSpace>>) {
        let mut old = Vec::new();
        {
            let list = lock(&self.list);
            for slot in list.iter() {
                let mut g = lock(slot);
                if let Some(r) = g.as_ref() {
                    old.push(r.hold_releaser());
                }
                *g = space.as_ref().map(AddressSpace::reader);
            }
        }
        let start = std::time::Instant::now();
        let mut warned = false;
        for r in old {
            // The workers complete (or, detached, abandon) these requests as
            // their I/O finishes; nothing here blocks them.
            while r.holds() > 0 {
                if !warned && start.elapsed() > std::time::Duration::from_secs(1) {
                    warn!("IOMMU switch waits for I/O in flight for more than 1 s");
                    warned = true;
                }
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }
}

/// What workers share with the device: the function and the vectors.
struct Core {
    pci: Mutex<VirtioPciFunction>,
    /// MSI-X vector -> eventfd.
    msix: Mutex<Vec<Option<EventFd>>>,
    /// The ERR and REQ eventfds (never signalled: no AER, no request).
    err_req: Mutex<[Option<EventFd>; 2]>,
    /// Whether MSI-X is on through SET_IRQS (vfio-pci's `irq_type`).
    msix_on: AtomicBool,
    reg: Arc<Device>,
}

impl Core {
    /// Signals vector `v`'s eventfd; returns whether it has one that took
    /// the signal.
    fn signal(&self, v: u16) -> bool {
        if let Some(Some(fd)) = lock(&self.msix).get(usize::from(v)) {
            if let Err(e) = crate::sys::signal_eventfd(fd) {
                warn!("{}: MSI-X vector {v}: {e}", self.reg.name());
                return false;
            }
            return true;
        }
        false
    }

    fn queue_interrupt(&self, q: u16) {
        let v = lock(&self.pci).queue_interrupt(q);
        if let Some(v) = v {
            self.signal(v);
        }
    }

    fn needs_reset(&self) {
        let v = lock(&self.pci).set_needs_reset();
        if let Some(v) = v {
            self.signal(v);
        }
    }
}

struct Worker {
    running: Running,
    kick: Arc<EventFd>,
    slot: Slot,
}

/// A registered ioeventfd: a write of `data` (`size` bytes) at BAR0
/// `offset` whenever `fd` fires; only doorbells are taken.
struct IoEventFd {
    offset: u64,
    size: u32,
    data: u64,
    queue: u16,
    fd: EventFd,
}

#[derive(Default)]
struct Queues {
    workers: BTreeMap<u16, Worker>,
    ioeventfds: Vec<IoEventFd>,
}

/// A device of the cdev door.
pub struct CdevDevice {
    reg: Arc<Device>,
    handle: Arc<DeviceHandle>,
    core: Arc<Core>,
    slots: Arc<Slots>,
    queues: Mutex<Queues>,
    /// Removed by the operator (`vcdev ctl remove --force`): every request
    /// on its files is ENODEV from then on.
    revoked: AtomicBool,
}

impl std::fmt::Debug for CdevDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CdevDevice")
            .field("name", &self.reg.name())
            .finish_non_exhaustive()
    }
}

fn event_idx(pci: &VirtioPciFunction) -> bool {
    pci.negotiated_features()
        .is_some_and(|f| f & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0)
}

impl CdevDevice {
    /// The cdev side of registry device `reg`.
    pub fn new(reg: Arc<Device>) -> Result<Arc<CdevDevice>, DeviceError> {
        let pci = VirtioPciFunction::new(reg.blk().clone()).map_err(DeviceError::Pci)?;
        let vectors = usize::from(pci.layout().msix_vectors);
        let slots = Arc::new(Slots::default());
        let hook_slots = slots.clone();
        let view = reg.iommu_view();
        let handle = DeviceHandle::with_stats(
            reg.name(),
            view.aperture,
            view.reserved.clone(),
            Box::new(move |space| hook_slots.switch(space)),
            reg.counters().ioas.clone(),
        )
        .map_err(DeviceError::Iommu)?;
        let core = Arc::new(Core {
            pci: Mutex::new(pci),
            msix: Mutex::new((0..vectors).map(|_| None).collect()),
            err_req: Mutex::new([None, None]),
            msix_on: AtomicBool::new(false),
            reg: reg.clone(),
        });
        Ok(Arc::new(CdevDevice {
            reg,
            handle,
            core,
            slots,
            queues: Mutex::new(Queues::default()),
            revoked: AtomicBool::new(false),
        }))
    }

    /// Its name.
    pub fn name(&self) -> &str {
        self.reg.name()
    }

    /// The registry's device.
    pub fn reg(&self) -> &Arc<Device> {
        &self.reg
    }

    /// The software IOMMU's handle.
    pub fn handle(&self) -> &Arc<DeviceHandle> {
        &self.handle
    }

    /// The virtio-blk device.
    pub fn blk(&self) -> &Arc<BlkDevice> {
        self.reg.blk()
    }

    /// Counters.
    pub fn counters(&self) -> &DeviceCounters {
        self.reg.counters()
    }

    /// Running queues.
    pub fn running_queues(&self) -> Vec<u16> {
        lock(&self.queues).workers.keys().copied().collect()
    }

    /// VFIO_DEVICE_GET_INFO's answer.
    pub fn info(&self) -> VfioDeviceInfo {
        VfioDeviceInfo {
            argsz: 0,
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: u32::try_from(RegionIndex::ALL.len()).unwrap_or(0),
            num_irqs: u32::try_from(IrqIndex::ALL.len()).unwrap_or(0),
            cap_offset: 0,
            pad: 0,
        }
    }

    /// VFIO_DEVICE_GET_REGION_INFO for `index`: EINVAL where vfio-pci
    /// refuses it (past the last region, VGA).
    pub fn region_info(&self, index: u32) -> Result<VfioRegionInfo, Errno> {
        let r = RegionIndex::from_index(index).ok_or(Errno::EINVAL)?;
        let info = lock(&self.core.pci)
            .layout()
            .region_info(r)
            .ok_or(Errno::EINVAL)?;
        let mut flags = 0;
        if info.flags.read {
            flags |= VFIO_REGION_INFO_FLAG_READ;
        }
        if info.flags.write {
            flags |= VFIO_REGION_INFO_FLAG_WRITE;
        }
        if info.flags.mmap {
            flags |= VFIO_REGION_INFO_FLAG_MMAP;
        }
        Ok(VfioRegionInfo {
            argsz: 0,
            flags,
            index,
            cap_offset: 0,
            size: info.size,
            offset: r.file_offset(),
        })
    }

    /// VFIO_DEVICE_GET_IRQ_INFO for `index`.
    pub fn irq_info(&self, index: u32) -> Result<VfioIrqInfo, Errno> {
        let i = IrqIndex::from_index(index).ok_or(Errno::EINVAL)?;
        let info = lock(&self.core.pci).layout().irq_info(i);
        let mut flags = 0;
        for (on, bit) in [
            (info.flags.eventfd, VFIO_IRQ_INFO_EVENTFD),
            (info.flags.maskable, VFIO_IRQ_INFO_MASKABLE),
            (info.flags.automasked, VFIO_IRQ_INFO_AUTOMASKED),
            (info.flags.noresize, VFIO_IRQ_INFO_NORESIZE),
        ] {
            if on {
                flags |= bit;
            }
        }
        Ok(VfioIrqInfo {
            argsz: 0,
            flags,
            index,
            count: info.count,
        })
    }

    /// A pread of the device file: `count` bytes at file offset `offset`.
    pub fn region_read(&self, offset: u64, count: usize) -> Result<Vec<u8>, Errno> {
        let (index, off) = RegionIndex::split_file_offset(offset);
        let region = u32::try_from(index)
            .ok()
            .and_then(RegionIndex::from_index)
            .ok_or(Errno::EINVAL)?;
        let mut buf = vec![0u8; count];
        let n = lock(&self.core.pci)
            .region_read(region, off, &mut buf)
            .map_err(access_errno)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// A pwrite of the device file; acts on what the write caused before
    /// returning (a reset stops every queue first).
    pub fn region_write(&self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let (index, off) = RegionIndex::split_file_offset(offset);
        let region = u32::try_from(index)
            .ok()
            .and_then(RegionIndex::from_index)
            .ok_or(Errno::EINVAL)?;
        let (n, events) = lock(&self.core.pci)
            .region_write(region, off, data)
            .map_err(access_errno)?;
        self.act(events);
        Ok(n)
    }

    /// The device's configuration changed (a resize): `config_generation`
    /// moves and the config-change vector (`msix_config`) fires, or the
    /// ISR config bit is set with MSI-X off. Returns whether an eventfd was
    /// signalled.
    pub fn config_changed(&self) -> bool {
        let v = lock(&self.core.pci).config_interrupt();
        match v {
            Some(v) => self.core.signal(v),
            None => false,
        }
    }

    /// The [`ConfigNotifier`](crate::registry::ConfigNotifier) of whoever
    /// drives this device through the cdev door ([`Self::config_changed`]).
    /// It holds the device weakly.
    pub fn config_notifier(self: &Arc<Self>) -> crate::registry::ConfigNotifier {
        let dev = Arc::downgrade(self);
        Arc::new(move || dev.upgrade().is_some_and(|d| d.config_changed()))
    }

    /// VFIO_DEVICE_RESET.
    pub fn reset(&self) {
        let events = lock(&self.core.pci).reset();
        self.act(events);
    }

    /// Acts on the function's events.
    fn act(&self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::QueueEnabled(q) => self.start_queue(q),
                Event::QueueNotify(q) => {
                    if let Some(w) = lock(&self.queues).workers.get(&q) {
                        let _ = w.kick.write(1);
                    }
                }
                Event::DriverOk => {
                    for w in lock(&self.queues).workers.values() {
                        let _ = w.kick.write(1);
                    }
                }
                Event::Reset => self.stop_queues(),
                Event::Interrupt(v) => {
                    self.core.signal(v);
                }
            }
        }
    }

    /// Starts queue `q` as the driver configured it.
    fn start_queue(&self, q: u16) {
        let (cfg, ev_idx) = {
            let pci = lock(&self.core.pci);
            (pci.queue_config(q), event_idx(&pci))
        };
        let Some(cfg) = cfg else { return };
        let queue = match cfg.to_queue(self.blk().queue_size(), ev_idx) {
            Ok(queue) => queue,
            Err(e) => {
                warn!("{}: queue {q} badly configured: {e}", self.name());
                self.core.needs_reset();
                return;
            }
        };
        let mut qs = lock(&self.queues);
        if let Some(old) = qs.workers.remove(&q) {
            self.stop_worker(old);
        }
        self.spawn_worker(&mut qs, q, queue);
    }

    fn spawn_worker(&self, qs: &mut Queues, q: u16, queue: Queue) {
        let setup = || -> std::io::Result<WorkerSetup> {
            let control = Control::new()?;
            let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
            let mut wakes = vec![kick.try_clone()?];
            for io in qs.ioeventfds.iter().filter(|io| io.queue == q) {
                wakes.push(io.fd.try_clone()?);
            }
            Ok((control, kick, wakes))
        };
        let (control, kick, wakes) = match setup() {
            Ok(s) => s,
            Err(e) => {
                error!("{}: queue {q}: cannot set up its worker: {e}", self.name());
                self.core.needs_reset();
                return;
            }
        };
        let slot: Slot = {
            let mut list = lock(&self.slots.list);
            let slot = Arc::new(Mutex::new(
                self.handle
                    .address_space()
                    .as_ref()
                    .map(AddressSpace::reader),
            ));
            list.push(slot.clone());
            slot
        };
        let door = CdevDoor {
            q,
            slot: slot.clone(),
            core: self.core.clone(),
        };
        let worker = match QueueWorker::new(
            format!("{}: queue {q}", self.name()),
            &self.reg,
            queue,
            door,
            wakes,
            control.clone(),
        ) {
            Ok(w) => w,
            Err(e) => {
                error!("{}: queue {q}: cannot set up its worker: {e}", self.name());
                lock(&self.slots.list).retain(|s| !Arc::ptr_eq(s, &slot));
                self.core.needs_reset();
                return;
            }
        };
        match Running::spawn(format!("{}-cq{q}", self.name()), worker) {
            Ok(running) => {
                debug!("{}: queue {q} started", self.name());
                qs.workers.insert(
                    q,
                    Worker {
                        running,
                        kick,
                        slot,
                    },
                );
            }
            Err(e) => {
                error!("{}: queue {q}: cannot spawn its worker: {e}", self.name());
                lock(&self.slots.list).retain(|s| !Arc::ptr_eq(s, &slot));
                self.core.needs_reset();
            }
        }
    }

    /// Stops a worker (after its I/O in flight completed) and returns its
    /// queue (position kept). This door never parks a request.
    fn stop_worker(&self, w: Worker) -> Option<Queue> {
        let q = w.running.stop().map(|(q, _)| q);
        lock(&self.slots.list).retain(|s| !Arc::ptr_eq(s, &w.slot));
        q
    }

    /// Stops and forgets every queue.
    fn stop_queues(&self) {
        let workers = std::mem::take(&mut lock(&self.queues).workers);
        for (_, w) in workers {
            self.stop_worker(w);
        }
    }

    /// Restarts the running queue `q` (its ioeventfds changed), keeping
    /// its position.
    fn restart_queue(&self, qs: &mut Queues, q: u16) {
        if let Some(w) = qs.workers.remove(&q) {
            if let Some(queue) = self.stop_worker(w) {
                self.spawn_worker(qs, q, queue);
            }
        }
    }

    /// VFIO_DEVICE_IOEVENTFD (the kernel's `vfio_pci_ioeventfd`), in its
    /// order: the offset (EINVAL), the registrations (EEXIST, ENODEV,
    /// ENOSPC), then the descriptor (`fd` Some: its error, or EINVAL if no
    /// eventfd). `fd` None de-assigns the matching registration.
    ///
    /// Deviation: only doorbells are taken (EINVAL elsewhere); vfio-pci
    /// accepts any BAR offset outside the MSI-X table, but the only
    /// registers a virtio driver writes in its fast path are doorbells.
    pub fn ioeventfd(
        &self,
        offset: u64,
        size: u32,
        data: u64,
        fd: Option<Result<OwnedFd, Errno>>,
    ) -> Result<(), Errno> {
        let (index, off) = RegionIndex::split_file_offset(offset);
        let region = u32::try_from(index)
            .ok()
            .and_then(RegionIndex::from_index)
            .ok_or(Errno::EINVAL)?;
        if region.bar().is_none() {
            return Err(Errno::EINVAL);
        }
        let q = {
            let pci = lock(&self.core.pci);
            let layout = pci.layout();
            let end = off.checked_add(u64::from(size)).ok_or(Errno::EINVAL)?;
            let bar = layout.region_info(region).map_or(0, |i| i.size);
            if end > bar {
                return Err(Errno::EINVAL);
            }
            if layout.msix_table.relative(off).is_some()
                || (off < layout.msix_table.offset && end > layout.msix_table.offset)
            {
                return Err(Errno::EINVAL);
            }
            layout
                .queue_for_doorbell(region, off)
                .ok_or(Errno::EINVAL)?
        };
        let mut qs = lock(&self.queues);
        let existing = qs
            .ioeventfds
            .iter()
            .position(|io| io.offset == off && io.size == size && io.data == data);
        match (existing, fd) {
            (Some(_), Some(_)) => return Err(Errno::EEXIST),
            (Some(i), None) => {
                qs.ioeventfds.remove(i);
            }
            (None, None) => return Err(Errno::ENODEV),
            (None, Some(fd)) => {
                if qs.ioeventfds.len() >= IOEVENTFD_MAX {
                    return Err(Errno::ENOSPC);
                }
                let fd = into_eventfd(fd?)?;
                qs.ioeventfds.push(IoEventFd {
                    offset: off,
                    size,
                    data,
                    queue: q,
                    fd,
                });
            }
        }
        self.restart_queue(&mut qs, q);
        Ok(())
    }

    /// VFIO_DEVICE_SET_IRQS after the generic checks: `fds` are the
    /// eventfds for `start..start+fds.len()` (None: de-assign) with
    /// DATA_EVENTFD, `fire` the vectors to trigger with DATA_NONE/BOOL.
    pub fn set_irqs(&self, hdr: &VfioIrqSet, action: IrqAction) -> Result<(), Errno> {
        let index = IrqIndex::from_index(hdr.index).ok_or(Errno::EINVAL)?;
        let action_bits = hdr.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        match index {
            // No irqs (count 0): the caller refused every request already.
            IrqIndex::Intx | IrqIndex::Msi => Err(Errno::EINVAL),
            IrqIndex::Err | IrqIndex::Req => {
                if action_bits != VFIO_IRQ_SET_ACTION_TRIGGER {
                    return Err(Errno::ENOTTY);
                }
                let slot = usize::from(index == IrqIndex::Req);
                let mut er = lock(&self.core.err_req);
                let ctx = er.get_mut(slot).ok_or(Errno::EINVAL)?;
                set_ctx_trigger_single(ctx, hdr.flags, action)
            }
            IrqIndex::Msix => {
                // vfio-pci has no mask/unmask for MSI-X (`vfio_pci_set_irqs_ioctl`).
                if action_bits != VFIO_IRQ_SET_ACTION_TRIGGER {
                    return Err(Errno::ENOTTY);
                }
                // `vfio_pci_set_msi_trigger`: only DATA_EVENTFD works while
                // MSI-X is off (it turns it on).
                let on = self.core.msix_on.load(Ordering::SeqCst);
                if !on && !matches!(action, IrqAction::Assign(_)) {
                    return Err(Errno::EINVAL);
                }
                let events = match action {
                    IrqAction::Disable => {
                        self.core.msix_on.store(false, Ordering::SeqCst);
                        lock(&self.core.msix).iter_mut().for_each(|v| *v = None);
                        lock(&self.core.pci).host_msix_enable(false)
                    }
                    IrqAction::Assign(fds) => {
                        let mut events = Vec::new();
                        let mut pci = lock(&self.core.pci);
                        self.core.msix_on.store(true, Ordering::SeqCst);
                        if !pci.msix_enabled() {
                            events.extend(pci.host_msix_enable(true));
                        }
                        let mut table = lock(&self.core.msix);
                        for (i, fd) in fds.into_iter().enumerate() {
                            let v = u16::try_from(
                                usize::try_from(hdr.start)
                                    .unwrap_or(usize::MAX)
                                    .saturating_add(i),
                            )
                            .map_err(|_| Errno::EINVAL)?;
                            let masked = fd.is_none();
                            if let Some(s) = table.get_mut(usize::from(v)) {
                                *s = fd;
                            }
                            drop(table);
                            events.extend(pci.host_msix_mask(v, masked));
                            table = lock(&self.core.msix);
                        }
                        events
                    }
                    IrqAction::Fire(which) => {
                        for (i, on) in which.into_iter().enumerate() {
                            if on {
                                let v = usize::try_from(hdr.start)
                                    .unwrap_or(usize::MAX)
                                    .saturating_add(i);
                                if let Ok(v) = u16::try_from(v) {
                                    self.core.signal(v);
                                }
                            }
                        }
                        Vec::new()
                    }
                };
                self.act(events);
                Ok(())
            }
        }
    }

    /// The operator removes the device while a file holds it (PROTOCOL.md,
    /// `vcdev ctl remove --force`): the REQ irq is signalled, as vfio-pci
    /// asks a user to release a device, the DMA is quiesced, and from then
    /// on every request on its files is ENODEV.
    pub fn revoke(&self) {
        if let Some(req) = &lock(&self.core.err_req)[1] {
            let _ = crate::sys::signal_eventfd(req);
        }
        self.revoked.store(true, Ordering::SeqCst);
        self.stop_queues();
        info!(
            "{}: removed by the operator, its files answer ENODEV",
            self.name()
        );
    }

    /// True once [`CdevDevice::revoke`] ran.
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    /// The device file was released: queues stop, vectors and ioeventfds
    /// go, and the function is back to its power-on state for the next
    /// opener (vfio-pci's `vfio_pci_core_disable` restores the saved
    /// config state).
    pub fn quiesce(&self) {
        self.stop_queues();
        lock(&self.queues).ioeventfds.clear();
        lock(&self.core.msix).iter_mut().for_each(|v| *v = None);
        self.core.msix_on.store(false, Ordering::SeqCst);
        *lock(&self.core.err_req) = [None, None];
        match VirtioPciFunction::new(self.blk().clone()) {
            Ok(f) => *lock(&self.core.pci) = f,
            Err(e) => error!("{}: cannot reset the function: {e}", self.name()),
        }
        info!("{}: cdev function quiesced", self.name());
    }
}

/// An ERR or REQ trigger (`vfio_pci_set_ctx_trigger_single`): DATA_NONE
/// signals (count 1) or removes (count 0) the eventfd, EINVAL without one;
/// DATA_BOOL signals if its byte is set; DATA_EVENTFD sets or removes it;
/// BOOL and EVENTFD with count 0 are EINVAL.
fn set_ctx_trigger_single(
    ctx: &mut Option<EventFd>,
    flags: u32,
    action: IrqAction,
) -> Result<(), Errno> {
    match action {
        IrqAction::Disable => {
            ctx.take().ok_or(Errno::EINVAL)?;
        }
        IrqAction::Fire(v) if flags & VFIO_IRQ_SET_DATA_NONE != 0 => {
            let fd = ctx.as_ref().ok_or(Errno::EINVAL)?;
            if v.first().copied().unwrap_or(false) {
                let _ = crate::sys::signal_eventfd(fd);
            }
        }
        IrqAction::Fire(v) => {
            if *v.first().ok_or(Errno::EINVAL)? {
                if let Some(fd) = ctx.as_ref() {
                    let _ = crate::sys::signal_eventfd(fd);
                }
            }
        }
        IrqAction::Assign(fds) => {
            *ctx = fds.into_iter().next().ok_or(Errno::EINVAL)?;
        }
    }
    Ok(())
}

/// What SET_IRQS asks of an index.
#[derive(Debug)]
pub enum IrqAction {
    /// DATA_NONE with count 0: disable the index.
    Disable,
    /// DATA_EVENTFD: eventfds from `start` on (None: de-assign).
    Assign(Vec<Option<EventFd>>),
    /// DATA_NONE (all true) or DATA_BOOL: trigger these from `start` on.
    Fire(Vec<bool>),
}

/// The errno vfio-pci gives for an access the function refuses.
fn access_errno(e: vcdev_device_model::pci::AccessError) -> Errno {
    use vcdev_device_model::pci::AccessError;
    match e {
        AccessError::NoRegion(_) | AccessError::BarOutOfRange { .. } => Errno::EINVAL,
        AccessError::ConfigOutOfRange { .. } => Errno::EFAULT,
        AccessError::MemoryDisabled => Errno::EIO,
    }
}

/// Whether `fd` is an eventfd (the kernel's `eventfd_ctx_fdget` refuses
/// anything else with EINVAL).
pub fn into_eventfd(fd: OwnedFd) -> Result<EventFd, Errno> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| Errno::EINVAL)?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(Errno::EINVAL);
    }
    Ok(crate::sys::eventfd_from(fd))
}

/// Everything a worker thread owns.
/// The cdev door of a queue worker: the reader of the device's IOAS (none
/// while DMA is blocked; the attach hook switches it between batches), and
/// MSI-X. A fault is a plain DMA error: the request fails with IOERR.
struct CdevDoor {
    q: u16,
    slot: Slot,
    core: Arc<Core>,
}

impl Door for CdevDoor {
    fn batch<R>(
        &mut self,
        _rings: Rings,
        f: impl FnOnce(&RingView<'_, '_>, &mut Decide<'_>) -> R,
    ) -> Batch<R> {
        let mut guard = lock(&self.slot);
        let Some(reader) = guard.as_mut() else {
            debug!(
                "{}: queue {}: DMA blocked (not attached)",
                self.core.reg.name(),
                self.q
            );
            return Batch::Lost;
        };
        let before = reader.stats();
        let releaser = reader.hold_releaser();
        let session = reader.enter();
        let view = RingView::new(&session, None, &releaser);
        let r = f(&view, &mut |_| FaultPolicy::Fail);
        drop(session);
        let after = reader.stats();
        drop(guard);
        let c = self.core.reg.counters();
        DeviceCounters::add(&c.cdev_batches, 1);
        DeviceCounters::add(
            &c.translations,
            after.translations.saturating_sub(before.translations),
        );
        DeviceCounters::add(&c.cache_hits, after.hits.saturating_sub(before.hits));
        Batch::Ran(r)
    }

    /// A look at the rings for `poll-us=`: no batch counted.
    fn peek<R>(&mut self, _rings: Rings, f: impl FnOnce(&RingView<'_, '_>) -> R) -> Option<R> {
        let mut guard = lock(&self.slot);
        let reader = guard.as_mut()?;
        let releaser = reader.hold_releaser();
        let session = reader.enter();
        let view = RingView::new(&session, None, &releaser);
        Some(f(&view))
    }

    fn notify(&self) {
        self.core.queue_interrupt(self.q);
    }

    fn broken(&self, _err: &dyn std::fmt::Display) {
        self.core.needs_reset();
    }
}
