//! Image locking (device-model's `blk::lock`): a writable image is held exclusively and a
//! `readonly=on` one shared, against other vcdev processes, other devices of one daemon, and
//! QEMU's own tools, which lock the same bytes (`block/file-posix.c`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::qemu::require_tool;
use common::vcdev::{serve_once, Vcdev};
use common::{poll_until, TempDir, TIMEOUT};
use vcdev_device_model::blk::file::Error as FileError;
use vcdev_device_model::blk::FileBackend;

/// A 1 MiB raw image in its own scratch directory.
fn image(tag: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new(tag).expect("tmp");
    let img = tmp.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .expect("image");
    (tmp, img)
}

/// Runs `vcdev serve` with `specs` on a scratch directory; it must fail at start.
fn serve_refused(specs: &[String]) -> Output {
    let dir = TempDir::new("lock-refused").expect("tmp");
    let args: Vec<&str> = specs
        .iter()
        .flat_map(|s| ["--device", s.as_str()])
        .collect();
    serve_once(dir.path(), &args)
}

/// Asserts that `out` is a start-up failure (exit 1) for a locked `img` of device `name`,
/// whose message contains every one of `words`.
fn assert_locked(out: &Output, name: &str, img: &Path, words: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr:\n{err}");
    for w in [
        &format!("Device {name}: cannot open its disk image"),
        "is locked by another process",
        &img.display().to_string(),
    ]
    .into_iter()
    .chain(words.iter().copied())
    {
        assert!(err.contains(w), "{w:?} missing from:\n{err}");
    }
}

/// Polls until a read-only open of `img` is refused: someone holds it writable.
fn wait_held_writable(img: &Path) {
    let held = poll_until(TIMEOUT, || {
        matches!(FileBackend::open(img, true), Err(FileError::Locked { .. })).then_some(())
    });
    assert!(held.is_some(), "{} never got locked", img.display());
}

/// A second daemon cannot open an image another one holds writable, writable or read-only:
/// it exits 1 and says why, naming the device, the image and the lock.
#[test]
fn a_second_daemon_on_a_writable_image_exits_1() {
    let (_t, img) = image("lock-img");
    let spec = format!("blk,name=d0,path={}", img.display());
    let _first = Vcdev::builder("lock-first")
        .device(&spec)
        .wait_for_vhost_user("d0")
        .spawn();
    let out = serve_refused(&[format!("blk,name=d1,path={}", img.display())]);
    assert_locked(
        &out,
        "d1",
        &img,
        &["does not share the \"write\" permission", "l_pid -1"],
    );
    let out = serve_refused(&[format!("blk,name=d2,path={},readonly=on", img.display())]);
    assert_locked(&out, "d2", &img, &["holds the \"write\" permission"]);
}

/// `readonly=on` devices share an image, in one daemon and across daemons (a golden image);
/// a writable device on it is refused while they run, and a writable plus a read-only device
/// in one daemon conflict as across processes.
#[test]
fn read_only_devices_share_an_image() {
    let (_t, img) = image("lock-golden");
    let ro = |name: &str| format!("blk,name={name},path={},readonly=on", img.display());
    let mut a = Vcdev::builder("lock-ro-a")
        .device(&ro("a1"))
        .device(&ro("a2"))
        .wait_for_vhost_user("a2")
        .spawn();
    let mut b = Vcdev::builder("lock-ro-b")
        .device(&ro("b1"))
        .wait_for_vhost_user("b1")
        .spawn();
    assert!(a.alive() && b.alive());
    let out = serve_refused(&[format!("blk,name=w,path={}", img.display())]);
    assert_locked(
        &out,
        "w",
        &img,
        &["does not share the \"write\" permission"],
    );
    drop((a, b));
    let out = serve_refused(&[format!("blk,name=w,path={}", img.display()), ro("r")]);
    assert_locked(&out, "r", &img, &["holds the \"write\" permission"]);
}

