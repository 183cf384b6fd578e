//! The iommufd file over the cdev protocol, one test per errno rule; each
//! names the kernel selftest it mirrors
//! (`tools/testing/selftests/iommu/iommufd.c`).

mod common;

use std::os::fd::AsFd;

use common::cdev::{bind_and_attach, CdevDaemon, MAP_RW_FIXED};
use common::frontend::{unsealed_memfd, Region};
use vcdev_iommu::uapi::*;
use vm_memory::ByteValued;

fn daemon(tag: &str) -> CdevDaemon {
    CdevDaemon::start(
        tag,
        &[
            "--device",
            "blk,ram=1M",
            "--device",
            "blk,ram=1M,iova-aperture=0x100000-0xffffffff,iova-reserved=0x200000-0x2fffff",
        ],
    )
}

fn result(f: &vcdev::cdev::client::File, code: u32, payload: &[u8]) -> i32 {
    f.call(code, payload, &[]).expect("reply").result
}

/// TEST_F(iommufd, cmd_length): size below the minimum EINVAL, a short
/// payload EFAULT, a longer struct with a non-zero excess E2BIG, with a
/// zero excess as the exact size; an unknown code ENOTTY
/// (TEST_F(iommufd, cmd_ex_fail)).
#[test]
fn cmd_length_rules() {
    let d = daemon("cdev-len");
    let f = d.iommufd();
    let mut alloc = IommuIoasAlloc {
        size: 8,
        ..Default::default()
    };
    assert_eq!(
        result(&f, IOMMUFD_CMD_IOAS_ALLOC, alloc.as_slice()),
        -libc::EINVAL
    );
    alloc.size = 12;
    assert_eq!(
        result(&f, IOMMUFD_CMD_IOAS_ALLOC, &alloc.as_slice()[..8]),
        -libc::EFAULT
    );
    assert_eq!(result(&f, IOMMUFD_CMD_IOAS_ALLOC, &[1, 0]), -libc::EFAULT);
    let mut big = alloc.as_slice().to_vec();
    big.extend_from_slice(&[0, 0, 0, 1]);
    big[0] = 16;
    assert_eq!(result(&f, IOMMUFD_CMD_IOAS_ALLOC, &big), -libc::E2BIG);
    big[15] = 0;
    let r = f.call(IOMMUFD_CMD_IOAS_ALLOC, &big, &[]).unwrap();
    assert_eq!(r.result, 0);
    assert_eq!(r.body.len(), 12, "the kernel copies back min(size, known)");
    assert_eq!(r.get::<IommuIoasAlloc>().out_ioas_id, 1);
    assert_eq!(result(&f, 0x7f, &[]), -libc::ENOTTY);
    assert_eq!(result(&f, 0x101, &[]), -libc::ENOTTY);
}

/// TEST_F(iommufd, cmd_fail) and `iommufd_object_alloc`: ids from 1,
/// lowest free first, one id space; DESTROY of 0 or unknown ENOENT; an id
/// of the wrong kind ENOENT.
#[test]
fn ids_and_destroy() {
    let d = daemon("cdev-ids");
    let f = d.iommufd();
    assert_eq!(
        (f.ioas_alloc(), f.ioas_alloc(), f.ioas_alloc()),
        (Ok(1), Ok(2), Ok(3))
    );
    f.destroy(2).unwrap();
    assert_eq!(f.ioas_alloc(), Ok(2));
    assert_errno!(f.destroy(0), ENOENT);
    assert_errno!(f.destroy(99), ENOENT);
    let dev = d.device("vfio0");
    let devid = dev.bind_iommufd(&f).unwrap();
    assert_eq!(devid, 4);
    assert_errno!(f.ioas_unmap(devid, 0, 4096), ENOENT);
    // A device belongs to its device file: DESTROY is EBUSY.
    assert_errno!(f.destroy(devid), EBUSY);
    let hwpt = dev.attach_pt(1).unwrap();
    assert_errno!(f.destroy(1), EBUSY);
    assert_errno!(f.destroy(hwpt), EBUSY);
}

