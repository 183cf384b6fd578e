//! The files of the cdev door, the part the kernel's VFS plays: a
//! [`FileKind`] (its request table, gate and release, the kernel's
//! `file_operations`), handing a file out ([`Files::hand_out`]: its
//! socketpair, the thread serving it, its release on the last close), and
//! recognising a file passed back ([`Files::lookup`], see the module doc of
//! [`crate::cdev`]). It knows no file kind by name: a lookup asks for the
//! kind it wants, and any other file is EBADFD.

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use event_manager::{
    EventOps, EventSet, Events, MutEventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps,
};

use log::{debug, warn};
use vcdev_iommu::sync::lock;
use vcdev_iommu::Errno;

use super::dispatch::{dispatch, reply_payload, Op, Out, Violation};
use crate::daemon::Subscriber;
use crate::wire::{self, FlagPolicy, FrameReader, MAX_PAYLOAD};

/// A kind of file: its request table, its gate and its release.
pub trait FileKind: Send + Sync + Sized + 'static {
    /// Its requests.
    fn ops(&self) -> &'static [Op<Self>];
    /// An errno for `code` before anything else (a device file before
    /// BIND), or `None`.
    fn gate(&self, _code: u32) -> Option<Errno> {
        None
    }
    /// The kernel's release: the last copy of the file was closed.
    fn release(&self);
    /// Names the file in logs.
    fn describe(&self) -> String;
    /// The file was handed out; `ours` is the server's end.
    fn opened(&self, _ours: &UnixStream) {}
}

/// A handed-out file, of whichever kind.
type AnyFile = Weak<dyn Any + Send + Sync>;

/// The handed-out files, by the `(st_dev, st_ino)` of the client's end.
#[derive(Default)]
pub struct Files {
    table: Mutex<HashMap<(u64, u64), AnyFile>>,
    seq: AtomicU64,
    event_loop: OnceLock<RemoteEndpoint<Subscriber>>,
}

impl std::fmt::Debug for Files {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files")
            .field("open", &lock(&self.table).len())
            .field("on_event_loop", &self.event_loop.get().is_some())
            .finish()
    }
}

impl Files {
    /// An empty table.
    pub fn new() -> Arc<Files> {
        Arc::new(Files::default())
    }

    /// A sequence number for naming files in logs.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Recognises a descriptor handed out as a file of kind `F`
    /// (PROTOCOL.md, "Opening a node gives a file"): EBADFD for any other
    /// descriptor, a file of another kind, or one already released.
    pub fn lookup<F: FileKind>(&self, fd: &OwnedFd) -> Result<Arc<F>, Errno> {
        let key = crate::sys::inode_key(fd.as_fd()).map_err(|_| Errno::EBADFD)?;
        let file = lock(&self.table).get(&key).and_then(Weak::upgrade);
        file.and_then(|f| f.downcast::<F>().ok())
            .ok_or(Errno::EBADFD)
    }

    /// Hands `file` out: makes its socketpair, records the client's end,
    /// and serves ours (see [`Files::set_event_loop`]). Returns the
    /// client's end.
    pub fn hand_out<F: FileKind>(self: &Arc<Self>, file: Arc<F>) -> io::Result<OwnedFd> {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_write_timeout(Some(crate::wire::WRITE_TIMEOUT))?;
        let key = crate::sys::inode_key(theirs.as_fd())?;
        let any: Arc<dyn Any + Send + Sync> = file.clone();
        lock(&self.table).insert(key, Arc::downgrade(&any));
        file.opened(&ours);
        let open = Arc::new(OpenFile {
            sock: ours,
            file,
            key,
            files: self.clone(),
            id: OnceLock::new(),
        });
        let started = match self.event_loop.get() {
            Some(endpoint) => {
                let sub = FileSub(open.clone());
                endpoint
                    .fire(
                        move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
                            let id = ops.add_subscriber(Box::new(sub));
                            let _ = open.id.set(id);
                        },
                    )
                    .map_err(io::Error::other)
            }
            None => open.spawn(None),
        };
        if let Err(e) = started {
            lock(&self.table).remove(&key);
            return Err(e);
        }
        Ok(theirs.into())
    }

    /// Serves the files handed out from now on through the daemon's event
    /// loop: an idle file waits there and costs no thread; when a request
    /// arrives, a thread of the file's own serves it and the ones that
    /// follow, and gives the file back to the loop after [`FILE_LINGER`]
    /// without one. Without a loop (unit tests), each file has its thread
    /// for its whole life.
    pub fn set_event_loop(&self, endpoint: RemoteEndpoint<Subscriber>) {
        let _ = self.event_loop.set(endpoint);
    }
}

/// How long a file's thread waits for its next request before it gives the
/// file back to the event loop.
pub const FILE_LINGER: Duration = Duration::from_secs(1);

/// A handed-out file, ours end and all.
struct OpenFile<F: FileKind> {
    sock: UnixStream,
    file: Arc<F>,
    key: (u64, u64),
    files: Arc<Files>,
    /// Its subscriber on the loop, once added.
    id: OnceLock<SubscriberId>,
}

