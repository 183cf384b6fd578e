//! A Linux guest (TCG unless KVM really works) with `vhost-user-blk-pci`
//! attached to a real `vcdev serve`: the guest writes a pattern with
//! O_DIRECT, drops caches and reads it back; its md5 must equal the
//! expected pattern's and the host backing file's.
//!
//! Skips with a message without QEMU 10 and the guest image
//! (`sudo .ci/install-qemu.sh`); `VCDEV_REQUIRE_QEMU=1` makes it fail.

mod common;

use std::time::Duration;

use common::qemu;
use common::vcdev::Vcdev;
use common::TempDir;

#[test]
fn no_viommu_guest_dd_md5_matches_backing_file() {
    let Some(guest) = qemu::require() else { return };
    let tmp = TempDir::new("qb-img").expect("tmpdir");
    let image = tmp.join("disk.img");
    let mib = 16;
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("image");
    // The topology leaves QEMU's vhost-user-blk queue-size at its default
    // (128): the device's must match, as seg_max is derived from it.
    let spec = format!("blk,path={},queues=2,queue-size=128", image.display());
    let mut d = Vcdev::start("qemu-blk", &["--device", &spec], "vfio0");

    let seed = format!("v{}", std::process::id());
    let run = guest
        .boot("no-viommu")
        .socket(&d.socket("vfio0"))
        .queues(2)
        .dd(mib, &seed)
        .run()
        .expect("spawn qemu");
    assert!(
        run.report.ok(),
        "{}\n--- vcdev log\n{}",
        run.diagnostics(),
        d.log()
    );
    let what = "vcdev no-viommu";
    let (_, expected) = qemu::expect_dd_readback(&run, what, &seed, mib);
    eprintln!("{}", qemu::dd_summary(what, mib, &run, &guest));
    // SIGTERM flushes the disk and exits 0.
    let out = d.daemon.stop(Duration::from_secs(10)).expect("stop vcdev");
    assert!(
        out.status.success(),
        "vcdev exit {:?}\n{}",
        out.status,
        out.stderr
    );
    assert!(out.stderr.contains("frontend connected"), "{}", out.stderr);
    // QEMU's vhost-user-blk takes the offered INFLIGHT_SHMFD: it asks for
    // the region at start and hands it back at once.
    for line in [
        "inflight region of 2 queues x 128 entries",
        "inflight region set (2 queues x 128 entries)",
    ] {
        assert!(out.stderr.contains(line), "no {line:?} in\n{}", out.stderr);
    }
    qemu::assert_dd_on_disk(&image, mib, &expected, what);
}

/// The device outlives its frontend: a first guest writes the pattern to a
/// RAM disk and powers off (QEMU disconnects), a second guest connects to
/// the same daemon and reads the same bytes back.
#[test]
fn next_guest_reads_what_the_previous_one_wrote() {
    let Some(guest) = qemu::require() else { return };
    let mib = 8;
    let mut d = Vcdev::start(
        "qemu-blk-next",
        &["--device", "blk,ram=32M,queue-size=128"],
        "vfio0",
    );
    let seed = format!("n{}", std::process::id());
    let boot = |test: &str| {
        guest
            .boot("no-viommu")
            .socket(&d.socket("vfio0"))
            .test(test)
            .param("mb", mib)
            .param("seed", &seed)
            .run()
            .expect("spawn qemu")
    };
    let first = boot("dd");
    qemu::expect_dd_readback(&first, "first guest (dd)", &seed, mib);
    let second = boot("read");
    qemu::expect_dd_readback(&second, "second guest (read)", &seed, mib);
    let log = d.log_with("frontend disconnected");
    assert_eq!(log.matches("frontend connected").count(), 2, "{log}");
    assert!(log.contains("frontend disconnected"), "{log}");
}

