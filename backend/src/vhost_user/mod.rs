//! The vhost-user door: one listening socket per device, one thread per
//! connection, one worker thread per running queue.
//!
//! - [`serve_device`] runs on its own thread: it accepts frontends on
//!   `DIR/vhost-user/NAME`, asks the registry for ownership (a second
//!   concurrent frontend is refused and closed, the first undisturbed) and
//!   hands each accepted frontend to a [`conn::Conn`] on a new thread.
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

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::{error, info, warn};

use crate::registry::{Device, Registry};
use conn::{Conn, ConnConfig};

/// Names a peer for logs: its pid and uid when the kernel tells them.
fn peer_name(device: &str, n: u64, sock: &UnixStream) -> String {
    match crate::sys::peer_cred(sock) {
        Ok(cred) => format!("{device}#{n} (pid {} uid {})", cred.pid, cred.uid),
        Err(_) => format!("{device}#{n}"),
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

/// Accepts frontends for `device` on `listener` forever.
pub fn serve_device(listener: UnixListener, device: Arc<Device>, cfg: ConnConfig) {
    let seq = AtomicU64::new(0);
    loop {
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                error!("{}: accept failed: {e}", device.name());
                if e.raw_os_error() == Some(libc::EINTR)
                    || e.raw_os_error() == Some(libc::ECONNABORTED)
                {
                    continue;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let n = seq.fetch_add(1, Ordering::Relaxed);
        let peer = peer_name(device.name(), n, &sock);
        let own = match Registry::claim_vhost_user(&device, &peer) {
            Ok(o) => o,
            Err(e) => {
                warn!("{peer}: frontend refused: {e}");
                drop(sock);
                continue;
            }
        };
        info!("{peer}: frontend connected");
        let spawned = std::thread::Builder::new()
            .name(format!("{}-conn", device.name()))
            .spawn(move || Conn::new(sock, own, peer, cfg).serve());
        if let Err(e) = spawned {
            error!("{}: cannot spawn a connection thread: {e}", device.name());
        }
    }
}
