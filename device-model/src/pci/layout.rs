//! Where everything sits: the BAR layout of the function, and its regions and interrupts as a
//! VFIO user of `vfio-pci` sees them.
//!
//! Everything the device exposes lives in BAR0, a 64-bit non-prefetchable memory BAR (BAR1 is
//! its upper half): the virtio common configuration, ISR status, device configuration and
//! notification areas, then the MSI-X table and PBA, each starting on a 4 KiB boundary:
//!
//! | offset | size | contents |
//! |---|---|---|
//! | 0x0000 | 4 KiB | common configuration (`struct virtio_pci_common_cfg`) |
//! | 0x1000 | 4 KiB | ISR status (1 byte, reading clears it) |
//! | 0x2000 | 4 KiB | device configuration (`struct virtio_blk_config`) |
//! | 0x3000 | queues x 4, rounded up to 4 KiB | doorbells: queue `q` at `0x3000 + 4 q` |
//! | then | vectors x 16, rounded up | MSI-X table (one vector per queue, plus config changes) |
//! | then | vectors / 8, rounded up | MSI-X pending bit array |
//!
//! and the BAR size is the next power of two (at least 16 KiB).
//!
//! The region and interrupt tables follow Linux's `vfio_pci_core_ioctl` for a PCI Express
//! endpoint with no INTx pin, no MSI capability, an MSI-X capability, no expansion ROM and no
//! VGA: nine regions (BAR0-5, ROM, CONFIG, VGA), five interrupt indexes (INTX, MSI, MSIX, ERR,
//! REQ). Nothing can be mmapped: every access goes through region reads and writes.

use super::regs::{PCI_CFG_SPACE_EXP_SIZE, PCI_MSIX_ENTRY_SIZE, PCI_STD_NUM_BARS};
use super::Error;

/// Page granularity of the areas inside the BAR.
pub const AREA_ALIGN: u64 = 4096;
/// The smallest BAR size.
pub const MIN_BAR_SIZE: u64 = 16 << 10;
/// Bytes between two queues' doorbells (`notify_off_multiplier`); `queue_notify_off` of queue
/// `q` is `q`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// The BAR that holds everything.
pub const VIRTIO_BAR: u8 = 0;
/// The most queues the function can have: one MSI-X vector each and one for config changes
/// must fit the 2048 entries of an MSI-X table.
pub const MAX_QUEUES: u16 = 2047;
/// `vfio-pci` encodes the region index in the top bits of the file offset
/// (`VFIO_PCI_OFFSET_SHIFT`): region `i` starts at `i << 40`.
pub const REGION_OFFSET_SHIFT: u32 = 40;
/// The offset bits inside a region (`VFIO_PCI_OFFSET_MASK`).
pub const REGION_OFFSET_MASK: u64 = (1 << REGION_OFFSET_SHIFT) - 1;

/// An area of the BAR: `offset` from the BAR's start, `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Area {
    /// Offset from the start of the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Area {
    /// Whether `offset` (from the BAR's start) falls inside the area; returns the offset inside
    /// the area.
    #[must_use]
    pub fn relative(&self, offset: u64) -> Option<u64> {
        let rel = offset.checked_sub(self.offset)?;
        (rel < self.len).then_some(rel)
    }

    /// The offset just past the area.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// The layout of BAR0 for a function with a given number of queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Number of MSI-X vectors: one per queue, one for config changes.
    pub msix_vectors: u16,
    /// Size of BAR0, a power of two.
    pub bar_size: u64,
    /// `struct virtio_pci_common_cfg`.
    pub common: Area,
    /// ISR status.
    pub isr: Area,
    /// Device-specific configuration.
    pub device: Area,
    /// Doorbells.
    pub notify: Area,
    /// MSI-X table.
    pub msix_table: Area,
    /// MSI-X pending bit array.
    pub msix_pba: Area,
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    value.checked_next_multiple_of(align)
}

