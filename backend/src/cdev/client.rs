//! The client side of the cdev protocol: open a node, then call requests
//! by their kernel names (the way `iommufd_utils.h` wraps the ioctls).
//! Used by the tests.
//!
//! Every call returns the kernel's errno on failure; a broken transport
//! (the server closed the file) is `EPIPE`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vcdev_iommu::uapi::*;
use vcdev_iommu::Errno;
use vm_memory::ByteValued;

use super::vfio_uapi::*;
use crate::pod::pod_from;
use crate::wire::{self, FlagPolicy, FrameHeader};

/// A reply: the result and what followed it.
#[derive(Debug)]
pub struct Reply {
    /// The result (>= 0, or -errno).
    pub result: i32,
    /// The bytes after the result.
    pub body: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    /// The result as `Ok(result)` or the errno.
    pub fn ok(&self) -> Result<i32, Errno> {
        if self.result < 0 {
            Err(Errno(self.result.saturating_neg()))
        } else {
            Ok(self.result)
        }
    }

    /// The struct `T` at the start of the body (zero-filled if short).
    pub fn get<T: ByteValued + Default>(&self) -> T {
        pod_from(&self.body)
    }

    /// The body after `skip` bytes.
    pub fn after(&self, skip: usize) -> &[u8] {
        self.body.get(skip..).unwrap_or_default()
    }
}

fn pipe() -> Errno {
    Errno(libc::EPIPE)
}

/// A file the server handed out.
#[derive(Debug)]
pub struct File {
    sock: UnixStream,
}

impl AsFd for File {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// `size_of` a struct as the u32 its size word holds.
fn size32<T>() -> u32 {
    u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
}

impl File {
    /// Opens node `path`: connects and takes the file from `VCDEV_OPEN`;
    /// a refusal is its errno.
    pub fn open(path: &Path) -> Result<File, Errno> {
        let conn = UnixStream::connect(path).map_err(|e| Errno::from_io(&e))?;
        let f = wire::read_frame(&conn, FlagPolicy::CDEV)
            .map_err(|_| pipe())?
            .ok_or_else(pipe)?;
        if f.header.request != VCDEV_OPEN || f.payload.len() != 4 {
            return Err(pipe());
        }
        let r = i32::from_le_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
        if r < 0 {
            return Err(Errno(r.saturating_neg()));
        }
        let fd = f.fds.into_iter().next().ok_or_else(pipe)?;
        Ok(File {
            sock: UnixStream::from(fd),
        })
    }

    /// A file from a descriptor (one that rode with a reply).
    pub fn from_fd(fd: OwnedFd) -> File {
        File {
            sock: UnixStream::from(fd),
        }
    }

