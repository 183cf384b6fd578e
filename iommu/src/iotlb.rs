//! The second way in: an IOTLB cache of a remote IOMMU (vhost-user's
//! `VHOST_USER_IOTLB_MSG`).
//!
//! Rules differ from iommufd's: an UPDATE replaces whatever it overlaps
//! (the overlapped parts of older entries go, the rest of them stays), an
//! INVALIDATE removes every entry it overlaps, whole, and a lookup that
//! finds nothing is a miss to report ([`crate::Fault::Unmapped`]), not an
//! error. Ends are computed without overflow: an invalidation reaching past
//! 2^64 - 1 stops there. Both cost O(log n + entries touched).

use std::sync::Arc;

use vm_memory::Permissions;

use crate::errno::Errno;
use crate::mem::MemObject;
use crate::space::AddressSpace;
use crate::tree::Extent;

/// Errors of IOTLB updates.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IotlbError {
    /// Size 0, or a range that wraps past 2^64 - 1.
    #[error("IOTLB range {iova:#x}+{size:#x} is empty or wraps")]
    BadRange {
        /// Start.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// The target lies outside the memory object.
    #[error("IOTLB target {offset:#x}+{size:#x} is outside its memory")]
    OutsideMemory {
        /// Offset in the memory object.
        offset: u64,
        /// Size.
        size: u64,
    },
    /// An UPDATE with no access allowed.
    #[error("IOTLB update without permissions")]
    NoPermission,
}

impl IotlbError {
    /// The errno for this error.
    pub fn errno(&self) -> Errno {
        match self {
            IotlbError::BadRange { .. } | IotlbError::NoPermission => Errno::EINVAL,
            IotlbError::OutsideMemory { .. } => Errno::EFAULT,
        }
    }
}

impl AddressSpace {
    /// IOTLB UPDATE: `iova..iova+size` maps to `mem[offset..]` with `perm`,
    /// replacing whatever it overlaps. Returns after the grace period if it
    /// replaced anything.
    pub fn iotlb_update(
        &self,
        iova: u64,
        size: u64,
        mem: &Arc<MemObject>,
        offset: u64,
        perm: Permissions,
    ) -> Result<(), IotlbError> {
        let last = size
            .checked_sub(1)
            .and_then(|s| iova.checked_add(s))
            .ok_or(IotlbError::BadRange { iova, size })?;
        if perm == Permissions::No {
            return Err(IotlbError::NoPermission);
        }
        if !mem.contains(offset, size) {
            return Err(IotlbError::OutsideMemory { offset, size });
        }
        self.edit(|txn| {
            for old in txn.tree().overlapping(iova, last) {
                txn.remove(old.start);
                if old.start < iova {
                    txn.insert(old.slice(old.start, iova - 1));
                }
                if old.last > last {
                    txn.insert(old.slice(last + 1, old.last));
                }
            }
            txn.insert(Extent::new(iova, last, perm, mem.clone(), offset));
            Ok(())
        })
    }

    /// IOTLB INVALIDATE: removes every entry overlapping `iova..iova+size`
    /// (the end saturates at 2^64 - 1). Returns the number removed, after
    /// the grace period: no reader uses them any more.
    pub fn iotlb_invalidate(&self, iova: u64, size: u64) -> usize {
        let Some(len_m1) = size.checked_sub(1) else {
            return 0;
        };
        let last = iova.saturating_add(len_m1);
        self.edit(|txn| {
            let old = txn.tree().overlapping(iova, last);
            for e in &old {
                txn.remove(e.start);
            }
            Ok::<_, IotlbError>(old.len())
        })
        .unwrap_or(0)
    }

