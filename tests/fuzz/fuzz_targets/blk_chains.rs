//! Descriptor chains over guest memory into virtio-blk (`AsyncQueue::poll`,
//! the queue engine of both doors, on the sync I/O engine), on plain memory
//! or through an IOTLB (the iommu crate's `AddressSpace`, translated by a
//! reader session as vhost-user queues do), with the fault policy,
//! EVENT_IDX, IOTLB updates and invalidations between passes. Each pass
//! polls, then drains what is in flight, as a door's worker does before it
//! lets go of its memory view. Input format: `vcdev_fuzz::blk_step`.
//!
//! Under `Retry` a request that faults is parked (taken from the avail ring,
//! never put back) and walked again at each later pass. Checks, beyond
//! "never panics": unless the rings themselves were remapped (a driver that
//! does that gets what it asked for), once all memory is mapped again a last
//! pass under `Fail` resolves or fails every parked request and completes
//! every in-range head offered (a malformed chain still goes back to the
//! used ring), except the parked chains whose walk again finds them broken
//! for good (a loop or a bad index behind a descriptor or indirect table
//! that faulted when the chain was taken): the queue keeps those parked
//! rather than answer them without a status byte, and they stay parked
//! through a further pass. Then the queue still serves a write and a read
//! that round-trip.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vcdev_device_model::blk::aio::Engine;
use vcdev_device_model::blk::{AsyncQueue, FaultPolicy, InflightMemory, Release};
use vcdev_device_model::testing::{ram_blk, BlkRequest, DriverMem, SplitRing, R, W};
use vcdev_fuzz::{blk_step, BlkStep, Input};
use vcdev_iommu::mem::sealed_memfd;
use vcdev_iommu::{AddressSpace, MemObject, Permissions, Reader, SealPolicy};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryResult};

const PAGE: u64 = 4096;
const MEM: u64 = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// The pages of the rings.
const RING_PAGES: u64 = 3;
/// Where the driver's own buffers go.
const DATA: u64 = 0x1_0000;
const MAX_STEPS: usize = 96;

/// The driver's view of memory in IOTLB mode: the memfd the IOTLB maps.
struct FileMem(File);

impl DriverMem for FileMem {
    fn write_at(&self, addr: u64, data: &[u8]) {
        self.0.write_all_at(data, addr).expect("driver write");
    }

    fn read_at(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.0.read_exact_at(&mut b, addr).expect("driver read");
        b
    }
}

/// A request's hold on its translations: nothing to do (see [`View`]).
#[derive(Debug)]
struct NoHold;

impl Release for NoHold {
    fn release(self) {}
}

/// The device's view of memory for one pass: plain memory or an IOTLB
/// session, with holds that cost nothing.
struct View<'a, M>(&'a M);

impl<M: GuestMemory> GuestMemory for View<'_, M> {
    type PhysicalMemory = M::PhysicalMemory;
    type Bitmap = M::Bitmap;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        self.0.check_range(addr, count, access)
    }

    fn get_slices<'b>(
        &'b self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'b, BS<'b, M::Bitmap>>> {
        self.0.get_slices(addr, count, access)
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        self.0.physical_memory()
    }
}

// SAFETY: every translation, plain or through the IOTLB, points into the one
// mapping of the memfd (the `GuestMemoryMmap`, or the `MemObject` that `Mem`
// keeps for the whole input), which outlives the queue (declared after
// `mem`, so dropped first); IOTLB edits remove translations, never that
// mapping. Besides, every pass drains the queue before the view ends.
unsafe impl<M: GuestMemory> InflightMemory for View<'_, M> {
    type Hold = NoHold;

    fn hold(&self, _ranges: &[(u64, u64)]) -> NoHold {
        NoHold
    }
}

/// Guest memory as the device sees it; the driver always writes the
/// memfd behind it.
enum Mem {
    Plain(GuestMemoryMmap<()>),
    Iotlb {
        obj: Arc<MemObject>,
        space: Arc<AddressSpace>,
        reader: Reader,
    },
}

impl Mem {
    /// One pass of the device over the queue, every fault decided `policy`:
    /// a poll, then a drain of what is in flight. Whether the queue could be
    /// updated throughout.
    fn process(
        &mut self,
        q: &mut AsyncQueue<NoHold>,
        queue: &mut Queue,
        policy: FaultPolicy,
    ) -> bool {
        match self {
            Mem::Plain(m) => pass(q, queue, &View(m), policy),
            Mem::Iotlb { reader, .. } => {
                let s = reader.enter();
                pass(q, queue, &View(&s), policy)
            }
        }
    }

