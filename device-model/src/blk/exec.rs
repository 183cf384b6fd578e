//! Translating and executing parsed requests.
//!
//! Execution is the second phase of a request. First every buffer of the request (status byte,
//! then data) is translated through the [`GuestMemory`] with the access the device will make, so
//! an IOMMU miss or permission fault surfaces before anything is read from or written to the
//! disk or the guest. Then the request runs against the [`BlockBackend`], moving data directly
//! between the translated guest slices and the backing (through an aligned bounce buffer when
//! an `O_DIRECT` backing cannot take the guest's buffers: [`super::bounce`]).
//!
//! [`RequestError::status`] is the one place where an error becomes a status byte.

use std::io;

use log::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};

use super::backend::{BlockBackend, SECTOR_SHIFT, SECTOR_SIZE};
use super::bounce;
use super::chain::{self, Rewalk};
use super::config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SERIAL_LEN};
use super::request::{
    parse, status_address, DataRange, ParseError, Request, RequestType, Segment, SEGMENT_LEN,
};
use super::volatile::erase_bitmap;

/// A translation the IOMMU refused: a miss, or an access the mapping does not permit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The faulting I/O virtual address (the start of the part that failed to translate).
    pub addr: GuestAddress,
    /// Length of the range that failed to translate, in bytes.
    pub len: usize,
    /// The access the device needed: `Read` for buffers it reads, `Write` for buffers it writes.
    pub access: Permissions,
}

impl Fault {
    /// The fault behind `err`, if it is an IOMMU error, for an access to `len` bytes at `addr`.
    #[must_use]
    pub fn from_error(
        err: &GuestMemoryError,
        addr: GuestAddress,
        len: usize,
        access: Permissions,
    ) -> Option<Self> {
        let GuestMemoryError::IommuError(iommu) = err else {
            return None;
        };
        let (addr, len) = match iommu {
            vm_memory::iommu::Error::CannotResolve { iova_range, .. }
            | vm_memory::iommu::Error::Fragmented { iova_range, .. } => {
                (iova_range.base, iova_range.length)
            }
            vm_memory::iommu::Error::IommuMisconfigured { .. } => (addr, len),
        };
        Some(Self { addr, len, access })
    }
}

/// What the transport wants done with a request that hits an IOMMU fault.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultPolicy {
    /// Complete the request with `VIRTIO_BLK_S_IOERR` and go on with the queue.
    #[default]
    Fail,
    /// Park the request and report the fault, so that the transport can resolve it: the chain
    /// stays off the avail ring, the requests behind it go on, and it is walked again at the
    /// queue's next poll ([`super::AsyncQueue::poll`]).
    Retry,
}

