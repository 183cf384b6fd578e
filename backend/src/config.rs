//! The validated configuration of `vcdev serve`, and the `--device SPEC`
//! syntax:
//!
//! `blk[,name=NAME][,path=FILE|ram=SIZE][,readonly=on][,queues=N][,queue-size=N][,serial=S]`
//! `[,direct=on|off][,aio=auto|io_uring|sync]`
//! `[,iova-aperture=START-LAST][,iova-reserved=START-LAST]...[,group=N]`
//! `[,iops=N][,bw=SIZE][,poll-us=N]`
//!
//! Sizes take a K, M or G suffix (powers of 1024); addresses take decimal or
//! `0x` hex; `iova-reserved` may be repeated. `iops` and `bw` limit the
//! device's reads and writes per second and bytes per second (0: no limit),
//! with a burst of one second. `poll-us` is how long a queue worker
//! busy-polls its avail ring after its last request before it sleeps on the
//! kick (0, the default: it sleeps at once). A comma inside a value (a path, a serial) is
//! written twice, as in QEMU's options. A [`DeviceSpec`] prints back as a
//! SPEC that parses to the same spec (its `Display`).

use std::fmt;
use std::path::PathBuf;

use vcdev_device_model::blk::aio::AioMode;
use vcdev_device_model::blk::config::{DEFAULT_QUEUE_SIZE, MAX_QUEUE_SIZE, SERIAL_LEN};
use vcdev_device_model::blk::{Limits, SECTOR_SIZE};
use vcdev_iommu::IovaRange;

/// A RAM disk's size when a device has neither `path` nor `ram`: 64 MiB.
pub const DEFAULT_RAM_SIZE: u64 = 64 << 20;
/// The most queues a device may have (vhost-user's vring index is 8 bits).
pub const MAX_QUEUES: u16 = 256;
/// The smallest queue size accepted.
pub const MIN_QUEUE_SIZE: u16 = 4;
/// The longest `poll-us` accepted: 1 s.
pub const MAX_POLL_US: u32 = 1_000_000;

/// Errors in the options (exit code 2).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A device spec does not start with a known device type.
    #[error("--device {spec:?}: unknown device type (expected \"blk\")")]
    DeviceType {
        /// The spec.
        spec: String,
    },
    /// A key the spec does not know, or one without `=`.
    #[error("--device {spec:?}: unknown option {key:?}")]
    UnknownKey {
        /// The spec.
        spec: String,
        /// The key.
        key: String,
    },
    /// A value that does not parse or is out of range.
    #[error("--device {spec:?}: invalid {key} {value:?}: {why}")]
    BadValue {
        /// The spec.
        spec: String,
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
        /// What is expected.
        why: &'static str,
    },
    /// Both `path` and `ram`.
    #[error("--device {spec:?}: give path= or ram=, not both")]
    PathAndRam {
        /// The spec.
        spec: String,
    },
    /// `direct=on` on a RAM disk, which has no page cache to bypass.
    #[error("--device {spec:?}: direct=on needs path=, a RAM disk has no page cache to bypass")]
    DirectRam {
        /// The spec.
        spec: String,
    },
    /// Two devices with one name.
    #[error("device name {0:?} is used twice")]
    DuplicateName(String),
    /// A `--device` has the name of a device of the state file.
    #[error("device {0:?} is both a --device and a device added at run time (in DIR/state.json); drop the --device, or `vcdev ctl remove` it first")]
    StateClash(String),
    /// `vcdev ctl set` with an option that cannot change live.
    #[error("{0:?}: only iops= and bw= can be set while the daemon runs")]
    NotLive(String),
    /// `--socket-group` names no group.
    #[error("--socket-group {0:?}: no such group")]
    UnknownGroup(String),
    /// No usable default directory.
    #[error("no --dir given and neither XDG_RUNTIME_DIR nor /tmp usable")]
    NoDir,
}

/// Where a disk's data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A file (or block device) opened at start.
    File(PathBuf),
    /// A RAM disk of this many bytes.
    Ram(u64),
}

