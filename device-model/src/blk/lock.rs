//! Image locking, interoperable with QEMU's `file-posix` driver.
//!
//! QEMU (`block/file-posix.c`) turns the block-layer permissions an opener holds, and those it
//! refuses to share, into read locks on single bytes of the image, taken with open file
//! description locks (`F_OFD_SETLK`): a lock belongs to one `open()`, not to a process, so two
//! opens of one image inside one process conflict exactly as two processes do.
//!
//! - byte `100 + bit` ([`PERM_BASE`]): the opener *holds* permission `bit`;
//! - byte `200 + bit` ([`SHARED_BASE`]): the opener does *not share* permission `bit`.
//!
//! The bits are QEMU's `BLK_PERM_*` ([`Perm`]): consistent read 0, write 1, write unchanged 2,
//! resize 3. An opener first takes its own bytes, then checks with `F_OFD_GETLK` (asking as if
//! for a write lock, which any other lock on the byte blocks) that no other open description
//! locks the "not shared" byte of a permission it takes, nor the "holds" byte of a permission
//! it does not share. Two openers racing both see each other and both fail; neither can get in
//! unseen. The kernel ignores an open description's own locks in `F_OFD_GETLK`.
//!
//! vcdev locks the bytes a QEMU guest disk (`share-rw=off`) locks, plus resize for a writable
//! image (`vcdev ctl resize` may grow it):
//!
//! | open        | holds (bytes)                                 | does not share (bytes)   |
//! |-------------|-----------------------------------------------|--------------------------|
//! | writable    | 100 consistent read, 101 write, 103 resize    | 201 write, 203 resize    |
//! | `readonly`  | 100 consistent read                           | 201 write, 203 resize    |
//!
//! So a writable open is *exclusive*: any other opener that writes (it needs byte 201 free) or
//! that reads without sharing writes (it needs byte 101 free: `qemu-img convert`, a read-only QEMU
//! disk, a read-only vcdev device) is refused, and it is refused when anyone else writes or
//! refuses to share writes. `readonly=on` opens are *shared*: any number of them coexist (a
//! golden image), with each other and with QEMU's read-only users, but not with a writer.
//! Readers that force sharing (`qemu-img convert -U`) hold only byte 100, which nobody refuses to
//! share, and keep working, as they do against QEMU.
//!
//! The locks go with the open file description: [`ImageLock::release`] drops them at once (the
//! backend does so when it is dropped), and closing the last descriptor of the file would too.
#![allow(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `RAW_LOCK_PERM_BASE` of QEMU's `block/file-posix.c`: byte `100 + bit` is locked by an
/// opener that holds permission `bit`.
pub const PERM_BASE: u64 = 100;
/// `RAW_LOCK_SHARED_BASE`: byte `200 + bit` is locked by an opener that does not share
/// permission `bit`.
pub const SHARED_BASE: u64 = 200;

/// QEMU's block-layer permissions (`BLK_PERM_*`, `include/block/block-common.h`), by bit
/// number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    /// `BLK_PERM_CONSISTENT_READ` (bit 0): reads see consistent data.
    ConsistentRead = 0,
    /// `BLK_PERM_WRITE` (bit 1): writes that change the data.
    Write = 1,
    /// `BLK_PERM_WRITE_UNCHANGED` (bit 2): writes that leave the data as it was.
    WriteUnchanged = 2,
    /// `BLK_PERM_RESIZE` (bit 3): changes of the image's size.
    Resize = 3,
}

impl Perm {
    /// The name QEMU prints for it (`bdrv_perm_names`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }

    /// The byte locked by an opener that holds this permission.
    #[must_use]
    pub fn held_byte(self) -> u64 {
        PERM_BASE + self as u64
    }

    /// The byte locked by an opener that does not share this permission.
    #[must_use]
    pub fn unshared_byte(self) -> u64 {
        SHARED_BASE + self as u64
    }
}

/// The permissions an open holds, and those it does not share (see the module doc's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    /// Held: bytes `100 + bit`.
    pub held: &'static [Perm],
    /// Not shared: bytes `200 + bit`.
    pub unshared: &'static [Perm],
}

impl Perms {
    /// What a writable or a `readonly` open takes.
    #[must_use]
    pub fn for_open(read_only: bool) -> Perms {
        const UNSHARED: &[Perm] = &[Perm::Write, Perm::Resize];
        if read_only {
            Perms {
                held: &[Perm::ConsistentRead],
                unshared: UNSHARED,
            }
        } else {
            Perms {
                held: &[Perm::ConsistentRead, Perm::Write, Perm::Resize],
                unshared: UNSHARED,
            }
        }
    }

    fn bytes(self) -> impl Iterator<Item = u64> {
        self.held
            .iter()
            .map(|p| p.held_byte())
            .chain(self.unshared.iter().map(|p| p.unshared_byte()))
    }
}

/// Why another opener's lock conflicts with ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// Another opener holds this permission, which we do not share.
    Holds(Perm),
    /// Another opener does not share this permission, which we need.
    Unshares(Perm),
    /// Another opener holds a write lock on this byte (not QEMU's way: some other tool).
    WriteLocked(u64),
}

impl Conflict {
    /// The lock byte where it was found.
    #[must_use]
    pub fn byte(self) -> u64 {
        match self {
            Conflict::Holds(p) => p.held_byte(),
            Conflict::Unshares(p) => p.unshared_byte(),
            Conflict::WriteLocked(byte) => byte,
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::Holds(p) => write!(f, "it holds the \"{}\" permission", p.name()),
            Conflict::Unshares(p) => write!(f, "it does not share the \"{}\" permission", p.name()),
            Conflict::WriteLocked(byte) => write!(f, "it holds a write lock on byte {byte}"),
        }
    }
}

