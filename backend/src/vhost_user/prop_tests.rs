//! Property tests: random message sequences fed to a vhost-user
//! connection over a socketpair, with the real connection loop
//! ([`Conn::serve`]) on its own thread. Nothing panics or hangs: once the
//! frontend leaves, the connection ends within a deadline and releases its
//! device, which a new frontend can then drive; another device is served
//! throughout.

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use vhost::vhost_user::message::FrontendReq;

use super::conn::offered_protocol_features;
use crate::registry::{Device, Registry};
use crate::testing::vhost_user::{
    conn, conn_config, le, offered_features, send, setup, u32s, Fd, Kept, Msg, MEMFD_LEN, UADDR,
};
use crate::wire::{self, FlagPolicy, FrameHeader, FLAG_NEED_REPLY};

/// How long a connection may take to end after its frontend left.
const DEADLINE: Duration = Duration::from_secs(20);

use vcdev_device_model::testing::blk;

fn adversarial_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(1 << 63),
        Just(UADDR),
        (0u64..16).prop_map(|p| p * 4096),
        (0u64..16).prop_map(|p| UADDR + p * 4096),
        Just(MEMFD_LEN),
        0u64..8,
        any::<u64>(),
    ]
}

fn index() -> impl Strategy<Value = u32> {
    prop_oneof![12 => 0u32..2, 1 => Just(255), 1 => Just(256), 1 => any::<u32>()]
}

/// A region: gpa, size, uaddr, mmap offset.
fn region() -> impl Strategy<Value = [u64; 4]> {
    prop_oneof![
        // Plausible: pages of the memfd.
        (0u64..16, 1u64..17, 0u64..16, 0u64..17).prop_map(|(g, n, u, o)| [
            g * 4096,
            n * 4096,
            UADDR + u * 4096,
            o * 4096
        ]),
        [
            adversarial_u64(),
            adversarial_u64(),
            adversarial_u64(),
            adversarial_u64()
        ],
    ]
}

fn fds(max: usize) -> impl Strategy<Value = Vec<Fd>> {
    prop::collection::vec(
        prop::sample::select(vec![Fd::Memfd, Fd::Eventfd, Fd::Socket]),
        0..=max,
    )
}

/// The payload (and descriptors) of a message for `req`, shaped like its
/// struct with adversarial values, or random bytes.
fn body(req: u32) -> BoxedStrategy<(Vec<u8>, Vec<Fd>)> {
    let r = FrontendReq::try_from(req).ok();
    match r {
        Some(FrontendReq::SET_FEATURES) => {
            (prop_oneof![Just(offered_features()), any::<u64>()], fds(0))
                .prop_map(|(v, f)| (le(&[v]), f))
                .boxed()
        }
        Some(FrontendReq::SET_PROTOCOL_FEATURES) => (
            prop_oneof![Just(offered_protocol_features().bits()), any::<u64>()],
            fds(0),
        )
            .prop_map(|(v, f)| (le(&[v]), f))
            .boxed(),
        Some(FrontendReq::SET_MEM_TABLE) => (
            prop_oneof![4 => 0u32..4, 1 => 30u32..36, 1 => any::<u32>()],
            prop::collection::vec(region(), 0..5),
            prop::collection::vec(Just(Fd::Memfd), 0..6),
        )
            .prop_map(|(n, regions, f)| {
                let mut p = u32s(&[n, 0]);
                for r in regions {
                    p.extend(le(&r));
                }
                (p, f)
            })
            .boxed(),
        Some(FrontendReq::ADD_MEM_REG | FrontendReq::REM_MEM_REG) => {
            (region(), prop::collection::vec(Just(Fd::Memfd), 0..3))
                .prop_map(|(r, f)| {
                    let mut p = le(&[0]);
                    p.extend(le(&r));
                    (p, f)
                })
                .boxed()
        }
        Some(
            FrontendReq::SET_VRING_NUM
            | FrontendReq::SET_VRING_BASE
            | FrontendReq::GET_VRING_BASE
            | FrontendReq::SET_VRING_ENABLE,
        ) => (
            index(),
            prop_oneof![0u32..3, Just(64), Just(256), Just(1024), any::<u32>()],
            fds(0),
        )
            .prop_map(|(i, n, f)| (u32s(&[i, n]), f))
            .boxed(),
        Some(FrontendReq::SET_VRING_ADDR) => (
            index(),
            prop_oneof![Just(0u32), any::<u32>()],
            [
                adversarial_u64(),
                adversarial_u64(),
                adversarial_u64(),
                adversarial_u64(),
            ],
        )
            .prop_map(|(i, fl, a)| {
                let mut p = u32s(&[i, fl]);
                p.extend(le(&a));
                (p, Vec::new())
            })
            .boxed(),
        Some(
            FrontendReq::SET_VRING_KICK | FrontendReq::SET_VRING_CALL | FrontendReq::SET_VRING_ERR,
        ) => (
            prop_oneof![4 => 0u64..3, 1 => (0u64..3).prop_map(|i| i | 0x100), 1 => any::<u64>()],
            prop_oneof![
                4 => Just(vec![Fd::Eventfd]),
                1 => prop::collection::vec(Just(Fd::Eventfd), 0..3)
            ],
        )
            .prop_map(|(v, f)| (le(&[v]), f))
            .boxed(),
        Some(FrontendReq::IOTLB_MSG) => (
            adversarial_u64(),
            adversarial_u64(),
            adversarial_u64(),
            prop_oneof![0u8..4, any::<u8>()],
            prop_oneof![1u8..4, any::<u8>()],
        )
            .prop_map(|(iova, size, uaddr, perm, ty)| {
                let mut p = le(&[iova, size, uaddr]);
                p.extend([perm, ty, 0, 0, 0, 0, 0, 0]);
                (p, Vec::new())
            })
            .boxed(),
        Some(FrontendReq::GET_CONFIG | FrontendReq::SET_CONFIG) => (
            prop_oneof![0u32..64, Just(0x1000), any::<u32>()],
            prop_oneof![0u32..64, Just(0x1000), Just(u32::MAX)],
            0usize..80,
        )
            .prop_map(|(off, size, n)| {
                let mut p = u32s(&[off, size, 0]);
                p.resize(12 + n, 0);
                (p, Vec::new())
            })
            .boxed(),
        Some(FrontendReq::SET_BACKEND_REQ_FD) => (
            Just(Vec::new()),
            prop::collection::vec(Just(Fd::Socket), 0..2),
        )
            .boxed(),
        _ => (
            prop_oneof![
                Just(Vec::new()),
                prop::collection::vec(any::<u8>(), 8),
                prop::collection::vec(any::<u8>(), 0..96),
            ],
            prop_oneof![8 => Just(Vec::new()), 1 => fds(1)],
        )
            .boxed(),
    }
}

