//! QEMU guest tests: find QEMU 10 and the guest image, fill a
//! `qemu-configs/<name>` topology, boot it with a hard deadline and parse the
//! guest's marker lines.
//!
//! The guest (`qemu-configs/guest/init`, built by
//! `qemu-configs/build-guest.sh`) reads `vcdev.*` parameters from the kernel
//! command line, runs one test and prints, each at the start of a line:
//!
//! ```text
//! VCDEV-BEGIN kernel=<release> test=<name>
//! VCDEV-RESULT key=value ...        (any number)
//! VCDEV-WARN <text>                 (e.g. a module failed to load)
//! VCDEV-ERROR <text>                (the test failed)
//! VCDEV-END status=ok|fail uptime=<s>
//! ```
//!
//! Environment:
//! - `VCDEV_REQUIRE_QEMU=1`: a missing QEMU or guest image fails the test
//!   instead of skipping it.
//! - `VCDEV_GUEST_DIR`: the guest image directory (default
//!   `$HOME/.cache/vcdev-guest`, as in build-guest.sh).
//! - `VCDEV_QEMU`: the qemu-system-x86_64 binary (default: from `PATH`).
//! - `VCDEV_QEMU_ACCEL=kvm|tcg`: override the accelerator choice (default:
//!   KVM only when /proc/cpuinfo shows vmx or svm and /dev/kvm opens). TCG
//!   runs single-threaded (`tcg,thread=single`, see [`TCG`]).
//! - `VCDEV_QEMU_TIMEOUT`: seconds before a guest is killed (default 120).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{Daemon, Finished, Proc};
use super::repo_root;

/// Oldest QEMU major version the configs are written for.
pub const MIN_QEMU_MAJOR: u32 = 10;
/// Default hard deadline for one guest, from spawn to poweroff.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default guest RAM in MiB.
pub const DEFAULT_MEM_MIB: u32 = 256;
/// Default number of vCPUs.
pub const DEFAULT_SMP: u32 = 2;
/// Size of one sector of the guest's dd pattern.
pub const PATTERN_SECTOR: usize = 512;
/// What to run to get QEMU and the guest image.
pub const INSTALL_HINT: &str = "run `sudo .ci/install-qemu.sh` from the repository root";

const ENV_REQUIRE: &str = "VCDEV_REQUIRE_QEMU";

/// Everything needed to boot a test guest.
#[derive(Debug, Clone)]
pub struct Guest {
    /// qemu-system-x86_64.
    pub qemu: PathBuf,
    /// Its `--version` first line.
    pub qemu_version: String,
    /// Guest kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// Guest initramfs (`initrd`).
    pub initrd: PathBuf,
    /// The `-accel` value: `kvm` or [`TCG`].
    pub accel: &'static str,
    /// `host` (KVM) or `max` (TCG).
    pub cpu: &'static str,
}

/// Returns the guest setup, or `None` after printing why the test is
/// skipped and what to run to enable it. With `VCDEV_REQUIRE_QEMU=1` it
/// panics instead of returning `None`.
pub fn require() -> Option<Guest> {
    match probe() {
        Ok(g) => Some(g),
        Err(why) => skip(&why),
    }
}

/// Like [`require`] for another binary of the QEMU packages (e.g.
/// `qemu-storage-daemon`): its path from `PATH`, or skip (or panic).
pub fn require_tool(name: &str) -> Option<PathBuf> {
    match which(name) {
        Some(p) => Some(p),
        None => skip(&format!("{name} not found in PATH")),
    }
}

/// Prints the skip message for `why` and returns `None`, or panics when
/// `VCDEV_REQUIRE_QEMU=1`.
pub fn skip<T>(why: &str) -> Option<T> {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a QEMU test");
    let msg = format!("{test}: {why}; to enable this QEMU guest test, {INSTALL_HINT}");
    if std::env::var(ENV_REQUIRE).is_ok_and(|v| v == "1") {
        panic!("{msg} ({ENV_REQUIRE}=1 turns the skip into a failure)");
    }
    // Straight to fd 2, past libtest's capture of eprintln!, so the skip
    // shows in a normal `cargo test` run.
    let _ = writeln!(io::stderr(), "SKIP {msg}");
    None
}

/// The guest image directory: `$VCDEV_GUEST_DIR` or `$HOME/.cache/vcdev-guest`.
pub fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VCDEV_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/vcdev-guest")
}

