//! Shared builders for the virtio-blk tests: guest memory (whose holds are counted), and a
//! driver-side queue over [`crate::testing`]'s split ring and request encoder, with the
//! device's queue worker ([`AsyncQueue`], as the doors drive it).
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::iommu::{Error as IommuError, IovaRange};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    Permissions,
};

use super::aio::Engine;
use super::{AsyncQueue, BlkDevice, FaultPolicy, InflightMemory, QueueOutcome, Release};
pub use crate::testing::{blk_segments, ram_blk, NEXT, R, W};
use crate::testing::{BlkRequest, SplitRing, DESC_LEN, STATUS_UNSET};

/// Guest memory size used by the tests.
pub const MEM_SIZE: usize = 16 << 20;
/// Where data buffers start (the rings sit below).
pub const BUF_START: u64 = 1 << 20;
/// Where the used ring goes.
pub const USED_RING: u64 = 0x8_0000;
/// Where indirect tables go.
pub const INDIRECT_START: u64 = 12 << 20;

pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Plain guest memory.
pub fn plain_mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

thread_local! {
    /// Holds taken and not released on this thread: token -> ranges.
    static HOLDS: RefCell<HashMap<u64, Vec<(u64, u64)>>> = RefCell::new(HashMap::new());
    static NEXT_HOLD: RefCell<u64> = const { RefCell::new(1) };
}

/// A hold of the test memories: its number.
#[derive(Debug)]
pub struct HoldToken(u64);

fn take_hold(ranges: &[(u64, u64)]) -> HoldToken {
    let id = NEXT_HOLD.with(|n| {
        let mut n = n.borrow_mut();
        *n += 1;
        *n
    });
    HOLDS.with(|h| h.borrow_mut().insert(id, ranges.to_vec()));
    HoldToken(id)
}

impl Release for HoldToken {
    fn release(self) {
        let had = HOLDS.with(|h| h.borrow_mut().remove(&self.0));
        assert!(had.is_some(), "release of a hold never taken: {self:?}");
    }
}

/// How many holds were ever taken on this thread.
pub fn holds_taken() -> u64 {
    NEXT_HOLD.with(|n| *n.borrow() - 1)
}

/// The ranges of every hold taken on this thread and not released yet.
pub fn holds() -> Vec<Vec<(u64, u64)>> {
    HOLDS.with(|h| h.borrow().values().cloned().collect())
}

// SAFETY: test memory outlives every queue of the test that uses it (each test completes or
// drains what its queues have in flight before the memory is dropped).
unsafe impl InflightMemory for GuestMemoryMmap<()> {
    type Hold = HoldToken;
    fn hold(&self, ranges: &[(u64, u64)]) -> HoldToken {
        take_hold(ranges)
    }
}

// SAFETY: as above.
unsafe impl InflightMemory for FaultyMem {
    type Hold = HoldToken;
    fn hold(&self, ranges: &[(u64, u64)]) -> HoldToken {
        take_hold(ranges)
    }
}

/// Guest memory behind a pretend IOMMU that refuses one range.
#[derive(Debug)]
pub struct FaultyMem {
    pub inner: GuestMemoryMmap<()>,
    /// `(start, len, access that faults)`: an access overlapping the range and needing any of
    /// the listed permissions fails with an IOMMU error.
    pub poison: Mutex<Option<(u64, u64, Permissions)>>,
    /// `(start, len, verdicts)`: each lookup overlapping the range, of any access, takes the
    /// next verdict (`true`: it faults); once they run out the range faults (its translation
    /// is gone) until [`FaultyMem::heal`]. An IOTLB whose entries come and go between lookups.
    pub script: Mutex<Option<(u64, u64, std::collections::VecDeque<bool>)>>,
}

impl FaultyMem {
    pub fn new() -> Self {
        Self {
            inner: plain_mem(),
            poison: Mutex::new(None),
            script: Mutex::new(None),
        }
    }

    /// Script the lookups of `start..start+len` (see [`FaultyMem::script`]).
    pub fn script(&self, start: u64, len: u64, verdicts: &[bool]) {
        *self.script.lock().unwrap() = Some((start, len, verdicts.iter().copied().collect()));
    }

    pub fn poison(&self, start: u64, len: u64, access: Permissions) {
        *self.poison.lock().unwrap() = Some((start, len, access));
    }

    pub fn heal(&self) {
        *self.poison.lock().unwrap() = None;
        *self.script.lock().unwrap() = None;
    }

    fn faults(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        let end = addr.0.saturating_add(count as u64);
        if let Some((start, len, verdicts)) = self.script.lock().unwrap().as_mut() {
            if addr.0 < *start + *len && *start < end {
                return verdicts.pop_front().unwrap_or(true);
            }
        }
        let Some((start, len, bad)) = *self.poison.lock().unwrap() else {
            return false;
        };
        addr.0 < start + len && start < end && (access as u8 & bad as u8) != 0
    }
}

