//! Driver-side memory and split rings: guest memory in sealed memfds
//! ([`Region`], [`GuestMem`]), the layout the test drivers use (rings and
//! request headers in one region, data in another) and a split virtqueue
//! driven from userspace ([`DriverQueue`]) over device-model's `testing`
//! ring driver. The vhost-user harness of `tests/common/frontend.rs` and
//! the VFIO driver of [`crate::blk`] share them.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vcdev_device_model::testing::{
    BlkRequest, Desc as RingDesc, Descriptor, DriverMem, SplitRing, R, W,
};
use vcdev_iommu::{MemObject, SealPolicy};
use vhost::{VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use vmm_sys_util::eventfd::EventFd;

// ---------------------------------------------------------------------------
// Guest memory

/// One region of guest memory: a sealed memfd, mapped here too.
pub struct Region {
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// The memfd (sent with SET_MEM_TABLE / ADD_MEM_REG).
    pub file: File,
    /// Our mapping; its address is the "user address" the backend sees.
    pub map: Arc<MemObject>,
    /// Where the region starts in `file` (the table's mmap_offset).
    pub offset: u64,
}

impl Region {
    /// A new zeroed region at `gpa`.
    pub fn new(gpa: u64, size: u64) -> Region {
        let fd = vcdev_iommu::mem::sealed_memfd("guest", size).expect("memfd");
        Region::in_file(gpa, size, &File::from(fd), 0)
    }

    /// A region at `gpa` of `size` bytes that starts at `offset` in `file`
    /// (QEMU gives one RAM block's memfd for several regions so).
    pub fn in_file(gpa: u64, size: u64, file: &File, offset: u64) -> Region {
        let file = file.try_clone().expect("dup");
        let dup: OwnedFd = file.try_clone().expect("dup").into();
        let map = Arc::new(
            MemObject::from_fd(dup, offset, size, SealPolicy::AllowUnsealed).expect("map"),
        );
        Region {
            gpa,
            size,
            file,
            map,
            offset,
        }
    }

    /// The frontend's user address of the first byte.
    pub fn uaddr(&self) -> u64 {
        self.map.host_base() as u64
    }

    /// The vhost description of this region.
    pub fn info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.uaddr(),
            mmap_offset: self.offset,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let off = gpa.checked_sub(self.gpa)?;
        self.map
            .contains(off, len as u64)
            .then(|| self.map.host_base().wrapping_add(off as usize))
    }
}

/// The guest's memory: a few regions.
#[derive(Default)]
pub struct GuestMem {
    /// The regions.
    pub regions: Vec<Region>,
}

impl GuestMem {
    fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        self.regions
            .iter()
            .find_map(|r| r.ptr(gpa, len))
            .unwrap_or_else(|| panic!("GPA {gpa:#x}+{len} outside guest memory"))
    }

    /// Writes `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let p = self.ptr(gpa, data.len());
        // SAFETY: p..p+len lies inside one of our shared mappings.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.ptr(gpa, len);
        let mut v = vec![0u8; len];
        // SAFETY: p..p+len lies inside one of our shared mappings.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) }
        v
    }

    /// The user address of `gpa`.
    pub fn uaddr(&self, gpa: u64) -> u64 {
        self.ptr(gpa, 1) as u64
    }
}

/// The ring driver of device-model's `testing` writes through this; ring
/// indices are accessed volatile and fenced, as the device runs concurrently.
impl DriverMem for GuestMem {
    fn write_at(&self, gpa: u64, data: &[u8]) {
        self.write(gpa, data);
    }

    fn read_at(&self, gpa: u64, len: usize) -> Vec<u8> {
        self.read(gpa, len)
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let p = self.ptr(gpa, 2);
        // SAFETY: 2 bytes inside a mapping; the device writes it concurrently.
        u16::from_le(unsafe { std::ptr::read_volatile(p.cast::<u16>()) })
    }