fn probe() -> Result<Guest, String> {
    let qemu = match std::env::var_os("VCDEV_QEMU") {
        Some(p) => PathBuf::from(p),
        None => which("qemu-system-x86_64").ok_or("qemu-system-x86_64 not found in PATH")?,
    };
    let out = Command::new(&qemu)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let qemu_version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let major = qemu_version
        .split("version ")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            format!(
                "cannot parse the version of {}: {qemu_version:?}",
                qemu.display()
            )
        })?;
    if major < MIN_QEMU_MAJOR {
        return Err(format!(
            "{qemu_version:?} is older than QEMU {MIN_QEMU_MAJOR}"
        ));
    }
    let dir = guest_dir();
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd");
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            return Err(format!("guest image {} missing", f.display()));
        }
    }
    check_stamp(&dir)?;
    let (accel, cpu) = pick_accel();
    Ok(Guest {
        qemu,
        qemu_version,
        kernel,
        initrd,
        accel,
        cpu,
    })
}

/// The image records a hash of build-guest.sh + guest/init; a different hash
/// means the image would run an old /init.
fn check_stamp(dir: &Path) -> Result<(), String> {
    let src = repo_root().join("qemu-configs");
    let mut inputs = Vec::new();
    for f in ["build-guest.sh", "guest/init"] {
        let mut b =
            std::fs::read(src.join(f)).map_err(|e| format!("reading qemu-configs/{f}: {e}"))?;
        inputs.append(&mut b);
    }
    let want = md5_hex(&inputs).map_err(|e| format!("md5sum: {e}"))?;
    let stamp = std::fs::read_to_string(dir.join("stamp")).unwrap_or_default();
    if stamp.split_whitespace().nth(1) == Some(want.as_str()) {
        Ok(())
    } else {
        Err(format!(
            "guest image in {} is stale (qemu-configs/build-guest.sh or guest/init changed since it was built)",
            dir.display()
        ))
    }
}

fn pick_accel() -> (&'static str, &'static str) {
    let kvm_usable = || {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        virt && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
    };
    match std::env::var("VCDEV_QEMU_ACCEL").as_deref() {
        Ok("kvm") => ("kvm", "host"),
        Ok("tcg") => (TCG, "max"),
        _ if kvm_usable() => ("kvm", "host"),
        _ => (TCG, "max"),
    }
}

/// TCG with every vCPU on one host thread. Multi-threaded TCG (QEMU 10.0.2)
/// failed us twice in ways no backend can cause: a CI guest aborted in
/// `msix_table_mmio_write` (`addr + size <= msix_entries_nr * 16`: an MMIO
/// write dispatched past the 32-byte MSI-X table, which QEMU's memory core
/// never lets a guest do) 2 s into boot, about once in a thousand boots;
/// and vfio_kcheck's guest hung in about one run of six after binding
/// vfio-pci, both vCPUs halted for good and a timer that never fired
/// (with `thread=single`: 36 runs of 36 passed). One thread keeps the
/// guest's two vCPUs (blk-mq maps a queue to each) without the cross-thread
/// races; on these 2-core machines, with tests running side by side, a boot
/// takes about 10% longer.
const TCG: &str = "tcg,thread=single";

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// One `qemu-configs/<name>` topology: QEMU options with `@NAME@`
/// placeholders.
///
/// File format (no shell involved): one option per line, `-option` or
/// `-option VALUE` where VALUE is the rest of the line (spaces allowed, no
/// quoting); lines starting with `#` are comments; blank lines are ignored.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// File name under qemu-configs/.
    pub name: String,
    /// The leading comment block, without the `# `.
    pub description: String,
    entries: Vec<(String, Option<String>)>,
}

impl QemuConfig {
    /// Directory of the topology files.
    pub fn dir() -> PathBuf {
        repo_root().join("qemu-configs")
    }

    /// Names of all topology files (regular files without an extension).
    pub fn names() -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(Self::dir())? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type()?.is_file() && !name.contains('.') {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Reads and parses `qemu-configs/<name>`.
    pub fn load(name: &str) -> io::Result<Self> {
        let path = Self::dir().join(name);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
        Self::parse(name, &text).map_err(io::Error::other)
    }

    /// Parses the text of a topology file.
    pub fn parse(name: &str, text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        let mut description = String::new();
        let mut in_header = true;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if let Some(c) = line.strip_prefix('#') {
                if in_header {
                    description.push_str(c.strip_prefix(' ').unwrap_or(c));
                    description.push('\n');
                }
                continue;
            }
            in_header = false;
            if line.is_empty() {
                continue;
            }
            if !line.starts_with('-') {
                return Err(format!(
                    "{name}:{}: expected `-option [VALUE]`, got {line:?}",
                    n + 1
                ));
            }
            let entry = match line.split_once(char::is_whitespace) {
                Some((opt, val)) => (opt.to_owned(), Some(val.trim_start().to_owned())),
                None => (line.to_owned(), None),
            };
            entries.push(entry);
        }
        if entries.is_empty() {
            return Err(format!("{name}: no options"));
        }
        Ok(Self {
            name: name.to_owned(),
            description,
            entries,
        })
    }

