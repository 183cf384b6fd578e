//! A userspace virtio-blk driver over any VFIO [`Transport`]: what a real
//! VFIO user does, step by step.
//!
//! 1. Config space is region `VFIO_PCI_CONFIG_REGION_INDEX`; every region's
//!    place in the device file comes from VFIO_DEVICE_GET_REGION_INFO.
//! 2. The capability list gives the virtio structures (common, notify,
//!    device configuration: which BAR, which offset) and MSI-X. vcdev's
//!    function has them all in BAR0; QEMU's virtio-pci puts them in BAR4
//!    and the MSI-X table in BAR1.
//! 3. Optionally VFIO_DEVICE_RESET; memory space and bus mastering on in
//!    the command register.
//! 4. The virtio status handshake; VERSION_1 is required, ACCESS_PLATFORM
//!    and VIRTIO_BLK_F_FLUSH are taken when offered.
//! 5. Queue 0 at fixed IOVAs ([`crate::mem`]'s layout), its memory mapped
//!    through the transport (IOAS_MAP(_FILE) or MAP_DMA).
//! 6. Completions: MSI-X vectors on eventfds (VFIO_DEVICE_SET_IRQS), or
//!    polling the used ring with VRING_AVAIL_F_NO_INTERRUPT set.
//! 7. Doorbells: an ioeventfd (VFIO_DEVICE_IOEVENTFD) or a write of the
//!    queue index to the notify address.
//!
//! Registers are read and written with pread/pwrite on the device file, or
//! (option `mmap`) with loads and stores through an mmap of the BAR when
//! its region info has VFIO_REGION_INFO_FLAG_MMAP (vfio-pci's BARs; not
//! vcdev's, which are reached by messages only).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use thiserror::Error;
use vcdev::cdev::vfio_uapi::{VfioRegionInfo, VFIO_DEVICE_FLAGS_RESET, VFIO_REGION_INFO_FLAG_MMAP};
use vcdev_device_model::pci::regs::{
    PCI_CAPABILITY_LIST, PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, PCI_CAP_LIST_ID, PCI_CAP_LIST_NEXT,
    PCI_CFG_SPACE_SIZE, PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_DEVICE_ID,
    PCI_VENDOR_ID, VIRTIO_PCI_CAP_BAR, VIRTIO_PCI_CAP_CFG_TYPE, VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_OFFSET,
    VIRTIO_PCI_COMMON_CFGGENERATION, VIRTIO_PCI_COMMON_DF, VIRTIO_PCI_COMMON_DFSELECT,
    VIRTIO_PCI_COMMON_GF, VIRTIO_PCI_COMMON_GFSELECT, VIRTIO_PCI_COMMON_MSIX,
    VIRTIO_PCI_COMMON_Q_AVAILLO, VIRTIO_PCI_COMMON_Q_DESCLO, VIRTIO_PCI_COMMON_Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_MSIX, VIRTIO_PCI_COMMON_Q_NOFF, VIRTIO_PCI_COMMON_Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE, VIRTIO_PCI_COMMON_Q_USEDLO, VIRTIO_PCI_COMMON_STATUS,
    VIRTIO_PCI_NOTIFY_CAP_MULT,
};
use vcdev_device_model::pci::RegionIndex;
use vcdev_device_model::testing::{BlkRequest, R, W};
use vcdev_iommu::Errno;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::EventFd;

use crate::mem::{DriverQueue, GuestMem, Region, DATA_GPA, DATA_SIZE, META_GPA, META_SIZE};
use crate::vfio::{Mapping, Transport, Vfio};

/// `VIRTIO_MSI_NO_VECTOR` (<linux/virtio_pci.h>; not in virtio-bindings).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// vfio-pci's MSI-X irq index (`VFIO_PCI_MSIX_IRQ_INDEX`).
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;

