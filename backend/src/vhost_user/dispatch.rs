//! The vhost-user request table, in the style of the cdev door's
//! [`crate::cdev::dispatch`] (and the kernel's `iommufd_ioctl_ops`): one
//! [`Op`] per request, giving its code (vhost's [`FrontendReq`]), its
//! payload shape, the descriptors it takes, the protocol feature it needs,
//! whether it replies itself, and its handler.
//!
//! The rules are applied here, once, in this order ([`check`]):
//!
//! 1. descriptors on a request that takes none: the connection ends;
//! 2. a protocol feature the request needs and the frontend did not
//!    negotiate: refused (`EOPNOTSUPP`);
//! 3. a payload of the wrong shape (not empty, not exactly its struct, a
//!    head too short or a tail of the wrong length): the connection ends;
//! 4. a wrong number of descriptors on a request that takes one: the
//!    connection ends.
//!
//! A request whose descriptor count depends on its payload
//! ([`Fds::Counted`]: SET_MEM_TABLE, SET_VRING_KICK/CALL/ERR) checks it in
//! its handler, against what the payload says.

use std::mem::size_of;
use std::os::fd::OwnedFd;

use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::ByteValued;

use super::conn::ConnError;
use crate::pod::pod_from;

/// The length of a variable tail, read from the head that precedes it, or
/// the refusal of a head whose values are out of range.
pub type TailLen = fn(&[u8]) -> Result<usize, ConnError>;

/// What a request's payload is.
#[derive(Clone, Copy)]
pub enum Payload {
    /// Nothing.
    Empty,
    /// Exactly this many bytes (one struct).
    Exact(usize),
    /// A head of this many bytes, then a tail whose length the head gives.
    Head {
        /// `size_of` the head.
        head: usize,
        /// The tail's length, from the head.
        tail: TailLen,
    },
}

impl Payload {
    /// Exactly one `T`.
    pub const fn of<T>() -> Payload {
        Payload::Exact(size_of::<T>())
    }

    /// A `T`, then the tail `tail` reads from it.
    pub const fn head<T>(tail: TailLen) -> Payload {
        Payload::Head {
            head: size_of::<T>(),
            tail,
        }
    }
}

/// The descriptors a request takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fds {
    /// None.
    None,
    /// Exactly one.
    One,
    /// None or one (REM_MEM_REG: QEMU sends the region's fd, which is not
    /// needed).
    AtMostOne,
    /// As many as the payload says: the handler checks.
    Counted,
}

/// A request's handler on connection state `C`.
pub type Handler<C> = fn(&mut C, Msg) -> Result<Reply, ConnError>;

/// One request the connection answers.
pub struct Op<C> {
    /// The request code.
    pub req: FrontendReq,
    /// Its payload.
    pub payload: Payload,
    /// Its descriptors.
    pub fds: Fds,
    /// The protocol feature it needs negotiated, if any.
    pub needs: Option<VhostUserProtocolFeatures>,
    /// Whether it has a reply of its own (a GET): any failure then ends the
    /// connection, as no ack can stand for the reply.
    pub replies: bool,
    /// The handler.
    pub handler: Handler<C>,
}

impl<C> Op<C> {
    /// A request without a reply of its own, needing no feature.
    pub const fn new(req: FrontendReq, payload: Payload, fds: Fds, handler: Handler<C>) -> Op<C> {
        Op {
            req,
            payload,
            fds,
            needs: None,
            replies: false,
            handler,
        }
    }

    /// The same, answered with a reply of its own.
    pub const fn get(req: FrontendReq, payload: Payload, handler: Handler<C>) -> Op<C> {
        Op {
            replies: true,
            ..Op::new(req, payload, Fds::None, handler)
        }
    }

    /// The same, needing protocol feature `f`.
    pub const fn needs(self, f: VhostUserProtocolFeatures) -> Op<C> {
        Op {
            needs: Some(f),
            ..self
        }
    }
}

/// A request that passed the table's checks, handed to its handler.
#[derive(Debug)]
pub struct Msg {
    /// The request.
    pub req: FrontendReq,
    /// Its payload, of the shape the table gives.
    pub payload: Vec<u8>,
    /// Its descriptors, as many as the table allows.
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    /// The payload's first `size_of::<T>()` bytes as a `T` (copied: the
    /// payload need not be aligned).
    pub fn get<T: ByteValued + Default>(&self) -> T {
        pod_from(&self.payload)
    }

