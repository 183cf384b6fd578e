//! Per-lookup translation cost, side by side in one run: our front cache
//! and `translate()`, our back store alone, vm-memory 0.18's `Iotlb` behind
//! an `RwLock` (as its docs suggest), and a plain `BTreeMap`.
//!
//! `cargo bench -p vcdev-iommu --bench translate`
//!
//! Every mapping is one 4 KiB page (as QEMU's IOTLB updates are), at
//! consecutive IOVAs, pointing to scattered pages of one memory object. Patterns: `seq` walks the pages in order, `rand` in a
//! fixed pseudo-random order; `hot` cycles over 32 pages (fits the 64-entry
//! front cache), `all` over every mapping. With 1M mappings only `rand/all`
//! runs. Each iteration does `BATCH`
//! lookups of a 4 KiB buffer; criterion reports time per lookup.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Arc, RwLock};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vcdev_iommu::{AddressSpace, Extent, MemObject, Permissions};
use vm_memory::{GuestAddress, Iotlb};

const PAGE: u64 = 4096;
const BASE: u64 = 1 << 32;
const BATCH: usize = 1024;

fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

struct Setup {
    space: Arc<AddressSpace>,
    iotlb: RwLock<Iotlb>,
    btree: BTreeMap<u64, (u64, usize)>,
}

fn setup(n: u64, mem: &Arc<MemObject>) -> Setup {
    let space = AddressSpace::new();
    let mut iotlb = Iotlb::new();
    let mut btree = BTreeMap::new();
    let pages = mem.len() as u64 / PAGE;
    space
        .edit(|t| {
            for i in 0..n {
                // Scattered targets, so that no structure can merge
                // neighbouring pages into one entry (rangemap would).
                let off = ((i * 7919) % pages) * PAGE;
                let iova = BASE + i * PAGE;
                t.insert(Extent::new(
                    iova,
                    iova + PAGE - 1,
                    Permissions::ReadWrite,
                    mem.clone(),
                    off,
                ));
                iotlb
                    .set_mapping(
                        GuestAddress(iova),
                        GuestAddress(off),
                        PAGE as usize,
                        Permissions::ReadWrite,
                    )
                    .unwrap();
                btree.insert(
                    iova,
                    (iova + PAGE - 1, mem.host_base() as usize + off as usize),
                );
            }
            Ok::<_, ()>(())
        })
        .unwrap();
    Setup {
        space,
        iotlb: RwLock::new(iotlb),
        btree,
    }
}

/// The IOVAs of one batch for a pattern.
fn addresses(n: u64, pattern: &str, hot: bool) -> Vec<u64> {
    let span = if hot { n.min(32) } else { n };
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    (0..BATCH as u64)
        .map(|k| {
            let i = match pattern {
                "seq" => k % span,
                _ => xorshift(&mut seed) % span,
            };
            BASE + i * PAGE
        })
        .collect()
}

fn lookups(c: &mut Criterion) {
    let mem = Arc::new(MemObject::anonymous(64 << 20).unwrap());
    for &n in &[64u64, 1024, 65536, 1 << 20] {
        let s = setup(n, &mem);
        for pattern in ["seq", "rand"] {
            for hot in [true, false] {
                // 1M mappings: only the random walk over all of them, to
                // show how lookups grow beyond 64k.
                if n > 65536 && (pattern == "seq" || hot) {
                    continue;
                }
                let name = format!("{}/{}/{}", n, pattern, if hot { "hot" } else { "all" });
                let addrs = addresses(n, pattern, hot);
                let mut g = c.benchmark_group("lookup");
                g.throughput(Throughput::Elements(BATCH as u64));

                let mut reader = s.space.reader();
                g.bench_with_input(
                    BenchmarkId::new("vcdev_translate", &name),
                    &addrs,
                    |b, addrs| {
                        let sess = reader.enter();
                        b.iter(|| {
                            for &a in addrs {
                                let v = sess.translate(a, PAGE, Permissions::Read).unwrap();
                                black_box(v[0].ptr);
                            }
                        })
                    },
                );
                g.bench_with_input(
                    BenchmarkId::new("vcdev_back_store", &name),
                    &addrs,
                    |b, addrs| {
                        s.space.with_tree(|t| {
                            b.iter(|| {
                                for &a in addrs {
                                    black_box(t.find(a).unwrap().start);
                                }
                            })
                        })
                    },
                );
                g.bench_with_input(
                    BenchmarkId::new("vm_memory_iotlb_rwlock", &name),
                    &addrs,
                    |b, addrs| {
                        b.iter(|| {
                            for &a in addrs {
                                let guard = s.iotlb.read().unwrap();
                                let mut it = Iotlb::lookup(
                                    guard,
                                    GuestAddress(a),
                                    PAGE as usize,
                                    Permissions::Read,
                                )
                                .unwrap();
                                black_box(it.next().unwrap().base);
                            }
                        })
                    },
                );
                g.bench_with_input(BenchmarkId::new("btreemap", &name), &addrs, |b, addrs| {
                    b.iter(|| {
                        for &a in addrs {
                            let (_, &(last, host)) = s.btree.range(..=a).next_back().unwrap();
                            assert!(a + PAGE - 1 <= last);
                            black_box(host);
                        }
                    })
                });
                g.finish();
            }
        }
    }
}

