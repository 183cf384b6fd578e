//! vhost-user under a vIOMMU, without QEMU: the harness acks
//! VIRTIO_F_ACCESS_PLATFORM, gives every address as an IOVA and answers the
//! daemon's IOTLB misses on the backend channel from its model of the guest
//! IOMMU ([`common::frontend::IommuFront`]), as QEMU 10 does.

mod common;

use std::time::{Duration, Instant};

use common::frontend::{iova_of, pattern, Desc, Harness, DATA_GPA, SECTOR, S_IOERR, S_OK};
use common::vcdev::Vcdev;
use common::TIMEOUT;
use vcdev::vhost_user::iotlb::IOTLB_PAGE_SIZE;
use vcdev_device_model::testing::{BlkRequest, W};
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostAccess, VhostBackend, VhostIotlbType};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;

const PAGE: u64 = IOTLB_PAGE_SIZE;
const RO: u8 = VhostAccess::ReadOnly as u8;
const WO: u8 = VhostAccess::WriteOnly as u8;

/// A daemon with one 16 MiB RAM disk of `queues` queues, plus `extra` options.
fn daemon(tag: &str, queues: u16, extra: &[&str]) -> Vcdev {
    let spec = format!("blk,ram=16M,queues={queues}");
    let mut args = vec!["--device", spec.as_str()];
    args.extend_from_slice(extra);
    Vcdev::start(tag, &args, "vfio0")
}

fn page_of(a: u64) -> u64 {
    a & !(PAGE - 1)
}

/// How many misses the frontend received for the page of `iova`.
fn misses_of_page(h: &Harness, iova: u64) -> usize {
    h.iommu()
        .misses()
        .iter()
        .filter(|m| page_of(m.iova) == page_of(iova))
        .count()
}

/// The value of `key=N` in the last line of `log` that has it.
fn counter(log: &str, key: &str) -> Option<u64> {
    let pat = format!(" {key}=");
    log.lines().rev().find_map(|l| {
        let at = l.find(&pat)? + pat.len();
        l[at..].split_whitespace().next()?.parse().ok()
    })
}

#[test]
fn access_platform_is_offered_with_reply_ack_and_backend_req() {
    let mut d = daemon("iotlb-offer", 1, &[]);
    let mut fe = Frontend::connect(d.socket("vfio0"), 1).expect("connect");
    let f = fe.get_features().expect("GET_FEATURES");
    assert!(f & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0, "{f:#x}");
    let p = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(
        p.contains(VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::BACKEND_REQ)
    );
    drop(fe);
    assert!(d.alive());
}

/// Without ACCESS_PLATFORM negotiated, an IOTLB message is refused with an
/// error reply; the connection and the data path go on.
#[test]
fn iotlb_msg_without_access_platform_is_an_error_reply() {
    let mut d = daemon("iotlb-noplat", 1, &[]);
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    let msg = vcdev::vhost_user::iotlb::IotlbMsg {
        iova: 0x1000,
        size: PAGE,
        uaddr: h.mem.uaddr(DATA_GPA),
        perm: VhostAccess::ReadWrite as u8,
        kind: VhostIotlbType::Update as u8,
        padding: [0; 6],
    };
    let ack = h.raw_ack(FrontendReq::IOTLB_MSG, &msg.encode(), &[]);
    assert_eq!(ack, libc::EOPNOTSUPP as u64);
    assert_eq!(h.write(0, 0, &pattern(1, SECTOR)), S_OK);
    assert!(d
        .log_with("without VIRTIO_F_ACCESS_PLATFORM")
        .contains("without VIRTIO_F_ACCESS_PLATFORM"));
}

/// I/O through an empty IOTLB: every page the device touches is asked for
/// once, with the exact access (rings: descriptors and avail read, used
/// written; buffers as the request uses them), and nothing else is asked.
#[test]
fn io_through_misses_asks_each_page_once_with_the_exact_access() {
    let mut d = daemon("iotlb-io", 1, &[]);
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
    let data = pattern(7, 4096);
    // Device-writable first: the data page is asked for write.
    let r = h.read(0, 8, 4096);
    assert_eq!(r.status, S_OK);
    assert_eq!(h.write(0, 8, &data), S_OK);
    assert_eq!(h.read(0, 8, 4096).data, data);
    let q = &h.queues[0];
    let misses: Vec<(u64, u8)> = h
        .iommu()
        .misses()
        .iter()
        .map(|m| (page_of(m.iova), m.perm))
        .collect();
    let want = vec![
        (iova_of(q.ring.desc), RO),
        (iova_of(q.ring.avail), RO),
        (iova_of(q.ring.used), WO),
        // The status byte shares the header's page, and the device
        // model reaches it first (to be able to report any failure).
        (iova_of(q.header_gpa()), WO),
        (iova_of(q.data_gpa()), WO),
    ];
    let mut got = misses.clone();
    got.sort_unstable();
    let mut sorted = want.clone();
    sorted.sort_unstable();
    assert_eq!(got, sorted, "misses in order: {misses:x?}");
    // The rings come first, in order.
    assert_eq!(misses[..3], want[..3]);
    let times = h.iommu().answer_times();
    drop(h);
    d.wait_released();
    let out = d.daemon.stop(Duration::from_secs(10)).expect("stop");
    assert_eq!(
        counter(&out.stderr, "iotlb_misses"),
        Some(5),
        "{}",
        out.stderr
    );
    assert_eq!(counter(&out.stderr, "iotlb_updates"), Some(5));
    assert!(counter(&out.stderr, "translations").unwrap_or(0) > 0);
    assert!(counter(&out.stderr, "iotlb_flushes").unwrap_or(0) >= 1);
    eprintln!("miss answer round trips (frontend side): {times:?}");
}

