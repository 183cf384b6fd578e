//! Queue-level tests: requests built by a driver-side mock queue, run by the device.

use std::sync::Arc;

use proptest::prelude::*;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, Permissions};

use super::file::tests::TempImage;
use super::test_util::*;
use super::*;
use crate::virtio::features::has_feature;

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const UNMAP: u32 = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
const DISK: u64 = 1 << 20;
const QSIZE: u16 = 16;

fn cfg() -> BlkConfig {
    BlkConfig {
        queue_size: QSIZE,
        serial: b"vcdev-serial".to_vec(),
        ..BlkConfig::default()
    }
}

fn file_device(img: &TempImage, read_only: bool) -> Arc<BlkDevice> {
    let backend: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&img.path, read_only).unwrap());
    Arc::new(BlkDevice::new(backend, BlkConfig { read_only, ..cfg() }).unwrap())
}

/// The next request on the queue still works.
fn assert_alive<M: InflightMemory>(d: &mut Driver<'_, M>) {
    let data = pattern(512, 0x5a);
    assert_eq!(d.write(7, &data).status, OK);
    assert_eq!(d.read(7, 512).data, data);
}

fn round_trips(dev: Arc<BlkDevice>) {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, dev, QSIZE);
    let data = pattern(8192, 1);
    let w = d.write(3, &data);
    assert_eq!((w.status, w.used_len), (OK, 1));
    let r = d.read(3, 8192);
    assert_eq!((r.status, r.used_len), (OK, 8193));
    assert_eq!(r.data, data);
    // Last sector of the disk.
    let tail = pattern(512, 9);
    assert_eq!(d.write(DISK / 512 - 1, &tail).status, OK);
    assert_eq!(d.read(DISK / 512 - 1, 512).data, tail);
    assert_eq!(d.flush().status, OK);

    let id = d.get_id(20);
    assert_eq!((id.status, id.used_len), (OK, 21));
    assert_eq!(&id.data[..12], b"vcdev-serial");
    assert!(id.data[12..].iter().all(|&b| b == 0));
    let short = d.get_id(8);
    assert_eq!((short.status, short.used_len), (OK, 9));
    assert_eq!(&short.data, b"vcdev-se");

    // Write zeroes, with and without unmap, then discard.
    assert_eq!(d.write_zeroes(&[(4, 2, 0), (8, 1, UNMAP)]).status, OK);
    let r = d.read(3, 8192).data;
    assert_eq!(r[..512], data[..512]);
    assert!(r[512..1536].iter().all(|&b| b == 0));
    assert_eq!(r[1536..2560], data[1536..2560]);
    assert!(r[2560..3072].iter().all(|&b| b == 0));
    assert_eq!(r[3072..], data[3072..]);
    assert_eq!(d.discard(&[(0, 16, 0), (64, 8, 0)]).status, OK);
}

#[test]
fn ram_round_trips() {
    round_trips(ram_blk(DISK, cfg()));
}

#[test]
fn file_round_trips() {
    let img = TempImage::new(DISK);
    round_trips(file_device(&img, false));
    // The data reached the file.
    let dev = file_device(&img, true);
    let mem = plain_mem();
    let mut d = Driver::new(&mem, dev, QSIZE);
    assert_eq!(d.read(DISK / 512 - 1, 512).data, pattern(512, 9));
}

