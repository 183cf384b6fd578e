//! Register numbers and bits of PCI config space and of the virtio PCI transport.
//!
//! virtio-bindings 0.2 has no `virtio_pci` module and libc has no PCI constants, so the names
//! and values here follow Linux's `include/uapi/linux/pci_regs.h` and
//! `include/uapi/linux/virtio_pci.h` (virtio 1.2 section 4.1), one constant per register or bit.

// --- PCI identification (virtio 1.2 section 4.1.2) -------------------------------------------

/// The PCI vendor of every virtio device (Red Hat, Inc., formerly Qumranet).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern (virtio 1.x) devices are `0x1040 + device id`.
pub const VIRTIO_PCI_MODERN_DEVICE_ID_BASE: u16 = 0x1040;
/// "Non-transitional devices SHOULD have a PCI Revision ID of 1 or higher."
pub const VIRTIO_PCI_MODERN_REVISION: u8 = 1;
/// The subsystem vendor QEMU gives its virtio devices (`PCI_SUBVENDOR_ID_REDHAT_QUMRANET`).
pub const VIRTIO_PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// The subsystem id QEMU gives its virtio devices (`PCI_SUBDEVICE_ID_QEMU`); the spec asks
/// non-transitional devices for 0x40 or higher.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// Class code of QEMU's virtio-blk-pci: mass storage (0x01), SCSI (0x00), prog-if 0
/// (`PCI_CLASS_STORAGE_SCSI`, hw/virtio/virtio-blk-pci.c).
pub const PCI_CLASS_STORAGE_SCSI: u16 = 0x0100;

// --- Type 0 header (pci_regs.h) --------------------------------------------------------------

/// Size of conventional config space.
pub const PCI_CFG_SPACE_SIZE: usize = 256;
/// Size of PCI Express extended config space.
pub const PCI_CFG_SPACE_EXP_SIZE: usize = 4096;

/// 16 bits.
pub const PCI_VENDOR_ID: usize = 0x00;
/// 16 bits.
pub const PCI_DEVICE_ID: usize = 0x02;
/// 16 bits.
pub const PCI_COMMAND: usize = 0x04;
/// Respond to memory space accesses.
pub const PCI_COMMAND_MEMORY: u16 = 0x2;
/// Enable bus mastering (DMA, and MSI-X messages).
pub const PCI_COMMAND_MASTER: u16 = 0x4;
/// Enable parity checking.
pub const PCI_COMMAND_PARITY: u16 = 0x40;
/// Enable SERR.
pub const PCI_COMMAND_SERR: u16 = 0x100;
/// INTx emulation disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 0x400;
/// 16 bits.
pub const PCI_STATUS: usize = 0x06;
/// Support capability list.
pub const PCI_STATUS_CAP_LIST: u16 = 0x10;
/// 8 bits.
pub const PCI_REVISION_ID: usize = 0x08;
/// Programming interface, 8 bits.
pub const PCI_CLASS_PROG: usize = 0x09;
/// Sub-class and class, 16 bits.
pub const PCI_CLASS_DEVICE: usize = 0x0a;
/// 8 bits.
pub const PCI_CACHE_LINE_SIZE: usize = 0x0c;
/// 8 bits.
pub const PCI_HEADER_TYPE: usize = 0x0e;
/// An endpoint (type 0 header), single function.
pub const PCI_HEADER_TYPE_NORMAL: u8 = 0;
/// The first of the six base address registers, 32 bits each.
pub const PCI_BASE_ADDRESS_0: usize = 0x10;
/// Number of base address registers in a type 0 header.
pub const PCI_STD_NUM_BARS: usize = 6;
/// Bytes per base address register.
pub const PCI_BAR_BYTES: usize = 4;
/// A memory BAR decoding a 64-bit address (bits 2:1 = 0b10).
pub const PCI_BASE_ADDRESS_MEM_TYPE_64: u32 = 0x04;
/// The low bits of a memory BAR that hold flags, not address.
pub const PCI_BASE_ADDRESS_MEM_FLAGS: u32 = 0x0f;
/// 16 bits.
pub const PCI_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
/// 16 bits.
pub const PCI_SUBSYSTEM_ID: usize = 0x2e;
/// Expansion ROM base address, 32 bits (hard-wired to zero here: no ROM).
pub const PCI_ROM_ADDRESS: usize = 0x30;
/// Offset of the first capability, 8 bits.
pub const PCI_CAPABILITY_LIST: usize = 0x34;
/// 8 bits, scratch for the driver.
pub const PCI_INTERRUPT_LINE: usize = 0x3c;
/// 8 bits; 0 means no INTx pin.
pub const PCI_INTERRUPT_PIN: usize = 0x3d;
/// Where capabilities may start: the end of the type 0 header.
pub const PCI_STD_HEADER_SIZEOF: usize = 0x40;