/// A buffer that spans two IOVA pages mapped to distant, reversed guest
/// pages is read and written as two pieces.
#[test]
fn buffer_spanning_two_mappings() {
    let _d = daemon("iotlb-span", 1, &[]);
    let mut h = Harness::start_iotlb(&_d.socket("vfio0"), 1, 64);
    let x = 0x2000_0000_0000u64;
    let (a, b) = (DATA_GPA + 0x30000, DATA_GPA + 0x10000);
    h.iommu().map(x, a, PAGE, VhostAccess::ReadWrite);
    h.iommu().map(x + PAGE, b, PAGE, VhostAccess::ReadWrite);
    let data = pattern(3, 4096);
    h.mem.write(a + 0x800, &data[..2048]);
    h.mem.write(b, &data[2048..]);
    let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_OUT, 0, &[(x + 0x800, 4096, false)]);
    assert_eq!(s, S_OK);
    assert_eq!(h.read(0, 0, 4096).data, data);
    // And the device writes through both pieces.
    h.mem.write(a + 0x800, &[0u8; 2048]);
    h.mem.write(b, &[0u8; 2048]);
    let (s, len) = h.blk_raw(0, VIRTIO_BLK_T_IN, 0, &[(x + 0x800, 4096, true)]);
    assert_eq!((s, len), (S_OK, 4097));
    assert_eq!(h.mem.read(a + 0x800, 2048), data[..2048]);
    assert_eq!(h.mem.read(b, 2048), data[2048..]);
}

/// A device write into a read-only mapping fails with IOERR (no retry, no
/// write), and the queue goes on.
#[test]
fn write_into_read_only_mapping_is_ioerr() {
    let _d = daemon("iotlb-ro", 1, &[]);
    let mut h = Harness::start_iotlb(&_d.socket("vfio0"), 1, 64);
    let y = 0x3000_0000_0000u64;
    let target = DATA_GPA + 0x50000;
    h.iommu().map(y, target, PAGE, VhostAccess::ReadOnly);
    h.mem.write(target, &[0x5a; 4096]);
    let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_IN, 0, &[(y, 4096, true)]);
    assert_eq!(s, S_IOERR);
    assert_eq!(h.mem.read(target, 4096), vec![0x5a; 4096]);
    // Reading from it is fine (a write request), and the queue goes on.
    let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_OUT, 0, &[(y, 4096, false)]);
    assert_eq!(s, S_OK);
    assert_eq!(h.read(0, 0, 4096).data, vec![0x5a; 4096]);
    let asked: Vec<u8> = h
        .iommu()
        .misses()
        .iter()
        .filter(|m| page_of(m.iova) == y)
        .map(|m| m.perm)
        .collect();
    assert_eq!(asked, vec![WO], "one miss, for write");
}

/// A miss the frontend never acks fails its request after the timeout;
/// the queue then goes on.
#[test]
fn unanswered_miss_fails_after_the_timeout_and_the_queue_continues() {
    let _d = daemon("iotlb-tmo", 1, &["--iotlb-miss-timeout-ms", "400"]);
    let mut h = Harness::start_iotlb(&_d.socket("vfio0"), 1, 64);
    // Warm up the rings and the header page.
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    let z = 0x4000_0000_0000u64;
    h.iommu()
        .map(z, DATA_GPA + 0x60000, PAGE, VhostAccess::ReadWrite);
    h.iommu().set_silent(z);
    let t = Instant::now();
    let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_IN, 0, &[(z, 512, true)]);
    let took = t.elapsed();
    assert_eq!(s, S_IOERR);
    assert!(
        took >= Duration::from_millis(380) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    eprintln!("unanswered miss failed after {took:?}");
}