/// How long one request may take before the driver gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong, step by step.
#[derive(Debug, Error)]
pub enum Error {
    /// A VFIO call failed.
    #[error("{step}: {errno}")]
    Vfio {
        /// The step.
        step: &'static str,
        /// The kernel's (or vcdev's) errno.
        errno: Errno,
    },
    /// Config space lacks a virtio capability.
    #[error("no virtio {0} capability in config space")]
    MissingCap(&'static str),
    /// The device does not offer VIRTIO_F_VERSION_1.
    #[error("the device does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    /// MSI-X wanted, but no capability or fewer than 2 vectors.
    #[error("no MSI-X capability with 2 vectors (VFIO reports {0})")]
    NoMsix(u32),
    /// FEATURES_OK did not stick.
    #[error("the device refused features {0:#x}")]
    FeaturesRefused(u64),
    /// The device has not the MSI-X vectors the driver wants.
    #[error("MSI-X vector {0} refused by the device")]
    VectorRefused(u16),
    /// A request never completed.
    #[error("request {kind} at sector {sector} did not complete within {timeout:?}")]
    Timeout {
        /// `VIRTIO_BLK_T_*`.
        kind: u32,
        /// Its sector.
        sector: u64,
        /// How long the driver waited.
        timeout: Duration,
    },
    /// An MSI-X completion came without its interrupt.
    #[error("request {kind} completed without an interrupt within {timeout:?}")]
    NoInterrupt {
        /// `VIRTIO_BLK_T_*`.
        kind: u32,
        /// How long the driver waited.
        timeout: Duration,
    },
}

/// `Result` of the driver.
pub type Result<T> = std::result::Result<T, Error>;

/// Tags an errno with its step.
trait Step<T> {
    fn step(self, step: &'static str) -> Result<T>;
}

impl<T> Step<T> for std::result::Result<T, Errno> {
    fn step(self, step: &'static str) -> Result<T> {
        self.map_err(|errno| Error::Vfio { step, errno })
    }
}

/// The device file offset of a vfio-pci region (Linux's
/// `VFIO_PCI_INDEX_TO_OFFSET`: the index above bit 40; what vcdev and
/// vfio-pci both report in the region info).
pub const fn region_offset(index: RegionIndex) -> u64 {
    (index as u64) << 40
}

/// Config space in the device file, as vfio-pci lays it out.
pub const CONFIG_REGION: u64 = region_offset(RegionIndex::Config);

fn u16_at(b: &[u8], i: usize) -> u16 {
    match b.get(i..i + 2) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    match b.get(i..i + 4) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

/// Device status bits as the status byte.
fn status(bits: &[u32]) -> u8 {
    bits.iter()
        .fold(0u8, |s, &b| s | u8::try_from(b).unwrap_or(0))
}

/// Where a virtio structure lives: a BAR and an offset in it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BarOffset {
    /// The BAR (region index).
    pub bar: u8,
    /// The offset in the BAR.
    pub offset: u64,
}

/// What the capability walk found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Caps {
    /// The common configuration.
    pub common: Option<BarOffset>,
    /// The doorbells, and their multiplier.
    pub notify: Option<(BarOffset, u32)>,
    /// The device configuration (`struct virtio_blk_config`).
    pub device: Option<BarOffset>,
    /// The MSI-X table's BAR (the BIR of the MSI-X capability).
    pub msix_bar: Option<u8>,
    /// Vendor and device id.
    pub ids: (u16, u16),
}

impl Caps {
    /// Whether an MSI-X capability is present.
    pub fn msix(&self) -> bool {
        self.msix_bar.is_some()
    }
}

/// Walks the capability list of config space (at device file offset
/// `config`).
pub fn walk_caps<F: Vfio>(dev: &F, config: u64) -> Result<Caps> {
    let size = u32::try_from(PCI_CFG_SPACE_SIZE).unwrap_or(u32::MAX);
    let cfg = dev.region_read(config, size).step("config space read")?;
    let mut caps = Caps {
        ids: (u16_at(&cfg, PCI_VENDOR_ID), u16_at(&cfg, PCI_DEVICE_ID)),
        ..Caps::default()
    };
    let byte = |i: usize| cfg.get(i).copied().unwrap_or(0);
    let mut ptr = usize::from(byte(PCI_CAPABILITY_LIST));
    // At most 48 capabilities fit in the 192 bytes after the header.
    let mut guard = 0;
    while ptr != 0 && guard < 48 {
        guard += 1;
        match byte(ptr + PCI_CAP_LIST_ID) {
            PCI_CAP_ID_VNDR => {
                let at = BarOffset {
                    bar: byte(ptr + VIRTIO_PCI_CAP_BAR),
                    offset: u64::from(u32_at(&cfg, ptr + VIRTIO_PCI_CAP_OFFSET)),
                };
                // The first capability of each type is the one to use
                // (virtio 1.2, 4.1.4 "Virtio Structure PCI Capabilities").
                match byte(ptr + VIRTIO_PCI_CAP_CFG_TYPE) {
                    VIRTIO_PCI_CAP_COMMON_CFG if caps.common.is_none() => caps.common = Some(at),
                    VIRTIO_PCI_CAP_DEVICE_CFG if caps.device.is_none() => caps.device = Some(at),
                    VIRTIO_PCI_CAP_NOTIFY_CFG if caps.notify.is_none() => {
                        caps.notify = Some((at, u32_at(&cfg, ptr + VIRTIO_PCI_NOTIFY_CAP_MULT)));
                    }
                    _ => {}
                }
            }
            PCI_CAP_ID_MSIX => {
                // Table offset/BIR at +4: the BIR is the low 3 bits.
                caps.msix_bar = Some(byte(ptr + 4) & 0x7);
            }
            _ => {}
        }
        ptr = usize::from(byte(ptr + PCI_CAP_LIST_NEXT));
    }
    Ok(caps)
}

/// How the driver learns of completions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    /// MSI-X: vector 0 for configuration changes, vector 1 for queue 0,
    /// each on an eventfd; a completion must come with its interrupt.
    Msix,
    /// No interrupts: VRING_AVAIL_F_NO_INTERRUPT and no vectors; the
    /// driver polls the used ring.
    Poll,
}

