//! The one poisoned-lock policy of the workspace, and the sync layer of the
//! grace period.
//!
//! [`lock`] is for std's mutexes, everywhere. The read-copy-update core
//! ([`crate::space`], [`crate::translate`], [`crate::hold`]) takes its
//! primitives from [`qsbr`] instead: std's in a normal build, loom's under
//! `--cfg loom`, where the loom model of the grace period
//! (`src/loom_tests.rs`) explores its interleavings and memory orderings.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering from poisoning: every mutex in vcdev guards data
/// that a panicking holder leaves consistent (trees and tables are
/// replaced, never half-written; counters and queues stay valid), and a
/// panic on one thread must not take the rest of the daemon with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The primitives of the grace period, readers and holds: std's, or
/// loom's under `cfg(loom)`.
pub(crate) mod qsbr {
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicU64, Ordering};
    #[cfg(loom)]
    pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
    #[cfg(not(loom))]
    pub(crate) use std::sync::atomic::{fence, AtomicPtr, AtomicU32, AtomicU64, Ordering};
    #[cfg(not(loom))]
    pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

    /// [`super::lock`] for the mutexes of this layer.
    pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the code relies on SeqCst *accesses* for a store-buffering
    /// pair (a store, then a load of another location, on each side: one of
    /// the two loads must see the other side's store), a SeqCst fence under
    /// loom. Loom treats SeqCst loads and stores as acquire/release, which
    /// allows both loads to miss (a false deadlock); its SeqCst fences are
    /// exact. Natively nothing: the SeqCst accesses already forbid it.
    #[inline(always)]
    pub(crate) fn seqcst_pair() {
        #[cfg(loom)]
        fence(Ordering::SeqCst);
    }

    /// Spins while `done` is false: for up to `for_how_long` natively, for
    /// [`LOOM_SPINS`] yields under loom (a timed spin would make loom's
    /// executions differ from one run to the next). Returns `done()`.
    #[inline]
    pub(crate) fn spin_until(done: impl Fn() -> bool, for_how_long: std::time::Duration) -> bool {
        #[cfg(not(loom))]
        {
            // Most waits are over at the first look: no clock for them.
            if done() {
                return true;
            }
            let start = std::time::Instant::now();
            while !done() && start.elapsed() < for_how_long {
                std::hint::spin_loop();
            }
        }
        #[cfg(loom)]
        {
            let _ = for_how_long;
            for _ in 0..LOOM_SPINS {
                if done() {
                    break;
                }
                loom::thread::yield_now();
            }
        }
        done()
    }

    /// Yields of a spin under loom before it blocks: enough to explore both
    /// the spin that succeeds and the fall-back to blocking.
    #[cfg(loom)]
    const LOOM_SPINS: usize = 1;
}