/// Reasons a request completes with a status other than `VIRTIO_BLK_S_OK`.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain is not a well-formed request.
    #[error("Malformed request")]
    Malformed(#[source] ParseError),
    /// The request type is not implemented.
    #[error("Unsupported request type {0}")]
    Unsupported(u32),
    /// A write-type request on a read-only device.
    #[error("Write-type request on a read-only device")]
    ReadOnly,
    /// The request reaches past the end of the disk.
    #[error("Request for {len} bytes at sector {sector} reaches past the end of the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A read or write of a length that is not a whole number of sectors.
    #[error("Data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// A read or write whose offset or length is not a multiple of the advertised `blk_size`
    /// (`direct=on` on a disk with blocks larger than 512 bytes).
    #[error("Request for {len} bytes at sector {sector} is not aligned to blocks of {block_size}")]
    UnalignedBlock {
        /// First sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
        /// The block size in bytes.
        block_size: u32,
    },
    /// Data buffers in the direction the request type does not use.
    #[error("Request carries {0} bytes of data in the wrong direction")]
    UnexpectedData(u64),
    /// A discard / write-zeroes payload that is not a whole number of segments.
    #[error("Segment table of {0} bytes is empty or not a multiple of 16")]
    SegmentTableLength(u64),
    /// More discard / write-zeroes segments than `max_discard_seg`.
    #[error("{0} segments, more than the device accepts")]
    TooManySegments(u64),
    /// A segment with reserved flag bits set.
    #[error("Segment flags {0:#x} have reserved bits set")]
    SegmentFlags(u32),
    /// A discard segment with the unmap flag (virtio 1.2 section 5.2.6.2).
    #[error("Discard segment with the unmap flag")]
    DiscardUnmap,
    /// A segment longer than `max_discard_sectors`.
    #[error("Segment of {0} sectors is longer than the device accepts")]
    SegmentTooLong(u32),
    /// A buffer could not be translated (not an IOMMU fault).
    #[error("Failed to translate a {len}-byte buffer at {:#x}", addr.0)]
    Translate {
        /// Address of the buffer.
        addr: GuestAddress,
        /// Length of the buffer.
        len: usize,
        /// The cause.
        #[source]
        source: GuestMemoryError,
    },
    /// An IOMMU fault failed by [`FaultPolicy::Fail`].
    #[error("IOMMU fault at {:#x}+{}", .0.addr.0, .0.len)]
    Fault(Fault),
    /// The backing failed.
    #[error("Backing I/O failed")]
    Backend(#[source] io::Error),
}

impl RequestError {
    /// The status byte reported to the driver for this error.
    #[must_use]
    pub fn status(&self) -> u8 {
        let status = match self {
            Self::Unsupported(_)
            | Self::TooManySegments(_)
            | Self::SegmentFlags(_)
            | Self::DiscardUnmap => VIRTIO_BLK_S_UNSUPP,
            Self::Malformed(_)
            | Self::ReadOnly
            | Self::OutOfRange { .. }
            | Self::UnalignedLength(_)
            | Self::UnalignedBlock { .. }
            | Self::UnexpectedData(_)
            | Self::SegmentTableLength(_)
            | Self::SegmentTooLong(_)
            | Self::Translate { .. }
            | Self::Fault(_)
            | Self::Backend(_) => VIRTIO_BLK_S_IOERR,
        };
        u8::try_from(status).unwrap_or(u8::MAX)
    }
}

/// The status byte of a successful request.
#[must_use]
pub fn status_ok() -> u8 {
    u8::try_from(VIRTIO_BLK_S_OK).unwrap_or_default()
}

/// How a chain ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Answered: put on the used ring with this many bytes written.
    Used(u32),
    /// Not answerable (no status byte): put on the used ring with length 0.
    Dropped,
    /// An IOMMU fault under [`FaultPolicy::Retry`]: nothing was done; the queue asks the
    /// transport whether to park the request.
    Retry(Fault),
}

/// What a request runs against.
pub(crate) struct Target<'a> {
    pub(crate) backend: &'a dyn BlockBackend,
    pub(crate) capacity: u64,
    pub(crate) read_only: bool,
    pub(crate) serial: &'a [u8; SERIAL_LEN],
}

/// A translation failure: an IOMMU fault, or any other guest memory error.
enum TranslateError {
    Fault(Fault),
    Memory(RequestError),
}

impl TranslateError {
    fn into_request_error(self) -> RequestError {
        match self {
            Self::Fault(fault) => RequestError::Fault(fault),
            Self::Memory(err) => err,
        }
    }
}

/// Translate `len` bytes at `addr` for `access`, appending the slices to `out`.
fn translate<'m, M: GuestMemory>(
    mem: &'m M,
    addr: GuestAddress,
    len: usize,
    access: Permissions,
    out: &mut Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>,
) -> Result<(), TranslateError> {
    let fail = |source: GuestMemoryError| match Fault::from_error(&source, addr, len, access) {
        Some(fault) => TranslateError::Fault(fault),
        None => TranslateError::Memory(RequestError::Translate { addr, len, source }),
    };
    let mut total = 0usize;
    for slice in mem.get_slices(addr, len, access).map_err(fail)? {
        let slice = slice.map_err(fail)?;
        total = total.saturating_add(slice.len());
        out.push(slice);
    }
    if total != len {
        return Err(fail(GuestMemoryError::PartialBuffer {
            expected: len,
            completed: total,
        }));
    }
    Ok(())
}

