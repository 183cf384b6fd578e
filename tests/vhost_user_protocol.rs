//! vhost-user messages one by one, over the real socket of `vcdev serve`:
//! memory-slot changes with I/O before and after, RESET_DEVICE,
//! SET/GET_STATUS, config space, refused messages. Raw frames (through
//! `vcdev::wire`) where vhost's `Frontend` has no method, and every check
//! looks at an effect, so a handler that only acks fails.

mod common;

use common::frontend::{pattern, DriverQueue, Harness, S_OK};
use common::frontend::{u64_of, Region, DATA_GPA, DATA_SIZE, META_GPA, META_SIZE, S_IOERR};
use common::vcdev::Vcdev;
use common::TIMEOUT;
use vcdev::vhost_user::inflight::queue_region_size;
use vcdev::vhost_user::memory::MAX_MEM_SLOTS;
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserConfigFlags, VhostUserInflight,
    VhostUserSingleMemoryRegion, VhostUserVringState,
};
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

const STATUS_ACK_DRIVER_FEATURES_OK_DRIVER_OK: u64 = (VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK) as u64;

/// A request code vhost-user does not have.
const UNKNOWN_REQUEST: u32 = 0xdead;

/// The ADD_MEM_REG / REM_MEM_REG payload of one region.
fn single_region_payload(gpa: u64, size: u64, uaddr: u64) -> Vec<u8> {
    VhostUserSingleMemoryRegion::new(gpa, size, uaddr, 0)
        .as_slice()
        .to_vec()
}

fn single_region(r: &Region) -> Vec<u8> {
    single_region_payload(r.gpa, r.size, r.uaddr())
}

/// Offers a request on queue 0 and asserts that the device does not serve
/// it (within 300 ms): the queue is stopped since `after`.
fn assert_not_served(h: &mut Harness, after: &str) {
    let hdr = h.queues[0].header_gpa();
    h.queues[0].submit(&h.mem, &[(hdr, 16, false), (hdr + 16, 1, true)]);
    assert!(
        h.queues[0]
            .wait_used(&h.mem, std::time::Duration::from_millis(300))
            .is_none(),
        "queue served after {after}"
    );
}

/// GET_VRING_BASE of queue 0 as a raw frame: the base it answers.
fn raw_vring_base(h: &Harness) -> u32 {
    let base = h.raw(
        FrontendReq::GET_VRING_BASE,
        VhostUserVringState::new(0, 0).as_slice(),
        &[],
    );
    u32::from_le_bytes(base.payload[4..8].try_into().expect("4 bytes"))
}

/// ADD_MEM_REG and REM_MEM_REG as raw frames, with I/O before and after:
/// data in a removed region fails with IOERR, and works again once the
/// region is back.
#[test]
fn add_and_remove_memory_regions_with_io() {
    let d = Vcdev::start("vu-memslots", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::connect(&d.socket("vfio0"));
    assert_eq!(
        u64_of(&h.raw(FrontendReq::GET_MAX_MEM_SLOTS, &[], &[]).payload),
        MAX_MEM_SLOTS as u64
    );
    h.mem.regions.push(Region::new(META_GPA, META_SIZE));
    h.mem.regions.push(Region::new(DATA_GPA, DATA_SIZE));
    for r in &h.mem.regions {
        let ack = h.raw_ack(
            FrontendReq::ADD_MEM_REG,
            &single_region(r),
            &[r.file.as_raw_fd()],
        );
        assert_eq!(ack, 0, "ADD_MEM_REG");
    }
    // Overlapping the data region: refused.
    let dup = Region::new(DATA_GPA + 0x1000, 0x1000);
    let ack = h.raw_ack(
        FrontendReq::ADD_MEM_REG,
        &single_region(&dup),
        &[dup.file.as_raw_fd()],
    );
    assert_ne!(ack, 0, "overlapping ADD_MEM_REG acked");
    h.queues
        .push(common::frontend::DriverQueue::new_for_tests(0, 64));
    h.start_queue(0);
    let data = pattern(4, 4096);
    assert_eq!(h.write(0, 8, &data), S_OK);
    // Remove the data region: the next request's data cannot be reached.
    let data_region = single_region(&h.mem.regions[1]);
    assert_eq!(h.raw_ack(FrontendReq::REM_MEM_REG, &data_region, &[]), 0);
    assert_eq!(h.read(0, 8, 4096).status, S_IOERR);
    // Removing it twice: refused.
    assert_ne!(h.raw_ack(FrontendReq::REM_MEM_REG, &data_region, &[]), 0);
    // Back again: I/O works, the disk kept the data.
    let fd = h.mem.regions[1].file.as_raw_fd();
    assert_eq!(h.raw_ack(FrontendReq::ADD_MEM_REG, &data_region, &[fd]), 0);
    let r = h.read(0, 8, 4096);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data);
}

