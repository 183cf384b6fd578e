//! The libc functions this library stands in front of, found once with
//! `dlsym(RTLD_NEXT, name)`.

use std::sync::atomic::{AtomicUsize, Ordering};

use libc::{c_int, c_ulong, c_void, iovec, off_t, size_t, ssize_t};

/// Looks `name` (NUL-terminated) up past this object, caching the address
/// in `slot`; aborts if libc lacks it (nothing could run without it).
fn lookup(slot: &AtomicUsize, name: &'static [u8]) -> usize {
    let p = slot.load(Ordering::Acquire);
    if p != 0 {
        return p;
    }
    // SAFETY: `name` is a NUL-terminated string with static lifetime;
    // RTLD_NEXT searches the objects loaded after this one.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) } as usize;
    if p == 0 {
        let msg = b"libvcdev_vfio: dlsym(RTLD_NEXT) found no libc function\n";
        // SAFETY: writes a static buffer to fd 2, then aborts.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::abort();
        }
    }
    slot.store(p, Ordering::Release);
    p
}

macro_rules! real {
    ($(#[$m:meta])* $name:ident = $sym:literal: fn($($a:ident: $t:ty),*) -> $r:ty) => {
        $(#[$m])*
        ///
        /// # Safety
        ///
        /// The libc function's own contract.
        pub unsafe fn $name($($a: $t),*) -> $r {
            static SLOT: AtomicUsize = AtomicUsize::new(0);
            let p = lookup(&SLOT, concat!($sym, "\0").as_bytes());
            // SAFETY: `p` is libc's `$sym`, whose C signature is this one.
            let f: unsafe extern "C" fn($($t),*) -> $r = unsafe { std::mem::transmute(p) };
            // SAFETY: the caller keeps the function's contract.
            unsafe { f($($a),*) }
        }
    };
}

real!(
    /// libc's `ioctl` (its variadic third argument passed as a pointer).
    ioctl = "ioctl": fn(fd: c_int, req: c_ulong, arg: *mut c_void) -> c_int
);
real!(
    /// libc's `pread64`.
    pread = "pread64": fn(fd: c_int, buf: *mut c_void, n: size_t, off: off_t) -> ssize_t
);
real!(
    /// glibc's fortified `__pread64_chk`.
    pread_chk = "__pread64_chk":
        fn(fd: c_int, buf: *mut c_void, n: size_t, off: off_t, buflen: size_t) -> ssize_t
);
real!(
    /// libc's `pwrite64`.
    pwrite = "pwrite64": fn(fd: c_int, buf: *const c_void, n: size_t, off: off_t) -> ssize_t
);
real!(
    /// libc's `preadv64`.
    preadv = "preadv64": fn(fd: c_int, iov: *const iovec, cnt: c_int, off: off_t) -> ssize_t
);
real!(
    /// libc's `pwritev64`.
    pwritev = "pwritev64": fn(fd: c_int, iov: *const iovec, cnt: c_int, off: off_t) -> ssize_t
);
real!(
    /// libc's `mmap64`.
    mmap = "mmap64":
        fn(addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, fd: c_int, off: off_t)
            -> *mut c_void
);
real!(
    /// libc's `close`.
    close = "close": fn(fd: c_int) -> c_int
);
real!(
    /// libc's `dup`.
    dup = "dup": fn(fd: c_int) -> c_int
);
real!(
    /// libc's `dup2`.
    dup2 = "dup2": fn(old: c_int, new: c_int) -> c_int
);
real!(
    /// libc's `dup3`.
    dup3 = "dup3": fn(old: c_int, new: c_int, flags: c_int) -> c_int
);