    /// The `(option, value)` pairs, placeholders unfilled.
    pub fn entries(&self) -> &[(String, Option<String>)] {
        &self.entries
    }

    /// Values of every occurrence of `option` (e.g. `"-device"`).
    pub fn values<'a>(&'a self, option: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.entries
            .iter()
            .filter(move |(o, _)| o == option)
            .filter_map(|(_, v)| v.as_deref())
    }

    /// Placeholder names (without the `@`) used anywhere in the file.
    pub fn placeholders(&self) -> BTreeSet<String> {
        let mut set = BTreeSet::new();
        for (o, v) in &self.entries {
            for s in std::iter::once(o.as_str()).chain(v.as_deref()) {
                set.extend(find_placeholders(s).into_iter().map(str::to_owned));
            }
        }
        set
    }

    /// The QEMU argv (without the program) with every `@NAME@` replaced by
    /// `vars[NAME]`; an unfilled placeholder is an error.
    pub fn args(&self, vars: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
        let missing: Vec<_> = self
            .placeholders()
            .into_iter()
            .filter(|p| !vars.contains_key(p))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{}: no value for placeholder(s) {missing:?}",
                self.name
            ));
        }
        let fill = |s: &str| {
            vars.iter().fold(s.to_owned(), |acc, (k, v)| {
                acc.replace(&format!("@{k}@"), v)
            })
        };
        let mut argv = Vec::new();
        for (o, v) in &self.entries {
            argv.push(fill(o));
            if let Some(v) = v {
                argv.push(fill(v));
            }
        }
        Ok(argv)
    }
}

impl QemuConfig {
    /// This topology with its vhost-user disk (the `-chardev` on
    /// `@SOCKET@` and the `-device vhost-user-*`) replaced by `options`,
    /// QEMU options as `vcdev ctl add` prints them (`"-chardev VALUE
    /// -device VALUE"`: words split at whitespace, each option followed by
    /// its value unless the next word is an option too).
    pub fn with_disk(&self, options: &str) -> Result<Self, String> {
        let mut disk = Vec::new();
        let mut words = options.split_whitespace().peekable();
        while let Some(opt) = words.next() {
            if !opt.starts_with('-') {
                return Err(format!(
                    "attach options {options:?}: {opt:?} is not an option"
                ));
            }
            let value = words.next_if(|w| !w.starts_with('-'));
            disk.push((opt.to_owned(), value.map(str::to_owned)));
        }
        if disk.is_empty() {
            return Err("no attach options".to_owned());
        }
        let is_disk = |(o, v): &(String, Option<String>)| {
            let v = v.as_deref().unwrap_or("");
            (o == "-chardev" && v.contains("@SOCKET@"))
                || (o == "-device" && v.starts_with("vhost-user-"))
        };
        let mut entries: Vec<_> = self
            .entries
            .iter()
            .filter(|e| !is_disk(e))
            .cloned()
            .collect();
        if entries.len() == self.entries.len() {
            return Err(format!("{}: no vhost-user disk to replace", self.name));
        }
        entries.append(&mut disk);
        Ok(Self {
            name: self.name.clone(),
            description: self.description.clone(),
            entries,
        })
    }
}

/// `@NAME@` tokens (NAME = `[A-Z0-9_]+`) in `s`, returned without the `@`s.
fn find_placeholders(s: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find('@') {
        let after = &rest[start + 1..];
        match after.find('@') {
            Some(end)
                if end > 0
                    && after[..end]
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') =>
            {
                found.push(&after[..end]);
                rest = &after[end + 1..];
            }
            _ => rest = after,
        }
    }
    found
}

/// A guest boot being set up; see [`Guest::boot`].
#[derive(Debug, Clone)]
pub struct Boot<'g> {
    guest: &'g Guest,
    config: String,
    vars: BTreeMap<String, String>,
    extra: Vec<String>,
    disk: Option<String>,
    launcher: Vec<String>,
    timeout: Duration,
}

