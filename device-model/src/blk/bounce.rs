//! Aligned bounce buffers, for backings that bypass the page cache (`direct=on`, `O_DIRECT`).
//!
//! An `O_DIRECT` transfer needs buffer addresses that are multiples of the backend's
//! [`BlockBackend::mem_align`] and lengths that are multiples of it and of its
//! [`BlockBackend::block_size`]; a guest's buffers need not be either. A read or write with
//! any such buffer moves its data through one aligned buffer instead ([`needs_bounce`]): for a
//! write, copied in from the guest before the transfer; for a read, copied out to the guest
//! after it, before the status byte is written. Requests whose buffers are all aligned go
//! straight between guest memory and the file.
//!
//! The queue (`AsyncQueue`) keeps an [`EngineBounce`] of the whole request while its operation
//! is in flight, up to [`ENGINE_MAX`] bytes; a larger request is run synchronously instead
//! (`exec::execute`), bounced with [`transfer`] in chunks of at most [`SYNC_CHUNK`] bytes, so a
//! guest cannot make the device allocate more.
#![allow(unsafe_code)]

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::aio::IoVec;
use super::backend::BlockBackend;

/// The largest bounce buffer of a request run synchronously: it moves in chunks of this size
/// (a multiple of any block size up to 1 MiB).
pub(crate) const SYNC_CHUNK: usize = 1 << 20;
/// The largest request bounced whole while its operation is in flight on an engine.
pub(crate) const ENGINE_MAX: u64 = 4 << 20;

/// Heap memory at an aligned address, zero-filled, freed on drop.
#[derive(Debug)]
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: an `AlignedBuf` owns its allocation outright (no aliasing pointer is kept anywhere
// else), so it may move to another thread like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes whose address is a multiple of `align` (a power of two), or `None`
    /// if the layout is invalid or the allocation fails.
    pub(crate) fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).ok()?;
        // SAFETY: the layout's size is non-zero (`len.max(1)`).
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })?;
        Some(Self { ptr, len, layout })
    }

    /// The buffer, for an engine operation.
    pub(crate) fn iovec(&self) -> IoVec {
        IoVec::from_raw(self.ptr.as_ptr(), self.len)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` bytes this buffer owns, initialised (zeroed) at
        // allocation, and borrowed no longer than `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly `layout`, and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Whether a read or write over `slices` must be bounced for `backend`: some slice's address
/// is not a multiple of its memory alignment, or its length not a multiple of that and of the
/// block size. Never for a backend without alignment needs (RAM, a file in the page cache).
pub(crate) fn needs_bounce<B: BitmapSlice>(
    backend: &dyn BlockBackend,
    slices: &[VolatileSlice<'_, B>],
) -> bool {
    let mem_align = backend.mem_align();
    if mem_align <= 1 {
        return false;
    }
    let len_align = usize::try_from(backend.block_size())
        .unwrap_or(usize::MAX)
        .max(mem_align);
    slices
        .iter()
        .any(|s| s.ptr_guard().as_ptr().addr() % mem_align != 0 || s.len() % len_align != 0)
}

/// A position in a list of guest buffers, copied to or from in order.
struct Cursor<'a, 's, B> {
    slices: &'a [VolatileSlice<'s, B>],
    index: usize,
    offset: usize,
}

impl<'a, 's, B: BitmapSlice> Cursor<'a, 's, B> {
    fn new(slices: &'a [VolatileSlice<'s, B>]) -> Self {
        Self {
            slices,
            index: 0,
            offset: 0,
        }
    }

    /// The rest of the current buffer (moving past finished ones), or `None` at the end.
    fn current(&mut self) -> Option<VolatileSlice<'s, B>> {
        loop {
            let slice = self.slices.get(self.index)?;
            if self.offset < slice.len() {
                return slice.offset(self.offset).ok();
            }
            self.index += 1;
            self.offset = 0;
        }
    }

    /// Fill `out` from the guest buffers; returns the bytes copied.
    fn read(&mut self, out: &mut [u8]) -> usize {
        let mut done = 0;
        while let (Some(rest), Some(dst)) = (self.current(), out.get_mut(done..)) {
            let n = rest.copy_to(dst);
            if n == 0 {
                break;
            }
            self.offset += n;
            done += n;
        }
        done
    }

    /// Copy `data` into the guest buffers; returns the bytes copied.
    fn write(&mut self, data: &[u8]) -> usize {
        let mut done = 0;
        while let (Some(rest), Some(src)) = (self.current(), data.get(done..)) {
            let n = rest.len().min(src.len());
            if n == 0 {
                break;
            }
            rest.copy_from(src.get(..n).unwrap_or_default());
            self.offset += n;
            done += n;
        }
        done
    }
}

