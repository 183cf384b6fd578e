//! The loom model of the grace period: two readers and one writer.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p vcdev-iommu --release
//! loom` (its own `CARGO_TARGET_DIR` keeps the normal build's artifacts);
//! `LOOM_MAX_PREEMPTIONS` overrides the bound of [`PREEMPTIONS`]. Under
//! `cfg(loom)`, [`crate::sync::qsbr`] hands the real [`AddressSpace`],
//! [`Reader`] and [`Session`](crate::Session) loom's atomics, mutexes and
//! condvar, a spin of one yield instead of a timed one, and a SeqCst fence
//! on each side of the one pair that relies on SeqCst accesses.
//!
//! The scenario: IOVA page `GONE` and page `KEPT` are mapped. Reader 1 has
//! both in its front cache (a session before the threads start), reader 2
//! has nothing cached. Each runs one session: translate `GONE` and read the
//! page it got, translate `KEPT`. The writer removes `GONE` in one edit
//! and, once the edit has returned, frees the page (writes it).
//!
//! The page is a loom `UnsafeCell`, so loom checks the promise itself: every
//! read a reader made through the removed translation must happen before
//! the writer's write after `edit` returned, in every execution explored,
//! else loom fails with a causality violation. A reader that finds `GONE`
//! unmapped must have seen the new root; `KEPT` must translate throughout
//! (the partial flush of the front cache keeps it).
//!
//! The negative twin skips the grace period's wait (the test-only knob of
//! the native negative test) and must be caught.

// std's: counts executions outside the model.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use loom::cell::UnsafeCell;
use vm_memory::Permissions;

use crate::{AddressSpace, Extent, Fault, MemObject, Reader};

const PAGE: u64 = 4096;
/// The mapping the edit removes (host page 0).
const GONE: u64 = 0x10_0000;
/// A mapping nobody removes (host page 1), in another entry of the
/// direct-mapped front cache than `GONE`.
const KEPT: u64 = 0x20_1000;
/// The preemption bound unless `LOOM_MAX_PREEMPTIONS` says otherwise.
const PREEMPTIONS: usize = 3;
/// What the writer puts into the page it freed.
const FREED: u64 = u64::MAX;

/// Host page 0 as loom sees it: readers read it through their
/// translation, the writer writes it once the edit returned.
struct Page {
    base: usize,
    cell: UnsafeCell<u64>,
}

// SAFETY: the cell is shared on purpose: loom checks every access to it
// and fails the model on any that is not ordered against a write, so no
// execution that passes has a data race on it.
unsafe impl Sync for Page {}

impl Page {
    /// A read through a translation of `GONE`.
    fn read_through(&self, ptr: *mut u8) -> u64 {
        assert_eq!(ptr as usize, self.base, "GONE translated elsewhere");
        // SAFETY: loom tracks every access to the cell and fails the model
        // on one that is not ordered against a write: that is the check.
        self.cell.with(|p| unsafe { *p })
    }

    /// The memory is reused once the edit that unmapped it returned.
    fn free(&self) {
        // SAFETY: as above.
        self.cell.with_mut(|p| unsafe { *p = FREED });
    }
}

fn cache_index(iova: u64) -> usize {
    (iova / PAGE) as usize % crate::translate::CACHE_ENTRIES
}

/// One reader's session: use `GONE` if it still translates, check `KEPT`.
fn session(r: &mut Reader, page: &Page, kept_host: usize) {
    let s = r.enter();
    match s.translate(GONE, 8, Permissions::Read) {
        Ok(v) => assert_ne!(page.read_through(v[0].ptr), FREED, "read a freed page"),
        Err(f) => assert_eq!(f, Fault::Unmapped { iova: GONE }),
    }
    let v = s.translate(KEPT, 8, Permissions::Read).expect("KEPT stays");
    assert_eq!(v[0].ptr as usize, kept_host);
}

/// Runs the model; returns the number of executions loom explored.
fn run_model(skip_wait: bool) -> usize {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(PREEMPTIONS);
    }
    let executions = Arc::new(AtomicUsize::new(0));
    let counter = executions.clone();
    b.check(move || {
        counter.fetch_add(1, Ordering::Relaxed);
        let m = Arc::new(MemObject::anonymous(2 * PAGE as usize).unwrap());
        let base = m.host_base() as usize;
        let kept_host = base + PAGE as usize;
        assert_ne!(cache_index(GONE), cache_index(KEPT));
        let s = AddressSpace::new();
        s.set_skip_quiescence_for_test(skip_wait);
        s.edit(|t| {
            t.insert(Extent::new(
                GONE,
                GONE + PAGE - 1,
                Permissions::Read,
                m.clone(),
                0,
            ));
            t.insert(Extent::new(
                KEPT,
                KEPT + PAGE - 1,
                Permissions::Read,
                m.clone(),
                PAGE,
            ));
            Ok::<_, ()>(())
        })
        .unwrap();
        let page = Arc::new(Page {
            base,
            cell: UnsafeCell::new(0),
        });
        // Reader 1 caches both extents; reader 2 starts cold.
        let mut r1 = s.reader();
        {
            let sess = r1.enter();
            sess.translate(GONE, 8, Permissions::Read).unwrap();
            sess.translate(KEPT, 8, Permissions::Read).unwrap();
        }
        let r2 = s.reader();
        let readers: Vec<_> = [r1, r2]
            .into_iter()
            .map(|mut r| {
                let page = page.clone();
                loom::thread::spawn(move || {
                    session(&mut r, &page, kept_host);
                    r
                })
            })
            .collect();
        let writer = {
            let (s, page) = (s.clone(), page.clone());
            loom::thread::spawn(move || {
                s.edit(|t| {
                    t.remove(GONE).expect("GONE is mapped");
                    Ok::<_, ()>(())
                })
                .unwrap();
                page.free();
            })
        };
        writer.join().unwrap();
        let readers: Vec<Reader> = readers.into_iter().map(|h| h.join().unwrap()).collect();
        // Reader 1 used its front cache: `GONE` if its session saw the old
        // generation, else `KEPT`, which the partial flush kept.
        assert!(readers[0].stats().hits >= 1, "{:?}", readers[0].stats());
        drop(readers);
        drop(m);
    });
    let n = executions.load(Ordering::Relaxed);
    eprintln!(
        "loom: {n} executions, preemption bound {:?}",
        b.preemption_bound
    );
    n
}

/// The promise within the preemption bound: no reader uses the removed
/// translation after the edit returned, whether it had it cached or walks
/// the tree.
#[test]
fn loom_grace_period_keeps_the_promise() {
    run_model(false);
}

/// The negative twin: with the wait skipped, loom finds an execution where
/// a reader reads the page after the edit returned (and freed it).
#[test]
#[should_panic(expected = "Causality violation")]
fn loom_without_the_wait_a_reader_uses_a_removed_translation() {
    run_model(true);
}
