//! Issue #13: one userspace virtio-blk driver, one statically linked
//! binary (`vfio_blk`, [`vcdev_tests::blk`]), one byte check, run
//!
//! - on Linux's own VFIO inside a QEMU guest: the guest's
//!   vhost-user-blk-pci function, served by vcdev behind the guest's
//!   intel-iommu (`iommu_platform=on,ats=on`), is unbound from virtio-pci
//!   and bound to vfio-pci (driver_override); the binary drives it through
//!   `/dev/vfio/vfio` and `/dev/vfio/N` (type1 container), so its DMA goes
//!   through the guest's vIOMMU into vcdev's IOTLB;
//! - on the host against `vcdev serve`, on the cdev door (iommufd + device
//!   file) and on the group door (container + group).
//!
//! Each run writes a pattern, flushes, reads it back and compares; the
//! bytes are checked again in the backing file on the host, and in the
//! guest through its own virtio-blk driver once the function is back on
//! virtio-pci. Completions come by MSI-X (eventfds) or by polling the used
//! ring, doorbells by ioeventfd or by a write to the notify address.
//!
//! Both transports also run the group/container errno table of
//! [`vcdev_tests::cases`]; each answer must be the one the table records
//! for that transport (README.md "Cross-check against Linux's VFIO").
//!
//! The guest test skips without QEMU 10 and the guest image
//! (`sudo .ci/install-qemu.sh`); `VCDEV_REQUIRE_QEMU=1` makes it fail.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::qemu::{self, ArchiveFile};
use common::vcdev::Vcdev;
use common::TempDir;
use vcdev_tests::cases::{Case, Outcome, CASES};
use vcdev_tests::mem::pattern;

/// One run of the driver: completions, doorbells, where and what.
struct Run {
    irq: &'static str,
    notify: &'static str,
    /// `mmap` where the BAR allows it (vfio-pci), else `rw`.
    access: &'static str,
    sector: u64,
    seed: u8,
}

/// Bytes each run writes and reads back.
const BYTES: u32 = 64 << 10;

/// The runs, each at its own sector with its own pattern.
const RUNS: [Run; 4] = [
    Run {
        irq: "msix",
        notify: "ioeventfd",
        access: "rw",
        sector: 8,
        seed: 11,
    },
    Run {
        irq: "poll",
        notify: "write",
        access: "mmap",
        sector: 264,
        seed: 12,
    },
    Run {
        irq: "msix",
        notify: "write",
        access: "mmap",
        sector: 520,
        seed: 13,
    },
    Run {
        irq: "poll",
        notify: "ioeventfd",
        access: "rw",
        sector: 776,
        seed: 14,
    },
];