/// One `--device`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Its name: the socket is `DIR/vhost-user/NAME`.
    pub name: String,
    /// Its data.
    pub backing: Backing,
    /// Refuse writes.
    pub read_only: bool,
    /// Request queues.
    pub queues: u16,
    /// The largest queue size a frontend may set.
    pub queue_size: u16,
    /// The GET_ID answer (at most 20 bytes).
    pub serial: String,
    /// Open the file with `O_DIRECT`, bypassing the host page cache.
    pub direct: bool,
    /// The I/O engine asked for.
    pub aio: AioMode,
    /// The DMA aperture the software IOMMU gives the device (default: the
    /// whole 64-bit space).
    pub iova_aperture: IovaRange,
    /// IOVA ranges reserved by the device (default: none).
    pub iova_reserved: Vec<IovaRange>,
    /// Its IOMMU group (default: alone in a group of its own).
    pub group: Option<u32>,
    /// `iops=` and `bw=`: its I/O limits (default: none).
    pub limits: Limits,
    /// `poll-us=`: how long (us) a queue worker busy-polls its avail ring
    /// after its last request before it sleeps (default 0: not at all).
    pub poll_us: u32,
}

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The runtime directory.
    pub dir: PathBuf,
    /// The devices, in order.
    pub devices: Vec<DeviceSpec>,
    /// The SPEC each device was parsed from.
    pub sources: Vec<String>,
    /// No `--device` was given: `devices` is the default device alone.
    pub default_device: bool,
    /// Who may use the nodes.
    pub access: crate::access::Access,
    /// Accept memory fds that are not memfds sealed against shrinking.
    pub allow_unsealed_memory: bool,
    /// How long a vhost-user queue waits for the answer to an IOTLB miss
    /// before the request fails with IOERR.
    pub iotlb_miss_timeout: std::time::Duration,
    /// The most IOTLB entries a vhost-user connection keeps; an UPDATE that
    /// finds it full drops them all first (misses fetch them again).
    pub iotlb_max_entries: usize,
    /// The bound of a vhost-user connection's poll of its socket after an
    /// IOTLB message (adaptive, zero when idle; zero here: never poll).
    pub iotlb_poll: std::time::Duration,
}

/// The default of [`Config::iotlb_max_entries`]: 2^18 entries, about 32 MiB
/// of IOTLB, enough for 1 GiB of guest memory in 4 KiB identity pages.
pub const DEFAULT_IOTLB_MAX_ENTRIES: usize = 1 << 18;

/// The default of [`Config::iotlb_miss_timeout`]: 5 s.
pub const DEFAULT_IOTLB_MISS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `$XDG_RUNTIME_DIR/vcdev`, else `/tmp/vcdev-$UID`.
pub fn default_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("vcdev");
    }
    let uid = crate::sys::uid();
    PathBuf::from(format!("/tmp/vcdev-{uid}"))
}

/// Parses `SIZE` with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// Parses a number, decimal or `0x` hex.
pub fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses `START-LAST` (inclusive, `START <= LAST`).
pub fn parse_range(s: &str) -> Option<IovaRange> {
    let (a, b) = s.split_once('-')?;
    let (start, last) = (parse_u64(a)?, parse_u64(b)?);
    (start <= last).then_some(IovaRange::new(start, last))
}

/// Parses a boolean option: `on`/`off` (or `true`/`false`, `yes`/`no`).
fn parse_on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// Splits a SPEC at its commas; a doubled comma is a comma of the value.
fn split_spec(spec: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
            } else {
                parts.push(String::new());
                continue;
            }
        }
        if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

/// A value written into a SPEC: its commas doubled.
fn escape(v: &str) -> String {
    v.replace(',', ",,")
}

