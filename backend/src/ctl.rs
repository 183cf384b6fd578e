//! `vcdev ctl`: a control socket (`DIR/control`, mode 0600) answering
//! `list`, `show NAME`, `stats NAME` and `resize NAME [SIZE] [--shrink]`
//! with text.
//!
//! It speaks the cdev framing ([`crate::wire`], the one codec): one
//! request `VCDEV_CTL` whose payload is the command line, one reply whose
//! payload is `i32 result` (0, or `-ENOENT` for an unknown device,
//! `-EINVAL` for an unknown command) and the text. The client is
//! [`ctl`], used by `vcdev ctl`.

use std::fmt::Write as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, warn};
use vcdev_iommu::Errno;

use crate::cdev::device::CdevDevice;
use crate::cdev::vfio_uapi::VCDEV_CTL;
use crate::cdev::Server;
use crate::registry::OwnerKind;
use crate::wire::{self, FlagPolicy, FrameHeader, FLAG_REPLY};

/// The control socket's name under `DIR`.
pub const CONTROL_SOCKET: &str = "control";

/// Binds `DIR/control` and answers commands on a thread of its own.
pub fn serve(dir: &Path, server: Arc<Server>) -> std::io::Result<PathBuf> {
    let path = dir.join(CONTROL_SOCKET);
    let listener = crate::socket::listen(&path, Some(0o600)).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("ctl".into())
        .spawn(move || accept_loop(&listener, &server))?;
    Ok(path)
}

/// Sends a `vcdev ctl` command on the control socket `path`; returns its
/// text answer, or the errno with the server's message.
pub fn ctl(path: &Path, command: &str) -> Result<String, (Errno, String)> {
    let conn = UnixStream::connect(path).map_err(|e| (Errno::from_io(&e), e.to_string()))?;
    let size = u32::try_from(command.len()).map_err(|_| (Errno::E2BIG, String::new()))?;
    wire::write_frame(
        &conn,
        &FrameHeader::request(VCDEV_CTL, 0, size),
        command.as_bytes(),
        &[],
    )
    .map_err(|e| (Errno(libc::EPIPE), e.to_string()))?;
    let f = wire::read_frame(&conn, FlagPolicy::CDEV)
        .map_err(|e| (Errno(libc::EPIPE), e.to_string()))?
        .ok_or((Errno(libc::EPIPE), "connection closed".to_owned()))?;
    let r = f
        .payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_le_bytes)
        .ok_or((Errno(libc::EPIPE), "short reply".to_owned()))?;
    let text = String::from_utf8_lossy(f.payload.get(4..).unwrap_or_default()).into_owned();
    if r < 0 {
        Err((Errno(r.saturating_neg()), text))
    } else {
        Ok(text)
    }
}

fn accept_loop(listener: &UnixListener, server: &Arc<Server>) {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!("control socket: accept failed: {e}");
                continue;
            }
        };
        let frame = match wire::read_frame(&conn, FlagPolicy::CDEV) {
            Ok(Some(f)) if f.header.request == VCDEV_CTL && f.fds.is_empty() => f,
            Ok(_) => continue,
            Err(e) => {
                debug!("control socket: {e}");
                continue;
            }
        };
        let cmd = String::from_utf8_lossy(&frame.payload).into_owned();
        let (result, text) = match answer(server, cmd.trim()) {
            Ok(t) => (0, t),
            Err((e, t)) => (e.to_result(), t),
        };
        let mut p = result.to_le_bytes().to_vec();
        p.extend_from_slice(text.as_bytes());
        p.truncate(usize::try_from(wire::MAX_PAYLOAD).unwrap_or(usize::MAX));
        let size = u32::try_from(p.len()).unwrap_or(0);
        let _ = wire::write_frame(
            &conn,
            &FrameHeader::request(VCDEV_CTL, FLAG_REPLY, size),
            &p,
            &[],
        );
    }
}

fn owner_line(d: &CdevDevice) -> String {
    let (own, group) = d.reg().owner_state();
    match (own, group) {
        (Some((OwnerKind::VhostUser, who)), _) => format!("vhost-user {who}"),
        (Some((OwnerKind::Cdev, who)), _) => format!("cdev {who}"),
        (None, Some(g)) => format!("group file vfio/{g}"),
        (None, None) => "none".to_owned(),
    }
}

