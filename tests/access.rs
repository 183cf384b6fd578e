//! Access control (issue #10): `--socket-mode`, `--allow-uid`, SO_PEERCRED
//! at accept. As root, a child of this test switches to another uid (its
//! `setresuid`, through `Command::uid`) and probes every node kind: refused
//! when its uid is not allowed, served when it is.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::vcdev::Vcdev;

/// The probe's environment variable: the daemon's `--dir`.
const PROBE_ENV: &str = "VCDEV_ACCESS_PROBE";

const ALLOWED: u32 = 4242;
const OTHER: u32 = 4343;

/// A vhost-user GET_FEATURES on `path`: "served", or why not.
fn probe_vhost_user(path: &Path) -> String {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => return format!("connect:{}", e.raw_os_error().unwrap_or(0)),
    };
    // request 1 (GET_FEATURES), flags: version 1, size 0.
    let mut hdr = Vec::new();
    for w in [1u32, 1, 0] {
        hdr.extend_from_slice(&w.to_le_bytes());
    }
    if s.write_all(&hdr).is_err() {
        return "refused".into();
    }
    let mut reply = [0u8; 20];
    match s.read_exact(&mut reply) {
        Ok(()) => "served".into(),
        Err(_) => "refused".into(),
    }
}

/// VCDEV_OPEN of cdev node `path`: "served", or the errno.
fn probe_cdev(path: &Path) -> String {
    match vcdev::cdev::client::File::open(path) {
        Ok(_) => "served".into(),
        Err(e) => format!("errno:{}", e.0),
    }
}

/// The child: probes every node of the daemon in `$VCDEV_ACCESS_PROBE` and
/// prints one line. A no-op in a normal test run.
#[test]
fn access_probe_child() {
    let Some(dir) = std::env::var_os(PROBE_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let mut out = vec![format!(
        "vhost-user={}",
        probe_vhost_user(&dir.join("vhost-user/d0"))
    )];
    let mut nodes = vec!["iommu", "devices/d0"];
    if cfg!(feature = "group") {
        nodes.extend(["vfio/vfio", "vfio/0"]);
    }
    for n in nodes {
        out.push(format!("{n}={}", probe_cdev(&dir.join(n))));
    }
    let ctl = match UnixStream::connect(dir.join("control")) {
        Ok(_) => "connected".to_owned(),
        Err(e) => format!("connect:{}", e.raw_os_error().unwrap_or(0)),
    };
    out.push(format!("control={ctl}"));
    println!("PROBE {}", out.join(" "));
}

/// A copy of this test binary in `tmp`, which any uid may run: the
/// checkout (and so the target directory) may sit under a directory other
/// users cannot enter, such as one made by `mktemp -d`.
fn probe_exe(tmp: &common::TempDir) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let open = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(tmp.path(), open.clone()).expect("chmod tmpdir");
    let exe = tmp.join("probe");
    std::fs::copy(std::env::current_exe().expect("current_exe"), &exe).expect("copy");
    std::fs::set_permissions(&exe, open).expect("chmod probe");
    exe
}

/// Runs the probe as `uid`/`gid` against `dir`; its `key=value` words.
fn probe_as(uid: u32, dir: &Path) -> Vec<(String, String)> {
    let tmp = common::TempDir::new("access-probe").expect("tmpdir");
    let exe = probe_exe(&tmp);
    let run = || {
        Command::new(&exe)
            .args([
                "--exact",
                "access_probe_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROBE_ENV, dir)
            .uid(uid)
            .gid(uid)
            .output()
    };
    // ETXTBSY: a child another test forked while the copy was open for
    // writing holds that descriptor until it execs; try again.
    let out = common::poll_until(common::TIMEOUT, || match run() {
        Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => None,
        r => Some(r),
    })
    .expect("the probe copy stays busy")
    .expect("probe child");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.split_once("PROBE ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "probe as uid {uid} printed nothing: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// With `--socket-mode 0666` the file modes let everyone in, so
/// `--allow-uid` decides: another uid is refused on every node kind
/// (vhost-user closed, cdev EACCES), the allowed uid is served; the
/// control socket stays 0600 whatever the options.
#[test]
fn allow_uid_decides_on_every_node_kind() {
    if !is_root() {
        eprintln!("SKIP allow_uid_decides_on_every_node_kind: needs root (to switch uids)");
        return;
    }
    let mut d = Vcdev::builder("access-allow")
        .args(&["--socket-mode", "0666", "--allow-uid", &ALLOWED.to_string()])
        .device("blk,name=d0,ram=1M")
        .spawn();
    let eacces = format!("errno:{}", libc::EACCES);
    let eacces_connect = format!("connect:{}", libc::EACCES);
    for (k, v) in probe_as(OTHER, d.dir()) {
        match k.as_str() {
            "vhost-user" => assert_eq!(v, "refused", "{k}"),
            "control" => assert_eq!(v, eacces_connect, "{k}"),
            _ => assert_eq!(v, eacces, "{k}"),
        }
    }
    // The refusal is logged after the close the probe saw: wait for it.
    let logged = common::poll_until(common::TIMEOUT, || {
        let log = d.log();
        (log.contains(&format!("uid {OTHER} gid {OTHER}")) && log.contains("--allow-uid"))
            .then_some(())
    });
    assert!(logged.is_some(), "{}", d.log());
    for (k, v) in probe_as(ALLOWED, d.dir()) {
        match k.as_str() {
            "control" => assert_eq!(v, eacces_connect, "{k}"),
            _ => assert_eq!(v, "served", "{k}"),
        }
    }
    // The daemon's own uid (root here) is served too.
    let mut h = common::frontend::Harness::start(&d.socket("d0"), 1, 16);
    assert_eq!(h.write(0, 0, &[7u8; 512]), common::frontend::S_OK);
}

/// Without `--allow-uid`, the nodes' modes decide alone: the default 0600
/// keeps another uid out at `connect`; `--socket-mode 0666` lets it in.
#[test]
fn without_allow_uid_the_file_modes_decide() {
    if !is_root() {
        eprintln!("SKIP without_allow_uid_the_file_modes_decide: needs root (to switch uids)");
        return;
    }
    let d = Vcdev::builder("access-modes")
        .device("blk,name=d0,ram=1M")
        .spawn();
    let eacces_connect = format!("connect:{}", libc::EACCES);
    let eacces = format!("errno:{}", libc::EACCES);
    for (k, v) in probe_as(OTHER, d.dir()) {
        // The kernel refuses the connect: the cdev client gives its errno.
        assert!(v == eacces_connect || v == eacces, "{k}={v}");
    }
    let open = Vcdev::builder("access-open")
        .args(&["--socket-mode", "0666"])
        .device("blk,name=d0,ram=1M")
        .spawn();
    for (k, v) in probe_as(OTHER, open.dir()) {
        match k.as_str() {
            "control" => assert_eq!(v, eacces_connect, "{k}"),
            _ => assert_eq!(v, "served", "{k}"),
        }
    }
}
