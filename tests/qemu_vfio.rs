//! QEMU's own, unmodified `vfio-pci` (iommufd backend, pre-opened
//! descriptors) drives a vcdev device through the cdev door (issue #14):
//! `vcdev qemu-exec` opens `DIR/iommu` and `DIR/devices/vfio0`, hands both
//! to QEMU and preloads `libvcdev_vfio.so`, which turns QEMU's ioctls,
//! preads and pwrites on them into cdev frames (TCG unless KVM really
//! works).
//!
//! - The guest sees a virtio-blk PCI function, writes the dd pattern with
//!   O_DIRECT and reads it back; the md5s agree in the guest, in the
//!   backing file and, afterwards, through vhost-user.
//! - The same behind intel-iommu (caching mode, guest strict): QEMU maps
//!   and unmaps each buffer's IOVAs with IOMMU_IOAS_MAP/UNMAP; the map and
//!   unmap counts and rates come from `vcdev ctl stats`.
//! - Exclusivity both ways, and a killed QEMU releases the device.
//!
//! `VCDEV_VFIO_MIB=N` sets the MiB each guest writes (default 16; the
//! BENCHMARKS.md figures use 64). Skips with a message without QEMU 10 and
//! the guest image (`sudo .ci/install-qemu.sh`); `VCDEV_REQUIRE_QEMU=1`
//! makes it fail.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::frontend::Harness;
use common::qemu::{self, Guest, GuestReport};
use common::vcdev::{preload_lib, vcdev_bin, Vcdev};
use common::{poll_until, TempDir, TIMEOUT};
use vcdev::cdev::client::File;

/// MiB written and read back by each guest (`VCDEV_VFIO_MIB`).
fn mib() -> u32 {
    std::env::var("VCDEV_VFIO_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16)
}

/// A daemon with one file-backed device, vfio0, on a fresh image.
fn daemon(tag: &str, tmp: &TempDir) -> (Vcdev, std::path::PathBuf) {
    let image = tmp.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(u64::from(mib().max(16) + 16) << 20))
        .expect("image");
    let spec = format!("blk,path={},queues=1", image.display());
    (Vcdev::start(tag, &["--device", &spec], "vfio0"), image)
}

/// `vcdev qemu-exec --dir DIR --preload LIB [--props P] vfio0 --`.
fn launcher(d: &Vcdev, props: Option<&str>) -> Vec<String> {
    let mut v = vec![
        vcdev_bin().display().to_string(),
        "qemu-exec".to_owned(),
        "--dir".to_owned(),
        d.dir().display().to_string(),
        "--preload".to_owned(),
        preload_lib().display().to_string(),
    ];
    if let Some(p) = props {
        v.push("--props".to_owned());
        v.push(p.to_owned());
    }
    v.push("vfio0".to_owned());
    v.push("--".to_owned());
    v
}

/// Whether the device is bound through its cdev (`ctl list`).
fn bound(d: &Vcdev) -> bool {
    let (_, v) = d.ctl_json(&["list"]);
    !v["devices"][0]["cdev"]["bound_as"].is_null()
}

/// Whether the device has no owner (`ctl list`).
fn free(d: &Vcdev) -> bool {
    let (_, v) = d.ctl_json(&["list"]);
    v["devices"][0]["owner"].is_null()
}

/// Whether a vhost-user connection to `path` is refused (closed by the
/// daemon; a served one would wait for the frontend's first message).
fn vhost_user_refused(path: &Path) -> bool {
    let mut s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
}

/// Reads the first `mib` MiB of vfio0 through vhost-user and returns
/// their md5, once the cdev release has finished.
fn md5_through_vhost_user(d: &Vcdev, mib: u32) -> String {
    let sock = d.socket("vfio0");
    poll_until(TIMEOUT, || free(d).then_some(()))
        .expect("the device still has an owner after QEMU exited");
    let mut h = Harness::start(&sock, 1, 256);
    const CHUNK: u32 = 256 << 10;
    let total = u64::from(mib) << 20;
    let mut data = Vec::with_capacity(usize::try_from(total).unwrap());
    while (data.len() as u64) < total {
        let r = h.read(0, data.len() as u64 / 512, CHUNK);
        assert_eq!(r.status, 0, "vhost-user read at {}", data.len());
        data.extend_from_slice(&r.data[..CHUNK as usize]);
    }
    qemu::md5_hex(&data).expect("md5")
}

