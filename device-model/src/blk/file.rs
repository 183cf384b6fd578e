//! A disk backed by a raw image file or block device.
//!
//! Data moves with `pread`/`pwrite` straight between the file and guest memory. Flush is
//! `fdatasync`, discard punches a hole, write-zeroes asks `fallocate` for a zeroed range and falls
//! back to writing zeros. Positioned I/O needs no lock, so every queue may use the file at once.
//!
//! With [`FileOptions::direct`] the file is opened with `O_DIRECT`, bypassing the host page
//! cache. Its buffers and offsets must then be aligned: [`dio_alignment`] finds how, and the
//! backend reports it as [`BlockBackend::mem_align`] and [`BlockBackend::block_size`]; the
//! device bounces unaligned guest buffers (`super::bounce`).
//!
//! [`FileBackend::open_with`] locks the image as QEMU does ([`super::lock`]): a writable open
//! exclusively, a read-only one shared with other readers. A second writable open, by vcdev or
//! QEMU, or by another device of this process, fails with [`Error::Locked`]. The lock is
//! released when the backend is dropped.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::VolatileSlice;

use super::backend::{BlockBackend, SECTOR_BYTES, SECTOR_SIZE, ZEROES};
use super::lock::{self, Conflict, Holder, ImageLock, LockError};
use super::resize::ResizeError;

/// Errors opening a [`FileBackend`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image could not be opened.
    #[error("Failed to open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image could not be opened with `O_DIRECT` (the file system may not support it).
    #[error("Failed to open disk image {path} with O_DIRECT")]
    OpenDirect {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another open of the image holds a lock that conflicts with this open (QEMU's
    /// "Failed to get \"write\" lock").
    #[error(
        "Disk image {path} is locked by another process: {conflict}, in conflict with this \
         {mode} open (QEMU lock byte {byte}; {holder})",
        byte = conflict.byte()
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// What the other open holds or refuses to share.
        conflict: Conflict,
        /// Who holds it, as far as the kernel says.
        holder: Holder,
        /// "writable" or "read-only": this open.
        mode: &'static str,
    },
    /// The image could not be locked (other than for a conflict).
    #[error("Failed to lock disk image {path}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image's size could not be found.
    #[error("Failed to find the size of the disk image")]
    Size(#[source] io::Error),
    /// The image's size is zero or not a multiple of the sector size.
    #[error("Disk image size {0} is not a non-zero multiple of 512 bytes")]
    InvalidSize(u64),
}

/// How to open a [`FileBackend`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Open with `O_DIRECT` (the `direct=on` device option).
    pub direct: bool,
}

/// Where an `O_DIRECT` alignment came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlignSource {
    /// `statx(STATX_DIOALIGN)`: `stx_dio_mem_align` and `stx_dio_offset_align`.
    Statx,
    /// A block device's logical block size (`BLKSSZGET`), for memory and offsets.
    BlockDevice,
    /// Neither answered: [`DEFAULT_DIO_MEM_ALIGN`] and [`DEFAULT_DIO_OFFSET_ALIGN`].
    Default,
}

/// The alignment an `O_DIRECT` transfer needs, in bytes (powers of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// Of buffer addresses in memory.
    pub mem: u32,
    /// Of file offsets and transfer lengths.
    pub offset: u32,
    /// How it was found.
    pub source: AlignSource,
}

/// The memory alignment assumed when the file does not say: a page, safe everywhere.
pub const DEFAULT_DIO_MEM_ALIGN: u32 = 4096;
/// The offset alignment assumed when the file does not say: a sector, what every disk takes
/// since 512-byte-sector disks exist (a 4K-native disk says so through `BLKSSZGET`).
pub const DEFAULT_DIO_OFFSET_ALIGN: u32 = SECTOR_BYTES;

