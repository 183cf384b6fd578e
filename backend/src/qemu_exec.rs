//! `vcdev qemu-exec`: start QEMU so that its own, unmodified `vfio-pci`
//! (iommufd backend) drives a vcdev device through the cdev door.
//!
//! The launcher opens `DIR/iommu` and `DIR/devices/NAME` (two files, as
//! PROTOCOL.md hands them out), keeps both descriptors open across `exec`,
//! and appends to QEMU's arguments
//!
//! ```text
//! -object iommufd,id=vcdev-iommufd0,fd=N
//! -device vfio-pci,id=vcdev-NAME,iommufd=vcdev-iommufd0,fd=M[,PROPS]
//! ```
//!
//! with `LD_PRELOAD` naming `libvcdev_vfio.so` (the crate
//! `backend/vfio-preload`) and [`ENV_FDS`] naming `N,M`: the library
//! turns QEMU's ioctl, pread and pwrite on those two descriptors into cdev
//! frames.

use std::ffi::OsString;
use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cdev::client::File;

/// The environment variable that tells the preload library which
/// descriptors are vcdev files: their numbers, comma-separated.
pub const ENV_FDS: &str = "VCDEV_VFIO_FDS";
/// The preload library's log filter (`env_logger` syntax, e.g. `debug`).
pub const ENV_LOG: &str = "VCDEV_VFIO_LOG";
/// The preload library's file name.
pub const PRELOAD_NAME: &str = "libvcdev_vfio.so";
/// The QEMU id of the iommufd object the launcher adds.
pub const IOMMUFD_ID: &str = "vcdev-iommufd0";

/// Why the launcher could not start QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuExecError {
    /// Opening a node of the cdev door failed.
    #[error("opening {path}: {errno}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The door's (or connect's) errno.
        errno: vcdev_iommu::Errno,
    },
    /// No preload library where it was looked for.
    #[error("the preload library {0} does not exist (build it: cargo build -p vcdev-vfio-preload, or pass --preload)")]
    NoPreload(PathBuf),
    /// Clearing FD_CLOEXEC failed.
    #[error("keeping descriptor {fd} open across exec: {source}")]
    Inherit {
        /// The descriptor.
        fd: RawFd,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// exec failed.
    #[error("exec {program}: {source}")]
    Exec {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No QEMU command after `--`.
    #[error("no QEMU command given after --")]
    NoCommand,
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct QemuExec {
    /// The daemon's runtime directory.
    pub dir: PathBuf,
    /// The device's name.
    pub device: String,
    /// The preload library.
    pub preload: PathBuf,
    /// Extra `vfio-pci` properties (`bus=rp0,addr=0`).
    pub props: Option<String>,
    /// The QEMU program and its arguments.
    pub command: Vec<OsString>,
}

/// The default preload library: next to the running `vcdev` binary.
pub fn default_preload() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(PRELOAD_NAME)))
        .unwrap_or_else(|| PathBuf::from(PRELOAD_NAME))
}

/// The two opened files and the full command (program first) with its
/// environment.
#[derive(Debug)]
pub struct Prepared {
    /// The iommufd file's descriptor (inheritable).
    pub iommufd: RawFd,
    /// The device file's descriptor (inheritable).
    pub device: RawFd,
    /// The program and arguments.
    pub argv: Vec<OsString>,
    /// `(name, value)` to set.
    pub env: Vec<(String, OsString)>,
}

fn open(path: &Path) -> Result<RawFd, QemuExecError> {
    let f = File::open(path).map_err(|errno| QemuExecError::Open {
        path: path.to_owned(),
        errno,
    })?;
    let fd = f.into_fd().into_raw_fd();
    inherit(fd)?;
    Ok(fd)
}

/// Clears FD_CLOEXEC on `fd`.
fn inherit(fd: RawFd) -> Result<(), QemuExecError> {
    // SAFETY: fcntl on a descriptor this process owns; no memory involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(QemuExecError::Inherit {
            fd,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl QemuExec {
    /// Opens the files and builds the command line.
    pub fn prepare(&self) -> Result<Prepared, QemuExecError> {
        if self.command.is_empty() {
            return Err(QemuExecError::NoCommand);
        }
        if !self.preload.is_file() {
            return Err(QemuExecError::NoPreload(self.preload.clone()));
        }
        let iommufd = open(&self.dir.join("iommu"))?;
        let device = open(&self.dir.join("devices").join(&self.device))?;
        let mut argv = self.command.clone();
        argv.push("-object".into());
        argv.push(format!("iommufd,id={IOMMUFD_ID},fd={iommufd}").into());
        let mut dev = format!(
            "vfio-pci,id=vcdev-{},iommufd={IOMMUFD_ID},fd={device}",
            self.device
        );
        if let Some(p) = &self.props {
            dev.push(',');
            dev.push_str(p);
        }
        argv.push("-device".into());
        argv.push(dev.into());
        let preload = std::fs::canonicalize(&self.preload).unwrap_or(self.preload.clone());
        let mut ld = preload.into_os_string();
        if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
            ld.push(" ");
            ld.push(old);
        }
        Ok(Prepared {
            iommufd,
            device,
            argv,
            env: vec![
                ("LD_PRELOAD".to_owned(), ld),
                (ENV_FDS.to_owned(), format!("{iommufd},{device}").into()),
            ],
        })
    }
}

impl Prepared {
    /// The command as a shell line (for `--print`).
    pub fn shell_line(&self) -> String {
        let quote = |s: &std::ffi::OsStr| {
            let s = s.to_string_lossy();
            if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=,./:@+%".contains(&b))
            {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', r"'\''"))
            }
        };
        let mut words: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect();
        words.extend(self.argv.iter().map(|a| quote(a)));
        words.join(" ")
    }

    /// Replaces this process with QEMU (returns only on failure).
    pub fn exec(self) -> QemuExecError {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let source = cmd.exec();
        QemuExecError::Exec {
            program: self.argv[0].to_string_lossy().into_owned(),
            source,
        }
    }
}