impl Layout {
    /// The layout for `num_queues` queues (1 ..= [`MAX_QUEUES`]).
    pub fn new(num_queues: u16) -> Result<Self, Error> {
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(Error::QueueCount(num_queues));
        }
        let msix_vectors = num_queues
            .checked_add(1)
            .ok_or(Error::QueueCount(num_queues))?;
        let area = |offset: u64, len: u64| -> Result<(Area, u64), Error> {
            let span = align_up(len.max(1), AREA_ALIGN).ok_or(Error::QueueCount(num_queues))?;
            let next = offset
                .checked_add(span)
                .ok_or(Error::QueueCount(num_queues))?;
            Ok((Area { offset, len }, next))
        };
        let vectors = u64::from(msix_vectors);
        let entry =
            u64::try_from(PCI_MSIX_ENTRY_SIZE).map_err(|_| Error::QueueCount(num_queues))?;
        let (common, next) = area(0, AREA_ALIGN)?;
        let (isr, next) = area(next, AREA_ALIGN)?;
        let (device, next) = area(next, AREA_ALIGN)?;
        let (notify, next) = area(
            next,
            u64::from(num_queues) * u64::from(NOTIFY_OFF_MULTIPLIER),
        )?;
        let (msix_table, next) = area(next, vectors * entry)?;
        // One bit per vector, in whole qwords.
        let (msix_pba, end) = area(next, vectors.div_ceil(u64::from(u64::BITS)) * 8)?;
        let bar_size = end
            .checked_next_power_of_two()
            .ok_or(Error::QueueCount(num_queues))?
            .max(MIN_BAR_SIZE);
        Ok(Self {
            num_queues,
            msix_vectors,
            bar_size,
            common,
            isr,
            device,
            notify,
            msix_table,
            msix_pba,
        })
    }

    /// The doorbell of queue `q`: the region and the offset inside it to write the queue index
    /// to (for `VFIO_DEVICE_IOEVENTFD` registrations, 2 bytes wide).
    #[must_use]
    pub fn doorbell(&self, q: u16) -> Option<(RegionIndex, u64)> {
        (q < self.num_queues).then(|| {
            (
                RegionIndex::Bar0,
                self.notify.offset + u64::from(q) * u64::from(NOTIFY_OFF_MULTIPLIER),
            )
        })
    }

    /// The queue whose doorbell is at `offset` of `region`, if any.
    #[must_use]
    pub fn queue_for_doorbell(&self, region: RegionIndex, offset: u64) -> Option<u16> {
        if region != RegionIndex::Bar0 {
            return None;
        }
        let rel = self.notify.relative(offset)?;
        let mult = u64::from(NOTIFY_OFF_MULTIPLIER);
        if rel % mult != 0 {
            return None;
        }
        let q = u16::try_from(rel / mult).ok()?;
        (q < self.num_queues).then_some(q)
    }

    /// Size of the config region: PCI Express extended config space.
    #[must_use]
    pub fn config_size(&self) -> u64 {
        u64::try_from(PCI_CFG_SPACE_EXP_SIZE).unwrap_or(u64::MAX)
    }

    /// What `VFIO_DEVICE_GET_REGION_INFO` reports for `index`; `None` where vfio-pci answers
    /// `-EINVAL` (the VGA region of a device that is not VGA).
    #[must_use]
    pub fn region_info(&self, index: RegionIndex) -> Option<RegionInfo> {
        let rw = RegionFlags {
            read: true,
            write: true,
            mmap: false,
        };
        let (size, flags) = match index {
            RegionIndex::Bar0 => (self.bar_size, rw),
            // The upper half of BAR0, unused BARs and the absent ROM: size 0, no flags.
            RegionIndex::Bar1
            | RegionIndex::Bar2
            | RegionIndex::Bar3
            | RegionIndex::Bar4
            | RegionIndex::Bar5
            | RegionIndex::Rom => (0, RegionFlags::default()),
            RegionIndex::Config => (self.config_size(), rw),
            RegionIndex::Vga => return None,
        };
        Some(RegionInfo { index, size, flags })
    }

    /// What `VFIO_DEVICE_GET_IRQ_INFO` reports for `index`.
    ///
    /// As vfio-pci does (`vfio_pci_get_irq_count`, `vfio_pci_ioctl_get_irq_info`): INTX has
    /// count 0 (interrupt pin 0) and is maskable and auto-masked; MSI has count 0 (no MSI
    /// capability); MSIX has one per table entry; ERR (a PCI Express device) and REQ have 1.
    /// All are eventfd-capable; all but INTX are `NORESIZE`.
    #[must_use]
    pub fn irq_info(&self, index: IrqIndex) -> IrqInfo {
        let fixed = IrqFlags {
            eventfd: true,
            maskable: false,
            automasked: false,
            noresize: true,
        };
        let (count, flags) = match index {
            IrqIndex::Intx => (
                0,
                IrqFlags {
                    eventfd: true,
                    maskable: true,
                    automasked: true,
                    noresize: false,
                },
            ),
            IrqIndex::Msi => (0, fixed),
            IrqIndex::Msix => (u32::from(self.msix_vectors), fixed),
            IrqIndex::Err | IrqIndex::Req => (1, fixed),
        };
        IrqInfo {
            index,
            count,
            flags,
        }
    }
}

