//! Backing memory: the objects that mappings point into.
//!
//! A [`MemObject`] is a shared mapping of a file (a memfd of a cdev client, a
//! region of a vhost-user frontend's memory table) or of anonymous memory.
//! Mappings in an [`crate::AddressSpace`] hold it by `Arc`; it is unmapped
//! when the last mapping that uses it is gone *and* the grace period of the
//! removal has passed, so no reader ever touches an unmapped page.
//!
//! A file that can shrink under a mapping turns an access into SIGBUS, which
//! would kill the daemon: by default only memfds sealed with `F_SEAL_SHRINK`
//! are accepted ([`SealPolicy`]).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::errno::Errno;

/// What to require of a file descriptor before mapping it for DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealPolicy {
    /// Only memfds sealed against shrinking (`F_SEAL_SHRINK`).
    RequireShrinkSeal,
    /// Any file the size of which covers the range (the operator's opt-in,
    /// e.g. QEMU's `memory-backend-file`): a later truncation can SIGBUS us.
    AllowUnsealed,
}

/// Errors of mapping backing memory.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The descriptor is not a memfd sealed with F_SEAL_SHRINK.
    #[error("memory must be a memfd sealed with F_SEAL_SHRINK (seals: {seals:#x})")]
    NotSealed {
        /// The seals found, or -1 when the file is no memfd.
        seals: i32,
    },
    /// The range is empty or lies beyond the end of the file.
    #[error("range {offset:#x}+{len:#x} is outside the file of {file_size:#x} bytes")]
    OutOfRange {
        /// Offset into the file.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The file's size.
        file_size: u64,
    },
    /// fstat failed.
    #[error("fstat of the memory descriptor failed")]
    Stat(#[source] std::io::Error),
    /// mmap failed.
    #[error("mmap of {len:#x} bytes failed")]
    Mmap {
        /// Length asked for.
        len: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl MemError {
    /// The errno a protocol returns for this error.
    pub fn errno(&self) -> Errno {
        match self {
            MemError::NotSealed { .. } => Errno::EINVAL,
            MemError::OutOfRange { .. } => Errno::EFAULT,
            MemError::Stat(e) => Errno::from_io(e),
            MemError::Mmap { .. } => Errno::ENOMEM,
        }
    }
}

/// A shared mapping of backing memory, unmapped on drop.
#[derive(Debug)]
pub struct MemObject {
    base: NonNull<u8>,
    len: usize,
    /// Offset of the first byte in the file it maps, if it maps one. The
    /// descriptor itself is closed once mapped: the mapping holds the file,
    /// and a descriptor per mapping would run into RLIMIT_NOFILE long before
    /// the mappings run out.
    file_offset: Option<u64>,
}

// SAFETY: the mapping is plain shared memory, accessed only through
// volatile slices or raw copies; nothing in it is tied to a thread.
unsafe impl Send for MemObject {}
// SAFETY: as above; concurrent access to the bytes is the guests' and
// drivers' business (it is DMA memory), never a Rust reference.
unsafe impl Sync for MemObject {}

impl MemObject {
    /// Maps `len` bytes of anonymous shared memory (tests, RAM disks, benches).
    #[cfg(not(miri))]
    pub fn anonymous(len: usize) -> Result<MemObject, MemError> {
        // SAFETY: a fresh anonymous mapping; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        Self::from_mmap(ptr, len, None)
    }

    /// Under Miri, which has no shared mappings: `len` zeroed, page-aligned
    /// bytes of the heap, freed on drop. Miri then sees every access to
    /// them, and an access after the last mapping's grace period dropped
    /// the object is a use after free it reports.
    #[cfg(miri)]
    pub fn anonymous(len: usize) -> Result<MemObject, MemError> {
        let layout = std::alloc::Layout::from_size_align(len, page_size_usize())
            .ok()
            .filter(|l| l.size() > 0)
            .ok_or(MemError::Mmap {
                len: len as u64,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let base = NonNull::new(ptr).ok_or(MemError::Mmap {
            len: len as u64,
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        Ok(MemObject {
            base,
            len,
            file_offset: None,
        })
    }

    /// Maps `len` bytes of `fd` at `offset`, shared, after checking the
    /// seals (per `policy`) and that the range lies inside the file.
    pub fn from_fd(
        fd: OwnedFd,
        offset: u64,
        len: u64,
        policy: SealPolicy,
    ) -> Result<MemObject, MemError> {
        let file = File::from(fd);
        check_seals(&file, policy)?;
        let file_size = file.metadata().map_err(MemError::Stat)?.len();
        let end = offset.checked_add(len);
        let map_len = usize::try_from(len).ok();
        let map_off = libc::off_t::try_from(offset).ok();
        let (Some(end), Some(map_len), Some(map_off)) = (end, map_len, map_off) else {
            return Err(MemError::OutOfRange {
                offset,
                len,
                file_size,
            });
        };
        if len == 0 || end > file_size {
            return Err(MemError::OutOfRange {
                offset,
                len,
                file_size,
            });
        }
        // mmap wants a page-aligned file offset: map from the page below.
        let page = page_size();
        let slack = usize::try_from(offset % page).unwrap_or(0);
        let aligned_off = map_off - libc::off_t::try_from(slack).unwrap_or(0);
        // SAFETY: shared mapping of a file we hold open; range checked above.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len + slack,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                aligned_off,
            )
        };
        drop(file);
        let mut obj = Self::from_mmap(ptr, map_len + slack, Some(offset))?;
        obj.skip_prefix(slack);
        Ok(obj)
    }

    fn from_mmap(
        ptr: *mut libc::c_void,
        len: usize,
        file_offset: Option<u64>,
    ) -> Result<MemObject, MemError> {
        if ptr == libc::MAP_FAILED {
            return Err(MemError::Mmap {
                len: len as u64,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(MemError::Mmap {
            len: len as u64,
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        Ok(MemObject {
            base,
            len,
            file_offset,
        })
    }

    /// Hides the first `n` bytes of the mapping (page alignment slack).
    fn skip_prefix(&mut self, n: usize) {
        // SAFETY: n < page size <= len: stays inside the mapping.
        self.base = unsafe { NonNull::new_unchecked(self.base.as_ptr().add(n)) };
        self.len -= n;
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never true for a constructed object).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host address of the first byte.
    pub fn host_base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// The offset of the first byte in the file, if a file backs it.
    pub fn file_offset(&self) -> Option<u64> {
        self.file_offset
    }

    /// Whether `[offset, offset + len)` lies inside the object.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len as u64)
    }
}

impl Drop for MemObject {
    #[cfg(miri)]
    fn drop(&mut self) {
        // Under Miri every MemObject is heap memory from `anonymous` (Miri
        // cannot map files: `from_fd` fails before it constructs one).
        let layout = std::alloc::Layout::from_size_align(self.len, page_size_usize())
            .expect("the layout `anonymous` allocated with");
        // SAFETY: `base` was allocated in `anonymous` with this very layout
        // (len and alignment unchanged: skip_prefix is only for from_fd),
        // and nothing refers to it any more: every address space drops its
        // MemObjects only after a grace period.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) };
    }

    #[cfg(not(miri))]
    fn drop(&mut self) {
        let slack = self.base.as_ptr() as usize % page_size_usize();
        // SAFETY: base - slack .. base + len is exactly the mapping made in
        // the constructor, and nothing refers to it any more: every address
        // space drops its MemObjects only after a grace period.
        unsafe {
            libc::munmap(self.base.as_ptr().sub(slack).cast(), self.len + slack);
        }
    }
}

/// Refuses `file` unless `policy` allows it.
fn check_seals(file: &File, policy: SealPolicy) -> Result<(), MemError> {
    if policy == SealPolicy::RequireShrinkSeal {
        // SAFETY: fcntl on a descriptor we own; F_GET_SEALS takes no argument.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(MemError::NotSealed { seals });
        }
    }
    Ok(())
}

/// Whole-file mappings shared by every mapping made of one file (one per
/// iommufd context).
///
/// Mapping each IOAS_MAP call's range on its own would cost an mmap per
/// call and bound the mappings by the host's `vm.max_map_count`; instead
/// the first map of a file maps all of it, and later maps of the same file
/// (same device and inode) share that [`MemObject`] as long as any mapping
/// uses it. A file that grew past the shared mapping is mapped again,
/// whole.
#[derive(Debug, Default)]
pub struct FileMappings {
    files: std::sync::Mutex<std::collections::HashMap<(u64, u64), std::sync::Weak<MemObject>>>,
}

impl FileMappings {
    /// The memory of `fd[offset..offset + len]`, checked as
    /// [`MemObject::from_fd`] checks it: the shared whole-file object and
    /// the offset of the range in it.
    pub fn map(
        &self,
        fd: OwnedFd,
        offset: u64,
        len: u64,
        policy: SealPolicy,
    ) -> Result<(std::sync::Arc<MemObject>, u64), MemError> {
        use std::os::unix::fs::MetadataExt;
        let file = File::from(fd);
        check_seals(&file, policy)?;
        let meta = file.metadata().map_err(MemError::Stat)?;
        let file_size = meta.len();
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > file_size) {
            return Err(MemError::OutOfRange {
                offset,
                len,
                file_size,
            });
        }
        let key = (meta.dev(), meta.ino());
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(obj) = files.get(&key).and_then(std::sync::Weak::upgrade) {
            if obj.contains(offset, len) {
                return Ok((obj, offset));
            }
        }
        let obj = std::sync::Arc::new(MemObject::from_fd(
            file.into(),
            0,
            file_size,
            SealPolicy::AllowUnsealed, // checked above
        )?);
        if files.len() >= 64 && files.len().is_power_of_two() {
            files.retain(|_, w| w.strong_count() > 0);
        }
        files.insert(key, std::sync::Arc::downgrade(&obj));
        Ok((obj, offset))
    }
}

fn page_size_usize() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096)
}

fn page_size() -> u64 {
    page_size_usize() as u64
}

/// Creates a memfd of `len` bytes sealed against shrinking (helpers for
/// tests, benches and clients of the cdev protocol).
pub fn sealed_memfd(name: &str, len: u64) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: valid NUL-terminated name; flags are memfd_create's.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = File::from(fd);
    file.set_len(len)?;
    // SAFETY: fcntl on our own descriptor with an int argument.
    let r = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn unsealed_memfd_is_refused_unless_allowed() {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new("t").unwrap();
        // SAFETY: as in sealed_memfd.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(8192).unwrap();
        let dup: OwnedFd = file.try_clone().unwrap().into();
        let e =
            MemObject::from_fd(file.into(), 0, 4096, SealPolicy::RequireShrinkSeal).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        let m = MemObject::from_fd(dup, 4096, 4096, SealPolicy::AllowUnsealed).unwrap();
        assert_eq!(m.len(), 4096);
    }

    /// The descriptor is closed once mapped: thousands of mappings must not
    /// run into RLIMIT_NOFILE.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn the_descriptor_is_closed_once_mapped() {
        use std::os::fd::{AsFd, AsRawFd};
        use std::os::unix::fs::MetadataExt;
        let fd = sealed_memfd("t", 8192).unwrap();
        let ino = File::from(fd.try_clone().unwrap())
            .metadata()
            .unwrap()
            .ino();
        let dup = fd.as_fd().try_clone_to_owned().unwrap();
        let raw = dup.as_raw_fd();
        let m = MemObject::from_fd(dup, 0, 4096, SealPolicy::RequireShrinkSeal).unwrap();
        // SAFETY: fstat into a zeroed stat buffer; `raw` may be closed (or
        // reused by another thread), which fstat reports or we tell by inode.
        let still_ours = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstat(raw, &mut st) == 0 && st.st_ino == ino
        };
        assert!(!still_ours, "the mapped descriptor is still open");
        drop(m);
    }

    /// Maps of one file share one whole-file mapping; a file that grew is
    /// mapped again; refusals are those of `from_fd`.
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn file_mappings_share_one_mapping_per_file() {
        use std::os::fd::AsFd;
        let fm = FileMappings::default();
        let fd = sealed_memfd("t", 4 * 4096).unwrap();
        let dup = || fd.as_fd().try_clone_to_owned().unwrap();
        let (a, oa) = fm
            .map(dup(), 4096, 4096, SealPolicy::RequireShrinkSeal)
            .unwrap();
        let (b, ob) = fm
            .map(dup(), 100, 8000, SealPolicy::RequireShrinkSeal)
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!((oa, ob, a.len()), (4096, 100, 4 * 4096));
        File::from(dup()).set_len(8 * 4096).unwrap();
        let (c, oc) = fm
            .map(dup(), 6 * 4096, 4096, SealPolicy::RequireShrinkSeal)
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!((oc, c.len()), (6 * 4096, 8 * 4096));
        let e = fm
            .map(dup(), 8 * 4096, 1, SealPolicy::RequireShrinkSeal)
            .unwrap_err();
        assert_eq!(e.errno(), Errno::EFAULT);
        let e = fm
            .map(dup(), 0, 0, SealPolicy::RequireShrinkSeal)
            .unwrap_err();
        assert_eq!(e.errno(), Errno::EFAULT);
        drop((a, b));
        // Nothing uses the first mapping any more: a new one is made.
        let other = sealed_memfd("u", 4096).unwrap();
        let (d, _) = fm
            .map(other, 0, 4096, SealPolicy::RequireShrinkSeal)
            .unwrap();
        assert_eq!(d.len(), 4096);
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn range_beyond_file_end_is_efault() {
        let fd = sealed_memfd("t", 8192).unwrap();
        let e = MemObject::from_fd(fd, 4096, 8192, SealPolicy::RequireShrinkSeal).unwrap_err();
        assert_eq!(e.errno(), Errno::EFAULT);
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create and mmap of a file: not under Miri")]
    fn unaligned_offset_maps_the_right_bytes() {
        let fd = sealed_memfd("t", 8192).unwrap();
        let file = File::from(fd);
        std::os::unix::fs::FileExt::write_all_at(&file, b"hello", 5000).unwrap();
        let m = MemObject::from_fd(file.into(), 5000, 100, SealPolicy::RequireShrinkSeal).unwrap();
        assert_eq!(m.file_offset(), Some(5000));
        let mut got = [0u8; 5];
        // SAFETY: 5 bytes inside the 100-byte mapping.
        unsafe { std::ptr::copy_nonoverlapping(m.host_base(), got.as_mut_ptr(), 5) };
        assert_eq!(&got, b"hello");
    }
}
