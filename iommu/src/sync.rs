//! The one poisoned-lock policy of the workspace.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering from poisoning: every mutex in vcdev guards data
/// that a panicking holder leaves consistent (trees and tables are
/// replaced, never half-written; counters and queues stay valid), and a
/// panic on one thread must not take the rest of the daemon with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