/// Translate every piece of `range`.
fn translate_range<'m, M: GuestMemory>(
    mem: &'m M,
    descs: &[Descriptor],
    range: DataRange,
    access: Permissions,
    out: &mut Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>,
) -> Result<(), TranslateError> {
    for piece in range.pieces(descs) {
        let (addr, len) = piece.map_err(|e| TranslateError::Memory(RequestError::Malformed(e)))?;
        let len = usize::try_from(len).map_err(|_| {
            TranslateError::Memory(RequestError::Malformed(ParseError::AddressOverflow))
        })?;
        translate(mem, addr, len, access, out)?;
    }
    Ok(())
}

/// Checks that need no guest memory: type, direction, lengths and the range on disk.
fn validate(req: &Request, target: &Target<'_>) -> Result<(), RequestError> {
    let check_rw = |len: u64, stray: u64| {
        if stray != 0 {
            return Err(RequestError::UnexpectedData(stray));
        }
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::UnalignedLength(len));
        }
        check_block_alignment(req.sector, len, target.backend.block_size())?;
        check_range(req.sector, len, target.capacity).map(|_| ())
    };
    match req.kind {
        RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
        RequestType::In => check_rw(req.writable.len, req.readable.len),
        RequestType::Out if target.read_only => Err(RequestError::ReadOnly),
        RequestType::Out => check_rw(req.readable.len, req.writable.len),
        RequestType::Flush | RequestType::GetId => Ok(()),
        RequestType::Discard | RequestType::WriteZeroes if target.read_only => {
            Err(RequestError::ReadOnly)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            let len = req.readable.len;
            let seg = SEGMENT_LEN as u64;
            if len == 0 || len % seg != 0 {
                return Err(RequestError::SegmentTableLength(len));
            }
            let count = len / seg;
            if count > u64::from(MAX_DISCARD_SEG) {
                return Err(RequestError::TooManySegments(count));
            }
            Ok(())
        }
    }
}

/// Check that a read or write of `len` bytes (a multiple of 512) from `sector` starts and ends
/// on a block of `block_size` bytes (the device's `blk_size`, a power of two).
fn check_block_alignment(sector: u64, len: u64, block_size: u32) -> Result<(), RequestError> {
    let block = u64::from(block_size);
    let sectors_per_block = (block >> SECTOR_SHIFT).max(1);
    if sector % sectors_per_block != 0 || len % block.max(SECTOR_SIZE) != 0 {
        return Err(RequestError::UnalignedBlock {
            sector,
            len,
            block_size,
        });
    }
    Ok(())
}

/// Check that `len` bytes from `sector` lie within a disk of `capacity` bytes; give the offset.
pub(crate) fn check_range(sector: u64, len: u64, capacity: u64) -> Result<u64, RequestError> {
    // The error is built only on failure: a `RequestError` built and
    // dropped on success costs a call to its drop glue a request.
    match sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|offset| Some((offset, offset.checked_add(len)?)))
    {
        Some((offset, end)) if end <= capacity => Ok(offset),
        _ => Err(RequestError::OutOfRange { sector, len }),
    }
}

/// How the first phase of a chain ended.
pub(crate) enum Started<'m, B: BitmapSlice> {
    /// Nothing more to do: put the chain on the used ring.
    Finished(Completion),
    /// Parsed, valid, and every buffer translated (data slices in the scratch vector): ready
    /// to execute, with the status byte's slice.
    Ready(Request, VolatileSlice<'m, B>),
}

