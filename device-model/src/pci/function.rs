//! [`VirtioPciFunction`]: the register semantics of the function.

use std::sync::Arc;

use log::debug;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::common::{CommonCfg, QueueConfig};
use super::config::{CapOffsets, ConfigSpace};
use super::layout::{Layout, RegionIndex, VIRTIO_BAR};
use super::msix::{Msix, MsixEntry};
use super::regs::*;
use super::{AccessError, Error, Event};
use crate::blk::BlkDevice;
use crate::virtio::features::features_mask;

/// Split an access of `len` bytes at `offset` into naturally aligned pieces of 8, 4, 2 or 1
/// bytes (at most `max`), as vfio-pci's `vfio_pci_core_do_io_rw` and `vfio_config_do_rw` do.
/// Yields `(offset of the piece, index into the buffer, piece length)`.
fn pieces(offset: u64, len: usize, max: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        let left = len.checked_sub(done).filter(|&l| l > 0)?;
        let at = offset.checked_add(u64::try_from(done).ok()?)?;
        let size = [8usize, 4, 2, 1]
            .into_iter()
            .find(|&s| s <= max && s <= left && at % u64::try_from(s).unwrap_or(1) == 0)
            .unwrap_or(1);
        let piece = (at, done, size);
        done += size;
        Some(piece)
    })
}

/// A modern (virtio 1.x) virtio PCI function in front of a virtio-blk device.
///
/// It owns everything a PCI function holds: config space, the BAR's registers (common
/// configuration, ISR, device configuration, doorbells), the MSI-X table and PBA. It knows
/// nothing of sockets or VFIO messages; the transport turns requests into calls:
///
/// - region reads and writes (a VFIO user's pread/pwrite) → [`region_read`] / [`region_write`];
/// - a doorbell eventfd (`VFIO_DEVICE_IOEVENTFD`) that fires → the queue
///   [`Layout::queue_for_doorbell`] names, as if [`Event::QueueNotify`] had been returned;
/// - MSI-X eventfds (`VFIO_DEVICE_SET_IRQS`) → [`host_msix_enable`] / [`host_msix_mask`];
///   the transport keeps the eventfds and signals the vectors [`queue_interrupt`],
///   [`config_interrupt`] and [`Event::Interrupt`] name;
/// - `VFIO_DEVICE_RESET` → [`reset`].
///
/// Every write returns the [`Event`]s the transport must act on. Nothing here panics or fails
/// on a bad offset, size or value: such accesses read zero and writes are dropped, as on
/// hardware; only the region layer refuses accesses vfio-pci refuses ([`AccessError`]).
///
/// The function is not thread-safe by itself: the transport serialises calls (one lock per
/// function), and hands queue configurations to its queue workers.
///
/// [`region_read`]: Self::region_read
/// [`region_write`]: Self::region_write
/// [`host_msix_enable`]: Self::host_msix_enable
/// [`host_msix_mask`]: Self::host_msix_mask
/// [`queue_interrupt`]: Self::queue_interrupt
/// [`config_interrupt`]: Self::config_interrupt
/// [`reset`]: Self::reset
#[derive(Debug)]
pub struct VirtioPciFunction {
    device: Arc<BlkDevice>,
    layout: Layout,
    config: ConfigSpace,
    common: CommonCfg,
    msix: Msix,
}

impl VirtioPciFunction {
    /// The features the function offers: the device's, plus `VIRTIO_F_VERSION_1` and
    /// `VIRTIO_F_ACCESS_PLATFORM` (all DMA of this door goes through an IOMMU address space).
    pub const TRANSPORT_FEATURES: u64 =
        features_mask(&[VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM]);

