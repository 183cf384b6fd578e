//! virtio-blk through the cdev door: a userspace driver binds the device
//! to an iommufd, maps sealed memfds with IOAS_MAP_FILE, brings the virtio
//! PCI function up (capability walk, common configuration, MSI-X on
//! eventfds, doorbells on ioeventfds) and does real I/O at IOVAs.

mod common;

use std::os::fd::AsFd;

use common::cdev::{BlkDriver, StartExt, MAP_RW_FIXED};
use common::frontend::{pattern, Harness, Region, S_IOERR, S_OK};
use common::vcdev::Vcdev;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

/// Byte-for-byte round trip through the cdev door, completions on the
/// MSI-X eventfd; the data is then visible through the vhost-user door
/// once the driver closed its files.
#[test]
fn io_round_trip_then_visible_through_vhost_user() {
    let d = Vcdev::builder("cdev-blk").device("blk,ram=4M").spawn();
    let mut drv = BlkDriver::start(&d, "vfio0", 64);
    assert_eq!(drv.caps.ids, (0x1af4, 0x1042));
    assert!(drv.caps.msix());
    let data = pattern(3, 64 * 1024);
    assert_eq!(drv.write(8, &data), S_OK);
    let (st, back) = drv.read(8, data.len() as u32);
    assert_eq!(st, S_OK);
    assert!(back == data, "read back differs");
    let (_, ctl) = d.ctl(&["stats", "vfio0"]);
    assert!(ctl.contains("cdev_batches"), "{ctl}");
    let (_, show) = d.ctl(&["show", "vfio0"]);
    assert!(
        show.contains("bound as device") && show.contains("mappings 2"),
        "{show}"
    );
    drop(drv);

    // The device is free again: a vhost-user frontend reads the same bytes.
    let sock = d.path("vhost-user/vfio0");
    let mut h = common::poll_until(common::TIMEOUT, || {
        let (_, list) = d.ctl(&["list"]);
        list.contains("owner none").then_some(())
    })
    .map(|()| Harness::start(&sock, 1, 256))
    .expect("device released");
    let r = h.read(0, 8, data.len() as u32);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data, "vhost-user door sees other data");
}

/// Isolation: after the driver unmaps a buffer, a request naming it
/// completes with IOERR and the old memory is never written.
#[test]
fn unmapped_buffer_is_ioerr_and_old_memory_untouched() {
    let d = Vcdev::builder("cdev-iso").device("blk,ram=4M").spawn();
    let mut drv = BlkDriver::start(&d, "vfio0", 64);
    assert_eq!(drv.write(0, &pattern(9, 4096)), S_OK);

    const BUF_IOVA: u64 = 0x8000_0000;
    let buf = Region::new(BUF_IOVA, 0x10000);
    drv.t
        .iommufd
        .ioas_map_file(
            drv.t.ioas,
            buf.file.as_fd(),
            0,
            0x10000,
            BUF_IOVA,
            MAP_RW_FIXED,
        )
        .unwrap();
    // Works while mapped.
    let (st, _) = drv
        .request(VIRTIO_BLK_T_IN, 0, BUF_IOVA, 4096, true)
        .unwrap();
    assert_eq!(st, S_OK);
    let mut mem = common::frontend::GuestMem::default();
    mem.regions.push(buf);
    assert!(mem.read(BUF_IOVA, 4096) == pattern(9, 4096));
    mem.write(BUF_IOVA, &[0x5a; 4096]);
    assert_eq!(
        drv.t
            .iommufd
            .ioas_unmap(drv.t.ioas, BUF_IOVA, 0x10000)
            .unwrap(),
        0x10000
    );

    let (st, _) = drv
        .request(VIRTIO_BLK_T_IN, 0, BUF_IOVA, 4096, true)
        .unwrap();
    assert_eq!(st, S_IOERR);
    assert!(
        mem.read(BUF_IOVA, 4096).iter().all(|&b| b == 0x5a),
        "old memory written"
    );
    // The queue still works for mapped buffers.
    let (st, back) = drv.read(0, 4096);
    assert_eq!(st, S_OK);
    assert!(back == pattern(9, 4096));
}

/// Detach blocks DMA; attaching again (replace to another IOAS with the
/// same mappings) lets the queue go on.
#[test]
fn detach_blocks_dma_until_attached_again() {
    let d = Vcdev::builder("cdev-detach").device("blk,ram=4M").spawn();
    let mut drv = BlkDriver::start(&d, "vfio0", 64);
    assert_eq!(drv.write(0, &pattern(1, 4096)), S_OK);
    drv.t.dev.detach_pt().unwrap();
    let (_, show) = d.ctl(&["show", "vfio0"]);
    assert!(show.contains("DMA blocked"), "{show}");
    drv.t.dev.attach_pt(drv.t.ioas).unwrap();
    // DMA goes on through the IOAS attached again.
    let (st, back) = drv.read(0, 4096);
    assert_eq!(st, S_OK);
    assert!(back == pattern(1, 4096));
}

