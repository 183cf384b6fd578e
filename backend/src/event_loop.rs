//! A small epoll loop (vmm-sys-util) for queue workers.
//!
//! Event ids are named constants; the reserved ones come first (the
//! epoll_helper pattern): [`EVENT_CONTROL`] wakes a worker to look at its
//! control word (stop), device events are numbered from
//! [`EVENT_FIRST_DEVICE`].

use std::io;
use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Reserved: the worker's control eventfd (stop requests).
pub const EVENT_CONTROL: u64 = 0;
/// First id a device may use (a queue's kick eventfd).
pub const EVENT_FIRST_DEVICE: u64 = 1;

const MAX_EVENTS: usize = 8;

/// Errors of the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll_create failed.
    #[error("Failed to create an epoll instance")]
    Create(#[source] io::Error),
    /// epoll_ctl failed.
    #[error("Failed to add descriptor {fd} to epoll")]
    Add {
        /// The descriptor.
        fd: RawFd,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// epoll_wait failed.
    #[error("epoll_wait failed")]
    Wait(#[source] io::Error),
}

/// An epoll instance with named event ids.
#[derive(Debug)]
pub struct EventLoop {
    epoll: Epoll,
}

impl EventLoop {
    /// A new, empty loop.
    pub fn new() -> Result<EventLoop, EventLoopError> {
        Ok(EventLoop {
            epoll: Epoll::new().map_err(EventLoopError::Create)?,
        })
    }

    /// Watches `fd` for input, reported as `id`.
    pub fn add(&self, fd: RawFd, id: u64) -> Result<(), EventLoopError> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, id))
            .map_err(|source| EventLoopError::Add { fd, source })
    }

    /// Watches `fd` for input, edge-triggered: every write to an eventfd
    /// is one wake-up, and nothing needs to be read to rearm it. For
    /// descriptors a peer owns, which the daemon must never read: the peer
    /// decides whether they block (O_NONBLOCK belongs to the description
    /// both share), and a read of one with a zero count would wait forever.
    pub fn add_edge(&self, fd: RawFd, id: u64) -> Result<(), EventLoopError> {
        let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, id);
        self.epoll
            .ctl(ControlOperation::Add, fd, ev)
            .map_err(|source| EventLoopError::Add { fd, source })
    }

    /// Waits (forever) for events and calls `f` with each ready id.
    pub fn wait(&self, f: impl FnMut(u64)) -> Result<(), EventLoopError> {
        self.wait_timeout(None, f)
    }

    /// Waits for events, at most `timeout` (`None`: forever), and calls `f`
    /// with each ready id; nothing is called when the time runs out or a
    /// signal (or io_uring task work) interrupts the wait.
    pub fn wait_timeout(
        &self,
        timeout: Option<std::time::Duration>,
        mut f: impl FnMut(u64),
    ) -> Result<(), EventLoopError> {
        // Round up, so that a wait of 0.5 ms does not spin at 0.
        let ms = timeout.map_or(-1, |t| {
            i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        let n = match self.epoll.wait(ms, &mut events) {
            Ok(n) => n,
            // Interrupted: return, and let the caller look. io_uring posts
            // a thread's completions from task work that interrupts its
            // wait this way, the ring's eventfd ready behind it: waiting
            // again would be one more system call per wave of completions.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(EventLoopError::Wait(e)),
        };
        for ev in events.iter().take(n) {
            f(ev.data());
        }
        Ok(())
    }
}
