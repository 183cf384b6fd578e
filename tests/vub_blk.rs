//! The benchmark's `vub_blk` binary (vcdev's device model on rust-vmm's
//! `vhost-user-backend`) stays working: the Rust frontend harness writes and
//! reads back through it, byte for byte, on a RAM disk and on a file.

mod common;

use common::frontend::{pattern, Harness, S_OK};
use common::peers::{Peer, Spawn};
use common::TempDir;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

/// Writes 64 KiB at a few places and reads each back; then checks the
/// capacity in the config space and that a flush succeeds.
fn round_trip(peer: &Peer, disk_len: u64) {
    let mut h = Harness::start(peer.socket(), 1, 256);
    for (i, sector) in [0u64, 1, 777, disk_len / 512 - 128].into_iter().enumerate() {
        let data = pattern(i as u8 + 3, 64 * 1024);
        assert_eq!(h.write(0, sector, &data), S_OK, "write at {sector}");
        let r = h.read(0, sector, data.len() as u32);
        assert_eq!(r.status, S_OK, "read at {sector}");
        assert_eq!(r.used_len, data.len() as u32 + 1);
        assert!(r.data == data, "read back at {sector} differs");
    }
    assert_eq!(h.flush(0), S_OK);
    let cfg =
        h.fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
            .expect("GET_CONFIG")
            .1;
    assert_eq!(
        u64::from_le_bytes(cfg[..8].try_into().unwrap()),
        disk_len / 512
    );
}

#[test]
fn ram_disk_round_trip() {
    let peer = Peer::vub_blk("vub-ram", &["ram=4M"]).unwrap().expect_up();
    round_trip(&peer, 4 << 20);
}

#[test]
fn file_round_trip_buffered_and_direct() {
    let tmp = TempDir::new("vub-file").unwrap();
    let img = tmp.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    let path = format!("path={}", img.display());
    for aio in ["aio=io_uring", "aio=sync"] {
        for direct in ["direct=off", "direct=on"] {
            let peer = Peer::vub_blk("vub-file", &[&path, direct, aio])
                .unwrap()
                .expect_up();
            round_trip(&peer, 8 << 20);
        }
    }
    // The data written through the daemon is in the file.
    let on_disk = std::fs::read(&img).unwrap();
    assert!(on_disk[512..512 + 64 * 1024] == pattern(4, 64 * 1024)[..]);
}

#[test]
fn refused_options_exit_with_2() {
    for args in [&["ram=4M", "aio=bogus"][..], &["ram=4M", "bogus=1"], &[]] {
        match Peer::vub_blk("vub-bad", args).unwrap() {
            Spawn::Refused(_) => {}
            Spawn::Up(_) => panic!("{args:?} accepted"),
        }
    }
}