#[test]
fn segment_validation() {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);
    let data = pattern(4096, 3);
    assert_eq!(d.write(0, &data).status, OK);
    // Discard with unmap, reserved flags: UNSUPP; nothing done even for the valid first segment.
    assert_eq!(d.discard(&[(0, 1, 0), (1, 1, UNMAP)]).status, UNSUPP);
    assert_eq!(d.write_zeroes(&[(0, 1, 0), (1, 1, 2)]).status, UNSUPP);
    assert_eq!(d.discard(&[(0, 1, 0), (1, 1, 1 << 31)]).status, UNSUPP);
    // Too many segments.
    let many: Vec<_> = (0..33).map(|i| (i, 1, 0)).collect();
    assert_eq!(d.write_zeroes(&many).status, UNSUPP);
    // Out of range, overflowing, too long.
    assert_eq!(
        d.write_zeroes(&[(0, 1, 0), (DISK / 512, 1, 0)]).status,
        IOERR
    );
    assert_eq!(d.write_zeroes(&[(u64::MAX, 2, 0)]).status, IOERR);
    assert_eq!(d.discard(&[(0, u32::MAX, 0)]).status, IOERR);
    assert_eq!(d.read(0, 4096).data, data);
    // A table that is not a whole number of segments, or empty.
    let mut odd = blk_segments(&[(0, 1, 0)]);
    odd.push(0);
    assert_eq!(
        d.exec(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[Buf::Out(odd)])
            .status,
        IOERR
    );
    assert_eq!(d.exec(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[]).status, IOERR);
    assert_eq!(d.read(0, 4096).data, data);
    // Segments split across descriptors are fine.
    let segs = blk_segments(&[(1, 1, 0), (3, 1, UNMAP)]);
    let done = d.exec(
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[Buf::Out(segs[..5].to_vec()), Buf::Out(segs[5..].to_vec())],
    );
    assert_eq!(done.status, OK);
    let r = d.read(0, 4096).data;
    assert!(r[512..1024].iter().all(|&b| b == 0) && r[1536..2048].iter().all(|&b| b == 0));
    assert_eq!(r[1024..1536], data[1024..1536]);
}

#[test]
fn read_only_refusals() {
    let img = TempImage::new(DISK);
    let dev = file_device(&img, true);
    assert!(has_feature(dev.device_features(), VIRTIO_BLK_F_RO));
    let mem = plain_mem();
    let mut d = Driver::new(&mem, dev, QSIZE);
    assert_eq!(d.write(0, &pattern(512, 1)).status, IOERR);
    assert_eq!(d.discard(&[(0, 1, 0)]).status, IOERR);
    assert_eq!(d.write_zeroes(&[(0, 1, 0)]).status, IOERR);
    let r = d.read(0, 512);
    assert_eq!(r.status, OK);
    assert!(r.data.iter().all(|&b| b == 0));
    assert_eq!(d.flush().status, OK);
    assert_eq!(d.get_id(20).status, OK);
}

#[test]
fn range_and_length_errors() {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);
    let last = DISK / 512 - 1;
    assert_eq!(d.read(last, 1024).status, IOERR);
    assert_eq!(d.write(last + 1, &[0; 512]).status, IOERR);
    assert_eq!(d.read(u64::MAX, 512).status, IOERR);
    assert_eq!(d.read(u64::MAX / 512 + 1, 0).status, IOERR);
    let r = d.read(0, 100);
    assert_eq!((r.status, r.used_len), (IOERR, 1));
    assert_eq!(d.write(0, &[1; 100]).status, IOERR);
    // Data in the wrong direction.
    assert_eq!(
        d.exec(VIRTIO_BLK_T_IN, 0, &[Buf::Out(vec![0; 512]), Buf::In(512)])
            .status,
        IOERR
    );
    assert_eq!(
        d.exec(VIRTIO_BLK_T_OUT, 0, &[Buf::Out(vec![0; 512]), Buf::In(512)])
            .status,
        IOERR
    );
    assert_alive(&mut d);
}

#[test]
fn unsupported_types() {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);
    for t in [VIRTIO_BLK_T_SCSI_CMD, 99, u32::MAX] {
        let done = d.exec(t, 0, &[Buf::In(512)]);
        assert_eq!((done.status, done.used_len), (UNSUPP, 1));
    }
    assert_alive(&mut d);
}

#[test]
fn any_layout() {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);
    let data = pattern(2048, 4);
    assert_eq!(d.write(10, &data).status, OK);
    // Header split in two, data in three pieces, the last one sharing the status descriptor.
    let mut hdr = VIRTIO_BLK_T_IN.to_le_bytes().to_vec();
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&10u64.to_le_bytes());
    let h1 = d.alloc_bytes(&hdr[..5]);
    let h2 = d.alloc_bytes(&hdr[5..]);
    let b1 = d.alloc(1000, 0);
    let b2 = d.alloc(24, 0);
    let b3 = d.alloc(1025, 0xff);
    let sub = d.submit_descs(&[
        (h1, 5, R),
        (h2, 11, R),
        (b1, 1000, W),
        (b2, 24, W),
        (b3, 1025, W),
    ]);
    d.run(FaultPolicy::Fail);
    let done = d.take_used(&sub);
    assert_eq!((done.status, done.used_len), (OK, 2049));
    assert_eq!(done.data, data);
    // A write whose data shares the header's descriptor.
    let mut hdr = VIRTIO_BLK_T_OUT.to_le_bytes().to_vec();
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&20u64.to_le_bytes());
    hdr.extend_from_slice(&data[..512]);
    let h = d.alloc_bytes(&hdr);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(h, 528, R), (s, 1, W)]);
    d.run(FaultPolicy::Fail);
    assert_eq!(d.take_used(&sub).status, OK);
    assert_eq!(d.read(20, 512).data, data[..512]);
}

