//! One frontend connection: the request loop and the per-connection state
//! machine (features, memory table, vrings). Requests go through one table,
//! `OPS` (the rules it applies are in [`super::dispatch`]), to one small
//! handler each.
//!
//! The connection thread reads the frontend's messages, one at a time, and
//! answers each in order. It never waits on a queue worker that could wait
//! on this connection (see [`super::vring`]); memory-table removals wait for
//! a grace period of the queues' readers, which are online only while they
//! process requests.
//!
//! Errors: a framing error, an unknown request, a payload of the wrong size,
//! descriptors where none belong, or a failure of a request that has its own
//! reply ends the connection. Any other refused request is answered with a
//! non-zero REPLY_ACK (the errno) when the frontend asked for an ack, and
//! logged either way.

use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vcdev_iommu::iotlb::IotlbError;
use vcdev_iommu::{AddressSpace, Errno, SealPolicy};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserInflight, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr, VhostUserVringAddrFlags,
    VhostUserVringState, VHOST_USER_CONFIG_SIZE,
};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::VhostIotlbType;
use virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::backend_channel::BackendChannel;
use super::dispatch::{self, Fds, Msg, Op, Payload, Reply};
use super::inflight::{InflightError, InflightRegion};
use super::iotlb::{perm_from_vhost, record_invalidate, IotlbMsg, MissTable, IOTLB_MSG_LEN};
use super::main_poll::MainPoll;
use super::memory::{MemoryError, MemoryTable, RegionDesc, MAX_MEM_SLOTS, MAX_TABLE_REGIONS};
use super::vring::{DmaCtx, Iotlb, Vring, VringError};
use crate::error_chain;
use crate::pod::pod_from;
use crate::registry::{DeviceCounters, Ownership};
use crate::wire::{self, FlagPolicy, Frame, FrameHeader, FrameReader, WireError};

/// The protocol features offered. REPLY_ACK and BACKEND_REQ are what QEMU
/// requires before it accepts VIRTIO_F_ACCESS_PLATFORM (IOTLB messages
/// need no protocol feature of their own).
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::STATUS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Bits 0-7 of a SET_VRING_KICK/CALL/ERR payload: the queue index.
const VRING_IDX_MASK: u64 = 0xff;
/// Bit 8 of a SET_VRING_KICK/CALL/ERR payload: no descriptor comes.
const VRING_NOFD_MASK: u64 = 0x100;
/// VIRTIO_F_ACCESS_PLATFORM: addresses are IOVAs of the frontend's vIOMMU.
const ACCESS_PLATFORM: u64 = 1 << VIRTIO_F_ACCESS_PLATFORM;
/// virtio status bit DRIVER_OK.
const STATUS_DRIVER_OK: u8 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;

