//! The iommufd file over the cdev protocol, one test per errno rule; each
//! names the kernel selftest (`tools/testing/selftests/iommu/iommufd.c`)
//! or kernel function it mirrors. Every test starts its own daemon
//! ([`iommufd_daemon`]): `vfio0` with the full aperture, `vfio1` with the
//! aperture 0x100000-0xffffffff minus 0x200000-0x2fffff.

mod common;

use std::mem::size_of;

use std::os::fd::{AsFd, AsRawFd};

use common::cdev::{
    bind_and_attach, iommufd_daemon, iommufd_ioas, result, IoasMapExt, IoasMapFileExt,
    MAP_RW_FIXED, UNKNOWN_CODE,
};
use common::frontend::{unsealed_memfd, Region};
use vcdev::cdev::client::File;
use vcdev_iommu::uapi::*;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

/// An IOAS_ALLOC command of `size` bytes (the struct, cut or zero-extended).
fn ioas_alloc_bytes(size: u32) -> Vec<u8> {
    let c = IommuIoasAlloc {
        size,
        ..Default::default()
    };
    let mut b = c.as_slice().to_vec();
    b.resize(size as usize, 0);
    b
}

// ---------------------------------------------------------------------------
// Framing and size rules (`iommufd_fops_ioctl`, `copy_struct_from_user`)

/// TEST_F(iommufd, cmd_length): `size` below the end of the last
/// mandatory field is EINVAL.
#[test]
fn ioas_alloc_size_below_minimum_is_einval() {
    let d = iommufd_daemon("cdev-len-min");
    let f = d.iommufd();
    let mut alloc = ioas_alloc_bytes(12);
    alloc[0] = 8;
    assert_eq!(result(&f, IOMMUFD_CMD_IOAS_ALLOC, &alloc), -libc::EINVAL);
}

/// TEST_F(iommufd, cmd_length): a payload shorter than `size` (or than the
/// size word itself) is EFAULT, the kernel's bad user pointer.
#[test]
fn short_payload_is_efault() {
    let d = iommufd_daemon("cdev-len-short");
    let f = d.iommufd();
    let alloc = ioas_alloc_bytes(12);
    assert_eq!(
        result(&f, IOMMUFD_CMD_IOAS_ALLOC, &alloc[..8]),
        -libc::EFAULT
    );
    assert_eq!(result(&f, IOMMUFD_CMD_IOAS_ALLOC, &[1, 0]), -libc::EFAULT);
}

/// TEST_F(iommufd, cmd_length): `size` beyond the known struct with a
/// non-zero byte in the excess is E2BIG.
#[test]
fn nonzero_excess_is_e2big() {
    let d = iommufd_daemon("cdev-len-e2big");
    let f = d.iommufd();
    let mut big = ioas_alloc_bytes(12);
    big.extend_from_slice(&[0, 0, 0, 1]);
    big[0] = 16;
    assert_eq!(result(&f, IOMMUFD_CMD_IOAS_ALLOC, &big), -libc::E2BIG);
}

/// TEST_F(iommufd, cmd_length): with a zero excess the call behaves as
/// with the exact size, and the kernel copies back `min(size, known)`.
#[test]
fn zero_excess_behaves_as_exact_size() {
    let d = iommufd_daemon("cdev-len-zero");
    let f = d.iommufd();
    let mut big = ioas_alloc_bytes(12);
    big.extend_from_slice(&[0, 0, 0, 0]);
    big[0] = 16;
    let r = f.call(IOMMUFD_CMD_IOAS_ALLOC, &big, &[]).unwrap();
    assert_eq!(r.result, 0);
    assert_eq!(r.body.len(), 12, "the kernel copies back min(size, known)");
    assert_eq!(r.get::<IommuIoasAlloc>().out_ioas_id, 1);
}

/// TEST_F(iommufd, cmd_ex_fail): a code outside the table is ENOTTY.
#[test]
fn unknown_code_is_enotty() {
    let d = iommufd_daemon("cdev-enotty");
    let f = d.iommufd();
    assert_eq!(result(&f, UNKNOWN_CODE, &[]), -libc::ENOTTY);
    assert_eq!(result(&f, 0x101, &[]), -libc::ENOTTY);
}

// ---------------------------------------------------------------------------
// IDs and DESTROY (`iommufd_object_alloc`, `iommufd_destroy`)

