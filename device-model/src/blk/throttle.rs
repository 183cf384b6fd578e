//! Per-device I/O limits (the `iops=` and `bw=` device options): token buckets.
//!
//! Each limit is a bucket that holds at most one second of its rate (the burst, as in QEMU's
//! throttle groups with `burst-length` 1 s) and refills at its rate. A read or write costs one
//! token of the IOPS bucket and its data length in tokens of the bandwidth bucket; it may go
//! when every limited bucket holds its cost, or is full (a request larger than a whole burst
//! goes when the bucket is full, and leaves it in debt, which the requests behind it wait
//! out). Other requests (flush, GET_ID, discard, write-zeroes) cost nothing, as in QEMU, but
//! never overtake a waiting one.
//!
//! The buckets belong to the device, so that every queue draws from the same ones. A queue
//! whose request must wait *parks* it ([`super::AsyncQueue`]), takes nothing more from its
//! avail ring meanwhile (the requests behind it wait their turn, in order), and asks its worker
//! to wake it at [`super::AsyncQueue::throttle_deadline`]. Nothing is ever failed for a limit.
//!
//! [`Throttle::set_limits`] changes the limits live; the tokens already there are kept (capped
//! to the new burst; a limit that was off starts full), and every registered [`Wake`] is woken
//! so that parked requests are looked at again under the new limits.
//!
//! Tokens are counted in billionths (one token per second is one per nanosecond), in `i128`,
//! so that refills are exact whatever the rate.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// Nanoseconds per second: the burst is one second of the rate.
const NANOS: i128 = 1_000_000_000;

/// A device's limits, per second; 0 means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Read and write requests per second.
    pub iops: u64,
    /// Bytes read and written per second.
    pub bw: u64,
}

impl Limits {
    /// No limit at all.
    pub const UNLIMITED: Limits = Limits { iops: 0, bw: 0 };

    /// Whether neither limit is set.
    #[must_use]
    pub fn is_unlimited(&self) -> bool {
        self.iops == 0 && self.bw == 0
    }
}

/// `limits` for a log line: `iops=N bw=N`, 0 for unlimited.
#[must_use]
pub fn describe(limits: Limits) -> String {
    format!("iops={} bw={}", limits.iops, limits.bw)
}

/// What one request costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Requests (IOPS tokens).
    pub ops: u64,
    /// Bytes (bandwidth tokens).
    pub bytes: u64,
}

impl Cost {
    /// A read or write of `bytes`.
    #[must_use]
    pub fn io(bytes: u64) -> Cost {
        Cost { ops: 1, bytes }
    }
}

/// Something to wake when the limits change (a queue's worker).
pub trait Wake: Send + Sync {
    /// Wake the worker up: it polls its queue again. Must not block.
    fn wake(&self);
}

/// One token bucket: `rate` tokens a second, at most one second of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bucket {
    rate: u64,
    /// Billionths of a token; negative while in debt.
    level: i128,
}

impl Bucket {
    fn full(rate: u64) -> Bucket {
        Bucket {
            rate,
            level: Bucket::capacity_of(rate),
        }
    }

    fn capacity_of(rate: u64) -> i128 {
        i128::from(rate).saturating_mul(NANOS)
    }

    fn capacity(&self) -> i128 {
        Bucket::capacity_of(self.rate)
    }

    fn refill(&mut self, elapsed: Duration) {
        let ns = i128::try_from(elapsed.as_nanos()).unwrap_or(i128::MAX);
        let added = i128::from(self.rate).saturating_mul(ns);
        self.level = self.level.saturating_add(added).min(self.capacity());
    }

    /// The level a request of `cost` tokens needs: its cost, or a full bucket.
    fn needs(&self, cost: u64) -> i128 {
        i128::from(cost).saturating_mul(NANOS).min(self.capacity())
    }

