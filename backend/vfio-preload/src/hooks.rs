//! The exported libc symbols. Each checks whether its descriptor is a
//! vcdev file ([`crate::table`]); if not, or if this thread is already
//! inside a hook (a hook's own logging, `/proc` reads and allocations go
//! straight to libc), it calls the real function.
//!
//! `ioctl` is variadic in C; its third argument is declared as a pointer,
//! which the x86_64 System V ABI passes exactly as the variadic call does
//! (first integer-class arguments in rdi, rsi, rdx).

use std::cell::Cell;
use std::sync::Arc;

use libc::{c_int, c_ulong, c_void, iovec, off_t, size_t, ssize_t};
use vcdev_iommu::Errno;

use crate::table::{self, Door};
use crate::{real, translate};

/// The library's constructor ([`table::load`]), run by the dynamic loader.
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

extern "C" fn constructor() {
    BUSY.with(|b| b.set(true));
    table::load();
    BUSY.with(|b| b.set(false));
}

thread_local! {
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as inside a hook while it lives.
struct Busy;

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.with(|b| b.set(false));
    }
}

/// The vcdev file behind `fd`, with the thread marked busy; `None` for
/// every other descriptor, or when already inside a hook.
fn ours(fd: c_int) -> Option<(Arc<Door>, Busy)> {
    if fd < 0 {
        return None;
    }
    if BUSY.with(|b| b.replace(true)) {
        return None;
    }
    let busy = Busy;
    table::get(fd).map(|d| (d, busy))
}

fn set_errno(e: Errno) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e.0 };
}

fn ret_int(r: Result<i32, Errno>) -> c_int {
    r.unwrap_or_else(|e| {
        set_errno(e);
        -1
    })
}

fn ret_size(r: Result<usize, Errno>) -> ssize_t {
    match r {
        Ok(n) => ssize_t::try_from(n).unwrap_or(ssize_t::MAX),
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

/// `ioctl`.
///
/// # Safety
///
/// libc's contract for `ioctl`.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int {
    match ours(fd) {
        // SAFETY: the caller passes the argument the request takes.
        Some((d, _b)) => ret_int(unsafe { translate::ioctl(&*d, req, arg.cast()) }),
        None => {
            if req == translate::KVM_SET_DEVICE_ATTR && kvm_vfio_ours(arg) {
                return 0;
            }
            // SAFETY: the caller's contract.
            unsafe { real::ioctl(fd, req, arg) }
        }
    }
}

/// A KVM-VFIO device attribute that adds or removes a vcdev file
/// ([`translate::kvm_vfio_file`]): answered 0 here.
fn kvm_vfio_ours(arg: *mut c_void) -> bool {
    if BUSY.with(Cell::get) {
        return false;
    }
    // SAFETY: KVM_SET_DEVICE_ATTR's argument is a struct kvm_device_attr.
    let Some(file) = (unsafe { translate::kvm_vfio_file(arg.cast()) }) else {
        return false;
    };
    let Some((d, _b)) = ours(file) else {
        return false;
    };
    log::debug!(
        "KVM_SET_DEVICE_ATTR KVM_DEV_VFIO_FILE of vcdev file fd {file} (first fd {}): 0, not for the kernel",
        d.first_fd
    );
    true
}

/// `pread64`.
///
/// # Safety
///
/// libc's contract for `pread`.
#[no_mangle]
pub unsafe extern "C" fn pread64(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t {
    match ours(fd) {
        // SAFETY: `buf` holds `n` bytes (the caller's contract).
        Some((d, _b)) => ret_size(unsafe { translate::pread(&*d, buf.cast(), n, off) }),
        // SAFETY: the caller's contract.
        None => unsafe { real::pread(fd, buf, n, off) },
    }
}

/// `pread` (the same function on 64-bit glibc).
///
/// # Safety
///
/// libc's contract for `pread`.
#[no_mangle]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t {
    // SAFETY: the caller's contract.
    unsafe { pread64(fd, buf, n, off) }
}

/// glibc's `__pread64_chk` (`pread` under `_FORTIFY_SOURCE`).
///
/// # Safety
///
/// libc's contract for `pread`.
#[no_mangle]
pub unsafe extern "C" fn __pread64_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    off: off_t,
    buflen: size_t,
) -> ssize_t {
    match ours(fd) {
        Some((d, _b)) => {
            if n > buflen {
                // What glibc's __chk_fail does: a buffer overflow is fatal.
                // SAFETY: abort never returns.
                unsafe { libc::abort() };
            }
            // SAFETY: `buf` holds `n` bytes (checked against `buflen`).
            ret_size(unsafe { translate::pread(&*d, buf.cast(), n, off) })
        }
        // SAFETY: the caller's contract.
        None => unsafe { real::pread_chk(fd, buf, n, off, buflen) },
    }
}

/// `pwrite64`.
///
/// # Safety
///
/// libc's contract for `pwrite`.
#[no_mangle]
pub unsafe extern "C" fn pwrite64(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t {
    match ours(fd) {
        // SAFETY: `buf` holds `n` bytes (the caller's contract).
        Some((d, _b)) => ret_size(unsafe { translate::pwrite(&*d, buf.cast(), n, off) }),
        // SAFETY: the caller's contract.
        None => unsafe { real::pwrite(fd, buf, n, off) },
    }
}

/// `pwrite`.
///
/// # Safety
///
/// libc's contract for `pwrite`.
#[no_mangle]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t {
    // SAFETY: the caller's contract.
    unsafe { pwrite64(fd, buf, n, off) }
}

