//! The one way tests start `vcdev serve`: [`Vcdev::builder`] (arguments,
//! which node to wait for, log level) gives a [`Vcdev`], the daemon in a
//! scratch directory, killed on drop. Both doors' harnesses and the
//! benchmark start it so; [`vcdev_bin`] finds (and if need be builds) the
//! binary.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use vcdev::ctl::CONTROL_SOCKET;

use super::process::Daemon;
use super::{TempDir, POLL_INTERVAL, TIMEOUT};

/// The directory of `--dir` that holds the vhost-user sockets.
pub const VHOST_USER_DIR: &str = "vhost-user";

/// The `vcdev` binary of this workspace, built if missing or older than its
/// sources (`VCDEV_BIN` overrides). Tests of another package cannot use
/// `CARGO_BIN_EXE_vcdev`, so the path comes from this test executable's
/// directory (`<target>/<profile>/deps/..`). Without the `group` feature
/// the daemon is built without it too, in a target directory of its own
/// (`<target>/nogroup`): the workspace build's binary has the feature, and
/// that directory's lock is not the one the running `cargo test` holds.
pub fn vcdev_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("VCDEV_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        let profile = profile_dir.file_name().expect("profile name").to_owned();
        let mut target_dir = profile_dir.parent().expect("target dir").to_path_buf();
        if !cfg!(feature = "group") {
            target_dir.push("nogroup");
        }
        let bin = target_dir.join(&profile).join("vcdev");
        if !cfg!(feature = "group") || !is_fresh(&bin) {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "vcdev", "--bin", "vcdev", "--target-dir"])
                .arg(&target_dir)
                .current_dir(super::repo_root());
            if profile == "release" {
                cmd.arg("--release");
            }
            if !cfg!(feature = "group") {
                cmd.arg("--no-default-features");
            }
            let st = cmd.status().expect("running cargo build -p vcdev");
            assert!(st.success(), "cargo build -p vcdev failed");
        }
        bin
    })
    .clone()
}

/// `libvcdev_vfio.so` (the crate `backend/vfio-preload`), next to
/// [`vcdev_bin`] where `vcdev qemu-exec` looks for it; built if missing
/// or older than its sources (`VCDEV_PRELOAD` overrides).
pub fn preload_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        if let Some(p) = std::env::var_os("VCDEV_PRELOAD") {
            return PathBuf::from(p);
        }
        let bin = vcdev_bin();
        let profile_dir = bin.parent().expect("<target>/<profile>");
        let lib = profile_dir.join(vcdev::qemu_exec::PRELOAD_NAME);
        if !is_fresh(&lib) {
            let target_dir = profile_dir.parent().expect("<target>");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "vcdev-vfio-preload", "--target-dir"])
                .arg(target_dir)
                .current_dir(super::repo_root());
            if profile_dir.file_name().is_some_and(|p| p == "release") {
                cmd.arg("--release");
            }
            let st = cmd
                .status()
                .expect("running cargo build -p vcdev-vfio-preload");
            assert!(st.success(), "cargo build -p vcdev-vfio-preload failed");
        }
        lib
    })
    .clone()
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn is_fresh(bin: &Path) -> bool {
    let Ok(built) = bin.metadata().and_then(|m| m.modified()) else {
        return false;
    };
    let root = super::repo_root();
    ["backend", "device-model/src", "iommu/src", "Cargo.lock"]
        .iter()
        .filter_map(|d| {
            let p = root.join(d);
            if p.is_dir() {
                newest_mtime(&p)
            } else {
                p.metadata().and_then(|m| m.modified()).ok()
            }
        })
        .all(|t| t <= built)
}

/// Which node of `--dir` the daemon is ready with.
#[derive(Clone, Debug)]
pub enum Ready {
    /// `DIR/control`, created after every other node.
    Control,
    /// `DIR/vhost-user/NAME`, the socket of device NAME.
    VhostUser(String),
}

/// How to start a `vcdev serve`.
#[derive(Clone, Debug)]
pub struct VcdevBuilder {
    tag: String,
    args: Vec<OsString>,
    ready: Ready,
    log: String,
    subdir: Option<String>,
    envs: Vec<(OsString, OsString)>,
    poll: Duration,
}

