//! The adaptive poll of the main channel after an IOTLB message.
//!
//! Under a strict guest IOMMU the frontend sends IOTLB UPDATEs and
//! INVALIDATEs one after the other, each waiting for its ack (QEMU blocks in
//! a read for it). A connection thread that sleeps in `recvmsg` between two
//! of them costs each message a wake-up on this side too: two wake-ups per
//! round trip instead of one. So after answering an IOTLB message the
//! connection thread polls its socket for a while before it blocks. It
//! does not `sched_yield` between looks: with QEMU's TCG vCPU threads
//! runnable on the same CPU, a yield gave the CPU away for a whole time
//! slice (a 50 us poll measured 2.6 ms under TCG); a thread woken meanwhile
//! (a queue worker, the frontend) preempts the poller anyway.
//!
//! The poll is adaptive, in the manner of KVM's halt polling: `budget`
//! starts at zero; a message that arrives after the budget but within the
//! bound (`max`) grows it to cover that gap (at least doubling it); one that
//! arrives later than the bound halves it, down to zero below
//! [`MIN_BUDGET`]. Only IOTLB messages arm it. So a connection whose IOTLB
//! messages come far apart (or never) does not poll at all, and one in the
//! middle of strict-mode churn polls at most `max` per message. It runs on
//! the connection's own thread only, never on the daemon's shared event loop.
//!
//! An UPDATE that answered a miss does not arm the poll: the queue it woke
//! needs the CPU now (on 2 vCPUs a spinning connection thread, the woken
//! worker, the frontend's miss answerer and its driver compete), and the
//! next message, the INVALIDATE after the request, waits for its I/O.
//!
//! A poll helps only when it sees the message arrive while it spins. When
//! the frontend shares the connection thread's CPU it does not: the
//! frontend runs only while the poller is off the CPU, so the message is
//! there at the poll's first look (the poller was preempted before it), or
//! the poll runs out, having kept the frontend (or the queue worker it
//! waits for) off the CPU. A poll that runs out says nothing of the
//! regime (on another CPU too, the frontend may take longer than the
//! budget, a request's I/O between two messages), so only polls that find
//! the message at their first look count against polling: after
//! [`UNHELPED_STREAK`] of them with no helped poll between, the thread goes
//! straight to its read. It probes (polls once) after [`PROBE_EVERY`]
//! messages, then twice as many after each probe that does not help, up to
//! [`MAX_PROBE_EVERY`]; a helped poll resumes polling every message. The
//! probes must be rare: on one CPU a probe that runs out costs its whole
//! budget, and one probe in 16 messages measured 0.2 round trips at the
//! median of IOTLB messages alone.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::registry::DeviceCounters;

/// The default bound (`--iotlb-poll-us`). The gap it must cover is the frontend's side of a
/// round trip: its wake-up from the ack, then its next message. On the 2-vCPU VMs of our
/// benches a wake-up alone takes 25-40 us, and with a bound of 50 us 8-18% of strict churn's
/// messages came after the poll had given up, each then paying the daemon's wake-up too; with
/// 100 us, 0-2% (BENCHMARKS.md, "the main-channel poll's bound"). KVM's halt polling, the model
/// of this poll, bounds its own at 200 us.
pub const DEFAULT_MAX: Duration = Duration::from_micros(100);

/// Budgets below this are zero (not worth a poll).
pub const MIN_BUDGET: Duration = Duration::from_micros(5);

/// Polls that found the message at their first look, with no helped poll
/// between, before the poll is skipped.
pub const UNHELPED_STREAK: u32 = 8;

/// While skipped, the first probe comes after this many messages.
pub const PROBE_EVERY: u32 = 16;

/// The longest interval between probes, in messages.
pub const MAX_PROBE_EVERY: u32 = 1024;

/// What one poll came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Poll {
    /// It saw the message arrive.
    Helped,
    /// The message was there at its first look.
    Early,
    /// The budget ran out first. Neutral: the frontend may take longer
    /// than the budget (a request's I/O between two messages) on another
    /// CPU as on this one.
    RanOut,
}

/// The poll state of one connection.
#[derive(Debug)]
pub struct MainPoll {
    max: Duration,
    budget: Duration,
    /// When the last IOTLB message was answered; `None` after any other
    /// message (the poll is disarmed).
    armed: Option<Instant>,
    /// Polls that found the message at their first look since the last
    /// helped one.
    unhelped: u32,
    /// Messages since the poll was skipped (counts to `probe_every`).
    skipped: u32,
    /// Messages between probes now.
    probe_every: u32,
    /// The message being handled must not arm the poll.
    disarm: bool,
}

