//! The storage benchmark (issue #8): vcdev beside the other vhost-user-blk backends, through
//! the same Rust frontend (`tests/common/frontend.rs`, one queue unless said, no IOMMU) on the
//! same disks, in one run.
//!
//! Backends ([`configs`]; each has a SPEC of its own):
//!
//! - `vcdev serve` with today's default SPEC, and with `aio=io_uring|sync` x `direct=on|off`.
//!   A SPEC that `vcdev serve` refuses (exit code 2: an option it does not know yet) is skipped
//!   with a message, so those configurations start running by themselves once the options land;
//! - qemu-storage-daemon 10.0's vhost-user-blk export (`aio=io_uring`, `cache.direct=on|off`),
//!   the export in an iothread of its own;
//! - `vub_blk`: vcdev's device model on rust-vmm's `vhost-user-backend` (`tests/src/bin`).
//!
//! Disks: a file on tmpfs (`/dev/shm`: the CPU path), and, when run as root, a loop device with
//! direct I/O over a file on the root disk (a real latency), written fully once with non-zero
//! data. Each run also measures the raw device floor: an `O_DIRECT` `pread` loop of 4 KiB random
//! reads at QD1 from this process (`raw pread`).
//!
//! Workloads: 4 KiB randread and randwrite at QD1 and QD32, 4 KiB randread at QD32 over two
//! queues (16 requests each, one frontend thread; the backend started again with two queues for
//! it), a 70/30 random read/write mix of 4 KiB at QD32, 128 KiB sequential read at QD8.
//! Per phase: IOPS, p50/p99 latency (request built to used seen), the backend's CPU time per
//! request (utime+stime of `/proc/PID/stat` around the phase), its threads (`Threads:` of
//! `/proc/PID/status` at the end of the phase) and how many of them are io_uring workers
//! (`iou-*` in `/proc/PID/task/*/comm`). Runs go round-robin over the configurations (a fresh
//! backend each time, the disk's page cache dropped before it starts); the table gives medians
//! over the runs and ratios to qemu-storage-daemon with the same cache mode on the same disk and
//! workload. Plots (SVG) and the table go to `tests/benches/results/` (`VCDEV_BENCH_OUT`).
//!
//! Run with `cargo bench -p vcdev-tests --bench storage`. Environment:
//!
//! - `VCDEV_BENCH_SECS` (2): measured seconds per phase, after `VCDEV_BENCH_WARMUP_SECS` (0.25);
//! - `VCDEV_BENCH_RUNS` (5);
//! - `VCDEV_BENCH_QUICK=1`: 0.5 s phases, 0.1 s warm-up (runs stay 5 unless set);
//! - `VCDEV_BENCH_CONFIGS`: comma-separated configuration names to keep;
//! - `VCDEV_BENCH_SPECS`: `NAME=SPEC;NAME=SPEC`, replacing the SPEC of configuration NAME, or
//!   adding a vcdev configuration NAME; `@DISK@` stands for the disk's path (and, for
//!   qemu-storage-daemon, `@DRIVER@` for `file` or `host_device`);
//! - `VCDEV_BENCH_DISK_MIB` (256 on tmpfs, 1024 on the loop device's file);
//! - `VCDEV_BENCH_LOOP_DIR` (`/var/tmp`): where the loop device's backing file lives;
//! - `VCDEV_BENCH_DISKS` (`tmpfs,loop`): the disks to run on;
//! - `VCDEV_BENCH_WORKLOADS`: comma-separated workload names to keep (default all);
//! - `VCDEV_BENCH_SPECS` may add a vcdev configuration whose binary `VCDEV_BENCH_BINS`
//!   (`NAME=PATH;NAME=PATH`) sets: another build of vcdev, interleaved with this one.
//!
//! Instructions per request (`VCDEV_BENCH_CALLGRIND=DIR`, valgrind installed): instead of the
//! timed table, each of vcdev (`vcdev sync buffered`) and `vub_blk` (`vub buffered`) runs under
//! `valgrind --tool=callgrind --separate-threads=yes`, twice per workload, with `N1` and `N2`
//! requests after a warm-up (`VCDEV_BENCH_REQUESTS=N1,N2`, default `2000,10000`;
//! `VCDEV_BENCH_WARMUP_REQUESTS`, 500), then SIGTERM. The difference of the two runs' Ir over
//! `N2 - N1` is a request's cost without start-up and shutdown, deterministic where wall-clock
//! time on a shared machine is not; per thread too (the busiest is the queue's). Workloads:
//! `VCDEV_BENCH_WORKLOADS` (names, comma-separated, one-queue ones; default the 4K ones);
//! configurations: `VCDEV_BENCH_CONFIGS`, `VCDEV_BENCH_SPECS`, `VCDEV_BENCH_BINS` as above; more valgrind
//! options: `VCDEV_BENCH_VALGRIND_ARGS`. The table goes to stdout and `DIR/callgrind.md`, the
//! callgrind files stay in `DIR` for `callgrind_annotate` (see BENCHMARKS.md). Only user-space
//! instructions count: system calls are the kernel's.
//!
//! Alternating slices (`VCDEV_BENCH_ALTERNATE=MS`): instead of the timed table, every
//! configuration's backend runs at once, each on a disk of its own, and the frontend moves from
//! one to the next every `MS` milliseconds, `VCDEV_BENCH_ROUNDS` (60) rounds per one-queue
//! workload, the order reversed every other round; a ratio then compares slices a fraction of a
//! second apart. `VCDEV_BENCH_PIN=F,B` puts this process on CPU F and every backend on CPU B:
//! unpinned, where the scheduler happens to put one backend's queue thread biases that backend
//! for its whole life by up to 10% on this 2-vCPU machine (two instances of one build differ
//! that much), which only many fresh instances average out. Table: `alternate.md`.
//!
//! Without `--bench` in its arguments (`cargo test --benches`) it exits at once.

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::frontend::{Harness, DATA_GPA, META_GPA, S_OK};
use common::peers::{qsd_available, Peer, Spawn};
use common::vcdev::vcdev_bin;
use common::{median, LoopDev, TIMEOUT};
use plotters::prelude::*;
use vcdev_device_model::testing::{BlkRequest, R, W};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

/// Queue entries (three descriptors per request).
const QUEUE_SIZE: u16 = 256;
/// Request headers of the slots, 64 bytes apart (status byte at +16), in one metadata page.
const HDR_BASE: u64 = META_GPA + 0x30_0000 + 63 * 0x1000;
/// The data buffer of slot 0; slot `k`'s is `k` blocks further (32 x 128 KiB fit).
const DATA_BASE: u64 = DATA_GPA + 16 * 0x1000;
/// The vcdev device name in the SPECs.
const DEVICE: &str = "d0";
/// Sector size of the virtio-blk header.
const SECTOR: u64 = 512;

// ---------------------------------------------------------------------------
// Configurations, disks, workloads

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Vcdev,
    Qsd,
    Vub,
    /// `O_DIRECT` pread from this process: the device's own latency.
    Raw,
}