/// How the driver rings the doorbell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notify {
    /// An eventfd registered with VFIO_DEVICE_IOEVENTFD.
    Ioeventfd,
    /// A 2-byte write of the queue index at the notify address (pwrite).
    Write,
}

/// How [`BlkDriver::bring_up`] brings the device up.
#[derive(Clone, Copy, Debug)]
pub struct StartOpts {
    /// Ack every feature the device offers (EVENT_IDX among them, as the
    /// vhost-user harness does), not only VERSION_1, ACCESS_PLATFORM and
    /// FLUSH.
    pub all_features: bool,
    /// Map the data region at start; without, the driver maps its buffers
    /// itself ([`BlkDriver::map_data`]).
    pub map_data: bool,
    /// Completions.
    pub irq: IrqMode,
    /// Doorbells.
    pub notify: Notify,
    /// Reach the virtio structures through an mmap of their BAR where the
    /// region allows it (VFIO_REGION_INFO_FLAG_MMAP), else pread/pwrite.
    pub mmap: bool,
    /// VFIO_DEVICE_RESET first, when VFIO_DEVICE_GET_INFO says the device
    /// has it (as DPDK and QEMU do when they take a device).
    pub reset: bool,
}

impl Default for StartOpts {
    fn default() -> Self {
        StartOpts {
            all_features: false,
            map_data: true,
            irq: IrqMode::Msix,
            notify: Notify::Ioeventfd,
            mmap: false,
            reset: false,
        }
    }
}

/// Counters of one driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests completed.
    pub requests: u64,
    /// Queue interrupts seen (eventfd reads that returned a count).
    pub irqs: u64,
    /// Doorbells rung.
    pub kicks: u64,
}

