//! The cdev door from the client side: openers for the nodes of a
//! [`Vcdev`], the daemons of the cdev tests, one helper per command (through `vcdev::cdev::client`, the way
//! `iommufd_utils.h` wraps the ioctls), and a small userspace virtio-blk
//! driver (PCI capability walk, common configuration, MSI-X eventfds,
//! ioeventfd doorbells) over the split-ring driver of [`super::frontend`].

use std::io::{Read, Write};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use vcdev::cdev::client::File;
use vcdev::cdev::vfio_uapi::VfioDeviceBindIommufd;
use vcdev_device_model::pci::regs::{
    PCI_CAPABILITY_LIST, PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, PCI_CAP_LIST_ID, PCI_CAP_LIST_NEXT,
    PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_DEVICE_ID, PCI_VENDOR_ID,
    VIRTIO_PCI_CAP_CFG_TYPE, VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_OFFSET, VIRTIO_PCI_COMMON_CFGGENERATION,
    VIRTIO_PCI_COMMON_DF, VIRTIO_PCI_COMMON_DFSELECT, VIRTIO_PCI_COMMON_GF,
    VIRTIO_PCI_COMMON_GFSELECT, VIRTIO_PCI_COMMON_MSIX, VIRTIO_PCI_COMMON_Q_AVAILLO,
    VIRTIO_PCI_COMMON_Q_DESCLO, VIRTIO_PCI_COMMON_Q_ENABLE, VIRTIO_PCI_COMMON_Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NOFF, VIRTIO_PCI_COMMON_Q_SELECT, VIRTIO_PCI_COMMON_Q_SIZE,
    VIRTIO_PCI_COMMON_Q_USEDLO, VIRTIO_PCI_COMMON_STATUS, VIRTIO_PCI_NOTIFY_CAP_MULT,
};
use vcdev_device_model::pci::RegionIndex;
use vcdev_device_model::testing::{BlkRequest, R, W};
use vcdev_iommu::uapi::{
    IommuIoasAlloc, IommuIoasMap, IommuIoasMapFile, IOMMU_IOAS_MAP_FIXED_IOVA,
    IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE,
};
use vcdev_iommu::Errno;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::frontend::{DriverQueue, GuestMem, Region, DATA_GPA, DATA_SIZE, META_GPA, META_SIZE};
use super::vcdev::Vcdev;
use super::TIMEOUT;

/// Asserts that `r` failed with errno `e`.
#[macro_export]
macro_rules! assert_errno {
    ($r:expr, $e:ident) => {
        match $r {
            Err(err) => assert_eq!(err, vcdev_iommu::Errno::$e, "{}", stringify!($r)),
            Ok(v) => panic!(
                "{} succeeded ({:?}), expected {}",
                stringify!($r),
                v,
                stringify!($e)
            ),
        }
    };
}

/// The cdev nodes of a `vcdev serve`.
impl Vcdev {
    /// Opens `DIR/iommu`.
    pub fn iommufd(&self) -> File {
        File::open(&self.path("iommu")).expect("open iommu")
    }

    /// Opens `DIR/devices/NAME`.
    pub fn device(&self, name: &str) -> File {
        File::open(&self.path(&format!("devices/{name}"))).expect("open device")
    }

    /// Opens `DIR/vfio/N`.
    pub fn group(&self, n: u32) -> Result<File, Errno> {
        File::open(&self.path(&format!("vfio/{n}")))
    }

    /// Opens `DIR/vfio/vfio`.
    pub fn container(&self) -> File {
        File::open(&self.path("vfio/vfio")).expect("open container")
    }
}

/// The daemon of the iommufd tests: `vfio0` with the default IOMMU view
/// (the full 64-bit aperture, nothing reserved) and `vfio1` with the
/// aperture 0x100000-0xffffffff and 0x200000-0x2fffff reserved.
pub fn iommufd_daemon(tag: &str) -> Vcdev {
    Vcdev::builder(tag)
        .device("blk,ram=1M")
        .device("blk,ram=1M,iova-aperture=0x100000-0xffffffff,iova-reserved=0x200000-0x2fffff")
        .spawn()
}

/// An [`iommufd_daemon`], an iommufd file of it and one IOAS in that file
/// (the start of most iommufd tests; keep the daemon bound: dropping it
/// kills it).
pub fn iommufd_ioas(tag: &str) -> (Vcdev, File, u32) {
    let d = iommufd_daemon(tag);
    let f = d.iommufd();
    let ioas = f.ioas_alloc().expect("IOAS_ALLOC");
    (d, f, ioas)
}