impl Run {
    fn args(&self) -> Vec<String> {
        [
            "--irq",
            self.irq,
            "--notify",
            self.notify,
            "--access",
            self.access,
            "--sector",
            &self.sector.to_string(),
            "--seed",
            &self.seed.to_string(),
            "--bytes",
            &BYTES.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// Checks one `vfio_blk=` line of run `r` whose registers were reached
/// by `access` (`what` starts the messages).
fn check_blk(line: &BTreeMap<String, String>, r: &Run, access: &str, what: &str) {
    let get = |k: &str| line.get(k).map(String::as_str).unwrap_or("");
    assert_eq!(get("vfio_blk"), "ok", "{what}: {line:?}");
    assert_eq!(get("match"), "yes", "{what}: {line:?}");
    assert_eq!(
        (get("irq"), get("notify"), get("access")),
        (r.irq, r.notify, access),
        "{what}"
    );
    assert_eq!(get("ids"), "1af4:1042", "{what}: a modern virtio-blk");
    // The device's DMA goes through the IOMMU: a read into unmapped
    // buffers fails with VIRTIO_BLK_S_IOERR (1) and writes nothing.
    assert_eq!(get("unmapped_read"), "1:untouched", "{what}: {line:?}");
    // Write, flush, read, the unmapped read: one request each, one
    // doorbell each.
    assert_eq!(
        (get("requests"), get("kicks")),
        ("4", "4"),
        "{what}: {line:?}"
    );
    let irqs: u64 = get("irqs").parse().expect("irqs=");
    if r.irq == "msix" {
        assert_eq!(irqs, 4, "{what}: one MSI-X interrupt per request: {line:?}");
    } else {
        assert_eq!(irqs, 0, "{what}: polling takes no interrupt: {line:?}");
    }
    let features =
        u64::from_str_radix(get("features").trim_start_matches("0x"), 16).expect("features=");
    assert_ne!(
        features & (1 << 33),
        0,
        "{what}: ACCESS_PLATFORM offered and acked"
    );
}

/// Whether run `r`'s pattern is in `image` at its sector.
fn on_disk(image: &Path, r: &Run) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; BYTES as usize];
    let f = std::fs::File::open(image).expect("image");
    f.read_exact_at(&mut buf, r.sector * 512)
        .expect("read image");
    buf == pattern(r.seed, BYTES as usize)
}

/// Compares the `case=NAME got=OUTCOME` lines with the table's column
/// `want`: the mismatches, one line each.
fn compare_cases(
    lines: &[BTreeMap<String, String>],
    want: fn(&Case) -> &'static str,
) -> Vec<String> {
    let got: BTreeMap<&str, &str> = lines
        .iter()
        .filter_map(|m| Some((m.get("case")?.as_str(), m.get("got")?.as_str())))
        .collect();
    let mut bad = Vec::new();
    for c in CASES {
        let expected = want(c);
        assert!(
            Outcome::parse(expected).is_some(),
            "table entry {} {expected:?} does not parse",
            c.name
        );
        match got.get(c.name) {
            Some(&g) if g == expected => {}
            Some(&g) => bad.push(format!("{}: got {g}, table says {expected}", c.name)),
            None => bad.push(format!("{}: no result", c.name)),
        }
    }
    bad
}

/// The static `vfio_blk` in `tmp`.
fn static_vfio_blk(tmp: &TempDir) -> PathBuf {
    let bin = tmp.join("vfio_blk");
    common::static_bin::build("vfio_blk", &bin);
    bin
}

/// Runs `bin` with `args`: its VCDEV-RESULT lines (panics on a failure).
fn run_bin(bin: &Path, args: &[String], what: &str) -> Vec<BTreeMap<String, String>> {
    let out = Command::new(bin).args(args).output().expect("run vfio_blk");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what}: vfio_blk {args:?} failed ({})\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    qemu::GuestReport::parse(&stdout).results
}

