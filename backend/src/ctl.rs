//! `vcdev ctl`: the control socket (`DIR/control`, mode 0600, root and
//! the daemon's own uid only) and its client.
//!
//! Each connection carries one request and one reply, in the cdev framing
//! ([`crate::wire`], the one codec): a `VCDEV_CTL` frame whose payload is a
//! [`Request`] in JSON, answered by a `VCDEV_CTL` reply whose payload is a
//! [`Reply`] in JSON. That wire format is internal; the stable interface is
//! the command line and its `--json` output, whose fields the README
//! documents. Each request runs on a thread of its own, never on the
//! daemon's event loop (a forced removal waits for a queue to drain).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vcdev_iommu::Errno;

use crate::cdev::device::CdevDevice;
use crate::cdev::vfio_uapi::VCDEV_CTL;
use crate::config::{parse_size, Backing, DeviceSpec};
use crate::daemon::{Daemon, OpError};
use crate::registry::OwnerKind;
use crate::state::{Origin, Planned};
use crate::wire::{self, FlagPolicy, FrameHeader, FLAG_REPLY};

/// The control socket's name under `DIR`.
pub const CONTROL_SOCKET: &str = "control";

/// A command: the `vcdev ctl` subcommands (clap) and the control
/// socket's requests (serde) are one type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Every device: name, group, capacity, owner, cdev state.
    List,
    /// One device in detail (IOMMU view and mappings).
    Show {
        /// The device.
        name: String,
    },
    /// A device's counters.
    Stats {
        /// The device.
        name: String,
    },
    /// Add a device (SPEC as for serve --device); prints its QEMU options.
    /// It is kept in DIR/state.json and comes back when the daemon restarts.
    Add {
        /// blk[,name=NAME][,path=FILE|ram=SIZE]... (a relative path is taken
        /// from the current directory).
        spec: String,
    },
    /// Remove a device. Refused while a frontend or a cdev file holds it.
    Remove {
        /// The device.
        name: String,
        /// Disconnect a vhost-user holder (after quiescing its queues and
        /// flushing); a cdev holder gets its REQ irq, then ENODEV.
        #[arg(long)]
        force: bool,
    },
    /// Set a device's I/O limits live: iops=N (requests per second),
    /// bw=BYTES (per second, K/M/G suffixes); 0 removes a limit. Kept across
    /// restarts.
    Set {
        /// The device.
        name: String,
        /// iops=N and/or bw=BYTES.
        #[arg(required = true)]
        options: Vec<String>,
    },
    /// Resize a file-backed or RAM disk to SIZE (K, M, G suffixes, a
    /// multiple of 512), or without SIZE take the size its block device or
    /// image has now; refused for readonly=on devices. The guest is told.
    Resize {
        /// The device.
        name: String,
        /// The new size.
        size: Option<String>,
        /// Allow a smaller SIZE (destroys the data past the new end;
        /// requests beyond it then fail with IOERR).
        #[arg(long)]
        shrink: bool,
    },
}

/// A reply: the result's JSON, or an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// Done.
    Ok {
        /// The result.
        ok: Value,
    },
    /// Refused or failed.
    Err(CtlError),
}

/// An error as `vcdev ctl --json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{error}")]
pub struct CtlError {
    /// What went wrong, with its causes.
    pub error: String,
    /// The errno.
    pub errno: i32,
    /// A usage error (bad SPEC or arguments): exit code 2, not 1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub usage: bool,
}

impl CtlError {
    fn new(errno: Errno, error: String) -> CtlError {
        CtlError {
            error,
            errno: errno.0,
            usage: false,
        }
    }

    fn usage(error: String) -> CtlError {
        CtlError {
            error,
            errno: libc::EINVAL,
            usage: true,
        }
    }
}

impl From<OpError> for CtlError {
    fn from(e: OpError) -> CtlError {
        CtlError {
            error: crate::error_chain(&e),
            errno: e.errno().0,
            usage: e.is_usage(),
        }
    }
}

