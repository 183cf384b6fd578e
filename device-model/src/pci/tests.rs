//! The function driven the way a VFIO user's driver drives it: config space walks, BAR
//! sizing, feature negotiation, queue setup, doorbells, MSI-X, reset, and a virtio-blk queue
//! served through the queue configuration the function produced.

use std::sync::Arc;

use proptest::prelude::*;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::*;
use super::*;
use crate::blk::aio::Engine;
use crate::blk::{AsyncQueue, BlkConfig, BlkDevice, FaultPolicy};
use crate::testing::{ram_blk, BlkRequest, SplitRing};
use crate::virtio::features::{feature_mask, features_mask, has_feature};

const DISK: u64 = 1 << 20;
const QSIZE: u16 = 16;
const NUM_QUEUES: u16 = 2;

fn status(bits: &[u32]) -> u8 {
    bits.iter().fold(0u8, |s, &b| s | u8::try_from(b).unwrap())
}

fn device(num_queues: u16) -> Arc<BlkDevice> {
    let cfg = BlkConfig {
        num_queues,
        queue_size: QSIZE,
        ..BlkConfig::default()
    };
    ram_blk(DISK, cfg)
}

fn function() -> VirtioPciFunction {
    VirtioPciFunction::new(device(NUM_QUEUES)).unwrap()
}

/// A driver's accessors, through the region interface a VFIO user has.
struct Drv {
    f: VirtioPciFunction,
}

impl Drv {
    fn new() -> Self {
        Self { f: function() }
    }

    fn cfg_read<const N: usize>(&mut self, off: usize) -> [u8; N] {
        let mut b = [0u8; N];
        let n = self
            .f
            .region_read(RegionIndex::Config, off as u64, &mut b)
            .unwrap();
        assert_eq!(n, N);
        b
    }
    fn cfg8(&mut self, off: usize) -> u8 {
        self.cfg_read::<1>(off)[0]
    }
    fn cfg16(&mut self, off: usize) -> u16 {
        u16::from_le_bytes(self.cfg_read(off))
    }
    fn cfg32(&mut self, off: usize) -> u32 {
        u32::from_le_bytes(self.cfg_read(off))
    }
    fn cfg_write(&mut self, off: usize, data: &[u8]) -> Vec<Event> {
        let (n, events) = self
            .f
            .region_write(RegionIndex::Config, off as u64, data)
            .unwrap();
        assert_eq!(n, data.len());
        events
    }

    fn bar_read<const N: usize>(&mut self, off: u64) -> [u8; N] {
        let mut b = [0u8; N];
        let n = self.f.region_read(RegionIndex::Bar0, off, &mut b).unwrap();
        assert_eq!(n, N);
        b
    }
    fn bar8(&mut self, off: u64) -> u8 {
        self.bar_read::<1>(off)[0]
    }
    fn bar16(&mut self, off: u64) -> u16 {
        u16::from_le_bytes(self.bar_read(off))
    }
    fn bar32(&mut self, off: u64) -> u32 {
        u32::from_le_bytes(self.bar_read(off))
    }
    fn bar64(&mut self, off: u64) -> u64 {
        u64::from_le_bytes(self.bar_read(off))
    }
    fn bar_write(&mut self, off: u64, data: &[u8]) -> Vec<Event> {
        let (n, events) = self.f.region_write(RegionIndex::Bar0, off, data).unwrap();
        assert_eq!(n, data.len());
        events
    }

    fn common(&self) -> u64 {
        self.f.layout().common.offset
    }
    fn c8(&mut self, field: usize) -> u8 {
        self.bar8(self.common() + field as u64)
    }
    fn c16(&mut self, field: usize) -> u16 {
        self.bar16(self.common() + field as u64)
    }
    fn c32(&mut self, field: usize) -> u32 {
        self.bar32(self.common() + field as u64)
    }
    fn cw8(&mut self, field: usize, v: u8) -> Vec<Event> {
        self.bar_write(self.common() + field as u64, &[v])
    }
    fn cw16(&mut self, field: usize, v: u16) -> Vec<Event> {
        self.bar_write(self.common() + field as u64, &v.to_le_bytes())
    }
    fn cw32(&mut self, field: usize, v: u32) -> Vec<Event> {
        self.bar_write(self.common() + field as u64, &v.to_le_bytes())
    }

    fn device_features(&mut self) -> u64 {
        self.cw32(VIRTIO_PCI_COMMON_DFSELECT, 0);
        let lo = self.c32(VIRTIO_PCI_COMMON_DF);
        self.cw32(VIRTIO_PCI_COMMON_DFSELECT, 1);
        let hi = self.c32(VIRTIO_PCI_COMMON_DF);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    fn set_driver_features(&mut self, features: u64) {
        self.cw32(VIRTIO_PCI_COMMON_GFSELECT, 0);
        self.cw32(VIRTIO_PCI_COMMON_GF, features as u32);
        self.cw32(VIRTIO_PCI_COMMON_GFSELECT, 1);
        self.cw32(VIRTIO_PCI_COMMON_GF, (features >> 32) as u32);
    }

    /// Reset, acknowledge, negotiate `features`; returns whether FEATURES_OK stuck.
    fn negotiate(&mut self, features: u64) -> bool {
        assert_eq!(self.cw8(VIRTIO_PCI_COMMON_STATUS, 0), [Event::Reset]);
        let mut s = status(&[VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER]);
        self.cw8(VIRTIO_PCI_COMMON_STATUS, s);
        self.set_driver_features(features);
        s |= status(&[VIRTIO_CONFIG_S_FEATURES_OK]);
        self.cw8(VIRTIO_PCI_COMMON_STATUS, s);
        self.c8(VIRTIO_PCI_COMMON_STATUS) & status(&[VIRTIO_CONFIG_S_FEATURES_OK]) != 0
    }

    /// Configure and enable queue `q`.
    fn setup_queue(&mut self, q: u16, size: u16, desc: u64, driver: u64, dev: u64, vector: u16) {
        self.cw16(VIRTIO_PCI_COMMON_Q_SELECT, q);
        self.cw16(VIRTIO_PCI_COMMON_Q_SIZE, size);
        for (lo, addr) in [
            (VIRTIO_PCI_COMMON_Q_DESCLO, desc),
            (VIRTIO_PCI_COMMON_Q_AVAILLO, driver),
            (VIRTIO_PCI_COMMON_Q_USEDLO, dev),
        ] {
            // Linux's vp_iowrite64_twopart: low half, then high half.
            self.cw32(lo, addr as u32);
            self.cw32(lo + 4, (addr >> 32) as u32);
        }
        self.cw16(VIRTIO_PCI_COMMON_Q_MSIX, vector);
        assert_eq!(
            self.cw16(VIRTIO_PCI_COMMON_Q_ENABLE, 1),
            [Event::QueueEnabled(q)]
        );
    }

    /// Walk the capability list as a guest driver does: `(id, offset)` in list order.
    fn caps(&mut self) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        let mut at = usize::from(self.cfg8(PCI_CAPABILITY_LIST));
        while at != 0 {
            assert!(out.len() < 48, "capability list loops");
            assert_eq!(at % 4, 0);
            assert!((PCI_STD_HEADER_SIZEOF..PCI_CFG_SPACE_SIZE).contains(&at));
            out.push((self.cfg8(at + PCI_CAP_LIST_ID), at));
            at = usize::from(self.cfg8(at + PCI_CAP_LIST_NEXT));
        }
        out
    }

