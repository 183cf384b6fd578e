//! A statically linked build of one of this crate's binaries (issue #13:
//! `vfio_blk`, which must run unchanged in the busybox test guest).
//!
//! `cargo test` builds the binaries dynamically linked. `-C
//! target-feature=+crt-static` for the whole build would also reach the
//! proc-macro crates (which cannot be static), so only the binary's own
//! crate gets it: `cargo rustc --bin NAME -- -C target-feature=+crt-static`
//! in the same target directory and profile as the running test reuses
//! every dependency already built and only links again (glibc's static
//! `libc.a`, from libc6-dev). The result is copied out at once: the next
//! `cargo test` links the dynamic one back in place.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `PT_INTERP`: the program header a dynamically linked ELF carries.
const PT_INTERP: u32 = 3;

/// Builds `bin` of this crate statically linked (debug info stripped) and
/// copies it to `dest`. Panics with cargo's output when the build fails.
pub fn build(bin: &str, dest: &Path) {
    // target/<profile>/deps/<this test>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let target_dir = profile_dir.parent().expect("target dir");
    let release = profile_dir.file_name().is_some_and(|p| p == "release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(super::repo_root())
        .args([
            "rustc",
            "-p",
            "vcdev-tests",
            "--bin",
            bin,
            "--message-format=json",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    if release {
        cmd.arg("--release");
    }
    cmd.args([
        "--",
        "-C",
        "target-feature=+crt-static",
        "-C",
        "strip=debuginfo",
    ]);
    let out = cmd.output().expect("run cargo rustc");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "static build of {bin} failed (glibc's libc.a is in libc6-dev)\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built: PathBuf = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == bin)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo named no executable for {bin}\n{stdout}"));
    std::fs::copy(&built, dest).expect("copy the static binary");
    assert!(
        is_static(dest),
        "{} is dynamically linked (it has PT_INTERP)",
        dest.display()
    );
}

/// Whether the ELF at `path` has no program interpreter (`PT_INTERP`):
/// what `file` calls "statically linked" / "static-pie linked" and `ldd`
/// "not a dynamic executable".
pub fn is_static(path: &Path) -> bool {
    let b = std::fs::read(path).expect("read ELF");
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    // ELF64 little-endian: e_phoff at 0x20, e_phentsize 0x36, e_phnum 0x38.
    assert!(
        b.len() > 0x40 && &b[..4] == b"\x7fELF" && b[4] == 2 && b[5] == 1,
        "{} is not a 64-bit little-endian ELF",
        path.display()
    );
    let phoff = usize::try_from(u64_at(0x20)).expect("phoff");
    let (size, n) = (usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    (0..n).all(|i| u32_at(phoff + i * size) != PT_INTERP)
}
