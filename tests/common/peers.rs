//! The other vhost-user-blk backends the storage benchmark measures vcdev against, started
//! the one way: each in a scratch directory, killed on drop, ready once its socket exists.
//!
//! - [`Peer::vub_blk`]: this package's `vub_blk` binary (vcdev's device model on rust-vmm's
//!   `vhost-user-backend` crate);
//! - [`Peer::qsd`]: qemu-storage-daemon's vhost-user-blk export;
//! - [`Peer::vcdev`]: `vcdev serve` itself, for callers that must tell a refused `--device`
//!   SPEC from a failure (tests that expect it up use [`super::vcdev::Vcdev::builder`]).
//!
//! A backend that refuses its arguments (exit code 2: an option it does not know yet) gives
//! [`Spawn::Refused`], so a caller can skip that configuration.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::Daemon;
use super::vcdev::{vcdev_bin, VHOST_USER_DIR};
use super::{TempDir, TIMEOUT};

/// Where qemu-storage-daemon is installed (`.ci/install-qemu.sh`).
pub const QSD_BIN: &str = "/usr/bin/qemu-storage-daemon";

/// The exit code of an invalid option (clap's, `vcdev serve`'s, `vub_blk`'s).
pub const EXIT_USAGE: i32 = 2;

/// The `vub_blk` binary of this package.
pub fn vub_blk_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vub_blk"))
}

/// A backend daemon serving one vhost-user socket in its own scratch directory.
pub struct Peer {
    /// The process (killed on drop).
    pub daemon: Daemon,
    socket: PathBuf,
    _tmp: TempDir,
}

/// What starting a backend gave.
pub enum Spawn {
    /// It serves its socket.
    Up(Peer),
    /// It exited with [`EXIT_USAGE`]: it does not take these arguments; the message says why.
    Refused(String),
}

impl Spawn {
    /// The peer, or a panic naming the refusal.
    pub fn expect_up(self) -> Peer {
        match self {
            Spawn::Up(p) => p,
            Spawn::Refused(why) => panic!("backend refused its arguments: {why}"),
        }
    }
}

impl Peer {
    /// Starts `cmd` (whose socket path is `socket`, in `tmp`) and waits for the socket.
    pub fn spawn(name: &str, mut cmd: Command, socket: PathBuf, tmp: TempDir) -> io::Result<Spawn> {
        match Daemon::spawn(name, &mut cmd, &socket, TIMEOUT) {
            Ok(daemon) => Ok(Spawn::Up(Peer {
                daemon,
                socket,
                _tmp: tmp,
            })),
            Err(e) => {
                let text = e.to_string();
                if text.contains(&format!("exit status: {EXIT_USAGE} ")) {
                    let why = text
                        .lines()
                        .rfind(|l| !l.is_empty() && !l.starts_with("---"))
                        .unwrap_or("")
                        .to_owned();
                    Ok(Spawn::Refused(why))
                } else {
                    Err(e)
                }
            }
        }
    }

    /// `vub_blk SOCKET <args>` (e.g. `ram=4M`, `path=FILE`, `queues=2`).
    pub fn vub_blk(tag: &str, args: &[&str]) -> io::Result<Spawn> {
        let tmp = TempDir::new(tag)?;
        let socket = tmp.join("vub.sock");
        let mut cmd = Command::new(vub_blk_bin());
        cmd.arg(&socket).args(args);
        Peer::spawn("vub_blk", cmd, socket, tmp)
    }

    /// [`Peer::vub_blk`] run under the command line `wrap` (e.g. `valgrind --tool=callgrind`).
    pub fn vub_blk_under(wrap: &[String], tag: &str, args: &[&str]) -> io::Result<Spawn> {
        let tmp = TempDir::new(tag)?;
        let socket = tmp.join("vub.sock");
        let mut cmd = wrapped(wrap, &vub_blk_bin());
        cmd.arg(&socket).args(args);
        Peer::spawn("vub_blk", cmd, socket, tmp)
    }

    /// qemu-storage-daemon exporting `--blockdev <blockdev>,node-name=d0` as vhost-user-blk
    /// with one queue; with `iothread`, the export runs in an iothread of its own (in 10.0 an
    /// export otherwise runs in the main loop).
    pub fn qsd(tag: &str, blockdev: &str, iothread: bool) -> io::Result<Spawn> {
        Peer::qsd_queues(tag, blockdev, iothread, 1)
    }

    /// [`Peer::qsd`] with `queues` queues on the export (all in its one thread).
    pub fn qsd_queues(
        tag: &str,
        blockdev: &str,
        iothread: bool,
        queues: usize,
    ) -> io::Result<Spawn> {
        let tmp = TempDir::new(tag)?;
        let socket = tmp.join("qsd.sock");
        let mut export = format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            socket.display()
        );
        let mut cmd = Command::new(QSD_BIN);
        if iothread {
            cmd.args(["--object", "iothread,id=io0"]);
            export.push_str(",iothread=io0");
        }
        cmd.arg("--blockdev")
            .arg(format!("{blockdev},node-name=d0"))
            .arg("--export")
            .arg(export);
        Peer::spawn("qemu-storage-daemon", cmd, socket, tmp)
    }

    /// `vcdev serve --dir <tmp> --device <spec>` at log level info, ready with the socket of
    /// device `name` (which `spec` names).
    pub fn vcdev(tag: &str, spec: &str, name: &str) -> io::Result<Spawn> {
        Peer::vcdev_of(&vcdev_bin(), tag, spec, name)
    }

    /// [`Peer::vcdev`] with the `vcdev` binary `bin` (another build, to compare).
    pub fn vcdev_of(bin: &Path, tag: &str, spec: &str, name: &str) -> io::Result<Spawn> {
        Peer::vcdev_under(&[], bin, tag, spec, name)
    }

    /// [`Peer::vcdev_of`] run under the command line `wrap` (e.g. `valgrind --tool=callgrind`).
    pub fn vcdev_under(
        wrap: &[String],
        bin: &Path,
        tag: &str,
        spec: &str,
        name: &str,
    ) -> io::Result<Spawn> {
        let tmp = TempDir::new(tag)?;
        let socket = tmp.path().join(VHOST_USER_DIR).join(name);
        let mut cmd = wrapped(wrap, bin);
        cmd.arg("serve")
            .arg("--dir")
            .arg(tmp.path())
            .args(["--device", spec])
            .env("RUST_LOG", "info");
        Peer::spawn("vcdev", cmd, socket, tmp)
    }

    /// The socket it serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its process id.
    pub fn pid(&mut self) -> u32 {
        self.daemon.proc().pid()
    }
}

/// `bin` as a command, or `wrap[0] wrap[1..] bin` when `wrap` is not empty.
fn wrapped(wrap: &[String], bin: &Path) -> Command {
    match wrap.split_first() {
        None => Command::new(bin),
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(bin);
            cmd
        }
    }
}

/// Whether qemu-storage-daemon is installed.
pub fn qsd_available() -> bool {
    Path::new(QSD_BIN).exists()
}