/// The daemon of the device tests: `vfio0` alone in group 0, `vfio1` and
/// `other` together in group 5.
pub fn device_daemon(tag: &str) -> Vcdev {
    Vcdev::builder(tag)
        .device("blk,ram=1M")
        .device("blk,ram=1M,group=5")
        .device("blk,ram=1M,name=other,group=5")
        .spawn()
}

/// The result of request `code` with `payload` and no descriptor.
pub fn result(f: &File, code: u32, payload: &[u8]) -> i32 {
    f.call(code, payload, &[]).expect("reply").result
}

/// Sends one frame with any header fields (no check of `flags` or
/// `size`): `size` is the header's word, `payload` what follows.
pub fn send_raw(f: &File, request: u32, flags: u32, size: u32, payload: &[u8], fds: &[RawFd]) {
    let hdr = vcdev::wire::FrameHeader {
        request,
        flags,
        size,
    };
    if fds.is_empty() {
        // One write: a server that closes the file on a bad header must not
        // make the payload's write fail (EPIPE) after the header's.
        let mut frame = hdr.encode().to_vec();
        frame.extend_from_slice(payload);
        f.socket().write_all(&frame).expect("frame");
    } else {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let bufs: [&[u8]; 2] = [&hdr.encode(), payload];
        let n = f.socket().send_with_fds(&bufs[..], fds).expect("sendmsg");
        assert_eq!(n, vcdev::wire::HEADER_LEN + payload.len());
    }
}

/// Whether the server closed `f` (its socket reads EOF, nothing else).
pub fn closed(f: &File) -> bool {
    let mut b = [0u8; 1];
    let mut s = f.socket();
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

// ---------------------------------------------------------------------------
// uAPI structs with the values the tests usually send (extension traits: the
// structs are the daemon's, these constructors only the tests')

/// Map flags for read-write DMA at a fixed IOVA.
pub const MAP_RW_FIXED: u32 =
    IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;

/// A command struct whose size word is its full size, everything else 0.
pub trait FullSize: ByteValued + Default {
    /// The struct with its size word set (`size` or `argsz`).
    fn full() -> Self;
}

impl FullSize for IommuIoasAlloc {
    fn full() -> Self {
        Self {
            size: size_of::<Self>() as u32,
            ..Self::default()
        }
    }
}

impl FullSize for VfioDeviceBindIommufd {
    fn full() -> Self {
        Self {
            argsz: size_of::<Self>() as u32,
            ..Self::default()
        }
    }
}

/// `IommuIoasMap::fixed`.
pub trait IoasMapExt {
    /// A read-write map of `length` bytes at the fixed `iova` in `ioas_id`,
    /// from offset 0 of the descriptor riding with the message.
    fn fixed(ioas_id: u32, iova: u64, length: u64) -> Self;
}

impl IoasMapExt for IommuIoasMap {
    fn fixed(ioas_id: u32, iova: u64, length: u64) -> Self {
        Self {
            size: size_of::<Self>() as u32,
            flags: MAP_RW_FIXED,
            ioas_id,
            length,
            iova,
            ..Self::default()
        }
    }
}

/// `IommuIoasMapFile::fixed`.
pub trait IoasMapFileExt {
    /// A read-write map of `length` bytes of file `fd` from `start`, at the
    /// fixed `iova` in `ioas_id`.
    fn fixed(ioas_id: u32, fd: i32, start: u64, iova: u64, length: u64) -> Self;
}

impl IoasMapFileExt for IommuIoasMapFile {
    fn fixed(ioas_id: u32, fd: i32, start: u64, iova: u64, length: u64) -> Self {
        Self {
            size: size_of::<Self>() as u32,
            flags: MAP_RW_FIXED,
            ioas_id,
            fd,
            start,
            length,
            iova,
        }
    }
}

/// `VfioDeviceBindIommufd::to`.
pub trait BindExt {
    /// A BIND_IOMMUFD command binding to iommufd `iommufd`.
    fn to(iommufd: i32) -> Self;
}

impl BindExt for VfioDeviceBindIommufd {
    fn to(iommufd: i32) -> Self {
        Self {
            iommufd,
            ..Self::full()
        }
    }
}

/// A request code no file kind knows (answered ENOTTY, or EINVAL on an
/// unbound device).
pub const UNKNOWN_CODE: u32 = 0x7f;

/// An iommufd with one IOAS and a device bound to it and attached.
pub struct Bound {
    /// The iommufd file.
    pub iommufd: File,
    /// The device file.
    pub dev: File,
    /// The device id.
    pub devid: u32,
    /// The IOAS.
    pub ioas: u32,
    /// The HWPT the device is attached to.
    pub hwpt: u32,
}

/// Opens, binds and attaches device `name` (the usual sequence of
/// `tools/testing/selftests/vfio` and QEMU's iommufd backend).
pub fn bind_and_attach(d: &Vcdev, name: &str) -> Bound {
    let iommufd = d.iommufd();
    let dev = d.device(name);
    let devid = dev.bind_iommufd(&iommufd).expect("bind");
    let ioas = iommufd.ioas_alloc().expect("ioas");
    let hwpt = dev.attach_pt(ioas).expect("attach");
    Bound {
        iommufd,
        dev,
        devid,
        ioas,
        hwpt,
    }
}

// ---------------------------------------------------------------------------
// The userspace virtio-blk driver

/// The offset of a vfio-pci region in the device file (Linux's
/// `VFIO_PCI_INDEX_TO_OFFSET`: the index above bit 40).
pub const fn region_offset(index: RegionIndex) -> u64 {
    (index as u64) << 40
}

/// Config space in the device file.
pub const CONFIG_REGION: u64 = region_offset(RegionIndex::Config);

/// A `virtio_pci_common_cfg` field's offset as a region offset.
fn common(field: usize) -> u64 {
    field as u64
}

/// Device status bits as the status byte.
fn status(bits: &[u32]) -> u8 {
    bits.iter().fold(0, |s, &b| s | b as u8)
}

/// What the capability walk found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Caps {
    /// BAR0 offset of the common configuration.
    pub common: u64,
    /// BAR0 offset of the doorbells and their multiplier.
    pub notify: (u64, u32),
    /// BAR0 offset of the device configuration (`struct virtio_blk_config`).
    pub device: u64,
    /// Whether an MSI-X capability is present.
    pub msix: bool,
    /// Vendor and device id.
    pub ids: (u16, u16),
}

