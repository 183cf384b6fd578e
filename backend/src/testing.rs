//! Fixtures shared by this crate's property tests and the fuzz targets
//! in `tests/fuzz` (feature `testing`, off by default): descriptors to send
//! and a valid setup for the vhost-user door ([`vhost_user`]), servers,
//! request templates and the errno oracle for the cdev door ([`cdev`]).
//! Errors come back as `String`s, for proptest or a fuzz target to report.

/// The vhost-user door: messages with descriptors, the valid setup.
pub mod vhost_user {
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::time::Duration;

    use vcdev_iommu::mem::sealed_memfd;
    use vcdev_iommu::SealPolicy;
    use vhost::vhost_user::message::FrontendReq;
    use vhost::vhost_user::VhostUserVirtioFeatures;
    use virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
    use vmm_sys_util::eventfd::EventFd;

    use crate::registry::{Device, Registry};
    use crate::vhost_user::conn::{offered_protocol_features, Conn, ConnConfig};
    use crate::wire::{self, FrameHeader, WireError};

    /// The size of every memfd sent.
    pub const MEMFD_LEN: u64 = 0x10000;
    /// The user address of the valid memory region of [`setup`].
    pub const UADDR: u64 = 0x7f00_0000_0000;

    /// A descriptor to send.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Fd {
        /// A memfd of [`MEMFD_LEN`] bytes, sealed as the daemon requires.
        Memfd,
        /// An eventfd.
        Eventfd,
        /// One end of a socketpair whose other end nobody reads (a backend
        /// channel whose misses time out).
        Socket,
        /// A memfd without seals (refused by the default seal policy).
        UnsealedMemfd,
    }

    /// What the descriptors of one case need kept alive: the other ends of
    /// sockets, and the memfds (so that a test can write guest memory).
    #[derive(Default)]
    pub struct Kept {
        /// The other ends of [`Fd::Socket`]s.
        pub sockets: Vec<UnixStream>,
        /// A copy of every memfd sent, in order.
        pub memfds: Vec<std::fs::File>,
        /// A copy of every eventfd sent, in order.
        pub eventfds: Vec<EventFd>,
    }

    /// Makes a descriptor of kind `k`.
    pub fn make_fd(k: Fd, keep: &mut Kept) -> std::io::Result<OwnedFd> {
        let fd = match k {
            Fd::Memfd => sealed_memfd("vu-test", MEMFD_LEN).map_err(std::io::Error::other)?,
            Fd::UnsealedMemfd => {
                let f = memfd_unsealed("vu-test-unsealed")?;
                f.set_len(MEMFD_LEN)?;
                OwnedFd::from(f)
            }
            Fd::Eventfd => {
                let e = EventFd::new(0)?;
                keep.eventfds.push(e.try_clone()?);
                // SAFETY: `e`'s descriptor, which we own and give up.
                unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
            }
            Fd::Socket => {
                let (a, b) = UnixStream::pair()?;
                keep.sockets.push(b);
                a.into()
            }
        };
        if matches!(k, Fd::Memfd | Fd::UnsealedMemfd) {
            keep.memfds.push(std::fs::File::from(fd.try_clone()?));
        }
        Ok(fd)
    }

    fn memfd_unsealed(name: &str) -> std::io::Result<std::fs::File> {
        let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: `name` is a valid C string; memfd_create returns a new
        // descriptor or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(unsafe { std::fs::File::from_raw_fd(fd) })
    }

    /// One message: code, flags, payload, descriptors.
    #[derive(Clone, Debug)]
    pub struct Msg {
        /// The request code.
        pub code: u32,
        /// The header flags.
        pub flags: u32,
        /// The payload.
        pub payload: Vec<u8>,
        /// The descriptors that ride with it.
        pub fds: Vec<Fd>,
    }

    impl Msg {
        /// A request with flags 1 (version 1) and no descriptors.
        pub fn new(req: FrontendReq, payload: Vec<u8>) -> Msg {
            Msg {
                code: u32::from(req),
                flags: 1,
                payload,
                fds: Vec::new(),
            }
        }

        /// The same, with descriptors.
        pub fn with_fds(mut self, fds: &[Fd]) -> Msg {
            self.fds = fds.to_vec();
            self
        }
    }

    /// Little-endian bytes of `words`.
    pub fn le(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Little-endian bytes of `words`.
    pub fn u32s(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The virtio features the test RAM disk offers, with
    /// ACCESS_PLATFORM and PROTOCOL_FEATURES.
    pub fn offered_features() -> u64 {
        vcdev_device_model::testing::blk().device_features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (1 << VIRTIO_F_ACCESS_PLATFORM)
    }

    /// The valid prefix: features (with ACCESS_PLATFORM when `iommu`),
    /// protocol features, one memory region of [`MEMFD_LEN`] at guest
    /// physical 0 and user address [`UADDR`].
    pub fn setup(iommu: bool) -> Vec<Msg> {
        let mut features = offered_features();
        if !iommu {
            features &= !(1 << VIRTIO_F_ACCESS_PLATFORM);
        }
        let mut mem = u32s(&[1, 0]);
        mem.extend(le(&[0, MEMFD_LEN, UADDR, 0]));
        vec![
            Msg::new(FrontendReq::SET_FEATURES, le(&[features])),
            Msg::new(
                FrontendReq::SET_PROTOCOL_FEATURES,
                le(&[offered_protocol_features().bits()]),
            ),
            Msg::new(FrontendReq::SET_MEM_TABLE, mem).with_fds(&[Fd::Memfd]),
        ]
    }

    /// The connection options of the tests: sealed memfds required, misses
    /// answered within `miss_timeout` or failed.
    pub fn conn_config(miss_timeout: Duration) -> ConnConfig {
        ConnConfig {
            event_loop: None,
            seal_policy: SealPolicy::RequireShrinkSeal,
            iotlb_miss_timeout: miss_timeout,
            iotlb_max_entries: 64,
            iotlb_poll: Duration::ZERO,
        }
    }

    /// A connection to `dev` (claimed for it), and the frontend's end.
    pub fn conn(dev: &Arc<Device>, cfg: ConnConfig) -> Result<(Conn, UnixStream), String> {
        let own = Registry::claim_vhost_user(dev, "test", None).map_err(|e| e.to_string())?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
        Ok((Conn::new(ours, own, "test".into(), cfg), theirs))
    }

    /// Writes `m` on `sock` with its descriptors (made now, and kept as
    /// [`Kept`] says).
    pub fn send(sock: &UnixStream, m: &Msg, keep: &mut Kept) -> Result<(), WireError> {
        let fds = m
            .fds
            .iter()
            .map(|&k| make_fd(k, keep))
            .collect::<std::io::Result<Vec<OwnedFd>>>()
            .map_err(WireError::Write)?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let size = u32::try_from(m.payload.len()).unwrap_or(u32::MAX);
        let hdr = FrameHeader {
            request: m.code,
            flags: m.flags,
            size,
        };
        wire::write_frame(sock, &hdr, &m.payload, &raw)
    }
}

/// The cdev door: a server over three devices, request templates, and
/// the errno oracle.
pub mod cdev {
    use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
    use std::sync::Arc;

    use vcdev_iommu::mem::sealed_memfd;
    use vcdev_iommu::{Errno, IovaRange, SealPolicy};
    use vmm_sys_util::eventfd::EventFd;

    use std::os::fd::AsRawFd;

    use vcdev_iommu::uapi::{
        IommuDestroy, IommuIoasAlloc, IOMMUFD_CMD_DESTROY, IOMMUFD_CMD_IOAS_ALLOC,
    };
    use vm_memory::ByteValued;

    use crate::cdev::device_file::DeviceFile;
    use crate::cdev::dispatch::{dispatch, Arg, Op, Out};
    use crate::cdev::files::FileKind;
    use crate::cdev::iommufd_file::IommufdFile;
    use crate::cdev::server::Server;
    use crate::cdev::vfio_uapi::*;
    use crate::registry::{IommuView, Registry};

    /// The errnos the kernel's iommufd and vfio ioctls answer with.
    pub const KERNEL_ERRNOS: &[i32] = &[
        libc::EINVAL,
        libc::EFAULT,
        libc::E2BIG,
        libc::ENOTTY,
        libc::EOPNOTSUPP,
        libc::ENOENT,
        libc::EEXIST,
        libc::ENOSPC,
        libc::EBADF,
        libc::EBADFD,
        libc::EBUSY,
        libc::ENODEV,
        libc::EMSGSIZE,
        libc::EOVERFLOW,
        libc::ENOMEM,
        libc::EIO,
        libc::ERANGE,
        libc::EPERM,
        // IOAS_ALLOW_IOVAS over a reserved range (`iopt_set_allow_iova`),
        // IOAS_MAP onto one.
        libc::EADDRINUSE,
    ];

    /// A server over `vfio0` (full aperture), `vfio1` (a narrow aperture
    /// with a reserved hole) and `vfio2` (for the group path), each in its
    /// own group.
    pub fn server() -> Arc<Server> {
        let r = Registry::default();
        let blk = vcdev_device_model::testing::blk;
        r.add("vfio0".into(), blk());
        r.add_with_view(
            "vfio1".into(),
            blk(),
            IommuView {
                aperture: IovaRange::new(0x10_0000, 0xffff_ffff),
                reserved: vec![IovaRange::new(0x20_0000, 0x2f_ffff)],
                group: None,
            },
        );
        r.add("vfio2".into(), blk());
        Server::new(Arc::new(r), SealPolicy::RequireShrinkSeal).expect("a server")
    }

    /// A descriptor to ride with a request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum FdKind {
        /// A sealed memfd of 64 KiB.
        Memfd,
        /// An eventfd.
        Eventfd,
        /// The iommufd (or container) file handed out for the case.
        Ictx,
    }

    /// One request: the code (an index into the file's table, or any
    /// u32), a payload built from a template of the op's struct,
    /// descriptors.
    #[derive(Clone, Debug)]
    pub struct Raw {
        /// `Ok(i)`: the i-th op of the file's table (modulo its length);
        /// `Err(c)`: code `c`.
        pub code: Result<usize, u32>,
        /// `Some(v)`: the size word; `None`: the struct's size (the tail
        /// then follows it as trailing data).
        pub size_word: Option<u32>,
        /// (u32 slot, value) pokes into the template: flags, ids, iovas...
        pub pokes: Vec<(usize, u64)>,
        /// Extra bytes after the template (arrays, region data, junk).
        pub tail: Vec<u8>,
        /// Random bytes instead of a template.
        pub random: Option<Vec<u8>>,
        /// The descriptors.
        pub fds: Vec<FdKind>,
    }

    /// The payload of `raw` for `op`.
    pub fn payload<F: ?Sized>(op: Option<&Op<F>>, raw: &Raw) -> Vec<u8> {
        if let Some(r) = &raw.random {
            return r.clone();
        }
        let size = match op.map(|o| o.arg) {
            Some(Arg::Sized { size, .. } | Arg::Flex { size, .. }) => size,
            Some(Arg::Fixed(n)) => n,
            _ => 0,
        };
        let mut p = vec![0u8; size.max(4)];
        let word = raw
            .size_word
            .unwrap_or_else(|| u32::try_from(size).unwrap_or(u32::MAX));
        p[..4].copy_from_slice(&word.to_le_bytes());
        for &(slot, v) in &raw.pokes {
            // u32 slots after the size word; a u64 where it fits.
            let at = slot.saturating_mul(4).saturating_add(4);
            if let Some(d) = p.get_mut(at..at.saturating_add(8)) {
                d.copy_from_slice(&v.to_le_bytes());
            } else if let Some(d) = p.get_mut(at..at.saturating_add(4)) {
                d.copy_from_slice(&v.to_le_bytes()[..4]);
            }
        }
        p.extend_from_slice(&raw.tail);
        p
    }

    /// The case's descriptors: [`FdKind::Ictx`] is a copy of `ictx`.
    pub struct Fds {
        /// The file handed out for the case (iommufd or container).
        pub ictx: OwnedFd,
    }

    impl Fds {
        /// Descriptors of `kinds`.
        pub fn make(&self, kinds: &[FdKind]) -> Vec<OwnedFd> {
            kinds
                .iter()
                .filter_map(|k| match k {
                    FdKind::Memfd => sealed_memfd("test", 64 * 1024).ok(),
                    FdKind::Eventfd => {
                        let e = EventFd::new(0).ok()?;
                        // SAFETY: `e`'s descriptor, which we own and give up.
                        Some(unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) })
                    }
                    FdKind::Ictx => self.ictx.try_clone().ok(),
                })
                .collect()
        }
    }

    /// Checks one reply: a result `>= 0`, or an errno from the kernel's set
    /// with no descriptor.
    pub fn check_result(code: u32, out: &Out) -> Result<(), String> {
        if out.result < 0 {
            let e = out.result.saturating_neg();
            if !KERNEL_ERRNOS.contains(&e) {
                return Err(format!(
                    "request {code:#x}: errno {} is not one the kernel gives",
                    Errno(e)
                ));
            }
            if !out.fds.is_empty() {
                return Err(format!("request {code:#x}: an error with descriptors"));
            }
        }
        Ok(())
    }

    /// Runs `raw` on `file` and checks the reply. `Ok(true)`: a protocol
    /// violation (the server would close the file).
    pub fn run<F: FileKind>(file: &F, raw: &Raw, fds: &Fds) -> Result<bool, String> {
        let ops = file.ops();
        let (code, op) = match raw.code {
            Ok(i) => match ops.get(i % ops.len().max(1)) {
                Some(o) => (o.code, Some(o)),
                None => (0, None),
            },
            Err(c) => (c, ops.iter().find(|o| o.code == c)),
        };
        let p = payload(op, raw);
        let out = dispatch(ops, file, code, p, fds.make(&raw.fds), |c| file.gate(c));
        let Ok(out) = out else {
            return Ok(true);
        };
        check_result(code, &out)?;
        Ok(false)
    }

    /// Runs a valid request, which must succeed.
    pub fn valid<F: FileKind>(file: &F, code: u32, payload: Vec<u8>) -> Result<Out, String> {
        let out = dispatch(file.ops(), file, code, payload, Vec::new(), |c| {
            file.gate(c)
        })
        .map_err(|v| format!("valid request {code:#x} refused: {v}"))?;
        if out.result < 0 {
            return Err(format!("valid request {code:#x}: {}", out.result));
        }
        Ok(out)
    }

    fn size_of_u32<T>() -> u32 {
        u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
    }

    /// The payload of a valid IOAS_ALLOC.
    pub fn ioas_alloc_payload() -> Vec<u8> {
        IommuIoasAlloc {
            size: size_of_u32::<IommuIoasAlloc>(),
            ..Default::default()
        }
        .as_slice()
        .to_vec()
    }

    /// IOAS_ALLOC on `f`: the new IOAS's id.
    pub fn ioas_alloc(f: &IommufdFile) -> Result<u32, String> {
        let out = valid(f, IOMMUFD_CMD_IOAS_ALLOC, ioas_alloc_payload())?;
        let mut a = IommuIoasAlloc::default();
        a.as_mut_slice()
            .get_mut(..out.body.len())
            .ok_or("IOAS_ALLOC: reply too long")?
            .copy_from_slice(&out.body);
        Ok(a.out_ioas_id)
    }

    /// IOAS_ALLOC then DESTROY of it: the iommufd file still works.
    pub fn iommufd_still_works(f: &IommufdFile) -> Result<(), String> {
        let id = ioas_alloc(f)?;
        let d = IommuDestroy {
            size: size_of_u32::<IommuDestroy>(),
            id,
        };
        valid(f, IOMMUFD_CMD_DESTROY, d.as_slice().to_vec())?;
        Ok(())
    }

    /// The payload of a valid DEVICE_GET_INFO.
    pub fn device_info_payload() -> Vec<u8> {
        VfioDeviceInfo {
            argsz: u32::try_from(VfioDeviceInfo::SIZE).unwrap_or(u32::MAX),
            ..Default::default()
        }
        .as_slice()
        .to_vec()
    }

    /// BIND_IOMMUFD of `d` to the case's iommufd file.
    pub fn bind(d: &DeviceFile, fds: &Fds) -> Result<(), String> {
        let bind = VfioDeviceBindIommufd {
            argsz: u32::try_from(VfioDeviceBindIommufd::SIZE).unwrap_or(u32::MAX),
            flags: 0,
            iommufd: fds.ictx.as_raw_fd(),
            out_devid: 0,
        };
        let out = dispatch(
            d.ops(),
            d,
            VFIO_DEVICE_BIND_IOMMUFD,
            bind.as_slice().to_vec(),
            fds.make(&[FdKind::Ictx]),
            |c| d.gate(c),
        )
        .map_err(|v| format!("BIND refused: {v}"))?;
        if out.result != 0 {
            return Err(format!("BIND: {}", out.result));
        }
        Ok(())
    }

    /// A new IOAS of `ictx`, and ATTACH_IOMMUFD_PT of bound `d` to it.
    pub fn attach_new_ioas(ictx: &IommufdFile, d: &DeviceFile) -> Result<u32, String> {
        let id = ioas_alloc(ictx)?;
        let at = VfioDeviceAttachIommufdPt {
            argsz: 12,
            flags: 0,
            pt_id: id,
            ..Default::default()
        };
        valid(d, VFIO_DEVICE_ATTACH_IOMMUFD_PT, at.as_slice().to_vec())?;
        Ok(id)
    }

    /// SET_CONTAINER of group file `g` to the case's container file.
    #[cfg(feature = "group")]
    pub fn set_container(g: &crate::cdev::group::GroupFile, fds: &Fds) -> Result<(), String> {
        let fdnum = fds.ictx.as_raw_fd().to_le_bytes().to_vec();
        let out = dispatch(
            g.ops(),
            g,
            VFIO_GROUP_SET_CONTAINER,
            fdnum,
            fds.make(&[FdKind::Ictx]),
            |x| g.gate(x),
        )
        .map_err(|v| format!("SET_CONTAINER refused: {v}"))?;
        if out.result != 0 {
            return Err(format!("SET_CONTAINER: {}", out.result));
        }
        Ok(())
    }
}