#[derive(Clone, Debug)]
struct Config {
    name: String,
    engine: Engine,
    /// Whether the backend bypasses the page cache (`O_DIRECT`); picks the reference.
    direct: bool,
    /// vcdev: the `--device` SPEC; qsd: the `--blockdev` options (node-name added); vub: its
    /// arguments, space-separated. `@DISK@` and `@DRIVER@` are filled per disk.
    spec: String,
    /// vcdev: the binary, when not this build's (`VCDEV_BENCH_BINS`).
    bin: Option<PathBuf>,
}

fn config(name: &str, engine: Engine, direct: bool, spec: &str) -> Config {
    Config {
        name: name.to_owned(),
        engine,
        direct,
        spec: spec.to_owned(),
        bin: None,
    }
}

/// Every configuration, in table order.
fn configs() -> Vec<Config> {
    let vcdev = |aio: &str, direct: &str| {
        format!("blk,name={DEVICE},path=@DISK@,queue-size=256,aio={aio},direct={direct}")
    };
    let mut all = vec![
        config("raw pread", Engine::Raw, true, ""),
        config(
            "vcdev (default)",
            Engine::Vcdev,
            false,
            &format!("blk,name={DEVICE},path=@DISK@,queue-size=256"),
        ),
        config(
            "vcdev io_uring direct",
            Engine::Vcdev,
            true,
            &vcdev("io_uring", "on"),
        ),
        config(
            "vcdev io_uring buffered",
            Engine::Vcdev,
            false,
            &vcdev("io_uring", "off"),
        ),
        config(
            "vcdev sync direct",
            Engine::Vcdev,
            true,
            &vcdev("sync", "on"),
        ),
        config(
            "vcdev sync buffered",
            Engine::Vcdev,
            false,
            &vcdev("sync", "off"),
        ),
        config(
            "qsd direct",
            Engine::Qsd,
            true,
            "driver=@DRIVER@,filename=@DISK@,cache.direct=on,aio=io_uring",
        ),
        config(
            "qsd buffered",
            Engine::Qsd,
            false,
            "driver=@DRIVER@,filename=@DISK@,cache.direct=off,aio=io_uring",
        ),
        config("vub buffered", Engine::Vub, false, "path=@DISK@ direct=off"),
        config("vub direct", Engine::Vub, true, "path=@DISK@ direct=on"),
    ];
    if let Ok(specs) = std::env::var("VCDEV_BENCH_SPECS") {
        for item in specs.split(';').filter(|s| !s.trim().is_empty()) {
            let (name, spec) = item
                .split_once('=')
                .unwrap_or_else(|| panic!("VCDEV_BENCH_SPECS: {item}: expected NAME=SPEC"));
            let name = name.trim();
            match all.iter_mut().find(|c| c.name == name) {
                Some(c) => c.spec = spec.to_owned(),
                None => all.push(config(
                    name,
                    Engine::Vcdev,
                    spec.contains("direct=on"),
                    spec,
                )),
            }
        }
    }
    if let Ok(bins) = std::env::var("VCDEV_BENCH_BINS") {
        for item in bins.split(';').filter(|s| !s.trim().is_empty()) {
            let (name, bin) = item
                .split_once('=')
                .unwrap_or_else(|| panic!("VCDEV_BENCH_BINS: {item}: expected NAME=PATH"));
            let c = all
                .iter_mut()
                .find(|c| c.name == name.trim() && c.engine == Engine::Vcdev)
                .unwrap_or_else(|| panic!("VCDEV_BENCH_BINS: {name}: no such vcdev configuration"));
            c.bin = Some(PathBuf::from(bin.trim()));
        }
    }
    if let Ok(keep) = std::env::var("VCDEV_BENCH_CONFIGS") {
        all.retain(|c| keep.split(',').any(|k| k.trim() == c.name));
    }
    all
}

/// A disk the backends share, removed (and detached) on drop.
struct Disk {
    name: &'static str,
    /// What the backends open: the tmpfs file, or `/dev/loopN`.
    path: PathBuf,
    /// qemu-storage-daemon's driver for `path`.
    driver: &'static str,
    len: u64,
    /// Dropped first: the loop device, then its file.
    _loop: Option<LoopDev>,
    _file: RemoveOnDrop,
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `len` bytes of non-zero data to a new file at `path` (holes would read with no I/O).
fn fill_file(path: &Path, len: u64) -> RemoveOnDrop {
    let guard = RemoveOnDrop(path.to_path_buf());
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .collect();
    let mut done = 0;
    while done < len {
        f.write_all(&chunk).expect("fill the disk file");
        done += chunk.len() as u64;
    }
    f.sync_all().expect("fsync the disk file");
    guard
}

fn env_mib(default: u64) -> u64 {
    std::env::var("VCDEV_BENCH_DISK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        << 20
}

/// The tmpfs disk; `tag` tells apart the disks of one process (one per backend when they run
/// side by side).
fn tmpfs_disk(tag: &str) -> Disk {
    let path = PathBuf::from(format!(
        "/dev/shm/vcdev-bench-{}{tag}.img",
        std::process::id()
    ));
    let len = env_mib(256);
    let file = fill_file(&path, len);
    Disk {
        name: "tmpfs",
        path,
        driver: "file",
        len,
        _loop: None,
        _file: file,
    }
}

/// The loop disk, or why it is skipped; `tag` as for [`tmpfs_disk`].
fn loop_disk(tag: &str) -> Result<Disk, String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: losetup needs root".to_owned());
    }
    let dir = PathBuf::from(std::env::var("VCDEV_BENCH_LOOP_DIR").unwrap_or("/var/tmp".into()));
    let backing = dir.join(format!("vcdev-bench-{}{tag}.img", std::process::id()));
    let len = env_mib(1024);
    let file = fill_file(&backing, len);
    let dev = LoopDev::attach(&backing)?;
    Ok(Disk {
        name: "loop",
        path: dev.path().to_path_buf(),
        driver: "host_device",
        len,
        _loop: Some(dev),
        _file: file,
    })
}

impl Disk {
    /// Drops the disk's cached pages (a fresh start for buffered backends).
    fn drop_cache(&self) {
        if let Ok(f) = File::open(&self.path) {
            // SAFETY: fadvise only reads its scalar arguments; `f` is open for the call.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }

    fn fill(&self, spec: &str) -> String {
        spec.replace("@DISK@", &self.path.display().to_string())
            .replace("@DRIVER@", self.driver)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Workload {
    name: &'static str,
    /// Percent of the requests that write (the others read).
    writes: u32,
    seq: bool,
    block: u64,
    /// Requests in flight, over all queues.
    qd: usize,
    /// Queues the requests go round (slot `i` on queue `i % queues`).
    queues: usize,
}

const WORKLOADS: [Workload; 7] = [
    Workload {
        name: "randread 4K QD1",
        writes: 0,
        seq: false,
        block: 4096,
        qd: 1,
        queues: 1,
    },
    Workload {
        name: "randread 4K QD32",
        writes: 0,
        seq: false,
        block: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "randwrite 4K QD1",
        writes: 100,
        seq: false,
        block: 4096,
        qd: 1,
        queues: 1,
    },
    Workload {
        name: "randwrite 4K QD32",
        writes: 100,
        seq: false,
        block: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "randread 4K QD32 2 queues",
        writes: 0,
        seq: false,
        block: 4096,
        qd: 32,
        queues: 2,
    },
    Workload {
        name: "randrw 70/30 4K QD32",
        writes: 30,
        seq: false,
        block: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "seqread 128K QD8",
        writes: 0,
        seq: true,
        block: 128 << 10,
        qd: 8,
        queues: 1,
    },
];

/// Index of the workload whose latency distribution is plotted.
const QD1_READ: usize = 0;

// ---------------------------------------------------------------------------
// Measuring

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One phase of one run.
#[derive(Clone, Debug)]
struct Sample {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    /// Backend CPU time per request (None for the raw floor).
    cpu_us: Option<f64>,
    threads: Option<(u32, u32)>,
    /// Latencies (ns), kept for the QD1 randread plot.
    lat: Vec<u64>,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).map_or(0.0, |&v| v as f64 / 1e3)
}

/// utime + stime of `pid`, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let (user, sys) = common::stat_cpu_secs(pid);
    user + sys
}

/// (`Threads:` of /proc/PID/status, threads named `iou-*`).
fn threads(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let n = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let iou = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("iou-"))
                })
                .count()
        })
        .unwrap_or(0);
    (n, u32::try_from(iou).unwrap_or(u32::MAX))
}

