//! The virtio-blk request parser (virtio 1.2 section 5.2.6).
//!
//! A request is a descriptor chain: device-readable descriptors carrying the 16-byte
//! `struct virtio_blk_outhdr` and, for writes, the data; then device-writable descriptors
//! carrying, for reads, the data and, last, one status byte. The parser makes no assumption on
//! how these are split into descriptors (section 2.6.4, "Message Framing"): the header may span
//! descriptors, and data may share a descriptor with the header or the status byte.
//!
//! Parsing reads only the header from guest memory. The data buffers are described as
//! [`DataRange`]s over the chain, to be translated (all of them, before any side effect) and
//! executed by the `exec` module.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::config::{MAX_DISCARD_SEG, SERIAL_LEN};

/// Size of the request header.
pub const HEADER_LEN: usize = size_of::<virtio_blk_outhdr>();
/// Size of one discard / write-zeroes segment.
pub const SEGMENT_LEN: usize = size_of::<virtio_blk_discard_write_zeroes>();

/// Ways a descriptor chain fails to be a virtio-blk request.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The chain has no descriptor at all (a bad head index or indirect table).
    #[error("Descriptor chain is empty")]
    EmptyChain,
    /// The chain ends in a descriptor that still points on (a loop, or an unreadable descriptor).
    #[error("Descriptor chain is truncated or loops")]
    Truncated,
    /// The chain has more descriptors than the queue size allows.
    #[error("Descriptor chain has {len} descriptors, more than the {max} allowed")]
    TooLong {
        /// Descriptors seen.
        len: usize,
        /// The limit (the queue size).
        max: usize,
    },
    /// The last descriptor is not device-writable, or is empty: no status byte.
    #[error("Descriptor chain has no device-writable status byte")]
    NoStatus,
    /// A device-readable descriptor follows a device-writable one.
    #[error("Device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The device-readable part is shorter than the header.
    #[error("Request header is {len} bytes long, {HEADER_LEN} needed")]
    HeaderTooShort {
        /// Device-readable bytes in the chain.
        len: u64,
    },
    /// A buffer's address plus offset overflows.
    #[error("Descriptor address overflows")]
    AddressOverflow,
    /// The header could not be read.
    #[error("Failed to read the request header")]
    HeaderRead(#[source] GuestMemoryError),
    /// The header was cut short by guest memory.
    #[error("Request header read came up short")]
    HeaderShortRead,
}

/// The request types this device knows, and the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read from the disk.
    In,
    /// `VIRTIO_BLK_T_OUT`: write to the disk.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the serial.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Anything else, answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// A run of bytes in a chain: `len` bytes starting `offset` bytes into descriptor `desc`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataRange {
    /// Index of the first descriptor in the chain.
    pub desc: usize,
    /// Offset in that descriptor.
    pub offset: u32,
    /// Length in bytes (possibly spanning the following descriptors).
    pub len: u64,
}

impl DataRange {
    /// The `(address, length)` pieces of this range, one per descriptor touched.
    pub fn pieces<'d>(
        &self,
        descs: &'d [Descriptor],
    ) -> impl Iterator<Item = Result<(GuestAddress, u32), ParseError>> + 'd {
        let mut left = self.len;
        let mut offset = self.offset;
        descs
            .get(self.desc..)
            .unwrap_or_default()
            .iter()
            .map_while(move |d| {
                if left == 0 {
                    return None;
                }
                let avail = d.len().saturating_sub(offset);
                let take = u32::try_from(left).unwrap_or(u32::MAX).min(avail);
                let addr = d.addr().checked_add(u64::from(offset));
                offset = 0;
                left = left.saturating_sub(u64::from(take));
                Some(addr.map(|a| (a, take)).ok_or(ParseError::AddressOverflow))
            })
            .filter(|p| !matches!(p, Ok((_, 0))))
    }
}

/// A parsed request: what to do, where, and the buffers involved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request type.
    pub kind: RequestType,
    /// The `sector` field of the header.
    pub sector: u64,
    /// Data after the header that the device reads (`OUT`, and the segments of `DISCARD` and
    /// `WRITE_ZEROES`).
    pub readable: DataRange,
    /// Data the device writes before the status byte (`IN`, `GET_ID`).
    pub writable: DataRange,
    /// The status byte.
    pub status: GuestAddress,
}

impl Request {
    /// The buffer to translate for this request's data, and the access it needs.
    ///
    /// `GET_ID` writes at most [`SERIAL_LEN`] bytes; request types that carry no data get an
    /// empty range.
    #[must_use]
    pub fn data(&self) -> (DataRange, Permissions) {
        match self.kind {
            RequestType::In => (self.writable, Permissions::Write),
            RequestType::GetId => {
                let mut range = self.writable;
                range.len = range.len.min(SERIAL_LEN as u64);
                (range, Permissions::Write)
            }
            RequestType::Out => (self.readable, Permissions::Read),
            RequestType::Discard | RequestType::WriteZeroes => {
                // Never translate more segments than the device accepts: the executor refuses
                // longer tables before reading them.
                let mut range = self.readable;
                range.len = range
                    .len
                    .min(u64::from(MAX_DISCARD_SEG).saturating_mul(SEGMENT_LEN as u64));
                (range, Permissions::Read)
            }
            RequestType::Flush | RequestType::Unsupported(_) => {
                (DataRange::default(), Permissions::Read)
            }
        }
    }
}

