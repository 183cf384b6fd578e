//! PCI config space of the function, built as data: a type 0 header, the capability list, and
//! a write mask saying which bits software may change (everything else is read-only, and
//! writes to it are dropped as hardware drops them).
//!
//! Capability list (each entry's next pointer leads to the one below):
//!
//! | offset | capability |
//! |---|---|
//! | 0x40 | virtio common configuration (BAR0) |
//! | 0x50 | virtio notifications (BAR0), with `notify_off_multiplier` |
//! | 0x64 | virtio ISR status (BAR0) |
//! | 0x74 | virtio device configuration (BAR0) |
//! | 0x84 | virtio PCI configuration access window |
//! | 0x98 | MSI-X: table and PBA in BAR0 |
//! | 0xa4 | PCI Express endpoint, version 2, FLR capable |
//!
//! Extended config space (0x100 and up) holds no capability and reads as zero.

use super::layout::{Area, Layout, NOTIFY_OFF_MULTIPLIER, VIRTIO_BAR};
use super::regs::*;

/// Where each capability sits in config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapOffsets {
    /// `VIRTIO_PCI_CAP_COMMON_CFG`.
    pub common: usize,
    /// `VIRTIO_PCI_CAP_NOTIFY_CFG`.
    pub notify: usize,
    /// `VIRTIO_PCI_CAP_ISR_CFG`.
    pub isr: usize,
    /// `VIRTIO_PCI_CAP_DEVICE_CFG`.
    pub device: usize,
    /// `VIRTIO_PCI_CAP_PCI_CFG`.
    pub pci_cfg: usize,
    /// MSI-X.
    pub msix: usize,
    /// PCI Express.
    pub pcie: usize,
}

/// Config space bytes and their write mask.
#[derive(Clone, Debug)]
pub(crate) struct ConfigSpace {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    caps: CapOffsets,
}

/// Lays out the capability list.
struct Builder {
    space: ConfigSpace,
    next: usize,
    last: Option<usize>,
}

impl Builder {
    /// Append a capability of `len` bytes with id `id`; returns its offset.
    fn cap(&mut self, id: u8, len: usize) -> usize {
        let at = self.next;
        self.space.put(at + PCI_CAP_LIST_ID, &[id]);
        match self.last {
            Some(prev) => self.space.put(prev + PCI_CAP_LIST_NEXT, &[pointer(at)]),
            None => self.space.put(PCI_CAPABILITY_LIST, &[pointer(at)]),
        }
        self.last = Some(at);
        // Capabilities are dword aligned.
        self.next = (at + len).next_multiple_of(4);
        at
    }

    /// Append a virtio vendor capability pointing at `area` of the BAR.
    fn virtio_cap(&mut self, cfg_type: u8, len: usize, area: Area) -> usize {
        let at = self.cap(PCI_CAP_ID_VNDR, len);
        let s = &mut self.space;
        s.put(at + VIRTIO_PCI_CAP_LEN, &[u8::try_from(len).unwrap_or(0)]);
        s.put(at + VIRTIO_PCI_CAP_CFG_TYPE, &[cfg_type]);
        s.put(at + VIRTIO_PCI_CAP_BAR, &[VIRTIO_BAR]);
        s.put(
            at + VIRTIO_PCI_CAP_OFFSET,
            &u32_of(area.offset).to_le_bytes(),
        );
        s.put(at + VIRTIO_PCI_CAP_LENGTH, &u32_of(area.len).to_le_bytes());
        at
    }
}

/// A config space offset as a capability pointer (always below 256 here).
fn pointer(offset: usize) -> u8 {
    u8::try_from(offset).unwrap_or(0)
}