/// A daemon serving `vfio0`, a `direct=on` device with 2 queues of 128
/// over a fresh image of `mib` + 16 MiB (in the returned TempDir).
fn direct_device(tag: &str, mib: u32) -> (TempDir, std::path::PathBuf, Vcdev) {
    let tmp = TempDir::new(tag).expect("tmpdir");
    let image = tmp.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(u64::from(mib + 16) << 20))
        .expect("image");
    let spec = format!(
        "blk,path={},direct=on,queues=2,queue-size=128",
        image.display()
    );
    let d = Vcdev::start(tag, &["--device", &spec], "vfio0");
    (tmp, image, d)
}

/// Issue #8: several writers at once, each with O_DIRECT (many requests in
/// flight on each queue), on a `direct=on` device: the guest reads back
/// the pattern and the host file holds it.
#[test]
fn parallel_direct_writers_on_a_direct_device() {
    let Some(guest) = qemu::require() else { return };
    let mib = 32;
    let (_tmp, image, d) = direct_device("qemu-blk-pdd", mib);
    let seed = format!("p{}", std::process::id());
    let run = guest
        .boot("no-viommu")
        .socket(&d.socket("vfio0"))
        .queues(2)
        .pdd(mib, &seed, 4)
        .run()
        .expect("qemu");
    let what = "4 parallel O_DIRECT writers, direct=on";
    let (_, md5) = qemu::expect_dd_readback(&run, what, &seed, mib);
    eprintln!("{}", qemu::dd_summary(what, mib, &run, &guest));
    qemu::assert_dd_on_disk(&image, mib, &md5, what);
}