fn front_cache_probe(c: &mut Criterion) {
    let mem = Arc::new(MemObject::anonymous(1 << 20).unwrap());
    let s = setup(1024, &mem);
    let addrs = addresses(1024, "seq", true);
    let mut reader = s.space.reader();
    let mut g = c.benchmark_group("hit");
    g.throughput(Throughput::Elements(BATCH as u64));
    {
        let sess = reader.enter();
        for &a in &addrs {
            sess.translate(a, PAGE, Permissions::Read).unwrap();
        }
        g.bench_function("front_cache_probe", |b| {
            b.iter(|| {
                for &a in &addrs {
                    black_box(sess.probe(black_box(a), PAGE, Permissions::Read).unwrap());
                }
            })
        });
        g.bench_function("translate_4k", |b| {
            b.iter(|| {
                for &a in &addrs {
                    black_box(
                        sess.translate(black_box(a), PAGE, Permissions::Read)
                            .unwrap()[0]
                            .ptr,
                    );
                }
            })
        });
    }
    g.bench_function("session_enter_exit", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                black_box(reader.enter());
            }
        })
    });
    g.finish();
}

/// What holds cost. Reader side, per request: `hold_release` alone (one
/// range, and three), and a whole request (session, translate hit, hold,
/// session end, release offline) next to the same request without a hold.
/// Writer side: an unmap (update + invalidate of one page) with N holds
/// outstanding that overlap nothing, and an edit removing two far-apart
/// pages with N holds between them (the hull overlaps them, the extents
/// don't: the exact check runs).
fn holds(c: &mut Criterion) {
    let mem = Arc::new(MemObject::anonymous(64 << 20).unwrap());
    let n = 4096u64;
    let s = setup(n, &mem);
    let addrs = addresses(n, "seq", true);
    let mut g = c.benchmark_group("hold");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut reader = s.space.reader();
    {
        let sess = reader.enter();
        let one = [(BASE, BASE + PAGE - 1)];
        let three = [
            (BASE, BASE + 511),
            (BASE + 8 * PAGE, BASE + 9 * PAGE - 1),
            (BASE + 20 * PAGE, BASE + 20 * PAGE),
        ];
        g.bench_function("hold_release_1_range", |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    sess.release(sess.hold(black_box(&one)));
                }
            })
        });
        g.bench_function("hold_release_3_ranges", |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    sess.release(sess.hold(black_box(&three)));
                }
            })
        });
    }
    g.bench_function("request_without_hold", |b| {
        b.iter(|| {
            for &a in &addrs {
                let sess = reader.enter();
                black_box(sess.translate(a, PAGE, Permissions::Write).unwrap()[0].ptr);
            }
        })
    });
    g.bench_function("request_with_hold", |b| {
        b.iter(|| {
            for &a in &addrs {
                let id = {
                    let sess = reader.enter();
                    black_box(sess.translate(a, PAGE, Permissions::Write).unwrap()[0].ptr);
                    sess.hold(&[(a, a + PAGE - 1)])
                };
                reader.release(id);
            }
        })
    });
    g.finish();

    let last = BASE + (n - 1) * PAGE;
    // The benches map these two pages and unmap them again.
    s.space.iotlb_invalidate(BASE, PAGE);
    s.space.iotlb_invalidate(last, PAGE);
    let mut g = c.benchmark_group("unmap_overlapping_no_hold");
    g.measurement_time(std::time::Duration::from_secs(3));
    for holds in [0u64, 64, 1024] {
        // Holds on four readers, one page each, on pages 2..; the unmaps
        // below touch page 0 (and the last page), never a held one.
        let mut readers: Vec<_> = (0..4).map(|_| s.space.reader()).collect();
        let mut ids = Vec::new();
        for k in 0..holds {
            let r = &mut readers[(k % 4) as usize];
            let iova = BASE + (2 + k % (n - 4)) * PAGE;
            ids.push((k % 4, r.enter().hold(&[(iova, iova + PAGE - 1)])));
        }
        g.bench_with_input(BenchmarkId::new("update_invalidate", holds), &(), |b, _| {
            b.iter(|| {
                s.space
                    .iotlb_update(BASE, PAGE, &mem, 0, Permissions::ReadWrite)
                    .unwrap();
                s.space.iotlb_invalidate(BASE, PAGE);
            })
        });
        g.bench_with_input(
            BenchmarkId::new("two_far_pages_holds_between", holds),
            &(),
            |b, _| {
                b.iter(|| {
                    s.space
                        .iotlb_update(BASE, PAGE, &mem, 0, Permissions::ReadWrite)
                        .unwrap();
                    s.space
                        .iotlb_update(last, PAGE, &mem, 0, Permissions::ReadWrite)
                        .unwrap();
                    s.space
                        .edit(|t| {
                            t.remove(BASE);
                            t.remove(last);
                            Ok::<_, ()>(())
                        })
                        .unwrap();
                })
            },
        );
        assert_eq!(s.space.hold_waits().edits, 0);
        for (r, id) in ids {
            readers[r as usize].release(id);
        }
    }
    g.finish();
}

criterion_group!(benches, front_cache_probe, lookups, holds);
criterion_main!(benches);