/// TEST_F(iommufd, cmd_fail) / `iommufd_object_alloc`: ids start at 1,
/// the lowest free first.
#[test]
fn ids_start_at_one_lowest_free_first() {
    let d = iommufd_daemon("cdev-ids");
    let f = d.iommufd();
    assert_eq!(
        (f.ioas_alloc(), f.ioas_alloc(), f.ioas_alloc()),
        (Ok(1), Ok(2), Ok(3))
    );
    f.destroy(2).unwrap();
    assert_eq!(f.ioas_alloc(), Ok(2));
}

/// TEST_F(iommufd, cmd_fail): DESTROY of 0 or of an id never given is
/// ENOENT.
#[test]
fn destroy_unknown_id_is_enoent() {
    let d = iommufd_daemon("cdev-destroy-enoent");
    let f = d.iommufd();
    f.ioas_alloc().unwrap();
    assert_errno!(f.destroy(0), ENOENT);
    assert_errno!(f.destroy(99), ENOENT);
}

/// `iommufd_get_object`: one id space shared by every kind; a device id
/// where an IOAS is expected is ENOENT.
#[test]
fn id_of_wrong_kind_is_enoent() {
    let d = iommufd_daemon("cdev-wrong-kind");
    let f = d.iommufd();
    for _ in 0..3 {
        f.ioas_alloc().unwrap();
    }
    let dev = d.device("vfio0");
    let devid = dev.bind_iommufd(&f).unwrap();
    assert_eq!(devid, 4, "devices share the id space");
    assert_errno!(f.ioas_unmap(devid, 0, 4096), ENOENT);
}

/// TEST_F(iommufd_ioas, ioas_destroy) / `iommufd_object_remove`: a device
/// belongs to its device file, an IOAS or HWPT in use is busy: EBUSY.
#[test]
fn destroy_of_object_in_use_is_ebusy() {
    let (d, f, ioas) = iommufd_ioas("cdev-destroy-busy");
    let dev = d.device("vfio0");
    let devid = dev.bind_iommufd(&f).unwrap();
    assert_errno!(f.destroy(devid), EBUSY);
    let hwpt = dev.attach_pt(ioas).unwrap();
    assert_errno!(f.destroy(ioas), EBUSY);
    assert_errno!(f.destroy(hwpt), EBUSY);
}

// ---------------------------------------------------------------------------
// MAP / MAP_FILE / UNMAP (`iommufd_ioas_map`, `iommufd_ioas_map_file`,
// `iommufd_ioas_unmap`)

/// TEST_F(iommufd_ioas, ioas_area_destroy): MAP_FILE and MAP at fixed
/// IOVAs return the IOVA.
#[test]
fn map_and_map_file_at_fixed_iova() {
    let (_d, f, ioas) = iommufd_ioas("cdev-map");
    let r = Region::new(0, 0x10000);
    let fd = r.file.as_fd();
    assert_eq!(
        f.ioas_map_file(ioas, fd, 0, 0x4000, 0x10000, MAP_RW_FIXED),
        Ok(0x10000)
    );
    assert_eq!(
        f.ioas_map(ioas, fd, 0x4000, 0x4000, 0x20000, MAP_RW_FIXED),
        Ok(0x20000)
    );
}

/// TEST_F(iommufd_ioas, area_auto_iova): an overlapping fixed map is
/// EEXIST.
#[test]
fn map_overlap_is_eexist() {
    let (_d, f, ioas) = iommufd_ioas("cdev-map-eexist");
    let r = Region::new(0, 0x10000);
    let fd = r.file.as_fd();
    f.ioas_map_file(ioas, fd, 0, 0x4000, 0x10000, MAP_RW_FIXED)
        .unwrap();
    assert_errno!(
        f.ioas_map_file(ioas, fd, 0, 0x1000, 0x11000, MAP_RW_FIXED),
        EEXIST
    );
}

/// TEST_F(iommufd_ioas, area_auto_iova): without FIXED_IOVA the server
/// picks a free IOVA.
#[test]
fn map_auto_iova_avoids_existing_mappings() {
    let (_d, f, ioas) = iommufd_ioas("cdev-map-auto");
    let r = Region::new(0, 0x10000);
    let fd = r.file.as_fd();
    f.ioas_map_file(ioas, fd, 0, 0x4000, 0x10000, MAP_RW_FIXED)
        .unwrap();
    let auto = f
        .ioas_map(ioas, fd, 0, 0x1000, 0, IOMMU_IOAS_MAP_READABLE)
        .unwrap();
    assert_ne!(auto, 0x10000);
}