/// When [`Driver::run`] stops offering requests (those in flight then complete).
#[derive(Clone, Copy, Debug)]
enum Until {
    /// Once this many seconds have passed.
    Secs(f64),
    /// Once this many requests have been offered.
    Requests(usize),
}

/// The frontend driving one backend: `qd` request slots on queue 0.
struct Driver {
    h: Harness,
    disk_len: u64,
}

impl Driver {
    fn data_gpa(slot: usize, block: u64) -> u64 {
        DATA_BASE + slot as u64 * block
    }

    fn hdr_gpa(slot: usize) -> u64 {
        HDR_BASE + slot as u64 * 64
    }

    fn new(h: Harness, disk_len: u64) -> Driver {
        for slot in 0..32 {
            let data = vec![slot as u8 ^ 0x5a; 4096];
            h.mem.write(Self::data_gpa(slot, 4096), &data);
        }
        Driver { h, disk_len }
    }

    fn offer(&mut self, slot: usize, wl: Workload, offset: u64, write: bool) {
        let data = Self::data_gpa(slot, wl.block);
        let hdr = Self::hdr_gpa(slot);
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let status = hdr + u64::from(BlkRequest::HEADER_LEN);
        BlkRequest::new(kind, offset / SECTOR).write(&self.h.mem, hdr, status);
        let flags = if write { R } else { W };
        let len = u32::try_from(wl.block).expect("block fits u32");
        let chain = BlkRequest::chain(hdr, &[(data, len, flags)], status);
        let (qi, head) = Self::place(slot, wl);
        let q = &mut self.h.queues[qi];
        q.ring.write_chain(&self.h.mem, head, &chain);
        q.offer(&self.h.mem, head);
    }

    /// The queue and head of request slot `slot`.
    fn place(slot: usize, wl: Workload) -> (usize, u16) {
        let head = u16::try_from(slot / wl.queues * 3).expect("slot fits the ring");
        (slot % wl.queues, head)
    }

    /// The slot of head `id` on queue `qi`.
    fn slot_of(qi: usize, id: u32, wl: Workload) -> usize {
        id as usize / 3 * wl.queues + qi
    }

    /// Kicks the first `n` queues.
    fn kick(&self, n: usize) {
        for q in &self.h.queues[..n] {
            q.kick.write(1).expect("kick");
        }
    }

