//! Self-test of the QEMU guest harness (tests/common/qemu.rs,
//! qemu-configs/): the topology files, the report parser, the dd pattern,
//! and a real guest against qemu-storage-daemon's vhost-user-blk export.
//!
//! The guest tests skip (with a message) without QEMU 10 and the guest
//! image; `VCDEV_REQUIRE_QEMU=1` makes them fail instead. Setup:
//! `sudo .ci/install-qemu.sh`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::qemu::{self, GuestReport, QemuConfig};
use common::TempDir;

/// Placeholders every topology must use.
const REQUIRED: [&str; 9] = [
    "ACCEL", "CPU", "SMP", "MEM", "KERNEL", "INITRD", "APPEND", "SOCKET", "QUEUES",
];

#[test]
fn configs_are_well_formed() {
    let names = QemuConfig::names().expect("listing qemu-configs/");
    for want in ["no-viommu", "intel-iommu", "virtio-iommu"] {
        assert!(
            names.iter().any(|n| n == want),
            "qemu-configs/{want} missing (have {names:?})"
        );
    }
    for name in &names {
        let cfg = QemuConfig::load(name).expect("parse");
        assert!(
            cfg.description.contains("QEMU >= 10"),
            "{name}: header must name the QEMU version"
        );
        let ph = cfg.placeholders();
        // The vfio-pci topologies have no disk: `vcdev qemu-exec` adds it.
        let launched = name.starts_with("vfio-pci");
        for p in REQUIRED {
            if launched && (p == "SOCKET" || p == "QUEUES") {
                assert!(!ph.contains(p), "{name}: @{p}@ but no vhost-user disk");
                continue;
            }
            assert!(ph.contains(p), "{name}: no @{p}@");
        }
        assert!(
            cfg.values("-object")
                .any(|v| v.starts_with("memory-backend-memfd,") && v.contains("share=on")),
            "{name}: guest RAM must be memory-backend-memfd,share=on"
        );
        assert!(
            cfg.values("-machine")
                .any(|v| v.contains("memory-backend=mem")),
            "{name}: -machine memory-backend"
        );
        for flag in ["-nographic", "-no-reboot"] {
            assert!(
                cfg.entries().iter().any(|(o, _)| o == flag),
                "{name}: {flag} missing"
            );
        }
        let vhost: Vec<_> = cfg
            .values("-device")
            .filter(|d| d.starts_with("vhost-user-"))
            .collect();
        assert!(
            (launched && vhost.is_empty())
                || (!vhost.is_empty() && vhost.iter().all(|d| d.contains("num-queues="))),
            "{name}: num-queues"
        );

        // Every placeholder filled -> no '@' survives.
        let vars: BTreeMap<String, String> =
            ph.iter().map(|p| (p.clone(), "x".to_owned())).collect();
        let argv = cfg.args(&vars).expect("fill");
        assert!(
            argv.iter().all(|a| !a.contains('@')),
            "{name}: unfilled {argv:?}"
        );
        assert!(
            cfg.args(&BTreeMap::new()).is_err(),
            "{name}: missing values must be an error"
        );
    }
    let intel = QemuConfig::load("intel-iommu").expect("intel-iommu");
    assert!(intel
        .values("-device")
        .any(|d| d.contains("iommu_platform=on") && d.contains("ats=on")));
    assert!(intel
        .values("-machine")
        .any(|m| m.contains("kernel-irqchip=split")));
    let vio = QemuConfig::load("virtio-iommu").expect("virtio-iommu");
    assert!(vio.values("-device").any(|d| d == "virtio-iommu-pci"));
}

#[test]
fn config_parser_rejects_garbage() {
    assert!(QemuConfig::parse("t", "# only a comment\n").is_err());
    assert!(QemuConfig::parse("t", "-m 1G\nmachine q35\n").is_err());
    let c = QemuConfig::parse("t", "# hdr\n-append  a b @APPEND@ \n-nographic\n").expect("parse");
    let vars = BTreeMap::from([("APPEND".to_owned(), "c=1".to_owned())]);
    assert_eq!(
        c.args(&vars).expect("fill"),
        ["-append", "a b c=1", "-nographic"]
    );
}