/// TEST_F(iommufd_ioas, ioas_area_destroy / area_auto_iova / unmap_fully_contained_areas):
/// map and unmap, EEXIST on overlap, ENOENT when nothing is unmapped,
/// EOPNOTSUPP for reserved fields, EFAULT without memory (IOAS_MAP),
/// EBADF without a file (MAP_FILE), EINVAL for an unsealed file.
#[test]
fn map_unmap_rules() {
    let d = daemon("cdev-map");
    let f = d.iommufd();
    let ioas = f.ioas_alloc().unwrap();
    let r = Region::new(0, 0x10000);
    let fd = r.file.as_fd();
    assert_eq!(
        f.ioas_map_file(ioas, fd, 0, 0x4000, 0x10000, MAP_RW_FIXED),
        Ok(0x10000)
    );
    assert_errno!(
        f.ioas_map_file(ioas, fd, 0, 0x1000, 0x11000, MAP_RW_FIXED),
        EEXIST
    );
    assert_eq!(
        f.ioas_map(ioas, fd, 0x4000, 0x4000, 0x20000, MAP_RW_FIXED),
        Ok(0x20000)
    );
    // Automatic IOVA.
    let auto = f
        .ioas_map(ioas, fd, 0, 0x1000, 0, IOMMU_IOAS_MAP_READABLE)
        .unwrap();
    assert_ne!(auto, 0x10000);
    // Reserved field.
    let mut m = IommuIoasMap {
        size: 40,
        flags: MAP_RW_FIXED,
        ioas_id: ioas,
        __reserved: 1,
        user_va: 0,
        length: 0x1000,
        iova: 0x40000,
    };
    let rep = f.call(IOMMUFD_CMD_IOAS_MAP, m.as_slice(), &[]).unwrap();
    assert_eq!(rep.result, -libc::EOPNOTSUPP);
    m.__reserved = 0;
    assert_eq!(
        f.call(IOMMUFD_CMD_IOAS_MAP, m.as_slice(), &[])
            .unwrap()
            .result,
        -libc::EFAULT
    );
    let mf = IommuIoasMapFile {
        size: 40,
        flags: MAP_RW_FIXED,
        ioas_id: ioas,
        fd: -1,
        start: 0,
        length: 0x1000,
        iova: 0x40000,
    };
    assert_eq!(
        f.call(IOMMUFD_CMD_IOAS_MAP_FILE, mf.as_slice(), &[])
            .unwrap()
            .result,
        -libc::EBADF
    );
    let unsealed = unsealed_memfd(0x10000);
    assert_errno!(
        f.ioas_map_file(ioas, unsealed.as_fd(), 0, 0x1000, 0x40000, MAP_RW_FIXED),
        EINVAL
    );
    // Beyond the file's end: EFAULT.
    assert_errno!(
        f.ioas_map_file(ioas, fd, 0x8000, 0x10000, 0x40000, MAP_RW_FIXED),
        EFAULT
    );
    assert_errno!(
        f.ioas_map_file(99, fd, 0, 0x1000, 0x40000, MAP_RW_FIXED),
        ENOENT
    );
    assert_eq!(f.ioas_unmap(ioas, 0x10000, 0x4000), Ok(0x4000));
    assert_errno!(f.ioas_unmap(ioas, 0x10000, 0x4000), ENOENT);
    assert!(f.ioas_unmap(ioas, 0, u64::MAX).unwrap() >= 0x5000);
}

/// TEST_F(iommufd_ioas, iova_ranges): one range and alignment 1 with no
/// device; the device's aperture minus its reserved ranges, alignment
/// 4096, once attached; EMSGSIZE with the total and the partial ranges.
#[test]
fn iova_ranges_follow_the_attached_device() {
    let d = daemon("cdev-ranges");
    let f = d.iommufd();
    let ioas = f.ioas_alloc().unwrap();
    assert_eq!(f.ioas_iova_ranges(ioas, 4), Ok((vec![(0, u64::MAX)], 1)));
    let dev = d.device("vfio1");
    dev.bind_iommufd(&f).unwrap();
    dev.attach_pt(ioas).unwrap();
    let (ranges, align) = f.ioas_iova_ranges(ioas, 4).unwrap();
    assert_eq!(ranges, vec![(0x100000, 0x1fffff), (0x300000, 0xffffffff)]);
    assert_eq!(align, 4096);
    let c = IommuIoasIovaRanges {
        size: 32,
        ioas_id: ioas,
        num_iovas: 1,
        ..Default::default()
    };
    let r = f
        .call(IOMMUFD_CMD_IOAS_IOVA_RANGES, c.as_slice(), &[])
        .unwrap();
    assert_eq!(r.result, -libc::EMSGSIZE);
    assert_eq!(r.get::<IommuIoasIovaRanges>().num_iovas, 2);
    assert_eq!(r.after(32).len(), 16, "the partial ranges follow");
    // A map into a reserved range is EINVAL (`iopt_check_iova`).
    let reg = Region::new(0, 0x1000);
    assert_errno!(
        f.ioas_map_file(ioas, reg.file.as_fd(), 0, 0x1000, 0x200000, MAP_RW_FIXED),
        EINVAL
    );
    // Detaching widens the IOAS again.
    dev.detach_pt().unwrap();
    assert_eq!(f.ioas_iova_ranges(ioas, 4), Ok((vec![(0, u64::MAX)], 1)));
}

