//! Hand guest buffers to a [`super::BlockBackend`] without their dirty bitmap.
#![allow(unsafe_code)]

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// The same memory as `slice`, without its dirty-tracking bitmap, borrowed from it.
///
/// The backend trait takes bitmap-less slices so that it stays object safe. The caller marks the
/// original slice dirty after the backend wrote into it.
pub(crate) fn erase_bitmap<'s, B: BitmapSlice>(
    slice: &'s VolatileSlice<'_, B>,
) -> VolatileSlice<'s> {
    let guard = slice.ptr_guard_mut();
    // SAFETY: `slice` guarantees that `slice.len()` bytes at its address are mapped and valid
    // for volatile access for as long as it lives; the returned slice borrows `slice`, so it
    // cannot outlive it. The pointer stays valid after `guard` is dropped because only Xen
    // mappings (a vm-memory feature this crate does not enable) map memory per guard.
    unsafe { VolatileSlice::new(guard.as_ptr(), slice.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_memory() {
        let mut buf = [0u8; 8];
        let slice = VolatileSlice::from(&mut buf[..]);
        erase_bitmap(&slice).copy_from(&[1u8, 2, 3]);
        let mut out = [0u8; 8];
        slice.copy_to(&mut out[..]);
        assert_eq!(out, [1, 2, 3, 0, 0, 0, 0, 0]);
    }
}
