//! I/O engines: how one queue's requests reach the backing file.
//!
//! A queue owns one [`Engine`]. A request becomes one [`IoOp`] (a whole read or write is one
//! operation over all its data segments), submitted with a tag; completions come back with their
//! tag, in any order. Two engines, and a mix of them:
//!
//! - [`Aio::Sync`] runs each operation at once with positioned I/O on the submitting thread, and
//!   its completion is ready immediately;
//! - [`Aio::IoUring`] puts each operation in one SQE of a per-queue io_uring (`readv`/`writev`
//!   over all segments, `fsync` with `DATASYNC`, `fallocate`), up to the ring size in flight.
//!   The ring is created at the first submission, so an idle queue costs none; the kernel's
//!   worker pool of each ring is capped at [`IOWQ_MAX_WORKERS`] bounded and as many unbounded
//!   workers (`IORING_REGISTER_IOWQ_MAX_WORKERS`), and an eventfd registered with the ring says
//!   when completions are ready;
//! - [`Aio::Mixed`], for a file in memory, is the io_uring engine running reads and writes
//!   under [`INLINE_BELOW`] as the sync engine does, and sending larger ones to the ring's
//!   workers at once (`IOSQE_ASYNC`).
//!
//! RAM disks have no file descriptor and keep their `memcpy` path through the sync engine.
//!
//! # Memory lifetime
//!
//! An operation carries raw pointers into guest memory ([`IoVec`]); the kernel reads or writes
//! them after [`Engine::submit`] returns. Submitting is therefore `unsafe`: the caller promises
//! that the memory stays mapped until the operation's completion has been reaped. The virtio-blk
//! queue keeps that promise by holding the request's translations (see
//! [`super::InflightMemory`]) until it completes.
#![allow(unsafe_code)]

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use io_uring::{opcode, types, IoUring};
use log::{info, warn};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::backend::BlockBackend;

/// Bounded (and, separately, unbounded) io_uring worker threads per ring.
pub const IOWQ_MAX_WORKERS: u32 = 2;

/// The `aio=` device option.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AioMode {
    /// io_uring when it can be set up, else sync.
    #[default]
    Auto,
    /// io_uring, or fail.
    IoUring,
    /// Blocking positioned I/O, one request at a time.
    Sync,
}

impl FromStr for AioMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "auto" => Ok(Self::Auto),
            "io_uring" => Ok(Self::IoUring),
            "sync" => Ok(Self::Sync),
            _ => Err(()),
        }
    }
}

impl fmt::Display for AioMode {
    /// The `aio=` value, as [`AioMode::from_str`] reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::IoUring => "io_uring",
            Self::Sync => "sync",
        })
    }
}

/// The engine a device's queues use, once [`AioMode`] is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aio {
    /// [`SyncEngine`].
    Sync,
    /// [`UringEngine`].
    IoUring,
    /// [`UringEngine`] for a file in memory (`aio=auto` on tmpfs): a read or write under
    /// [`INLINE_BELOW`] runs on the queue's thread as the sync engine runs it (a 4 KiB copy
    /// costs less than a ring's system calls), a larger one goes straight to io_uring's
    /// workers (`IOSQE_ASYNC`), which copy in parallel with the queue's thread and with each
    /// other.
    Mixed,
}

impl fmt::Display for Aio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Aio::Sync => "sync",
            Aio::IoUring => "io_uring",
            Aio::Mixed => "mixed",
        })
    }
}

/// Under [`Aio::Mixed`], reads and writes of fewer bytes run inline. Measured on tmpfs
/// (BENCHMARKS.md, "Large requests"): 4 KiB requests as fast as on the sync engine, 128 KiB
/// sequential reads at QD8 1.03-1.11x qemu-storage-daemon where the sync engine reached
/// 0.82-0.89x.
pub const INLINE_BELOW: usize = 64 << 10;

/// Errors of setting up an engine.
#[derive(Debug, thiserror::Error)]
pub enum AioError {
    /// `aio=io_uring` was asked for and io_uring cannot be set up here.
    #[error("aio=io_uring: io_uring cannot be set up")]
    Unavailable(#[source] io::Error),
}

/// Whether a test asked, through the environment variable `VCDEV_INJECT_IO_URING_FAILURE=1`
/// (read once), that every io_uring setup fail as if the kernel refused it.
fn setup_failure_injected() -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    *FROM_ENV
        .get_or_init(|| std::env::var_os("VCDEV_INJECT_IO_URING_FAILURE").is_some_and(|v| v == "1"))
}