    /// The descriptor itself (to hand the file to another program).
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.sock)
    }

    /// Another copy of the descriptor (the kernel's dup).
    pub fn try_clone(&self) -> std::io::Result<File> {
        Ok(File {
            sock: self.sock.try_clone()?,
        })
    }

    /// The socket (for raw frames in tests).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Sends one request and reads its reply.
    pub fn call(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> Result<Reply, Errno> {
        let size = u32::try_from(payload.len()).map_err(|_| Errno::E2BIG)?;
        wire::write_frame(
            &self.sock,
            &FrameHeader::request(code, 0, size),
            payload,
            fds,
        )
        .map_err(|_| pipe())?;
        let f = wire::read_frame(&self.sock, FlagPolicy::CDEV)
            .map_err(|_| pipe())?
            .ok_or_else(pipe)?;
        if f.header.request != code || !f.header.is_reply() || f.payload.len() < 4 {
            return Err(pipe());
        }
        let result = i32::from_le_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]);
        Ok(Reply {
            result,
            body: f.payload.get(4..).unwrap_or_default().to_vec(),
            fds: f.fds,
        })
    }

    /// Sends `cmd` (plus `extra` bytes) and returns the reply's struct.
    pub fn cmd<T: ByteValued + Default>(
        &self,
        code: u32,
        cmd: &T,
        extra: &[u8],
        fds: &[RawFd],
    ) -> Result<(T, Reply), Errno> {
        let mut p = cmd.as_slice().to_vec();
        p.extend_from_slice(extra);
        let r = self.call(code, &p, fds)?;
        r.ok()?;
        Ok((r.get(), r))
    }

    // --- iommufd --------------------------------------------------------

    /// IOMMU_IOAS_ALLOC.
    pub fn ioas_alloc(&self) -> Result<u32, Errno> {
        let c = IommuIoasAlloc {
            size: size32::<IommuIoasAlloc>(),
            ..Default::default()
        };
        Ok(self
            .cmd(IOMMUFD_CMD_IOAS_ALLOC, &c, &[], &[])?
            .0
            .out_ioas_id)
    }

    /// IOMMU_DESTROY.
    pub fn destroy(&self, id: u32) -> Result<(), Errno> {
        let c = IommuDestroy {
            size: size32::<IommuDestroy>(),
            id,
        };
        self.cmd(IOMMUFD_CMD_DESTROY, &c, &[], &[]).map(|_| ())
    }

    /// IOMMU_IOAS_MAP_FILE of `length` bytes of `fd` from `start`; at
    /// `iova` with `FIXED_IOVA` in `flags`. Returns the IOVA.
    pub fn ioas_map_file(
        &self,
        ioas_id: u32,
        fd: BorrowedFd<'_>,
        start: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        let c = IommuIoasMapFile {
            size: size32::<IommuIoasMapFile>(),
            flags,
            ioas_id,
            fd: fd.as_raw_fd(),
            start,
            length,
            iova,
        };
        Ok(self
            .cmd(IOMMUFD_CMD_IOAS_MAP_FILE, &c, &[], &[fd.as_raw_fd()])?
            .0
            .iova)
    }

    /// IOMMU_IOAS_MAP (`user_va` = offset in `fd`). Returns the IOVA.
    pub fn ioas_map(
        &self,
        ioas_id: u32,
        fd: BorrowedFd<'_>,
        user_va: u64,
        length: u64,
        iova: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        let c = IommuIoasMap {
            size: size32::<IommuIoasMap>(),
            flags,
            ioas_id,
            __reserved: 0,
            user_va,
            length,
            iova,
        };
        Ok(self
            .cmd(IOMMUFD_CMD_IOAS_MAP, &c, &[], &[fd.as_raw_fd()])?
            .0
            .iova)
    }

    /// IOMMU_IOAS_UNMAP. Returns the bytes unmapped.
    pub fn ioas_unmap(&self, ioas_id: u32, iova: u64, length: u64) -> Result<u64, Errno> {
        let c = IommuIoasUnmap {
            size: size32::<IommuIoasUnmap>(),
            ioas_id,
            iova,
            length,
        };
        Ok(self.cmd(IOMMUFD_CMD_IOAS_UNMAP, &c, &[], &[])?.0.length)
    }

    /// IOMMU_IOAS_COPY. Returns the destination IOVA.
    pub fn ioas_copy(
        &self,
        dst: u32,
        src: u32,
        length: u64,
        dst_iova: u64,
        src_iova: u64,
        flags: u32,
    ) -> Result<u64, Errno> {
        let c = IommuIoasCopy {
            size: size32::<IommuIoasCopy>(),
            flags,
            dst_ioas_id: dst,
            src_ioas_id: src,
            length,
            dst_iova,
            src_iova,
        };
        Ok(self.cmd(IOMMUFD_CMD_IOAS_COPY, &c, &[], &[])?.0.dst_iova)
    }

    /// IOMMU_IOAS_IOVA_RANGES with room for `capacity` ranges: the ranges
    /// and the alignment.
    pub fn ioas_iova_ranges(
        &self,
        ioas_id: u32,
        capacity: u32,
    ) -> Result<(Vec<(u64, u64)>, u64), Errno> {
        let c = IommuIoasIovaRanges {
            size: size32::<IommuIoasIovaRanges>(),
            ioas_id,
            num_iovas: capacity,
            ..Default::default()
        };
        let (out, r) = self.cmd(IOMMUFD_CMD_IOAS_IOVA_RANGES, &c, &[], &[])?;
        let ranges = r
            .after(std::mem::size_of::<IommuIoasIovaRanges>())
            .chunks_exact(16)
            .map(|w| {
                let mut a = [0u8; 8];
                let mut b = [0u8; 8];
                a.copy_from_slice(&w[..8]);
                b.copy_from_slice(&w[8..]);
                (u64::from_le_bytes(a), u64::from_le_bytes(b))
            })
            .collect();
        Ok((ranges, out.out_iova_alignment))
    }

    /// IOMMU_IOAS_ALLOW_IOVAS.
    pub fn ioas_allow_iovas(&self, ioas_id: u32, ranges: &[(u64, u64)]) -> Result<(), Errno> {
        let c = IommuIoasAllowIovas {
            size: size32::<IommuIoasAllowIovas>(),
            ioas_id,
            num_iovas: u32::try_from(ranges.len()).map_err(|_| Errno::EINVAL)?,
            ..Default::default()
        };
        let extra: Vec<u8> = ranges
            .iter()
            .flat_map(|(s, l)| [s.to_le_bytes(), l.to_le_bytes()].concat())
            .collect();
        self.cmd(IOMMUFD_CMD_IOAS_ALLOW_IOVAS, &c, &extra, &[])
            .map(|_| ())
    }

    /// IOMMU_HWPT_ALLOC. Returns the HWPT id.
    pub fn hwpt_alloc(&self, dev_id: u32, pt_id: u32) -> Result<u32, Errno> {
        let c = IommuHwptAlloc {
            size: size32::<IommuHwptAlloc>(),
            dev_id,
            pt_id,
            ..Default::default()
        };
        Ok(self
            .cmd(IOMMUFD_CMD_HWPT_ALLOC, &c, &[], &[])?
            .0
            .out_hwpt_id)
    }

    /// IOMMU_GET_HW_INFO.
    pub fn get_hw_info(&self, dev_id: u32) -> Result<IommuHwInfo, Errno> {
        let c = IommuHwInfo {
            size: size32::<IommuHwInfo>(),
            dev_id,
            ..Default::default()
        };
        Ok(self.cmd(IOMMUFD_CMD_GET_HW_INFO, &c, &[], &[])?.0)
    }

    // --- device -----------------------------------------------------------

    /// VFIO_DEVICE_BIND_IOMMUFD. Returns the device id.
    pub fn bind_iommufd(&self, iommufd: &File) -> Result<u32, Errno> {
        let c = VfioDeviceBindIommufd {
            argsz: size32::<VfioDeviceBindIommufd>(),
            flags: 0,
            iommufd: iommufd.sock.as_raw_fd(),
            out_devid: 0,
        };
        Ok(self
            .cmd(
                VFIO_DEVICE_BIND_IOMMUFD,
                &c,
                &[],
                &[iommufd.sock.as_raw_fd()],
            )?
            .0
            .out_devid)
    }

    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT. Returns the HWPT id.
    pub fn attach_pt(&self, pt_id: u32) -> Result<u32, Errno> {
        let c = VfioDeviceAttachIommufdPt {
            argsz: size32::<VfioDeviceAttachIommufdPt>(),
            flags: 0,
            pt_id,
            pasid: 0,
        };
        Ok(self
            .cmd(VFIO_DEVICE_ATTACH_IOMMUFD_PT, &c, &[], &[])?
            .0
            .pt_id)
    }

    /// VFIO_DEVICE_DETACH_IOMMUFD_PT.
    pub fn detach_pt(&self) -> Result<(), Errno> {
        let c = VfioDeviceDetachIommufdPt {
            argsz: size32::<VfioDeviceDetachIommufdPt>(),
            ..Default::default()
        };
        self.cmd(VFIO_DEVICE_DETACH_IOMMUFD_PT, &c, &[], &[])
            .map(|_| ())
    }

    /// VFIO_DEVICE_GET_INFO.
    pub fn device_info(&self) -> Result<VfioDeviceInfo, Errno> {
        let c = VfioDeviceInfo {
            argsz: size32::<VfioDeviceInfo>(),
            ..Default::default()
        };
        Ok(self.cmd(VFIO_DEVICE_GET_INFO, &c, &[], &[])?.0)
    }

    /// VFIO_DEVICE_GET_REGION_INFO.
    pub fn region_info(&self, index: u32) -> Result<VfioRegionInfo, Errno> {
        let c = VfioRegionInfo {
            argsz: size32::<VfioRegionInfo>(),
            index,
            ..Default::default()
        };
        Ok(self.cmd(VFIO_DEVICE_GET_REGION_INFO, &c, &[], &[])?.0)
    }

    /// VFIO_DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&self, index: u32) -> Result<VfioIrqInfo, Errno> {
        let c = VfioIrqInfo {
            argsz: size32::<VfioIrqInfo>(),
            index,
            ..Default::default()
        };
        Ok(self.cmd(VFIO_DEVICE_GET_IRQ_INFO, &c, &[], &[])?.0)
    }

    /// VFIO_DEVICE_SET_IRQS with DATA_EVENTFD | ACTION_TRIGGER: vectors
    /// `start..` get `fds` (None de-assigns).
    pub fn set_irqs_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<(), Errno> {
        let count = u32::try_from(fds.len()).map_err(|_| Errno::EINVAL)?;
        let mut raw = Vec::new();
        let mut data = Vec::new();
        for fd in fds {
            let i = match fd {
                Some(fd) => {
                    raw.push(fd.as_raw_fd());
                    i32::try_from(raw.len() - 1).map_err(|_| Errno::EINVAL)?
                }
                None => -1,
            };
            data.extend_from_slice(&i.to_le_bytes());
        }
        let c = VfioIrqSet {
            argsz: size32::<VfioIrqSet>() + u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count,
        };
        self.cmd(VFIO_DEVICE_SET_IRQS, &c, &data, &raw).map(|_| ())
    }

    /// VFIO_DEVICE_SET_IRQS with raw fields and data (tests).
    pub fn set_irqs_raw(&self, hdr: &VfioIrqSet, data: &[u8], fds: &[RawFd]) -> Result<(), Errno> {
        self.cmd(VFIO_DEVICE_SET_IRQS, hdr, data, fds).map(|_| ())
    }

    /// VFIO_DEVICE_RESET.
    pub fn reset(&self) -> Result<(), Errno> {
        self.call(VFIO_DEVICE_RESET, &[], &[])?.ok().map(|_| ())
    }

    /// VFIO_DEVICE_IOEVENTFD: `fd` fires a write of `data` (`size` bytes)
    /// at device file offset `offset`; None de-assigns.
    pub fn ioeventfd(
        &self,
        offset: u64,
        size: u32,
        data: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), Errno> {
        let c = VfioDeviceIoeventfd {
            argsz: size32::<VfioDeviceIoeventfd>(),
            flags: size,
            offset,
            data,
            fd: fd.map_or(-1, |f| f.as_raw_fd()),
            reserved: 0,
        };
        let raw: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        self.cmd(VFIO_DEVICE_IOEVENTFD, &c, &[], &raw).map(|_| ())
    }

    /// VCDEV_REGION_READ (pread) of `count` bytes at `offset`.
    pub fn region_read(&self, offset: u64, count: u32) -> Result<Vec<u8>, Errno> {
        let c = VcdevRegionRw {
            offset,
            count,
            reserved: 0,
        };
        let r = self.call(VCDEV_REGION_READ, c.as_slice(), &[])?;
        let n = usize::try_from(r.ok()?).map_err(|_| Errno::EINVAL)?;
        Ok(r.after(VcdevRegionRw::SIZE)
            .get(..n)
            .unwrap_or_default()
            .to_vec())
    }

    /// VCDEV_REGION_WRITE (pwrite) of `data` at `offset`.
    pub fn region_write(&self, offset: u64, data: &[u8]) -> Result<usize, Errno> {
        let c = VcdevRegionRw {
            offset,
            count: u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?,
            reserved: 0,
        };
        let mut p = c.as_slice().to_vec();
        p.extend_from_slice(data);
        let r = self.call(VCDEV_REGION_WRITE, &p, &[])?;
        usize::try_from(r.ok()?).map_err(|_| Errno::EINVAL)
    }

    // --- container and group ------------------------------------------------

    /// VFIO_GET_API_VERSION.
    pub fn get_api_version(&self) -> Result<i32, Errno> {
        self.call(VFIO_GET_API_VERSION, &[], &[])?.ok()
    }

    /// VFIO_CHECK_EXTENSION.
    pub fn check_extension(&self, ext: u32) -> Result<i32, Errno> {
        self.call(VFIO_CHECK_EXTENSION, &ext.to_le_bytes(), &[])?
            .ok()
    }

    /// VFIO_SET_IOMMU.
    pub fn set_iommu(&self, ty: u32) -> Result<(), Errno> {
        self.call(VFIO_SET_IOMMU, &ty.to_le_bytes(), &[])?
            .ok()
            .map(|_| ())
    }

    /// VFIO_IOMMU_GET_INFO with `argsz` (capabilities follow in the reply).
    pub fn iommu_get_info(&self, argsz: u32) -> Result<(VfioIommuType1Info, Reply), Errno> {
        let c = VfioIommuType1Info {
            argsz,
            ..Default::default()
        };
        let extra = vec![
            0u8;
            usize::try_from(argsz)
                .unwrap_or(0)
                .saturating_sub(VfioIommuType1Info::SIZE)
        ];
        self.cmd(VFIO_IOMMU_GET_INFO, &c, &extra, &[])
    }

    /// VFIO_IOMMU_MAP_DMA (`vaddr` = offset in `fd`).
    pub fn map_dma(
        &self,
        fd: BorrowedFd<'_>,
        vaddr: u64,
        iova: u64,
        size: u64,
        flags: u32,
    ) -> Result<(), Errno> {
        let c = VfioIommuType1DmaMap {
            argsz: size32::<VfioIommuType1DmaMap>(),
            flags,
            vaddr,
            iova,
            size,
        };
        self.cmd(VFIO_IOMMU_MAP_DMA, &c, &[], &[fd.as_raw_fd()])
            .map(|_| ())
    }

    /// VFIO_IOMMU_UNMAP_DMA. Returns the bytes unmapped.
    pub fn unmap_dma(&self, iova: u64, size: u64, flags: u32) -> Result<u64, Errno> {
        let c = VfioIommuType1DmaUnmap {
            argsz: size32::<VfioIommuType1DmaUnmap>(),
            flags,
            iova,
            size,
        };
        Ok(self.cmd(VFIO_IOMMU_UNMAP_DMA, &c, &[], &[])?.0.size)
    }

    /// VFIO_GROUP_GET_STATUS: its flags.
    pub fn group_get_status(&self) -> Result<u32, Errno> {
        let c = VfioGroupStatus {
            argsz: size32::<VfioGroupStatus>(),
            flags: 0,
        };
        Ok(self.cmd(VFIO_GROUP_GET_STATUS, &c, &[], &[])?.0.flags)
    }

    /// VFIO_GROUP_SET_CONTAINER.
    pub fn group_set_container(&self, container: &File) -> Result<(), Errno> {
        let fd = container.sock.as_raw_fd();
        self.call(VFIO_GROUP_SET_CONTAINER, &fd.to_le_bytes(), &[fd])?
            .ok()
            .map(|_| ())
    }

    /// VFIO_GROUP_UNSET_CONTAINER.
    pub fn group_unset_container(&self) -> Result<(), Errno> {
        self.call(VFIO_GROUP_UNSET_CONTAINER, &[], &[])?
            .ok()
            .map(|_| ())
    }

    /// VFIO_GROUP_GET_DEVICE_FD: the device file of `name`.
    pub fn group_get_device_fd(&self, name: &str) -> Result<File, Errno> {
        let mut p = name.as_bytes().to_vec();
        p.push(0);
        let r = self.call(VFIO_GROUP_GET_DEVICE_FD, &p, &[])?;
        r.ok()?;
        let fd = r.fds.into_iter().next().ok_or_else(pipe)?;
        Ok(File::from_fd(fd))
    }
}