impl GuestMemory for FaultyMem {
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        !self.faults(addr, count, access)
            && GuestMemoryBackend::check_range(&self.inner, addr, count)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'a, BS<'a, ()>>, GuestMemoryError> {
        if self.faults(addr, count, access) {
            return Err(GuestMemoryError::IommuError(IommuError::CannotResolve {
                iova_range: IovaRange {
                    base: addr,
                    length: count,
                },
                reason: "test miss".into(),
            }));
        }
        Ok(GuestMemoryBackend::get_slices(&self.inner, addr, count))
    }
}

/// One buffer of a request, from the driver's side.
#[derive(Clone, Debug)]
pub enum Buf {
    /// Device-readable bytes.
    Out(Vec<u8>),
    /// Device-writable bytes, this many.
    In(u32),
}

/// The driver side of one queue, plus the device's queue worker.
pub struct Driver<'m, M: InflightMemory> {
    pub mem: &'m M,
    pub vq: MockSplitQueue<'m, M>,
    pub ring: SplitRing,
    pub queue: Queue,
    /// The device's worker for this queue, on the engine the device's `aio` names (sync unless
    /// set; always sync on RAM), or the one given to [`Driver::with_engine`].
    pub blk: AsyncQueue<M::Hold>,
    pub size: u16,
    next_desc: u16,
    next_buf: u64,
    next_indirect: u64,
}

/// A completed request, as the driver sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    pub head: u16,
    pub used_len: u32,
    /// The status byte (0xff if the device never wrote it).
    pub status: u8,
    /// The device-writable data buffers (without the status byte), concatenated.
    pub data: Vec<u8>,
}

/// Where a submitted request's buffers are.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub head: u16,
    pub descs: Vec<(u64, u32, u16)>,
}

impl<'m, M: InflightMemory> Driver<'m, M> {
    pub fn new(mem: &'m M, device: Arc<BlkDevice>, size: u16) -> Self {
        let engine = Engine::new(device.aio(), device.backend().clone(), device.queue_size());
        Self::with_engine(mem, device, size, engine)
    }

    /// A driver whose device queue does its I/O on `engine`.
    pub fn with_engine(mem: &'m M, device: Arc<BlkDevice>, size: u16, engine: Engine) -> Self {
        let vq = MockSplitQueue::new(mem, size);
        let mut queue: Queue = vq.create_queue().unwrap();
        // MockSplitQueue puts the used ring over the end of the avail ring (it sizes the avail
        // ring by entries, not bytes); move it clear so that many chains can be in flight.
        queue.set_ready(false);
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        assert_eq!(queue.used_ring(), USED_RING);
        let ring = SplitRing::new(size, vq.desc_table_addr().0, vq.avail_addr().0, USED_RING);
        Self {
            mem,
            vq,
            ring,
            queue,
            blk: AsyncQueue::new(device, engine),
            size,
            next_desc: 0,
            next_buf: BUF_START,
            next_indirect: INDIRECT_START,
        }
    }

    /// Guest memory for a buffer of `len` bytes, filled with `fill`.
    pub fn alloc(&mut self, len: u32, fill: u8) -> u64 {
        let addr = self.next_buf;
        self.next_buf += u64::from(len).max(1).next_multiple_of(64);
        if self.next_buf >= INDIRECT_START {
            self.next_buf = BUF_START + u64::from(len).max(1).next_multiple_of(64);
            return self.alloc_at(BUF_START, len, fill);
        }
        self.alloc_at(addr, len, fill)
    }

    fn alloc_at(&self, addr: u64, len: u32, fill: u8) -> u64 {
        self.mem
            .write_slice(&vec![fill; len as usize], GuestAddress(addr))
            .unwrap();
        addr
    }

    /// Write raw descriptors at table indices, and offer `head`.
    pub fn offer_raw(&mut self, entries: &[(u16, Descriptor)], head: u16) {
        for (idx, desc) in entries {
            self.ring.write_desc(self.mem, *idx, *desc);
        }
        self.offer(head);
    }

    /// Put `head` on the avail ring.
    pub fn offer(&mut self, head: u16) {
        self.ring.offer(self.mem, head);
    }

    /// Lay out `descs` (addr, len, flags) as a direct chain and offer it.
    pub fn submit_descs(&mut self, descs: &[(u64, u32, u16)]) -> Submitted {
        let head = self.next_desc;
        self.ring.write_chain(self.mem, head, descs);
        self.next_desc = (head + descs.len().max(1) as u16) % self.size;
        self.offer(head);
        Submitted {
            head,
            descs: descs.to_vec(),
        }
    }

    /// Lay out `descs` as an indirect table and offer a chain of one indirect descriptor.
    pub fn submit_indirect(&mut self, descs: &[Descriptor]) -> Submitted {
        let table = self.next_indirect;
        let indirect = SplitRing::new(descs.len().max(1) as u16, table, 0, 0);
        for (i, d) in descs.iter().enumerate() {
            indirect.write_desc(self.mem, i as u16, *d);
        }
        self.next_indirect += (DESC_LEN * descs.len() as u64).next_multiple_of(64);
        let len = (DESC_LEN * descs.len() as u64) as u32;
        self.submit_descs(&[(table, len, INDIRECT)])
    }

