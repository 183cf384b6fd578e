//! The vhost-user message stream into the real connection loop
//! (`Conn::serve`: the frame decoder, the request table, every handler,
//! the queues it starts and its teardown), in-process. The input is a
//! sequence of messages with descriptors synthesised for them (sealed
//! and unsealed memfds, eventfds, sockets), writes into the memfds sent
//! (rings, descriptors and buffers in guest memory) and kicks of the
//! eventfds sent; optionally after the valid setup prefix of the
//! proptests (`vcdev::testing::vhost_user::setup`). Input format:
//! `vcdev_fuzz::vu_step`.
//!
//! The frames are written first (until the socket would block), then the
//! connection is served on this thread to the end of the stream, so the
//! connection's own work is deterministic; its queue workers run on their
//! threads as in the daemon. Checks, beyond "never panics or hangs": the
//! connection ends, and the device is free again for the next frontend.
#![no_main]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vcdev::registry::Registry;
use vcdev::testing::vhost_user::{conn, conn_config, send, setup, Kept, Msg};
use vcdev_fuzz::{vu_step, Input, VuStep};

/// Steps per input.
const MAX_STEPS: usize = 64;
/// Descriptors per input (each message's are closed here once sent, but
/// the connection may keep them).
const MAX_FDS: usize = 48;

fn set_nonblocking(sock: &UnixStream, on: bool) {
    sock.set_nonblocking(on).expect("O_NONBLOCK");
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let r = Registry::default();
    let dev = r.add("fuzz".into(), vcdev_device_model::testing::blk());
    // IOTLB misses go unanswered (nobody reads a backend channel): keep
    // their wait short.
    let (c, sock) = conn(&dev, conn_config(Duration::from_millis(5))).expect("claim");
    let mut keep = Kept::default();
    let prefix = match inp.u8() % 3 {
        1 => setup(true),
        2 => setup(false),
        _ => Vec::new(),
    };
    // Written without blocking: the connection reads only once all is sent.
    set_nonblocking(&sock, true);
    let mut sent_fds = 0;
    let mut ok = prefix.iter().all(|m| send(&sock, m, &mut keep).is_ok());
    let mut steps = 0;
    while ok && !inp.is_empty() && steps < MAX_STEPS {
        steps += 1;
        match vu_step(&mut inp) {
            VuStep::Msg {
                code,
                flags,
                payload,
                mut fds,
            } => {
                fds.truncate(MAX_FDS.saturating_sub(sent_fds));
                sent_fds += fds.len();
                let m = Msg {
                    code,
                    flags,
                    payload,
                    fds,
                };
                // A full socket or a refused frame ends the stream here.
                ok = send(&sock, &m, &mut keep).is_ok();
            }
            VuStep::MemWrite {
                memfd,
                offset,
                data,
            } => {
                if let Some(f) = keep
                    .memfds
                    .get(usize::from(memfd) % keep.memfds.len().max(1))
                {
                    use std::os::unix::fs::FileExt;
                    let _ = f.write_at(&data, u64::from(offset));
                }
            }
            VuStep::Kick(i) => {
                let n = keep.eventfds.len().max(1);
                if let Some(e) = keep.eventfds.get(usize::from(i) % n) {
                    let _ = e.write(1);
                }
            }
        }
    }
    set_nonblocking(&sock, false);
    sock.shutdown(std::net::Shutdown::Write).expect("shutdown");
    // Replies are drained on a thread, so that the connection never waits
    // on a full socket.
    let mut reader = sock.try_clone().expect("clone");
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    c.serve();
    drop(sock);
    drain.join().expect("drain");
    // The device was released: the next frontend gets it.
    if let Err(e) = Registry::claim_vhost_user(&dev, "next", None) {
        panic!("device not released after the connection ended: {e}");
    }
});