/// Find the status byte: the last byte of the last descriptor, which must be device-writable.
///
/// A chain without one cannot be answered and is only returned to the used ring.
pub fn status_address(descs: &[Descriptor]) -> Result<GuestAddress, ParseError> {
    let last = descs.last().ok_or(ParseError::EmptyChain)?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(ParseError::NoStatus);
    }
    last.addr()
        .checked_add(u64::from(last.len()).saturating_sub(1))
        .ok_or(ParseError::AddressOverflow)
}

/// Parse a chain whose status byte is at `status` (see [`status_address`]).
pub fn parse<M: GuestMemory>(
    descs: &[Descriptor],
    status: GuestAddress,
    mem: &M,
) -> Result<Request, ParseError> {
    let first_writable = descs
        .iter()
        .position(Descriptor::is_write_only)
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_writable);
    if writable.iter().any(|d| !d.is_write_only()) {
        return Err(ParseError::ReadableAfterWritable);
    }
    let readable_len: u64 = readable.iter().map(|d| u64::from(d.len())).sum();
    let writable_len: u64 = writable.iter().map(|d| u64::from(d.len())).sum();
    let header_len = HEADER_LEN as u64;
    if readable_len < header_len {
        return Err(ParseError::HeaderTooShort { len: readable_len });
    }

    let header = read_header(descs, mem)?;
    let field = |off: usize| {
        let mut bytes = [0u8; 8];
        for (dst, src) in bytes.iter_mut().zip(header.iter().skip(off)) {
            *dst = *src;
        }
        bytes
    };
    let type_bytes = field(offset_of!(virtio_blk_outhdr, type_));
    let kind = u32::from_le_bytes([type_bytes[0], type_bytes[1], type_bytes[2], type_bytes[3]]);
    let sector = u64::from_le_bytes(field(offset_of!(virtio_blk_outhdr, sector)));

    Ok(Request {
        kind: RequestType::from(kind),
        sector,
        readable: skip(descs, header_len, readable_len),
        writable: DataRange {
            desc: first_writable,
            offset: 0,
            len: writable_len.saturating_sub(1),
        },
        status,
    })
}

/// The range of `total - n` bytes that starts `n` bytes into the chain.
fn skip(descs: &[Descriptor], n: u64, total: u64) -> DataRange {
    let mut left = n;
    for (i, d) in descs.iter().enumerate() {
        let len = u64::from(d.len());
        if left < len {
            return DataRange {
                desc: i,
                offset: u32::try_from(left).unwrap_or(u32::MAX),
                len: total.saturating_sub(n),
            };
        }
        left = left.saturating_sub(len);
    }
    DataRange {
        desc: descs.len(),
        offset: 0,
        len: 0,
    }
}

fn read_header<M: GuestMemory>(
    descs: &[Descriptor],
    mem: &M,
) -> Result<[u8; HEADER_LEN], ParseError> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0usize;
    let range = DataRange {
        desc: 0,
        offset: 0,
        len: HEADER_LEN as u64,
    };
    for piece in range.pieces(descs) {
        let (addr, len) = piece?;
        let len = usize::try_from(len).map_err(|_| ParseError::HeaderShortRead)?;
        let slices = mem
            .get_slices(addr, len, Permissions::Read)
            .map_err(ParseError::HeaderRead)?;
        for slice in slices {
            let slice = slice.map_err(ParseError::HeaderRead)?;
            let dst = header
                .get_mut(filled..)
                .ok_or(ParseError::HeaderShortRead)?;
            let n = slice.copy_to(dst);
            filled = filled.saturating_add(n);
        }
    }
    if filled != HEADER_LEN {
        return Err(ParseError::HeaderShortRead);
    }
    Ok(header)
}

/// One discard / write-zeroes segment, decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` and reserved bits).
    pub flags: u32,
}

impl Segment {
    /// Decode a segment from its little-endian wire form.
    #[must_use]
    pub fn from_bytes(bytes: &[u8; SEGMENT_LEN]) -> Self {
        let at = |off: usize| bytes.iter().skip(off).copied();
        let mut sector = [0u8; 8];
        let mut num = [0u8; 4];
        let mut flags = [0u8; 4];
        for (d, s) in sector
            .iter_mut()
            .zip(at(offset_of!(virtio_blk_discard_write_zeroes, sector)))
        {
            *d = s;
        }
        for (d, s) in num
            .iter_mut()
            .zip(at(offset_of!(virtio_blk_discard_write_zeroes, num_sectors)))
        {
            *d = s;
        }
        for (d, s) in flags
            .iter_mut()
            .zip(at(offset_of!(virtio_blk_discard_write_zeroes, flags)))
        {
            *d = s;
        }
        Self {
            sector: u64::from_le_bytes(sector),
            num_sectors: u32::from_le_bytes(num),
            flags: u32::from_le_bytes(flags),
        }
    }
}