/// A virtio-blk driver over a bound device: memory in two sealed memfds
/// mapped with IOAS_MAP_FILE at the IOVAs the split-ring driver uses.
pub struct BlkDriver {
    /// The binding.
    pub b: Bound,
    /// The memory (IOVA == the driver's "GPA").
    pub mem: GuestMem,
    /// Queue 0.
    pub q: DriverQueue,
    /// The config-change vector's eventfd.
    pub config_irq: EventFd,
    /// What the capability walk found.
    pub caps: Caps,
    /// BAR0 offset of queue 0's doorbell (its ioeventfd: 2 bytes, data 0).
    pub doorbell: u64,
    /// The features acked.
    pub features: u64,
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Walks the capability list of config space.
pub fn walk_caps(dev: &File) -> Caps {
    let cfg = dev.region_read(CONFIG_REGION, 256).expect("config read");
    let mut caps = Caps {
        ids: (u16_at(&cfg, PCI_VENDOR_ID), u16_at(&cfg, PCI_DEVICE_ID)),
        ..Caps::default()
    };
    let mut ptr = usize::from(cfg[PCI_CAPABILITY_LIST]);
    let mut guard = 0;
    while ptr != 0 && guard < 48 {
        guard += 1;
        match cfg[ptr + PCI_CAP_LIST_ID] {
            PCI_CAP_ID_VNDR => {
                let off = u64::from(u32_at(&cfg, ptr + VIRTIO_PCI_CAP_OFFSET));
                match cfg[ptr + VIRTIO_PCI_CAP_CFG_TYPE] {
                    VIRTIO_PCI_CAP_COMMON_CFG => caps.common = off,
                    VIRTIO_PCI_CAP_DEVICE_CFG => caps.device = off,
                    VIRTIO_PCI_CAP_NOTIFY_CFG => {
                        caps.notify = (off, u32_at(&cfg, ptr + VIRTIO_PCI_NOTIFY_CAP_MULT));
                    }
                    _ => {}
                }
            }
            PCI_CAP_ID_MSIX => caps.msix = true,
            _ => {}
        }
        ptr = usize::from(cfg[ptr + PCI_CAP_LIST_NEXT]);
    }
    caps
}

/// How [`BlkDriver::start_with`] brings the device up.
#[derive(Clone, Copy, Debug)]
pub struct StartOpts {
    /// Ack every feature the device offers (EVENT_IDX among them, as the
    /// vhost-user harness does), not only VERSION_1 and ACCESS_PLATFORM.
    pub all_features: bool,
    /// Map the data region in the IOAS at start; without, the driver maps
    /// its buffers itself ([`BlkDriver::map_data`]).
    pub map_data: bool,
}

impl Default for StartOpts {
    fn default() -> Self {
        StartOpts {
            all_features: false,
            map_data: true,
        }
    }
}

impl BlkDriver {
    /// Binds `name`, maps memory, brings the device up with queue 0 of
    /// `size` entries, its vector on an eventfd and its doorbell on an
    /// ioeventfd.
    pub fn start(d: &Vcdev, name: &str, size: u16) -> BlkDriver {
        Self::start_with(d, name, size, StartOpts::default())
    }

