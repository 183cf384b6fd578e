//! `libvcdev_vfio.so` without QEMU: this test binary runs itself again
//! under `LD_PRELOAD` with a device file and an iommufd file inherited and
//! named in `VCDEV_VFIO_FDS` (what `vcdev qemu-exec` sets up), and the
//! child drives the device with plain libc calls, as QEMU's vfio-pci does:
//! ioctl, pread, pwrite, mmap, dup, close. Each call's result and errno
//! must be the kernel's (the door's).
//!
//! The child is the test `child_under_preload`, which does nothing unless
//! `VCDEV_PRELOAD_CHILD` is set.

mod common;

use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::process::Command;

use common::cdev::CONFIG_REGION;
use common::vcdev::{preload_lib, Vcdev};
use common::{poll_until, TIMEOUT};
use vcdev::cdev::client::File;
use vcdev::cdev::vfio_uapi::*;
use vcdev::qemu_exec::ENV_FDS;
use vcdev_iommu::uapi::*;
use vm_memory::ByteValued;

const CHILD: &str = "VCDEV_PRELOAD_CHILD";

/// `_IO(';', nr)`.
fn io(nr: u32) -> libc::c_ulong {
    libc::c_ulong::from((u32::from(b';') << 8) | nr)
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `ioctl(fd, _IO(';', nr), &t)`: the result, or -errno.
fn ioctl<T: ByteValued>(fd: RawFd, nr: u32, t: &mut T) -> i32 {
    // SAFETY: `t` is a plain struct of the size its first word says.
    let r = unsafe { libc::ioctl(fd, io(nr), t.as_mut_slice().as_mut_ptr()) };
    if r < 0 {
        -errno()
    } else {
        r
    }
}

fn size<T>() -> u32 {
    u32::try_from(std::mem::size_of::<T>()).unwrap()
}

#[test]
fn libc_calls_on_vcdev_files_are_frames() {
    let d = Vcdev::start(
        "vfio-preload",
        &["--device", "blk,ram=16M,name=vfio0"],
        "vfio0",
    );
    let mut fds = Vec::new();
    for node in ["iommu", "devices/vfio0"] {
        let fd = File::open(&d.path(node))
            .expect("open")
            .into_fd()
            .into_raw_fd();
        // SAFETY: fcntl on our own descriptor: clears FD_CLOEXEC.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        fds.push(fd);
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_under_preload",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LD_PRELOAD", preload_lib())
        .env(ENV_FDS, format!("{},{}", fds[0], fds[1]))
        .env("VCDEV_VFIO_LOG", "debug")
        .env(CHILD, format!("{},{}", fds[0], fds[1]))
        .output()
        .expect("run the child");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child did not run:\n{text}");
    assert!(
        text.contains("VFIO_DEVICE_BIND_IOMMUFD (0x76): Ok(0)"),
        "no debug log of the calls:\n{text}"
    );
    for fd in fds {
        // SAFETY: our own descriptors.
        unsafe { libc::close(fd) };
    }
    // Every copy closed: the device is free for the next client.
    let again = poll_until(TIMEOUT, || {
        let i = File::open(&d.path("iommu")).ok()?;
        let dev = File::open(&d.path("devices/vfio0")).ok()?;
        dev.bind_iommufd(&i).ok()
    });
    assert!(again.is_some(), "the device was not released");
}

/// Run by [`libc_calls_on_vcdev_files_are_frames`] under LD_PRELOAD.
#[test]
fn child_under_preload() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let fds: Vec<RawFd> = std::env::var(CHILD)
        .unwrap()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let (ictx, dev) = (fds[0], fds[1]);
    // The library took the list out of the environment (programs QEMU
    // runs do not inherit it) and the files are close-on-exec.
    assert!(std::env::var_os(ENV_FDS).is_none());
    for fd in [ictx, dev] {
        // SAFETY: F_GETFD on an inherited descriptor.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(fl & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "fd {fd}");
    }

    // Not bound yet: everything EINVAL, as vfio's device cdev answers.
    let mut info = VfioDeviceInfo {
        argsz: size::<VfioDeviceInfo>(),
        ..Default::default()
    };
    assert_eq!(ioctl(dev, VFIO_DEVICE_GET_INFO, &mut info), -libc::EINVAL);
    // Not an iommufd/vfio request at all: ENOTTY.
    let mut junk = 0u64;
    // SAFETY: TCGETS would write a termios; it never reaches the kernel.
    let r = unsafe { libc::ioctl(dev, libc::TCGETS, &mut junk) };
    assert_eq!((r, errno()), (-1, libc::ENOTTY));

    let mut bind = VfioDeviceBindIommufd {
        argsz: size::<VfioDeviceBindIommufd>(),
        iommufd: ictx,
        ..Default::default()
    };
    assert_eq!(ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &mut bind), 0);
    assert_ne!(bind.out_devid, 0, "the device id is copied back");
    let mut alloc = IommuIoasAlloc {
        size: size::<IommuIoasAlloc>(),
        ..Default::default()
    };
    assert_eq!(ioctl(ictx, IOMMUFD_CMD_IOAS_ALLOC, &mut alloc), 0);
    let mut attach = VfioDeviceAttachIommufdPt {
        argsz: 12,
        pt_id: alloc.out_ioas_id,
        ..Default::default()
    };
    assert_eq!(ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut attach), 0);

    // IOVA_RANGES with no room: EMSGSIZE and the count, then the ranges.
    let mut ranges = IommuIoasIovaRanges {
        size: size::<IommuIoasIovaRanges>(),
        ioas_id: alloc.out_ioas_id,
        ..Default::default()
    };
    assert_eq!(
        ioctl(ictx, IOMMUFD_CMD_IOAS_IOVA_RANGES, &mut ranges),
        -libc::EMSGSIZE
    );
    assert!(ranges.num_iovas >= 1);
    let mut out = vec![IommuIovaRange::default(); ranges.num_iovas as usize];
    ranges.allowed_iovas = out.as_mut_ptr() as u64;
    assert_eq!(ioctl(ictx, IOMMUFD_CMD_IOAS_IOVA_RANGES, &mut ranges), 0);
    assert_eq!(ranges.out_iova_alignment, 4096);
    assert!(out[0].last > out[0].start);

    // IOAS_MAP of a user address in a sealed memfd mapping: the library
    // finds the memfd; anonymous writable memory is EFAULT.
    // SAFETY: a fresh memfd, sized, sealed and mapped shared here.
    let (mfd, va) = unsafe {
        let mfd = libc::memfd_create(
            c"guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        assert!(mfd >= 0);
        assert_eq!(libc::ftruncate(mfd, 1 << 20), 0);
        assert_eq!(libc::fcntl(mfd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK), 0);
        let va = libc::mmap(
            std::ptr::null_mut(),
            1 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mfd,
            0,
        );
        assert_ne!(va, libc::MAP_FAILED);
        (mfd, va as u64)
    };
    let flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
    let mut map = IommuIoasMap {
        size: size::<IommuIoasMap>(),
        flags,
        ioas_id: alloc.out_ioas_id,
        user_va: va + 0x1000,
        length: 0x4000,
        iova: 0x10_0000,
        ..Default::default()
    };
    assert_eq!(ioctl(ictx, IOMMUFD_CMD_IOAS_MAP, &mut map), 0);
    assert_eq!(map.user_va, va + 0x1000, "the caller's user_va is kept");
    let anon = vec![0u8; 0x4000];
    let mut bad = IommuIoasMap {
        user_va: anon.as_ptr() as u64 & !0xfff,
        iova: 0x20_0000,
        length: 0x1000,
        ..map
    };
    assert_eq!(ioctl(ictx, IOMMUFD_CMD_IOAS_MAP, &mut bad), -libc::EFAULT);
    let mut unmap = IommuIoasUnmap {
        size: size::<IommuIoasUnmap>(),
        ioas_id: alloc.out_ioas_id,
        iova: 0x10_0000,
        length: 0x4000,
    };
    assert_eq!(ioctl(ictx, IOMMUFD_CMD_IOAS_UNMAP, &mut unmap), 0);
    assert_eq!(unmap.length, 0x4000);

    // Config space through pread: a virtio 1.x PCI function.
    let mut id = [0u8; 4];
    let off = i64::try_from(CONFIG_REGION).unwrap();
    // SAFETY: reads into a local buffer.
    let n = unsafe { libc::pread(dev, id.as_mut_ptr().cast(), 4, off) };
    assert_eq!(n, 4, "errno {}", errno());
    assert_eq!(id, [0xf4, 0x1a, 0x42, 0x10]);
    // The command register written back as read.
    let mut cmd = [0u8; 2];
    // SAFETY: reads into a local buffer.
    let n = unsafe { libc::pread(dev, cmd.as_mut_ptr().cast(), 2, off + 4) };
    assert_eq!(n, 2, "errno {}", errno());
    // SAFETY: writes from a local buffer.
    let n = unsafe { libc::pwrite(dev, cmd.as_ptr().cast(), 2, off + 4) };
    assert_eq!(n, 2, "errno {}", errno());
    // A region past the last: EINVAL.
    // SAFETY: reads into a local buffer.
    let n = unsafe { libc::pread(dev, id.as_mut_ptr().cast(), 4, 20 << 40) };
    assert_eq!((n, errno()), (-1, libc::EINVAL));

    // No region can be mapped: EINVAL, vfio-pci's answer.
    // SAFETY: a mapping request that fails (and would be ours otherwise).
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            dev,
            0,
        )
    };
    assert_eq!((p, errno()), (libc::MAP_FAILED, libc::EINVAL));

    // A copy of the device file is the same file.
    // SAFETY: dup of a descriptor we hold.
    let copy = unsafe { libc::dup(dev) };
    assert!(copy > 0);
    let mut info = VfioDeviceInfo {
        argsz: size::<VfioDeviceInfo>(),
        ..Default::default()
    };
    assert_eq!(ioctl(copy, VFIO_DEVICE_GET_INFO, &mut info), 0);
    assert_eq!(info.num_regions, 9);
    assert_ne!(info.flags & VFIO_DEVICE_FLAGS_PCI, 0);
    // Migration probes are not served: ENOTTY, as vfio-pci without
    // migration support.
    let mut feature = [12u32, 0x0001_0001, 0];
    // SAFETY: a vfio_device_feature header on the stack.
    let r = unsafe { libc::ioctl(copy, io(VFIO_GET_API_VERSION + 17), feature.as_mut_ptr()) };
    assert_eq!((r, errno()), (-1, libc::ENOTTY));
    // SAFETY: our copy.
    assert_eq!(unsafe { libc::close(copy) }, 0);
    // Closed: the number is libc's again (EBADF from the kernel).
    assert_eq!(ioctl(copy, VFIO_DEVICE_GET_INFO, &mut info), -libc::EBADF);
    // The original still works.
    assert_eq!(ioctl(dev, VFIO_DEVICE_GET_INFO, &mut info), 0);
    // Under KVM, QEMU adds every VFIO file to the VM's KVM-VFIO device;
    // for a vcdev file the library answers 0 itself (here on /dev/null,
    // which the kernel would answer ENOTTY).
    let null = std::fs::File::open("/dev/null").unwrap();
    let mut attr = [0u64; 3];
    attr[0] = 1 << 32; // flags 0, group KVM_DEV_VFIO_FILE
    attr[1] = 1; // KVM_DEV_VFIO_FILE_ADD
    attr[2] = &dev as *const RawFd as u64;
    // SAFETY: a kvm_device_attr naming `dev`.
    let r = unsafe { libc::ioctl(null.as_raw_fd(), 0x4018_aee1, attr.as_mut_ptr()) };
    assert_eq!(r, 0, "errno {}", errno());
    attr[2] = &mfd as *const RawFd as u64;
    // SAFETY: the same naming the memfd: the kernel's answer.
    let r = unsafe { libc::ioctl(null.as_raw_fd(), 0x4018_aee1, attr.as_mut_ptr()) };
    assert_eq!((r, errno()), (-1, libc::ENOTTY));
    // SAFETY: the memfd and mapping made above.
    unsafe {
        libc::munmap(va as *mut libc::c_void, 1 << 20);
        libc::close(mfd);
    }
}

