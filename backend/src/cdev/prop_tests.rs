//! Property tests: random and mutated requests through the dispatch of
//! every file kind, in-process (the files are built as the server builds
//! them; the ones passed as arguments are handed out for real). Every
//! reply is one result, `>= 0` or a Linux errno the kernel's ioctls give;
//! nothing panics; a valid request on the same file still works after a
//! refused one.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use proptest::prelude::*;
use vcdev_iommu::mem::sealed_memfd;
use vcdev_iommu::uapi::*;
use vcdev_iommu::{Errno, IovaRange, SealPolicy};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::device_file::DeviceFile;
use super::dispatch::{dispatch, Arg, Op, Out};
use super::files::FileKind;
use super::iommufd_file::IommufdFile;
use super::server::Server;
use super::vfio_uapi::*;
use crate::registry::{IommuView, Registry};

/// The errnos the kernel's iommufd and vfio ioctls answer with.
const KERNEL_ERRNOS: &[i32] = &[
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
];

use vcdev_device_model::testing::blk;

/// A server over `vfio0` (full aperture), `vfio1` (a narrow aperture with
/// a reserved hole) and `vfio2` (for the group path), each in its own group.
fn server() -> Arc<Server> {
    let r = Registry::default();
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
    Server::new(Arc::new(r), SealPolicy::RequireShrinkSeal).unwrap()
}

/// A descriptor to ride with a request.
#[derive(Clone, Copy, Debug)]
enum FdKind {
    Memfd,
    Eventfd,
    /// The iommufd (or container) file handed out for the case.
    Ictx,
}

/// One random request: the code (an index into the file's table, or any
/// u32), a payload built from a template of the op's struct, descriptors.
#[derive(Clone, Debug)]
struct Raw {
    code: Result<usize, u32>,
    /// `Some(v)`: the size word; `None`: the struct's size (the tail
    /// then follows it as trailing data).
    size_word: Option<u32>,
    /// (u32 slot, value) pokes into the template: flags, ids, iovas...
    pokes: Vec<(usize, u64)>,
    /// Extra bytes after the template (arrays, region data, junk).
    tail: Vec<u8>,
    /// Random bytes instead of a template.
    random: Option<Vec<u8>>,
    fds: Vec<FdKind>,
}

fn adversarial_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 4095),
        Just(1 << 63),
        Just(u64::from(u32::MAX)),
        Just(4096),
        Just(0x10_0000),
        (0u64..64).prop_map(|p| p * 4096),
        0u64..16,
        any::<u64>(),
    ]
}

fn raw() -> impl Strategy<Value = Raw> {
    (
        prop_oneof![4 => (0usize..16).prop_map(Ok), 1 => any::<u32>().prop_map(Err)],
        prop_oneof![
            3 => Just(None),
            1 => prop_oneof![0u32..96, Just(u32::MAX), any::<u32>()].prop_map(Some),
        ],
        prop::collection::vec((0usize..16, adversarial_u64()), 0..6),
        prop_oneof![
            3 => prop::collection::vec(any::<u8>(), 0..32),
            1 => prop::collection::vec(any::<u8>(), 0..4096),
        ],
        prop::option::weighted(0.15, prop::collection::vec(any::<u8>(), 0..4096)),
        prop::collection::vec(
            prop::sample::select(vec![FdKind::Memfd, FdKind::Eventfd, FdKind::Ictx]),
            0..3,
        ),
    )
        .prop_map(|(code, size_word, pokes, tail, random, fds)| Raw {
            code,
            size_word,
            pokes,
            tail,
            random,
            fds,
        })
}

/// The payload of `raw` for `op`.
fn payload<F>(op: Option<&Op<F>>, raw: &Raw) -> Vec<u8> {
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
        .unwrap_or_else(|| u32::try_from(size).unwrap());
    p[..4].copy_from_slice(&word.to_le_bytes());
    for &(slot, v) in &raw.pokes {
        // u32 slots after the size word; a u64 where it fits.
        let at = 4 + slot * 4;
        if at + 8 <= p.len() {
            p[at..at + 8].copy_from_slice(&v.to_le_bytes());
        } else if at + 4 <= p.len() {
            p[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes());
        }
    }
    p.extend_from_slice(&raw.tail);
    p
}

/// The case's descriptors.
struct Fds {
    ictx: OwnedFd,
}

impl Fds {
    fn make(&self, kinds: &[FdKind]) -> Vec<OwnedFd> {
        kinds
            .iter()
            .map(|k| match k {
                FdKind::Memfd => sealed_memfd("prop", 64 * 1024).unwrap(),
                FdKind::Eventfd => {
                    let e = EventFd::new(0).unwrap();
                    // SAFETY: `e`'s descriptor, which we own and give up.
                    unsafe {
                        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(
                            std::os::fd::IntoRawFd::into_raw_fd(e),
                        )
                    }
                }
                FdKind::Ictx => self.ictx.try_clone().unwrap(),
            })
            .collect()
    }
}