/// A BAR offset or length as the 32-bit field that holds it (the BAR is at most 64 KiB).
fn u32_of(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

impl ConfigSpace {
    /// The config space of a modern virtio device with id `virtio_id`, laid out as `layout`,
    /// whose device-specific configuration is `device_cfg_len` bytes long.
    pub(crate) fn new(layout: &Layout, virtio_id: u16, device_cfg_len: u64) -> Self {
        let space = Self {
            bytes: vec![0; PCI_CFG_SPACE_EXP_SIZE],
            wmask: vec![0; PCI_CFG_SPACE_EXP_SIZE],
            caps: CapOffsets {
                common: 0,
                notify: 0,
                isr: 0,
                device: 0,
                pci_cfg: 0,
                msix: 0,
                pcie: 0,
            },
        };
        let mut b = Builder {
            space,
            next: PCI_STD_HEADER_SIZEOF,
            last: None,
        };

        // Header.
        let device_id = VIRTIO_PCI_MODERN_DEVICE_ID_BASE.wrapping_add(virtio_id);
        let s = &mut b.space;
        s.put(PCI_VENDOR_ID, &VIRTIO_PCI_VENDOR_ID.to_le_bytes());
        s.put(PCI_DEVICE_ID, &device_id.to_le_bytes());
        // As vfio-pci shows it after pci_enable_device(): memory decoding on.
        s.put(PCI_COMMAND, &PCI_COMMAND_MEMORY.to_le_bytes());
        let command_rw = PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_PARITY
            | PCI_COMMAND_SERR
            | PCI_COMMAND_INTX_DISABLE;
        s.mask(PCI_COMMAND, &command_rw.to_le_bytes());
        s.put(PCI_STATUS, &PCI_STATUS_CAP_LIST.to_le_bytes());
        s.put(PCI_REVISION_ID, &[VIRTIO_PCI_MODERN_REVISION]);
        s.put(PCI_CLASS_PROG, &[0]);
        s.put(PCI_CLASS_DEVICE, &PCI_CLASS_STORAGE_SCSI.to_le_bytes());
        s.mask(PCI_CACHE_LINE_SIZE, &[u8::MAX]);
        s.put(PCI_HEADER_TYPE, &[PCI_HEADER_TYPE_NORMAL]);
        s.put(
            PCI_SUBSYSTEM_VENDOR_ID,
            &VIRTIO_PCI_SUBSYSTEM_VENDOR_ID.to_le_bytes(),
        );
        s.put(PCI_SUBSYSTEM_ID, &VIRTIO_PCI_SUBSYSTEM_ID.to_le_bytes());
        s.mask(PCI_INTERRUPT_LINE, &[u8::MAX]);
        // PCI_INTERRUPT_PIN stays 0: no INTx.

        // BAR0: 64-bit memory, non-prefetchable; the size shows in the bits that stay zero when
        // all ones are written. BAR1 is its upper half, fully writable (the BAR is under 4 GiB).
        let bar0 = PCI_BASE_ADDRESS_0 + usize::from(VIRTIO_BAR) * PCI_BAR_BYTES;
        let size_mask = !u32_of(layout.bar_size.saturating_sub(1)) & !PCI_BASE_ADDRESS_MEM_FLAGS;
        s.put(bar0, &PCI_BASE_ADDRESS_MEM_TYPE_64.to_le_bytes());
        s.mask(bar0, &size_mask.to_le_bytes());
        s.mask(bar0 + PCI_BAR_BYTES, &u32::MAX.to_le_bytes());

        // Capabilities.
        let common_len = Area {
            offset: layout.common.offset,
            len: u64::try_from(VIRTIO_PCI_COMMON_CFG_LEN).unwrap_or(0),
        };
        let device_area = Area {
            offset: layout.device.offset,
            len: device_cfg_len.min(layout.device.len),
        };
        let common = b.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_SIZEOF, common_len);
        let notify = b.virtio_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            VIRTIO_PCI_NOTIFY_CAP_SIZEOF,
            layout.notify,
        );
        b.space.put(
            notify + VIRTIO_PCI_NOTIFY_CAP_MULT,
            &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
        );
        let isr_area = Area {
            offset: layout.isr.offset,
            len: 1,
        };
        let isr = b.virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_SIZEOF, isr_area);
        let device = b.virtio_cap(
            VIRTIO_PCI_CAP_DEVICE_CFG,
            VIRTIO_PCI_CAP_SIZEOF,
            device_area,
        );
        // The access window: bar, offset, length and data are the driver's to write.
        let pci_cfg = b.virtio_cap(
            VIRTIO_PCI_CAP_PCI_CFG,
            VIRTIO_PCI_CFG_CAP_SIZEOF,
            Area { offset: 0, len: 0 },
        );
        let s = &mut b.space;
        s.put(pci_cfg + VIRTIO_PCI_CAP_BAR, &[0]);
        s.mask(pci_cfg + VIRTIO_PCI_CAP_BAR, &[u8::MAX]);
        s.mask(pci_cfg + VIRTIO_PCI_CAP_OFFSET, &u32::MAX.to_le_bytes());
        s.mask(pci_cfg + VIRTIO_PCI_CAP_LENGTH, &u32::MAX.to_le_bytes());
        s.mask(pci_cfg + VIRTIO_PCI_CFG_CAP_DATA, &u32::MAX.to_le_bytes());

        let msix = b.cap(PCI_CAP_ID_MSIX, PCI_CAP_MSIX_SIZEOF);
        let qsize = layout.msix_vectors.saturating_sub(1) & PCI_MSIX_FLAGS_QSIZE;
        let s = &mut b.space;
        s.put(msix + PCI_MSIX_FLAGS, &qsize.to_le_bytes());
        s.mask(
            msix + PCI_MSIX_FLAGS,
            &(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL).to_le_bytes(),
        );
        // Offsets are 8-byte aligned, so the BAR indicator fits in the low three bits.
        let bir = u32::from(VIRTIO_BAR);
        s.put(
            msix + PCI_MSIX_TABLE,
            &(u32_of(layout.msix_table.offset) | bir).to_le_bytes(),
        );
        s.put(
            msix + PCI_MSIX_PBA,
            &(u32_of(layout.msix_pba.offset) | bir).to_le_bytes(),
        );

        let pcie = b.cap(PCI_CAP_ID_EXP, PCI_CAP_EXP_ENDPOINT_SIZEOF_V2);
        let s = &mut b.space;
        s.put(
            pcie + PCI_EXP_FLAGS,
            &(PCI_EXP_FLAGS_VERS_2 | PCI_EXP_TYPE_ENDPOINT).to_le_bytes(),
        );
        s.put(pcie + PCI_EXP_DEVCAP, &PCI_EXP_DEVCAP_FLR.to_le_bytes());
        // Device control is the driver's, but for FLR (self-clearing, handled on write).
        s.mask(
            pcie + PCI_EXP_DEVCTL,
            &(!PCI_EXP_DEVCTL_BCR_FLR).to_le_bytes(),
        );
        s.put(
            pcie + PCI_EXP_LNKCAP,
            &(PCI_EXP_LNKCAP_SLS_2_5GB | PCI_EXP_LNKCAP_MLW_X1).to_le_bytes(),
        );
        s.put(
            pcie + PCI_EXP_LNKSTA,
            &(PCI_EXP_LNKSTA_CLS_2_5GB | PCI_EXP_LNKSTA_NLW_X1).to_le_bytes(),
        );

        let mut space = b.space;
        space.caps = CapOffsets {
            common,
            notify,
            isr,
            device,
            pci_cfg,
            msix,
            pcie,
        };
        space
    }

    /// Store `bytes` at `offset`, ignoring the write mask (building, device-side updates).
    pub(crate) fn put(&mut self, offset: usize, bytes: &[u8]) {
        crate::virtio::config::put_bytes(&mut self.bytes, offset, bytes);
    }

    fn mask(&mut self, offset: usize, bits: &[u8]) {
        crate::virtio::config::put_bytes(&mut self.wmask, offset, bits);
    }

    pub(crate) fn caps(&self) -> CapOffsets {
        self.caps
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Copy out config space at `offset`; bytes past the end read as zero.
    pub(crate) fn read(&self, offset: usize, data: &mut [u8]) {
        data.fill(0);
        if let Some(src) = self.bytes.get(offset..) {
            let n = src.len().min(data.len());
            if let (Some(dst), Some(src)) = (data.get_mut(..n), src.get(..n)) {
                dst.copy_from_slice(src);
            }
        }
    }

    /// A software write: only the bits of the write mask change.
    pub(crate) fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i) else {
                return;
            };
            if let (Some(byte), Some(&mask)) = (self.bytes.get_mut(at), self.wmask.get(at)) {
                *byte = (*byte & !mask) | (value & mask);
            }
        }
    }

    pub(crate) fn u8_at(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    pub(crate) fn u16_at(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub(crate) fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }
}
