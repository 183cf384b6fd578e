//! virtio-blk over vhost-user, end to end: a Rust frontend (vhost's
//! `Frontend`, memfd guest memory, a tiny split-ring driver) drives a real
//! `vcdev serve` over its socket.

mod common;

use std::mem::offset_of;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use common::frontend::{
    pattern, Desc, Harness, DATA_GPA, META_GPA, SECTOR, S_IOERR, S_OK, S_UNSUPP,
};
use common::vcdev::Vcdev;
use common::TIMEOUT;
use vcdev_device_model::testing::{BlkRequest, R, STATUS_UNSET};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

#[test]
fn read_write_flush_get_id_discard_write_zeroes_round_trip() {
    let d = Vcdev::start("blk-rt", &["--device", "blk,ram=4M,serial=SER-42"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 256);

    let data = pattern(7, 64 * 1024);
    assert_eq!(h.write(0, 100, &data), S_OK);
    let r = h.read(0, 100, data.len() as u32);
    assert_eq!(r.status, S_OK);
    assert_eq!(
        r.used_len,
        data.len() as u32 + 1,
        "used len = data + status"
    );
    assert!(r.data == data, "read back differs");
    // A read of the sectors around the write: zeros, data, zeros.
    let r = h.read(0, 99, (data.len() + 2 * SECTOR) as u32);
    assert!(r.data[..SECTOR].iter().all(|&b| b == 0));
    assert!(r.data[SECTOR..SECTOR + data.len()] == data[..]);
    assert!(r.data[SECTOR + data.len()..].iter().all(|&b| b == 0));

    assert_eq!(h.flush(0), S_OK);

    let id = h.get_id(0);
    assert_eq!(id.status, S_OK);
    assert_eq!(&id.data[..6], b"SER-42");
    assert!(id.data[6..].iter().all(|&b| b == 0));

    // WRITE_ZEROES of 8 sectors in the middle of the data.
    assert_eq!(h.discard_like(0, true, 104, 8, 0), S_OK);
    let r = h.read(0, 100, data.len() as u32);
    let mut want = data.clone();
    want[4 * SECTOR..12 * SECTOR].fill(0);
    assert!(r.data == want, "write-zeroes result differs");
    assert_eq!(
        h.discard_like(0, true, 120, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
        S_OK
    );
    want[20 * SECTOR..28 * SECTOR].fill(0);
    assert!(h.read(0, 100, data.len() as u32).data == want);

    // DISCARD (outside the data): accepted; the data is untouched. A
    // discard with the UNMAP flag is refused (virtio 1.2 5.2.6.2).
    assert_eq!(h.discard_like(0, false, 1000, 8, 0), S_OK);
    assert_eq!(
        h.discard_like(0, false, 1000, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
        S_UNSUPP
    );
    assert!(h.read(0, 100, data.len() as u32).data == want);
}

#[test]
fn multiqueue_requests_complete_on_their_own_queues() {
    let d = Vcdev::start("blk-mq", &["--device", "blk,ram=8M,queues=4"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 4, 64);
    // Every queue writes its own area, all in flight at once.
    for q in 0..4 {
        let data = pattern(q as u8, 8192);
        let at = h.queues[q].data_gpa();
        h.mem.write(at, &data);
        let chain = h.blk_chain(q, VIRTIO_BLK_T_OUT, q as u64 * 1000, &[(at, 8192, false)]);
        h.queues[q].submit(&h.mem, &chain);
    }
    for q in 0..4 {
        let (id, _) = h.queues[q].wait_used(&h.mem, TIMEOUT).expect("completion");
        assert_eq!(id, 0);
        assert_eq!(h.mem.read(h.queues[q].status_gpa(), 1)[0], S_OK);
    }
    // Read every area back through another queue.
    for q in 0..4 {
        let r = h.read((q + 1) % 4, q as u64 * 1000, 8192);
        assert_eq!(r.status, S_OK);
        assert!(r.data == pattern(q as u8, 8192), "queue {q} data");
    }
}

#[test]
fn malformed_chains_get_their_status_and_the_queue_keeps_working() {
    let d = Vcdev::start("blk-bad", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 16);
    let good = pattern(3, 4096);
    assert_eq!(h.write(0, 0, &good), S_OK);
    let check_alive = |h: &mut Harness| {
        let r = h.read(0, 0, 4096);
        assert_eq!(r.status, S_OK);
        assert!(r.data == good);
    };

    // Unknown request type.
    assert_eq!(h.blk(0, 0x7777, 0, &[], 0).status, S_UNSUPP);
    check_alive(&mut h);
    // Past the end of the disk (1 MiB = 2048 sectors).
    assert_eq!(h.read(0, 2047, 1024).status, S_IOERR);
    assert_eq!(h.read(0, u64::MAX / 2, 512).status, S_IOERR);
    check_alive(&mut h);
    // A data length that is not whole sectors.
    assert_eq!(h.read(0, 0, 100).status, S_IOERR);
    check_alive(&mut h);
    // A write whose data the device would have to write (wrong direction).
    assert_eq!(h.blk(0, VIRTIO_BLK_T_OUT, 0, &[], 512).status, S_IOERR);
    check_alive(&mut h);

    let hdr = h.queues[0].header_gpa();
    let status = h.queues[0].status_gpa();
    let data = h.queues[0].data_gpa();
    h.mem
        .write(hdr, &BlkRequest::new(VIRTIO_BLK_T_IN, 0).header());

    // Runs `chain` with the status byte unset: (status byte, used length).
    let run = |h: &mut Harness, chain: &[Desc]| {
        h.mem.write(status, &[STATUS_UNSET]);
        let (_, len) = h.run_chain(0, chain).expect("completion");
        (h.mem.read(status, 1)[0], len)
    };
    let hdr16 = (hdr, BlkRequest::HEADER_LEN, false);

    // Header too short (8 bytes).
    assert_eq!(
        run(&mut h, &[(hdr, 8, false), (status, 1, true)]).0,
        S_IOERR
    );
    check_alive(&mut h);
    // A data buffer outside guest memory.
    let outside = (0x7000_0000, 512, true);
    assert_eq!(run(&mut h, &[hdr16, outside, (status, 1, true)]).0, S_IOERR);
    check_alive(&mut h);
    // A readable descriptor after a writable one.
    let (w, r) = ((data, 512, true), (data, 512, false));
    assert_eq!(run(&mut h, &[hdr16, w, r, (status, 1, true)]).0, S_IOERR);
    check_alive(&mut h);
    // No writable status byte: the chain comes back with nothing written.
    let (st, len) = run(&mut h, &[hdr16, (status, 1, false)]);
    assert_eq!(len, 0);
    assert_eq!(st, 0xff);
    check_alive(&mut h);
    // A descriptor loop: 0 -> 1 -> 0.
    {
        let q = &mut h.queues[0];
        let f = VRING_DESC_F_NEXT as u16;
        q.write_desc(&h.mem, 0, hdr, 16, f, 1);
        q.write_desc(&h.mem, 1, status, 1, f | VRING_DESC_F_WRITE as u16, 0);
        q.publish(&h.mem, 0);
        q.wait_used(&h.mem, TIMEOUT).expect("loop comes back");
    }
    check_alive(&mut h);
    // A head index beyond the queue: ignored, the queue goes on.
    {
        let q = &mut h.queues[0];
        q.publish(&h.mem, 200);
        let _ = q.wait_used(&h.mem, Duration::from_millis(300));
    }
    // (Whether or not the bogus head came back, the next request works.)
    let r = h.read(0, 0, 4096);
    assert!(r.data == good || r.status == S_OK);
}

#[test]
fn reconnect_keeps_the_data() {
    let tmpimg = common::TempDir::new("blk-img").expect("tmp");
    let img = tmpimg.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(2 << 20))
        .expect("image");
    let spec = format!("blk,path={}", img.display());
    let mut d = Vcdev::start("blk-reconn", &["--device", &spec], "vfio0");
    let data = pattern(9, 32 * 1024);
    {
        let mut h = Harness::start(&d.socket("vfio0"), 1, 256);
        assert_eq!(h.write(0, 10, &data), S_OK);
    }
    // The first frontend is gone; a second one attaches and reads.
    d.wait_released();
    let mut h = Harness::start(&d.socket("vfio0"), 1, 128);
    let r = h.read(0, 10, data.len() as u32);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data, "data lost across reconnect");
    drop(h);
    // SIGTERM flushes, removes the socket and exits 0.
    let sock = d.socket("vfio0");
    let out = d.daemon.stop(TIMEOUT).expect("stop");
    assert!(
        out.status.success(),
        "exit: {:?}\n{}",
        out.status,
        out.stderr
    );
    assert!(!sock.exists(), "socket left behind");
    let on_disk = std::fs::read(&img).expect("image");
    assert!(on_disk[10 * SECTOR..10 * SECTOR + data.len()] == data[..]);
}

#[test]
fn second_frontend_is_refused_and_the_first_undisturbed() {
    let mut d = Vcdev::start("blk-own", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    assert_eq!(h.write(0, 0, &pattern(1, 512)), S_OK);
    // The second frontend's connection is closed at once.
    let s = std::os::unix::net::UnixStream::connect(d.socket("vfio0")).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 1];
    let n = std::io::Read::read(&mut &s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "second frontend not closed");
    let logged = common::poll_until(TIMEOUT, || {
        d.log().contains("frontend refused").then_some(())
    });
    assert!(logged.is_some(), "{}", d.log());
    // The first still works.
    assert!(h.read(0, 0, 512).data == pattern(1, 512));
}

#[test]
fn garbage_ends_only_that_connection() {
    let mut d = Vcdev::start(
        "blk-garbage",
        &["--device", "blk,ram=1M", "--device", "blk,ram=1M"],
        "vfio1",
    );
    let mut h0 = Harness::start(&d.socket("vfio0"), 1, 64);
    assert_eq!(h0.write(0, 0, &pattern(5, 1024)), S_OK);
    for junk in [
        &[0xffu8; 64][..],
        // A header with an unknown request code and NEED_REPLY.
        &[0x99, 0x99, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 0][..],
        // A payload size over the 1 MiB cap.
        &[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f][..],
        // SET_VRING_NUM with a short payload.
        &[8, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0][..],
    ] {
        let s = std::os::unix::net::UnixStream::connect(d.socket("vfio1")).expect("connect");
        std::io::Write::write_all(&mut &s, junk).expect("send");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut &s, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "connection not closed after {junk:?}");
        // Device 0 is undisturbed, the daemon alive.
        assert!(h0.read(0, 0, 1024).data == pattern(5, 1024));
        assert!(d.alive());
    }
    // Each junk connection was served (and ended), none refused as busy:
    // a connection releases its device before it closes.
    assert!(!d.log().contains("frontend refused"), "{}", d.log());
    let mut h1 = Harness::start(&d.socket("vfio1"), 1, 64);
    assert_eq!(h1.write(0, 0, &pattern(6, 512)), S_OK);
    assert!(h1.read(0, 0, 512).data == pattern(6, 512));
}

/// `vcdev serve` prints, ready to paste, the options that attach each
/// device (its socket, queues and queue size), and the guest memory options
/// once.
#[test]
fn serve_prints_how_to_attach_each_device() {
    let mut d = Vcdev::start(
        "blk-print",
        &[
            "--device",
            "blk,ram=1M",
            "--device",
            "blk,name=data,ram=1M,queues=2,queue-size=64",
        ],
        "vfio0",
    );
    let want = [
        format!(
            "-chardev socket,id=vfio0,path={},reconnect-ms=1000 -device vhost-user-blk-pci,chardev=vfio0,num-queues=1,queue-size=256",
            d.socket("vfio0").display()
        ),
        format!(
            "-chardev socket,id=data,path={},reconnect-ms=1000 -device vhost-user-blk-pci,chardev=data,num-queues=2,queue-size=64",
            d.socket("data").display()
        ),
    ];
    let out = common::poll_until(TIMEOUT, || {
        let out = d.daemon.proc().stdout().text();
        out.contains("-device virtio-iommu-pci").then_some(out)
    })
    .expect("vcdev serve printed the QEMU options");
    for w in &want {
        assert_eq!(
            out.lines().filter(|l| l == w).count(),
            1,
            "{w}\nnot in\n{out}"
        );
    }
    assert_eq!(out.matches("memory-backend-memfd").count(), 1, "{out}");
}

/// A device name QEMU does not take as an id (it must start with a
/// letter) still prints options QEMU accepts: the chardev id gets a
/// prefix, and a comma in the socket path is doubled (QEMU's escape).
#[test]
fn serve_prints_qemu_ids_and_escaped_paths() {
    let mut d = Vcdev::builder("blk-id")
        .subdir("a,b")
        .device("blk,name=0disk,ram=1M")
        .wait_for_vhost_user("0disk")
        .spawn();
    let sock = d.socket("0disk");
    let out = common::poll_until(TIMEOUT, || {
        let out = d.daemon.proc().stdout().text();
        out.contains("-device virtio-iommu-pci").then_some(out)
    })
    .expect("vcdev serve printed the QEMU options");
    let path = sock.display().to_string().replace(',', ",,");
    let want = format!(
        "-chardev socket,id=vcdev-0disk,path={path},reconnect-ms=1000 -device vhost-user-blk-pci,chardev=vcdev-0disk,num-queues=1,queue-size=256"
    );
    assert!(out.lines().any(|l| l == want), "{want}\nnot in\n{out}");
}

/// Invalid options: one clear line on stderr and exit code 2; nothing is
/// created.
#[test]
fn invalid_options_exit_2_with_one_line() {
    let dir = common::TempDir::new("blk-badopt").unwrap();
    for bad in [
        &["--device", "blk,ram=1M,foo=1"][..],
        &["--device", "blk,ram=12Q"],
        &["--device", "blk,queues=0"],
        &["--device", "nvme"],
        &["--iotlb-miss-timeout-ms", "0"],
        &["--device", "blk,direct=on,ram=1M"],
        &["--device", "blk,direct=on"],
        &["--device", "blk,ram=1M,aio=bogus"],
        &["--device", "blk,ram=1M,direct=yes-please"],
    ] {
        let out = common::vcdev::serve_once(&dir.join("run"), bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {err}");
        assert!(out.stdout.is_empty(), "{bad:?}");
        assert!(!err.trim().is_empty(), "{bad:?}: no message");
        assert!(!dir.join("run").join("vhost-user").exists(), "{bad:?}");
    }
}

/// The environment variable that makes every io_uring setup fail
/// (device-model's `aio.rs` honours it).
const INJECT_IO_URING_FAILURE: (&str, &str) = ("VCDEV_INJECT_IO_URING_FAILURE", "1");

/// A scratch disk image of `len` bytes in `dir`.
fn image(dir: &common::TempDir, len: u64) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(len))
        .expect("disk image");
    path
}