/// `iommufd_ioas_map`: a non-zero `__reserved` is EOPNOTSUPP.
#[test]
fn map_reserved_field_is_eopnotsupp() {
    let (_d, f, ioas) = iommufd_ioas("cdev-map-reserved");
    let m = IommuIoasMap {
        __reserved: 1,
        ..IommuIoasMap::fixed(ioas, 0x40000, 0x1000)
    };
    assert_eq!(
        result(&f, IOMMUFD_CMD_IOAS_MAP, m.as_slice()),
        -libc::EOPNOTSUPP
    );
}

/// PROTOCOL.md "User virtual addresses": IOAS_MAP without a descriptor
/// is EFAULT (no memory at `user_va`).
#[test]
fn map_without_descriptor_is_efault() {
    let (_d, f, ioas) = iommufd_ioas("cdev-map-nofd");
    let m = IommuIoasMap::fixed(ioas, 0x40000, 0x1000);
    assert_eq!(
        result(&f, IOMMUFD_CMD_IOAS_MAP, m.as_slice()),
        -libc::EFAULT
    );
}

/// `iommufd_ioas_map_file`: no descriptor is the kernel's `fget` failure,
/// EBADF.
#[test]
fn map_file_without_descriptor_is_ebadf() {
    let (_d, f, ioas) = iommufd_ioas("cdev-mapfile-nofd");
    let mf = IommuIoasMapFile::fixed(ioas, -1, 0, 0x40000, 0x1000);
    assert_eq!(
        result(&f, IOMMUFD_CMD_IOAS_MAP_FILE, mf.as_slice()),
        -libc::EBADF
    );
}

/// PROTOCOL.md: the `fd` field of IOAS_MAP_FILE is ignored; the
/// descriptor riding with the message is mapped.
#[test]
fn map_file_ignores_the_fd_field() {
    let (_d, f, ioas) = iommufd_ioas("cdev-mapfile-fdfield");
    let r = Region::new(0, 0x1000);
    let mf = IommuIoasMapFile::fixed(ioas, -1, 0, 0x40000, 0x1000);
    let rep = f
        .call(
            IOMMUFD_CMD_IOAS_MAP_FILE,
            mf.as_slice(),
            &[r.file.as_raw_fd()],
        )
        .unwrap();
    assert_eq!(rep.result, 0);
    assert_eq!(rep.get::<IommuIoasMapFile>().iova, 0x40000);
}

/// PROTOCOL.md "Memory for DMA": an unsealed memfd or a descriptor that is
/// no memfd is EINVAL, through IOAS_MAP and IOAS_MAP_FILE alike.
#[test]
fn map_unsealed_memfd_is_einval() {
    let (_d, f, ioas) = iommufd_ioas("cdev-map-unsealed");
    let unsealed = unsealed_memfd(0x10000);
    assert_errno!(
        f.ioas_map_file(ioas, unsealed.as_fd(), 0, 0x1000, 0x40000, MAP_RW_FIXED),
        EINVAL
    );
    assert_errno!(
        f.ioas_map(ioas, unsealed.as_fd(), 0, 0x1000, 0x40000, MAP_RW_FIXED),
        EINVAL
    );
    let ev = EventFd::new(0).unwrap();
    assert_errno!(
        f.ioas_map(
            ioas,
            common::cdev::evfd(&ev),
            0,
            0x1000,
            0x40000,
            MAP_RW_FIXED
        ),
        EINVAL
    );
}

/// PROTOCOL.md "User virtual addresses": an IOAS_MAP range beyond the
/// file's end is EFAULT (the kernel's bad user pointer).
#[test]
fn map_beyond_file_end_is_efault() {
    let (_d, f, ioas) = iommufd_ioas("cdev-map-beyond");
    let r = Region::new(0, 0x10000);
    let fd = r.file.as_fd();
    assert_errno!(
        f.ioas_map(ioas, fd, 0x8000, 0x10000, 0x40000, MAP_RW_FIXED),
        EFAULT
    );
}

