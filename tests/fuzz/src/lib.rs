//! The input formats of vcdev's fuzz targets: a byte cursor that decodes
//! them (short input reads as zeros, so every input is valid) and an
//! encoder that writes them, for the seed generator
//! (`examples/seeds.rs`). Each target's format is documented at its
//! `Op` type below; the targets are in `fuzz_targets/`.

use vcdev::testing::vhost_user::Fd;
use vcdev_iommu::model;

/// Reads little-endian numbers and byte strings off the fuzzer's input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.data.split_at(n.min(self.data.len()));
        self.data = b;
        a
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A length-prefixed (u16) byte string of at most `max` bytes.
    pub fn blob(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()) % (max + 1);
        self.bytes(n)
    }
}

/// Writes what [`Input`] reads.
#[derive(Default)]
pub struct Output(pub Vec<u8>);

impl Output {
    /// A byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend(v.to_le_bytes());
        self
    }
    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A length-prefixed (u16) byte string.
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        self.u16(u16::try_from(b.len()).expect("a blob under 64 KiB"));
        self.bytes(b)
    }
}

// ---- vhost_user_stream -----------------------------------------------------

/// The largest payload a `vhost_user_stream` message carries.
pub const VU_MAX_PAYLOAD: usize = 4096;
/// The most descriptors a `vhost_user_stream` message carries.
pub const VU_MAX_FDS: usize = 7;

/// One step of `vhost_user_stream`. The input is a setup byte (0: none,
/// 1: the valid setup with ACCESS_PLATFORM, 2: without; modulo 3), then
/// steps, each a tag byte (modulo 8: 0-5 a message, 6 a memory write, 7 a
/// kick):
/// - message: code byte (0xff: a u32 code follows), flags byte (bit 0
///   NEED_REPLY; bit 7: a raw u32 of flags follows instead), a blob
///   payload, a descriptor count byte (modulo 8) and one kind byte each
///   (modulo 4: sealed memfd, eventfd, socket, unsealed memfd);
/// - memory write: memfd index byte (of those sent so far), u16 offset, a
///   blob of at most 1 KiB;
/// - kick: eventfd index byte (of those sent so far).
#[derive(Clone, Debug)]
pub enum VuStep {
    /// A frame on the connection.
    Msg {
        /// The request code.
        code: u32,
        /// The header flags.
        flags: u32,
        /// The payload.
        payload: Vec<u8>,
        /// The descriptors.
        fds: Vec<Fd>,
    },
    /// Bytes written into a memfd already sent (guest memory).
    MemWrite {
        /// Which memfd.
        memfd: u8,
        /// Where.
        offset: u16,
        /// What.
        data: Vec<u8>,
    },
    /// The n-th eventfd sent is signalled.
    Kick(u8),
}

const FD_KINDS: [Fd; 4] = [Fd::Memfd, Fd::Eventfd, Fd::Socket, Fd::UnsealedMemfd];

/// Decodes the next step.
pub fn vu_step(inp: &mut Input<'_>) -> VuStep {
    match inp.u8() % 8 {
        6 => VuStep::MemWrite {
            memfd: inp.u8(),
            offset: inp.u16(),
            data: inp.blob(1024).to_vec(),
        },
        7 => VuStep::Kick(inp.u8()),
        _ => {
            let code = match inp.u8() {
                0xff => inp.u32(),
                c => u32::from(c),
            };
            let f = inp.u8();
            let flags = if f & 0x80 != 0 {
                inp.u32()
            } else {
                1 | if f & 1 != 0 {
                    vcdev::wire::FLAG_NEED_REPLY
                } else {
                    0
                }
            };
            let payload = inp.blob(VU_MAX_PAYLOAD).to_vec();
            let n = usize::from(inp.u8() % 8);
            let fds = (0..n)
                .map(|_| FD_KINDS[usize::from(inp.u8() % 4)])
                .collect();
            VuStep::Msg {
                code,
                flags,
                payload,
                fds,
            }
        }
    }
}

