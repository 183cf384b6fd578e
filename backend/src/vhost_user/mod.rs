//! The vhost-user door: one listening socket per device (on the daemon's
//! event loop, [`crate::daemon`]), one thread per connection, one worker
//! thread per running queue.
//!
//! - [`accept`] takes a frontend the loop accepted on
//!   `DIR/vhost-user/NAME` and asks the registry for ownership. A frontend
//!   that arrives while another is really connected is refused and closed,
//!   the first undisturbed. One whose predecessor has hung up but is still
//!   being torn down waits for it on a thread of its own, then is served
//!   (see the registry's "Waiting for an owner that is leaving"). Each served frontend gets a
//!   [`conn::Conn`] on a new thread.
//! - When a frontend leaves, its connection stops the queues, removes its
//!   memory (after a grace period) and flushes the disk; the device then
//!   accepts the next frontend with its data intact.

pub mod backend_channel;
pub mod conn;
pub mod dispatch;
pub mod inflight;
pub mod iotlb;
pub mod main_poll;
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

/// The most frontends waiting at once for an owner that looks connected
/// ([`crate::registry::HANG_UP_GRACE`]); beyond it, a newcomer to a busy
/// device is refused at once. Frontends whose predecessor has hung up are
/// not counted: they are served once it is torn down.
const MAX_GRACE_WAITERS: usize = 8;

static GRACE_WAITERS: AtomicUsize = AtomicUsize::new(0);

/// The most frontends of one device waiting for its predecessor at once: a
/// frontend comes back alone; a flood of connect-and-close gets no more
/// threads than this.
const MAX_WAITERS_PER_DEVICE: usize = 2;

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
    let slot = match claim {
        Ok(own) => return spawn_conn(sock, own, peer, cfg),
        Err(e @ RegistryError::Busy { .. }) => {
            match WaitSlot::take(device, !device.owner_leaving()) {
                Some(slot) => slot,
                None => {
                    warn!("{peer}: frontend refused: {e} (and too many frontends wait)");
                    return;
                }
            }
        }
        Err(e) => {
            warn!("{peer}: frontend refused: {e}");
            return;
        }
    };
    let device = device.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("{}-wait", device.name()))
        .spawn(move || {
            let claim = device
                .claim_waiting(|| Registry::claim_vhost_user(&device, &peer, Some(holder.clone())));
            drop(slot);
            match claim {
                Ok(own) => {
                    info!("{peer}: frontend connected (after its predecessor's teardown)");
                    Conn::new(sock, own, peer, cfg).serve();
                }
                Err(e) => warn!("{peer}: frontend refused: {e}"),
            }
        });
    if let Err(e) = spawned {
        error!("cannot spawn a connection thread: {e}");
    }
}

/// A frontend's place among those waiting to claim a device, given back
/// when it drops: at most [`MAX_WAITERS_PER_DEVICE`] per device, and at
/// most [`MAX_GRACE_WAITERS`] in all waiting for an owner that looks
/// connected.
struct WaitSlot {
    device: Arc<Device>,
    grace: bool,
}

impl WaitSlot {
    fn take(device: &Arc<Device>, grace: bool) -> Option<WaitSlot> {
        if grace && GRACE_WAITERS.fetch_add(1, Ordering::SeqCst) >= MAX_GRACE_WAITERS {
            GRACE_WAITERS.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let slot = WaitSlot {
            device: device.clone(),
            grace,
        };
        if device.waiters().fetch_add(1, Ordering::SeqCst) >= MAX_WAITERS_PER_DEVICE {
            // Dropping the slot gives both counts back.
            return None;
        }
        Some(slot)
    }
}

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.device.waiters().fetch_sub(1, Ordering::SeqCst);
        if self.grace {
            GRACE_WAITERS.fetch_sub(1, Ordering::SeqCst);
        }
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