/// A miss acked without an UPDATE (an IOVA the guest did not map) fails
/// its request at once.
#[test]
fn ack_without_update_fails_the_request_at_once() {
    let _d = daemon("iotlb-refused", 1, &[]);
    let mut h = Harness::start_iotlb(&_d.socket("vfio0"), 1, 64);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    let w = 0x5000_0000_0000u64;
    let t = Instant::now();
    let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_IN, 0, &[(w, 512, true)]);
    let took = t.elapsed();
    assert_eq!(s, S_IOERR);
    assert!(
        took < Duration::from_secs(2),
        "{took:?} (the timeout is 5 s)"
    );
    assert_eq!(misses_of_page(&h, w), 1);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
}

/// Two queues faulting on one page while its miss is pending: one miss is
/// sent, both requests complete once it is answered.
#[test]
fn misses_of_one_page_from_two_queues_are_sent_once() {
    let mut d = daemon("iotlb-dup", 2, &[]);
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 2, 64);
    for q in 0..2 {
        assert_eq!(h.read(q, 0, 512).status, S_OK);
    }
    let shared = 0x6000_0000_0000u64;
    let gpa = DATA_GPA + 0x70000;
    h.iommu().map(shared, gpa, PAGE, VhostAccess::ReadWrite);
    h.mem.write(gpa, &pattern(9, 512));
    let before = h.iommu().misses().len();
    h.iommu().hold(true);
    let chain = |h: &Harness, q: usize| -> Vec<Desc> {
        let sector = u64::from(q as u32) * 8;
        h.blk_chain(q, VIRTIO_BLK_T_OUT, sector, &[(shared, 512, false)])
    };
    let c0 = chain(&h, 0);
    h.queues[0].submit(&h.mem, &c0);
    assert!(h.iommu().wait_misses(before + 1, TIMEOUT));
    let c1 = chain(&h, 1);
    h.queues[1].submit(&h.mem, &c1);
    let joined = common::poll_until(TIMEOUT, || {
        d.log()
            .contains("queue 1: joins the pending miss")
            .then_some(())
    });
    h.iommu().hold(false);
    assert!(joined.is_some(), "queue 1 never joined\n{}", d.log());
    for q in 0..2 {
        let (id, _) = h.queues[q].wait_used(&h.mem, TIMEOUT).expect("completes");
        assert_eq!(id, 0);
        assert_eq!(h.mem.read(h.queues[q].status_gpa(), 1)[0], S_OK);
    }
    assert_eq!(misses_of_page(&h, shared), 1);
    assert_eq!(h.read(1, 8, 512).data, pattern(9, 512));
}

/// Invalidate during a stream of I/O: once the INVALIDATE is acked, the
/// device never writes the old guest page again (a sentinel written right
/// after the ack survives), and the stream goes on through the new mapping.
#[test]
fn invalidate_during_io_never_writes_the_old_page_after_the_ack() {
    let d = daemon("iotlb-sentinel", 1, &[]);
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
    const LEN: u64 = 64 << 10;
    const ROUNDS: u64 = 24;
    let buf = 0x7000_0000_0000u64;
    // ROUNDS + 1 ranges of 64 KiB in the data region; the buffer moves
    // along them, one invalidation per move.
    let range = |k: u64| DATA_GPA + 0x10_0000 + k * LEN;
    let disk = pattern(0x42, LEN as usize);
    assert_eq!(h.write(0, 0, &disk[..]), S_OK);
    h.iommu().map(buf, range(0), LEN, VhostAccess::ReadWrite);
    let io = h.iommu().clone();
    let mem_ranges: Vec<_> = (0..=ROUNDS).map(range).collect();
    let sentinel = vec![0xee; LEN as usize];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (stop2, done2) = (stop.clone(), done.clone());
    // The test thread drives the queue; the invalidator runs beside it.
    let invalidator = std::thread::spawn(move || {
        let mut acks = Vec::new();
        for k in 1..=ROUNDS {
            let at = done2.load(std::sync::atomic::Ordering::SeqCst);
            common::poll_until(TIMEOUT, || {
                (done2.load(std::sync::atomic::Ordering::SeqCst) > at).then_some(())
            })
            .expect("I/O goes on");
            io.map(buf, mem_ranges[k as usize], LEN, VhostAccess::ReadWrite);
            acks.push(io.invalidate(buf, LEN));
            write_sentinel(&io, mem_ranges[k as usize - 1]);
        }
        stop2.store(true, std::sync::atomic::Ordering::SeqCst);
        acks
    });
    // Writes the sentinel into the old range right after the ack (through
    // the frontend's own mapping of guest memory).
    fn write_sentinel(io: &common::frontend::IommuFront, gpa: u64) {
        let p = io.uaddr(gpa) as *mut u8;
        // SAFETY: `gpa..+LEN` lies in the data region, which the frontend
        // maps at `uaddr(gpa)` for the harness's lifetime.
        unsafe { std::ptr::write_bytes(p, 0xee, LEN as usize) };
    }
    let mut statuses = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_IN, 0, &[(buf, LEN as u32, true)]);
        statuses.push(s);
        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    let acks = invalidator.join().expect("invalidator");
    assert_eq!(acks, vec![0; ROUNDS as usize]);
    assert!(statuses.iter().all(|s| *s == S_OK), "{statuses:?}");
    for k in 0..ROUNDS {
        assert!(
            h.mem.read(range(k), LEN as usize) == sentinel,
            "range {k} was written after its invalidation was acked"
        );
    }
    // The stream goes on through the last mapping.
    let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_IN, 0, &[(buf, LEN as u32, true)]);
    assert_eq!(s, S_OK);
    assert!(
        h.mem.read(range(ROUNDS), LEN as usize) == disk,
        "last range"
    );
    eprintln!("{} reads across {ROUNDS} invalidations", statuses.len());
}

