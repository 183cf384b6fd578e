//! One virtqueue of a vhost-user connection: its configuration (owned by
//! the connection thread) and, while it runs, its worker thread.
//!
//! # Who owns what
//!
//! - The connection thread owns [`Vring`]: size, ring GPAs, base, kick fd,
//!   enable bit. Only it starts and stops the worker.
//! - A running worker owns the `virtio_queue::Queue`, the device's per-queue
//!   state and a [`Reader`] of the connection's DMA address space. It is
//!   online in that space only while it processes the queue (one
//!   [`vcdev_iommu::Session`] per wake-up), so memory-table edits wait for
//!   at most one batch of requests.
//! - The call and err eventfds are shared ([`Notifiers`]): the frontend may
//!   change them while the queue runs (QEMU masks guest notifiers so).
//!
//! A worker waits only on its own epoll (kick + control): stopping it
//! (GET_VRING_BASE, SET_VRING_ENABLE 0, RESET_DEVICE, disconnect) never
//! waits on the frontend. The vIOMMU issue must keep it so: a queue waiting
//! for a miss answer waits offline and on this same epoll, so that a stop
//! request wins.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use log::{debug, error, warn};
use vcdev_device_model::blk::{BlkDevice, BlkQueue, FaultPolicy};
use vcdev_iommu::{AddressSpace, Reader};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{EventLoop, EventLoopError, EVENT_CONTROL, EVENT_FIRST_DEVICE};

/// The kick eventfd's event id in a worker's loop.
const EVENT_KICK: u64 = EVENT_FIRST_DEVICE;

