//! The extent store: a persistent (copy-on-write) B+ tree of
//! non-overlapping extents keyed by their first IOVA.
//!
//! The writer mutates its own [`Tree`] in place; nodes shared with a
//! published snapshot are copied on first write ([`unique`]), so an
//! update costs O(log n) node copies and readers keep walking the snapshot
//! they loaded. Deletion does not rebalance: empty nodes are removed and a
//! root with one child is collapsed, which keeps lookups O(log n) in the
//! largest size the tree ever had.

use std::sync::Arc;

use arrayvec::ArrayVec;
use vm_memory::Permissions;

use crate::mem::MemObject;

/// Extents per leaf before it splits.
const LEAF_CAP: usize = 16;
/// Children per inner node before it splits.
const INNER_CAP: usize = 32;

/// One mapping: IOVAs `start..=last` map to `mem` at `offset`.
#[derive(Clone, Debug)]
pub struct Extent {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
    /// What accesses are allowed.
    pub perm: Permissions,
    /// Host address of `start` (`mem.host_base() + offset`), cached.
    pub(crate) host: usize,
    /// The memory the extent points into.
    pub mem: Arc<MemObject>,
    /// Offset of `start` in `mem`.
    pub offset: u64,
}

impl Extent {
    /// An extent of `mem[offset..offset + last - start + 1]`; the caller has
    /// checked that this range lies inside `mem`.
    pub fn new(start: u64, last: u64, perm: Permissions, mem: Arc<MemObject>, offset: u64) -> Self {
        let host = (mem.host_base() as usize).wrapping_add(offset as usize);
        Extent {
            start,
            last,
            perm,
            host,
            mem,
            offset,
        }
    }

    /// Bytes covered; `None` for the whole 2^64 space.
    pub fn len(&self) -> Option<u64> {
        (self.last - self.start).checked_add(1)
    }

    /// Never empty: `last >= start` always.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The part `start..=last` of this extent (within it), same target.
    pub fn slice(&self, start: u64, last: u64) -> Extent {
        debug_assert!(self.start <= start && start <= last && last <= self.last);
        Extent::new(
            start,
            last,
            self.perm,
            self.mem.clone(),
            self.offset + (start - self.start),
        )
    }

    /// Host address of `iova`, which lies in the extent.
    #[inline]
    pub(crate) fn host_of(&self, iova: u64) -> usize {
        self.host.wrapping_add((iova - self.start) as usize)
    }
}

/// Slots per leaf and per inner node: one more than the cap, the overflow
/// before a split.
const LEAF_SLOTS: usize = LEAF_CAP + 1;
const INNER_SLOTS: usize = INNER_CAP + 1;

// Nodes only ever live behind an Arc, and keeping a leaf's arrays inline
// (one allocation per node) is what makes lookups cache-friendly.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub(crate) enum Node {
    Leaf(Leaf),
    Inner(Inner),
}

/// Extents sorted by start, their starts also kept inline apart so that a
/// lookup's binary search touches few cache lines.
#[derive(Clone, Debug, Default)]
pub(crate) struct Leaf {
    starts: ArrayVec<u64, LEAF_SLOTS>,
    exts: ArrayVec<Extent, LEAF_SLOTS>,
}

/// `keys[i]` is exactly the smallest start in `kids[i]`. Exactness matters:
/// routing an IOVA to the child with the greatest key `<=` it then always
/// lands in the child holding the extent with the greatest start `<=` it,
/// so one descent finds the containing extent.
#[derive(Clone, Debug)]
pub(crate) struct Inner {
    keys: ArrayVec<u64, INNER_SLOTS>,
    kids: ArrayVec<Arc<Node>, INNER_SLOTS>,
}

#[inline]
fn child_index(keys: &[u64], key: u64) -> usize {
    keys.partition_point(|k| *k <= key).saturating_sub(1)
}

impl Node {
    fn empty() -> Node {
        Node::Leaf(Leaf::default())
    }

    /// The extent containing `iova`.
    #[inline]
    pub(crate) fn find(&self, iova: u64) -> Option<&Extent> {
        let mut node = self;
        loop {
            match node {
                Node::Inner(n) => {
                    let i = child_index(&n.keys, iova);
                    node = n.kids.get(i)?;
                }
                Node::Leaf(l) => {
                    let i = l.starts.partition_point(|s| *s <= iova);
                    let e = l.exts.get(i.checked_sub(1)?)?;
                    return (iova <= e.last).then_some(e);
                }
            }
        }
    }

