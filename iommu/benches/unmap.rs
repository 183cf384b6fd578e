//! Invalidation latency and map/unmap throughput (a bench binary: criterion
//! cannot report tail percentiles).
//!
//! `cargo bench -p vcdev-iommu --bench unmap`
//!
//! 1. `unmap()` latency, grace period included, with 0 and with 2 reader
//!    threads translating in sessions of 8 lookups: median, p90, p99, max
//!    over `ROUNDS` unmaps of one page among 1024 mappings.
//! 2. Throughput with 1M mappings: 1M single-page IOTLB updates, then 1M
//!    invalidations, one call each, and the resident memory per mapping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vcdev_iommu::{AddressSpace, MemObject, Permissions};

const PAGE: u64 = 4096;
const ROUNDS: usize = 20_000;
const MAPPINGS: u64 = 1024;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn latency(readers: usize) {
    let mem = Arc::new(MemObject::anonymous((MAPPINGS * PAGE) as usize).unwrap());
    let space = AddressSpace::new();
    for i in 0..MAPPINGS {
        space
            .iotlb_update(i * PAGE, PAGE, &mem, i * PAGE, Permissions::ReadWrite)
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..readers)
        .map(|t| {
            let mut r = space.reader();
            let stop = stop.clone();
            thread::spawn(move || {
                let mut n = t as u64 * 7;
                let mut sessions = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let s = r.enter();
                    for _ in 0..8 {
                        n = n.wrapping_mul(6364136223846793005).wrapping_add(1);
                        let iova = (n >> 33) % MAPPINGS * PAGE;
                        if let Ok(v) = s.translate(iova, 512, Permissions::Write) {
                            // SAFETY: 512 translated bytes; one byte written.
                            unsafe { std::ptr::write_volatile(v[0].ptr, 1) };
                        }
                    }
                    drop(s);
                    sessions += 1;
                }
                sessions
            })
        })
        .collect();
    // Let the readers get going.
    thread::sleep(Duration::from_millis(50));
    let mut lat = Vec::with_capacity(ROUNDS);
    for k in 0..ROUNDS {
        let iova = (k as u64 % MAPPINGS) * PAGE;
        let t = Instant::now();
        space.iotlb_invalidate(iova, PAGE);
        lat.push(t.elapsed());
        space
            .iotlb_update(iova, PAGE, &mem, iova, Permissions::ReadWrite)
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let sessions: u64 = threads.into_iter().map(|h| h.join().unwrap()).sum();
    lat.sort();
    println!(
        "unmap latency, {readers} reader threads, {ROUNDS} unmaps: median {:?}  p90 {:?}  p99 {:?}  max {:?}  (reader sessions: {sessions})",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat[lat.len() - 1],
    );
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * PAGE
}

fn throughput() {
    const N: u64 = 1 << 20;
    let mem = Arc::new(MemObject::anonymous(64 << 20).unwrap());
    let pages = mem.len() as u64 / PAGE;
    let space = AddressSpace::new();
    let rss0 = rss_bytes();
    let t = Instant::now();
    for i in 0..N {
        space
            .iotlb_update(
                i * PAGE,
                PAGE,
                &mem,
                (i % pages) * PAGE,
                Permissions::ReadWrite,
            )
            .unwrap();
    }
    let map_t = t.elapsed();
    let rss1 = rss_bytes();
    let t = Instant::now();
    for i in 0..N {
        space.iotlb_invalidate(i * PAGE, PAGE);
    }
    let unmap_t = t.elapsed();
    println!(
        "1M mappings: map {:.0} ns/op ({:.2} M/s), unmap {:.0} ns/op ({:.2} M/s), resident memory {:.0} bytes/mapping",
        map_t.as_nanos() as f64 / N as f64,
        N as f64 / map_t.as_secs_f64() / 1e6,
        unmap_t.as_nanos() as f64 / N as f64,
        N as f64 / unmap_t.as_secs_f64() / 1e6,
        rss1.saturating_sub(rss0) as f64 / N as f64,
    );
}

/// The iommufd path: 1M IOMMU_IOAS_MAP_FILE of 4 KiB of one sealed memfd
/// (fixed IOVAs; every call passes its own descriptor, as over the wire),
/// then IOMMU_IOAS_UNMAP of each.
fn iommufd_throughput() {
    use std::os::fd::AsFd;
    use vcdev_iommu::uapi::{
        IommuIoasAlloc, IommuIoasMapFile, IommuIoasUnmap, IOMMU_IOAS_MAP_FIXED_IOVA,
        IOMMU_IOAS_MAP_READABLE, IOMMU_IOAS_MAP_WRITEABLE,
    };
    use vcdev_iommu::{Iommufd, SealPolicy};
    const N: u64 = 1 << 20;
    let fd = vcdev_iommu::mem::sealed_memfd("bench", 64 << 20).unwrap();
    let ictx = Iommufd::new(SealPolicy::RequireShrinkSeal);
    let mut alloc = IommuIoasAlloc {
        size: std::mem::size_of::<IommuIoasAlloc>() as u32,
        ..Default::default()
    };
    let ioas = ictx.ioas_alloc(&mut alloc).unwrap().0;
    let rss0 = rss_bytes();
    let t = Instant::now();
    for i in 0..N {
        let mut cmd = IommuIoasMapFile {
            size: std::mem::size_of::<IommuIoasMapFile>() as u32,
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: ioas,
            start: (i % 16384) * PAGE,
            length: PAGE,
            iova: (1 << 32) + i * PAGE,
            ..Default::default()
        };
        let dup = fd.as_fd().try_clone_to_owned().unwrap();
        ictx.ioas_map_file(&mut cmd, Some(dup)).unwrap();
    }
    let map_t = t.elapsed();
    let rss1 = rss_bytes();
    let t = Instant::now();
    for i in 0..N {
        let mut cmd = IommuIoasUnmap {
            size: std::mem::size_of::<IommuIoasUnmap>() as u32,
            ioas_id: ioas,
            iova: (1 << 32) + i * PAGE,
            length: PAGE,
        };
        ictx.ioas_unmap(&mut cmd).unwrap();
    }
    let unmap_t = t.elapsed();
    println!(
        "iommufd, {N} mappings: IOAS_MAP_FILE {:.0} ns/op, IOAS_UNMAP {:.0} ns/op (grace period included), resident memory {:.0} bytes/mapping",
        map_t.as_nanos() as f64 / N as f64,
        unmap_t.as_nanos() as f64 / N as f64,
        rss1.saturating_sub(rss0) as f64 / N as f64,
    );
}

fn main() {
    // `cargo test --benches` runs bench binaries with no `--bench`: keep
    // that quick.
    if !std::env::args().any(|a| a == "--bench") {
        println!("unmap bench: run with `cargo bench`");
        return;
    }
    latency(0);
    latency(2);
    throughput();
    iommufd_throughput();
}