    /// A function in front of `device`, in its initial state.
    pub fn new(device: Arc<BlkDevice>) -> Result<Self, Error> {
        let layout = Layout::new(device.num_queues())?;
        let virtio_id =
            u16::try_from(VIRTIO_ID_BLOCK).map_err(|_| Error::DeviceId(VIRTIO_ID_BLOCK))?;
        let cfg_len = u64::try_from(device.config_bytes().len()).unwrap_or(0);
        let config = ConfigSpace::new(&layout, virtio_id, cfg_len);
        let offered = device.device_features() | Self::TRANSPORT_FEATURES;
        let common = CommonCfg::new(offered, device.num_queues(), device.queue_size());
        let msix = Msix::new(layout.msix_vectors);
        Ok(Self {
            device,
            layout,
            config,
            common,
            msix,
        })
    }

    /// The device behind the function.
    #[must_use]
    pub fn device(&self) -> &Arc<BlkDevice> {
        &self.device
    }

    /// The BAR layout, regions and interrupt indexes.
    #[must_use]
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Where each capability sits in config space.
    #[must_use]
    pub fn capabilities(&self) -> CapOffsets {
        self.config.caps()
    }

    // --- Queries ------------------------------------------------------------------------

    /// The features offered to the driver.
    #[must_use]
    pub fn offered_features(&self) -> u64 {
        self.common.offered()
    }

    /// The negotiated features, once the driver's `FEATURES_OK` was accepted.
    #[must_use]
    pub fn negotiated_features(&self) -> Option<u64> {
        (self.device_status() & status_u8(VIRTIO_CONFIG_S_FEATURES_OK) != 0)
            .then(|| self.common.driver_features())
    }

    /// The `device_status` register.
    #[must_use]
    pub fn device_status(&self) -> u8 {
        self.common.status()
    }

    /// Whether the driver set `DRIVER_OK`.
    #[must_use]
    pub fn driver_ok(&self) -> bool {
        self.device_status() & status_u8(VIRTIO_CONFIG_S_DRIVER_OK) != 0
    }

    /// How queue `q` is configured; `None` past the last queue.
    #[must_use]
    pub fn queue_config(&self, q: u16) -> Option<QueueConfig> {
        self.common.queue(q)
    }

    /// Number of queues.
    #[must_use]
    pub fn num_queues(&self) -> u16 {
        self.common.num_queues()
    }

    /// The MSI-X vector for configuration changes, or `VIRTIO_MSI_NO_VECTOR`.
    #[must_use]
    pub fn config_msix_vector(&self) -> u16 {
        self.common.config_vector()
    }

    /// The command register's memory space enable: BAR accesses are refused without it.
    #[must_use]
    pub fn memory_enabled(&self) -> bool {
        self.config.u16_at(PCI_COMMAND) & PCI_COMMAND_MEMORY != 0
    }

    /// The command register's bus master enable: without it the device must not do DMA, so
    /// the transport should not process queues.
    #[must_use]
    pub fn bus_master_enabled(&self) -> bool {
        self.config.u16_at(PCI_COMMAND) & PCI_COMMAND_MASTER != 0
    }

    /// Whether MSI-X is enabled.
    #[must_use]
    pub fn msix_enabled(&self) -> bool {
        self.msix.enabled()
    }

    /// Whether the whole function's MSI-X vectors are masked.
    #[must_use]
    pub fn msix_function_masked(&self) -> bool {
        self.msix.function_masked()
    }

    /// MSI-X table entry `v`.
    #[must_use]
    pub fn msix_entry(&self, v: u16) -> Option<MsixEntry> {
        self.msix.entry(v)
    }

    /// Whether a message for vector `v` would be held back now (function or entry masked);
    /// `true` for a vector the table does not have.
    #[must_use]
    pub fn msix_vector_masked(&self, v: u16) -> bool {
        self.msix.function_masked() || self.msix.entry(v).is_none_or(|e| e.masked())
    }

    /// Whether vector `v`'s pending bit is set.
    #[must_use]
    pub fn msix_pending(&self, v: u16) -> bool {
        self.msix.pending(v)
    }

