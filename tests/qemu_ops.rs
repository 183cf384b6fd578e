//! Daemon operations with QEMU guests (issue #11): one `vcdev serve` for
//! several guests, a guest killed in the middle of its writes and its
//! device taken over by a fresh guest; a guest on a device added at run
//! time with `vcdev ctl add`, grown with `ctl resize` while it runs, not
//! removable without `--force`, force-removed while it writes, and added
//! back, where the guest's writes resume.
//!
//! Skips with a message without QEMU 10 and the guest image
//! (`sudo .ci/install-qemu.sh`); `VCDEV_REQUIRE_QEMU=1` makes it fail.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::frontend::{pattern, Harness, S_OK};
use common::qemu::{self, GuestReport, RunningGuest};
use common::vcdev::Vcdev;
use common::TempDir;

const MIB: u64 = 1 << 20;
/// Sectors of the dd pattern in one MiB.
const SECTORS_PER_MIB: u64 = MIB / qemu::PATTERN_SECTOR as u64;

/// How much more a guest writes under KVM than under TCG, so that the host
/// still catches it in the middle of its writes (the tests kill or remove
/// a guest once it wrote its first MiB or two).
fn scale(guest: &qemu::Guest) -> u32 {
    if guest.accel == "kvm" {
        4
    } else {
        1
    }
}

/// A sparse image file of `size` bytes in `dir`.
fn image(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(size))
        .expect("image");
    p
}

/// How many of the `jobs` writers of the guest's `pdd` test over `mib` MiB
/// have written their last sector to `image`.
fn pdd_writers_done(image: &Path, seed: &str, mib: u32, jobs: u32) -> u32 {
    let part = u64::from(mib / jobs) * SECTORS_PER_MIB;
    (1..=u64::from(jobs))
        .filter(|j| qemu::pattern_sector_on_disk(image, seed, j * part - 1))
        .count() as u32
}

/// The daemon's log lines about the frontend in QEMU process `pid`.
fn lines_of(log: &str, pid: u32) -> Vec<&str> {
    let tag = format!("(pid {pid} ");
    log.lines().filter(|l| l.contains(&tag)).collect()
}