impl Guest {
    /// Starts describing a boot of topology `config` (a qemu-configs file).
    /// Defaults: 256 MiB, 2 vCPUs, 1 queue, empty `@APPEND@` (so the guest
    /// runs `vcdev.test=info`), deadline `VCDEV_QEMU_TIMEOUT` or 120 s.
    pub fn boot(&self, config: &str) -> Boot<'_> {
        let timeout = std::env::var("VCDEV_QEMU_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
        let mut vars = BTreeMap::new();
        for (k, v) in [
            ("ACCEL", self.accel.to_owned()),
            ("CPU", self.cpu.to_owned()),
            ("SMP", DEFAULT_SMP.to_string()),
            ("MEM", DEFAULT_MEM_MIB.to_string()),
            ("KERNEL", self.kernel.display().to_string()),
            ("INITRD", self.initrd.display().to_string()),
            ("APPEND", String::new()),
            ("QUEUES", "1".to_owned()),
        ] {
            vars.insert(k.to_owned(), v);
        }
        Boot {
            guest: self,
            config: config.to_owned(),
            vars,
            extra: Vec::new(),
            disk: None,
            launcher: Vec::new(),
            timeout,
        }
    }
}

impl Boot<'_> {
    /// Sets placeholder `@name@` to `value`.
    pub fn var(mut self, name: &str, value: impl Into<String>) -> Self {
        self.vars.insert(name.to_owned(), value.into());
        self
    }

    /// `@SOCKET@`: the vhost-user socket.
    pub fn socket(self, path: &Path) -> Self {
        self.var("SOCKET", path.display().to_string())
    }

    /// `@MEM@`: guest RAM in MiB.
    pub fn mem_mib(self, mib: u32) -> Self {
        self.var("MEM", mib.to_string())
    }

    /// `@SMP@`: vCPUs.
    pub fn smp(self, n: u32) -> Self {
        self.var("SMP", n.to_string())
    }

    /// `@QUEUES@`: virtqueues of the device.
    pub fn queues(self, n: u32) -> Self {
        self.var("QUEUES", n.to_string())
    }

    /// `@QMP@`: the QMP socket QEMU listens on (see [`Qmp`]).
    pub fn qmp(self, path: &Path) -> Self {
        self.var("QMP", path.display().to_string())
    }

    /// Adds words to the kernel command line (`@APPEND@`), e.g.
    /// `"iommu.strict=1"`.
    pub fn append(mut self, words: &str) -> Self {
        let cur = self.vars.entry("APPEND".to_owned()).or_default();
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(words);
        self
    }

    /// Adds `vcdev.<key>=<value>` to the kernel command line.
    pub fn param(self, key: &str, value: impl std::fmt::Display) -> Self {
        self.append(&format!("vcdev.{key}={value}"))
    }

    /// Selects the guest test (`vcdev.test=<name>`: dd, info, none).
    pub fn test(self, name: &str) -> Self {
        self.param("test", name)
    }

    /// The guest's `dd` test: `mib` MiB of the pattern of `seed` written
    /// and read back (see [`dd_pattern`]).
    pub fn dd(self, mib: u32, seed: &str) -> Self {
        self.test("dd").param("mb", mib).param("seed", seed)
    }

    /// The guest's `pdd` test: the `dd` test's pattern written by `jobs`
    /// writers at once (each its own `mib / jobs` MiB, O_DIRECT), then
    /// read back in one stream: the same md5 as [`Boot::dd`].
    pub fn pdd(self, mib: u32, seed: &str, jobs: u32) -> Self {
        self.test("pdd")
            .param("mb", mib)
            .param("seed", seed)
            .param("jobs", jobs)
    }

    /// Attaches the disk with `options`, the `qemu` attach options that
    /// `vcdev ctl add` prints, instead of the topology's vhost-user disk
    /// (see [`QemuConfig::with_disk`]); `@SOCKET@` and `@QUEUES@` are then
    /// unused.
    pub fn attach(mut self, options: &str) -> Self {
        self.disk = Some(options.to_owned());
        self
    }

    /// Adds one raw QEMU argument after the topology's (e.g. `-trace`).
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra.push(a.into());
        self
    }

    /// Runs QEMU through `launcher` (program and arguments before the
    /// QEMU program, e.g. `vcdev qemu-exec --dir D vfio0 --`), which must
    /// exec it (the process killed at the deadline is the launcher's).
    pub fn launcher(mut self, launcher: Vec<String>) -> Self {
        self.launcher = launcher;
        self
    }

    /// Hard deadline from spawn to exit; QEMU is killed when it passes.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The full QEMU argv (without the program).
    pub fn args(&self) -> io::Result<Vec<String>> {
        let mut cfg = QemuConfig::load(&self.config)?;
        if let Some(options) = &self.disk {
            cfg = cfg.with_disk(options).map_err(io::Error::other)?;
        }
        let mut argv = cfg.args(&self.vars).map_err(io::Error::other)?;
        argv.extend(self.extra.iter().cloned());
        Ok(argv)
    }

    /// Spawns QEMU; the console (serial on stdio) is captured.
    pub fn spawn(&self) -> io::Result<RunningGuest> {
        let mut args = self.args()?;
        let mut cmd = match self.launcher.split_first() {
            Some((prog, pre)) => {
                let mut c = Command::new(prog);
                c.args(pre).arg(&self.guest.qemu);
                let mut full = self.launcher.clone();
                full.push(self.guest.qemu.display().to_string());
                full.append(&mut args);
                args = full;
                c.args(&args[pre.len() + 2..]);
                c
            }
            None => {
                let mut c = Command::new(&self.guest.qemu);
                c.args(&args);
                c
            }
        };
        let proc = Proc::spawn(&format!("qemu[{}]", self.config), &mut cmd)?;
        Ok(RunningGuest {
            proc,
            config: self.config.clone(),
            args,
            started: Instant::now(),
            timeout: self.timeout,
        })
    }

    /// Spawns QEMU and waits for it to exit (killing it at the deadline).
    pub fn run(&self) -> io::Result<GuestRun> {
        self.spawn()?.wait()
    }
}

