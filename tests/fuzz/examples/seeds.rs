//! Writes the seed corpora of the fuzz targets, `corpus/TARGET/NAME`,
//! from the flows the existing tests build (the vhost-user setup of the
//! proptests and a queue brought up as the harness does it, the cdev
//! requests of each file's table with the proptests' templates, the
//! device-model's request round trips and malformed chains, the IOAS
//! model's command mix). Run from the repository root:
//! `cargo run --manifest-path tests/fuzz/Cargo.toml --example seeds`.

use std::cell::RefCell;
use std::path::Path;

use vcdev::testing::cdev::{FdKind, Raw};
use vcdev::testing::vhost_user::{le, setup, u32s, Fd, UADDR};
use vcdev_device_model::testing::{BlkRequest, DriverMem, SplitRing, R, W};
use vcdev_fuzz::*;
use vcdev_iommu::model::Op as MOp;
use vcdev_iommu::uapi::*;
use vhost::vhost_user::message::FrontendReq;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    std::fs::write(d.join(name), bytes).expect("seed");
}

// ---- vhost_user_stream -----------------------------------------------------

/// Guest memory laid out by the driver helpers, then sent as writes.
struct Image(RefCell<Vec<u8>>);

impl DriverMem for Image {
    fn write_at(&self, addr: u64, data: &[u8]) {
        let a = usize::try_from(addr).expect("addr");
        self.0.borrow_mut()[a..a + data.len()].copy_from_slice(data);
    }
    fn read_at(&self, addr: u64, len: usize) -> Vec<u8> {
        let a = usize::try_from(addr).expect("addr");
        self.0.borrow()[a..a + len].to_vec()
    }
}

impl Image {
    /// The non-zero 1 KiB pieces, as memory writes into memfd 0.
    fn steps(&self) -> Vec<VuStep> {
        let m = self.0.borrow();
        m.chunks(1024)
            .enumerate()
            .filter(|(_, c)| c.iter().any(|&b| b != 0))
            .map(|(i, c)| VuStep::MemWrite {
                memfd: 0,
                offset: u16::try_from(i * 1024).expect("offset"),
                data: c.to_vec(),
            })
            .collect()
    }
}

fn msg(req: FrontendReq, flags: u32, payload: Vec<u8>, fds: &[Fd]) -> VuStep {
    VuStep::Msg {
        code: u32::from(req),
        flags,
        payload,
        fds: fds.to_vec(),
    }
}

/// A queue of `qs` entries at 0 / 0x1000 / 0x2000 of the region with a
/// write then a read request on it (addresses are `base` + offset: guest
/// physical or IOVA), brought up as the frontend harness does.
fn queue_up(base: u64, vring_base: u64, qs: u16) -> Vec<VuStep> {
    let img = Image(RefCell::new(vec![0u8; 0x10000]));
    let mut ring = SplitRing::new(qs, 0, 0x1000, 0x2000);
    let mut next = 0u16;
    for (i, (kind, flags)) in [(VIRTIO_BLK_T_OUT, R), (VIRTIO_BLK_T_IN, W)]
        .into_iter()
        .enumerate()
    {
        let at = 0x3000 + 0x1000 * i as u64;
        let req = BlkRequest::new(kind, 2);
        req.write(&img, at, at + 0x300);
        img.write_at(at + 0x100, &[0x5a; 512]);
        let chain = BlkRequest::chain(
            base + at,
            &[(base + at + 0x100, 512, flags)],
            base + at + 0x300,
        );
        let head = next;
        next = ring.write_chain(&img, head, &chain);
        ring.offer(&img, head);
    }
    let mut steps = img.steps();
    let ack = 1 | vcdev::wire::FLAG_NEED_REPLY;
    let mut addr = u32s(&[0, 0]);
    addr.extend(le(&[
        vring_base,
        vring_base + 0x2000,
        vring_base + 0x1000,
        0,
    ]));
    steps.extend([
        msg(
            FrontendReq::SET_VRING_NUM,
            ack,
            u32s(&[0, u32::from(qs)]),
            &[],
        ),
        msg(FrontendReq::SET_VRING_ADDR, ack, addr, &[]),
        msg(FrontendReq::SET_VRING_BASE, ack, u32s(&[0, 0]), &[]),
        msg(FrontendReq::SET_VRING_CALL, ack, le(&[0]), &[Fd::Eventfd]),
        msg(FrontendReq::SET_VRING_KICK, ack, le(&[0]), &[Fd::Eventfd]),
        msg(FrontendReq::SET_VRING_ENABLE, ack, u32s(&[0, 1]), &[]),
        VuStep::Kick(1),
        msg(FrontendReq::GET_VRING_BASE, 1, u32s(&[0, 0]), &[]),
    ]);
    steps
}