    /// How long until a request of `cost` tokens may go.
    fn wait(&self, cost: u64) -> Duration {
        let short = self.needs(cost).saturating_sub(self.level);
        if short <= 0 || self.rate == 0 {
            return Duration::ZERO;
        }
        let rate = i128::from(self.rate);
        // Round up, so that the bucket holds enough when the wait is over.
        let ns = short.saturating_add(rate - 1) / rate;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn take(&mut self, cost: u64) {
        self.level = self
            .level
            .saturating_sub(i128::from(cost).saturating_mul(NANOS));
    }

    /// The same bucket under a new rate: full if it had none, else its tokens capped.
    fn with_rate(old: Option<Bucket>, rate: u64) -> Option<Bucket> {
        if rate == 0 {
            return None;
        }
        Some(match old {
            None => Bucket::full(rate),
            Some(b) => Bucket {
                rate,
                level: b.level.min(Bucket::capacity_of(rate)),
            },
        })
    }
}

#[derive(Debug)]
struct State {
    limits: Limits,
    iops: Option<Bucket>,
    bw: Option<Bucket>,
    /// When the buckets were last refilled.
    last: Instant,
}

impl State {
    fn new(limits: Limits, now: Instant) -> State {
        State {
            limits,
            iops: Bucket::with_rate(None, limits.iops),
            bw: Bucket::with_rate(None, limits.bw),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        // A clock read before the last one (another queue's) adds nothing, and is not kept.
        self.last = self.last.max(now);
        for b in [&mut self.iops, &mut self.bw].into_iter().flatten() {
            b.refill(elapsed);
        }
    }

    fn wait(&self, cost: Cost) -> Duration {
        let iops = self.iops.map_or(Duration::ZERO, |b| b.wait(cost.ops));
        let bw = self.bw.map_or(Duration::ZERO, |b| b.wait(cost.bytes));
        iops.max(bw)
    }
}

/// The buckets of one device, shared by its queues.
pub struct Throttle {
    /// Whether any limit is set: unlimited devices never take the lock.
    limited: AtomicBool,
    state: Mutex<State>,
    wakers: Mutex<Vec<Weak<dyn Wake>>>,
}

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle")
            .field("limits", &self.limits())
            .finish_non_exhaustive()
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(Limits::UNLIMITED)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent whatever a panicking holder did (plain integers).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Throttle {
    /// Buckets for `limits`, full.
    #[must_use]
    pub fn new(limits: Limits) -> Throttle {
        Throttle::new_at(limits, Instant::now())
    }

    /// Buckets for `limits`, full at `now`.
    #[must_use]
    pub fn new_at(limits: Limits, now: Instant) -> Throttle {
        Throttle {
            limited: AtomicBool::new(!limits.is_unlimited()),
            state: Mutex::new(State::new(limits, now)),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// The limits in force.
    #[must_use]
    pub fn limits(&self) -> Limits {
        lock(&self.state).limits
    }

    /// Whether any limit is set.
    #[must_use]
    pub fn is_limited(&self) -> bool {
        self.limited.load(Ordering::Acquire)
    }

    /// Changes the limits at `now` (see the module doc), then wakes every registered waker.
    pub fn set_limits(&self, limits: Limits, now: Instant) {
        {
            let mut s = lock(&self.state);
            s.refill(now);
            s.iops = Bucket::with_rate(s.iops, limits.iops);
            s.bw = Bucket::with_rate(s.bw, limits.bw);
            s.limits = limits;
            self.limited
                .store(!limits.is_unlimited(), Ordering::Release);
        }
        let wakers: Vec<_> = {
            let mut w = lock(&self.wakers);
            w.retain(|w| w.strong_count() > 0);
            w.iter().filter_map(Weak::upgrade).collect()
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Registers `waker`, woken at every change of the limits while it lives.
    pub fn add_waker(&self, waker: Weak<dyn Wake>) {
        let mut w = lock(&self.wakers);
        w.retain(|w| w.strong_count() > 0);
        w.push(waker);
    }

    /// [`Throttle::try_take`] now; an unlimited device reads no clock (a
    /// request's path).
    pub fn try_take_now(&self, cost: Cost) -> Result<(), Instant> {
        if !self.is_limited() {
            return Ok(());
        }
        self.try_take(cost, Instant::now())
    }

    /// Takes `cost` at `now` if it may go; else says when it may.
    pub fn try_take(&self, cost: Cost, now: Instant) -> Result<(), Instant> {
        if !self.is_limited() {
            return Ok(());
        }
        let mut s = lock(&self.state);
        s.refill(now);
        let wait = s.wait(cost);
        if !wait.is_zero() {
            return Err(now.checked_add(wait).unwrap_or(now));
        }
        if let Some(b) = s.iops.as_mut() {
            b.take(cost.ops);
        }
        if let Some(b) = s.bw.as_mut() {
            b.take(cost.bytes);
        }
        Ok(())
    }

    /// When a request of `cost` may go, seen at `now` (`now` if at once).
    #[must_use]
    pub fn ready_at(&self, cost: Cost, now: Instant) -> Instant {
        if !self.is_limited() {
            return now;
        }
        let mut s = lock(&self.state);
        s.refill(now);
        now.checked_add(s.wait(cost)).unwrap_or(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Takes requests of `cost` at `now` until one must wait; how many went.
    fn drain(t: &Throttle, cost: Cost, now: Instant) -> u64 {
        let mut n = 0;
        while t.try_take(cost, now).is_ok() {
            n += 1;
            assert!(n < 1_000_000, "no limit");
        }
        n
    }

    /// A full bucket lets one second of the rate through at once, then nothing.
    #[test]
    fn burst_is_one_second() {
        let now = Instant::now();
        let t = Throttle::new_at(Limits { iops: 100, bw: 0 }, now);
        assert_eq!(drain(&t, Cost::io(4096), now), 100);
        let t = Throttle::new_at(
            Limits {
                iops: 0,
                bw: 64 * 1024,
            },
            now,
        );
        assert_eq!(drain(&t, Cost::io(4096), now), 16);
    }

    /// An empty bucket refills at the rate, and never beyond the burst.
    #[test]
    fn refill_at_the_rate() {
        let start = Instant::now();
        let t = Throttle::new_at(Limits { iops: 1000, bw: 0 }, start);
        assert_eq!(drain(&t, Cost::io(512), start), 1000);
        let Err(at) = t.try_take(Cost::io(512), start) else {
            panic!("an empty bucket let a request through");
        };
        assert_eq!(at, start + ms(1), "one token takes 1 ms at 1000/s");
        assert_eq!(t.ready_at(Cost::io(512), start), start + ms(1));
        assert_eq!(drain(&t, Cost::io(512), start + ms(1)), 1);
        assert_eq!(drain(&t, Cost::io(512), start + ms(251)), 250);
        // A long idle time fills the bucket, no more.
        assert_eq!(drain(&t, Cost::io(512), start + ms(60_000)), 1000);
    }

    /// Both limits apply: the tighter one wins; a request larger than the burst goes when the
    /// bucket is full and leaves it in debt.
    #[test]
    fn both_limits_and_debt() {
        let now = Instant::now();
        let t = Throttle::new_at(
            Limits {
                iops: 1000,
                bw: 1 << 20,
            },
            now,
        );
        // 1 MiB/s allows 16 requests of 64 KiB; the IOPS limit would allow 1000.
        assert_eq!(drain(&t, Cost::io(64 << 10), now), 16);
        let t = Throttle::new_at(Limits { iops: 0, bw: 4096 }, now);
        t.try_take(Cost::io(64 << 10), now).expect("a full bucket");
        // 60 KiB of debt plus 4 KiB for the next one: 16 s at 4 KiB/s.
        let at = t.try_take(Cost::io(4096), now).unwrap_err();
        assert_eq!(at, now + Duration::from_secs(16));
        assert!(t.try_take(Cost::io(4096), at).is_ok());
    }

    /// Unlimited devices let everything through and take no lock; limits come and go live.
    #[test]
    fn unlimited_and_live_changes() {
        let now = Instant::now();
        let t = Throttle::new_at(Limits::UNLIMITED, now);
        assert!(!t.is_limited());
        for _ in 0..10_000 {
            t.try_take(Cost::io(1 << 30), now).unwrap();
        }
        t.set_limits(Limits { iops: 10, bw: 0 }, now);
        assert!(t.is_limited());
        assert_eq!(t.limits(), Limits { iops: 10, bw: 0 });
        // A limit that was off starts full.
        assert_eq!(drain(&t, Cost::io(512), now), 10);
        // A new limit keeps the tokens there were (none), refilled at the new rate.
        t.set_limits(Limits { iops: 1000, bw: 0 }, now);
        assert_eq!(drain(&t, Cost::io(512), now), 0);
        assert_eq!(drain(&t, Cost::io(512), now + ms(10)), 10);
        t.set_limits(Limits::UNLIMITED, now + ms(10));
        assert!(!t.is_limited());
        assert!(t.try_take(Cost::io(512), now + ms(10)).is_ok());
    }

    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Every live waker is woken at each change; dropped ones are forgotten.
    #[test]
    fn changes_wake_the_workers() {
        let t = Throttle::default();
        let a = Arc::new(Counter(AtomicUsize::new(0)));
        let b = Arc::new(Counter(AtomicUsize::new(0)));
        let wa: Weak<Counter> = Arc::downgrade(&a);
        let wb: Weak<Counter> = Arc::downgrade(&b);
        t.add_waker(wa);
        t.add_waker(wb);
        t.set_limits(Limits { iops: 5, bw: 0 }, Instant::now());
        drop(b);
        t.set_limits(Limits::UNLIMITED, Instant::now());
        assert_eq!(a.0.load(Ordering::SeqCst), 2);
        assert_eq!(lock(&t.wakers).len(), 1);
    }

    /// Clock reads out of order (two queues) neither add tokens twice nor lose any.
    #[test]
    fn clock_reads_out_of_order() {
        let start = Instant::now();
        let t = Throttle::new_at(Limits { iops: 1000, bw: 0 }, start);
        assert_eq!(drain(&t, Cost::io(512), start), 1000);
        assert_eq!(drain(&t, Cost::io(512), start + ms(5)), 5);
        assert_eq!(drain(&t, Cost::io(512), start + ms(3)), 0);
        assert_eq!(drain(&t, Cost::io(512), start + ms(6)), 1);
    }
}
