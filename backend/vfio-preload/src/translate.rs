//! Calls on a vcdev descriptor turned into cdev frames (PROTOCOL.md).
//!
//! `ioctl(fd, CMD, &arg)`: the iommufd and vfio ioctls are all `_IO(';',
//! nr)` with the struct's size in its first u32 (`size` or `argsz`), so
//! the frame's code is `nr` and its payload the first `size` bytes at
//! `arg`. What the protocol carries differently from the kernel's
//! pointers and descriptor numbers is fixed up per request:
//!
//! | request | fix-up |
//! |---|---|
//! | VFIO_DEVICE_BIND_IOMMUFD | the `iommufd` descriptor rides with the frame |
//! | VFIO_DEVICE_IOEVENTFD | the `fd` rides with it (none when -1) |
//! | VFIO_DEVICE_SET_IRQS, DATA_EVENTFD | each eventfd rides with it; its slot holds its index |
//! | IOMMU_IOAS_MAP | `user_va` becomes a file and offset ([`crate::uva`]) |
//! | IOMMU_IOAS_MAP_FILE | the `fd` rides with it |
//! | IOMMU_IOAS_ALLOW_IOVAS | the ranges at `allowed_iovas` follow the struct |
//! | IOMMU_IOAS_IOVA_RANGES | the ranges that follow the reply go to `allowed_iovas` |
//! | VFIO_DEVICE_RESET | no argument: empty payload |
//!
//! On success the reply's struct is copied back over the caller's (at
//! most `size` bytes); on failure nothing is, except IOVA_RANGES'
//! EMSGSIZE, which the kernel answers with the struct and the ranges that
//! fit. The result is the door's: `-errno` becomes the errno.

use std::os::fd::RawFd;

use log::{debug, trace};
use vcdev::cdev::client::Reply;
use vcdev::cdev::device_file::MAX_REGION_READ;
use vcdev::cdev::vfio_uapi::*;
use vcdev_iommu::uapi::*;
use vcdev_iommu::Errno;

use crate::table::Door;
use crate::uva;

/// `_IOC_TYPE` of every iommufd and vfio ioctl: `';'`.
pub const IOCTL_TYPE: u64 = b';' as u64;
/// `VFIO_DEVICE_FEATURE` (not served by the door: ENOTTY, as vfio-pci
/// without migration or dirty-tracking ops answers).
pub const VFIO_DEVICE_FEATURE: u32 = VFIO_GET_API_VERSION + 17;
/// The largest struct (with its trailing data) copied from the caller.
pub const MAX_STRUCT: usize = 64 << 10;
/// The most descriptors one frame carries (PROTOCOL.md).
const MAX_FDS: usize = vcdev::wire::MAX_FDS;

/// `KVM_SET_DEVICE_ATTR`: `_IOW(KVMIO, 0xe1, struct kvm_device_attr)`.
pub const KVM_SET_DEVICE_ATTR: u64 = 0x4018_aee1;
/// `KVM_DEV_VFIO_FILE` (formerly `KVM_DEV_VFIO_GROUP`).
const KVM_DEV_VFIO_FILE: u32 = 1;
/// `KVM_DEV_VFIO_FILE_ADD`.
const KVM_DEV_VFIO_FILE_ADD: u64 = 1;
/// `KVM_DEV_VFIO_FILE_DEL`.
const KVM_DEV_VFIO_FILE_DEL: u64 = 2;

/// The descriptor a `KVM_SET_DEVICE_ATTR` on the KVM-VFIO device adds or
/// removes (`KVM_DEV_VFIO_FILE_ADD`/`_DEL`), if that is what `arg` asks.
///
/// Under KVM, QEMU's vfio-pci hands every VFIO file to the VM's KVM-VFIO
/// device (for non-coherent DMA and arch hooks); the kernel refuses a file
/// that is not a vfio one. An emulated device needs none of it, so the
/// hooks answer 0 for vcdev files without asking the kernel.
///
/// # Safety
///
/// `arg` must point to a `struct kvm_device_attr` (24 bytes) whose `addr`,
/// for the two attributes, points to an `int`.
pub unsafe fn kvm_vfio_file(arg: *const u8) -> Option<RawFd> {
    if arg.is_null() {
        return None;
    }
    // SAFETY: the caller's struct kvm_device_attr: u32 flags, u32 group,
    // u64 attr, u64 addr.
    let (group, attr, addr) = unsafe {
        (
            std::ptr::read_unaligned(arg.add(4).cast::<u32>()),
            std::ptr::read_unaligned(arg.add(8).cast::<u64>()),
            std::ptr::read_unaligned(arg.add(16).cast::<u64>()),
        )
    };
    if group != KVM_DEV_VFIO_FILE
        || !(attr == KVM_DEV_VFIO_FILE_ADD || attr == KVM_DEV_VFIO_FILE_DEL)
        || addr == 0
    {
        return None;
    }
    // SAFETY: for these attributes `addr` points to the file's int.
    Some(unsafe { std::ptr::read_unaligned(addr as usize as *const i32) })
}