/// `n` with the largest K/M/G suffix that divides it (as [`parse_size`] reads it).
fn format_size(n: u64) -> String {
    for (shift, suffix) in [(30, 'G'), (20, 'M'), (10, 'K')] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

/// The serial of a device named `name` that gives none.
fn default_serial(name: &str) -> String {
    name.chars().take(SERIAL_LEN).collect()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

impl DeviceSpec {
    /// Parses one `--device` value; `index` gives the default name.
    pub fn parse(spec: &str, index: usize) -> Result<DeviceSpec, ConfigError> {
        let parts = split_spec(spec);
        let mut parts = parts.iter().map(String::as_str);
        if parts.next() != Some("blk") {
            return Err(ConfigError::DeviceType { spec: spec.into() });
        }
        let bad = |key: &'static str, value: &str, why: &'static str| ConfigError::BadValue {
            spec: spec.into(),
            key,
            value: value.into(),
            why,
        };
        let mut name = None;
        let mut path = None;
        let mut ram = None;
        let mut read_only = false;
        let mut direct = false;
        let mut aio = AioMode::default();
        let mut queues = 1u16;
        let mut queue_size = DEFAULT_QUEUE_SIZE;
        let mut serial = None;
        let mut iova_aperture = IovaRange::ALL;
        let mut iova_reserved = Vec::new();
        let mut group = None;
        let mut limits = Limits::UNLIMITED;
        let mut poll_us = 0u32;
        for kv in parts {
            let Some((k, v)) = kv.split_once('=') else {
                return Err(ConfigError::UnknownKey {
                    spec: spec.into(),
                    key: kv.into(),
                });
            };
            match k {
                "name" => {
                    if !valid_name(v) {
                        return Err(bad("name", v, "use letters, digits, '_', '-', '.'"));
                    }
                    name = Some(v.to_owned());
                }
                "path" => {
                    if v.is_empty() {
                        return Err(bad("path", v, "empty path"));
                    }
                    path = Some(PathBuf::from(v));
                }
                "ram" => {
                    let size = parse_size(v)
                        .filter(|s| *s > 0 && s % SECTOR_SIZE == 0)
                        .ok_or_else(|| {
                            bad(
                                "ram",
                                v,
                                "a non-zero multiple of 512, K/M/G suffixes allowed",
                            )
                        })?;
                    ram = Some(size);
                }
                "readonly" => {
                    read_only = parse_on_off(v).ok_or_else(|| bad("readonly", v, "on or off"))?;
                }
                "direct" => {
                    direct = parse_on_off(v).ok_or_else(|| bad("direct", v, "on or off"))?;
                }
                "aio" => {
                    aio = v
                        .parse()
                        .map_err(|()| bad("aio", v, "auto, io_uring or sync"))?;
                }
                "queues" => {
                    queues = v
                        .parse()
                        .ok()
                        .filter(|q| (1..=MAX_QUEUES).contains(q))
                        .ok_or_else(|| bad("queues", v, "1 to 256"))?;
                }
                "queue-size" => {
                    queue_size = v
                        .parse::<u16>()
                        .ok()
                        .filter(|q| {
                            q.is_power_of_two() && (MIN_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(q)
                        })
                        .ok_or_else(|| bad("queue-size", v, "a power of two from 4 to 32768"))?;
                }
                "iova-aperture" => {
                    iova_aperture = parse_range(v)
                        .ok_or_else(|| bad("iova-aperture", v, "START-LAST with START <= LAST"))?;
                }
                "iova-reserved" => {
                    iova_reserved.push(
                        parse_range(v).ok_or_else(|| {
                            bad("iova-reserved", v, "START-LAST with START <= LAST")
                        })?,
                    );
                }
                "group" => {
                    group = Some(
                        v.parse::<u32>()
                            .ok()
                            .filter(|g| i32::try_from(*g).is_ok())
                            .ok_or_else(|| bad("group", v, "a group number below 2^31"))?,
                    );
                }
                "iops" => {
                    limits.iops = v
                        .parse()
                        .map_err(|_| bad("iops", v, "requests per second, 0 for no limit"))?;
                }
                "bw" => {
                    limits.bw = parse_size(v).ok_or_else(|| {
                        bad(
                            "bw",
                            v,
                            "bytes per second, K/M/G suffixes allowed, 0 for no limit",
                        )
                    })?;
                }
                "poll-us" => {
                    poll_us = v
                        .parse::<u32>()
                        .ok()
                        .filter(|p| *p <= MAX_POLL_US)
                        .ok_or_else(|| {
                            bad("poll-us", v, "microseconds from 0 (no polling) to 1000000")
                        })?;
                }
                "serial" => {
                    if v.len() > SERIAL_LEN {
                        return Err(bad("serial", v, "at most 20 bytes"));
                    }
                    serial = Some(v.to_owned());
                }
                _ => {
                    return Err(ConfigError::UnknownKey {
                        spec: spec.into(),
                        key: k.into(),
                    })
                }
            }
        }
        let backing = match (path, ram) {
            (Some(_), Some(_)) => return Err(ConfigError::PathAndRam { spec: spec.into() }),
            (Some(p), None) => Backing::File(p),
            (None, Some(r)) => Backing::Ram(r),
            (None, None) => Backing::Ram(DEFAULT_RAM_SIZE),
        };
        if direct && matches!(backing, Backing::Ram(_)) {
            return Err(ConfigError::DirectRam { spec: spec.into() });
        }
        let name = name.unwrap_or_else(|| format!("vfio{index}"));
        let serial = serial.unwrap_or_else(|| default_serial(&name));
        Ok(DeviceSpec {
            name,
            backing,
            read_only,
            queues,
            queue_size,
            serial,
            direct,
            aio,
            iova_aperture,
            iova_reserved,
            group,
            limits,
            poll_us,
        })
    }
}

impl fmt::Display for DeviceSpec {
    /// The SPEC of this device: `name` and the backing always, the other
    /// options where they differ from their defaults. It parses back to an
    /// equal [`DeviceSpec`] (whatever the index given to the parser).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blk,name={}", self.name)?;
        match &self.backing {
            Backing::File(p) => write!(f, ",path={}", escape(&p.to_string_lossy()))?,
            Backing::Ram(size) => write!(f, ",ram={}", format_size(*size))?,
        }
        if self.read_only {
            f.write_str(",readonly=on")?;
        }
        if self.queues != 1 {
            write!(f, ",queues={}", self.queues)?;
        }
        if self.queue_size != DEFAULT_QUEUE_SIZE {
            write!(f, ",queue-size={}", self.queue_size)?;
        }
        if self.serial != default_serial(&self.name) {
            write!(f, ",serial={}", escape(&self.serial))?;
        }
        if self.direct {
            f.write_str(",direct=on")?;
        }
        if self.aio != AioMode::default() {
            write!(f, ",aio={}", self.aio)?;
        }
        let range = |r: &IovaRange| format!("{:#x}-{:#x}", r.start, r.last);
        if self.iova_aperture != IovaRange::ALL {
            write!(f, ",iova-aperture={}", range(&self.iova_aperture))?;
        }
        for r in &self.iova_reserved {
            write!(f, ",iova-reserved={}", range(r))?;
        }
        if let Some(g) = self.group {
            write!(f, ",group={g}")?;
        }
        if self.limits.iops != 0 {
            write!(f, ",iops={}", self.limits.iops)?;
        }
        if self.limits.bw != 0 {
            write!(f, ",bw={}", format_size(self.limits.bw))?;
        }
        if self.poll_us != 0 {
            write!(f, ",poll-us={}", self.poll_us)?;
        }
        Ok(())
    }
}

impl Config {
    /// Builds a configuration from the raw options.
    pub fn new(
        dir: Option<PathBuf>,
        devices: &[String],
        allow_unsealed_memory: bool,
    ) -> Result<Config, ConfigError> {
        let mut specs = Vec::with_capacity(devices.len().max(1));
        let mut sources: Vec<String> = devices.to_vec();
        if devices.is_empty() {
            specs.push(DeviceSpec::parse("blk", 0)?);
            sources.push("blk".into());
        }
        for (i, d) in devices.iter().enumerate() {
            let s = DeviceSpec::parse(d, i)?;
            if specs.iter().any(|o: &DeviceSpec| o.name == s.name) {
                return Err(ConfigError::DuplicateName(s.name));
            }
            specs.push(s);
        }
        Ok(Config {
            dir: dir.unwrap_or_else(default_dir),
            devices: specs,
            sources,
            default_device: devices.is_empty(),
            access: crate::access::Access::default(),
            allow_unsealed_memory,
            iotlb_miss_timeout: DEFAULT_IOTLB_MISS_TIMEOUT,
            iotlb_max_entries: DEFAULT_IOTLB_MAX_ENTRIES,
            iotlb_poll: crate::vhost_user::main_poll::DEFAULT_MAX,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_and_full_spec() {
        let c = Config::new(Some("/x".into()), &[], false).unwrap();
        assert_eq!(c.devices.len(), 1);
        let d = &c.devices[0];
        assert_eq!(d.name, "vfio0");
        assert_eq!(d.backing, Backing::Ram(64 << 20));
        assert_eq!(
            (d.queues, d.queue_size, d.serial.as_str()),
            (1, 256, "vfio0")
        );
        let d = DeviceSpec::parse(
            "blk,name=d1,path=/tmp/a.img,readonly=on,queues=4,queue-size=128,serial=S1",
            3,
        )
        .unwrap();
        assert_eq!(d.backing, Backing::File("/tmp/a.img".into()));
        assert!(d.read_only);
        assert_eq!((d.queues, d.queue_size, d.serial.as_str()), (4, 128, "S1"));
        assert_eq!(
            DeviceSpec::parse("blk,ram=1G", 2).unwrap().backing,
            Backing::Ram(1 << 30)
        );
        assert_eq!(DeviceSpec::parse("blk", 2).unwrap().name, "vfio2");
    }

    #[test]
    fn invalid_specs() {
        for bad in [
            "net",
            "blk,foo=1",
            "blk,ram=100",
            "blk,ram=1X",
            "blk,queues=0",
            "blk,queue-size=100",
            "blk,queue-size=65536",
            "blk,path=/a,ram=1M",
            "blk,name=a/b",
            "blk,serial=123456789012345678901",
            "blk,readonly",
            "blk,path=/a,direct=maybe",
            "blk,path=/a,aio=bogus",
            "blk,path=/a,aio=",
        ] {
            assert!(DeviceSpec::parse(bad, 0).is_err(), "{bad}");
        }
        // direct=on needs a file, whether ram= is given or the default RAM disk is used.
        for ram in [
            "blk,direct=on,ram=1M",
            "blk,ram=1M,direct=on",
            "blk,direct=on",
        ] {
            assert!(
                matches!(
                    DeviceSpec::parse(ram, 0),
                    Err(ConfigError::DirectRam { .. })
                ),
                "{ram}"
            );
        }
        let e = Config::new(None, &["blk,name=a".into(), "blk,name=a".into()], false);
        assert_eq!(e.unwrap_err(), ConfigError::DuplicateName("a".into()));
    }

    #[test]
    fn direct_and_aio() {
        let d = DeviceSpec::parse("blk,path=/a", 0).unwrap();
        assert_eq!((d.direct, d.aio), (false, AioMode::Auto));
        let d = DeviceSpec::parse("blk,path=/a,direct=on,aio=io_uring", 0).unwrap();
        assert_eq!((d.direct, d.aio), (true, AioMode::IoUring));
        let d = DeviceSpec::parse("blk,path=/a,direct=off,aio=sync", 0).unwrap();
        assert_eq!((d.direct, d.aio), (false, AioMode::Sync));
        let d = DeviceSpec::parse("blk,ram=1M,aio=auto,direct=off", 0).unwrap();
        assert_eq!((d.direct, d.aio), (false, AioMode::Auto));
    }

    #[test]
    fn iommu_options() {
        let d = DeviceSpec::parse(
            "blk,iova-aperture=0x1000-0xffffffff,iova-reserved=0x8000-0x8fff,iova-reserved=65536-65537,group=3",
            0,
        )
        .unwrap();
        assert_eq!(d.iova_aperture, IovaRange::new(0x1000, 0xffff_ffff));
        assert_eq!(
            d.iova_reserved,
            vec![IovaRange::new(0x8000, 0x8fff), IovaRange::new(65536, 65537)]
        );
        assert_eq!(d.group, Some(3));
        let d = DeviceSpec::parse("blk", 0).unwrap();
        assert_eq!(
            (d.iova_aperture, d.iova_reserved.len(), d.group),
            (IovaRange::ALL, 0, None)
        );
        for bad in [
            "blk,iova-aperture=5-4",
            "blk,iova-aperture=0x10",
            "blk,iova-reserved=x-1",
            "blk,group=-1",
            "blk,group=4294967295",
        ] {
            assert!(DeviceSpec::parse(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn poll_us() {
        assert_eq!(DeviceSpec::parse("blk", 0).unwrap().poll_us, 0);
        let d = DeviceSpec::parse("blk,poll-us=50", 0).unwrap();
        assert_eq!(d.poll_us, 50);
        assert_eq!(d.to_string(), "blk,name=vfio0,ram=64M,poll-us=50");
        assert_eq!(
            DeviceSpec::parse("blk,poll-us=1000000", 0).unwrap().poll_us,
            MAX_POLL_US
        );
        for bad in [
            "blk,poll-us=",
            "blk,poll-us=-1",
            "blk,poll-us=1000001",
            "blk,poll-us=5us",
        ] {
            assert!(DeviceSpec::parse(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("99999999999G"), None);
    }

    #[test]
    fn limits() {
        let d = DeviceSpec::parse("blk,iops=2000,bw=10M", 0).unwrap();
        assert_eq!(
            d.limits,
            Limits {
                iops: 2000,
                bw: 10 << 20
            }
        );
        assert!(DeviceSpec::parse("blk", 0).unwrap().limits.is_unlimited());
        let d = DeviceSpec::parse("blk,iops=0,bw=0", 0).unwrap();
        assert!(d.limits.is_unlimited());
        for bad in [
            "blk,iops=-1",
            "blk,iops=1K",
            "blk,iops=",
            "blk,bw=1T",
            "blk,bw=x",
        ] {
            assert!(
                matches!(DeviceSpec::parse(bad, 0), Err(ConfigError::BadValue { .. })),
                "{bad}"
            );
        }
    }

    /// A doubled comma is a comma of the value, as in QEMU's options.
    #[test]
    fn doubled_commas() {
        let d = DeviceSpec::parse("blk,path=/a,,b,,,serial=x,,y,readonly=on", 0).unwrap();
        assert_eq!(d.backing, Backing::File("/a,b,".into()));
        assert_eq!(d.serial, "x,y");
        assert!(d.read_only);
        assert_eq!(
            d.to_string(),
            "blk,name=vfio0,path=/a,,b,,,readonly=on,serial=x,,y"
        );
    }

    #[test]
    fn display_is_short_and_parses_back() {
        let d = DeviceSpec::parse("blk", 3).unwrap();
        assert_eq!(d.to_string(), "blk,name=vfio3,ram=64M");
        let s = "blk,name=d1,path=/tmp/a.img,readonly=on,queues=4,queue-size=128,serial=S1,\
                 direct=on,aio=io_uring,iova-aperture=0x1000-0xffffffff,\
                 iova-reserved=0x8000-0x8fff,group=3,iops=2000,bw=1536K";
        let d = DeviceSpec::parse(s, 0).unwrap();
        assert_eq!(d.to_string(), s);
        assert_eq!(format_size(1536 << 10), "1536K");
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
    }

    fn range() -> impl Strategy<Value = IovaRange> {
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| IovaRange::new(a.min(b), a.max(b)))
    }

    prop_compose! {
        fn device_spec()(
            name in "[A-Za-z0-9_.-]{1,24}".prop_filter("not . or ..", |n| n != "." && n != ".."),
            backing in prop_oneof![
                "/[a-z0-9,=. ]{1,24}".prop_map(|p| Backing::File(PathBuf::from(p))),
                (1u64..1 << 24).prop_map(|n| Backing::Ram(n * SECTOR_SIZE)),
            ],
            (read_only, direct) in (any::<bool>(), any::<bool>()),
            queues in 1u16..=MAX_QUEUES,
            queue_size in (2u32..=15).prop_map(|k| 1u16 << k),
            serial in proptest::option::of("[ -~]{0,20}"),
            aio in prop_oneof![Just(AioMode::Auto), Just(AioMode::IoUring), Just(AioMode::Sync)],
            aperture in proptest::option::of(range()),
            iova_reserved in proptest::collection::vec(range(), 0..3),
            group in proptest::option::of(0u32..1 << 31),
            (iops, bw) in (
                prop_oneof![Just(0u64), any::<u64>()],
                prop_oneof![Just(0u64), any::<u64>(), (0u64..1 << 20).prop_map(|n| n << 10)],
            ),
            poll_us in prop_oneof![Just(0u32), 0u32..=MAX_POLL_US],
        ) -> DeviceSpec {
            let direct = direct && matches!(backing, Backing::File(_));
            DeviceSpec {
                serial: serial.unwrap_or_else(|| default_serial(&name)),
                name,
                backing,
                read_only,
                queues,
                queue_size,
                direct,
                aio,
                iova_aperture: aperture.unwrap_or(IovaRange::ALL),
                iova_reserved,
                group,
                limits: Limits { iops, bw },
                poll_us,
            }
        }
    }

    proptest! {
        /// Every field survives `DeviceSpec` -> SPEC -> `DeviceSpec` (the state file of
        /// runtime-added devices relies on it).
        #[test]
        fn spec_round_trips(spec in device_spec(), index in 0usize..100) {
            let text = spec.to_string();
            let back = DeviceSpec::parse(&text, index);
            prop_assert_eq!(back.as_ref(), Ok(&spec), "{}", text);
        }
    }
}