    /// The virtio capability of `cfg_type`: `(config offset, bar, offset, length)`.
    fn virtio_cap(&mut self, cfg_type: u8) -> (usize, u8, u32, u32) {
        let caps = self.caps();
        let found: Vec<_> = caps
            .into_iter()
            .filter(|&(id, _)| id == PCI_CAP_ID_VNDR)
            .filter(|&(_, at)| self.cfg8(at + VIRTIO_PCI_CAP_CFG_TYPE) == cfg_type)
            .collect();
        assert_eq!(found.len(), 1, "virtio cap type {cfg_type}");
        let at = found[0].1;
        (
            at,
            self.cfg8(at + VIRTIO_PCI_CAP_BAR),
            self.cfg32(at + VIRTIO_PCI_CAP_OFFSET),
            self.cfg32(at + VIRTIO_PCI_CAP_LENGTH),
        )
    }
}

#[test]
fn header_values() {
    let mut d = Drv::new();
    assert_eq!(d.cfg16(PCI_VENDOR_ID), 0x1af4);
    assert_eq!(d.cfg16(PCI_DEVICE_ID), 0x1042);
    assert_eq!(d.cfg8(PCI_REVISION_ID), 1);
    assert_eq!(d.cfg8(PCI_CLASS_PROG), 0);
    assert_eq!(d.cfg16(PCI_CLASS_DEVICE), 0x0100);
    assert_eq!(d.cfg8(PCI_HEADER_TYPE), 0);
    assert_eq!(d.cfg16(PCI_SUBSYSTEM_VENDOR_ID), 0x1af4);
    assert!(d.cfg16(PCI_SUBSYSTEM_ID) >= 0x40);
    assert_ne!(d.cfg16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
    assert_eq!(d.cfg8(PCI_CAPABILITY_LIST), 0x40);
    assert_eq!(d.cfg8(PCI_INTERRUPT_PIN), 0);
    assert_eq!(d.cfg16(PCI_COMMAND), PCI_COMMAND_MEMORY);
    assert_eq!(d.cfg32(PCI_ROM_ADDRESS), 0);
    // A whole-header read in one go, as lspci -x does.
    let hdr: [u8; 64] = d.cfg_read(0);
    assert_eq!(hdr[..4], [0xf4, 0x1a, 0x42, 0x10]);

    // Read-only fields ignore writes.
    d.cfg_write(PCI_VENDOR_ID, &[0; 4]);
    d.cfg_write(PCI_CLASS_PROG, &[0xff; 3]);
    d.cfg_write(PCI_STATUS, &[0xff, 0xff]);
    d.cfg_write(PCI_INTERRUPT_PIN, &[1]);
    assert_eq!(d.cfg16(PCI_VENDOR_ID), 0x1af4);
    assert_eq!(d.cfg16(PCI_DEVICE_ID), 0x1042);
    assert_eq!(d.cfg16(PCI_CLASS_DEVICE), 0x0100);
    assert_eq!(d.cfg16(PCI_STATUS), PCI_STATUS_CAP_LIST);
    assert_eq!(d.cfg8(PCI_INTERRUPT_PIN), 0);
    // Writable: command bits, interrupt line, cache line size.
    d.cfg_write(PCI_COMMAND, &0xffffu16.to_le_bytes());
    let rw = PCI_COMMAND_MEMORY
        | PCI_COMMAND_MASTER
        | PCI_COMMAND_PARITY
        | PCI_COMMAND_SERR
        | PCI_COMMAND_INTX_DISABLE;
    assert_eq!(d.cfg16(PCI_COMMAND), rw);
    assert!(d.f.bus_master_enabled() && d.f.memory_enabled());
    d.cfg_write(PCI_INTERRUPT_LINE, &[11]);
    assert_eq!(d.cfg8(PCI_INTERRUPT_LINE), 11);
    d.cfg_write(PCI_CACHE_LINE_SIZE, &[16]);
    assert_eq!(d.cfg8(PCI_CACHE_LINE_SIZE), 16);
}

#[test]
fn capability_walk() {
    let mut d = Drv::new();
    let layout = *d.f.layout();
    let ids: Vec<u8> = d.caps().iter().map(|&(id, _)| id).collect();
    assert_eq!(
        ids,
        [
            PCI_CAP_ID_VNDR,
            PCI_CAP_ID_VNDR,
            PCI_CAP_ID_VNDR,
            PCI_CAP_ID_VNDR,
            PCI_CAP_ID_VNDR,
            PCI_CAP_ID_MSIX,
            PCI_CAP_ID_EXP
        ]
    );

    let bar_size = u64::from(u32::MAX) + 1;
    let check = |(at, bar, off, len): (usize, u8, u32, u32), expect_off: u64, expect_len: u64| {
        assert_eq!(bar, 0, "cap at {at:#x}");
        assert_eq!((u64::from(off), u64::from(len)), (expect_off, expect_len));
        assert!(u64::from(off) + u64::from(len) <= layout.bar_size.min(bar_size));
    };
    let common = d.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG);
    check(common, layout.common.offset, 60);
    assert_eq!(usize::from(d.cfg8(common.0 + VIRTIO_PCI_CAP_LEN)), 16);
    let notify = d.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG);
    check(notify, layout.notify.offset, u64::from(NUM_QUEUES) * 4);
    assert_eq!(usize::from(d.cfg8(notify.0 + VIRTIO_PCI_CAP_LEN)), 20);
    assert_eq!(d.cfg32(notify.0 + VIRTIO_PCI_NOTIFY_CAP_MULT), 4);
    check(d.virtio_cap(VIRTIO_PCI_CAP_ISR_CFG), layout.isr.offset, 1);
    check(
        d.virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG),
        layout.device.offset,
        96,
    );
    let pci_cfg = d.virtio_cap(VIRTIO_PCI_CAP_PCI_CFG);
    assert_eq!(usize::from(d.cfg8(pci_cfg.0 + VIRTIO_PCI_CAP_LEN)), 20);

    let (_, msix) = d.caps()[5];
    let control = d.cfg16(msix + PCI_MSIX_FLAGS);
    assert_eq!(control & PCI_MSIX_FLAGS_QSIZE, NUM_QUEUES); // table size - 1
    assert_eq!(
        control & (PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL),
        0
    );
    let table = d.cfg32(msix + PCI_MSIX_TABLE);
    let pba = d.cfg32(msix + PCI_MSIX_PBA);
    assert_eq!(
        (table & 7, u64::from(table & !7)),
        (0, layout.msix_table.offset)
    );
    assert_eq!((pba & 7, u64::from(pba & !7)), (0, layout.msix_pba.offset));

    let (_, pcie) = d.caps()[6];
    assert_eq!(d.cfg16(pcie + PCI_EXP_FLAGS) & 0xf, 2);
    assert_ne!(d.cfg32(pcie + PCI_EXP_DEVCAP) & PCI_EXP_DEVCAP_FLR, 0);
    // No extended capabilities.
    assert_eq!(d.cfg32(PCI_CFG_SPACE_SIZE), 0);
    assert_eq!(d.f.capabilities().msix, msix);
}

