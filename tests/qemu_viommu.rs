//! Linux guests with a vIOMMU on `vhost-user-blk-pci` served by a real
//! `vcdev serve` (TCG unless KVM really works): intel-iommu (ATS, device
//! IOTLB, interrupt remapping) and virtio-iommu, each with the guest's
//! IOMMU in strict (`iommu.strict=1`), lazy (`iommu.strict=0`) and
//! passthrough (`iommu=pt`) mode. The guest writes a pattern with O_DIRECT,
//! drops caches and reads it back; its md5 must equal the expected
//! pattern's and the host backing file's, and vcdev's counters (logged at
//! exit) must show IOTLB traffic.
//!
//! The six boots run one after the other in one test so that TCG guests do
//! not fight for the CPUs. `VCDEV_VIOMMU_ONLY=intel-iommu:strict` (a
//! comma-separated list) runs a subset. `VCDEV_VIOMMU_LOGDIR=DIR` keeps
//! vcdev's debug log of each boot in `DIR/CONFIG-MODE-PID.log`.
//!
//! Skips with a message without QEMU 10 and the guest image
//! (`sudo .ci/install-qemu.sh`); `VCDEV_REQUIRE_QEMU=1` makes it fail.

mod common;

use std::time::Duration;

use common::qemu::{self, Guest};
use common::vcdev::Vcdev;
use common::TempDir;

/// MiB written and read back by each guest.
const MIB: u32 = 4;

/// The guest IOMMU modes, as kernel command-line words.
const MODES: [(&str, &str); 3] = [
    ("strict", "iommu.strict=1"),
    ("lazy", "iommu.strict=0"),
    ("passthrough", "iommu=pt"),
];

/// One boot: returns the counters and a line for the summary.
fn boot(guest: &Guest, config: &str, mode: &str, append: &str) -> String {
    let tmp = TempDir::new("qv-img").expect("tmpdir");
    let image = tmp.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image");
    // QEMU's vhost-user-blk queue-size default (128) must match the
    // device's, as seg_max is derived from it.
    let spec = format!("blk,path={},queues=1,queue-size=128", image.display());
    let mut d = Vcdev::start("qemu-viommu", &["--device", &spec], "vfio0");
    let seed = format!("{}{}", &mode[..1], std::process::id());
    let run = guest
        .boot(config)
        .socket(&d.socket("vfio0"))
        .append(append)
        .dd(MIB, &seed)
        .run()
        .expect("spawn qemu");
    let what = format!("{config} {mode}");
    if let Some(dir) = std::env::var_os("VCDEV_VIOMMU_LOGDIR") {
        let path =
            std::path::Path::new(&dir).join(format!("{config}-{mode}-{}.log", std::process::id()));
        if let Err(e) = std::fs::write(&path, d.log()) {
            eprintln!("cannot keep the vcdev log in {}: {e}", path.display());
        }
    }
    assert!(
        run.report.ok(),
        "{what}\n{}\n--- vcdev log\n{}",
        run.diagnostics(),
        d.log()
    );
    let (report, expected) = qemu::expect_dd_readback(&run, &what, &seed, MIB);
    let iommu_type = report
        .find("dev", "vda")
        .and_then(|m| m.get("iommu_type"))
        .cloned()
        .unwrap_or_default();
    let out = d.daemon.stop(Duration::from_secs(10)).expect("stop vcdev");
    assert!(
        out.status.success(),
        "{what}: vcdev exit {:?}\n{}",
        out.status,
        out.stderr
    );
    qemu::assert_dd_on_disk(&image, MIB, &expected, &what);
    let c = common::vcdev::exit_counters(&out.stderr, "vfio0");
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    // Every address went through the IOTLB: misses were sent and answered.
    assert!(
        get("iotlb_misses") > 0,
        "{what}: no IOTLB miss\n{}",
        out.stderr
    );
    assert!(get("iotlb_updates") >= get("iotlb_misses") - get("iotlb_misses_refused"));
    assert_eq!(get("iotlb_misses_timed_out"), 0, "{what}\n{}", out.stderr);
    if mode == "strict" {
        // Strict mode unmaps (and so invalidates) after every request.
        assert!(get("iotlb_invalidates") > 0, "{what}\n{}", out.stderr);
    }
    format!(
        "{what:<26} {iommu_type:<8} qemu {:>6.2?}  {}  translations={} cache_hits={} \
         misses={} joined={} refused={} updates={} invalidates={} flushes={} ring_pins={} \
         miss_wait_us={} max_us={}",
        run.elapsed,
        qemu::dd_timings(report),
        get("translations"),
        get("cache_hits"),
        get("iotlb_misses"),
        get("iotlb_misses_joined"),
        get("iotlb_misses_refused"),
        get("iotlb_updates"),
        get("iotlb_invalidates"),
        get("iotlb_flushes"),
        get("ring_pins"),
        get("iotlb_miss_wait_us"),
        get("iotlb_miss_wait_max_us"),
    )
}

#[test]
fn viommu_guests_dd_md5_matches_in_strict_lazy_and_passthrough_modes() {
    let Some(guest) = qemu::require() else { return };
    let only = std::env::var("VCDEV_VIOMMU_ONLY").unwrap_or_default();
    let mut summary = Vec::new();
    for config in ["intel-iommu", "virtio-iommu"] {
        for (mode, append) in MODES {
            let name = format!("{config}:{mode}");
            if !only.is_empty() && !only.split(',').any(|o| o == name) {
                continue;
            }
            summary.push(boot(&guest, config, mode, append));
        }
    }
    eprintln!(
        "vIOMMU guests ({}, accel {}), dd {MIB} MiB:\n{}",
        guest.qemu_version,
        guest.accel,
        summary.join("\n")
    );
    assert!(
        !summary.is_empty(),
        "VCDEV_VIOMMU_ONLY={only:?} matched nothing"
    );
}