// --- Capabilities -----------------------------------------------------------------------------

/// Capability id, 8 bits.
pub const PCI_CAP_LIST_ID: usize = 0;
/// Next capability pointer, 8 bits.
pub const PCI_CAP_LIST_NEXT: usize = 1;
/// PCI Express.
pub const PCI_CAP_ID_EXP: u8 = 0x10;
/// MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Vendor specific (every virtio capability).
pub const PCI_CAP_ID_VNDR: u8 = 0x09;

/// MSI-X message control, 16 bits.
pub const PCI_MSIX_FLAGS: usize = 2;
/// Table size - 1.
pub const PCI_MSIX_FLAGS_QSIZE: u16 = 0x07ff;
/// Function mask.
pub const PCI_MSIX_FLAGS_MASKALL: u16 = 0x4000;
/// MSI-X enable.
pub const PCI_MSIX_FLAGS_ENABLE: u16 = 0x8000;
/// Table offset and BAR indicator, 32 bits.
pub const PCI_MSIX_TABLE: usize = 4;
/// PBA offset and BAR indicator, 32 bits.
pub const PCI_MSIX_PBA: usize = 8;
/// Size of the MSI-X capability.
pub const PCI_CAP_MSIX_SIZEOF: usize = 12;
/// Bytes per MSI-X table entry.
pub const PCI_MSIX_ENTRY_SIZE: usize = 16;
/// Message address, low 32 bits.
pub const PCI_MSIX_ENTRY_LOWER_ADDR: usize = 0;
/// Message address, high 32 bits.
pub const PCI_MSIX_ENTRY_UPPER_ADDR: usize = 4;
/// Message data.
pub const PCI_MSIX_ENTRY_DATA: usize = 8;
/// Vector control.
pub const PCI_MSIX_ENTRY_VECTOR_CTRL: usize = 12;
/// Vector control: the vector is masked.
pub const PCI_MSIX_ENTRY_CTRL_MASKBIT: u32 = 1;
/// The most vectors an MSI-X table can have.
pub const PCI_MSIX_MAX_VECTORS: usize = 2048;

/// PCI Express capabilities register, 16 bits.
pub const PCI_EXP_FLAGS: usize = 2;
/// Capability version 2.
pub const PCI_EXP_FLAGS_VERS_2: u16 = 2;
/// Device/port type: PCI Express endpoint (bits 7:4 = 0).
pub const PCI_EXP_TYPE_ENDPOINT: u16 = 0;
/// Device capabilities, 32 bits.
pub const PCI_EXP_DEVCAP: usize = 4;
/// Function level reset capability.
pub const PCI_EXP_DEVCAP_FLR: u32 = 0x1000_0000;
/// Device control, 16 bits.
pub const PCI_EXP_DEVCTL: usize = 8;
/// Initiate function level reset (self-clearing, reads zero).
pub const PCI_EXP_DEVCTL_BCR_FLR: u16 = 0x8000;
/// Link capabilities, 32 bits.
pub const PCI_EXP_LNKCAP: usize = 12;
/// Supported link speed 2.5 GT/s.
pub const PCI_EXP_LNKCAP_SLS_2_5GB: u32 = 0x1;
/// Maximum link width x1 (bits 9:4).
pub const PCI_EXP_LNKCAP_MLW_X1: u32 = 0x10;
/// Link status, 16 bits.
pub const PCI_EXP_LNKSTA: usize = 18;
/// Current link speed 2.5 GT/s.
pub const PCI_EXP_LNKSTA_CLS_2_5GB: u16 = 0x1;
/// Negotiated link width x1 (bits 9:4).
pub const PCI_EXP_LNKSTA_NLW_X1: u16 = 0x10;
/// Size of a version 2 endpoint PCI Express capability.
pub const PCI_CAP_EXP_ENDPOINT_SIZEOF_V2: usize = 0x3c;

// --- virtio PCI capabilities (virtio 1.2 section 4.1.4) -------------------------------------