/// A QEMU process; killed on drop.
#[derive(Debug)]
pub struct RunningGuest {
    proc: Proc,
    config: String,
    args: Vec<String>,
    started: Instant,
    timeout: Duration,
}

impl RunningGuest {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Console output so far.
    pub fn console(&self) -> String {
        self.proc.stdout().text()
    }

    /// QEMU's own messages (stderr) so far.
    pub fn qemu_stderr(&self) -> String {
        self.proc.stderr().text()
    }

    /// Sends `sig` to QEMU (`SIGKILL`: the guest dies wherever it is, and
    /// the kernel closes its vhost-user sockets).
    pub fn signal(&mut self, sig: libc::c_int) -> io::Result<()> {
        self.proc.signal(sig)
    }

    /// Whether QEMU still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.proc.try_wait(), Ok(None))
    }

    /// Polls until a whole line of the console contains `needle` (true),
    /// QEMU exits or `timeout` passes (false).
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> bool {
        // Only whole lines count: the console arrives in chunks, and a
        // caller that parses the line once it is seen must not get half of
        // it (`resize_to=50` for `resize_to=50331648`, as CI once saw).
        let in_whole_lines = |console: String| match console.rfind('\n') {
            Some(end) => console[..end].contains(needle),
            None => false,
        };
        super::poll_until(timeout, || {
            if in_whole_lines(self.console()) {
                Some(true)
            } else if !matches!(self.proc.try_wait(), Ok(None)) {
                Some(self.console().contains(needle))
            } else {
                None
            }
        })
        .unwrap_or(false)
    }

    /// Waits for QEMU to exit, until the boot's deadline (counted from
    /// spawn), then kills it; parses the console.
    pub fn wait(self) -> io::Result<GuestRun> {
        let left = self.timeout.saturating_sub(self.started.elapsed());
        let finished = self.proc.wait_timeout(left)?;
        let report = GuestReport::parse(&finished.stdout);
        Ok(GuestRun {
            config: self.config,
            args: self.args,
            elapsed: self.started.elapsed(),
            finished,
            report,
        })
    }
}

/// A finished QEMU run.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Topology name.
    pub config: String,
    /// QEMU argv used.
    pub args: Vec<String>,
    /// Exit status and captured output (stdout is the guest console).
    pub finished: Finished,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
    /// Parsed marker lines.
    pub report: GuestReport,
}

impl GuestRun {
    /// The guest console (QEMU's stdout).
    pub fn console(&self) -> &str {
        &self.finished.stdout
    }

    /// QEMU's own messages (stderr).
    pub fn qemu_stderr(&self) -> &str {
        &self.finished.stderr
    }

    /// A multi-line summary for assertion messages: command, status, the
    /// last console lines and stderr.
    pub fn diagnostics(&self) -> String {
        let lines: Vec<&str> = self.console().lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!(
            "QEMU {} ({:.1?}, {}{})\nargs: {:?}\n--- console (last 40 lines)\n{tail}\n--- stderr\n{}",
            self.config,
            self.elapsed,
            self.finished.status,
            if self.finished.timed_out { ", KILLED at deadline" } else { "" },
            self.args,
            self.qemu_stderr(),
        )
    }

