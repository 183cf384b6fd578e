//! A shared mapping of part of a device file (a BAR vfio-pci lets us
//! mmap): MMIO by volatile loads and stores of the register's width.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use vcdev_iommu::Errno;

/// `len` bytes of a device file from `offset`, mapped shared read-write;
/// unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain device memory owned by this value; every
// access is a volatile load or store that the device serialises.
unsafe impl Send for Mapping {}

impl Mapping {
    /// mmap(2) of `len` bytes of `fd` at `offset`.
    pub fn new(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<Mapping, Errno> {
        let len = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
        let off = libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        // SAFETY: a fresh mapping at an address the kernel picks; it
        // aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::from_io(&std::io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or(Errno::EINVAL)?;
        Ok(Mapping { base, len })
    }

    /// The address of `n` bytes at `off`, if inside the mapping and
    /// aligned to `n`.
    fn at(&self, off: u64, n: usize) -> Result<*mut u8, Errno> {
        let off = usize::try_from(off).map_err(|_| Errno::EINVAL)?;
        if off.checked_add(n).is_none_or(|end| end > self.len) || !off.is_multiple_of(n) {
            return Err(Errno::EINVAL);
        }
        Ok(self.base.as_ptr().wrapping_add(off))
    }

    /// A load of `n` bytes (1, 2, 4 or 8) at `off`, little-endian.
    pub fn read(&self, off: u64, n: usize) -> Result<Vec<u8>, Errno> {
        let p = self.at(off, n)?;
        // SAFETY: `p..p+n` is inside the mapping and aligned to `n` (checked
        // by `at`); a volatile load of that width is one MMIO read.
        let v: u64 = unsafe {
            match n {
                1 => u64::from(std::ptr::read_volatile(p)),
                2 => u64::from(std::ptr::read_volatile(p.cast::<u16>())),
                4 => u64::from(std::ptr::read_volatile(p.cast::<u32>())),
                8 => std::ptr::read_volatile(p.cast::<u64>()),
                _ => return Err(Errno::EINVAL),
            }
        };
        Ok(v.to_le_bytes()[..n].to_vec())
    }

    /// A store of `data` (1, 2, 4 or 8 bytes, little-endian) at `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<usize, Errno> {
        let n = data.len();
        let p = self.at(off, n)?;
        let mut b = [0u8; 8];
        b.get_mut(..n).ok_or(Errno::EINVAL)?.copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        // SAFETY: `p..p+n` is inside the mapping and aligned to `n` (checked
        // by `at`); a volatile store of that width is one MMIO write. The
        // truncating casts keep the low `n` bytes, which hold `data`.
        unsafe {
            match n {
                1 => std::ptr::write_volatile(p, v as u8),
                2 => std::ptr::write_volatile(p.cast::<u16>(), v as u16),
                4 => std::ptr::write_volatile(p.cast::<u32>(), v as u32),
                8 => std::ptr::write_volatile(p.cast::<u64>(), v),
                _ => return Err(Errno::EINVAL),
            }
        }
        Ok(n)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is the mapping this value made and owns.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