/// Common configuration.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// Notifications.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// Device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// PCI configuration access.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// `struct virtio_pci_cap`: generic and next fields (`cap_vndr`, `cap_next`) as above, then:
/// `cap_len`, 8 bits.
pub const VIRTIO_PCI_CAP_LEN: usize = 2;
/// `cfg_type`, 8 bits.
pub const VIRTIO_PCI_CAP_CFG_TYPE: usize = 3;
/// `bar`, 8 bits.
pub const VIRTIO_PCI_CAP_BAR: usize = 4;
/// `id`, 8 bits.
pub const VIRTIO_PCI_CAP_ID: usize = 5;
/// `offset`, 32 bits.
pub const VIRTIO_PCI_CAP_OFFSET: usize = 8;
/// `length`, 32 bits.
pub const VIRTIO_PCI_CAP_LENGTH: usize = 12;
/// `sizeof(struct virtio_pci_cap)`.
pub const VIRTIO_PCI_CAP_SIZEOF: usize = 16;
/// `notify_off_multiplier` of `struct virtio_pci_notify_cap`, 32 bits.
pub const VIRTIO_PCI_NOTIFY_CAP_MULT: usize = 16;
/// `sizeof(struct virtio_pci_notify_cap)`.
pub const VIRTIO_PCI_NOTIFY_CAP_SIZEOF: usize = 20;
/// `pci_cfg_data` of `struct virtio_pci_cfg_cap`, 4 bytes.
pub const VIRTIO_PCI_CFG_CAP_DATA: usize = 16;
/// `sizeof(struct virtio_pci_cfg_cap)`.
pub const VIRTIO_PCI_CFG_CAP_SIZEOF: usize = 20;

// --- struct virtio_pci_common_cfg (virtio 1.2 section 4.1.4.3) ------------------------------

/// `device_feature_select`, 32 bits.
pub const VIRTIO_PCI_COMMON_DFSELECT: usize = 0;
/// `device_feature`, 32 bits, read-only.
pub const VIRTIO_PCI_COMMON_DF: usize = 4;
/// `driver_feature_select`, 32 bits.
pub const VIRTIO_PCI_COMMON_GFSELECT: usize = 8;
/// `driver_feature`, 32 bits.
pub const VIRTIO_PCI_COMMON_GF: usize = 12;
/// `config_msix_vector`, 16 bits.
pub const VIRTIO_PCI_COMMON_MSIX: usize = 16;
/// `num_queues`, 16 bits, read-only.
pub const VIRTIO_PCI_COMMON_NUMQ: usize = 18;
/// `device_status`, 8 bits.
pub const VIRTIO_PCI_COMMON_STATUS: usize = 20;
/// `config_generation`, 8 bits, read-only.
pub const VIRTIO_PCI_COMMON_CFGGENERATION: usize = 21;
/// `queue_select`, 16 bits.
pub const VIRTIO_PCI_COMMON_Q_SELECT: usize = 22;
/// `queue_size`, 16 bits.
pub const VIRTIO_PCI_COMMON_Q_SIZE: usize = 24;
/// `queue_msix_vector`, 16 bits.
pub const VIRTIO_PCI_COMMON_Q_MSIX: usize = 26;
/// `queue_enable`, 16 bits.
pub const VIRTIO_PCI_COMMON_Q_ENABLE: usize = 28;
/// `queue_notify_off`, 16 bits, read-only.
pub const VIRTIO_PCI_COMMON_Q_NOFF: usize = 30;
/// `queue_desc`, 64 bits (low half).
pub const VIRTIO_PCI_COMMON_Q_DESCLO: usize = 32;
/// `queue_desc`, high half.
pub const VIRTIO_PCI_COMMON_Q_DESCHI: usize = 36;
/// `queue_driver` (avail ring), 64 bits (low half).
pub const VIRTIO_PCI_COMMON_Q_AVAILLO: usize = 40;
/// `queue_driver`, high half.
pub const VIRTIO_PCI_COMMON_Q_AVAILHI: usize = 44;
/// `queue_device` (used ring), 64 bits (low half).
pub const VIRTIO_PCI_COMMON_Q_USEDLO: usize = 48;
/// `queue_device`, high half.
pub const VIRTIO_PCI_COMMON_Q_USEDHI: usize = 52;
/// `queue_notify_data`, 16 bits, read-only (zero: no `VIRTIO_F_NOTIF_CONFIG_DATA`).
pub const VIRTIO_PCI_COMMON_Q_NDATA: usize = 56;
/// `queue_reset`, 16 bits (zero: no `VIRTIO_F_RING_RESET`).
pub const VIRTIO_PCI_COMMON_Q_RESET: usize = 58;
/// The size of `struct virtio_pci_common_cfg` up to and including `queue_reset`.
pub const VIRTIO_PCI_COMMON_CFG_LEN: usize = 60;

/// "No vector": a queue or config change with this vector raises no MSI-X message.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// ISR status: a virtqueue has used buffers (bit 0, virtio 1.2 section 4.1.4.5).
pub const VIRTIO_PCI_ISR_QUEUE: u8 = 0x1;
/// ISR status: the device configuration changed.
pub const VIRTIO_PCI_ISR_CONFIG: u8 = 0x2;