fn iotlb(iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8) -> VuStep {
    let mut p = le(&[iova, size, uaddr]);
    p.extend([perm, kind, 0, 0, 0, 0, 0, 0]);
    msg(
        FrontendReq::IOTLB_MSG,
        1 | vcdev::wire::FLAG_NEED_REPLY,
        p,
        &[],
    )
}

fn vu_seed(dir: &Path, name: &str, prefix: u8, steps: &[VuStep]) {
    let mut out = Output::default();
    out.u8(prefix);
    for s in steps {
        vu_encode(&mut out, s);
    }
    write(dir, "vhost_user_stream", name, &out.0);
}

fn vhost_user_seeds(dir: &Path) {
    let qs = vcdev_device_model::testing::blk().queue_size();
    vu_seed(dir, "setup", 1, &[]);
    // The setup itself as messages (the prefix off), then the gets.
    let mut steps: Vec<VuStep> = setup(true)
        .into_iter()
        .map(|m| VuStep::Msg {
            code: m.code,
            flags: m.flags,
            payload: m.payload,
            fds: m.fds,
        })
        .collect();
    for r in [
        FrontendReq::GET_FEATURES,
        FrontendReq::GET_PROTOCOL_FEATURES,
        FrontendReq::GET_QUEUE_NUM,
        FrontendReq::GET_MAX_MEM_SLOTS,
        FrontendReq::GET_STATUS,
    ] {
        steps.push(msg(r, 1, Vec::new(), &[]));
    }
    let mut cfg = u32s(&[0, 60, 0]);
    cfg.resize(12 + 60, 0);
    steps.push(msg(FrontendReq::GET_CONFIG, 1, cfg, &[]));
    vu_seed(dir, "setup_and_gets", 0, &steps);
    // A queue without a vIOMMU: ring addresses are user addresses.
    vu_seed(dir, "queue_plain", 2, &queue_up(0, UADDR, qs));
    // With one: an IOTLB UPDATE of the region, ring addresses are IOVAs.
    let mut steps = vec![iotlb(0, 0x10000, UADDR, 3, 2)];
    steps.extend(queue_up(0, 0, qs));
    steps.push(iotlb(0x3000, 0x1000, 0, 0, 3));
    vu_seed(dir, "queue_iotlb", 1, &steps);
    // Memory slots, status, inflight, backend channel, reset.
    let ack = 1 | vcdev::wire::FLAG_NEED_REPLY;
    let mut region = le(&[0]);
    region.extend(le(&[0x10_0000, 0x10000, UADDR + 0x10_0000, 0]));
    let inflight = {
        let mut p = le(&[0, 0]);
        p.extend(vec![1, 0, u8::try_from(qs & 0xff).unwrap_or(0), 0]);
        p
    };
    vu_seed(
        dir,
        "slots_status_inflight",
        1,
        &[
            msg(FrontendReq::ADD_MEM_REG, ack, region.clone(), &[Fd::Memfd]),
            msg(FrontendReq::REM_MEM_REG, ack, region, &[]),
            msg(FrontendReq::SET_STATUS, ack, le(&[0xf]), &[]),
            msg(FrontendReq::GET_INFLIGHT_FD, 1, inflight, &[]),
            msg(
                FrontendReq::SET_BACKEND_REQ_FD,
                ack,
                Vec::new(),
                &[Fd::Socket],
            ),
            msg(FrontendReq::RESET_DEVICE, ack, Vec::new(), &[]),
            msg(FrontendReq::SET_OWNER, ack, Vec::new(), &[]),
            msg(FrontendReq::RESET_OWNER, ack, Vec::new(), &[]),
        ],
    );
    // A miss with a backend channel nobody answers.
    let mut steps = vec![msg(
        FrontendReq::SET_BACKEND_REQ_FD,
        1,
        Vec::new(),
        &[Fd::Socket],
    )];
    steps.extend(queue_up(0x40_0000, 0x40_0000, qs));
    vu_seed(dir, "queue_iotlb_miss", 1, &steps);
}

