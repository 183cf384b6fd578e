//! An address space: extents published read-copy-update, and the
//! quiescence that makes invalidation a promise.
//!
//! # Invariants
//!
//! - **Writers** serialise on `writer` (a mutex readers never take). Each
//!   [`AddressSpace::edit`] mutates the writer's private [`Tree`] and then
//!   publishes its root with one atomic pointer swap.
//! - **Readers** are [`Reader`]s (one per queue, single owner). A reader is
//!   *online* inside a [`Session`] and may then dereference the published
//!   root and the host memory it points to; it is *offline* (quiescent)
//!   otherwise. Its slot holds 0 when offline, else the generation it saw
//!   when it went online.
//! - **`generation`** is bumped by every grace period. A reader's front
//!   cache is valid only for the generation it was filled in; one atomic load
//!   per translation checks it.
//! - **Grace periods.** An edit that removes or changes any translation
//!   bumps the generation and then waits until every reader is offline or
//!   has gone online again since (slot 0 or slot >= the new generation).
//!   Only then does it return, and only then are the old roots and the
//!   removed extents (and so possibly their memory) dropped. Edits that only
//!   add keep old roots on a retired list, freed at the next grace period.
//! - A reader that waits for anything slow (an IOTLB miss answer) must end
//!   its session first, or the invalidator waits for it: QEMU blocks on the
//!   invalidate's ack before it answers the miss.
//!
//! The memory ordering is the classic QSBR pairing: the reader stores its
//! slot, then a SeqCst fence, then loads the generation and the root; the
//! writer swaps the root, bumps the generation, SeqCst fence, then reads the
//! slots. Either the writer sees the reader online with an old generation
//! (and waits), or the reader sees the new root and generation.

