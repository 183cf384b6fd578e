//! The soak (issue #10), run by `tests/soak.sh MINUTES [DEVICES]` (`cargo
//! test --release --test soak_run -- MINUTES [DEVICES]`; without MINUTES,
//! as in a plain `cargo test`, it returns at once).
//!
//! One `vcdev serve` with DEVICES file-backed
//! devices (3 by default); one worker thread per device does random reads,
//! writes and flushes of 512 B to 16 KiB through the Rust vhost-user
//! frontend, every byte checked against a model of the disk. Every third
//! device runs behind the frontend's IOMMU (ACCESS_PLATFORM), with its data
//! pages INVALIDATEd now and then, so that its requests miss and are
//! answered again (IOTLB churn). Now and then a worker reconnects; the
//! coordinator grows a device with `vcdev ctl resize` (its model grows with
//! zeros) and restarts the daemon (SIGTERM, then the same command line,
//! state file and all). It ends with one summary line, and exits 1 on any
//! mismatch or failed request.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::frontend::{iova_of, Harness, DATA_GPA, DATA_PER_QUEUE, S_OK};

const SECTOR: u64 = 512;
const START_SIZE: u64 = 8 << 20;
const GROW: u64 = 1 << 20;
const MAX_SIZE: u64 = 64 << 20;

/// A small xorshift generator: reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    verified: AtomicU64,
    reconnects: AtomicU64,
    invalidations: AtomicU64,
    resizes: AtomicU64,
    restarts: AtomicU64,
    mismatches: AtomicU64,
    errors: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A device as the soak sees it: the disk's model and the frontend.
struct Dev {
    name: String,
    iommu: bool,
    model: Vec<u8>,
    h: Option<Harness>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Daemon {
    bin: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    child: Child,
}

impl Daemon {
    fn spawn(bin: &Path, dir: &Path, args: &[String]) -> Daemon {
        let _ = std::fs::remove_file(dir.join("control"));
        let child = Command::new(bin)
            .arg("serve")
            .arg("--dir")
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("vcdev serve");
        let ready = common::poll_until(Duration::from_secs(20), || {
            dir.join("control").exists().then_some(())
        });
        assert!(ready.is_some(), "vcdev did not start");
        Daemon {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            args: args.to_vec(),
            child,
        }
    }

    fn restart(&mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: a signal to our own child, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let st = self.child.wait().expect("wait vcdev");
        assert!(st.success(), "vcdev exited with {st} on SIGTERM");
        *self = Daemon::spawn(&self.bin, &self.dir, &self.args);
    }

