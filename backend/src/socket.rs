//! The daemon's listening sockets under `DIR` (the vhost-user sockets, the
//! cdev nodes, the control socket): one way to make their directories,
//! bind them and remove them.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

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
/// it `mode` if one is set.
pub fn listen(path: &Path, mode: Option<u32>) -> Result<UnixListener, SocketError> {
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
    let l = UnixListener::bind(path).map_err(bind_error)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(bind_error)?;
    }
    Ok(l)
}

/// Removes sockets (at exit, or after a failed setup).
pub fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}