    /// The first extent with `last >= iova` (the one containing `iova`, or
    /// the next one above it).
    fn first_from(&self, iova: u64) -> Option<&Extent> {
        let mut out = None;
        self.visit_from(iova, &mut |e| {
            out = Some(e);
            false
        });
        out
    }

    /// Calls `f` on every extent with `last >= from`, in order, until it
    /// returns false. Returns false if stopped.
    fn visit_from<'a>(&'a self, from: u64, f: &mut dyn FnMut(&'a Extent) -> bool) -> bool {
        match self {
            Node::Leaf(l) => {
                let i = l.exts.partition_point(|e| e.last < from);
                l.exts[i..].iter().all(f)
            }
            Node::Inner(n) => {
                let i = child_index(&n.keys, from);
                n.kids[i..].iter().all(|k| k.visit_from(from, f))
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Node::Leaf(l) => l.exts.is_empty(),
            Node::Inner(n) => n.kids.is_empty(),
        }
    }

    fn first_key(&self) -> u64 {
        match self {
            Node::Leaf(l) => l.starts.first().copied().unwrap_or(0),
            Node::Inner(n) => n.keys.first().copied().unwrap_or(0),
        }
    }

    fn depth(&self) -> usize {
        match self {
            Node::Leaf(_) => 1,
            Node::Inner(n) => 1 + n.kids.first().map_or(0, |k| k.depth()),
        }
    }

    /// An empty node of the same kind.
    #[inline(always)]
    fn empty_like(&self) -> Node {
        match self {
            Node::Leaf(_) => Node::Leaf(Leaf::default()),
            Node::Inner(_) => Node::Inner(Inner {
                keys: ArrayVec::new(),
                kids: ArrayVec::new(),
            }),
        }
    }

    /// A copy of this node in an allocation of its own, its entries copied
    /// into place. (The derived `clone` behind `Arc::make_mut` moved the
    /// whole node, up to [`LEAF_SLOTS`] extents, through the stack five times:
    /// more than the copy of its entries and the copy-on-write's
    /// allocation together.)
    fn copy(&self) -> Arc<Node> {
        let mut fresh = Arc::<Node>::new_uninit();
        // A new Arc is unique: not reached.
        let Some(slot) = Arc::get_mut(&mut fresh) else {
            return Arc::new(self.clone());
        };
        // Written in place: only the kind and the lengths (moving a whole
        // empty node in, as `Arc::new` does, copied its unused slots too).
        match (slot.write(self.empty_like()), self) {
            (Node::Leaf(to), Node::Leaf(from)) => {
                to.starts.extend(from.starts.iter().copied());
                to.exts.extend(from.exts.iter().cloned());
            }
            (Node::Inner(to), Node::Inner(from)) => {
                to.keys.extend(from.keys.iter().copied());
                to.kids.extend(from.kids.iter().cloned());
            }
            // `empty_like` is of `self`'s kind.
            _ => {}
        }
        // SAFETY: `slot`, the Arc's only value, was initialised by the
        // `write` above.
        unsafe { fresh.assume_init() }
    }
}

/// `node` to write: copied first when a published snapshot (or a saved
/// tree) shares it.
fn unique(node: &mut Arc<Node>) -> &mut Node {
    if Arc::get_mut(node).is_none() {
        *node = node.copy();
    }
    // Unique now: no copy.
    Arc::make_mut(node)
}

/// Where a node of `len` entries (one over its cap), whose entry `at` was
/// just inserted, splits: in the middle, or, when the entry went to the
/// end, just before it. IOVAs are mostly mapped in increasing order (a
/// guest's memory, page by page), and a split in the middle would leave
/// every node of such a run half full, the tree twice as large as it needs
/// to be and its lookups the slower for it.
fn split_point(at: usize, len: usize) -> usize {
    if at + 1 == len {
        at
    } else {
        len / 2
    }
}

/// Moves the entries of `v` from `at` on out into a new ArrayVec.
fn split_off<T, const N: usize>(v: &mut ArrayVec<T, N>, at: usize) -> ArrayVec<T, N> {
    v.drain(at..).collect()
}

fn insert_rec(node: &mut Arc<Node>, e: Extent) -> Option<(u64, Arc<Node>)> {
    match unique(node) {
        Node::Leaf(l) => {
            let i = l.starts.partition_point(|s| *s < e.start);
            l.starts.insert(i, e.start);
            l.exts.insert(i, e);
            if l.exts.len() > LEAF_CAP {
                let at = split_point(i, l.exts.len());
                let right = Leaf {
                    starts: split_off(&mut l.starts, at),
                    exts: split_off(&mut l.exts, at),
                };
                return Some((right.starts[0], Arc::new(Node::Leaf(right))));
            }
            None
        }
        Node::Inner(n) => {
            let i = child_index(&n.keys, e.start);
            let split = insert_rec(&mut n.kids[i], e);
            n.keys[i] = n.kids[i].first_key();
            let (key, sib) = split?;
            n.keys.insert(i + 1, key);
            n.kids.insert(i + 1, sib);
            if n.kids.len() > INNER_CAP {
                let at = split_point(i + 1, n.kids.len());
                let right = Inner {
                    keys: split_off(&mut n.keys, at),
                    kids: split_off(&mut n.kids, at),
                };
                return Some((right.keys[0], Arc::new(Node::Inner(right))));
            }
            None
        }
    }
}

/// Removes the extent starting exactly at `start`, which exists.
fn remove_rec(node: &mut Arc<Node>, start: u64) -> Option<Extent> {
    match unique(node) {
        Node::Leaf(l) => {
            let i = l.starts.binary_search(&start).ok()?;
            l.starts.remove(i);
            Some(l.exts.remove(i))
        }
        Node::Inner(n) => {
            let i = child_index(&n.keys, start);
            let e = remove_rec(&mut n.kids[i], start)?;
            if n.kids[i].is_empty() {
                n.kids.remove(i);
                n.keys.remove(i);
            } else {
                n.keys[i] = n.kids[i].first_key();
            }
            Some(e)
        }
    }
}

/// A set of non-overlapping extents, cheap to clone (shares all nodes).
#[derive(Clone, Debug)]
pub struct Tree {
    pub(crate) root: Arc<Node>,
    len: usize,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            root: Arc::new(Node::empty()),
            len: 0,
        }
    }
}

