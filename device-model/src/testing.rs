//! Test-only builders shared by this crate's unit tests and the integration tests in `tests/`
//! (feature `testing`, off by default): the driver's side of a split virtqueue
//! ([`SplitRing`]), the virtio-blk request encoder ([`BlkRequest`], [`blk_segments`]) and a
//! RAM-disk device fixture ([`ram_blk`], [`blk`]).
//!
//! The ring driver works on any memory the test can write through [`DriverMem`]: every
//! [`GuestMemory`] (this crate's tests), or the integration harness's own mappings of the memfds
//! it shares with the daemon. Where buffers go is the caller's business: the ring only writes
//! descriptors, the avail ring and `used_event`, and reads the used ring.

use std::mem::{offset_of, size_of};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{virtio_blk_discard_write_zeroes, virtio_blk_outhdr};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
pub use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions,
};

use crate::blk::request::{HEADER_LEN, SEGMENT_LEN};
use crate::blk::{BlkConfig, BlkDevice, BlockBackend, InflightMemory, RamBackend, Release};

/// Descriptor flags: device-readable (no flag).
pub const R: u16 = 0;
/// Descriptor flags: device-writable.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flags: the chain goes on.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// The used ring's flag that asks the driver not to notify.
pub const NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;
/// Bytes of one split-ring descriptor.
pub const DESC_LEN: u64 = size_of::<RawDescriptor>() as u64;
/// The status byte a driver leaves before submitting, so that an untouched one shows.
pub const STATUS_UNSET: u8 = 0xff;

/// One descriptor of a chain to lay out: (address, length, flags without `NEXT`).
pub type Desc = (u64, u32, u16);

