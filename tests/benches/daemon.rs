//! The daemon operations benchmark (issue #11): one `vcdev serve` with 256 devices, idle and
//! with 16 connected frontends doing I/O.
//!
//! Two configurations of the 256 devices ([`configs`]), run round-robin:
//!
//! - `ram`: `blk,name=iN,ram=1M` (a RAM disk, the sync engine; its pages are touched only when
//!   written);
//! - `tmpfs io_uring`: `blk,name=iN,path=/dev/shm/.../iN.img,aio=io_uring`, each a sparse 1 MiB
//!   file on tmpfs (the io_uring engine, so that io_uring rings and workers show).
//!
//! Each run of a configuration measures:
//!
//! - the same daemon with one device (`i0`): its resident memory, the base of the per-device
//!   figure;
//! - start-up of the daemon with 256 devices: from spawning `vcdev serve` to the last device's
//!   vhost-user socket (devices are added in order, so all 256 are there; the bench checks), and
//!   to the control socket `DIR/control` (made after every other node), polled every 0.2 ms;
//! - idle: threads (the entries of `/proc/PID/task`, which lists every thread of the process,
//!   io_uring workers `iou-wrk-*` and `iou-sqp-*` included; they are counted apart too),
//!   resident memory (`VmRSS` of `/proc/PID/status`), resident memory per device
//!   ((VmRSS with 256 devices - VmRSS with 1) / 255), `ctl list` latency (the library client
//!   `vcdev::ctl::request`, [`CTL_CALLS`] calls back to back: median and p99) and the wall time
//!   of a `vcdev ctl list` process ([`CLI_CALLS`] calls, median);
//! - loaded: 16 frontends (`tests/common/frontend.rs`, one queue each, with a backend channel as
//!   QEMU sets one) on 16 devices, each on its own thread, writing then reading 4 KiB at a time
//!   (QD1) in a loop: the most threads seen (sampled every 20 ms), what they are (by thread name:
//!   connection, queue worker, io_uring worker, backend channel reader), resident memory,
//!   aggregate IOPS over the measured window, then `ctl list` latency under that load.
//!
//! Figures are medians over the runs (threads: the median of each run's figure; the most seen
//! is given too). The table goes to `tests/benches/results/daemon.md` (`VCDEV_BENCH_OUT`).
//!
//! Run with `cargo bench -p vcdev-tests --bench daemon`. Environment:
//!
//! - `VCDEV_BENCH_RUNS` (5);
//! - `VCDEV_BENCH_SECS` (2): the loaded window, after 0.25 s of warm-up;
//! - `VCDEV_BENCH_QUICK=1`: a 0.5 s window and 0.1 s of warm-up (runs stay 5 unless set);
//! - `VCDEV_BENCH_CONFIGS`: comma-separated configuration names to keep.
//!
//! Without `--bench` in its arguments (`cargo test --benches`) it exits at once.

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::frontend::{pattern, Harness, S_OK};
use common::vcdev::{vcdev_bin, Vcdev};
use common::{median, poll_every, TIMEOUT};

/// Devices in the daemon.
const DEVICES: usize = 256;
/// Frontends doing I/O in the loaded phase, on devices `i0`, `i16`, `i32`, ...
const LOADED: usize = 16;
/// Size of each device.
const DEVICE_BYTES: u64 = 1 << 20;
/// Library `ctl list` calls per measurement.
const CTL_CALLS: usize = 100;
/// `vcdev ctl list` processes per run.
const CLI_CALLS: usize = 10;
/// Queue entries of each frontend's queue.
const QUEUE_SIZE: u16 = 64;
/// How finely start-up is timed.
const STARTUP_POLL: Duration = Duration::from_micros(200);

// Targets of issue #11.
const TARGET_IDLE_THREADS: f64 = 8.0;
const TARGET_KIB_PER_DEVICE: f64 = 64.0;
const TARGET_MORE_PER_FRONTEND: f64 = 1.0;

#[derive(Clone, Debug)]
struct Config {
    name: &'static str,
    /// The SPEC of device `iN`; `@IMG@` is its image file.
    spec: &'static str,
    /// Whether `@IMG@` files are made (sparse, on tmpfs).
    files: bool,
}

