//! The backend's libc shims: each `unsafe` call into libc the daemon needs
//! outside the frame codec ([`crate::wire`]), behind a safe function.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

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

/// The real user id of the daemon.
pub fn uid() -> libc::uid_t {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// How many times the calling thread lost its CPU without blocking (its
/// involuntary context switches, `ru_nivcsw`); 0 if the kernel will not say.
pub fn involuntary_switches() -> u64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a writable rusage the kernel fills; RUSAGE_THREAD
    // concerns only the calling thread.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: zeroed, and filled by a successful getrusage.
    let ru = unsafe { ru.assume_init() };
    u64::try_from(ru.ru_nivcsw).unwrap_or(0)
}

/// The pid, uid and gid of the peer of a connected UNIX socket.
pub fn peer_cred(sock: &UnixStream) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a plain C
    // struct of that size, for a socket descriptor borrowed for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(cred)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts),
/// returning the set to wait on.
pub fn block_signals() -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    let r = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(set)
}

/// Waits for a signal of `set` (blocked by [`block_signals`]).
pub fn wait_signal(set: &libc::sigset_t) -> io::Result<libc::c_int> {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised sigset_t and `sig` a valid out pointer.
    let r = unsafe { libc::sigwait(set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}

/// Polls `fd` for `events`, at most `timeout`: the events that came, or
/// `None` when the time ran out (or poll failed).
fn poll_one(
    fd: BorrowedFd<'_>,
    events: libc::c_short,
    timeout: std::time::Duration,
) -> Option<libc::c_short> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: one pollfd, valid for the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return (n > 0).then_some(p.revents);
    }
}

/// True when the peer of a connected stream socket has closed or shut
/// down its end (POLLRDHUP or POLLHUP), waiting at most `timeout` for it.
pub fn peer_hung_up(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> bool {
    poll_one(fd, libc::POLLRDHUP, timeout)
        .is_some_and(|r| r & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Waits at most `timeout` for `fd` to be readable (or at its end);
/// false when the time ran out.
pub fn readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> bool {
    poll_one(fd, libc::POLLIN, timeout).is_some()
}

/// Adds 1 to an eventfd's counter with one write(2): unlike
/// `EventFd::write` (`write_all`), an EINTR is returned, not retried, so
/// that [`interrupt_thread`] can end a write that blocks.
pub fn write_eventfd(fd: &EventFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to a descriptor the
    // EventFd keeps open.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Signals a peer's eventfd without ever blocking: the kernel's
/// `eventfd_signal` never blocks, but a write(2) does when the counter is
/// full and the file is blocking, which its owner (another process, sharing
/// the open file description) decides. A counter too full to take one more
/// is signalled already, so nothing is lost by not writing.
pub fn signal_eventfd(fd: &EventFd) -> io::Result<()> {
    // SAFETY: the descriptor is `fd`'s, open for the borrow.
    let raw = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let full = poll_one(raw, libc::POLLOUT, std::time::Duration::ZERO)
        .is_none_or(|r| r & libc::POLLOUT == 0);
    if full {
        return Ok(());
    }
    match write_eventfd(fd) {
        // Filled (or made blocking and filled) since the look: as above.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// The signal of [`interrupt_thread`]: the first real-time signal the C
/// library leaves to applications.
fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_interrupt(_: libc::c_int) {}

/// Installs, once, the handler of [`interrupt_thread`]'s signal: it does
/// nothing, and without SA_RESTART a blocking system call of the thread
/// that takes it returns EINTR.
pub fn install_interrupt() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid initial value
        // (no flags, empty mask filled in below).
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `sa` is a valid sigaction whose handler is an
        // async-signal-safe function that does nothing; the signal is one
        // of the application's real-time signals.
        let r = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(interrupt_signal(), &sa, std::ptr::null_mut())
        };
        if r != 0 {
            log::error!(
                "cannot install the thread interrupt handler: {}",
                io::Error::last_os_error()
            );
        }
    });
}

/// Interrupts thread `t` of this process: a blocking system call it is in
/// returns EINTR ([`install_interrupt`] must have run). The caller makes
/// sure `t` is still running (not joined).
pub fn interrupt_thread(t: libc::pthread_t) {
    // SAFETY: the caller guarantees that `t` is a live thread of this
    // process; the signal's handler is installed and does nothing.
    let r = unsafe { libc::pthread_kill(t, interrupt_signal()) };
    if r != 0 {
        log::warn!(
            "cannot interrupt a thread: {}",
            io::Error::from_raw_os_error(r)
        );
    }
}

/// A signalfd for the signals of `set` (blocked by [`block_signals`]),
/// non-blocking and close-on-exec.
pub fn signal_fd(set: &libc::sigset_t) -> io::Result<OwnedFd> {
    // SAFETY: `set` is an initialised sigset_t; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads one signal from a signalfd: its number, or `None` when none is
/// pending.
pub fn read_signal(fd: BorrowedFd<'_>) -> Option<u32> {
    // SAFETY: signalfd_siginfo is plain data, all zeroes valid.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reads at most `size` bytes into `info`, which is that big.
    let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(info).cast(), size) };
    (usize::try_from(n).ok() == Some(size)).then_some(info.ssi_signo)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: an out pointer to an rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    r.rlim_cur = r.rlim_max;
    // SAFETY: a pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r.rlim_cur)
}

/// Gives `path` to group `gid` (its owner unchanged).
pub fn chown_group(path: &std::path::Path, gid: libc::gid_t) -> io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))
}

/// The gid of group `name` (or a number), from the group database.
pub fn group_id(name: &str) -> Option<libc::gid_t> {
    if let Ok(n) = name.parse() {
        return Some(n);
    }
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `group` is plain data; getgrnam_r fills it, with strings in `buf`.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, `buf.len()` is its size.
    let r =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::time::{Duration, Instant};

    /// A blocking eventfd whose counter cannot take one more.
    fn full_blocking_eventfd() -> EventFd {
        let fd = EventFd::new(0).unwrap();
        fd.write(u64::MAX - 1).unwrap();
        fd
    }

    /// `signal_eventfd` on a blocking, full eventfd returns at once and
    /// leaves the counter alone (it is signalled already); on an empty one
    /// it adds 1.
    #[test]
    fn signal_eventfd_never_blocks() {
        let fd = full_blocking_eventfd();
        signal_eventfd(&fd).unwrap();
        assert_eq!(fd.read().unwrap(), u64::MAX - 1);
        signal_eventfd(&fd).unwrap();
        assert_eq!(fd.read().unwrap(), 1);
    }

    /// A thread blocked in `write_eventfd` on a full blocking eventfd gets
    /// EINTR from `interrupt_thread`.
    #[test]
    fn interrupt_ends_a_blocked_eventfd_write() {
        install_interrupt();
        let fd = full_blocking_eventfd();
        let peer = fd.try_clone().unwrap();
        let t = std::thread::spawn(move || write_eventfd(&peer));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "the write blocks");
        let start = Instant::now();
        while !t.is_finished() && start.elapsed() < Duration::from_secs(5) {
            interrupt_thread(t.as_pthread_t());
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = t.join().unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::Interrupted);
        assert_eq!(fd.read().unwrap(), u64::MAX - 1);
    }
}