/// Issue 11, `vcdev ctl resize` through the cdev door: the driver's
/// config-change vector (`msix_config`) fires, `config_generation` moves,
/// the device configuration shows the new capacity and the new area takes
/// I/O; the data before it stays.
#[test]
fn resize_fires_the_config_vector_and_moves_the_generation() {
    const MIB: u64 = 1 << 20;
    let d = Vcdev::builder("cdev-resize").device("blk,ram=4M").spawn();
    let mut drv = BlkDriver::start(&d, "vfio0", 64);
    let data = pattern(4, 4096);
    assert_eq!(drv.write(4 * MIB / 512 - 8, &data), S_OK);
    assert_eq!(drv.read(4 * MIB / 512, 512).0, S_IOERR);
    assert_eq!(drv.capacity(), 4 * MIB / 512);
    let generation = drv.config_generation();
    assert!(drv.config_irq.read().is_err(), "no config interrupt yet");

    let (ok, text) = d.ctl(&["resize", "vfio0", "8M"]);
    assert!(ok, "{text}");
    // Signalled before the control socket answered.
    assert_eq!(drv.config_irq.read().expect("config interrupt"), 1);
    assert_ne!(drv.config_generation(), generation);
    assert_eq!(drv.capacity(), 8 * MIB / 512);

    let (st, back) = drv.read(4 * MIB / 512 - 8, 4096);
    assert!(st == S_OK && back == data);
    let tail = pattern(8, 4096);
    assert_eq!(drv.write(8 * MIB / 512 - 8, &tail), S_OK);
    assert_eq!(drv.read(8 * MIB / 512 - 8, 4096), (S_OK, tail));
    assert_eq!(drv.read(8 * MIB / 512, 512).0, S_IOERR);

    // Refused (a shrink not asked for): no interrupt, no change.
    let generation = drv.config_generation();
    assert!(!d.ctl(&["resize", "vfio0", "4M"]).0);
    assert!(drv.config_irq.read().is_err());
    assert_eq!(drv.config_generation(), generation);
    assert_eq!(drv.capacity(), 8 * MIB / 512);
}

/// Issue 12, `poll-us=` through the cdev door: a request offered without
/// ringing the doorbell completes while the worker polls.
#[test]
fn poll_us_takes_a_request_without_a_doorbell() {
    use common::frontend::DriverQueue;
    use vcdev_device_model::testing::{BlkRequest, W};

    /// Offers a 4 KiB read without ringing; its completion within `wait`.
    fn offer_unrung(drv: &mut BlkDriver, wait: std::time::Duration) -> Option<(u32, u32)> {
        let q: &mut DriverQueue = &mut drv.q;
        let (hdr, data) = (q.header_gpa(), q.data_gpa());
        let status = hdr + 0x100;
        BlkRequest::new(VIRTIO_BLK_T_IN, 0).write(&drv.mem, hdr, status);
        let chain = BlkRequest::chain(hdr, &[(data, 4096, W)], status);
        q.ring.write_chain(&drv.mem, 0, &chain);
        q.offer(&drv.mem, 0);
        q.wait_used(&drv.mem, wait)
    }

    let d = Vcdev::builder("cdev-poll")
        .device("blk,ram=4M,poll-us=1000000")
        .spawn();
    let mut drv = BlkDriver::start(&d, "vfio0", 64);
    assert_eq!(drv.write(0, &pattern(6, 4096)), S_OK);
    let got = offer_unrung(&mut drv, std::time::Duration::from_millis(900));
    assert_eq!(got, Some((0, 4097)), "a polling worker takes it");
    assert!(drv.mem.read(drv.q.data_gpa(), 4096) == pattern(6, 4096));
    // The worker's looks while it spins are not counted as translations.
    let before = d.counter("vfio0", "translations");
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(drv.write(8, &pattern(7, 4096)), S_OK);
    let added = d.counter("vfio0", "translations") - before;
    assert!(
        (1..100).contains(&added),
        "{added} translations counted for one request after spinning"
    );
    drop(drv);
    drop(d);

    let d = Vcdev::builder("cdev-nopoll").device("blk,ram=4M").spawn();
    let mut drv = BlkDriver::start(&d, "vfio0", 64);
    assert_eq!(drv.write(0, &pattern(6, 4096)), S_OK);
    // A device may take a request it was not told of: the worker, after
    // its last completion, looks at the avail ring once more before it
    // sleeps. Let it get to sleep first (a loaded machine can delay it).
    std::thread::sleep(std::time::Duration::from_millis(200));
    let got = offer_unrung(&mut drv, std::time::Duration::from_millis(300));
    assert_eq!(got, None, "without poll-us it waits for the doorbell");
    drv.q.kick.write(1).expect("doorbell");
    assert!(drv.q.wait_used(&drv.mem, common::TIMEOUT).is_some());
}
