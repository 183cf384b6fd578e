//! The iommufd file (`DIR/iommu`, the kernel's `/dev/iommu`) and, with
//! feature `group`, the container file (`DIR/vfio/vfio`): both are an
//! iommufd context; a container answers the type1 requests of
//! [`super::container`] over its compat IOAS instead of the iommufd ones,
//! as the kernel's iommufd-backed `/dev/vfio/vfio` does.
//!
//! Handlers decode, call one `Iommufd` method and encode; validation order
//! and errnos are the iommu crate's (the kernel's `ioas.c`).

use std::sync::{Arc, Mutex, MutexGuard};

use vcdev_iommu::sync::lock;
use vcdev_iommu::uapi::*;
use vcdev_iommu::{Errno, IoasError, Iommufd, SealPolicy};
use vm_memory::ByteValued;

use super::dispatch::{sized, Op, Out, Req};
use super::files::{FileKind, Files};
use crate::pod::pod_from;

/// Which node opened the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommufdKind {
    /// `DIR/iommu`.
    Iommufd,
    /// `DIR/vfio/vfio`.
    Container,
}

/// An iommufd (or container) file.
#[derive(Debug)]
pub struct IommufdFile {
    ictx: Arc<Iommufd>,
    kind: IommufdKind,
    ops: &'static [Op<IommufdFile>],
    name: String,
    /// The IOAS of the type1 compatibility layer (the kernel's
    /// `ictx->vfio_ioas`), and the type set by VFIO_SET_IOMMU.
    compat: Mutex<Compat>,
}

/// The container state of the type1 compatibility layer.
#[derive(Debug, Default)]
pub struct Compat {
    /// The compat IOAS.
    pub ioas: Option<u32>,
    /// VFIO_SET_IOMMU's type.
    pub iommu_type: Option<u32>,
}

impl IommufdFile {
    /// A fresh, empty iommufd context.
    pub fn new(files: &Files, seal_policy: SealPolicy) -> Arc<IommufdFile> {
        IommufdFile::with_ops(files, seal_policy, IommufdKind::Iommufd, IOMMUFD_OPS)
    }

    /// A fresh, empty context of kind `kind` answering `ops`.
    pub fn with_ops(
        files: &Files,
        seal_policy: SealPolicy,
        kind: IommufdKind,
        ops: &'static [Op<IommufdFile>],
    ) -> Arc<IommufdFile> {
        let name = match kind {
            IommufdKind::Iommufd => format!("iommufd#{}", files.next_seq()),
            IommufdKind::Container => format!("container#{}", files.next_seq()),
        };
        Arc::new(IommufdFile {
            ictx: Iommufd::new(seal_policy),
            kind,
            ops,
            name,
            compat: Mutex::new(Compat::default()),
        })
    }

    /// The context.
    pub fn ictx(&self) -> &Arc<Iommufd> {
        &self.ictx
    }

    /// Which node opened it.
    pub fn kind(&self) -> IommufdKind {
        self.kind
    }

    /// The compat state.
    pub fn compat(&self) -> MutexGuard<'_, Compat> {
        lock(&self.compat)
    }

    /// The compat IOAS, made on first use (the kernel's
    /// `iommufd_vfio_compat_ioas_create`).
    pub fn compat_ioas_create(&self) -> Result<u32, Errno> {
        let mut c = self.compat();
        if let Some(id) = c.ioas {
            return Ok(id);
        }
        let mut cmd = IommuIoasAlloc {
            size: u32::try_from(IommuIoasAlloc::MIN_SIZE).unwrap_or(0),
            ..Default::default()
        };
        let id = self.ictx.ioas_alloc(&mut cmd).map_err(|e| e.errno())?;
        c.ioas = Some(id.0);
        Ok(id.0)
    }
}

