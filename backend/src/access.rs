//! Who may use the daemon's nodes (issue #10's access control).
//!
//! Every node (the vhost-user sockets, `DIR/iommu`, `DIR/devices/NAME`,
//! `DIR/vfio/*`) gets `--socket-mode` (default 0600) and, with
//! `--socket-group`, that group. The kernel checks those modes at
//! `connect`; with `--allow-uid`, the peer's credentials (SO_PEERCRED) are
//! checked at accept too, and only the listed uids, root and the daemon's
//! own uid are served. A refused vhost-user frontend is closed; a refused
//! cdev client gets `-EACCES` for VCDEV_OPEN and no descriptor. Each
//! refusal is logged with the peer's pid, uid and gid.
//!
//! The control socket (`DIR/control`, mode 0600) serves only root and the
//! daemon's own uid, whatever the options: it can add devices over any
//! file the daemon may open.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use log::warn;

use crate::socket::{self, SocketError};

/// The default mode of the nodes.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// The access rules of the nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// The nodes' file mode.
    pub mode: u32,
    /// The nodes' group, if set.
    pub group: Option<libc::gid_t>,
    /// With `--allow-uid`: the uids served (besides root and the daemon's).
    pub allow_uids: Option<Vec<libc::uid_t>>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            mode: DEFAULT_SOCKET_MODE,
            group: None,
            allow_uids: None,
        }
    }
}

/// A client the access rules refuse (already logged).
#[derive(Debug, thiserror::Error)]
#[error("refused by the access rules")]
pub struct Refused;

/// A peer as the kernel names it.
pub type Peer = libc::ucred;

/// Formats a peer for logs.
pub fn peer_text(p: &Peer) -> String {
    format!("pid {} uid {} gid {}", p.pid, p.uid, p.gid)
}

fn own_or_root(uid: libc::uid_t) -> bool {
    uid == 0 || uid == crate::sys::uid()
}

impl Access {
    /// Creates directory `path` (mode 0700) for nodes, and opens it to
    /// whoever the node mode lets in: search permission is added (never
    /// taken away) for the group or others when the mode gives them access.
    /// A directory of the daemon's own (`own`: `DIR/vhost-user`, ...) also
    /// gets the node group; `DIR` itself, which may be shared, does not.
    pub fn node_dir(&self, path: &Path, own: bool) -> Result<(), SocketError> {
        socket::create_dir(path)?;
        let err = |source| SocketError::Dir {
            path: path.to_owned(),
            source,
        };
        let mut add = 0;
        if self.mode & 0o070 != 0 {
            add |= 0o010;
        }
        if self.mode & 0o007 != 0 {
            add |= 0o001;
        }
        let cur = std::fs::metadata(path).map_err(err)?.permissions().mode() & 0o7777;
        if cur | add != cur {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(cur | add))
                .map_err(err)?;
        }
        if let Some(gid) = self.group.filter(|_| own) {
            crate::sys::chown_group(path, gid).map_err(err)?;
        }
        Ok(())
    }

    /// Binds node `path` with the mode and group of the rules.
    pub fn listen(&self, path: &Path) -> Result<UnixListener, SocketError> {
        socket::listen(path, Some(self.mode), self.group)
    }

    /// The peer of `sock` when the rules admit it to node `what`; `Err`
    /// (logged) when they do not, or when the kernel cannot say who it is.
    pub fn admit(&self, sock: &UnixStream, what: &str) -> Result<Option<Peer>, Refused> {
        let cred = crate::sys::peer_cred(sock);
        let Some(allow) = &self.allow_uids else {
            return Ok(cred.ok());
        };
        match cred {
            Ok(c) if own_or_root(c.uid) || allow.contains(&c.uid) => Ok(Some(c)),
            Ok(c) => {
                warn!(
                    "{what}: refused a client not in --allow-uid ({})",
                    peer_text(&c)
                );
                Err(Refused)
            }
            Err(e) => {
                warn!("{what}: refused a client whose credentials are unknown: {e}");
                Err(Refused)
            }
        }
    }
}

/// The control socket's rule: root and the daemon's own uid only.
pub fn admit_control(sock: &UnixStream) -> Result<Peer, Refused> {
    match crate::sys::peer_cred(sock) {
        Ok(c) if own_or_root(c.uid) => Ok(c),
        Ok(c) => {
            warn!(
                "control socket: refused a client that is neither root nor the daemon's user ({})",
                peer_text(&c)
            );
            Err(Refused)
        }
        Err(e) => {
            warn!("control socket: refused a client whose credentials are unknown: {e}");
            Err(Refused)
        }
    }
}