fn new_ring(entries: u32) -> io::Result<IoUring> {
    if setup_failure_injected() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring setup failure injected",
        ));
    }
    let ring = IoUring::builder().build(entries)?;
    let mut max = [IOWQ_MAX_WORKERS, IOWQ_MAX_WORKERS];
    ring.submitter().register_iowq_max_workers(&mut max)?;
    Ok(ring)
}

/// Resolve `mode` for a device: `auto` takes io_uring when a ring can be set up, else sync,
/// and logs its choice once for the device named `name`; `io_uring` fails with the reason.
pub fn resolve(mode: AioMode, name: &str) -> Result<Aio, AioError> {
    resolve_with(mode, name, false, || new_ring(1).map(drop))
}

/// Resolve `mode` for a device over `file`: as [`resolve`], except that `auto` takes
/// [`Aio::Mixed`] for a file in memory (tmpfs, ramfs), where io_uring's requests are copies
/// that only add system calls when small, and only gain when large and run by its workers
/// (measured: BENCHMARKS.md, storage engine), or sync where io_uring cannot be set up.
pub fn resolve_for_file(
    mode: AioMode,
    name: &str,
    file: &super::FileBackend,
) -> Result<Aio, AioError> {
    resolve_with(mode, name, file.in_memory(), || new_ring(1).map(drop))
}

/// [`resolve`] with `probe` standing for setting up a ring; `auto` takes [`Aio::Mixed`] rather
/// than io_uring for a file `in_memory`.
fn resolve_with(
    mode: AioMode,
    name: &str,
    in_memory: bool,
    probe: impl FnOnce() -> io::Result<()>,
) -> Result<Aio, AioError> {
    match mode {
        AioMode::Sync => Ok(Aio::Sync),
        AioMode::IoUring => probe()
            .map(|()| Aio::IoUring)
            .map_err(AioError::Unavailable),
        AioMode::Auto => match probe() {
            Ok(()) if in_memory => {
                info!(
                    "{name}: aio=auto chose mixed: the file is in memory (tmpfs); reads and \
                     writes under {} KiB run on the queue's thread, larger ones in io_uring's \
                     workers",
                    INLINE_BELOW >> 10
                );
                Ok(Aio::Mixed)
            }
            Ok(()) => {
                info!("{name}: aio=auto chose io_uring");
                Ok(Aio::IoUring)
            }
            Err(e) => {
                warn!("{name}: aio=auto chose sync: io_uring cannot be set up: {e}");
                Ok(Aio::Sync)
            }
        },
    }
}

/// One guest buffer, by address, for an operation in flight.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct IoVec(libc::iovec);

// SAFETY: an IoVec is an address and a length; whoever dereferences it (the kernel, or the sync
// engine on the queue's thread) does so under the contract of `Engine::submit`.
unsafe impl Send for IoVec {}

impl IoVec {
    /// The memory of `slice`. Its address stays meaningful only while the memory stays mapped.
    #[must_use]
    pub fn of<B: BitmapSlice>(slice: &VolatileSlice<'_, B>) -> Self {
        Self(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        })
    }

    /// A buffer at `ptr` of `len` bytes.
    #[must_use]
    pub fn from_raw(ptr: *mut u8, len: usize) -> Self {
        Self(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        })
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.iov_len
    }

    /// Whether the buffer is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.iov_len == 0
    }

    /// The buffer's address.
    #[must_use]
    pub fn ptr(&self) -> *mut u8 {
        self.0.iov_base.cast()
    }

    /// Store `byte` in the buffer's first byte (a status byte).
    ///
    /// # Safety
    ///
    /// The buffer's memory must be mapped and writable.
    pub unsafe fn write_byte(&self, byte: u8) {
        if !self.is_empty() {
            // SAFETY: the caller guarantees the first byte is mapped and writable.
            unsafe { self.ptr().write_volatile(byte) }
        }
    }

    /// The buffer as a volatile slice.
    ///
    /// # Safety
    ///
    /// The memory must be mapped for the life of the returned slice.
    unsafe fn as_slice<'a>(&self) -> VolatileSlice<'a> {
        // SAFETY: the caller guarantees the buffer is mapped for 'a.
        unsafe { VolatileSlice::new(self.ptr(), self.len()) }
    }
}