    fn map(&self, iova_page: u64, npages: u64, host_page: u64, perm: Permissions) {
        if let Mem::Iotlb { obj, space, .. } = self {
            let host = host_page % (MEM / PAGE);
            let n = npages.min(MEM / PAGE - host);
            let _ = space.iotlb_update(iova_page * PAGE, n * PAGE, obj, host * PAGE, perm);
        }
    }

    fn unmap(&self, iova_page: u64, npages: u64) {
        if let Mem::Iotlb { space, .. } = self {
            space.iotlb_invalidate(iova_page * PAGE, npages * PAGE);
        }
    }
}

fn pass<M: GuestMemory>(
    q: &mut AsyncQueue<NoHold>,
    queue: &mut Queue,
    view: &View<'_, M>,
    policy: FaultPolicy,
) -> bool {
    // A poll takes at most a ring's worth of chains (`more`); the daemon's
    // worker polls again at once. A ring that still has more after a few
    // rounds offers a chain with every answer (its used index aliases the
    // avail index through the IOTLB): not a sound pass.
    let mut polled = false;
    let mut rounds = 0;
    loop {
        match q.poll(queue, view, &mut |_| policy) {
            Ok(o) if o.more && rounds < 8 => rounds += 1,
            Ok(o) => {
                polled = !o.more;
                break;
            }
            Err(_) => break,
        }
    }
    // A queue error (its used ring unwritable) stops a drain with requests
    // still in flight: the daemon's worker then waits for their I/O and
    // drops them unanswered (`QueueWorker`: broken, `abandon`); so here.
    let drained = polled && q.drain(queue, view).is_ok();
    if !drained {
        q.abandon();
    }
    assert_eq!(q.in_flight(), 0, "a drained queue has requests in flight");
    drained
}

/// The driver's allocator of buffers in the data area.
struct Bump(u64);

impl Bump {
    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.max(1).next_multiple_of(64);
        if self.0 + len > MEM {
            self.0 = DATA;
        }
        let a = self.0;
        self.0 += len;
        a
    }
}