// ---- cdev_frames -----------------------------------------------------------

fn req(on_device: bool, code: Result<usize, u32>) -> CdevReq {
    CdevReq {
        on_device,
        raw: Raw {
            code,
            size_word: None,
            pokes: Vec::new(),
            tail: Vec::new(),
            random: None,
            fds: Vec::new(),
        },
    }
}

fn cdev_seed(dir: &Path, name: &str, scenario: u8, reqs: &[CdevReq]) {
    let mut out = Output::default();
    out.u8(scenario);
    for r in reqs {
        cdev_encode(&mut out, r);
    }
    write(dir, "cdev_frames", name, &out.0);
}

fn cdev_seeds(dir: &Path) {
    // Every op of each table with its struct's template, on both files.
    for (name, scenario) in [
        ("bound", 0u8),
        ("bound_attached", 8),
        ("bound_vfio1_attached", 12),
        ("unbound", 1),
        ("container_group", 2),
        ("container_group_set", 10),
    ] {
        let reqs: Vec<CdevReq> = (0..24)
            .flat_map(|i| [req(true, Ok(i)), req(false, Ok(i))])
            .collect();
        cdev_seed(dir, &format!("{name}_each_op"), scenario, &reqs);
    }
    // MAP_FILE of a memfd into the attached IOAS (id 2: the device is 1),
    // a copy of it, an unmap; then device requests.
    let mut map = req(false, Err(IOMMUFD_CMD_IOAS_MAP_FILE));
    let flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE;
    map.raw.pokes = vec![
        (0, u64::from(flags) | 2 << 32),
        (3, 0),
        (5, 0x10000),
        (7, 0x10_0000),
    ];
    map.raw.fds = vec![FdKind::Memfd];
    let mut unmap = req(false, Err(IOMMUFD_CMD_IOAS_UNMAP));
    unmap.raw.pokes = vec![(0, 2), (1, 0x10_0000), (3, 0x10000)];
    let mut ranges = req(false, Err(IOMMUFD_CMD_IOAS_IOVA_RANGES));
    ranges.raw.pokes = vec![(0, 2 | 4 << 32)];
    ranges.raw.tail = vec![0; 64];
    let mut reqs = vec![map, ranges, unmap];
    reqs.extend((0..16).map(|i| req(true, Ok(i))));
    cdev_seed(dir, "map_file_attached", 8, &reqs);
    // Requests with descriptors, and mistakes: short size words, junk tails.
    let mut odd = Vec::new();
    for i in 0..12 {
        let mut r = req(i % 2 == 0, Ok(i));
        r.raw.size_word = Some(u32::try_from(i).unwrap_or(0) * 4);
        r.raw.tail = vec![0xa5; 8];
        r.raw.fds = vec![[FdKind::Memfd, FdKind::Eventfd, FdKind::Ictx][i % 3]];
        odd.push(r);
    }
    cdev_seed(dir, "odd_sizes_and_fds", 8, &odd);
    cdev_seed(dir, "odd_unbound", 1, &odd);
    cdev_seed(dir, "odd_group", 10, &odd);
}

