//! A disk held in anonymous memory.

use std::io;

use vm_memory::{MmapRegion, VolatileMemory, VolatileSlice};

use super::backend::{BlockBackend, SECTOR_SIZE, ZEROES};

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
}

/// A disk in an anonymous private mapping of this process.
///
/// Every access is a volatile copy into or out of the mapping through [`VolatileSlice`], so
/// several threads may use it at once with no lock; like a real disk, overlapping concurrent
/// writes leave an unspecified mix.
#[derive(Debug)]
pub struct RamBackend {
    region: MmapRegion<()>,
    len: u64,
}

impl RamBackend {
    /// A zero-filled RAM disk of `len` bytes (a non-zero multiple of 512).
    pub fn new(len: u64) -> Result<Self, Error> {
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(Error::InvalidSize(len));
        }
        let size = usize::try_from(len).map_err(|_| Error::InvalidSize(len))?;
        let region = MmapRegion::new(size).map_err(|source| Error::Mmap { size: len, source })?;
        Ok(Self { region, len })
    }

    fn slice(&self, offset: u64, len: usize) -> io::Result<VolatileSlice<'_>> {
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
        self.len
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
        let len = usize::try_from(len).map_err(|_| invalid_range())?;
        let mut dst = self.slice(offset, len)?;
        while !dst.is_empty() {
            let n = dst.len().min(ZEROES.0.len());
            let zeroes = ZEROES.0.get(..n).ok_or_else(invalid_range)?;
            dst.copy_from(zeroes);
            dst = dst.offset(n).map_err(|_| invalid_range())?;
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