/// Phase one of a chain: find and translate its status byte, parse, validate and translate its
/// data buffers (into `slices`, cleared here). No side effect on the disk.
pub(crate) fn start_chain<'m, M: GuestMemory>(
    target: &Target<'_>,
    descs: &[Descriptor],
    mem: &'m M,
    policy: FaultPolicy,
    slices: &mut Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>,
) -> Started<'m, BS<'m, M::Bitmap>> {
    slices.clear();
    let status_addr = match status_address(descs) {
        Ok(addr) => addr,
        Err(err) => {
            debug!("dropping request: {err}");
            return Started::Finished(Completion::Dropped);
        }
    };
    match translate(mem, status_addr, 1, Permissions::Write, slices) {
        Ok(()) => {}
        Err(TranslateError::Fault(fault)) if policy == FaultPolicy::Retry => {
            return Started::Finished(Completion::Retry(fault))
        }
        Err(err) => {
            debug!(
                "dropping request, status byte unreachable: {}",
                err.into_request_error()
            );
            return Started::Finished(Completion::Dropped);
        }
    }
    let Some(status_slice) = slices.pop() else {
        return Started::Finished(Completion::Dropped);
    };
    match prepare(target, descs, status_addr, mem, slices) {
        Ok(req) => Started::Ready(req, status_slice),
        Err(TranslateError::Fault(fault)) if policy == FaultPolicy::Retry => {
            Started::Finished(Completion::Retry(fault))
        }
        Err(err) => Started::Finished(answer(&status_slice, Err(err.into_request_error()))),
    }
}

/// Write the status byte for `result` (bytes written into the driver's buffers, or the error)
/// and give the chain's used length.
pub(crate) fn answer<B: BitmapSlice>(
    status_slice: &VolatileSlice<'_, B>,
    result: Result<u64, RequestError>,
) -> Completion {
    let (status, written) = match result {
        Ok(written) => (status_ok(), written),
        Err(err) => {
            debug!("request failed: {err}");
            (err.status(), 0)
        }
    };
    if let Err(err) = status_slice.write_obj(status, 0) {
        debug!("dropping request, status byte not written: {err}");
        return Completion::Dropped;
    }
    Completion::Used(used_len(written))
}

/// The used length of a chain whose device wrote `written` data bytes and the status byte.
pub(crate) fn used_len(written: u64) -> u32 {
    u32::try_from(written.saturating_add(1)).unwrap_or(u32::MAX)
}

/// Complete a chain that cannot be parsed (but ends in `last`) with `VIRTIO_BLK_S_IOERR`.
pub(crate) fn fail_chain<'m, M: GuestMemory>(
    last: &[Descriptor],
    mem: &'m M,
    policy: FaultPolicy,
    slices: &mut Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>,
    err: ParseError,
) -> Completion {
    slices.clear();
    debug!("failing request: {err}");
    let Ok(status_addr) = status_address(last) else {
        return Completion::Dropped;
    };
    match translate(mem, status_addr, 1, Permissions::Write, slices) {
        Ok(()) => {}
        Err(TranslateError::Fault(fault)) if policy == FaultPolicy::Retry => {
            return Completion::Retry(fault)
        }
        Err(_) => return Completion::Dropped,
    }
    let status = RequestError::Malformed(err).status();
    match slices.pop().map(|s| s.write_obj(status, 0)) {
        Some(Ok(())) => Completion::Used(1),
        _ => Completion::Dropped,
    }
}

/// Answer a chain virtio-queue could not walk (`err`, with the `descs` it kept): IOERR through
/// the real last descriptor of a chain that is too long, or of one whose hand-made walk
/// ([`chain::rewalk`], into `walk`) ends; under Retry the IOMMU fault that stopped it; else
/// nothing can be answered and it is dropped.
#[allow(clippy::too_many_arguments)]
pub(crate) fn answer_unwalkable<'m, M: GuestMemory>(
    mem: &'m M,
    policy: FaultPolicy,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    descs: &[Descriptor],
    err: ParseError,
    slices: &mut Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>,
    walk: &mut Vec<Descriptor>,
) -> Completion {
    if let ParseError::TooLong { .. } = err {
        // Answer with IOERR through the chain's real last descriptor.
        let last = descs.last().copied();
        return fail_chain(last.as_slice(), mem, policy, slices, err);
    }
    match chain::rewalk(mem, desc_table, queue_size, head, walk) {
        Rewalk::Fault(fault) if policy == FaultPolicy::Retry => Completion::Retry(fault),
        Rewalk::End(last) => fail_chain(&[last], mem, policy, slices, err),
        Rewalk::Fault(_) | Rewalk::Broken => Completion::Dropped,
    }
}

