//! The backend channel (SET_BACKEND_REQ_FD): IOTLB misses go out on it,
//! the frontend's acks come back on it; so does CONFIG_CHANGE_MSG after a
//! resize (when CONFIG is negotiated).
//!
//! CONFIG_CHANGE_MSG goes without NEED_REPLY, as libvhost-user's
//! `vu_config_change_msg` sends it for qemu-storage-daemon's resize: the
//! vhost-user spec asks for an ack only when the flag is set, so no reply
//! comes and the in-order matching of miss acks below is undisturbed.
//! QEMU answers it with a GET_CONFIG on the main channel (while the device
//! is started) and a config interrupt to the guest.
//!
//! Replies on this channel carry no request id, so misses are matched to
//! acks in order: a sender appends its miss to `outstanding` and writes it
//! while holding the channel lock (one sender at a time), and one reader
//! per channel pops the oldest miss for each ack. That reader starts with
//! the first miss that waits for an ack, on the daemon's event loop (an
//! [`AckReader`] subscriber: it reads what is there, never waits), so a
//! channel costs no thread (issue #11: a connected frontend costs its
//! queue workers and one connection thread); without a loop (unit tests)
//! it is a thread of its own. Nobody ever waits
//! on this channel while holding a lock: queue workers wait for the miss's
//! state on their own epoll (see [`super::iotlb`]), and QEMU never reads
//! this channel while it waits on the main one, so nothing here may block
//! the connection thread.

use std::collections::VecDeque;
use std::io::Read;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps};

use log::{debug, warn};
use vhost::vhost_user::message::BackendReq;

use super::iotlb::{IotlbMsg, Miss, IOTLB_MSG_LEN};
use crate::daemon::{LoopHandle, Subscriber};
use crate::registry::DeviceCounters;
use crate::wire::{self, FlagPolicy, FrameHeader, FLAG_NEED_REPLY};
use vcdev_iommu::sync::lock;

/// Errors of sending on the backend channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The frontend gave no backend channel (or it broke).
    #[error("No backend channel")]
    NoChannel,
    /// Writing the miss failed.
    #[error("Sending an IOTLB miss failed")]
    Send(#[source] wire::WireError),
    /// The frontend did not negotiate VHOST_USER_PROTOCOL_F_CONFIG.
    #[error("The frontend did not negotiate the CONFIG protocol feature")]
    NoConfig,
    /// Writing CONFIG_CHANGE_MSG failed.
    #[error("Sending CONFIG_CHANGE_MSG failed")]
    SendConfigChange(#[source] wire::WireError),
    /// The ack reader could not be started.
    #[error("Cannot start the backend channel's ack reader")]
    Reader(#[source] std::io::Error),
}

type Outstanding = Arc<Mutex<VecDeque<Arc<Miss>>>>;

struct Open {
    sock: UnixStream,
    /// Whether the frontend acks (REPLY_ACK negotiated): only then are
    /// misses sent with NEED_REPLY and queued for their ack.
    acks: bool,
    /// Whether CONFIG is negotiated: only then may CONFIG_CHANGE_MSG go.
    config: bool,
    outstanding: Outstanding,
    /// The reading end, cloned for the reader.
    rsock: UnixStream,
    /// The ack reader thread, once a miss waits for an ack (no loop).
    reader: Option<JoinHandle<()>>,
    /// The ack reader on the loop, once a miss waits for an ack.
    on_loop: Option<Arc<OnceLock<SubscriberId>>>,
    /// The reader's name in logs.
    name: String,
    /// Its thread name.
    thread: String,
}

impl Open {
    /// Starts the ack reader unless it runs already: on the loop when
    /// there is one, else on a thread.
    fn start_reader(&mut self, event_loop: Option<&LoopHandle>) -> Result<(), ChannelError> {
        if self.reader.is_some() || self.on_loop.is_some() {
            return Ok(());
        }
        let rsock = self.rsock.try_clone().map_err(ChannelError::Reader)?;
        if let Some(LoopHandle(endpoint)) = event_loop {
            rsock.set_nonblocking(true).map_err(ChannelError::Reader)?;
            let id = Arc::new(OnceLock::new());
            let reader = AckReader {
                sock: rsock,
                outstanding: self.outstanding.clone(),
                name: self.name.clone(),
                buf: Vec::new(),
            };
            let set = id.clone();
            endpoint
                .fire(
                    move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
                        let _ = set.set(ops.add_subscriber(Box::new(reader)));
                    },
                )
                .map_err(|e| ChannelError::Reader(std::io::Error::other(e)))?;
            self.on_loop = Some(id);
            return Ok(());
        }
        let out = self.outstanding.clone();
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name(self.thread.clone())
            .spawn(move || read_acks(&rsock, &out, &name));
        match spawned {
            Ok(r) => {
                self.reader = Some(r);
                Ok(())
            }
            Err(e) => Err(ChannelError::Reader(e)),
        }
    }
}

/// The backend channel of one connection.
#[derive(Default)]
pub struct BackendChannel {
    open: Mutex<Option<Open>>,
    event_loop: Option<LoopHandle>,
}

impl std::fmt::Debug for BackendChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendChannel")
            .field("open", &lock(&self.open).is_some())
            .finish()
    }
}