#[test]
fn bar_sizing() {
    let mut d = Drv::new();
    let size = d.f.layout().bar_size;
    let bar = |i: usize| PCI_BASE_ADDRESS_0 + 4 * i;
    assert_eq!(d.cfg32(bar(0)), PCI_BASE_ADDRESS_MEM_TYPE_64);
    // Linux's __pci_read_base: write all ones, read back, restore.
    d.cfg_write(bar(0), &u32::MAX.to_le_bytes());
    let low = d.cfg32(bar(0));
    assert_eq!(
        low & PCI_BASE_ADDRESS_MEM_FLAGS,
        PCI_BASE_ADDRESS_MEM_TYPE_64
    );
    d.cfg_write(bar(1), &u32::MAX.to_le_bytes());
    let high = d.cfg32(bar(1));
    let mask = (u64::from(high) << 32) | u64::from(low & !PCI_BASE_ADDRESS_MEM_FLAGS);
    assert_eq!(!mask + 1, size);
    // Program an address above 4 GiB.
    d.cfg_write(bar(0), &0xfe00_0000u32.to_le_bytes());
    d.cfg_write(bar(1), &0x1u32.to_le_bytes());
    assert_eq!(d.cfg32(bar(0)), 0xfe00_0000 | PCI_BASE_ADDRESS_MEM_TYPE_64);
    assert_eq!(d.cfg32(bar(1)), 1);
    // Misaligned address bits are dropped.
    d.cfg_write(bar(0), &0x1234_5678u32.to_le_bytes());
    assert_eq!(
        u64::from(d.cfg32(bar(0)) & !PCI_BASE_ADDRESS_MEM_FLAGS) % size,
        0
    );
    // Unused BARs and the ROM are not implemented: all ones reads back zero.
    for off in [bar(2), bar(3), bar(4), bar(5), PCI_ROM_ADDRESS] {
        d.cfg_write(off, &u32::MAX.to_le_bytes());
        assert_eq!(d.cfg32(off), 0, "{off:#x}");
    }
    // BAR addresses do not move the region: accesses are offsets into it.
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_NUMQ), NUM_QUEUES);
}

#[test]
fn feature_negotiation() {
    let mut d = Drv::new();
    let offered = d.device_features();
    assert_eq!(offered, d.f.offered_features());
    assert!(has_feature(offered, VIRTIO_F_VERSION_1));
    assert!(has_feature(offered, VIRTIO_F_ACCESS_PLATFORM));
    assert_eq!(
        offered,
        d.f.device().device_features() | VirtioPciFunction::TRANSPORT_FEATURES
    );
    d.cw32(VIRTIO_PCI_COMMON_DFSELECT, 2);
    assert_eq!(d.c32(VIRTIO_PCI_COMMON_DF), 0);
    d.cw32(VIRTIO_PCI_COMMON_DFSELECT, u32::MAX);
    assert_eq!(d.c32(VIRTIO_PCI_COMMON_DF), 0);
    // device_feature is read-only.
    d.cw32(VIRTIO_PCI_COMMON_DFSELECT, 0);
    d.cw32(VIRTIO_PCI_COMMON_DF, 0);
    assert_eq!(d.c32(VIRTIO_PCI_COMMON_DF), offered as u32);

    let wanted = features_mask(&[VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM]);
    assert_eq!(d.f.negotiated_features(), None);
    assert!(d.negotiate(wanted));
    assert_eq!(d.f.negotiated_features(), Some(wanted));
    d.cw32(VIRTIO_PCI_COMMON_GFSELECT, 1);
    assert_eq!(d.c32(VIRTIO_PCI_COMMON_GF), (wanted >> 32) as u32);
    // Frozen after FEATURES_OK.
    d.cw32(VIRTIO_PCI_COMMON_GF, 0);
    assert_eq!(d.f.negotiated_features(), Some(wanted));
    // Everything offered is fine too.
    assert!(d.negotiate(offered));
    assert_eq!(d.f.negotiated_features(), Some(offered));
}