/// A child killed and reaped on drop.
struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU holding an image writable (qemu-io at its prompt, qemu-storage-daemon exporting it)
/// keeps vcdev out; once QEMU is gone, vcdev gets in.
#[test]
fn qemu_holding_an_image_keeps_vcdev_out() {
    let Some(qemu_io) = require_tool("qemu-io") else {
        return;
    };
    let (_t, img) = image("lock-qemu-io");
    let spec = format!("blk,name=d0,path={}", img.display());
    {
        // qemu-io keeps the image open until its stdin closes.
        let _qemu = Held(
            Command::new(&qemu_io)
                .args(["-f", "raw"])
                .arg(&img)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("qemu-io"),
        );
        wait_held_writable(&img);
        let out = serve_refused(std::slice::from_ref(&spec));
        assert_locked(
            &out,
            "d0",
            &img,
            &["holds the \"write\" permission", "byte 101"],
        );
    }
    let Some(_qsd) = require_tool("qemu-storage-daemon") else {
        return;
    };
    {
        let _qsd = common::peers::Peer::qsd(
            "lock-qsd",
            &format!("driver=file,filename={}", img.display()),
            false,
        )
        .expect("qemu-storage-daemon")
        .expect_up();
        let out = serve_refused(std::slice::from_ref(&spec));
        assert_locked(&out, "d0", &img, &["holds the \"write\" permission"]);
    }
    let d = Vcdev::builder("lock-after-qemu")
        .device(&spec)
        .wait_for_vhost_user("d0")
        .spawn();
    drop(d);
}

/// `qemu-img` / `qemu-io` run with `args` then `img`, then `more`: (success, output).
fn qemu_run(tool: &Path, args: &[&str], img: &Path, more: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .arg(img)
        .args(more)
        .output()
        .expect("QEMU tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `qemu-img` / `qemu-io` run with `args` against an image vcdev holds.
fn qemu(tool: &Path, args: &[&str], img: &Path) -> (bool, String) {
    qemu_run(tool, args, img, &[])
}

/// `qemu-img convert` of `img` to the raw image `to`, with `-U` (force-share) if `force`: a
/// reader that does not share writes, unless forced.
fn qemu_convert(qemu_img: &Path, img: &Path, to: &str, force: bool) -> (bool, String) {
    let mut args = vec!["convert", "-f", "raw", "-O", "raw"];
    if force {
        args.push("-U");
    }
    let (ok, text) = qemu_run(qemu_img, &args, img, &[to]);
    let _ = std::fs::remove_file(to);
    (ok, text)
}

/// QEMU sees vcdev's locks: against a writable device, a QEMU writer gets 'Failed to get
/// "write" lock' and `qemu-img convert` 'Failed to get shared "write" lock', while `qemu-img
/// convert -U` (force-share) works; against a read-only device, QEMU readers work and
/// writers are refused.
#[test]
fn qemu_sees_vcdev_locks() {
    let (Some(qemu_io), Some(qemu_img)) = (require_tool("qemu-io"), require_tool("qemu-img"))
    else {
        return;
    };
    let (_t, img) = image("lock-seen");
    let rw = Vcdev::builder("lock-seen-rw")
        .device(&format!("blk,name=d0,path={}", img.display()))
        .wait_for_vhost_user("d0")
        .spawn();
    let write = ["-f", "raw", "-c", "write 0 512"];
    let (ok, text) = qemu(&qemu_io, &write, &img);
    assert!(
        !ok && text.contains("Failed to get \"write\" lock"),
        "{text}"
    );
    let copy = img.with_extension("copy");
    let copy = copy.to_str().expect("UTF-8 path");
    let (ok, text) = qemu_convert(&qemu_img, &img, copy, false);
    assert!(
        !ok && text.contains("Failed to get shared \"write\" lock"),
        "{text}"
    );
    let (ok, text) = qemu_convert(&qemu_img, &img, copy, true);
    assert!(ok, "qemu-img convert -U: {text}");
    drop(rw);

    let _ro = Vcdev::builder("lock-seen-ro")
        .device(&format!("blk,name=d0,path={},readonly=on", img.display()))
        .wait_for_vhost_user("d0")
        .spawn();
    let (ok, text) = qemu_convert(&qemu_img, &img, copy, false);
    assert!(ok, "qemu-img convert next to a read-only device: {text}");
    let (ok, text) = qemu(&qemu_io, &["-r", "-f", "raw", "-c", "read 0 512"], &img);
    assert!(ok, "qemu-io -r next to a read-only device: {text}");
    let (ok, text) = qemu(&qemu_io, &write, &img);
    assert!(
        !ok && text.contains("Failed to get \"write\" lock"),
        "{text}"
    );
}