    /// The ISR status byte, without clearing it.
    #[must_use]
    pub fn isr(&self) -> u8 {
        self.common.peek_isr()
    }

    // --- Device-side notifications ------------------------------------------------------

    /// Queue `q` has new used buffers (and the queue says the driver wants to know): returns
    /// the MSI-X vector to signal now, if any.
    ///
    /// With MSI-X disabled the ISR queue bit is set instead (the function has no INTx pin, so
    /// nothing is signalled); with a masked vector its pending bit is set and the message goes
    /// out, as [`Event::Interrupt`], when it is unmasked.
    pub fn queue_interrupt(&mut self, q: u16) -> Option<u16> {
        let vector = self.common.queue(q)?.msix_vector;
        self.interrupt(vector, VIRTIO_PCI_ISR_QUEUE)
    }

    /// The device configuration changed: bumps `config_generation` and returns the MSI-X
    /// vector to signal now, if any.
    pub fn config_interrupt(&mut self) -> Option<u16> {
        self.common.bump_generation();
        self.interrupt(self.common.config_vector(), VIRTIO_PCI_ISR_CONFIG)
    }

    /// The device hit an error it cannot recover from (a queue it cannot use): sets
    /// `NEEDS_RESET` and, once the driver is running, sends a configuration change
    /// notification (virtio 1.2 section 2.1.2). Returns the vector to signal, if any.
    pub fn set_needs_reset(&mut self) -> Option<u16> {
        self.common.set_needs_reset();
        if self.driver_ok() {
            self.interrupt(self.common.config_vector(), VIRTIO_PCI_ISR_CONFIG)
        } else {
            None
        }
    }

    fn interrupt(&mut self, vector: u16, isr: u8) -> Option<u16> {
        if !self.msix.enabled() {
            self.common.raise_isr(isr);
            return None;
        }
        if vector == VIRTIO_MSI_NO_VECTOR {
            return None;
        }
        self.msix.trigger(vector)
    }

    // --- Host side ----------------------------------------------------------------------