/// `aio=io_uring` that cannot be set up: exit 1, the log naming the device
/// and the reason; nothing is left listening.
#[test]
fn aio_io_uring_unavailable_exits_1_with_the_reason() {
    let dir = common::TempDir::new("blk-aio-fail").unwrap();
    let img = image(&dir, 1 << 20);
    let spec = format!("blk,name=d0,path={},aio=io_uring", img.display());
    let out = common::vcdev::serve_once_env(
        &dir.join("run"),
        &["--device", &spec],
        &[INJECT_IO_URING_FAILURE],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("d0") && err.contains("io_uring setup failure injected"),
        "the reason is not logged:\n{err}"
    );
    assert!(!dir.join("run").join("vhost-user").join("d0").exists());
}

/// `aio=auto` where io_uring cannot be set up: the sync engine, said once,
/// and I/O works.
#[test]
fn aio_auto_falls_back_to_sync_and_serves() {
    let dir = common::TempDir::new("blk-aio-auto").unwrap();
    let img = image(&dir, 1 << 20);
    let mut d = Vcdev::builder("blk-aio-auto")
        .device(&format!("blk,path={},aio=auto", img.display()))
        .env(INJECT_IO_URING_FAILURE.0, INJECT_IO_URING_FAILURE.1)
        .wait_for_vhost_user("vfio0")
        .spawn();
    let mut h = Harness::start(&d.socket("vfio0"), 1, 256);
    let data = pattern(3, 16 * 1024);
    assert_eq!(h.write(0, 16, &data), S_OK);
    assert_eq!(h.flush(0), S_OK);
    assert!(h.read(0, 16, data.len() as u32).data == data);
    let log = d.log();
    assert_eq!(
        log.matches("aio=auto chose sync").count(),
        1,
        "choice not logged once:\n{log}"
    );
    assert!(log.contains("aio=sync"), "{log}");
    let on_disk = std::fs::read(&img).unwrap();
    assert!(on_disk[16 * SECTOR..16 * SECTOR + data.len()] == data[..]);
}

