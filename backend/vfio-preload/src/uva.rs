//! User virtual addresses to `(file, offset)`: IOMMU_IOAS_MAP takes a
//! `user_va` in QEMU's address space; the door (PROTOCOL.md) takes a
//! descriptor riding with the message and `user_va` = the offset in it.
//!
//! - A range inside a shared file mapping (guest RAM from
//!   `memory-backend-memfd`): the mapping is found in `/proc/self/maps`,
//!   its file among `/proc/self/fd` by `(st_dev, st_ino)`; the offset is
//!   the mapping's file offset plus the distance from its start.
//! - A read-only map (no `IOMMU_IOAS_MAP_WRITEABLE`) of anonymous memory
//!   (QEMU's ROMs: the BIOS, option ROMs): copied once into a memfd of its
//!   own, sealed against shrinking and growing (the door maps every DMA
//!   file shared and writable, so not F_SEAL_WRITE), kept for the life of
//!   the process.
//!   Later writes to the ROM by QEMU are not seen through it (the device
//!   never reads ROM).
//! - Anything else: EFAULT (the kernel's answer for user memory it cannot
//!   pin) and a log line naming the mapping.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use log::{debug, error, info};
use vcdev_iommu::Errno;

/// One line of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapLine {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `rwxp`/`rwxs` as printed.
    pub perms: String,
    /// File offset of `start`.
    pub offset: u64,
    /// Device major.
    pub major: u32,
    /// Device minor.
    pub minor: u32,
    /// Inode (0: anonymous).
    pub inode: u64,
    /// The path column (may be empty, `[heap]`, `/memfd:NAME (deleted)`).
    pub path: String,
}

impl MapLine {
    /// A shared mapping.
    pub fn shared(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's')
    }

    /// Readable.
    pub fn readable(&self) -> bool {
        self.perms.as_bytes().first() == Some(&b'r')
    }

    /// Backed by a file (memfds included).
    pub fn file_backed(&self) -> bool {
        self.inode != 0
    }

    /// A name for logs.
    pub fn describe(&self) -> String {
        let what = if self.path.is_empty() {
            "[anonymous]"
        } else {
            &self.path
        };
        format!(
            "{:#x}-{:#x} {} {what} (offset {:#x}, inode {})",
            self.start, self.end, self.perms, self.offset, self.inode
        )
    }
}

/// Parses one line of `/proc/self/maps`.
pub fn parse_line(line: &str) -> Option<MapLine> {
    let mut it = line.splitn(6, ' ');
    let (s, e) = it.next()?.split_once('-')?;
    let perms = it.next()?.to_owned();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let (maj, min) = it.next()?.split_once(':')?;
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_owned();
    Some(MapLine {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        perms,
        offset,
        major: u32::from_str_radix(maj, 16).ok()?,
        minor: u32::from_str_radix(min, 16).ok()?,
        inode,
        path,
    })
}

/// Parses `/proc/self/maps` text.
pub fn parse_maps(text: &str) -> Vec<MapLine> {
    text.lines().filter_map(parse_line).collect()
}

/// The mapping that holds `[va, va + len)`: the line holding `va`, merged
/// with the lines after it while they continue the same file at the next
/// offset (or, for anonymous memory, directly follow it). `None` if the
/// range is not wholly mapped that way.
pub fn covering(lines: &[MapLine], va: u64, len: u64) -> Option<MapLine> {
    let end = va.checked_add(len.max(1))?;
    let i = lines.iter().position(|l| l.start <= va && va < l.end)?;
    let mut m = lines[i].clone();
    for l in &lines[i + 1..] {
        if m.end >= end {
            break;
        }
        let continues = l.start == m.end
            && l.inode == m.inode
            && (m.major, m.minor) == (l.major, l.minor)
            && (m.inode == 0 || l.offset == m.offset + (m.end - m.start));
        if !continues {
            break;
        }
        m.end = l.end;
    }
    (m.end >= end).then_some(m)
}

/// A file and an offset to send with IOMMU_IOAS_MAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backing {
    /// The descriptor (QEMU's own memfd, or a ROM copy of ours).
    pub fd: RawFd,
    /// The offset of `user_va` in it.
    pub offset: u64,
}

