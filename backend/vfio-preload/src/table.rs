//! Which descriptors are vcdev files, and one lock per file so that a
//! request and its reply are never interleaved with another thread's
//! (the door answers in order; QEMU's vCPU and main threads may share a
//! descriptor).

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use log::{debug, warn};
use vcdev::cdev::client::{File, Reply};
use vcdev::qemu_exec::{ENV_FDS, ENV_LOG};
use vcdev_iommu::Errno;

/// One vcdev file (shared by its dup'ed descriptors).
#[derive(Debug)]
pub struct Door {
    /// The file, over a descriptor QEMU owns: never closed from here.
    file: ManuallyDrop<File>,
    /// Serialises request/reply pairs.
    lock: Mutex<()>,
    /// The descriptor number it was first known by, for logs.
    pub first_fd: RawFd,
}

impl Door {
    /// A file over descriptor `fd` (which stays the caller's).
    pub fn new(fd: RawFd) -> Door {
        // SAFETY: `fd` is an open descriptor; the `File` is never dropped
        // (ManuallyDrop), so it never closes what QEMU owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Door {
            file: ManuallyDrop::new(File::from_fd(owned)),
            lock: Mutex::new(()),
            first_fd: fd,
        }
    }

    /// Sends one request and waits for its reply.
    pub fn call(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> Result<Reply, Errno> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.file.call(code, payload, fds)
    }
}

struct Table {
    map: RwLock<HashMap<RawFd, Arc<Door>>>,
}

static TABLE: OnceLock<Table> = OnceLock::new();
/// Entries in the table (a fast "not ours" for every other descriptor).
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Parses `VCDEV_VFIO_FDS` (`N,M,...`).
pub fn parse_fds(s: &str) -> Vec<RawFd> {
    s.split(',')
        .filter_map(|w| w.trim().parse::<RawFd>().ok())
        .filter(|fd| *fd >= 0)
        .collect()
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat writes into a zeroed stat of the right type.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    }
}

fn table() -> &'static Table {
    TABLE.get_or_init(|| {
        let _ = env_logger::Builder::from_env(env_logger::Env::new().filter_or(ENV_LOG, "warn"))
            .format_timestamp_micros()
            .try_init();
        let mut map = HashMap::new();
        for fd in parse_fds(&std::env::var(ENV_FDS).unwrap_or_default()) {
            if is_socket(fd) {
                debug!("fd {fd}: a vcdev file");
                // QEMU inherited it; a program QEMU runs must not (it would
                // keep the device bound after QEMU is gone).
                // SAFETY: fcntl on an open descriptor; no memory involved.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                map.insert(fd, Arc::new(Door::new(fd)));
            } else {
                warn!("{ENV_FDS} names fd {fd}, which is not an open socket: ignored");
            }
        }
        COUNT.store(map.len(), Ordering::Release);
        Table {
            map: RwLock::new(map),
        }
    })
}

/// Runs when the library is loaded, before the program's `main` (one
/// thread): reads the table, and takes `VCDEV_VFIO_FDS` out of the
/// environment, so that a program QEMU runs, which inherits `LD_PRELOAD`,
/// does not take its own descriptors of those numbers for vcdev files.
pub fn load() {
    let _ = table();
    // No other thread exists yet to read the environment meanwhile.
    std::env::remove_var(ENV_FDS);
}

/// The vcdev file behind `fd`, if it is one.
pub fn get(fd: RawFd) -> Option<Arc<Door>> {
    if fd < 0 {
        return None;
    }
    let t = table();
    if COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    t.map
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&fd)
        .cloned()
}

/// `fd` is closed (or about to be reused): forgets it.
pub fn forget(fd: RawFd) {
    if fd < 0 || COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut m = table().map.write().unwrap_or_else(|p| p.into_inner());
    if m.remove(&fd).is_some() {
        debug!("fd {fd}: closed");
        COUNT.store(m.len(), Ordering::Release);
    }
}

/// `new` is a copy of the vcdev file `door`.
pub fn alias(new: RawFd, door: Arc<Door>) {
    let mut m = table().map.write().unwrap_or_else(|p| p.into_inner());
    debug!("fd {new}: a copy of vcdev file fd {}", door.first_fd);
    m.insert(new, door);
    COUNT.store(m.len(), Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_list() {
        assert_eq!(parse_fds("3,4"), vec![3, 4]);
        assert_eq!(parse_fds(" 7 , x, -1,9"), vec![7, 9]);
        assert!(parse_fds("").is_empty());
    }
}