/// TEST_F(iommufd_ioas, allowed / copy_area): ALLOW_IOVAS restricts
/// automatic IOVAs; COPY shares the source's memory.
#[test]
fn allow_iovas_and_copy() {
    let d = daemon("cdev-copy");
    let f = d.iommufd();
    let a = f.ioas_alloc().unwrap();
    let b = f.ioas_alloc().unwrap();
    f.ioas_allow_iovas(b, &[(0x100000, 0x1fffff)]).unwrap();
    let reg = Region::new(0, 0x4000);
    f.ioas_map_file(a, reg.file.as_fd(), 0, 0x4000, 0x10000, MAP_RW_FIXED)
        .unwrap();
    let iova = f
        .ioas_copy(b, a, 0x4000, 0, 0x10000, IOMMU_IOAS_MAP_READABLE)
        .unwrap();
    assert!((0x100000..=0x1fc000).contains(&iova), "{iova:#x}");
    assert_errno!(
        f.ioas_copy(b, a, 0x4000, 0, 0x90000, IOMMU_IOAS_MAP_READABLE),
        ENOENT
    );
    // ALLOW_IOVAS with fewer ranges than announced: EFAULT.
    let c = IommuIoasAllowIovas {
        size: 24,
        ioas_id: b,
        num_iovas: 2,
        ..Default::default()
    };
    assert_eq!(
        f.call(IOMMUFD_CMD_IOAS_ALLOW_IOVAS, c.as_slice(), &[])
            .unwrap()
            .result,
        -libc::EFAULT
    );
}

/// TEST_F(iommufd_ioas, get_hw_info / hwpt_alloc): GET_HW_INFO of a bound
/// device is type NONE with no data; unknown device ENOENT; flags
/// EOPNOTSUPP. HWPT_ALLOC for a device on an IOAS works; with flags or
/// data EOPNOTSUPP / EINVAL.
#[test]
fn hw_info_and_hwpt_alloc() {
    let d = daemon("cdev-hw");
    let b = bind_and_attach(&d, "vfio0");
    let info = b.iommufd.get_hw_info(b.devid).unwrap();
    assert_eq!(
        (info.out_data_type, info.data_len),
        (IOMMU_HW_INFO_TYPE_NONE, 0)
    );
    assert_errno!(b.iommufd.get_hw_info(b.ioas), ENOENT);
    let mut c = IommuHwInfo {
        size: 40,
        flags: 1,
        dev_id: b.devid,
        ..Default::default()
    };
    assert_eq!(
        b.iommufd
            .call(IOMMUFD_CMD_GET_HW_INFO, c.as_slice(), &[])
            .unwrap()
            .result,
        -libc::EOPNOTSUPP
    );
    c.flags = 0;
    assert_eq!(
        b.iommufd
            .call(IOMMUFD_CMD_GET_HW_INFO, c.as_slice(), &[])
            .unwrap()
            .result,
        0
    );
    let hwpt = b.iommufd.hwpt_alloc(b.devid, b.ioas).unwrap();
    assert_eq!(b.dev.attach_pt(hwpt), Ok(hwpt));
    let bad = IommuHwptAlloc {
        size: 48,
        flags: 0,
        dev_id: b.devid,
        pt_id: b.ioas,
        data_type: 0,
        data_len: 8,
        ..Default::default()
    };
    assert_eq!(
        b.iommufd
            .call(IOMMUFD_CMD_HWPT_ALLOC, bad.as_slice(), &[])
            .unwrap()
            .result,
        -libc::EINVAL
    );
}