/// The host: the static binary on vcdev's cdev door and group door, each
/// run's bytes in the backing file; the errno table on the group door.
#[test]
fn host_doors_run_the_static_driver_and_give_the_tables_errnos() {
    let tmp = TempDir::new("kcheck-host").expect("tmpdir");
    let bin = static_vfio_blk(&tmp);
    let image = tmp.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(4 << 20))
        .expect("image");
    let mut d = Vcdev::builder("kcheck-host")
        .device(&format!("blk,path={}", image.display()))
        .spawn();
    let s = |p: PathBuf| p.display().to_string();
    let cdev_door = vec![
        "--iommu".to_owned(),
        s(d.path("iommu")),
        "--cdev".into(),
        s(d.path("devices/vfio0")),
    ];
    let group_door = vec![
        "--container".to_owned(),
        s(d.path("vfio/vfio")),
        "--group".into(),
        s(d.path("vfio/0")),
        "--device".into(),
        "vfio0".into(),
    ];
    let mut doors = vec![("iommufd", cdev_door)];
    if cfg!(feature = "group") {
        doors.push(("group", group_door.clone()));
    } else {
        eprintln!("SKIP the group door and the errno table: built without the `group` feature");
    }
    for (door, nodes) in &doors {
        for r in &RUNS {
            let mut args = vec!["blk".to_owned(), "--transport".into(), "vcdev".into()];
            args.extend(nodes.iter().cloned());
            args.extend(r.args());
            let what = format!("host {door} {}+{}+{}", r.irq, r.notify, r.access);
            // Each run starts from zeros at its sector.
            let zeros = vec![0u8; BYTES as usize];
            std::os::unix::fs::FileExt::write_all_at(
                &std::fs::OpenOptions::new()
                    .write(true)
                    .open(&image)
                    .expect("image"),
                &zeros,
                r.sector * 512,
            )
            .expect("zero the run's sectors");
            let lines = run_bin(&bin, &args, &what);
            let line = lines.first().expect("one result line");
            assert_eq!(line.get("path").map(String::as_str), Some(*door), "{what}");
            // vcdev's regions have no MMAP flag: `--access mmap` falls
            // back to messages.
            check_blk(line, r, "rw", &what);
            // The files closed with the process; the device is free again.
            common::poll_until(common::TIMEOUT, || {
                d.ctl(&["list"]).1.contains("owner none").then_some(())
            })
            .unwrap_or_else(|| panic!("{what}: the device was not released"));
            assert!(
                on_disk(&image, r),
                "{what}: the pattern is not in the backing file"
            );
            eprintln!(
                "{what}: ok, bytes in the backing file, write+flush+read {} us",
                line.get("io_us").map_or("?", String::as_str)
            );
        }
    }
    if cfg!(feature = "group") {
        let mut args = vec!["cases".to_owned(), "--transport".into(), "vcdev".into()];
        args.extend(group_door);
        let lines = run_bin(&bin, &args, "host cases");
        let bad = compare_cases(&lines, |c| c.vcdev);
        assert!(
            bad.is_empty(),
            "vcdev's group door against the table:\n{}",
            bad.join("\n")
        );
    }
    assert!(d.alive());
}