#[test]
fn features_ok_refused() {
    let mut d = Drv::new();
    let base = feature_mask(VIRTIO_F_VERSION_1);
    // An unoffered bit.
    assert!(!has_feature(d.f.offered_features(), VIRTIO_F_RING_PACKED));
    assert!(!d.negotiate(base | feature_mask(VIRTIO_F_RING_PACKED)));
    assert_eq!(d.f.negotiated_features(), None);
    assert!(!d.negotiate(base | 1 << 63));
    // No VERSION_1.
    assert!(!d.negotiate(feature_mask(VIRTIO_F_ACCESS_PLATFORM)));
    // A bit past 63.
    assert_eq!(d.cw8(VIRTIO_PCI_COMMON_STATUS, 0), [Event::Reset]);
    d.set_driver_features(base);
    d.cw32(VIRTIO_PCI_COMMON_GFSELECT, 2);
    d.cw32(VIRTIO_PCI_COMMON_GF, 1);
    d.cw8(
        VIRTIO_PCI_COMMON_STATUS,
        status(&[VIRTIO_CONFIG_S_FEATURES_OK]),
    );
    assert_eq!(d.c8(VIRTIO_PCI_COMMON_STATUS), 0);
    // A reset forgets it; the same features then pass.
    assert!(d.negotiate(base));
}

#[test]
fn status_and_driver_ok() {
    let mut d = Drv::new();
    assert!(d.negotiate(feature_mask(VIRTIO_F_VERSION_1)));
    let s = d.c8(VIRTIO_PCI_COMMON_STATUS) | status(&[VIRTIO_CONFIG_S_DRIVER_OK]);
    assert_eq!(d.cw8(VIRTIO_PCI_COMMON_STATUS, s), [Event::DriverOk]);
    assert!(d.f.driver_ok());
    assert_eq!(d.cw8(VIRTIO_PCI_COMMON_STATUS, s), []);
    // NEEDS_RESET is the device's: the driver cannot set or clear it.
    let needs = status(&[VIRTIO_CONFIG_S_NEEDS_RESET]);
    d.cw8(VIRTIO_PCI_COMMON_STATUS, s | needs);
    assert_eq!(d.c8(VIRTIO_PCI_COMMON_STATUS) & needs, 0);
    // With MSI-X off, the config change shows in the ISR.
    assert_eq!(d.f.set_needs_reset(), None);
    assert_eq!(d.c8(VIRTIO_PCI_COMMON_STATUS) & needs, needs);
    d.cw8(VIRTIO_PCI_COMMON_STATUS, s);
    assert_eq!(d.c8(VIRTIO_PCI_COMMON_STATUS) & needs, needs);
    let isr = d.f.layout().isr.offset;
    assert_eq!(d.bar8(isr), VIRTIO_PCI_ISR_CONFIG);
    assert_eq!(d.cw8(VIRTIO_PCI_COMMON_STATUS, 0), [Event::Reset]);
    assert_eq!(d.c8(VIRTIO_PCI_COMMON_STATUS), 0);
}

#[test]
fn queue_setup() {
    let mut d = Drv::new();
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_NUMQ), NUM_QUEUES);
    d.cw16(VIRTIO_PCI_COMMON_Q_SELECT, 1);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_SIZE), QSIZE);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_NOFF), 1);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_MSIX), VIRTIO_MSI_NO_VECTOR);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_ENABLE), 0);
    // Sizes: a smaller power of two sticks; others are ignored.
    for bad in [0, 3, 12, QSIZE * 2, u16::MAX] {
        d.cw16(VIRTIO_PCI_COMMON_Q_SIZE, bad);
        assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_SIZE), QSIZE);
    }
    d.cw16(VIRTIO_PCI_COMMON_Q_SIZE, 8);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_SIZE), 8);
    // 64-bit addresses: two halves, or one 8-byte write.
    d.cw32(VIRTIO_PCI_COMMON_Q_DESCLO, 0x1000);
    d.cw32(VIRTIO_PCI_COMMON_Q_DESCHI, 0x2);
    let avail = d.common() + VIRTIO_PCI_COMMON_Q_AVAILLO as u64;
    d.bar_write(avail, &0x3_0000_2000u64.to_le_bytes());
    d.cw32(VIRTIO_PCI_COMMON_Q_USEDLO, 0x3000);
    assert_eq!(
        d.bar64(d.common() + VIRTIO_PCI_COMMON_Q_DESCLO as u64),
        0x2_0000_1000
    );
    assert_eq!(d.c32(VIRTIO_PCI_COMMON_Q_AVAILHI), 3);
    // Vectors past the table read back NO_VECTOR.
    d.cw16(VIRTIO_PCI_COMMON_Q_MSIX, NUM_QUEUES + 1);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_MSIX), VIRTIO_MSI_NO_VECTOR);
    d.cw16(VIRTIO_PCI_COMMON_Q_MSIX, 2);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_MSIX), 2);
    d.cw16(VIRTIO_PCI_COMMON_MSIX, 0);
    assert_eq!(d.f.config_msix_vector(), 0);
    d.cw16(VIRTIO_PCI_COMMON_MSIX, 7);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_MSIX), VIRTIO_MSI_NO_VECTOR);

    assert_eq!(d.cw16(VIRTIO_PCI_COMMON_Q_ENABLE, 0), []);
    assert_eq!(
        d.cw16(VIRTIO_PCI_COMMON_Q_ENABLE, 1),
        [Event::QueueEnabled(1)]
    );
    assert_eq!(d.cw16(VIRTIO_PCI_COMMON_Q_ENABLE, 1), []);
    let expect = QueueConfig {
        size: 8,
        desc: 0x2_0000_1000,
        driver: 0x3_0000_2000,
        device: 0x3000,
        msix_vector: 2,
        enabled: true,
    };
    assert_eq!(d.f.queue_config(1), Some(expect));
    // Frozen once enabled (but for the vector).
    d.cw16(VIRTIO_PCI_COMMON_Q_SIZE, 4);
    d.cw32(VIRTIO_PCI_COMMON_Q_USEDLO, 0x4000);
    assert_eq!(d.f.queue_config(1), Some(expect));
    assert_eq!(d.f.queue_config(0).map(|q| q.enabled), Some(false));
    assert_eq!(d.f.queue_config(NUM_QUEUES), None);

    // A queue that does not exist reads as zeros and ignores writes.
    d.cw16(VIRTIO_PCI_COMMON_Q_SELECT, NUM_QUEUES);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_SIZE), 0);
    assert_eq!(d.cw16(VIRTIO_PCI_COMMON_Q_ENABLE, 1), []);
    d.cw32(VIRTIO_PCI_COMMON_Q_DESCLO, 0x1000);
    assert_eq!(d.c32(VIRTIO_PCI_COMMON_Q_DESCLO), 0);

    // Writes of the wrong width are dropped.
    d.cw16(VIRTIO_PCI_COMMON_Q_SELECT, 0);
    d.cw32(VIRTIO_PCI_COMMON_Q_SIZE, 4);
    d.cw8(VIRTIO_PCI_COMMON_Q_SIZE, 4);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_SIZE), QSIZE);
    // A 4-byte write at a 2-byte aligned offset is split in two, as vfio-pci splits it:
    // queue_select = 1, then queue_size = 4 for queue 1.
    d.cw16(VIRTIO_PCI_COMMON_Q_SELECT, 0);
    assert_eq!(d.cw32(VIRTIO_PCI_COMMON_Q_SELECT, 0x0004_0001), []);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_SELECT), 1);
    assert_eq!(
        d.f.queue_config(1).unwrap().size,
        8,
        "queue 1 is enabled: frozen"
    );
    d.cw16(VIRTIO_PCI_COMMON_Q_SELECT, 0);
    assert_eq!(d.cw32(VIRTIO_PCI_COMMON_Q_SELECT - 2, 0x0000_0000), []);
    assert_eq!(d.c16(VIRTIO_PCI_COMMON_Q_SELECT), 0);

    // The queue converts into a virtio-queue Queue.
    let queue = expect.to_queue(QSIZE, true).unwrap();
    use virtio_queue::QueueT;
    assert_eq!(
        (
            queue.size(),
            queue.desc_table(),
            queue.avail_ring(),
            queue.used_ring()
        ),
        (8, 0x2_0000_1000, 0x3_0000_2000, 0x3000)
    );
    assert!(queue.ready() && queue.event_idx_enabled());
    let misaligned = QueueConfig {
        desc: 0x1001,
        ..expect
    };
    assert!(misaligned.to_queue(QSIZE, false).is_err());
}