    /// What the host does when a VFIO user enables (or disables) MSI-X with `SET_IRQS`: sets
    /// the capability's enable bit and clears the function mask. Vectors stay as masked as
    /// they were; unmask those that have an eventfd with [`host_msix_mask`]. Returns the
    /// pending vectors this lets through.
    ///
    /// [`host_msix_mask`]: Self::host_msix_mask
    pub fn host_msix_enable(&mut self, enabled: bool) -> Vec<Event> {
        let at = self.config.caps().msix + PCI_MSIX_FLAGS;
        let mut control =
            self.config.u16_at(at) & !(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
        if enabled {
            control |= PCI_MSIX_FLAGS_ENABLE;
        }
        self.config.put(at, &control.to_le_bytes());
        self.sync_msix_control()
    }

    /// Mask or unmask MSI-X vector `v`, as the host does when a VFIO user assigns or removes
    /// its eventfd. Returns the pending vector this lets through, if any.
    pub fn host_msix_mask(&mut self, v: u16, masked: bool) -> Vec<Event> {
        self.msix.set_masked(v, masked);
        self.release_pending()
    }

    /// Function reset (`VFIO_DEVICE_RESET`): the virtio state goes back to its initial values
    /// and pending interrupts are dropped. As with vfio-pci, which saves config space before
    /// the reset and restores it after (`pci_try_reset_function`), the command register, BARs
    /// and MSI-X programming stay. Returns [`Event::Reset`]: stop and forget every queue.
    pub fn reset(&mut self) -> Vec<Event> {
        self.common.reset();
        self.msix.clear_pending();
        vec![Event::Reset]
    }

    // --- Region access (the vfio-pci view) ----------------------------------------------

    /// Read `data.len()` bytes at `offset` of region `region`, as a VFIO user's pread does.
    /// Returns the bytes read (fewer at the end of a BAR).
    ///
    /// As vfio-pci: the MSI-X table reads as all ones (the host owns it); BAR accesses need
    /// memory space enabled.
    pub fn region_read(
        &mut self,
        region: RegionIndex,
        offset: u64,
        data: &mut [u8],
    ) -> Result<usize, AccessError> {
        match region {
            RegionIndex::Config => {
                self.check_config_range(offset, data.len())?;
                self.read_config_space(offset, data);
                Ok(data.len())
            }
            _ => {
                let n = self.check_bar_access(region, offset, data.len())?;
                let data = data.get_mut(..n).unwrap_or_default();
                for (at, start, size) in pieces(offset, n, 8) {
                    let Some(piece) = data.get_mut(start..start + size) else {
                        break;
                    };
                    if self.layout.msix_table.relative(at).is_some() {
                        piece.fill(u8::MAX);
                    } else {
                        self.bar_piece_read(at, piece);
                    }
                }
                Ok(n)
            }
        }
    }

    /// Write `data` at `offset` of region `region`, as a VFIO user's pwrite does. Returns the
    /// bytes written and the events to act on.
    ///
    /// As vfio-pci: writes to the MSI-X table and to the MSI-X capability are dropped (the
    /// host owns them, and the user programs MSI-X with `SET_IRQS`); BAR accesses need memory
    /// space enabled.
    pub fn region_write(
        &mut self,
        region: RegionIndex,
        offset: u64,
        data: &[u8],
    ) -> Result<(usize, Vec<Event>), AccessError> {
        let mut events = Vec::new();
        match region {
            RegionIndex::Config => {
                self.check_config_range(offset, data.len())?;
                let msix = self.config.caps().msix;
                let msix_cap = msix..msix + PCI_CAP_MSIX_SIZEOF;
                for (at, start, size) in pieces(offset, data.len(), 4) {
                    let Some(piece) = data.get(start..start + size) else {
                        break;
                    };
                    let at_usize = usize::try_from(at).unwrap_or(usize::MAX);
                    let end = at_usize.saturating_add(size);
                    if at_usize < msix_cap.end && msix_cap.start < end {
                        continue;
                    }
                    events.extend(self.write_config_space(at, piece));
                }
                Ok((data.len(), events))
            }
            _ => {
                let n = self.check_bar_access(region, offset, data.len())?;
                let data = data.get(..n).unwrap_or_default();
                for (at, start, size) in pieces(offset, n, 8) {
                    let Some(piece) = data.get(start..start + size) else {
                        break;
                    };
                    if self.layout.msix_table.relative(at).is_none() {
                        self.bar_piece_write(at, piece, &mut events);
                    }
                }
                Ok((n, events))
            }
        }
    }

    fn check_config_range(&self, offset: u64, len: usize) -> Result<(), AccessError> {
        let size = u64::try_from(self.config.len()).unwrap_or(0);
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(AccessError::ConfigOutOfRange { offset, len }),
        }
    }

    /// The number of bytes of a BAR access that fit the BAR.
    fn check_bar_access(
        &self,
        region: RegionIndex,
        offset: u64,
        len: usize,
    ) -> Result<usize, AccessError> {
        if region.bar() != Some(VIRTIO_BAR) {
            return Err(AccessError::NoRegion(region));
        }
        let size = self.layout.bar_size;
        if offset >= size {
            return Err(AccessError::BarOutOfRange { offset, size });
        }
        if !self.memory_enabled() {
            return Err(AccessError::MemoryDisabled);
        }
        let room = usize::try_from(size - offset).unwrap_or(usize::MAX);
        Ok(len.min(room))
    }

    // --- Config space (the function's own view) -----------------------------------------

