//! A Linux guest (TCG unless KVM really works) with `vhost-user-blk-pci`
//! attached to a real `vcdev serve`: the guest writes a pattern with
//! O_DIRECT, drops caches and reads it back; its md5 must equal the
//! expected pattern's and the host backing file's.
//!
//! Skips with a message without QEMU 10 and the guest image
//! (`sudo .ci/install-qemu.sh`); `VCDEV_REQUIRE_QEMU=1` makes it fail.

mod common;

use std::time::Duration;

use common::frontend::Vcdev;
use common::qemu;
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
        .test("dd")
        .param("mb", mib)
        .param("seed", &seed)
        .run()
        .expect("spawn qemu");
    assert!(
        run.report.ok(),
        "{}\n--- vcdev log\n{}",
        run.diagnostics(),
        d.log()
    );
    let report = run.expect_ok();
    eprintln!(
        "vcdev no-viommu dd {mib} MiB: qemu wall {:.2?}, write {}s read {}s ({}, accel {})",
        run.elapsed,
        report.get("write_s").unwrap_or("?"),
        report.get("read_s").unwrap_or("?"),
        guest.qemu_version,
        guest.accel
    );
    let expected = qemu::dd_pattern_md5(&seed, mib).expect("pattern md5");
    assert_eq!(
        report.get("md5"),
        Some(expected.as_str()),
        "guest read-back\n{}",
        run.diagnostics()
    );
    // SIGTERM flushes the disk and exits 0.
    let out = d.daemon.stop(Duration::from_secs(10)).expect("stop vcdev");
    assert!(
        out.status.success(),
        "vcdev exit {:?}\n{}",
        out.status,
        out.stderr
    );
    assert!(out.stderr.contains("frontend connected"), "{}", out.stderr);
    let host = qemu::file_region_md5(&image, 0, u64::from(mib) << 20).expect("host md5");
    assert_eq!(host, expected, "host backing file");
}