    /// The payload after its head `T`.
    pub fn tail<T>(&self) -> &[u8] {
        self.payload.get(size_of::<T>()..).unwrap_or_default()
    }

    /// Takes the first descriptor, if any came.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        (!self.fds.is_empty()).then(|| self.fds.remove(0))
    }

    /// The one descriptor of a request that takes exactly one.
    pub fn one_fd(&mut self) -> Result<OwnedFd, ConnError> {
        self.expect_fds(1)?;
        self.take_fd().ok_or(ConnError::Fds {
            req: self.req,
            got: 0,
            want: 1,
        })
    }

    /// Refuses the message unless it carries exactly `want` descriptors.
    pub fn expect_fds(&self, want: usize) -> Result<(), ConnError> {
        if self.fds.len() == want {
            Ok(())
        } else {
            Err(ConnError::Fds {
                req: self.req,
                got: self.fds.len(),
                want,
            })
        }
    }
}

/// How to answer a request.
#[derive(Debug)]
pub enum Reply {
    /// No reply of its own: an ack if the frontend asked for one.
    Ack,
    /// A reply with this payload.
    Payload(Vec<u8>),
    /// A reply with this payload and this descriptor (GET_INFLIGHT_FD).
    PayloadFd(Vec<u8>, OwnedFd),
}

/// Replies are equal when their payloads are and their descriptors are the
/// same descriptor numbers (for tests).
impl PartialEq for Reply {
    fn eq(&self, other: &Reply) -> bool {
        use std::os::fd::AsRawFd;
        match (self, other) {
            (Reply::Ack, Reply::Ack) => true,
            (Reply::Payload(a), Reply::Payload(b)) => a == b,
            (Reply::PayloadFd(a, f), Reply::PayloadFd(b, g)) => {
                a == b && f.as_raw_fd() == g.as_raw_fd()
            }
            _ => false,
        }
    }
}

impl Eq for Reply {}

/// Finds the entry of `req`.
pub fn find<C>(ops: &[Op<C>], req: FrontendReq) -> Option<&Op<C>> {
    ops.iter().find(|o| o.req == req)
}

/// Applies the table's rules (see the module doc) to `msg` for `op`, with
/// `protocol` the negotiated protocol features.
pub fn check<C>(
    op: &Op<C>,
    protocol: VhostUserProtocolFeatures,
    msg: &Msg,
) -> Result<(), ConnError> {
    if op.fds == Fds::None {
        msg.expect_fds(0)?;
    }
    if let Some(f) = op.needs {
        if !protocol.contains(f) {
            return Err(ConnError::Unsupported(op.req));
        }
    }
    let want = match op.payload {
        Payload::Empty => 0,
        Payload::Exact(n) => n,
        Payload::Head { head, tail } => {
            let Some(h) = msg.payload.get(..head) else {
                return Err(size_error(msg, head));
            };
            tail(h)?.saturating_add(head)
        }
    };
    if msg.payload.len() != want {
        return Err(size_error(msg, want));
    }
    match op.fds {
        Fds::One => msg.expect_fds(1),
        Fds::AtMostOne if msg.fds.len() > 1 => Err(ConnError::Fds {
            req: msg.req,
            got: msg.fds.len(),
            want: 1,
        }),
        _ => Ok(()),
    }
}