/// Phase one: parse, validate and translate every data buffer. No side effects.
fn prepare<'m, M: GuestMemory>(
    target: &Target<'_>,
    descs: &[Descriptor],
    status: GuestAddress,
    mem: &'m M,
    slices: &mut Vec<VolatileSlice<'m, BS<'m, M::Bitmap>>>,
) -> Result<Request, TranslateError> {
    let req = parse(descs, status, mem).map_err(|err| {
        // The header is device-readable: an IOMMU error reading it is a fault like any other.
        let fault = match (&err, descs.first()) {
            (ParseError::HeaderRead(source), Some(first)) => Fault::from_error(
                source,
                first.addr(),
                usize::try_from(first.len()).unwrap_or(usize::MAX),
                Permissions::Read,
            ),
            _ => None,
        };
        match fault {
            Some(fault) => TranslateError::Fault(fault),
            None => TranslateError::Memory(RequestError::Malformed(err)),
        }
    })?;
    validate(&req, target).map_err(TranslateError::Memory)?;
    let (range, access) = req.data();
    translate_range(mem, descs, range, access, slices)?;
    Ok(req)
}

/// Phase two: run the request. Returns the bytes written into device-writable data buffers.
pub(crate) fn execute<B: BitmapSlice>(
    target: &Target<'_>,
    req: &Request,
    slices: &[VolatileSlice<'_, B>],
    segments: &mut Vec<Segment>,
) -> Result<u64, RequestError> {
    match req.kind {
        RequestType::In | RequestType::Out => {
            let (len, reading) = if req.kind == RequestType::In {
                (req.writable.len, true)
            } else {
                (req.readable.len, false)
            };
            let mut offset = check_range(req.sector, len, target.capacity)?;
            if bounce::needs_bounce(target.backend, slices) {
                bounce::transfer(target.backend, reading, offset, slices, len)
                    .map_err(RequestError::Backend)?;
                return Ok(if reading { len } else { 0 });
            }
            for slice in slices {
                let plain = erase_bitmap(slice);
                if reading {
                    target
                        .backend
                        .read_at(offset, &plain)
                        .map_err(RequestError::Backend)?;
                    slice.bitmap().mark_dirty(0, slice.len());
                } else {
                    target
                        .backend
                        .write_at(offset, &plain)
                        .map_err(RequestError::Backend)?;
                }
                offset = offset.saturating_add(u64::try_from(slice.len()).unwrap_or(u64::MAX));
            }
            Ok(if reading { len } else { 0 })
        }
        RequestType::Flush => target
            .backend
            .flush()
            .map(|()| 0)
            .map_err(RequestError::Backend),
        RequestType::GetId => {
            let mut id: &[u8] = target.serial;
            let mut written = 0u64;
            for slice in slices {
                let n = slice.len().min(id.len());
                let (head, tail) = id.split_at(n);
                slice.copy_from(head);
                id = tail;
                written = written.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            }
            Ok(written)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            read_segments(slices, segments);
            let discard = req.kind == RequestType::Discard;
            for seg in segments.iter() {
                validate_segment(seg, discard, target.capacity)?;
            }
            for seg in segments.iter() {
                let offset = seg.sector << SECTOR_SHIFT;
                let len = u64::from(seg.num_sectors) << SECTOR_SHIFT;
                let unmap = seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                if discard {
                    target.backend.discard(offset, len)
                } else {
                    target.backend.write_zeroes(offset, len, unmap)
                }
                .map_err(RequestError::Backend)?;
            }
            Ok(0)
        }
        RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
    }
}

fn validate_segment(seg: &Segment, discard: bool, capacity: u64) -> Result<(), RequestError> {
    if seg.flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
        return Err(RequestError::SegmentFlags(seg.flags));
    }
    if discard && seg.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
        return Err(RequestError::DiscardUnmap);
    }
    if seg.num_sectors > MAX_DISCARD_SECTORS {
        return Err(RequestError::SegmentTooLong(seg.num_sectors));
    }
    check_range(
        seg.sector,
        u64::from(seg.num_sectors) << SECTOR_SHIFT,
        capacity,
    )
    .map(|_| ())
}