impl<F: FileKind> OpenFile<F> {
    /// Serves the file on a thread of its own, until it is idle for
    /// `linger` (`None`: until it is closed).
    fn spawn(self: &Arc<Self>, linger: Option<Duration>) -> io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name(self.file.describe().chars().take(15).collect())
            .spawn(move || {
                if serve_file(&me.sock, me.file.as_ref(), linger) == Served::Idle {
                    me.back_to_the_loop();
                } else {
                    me.release();
                }
            })
            .map(drop)
    }

    /// Watches the file on the loop again.
    fn back_to_the_loop(self: Arc<Self>) {
        let Some(endpoint) = self.files.event_loop.get() else {
            return;
        };
        let me = self.clone();
        let r = endpoint.fire(
            move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
                let watched = me
                    .id
                    .get()
                    .ok_or(event_manager::Error::InvalidId)
                    .and_then(|id| ops.event_ops(*id))
                    .and_then(|mut e| e.add(Events::new(&me.sock, EventSet::IN)));
                if let Err(e) = watched {
                    warn!("{}: cannot watch it again: {e}; closed", me.file.describe());
                    me.release_on(ops);
                }
            },
        );
        if let Err(e) = r {
            warn!("{}: event loop gone: {e}", self.file.describe());
            self.release();
        }
    }

    /// The last client copy closed (or the client broke the protocol): the
    /// file's release runs, and it leaves the loop.
    fn release(self: Arc<Self>) {
        if let (Some(endpoint), Some(id)) = (self.files.event_loop.get(), self.id.get()) {
            let id = *id;
            let _ = endpoint.fire(
                move |ops: &mut dyn SubscriberOps<Subscriber = Subscriber>| {
                    let _ = ops.remove_subscriber(id);
                },
            );
        }
        self.finish();
    }

    fn release_on(&self, ops: &mut dyn SubscriberOps<Subscriber = Subscriber>) {
        if let Some(id) = self.id.get() {
            let _ = ops.remove_subscriber(*id);
        }
        self.finish();
    }

    fn finish(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        lock(&self.files.table).remove(&self.key);
        self.file.release();
        debug!("{}: released", self.file.describe());
    }
}

/// A file waiting on the loop for its next request.
struct FileSub<F: FileKind>(Arc<OpenFile<F>>);

impl<F: FileKind> MutEventSubscriber for FileSub<F> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.sock, EventSet::IN)) {
            warn!("{}: cannot watch it: {e}", self.0.file.describe());
        }
    }

    /// A request (or the close): the file leaves the loop's watch and its
    /// thread serves it. Never blocks.
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let _ = ops.remove(Events::new(&self.0.sock, EventSet::IN));
        if let Err(e) = self.0.spawn(Some(FILE_LINGER)) {
            warn!(
                "{}: cannot start its thread: {e}; closed",
                self.0.file.describe()
            );
            self.0.finish();
        }
    }
}

/// How [`serve_file`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// No request for the linger time.
    Idle,
    /// Closed by the client, or after a protocol violation.
    Closed,
}

/// Serves one file until its last client copy closes or the client breaks
/// the protocol (PROTOCOL.md, "Framing"), or no request came for `linger`.
fn serve_file<F: FileKind>(sock: &UnixStream, file: &F, linger: Option<Duration>) -> Served {
    // Idle only with nothing read ahead: the loop watches the socket, not
    // this reader's buffer.
    let mut reader = FrameReader::new();
    loop {
        if let Some(t) = linger {
            if !reader.buffered() && !crate::sys::readable(sock.as_fd(), t) {
                return Served::Idle;
            }
        }
        let frame = match reader.read(sock, FlagPolicy::CDEV) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                warn!("{}: protocol violation, file closed: {e}", file.describe());
                break;
            }
        };
        let code = frame.header.request;
        // The cdev flag policy allows REPLY (replies carry it); a request
        // carrying it closes the file, as the other violations of
        // PROTOCOL.md "Framing" do.
        let out = if frame.header.is_reply() {
            Err(Violation::ReplyFlag(code))
        } else {
            dispatch(file.ops(), file, code, frame.payload, frame.fds, |c| {
                file.gate(c)
            })
        };
        let out = match out {
            Ok(o) => o,
            Err(v) => {
                warn!("{}: protocol violation, file closed: {v}", file.describe());
                break;
            }
        };
        let mut payload = reply_payload(&out);
        let mut fds = out.fds;
        if payload.len() > MAX_PAYLOAD as usize {
            // Never happens with the caps the handlers apply; keep the
            // framing promise anyway.
            payload = reply_payload(&Out::result(Errno::EINVAL.to_result()));
            fds.clear();
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let size = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        if let Err(e) = wire::write_frame(sock, &frame.header.reply(size), &payload, &raw) {
            debug!("{}: reply failed, file closed: {e}", file.describe());
            break;
        }
    }
    Served::Closed
}