/// Issue 11: three guests on one daemon, each writing its own file-backed
/// device with the `pdd` test (4 O_DIRECT writers). They start writing
/// together: each first runs the guest's `resize` test, which waits for
/// its disk to grow, and the host grows the three disks once all three
/// guests wait (guests boot at different speeds on a loaded host). Once
/// all three are writing, one QEMU is SIGKILLed; the other two finish, and the guest's
/// md5 and the host file's match the pattern. A fresh guest is started on
/// the killed guest's device at once: the daemon makes it wait for the
/// teardown of the killed frontend (or serves it at once when that was
/// already done), never refuses it, and the fresh guest writes and reads
/// its own pattern.
#[test]
fn three_guests_one_killed_mid_write_then_a_fresh_guest_takes_its_device() {
    let Some(guest) = qemu::require() else { return };
    const JOBS: u32 = 4;
    const VICTIM: usize = 1;
    let t0 = Instant::now();
    let tmp = TempDir::new("qops-three").expect("tmpdir");
    let names = ["g0", "g1", "g2"];
    // The victim writes more, so that it is still writing when the others
    // are well under way.
    let mibs = [32, 64, 32].map(|m: u32| m * scale(&guest));
    let images: Vec<PathBuf> = names
        .iter()
        .zip(mibs)
        .map(|(n, mib)| image(&tmp, &format!("{n}.img"), u64::from(mib + 16) * MIB))
        .collect();
    let mut b = Vcdev::builder("qops-three");
    for (n, img) in names.iter().zip(&images) {
        b = b.device(&format!(
            "blk,name={n},path={},queues=2,queue-size=128",
            img.display()
        ));
    }
    let mut d = b.spawn();
    let pid = std::process::id();
    let seeds: Vec<String> = names.iter().map(|n| format!("{n}p{pid}")).collect();
    let boot = |i: usize| {
        guest
            .boot("no-viommu")
            .socket(&d.socket(names[i]))
            .queues(2)
            .smp(1)
            .timeout(Duration::from_secs(90))
            .test("resize,pdd")
            .param("mb", mibs[i])
            .param("seed", &seeds[i])
            .param("jobs", JOBS)
            .param("wait", 600)
            .spawn()
            .expect("spawn qemu")
    };
    let mut guests: Vec<RunningGuest> = (0..names.len()).map(boot).collect();
    let pids: Vec<u32> = guests.iter().map(RunningGuest::pid).collect();

    // The start line: every guest waits for its disk to grow (by 1 MiB,
    // whose last MiB the resize test writes: beyond the pdd's area).
    for g in &mut guests {
        let up = g.wait_for_console("VCDEV-RESULT resize_from=", Duration::from_secs(60));
        assert!(up, "a guest never came up:\n{}", g.console());
    }
    for (n, mib) in names.iter().zip(mibs) {
        let (code, r) = d.ctl_json(&["resize", n, &format!("{}M", mib + 17)]);
        assert_eq!(code, 0, "{r}");
    }

    // All three writing: each guest's writer 0 has its second MiB on disk.
    let writing = common::poll_until(Duration::from_secs(60), || {
        (0..names.len())
            .all(|i| qemu::pattern_sector_on_disk(&images[i], &seeds[i], SECTORS_PER_MIB))
            .then_some(())
    });
    assert!(
        writing.is_some(),
        "the guests never all wrote:\n{}",
        guests
            .iter()
            .map(|g| g.console())
            .collect::<Vec<_>>()
            .join("\n-----\n")
    );
    let done: Vec<u32> = (0..names.len())
        .map(|i| pdd_writers_done(&images[i], &seeds[i], mibs[i], JOBS))
        .collect();
    guests[VICTIM].signal(libc::SIGKILL).expect("SIGKILL qemu");
    let killed_at = t0.elapsed();
    // A fresh guest on the victim's device, at once.
    let fresh_seed = format!("fresh{pid}");
    let fresh_mib = 16;
    let fresh = guest
        .boot("no-viommu")
        .socket(&d.socket(names[VICTIM]))
        .queues(2)
        .smp(1)
        .timeout(Duration::from_secs(90))
        .pdd(fresh_mib, &fresh_seed, JOBS)
        .spawn()
        .expect("spawn the fresh qemu");
    let fresh_pid = fresh.pid();
    // Each guest was in the middle of its writes when the victim died.
    for (i, n) in done.iter().enumerate() {
        assert!(
            *n < JOBS,
            "{}: all its writers were done before the kill: not mid-write",
            names[i]
        );
    }

    let runs: Vec<_> = guests
        .into_iter()
        .map(|g| g.wait().expect("qemu"))
        .collect();
    let fresh = fresh.wait().expect("fresh qemu");
    let log = d.log();
    let diag = |run: &qemu::GuestRun| format!("{}\n--- vcdev log\n{log}", run.diagnostics());

    // The victim died of the SIGKILL, before its guest read anything back.
    let victim = &runs[VICTIM];
    assert_eq!(
        victim.finished.status.signal(),
        Some(libc::SIGKILL),
        "{}",
        diag(victim)
    );
    assert!(victim.report.get("md5").is_none(), "{}", diag(victim));
    // The survivors finished with their data intact.
    for (i, run) in runs.iter().enumerate().filter(|(i, _)| *i != VICTIM) {
        assert!(run.report.ok(), "{}", diag(run));
        let what = format!("survivor {}", names[i]);
        let (_, md5) = qemu::expect_dd_readback(run, &what, &seeds[i], mibs[i]);
        qemu::assert_dd_on_disk(&images[i], mibs[i], &md5, &what);
        eprintln!("{}", qemu::dd_summary(&what, mibs[i], run, &guest));
    }
    // The fresh guest was served on the victim's device.
    assert!(fresh.report.ok(), "{}", diag(&fresh));
    let what = format!("fresh guest on {}", names[VICTIM]);
    let (_, md5) = qemu::expect_dd_readback(&fresh, &what, &fresh_seed, fresh_mib);
    qemu::assert_dd_on_disk(&images[VICTIM], fresh_mib, &md5, &what);
    eprintln!("{}", qemu::dd_summary(&what, fresh_mib, &fresh, &guest));

    // The daemon tore the victim's connection down and then served the
    // fresh guest; it refused no one.
    assert!(!log.contains("frontend refused"), "{log}");
    let victim_lines = lines_of(&log, pids[VICTIM]);
    assert!(
        victim_lines.iter().any(|l| l.contains("device released")),
        "victim not torn down:\n{log}"
    );
    let fresh_lines = lines_of(&log, fresh_pid);
    assert!(
        fresh_lines.iter().any(|l| l.contains("frontend connected")),
        "fresh guest not served:\n{log}"
    );
    let waited = fresh_lines
        .iter()
        .any(|l| l.contains("waiting for the previous frontend's teardown"));
    eprintln!(
        "writers done at the kill {done:?} (of {JOBS}); victim killed at {killed_at:.1?}; \
         fresh guest {} its predecessor's teardown; total {:.1?}",
        if waited { "waited for" } else { "came after" },
        t0.elapsed()
    );
    assert!(d.alive());
}

