//! Helpers shared by the integration test targets: `mod common;` at the top
//! of a target under `tests/` pulls them in.
//!
//! - [`process`]: child processes that are killed on drop and whose output is
//!   captured, plus [`process::Daemon`] (spawn, then poll until its unix
//!   socket exists).
//! - [`vcdev`]: the one way to start `vcdev serve` ([`vcdev::Vcdev::builder`]).
//! - [`frontend`], [`cdev`]: the two doors' client harnesses.
//! - [`peers`]: the backends the storage benchmark compares with (`vub_blk`,
//!   qemu-storage-daemon), and `vcdev serve` with a SPEC it may refuse.
//! - [`static_bin`]: a statically linked build of a binary of this crate.
//! - [`qemu`]: QEMU guest tests: [`qemu::require`] (skip or fail when QEMU 10
//!   or the guest image is missing), loading `qemu-configs/<name>`, booting
//!   with a hard deadline, and parsing the guest's `VCDEV-*` marker lines.
//!
//! No sleeps as synchronisation: everything that waits polls a condition
//! until a deadline ([`poll_until`]).

// Each test target uses a different subset of these helpers.
#![allow(dead_code)]

pub mod cdev;
pub mod frontend;
pub mod peers;
pub mod process;
pub mod qemu;
pub mod static_bin;
pub mod vcdev;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long any single wait on the daemon may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Interval between two checks of a polled condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Checks `cond` every [`POLL_INTERVAL`] until it returns `Some`, or gives up
/// with `None` once `timeout` has passed. `cond` is always tried at least
/// once, and once more after the deadline.
pub fn poll_until<T>(timeout: Duration, cond: impl FnMut() -> Option<T>) -> Option<T> {
    poll_every(POLL_INTERVAL, timeout, cond)
}

/// [`poll_until`] checking every `interval` (the benchmarks time
/// start-ups with a finer grain than [`POLL_INTERVAL`]).
pub fn poll_every<T>(
    interval: Duration,
    timeout: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return cond();
        }
        std::thread::sleep(interval);
    }
}

/// The smallest and the largest of `v` (NaN, NaN when it is empty).
pub fn span(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// The median of `v` (NaN when it is empty); sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Environment variable `name` parsed as a `T`, or `default` when it is
/// unset or does not parse (the benchmarks' knobs).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The order in which round `round` of an alternating benchmark visits its
/// `n` configurations: forward, then backward every other round, so that
/// none always goes first.
pub fn round_order(round: usize, n: usize) -> Vec<usize> {
    if round.is_multiple_of(2) {
        (0..n).collect()
    } else {
        (0..n).rev().collect()
    }
}

/// `total_a / total_b, median of per-round a / b, rounds a was ahead of R`,
/// as the alternating benchmarks print a configuration against another.
pub fn versus(total_a: f64, total_b: f64, rounds_a: &[f64], rounds_b: &[f64]) -> String {
    let mut r: Vec<f64> = rounds_a.iter().zip(rounds_b).map(|(a, b)| a / b).collect();
    let ahead = r.iter().filter(|&&x| x > 1.0).count();
    let n = r.len();
    format!(
        "{:.3} / {:.3}, {ahead} of {n}",
        total_a / total_b,
        median(&mut r)
    )
}

/// `var=F,D` (the benchmarks' `VCDEV_E2E_PIN`, `VCDEV_BENCH_PIN`): the CPU
/// of the frontend and the CPU of the backends, when set.
pub fn cpu_pair(var: &str) -> Option<(u32, u32)> {
    let v = std::env::var(var).ok()?;
    let (f, d) = v.split_once(',')?;
    Some((f.trim().parse().ok()?, d.trim().parse().ok()?))
}

/// Pins task `id` to `cpu` with taskset; with `all`, every thread of
/// process `id` (threads it starts later inherit their creator's CPU).
pub fn pin(all: bool, id: u32, cpu: u32) {
    taskset(all, id, &cpu.to_string());
}

/// Lets task `id` run on every online CPU again (undoes [`pin`] of one
/// thread).
pub fn unpin(id: u32) {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .expect("/sys/devices/system/cpu/online");
    taskset(false, id, online.trim());
}

fn taskset(all: bool, id: u32, cpus: &str) {
    let mut cmd = std::process::Command::new("taskset");
    if all {
        cmd.arg("-a");
    }
    let out = cmd
        .args(["-p", "-c", cpus, &id.to_string()])
        .output()
        .expect("taskset");
    assert!(
        out.status.success(),
        "taskset: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The calling thread's id (from /proc/thread-self).
pub fn this_tid() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("a thread id")
}

/// (utime, stime) of process `pid` from `/proc/PID/stat`, in seconds (clock
/// ticks: 10 ms steps); (0, 0) when it is gone.
pub fn stat_cpu_secs(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of proc(5); `rest` starts at field 3.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) as f64 / hz, ticks(12) as f64 / hz)
}

/// CPU time of process `pid` in us: the sum of its threads' run time
/// (`/proc/PID/task/*/schedstat`, ns), else utime+stime.
pub fn process_cpu_us(pid: u32) -> f64 {
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let ns: u64 = tasks
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        if ns > 0 {
            return ns as f64 / 1e3;
        }
    }
    let (user, sys) = stat_cpu_secs(pid);
    (user + sys) * 1e6
}

/// The repository root (the workspace directory holding `qemu-configs/`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// A scratch directory under the system temp dir, removed on drop (set
/// `VCDEV_KEEP_TMP=1` to keep it for a post-mortem). Its path is short enough
/// for unix socket names.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/vcdev-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vcdev-{tag}-{}-{n}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("VCDEV_KEEP_TMP").is_some_and(|v| v == "1") {
            eprintln!("keeping {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A loop device over a file, with direct I/O (`losetup -f --show --direct-io=on`): a disk
/// with a real latency for the storage bench, one whose reads a cgroup can throttle for the
/// tests. Detached on drop, panics included. Needs root.
pub struct LoopDev(PathBuf);

impl LoopDev {
    /// Attaches `file` to a free loop device; why it could not as the error.
    pub fn attach(file: &Path) -> Result<LoopDev, String> {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(LoopDev(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        )))
    }

    /// The device node (`/dev/loopN`).
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        match std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status()
        {
            Ok(st) if st.success() => {}
            other => eprintln!("losetup -d {} failed: {other:?}", self.0.display()),
        }
    }
}