    /// Build a request: header, then `bufs`, then a status byte (prefilled with 0xff).
    pub fn request(&mut self, kind: u32, sector: u64, bufs: &[Buf]) -> Submitted {
        let req = BlkRequest::new(kind, sector);
        let header = self.alloc(BlkRequest::HEADER_LEN, 0);
        let data: Vec<_> = bufs
            .iter()
            .map(|b| match b {
                Buf::Out(bytes) => (self.alloc_bytes(bytes), bytes.len() as u32, R),
                Buf::In(len) => (self.alloc(*len, 0xee), *len, W),
            })
            .collect();
        let status = self.alloc(1, STATUS_UNSET);
        req.write(self.mem, header, status);
        self.submit_descs(&BlkRequest::chain(header, &data, status))
    }

    pub fn alloc_bytes(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.alloc(bytes.len() as u32, 0);
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// Run the device on the queue as the doors do ([`AsyncQueue::poll`], every fault decided
    /// by `policy`), synchronously: poll, wait for what is in flight, and poll again until a
    /// poll completes nothing and nothing is in flight. Every chain on the avail ring is taken
    /// (unless the device's I/O limits hold one back); each one is complete then, or parked on
    /// an IOMMU fault (under Retry). The outcomes are summed: chains completed, whether any
    /// batch had to notify, the first fault.
    pub fn run(&mut self, policy: FaultPolicy) -> QueueOutcome {
        fn add(total: &mut QueueOutcome, out: QueueOutcome) {
            total.completed += out.completed;
            total.notify |= out.notify;
            total.fault = total.fault.or(out.fault);
        }
        let mut total = QueueOutcome::default();
        loop {
            let out = self
                .blk
                .poll(&mut self.queue, self.mem, &mut |_| policy)
                .unwrap();
            add(&mut total, out);
            if self.blk.in_flight() > 0 {
                let drained = self.blk.drain(&mut self.queue, self.mem).unwrap();
                add(&mut total, drained);
                assert_eq!(self.blk.in_flight(), 0, "drain left requests in flight");
            } else if out.completed == 0 {
                return total;
            }
        }
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.ring.device_used_idx(self.mem)
    }

    /// Take the next used element, reading back the buffers of `sub`.
    pub fn take_used(&mut self, sub: &Submitted) -> Done {
        let used = self.ring.pop_used(self.mem).expect("no used element");
        let (status_addr, status_len, _) = *sub.descs.last().unwrap();
        let status = self
            .mem
            .read_obj(GuestAddress(status_addr + u64::from(status_len.max(1)) - 1))
            .unwrap_or(STATUS_UNSET);
        let mut data = Vec::new();
        let n = sub.descs.len();
        for (i, (addr, len, flags)) in sub.descs.iter().enumerate() {
            if flags & W != 0 && flags & INDIRECT == 0 {
                let len = if i + 1 == n {
                    len.saturating_sub(1)
                } else {
                    *len
                };
                let mut buf = vec![0u8; len as usize];
                // Buffers outside guest memory read back as nothing.
                let _ = self.mem.read_slice(&mut buf, GuestAddress(*addr));
                data.extend_from_slice(&buf);
            }
        }
        Done {
            head: used.id as u16,
            used_len: used.len,
            status,
            data,
        }
    }

    /// Submit one request, run the device, and take its completion.
    pub fn exec(&mut self, kind: u32, sector: u64, bufs: &[Buf]) -> Done {
        let sub = self.request(kind, sector, bufs);
        let out = self.run(FaultPolicy::Fail);
        assert!(out.fault.is_none());
        assert_eq!(self.blk.parked(), 0);
        let done = self.take_used(&sub);
        assert_eq!(done.head, sub.head);
        done
    }

    pub fn read(&mut self, sector: u64, len: u32) -> Done {
        self.exec(VIRTIO_BLK_T_IN, sector, &[Buf::In(len)])
    }

    pub fn write(&mut self, sector: u64, data: &[u8]) -> Done {
        self.exec(VIRTIO_BLK_T_OUT, sector, &[Buf::Out(data.to_vec())])
    }

    pub fn flush(&mut self) -> Done {
        self.exec(VIRTIO_BLK_T_FLUSH, 0, &[])
    }

    pub fn get_id(&mut self, len: u32) -> Done {
        self.exec(VIRTIO_BLK_T_GET_ID, 0, &[Buf::In(len)])
    }

    pub fn discard(&mut self, segs: &[(u64, u32, u32)]) -> Done {
        self.exec(VIRTIO_BLK_T_DISCARD, 0, &[Buf::Out(blk_segments(segs))])
    }

    pub fn write_zeroes(&mut self, segs: &[(u64, u32, u32)]) -> Done {
        self.exec(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[Buf::Out(blk_segments(segs))],
        )
    }
}

/// A recognisable pattern of `len` bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Make sure `Queue` stays ready (compile-time use of the trait).
pub fn ready(q: &Queue) -> bool {
    q.ready()
}