fn fail_all(outstanding: &Outstanding) {
    for m in lock(outstanding).drain(..) {
        m.unsent();
    }
}

impl BackendChannel {
    /// A channel whose ack reader runs on `event_loop` (None: on a thread).
    pub fn new(event_loop: Option<LoopHandle>) -> BackendChannel {
        BackendChannel {
            open: Mutex::new(None),
            event_loop,
        }
    }

    /// Installs the channel (replacing and closing any previous one); its
    /// ack reader starts with the first miss sent. `acks` says whether
    /// REPLY_ACK is negotiated, `config` whether CONFIG is.
    pub fn set(
        &self,
        sock: UnixStream,
        acks: bool,
        config: bool,
        peer: &str,
    ) -> std::io::Result<()> {
        self.close();
        // A frontend that stops reading its backend channel gets its misses
        // failed after this long, instead of stalling the queue for ever.
        sock.set_write_timeout(Some(wire::WRITE_TIMEOUT))?;
        let rsock = sock.try_clone()?;
        *lock(&self.open) = Some(Open {
            sock,
            acks,
            config,
            outstanding: Outstanding::default(),
            rsock,
            reader: None,
            on_loop: None,
            name: format!("{peer}-backend-channel"),
            thread: format!("{}-bch", super::thread_tag(peer)),
        });
        Ok(())
    }

    /// Whether a channel is installed.
    pub fn is_open(&self) -> bool {
        lock(&self.open).is_some()
    }

    /// Sends `miss`; its ack (if the frontend acks) completes it later.
    pub fn send_miss(
        &self,
        miss: &Arc<Miss>,
        counters: &DeviceCounters,
    ) -> Result<(), ChannelError> {
        let mut g = lock(&self.open);
        let open = g.as_mut().ok_or(ChannelError::NoChannel)?;
        if open.acks {
            open.start_reader(self.event_loop.as_ref())?;
        }
        let msg = IotlbMsg::miss(miss.iova, miss.access).encode();
        let flags = if open.acks { FLAG_NEED_REPLY } else { 0 };
        let hdr = FrameHeader::request(
            u32::from(BackendReq::IOTLB_MSG),
            flags,
            IOTLB_MSG_LEN as u32,
        );
        // Queue it first: the ack may be read before write_frame returns.
        if open.acks {
            lock(&open.outstanding).push_back(miss.clone());
        }
        if let Err(e) = wire::write_frame(&open.sock, &hdr, &msg, &[]) {
            if open.acks {
                lock(&open.outstanding).retain(|m| !Arc::ptr_eq(m, miss));
            }
            return Err(ChannelError::Send(e));
        }
        DeviceCounters::add(&counters.iotlb_misses, 1);
        debug!("IOTLB miss sent: iova {:#x} {:?}", miss.iova, miss.access);
        Ok(())
    }

    /// Sends CONFIG_CHANGE_MSG (no payload, no NEED_REPLY: see the module
    /// doc): the device's config space changed.
    pub fn send_config_change(&self) -> Result<(), ChannelError> {
        let g = lock(&self.open);
        let open = g.as_ref().ok_or(ChannelError::NoChannel)?;
        if !open.config {
            return Err(ChannelError::NoConfig);
        }
        let hdr = FrameHeader::request(u32::from(BackendReq::CONFIG_CHANGE_MSG), 0, 0);
        wire::write_frame(&open.sock, &hdr, &[], &[]).map_err(ChannelError::SendConfigChange)?;
        debug!("CONFIG_CHANGE_MSG sent");
        Ok(())
    }

