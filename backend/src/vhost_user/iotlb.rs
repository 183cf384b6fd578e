//! The vIOMMU side of vhost-user: the 32-byte `vhost_iotlb_msg`, the
//! pending-miss table and the per-device IOTLB counters.
//!
//! # The miss flow (DESIGN.md, "What QEMU 10.0 sends ...")
//!
//! A queue worker whose request faults on an IOVA leaves its session (it is
//! then quiescent: an invalidation never waits for it), joins the pending
//! miss of that page and access in [`MissTable`] (creating it, and then
//! sending it on the backend channel, when none is pending), and waits on
//! its own epoll for one of:
//!
//! - an UPDATE covering the page (the connection thread marks the miss
//!   *updated* before it acks the UPDATE): the request is retried;
//! - the frontend's ack of the miss without such an UPDATE (QEMU's answer
//!   for an IOVA the guest did not map): the request fails with IOERR at
//!   once;
//! - the timeout: the request fails with IOERR;
//! - a stop of the queue: the wait is abandoned, the request stays on the
//!   avail ring.
//!
//! Misses of the same page and access are sent once: later faults join the
//! pending one. Nothing is ever asked speculatively: a miss names the exact
//! IOVA and access that faulted.
//!
//! # Locks
//!
//! `MissTable::pending` is taken alone, or before a [`Miss`]'s `state`; no
//! other lock is held with them. Neither is held while sending or waiting.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vcdev_iommu::Permissions;
use vhost::{VhostAccess, VhostIotlbType};
use vmm_sys_util::eventfd::EventFd;

use crate::registry::DeviceCounters;
use vcdev_iommu::sync::lock;

/// Bytes of a `struct vhost_iotlb_msg` on the wire.
pub const IOTLB_MSG_LEN: usize = std::mem::size_of::<IotlbMsg>();

/// The page size IOTLB entries come in (QEMU sends one 4 KiB page per
/// UPDATE); misses are deduplicated per page.
pub const IOTLB_PAGE_SIZE: u64 = 4096;

/// `struct vhost_iotlb_msg` (linux/vhost_types.h): iova, size, uaddr,
/// perm, type and 6 bytes of padding, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbMsg {
    /// I/O virtual address.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// The frontend's user address (UPDATE).
    pub uaddr: u64,
    /// `VHOST_ACCESS_*`.
    pub perm: u8,
    /// `VHOST_IOTLB_*`.
    pub kind: u8,
    /// Padding.
    pub padding: [u8; 6],
}

const _: () = assert!(IOTLB_MSG_LEN == 32);

impl IotlbMsg {
    /// A MISS for `iova` and `access`.
    pub fn miss(iova: u64, access: Permissions) -> IotlbMsg {
        IotlbMsg {
            iova,
            perm: perm_to_vhost(access) as u8,
            kind: VhostIotlbType::Miss as u8,
            ..IotlbMsg::default()
        }
    }

    /// Decodes exactly [`IOTLB_MSG_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Option<IotlbMsg> {
        let b: &[u8; IOTLB_MSG_LEN] = b.try_into().ok()?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let mut padding = [0u8; 6];
        padding.copy_from_slice(&b[26..32]);
        Some(IotlbMsg {
            iova: word(0),
            size: word(8),
            uaddr: word(16),
            perm: b[24],
            kind: b[25],
            padding,
        })
    }

    /// Encodes the message.
    pub fn encode(&self) -> [u8; IOTLB_MSG_LEN] {
        let mut b = [0u8; IOTLB_MSG_LEN];
        b[0..8].copy_from_slice(&self.iova.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.uaddr.to_le_bytes());
        b[24] = self.perm;
        b[25] = self.kind;
        b[26..32].copy_from_slice(&self.padding);
        b
    }
}

/// `VHOST_ACCESS_*` of a permission.
pub fn perm_to_vhost(p: Permissions) -> VhostAccess {
    match p {
        Permissions::No => VhostAccess::No,
        Permissions::Read => VhostAccess::ReadOnly,
        Permissions::Write => VhostAccess::WriteOnly,
        Permissions::ReadWrite => VhostAccess::ReadWrite,
    }
}