    /// Waits for used elements on the first `n` queues: at least one, with every one ready
    /// then, as (queue, id, used length).
    fn wait_any(&mut self, n: usize, ready: &mut Vec<(usize, u32, u32)>) {
        let deadline = Instant::now() + TIMEOUT;
        for q in &self.h.queues[..n] {
            q.enable_calls(&self.h.mem);
        }
        loop {
            for (qi, q) in self.h.queues[..n].iter_mut().enumerate() {
                while let Some((id, len)) = q.wait_used(&self.h.mem, Duration::ZERO) {
                    ready.push((qi, id, len));
                }
            }
            if !ready.is_empty() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no request completed within {TIMEOUT:?}");
            let mut fds: Vec<libc::pollfd> = self.h.queues[..n]
                .iter()
                .map(|q| libc::pollfd {
                    fd: q.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let ms = libc::c_int::try_from(left.as_millis().min(100)).unwrap_or(100);
            let nfds = libc::nfds_t::try_from(fds.len()).expect("a few queues");
            // SAFETY: `fds` is a valid array of `nfds` pollfds for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
            for q in &self.h.queues[..n] {
                let _ = q.call.read();
            }
        }
    }

    /// Runs `wl` until `until`; returns the latencies (ns) and the elapsed time.
    fn run(
        &mut self,
        wl: Workload,
        until: Until,
        rng: &mut Rng,
        seq: &mut u64,
    ) -> (Vec<u64>, Duration) {
        let blocks = self.disk_len / wl.block;
        let mut pick = || {
            let b = if wl.seq {
                *seq = (*seq + 1) % blocks;
                *seq
            } else {
                rng.next() % blocks
            };
            let write = match wl.writes {
                0 => false,
                100.. => true,
                pct => rng.next() % 100 < u64::from(pct),
            };
            (b * wl.block, write)
        };
        let mut started = vec![Instant::now(); wl.qd];
        // Whether each slot's request writes.
        let mut writing = vec![false; wl.qd];
        let mut lat = Vec::new();
        let t0 = Instant::now();
        let (deadline, limit) = match until {
            Until::Secs(secs) => (Some(t0 + Duration::from_secs_f64(secs)), usize::MAX),
            Until::Requests(n) => (None, n),
        };
        let mut issued = 0;
        for (slot, s) in started.iter_mut().enumerate().take(limit) {
            *s = Instant::now();
            let (off, write) = pick();
            writing[slot] = write;
            self.offer(slot, wl, off, write);
            issued += 1;
        }
        if issued > 0 {
            self.kick(wl.queues);
        }
        let mut in_flight = issued;
        let mut ready = Vec::with_capacity(wl.qd);
        while in_flight > 0 {
            ready.clear();
            self.wait_any(wl.queues, &mut ready);
            let now = Instant::now();
            let in_time = deadline.is_none_or(|d| now < d);
            let mut again = false;
            for &(qi, id, used) in &ready {
                let slot = Self::slot_of(qi, id, wl);
                let st = self.h.mem.read(Self::hdr_gpa(slot) + 16, 1)[0];
                assert_eq!(st, S_OK, "request status");
                let want = if writing[slot] { 1 } else { wl.block + 1 };
                assert_eq!(u64::from(used), want, "used length");
                lat.push(now.duration_since(started[slot]).as_nanos() as u64);
                if in_time && issued < limit {
                    started[slot] = Instant::now();
                    let (off, write) = pick();
                    writing[slot] = write;
                    self.offer(slot, wl, off, write);
                    issued += 1;
                    again = true;
                } else {
                    in_flight -= 1;
                }
            }
            if again {
                self.kick(wl.queues);
            }
        }
        (lat, t0.elapsed())
    }

    fn phase(&mut self, wl: Workload, pid: u32, secs: f64, warmup: f64, seed: u64) -> Sample {
        let mut rng = Rng(seed | 1);
        let mut seq = 0;
        self.run(wl, Until::Secs(warmup), &mut rng, &mut seq);
        let cpu0 = cpu_secs(pid);
        let (mut lat, took) = self.run(wl, Until::Secs(secs), &mut rng, &mut seq);
        let cpu = cpu_secs(pid) - cpu0;
        let th = threads(pid);
        lat.sort_unstable();
        Sample {
            iops: lat.len() as f64 / took.as_secs_f64(),
            p50_us: pct(&lat, 0.50),
            p99_us: pct(&lat, 0.99),
            cpu_us: Some(cpu * 1e6 / lat.len().max(1) as f64),
            threads: Some(th),
            lat,
        }
    }
}

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation");
        Aligned { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// The device floor: 4 KiB O_DIRECT preads at random aligned offsets, one at a time.
fn raw_floor(disk: &Disk, secs: f64, warmup: f64, seed: u64) -> Result<Sample, String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&disk.path)
        .map_err(|e| format!("O_DIRECT open of {}: {e}", disk.path.display()))?;
    let mut buf = Aligned::new(4096);
    let mut rng = Rng(seed | 1);
    let blocks = disk.len / 4096;
    let mut go = |secs: f64| {
        let mut lat = Vec::new();
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(secs);
        while Instant::now() < deadline {
            let off = rng.next() % blocks * 4096;
            let t = Instant::now();
            f.read_exact_at(buf.as_mut(), off).expect("pread");
            lat.push(t.elapsed().as_nanos() as u64);
        }
        (lat, t0.elapsed())
    };
    go(warmup);
    let (mut lat, took) = go(secs);
    lat.sort_unstable();
    Ok(Sample {
        iops: lat.len() as f64 / took.as_secs_f64(),
        p50_us: pct(&lat, 0.50),
        p99_us: pct(&lat, 0.99),
        cpu_us: None,
        threads: None,
        lat,
    })
}

/// Starts `cfg`'s backend on `disk`.
fn start(cfg: &Config, disk: &Disk, queues: usize) -> Result<Spawn, String> {
    let mut spec = disk.fill(&cfg.spec);
    let tag = "bench";
    let r = match cfg.engine {
        Engine::Vcdev => {
            if queues > 1 {
                spec.push_str(&format!(",queues={queues}"));
            }
            match &cfg.bin {
                Some(bin) => Peer::vcdev_of(bin, tag, &spec, DEVICE),
                None => Peer::vcdev(tag, &spec, DEVICE),
            }
        }
        Engine::Qsd => Peer::qsd_queues(tag, &spec, true, queues),
        Engine::Vub => {
            let n = format!("queues={queues}");
            let mut args: Vec<&str> = spec.split_whitespace().collect();
            args.push(&n);
            Peer::vub_blk(tag, &args)
        }
        Engine::Raw => unreachable!("the raw floor has no backend"),
    };
    r.map_err(|e| e.to_string())
}

/// All phases of one configuration on one disk: Ok(samples per workload) or why it was skipped.
fn run_config(
    cfg: &Config,
    disk: &Disk,
    secs: f64,
    warmup: f64,
    seed: u64,
) -> Result<Vec<Option<Sample>>, String> {
    let keep = selected_workloads();
    disk.drop_cache();
    if cfg.engine == Engine::Raw {
        let s = raw_floor(disk, secs, warmup, seed)?;
        let mut v = vec![None; WORKLOADS.len()];
        v[QD1_READ] = Some(s);
        return Ok(v);
    }
    if cfg.engine == Engine::Qsd && !qsd_available() {
        return Err(format!("{} is not installed", common::peers::QSD_BIN));
    }
    let mut out = vec![None; WORKLOADS.len()];
    // One backend for the one-queue workloads, another with more queues for theirs: a
    // one-queue phase never runs beside idle queues it does not use.
    let mut counts: Vec<usize> = WORKLOADS.iter().map(|w| w.queues).collect();
    counts.sort_unstable();
    counts.dedup();
    for queues in counts {
        let todo: Vec<usize> = (0..WORKLOADS.len())
            .filter(|&i| keep[i] && WORKLOADS[i].queues == queues)
            .collect();
        if todo.is_empty() {
            continue;
        }
        disk.drop_cache();
        let mut peer = match start(cfg, disk, queues)? {
            Spawn::Up(p) => p,
            Spawn::Refused(why) => return Err(format!("SPEC refused (exit 2): {why}")),
        };
        let pid = peer.pid();
        let h = Harness::start(peer.socket(), queues, QUEUE_SIZE);
        let mut d = Driver::new(h, disk.len);
        for i in todo {
            out[i] = Some(d.phase(WORKLOADS[i], pid, secs, warmup, seed ^ i as u64));
        }
        drop(d);
        drop(peer);
    }
    Ok(out)
}

/// Which of [`WORKLOADS`] the timed runs measure (`VCDEV_BENCH_WORKLOADS`, default all).
fn selected_workloads() -> Vec<bool> {
    let keep = std::env::var("VCDEV_BENCH_WORKLOADS").ok();
    let v: Vec<bool> = WORKLOADS
        .iter()
        .map(|w| {
            keep.as_deref()
                .is_none_or(|k| k.split(',').any(|k| k.trim() == w.name))
        })
        .collect();
    assert!(v.contains(&true), "VCDEV_BENCH_WORKLOADS selects nothing");
    v
}

// ---------------------------------------------------------------------------
// Reporting

/// Medians of one (disk, config, workload) over the runs.
struct Row {
    iops: f64,
    lo: f64,
    hi: f64,
    p50: f64,
    p99: f64,
    cpu: Option<f64>,
    threads: Option<(u32, u32)>,
}

fn summarise(samples: &[Sample]) -> Option<Row> {
    if samples.is_empty() {
        return None;
    }
    let m = |f: fn(&Sample) -> f64| median(&mut samples.iter().map(f).collect::<Vec<_>>());
    let iops: Vec<f64> = samples.iter().map(|s| s.iops).collect();
    let cpu = samples[0]
        .cpu_us
        .map(|_| m(|s| s.cpu_us.unwrap_or(f64::NAN)));
    // Thread counts: the largest seen (io_uring workers come and go).
    let threads = samples
        .iter()
        .filter_map(|s| s.threads)
        .max_by_key(|t| (t.0, t.1));
    let (lo, hi) = common::span(&iops);
    Some(Row {
        iops: m(|s| s.iops),
        lo,
        hi,
        p50: m(|s| s.p50_us),
        p99: m(|s| s.p99_us),
        cpu,
        threads,
    })
}

type Key = (usize, usize, usize); // (disk, config, workload)

fn fmt_int(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The median over runs of `samples[a]`'s IOPS / `samples[b]`'s in the same run (the runs of
/// every configuration are interleaved, so run k of both saw the same machine).
fn paired_ratio(samples: &BTreeMap<Key, Vec<Sample>>, a: Key, b: Key) -> Option<f64> {
    let (a, b) = (samples.get(&a)?, samples.get(&b)?);
    let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x.iops / y.iops).collect();
    (!r.is_empty()).then(|| median(&mut r))
}

fn table(
    disks: &[Disk],
    cfgs: &[Config],
    rows: &BTreeMap<Key, Row>,
    samples: &BTreeMap<Key, Vec<Sample>>,
    runs: usize,
) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "Medians over {runs} run(s); IOPS range = min-max over runs; x qsd, x vub = IOPS / qemu-storage-daemon's (`vub_blk`'s) with the same cache mode (direct or buffered; vcdev's default is buffered) on the same disk and workload, in the same run, median over runs; CPU = backend utime+stime per request; threads = most seen at the end of a phase (io_uring workers among them).\n\n",
    ));
    t.push_str("| disk | workload | configuration | IOPS | IOPS range | x qsd | x vub | p50 us | p99 us | CPU us/req | threads (iou) |\n");
    t.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (di, disk) in disks.iter().enumerate() {
        for (wi, wl) in WORKLOADS.iter().enumerate() {
            let ratio = |ci: usize, peer: Engine, direct: bool| {
                let pi = cfgs
                    .iter()
                    .position(|c| c.engine == peer && c.direct == direct)?;
                paired_ratio(samples, (di, ci, wi), (di, pi, wi))
            };
            for (ci, cfg) in cfgs.iter().enumerate() {
                let Some(r) = rows.get(&(di, ci, wi)) else {
                    continue;
                };
                let [x, xv] = [Engine::Qsd, Engine::Vub].map(|peer| match cfg.engine {
                    Engine::Raw => "-".to_owned(),
                    _ => ratio(ci, peer, cfg.direct).map_or("-".to_owned(), |x| format!("{x:.2}")),
                });
                let cpu = r.cpu.map_or("-".to_owned(), |c| format!("{c:.1}"));
                let th = r
                    .threads
                    .map_or("-".to_owned(), |(n, i)| format!("{n} ({i})"));
                t.push_str(&format!(
                    "| {} | {} | {} | {} | {}-{} | {x} | {xv} | {:.1} | {:.1} | {cpu} | {th} |\n",
                    disk.name,
                    wl.name,
                    cfg.name,
                    fmt_int(r.iops),
                    fmt_int(r.lo),
                    fmt_int(r.hi),
                    r.p50,
                    r.p99,
                ));
            }
        }
    }
    t
}

