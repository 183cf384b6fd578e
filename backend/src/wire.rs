//! The 12-byte frame header shared by both doors (PROTOCOL.md, "Framing"),
//! and frame read/write with descriptors (SCM_RIGHTS) over a unix stream.
//!
//! This is the only module that parses header bytes. Each door passes its
//! own [`FlagPolicy`]: the device-cdev protocol allows only the version and
//! REPLY bits, vhost-user also allows NEED_REPLY.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use libc::{c_void, iovec};
use vcdev_iommu::Errno;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Bytes in a header.
pub const HEADER_LEN: usize = 12;
/// Bits 0-1 of `flags`: the protocol version.
pub const FLAG_VERSION_MASK: u32 = 0x3;
/// The only version spoken.
pub const VERSION: u32 = 1;
/// `flags` bit: this message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// `flags` bit (vhost-user only): the sender wants an ack.
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// The largest payload accepted (1 MiB).
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// The most descriptors one message may carry.
pub const MAX_FDS: usize = 32;

/// Which flag bits (besides the version) a door accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlagPolicy {
    allowed: u32,
}

impl FlagPolicy {
    /// The device-cdev door: REPLY only.
    pub const CDEV: FlagPolicy = FlagPolicy {
        allowed: FLAG_REPLY,
    };
    /// The vhost-user door: REPLY and NEED_REPLY.
    pub const VHOST_USER: FlagPolicy = FlagPolicy {
        allowed: FLAG_REPLY | FLAG_NEED_REPLY,
    };

    /// Checks `flags` against the version and the allowed bits.
    pub fn check(self, flags: u32) -> Result<(), WireError> {
        if flags & FLAG_VERSION_MASK != VERSION {
            return Err(WireError::Version(flags & FLAG_VERSION_MASK));
        }
        let unknown = flags & !(FLAG_VERSION_MASK | self.allowed);
        if unknown != 0 {
            return Err(WireError::Flags(unknown));
        }
        Ok(())
    }
}

/// Errors of framing. Every one of them is a protocol violation or a broken
/// socket: the connection (or file) ends.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Reading from the socket failed.
    #[error("Failed to read a frame")]
    Read(#[source] io::Error),
    /// Writing to the socket failed.
    #[error("Failed to write a frame")]
    Write(#[source] io::Error),
    /// The peer closed the connection in the middle of a frame.
    #[error("Connection closed in the middle of a frame")]
    Truncated,
    /// The version bits are not 1.
    #[error("Bad protocol version {0}")]
    Version(u32),
    /// Flag bits the door does not allow.
    #[error("Unknown flag bits {0:#x}")]
    Flags(u32),
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("Payload of {0} bytes exceeds the 1 MiB cap")]
    Oversized(u32),
    /// More descriptors than [`MAX_FDS`], or descriptors not on the header.
    #[error("Too many or misplaced descriptors")]
    Fds,
}

impl WireError {
    /// The errno for this error.
    pub fn errno(&self) -> Errno {
        match self {
            WireError::Read(e) | WireError::Write(e) => Errno::from_io(e),
            WireError::Truncated => Errno(libc::EPIPE),
            WireError::Version(_) | WireError::Flags(_) | WireError::Fds => Errno::EINVAL,
            WireError::Oversized(_) => Errno(libc::EMSGSIZE),
        }
    }
}

/// The 12-byte header, little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameHeader {
    /// The request code.
    pub request: u32,
    /// Version and flag bits.
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

impl FrameHeader {
    /// A request header (version 1, plus `flags`).
    pub fn request(request: u32, flags: u32, size: u32) -> FrameHeader {
        FrameHeader {
            request,
            flags: VERSION | flags,
            size,
        }
    }

    /// The reply header for this request, with `size` payload bytes.
    pub fn reply(&self, size: u32) -> FrameHeader {
        FrameHeader {
            request: self.request,
            flags: VERSION | FLAG_REPLY,
            size,
        }
    }

