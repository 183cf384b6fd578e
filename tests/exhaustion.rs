//! Exhaustion and hostile load (issue #10): each offender gets its error,
//! the daemon's threads and memory stay within their ceilings while it
//! acts (threads +16, resident memory +64 MiB), its descriptors and
//! threads come back (within +4) once it is gone, and a bystander device
//! keeps serving, each request within 1 s. Each test prints its figures.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::frontend::{pattern, Harness, S_OK};
use common::vcdev::Vcdev;

/// Threads, descriptors and resident KiB of process `pid`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Figures {
    threads: usize,
    fds: usize,
    rss_kib: u64,
}

fn figures(pid: u32) -> Figures {
    let count = |d: String| std::fs::read_dir(d).map(|d| d.count()).unwrap_or(0);
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    Figures {
        threads: count(format!("/proc/{pid}/task")),
        fds: count(format!("/proc/{pid}/fd")),
        rss_kib,
    }
}

/// Samples the daemon's figures every few milliseconds; the maxima.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<Mutex<Figures>>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(Mutex::new(figures(pid)));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let f = figures(pid);
                let mut m = m.lock().unwrap();
                m.threads = m.threads.max(f.threads);
                m.fds = m.fds.max(f.fds);
                m.rss_kib = m.rss_kib.max(f.rss_kib);
                drop(m);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Sampler {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Figures {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let m = *self.max.lock().unwrap();
        m
    }
}

/// A frontend on another device doing write+read pairs throughout.
struct Bystander {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(u64, Duration)>>,
}

impl Bystander {
    fn start(socket: &Path) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let mut h = Harness::start(socket, 1, 64);
        let thread = std::thread::spawn(move || {
            let (mut n, mut worst) = (0u64, Duration::ZERO);
            while !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                let data = pattern((n % 251) as u8, 4096);
                assert_eq!(h.write(0, n % 32 * 8, &data), S_OK);
                let r = h.read(0, n % 32 * 8, 4096);
                assert!(r.status == S_OK && r.data == data, "bystander data");
                worst = worst.max(t.elapsed());
                n += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (n, worst)
        });
        Bystander {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it; asserts every request took less than 1 s.
    fn finish(mut self, what: &str) {
        self.stop.store(true, Ordering::Relaxed);
        let (n, worst) = self.thread.take().unwrap().join().expect("bystander");
        eprintln!("{what}: bystander {n} write+read pairs, worst {worst:?}");
        assert!(n > 0, "{what}: the bystander did no I/O");
        assert!(worst < Duration::from_secs(1), "{what}: worst {worst:?}");
    }
}

fn daemon(tag: &str) -> Vcdev {
    Vcdev::builder(tag)
        .device("blk,name=d0,ram=1M")
        .device("blk,name=d1,ram=1M")
        .log_level("warn")
        .spawn()
}

/// Checks the ceilings during the offence and the return afterwards.
fn check(what: &str, d: &mut Vcdev, base: Figures, during: Figures) {
    let pid = d.daemon.proc().pid();
    let back = common::poll_until(Duration::from_secs(15), || {
        let f = figures(pid);
        (f.threads <= base.threads + 4 && f.fds <= base.fds + 4).then_some(f)
    });
    eprintln!("{what}: before {base:?}, peak {during:?}, after {back:?}");
    assert!(
        during.threads <= base.threads + 16,
        "{what}: {} threads, {} before",
        during.threads,
        base.threads
    );
    assert!(
        during.rss_kib <= base.rss_kib + 64 * 1024,
        "{what}: {} KiB resident, {} before",
        during.rss_kib,
        base.rss_kib
    );
    assert!(
        back.is_some(),
        "{what}: descriptors or threads did not come back: {:?}",
        figures(pid)
    );
    assert!(d.alive(), "{what}: the daemon died");
}

fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: out pointer to an rlimit, then a pointer to an initialised one.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// 1,000 connections at once to one device socket: the first owns the
/// device, the others are refused (closed); a bystander is untouched.
#[test]
fn thousand_simultaneous_connections_to_one_device() {
    raise_fd_limit();
    let mut d = daemon("ex-conns");
    let pid = d.daemon.proc().pid();
    let by = Bystander::start(&d.socket("d1"));
    let base = figures(pid);
    let sampler = Sampler::start(pid);
    let sock = d.socket("d0");
    let conns: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    // The refused are closed: their read sees the end.
    let closed = conns
        .iter()
        .filter(|c| {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut b = [0u8; 1];
            matches!((&**c).read(&mut b), Ok(0) | Err(_))
        })
        .count();
    let during = sampler.finish();
    drop(conns);
    by.finish("1000 connections");
    check("1000 connections", &mut d, base, during);
    eprintln!("1000 connections: {closed} refused (closed)");
    assert!(closed >= 998, "only {closed} of 1000 refused");
}

/// 10,000 connect-and-close cycles on one device.
#[test]
fn ten_thousand_connect_close_cycles() {
    let mut d = daemon("ex-cycles");
    let pid = d.daemon.proc().pid();
    let by = Bystander::start(&d.socket("d1"));
    let base = figures(pid);
    let sampler = Sampler::start(pid);
    let sock = d.socket("d0");
    let start = Instant::now();
    for _ in 0..10_000 {
        drop(UnixStream::connect(&sock).expect("connect"));
    }
    let took = start.elapsed();
    let during = sampler.finish();
    by.finish("10000 cycles");
    check("10000 cycles", &mut d, base, during);
    eprintln!("10000 connect/close cycles in {took:?}");
    // The device is free again for a real frontend.
    let mut h = common::poll_until(Duration::from_secs(10), || {
        std::panic::catch_unwind(|| Harness::start(&sock, 1, 16)).ok()
    })
    .expect("the device is served after the cycles");
    assert_eq!(h.write(0, 0, &pattern(1, 512)), S_OK);
}

fn get_features() -> [u8; 12] {
    let mut m = [0u8; 12];
    m[..4].copy_from_slice(&1u32.to_le_bytes());
    m[4..8].copy_from_slice(&1u32.to_le_bytes());
    m
}

/// A flood of requests on the main channel, their replies read: all are
/// answered, and the bystander does not notice.
#[test]
fn message_flood_on_the_main_channel() {
    let mut d = daemon("ex-flood");
    let pid = d.daemon.proc().pid();
    let by = Bystander::start(&d.socket("d1"));
    let base = figures(pid);
    let sampler = Sampler::start(pid);
    let s = UnixStream::connect(d.socket("d0")).expect("connect");
    let n = 50_000usize;
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let msg = get_features();
        for _ in 0..n {
            w.write_all(&msg).expect("flood write");
        }
    });
    let mut r = s;
    let mut reply = [0u8; 20];
    for i in 0..n {
        r.read_exact(&mut reply)
            .unwrap_or_else(|e| panic!("reply {i}: {e}"));
    }
    writer.join().unwrap();
    let during = sampler.finish();
    drop(r);
    by.finish("flood");
    check("flood", &mut d, base, during);
}

