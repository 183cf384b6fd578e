//! Plain-old-data structs from and to wire bytes: the one copy of the
//! helpers both doors and the cdev client use.

use vm_memory::ByteValued;

/// A `T` from the first `size_of::<T>()` bytes of `bytes`, zero-filled if
/// `bytes` is shorter (as `copy_struct_from_user` zero-extends a shorter
/// struct). Copied: `bytes` need not be aligned.
pub fn pod_from<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut t = T::default();
    let dst = t.as_mut_slice();
    let n = dst.len().min(bytes.len());
    if let (Some(d), Some(s)) = (dst.get_mut(..n), bytes.get(..n)) {
        d.copy_from_slice(s);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_long_and_exact() {
        assert_eq!(pod_from::<u32>(&[1, 0, 0, 0]), 1);
        assert_eq!(pod_from::<u32>(&[2]), 2);
        assert_eq!(pod_from::<u32>(&[3, 0, 0, 0, 9, 9]), 3);
        assert_eq!(pod_from::<u32>(&[]), 0);
    }
}