/// The IOTLB is dropped when a queue stops (GET_VRING_BASE) and when the
/// memory table changes; an INVALIDATE covering a ring makes the queue
/// translate (and ask for) that ring again.
#[test]
fn iotlb_dropped_on_stop_and_mem_table_and_ring_invalidation_honoured() {
    let _d = daemon("iotlb-drop", 1, &[]);
    let mut h = Harness::start_iotlb(&_d.socket("vfio0"), 1, 64);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    let used = iova_of(h.queues[0].ring.used);
    let hdr = iova_of(h.queues[0].header_gpa());
    assert_eq!(misses_of_page(&h, used), 1);
    // A ring invalidation: the used ring is asked for again, for write.
    assert_eq!(h.iommu().invalidate(page_of(used), PAGE), 0);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    assert_eq!(misses_of_page(&h, used), 2);
    assert_eq!(h.iommu().misses().last().map(|m| m.perm), Some(WO));
    assert_eq!(misses_of_page(&h, hdr), 1, "the header page stayed");
    // Stop and restart the queue: everything is asked for again.
    h.stop_queue(0);
    h.start_queue(0);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    assert_eq!((misses_of_page(&h, used), misses_of_page(&h, hdr)), (3, 2));
    // A new memory table: the same.
    {
        let lock = h.main_lock.clone();
        let _g = lock.lock().expect("main lock");
        let infos: Vec<_> = h.mem.regions.iter().map(|r| r.info()).collect();
        h.fe.set_mem_table(&infos).expect("SET_MEM_TABLE");
    }
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    assert_eq!(misses_of_page(&h, hdr), 3);
}

/// A queue stopped (GET_VRING_BASE) after its used ring was invalidated
/// does not ask for the ring while it stops: the stop waits for no answer,
/// and QEMU, stopping the device, refuses IOTLB messages ("Unexpected IOTLB
/// message when virtio device is stopped"). Once restarted, the queue asks
/// for it as usual and serves.
#[test]
fn a_stopping_queue_does_not_ask_for_its_invalidated_ring() {
    let d = daemon("iotlb-stop-ring", 1, &[]);
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    let used = iova_of(h.queues[0].ring.used);
    assert_eq!(misses_of_page(&h, used), 1);
    assert_eq!(h.iommu().invalidate(page_of(used), PAGE), 0);
    h.stop_queue(0);
    // A miss would have been sent before GET_VRING_BASE's answer; give the
    // backend channel's reader time to see one.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(misses_of_page(&h, used), 1, "no miss while stopping");
    h.start_queue(0);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    assert_eq!(misses_of_page(&h, used), 2, "asked for again once running");
}

/// Offers a read of 512 bytes at sector 0 into `buf` (an IOVA) on queue
/// `q` without waiting for it.
fn offer_read(h: &mut Harness, q: usize, buf: u64) {
    let chain = h.blk_chain(q, VIRTIO_BLK_T_IN, 0, &[(buf, 512, true)]);
    h.queues[q].submit(&h.mem, &chain);
}

/// Offers a read on queue 0 into a page mapped in the guest IOMMU but not
/// yet in the daemon's IOTLB, with the answers to misses held: returns
/// once the daemon asked for that page (the queue now waits on it).
fn offer_read_held_on_a_miss(h: &mut Harness) {
    let z = 0x3000_0000_0000u64;
    h.iommu()
        .map(z, DATA_GPA + 0x50000, PAGE, VhostAccess::ReadWrite);
    let before = h.iommu().misses().len();
    h.iommu().hold(true);
    offer_read(h, 0, z);
    assert!(h.iommu().wait_misses(before + 1, TIMEOUT));
}