    /// Maps `len` bytes of the data region at its IOVA `iova` (a driver
    /// mapping one buffer for one request).
    pub fn map_data(&self, iova: u64, len: u64) -> Result<u64, Errno> {
        let r = self
            .mem
            .regions
            .iter()
            .find(|r| r.gpa == DATA_GPA)
            .expect("the data region");
        self.b.iommufd.ioas_map_file(
            self.b.ioas,
            r.file.as_fd(),
            iova - DATA_GPA,
            len,
            iova,
            MAP_RW_FIXED,
        )
    }

    /// [`BlkDriver::start`] with options.
    pub fn start_with(d: &Vcdev, name: &str, size: u16, opts: StartOpts) -> BlkDriver {
        let b = bind_and_attach(d, name);
        let mut mem = GuestMem::default();
        for (iova, len) in [(META_GPA, META_SIZE), (DATA_GPA, DATA_SIZE)] {
            let r = Region::new(iova, len);
            if iova == META_GPA || opts.map_data {
                let got = b
                    .iommufd
                    .ioas_map_file(b.ioas, r.file.as_fd(), 0, len, iova, MAP_RW_FIXED)
                    .expect("map");
                assert_eq!(got, iova);
            }
            mem.regions.push(r);
        }
        let dev = &b.dev;
        let caps = walk_caps(dev);
        // Memory space and bus mastering on.
        let command = CONFIG_REGION + PCI_COMMAND as u64;
        let cmd = u16_at(&dev.region_read(command, 2).unwrap(), 0);
        let cmd = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        dev.region_write(command, &cmd.to_le_bytes()).unwrap();
        let c = caps.common;
        let w8 = |off: u64, v: u8| dev.region_write(c + off, &[v]).unwrap();
        let w16 = |off: u64, v: u16| dev.region_write(c + off, &v.to_le_bytes()).unwrap();
        let w32 = |off: u64, v: u32| dev.region_write(c + off, &v.to_le_bytes()).unwrap();
        let w64 = |off: u64, v: u64| {
            w32(off, v as u32);
            w32(off + 4, (v >> 32) as u32);
        };
        let status_now = || {
            dev.region_read(c + common(VIRTIO_PCI_COMMON_STATUS), 1)
                .unwrap()[0]
        };
        let (ack, driver, features_ok, driver_ok) = (
            status(&[VIRTIO_CONFIG_S_ACKNOWLEDGE]),
            status(&[VIRTIO_CONFIG_S_DRIVER]),
            status(&[VIRTIO_CONFIG_S_FEATURES_OK]),
            status(&[VIRTIO_CONFIG_S_DRIVER_OK]),
        );
        w8(common(VIRTIO_PCI_COMMON_STATUS), 0);
        w8(common(VIRTIO_PCI_COMMON_STATUS), ack);
        w8(common(VIRTIO_PCI_COMMON_STATUS), ack | driver);
        let mut features = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_F_ACCESS_PLATFORM);
        if opts.all_features {
            let mut offered = 0u64;
            for half in 0..2u32 {
                w32(common(VIRTIO_PCI_COMMON_DFSELECT), half);
                let v = u32_at(
                    &dev.region_read(c + common(VIRTIO_PCI_COMMON_DF), 4)
                        .unwrap(),
                    0,
                );
                offered |= u64::from(v) << (32 * half);
            }
            features |= offered;
        }
        w32(common(VIRTIO_PCI_COMMON_GFSELECT), 0);
        w32(common(VIRTIO_PCI_COMMON_GF), features as u32);
        w32(common(VIRTIO_PCI_COMMON_GFSELECT), 1);
        w32(common(VIRTIO_PCI_COMMON_GF), (features >> 32) as u32);
        w8(common(VIRTIO_PCI_COMMON_STATUS), ack | driver | features_ok);
        assert_ne!(status_now() & features_ok, 0, "FEATURES_OK refused");