impl FileKind for IommufdFile {
    fn ops(&self) -> &'static [Op<Self>] {
        self.ops
    }

    fn release(&self) {
        // The context goes with its last Arc: now, or when the last device
        // bound to it unbinds.
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

fn ioas_err(e: IoasError) -> Errno {
    e.errno()
}

fn destroy(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: IommuDestroy = req.get();
    f.ictx.destroy(&cmd).map_err(|e| e.errno())?;
    Ok(Out::with(req, &cmd))
}

fn ioas_alloc(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: IommuIoasAlloc = req.get();
    f.ictx.ioas_alloc(&mut cmd).map_err(|e| e.errno())?;
    Ok(Out::with(req, &cmd))
}

/// The ranges that follow a struct: at most `count`, as many as present
/// (the payload cap bounds the allocation).
fn ranges_of(trailing: &[u8], count: u32) -> Vec<IommuIovaRange> {
    let n = usize::try_from(count).unwrap_or(usize::MAX);
    trailing
        .chunks_exact(std::mem::size_of::<IommuIovaRange>())
        .take(n)
        .map(pod_from::<IommuIovaRange>)
        .collect()
}

fn ioas_allow_iovas(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let cmd: IommuIoasAllowIovas = req.get();
    let ranges = ranges_of(&req.trailing, cmd.num_iovas);
    f.ictx.ioas_allow_iovas(&cmd, &ranges).map_err(ioas_err)?;
    Ok(Out::with(req, &cmd))
}

fn ioas_copy(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: IommuIoasCopy = req.get();
    f.ictx.ioas_copy(&mut cmd).map_err(ioas_err)?;
    Ok(Out::with(req, &cmd))
}

fn ranges_bytes(ranges: &[IommuIovaRange]) -> Vec<u8> {
    ranges.iter().flat_map(|r| r.as_slice().to_vec()).collect()
}

fn ioas_iova_ranges(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: IommuIoasIovaRanges = req.get();
    match f.ictx.ioas_iova_ranges(&mut cmd) {
        Ok(ranges) => Ok(Out::with(req, &cmd).trailing(&ranges_bytes(&ranges))),
        // PROTOCOL.md: on EMSGSIZE the struct and the partial ranges follow.
        Err(IoasError::RangesTooSmall { ranges, .. }) => {
            let mut out = Out::with(req, &cmd).trailing(&ranges_bytes(&ranges));
            out.result = Errno::EMSGSIZE.to_result();
            Ok(out)
        }
        Err(e) => Err(e.errno()),
    }
}

fn ioas_map(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: IommuIoasMap = req.get();
    let fd = req.take_fd();
    f.ictx.ioas_map(&mut cmd, fd).map_err(ioas_err)?;
    Ok(Out::with(req, &cmd))
}

fn ioas_map_file(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: IommuIoasMapFile = req.get();
    let fd = req.take_fd();
    f.ictx.ioas_map_file(&mut cmd, fd).map_err(ioas_err)?;
    Ok(Out::with(req, &cmd))
}

fn ioas_unmap(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: IommuIoasUnmap = req.get();
    f.ictx.ioas_unmap(&mut cmd).map_err(ioas_err)?;
    Ok(Out::with(req, &cmd))
}

fn option(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: IommuOption = req.get();
    f.ictx.option(&mut cmd).map_err(ioas_err)?;
    Ok(Out::with(req, &cmd))
}

fn hwpt_alloc(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: IommuHwptAlloc = req.get();
    f.ictx.hwpt_alloc(&mut cmd).map_err(|e| e.errno())?;
    Ok(Out::with(req, &cmd))
}

/// IOMMU_GET_HW_INFO (the kernel's `iommufd_get_hw_info`): flags or
/// reserved bytes EOPNOTSUPP, an unknown device ENOENT; the software
/// IOMMU has no driver data: type NONE, data_len 0, no capabilities.
fn get_hw_info(f: &IommufdFile, req: &mut Req) -> Result<Out, Errno> {
    let mut cmd: IommuHwInfo = req.get();
    if cmd.flags != 0 || cmd.__reserved != [0; 3] {
        return Err(Errno::EOPNOTSUPP);
    }
    f.ictx.device(cmd.dev_id).map_err(|e| e.errno())?;
    cmd.data_len = 0;
    cmd.out_data_type = IOMMU_HW_INFO_TYPE_NONE;
    cmd.out_max_pasid_log2 = 0;
    cmd.out_capabilities = 0;
    Ok(Out::with(req, &cmd))
}

/// The iommufd file's requests (PROTOCOL.md, "iommufd file requests").
pub static IOMMUFD_OPS: &[Op<IommufdFile>] = &[
    Op {
        code: IOMMUFD_CMD_DESTROY,
        name: "IOMMU_DESTROY",
        arg: sized!(IommuDestroy),
        max_fds: 0,
        handler: destroy,
    },
    Op {
        code: IOMMUFD_CMD_IOAS_ALLOC,
        name: "IOMMU_IOAS_ALLOC",
        arg: sized!(IommuIoasAlloc),
        max_fds: 0,
        handler: ioas_alloc,
    },
    Op {
        code: IOMMUFD_CMD_IOAS_ALLOW_IOVAS,
        name: "IOMMU_IOAS_ALLOW_IOVAS",
        arg: sized!(IommuIoasAllowIovas),
        max_fds: 0,
        handler: ioas_allow_iovas,
    },
    Op {
        code: IOMMUFD_CMD_IOAS_COPY,
        name: "IOMMU_IOAS_COPY",
        arg: sized!(IommuIoasCopy),
        max_fds: 0,
        handler: ioas_copy,
    },
    Op {
        code: IOMMUFD_CMD_IOAS_IOVA_RANGES,
        name: "IOMMU_IOAS_IOVA_RANGES",
        arg: sized!(IommuIoasIovaRanges),
        max_fds: 0,
        handler: ioas_iova_ranges,
    },
    Op {
        code: IOMMUFD_CMD_IOAS_MAP,
        name: "IOMMU_IOAS_MAP",
        arg: sized!(IommuIoasMap),
        max_fds: 1,
        handler: ioas_map,
    },
    Op {
        code: IOMMUFD_CMD_IOAS_UNMAP,
        name: "IOMMU_IOAS_UNMAP",
        arg: sized!(IommuIoasUnmap),
        max_fds: 0,
        handler: ioas_unmap,
    },
    Op {
        code: IOMMUFD_CMD_OPTION,
        name: "IOMMU_OPTION",
        arg: sized!(IommuOption),
        max_fds: 0,
        handler: option,
    },
    Op {
        code: IOMMUFD_CMD_HWPT_ALLOC,
        name: "IOMMU_HWPT_ALLOC",
        arg: sized!(IommuHwptAlloc),
        max_fds: 0,
        handler: hwpt_alloc,
    },
    Op {
        code: IOMMUFD_CMD_GET_HW_INFO,
        name: "IOMMU_GET_HW_INFO",
        arg: sized!(IommuHwInfo),
        max_fds: 0,
        handler: get_hw_info,
    },
    Op {
        code: IOMMUFD_CMD_IOAS_MAP_FILE,
        name: "IOMMU_IOAS_MAP_FILE",
        arg: sized!(IommuIoasMapFile),
        max_fds: 1,
        handler: ioas_map_file,
    },
];