/// A virtio-blk driver over a device: memory in two sealed memfds mapped
/// through the transport at the IOVAs the split-ring driver uses.
pub struct BlkDriver<T: Transport> {
    /// The device and its DMA.
    pub t: T,
    /// The memory (IOVA == the driver's "GPA").
    pub mem: GuestMem,
    /// Queue 0.
    pub q: DriverQueue,
    /// The config-change vector's eventfd.
    pub config_irq: EventFd,
    /// What the capability walk found.
    pub caps: Caps,
    /// Device file offset of the common configuration.
    pub common: u64,
    /// Device file offset of the device configuration.
    pub device_cfg: u64,
    /// Device file offset of queue 0's doorbell.
    pub doorbell: u64,
    /// The features acked.
    pub features: u64,
    /// The options it started with.
    pub opts: StartOpts,
    /// BARs mapped for MMIO: (device file offset, size, mapping).
    pub maps: Vec<(u64, u64, Mapping)>,
    /// Counters.
    pub stats: Stats,
}

/// Reads `n` bytes at device file offset `off`: a load through a mapping
/// that covers it, else a pread.
fn reg_read<F: Vfio>(
    dev: &F,
    maps: &[(u64, u64, Mapping)],
    off: u64,
    n: u32,
) -> std::result::Result<Vec<u8>, Errno> {
    match maps
        .iter()
        .find(|(start, size, _)| off >= *start && off - start < *size)
    {
        Some((start, _, m)) => m.read(off - start, n as usize),
        None => dev.region_read(off, n),
    }
}

/// Writes `data` at device file offset `off`: a store through a mapping
/// that covers it, else a pwrite.
fn reg_write<F: Vfio>(
    dev: &F,
    maps: &[(u64, u64, Mapping)],
    off: u64,
    data: &[u8],
) -> std::result::Result<usize, Errno> {
    match maps
        .iter()
        .find(|(start, size, _)| off >= *start && off - start < *size)
    {
        Some((start, _, m)) => m.write(off - start, data),
        None => dev.region_write(off, data),
    }
}

/// The device file offset of byte `at.offset` of BAR `at.bar`.
fn place<F: Vfio>(dev: &F, at: BarOffset) -> Result<u64> {
    let info: VfioRegionInfo = dev
        .region_info(u32::from(at.bar))
        .step("region info of a virtio BAR")?;
    if at.offset >= info.size {
        return Err(Error::Vfio {
            step: "virtio structure beyond its BAR",
            errno: Errno::EINVAL,
        });
    }
    Ok(info.offset + at.offset)
}