/// Encodes `s` as [`vu_step`] reads it.
pub fn vu_encode(out: &mut Output, s: &VuStep) {
    match s {
        VuStep::Msg {
            code,
            flags,
            payload,
            fds,
        } => {
            out.u8(0);
            match u8::try_from(*code) {
                Ok(c) if c != 0xff => out.u8(c),
                _ => out.u8(0xff).u32(*code),
            };
            match *flags {
                1 => out.u8(0),
                f if f == 1 | vcdev::wire::FLAG_NEED_REPLY => out.u8(1),
                f => out.u8(0x80).u32(f),
            };
            out.blob(payload);
            out.u8(u8::try_from(fds.len()).expect("few fds"));
            for k in fds {
                let i = FD_KINDS.iter().position(|x| x == k).expect("a kind");
                out.u8(u8::try_from(i).expect("a kind"));
            }
        }
        VuStep::MemWrite {
            memfd,
            offset,
            data,
        } => {
            out.u8(6).u8(*memfd).u16(*offset).blob(data);
        }
        VuStep::Kick(i) => {
            out.u8(7).u8(*i);
        }
    }
}

// ---- cdev_frames -----------------------------------------------------------

/// The largest template tail or random payload of `cdev_frames`.
pub const CDEV_MAX_TAIL: usize = 4096;

/// The scenario of `cdev_frames`, its first byte: bits 0-1 the files
/// (0 and 3: an iommufd file and a device file bound to it; 1: an unbound
/// device file; 2: a container file and a group file), bit 2 the device
/// (vfio0 or vfio1), bit 3 attach the bound device to a new IOAS, or set
/// the group's container.
///
/// Then requests, each: a file byte (bit 0: the device or group file,
/// else the iommufd or container file), a code byte (bit 7 clear: index
/// into the file's table; set: a u32 code follows), a shape byte (bit 0: a
/// u32 size word follows; bit 1: a random blob payload instead of the
/// template; bits 2-4: pokes, each a slot byte and a u64; bits 5-6:
/// descriptors, one kind byte each, modulo 3: memfd, eventfd, the
/// iommufd/container file), then the pokes, a blob tail, the descriptor
/// kinds.
#[derive(Clone, Debug)]
pub struct CdevReq {
    /// Whether the request goes to the device or group file.
    pub on_device: bool,
    /// The request, as the proptests have it.
    pub raw: vcdev::testing::cdev::Raw,
}

const CDEV_FDS: [vcdev::testing::cdev::FdKind; 3] = [
    vcdev::testing::cdev::FdKind::Memfd,
    vcdev::testing::cdev::FdKind::Eventfd,
    vcdev::testing::cdev::FdKind::Ictx,
];

/// Decodes the next request.
pub fn cdev_req(inp: &mut Input<'_>) -> CdevReq {
    let on_device = inp.u8() & 1 != 0;
    let c = inp.u8();
    let code = if c & 0x80 == 0 {
        Ok(usize::from(c))
    } else {
        Err(inp.u32())
    };
    let shape = inp.u8();
    let size_word = (shape & 1 != 0).then(|| inp.u32());
    let random = (shape & 2 != 0).then(|| inp.blob(CDEV_MAX_TAIL).to_vec());
    let pokes = (0..(shape >> 2) & 7)
        .map(|_| (usize::from(inp.u8() % 32), inp.u64()))
        .collect();
    let tail = inp.blob(CDEV_MAX_TAIL).to_vec();
    let fds = (0..(shape >> 5) & 3)
        .map(|_| CDEV_FDS[usize::from(inp.u8() % 3)])
        .collect();
    CdevReq {
        on_device,
        raw: vcdev::testing::cdev::Raw {
            code,
            size_word,
            pokes,
            tail,
            random,
            fds,
        },
    }
}

/// Encodes `r` as [`cdev_req`] reads it.
pub fn cdev_encode(out: &mut Output, r: &CdevReq) {
    let raw = &r.raw;
    out.u8(u8::from(r.on_device));
    match raw.code {
        Ok(i) => out.u8(u8::try_from(i).expect("an index under 128") & 0x7f),
        Err(c) => out.u8(0x80).u32(c),
    };
    let npokes = u8::try_from(raw.pokes.len()).expect("at most 7 pokes");
    let nfds = u8::try_from(raw.fds.len()).expect("at most 3 descriptors");
    let shape = u8::from(raw.size_word.is_some())
        | u8::from(raw.random.is_some()) << 1
        | npokes << 2
        | nfds << 5;
    out.u8(shape);
    if let Some(w) = raw.size_word {
        out.u32(w);
    }
    if let Some(r) = &raw.random {
        out.blob(r);
    }
    for &(slot, v) in &raw.pokes {
        out.u8(u8::try_from(slot).expect("a slot")).u64(v);
    }
    out.blob(&raw.tail);
    for k in &raw.fds {
        let i = CDEV_FDS.iter().position(|x| x == k).expect("a kind");
        out.u8(u8::try_from(i).expect("a kind"));
    }
}