fn plot_iops(
    out: &Path,
    disk: &Disk,
    di: usize,
    cfgs: &[Config],
    rows: &BTreeMap<Key, Row>,
) -> Result<(), Box<dyn std::error::Error>> {
    let path = out.join(format!("iops-{}.svg", disk.name));
    let root = SVGBackend::new(&path, (900, 1200)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "IOPS per configuration, {} disk (median over runs)",
            disk.name
        ),
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((WORKLOADS.len(), 1));
    for (wi, (wl, area)) in WORKLOADS.iter().zip(panels.iter()).enumerate() {
        let bars: Vec<(usize, &Config, f64)> = cfgs
            .iter()
            .enumerate()
            .filter(|(_, c)| c.engine != Engine::Raw)
            .filter_map(|(ci, c)| rows.get(&(di, ci, wi)).map(|r| (ci, c, r.iops)))
            .collect();
        if bars.is_empty() {
            continue;
        }
        let max = bars.iter().map(|b| b.2).fold(1.0, f64::max) * 1.15;
        let n = u32::try_from(bars.len()).unwrap_or(u32::MAX);
        let names: Vec<String> = bars.iter().map(|b| b.1.name.clone()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(wl.name, ("sans-serif", 15))
            .margin(5)
            .x_label_area_size(25)
            .y_label_area_size(170)
            .build_cartesian_2d(0.0..max, (0u32..n.saturating_sub(1)).into_segmented())?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    names.get(*i as usize).cloned().unwrap_or_default()
                }
                SegmentValue::Last => String::new(),
            })
            .x_label_formatter(&|v| format!("{:.0}k", v / 1e3))
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (ci, _, iops))| {
            let i = u32::try_from(i).unwrap_or(0);
            let color = Palette99::pick(*ci).filled();
            let mut r = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (*iops, SegmentValue::Exact(i + 1)),
                ],
                color,
            );
            r.set_margin(3, 3, 0, 0);
            r
        }))?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, _, iops))| {
            let i = u32::try_from(i).unwrap_or(0);
            Text::new(
                fmt_int(*iops),
                (*iops, SegmentValue::CenterOf(i)),
                ("sans-serif", 11),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}

/// (latency us, percent of requests at or under it) points of a CDF.
type Curve = Vec<(f64, f64)>;

fn plot_cdf(
    out: &Path,
    disks: &[Disk],
    cfgs: &[Config],
    lats: &BTreeMap<(usize, usize), Vec<u64>>,
) -> Result<(), Box<dyn std::error::Error>> {
    let path = out.join("qd1-randread-cdf.svg");
    let root = SVGBackend::new(&path, (900, 400 * disks.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((disks.len(), 1));
    for (di, (disk, area)) in disks.iter().zip(panels.iter()).enumerate() {
        let lines: Vec<(usize, &Config, Curve)> = cfgs
            .iter()
            .enumerate()
            .filter_map(|(ci, c)| {
                let l = lats.get(&(di, ci))?;
                if l.is_empty() {
                    return None;
                }
                let pts = (0..=400)
                    .map(|k| {
                        let p = f64::from(k) / 400.0;
                        (pct(l, p.min(0.9999)), p * 100.0)
                    })
                    .collect();
                Some((ci, c, pts))
            })
            .collect();
        if lines.is_empty() {
            continue;
        }
        let lo = lines
            .iter()
            .flat_map(|l| l.2.iter().map(|p| p.0))
            .fold(f64::INFINITY, f64::min)
            .max(0.1);
        let hi = lines
            .iter()
            .flat_map(|l| l.2.iter().map(|p| p.0))
            .fold(0.0, f64::max)
            .max(lo * 2.0);
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "4 KiB randread QD1 latency CDF, {} disk (all runs)",
                    disk.name
                ),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..100.0)?;
        chart
            .configure_mesh()
            .x_desc("latency (us, log scale)")
            .y_desc("% of requests")
            .draw()?;
        for (ci, c, pts) in lines {
            let color = Palette99::pick(ci);
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(c.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Instructions per request under callgrind (`VCDEV_BENCH_CALLGRIND`)

/// The instructions (callgrind's `Ir`) of each thread of the run whose output file is `out`
/// (`--separate-threads=yes` writes `out-01`, `out-02`, ...), by callgrind's thread number.
fn callgrind_threads(out: &Path) -> BTreeMap<u32, u64> {
    let dir = out.parent().expect("the output file has a directory");
    let prefix = format!(
        "{}-",
        out.file_name().expect("a file name").to_string_lossy()
    );
    let mut by_thread = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read the callgrind directory") {
        let e = e.expect("a directory entry");
        if !e.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).expect("read a callgrind file");
        let (mut thread, mut ir) = (None, None);
        for l in text.lines() {
            if let Some(v) = l.strip_prefix("thread: ") {
                thread = v.trim().parse::<u32>().ok();
            } else if let Some(v) = l.strip_prefix("summary: ") {
                ir = v
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok());
            }
        }
        if let (Some(t), Some(ir)) = (thread, ir) {
            by_thread.insert(t, ir);
        }
    }
    by_thread
}

/// `cfg`'s backend under `valgrind --tool=callgrind --separate-threads=yes`: `warm` requests of
/// `wl`, then `n` more, then SIGTERM (callgrind writes its files as the process exits). Returns
/// the output file's path (`DIR/CONFIG.WORKLOAD.N.out-TT`, one per thread) and each thread's Ir.
fn callgrind_run(
    cfg: &Config,
    disk: &Disk,
    wl: Workload,
    warm: usize,
    n: usize,
    dir: &Path,
) -> (PathBuf, BTreeMap<u32, u64>) {
    let slug = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    let out = dir.join(format!("{}.{}.{n}.out", slug(&cfg.name), slug(wl.name)));
    let prefix = format!(
        "{}-",
        out.file_name().expect("a file name").to_string_lossy()
    );
    for e in std::fs::read_dir(dir).expect("read the callgrind directory") {
        let e = e.expect("a directory entry");
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::remove_file(e.path()).expect("remove an old callgrind file");
        }
    }
    let mut wrap: Vec<String> = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        "--quiet",
    ]
    .map(str::to_owned)
    .into();
    wrap.push(format!("--callgrind-out-file={}", out.display()));
    if let Ok(more) = std::env::var("VCDEV_BENCH_VALGRIND_ARGS") {
        wrap.extend(more.split_whitespace().map(str::to_owned));
    }
    let spec = disk.fill(&cfg.spec);
    let spawn = match cfg.engine {
        Engine::Vcdev => {
            let bin = cfg.bin.clone().unwrap_or_else(vcdev_bin);
            Peer::vcdev_under(&wrap, &bin, "callgrind", &spec, DEVICE)
        }
        Engine::Vub => {
            let args: Vec<&str> = spec.split_whitespace().collect();
            Peer::vub_blk_under(&wrap, "callgrind", &args)
        }
        Engine::Qsd | Engine::Raw => panic!("{}: callgrind runs vcdev and vub_blk only", cfg.name),
    };
    let peer = spawn.expect("start the backend under valgrind").expect_up();
    let h = Harness::start(peer.socket(), 1, QUEUE_SIZE);
    let mut d = Driver::new(h, disk.len);
    let (mut rng, mut seq) = (Rng(0x9e37_79b9_7f4a_7c15), 0);
    d.run(wl, Until::Requests(warm), &mut rng, &mut seq);
    let (lat, _) = d.run(wl, Until::Requests(n), &mut rng, &mut seq);
    assert_eq!(lat.len(), n, "every request completed");
    drop(d);
    let fin = peer
        .daemon
        .stop(Duration::from_secs(300))
        .expect("stop the backend");
    let threads = callgrind_threads(&out);
    assert!(
        !threads.is_empty(),
        "{}: no callgrind output ({}*); stderr:\n{}",
        cfg.name,
        out.display(),
        fin.stderr
    );
    (out, threads)
}