    /// Read config space at `offset`. Bytes past its end read as zero. Reading the virtio PCI
    /// configuration access window's data performs the BAR read it describes.
    pub fn read_config_space(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let window = self.cfg_window();
        for (at, start, size) in pieces(offset, data.len(), 4) {
            let Some(piece) = data.get_mut(start..start + size) else {
                break;
            };
            let Ok(at) = usize::try_from(at) else {
                piece.fill(0);
                continue;
            };
            if at < window.end && window.start < at.saturating_add(size) {
                self.window_read();
            }
            self.config.read(at, piece);
        }
    }

    /// Write config space at `offset`. Only writable bits change (command, BAR addresses,
    /// cache line size, interrupt line, MSI-X enable and function mask, PCI Express device
    /// control, the virtio access window); the rest of the write is dropped. Returns the
    /// events to act on: released MSI-X vectors, a function reset, or what a BAR write
    /// through the access window caused.
    pub fn write_config_space(&mut self, offset: u64, data: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        let caps = self.config.caps();
        let window = self.cfg_window();
        let msix_control = caps.msix + PCI_MSIX_FLAGS;
        let devctl = caps.pcie + PCI_EXP_DEVCTL;
        for (at, start, size) in pieces(offset, data.len(), 4) {
            let (Ok(at), Some(piece)) = (usize::try_from(at), data.get(start..start + size)) else {
                break;
            };
            let end = at.saturating_add(size);
            let touches = |reg: usize, len: usize| at < reg + len && reg < end;
            self.config.write(at, piece);
            if touches(msix_control, 2) {
                events.extend(self.sync_msix_control());
            }
            if touches(devctl, 2) {
                // Initiate function level reset: the bit reads back zero.
                let mut bytes = [0u8; 2];
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = piece
                        .get((devctl + i).wrapping_sub(at))
                        .copied()
                        .unwrap_or(0);
                }
                let written = u16::from_le_bytes(bytes);
                let flr_byte = devctl + 1;
                if at <= flr_byte && flr_byte < end && written & PCI_EXP_DEVCTL_BCR_FLR != 0 {
                    debug!("virtio-pci: function level reset");
                    events.extend(self.reset());
                }
            }
            if at < window.end && window.start < end {
                self.window_write(&mut events);
            }
        }
        events
    }

    fn cfg_window(&self) -> std::ops::Range<usize> {
        let data = self.config.caps().pci_cfg + VIRTIO_PCI_CFG_CAP_DATA;
        data..data + 4
    }

    /// The BAR access the virtio PCI configuration access capability describes: its offset
    /// and length, if valid (BAR0, length 1, 2 or 4, offset aligned to it, inside the BAR).
    fn window_target(&self) -> Option<(u64, usize)> {
        let cap = self.config.caps().pci_cfg;
        let bar = self.config.u8_at(cap + VIRTIO_PCI_CAP_BAR);
        let offset = u64::from(self.config.u32_at(cap + VIRTIO_PCI_CAP_OFFSET));
        let len = self.config.u32_at(cap + VIRTIO_PCI_CAP_LENGTH);
        let len_u64 = u64::from(len);
        let ok = bar == VIRTIO_BAR
            && matches!(len, 1 | 2 | 4)
            && offset % len_u64 == 0
            && offset + len_u64 <= self.layout.bar_size;
        ok.then(|| (offset, usize::try_from(len).unwrap_or(0)))
    }

    fn window_read(&mut self) {
        let Some((offset, len)) = self.window_target() else {
            return;
        };
        let mut buf = [0u8; 4];
        if let Some(piece) = buf.get_mut(..len) {
            self.bar_piece_read(offset, piece);
        }
        let window = self.cfg_window();
        self.config.put(window.start, &buf);
    }

    fn window_write(&mut self, events: &mut Vec<Event>) {
        let Some((offset, len)) = self.window_target() else {
            return;
        };
        let mut buf = [0u8; 4];
        self.config.read(self.cfg_window().start, &mut buf);
        if let Some(piece) = buf.get(..len) {
            self.bar_piece_write(offset, piece, events);
        }
    }

    fn sync_msix_control(&mut self) -> Vec<Event> {
        let control = self.config.u16_at(self.config.caps().msix + PCI_MSIX_FLAGS);
        self.msix.set_control(
            control & PCI_MSIX_FLAGS_ENABLE != 0,
            control & PCI_MSIX_FLAGS_MASKALL != 0,
        );
        self.release_pending()
    }

    fn release_pending(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        self.msix
            .release_pending(|v| events.push(Event::Interrupt(v)));
        events
    }

    // --- BAR access (the function's own view) -------------------------------------------

    /// Read BAR `bar` at `offset`, as the device sees a memory read (the MSI-X table included,
    /// memory enable not checked). Bytes outside the BAR or any register read as zero.
    pub fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != VIRTIO_BAR {
            return;
        }
        for (at, start, size) in pieces(offset, data.len(), 8) {
            if let Some(piece) = data.get_mut(start..start + size) {
                self.bar_piece_read(at, piece);
            }
        }
    }

    /// Write BAR `bar` at `offset`, as the device sees a memory write. Writes outside any
    /// register, or of a width the register does not take, are dropped. Returns the events to
    /// act on.
    pub fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        if bar != VIRTIO_BAR {
            return events;
        }
        for (at, start, size) in pieces(offset, data.len(), 8) {
            if let Some(piece) = data.get(start..start + size) {
                self.bar_piece_write(at, piece, &mut events);
            }
        }
        events
    }

    /// One naturally aligned access of at most 8 bytes: it never crosses an area.
    fn bar_piece_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let l = self.layout;
        if let Some(rel) = l.common.relative(offset) {
            let snapshot = self.common.snapshot(self.device.config_generation());
            if let Ok(rel) = usize::try_from(rel) {
                crate::virtio::config::read_config(
                    &snapshot,
                    u32::try_from(rel).unwrap_or(u32::MAX),
                    data,
                );
            }
        } else if let Some(rel) = l.isr.relative(offset) {
            if rel == 0 {
                if let Some(first) = data.first_mut() {
                    *first = self.common.take_isr();
                }
            }
        } else if let Some(rel) = l.device.relative(offset) {
            self.device
                .read_config(u32::try_from(rel).unwrap_or(u32::MAX), data);
        } else if let Some(rel) = l.msix_table.relative(offset) {
            self.msix.read_table(rel, data);
        } else if let Some(rel) = l.msix_pba.relative(offset) {
            self.msix.read_pba(rel, data);
        }
        // Doorbells and gaps read as zero.
    }

    fn bar_piece_write(&mut self, offset: u64, data: &[u8], events: &mut Vec<Event>) {
        let l = self.layout;
        if let Some(rel) = l.common.relative(offset) {
            let rel = usize::try_from(rel).unwrap_or(usize::MAX);
            events.extend(self.common.write(rel, data, l.msix_vectors));
        } else if l.notify.relative(offset).is_some() {
            // Every doorbell the write covers rings (an 8-byte write may cover two).
            let before = events.len();
            for i in 0..data.len() {
                let at = offset.saturating_add(u64::try_from(i).unwrap_or(u64::MAX));
                if let Some(q) = l.queue_for_doorbell(RegionIndex::Bar0, at) {
                    events.push(Event::QueueNotify(q));
                }
            }
            if events.len() == before {
                debug!("virtio-pci: doorbell write at {offset:#x} matches no queue");
            }
        } else if let Some(rel) = l.msix_table.relative(offset) {
            self.msix.write_table(rel, data);
            events.extend(self.release_pending());
        } else {
            // ISR, device configuration (no writable field is offered), PBA and gaps.
            debug!(
                "virtio-pci: write of {} bytes at BAR offset {offset:#x} dropped",
                data.len()
            );
        }
    }
}

/// A `VIRTIO_CONFIG_S_*` bit as the one-byte status holds it.
fn status_u8(bit: u32) -> u8 {
    u8::try_from(bit).unwrap_or(0)
}