    /// Whether the sender asked for an ack.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Decodes a header (no checks: see [`FrameHeader::check`]).
    pub fn decode(b: &[u8; HEADER_LEN]) -> FrameHeader {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        FrameHeader {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    /// Checks flags (per `policy`) and the payload cap.
    pub fn check(&self, policy: FlagPolicy) -> Result<(), WireError> {
        policy.check(self.flags)?;
        if self.size > MAX_PAYLOAD {
            return Err(WireError::Oversized(self.size));
        }
        Ok(())
    }
}

/// One received message.
#[derive(Debug)]
pub struct Frame {
    /// Its header (checked).
    pub header: FrameHeader,
    /// Exactly `header.size` bytes.
    pub payload: Vec<u8>,
    /// The descriptors that came with the header.
    pub fds: Vec<OwnedFd>,
}

/// Receives bytes into `buf` and up to [`MAX_FDS`] descriptors (more:
/// [`WireError::Fds`]).
fn recv_some(sock: &UnixStream, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), WireError> {
    let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    }];
    loop {
        // SAFETY: the iovec points at `buf`, which we borrow mutably for the
        // call and which may hold arbitrary bytes.
        match unsafe { sock.recv_with_fds(&mut iov, &mut raw) } {
            Ok((n, nfds)) => {
                let fds = raw
                    .iter()
                    .take(nfds)
                    // SAFETY: recvmsg just installed these descriptors in our
                    // table; nobody else owns them.
                    .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
                    .collect();
                return Ok((n, fds));
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            // The control buffer was too small (MSG_CTRUNC).
            Err(e) if e.errno() == libc::ENOBUFS => return Err(WireError::Fds),
            Err(e) => return Err(WireError::Read(io::Error::from_raw_os_error(e.errno()))),
        }
    }
}

/// Fills `buf` from `sock`: the middle of a frame, where descriptors are
/// misplaced and the end of the stream truncates the frame.
fn recv_rest(sock: &UnixStream, buf: &mut [u8]) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        let (n, fds) = recv_some(sock, &mut buf[got..])?;
        if !fds.is_empty() {
            return Err(WireError::Fds);
        }
        if n == 0 {
            return Err(WireError::Truncated);
        }
        got += n;
    }
    Ok(())
}

/// Reads one frame. `Ok(None)` when the peer closed the connection between
/// frames. Descriptors are accepted only with the header's bytes.
pub fn read_frame(sock: &UnixStream, policy: FlagPolicy) -> Result<Option<Frame>, WireError> {
    let mut hdr = [0u8; HEADER_LEN];
    let (got, fds) = recv_some(sock, &mut hdr)?;
    if got == 0 {
        return Ok(None);
    }
    recv_rest(sock, &mut hdr[got..])?;
    let header = FrameHeader::decode(&hdr);
    header.check(policy)?;
    // size <= MAX_PAYLOAD (1 MiB) was checked: the allocation is bounded.
    let mut payload = vec![0u8; header.size as usize];
    recv_rest(sock, &mut payload)?;
    Ok(Some(Frame {
        header,
        payload,
        fds,
    }))
}

/// Bytes a [`FrameReader`] reads at a time: most requests of either door
/// fit, often several; a larger one is read straight into its payload.
pub const READ_BUF: usize = 4096;

/// Reads frames through a buffer, for the server side of a connection that
/// it alone reads: one `recvmsg` brings a whole frame (and whatever follows
/// it), where [`read_frame`] takes two calls, header then payload. Under a
/// strict guest IOMMU that is a third of the system calls of each IOTLB
/// message.
///
/// Where descriptors belong: Linux ends a `recvmsg` on a unix stream right
/// after the first message (`sendmsg`) that carried descriptors, and hands
/// them out with that message's first bytes. So the descriptors of a read
/// belong to the frame that holds the read's last byte, and that frame
/// must have begun in this read: descriptors received with the middle of a
/// frame, not its header, are misplaced ([`WireError::Fds`]), as they are
/// for [`read_frame`].
#[derive(Debug)]
pub struct FrameReader {
    buf: Box<[u8]>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The stream offset of `buf[start]`.
    offset: u64,
    /// Descriptors received for frames not yet returned, by the stream
    /// offset of each frame's first byte, in stream order.
    fds: std::collections::VecDeque<(u64, Vec<OwnedFd>)>,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            offset: 0,
            fds: std::collections::VecDeque::new(),
        }
    }
}