/// What one request does to the backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// Fill the buffers from the disk at `offset`.
    Read {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// Write the buffers to the disk at `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
    },
    /// `fdatasync`.
    Flush,
    /// Punch a hole.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Make a range read as zeros.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Whether the range may be deallocated.
        unmap: bool,
    },
}

/// A completed operation: its tag and its result (bytes moved, or the error).
pub type Completion = (u64, io::Result<u64>);

/// A per-queue engine.
#[derive(Debug)]
pub enum Engine {
    /// See [`SyncEngine`].
    Sync(SyncEngine),
    /// See [`UringEngine`].
    IoUring(Box<UringEngine>),
}

impl Engine {
    /// An engine of kind `aio` for one queue of at most `depth` requests over `backend`.
    /// Backings without a file (RAM) always get the sync engine.
    #[must_use]
    pub fn new(aio: Aio, backend: Arc<dyn BlockBackend>, depth: u16) -> Self {
        match (aio, backend.raw_fd()) {
            (Aio::IoUring | Aio::Mixed, Some(fd)) => Self::IoUring(Box::new(UringEngine::new(
                backend,
                fd,
                depth,
                aio == Aio::Mixed,
            ))),
            _ => Self::Sync(SyncEngine::new(backend)),
        }
    }

    /// Which engine this is.
    #[must_use]
    pub fn kind(&self) -> Aio {
        match self {
            Self::Sync(_) => Aio::Sync,
            Self::IoUring(e) if e.mixed => Aio::Mixed,
            Self::IoUring(_) => Aio::IoUring,
        }
    }

    /// Submit `op` over `iov`, tagged `tag`. `Err(op)` hands the operation back when the
    /// engine has no room now: submit it again after reaping completions.
    ///
    /// # Safety
    ///
    /// The memory of every buffer in `iov` must stay mapped, and must not be handed to another
    /// operation for writing, until the completion for `tag` has been returned by
    /// [`Engine::reap`]; `iov` itself is copied or kept by the engine.
    pub unsafe fn submit(&mut self, tag: u64, op: IoOp, iov: &[IoVec]) -> Result<(), IoOp> {
        match self {
            // SAFETY: same contract.
            Self::Sync(e) => unsafe { e.submit(tag, op, iov) },
            // SAFETY: same contract.
            Self::IoUring(e) => unsafe { e.submit(tag, op, iov) },
        }
    }

    /// Set the engine up now rather than at its first submission (a transport
    /// that must register the completion descriptor before any I/O).
    pub fn start(&mut self) -> io::Result<()> {
        match self {
            Self::Sync(_) => Ok(()),
            Self::IoUring(e) => e.ring().map(drop),
        }
    }

    /// Hand the submitted operations to the kernel.
    pub fn commit(&mut self) -> io::Result<()> {
        match self {
            Self::Sync(_) => Ok(()),
            Self::IoUring(e) => e.commit(),
        }
    }

    /// Append the completions ready now to `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        match self {
            Self::Sync(e) => out.append(&mut e.done),
            Self::IoUring(e) => e.reap(out),
        }
    }

    /// Wait until at least one completion is ready (none if nothing is in flight).
    pub fn wait(&mut self) -> io::Result<()> {
        match self {
            Self::Sync(_) => Ok(()),
            Self::IoUring(e) => e.wait(),
        }
    }

    /// Operations submitted and not yet reaped.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        match self {
            Self::Sync(e) => e.done.len(),
            Self::IoUring(e) => e.in_flight.saturating_add(e.fallback.len()),
        }
    }

    /// A descriptor that becomes readable when completions are ready (io_uring only; the sync
    /// engine's completions are ready when `submit` returns). Read it (an eventfd) to rearm.
    #[must_use]
    pub fn notifier(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Self::Sync(_) => None,
            Self::IoUring(e) => e.ring.as_ref().map(|r| r.event.as_fd_borrowed()),
        }
    }
}

/// Runs each operation at once on the calling thread.
#[derive(Debug)]
pub struct SyncEngine {
    backend: Arc<dyn BlockBackend>,
    done: Vec<Completion>,
}