/// `direct=on`: an O_DIRECT file device serves reads and writes through
/// vhost-user, from guest buffers at aligned and unaligned addresses, and
/// advertises the file's block size as `blk_size`. Skipped where the
/// scratch directory's file system has no O_DIRECT.
#[test]
fn direct_file_device_serves_aligned_and_unaligned_buffers() {
    let dir = common::TempDir::new("blk-direct").unwrap();
    let img = image(&dir, 4 << 20);
    let probe = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&img);
    if let Err(e) = probe {
        eprintln!(
            "SKIP: O_DIRECT unsupported in {}: {e}",
            dir.path().display()
        );
        return;
    }
    let mut d = Vcdev::builder("blk-direct")
        .device(&format!("blk,path={},direct=on", img.display()))
        .wait_for_vhost_user("vfio0")
        .spawn();
    let mut h = Harness::start(&d.socket("vfio0"), 1, 256);
    let blk_size = offset_of!(virtio_blk_config, blk_size) as u32;
    let (_, cfg) =
        h.fe.get_config(blk_size, 4, VhostUserConfigFlags::WRITABLE, &[0u8; 4])
            .expect("GET_CONFIG");
    let blk_size = u32::from_le_bytes(cfg[..4].try_into().unwrap());
    assert!(blk_size.is_power_of_two() && blk_size >= 512, "{blk_size}");
    let log = d.log_with("O_DIRECT alignment");
    assert!(log.contains("O_DIRECT alignment"), "{log}");
    let step = blk_size as usize / SECTOR;

    // Aligned: the queue's data slot.
    let data = pattern(11, 64 * 1024);
    assert_eq!(h.write(0, step as u64, &data), S_OK);
    let r = h.read(0, step as u64, data.len() as u32);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data, "aligned read back differs");

    // Unaligned: a write from +1 split 1000 + rest, a read into +3 and +512.
    let gpa = h.queues[0].data_gpa();
    let len = 8 * blk_size as usize;
    let more = pattern(12, len);
    h.mem.write(gpa + 1, &more);
    let bufs = [
        (h.dma_addr(gpa + 1), 1000, false),
        (h.dma_addr(gpa + 1001), len as u32 - 1000, false),
    ];
    let sector = (256 * step) as u64;
    assert_eq!(h.blk_raw(0, VIRTIO_BLK_T_OUT, sector, &bufs).0, S_OK);
    let half = len as u32 / 2;
    let into = [
        (h.dma_addr(gpa + 3), half, true),
        (h.dma_addr(gpa + 3 + u64::from(half) + 512), half, true),
    ];
    h.mem.write(gpa, &vec![0xa5; 2 * len]);
    let (status, used) = h.blk_raw(0, VIRTIO_BLK_T_IN, sector, &into);
    assert_eq!((status, used), (S_OK, len as u32 + 1));
    let mut got = h.mem.read(gpa + 3, half as usize);
    got.extend(h.mem.read(gpa + 3 + u64::from(half) + 512, half as usize));
    assert!(got == more, "unaligned read back differs");

    // A request off the block size is refused when blocks are larger
    // than a sector.
    if step > 1 {
        assert_eq!(h.read(0, 1, blk_size).status, S_IOERR);
    }
    assert_eq!(h.flush(0), S_OK);
    let on_disk = std::fs::read(&img).unwrap();
    assert!(on_disk[blk_size as usize..blk_size as usize + data.len()] == data[..]);
    let at = sector as usize * SECTOR;
    assert!(on_disk[at..at + len] == more[..]);
}