/// PROTOCOL.md "Struct rules": an IOAS_MAP_FILE range beyond the file's end
/// is EINVAL, as the kernel pins the file's pages at map time (selftest
/// `iommufd`, `test_basic_file`).
#[test]
fn map_file_beyond_file_end_is_einval() {
    let (_d, f, ioas) = iommufd_ioas("cdev-mapfile-beyond");
    let r = Region::new(0, 0x10000);
    let fd = r.file.as_fd();
    assert_errno!(
        f.ioas_map_file(ioas, fd, 0x8000, 0x10000, 0x40000, MAP_RW_FIXED),
        EINVAL
    );
    assert_errno!(
        f.ioas_map_file(ioas, fd, 0, 0x10001, 0x40000, MAP_RW_FIXED),
        EINVAL
    );
    f.ioas_map_file(ioas, fd, 0x8000, 0x8000, 0x40000, MAP_RW_FIXED)
        .unwrap();
}

/// `iommufd_get_ioas`: a map into an IOAS that does not exist is ENOENT.
#[test]
fn map_unknown_ioas_is_enoent() {
    let d = iommufd_daemon("cdev-map-noioas");
    let f = d.iommufd();
    let r = Region::new(0, 0x10000);
    assert_errno!(
        f.ioas_map_file(99, r.file.as_fd(), 0, 0x1000, 0x40000, MAP_RW_FIXED),
        ENOENT
    );
}

/// TEST_F(iommufd_ioas, unmap_fully_contained_areas): UNMAP returns the
/// bytes unmapped; nothing to unmap is ENOENT; iova 0 and length U64_MAX
/// unmap everything.
#[test]
fn unmap_returns_bytes_and_nothing_mapped_is_enoent() {
    let (_d, f, ioas) = iommufd_ioas("cdev-unmap");
    let r = Region::new(0, 0x10000);
    let fd = r.file.as_fd();
    f.ioas_map_file(ioas, fd, 0, 0x4000, 0x10000, MAP_RW_FIXED)
        .unwrap();
    f.ioas_map(ioas, fd, 0x4000, 0x4000, 0x20000, MAP_RW_FIXED)
        .unwrap();
    f.ioas_map(ioas, fd, 0, 0x1000, 0, IOMMU_IOAS_MAP_READABLE)
        .unwrap();
    assert_eq!(f.ioas_unmap(ioas, 0x10000, 0x4000), Ok(0x4000));
    assert_errno!(f.ioas_unmap(ioas, 0x10000, 0x4000), ENOENT);
    assert!(f.ioas_unmap(ioas, 0, u64::MAX).unwrap() >= 0x5000);
}

// ---------------------------------------------------------------------------
// IOVA ranges (`iommufd_ioas_iova_ranges`)

/// TEST_F(iommufd_ioas, iova_ranges): with no device attached an IOAS has
/// one range, the whole space, and alignment 1.
#[test]
fn iova_ranges_without_device_is_the_whole_space() {
    let (_d, f, ioas) = iommufd_ioas("cdev-ranges-empty");
    assert_eq!(f.ioas_iova_ranges(ioas, 4), Ok((vec![(0, u64::MAX)], 1)));
}

/// TEST_F(iommufd_ioas, iova_ranges): an attached device narrows the IOAS
/// to its aperture minus its reserved ranges, alignment 4096.
#[test]
fn iova_ranges_follow_the_attached_device() {
    let (d, f, ioas) = iommufd_ioas("cdev-ranges-dev");
    let dev = d.device("vfio1");
    dev.bind_iommufd(&f).unwrap();
    dev.attach_pt(ioas).unwrap();
    let (ranges, align) = f.ioas_iova_ranges(ioas, 4).unwrap();
    assert_eq!(ranges, vec![(0x100000, 0x1fffff), (0x300000, 0xffffffff)]);
    assert_eq!(align, 4096);
}