/// `Boot::attach`: the topology's vhost-user disk gives way to the QEMU
/// options `vcdev ctl add` prints.
#[test]
fn config_disk_replaced_by_attach_options() {
    let cfg = QemuConfig::load("no-viommu").expect("no-viommu");
    let attach = "-chardev socket,id=d1,path=/tmp/a,,b/d1,reconnect-ms=1000 \
                  -device vhost-user-blk-pci,chardev=d1,num-queues=2,queue-size=256";
    let with = cfg.with_disk(attach).expect("with_disk");
    assert!(!with.placeholders().contains("SOCKET"));
    assert!(!with.placeholders().contains("QUEUES"));
    let vars: BTreeMap<String, String> = with
        .placeholders()
        .into_iter()
        .map(|p| (p, "x".to_owned()))
        .collect();
    let argv = with.args(&vars).expect("fill");
    let tail: Vec<&str> = argv[argv.len() - 4..].iter().map(String::as_str).collect();
    assert_eq!(
        tail,
        [
            "-chardev",
            "socket,id=d1,path=/tmp/a,,b/d1,reconnect-ms=1000",
            "-device",
            "vhost-user-blk-pci,chardev=d1,num-queues=2,queue-size=256"
        ]
    );
    assert_eq!(argv.iter().filter(|a| *a == "-chardev").count(), 1);
    assert!(cfg.with_disk("socket,id=x").is_err());
    assert!(cfg.with_disk("").is_err());
}

#[test]
fn report_parser() {
    let console = "\x1bc\x1b[?7l\x1b[2JVCDEV-BEGIN kernel=6.12.95 test=dd\r\n\
        [    1.0] random kernel line\n\
        VCDEV-WARN insmod x.ko: nope\n\
        VCDEV-RESULT dev=vda pci=0000:00:01.0 iommu_group=none\n\
        VCDEV-RESULT md5=0123 mb=16\r\n\
        VCDEV-END status=ok uptime=4.2\n";
    let r = GuestReport::parse(console);
    assert_eq!(r.kernel.as_deref(), Some("6.12.95"));
    assert_eq!(r.test.as_deref(), Some("dd"));
    assert_eq!(r.get("md5"), Some("0123"));
    assert_eq!(r.get("iommu_group"), Some("none"));
    assert_eq!(
        r.find("dev", "vda")
            .and_then(|m| m.get("pci"))
            .map(String::as_str),
        Some("0000:00:01.0")
    );
    assert_eq!(r.warnings, ["insmod x.ko: nope"]);
    assert!(r.ok());
    let failed =
        GuestReport::parse("VCDEV-BEGIN test=dd\nVCDEV-ERROR boom\nVCDEV-END status=fail\n");
    assert!(!failed.ok());
    assert_eq!(failed.errors, ["boom"]);
    assert!(
        !GuestReport::parse("VCDEV-BEGIN test=dd\n").ok(),
        "no END = not ok"
    );
}

#[test]
fn dd_pattern_matches_guest_spec() {
    let p = qemu::dd_pattern("abc", 1);
    assert_eq!(p.len(), 1 << 20);
    assert_eq!(&p[..20], b"vcdev:abc:0000000000");
    assert_eq!(&p[512..534], b"vcdev:abc:00000000001 ");
    assert_eq!(p[511], b'\n');
    // Computed independently with the guest's own awk generator.
    assert_eq!(
        qemu::dd_pattern_md5("abc", 16).expect("md5"),
        "c4d91255a83fdc0be5bf94a3957cf728"
    );
}

/// `newc_archive`: the layout of Linux's initramfs buffer format
/// (Documentation/driver-api/early-userspace/buffer-format.rst): a
/// 110-byte header of "070701" and 13 eight-digit hex fields, the name and
/// its NUL padded to 4, the data padded to 4, and the `TRAILER!!!` entry.
#[test]
fn newc_archive_layout() {
    use qemu::{newc_archive, ArchiveFile};
    let a = newc_archive(&[ArchiveFile {
        path: "bin/x",
        mode: 0o100_755,
        data: b"hello",
    }]);
    let field = |entry: usize, i: usize| {
        let at = entry + 6 + 8 * i;
        u32::from_str_radix(std::str::from_utf8(&a[at..at + 8]).unwrap(), 16).unwrap()
    };
    assert_eq!(&a[..6], b"070701");
    assert_eq!(field(0, 1), 0o100_755, "mode");
    assert_eq!(field(0, 6), 5, "filesize");
    assert_eq!(field(0, 11), 6, "namesize with the NUL");
    // Header 110 + name 6 = 116 (aligned), data 5 padded to 8.
    assert_eq!(&a[110..116], b"bin/x\0");
    assert_eq!(&a[116..121], b"hello");
    assert_eq!(&a[121..124], &[0, 0, 0]);
    let trailer = 124;
    assert_eq!(&a[trailer..trailer + 6], b"070701");
    assert_eq!(field(trailer, 11), 11);
    assert_eq!(&a[trailer + 110..trailer + 121], b"TRAILER!!!\0");
    assert_eq!(a.len() % 4, 0);
}

