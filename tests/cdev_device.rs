//! The nodes, the device file, the group and container files,
//! exclusivity between the doors, release on close and protocol
//! violations, one test per rule. Each names the kernel code or selftest it
//! mirrors (`drivers/vfio/device_cdev.c`, `drivers/vfio/group.c`,
//! `drivers/vfio/pci/vfio_pci_core.c`, `drivers/iommu/iommufd/vfio_compat.c`,
//! `tools/testing/selftests/vfio`, `tools/testing/selftests/iommu/iommufd.c`).
//! Every test starts its own daemon ([`device_daemon`]): `vfio0` alone in
//! group 0, `vfio1` and `other` in group 5.

mod common;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;

use common::cdev::{
    bind_and_attach, closed, device_daemon, evfd, raw_ev, result, send_raw, BindExt, FullSize,
    CONFIG_REGION, MAP_RW_FIXED, UNKNOWN_CODE,
};
use common::frontend::Region;
use common::TIMEOUT;
use vcdev::cdev::client::File;
use vcdev::cdev::vfio_uapi::*;
use vcdev::wire::{FlagPolicy, FrameHeader, FLAG_NEED_REPLY, FLAG_REPLY, MAX_PAYLOAD, VERSION};
use vcdev_iommu::uapi::{IommuIoasAlloc, IOMMUFD_CMD_IOAS_ALLOC};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

/// An IOAS_ALLOC payload: the smallest valid request an iommufd takes.
fn alloc_payload() -> Vec<u8> {
    IommuIoasAlloc::full().as_slice().to_vec()
}

/// Sends an IOAS_ALLOC on `f` with header flags `flags`, unchecked.
fn send_alloc(f: &File, flags: u32) {
    let alloc = alloc_payload();
    send_raw(
        f,
        IOMMUFD_CMD_IOAS_ALLOC,
        flags,
        alloc.len() as u32,
        &alloc,
        &[],
    );
}