/// Errors of starting a queue.
#[derive(Debug, thiserror::Error)]
pub enum VringError {
    /// The queue configuration is incomplete or invalid.
    #[error("Queue {index} cannot start: {why}")]
    Config {
        /// Queue index.
        index: u16,
        /// What is wrong.
        why: &'static str,
    },
    /// The worker's event loop could not be set up.
    #[error("Queue {index}: event loop setup failed")]
    EventLoop {
        /// Queue index.
        index: u16,
        /// The cause.
        #[source]
        source: EventLoopError,
    },
    /// An eventfd could not be created or duplicated.
    #[error("Queue {index}: eventfd setup failed")]
    EventFd {
        /// Queue index.
        index: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The worker thread could not be spawned.
    #[error("Queue {index}: cannot spawn its worker")]
    Spawn {
        /// Queue index.
        index: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The eventfds a worker signals, replaceable while it runs.
#[derive(Debug, Default)]
pub struct Notifiers {
    call: Mutex<Option<EventFd>>,
    err: Mutex<Option<EventFd>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Notifiers {
    fn signal(slot: &Mutex<Option<EventFd>>, what: &str) {
        if let Some(fd) = lock(slot).as_ref() {
            if let Err(e) = fd.write(1) {
                warn!("failed to signal the {what} eventfd: {e}");
            }
        }
    }
}

/// A worker's control word and the eventfd that wakes it to read it.
#[derive(Debug)]
struct Control {
    wake: EventFd,
    stop: AtomicBool,
}

/// A running queue.
#[derive(Debug)]
struct Worker {
    control: Arc<Control>,
    join: JoinHandle<Queue>,
}

/// The state of one virtqueue.
#[derive(Debug)]
pub struct Vring {
    index: u16,
    max_size: u16,
    size: u16,
    /// Descriptor table, avail ring, used ring: addresses in the DMA space.
    addr: Option<(u64, u64, u64)>,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
    kick: Option<EventFd>,
    enabled: bool,
    warned_small: bool,
    notifiers: Arc<Notifiers>,
    worker: Option<Worker>,
}

impl Vring {
    /// A stopped, disabled queue of at most `max_size` entries.
    pub fn new(index: u16, max_size: u16) -> Vring {
        Vring {
            index,
            max_size,
            size: max_size,
            addr: None,
            next_avail: 0,
            next_used: 0,
            event_idx: false,
            kick: None,
            enabled: false,
            warned_small: false,
            notifiers: Arc::default(),
            worker: None,
        }
    }

    /// Whether a worker runs.
    pub fn running(&self) -> bool {
        self.worker.is_some()
    }

    /// The size set by SET_VRING_NUM (the maximum until then).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// SET_VRING_NUM (the caller checked `size`).
    pub fn set_size(&mut self, size: u16) {
        self.size = size;
    }

    /// Whether the small-queue warning was given.
    pub fn warned_small(&self) -> bool {
        self.warned_small
    }

    /// Remembers that the small-queue warning was given.
    pub fn set_warned_small(&mut self) {
        self.warned_small = true;
    }

    /// SET_VRING_ADDR, addresses already in the DMA space.
    pub fn set_addr(&mut self, desc: u64, avail: u64, used: u64) {
        self.addr = Some((desc, avail, used));
    }

    /// SET_VRING_BASE.
    pub fn set_base(&mut self, base: u16) {
        self.next_avail = base;
        self.next_used = base;
    }

    /// The next avail index (valid when stopped).
    pub fn base(&self) -> u16 {
        self.next_avail
    }

    /// Whether EVENT_IDX was negotiated (applies at the next start).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// SET_VRING_KICK: the queue is started from now on.
    pub fn set_kick(&mut self, kick: Option<EventFd>) {
        self.kick = kick;
    }

    /// SET_VRING_CALL (takes effect at once, even while running).
    pub fn set_call(&self, call: Option<EventFd>) {
        *lock(&self.notifiers.call) = call;
    }

    /// SET_VRING_ERR (takes effect at once).
    pub fn set_err(&self, err: Option<EventFd>) {
        *lock(&self.notifiers.err) = err;
    }

    /// SET_VRING_ENABLE's bit.
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
    }

    /// Whether the queue is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the queue has a kick fd (is "started" in vhost-user terms).
    pub fn started(&self) -> bool {
        self.kick.is_some()
    }

    /// Starts the worker if the queue is started and enabled and not yet
    /// running. Reads and writes go through a new reader of `space`.
    pub fn maybe_start(
        &mut self,
        device: &Arc<BlkDevice>,
        space: &Arc<AddressSpace>,
        owner: &str,
    ) -> Result<(), VringError> {
        if self.worker.is_some() || !self.enabled {
            return Ok(());
        }
        let Some(kick) = self.kick.as_ref() else {
            return Ok(());
        };
        let index = self.index;
        let cfg = |why| VringError::Config { index, why };
        let (desc, avail, used) = self.addr.ok_or_else(|| cfg("no ring addresses"))?;
        let mut queue = Queue::new(self.max_size).map_err(|_| cfg("invalid maximum size"))?;
        queue
            .try_set_size(self.size)
            .map_err(|_| cfg("invalid size"))?;
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .map_err(|_| cfg("misaligned descriptor table"))?;
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .map_err(|_| cfg("misaligned avail ring"))?;
        queue
            .try_set_used_ring_address(GuestAddress(used))
            .map_err(|_| cfg("misaligned used ring"))?;
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);

        let kick = kick
            .try_clone()
            .map_err(|source| VringError::EventFd { index, source })?;
        let control = Arc::new(Control {
            wake: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|source| VringError::EventFd { index, source })?,
            stop: AtomicBool::new(false),
        });
        let el = EventLoop::new().map_err(|source| VringError::EventLoop { index, source })?;
        el.add(kick.as_raw_fd(), EVENT_KICK)
            .and_then(|()| el.add(control.wake.as_raw_fd(), EVENT_CONTROL))
            .map_err(|source| VringError::EventLoop { index, source })?;
        let ctx = WorkerCtx {
            index,
            queue,
            blk: BlkQueue::new(device.clone()),
            reader: space.reader(),
            kick,
            el,
            control: control.clone(),
            notifiers: self.notifiers.clone(),
        };
        let join = std::thread::Builder::new()
            .name(format!("{owner}-q{index}"))
            .spawn(move || ctx.run())
            .map_err(|source| VringError::Spawn { index, source })?;
        debug!("{owner}: queue {index} started");
        self.worker = Some(Worker { control, join });
        Ok(())
    }

    /// Stops the worker (if any) and keeps the queue's position. Returns
    /// promptly: a worker never waits on the frontend.
    pub fn stop(&mut self) {
        let Some(w) = self.worker.take() else {
            return;
        };
        w.control.stop.store(true, Ordering::SeqCst);
        if let Err(e) = w.control.wake.write(1) {
            error!("queue {}: cannot wake its worker: {e}", self.index);
        }
        match w.join.join() {
            Ok(q) => {
                self.next_avail = q.next_avail();
                self.next_used = q.next_used();
            }
            Err(_) => error!("queue {}: worker panicked", self.index),
        }
    }

    /// Back to the initial state (RESET_DEVICE, GET_VRING_BASE's stop):
    /// stopped, disabled, no kick; with `all` also size, addresses, base and
    /// notifiers are forgotten.
    pub fn reset(&mut self, all: bool) {
        self.stop();
        self.kick = None;
        self.enabled = false;
        if all {
            self.size = self.max_size;
            self.addr = None;
            self.next_avail = 0;
            self.next_used = 0;
            self.event_idx = false;
            self.set_call(None);
            self.set_err(None);
        }
    }
}

impl Drop for Vring {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Everything a worker thread owns.
struct WorkerCtx {
    index: u16,
    queue: Queue,
    blk: BlkQueue,
    reader: Reader,
    kick: EventFd,
    el: EventLoop,
    control: Arc<Control>,
    notifiers: Arc<Notifiers>,
}

impl WorkerCtx {
    fn run(mut self) -> Queue {
        // A kick may have come before the queue was enabled: look now.
        let mut broken = !self.process();
        loop {
            let mut kicked = false;
            if let Err(e) = self.el.wait(|id| kicked |= id == EVENT_KICK) {
                error!("queue {}: {e}", self.index);
                break;
            }
            // Consume the wake-up first, then look at the word: a stop set
            // after this look leaves the eventfd readable for the next wait.
            let _ = self.control.wake.read();
            if self.control.stop.load(Ordering::SeqCst) {
                break;
            }
            if kicked {
                // The count only says "look"; a failed read (EAGAIN) too.
                let _ = self.kick.read();
                if !broken {
                    broken = !self.process();
                }
            }
        }
        self.queue
    }

    /// Drains the queue; false if the queue itself is broken (the frontend
    /// is told on the err eventfd and the queue is left alone until
    /// restarted).
    fn process(&mut self) -> bool {
        let session = self.reader.enter();
        let r = self
            .blk
            .process(&mut self.queue, &session, FaultPolicy::Fail);
        drop(session);
        match r {
            Ok(outcome) => {
                if outcome.notify {
                    Notifiers::signal(&self.notifiers.call, "call");
                }
                true
            }
            Err(e) => {
                error!("queue {}: {e}; queue stopped until restarted", self.index);
                Notifiers::signal(&self.notifiers.err, "err");
                false
            }
        }
    }
}