/// Where frames go: a [`Door`] (or a test's fake).
pub trait Transport {
    /// Sends one request and returns its reply.
    fn call(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> Result<Reply, Errno>;
}

impl Transport for Door {
    fn call(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> Result<Reply, Errno> {
        Door::call(self, code, payload, fds)
    }
}

fn u32_at(p: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(p.get(off..off + 4)?.try_into().ok()?))
}

fn i32_at(p: &[u8], off: usize) -> Option<i32> {
    Some(i32::from_le_bytes(p.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(p: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(p.get(off..off + 8)?.try_into().ok()?))
}

fn put(p: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(d) = p.get_mut(off..off + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

/// The kernel's name of an iommufd/vfio ioctl nr, for logs.
pub fn name(nr: u32) -> &'static str {
    match nr {
        IOMMUFD_CMD_DESTROY => "IOMMU_DESTROY",
        IOMMUFD_CMD_IOAS_ALLOC => "IOMMU_IOAS_ALLOC",
        IOMMUFD_CMD_IOAS_ALLOW_IOVAS => "IOMMU_IOAS_ALLOW_IOVAS",
        IOMMUFD_CMD_IOAS_COPY => "IOMMU_IOAS_COPY",
        IOMMUFD_CMD_IOAS_IOVA_RANGES => "IOMMU_IOAS_IOVA_RANGES",
        IOMMUFD_CMD_IOAS_MAP => "IOMMU_IOAS_MAP",
        IOMMUFD_CMD_IOAS_UNMAP => "IOMMU_IOAS_UNMAP",
        IOMMUFD_CMD_OPTION => "IOMMU_OPTION",
        IOMMUFD_CMD_HWPT_ALLOC => "IOMMU_HWPT_ALLOC",
        IOMMUFD_CMD_GET_HW_INFO => "IOMMU_GET_HW_INFO",
        IOMMUFD_CMD_IOAS_MAP_FILE => "IOMMU_IOAS_MAP_FILE",
        VFIO_DEVICE_GET_INFO => "VFIO_DEVICE_GET_INFO",
        VFIO_DEVICE_GET_REGION_INFO => "VFIO_DEVICE_GET_REGION_INFO",
        VFIO_DEVICE_GET_IRQ_INFO => "VFIO_DEVICE_GET_IRQ_INFO",
        VFIO_DEVICE_SET_IRQS => "VFIO_DEVICE_SET_IRQS",
        VFIO_DEVICE_RESET => "VFIO_DEVICE_RESET",
        VFIO_IOMMU_GET_INFO => "VFIO_IOMMU_GET_INFO/VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
        VFIO_DEVICE_IOEVENTFD => "VFIO_DEVICE_IOEVENTFD",
        VFIO_DEVICE_FEATURE => "VFIO_DEVICE_FEATURE",
        VFIO_DEVICE_BIND_IOMMUFD => "VFIO_DEVICE_BIND_IOMMUFD",
        VFIO_DEVICE_ATTACH_IOMMUFD_PT => "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        VFIO_DEVICE_DETACH_IOMMUFD_PT => "VFIO_DEVICE_DETACH_IOMMUFD_PT",
        _ => "?",
    }
}

/// `ioctl(fd, req, arg)` on a vcdev file: the result (>= 0) or the errno.
///
/// # Safety
///
/// `arg` must be what the kernel ioctl `req` takes: a pointer to its
/// struct, valid for `size`/`argsz` bytes (plus the arrays its pointers
/// name), or an integer for the requests that take one.
pub unsafe fn ioctl(t: &impl Transport, req: u64, arg: *mut u8) -> Result<i32, Errno> {
    // Every request of both files is _IO(';', nr): no direction, no size.
    if req >> 16 != 0 || (req >> 8) & 0xff != IOCTL_TYPE {
        debug!("ioctl {req:#x}: not an iommufd or vfio request: ENOTTY");
        return Err(Errno::ENOTTY);
    }
    let nr = u32::try_from(req & 0xff).unwrap_or(0);
    let r = match nr {
        VFIO_DEVICE_RESET | VFIO_GET_API_VERSION => t.call(nr, &[], &[]).map(|r| r.result),
        VFIO_CHECK_EXTENSION | VFIO_SET_IOMMU => {
            // The argument is the integer itself.
            let v = u32::try_from(arg as usize).unwrap_or(u32::MAX);
            t.call(nr, &v.to_le_bytes(), &[]).map(|r| r.result)
        }
        // SAFETY: the caller's contract.
        _ => unsafe { structured(t, nr, arg) },
    };
    let r = r.and_then(|res| {
        if res < 0 {
            Err(Errno(res.saturating_neg()))
        } else {
            Ok(res)
        }
    });
    debug!("{} ({nr:#x}): {r:?}", name(nr));
    r
}

/// A request whose argument is a sized struct.
///
/// # Safety
///
/// As [`ioctl`].
unsafe fn structured(t: &impl Transport, nr: u32, arg: *mut u8) -> Result<i32, Errno> {
    if arg.is_null() {
        return Err(Errno::EFAULT);
    }
    // SAFETY: `arg` points to the struct, whose first u32 is its size.
    let size = unsafe { std::ptr::read_unaligned(arg.cast::<u32>()) };
    let len = usize::try_from(size)
        .unwrap_or(MAX_STRUCT)
        .clamp(4, MAX_STRUCT);
    // SAFETY: the caller's struct is `size` bytes long (the kernel would
    // read as many); at least its size word is there.
    let mut payload = unsafe { std::slice::from_raw_parts(arg, len) }.to_vec();
    let mut fds: Vec<RawFd> = Vec::new();
    let mut user_va = None;
    match nr {
        VFIO_DEVICE_BIND_IOMMUFD => {
            if let Some(fd) = i32_at(&payload, 8).filter(|fd| *fd >= 0) {
                fds.push(fd);
            }
        }
        VFIO_DEVICE_IOEVENTFD => {
            if let Some(fd) = i32_at(&payload, 24).filter(|fd| *fd >= 0) {
                fds.push(fd);
            }
        }
        IOMMUFD_CMD_IOAS_MAP_FILE => {
            if let Some(fd) = i32_at(&payload, 12).filter(|fd| *fd >= 0) {
                fds.push(fd);
            }
        }
        VFIO_DEVICE_SET_IRQS => {
            let flags = u32_at(&payload, 4).unwrap_or(0);
            let count = u32_at(&payload, 16).unwrap_or(0) as usize;
            if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 {
                for i in 0..count {
                    let off = 20 + 4 * i;
                    let Some(fd) = i32_at(&payload, off) else {
                        break;
                    };
                    if fd >= 0 {
                        if fds.len() == MAX_FDS {
                            // More vectors than one frame carries.
                            return Err(Errno::EINVAL);
                        }
                        let idx = i32::try_from(fds.len()).unwrap_or(i32::MAX);
                        fds.push(fd);
                        put(&mut payload, off, &idx.to_le_bytes());
                    }
                }
            }
        }
        IOMMUFD_CMD_IOAS_MAP => {
            let flags = u32_at(&payload, 4).unwrap_or(0);
            if let (Some(va), Some(length)) = (u64_at(&payload, 16), u64_at(&payload, 24)) {
                if length != 0 {
                    let b = uva::resolve(va, length, flags & IOMMU_IOAS_MAP_WRITEABLE != 0)?;
                    trace!(
                        "IOMMU_IOAS_MAP {va:#x}+{length:#x}: fd {} offset {:#x}",
                        b.fd,
                        b.offset
                    );
                    fds.push(b.fd);
                    put(&mut payload, 16, &b.offset.to_le_bytes());
                    user_va = Some(va);
                }
            }
        }
        IOMMUFD_CMD_IOAS_ALLOW_IOVAS => {
            let n = u32_at(&payload, 8).unwrap_or(0) as usize;
            let ptr = u64_at(&payload, 16).unwrap_or(0);
            let bytes = n.saturating_mul(16);
            if n > 0 {
                if ptr == 0 || bytes > MAX_STRUCT {
                    return Err(Errno::EFAULT);
                }
                // SAFETY: the caller's array of `num_iovas` ranges.
                let ranges =
                    unsafe { std::slice::from_raw_parts(ptr as usize as *const u8, bytes) };
                payload.truncate(len.min(IommuIoasAllowIovas::SIZE));
                payload.extend_from_slice(ranges);
            }
        }
        _ => {}
    }
    let reply = t.call(nr, &payload, &fds)?;
    let ok = reply.result >= 0;
    if nr == IOMMUFD_CMD_IOAS_IOVA_RANGES {
        if ok || reply.result == Errno::EMSGSIZE.to_result() {
            let cap = u32_at(&payload, 8).unwrap_or(0) as usize;
            let ptr = u64_at(&payload, 16).unwrap_or(0);
            let slen = len.min(IommuIoasIovaRanges::SIZE).min(reply.body.len());
            // SAFETY: the caller's struct is at least `len` >= `slen` bytes.
            unsafe { std::ptr::copy_nonoverlapping(reply.body.as_ptr(), arg, slen) };
            let ranges = reply.after(slen);
            let n = (ranges.len() / 16).min(cap) * 16;
            if n > 0 && ptr != 0 {
                // SAFETY: the caller's array holds `num_iovas` (cap) ranges.
                unsafe {
                    std::ptr::copy_nonoverlapping(ranges.as_ptr(), ptr as usize as *mut u8, n)
                };
            }
        }
        return Ok(reply.result);
    }
    if ok {
        let mut back = reply
            .body
            .get(..len.min(reply.body.len()))
            .unwrap_or_default()
            .to_vec();
        if let Some(va) = user_va {
            // The caller's user_va, not the offset the door saw.
            put(&mut back, 16, &va.to_le_bytes());
        }
        if nr == VFIO_DEVICE_SET_IRQS {
            // The kernel does not write SET_IRQS' argument back.
            back.clear();
        }
        // SAFETY: `back` is at most `len` bytes, the caller's struct size.
        unsafe { std::ptr::copy_nonoverlapping(back.as_ptr(), arg, back.len()) };
    }
    Ok(reply.result)
}

fn rw_header(offset: u64, count: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(&offset.to_le_bytes());
    h[8..12].copy_from_slice(&count.to_le_bytes());
    h
}

/// `pread(fd, buf, count, offset)` on a vcdev file: REGION_READ frames of
/// at most [`MAX_REGION_READ`] bytes; the bytes read, or the errno of the
/// first frame.
///
/// # Safety
///
/// `buf` must be valid for writes of `count` bytes.
pub unsafe fn pread(
    t: &impl Transport,
    buf: *mut u8,
    count: usize,
    offset: i64,
) -> Result<usize, Errno> {
    let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
    let mut done = 0usize;
    while done < count {
        let n = (count - done).min(MAX_REGION_READ as usize);
        let at = offset + done as u64;
        let r = t.call(
            VCDEV_REGION_READ,
            &rw_header(at, u32::try_from(n).unwrap_or(MAX_REGION_READ)),
            &[],
        );
        let r = match r {
            Ok(r) if r.result >= 0 => r,
            Ok(r) if done == 0 => return Err(Errno(r.result.saturating_neg())),
            Err(e) if done == 0 => return Err(e),
            _ => break,
        };
        let got = usize::try_from(r.result).unwrap_or(0).min(n);
        let data = r.after(16);
        let got = got.min(data.len());
        // SAFETY: `done + got <= count`, inside the caller's buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.add(done), got) };
        trace!("pread {at:#x}+{n}: {got}");
        done += got;
        if got < n {
            break;
        }
    }
    Ok(done)
}

/// `pwrite(fd, buf, count, offset)` on a vcdev file: REGION_WRITE frames.
///
/// # Safety
///
/// `buf` must be valid for reads of `count` bytes.
pub unsafe fn pwrite(
    t: &impl Transport,
    buf: *const u8,
    count: usize,
    offset: i64,
) -> Result<usize, Errno> {
    let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
    let chunk = MAX_REGION_READ as usize;
    let mut done = 0usize;
    while done < count {
        let n = (count - done).min(chunk);
        let at = offset + done as u64;
        let mut p = rw_header(at, u32::try_from(n).unwrap_or(MAX_REGION_READ)).to_vec();
        // SAFETY: `done + n <= count`, inside the caller's buffer.
        p.extend_from_slice(unsafe { std::slice::from_raw_parts(buf.add(done), n) });
        let r = match t.call(VCDEV_REGION_WRITE, &p, &[]) {
            Ok(r) if r.result >= 0 => r,
            Ok(r) if done == 0 => return Err(Errno(r.result.saturating_neg())),
            Err(e) if done == 0 => return Err(e),
            _ => break,
        };
        let put = usize::try_from(r.result).unwrap_or(0).min(n);
        trace!("pwrite {at:#x}+{n}: {put}");
        done += put;
        if put < n {
            break;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A request as the fake saw it: code, payload, descriptors.
    type Sent = (u32, Vec<u8>, Vec<RawFd>);
    /// The fake's answer for a code and payload.
    type Answer = Box<dyn FnMut(u32, &[u8]) -> Reply>;

    /// Records requests; answers with a canned reply.
    struct Fake {
        sent: RefCell<Vec<Sent>>,
        reply: RefCell<Answer>,
    }

    impl Fake {
        fn new(f: impl FnMut(u32, &[u8]) -> Reply + 'static) -> Fake {
            Fake {
                sent: RefCell::new(Vec::new()),
                reply: RefCell::new(Box::new(f)),
            }
        }
    }

    impl Transport for Fake {
        fn call(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> Result<Reply, Errno> {
            self.sent
                .borrow_mut()
                .push((code, payload.to_vec(), fds.to_vec()));
            Ok((self.reply.borrow_mut())(code, payload))
        }
    }

    fn reply(result: i32, body: Vec<u8>) -> Reply {
        Reply {
            result,
            body,
            fds: Vec::new(),
        }
    }

    const fn io(nr: u32) -> u64 {
        (IOCTL_TYPE << 8) | nr as u64
    }

    #[test]
    fn bind_sends_the_iommufd_and_copies_the_devid_back() {
        let fake = Fake::new(|_, p| {
            let mut b = p.to_vec();
            b[12..16].copy_from_slice(&5u32.to_le_bytes());
            reply(0, b)
        });
        let mut arg = [16u32, 0, 9, 0];
        // SAFETY: a BIND struct on the stack.
        let r = unsafe { ioctl(&fake, io(VFIO_DEVICE_BIND_IOMMUFD), arg.as_mut_ptr().cast()) };
        assert_eq!(r, Ok(0));
        assert_eq!(arg[3], 5);
        let sent = fake.sent.borrow();
        assert_eq!(sent[0].0, VFIO_DEVICE_BIND_IOMMUFD);
        assert_eq!(sent[0].2, vec![9]);
    }

    #[test]
    fn errors_are_the_doors_and_nothing_is_copied_back() {
        let fake = Fake::new(|_, _| reply(-libc::ENOTTY, Vec::new()));
        let mut arg = [16u32, 1, 2, 3];
        // SAFETY: a 16-byte struct on the stack.
        let r = unsafe { ioctl(&fake, io(VFIO_DEVICE_FEATURE), arg.as_mut_ptr().cast()) };
        assert_eq!(r, Err(Errno::ENOTTY));
        assert_eq!(arg, [16, 1, 2, 3]);
        // Not an iommufd/vfio request at all.
        // SAFETY: never dereferenced.
        let r = unsafe { ioctl(&fake, 0x5421, std::ptr::null_mut()) };
        assert_eq!(r, Err(Errno::ENOTTY));
        assert_eq!(fake.sent.borrow().len(), 1);
    }

    #[test]
    fn set_irqs_sends_eventfds_as_indexes() {
        let fake = Fake::new(|_, _| reply(0, Vec::new()));
        // argsz, flags, index, start, count, then 3 fds.
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let mut arg: [i32; 8] = [32, flags.cast_signed(), 2, 0, 3, 11, -1, 12];
        // SAFETY: a SET_IRQS struct with its data on the stack.
        let r = unsafe { ioctl(&fake, io(VFIO_DEVICE_SET_IRQS), arg.as_mut_ptr().cast()) };
        assert_eq!(r, Ok(0));
        let sent = fake.sent.borrow();
        assert_eq!(sent[0].2, vec![11, 12]);
        assert_eq!(i32_at(&sent[0].1, 20), Some(0));
        assert_eq!(i32_at(&sent[0].1, 24), Some(-1));
        assert_eq!(i32_at(&sent[0].1, 28), Some(1));
        assert_eq!(arg[5], 11, "the caller's struct is left alone");
    }

    #[test]
    fn iova_ranges_fill_the_callers_array_even_on_emsgsize() {
        let fake = Fake::new(|_, p| {
            let cap = u32_at(p, 8).unwrap();
            let mut b = p[..32].to_vec();
            b[8..12].copy_from_slice(&2u32.to_le_bytes());
            b[24..32].copy_from_slice(&4096u64.to_le_bytes());
            let ranges: [u64; 4] = [0, 0xfff, 0x2000, u64::MAX];
            for r in ranges.iter().take(2 * cap.min(2) as usize) {
                b.extend_from_slice(&r.to_le_bytes());
            }
            reply(if cap < 2 { -libc::EMSGSIZE } else { 0 }, b)
        });
        let mut out = [0u64; 2];
        let mut arg = [0u8; 32];
        arg[..4].copy_from_slice(&32u32.to_le_bytes());
        arg[8..12].copy_from_slice(&1u32.to_le_bytes());
        arg[16..24].copy_from_slice(&(out.as_mut_ptr() as u64).to_le_bytes());
        // SAFETY: the struct and a one-range array on the stack.
        let r = unsafe { ioctl(&fake, io(IOMMUFD_CMD_IOAS_IOVA_RANGES), arg.as_mut_ptr()) };
        assert_eq!(r, Err(Errno::EMSGSIZE));
        assert_eq!(u32_at(&arg, 8), Some(2));
        assert_eq!(u64_at(&arg, 24), Some(4096));
        assert_eq!(out, [0, 0xfff]);
    }

    #[test]
    fn kvm_vfio_file_attributes() {
        let fd: i32 = 42;
        let mut attr = [0u8; 24];
        attr[4..8].copy_from_slice(&1u32.to_le_bytes());
        attr[8..16].copy_from_slice(&1u64.to_le_bytes());
        attr[16..24].copy_from_slice(&(&fd as *const i32 as u64).to_le_bytes());
        // SAFETY: a kvm_device_attr on the stack naming `fd`.
        assert_eq!(unsafe { kvm_vfio_file(attr.as_ptr()) }, Some(42));
        attr[8..16].copy_from_slice(&3u64.to_le_bytes());
        // SAFETY: as above (SET_SPAPR_TCE: not ours to answer).
        assert_eq!(unsafe { kvm_vfio_file(attr.as_ptr()) }, None);
    }

    #[test]
    fn reads_and_writes_are_region_frames() {
        let fake = Fake::new(|code, p| {
            let n = u32_at(p, 8).unwrap();
            if code == VCDEV_REGION_READ {
                let mut b = p[..16].to_vec();
                b.extend((0..n).map(|i| i as u8));
                reply(i32::try_from(n).unwrap(), b)
            } else {
                reply(i32::try_from(n).unwrap(), Vec::new())
            }
        });
        let mut buf = [0u8; 4];
        // SAFETY: a local buffer.
        let n = unsafe { pread(&fake, buf.as_mut_ptr(), 4, 7 << 40) }.unwrap();
        assert_eq!((n, buf), (4, [0, 1, 2, 3]));
        // SAFETY: a local buffer.
        let n = unsafe { pwrite(&fake, buf.as_ptr(), 2, 0x10) }.unwrap();
        assert_eq!(n, 2);
        let sent = fake.sent.borrow();
        assert_eq!(u64_at(&sent[0].1, 0), Some(7 << 40));
        assert_eq!(&sent[1].1[16..], &[0, 1]);
        assert_eq!(
            // SAFETY: never dereferenced.
            unsafe { pread(&fake, buf.as_mut_ptr(), 1, -1) },
            Err(Errno::EINVAL)
        );
    }
}