impl VcdevBuilder {
    /// Adds `--device SPEC`.
    pub fn device(self, spec: &str) -> Self {
        self.args(&["--device", spec])
    }

    /// Adds `args` after `serve --dir DIR`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(OsString::from));
        self
    }

    /// Waits for `node` instead of `DIR/control`.
    pub fn ready(mut self, node: Ready) -> Self {
        self.ready = node;
        self
    }

    /// Waits for the vhost-user socket of device `name`.
    pub fn wait_for_vhost_user(self, name: &str) -> Self {
        self.ready(Ready::VhostUser(name.to_owned()))
    }

    /// `RUST_LOG` of the daemon (`debug` unless told: tests read the log).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log = level.to_owned();
        self
    }

    /// Sets the environment variable `key` of the daemon (e.g.
    /// `VCDEV_INJECT_IO_URING_FAILURE`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Looks for the ready node every `interval` (default
    /// [`POLL_INTERVAL`]; the daemon benchmark times start-ups finer).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll = interval;
        self
    }

    /// Serves `--dir` in a subdirectory `name` of the scratch directory
    /// (created here), for names with characters worth testing.
    pub fn subdir(mut self, name: &str) -> Self {
        self.subdir = Some(name.to_owned());
        self
    }

    /// Starts the daemon and waits until its ready node exists.
    pub fn spawn(self) -> Vcdev {
        let tmp = TempDir::new(&self.tag).expect("tmpdir");
        let dir = match &self.subdir {
            Some(name) => {
                let d = tmp.join(name);
                std::fs::create_dir(&d).expect("mkdir --dir");
                d
            }
            None => tmp.path().to_path_buf(),
        };
        let daemon = self.serve(&dir);
        Vcdev {
            daemon,
            _tmp: tmp,
            dir,
            how: self,
        }
    }

    /// Starts `vcdev serve --dir dir` with these arguments and waits for
    /// its ready node (a stale one, left by a killed daemon, is removed
    /// first so that the wait sees the new daemon's).
    fn serve(&self, dir: &Path) -> Daemon {
        let mut cmd = Command::new(vcdev_bin());
        cmd.arg("serve").arg("--dir").arg(dir).args(&self.args);
        cmd.env("RUST_LOG", &self.log);
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        let node = match &self.ready {
            Ready::Control => dir.join(CONTROL_SOCKET),
            Ready::VhostUser(name) => dir.join(VHOST_USER_DIR).join(name),
        };
        let _ = std::fs::remove_file(&node);
        Daemon::spawn_polling("vcdev", &mut cmd, &node, TIMEOUT, self.poll).expect("vcdev serve")
    }
}

/// A `vcdev serve` in a scratch directory, killed on drop.
pub struct Vcdev {
    /// The process.
    pub daemon: Daemon,
    /// The scratch directory (removed on drop).
    _tmp: TempDir,
    /// Its `--dir` (the scratch directory or a subdirectory of it).
    dir: PathBuf,
    /// How it was started (for [`Vcdev::kill_and_restart`]).
    how: VcdevBuilder,
}

impl Vcdev {
    /// A builder for `vcdev serve --dir <tmp>`, `tag` naming the scratch
    /// directory; by default it waits for `DIR/control` and logs at debug.
    pub fn builder(tag: &str) -> VcdevBuilder {
        VcdevBuilder {
            tag: tag.to_owned(),
            args: Vec::new(),
            ready: Ready::Control,
            log: "debug".to_owned(),
            subdir: None,
            envs: Vec::new(),
            poll: POLL_INTERVAL,
        }
    }

    /// Starts `vcdev serve --dir <tmp> <args>` and waits for the socket of
    /// device `first` (the vhost-user tests' shorthand for the builder).
    pub fn start(tag: &str, args: &[&str], first: &str) -> Vcdev {
        Vcdev::builder(tag)
            .args(args)
            .wait_for_vhost_user(first)
            .spawn()
    }