#[test]
fn indirect_requests() {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);
    let data = pattern(1024, 6);
    assert_eq!(d.write(2, &data).status, OK);
    let mut hdr = VIRTIO_BLK_T_IN.to_le_bytes().to_vec();
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&2u64.to_le_bytes());
    let h = d.alloc_bytes(&hdr);
    let b = d.alloc(1024, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_indirect(&[
        Descriptor::new(h, 16, NEXT, 1),
        Descriptor::new(b, 1024, W | NEXT, 2),
        Descriptor::new(s, 1, W, 0),
    ]);
    d.run(FaultPolicy::Fail);
    let done = d.take_used(&sub);
    assert_eq!(done.used_len, 1025);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(s)).unwrap(), OK);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(b)).unwrap();
    assert_eq!(got, data);
}

/// Submit a chain, run, and check it was answered with `status` (or dropped if `None`).
fn expect_malformed<M: InflightMemory>(
    d: &mut Driver<'_, M>,
    sub: &Submitted,
    status: Option<u8>,
    status_addr: u64,
) {
    let out = d.run(FaultPolicy::Fail);
    assert_eq!(out.completed, 1);
    assert!(out.fault.is_none());
    let done = d.take_used(sub);
    assert_eq!(done.head, sub.head);
    let byte = d.mem.read_obj::<u8>(GuestAddress(status_addr)).unwrap();
    match status {
        Some(s) => assert_eq!((done.used_len, byte), (1, s)),
        None => assert_eq!((done.used_len, byte), (0, 0xff)),
    }
    assert_alive(d);
}

fn header(d: &mut Driver<'_, impl InflightMemory>, kind: u32, sector: u64) -> u64 {
    let mut hdr = kind.to_le_bytes().to_vec();
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&sector.to_le_bytes());
    d.alloc_bytes(&hdr)
}

#[test]
fn malformed_chains() {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);

    // No header: only a status byte.
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(s, 1, W)]);
    expect_malformed(&mut d, &sub, Some(IOERR), s);

    // Header device-writable.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let b = d.alloc(512, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(h, 16, W), (b, 512, W), (s, 1, W)]);
    expect_malformed(&mut d, &sub, Some(IOERR), s);

    // Header too short.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(h, 8, R), (s, 1, W)]);
    expect_malformed(&mut d, &sub, Some(IOERR), s);

    // Status missing: the chain ends in a device-readable descriptor.
    let h = header(&mut d, VIRTIO_BLK_T_OUT, 0);
    let b = d.alloc(512, 0xff);
    let sub = d.submit_descs(&[(h, 16, R), (b, 512, R)]);
    expect_malformed(&mut d, &sub, None, b + 511);

    // Status device-readable after device-writable data.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let b = d.alloc(512, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(h, 16, R), (b, 512, W), (s, 1, R)]);
    expect_malformed(&mut d, &sub, None, s);

    // Zero-length status descriptor.
    let h = header(&mut d, VIRTIO_BLK_T_FLUSH_, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(h, 16, R), (s, 0, W)]);
    expect_malformed(&mut d, &sub, None, s);

    // Device-readable data after device-writable data.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let b = d.alloc(512, 0);
    let x = d.alloc(512, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(h, 16, R), (b, 512, W), (x, 512, R), (s, 1, W)]);
    expect_malformed(&mut d, &sub, Some(IOERR), s);

    // Data buffer outside guest memory.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(h, 16, R), (1 << 40, 512, W), (s, 1, W)]);
    expect_malformed(&mut d, &sub, Some(IOERR), s);
    let h = header(&mut d, VIRTIO_BLK_T_OUT, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(h, 16, R), (u64::MAX - 100, 512, R), (s, 1, W)]);
    expect_malformed(&mut d, &sub, Some(IOERR), s);

    // A data descriptor longer than guest memory (and than 4 GiB less the header): virtio-queue
    // stops walking a chain whose lengths add up past 2^32, yet the status descriptor is valid,
    // so the request is answered with IOERR, never returned with its status byte untouched.
    for (kind, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
        for len in [u32::MAX, u32::MAX - 15, u32::MAX - 16, 1 << 31] {
            let h = header(&mut d, kind, 0);
            let b = d.alloc(512, 0);
            let s = d.alloc(1, 0xff);
            let sub = d.submit_descs(&[(h, 16, R), (b, len, flags), (s, 1, W)]);
            expect_malformed(&mut d, &sub, Some(IOERR), s);
        }
    }
    // The same through an indirect table.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let b = d.alloc(512, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_indirect(&[
        Descriptor::new(h, 16, NEXT, 1),
        Descriptor::new(b, u32::MAX, W | NEXT, 2),
        Descriptor::new(s, 1, W, 0),
    ]);
    expect_malformed(&mut d, &sub, Some(IOERR), s);

    // Header outside guest memory.
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(1 << 40, 16, R), (s, 1, W)]);
    expect_malformed(&mut d, &sub, Some(IOERR), s);
}