/// The region indexes of a vfio-pci device (`VFIO_PCI_*_REGION_INDEX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum RegionIndex {
    /// BAR0: everything this function exposes.
    Bar0 = 0,
    /// BAR1: the upper half of BAR0 (size 0).
    Bar1 = 1,
    /// BAR2 (unused).
    Bar2 = 2,
    /// BAR3 (unused).
    Bar3 = 3,
    /// BAR4 (unused).
    Bar4 = 4,
    /// BAR5 (unused).
    Bar5 = 5,
    /// Expansion ROM (none).
    Rom = 6,
    /// PCI config space.
    Config = 7,
    /// VGA (not a VGA device: `-EINVAL`).
    Vga = 8,
}

impl RegionIndex {
    /// Every region, in index order (`VFIO_PCI_NUM_REGIONS` of them).
    pub const ALL: [Self; 9] = [
        Self::Bar0,
        Self::Bar1,
        Self::Bar2,
        Self::Bar3,
        Self::Bar4,
        Self::Bar5,
        Self::Rom,
        Self::Config,
        Self::Vga,
    ];

    /// The region with index `index`.
    #[must_use]
    pub fn from_index(index: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.index() == index)
    }

    /// The numeric index.
    #[must_use]
    pub fn index(self) -> u32 {
        self as u32
    }

    /// The BAR number, for BAR regions.
    #[must_use]
    pub fn bar(self) -> Option<u8> {
        let i = self.index();
        if usize::try_from(i).is_ok_and(|i| i < PCI_STD_NUM_BARS) {
            u8::try_from(i).ok()
        } else {
            None
        }
    }

    /// Where the region starts in the device file (`index << 40`).
    #[must_use]
    pub fn file_offset(self) -> u64 {
        u64::from(self.index()) << REGION_OFFSET_SHIFT
    }

    /// Split a device file offset into the region index and the offset inside the region.
    /// The index is returned raw: it may name no region.
    #[must_use]
    pub fn split_file_offset(offset: u64) -> (u64, u64) {
        (offset >> REGION_OFFSET_SHIFT, offset & REGION_OFFSET_MASK)
    }
}

/// Access rights of a region (`VFIO_REGION_INFO_FLAG_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionFlags {
    /// Region supports read.
    pub read: bool,
    /// Region supports write.
    pub write: bool,
    /// Region supports mmap (never, here).
    pub mmap: bool,
}

/// One region as `VFIO_DEVICE_GET_REGION_INFO` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region.
    pub index: RegionIndex,
    /// Its size in bytes (0 for an absent BAR or ROM).
    pub size: u64,
    /// Its access rights.
    pub flags: RegionFlags,
}

/// The interrupt indexes of a vfio-pci device (`VFIO_PCI_*_IRQ_INDEX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum IrqIndex {
    /// Legacy INTx (no pin here: count 0).
    Intx = 0,
    /// MSI (no capability: count 0).
    Msi = 1,
    /// MSI-X: one per vector.
    Msix = 2,
    /// PCI Express error reporting.
    Err = 3,
    /// Device request (the host wants the device back).
    Req = 4,
}

impl IrqIndex {
    /// Every interrupt index, in order (`VFIO_PCI_NUM_IRQS` of them).
    pub const ALL: [Self; 5] = [Self::Intx, Self::Msi, Self::Msix, Self::Err, Self::Req];

    /// The index with number `index`.
    #[must_use]
    pub fn from_index(index: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.index() == index)
    }

    /// The numeric index.
    #[must_use]
    pub fn index(self) -> u32 {
        self as u32
    }
}

/// Properties of an interrupt index (`VFIO_IRQ_INFO_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqFlags {
    /// Can signal an eventfd.
    pub eventfd: bool,
    /// Can be masked and unmasked by the user.
    pub maskable: bool,
    /// Is masked by the device when it fires (level-triggered INTx).
    pub automasked: bool,
    /// The number of vectors cannot change while enabled.
    pub noresize: bool,
}