/// Who holds a conflicting lock, as `F_OFD_GETLK` tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// An OFD lock: the kernel does not name its owner (`l_pid` is -1). It may be QEMU, another
    /// vcdev, or another device of this very process (each device opens the image itself).
    OpenFileDescription,
    /// A classic POSIX record lock (QEMU without OFD locks, for one): the owner's process id.
    Process(i32),
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Holder::OpenFileDescription => f.write_str(
                "an OFD lock, whose owner the kernel does not name (l_pid -1): QEMU, another \
                 vcdev, or another device of this one",
            ),
            Holder::Process(pid) => write!(f, "a POSIX lock of process {pid}"),
        }
    }
}

/// What [`lock`] found.
#[derive(Debug)]
pub enum LockError {
    /// Another opener's lock conflicts.
    Conflict {
        /// How.
        conflict: Conflict,
        /// Who.
        holder: Holder,
    },
    /// `fcntl` failed otherwise.
    Io(io::Error),
}

/// The locks of one open image; [`ImageLock::release`] drops them.
#[derive(Debug)]
#[must_use = "dropping an ImageLock does not unlock: call release"]
pub struct ImageLock {
    perms: Perms,
}

impl ImageLock {
    /// The permissions locked.
    #[must_use]
    pub fn perms(&self) -> Perms {
        self.perms
    }

    /// Unlocks every byte this lock took on `file` (the file it was taken on).
    pub fn release(self, file: &File) {
        for byte in self.perms.bytes() {
            if let Err(e) = set(file, byte, LockType::Unlock) {
                log::warn!("cannot unlock byte {byte} of a disk image: {e}");
            }
        }
    }
}

/// Whether an `fcntl` error means the file system has no OFD locks (or the kernel is older
/// than 3.15): the image is then used without a lock, as QEMU's `locking=auto` does where
/// locks are not supported.
#[must_use]
pub fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// Takes the locks of a writable or `read_only` open on `file` and checks that nobody else's
/// conflict with them, as QEMU does (take, then check; see the module doc). On a conflict
/// nothing stays locked.
pub fn lock(file: &File, read_only: bool) -> Result<ImageLock, LockError> {
    let perms = Perms::for_open(read_only);
    let taken = ImageLock { perms };
    for byte in perms.bytes() {
        if let Err(e) = set(file, byte, LockType::Read) {
            taken.release(file);
            // A read lock only fails against a write lock (QEMU takes none): someone is in.
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                return Err(LockError::Io(e));
            }
            let holder = probe(file, byte)
                .ok()
                .flatten()
                .unwrap_or(Holder::OpenFileDescription);
            return Err(LockError::Conflict {
                conflict: Conflict::WriteLocked(byte),
                holder,
            });
        }
    }
    if let Err(e) = check(file, perms) {
        taken.release(file);
        return Err(e);
    }
    Ok(taken)
}

/// `F_OFD_GETLK` on the bytes that must be free of others' locks: the "not shared" byte of each
/// permission held, the "holds" byte of each one not shared.
fn check(file: &File, perms: Perms) -> Result<(), LockError> {
    let probes = perms
        .held
        .iter()
        .map(|&p| Conflict::Unshares(p))
        .chain(perms.unshared.iter().map(|&p| Conflict::Holds(p)));
    for conflict in probes {
        match probe(file, conflict.byte()) {
            Ok(None) => {}
            Ok(Some(holder)) => return Err(LockError::Conflict { conflict, holder }),
            Err(e) => return Err(LockError::Io(e)),
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum LockType {
    Read,
    Unlock,
}

fn flock(byte: u64, kind: libc::c_int) -> io::Result<libc::flock> {
    // SAFETY: `struct flock` is plain integers, for which all-zero bytes are a valid value
    // (and OFD locks require `l_pid` to be 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = i16::try_from(kind).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    fl.l_whence =
        i16::try_from(libc::SEEK_SET).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    fl.l_start =
        libc::off_t::try_from(byte).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    fl.l_len = 1;
    Ok(fl)
}

fn set(file: &File, byte: u64, kind: LockType) -> io::Result<()> {
    let mut fl = flock(
        byte,
        match kind {
            LockType::Read => libc::F_RDLCK,
            LockType::Unlock => libc::F_UNLCK,
        },
    )?;
    loop {
        // SAFETY: the descriptor is open for the call and `fl` is a valid `struct flock` that
        // lives across it; F_OFD_SETLK only reads it.
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether another open description locks `byte` (in any mode): who, if so.
fn probe(file: &File, byte: u64) -> io::Result<Option<Holder>> {
    let mut fl = flock(byte, libc::F_WRLCK)?;
    // SAFETY: the descriptor is open for the call and `fl` is a valid `struct flock` that lives
    // across it; F_OFD_GETLK writes the conflicting lock, if any, into it.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    if i32::from(fl.l_type) == libc::F_UNLCK {
        return Ok(None);
    }
    Ok(Some(if fl.l_pid > 0 {
        Holder::Process(fl.l_pid)
    } else {
        Holder::OpenFileDescription
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_qemus() {
        let rw = Perms::for_open(false);
        assert_eq!(rw.bytes().collect::<Vec<_>>(), [100, 101, 103, 201, 203]);
        let ro = Perms::for_open(true);
        assert_eq!(ro.bytes().collect::<Vec<_>>(), [100, 201, 203]);
        assert_eq!(
            Conflict::Holds(Perm::Write).to_string(),
            "it holds the \"write\" permission"
        );
    }
}