/// While a queue waits for the answer to a miss (QEMU does not read the
/// backend channel while it waits on the main one), the main channel is
/// served and GET_VRING_BASE answers at once; the parked request survives
/// the stop and completes when the queue resumes.
#[test]
fn main_channel_and_get_vring_base_are_served_while_a_queue_waits_on_a_miss() {
    let _d = daemon("iotlb-stopwait", 1, &[]);
    let mut h = Harness::start_iotlb(&_d.socket("vfio0"), 1, 64);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    offer_read_held_on_a_miss(&mut h);
    let t = Instant::now();
    let n = h.raw(FrontendReq::GET_QUEUE_NUM, &[], &[]);
    assert_eq!(n.payload, 1u64.to_le_bytes());
    let base = h.stop_queue(0);
    let took = t.elapsed();
    h.iommu().hold(false);
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The waiting request was taken from the avail ring and parked (the
    // requests behind it would have gone on): it is not lost, but walked
    // again when the queue resumes where it stopped, and answered once.
    assert_eq!(base, 2, "the parked request was taken from the avail ring");
    h.start_queue(0);
    let (id, len) = h.queues[0]
        .wait_used(&h.mem, TIMEOUT)
        .expect("the parked request completes after the resume");
    assert_eq!((id, len), (0, 513));
    assert_eq!(h.mem.read(h.queues[0].status_gpa(), 1)[0], S_OK);
    assert!(h.queues[0]
        .wait_used(&h.mem, Duration::from_millis(200))
        .is_none());
}

/// A frontend that vanishes while a queue waits on a miss: the device is
/// released and the next frontend finds its data.
#[test]
fn frontend_vanishing_during_a_miss_leaves_the_device_usable() {
    let mut d = daemon("iotlb-vanish", 1, &[]);
    let data = pattern(0x5a, 4096);
    {
        let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
        assert_eq!(h.write(0, 8, &data), S_OK);
        offer_read_held_on_a_miss(&mut h);
    }
    d.wait_released();
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
    let r = h.read(0, 8, 4096);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data, "data lost");
}

/// A frontend cannot grow the IOTLB without bound: past
/// `--iotlb-max-entries` an UPDATE drops the whole IOTLB first, the
/// guest's next accesses miss again, and the data path stays correct.
#[test]
fn a_full_iotlb_is_dropped_and_refilled_through_misses() {
    let mut d = daemon("iotlb-cap", 1, &["--iotlb-max-entries", "16"]);
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
    let data = pattern(3, 4096);
    assert_eq!(h.write(0, 8, &data), S_OK);
    // Fill the IOTLB with UPDATEs of pages the device never uses.
    let far = 0x4000_0000_0000u64;
    for i in 0..16 {
        h.iommu().update(
            far + i * PAGE,
            PAGE,
            DATA_GPA,
            vhost::VhostAccess::ReadWrite,
        );
    }
    h.iommu().clear_misses();
    // The rings' and buffers' entries went with the flush: asked again.
    assert_eq!(h.read(0, 8, 4096).data, data);
    assert!(!h.iommu().misses().is_empty(), "no miss after the flush");
    let log = d.log_with("IOTLB full (16 entries)");
    assert!(log.contains("IOTLB full (16 entries)"), "{log}");
    drop(h);
    d.wait_released();
    let out = d.daemon.stop(Duration::from_secs(10)).expect("stop");
    // One flush for the cap, one at the disconnect.
    assert!(
        counter(&out.stderr, "iotlb_flushes").unwrap_or(0) >= 2,
        "{}",
        out.stderr
    );
}

// ---------------------------------------------------------------------------
// Issue #12: misses that do not stall the queue, ring pins kept

/// Offers (no kick) a read of 512 bytes at sector 0 into `buf` (an IOVA)
/// as request slot `slot` of queue 0: descriptors `3 slot..`, header and
/// status 64 bytes apart in the queue's header page. Returns the head.
fn offer_slot(h: &mut Harness, slot: u16, buf: u64) -> u16 {
    let hdr = h.queues[0].header_gpa() + 64 * u64::from(slot);
    let status = hdr + u64::from(BlkRequest::HEADER_LEN);
    BlkRequest::new(VIRTIO_BLK_T_IN, 0).write(&h.mem, hdr, status);
    let chain = BlkRequest::chain(h.dma_addr(hdr), &[(buf, 512, W)], h.dma_addr(status));
    let head = 3 * slot;
    h.queues[0].ring.write_chain(&h.mem, head, &chain);
    h.queues[0].offer(&h.mem, head);
    head
}

fn slot_status(h: &Harness, slot: u16) -> u8 {
    let hdr = h.queues[0].header_gpa() + 64 * u64::from(slot);
    h.mem.read(hdr + u64::from(BlkRequest::HEADER_LEN), 1)[0]
}