/// `VCDEV_BENCH_CALLGRIND=DIR`: instructions per request of each backend, deterministic where
/// wall-clock time is not. For each workload and configuration, the backend runs twice under
/// callgrind, with `N1` and `N2` measured requests (`VCDEV_BENCH_REQUESTS=N1,N2`, default
/// `2000,10000`) after `VCDEV_BENCH_WARMUP_REQUESTS` (500); the difference of the two runs'
/// Ir over `N2 - N1` is the cost of a request without start-up, connection and shutdown. Per
/// thread too: the thread whose Ir grew most is the one serving the queue. Configurations:
/// `VCDEV_BENCH_CONFIGS` (default `vcdev sync buffered,vub buffered`, both the sync engine on
/// the tmpfs file), workloads `VCDEV_BENCH_WORKLOADS` (comma-separated names, default the
/// four 4K ones). The table goes to stdout and `DIR/callgrind.md`; the callgrind files stay in
/// `DIR` for `callgrind_annotate`.
fn callgrind_main(dir: PathBuf) {
    std::fs::create_dir_all(&dir).expect("create the callgrind directory");
    let dir = dir.canonicalize().expect("canonical callgrind directory");
    let counts: Vec<usize> = std::env::var("VCDEV_BENCH_REQUESTS")
        .unwrap_or_else(|_| "2000,10000".to_owned())
        .split(',')
        .map(|v| v.trim().parse().expect("VCDEV_BENCH_REQUESTS: N1,N2"))
        .collect();
    let [n1, n2] = counts[..] else {
        panic!("VCDEV_BENCH_REQUESTS: N1,N2")
    };
    assert!(n1 < n2, "VCDEV_BENCH_REQUESTS: N1 < N2");
    let warm = common::env_or::<f64>("VCDEV_BENCH_WARMUP_REQUESTS", 500.0) as usize;
    let mut cfgs = configs();
    if std::env::var_os("VCDEV_BENCH_CONFIGS").is_none() {
        cfgs.retain(|c| c.name == "vcdev sync buffered" || c.name == "vub buffered");
    }
    // One queue: the daemon under valgrind serves one.
    let wls: Vec<Workload> = match std::env::var("VCDEV_BENCH_WORKLOADS") {
        Ok(keep) => WORKLOADS
            .iter()
            .filter(|w| w.queues == 1 && keep.split(',').any(|k| k.trim() == w.name))
            .copied()
            .collect(),
        Err(_) => WORKLOADS
            .iter()
            .filter(|w| w.queues == 1 && w.block == 4096)
            .copied()
            .collect(),
    };
    assert!(!cfgs.is_empty() && !wls.is_empty(), "nothing to measure");
    let disk = tmpfs_disk("");
    let mut report = format!(
        "Instructions (callgrind Ir) per request: (Ir after {n2} requests - Ir after {n1}) / {}, \
         after {warm} warm-up requests; file {} ({} MiB)\n\n\
         | workload | backend | Ir/request, daemon | Ir/request, busiest thread | other threads |\n\
         |---|---|---|---|---|\n",
        n2 - n1,
        disk.path.display(),
        disk.len >> 20
    );
    for wl in &wls {
        for cfg in &cfgs {
            let (_, a) = callgrind_run(cfg, &disk, *wl, warm, n1, &dir);
            let (out, b) = callgrind_run(cfg, &disk, *wl, warm, n2, &dir);
            let per = |t: &u32| {
                let (x, y) = (a.get(t).copied().unwrap_or(0), b[t]);
                (y as f64 - x as f64) / (n2 - n1) as f64
            };
            let all: f64 = b.keys().map(per).sum();
            let busiest = *b
                .keys()
                .max_by(|x, y| per(x).total_cmp(&per(y)))
                .expect("a thread");
            let others: Vec<String> = b
                .keys()
                .filter(|t| **t != busiest)
                .map(|t| format!("{t}: {:.0}", per(t)))
                .collect();
            let line = format!(
                "| {} | {} | {all:.0} | {:.0} (thread {busiest}, {}-{busiest:02}) | {} |\n",
                wl.name,
                cfg.name,
                per(&busiest),
                out.display(),
                others.join(", ")
            );
            eprint!("{line}");
            report.push_str(&line);
        }
    }
    println!();
    print!("{report}");
    std::fs::write(dir.join("callgrind.md"), &report).expect("write callgrind.md");
}