/// A frontend may set a queue smaller than the device's largest (QEMU's
/// vhost-user-blk defaults to 128 against our 256), yet the driver sizes its
/// indirect chains from the config space's seg_max: such chains must work.
#[test]
fn indirect_chain_up_to_seg_max_works_on_a_smaller_queue() {
    let mem = plain_mem();
    let big = BlkConfig {
        queue_size: 64,
        ..cfg()
    };
    let seg_max = big.seg_max() as usize;
    let mut d = Driver::new(&mem, ram_blk(DISK, big), QSIZE);
    let data = pattern(512 * seg_max, 9);
    assert_eq!(d.write(0, &data).status, OK);
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let mut table = vec![Descriptor::new(h, 16, NEXT, 1)];
    let mut bufs = Vec::new();
    for i in 1..=seg_max {
        let b = d.alloc(512, 0);
        bufs.push(b);
        table.push(Descriptor::new(b, 512, W | NEXT, (i + 1) as u16));
    }
    let s = d.alloc(1, 0xff);
    table.push(Descriptor::new(s, 1, W, 0));
    assert!(table.len() > usize::from(QSIZE));
    let sub = d.submit_indirect(&table);
    d.run(FaultPolicy::Fail);
    assert_eq!(d.take_used(&sub).status, OK);
    for (i, b) in bufs.iter().enumerate() {
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(*b)).unwrap();
        assert_eq!(got, data[i * 512..(i + 1) * 512]);
    }
}

const VIRTIO_BLK_T_FLUSH_: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;

#[test]
fn chain_too_long_and_loops() {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);

    // An indirect table longer than the queue size.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let n = usize::from(QSIZE) + 4;
    let mut table = vec![Descriptor::new(h, 16, NEXT, 1)];
    for i in 1..n - 1 {
        let b = d.alloc(512, 0);
        table.push(Descriptor::new(b, 512, W | NEXT, (i + 1) as u16));
    }
    let s = d.alloc(1, 0xff);
    table.push(Descriptor::new(s, 1, W, 0));
    let sub = d.submit_indirect(&table);
    expect_malformed(&mut d, &sub, Some(IOERR), s);

    // A loop inside an indirect table.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let b = d.alloc(512, 0xff);
    let sub = d.submit_indirect(&[
        Descriptor::new(h, 16, NEXT, 1),
        Descriptor::new(b, 512, W | NEXT, 0),
    ]);
    expect_malformed(&mut d, &sub, None, b + 511);

    // A loop in the direct table.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let b = d.alloc(512, 0xff);
    let base = QSIZE - 2;
    d.offer_raw(
        &[
            (base, Descriptor::new(h, 16, NEXT, base + 1)),
            (base + 1, Descriptor::new(b, 512, W | NEXT, base)),
        ],
        base,
    );
    let sub = Submitted {
        head: base,
        descs: vec![(h, 16, R), (b, 512, W)],
    };
    expect_malformed(&mut d, &sub, None, b + 511);

    // `next` out of the table.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let b = d.alloc(512, 0xff);
    d.offer_raw(&[(base, Descriptor::new(h, 16, NEXT, QSIZE + 3))], base);
    let sub = Submitted {
        head: base,
        descs: vec![(h, 16, R), (b, 512, W)],
    };
    expect_malformed(&mut d, &sub, None, b + 511);

    // Nested indirect tables and an indirect descriptor with a bad length.
    let inner = d.alloc(16, 0);
    let sub = d.submit_indirect(&[Descriptor::new(inner, 16, INDIRECT, 0)]);
    let s = d.alloc(1, 0xff);
    expect_malformed(&mut d, &sub, None, s);
    let t = d.alloc(20, 0);
    let sub = d.submit_descs(&[(t, 20, INDIRECT)]);
    expect_malformed(&mut d, &sub, None, s);

    // A head index past the queue: nothing to return, the queue goes on.
    d.offer(QSIZE + 1);
    let out = d.run(FaultPolicy::Fail);
    assert_eq!(out.completed, 0);
    assert_alive(&mut d);
}

