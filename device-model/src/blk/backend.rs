//! The storage behind a virtio-blk device.

use std::fmt::Debug;
use std::io;
use std::os::fd::RawFd;

use vm_memory::VolatileSlice;

use super::resize::ResizeError;

/// The size of a virtio-blk sector, in bytes, as a shift (virtio 1.2 section 5.2.6: "sector
/// number ... in 512-byte units").
pub const SECTOR_SHIFT: u32 = 9;
/// The size of a virtio-blk sector, in bytes.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// A disk image that several queues, on several threads, read and write at once.
///
/// Offsets and lengths are in bytes and already checked by the caller against [`len`] and
/// [`block_size`]. Buffers are guest memory ([`VolatileSlice`]s straight from the translated
/// descriptors), so data moves between the guest and the backing without a bounce buffer,
/// unless the backing asks for an alignment ([`mem_align`], `direct=on`) that the guest's
/// buffers lack. Implementations must not take a lock shared by all queues on the data path.
///
/// [`block_size`]: BlockBackend::block_size
/// [`mem_align`]: BlockBackend::mem_align
///
/// [`len`]: BlockBackend::len
pub trait BlockBackend: Send + Sync + Debug {
    /// The size of the disk in bytes, a multiple of [`SECTOR_SIZE`].
    fn len(&self) -> u64;

    /// Whether the disk is empty (never, for a backend that passed validation).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fill all of `buf` from the disk at byte `offset`.
    fn read_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()>;

    /// Write all of `buf` to the disk at byte `offset`.
    fn write_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()>;

    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Tell the backing that `len` bytes at `offset` are no longer needed. Their contents are
    /// unspecified afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Make `len` bytes at `offset` read as zeros; `unmap` allows deallocating them.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;

    /// The file descriptor an asynchronous engine submits to, if the backing is a file (RAM
    /// disks have none and keep their synchronous `memcpy` path). It stays open as long as the
    /// backend lives.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    /// The memory alignment, in bytes, of the buffers [`read_at`], [`write_at`] and an engine
    /// take: their addresses must be multiples of it, their lengths multiples of it and of
    /// [`block_size`]. 1 (any buffer) unless the backing bypasses the page cache (O_DIRECT);
    /// otherwise a power of two.
    ///
    /// [`read_at`]: BlockBackend::read_at
    /// [`write_at`]: BlockBackend::write_at
    /// [`block_size`]: BlockBackend::block_size
    fn mem_align(&self) -> usize {
        1
    }

    /// The logical block size in bytes: a power of two, at least [`SECTOR_SIZE`]. Reads and
    /// writes start and end on its multiples; the device advertises it as `blk_size`.
    fn block_size(&self) -> u32 {
        SECTOR_BYTES
    }

    /// The size the backing has now, read again from the backing itself, for a resize without a
    /// size (a block device or image that the operator grew); `None` if the backing has no size
    /// of its own to re-read (a RAM disk).
    fn probe_len(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }

    /// Give the disk `len` bytes (a non-zero multiple of [`block_size`], checked by the caller,
    /// who also serialises resizes and has already stopped new requests past `len` when it
    /// shrinks). Growing keeps the data and the new bytes read as zeros; shrinking drops the
    /// data past `len`. [`len`] says `len` once this returns `Ok`. On error nothing changed.
    ///
    /// [`block_size`]: BlockBackend::block_size
    /// [`len`]: BlockBackend::len
    fn resize(&self, len: u64) -> Result<(), ResizeError> {
        let _ = len;
        Err(ResizeError::Unsupported)
    }
}

/// [`SECTOR_SIZE`] as the `u32` of `blk_size`.
pub(crate) const SECTOR_BYTES: u32 = 1 << SECTOR_SHIFT;

/// A page of zeros, for backends that write zeros by hand. Page-aligned, so an O_DIRECT backing
/// can write it as it is.
#[repr(C, align(4096))]
pub(crate) struct Zeroes(pub(crate) [u8; 4096]);

/// See [`Zeroes`].
pub(crate) static ZEROES: Zeroes = Zeroes([0; 4096]);
