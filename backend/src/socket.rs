//! The daemon's listening sockets under `DIR` (the vhost-user sockets, the
//! cdev nodes, the control socket): one way to make their directories,
//! bind them and remove them.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of setting a socket up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A socket's directory could not be created.
    #[error("Cannot create directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A live daemon already serves the socket.
    #[error("Socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// The socket could not be bound (or given its mode).
    #[error("Cannot listen on {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Creates `path` and its parents, mode 0700.
pub fn create_dir(path: &Path) -> Result<(), SocketError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| SocketError::Dir {
            path: path.to_owned(),
            source,
        })
}

/// Binds `path`, replacing a stale socket but never a live one, and gives
/// it `mode` and group `gid` if they are set.
///
/// The socket is bound, listening and given its mode and group under a
/// temporary name in the same directory, then renamed to `path`: std's
/// `bind` listens only after it binds, so a client that polls for `path`
/// (as `vcdev ctl` scripts and QEMU's `reconnect-ms` do) could otherwise
/// find it and be refused with ECONNREFUSED, or meet the wrong mode.
pub fn listen(
    path: &Path,
    mode: Option<u32>,
    gid: Option<libc::gid_t>,
) -> Result<UnixListener, SocketError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_error = |source| SocketError::Bind {
        path: path.to_owned(),
        source,
    };
    let tmp = binding_name(path);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(bind_error)?;
    let placed = (|| {
        if let Some(mode) = mode {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        }
        if let Some(gid) = gid {
            crate::sys::chown_group(&tmp, gid)?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(bind_error(e));
    }
    Ok(l)
}

/// The temporary name `path` is bound under: `.PID-N` in its directory,
/// short so that it fits `sun_path` wherever `path` does.
fn binding_name(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{}-{n}", std::process::id()))
}

/// Removes sockets (at exit, or after a failed setup).
pub fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn a_socket_appears_listening_with_its_mode_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("vcdev-socket-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        create_dir(&dir).unwrap();
        let path = dir.join("s");
        let l = listen(&path, Some(0o600), None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(entries.len(), 1, "no temporary name is left behind");
        UnixStream::connect(&path).expect("connects");
        // A live socket is not replaced; a stale one is.
        assert!(matches!(
            listen(&path, None, None),
            Err(SocketError::InUse(_))
        ));
        drop(l);
        listen(&path, None, None).expect("a stale socket is replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