#[cfg(test)]
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{fence, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::tree::{Extent, Node, Tree};

/// Grace periods are triggered at the latest when this many roots are
/// retired by add-only edits.
const MAX_RETIRED: usize = 64;

/// One reader's announcement slot, alone on its cache line.
#[repr(align(64))]
#[derive(Debug, Default)]
pub(crate) struct ReaderSlot {
    pub(crate) epoch: AtomicU64,
}

#[derive(Debug, Default)]
struct Writer {
    tree: Tree,
    retired: Vec<Arc<Node>>,
}

/// A set of translations (IOVA -> host memory) shared by its readers.
#[derive(Debug)]
pub struct AddressSpace {
    /// The published root; holds one strong count (`Arc::into_raw`).
    root: AtomicPtr<Node>,
    generation: AtomicU64,
    readers: Mutex<Vec<Arc<ReaderSlot>>>,
    writer: Mutex<Writer>,
    grace_periods: AtomicU64,
    /// Test-only: skip the wait for readers (the negative test of the
    /// promise).
    #[cfg(test)]
    skip_quiescence: AtomicBool,
}

impl Default for AddressSpace {
    fn default() -> Self {
        let tree = Tree::default();
        let root = Arc::into_raw(tree.root.clone()).cast_mut();
        AddressSpace {
            root: AtomicPtr::new(root),
            generation: AtomicU64::new(1),
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(Writer {
                tree,
                retired: Vec::new(),
            }),
            grace_periods: AtomicU64::new(0),
            #[cfg(test)]
            skip_quiescence: AtomicBool::new(false),
        }
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        let root = *self.root.get_mut();
        // SAFETY: `root` came from Arc::into_raw and nobody can read it any
        // more: readers hold an Arc<AddressSpace>, so none is left.
        drop(unsafe { Arc::from_raw(root) });
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves consistent data behind
    // (trees are replaced, never half-written): recover from poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Changes made inside one [`AddressSpace::edit`].
pub struct Txn<'a> {
    tree: &'a mut Tree,
    removed: Vec<Extent>,
    added: bool,
}

impl Txn<'_> {
    /// The current extents (including this transaction's changes).
    pub fn tree(&self) -> &Tree {
        self.tree
    }

    /// Inserts an extent that overlaps none (the caller checked).
    pub fn insert(&mut self, e: Extent) {
        self.tree.insert(e);
        self.added = true;
    }

    /// Removes the extent starting at `start`, returning a copy of it. The
    /// removal takes effect for readers with the grace period at commit.
    pub fn remove(&mut self, start: u64) -> Option<Extent> {
        let e = self.tree.remove(start)?;
        self.removed.push(e.clone());
        Some(e)
    }

    /// Removes every extent.
    pub fn clear(&mut self) -> usize {
        let n = self.tree.len();
        if n > 0 {
            self.tree.for_each(|e| self.removed.push(e.clone()));
            self.tree.clear();
        }
        n
    }
}

impl AddressSpace {
    /// A new, empty address space.
    pub fn new() -> Arc<AddressSpace> {
        Arc::new(AddressSpace::default())
    }

    /// Runs `f` on the writer's tree. On `Ok` the result is published, and
    /// if anything was removed the call returns only after a grace period:
    /// no reader uses a removed translation any more. On `Err` every change
    /// `f` made is rolled back.
    pub fn edit<R, E>(&self, f: impl FnOnce(&mut Txn<'_>) -> Result<R, E>) -> Result<R, E> {
        let mut w = lock(&self.writer);
        let saved = w.tree.clone();
        let mut txn = Txn {
            tree: &mut w.tree,
            removed: Vec::new(),
            added: false,
        };
        let r = f(&mut txn);
        let Txn { removed, added, .. } = txn;
        match r {
            Err(e) => {
                w.tree = saved;
                Err(e)
            }
            Ok(r) => {
                drop(saved);
                if !removed.is_empty() || added {
                    self.publish(&mut w, !removed.is_empty());
                }
                drop(removed);
                Ok(r)
            }
        }
    }

    /// Reads the writer's current tree (the latest committed state).
    pub fn with_tree<R>(&self, f: impl FnOnce(&Tree) -> R) -> R {
        f(&lock(&self.writer).tree)
    }

    fn publish(&self, w: &mut Writer, removal: bool) {
        let new = Arc::into_raw(w.tree.root.clone()).cast_mut();
        let old = self.root.swap(new, Ordering::AcqRel);
        // SAFETY: `old` came from Arc::into_raw in a previous publish (or
        // Default) and was owned by `root`, which no longer holds it.
        w.retired.push(unsafe { Arc::from_raw(old) });
        if removal || w.retired.len() >= MAX_RETIRED {
            self.synchronize();
            w.retired.clear();
        }
    }

    /// Starts a grace period and waits for its end: every reader online now
    /// has gone offline or re-entered.
    fn synchronize(&self) {
        let target = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        fence(Ordering::SeqCst);
        self.grace_periods.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        if self.skip_quiescence.load(Ordering::Relaxed) {
            return;
        }
        let readers = lock(&self.readers).clone();
        for slot in &readers {
            let mut spins = 0u32;
            let start = Instant::now();
            let mut warned = false;
            loop {
                let e = slot.epoch.load(Ordering::SeqCst);
                if e == 0 || e >= target {
                    break;
                }
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else if spins < 1024 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                    if !warned && start.elapsed() > Duration::from_secs(1) {
                        log::warn!("invalidation waits for a reader online for more than 1 s");
                        warned = true;
                    }
                }
            }
        }
        fence(Ordering::SeqCst);
    }

    /// The current generation (changes with every grace period).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Grace periods completed so far.
    pub fn grace_periods(&self) -> u64 {
        self.grace_periods.load(Ordering::Relaxed)
    }

    /// Registers a new reader (one per queue).
    pub fn reader(self: &Arc<Self>) -> crate::Reader {
        let slot = Arc::new(ReaderSlot::default());
        lock(&self.readers).push(slot.clone());
        crate::Reader::new(self.clone(), slot)
    }

    pub(crate) fn unregister(&self, slot: &Arc<ReaderSlot>) {
        lock(&self.readers).retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// The published root. Only for online readers: valid until they go
    /// offline.
    #[inline]
    pub(crate) fn root_ptr(&self) -> *const Node {
        self.root.load(Ordering::Acquire)
    }

    #[inline]
    pub(crate) fn generation_relaxed(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Test-only: make grace periods return at once, breaking the promise
    /// on purpose (see the negative stress test).
    #[cfg(test)]
    pub(crate) fn set_skip_quiescence_for_test(&self, skip: bool) {
        self.skip_quiescence.store(skip, Ordering::Relaxed);
    }
}