/// One interrupt index as `VFIO_DEVICE_GET_IRQ_INFO` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// The index.
    pub index: IrqIndex,
    /// Number of interrupts in it.
    pub count: u32,
    /// Its properties.
    pub flags: IrqFlags,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_queue() {
        let l = Layout::new(1).unwrap();
        assert_eq!(
            l.common,
            Area {
                offset: 0,
                len: AREA_ALIGN
            }
        );
        assert_eq!(l.isr.offset, 0x1000);
        assert_eq!(l.device.offset, 0x2000);
        assert_eq!(
            l.notify,
            Area {
                offset: 0x3000,
                len: 4
            }
        );
        assert_eq!(
            l.msix_table,
            Area {
                offset: 0x4000,
                len: 32
            }
        );
        assert_eq!(
            l.msix_pba,
            Area {
                offset: 0x5000,
                len: 8
            }
        );
        assert_eq!(l.bar_size, 0x8000);
        assert_eq!(l.msix_vectors, 2);
    }

    #[test]
    fn many_queues() {
        use crate::pci::regs::PCI_MSIX_MAX_VECTORS;
        assert_eq!(usize::from(MAX_QUEUES) + 1, PCI_MSIX_MAX_VECTORS);
        let l = Layout::new(MAX_QUEUES).unwrap();
        assert_eq!(l.msix_vectors, 2048);
        assert_eq!(l.notify.len, 2047 * 4);
        assert_eq!(l.msix_table.offset, 0x5000);
        assert_eq!(l.msix_table.len, 2048 * 16);
        assert_eq!(
            l.msix_pba,
            Area {
                offset: 0xd000,
                len: 256
            }
        );
        assert_eq!(l.bar_size, 0x10000);
        assert!(l.msix_pba.end() <= l.bar_size);
        assert!(Layout::new(0).is_err());
        assert!(Layout::new(MAX_QUEUES + 1).is_err());
        assert!(Layout::new(u16::MAX).is_err());
    }

    #[test]
    fn doorbells() {
        let l = Layout::new(3).unwrap();
        for q in 0..3 {
            let (region, off) = l.doorbell(q).unwrap();
            assert_eq!(l.queue_for_doorbell(region, off), Some(q));
        }
        assert_eq!(l.doorbell(3), None);
        assert_eq!(l.queue_for_doorbell(RegionIndex::Bar0, 0x3000 + 12), None);
        assert_eq!(l.queue_for_doorbell(RegionIndex::Bar0, 0x3001), None);
        assert_eq!(l.queue_for_doorbell(RegionIndex::Bar2, 0x3000), None);
        assert_eq!(l.queue_for_doorbell(RegionIndex::Bar0, 0), None);
    }

    #[test]
    fn regions_and_irqs() {
        let l = Layout::new(2).unwrap();
        for (i, r) in RegionIndex::ALL.into_iter().enumerate() {
            assert_eq!(usize::try_from(r.index()).unwrap(), i);
            assert_eq!(RegionIndex::from_index(r.index()), Some(r));
            assert_eq!(
                RegionIndex::split_file_offset(r.file_offset() + 5),
                (i as u64, 5)
            );
        }
        assert_eq!(RegionIndex::from_index(9), None);
        let bar0 = l.region_info(RegionIndex::Bar0).unwrap();
        assert_eq!(bar0.size, l.bar_size);
        assert!(bar0.flags.read && bar0.flags.write && !bar0.flags.mmap);
        for r in [RegionIndex::Bar1, RegionIndex::Bar5, RegionIndex::Rom] {
            let info = l.region_info(r).unwrap();
            assert_eq!((info.size, info.flags), (0, RegionFlags::default()));
        }
        assert_eq!(l.region_info(RegionIndex::Config).unwrap().size, 4096);
        assert_eq!(l.region_info(RegionIndex::Vga), None);
        assert_eq!(RegionIndex::Config.bar(), None);
        assert_eq!(RegionIndex::Bar5.bar(), Some(5));

        let counts: Vec<u32> = IrqIndex::ALL.iter().map(|&i| l.irq_info(i).count).collect();
        assert_eq!(counts, [0, 0, 3, 1, 1]);
        let intx = l.irq_info(IrqIndex::Intx).flags;
        assert!(intx.eventfd && intx.maskable && intx.automasked && !intx.noresize);
        let msix = l.irq_info(IrqIndex::Msix).flags;
        assert!(msix.eventfd && !msix.maskable && msix.noresize);
        assert_eq!(IrqIndex::from_index(4), Some(IrqIndex::Req));
        assert_eq!(IrqIndex::from_index(5), None);
    }
}