/// `vcdev qemu-exec --print`: the environment and the two options it adds,
/// with the descriptors it opened; a device that does not exist: exit 1
/// naming the node.
#[test]
fn qemu_exec_prints_the_command() {
    let d = Vcdev::start(
        "vfio-qemu-exec",
        &["--device", "blk,ram=16M,name=vfio0"],
        "vfio0",
    );
    let dir = d.dir().display().to_string();
    let lib = preload_lib().display().to_string();
    let run = |name: &str| {
        Command::new(common::vcdev::vcdev_bin())
            .args(["qemu-exec", "--dir", &dir, "--preload", &lib, "--print"])
            .args([
                "--props",
                "bus=rp0",
                name,
                "--",
                "qemu-system-x86_64",
                "-m",
                "1G",
            ])
            .output()
            .expect("vcdev qemu-exec")
    };
    let out = run("vfio0");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words[0].starts_with("LD_PRELOAD=") && words[0].ends_with("libvcdev_vfio.so"));
    let fds = words[1].strip_prefix(&format!("{ENV_FDS}=")).expect("fds");
    let (n, m) = fds.split_once(',').expect("two fds");
    assert_eq!(&words[2..5], ["qemu-system-x86_64", "-m", "1G"]);
    assert_eq!(words[5], "-object");
    assert_eq!(words[6], format!("iommufd,id=vcdev-iommufd0,fd={n}"));
    assert_eq!(words[7], "-device");
    assert_eq!(
        words[8],
        format!("vfio-pci,id=vcdev-vfio0,iommufd=vcdev-iommufd0,fd={m},bus=rp0")
    );
    let out = run("nope");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("devices/nope") && err.contains("ENOENT"),
        "{err}"
    );
}
