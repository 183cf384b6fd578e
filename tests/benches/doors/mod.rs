//! Issue 12: queue polling and the cdev door, in one table with the
//! vhost-user door (the second table of the e2e bench, kept apart from the
//! IOMMU table above it).
//!
//! Every configuration is one release-built `vcdev serve` with the same
//! 64 MiB RAM disk (`queue-size=256`), driven by this process with 4 KiB
//! random reads and writes at queue depth 1 and 32, the request slots laid
//! out as in the IOMMU table:
//!
//! - `vu-none`: the vhost-user door, no IOMMU (the base of the ratios);
//! - `vu-none-poll50`: the same with `poll-us=50`;
//! - `cdev-static`: the cdev door: the userspace virtio-blk driver of
//!   `tests/common/cdev.rs` binds the device to an iommufd, maps its two
//!   sealed memfds once (IOAS_MAP_FILE), rings an ioeventfd doorbell and
//!   waits on its MSI-X eventfd; it acks the same features as the
//!   vhost-user harness (EVENT_IDX among them);
//! - `cdev-static-poll50`: the same with `poll-us=50`;
//! - `cdev-map`: the cdev door with a map and an unmap per request: each
//!   request's 4 KiB data buffer is IOAS_MAP_FILEd before it is offered and
//!   IOAS_UNMAPped once it is used (rings and headers mapped once).
//!
//! Configurations are interleaved within each run; the table shows medians
//! over runs, and ratios computed within each run before the median. The
//! driver rings the doorbell only when the device asks for it (`avail_event`
//! under EVENT_IDX, else the used ring's NO_NOTIFY flag), as Linux's
//! virtio_ring does: a polling worker turns the kicks off. CPU:
//! the daemon's threads' run time (`/proc/PID/task/*/schedstat`, the
//! utime+stime of `/proc/PID/stat` at ns resolution) and the driving thread's
//! (`getrusage(RUSAGE_THREAD)`) over the measured phase, per request.
//!
//! `VCDEV_E2E_DOORS`: comma-separated subset of the names above, or `off`
//! to skip this table; `VCDEV_E2E_MODES=doors` runs this table alone, and
//! with `VCDEV_E2E_ALTERNATE=N` in alternating slices ([`alternate`]).
//! Under `VCDEV_E2E_PIN=F,D` the daemons run on CPU D, as in the IOMMU table.
//! `VCDEV_E2E_REQUESTS`, `VCDEV_E2E_WARMUP` and `VCDEV_E2E_RUNS` as for the
//! IOMMU table.

use std::time::{Duration, Instant};

use crate::common::cdev::{BlkDriver, StartExt, StartOpts};
use crate::common::frontend::{DriverQueue, GuestMem, Harness, S_OK};
use crate::common::vcdev::Vcdev;
use crate::common::{pin, process_cpu_us, TIMEOUT};
use vcdev_device_model::testing::{BlkRequest, R, W};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

// The request layout, disk, depths, generator and median of the e2e
// bench's vhost-user table: the rows of both tables are comparable.
use super::{median, AltRow, Op, Rng, BLOCK, DATA_BASE, DEPTHS, DISK, HDR_BASE, QUEUE_SIZE};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DoorKind {
    VhostUser,
    CdevStatic,
    CdevMap,
}

#[derive(Clone, Copy, Debug)]
struct Cfg {
    name: &'static str,
    label: &'static str,
    door: DoorKind,
    poll_us: u32,
}

const CONFIGS: [Cfg; 5] = [
    Cfg {
        name: "vu-none",
        label: "(v) vhost-user, no IOMMU, poll-us=0",
        door: DoorKind::VhostUser,
        poll_us: 0,
    },
    Cfg {
        name: "vu-none-poll50",
        label: "(p) vhost-user, no IOMMU, poll-us=50",
        door: DoorKind::VhostUser,
        poll_us: 50,
    },
    Cfg {
        name: "cdev-static",
        label: "(s) cdev, static IOAS, poll-us=0",
        door: DoorKind::CdevStatic,
        poll_us: 0,
    },
    Cfg {
        name: "cdev-static-poll50",
        label: "(sp) cdev, static IOAS, poll-us=50",
        door: DoorKind::CdevStatic,
        poll_us: 50,
    },
    Cfg {
        name: "cdev-map",
        label: "(m) cdev, map+unmap/req, poll-us=0",
        door: DoorKind::CdevMap,
        poll_us: 0,
    },
];

