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
use std::sync::{Arc, Mutex, Weak};

use log::{debug, warn};
use vcdev_iommu::sync::lock;
use vcdev_iommu::Errno;

use super::dispatch::{dispatch, reply_payload, Op, Out, Violation};
use crate::wire::{self, FlagPolicy, MAX_PAYLOAD};

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
#[derive(Debug, Default)]
pub struct Files {
    table: Mutex<HashMap<(u64, u64), AnyFile>>,
    seq: AtomicU64,
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
    /// starts the thread serving ours. Returns the client's end.
    pub fn hand_out<F: FileKind>(self: &Arc<Self>, file: Arc<F>) -> io::Result<OwnedFd> {
        let (ours, theirs) = UnixStream::pair()?;
        let key = crate::sys::inode_key(theirs.as_fd())?;
        let any: Arc<dyn Any + Send + Sync> = file.clone();
        lock(&self.table).insert(key, Arc::downgrade(&any));
        file.opened(&ours);
        let files = self.clone();
        let name = file.describe();
        let spawned = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                serve_file(&ours, file.as_ref());
                lock(&files.table).remove(&key);
                file.release();
                debug!("{}: released", file.describe());
            });
        if let Err(e) = spawned {
            lock(&self.table).remove(&key);
            return Err(e);
        }
        Ok(theirs.into())
    }
}

/// Serves one file until its last client copy closes or the client breaks
/// the protocol (PROTOCOL.md, "Framing"): then the socket is shut down.
fn serve_file<F: FileKind>(sock: &UnixStream, file: &F) {
    loop {
        let frame = match wire::read_frame(sock, FlagPolicy::CDEV) {
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
    let _ = sock.shutdown(std::net::Shutdown::Both);
}
