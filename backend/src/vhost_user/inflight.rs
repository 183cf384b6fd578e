//! Inflight I/O tracking for split virtqueues (the vhost-user spec,
//! "Inflight I/O tracking"; protocol feature `INFLIGHT_SHMFD`).
//!
//! The backend allocates a shared region (a sealed memfd) at GET_INFLIGHT_FD
//! and hands its descriptor to the frontend, which keeps it across a backend
//! restart and gives it back with SET_INFLIGHT_FD. While a queue runs, its
//! part of the region records which heads were taken from the avail ring and
//! not yet returned through the used ring, and in which order they were
//! taken. A restarted backend resubmits them, in that order, before it takes
//! anything new from the avail ring.
//!
//! # Layout
//!
//! `num_queues` queue regions of [`queue_region_size`] bytes each, back to
//! back from `mmap_offset`. A queue region is the spec's `QueueRegionSplit`:
//! a 16-byte header (`features: u64, version: u16, desc_num: u16,
//! last_batch_head: u16, used_idx: u16`), then `desc_num` 16-byte
//! `DescStateSplit` entries (`inflight: u8, padding: [u8; 5], next: u16,
//! counter: u64`), padded to [`QUEUE_REGION_ALIGN`] bytes (the size
//! libvhost-user computes for the same queue size, so either backend can
//! read the other's region).
//!
//! # The worker's protocol
//!
//! [`QueueInflight`] is one queue's view. Its worker calls, in order:
//!
//! - at start, before taking anything from the avail ring:
//!   [`QueueInflight::resubmit_list`] with the used ring's `idx`, which
//!   first repairs a batch whose used-ring update was not yet recorded
//!   here, then lists the heads still in flight, oldest first. It resubmits
//!   them (they stay marked) and continues the avail ring at
//!   [`QueueInflight::next_avail`];
//! - for each head taken from the avail ring, before its I/O is submitted:
//!   [`QueueInflight::begin`];
//! - for each completed head, before the used ring's `idx` that publishes it
//!   is written: [`QueueInflight::complete`]; then, once the used ring's
//!   `idx` is written: [`QueueInflight::commit`] with that `idx`.
//!
//! A batch is what lies between two `commit`s. Its used ring entries must
//! become visible with one `idx` store: virtio-queue's `add_used` writes
//! `idx` at every call, so with it a batch is one head
//! (`complete`, `add_used`, `commit`). Every head put on the used ring goes
//! through `complete`, even one that failed before `begin`: the repair at
//! restart counts the used ring's entries, and an entry missing from the
//! list would make it clear the wrong head.
//!
//! The header's `features` stays 0: no backend features are recorded
//! (libvhost-user records none either).
//!
//! # A region from the frontend is not trusted
//!
//! SET_INFLIGHT_FD maps a descriptor the frontend chose: its size is checked
//! against the file (a shrink-sealed memfd, so it cannot shrink under us;
//! `--allow-unsealed-memory` lifts that, as for the memory table),
//! every access is bounds-checked and volatile, and the content is only
//! data: a garbage region can at worst resubmit heads below the running
//! queue's size, which the guest's avail ring could name as well.

use std::mem::{align_of, offset_of, size_of};
use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use log::warn;
use vcdev_iommu::mem::{sealed_memfd, MemError, MemObject};
use vcdev_iommu::{Errno, SealPolicy};
use vhost::vhost_user::message::VhostUserInflight;

/// The version of the queue region written here (libvhost-user's too): a
/// region whose version is 0 is fresh.
pub const INFLIGHT_VERSION: u16 = 1;

/// Each queue region starts at a multiple of this many bytes.
pub const QUEUE_REGION_ALIGN: u64 = 64;

/// The header of one queue region (the spec's `QueueRegionSplit` without its
/// descriptor array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct QueueHeader {
    /// The features of the backend.
    features: u64,
    /// The version of this structure.
    version: u16,
    /// The number of descriptor entries (the queue size).
    desc_num: u16,
    /// The head of the list of the last batch of used descriptors.
    last_batch_head: u16,
    /// The used ring's `idx` once the last batch is recorded here.
    used_idx: u16,
}

/// One descriptor's state (the spec's `DescStateSplit`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DescState {
    /// 1 while the head is in flight.
    inflight: u8,
    padding: [u8; 5],
    /// The next entry of the last batch's list.
    next: u16,
    /// When the head was taken from the avail ring.
    counter: u64,
}

const HEADER_LEN: u64 = size_of::<QueueHeader>() as u64;
const DESC_LEN: u64 = size_of::<DescState>() as u64;

/// The bytes of one queue region of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = HEADER_LEN + DESC_LEN * u64::from(queue_size);
    raw.next_multiple_of(QUEUE_REGION_ALIGN)
}

