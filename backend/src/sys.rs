//! The backend's libc shims: each `unsafe` call into libc the daemon needs
//! outside the frame codec ([`crate::wire`]), behind a safe function.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

/// Makes `fd` non-blocking.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor number; F_GETFL takes no argument and
    // touches no memory (a closed number fails with EBADF).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; F_SETFL takes an int of status flags.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An [`EventFd`] over a descriptor received from a peer.
pub fn eventfd_from(fd: OwnedFd) -> EventFd {
    // SAFETY: `fd` is an open descriptor we own; EventFd takes over its
    // ownership and only reads or writes 8 bytes through it, whatever kind
    // of file it really is.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

/// The `(st_dev, st_ino)` of a descriptor.
pub fn inode_key(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: `stat` is plain data, for which all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor borrowed for the call, and an out pointer to a
    // `stat` of the right size.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}