        let q = DriverQueue::new_for_tests(0, size);
        let config_irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        dev.set_irqs_eventfds(2, 0, &[Some(evfd(&config_irq)), Some(evfd(&q.call))])
            .expect("MSI-X eventfds");
        w16(common(VIRTIO_PCI_COMMON_MSIX), 0);
        w16(common(VIRTIO_PCI_COMMON_Q_SELECT), 0);
        w16(common(VIRTIO_PCI_COMMON_Q_SIZE), size);
        w16(common(VIRTIO_PCI_COMMON_Q_MSIX), 1);
        w64(common(VIRTIO_PCI_COMMON_Q_DESCLO), q.ring.desc);
        w64(common(VIRTIO_PCI_COMMON_Q_AVAILLO), q.ring.avail);
        w64(common(VIRTIO_PCI_COMMON_Q_USEDLO), q.ring.used);
        let notify_off = u16_at(
            &dev.region_read(c + common(VIRTIO_PCI_COMMON_Q_NOFF), 2)
                .unwrap(),
            0,
        );
        let doorbell = caps.notify.0 + u64::from(notify_off) * u64::from(caps.notify.1);
        dev.ioeventfd(doorbell, 2, 0, Some(evfd(&q.kick)))
            .expect("ioeventfd");
        w16(common(VIRTIO_PCI_COMMON_Q_ENABLE), 1);
        w8(
            common(VIRTIO_PCI_COMMON_STATUS),
            ack | driver | features_ok | driver_ok,
        );
        BlkDriver {
            b,
            mem,
            q,
            config_irq,
            caps,
            doorbell,
            features,
        }
    }

    /// One request: header, optional data buffer at `data_iova`, status.
    /// Returns (status byte, used length); None if it never completes.
    pub fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data_iova: u64,
        len: u32,
        device_writes: bool,
    ) -> Option<(u8, u32)> {
        let hdr = self.q.header_gpa();
        let status = hdr + 0x100;
        let req = BlkRequest::new(kind, sector);
        req.write(&self.mem, hdr, status);
        let data = if device_writes { W } else { R };
        let bufs = if len > 0 {
            vec![(data_iova, len, data)]
        } else {
            Vec::new()
        };
        self.q
            .submit_flags(&self.mem, &BlkRequest::chain(hdr, &bufs, status));
        let (_, used) = self.q.wait_used(&self.mem, TIMEOUT)?;
        Some((self.mem.read(status, 1)[0], used))
    }

    /// `config_generation` of the common configuration.
    pub fn config_generation(&self) -> u8 {
        let at = self.caps.common + common(VIRTIO_PCI_COMMON_CFGGENERATION);
        self.b.dev.region_read(at, 1).expect("generation read")[0]
    }

    /// virtio-blk's `capacity` (512-byte sectors), read as a driver does:
    /// two 4-byte halves, again while `config_generation` moves.
    pub fn capacity(&self) -> u64 {
        let half = |off: u64| {
            u32_at(
                &self
                    .b
                    .dev
                    .region_read(self.caps.device + off, 4)
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

    /// Writes `data` at `sector` from the data area.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        let at = self.q.data_gpa();
        self.mem.write(at, data);
        self.request(VIRTIO_BLK_T_OUT, sector, at, data.len() as u32, false)
            .expect("write completes")
            .0
    }

    /// Reads `len` bytes at `sector` into the data area.
    pub fn read(&mut self, sector: u64, len: u32) -> (u8, Vec<u8>) {
        let at = self.q.data_gpa();
        let (st, _) = self
            .request(VIRTIO_BLK_T_IN, sector, at, len, true)
            .expect("read completes");
        (st, self.mem.read(at, len as usize))
    }
}

/// The raw descriptor of a file, for tests that pass it by hand.
pub fn raw(f: &File) -> i32 {
    f.as_fd().as_raw_fd()
}

/// An eventfd as a borrowed descriptor.
pub fn evfd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is open for as long as `e`, which the result
    // borrows.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// The raw descriptor of an eventfd.
pub fn raw_ev(e: &EventFd) -> i32 {
    e.as_raw_fd()
}