impl Tree {
    /// Number of extents.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tree holds no extent.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Height of the tree (1 for a single leaf).
    pub fn depth(&self) -> usize {
        self.root.depth()
    }

    /// The extent containing `iova`.
    pub fn find(&self, iova: u64) -> Option<&Extent> {
        self.root.find(iova)
    }

    /// The extent containing `iova` or, failing that, the first one above it.
    pub fn first_from(&self, iova: u64) -> Option<&Extent> {
        self.root.first_from(iova)
    }

    /// The extents that overlap `first..=last`, in order.
    pub fn overlapping(&self, first: u64, last: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        self.root.visit_from(first, &mut |e| {
            if e.start > last {
                return false;
            }
            out.push(e.clone());
            true
        });
        out
    }

    /// Whether any extent overlaps `first..=last`.
    pub fn any_overlap(&self, first: u64, last: u64) -> bool {
        self.first_from(first).is_some_and(|e| e.start <= last)
    }

    /// Calls `f` on every extent in order.
    pub fn for_each<'a>(&'a self, mut f: impl FnMut(&'a Extent)) {
        self.root.visit_from(0, &mut |e| {
            f(e);
            true
        });
    }

    /// Inserts `e`, which must not overlap any extent (the caller checks).
    pub fn insert(&mut self, e: Extent) {
        debug_assert!(!self.any_overlap(e.start, e.last));
        if let Some((key, sib)) = insert_rec(&mut self.root, e) {
            let old = self.root.clone();
            let first = old.first_key();
            let mut keys = ArrayVec::new();
            keys.extend([first, key]);
            let mut kids = ArrayVec::new();
            kids.extend([old, sib]);
            self.root = Arc::new(Node::Inner(Inner { keys, kids }));
        }
        self.len += 1;
    }

    /// Removes and returns the extent that starts exactly at `start`.
    pub fn remove(&mut self, start: u64) -> Option<Extent> {
        // Look first, so that a miss copies no node.
        if self.root.find(start).is_none_or(|e| e.start != start) {
            return None;
        }
        let e = remove_rec(&mut self.root, start)?;
        self.len -= 1;
        // Collapse single-child roots; an empty inner root becomes a leaf.
        loop {
            let next = match &*self.root {
                Node::Inner(n) if n.kids.len() == 1 => n.kids[0].clone(),
                Node::Inner(n) if n.kids.is_empty() => Arc::new(Node::empty()),
                _ => break,
            };
            self.root = next;
        }
        Some(e)
    }