    /// Drops every entry (memory table change, device stop, disconnect).
    pub fn iotlb_clear(&self) -> usize {
        self.edit(|txn| Ok::<_, IotlbError>(txn.clear()))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Fault;
    use proptest::prelude::*;

    const UNIT: u64 = 16;

    fn mem() -> Arc<MemObject> {
        Arc::new(MemObject::anonymous(1 << 16).unwrap())
    }

    #[test]
    fn update_replaces_only_the_overlap() {
        let m = mem();
        let s = AddressSpace::new();
        s.iotlb_update(0x1000, 0x3000, &m, 0, Permissions::ReadWrite)
            .unwrap();
        s.iotlb_update(0x2000, 0x1000, &m, 0x8000, Permissions::Read)
            .unwrap();
        let exts = s.with_tree(|t| t.overlapping(0, u64::MAX));
        let got: Vec<_> = exts.iter().map(|e| (e.start, e.last, e.offset)).collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 0x1fff, 0),
                (0x2000, 0x2fff, 0x8000),
                (0x3000, 0x3fff, 0x2000)
            ]
        );
    }

    #[test]
    fn invalidate_removes_whole_overlapping_entries() {
        let m = mem();
        let s = AddressSpace::new();
        s.iotlb_update(0x1000, 0x2000, &m, 0, Permissions::ReadWrite)
            .unwrap();
        s.iotlb_update(0x5000, 0x1000, &m, 0, Permissions::ReadWrite)
            .unwrap();
        assert_eq!(s.iotlb_invalidate(0x2fff, 1), 1);
        assert!(s.with_tree(|t| t.find(0x1000).is_none()));
        assert_eq!(s.with_tree(|t| t.len()), 1);
    }

    #[test]
    fn invalidate_huge_range_does_not_overflow() {
        let m = mem();
        let s = AddressSpace::new();
        s.iotlb_update(u64::MAX - 0xfff, 0x1000, &m, 0, Permissions::ReadWrite)
            .unwrap();
        s.iotlb_update(0, 0x1000, &m, 0, Permissions::ReadWrite)
            .unwrap();
        assert_eq!(s.iotlb_invalidate(u64::MAX - (1 << 47) + 1, 1 << 47), 1);
        assert_eq!(s.iotlb_invalidate(1 << 47, 1 << 47), 0);
        assert_eq!(s.with_tree(|t| t.len()), 1);
    }

    #[test]
    fn update_wrapping_or_empty_is_refused() {
        let m = mem();
        let s = AddressSpace::new();
        let e = s
            .iotlb_update(u64::MAX, 2, &m, 0, Permissions::Read)
            .unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        assert!(s.iotlb_update(0, 0, &m, 0, Permissions::Read).is_err());
        assert!(s.iotlb_update(0, 16, &m, 0, Permissions::No).is_err());
        let e = s
            .iotlb_update(0, 1 << 20, &m, 0, Permissions::Read)
            .unwrap_err();
        assert_eq!(e.errno(), Errno::EFAULT);
    }

    #[test]
    fn lookup_of_nothing_is_a_miss() {
        let s = AddressSpace::new();
        let mut r = s.reader();
        let sess = r.enter();
        assert_eq!(
            sess.translate(0x1000, 8, Permissions::Read),
            Err(Fault::Unmapped { iova: 0x1000 })
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Update(u64, u64, u64, bool),
        Invalidate(u64, u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..64, 1u64..8, 0u64..32, any::<bool>()).prop_map(|(a, l, o, w)| Op::Update(a, l, o, w)),
            3 => (0u64..70, 0u64..10).prop_map(|(a, l)| Op::Invalidate(a, l)),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        #![proptest_config(crate::test_util::proptest_config(ProptestConfig::default().cases))]
        /// Reference model: one entry per IOVA unit (id of the UPDATE that
        /// set it, its target, its permission); an invalidate removes all
        /// units of every entry (UPDATE id) it overlaps.
        #[test]
        fn matches_unit_model(ops in prop::collection::vec(op(), 1..80)) {
            let m = mem();
            let s = AddressSpace::new();
            let mut r = s.reader();
            // unit -> (entry id, target offset, writable)
            let mut model: Vec<Option<(usize, u64, bool)>> = vec![None; 80];
            let mut next_id = 1000;
            for (id, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Update(a, l, o, w) => {
                        let perm = if w { Permissions::ReadWrite } else { Permissions::Read };
                        // An entry split by this update leaves a head and a
                        // tail: two entries from now on.
                        let end = (a + l) as usize;
                        let mut split = std::collections::BTreeMap::new();
                        for u in (a as usize..end).filter_map(|u| model[u].map(|x| x.0)) {
                            split.entry(u).or_insert_with(|| { next_id += 1; next_id });
                        }
                        for slot in model[end..].iter_mut().flatten() {
                            if let Some(n) = split.get(&slot.0) {
                                slot.0 = *n;
                            }
                        }
                        s.iotlb_update(a * UNIT, l * UNIT, &m, o * UNIT, perm).unwrap();
                        for (i, u) in (a..a + l).enumerate() {
                            model[u as usize] = Some((id, (o + i as u64) * UNIT, w));
                        }
                    }
                    Op::Invalidate(a, l) => {
                        let n = s.iotlb_invalidate(a * UNIT, l * UNIT);
                        let hit: std::collections::BTreeSet<usize> = (a..(a + l).min(80))
                            .filter_map(|u| model[u as usize].map(|x| x.0)).collect();
                        for slot in model.iter_mut() {
                            if slot.is_some_and(|x| hit.contains(&x.0)) {
                                *slot = None;
                            }
                        }
                        // Entries are pieces of updates: at least one per id hit.
                        prop_assert!(n >= hit.len());
                    }
                    Op::Clear => {
                        s.iotlb_clear();
                        model.iter_mut().for_each(|x| *x = None);
                    }
                }
                let sess = r.enter();
                for (u, want) in model.iter().enumerate() {
                    let iova = u as u64 * UNIT + 3;
                    let got = sess.translate(iova, 1, Permissions::Read);
                    match want {
                        None => prop_assert_eq!(got, Err(Fault::Unmapped { iova })),
                        Some((_, off, w)) => {
                            let host = got.unwrap()[0].ptr as usize;
                            prop_assert_eq!(host, m.host_base() as usize + *off as usize + 3);
                            let wr = sess.translate(iova, 1, Permissions::Write);
                            prop_assert_eq!(wr.is_ok(), *w);
                        }
                    }
                }
            }
        }
    }
}