/// Decode the whole segments held by `slices` into `segments`.
fn read_segments<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>], segments: &mut Vec<Segment>) {
    segments.clear();
    let mut buf = [0u8; SEGMENT_LEN];
    let mut filled = 0usize;
    for slice in slices {
        let mut rest = slice.clone();
        while !rest.is_empty() {
            let Some(dst) = buf.get_mut(filled..) else {
                return;
            };
            let n = rest.copy_to(dst);
            filled = filled.saturating_add(n);
            if filled == SEGMENT_LEN {
                segments.push(Segment::from_bytes(&buf));
                filled = 0;
            }
            match rest.offset(n) {
                Ok(r) if n > 0 => rest = r,
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        let ioerr = u8::try_from(VIRTIO_BLK_S_IOERR).unwrap();
        let unsupp = u8::try_from(VIRTIO_BLK_S_UNSUPP).unwrap();
        assert_eq!(RequestError::Unsupported(99).status(), unsupp);
        assert_eq!(RequestError::SegmentFlags(2).status(), unsupp);
        assert_eq!(RequestError::DiscardUnmap.status(), unsupp);
        assert_eq!(RequestError::TooManySegments(99).status(), unsupp);
        assert_eq!(RequestError::ReadOnly.status(), ioerr);
        assert_eq!(
            RequestError::OutOfRange { sector: 1, len: 1 }.status(),
            ioerr
        );
        assert_eq!(
            RequestError::Malformed(ParseError::NoStatus).status(),
            ioerr
        );
        assert_eq!(status_ok(), 0);
    }

    #[test]
    fn range_checks_the_end_and_both_overflows() {
        let out = |r: Result<u64, RequestError>, s: u64, l: u64| matches!(r, Err(RequestError::OutOfRange { sector, len }) if sector == s && len == l);
        assert_eq!(check_range(0, 4096, 4096).ok(), Some(0));
        assert_eq!(check_range(7, 512, 4096).ok(), Some(3584));
        assert!(out(check_range(7, 1024, 4096), 7, 1024));
        assert_eq!(check_range(8, 0, 4096).ok(), Some(4096));
        assert!(out(check_range(9, 0, 4096), 9, 0));
        // sector * 512 overflows.
        assert!(out(check_range(u64::MAX, 0, u64::MAX), u64::MAX, 0));
        // offset + len overflows.
        assert!(out(check_range(1, u64::MAX, u64::MAX), 1, u64::MAX));
    }

    #[test]
    fn block_alignment() {
        assert!(check_block_alignment(3, 512, 512).is_ok());
        assert!(check_block_alignment(8, 8192, 4096).is_ok());
        assert!(check_block_alignment(1, 4096, 4096).is_err());
        assert!(check_block_alignment(8, 512, 4096).is_err());
        assert!(check_block_alignment(u64::MAX, 4096, 4096).is_err());
        let ioerr = u8::try_from(VIRTIO_BLK_S_IOERR).unwrap();
        let e = check_block_alignment(1, 4096, 4096).unwrap_err();
        assert_eq!(e.status(), ioerr);
    }

    #[test]
    fn ranges() {
        assert_eq!(check_range(0, 512, 512).unwrap(), 0);
        assert!(check_range(1, 512, 512).is_err());
        assert!(check_range(u64::MAX, 0, 512).is_err());
        assert!(check_range(0, u64::MAX, 512).is_err());
    }
}