/// Runs `raw` on `file`: the reply must be one result, an errno from the
/// kernel's set or success. Returns whether it was a protocol violation.
fn run<F: FileKind>(file: &F, raw: &Raw, fds: &Fds) -> Result<bool, TestCaseError> {
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

fn check_result(code: u32, out: &Out) -> Result<(), TestCaseError> {
    if out.result < 0 {
        let e = out.result.saturating_neg();
        prop_assert!(
            KERNEL_ERRNOS.contains(&e),
            "request {code:#x}: errno {} is not one the kernel gives",
            Errno(e)
        );
        prop_assert!(out.fds.is_empty());
    }
    Ok(())
}

/// A valid request and its expected success.
fn valid<F: FileKind>(file: &F, code: u32, payload: Vec<u8>) -> Result<Out, TestCaseError> {
    let out = dispatch(file.ops(), file, code, payload, Vec::new(), |c| {
        file.gate(c)
    });
    let out = out.map_err(|v| TestCaseError::fail(format!("valid request refused: {v}")))?;
    prop_assert!(out.result >= 0, "valid request {code:#x}: {}", out.result);
    Ok(out)
}

fn ioas_alloc_payload() -> Vec<u8> {
    IommuIoasAlloc {
        size: u32::try_from(std::mem::size_of::<IommuIoasAlloc>()).unwrap(),
        ..Default::default()
    }
    .as_slice()
    .to_vec()
}

/// IOAS_ALLOC then DESTROY of it: the iommufd file still works.
fn iommufd_still_works(f: &IommufdFile) -> Result<(), TestCaseError> {
    let out = valid(f, IOMMUFD_CMD_IOAS_ALLOC, ioas_alloc_payload())?;
    let mut a = IommuIoasAlloc::default();
    a.as_mut_slice().copy_from_slice(&out.body);
    let d = IommuDestroy {
        size: 8,
        id: a.out_ioas_id,
    };
    valid(f, IOMMUFD_CMD_DESTROY, d.as_slice().to_vec())?;
    Ok(())
}

fn device_info_payload() -> Vec<u8> {
    VfioDeviceInfo {
        argsz: u32::try_from(VfioDeviceInfo::SIZE).unwrap(),
        ..Default::default()
    }
    .as_slice()
    .to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random requests on an iommufd file and on a device file bound to
    /// it (attached to an IOAS or not), interleaved.
    #[test]
    fn iommufd_and_device_files_answer_errnos(
        dev in 0usize..2,
        attach in any::<bool>(),
        reqs in prop::collection::vec((any::<bool>(), raw()), 1..24),
    ) {
        let server = server();
        let ictx = IommufdFile::new(server.files(), server.seal_policy());
        let handed = server.files().hand_out(ictx.clone()).unwrap();
        let fds = Fds { ictx: handed };
        let d = DeviceFile::new_cdev(server.files(), server.devices()[dev].clone());
        let bind = VfioDeviceBindIommufd {
            argsz: u32::try_from(VfioDeviceBindIommufd::SIZE).unwrap(),
            flags: 0,
            iommufd: fds.ictx.as_raw_fd(),
            out_devid: 0,
        };
        let out = dispatch(d.ops(), d.as_ref(), VFIO_DEVICE_BIND_IOMMUFD,
            bind.as_slice().to_vec(), fds.make(&[FdKind::Ictx]), |c| d.gate(c)).unwrap();
        prop_assert_eq!(out.result, 0);
        if attach {
            let out = valid(ictx.as_ref(), IOMMUFD_CMD_IOAS_ALLOC, ioas_alloc_payload())?;
            let mut a = IommuIoasAlloc::default();
            a.as_mut_slice().copy_from_slice(&out.body);
            let at = VfioDeviceAttachIommufdPt {
                argsz: 12,
                flags: 0,
                pt_id: a.out_ioas_id,
                ..Default::default()
            };
            valid(d.as_ref(), VFIO_DEVICE_ATTACH_IOMMUFD_PT, at.as_slice().to_vec())?;
        }
        for (on_device, r) in &reqs {
            if *on_device {
                if !run(d.as_ref(), r, &fds)? {
                    valid(d.as_ref(), VFIO_DEVICE_GET_INFO, device_info_payload())?;
                }
            } else if !run(ictx.as_ref(), r, &fds)? {
                iommufd_still_works(&ictx)?;
            }
        }
        d.release();
    }

    /// Random requests on a device file before BIND: EINVAL, or BIND's own
    /// answers.
    #[test]
    fn unbound_device_file_answers_errnos(
        reqs in prop::collection::vec(raw(), 1..16),
    ) {
        let server = server();
        let ictx = IommufdFile::new(server.files(), server.seal_policy());
        let fds = Fds { ictx: server.files().hand_out(ictx).unwrap() };
        let d = DeviceFile::new_cdev(server.files(), server.devices()[0].clone());
        for r in &reqs {
            run(d.as_ref(), r, &fds)?;
        }
        d.release();
    }
}

#[cfg(feature = "group")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random requests on a container file and a group file whose
    /// container is set (or not), interleaved.
    #[test]
    fn container_and_group_files_answer_errnos(
        set in any::<bool>(),
        reqs in prop::collection::vec((any::<bool>(), raw()), 1..24),
    ) {
        let server = server();
        let c = super::container::open(server.files(), server.seal_policy());
        let fds = Fds { ictx: server.files().hand_out(c.clone()).unwrap() };
        let group = server.devices()[2].reg().group();
        let g = server.open_group(group).unwrap();
        if set {
            let fdnum = fds.ictx.as_raw_fd().to_le_bytes().to_vec();
            let out = dispatch(g.ops(), g.as_ref(), VFIO_GROUP_SET_CONTAINER, fdnum,
                fds.make(&[FdKind::Ictx]), |x| g.gate(x)).unwrap();
            prop_assert_eq!(out.result, 0);
        }
        for (on_group, r) in &reqs {
            if *on_group {
                if !run(g.as_ref(), r, &fds)? {
                    let st = VfioGroupStatus { argsz: 8, flags: 0 };
                    valid(g.as_ref(), VFIO_GROUP_GET_STATUS, st.as_slice().to_vec())?;
                }
            } else if !run(c.as_ref(), r, &fds)? {
                valid(c.as_ref(), VFIO_GET_API_VERSION, Vec::new())?;
            }
        }
        g.release();
    }
}
