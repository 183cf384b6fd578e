//! Per-device I/O limits (`iops=`, `bw=`) measured end to end: Rust frontends keep requests
//! in flight on devices of one daemon, limited and unlimited side by side.
//!
//! The buckets hold one second of their rate, so every measurement starts after a warm-up
//! that spends the burst, and compares the requests completed over the next 5 s with the
//! limit. The token bucket is forgiving of a busy machine: a worker woken late finds the
//! tokens it missed still there (up to one second of them), so the rate holds on average.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::frontend::Harness;
use common::vcdev::Vcdev;

/// Requests kept in flight by each frontend.
const DEPTH: usize = 16;
/// Spends the burst (one second of the rate) and then some.
const WARM_UP: Duration = Duration::from_secs(2);
/// The measured window.
const WINDOW: Duration = Duration::from_secs(5);

/// The IOPS limit under test.
const IOPS: u64 = 2000;
/// The bandwidth limit under test, and its request size.
const BW: u64 = 4 << 20;
const BW_REQUEST: u32 = 64 << 10;

/// Completions in `[start + WARM_UP, start + WARM_UP + WINDOW)`.
fn in_window(start: Instant, done: &[Instant]) -> u64 {
    let (from, to) = (start + WARM_UP, start + WARM_UP + WINDOW);
    done.iter().filter(|&&t| t >= from && t < to).count() as u64
}

/// Pumps reads of `len` on device `name` of `d` from a thread of its own for the warm-up and
/// the window: requests completed in the window.
fn pump(d: &Vcdev, name: &str, len: u32) -> thread::JoinHandle<u64> {
    let socket = d.socket(name);
    thread::spawn(move || {
        let mut h = Harness::start(&socket, 1, 128);
        let start = Instant::now();
        let done = h.pump(0, false, len, DEPTH, WARM_UP + WINDOW);
        in_window(start, &done)
    })
}

/// Asserts that `got` is within 10% of `want`.
fn within_10_percent(what: &str, got: u64, want: u64) {
    let (lo, hi) = (want * 9 / 10, want * 11 / 10);
    assert!(
        (lo..=hi).contains(&got),
        "{what}: {got} in {WINDOW:?}, want {want} +- 10%"
    );
}

/// `iops=2000` measured over 5 s is within 10% of the limit and `bw=4M` within 10% of its
/// bytes, while an unlimited device beside them in the same daemon runs clearly faster than
/// the limit: the limits are per device.
#[test]
fn limits_hold_while_an_unlimited_device_runs_beside_them() {
    let d = Vcdev::builder("throttle")
        .device(&format!("blk,name=iops,ram=16M,iops={IOPS}"))
        .device(&format!("blk,name=bw,ram=16M,bw={BW}"))
        .device("blk,name=free,ram=16M")
        .wait_for_vhost_user("free")
        .log_level("info")
        .spawn();
    let iops = pump(&d, "iops", 4096);
    let bw = pump(&d, "bw", BW_REQUEST);
    let free = pump(&d, "free", 4096);
    let (iops, bw, free) = (
        iops.join().expect("iops pump"),
        bw.join().expect("bw pump"),
        free.join().expect("free pump"),
    );
    let secs = WINDOW.as_secs();
    eprintln!(
        "in {WINDOW:?}: iops device {iops} requests ({}/s, limit {IOPS}), bw device {} KiB \
         ({} KiB/s, limit {}), unlimited device {free} requests ({}/s)",
        iops / secs,
        (bw * u64::from(BW_REQUEST)) >> 10,
        (bw * u64::from(BW_REQUEST) / secs) >> 10,
        BW >> 10,
        free / secs
    );
    within_10_percent("iops=2000", iops, IOPS * secs);
    within_10_percent(
        "bw=4M (requests of 64 KiB)",
        bw,
        BW * secs / u64::from(BW_REQUEST),
    );
    assert!(
        free > IOPS * secs * 3 / 2,
        "the unlimited device ran {free} requests in {WINDOW:?}: not clearly above the limit \
         of the one beside it ({IOPS}/s)"
    );
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let (user, sys) = common::stat_cpu_secs(pid);
    Duration::from_secs_f64(user + sys)
}

/// A queue whose requests wait for tokens sleeps until they come (a timer), it does not spin:
/// with `bw=64K` and 64 KiB reads (one a second), the daemon uses a small fraction of a CPU.
#[test]
fn a_throttled_queue_sleeps_until_its_tokens_come() {
    let mut d = Vcdev::builder("throttle-sleep")
        .device("blk,name=slow,ram=4M,bw=64K")
        .wait_for_vhost_user("slow")
        .log_level("info")
        .spawn();
    let pid = d.daemon.proc().pid();
    let mut h = Harness::start(&d.socket("slow"), 1, 64);
    let before = cpu_time(pid);
    let run = Duration::from_secs(3);
    let done = h.pump(0, false, 64 << 10, 4, run);
    let used = cpu_time(pid).saturating_sub(before);
    // (A daemon gone would read as no CPU at all.)
    assert!(
        matches!(d.daemon.proc().try_wait(), Ok(None)),
        "the daemon is still running"
    );
    // The burst (one request), then one a second.
    assert!(
        (2..=5).contains(&done.len()),
        "{} requests in {run:?} at one a second",
        done.len()
    );
    assert!(
        used < run / 5,
        "the daemon used {used:?} of CPU in {run:?} serving {} throttled requests",
        done.len()
    );
}