/// Read (`reading`) or write `len` bytes at disk `offset` into or from `slices` through an
/// aligned buffer of at most [`SYNC_CHUNK`] bytes, chunk by chunk. `len` is the slices' total
/// length, a multiple of the block size.
pub(crate) fn transfer<B: BitmapSlice>(
    backend: &dyn BlockBackend,
    reading: bool,
    offset: u64,
    slices: &[VolatileSlice<'_, B>],
    len: u64,
) -> io::Result<()> {
    let total = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let chunk = total.min(SYNC_CHUNK);
    let mut buf = AlignedBuf::new(chunk, backend.mem_align())
        .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
    count_bounce();
    let mut guest = Cursor::new(slices);
    let mut done = 0usize;
    while done < total {
        let n = total.saturating_sub(done).min(chunk);
        let pos = offset.saturating_add(u64::try_from(done).unwrap_or(u64::MAX));
        let part = buf
            .get_mut(..n)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if reading {
            backend.read_at(pos, &VolatileSlice::from(&mut *part))?;
            guest.write(part);
        } else {
            guest.read(part);
            backend.write_at(pos, &VolatileSlice::from(&mut *part))?;
        }
        done = done.saturating_add(n);
    }
    if reading {
        for s in slices {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
    Ok(())
}

/// The bounce buffer of a read or write in flight on an engine.
#[derive(Debug)]
pub(crate) struct EngineBounce {
    buf: AlignedBuf,
    /// For a read: the guest buffers its data goes to at completion.
    guest: Vec<IoVec>,
}

impl EngineBounce {
    /// A bounce buffer for a read (`reading`) or write over `slices` of `len` bytes in all; a
    /// write's data is copied in now. `None` when the request is larger than [`ENGINE_MAX`] or
    /// the allocation fails: run it synchronously ([`transfer`]) instead.
    pub(crate) fn new<B: BitmapSlice>(
        backend: &dyn BlockBackend,
        slices: &[VolatileSlice<'_, B>],
        len: u64,
        reading: bool,
    ) -> Option<Self> {
        if len > ENGINE_MAX {
            return None;
        }
        let mut buf = AlignedBuf::new(usize::try_from(len).ok()?, backend.mem_align())?;
        count_bounce();
        let guest = if reading {
            slices.iter().map(IoVec::of).collect()
        } else {
            Cursor::new(slices).read(&mut buf);
            Vec::new()
        };
        Some(Self { buf, guest })
    }

    /// The buffer the engine operation moves data through.
    pub(crate) fn iovec(&self) -> IoVec {
        self.buf.iovec()
    }

    /// After a successful read: copy the data out to the guest buffers. Nothing for a write.
    ///
    /// # Safety
    ///
    /// The guest buffers given to [`EngineBounce::new`] must still be mapped and writable (the
    /// request's hold keeps them so until it is released).
    pub(crate) unsafe fn finish(&self) {
        let slices: Vec<VolatileSlice<'_>> = self
            .guest
            .iter()
            // SAFETY: the caller keeps every guest buffer mapped and writable for this call,
            // and the slices do not outlive it.
            .map(|v| unsafe { VolatileSlice::new(v.ptr(), v.len()) })
            .collect();
        Cursor::new(&slices).write(&self.buf);
    }
}

#[cfg(test)]
thread_local! {
    /// Requests bounced on this thread (each test runs its queue on its own thread).
    static BOUNCED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count_bounce() {
    #[cfg(test)]
    BOUNCED.with(|b| b.set(b.get().saturating_add(1)));
}

/// Test hook: how many requests this thread bounced so far.
#[cfg(test)]
pub(crate) fn bounced() -> u64 {
    BOUNCED.with(std::cell::Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for align in [1usize, 512, 4096, 65536] {
            let b = AlignedBuf::new(1000, align).unwrap();
            assert_eq!(b.as_ptr().addr() % align, 0);
            assert_eq!(b.len(), 1000);
            assert!(b.iter().all(|&x| x == 0));
        }
        assert!(AlignedBuf::new(0, 4096).unwrap().is_empty());
        assert!(AlignedBuf::new(512, 3).is_none(), "not a power of two");
    }

    /// The cursor splits and joins data across buffers of any length.
    #[test]
    fn cursor_scatters_and_gathers() {
        let mut a = vec![0u8; 3];
        let mut b = [0u8; 0];
        let mut c = vec![0u8; 6];
        let slices = [
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
            VolatileSlice::from(&mut c[..]),
        ];
        let data: Vec<u8> = (1..=9).collect();
        let mut w = Cursor::new(&slices);
        assert_eq!(w.write(&data[..4]), 4);
        assert_eq!(w.write(&data[4..]), 5);
        assert_eq!(w.write(&data), 0, "full");
        let mut out = [0u8; 9];
        let mut r = Cursor::new(&slices);
        assert_eq!(r.read(&mut out[..2]), 2);
        assert_eq!(r.read(&mut out[2..]), 7);
        assert_eq!(out.to_vec(), data);
        assert_eq!((a, c), (vec![1, 2, 3], vec![4, 5, 6, 7, 8, 9]));
    }
}