#[test]
fn doorbells() {
    let mut d = Drv::new();
    let layout = *d.f.layout();
    for q in 0..NUM_QUEUES {
        let (region, off) = layout.doorbell(q).unwrap();
        assert_eq!(region, RegionIndex::Bar0);
        assert_eq!(d.bar_write(off, &q.to_le_bytes()), [Event::QueueNotify(q)]);
        // With VIRTIO_F_NOTIFICATION_DATA drivers write 4 bytes; the address decides.
        assert_eq!(d.bar_write(off, &[0; 4]), [Event::QueueNotify(q)]);
        assert_eq!(d.bar16(off), 0);
    }
    let base = layout.notify.offset;
    assert_eq!(d.bar_write(base + 2, &[0; 2]), []);
    assert_eq!(d.bar_write(base + 4 * u64::from(NUM_QUEUES), &[0; 2]), []);
    // A wide write over both doorbells rings both, as split by vfio-pci.
    assert_eq!(
        d.bar_write(base, &[0; 8]),
        [Event::QueueNotify(0), Event::QueueNotify(1)]
    );
}

#[test]
fn device_config_reads() {
    let mut d = Drv::new();
    let base = d.f.layout().device.offset;
    let cfg = d.f.device().config_bytes();
    assert_eq!(d.bar64(base), DISK / 512);
    let mut all = vec![0u8; cfg.len()];
    d.f.region_read(RegionIndex::Bar0, base, &mut all).unwrap();
    assert_eq!(all, cfg);
    // Writes are dropped; past the structure reads zero.
    d.bar_write(base, &[0xff; 8]);
    assert_eq!(d.bar64(base), DISK / 512);
    assert_eq!(d.bar32(base + 96), 0);
    assert_eq!(d.bar32(base + 0xffc), 0);
}

/// A resize shows through the BAR: the capacity halves a driver reads in two 4-byte accesses,
/// and `config_generation`, which moves with every change (so the driver's re-read loop of
/// virtio 1.2 section 4.1.4.3.1 catches a change between the halves).
#[test]
fn resize_moves_capacity_and_generation() {
    let mut d = Drv::new();
    let base = d.f.layout().device.offset;
    let gen0 = d.c8(VIRTIO_PCI_COMMON_CFGGENERATION);
    let lo = d.bar32(base);
    d.f.device().resize(Some(4 * DISK), false).unwrap();
    let hi = d.bar32(base + 4);
    let gen1 = d.c8(VIRTIO_PCI_COMMON_CFGGENERATION);
    assert_eq!((lo, hi), (u32::try_from(DISK / 512).unwrap(), 0));
    assert_ne!(gen0, gen1, "a torn read must be caught by the generation");
    assert_eq!(d.bar64(base), 4 * DISK / 512);
    // The transport's notification moves it again.
    d.f.config_interrupt();
    assert_ne!(d.c8(VIRTIO_PCI_COMMON_CFGGENERATION), gen1);
}

#[test]
fn isr_read_clears() {
    let mut d = Drv::new();
    let isr = d.f.layout().isr.offset;
    assert!(!d.f.msix_enabled());
    // MSI-X off: the ISR carries the interrupt (and there is no INTx pin to raise).
    assert_eq!(d.f.queue_interrupt(0), None);
    assert_eq!(d.f.isr(), VIRTIO_PCI_ISR_QUEUE);
    assert_eq!(d.bar8(isr), VIRTIO_PCI_ISR_QUEUE);
    assert_eq!(d.bar8(isr), 0);
    let generation = d.c8(VIRTIO_PCI_COMMON_CFGGENERATION);
    assert_eq!(d.f.config_interrupt(), None);
    assert_eq!(
        d.c8(VIRTIO_PCI_COMMON_CFGGENERATION),
        generation.wrapping_add(1)
    );
    d.f.queue_interrupt(1);
    // A 4-byte read covering the ISR byte clears it too; writes do nothing.
    d.bar_write(isr, &[0]);
    assert_eq!(
        d.bar32(isr),
        u32::from(VIRTIO_PCI_ISR_QUEUE | VIRTIO_PCI_ISR_CONFIG)
    );
    assert_eq!(d.bar8(isr), 0);
    assert_eq!(d.f.queue_interrupt(NUM_QUEUES), None);
    assert_eq!(d.f.isr(), 0);
}