/// `len` bytes of the disk at `offset`, read from the backing (not through the queue, which
/// would also poll the parked requests).
fn disk(dev: &BlkDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    dev.backend()
        .read_at(offset, &vm_memory::VolatileSlice::from(&mut buf[..]))
        .unwrap();
    buf
}

/// Every chain the driver offered was taken from the avail ring: none was left there or put
/// back.
fn assert_avail_consumed<M: InflightMemory>(d: &Driver<'_, M>) {
    assert_eq!(
        d.queue.next_avail(),
        d.ring.avail_idx(),
        "chains left on the avail ring"
    );
}

/// Under Retry a request whose data misses is parked: taken from the avail ring and never put
/// back, nothing of it done, while the requests before and behind it complete. Polled again
/// without the translation, it faults again and stays parked; once the translation is there,
/// the next poll completes it.
#[test]
fn fault_retry_parks_the_request() {
    let mem = FaultyMem::new();
    let dev = ram_blk(DISK, cfg());
    let mut d = Driver::new(&mem, dev.clone(), QSIZE);
    let data = pattern(4096, 8);
    assert_eq!(d.write(0, &data).status, OK);

    // A good request first, then a write whose data misses, then another good request.
    let first = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
    let sub = d.request(VIRTIO_BLK_T_OUT, 0, &[Buf::Out(pattern(4096, 9))]);
    let behind = d.request(VIRTIO_BLK_T_IN, 1, &[Buf::In(512)]);
    let (buf, _, _) = sub.descs[1];
    let status = sub.descs.last().unwrap().0;
    mem.poison(buf + 1024, 1024, Permissions::Read);
    let used_before = d.used_idx();
    let out = d.run(FaultPolicy::Retry);
    assert_eq!(out.completed, 2);
    assert!(out.notify);
    assert_eq!(
        out.fault,
        Some(Fault {
            addr: GuestAddress(buf),
            len: 4096,
            access: Permissions::Read,
        })
    );
    assert_eq!(d.used_idx(), used_before.wrapping_add(2));
    let done = d.take_used(&first);
    assert_eq!(
        (done.head, done.status, done.used_len),
        (first.head, OK, 513)
    );
    assert_eq!(done.data, data[..512]);
    let done = d.take_used(&behind);
    assert_eq!(
        (done.head, done.status, done.used_len),
        (behind.head, OK, 513)
    );
    assert_eq!(done.data, data[512..1024]);
    // Parked, not on the avail ring, holding no translation; nothing of it written.
    assert_eq!((d.blk.parked(), d.blk.in_flight()), (1, 0));
    assert!(holds().is_empty(), "a parked request holds {:?}", holds());
    assert_avail_consumed(&d);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0xff);
    assert_eq!(disk(&dev, 0, 4096), data);
    // Polled again without the translation: it faults again and stays parked.
    let out = d.run(FaultPolicy::Retry);
    assert_eq!((out.completed, out.notify), (0, false));
    assert_eq!(out.fault.map(|f| f.addr), Some(GuestAddress(buf)));
    assert_eq!(d.blk.parked(), 1);
    assert_eq!(d.used_idx(), used_before.wrapping_add(2));
    assert_avail_consumed(&d);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0xff);
    assert_eq!(disk(&dev, 0, 4096), data);
    // Resolved: the parked request completes at the next poll.
    mem.heal();
    let out = d.run(FaultPolicy::Retry);
    assert_eq!((out.completed, out.fault), (1, None));
    assert_eq!(d.blk.parked(), 0);
    let done = d.take_used(&sub);
    assert_eq!((done.head, done.status, done.used_len), (sub.head, OK, 1));
    assert_eq!(disk(&dev, 0, 4096), pattern(4096, 9));
    assert_eq!(d.read(0, 4096).data, pattern(4096, 9));
}

