//! The device-cdev door (PROTOCOL.md): `DIR/iommu`, `DIR/devices/NAME`
//! and, with feature `group`, `DIR/vfio/vfio` and `DIR/vfio/N`.
//!
//! # Files
//!
//! A "file" is one end of a `socketpair(AF_UNIX, SOCK_STREAM)`: the server
//! keeps one end and serves it on a thread of its own; the other end is
//! handed out with `VCDEV_OPEN` and is the client's descriptor. When every
//! copy of the client's end is closed, the server's end reads EOF and the
//! file's release runs (the kernel's `fops->release`). A protocol
//! violation shuts the server's end down, with the same release.
//!
//! # Recognising a file passed back
//!
//! At hand-out the server records the `(st_dev, st_ino)` of the client's
//! end (sockfs inodes are numbered by `get_next_ino()`, a counter, so a
//! number is not reused while the table still names it). A descriptor
//! riding with BIND or SET_CONTAINER is `fstat`ed and looked up; the
//! server closes its copy at once, so it never keeps a client's file alive.
//!
//! - [`server`]: nodes and the handshake.
//! - [`files`]: the file kinds' common part (the kernel's VFS): handing a
//!   file out, the recognition table, the per-file request loop.
//! - [`dispatch`]: the request tables and the struct rules, applied once.
//! - [`iommufd_file`], [`device_file`], [`group`], [`container`]: the file
//!   kinds. Imports run server -> file kinds -> files and dispatch; only
//!   [`device_file`] and [`group`] know each other (a device file got
//!   through a group holds its binding).
//! - [`device`]: a device as the cdev door drives it: the virtio PCI
//!   function, its queue workers (reading through the attached IOAS), its
//!   MSI-X eventfds and ioeventfds.
//! - [`vfio_uapi`]: the vfio structs. [`client`]: the client side.

pub mod client;
#[cfg(feature = "group")]
pub mod container;
pub mod device;
pub mod device_file;
pub mod dispatch;
pub mod files;
#[cfg(feature = "group")]
pub mod group;
pub mod iommufd_file;
pub mod server;
pub mod vfio_uapi;

#[cfg(test)]
mod prop_tests;

pub use server::Server;