    /// Closes the channel: its reader ends, misses waiting for an ack are
    /// failed.
    pub fn close(&self) {
        let open = lock(&self.open).take();
        if let Some(mut o) = open {
            let _ = o.sock.shutdown(Shutdown::Both);
            if let Some(r) = o.reader.take() {
                let _ = r.join();
            }
            if let (Some(id), Some(LoopHandle(endpoint))) = (o.on_loop.take(), &self.event_loop) {
                let _ = endpoint.fire(
                    move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
                        if let Some(id) = id.get() {
                            let _ = ops.remove_subscriber(*id);
                        }
                    },
                );
            }
            fail_all(&o.outstanding);
        }
    }
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        self.close();
    }
}

/// One ack, as bytes: a 12-byte reply header and its u64.
const ACK_LEN: usize = wire::HEADER_LEN + 8;

/// Takes one ack's frame: the miss it answers is the oldest outstanding.
/// `Err` for anything but an 8-byte IOTLB_MSG reply (a protocol violation
/// that ends the channel).
fn take_ack(
    h: &FrameHeader,
    payload: &[u8],
    outstanding: &Outstanding,
    name: &str,
) -> Result<(), ()> {
    if !h.is_reply() || h.request != u32::from(BackendReq::IOTLB_MSG) || payload.len() != 8 {
        warn!(
            "{name}: unexpected message {} ({} bytes) on the backend channel; closing it",
            h.request, h.size
        );
        return Err(());
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(payload);
    let ok = u64::from_le_bytes(v) == 0;
    let Some(m) = lock(outstanding).pop_front() else {
        warn!("{name}: an ack for no miss; ignored");
        return Ok(());
    };
    debug!(
        "{name}: miss {:#x} acked ({})",
        m.iova,
        if ok { "ok" } else { "failed" }
    );
    m.acked(ok);
    Ok(())
}

/// The ack reader on the event loop: reads what the socket has (never
/// waits), takes every whole ack, keeps a partial one for the next read.
struct AckReader {
    sock: UnixStream,
    outstanding: Outstanding,
    name: String,
    buf: Vec<u8>,
}

impl AckReader {
    /// Reads and takes acks; false once the channel is over.
    fn read(&mut self) -> bool {
        let mut chunk = [0u8; 32 * ACK_LEN];
        loop {
            match (&self.sock).read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("{}: {e}", self.name);
                    return false;
                }
            }
            while let Some(hdr) = self.buf.first_chunk::<{ wire::HEADER_LEN }>() {
                let h = FrameHeader::decode(hdr);
                if h.size != 8 {
                    let _ = take_ack(&h, &[], &self.outstanding, &self.name);
                    return false;
                }
                let Some(frame) = self.buf.get(..ACK_LEN) else {
                    break;
                };
                if take_ack(
                    &h,
                    &frame[wire::HEADER_LEN..],
                    &self.outstanding,
                    &self.name,
                )
                .is_err()
                {
                    return false;
                }
                self.buf.drain(..ACK_LEN);
            }
        }
    }
}

impl MutEventSubscriber for AckReader {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.sock, EventSet::IN)) {
            warn!("{}: cannot watch the backend channel: {e}", self.name);
        }
    }

    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        if !self.read() {
            let _ = ops.remove(Events::new(&self.sock, EventSet::IN));
            fail_all(&self.outstanding);
            // Stop the peer too: later misses then fail at once.
            let _ = self.sock.shutdown(Shutdown::Both);
        }
    }
}

/// The reader thread: one ack per outstanding miss, in order. Anything but
/// an 8-byte IOTLB_MSG reply is a protocol violation that ends the channel.
fn read_acks(sock: &UnixStream, outstanding: &Outstanding, name: &str) {
    loop {
        let frame = match wire::read_frame(sock, FlagPolicy::VHOST_USER) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                debug!("{name}: {e}");
                break;
            }
        };
        if !frame.fds.is_empty()
            || take_ack(&frame.header, &frame.payload, outstanding, name).is_err()
        {
            break;
        }
    }
    fail_all(outstanding);
    // Stop the peer too: later misses then fail at once.
    let _ = sock.shutdown(Shutdown::Both);
}