    /// The report, after asserting that QEMU exited cleanly in time and the
    /// guest ended with `VCDEV-END status=ok` and no `VCDEV-ERROR`.
    pub fn expect_ok(&self) -> &GuestReport {
        let r = &self.report;
        assert!(
            !self.finished.timed_out && self.finished.status.success() && r.ok(),
            "guest run failed (status={:?}, errors={:?})\n{}",
            r.status,
            r.errors,
            self.diagnostics()
        );
        r
    }
}

/// The `VCDEV-*` lines of a console, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestReport {
    /// `kernel=` of VCDEV-BEGIN.
    pub kernel: Option<String>,
    /// `test=` of VCDEV-BEGIN.
    pub test: Option<String>,
    /// Each VCDEV-RESULT line as key=value pairs, in order.
    pub results: Vec<BTreeMap<String, String>>,
    /// VCDEV-WARN texts.
    pub warnings: Vec<String>,
    /// VCDEV-ERROR texts.
    pub errors: Vec<String>,
    /// `status=` of VCDEV-END (`None`: the guest never finished).
    pub status: Option<String>,
}

impl GuestReport {
    /// Parses marker lines. A marker may follow other bytes on its line
    /// (firmware escape sequences, interleaved kernel output); it runs to
    /// the end of the line.
    pub fn parse(console: &str) -> Self {
        let mut r = Self::default();
        for line in console.lines() {
            let Some(pos) = line.find("VCDEV-") else {
                continue;
            };
            let marker = line[pos..].trim_end_matches(['\r', ' ']);
            let (word, rest) = marker.split_once(' ').unwrap_or((marker, ""));
            match word {
                "VCDEV-BEGIN" => {
                    let kv = parse_kv(rest);
                    r.kernel = kv.get("kernel").cloned();
                    r.test = kv.get("test").cloned();
                }
                "VCDEV-RESULT" => r.results.push(parse_kv(rest)),
                "VCDEV-WARN" => r.warnings.push(rest.to_owned()),
                "VCDEV-ERROR" => r.errors.push(rest.to_owned()),
                "VCDEV-END" => r.status = parse_kv(rest).get("status").cloned(),
                _ => {}
            }
        }
        r
    }

    /// The guest began, ended with `status=ok` and reported no error.
    pub fn ok(&self) -> bool {
        self.test.is_some() && self.status.as_deref() == Some("ok") && self.errors.is_empty()
    }

    /// The value of `key` in the last VCDEV-RESULT line that has it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.results
            .iter()
            .rev()
            .find_map(|m| m.get(key))
            .map(String::as_str)
    }

    /// The last VCDEV-RESULT line with `key=value`.
    pub fn find(&self, key: &str, value: &str) -> Option<&BTreeMap<String, String>> {
        self.results
            .iter()
            .rev()
            .find(|m| m.get(key).is_some_and(|v| v == value))
    }
}

fn parse_kv(s: &str) -> BTreeMap<String, String> {
    s.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The bytes the guest's `dd` test writes: sector i (512 bytes) is
/// `vcdev:<seed>:<i as 11 digits>` padded with spaces to 511 bytes plus
/// `\n` (see qemu-configs/guest/init).
pub fn dd_pattern(seed: &str, mib: u32) -> Vec<u8> {
    let sectors = mib as usize * (1 << 20) / PATTERN_SECTOR;
    let mut buf = Vec::with_capacity(sectors * PATTERN_SECTOR);
    for i in 0..sectors as u64 {
        buf.extend_from_slice(&pattern_sector(seed, i));
    }
    buf
}

/// md5 (lowercase hex) of [`dd_pattern`].
pub fn dd_pattern_md5(seed: &str, mib: u32) -> io::Result<String> {
    md5_hex(&dd_pattern(seed, mib))
}

/// Checks a finished run of the guest's `dd` test: QEMU and the guest
/// ended cleanly ([`GuestRun::expect_ok`]) and the guest read back the
/// [`dd_pattern`] of `seed` and `mib`. Returns the report and the pattern's
/// md5, which the backing file must match too ([`assert_dd_on_disk`]).
/// `what` starts the failure messages.
pub fn expect_dd_readback<'r>(
    run: &'r GuestRun,
    what: &str,
    seed: &str,
    mib: u32,
) -> (&'r GuestReport, String) {
    let report = run.expect_ok();
    let expected = dd_pattern_md5(seed, mib).expect("pattern md5");
    assert_eq!(
        report.get("md5"),
        Some(expected.as_str()),
        "{what}: guest read-back\n{}",
        run.diagnostics()
    );
    (report, expected)
}