impl FrameReader {
    /// A reader with an empty buffer.
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// Whether bytes were read ahead that no frame returned yet holds: the
    /// next [`FrameReader::read`] may not need the socket to be readable.
    pub fn buffered(&self) -> bool {
        self.start < self.end
    }

    /// Reads one frame from `sock`, which no one else reads. `Ok(None)`
    /// when the peer closed the connection between frames.
    pub fn read(
        &mut self,
        sock: &UnixStream,
        policy: FlagPolicy,
    ) -> Result<Option<Frame>, WireError> {
        loop {
            if let Some(frame) = self.take(sock, policy)? {
                return Ok(Some(frame));
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let from = self.end;
            let (n, fds) = recv_some(sock, &mut self.buf[from..])?;
            if n == 0 {
                return if self.buffered() {
                    Err(WireError::Truncated)
                } else {
                    Ok(None)
                };
            }
            self.end += n;
            if !fds.is_empty() {
                let owner = self.frame_holding(self.end - 1);
                if owner < from {
                    return Err(WireError::Fds);
                }
                self.fds.push_back((self.stream_offset(owner), fds));
            }
        }
    }

    fn stream_offset(&self, at: usize) -> u64 {
        self.offset + (at - self.start) as u64
    }

    /// Where the frame that holds buffer byte `at` begins (`at` is
    /// buffered).
    fn frame_holding(&self, at: usize) -> usize {
        let mut pos = self.start;
        while let Some(header) = self.header_at(pos) {
            let len = HEADER_LEN as u64 + u64::from(header.size);
            match usize::try_from(pos as u64 + len) {
                Ok(next) if next <= at => pos = next,
                _ => break,
            }
        }
        pos
    }

    /// The header at buffer byte `pos`, if all of it was read (unchecked).
    fn header_at(&self, pos: usize) -> Option<FrameHeader> {
        let end = pos.checked_add(HEADER_LEN).filter(|&e| e <= self.end)?;
        let b: &[u8; HEADER_LEN] = self.buf[pos..end].try_into().ok()?;
        Some(FrameHeader::decode(b))
    }

    /// The frame at the front of the buffer, once whole; a frame larger
    /// than the buffer is read the rest of the way into its payload.
    fn take(&mut self, sock: &UnixStream, policy: FlagPolicy) -> Result<Option<Frame>, WireError> {
        let Some(header) = self.header_at(self.start) else {
            return Ok(None);
        };
        header.check(policy)?;
        let size = header.size as usize;
        let body = self.start + HEADER_LEN;
        let have = self.end - body;
        if have < size && HEADER_LEN + size <= self.buf.len() {
            // The rest fits in the buffer: read on.
            return Ok(None);
        }
        let here = self.offset;
        let fds = match self.fds.front() {
            Some((at, _)) if *at == here => self.fds.pop_front().map(|(_, f)| f),
            _ => None,
        }
        .unwrap_or_default();
        // size <= MAX_PAYLOAD (1 MiB) was checked: the allocation is bounded.
        let mut payload = vec![0u8; size];
        let now = have.min(size);
        payload[..now].copy_from_slice(&self.buf[body..body + now]);
        self.start = body + now;
        self.offset += (HEADER_LEN + now) as u64;
        // A frame larger than the buffer: the rest goes straight into its
        // payload, and the reads stop at its end.
        recv_rest(sock, &mut payload[now..])?;
        self.offset += (size - now) as u64;
        Ok(Some(Frame {
            header,
            payload,
            fds,
        }))
    }
}

/// Writes one frame: header and payload in one message, `fds` with it.
pub fn write_frame(
    sock: &UnixStream,
    header: &FrameHeader,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), WireError> {
    if fds.len() > MAX_FDS {
        return Err(WireError::Fds);
    }
    if payload.len() > MAX_PAYLOAD as usize || payload.len() != header.size as usize {
        return Err(WireError::Oversized(header.size));
    }
    let hdr = header.encode();
    let sent = if fds.is_empty() {
        0
    } else {
        let bufs: [&[u8]; 2] = [&hdr, payload];
        sock.send_with_fds(&bufs[..], fds)
            .map_err(|e| WireError::Write(io::Error::from_raw_os_error(e.errno())))?
    };
    // One write of header and payload together; a small frame (every ack
    // and IOTLB reply) is gathered on the stack.
    let mut small = [0u8; HEADER_LEN + SMALL_PAYLOAD];
    let mut large = Vec::new();
    let all: &mut [u8] = if payload.len() <= SMALL_PAYLOAD {
        &mut small[..HEADER_LEN + payload.len()]
    } else {
        large.resize(HEADER_LEN + payload.len(), 0);
        &mut large
    };
    all[..HEADER_LEN].copy_from_slice(&hdr);
    all[HEADER_LEN..].copy_from_slice(payload);
    let mut w = sock;
    w.write_all(all.get(sent..).unwrap_or_default())
        .map_err(WireError::Write)
}

/// The largest payload [`write_frame`] gathers without allocating.
const SMALL_PAYLOAD: usize = 256;

/// How long a reply may wait for its peer to make room: a peer that stops
/// reading its replies for this long has its connection (or file) closed,
/// so it ties up nothing but its own connection, and not for ever.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The raw descriptor of a socket, for logs.
pub fn fd_of(sock: &UnixStream) -> RawFd {
    sock.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_policy() {
        let h = FrameHeader::request(5, FLAG_NEED_REPLY, 40);
        let b = h.encode();
        assert_eq!(b, [5, 0, 0, 0, 9, 0, 0, 0, 40, 0, 0, 0]);
        let d = FrameHeader::decode(&b);
        assert_eq!(d, h);
        assert!(d.check(FlagPolicy::VHOST_USER).is_ok());
        assert!(matches!(
            d.check(FlagPolicy::CDEV),
            Err(WireError::Flags(FLAG_NEED_REPLY))
        ));
        assert!(matches!(
            FrameHeader::request(1, 0, MAX_PAYLOAD + 1).check(FlagPolicy::CDEV),
            Err(WireError::Oversized(_))
        ));
        let bad = FrameHeader {
            request: 1,
            flags: 2,
            size: 0,
        };
        assert!(matches!(
            bad.check(FlagPolicy::VHOST_USER),
            Err(WireError::Version(2))
        ));
        assert_eq!(h.reply(8).flags, VERSION | FLAG_REPLY);
    }

    #[test]
    fn frames_with_fds_cross_a_socketpair() {
        let (a, b) = UnixStream::pair().unwrap();
        let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let h = FrameHeader::request(12, 0, 8);
        write_frame(&a, &h, &7u64.to_le_bytes(), &[ev.as_raw_fd()]).unwrap();
        write_frame(&a, &FrameHeader::request(3, 0, 0), &[], &[]).unwrap();
        let f = read_frame(&b, FlagPolicy::VHOST_USER).unwrap().unwrap();
        assert_eq!(f.header, h);
        assert_eq!(f.payload, 7u64.to_le_bytes());
        assert_eq!(f.fds.len(), 1);
        let f = read_frame(&b, FlagPolicy::VHOST_USER).unwrap().unwrap();
        assert_eq!((f.header.request, f.fds.len()), (3, 0));
        drop(a);
        assert!(read_frame(&b, FlagPolicy::VHOST_USER).unwrap().is_none());
    }

    #[test]
    fn short_frame_and_garbage_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
        drop(a);
        assert!(matches!(
            read_frame(&b, FlagPolicy::VHOST_USER),
            Err(WireError::Truncated)
        ));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[0xff; 32]).unwrap();
        assert!(read_frame(&b, FlagPolicy::VHOST_USER).is_err());
    }

    /// A distinct eventfd per frame, its counter set to `tag`, to tell
    /// which descriptors came with which frame.
    fn tagged(tag: u64) -> vmm_sys_util::eventfd::EventFd {
        let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        ev.write(tag).unwrap();
        ev
    }

    fn tag_of(fd: OwnedFd) -> u64 {
        // SAFETY: `fd` is an eventfd received over the socket, owned here.
        unsafe {
            vmm_sys_util::eventfd::EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
        }
        .read()
        .unwrap()
    }

    #[test]
    fn the_frame_reader_takes_several_frames_in_one_read_each_with_its_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let evs = [tagged(11), tagged(22), tagged(33)];
        let raw = |i: usize| [evs[i].as_raw_fd()];
        // No descriptors, then one, none, two (the last two frames in one
        // read at most: the kernel ends a read after descriptors).
        write_frame(&a, &FrameHeader::request(1, 0, 3), b"abc", &[]).unwrap();
        write_frame(&a, &FrameHeader::request(2, 0, 8), &[2; 8], &raw(0)).unwrap();
        write_frame(&a, &FrameHeader::request(3, 0, 0), &[], &[]).unwrap();
        write_frame(
            &a,
            &FrameHeader::request(4, 0, 1),
            &[4],
            &[evs[1].as_raw_fd(), evs[2].as_raw_fd()],
        )
        .unwrap();
        let mut r = FrameReader::new();
        let f = r.read(&b, FlagPolicy::VHOST_USER).unwrap().unwrap();
        assert_eq!(
            (f.header.request, &f.payload[..], f.fds.len()),
            (1, &b"abc"[..], 0)
        );
        assert!(r.buffered(), "the second frame came in the same read");
        let f = r.read(&b, FlagPolicy::VHOST_USER).unwrap().unwrap();
        assert_eq!((f.header.request, f.payload.clone()), (2, vec![2; 8]));
        assert_eq!(f.fds.into_iter().map(tag_of).collect::<Vec<_>>(), [11]);
        let f = r.read(&b, FlagPolicy::VHOST_USER).unwrap().unwrap();
        assert_eq!((f.header.request, f.fds.len()), (3, 0));
        let f = r.read(&b, FlagPolicy::VHOST_USER).unwrap().unwrap();
        assert_eq!(f.header.request, 4);
        assert_eq!(f.fds.into_iter().map(tag_of).collect::<Vec<_>>(), [22, 33]);
        assert!(!r.buffered());
        drop(a);
        assert!(r.read(&b, FlagPolicy::VHOST_USER).unwrap().is_none());
    }

    #[test]
    fn the_frame_reader_reads_a_frame_larger_than_its_buffer_and_what_follows() {
        let (a, b) = UnixStream::pair().unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let ev = tagged(5);
        let w = {
            let big = big.clone();
            std::thread::spawn(move || {
                let h = FrameHeader::request(9, 0, big.len() as u32);
                write_frame(&a, &h, &big, &[ev.as_raw_fd()]).unwrap();
                write_frame(&a, &FrameHeader::request(10, 0, 2), &[1, 2], &[]).unwrap();
            })
        };
        let mut r = FrameReader::new();
        let f = r.read(&b, FlagPolicy::CDEV).unwrap().unwrap();
        assert_eq!(f.header.request, 9);
        assert!(f.payload == big, "the large payload arrived intact");
        assert_eq!(f.fds.into_iter().map(tag_of).collect::<Vec<_>>(), [5]);
        let f = r.read(&b, FlagPolicy::CDEV).unwrap().unwrap();
        assert_eq!((f.header.request, &f.payload[..]), (10, &[1u8, 2][..]));
        w.join().unwrap();
        assert!(r.read(&b, FlagPolicy::CDEV).unwrap().is_none());
    }

    #[test]
    fn descriptors_with_a_payload_and_not_its_header_are_misplaced() {
        let (a, b) = UnixStream::pair().unwrap();
        let ev = tagged(1);
        (&a).write_all(&FrameHeader::request(1, 0, 4).encode())
            .unwrap();
        let mut r = FrameReader::new();
        // The header alone first, so that the payload comes in a read of
        // its own.
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            a.send_with_fds(&[&[0u8; 4][..]], &[ev.as_raw_fd()])
                .unwrap();
            a
        });
        assert!(matches!(r.read(&b, FlagPolicy::CDEV), Err(WireError::Fds)));
        drop(t.join().unwrap());
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;
        use std::os::fd::AsRawFd;
        use vmm_sys_util::eventfd::EventFd;

        /// A payload size around the interesting values: small, at and
        /// past the cap, and anything.
        fn size() -> impl Strategy<Value = u32> {
            prop_oneof![
                4 => 0u32..64,
                1 => Just(MAX_PAYLOAD - 1),
                1 => Just(MAX_PAYLOAD),
                1 => Just(MAX_PAYLOAD + 1),
                1 => Just(u32::MAX),
                1 => any::<u32>(),
            ]
        }

        /// Flags: mostly valid for one door or the other, sometimes anything.
        fn flags() -> impl Strategy<Value = u32> {
            prop_oneof![
                3 => prop::sample::select(vec![1u32, 1 | FLAG_REPLY, 1 | FLAG_NEED_REPLY, 1 | FLAG_REPLY | FLAG_NEED_REPLY]),
                1 => 0u32..16,
                1 => any::<u32>(),
            ]
        }

        fn policy() -> impl Strategy<Value = FlagPolicy> {
            prop::sample::select(vec![FlagPolicy::CDEV, FlagPolicy::VHOST_USER])
        }

        /// Writes `bytes` (with `fds` on the first chunk) from a thread,
        /// then closes; the reader may stop early (EPIPE is fine).
        fn send(
            a: UnixStream,
            first: Vec<u8>,
            rest: Vec<u8>,
            fds: Vec<EventFd>,
        ) -> std::thread::JoinHandle<()> {
            std::thread::spawn(move || {
                let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                let sent = if raw.is_empty() {
                    (&a).write_all(&first).map(|()| first.len())
                } else {
                    a.send_with_fds(&[&first[..]], &raw)
                        .map_err(|e| io::Error::from_raw_os_error(e.errno()))
                };
                if let Ok(n) = sent {
                    let _ = (&a).write_all(first.get(n..).unwrap_or_default());
                    let _ = (&a).write_all(&rest);
                }
            })
        }

        /// [`read_frame`], or a [`FrameReader`]: both give the same answers.
        enum Reader {
            Plain,
            Buffered(FrameReader),
        }

        impl Reader {
            fn new(buffered: bool) -> Reader {
                if buffered {
                    Reader::Buffered(FrameReader::new())
                } else {
                    Reader::Plain
                }
            }

            fn read(
                &mut self,
                b: &UnixStream,
                policy: FlagPolicy,
            ) -> Result<Option<Frame>, WireError> {
                match self {
                    Reader::Plain => read_frame(b, policy),
                    Reader::Buffered(r) => r.read(b, policy),
                }
            }
        }

        /// Reads frames until EOF or an error; none may exceed the cap.
        fn drain(b: &UnixStream, policy: FlagPolicy, r: &mut Reader) {
            while let Ok(Some(f)) = r.read(b, policy) {
                assert!(f.payload.len() <= MAX_PAYLOAD as usize);
                assert!(f.fds.len() <= MAX_FDS);
                assert_eq!(f.payload.len(), f.header.size as usize);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

            /// Random byte streams: frames or a clean error, never a panic
            /// or a payload past the cap.
            #[test]
            fn random_streams_are_frames_or_errors(
                bytes in prop::collection::vec(any::<u8>(), 0..2048),
                policy in policy(),
                buffered in any::<bool>(),
            ) {
                let (a, b) = UnixStream::pair().unwrap();
                let t = send(a, bytes, Vec::new(), Vec::new());
                drain(&b, policy, &mut Reader::new(buffered));
                t.join().unwrap();
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

            /// One mutated frame (header fields, sizes up to and past the
            /// cap, a body shorter or longer than `size`, 0..40 descriptors):
            /// exactly the answer PROTOCOL.md's "Framing" gives, then
            /// whatever follows reads cleanly too.
            #[test]
            fn mutated_frames_get_the_framing_answer(
                request in any::<u32>(),
                flags in flags(),
                size in size(),
                delta in -8i64..8,
                nfds in prop_oneof![3 => 0usize..4, 1 => 28usize..40],
                policy in policy(),
                buffered in any::<bool>(),
            ) {
                let (a, b) = UnixStream::pair().unwrap();
                let mut reader = Reader::new(buffered);
                let hdr = FrameHeader { request, flags, size };
                // Never write more than the cap and a bit: the reader must
                // refuse a larger size from the header alone.
                let want = i64::from(size.min(MAX_PAYLOAD + 16));
                let body_len = usize::try_from((want + delta).max(0)).unwrap();
                let body: Vec<u8> = (0..body_len).map(|i| (i % 251) as u8).collect();
                let fds: Vec<EventFd> = (0..nfds).map(|_| EventFd::new(0).unwrap()).collect();
                let t = send(a, hdr.encode().to_vec(), body.clone(), fds);
                let r = reader.read(&b, policy);
                let flags_ok = policy.check(flags).is_ok();
                let size_ok = size <= MAX_PAYLOAD;
                let whole = body_len >= size as usize;
                match r {
                    Ok(Some(f)) => {
                        prop_assert!(nfds <= MAX_FDS && flags_ok && size_ok && whole);
                        prop_assert_eq!(f.header, hdr);
                        prop_assert_eq!(f.fds.len(), nfds);
                        prop_assert_eq!(&f.payload[..], &body[..size as usize]);
                    }
                    Ok(None) => prop_assert!(false, "EOF before a whole header"),
                    Err(WireError::Fds) => prop_assert!(nfds > MAX_FDS),
                    Err(WireError::Version(_)) | Err(WireError::Flags(_)) => {
                        prop_assert!(nfds <= MAX_FDS && !flags_ok)
                    }
                    Err(WireError::Oversized(s)) => {
                        prop_assert!(nfds <= MAX_FDS && flags_ok && !size_ok);
                        prop_assert_eq!(s, size);
                    }
                    Err(WireError::Truncated) => {
                        prop_assert!(nfds <= MAX_FDS && flags_ok && size_ok && !whole)
                    }
                    Err(e) => prop_assert!(false, "unexpected {e:?}"),
                }
                drain(&b, policy, &mut reader);
                drop(b);
                t.join().unwrap();
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            /// A stream of valid frames, each with 0-3 descriptors on its
            /// own message, some larger than the buffer: the buffered
            /// reader returns each with its payload and exactly its own
            /// descriptors, however the reads fall.
            #[test]
            fn the_frame_reader_gives_each_frame_its_own_descriptors(
                frames in prop::collection::vec((0usize..6000, 0usize..4), 1..24),
                pause in any::<bool>(),
            ) {
                let (a, b) = UnixStream::pair().unwrap();
                let sent = frames.clone();
                let t = std::thread::spawn(move || {
                    for (i, (len, nfds)) in sent.into_iter().enumerate() {
                        let evs: Vec<EventFd> = (0..nfds).map(|k| super::tagged((i * 4 + k + 1) as u64)).collect();
                        let raw: Vec<RawFd> = evs.iter().map(AsRawFd::as_raw_fd).collect();
                        let payload: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
                        let h = FrameHeader::request(i as u32, 0, len as u32);
                        write_frame(&a, &h, &payload, &raw).unwrap();
                        if pause && i % 3 == 0 {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                    }
                });
                let mut r = FrameReader::new();
                for (i, (len, nfds)) in frames.iter().copied().enumerate() {
                    let f = r.read(&b, FlagPolicy::CDEV).unwrap().unwrap();
                    prop_assert_eq!(f.header.request, i as u32);
                    let want: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
                    prop_assert!(f.payload == want, "frame {} payload", i);
                    let tags: Vec<u64> = f.fds.into_iter().map(super::tag_of).collect();
                    let want: Vec<u64> = (0..nfds).map(|k| (i * 4 + k + 1) as u64).collect();
                    prop_assert_eq!(tags, want);
                }
                t.join().unwrap();
                prop_assert!(r.read(&b, FlagPolicy::CDEV).unwrap().is_none());
            }
        }
    }
}