/// Runs `f(base, len, offset)` over the iovecs in turn, stopping at a
/// short transfer; an error counts only before anything moved.
///
/// # Safety
///
/// `iov` must hold `cnt` valid iovecs.
unsafe fn each_iov(
    iov: *const iovec,
    cnt: c_int,
    off: off_t,
    mut f: impl FnMut(*mut u8, usize, off_t) -> Result<usize, Errno>,
) -> ssize_t {
    let Ok(cnt) = usize::try_from(cnt) else {
        set_errno(Errno::EINVAL);
        return -1;
    };
    // SAFETY: the caller's `cnt` iovecs.
    let iovs = unsafe { std::slice::from_raw_parts(iov, cnt) };
    let mut done = 0usize;
    for v in iovs {
        let at = off.saturating_add(off_t::try_from(done).unwrap_or(off_t::MAX));
        match f(v.iov_base.cast(), v.iov_len, at) {
            Ok(n) => {
                done += n;
                if n < v.iov_len {
                    break;
                }
            }
            Err(e) if done == 0 => {
                set_errno(e);
                return -1;
            }
            Err(_) => break,
        }
    }
    ssize_t::try_from(done).unwrap_or(ssize_t::MAX)
}

/// `preadv64`.
///
/// # Safety
///
/// libc's contract for `preadv`.
#[no_mangle]
pub unsafe extern "C" fn preadv64(fd: c_int, iov: *const iovec, cnt: c_int, off: off_t) -> ssize_t {
    match ours(fd) {
        // SAFETY: each iovec names a writable buffer of its length.
        Some((d, _b)) => unsafe {
            each_iov(iov, cnt, off, |p, n, at| translate::pread(&*d, p, n, at))
        },
        // SAFETY: the caller's contract.
        None => unsafe { real::preadv(fd, iov, cnt, off) },
    }
}

/// `preadv`.
///
/// # Safety
///
/// libc's contract for `preadv`.
#[no_mangle]
pub unsafe extern "C" fn preadv(fd: c_int, iov: *const iovec, cnt: c_int, off: off_t) -> ssize_t {
    // SAFETY: the caller's contract.
    unsafe { preadv64(fd, iov, cnt, off) }
}

/// `pwritev64`.
///
/// # Safety
///
/// libc's contract for `pwritev`.
#[no_mangle]
pub unsafe extern "C" fn pwritev64(
    fd: c_int,
    iov: *const iovec,
    cnt: c_int,
    off: off_t,
) -> ssize_t {
    match ours(fd) {
        // SAFETY: each iovec names a readable buffer of its length.
        Some((d, _b)) => unsafe {
            each_iov(iov, cnt, off, |p, n, at| translate::pwrite(&*d, p, n, at))
        },
        // SAFETY: the caller's contract.
        None => unsafe { real::pwritev(fd, iov, cnt, off) },
    }
}

/// `pwritev`.
///
/// # Safety
///
/// libc's contract for `pwritev`.
#[no_mangle]
pub unsafe extern "C" fn pwritev(fd: c_int, iov: *const iovec, cnt: c_int, off: off_t) -> ssize_t {
    // SAFETY: the caller's contract.
    unsafe { pwritev64(fd, iov, cnt, off) }
}

/// `mmap64`: a vcdev file has no mappable region (the door never sets
/// VFIO_REGION_INFO_FLAG_MMAP), and vfio-pci answers EINVAL for those.
///
/// # Safety
///
/// libc's contract for `mmap`.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    match ours(fd) {
        Some((d, _b)) => {
            log::debug!(
                "mmap of vcdev file fd {fd} (first fd {}) at {off:#x}+{len:#x}: EINVAL (not mappable)",
                d.first_fd
            );
            set_errno(Errno::EINVAL);
            libc::MAP_FAILED
        }
        // SAFETY: the caller's contract.
        None => unsafe { real::mmap(addr, len, prot, flags, fd, off) },
    }
}

/// `mmap`.
///
/// # Safety
///
/// libc's contract for `mmap`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: size_t,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: off_t,
) -> *mut c_void {
    // SAFETY: the caller's contract.
    unsafe { mmap64(addr, len, prot, flags, fd, off) }
}

/// `close`: forgets a vcdev descriptor, then closes it.
///
/// # Safety
///
/// libc's contract for `close`.
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if ours(fd).is_some() {
        table::forget(fd);
    }
    // SAFETY: the caller's contract.
    unsafe { real::close(fd) }
}

/// `dup`: a copy of a vcdev descriptor is one too.
///
/// # Safety
///
/// libc's contract for `dup`.
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    let door = ours(fd);
    // SAFETY: the caller's contract.
    let new = unsafe { real::dup(fd) };
    if let (Some((d, _b)), true) = (door, new >= 0) {
        table::alias(new, d);
    }
    new
}

/// `dup2`: `new` stops being what it was, and becomes a copy of `old`.
///
/// # Safety
///
/// libc's contract for `dup2`.
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    let door = ours(old);
    // SAFETY: the caller's contract.
    let r = unsafe { real::dup2(old, new) };
    relink(door, old, new, r)
}

/// `dup3`.
///
/// # Safety
///
/// libc's contract for `dup3`.
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let door = ours(old);
    // SAFETY: the caller's contract.
    let r = unsafe { real::dup3(old, new, flags) };
    relink(door, old, new, r)
}

fn relink(door: Option<(Arc<Door>, Busy)>, old: c_int, new: c_int, r: c_int) -> c_int {
    if r >= 0 && old != new {
        match door {
            Some((d, _b)) => table::alias(new, d),
            None => {
                if !BUSY.with(Cell::get) {
                    table::forget(new);
                }
            }
        }
    }
    r
}
