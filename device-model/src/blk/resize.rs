//! Live resize: the capacity a driver sees changes at run time.
//!
//! [`BlkDevice::resize`] validates the new size, has the [`BlockBackend`] take it (a file is
//! extended or truncated, a RAM disk grows or gives its tail back, a block device's new size
//! is read again) and publishes it in the device's [`Capacity`], which the bounds check of every
//! request and the config space's `capacity` field read. Telling the driver (a vhost-user
//! `CONFIG_CHANGE_MSG`, a config-change MSI-X) is the transport's job.
//!
//! # Ordering
//!
//! A grow changes the backing first, then publishes the size: a request that sees the new size
//! finds the backing ready. A shrink publishes the size first (new requests past it fail with
//! `VIRTIO_BLK_S_IOERR` from then on), then shrinks the backing. A request already past the
//! bounds check when a shrink happens still completes against the old extent (as with a
//! block device shrunk under a running guest): a write may then extend a file past its new
//! end, or leave data in a RAM disk's released tail, which a later grow would show instead of
//! zeros. QEMU drains the device before `block_resize`; shrink an idle disk.

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use log::info;

use super::BlkDevice;

/// Errors of [`BlkDevice::resize`]. [`ResizeError::errno`] gives the one errno for each.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The device is read-only (`readonly=on`): EROFS.
    #[error("The device is read-only")]
    ReadOnly,
    /// The size is zero or not a multiple of the logical block size: EINVAL.
    #[error("Size {size} is not a non-zero multiple of {align} bytes")]
    Misaligned {
        /// The size asked for.
        size: u64,
        /// The logical block size (at least 512).
        align: u32,
    },
    /// Shrinking destroys the data past the new end and was not asked for: EPERM.
    #[error(
        "Shrinking from {from} to {to} bytes would destroy the data past the new end; \
         it must be asked for explicitly"
    )]
    ShrinkRefused {
        /// The current size.
        from: u64,
        /// The size asked for.
        to: u64,
    },
    /// No size was given and the backing has none of its own to re-read (a RAM disk): EINVAL.
    #[error("A RAM disk has no size of its own to re-read: give the new size")]
    NoSize,
    /// A block device keeps the size it has; it is grown by the operator, not here:
    /// EOPNOTSUPP.
    #[error(
        "A block device cannot be resized to {size} bytes here (it has {len}): resize the \
         device itself, then resize without a size"
    )]
    FixedSize {
        /// The size asked for.
        size: u64,
        /// The block device's size.
        len: u64,
    },
    /// Beyond what a RAM disk can grow to (the address space reserved for it): EFBIG.
    #[error("Size {size} is beyond the {max} bytes this RAM disk can grow to")]
    TooLarge {
        /// The size asked for.
        size: u64,
        /// The most it can take.
        max: u64,
    },
    /// The backing cannot change its size: EOPNOTSUPP.
    #[error("The backing cannot be resized")]
    Unsupported,
    /// The backing's own size could not be read: its errno, else EIO.
    #[error("Failed to read the size of the backing")]
    Probe(#[source] io::Error),
    /// The backing refused the new size (ftruncate, mprotect): its errno, else EIO.
    #[error("Failed to resize the backing")]
    Backing(#[source] io::Error),
}

impl ResizeError {
    /// The Linux errno for this error (a positive `libc::E*` number), for a control protocol.
    #[must_use]
    pub fn errno(&self) -> i32 {
        match self {
            ResizeError::ReadOnly => libc::EROFS,
            ResizeError::Misaligned { .. } | ResizeError::NoSize => libc::EINVAL,
            ResizeError::ShrinkRefused { .. } => libc::EPERM,
            ResizeError::FixedSize { .. } | ResizeError::Unsupported => libc::EOPNOTSUPP,
            ResizeError::TooLarge { .. } => libc::EFBIG,
            ResizeError::Probe(e) | ResizeError::Backing(e) => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

/// What a resize did: the size before and after, in bytes (equal if nothing changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resized {
    /// The size before.
    pub from: u64,
    /// The size now.
    pub to: u64,
}

impl Resized {
    /// Whether the size changed (and the driver is to be told).
    #[must_use]
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

/// The size a driver sees, in bytes, changeable at run time.
///
/// A driver reads the 8-byte `capacity` field in two 4-byte accesses on the PCI transport and
/// reads again while `config_generation` changes (virtio 1.2 section 4.1.4.3.1). For that loop
/// to catch every mix of old and new halves, the size moves under a sequence count, as a
/// seqlock: odd while a change is in progress. [`Capacity::generation`] waits until it is even,
/// so a generation read after a torn pair of reads always differs from the one read before it.
/// Writers are serialised by the caller ([`BlkDevice::resize`] holds its lock); between the two
/// bumps there is nothing but one store, so a reader never waits long.
#[derive(Debug)]
pub(crate) struct Capacity {
    bytes: AtomicU64,
    seq: AtomicU32,
}

impl Capacity {
    pub(crate) fn new(bytes: u64) -> Self {
        Self {
            bytes: AtomicU64::new(bytes),
            seq: AtomicU32::new(0),
        }
    }

    /// The size in bytes (one load: the bounds check of every request reads it).
    pub(crate) fn get(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Publish a new size. Callers are serialised.
    fn set(&self, bytes: u64) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        self.bytes.store(bytes, Ordering::SeqCst);
        self.seq.fetch_add(1, Ordering::SeqCst);
    }

    /// How many times the size changed (waits out a change in progress).
    pub(crate) fn generation(&self) -> u32 {
        let mut spins = 0u32;
        loop {
            let s = self.seq.load(Ordering::SeqCst);
            if s % 2 == 0 {
                return s / 2;
            }
            // The writer is between two atomic operations; it may have been preempted.
            spins = spins.saturating_add(1);
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl BlkDevice {
    /// Change the disk's size to `size` bytes or, with `None`, to the size its backing has now
    /// (a block device or image the operator grew; a RAM disk needs a size).
    ///
    /// Refused: on a read-only device; a size that is not a non-zero multiple of the logical
    /// block size; a smaller size unless `shrink` (it destroys the data past the new end).
    /// Requests past the new end fail with `VIRTIO_BLK_S_IOERR` once this returns. A failed
    /// resize changes nothing. Resizes of one device are serialised; the transport tells the
    /// driver when [`Resized::changed`].
    pub fn resize(&self, size: Option<u64>, shrink: bool) -> Result<Resized, ResizeError> {
        let _serial = self
            .resize_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.cfg.read_only {
            return Err(ResizeError::ReadOnly);
        }
        let from = self.capacity.get();
        let to = match size {
            Some(s) => s,
            None => self
                .backend
                .probe_len()
                .map_err(ResizeError::Probe)?
                .ok_or(ResizeError::NoSize)?,
        };
        let align = self.backend.block_size();
        if to == 0 || to % u64::from(align) != 0 {
            return Err(ResizeError::Misaligned { size: to, align });
        }
        if to < from && !shrink {
            return Err(ResizeError::ShrinkRefused { from, to });
        }
        let resized = Resized { from, to };
        if to == from {
            return Ok(resized);
        }
        if to > from {
            self.backend.resize(to)?;
            self.capacity.set(to);
        } else {
            // New requests past the new end fail from here on.
            self.capacity.set(to);
            if let Err(e) = self.backend.resize(to) {
                self.capacity.set(from);
                return Err(e);
            }
        }
        info!("virtio-blk: capacity {from} -> {to} bytes");
        Ok(resized)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::file::tests::TempImage;
    use super::super::test_util::*;
    use super::super::{BlkConfig, BlockBackend, FileBackend, FileOptions};
    use super::*;

    const MIB: u64 = 1 << 20;
    const OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;

    fn cfg(read_only: bool) -> BlkConfig {
        BlkConfig {
            queue_size: 16,
            read_only,
            ..BlkConfig::default()
        }
    }

    fn file_blk(img: &TempImage, read_only: bool) -> Arc<BlkDevice> {
        let b = FileBackend::open_with(
            &img.path,
            FileOptions {
                read_only,
                direct: false,
            },
        )
        .unwrap();
        Arc::new(BlkDevice::new(Arc::new(b), cfg(read_only)).unwrap())
    }

    /// The `capacity` field of the config space, in sectors.
    fn config_capacity(dev: &BlkDevice) -> u64 {
        let mut b = [0u8; 8];
        dev.read_config(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn grow_a_file_keeps_data_and_serves_the_new_area() {
        let img = TempImage::new(MIB);
        let dev = file_blk(&img, false);
        let mem = plain_mem();
        let mut d = Driver::new(&mem, dev.clone(), 16);
        let data = pattern(4096, 3);
        assert_eq!(d.write(8, &data).status, OK);
        assert_eq!(d.read(MIB / 512, 512).status, IOERR);

        let r = dev.resize(Some(2 * MIB), false).unwrap();
        assert_eq!(
            r,
            Resized {
                from: MIB,
                to: 2 * MIB
            }
        );
        assert!(r.changed());
        assert_eq!(dev.capacity_bytes(), 2 * MIB);
        assert_eq!(config_capacity(&dev), 2 * MIB / 512);
        assert_eq!(dev.config_bytes()[..8], (2 * MIB / 512).to_le_bytes());
        assert_eq!(std::fs::metadata(&img.path).unwrap().len(), 2 * MIB);
        assert_eq!(dev.backend().len(), 2 * MIB);
        // Old data kept, the new area reads zeros and takes writes.
        assert_eq!(d.read(8, 4096).data, data);
        let fresh = d.read(MIB / 512, 4096);
        assert_eq!(fresh.status, OK);
        assert!(fresh.data.iter().all(|&b| b == 0));
        let tail = pattern(512, 7);
        assert_eq!(d.write(2 * MIB / 512 - 1, &tail).status, OK);
        assert_eq!(d.read(2 * MIB / 512 - 1, 512).data, tail);
        assert_eq!(d.read(2 * MIB / 512, 512).status, IOERR);
        // The same size again changes nothing.
        assert!(!dev.resize(Some(2 * MIB), false).unwrap().changed());
    }

    #[test]
    fn shrink_is_refused_unless_asked_then_requests_past_the_end_fail() {
        let img = TempImage::new(2 * MIB);
        let dev = file_blk(&img, false);
        let mem = plain_mem();
        let mut d = Driver::new(&mem, dev.clone(), 16);
        let last = 2 * MIB / 512 - 1;
        assert_eq!(d.write(last, &pattern(512, 1)).status, OK);
        let e = dev.resize(Some(MIB), false).unwrap_err();
        assert!(
            matches!(e, ResizeError::ShrinkRefused { from, to } if from == 2 * MIB && to == MIB)
        );
        assert_eq!(e.errno(), libc::EPERM);
        assert_eq!(dev.capacity_bytes(), 2 * MIB);
        assert_eq!(d.read(last, 512).status, OK);

        let r = dev.resize(Some(MIB), true).unwrap();
        assert_eq!(
            r,
            Resized {
                from: 2 * MIB,
                to: MIB
            }
        );
        assert_eq!(std::fs::metadata(&img.path).unwrap().len(), MIB);
        assert_eq!(config_capacity(&dev), MIB / 512);
        assert_eq!(d.read(last, 512).status, IOERR);
        assert_eq!(d.write(MIB / 512, &pattern(512, 2)).status, IOERR);
        assert_eq!(d.read(MIB / 512 - 1, 512).status, OK);
        // Grown again, the dropped area reads zeros.
        dev.resize(Some(2 * MIB), false).unwrap();
        let r = d.read(last, 512);
        assert_eq!(r.status, OK);
        assert!(r.data.iter().all(|&b| b == 0));
    }

    #[test]
    fn refusals() {
        let img = TempImage::new(MIB);
        let ro = file_blk(&img, true);
        let e = ro.resize(Some(2 * MIB), false).unwrap_err();
        assert!(matches!(e, ResizeError::ReadOnly));
        assert_eq!(e.errno(), libc::EROFS);
        assert_eq!(ro.capacity_bytes(), MIB);
        // A writable device cannot open the image while a read-only one holds it.
        drop(ro);

        let dev = file_blk(&img, false);
        for bad in [0, MIB + 100, 2 * MIB + 256] {
            let e = dev.resize(Some(bad), true).unwrap_err();
            assert!(matches!(e, ResizeError::Misaligned { size, align: 512 } if size == bad));
            assert_eq!(e.errno(), libc::EINVAL);
        }
        assert_eq!(std::fs::metadata(&img.path).unwrap().len(), MIB);

        let ram = ram_blk(MIB, cfg(false));
        let e = ram.resize(None, false).unwrap_err();
        assert!(matches!(e, ResizeError::NoSize));
        assert_eq!(e.errno(), libc::EINVAL);
    }

    /// Without a size: the backing's own size, as the operator left it.
    #[test]
    fn resize_without_a_size_takes_the_backings() {
        let img = TempImage::new(MIB);
        let dev = file_blk(&img, false);
        assert!(!dev.resize(None, false).unwrap().changed());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img.path)
            .unwrap()
            .set_len(3 * MIB)
            .unwrap();
        let r = dev.resize(None, false).unwrap();
        assert_eq!(
            r,
            Resized {
                from: MIB,
                to: 3 * MIB
            }
        );
        assert_eq!(config_capacity(&dev), 3 * MIB / 512);
    }

    #[test]
    fn ram_disk_grows_with_its_data_and_shrinks() {
        let dev = ram_blk(MIB, cfg(false));
        let mem = plain_mem();
        let mut d = Driver::new(&mem, dev.clone(), 16);
        let data = pattern(8192, 5);
        assert_eq!(d.write(MIB / 512 - 16, &data).status, OK);
        assert_eq!(d.read(MIB / 512, 512).status, IOERR);

        dev.resize(Some(64 * MIB), false).unwrap();
        assert_eq!(dev.backend().len(), 64 * MIB);
        assert_eq!(d.read(MIB / 512 - 16, 8192).data, data);
        let last = 64 * MIB / 512 - 1;
        let r = d.read(last, 512);
        assert_eq!(r.status, OK);
        assert!(r.data.iter().all(|&b| b == 0));
        assert_eq!(d.write(last, &pattern(512, 6)).status, OK);
        assert_eq!(d.read(last, 512).data, pattern(512, 6));

        // Shrink to a size that is not page-aligned, then grow: the dropped bytes read zeros.
        dev.resize(Some(MIB - 512), true).unwrap();
        assert_eq!(d.read(MIB / 512 - 1, 512).status, IOERR);
        assert_eq!(d.read(last, 512).status, IOERR);
        dev.resize(Some(64 * MIB), false).unwrap();
        let kept = d.read(MIB / 512 - 16, 8192).data;
        assert_eq!(kept[..8192 - 512], data[..8192 - 512]);
        assert!(kept[8192 - 512..].iter().all(|&b| b == 0));
        assert!(d.read(last, 512).data.iter().all(|&b| b == 0));
    }

    #[test]
    fn generation_moves_with_each_change() {
        let dev = ram_blk(MIB, cfg(false));
        let g = dev.config_generation();
        dev.resize(Some(2 * MIB), false).unwrap();
        assert_ne!(dev.config_generation(), g);
        let g = dev.config_generation();
        dev.resize(Some(2 * MIB), false).unwrap();
        assert_eq!(dev.config_generation(), g);
        // A failed resize leaves it alone too.
        let _ = dev.resize(Some(MIB), false).unwrap_err();
        assert_eq!(dev.config_generation(), g);
    }

    /// The default of the trait: a backing that cannot change size.
    #[test]
    fn fixed_backing_is_unsupported() {
        #[derive(Debug)]
        struct Fixed(super::super::RamBackend);
        impl BlockBackend for Fixed {
            fn len(&self) -> u64 {
                self.0.len()
            }
            fn read_at(&self, o: u64, b: &vm_memory::VolatileSlice<'_>) -> io::Result<()> {
                self.0.read_at(o, b)
            }
            fn write_at(&self, o: u64, b: &vm_memory::VolatileSlice<'_>) -> io::Result<()> {
                self.0.write_at(o, b)
            }
            fn flush(&self) -> io::Result<()> {
                Ok(())
            }
            fn discard(&self, o: u64, l: u64) -> io::Result<()> {
                self.0.discard(o, l)
            }
            fn write_zeroes(&self, o: u64, l: u64, u: bool) -> io::Result<()> {
                self.0.write_zeroes(o, l, u)
            }
        }
        let b = Fixed(super::super::RamBackend::new(MIB).unwrap());
        let dev = BlkDevice::new(Arc::new(b), cfg(false)).unwrap();
        let e = dev.resize(Some(2 * MIB), false).unwrap_err();
        assert!(matches!(e, ResizeError::Unsupported));
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        assert_eq!(dev.capacity_bytes(), MIB);
    }
}