    fn ctl(&self, args: &[&str]) -> bool {
        Command::new(&self.bin)
            .arg("ctl")
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to `d`, retrying for a while as QEMU's `reconnect-ms` does: a
/// frontend that arrives while its previous connection is still held (here
/// by the old frontend's miss-server thread, slow to end on a loaded
/// machine) is refused by design.
fn connect(dir: &Path, d: &Dev) -> Harness {
    let sock = dir.join("vhost-user").join(&d.name);
    let iommu = d.iommu;
    let start = || {
        if iommu {
            Harness::start_iotlb(&sock, 1, 256)
        } else {
            Harness::start(&sock, 1, 256)
        }
    };
    common::poll_until(Duration::from_secs(20), || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(start)).ok()
    })
    .unwrap_or_else(|| panic!("{}: not served for 20 s", d.name))
}

/// One request on `d`, checked against its model.
fn one_op(dir: &Path, d: &mut Dev, rng: &mut Rng, stats: &Stats) {
    if d.h.is_none() {
        d.h = Some(connect(dir, d));
        add(&stats.reconnects, 1);
    }
    let size = d.model.len() as u64;
    let len = (1 + rng.below(32)) * SECTOR;
    let sector = rng.below((size - len) / SECTOR + 1);
    let off = (sector * SECTOR) as usize;
    let h = d.h.as_mut().expect("connected");
    match rng.below(10) {
        0..=3 => {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if h.write(0, sector, &data) == S_OK {
                d.model[off..off + data.len()].copy_from_slice(&data);
            } else {
                add(&stats.errors, 1);
            }
        }
        4..=8 => {
            let r = h.read(0, sector, len as u32);
            if r.status != S_OK {
                add(&stats.errors, 1);
            } else if r.data[..] != d.model[off..off + len as usize] {
                add(&stats.mismatches, 1);
                eprintln!("soak: {} mismatch at sector {sector}, {len} bytes", d.name);
            } else {
                add(&stats.verified, len);
            }
        }
        _ => {
            if h.flush(0) != S_OK {
                add(&stats.errors, 1);
            }
        }
    }
    add(&stats.requests, 1);
    if d.iommu && rng.below(20) == 0 {
        // IOTLB churn: the data pages of the queue go; the next request
        // misses and the frontend answers again.
        h.iommu()
            .invalidate(iova_of(DATA_GPA), DATA_PER_QUEUE.min(64 << 10));
        add(&stats.invalidations, 1);
    }
    if rng.below(400) == 0 {
        d.h = None;
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let Some(minutes) = args.first().and_then(|a| a.parse::<f64>().ok()) else {
        eprintln!("soak: no MINUTES given (tests/soak.sh MINUTES): nothing to do");
        return ExitCode::SUCCESS;
    };
    let ndev: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let bin = common::vcdev::vcdev_bin();
    let tmp = common::TempDir::new("soak").expect("tmpdir");
    let dir = tmp.join("run");
    std::fs::create_dir(&dir).expect("dir");
    let mut serve_args = Vec::new();
    let devs: Vec<Arc<Mutex<Dev>>> = (0..ndev)
        .map(|i| {
            let img = tmp.join(&format!("d{i}.img"));
            std::fs::File::create(&img)
                .and_then(|f| f.set_len(START_SIZE))
                .expect("image");
            serve_args.push("--device".to_owned());
            serve_args.push(format!("blk,name=d{i},path={}", img.display()));
            Arc::new(Mutex::new(Dev {
                name: format!("d{i}"),
                iommu: i % 3 == 2,
                model: vec![0; START_SIZE as usize],
                h: None,
            }))
        })
        .collect();
    let daemon = Arc::new(Mutex::new(Daemon::spawn(&bin, &dir, &serve_args)));
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = devs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (d, stats, stop, dir) = (d.clone(), stats.clone(), stop.clone(), dir.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
                while !stop.load(Ordering::Relaxed) {
                    let mut g = lock(&d);
                    one_op(&dir, &mut g, &mut rng, &stats);
                }
            })
        })
        .collect();
    let end = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut rng = Rng(0x1234_5678);
    let mut next_resize = Instant::now() + Duration::from_secs(10);
    let mut next_restart = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        if Instant::now() >= next_resize {
            let i = rng.below(ndev as u64) as usize;
            let mut g = lock(&devs[i]);
            let to = (g.model.len() as u64 + GROW).min(MAX_SIZE);
            if daemon_ctl(&daemon, &["resize", &g.name, &to.to_string()]) {
                g.model.resize(to as usize, 0);
                add(&stats.resizes, 1);
            } else {
                add(&stats.errors, 1);
            }
            next_resize = Instant::now() + Duration::from_secs(10);
        }
        if Instant::now() >= next_restart {
            // Every device quiet and disconnected, then the restart.
            let mut guards: Vec<_> = devs.iter().map(|d| lock(d)).collect();
            for g in &mut guards {
                g.h = None;
            }
            lock(&daemon).restart();
            add(&stats.restarts, 1);
            drop(guards);
            next_restart = Instant::now() + Duration::from_secs(30);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        if w.join().is_err() {
            add(&stats.errors, 1);
        }
    }
    // A last check of every byte of every device, through a new daemon.
    let mut guards: Vec<_> = devs.iter().map(|d| lock(d)).collect();
    for g in &mut guards {
        g.h = None;
    }
    lock(&daemon).restart();
    for g in &mut guards {
        let mut h = connect(&dir, g);
        let size = g.model.len() as u64;
        for off in (0..size).step_by(64 << 10) {
            let len = (64u64 << 10).min(size - off);
            let r = h.read(0, off / SECTOR, len as u32);
            if r.status != S_OK || r.data[..] != g.model[off as usize..(off + len) as usize] {
                add(&stats.mismatches, 1);
                eprintln!("soak: {} differs at byte {off} after the run", g.name);
            } else {
                add(&stats.verified, len);
            }
        }
    }
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let (mismatches, errors) = (get(&stats.mismatches), get(&stats.errors));
    println!(
        "soak: {minutes} min, {ndev} devices: {} requests, {} MiB verified, {} reconnects, \
         {} IOTLB invalidations, {} resizes, {} restarts, {mismatches} mismatches, {errors} errors",
        get(&stats.requests),
        get(&stats.verified) >> 20,
        get(&stats.reconnects),
        get(&stats.invalidations),
        get(&stats.resizes),
        get(&stats.restarts),
    );
    if mismatches == 0 && errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn daemon_ctl(d: &Mutex<Daemon>, args: &[&str]) -> bool {
    lock(d).ctl(args)
}