/// The permission of a `VHOST_ACCESS_*` byte; `None` for none or unknown.
pub fn perm_from_vhost(p: u8) -> Option<Permissions> {
    const RO: u8 = VhostAccess::ReadOnly as u8;
    const WO: u8 = VhostAccess::WriteOnly as u8;
    const RW: u8 = VhostAccess::ReadWrite as u8;
    match p {
        RO => Some(Permissions::Read),
        WO => Some(Permissions::Write),
        RW => Some(Permissions::ReadWrite),
        _ => None,
    }
}

/// Whether `have` allows every access in `want`.
pub fn allows(have: Permissions, want: Permissions) -> bool {
    (have as u8) & (want as u8) == want as u8
}

/// Records one wait for a miss answer in the device's counters.
pub fn record_wait(c: &DeviceCounters, waited: std::time::Duration) {
    let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
    DeviceCounters::add(&c.iotlb_miss_wait_us, us);
    c.iotlb_miss_wait_max_us.fetch_max(us, Ordering::Relaxed);
}

/// Records one INVALIDATE that took `took` to take effect in the device's
/// counters.
pub fn record_invalidate(c: &DeviceCounters, took: std::time::Duration) {
    let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    DeviceCounters::add(&c.iotlb_invalidates, 1);
    DeviceCounters::add(&c.iotlb_invalidate_ns, ns);
    c.iotlb_invalidate_max_ns.fetch_max(ns, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------
// Pending misses

/// What became of a miss so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MissState {
    /// An UPDATE covering the page with the access arrived.
    pub updated: bool,
    /// The frontend's ack (true: success code), if it came.
    pub acked: Option<bool>,
    /// The miss could not be sent (no or broken backend channel).
    pub unsent: bool,
}

impl MissState {
    /// Whether the waiters can stop waiting.
    pub fn done(&self) -> bool {
        self.updated || self.acked.is_some() || self.unsent
    }
}

/// One miss sent (or about to be) to the frontend.
#[derive(Debug)]
pub struct Miss {
    /// The IOVA that faulted (sent as is).
    pub iova: u64,
    /// Its page.
    pub page: u64,
    /// The access asked for.
    pub access: Permissions,
    state: Mutex<(MissState, Vec<Arc<EventFd>>)>,
}

impl Miss {
    fn new(iova: u64, access: Permissions) -> Miss {
        Miss {
            iova,
            page: iova & !(IOTLB_PAGE_SIZE - 1),
            access,
            state: Mutex::new((MissState::default(), Vec::new())),
        }
    }

    /// The state now.
    pub fn state(&self) -> MissState {
        lock(&self.state).0
    }

    fn change(&self, f: impl FnOnce(&mut MissState)) {
        let mut g = lock(&self.state);
        f(&mut g.0);
        for w in &g.1 {
            // A full counter still wakes the waiter: ignore the error.
            let _ = w.write(1);
        }
    }

    /// The frontend acked the miss (`ok`: a zero reply).
    pub fn acked(&self, ok: bool) {
        self.change(|s| s.acked = Some(ok));
    }

    /// The miss could not be sent.
    pub fn unsent(&self) {
        self.change(|s| s.unsent = true);
    }

    fn join(&self, wake: &Arc<EventFd>) {
        lock(&self.state).1.push(wake.clone());
    }

    fn leave(&self, wake: &Arc<EventFd>) -> bool {
        let mut g = lock(&self.state);
        g.1.retain(|w| !Arc::ptr_eq(w, wake));
        g.1.is_empty()
    }
}

/// The misses of one connection waiting for an answer. At most one per
/// waiting queue, so a linear scan is the right data structure.
#[derive(Debug, Default)]
pub struct MissTable {
    pending: Mutex<Vec<Arc<Miss>>>,
}

impl MissTable {
    /// Joins the pending miss for `iova`'s page and `access`, or creates
    /// one. Returns the miss and whether the caller must send it.
    pub fn join(&self, iova: u64, access: Permissions, wake: &Arc<EventFd>) -> (Arc<Miss>, bool) {
        let mut p = lock(&self.pending);
        let page = iova & !(IOTLB_PAGE_SIZE - 1);
        if let Some(m) = p
            .iter()
            .find(|m| m.page == page && m.access == access && !m.state().done())
        {
            m.join(wake);
            return (m.clone(), false);
        }
        let m = Arc::new(Miss::new(iova, access));
        m.join(wake);
        p.push(m.clone());
        (m, true)
    }

    /// A waiter gives up (stop or timeout); the miss is forgotten when it
    /// was the last one, so that the next fault asks again.
    pub fn leave(&self, miss: &Arc<Miss>, wake: &Arc<EventFd>) {
        let mut p = lock(&self.pending);
        if miss.leave(wake) || miss.state().done() {
            p.retain(|m| !Arc::ptr_eq(m, miss));
        }
    }

    /// An UPDATE of `iova..iova+size` with `perm` was applied: every
    /// pending miss it answers is marked updated, its waiters woken.
    /// Returns whether it answered any.
    pub fn updated(&self, iova: u64, size: u64, perm: Permissions) -> bool {
        let Some(last) = size.checked_sub(1).map(|s| iova.saturating_add(s)) else {
            return false;
        };
        let mut p = lock(&self.pending);
        let before = p.len();
        p.retain(|m| {
            let covered = m.iova >= iova && m.iova <= last && allows(perm, m.access);
            if covered {
                m.change(|s| s.updated = true);
            }
            !covered
        });
        p.len() != before
    }

    /// Forgets a miss that is answered (its waiters saw the state).
    pub fn remove(&self, miss: &Arc<Miss>) {
        lock(&self.pending).retain(|m| !Arc::ptr_eq(m, miss));
    }

    /// Number of misses pending.
    pub fn len(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip_and_layout() {
        let m = IotlbMsg {
            iova: 0x1122_3344_5566_7788,
            size: 0x1000,
            uaddr: 0x7f00_0000_1000,
            perm: VhostAccess::ReadWrite as u8,
            kind: VhostIotlbType::Update as u8,
            padding: [0; 6],
        };
        let b = m.encode();
        assert_eq!(b.len(), 32);
        assert_eq!(b[0], 0x88);
        assert_eq!((b[24], b[25]), (3, 2));
        assert_eq!(IotlbMsg::decode(&b), Some(m));
        assert_eq!(IotlbMsg::decode(&b[..31]), None);
        let miss = IotlbMsg::miss(0x5000, Permissions::Write);
        assert_eq!((miss.perm, miss.kind, miss.size), (2, 1, 0));
    }

    #[test]
    fn permissions_map_both_ways() {
        for p in [
            Permissions::Read,
            Permissions::Write,
            Permissions::ReadWrite,
        ] {
            assert_eq!(perm_from_vhost(perm_to_vhost(p) as u8), Some(p));
        }
        assert_eq!(perm_from_vhost(0), None);
        assert_eq!(perm_from_vhost(7), None);
        assert!(allows(Permissions::ReadWrite, Permissions::Write));
        assert!(!allows(Permissions::Read, Permissions::Write));
    }

    #[test]
    fn same_page_and_access_is_joined_and_update_wakes_all() {
        let t = MissTable::default();
        let a = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let b = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (m1, send1) = t.join(0x10010, Permissions::Read, &a);
        let (m2, send2) = t.join(0x10ff0, Permissions::Read, &b);
        let (m3, send3) = t.join(0x10ff0, Permissions::Write, &b);
        assert!(send1 && !send2 && send3);
        assert!(Arc::ptr_eq(&m1, &m2));
        assert_eq!(t.len(), 2);
        // A read-only update answers the read miss only.
        assert!(t.updated(0x10000, 0x1000, Permissions::Read));
        assert!(!t.updated(0x20000, 0x1000, Permissions::ReadWrite));
        assert!(m1.state().updated && !m3.state().done());
        assert_eq!(a.read().unwrap(), 1);
        assert_eq!(b.read().unwrap(), 1);
        t.leave(&m3, &b);
        assert!(t.is_empty());
        // An answered miss is not joined: the next fault asks again.
        let (_, again) = t.join(0x10010, Permissions::Read, &a);
        assert!(again);
    }
}