/// A parked request alone on the queue: parked by a one-byte miss, completed once healed.
#[test]
fn fault_retry_then_resolve() {
    let mem = FaultyMem::new();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);
    let new = pattern(4096, 9);
    let sub = d.request(VIRTIO_BLK_T_OUT, 0, &[Buf::Out(new.clone())]);
    mem.poison(sub.descs[1].0, 1, Permissions::Read);
    let out = d.run(FaultPolicy::Retry);
    assert_eq!(out.completed, 0);
    assert_eq!(
        out.fault.map(|f| f.addr),
        Some(GuestAddress(sub.descs[1].0))
    );
    assert_eq!(d.blk.parked(), 1);
    assert_avail_consumed(&d);
    mem.heal();
    let out = d.run(FaultPolicy::Retry);
    assert_eq!((out.completed, out.fault), (1, None));
    assert_eq!(d.blk.parked(), 0);
    let done = d.take_used(&sub);
    assert_eq!((done.head, done.status, done.used_len), (sub.head, OK, 1));
    assert_eq!(d.read(0, 4096).data, new);
}

/// Each kind of fault under Retry parks its request; decided Fail at the next poll, the parked
/// request is answered as a failed one is: IOERR, or dropped (used length 0) when its status
/// byte is unreachable.
#[test]
fn fault_kinds() {
    let mem = FaultyMem::new();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);

    // A write-permission fault on a read's buffer (a read-only mapping).
    let sub = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
    mem.poison(sub.descs[1].0, 512, Permissions::Write);
    let fault = d.run(FaultPolicy::Retry).fault.unwrap();
    assert_eq!(fault.access, Permissions::Write);
    assert_eq!(fault.addr, GuestAddress(sub.descs[1].0));
    assert_eq!(d.blk.parked(), 1);
    assert_avail_consumed(&d);
    // Failed instead: IOERR, and the queue goes on.
    let out = d.run(FaultPolicy::Fail);
    assert_eq!((out.completed, out.fault), (1, None));
    assert_eq!(d.blk.parked(), 0);
    let done = d.take_used(&sub);
    assert_eq!((done.status, done.used_len), (IOERR, 1));
    mem.heal();
    assert_alive(&mut d);

    // The header misses.
    let sub = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
    mem.poison(sub.descs[0].0, 16, Permissions::Read);
    let fault = d.run(FaultPolicy::Retry).fault.unwrap();
    assert_eq!(
        (fault.addr, fault.access),
        (GuestAddress(sub.descs[0].0), Permissions::Read)
    );
    assert_eq!(d.blk.parked(), 1);
    assert_eq!(d.run(FaultPolicy::Fail).completed, 1);
    assert_eq!(d.blk.parked(), 0);
    let done = d.take_used(&sub);
    assert_eq!(
        (done.head, done.status, done.used_len),
        (sub.head, IOERR, 1)
    );
    mem.heal();

    // The status byte misses: retried, or dropped when failed.
    let sub = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
    let s = sub.descs[2].0;
    mem.poison(s, 1, Permissions::Write);
    let fault = d.run(FaultPolicy::Retry).fault.unwrap();
    assert_eq!(
        (fault.addr, fault.access),
        (GuestAddress(s), Permissions::Write)
    );
    assert_eq!(d.blk.parked(), 1);
    assert_eq!(d.run(FaultPolicy::Fail).completed, 1);
    assert_eq!(d.blk.parked(), 0);
    mem.heal();
    let done = d.take_used(&sub);
    assert_eq!((done.head, done.used_len, done.status), (sub.head, 0, 0xff));
    assert_alive(&mut d);

    // The indirect table misses: found by re-walking the chain.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 7);
    let b = d.alloc(512, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_indirect(&[
        Descriptor::new(h, 16, NEXT, 1),
        Descriptor::new(b, 512, W | NEXT, 2),
        Descriptor::new(s, 1, W, 0),
    ]);
    let table = sub.descs[0].0;
    mem.poison(table + 16, 16, Permissions::Read);
    let fault = d.run(FaultPolicy::Retry).fault.unwrap();
    assert_eq!(fault.access, Permissions::Read);
    assert!(fault.addr.0 >= table && fault.addr.0 < table + 48);
    assert_eq!(d.blk.parked(), 1);
    assert_avail_consumed(&d);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(s)).unwrap(), 0xff);
    mem.heal();
    let out = d.run(FaultPolicy::Retry);
    assert_eq!((out.completed, out.fault), (1, None));
    assert_eq!(d.blk.parked(), 0);
    let done = d.take_used(&sub);
    assert_eq!((done.head, done.used_len), (sub.head, 513));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(s)).unwrap(), OK);

    // Memory that is simply absent is no fault: IOERR even under Retry.
    let h = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let s = d.alloc(1, 0xff);
    let sub = d.submit_descs(&[(h, 16, R), (1 << 40, 512, W), (s, 1, W)]);
    let out = d.run(FaultPolicy::Retry);
    assert_eq!((out.completed, out.fault), (1, None));
    assert_eq!(d.blk.parked(), 0);
    assert_eq!(d.take_used(&sub).status, IOERR);
}

