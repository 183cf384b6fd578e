//! The device model's request path, in process: `AsyncQueue::poll` on batches of 4 KiB
//! requests over a RAM disk with the sync engine, plain guest memory, holds that cost nothing.
//! What it measures is the queue's own work per request (pop, walk, parse, translate, hold,
//! submit, complete, used ring), without wake-ups or system calls; criterion reports the time
//! per request. It is the benchmark of `AsyncQueue::begin`'s allocations (none once warm: the
//! test `a_warm_queue_allocates_nothing_per_request`).
//!
//! `cargo bench -p vcdev-device-model --features testing --bench async_queue`
//!
//! On a busy machine wall-clock times swing; `VCDEV_BENCH_ITERS=N` instead runs each case
//! (`VCDEV_BENCH_CASE=read4k/32`, default all) exactly N times without criterion, for an
//! instruction count that does not: `valgrind --tool=callgrind` on the bench binary, with two
//! values of N, gives the instructions (and the `malloc` calls) per request as the difference.

use std::hint::black_box;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use vcdev_device_model::blk::aio::{Aio, Engine};
use vcdev_device_model::blk::{AsyncQueue, BlkConfig, FaultPolicy};
use vcdev_device_model::testing::{ram_blk, BlkRequest, FreeHold, FreeHolds, SplitRing, R, W};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 256;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x2_0000;
const USED: u64 = 0x3_0000;
const HDRS: u64 = 0x4_0000;
const DATA: u64 = 0x10_0000;
const BLOCK: u32 = 4096;
const DISK: u64 = 64 << 20;

/// A queue with `depth` requests of `kind` laid out once (3 descriptors each).
struct Setup {
    mem: FreeHolds,
    aq: AsyncQueue<FreeHold>,
    queue: Queue,
    ring: SplitRing,
    heads: Vec<u16>,
    used: u16,
}

impl Setup {
    fn new(kind: u32, depth: u16) -> Self {
        let mem = FreeHolds(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).expect("memory"),
        );
        let cfg = BlkConfig {
            queue_size: QSIZE,
            ..BlkConfig::default()
        };
        let dev = ram_blk(DISK, cfg);
        let aq: AsyncQueue<FreeHold> = AsyncQueue::new(
            dev.clone(),
            Engine::new(Aio::Sync, dev.backend().clone(), dev.queue_size()),
        );
        let mut queue = Queue::new(QSIZE).expect("queue");
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        let ring = SplitRing::new(QSIZE, DESC, AVAIL, USED);
        let mut heads = Vec::new();
        for i in 0..depth {
            let hdr = HDRS + 64 * u64::from(i);
            let data = DATA + u64::from(BLOCK) * u64::from(i);
            BlkRequest::new(kind, 8 * u64::from(i)).write(&mem, hdr, hdr + 16);
            let flags = if kind == VIRTIO_BLK_T_IN { W } else { R };
            let head = 3 * i;
            ring.write_chain(
                &mem,
                head,
                &BlkRequest::chain(hdr, &[(data, BLOCK, flags)], hdr + 16),
            );
            heads.push(head);
        }
        Setup {
            mem,
            aq,
            queue,
            ring,
            heads,
            used: 0,
        }
    }

    /// Offers every request, polls until all are used.
    fn round(&mut self) {
        for &h in &self.heads {
            self.ring.offer(&self.mem, h);
        }
        self.used = self.used.wrapping_add(self.heads.len() as u16);
        loop {
            let out = self
                .aq
                .poll(&mut self.queue, &self.mem, &mut |_| FaultPolicy::Fail)
                .expect("poll");
            black_box(out);
            let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
            if idx == self.used {
                break;
            }
        }
    }

    fn finish(mut self) {
        let _ = self.aq.drain(&mut self.queue, &self.mem);
    }
}

const CASES: [(&str, u32, u16); 4] = [
    ("read4k", VIRTIO_BLK_T_IN, 1),
    ("write4k", VIRTIO_BLK_T_OUT, 1),
    ("read4k", VIRTIO_BLK_T_IN, 32),
    ("write4k", VIRTIO_BLK_T_OUT, 32),
];

fn requests(c: &mut Criterion) {
    for (name, kind, depth) in CASES {
        let mut s = Setup::new(kind, depth);
        let mut group = c.benchmark_group("async_queue");
        group.throughput(Throughput::Elements(u64::from(depth)));
        group.bench_function(BenchmarkId::new(name, depth), |b| b.iter(|| s.round()));
        group.finish();
        s.finish();
    }
}

/// `VCDEV_BENCH_ITERS` rounds of each case, no timing (see the module doc).
fn fixed(iters: u64) {
    let only = std::env::var("VCDEV_BENCH_CASE").ok();
    for (name, kind, depth) in CASES {
        let case = format!("{name}/{depth}");
        if only.as_ref().is_some_and(|o| *o != case) {
            continue;
        }
        let mut s = Setup::new(kind, depth);
        for _ in 0..iters {
            s.round();
        }
        s.finish();
        println!("{case}: {iters} rounds of {depth} requests");
    }
}

criterion_group!(benches, requests);

fn main() {
    if let Some(n) = std::env::var("VCDEV_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        fixed(n);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