// ---- iommufd_model ---------------------------------------------------------

/// Decodes the next command of `iommufd_model`: a tag byte (modulo 6:
/// map fixed, map auto, unmap, unmap all, copy, write), then its fields,
/// one byte each (an IOAS index, pages taken modulo a little more than the
/// model's window, so that the edges and EFAULT are reached; `npages` at
/// least 1), the write's value a u64; copy's destination page byte 0xff
/// means an allocated IOVA.
pub fn model_op(inp: &mut Input<'_>) -> model::Op {
    let page = |inp: &mut Input<'_>| u64::from(inp.u8()) % (model::PAGES + 4);
    let npages = |inp: &mut Input<'_>| u64::from(inp.u8()) % 8 + 1;
    let file_page = |inp: &mut Input<'_>| u64::from(inp.u8()) % (model::FILE_PAGES + 2);
    let ioas = |inp: &mut Input<'_>| usize::from(inp.u8()) % model::IOASES;
    match inp.u8() % 6 {
        0 => model::Op::MapFixed {
            ioas: ioas(inp),
            page: page(inp),
            npages: npages(inp),
            file_page: file_page(inp),
        },
        1 => model::Op::MapAuto {
            ioas: ioas(inp),
            npages: npages(inp),
            file_page: file_page(inp),
        },
        2 => model::Op::Unmap {
            ioas: ioas(inp),
            page: page(inp),
            npages: npages(inp),
        },
        3 => model::Op::UnmapAll { ioas: ioas(inp) },
        4 => {
            let dst = ioas(inp);
            let src = ioas(inp);
            let src_page = page(inp);
            let npages = npages(inp);
            let d = inp.u8();
            model::Op::Copy {
                dst,
                src,
                src_page,
                npages,
                dst_page: (d != 0xff).then(|| u64::from(d) % (model::PAGES + 4)),
            }
        }
        _ => model::Op::Write {
            ioas: ioas(inp),
            page: page(inp),
            value: inp.u64(),
        },
    }
}

/// Encodes `op` as [`model_op`] reads it (fields in range).
pub fn model_encode(out: &mut Output, op: &model::Op) {
    let b = |v: u64| u8::try_from(v).expect("a small field");
    let i = |v: usize| u8::try_from(v).expect("an IOAS index");
    match *op {
        model::Op::MapFixed {
            ioas,
            page,
            npages,
            file_page,
        } => out
            .u8(0)
            .u8(i(ioas))
            .u8(b(page))
            .u8(b(npages - 1))
            .u8(b(file_page)),
        model::Op::MapAuto {
            ioas,
            npages,
            file_page,
        } => out.u8(1).u8(i(ioas)).u8(b(npages - 1)).u8(b(file_page)),
        model::Op::Unmap { ioas, page, npages } => {
            out.u8(2).u8(i(ioas)).u8(b(page)).u8(b(npages - 1))
        }
        model::Op::UnmapAll { ioas } => out.u8(3).u8(i(ioas)),
        model::Op::Copy {
            dst,
            src,
            src_page,
            npages,
            dst_page,
        } => out
            .u8(4)
            .u8(i(dst))
            .u8(i(src))
            .u8(b(src_page))
            .u8(b(npages - 1))
            .u8(dst_page.map_or(0xff, b)),
        model::Op::Write { ioas, page, value } => out.u8(5).u8(i(ioas)).u8(b(page)).u64(value),
    };
}

// ---- blk_chains ------------------------------------------------------------

/// The largest driver memory write of `blk_chains`.
pub const BLK_MAX_WRITE: usize = 1024;

