//! The cdev door from the client side: openers for the nodes of a
//! [`Vcdev`], the daemons of the cdev tests, one helper per command (through `vcdev::cdev::client`, the way
//! `iommufd_utils.h` wraps the ioctls), and the userspace virtio-blk
//! driver of `vcdev_tests::blk` started on a device bound through vcdev's
//! iommufd ([`StartExt`]).

use std::io::{Read, Write};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use vcdev::cdev::client::File;
use vcdev::cdev::vfio_uapi::VfioDeviceBindIommufd;
use vcdev_iommu::uapi::{IommuIoasAlloc, IommuIoasMap, IommuIoasMapFile};
use vcdev_iommu::Errno;
#[allow(unused_imports)] // re-exported for the test targets
pub use vcdev_tests::blk::{evfd, region_offset, walk_caps, Caps, StartOpts, CONFIG_REGION};
use vcdev_tests::vfio::IommufdBinding;
pub use vcdev_tests::vfio::MAP_RW_FIXED;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

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
pub type Bound = IommufdBinding<File>;

/// Opens, binds and attaches device `name` (the usual sequence of
/// `tools/testing/selftests/vfio` and QEMU's iommufd backend).
pub fn bind_and_attach(d: &Vcdev, name: &str) -> Bound {
    IommufdBinding::bind(d.iommufd(), d.device(name)).expect("bind and attach")
}

// ---------------------------------------------------------------------------
// The userspace virtio-blk driver (`vcdev_tests::blk`) on the cdev door

/// The driver on a device bound through vcdev's iommufd.
pub type BlkDriver = vcdev_tests::blk::BlkDriver<Bound>;

/// Starting [`BlkDriver`] on a device of a [`Vcdev`].
pub trait StartExt: Sized {
    /// Binds `name`, maps memory, brings the device up with queue 0 of
    /// `size` entries, its vector on an eventfd and its doorbell on an
    /// ioeventfd.
    fn start(d: &Vcdev, name: &str, size: u16) -> Self {
        Self::start_with(d, name, size, StartOpts::default())
    }

    /// [`StartExt::start`] with options.
    fn start_with(d: &Vcdev, name: &str, size: u16, opts: StartOpts) -> Self;
}

impl StartExt for BlkDriver {
    fn start_with(d: &Vcdev, name: &str, size: u16, opts: StartOpts) -> Self {
        let b = bind_and_attach(d, name);
        vcdev_tests::blk::BlkDriver::bring_up(b, size, opts).expect("virtio-blk driver start")
    }
}

/// The raw descriptor of a file, for tests that pass it by hand.
pub fn raw(f: &File) -> i32 {
    f.as_fd().as_raw_fd()
}

/// The raw descriptor of an eventfd.
pub fn raw_ev(e: &EventFd) -> i32 {
    e.as_raw_fd()
}