/// Sends `req` to the daemon of control socket `path`; its result.
pub fn request(path: &Path, req: &Request) -> Result<Value, CtlError> {
    let no_daemon = |e: &dyn std::fmt::Display| {
        CtlError::new(
            Errno(libc::ECONNREFUSED),
            format!("no daemon answers on {}: {e}", path.display()),
        )
    };
    let conn = UnixStream::connect(path).map_err(|e| no_daemon(&e))?;
    let body = serde_json::to_vec(req).map_err(|e| CtlError::usage(e.to_string()))?;
    let size = u32::try_from(body.len()).map_err(|_| CtlError::usage("request too long".into()))?;
    wire::write_frame(&conn, &FrameHeader::request(VCDEV_CTL, 0, size), &body, &[])
        .map_err(|e| no_daemon(&e))?;
    let f = wire::read_frame(&conn, FlagPolicy::CDEV)
        .map_err(|e| no_daemon(&e))?
        .ok_or_else(|| no_daemon(&"it closed the connection"))?;
    match serde_json::from_slice(&f.payload) {
        Ok(Reply::Ok { ok }) => Ok(ok),
        Ok(Reply::Err(e)) => Err(e),
        Err(e) => Err(CtlError::new(
            Errno::EIO,
            format!("unreadable reply from the daemon: {e}"),
        )),
    }
}

/// Serves one control connection (on a thread of its own).
pub fn serve_one(conn: &UnixStream, daemon: &Daemon) {
    let frame = match wire::read_frame(conn, FlagPolicy::CDEV) {
        Ok(Some(f)) if f.header.request == VCDEV_CTL && f.fds.is_empty() => f,
        Ok(_) => return,
        Err(e) => {
            debug!("control socket: {e}");
            return;
        }
    };
    let reply = match serde_json::from_slice::<Request>(&frame.payload) {
        Ok(req) => match answer(daemon, &req) {
            Ok(ok) => Reply::Ok { ok },
            Err(e) => {
                warn!("ctl {req:?}: {}", e.error);
                Reply::Err(e)
            }
        },
        Err(e) => Reply::Err(CtlError::usage(format!("bad request: {e}"))),
    };
    let mut p = serde_json::to_vec(&reply).unwrap_or_default();
    if p.len() > wire::MAX_PAYLOAD as usize {
        p = serde_json::to_vec(&Reply::Err(CtlError::new(
            Errno::E2BIG,
            "the answer does not fit one frame".into(),
        )))
        .unwrap_or_default();
    }
    let size = u32::try_from(p.len()).unwrap_or(0);
    let _ = wire::write_frame(
        conn,
        &FrameHeader::request(VCDEV_CTL, FLAG_REPLY, size),
        &p,
        &[],
    );
}

fn owner_json(d: &CdevDevice) -> Value {
    let (own, group) = d.reg().owner_state();
    match (own, group) {
        (Some((OwnerKind::VhostUser, who)), _) => json!({"door": "vhost-user", "who": who}),
        (Some((OwnerKind::Cdev, who)), _) => json!({"door": "cdev", "who": who}),
        (None, Some(g)) => json!({"door": "group", "who": format!("vfio/{g}")}),
        (None, None) => Value::Null,
    }
}

fn state_json(d: &CdevDevice) -> Value {
    let h = d.handle();
    json!({
        "bound_as": h.bound_id().map(|id| id.0),
        "attached": h.address_space().is_some(),
        "queues_running": d.running_queues(),
    })
}

fn device_json(daemon: &Daemon, d: &CdevDevice) -> Value {
    let planned = daemon.planned(d.name());
    let spec = planned.as_ref().map(|p| &p.spec);
    let (backing, path) = match spec.map(|s| &s.backing) {
        Some(Backing::File(p)) => ("file", Some(p.display().to_string())),
        Some(Backing::Ram(_)) | None => ("ram", None),
    };
    json!({
        "name": d.name(),
        "backing": backing,
        "path": path,
        "capacity_bytes": d.blk().capacity_bytes(),
        "read_only": spec.is_some_and(|s| s.read_only),
        "direct": spec.is_some_and(|s| s.direct),
        "aio": d.blk().aio().to_string(),
        "queues": spec.map(|s| s.queues),
        "queue_size": spec.map(|s| s.queue_size),
        "group": d.reg().group(),
        "iops": d.blk().limits().iops,
        "bw": d.blk().limits().bw,
        "origin": match planned.map(|p| p.origin) {
            Some(Origin::Added) => "added",
            _ => "command-line",
        },
        "owner": owner_json(d),
        "cdev": state_json(d),
        "vhost_user_socket": daemon.dir().join("vhost-user").join(d.name()),
        "cdev_node": daemon.dir().join("devices").join(d.name()),
    })
}

fn lookup(daemon: &Daemon, name: &str) -> Result<std::sync::Arc<CdevDevice>, CtlError> {
    daemon
        .cdev()
        .device(name)
        .ok_or_else(|| CtlError::from(OpError::NoDevice(name.into())))
}