/// Memory as a test driver sees it. Accesses out of range panic: they are test bugs.
pub trait DriverMem {
    /// Writes `data` at `addr`.
    fn write_at(&self, addr: u64, data: &[u8]);
    /// Reads `len` bytes at `addr`.
    fn read_at(&self, addr: u64, len: usize) -> Vec<u8>;
    /// Writes a little-endian u16 (a ring index or entry).
    fn write_u16(&self, addr: u64, v: u16) {
        self.write_at(addr, &v.to_le_bytes());
    }
    /// Reads a little-endian u16 (a ring index or entry).
    fn read_u16(&self, addr: u64) -> u16 {
        let b = self.read_at(addr, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
    /// Reads a little-endian u32 (a used element's id or length).
    fn read_u32(&self, addr: u64) -> u32 {
        let b = self.read_at(addr, 4);
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl<M: GuestMemory> DriverMem for M {
    fn write_at(&self, addr: u64, data: &[u8]) {
        self.write_slice(data, GuestAddress(addr))
            .unwrap_or_else(|e| panic!("write at {addr:#x}: {e}"));
    }

    fn read_at(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.read_slice(&mut buf, GuestAddress(addr))
            .unwrap_or_else(|e| panic!("read at {addr:#x}: {e}"));
        buf
    }

    fn write_u16(&self, addr: u64, v: u16) {
        self.write_obj(v, GuestAddress(addr))
            .unwrap_or_else(|e| panic!("write at {addr:#x}: {e}"));
    }

    fn read_u16(&self, addr: u64) -> u16 {
        self.read_obj(GuestAddress(addr))
            .unwrap_or_else(|e| panic!("read at {addr:#x}: {e}"))
    }

    fn read_u32(&self, addr: u64) -> u32 {
        self.read_obj(GuestAddress(addr))
            .unwrap_or_else(|e| panic!("read at {addr:#x}: {e}"))
    }
}

/// One element of the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The head of the chain.
    pub id: u32,
    /// Bytes the device wrote.
    pub len: u32,
}

/// The driver's side of one split virtqueue (virtio 1.2 section 2.7): where its three parts are,
/// and the avail and used indices the driver has reached.
#[derive(Clone, Debug)]
pub struct SplitRing {
    /// Entries.
    pub size: u16,
    /// Address of the descriptor table.
    pub desc: u64,
    /// Address of the avail (driver) ring.
    pub avail: u64,
    /// Address of the used (device) ring.
    pub used: u64,
    avail_idx: u16,
    used_idx: u16,
}

impl SplitRing {
    /// A ring of `size` entries at the given addresses, indices at 0.
    pub fn new(size: u16, desc: u64, avail: u64, used: u64) -> Self {
        assert!(size > 0, "a ring has entries");
        Self {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_idx: 0,
        }
    }

    /// Writes descriptor `i` of the table as given (any flags and `next`).
    pub fn write_desc(&self, mem: &impl DriverMem, i: u16, desc: Descriptor) {
        let raw = RawDescriptor::from(desc);
        mem.write_at(self.desc + DESC_LEN * u64::from(i), raw.as_slice());
    }

    /// Lays `chain` out as table entries `head`, `head + 1`, ... (wrapping at the ring size),
    /// linked with `NEXT`; the last entry's `next` is 0. Returns the entry after the chain.
    pub fn write_chain(&self, mem: &impl DriverMem, head: u16, chain: &[Desc]) -> u16 {
        assert!(
            chain.len() <= usize::from(self.size),
            "chain longer than the ring"
        );
        let mut idx = head % self.size;
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let next_idx = (idx + 1) % self.size;
            let (flags, next) = if i + 1 < chain.len() {
                (flags | NEXT, next_idx)
            } else {
                (flags, 0)
            };
            self.write_desc(mem, idx, Descriptor::new(addr, len, flags, next));
            idx = next_idx;
        }
        idx
    }

    /// Puts `head` on the avail ring and publishes the new avail index.
    pub fn offer(&mut self, mem: &impl DriverMem, head: u16) {
        let slot = self.avail_idx % self.size;
        mem.write_u16(self.avail + 4 + 2 * u64::from(slot), head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_u16(self.avail + 2, self.avail_idx);
    }

    /// Writes `used_event` (the avail ring's trailing field under `VIRTIO_RING_F_EVENT_IDX`).
    pub fn set_used_event(&self, mem: &impl DriverMem, idx: u16) {
        mem.write_u16(self.avail + 4 + 2 * u64::from(self.size), idx);
    }

    /// Asks for a notification at the next used element (`used_event` = the used index consumed
    /// so far, as Linux's `virtqueue_enable_cb` does).
    pub fn enable_calls(&self, mem: &impl DriverMem) {
        self.set_used_event(mem, self.used_idx);
    }

    /// The used index as the device left it.
    pub fn device_used_idx(&self, mem: &impl DriverMem) -> u16 {
        mem.read_u16(self.used + 2)
    }

    /// The next used element the driver has not consumed, if the device has put one.
    pub fn pop_used(&mut self, mem: &impl DriverMem) -> Option<Used> {
        if self.device_used_idx(mem) == self.used_idx {
            return None;
        }
        let elem = self.used + 4 + 8 * u64::from(self.used_idx % self.size);
        self.used_idx = self.used_idx.wrapping_add(1);
        Some(Used {
            id: mem.read_u32(elem),
            len: mem.read_u32(elem + 4),
        })
    }

    /// The avail index the driver has published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Whether the device asks to be notified of what was offered since the avail index was
    /// `old` (virtio 1.2 section 2.7.10, as Linux's `virtqueue_kick_prepare`): under
    /// `VIRTIO_RING_F_EVENT_IDX`, whether its `avail_event` lies in `old..new`; without it,
    /// unless the used ring's flags say `VRING_USED_F_NO_NOTIFY`.
    pub fn kick_wanted(&self, mem: &impl DriverMem, old: u16, event_idx: bool) -> bool {
        // The new avail index is visible before the device's field is read.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if event_idx {
            let event = mem.read_u16(self.used + 4 + 8 * u64::from(self.size));
            let new = self.avail_idx;
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            mem.read_u16(self.used) & NO_NOTIFY == 0
        }
    }

    /// The used index the driver has consumed up to.
    pub fn used_idx(&self) -> u16 {
        self.used_idx
    }

    /// Forgets ring progress and zeroes both rings' flags and indices (after a device reset).
    pub fn reset(&mut self, mem: &impl DriverMem) {
        self.avail_idx = 0;
        self.used_idx = 0;
        mem.write_at(self.avail, &[0u8; 4]);
        mem.write_at(self.used, &[0u8; 4]);
    }
}

/// A virtio-blk request from the driver's side (virtio 1.2 section 5.2.6): its header and the
/// descriptor chain around its data buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    /// `VIRTIO_BLK_T_*`.
    pub kind: u32,
    /// First sector.
    pub sector: u64,
}

impl BlkRequest {
    /// Bytes of the header (`struct virtio_blk_outhdr`).
    pub const HEADER_LEN: u32 = HEADER_LEN as u32;