/// A frontend that sends requests and never reads its replies: once its
/// socket is full for 5 s the daemon closes it (its writes then fail).
#[test]
fn frontend_that_never_reads_its_replies() {
    let mut d = daemon("ex-noread");
    let pid = d.daemon.proc().pid();
    let by = Bystander::start(&d.socket("d1"));
    let base = figures(pid);
    let sampler = Sampler::start(pid);
    let mut s = UnixStream::connect(d.socket("d0")).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let msg = get_features();
    let start = Instant::now();
    let mut sent = 0u64;
    let err = loop {
        match s.write_all(&msg) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never closed");
    };
    let took = start.elapsed();
    let during = sampler.finish();
    eprintln!("no-reader: closed after {sent} requests, {took:?}: {err}");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{err}"
    );
    drop(s);
    by.finish("no-reader");
    check("no-reader", &mut d, base, during);
}

/// Requests announcing huge arrays: a memory table of 2^32-1 regions, an
/// IOVA-ranges query for 2^32-1 ranges. Each gets its error at once,
/// without the daemon allocating for it.
#[test]
fn requests_for_huge_arrays() {
    let mut d = daemon("ex-huge");
    let pid = d.daemon.proc().pid();
    let by = Bystander::start(&d.socket("d1"));
    let base = figures(pid);
    let sampler = Sampler::start(pid);
    // SET_MEM_TABLE (5): num_regions u32::MAX, with no regions following.
    let mut s = UnixStream::connect(d.socket("d0")).expect("connect");
    let mut m = Vec::new();
    for w in [5u32, 1, 8] {
        m.extend_from_slice(&w.to_le_bytes());
    }
    m.extend_from_slice(&u32::MAX.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    s.write_all(&m).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(s.read(&mut b), Ok(0) | Err(_)),
        "a memory table of 2^32-1 regions was not refused"
    );
    // IOMMU_IOAS_IOVA_RANGES with num_iovas u32::MAX: the ranges there are
    // (few), not 2^32-1 of them.
    let io = vcdev::cdev::client::File::open(&d.path("iommu")).expect("iommufd");
    let ioas = io.ioas_alloc().unwrap();
    let (ranges, _) = io.ioas_iova_ranges(ioas, u32::MAX).expect("IOVA ranges");
    assert!(!ranges.is_empty() && ranges.len() < 16, "{ranges:?}");
    drop(io);
    let during = sampler.finish();
    by.finish("huge arrays");
    check("huge arrays", &mut d, base, during);
}