fn size_error(msg: &Msg, want: usize) -> ConnError {
    ConnError::PayloadSize {
        req: msg.req,
        got: msg.payload.len(),
        want,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type P = VhostUserProtocolFeatures;

    fn ok(_: &mut (), _: Msg) -> Result<Reply, ConnError> {
        Ok(Reply::Ack)
    }

    /// A tail as long as the head's first byte; a head byte of 0xff is
    /// out of range.
    fn tail(h: &[u8]) -> Result<usize, ConnError> {
        match h.first() {
            Some(0xff) => Err(ConnError::Unsupported(FrontendReq::SET_CONFIG)),
            b => Ok(usize::from(b.copied().unwrap_or(0))),
        }
    }

    fn msg(req: FrontendReq, payload: &[u8], nfds: usize) -> Msg {
        let fds = (0..nfds)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect();
        Msg {
            req,
            payload: payload.to_vec(),
            fds,
        }
    }

    const OPS: &[Op<()>] = &[
        Op::new(FrontendReq::SET_OWNER, Payload::Empty, Fds::None, ok),
        Op::new(
            FrontendReq::SET_FEATURES,
            Payload::of::<u64>(),
            Fds::None,
            ok,
        ),
        Op::new(FrontendReq::ADD_MEM_REG, Payload::of::<u64>(), Fds::One, ok)
            .needs(P::CONFIGURE_MEM_SLOTS),
        Op::new(FrontendReq::REM_MEM_REG, Payload::Empty, Fds::AtMostOne, ok),
        Op::new(
            FrontendReq::SET_CONFIG,
            Payload::head::<u16>(tail),
            Fds::None,
            ok,
        ),
    ];

    fn run(req: FrontendReq, payload: &[u8], nfds: usize, protocol: P) -> Result<(), ConnError> {
        let op = find(OPS, req).unwrap();
        check(op, protocol, &msg(req, payload, nfds))
    }

    #[test]
    fn payload_shapes() {
        let all = P::all();
        assert!(run(FrontendReq::SET_OWNER, &[], 0, all).is_ok());
        let e = run(FrontendReq::SET_OWNER, &[0], 0, all).unwrap_err();
        assert!(matches!(
            e,
            ConnError::PayloadSize {
                got: 1,
                want: 0,
                ..
            }
        ));
        assert!(e.fatal());
        assert!(run(FrontendReq::SET_FEATURES, &[0; 8], 0, all).is_ok());
        for n in [0, 7, 9] {
            let e = run(FrontendReq::SET_FEATURES, &vec![0; n], 0, all).unwrap_err();
            assert!(matches!(e, ConnError::PayloadSize { want: 8, .. }), "{n}");
        }
        // Head then tail: too short for the head, then the tail's length.
        let e = run(FrontendReq::SET_CONFIG, &[3], 0, all).unwrap_err();
        assert!(matches!(e, ConnError::PayloadSize { want: 2, .. }));
        assert!(run(FrontendReq::SET_CONFIG, &[3, 0, 1, 2, 3], 0, all).is_ok());
        let e = run(FrontendReq::SET_CONFIG, &[3, 0, 1, 2], 0, all).unwrap_err();
        assert!(matches!(e, ConnError::PayloadSize { want: 5, .. }));
        // A head out of range is the tail function's answer.
        let e = run(FrontendReq::SET_CONFIG, &[0xff, 0], 0, all).unwrap_err();
        assert!(matches!(e, ConnError::Unsupported(_)));
    }

    #[test]
    fn descriptors() {
        let all = P::all();
        let e = run(FrontendReq::SET_OWNER, &[], 1, all).unwrap_err();
        assert!(
            matches!(
                e,
                ConnError::Fds {
                    got: 1,
                    want: 0,
                    ..
                }
            ) && e.fatal()
        );
        assert!(run(FrontendReq::ADD_MEM_REG, &[0; 8], 1, all).is_ok());
        for n in [0, 2] {
            let e = run(FrontendReq::ADD_MEM_REG, &[0; 8], n, all).unwrap_err();
            assert!(matches!(e, ConnError::Fds { want: 1, .. }), "{n}");
        }
        assert!(run(FrontendReq::REM_MEM_REG, &[], 0, all).is_ok());
        assert!(run(FrontendReq::REM_MEM_REG, &[], 1, all).is_ok());
        assert!(run(FrontendReq::REM_MEM_REG, &[], 2, all).is_err());
    }

    /// A request needing a feature not negotiated is refused, not fatal,
    /// and before its payload is looked at; descriptors on a request that
    /// takes none are checked first of all.
    #[test]
    fn features_in_order() {
        let none = P::empty();
        let e = run(FrontendReq::ADD_MEM_REG, &[0; 3], 0, none).unwrap_err();
        assert!(matches!(
            e,
            ConnError::Unsupported(FrontendReq::ADD_MEM_REG)
        ));
        assert!(!e.fatal());
        assert_eq!(e.errno().0, libc::EOPNOTSUPP);
        let e = run(FrontendReq::SET_FEATURES, &[0; 8], 1, none).unwrap_err();
        assert!(matches!(e, ConnError::Fds { .. }));
    }
}
