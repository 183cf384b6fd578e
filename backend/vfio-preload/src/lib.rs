//! `libvcdev_vfio.so`: an `LD_PRELOAD` library through which an unmodified
//! QEMU `vfio-pci` device (iommufd backend, pre-opened descriptors) drives
//! a vcdev device over the cdev door (PROTOCOL.md).
//!
//! `vcdev qemu-exec` opens `DIR/iommu` and `DIR/devices/NAME`, passes the
//! two descriptors to QEMU (`-object iommufd,fd=N -device
//! vfio-pci,iommufd=..,fd=M`) and names them in `VCDEV_VFIO_FDS=N,M`. On
//! those descriptors, and only on them (every other descriptor goes
//! straight to libc):
//!
//! - `ioctl(fd, CMD, &arg)` becomes one frame: code = CMD's nr, payload =
//!   the struct's `size`/`argsz` bytes; the reply's struct is copied back
//!   and a failure sets the errno the door (the kernel) gives
//!   ([`translate`]);
//! - `pread`/`pwrite` (and the `64`/`v` variants QEMU calls) become
//!   REGION_READ / REGION_WRITE at the same file offset;
//! - `mmap` fails with EINVAL, vfio-pci's answer for a region without
//!   `VFIO_REGION_INFO_FLAG_MMAP` (the door offers no mappable region),
//!   so QEMU takes its slow path;
//! - `close`, `dup`, `dup2` and `dup3` keep the table of vcdev descriptors
//!   up to date.
//!
//! IOMMU_IOAS_MAP carries a user virtual address; the door wants a file
//! and an offset: [`uva`] finds the mapping in `/proc/self/maps`, its memfd
//! in `/proc/self/fd`, and sends that descriptor.
//!
//! Logging: `VCDEV_VFIO_LOG=debug` (env_logger syntax) logs every
//! interposed call on a vcdev descriptor to stderr.
//!
//! Reentrancy: a hook that runs inside another hook on the same thread
//! (logging, `/proc` reads, allocation that maps memory) goes straight to
//! libc ([`hooks`]).

pub mod real;
pub mod table;
pub mod translate;
pub mod uva;

#[cfg(not(test))]
mod hooks;

/// An errno value (Linux numbering).
pub use vcdev_iommu::Errno;