impl MainPoll {
    /// A poll bounded by `max` per message (zero: never poll).
    pub fn new(max: Duration) -> MainPoll {
        MainPoll {
            max,
            budget: Duration::ZERO,
            armed: None,
            unhelped: 0,
            skipped: 0,
            probe_every: PROBE_EVERY,
            disarm: false,
        }
    }

    /// The budget now.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Before a blocking read of `fd`: when armed, polls it for at most the
    /// budget, counting the poll in `c`. Returns whether it became readable
    /// meanwhile.
    pub fn wait(&mut self, fd: BorrowedFd<'_>, c: &DeviceCounters) -> bool {
        let Some(since) = self.armed else {
            return false;
        };
        if self.budget.is_zero() {
            return false;
        }
        if self.unhelped >= UNHELPED_STREAK {
            self.skipped += 1;
            if self.skipped < self.probe_every {
                return false;
            }
            self.skipped = 0;
        }
        let start = Instant::now();
        let until = since + self.budget;
        let mut first = true;
        let got = loop {
            if crate::sys::readable(fd, Duration::ZERO) {
                self.outcome(if first { Poll::Early } else { Poll::Helped });
                break true;
            }
            first = false;
            if Instant::now() >= until {
                self.outcome(Poll::RanOut);
                break false;
            }
            std::hint::spin_loop();
        };
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        DeviceCounters::add(&c.iotlb_poll_us, us);
        let which = if got {
            &c.iotlb_poll_hits
        } else {
            &c.iotlb_poll_misses
        };
        DeviceCounters::add(which, 1);
        got
    }

    /// Counts what a poll came to.
    fn outcome(&mut self, poll: Poll) {
        if poll == Poll::Helped {
            self.unhelped = 0;
            self.probe_every = PROBE_EVERY;
            return;
        }
        if self.unhelped >= UNHELPED_STREAK {
            // A probe that did not help: the next one comes later.
            self.probe_every = (self.probe_every * 2).min(MAX_PROBE_EVERY);
        }
        if poll == Poll::Early {
            self.unhelped = self.unhelped.saturating_add(1);
        }
    }

    /// A message arrived at `now`: adapts the budget to the gap since the
    /// last IOTLB message was answered.
    pub fn arrived(&mut self, now: Instant) {
        let Some(since) = self.armed.take() else {
            return;
        };
        self.adapt(now.saturating_duration_since(since));
    }

    fn adapt(&mut self, gap: Duration) {
        if gap <= self.budget {
            return;
        }
        if gap <= self.max {
            let want = (self.budget * 2).max(gap + gap / 2).max(MIN_BUDGET);
            self.budget = want.min(self.max);
        } else {
            self.budget /= 2;
            if self.budget < MIN_BUDGET {
                self.budget = Duration::ZERO;
            }
        }
    }

    /// The message was answered at `now()` (read only when it arms the
    /// poll); `iotlb` says whether it was an IOTLB message (only those arm
    /// the poll).
    pub fn answered(&mut self, iotlb: bool, now: impl FnOnce() -> Instant) {
        let disarm = std::mem::take(&mut self.disarm);
        self.armed = (iotlb && !disarm && !self.max.is_zero()).then(now);
    }

    /// Whether the poll is armed (the next message's arrival adapts it).
    pub fn armed(&self) -> bool {
        self.armed.is_some()
    }