/// Two requests fault on two different pages, a third one behind them
/// translates: the third completes while both misses are unanswered, the
/// two misses are outstanding together (both sent before either answer),
/// and once answered, in order, both requests complete with the data.
#[test]
fn a_request_behind_two_misses_completes_first() {
    let d = daemon("iotlb-nostall", 1, &[]);
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
    let disk = pattern(0x77, 512);
    assert_eq!(h.write(0, 0, &disk), S_OK);
    // The header page and queue 0's data page are in the IOTLB now.
    let (a, b) = (0x5000_0000_0000u64, 0x5000_0001_0000u64);
    h.iommu()
        .map(a, DATA_GPA + 0x60000, PAGE, VhostAccess::ReadWrite);
    h.iommu()
        .map(b, DATA_GPA + 0x61000, PAGE, VhostAccess::ReadWrite);
    let c = iova_of(h.queues[0].data_gpa());
    let sent = d.counter("vfio0", "iotlb_misses");
    h.iommu().hold(true);
    h.queues[0].enable_calls(&h.mem);
    let heads = [
        offer_slot(&mut h, 0, a),
        offer_slot(&mut h, 1, b),
        offer_slot(&mut h, 2, c),
    ];
    h.queues[0].kick.write(1).expect("kick");
    let first = h.queues[0].wait_used(&h.mem, TIMEOUT);
    let outstanding = d.counter("vfio0", "iotlb_misses") - sent;
    let early = h.queues[0].wait_used(&h.mem, Duration::from_millis(200));
    h.iommu().hold(false);
    assert_eq!(
        first,
        Some((u32::from(heads[2]), 513)),
        "the request behind the misses"
    );
    assert_eq!(slot_status(&h, 2), S_OK);
    assert_eq!(outstanding, 2, "both misses sent before any answer");
    assert_eq!(early, None, "a parked request completed before its answer");
    let mut rest = Vec::new();
    while rest.len() < 2 {
        h.queues[0].enable_calls(&h.mem);
        rest.push(h.queues[0].wait_used(&h.mem, TIMEOUT).expect("completes"));
    }
    rest.sort_unstable();
    assert_eq!(
        rest,
        vec![(u32::from(heads[0]), 513), (u32::from(heads[1]), 513)]
    );
    assert_eq!((slot_status(&h, 0), slot_status(&h, 1)), (S_OK, S_OK));
    assert!(h.mem.read(DATA_GPA + 0x60000, 512) == disk);
    assert!(h.mem.read(DATA_GPA + 0x61000, 512) == disk);
    // Asked once each, in the order the requests faulted.
    let pages: Vec<u64> = h.iommu().misses().iter().map(|m| page_of(m.iova)).collect();
    let (ia, ib) = (
        pages.iter().position(|&p| p == a).expect("miss for a"),
        pages.iter().position(|&p| p == b).expect("miss for b"),
    );
    assert!(ia < ib, "{pages:x?}");
    assert_eq!((misses_of_page(&h, a), misses_of_page(&h, b)), (1, 1));
}

/// Strict churn on one page while another request of the queue stays
/// parked (its miss never answered): each new request on the page is a new
/// miss, not a refault of the last one's. (Entries of answered misses used
/// to live as long as any request was parked, so the 17th request on the
/// page counted as the 17th refault and failed with IOERR: strict churn at
/// depth failed within a second.)
#[test]
fn strict_churn_beside_a_parked_request_never_fails() {
    let d = daemon("iotlb-refault", 1, &["--iotlb-miss-timeout-ms", "60000"]);
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    let silent = 0x5100_0000_0000u64;
    h.iommu()
        .map(silent, DATA_GPA + 0x70000, PAGE, VhostAccess::ReadWrite);
    h.iommu().set_silent(silent);
    // Acks are matched in order: the silent miss must not take the next
    // one's. Answers come as UPDATEs alone.
    h.iommu().withhold_acks(true);
    let before = h.iommu().misses().len();
    offer_slot(&mut h, 1, silent);
    h.queues[0].kick.write(1).expect("kick");
    assert!(h.iommu().wait_misses(before + 1, TIMEOUT));
    let p = 0x5200_0000_0000u64;
    h.iommu()
        .map(p, DATA_GPA + 0x71000, PAGE, VhostAccess::ReadWrite);
    for i in 0..40 {
        let head = offer_slot(&mut h, 0, p);
        h.queues[0].enable_calls(&h.mem);
        h.queues[0].kick.write(1).expect("kick");
        let used = h.queues[0].wait_used(&h.mem, TIMEOUT);
        assert_eq!(used, Some((u32::from(head), 513)), "request {i}");
        assert_eq!(slot_status(&h, 0), S_OK, "request {i}");
        assert_eq!(h.iommu().invalidate(p, PAGE), 0);
    }
    assert_eq!(misses_of_page(&h, p), 40);
}

