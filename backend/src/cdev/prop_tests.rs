//! Property tests: random and mutated requests through the dispatch of
//! every file kind, in-process (the files are built as the server builds
//! them; the ones passed as arguments are handed out for real). Every
//! reply is one result, `>= 0` or a Linux errno the kernel's ioctls give;
//! nothing panics; a valid request on the same file still works after a
//! refused one.

use proptest::prelude::*;

use super::device_file::DeviceFile;
use super::files::FileKind;
use super::iommufd_file::IommufdFile;
use crate::testing::cdev::*;

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

fn run_case<F: FileKind>(file: &F, raw: &Raw, fds: &Fds) -> Result<bool, TestCaseError> {
    run(file, raw, fds).map_err(TestCaseError::fail)
}

fn ok<T>(r: Result<T, String>) -> Result<T, TestCaseError> {
    r.map_err(TestCaseError::fail)
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
        ok(bind(&d, &fds))?;
        if attach {
            ok(attach_new_ioas(&ictx, &d))?;
        }
        for (on_device, r) in &reqs {
            if *on_device {
                if !run_case(d.as_ref(), r, &fds)? {
                    ok(valid(d.as_ref(), super::vfio_uapi::VFIO_DEVICE_GET_INFO, device_info_payload()))?;
                }
            } else if !run_case(ictx.as_ref(), r, &fds)? {
                ok(iommufd_still_works(&ictx))?;
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
            run_case(d.as_ref(), r, &fds)?;
        }
        d.release();
    }
}

#[cfg(feature = "group")]
use super::vfio_uapi::{VfioGroupStatus, VFIO_GET_API_VERSION, VFIO_GROUP_GET_STATUS};
#[cfg(feature = "group")]
use vm_memory::ByteValued;

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
        let g = server.open_group(group, false).unwrap();
        if set {
            ok(set_container(&g, &fds))?;
        }
        for (on_group, r) in &reqs {
            if *on_group {
                if !run_case(g.as_ref(), r, &fds)? {
                    let st = VfioGroupStatus { argsz: 8, flags: 0 };
                    ok(valid(g.as_ref(), VFIO_GROUP_GET_STATUS, st.as_slice().to_vec()))?;
                }
            } else if !run_case(c.as_ref(), r, &fds)? {
                ok(valid(c.as_ref(), VFIO_GET_API_VERSION, Vec::new()))?;
            }
        }
        g.release();
    }
}

/// Found by the fuzz target `cdev_frames` (30-minute run): IOAS_ALLOW_IOVAS
/// over the reserved hole of a device attached to the IOAS is EADDRINUSE,
/// as in the kernel (`iopt_set_allow_iova`), which the oracle's errno list
/// lacked.
#[test]
fn allow_iovas_over_a_reserved_range_is_eaddrinuse() {
    use vcdev_iommu::uapi::{IommuIoasAllowIovas, IommuIovaRange, IOMMUFD_CMD_IOAS_ALLOW_IOVAS};
    use vm_memory::ByteValued;

    let server = server();
    let ictx = IommufdFile::new(server.files(), server.seal_policy());
    let fds = Fds {
        ictx: server.files().hand_out(ictx.clone()).unwrap(),
    };
    // vfio1 reserves 0x20_0000..=0x2f_ffff.
    let d = DeviceFile::new_cdev(server.files(), server.devices()[1].clone());
    bind(&d, &fds).unwrap();
    let ioas_id = attach_new_ioas(&ictx, &d).unwrap();
    let hdr = IommuIoasAllowIovas {
        size: 24,
        ioas_id,
        num_iovas: 1,
        ..Default::default()
    };
    let range = IommuIovaRange {
        start: 0x20_0000,
        last: 0x20_0fff,
    };
    let mut payload = hdr.as_slice().to_vec();
    payload.extend_from_slice(range.as_slice());
    let out = super::dispatch::dispatch(
        ictx.ops(),
        ictx.as_ref(),
        IOMMUFD_CMD_IOAS_ALLOW_IOVAS,
        payload,
        Vec::new(),
        |c| ictx.gate(c),
    )
    .unwrap();
    assert_eq!(out.result, -libc::EADDRINUSE);
    check_result(IOMMUFD_CMD_IOAS_ALLOW_IOVAS, &out).unwrap();
    iommufd_still_works(&ictx).unwrap();
    d.release();
}
