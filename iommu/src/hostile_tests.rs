//! A property test of hostile values: random sequences of every iommufd
//! command through [`Iommufd`] (and the device bind/attach/detach/unbind
//! of [`DeviceHandle`]) with u64::MAX, wrapping ranges, ids 0 and huge,
//! zero lengths and overlapping allow lists. Only results and errors
//! come back, never a panic; an error's errno is one the kernel's
//! iommufd gives; whatever translates afterwards lies inside the memfd
//! that was mapped (reading it does not fault).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use proptest::prelude::*;
use vm_memory::Permissions;

use crate::device::DeviceHandle;
use crate::io_pagetable::IovaRange;
use crate::object::Iommufd;
use crate::test_util::*;
use crate::uapi::*;
use crate::Errno;

/// Pages of the memfd every map uses.
const PAGES: u64 = 8;

/// The errnos the kernel's iommufd ioctls answer with.
const KERNEL_ERRNOS: &[Errno] = &[
    Errno::EINVAL,
    Errno::EFAULT,
    Errno::E2BIG,
    Errno::EOPNOTSUPP,
    Errno::ENOENT,
    Errno::EEXIST,
    Errno::ENOSPC,
    Errno::EBUSY,
    Errno::EMSGSIZE,
    Errno::EOVERFLOW,
    Errno::ENOMEM,
    Errno::EBADF,
    Errno(libc::ERANGE),
    Errno(libc::EPERM),
    Errno(libc::ENODEV),
    Errno(libc::EADDRINUSE),
];

fn hostile_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - P + 1),
        Just(u64::MAX - 1),
        Just(1 << 63),
        Just((1 << 63) - P),
        (0u64..=PAGES + 1).prop_map(|n| n * P),
        (0u64..64).prop_map(|n| n * P),
        any::<u64>(),
    ]
}

fn hostile_id() -> impl Strategy<Value = u32> {
    prop_oneof![
        1 => Just(0u32),
        4 => 1u32..6,
        1 => Just(u32::MAX),
        1 => Just(1 << 31),
        1 => any::<u32>(),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Alloc(u32),
    Destroy(u32),
    Map {
        flags: u32,
        ioas: u32,
        user_va: u64,
        length: u64,
        iova: u64,
    },
    MapFile {
        flags: u32,
        ioas: u32,
        start: u64,
        length: u64,
        iova: u64,
    },
    Unmap {
        ioas: u32,
        iova: u64,
        length: u64,
    },
    Copy {
        flags: u32,
        dst: u32,
        src: u32,
        length: u64,
        dst_iova: u64,
        src_iova: u64,
    },
    Allow {
        ioas: u32,
        ranges: Vec<(u64, u64)>,
    },
    Ranges {
        ioas: u32,
        capacity: u32,
    },
    Option {
        option_id: u32,
        op: u16,
        object: u32,
        val: u64,
    },
    Hwpt {
        flags: u32,
        dev: u32,
        pt: u32,
    },
    Bind(usize),
    Attach(usize, u32),
    Detach(usize),
    Unbind(usize),
    Read {
        ioas: u32,
        iova: u64,
        len: u64,
    },
}

fn flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => Just(FIXED),
        2 => Just(RW),
        1 => 0u32..8,
        1 => any::<u32>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => hostile_id().prop_map(Op::Alloc),
        1 => hostile_id().prop_map(Op::Destroy),
        3 => (flags(), hostile_id(), hostile_u64(), hostile_u64(), hostile_u64()).prop_map(
            |(flags, ioas, user_va, length, iova)| Op::Map { flags, ioas, user_va, length, iova }
        ),
        2 => (flags(), hostile_id(), hostile_u64(), hostile_u64(), hostile_u64()).prop_map(
            |(flags, ioas, start, length, iova)| Op::MapFile { flags, ioas, start, length, iova }
        ),
        2 => (hostile_id(), hostile_u64(), hostile_u64())
            .prop_map(|(ioas, iova, length)| Op::Unmap { ioas, iova, length }),
        2 => (
            prop_oneof![Just(RW), Just(FIXED), any::<u32>()],
            hostile_id(),
            hostile_id(),
            hostile_u64(),
            hostile_u64(),
            hostile_u64()
        )
            .prop_map(|(flags, dst, src, length, dst_iova, src_iova)| Op::Copy {
                flags,
                dst,
                src,
                length,
                dst_iova,
                src_iova
            }),
        2 => (hostile_id(), prop::collection::vec((hostile_u64(), hostile_u64()), 0..6))
            .prop_map(|(ioas, ranges)| Op::Allow { ioas, ranges }),
        1 => (hostile_id(), prop_oneof![0u32..4, Just(u32::MAX)])
            .prop_map(|(ioas, capacity)| Op::Ranges { ioas, capacity }),
        1 => (0u32..3, 0u16..3, hostile_id(), prop_oneof![0u64..3, any::<u64>()]).prop_map(
            |(option_id, op, object, val)| Op::Option { option_id, op, object, val }
        ),
        1 => (prop_oneof![Just(0u32), 0u32..16, any::<u32>()], hostile_id(), hostile_id())
            .prop_map(|(flags, dev, pt)| Op::Hwpt { flags, dev, pt }),
        1 => (0usize..2).prop_map(Op::Bind),
        2 => (0usize..2, hostile_id()).prop_map(|(d, pt)| Op::Attach(d, pt)),
        1 => (0usize..2).prop_map(Op::Detach),
        1 => (0usize..2).prop_map(Op::Unbind),
        2 => (hostile_id(), hostile_u64(), prop_oneof![Just(0u64), 1u64..9000, any::<u64>()])
            .prop_map(|(ioas, iova, len)| Op::Read { ioas, iova, len }),
    ]
}