/// An INVALIDATE of a data page leaves the ring pins alone (the queue
/// checks the invalidation log); one of a ring page makes it pin again.
#[test]
fn invalidating_data_pages_does_not_repin_the_rings() {
    let d = daemon("iotlb-repin", 1, &[]);
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    let pins = d.counter("vfio0", "ring_pins");
    let p = 0x5300_0000_0000u64;
    h.iommu()
        .map(p, DATA_GPA + 0x72000, PAGE, VhostAccess::ReadWrite);
    for _ in 0..10 {
        let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_IN, 0, &[(p, 512, true)]);
        assert_eq!(s, S_OK);
        assert_eq!(h.iommu().invalidate(p, PAGE), 0);
    }
    // Between two requests, more invalidations than a queue's burst under
    // strict churn at depth 32 (the log once remembered 16: a worker that
    // slept through more pinned again).
    for i in 1..=64u64 {
        let q = p + i * PAGE;
        let gpa = DATA_GPA + 0x72000;
        assert_eq!(h.iommu().update(q, PAGE, gpa, VhostAccess::ReadWrite), 0);
        assert_eq!(h.iommu().invalidate(q, PAGE), 0);
    }
    let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_IN, 0, &[(p, 512, true)]);
    assert_eq!(s, S_OK);
    assert_eq!(d.counter("vfio0", "iotlb_invalidates"), 74);
    assert_eq!(
        d.counter("vfio0", "ring_pins"),
        pins,
        "re-pinned after data invalidations"
    );
    let used = iova_of(h.queues[0].ring.used);
    assert_eq!(h.iommu().invalidate(page_of(used), PAGE), 0);
    assert_eq!(h.read(0, 0, 512).status, S_OK);
    assert_eq!(d.counter("vfio0", "ring_pins"), pins + 1);
}

// Issue #8: an invalidation waits for the I/O in flight that it overlaps

/// A loop device (direct I/O over a file) whose reads by one process are
/// throttled by a cgroup v1 blkio group: the kernel keeps such a read in
/// flight for as long as the limit says. Torn down on drop: the limit
/// lifted, the process moved back, the group, device and file removed.
struct ThrottledLoop {
    dev: common::LoopDev,
    file: std::path::PathBuf,
    group: std::path::PathBuf,
    /// `MAJOR:MINOR` of the loop device.
    devno: String,
    pids: Vec<u32>,
}

impl ThrottledLoop {
    const BLKIO: &'static str = "/sys/fs/cgroup/blkio";

    /// Why it cannot be set up here, or the device over a `len`-byte file.
    fn new(tag: &str, len: u64) -> Result<ThrottledLoop, String> {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root (losetup, cgroups)".to_owned());
        }
        let limit = std::path::Path::new(Self::BLKIO).join("blkio.throttle.read_bps_device");
        if !limit.exists() {
            return Err(format!(
                "no {} (cgroup v1 blkio throttling)",
                limit.display()
            ));
        }
        let file = std::env::temp_dir().join(format!("vcdev-{tag}-{}.img", std::process::id()));
        std::fs::write(&file, vec![0x3cu8; len as usize]).map_err(|e| e.to_string())?;
        let dev = common::LoopDev::attach(&file).inspect_err(|_| {
            let _ = std::fs::remove_file(&file);
        })?;
        let rdev = std::os::unix::fs::MetadataExt::rdev(
            &std::fs::metadata(dev.path()).map_err(|e| e.to_string())?,
        );
        let devno = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
        let group =
            std::path::Path::new(Self::BLKIO).join(format!("vcdev-{tag}-{}", std::process::id()));
        let t = ThrottledLoop {
            dev,
            file,
            group,
            devno,
            pids: Vec::new(),
        };
        std::fs::create_dir(&t.group).map_err(|e| format!("{}: {e}", t.group.display()))?;
        Ok(t)
    }

    /// Throttles the reads of process `pid` from the device to
    /// `bytes_per_sec`.
    fn throttle(&mut self, pid: u32, bytes_per_sec: u64) {
        std::fs::write(
            self.group.join("blkio.throttle.read_bps_device"),
            format!("{} {bytes_per_sec}", self.devno),
        )
        .expect("set the read limit");
        std::fs::write(self.group.join("cgroup.procs"), pid.to_string()).expect("move the daemon");
        self.pids.push(pid);
    }
}