#[test]
fn msix_mask_pending_unmask() {
    let mut d = Drv::new();
    let layout = *d.f.layout();
    d.cw16(VIRTIO_PCI_COMMON_MSIX, 0);
    d.cw16(VIRTIO_PCI_COMMON_Q_SELECT, 1);
    d.cw16(VIRTIO_PCI_COMMON_Q_MSIX, 2);

    // SET_IRQS(MSIX, TRIGGER, 0..3): the host enables MSI-X, then unmasks vectors with eventfds.
    assert_eq!(d.f.host_msix_enable(true), []);
    let msix = d.f.capabilities().msix;
    assert_ne!(d.cfg16(msix + PCI_MSIX_FLAGS) & PCI_MSIX_FLAGS_ENABLE, 0);
    assert!(d.f.msix_vector_masked(2));
    // A masked vector pends.
    assert_eq!(d.f.queue_interrupt(1), None);
    assert!(d.f.msix_pending(2));
    assert_eq!(d.bar64(layout.msix_pba.offset), 1 << 2);
    assert_eq!(d.f.isr(), 0);
    // Unmasking delivers it, once.
    assert_eq!(d.f.host_msix_mask(2, false), [Event::Interrupt(2)]);
    assert!(!d.f.msix_pending(2));
    assert_eq!(d.f.host_msix_mask(2, false), []);
    assert_eq!(d.f.queue_interrupt(1), Some(2));
    // The config vector.
    assert_eq!(d.f.config_interrupt(), None);
    assert!(d.f.msix_pending(0));
    assert_eq!(d.f.host_msix_mask(0, false), [Event::Interrupt(0)]);
    assert_eq!(d.f.config_interrupt(), Some(0));
    // NO_VECTOR: nothing at all.
    d.cw16(VIRTIO_PCI_COMMON_Q_SELECT, 0);
    assert_eq!(d.f.queue_interrupt(0), None);
    assert!(!d.f.msix_pending(1));

    // vfio-pci hides the table and keeps the capability to itself.
    let mut table = [0u8; 16];
    d.f.region_read(RegionIndex::Bar0, layout.msix_table.offset, &mut table)
        .unwrap();
    assert_eq!(table, [0xff; 16]);
    // Unmasking vector 1 through the region is dropped: it stays masked.
    d.bar_write(layout.msix_table.offset + 16 + 12, &0u32.to_le_bytes());
    assert!(d.f.msix_entry(1).unwrap().masked());
    assert_eq!(d.cfg_write(msix + PCI_MSIX_FLAGS, &0u16.to_le_bytes()), []);
    assert!(d.f.msix_enabled());

    // The function's own view: the function mask holds vectors back, clearing it releases.
    let control = d.cfg16(msix + PCI_MSIX_FLAGS);
    let masked = (control | PCI_MSIX_FLAGS_MASKALL).to_le_bytes();
    assert_eq!(
        d.f.write_config_space((msix + PCI_MSIX_FLAGS) as u64, &masked),
        []
    );
    assert!(d.f.msix_function_masked() && d.f.msix_vector_masked(2));
    assert_eq!(d.f.queue_interrupt(1), None);
    assert_eq!(
        d.f.write_config_space((msix + PCI_MSIX_FLAGS) as u64, &control.to_le_bytes()),
        [Event::Interrupt(2)]
    );
    // Entry mask through the raw table.
    let ctrl2 = layout.msix_table.offset + 2 * 16 + 12;
    d.f.write_bar(0, ctrl2, &1u32.to_le_bytes());
    assert_eq!(d.f.queue_interrupt(1), None);
    let mut raw = [0u8; 4];
    d.f.read_bar(0, ctrl2, &mut raw);
    assert_eq!(u32::from_le_bytes(raw), 1);
    assert_eq!(
        d.f.write_bar(0, ctrl2, &0u32.to_le_bytes()),
        [Event::Interrupt(2)]
    );
    d.f.write_bar(
        0,
        layout.msix_table.offset + 32,
        &0xfee0_1000u64.to_le_bytes(),
    );
    assert_eq!(d.f.msix_entry(2).unwrap().addr, 0xfee0_1000);

    // Disabling drops nothing pending and sends nothing.
    assert_eq!(d.f.host_msix_enable(false), []);
    assert_eq!(d.f.queue_interrupt(1), None);
    assert_eq!(d.f.isr(), VIRTIO_PCI_ISR_QUEUE);
}

#[test]
fn reset_restores_initial_state() {
    let mut d = Drv::new();
    d.cfg_write(
        PCI_COMMAND,
        &(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER).to_le_bytes(),
    );
    d.cfg_write(PCI_BASE_ADDRESS_0, &0xfe00_0000u32.to_le_bytes());
    d.f.host_msix_enable(true);
    d.f.host_msix_mask(1, true);
    assert!(d.negotiate(feature_mask(VIRTIO_F_VERSION_1)));
    d.setup_queue(0, 8, 0x1000, 0x2000, 0x3000, 1);
    d.cw16(VIRTIO_PCI_COMMON_MSIX, 0);
    d.cw32(VIRTIO_PCI_COMMON_DFSELECT, 1);
    d.f.queue_interrupt(0);
    assert!(d.f.msix_pending(1));

    let fresh = function();
    let initial_common: [u8; 60] = {
        let mut f = fresh;
        let mut b = [0u8; 60];
        f.region_read(RegionIndex::Bar0, 0, &mut b).unwrap();
        b
    };

    // VFIO_DEVICE_RESET.
    assert_eq!(d.f.reset(), [Event::Reset]);
    assert_eq!(d.bar_read::<60>(0), initial_common);
    assert!(!d.f.queue_config(0).unwrap().enabled);
    assert_eq!(d.f.negotiated_features(), None);
    assert!(!d.f.msix_pending(1));
    // Config space as the host restores it.
    assert_eq!(
        d.cfg16(PCI_COMMAND),
        PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
    );
    assert_eq!(
        d.cfg32(PCI_BASE_ADDRESS_0) & !PCI_BASE_ADDRESS_MEM_FLAGS,
        0xfe00_0000
    );
    assert!(d.f.msix_enabled());

    // device_status = 0.
    d.setup_queue(0, 8, 0x1000, 0x2000, 0x3000, 1);
    assert_eq!(d.cw8(VIRTIO_PCI_COMMON_STATUS, 0), [Event::Reset]);
    assert_eq!(d.bar_read::<60>(0), initial_common);

    // Function level reset through PCI Express device control.
    d.setup_queue(1, 8, 0x1000, 0x2000, 0x3000, 1);
    let devctl = d.f.capabilities().pcie + PCI_EXP_DEVCTL;
    let events = d.cfg_write(devctl, &PCI_EXP_DEVCTL_BCR_FLR.to_le_bytes());
    assert_eq!(events, [Event::Reset]);
    assert_eq!(d.cfg16(devctl) & PCI_EXP_DEVCTL_BCR_FLR, 0);
    assert!(!d.f.queue_config(1).unwrap().enabled);
    // Other device control bits are plain storage.
    assert_eq!(d.cfg_write(devctl, &0x0010u16.to_le_bytes()), []);
    assert_eq!(d.cfg16(devctl), 0x0010);
}