fn configs() -> Vec<Config> {
    let mut all = vec![
        Config {
            name: "ram",
            spec: "blk,name=@NAME@,ram=1M",
            files: false,
        },
        Config {
            name: "tmpfs io_uring",
            spec: "blk,name=@NAME@,path=@IMG@,aio=io_uring",
            files: true,
        },
    ];
    if let Ok(keep) = std::env::var("VCDEV_BENCH_CONFIGS") {
        all.retain(|c| keep.split(',').any(|k| k.trim() == c.name));
    }
    all
}

/// The image files of a configuration, on tmpfs, removed on drop.
struct Images(Option<PathBuf>);

impl Images {
    fn new(cfg: &Config) -> Images {
        if !cfg.files {
            return Images(None);
        }
        let dir = PathBuf::from(format!(
            "/dev/shm/vcdev-bench-daemon-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("image directory on /dev/shm");
        for i in 0..DEVICES {
            std::fs::File::create(dir.join(format!("i{i}.img")))
                .and_then(|f| f.set_len(DEVICE_BYTES))
                .expect("image file");
        }
        Images(Some(dir))
    }

    fn spec(&self, cfg: &Config, i: usize) -> String {
        let img = self
            .0
            .as_ref()
            .map(|d| d.join(format!("i{i}.img")).display().to_string())
            .unwrap_or_default();
        cfg.spec
            .replace("@NAME@", &format!("i{i}"))
            .replace("@IMG@", &img)
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

// ---------------------------------------------------------------------------
// What /proc says

/// `key:` of /proc/PID/status, in KiB (or a count).
fn status_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| {
            v.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS")
}

/// The kinds of threads, told apart by name (`comm`, 15 characters at most).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Threads {
    total: u32,
    /// `iou-wrk-*`, `iou-sqp-*`.
    io_uring: u32,
    /// `NAME#N-qI`: queue workers.
    queue: u32,
    /// `NAME-conn`, `NAME-wait`: vhost-user connection threads.
    conn: u32,
    /// `NAME#N-backend-channel`: backend channel ack readers.
    channel: u32,
    /// `ctl`: control requests.
    ctl: u32,
    /// Anything else (`vcdev`, `vcdev-loop`).
    other: u32,
}

fn threads(pid: u32) -> Threads {
    let mut t = Threads::default();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return t;
    };
    for e in dir.flatten() {
        // A thread that ended since the listing has no comm: not counted.
        let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim_end();
        t.total += 1;
        let kind = if comm.starts_with("iou-") {
            &mut t.io_uring
        } else if comm.contains("-back") {
            &mut t.channel
        } else if comm.ends_with("-conn") || comm.ends_with("-wait") {
            &mut t.conn
        } else if comm
            .rsplit_once("-q")
            .is_some_and(|(_, i)| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        {
            &mut t.queue
        } else if comm == "ctl" {
            &mut t.ctl
        } else {
            &mut t.other
        };
        *kind += 1;
    }
    t
}

// ---------------------------------------------------------------------------
// Measuring

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// `CTL_CALLS` library `ctl list` calls: (median, p99) in us.
fn ctl_list_latency(dir: &Path) -> (f64, f64) {
    let sock = vcdev::ctl::socket_path(dir);
    let mut us: Vec<f64> = (0..CTL_CALLS)
        .map(|_| {
            let t = Instant::now();
            let v = vcdev::ctl::request(&sock, &vcdev::ctl::Request::List).expect("ctl list");
            let took = t.elapsed().as_secs_f64() * 1e6;
            let n = v["devices"].as_array().map_or(0, Vec::len);
            assert_eq!(n, DEVICES, "ctl list shows every device");
            took
        })
        .collect();
    us.sort_unstable_by(f64::total_cmp);
    (pct(&us, 0.5), pct(&us, 0.99))
}

/// Median wall time of a `vcdev ctl list` process, in ms.
fn cli_list_ms(dir: &Path) -> f64 {
    let bin = vcdev_bin();
    let mut ms: Vec<f64> = (0..CLI_CALLS)
        .map(|_| {
            let t = Instant::now();
            let out = Command::new(&bin)
                .arg("ctl")
                .arg("--dir")
                .arg(dir)
                .arg("list")
                .output()
                .expect("vcdev ctl list");
            let took = t.elapsed().as_secs_f64() * 1e3;
            assert!(out.status.success(), "vcdev ctl list failed");
            took
        })
        .collect();
    median(&mut ms)
}

/// One run of one configuration.
#[derive(Clone, Debug, Default)]
struct Sample {
    rss1_kib: f64,
    startup_sockets_ms: f64,
    startup_control_ms: f64,
    idle: Threads,
    idle_rss_kib: f64,
    kib_per_device: f64,
    ctl_p50_us: f64,
    ctl_p99_us: f64,
    cli_ms: f64,
    /// The most threads seen under load (by total).
    loaded: Threads,
    loaded_rss_kib: f64,
    iops: f64,
    load_ctl_p50_us: f64,
    load_ctl_p99_us: f64,
}

impl Sample {
    /// Threads a connected frontend costs beyond its queue workers and their io_uring workers.
    fn more_per_frontend(&self) -> f64 {
        let added = f64::from(self.loaded.total) - f64::from(self.idle.total);
        let own = f64::from(self.loaded.queue + self.loaded.io_uring)
            - f64::from(self.idle.queue + self.idle.io_uring);
        (added - own) / LOADED as f64
    }

    fn per_frontend(&self) -> f64 {
        (f64::from(self.loaded.total) - f64::from(self.idle.total)) / LOADED as f64
    }
}

fn builder(cfg: &Config, images: &Images, n: usize) -> common::vcdev::VcdevBuilder {
    let mut b = Vcdev::builder("bench-ops").log_level("warn");
    for i in 0..n {
        b = b.device(&images.spec(cfg, i));
    }
    b
}

/// One frontend's loop: 4 KiB write then read at the next slot, until `stop`.
fn frontend(socket: PathBuf, go: Arc<Barrier>, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>) {
    let mut h = Harness::start(&socket, 1, QUEUE_SIZE);
    // As QEMU does: a backend channel (misses, config changes).
    let _channel = h.backend_channel();
    let data = pattern(0x5a, 4096);
    let slots = DEVICE_BYTES / 4096;
    go.wait();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let sector = k % slots * 8;
        assert_eq!(h.write(0, sector, &data), S_OK, "write");
        let r = h.read(0, sector, 4096);
        assert_eq!(r.status, S_OK, "read");
        ops.fetch_add(2, Ordering::Relaxed);
        k += 1;
    }
}

fn run_config(cfg: &Config, images: &Images, secs: f64, warmup: f64) -> Sample {
    let mut s = Sample::default();

    // One device: the base of the per-device figure.
    {
        let mut one = builder(cfg, images, 1).spawn();
        let pid = one.daemon.proc().pid();
        s.rss1_kib = rss_kib(pid) as f64;
    }

    // 256 devices: start-up.
    let last = format!("i{}", DEVICES - 1);
    let t0 = Instant::now();
    let mut d = builder(cfg, images, DEVICES)
        .wait_for_vhost_user(&last)
        .poll_interval(STARTUP_POLL)
        .spawn();
    s.startup_sockets_ms = t0.elapsed().as_secs_f64() * 1e3;
    let control = vcdev::ctl::socket_path(d.dir());
    let up = poll_every(STARTUP_POLL, TIMEOUT, || {
        std::fs::metadata(&control)
            .is_ok_and(|m| m.file_type().is_socket())
            .then_some(())
    });
    assert!(up.is_some(), "no control socket");
    s.startup_control_ms = t0.elapsed().as_secs_f64() * 1e3;
    let sockets = std::fs::read_dir(d.path(common::vcdev::VHOST_USER_DIR))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(sockets, DEVICES, "every vhost-user socket is there");
    let pid = d.daemon.proc().pid();

    // Idle.
    s.idle = threads(pid);
    s.idle_rss_kib = rss_kib(pid) as f64;
    s.kib_per_device = (s.idle_rss_kib - s.rss1_kib) / (DEVICES - 1) as f64;
    (s.ctl_p50_us, s.ctl_p99_us) = ctl_list_latency(d.dir());
    s.cli_ms = cli_list_ms(d.dir());

    // Loaded: 16 frontends.
    let go = Arc::new(Barrier::new(LOADED + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..LOADED)
        .map(|k| {
            let socket = d.socket(&format!("i{}", k * (DEVICES / LOADED)));
            let (go, stop, ops) = (go.clone(), stop.clone(), ops.clone());
            std::thread::Builder::new()
                .name(format!("fe{k}"))
                .spawn(move || frontend(socket, go, stop, ops))
                .expect("spawn a frontend")
        })
        .collect();
    go.wait();
    std::thread::sleep(Duration::from_secs_f64(warmup));
    let (ops0, t) = (ops.load(Ordering::Relaxed), Instant::now());
    let window = Duration::from_secs_f64(secs);
    let mut most = threads(pid);
    while t.elapsed() < window {
        std::thread::sleep(Duration::from_millis(20));
        most = most.max(threads(pid));
    }
    s.iops = (ops.load(Ordering::Relaxed) - ops0) as f64 / t.elapsed().as_secs_f64();
    s.loaded = most;
    s.loaded_rss_kib = rss_kib(pid) as f64;
    (s.load_ctl_p50_us, s.load_ctl_p99_us) = ctl_list_latency(d.dir());
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        if w.join().is_err() {
            panic!("a frontend failed; daemon log:\n{}", d.log());
        }
    }
    assert!(d.alive(), "the daemon died:\n{}", d.log());
    s
}

// ---------------------------------------------------------------------------
// Reporting

fn med(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(&mut samples.iter().map(f).collect::<Vec<_>>())
}

fn max(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    samples.iter().map(f).fold(f64::NEG_INFINITY, f64::max)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed**"
    }
}

fn table(cfgs: &[Config], samples: &BTreeMap<usize, Vec<Sample>>, runs: usize) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "{DEVICES} devices of 1 MiB in one `vcdev serve`; medians over {runs} run(s) (max over runs in brackets where it matters). Threads = entries of /proc/PID/task (io_uring workers included, `iou` counts them apart); RSS = VmRSS; per device = (RSS with {DEVICES} devices - RSS with 1) / {}. Loaded = {LOADED} frontends (one queue each, with a backend channel as QEMU sets one) each writing then reading 4 KiB at QD1 in a loop on its own device.\n\n",
        DEVICES - 1
    ));
    t.push_str("| configuration | figure | measured | target | |\n|---|---|---|---|---|\n");
    for (ci, cfg) in cfgs.iter().enumerate() {
        let Some(v) = samples.get(&ci) else { continue };
        let n = cfg.name;
        let idle = med(v, |s| f64::from(s.idle.total));
        let idle_max = max(v, |s| f64::from(s.idle.total));
        let kib = med(v, |s| s.kib_per_device);
        let kib_max = max(v, |s| s.kib_per_device);
        let more = med(v, Sample::more_per_frontend);
        let more_max = max(v, Sample::more_per_frontend);
        let mut row = |fig: &str, measured: String, target: &str, v: &str| {
            t.push_str(&format!("| {n} | {fig} | {measured} | {target} | {v} |\n"));
        };
        row(
            "idle threads",
            format!(
                "{idle:.0} [{idle_max:.0}] (iou {:.0})",
                med(v, |s| f64::from(s.idle.io_uring))
            ),
            "<= 8",
            verdict(idle_max <= TARGET_IDLE_THREADS),
        );
        row(
            "resident memory per idle device",
            format!("{kib:.1} KiB [{kib_max:.1}]"),
            "<= 64 KiB",
            verdict(kib_max <= TARGET_KIB_PER_DEVICE),
        );
        row(
            "RSS, 1 device / 256 idle devices",
            format!(
                "{:.1} / {:.1} MiB",
                med(v, |s| s.rss1_kib) / 1024.0,
                med(v, |s| s.idle_rss_kib) / 1024.0
            ),
            "",
            "",
        );
        row(
            "start-up: spawn to all 256 vhost-user sockets",
            format!("{:.1} ms", med(v, |s| s.startup_sockets_ms)),
            "",
            "",
        );
        row(
            "start-up: spawn to control socket ready",
            format!("{:.1} ms", med(v, |s| s.startup_control_ms)),
            "",
            "",
        );
        row(
            "`ctl list` (library), idle: p50 / p99",
            format!(
                "{:.0} / {:.0} us",
                med(v, |s| s.ctl_p50_us),
                med(v, |s| s.ctl_p99_us)
            ),
            "",
            "",
        );
        row(
            "`vcdev ctl list` process wall time, idle",
            format!("{:.1} ms", med(v, |s| s.cli_ms)),
            "",
            "",
        );
        let lt = |f: fn(&Threads) -> u32| med(v, |s| f64::from(f(&s.loaded)));
        row(
            "loaded threads (most seen)",
            format!(
                "{:.0} [{:.0}]: queue workers {:.0}, iou {:.0}, connection {:.0}, backend channel {:.0}, ctl {:.0}, other {:.0}",
                lt(|t| t.total),
                max(v, |s| f64::from(s.loaded.total)),
                lt(|t| t.queue),
                lt(|t| t.io_uring),
                lt(|t| t.conn),
                lt(|t| t.channel),
                lt(|t| t.ctl),
                lt(|t| t.other),
            ),
            "",
            "",
        );
        row(
            "threads per connected frontend",
            format!("{:.2}", med(v, Sample::per_frontend)),
            "",
            "",
        );
        row(
            "threads per frontend beyond its queue workers and their io_uring workers",
            format!("{more:.2} [{more_max:.2}]"),
            "<= 1",
            verdict(more_max <= TARGET_MORE_PER_FRONTEND),
        );
        row(
            "loaded RSS",
            format!("{:.1} MiB", med(v, |s| s.loaded_rss_kib) / 1024.0),
            "",
            "",
        );
        row(
            "`ctl list` (library), loaded: p50 / p99",
            format!(
                "{:.0} / {:.0} us",
                med(v, |s| s.load_ctl_p50_us),
                med(v, |s| s.load_ctl_p99_us)
            ),
            "",
            "",
        );
        row(
            "aggregate IOPS, 16 frontends at QD1 (context)",
            format!("{:.0}", med(v, |s| s.iops)),
            "",
            "",
        );
    }
    t
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("daemon: a benchmark; run it with `cargo bench -p vcdev-tests --bench daemon`");
        return;
    }
    let quick = std::env::var_os("VCDEV_BENCH_QUICK").is_some_and(|v| v == "1");
    let secs = common::env_or::<f64>("VCDEV_BENCH_SECS", if quick { 0.5 } else { 2.0 });
    let warmup = if quick { 0.1 } else { 0.25 };
    let runs = common::env_or::<f64>("VCDEV_BENCH_RUNS", 5.0).max(1.0) as usize;
    let out = std::env::var_os("VCDEV_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join("tests/benches/results"));
    std::fs::create_dir_all(&out).expect("create the results directory");
    let cfgs = configs();
    assert!(!cfgs.is_empty(), "VCDEV_BENCH_CONFIGS selects nothing");
    println!(
        "daemon: {} configuration(s), {DEVICES} devices, {runs} run(s), {LOADED} frontends for {secs} s after {warmup} s warm-up",
        cfgs.len()
    );
    let images: Vec<Images> = cfgs.iter().map(Images::new).collect();
    let mut samples: BTreeMap<usize, Vec<Sample>> = BTreeMap::new();
    let t_all = Instant::now();
    for run in 0..runs {
        for (ci, cfg) in cfgs.iter().enumerate() {
            let t = Instant::now();
            let s = run_config(cfg, &images[ci], secs, warmup);
            eprintln!(
                "run {}/{runs} {:<15} {:.1} s: idle {} threads, {:.1} KiB/device, start-up {:.1}/{:.1} ms, ctl list {:.0}/{:.0} us, cli {:.1} ms; loaded {} threads ({:.2} beyond queue+iou per frontend), {:.0} IOPS, ctl list {:.0}/{:.0} us",
                run + 1,
                cfg.name,
                t.elapsed().as_secs_f64(),
                s.idle.total,
                s.kib_per_device,
                s.startup_sockets_ms,
                s.startup_control_ms,
                s.ctl_p50_us,
                s.ctl_p99_us,
                s.cli_ms,
                s.loaded.total,
                s.more_per_frontend(),
                s.iops,
                s.load_ctl_p50_us,
                s.load_ctl_p99_us,
            );
            samples.entry(ci).or_default().push(s);
        }
    }
    let mut report = table(&cfgs, &samples, runs);
    report.push_str(&format!(
        "\nWall time: {:.0} s ({runs} run(s), {secs} s loaded window, {warmup} s warm-up).\n",
        t_all.elapsed().as_secs_f64()
    ));
    println!();
    print!("{report}");
    std::fs::write(out.join("daemon.md"), &report).expect("write daemon.md");
    println!("daemon: table in {}", out.join("daemon.md").display());
}
