//! A disk held in anonymous memory.
//!
//! The disk can grow and shrink at run time ([`BlockBackend::resize`]) without ever moving: the
//! address space for [`RAM_RESERVE`] bytes (or the disk's size, if larger) is reserved up front
//! with `PROT_NONE`, which costs neither memory nor commit charge, and the part in use is made
//! readable and writable as the disk grows. Shrinking gives the tail's memory back with
//! `MADV_DONTNEED` (it reads as zeros afterwards) but keeps it accessible, so a request that was
//! checked against the old size and is still copying never touches an inaccessible page.
#![allow(unsafe_code)]

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{MmapRegion, VolatileMemory, VolatileSlice};

use super::backend::{BlockBackend, SECTOR_SIZE, ZEROES};
use super::resize::ResizeError;

/// The address space reserved for a RAM disk to grow into: 64 GiB, or its size if larger. 256
/// devices reserve 16 TiB of the 128 TiB a process has on x86-64. Where even that cannot be
/// reserved (`ulimit -v`), the disk gets exactly its size and cannot grow.
pub const RAM_RESERVE: u64 = 64 << 30;

/// Errors creating a [`RamBackend`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The size is zero or not a multiple of the sector size.
    #[error("RAM disk size {0} is not a non-zero multiple of 512 bytes")]
    InvalidSize(u64),
    /// The anonymous mapping could not be made.
    #[error("Failed to map {size} bytes of anonymous memory")]
    Mmap {
        /// The size asked for.
        size: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The mapping could not be made accessible.
    #[error("Failed to make {size} bytes of anonymous memory accessible")]
    Protect {
        /// The size asked for.
        size: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A disk in an anonymous private mapping of this process.
///
/// Every access is a volatile copy into or out of the mapping through [`VolatileSlice`], so
/// several threads may use it at once with no lock; like a real disk, overlapping concurrent
/// writes leave an unspecified mix.
///
/// Invariant: `len <= accessible <= region.size()`, and `[0, accessible)` of the region is
/// mapped readable and writable. `accessible` only grows (under the caller's resize lock), and
/// grows before `len` does, so a range checked against `len` is always accessible.
#[derive(Debug)]
pub struct RamBackend {
    region: MmapRegion<()>,
    len: AtomicU64,
    /// Bytes from the start made readable and writable so far (a multiple of the page size, or
    /// the whole region).
    accessible: AtomicU64,
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads its scalar argument.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

impl RamBackend {
    /// A zero-filled RAM disk of `len` bytes (a non-zero multiple of 512).
    pub fn new(len: u64) -> Result<Self, Error> {
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(Error::InvalidSize(len));
        }
        let size = usize::try_from(len).map_err(|_| Error::InvalidSize(len))?;
        let reserve = usize::try_from(len.max(RAM_RESERVE)).unwrap_or(size);
        let flags = libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE;
        let region = match MmapRegion::build(None, reserve, libc::PROT_NONE, flags) {
            Ok(r) => r,
            Err(_) if reserve > size => MmapRegion::build(None, size, libc::PROT_NONE, flags)
                .map_err(|source| Error::Mmap { size: len, source })?,
            Err(source) => return Err(Error::Mmap { size: len, source }),
        };
        let ram = Self {
            region,
            len: AtomicU64::new(0),
            accessible: AtomicU64::new(0),
        };
        ram.make_accessible(len)
            .map_err(|source| Error::Protect { size: len, source })?;
        ram.len.store(len, Ordering::SeqCst);
        Ok(ram)
    }

    /// The most bytes this disk can grow to.
    #[must_use]
    pub fn max_len(&self) -> u64 {
        u64::try_from(self.region.size()).unwrap_or(u64::MAX)
    }

    /// Makes `[0, len)` readable and writable (rounded up to a page, within the region).
    fn make_accessible(&self, len: u64) -> io::Result<()> {
        let old = self.accessible.load(Ordering::SeqCst);
        if len <= old {
            return Ok(());
        }
        let page = page_size();
        let end = len
            .checked_next_multiple_of(page)
            .unwrap_or(u64::MAX)
            .min(self.max_len());
        let off = usize::try_from(old).map_err(|_| invalid_range())?;
        let grow = usize::try_from(end.saturating_sub(old)).map_err(|_| invalid_range())?;
        // SAFETY: `[off, off + grow)` lies inside the region this backend owns (`end` is capped
        // at its size, `old` is page-aligned or the whole region); making inaccessible pages
        // readable and writable cannot invalidate any reference, since none can point there.
        let ret = unsafe {
            libc::mprotect(
                self.region.as_ptr().add(off).cast(),
                grow,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        self.accessible.store(end, Ordering::SeqCst);
        Ok(())
    }

    /// Gives the memory of `[from, to)` back; it reads as zeros afterwards and stays accessible.
    fn release(&self, from: u64, to: u64) -> io::Result<()> {
        let page = page_size();
        // The partial page at the start is zeroed by hand, the whole pages are dropped.
        let first_page = from
            .checked_next_multiple_of(page)
            .unwrap_or(u64::MAX)
            .min(to);
        self.zero(from, first_page.saturating_sub(from))?;
        let end = to
            .checked_next_multiple_of(page)
            .unwrap_or(u64::MAX)
            .min(self.accessible.load(Ordering::SeqCst));
        if end <= first_page {
            return Ok(());
        }
        let off = usize::try_from(first_page).map_err(|_| invalid_range())?;
        let len = usize::try_from(end - first_page).map_err(|_| invalid_range())?;
        // SAFETY: the page-aligned range lies inside the accessible part of the region this
        // backend owns; MADV_DONTNEED on private anonymous memory only replaces its contents
        // with zeros, which any byte may hold (all accesses are volatile copies).
        let ret = unsafe {
            libc::madvise(
                self.region.as_ptr().add(off).cast(),
                len,
                libc::MADV_DONTNEED,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Zeros `len` bytes at `offset` (inside the accessible part).
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| invalid_range())?;
        let off = usize::try_from(offset).map_err(|_| invalid_range())?;
        let accessible =
            usize::try_from(self.accessible.load(Ordering::SeqCst)).map_err(|_| invalid_range())?;
        if off.checked_add(len).is_none_or(|end| end > accessible) {
            return Err(invalid_range());
        }
        let mut dst = self
            .region
            .get_slice(off, len)
            .map_err(|_| invalid_range())?;
        while !dst.is_empty() {
            let n = dst.len().min(ZEROES.0.len());
            let zeroes = ZEROES.0.get(..n).ok_or_else(invalid_range)?;
            dst.copy_from(zeroes);
            dst = dst.offset(n).map_err(|_| invalid_range())?;
        }
        Ok(())
    }

    /// `len` bytes at `offset`, inside the disk's current size (so inside the accessible part).
    fn slice(&self, offset: u64, len: usize) -> io::Result<VolatileSlice<'_>> {
        let end = offset
            .checked_add(u64::try_from(len).map_err(|_| invalid_range())?)
            .ok_or_else(invalid_range)?;
        if end > self.len.load(Ordering::SeqCst) {
            return Err(invalid_range());
        }
        let offset = usize::try_from(offset).map_err(|_| invalid_range())?;
        self.region
            .get_slice(offset, len)
            .map_err(|_| invalid_range())
    }
}

fn invalid_range() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl BlockBackend for RamBackend {
    fn len(&self) -> u64 {
        self.len.load(Ordering::SeqCst)
    }

    fn read_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        self.slice(offset, buf.len())?.copy_to_volatile_slice(*buf);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        buf.copy_to_volatile_slice(self.slice(offset, buf.len())?);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // Contents after a discard are unspecified; zeroing keeps the disk deterministic.
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let n = usize::try_from(len).map_err(|_| invalid_range())?;
        // Bounds against the current size.
        self.slice(offset, n)?;
        self.zero(offset, len)
    }

    /// Grows into the reserved address space, or gives the tail's memory back.
    fn resize(&self, len: u64) -> Result<(), ResizeError> {
        let old = self.len();
        if len > self.max_len() {
            return Err(ResizeError::TooLarge {
                size: len,
                max: self.max_len(),
            });
        }
        if len > old {
            // The bytes past the old end read as zeros already: never touched, or released
            // when the disk shrank.
            self.make_accessible(len).map_err(ResizeError::Backing)?;
            self.len.store(len, Ordering::SeqCst);
        } else if len < old {
            self.len.store(len, Ordering::SeqCst);
            if let Err(e) = self.release(len, old) {
                // The tail must read as zeros if the disk grows again.
                log::warn!(
                    "RAM disk: cannot release {} bytes ({e}); zeroing them",
                    old - len
                );
                self.zero(len, old - len).map_err(ResizeError::Backing)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert!(matches!(RamBackend::new(0), Err(Error::InvalidSize(0))));
        assert!(matches!(RamBackend::new(513), Err(Error::InvalidSize(513))));
        let ram = RamBackend::new(8192).unwrap();
        assert_eq!(ram.len(), 8192);
    }

    #[test]
    fn grows_within_its_reserve_only() {
        let ram = RamBackend::new(8192).unwrap();
        let max = ram.max_len();
        // RAM_RESERVE, unless the address space could not be reserved (ulimit -v).
        assert!(max == RAM_RESERVE || max == 8192, "{max}");
        let e = ram.resize(max + 512).unwrap_err();
        assert!(
            matches!(e, ResizeError::TooLarge { size, max: m } if size == max + 512 && m == max)
        );
        assert_eq!(e.errno(), libc::EFBIG);
        assert_eq!(ram.len(), 8192);
        ram.resize(1 << 20).unwrap();
        let mut src = [9u8; 512];
        ram.write_at((1 << 20) - 512, &VolatileSlice::from(&mut src[..]))
            .unwrap();
        ram.resize(4096).unwrap();
        assert!(ram
            .write_at(4096, &VolatileSlice::from(&mut src[..]))
            .is_err());
        ram.resize(1 << 20).unwrap();
        let mut dst = [1u8; 512];
        ram.read_at((1 << 20) - 512, &VolatileSlice::from(&mut dst[..]))
            .unwrap();
        assert_eq!(dst, [0u8; 512]);
    }

    #[test]
    fn round_trip_and_zeroes() {
        let ram = RamBackend::new(16384).unwrap();
        let mut src = [7u8; 1024];
        ram.write_at(512, &VolatileSlice::from(&mut src[..]))
            .unwrap();
        let mut dst = [0u8; 1024];
        ram.read_at(512, &VolatileSlice::from(&mut dst[..]))
            .unwrap();
        assert_eq!(dst, [7u8; 1024]);
        ram.write_zeroes(0, 16384, false).unwrap();
        ram.read_at(512, &VolatileSlice::from(&mut dst[..]))
            .unwrap();
        assert_eq!(dst, [0u8; 1024]);
        assert!(ram
            .read_at(16384, &VolatileSlice::from(&mut dst[..]))
            .is_err());
    }
}