/// The guest's `/test.sh` (sourced by `vcdev.test=run`, with /init's
/// helpers): the disk's PCI function to vfio-pci, the errno table and the
/// runs on `/dev/vfio`, then back to virtio-pci and each run's bytes read
/// through the guest's own virtio-blk driver.
fn guest_script() -> String {
    let mut s = String::from(
        r#"wait_dev || return
d=$(readlink -f "/sys/block/$DEV/device/..")
bdf=${d##*/}
g=$(basename "$(readlink "$d/iommu_group")")
say "VCDEV-RESULT vfio_pci=$bdf vfio_group=$g $(iommu_of "$d") group_devices=$(ls "/sys/kernel/iommu_groups/$g/devices" | tr '\n' ',')"
pci_rebind "$bdf" vfio-pci
[ -c "/dev/vfio/$g" ] || { err "no /dev/vfio/$g after binding $bdf to vfio-pci"; return; }
say "VCDEV-RESULT vfio_bound=$(basename "$(readlink "$d/driver")")"
nodes="--container /dev/vfio/vfio --group /dev/vfio/$g --device $bdf"
/bin/vfio_blk cases --transport kernel $nodes || err "vfio_blk cases failed"
"#,
    );
    for r in &RUNS {
        s.push_str(&format!(
            "/bin/vfio_blk blk --transport kernel $nodes {} || err \"vfio_blk {} {} failed\"\n",
            r.args().join(" "),
            r.irq,
            r.notify
        ));
    }
    s.push_str(
        r#"if [ -e /dev/iommu ] && [ -d "$d/vfio-dev" ]; then
  say "VCDEV-RESULT kernel_cdev=present"
else
  say "VCDEV-RESULT kernel_cdev=absent dev_iommu=$([ -e /dev/iommu ] && echo yes || echo no) vfio_dev=$([ -d "$d/vfio-dev" ] && echo yes || echo no)"
fi
pci_rebind "$bdf" ""
wait_dev || return
say "VCDEV-RESULT rebound=$(basename "$(readlink "$d/driver")")"
"#,
    );
    for (i, r) in RUNS.iter().enumerate() {
        s.push_str(&format!(
            "say \"VCDEV-RESULT readback={i} md5=$(dd if=/dev/$DEV bs=512 skip={} count={} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)\"\n",
            r.sector,
            BYTES / 512
        ));
    }
    s
}

/// The guest: the same static binary on Linux's VFIO (group + type1
/// container) on the vhost-user-blk-pci function vcdev serves, behind the
/// guest's intel-iommu; the bytes checked in the guest (through
/// virtio-blk, after the function went back to virtio-pci) and in the
/// backing file; the errno table against the legacy type1 column.
#[test]
fn guest_kernel_vfio_runs_the_static_driver_and_gives_the_tables_errnos() {
    let Some(guest) = qemu::require() else { return };
    let tmp = TempDir::new("kcheck-guest").expect("tmpdir");
    let bin = std::fs::read(static_vfio_blk(&tmp)).expect("read the binary");
    // `tmp/vfio_blk` also runs the cases on the host at the end.
    let script = guest_script();
    let initrd = tmp.join("initrd");
    guest
        .initrd_with(
            &initrd,
            &[
                ArchiveFile {
                    path: "bin/vfio_blk",
                    mode: 0o100_755,
                    data: &bin,
                },
                ArchiveFile {
                    path: "test.sh",
                    mode: 0o100_644,
                    data: script.as_bytes(),
                },
            ],
        )
        .expect("initrd with the driver");
    let image = tmp.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image");
    // QEMU's vhost-user-blk queue-size default (128) must match the
    // device's.
    let spec = format!("blk,path={},queues=1,queue-size=128", image.display());
    let mut d = Vcdev::start("kcheck-guest", &["--device", &spec], "vfio0");
    let run = guest
        .boot("intel-iommu")
        .socket(&d.socket("vfio0"))
        .var("INITRD", initrd.display().to_string())
        .test("run")
        .run()
        .expect("spawn qemu");
    let what = "guest vfio-pci";
    assert!(
        run.report.ok(),
        "{what}\n{}\n--- vcdev log\n{}",
        run.diagnostics(),
        d.log()
    );
    let report = &run.report;
    assert_eq!(report.get("vfio_bound"), Some("vfio-pci"), "{what}");
    assert_eq!(report.get("rebound"), Some("virtio-pci"), "{what}");
    // Debian's kernels are built without IOMMUFD (so without
    // VFIO_DEVICE_CDEV): the kernel's cdev path cannot be tried here. A
    // guest kernel that has it must get a test of its own.
    assert_eq!(
        report.get("kernel_cdev"),
        Some("absent"),
        "{what}: the guest kernel has /dev/iommu and vfio-dev: run the cdev path on it"
    );
    let blk: Vec<_> = report
        .results
        .iter()
        .filter(|m| m.contains_key("vfio_blk"))
        .collect();
    assert_eq!(
        blk.len(),
        RUNS.len(),
        "{what}: one line per run\n{}",
        run.diagnostics()
    );
    for (line, r) in blk.iter().zip(&RUNS) {
        let what = format!("guest kernel {}+{}+{}", r.irq, r.notify, r.access);
        assert_eq!(
            line.get("path").map(String::as_str),
            Some("group"),
            "{what}"
        );
        // QEMU's virtio-pci: the virtio structures in BAR4, MSI-X in BAR1.
        assert!(
            line.get("common").is_some_and(|c| c.starts_with("4:")),
            "{what}: {line:?}"
        );
        assert_eq!(
            line.get("msix_bar").map(String::as_str),
            Some("1"),
            "{what}"
        );
        check_blk(line, r, r.access, &what);
    }
    for (i, r) in RUNS.iter().enumerate() {
        let want = qemu::md5_hex(&pattern(r.seed, BYTES as usize)).expect("md5");
        let got = report
            .find("readback", &i.to_string())
            .and_then(|m| m.get("md5"));
        assert_eq!(
            got.map(String::as_str),
            Some(want.as_str()),
            "{what}: run {i} read back through the guest's virtio-blk"
        );
    }
    for m in report.results.iter().filter(|m| m.contains_key("vfio_blk")) {
        eprintln!("guest: {m:?}");
    }
    let bad = compare_cases(&report.results, |c| c.type1);
    assert!(
        bad.is_empty(),
        "the guest kernel's type1 container against the table:\n{}\n{}",
        bad.join("\n"),
        run.diagnostics()
    );
    // The same cases on this daemon's group door, side by side.
    if cfg!(feature = "group") {
        common::poll_until(common::TIMEOUT, || {
            d.ctl(&["list"]).1.contains("owner none").then_some(())
        })
        .expect("QEMU gone, the device is free");
        let s = |p: PathBuf| p.display().to_string();
        let args = [
            "cases".to_owned(),
            "--transport".into(),
            "vcdev".into(),
            "--container".into(),
            s(d.path("vfio/vfio")),
            "--group".into(),
            s(d.path("vfio/0")),
            "--device".into(),
            "vfio0".into(),
        ];
        let host = run_bin(&tmp.join("vfio_blk"), &args, "host cases");
        let got = |lines: &[BTreeMap<String, String>], name: &str| {
            lines
                .iter()
                .find(|m| m.get("case").is_some_and(|c| c == name))
                .and_then(|m| m.get("got").cloned())
                .unwrap_or_default()
        };
        let mut table = String::new();
        for c in CASES {
            let (k, v) = (got(&report.results, c.name), got(&host, c.name));
            assert_eq!(
                k == v,
                c.agrees(),
                "{}: guest {k}, vcdev {v}, but the table says they {}",
                c.name,
                if c.agrees() { "agree" } else { "differ" }
            );
            table.push_str(&format!(
                "  {:<28} {:<8} {:<8} {}\n",
                c.name,
                k,
                v,
                if k == v { "" } else { "by design" }
            ));
        }
        eprintln!("errno table, Linux type1 (guest) and vcdev's group door:\n{table}");
    }
    let out = d.daemon.stop(Duration::from_secs(10)).expect("stop vcdev");
    assert!(
        out.status.success(),
        "{what}: vcdev exit {:?}\n{}",
        out.status,
        out.stderr
    );
    for (i, r) in RUNS.iter().enumerate() {
        assert!(
            on_disk(&image, r),
            "{what}: run {i}'s pattern is not in the backing file"
        );
    }
    // The driver's DMA went through the guest's vIOMMU into vcdev's IOTLB.
    let c = common::vcdev::exit_counters(&out.stderr, "vfio0");
    let misses = c.get("iotlb_misses").copied().unwrap_or(0);
    assert!(misses > 0, "{what}: no IOTLB miss\n{}", out.stderr);
    // Each run's read into unmapped buffers: the guest's vIOMMU refused
    // vcdev's miss (and the request failed with IOERR, checked above).
    let refused = c.get("iotlb_misses_refused").copied().unwrap_or(0);
    assert!(
        refused >= RUNS.len() as u64,
        "{what}: {refused} refused IOTLB misses for {} unmapped reads\n{}",
        RUNS.len(),
        out.stderr
    );
    eprintln!(
        "{what}: {} runs ok on {} ({}, accel {}); IOTLB misses {misses} ({refused} refused), \
         updates {}, invalidates {}; QEMU {:.2?}",
        RUNS.len(),
        report.kernel.as_deref().unwrap_or("?"),
        guest.qemu_version,
        guest.accel,
        c.get("iotlb_updates").copied().unwrap_or(0),
        c.get("iotlb_invalidates").copied().unwrap_or(0),
        run.elapsed,
    );
}