/// Asserts that the first `mib` MiB of `image` hash to `expected` (the
/// md5 [`expect_dd_readback`] returned).
pub fn assert_dd_on_disk(image: &Path, mib: u32, expected: &str, what: &str) {
    let host = file_region_md5(image, 0, u64::from(mib) << 20).expect("host md5");
    assert_eq!(host, expected, "{what}: host backing file");
}

/// `write Ns read Ns`: the guest's `dd` timings.
pub fn dd_timings(report: &GuestReport) -> String {
    format!(
        "write {}s read {}s",
        report.get("write_s").unwrap_or("?"),
        report.get("read_s").unwrap_or("?")
    )
}

/// One line for the log of a dd guest run: what, size, QEMU's wall time,
/// the guest's timings, QEMU version and accelerator.
pub fn dd_summary(what: &str, mib: u32, run: &GuestRun, guest: &Guest) -> String {
    format!(
        "{what} dd {mib} MiB: qemu wall {:.2?}, {} ({}, accel {})",
        run.elapsed,
        dd_timings(&run.report),
        guest.qemu_version,
        guest.accel
    )
}

/// md5 (lowercase hex) of `data`, computed by `md5sum`.
pub fn md5_hex(data: &[u8]) -> io::Result<String> {
    md5_stream(|w| w.write_all(data))
}

/// md5 of `len` bytes of `path` from `offset` (e.g. the region of a backing
/// file the guest wrote); fails if the file is shorter.
pub fn file_region_md5(path: &Path, offset: u64, len: u64) -> io::Result<String> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut region = f.take(len);
    md5_stream(|w| {
        let n = io::copy(&mut region, w)?;
        if n == len {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: only {n} of {len} bytes", path.display()),
            ))
        }
    })
}

fn md5_stream(feed: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<String> {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // md5sum writes nothing before EOF on its input, so feeding it from this
    // thread cannot deadlock on its stdout.
    let fed = feed(&mut stdin);
    drop(stdin);
    let out = child.wait_with_output()?;
    fed?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(h) if out.status.success() && h.len() == 32 => Ok(h.to_owned()),
        _ => Err(io::Error::other(format!(
            "md5sum failed: {} {text:?}",
            out.status
        ))),
    }
}

/// Starts `qemu-storage-daemon` exporting `image` (raw) as vhost-user-blk on
/// `socket` with `queues` queues, and waits until the socket exists.
pub fn storage_daemon(qsd: &Path, image: &Path, socket: &Path, queues: u32) -> io::Result<Daemon> {
    let mut cmd = Command::new(qsd);
    cmd.arg("--blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", image.display()))
        .arg("--blockdev")
        .arg("driver=raw,node-name=disk0,file=file0")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display()
        ));
    Daemon::spawn(
        "qemu-storage-daemon",
        &mut cmd,
        socket,
        Duration::from_secs(10),
    )
}

/// A QMP client (`-qmp unix:PATH,server=on,wait=off`): one JSON object per
/// line each way; events are skipped. Enough JSON for tests, by hand.
#[derive(Debug)]
pub struct Qmp {
    reader: io::BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (polling until QEMU listens, at most `timeout`), reads the
    /// greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Qmp> {
        let sock =
            super::poll_until(timeout, || UnixStream::connect(path).ok()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no QMP socket at {}", path.display()),
                )
            })?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qmp {
            reader: io::BufReader::new(sock.try_clone()?),
            writer: sock,
        };
        let greeting = q.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(io::Error::other(format!("not a QMP greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", "")?;
        Ok(q)
    }

    fn line(&mut self) -> io::Result<String> {
        use std::io::BufRead;
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed"));
        }
        Ok(l)
    }

    /// Runs `command` with `arguments` (a JSON object's text, or "" for
    /// none) and returns the reply line, `{"return": ...}`; an `{"error":
    /// ...}` reply is an error carrying that line.
    pub fn execute(&mut self, command: &str, arguments: &str) -> io::Result<String> {
        let msg = if arguments.is_empty() {
            format!("{{\"execute\": \"{command}\"}}\n")
        } else {
            format!("{{\"execute\": \"{command}\", \"arguments\": {arguments}}}\n")
        };
        self.writer.write_all(msg.as_bytes())?;
        loop {
            let l = self.line()?;
            if l.starts_with("{\"return\"") {
                return Ok(l);
            }
            if l.starts_with("{\"error\"") {
                return Err(io::Error::other(format!("QMP {command}: {}", l.trim())));
            }
            // An event: not our reply.
        }
    }
}