/// The next message the daemon sends on the backend channel.
fn backend_message(channel: &std::os::unix::net::UnixStream) -> vcdev::wire::Frame {
    vcdev::wire::read_frame(channel, vcdev::wire::FlagPolicy::VHOST_USER)
        .expect("a backend-channel frame")
        .expect("the backend channel is open")
}

/// Issue 11, `vcdev ctl resize NAME [SIZE] [--shrink]`: over the control
/// socket, a running frontend's device grows (GET_CONFIG shows the new
/// capacity, the backend channel carries CONFIG_CHANGE_MSG, the old data
/// stays and the new area takes I/O); a shrink without `--shrink`, a bad
/// size and a `readonly=on` device are refused with nothing changed or
/// sent; a shrink with `--shrink` makes requests past the new end fail.
#[test]
fn resize_over_the_control_socket_tells_the_frontend() {
    const MIB: u64 = 1 << 20;
    let tmp = common::TempDir::new("blk-resize-img").expect("temp dir");
    let image = tmp.join("ro.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(MIB))
        .expect("image");
    let ro = format!("blk,name=ro,path={},readonly=on", image.display());
    let mut d = Vcdev::start(
        "blk-resize",
        &["--device", "blk,ram=4M", "--device", &ro],
        "vfio0",
    );
    let mut h = Harness::start(&d.socket("vfio0"), 1, 256);
    let channel = h.backend_channel();
    let sectors = |bytes: u64| bytes / SECTOR as u64;

    let data = pattern(5, 8192);
    let near_end = sectors(4 * MIB) - 16;
    assert_eq!(h.write(0, near_end, &data), S_OK);
    assert_eq!(h.read(0, sectors(4 * MIB), 512).status, S_IOERR);
    assert_eq!(h.config_capacity(), sectors(4 * MIB));

    // Refused, nothing changes: a shrink not asked for, a size that is not
    // a multiple of 512, a read-only device.
    for (args, why, code, errno) in [
        (
            &["resize", "vfio0", "2M"][..],
            "vfio0: Shrinking",
            1,
            libc::EPERM,
        ),
        (
            &["resize", "vfio0", "1000"][..],
            "vfio0: Size 1000",
            1,
            libc::EINVAL,
        ),
        (&["resize", "vfio0", "5X"][..], "bad SIZE", 2, libc::EINVAL),
        (
            &["resize", "ro", "2M"][..],
            "ro: The device is read-only",
            1,
            libc::EROFS,
        ),
    ] {
        let out = d.ctl_output(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
        let (c, e) = d.ctl_json(args);
        assert_eq!((c, e["errno"].as_i64()), (code, Some(errno.into())), "{e}");
    }
    assert_eq!(h.config_capacity(), sectors(4 * MIB));
    assert_eq!(std::fs::metadata(&image).unwrap().len(), MIB);

    let (ok, text) = d.ctl(&["resize", "vfio0", "8M"]);
    assert!(ok, "{}", d.log());
    assert_eq!(
        text,
        format!(
            "vfio0: capacity {} bytes ({} sectors)\n",
            8 * MIB,
            sectors(8 * MIB)
        )
    );
    let f = backend_message(&channel);
    assert_eq!(
        f.header.request,
        u32::from(vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG)
    );
    assert!(!f.header.need_reply() && f.payload.is_empty() && f.fds.is_empty());
    // Exactly one message: the refusals above sent none (the daemon wrote
    // the message before answering the control socket).
    channel.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let more = std::io::Read::read(&mut &channel, &mut byte);
    assert!(
        matches!(&more, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{more:?}"
    );
    channel.set_nonblocking(false).unwrap();
    assert_eq!(h.config_capacity(), sectors(8 * MIB));

    assert!(h.read(0, near_end, data.len() as u32).data == data);
    let fresh = h.read(0, sectors(4 * MIB), 4096);
    assert_eq!(fresh.status, S_OK);
    assert!(fresh.data.iter().all(|&b| b == 0));
    let tail = pattern(6, 4096);
    let last = sectors(8 * MIB) - 8;
    assert_eq!(h.write(0, last, &tail), S_OK);
    assert!(h.read(0, last, 4096).data == tail);
    assert_eq!(h.read(0, sectors(8 * MIB), 512).status, S_IOERR);

    // A shrink asked for: told too, and the dropped area is gone.
    let (ok, _) = d.ctl(&["resize", "vfio0", "--shrink", "4M"]);
    assert!(ok, "{}", d.log());
    let f = backend_message(&channel);
    assert_eq!(
        f.header.request,
        u32::from(vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG)
    );
    assert_eq!(h.config_capacity(), sectors(4 * MIB));
    assert_eq!(h.read(0, last, 512).status, S_IOERR);
    assert!(h.read(0, near_end, data.len() as u32).data == data);
    let (_, show) = d.ctl(&["show", "vfio0"]);
    assert!(
        show.contains(&format!("capacity {} bytes", 4 * MIB)),
        "{show}"
    );
}

/// Issue 12, `poll-us=`: a worker busy-polling its avail ring takes a
/// request the driver offered without kicking; without `poll-us` the same
/// request waits for the kick.
#[test]
fn poll_us_takes_a_request_offered_without_a_kick() {
    /// Offers a 4 KiB read on queue 0 without kicking; its completion within
    /// `wait`, if any.
    fn offer_unkicked(h: &mut Harness, wait: Duration) -> Option<(u32, u32)> {
        let data = h.dma_addr(h.queues[0].data_gpa());
        let chain = h.blk_chain(0, VIRTIO_BLK_T_IN, 0, &[(data, 4096, true)]);
        let q = &mut h.queues[0];
        q.enable_calls(&h.mem);
        let chain: Vec<_> = chain
            .iter()
            .map(|&(a, l, w)| (a, l, if w { VRING_DESC_F_WRITE as u16 } else { 0 }))
            .collect();
        q.ring.write_chain(&h.mem, 0, &chain);
        q.offer(&h.mem, 0);
        q.wait_used(&h.mem, wait)
    }

    // A window of 1 s after each request: the unkicked one comes well
    // within it, however loaded the machine.
    let d = Vcdev::start(
        "blk-poll",
        &["--device", "blk,ram=4M,poll-us=1000000"],
        "vfio0",
    );
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    assert_eq!(h.write(0, 0, &pattern(5, 4096)), S_OK);
    let (id, len) = offer_unkicked(&mut h, Duration::from_millis(900))
        .expect("a polling worker takes an unkicked request");
    assert_eq!((id, len), (0, 4097));
    assert_eq!(h.mem.read(h.queues[0].status_gpa(), 1)[0], S_OK);
    // The worker's looks at the avail ring while it spins are not counted
    // as translations: a request after 100 ms of spinning adds its own
    // (a dozen), not the thousands of looks.
    let before = d.counter("vfio0", "translations");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(h.write(0, 8, &pattern(6, 4096)), S_OK);
    let added = d.counter("vfio0", "translations") - before;
    assert!(
        (1..100).contains(&added),
        "{added} translations counted for one request after spinning"
    );
    drop(h);
    drop(d);

    let d = Vcdev::start("blk-nopoll", &["--device", "blk,ram=4M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    assert_eq!(h.write(0, 0, &pattern(5, 4096)), S_OK);
    // The worker looks at the avail ring once more after it answered the
    // write (notifications back on, then a last look): a request offered
    // before that look is taken, kick or not, as virtio allows. Let it
    // finish that batch and sleep first (it once did not, in a full
    // parallel test run).
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        offer_unkicked(&mut h, Duration::from_millis(300)),
        None,
        "without poll-us an unkicked request waits for its kick"
    );
    h.queues[0].kick.write(1).expect("kick");
    let (id, _) = h.queues[0]
        .wait_used(&h.mem, TIMEOUT)
        .expect("the kick wakes the worker");
    assert_eq!(id, 0);
}

/// More chains offered at once than one wake-up's batches take (9 batches
/// of 8 chains, then the worker looks at its events): it polls on without
/// another kick, and every request completes, each with its own data.
#[test]
fn more_chains_than_a_wake_up_takes_complete_on_one_kick() {
    // 3 descriptors each: 240 of the ring's 256.
    const N: usize = 80;
    let d = Vcdev::start("blk-long-run", &["--device", "blk,ram=4M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 256);
    // Headers (16 bytes, then the status byte) 32 bytes apart, past the
    // queues' own slots; 4 KiB of data each.
    let hdr = |i: usize| META_GPA + 0x30_0000 + i as u64 * 32;
    let data = |i: usize| DATA_GPA + i as u64 * 4096;
    let sector = |i: usize| i as u64 * 8;
    for i in 0..N {
        h.mem.write(data(i), &pattern(i as u8, 4096));
        BlkRequest::new(VIRTIO_BLK_T_OUT, sector(i)).write(&h.mem, hdr(i), hdr(i) + 16);
        let chain = BlkRequest::chain(
            h.dma_addr(hdr(i)),
            &[(h.dma_addr(data(i)), 4096, R)],
            h.dma_addr(hdr(i) + 16),
        );
        let head = (i * 3) as u16;
        let q = &mut h.queues[0];
        q.ring.write_chain(&h.mem, head, &chain);
        q.offer(&h.mem, head);
    }
    h.queues[0].enable_calls(&h.mem);
    h.queues[0].kick.write(1).expect("kick");
    let mut done = [false; N];
    for _ in 0..N {
        let (id, len) = h.queues[0]
            .wait_used(&h.mem, TIMEOUT)
            .expect("every chain completes on the one kick");
        let i = id as usize / 3;
        assert!(!done[i], "chain {i} used twice");
        done[i] = true;
        assert_eq!(len, 1, "a write's used length is its status byte");
        assert_eq!(h.mem.read(hdr(i) + 16, 1)[0], S_OK, "chain {i}");
    }
    for i in [0, N / 2, N - 1] {
        let r = h.read(0, sector(i), 4096);
        assert_eq!(r.status, S_OK);
        assert!(r.data == pattern(i as u8, 4096), "sector {}", sector(i));
    }
}