/// Whether a vhost-user connection to `path` is refused (closed at once).
fn vhost_user_refused(path: &std::path::Path) -> bool {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

// ---------------------------------------------------------------------------
// Nodes and the VCDEV_OPEN handshake

/// PROTOCOL.md "Nodes": every node is a socket of mode 0600 (the kernel's
/// `/dev/iommu` and `/dev/vfio/*` are root-only by default).
#[test]
fn nodes_are_sockets_of_mode_0600() {
    let d = device_daemon("cdev-nodes");
    let mut nodes = vec![
        "iommu",
        "devices/vfio0",
        "devices/vfio1",
        "devices/other",
        "vhost-user/vfio0",
        "vhost-user/other",
    ];
    if cfg!(feature = "group") {
        nodes.extend(["vfio/vfio", "vfio/0", "vfio/5"]);
    }
    for n in nodes {
        let m = std::fs::metadata(d.path(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
        assert!(m.file_type().is_socket(), "{n} is no socket");
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{n}");
    }
}

/// PROTOCOL.md "Opening a node gives a file": VCDEV_OPEN with flags 0x5,
/// result 0 and exactly one descriptor, then the connection closes.
#[test]
fn open_handshake_gives_one_descriptor_then_closes() {
    let d = device_daemon("cdev-open");
    let conn = UnixStream::connect(d.path("iommu")).unwrap();
    let f = vcdev::wire::read_frame(&conn, FlagPolicy::CDEV)
        .unwrap()
        .unwrap();
    assert_eq!(
        (f.header.request, f.header.flags, f.header.size),
        (VCDEV_OPEN, 0x5, 4)
    );
    assert_eq!(f.payload, 0i32.to_le_bytes());
    assert_eq!(f.fds.len(), 1);
    assert!(vcdev::wire::read_frame(&conn, FlagPolicy::CDEV)
        .unwrap()
        .is_none());
}

/// PROTOCOL.md "Opening a node gives a file" / `vfio_group_fops_open`: a
/// refused open (a group open twice: EBUSY) carries no descriptor.
#[cfg(feature = "group")]
#[test]
fn refused_open_carries_no_descriptor() {
    let d = device_daemon("cdev-open-refused");
    let _g = d.group(5).unwrap();
    let conn = UnixStream::connect(d.path("vfio/5")).unwrap();
    let f = vcdev::wire::read_frame(&conn, FlagPolicy::CDEV)
        .unwrap()
        .unwrap();
    assert_eq!((f.header.request, f.header.flags), (VCDEV_OPEN, 0x5));
    assert_eq!(f.payload, (-libc::EBUSY).to_le_bytes());
    assert!(f.fds.is_empty());
}

// ---------------------------------------------------------------------------
// The device file before BIND, and BIND (`vfio_df_ioctl_bind_iommufd`)

/// `vfio_device_fops_unl_ioctl`: before BIND everything, unknown codes
/// and region reads included, is EINVAL.
#[test]
fn before_bind_everything_is_einval() {
    let d = device_daemon("cdev-unbound");
    let dev = d.device("vfio0");
    assert_errno!(dev.device_info(), EINVAL);
    assert_errno!(dev.region_read(CONFIG_REGION, 4), EINVAL);
    assert_errno!(dev.attach_pt(1), EINVAL);
    assert_eq!(result(&dev, 0x7777, &[]), -libc::EINVAL);
    assert_errno!(dev.reset(), EINVAL);
}

/// `vfio_pci_ioctl_get_pci_hot_reset_info` / `vfio_pci_ioctl_pci_hot_reset`
/// (what QEMU's vfio-pci may ask): argsz below the header EINVAL, hot
/// reset flags EINVAL, a non-empty array from a device file opened through
/// its cdev EINVAL; otherwise ENODEV, as for a device with neither a slot
/// nor a bus that can be reset (VFIO_DEVICE_RESET is the function's reset).
#[test]
fn pci_hot_reset_is_enodev() {
    let d = device_daemon("cdev-hot-reset");
    let b = bind_and_attach(&d, "vfio0");
    let hdr = |argsz: u32, flags: u32, count: u32| {
        [argsz, flags, count]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    let info = VFIO_DEVICE_GET_PCI_HOT_RESET_INFO;
    assert_eq!(result(&b.dev, info, &hdr(12, 0, 0)), -libc::ENODEV);
    assert_eq!(result(&b.dev, info, &hdr(8, 0, 0)[..8]), -libc::EINVAL);
    let reset = VFIO_DEVICE_PCI_HOT_RESET;
    assert_eq!(result(&b.dev, reset, &hdr(12, 0, 0)), -libc::ENODEV);
    assert_eq!(result(&b.dev, reset, &hdr(12, 1, 0)), -libc::EINVAL);
    let mut one = hdr(16, 0, 1);
    one.extend_from_slice(&0i32.to_le_bytes());
    assert_eq!(result(&b.dev, reset, &one), -libc::EINVAL);
    // The device still works.
    assert!(b.dev.device_info().is_ok());
}

/// `vfio_df_ioctl_bind_iommufd`: `iommufd` < 0 is EINVAL.
#[test]
fn bind_negative_iommufd_is_einval() {
    let d = device_daemon("cdev-bind-neg");
    let dev = d.device("vfio0");
    assert_eq!(
        result(
            &dev,
            VFIO_DEVICE_BIND_IOMMUFD,
            VfioDeviceBindIommufd::to(-1).as_slice()
        ),
        -libc::EINVAL
    );
}

/// PROTOCOL.md "Opening a node gives a file" / `iommufd_ctx_from_fd`: BIND
/// with no descriptor riding is EBADF.
#[test]
fn no_fd_is_ebadf() {
    let d = device_daemon("cdev-bind-nofd");
    let dev = d.device("vfio0");
    assert_eq!(
        result(
            &dev,
            VFIO_DEVICE_BIND_IOMMUFD,
            VfioDeviceBindIommufd::to(3).as_slice()
        ),
        -libc::EBADF
    );
}

/// PROTOCOL.md / `iommufd_ctx_from_fd`: a descriptor the server did not
/// hand out as an iommufd (an eventfd, another device file) is EBADFD.
#[test]
fn passed_back_foreign_fd_is_ebadfd() {
    let d = device_daemon("cdev-bind-ebadfd");
    let dev = d.device("vfio0");
    let ev = EventFd::new(0).unwrap();
    let r = dev
        .call(
            VFIO_DEVICE_BIND_IOMMUFD,
            VfioDeviceBindIommufd::to(3).as_slice(),
            &[raw_ev(&ev)],
        )
        .unwrap();
    assert_eq!(r.result, -libc::EBADFD);
    let other_dev = d.device("vfio1");
    assert_errno!(dev.bind_iommufd(&other_dev), EBADFD);
}

/// `vfio_df_ioctl_bind_iommufd`: BIND returns the device's object id.
#[test]
fn bind_returns_the_device_id() {
    let d = device_daemon("cdev-bind");
    let f = d.iommufd();
    let dev = d.device("vfio0");
    assert_eq!(dev.bind_iommufd(&f), Ok(1));
}

/// `vfio_df_ioctl_bind_iommufd`: a second BIND on a bound file is EINVAL
/// ("one device cannot be bound twice").
#[test]
fn bind_twice_is_einval() {
    let d = device_daemon("cdev-bind-twice");
    let f = d.iommufd();
    let dev = d.device("vfio0");
    dev.bind_iommufd(&f).unwrap();
    assert_errno!(dev.bind_iommufd(&f), EINVAL);
}

/// `vfio_df_open`: BIND on another file of a device bound through its
/// cdev is EINVAL.
#[test]
fn bind_while_another_file_is_bound_is_einval() {
    let d = device_daemon("cdev-bind-other");
    let f = d.iommufd();
    let dev = d.device("vfio0");
    dev.bind_iommufd(&f).unwrap();
    let dev2 = d.device("vfio0");
    assert_errno!(dev2.bind_iommufd(&f), EINVAL);
}

// ---------------------------------------------------------------------------
// The virtio PCI function as vfio-pci presents it

/// `vfio_pci_ioctl_get_info`: PCI | RESET, nine regions, five irq indexes.
#[test]
fn device_info_is_pci_with_reset_9_regions_5_irqs() {
    let d = device_daemon("cdev-info");
    let b = bind_and_attach(&d, "vfio0");
    let info = b.dev.device_info().unwrap();
    assert_eq!(info.flags, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
    assert_eq!((info.num_regions, info.num_irqs), (9, 5));
}

/// `vfio_pci_ioctl_get_region_info`: BAR0 read/write without mmap, the
/// offsets are index << 40; VGA (absent) and past the last region EINVAL.
#[test]
fn region_info_offsets_and_absent_regions() {
    let d = device_daemon("cdev-region-info");
    let b = bind_and_attach(&d, "vfio0");
    let bar0 = b.dev.region_info(0).unwrap();
    assert_eq!(
        bar0.flags,
        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
    );
    assert_eq!(b.dev.region_info(7).unwrap().offset, CONFIG_REGION);
    assert_errno!(b.dev.region_info(8), EINVAL);
    assert_errno!(b.dev.region_info(9), EINVAL);
}

/// `vfio_pci_ioctl_get_irq_info`: MSI-X has one vector per queue plus
/// config; an index past REQ is EINVAL.
#[test]
fn irq_info_counts_and_index_out_of_range() {
    let d = device_daemon("cdev-irq-info");
    let b = bind_and_attach(&d, "vfio0");
    assert_eq!(b.dev.irq_info(2).unwrap().count, 2);
    assert_errno!(b.dev.irq_info(5), EINVAL);
}

/// `vfio_msi_set_vector_signal`: a descriptor that is no eventfd for an
/// MSI-X vector is an errno (EINVAL), not a protocol violation; an
/// eventfd then works on the same file.
#[test]
fn wrong_descriptor_for_msix_is_einval_not_a_close() {
    let d = device_daemon("cdev-msix-wrongfd");
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
    let ev = EventFd::new(0).unwrap();
    assert!(b.dev.set_irqs_eventfds(2, 0, &[Some(evfd(&ev))]).is_ok());
}

// ---------------------------------------------------------------------------
// ATTACH / replace / DETACH (`vfio_df_ioctl_attach_pt`,
// `vfio_df_ioctl_detach_pt`; TEST_F(iommufd_device, ...))

/// `iommufd_device_attach`: ATTACH to an IOAS gives an automatic HWPT, a
/// new object.
#[test]
fn attach_ioas_gives_automatic_hwpt() {
    let d = device_daemon("cdev-attach");
    let b = bind_and_attach(&d, "vfio0");
    assert_ne!(b.hwpt, b.ioas);
}

/// `iommufd_device_replace`: ATTACH while attached replaces; the old
/// automatic HWPT goes with its last device.
#[test]
fn attach_other_ioas_replaces() {
    let d = device_daemon("cdev-replace");
    let b = bind_and_attach(&d, "vfio0");
    let ioas2 = b.iommufd.ioas_alloc().unwrap();
    let hwpt2 = b.dev.attach_pt(ioas2).unwrap();
    assert_ne!(hwpt2, b.hwpt);
    assert_errno!(b.iommufd.destroy(b.hwpt), ENOENT);
}

/// `iommufd_device_change_pt`: an unknown pt_id is ENOENT.
#[test]
fn attach_unknown_pt_is_enoent() {
    let d = device_daemon("cdev-attach-enoent");
    let b = bind_and_attach(&d, "vfio0");
    assert_errno!(b.dev.attach_pt(999), ENOENT);
}

/// `vfio_df_ioctl_attach_pt`: PASID attach is EOPNOTSUPP (no PASID
/// support).
#[test]
fn attach_pasid_is_eopnotsupp() {
    let d = device_daemon("cdev-attach-pasid");
    let b = bind_and_attach(&d, "vfio0");
    let pasid = VfioDeviceAttachIommufdPt {
        argsz: 16,
        flags: VFIO_DEVICE_PASID,
        pt_id: b.ioas,
        pasid: 1,
    };
    assert_eq!(
        result(&b.dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, pasid.as_slice()),
        -libc::EOPNOTSUPP
    );
}

/// `iommufd_device_detach`: DETACH frees the automatic HWPT; the IOAS can
/// then be destroyed.
#[test]
fn detach_frees_the_automatic_hwpt() {
    let d = device_daemon("cdev-detach");
    let b = bind_and_attach(&d, "vfio0");
    let ioas2 = b.iommufd.ioas_alloc().unwrap();
    let hwpt2 = b.dev.attach_pt(ioas2).unwrap();
    b.dev.detach_pt().unwrap();
    assert_errno!(b.iommufd.destroy(hwpt2), ENOENT);
    b.iommufd.destroy(ioas2).unwrap();
}

// ---------------------------------------------------------------------------
// Release on close (`vfio_device_fops_release`, `vfio_df_unbind_iommufd`)

/// A dup'ed device file keeps the file (and the binding) alive.
#[test]
fn a_copy_keeps_the_file_open() {
    let d = device_daemon("cdev-release-dup");
    let b = bind_and_attach(&d, "vfio0");
    let dup = b.dev.try_clone().unwrap();
    drop(b.dev);
    assert!(dup.device_info().is_ok());
}

/// `vfio_df_unbind_iommufd` on the last close: the device unbinds (its
/// object id is free again, the device bindable), the IOAS and its
/// mappings stay.
#[test]
fn release_on_close_unbinds_and_keeps_mappings() {
    let d = device_daemon("cdev-release");
    let b = bind_and_attach(&d, "vfio0");
    let reg = Region::new(0, 0x4000);
    b.iommufd
        .ioas_map_file(b.ioas, reg.file.as_fd(), 0, 0x4000, 0x10000, MAP_RW_FIXED)
        .unwrap();
    let dup = b.dev.try_clone().unwrap();
    drop(b.dev);
    drop(dup);
    let again = d.device("vfio0");
    let devid = common::poll_until(TIMEOUT, || again.bind_iommufd(&b.iommufd).ok())
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
}

/// `iommufd_ctx_get` in bind: closing the iommufd while a device is bound
/// tears nothing down until the device file closes.
#[test]
fn closing_the_iommufd_while_bound_keeps_the_device_working() {
    let d = device_daemon("cdev-release-iommufd");
    let b = bind_and_attach(&d, "vfio0");
    drop(b.iommufd);
    assert!(b.dev.region_read(CONFIG_REGION, 4).is_ok());
    assert!(b.dev.detach_pt().is_ok());
    assert!(b.dev.attach_pt(b.ioas).is_ok());
}

// ---------------------------------------------------------------------------
// Exclusivity (`vfio_device_block_group`, `vfio_group_fops_open`)

/// `vfio_group_fops_open`: a group file can be open only once: EBUSY.
#[cfg(feature = "group")]
#[test]
fn group_open_twice_is_ebusy() {
    let d = device_daemon("cdev-group-twice");
    let _g = d.group(5).unwrap();
    assert_errno!(d.group(5), EBUSY);
}

/// `vfio_device_block_group`: BIND while the device's group file is open
/// is EBUSY; once the group file closes, BIND works.
#[cfg(feature = "group")]
#[test]
fn bind_while_group_open_is_ebusy() {
    let d = device_daemon("cdev-bind-group-open");
    let f = d.iommufd();
    let g = d.group(5).unwrap();
    let dev = d.device("other");
    assert_errno!(dev.bind_iommufd(&f), EBUSY);
    drop(g);
    let devid = common::poll_until(TIMEOUT, || dev.bind_iommufd(&f).ok());
    assert!(devid.is_some());
}

/// `vfio_group_fops_open` (`cdev_device_open_cnt`): opening the group node
/// while one of its devices is bound through its cdev is EBUSY.
#[cfg(feature = "group")]
#[test]
fn group_open_while_device_bound_is_ebusy() {
    let d = device_daemon("cdev-group-bound");
    let f = d.iommufd();
    let dev = d.device("other");
    dev.bind_iommufd(&f).unwrap();
    assert_errno!(d.group(5), EBUSY);
}

/// PROTOCOL.md: a vhost-user frontend that connects to a device bound
/// through its cdev is refused (the connection is closed).
#[test]
fn vhost_user_refused_while_bound() {
    let d = device_daemon("cdev-vu-bound");
    let f = d.iommufd();
    let dev = d.device("other");
    dev.bind_iommufd(&f).unwrap();
    assert!(vhost_user_refused(&d.path("vhost-user/other")));
}

/// PROTOCOL.md: a vhost-user frontend that connects while the device's
/// group file is open is refused.
#[cfg(feature = "group")]
#[test]
fn vhost_user_refused_while_group_open() {
    let d = device_daemon("cdev-vu-group");
    let _g = d.group(5).unwrap();
    assert!(vhost_user_refused(&d.path("vhost-user/other")));
}

/// PROTOCOL.md: a vhost-user connection counts as an open of the group
/// file: opening the group node and BIND are EBUSY while it lasts.
#[cfg(feature = "group")]
#[test]
fn vhost_user_holds_the_group() {
    let d = device_daemon("cdev-vu-holds");
    let f = d.iommufd();
    let _vu = common::frontend::Harness::start(&d.path("vhost-user/vfio0"), 1, 256);
    assert_errno!(d.group(0), EBUSY);
    let dev0 = d.device("vfio0");
    assert_errno!(dev0.bind_iommufd(&f), EBUSY);
}

/// Without the `group` feature there are no `DIR/vfio` nodes (PROTOCOL.md).
#[cfg(not(feature = "group"))]
#[test]
fn without_group_there_are_no_vfio_nodes() {
    let d = device_daemon("cdev-nogroup");
    assert!(
        !d.path("vfio").exists(),
        "DIR/vfio exists without the group feature"
    );
}

/// Without the `group` feature the cdev and vhost-user paths exclude each
/// other alone: a vhost-user frontend makes BIND EBUSY.
#[cfg(not(feature = "group"))]
#[test]
fn without_group_vhost_user_makes_bind_ebusy() {
    let d = device_daemon("cdev-nogroup-vu");
    let f = d.iommufd();
    let _vu = common::frontend::Harness::start(&d.path("vhost-user/vfio0"), 1, 256);
    let dev0 = d.device("vfio0");
    assert_errno!(dev0.bind_iommufd(&f), EBUSY);
}

// ---------------------------------------------------------------------------
// Container and group files (`drivers/vfio/group.c`, `vfio_compat.c`)

/// `iommufd_vfio_ioctl`: API version 0; TYPE1v2 supported, SPAPR (2) not.
#[cfg(feature = "group")]
#[test]
fn container_api_version_and_extensions() {
    let d = device_daemon("cdev-container-ext");
    let c = d.container();
    assert_eq!(c.get_api_version(), Ok(0));
    assert_eq!(c.check_extension(VFIO_TYPE1V2_IOMMU), Ok(1));
    assert_eq!(c.check_extension(2), Ok(0));
}

/// `iommufd_vfio_set_iommu` / `get_compat_ioas`: before any group joined
/// the container SET_IOMMU is ENODEV.
#[cfg(feature = "group")]
#[test]
fn set_iommu_without_group_is_enodev() {
    let d = device_daemon("cdev-setiommu-enodev");
    let c = d.container();
    assert_errno!(c.set_iommu(VFIO_TYPE1V2_IOMMU), ENODEV);
}

/// `vfio_group_ioctl_get_status`: viable, then CONTAINER_SET once set.
#[cfg(feature = "group")]
#[test]
fn group_status_viable_then_container_set() {
    let d = device_daemon("cdev-group-status");
    let c = d.container();
    let g = d.group(5).unwrap();
    assert_eq!(g.group_get_status(), Ok(VFIO_GROUP_FLAGS_VIABLE));
    g.group_set_container(&c).unwrap();
    assert_eq!(
        g.group_get_status(),
        Ok(VFIO_GROUP_FLAGS_VIABLE | VFIO_GROUP_FLAGS_CONTAINER_SET)
    );
}

/// `vfio_df_group_open`: GET_DEVICE_FD before a container is set is
/// EINVAL.
#[cfg(feature = "group")]
#[test]
fn get_device_fd_without_container_is_einval() {
    let d = device_daemon("cdev-getfd-nocontainer");
    let g = d.group(5).unwrap();
    assert_errno!(g.group_get_device_fd("vfio1"), EINVAL);
}

/// `vfio_group_ioctl_set_container`: a file that is no container or
/// iommufd is EBADFD; a second SET_CONTAINER is EINVAL.
#[cfg(feature = "group")]
#[test]
fn set_container_rules() {
    let d = device_daemon("cdev-setcontainer");
    let c = d.container();
    let g = d.group(5).unwrap();
    let notc = d.device("vfio0");
    assert_errno!(g.group_set_container(&notc), EBADFD);
    g.group_set_container(&c).unwrap();
    assert_errno!(g.group_set_container(&c), EINVAL);
}

/// A container with group 5 set and TYPE1v2.
#[cfg(feature = "group")]
fn container_with_group(d: &common::vcdev::Vcdev) -> (File, File) {
    let c = d.container();
    let g = d.group(5).unwrap();
    g.group_set_container(&c).unwrap();
    c.set_iommu(VFIO_TYPE1V2_IOMMU).unwrap();
    (c, g)
}

/// `iommufd_vfio_set_iommu`: a type other than TYPE1/TYPE1v2 is EINVAL.
#[cfg(feature = "group")]
#[test]
fn set_iommu_unknown_type_is_einval() {
    let d = device_daemon("cdev-setiommu-einval");
    let (c, _g) = container_with_group(&d);
    assert_errno!(c.set_iommu(2), EINVAL);
}

/// `iommufd_vfio_map_dma`: an overlapping MAP_DMA is EEXIST.
#[cfg(feature = "group")]
#[test]
fn map_dma_overlap_is_eexist() {
    let d = device_daemon("cdev-mapdma");
    let (c, _g) = container_with_group(&d);
    let reg = Region::new(0, 0x10000);
    let rw = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    c.map_dma(reg.file.as_fd(), 0, 0x100000, 0x10000, rw)
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
}

/// `iommufd_vfio_iommu_get_info`: page sizes and capabilities at offset
/// 24 when `argsz` leaves room.
#[cfg(feature = "group")]
#[test]
fn iommu_get_info_has_pgsizes_and_caps() {
    let d = device_daemon("cdev-getinfo");
    let (c, _g) = container_with_group(&d);
    let (info, rep) = c.iommu_get_info(4096).unwrap();
    assert_ne!(info.flags & VFIO_IOMMU_INFO_PGSIZES, 0);
    assert_eq!(info.cap_offset, 24);
    assert!(rep.body.len() > 24);
}

/// `vfio_device_get_from_name`: a device outside the group is ENODEV.
#[cfg(feature = "group")]
#[test]
fn get_device_fd_of_device_outside_group_is_enodev() {
    let d = device_daemon("cdev-getfd-enodev");
    let (_c, g) = container_with_group(&d);
    assert_errno!(g.group_get_device_fd("vfio0"), ENODEV);
}

/// `vfio_df_group_open` / `vfio_df_ioctl_bind_iommufd`: a device file got
/// through the group is open at once and refuses BIND with EINVAL.
#[cfg(feature = "group")]
#[test]
fn group_device_file_is_open_and_refuses_bind() {
    let d = device_daemon("cdev-getfd");
    let (c, g) = container_with_group(&d);
    let dev = g.group_get_device_fd("vfio1").unwrap();
    assert!(dev.device_info().is_ok());
    assert_errno!(dev.bind_iommufd(&c), EINVAL);
}

/// `vfio_group_ioctl_unset_container`: UNSET while a device file got
/// through the group is open is EBUSY; once it closed, UNSET works.
#[cfg(feature = "group")]
#[test]
fn unset_container_with_device_open_is_ebusy() {
    let d = device_daemon("cdev-unset");
    let (_c, g) = container_with_group(&d);
    let dev = g.group_get_device_fd("vfio1").unwrap();
    assert_errno!(g.group_unset_container(), EBUSY);
    drop(dev);
    common::poll_until(TIMEOUT, || g.group_unset_container().ok())
        .expect("unset once the device file closed");
}

/// `iommufd_vfio_unmap_dma`: UNMAP_ALL returns every byte mapped; a group
/// device's DMA goes through the compat IOAS (one mapping shown).
#[cfg(feature = "group")]
#[test]
fn unmap_dma_all_returns_every_byte() {
    let d = device_daemon("cdev-unmapall");
    let (c, g) = container_with_group(&d);
    let reg = Region::new(0, 0x10000);
    let rw = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE;
    c.map_dma(reg.file.as_fd(), 0, 0x100000, 0x10000, rw)
        .unwrap();
    let _dev = g.group_get_device_fd("vfio1").unwrap();
    let (_, show) = d.ctl(&["show", "vfio1"]);
    assert!(show.contains("mappings 1"), "{show}");
    assert_eq!(c.unmap_dma(0, 0, VFIO_DMA_UNMAP_FLAG_ALL), Ok(0x10000));
}

// ---------------------------------------------------------------------------
// Framing violations end only that file (PROTOCOL.md "Framing")

/// Garbage instead of a header closes the file.
#[test]
fn garbage_header_closes_the_file() {
    let d = device_daemon("cdev-garbage");
    let f = d.iommufd();
    std::io::Write::write_all(&mut f.socket(), &[0xff; 32]).unwrap();
    assert!(closed(&f));
}

/// A truncated payload, then the writer goes away: the file closes.
#[test]
fn truncated_message_closes_the_file() {
    let d = device_daemon("cdev-truncated");
    let f = d.iommufd();
    let mut sock = f.socket();
    let alloc = alloc_payload();
    let hdr = FrameHeader::request(IOMMUFD_CMD_IOAS_ALLOC, VERSION, alloc.len() as u32);
    std::io::Write::write_all(&mut sock, &hdr.encode()).unwrap();
    std::io::Write::write_all(&mut sock, &alloc[..2]).unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed(&f));
}

/// More descriptors than the request takes (IOAS_ALLOC takes none)
/// closes the file, without a reply.
#[test]
fn too_many_fds_closes_the_file() {
    let d = device_daemon("cdev-toomanyfds");
    let f = d.iommufd();
    let ev = EventFd::new(0).unwrap();
    assert!(f
        .call(IOMMUFD_CMD_IOAS_ALLOC, &alloc_payload(), &[raw_ev(&ev)])
        .is_err());
    assert!(closed(&f));
}

/// A header with version bits other than 1 closes the file.
#[test]
fn bad_version_closes_the_file() {
    let d = device_daemon("cdev-badversion");
    let f = d.iommufd();
    send_alloc(&f, VERSION + 1);
    assert!(closed(&f));
}

/// A header with a flag bit beyond REPLY closes the file.
#[test]
fn unknown_flag_bits_close_the_file() {
    let d = device_daemon("cdev-badflags");
    let f = d.iommufd();
    // NEED_REPLY is vhost-user's: on the cdev door a bit beyond REPLY.
    send_alloc(&f, VERSION | FLAG_NEED_REPLY);
    assert!(closed(&f));
}

/// A request flagged as a reply closes the file.
#[test]
fn request_flagged_as_reply_closes_the_file() {
    let d = device_daemon("cdev-replyflag");
    let f = d.iommufd();
    send_alloc(&f, VERSION | FLAG_REPLY);
    assert!(closed(&f));
}

/// A payload announced beyond 1 MiB closes the file (before any payload
/// is read).
#[test]
fn oversized_payload_closes_the_file() {
    let d = device_daemon("cdev-oversized");
    let f = d.iommufd();
    send_raw(
        &f,
        IOMMUFD_CMD_IOAS_ALLOC,
        VERSION,
        MAX_PAYLOAD + 1,
        &[],
        &[],
    );
    assert!(closed(&f));
}

/// More than 32 descriptors on one message closes the file.
#[test]
fn more_than_32_fds_closes_the_file() {
    let d = device_daemon("cdev-33fds");
    let b = bind_and_attach(&d, "vfio0");
    let evs: Vec<EventFd> = (0..33).map(|_| EventFd::new(0).unwrap()).collect();
    let raw: Vec<i32> = evs.iter().map(raw_ev).collect();
    let hdr = VfioIrqSet {
        argsz: 20 + 4,
        flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index: 2,
        start: 0,
        count: 1,
    };
    let mut p = hdr.as_slice().to_vec();
    p.extend_from_slice(&0i32.to_le_bytes());
    send_raw(&b.dev, VFIO_DEVICE_SET_IRQS, 1, p.len() as u32, &p, &raw);
    assert!(closed(&b.dev));
}

/// A violation ends only that file: other files and the daemon go on.
#[test]
fn violation_leaves_other_files_alive() {
    let mut d = device_daemon("cdev-violation-others");
    let keep = d.iommufd();
    assert_eq!(keep.ioas_alloc(), Ok(1));
    let f = d.iommufd();
    std::io::Write::write_all(&mut f.socket(), &[0xff; 32]).unwrap();
    assert!(closed(&f));
    assert_eq!(keep.ioas_alloc(), Ok(2));
    assert!(d.alive());
}

/// Each request gets exactly one reply, in order: requests sent back to
/// back are answered one by one with their own codes.
#[test]
fn replies_come_one_per_request_in_order() {
    let d = device_daemon("cdev-order");
    let f = d.iommufd();
    send_alloc(&f, VERSION);
    send_raw(&f, UNKNOWN_CODE, VERSION, 0, &[], &[]);
    send_alloc(&f, VERSION);
    let mut got = Vec::new();
    for _ in 0..3 {
        let r = vcdev::wire::read_frame(f.socket(), FlagPolicy::CDEV)
            .unwrap()
            .unwrap();
        assert_eq!(r.header.flags, VERSION | FLAG_REPLY);
        let res = i32::from_le_bytes(r.payload[..4].try_into().unwrap());
        got.push((r.header.request, res, r.payload.len()));
    }
    assert_eq!(
        got,
        vec![
            (IOMMUFD_CMD_IOAS_ALLOC, 0, 16),
            (UNKNOWN_CODE, -libc::ENOTTY, 4),
            (IOMMUFD_CMD_IOAS_ALLOC, 0, 16)
        ]
    );
}

/// `iommufd_vfio_unmap_dma`: flags beyond UNMAP_FLAG_ALL are EINVAL (a
/// vfio struct's unknown flag bits).
#[cfg(feature = "group")]
#[test]
fn unmap_dma_unknown_flags_is_einval() {
    let d = device_daemon("cdev-unmapdma-flags");
    let (c, _g) = container_with_group(&d);
    assert_errno!(c.unmap_dma(0x100000, 0x1000, 1), EINVAL);
    assert_errno!(c.unmap_dma(0x100000, 0x1000, 1 << 5), EINVAL);
}

/// `vfio_group_ioctl_get_device_fd`: the name is looked up first
/// (`vfio_device_get_from_name`: ENODEV), before the container is asked
/// for (`vfio_df_group_open`: EINVAL).
#[cfg(feature = "group")]
#[test]
fn get_device_fd_unknown_name_is_enodev_even_without_container() {
    let d = device_daemon("cdev-getfd-order");
    let g = d.group(5).unwrap();
    assert_errno!(g.group_get_device_fd("nosuch"), ENODEV);
    assert_errno!(g.group_get_device_fd("vfio0"), ENODEV);
}

/// `strndup_user`: a name that runs past the end of the payload (no NUL)
/// is EFAULT; one longer than a page is EINVAL.
#[cfg(feature = "group")]
#[test]
fn get_device_fd_name_without_nul_is_efault() {
    let d = device_daemon("cdev-getfd-nul");
    let (_c, g) = container_with_group(&d);
    assert_eq!(
        result(&g, VFIO_GROUP_GET_DEVICE_FD, b"vfio1"),
        -libc::EFAULT
    );
    let mut long = vec![b'a'; 5000];
    long.push(0);
    assert_eq!(result(&g, VFIO_GROUP_GET_DEVICE_FD, &long), -libc::EINVAL);
}

/// `iommufd_vfio_iommu_get_info`: `argsz` comes back as the size of the
/// struct and every capability, whatever the caller gave; the chain is
/// DMA_AVAIL (U32_MAX) at 24, then the IOVA ranges at 40.
#[cfg(feature = "group")]
#[test]
fn iommu_get_info_argsz_is_the_total_and_caps_chain() {
    let d = device_daemon("cdev-getinfo-caps");
    let (c, _g) = container_with_group(&d);
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let (info, rep) = c.iommu_get_info(4096).unwrap();
    // One range: the whole space.
    let total = 24 + 16 + 16 + 16;
    assert_eq!(info.argsz, total);
    assert_eq!(rep.body.len(), total as usize);
    let b = &rep.body;
    assert_eq!((u16_at(b, 24), u16_at(b, 26), u32_at(b, 28)), (3, 1, 40));
    assert_eq!(u32_at(b, 32), u32::MAX);
    assert_eq!((u16_at(b, 40), u16_at(b, 42), u32_at(b, 44)), (1, 1, 0));
    assert_eq!(u32_at(b, 48), 1);
    // Too small: no capabilities, argsz says how much is needed.
    let (small, rep) = c.iommu_get_info(24).unwrap();
    assert_eq!((small.argsz, small.cap_offset), (total, 0));
    assert_eq!(rep.body.len(), 24);
}

/// `iommufd_vfio_check_extension` / `iommufd_vfio_cc_iommu`: VFIO_UNMAP_ALL
/// is 1; VFIO_DMA_CC_IOMMU is ENODEV before a group joined, then 1 (the
/// software IOMMU's DMA is cache coherent).
#[cfg(feature = "group")]
#[test]
fn check_extension_unmap_all_and_dma_cc() {
    let d = device_daemon("cdev-ext-cc");
    let c = d.container();
    assert_eq!(c.check_extension(VFIO_UNMAP_ALL), Ok(1));
    assert_errno!(c.check_extension(VFIO_DMA_CC_IOMMU), ENODEV);
    let g = d.group(5).unwrap();
    g.group_set_container(&c).unwrap();
    assert_eq!(c.check_extension(VFIO_DMA_CC_IOMMU), Ok(1));
}

/// `vfio_df_ioctl_bind_iommufd`: the iommufd is resolved
/// (`iommufd_ctx_from_fd`: EBADF / EBADFD) before `vfio_df_open` refuses a
/// device bound through another file (EINVAL).
#[test]
fn bind_checks_the_iommufd_before_another_files_binding() {
    let d = device_daemon("cdev-bind-order");
    let f = d.iommufd();
    let dev = d.device("vfio0");
    dev.bind_iommufd(&f).unwrap();
    let dev2 = d.device("vfio0");
    assert_eq!(
        result(
            &dev2,
            VFIO_DEVICE_BIND_IOMMUFD,
            VfioDeviceBindIommufd::to(3).as_slice()
        ),
        -libc::EBADF
    );
    let ev = EventFd::new(0).unwrap();
    let r = dev2
        .call(
            VFIO_DEVICE_BIND_IOMMUFD,
            VfioDeviceBindIommufd::to(3).as_slice(),
            &[raw_ev(&ev)],
        )
        .unwrap();
    assert_eq!(r.result, -libc::EBADFD);
}

/// `vfio_df_ioctl_attach_pt` / `vfio_df_ioctl_detach_pt`: without PASID
/// support the PASID flag is EOPNOTSUPP before `argsz` is checked against
/// the end of `pasid`.
#[test]
fn pasid_flag_is_eopnotsupp_before_the_pasid_size_check() {
    let d = device_daemon("cdev-pasid-short");
    let b = bind_and_attach(&d, "vfio0");
    let attach = VfioDeviceAttachIommufdPt {
        argsz: 12,
        flags: VFIO_DEVICE_PASID,
        pt_id: b.ioas,
        pasid: 0,
    };
    assert_eq!(
        result(
            &b.dev,
            VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            &attach.as_slice()[..12]
        ),
        -libc::EOPNOTSUPP
    );
    let detach = VfioDeviceDetachIommufdPt {
        argsz: 8,
        flags: VFIO_DEVICE_PASID,
        pasid: 0,
    };
    assert_eq!(
        result(
            &b.dev,
            VFIO_DEVICE_DETACH_IOMMUFD_PT,
            &detach.as_slice()[..8]
        ),
        -libc::EOPNOTSUPP
    );
}

/// `vfio_device_fops_unl_ioctl`: ATTACH/DETACH are cdev-only ioctls; on a
/// device file got through a group they reach vfio-pci, which answers
/// ENOTTY whatever the payload.
#[cfg(feature = "group")]
#[test]
fn attach_on_group_device_file_is_enotty() {
    let d = device_daemon("cdev-getfd-attach");
    let (_c, g) = container_with_group(&d);
    let dev = g.group_get_device_fd("vfio1").unwrap();
    assert_errno!(dev.attach_pt(1), ENOTTY);
    assert_errno!(dev.detach_pt(), ENOTTY);
    assert_eq!(
        result(&dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &[4, 0, 0, 0]),
        -libc::ENOTTY
    );
    assert_eq!(
        result(&dev, VFIO_DEVICE_DETACH_IOMMUFD_PT, &[]),
        -libc::ENOTTY
    );
}

// ---------------------------------------------------------------------------
// SET_IRQS (`vfio_set_irqs_validate_and_prepare`, `vfio_pci_set_irqs_ioctl`)

/// A SET_IRQS of `flags` on `index` from `start`, `count` irqs, `data`
/// after the struct, `fds` riding.
fn set_irqs(
    dev: &File,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data: &[u8],
    fds: &[i32],
) -> i32 {
    let hdr = VfioIrqSet {
        argsz: 20 + data.len() as u32,
        flags,
        index,
        start,
        count,
    };
    let mut p = hdr.as_slice().to_vec();
    p.extend_from_slice(data);
    dev.call(VFIO_DEVICE_SET_IRQS, &p, fds).unwrap().result
}

const NONE_TRIGGER: u32 = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
const BOOL_TRIGGER: u32 = VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER;
const EVENTFD_TRIGGER: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;

/// `vfio_set_irqs_validate_and_prepare`: `start` at or past the index's
/// count is EINVAL, even with count 0: INTX and MSI (no irqs here) refuse
/// everything, MSI-X refuses start 2 of 2 vectors.
#[test]
fn set_irqs_start_past_the_irqs_is_einval() {
    let d = device_daemon("cdev-irqs-start");
    let b = bind_and_attach(&d, "vfio0");
    assert_eq!(
        set_irqs(&b.dev, NONE_TRIGGER, 0, 0, 0, &[], &[]),
        -libc::EINVAL
    );
    assert_eq!(
        set_irqs(&b.dev, NONE_TRIGGER, 1, 0, 0, &[], &[]),
        -libc::EINVAL
    );
    assert_eq!(
        set_irqs(&b.dev, BOOL_TRIGGER, 2, 2, 0, &[], &[]),
        -libc::EINVAL
    );
    assert_eq!(
        set_irqs(&b.dev, BOOL_TRIGGER, 2, 1, 2, &[1, 1], &[]),
        -libc::EINVAL
    );
}

/// `vfio_pci_set_irqs_ioctl`: no action bit or several select no handler:
/// ENOTTY (after the generic checks, which are EINVAL).
#[test]
fn set_irqs_without_exactly_one_action_is_enotty() {
    let d = device_daemon("cdev-irqs-action");
    let b = bind_and_attach(&d, "vfio0");
    let ev = EventFd::new(0).unwrap();
    b.dev.set_irqs_eventfds(2, 0, &[Some(evfd(&ev))]).unwrap();
    let none = VFIO_IRQ_SET_DATA_NONE;
    assert_eq!(set_irqs(&b.dev, none, 2, 0, 1, &[], &[]), -libc::ENOTTY);
    let two = none | VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert_eq!(set_irqs(&b.dev, two, 2, 0, 1, &[], &[]), -libc::ENOTTY);
    // Two data types stay EINVAL.
    let two_data = none | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER;
    assert_eq!(
        set_irqs(&b.dev, two_data, 2, 0, 1, &[1], &[]),
        -libc::EINVAL
    );
}

/// `vfio_pci_set_msi_trigger`: triggering or disabling MSI-X before it
/// was enabled with eventfds is EINVAL; once enabled both work, and a
/// second disable is EINVAL again.
#[test]
fn msix_trigger_while_msix_disabled_is_einval() {
    let d = device_daemon("cdev-irqs-msix-off");
    let b = bind_and_attach(&d, "vfio0");
    assert_eq!(
        set_irqs(&b.dev, NONE_TRIGGER, 2, 0, 1, &[], &[]),
        -libc::EINVAL
    );
    assert_eq!(
        set_irqs(&b.dev, BOOL_TRIGGER, 2, 0, 1, &[1], &[]),
        -libc::EINVAL
    );
    assert_eq!(
        set_irqs(&b.dev, NONE_TRIGGER, 2, 0, 0, &[], &[]),
        -libc::EINVAL
    );
    let ev = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    b.dev.set_irqs_eventfds(2, 0, &[Some(evfd(&ev))]).unwrap();
    assert_eq!(set_irqs(&b.dev, BOOL_TRIGGER, 2, 0, 1, &[1], &[]), 0);
    assert_eq!(ev.read().unwrap(), 1, "the loopback trigger signals");
    assert_eq!(set_irqs(&b.dev, NONE_TRIGGER, 2, 0, 0, &[], &[]), 0);
    assert_eq!(
        set_irqs(&b.dev, NONE_TRIGGER, 2, 0, 0, &[], &[]),
        -libc::EINVAL
    );
}

/// `vfio_pci_set_ctx_trigger_single` (ERR, REQ): DATA_NONE without an
/// eventfd set is EINVAL; DATA_BOOL and DATA_EVENTFD with count 0 are
/// EINVAL; with an eventfd, DATA_NONE count 1 signals it and count 0
/// removes it.
#[test]
fn err_and_req_triggers_follow_the_single_context_rules() {
    let d = device_daemon("cdev-irqs-errreq");
    let b = bind_and_attach(&d, "vfio0");
    for index in [3, 4] {
        assert_eq!(
            set_irqs(&b.dev, NONE_TRIGGER, index, 0, 1, &[], &[]),
            -libc::EINVAL
        );
        assert_eq!(
            set_irqs(&b.dev, NONE_TRIGGER, index, 0, 0, &[], &[]),
            -libc::EINVAL
        );
        assert_eq!(
            set_irqs(&b.dev, BOOL_TRIGGER, index, 0, 0, &[], &[]),
            -libc::EINVAL
        );
        assert_eq!(
            set_irqs(&b.dev, EVENTFD_TRIGGER, index, 0, 0, &[], &[]),
            -libc::EINVAL
        );
        let ev = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let data = 0i32.to_le_bytes();
        assert_eq!(
            set_irqs(&b.dev, EVENTFD_TRIGGER, index, 0, 1, &data, &[raw_ev(&ev)]),
            0
        );
        assert_eq!(set_irqs(&b.dev, NONE_TRIGGER, index, 0, 1, &[], &[]), 0);
        assert_eq!(ev.read().unwrap(), 1);
        assert_eq!(set_irqs(&b.dev, NONE_TRIGGER, index, 0, 0, &[], &[]), 0);
        assert_eq!(
            set_irqs(&b.dev, NONE_TRIGGER, index, 0, 1, &[], &[]),
            -libc::EINVAL
        );
    }
}

// ---------------------------------------------------------------------------
// IOEVENTFD (`vfio_pci_ioctl_ioeventfd`, `vfio_pci_ioeventfd`)

/// A VFIO_DEVICE_IOEVENTFD of 2 bytes, data 0, at `offset`, `fd` field
/// `fd`, `reserved`, `fds` riding.
fn ioeventfd_raw(dev: &File, offset: u64, fd: i32, reserved: u32, fds: &[i32]) -> i32 {
    let c = VfioDeviceIoeventfd {
        argsz: 32,
        flags: 2,
        offset,
        data: 0,
        fd,
        reserved,
    };
    dev.call(VFIO_DEVICE_IOEVENTFD, c.as_slice(), fds)
        .unwrap()
        .result
}

/// PROTOCOL.md struct rules: a non-zero reserved field of a vfio struct is
/// EINVAL.
#[test]
fn ioeventfd_reserved_field_is_einval() {
    let d = device_daemon("cdev-ioeventfd-reserved");
    let drv = <common::cdev::BlkDriver as common::cdev::StartExt>::start(&d, "vfio0", 64);
    assert_eq!(
        ioeventfd_raw(&drv.t.dev, drv.doorbell, -1, 1, &[]),
        -libc::EINVAL
    );
    assert_eq!(ioeventfd_raw(&drv.t.dev, drv.doorbell, -1, 0, &[]), 0);
}

/// `vfio_pci_ioeventfd`: the offset (EINVAL) and the registrations
/// (EEXIST, ENODEV) are checked before the descriptor is looked at
/// (EBADF, EINVAL for a non-eventfd).
#[test]
fn ioeventfd_checks_the_offset_and_registrations_before_the_descriptor() {
    let d = device_daemon("cdev-ioeventfd-order");
    let drv = <common::cdev::BlkDriver as common::cdev::StartExt>::start(&d, "vfio0", 64);
    let dev = &drv.t.dev;
    // Config space takes no ioeventfd; no descriptor rides.
    assert_eq!(ioeventfd_raw(dev, CONFIG_REGION, 3, 0, &[]), -libc::EINVAL);
    // Registered already (by the driver): EEXIST, whatever rides.
    let reg = Region::new(0, 0x1000);
    let memfd = std::os::fd::AsRawFd::as_raw_fd(&reg.file);
    assert_eq!(
        ioeventfd_raw(dev, drv.doorbell, 3, 0, &[memfd]),
        -libc::EEXIST
    );
    assert_eq!(ioeventfd_raw(dev, drv.doorbell, 3, 0, &[]), -libc::EEXIST);
    // Unregistered: the descriptor decides.
    assert_eq!(ioeventfd_raw(dev, drv.doorbell, -1, 0, &[]), 0);
    assert_eq!(ioeventfd_raw(dev, drv.doorbell, -1, 0, &[]), -libc::ENODEV);
    assert_eq!(ioeventfd_raw(dev, drv.doorbell, 3, 0, &[]), -libc::EBADF);
    assert_eq!(
        ioeventfd_raw(dev, drv.doorbell, 3, 0, &[memfd]),
        -libc::EINVAL
    );
}

/// `vfio_pci_bar_rw`: a read longer than the region is a short read up
/// to its end (pread semantics), even beyond what one reply could carry.
#[test]
fn region_read_past_the_end_is_a_short_read() {
    let d = device_daemon("cdev-read-short");
    let b = bind_and_attach(&d, "vfio0");
    let bar0 = b.dev.region_info(0).unwrap().size;
    let cmd = b.dev.region_read(0, 0x1000);
    assert_eq!(cmd.map(|v| v.len()), Ok(0x1000.min(bar0 as usize)));
    let all = b.dev.region_read(0x100, 2 << 20).unwrap();
    assert_eq!(all.len() as u64, bar0 - 0x100);
}