#[test]
fn region_errors() {
    let mut f = function();
    let size = f.layout().bar_size;
    let mut buf = [0u8; 8];
    for r in [
        RegionIndex::Bar1,
        RegionIndex::Bar2,
        RegionIndex::Bar5,
        RegionIndex::Rom,
        RegionIndex::Vga,
    ] {
        assert_eq!(f.region_read(r, 0, &mut buf), Err(AccessError::NoRegion(r)));
        assert_eq!(
            f.region_write(r, 0, &buf).map(|(n, _)| n),
            Err(AccessError::NoRegion(r))
        );
    }
    assert_eq!(
        f.region_read(RegionIndex::Bar0, size, &mut buf),
        Err(AccessError::BarOutOfRange { offset: size, size })
    );
    // Clipped at the end of the BAR.
    assert_eq!(f.region_read(RegionIndex::Bar0, size - 2, &mut buf), Ok(2));
    assert_eq!(
        f.region_write(RegionIndex::Bar0, size - 3, &buf)
            .map(|(n, _)| n),
        Ok(3)
    );
    assert!(matches!(
        f.region_read(RegionIndex::Config, 4095, &mut buf),
        Err(AccessError::ConfigOutOfRange { .. })
    ));
    assert!(f
        .region_read(RegionIndex::Config, u64::MAX, &mut buf)
        .is_err());
    assert_eq!(f.region_read(RegionIndex::Config, 4088, &mut buf), Ok(8));
    assert_eq!(f.region_read(RegionIndex::Bar0, 0, &mut []), Ok(0));
    // The function's own views never fail: out of range reads zero.
    let mut ones = [0xffu8; 8];
    f.read_config_space(u64::MAX - 1, &mut ones);
    assert_eq!(ones, [0; 8]);
    let mut ones = [0xffu8; 8];
    f.read_bar(0, u64::MAX - 1, &mut ones);
    assert_eq!(ones, [0; 8]);
    let mut ones = [0xffu8; 8];
    f.read_bar(2, 0, &mut ones);
    assert_eq!(ones, [0; 8]);
    assert_eq!(f.write_bar(0, u64::MAX - 1, &[0xff; 8]), []);
    assert_eq!(f.write_config_space(u64::MAX - 1, &[0xff; 8]), []);
    // Memory space disabled: vfio-pci refuses BAR accesses.
    f.region_write(RegionIndex::Config, PCI_COMMAND as u64, &[0, 0])
        .unwrap();
    assert!(!f.memory_enabled());
    assert_eq!(
        f.region_read(RegionIndex::Bar0, 0, &mut buf),
        Err(AccessError::MemoryDisabled)
    );
    assert_eq!(
        f.region_write(RegionIndex::Bar0, 0, &buf).map(|(n, _)| n),
        Err(AccessError::MemoryDisabled)
    );
}

#[test]
fn pci_cfg_access_window() {
    let mut d = Drv::new();
    let (cap, ..) = d.virtio_cap(VIRTIO_PCI_CAP_PCI_CFG);
    let data = cap + VIRTIO_PCI_CFG_CAP_DATA;
    let common = d.common();
    // Read num_queues through the window.
    d.cfg_write(cap + VIRTIO_PCI_CAP_BAR, &[0]);
    d.cfg_write(
        cap + VIRTIO_PCI_CAP_OFFSET,
        &((common + VIRTIO_PCI_COMMON_NUMQ as u64) as u32).to_le_bytes(),
    );
    d.cfg_write(cap + VIRTIO_PCI_CAP_LENGTH, &2u32.to_le_bytes());
    assert_eq!(d.cfg16(data), NUM_QUEUES);
    // Write device_status through it.
    d.cfg_write(
        cap + VIRTIO_PCI_CAP_OFFSET,
        &((common + VIRTIO_PCI_COMMON_STATUS as u64) as u32).to_le_bytes(),
    );
    d.cfg_write(cap + VIRTIO_PCI_CAP_LENGTH, &1u32.to_le_bytes());
    let ack = status(&[VIRTIO_CONFIG_S_ACKNOWLEDGE]);
    d.cfg_write(data, &[ack]);
    assert_eq!(d.f.device_status(), ack);
    assert_eq!(d.cfg_write(data, &[0]), [Event::Reset]);
    // A doorbell through the window.
    let (_, bell) = d.f.layout().doorbell(1).unwrap();
    d.cfg_write(cap + VIRTIO_PCI_CAP_OFFSET, &(bell as u32).to_le_bytes());
    d.cfg_write(cap + VIRTIO_PCI_CAP_LENGTH, &2u32.to_le_bytes());
    assert_eq!(d.cfg_write(data, &[1, 0]), [Event::QueueNotify(1)]);
    // Invalid descriptions do nothing.
    for (bar, len, off) in [
        (1u8, 2u32, bell),
        (0, 3, bell),
        (0, 2, bell + 1),
        (0, 4, u64::from(u32::MAX)),
    ] {
        d.cfg_write(cap + VIRTIO_PCI_CAP_BAR, &[bar]);
        d.cfg_write(cap + VIRTIO_PCI_CAP_LENGTH, &len.to_le_bytes());
        d.cfg_write(cap + VIRTIO_PCI_CAP_OFFSET, &(off as u32).to_le_bytes());
        assert_eq!(d.cfg_write(data, &[1, 0, 0, 0]), []);
        d.cfg32(data);
    }
}

// --- The same virtio-blk device, served through this transport ------------------------------

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x11000;
const STATUS: u64 = 0x12000;