    /// Removes every extent.
    pub fn clear(&mut self) {
        *self = Tree::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn mem() -> Arc<MemObject> {
        Arc::new(MemObject::anonymous(4096).unwrap())
    }

    fn ext(m: &Arc<MemObject>, start: u64, last: u64) -> Extent {
        Extent::new(start, last, Permissions::ReadWrite, m.clone(), 0)
    }

    #[test]
    fn grows_and_shrinks() {
        // Enough for three levels; Miri runs far fewer, still three levels.
        let n: u64 = if cfg!(miri) { 800 } else { 10_000 };
        let m = mem();
        let mut t = Tree::default();
        for i in 0..n {
            t.insert(ext(&m, i * 10, i * 10 + 4));
        }
        assert_eq!(t.len() as u64, n);
        assert!(t.depth() >= 3);
        assert_eq!(t.find(54).unwrap().start, 50);
        assert!(t.find(56).is_none());
        assert_eq!(t.first_from(56).unwrap().start, 60);
        for i in (0..n).rev() {
            assert!(t.remove(i * 10).is_some());
        }
        assert!(t.is_empty());
        assert_eq!(t.depth(), 1);
    }

    #[test]
    fn snapshot_is_unaffected_by_later_writes() {
        let m = mem();
        let mut t = Tree::default();
        for i in 0..1000u64 {
            t.insert(ext(&m, i * 2, i * 2));
        }
        let snap = t.clone();
        for i in 0..500u64 {
            t.remove(i * 4);
        }
        assert_eq!(snap.len(), 1000);
        assert!(snap.find(0).is_some());
        assert!(t.find(0).is_none());
        assert_eq!(snap.overlapping(0, 1999).len(), 1000);
    }

    fn leaves(n: &Node) -> usize {
        match n {
            Node::Leaf(_) => 1,
            Node::Inner(i) => i.kids.iter().map(|k| leaves(k)).sum(),
        }
    }

    /// Extents mapped in increasing order fill their leaves: each split
    /// of a run leaves the node before it full.
    #[test]
    fn increasing_inserts_fill_their_nodes() {
        let m = mem();
        let mut t = Tree::default();
        let n = 64 * LEAF_CAP as u64;
        for i in 0..n {
            t.insert(ext(&m, i * 2, i * 2));
        }
        assert_eq!(leaves(&t.root), 64);
        assert_eq!(t.depth(), 3);
        // Out of order, the middle: still a valid tree.
        t.insert(ext(&m, 1, 1));
        assert_eq!(t.len() as u64, n + 1);
        assert_eq!(leaves(&t.root), 65);
        assert_eq!(t.find(1).map(|e| e.start), Some(1));
    }

    proptest! {
        #![proptest_config(crate::test_util::proptest_config(ProptestConfig::default().cases))]
        #[test]
        fn matches_btreemap(ops in prop::collection::vec((any::<bool>(), 0u64..2000, 0u64..8), 1..600)) {
            let m = mem();
            let mut t = Tree::default();
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            // Snapshots taken along the way: the writes after each copy
            // the nodes it shares (`unique`), and neither side may change
            // the other.
            let mut snaps: Vec<(Tree, BTreeMap<u64, u64>)> = Vec::new();
            for (ins, start, len) in ops {
                if start % 13 == 0 {
                    snaps.push((t.clone(), model.clone()));
                }
                let last = start + len;
                if ins {
                    let overlaps = model.range(..=last).next_back().is_some_and(|(_, l)| *l >= start);
                    prop_assert_eq!(overlaps, t.any_overlap(start, last));
                    if !overlaps {
                        t.insert(ext(&m, start, last));
                        model.insert(start, last);
                    }
                } else {
                    prop_assert_eq!(t.remove(start).map(|e| e.last), model.remove(&start));
                }
                prop_assert_eq!(t.len(), model.len());
            }
            for probe in 0..2010u64 {
                let want = model.range(..=probe).next_back().filter(|(_, l)| **l >= probe).map(|(s, _)| *s);
                prop_assert_eq!(t.find(probe).map(|e| e.start), want);
            }
            let all: Vec<u64> = t.overlapping(0, u64::MAX).iter().map(|e| e.start).collect();
            let want: Vec<u64> = model.keys().copied().collect();
            prop_assert_eq!(all, want);
            for (snap, then) in &snaps {
                let all: Vec<(u64, u64)> =
                    snap.overlapping(0, u64::MAX).iter().map(|e| (e.start, e.last)).collect();
                let want: Vec<(u64, u64)> = then.iter().map(|(s, l)| (*s, *l)).collect();
                prop_assert_eq!(all, want);
                prop_assert_eq!(snap.len(), then.len());
            }
        }
    }
}