    /// The message being handled woke a queue (an UPDATE answering a
    /// miss): it does not arm the poll.
    pub fn disarm_next(&mut self) {
        self.disarm = true;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// Grows to cover gaps within the bound, never past it; shrinks to zero
    /// when messages come later than the bound; a bound of zero never polls.
    #[test]
    fn budget_adapts_between_zero_and_the_bound() {
        let mut p = MainPoll::new(50 * US);
        assert_eq!(p.budget(), Duration::ZERO);
        p.adapt(8 * US);
        assert_eq!(p.budget(), 12 * US);
        p.adapt(10 * US);
        assert_eq!(p.budget(), 12 * US, "a hit keeps it");
        p.adapt(30 * US);
        assert_eq!(p.budget(), 45 * US);
        p.adapt(48 * US);
        assert_eq!(p.budget(), 50 * US, "bounded");
        for _ in 0..4 {
            p.adapt(Duration::from_millis(5));
        }
        assert_eq!(p.budget(), Duration::ZERO, "idle: zero");
        p.disarm_next();
        p.answered(true, Instant::now);
        assert!(p.armed.is_none(), "an UPDATE that woke a queue");
        p.answered(true, Instant::now);
        assert!(p.armed.is_some(), "only that one");
        let mut off = MainPoll::new(Duration::ZERO);
        off.answered(true, Instant::now);
        assert!(off.armed.is_none());
        off.adapt(US);
        assert_eq!(off.budget(), Duration::ZERO);
    }

    /// Only an answered IOTLB message arms the poll; the poll sees a
    /// message sent while it runs, and gives up after its budget.
    #[test]
    fn poll_sees_a_message_within_its_budget() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut p = MainPoll::new(Duration::from_millis(40));
        p.adapt(Duration::from_millis(20));
        assert_eq!(p.budget(), Duration::from_millis(30));
        let c = DeviceCounters::default();
        p.answered(false, Instant::now);
        assert!(!p.wait(a.as_fd(), &c), "not armed after another message");
        p.answered(true, Instant::now);
        let t = Instant::now();
        assert!(!p.wait(a.as_fd(), &c));
        assert!(t.elapsed() >= Duration::from_millis(29));
        let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n(&c.iotlb_poll_us) >= 29_000);
        // A budget of seconds, so that a loaded machine that is slow to
        // run the writer still writes within it.
        let mut p = MainPoll::new(Duration::from_secs(8));
        p.adapt(Duration::from_secs(4));
        p.answered(true, Instant::now);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            b.write_all(&[1]).unwrap();
            b
        });
        let t = Instant::now();
        assert!(p.wait(a.as_fd(), &c));
        assert!(t.elapsed() < Duration::from_secs(6), "woke when written");
        let _b = writer.join().unwrap();
        assert_eq!((n(&c.iotlb_poll_hits), n(&c.iotlb_poll_misses)), (1, 1));
    }

    /// Polls that do not help (the message there at the first look, or
    /// not found) stop the poll, with probes further
    /// and further apart; a poll that saw the message arrive resumes it.
    #[test]
    fn unhelped_polls_stop_the_poll_until_one_helps() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let c = DeviceCounters::default();
        let mut p = MainPoll::new(Duration::from_millis(40));
        p.adapt(Duration::from_millis(20));
        // Never read: every look finds it at once.
        b.write_all(&[1]).unwrap();
        let hits =
            |c: &DeviceCounters| c.iotlb_poll_hits.load(std::sync::atomic::Ordering::Relaxed);
        for _ in 2..UNHELPED_STREAK {
            p.answered(true, Instant::now);
            assert!(p.wait(a.as_fd(), &c));
        }
        p.outcome(Poll::RanOut);
        assert_eq!(p.unhelped, UNHELPED_STREAK - 2, "running out is neutral");
        p.outcome(Poll::Early);
        p.outcome(Poll::Early);
        assert_eq!(p.unhelped, UNHELPED_STREAK);
        let before = hits(&c);
        for _ in 1..PROBE_EVERY {
            p.answered(true, Instant::now);
            assert!(!p.wait(a.as_fd(), &c), "skipped");
        }
        assert_eq!(hits(&c), before);
        p.answered(true, Instant::now);
        assert!(p.wait(a.as_fd(), &c), "the probe looks");
        assert_eq!(hits(&c), before + 1);
        assert_eq!(p.unhelped, UNHELPED_STREAK + 1, "and did not help");
        // The next probe comes twice as late, and so on up to the cap.
        for _ in 1..2 * PROBE_EVERY {
            p.answered(true, Instant::now);
            assert!(!p.wait(a.as_fd(), &c), "skipped");
        }
        p.answered(true, Instant::now);
        assert!(p.wait(a.as_fd(), &c), "the second probe");
        assert_eq!(hits(&c), before + 2);
        for _ in 0..16 {
            p.outcome(Poll::RanOut);
        }
        assert_eq!(p.probe_every, MAX_PROBE_EVERY);
        p.outcome(Poll::Helped);
        assert_eq!(p.probe_every, PROBE_EVERY);
        assert_eq!(p.unhelped, 0, "a poll that saw the message arrive");
        p.answered(true, Instant::now);
        assert!(p.wait(a.as_fd(), &c), "polls again");
        assert_eq!(hits(&c), before + 3);
    }
}