    fn write_u16(&self, gpa: u64, v: u16) {
        let p = self.ptr(gpa, 2);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: 2 bytes inside a mapping.
        unsafe { std::ptr::write_volatile(p.cast::<u16>(), v.to_le()) }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// Layout: region 0 (rings, request headers, status bytes), region 1 (data).

/// GPA of the ring/metadata region.
pub const META_GPA: u64 = 0x1000_0000;
/// Its size.
pub const META_SIZE: u64 = 4 << 20;
/// GPA of the data region.
pub const DATA_GPA: u64 = 0x4000_0000;
/// Its size.
pub const DATA_SIZE: u64 = 8 << 20;
/// Data bytes per queue.
pub const DATA_PER_QUEUE: u64 = 1 << 20;

/// One descriptor of a chain to build: (GPA, length, device-writable).
pub type Desc = (u64, u32, bool);

/// A split virtqueue driven by the test: device-model's [`SplitRing`] in
/// this queue's slot of the metadata region, with its kick and call eventfds.
pub struct DriverQueue {
    /// Queue index.
    pub index: usize,
    /// The ring: size and GPAs of the descriptor table, avail and used rings.
    pub ring: SplitRing,
    /// Kick eventfd (ours to write).
    pub kick: EventFd,
    /// Call eventfd (the device writes).
    pub call: EventFd,
}

impl DriverQueue {
    /// A queue laid out like `Harness::start`'s queue `index`.
    pub fn new_for_tests(index: usize, size: u16) -> DriverQueue {
        DriverQueue::new(index, size)
    }

    fn new(index: usize, size: u16) -> DriverQueue {
        let base = META_GPA + index as u64 * 0x10000;
        DriverQueue {
            index,
            ring: SplitRing::new(size, base, base + 0x4000, base + 0x8000),
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.ring.size
    }

    /// Where this queue's request header goes (metadata region); its
    /// status byte follows the header.
    pub fn header_gpa(&self) -> u64 {
        META_GPA + 0x20_0000 + self.index as u64 * 0x1000
    }

    /// Where this queue's status byte goes: right after the header.
    pub fn status_gpa(&self) -> u64 {
        self.header_gpa() + u64::from(BlkRequest::HEADER_LEN)
    }

    /// Where this queue's data goes (data region).
    pub fn data_gpa(&self) -> u64 {
        DATA_GPA + self.index as u64 * DATA_PER_QUEUE
    }

    /// The vring addresses, each mapped by `addr` (to a user address or an
    /// IOVA).
    fn vring_config(&self, addr: impl Fn(u64) -> u64) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.ring.size,
            queue_size: self.ring.size,
            flags: 0,
            desc_table_addr: addr(self.ring.desc),
            used_ring_addr: addr(self.ring.used),
            avail_ring_addr: addr(self.ring.avail),
            log_addr: None,
        }
    }

    /// The vring addresses as the frontend's user addresses.
    pub fn config(&self, mem: &GuestMem) -> VringConfigData {
        self.vring_config(|gpa| mem.uaddr(gpa))
    }

    /// The vring addresses as IOVAs (under ACCESS_PLATFORM).
    pub fn config_iova(&self) -> VringConfigData {
        self.vring_config(iova_of)
    }

    /// Puts `chain` (descriptors 0..n) on the avail ring and kicks.
    pub fn submit(&mut self, mem: &GuestMem, chain: &[Desc]) -> u16 {
        let chain: Vec<_> = chain
            .iter()
            .map(|&(addr, len, write)| (addr, len, if write { W } else { R }))
            .collect();
        self.submit_flags(mem, &chain)
    }

    /// As [`DriverQueue::submit`], with descriptor flags.
    pub fn submit_flags(&mut self, mem: &GuestMem, chain: &[RingDesc]) -> u16 {
        assert!(!chain.is_empty());
        self.ring.write_chain(mem, 0, chain);
        self.publish(mem, 0)
    }

    /// Writes descriptor `i` raw.
    pub fn write_desc(&self, mem: &GuestMem, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.ring
            .write_desc(mem, i, Descriptor::new(addr, len, flags, next));
    }

    /// Offers head `head` on the avail ring and kicks; returns the head.
    pub fn publish(&mut self, mem: &GuestMem, head: u16) -> u16 {
        self.offer(mem, head);
        self.kick.write(1).expect("kick");
        head
    }

    /// Offers head `head` on the avail ring without kicking (several
    /// offers, then one kick on [`DriverQueue::kick`]).
    pub fn offer(&mut self, mem: &GuestMem, head: u16) {
        self.ring.offer(mem, head);
    }

    /// Under VIRTIO_RING_F_EVENT_IDX: asks for a call at the next used
    /// element ([`SplitRing::enable_calls`]). Without it `used_event` stays
    /// 0 and the device calls only when its used index goes from 0 to 1
    /// (again after wrapping): later completions are only seen by polling.
    pub fn enable_calls(&self, mem: &GuestMem) {
        self.ring.enable_calls(mem);
    }

    /// The used ring's index as the device left it.
    pub fn device_used_idx(&self, mem: &GuestMem) -> u16 {
        self.ring.device_used_idx(mem)
    }

    /// Waits for the next used element: (id, len), or None after `timeout`.
    pub fn wait_used(&mut self, mem: &GuestMem, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.ring.pop_used(mem) {
                return Some((u.id, u.len));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis().min(100)).unwrap_or(100);
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            let _ = self.call.read();
        }
    }

    /// Sets VRING_AVAIL_F_NO_INTERRUPT in the avail ring's flags: the
    /// device sends no interrupt for this queue (a driver that polls).
    pub fn disable_interrupts(&self, mem: &GuestMem) {
        let flags = u16::try_from(VRING_AVAIL_F_NO_INTERRUPT).unwrap_or(0);
        mem.write_u16(self.ring.avail, flags);
    }

    /// The avail index the driver has published.
    pub fn avail_idx(&self) -> u16 {
        self.ring.avail_idx()
    }

    /// Forgets ring progress (after the device was reset or restarted).
    pub fn reset_indices(&mut self, mem: &GuestMem) {
        self.ring.reset(mem);
    }
}

/// A recognisable pattern of `len` bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 9) as u8))
        .collect()
}

/// What the vhost-user harness's `start_iotlb` adds to a GPA to make its IOVA: IOVAs and
/// GPAs never coincide, so a GPA taken for an IOVA faults.
pub const IOVA_SHIFT: u64 = 0x10_0000_0000;

/// The IOVA of `gpa` in the vhost-user harness's `start_iotlb`'s default mapping.
pub fn iova_of(gpa: u64) -> u64 {
    gpa + IOVA_SHIFT
}