/// One step of `blk_chains`. The input is a mode byte (bit 0: through an
/// IOTLB, else plain guest memory; bit 1: FaultPolicy::Retry, else Fail;
/// bit 2: EVENT_IDX; bit 3: the IOTLB starts empty instead of mapping all
/// memory at IOVA = address), then steps, each a tag byte (modulo 7):
/// - 0 a descriptor: index byte, u64 address, u32 length, u16 flags, u16 next;
/// - 1 offer: u16 head (any value: out-of-range heads too);
/// - 2 a write of driver memory: u32 address, blob;
/// - 3 process the queue;
/// - 4 IOTLB update: u16 IOVA page, page count byte, host page byte,
///   permission byte (modulo 4: none, read, write, read-write);
/// - 5 IOTLB invalidate: u16 IOVA page, page count byte;
/// - 6 a request laid out by the driver: u32 type, u64 sector, a count
///   byte (modulo 5) of buffers, each a u16 length and a flags byte (bit 0
///   device-writable), then the status descriptor's length byte.
#[derive(Clone, Debug)]
pub enum BlkStep {
    /// A descriptor at a table index.
    Desc {
        /// Table index (modulo the queue size).
        idx: u8,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
        /// Its flags.
        flags: u16,
        /// Its next field.
        next: u16,
    },
    /// A head on the avail ring.
    Offer(u16),
    /// Bytes into driver memory (headers, indirect tables, data).
    Write {
        /// Where (modulo memory, moved off the rings).
        addr: u32,
        /// What.
        data: Vec<u8>,
    },
    /// The device processes the queue.
    Process,
    /// An IOTLB update.
    Map {
        /// First IOVA page.
        iova_page: u16,
        /// Pages.
        npages: u8,
        /// First host page (modulo memory).
        host_page: u8,
        /// Permission (modulo 4).
        perm: u8,
    },
    /// An IOTLB invalidate.
    Unmap {
        /// First IOVA page.
        iova_page: u16,
        /// Pages.
        npages: u8,
    },
    /// A request the driver lays out: header, buffers, status.
    Request {
        /// The request type.
        kind: u32,
        /// The sector.
        sector: u64,
        /// The buffers: (length, device-writable).
        bufs: Vec<(u16, bool)>,
        /// The status descriptor's length.
        status_len: u8,
    },
}

/// Decodes the next step.
pub fn blk_step(inp: &mut Input<'_>) -> BlkStep {
    match inp.u8() % 7 {
        0 => BlkStep::Desc {
            idx: inp.u8(),
            addr: inp.u64(),
            len: inp.u32(),
            flags: inp.u16(),
            next: inp.u16(),
        },
        1 => BlkStep::Offer(inp.u16()),
        2 => BlkStep::Write {
            addr: inp.u32(),
            data: inp.blob(BLK_MAX_WRITE).to_vec(),
        },
        3 => BlkStep::Process,
        4 => BlkStep::Map {
            iova_page: inp.u16(),
            npages: inp.u8(),
            host_page: inp.u8(),
            perm: inp.u8(),
        },
        5 => BlkStep::Unmap {
            iova_page: inp.u16(),
            npages: inp.u8(),
        },
        _ => {
            let kind = inp.u32();
            let sector = inp.u64();
            let n = inp.u8() % 5;
            let bufs = (0..n).map(|_| (inp.u16(), inp.u8() & 1 != 0)).collect();
            BlkStep::Request {
                kind,
                sector,
                bufs,
                status_len: inp.u8(),
            }
        }
    }
}

/// Encodes `s` as [`blk_step`] reads it.
pub fn blk_encode(out: &mut Output, s: &BlkStep) {
    match s {
        BlkStep::Desc {
            idx,
            addr,
            len,
            flags,
            next,
        } => out
            .u8(0)
            .u8(*idx)
            .u64(*addr)
            .u32(*len)
            .u16(*flags)
            .u16(*next),
        BlkStep::Offer(h) => out.u8(1).u16(*h),
        BlkStep::Write { addr, data } => out.u8(2).u32(*addr).blob(data),
        BlkStep::Process => out.u8(3),
        BlkStep::Map {
            iova_page,
            npages,
            host_page,
            perm,
        } => out
            .u8(4)
            .u16(*iova_page)
            .u8(*npages)
            .u8(*host_page)
            .u8(*perm),
        BlkStep::Unmap { iova_page, npages } => out.u8(5).u16(*iova_page).u8(*npages),
        BlkStep::Request {
            kind,
            sector,
            bufs,
            status_len,
        } => {
            out.u8(6).u32(*kind).u64(*sector);
            out.u8(u8::try_from(bufs.len()).expect("at most 4 buffers"));
            for &(len, w) in bufs {
                out.u16(len).u8(u8::from(w));
            }
            out.u8(*status_len)
        }
    };
}