/// Post one three-descriptor request (header, data, status) at table entry 0, as the next
/// avail entry.
fn post_request(
    mem: &GuestMemoryMmap<()>,
    ring: &mut SplitRing,
    kind: u32,
    sector: u64,
    len: u32,
    data_flags: u16,
) {
    let req = BlkRequest::new(kind, sector);
    req.write(mem, HDR, STATUS);
    ring.write_chain(
        mem,
        0,
        &BlkRequest::chain(HDR, &[(DATA, len, data_flags)], STATUS),
    );
    ring.offer(mem, 0);
}

#[test]
fn blk_queue_served_through_pci() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut d = Drv::new();
    d.cfg_write(
        PCI_COMMAND,
        &(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER).to_le_bytes(),
    );
    d.f.host_msix_enable(true);
    d.f.host_msix_mask(1, false);
    let features = features_mask(&[VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM]);
    assert!(d.negotiate(features));
    d.setup_queue(0, QSIZE, DESC, AVAIL, USED, 1);
    let s = d.c8(VIRTIO_PCI_COMMON_STATUS) | status(&[VIRTIO_CONFIG_S_DRIVER_OK]);
    assert_eq!(d.cw8(VIRTIO_PCI_COMMON_STATUS, s), [Event::DriverOk]);

    // The transport's side: a Queue from the function's configuration, the device's worker.
    let cfg = d.f.queue_config(0).unwrap();
    let max = d.f.device().queue_size();
    let mut queue = cfg.to_queue(max, false).unwrap();
    let dev = d.f.device().clone();
    let mut worker = AsyncQueue::new(
        dev.clone(),
        Engine::new(dev.aio(), dev.backend().clone(), dev.queue_size()),
    );
    // A RAM disk: the sync engine, whose requests complete within the poll that took them.
    let mut serve = |queue: &mut virtio_queue::Queue| {
        let out = worker
            .poll(queue, &mem, &mut |_| FaultPolicy::Fail)
            .unwrap();
        assert_eq!(worker.in_flight(), 0);
        out
    };
    let (_, bell) = d.f.layout().doorbell(0).unwrap();
    let mut ring = SplitRing::new(QSIZE, DESC, AVAIL, USED);

    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    post_request(&mem, &mut ring, VIRTIO_BLK_T_OUT, 5, 512, 0);
    assert_eq!(
        d.bar_write(bell, &0u16.to_le_bytes()),
        [Event::QueueNotify(0)]
    );
    let out = serve(&mut queue);
    assert_eq!((out.completed, out.notify), (1, true));
    assert_eq!(d.f.queue_interrupt(0), Some(1));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );

    mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
    let write = u16::try_from(VRING_DESC_F_WRITE).unwrap();
    post_request(&mem, &mut ring, VIRTIO_BLK_T_IN, 5, 512, write);
    assert_eq!(
        d.bar_write(bell, &0u16.to_le_bytes()),
        [Event::QueueNotify(0)]
    );
    let out = serve(&mut queue);
    assert_eq!(out.completed, 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8
    );
    let mut back = vec![0u8; 512];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    // The used ring: two entries, the second of 512 data bytes plus the status byte.
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 2);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(USED + 4 + 8 + 4)).unwrap(),
        513
    );

    // The driver masks the vector: the next completion pends, then arrives on unmask.
    d.f.host_msix_mask(1, true);
    post_request(&mem, &mut ring, VIRTIO_BLK_T_IN, 5, 512, write);
    let out = serve(&mut queue);
    assert!(out.notify);
    assert_eq!(d.f.queue_interrupt(0), None);
    assert_eq!(d.f.host_msix_mask(1, false), [Event::Interrupt(1)]);
}

// --- Nothing a VFIO user sends panics ---------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Read(u32, u64, usize),
    Write(u32, u64, Vec<u8>),
    RawConfigWrite(u64, Vec<u8>),
    RawBarWrite(u64, Vec<u8>),
    Interrupt(u16),
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0x100,
        0u64..0x10000,
        0x3000u64..0x3010,
        0x4000u64..0x4040,
        any::<u64>(),
        Just(u64::MAX),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let data = proptest::collection::vec(any::<u8>(), 0..24);
    prop_oneof![
        (0u32..10, offset(), 0usize..24).prop_map(|(r, o, n)| Op::Read(r, o, n)),
        (0u32..10, offset(), data.clone()).prop_map(|(r, o, d)| Op::Write(r, o, d)),
        (offset(), data.clone()).prop_map(|(o, d)| Op::RawConfigWrite(o, d)),
        (offset(), data).prop_map(|(o, d)| Op::RawBarWrite(o, d)),
        any::<u16>().prop_map(Op::Interrupt),
    ]
}

proptest! {
    #[test]
    fn random_accesses_never_panic(ops in proptest::collection::vec(op(), 1..64)) {
        let mut f = function();
        for op in ops {
            match op {
                Op::Read(r, o, n) => {
                    let mut buf = vec![0u8; n];
                    if let Some(region) = RegionIndex::from_index(r) {
                        if let Ok(done) = f.region_read(region, o, &mut buf) {
                            prop_assert!(done <= n);
                        }
                    }
                    f.read_config_space(o, &mut buf);
                    f.read_bar(0, o, &mut buf);
                }
                Op::Write(r, o, d) => {
                    if let Some(region) = RegionIndex::from_index(r) {
                        if let Ok((done, _)) = f.region_write(region, o, &d) {
                            prop_assert!(done <= d.len());
                        }
                    }
                }
                Op::RawConfigWrite(o, d) => {
                    f.write_config_space(o, &d);
                }
                Op::RawBarWrite(o, d) => {
                    f.write_bar(0, o, &d);
                }
                Op::Interrupt(q) => {
                    if let Some(v) = f.queue_interrupt(q) {
                        prop_assert!(v < f.layout().msix_vectors);
                    }
                    f.config_interrupt();
                }
            }
            // Invariants a driver relies on.
            let mut id = [0u8; 4];
            f.read_config_space(0, &mut id);
            prop_assert_eq!(id, [0xf4, 0x1a, 0x42, 0x10]);
            for q in 0..f.num_queues() {
                let c = f.queue_config(q).unwrap();
                prop_assert!(c.size.is_power_of_two() && c.size <= QSIZE);
                prop_assert!(c.msix_vector == VIRTIO_MSI_NO_VECTOR || c.msix_vector < f.layout().msix_vectors);
            }
            if let Some(features) = f.negotiated_features() {
                prop_assert_eq!(features & !f.offered_features(), 0);
            }
        }
    }
}