#[derive(Default)]
struct Cache {
    /// Shared file mappings seen so far (with their descriptor).
    files: Vec<(MapLine, RawFd)>,
    /// ROM copies: `(first address, length, memfd)`.
    roms: Vec<(u64, u64, OwnedFd)>,
}

/// The largest anonymous mapping copied whole for a read-only map.
const ROM_COPY_MAX: u64 = 16 << 20;

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

fn same_file(fd: RawFd, l: &MapLine) -> bool {
    // SAFETY: fstat writes into a zeroed stat of the right type.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return false;
        }
        st
    };
    st.st_ino == l.inode && st.st_dev == libc::makedev(l.major, l.minor)
}

/// The descriptor of this process that is the file of mapping `l`.
fn find_fd(l: &MapLine) -> Option<RawFd> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.into_iter().find(|fd| same_file(*fd, l))
}

/// Where `[va, va + len)` lives, for IOMMU_IOAS_MAP (`writeable`: the map
/// asks for device writes).
pub fn resolve(va: u64, len: u64, writeable: bool) -> Result<Backing, Errno> {
    let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = guard.get_or_insert_with(Cache::default);
    let end = va.checked_add(len).ok_or(Errno::EINVAL)?;
    // A file mapping seen before (checked to be the same file still).
    if let Some((l, fd)) = cache
        .files
        .iter()
        .find(|(l, fd)| l.start <= va && end <= l.end && same_file(*fd, l))
    {
        return Ok(Backing {
            fd: *fd,
            offset: l.offset + (va - l.start),
        });
    }
    if let Some((start, _, fd)) = cache.roms.iter().find(|(s, l, _)| *s <= va && end <= s + l) {
        return Ok(Backing {
            fd: fd.as_raw_fd(),
            offset: va - start,
        });
    }
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| Errno::from_io(&e))?;
    let lines = parse_maps(&maps);
    let Some(m) = covering(&lines, va, len) else {
        error!(
            "IOMMU_IOAS_MAP of {va:#x}+{len:#x} refused (EFAULT): not wholly mapped in this process"
        );
        return Err(Errno::EFAULT);
    };
    if m.file_backed() && m.shared() {
        let Some(fd) = find_fd(&m) else {
            error!(
                "IOMMU_IOAS_MAP of {va:#x}+{len:#x} refused (EFAULT): no open descriptor of its file, {}",
                m.describe()
            );
            return Err(Errno::EFAULT);
        };
        debug!("mapping {} is fd {fd}", m.describe());
        let offset = m.offset + (va - m.start);
        cache.files.push((m, fd));
        return Ok(Backing { fd, offset });
    }
    if !writeable && !m.file_backed() && m.readable() {
        // The whole mapping (QEMU maps a ROM again in parts as the guest
        // changes its PAM registers), unless it is large: then the range.
        let (start, n) = if m.end - m.start <= ROM_COPY_MAX {
            (m.start, m.end - m.start)
        } else {
            (va, len)
        };
        let fd = copy_rom(start, n)?;
        info!(
            "read-only {va:#x}+{len:#x} in anonymous memory: {start:#x}+{n:#x} ({}) copied into a sealed memfd",
            m.describe()
        );
        let raw = fd.as_raw_fd();
        cache.roms.push((start, n, fd));
        return Ok(Backing {
            fd: raw,
            offset: va - start,
        });
    }
    error!(
        "IOMMU_IOAS_MAP of {va:#x}+{len:#x} ({}) refused (EFAULT): only shared memfd mappings \
         (guest RAM must be memory-backend-memfd) and read-only anonymous ROM can be given to \
         the device; the region is {}",
        if writeable { "writeable" } else { "read-only" },
        m.describe()
    );
    Err(Errno::EFAULT)
}