/// The `O_DIRECT` alignment of `file`: `statx(STATX_DIOALIGN)` when the kernel and file system
/// report it (Linux 6.1+), else a block device's logical block size, else the defaults.
#[must_use]
pub fn dio_alignment(file: &File) -> DioAlign {
    if let Some((mem, offset)) = statx_dio_align(file) {
        return DioAlign {
            mem,
            offset,
            source: AlignSource::Statx,
        };
    }
    let is_block_device = file
        .metadata()
        .is_ok_and(|m| m.file_type().is_block_device());
    if let Some(lbs) = is_block_device.then(|| logical_block_size(file)).flatten() {
        return DioAlign {
            mem: lbs,
            offset: lbs,
            source: AlignSource::BlockDevice,
        };
    }
    DioAlign {
        mem: DEFAULT_DIO_MEM_ALIGN,
        offset: DEFAULT_DIO_OFFSET_ALIGN,
        source: AlignSource::Default,
    }
}

/// `(stx_dio_mem_align, stx_dio_offset_align)`, if the kernel filled them in with powers of two.
fn statx_dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: `struct statx` is plain integers, for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call, the empty path is a NUL-terminated string
    // (AT_EMPTY_PATH makes it name the descriptor itself), and `stx` is a writable `statx`.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let (mem, offset) = (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    (ret == 0
        && stx.stx_mask & libc::STATX_DIOALIGN != 0
        && mem.is_power_of_two()
        && offset.is_power_of_two())
    .then_some((mem, offset))
}

/// A block device's logical block size, if `BLKSSZGET` gives a power of two.
fn logical_block_size(file: &File) -> Option<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through the pointer, which points at `size`; the
    // descriptor is open for the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    let size = u32::try_from(size).ok()?;
    (ret == 0 && size.is_power_of_two()).then_some(size)
}

/// A disk image in a file (or a block device) accessed with positioned I/O.
///
/// Resizing ([`BlockBackend::resize`]) extends or truncates a regular file (`ftruncate`); a
/// block device keeps its size, which [`BlockBackend::probe_len`] reads again after the operator
/// changed it.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    len: AtomicU64,
    /// With `O_DIRECT`: the alignment transfers need.
    direct: Option<DioAlign>,
    /// The image's lock (none from [`FileBackend::from_file`], or where the file system has
    /// no OFD locks); released on drop.
    lock: Option<ImageLock>,
}

impl Drop for FileBackend {
    fn drop(&mut self) {
        if let Some(lock) = self.lock.take() {
            lock.release(&self.file);
        }
    }
}

