//! A vhost-user frontend harness over the real socket of a `vcdev serve`
//! process: vhost's `Frontend` for what it can send, raw frames (through
//! `vcdev::wire`, the one header codec) for what it cannot, guest memory in
//! sealed memfds, and per-queue slots and eventfds around device-model's
//! split-ring driver and virtio-blk request encoder
//! (`vcdev_device_model::testing`).
//!
//! With a vIOMMU ([`Harness::start_iotlb`]) the frontend acks
//! VIRTIO_F_ACCESS_PLATFORM, gives every address as an IOVA, keeps a model
//! of the guest's IOMMU mappings ([`IommuFront`]) and serves the backend
//! channel as QEMU does: a miss for a mapped page is answered with an
//! UPDATE on the main channel, then acked; a miss for an unmapped page is
//! acked with a failure and no UPDATE. Main-channel use is serialised by
//! one lock ([`Harness::main_lock`]) shared with the miss server.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vcdev::vhost_user::iotlb::{IotlbMsg, IOTLB_MSG_LEN, IOTLB_PAGE_SIZE};
use vcdev::wire::{self, FlagPolicy, Frame, FrameHeader, FLAG_NEED_REPLY};
use vcdev_device_model::testing::{blk_segments, BlkRequest, R, W};
use vhost::vhost_user::message::BackendReq;
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use vhost::{VhostAccess, VhostIotlbType};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;

use super::TIMEOUT;

#[allow(unused_imports)] // re-exported for the test targets
pub use vcdev_tests::mem::{
    iova_of, pattern, Desc, DriverQueue, GuestMem, Region, DATA_GPA, DATA_PER_QUEUE, DATA_SIZE,
    IOVA_SHIFT, META_GPA, META_SIZE,
};

// ---------------------------------------------------------------------------
// The frontend

/// The result of one virtio-blk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkResult {
    /// The status byte.
    pub status: u8,
    /// The used length the device reported.
    pub used_len: u32,
    /// The device-writable data (reads, GET_ID).
    pub data: Vec<u8>,
}

/// A connected, configured frontend.
pub struct Harness {
    /// vhost's frontend.
    pub fe: Frontend,
    /// Guest memory.
    pub mem: GuestMem,
    /// The queues.
    pub queues: Vec<DriverQueue>,
    /// The features acked.
    pub features: u64,
    /// The protocol features acked.
    pub protocol: VhostUserProtocolFeatures,
    /// Serialises the main channel between the test and the miss server.
    pub main_lock: Arc<Mutex<()>>,
    /// Under ACCESS_PLATFORM: the guest IOMMU model and miss server.
    pub iommu: Option<Arc<IommuFront>>,
    server: Option<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(io) = &self.iommu {
            io.shutdown();
        }
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}

/// virtio-blk status OK.
pub const S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
/// virtio-blk status IOERR.
pub const S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// virtio-blk status UNSUPP.
pub const S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

impl Harness {
    /// Connects and negotiates (every offered feature but
    /// ACCESS_PLATFORM), without memory or queues.
    pub fn connect(socket: &Path) -> Harness {
        Harness::connect_with(socket, false)
    }

    fn connect_with(socket: &Path, platform: bool) -> Harness {
        let mut fe = Frontend::connect(socket, 1).expect("connect");
        let mut features = fe.get_features().expect("GET_FEATURES");
        if !platform {
            features &= !(1u64 << VIRTIO_F_ACCESS_PLATFORM);
        }
        let offered = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let acked = offered;
        fe.set_features(features).expect("SET_FEATURES");
        fe.set_protocol_features(acked)
            .expect("SET_PROTOCOL_FEATURES");
        fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
        let n = fe.get_queue_num().expect("GET_QUEUE_NUM");
        fe.set_owner().expect("SET_OWNER");
        // vhost's Frontend checks indices against this.
        let _ = n;
        Harness {
            fe,
            mem: GuestMem::default(),
            queues: Vec::new(),
            features,
            protocol: acked,
            main_lock: Arc::default(),
            iommu: None,
            server: None,
        }
    }