/// The dd seconds the guest reported.
fn secs(report: &GuestReport, key: &str) -> f64 {
    report
        .get(key)
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// One dd boot through vfio-pci; checks the guest's and the file's md5s
/// and returns the report's dd times and the ioas counters.
fn dd_boot(guest: &Guest, config: &str, props: Option<&str>, append: &str) -> String {
    let mib = mib();
    let tmp = TempDir::new("qvfio-img").expect("tmpdir");
    let (mut d, image) = daemon("qemu-vfio", &tmp);
    let seed = format!("f{}", std::process::id());
    let run = guest
        .boot(config)
        .launcher(launcher(&d, props))
        .append(append)
        .dd(mib, &seed)
        .run()
        .expect("spawn qemu-exec");
    let what = format!("vfio-pci {config} {append}");
    assert!(
        run.report.ok(),
        "{what}\n{}\n--- vcdev log\n{}",
        run.diagnostics(),
        d.log()
    );
    let (report, expected) = qemu::expect_dd_readback(&run, &what, &seed, mib);
    let dev = report.find("dev", "vda").expect("dev report");
    qemu::assert_dd_on_disk(&image, mib, &expected, &what);
    let maps = d.counter("vfio0", "ioas_maps");
    let unmaps = d.counter("vfio0", "ioas_unmaps");
    let unmap_us = d.counter("vfio0", "ioas_unmap_us");
    let unmap_max = d.counter("vfio0", "ioas_unmap_max_us");
    assert!(maps > 0, "{what}: QEMU mapped no guest memory");
    assert!(
        d.counter("vfio0", "cdev_batches") > 0,
        "{what}: no queue work"
    );
    // After QEMU: the device is free again, and vhost-user reads the same.
    assert_eq!(
        md5_through_vhost_user(&d, mib),
        expected,
        "{what}: vhost-user"
    );
    let (w, r) = (secs(report, "write_s"), secs(report, "read_s"));
    let mb = f64::from(mib);
    let iommu = dev.get("iommu_type").map_or("none", String::as_str);
    format!(
        "{what}: iommu_type={iommu} dd {mib} MiB write {w:.2}s ({:.1} MB/s) read {r:.2}s \
         ({:.1} MB/s); ioas_maps={maps} ioas_unmaps={unmaps} ({:.0} maps/s, {:.0} unmaps/s over \
         the dd), unmap avg {:.1} us max {unmap_max} us; qemu {:.2?}",
        mb / w,
        mb / r,
        maps as f64 / (w + r),
        unmaps as f64 / (w + r),
        unmap_us as f64 / unmaps.max(1) as f64,
        run.elapsed,
    )
}

/// One guest of this file at a time: each is a two-vCPU TCG guest whose
/// QEMU maps and unmaps through the cdev door, and three at once on a
/// loaded 2-core machine starved a vCPU long enough for RCU stalls and the
/// 120 s deadline.
fn one_guest() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn vfio_pci_guest_dd() {
    let Some(guest) = qemu::require() else { return };
    let _one = one_guest();
    let line = dd_boot(&guest, "vfio-pci", None, "");
    eprintln!("{line}");
}

#[test]
fn vfio_pci_behind_intel_iommu_strict() {
    let Some(guest) = qemu::require() else { return };
    let _one = one_guest();
    let line = dd_boot(
        &guest,
        "vfio-pci-intel-iommu",
        Some("bus=rp0"),
        "iommu.strict=1",
    );
    eprintln!("{line}");
    // Strict mode: the guest's driver maps and unmaps every buffer, and
    // QEMU follows each with IOAS_MAP/UNMAP.
    let n = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(line.contains("iommu_type=DMA"), "{line}");
    assert!(n("ioas_maps") > 1000, "{line}");
    assert!(n("ioas_unmaps") > 1000, "{line}");
}

/// A vhost-user frontend holds the device: QEMU's BIND gets EBUSY and
/// QEMU exits. Then QEMU holds it: a vhost-user frontend is refused.
/// Killing QEMU releases the device: a new client binds it.
#[test]
fn vfio_pci_exclusivity_and_release_on_kill() {
    let Some(guest) = qemu::require() else { return };
    let _one = one_guest();
    let tmp = TempDir::new("qvfio-excl").expect("tmpdir");
    let (mut d, _image) = daemon("qemu-vfio-excl", &tmp);

    // vhost-user first: QEMU is refused.
    let vu = Harness::connect(&d.socket("vfio0"));
    let run = guest
        .boot("vfio-pci")
        .launcher(launcher(&d, None))
        .timeout(Duration::from_secs(60))
        .run()
        .expect("spawn qemu-exec");
    assert!(
        !run.finished.status.success(),
        "QEMU started while vhost-user held the device\n{}",
        run.diagnostics()
    );
    assert!(
        run.qemu_stderr().contains("error bind device")
            && run.qemu_stderr().contains("Device or resource busy"),
        "QEMU's BIND must fail with EBUSY\n{}",
        run.diagnostics()
    );
    drop(vu);

    // QEMU first (its guest waits for a disk that never comes): a
    // vhost-user frontend is refused.
    let mut running = guest
        .boot("vfio-pci")
        .launcher(launcher(&d, None))
        .param("dev", "vdz")
        .param("wait", 600)
        .test("dd")
        .spawn()
        .expect("spawn qemu-exec");
    let t0 = Instant::now();
    let held = poll_until(Duration::from_secs(60), || {
        if bound(&d) {
            Some(true)
        } else if !running.alive() {
            Some(false)
        } else {
            None
        }
    });
    assert_eq!(
        held,
        Some(true),
        "QEMU never bound the device\n{}\n--- vcdev log\n{}",
        running.qemu_stderr(),
        d.log()
    );
    assert!(
        vhost_user_refused(&d.socket("vfio0")),
        "a vhost-user frontend was served while QEMU held the device"
    );
    assert!(running.alive(), "QEMU died\n{}", running.qemu_stderr());

    // SIGKILL: the kernel closes QEMU's descriptors, the door releases.
    running.signal(libc::SIGKILL).expect("kill qemu");
    let bound_again = poll_until(TIMEOUT, || {
        let iommufd = File::open(&d.path("iommu")).ok()?;
        let dev = File::open(&d.path("devices/vfio0")).ok()?;
        dev.bind_iommufd(&iommufd).ok()
    });
    assert!(
        bound_again.is_some(),
        "the device was not released after QEMU was killed\n{}",
        d.log()
    );
    eprintln!(
        "exclusivity: EBUSY for QEMU under vhost-user, vhost-user refused under QEMU, \
         rebound {:.2?} after QEMU started",
        t0.elapsed()
    );
    let _ = running.wait();
}

/// One configuration of the benchmark.
struct BenchCase {
    name: &'static str,
    config: &'static str,
    /// `Some(props)`: vfio-pci through `vcdev qemu-exec`; `None`: the
    /// topology's vhost-user-blk disk.
    vfio: Option<&'static str>,
    append: &'static str,
}

const BENCH: [BenchCase; 4] = [
    BenchCase {
        name: "vhost-user-blk, no vIOMMU",
        config: "no-viommu",
        vfio: None,
        append: "",
    },
    BenchCase {
        name: "vfio-pci (cdev door), no vIOMMU",
        config: "vfio-pci",
        vfio: Some(""),
        append: "",
    },
    BenchCase {
        name: "vhost-user-blk, intel-iommu strict",
        config: "intel-iommu",
        vfio: None,
        append: "iommu.strict=1",
    },
    BenchCase {
        name: "vfio-pci (cdev door), intel-iommu strict",
        config: "vfio-pci-intel-iommu",
        vfio: Some("bus=rp0"),
        append: "iommu.strict=1",
    },
];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The guest-visible dd throughput of the vfio-pci path beside
/// vhost-user, with and without intel-iommu (strict), and the IOAS
/// map/unmap rate QEMU drives through the door (BENCHMARKS.md, issue
/// #14). `VCDEV_VFIO_MIB` (64 for the figures), `VCDEV_VFIO_BENCH_RUNS`
/// (3); configurations interleaved; medians. Under TCG: functional
/// figures. Run with release daemons: `VCDEV_BIN=.../release/vcdev
/// VCDEV_PRELOAD=.../release/libvcdev_vfio.so`.
#[test]
#[ignore = "benchmark: run by hand (BENCHMARKS.md)"]
fn bench_vfio_pci_beside_vhost_user() {
    let Some(guest) = qemu::require() else { return };
    let mib = mib();
    let runs: usize = std::env::var("VCDEV_VFIO_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // Per case: write MB/s, read MB/s, maps/s, unmaps/s, unmap us, IOTLB
    // messages/s.
    let mut rows: Vec<[Vec<f64>; 6]> = BENCH.iter().map(|_| Default::default()).collect();
    for run in 0..runs {
        for (i, case) in BENCH.iter().enumerate() {
            let tmp = TempDir::new("qvfio-bench").expect("tmpdir");
            let image = tmp.join("disk.img");
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(u64::from(mib + 16) << 20))
                .expect("image");
            // QEMU's vhost-user-blk default queue-size (128) for both.
            let spec = format!("blk,path={},queues=1,queue-size=128", image.display());
            let mut d = Vcdev::start("qemu-vfio-bench", &["--device", &spec], "vfio0");
            let seed = format!("b{run}x{i}");
            let mut boot = guest.boot(case.config).append(case.append).dd(mib, &seed);
            boot = match case.vfio {
                Some(props) => boot.launcher(launcher(&d, (!props.is_empty()).then_some(props))),
                None => boot.socket(&d.socket("vfio0")),
            };
            let r = boot.run().expect("spawn");
            assert!(
                r.report.ok(),
                "{}\n{}\n{}",
                case.name,
                r.diagnostics(),
                d.log()
            );
            let (report, _) = qemu::expect_dd_readback(&r, case.name, &seed, mib);
            let (w, rd) = (secs(report, "write_s"), secs(report, "read_s"));
            let s = |k: &str| d.counter("vfio0", k) as f64;
            let dd = w + rd;
            let row = &mut rows[i];
            row[0].push(f64::from(mib) / w);
            row[1].push(f64::from(mib) / rd);
            row[2].push(s("ioas_maps") / dd);
            row[3].push(s("ioas_unmaps") / dd);
            row[4].push(s("ioas_unmap_us") / s("ioas_unmaps").max(1.0));
            row[5].push((s("iotlb_misses") + s("iotlb_invalidates")) / dd);
            eprintln!(
                "run {run} {}: write {w:.2}s read {rd:.2}s maps {} unmaps {} misses {} invalidates {}",
                case.name,
                s("ioas_maps"),
                s("ioas_unmaps"),
                s("iotlb_misses"),
                s("iotlb_invalidates"),
            );
        }
    }
    eprintln!(
        "| configuration | write MB/s | read MB/s | IOAS maps/s | IOAS unmaps/s | unmap us (avg) | IOTLB miss+inval/s |"
    );
    eprintln!("|---|---|---|---|---|---|---|");
    for (case, row) in BENCH.iter().zip(rows.iter_mut()) {
        let m: Vec<f64> = row.iter_mut().map(|v| median(v)).collect();
        eprintln!(
            "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.0} |",
            case.name, m[0], m[1], m[2], m[3], m[4], m[5]
        );
    }
}