// ---- blk_chains ------------------------------------------------------------

fn blk_seed(dir: &Path, name: &str, mode: u8, steps: &[BlkStep]) {
    let mut out = Output::default();
    out.u8(mode);
    for s in steps {
        blk_encode(&mut out, s);
    }
    write(dir, "blk_chains", name, &out.0);
}

fn request(kind: u32, sector: u64, bufs: &[(u16, bool)]) -> BlkStep {
    BlkStep::Request {
        kind,
        sector,
        bufs: bufs.to_vec(),
        status_len: 1,
    }
}

fn blk_seeds(dir: &Path) {
    let round_trip = vec![
        request(VIRTIO_BLK_T_OUT, 1, &[(512, false)]),
        request(VIRTIO_BLK_T_IN, 1, &[(256, true), (256, true)]),
        request(VIRTIO_BLK_T_FLUSH, 0, &[]),
        request(VIRTIO_BLK_T_GET_ID, 0, &[(20, true)]),
        BlkStep::Process,
    ];
    for (name, mode) in [
        ("round_trip", 0u8),
        ("round_trip_iotlb", 1),
        ("round_trip_retry_event_idx", 6),
        ("round_trip_iotlb_retry", 3),
    ] {
        blk_seed(dir, name, mode, &round_trip);
    }
    // Through an IOTLB with a hole punched in the data, then refilled.
    let mut holes = vec![BlkStep::Unmap {
        iova_page: 0x10,
        npages: 4,
    }];
    holes.extend(round_trip.clone());
    holes.push(BlkStep::Map {
        iova_page: 0x10,
        npages: 4,
        host_page: 0x10,
        perm: 1,
    });
    holes.push(BlkStep::Process);
    blk_seed(dir, "iotlb_holes_retry", 3, &holes);
    blk_seed(dir, "iotlb_holes_fail", 1, &holes);
    // An empty IOTLB, the rings and data mapped page by page.
    let mut sparse = vec![BlkStep::Map {
        iova_page: 0,
        npages: 3,
        host_page: 0,
        perm: 3,
    }];
    sparse.push(BlkStep::Map {
        iova_page: 0x10,
        npages: 0x20,
        host_page: 0x10,
        perm: 3,
    });
    sparse.extend(round_trip.clone());
    blk_seed(dir, "iotlb_sparse", 9, &sparse);
    // DISCARD and WRITE_ZEROES: the segments written by hand.
    let segs = vcdev_device_model::testing::blk_segments(&[(0, 8, 0), (16, 8, 1)]);
    let mut dz = Vec::new();
    // The target's allocator: header, status, then the buffer, each
    // rounded up to 64 bytes from 0x10000.
    for (kind, buf) in [
        (VIRTIO_BLK_T_DISCARD, 0x1_0080),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0x1_0140),
    ] {
        dz.push(BlkStep::Request {
            kind,
            sector: 0,
            bufs: vec![(u16::try_from(segs.len()).unwrap_or(0), false)],
            status_len: 1,
        });
        dz.push(BlkStep::Write {
            addr: buf,
            data: segs.clone(),
        });
        dz.push(BlkStep::Process);
    }
    blk_seed(dir, "discard_write_zeroes", 0, &dz);
    // An indirect table of header, data, status, offered as one descriptor.
    let mut table = Vec::new();
    let hdr = 0x8_0000u64;
    for (addr, len, flags, next) in [
        (hdr, 16u32, 1u16, 1u16),
        (hdr + 0x100, 512, 1 | 2, 2),
        (hdr + 0x400, 1, 2, 0),
    ] {
        table.extend(addr.to_le_bytes());
        table.extend(len.to_le_bytes());
        table.extend(flags.to_le_bytes());
        table.extend(next.to_le_bytes());
    }
    let header = BlkRequest::new(VIRTIO_BLK_T_IN, 3).header();
    let indirect = vec![
        BlkStep::Write {
            addr: 0x9_0000,
            data: table,
        },
        BlkStep::Write {
            addr: u32::try_from(hdr).unwrap_or(0),
            data: header.to_vec(),
        },
        BlkStep::Desc {
            idx: 5,
            addr: 0x9_0000,
            len: 48,
            flags: VRING_DESC_F_INDIRECT as u16,
            next: 0,
        },
        BlkStep::Offer(5),
        BlkStep::Process,
    ];
    blk_seed(dir, "indirect", 0, &indirect);
    blk_seed(dir, "indirect_iotlb", 1, &indirect);
    // Malformed: a loop, a descriptor past memory, an out-of-range head.
    let malformed = vec![
        BlkStep::Desc {
            idx: 0,
            addr: 0x1_0000,
            len: 16,
            flags: 1,
            next: 1,
        },
        BlkStep::Desc {
            idx: 1,
            addr: 0x1_0100,
            len: 512,
            flags: 1 | 2,
            next: 0,
        },
        BlkStep::Offer(0),
        BlkStep::Desc {
            idx: 2,
            addr: 0x1_0000,
            len: 16,
            flags: 1,
            next: 3,
        },
        BlkStep::Desc {
            idx: 3,
            addr: 0xffff_f000,
            len: 0xffff_ff00,
            flags: 1 | 2,
            next: 4,
        },
        BlkStep::Desc {
            idx: 4,
            addr: 0x1_0400,
            len: 1,
            flags: 2,
            next: 0,
        },
        BlkStep::Offer(2),
        BlkStep::Offer(40),
        BlkStep::Process,
    ];
    blk_seed(dir, "malformed", 0, &malformed);
    blk_seed(dir, "malformed_iotlb_retry", 3, &malformed);
}

