//! Daemon operations (issue #11): devices added, removed and listed at run
//! time through `vcdev ctl` (JSON, exit codes), the state file across a
//! restart, quick reconnects, and idle devices that cost no thread and at
//! most 64 KiB of resident memory each.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::frontend::{pattern, Harness, S_OK};
use common::vcdev::Vcdev;
use common::TempDir;

fn names(list: &serde_json::Value) -> Vec<String> {
    list["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn image(dir: &TempDir, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(size))
        .expect("image");
    p
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Add, I/O, remove refused while held (naming the holder), remove
/// `--force` while held: the frontend is disconnected after its data is
/// flushed, the nodes are gone, and the other device never noticed.
#[test]
fn add_io_then_remove_refused_then_forced() {
    let imgs = TempDir::new("ops-add").unwrap();
    let img = image(&imgs, "d1.img", 4 << 20);
    let mut d = Vcdev::builder("ops-add")
        .device("blk,name=d0,ram=4M")
        .spawn();
    let mut h0 = Harness::start(&d.socket("d0"), 1, 64);
    assert_eq!(h0.write(0, 0, &pattern(9, 4096)), S_OK);

    let spec = format!("blk,name=d1,path={}", img.display());
    let (code, added) = d.ctl_json(&["add", &spec]);
    assert_eq!(code, 0, "{added}");
    assert_eq!(added["name"], "d1");
    let sock = d.socket("d1");
    assert_eq!(added["vhost_user_socket"], sock.display().to_string());
    assert!(
        added["qemu"]
            .as_str()
            .unwrap()
            .contains("vhost-user-blk-pci"),
        "{added}"
    );
    assert!(d.path("devices/d1").exists());

    let mut h1 = Harness::start(&sock, 1, 64);
    let channel = h1.backend_channel();
    let data = pattern(3, 8192);
    assert_eq!(h1.write(0, 8, &data), S_OK);
    let r = h1.read(0, 8, 8192);
    assert_eq!((r.status, r.data == data), (S_OK, true));

    // Resize: GET_CONFIG shows the new capacity, the backend channel
    // carries CONFIG_CHANGE_MSG, the new area takes I/O.
    let (code, r) = d.ctl_json(&["resize", "d1", "8M"]);
    assert_eq!(
        (code, r["capacity_bytes"].as_u64()),
        (0, Some(8 << 20)),
        "{r}"
    );
    assert_eq!(h1.config_capacity(), (8 << 20) / 512);
    let f = vcdev::wire::read_frame(&channel, vcdev::wire::FlagPolicy::VHOST_USER)
        .expect("a backend-channel frame")
        .expect("the backend channel is open");
    assert_eq!(
        f.header.request,
        vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG as u32
    );
    assert_eq!(h1.write(0, (8 << 20) / 512 - 8, &data[..4096]), S_OK);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 << 20);

    // Held: refused, exit 1, EBUSY, the holder named.
    let (code, e) = d.ctl_json(&["remove", "d1"]);
    assert_eq!(code, 1, "{e}");
    assert_eq!(e["errno"], libc::EBUSY);
    assert!(e["error"].as_str().unwrap().contains("d1#0"), "{e}");
    let (ok, text) = d.ctl(&["list"]);
    assert!(ok && text.contains("d1\t"), "{text}");

    // --force: the frontend goes, the device goes, its data is on disk.
    let (code, r) = d.ctl_json(&["remove", "d1", "--force"]);
    assert_eq!(code, 0, "{r}");
    assert!(
        r["disconnected"].as_str().unwrap().starts_with("d1#0"),
        "{r}"
    );
    assert!(!sock.exists() && !d.path("devices/d1").exists());
    let (_, list) = d.ctl_json(&["list"]);
    assert_eq!(names(&list), ["d0"]);
    let on_disk = std::fs::read(&img).unwrap();
    assert!(on_disk[4096..4096 + 8192] == data[..], "data not flushed");
    assert!(d.log_with("d1#0").contains("d1#0"), "no disconnect logged");
    drop(h1);

    // The other device never noticed.
    let r = h0.read(0, 0, 4096);
    assert_eq!((r.status, r.data == pattern(9, 4096)), (S_OK, true));
    assert!(d.alive());
    // Removed: a second removal is ENOENT.
    let (code, e) = d.ctl_json(&["remove", "d1"]);
    assert_eq!((code, e["errno"].as_i64()), (1, Some(libc::ENOENT.into())));
}

/// A bad SPEC (exit 2), a duplicate name and a missing image (exit 1):
/// each a clear error in JSON, and nothing changes.
#[test]
fn bad_spec_duplicate_name_and_missing_image_change_nothing() {
    let d = Vcdev::builder("ops-bad")
        .device("blk,name=d0,ram=1M")
        .spawn();
    let (_, before) = d.ctl_json(&["list"]);
    for (spec, code, errno) in [
        ("blk,foo=1", 2, libc::EINVAL),
        ("net,name=x", 2, libc::EINVAL),
        ("blk,ram=100", 2, libc::EINVAL),
        ("blk,name=d0,ram=1M", 1, libc::EEXIST),
        ("blk,name=x,path=/nonexistent/vcdev.img", 1, libc::EIO),
    ] {
        let (c, e) = d.ctl_json(&["add", spec]);
        assert_eq!(c, code, "{spec}: {e}");
        assert_eq!(e["errno"], errno, "{spec}: {e}");
        assert!(!e["error"].as_str().unwrap().is_empty(), "{e}");
    }
    // Usage errors of the command line itself are JSON too.
    let (c, e) = d.ctl_json(&["frobnicate"]);
    assert_eq!((c, e["errno"].as_i64()), (2, Some(libc::EINVAL.into())));
    let (_, after) = d.ctl_json(&["list"]);
    assert_eq!(before, after);
    assert!(!d.socket("x").exists());
    assert!(
        !d.path("state.json").exists(),
        "a failed add wrote the state"
    );
    // No daemon: exit 1.
    let gone = TempDir::new("ops-nodaemon").unwrap();
    let (c, e) = common::vcdev::ctl_json(gone.path(), &["list"]);
    assert_eq!(c, 1, "{e}");
}

/// `ctl set` changes the limits live, refuses what cannot change live,
/// and the limits come back after a restart.
#[test]
fn set_limits_live_and_after_a_restart() {
    let mut d = Vcdev::builder("ops-set")
        .device("blk,name=d0,ram=1M")
        .spawn();
    assert_eq!(d.ctl_json(&["add", "blk,name=a,ram=1M"]).0, 0);
    let (c, v) = d.ctl_json(&["set", "a", "iops=500", "bw=2M"]);
    assert_eq!(
        (c, v["iops"].as_u64(), v["bw"].as_u64()),
        (0, Some(500), Some(2 << 20)),
        "{v}"
    );
    let (c, v) = d.ctl_json(&["set", "d0", "iops=300"]);
    assert_eq!((c, v["bw"].as_u64()), (0, Some(0)), "{v}");
    for bad in ["ram=2M", "iops=x", "queues=2"] {
        let (c, e) = d.ctl_json(&["set", "a", bad]);
        assert_eq!(
            (c, e["errno"].as_i64()),
            (2, Some(libc::EINVAL.into())),
            "{bad}: {e}"
        );
    }
    let (c, _) = d.ctl_json(&["set", "nope", "iops=1"]);
    assert_eq!(c, 1);
    d.restart();
    let (_, list) = d.ctl_json(&["list"]);
    let by = |n: &str| {
        list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        (by("a")["iops"].as_u64(), by("a")["bw"].as_u64()),
        (Some(500), Some(2 << 20))
    );
    assert_eq!(by("d0")["iops"].as_u64(), Some(300));
}

/// An image another process holds writable: `ctl add` is refused with
/// EBUSY (exit 1), saying it is locked, and nothing changes.
#[test]
fn add_of_a_locked_image_is_refused() {
    let imgs = TempDir::new("ops-locked").unwrap();
    let img = image(&imgs, "l.img", 1 << 20);
    let spec = format!("blk,name=l,path={}", img.display());
    let holder = Vcdev::builder("ops-locked-a").device(&spec).spawn();
    let d = Vcdev::builder("ops-locked-b")
        .device("blk,name=d0,ram=1M")
        .spawn();
    let (c, e) = d.ctl_json(&["add", &spec]);
    assert_eq!(
        (c, e["errno"].as_i64()),
        (1, Some(libc::EBUSY.into())),
        "{e}"
    );
    assert!(e["error"].as_str().unwrap().contains("locked"), "{e}");
    let (_, list) = d.ctl_json(&["list"]);
    assert_eq!(names(&list), ["d0"]);
    drop(holder);
}

/// Devices added at run time come back after a restart; removed ones do
/// not; a `--device` with the name of a state-file device is an error.
#[test]
fn state_file_survives_a_restart() {
    let imgs = TempDir::new("ops-state").unwrap();
    let img = image(&imgs, "a.img", 1 << 20);
    let mut d = Vcdev::builder("ops-state")
        .device("blk,name=cl,ram=1M")
        .spawn();
    let spec = format!("blk,name=a,path={}", img.display());
    assert_eq!(d.ctl_json(&["add", &spec]).0, 0);
    assert_eq!(d.ctl_json(&["add", "blk,name=b,ram=2M"]).0, 0);
    // Without name=: the lowest free vfioN.
    let (c, v) = d.ctl_json(&["add", "blk,ram=1M"]);
    assert_eq!((c, v["name"].as_str()), (0, Some("vfio0")));
    assert_eq!(d.ctl_json(&["remove", "b"]).0, 0);
    let (_, before) = d.ctl_json(&["list"]);
    assert_eq!(names(&before), ["cl", "a", "vfio0"]);

    d.restart();
    let (_, after) = d.ctl_json(&["list"]);
    assert_eq!(names(&after), ["cl", "a", "vfio0"]);
    assert_eq!(after["devices"][1]["origin"], "added");
    assert_eq!(after["devices"][0]["origin"], "command-line");
    let mut h = Harness::start(&d.socket("a"), 1, 64);
    assert_eq!(h.write(0, 0, &pattern(1, 512)), S_OK);
    drop(h);

    // A clash with the state file: exit 2, a clear message.
    let out = common::vcdev::serve_once(d.dir(), &["--device", "blk,name=a,ram=1M"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state.json") && err.contains("\"a\""), "{err}");
}

/// Devices come and go while another device does I/O: every request of
/// the steady device completes, each within 1 s.
#[test]
fn concurrent_adds_and_removes_while_another_device_does_io() {
    let d = Vcdev::builder("ops-churn")
        .device("blk,name=d0,ram=4M")
        .spawn();
    let mut h = Harness::start(&d.socket("d0"), 1, 64);
    let stop = Arc::new(AtomicBool::new(false));
    let dir = d.dir().to_path_buf();
    let churn: Vec<_> = (0..2)
        .map(|t| {
            let dir = dir.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(Ordering::Relaxed) || rounds < 3 {
                    for i in 0..3 {
                        let name = format!("t{t}x{i}");
                        let spec = format!("blk,name={name},ram=1M");
                        let (c, v) = common::vcdev::ctl_json(&dir, &["add", &spec]);
                        assert_eq!(c, 0, "{v}");
                        // A frontend on the fresh device, now and then.
                        if i == 0 {
                            let s = Path::new(&dir).join("vhost-user").join(&name);
                            let mut h = Harness::start(&s, 1, 16);
                            assert_eq!(h.write(0, 0, &pattern(i as u8, 512)), S_OK);
                        }
                    }
                    for i in 0..3 {
                        let name = format!("t{t}x{i}");
                        let (c, v) = common::vcdev::ctl_json(&dir, &["remove", &name, "--force"]);
                        assert_eq!(c, 0, "{v}");
                    }
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        let data = pattern((n % 251) as u8, 4096);
        assert_eq!(h.write(0, n % 64 * 8, &data), S_OK);
        let r = h.read(0, n % 64 * 8, 4096);
        assert_eq!((r.status, r.data == data), (S_OK, true));
        worst = worst.max(t.elapsed());
        n += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let rounds: Vec<usize> = churn.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("{n} write+read pairs, worst {worst:?}; churn rounds {rounds:?}");
    assert!(worst < Duration::from_secs(1), "worst {worst:?}");
    let (_, list) = d.ctl_json(&["list"]);
    assert_eq!(names(&list), ["d0"]);
}

/// 1,000 back-to-back connect / handshake / I/O / close cycles on one
/// device: every one is served (a frontend whose predecessor hung up
/// waits for its teardown instead of being refused).
#[test]
fn thousand_back_to_back_reconnects_are_all_served() {
    let mut d = Vcdev::builder("ops-reconnect")
        .device("blk,name=d0,ram=1M")
        .log_level("info")
        .spawn();
    let sock = d.socket("d0");
    let start = Instant::now();
    for i in 0..1000u32 {
        let started = std::panic::catch_unwind(|| Harness::start(&sock, 1, 16));
        let Ok(mut h) = started else {
            panic!("cycle {i}: not served; daemon log:\n{}", d.log());
        };
        let data = pattern((i % 251) as u8, 512);
        assert_eq!(h.write(0, u64::from(i % 64), &data), S_OK, "cycle {i}");
        let r = h.read(0, u64::from(i % 64), 512);
        assert_eq!((r.status, r.data == data), (S_OK, true), "cycle {i}");
    }
    eprintln!("1000 cycles in {:?}", start.elapsed());
    let log = d.log();
    assert!(!log.contains("frontend refused"), "{log}");
}

/// Idle devices cost no thread: 256 devices, 8 threads at most.
#[test]
fn idle_devices_cost_no_thread() {
    let mut b = Vcdev::builder("ops-idle").log_level("warn");
    for i in 0..256 {
        b = b.device(&format!("blk,name=i{i},ram=64K"));
    }
    let mut d = b.spawn();
    let pid = d.daemon.proc().pid();
    let n = threads(pid);
    eprintln!("256 idle devices: {n} threads");
    assert!(n <= 8, "{n} threads");
    // A connected frontend with a backend channel, as QEMU sets one: its
    // queue worker and connection thread; without a vIOMMU no miss is
    // sent, so no ack reader runs.
    let mut h = Harness::start(&d.socket("i7"), 1, 16);
    let _channel = h.backend_channel();
    assert_eq!(h.write(0, 0, &pattern(7, 4096)), S_OK);
    let busy = threads(pid);
    assert!(busy <= n + 2, "{busy} threads with one frontend (idle {n})");
    // A frontend behind its IOMMU, whose requests miss: the acks of its
    // misses are read on the event loop, not by a thread of their own.
    let mut v = Harness::start_iotlb(&d.socket("i8"), 1, 16);
    assert_eq!(v.write(0, 0, &pattern(8, 4096)), S_OK);
    assert!(!v.iommu().misses().is_empty(), "no miss was sent");
    let both = threads(pid);
    assert!(
        both <= busy + 2,
        "{both} threads with a vIOMMU frontend too ({busy} before it)"
    );
    drop((h, v));
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// An idle device costs at most 64 KiB of resident memory: the daemon's
/// VmRSS with 256 devices, less its VmRSS with one, over 255 (both
/// daemons run side by side, the same binary).
#[test]
fn idle_devices_cost_at_most_64k_resident_each() {
    let serve = |n: usize| {
        let mut b = Vcdev::builder("ops-rss").log_level("warn");
        for i in 0..n {
            b = b.device(&format!("blk,name=i{i},ram=1M"));
        }
        b.spawn()
    };
    let mut one = serve(1);
    let mut all = serve(256);
    let r1 = rss_kib(one.daemon.proc().pid());
    let r256 = rss_kib(all.daemon.proc().pid());
    let per = r256.saturating_sub(r1) as f64 / 255.0;
    eprintln!("VmRSS: 1 device {r1} KiB, 256 devices {r256} KiB: {per:.1} KiB per device");
    assert!(per <= 64.0, "{per:.1} KiB per idle device");
}