/// The lowest `vfioN` no device has: the name of a device added without
/// one.
fn free_name(daemon: &Daemon) -> String {
    (0..)
        .map(|i| format!("vfio{i}"))
        .find(|n| daemon.registry().get(n).is_none())
        .unwrap_or_default()
}

fn answer(daemon: &Daemon, req: &Request) -> Result<Value, CtlError> {
    match req {
        Request::List => {
            let devices: Vec<Value> = daemon
                .cdev()
                .devices()
                .iter()
                .map(|d| device_json(daemon, d))
                .collect();
            Ok(json!({ "devices": devices }))
        }
        Request::Show { name } => {
            let d = lookup(daemon, name)?;
            let mut v = device_json(daemon, &d);
            let view = d.reg().iommu_view();
            v["aperture"] = json!([view.aperture.start, view.aperture.last]);
            v["reserved"] = view
                .reserved
                .iter()
                .map(|r| json!([r.start, r.last]))
                .collect();
            v["mappings"] = match d.handle().address_space() {
                Some(space) => space
                    .with_tree(|t| t.overlapping(0, u64::MAX))
                    .iter()
                    .take(256)
                    .map(|e| json!({"start": e.start, "last": e.last, "perm": format!("{:?}", e.perm)}))
                    .collect(),
                None => Value::Null,
            };
            Ok(v)
        }
        Request::Stats { name } => {
            let d = lookup(daemon, name)?;
            let counters: BTreeMap<&str, u64> = d.counters().snapshot().into_iter().collect();
            Ok(json!({ "name": name, "counters": counters }))
        }
        Request::Add { spec } => {
            let mut source = spec.clone();
            if crate::state::spec_name(spec).is_none() {
                let _ = write!(source, ",name={}", free_name(daemon));
            }
            let parsed = DeviceSpec::parse(&source, 0).map_err(OpError::from)?;
            let added = daemon.add(Planned {
                spec: parsed,
                source,
                origin: Origin::Added,
            })?;
            info!("ctl: added {}", added.name);
            Ok(serde_json::to_value(added).unwrap_or(Value::Null))
        }
        Request::Remove { name, force } => {
            let who = daemon.remove(name, *force)?;
            Ok(json!({ "name": name, "removed": true, "disconnected": who }))
        }
        Request::Set { name, options } => {
            let l = daemon.set_limits(name, options)?;
            Ok(json!({ "name": name, "iops": l.iops, "bw": l.bw }))
        }
        Request::Resize { name, size, shrink } => {
            let size = match size {
                Some(s) => Some(parse_size(s).ok_or_else(|| {
                    CtlError::usage(format!(
                        "bad SIZE {s:?}: bytes with an optional K, M or G suffix"
                    ))
                })?),
                None => None,
            };
            let d = lookup(daemon, name)?;
            let from = d.blk().capacity_bytes();
            let bytes = d.reg().resize(size, *shrink).map_err(|e| {
                CtlError::new(
                    Errno(e.errno()),
                    format!("{name}: {}", crate::error_chain(&e)),
                )
            })?;
            // A RAM disk's size lives in the daemon alone: keep it.
            let ram = daemon
                .planned(name)
                .is_some_and(|p| matches!(p.spec.backing, Backing::Ram(_)));
            if ram && bytes != from {
                daemon
                    .record_change(name, "ram", &bytes.to_string())
                    .map_err(CtlError::from)?;
            }
            Ok(json!({ "name": name, "capacity_bytes": bytes, "previous_bytes": from }))
        }
    }
}