// ---- iommufd_model ---------------------------------------------------------

fn model_seeds(dir: &Path) {
    let mut out = Output::default();
    for op in [
        MOp::MapFixed {
            ioas: 0,
            page: 2,
            npages: 3,
            file_page: 1,
        },
        MOp::MapAuto {
            ioas: 0,
            npages: 2,
            file_page: 4,
        },
        MOp::Copy {
            dst: 1,
            src: 0,
            src_page: 2,
            npages: 3,
            dst_page: None,
        },
        MOp::Write {
            ioas: 1,
            page: 1,
            value: 0xdead_beef,
        },
        MOp::Copy {
            dst: 1,
            src: 0,
            src_page: 3,
            npages: 1,
            dst_page: Some(20),
        },
        MOp::Unmap {
            ioas: 0,
            page: 2,
            npages: 3,
        },
        MOp::MapFixed {
            ioas: 1,
            page: 30,
            npages: 2,
            file_page: 15,
        },
        MOp::UnmapAll { ioas: 1 },
    ] {
        model_encode(&mut out, &op);
    }
    write(dir, "iommufd_model", "map_copy_write_unmap", &out.0);
    // A few pseudo-random mixes (fixed seeds).
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for n in 0..6 {
        let mut bytes = Vec::new();
        for _ in 0..40 * 6 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push((x >> 24) as u8);
        }
        // Normalise through the decoder, so that every field is in range.
        let mut inp = Input::new(&bytes);
        let mut out = Output::default();
        for _ in 0..40 {
            model_encode(&mut out, &model_op(&mut inp));
        }
        write(dir, "iommufd_model", &format!("mix{n}"), &out.0);
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/fuzz/corpus".into());
    let dir = Path::new(&dir);
    vhost_user_seeds(dir);
    cdev_seeds(dir);
    blk_seeds(dir);
    model_seeds(dir);
    println!("seeds written under {}", dir.display());
}