// ---------------------------------------------------------------------------

/// Voluntary context switches (sleeps) of every thread of `pid` so far.
fn sleeps(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// One backend of an alternating run: its own disk, its process and the frontend driving it.
struct Side {
    cfg: Config,
    pid: u32,
    d: Driver,
    rng: Rng,
    seq: u64,
    /// Per slice: (requests, seconds, backend user and system CPU seconds, backend sleeps).
    slices: Vec<(usize, f64, (f64, f64), u64)>,
    _peer: Peer,
    _disk: Disk,
}

/// `VCDEV_BENCH_ALTERNATE=MS`: the configurations side by side, each on a disk of its own, and
/// the frontend going from one to the next every `MS` milliseconds, `VCDEV_BENCH_ROUNDS` (60)
/// times per workload, the order reversed every other round. A slice of one sees the machine as
/// the slices of the others around it did, so the per-round ratio's spread is that of the
/// slice's own noise, not that of the machine from one phase to the next (the round-robin runs
/// put seconds between the two phases of a pair). With `VCDEV_BENCH_PIN`, no backend is favoured
/// by where the scheduler put its queue thread (see the module doc). The idle backends wait for
/// a kick meanwhile.
/// One-queue workloads; disks and configurations as for the timed runs (`raw pread` left
/// out). Reports, per workload and configuration: IOPS over all its slices, the ratio of those
/// to `vub_blk`'s and qemu-storage-daemon's (same cache mode), the median per-round ratio and
/// in how many rounds it was ahead, and backend CPU per request. The table goes to stdout and
/// `alternate.md` in the results directory.
fn alternate_main(slice: f64, warmup: f64, out: &Path) {
    let rounds = common::env_or::<f64>("VCDEV_BENCH_ROUNDS", 60.0).max(1.0) as usize;
    let cfgs: Vec<Config> = configs()
        .into_iter()
        .filter(|c| c.engine != Engine::Raw)
        .collect();
    assert!(
        cfgs.len() >= 2,
        "VCDEV_BENCH_ALTERNATE needs two configurations or more"
    );
    let keep = selected_workloads();
    let wls: Vec<Workload> = WORKLOADS
        .iter()
        .zip(&keep)
        .filter(|(w, k)| **k && w.queues == 1)
        .map(|(w, _)| *w)
        .collect();
    assert!(
        !wls.is_empty(),
        "VCDEV_BENCH_WORKLOADS selects no one-queue workload"
    );
    let want = std::env::var("VCDEV_BENCH_DISKS").unwrap_or_else(|_| "tmpfs".to_owned());
    let mut report = format!(
        "Alternating slices of {:.0} ms, {rounds} rounds per workload (order reversed every \
         other round), each backend on a disk of its own; IOPS = requests / seconds over all of \
         a configuration's slices; x vub, x qsd = that / the peer's with the same cache mode \
         (total), then the median of the per-round ratios and the rounds ahead; CPU = backend \
         utime+stime (user + system) per request over all slices; sleeps = the backend threads' voluntary \
         context switches per 1,000 requests.\n\n\
         | disk | workload | configuration | IOPS | x vub (total / median, ahead) | x qsd (total / median, ahead) | CPU us/req (user + sys) | sleeps /1k req |\n\
         |---|---|---|---|---|---|---|---|\n",
        slice * 1e3
    );
    // `VCDEV_BENCH_PIN=F,B`: this process on CPU F, every backend on CPU B.
    let pin = common::cpu_pair("VCDEV_BENCH_PIN");
    if let Some((front, backend)) = pin {
        common::pin(true, std::process::id(), front);
        report.insert_str(
            0,
            &format!("Pinned: frontend on CPU {front}, backends on CPU {backend}. "),
        );
    }
    let t_all = Instant::now();
    for disk_name in want.split(',').map(str::trim) {
        for wl in &wls {
            let mut sides = Vec::new();
            for (ci, cfg) in cfgs.iter().enumerate() {
                let tag = format!("-{ci}");
                let disk = match disk_name {
                    "tmpfs" => tmpfs_disk(&tag),
                    "loop" => match loop_disk(&tag) {
                        Ok(d) => d,
                        Err(why) => {
                            eprintln!("storage: loop disk skipped: {why}");
                            break;
                        }
                    },
                    other => panic!("VCDEV_BENCH_DISKS: unknown disk {other}"),
                };
                if cfg.engine == Engine::Qsd && !qsd_available() {
                    eprintln!(
                        "storage: skipping {}: qemu-storage-daemon is not installed",
                        cfg.name
                    );
                    continue;
                }
                let mut peer = match start(cfg, &disk, 1) {
                    Ok(Spawn::Up(p)) => p,
                    Ok(Spawn::Refused(why)) => {
                        eprintln!("storage: skipping {}: SPEC refused: {why}", cfg.name);
                        continue;
                    }
                    Err(e) => panic!("start {}: {e}", cfg.name),
                };
                let pid = peer.pid();
                let h = Harness::start(peer.socket(), 1, QUEUE_SIZE);
                let mut side = Side {
                    cfg: cfg.clone(),
                    pid,
                    d: Driver::new(h, disk.len),
                    rng: Rng(0x9e37_79b9_7f4a_7c15),
                    seq: 0,
                    slices: Vec::with_capacity(rounds),
                    _peer: peer,
                    _disk: disk,
                };
                let (rng, seq) = (&mut side.rng, &mut side.seq);
                side.d.run(*wl, Until::Secs(warmup), rng, seq);
                if let Some((_, backend)) = pin {
                    // Every thread the backend has by now (its queue's among them).
                    common::pin(true, side.pid, backend);
                }
                sides.push(side);
            }
            if sides.len() < 2 {
                continue;
            }
            for round in 0..rounds {
                for i in common::round_order(round, sides.len()) {
                    let s = &mut sides[i];
                    let (cpu0, sleeps0) = (common::stat_cpu_secs(s.pid), sleeps(s.pid));
                    let (lat, took) = s.d.run(*wl, Until::Secs(slice), &mut s.rng, &mut s.seq);
                    let cpu1 = common::stat_cpu_secs(s.pid);
                    let cpu = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
                    let slept = sleeps(s.pid) - sleeps0;
                    s.slices.push((lat.len(), took.as_secs_f64(), cpu, slept));
                }
            }
            let iops = |s: &Side, k: usize| s.slices[k].0 as f64 / s.slices[k].1;
            let total = |s: &Side| {
                let (n, t) = s
                    .slices
                    .iter()
                    .fold((0, 0.0), |a, x| (a.0 + x.0, a.1 + x.1));
                n as f64 / t
            };
            let mut line = Vec::new();
            for s in &sides {
                let versus = |peer: Engine| {
                    let Some(p) = sides
                        .iter()
                        .find(|p| p.cfg.engine == peer && p.cfg.direct == s.cfg.direct)
                    else {
                        return "-".to_owned();
                    };
                    let per_round = |x: &Side| (0..rounds).map(|k| iops(x, k)).collect::<Vec<_>>();
                    common::versus(total(s), total(p), &per_round(s), &per_round(p))
                };
                let (n, user, sys, slept) = s.slices.iter().fold((0, 0.0, 0.0, 0), |a, x| {
                    (a.0 + x.0, a.1 + x.2 .0, a.2 + x.2 .1, a.3 + x.3)
                });
                let per_req = |v: f64| v * 1e6 / n.max(1) as f64;
                report.push_str(&format!(
                    "| {disk_name} | {} | {} | {} | {} | {} | {:.2} ({:.2} + {:.2}) | {:.1} |\n",
                    wl.name,
                    s.cfg.name,
                    fmt_int(total(s)),
                    versus(Engine::Vub),
                    versus(Engine::Qsd),
                    per_req(user + sys),
                    per_req(user),
                    per_req(sys),
                    slept as f64 * 1e3 / n.max(1) as f64
                ));
                line.push(format!("{} {:.0}", s.cfg.name, total(s)));
            }
            eprintln!("alternate {disk_name} {}: {}", wl.name, line.join(", "));
        }
    }
    report.push_str(&format!(
        "\nWall time: {:.0} s.\n",
        t_all.elapsed().as_secs_f64()
    ));
    println!();
    print!("{report}");
    std::fs::write(out.join("alternate.md"), &report).expect("write alternate.md");
    println!("storage: table in {}", out.display());
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("storage: a benchmark; run it with `cargo bench -p vcdev-tests --bench storage`");
        return;
    }
    if let Some(dir) = std::env::var_os("VCDEV_BENCH_CALLGRIND") {
        callgrind_main(PathBuf::from(dir));
        return;
    }
    let quick = std::env::var_os("VCDEV_BENCH_QUICK").is_some_and(|v| v == "1");
    let secs = common::env_or::<f64>("VCDEV_BENCH_SECS", if quick { 0.5 } else { 2.0 });
    let warmup = common::env_or::<f64>("VCDEV_BENCH_WARMUP_SECS", if quick { 0.1 } else { 0.25 });
    let runs = common::env_or::<f64>("VCDEV_BENCH_RUNS", 5.0).max(1.0) as usize;
    let out = std::env::var_os("VCDEV_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join("tests/benches/results"));
    std::fs::create_dir_all(&out).expect("create the results directory");
    if let Ok(ms) = std::env::var("VCDEV_BENCH_ALTERNATE") {
        let ms: f64 = ms.parse().expect("VCDEV_BENCH_ALTERNATE: milliseconds");
        alternate_main(ms / 1e3, warmup, &out);
        return;
    }
    let cfgs = configs();
    assert!(!cfgs.is_empty(), "VCDEV_BENCH_CONFIGS selects nothing");

    let mut notes = Vec::new();
    let want = std::env::var("VCDEV_BENCH_DISKS").unwrap_or_else(|_| "tmpfs,loop".to_owned());
    let wants = |name: &str| want.split(',').any(|d| d.trim() == name);
    let mut disks = Vec::new();
    if wants("tmpfs") {
        disks.push(tmpfs_disk(""));
    }
    if wants("loop") {
        match loop_disk("") {
            Ok(d) => disks.push(d),
            Err(why) => notes.push(format!("loop disk skipped: {why}")),
        }
    }
    assert!(!disks.is_empty(), "VCDEV_BENCH_DISKS selects nothing");
    for n in &notes {
        eprintln!("storage: {n}");
    }
    println!(
        "storage: {} configuration(s) x {} disk(s), {runs} run(s), {secs} s per phase after {warmup} s warm-up; disks: {}",
        cfgs.len(),
        disks.len(),
        disks
            .iter()
            .map(|d| format!("{} {} ({} MiB)", d.name, d.path.display(), d.len >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("storage: qemu-storage-daemon's export runs in an iothread of its own (--object iothread,id=io0, iothread=io0 on the export).");

    let mut samples: BTreeMap<Key, Vec<Sample>> = BTreeMap::new();
    let mut skipped: BTreeMap<(usize, usize), String> = BTreeMap::new();
    let t_all = Instant::now();
    for run in 0..runs {
        for (di, disk) in disks.iter().enumerate() {
            for (ci, cfg) in cfgs.iter().enumerate() {
                if skipped.contains_key(&(di, ci)) {
                    continue;
                }
                let t = Instant::now();
                let seed = 0x9e37_79b9_7f4a_7c15 ^ ((run as u64) << 8) ^ di as u64;
                match run_config(cfg, disk, secs, warmup, seed) {
                    Ok(v) => {
                        let line: Vec<String> = v
                            .iter()
                            .zip(WORKLOADS.iter())
                            .filter_map(|(s, wl)| {
                                s.as_ref().map(|s| format!("{} {:.0}", wl.name, s.iops))
                            })
                            .collect();
                        eprintln!(
                            "run {}/{runs} {} {:<24} {:.1} s: {}",
                            run + 1,
                            disk.name,
                            cfg.name,
                            t.elapsed().as_secs_f64(),
                            line.join(", ")
                        );
                        for (wi, s) in v.into_iter().enumerate() {
                            if let Some(s) = s {
                                samples.entry((di, ci, wi)).or_default().push(s);
                            }
                        }
                    }
                    Err(why) => {
                        eprintln!("storage: skipping {} on {}: {why}", cfg.name, disk.name);
                        skipped.insert((di, ci), why);
                    }
                }
            }
        }
    }
    let rows: BTreeMap<Key, Row> = samples
        .iter()
        .filter_map(|(k, v)| summarise(v).map(|r| (*k, r)))
        .collect();
    let mut lats: BTreeMap<(usize, usize), Vec<u64>> = BTreeMap::new();
    for ((di, ci, wi), v) in &samples {
        if *wi == QD1_READ {
            let l = lats.entry((*di, *ci)).or_default();
            for s in v {
                l.extend_from_slice(&s.lat);
            }
            l.sort_unstable();
        }
    }

    let mut report = table(&disks, &cfgs, &rows, &samples, runs);
    report.push('\n');
    if skipped.is_empty() && notes.is_empty() {
        report.push_str("Nothing skipped.\n");
    } else {
        report.push_str("Skipped:\n\n");
        for n in &notes {
            report.push_str(&format!("- {n}\n"));
        }
        for ((di, ci), why) in &skipped {
            report.push_str(&format!(
                "- {} on {}: {why}\n",
                cfgs[*ci].name, disks[*di].name
            ));
        }
    }
    report.push_str(&format!(
        "\nWall time: {:.0} s ({runs} run(s), {secs} s phases, {warmup} s warm-up).\n",
        t_all.elapsed().as_secs_f64()
    ));
    println!();
    print!("{report}");
    std::fs::write(out.join("storage.md"), &report).expect("write storage.md");
    for (di, disk) in disks.iter().enumerate() {
        if let Err(e) = plot_iops(&out, disk, di, &cfgs, &rows) {
            eprintln!("storage: IOPS plot of {}: {e}", disk.name);
        }
    }
    if let Err(e) = plot_cdf(&out, &disks, &cfgs, &lats) {
        eprintln!("storage: CDF plot: {e}");
    }
    println!("storage: table and plots in {}", out.display());
}