/// A backend channel nobody reads: the frontend's miss server takes one
/// miss and then never reads again, so the daemon's misses pile up in the
/// socket until it is full. From then on a miss cannot be sent (the
/// channel's socket is non-blocking once its acks are read on the event
/// loop; a blocking one gives up after 5 s) and its request fails at once:
/// each request of the offender ends with IOERR, the daemon keeps its
/// ceilings, and the bystander device is not slowed.
#[test]
fn backend_channel_nobody_reads() {
    let mut d = Vcdev::builder("ex-bch")
        .device("blk,name=d0,ram=1M")
        .device("blk,name=d1,ram=1M")
        .args(&["--iotlb-miss-timeout-ms", "2"])
        .log_level("warn")
        .spawn();
    let pid = d.daemon.proc().pid();
    let by = Bystander::start(&d.socket("d1"));
    let base = figures(pid);
    let sampler = Sampler::start(pid);
    let mut h = Harness::start_iotlb(&d.socket("d0"), 1, 64);
    // One request while misses are answered: the rings and the request
    // headers are translated for good.
    assert_eq!(h.write(0, 0, &pattern(1, 4096)), S_OK);
    // From now on misses are not answered (the server reads one, then
    // waits), and the data pages leave the daemon's IOTLB.
    h.iommu().hold(true);
    let data = common::frontend::iova_of(common::frontend::DATA_GPA);
    h.iommu().invalidate(data, common::frontend::DATA_SIZE);
    let start = Instant::now();
    let (mut n, mut slow) = (0u32, Duration::ZERO);
    while start.elapsed() < Duration::from_secs(5) {
        let t = Instant::now();
        // Each request reads into another data page: each needs a miss of
        // its own (a page's unanswered miss is not sent twice).
        let page = data + u64::from(n % 2048) * 4096;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            h.blk_raw(
                0,
                virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN,
                u64::from(n % 64),
                &[(page, 4096, true)],
            )
        }));
        let Ok(r) = r else {
            let log = d.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "request {n} did not complete; daemon log tail:\n{}",
                tail.join("\n")
            );
        };
        assert_eq!(r.0, common::frontend::S_IOERR, "request {n}");
        slow = slow.max(t.elapsed());
        n += 1;
    }
    let sent = d.counter("d0", "iotlb_misses");
    eprintln!("unread backend channel: {n} requests failed, slowest {slow:?}, {sent} misses sent");
    assert!(
        u64::from(n) > 2 * sent && n > 2048,
        "the backend channel never filled: {n} requests, {sent} misses sent"
    );
    assert!(slow < Duration::from_secs(6), "slowest {slow:?}");
    h.iommu().hold(false);
    drop(h);
    let during = sampler.finish();
    by.finish("unread backend channel");
    check("unread backend channel", &mut d, base, during);
}

/// A frontend that clears O_NONBLOCK on its call eventfd (the daemon set
/// it on the open file description they share) and fills its counter: the
/// queue worker's next call blocks. The frontend only stalls its own
/// queue: GET_VRING_BASE, which stops the worker, is still answered (the
/// worker is interrupted out of its write), the bystander keeps serving,
/// and after the disconnect the device serves the next frontend, with the
/// offender's write on the disk.
#[test]
fn blocking_full_call_eventfd() {
    use vhost::vhost_user::message::FrontendReq;
    let mut d = daemon("ex-callfd");
    let pid = d.daemon.proc().pid();
    let by = Bystander::start(&d.socket("d1"));
    let base = figures(pid);
    let sampler = Sampler::start(pid);
    let mut h = Harness::start(&d.socket("d0"), 1, 256);
    let call = h.queues[0].call.as_raw_fd();
    // SAFETY: fcntl on an eventfd the harness owns; F_SETFL takes an int.
    assert_eq!(unsafe { libc::fcntl(call, libc::F_SETFL, 0) }, 0);
    h.queues[0]
        .call
        .write(u64::MAX - 1)
        .expect("fill the counter");
    let data = pattern(5, 4096);
    let chain = h.blk_chain(
        0,
        virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT,
        8,
        &[(h.dma_addr(h.queues[0].data_gpa()), 4096, false)],
    );
    h.mem.write(h.queues[0].data_gpa(), &data);
    h.queues[0].enable_calls(&h.mem);
    h.queues[0].submit(&h.mem, &chain);
    let used = common::poll_until(common::TIMEOUT, || {
        (h.queues[0].device_used_idx(&h.mem) == 1).then_some(())
    });
    assert!(used.is_some(), "the write completed");
    // The worker is now blocked writing the call.
    std::thread::sleep(Duration::from_millis(200));
    h.set_reply_timeout(Some(Duration::from_secs(10)));
    let start = Instant::now();
    let reply = h.raw_flags(FrontendReq::GET_VRING_BASE, 0, &[0; 8], &[]);
    let took = start.elapsed();
    eprintln!("call-eventfd: GET_VRING_BASE answered after {took:?}");
    assert!(reply.is_some(), "GET_VRING_BASE answered");
    drop(h);
    let during = sampler.finish();
    let mut h = common::poll_until(common::TIMEOUT, || {
        let (_, list) = d.ctl(&["list"]);
        list.lines()
            .any(|l| l.starts_with("d0") && l.contains("owner none"))
            .then_some(())
    })
    .map(|()| Harness::start(&d.socket("d0"), 1, 256))
    .expect("the device is released");
    let r = h.read(0, 8, 4096);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data, "the offender's write is on the disk");
    drop(h);
    by.finish("call-eventfd");
    check("call-eventfd", &mut d, base, during);
}