    /// Its `--dir`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The vhost-user socket of device `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(VHOST_USER_DIR).join(name)
    }

    /// The daemon's log so far.
    pub fn log(&mut self) -> String {
        self.daemon.proc().stderr().text()
    }

    /// The daemon's log once it contains `needle`, or as it is after
    /// [`super::TIMEOUT`]. A thread reads the daemon's stderr: a line the
    /// daemon wrote before a reply the test has seen may not be in
    /// [`Vcdev::log`] yet.
    pub fn log_with(&mut self, needle: &str) -> String {
        super::poll_until(super::TIMEOUT, || {
            let log = self.log();
            log.contains(needle).then_some(log)
        })
        .unwrap_or_else(|| self.log())
    }

    /// Whether the daemon still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.daemon.proc().try_wait(), Ok(None))
    }

    /// Waits until the daemon logged that a frontend's device was released
    /// (the frontend that just left was fully torn down).
    pub fn wait_released(&mut self) {
        let released = super::poll_until(TIMEOUT, || {
            self.log().contains("device released").then_some(())
        });
        assert!(released.is_some(), "no release logged:\n{}", self.log());
    }

    /// `kill -9` of the daemon, then a new one with the same arguments on
    /// the same `--dir` (a crash and a restart, as a supervisor does it).
    /// The old daemon's log is gone with it.
    pub fn kill_and_restart(&mut self) {
        let p = self.daemon.proc();
        p.signal(libc::SIGKILL).expect("SIGKILL");
        let dead = super::poll_until(TIMEOUT, || p.try_wait().ok().flatten());
        assert!(dead.is_some(), "vcdev did not die of SIGKILL");
        self.daemon = self.how.serve(&self.dir);
    }

    /// `vcdev ctl --dir DIR <args>`: (success, stdout).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = self.ctl_output(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `vcdev ctl --dir DIR <args>`: its whole output (exit status,
    /// stdout, stderr with the error text).
    pub fn ctl_output(&self, args: &[&str]) -> Output {
        Command::new(vcdev_bin())
            .arg("ctl")
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("vcdev ctl")
    }
}

impl Vcdev {
    /// `vcdev ctl --json --dir DIR <args>`: (exit code, its JSON).
    pub fn ctl_json(&self, args: &[&str]) -> (i32, serde_json::Value) {
        ctl_json(&self.dir, args)
    }

    /// A counter of `vcdev ctl stats DEVICE` (which lists every counter:
    /// a key it lacks is a test's typo, and panics).
    pub fn counter(&self, device: &str, key: &str) -> u64 {
        let (rc, v) = self.ctl_json(&["stats", device]);
        assert_eq!(rc, 0, "ctl stats: {v}");
        v["counters"][key]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {key} in {v}"))
    }

    /// SIGTERM, wait for the exit, then a new daemon with the same
    /// arguments on the same `--dir` (an orderly restart).
    pub fn restart(&mut self) {
        let p = self.daemon.proc();
        p.signal(libc::SIGTERM).expect("SIGTERM");
        let done = super::poll_until(TIMEOUT, || p.try_wait().ok().flatten());
        assert!(done.is_some(), "vcdev did not exit on SIGTERM");
        self.daemon = self.how.serve(&self.dir);
    }
}

/// `vcdev ctl --json --dir dir <args>`: (exit code, its JSON output).
pub fn ctl_json(dir: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(vcdev_bin())
        .arg("ctl")
        .arg("--json")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("vcdev ctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "vcdev ctl --json {args:?} printed no JSON ({e}): {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

/// Runs `vcdev serve --dir DIR <args>` to its end (for invalid options,
/// which exit at once) and returns its output.
pub fn serve_once(dir: &Path, args: &[&str]) -> Output {
    serve_once_env(dir, args, &[])
}

/// [`serve_once`] with environment variables `envs` set (for failures a
/// test injects, which make the daemon exit at start).
pub fn serve_once_env(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(vcdev_bin())
        .arg("serve")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("vcdev serve")
}

/// Device `name`'s `NAME: counters: k=v ...` line that `vcdev serve` logs
/// at exit, as a map (empty when the log has none).
pub fn exit_counters(log: &str, name: &str) -> std::collections::BTreeMap<String, u64> {
    let tag = format!("{name}: counters: ");
    log.lines()
        .rev()
        .find_map(|l| l.split_once(tag.as_str()).map(|(_, c)| c))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}