    /// Connects with VIRTIO_F_ACCESS_PLATFORM acked, sets the memory table,
    /// maps the metadata and data regions in the guest IOMMU model at
    /// `iova_of(gpa)` (answered through misses: the backend starts with an
    /// empty IOTLB) and starts `nqueues` queues with IOVA ring addresses.
    pub fn start_iotlb(socket: &Path, nqueues: usize, size: u16) -> Harness {
        let mut h = Harness::connect_with(socket, true);
        assert!(h.features & (1u64 << VIRTIO_F_ACCESS_PLATFORM) != 0);
        h.mem.regions.push(Region::new(META_GPA, META_SIZE));
        h.mem.regions.push(Region::new(DATA_GPA, DATA_SIZE));
        let infos: Vec<_> = h.mem.regions.iter().map(Region::info).collect();
        h.fe.set_mem_table(&infos).expect("SET_MEM_TABLE");
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        h.fe.set_backend_request_fd(&theirs)
            .expect("SET_BACKEND_REQ_FD");
        drop(theirs);
        let main = h.sock().try_clone().expect("dup main socket");
        let regions = h
            .mem
            .regions
            .iter()
            .map(|r| (r.gpa, r.size, r.uaddr()))
            .collect();
        let io = Arc::new(IommuFront::new(main, h.main_lock.clone(), regions));
        io.map(
            iova_of(META_GPA),
            META_GPA,
            META_SIZE,
            VhostAccess::ReadWrite,
        );
        io.map(
            iova_of(DATA_GPA),
            DATA_GPA,
            DATA_SIZE,
            VhostAccess::ReadWrite,
        );
        let server_io = io.clone();
        h.server = Some(
            std::thread::Builder::new()
                .name("miss-server".into())
                .spawn(move || server_io.serve(ours))
                .expect("spawn miss server"),
        );
        h.iommu = Some(io);
        for i in 0..nqueues {
            h.queues.push(DriverQueue::new_for_tests(i, size));
            h.start_queue(i);
        }
        h
    }

    /// The guest IOMMU model (under ACCESS_PLATFORM).
    pub fn iommu(&self) -> &Arc<IommuFront> {
        self.iommu.as_ref().expect("started with start_iotlb")
    }

    /// The address the device is given for `gpa`: its IOVA under
    /// ACCESS_PLATFORM, else the GPA itself.
    pub fn dma_addr(&self, gpa: u64) -> u64 {
        if self.iommu.is_some() {
            iova_of(gpa)
        } else {
            gpa
        }
    }