/// Issue #8: `kill -9` of vcdev while parallel guest writers have requests
/// in flight on a `direct=on` device, then a new daemon on the same DIR.
/// QEMU (chardev reconnect-ms) reconnects and hands back the inflight
/// region it kept (SET_INFLIGHT_FD); the new daemon submits again what was
/// in flight; the guest's writes end without an I/O error and every sector
/// reaches the disk.
#[test]
fn daemon_killed_mid_write_and_restarted() {
    let Some(guest) = qemu::require() else { return };
    let mib = 64;
    let (_tmp, image, mut d) = direct_device("qemu-blk-kill", mib);
    let seed = format!("k{}", std::process::id());
    let expected = qemu::dd_pattern(&seed, mib);
    let run = guest
        .boot("no-viommu-reconnect")
        .socket(&d.socket("vfio0"))
        .queues(2)
        .pdd(mib, &seed, 4)
        .spawn()
        .expect("spawn qemu");
    // Mid-write: writer 0's second MiB is on the disk (each writer writes
    // its part in order), most of the rest is not yet.
    let probe = 1usize << 20;
    let mid = common::poll_until(Duration::from_secs(120), || {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; 512];
        let f = std::fs::File::open(&image).ok()?;
        f.read_exact_at(&mut b, probe as u64).ok()?;
        (b == expected[probe..probe + 512]).then_some(())
    });
    assert!(
        mid.is_some(),
        "the guest never wrote:\n{}\n{}\n{}",
        run.console(),
        run.qemu_stderr(),
        d.log()
    );
    d.kill_and_restart();
    let reconnected = common::poll_until(Duration::from_secs(30), || {
        d.log().contains("inflight region set").then_some(())
    });
    let run = run.wait().expect("qemu");
    assert!(
        reconnected.is_some() && run.report.ok(),
        "{}\n--- restarted vcdev log\n{}",
        run.diagnostics(),
        d.log()
    );
    let what = "vcdev killed and restarted under 4 parallel writers";
    let (_, md5) = qemu::expect_dd_readback(&run, what, &seed, mib);
    eprintln!("{}", qemu::dd_summary(what, mib, &run, &guest));
    eprintln!(
        "restarted daemon: {}",
        d.log()
            .lines()
            .filter(|l| l.contains("submitted again") || l.contains("inflight region"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    qemu::assert_dd_on_disk(&image, mib, &md5, what);
}

/// Issue #11 (memory slots): a pc-dimm hot-plugged over QMP into a running
/// guest (`qemu-configs/memory-hotplug`: `-m 512M,slots=4,maxmem=2G`),
/// with I/O into the new memory.
///
/// QEMU's vhost-user-blk gives every memory region with its own
/// ADD_MEM_REG (CONFIGURE_MEM_SLOTS, 509 slots offered), the dimm too. The
/// guest onlines the dimm as ZONE_MOVABLE, where user pages (dd's O_DIRECT
/// buffers) are taken from first, runs the dd test, then reads 4 MiB that
/// the host wrote and the guest never saw into dd's buffer alone. The proof
/// that the device wrote into the new memory: with the VM stopped, those
/// sectors are found, intact, in the dimm's memfd (read through QEMU's
/// `/proc/<pid>/fd`): the guest never copied them anywhere, so only the
/// device can have put them there, through the region ADD_MEM_REG added.
#[test]
fn pc_dimm_hotplugged_into_a_running_guest_takes_io() {
    let Some(guest) = qemu::require() else { return };
    const DIMM: u64 = 256 << 20;
    let (mib, probe_mib) = (16u32, 4u32);
    let tmp = TempDir::new("qemu-hotplug").expect("tmpdir");
    let image = tmp.join("disk.img");
    let seed = format!("h{}", std::process::id());
    let probe_seed = format!("probe{}", std::process::id());
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&image).expect("image");
        f.set_len(u64::from(mib + probe_mib + 16) << 20)
            .expect("image size");
        f.write_all_at(
            &qemu::dd_pattern(&probe_seed, probe_mib),
            u64::from(mib) << 20,
        )
        .expect("probe data");
    }
    let spec = format!("blk,path={},queue-size=128", image.display());
    let mut d = Vcdev::start("qemu-hotplug", &["--device", &spec], "vfio0");
    let qmp_path = tmp.join("qmp.sock");
    let mut run = guest
        .boot("memory-hotplug")
        .socket(&d.socket("vfio0"))
        .qmp(&qmp_path)
        .mem_mib(512)
        .dd(mib, &seed)
        .test("hotplug")
        .param("hpmb", DIMM >> 20)
        .param("probemb", probe_mib)
        .param("wait", 600)
        .spawn()
        .expect("spawn qemu");
    let waiting = run.wait_for_console("VCDEV-RESULT hotplug=waiting", Duration::from_secs(240));
    assert!(waiting, "the guest never got ready:\n{}", run.console());
    let mut qmp = qemu::Qmp::connect(&qmp_path, Duration::from_secs(10)).expect("QMP");
    qmp.execute(
        "object-add",
        &format!(
            r#"{{"qom-type": "memory-backend-memfd", "id": "hp0", "size": {DIMM}, "share": true}}"#
        ),
    )
    .expect("object-add");
    qmp.execute(
        "device_add",
        r#"{"driver": "pc-dimm", "id": "dimm0", "memdev": "hp0"}"#,
    )
    .expect("device_add");
    let devices = qmp.execute("query-memory-devices", "").expect("query");
    let addr = qemu::json_u64(&devices, "addr").expect("dimm address");
    assert_eq!(qemu::json_u64(&devices, "size"), Some(DIMM), "{devices}");
    // The guest powers off at the end; -no-shutdown keeps QEMU (and the
    // dimm's memory) until "quit".
    let stopped = common::poll_until(Duration::from_secs(300), || {
        let st = qmp.execute("query-status", "").ok()?;
        st.contains(r#""status": "shutdown""#).then_some(())
    });
    let mut dimm = qemu::memfd_of(run.pid(), DIMM).expect("the dimm's memfd");
    let (found, damaged) = qemu::find_pattern_sectors(&mut dimm, &probe_seed).expect("scan");
    qmp.execute("quit", "").expect("quit");
    let run = run.wait().expect("qemu");
    assert!(
        stopped.is_some(),
        "the guest never powered off\n{}",
        run.diagnostics()
    );
    let what = "pc-dimm hot-plugged";
    let (report, md5) = qemu::expect_dd_readback(&run, what, &seed, mib);
    qemu::assert_dd_on_disk(&image, mib, &md5, what);
    // The guest onlined the dimm's blocks, in ZONE_MOVABLE.
    let online = report.find("hotplug", "online").expect("hotplug=online");
    assert_eq!(
        online.get("zone").map(String::as_str),
        Some("Movable"),
        "{online:?}"
    );
    // QEMU gave the dimm with ADD_MEM_REG (never SET_MEM_TABLE).
    let added = format!("memory region added at GPA {addr:#x}, {DIMM:#x} bytes");
    let log = d.log_with(&added);
    assert!(log.contains(&added), "no {added:?} in\n{log}");
    assert!(!log.contains("memory table set"), "{log}");
    // The device wrote into the dimm: the probe's sectors are there, whole.
    // dd's last 4 MiB buffer holds 8,192 sectors; a few of its pages may be
    // reused (zeroed) by the processes that ran after it.
    eprintln!(
        "{what}: dimm at GPA {addr:#x}; {} of {} probe sectors found intact in it, {damaged} damaged; {}",
        found.len(),
        probe_mib * 2048,
        qemu::dd_summary(what, mib, &run, &guest)
    );
    assert_eq!(damaged, 0, "sectors with the probe's seed but wrong bytes");
    assert!(
        found.len() >= 2048,
        "only {} probe sectors in the dimm: the I/O did not use the new memory\n{}",
        found.len(),
        run.diagnostics()
    );
}

/// Issue 11: `vcdev ctl resize` of a running guest's disk. QEMU gets
/// CONFIG_CHANGE_MSG on the backend channel, reads the config again and
/// interrupts the guest, whose `/sys/block/vda/size` changes (the guest
/// polls it); the guest then writes the dd pattern's first MiB into the
/// last MiB of the grown disk and reads it back; the image file grew and
/// holds it.
#[test]
fn running_guest_sees_its_disk_grow() {
    let Some(guest) = qemu::require() else { return };
    const MIB: u64 = 1 << 20;
    let tmp = TempDir::new("qb-resize").expect("tmpdir");
    let image = tmp.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(32 * MIB))
        .expect("image");
    let spec = format!("blk,path={},queues=2,queue-size=128", image.display());
    let mut d = Vcdev::start("qemu-blk-resize", &["--device", &spec], "vfio0");
    let mut run = guest
        .boot("no-viommu")
        .socket(&d.socket("vfio0"))
        .queues(2)
        .test("resize")
        .param("wait", 600)
        .spawn()
        .expect("spawn qemu");
    let waiting = run.wait_for_console("VCDEV-RESULT resize_from=", Duration::from_secs(120));
    assert!(waiting, "the guest never came up:\n{}", run.console());
    let (ok, text) = d.ctl(&["resize", "vfio0", "48M"]);
    assert!(ok, "ctl resize failed: {text}\n{}", d.log());
    let run = run.wait().expect("qemu");
    let diag = format!("{}\n--- vcdev log\n{}", run.diagnostics(), d.log());
    assert!(run.report.ok(), "{}", diag);
    let bytes = |k: &str| run.report.get(k).and_then(|v| v.parse::<u64>().ok());
    assert_eq!(bytes("resize_from"), Some(32 * MIB), "{}", diag);
    assert_eq!(bytes("resize_to"), Some(48 * MIB), "{}", diag);
    let want = run.report.get("want_md5").expect("want_md5").to_owned();
    assert_eq!(run.report.get("tail_md5"), Some(want.as_str()), "{}", diag);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 48 * MIB);
    let on_disk = qemu::file_region_md5(&image, 47 * MIB, MIB).expect("md5 of the tail");
    assert_eq!(on_disk, want, "the last MiB of the image");
    let log = d.log_with("CONFIG_CHANGE_MSG");
    assert!(log.contains("CONFIG_CHANGE_MSG"), "{log}");
}