    /// A request of type `kind` at `sector`.
    pub fn new(kind: u32, sector: u64) -> Self {
        Self { kind, sector }
    }

    /// The encoded header (little endian, `ioprio` 0).
    pub fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        let kind = offset_of!(virtio_blk_outhdr, type_);
        let sector = offset_of!(virtio_blk_outhdr, sector);
        h[kind..kind + 4].copy_from_slice(&self.kind.to_le_bytes());
        h[sector..sector + 8].copy_from_slice(&self.sector.to_le_bytes());
        h
    }

    /// Writes the header at `header` and [`STATUS_UNSET`] at `status`.
    pub fn write(&self, mem: &impl DriverMem, header: u64, status: u64) {
        mem.write_at(header, &self.header());
        mem.write_at(status, &[STATUS_UNSET]);
    }

    /// The chain: the header at `header` (device-readable), `bufs`, then the status byte at
    /// `status` (device-writable). Addresses are the device's (IOVAs under an IOMMU).
    pub fn chain(header: u64, bufs: &[Desc], status: u64) -> Vec<Desc> {
        let mut chain = Vec::with_capacity(bufs.len() + 2);
        chain.push((header, Self::HEADER_LEN, R));
        chain.extend_from_slice(bufs);
        chain.push((status, 1, W));
        chain
    }
}

/// Encodes DISCARD / WRITE_ZEROES segments, each `(sector, num_sectors, flags)`
/// (`struct virtio_blk_discard_write_zeroes`).
pub fn blk_segments(segs: &[(u64, u32, u32)]) -> Vec<u8> {
    let sector = offset_of!(virtio_blk_discard_write_zeroes, sector);
    let num = offset_of!(virtio_blk_discard_write_zeroes, num_sectors);
    let flags = offset_of!(virtio_blk_discard_write_zeroes, flags);
    let mut out = vec![0u8; SEGMENT_LEN * segs.len()];
    for (seg, (s, n, f)) in out.chunks_exact_mut(SEGMENT_LEN).zip(segs) {
        seg[sector..sector + 8].copy_from_slice(&s.to_le_bytes());
        seg[num..num + 4].copy_from_slice(&n.to_le_bytes());
        seg[flags..flags + 4].copy_from_slice(&f.to_le_bytes());
    }
    out
}

/// A virtio-blk device over a RAM disk of `len` bytes with options `cfg`.
pub fn ram_blk(len: u64, cfg: BlkConfig) -> Arc<BlkDevice> {
    let backend: Arc<dyn BlockBackend> = Arc::new(RamBackend::new(len).expect("RAM disk"));
    Arc::new(BlkDevice::new(backend, cfg).expect("virtio-blk device"))
}

/// The usual device fixture: a 1 MiB RAM disk with the default options.
pub fn blk() -> Arc<BlkDevice> {
    ram_blk(1 << 20, BlkConfig::default())
}

/// Plain guest memory whose holds cost nothing (no bookkeeping, no allocation): for
/// measuring the queue's own work and counting its own allocations.
#[derive(Debug)]
pub struct FreeHolds(pub GuestMemoryMmap<()>);

/// The hold of [`FreeHolds`]: nothing.
#[derive(Debug)]
pub struct FreeHold;

impl Release for FreeHold {
    fn release(self) {}
}

impl GuestMemory for FreeHolds {
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        GuestMemory::check_range(&self.0, addr, count, access)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Result<impl GuestMemorySliceIterator<'a, BS<'a, ()>>, GuestMemoryError> {
        GuestMemory::get_slices(&self.0, addr, count, access)
    }
}

// SAFETY: test-only memory (feature `testing`) that nothing unmaps while it lives: its users,
// this crate's tests and benches, complete or drain every queue polled with it before they
// drop it, so no request in flight outlives the pages it reads or writes.
#[allow(unsafe_code)]
unsafe impl InflightMemory for FreeHolds {
    type Hold = FreeHold;
    fn hold(&self, _ranges: &[(u64, u64)]) -> FreeHold {
        FreeHold
    }
}