/// Copies `[va, va + len)` into a new memfd, sealed against every change.
fn copy_rom(va: u64, len: u64) -> Result<OwnedFd, Errno> {
    let n = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
    // SAFETY: a NUL-terminated name; flags are valid memfd_create flags.
    let raw = unsafe {
        libc::memfd_create(
            c"vcdev-rom".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(Errno::from_io(&std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `[va, va + len)` lies in a readable mapping of this process
    // (checked against /proc/self/maps by the caller); it is only read.
    let bytes = unsafe { std::slice::from_raw_parts(va as usize as *const u8, n) };
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, bytes).map_err(|e| Errno::from_io(&e))?;
    let fd = OwnedFd::from(file);
    // Not F_SEAL_WRITE: the door maps every DMA file shared and writable
    // (the IOAS, not the mapping, enforces read-only).
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on the memfd this function owns.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Errno::from_io(&std::io::Error::last_os_error()));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 fd:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0008000000 rw-s 00000000 00:01 5678 /memfd:mem (deleted)
7f0008000000-7f0010000000 rw-s 08000000 00:01 5678 /memfd:mem (deleted)
7f0010000000-7f0010040000 rw-p 00000000 00:00 0 
7f0010040000-7f0010080000 rw-p 00000000 00:00 0
";

    #[test]
    fn parses_lines() {
        let l = parse_maps(MAPS);
        assert_eq!(l.len(), 5);
        assert_eq!(l[1].start, 0x7f00_0000_0000);
        assert_eq!(l[1].inode, 5678);
        assert_eq!((l[1].major, l[1].minor), (0, 1));
        assert!(l[1].shared() && l[1].file_backed());
        assert_eq!(l[1].path, "/memfd:mem (deleted)");
        assert!(!l[3].file_backed() && !l[3].shared());
        assert_eq!(l[0].major, 0xfd);
    }

    #[test]
    fn covering_merges_continuations() {
        let l = parse_maps(MAPS);
        let m = covering(&l, 0x7f00_07ff_f000, 0x2000).expect("spans two lines of one file");
        assert_eq!(
            (m.start, m.end, m.offset),
            (0x7f00_0000_0000, 0x7f00_1000_0000, 0)
        );
        // Anonymous neighbours merge too.
        let a = covering(&l, 0x7f00_1003_f000, 0x2000).expect("anonymous");
        assert_eq!(a.end, 0x7f00_1008_0000);
        // Past the end of the last line.
        assert!(covering(&l, 0x7f00_1007_f000, 0x2000).is_none());
        // Not mapped at all.
        assert!(covering(&l, 0x1000, 1).is_none());
        // A file mapping does not merge into anonymous memory.
        assert!(covering(&l, 0x7f00_0fff_f000, 0x2000).is_none());
    }

    #[test]
    fn resolves_a_memfd_mapping_and_copies_rom() {
        // SAFETY: a fresh memfd; mapped shared below and unmapped at the end.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is ours.
        assert_eq!(unsafe { libc::ftruncate(fd, 0x4000) }, 0);
        // SAFETY: a new shared mapping of our memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x3000,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0x1000,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let va = p as u64;
        let b = resolve(va + 0x1000, 0x1000, true).expect("memfd");
        assert!(same_file(b.fd, &{
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            covering(&parse_maps(&maps), va, 1).unwrap()
        }));
        assert_eq!(b.offset, 0x2000);
        // Anonymous, writeable: refused.
        let mut anon = vec![7u8; 0x2000];
        let ava = anon.as_mut_ptr() as u64;
        assert_eq!(resolve(ava, 0x100, true), Err(Errno::EFAULT));
        // Anonymous, read-only: a sealed copy (of the whole mapping, or of
        // the range when the mapping is large).
        let rom = resolve(ava, 0x100, false).expect("rom copy");
        // SAFETY: fcntl on the copy's descriptor.
        let seals = unsafe { libc::fcntl(rom.fd, libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        let mut got = [0u8; 0x100];
        let at = i64::try_from(rom.offset).unwrap();
        // SAFETY: reads into a local buffer.
        let n = unsafe { libc::pread(rom.fd, got.as_mut_ptr().cast(), 0x100, at) };
        assert_eq!(n, 0x100);
        assert!(got.iter().all(|b| *b == 7));
        // The same ROM again, or a part of it: the same copy.
        assert_eq!(resolve(ava, 0x100, false).unwrap(), rom);
        let part = resolve(ava + 0x10, 0x10, false).unwrap();
        assert_eq!((part.fd, part.offset), (rom.fd, rom.offset + 0x10));
        // SAFETY: our mapping and descriptor.
        unsafe {
            libc::munmap(p, 0x3000);
            libc::close(fd);
        }
    }
}
