//! Child processes for tests: output captured in memory, a hard deadline on
//! waiting, and SIGKILL + reap on drop so no test leaves a process behind.

use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{poll_every, poll_until, POLL_INTERVAL};

/// Bytes read so far from one pipe of a child.
#[derive(Clone, Debug, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything captured so far, lossily decoded as UTF-8.
    pub fn text(&self) -> String {
        let buf = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn start(mut pipe: impl Read + Send + 'static) -> (Self, JoinHandle<()>) {
        let cap = Self::default();
        let sink = cap.clone();
        let handle = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => sink
                        .0
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
        (cap, handle)
    }
}

/// How a [`Proc`] ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Exit status (after SIGKILL when `timed_out`).
    pub status: ExitStatus,
    /// The deadline passed and the process was killed.
    pub timed_out: bool,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// A spawned child with stdin closed and stdout/stderr captured. Dropping it
/// kills (SIGKILL) and reaps the process.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    stdout: Capture,
    stderr: Capture,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Spawns `cmd` (its stdio is replaced); `name` is used in messages.
    ///
    /// Spawned from the process's main thread (a bench's, where `harness = false`), the child
    /// gets SIGKILL when this process dies, so a bench killed by a signal leaves no daemon
    /// behind. Not from other threads: the kernel's parent-death signal follows the thread that
    /// forked, and a test thread may end before the process it started is done with.
    pub fn spawn(name: &str, cmd: &mut Command) -> io::Result<Self> {
        if on_main_thread() {
            let parent = libc::pid_t::try_from(std::process::id()).map_err(io::Error::other)?;
            // SAFETY: the closure runs in the forked child before exec; it makes only
            // async-signal-safe system calls (prctl, getppid) and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The parent may have died before the prctl: then the child is orphaned.
                    if libc::getppid() != parent {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawning {name}: {e}")))?;
        let (stdout, h1) = Capture::start(child.stdout.take().expect("stdout is piped"));
        let (stderr, h2) = Capture::start(child.stderr.take().expect("stderr is piped"));
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            stdout,
            stderr,
            readers: vec![h1, h2],
        })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Captured stdout so far.
    pub fn stdout(&self) -> &Capture {
        &self.stdout
    }

    /// Captured stderr so far.
    pub fn stderr(&self) -> &Capture {
        &self.stderr
    }

    /// `Some(status)` once the process has exited (it is reaped).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) if the process has not been reaped.
    pub fn signal(&mut self, sig: libc::c_int) -> io::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if c.try_wait()?.is_none() {
                let pid = libc::pid_t::try_from(c.id()).map_err(io::Error::other)?;
                // SAFETY: kill(2) takes plain integers and touches no memory;
                // the pid is our unreaped child, so it cannot be recycled.
                if unsafe { libc::kill(pid, sig) } != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// Waits at most `timeout` for the process to exit, then SIGKILLs it;
    /// returns its status and all of its output.
    pub fn wait_timeout(mut self, timeout: Duration) -> io::Result<Finished> {
        let mut child = self.child.take().expect("child present until waited");
        let exited = poll_until(timeout, || child.try_wait().transpose()).transpose()?;
        let (status, timed_out) = match exited {
            Some(s) => (s, false),
            None => {
                let _ = child.kill();
                (child.wait()?, true)
            }
        };
        // The pipes reach EOF now that the process is gone.
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
        Ok(Finished {
            status,
            timed_out,
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
        })
    }

    /// SIGTERM, then at most `timeout` for a clean exit, then SIGKILL.
    pub fn terminate(mut self, timeout: Duration) -> io::Result<Finished> {
        self.signal(libc::SIGTERM)?;
        self.wait_timeout(timeout)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A daemon serving a unix socket, killed on drop.
#[derive(Debug)]
pub struct Daemon {
    proc: Proc,
    socket: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` and polls until `socket` exists as a unix socket. Fails
    /// if the daemon exits first or `timeout` passes; the error carries the
    /// daemon's output.
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        socket: &Path,
        timeout: Duration,
    ) -> io::Result<Self> {
        Daemon::spawn_polling(name, cmd, socket, timeout, POLL_INTERVAL)
    }

    /// [`Daemon::spawn`], looking for the socket every `interval`.
    pub fn spawn_polling(
        name: &str,
        cmd: &mut Command,
        socket: &Path,
        timeout: Duration,
        interval: Duration,
    ) -> io::Result<Self> {
        let mut proc = Proc::spawn(name, cmd)?;
        let ready = poll_every(interval, timeout, || {
            let is_sock = std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket());
            match proc.try_wait() {
                _ if is_sock => Some(Ok(())),
                Ok(Some(st)) => Some(Err(format!("exited with {st} before creating the socket"))),
                Err(e) => Some(Err(format!("wait failed: {e}"))),
                Ok(None) => None,
            }
        })
        .unwrap_or_else(|| Err(format!("no socket after {timeout:?}")));
        match ready {
            Ok(()) => Ok(Self {
                proc,
                socket: socket.to_path_buf(),
            }),
            Err(why) => {
                let out = proc.wait_timeout(Duration::ZERO)?;
                Err(io::Error::other(format!(
                    "{name}: {why} ({})\n--- stdout\n{}--- stderr\n{}",
                    socket.display(),
                    out.stdout,
                    out.stderr
                )))
            }
        }
    }

    /// The socket path it serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The underlying process (output so far, pid, signals).
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// SIGTERM, then at most `timeout`, then SIGKILL; returns its output.
    pub fn stop(self, timeout: Duration) -> io::Result<Finished> {
        self.proc.terminate(timeout)
    }
}

/// Whether the calling thread is the process's main thread.
fn on_main_thread() -> bool {
    // SAFETY: getpid(2) and gettid(2) take no arguments and cannot fail.
    unsafe { libc::getpid() == libc::gettid() }
}