/// The bytes of a region of `num_queues` queues of `queue_size` entries.
pub fn region_size(num_queues: u16, queue_size: u16) -> u64 {
    u64::from(num_queues) * queue_region_size(queue_size)
}

/// Errors of the inflight region.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// A value of the frontend's `VhostUserInflight` is out of range.
    #[error("Invalid inflight {what} {value:#x}")]
    Geometry {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The memfd could not be created.
    #[error("Cannot create the inflight memfd")]
    Create(#[source] std::io::Error),
    /// The region could not be mapped.
    #[error("Cannot map the inflight region")]
    Map(#[source] MemError),
    /// A queue index beyond the region's queues.
    #[error("Queue {index} has no inflight region ({num_queues} queues)")]
    Queue {
        /// The queue index.
        index: u16,
        /// The region's queues.
        num_queues: u16,
    },
    /// A queue larger than its region's entries.
    #[error("Queue {index} of {size} entries exceeds its inflight region of {desc_num}")]
    QueueSize {
        /// The queue index.
        index: u16,
        /// The queue's size.
        size: u16,
        /// The region's entries.
        desc_num: u16,
    },
    /// A queue region whose header is not ours.
    #[error("Queue {index}: inflight region of version {version}, {desc_num} entries")]
    Header {
        /// The queue index.
        index: u16,
        /// The version found.
        version: u16,
        /// The entries found.
        desc_num: u16,
    },
    /// A head beyond the queue.
    #[error("Head {head} is beyond the queue of {size} entries")]
    Head {
        /// The head.
        head: u16,
        /// The queue's size.
        size: u16,
    },
}

impl InflightError {
    /// The errno of a refused GET/SET_INFLIGHT_FD.
    pub fn errno(&self) -> Errno {
        match self {
            InflightError::Create(e) => Errno::from_io(e),
            InflightError::Map(e) => e.errno(),
            _ => Errno::EINVAL,
        }
    }
}

/// A mapped inflight region, shared by a connection and its queues.
#[derive(Debug)]
pub struct InflightRegion {
    mem: MemObject,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a fresh, zeroed region for `num_queues` queues of
    /// `queue_size` entries (each header initialised), the descriptor for the
    /// frontend, and the reply's description. `max_queues` and
    /// `max_queue_size` are the device's.
    pub fn create(
        req: &VhostUserInflight,
        max_queues: u16,
        max_queue_size: u16,
    ) -> Result<(Arc<InflightRegion>, OwnedFd, VhostUserInflight), InflightError> {
        let (num_queues, queue_size) = check_geometry(req, max_queues, max_queue_size)?;
        let size = region_size(num_queues, queue_size);
        let fd = sealed_memfd("vcdev-inflight", size).map_err(InflightError::Create)?;
        let ours = fd.try_clone().map_err(InflightError::Create)?;
        let mem = MemObject::from_fd(ours, 0, size, SealPolicy::RequireShrinkSeal)
            .map_err(InflightError::Map)?;
        let region = InflightRegion::new(mem, num_queues, queue_size)?;
        for q in 0..num_queues {
            region.init_queue(q);
        }
        let reply = VhostUserInflight::new(size, 0, num_queues, queue_size);
        Ok((Arc::new(region), fd, reply))
    }

    /// SET_INFLIGHT_FD: maps the region `desc` describes in `fd`, after
    /// checking its geometry against the device and its size against both
    /// the geometry and the file. The content is checked per queue, when the
    /// queue starts ([`InflightRegion::queue`]).
    pub fn open(
        fd: OwnedFd,
        desc: &VhostUserInflight,
        max_queues: u16,
        max_queue_size: u16,
        policy: SealPolicy,
    ) -> Result<Arc<InflightRegion>, InflightError> {
        let (num_queues, queue_size) = check_geometry(desc, max_queues, max_queue_size)?;
        let (size, offset) = (desc.mmap_size, desc.mmap_offset);
        if size != region_size(num_queues, queue_size) {
            return Err(InflightError::Geometry {
                what: "mmap_size",
                value: size,
            });
        }
        if !offset.is_multiple_of(align_of::<u64>() as u64) {
            return Err(InflightError::Geometry {
                what: "mmap_offset",
                value: offset,
            });
        }
        let mem = MemObject::from_fd(fd, offset, size, policy).map_err(InflightError::Map)?;
        Ok(Arc::new(InflightRegion::new(mem, num_queues, queue_size)?))
    }

    fn new(mem: MemObject, num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        // Every field lies at a multiple of its size from the base: the
        // base's alignment is the fields' (mmap_offset was checked; this
        // keeps the accessors sound whatever the mapping did).
        if !(mem.host_base() as usize).is_multiple_of(align_of::<u64>()) {
            return Err(InflightError::Geometry {
                what: "mapping alignment",
                value: mem.host_base() as u64,
            });
        }
        let want = region_size(num_queues, queue_size);
        if (mem.len() as u64) < want {
            return Err(InflightError::Geometry {
                what: "mapped size",
                value: mem.len() as u64,
            });
        }
        Ok(InflightRegion {
            mem,
            num_queues,
            queue_size,
        })
    }

    /// The queues the region tracks.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The entries of each queue region.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s view, for a queue running with `size` entries: its
    /// header is checked (a fresh one, of version 0, is initialised) and the
    /// counter continues after the newest head in flight.
    pub fn queue(self: &Arc<Self>, index: u16, size: u16) -> Result<QueueInflight, InflightError> {
        if index >= self.num_queues {
            return Err(InflightError::Queue {
                index,
                num_queues: self.num_queues,
            });
        }
        if size > self.queue_size {
            return Err(InflightError::QueueSize {
                index,
                size,
                desc_num: self.queue_size,
            });
        }
        let base = u64::from(index) * queue_region_size(self.queue_size);
        let mut q = QueueInflight {
            region: self.clone(),
            base,
            size,
            counter: 0,
            batch: 0,
        };
        let version = q.header_u16(offset_of!(QueueHeader, version));
        let desc_num = q.header_u16(offset_of!(QueueHeader, desc_num));
        if version == 0 {
            self.init_queue(index);
        } else if version != INFLIGHT_VERSION || desc_num != self.queue_size {
            return Err(InflightError::Header {
                index,
                version,
                desc_num,
            });
        }
        q.counter = (0..self.queue_size)
            .filter(|&i| q.inflight(i))
            .map(|i| {
                q.desc_u64(i, offset_of!(DescState, counter))
                    .wrapping_add(1)
            })
            .max()
            .unwrap_or(0);
        Ok(q)
    }

    /// Zeroes queue `index`'s region and writes its header.
    fn init_queue(&self, index: u16) {
        let base = u64::from(index) * queue_region_size(self.queue_size);
        let len = queue_region_size(self.queue_size);
        let mut off = base;
        while off < base + len {
            self.write::<u64>(off, 0);
            off += size_of::<u64>() as u64;
        }
        self.write(
            base + offset_of!(QueueHeader, desc_num) as u64,
            self.queue_size,
        );
        self.write(
            base + offset_of!(QueueHeader, version) as u64,
            INFLIGHT_VERSION,
        );
    }

    /// Reads a `T` at `off`, or zero beyond the mapping (never reached: every
    /// offset is derived from the checked geometry).
    fn read<T: Copy + Default>(&self, off: u64) -> T {
        match self.ptr::<T>(off) {
            // SAFETY: `ptr` checked that `off..off + size_of::<T>()` lies in
            // the live mapping and is aligned for T; T is a plain integer.
            Some(p) => unsafe { std::ptr::read_volatile(p) },
            None => T::default(),
        }
    }

    /// Writes a `T` at `off` (nothing beyond the mapping, as for `read`).
    fn write<T: Copy>(&self, off: u64, v: T) {
        if let Some(p) = self.ptr::<T>(off) {
            // SAFETY: as in `read`; the mapping is shared and writable, and
            // nothing holds a Rust reference into it.
            unsafe { std::ptr::write_volatile(p, v) }
        }
    }

    /// The address of a `T` at `off`, if it lies in the mapping, aligned.
    fn ptr<T>(&self, off: u64) -> Option<*mut T> {
        let off = usize::try_from(off).ok()?;
        let end = off.checked_add(size_of::<T>())?;
        if end > self.mem.len() || !off.is_multiple_of(align_of::<T>()) {
            return None;
        }
        // SAFETY: off + size_of::<T>() <= len: inside the mapping.
        Some(unsafe { self.mem.host_base().add(off) }.cast::<T>())
    }
}

/// Refuses a description of no queues, more queues than the device has, or
/// entries beyond the device's queue size.
fn check_geometry(
    d: &VhostUserInflight,
    max_queues: u16,
    max_queue_size: u16,
) -> Result<(u16, u16), InflightError> {
    let (n, size) = (d.num_queues, d.queue_size);
    if n == 0 || n > max_queues {
        return Err(InflightError::Geometry {
            what: "num_queues",
            value: u64::from(n),
        });
    }
    if size == 0 || size > max_queue_size {
        return Err(InflightError::Geometry {
            what: "queue_size",
            value: u64::from(size),
        });
    }
    Ok((n, size))
}

/// One running queue's part of the inflight region (see the module doc for
/// when its worker calls what). It keeps the region mapped.
#[derive(Debug)]
pub struct QueueInflight {
    region: Arc<InflightRegion>,
    /// The queue region's offset in the mapping.
    base: u64,
    /// The running queue's size: heads are below it.
    size: u16,
    /// The counter the next `begin` records.
    counter: u64,
    /// Heads given to `complete` since the last `commit`.
    batch: u16,
}

impl QueueInflight {
    /// Marks `head`, just taken from the avail ring, in flight, before its
    /// I/O is submitted (the spec's "receiving available buffers": counter,
    /// then the inflight flag).
    pub fn begin(&mut self, head: u16) -> Result<(), InflightError> {
        self.check(head)?;
        self.set_desc_u64(head, offset_of!(DescState, counter), self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::SeqCst);
        self.set_inflight(head, true);
        Ok(())
    }

    /// Records completed `head` in the current batch, before the used ring
    /// entry that returns it is published (the spec's "supplying used
    /// buffers", steps 1 to 3).
    pub fn complete(&mut self, head: u16) -> Result<(), InflightError> {
        self.check(head)?;
        let last = self.header_u16(offset_of!(QueueHeader, last_batch_head));
        self.set_desc_u16(head, offset_of!(DescState, next), last);
        self.set_header_u16(offset_of!(QueueHeader, last_batch_head), head);
        fence(Ordering::SeqCst);
        self.batch = self.batch.saturating_add(1);
        Ok(())
    }

    /// Ends the batch once the used ring's `idx` that publishes it is
    /// written as `used_idx`: the heads given to `complete` since the last
    /// commit are no longer in flight (steps 6 and 7). A crash before this
    /// is repaired by the next `resubmit_list`.
    pub fn commit(&mut self, used_idx: u16) {
        fence(Ordering::SeqCst);
        self.clear_batch(self.batch);
        self.batch = 0;
        fence(Ordering::SeqCst);
        self.set_header_u16(offset_of!(QueueHeader, used_idx), used_idx);
    }

    /// At queue start, with `used_idx` the used ring's `idx` as the ring
    /// has it: repairs the last batch if its used ring update happened but
    /// was not recorded here (the spec's "when reconnecting", step 1), then
    /// returns the heads still in flight, oldest first (step 2). Entries
    /// beyond the running queue's size are garbage: they are cleared and
    /// not returned.
    pub fn resubmit_list(&mut self, used_idx: u16) -> Vec<u16> {
        let recorded = self.header_u16(offset_of!(QueueHeader, used_idx));
        if recorded != used_idx {
            // The batch published up to `used_idx` is the used ring's
            // difference: that many entries of the list (step 1a-c).
            self.clear_batch(used_idx.wrapping_sub(recorded));
            fence(Ordering::SeqCst);
            self.set_header_u16(offset_of!(QueueHeader, used_idx), used_idx);
        }
        self.batch = 0;
        let mut heads: Vec<(u64, u16)> = Vec::new();
        for i in 0..self.region.queue_size {
            if !self.inflight(i) {
                continue;
            }
            if i >= self.size {
                warn!(
                    "inflight head {i} is beyond the queue of {} entries: dropped",
                    self.size
                );
                self.set_inflight(i, false);
                continue;
            }
            heads.push((self.desc_u64(i, offset_of!(DescState, counter)), i));
        }
        heads.sort_unstable();
        if let Some(&(newest, _)) = heads.last() {
            self.counter = self.counter.max(newest.wrapping_add(1));
        }
        heads.into_iter().map(|(_, i)| i).collect()
    }

    /// Where the avail ring continues after resubmitting `resubmitted`
    /// heads, with `used_idx` the used ring's `idx`: every head taken from
    /// the avail ring is either returned through the used ring or still in
    /// flight.
    pub fn next_avail(used_idx: u16, resubmitted: &[u16]) -> u16 {
        // At most u16::MAX heads exist: the count fits.
        used_idx.wrapping_add(u16::try_from(resubmitted.len()).unwrap_or(u16::MAX))
    }

    /// The heads in flight now (all of the queue's region).
    pub fn in_flight(&self) -> usize {
        (0..self.region.queue_size)
            .filter(|&i| self.inflight(i))
            .count()
    }

    /// Clears the inflight flag of the last `n` entries of the batch list,
    /// from `last_batch_head`; a list that leaves the queue, or runs longer
    /// than the queue, ends there.
    fn clear_batch(&mut self, n: u16) {
        let mut head = self.header_u16(offset_of!(QueueHeader, last_batch_head));
        for _ in 0..n.min(self.region.queue_size) {
            if head >= self.region.queue_size {
                break;
            }
            self.set_inflight(head, false);
            head = self.desc_u16(head, offset_of!(DescState, next));
        }
    }

    fn check(&self, head: u16) -> Result<(), InflightError> {
        if head >= self.size {
            return Err(InflightError::Head {
                head,
                size: self.size,
            });
        }
        Ok(())
    }

    fn desc_off(&self, i: u16, field: usize) -> u64 {
        self.base + HEADER_LEN + u64::from(i) * DESC_LEN + field as u64
    }

    fn inflight(&self, i: u16) -> bool {
        self.region
            .read::<u8>(self.desc_off(i, offset_of!(DescState, inflight)))
            != 0
    }

    fn set_inflight(&self, i: u16, on: bool) {
        let off = self.desc_off(i, offset_of!(DescState, inflight));
        self.region.write(off, u8::from(on));
    }

    fn desc_u16(&self, i: u16, field: usize) -> u16 {
        self.region.read(self.desc_off(i, field))
    }

    fn set_desc_u16(&self, i: u16, field: usize, v: u16) {
        self.region.write(self.desc_off(i, field), v);
    }

    fn desc_u64(&self, i: u16, field: usize) -> u64 {
        self.region.read(self.desc_off(i, field))
    }

    fn set_desc_u64(&self, i: u16, field: usize, v: u64) {
        self.region.write(self.desc_off(i, field), v);
    }

    fn header_u16(&self, field: usize) -> u16 {
        self.region.read(self.base + field as u64)
    }

    fn set_header_u16(&self, field: usize, v: u16) {
        self.region.write(self.base + field as u64, v);
    }
}

impl vcdev_device_model::blk::Tracker for QueueInflight {
    fn taken(&mut self, head: u16) {
        if let Err(e) = self.begin(head) {
            log::warn!("inflight region: {e}");
        }
    }

    fn used(&mut self, head: u16) {
        if let Err(e) = self.complete(head) {
            log::warn!("inflight region: {e}");
        }
    }

    fn committed(&mut self, next_used: u16) {
        self.commit(next_used);
    }

    fn restart(&mut self, used_idx: u16) -> (Vec<u16>, u16) {
        let heads = self.resubmit_list(used_idx);
        let next_avail = QueueInflight::next_avail(used_idx, &heads);
        (heads, next_avail)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    const QUEUES: u16 = 2;
    const SIZE: u16 = 16;

    fn desc(num_queues: u16, queue_size: u16) -> VhostUserInflight {
        VhostUserInflight::new(0, 0, num_queues, queue_size)
    }

    /// A fresh region (GET_INFLIGHT_FD), its fd and the reply.
    fn fresh() -> (Arc<InflightRegion>, OwnedFd, VhostUserInflight) {
        InflightRegion::create(&desc(QUEUES, SIZE), QUEUES, SIZE).unwrap()
    }

    /// The same file mapped again, as a restarted daemon does with the fd
    /// SET_INFLIGHT_FD hands it.
    fn reopen(fd: &OwnedFd, reply: &VhostUserInflight) -> Arc<InflightRegion> {
        let fd = fd.try_clone().unwrap();
        InflightRegion::open(fd, reply, QUEUES, SIZE, SealPolicy::RequireShrinkSeal).unwrap()
    }

    fn file_len(fd: &OwnedFd) -> u64 {
        File::from(fd.try_clone().unwrap())
            .metadata()
            .unwrap()
            .len()
    }

    use std::fs::File;

    /// The spec's structs, field by field, and libvhost-user's queue
    /// region size (`ALIGN_UP(sizeof(VuDescStateSplit) * queue_size +
    /// sizeof(uint16_t), 64)`) for every queue size.
    #[test]
    fn layout() {
        assert_eq!(size_of::<QueueHeader>(), 16);
        assert_eq!(offset_of!(QueueHeader, features), 0);
        assert_eq!(offset_of!(QueueHeader, version), 8);
        assert_eq!(offset_of!(QueueHeader, desc_num), 10);
        assert_eq!(offset_of!(QueueHeader, last_batch_head), 12);
        assert_eq!(offset_of!(QueueHeader, used_idx), 14);
        assert_eq!(size_of::<DescState>(), 16);
        assert_eq!(offset_of!(DescState, inflight), 0);
        assert_eq!(offset_of!(DescState, padding), 1);
        assert_eq!(offset_of!(DescState, next), 6);
        assert_eq!(offset_of!(DescState, counter), 8);
        // QEMU sends and expects sizeof(VhostUserInflight), padding included.
        assert_eq!(size_of::<VhostUserInflight>(), 24);
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(256), 4160);
        for qs in 1..=u16::MAX {
            let libvhost = (16 * u64::from(qs) + 2).next_multiple_of(64);
            assert_eq!(queue_region_size(qs), libvhost, "{qs}");
        }
        assert_eq!(region_size(4, 256), 4 * 4160);
    }

    /// GET_INFLIGHT_FD's region: a shrink-sealed memfd of exactly the size
    /// the reply gives, every queue header initialised, nothing in flight.
    #[test]
    fn create_gives_a_sealed_memfd_of_the_size_it_says() {
        let (r, fd, reply) = fresh();
        assert_eq!({ reply.mmap_size }, region_size(QUEUES, SIZE));
        assert_eq!(
            ({ reply.mmap_offset }, { reply.num_queues }, {
                reply.queue_size
            }),
            (0, QUEUES, SIZE)
        );
        assert_eq!(file_len(&fd), region_size(QUEUES, SIZE));
        // SAFETY: fcntl on a descriptor we own, no argument.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        assert!(seals & libc::F_SEAL_SHRINK != 0, "{seals:#x}");
        for q in 0..QUEUES {
            let base = u64::from(q) * queue_region_size(SIZE);
            assert_eq!(r.read::<u16>(base + 8), INFLIGHT_VERSION);
            assert_eq!(r.read::<u16>(base + 10), SIZE);
            assert_eq!(r.queue(q, SIZE).unwrap().in_flight(), 0);
        }
    }

    /// Heads in flight come back oldest first (by counter, not by index),
    /// completed ones do not, and the counter goes on after the newest.
    #[test]
    fn resubmit_in_counter_order() {
        let (r, fd, reply) = fresh();
        let mut q = r.queue(1, SIZE).unwrap();
        for h in [5, 2, 7, 1, 3] {
            q.begin(h).unwrap();
        }
        // 2 and 3 complete, one batch each.
        q.complete(2).unwrap();
        q.commit(1);
        q.complete(3).unwrap();
        q.commit(2);
        assert_eq!(q.in_flight(), 3);
        // Queue 0 is its own region.
        assert_eq!(r.queue(0, SIZE).unwrap().in_flight(), 0);
        // "Restart": the same file, mapped again.
        let r2 = reopen(&fd, &reply);
        let mut q2 = r2.queue(1, SIZE).unwrap();
        let list = q2.resubmit_list(2);
        assert_eq!(list, [5, 7, 1]);
        assert_eq!(QueueInflight::next_avail(2, &list), 5);
        // A new head is newer than every resubmitted one.
        q2.begin(0).unwrap();
        let mut q3 = r2.queue(1, SIZE).unwrap();
        assert_eq!(q3.resubmit_list(2), [5, 7, 1, 0]);
        // Used ring idx wraps: next_avail too.
        assert_eq!(QueueInflight::next_avail(u16::MAX, &[1, 2]), 1);
    }

    /// A crash after the used ring's idx was written but before the batch
    /// was cleared here: the restart clears that batch (and only it). A
    /// crash before the used ring update resubmits it.
    #[test]
    fn crash_between_used_update_and_clear() {
        let (r, fd, reply) = fresh();
        let mut q = r.queue(0, SIZE).unwrap();
        for h in [4, 9, 6] {
            q.begin(h).unwrap();
        }
        q.complete(6).unwrap();
        q.commit(1);
        // 9 is linked and its used entry published (idx 2), then the crash.
        q.complete(9).unwrap();
        drop(q);
        let mut after_used = reopen(&fd, &reply).queue(0, SIZE).unwrap();
        // Before the repair, the header still says 1.
        assert_eq!(after_used.in_flight(), 2);
        assert_eq!(after_used.resubmit_list(2), [4]);
        // The repair is recorded: a second look agrees.
        assert_eq!(after_used.resubmit_list(2), [4]);

        // The same crash, but before the used ring's idx moved: 9 is
        // still owed to the guest.
        let (r, fd, reply) = fresh();
        let mut q = r.queue(0, SIZE).unwrap();
        for h in [4, 9] {
            q.begin(h).unwrap();
        }
        q.complete(9).unwrap();
        drop(q);
        let mut before_used = reopen(&fd, &reply).queue(0, SIZE).unwrap();
        assert_eq!(before_used.resubmit_list(0), [4, 9]);
    }

    /// A batch of several heads under one used idx store is cleared as a
    /// whole, by commit and by the restart's repair alike.
    #[test]
    fn batches() {
        let (r, fd, reply) = fresh();
        let mut q = r.queue(0, SIZE).unwrap();
        for h in 0..6 {
            q.begin(h).unwrap();
        }
        for h in [1, 3] {
            q.complete(h).unwrap();
        }
        q.commit(2);
        for h in [0, 5, 4] {
            q.complete(h).unwrap();
        }
        // Crash after idx 5 was published.
        let mut q2 = reopen(&fd, &reply).queue(0, SIZE).unwrap();
        assert_eq!(q2.resubmit_list(5), [2]);
    }

    /// `commit` clears what `complete` linked, however far the used idx
    /// moved: a used entry the worker did not track (here one more) does
    /// not clear a head that is in flight again.
    #[test]
    fn commit_clears_only_the_batch() {
        let (r, _fd, _) = fresh();
        let mut q = r.queue(0, SIZE).unwrap();
        q.begin(5).unwrap();
        q.complete(5).unwrap();
        q.commit(1);
        // The guest reuses head 5.
        q.begin(5).unwrap();
        q.begin(6).unwrap();
        q.complete(6).unwrap();
        q.commit(3);
        assert_eq!(q.resubmit_list(3), [5]);
    }

    /// One step of the simulated guest and worker.
    #[derive(Clone, Debug)]
    enum Step {
        /// The guest offers one of its free heads (the n-th, modulo).
        Offer(u8),
        /// The worker takes the next avail entry: `begin`.
        Pop,
        /// The n-th request in flight (modulo) completes: `complete`, the
        /// used ring entry and idx, `commit` (three points to crash at).
        Finish(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            any::<u8>().prop_map(Step::Offer),
            Just(Step::Pop),
            any::<u8>().prop_map(Step::Finish),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        /// A crash at any point of any interleaving of offers, pops and
        /// completions in any order (heads reused once returned): the
        /// restart answers every offered request exactly once. The used
        /// ring, the resubmit list (the heads in flight, in the order they
        /// were taken) and what the avail ring gives from `next_avail` on
        /// add up to what the guest offered.
        #[test]
        fn a_crash_anywhere_loses_and_repeats_nothing(
            steps in proptest::collection::vec(step(), 0..80),
            crash_at in 0usize..240,
        ) {
            let (r, fd, reply) = fresh();
            let mut q = r.queue(0, SIZE).unwrap();
            let mut free: Vec<u16> = (0..SIZE).collect();
            let (mut avail, mut used) = (Vec::<u16>::new(), Vec::<u16>::new());
            let mut popped = 0usize;
            // Taken and not yet on the used ring, in the order taken.
            let mut inflight: Vec<u16> = Vec::new();
            let mut at = 0usize;
            let mut go = || {
                at += 1;
                at <= crash_at
            };
            'run: for s in &steps {
                match *s {
                    Step::Offer(n) if !free.is_empty() => {
                        if !go() { break 'run; }
                        let h = free.remove(usize::from(n) % free.len());
                        avail.push(h);
                    }
                    Step::Pop if popped < avail.len() => {
                        if !go() { break 'run; }
                        q.begin(avail[popped]).unwrap();
                        inflight.push(avail[popped]);
                        popped += 1;
                    }
                    Step::Finish(n) if !inflight.is_empty() => {
                        let h = inflight[usize::from(n) % inflight.len()];
                        if !go() { break 'run; }
                        q.complete(h).unwrap();
                        if !go() { break 'run; }
                        inflight.retain(|&x| x != h);
                        used.push(h);
                        free.push(h);
                        if !go() { break 'run; }
                        q.commit(u16::try_from(used.len()).unwrap());
                    }
                    _ => {}
                }
            }
            drop(q);
            let mut q2 = reopen(&fd, &reply).queue(0, SIZE).unwrap();
            let u = u16::try_from(used.len()).unwrap();
            let list = q2.resubmit_list(u);
            prop_assert_eq!(&list, &inflight);
            let next = usize::from(QueueInflight::next_avail(u, &list));
            prop_assert_eq!(next, popped);
            let mut answered: Vec<u16> = used.clone();
            answered.extend(&list);
            answered.extend(&avail[next..]);
            answered.sort_unstable();
            let mut offered = avail.clone();
            offered.sort_unstable();
            prop_assert_eq!(answered, offered);
        }
    }

    /// begin/complete of a head beyond the running queue: refused, nothing
    /// written.
    #[test]
    fn heads_beyond_the_queue_are_refused() {
        let (r, _fd, _) = fresh();
        let mut q = r.queue(0, 8).unwrap();
        assert!(matches!(
            q.begin(8),
            Err(InflightError::Head { head: 8, size: 8 })
        ));
        assert!(matches!(
            q.complete(u16::MAX),
            Err(InflightError::Head { .. })
        ));
        assert_eq!(q.in_flight(), 0);
        assert!(matches!(
            r.queue(QUEUES, SIZE),
            Err(InflightError::Queue { .. })
        ));
        assert!(matches!(
            r.queue(0, SIZE * 2),
            Err(InflightError::QueueSize { .. })
        ));
    }

    fn plain_file(len: u64) -> OwnedFd {
        let p = std::env::temp_dir().join(format!("vcdev-inflight-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f.set_len(len).unwrap();
        f.into()
    }

    /// SET_INFLIGHT_FD's refusals: sizes that do not match the geometry or
    /// the file, geometry beyond the device, a misaligned offset, a file
    /// that is not a sealed memfd.
    #[test]
    fn hostile_descriptions_are_refused() {
        let size = region_size(QUEUES, SIZE);
        let open = |fd: OwnedFd, d: VhostUserInflight| {
            InflightRegion::open(fd, &d, QUEUES, SIZE, SealPolicy::RequireShrinkSeal)
        };
        let memfd = |len| sealed_memfd("t", len).unwrap();
        let d = |size, offset, n, qs| VhostUserInflight::new(size, offset, n, qs);
        // A short fd: the size says more than the file has.
        let e = open(memfd(size - 1), d(size, 0, QUEUES, SIZE)).unwrap_err();
        assert!(
            matches!(e, InflightError::Map(MemError::OutOfRange { .. })),
            "{e:?}"
        );
        assert_eq!(e.errno(), Errno::EFAULT);
        // The file is large enough but the offset pushes the end beyond it.
        let e = open(memfd(size), d(size, 64, QUEUES, SIZE)).unwrap_err();
        assert!(
            matches!(e, InflightError::Map(MemError::OutOfRange { .. })),
            "{e:?}"
        );
        // mmap_size not the geometry's (either way).
        for bad in [0, size - 1, size + 64, u64::MAX] {
            let e = open(memfd(size), d(bad, 0, QUEUES, SIZE)).unwrap_err();
            assert!(
                matches!(
                    e,
                    InflightError::Geometry {
                        what: "mmap_size",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
            assert_eq!(e.errno(), Errno::EINVAL);
        }
        // Geometry beyond the device, or empty; a huge queue size.
        for (n, qs) in [
            (0, SIZE),
            (QUEUES + 1, SIZE),
            (QUEUES, 0),
            (QUEUES, SIZE + 1),
            (1, u16::MAX),
        ] {
            let e = open(memfd(size), d(region_size(n, qs), 0, n, qs)).unwrap_err();
            assert!(
                matches!(e, InflightError::Geometry { .. }),
                "{n} {qs}: {e:?}"
            );
            let e = InflightRegion::create(&d(0, 0, n, qs), QUEUES, SIZE)
                .err()
                .unwrap();
            assert!(
                matches!(e, InflightError::Geometry { .. }),
                "{n} {qs}: {e:?}"
            );
        }
        let e = open(memfd(size + 8), d(size, 4, QUEUES, SIZE)).unwrap_err();
        assert!(matches!(
            e,
            InflightError::Geometry {
                what: "mmap_offset",
                ..
            }
        ));
        // Not a sealed memfd.
        let e = open(plain_file(size), d(size, 0, QUEUES, SIZE)).unwrap_err();
        assert!(
            matches!(e, InflightError::Map(MemError::NotSealed { .. })),
            "{e:?}"
        );
        // ... unless the operator allowed unsealed memory.
        InflightRegion::open(
            plain_file(size),
            &d(size, 0, QUEUES, SIZE),
            QUEUES,
            SIZE,
            SealPolicy::AllowUnsealed,
        )
        .unwrap();
        // A region further into its file is fine.
        let r = open(memfd(size + 4096), d(size, 4096, QUEUES, SIZE)).unwrap();
        assert_eq!(r.queue(1, SIZE).unwrap().in_flight(), 0);
    }

    /// Garbage content: a header that is not ours is refused at queue start;
    /// garbage entries under a valid header give only heads below the
    /// running queue's size, each once, and never a read outside.
    #[test]
    fn garbage_content() {
        let (r, fd, reply) = fresh();
        let len = usize::try_from(region_size(QUEUES, SIZE)).unwrap();
        // Every byte 0xff: version 0xffff, desc_num 0xffff ("huge").
        for off in (0..len).step_by(8) {
            r.write(off as u64, u64::MAX);
        }
        let e = r.queue(0, SIZE).unwrap_err();
        assert!(
            matches!(
                e,
                InflightError::Header {
                    version: u16::MAX,
                    desc_num: u16::MAX,
                    ..
                }
            ),
            "{e:?}"
        );
        // A valid header over garbage: last_batch_head and every `next`
        // out of range, used_idx far from the ring's.
        let base = queue_region_size(SIZE);
        r.write(base + 8, INFLIGHT_VERSION);
        r.write(base + 10, SIZE);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..SIZE {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            r.write(base + 16 + u64::from(i) * 16 + 8, seed);
        }
        let r2 = reopen(&fd, &reply);
        // A queue running with fewer entries than the region has.
        let mut q = r2.queue(1, 8).unwrap();
        let list = q.resubmit_list(0x1234);
        assert_eq!(list.len(), 8);
        let mut sorted = list.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<u16>>());
        let counters: Vec<u64> = list
            .iter()
            .map(|&h| q.desc_u64(h, offset_of!(DescState, counter)))
            .collect();
        assert!(counters.windows(2).all(|w| w[0] <= w[1]), "{counters:x?}");
        // The entries beyond the running queue were cleared.
        assert_eq!(q.in_flight(), 8);
        // Garbage with a batch list: last_batch_head in range, `next`
        // making a cycle; used_idx far ahead. Bounded, no panic.
        r.write(base + 12, 3u16);
        for i in 0..SIZE {
            r.write(base + 16 + u64::from(i) * 16 + 6, 3u16);
        }
        let mut q = r2.queue(1, SIZE).unwrap();
        let list = q.resubmit_list(0x8000);
        assert!(!list.contains(&3) && list.len() < usize::from(SIZE));
    }
}