/// Any error must carry a kernel errno.
fn check<T, E: std::fmt::Debug>(
    r: Result<T, E>,
    errno: impl Fn(&E) -> Errno,
) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        let n = errno(&e);
        prop_assert!(KERNEL_ERRNOS.contains(&n), "{e:?}: errno {n}");
    }
    Ok(())
}

/// Translates and reads every byte of what comes back: it must be mapped.
fn read_through(ictx: &Iommufd, ioas: u32, iova: u64, len: u64) {
    let Ok(space) = ictx.ioas_space(ioas) else {
        return;
    };
    let mut r = space.reader();
    let s = r.enter();
    let Ok(slices) = s.translate(iova, len.min(PAGES * P + 1), Permissions::Read) else {
        return;
    };
    let mut sum = 0u8;
    for sl in &slices {
        // SAFETY: `sl` was translated just now, inside the session; the
        // test is that it lies inside a live mapping.
        let bytes = unsafe { std::slice::from_raw_parts(sl.ptr.cast_const(), sl.len) };
        sum = bytes.iter().fold(sum, |a, &b| a.wrapping_add(b));
    }
    std::hint::black_box(sum);
}

fn run(
    ictx: &Arc<Iommufd>,
    devs: &[Arc<DeviceHandle>],
    fd: &OwnedFd,
    op: Op,
) -> Result<(), TestCaseError> {
    match op {
        Op::Alloc(flags) => {
            let mut cmd = IommuIoasAlloc {
                size: 12,
                flags,
                out_ioas_id: 0,
            };
            check(ictx.ioas_alloc(&mut cmd), |e| e.errno())?;
        }
        Op::Destroy(id) => check(ictx.destroy(&IommuDestroy { size: 8, id }), |e| e.errno())?,
        Op::Map {
            flags,
            ioas,
            user_va,
            length,
            iova,
        } => {
            check(map(ictx, ioas, flags, fd, user_va, length, iova), |e| {
                e.errno()
            })?;
        }
        Op::MapFile {
            flags,
            ioas,
            start,
            length,
            iova,
        } => {
            let mut cmd = IommuIoasMapFile {
                size: 40,
                flags,
                ioas_id: ioas,
                fd: 0,
                start,
                length,
                iova,
            };
            check(ictx.ioas_map_file(&mut cmd, Some(dup(fd))), |e| e.errno())?;
        }
        Op::Unmap { ioas, iova, length } => check(unmap(ictx, ioas, iova, length), |e| e.errno())?,
        Op::Copy {
            flags,
            dst,
            src,
            length,
            dst_iova,
            src_iova,
        } => {
            check(
                copy(ictx, flags, dst, dst_iova, src, src_iova, length),
                |e| e.errno(),
            )?;
        }
        Op::Allow { ioas, ranges } => check(allow(ictx, ioas, &ranges), |e| e.errno())?,
        Op::Ranges { ioas, capacity } => {
            let mut cmd = IommuIoasIovaRanges {
                size: 32,
                ioas_id: ioas,
                num_iovas: capacity,
                ..Default::default()
            };
            match ictx.ioas_iova_ranges(&mut cmd) {
                Ok(r) => prop_assert!(r.len() <= usize::try_from(capacity).unwrap()),
                Err(e) => check(Err::<(), _>(e), |e| e.errno())?,
            }
        }
        Op::Option {
            option_id,
            op,
            object,
            val,
        } => {
            let mut cmd = IommuOption {
                size: 24,
                option_id,
                op,
                __reserved: 0,
                object_id: object,
                val64: val,
            };
            check(ictx.option(&mut cmd), |e| e.errno())?;
        }
        Op::Hwpt { flags, dev, pt } => {
            let mut cmd = IommuHwptAlloc {
                size: 48,
                flags,
                dev_id: dev,
                pt_id: pt,
                ..Default::default()
            };
            check(ictx.hwpt_alloc(&mut cmd), |e| e.errno())?;
        }
        Op::Bind(d) => check(devs[d].bind(ictx), |e| e.errno())?,
        Op::Attach(d, pt) => check(devs[d].attach(pt), |e| e.errno())?,
        Op::Detach(d) => check(devs[d].detach(), |e| e.errno())?,
        Op::Unbind(d) => check(devs[d].unbind(), |e| e.errno())?,
        Op::Read { ioas, iova, len } => read_through(ictx, ioas, iova, len),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn hostile_values_are_errors_never_panics(
        aperture in prop_oneof![
            Just(IovaRange::ALL),
            Just(IovaRange::new(0x10_0000, 0xffff_ffff)),
            Just(IovaRange::new(u64::MAX - 0xffff, u64::MAX)),
            Just(IovaRange::new(0, 0)),
        ],
        reserved in prop::collection::vec(
            (hostile_u64(), hostile_u64()).prop_map(|(a, b)| IovaRange::new(a.min(b), a.max(b))),
            0..3,
        ),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let ictx = ctx();
        ioas_alloc(&ictx);
        ioas_alloc(&ictx);
        let fd = memfd(PAGES);
        let devs = [device().0, device_with(aperture, reserved).0];
        for op in ops {
            run(&ictx, &devs, &fd, op)?;
        }
        for d in &devs {
            let _ = d.unbind();
        }
    }
}