/// The first number after `"key": ` in a line of JSON (QMP replies).
pub fn json_u64(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("\"{key}\": "))? + key.len() + 4;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The memfd of `len` bytes that process `pid` holds (a QEMU
/// memory-backend-memfd of that size), opened read-only through
/// `/proc/<pid>/fd`: the guest memory it backs, as the guest left it.
pub fn memfd_of(pid: u32, len: u64) -> io::Result<File> {
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let path = e?.path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:") {
            continue;
        }
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == len) {
            return File::open(&path);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("process {pid} holds no memfd of {len} bytes"),
    ))
}

/// The sectors of [`dd_pattern`]`(seed, ..)` found in `mem` (512-byte
/// aligned in it, as they are in guest pages): `(intact, damaged)` where
/// intact sectors equal the pattern's sector of the index they name and
/// damaged ones carry the seed's prefix but differ.
pub fn find_pattern_sectors(mem: &mut File, seed: &str) -> io::Result<(BTreeSet<u64>, u64)> {
    let prefix = format!("vcdev:{seed}:");
    let mut intact = BTreeSet::new();
    let mut damaged = 0;
    let mut buf = vec![0u8; 1 << 20];
    mem.seek(SeekFrom::Start(0))?;
    loop {
        let n = read_full(mem, &mut buf)?;
        for sector in buf[..n].chunks_exact(PATTERN_SECTOR) {
            if !sector.starts_with(prefix.as_bytes()) {
                continue;
            }
            let digits = &sector[prefix.len()..(prefix.len() + 11).min(PATTERN_SECTOR)];
            let index = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<u64>().ok());
            match index {
                Some(i) if sector == pattern_sector(seed, i).as_slice() => {
                    intact.insert(i);
                }
                _ => damaged += 1,
            }
        }
        if n < buf.len() {
            return Ok((intact, damaged));
        }
    }
}

/// Whether sector `i` of [`dd_pattern`]`(seed, ..)` is in `image` at its
/// place (offset `i * 512`): how a test sees from the host how far a
/// guest's dd got.
pub fn pattern_sector_on_disk(image: &Path, seed: &str, i: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; PATTERN_SECTOR];
    File::open(image)
        .and_then(|f| f.read_exact_at(&mut b, i * PATTERN_SECTOR as u64))
        .is_ok_and(|()| b[..] == pattern_sector(seed, i)[..])
}

/// Sector `i` of [`dd_pattern`]`(seed, ..)`.
fn pattern_sector(seed: &str, i: u64) -> Vec<u8> {
    let mut line = format!("{:<511}\n", format!("vcdev:{seed}:{i:011}")).into_bytes();
    line.truncate(PATTERN_SECTOR);
    line
}

/// Reads until `buf` is full or the end; returns the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// One file of a [`newc_archive`]: its path in the archive (no leading
/// `/`), its mode (type and permission bits, e.g. `0o100755`) and bytes.
pub struct ArchiveFile<'a> {
    /// Path inside the archive.
    pub path: &'a str,
    /// `st_mode`.
    pub mode: u32,
    /// Contents.
    pub data: &'a [u8],
}

/// A newc ("070701") cpio archive of `files` and the trailer, the format
/// of Linux's initramfs (Documentation/driver-api/early-userspace/
/// buffer-format.rst): a 110-byte ASCII header of hex fields, the name
/// with its NUL, padding to 4, the data, padding to 4.
pub fn newc_archive(files: &[ArchiveFile<'_>]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, nlink: u32, data: &[u8]) {
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("file under 4 GiB"),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            u32::try_from(name.len() + 1).expect("short name"),
            0, // check
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let ino = u32::try_from(i + 1).expect("few files");
        entry(&mut out, ino, f.path, f.mode, 1, f.data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, 1, &[]);
    out
}

impl Guest {
    /// A copy of the guest's initrd at `path` with `files` appended as a
    /// second, uncompressed newc archive (the kernel unpacks concatenated
    /// archives, later files replacing earlier ones; an uncompressed one
    /// must start 4-byte aligned, so the copy is padded with zeros, which
    /// the unpacker skips). Boot it with `.var("INITRD", ..)`.
    pub fn initrd_with(&self, path: &Path, files: &[ArchiveFile<'_>]) -> io::Result<()> {
        let mut image = std::fs::read(&self.initrd)?;
        while !image.len().is_multiple_of(512) {
            image.push(0);
        }
        image.extend_from_slice(&newc_archive(files));
        std::fs::write(path, image)
    }
}
