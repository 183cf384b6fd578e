//! The vhost-user door: one listening socket per device (on the daemon's
//! event loop, [`crate::daemon`]), one thread per connection, one worker
//! thread per running queue.
//!
//! - [`accept`] takes a frontend the loop accepted on
//!   `DIR/vhost-user/NAME` and asks the registry for ownership. A frontend
//!   that arrives while another is really connected is refused and closed,
//!   the first undisturbed. One whose predecessor has hung up but is still
//!   being torn down waits for it (at most [`PREDECESSOR_WAIT`]) on a
//!   thread of its own, then is served. Each served frontend gets a
//!   [`conn::Conn`] on a new thread.
//! - When a frontend leaves, its connection stops the queues, removes its
//!   memory (after a grace period) and flushes the disk; the device then
//!   accepts the next frontend with its data intact.

pub mod backend_channel;
pub mod conn;
pub mod dispatch;
pub mod inflight;
pub mod iotlb;
pub mod memory;
pub mod vring;

#[cfg(test)]
mod prop_tests;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};

use crate::registry::{Device, Holder, Registry, RegistryError};
use conn::{Conn, ConnConfig};

/// Names a peer for logs: its pid and uid when the kernel tells them.
fn peer_name(device: &str, n: u64, peer: Option<&crate::access::Peer>) -> String {
    match peer {
        Some(c) => format!("{device}#{n} (pid {} uid {})", c.pid, c.uid),
        None => format!("{device}#{n}"),
    }
}

/// The short form of peer name `peer` for the names of its threads
/// (`NAME#N-q0`, `NAME#N-bch`): a thread's name is cut at 15 bytes, so the
/// pid and uid are left out.
pub(crate) fn thread_tag(peer: &str) -> &str {
    peer.split(" (").next().unwrap_or(peer)
}

/// How long a frontend waits for its predecessor's teardown.
pub const PREDECESSOR_WAIT: Duration = Duration::from_secs(5);

/// How long a frontend that finds the owner connected waits for it to hang
/// up before it is refused: a client that closes and reconnects at once
/// may arrive before its old socket is released (another process may hold
/// a copy of it for a moment, between a fork and an exec).
pub const HANG_UP_GRACE: Duration = Duration::from_millis(50);

/// The most frontends waiting at once on [`HANG_UP_GRACE`]; beyond it a
/// newcomer to a busy device is refused at once.
const MAX_GRACE_WAITERS: usize = 8;

static GRACE_WAITERS: AtomicUsize = AtomicUsize::new(0);

/// A connection as the registry's [`Holder`]: hung up once the frontend
/// closed its end; revoked by shutting the socket down, which ends the
/// connection's read loop and runs its teardown (queues quiesced, memory
/// dropped, disk flushed).
#[derive(Debug)]
struct ConnHolder(UnixStream);

impl Holder for ConnHolder {
    fn hung_up(&self, wait: Duration) -> bool {
        crate::sys::peer_hung_up(self.0.as_fd(), wait)
    }

    fn revoke(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// The device's counters as one line of `key=value` words (logged at
/// disconnect and by `vcdev serve` at exit; the tests parse it).
pub fn counters_line(device: &Device) -> String {
    device
        .counters()
        .snapshot()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Takes frontend number `n`, accepted on `device`'s socket (with its
/// credentials, when known): claims the device and serves it on a thread
/// of its own; see the module doc for who waits and who is refused.
/// Never blocks.
pub fn accept(
    sock: UnixStream,
    device: &Arc<Device>,
    cfg: ConnConfig,
    n: u64,
    peer: Option<crate::access::Peer>,
) {
    let peer = peer_name(device.name(), n, peer.as_ref());
    let holder = match sock.try_clone() {
        Ok(s) => Arc::new(ConnHolder(s)),
        Err(e) => {
            error!("{peer}: frontend refused: cannot keep its socket: {e}");
            return;
        }
    };
    let claim = Registry::claim_vhost_user(device, &peer, Some(holder.clone()));
    let (waiting, grace) = match claim {
        Ok(own) => return spawn_conn(sock, own, peer, cfg),
        // The owner has hung up (or just left): wait for its teardown.
        Err(RegistryError::Busy { .. }) if device.owner_leaving() || device.owner().is_none() => {
            (holder, false)
        }
        // The owner looks connected: give it a moment to hang up.
        Err(RegistryError::Busy { .. })
            if GRACE_WAITERS.fetch_add(1, Ordering::SeqCst) < MAX_GRACE_WAITERS =>
        {
            (holder, true)
        }
        Err(e) => {
            if matches!(e, RegistryError::Busy { .. }) {
                GRACE_WAITERS.fetch_sub(1, Ordering::SeqCst);
            }
            warn!("{peer}: frontend refused: {e}");
            return;
        }
    };
    let device = device.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("{}-wait", device.name()))
        .spawn(move || {
            if grace {
                let hung_up = device.owner_hangs_up(HANG_UP_GRACE) || device.owner().is_none();
                GRACE_WAITERS.fetch_sub(1, Ordering::SeqCst);
                if !hung_up {
                    let owner = device.owner().unwrap_or_default();
                    warn!(
                        "{peer}: frontend refused: Device {} is busy: owned by {owner}",
                        device.name()
                    );
                    return;
                }
            }
            info!("{peer}: waiting for the previous frontend's teardown");
            device.wait_unowned(PREDECESSOR_WAIT);
            match Registry::claim_vhost_user(&device, &peer, Some(waiting)) {
                Ok(own) => {
                    info!("{peer}: frontend connected");
                    Conn::new(sock, own, peer, cfg).serve();
                }
                Err(e) => warn!("{peer}: frontend refused: {e}"),
            }
        });
    if let Err(e) = spawned {
        error!("cannot spawn a connection thread: {e}");
    }
}

fn spawn_conn(sock: UnixStream, own: crate::registry::Ownership, peer: String, cfg: ConnConfig) {
    info!("{peer}: frontend connected");
    let name = format!("{}-conn", own.device().name());
    let spawned = std::thread::Builder::new()
        .name(name)
        .spawn(move || Conn::new(sock, own, peer, cfg).serve());
    if let Err(e) = spawned {
        error!("cannot spawn a connection thread: {e}");
    }
}