/// Makes a relative `path=` of SPEC absolute against `cwd` (the daemon
/// opens it, from its own working directory).
pub fn absolute_paths(spec: &str, cwd: &Path) -> String {
    spec.split(',')
        .map(|kv| match kv.strip_prefix("path=") {
            Some(p) if !p.is_empty() && Path::new(p).is_relative() => {
                format!("path={}", cwd.join(p).display())
            }
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The text `vcdev ctl` prints without `--json`.
pub fn render(req: &Request, v: &Value) -> String {
    let mut out = String::new();
    let owner = |d: &Value| match d.get("owner") {
        Some(o) if !o.is_null() => format!(
            "{} {}",
            o["door"].as_str().unwrap_or("?"),
            o["who"].as_str().unwrap_or("?")
        ),
        _ => "none".to_owned(),
    };
    let state = |d: &Value| {
        let c = &d["cdev"];
        format!(
            "{}, {}, queues running {}",
            c["bound_as"]
                .as_u64()
                .map_or("unbound".to_owned(), |id| format!("bound as device {id}")),
            if c["attached"].as_bool().unwrap_or(false) {
                "attached"
            } else {
                "not attached"
            },
            c["queues_running"]
        )
    };
    match req {
        Request::List => {
            for d in v["devices"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "{}\tgroup {}\t{} bytes\towner {}\t{}",
                    d["name"].as_str().unwrap_or("?"),
                    d["group"],
                    d["capacity_bytes"],
                    owner(d),
                    state(d)
                );
            }
        }
        Request::Show { .. } => {
            let name = v["name"].as_str().unwrap_or("?");
            let _ = writeln!(out, "device {name}");
            let _ = writeln!(out, "path devices/{name} group vfio/{}", v["group"]);
            let _ = writeln!(out, "owner {}", owner(v));
            let _ = writeln!(out, "state {}", state(v));
            let range = |r: &Value| {
                format!(
                    "{:#x}-{:#x}",
                    r[0].as_u64().unwrap_or(0),
                    r[1].as_u64().unwrap_or(0)
                )
            };
            let _ = writeln!(out, "aperture {}", range(&v["aperture"]));
            for r in v["reserved"].as_array().into_iter().flatten() {
                let _ = writeln!(out, "reserved {}", range(r));
            }
            let _ = writeln!(out, "capacity {} bytes", v["capacity_bytes"]);
            match v["mappings"].as_array() {
                Some(m) => {
                    let _ = writeln!(out, "mappings {}", m.len());
                    for e in m {
                        let _ = writeln!(
                            out,
                            "  {:#x}-{:#x} {}",
                            e["start"].as_u64().unwrap_or(0),
                            e["last"].as_u64().unwrap_or(0),
                            e["perm"].as_str().unwrap_or("")
                        );
                    }
                }
                None => {
                    let _ = writeln!(out, "mappings none (DMA blocked)");
                }
            }
        }
        Request::Stats { .. } => {
            for (k, n) in v["counters"].as_object().into_iter().flatten() {
                let _ = writeln!(out, "{k} {n}");
            }
        }
        Request::Add { .. } => {
            let _ = writeln!(
                out,
                "# {}: added; attach it with\n{}",
                v["name"].as_str().unwrap_or("?"),
                v["qemu"].as_str().unwrap_or("")
            );
        }
        Request::Set { name, .. } => {
            let _ = writeln!(
                out,
                "{name}: iops {} bw {} bytes/s (0: no limit)",
                v["iops"], v["bw"]
            );
        }
        Request::Resize { name, .. } => {
            let _ = writeln!(
                out,
                "{name}: capacity {} bytes ({} sectors)",
                v["capacity_bytes"],
                v["capacity_bytes"].as_u64().unwrap_or(0) >> vcdev_device_model::blk::SECTOR_SHIFT
            );
        }
        Request::Remove { name, .. } => match v["disconnected"].as_str() {
            Some(who) => {
                let _ = writeln!(out, "{name}: removed (disconnected {who})");
            }
            None => {
                let _ = writeln!(out, "{name}: removed");
            }
        },
    }
    out
}

/// Where the control socket of daemon directory `dir` is.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(CONTROL_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip_as_json() {
        let r = Request::Remove {
            name: "d".into(),
            force: true,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"command":"remove","name":"d","force":true}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let e = Reply::Err(CtlError::new(Errno::EBUSY, "busy".into()));
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"error":"busy","errno":16}"#);
        assert_eq!(serde_json::from_str::<Reply>(&s).unwrap(), e);
        let ok = Reply::Ok {
            ok: json!({"a": 1}),
        };
        let s = serde_json::to_string(&ok).unwrap();
        assert_eq!(serde_json::from_str::<Reply>(&s).unwrap(), ok);
    }

    #[test]
    fn relative_paths_are_made_absolute() {
        let cwd = Path::new("/srv");
        assert_eq!(
            absolute_paths("blk,path=a.img,name=x", cwd),
            "blk,path=/srv/a.img,name=x"
        );
        assert_eq!(absolute_paths("blk,path=/a.img", cwd), "blk,path=/a.img");
        assert_eq!(absolute_paths("blk,ram=1M", cwd), "blk,ram=1M");
    }
}