/// Boots the no-viommu topology against qemu-storage-daemon, writes a
/// pattern from the guest with O_DIRECT, and checks guest read-back, the
/// expected pattern and the host backing file all agree.
#[test]
fn no_viommu_dd_against_qemu_storage_daemon() {
    let Some(guest) = qemu::require() else { return };
    let Some(qsd) = qemu::require_tool("qemu-storage-daemon") else {
        return;
    };
    let tmp = TempDir::new("qh-blk").expect("tmpdir");
    let image = tmp.join("disk.img");
    let socket = tmp.join("vub.sock");
    let mib = 8;
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("image");
    let daemon = qemu::storage_daemon(&qsd, &image, &socket, 2).expect("qemu-storage-daemon");

    let seed = format!("h{}", std::process::id());
    let run = guest
        .boot("no-viommu")
        .socket(&socket)
        .queues(2)
        .dd(mib, &seed)
        .run()
        .expect("spawn qemu");
    let what = "qemu-storage-daemon no-viommu";
    let (report, expected) = qemu::expect_dd_readback(&run, what, &seed, mib);
    eprintln!("{}", qemu::dd_summary(what, mib, &run, &guest));
    qemu::assert_dd_on_disk(&image, mib, &expected, what);
    assert_eq!(
        report
            .find("dev", "vda")
            .and_then(|m| m.get("iommu_group"))
            .map(String::as_str),
        Some("none")
    );
    daemon.stop(Duration::from_secs(5)).expect("stop qsd");
}

/// QEMU accepts the vIOMMU topologies up to the backend: qemu-storage-daemon
/// does not offer VIRTIO_F_ACCESS_PLATFORM, so QEMU must refuse at device
/// realize with its iommu_platform message (the whole command line parsed).
#[test]
fn viommu_configs_reach_the_backend() {
    let Some(guest) = qemu::require() else { return };
    let Some(qsd) = qemu::require_tool("qemu-storage-daemon") else {
        return;
    };
    for config in ["intel-iommu", "virtio-iommu"] {
        let tmp = TempDir::new("qh-viommu").expect("tmpdir");
        let image = tmp.join("disk.img");
        let socket = tmp.join("vub.sock");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(1 << 20))
            .expect("image");
        let _daemon = qemu::storage_daemon(&qsd, &image, &socket, 1).expect("qemu-storage-daemon");
        let run = guest
            .boot(config)
            .socket(&socket)
            .timeout(Duration::from_secs(30))
            .run()
            .expect("spawn qemu");
        assert!(
            !run.finished.timed_out && !run.finished.status.success(),
            "{}",
            run.diagnostics()
        );
        assert!(
            run.qemu_stderr()
                .contains("iommu_platform=true is not supported by the device"),
            "expected the iommu_platform refusal\n{}",
            run.diagnostics()
        );
    }
}

#[test]
fn deadline_kills_the_process() {
    let p = common::process::Proc::spawn("sleep", std::process::Command::new("sleep").arg("30"))
        .expect("spawn");
    let t = std::time::Instant::now();
    let done = p.wait_timeout(Duration::from_millis(200)).expect("wait");
    assert!(done.timed_out && !done.status.success());
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn daemon_spawn_reports_failures() {
    let tmp = TempDir::new("qh-daemon").expect("tmpdir");
    let sock = tmp.join("never.sock");
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "echo dying >&2; exit 3"]);
    let err = common::process::Daemon::spawn("dies", &mut cmd, &sock, Duration::from_secs(10))
        .expect_err("exits");
    assert!(
        err.to_string().contains("exited") && err.to_string().contains("dying"),
        "{err}"
    );
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("30");
    let err = common::process::Daemon::spawn("silent", &mut cmd, &sock, Duration::from_millis(200))
        .expect_err("no socket");
    assert!(err.to_string().contains("no socket"), "{err}");
}