fn perm(p: u8) -> Permissions {
    match p % 4 {
        0 => Permissions::No,
        1 => Permissions::Read,
        2 => Permissions::Write,
        _ => Permissions::ReadWrite,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let iotlb = mode & 1 != 0;
    let policy = if mode & 2 != 0 {
        FaultPolicy::Retry
    } else {
        FaultPolicy::Fail
    };
    let fd = sealed_memfd("blk-fuzz", MEM).expect("memfd");
    let d = FileMem(File::from(fd.try_clone().expect("dup")));
    let mut mem = if iotlb {
        let obj = Arc::new(
            MemObject::from_fd(fd, 0, MEM, SealPolicy::RequireShrinkSeal).expect("mapping"),
        );
        let space = AddressSpace::new();
        let reader = space.reader();
        let m = Mem::Iotlb { obj, space, reader };
        if mode & 8 == 0 {
            m.map(0, MEM / PAGE, 0, Permissions::ReadWrite);
        }
        m
    } else {
        let file = FileOffset::new(File::from(fd), 0);
        let ranges = [(GuestAddress(0), MEM as usize, Some(file))];
        Mem::Plain(GuestMemoryMmap::from_ranges_with_files(&ranges).expect("guest memory"))
    };
    let dev = ram_blk(64 * 512, Default::default());
    let engine = Engine::new(dev.aio(), dev.backend().clone(), dev.queue_size());
    let mut blk: AsyncQueue<NoHold> = AsyncQueue::new(dev, engine);
    let mut queue = Queue::new(QSIZE).expect("queue");
    queue
        .try_set_desc_table_address(GuestAddress(DESC))
        .expect("desc");
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL))
        .expect("avail");
    queue
        .try_set_used_ring_address(GuestAddress(USED))
        .expect("used");
    queue.set_event_idx(mode & 4 != 0);
    queue.set_ready(true);
    let mut ring = SplitRing::new(QSIZE, DESC, AVAIL, USED);
    let mut bump = Bump(DATA);
    let mut next_desc = 0u16;
    // Heads offered in range, and whether the oracle still holds.
    let mut offered = 0u16;
    let mut outstanding = 0u16;
    let mut sound = true;
    let mut steps = 0;
    while !inp.is_empty() && steps < MAX_STEPS {
        steps += 1;
        match blk_step(&mut inp) {
            BlkStep::Desc {
                idx,
                addr,
                len,
                flags,
                next,
            } => {
                let i = u16::from(idx) % QSIZE;
                ring.write_desc(&d, i, Descriptor::new(addr, len, flags, next));
            }
            BlkStep::Offer(head) => {
                if outstanding >= QSIZE {
                    sound &= mem.process(&mut blk, &mut queue, policy);
                    outstanding = 0;
                }
                ring.offer(&d, head);
                outstanding += 1;
                if head < QSIZE {
                    offered = offered.wrapping_add(1);
                }
            }
            BlkStep::Write { addr, data } => {
                let mut a = u64::from(addr) % MEM;
                let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
                // Not over the avail and used rings: the driver owns their indexes.
                if a < RING_PAGES * PAGE && a.saturating_add(len) > AVAIL {
                    a = RING_PAGES * PAGE + a % PAGE;
                }
                let n = data.len().min(usize::try_from(MEM - a).unwrap_or(0));
                d.write_at(a, &data[..n]);
            }
            BlkStep::Process => {
                sound &= mem.process(&mut blk, &mut queue, policy);
                outstanding = 0;
            }
            BlkStep::Map {
                iova_page,
                npages,
                host_page,
                perm: p,
            } => {
                let (iova, n) = (u64::from(iova_page), u64::from(npages));
                if iotlb && iova < RING_PAGES {
                    sound = false;
                }
                mem.map(iova, n, u64::from(host_page), perm(p));
            }
            BlkStep::Unmap { iova_page, npages } => {
                let (iova, n) = (u64::from(iova_page), u64::from(npages));
                if iotlb && iova < RING_PAGES && n > 0 {
                    sound = false;
                }
                mem.unmap(iova, n);
            }
            BlkStep::Request {
                kind,
                sector,
                bufs,
                status_len,
            } => {
                if outstanding >= QSIZE {
                    sound &= mem.process(&mut blk, &mut queue, policy);
                    outstanding = 0;
                }
                let req = BlkRequest::new(kind, sector);
                let header = bump.alloc(u64::from(BlkRequest::HEADER_LEN));
                let status = bump.alloc(u64::from(status_len));
                req.write(&d, header, status);
                let data: Vec<(u64, u32, u16)> = bufs
                    .iter()
                    .map(|&(len, w)| {
                        let a = bump.alloc(u64::from(len));
                        (a, u32::from(len), if w { W } else { R })
                    })
                    .collect();
                let mut chain = BlkRequest::chain(header, &data, status);
                if let Some(last) = chain.last_mut() {
                    last.1 = u32::from(status_len);
                }
                let head = next_desc;
                next_desc = ring.write_chain(&d, head, &chain) % QSIZE;
                ring.offer(&d, head);
                outstanding += 1;
                offered = offered.wrapping_add(1);
            }
        }
    }
    // Everything mapped again; the last pass walks the parked requests
    // again and fails what faults.
    mem.map(0, MEM / PAGE, 0, Permissions::ReadWrite);
    sound &= mem.process(&mut blk, &mut queue, FaultPolicy::Fail);
    if !sound {
        return;
    }
    let used = ring.device_used_idx(&d);
    let parked = u16::try_from(blk.parked()).expect("parked count");
    assert_eq!(
        used.wrapping_add(parked),
        offered,
        "{offered} chains offered in range, {used} came back on the used ring, {parked} parked"
    );
    // What is still parked is broken for good: another pass changes nothing.
    if parked > 0 {
        assert!(mem.process(&mut blk, &mut queue, FaultPolicy::Fail));
        assert_eq!(
            ring.device_used_idx(&d),
            used,
            "a parked chain completed later"
        );
        assert_eq!(blk.parked(), usize::from(parked));
    }
    // The queue still works: a write, then a read of the same sector.
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut statuses = Vec::new();
    for (kind, flags) in [(VIRTIO_BLK_T_OUT, R), (VIRTIO_BLK_T_IN, W)] {
        let header = bump.alloc(u64::from(BlkRequest::HEADER_LEN));
        let buf = bump.alloc(512);
        let status = bump.alloc(1);
        if kind == VIRTIO_BLK_T_OUT {
            d.write_at(buf, &pattern);
        } else {
            d.write_at(buf, &[0u8; 512]);
        }
        d.write_at(status, &[0xff]);
        BlkRequest::new(kind, 3).write(&d, header, status);
        let chain = BlkRequest::chain(header, &[(buf, 512, flags)], status);
        let head = next_desc;
        next_desc = ring.write_chain(&d, head, &chain) % QSIZE;
        ring.offer(&d, head);
        statuses.push((status, buf));
        assert!(mem.process(&mut blk, &mut queue, FaultPolicy::Fail));
    }
    for &(status, _) in &statuses {
        assert_eq!(
            d.read_at(status, 1)[0],
            VIRTIO_BLK_S_OK as u8,
            "a valid request after the fuzzed ones failed"
        );
    }
    assert_eq!(d.read_at(statuses[1].1, 512), pattern, "read back differs");
});