/// One measured phase.
#[derive(Clone, Debug, Default)]
struct Phase {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    /// Daemon CPU (utime+stime) per request, us.
    daemon_cpu_us: f64,
    /// The driving thread's CPU per request, us.
    front_cpu_us: f64,
    /// Doorbells rung per request.
    kicks: f64,
    /// Median IOAS_MAP_FILE / IOAS_UNMAP round trip (cdev-map), us.
    map_us: f64,
    unmap_us: f64,
}

/// This thread's user+system CPU, in us.
fn thread_cpu_us() -> f64 {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the call.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The frontend of one configuration.
enum Front {
    Vu(Box<Harness>),
    Cdev(Box<BlkDriver>),
}

impl Front {
    fn parts(&mut self) -> (&GuestMem, &mut DriverQueue) {
        match self {
            Front::Vu(h) => {
                let h = &mut **h;
                (&h.mem, &mut h.queues[0])
            }
            Front::Cdev(d) => {
                let d = &mut **d;
                (&d.mem, &mut d.q)
            }
        }
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    fn event_idx(&self) -> bool {
        let f = match self {
            Front::Vu(h) => h.features,
            Front::Cdev(d) => d.features,
        };
        f & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// Rings the doorbell for what was offered since the avail index was
    /// `old`, if the device asks for it (as Linux's virtio_ring does);
    /// returns whether it rang.
    fn kick(&mut self, old: u16) -> bool {
        let event_idx = self.event_idx();
        let (mem, q) = self.parts();
        if !q.ring.kick_wanted(mem, old, event_idx) {
            return false;
        }
        q.kick.write(1).expect("kick");
        true
    }

    fn dma(&self, gpa: u64) -> u64 {
        match self {
            Front::Vu(h) => h.dma_addr(gpa),
            // The driver's memory sits at IOVA == its address.
            Front::Cdev(_) => gpa,
        }
    }
}

struct Driver {
    front: Front,
    door: DoorKind,
    /// Doorbells rung.
    kicks: u64,
    maps: Vec<u64>,
    unmaps: Vec<u64>,
}

impl Driver {
    fn data_gpa(slot: usize) -> u64 {
        DATA_BASE + slot as u64 * BLOCK
    }

    fn hdr_gpa(slot: usize) -> u64 {
        HDR_BASE + slot as u64 * 64
    }

    fn start(cfg: Cfg, vcdev: &Vcdev) -> Driver {
        let front = match cfg.door {
            DoorKind::VhostUser => Front::Vu(Box::new(Harness::start(
                &vcdev.socket("vfio0"),
                1,
                QUEUE_SIZE,
            ))),
            DoorKind::CdevStatic | DoorKind::CdevMap => {
                let opts = StartOpts {
                    all_features: true,
                    map_data: cfg.door == DoorKind::CdevStatic,
                    ..StartOpts::default()
                };
                Front::Cdev(Box::new(BlkDriver::start_with(
                    vcdev, "vfio0", QUEUE_SIZE, opts,
                )))
            }
        };
        let mut d = Driver {
            front,
            door: cfg.door,
            kicks: 0,
            maps: Vec::new(),
            unmaps: Vec::new(),
        };
        let (mem, _) = d.front.parts();
        for slot in 0..32 {
            mem.write(
                Self::data_gpa(slot),
                &vec![slot as u8 ^ 0x5a; BLOCK as usize],
            );
        }
        d
    }

    fn offer(&mut self, slot: usize, op: Op, sector: u64) {
        let data = Self::data_gpa(slot);
        let hdr = Self::hdr_gpa(slot);
        if self.door == DoorKind::CdevMap {
            let Front::Cdev(drv) = &self.front else {
                unreachable!("cdev-map drives the cdev door")
            };
            let t = Instant::now();
            assert_eq!(drv.map_data(data, BLOCK), Ok(data), "IOAS_MAP_FILE");
            self.maps.push(t.elapsed().as_nanos() as u64);
        }
        let kind = match op {
            Op::Read => VIRTIO_BLK_T_IN,
            Op::Write => VIRTIO_BLK_T_OUT,
        };
        let status = hdr + u64::from(BlkRequest::HEADER_LEN);
        let data_flags = if op == Op::Read { W } else { R };
        let chain = BlkRequest::chain(
            self.front.dma(hdr),
            &[(self.front.dma(data), BLOCK as u32, data_flags)],
            self.front.dma(status),
        );
        let (mem, q) = self.front.parts();
        BlkRequest::new(kind, sector).write(mem, hdr, status);
        let head = (slot * 3) as u16;
        q.ring.write_chain(mem, head, &chain);
        q.offer(mem, head);
    }

    fn complete(&mut self, slot: usize, used_len: u32, op: Op) {
        let (mem, _) = self.front.parts();
        let st = mem.read(Self::hdr_gpa(slot) + 16, 1)[0];
        assert_eq!(st, S_OK, "request status");
        let want = if op == Op::Read { BLOCK as u32 + 1 } else { 1 };
        assert_eq!(used_len, want, "used length");
        if self.door == DoorKind::CdevMap {
            let Front::Cdev(drv) = &self.front else {
                unreachable!("cdev-map drives the cdev door")
            };
            let t = Instant::now();
            let n = drv
                .t
                .iommufd
                .ioas_unmap(drv.t.ioas, Self::data_gpa(slot), BLOCK);
            assert_eq!(n, Ok(BLOCK), "IOAS_UNMAP");
            self.unmaps.push(t.elapsed().as_nanos() as u64);
        }
    }

    /// `n` requests at depth `depth`: latencies (ns) and elapsed time.
    fn run(
        &mut self,
        op: Op,
        depth: usize,
        n: usize,
        mut sector: impl FnMut() -> u64,
    ) -> (Vec<u64>, Duration) {
        let depth = depth.min(n).max(1);
        let mut started = vec![Instant::now(); depth];
        let mut lat = Vec::with_capacity(n);
        let t0 = Instant::now();
        let mut submitted = 0;
        let old = self.front.parts().1.avail_idx();
        for (slot, s) in started.iter_mut().enumerate() {
            *s = Instant::now();
            self.offer(slot, op, sector());
            submitted += 1;
        }
        self.kicks += u64::from(self.front.kick(old));
        let mut done = 0;
        let mut ready = Vec::with_capacity(depth);
        while done < n {
            ready.clear();
            {
                let (mem, q) = self.front.parts();
                q.enable_calls(mem);
                ready.push(q.wait_used(mem, TIMEOUT).expect("request completes"));
                while let Some(e) = q.wait_used(mem, Duration::ZERO) {
                    ready.push(e);
                }
            }
            let mut resubmitted = false;
            let old = self.front.parts().1.avail_idx();
            for &(id, len) in &ready {
                let slot = id as usize / 3;
                self.complete(slot, len, op);
                lat.push(started[slot].elapsed().as_nanos() as u64);
                done += 1;
                if submitted < n {
                    started[slot] = Instant::now();
                    self.offer(slot, op, sector());
                    submitted += 1;
                    resubmitted = true;
                }
            }
            if resubmitted {
                self.kicks += u64::from(self.front.kick(old));
            }
        }
        (lat, t0.elapsed())
    }

    fn prefill(&mut self) {
        let mut next = 0u64;
        self.run(Op::Write, 32, (DISK / BLOCK) as usize, || {
            let s = next * (BLOCK / 512);
            next += 1;
            s
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn phase(
        &mut self,
        pid: u32,
        op: Op,
        depth: usize,
        warmup: usize,
        n: usize,
        rng: &mut Rng,
    ) -> Phase {
        let blocks = DISK / BLOCK;
        let mut pick = || (rng.next() % blocks) * (BLOCK / 512);
        self.run(op, depth, warmup, &mut pick);
        self.maps.clear();
        self.unmaps.clear();
        let k0 = self.kicks;
        let (d0, f0) = (process_cpu_us(pid), thread_cpu_us());
        let (mut lat, took) = self.run(op, depth, n, &mut pick);
        let (d1, f1) = (process_cpu_us(pid), thread_cpu_us());
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3;
        let med = |v: &mut Vec<u64>| {
            v.sort_unstable();
            v.get(v.len() / 2).map_or(0.0, |&x| x as f64 / 1e3)
        };
        Phase {
            iops: n as f64 / took.as_secs_f64(),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            daemon_cpu_us: (d1 - d0) / n as f64,
            front_cpu_us: (f1 - f0) / n as f64,
            kicks: (self.kicks - k0) as f64 / n as f64,
            map_us: med(&mut self.maps),
            unmap_us: med(&mut self.unmaps),
        }
    }
}

/// The phases of one configuration in one run.
type CfgRun = Vec<((Op, usize), Phase)>;

/// The daemon of `cfg`, on the daemons' CPU under `VCDEV_E2E_PIN` (else it
/// would inherit the frontend's), and its pid.
fn spawn(cfg: Cfg) -> (Vcdev, u32) {
    let mut spec = format!("blk,name=vfio0,ram=64M,queue-size={QUEUE_SIZE}");
    if cfg.poll_us != 0 {
        spec.push_str(&format!(",poll-us={}", cfg.poll_us));
    }
    let mut b = Vcdev::builder(&format!("e2e-{}", cfg.name))
        .device(&spec)
        .log_level("info");
    if cfg.door == DoorKind::VhostUser {
        b = b.wait_for_vhost_user("vfio0");
    }
    let mut vcdev = b.spawn();
    let pid = vcdev.daemon.proc().pid();
    if let Some((_, daemon_cpu)) = super::pinned() {
        pin(true, pid, daemon_cpu);
    }
    (vcdev, pid)
}

fn run_cfg(cfg: Cfg, warmup: usize, n: usize, seed: u64) -> CfgRun {
    let (vcdev, pid) = spawn(cfg);
    let mut d = Driver::start(cfg, &vcdev);
    d.prefill();
    let mut rng = Rng(seed | 1);
    let mut phases = Vec::new();
    for depth in DEPTHS {
        for op in [Op::Read, Op::Write] {
            phases.push(((op, depth), d.phase(pid, op, depth, warmup, n, &mut rng)));
        }
    }
    drop(d);
    let _ = vcdev.daemon.stop(TIMEOUT);
    phases
}

/// Whether this table runs (`VCDEV_E2E_DOORS` is not `off`).
pub fn wanted() -> bool {
    std::env::var("VCDEV_E2E_DOORS").map_or(true, |v| v.trim() != "off")
}

/// The configurations `VCDEV_E2E_DOORS` selects (all by default).
fn selected() -> Vec<Cfg> {
    let cfgs: Vec<Cfg> = match std::env::var("VCDEV_E2E_DOORS") {
        Ok(s) if s.trim() != "all" => CONFIGS
            .into_iter()
            .filter(|c| s.split(',').any(|w| w.trim() == c.name))
            .collect(),
        _ => CONFIGS.to_vec(),
    };
    assert!(!cfgs.is_empty(), "VCDEV_E2E_DOORS selects nothing");
    cfgs
}

/// `VCDEV_E2E_MODES=doors VCDEV_E2E_ALTERNATE=N`: the selected
/// configurations in alternating slices (the IOMMU table's
/// [`super::alternate`]), every daemon up at once.
pub fn alternate(per_depth: usize, warmup: usize, rounds: usize) -> Vec<AltRow> {
    alternate_cfgs(&selected(), per_depth, warmup, rounds)
}

/// The near twins of this table (the e2e bench's [`super::twins`]): the cdev
/// door with static mappings against the vhost-user door, in alternating
/// slices.
pub fn twins(per_depth: usize, warmup: usize, rounds: usize) -> Vec<AltRow> {
    let cfgs: Vec<Cfg> = ["vu-none", "cdev-static"]
        .into_iter()
        .filter_map(|name| CONFIGS.into_iter().find(|c| c.name == name))
        .collect();
    alternate_cfgs(&cfgs, per_depth, warmup, rounds)
}

fn alternate_cfgs(cfgs: &[Cfg], per_depth: usize, warmup: usize, rounds: usize) -> Vec<AltRow> {
    let mut sides: Vec<(Driver, Vcdev, Rng)> = cfgs
        .iter()
        .map(|&cfg| {
            let (vcdev, _) = spawn(cfg);
            let mut d = Driver::start(cfg, &vcdev);
            d.prefill();
            (d, vcdev, Rng(0x9e37_79b9_7f4a_7c15))
        })
        .collect();
    let labels: Vec<&str> = cfgs.iter().map(|c| c.label).collect();
    let blocks = DISK / BLOCK;
    super::alternate_table(&labels, per_depth, warmup, rounds, |i, op, depth, n| {
        let (d, _, rng) = &mut sides[i];
        d.run(op, depth, n, || (rng.next() % blocks) * (BLOCK / 512))
            .1
    })
}

/// Runs the table and prints it.
pub fn run(n: usize, warmup: usize, runs: usize) {
    let cfgs = selected();
    println!(
        "e2e doors (issue 12): {runs} run(s) x {} configuration(s), {n} requests per phase after {warmup} warm-up, 4 KiB, RAM disk 64 MiB",
        cfgs.len()
    );
    // results[cfg][run][phase]
    let mut results: Vec<Vec<CfgRun>> = cfgs.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for (i, &cfg) in cfgs.iter().enumerate() {
            let t = Instant::now();
            let r = run_cfg(cfg, warmup, n, 0x9e37_79b9_7f4a_7c15 ^ run as u64);
            eprintln!(
                "run {}/{runs} {:<18} {:.1} s: {}",
                run + 1,
                cfg.name,
                t.elapsed().as_secs_f64(),
                r.iter()
                    .map(|((op, qd), p)| format!(
                        "{}/qd{qd} {:.0} ({:.1} us)",
                        op.name(),
                        p.iops,
                        p.p50_us
                    ))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            results[i].push(r);
        }
    }
    let base = cfgs.iter().position(|c| c.name == "vu-none");
    println!();
    println!(
        "Medians over {runs} run(s). x (v): IOPS / (v)'s IOPS in the same run, median of the per-run ratios; p50 vs (v): 1 - p50 / (v)'s p50 in the same run (latency saved), median; CPU us/req: the daemon's utime+stime and the driving thread's (getrusage) over the phase / requests; map/unmap us: median IOAS_MAP_FILE / IOAS_UNMAP round trip as the driver sees it."
    );
    println!();
    println!("| workload | configuration | IOPS | IOPS range | x (v) | p50 us | p50 vs (v) | p99 us | daemon CPU us/req | frontend CPU us/req | kicks/req | map us | unmap us |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let nphases = results[0][0].len();
    for ph in 0..nphases {
        let (op, qd) = results[0][0][ph].0;
        for (i, cfg) in cfgs.iter().enumerate() {
            let ps: Vec<&Phase> = results[i].iter().map(|r| &r[ph].1).collect();
            let col =
                |f: fn(&Phase) -> f64| median(&mut ps.iter().map(|p| f(p)).collect::<Vec<_>>());
            let iops: Vec<f64> = ps.iter().map(|p| p.iops).collect();
            let (lo, hi) = crate::common::span(&iops);
            let (ratio, saved) = match base {
                Some(b) => {
                    let per_run = |f: &dyn Fn(&Phase, &Phase) -> f64| {
                        let mut v: Vec<f64> = results[i]
                            .iter()
                            .zip(&results[b])
                            .map(|(r, rb)| f(&r[ph].1, &rb[ph].1))
                            .collect();
                        median(&mut v)
                    };
                    (
                        format!("{:.3}", per_run(&|p, pb| p.iops / pb.iops)),
                        format!(
                            "{:+.0}%",
                            100.0 * per_run(&|p, pb| 1.0 - p.p50_us / pb.p50_us)
                        ),
                    )
                }
                None => ("-".into(), "-".into()),
            };
            let maps = if cfg.door == DoorKind::CdevMap {
                (
                    format!("{:.1}", col(|p| p.map_us)),
                    format!("{:.1}", col(|p| p.unmap_us)),
                )
            } else {
                ("-".into(), "-".into())
            };
            println!(
                "| {} QD{qd} | {} | {:.0} | {lo:.0}-{hi:.0} | {ratio} | {:.1} | {saved} | {:.1} | {:.2} | {:.2} | {:.2} | {} | {} |",
                op.name(),
                cfg.label,
                col(|p| p.iops),
                col(|p| p.p50_us),
                col(|p| p.p99_us),
                col(|p| p.daemon_cpu_us),
                col(|p| p.front_cpu_us),
                col(|p| p.kicks),
                maps.0,
                maps.1,
            );
        }
    }
}