/// Issue 11: a guest on a device added at run time (`vcdev ctl add`,
/// attached with the QEMU options the JSON returns). It runs the guest's
/// `resize` test (the host grows the disk with `ctl resize`, the guest sees
/// the new size in /sys/block/vda/size and writes and reads the disk's new
/// last MiB), then writes the dd pattern. While it runs, `ctl remove` is
/// refused with EBUSY, naming QEMU as the holder; `ctl remove --force` in
/// the middle of the dd disconnects QEMU and removes the device (its
/// nodes go, QEMU's reconnect attempts find no socket). The daemon lives
/// on: a harness frontend on a command-line device does I/O throughout the
/// removal, every request within 1 s, and its data is untouched. Last, the
/// device is added back with the same SPEC: QEMU reconnects, and the
/// guest's dd ends with every sector in place.
#[test]
fn guest_on_a_ctl_added_device_grows_is_force_removed_mid_write_and_comes_back() {
    let Some(guest) = qemu::require() else { return };
    let t0 = Instant::now();
    let tmp = TempDir::new("qops-added").expect("tmpdir");
    let img = image(&tmp, "d1.img", 32 * MIB);
    let mut d = Vcdev::builder("qops-added")
        .device("blk,name=d0,ram=4M")
        .spawn();
    let mut h0 = Harness::start(&d.socket("d0"), 1, 64);
    let kept = pattern(7, 4096);
    assert_eq!(h0.write(0, 0, &kept), S_OK);

    let spec = format!("blk,name=d1,path={},queues=2", img.display());
    let (code, added) = d.ctl_json(&["add", &spec]);
    assert_eq!(code, 0, "{added}");
    let attach = added["qemu"]
        .as_str()
        .expect("qemu attach options")
        .to_owned();
    let seed = format!("a{}", std::process::id());
    // The disk grows from 32 MiB to `grown`, then the dd writes `mib`.
    let grown = 48 * u64::from(scale(&guest)) * MIB;
    let mib = u32::try_from((grown - 8 * MIB) / MIB).expect("MiB");
    let mut run = guest
        .boot("no-viommu")
        .attach(&attach)
        .test("resize,dd")
        .param("mb", mib)
        .param("seed", &seed)
        .param("wait", 600)
        .timeout(Duration::from_secs(90))
        .spawn()
        .expect("spawn qemu");
    let qemu_pid = run.pid();
    let up = run.wait_for_console("VCDEV-RESULT resize_from=", Duration::from_secs(60));
    assert!(
        up,
        "the guest never came up:\n{}\n{}",
        run.console(),
        d.log()
    );

    // Held by QEMU: refused, exit 1, EBUSY, the holder named.
    let (code, e) = d.ctl_json(&["remove", "d1"]);
    assert_eq!(code, 1, "{e}");
    assert_eq!(e["errno"], libc::EBUSY, "{e}");
    let holder = e["error"].as_str().unwrap_or_default();
    assert!(
        holder.contains("d1#") && holder.contains(&format!("pid {qemu_pid} ")),
        "the holder is not named: {e}"
    );

    // Grown while it runs: the guest sees it and uses the new last MiB.
    let (code, r) = d.ctl_json(&["resize", "d1", &format!("{}M", grown / MIB)]);
    assert_eq!(code, 0, "{r}\n{}", d.log());
    let seen = run.wait_for_console("VCDEV-RESULT resize_to=", Duration::from_secs(30));
    let report = GuestReport::parse(&run.console());
    assert!(
        seen,
        "the guest never saw the new size:\n{}\n{}",
        run.console(),
        d.log()
    );
    let bytes = |k: &str| report.get(k).and_then(|v| v.parse::<u64>().ok());
    assert_eq!(bytes("resize_from"), Some(32 * MIB), "{report:?}");
    assert_eq!(bytes("resize_to"), Some(grown), "{report:?}");
    let want = report.get("want_md5").expect("want_md5").to_owned();
    assert_eq!(report.get("tail_md5"), Some(want.as_str()), "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");

    // Removal refused still, now that the guest writes the dd pattern.
    let dd_started = common::poll_until(Duration::from_secs(30), || {
        qemu::pattern_sector_on_disk(&img, &seed, SECTORS_PER_MIB).then_some(())
    });
    assert!(
        dd_started.is_some(),
        "the guest's dd never wrote:\n{}",
        run.console()
    );
    assert_eq!(d.ctl_json(&["remove", "d1"]).0, 1);

    // --force in the middle of the dd, while d0's frontend does I/O.
    let dir = d.dir().to_path_buf();
    let remover =
        std::thread::spawn(move || common::vcdev::ctl_json(&dir, &["remove", "d1", "--force"]));
    let mut worst = Duration::ZERO;
    let mut pairs = 0u64;
    while !remover.is_finished() || pairs < 100 {
        let t = Instant::now();
        let data = pattern((pairs % 251) as u8, 4096);
        let sector = 8 + pairs % 64 * 8;
        assert_eq!(h0.write(0, sector, &data), S_OK);
        let r = h0.read(0, sector, 4096);
        assert_eq!((r.status, r.data == data), (S_OK, true));
        worst = worst.max(t.elapsed());
        pairs += 1;
    }
    let (code, r) = remover.join().expect("ctl remove --force");
    assert_eq!(code, 0, "{r}\n{}", d.log());
    let who = r["disconnected"].as_str().unwrap_or_default();
    assert!(who.contains(&format!("pid {qemu_pid} ")), "{r}");
    // It was mid-write: dd's last sector never reached the disk.
    let last = u64::from(mib) * SECTORS_PER_MIB - 1;
    assert!(
        !qemu::pattern_sector_on_disk(&img, &seed, last),
        "the dd had finished before the removal"
    );
    let removed_at = t0.elapsed();

    // Gone: the socket, the cdev node, the device in the list.
    assert!(!d.socket("d1").exists() && !d.path("devices/d1").exists());
    let (_, list) = d.ctl_json(&["list"]);
    let names: Vec<&str> = list["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["d0"], "{list}");
    // The guest's data up to the removal was flushed: the grown tail.
    assert_eq!(std::fs::metadata(&img).expect("image").len(), grown);
    let tail = qemu::file_region_md5(&img, grown - MIB, MIB).expect("md5 of the tail");
    assert_eq!(tail, want, "the last MiB of the image");

    // QEMU saw the disconnect: it stopped the device and retries the
    // socket (the attach options' reconnect-ms), which is gone.
    let retry = format!("Unable to connect character device d1: Failed to connect to '{}': No such file or directory", d.socket("d1").display());
    let retried = common::poll_until(Duration::from_secs(10), || {
        run.qemu_stderr().contains(&retry).then_some(())
    });
    assert!(
        retried.is_some(),
        "QEMU never retried:\n{}",
        run.qemu_stderr()
    );
    assert!(run.alive(), "QEMU exited:\n{}", run.qemu_stderr());

    // The daemon lives on, d0 untouched.
    let r = h0.read(0, 0, 4096);
    assert_eq!((r.status, r.data == kept), (S_OK, true));
    assert!(d.alive());
    let log = d.log_with("device released");
    let qemu_lines = lines_of(&log, qemu_pid);
    assert!(
        qemu_lines.iter().any(|l| l.contains("device released")),
        "{log}"
    );
    assert_eq!(
        qemu_lines
            .iter()
            .filter(|l| l.contains("frontend connected"))
            .count(),
        1,
        "{log}"
    );
    // Added back with the same SPEC: QEMU reconnects by itself, hands
    // back its inflight region, and the guest's dd, stalled since the
    // removal, ends; the guest and the host file hold the whole pattern.
    let (code, again) = d.ctl_json(&["add", &spec]);
    assert_eq!(code, 0, "{again}");
    assert_eq!(again["qemu"].as_str(), Some(attach.as_str()), "{again}");
    let run = run.wait().expect("qemu");
    let log = d.log();
    assert!(
        run.report.ok(),
        "{}\n--- vcdev log\n{log}",
        run.diagnostics()
    );
    let what = "dd interrupted by ctl remove --force, then ctl add";
    let (_, md5) = qemu::expect_dd_readback(&run, what, &seed, mib);
    qemu::assert_dd_on_disk(&img, mib, &md5, what);
    let qemu_lines = lines_of(&log, qemu_pid);
    assert_eq!(
        qemu_lines
            .iter()
            .filter(|l| l.contains("frontend connected"))
            .count(),
        2,
        "{log}"
    );
    assert!(!log.contains("frontend refused"), "{log}");
    eprintln!("{}", qemu::dd_summary(what, mib, &run, &guest));
    eprintln!(
        "d0: {pairs} write+read pairs during the forced removal, worst {worst:?}; \
         removed at {removed_at:.1?}, total {:.1?}",
        t0.elapsed()
    );
    assert!(worst < Duration::from_secs(1), "worst {worst:?}");
}