    /// Holds the main channel (for direct `fe` calls while the miss server
    /// may write UPDATEs).
    pub fn lock_main(&self) -> MutexGuard<'_, ()> {
        lock(&self.main_lock)
    }

    /// Connects, sets the memory table (metadata + data regions) and starts
    /// `nqueues` queues of `size` entries.
    pub fn start(socket: &Path, nqueues: usize, size: u16) -> Harness {
        let mut h = Harness::connect(socket);
        h.mem.regions.push(Region::new(META_GPA, META_SIZE));
        h.mem.regions.push(Region::new(DATA_GPA, DATA_SIZE));
        let infos: Vec<_> = h.mem.regions.iter().map(Region::info).collect();
        h.fe.set_mem_table(&infos).expect("SET_MEM_TABLE");
        for i in 0..nqueues {
            h.queues.push(DriverQueue::new_for_tests(i, size));
            h.start_queue(i);
        }
        h
    }

    /// SET_BACKEND_REQ_FD without a vIOMMU: returns the frontend's end of
    /// the backend channel, for the test to read what the daemon sends on
    /// it (CONFIG_CHANGE_MSG), with reads bounded by [`TIMEOUT`].
    pub fn backend_channel(&mut self) -> UnixStream {
        assert!(
            self.iommu.is_none(),
            "start_iotlb serves the channel itself"
        );
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        {
            let _g = lock(&self.main_lock);
            self.fe
                .set_backend_request_fd(&theirs)
                .expect("SET_BACKEND_REQ_FD");
        }
        ours.set_read_timeout(Some(TIMEOUT)).expect("SO_RCVTIMEO");
        ours
    }

    /// GET_CONFIG of virtio-blk's `capacity` (in 512-byte sectors).
    pub fn config_capacity(&mut self) -> u64 {
        let _g = lock(&self.main_lock);
        let (_, cfg) = self
            .fe
            .get_config(
                0,
                8,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &[0u8; 8],
            )
            .expect("GET_CONFIG");
        u64_of(&cfg)
    }

    /// SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE for queue `i`.
    pub fn start_queue(&mut self, i: usize) {
        let _g = lock(&self.main_lock);
        let q = &self.queues[i];
        let cfg = if self.iommu.is_some() {
            q.config_iova()
        } else {
            q.config(&self.mem)
        };
        self.fe.set_vring_num(i, q.size()).expect("SET_VRING_NUM");
        self.fe.set_vring_addr(i, &cfg).expect("SET_VRING_ADDR");
        self.fe
            .set_vring_base(i, q.avail_idx())
            .expect("SET_VRING_BASE");
        self.fe.set_vring_call(i, &q.call).expect("SET_VRING_CALL");
        self.fe.set_vring_kick(i, &q.kick).expect("SET_VRING_KICK");
        self.fe.set_vring_enable(i, true).expect("SET_VRING_ENABLE");
    }

    /// SET_VRING_ENABLE 0 and GET_VRING_BASE for queue `i` (QEMU's stop):
    /// returns the base the backend answers.
    pub fn stop_queue(&mut self, i: usize) -> u32 {
        let _g = lock(&self.main_lock);
        self.fe.set_vring_enable(i, false).expect("disable");
        self.fe.get_vring_base(i).expect("GET_VRING_BASE")
    }

    /// Submits `chain` on queue `q` and waits for its completion (asking
    /// for a call at it, as a driver waiting for it does).
    pub fn run_chain(&mut self, q: usize, chain: &[Desc]) -> Option<(u32, u32)> {
        let dq = &mut self.queues[q];
        dq.enable_calls(&self.mem);
        dq.submit(&self.mem, chain);
        dq.wait_used(&self.mem, TIMEOUT)
    }

    /// One virtio-blk request on queue `q`, its header and status byte in
    /// the queue's own slots, with data buffers `bufs` given by their
    /// device addresses (IOVAs under ACCESS_PLATFORM) as (address, length,
    /// device-writable). Returns the status byte and used length.
    pub fn blk_raw(&mut self, q: usize, kind: u32, sector: u64, bufs: &[Desc]) -> (u8, u32) {
        let chain = self.blk_chain(q, kind, sector, bufs);
        let (id, used_len) = self.run_chain(q, &chain).expect("request completes");
        assert_eq!(id, 0, "used id is the head");
        (self.mem.read(self.queues[q].status_gpa(), 1)[0], used_len)
    }

    /// Writes a virtio-blk header and an unset status byte in queue `q`'s
    /// slots and returns the request's chain around `bufs` (device
    /// addresses), ready to submit.
    pub fn blk_chain(&self, q: usize, kind: u32, sector: u64, bufs: &[Desc]) -> Vec<Desc> {
        let (hdr_gpa, status_gpa) = (self.queues[q].header_gpa(), self.queues[q].status_gpa());
        BlkRequest::new(kind, sector).write(&self.mem, hdr_gpa, status_gpa);
        let mut chain: Vec<Desc> = vec![(self.dma_addr(hdr_gpa), BlkRequest::HEADER_LEN, false)];
        chain.extend_from_slice(bufs);
        chain.push((self.dma_addr(status_gpa), 1, true));
        chain
    }

    /// One virtio-blk request on queue `q`: header, `out` data (device
    /// reads), `in_len` bytes of device-writable data, status byte.
    pub fn blk(&mut self, q: usize, kind: u32, sector: u64, out: &[u8], in_len: u32) -> BlkResult {
        let data_gpa = self.queues[q].data_gpa();
        let data = self.dma_addr(data_gpa);
        let mut bufs: Vec<Desc> = Vec::new();
        if !out.is_empty() {
            self.mem.write(data_gpa, out);
            bufs.push((data, out.len() as u32, false));
        }
        if in_len > 0 {
            self.mem.write(data_gpa, &vec![0xa5; in_len as usize]);
            bufs.push((data, in_len, true));
        }
        let (status, used_len) = self.blk_raw(q, kind, sector, &bufs);
        BlkResult {
            status,
            used_len,
            data: self.mem.read(data_gpa, in_len as usize),
        }
    }

    /// Keeps `depth` reads (`write`: writes) of `len` bytes in flight on
    /// queue `q` for `run`, each slot re-offered as soon as it completes
    /// (successfully: asserted), then drains. Returns the instant of every
    /// completion seen before `run` was over, for rates over any window.
    /// Slot `i` uses descriptors `3i..3i+3`, its own header (metadata
    /// region) and data buffer (queue `q`'s data area), and sector `8i`.
    pub fn pump(
        &mut self,
        q: usize,
        write: bool,
        len: u32,
        depth: usize,
        run: Duration,
    ) -> Vec<Instant> {
        assert!(depth >= 1 && 3 * depth <= usize::from(self.queues[q].size()));
        assert!(depth as u64 * u64::from(len) <= DATA_PER_QUEUE);
        let kind = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        let hdr = |slot: usize| META_GPA + 0x30_0000 + q as u64 * 0x1_0000 + slot as u64 * 32;
        let data_base = self.queues[q].data_gpa();
        let data = move |slot: usize| data_base + slot as u64 * u64::from(len);
        let offer = |h: &mut Harness, slot: usize| {
            let (hdr, data) = (hdr(slot), data(slot));
            let status = hdr + u64::from(BlkRequest::HEADER_LEN);
            BlkRequest::new(kind, slot as u64 * 8).write(&h.mem, hdr, status);
            let chain = BlkRequest::chain(
                h.dma_addr(hdr),
                &[(h.dma_addr(data), len, if write { R } else { W })],
                h.dma_addr(status),
            );
            let dq = &mut h.queues[q];
            dq.ring.write_chain(&h.mem, (slot * 3) as u16, &chain);
            dq.offer(&h.mem, (slot * 3) as u16);
        };
        let end = Instant::now() + run;
        for slot in 0..depth {
            offer(self, slot);
        }
        self.queues[q].kick.write(1).expect("kick");
        let mut outstanding = depth;
        let mut done = Vec::new();
        let mut ready = Vec::with_capacity(depth);
        while outstanding > 0 {
            ready.clear();
            let dq = &mut self.queues[q];
            dq.enable_calls(&self.mem);
            ready.push(dq.wait_used(&self.mem, TIMEOUT).expect("request completes"));
            while let Some(e) = dq.wait_used(&self.mem, Duration::ZERO) {
                ready.push(e);
            }
            let now = Instant::now();
            let mut again = false;
            for &(id, _) in &ready {
                let slot = id as usize / 3;
                let status = hdr(slot) + u64::from(BlkRequest::HEADER_LEN);
                assert_eq!(self.mem.read(status, 1)[0], S_OK, "slot {slot} status");
                outstanding -= 1;
                if now < end {
                    done.push(now);
                    offer(self, slot);
                    outstanding += 1;
                    again = true;
                }
            }
            if again {
                self.queues[q].kick.write(1).expect("kick");
            }
        }
        done
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> BlkResult {
        self.blk(q, VIRTIO_BLK_T_IN, sector, &[], len)
    }

    /// Writes `data` at `sector`; returns the status.
    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> u8 {
        self.blk(q, VIRTIO_BLK_T_OUT, sector, data, 0).status
    }

    /// FLUSH; returns the status.
    pub fn flush(&mut self, q: usize) -> u8 {
        self.blk(q, VIRTIO_BLK_T_FLUSH, 0, &[], 0).status
    }

    /// GET_ID: the 20-byte serial.
    pub fn get_id(&mut self, q: usize) -> BlkResult {
        self.blk(q, VIRTIO_BLK_T_GET_ID, 0, &[], 20)
    }

    /// DISCARD or WRITE_ZEROES of `sectors` at `sector`; returns the status.
    pub fn discard_like(
        &mut self,
        q: usize,
        zeroes: bool,
        sector: u64,
        sectors: u32,
        flags: u32,
    ) -> u8 {
        let seg = blk_segments(&[(sector, sectors, flags)]);
        let kind = if zeroes {
            VIRTIO_BLK_T_WRITE_ZEROES
        } else {
            VIRTIO_BLK_T_DISCARD
        };
        self.blk(q, kind, 0, &seg, 0).status
    }

    /// The main socket, borrowed for raw frames.
    fn sock(&self) -> ManuallyDrop<UnixStream> {
        // SAFETY: the Frontend owns the descriptor and outlives the borrow;
        // ManuallyDrop keeps us from closing it.
        ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(self.fe.as_raw_fd()) })
    }

    /// Bounds every later wait for a reply on the main channel (`None`:
    /// wait forever), so that a daemon that never answers fails the test.
    pub fn set_reply_timeout(&self, t: Option<Duration>) {
        self.sock().set_read_timeout(t).expect("SO_RCVTIMEO");
    }

    /// Sends a raw request with NEED_REPLY and returns the reply frame.
    pub fn raw(&self, req: FrontendReq, payload: &[u8], fds: &[RawFd]) -> Frame {
        self.raw_flags(req, FLAG_NEED_REPLY, payload, fds)
            .expect("a reply")
    }

    /// Sends a raw request with `flags`; returns the reply, or None if the
    /// daemon closed the connection.
    pub fn raw_flags(
        &self,
        req: FrontendReq,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Option<Frame> {
        let f = self.raw_flags_code(u32::from(req), flags, payload, fds)?;
        assert!(f.header.is_reply() && f.header.request == u32::from(req));
        Some(f)
    }

    /// As [`Harness::raw_flags`] with any request code, known or not.
    pub fn raw_flags_code(
        &self,
        code: u32,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Option<Frame> {
        let _g = lock(&self.main_lock);
        let s = self.sock();
        let h = FrameHeader::request(code, flags, payload.len() as u32);
        wire::write_frame(&s, &h, payload, fds).ok()?;
        wire::read_frame(&s, FlagPolicy::VHOST_USER).ok()?
    }

    /// A raw request that expects a REPLY_ACK; returns its value.
    pub fn raw_ack(&self, req: FrontendReq, payload: &[u8], fds: &[RawFd]) -> u64 {
        let f = self.raw(req, payload, fds);
        u64_of(&f.payload)
    }

    /// ADD_MEM_REG of `r` with its memfd, as a raw frame; returns the ack
    /// (0 or an errno). An accepted region joins the guest memory.
    pub fn add_mem_reg(&mut self, r: Region) -> u64 {
        let ack = self.raw_ack(
            FrontendReq::ADD_MEM_REG,
            &single_region_payload(&r),
            &[r.file.as_raw_fd()],
        );
        if ack == 0 {
            self.mem.regions.push(r);
        }
        ack
    }

    /// REM_MEM_REG of `r` (no descriptor, as the spec says a frontend
    /// should send it); returns the ack. The region stays in our guest
    /// memory.
    pub fn rem_mem_reg(&self, r: &Region) -> u64 {
        self.raw_ack(FrontendReq::REM_MEM_REG, &single_region_payload(r), &[])
    }
}

/// The ADD_MEM_REG / REM_MEM_REG payload of `r`.
pub fn single_region_payload(r: &Region) -> Vec<u8> {
    use vm_memory::ByteValued;
    vhost::vhost_user::message::VhostUserSingleMemoryRegion::new(r.gpa, r.size, r.uaddr(), r.offset)
        .as_slice()
        .to_vec()
}

/// The u64 of an 8-byte payload.
pub fn u64_of(p: &[u8]) -> u64 {
    let b: [u8; 8] = p.try_into().expect("8-byte payload");
    u64::from_le_bytes(b)
}

/// Sectors of 512 bytes.
pub const SECTOR: usize = 512;

/// A memfd without seals (what `--allow-unsealed-memory` is for).
pub fn unsealed_memfd(len: u64) -> File {
    let name = std::ffi::CString::new("unsealed").expect("name");
    // SAFETY: a valid NUL-terminated name and plain flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a fresh descriptor nobody else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len).expect("set_len");
    f
}

// ---------------------------------------------------------------------------
// The guest IOMMU (ACCESS_PLATFORM)

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One miss the frontend received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissSeen {
    /// The IOVA asked for.
    pub iova: u64,
    /// `VHOST_ACCESS_*` asked for.
    pub perm: u8,
    /// When it came.
    pub at: Instant,
}

#[derive(Default)]
struct Model {
    /// IOVA page -> (GPA page, VHOST_ACCESS_*).
    pages: BTreeMap<u64, (u64, VhostAccess)>,
    /// Pages whose misses are never acked.
    silent: BTreeSet<u64>,
    /// While set, misses wait before being answered.
    hold: bool,
    /// While set, misses are answered with their UPDATE but not acked (a
    /// silent page's miss then stays pending without holding up the acks
    /// of later ones, which are matched in order).
    no_acks: bool,
    misses: Vec<MissSeen>,
    /// Round trips of answered misses (receive -> ack sent).
    answer_times: Vec<Duration>,
    /// CONFIG_CHANGE_MSGs received.
    config_changes: u64,
    stop: bool,
}

/// The guest's IOMMU as the frontend sees it, and the backend-channel
/// server that answers the daemon's misses from it.
pub struct IommuFront {
    main: UnixStream,
    main_lock: Arc<Mutex<()>>,
    /// (GPA, size, frontend user address) of each memory region.
    regions: Vec<(u64, u64, u64)>,
    model: Mutex<Model>,
    changed: Condvar,
    backend: Mutex<Option<UnixStream>>,
}

impl IommuFront {
    fn new(main: UnixStream, main_lock: Arc<Mutex<()>>, regions: Vec<(u64, u64, u64)>) -> Self {
        IommuFront {
            main,
            main_lock,
            regions,
            model: Mutex::default(),
            changed: Condvar::new(),
            backend: Mutex::new(None),
        }
    }

    /// The frontend user address of `gpa`.
    pub fn uaddr(&self, gpa: u64) -> u64 {
        self.regions
            .iter()
            .find(|(g, s, _)| *g <= gpa && gpa < g + s)
            .map(|(g, _, u)| u + (gpa - g))
            .unwrap_or_else(|| panic!("GPA {gpa:#x} outside guest memory"))
    }

    /// Maps `len` bytes (whole pages) at `iova` to `gpa` in the model.
    pub fn map(&self, iova: u64, gpa: u64, len: u64, perm: VhostAccess) {
        let mut m = lock(&self.model);
        for off in (0..len).step_by(IOTLB_PAGE_SIZE as usize) {
            m.pages.insert(iova + off, (gpa + off, perm));
        }
    }

    /// Unmaps `len` bytes at `iova` in the model (no message is sent).
    pub fn unmap(&self, iova: u64, len: u64) {
        let mut m = lock(&self.model);
        for off in (0..len).step_by(IOTLB_PAGE_SIZE as usize) {
            m.pages.remove(&(iova + off));
        }
    }

    /// Never acks misses of the page of `iova`.
    pub fn set_silent(&self, iova: u64) {
        lock(&self.model)
            .silent
            .insert(iova & !(IOTLB_PAGE_SIZE - 1));
    }

    /// Holds (true) or releases (false) the answers to misses.
    pub fn hold(&self, on: bool) {
        lock(&self.model).hold = on;
        self.changed.notify_all();
    }

    /// Answers misses with their UPDATE only, never acking them (on), or
    /// acks them again (off).
    pub fn withhold_acks(&self, on: bool) {
        lock(&self.model).no_acks = on;
    }

    /// The misses received so far.
    pub fn misses(&self) -> Vec<MissSeen> {
        lock(&self.model).misses.clone()
    }

    /// Forgets the misses received so far.
    pub fn clear_misses(&self) {
        lock(&self.model).misses.clear();
    }

    /// Waits until at least `n` misses were received.
    pub fn wait_misses(&self, n: usize, timeout: Duration) -> bool {
        super::poll_until(timeout, || {
            (lock(&self.model).misses.len() >= n).then_some(())
        })
        .is_some()
    }

    /// Round trips of the misses answered so far, as the frontend saw them.
    pub fn answer_times(&self) -> Vec<Duration> {
        lock(&self.model).answer_times.clone()
    }

    fn shutdown(&self) {
        lock(&self.model).stop = true;
        self.changed.notify_all();
        if let Some(s) = lock(&self.backend).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Sends an IOTLB_MSG on the main channel and returns its ack value
    /// (None if the daemon closed the connection).
    pub fn send(&self, msg: &IotlbMsg) -> Option<u64> {
        let _g = lock(&self.main_lock);
        let h = FrameHeader::request(
            u32::from(FrontendReq::IOTLB_MSG),
            FLAG_NEED_REPLY,
            IOTLB_MSG_LEN as u32,
        );
        wire::write_frame(&self.main, &h, &msg.encode(), &[]).ok()?;
        let f = wire::read_frame(&self.main, FlagPolicy::VHOST_USER).ok()??;
        assert!(f.header.is_reply() && f.header.request == u32::from(FrontendReq::IOTLB_MSG));
        Some(u64_of(&f.payload))
    }

    /// UPDATE `iova..+size` -> the user address of `gpa`, `perm`.
    pub fn update(&self, iova: u64, size: u64, gpa: u64, perm: VhostAccess) -> u64 {
        self.send(&IotlbMsg {
            iova,
            size,
            uaddr: self.uaddr(gpa),
            perm: perm as u8,
            kind: VhostIotlbType::Update as u8,
            padding: [0; 6],
        })
        .expect("UPDATE acked")
    }

    /// INVALIDATE `iova..+size`; returns the ack value.
    pub fn invalidate(&self, iova: u64, size: u64) -> u64 {
        self.send(&IotlbMsg {
            iova,
            size,
            kind: VhostIotlbType::Invalidate as u8,
            ..IotlbMsg::default()
        })
        .expect("INVALIDATE acked")
    }

    /// The backend-channel server: one miss at a time, as QEMU.
    fn serve(&self, sock: UnixStream) {
        *lock(&self.backend) = Some(sock.try_clone().expect("dup backend channel"));
        while let Ok(Some(f)) = wire::read_frame(&sock, FlagPolicy::VHOST_USER) {
            let got = Instant::now();
            // A resize's CONFIG_CHANGE_MSG (no reply asked): counted.
            if f.header.request == u32::from(BackendReq::CONFIG_CHANGE_MSG) {
                lock(&self.model).config_changes += 1;
                continue;
            }
            assert_eq!(f.header.request, u32::from(BackendReq::IOTLB_MSG));
            let msg = IotlbMsg::decode(&f.payload).expect("32-byte IOTLB message");
            assert_eq!(msg.kind, VhostIotlbType::Miss as u8, "only misses come");
            let page = msg.iova & !(IOTLB_PAGE_SIZE - 1);
            let (answer, no_ack) = {
                let mut m = lock(&self.model);
                m.misses.push(MissSeen {
                    iova: msg.iova,
                    perm: msg.perm,
                    at: got,
                });
                while m.hold && !m.stop {
                    m = self.changed.wait(m).unwrap_or_else(|p| p.into_inner());
                }
                if m.stop {
                    return;
                }
                if m.silent.contains(&page) {
                    continue;
                }
                (m.pages.get(&page).copied(), m.no_acks)
            };
            let ok = match answer {
                Some((gpa, perm)) => self.update(page, IOTLB_PAGE_SIZE, gpa, perm) == 0,
                None => false,
            };
            if f.header.need_reply() && !no_ack {
                let v = u64::from(!ok).to_le_bytes();
                if wire::write_frame(&sock, &f.header.reply(8), &v, &[]).is_err() {
                    return;
                }
            }
            lock(&self.model).answer_times.push(got.elapsed());
        }
    }
}