fn msg() -> impl Strategy<Value = Msg> {
    (
        // Mostly the requests with state behind them; sometimes any.
        prop_oneof![
            16 => prop::sample::select(
                [
                    FrontendReq::SET_MEM_TABLE,
                    FrontendReq::ADD_MEM_REG,
                    FrontendReq::REM_MEM_REG,
                    FrontendReq::SET_VRING_NUM,
                    FrontendReq::SET_VRING_ADDR,
                    FrontendReq::SET_VRING_BASE,
                    FrontendReq::GET_VRING_BASE,
                    FrontendReq::SET_VRING_KICK,
                    FrontendReq::SET_VRING_CALL,
                    FrontendReq::SET_VRING_ERR,
                    FrontendReq::SET_VRING_ENABLE,
                    FrontendReq::IOTLB_MSG,
                    FrontendReq::GET_CONFIG,
                    FrontendReq::SET_BACKEND_REQ_FD,
                    FrontendReq::SET_FEATURES,
                    FrontendReq::SET_PROTOCOL_FEATURES,
                ]
                .map(u32::from)
                .to_vec()
            ),
            4 => 1u32..46,
            1 => any::<u32>(),
        ],
        prop_oneof![
            10 => Just(1u32),
            10 => Just(1 | FLAG_NEED_REPLY),
            1 => any::<u32>()
        ],
        // Sometimes a byte too many or too few.
        prop_oneof![20 => Just(0i8), 1 => -2i8..3],
    )
        .prop_flat_map(|(code, flags, delta)| {
            body(code).prop_map(move |(mut payload, fds)| {
                let n = payload.len();
                payload.resize(n.saturating_add_signed(isize::from(delta)), 0xa5);
                Msg {
                    code,
                    flags,
                    payload,
                    fds,
                }
            })
        })
}

/// A connection to `dev` served on its own thread; the channel says when
/// `serve` returned.
fn connect(dev: &Arc<Device>) -> (UnixStream, mpsc::Receiver<()>) {
    let (c, theirs) = conn(dev, conn_config(Duration::from_millis(100))).expect("device free");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        c.serve();
        let _ = tx.send(());
    });
    (theirs, rx)
}

/// GET_FEATURES on `sock` gets its 8-byte reply.
fn get_features_works(sock: &UnixStream) -> Result<(), TestCaseError> {
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let code = u32::from(FrontendReq::GET_FEATURES);
    wire::write_frame(sock, &FrameHeader::request(code, 0, 0), &[], &[]).unwrap();
    let f = wire::read_frame(sock, FlagPolicy::VHOST_USER)
        .map_err(|e| TestCaseError::fail(format!("no GET_FEATURES reply: {e}")))?
        .ok_or_else(|| TestCaseError::fail("closed instead of GET_FEATURES"))?;
    prop_assert_eq!(f.header.request, code);
    prop_assert_eq!(f.payload.len(), 8);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    /// Random sequences (after a valid setup or not) on one device while
    /// another is served: the connection never panics or hangs, and the
    /// device is free and works for the next frontend.
    #[test]
    fn random_messages_never_panic_or_hang(
        with_setup in any::<bool>(),
        msgs in prop::collection::vec(msg(), 1..40),
    ) {
        let r = Registry::default();
        let d0 = r.add("vu0".into(), blk());
        let d1 = r.add("vu1".into(), blk());
        let (other, other_done) = connect(&d1);
        let (sock, done) = connect(&d0);
        // Drain replies so that the connection never blocks on a full socket.
        let reader = sock.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            while let Ok(Some(_)) = wire::read_frame(&reader, FlagPolicy::VHOST_USER) {}
        });
        let mut keep = Kept::default();
        let all = if with_setup { setup(true) } else { Vec::new() };
        for m in all.iter().chain(msgs.iter()) {
            if send(&sock, m, &mut keep).is_err() {
                break; // The connection ended (a protocol violation).
            }
        }
        sock.shutdown(std::net::Shutdown::Write).unwrap();
        prop_assert!(done.recv_timeout(DEADLINE).is_ok(), "connection hung or panicked");
        drain.join().unwrap();
        drop(sock);
        // The other device was served throughout.
        get_features_works(&other)?;
        // The device is free again and works.
        let (again, again_done) = connect(&d0);
        get_features_works(&again)?;
        drop(again);
        prop_assert!(again_done.recv_timeout(DEADLINE).is_ok());
        drop(other);
        prop_assert!(other_done.recv_timeout(DEADLINE).is_ok());
        drop(keep);
    }
}