impl SyncEngine {
    fn new(backend: Arc<dyn BlockBackend>) -> Self {
        Self {
            backend,
            done: Vec::new(),
        }
    }

    /// # Safety
    ///
    /// As [`Engine::submit`] (the buffers are used before this returns).
    unsafe fn submit(&mut self, tag: u64, op: IoOp, iov: &[IoVec]) -> Result<(), IoOp> {
        // SAFETY: the caller keeps the buffers mapped at least until this returns.
        let r = unsafe { run_sync(self.backend.as_ref(), op, iov) };
        self.done.push((tag, r));
        Ok(())
    }
}

/// # Safety
///
/// Every buffer of `iov` is mapped for the duration of the call.
unsafe fn run_sync(backend: &dyn BlockBackend, op: IoOp, iov: &[IoVec]) -> io::Result<u64> {
    let total = || iov.iter().map(|v| v.len() as u64).sum::<u64>();
    match op {
        IoOp::Read { mut offset } | IoOp::Write { mut offset } => {
            let reading = matches!(op, IoOp::Read { .. });
            for v in iov {
                // SAFETY: the caller keeps the buffer mapped for this call.
                let slice = unsafe { v.as_slice() };
                if reading {
                    backend.read_at(offset, &slice)?;
                } else {
                    backend.write_at(offset, &slice)?;
                }
                offset = offset.saturating_add(v.len() as u64);
            }
            Ok(total())
        }
        IoOp::Flush => backend.flush().map(|()| 0),
        IoOp::Discard { offset, len } => backend.discard(offset, len).map(|()| 0),
        IoOp::WriteZeroes { offset, len, unmap } => {
            backend.write_zeroes(offset, len, unmap).map(|()| 0)
        }
    }
}

/// An eventfd, owned.
#[derive(Debug)]
struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes two scalars and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Self(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.0)
    }

    fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into `v`, a valid u64; the descriptor is ours and non-blocking.
        let _ = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                std::ptr::addr_of_mut!(v).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// A ring and its completion eventfd.
struct Ring {
    uring: IoUring,
    event: EventFd,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

/// One io_uring per queue.
#[derive(Debug)]
pub struct UringEngine {
    backend: Arc<dyn BlockBackend>,
    fd: RawFd,
    depth: u32,
    ring: Option<Ring>,
    /// Per tag in flight: its iovec array, kept until the completion (the kernel may read it
    /// after submission on old kernels).
    iovecs: std::collections::HashMap<u64, Vec<IoVec>>,
    spare: Vec<Vec<IoVec>>,
    in_flight: usize,
    /// Operations run synchronously: small ones under [`Aio::Mixed`], discards and
    /// write-zeroes, and those the ring could not be set up for (a ring that failed to be
    /// created after `resolve` said it could).
    fallback: Vec<Completion>,
    /// [`Aio::Mixed`].
    mixed: bool,
}

impl UringEngine {
    fn new(backend: Arc<dyn BlockBackend>, fd: RawFd, depth: u16, mixed: bool) -> Self {
        Self {
            backend,
            fd,
            depth: u32::from(depth.max(1)),
            ring: None,
            iovecs: std::collections::HashMap::new(),
            spare: Vec::new(),
            in_flight: 0,
            fallback: Vec::new(),
            mixed,
        }
    }