fn state_line(d: &CdevDevice) -> String {
    let h = d.handle();
    let bound = h.bound_id().map_or("unbound".to_owned(), |id| {
        format!("bound as device {}", id.0)
    });
    let attached = if h.address_space().is_some() {
        "attached"
    } else {
        "not attached"
    };
    format!(
        "{bound}, {attached}, queues running {:?}",
        d.running_queues()
    )
}

fn answer(server: &Server, cmd: &str) -> Result<String, (Errno, String)> {
    let mut words = cmd.split_whitespace();
    let verb = words.next().unwrap_or("");
    let arg = words.next();
    let device = |name: Option<&str>| {
        let name = name.ok_or((Errno::EINVAL, "a device name is needed\n".to_owned()))?;
        server
            .device(name)
            .ok_or_else(|| (Errno::ENOENT, format!("no device {name}\n")))
    };
    let mut out = String::new();
    match verb {
        "list" => {
            for d in server.devices() {
                let _ = writeln!(
                    out,
                    "{}\tgroup {}\towner {}\t{}",
                    d.name(),
                    d.reg().group(),
                    owner_line(d),
                    state_line(d)
                );
            }
        }
        "show" => {
            let d = device(arg)?;
            let view = d.reg().iommu_view();
            let _ = writeln!(out, "device {}", d.name());
            let _ = writeln!(
                out,
                "path devices/{} group vfio/{}",
                d.name(),
                d.reg().group()
            );
            let _ = writeln!(out, "owner {}", owner_line(d));
            let _ = writeln!(out, "state {}", state_line(d));
            let _ = writeln!(
                out,
                "aperture {:#x}-{:#x}",
                view.aperture.start, view.aperture.last
            );
            for r in &view.reserved {
                let _ = writeln!(out, "reserved {:#x}-{:#x}", r.start, r.last);
            }
            let _ = writeln!(out, "capacity {} bytes", d.blk().capacity_bytes());
            match d.handle().address_space() {
                Some(space) => {
                    let extents = space.with_tree(|t| t.overlapping(0, u64::MAX));
                    let _ = writeln!(out, "mappings {}", extents.len());
                    for e in extents.iter().take(256) {
                        let _ = writeln!(out, "  {:#x}-{:#x} {:?}", e.start, e.last, e.perm);
                    }
                }
                None => {
                    let _ = writeln!(out, "mappings none (DMA blocked)");
                }
            }
        }
        "stats" => {
            let d = device(arg)?;
            for (k, v) in d.counters().snapshot() {
                let _ = writeln!(out, "{k} {v}");
            }
        }
        "resize" => return resize(device(arg)?, words.collect()),
        _ => {
            return Err((
                Errno::EINVAL,
                format!(
                    "unknown command {verb:?}: list, show NAME, stats NAME, \
                     resize NAME [SIZE] [--shrink]\n"
                ),
            ))
        }
    }
    Ok(out)
}

/// `resize NAME [SIZE] [--shrink]`: SIZE in bytes with an optional K, M or
/// G suffix; without it, the size the backing has now (a block device the
/// operator grew). Errnos: [`ResizeError::errno`](vcdev_device_model::blk::ResizeError::errno)
/// (EPERM for a shrink without `--shrink`, EROFS, EINVAL, EOPNOTSUPP,
/// EFBIG), EINVAL for bad arguments.
fn resize(d: &CdevDevice, args: Vec<&str>) -> Result<String, (Errno, String)> {
    let usage = |why: String| {
        (
            Errno::EINVAL,
            format!("{why}: resize NAME [SIZE] [--shrink]\n"),
        )
    };
    let (flags, sizes): (Vec<&str>, Vec<&str>) = args.into_iter().partition(|a| a.starts_with('-'));
    let shrink = match flags.as_slice() {
        [] => false,
        ["--shrink"] => true,
        _ => return Err(usage(format!("unknown options {flags:?}"))),
    };
    let size = match sizes.as_slice() {
        [] => None,
        [s] => Some(crate::config::parse_size(s).ok_or_else(|| usage(format!("bad SIZE {s:?}")))?),
        _ => return Err(usage("too many arguments".to_owned())),
    };
    let bytes = d.reg().resize(size, shrink).map_err(|e| {
        (
            Errno(e.errno()),
            format!("{}: {}\n", d.name(), crate::error_chain(&e)),
        )
    })?;
    Ok(format!(
        "{}: capacity {bytes} bytes ({} sectors)\n",
        d.name(),
        bytes >> vcdev_device_model::blk::SECTOR_SHIFT
    ))
}
