//! The device file, the group and container files, exclusivity between
//! the doors, release on close, and protocol violations. Each test names
//! the kernel code or selftest it mirrors (`tools/testing/selftests/vfio`,
//! `tools/testing/selftests/iommu/iommufd.c`, `drivers/vfio/device_cdev.c`).

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use common::cdev::{bind_and_attach, evfd, CdevDaemon, MAP_RW_FIXED};
use common::frontend::Region;
use vcdev::cdev::client::File;
use vcdev::cdev::vfio_uapi::*;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

fn daemon(tag: &str) -> CdevDaemon {
    CdevDaemon::start(
        tag,
        &[
            "--device",
            "blk,ram=1M",
            "--device",
            "blk,ram=1M,group=5",
            "--device",
            "blk,ram=1M,name=other,group=5",
        ],
    )
}

/// Whether the server closed `f` (its socket reads EOF).
fn closed(f: &File) -> bool {
    let mut b = [0u8; 1];
    let mut s = f.socket();
    s.set_read_timeout(Some(common::frontend::TIMEOUT)).unwrap();
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

/// `vfio_device_fops_unl_ioctl`: before BIND everything, unknown codes
/// and region reads included, is EINVAL.
#[test]
fn before_bind_everything_is_einval() {
    let d = daemon("cdev-unbound");
    let dev = d.device("vfio0");
    assert_errno!(dev.device_info(), EINVAL);
    assert_errno!(dev.region_read(7 << 40, 4), EINVAL);
    assert_errno!(dev.attach_pt(1), EINVAL);
    assert_eq!(dev.call(0x7777, &[], &[]).unwrap().result, -libc::EINVAL);
    assert_errno!(dev.reset(), EINVAL);
}

/// `vfio_df_ioctl_bind_iommufd`: BIND returns the device id; a second
/// BIND on the file EINVAL; BIND on another file of the device EINVAL;
/// `iommufd` < 0 EINVAL; no descriptor EBADF; a descriptor that is no
/// iommufd file EBADFD.
#[test]
fn bind_rules() {
    let d = daemon("cdev-bind");
    let f = d.iommufd();
    let dev = d.device("vfio0");
    let mut c = VfioDeviceBindIommufd {
        argsz: 16,
        flags: 0,
        iommufd: -1,
        out_devid: 0,
    };
    assert_eq!(
        dev.call(VFIO_DEVICE_BIND_IOMMUFD, c.as_slice(), &[])
            .unwrap()
            .result,
        -libc::EINVAL
    );
    c.iommufd = 3;
    assert_eq!(
        dev.call(VFIO_DEVICE_BIND_IOMMUFD, c.as_slice(), &[])
            .unwrap()
            .result,
        -libc::EBADF
    );
    let ev = EventFd::new(0).unwrap();
    assert_eq!(
        dev.call(
            VFIO_DEVICE_BIND_IOMMUFD,
            c.as_slice(),
            &[common::cdev::raw_ev(&ev)]
        )
        .unwrap()
        .result,
        -libc::EBADFD
    );
    let other_dev = d.device("vfio1");
    assert_errno!(dev.bind_iommufd(&other_dev), EBADFD);
    assert_eq!(dev.bind_iommufd(&f), Ok(1));
    assert_errno!(dev.bind_iommufd(&f), EINVAL);
    let dev2 = d.device("vfio0");
    assert_errno!(dev2.bind_iommufd(&f), EINVAL);
    let info = dev.device_info().unwrap();
    assert_eq!(info.flags, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    let bar0 = dev.region_info(0).unwrap();
    assert_eq!(
        bar0.flags,
        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
    );
    assert_eq!(dev.region_info(7).unwrap().offset, 7 << 40);
    assert_errno!(dev.region_info(8), EINVAL);
    assert_errno!(dev.region_info(9), EINVAL);
    assert_eq!(dev.irq_info(2).unwrap().count, 2);
    assert_errno!(dev.irq_info(5), EINVAL);
}

/// TEST_F(iommufd_device, attach/replace/detach) through VFIO: ATTACH to
/// an IOAS gives its automatic HWPT; replace to another IOAS; DETACH;
/// unknown pt ENOENT; PASID EOPNOTSUPP.
#[test]
fn attach_replace_detach() {
    let d = daemon("cdev-attach");
    let b = bind_and_attach(&d, "vfio0");
    assert_ne!(b.hwpt, b.ioas);
    let ioas2 = b.iommufd.ioas_alloc().unwrap();
    let hwpt2 = b.dev.attach_pt(ioas2).unwrap();
    assert_ne!(hwpt2, b.hwpt);
    // The first automatic HWPT went with its last device.
    assert_errno!(b.iommufd.destroy(b.hwpt), ENOENT);
    assert_errno!(b.dev.attach_pt(999), ENOENT);
    let pasid = VfioDeviceAttachIommufdPt {
        argsz: 16,
        flags: 1,
        pt_id: ioas2,
        pasid: 1,
    };
    assert_eq!(
        b.dev
            .call(VFIO_DEVICE_ATTACH_IOMMUFD_PT, pasid.as_slice(), &[])
            .unwrap()
            .result,
        -libc::EOPNOTSUPP
    );
    b.dev.detach_pt().unwrap();
    assert_errno!(b.iommufd.destroy(hwpt2), ENOENT);
    b.iommufd.destroy(ioas2).unwrap();
}

/// `vfio_df_unbind_iommufd` on close: the device detaches and unbinds, the
/// IOAS and its mappings stay; closing the iommufd while bound tears
/// nothing down until the device file closes.
#[test]
fn release_on_close() {
    let d = daemon("cdev-release");
    let b = bind_and_attach(&d, "vfio0");
    let reg = Region::new(0, 0x4000);
    b.iommufd
        .ioas_map_file(b.ioas, reg.file.as_fd(), 0, 0x4000, 0x10000, MAP_RW_FIXED)
        .unwrap();
    let dup = b.dev.try_clone().unwrap();
    drop(b.dev);
    // A copy is still open: still bound.
    assert!(dup.device_info().is_ok());
    drop(dup);
    let again = d.device("vfio0");
    let devid = common::poll_until(common::frontend::TIMEOUT, || {
        again.bind_iommufd(&b.iommufd).ok()
    })
    .expect("bindable again after close");
    assert_eq!(
        devid, b.devid,
        "the old device object went: its id is the lowest free"
    );
    assert_eq!(
        b.iommufd.ioas_unmap(b.ioas, 0x10000, 0x4000),
        Ok(0x4000),
        "mappings stay"
    );
    // Close the iommufd while bound: the device still works.
    again.attach_pt(b.ioas).unwrap();
    drop(b.iommufd);
    assert!(again.region_read(7 << 40, 4).is_ok());
    assert!(again.detach_pt().is_ok());
}

/// `vfio_device_block_group` / group open: exclusivity both ways between
/// the cdev, the group file and vhost-user.
#[cfg(feature = "group")]
#[test]
fn cdev_group_and_vhost_user_exclude_each_other() {
    let d = daemon("cdev-excl");
    let f = d.iommufd();
    // Group 5 holds vfio1 and other.
    let g = d.group(5).unwrap();
    assert_errno!(d.group(5), EBUSY);
    let dev = d.device("other");
    assert_errno!(dev.bind_iommufd(&f), EBUSY);
    drop(g);
    let devid = common::poll_until(common::frontend::TIMEOUT, || dev.bind_iommufd(&f).ok());
    assert!(devid.is_some());
    assert_errno!(d.group(5), EBUSY);
    // vhost-user on a bound device is refused: the connection is closed.
    let mut s = UnixStream::connect(d.path("vhost-user/other")).unwrap();
    s.set_read_timeout(Some(common::frontend::TIMEOUT)).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    drop(dev);
    // A vhost-user frontend holds the device: group open and BIND EBUSY.
    let h = common::poll_until(common::frontend::TIMEOUT, || {
        d.ctl(&["list"])
            .1
            .lines()
            .any(|l| l.starts_with("other") && l.contains("owner none"))
            .then_some(())
    });
    assert!(h.is_some());
    let _vu = common::frontend::Harness::start(&d.path("vhost-user/vfio0"), 1, 256);
    assert_errno!(d.group(0), EBUSY);
    let dev0 = d.device("vfio0");
    assert_errno!(dev0.bind_iommufd(&f), EBUSY);
}

/// Without the `group` feature there are no `DIR/vfio` nodes, and the cdev
/// and vhost-user paths exclude each other alone (PROTOCOL.md).
#[cfg(not(feature = "group"))]
#[test]
fn without_group_cdev_and_vhost_user_exclude_each_other_alone() {
    let d = daemon("cdev-nogroup");
    assert!(
        !d.path("vfio").exists(),
        "DIR/vfio exists without the group feature"
    );
    let f = d.iommufd();
    let dev = d.device("other");
    dev.bind_iommufd(&f).unwrap();
    // vhost-user on a bound device is refused: the connection is closed.
    let mut s = UnixStream::connect(d.path("vhost-user/other")).unwrap();
    s.set_read_timeout(Some(common::frontend::TIMEOUT)).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    // A vhost-user frontend holds the device: BIND is EBUSY.
    let _vu = common::frontend::Harness::start(&d.path("vhost-user/vfio0"), 1, 256);
    let dev0 = d.device("vfio0");
    assert_errno!(dev0.bind_iommufd(&f), EBUSY);
}

/// Container and group (the kernel's iommufd-backed compat layer):
/// extensions, SET_CONTAINER (EBADFD for a file that is no container),
/// SET_IOMMU, GET_DEVICE_FD, MAP_DMA / UNMAP_DMA; a group's device file is
/// open at once and refuses BIND.
#[cfg(feature = "group")]
#[test]
fn container_and_group() {
    let d = daemon("cdev-group");
    let c = d.container();
    assert_eq!(c.get_api_version(), Ok(0));
    assert_eq!(c.check_extension(VFIO_TYPE1V2_IOMMU), Ok(1));
    assert_eq!(c.check_extension(2), Ok(0));
    assert_errno!(c.set_iommu(VFIO_TYPE1V2_IOMMU), ENODEV);
    let g = d.group(5).unwrap();
    assert_eq!(g.group_get_status(), Ok(VFIO_GROUP_FLAGS_VIABLE));
    assert_errno!(g.group_get_device_fd("vfio1"), EINVAL);
    let notc = d.device("vfio0");
    assert_errno!(g.group_set_container(&notc), EBADFD);
    g.group_set_container(&c).unwrap();
    assert_errno!(g.group_set_container(&c), EINVAL);
    assert_eq!(
        g.group_get_status(),
        Ok(VFIO_GROUP_FLAGS_VIABLE | VFIO_GROUP_FLAGS_CONTAINER_SET)
    );
    c.set_iommu(VFIO_TYPE1V2_IOMMU).unwrap();
    assert_errno!(c.set_iommu(2), EINVAL);
    let reg = Region::new(0, 0x10000);
    c.map_dma(
        reg.file.as_fd(),
        0,
        0x100000,
        0x10000,
        VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
    )
    .unwrap();
    assert_errno!(
        c.map_dma(
            reg.file.as_fd(),
            0,
            0x100000,
            0x1000,
            VFIO_DMA_MAP_FLAG_READ
        ),
        EEXIST
    );
    let (info, rep) = c.iommu_get_info(4096).unwrap();
    assert_ne!(info.flags & VFIO_IOMMU_INFO_PGSIZES, 0);
    assert_eq!(info.cap_offset, 24);
    assert!(rep.body.len() > 24);
    assert_errno!(g.group_get_device_fd("vfio0"), ENODEV);
    let dev = g.group_get_device_fd("vfio1").unwrap();
    assert!(dev.device_info().is_ok());
    assert_errno!(dev.bind_iommufd(&c), EINVAL);
    assert_errno!(g.group_unset_container(), EBUSY);
    let (_, show) = d.ctl(&["show", "vfio1"]);
    assert!(show.contains("mappings 1"), "{show}");
    assert_eq!(c.unmap_dma(0, 0, VFIO_DMA_UNMAP_FLAG_ALL), Ok(0x10000));
    drop(dev);
    common::poll_until(common::frontend::TIMEOUT, || g.group_unset_container().ok())
        .expect("unset once the device file closed");
}

/// PROTOCOL.md "Framing": garbage, a truncated message, a bad version and
/// more descriptors than a request takes end only that file.
#[test]
fn violations_end_only_that_file() {
    let mut d = daemon("cdev-garbage");
    let keep = d.iommufd();
    assert_eq!(keep.ioas_alloc(), Ok(1));
    // Garbage header.
    let f = d.iommufd();
    f.socket().write_all(&[0xff; 32]).unwrap();
    assert!(closed(&f));
    // Truncated payload, then the writer goes away.
    let f = d.iommufd();
    let mut sock = f.socket();
    sock.write_all(&[0x81, 0, 0, 0, 1, 0, 0, 0, 12, 0, 0, 0, 12, 0])
        .unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed(&f));
    // Descriptors on a request that takes none.
    let f = d.iommufd();
    let ev = EventFd::new(0).unwrap();
    assert!(f
        .call(
            0x81,
            &[12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[common::cdev::raw_ev(&ev)]
        )
        .is_err());
    assert!(closed(&f));
    // A wrong descriptor for MSI-X (not an eventfd) is an errno, not a close.
    let b = bind_and_attach(&d, "vfio0");
    let reg = Region::new(0, 0x1000);
    let hdr = VfioIrqSet {
        argsz: 24,
        flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index: 2,
        start: 0,
        count: 1,
    };
    assert_errno!(
        b.dev.set_irqs_raw(
            &hdr,
            &0i32.to_le_bytes(),
            &[std::os::fd::AsRawFd::as_raw_fd(&reg.file)]
        ),
        EINVAL
    );
    assert!(b.dev.set_irqs_eventfds(2, 0, &[Some(evfd(&ev))]).is_ok());
    assert_eq!(keep.ioas_alloc(), Ok(2));
    assert!(d.alive());
}