impl FileBackend {
    /// Open the image at `path`, read-write unless `read_only`, through the page cache.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        Self::open_with(
            path,
            FileOptions {
                read_only,
                direct: false,
            },
        )
    }

    /// Open the image at `path` with `options`.
    pub fn open_with(path: &Path, options: FileOptions) -> Result<Self, Error> {
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(path).map_err(|source| {
            let path = path.to_owned();
            // EINVAL from open(2) with O_DIRECT: "The filesystem does not support O_DIRECT".
            if options.direct && source.raw_os_error() == Some(libc::EINVAL) {
                Error::OpenDirect { path, source }
            } else {
                Error::Open { path, source }
            }
        })?;
        let lock = Self::lock(&file, path, options.read_only)?;
        // On an error below the file is closed, which drops its locks.
        let mut backend = Self::from_file(file)?;
        backend.lock = lock;
        if options.direct {
            backend.direct = Some(dio_alignment(&backend.file));
        }
        Ok(backend)
    }

    /// Locks the image at `path`, open as `file` (see [`super::lock`]). A file system without
    /// OFD locks gives no lock and a warning.
    fn lock(file: &File, path: &Path, read_only: bool) -> Result<Option<ImageLock>, Error> {
        match lock::lock(file, read_only) {
            Ok(l) => Ok(Some(l)),
            Err(LockError::Conflict { conflict, holder }) => Err(Error::Locked {
                path: path.to_owned(),
                conflict,
                holder,
                mode: if read_only { "read-only" } else { "writable" },
            }),
            Err(LockError::Io(e)) if lock::is_unsupported(&e) => {
                log::warn!(
                    "disk image {}: not locked, its file system has no OFD locks ({e}): \
                     nothing keeps another process from writing it",
                    path.display()
                );
                Ok(None)
            }
            Err(LockError::Io(source)) => Err(Error::Lock {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Use an already open image (through the page cache), without locking it. Its size is taken now; it changes
    /// only through [`BlockBackend::resize`].
    pub fn from_file(file: File) -> Result<Self, Error> {
        let len = size_of_file(&file).map_err(Error::Size)?;
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(Error::InvalidSize(len));
        }
        Ok(Self {
            file,
            len: AtomicU64::new(len),
            direct: None,
            lock: None,
        })
    }

    /// Whether the image is locked (see [`super::lock`]).
    #[must_use]
    pub fn locked(&self) -> bool {
        self.lock.is_some()
    }

    fn is_block_device(&self) -> bool {
        self.file
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device())
    }

    /// With `O_DIRECT`, the alignment it needs.
    #[must_use]
    pub fn direct(&self) -> Option<DioAlign> {
        self.direct
    }

    /// Whether the image is a regular file that lives in memory (tmpfs or ramfs): its reads and
    /// writes never wait for a device, so an asynchronous engine can only add system calls to
    /// them. A block device is never "in memory", whatever file system holds its node.
    #[must_use]
    pub fn in_memory(&self) -> bool {
        // A block device's node lives on devtmpfs: only a regular file's
        // file system says where its data is.
        if !self.file.metadata().is_ok_and(|m| m.file_type().is_file()) {
            return false;
        }
        // RAMFS_MAGIC from linux/magic.h (libc has TMPFS_MAGIC only).
        const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
        // SAFETY: all-zero is a valid `statfs` (integers only).
        let mut st: libc::statfs64 = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is owned by `self.file`; fstatfs writes one `statfs64` into
        // `st`, which lives for the call.
        let ret = unsafe { libc::fstatfs64(self.file.as_raw_fd(), &mut st) };
        ret == 0 && (st.f_type == libc::TMPFS_MAGIC || st.f_type == RAMFS_MAGIC)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let offset = libc::off64_t::try_from(offset).map_err(|_| einval())?;
        let len = libc::off64_t::try_from(len).map_err(|_| einval())?;
        loop {
            // SAFETY: fallocate only reads its scalar arguments; the descriptor is owned by
            // `self.file` and stays open for the call.
            let ret = unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn write_zeroes_by_hand(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let chunk = usize::try_from(len.saturating_sub(done))
                .unwrap_or(usize::MAX)
                .min(ZEROES.0.len());
            let zeroes = ZEROES.0.get(..chunk).ok_or_else(einval)?;
            let pos = offset.checked_add(done).ok_or_else(einval)?;
            std::os::unix::fs::FileExt::write_all_at(&self.file, zeroes, pos)?;
            done = done.saturating_add(u64::try_from(chunk).map_err(|_| einval())?);
        }
        Ok(())
    }
}

/// The size of an image: seeking to the end also sizes block devices (the kernel answers with
/// the device's size, as `BLKGETSIZE64` does), whose metadata length is 0. All I/O is
/// positioned, so the file offset this moves is never used.
fn size_of_file(mut file: &File) -> io::Result<u64> {
    file.seek(SeekFrom::End(0))
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

/// Whether a positioned transfer moves data from the file into memory or the reverse.
#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

fn transfer(file: &File, dir: Dir, mut offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
    let mut rest = *buf;
    while !rest.is_empty() {
        let pos = libc::off64_t::try_from(offset).map_err(|_| einval())?;
        let guard = rest.ptr_guard_mut();
        let ret = match dir {
            // SAFETY: `guard` points at `rest.len()` bytes of memory that `rest` keeps mapped and
            // writable for the duration of the call; the kernel writes at most that many bytes.
            Dir::Read => unsafe {
                libc::pread64(file.as_raw_fd(), guard.as_ptr().cast(), rest.len(), pos)
            },
            // SAFETY: `guard` points at `rest.len()` readable bytes kept mapped by `rest`; the
            // kernel only reads them.
            Dir::Write => unsafe {
                libc::pwrite64(file.as_raw_fd(), guard.as_ptr().cast(), rest.len(), pos)
            },
        };
        let n = match usize::try_from(ret) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => n,
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
        };
        rest = rest.offset(n).map_err(|_| einval())?;
        offset = offset
            .checked_add(u64::try_from(n).map_err(|_| einval())?)
            .ok_or_else(einval)?;
    }
    Ok(())
}

impl BlockBackend for FileBackend {
    fn len(&self) -> u64 {
        self.len.load(Ordering::SeqCst)
    }

    fn probe_len(&self) -> io::Result<Option<u64>> {
        size_of_file(&self.file).map(Some)
    }

    /// A regular file is extended or truncated (`ftruncate`: the new bytes read as zeros); a
    /// block device takes only the size it has.
    fn resize(&self, len: u64) -> Result<(), ResizeError> {
        if self.is_block_device() {
            let now = size_of_file(&self.file).map_err(ResizeError::Probe)?;
            if now != len {
                return Err(ResizeError::FixedSize {
                    size: len,
                    len: now,
                });
            }
        } else {
            self.file.set_len(len).map_err(ResizeError::Backing)?;
        }
        self.len.store(len, Ordering::SeqCst);
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        transfer(&self.file, Dir::Read, offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        transfer(&self.file, Dir::Write, offset, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn mem_align(&self) -> usize {
        self.direct
            .map_or(1, |a| usize::try_from(a.mem).unwrap_or(usize::MAX))
    }

    fn block_size(&self) -> u32 {
        self.direct
            .map_or(SECTOR_BYTES, |a| a.offset.max(SECTOR_BYTES))
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            // A discard is a hint: a file system without holes simply keeps the data.
            Err(err) if is_unsupported(&err) => Ok(()),
            other => other,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(err) if is_unsupported(&err) => {}
                other => return other,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(err) if is_unsupported(&err) => self.write_zeroes_by_hand(offset, len),
            other => other,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A scratch file in the temp dir, removed on drop.
    pub(crate) struct TempImage {
        pub(crate) path: PathBuf,
    }

    impl TempImage {
        pub(crate) fn new(len: u64) -> Self {
            Self::in_dir(&std::env::temp_dir(), len)
        }

        /// An image in `dir` (`/dev/shm`: a file in memory, whose I/O completes inline).
        pub(crate) fn in_dir(dir: &std::path::Path, len: u64) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = dir.join(format!(
                "vcdev-devmodel-{}-{}.img",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let file = File::create(&path).unwrap();
            file.set_len(len).unwrap();
            Self { path }
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    #[test]
    fn open_errors() {
        let img = TempImage::new(1000);
        assert!(matches!(
            FileBackend::open(&img.path, false),
            Err(Error::InvalidSize(1000))
        ));
        let missing = img.path.with_extension("missing");
        assert!(matches!(
            FileBackend::open(&missing, true),
            Err(Error::Open { .. })
        ));
    }

    fn locked(r: Result<FileBackend, Error>) -> String {
        match r {
            Err(e @ Error::Locked { .. }) => e.to_string(),
            other => panic!("expected a lock conflict, got {other:?}"),
        }
    }

    /// Two writable opens in one process conflict as two processes would (OFD locks belong to
    /// the open, not the process); the lock goes with the backend.
    #[test]
    fn writable_opens_exclude_each_other() {
        let img = TempImage::new(65536);
        let first = FileBackend::open(&img.path, false).unwrap();
        assert!(first.locked());
        let msg = locked(FileBackend::open(&img.path, false));
        assert!(msg.contains(&img.path.display().to_string()), "{msg}");
        assert!(msg.contains("locked by another process"), "{msg}");
        assert!(msg.contains("l_pid -1"), "{msg}");
        drop(first);
        let again = FileBackend::open(&img.path, false).unwrap();
        assert!(again.locked());
    }

    /// Read-only opens share the image (a golden image).
    #[test]
    fn read_only_opens_share() {
        let img = TempImage::new(65536);
        let a = FileBackend::open(&img.path, true).unwrap();
        let b = FileBackend::open(&img.path, true).unwrap();
        let c = FileBackend::open_with(
            &img.path,
            FileOptions {
                read_only: true,
                direct: false,
            },
        )
        .unwrap();
        assert!(a.locked() && b.locked() && c.locked());
    }

    /// A writable and a read-only open conflict, whichever comes first; a failed open leaves no
    /// lock behind.
    #[test]
    fn writable_and_read_only_conflict() {
        let img = TempImage::new(65536);
        let rw = FileBackend::open(&img.path, false).unwrap();
        let msg = locked(FileBackend::open(&img.path, true));
        assert!(msg.contains("holds the \"write\" permission"), "{msg}");
        assert!(msg.contains("byte 101"), "{msg}");
        assert!(msg.contains("read-only open"), "{msg}");
        drop(rw);
        let ro = FileBackend::open(&img.path, true).unwrap();
        let msg = locked(FileBackend::open(&img.path, false));
        assert!(
            msg.contains("does not share the \"write\" permission"),
            "{msg}"
        );
        assert!(msg.contains("byte 201"), "{msg}");
        assert!(msg.contains("writable open"), "{msg}");
        // The refused writable open left nothing: another reader still gets in.
        let ro2 = FileBackend::open(&img.path, true).unwrap();
        drop((ro, ro2));
        FileBackend::open(&img.path, false).unwrap();
    }

    /// A block device is locked too, as QEMU's `host_device` locks it (needs `losetup`, so
    /// root; skipped otherwise).
    #[test]
    fn block_devices_are_locked() {
        let img = TempImage::new(1 << 20);
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img.path)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            _ => {
                eprintln!("SKIP block_devices_are_locked: no losetup (root needed)");
                return;
            }
        };
        let first = FileBackend::open(Path::new(&dev), false);
        let locked = first
            .as_ref()
            .map(FileBackend::locked)
            .map_err(ToString::to_string);
        let second = match FileBackend::open(Path::new(&dev), true) {
            Err(e @ Error::Locked { .. }) => Ok(e.to_string()),
            other => Err(format!("{other:?}")),
        };
        drop(first);
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        assert_eq!(locked, Ok(true), "{dev}");
        assert!(second.is_ok(), "{dev}: {second:?}");
    }

    /// An unlocked backend (from an open file) neither takes nor checks locks.
    #[test]
    fn from_file_does_not_lock() {
        let img = TempImage::new(65536);
        let _rw = FileBackend::open(&img.path, false).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img.path)
            .unwrap();
        assert!(!FileBackend::from_file(f).unwrap().locked());
    }

    #[test]
    fn round_trip_zeroes_discard() {
        let img = TempImage::new(65536);
        let disk = FileBackend::open(&img.path, false).unwrap();
        assert_eq!(disk.len(), 65536);
        let mut src: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        disk.write_at(4096, &VolatileSlice::from(&mut src[..]))
            .unwrap();
        let mut dst = vec![0u8; 8192];
        disk.read_at(4096, &VolatileSlice::from(&mut dst[..]))
            .unwrap();
        assert_eq!(dst, src);
        disk.flush().unwrap();
        disk.write_zeroes(4096, 4096, false).unwrap();
        disk.write_zeroes(8192, 512, true).unwrap();
        disk.read_at(4096, &VolatileSlice::from(&mut dst[..]))
            .unwrap();
        assert!(dst[..4096 + 512].iter().all(|&b| b == 0));
        assert_eq!(dst[4096 + 512..], src[4096 + 512..]);
        disk.discard(0, 65536).unwrap();
        let mut past = [0u8; 512];
        assert!(disk
            .read_at(65536, &VolatileSlice::from(&mut past[..]))
            .is_err());
    }

    #[test]
    fn zeroes_by_hand() {
        let img = TempImage::new(16384);
        let disk = FileBackend::open(&img.path, false).unwrap();
        let mut src = vec![0xabu8; 16384];
        disk.write_at(0, &VolatileSlice::from(&mut src[..]))
            .unwrap();
        disk.write_zeroes_by_hand(512, 9000).unwrap();
        let mut dst = vec![0u8; 16384];
        disk.read_at(0, &VolatileSlice::from(&mut dst[..])).unwrap();
        assert!(dst[512..9512].iter().all(|&b| b == 0));
        assert!(dst[..512].iter().all(|&b| b == 0xab));
        assert!(dst[9512..].iter().all(|&b| b == 0xab));
    }
}