#[test]
fn event_idx_notifications() {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);
    d.queue.set_event_idx(true);
    let used_event = d.vq.avail_addr().unchecked_add(4 + 2 * u64::from(QSIZE));
    let avail_event = GuestAddress(USED_RING).unchecked_add(4 + 8 * u64::from(QSIZE));
    mem.write_obj(0u16, used_event).unwrap();

    let sub = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
    let out = d.run(FaultPolicy::Fail);
    assert_eq!((out.completed, out.notify), (1, true));
    d.take_used(&sub);
    // The device asked to be kicked at the next avail index.
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 1);

    // The driver only wants an interrupt after used index 2 (used_event = 2).
    let sub = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
    let out = d.run(FaultPolicy::Fail);
    assert_eq!((out.completed, out.notify), (1, false));
    d.take_used(&sub);
    mem.write_obj(2u16, used_event).unwrap();
    let sub = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
    let out = d.run(FaultPolicy::Fail);
    assert_eq!((out.completed, out.notify), (1, true));
    d.take_used(&sub);
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 3);

    // Nothing to do: no notification.
    assert_eq!(d.run(FaultPolicy::Fail), QueueOutcome::default());
}

#[test]
fn notifications_without_event_idx() {
    let mem = plain_mem();
    let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);
    assert!(ready(&d.queue));
    for _ in 0..3 {
        let sub = d.request(VIRTIO_BLK_T_IN, 0, &[Buf::In(512)]);
        assert!(d.run(FaultPolicy::Fail).notify);
        d.take_used(&sub);
    }
    assert!(!d.run(FaultPolicy::Fail).notify);
    // A batch larger than the queue, drained across wraps of the rings.
    for round in 0..3u8 {
        let subs: Vec<_> = (0..QSIZE / 4)
            .map(|i| {
                d.request(
                    VIRTIO_BLK_T_OUT,
                    u64::from(i),
                    &[Buf::Out(pattern(512, round))],
                )
            })
            .collect();
        let out = d.run(FaultPolicy::Fail);
        assert_eq!(out.completed, u32::from(QSIZE / 4));
        for sub in &subs {
            let done = d.take_used(sub);
            assert_eq!(done.status, OK);
        }
    }
}

#[test]
fn config_space_and_accessors() {
    let dev = ram_blk(
        DISK,
        BlkConfig {
            num_queues: 4,
            queue_size: 128,
            ..cfg()
        },
    );
    assert_eq!((dev.num_queues(), dev.queue_size()), (4, 128));
    assert_eq!(dev.capacity_bytes(), DISK);
    let full = dev.config_bytes();
    assert_eq!(full.len(), 96);
    let mut first = [0u8; 57];
    dev.read_config(0, &mut first);
    assert_eq!(first[..], full[..57]);
    assert_eq!(
        u64::from_le_bytes(first[..8].try_into().unwrap()),
        DISK / 512
    );
    let mut tail = [0xffu8; 8];
    dev.read_config(92, &mut tail);
    assert_eq!(tail[..4], full[92..]);
    assert_eq!(tail[4..], [0; 4]);
    dev.read_config(u32::MAX, &mut tail);
    assert_eq!(tail, [0; 8]);
    dev.flush().unwrap();
    // Bad options.
    let backend: Arc<dyn BlockBackend> = Arc::new(RamBackend::new(DISK).unwrap());
    assert!(BlkDevice::new(
        backend,
        BlkConfig {
            queue_size: 3,
            ..cfg()
        }
    )
    .is_err());
}