/// A full memory table over the socket, as memory hotplug builds it with
/// CONFIGURE_MEM_SLOTS: GET_MAX_MEM_SLOTS says 509; the ring region, 507
/// small regions (pages of one memfd, as QEMU gives one RAM block's fd for
/// several regions) and the data region added last, one ADD_MEM_REG each;
/// the 510th refused with ENOSPC; I/O whose data lives in the region added
/// last; a region in the middle removed and the data region removed and
/// added again, with I/O after each.
#[test]
fn full_memory_table_with_io_through_the_region_added_last() {
    const PAGE: u64 = 0x1000;
    const FILLER_GPA: u64 = 0x1_0000_0000;
    let mut d = Vcdev::start("vu-509slots", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::connect(&d.socket("vfio0"));
    assert_eq!(h.fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS"), 509);
    assert_eq!(h.add_mem_reg(Region::new(META_GPA, META_SIZE)), 0);
    let fillers = MAX_MEM_SLOTS as u64 - 2;
    let fd = vcdev_iommu::mem::sealed_memfd("fillers", (fillers + 1) * PAGE).expect("memfd");
    let file = std::fs::File::from(fd);
    let filler = |i: u64| Region::in_file(FILLER_GPA + i * 0x10000, PAGE, &file, i * PAGE);
    for i in 0..fillers {
        assert_eq!(h.add_mem_reg(filler(i)), 0, "ADD_MEM_REG of filler {i}");
    }
    assert_eq!(h.add_mem_reg(Region::new(DATA_GPA, DATA_SIZE)), 0);
    assert_eq!(h.mem.regions.len(), MAX_MEM_SLOTS);
    // The 510th: no slot left.
    let extra = filler(fillers);
    assert_eq!(h.add_mem_reg(extra), libc::ENOSPC as u64);
    // I/O: request header and status in the first region, data in the last.
    h.queues.push(DriverQueue::new_for_tests(0, 64));
    h.start_queue(0);
    assert!(h.queues[0].data_gpa() >= DATA_GPA);
    let data = pattern(9, 64 << 10);
    assert_eq!(h.write(0, 64, &data), S_OK);
    let r = h.read(0, 64, 64 << 10);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data, "read back differs");
    // One region in the middle goes; the data region is untouched.
    let mid = fillers as usize / 2 + 1;
    assert_eq!(h.rem_mem_reg(&h.mem.regions[mid]), 0);
    assert_eq!(h.rem_mem_reg(&h.mem.regions[mid]), libc::ENOENT as u64);
    let r = h.read(0, 64, 64 << 10);
    assert!(r.status == S_OK && r.data == data);
    // The data region goes: its I/O fails; back again: it works.
    let last = h.mem.regions.len() - 1;
    assert_eq!(h.rem_mem_reg(&h.mem.regions[last]), 0);
    assert_eq!(h.read(0, 64, 4096).status, S_IOERR);
    let back = h.mem.regions.pop().expect("data region");
    assert_eq!(h.add_mem_reg(back), 0);
    let r = h.read(0, 64, 64 << 10);
    assert!(r.status == S_OK && r.data == data);
    // Two slots were freed and one taken again: one more fits, then none.
    assert_eq!(h.add_mem_reg(filler(fillers)), 0);
    assert_eq!(
        h.add_mem_reg(Region::new(DATA_GPA + DATA_SIZE, PAGE)),
        libc::ENOSPC as u64
    );
    let log = d.log_with("(509 of 509 slots used)");
    assert!(log.contains("(509 of 509 slots used)"), "{log}");
}

/// RESET_DEVICE stops the queues and forgets their state: a kick after it
/// is not served, GET_VRING_BASE and GET_STATUS read 0; after a restart
/// the disk still has its data.
#[test]
fn reset_device_stops_and_forgets_the_queues() {
    let d = Vcdev::start("vu-reset", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    let data = pattern(8, 2048);
    assert_eq!(h.write(0, 0, &data), S_OK);
    let status = STATUS_ACK_DRIVER_FEATURES_OK_DRIVER_OK.to_le_bytes();
    assert_eq!(h.raw_ack(FrontendReq::SET_STATUS, &status, &[]), 0);
    assert_eq!(h.raw_ack(FrontendReq::RESET_DEVICE, &[], &[]), 0);
    assert_eq!(
        u64_of(&h.raw(FrontendReq::GET_STATUS, &[], &[]).payload),
        0,
        "status survives RESET_DEVICE"
    );
    // A request offered now is not served.
    let before = h.queues[0].device_used_idx(&h.mem);
    assert_not_served(&mut h, "RESET_DEVICE");
    assert_eq!(h.queues[0].device_used_idx(&h.mem), before);
    assert_eq!(raw_vring_base(&h), 0, "base not reset");
    // Reinitialise (features are gone after a reset) and check the data.
    h.fe.set_features(h.features).expect("SET_FEATURES");
    h.queues[0].reset_indices(&h.mem);
    h.start_queue(0);
    let r = h.read(0, 0, 2048);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data);
}

/// SET_STATUS / GET_STATUS as raw frames: the status reads back, and
/// status 0 stops the queues with their position kept for GET_VRING_BASE.
#[test]
fn set_and_get_status() {
    let d = Vcdev::start("vu-status", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    for v in [0x1u64, 0x3, 0xb, STATUS_ACK_DRIVER_FEATURES_OK_DRIVER_OK] {
        assert_eq!(h.raw_ack(FrontendReq::SET_STATUS, &v.to_le_bytes(), &[]), 0);
        assert_eq!(u64_of(&h.raw(FrontendReq::GET_STATUS, &[], &[]).payload), v);
    }
    assert_ne!(
        h.raw_ack(FrontendReq::SET_STATUS, &0x100u64.to_le_bytes(), &[]),
        0,
        "status beyond 8 bits acked"
    );
    for _ in 0..3 {
        assert_eq!(h.flush(0), S_OK);
    }
    assert_eq!(
        h.raw_ack(FrontendReq::SET_STATUS, &0u64.to_le_bytes(), &[]),
        0
    );
    assert_not_served(&mut h, "status 0");
    assert_eq!(raw_vring_base(&h), 3, "position lost");
}

/// GET_CONFIG answers the virtio-blk config space; a bad range gets a
/// zero-size reply; SET_CONFIG of the read-only space is refused.
#[test]
fn config_space() {
    let d = Vcdev::start("vu-config", &["--device", "blk,ram=2M,queues=3"], "vfio0");
    let mut h = Harness::connect(&d.socket("vfio0"));
    let (c, bytes) =
        h.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .expect("GET_CONFIG");
    assert_eq!({ c.size }, 60);
    // capacity in sectors, then num_queues at offset 34.
    assert_eq!(&bytes[0..8], &(2u64 << 20 >> 9).to_le_bytes());
    assert_eq!(&bytes[34..36], &3u16.to_le_bytes());
    let mut bad = VhostUserConfig::new(0x1000, 8, VhostUserConfigFlags::empty())
        .as_slice()
        .to_vec();
    bad.extend_from_slice(&[0u8; 8]);
    let r = h.raw(FrontendReq::GET_CONFIG, &bad, &[]);
    assert_eq!(r.payload.len(), 12);
    assert_eq!(&r.payload[4..8], &0u32.to_le_bytes());
    assert!(h
        .fe
        .set_config(32, VhostUserConfigFlags::WRITABLE, &[0])
        .is_err());
    let (_, again) =
        h.fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .expect("GET_CONFIG");
    assert_eq!(again, bytes);
}

/// Refused requests get a non-zero REPLY_ACK and the connection goes on;
/// a request code nobody knows ends it.
#[test]
fn refused_messages_get_error_acks() {
    let mut d = Vcdev::start("vu-refuse", &["--device", "blk,ram=1M"], "vfio0");
    let h = Harness::start(&d.socket("vfio0"), 1, 64);
    let bad_num = VhostUserVringState::new(0, 1000);
    assert_ne!(
        h.raw_ack(FrontendReq::SET_VRING_NUM, bad_num.as_slice(), &[]),
        0
    );
    let bad_index = VhostUserVringState::new(9, 64);
    assert_ne!(
        h.raw_ack(FrontendReq::SET_VRING_NUM, bad_index.as_slice(), &[]),
        0
    );
    assert_ne!(
        h.raw_ack(FrontendReq::SET_FEATURES, &(1u64 << 62).to_le_bytes(), &[]),
        0
    );
    assert_ne!(h.raw_ack(FrontendReq::SET_LOG_BASE, &[0u8; 8], &[]), 0);
    // IOTLB_MSG without ACCESS_PLATFORM (the vIOMMU issue adds it).
    assert_ne!(h.raw_ack(FrontendReq::IOTLB_MSG, &[0u8; 32], &[]), 0);
    // Still alive.
    assert_eq!(
        u64_of(&h.raw(FrontendReq::GET_QUEUE_NUM, &[], &[]).payload),
        1
    );
    // A code nobody knows: the connection ends.
    assert!(h
        .raw_flags_code(UNKNOWN_REQUEST, wire_need_reply(), &[], &[])
        .is_none());
    let logged = common::poll_until(common::TIMEOUT, || {
        d.log().contains("Unknown request 57005").then_some(())
    });
    assert!(logged.is_some(), "{}", d.log());
}

/// Memory that is not a sealed memfd is refused unless the daemon runs
/// with --allow-unsealed-memory.
#[test]
fn unsealed_memory_refused_unless_allowed() {
    for (allow, want_ok) in [(false, false), (true, true)] {
        let mut args = vec!["--device", "blk,ram=1M"];
        if allow {
            args.push("--allow-unsealed-memory");
        }
        let mut d = Vcdev::start("vu-seal", &args, "vfio0");
        let h = Harness::connect(&d.socket("vfio0"));
        let f = common::frontend::unsealed_memfd(0x10000);
        let p = single_region_payload(0x10000, 0x10000, 0x7f00_0000_0000);
        let ack = h.raw_ack(FrontendReq::ADD_MEM_REG, &p, &[f.as_raw_fd()]);
        assert_eq!(ack == 0, want_ok, "allow={allow} ack={ack}");
        if !allow {
            // The log says why and what to do about it.
            let logged = common::poll_until(TIMEOUT, || {
                d.log()
                    .lines()
                    .any(|l| {
                        l.contains("not a memfd sealed against shrinking")
                            && l.contains("--allow-unsealed-memory")
                    })
                    .then_some(())
            });
            assert!(logged.is_some(), "{}", d.log());
        }
    }
}

fn wire_need_reply() -> u32 {
    vcdev::wire::FLAG_NEED_REPLY
}

use std::os::fd::{AsRawFd, FromRawFd};

/// A kick that comes after SET_VRING_KICK but before SET_VRING_ENABLE is
/// remembered: the request is served once the queue is enabled.
#[test]
fn kick_before_enable_is_served_once_enabled() {
    let d = Vcdev::start("vu-early-kick", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::connect(&d.socket("vfio0"));
    h.mem.regions.push(Region::new(META_GPA, META_SIZE));
    h.mem.regions.push(Region::new(DATA_GPA, DATA_SIZE));
    let infos: Vec<_> = h.mem.regions.iter().map(Region::info).collect();
    h.fe.set_mem_table(&infos).expect("SET_MEM_TABLE");
    h.queues.push(DriverQueue::new_for_tests(0, 64));
    let cfg = h.queues[0].config(&h.mem);
    let q = &h.queues[0];
    h.fe.set_vring_num(0, q.size()).expect("SET_VRING_NUM");
    h.fe.set_vring_addr(0, &cfg).expect("SET_VRING_ADDR");
    h.fe.set_vring_base(0, 0).expect("SET_VRING_BASE");
    h.fe.set_vring_call(0, &q.call).expect("SET_VRING_CALL");
    h.fe.set_vring_kick(0, &q.kick).expect("SET_VRING_KICK");
    assert_not_served(&mut h, "SET_VRING_KICK without SET_VRING_ENABLE");
    h.fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
    let (id, _) = h.queues[0]
        .wait_used(&h.mem, TIMEOUT)
        .expect("the early kick is served once enabled");
    assert_eq!(id, 0);
    assert_eq!(h.flush(0), S_OK);
}

/// QEMU sends SET_VRING_ADDR with a non-zero log address even when it does
/// not log (no VHOST_VRING_F_LOG): accepted, the queue works.
#[test]
fn vring_addr_with_log_address_but_no_log_flag_is_accepted() {
    let d = Vcdev::start("vu-logaddr", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    h.stop_queue(0);
    let mut cfg = h.queues[0].config(&h.mem);
    cfg.log_addr = Some(0x7f12_3456_0000);
    h.fe.set_vring_addr(0, &cfg)
        .expect("SET_VRING_ADDR with a log address");
    let q = &h.queues[0];
    h.fe.set_vring_kick(0, &q.kick).expect("SET_VRING_KICK");
    h.fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
    assert_eq!(h.flush(0), S_OK);
}

/// The call eventfd changes between two starts: completions after the
/// restart are signalled on the new one only.
#[test]
fn call_fd_changes_between_starts() {
    let d = Vcdev::start("vu-callfd", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    assert_eq!(h.flush(0), S_OK);
    let base = h.stop_queue(0);
    assert_eq!(base, 1);
    let old = h.queues[0].call.try_clone().expect("dup");
    let _ = old.read();
    h.queues[0].call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    h.start_queue(0);
    assert_eq!(h.write(0, 0, &pattern(2, 512)), S_OK);
    assert_eq!(h.flush(0), S_OK);
    assert!(old.read().is_err(), "the old call fd was signalled");
}

/// RESET_OWNER (deprecated) only disables the rings, as the vhost-user
/// spec recommends: memory table, features and ring setup survive, and
/// SET_VRING_ENABLE 1 resumes the queue where it stopped.
#[test]
fn reset_owner_only_disables_the_rings() {
    let d = Vcdev::start("vu-reset-owner", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    let data = pattern(11, 1024);
    assert_eq!(h.write(0, 0, &data), S_OK);
    assert_eq!(h.raw_ack(FrontendReq::RESET_OWNER, &[], &[]), 0);
    assert_not_served(&mut h, "RESET_OWNER");
    h.fe.set_vring_enable(0, true)
        .expect("SET_VRING_ENABLE after RESET_OWNER");
    let (id, _) = h.queues[0]
        .wait_used(&h.mem, TIMEOUT)
        .expect("the pending request is served once re-enabled");
    assert_eq!(id, 0);
    let r = h.read(0, 0, 1024);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data);
}

/// QEMU gives one memfd for several regions at different mmap offsets:
/// each region is the file's bytes from its own offset.
#[test]
fn regions_at_mmap_offsets_of_one_memfd() {
    let d = Vcdev::start("vu-mmapoff", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::connect(&d.socket("vfio0"));
    let fd = vcdev_iommu::mem::sealed_memfd("guest", META_SIZE + DATA_SIZE).expect("memfd");
    let file = std::fs::File::from(fd);
    h.mem
        .regions
        .push(Region::in_file(DATA_GPA, DATA_SIZE, &file, META_SIZE));
    h.mem
        .regions
        .push(Region::in_file(META_GPA, META_SIZE, &file, 0));
    let infos: Vec<_> = h.mem.regions.iter().map(Region::info).collect();
    h.fe.set_mem_table(&infos).expect("SET_MEM_TABLE");
    h.queues.push(DriverQueue::new_for_tests(0, 64));
    h.start_queue(0);
    let data = pattern(12, 8192);
    assert_eq!(h.write(0, 16, &data), S_OK);
    let r = h.read(0, 16, 8192);
    assert_eq!(r.status, S_OK);
    assert!(r.data == data);
}

/// A call fd that cannot take a signal (here a full pipe; an eventfd at its
/// maximum count does the same) must not hang the queue's worker, and with
/// it GET_VRING_BASE and the device: the signal is dropped instead.
#[test]
fn a_call_fd_that_would_block_never_hangs_the_queue() {
    let d = Vcdev::start("vu-fullcall", &["--device", "blk,ram=1M"], "vfio0");
    let mut h = Harness::start(&d.socket("vfio0"), 1, 64);
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors nobody else owns.
    let (rd, wr) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // Fill the pipe (non-blocking for us only while we fill it).
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    while std::io::Write::write(&mut &wr, &[0u8; 4096]).is_ok() {}
    // SAFETY: as above; back to blocking, as the frontend hands it over.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, 0) };
    let payload = 0u64.to_le_bytes();
    assert_eq!(
        h.raw_ack(FrontendReq::SET_VRING_CALL, &payload, &[wr.as_raw_fd()]),
        0
    );
    let hdr = h.queues[0].header_gpa();
    h.queues[0].submit(&h.mem, &[(hdr, 16, false), (hdr + 16, 1, true)]);
    let done = common::poll_until(TIMEOUT, || {
        (h.queues[0].device_used_idx(&h.mem) == 1).then_some(())
    });
    assert!(done.is_some(), "request not completed");
    h.set_reply_timeout(Some(TIMEOUT));
    assert_eq!(raw_vring_base(&h), 1, "GET_VRING_BASE");
    drop(rd);
}

/// The inflight description of `n` queues of `size` entries, as QEMU asks.
fn inflight_req(n: u16, size: u16) -> VhostUserInflight {
    VhostUserInflight::new(0, 0, n, size)
}

/// The bytes of an inflight memfd.
fn file_bytes(f: &std::fs::File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let len = usize::try_from(f.metadata().expect("fstat").len()).expect("len");
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, 0).expect("read the inflight memfd");
    b
}

/// Marks head `head` of queue `q` in flight with `counter`, as a worker
/// does (the vhost-user spec's DescStateSplit: inflight at 0, counter at 8).
fn mark_inflight(f: &std::fs::File, queue_size: u16, q: u16, head: u16, counter: u64) {
    use std::os::unix::fs::FileExt;
    let at = u64::from(q) * queue_region_size(queue_size) + 16 + 16 * u64::from(head);
    f.write_all_at(&[1], at).expect("inflight flag");
    f.write_all_at(&counter.to_le_bytes(), at + 8)
        .expect("counter");
}

/// GET_INFLIGHT_FD (offered in GET_PROTOCOL_FEATURES) answers a shrink-sealed
/// memfd of exactly the size its reply gives, zeroed but for each queue's
/// header (version 1, desc_num); SET_INFLIGHT_FD takes it back, and I/O
/// goes on.
#[test]
fn get_inflight_fd_gives_a_sealed_memfd_and_set_takes_it_back() {
    const N: u16 = 2;
    const QS: u16 = 64;
    let d = Vcdev::start(
        "vu-inflight",
        &["--device", "blk,ram=1M,queues=2,queue-size=64"],
        "vfio0",
    );
    let mut h = Harness::connect(&d.socket("vfio0"));
    assert!(h
        .protocol
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    let (reply, file) =
        h.fe.get_inflight_fd(&inflight_req(N, QS))
            .expect("GET_INFLIGHT_FD");
    let size = { reply.mmap_size };
    assert_eq!(size, 2 * queue_region_size(QS));
    assert_eq!(
        (({ reply.mmap_offset }), { reply.num_queues }, {
            reply.queue_size
        }),
        (0, N, QS)
    );
    assert_eq!(file.metadata().expect("fstat").len(), size);
    // SAFETY: fcntl on a descriptor we own, no argument.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    assert!(
        seals >= 0 && seals & libc::F_SEAL_SHRINK != 0,
        "seals {seals:#x}"
    );
    let bytes = file_bytes(&file);
    for q in 0..N {
        let base = usize::try_from(u64::from(q) * queue_region_size(QS)).expect("offset");
        assert_eq!(bytes[base + 8..base + 10], 1u16.to_le_bytes(), "version");
        assert_eq!(bytes[base + 10..base + 12], QS.to_le_bytes(), "desc_num");
        let rest = &bytes[base + 16..base + usize::try_from(queue_region_size(QS)).expect("len")];
        assert!(rest.iter().all(|&b| b == 0), "queue {q} not zeroed");
    }
    h.fe.set_inflight_fd(&reply, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    // The table acks it like any request (REPLY_ACK 0).
    assert_eq!(
        h.raw_ack(
            FrontendReq::SET_INFLIGHT_FD,
            reply.as_slice(),
            &[file.as_raw_fd()]
        ),
        0
    );
    h.mem.regions.push(Region::new(META_GPA, META_SIZE));
    h.mem.regions.push(Region::new(DATA_GPA, DATA_SIZE));
    let infos: Vec<_> = h.mem.regions.iter().map(Region::info).collect();
    h.fe.set_mem_table(&infos).expect("SET_MEM_TABLE");
    h.queues.push(DriverQueue::new_for_tests(0, QS));
    h.start_queue(0);
    let data = pattern(21, 4096);
    assert_eq!(h.write(0, 8, &data), S_OK);
    assert!(h.read(0, 8, 4096).data == data);
}

/// The fd survives a crash of the daemon: after `kill -9` and a new daemon
/// on the same DIR, a new connection hands back the first daemon's memfd
/// with SET_INFLIGHT_FD; it is accepted with its content untouched (what
/// was in flight is the restarted queue's to resubmit).
#[test]
fn set_inflight_fd_after_a_restart_keeps_the_old_content() {
    const QS: u16 = 64;
    let mut d = Vcdev::start(
        "vu-inflight-restart",
        &["--device", "blk,ram=1M,queues=2,queue-size=64"],
        "vfio0",
    );
    let mut h = Harness::connect(&d.socket("vfio0"));
    let (reply, file) =
        h.fe.get_inflight_fd(&inflight_req(2, QS))
            .expect("GET_INFLIGHT_FD");
    // What a worker would have left in flight when it died.
    mark_inflight(&file, QS, 0, 5, 9);
    mark_inflight(&file, QS, 1, 63, 2);
    let before = file_bytes(&file);
    d.kill_and_restart();
    drop(h);
    let mut h = Harness::connect(&d.socket("vfio0"));
    h.fe.set_inflight_fd(&reply, file.as_raw_fd())
        .expect("SET_INFLIGHT_FD of the old memfd");
    assert!(
        file_bytes(&file) == before,
        "the restarted daemon changed the region"
    );
    let logged = common::poll_until(TIMEOUT, || {
        d.log()
            .contains("inflight region set (2 queues x 64 entries)")
            .then_some(())
    });
    assert!(logged.is_some(), "{}", d.log());
    // A fresh GET_INFLIGHT_FD is a new, zeroed region; the old one is
    // left alone.
    let (_, fresh) =
        h.fe.get_inflight_fd(&inflight_req(2, QS))
            .expect("GET_INFLIGHT_FD");
    let fresh = file_bytes(&fresh);
    assert_eq!(fresh.len(), before.len());
    assert!(fresh[16..].iter().take(16 * 64).all(|&b| b == 0));
    assert!(file_bytes(&file) == before);
}

/// SET_INFLIGHT_FD refusals are acked with the errno, the connection goes
/// on (sizes that do not fit the device or the file, an unsealed file);
/// one without its fd ends the connection, as every request missing a
/// descriptor does. GET_INFLIGHT_FD has its own reply: a refusal ends the
/// connection.
#[test]
fn inflight_fd_refusals() {
    const QS: u16 = 64;
    let args = ["--device", "blk,ram=1M,queues=2,queue-size=64"];
    let mut d = Vcdev::start("vu-inflight-refuse", &args, "vfio0");
    let h = Harness::connect(&d.socket("vfio0"));
    let size = 2 * queue_region_size(QS);
    let good = VhostUserInflight::new(size, 0, 2, QS);
    let sealed =
        |len| std::fs::File::from(vcdev_iommu::mem::sealed_memfd("t", len).expect("memfd"));
    let set = |h: &Harness, desc: &VhostUserInflight, f: &std::fs::File| {
        h.raw_ack(
            FrontendReq::SET_INFLIGHT_FD,
            desc.as_slice(),
            &[f.as_raw_fd()],
        )
    };
    let einval = u64::try_from(libc::EINVAL).expect("errno");
    let efault = u64::try_from(libc::EFAULT).expect("errno");
    // mmap_size not what 2 x 64 entries take.
    let bad_size = VhostUserInflight::new(size + 4096, 0, 2, QS);
    assert_eq!(set(&h, &bad_size, &sealed(size + 4096)), einval);
    // More queues or longer queues than the device has.
    let too_many = VhostUserInflight::new(3 * queue_region_size(QS), 0, 3, QS);
    assert_eq!(
        set(&h, &too_many, &sealed(3 * queue_region_size(QS))),
        einval
    );
    let too_long = VhostUserInflight::new(2 * queue_region_size(128), 0, 2, 128);
    assert_eq!(
        set(&h, &too_long, &sealed(2 * queue_region_size(128))),
        einval
    );
    // A file shorter than the region.
    assert_eq!(set(&h, &good, &sealed(size - 64)), efault);
    // Not a sealed memfd.
    assert_eq!(
        set(&h, &good, &common::frontend::unsealed_memfd(size)),
        einval
    );
    // The right one is accepted.
    assert_eq!(set(&h, &good, &sealed(size)), 0);
    // Without its fd: the connection ends.
    assert!(h
        .raw_flags(
            FrontendReq::SET_INFLIGHT_FD,
            wire_need_reply(),
            good.as_slice(),
            &[]
        )
        .is_none());

    // Not negotiated: SET refused (EOPNOTSUPP), the connection goes on.
    released(&mut d, 1);
    let h = Harness::connect(&d.socket("vfio0"));
    let without = h.protocol - VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    assert_eq!(
        h.raw_ack(
            FrontendReq::SET_PROTOCOL_FEATURES,
            &without.bits().to_le_bytes(),
            &[]
        ),
        0
    );
    let eopnotsupp = u64::try_from(libc::EOPNOTSUPP).expect("errno");
    assert_eq!(set(&h, &good, &sealed(size)), eopnotsupp);
    assert_eq!(
        u64_of(&h.raw(FrontendReq::GET_QUEUE_NUM, &[], &[]).payload),
        2
    );
    drop(h);

    // GET of no queues, or of more than the device has: the connection ends.
    for (i, (n, qs)) in [(0, QS), (3, QS), (2, 0), (2, 128)].into_iter().enumerate() {
        released(&mut d, i + 2);
        let h = Harness::connect(&d.socket("vfio0"));
        let r = h.raw_flags(
            FrontendReq::GET_INFLIGHT_FD,
            wire_need_reply(),
            inflight_req(n, qs).as_slice(),
            &[],
        );
        assert!(r.is_none(), "GET_INFLIGHT_FD of {n} x {qs} answered");
    }
}

/// Waits until the daemon logged `n` releases of its device (that many
/// frontends were torn down: the next one is not refused as concurrent).
fn released(d: &mut Vcdev, n: usize) {
    let done = common::poll_until(TIMEOUT, || {
        (d.log().matches("device released").count() >= n).then_some(())
    });
    assert!(done.is_some(), "{}", d.log());
}

/// The restart the issue is about, at the protocol level: a daemon died
/// with request A (head 0) in flight after request B (head 3, taken later)
/// completed. QEMU then starts the queue at the used ring's idx (1), as it
/// does when GET_VRING_BASE fails. The restarted daemon must resubmit A
/// from the inflight region and continue the avail ring after it: A is
/// written and completed, B is not executed again (its buffer was changed
/// after it completed; a second run would write that to the disk).
#[test]
fn restarted_daemon_resubmits_what_was_in_flight() {
    use std::os::unix::fs::FileExt;
    use vcdev_device_model::testing::{BlkRequest, R};
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
    const QS: u16 = 64;
    let tmp = common::TempDir::new("vu-inflight-resubmit").expect("tmpdir");
    let image = tmp.join("disk.img");
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&image)
        .expect("image");
    disk.set_len(1 << 20).expect("image size");
    let spec = format!("blk,path={},queue-size=64", image.display());
    let mut d = Vcdev::start("vu-inflight-resubmit", &["--device", &spec], "vfio0");
    let mut h = Harness::connect(&d.socket("vfio0"));
    let (reply, region) =
        h.fe.get_inflight_fd(&inflight_req(1, QS))
            .expect("GET_INFLIGHT_FD");
    drop(h);
    d.kill_and_restart();

    // What the first daemon left: A in flight (counter 0), B completed
    // (counter 1, the last batch, used idx 1), B's data on the disk.
    let mut h = Harness::connect(&d.socket("vfio0"));
    h.mem.regions.push(Region::new(META_GPA, META_SIZE));
    h.mem.regions.push(Region::new(DATA_GPA, DATA_SIZE));
    h.queues.push(DriverQueue::new_for_tests(0, QS));
    let (a_data, b_data) = (pattern(31, 4096), pattern(32, 4096));
    let (a_sector, b_sector) = (0u64, 16u64);
    let hdr = h.queues[0].header_gpa();
    let request = |h: &Harness, at: u64, sector: u64, data: u64| {
        BlkRequest::new(VIRTIO_BLK_T_OUT, sector).write(&h.mem, at, at + 16);
        BlkRequest::chain(at, &[(data, 4096, R)], at + 16)
    };
    let a = request(&h, hdr, a_sector, DATA_GPA);
    let b = request(&h, hdr + 0x100, b_sector, DATA_GPA + 0x10000);
    h.mem.write(DATA_GPA, &a_data);
    disk.write_all_at(&b_data, b_sector * 512)
        .expect("B on disk");
    h.mem.write(DATA_GPA + 0x10000, &pattern(33, 4096));
    let q = &mut h.queues[0];
    q.ring.write_chain(&h.mem, 0, &a);
    q.ring.write_chain(&h.mem, 3, &b);
    q.offer(&h.mem, 0);
    q.offer(&h.mem, 3);
    let used = q.ring.used;
    h.mem
        .write(used + 4, &[3u32.to_le_bytes(), 1u32.to_le_bytes()].concat());
    h.mem.write(used + 2, &1u16.to_le_bytes());
    assert_eq!(q.ring.pop_used(&h.mem).map(|u| u.id), Some(3));
    mark_inflight(&region, QS, 0, 0, 0);
    region
        .write_all_at(&1u64.to_le_bytes(), 16 + 16 * 3 + 8)
        .expect("B's counter");
    region
        .write_all_at(&3u16.to_le_bytes(), 12)
        .expect("last_batch_head");
    region
        .write_all_at(&1u16.to_le_bytes(), 14)
        .expect("used_idx");

    h.fe.set_inflight_fd(&reply, region.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    let infos: Vec<_> = h.mem.regions.iter().map(Region::info).collect();
    h.fe.set_mem_table(&infos).expect("SET_MEM_TABLE");
    let q = &h.queues[0];
    let cfg = q.config(&h.mem);
    h.fe.set_vring_num(0, QS).expect("SET_VRING_NUM");
    h.fe.set_vring_addr(0, &cfg).expect("SET_VRING_ADDR");
    h.fe.set_vring_base(0, 1)
        .expect("SET_VRING_BASE at the used idx");
    h.fe.set_vring_call(0, &q.call).expect("SET_VRING_CALL");
    h.fe.set_vring_kick(0, &q.kick).expect("SET_VRING_KICK");
    h.fe.set_vring_enable(0, true).expect("SET_VRING_ENABLE");

    let (id, _) = h.queues[0]
        .wait_used(&h.mem, TIMEOUT)
        .expect("a request completes after the restart");
    assert_eq!(id, 0, "the first completion after the restart is not A's");
    assert_eq!(
        h.mem.read(hdr + u64::from(BlkRequest::HEADER_LEN), 1)[0],
        S_OK
    );
    assert!(
        h.queues[0]
            .wait_used(&h.mem, std::time::Duration::from_millis(300))
            .is_none(),
        "B was executed again"
    );
    let mut on_disk = vec![0u8; 4096];
    disk.read_exact_at(&mut on_disk, a_sector * 512)
        .expect("read A");
    assert!(on_disk == a_data, "A's write is lost");
    disk.read_exact_at(&mut on_disk, b_sector * 512)
        .expect("read B");
    assert!(
        on_disk == b_data,
        "B was written again with its changed buffer"
    );
    // The queue goes on from there.
    assert_eq!(h.write(0, 32, &pattern(34, 512)), S_OK);
}