    fn ring(&mut self) -> io::Result<&mut Ring> {
        if self.ring.is_none() {
            let uring = new_ring(self.depth.next_power_of_two())?;
            let event = EventFd::new()?;
            uring.submitter().register_eventfd(event.0.as_raw_fd())?;
            self.ring = Some(Ring { uring, event });
        }
        self.ring
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::Other))
    }

    /// # Safety
    ///
    /// As [`Engine::submit`].
    unsafe fn submit(&mut self, tag: u64, op: IoOp, iov: &[IoVec]) -> Result<(), IoOp> {
        if self.in_flight >= self.depth as usize {
            return Err(op);
        }
        let data = matches!(op, IoOp::Read { .. } | IoOp::Write { .. });
        if self.mixed && data && iov.iter().map(IoVec::len).sum::<usize>() < INLINE_BELOW {
            // SAFETY: as this function's contract.
            unsafe { self.run_inline(tag, op, iov) };
            return Ok(());
        }
        let mut vecs = self.spare.pop().unwrap_or_default();
        vecs.clear();
        vecs.extend_from_slice(iov);
        let fd = types::Fd(self.fd);
        let count = u32::try_from(vecs.len()).unwrap_or(u32::MAX);
        let entry = match op {
            IoOp::Read { offset } => opcode::Readv::new(fd, vecs.as_ptr().cast(), count)
                .offset(offset)
                .build(),
            IoOp::Write { offset } => opcode::Writev::new(fd, vecs.as_ptr().cast(), count)
                .offset(offset)
                .build(),
            IoOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            // Discards and write-zeroes keep the backend's fallbacks (unsupported hole
            // punching, zeroing by hand) on the sync path: they are rare, and fallocate in
            // io_uring is punted to a worker anyway.
            IoOp::Discard { .. } | IoOp::WriteZeroes { .. } => {
                // SAFETY: as this function's contract.
                unsafe { self.run_inline(tag, op, &vecs) };
                self.spare.push(vecs);
                return Ok(());
            }
        }
        .user_data(tag);
        // A file in memory: the copy is the whole of the work, so let a worker do it now
        // rather than the submitting thread, inline, in `io_uring_enter`.
        let entry = if self.mixed && data {
            entry.flags(io_uring::squeue::Flags::ASYNC)
        } else {
            entry
        };
        let ring = match self.ring() {
            Ok(r) => r,
            Err(e) => {
                warn!("io_uring setup failed, running the request synchronously: {e}");
                // SAFETY: as this function's contract.
                unsafe { self.run_inline(tag, op, &vecs) };
                self.spare.push(vecs);
                return Ok(());
            }
        };
        // SAFETY: the SQE points at `vecs`, kept in `self.iovecs` until its completion is
        // reaped, and at guest buffers the caller keeps mapped until then.
        let pushed = unsafe { ring.uring.submission().push(&entry) };
        if pushed.is_err() {
            // The SQ is full of unsubmitted entries: submit them and try once more.
            let _ = ring.uring.submit();
            // SAFETY: as above.
            if unsafe { ring.uring.submission().push(&entry) }.is_err() {
                self.spare.push(vecs);
                return Err(op);
            }
        }
        self.iovecs.insert(tag, vecs);
        self.in_flight += 1;
        Ok(())
    }

    /// Runs `op` now on this thread; its completion waits in `fallback` for the next reap.
    ///
    /// # Safety
    ///
    /// The buffers of `iov` must be mapped for the call.
    unsafe fn run_inline(&mut self, tag: u64, op: IoOp, iov: &[IoVec]) {
        // SAFETY: the caller keeps the buffers mapped for this call.
        let r = unsafe { run_sync(self.backend.as_ref(), op, iov) };
        self.fallback.push((tag, r));
    }

    fn commit(&mut self) -> io::Result<()> {
        let Some(r) = self.ring.as_mut() else {
            return Ok(());
        };
        // Nothing queued: no `io_uring_enter` (after a reap that let no request through,
        // one in twelve of a queue worker's system calls on the loop disk at QD32). No
        // enter is owed to the CQ either: it cannot overflow, holding at most a CQE per
        // request in flight, which the ring's entries bound at half its size.
        if r.uring.submission().is_empty() {
            return Ok(());
        }
        loop {
            match r.uring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY / EAGAIN: the CQ is full; completions must be reaped first, and
                // the SQEs stay queued for the next commit.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.fallback);
        let Some(r) = self.ring.as_mut() else {
            return;
        };
        r.event.drain();
        for cqe in r.uring.completion() {
            let tag = cqe.user_data();
            let res = cqe.result();
            let result = u64::try_from(res).map_err(|_| io::Error::from_raw_os_error(-res));
            if let Some(v) = self.iovecs.remove(&tag) {
                self.spare.push(v);
            }
            self.in_flight = self.in_flight.saturating_sub(1);
            out.push((tag, result));
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.in_flight == 0 || !self.fallback.is_empty() {
            return Ok(());
        }
        match self.ring.as_mut() {
            Some(r) => loop {
                match r.uring.submit_and_wait(1) {
                    Ok(_) => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
            },
            None => Ok(()),
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Never unmap memory the kernel still writes: wait for what is in flight.
        while self.in_flight > 0 {
            if self.wait().is_err() {
                break;
            }
            let mut sink = Vec::new();
            self.reap(&mut sink);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::{FileBackend, RamBackend};

    fn temp_file(len: u64) -> (std::path::PathBuf, Arc<dyn BlockBackend>) {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "vcdev-aio-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        let b = FileBackend::open(&path, false).unwrap();
        (path, Arc::new(b))
    }

    fn run(engine: &mut Engine, tag: u64, op: IoOp, bufs: &mut [Vec<u8>]) -> io::Result<u64> {
        let iov: Vec<IoVec> = bufs
            .iter_mut()
            .map(|b| IoVec::from_raw(b.as_mut_ptr(), b.len()))
            .collect();
        // SAFETY: `bufs` outlives the wait for this operation's completion below.
        unsafe { engine.submit(tag, op, &iov) }.unwrap();
        engine.commit().unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            engine.wait().unwrap();
            engine.reap(&mut out);
        }
        let (t, r) = out.pop().unwrap();
        assert_eq!(t, tag);
        r
    }

    /// Mixed: a small read or write completes inside `submit` without a ring (none is even set
    /// up), a large one goes to io_uring; the bytes are the same either way.
    #[test]
    fn mixed_runs_small_requests_inline_and_large_ones_in_the_ring() {
        let (path, file) = temp_file(1 << 20);
        let mut e = Engine::new(Aio::Mixed, file.clone(), 8);
        assert_eq!(e.kind(), Aio::Mixed);
        let small: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let iov = [IoVec::from_raw(small.as_ptr().cast_mut(), small.len())];
        // SAFETY: `small` outlives the completion, reaped below.
        unsafe { e.submit(1, IoOp::Write { offset: 0 }, &iov) }.unwrap();
        let mut out = Vec::new();
        e.reap(&mut out);
        assert_eq!(out.len(), 1, "the small write completed in submit");
        assert_eq!(out[0].1.as_ref().ok(), Some(&4096));
        assert!(e.notifier().is_none(), "no ring for small requests");
        let mut big = vec![vec![0u8; INLINE_BELOW]];
        assert_eq!(
            run(&mut e, 2, IoOp::Read { offset: 0 }, &mut big).unwrap(),
            INLINE_BELOW as u64
        );
        assert!(e.notifier().is_some(), "the large read went to the ring");
        assert_eq!(&big[0][..4096], &small[..]);
        assert!(big[0][4096..].iter().all(|&b| b == 0));
        std::fs::remove_file(path).unwrap();
    }

    /// Every operation gives the same bytes on both engines and on RAM.
    #[test]
    fn engines_agree_byte_for_byte() {
        let (path, file) = temp_file(1 << 20);
        let ram: Arc<dyn BlockBackend> = Arc::new(RamBackend::new(1 << 20).unwrap());
        let mut engines = [
            Engine::new(Aio::IoUring, file.clone(), 8),
            Engine::new(Aio::Sync, ram.clone(), 8),
        ];
        assert_eq!(engines[0].kind(), Aio::IoUring);
        assert_eq!(engines[1].kind(), Aio::Sync);
        for e in &mut engines {
            let mut w = vec![vec![0xa5u8; 4096], vec![0x5au8; 512]];
            assert_eq!(
                run(e, 1, IoOp::Write { offset: 8192 }, &mut w).unwrap(),
                4608
            );
            assert_eq!(run(e, 2, IoOp::Flush, &mut []).unwrap(), 0);
            let mut z = Vec::new();
            run(
                e,
                3,
                IoOp::WriteZeroes {
                    offset: 8192 + 512,
                    len: 512,
                    unmap: false,
                },
                &mut z,
            )
            .unwrap();
            run(
                e,
                4,
                IoOp::Discard {
                    offset: 65536,
                    len: 4096,
                },
                &mut z,
            )
            .unwrap();
            let mut r = vec![vec![0u8; 1024], vec![0u8; 4096]];
            assert_eq!(
                run(e, 5, IoOp::Read { offset: 8192 }, &mut r).unwrap(),
                5120
            );
            assert!(r[0][..512].iter().all(|&b| b == 0xa5));
            assert!(r[0][512..].iter().all(|&b| b == 0));
            assert!(r[1][..3072].iter().all(|&b| b == 0xa5));
            assert!(r[1][3072..3584].iter().all(|&b| b == 0x5a));
        }
        std::fs::remove_file(path).unwrap();
    }

    /// Many reads in flight at once on one ring, completed in whatever order the kernel likes,
    /// each with its own tag and data.
    #[test]
    fn many_in_flight_on_one_ring() {
        let (path, file) = temp_file(1 << 20);
        let mut e = Engine::new(Aio::IoUring, file, 32);
        for i in 0..32u8 {
            let mut w = vec![vec![i; 4096]];
            run(
                &mut e,
                100,
                IoOp::Write {
                    offset: u64::from(i) * 4096,
                },
                &mut w,
            )
            .unwrap();
        }
        let mut bufs: Vec<Vec<u8>> = (0..32).map(|_| vec![0xffu8; 4096]).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            let iov = [IoVec::from_raw(b.as_mut_ptr(), b.len())];
            let offset = i as u64 * 4096;
            // SAFETY: `bufs` is not touched until every completion is reaped below.
            unsafe { e.submit(i as u64, IoOp::Read { offset }, &iov) }.unwrap();
        }
        // The ring is full: one more is handed back.
        let mut extra = [0u8; 512];
        let iov = [IoVec::from_raw(extra.as_mut_ptr(), extra.len())];
        // SAFETY: refused, so never used.
        assert!(unsafe { e.submit(99, IoOp::Read { offset: 0 }, &iov) }.is_err());
        assert_eq!(e.in_flight(), 32);
        e.commit().unwrap();
        let mut done = Vec::new();
        while done.len() < 32 {
            e.wait().unwrap();
            e.reap(&mut done);
        }
        assert_eq!(e.in_flight(), 0);
        let mut tags: Vec<u64> = done.iter().map(|(t, _)| *t).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..32).collect::<Vec<_>>());
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| usize::from(x) == i), "buffer {i}");
        }
        std::fs::remove_file(path).unwrap();
    }

    /// An idle engine has no ring; the first submission creates it.
    #[test]
    fn idle_queue_creates_no_ring() {
        let (path, file) = temp_file(1 << 16);
        let mut e = Engine::new(Aio::IoUring, file, 4);
        assert!(e.notifier().is_none());
        let mut r = vec![vec![0u8; 512]];
        run(&mut e, 1, IoOp::Read { offset: 0 }, &mut r).unwrap();
        assert!(e.notifier().is_some());
        std::fs::remove_file(path).unwrap();
    }

    /// Errors come back as the kernel's errno: a read past the end of a file is short, not an
    /// error, and is reported as the bytes moved.
    #[test]
    fn errors_and_short_reads() {
        let (path, file) = temp_file(4096);
        let mut e = Engine::new(Aio::IoUring, file, 4);
        let mut r = vec![vec![0u8; 8192]];
        assert_eq!(
            run(&mut e, 1, IoOp::Read { offset: 0 }, &mut r).unwrap(),
            4096
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn modes_parse_and_resolve() {
        assert_eq!("auto".parse(), Ok(AioMode::Auto));
        assert_eq!("io_uring".parse(), Ok(AioMode::IoUring));
        assert_eq!("sync".parse(), Ok(AioMode::Sync));
        assert!("uring".parse::<AioMode>().is_err());
        assert_eq!(resolve(AioMode::Sync, "t").unwrap(), Aio::Sync);
        assert_eq!(resolve(AioMode::IoUring, "t").unwrap(), Aio::IoUring);
        assert_eq!(resolve(AioMode::Auto, "t").unwrap(), Aio::IoUring);
    }

    /// A setup failure (injected) falls back to sync under auto and is an error under io_uring.
    #[test]
    fn setup_failure_falls_back_under_auto_only() {
        let refused = || Err(io::Error::from_raw_os_error(libc::EPERM));
        for in_memory in [false, true] {
            assert_eq!(
                resolve_with(AioMode::Auto, "t", in_memory, refused).unwrap(),
                Aio::Sync
            );
        }
        let e = resolve_with(AioMode::IoUring, "t", false, refused).unwrap_err();
        assert!(matches!(e, AioError::Unavailable(ref s) if s.raw_os_error() == Some(libc::EPERM)));
        assert_eq!(
            resolve_with(AioMode::Sync, "t", false, refused).unwrap(),
            Aio::Sync
        );
    }
}