/// TEST_F(iommufd_ioas, iova_ranges): too small a capacity is EMSGSIZE;
/// the struct (num_iovas = the total) and the ranges that fit follow.
#[test]
fn iova_ranges_too_small_is_emsgsize_with_total_and_partial_ranges() {
    let (d, f, ioas) = iommufd_ioas("cdev-ranges-emsgsize");
    let dev = d.device("vfio1");
    dev.bind_iommufd(&f).unwrap();
    dev.attach_pt(ioas).unwrap();
    let c = IommuIoasIovaRanges {
        size: size_of::<IommuIoasIovaRanges>() as u32,
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
    assert_eq!(r.after(32)[..8], 0x100000u64.to_le_bytes());
}

/// `iopt_check_iova` / `iopt_alloc_iova`: a map into a reserved range of
/// an attached device is EINVAL.
#[test]
fn map_into_reserved_range_is_einval() {
    let (d, f, ioas) = iommufd_ioas("cdev-map-reserved-range");
    let dev = d.device("vfio1");
    dev.bind_iommufd(&f).unwrap();
    dev.attach_pt(ioas).unwrap();
    let reg = Region::new(0, 0x1000);
    assert_errno!(
        f.ioas_map_file(ioas, reg.file.as_fd(), 0, 0x1000, 0x200000, MAP_RW_FIXED),
        EINVAL
    );
}

/// TEST_F(iommufd_ioas, iova_ranges): detaching the device widens the IOAS
/// back to the whole space.
#[test]
fn detach_widens_the_ioas_again() {
    let (d, f, ioas) = iommufd_ioas("cdev-ranges-detach");
    let dev = d.device("vfio1");
    dev.bind_iommufd(&f).unwrap();
    dev.attach_pt(ioas).unwrap();
    dev.detach_pt().unwrap();
    assert_eq!(f.ioas_iova_ranges(ioas, 4), Ok((vec![(0, u64::MAX)], 1)));
}

// ---------------------------------------------------------------------------
// ALLOW_IOVAS and COPY (`iommufd_ioas_allow_iovas`, `iommufd_ioas_copy`)

/// A source IOAS with 0x4000 bytes mapped at 0x10000 and a destination
/// IOAS allowed 0x100000-0x1fffff only.
fn copy_setup(d: &common::vcdev::Vcdev) -> (File, u32, u32, Region) {
    let f = d.iommufd();
    let a = f.ioas_alloc().unwrap();
    let b = f.ioas_alloc().unwrap();
    f.ioas_allow_iovas(b, &[(0x100000, 0x1fffff)]).unwrap();
    let reg = Region::new(0, 0x4000);
    f.ioas_map_file(a, reg.file.as_fd(), 0, 0x4000, 0x10000, MAP_RW_FIXED)
        .unwrap();
    (f, a, b, reg)
}

/// TEST_F(iommufd_ioas, allowed_iovas / copy_area): COPY into an IOAS with
/// allowed ranges picks an automatic IOVA inside them.
#[test]
fn allow_iovas_restricts_automatic_iovas() {
    let d = iommufd_daemon("cdev-allow");
    let (f, a, b, _reg) = copy_setup(&d);
    let iova = f
        .ioas_copy(b, a, 0x4000, 0, 0x10000, IOMMU_IOAS_MAP_READABLE)
        .unwrap();
    assert!((0x100000..=0x1fc000).contains(&iova), "{iova:#x}");
}

/// TEST_F(iommufd_ioas, copy_area): a source range not covered by
/// mappings is ENOENT.
#[test]
fn copy_of_unmapped_source_is_enoent() {
    let d = iommufd_daemon("cdev-copy-enoent");
    let (f, a, b, _reg) = copy_setup(&d);
    assert_errno!(
        f.ioas_copy(b, a, 0x4000, 0, 0x90000, IOMMU_IOAS_MAP_READABLE),
        ENOENT
    );
}

/// PROTOCOL.md "User pointers to arrays": ALLOW_IOVAS with fewer ranges
/// after the struct than `num_iovas` announces reads beyond the user's
/// array: EFAULT.
#[test]
fn allow_iovas_short_array_is_efault() {
    let d = iommufd_daemon("cdev-allow-short");
    let f = d.iommufd();
    let b = f.ioas_alloc().unwrap();
    let c = IommuIoasAllowIovas {
        size: size_of::<IommuIoasAllowIovas>() as u32,
        ioas_id: b,
        num_iovas: 2,
        ..Default::default()
    };
    assert_eq!(
        result(&f, IOMMUFD_CMD_IOAS_ALLOW_IOVAS, c.as_slice()),
        -libc::EFAULT
    );
}

// ---------------------------------------------------------------------------
// IOMMU_OPTION (`iommufd_option`)

/// TEST_F(iommufd, global_options): RLIMIT_MODE reads 0, can be set on an
/// empty context only (EBUSY after), with 0 or 1 (EINVAL else); an
/// object_id EOPNOTSUPP; an unknown option EOPNOTSUPP.
#[test]
fn option_rlimit_mode_rules() {
    let d = iommufd_daemon("cdev-option");
    let f = d.iommufd();
    let opt = |option_id, op, object_id, val64| {
        let c = IommuOption {
            size: size_of::<IommuOption>() as u32,
            option_id,
            op,
            __reserved: 0,
            object_id,
            val64,
        };
        let r = f.call(IOMMUFD_CMD_OPTION, c.as_slice(), &[]).unwrap();
        (r.result, r.get::<IommuOption>().val64)
    };
    let (get, set) = (IOMMU_OPTION_OP_GET, IOMMU_OPTION_OP_SET);
    assert_eq!(opt(IOMMU_OPTION_RLIMIT_MODE, get, 0, 7), (0, 0));
    assert_eq!(opt(IOMMU_OPTION_RLIMIT_MODE, set, 0, 2).0, -libc::EINVAL);
    assert_eq!(opt(IOMMU_OPTION_RLIMIT_MODE, set, 0, 1).0, 0);
    assert_eq!(opt(IOMMU_OPTION_RLIMIT_MODE, get, 0, 0), (0, 1));
    assert_eq!(
        opt(IOMMU_OPTION_RLIMIT_MODE, get, 1, 0).0,
        -libc::EOPNOTSUPP
    );
    assert_eq!(opt(99, get, 0, 0).0, -libc::EOPNOTSUPP);
    f.ioas_alloc().unwrap();
    assert_eq!(opt(IOMMU_OPTION_RLIMIT_MODE, set, 0, 0).0, -libc::EBUSY);
}

// ---------------------------------------------------------------------------
// GET_HW_INFO and HWPT_ALLOC (`iommufd_get_hw_info`, `iommufd_hwpt_alloc`)

/// TEST_F(iommufd_ioas, get_hw_info): a bound device has type NONE and no
/// data.
#[test]
fn get_hw_info_of_bound_device_is_type_none() {
    let d = iommufd_daemon("cdev-hwinfo");
    let b = bind_and_attach(&d, "vfio0");
    let info = b.iommufd.get_hw_info(b.devid).unwrap();
    assert_eq!(
        (info.out_data_type, info.data_len),
        (IOMMU_HW_INFO_TYPE_NONE, 0)
    );
}

/// TEST_F(iommufd_ioas, get_hw_info): an id that is no device is ENOENT.
#[test]
fn get_hw_info_of_non_device_is_enoent() {
    let d = iommufd_daemon("cdev-hwinfo-enoent");
    let b = bind_and_attach(&d, "vfio0");
    assert_errno!(b.iommufd.get_hw_info(b.ioas), ENOENT);
}

/// `iommufd_get_hw_info`: unknown flags are EOPNOTSUPP; flags 0 works.
#[test]
fn get_hw_info_unknown_flags_is_eopnotsupp() {
    let d = iommufd_daemon("cdev-hwinfo-flags");
    let b = bind_and_attach(&d, "vfio0");
    let mut c = IommuHwInfo {
        size: size_of::<IommuHwInfo>() as u32,
        flags: 1,
        dev_id: b.devid,
        ..Default::default()
    };
    assert_eq!(
        result(&b.iommufd, IOMMUFD_CMD_GET_HW_INFO, c.as_slice()),
        -libc::EOPNOTSUPP
    );
    c.flags = 0;
    assert_eq!(result(&b.iommufd, IOMMUFD_CMD_GET_HW_INFO, c.as_slice()), 0);
}

/// TEST_F(iommufd_ioas, hwpt_attach): a HWPT allocated for a device on an
/// IOAS can be attached.
#[test]
fn hwpt_alloc_on_ioas_is_attachable() {
    let d = iommufd_daemon("cdev-hwpt");
    let b = bind_and_attach(&d, "vfio0");
    let hwpt = b.iommufd.hwpt_alloc(b.devid, b.ioas).unwrap();
    assert_eq!(b.dev.attach_pt(hwpt), Ok(hwpt));
}

/// `iommufd_hwpt_alloc`: data_type NONE with a data_len is EINVAL.
#[test]
fn hwpt_alloc_with_data_is_einval() {
    let d = iommufd_daemon("cdev-hwpt-data");
    let b = bind_and_attach(&d, "vfio0");
    let bad = IommuHwptAlloc {
        size: size_of::<IommuHwptAlloc>() as u32,
        flags: 0,
        dev_id: b.devid,
        pt_id: b.ioas,
        data_type: 0,
        data_len: 8,
        ..Default::default()
    };
    assert_eq!(
        result(&b.iommufd, IOMMUFD_CMD_HWPT_ALLOC, bad.as_slice()),
        -libc::EINVAL
    );
}