impl Drop for ThrottledLoop {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.group.join("blkio.throttle.read_bps_device"),
            format!("{} 0", self.devno),
        );
        for pid in &self.pids {
            let _ = std::fs::write(
                std::path::Path::new(Self::BLKIO).join("cgroup.procs"),
                pid.to_string(),
            );
        }
        let _ = std::fs::remove_dir(&self.group);
        // The loop device is detached after this, as a field.
        let _ = std::fs::remove_file(&self.file);
    }
}

/// An INVALIDATE that overlaps a read in flight is acked only once that
/// read has completed (its buffer is written, then let go); one of another
/// page is acked at once, the read still in flight. The read is kept in
/// flight by the kernel: the daemon (`direct=on,aio=io_uring` on a loop
/// device) has its reads of the device throttled to 2 KiB/s by a blkio
/// cgroup, so a 4 KiB read takes about two seconds. Needs root and cgroup
/// v1 blkio throttling; says why and passes without them.
#[test]
fn an_invalidate_waits_for_the_read_it_overlaps_and_only_for_it() {
    let mut lo = match ThrottledLoop::new("inval-inflight", 1 << 20) {
        Ok(lo) => lo,
        Err(why) => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP an_invalidate_waits_for_the_read_it_overlaps_and_only_for_it: {why}"
            );
            return;
        }
    };
    let spec = format!(
        "blk,path={},direct=on,aio=io_uring",
        lo.dev.path().display()
    );
    let mut d = Vcdev::start("inval-inflight", &["--device", &spec], "vfio0");
    let mut h = Harness::start_iotlb(&d.socket("vfio0"), 1, 64);
    let (a, b) = (0x6000_0000_0000u64, 0x6000_0001_0000u64);
    let (ga, gb) = (DATA_GPA + 0x70000, DATA_GPA + 0x71000);
    h.iommu().map(a, ga, PAGE, VhostAccess::ReadWrite);
    h.iommu().map(b, gb, PAGE, VhostAccess::ReadWrite);
    // Both pages, the rings, header and status translated before the limit.
    for buf in [a, b] {
        let (s, _) = h.blk_raw(0, VIRTIO_BLK_T_IN, 8, &[(buf, PAGE as u32, true)]);
        assert_eq!(s, S_OK);
    }
    h.mem.write(ga, &vec![0u8; PAGE as usize]);
    let pid = d.daemon.proc().pid();
    lo.throttle(pid, 2048);

    // The read into page a, offered and left to run.
    let chain = h.blk_chain(0, VIRTIO_BLK_T_IN, 16, &[(a, PAGE as u32, true)]);
    let before = h.queues[0].device_used_idx(&h.mem);
    h.queues[0].enable_calls(&h.mem);
    let offered = Instant::now();
    h.queues[0].submit(&h.mem, &chain);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        h.queues[0].device_used_idx(&h.mem),
        before,
        "the read completed despite the 2 KiB/s limit: nothing was kept in flight"
    );

    // Another page: acked at once, the read still in flight.
    let t = Instant::now();
    assert_eq!(h.iommu().invalidate(b, PAGE), 0);
    let other = t.elapsed();
    let in_flight_after_other = h.queues[0].device_used_idx(&h.mem) == before;

    // The read's page: acked only after the read completed. Its status
    // byte is written before its hold is let go, the used element after:
    // at the ack the status and the data are there.
    let t = Instant::now();
    assert_eq!(h.iommu().invalidate(a, PAGE), 0);
    let overlapping = t.elapsed();
    let status = h.mem.read(h.queues[0].status_gpa(), 1)[0];
    let data = h.mem.read(ga, PAGE as usize);
    let total = offered.elapsed();
    eprintln!(
        "INVALIDATE of another page {other:?}, of the read's page {overlapping:?}; read done {total:?} after it was offered"
    );
    assert!(
        other < Duration::from_millis(500),
        "an INVALIDATE of another page waited {other:?}"
    );
    assert!(
        in_flight_after_other,
        "the read completed before the other page's ack: the test proves nothing"
    );
    assert_eq!(
        status, S_OK,
        "the read's page was acked with the read still in flight"
    );
    assert!(data.iter().all(|&x| x == 0x3c), "the read's data");
    assert!(
        overlapping > Duration::from_millis(500),
        "the overlapping INVALIDATE did not wait ({overlapping:?})"
    );
    h.queues[0]
        .wait_used(&h.mem, TIMEOUT)
        .expect("the read is used");
    // The daemon counts the time an INVALIDATE took to take effect: the
    // overlapping one is the longest.
    let max = d.counter("vfio0", "iotlb_invalidate_max_us");
    assert!(
        u128::from(max) + 100_000 >= overlapping.as_micros(),
        "iotlb_invalidate_max_us {max}, the frontend waited {overlapping:?}"
    );
    assert!(d.counter("vfio0", "iotlb_invalidate_us") >= max);
}