impl<T: Transport> BlkDriver<T> {
    /// Brings the device of `t` up with queue 0 of `size` entries (at most
    /// the device's maximum).
    pub fn bring_up(t: T, size: u16, opts: StartOpts) -> Result<Self> {
        let dev = t.device();
        if opts.reset {
            let info = dev.device_info().step("device info")?;
            if info.flags & VFIO_DEVICE_FLAGS_RESET != 0 {
                dev.reset().step("VFIO_DEVICE_RESET")?;
            }
        }
        let config = dev
            .region_info(RegionIndex::Config as u32)
            .step("config region info")?
            .offset;
        let caps = walk_caps(dev, config)?;
        let common = place(dev, caps.common.ok_or(Error::MissingCap("common"))?)?;
        let device_cfg = place(dev, caps.device.ok_or(Error::MissingCap("device"))?)?;
        let (notify_at, notify_mult) = caps.notify.ok_or(Error::MissingCap("notify"))?;
        let notify = place(dev, notify_at)?;
        let mut maps = Vec::new();
        if opts.mmap {
            let mut bars: Vec<u8> = [caps.common, caps.device, Some(notify_at)]
                .iter()
                .flatten()
                .map(|b| b.bar)
                .collect();
            bars.sort_unstable();
            bars.dedup();
            for bar in bars {
                let info = dev
                    .region_info(u32::from(bar))
                    .step("region info of a virtio BAR")?;
                if info.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 {
                    let m = dev.region_mmap(info.offset, info.size).step("BAR mmap")?;
                    maps.push((info.offset, info.size, m));
                }
            }
        }

        // Memory space and bus mastering on.
        let command = config + PCI_COMMAND as u64;
        let cmd = u16_at(&dev.region_read(command, 2).step("command read")?, 0);
        let cmd = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        dev.region_write(command, &cmd.to_le_bytes())
            .step("command write")?;

        let c = common;
        let w = |off: usize, v: &[u8], step: &'static str| -> Result<()> {
            reg_write(dev, &maps, c + off as u64, v)
                .step(step)
                .map(|_| ())
        };
        let r = |off: usize, n: u32, step: &'static str| -> Result<Vec<u8>> {
            reg_read(dev, &maps, c + off as u64, n).step(step)
        };
        let w64 = |off: usize, v: u64, step: &'static str| -> Result<()> {
            w(off, &(v as u32).to_le_bytes(), step)?;
            w(off + 4, &((v >> 32) as u32).to_le_bytes(), step)
        };
        let (ack, driver, features_ok, driver_ok) = (
            status(&[VIRTIO_CONFIG_S_ACKNOWLEDGE]),
            status(&[VIRTIO_CONFIG_S_DRIVER]),
            status(&[VIRTIO_CONFIG_S_FEATURES_OK]),
            status(&[VIRTIO_CONFIG_S_DRIVER_OK]),
        );
        // Reset, and wait for it to be done (virtio 1.2, 4.1.4.3.2).
        w(VIRTIO_PCI_COMMON_STATUS, &[0], "reset")?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let status_now = || -> Result<u8> {
            let b = r(VIRTIO_PCI_COMMON_STATUS, 1, "status read")?;
            b.first().copied().ok_or(Error::Vfio {
                step: "status read came back short",
                errno: Errno::EIO,
            })
        };
        while status_now()? != 0 {
            if Instant::now() > deadline {
                return Err(Error::Vfio {
                    step: "reset never completed",
                    errno: Errno::ETIMEDOUT,
                });
            }
            std::thread::yield_now();
        }
        w(VIRTIO_PCI_COMMON_STATUS, &[ack], "status ACKNOWLEDGE")?;
        w(VIRTIO_PCI_COMMON_STATUS, &[ack | driver], "status DRIVER")?;
        let mut offered = 0u64;
        for half in 0..2u32 {
            w(
                VIRTIO_PCI_COMMON_DFSELECT,
                &half.to_le_bytes(),
                "feature select",
            )?;
            let v = u32_at(&r(VIRTIO_PCI_COMMON_DF, 4, "device features")?, 0);
            offered |= u64::from(v) << (32 * half);
        }
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::NoVersion1(offered));
        }
        let wanted = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_F_ACCESS_PLATFORM)
            | (1u64 << VIRTIO_BLK_F_FLUSH);
        let features = if opts.all_features {
            offered
        } else {
            offered & wanted
        };
        w(
            VIRTIO_PCI_COMMON_GFSELECT,
            &0u32.to_le_bytes(),
            "feature select",
        )?;
        w(
            VIRTIO_PCI_COMMON_GF,
            &(features as u32).to_le_bytes(),
            "driver features",
        )?;
        w(
            VIRTIO_PCI_COMMON_GFSELECT,
            &1u32.to_le_bytes(),
            "feature select",
        )?;
        w(
            VIRTIO_PCI_COMMON_GF,
            &((features >> 32) as u32).to_le_bytes(),
            "driver features",
        )?;
        w(
            VIRTIO_PCI_COMMON_STATUS,
            &[ack | driver | features_ok],
            "status FEATURES_OK",
        )?;
        if status_now()? & features_ok == 0 {
            return Err(Error::FeaturesRefused(features));
        }

        // Memory.
        let mut mem = GuestMem::default();
        for (iova, len) in [(META_GPA, META_SIZE), (DATA_GPA, DATA_SIZE)] {
            let region = Region::new(iova, len);
            if iova == META_GPA || opts.map_data {
                t.map(&region, 0, len, iova).step("DMA map")?;
            }
            mem.regions.push(region);
        }

        // Queue 0.
        w(
            VIRTIO_PCI_COMMON_Q_SELECT,
            &0u16.to_le_bytes(),
            "queue select",
        )?;
        let max = u16_at(&r(VIRTIO_PCI_COMMON_Q_SIZE, 2, "queue size")?, 0);
        let size = if max == 0 { size } else { size.min(max) };
        let q = DriverQueue::new_for_tests(0, size);
        let config_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Vfio {
            step: "eventfd",
            errno: Errno::from_io(&e),
        })?;
        let (config_vector, queue_vector) = match opts.irq {
            IrqMode::Msix => {
                // Vector 0 for configuration changes, 1 for queue 0.
                let vectors = dev
                    .irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
                    .step("MSI-X irq info")?
                    .count;
                if !caps.msix() || vectors < 2 {
                    return Err(Error::NoMsix(vectors));
                }
                dev.set_irqs_eventfds(
                    VFIO_PCI_MSIX_IRQ_INDEX,
                    0,
                    &[Some(evfd(&config_irq)), Some(evfd(&q.call))],
                )
                .step("SET_IRQS MSI-X eventfds")?;
                (0u16, 1u16)
            }
            IrqMode::Poll => {
                q.disable_interrupts(&mem);
                (VIRTIO_MSI_NO_VECTOR, VIRTIO_MSI_NO_VECTOR)
            }
        };
        w(
            VIRTIO_PCI_COMMON_MSIX,
            &config_vector.to_le_bytes(),
            "msix_config",
        )?;
        if u16_at(&r(VIRTIO_PCI_COMMON_MSIX, 2, "msix_config read")?, 0) != config_vector {
            return Err(Error::VectorRefused(config_vector));
        }
        w(VIRTIO_PCI_COMMON_Q_SIZE, &size.to_le_bytes(), "queue size")?;
        w(
            VIRTIO_PCI_COMMON_Q_MSIX,
            &queue_vector.to_le_bytes(),
            "queue vector",
        )?;
        if u16_at(&r(VIRTIO_PCI_COMMON_Q_MSIX, 2, "queue vector read")?, 0) != queue_vector {
            return Err(Error::VectorRefused(queue_vector));
        }
        w64(VIRTIO_PCI_COMMON_Q_DESCLO, q.ring.desc, "queue desc")?;
        w64(VIRTIO_PCI_COMMON_Q_AVAILLO, q.ring.avail, "queue avail")?;
        w64(VIRTIO_PCI_COMMON_Q_USEDLO, q.ring.used, "queue used")?;
        let notify_off = u16_at(&r(VIRTIO_PCI_COMMON_Q_NOFF, 2, "queue notify off")?, 0);
        let doorbell = notify + u64::from(notify_off) * u64::from(notify_mult);
        if opts.notify == Notify::Ioeventfd {
            dev.ioeventfd(doorbell, 2, 0, Some(evfd(&q.kick)))
                .step("IOEVENTFD")?;
        }
        w(
            VIRTIO_PCI_COMMON_Q_ENABLE,
            &1u16.to_le_bytes(),
            "queue enable",
        )?;
        w(
            VIRTIO_PCI_COMMON_STATUS,
            &[ack | driver | features_ok | driver_ok],
            "status DRIVER_OK",
        )?;
        log::info!(
            "virtio-blk up over {}: ids {:04x}:{:04x}, common {:?}, notify {:?}, msix bar {:?}, \
             features {features:#x}, queue size {size}",
            t.kind(),
            caps.ids.0,
            caps.ids.1,
            caps.common,
            caps.notify,
            caps.msix_bar
        );
        Ok(BlkDriver {
            t,
            mem,
            q,
            config_irq,
            caps,
            common,
            device_cfg,
            doorbell,
            features,
            opts,
            maps,
            stats: Stats::default(),
        })
    }

    /// Maps `len` bytes of the data region at its IOVA `iova` (a driver
    /// mapping one buffer for one request).
    pub fn map_data(&self, iova: u64, len: u64) -> std::result::Result<u64, Errno> {
        let r = self
            .mem
            .regions
            .iter()
            .find(|r| r.gpa == DATA_GPA)
            .ok_or(Errno::EINVAL)?;
        let off = iova.checked_sub(DATA_GPA).ok_or(Errno::EINVAL)?;
        self.t.map(r, off, len, iova).map(|()| iova)
    }

    /// Rings queue 0's doorbell.
    pub fn kick(&mut self) -> Result<()> {
        self.stats.kicks += 1;
        match self.opts.notify {
            Notify::Ioeventfd => self.q.kick.write(1).map_err(|e| Error::Vfio {
                step: "doorbell eventfd",
                errno: Errno::from_io(&e),
            }),
            Notify::Write => reg_write(
                self.t.device(),
                &self.maps,
                self.doorbell,
                &0u16.to_le_bytes(),
            )
            .step("doorbell write")
            .map(|_| ()),
        }
    }

    /// Waits for the next used element, (id, len): with MSI-X, for the
    /// queue's interrupt first.
    fn wait_used(&mut self, kind: u32, sector: u64) -> Result<(u32, u32)> {
        let timeout = REQUEST_TIMEOUT;
        let deadline = Instant::now() + timeout;
        let mut irq_seen = false;
        loop {
            if self.opts.irq == IrqMode::Msix && !irq_seen && wait_readable(&self.q.call, deadline)
            {
                if let Ok(n) = self.q.call.read() {
                    self.stats.irqs += 1;
                    irq_seen = n > 0;
                }
            }
            if let Some(u) = self.q.ring.pop_used(&self.mem) {
                if self.opts.irq == IrqMode::Msix && !irq_seen {
                    return Err(Error::NoInterrupt { kind, timeout });
                }
                return Ok((u.id, u.len));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    kind,
                    sector,
                    timeout,
                });
            }
            std::thread::yield_now();
        }
    }

    /// One request: header, optional data buffer at `data_iova`, status.
    /// Returns (status byte, used length).
    pub fn try_request(
        &mut self,
        kind: u32,
        sector: u64,
        data_iova: u64,
        len: u32,
        device_writes: bool,
    ) -> Result<(u8, u32)> {
        let hdr = self.q.header_gpa();
        let status = hdr + 0x100;
        BlkRequest::new(kind, sector).write(&self.mem, hdr, status);
        let data = if device_writes { W } else { R };
        let bufs = if len > 0 {
            vec![(data_iova, len, data)]
        } else {
            Vec::new()
        };
        let chain = BlkRequest::chain(hdr, &bufs, status);
        self.q.ring.write_chain(&self.mem, 0, &chain);
        self.q.offer(&self.mem, 0);
        if self.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0 && self.opts.irq == IrqMode::Msix {
            self.q.enable_calls(&self.mem);
        }
        self.kick()?;
        let (_, used) = self.wait_used(kind, sector)?;
        self.stats.requests += 1;
        Ok((self.mem.read(status, 1)[0], used))
    }

    /// [`BlkDriver::try_request`], None if it never completes (the tests'
    /// form).
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data_iova: u64,
        len: u32,
        device_writes: bool,
    ) -> Option<(u8, u32)> {
        match self.try_request(kind, sector, data_iova, len, device_writes) {
            Ok(r) => Some(r),
            Err(Error::Timeout { .. }) => None,
            Err(e) => panic!("request: {e}"),
        }
    }

    /// `config_generation` of the common configuration.
    pub fn config_generation(&self) -> u8 {
        let at = self.common + VIRTIO_PCI_COMMON_CFGGENERATION as u64;
        let b = reg_read(self.t.device(), &self.maps, at, 1).expect("generation read");
        *b.first().expect("a generation byte")
    }

    /// virtio-blk's `capacity` (512-byte sectors), read as a driver does:
    /// two 4-byte halves, again while `config_generation` moves.
    pub fn capacity(&self) -> u64 {
        let half = |off: u64| {
            u32_at(
                &reg_read(self.t.device(), &self.maps, self.device_cfg + off, 4)
                    .expect("config read"),
                0,
            )
        };
        loop {
            let before = self.config_generation();
            let (lo, hi) = (half(0), half(4));
            if self.config_generation() == before {
                return u64::from(lo) | (u64::from(hi) << 32);
            }
        }
    }

    /// Writes `data` at `sector` from the data area: the status byte.
    pub fn try_write(&mut self, sector: u64, data: &[u8]) -> Result<u8> {
        let at = self.q.data_gpa();
        self.mem.write(at, data);
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        Ok(self
            .try_request(VIRTIO_BLK_T_OUT, sector, at, len, false)?
            .0)
    }

    /// Reads `len` bytes at `sector` into the data area.
    pub fn try_read(&mut self, sector: u64, len: u32) -> Result<(u8, Vec<u8>)> {
        let at = self.q.data_gpa();
        // Stale bytes from an earlier request must not pass for the data.
        self.mem.write(at, &vec![0u8; len as usize]);
        let (st, _) = self.try_request(VIRTIO_BLK_T_IN, sector, at, len, true)?;
        Ok((st, self.mem.read(at, len as usize)))
    }

    /// A flush: the status byte.
    pub fn try_flush(&mut self) -> Result<u8> {
        Ok(self.try_request(VIRTIO_BLK_T_FLUSH, 0, 0, 0, false)?.0)
    }

    /// Isolation: unmaps the data region from the device's IOMMU, fills
    /// this queue's data buffer with a marker and reads `len` bytes at
    /// `sector` into it. Returns the status byte and whether the buffer
    /// still holds only the marker: a device whose DMA goes through the
    /// IOMMU answers VIRTIO_BLK_S_IOERR and writes nothing. The data
    /// region stays unmapped (a driver's last step).
    pub fn try_unmapped_read(&mut self, sector: u64, len: u32) -> Result<(u8, bool)> {
        const MARKER: u8 = 0x5a;
        let at = self.q.data_gpa();
        self.mem.write(at, &vec![MARKER; len as usize]);
        self.t.unmap(DATA_GPA, DATA_SIZE).step("DMA unmap")?;
        let (st, _) = self.try_request(VIRTIO_BLK_T_IN, sector, at, len, true)?;
        let untouched = self.mem.read(at, len as usize).iter().all(|&b| b == MARKER);
        Ok((st, untouched))
    }

    /// [`BlkDriver::try_write`], panicking on a transport failure.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.try_write(sector, data).expect("write completes")
    }

    /// [`BlkDriver::try_read`], panicking on a transport failure.
    pub fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        self.try_read(sector, len).expect("read completes")
    }

    /// Resets the device (status 0) and disables its MSI-X vectors: the
    /// way a driver leaves a device.
    pub fn shutdown(&mut self) -> Result<()> {
        let dev = self.t.device();
        reg_write(
            dev,
            &self.maps,
            self.common + VIRTIO_PCI_COMMON_STATUS as u64,
            &[0],
        )
        .step("reset")?;
        if self.opts.irq == IrqMode::Msix {
            dev.set_irqs_disable(VFIO_PCI_MSIX_IRQ_INDEX)
                .step("SET_IRQS MSI-X off")?;
        }
        Ok(())
    }
}

/// Whether `e` becomes readable before `deadline`.
fn wait_readable(e: &EventFd, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut pfd = libc::pollfd {
        fd: e.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}

/// An eventfd as a borrowed descriptor.
pub fn evfd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is open for as long as `e`, which the result
    // borrows.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}