/// Errors of handling one request.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Framing failed (the connection ends).
    #[error("Bad frame")]
    Wire(#[from] WireError),
    /// A request code we do not know.
    #[error("Unknown request {0}")]
    UnknownRequest(u32),
    /// A reply where a request belongs.
    #[error("Unexpected reply message {0}")]
    UnexpectedReply(u32),
    /// The payload has the wrong size.
    #[error("{req:?}: payload of {got} bytes, expected {want}")]
    PayloadSize {
        /// The request.
        req: FrontendReq,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// Descriptors where none, or other ones, belong.
    #[error("{req:?}: {got} descriptors, expected {want}")]
    Fds {
        /// The request.
        req: FrontendReq,
        /// Descriptors received.
        got: usize,
        /// Descriptors expected.
        want: usize,
    },
    /// A request that is not supported (or whose feature was not negotiated).
    #[error("{0:?} is not supported")]
    Unsupported(FrontendReq),
    /// A request value out of range.
    #[error("{req:?}: invalid {what} {value:#x}")]
    Invalid {
        /// The request.
        req: FrontendReq,
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// Features beyond those offered.
    #[error("Features {0:#x} were not offered")]
    Features(u64),
    /// The memory table refused the change.
    #[error("Memory table change refused")]
    Memory(#[from] MemoryError),
    /// A queue could not start.
    #[error("Queue start failed")]
    Vring(#[from] VringError),
    /// An IOTLB UPDATE the IOMMU refused.
    #[error("IOTLB update refused")]
    Iotlb(#[from] IotlbError),
    /// IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM negotiated.
    #[error("IOTLB message without VIRTIO_F_ACCESS_PLATFORM negotiated")]
    NoAccessPlatform,
    /// A call or err descriptor could not be made non-blocking.
    #[error("Cannot make the eventfd non-blocking")]
    EventFd(#[source] std::io::Error),
    /// The backend channel could not be set up.
    #[error("Backend channel setup failed")]
    BackendChannel(#[source] std::io::Error),
    /// GET/SET_INFLIGHT_FD refused.
    #[error("Inflight region refused")]
    Inflight(#[from] InflightError),
}

impl ConnError {
    /// Whether the connection must end.
    pub fn fatal(&self) -> bool {
        matches!(
            self,
            ConnError::Wire(_)
                | ConnError::UnknownRequest(_)
                | ConnError::UnexpectedReply(_)
                | ConnError::PayloadSize { .. }
                | ConnError::Fds { .. }
        )
    }

    /// The errno sent in a failed REPLY_ACK.
    pub fn errno(&self) -> Errno {
        match self {
            ConnError::Wire(e) => e.errno(),
            ConnError::Memory(e) => e.errno(),
            ConnError::Unsupported(_) => Errno(libc::EOPNOTSUPP),
            ConnError::Vring(_) => Errno(libc::EIO),
            ConnError::Iotlb(e) => e.errno(),
            ConnError::NoAccessPlatform => Errno(libc::EOPNOTSUPP),
            ConnError::BackendChannel(e) | ConnError::EventFd(e) => Errno::from_io(e),
            ConnError::Inflight(e) => e.errno(),
            _ => Errno::EINVAL,
        }
    }
}

/// Options of a connection.
#[derive(Clone, Debug)]
pub struct ConnConfig {
    /// The daemon's event loop (None in unit tests): the backend channel's
    /// acks are read there.
    pub event_loop: Option<crate::daemon::LoopHandle>,
    /// What memory-table fds must be.
    pub seal_policy: SealPolicy,
    /// How long a queue waits for the answer to an IOTLB miss before the
    /// request fails.
    pub iotlb_miss_timeout: Duration,
    /// The most IOTLB entries this connection keeps.
    pub iotlb_max_entries: usize,
    /// The bound of the main channel's poll after an IOTLB message (zero:
    /// never poll; see [`super::main_poll`]).
    pub iotlb_poll: Duration,
}

/// One frontend connection to one device.
pub struct Conn {
    sock: UnixStream,
    own: Ownership,
    peer: String,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    status: u8,
    mem: MemoryTable,
    vrings: Vec<Vring>,
    /// Under ACCESS_PLATFORM, descriptor and ring addresses are IOVAs
    /// translated here (IOTLB entries point into the memory table's objects).
    iova_space: Arc<AddressSpace>,
    iotlb: Arc<Iotlb>,
    /// Past this many IOTLB entries an UPDATE drops them all first: a
    /// frontend cannot make the daemon's memory grow without bound.
    iotlb_max_entries: usize,
    /// What memory-table and inflight fds must be.
    seal_policy: SealPolicy,
    /// The inflight region (INFLIGHT_SHMFD): made by GET_INFLIGHT_FD or
    /// handed back by SET_INFLIGHT_FD. It lives as long as the connection
    /// (or until a device reset); across a restart only the frontend's
    /// descriptor keeps it.
    inflight: Option<Arc<InflightRegion>>,
    /// The adaptive poll of the socket after an IOTLB message.
    poll: MainPoll,
    /// The frontend's messages, a `recvmsg` each (or fewer).
    reader: FrameReader,
}

/// The connection's [`ConfigNotifier`](crate::registry::ConfigNotifier):
/// CONFIG_CHANGE_MSG on its backend channel. It holds the channel weakly:
/// once the connection is gone there is nothing to tell.
fn config_notifier(iotlb: &Arc<Iotlb>, peer: &str) -> crate::registry::ConfigNotifier {
    let iotlb = Arc::downgrade(iotlb);
    let peer = peer.to_owned();
    Arc::new(move || {
        let Some(iotlb) = iotlb.upgrade() else {
            return false;
        };
        match iotlb.channel.send_config_change() {
            Ok(()) => {
                info!("{peer}: told of the config change (CONFIG_CHANGE_MSG)");
                true
            }
            Err(e) => {
                warn!("{peer}: cannot tell of the config change: {e}");
                false
            }
        }
    })
}

fn u64_payload(v: u64) -> Vec<u8> {
    VhostUserU64::new(v).as_slice().to_vec()
}

impl Conn {
    /// A connection on `sock` owning the device of `own`.
    pub fn new(sock: UnixStream, mut own: Ownership, peer: String, cfg: ConnConfig) -> Conn {
        if let Err(e) = sock.set_write_timeout(Some(crate::wire::WRITE_TIMEOUT)) {
            warn!("{peer}: cannot bound its replies' wait: {e}");
        }
        let blk = own.device().blk().clone();
        let vrings = (0..blk.num_queues())
            .map(|i| Vring::new(i, blk.queue_size()))
            .collect();
        let iotlb = Arc::new(Iotlb {
            misses: MissTable::default(),
            channel: BackendChannel::new(cfg.event_loop.clone()),
            timeout: cfg.iotlb_miss_timeout,
        });
        own.set_config_notifier(config_notifier(&iotlb, &peer));
        Conn {
            sock,
            own,
            peer,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            status: 0,
            mem: MemoryTable::new(AddressSpace::new(), cfg.seal_policy),
            vrings,
            iova_space: AddressSpace::new(),
            iotlb,
            iotlb_max_entries: cfg.iotlb_max_entries,
            seal_policy: cfg.seal_policy,
            inflight: None,
            poll: MainPoll::new(cfg.iotlb_poll),
            reader: FrameReader::new(),
        }
    }

    /// Serves the connection until the frontend leaves or breaks the
    /// protocol, then stops the queues, drops the memory and flushes.
    pub fn serve(mut self) {
        loop {
            // After an IOTLB message, the next one often follows within
            // microseconds: look for it a while before sleeping.
            if !self.reader.buffered() {
                self.poll
                    .wait(self.sock.as_fd(), self.own.device().counters());
            }
            let frame = match self.reader.read(&self.sock, FlagPolicy::VHOST_USER) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    info!("{}: frontend disconnected", self.peer);
                    break;
                }
                Err(e) => {
                    warn!("{}: refused a message: {e}; closing", self.peer);
                    break;
                }
            };
            if self.poll.armed() {
                self.poll.arrived(Instant::now());
            }
            let iotlb = frame.header.request == u32::from(FrontendReq::IOTLB_MSG);
            if let Err(e) = self.handle(frame) {
                warn!("{}: {e}; closing the connection", self.peer);
                break;
            }
            self.poll.answered(iotlb, Instant::now);
        }
        self.teardown();
        // Release the device before the frontend sees the socket close, so
        // that a frontend reconnecting at once finds it free.
        let Conn { sock, own, .. } = self;
        drop(own);
        drop(sock);
    }

    fn teardown(&mut self) {
        for v in &mut self.vrings {
            v.reset(true);
        }
        self.iotlb.channel.close();
        self.flush_iotlb();
        self.mem.clear();
        self.inflight = None;
        if self.access_platform() {
            info!(
                "{}: counters (device total): {}",
                self.peer,
                super::counters_line(self.own.device())
            );
        }
        if let Err(e) = self.own.device().blk().flush() {
            warn!("{}: flush after disconnect failed: {e}", self.peer);
        }
        info!("{}: device released", self.peer);
    }

    fn dev(&self) -> &Arc<vcdev_device_model::blk::BlkDevice> {
        self.own.device().blk()
    }

    fn offered_features(&self) -> u64 {
        let mut f =
            self.dev().device_features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // QEMU refuses a device offering ACCESS_PLATFORM without these.
        let needed = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::BACKEND_REQ;
        if offered_protocol_features().contains(needed) {
            f |= ACCESS_PLATFORM;
        }
        f
    }

    /// Whether VIRTIO_F_ACCESS_PLATFORM is negotiated: addresses are IOVAs.
    fn access_platform(&self) -> bool {
        self.features & ACCESS_PLATFORM != 0
    }

    /// Drops every IOTLB entry; returns after the grace period.
    fn flush_iotlb(&self) {
        if self.iova_space.iotlb_clear() > 0 {
            DeviceCounters::add(&self.own.device().counters().iotlb_flushes, 1);
        }
    }

    fn reply_ack_on(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    /// Handles one frame; an error return ends the connection.
    /// Handles one frame; an error return ends the connection.
    fn handle(&mut self, frame: Frame) -> Result<(), ConnError> {
        let Frame {
            header: hdr,
            payload,
            fds,
        } = frame;
        if hdr.is_reply() {
            return Err(ConnError::UnexpectedReply(hdr.request));
        }
        let req = FrontendReq::try_from(hdr.request)
            .map_err(|()| ConnError::UnknownRequest(hdr.request))?;
        debug!("{}: {req:?} ({} bytes)", self.peer, hdr.size);
        let msg = Msg { req, payload, fds };
        let op = dispatch::find(OPS, req);
        let result = match op {
            Some(op) => {
                dispatch::check(op, self.protocol, &msg).and_then(|()| (op.handler)(self, msg))
            }
            // A request we do not serve: refused, once its descriptors
            // (none belong to it) are checked.
            None => msg.expect_fds(0).and(Err(ConnError::Unsupported(req))),
        };
        match result {
            Ok(Reply::Payload(p)) => self.send(&hdr, &p),
            Ok(Reply::PayloadFd(p, fd)) => self.send_fd(&hdr, &p, &fd),
            Ok(Reply::Ack) => {
                if hdr.need_reply() && self.reply_ack_on() {
                    self.send(&hdr, &0u64.to_le_bytes())?;
                }
                Ok(())
            }
            Err(e) if e.fatal() || op.is_some_and(|o| o.replies) => Err(e),
            Err(e) => {
                warn!("{}: refused {req:?}: {}", self.peer, error_chain(&e));
                if hdr.need_reply() && self.reply_ack_on() {
                    let code = u64::try_from(e.errno().0).unwrap_or(u64::from(libc::EIO as u32));
                    self.send(&hdr, &code.to_le_bytes())?;
                }
                Ok(())
            }
        }
    }

    fn send(&self, req: &FrameHeader, payload: &[u8]) -> Result<(), ConnError> {
        let len = u32::try_from(payload.len()).map_err(|_| WireError::Oversized(u32::MAX))?;
        wire::write_frame(&self.sock, &req.reply(len), payload, &[])?;
        Ok(())
    }

    fn send_fd(&self, req: &FrameHeader, payload: &[u8], fd: &OwnedFd) -> Result<(), ConnError> {
        let len = u32::try_from(payload.len()).map_err(|_| WireError::Oversized(u32::MAX))?;
        wire::write_frame(&self.sock, &req.reply(len), payload, &[fd.as_raw_fd()])?;
        Ok(())
    }

    /// What queues translate descriptor and ring addresses through: guest
    /// physical addresses, or IOVAs when ACCESS_PLATFORM is negotiated (the
    /// single switch point).
    fn dma(&self) -> DmaCtx {
        let (space, iotlb) = if self.access_platform() {
            (self.iova_space.clone(), Some(self.iotlb.clone()))
        } else {
            (self.mem.gpa_space().clone(), None)
        };
        DmaCtx {
            space,
            iotlb,
            device: self.own.device().clone(),
            inflight: self.inflight.clone(),
        }
    }

    fn vring_mut(&mut self, req: FrontendReq, index: u32) -> Result<&mut Vring, ConnError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.vrings.get_mut(i))
            .ok_or(ConnError::Invalid {
                req,
                what: "queue index",
                value: u64::from(index),
            })
    }

    /// Disables every queue: stopped, positions kept.
    fn disable_vrings(&mut self) {
        for v in &mut self.vrings {
            v.stop();
            v.set_enabled(false);
        }
    }

    /// Enables or disables queue `index` and starts or stops it.
    fn enable_vring(&mut self, req: FrontendReq, index: u32, on: bool) -> Result<(), ConnError> {
        let (dma, peer) = (self.dma(), self.peer.clone());
        let v = self.vring_mut(req, index)?;
        v.set_enabled(on);
        if on {
            v.maybe_start(&dma, &peer)?;
        } else {
            v.stop();
        }
        Ok(())
    }

    // The handlers, one per request of [`OPS`], which has checked the
    // payload's shape, the descriptors and the protocol feature.

    fn get_features(&mut self, _: Msg) -> Result<Reply, ConnError> {
        Ok(Reply::Payload(u64_payload(self.offered_features())))
    }

    fn set_features(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let f = m.get::<VhostUserU64>().value;
        let extra = f & !self.offered_features();
        if extra != 0 {
            return Err(ConnError::Features(extra));
        }
        self.features = f;
        let event_idx = f & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for v in &mut self.vrings {
            v.set_event_idx(event_idx);
        }
        debug!("{}: features {f:#x}", self.peer);
        Ok(Reply::Ack)
    }

    fn set_owner(&mut self, _: Msg) -> Result<Reply, ConnError> {
        Ok(Reply::Ack)
    }

    /// Deprecated. The vhost-user spec: discarding connection state here
    /// "would lead to bugs"; back-ends should ignore it or disable all
    /// rings. Rings are disabled (stopped, positions kept);
    /// SET_VRING_ENABLE 1 resumes them.
    fn reset_owner(&mut self, _: Msg) -> Result<Reply, ConnError> {
        self.disable_vrings();
        info!("{}: RESET_OWNER: rings disabled", self.peer);
        Ok(Reply::Ack)
    }

    fn get_protocol_features(&mut self, _: Msg) -> Result<Reply, ConnError> {
        Ok(Reply::Payload(u64_payload(
            offered_protocol_features().bits(),
        )))
    }

    fn set_protocol_features(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let v = m.get::<VhostUserU64>().value;
        if v & !offered_protocol_features().bits() != 0 {
            return Err(ConnError::Features(v));
        }
        self.protocol = VhostUserProtocolFeatures::from_bits_truncate(v);
        Ok(Reply::Ack)
    }

    fn get_queue_num(&mut self, _: Msg) -> Result<Reply, ConnError> {
        Ok(Reply::Payload(u64_payload(u64::from(
            self.dev().num_queues(),
        ))))
    }

    fn set_mem_table(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let each = size_of::<VhostUserMemoryRegion>();
        let descs: Vec<_> = m
            .tail::<VhostUserMemory>()
            .chunks_exact(each)
            .map(|c| region_desc(&pod_from::<VhostUserMemoryRegion>(c)))
            .collect();
        m.expect_fds(descs.len())?;
        let regions: Vec<_> = descs.into_iter().zip(m.fds).collect();
        let n = regions.len();
        self.flush_iotlb();
        self.mem.replace(regions)?;
        info!("{}: memory table set ({n} regions)", self.peer);
        Ok(Reply::Ack)
    }

    fn get_max_mem_slots(&mut self, _: Msg) -> Result<Reply, ConnError> {
        Ok(Reply::Payload(u64_payload(MAX_MEM_SLOTS as u64)))
    }

    fn add_mem_reg(&mut self, mut m: Msg) -> Result<Reply, ConnError> {
        let r = m.get::<VhostUserSingleMemoryRegion>();
        let fd = m.one_fd()?;
        self.flush_iotlb();
        self.mem.add(single_desc(&r), fd)?;
        info!(
            "{}: memory region added at GPA {:#x}, {:#x} bytes ({} of {MAX_MEM_SLOTS} slots used)",
            self.peer,
            { r.guest_phys_addr },
            { r.memory_size },
            self.mem.len()
        );
        Ok(Reply::Ack)
    }

    fn rem_mem_reg(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let r = m.get::<VhostUserSingleMemoryRegion>();
        self.flush_iotlb();
        self.mem.remove(&single_desc(&r))?;
        info!(
            "{}: memory region removed at GPA {:#x}, {:#x} bytes ({} of {MAX_MEM_SLOTS} slots used)",
            self.peer,
            { r.guest_phys_addr },
            { r.memory_size },
            self.mem.len()
        );
        Ok(Reply::Ack)
    }

    fn set_vring_num(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let (req, s) = (m.req, m.get::<VhostUserVringState>());
        let max = self.dev().queue_size();
        let peer = self.peer.clone();
        let v = self.vring_mut(req, s.index)?;
        let num = u16::try_from(s.num)
            .ok()
            .filter(|n| n.is_power_of_two() && *n <= max);
        let Some(num) = num else {
            return Err(ConnError::Invalid {
                req,
                what: "queue size",
                value: u64::from(s.num),
            });
        };
        refuse_running(req, v, s.index)?;
        if num < max && !v.warned_small() {
            // seg_max in the config space is derived from the device's
            // queue size: a guest may build chains longer than this
            // smaller queue, which the device refuses.
            warn!(
                "{peer}: queue size {num} is below the device's queue-size={max}; \
                 long requests may fail (give the frontend queue-size={max})"
            );
            v.set_warned_small();
        }
        v.set_size(num);
        Ok(Reply::Ack)
    }

    fn set_vring_addr(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let (req, a) = (m.req, m.get::<VhostUserVringAddr>());
        if a.flags & !VhostUserVringAddrFlags::all().bits() != 0
            || a.flags & VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits() != 0
        {
            // Logging (LOG_ALL) is not offered.
            return Err(ConnError::Invalid {
                req,
                what: "flags",
                value: u64::from(a.flags),
            });
        }
        let index = a.index;
        let size = u64::from(self.vring_mut(req, index)?.size());
        // virtio 1.2 section 2.7: descriptor table 16 * size, avail ring
        // 6 + 2 * size, used ring 6 + 8 * size bytes.
        let desc_len = 16 * size;
        let avail_len = 6 + 2 * size;
        let used_len = 6 + 8 * size;
        let (desc, avail, used) = if self.access_platform() {
            // IOVAs: translated (and asked for) by the queue when it runs.
            (a.descriptor, a.available, a.used)
        } else {
            (
                self.mem.uaddr_to_gpa(a.descriptor, desc_len)?,
                self.mem.uaddr_to_gpa(a.available, avail_len)?,
                self.mem.uaddr_to_gpa(a.used, used_len)?,
            )
        };
        let (dma, peer) = (self.dma(), self.peer.clone());
        let v = self.vring_mut(req, index)?;
        let was_running = v.running();
        v.stop();
        v.set_addr(desc, avail, used);
        if was_running {
            v.maybe_start(&dma, &peer)?;
        }
        Ok(Reply::Ack)
    }

    fn set_vring_base(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let (req, s) = (m.req, m.get::<VhostUserVringState>());
        let base = u16::try_from(s.num).map_err(|_| ConnError::Invalid {
            req,
            what: "base",
            value: u64::from(s.num),
        })?;
        let v = self.vring_mut(req, s.index)?;
        refuse_running(req, v, s.index)?;
        v.set_base(base);
        Ok(Reply::Ack)
    }

    fn get_vring_base(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let s = m.get::<VhostUserVringState>();
        let v = self.vring_mut(m.req, s.index)?;
        v.reset(false);
        let base = v.base();
        // QEMU never flushes the IOTLB itself: entries of this run
        // (SeaBIOS's, say) must not survive into the next one.
        self.flush_iotlb();
        info!("{}: queue {} stopped at {base}", self.peer, { s.index });
        Ok(Reply::Payload(
            VhostUserVringState::new(s.index, u32::from(base))
                .as_slice()
                .to_vec(),
        ))
    }

    /// SET_VRING_KICK, SET_VRING_CALL and SET_VRING_ERR.
    fn set_vring_fd(&mut self, mut m: Msg) -> Result<Reply, ConnError> {
        let req = m.req;
        let v = m.get::<VhostUserU64>().value;
        if v & !(VRING_IDX_MASK | VRING_NOFD_MASK) != 0 {
            return Err(ConnError::Invalid {
                req,
                what: "queue index",
                value: v,
            });
        }
        let nofd = v & VRING_NOFD_MASK != 0;
        m.expect_fds(usize::from(!nofd))?;
        let index = u32::try_from(v & VRING_IDX_MASK).unwrap_or(u32::MAX);
        let fd: Option<EventFd> = m.take_fd().map(crate::sys::eventfd_from);
        let features = self.features;
        let (dma, peer) = (self.dma(), self.peer.clone());
        let vr = self.vring_mut(req, index)?;
        match req {
            FrontendReq::SET_VRING_KICK => {
                let Some(fd) = fd else {
                    // Polling without a kick fd is not supported.
                    return Err(ConnError::Unsupported(req));
                };
                vr.stop();
                vr.set_kick(Some(fd));
                // Without PROTOCOL_FEATURES a queue is enabled when started.
                if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
                    vr.set_enabled(true);
                }
                vr.maybe_start(&dma, &peer)?;
                debug!("{peer}: queue {index} kick fd set");
            }
            FrontendReq::SET_VRING_CALL => vr.set_call(fd.map(nonblocking).transpose()?),
            _ => vr.set_err(fd.map(nonblocking).transpose()?),
        }
        Ok(Reply::Ack)
    }

    fn set_vring_enable(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let (req, s) = (m.req, m.get::<VhostUserVringState>());
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(ConnError::Unsupported(req));
        }
        let on = match s.num {
            0 => false,
            1 => true,
            n => {
                return Err(ConnError::Invalid {
                    req,
                    what: "enable value",
                    value: u64::from(n),
                })
            }
        };
        self.enable_vring(req, s.index, on)?;
        Ok(Reply::Ack)
    }

    fn get_config(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let c = m.get::<VhostUserConfig>();
        let (offset, size) = (c.offset, c.size);
        let ok = size != 0
            && offset
                .checked_add(size)
                .is_some_and(|end| end <= VHOST_USER_CONFIG_SIZE);
        if !ok {
            warn!("{}: refused GET_CONFIG at {offset:#x}+{size:#x}", self.peer);
            let refused = VhostUserConfig {
                offset,
                size: 0,
                flags: c.flags,
            };
            return Ok(Reply::Payload(refused.as_slice().to_vec()));
        }
        // The table checked that `size` bytes follow the head.
        let mut out = m.payload;
        let data = out
            .get_mut(size_of::<VhostUserConfig>()..)
            .unwrap_or_default();
        data.fill(0);
        self.dev().read_config(offset, data);
        Ok(Reply::Payload(out))
    }

    /// virtio-blk's only writable field (wce) needs CONFIG_WCE, which the
    /// device does not offer: its config is read-only.
    fn set_config(&mut self, m: Msg) -> Result<Reply, ConnError> {
        Err(ConnError::Invalid {
            req: m.req,
            what: "write to read-only config at offset",
            value: u64::from(m.get::<VhostUserConfig>().offset),
        })
    }

    fn set_backend_req_fd(&mut self, mut m: Msg) -> Result<Reply, ConnError> {
        let fd = m.one_fd()?;
        let config = self.protocol.contains(VhostUserProtocolFeatures::CONFIG);
        self.iotlb
            .channel
            .set(
                UnixStream::from(fd),
                self.reply_ack_on(),
                config,
                &self.peer,
            )
            .map_err(ConnError::BackendChannel)?;
        Ok(Reply::Ack)
    }

    fn set_status(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let v = m.get::<VhostUserU64>().value;
        let status = u8::try_from(v).map_err(|_| ConnError::Invalid {
            req: m.req,
            what: "status",
            value: v,
        })?;
        let was_ok = self.status & STATUS_DRIVER_OK != 0;
        self.status = status;
        if status == 0 {
            // A device reset by status: the queues stop (their positions
            // stay for GET_VRING_BASE) and are disabled until re-enabled.
            self.disable_vrings();
        }
        if was_ok != (status & STATUS_DRIVER_OK != 0) {
            info!("{}: status {status:#x}", self.peer);
        }
        Ok(Reply::Ack)
    }

    fn get_status(&mut self, _: Msg) -> Result<Reply, ConnError> {
        Ok(Reply::Payload(u64_payload(u64::from(self.status))))
    }

    fn reset_device(&mut self, _: Msg) -> Result<Reply, ConnError> {
        for v in &mut self.vrings {
            v.reset(true);
        }
        self.flush_iotlb();
        // What was in flight before a reset is never resubmitted: QEMU asks
        // for a fresh region (GET_INFLIGHT_FD) at the next start.
        self.inflight = None;
        // Protocol features and ownership survive a reset (the frontend
        // does not negotiate them again); virtio features do not.
        self.features = 0;
        self.status = 0;
        info!("{}: device reset", self.peer);
        Ok(Reply::Ack)
    }

    /// GET_INFLIGHT_FD: a fresh zeroed region for the queues the frontend
    /// names, in use from now on; the reply carries its memfd.
    fn get_inflight_fd(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let d = m.get::<VhostUserInflight>();
        let dev = self.dev();
        let (region, fd, reply) = InflightRegion::create(&d, dev.num_queues(), dev.queue_size())?;
        info!(
            "{}: inflight region of {} queues x {} entries ({} bytes)",
            self.peer,
            region.num_queues(),
            region.queue_size(),
            { reply.mmap_size }
        );
        self.inflight = Some(region);
        Ok(Reply::PayloadFd(reply.as_slice().to_vec(), fd))
    }

    /// SET_INFLIGHT_FD: the region the frontend kept (from us or from the
    /// daemon before a restart), used by the queues from their next start.
    fn set_inflight_fd(&mut self, mut m: Msg) -> Result<Reply, ConnError> {
        let d = m.get::<VhostUserInflight>();
        let fd = m.one_fd()?;
        let dev = self.dev();
        let region =
            InflightRegion::open(fd, &d, dev.num_queues(), dev.queue_size(), self.seal_policy)?;
        info!(
            "{}: inflight region set ({} queues x {} entries)",
            self.peer,
            region.num_queues(),
            region.queue_size()
        );
        self.inflight = Some(region);
        Ok(Reply::Ack)
    }

    /// VHOST_USER_IOTLB_MSG: UPDATE or INVALIDATE. Acked only once it holds:
    /// an UPDATE that replaced entries, and every INVALIDATE, return after
    /// the grace period (no queue uses the old translation any more).
    fn iotlb_msg(&mut self, m: Msg) -> Result<Reply, ConnError> {
        let req = m.req;
        if !self.access_platform() {
            return Err(ConnError::NoAccessPlatform);
        }
        let m = IotlbMsg::decode(&m.payload).ok_or(ConnError::PayloadSize {
            req,
            got: m.payload.len(),
            want: IOTLB_MSG_LEN,
        })?;
        const UPDATE: u8 = VhostIotlbType::Update as u8;
        const INVALIDATE: u8 = VhostIotlbType::Invalidate as u8;
        match m.kind {
            UPDATE => {
                let perm = perm_from_vhost(m.perm).ok_or(ConnError::Invalid {
                    req,
                    what: "IOTLB permission",
                    value: u64::from(m.perm),
                })?;
                self.iotlb_update(&m, perm)?;
                DeviceCounters::add(&self.own.device().counters().iotlb_updates, 1);
                // Wake the queues waiting for this page (after the update is
                // published, before QEMU acks their miss).
                if self.iotlb.misses.updated(m.iova, m.size, perm) {
                    // A queue was woken: it needs the CPU now, and the
                    // next message waits for its I/O. Don't poll for it.
                    self.poll.disarm_next();
                }
                debug!(
                    "{}: IOTLB update {:#x}+{:#x} -> {:#x} {perm:?}",
                    self.peer, m.iova, m.size, m.uaddr
                );
            }
            INVALIDATE => {
                let t = Instant::now();
                let n = self.iova_space.iotlb_invalidate(m.iova, m.size);
                record_invalidate(self.own.device().counters(), t.elapsed());
                debug!(
                    "{}: IOTLB invalidate {:#x}+{:#x} ({n} entries)",
                    self.peer, m.iova, m.size
                );
            }
            k => {
                return Err(ConnError::Invalid {
                    req,
                    what: "IOTLB message type",
                    value: u64::from(k),
                })
            }
        }
        Ok(Reply::Ack)
    }

    /// Maps `m.iova..+m.size` to the frontend's user range at `m.uaddr`,
    /// one memory region at a time.
    fn iotlb_update(&self, m: &IotlbMsg, perm: vcdev_iommu::Permissions) -> Result<(), ConnError> {
        let req = FrontendReq::IOTLB_MSG;
        if m.size == 0 || m.iova.checked_add(m.size - 1).is_none() {
            return Err(IotlbError::BadRange {
                iova: m.iova,
                size: m.size,
            }
            .into());
        }
        if self.iova_space.len() >= self.iotlb_max_entries {
            warn!(
                "{}: IOTLB full ({} entries): dropping it, the guest's accesses will miss again",
                self.peer, self.iotlb_max_entries
            );
            self.flush_iotlb();
        }
        let (mut iova, mut uaddr, mut left) = (m.iova, m.uaddr, m.size);
        while left > 0 {
            let (mem, offset, avail) = self
                .mem
                .uaddr_piece(uaddr)
                .ok_or(MemoryError::Unmapped { uaddr })?;
            let n = avail.min(left);
            self.iova_space.iotlb_update(iova, n, &mem, offset, perm)?;
            left -= n;
            if left > 0 {
                iova += n;
                uaddr = uaddr.checked_add(n).ok_or(ConnError::Invalid {
                    req,
                    what: "IOTLB user address",
                    value: m.uaddr,
                })?;
            }
        }
        Ok(())
    }
}

type P = VhostUserProtocolFeatures;
use FrontendReq as R;

const EMPTY: Payload = Payload::Empty;
const U64: Payload = Payload::of::<VhostUserU64>();
const STATE: Payload = Payload::of::<VhostUserVringState>();
const ADDR: Payload = Payload::of::<VhostUserVringAddr>();
const REGION: Payload = Payload::of::<VhostUserSingleMemoryRegion>();
const MEM_TABLE: Payload = Payload::head::<VhostUserMemory>(mem_table_tail);
const CONFIG: Payload = Payload::head::<VhostUserConfig>(config_tail);
const IOTLB: Payload = Payload::Exact(IOTLB_MSG_LEN);
const INFLIGHT: Payload = Payload::of::<VhostUserInflight>();

/// The requests served, one entry each: code, payload, descriptors,
/// handler, and the protocol feature needed (see [`super::dispatch`] for
/// the rules the table applies). `Op::get` marks a request with a reply of
/// its own. A request not listed is refused (EOPNOTSUPP).
#[rustfmt::skip]
const OPS: &[Op<Conn>] = &[
    Op::get(R::GET_FEATURES,           EMPTY,                Conn::get_features),
    Op::new(R::SET_FEATURES,           U64,       Fds::None, Conn::set_features),
    Op::new(R::SET_OWNER,              EMPTY,     Fds::None, Conn::set_owner),
    Op::new(R::RESET_OWNER,            EMPTY,     Fds::None, Conn::reset_owner),
    Op::get(R::GET_PROTOCOL_FEATURES,  EMPTY,                Conn::get_protocol_features),
    Op::new(R::SET_PROTOCOL_FEATURES,  U64,       Fds::None, Conn::set_protocol_features),
    Op::get(R::GET_QUEUE_NUM,          EMPTY,                Conn::get_queue_num),
    Op::new(R::SET_MEM_TABLE,          MEM_TABLE, Fds::Counted, Conn::set_mem_table),
    Op::get(R::GET_MAX_MEM_SLOTS,      EMPTY,                Conn::get_max_mem_slots).needs(P::CONFIGURE_MEM_SLOTS),
    Op::new(R::ADD_MEM_REG,            REGION,    Fds::One,  Conn::add_mem_reg).needs(P::CONFIGURE_MEM_SLOTS),
    Op::new(R::REM_MEM_REG,            REGION,    Fds::AtMostOne, Conn::rem_mem_reg).needs(P::CONFIGURE_MEM_SLOTS),
    Op::new(R::SET_VRING_NUM,          STATE,     Fds::None, Conn::set_vring_num),
    Op::new(R::SET_VRING_ADDR,         ADDR,      Fds::None, Conn::set_vring_addr),
    Op::new(R::SET_VRING_BASE,         STATE,     Fds::None, Conn::set_vring_base),
    Op::get(R::GET_VRING_BASE,         STATE,                Conn::get_vring_base),
    Op::new(R::SET_VRING_KICK,         U64,       Fds::Counted, Conn::set_vring_fd),
    Op::new(R::SET_VRING_CALL,         U64,       Fds::Counted, Conn::set_vring_fd),
    Op::new(R::SET_VRING_ERR,          U64,       Fds::Counted, Conn::set_vring_fd),
    Op::new(R::SET_VRING_ENABLE,       STATE,     Fds::None, Conn::set_vring_enable),
    Op::new(R::IOTLB_MSG,              IOTLB,     Fds::None, Conn::iotlb_msg),
    Op::get(R::GET_CONFIG,             CONFIG,               Conn::get_config).needs(P::CONFIG),
    Op::new(R::SET_CONFIG,             CONFIG,    Fds::None, Conn::set_config).needs(P::CONFIG),
    Op::new(R::SET_BACKEND_REQ_FD,     EMPTY,     Fds::One,  Conn::set_backend_req_fd).needs(P::BACKEND_REQ),
    Op::new(R::SET_STATUS,             U64,       Fds::None, Conn::set_status).needs(P::STATUS),
    Op::get(R::GET_STATUS,             EMPTY,                Conn::get_status).needs(P::STATUS),
    Op::new(R::RESET_DEVICE,           EMPTY,     Fds::None, Conn::reset_device).needs(P::RESET_DEVICE),
    Op::get(R::GET_INFLIGHT_FD,        INFLIGHT,             Conn::get_inflight_fd).needs(P::INFLIGHT_SHMFD),
    Op::new(R::SET_INFLIGHT_FD,        INFLIGHT,  Fds::One,  Conn::set_inflight_fd).needs(P::INFLIGHT_SHMFD),
];

/// SET_MEM_TABLE: `num_regions` regions follow the head, 1 to
/// [`MAX_TABLE_REGIONS`] of them (one descriptor each, in this frame; more
/// regions than that come one per ADD_MEM_REG).
fn mem_table_tail(head: &[u8]) -> Result<usize, ConnError> {
    let m = pod_from::<VhostUserMemory>(head);
    let n = usize::try_from(m.num_regions).unwrap_or(usize::MAX);
    if n == 0 || n > MAX_TABLE_REGIONS {
        return Err(ConnError::Invalid {
            req: FrontendReq::SET_MEM_TABLE,
            what: "region count",
            value: u64::from(m.num_regions),
        });
    }
    Ok(n * size_of::<VhostUserMemoryRegion>())
}

/// GET/SET_CONFIG: exactly `size` bytes follow the head.
fn config_tail(head: &[u8]) -> Result<usize, ConnError> {
    let c = pod_from::<VhostUserConfig>(head);
    Ok(usize::try_from(c.size).unwrap_or(usize::MAX))
}

fn region_desc(r: &VhostUserMemoryRegion) -> RegionDesc {
    RegionDesc {
        gpa: r.guest_phys_addr,
        size: r.memory_size,
        uaddr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

fn single_desc(r: &VhostUserSingleMemoryRegion) -> RegionDesc {
    RegionDesc {
        gpa: r.guest_phys_addr,
        size: r.memory_size,
        uaddr: r.user_addr,
        mmap_offset: r.mmap_offset,
    }
}

/// Makes a call or err eventfd non-blocking: a queue worker signals it and
/// must never block there (a full counter already means "signalled"), or
/// stopping the queue would wait for it forever.
fn nonblocking(fd: EventFd) -> Result<EventFd, ConnError> {
    crate::sys::set_nonblocking(fd.as_raw_fd()).map_err(ConnError::EventFd)?;
    Ok(fd)
}

/// SET_VRING_NUM and SET_VRING_BASE leave a running queue alone.
fn refuse_running(req: FrontendReq, v: &Vring, index: u32) -> Result<(), ConnError> {
    if v.running() {
        return Err(ConnError::Invalid {
            req,
            what: "running queue",
            value: u64::from(index),
        });
    }
    Ok(())
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use crate::wire::FLAG_NEED_REPLY;
    use vcdev_device_model::testing::blk as ram_blk;

    /// A connection to a fresh RAM device, and the frontend's end.
    fn conn() -> (Conn, UnixStream) {
        let r = Registry::default();
        let dev = r.add("t".into(), ram_blk());
        let own = Registry::claim_vhost_user(&dev, "t", None).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let cfg = ConnConfig {
            event_loop: None,
            seal_policy: SealPolicy::RequireShrinkSeal,
            iotlb_miss_timeout: Duration::from_millis(100),
            iotlb_max_entries: 8,
            iotlb_poll: Duration::ZERO,
        };
        (Conn::new(ours, own, "t".into(), cfg), theirs)
    }

    fn msg(req: FrontendReq, payload: &[u8]) -> Msg {
        Msg {
            req,
            payload: payload.to_vec(),
            fds: Vec::new(),
        }
    }

    fn frame(req: FrontendReq, flags: u32, payload: &[u8]) -> Frame {
        let size = u32::try_from(payload.len()).unwrap();
        Frame {
            header: FrameHeader::request(u32::from(req), flags, size),
            payload: payload.to_vec(),
            fds: Vec::new(),
        }
    }

    /// One entry per code, and every code with a reply of its own is a GET.
    #[test]
    fn table_has_one_entry_per_code() {
        for (i, a) in OPS.iter().enumerate() {
            assert!(OPS[i + 1..].iter().all(|b| b.req != a.req), "{:?}", a.req);
            assert_eq!(
                a.replies,
                format!("{:?}", a.req).starts_with("GET_"),
                "{:?}",
                a.req
            );
        }
    }

    #[test]
    fn single_handlers() {
        let (mut c, _peer) = conn();
        let n = c.get_queue_num(msg(R::GET_QUEUE_NUM, &[])).unwrap();
        assert_eq!(
            n,
            Reply::Payload(u64_payload(u64::from(c.dev().num_queues())))
        );
        c.set_status(msg(R::SET_STATUS, &7u64.to_le_bytes()))
            .unwrap();
        assert_eq!(c.status, 7);
        let e = c.set_status(msg(R::SET_STATUS, &0x100u64.to_le_bytes()));
        assert!(matches!(e, Err(ConnError::Invalid { what: "status", .. })));
        assert_eq!(c.status, 7);
        c.reset_device(msg(R::RESET_DEVICE, &[])).unwrap();
        assert_eq!((c.status, c.features), (0, 0));
        let e = c.set_features(msg(R::SET_FEATURES, &u64::MAX.to_le_bytes()));
        assert!(matches!(e, Err(ConnError::Features(_))));
        let e = c.iotlb_msg(msg(R::IOTLB_MSG, &[0; IOTLB_MSG_LEN]));
        assert!(matches!(e, Err(ConnError::NoAccessPlatform)));
    }

    /// GET_INFLIGHT_FD replies with its struct and one descriptor, of the
    /// size the struct says, and the region is the connection's until a
    /// device reset; SET_INFLIGHT_FD without its descriptor ends the
    /// connection.
    #[test]
    fn inflight_fd_reply_carries_the_memfd() {
        let (mut c, peer) = conn();
        let p = (P::REPLY_ACK | P::INFLIGHT_SHMFD).bits().to_le_bytes();
        c.handle(frame(R::SET_PROTOCOL_FEATURES, 0, &p)).unwrap();
        let n = c.dev().num_queues();
        let req = VhostUserInflight::new(0, 0, n, 8);
        c.handle(frame(R::GET_INFLIGHT_FD, 0, req.as_slice()))
            .unwrap();
        let reply = wire::read_frame(&peer, FlagPolicy::VHOST_USER)
            .unwrap()
            .unwrap();
        assert!(reply.header.is_reply());
        assert_eq!(reply.fds.len(), 1);
        let got = pod_from::<VhostUserInflight>(&reply.payload);
        assert_eq!(reply.payload.len(), size_of::<VhostUserInflight>());
        let size = super::super::inflight::region_size(n, 8);
        assert_eq!(
            ({ got.mmap_size }, { got.num_queues }, { got.queue_size }),
            (size, n, 8)
        );
        let file = std::fs::File::from(reply.fds.into_iter().next().unwrap());
        assert_eq!(file.metadata().unwrap().len(), size);
        assert!(c.inflight.is_some());
        // Back again, as QEMU does at every start.
        let mut set = frame(R::SET_INFLIGHT_FD, 0, got.as_slice());
        set.fds.push(file.into());
        c.handle(set).unwrap();
        assert!(c.inflight.is_some());
        c.reset_device(msg(R::RESET_DEVICE, &[])).unwrap();
        assert!(c.inflight.is_none());
        let e = c
            .handle(frame(R::SET_INFLIGHT_FD, 0, got.as_slice()))
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConnError::Fds {
                    got: 0,
                    want: 1,
                    ..
                }
            ) && e.fatal()
        );
    }

    /// A kick eventfd without O_NONBLOCK (the spec does not ask for it,
    /// and a frontend can clear it on the description it shares) does not
    /// hang the queue worker once it is woken for anything else: the stop
    /// of GET_VRING_BASE returns and is answered. Found by the fuzz target
    /// `vhost_user_stream`: the worker read every kick fd at each wake-up,
    /// blocking on this one, and the connection waited for it forever.
    #[test]
    fn blocking_kick_eventfd_does_not_hang_the_worker() {
        use crate::testing::vhost_user::{self as t, Fd, Kept, Msg as M};
        let r = Registry::default();
        let dev = r.add("t".into(), ram_blk());
        let (c, sock) = t::conn(&dev, t::conn_config(Duration::from_millis(100))).unwrap();
        let done = std::thread::spawn(move || c.serve());
        let qs = dev.blk().queue_size();
        let mut addr = t::u32s(&[0, 0]);
        addr.extend(t::le(&[t::UADDR, t::UADDR + 0x2000, t::UADDR + 0x1000, 0]));
        let mut msgs = t::setup(false);
        msgs.extend([
            M::new(R::SET_VRING_NUM, t::u32s(&[0, u32::from(qs)])),
            M::new(R::SET_VRING_ADDR, addr),
            // `Fd::Eventfd` is a plain EventFd::new(0): blocking.
            M::new(R::SET_VRING_KICK, t::le(&[0])).with_fds(&[Fd::Eventfd]),
            M::new(R::SET_VRING_ENABLE, t::u32s(&[0, 1])),
            M::new(R::GET_VRING_BASE, t::u32s(&[0, 0])),
        ]);
        let mut keep = Kept::default();
        for m in &msgs {
            t::send(&sock, m, &mut keep).unwrap();
        }
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reply = wire::read_frame(&sock, FlagPolicy::VHOST_USER)
            .expect("GET_VRING_BASE answered within 10 s")
            .expect("not closed");
        assert_eq!(reply.header.request, u32::from(R::GET_VRING_BASE));
        drop(sock);
        done.join().unwrap();
    }

    /// A wrong-size payload is refused by the table and ends the
    /// connection, before the handler runs.
    #[test]
    fn wrong_size_is_refused_once() {
        let (mut c, _peer) = conn();
        let e = c.handle(frame(R::SET_FEATURES, 0, &[0; 7])).unwrap_err();
        assert!(matches!(
            e,
            ConnError::PayloadSize {
                got: 7,
                want: 8,
                ..
            }
        ));
        let e = c.handle(frame(R::GET_QUEUE_NUM, 0, &[0])).unwrap_err();
        assert!(matches!(
            e,
            ConnError::PayloadSize {
                got: 1,
                want: 0,
                ..
            }
        ));
    }

    /// A request whose protocol feature was not negotiated is refused with
    /// EOPNOTSUPP (the connection stays) unless it has a reply of its own.
    #[test]
    fn feature_not_negotiated() {
        let (mut c, peer) = conn();
        let p = P::REPLY_ACK.bits().to_le_bytes();
        c.handle(frame(R::SET_PROTOCOL_FEATURES, 0, &p)).unwrap();
        let status = 1u64.to_le_bytes();
        c.handle(frame(R::SET_STATUS, FLAG_NEED_REPLY, &status))
            .unwrap();
        let ack = wire::read_frame(&peer, FlagPolicy::VHOST_USER)
            .unwrap()
            .unwrap();
        let code = u64::from_le_bytes(ack.payload.try_into().unwrap());
        assert_eq!(code, u64::try_from(libc::EOPNOTSUPP).unwrap());
        assert_eq!(c.status, 0);
        let e = c.handle(frame(R::GET_STATUS, 0, &[])).unwrap_err();
        assert!(matches!(e, ConnError::Unsupported(R::GET_STATUS)));
        // The feature is checked before the payload, for every request
        // (SET_BACKEND_REQ_FD used to check its size first and close).
        c.handle(frame(R::SET_BACKEND_REQ_FD, 0, &[0; 8])).unwrap();
        c.handle(frame(R::RESET_DEVICE, 0, &[0; 8])).unwrap();
    }
}
