//! Bounds-checked access to a device's config space.

/// Copy `data.len()` bytes of `config` starting at `offset` into `data`.
///
/// Bytes past the end of `config` (or an `offset` past it) read as zero: a driver or frontend
/// asking for more than the structure holds gets zeros, never a panic.
pub fn read_config(config: &[u8], offset: u32, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let Some(src) = config.get(start..) else {
        return;
    };
    let n = src.len().min(data.len());
    if let (Some(dst), Some(src)) = (data.get_mut(..n), src.get(..n)) {
        dst.copy_from_slice(src);
    }
}

/// Store `bytes` at `offset` in `config`; bytes that would fall outside it are dropped.
///
/// Used to lay out config structures field by field with `offset_of!`.
pub(crate) fn put_bytes(config: &mut [u8], offset: usize, bytes: &[u8]) {
    let end = offset.saturating_add(bytes.len()).min(config.len());
    if let Some(dst) = config.get_mut(offset..end) {
        let n = dst.len();
        if let Some(src) = bytes.get(..n) {
            dst.copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_reads() {
        let cfg = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 6];
        read_config(&cfg, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0, 0, 0]);
        read_config(&cfg, 4, &mut out);
        assert_eq!(out, [0; 6]);
        read_config(&cfg, u32::MAX, &mut out);
        assert_eq!(out, [0; 6]);
        let mut empty = [];
        read_config(&cfg, 0, &mut empty);
    }

    #[test]
    fn put_clips() {
        let mut cfg = [0u8; 4];
        put_bytes(&mut cfg, 2, &[9, 9, 9]);
        assert_eq!(cfg, [0, 0, 9, 9]);
        put_bytes(&mut cfg, usize::MAX, &[1]);
        assert_eq!(cfg, [0, 0, 9, 9]);
    }
}