#[test]
fn queues_on_threads_share_one_disk() {
    let dev = ram_blk(
        DISK,
        BlkConfig {
            num_queues: 2,
            ..cfg()
        },
    );
    let workers: Vec<_> = (0..2u8)
        .map(|q| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mem = plain_mem();
                let mut d = Driver::new(&mem, dev, QSIZE);
                for i in 0..32u64 {
                    let sector = u64::from(q) * 1024 + i * 8;
                    let data = pattern(4096, q.wrapping_add(i as u8));
                    assert_eq!(d.write(sector, &data).status, OK);
                    assert_eq!(d.read(sector, 4096).data, data);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Reads and writes behave like a byte array, and out-of-range ones change nothing.
    #[test]
    fn model_read_write(ops in prop::collection::vec(
        (any::<bool>(), 0u64..70, 0u32..6, any::<u8>(), 1usize..4), 1..24)
    ) {
        const SECTORS: u64 = 64;
        let mem = plain_mem();
        let mut d = Driver::new(&mem, ram_blk(SECTORS * 512, cfg()), QSIZE);
        let mut model = vec![0u8; (SECTORS * 512) as usize];
        for (write, sector, n, seed, pieces) in ops {
            let len = n * 512;
            let fits = sector + u64::from(n) <= SECTORS;
            let start = (sector * 512) as usize;
            if write {
                let data = pattern(len as usize, seed);
                // Split the data over `pieces` descriptors.
                let step = (data.len() / pieces).max(1);
                let bufs: Vec<Buf> = data.chunks(step).map(|c| Buf::Out(c.to_vec())).collect();
                let done = d.exec(VIRTIO_BLK_T_OUT, sector, &bufs);
                prop_assert_eq!(done.status, if fits { OK } else { IOERR });
                if fits {
                    model[start..start + data.len()].copy_from_slice(&data);
                }
            } else {
                let done = d.read(sector, len);
                prop_assert_eq!(done.status, if fits { OK } else { IOERR });
                if fits {
                    prop_assert_eq!(&done.data[..], &model[start..start + len as usize]);
                    prop_assert_eq!(done.used_len, len + 1);
                }
            }
        }
        let all = d.read(0, (SECTORS * 512) as u32);
        prop_assert_eq!(all.data, model);
    }

    /// Garbage chains never panic, always come back on the used ring, and the queue goes on.
    #[test]
    fn garbage_chains(
        descs in prop::collection::vec(
            (0u64..5, 0u32..3000, 0u16..8, 0u16..QSIZE),
            1..10,
        ),
        header in prop::collection::vec(any::<u8>(), 16),
        head in 0u16..QSIZE,
    ) {
        let mem = plain_mem();
        let mut d = Driver::new(&mem, ram_blk(DISK, cfg()), QSIZE);
        let hdr = d.alloc_bytes(&header);
        let entries: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, (kind, len, flags, next))| {
                let addr = match kind {
                    0 => hdr,
                    1 => BUF_START + u64::from(*len) * 7,
                    2 => INDIRECT_START,
                    3 => 1 << 40,
                    _ => u64::MAX - u64::from(*len),
                };
                (i as u16, Descriptor::new(addr, *len, *flags, *next))
            })
            .collect();
        // Some valid-looking indirect table content too.
        for (i, (_, desc)) in entries.iter().enumerate() {
            mem.write_obj(
                virtio_queue::desc::RawDescriptor::from(*desc),
                GuestAddress(INDIRECT_START + 16 * i as u64),
            ).unwrap();
        }
        let before = d.used_idx();
        d.offer_raw(&entries, head);
        let out = d.run(FaultPolicy::Fail);
        prop_assert_eq!(out.completed, 1);
        prop_assert_eq!(d.used_idx(), before.wrapping_add(1));
        // Resynchronise the helper's used cursor and check the queue still works.
        let dummy = Submitted { head, descs: vec![(hdr, 1, W)] };
        d.take_used(&dummy);
        let data = pattern(512, 1);
        prop_assert_eq!(d.write(5, &data).status, OK);
        prop_assert_eq!(d.read(5, 512).data, data);
    }
}
