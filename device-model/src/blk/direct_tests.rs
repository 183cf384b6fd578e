//! Tests of `direct=on`: `O_DIRECT` files, the advertised `blk_size`, and bounce buffers for
//! unaligned guest buffers, through [`AsyncQueue`] on both engines, byte for byte against the
//! RAM model.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

use super::aio::{Aio, Engine};
use super::bounce::{self, AlignedBuf};
use super::file::tests::TempImage;
use super::file::{dio_alignment, AlignSource, FileOptions};
use super::test_util::*;
use super::*;
use crate::testing::{blk_segments, BlkRequest, STATUS_UNSET};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const QSIZE: u16 = 16;
/// Large enough for a request past `bounce::ENGINE_MAX`.
const DISK: u64 = 8 << 20;
/// Where guest buffers are placed from: a page boundary, plus each piece's misalignment.
const PAGE: u64 = 4096;
/// Where `blk_size` sits in the config space.
const BLK_SIZE: u32 = std::mem::offset_of!(virtio_blk_config, blk_size) as u32;

/// A directory where `O_DIRECT` files work, or `None` (with the reason printed): the temp dir,
/// `/var/tmp`, then the current directory.
fn dio_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::temp_dir(),
        PathBuf::from("/var/tmp"),
        std::env::current_dir().ok()?,
    ];
    for dir in candidates {
        match probe_dio(&dir) {
            Ok(()) => return Some(dir),
            Err(e) => eprintln!("O_DIRECT does not work in {}: {e}", dir.display()),
        }
    }
    None
}

fn probe_dio(dir: &Path) -> io::Result<()> {
    let img = image_in(dir, PAGE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&img.path)?;
    let mut buf = AlignedBuf::new(4096, 4096).ok_or(io::ErrorKind::OutOfMemory)?;
    std::os::unix::fs::FileExt::write_all_at(&file, &buf, 0)?;
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0)
}

/// A scratch image of `len` bytes in `dir`, removed on drop.
fn image_in(dir: &Path, len: u64) -> TempImage {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = dir.join(format!(
        "vcdev-direct-{}-{}.img",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    File::create(&path).unwrap().set_len(len).unwrap();
    TempImage { path }
}

fn cfg() -> BlkConfig {
    BlkConfig {
        queue_size: QSIZE,
        serial: b"direct".to_vec(),
        ..BlkConfig::default()
    }
}

/// A `direct=on` device over `img`.
fn direct_device(img: &TempImage) -> Arc<BlkDevice> {
    let options = FileOptions {
        read_only: false,
        direct: true,
    };
    let file = FileBackend::open_with(&img.path, options).unwrap();
    // SAFETY: F_GETFL only reads the descriptor's flags; the backend keeps it open.
    let flags = unsafe { libc::fcntl(file.raw_fd().unwrap(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_DIRECT, 0, "opened without O_DIRECT");
    let backend: Arc<dyn BlockBackend> = Arc::new(file);
    Arc::new(BlkDevice::new(backend, cfg()).unwrap())
}

/// One data buffer of a request: how far past a page boundary it sits, and its contents.
type Piece = (u64, Buf);

/// Lay out a request with each data buffer at its misalignment, and offer it.
fn submit<M: InflightMemory>(
    d: &mut Driver<'_, M>,
    kind: u32,
    sector: u64,
    pieces: &[Piece],
) -> Submitted {
    let header = d.alloc(BlkRequest::HEADER_LEN, 0);
    let data: Vec<(u64, u32, u16)> = pieces
        .iter()
        .map(|(misalign, buf)| {
            let len = match buf {
                Buf::Out(bytes) => bytes.len() as u32,
                Buf::In(len) => *len,
            };
            let base = d.alloc(len + 2 * PAGE as u32, 0xee);
            let addr = base.next_multiple_of(PAGE) + misalign;
            match buf {
                Buf::Out(bytes) => {
                    d.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
                    (addr, len, R)
                }
                Buf::In(_) => (addr, len, W),
            }
        })
        .collect();
    let status = d.alloc(1, STATUS_UNSET);
    BlkRequest::new(kind, sector).write(d.mem, header, status);
    d.submit_descs(&BlkRequest::chain(header, &data, status))
}

/// A queue of `dev` on the engine `aio` (the sync engine on a backing without a file).
struct Runner<'m> {
    d: Driver<'m, GuestMemoryMmap<()>>,
}

impl<'m> Runner<'m> {
    fn new(mem: &'m GuestMemoryMmap<()>, dev: &Arc<BlkDevice>, aio: Aio) -> Self {
        let engine = Engine::new(aio, dev.backend().clone(), dev.queue_size());
        assert_eq!(
            engine.kind(),
            if dev.backend().raw_fd().is_some() {
                aio
            } else {
                Aio::Sync
            }
        );
        Self {
            d: Driver::with_engine(mem, dev.clone(), QSIZE, engine),
        }
    }

    /// Run one request to its completion.
    fn exec(&mut self, kind: u32, sector: u64, pieces: &[Piece]) -> Done {
        let sub = submit(&mut self.d, kind, sector, pieces);
        let out = self.d.run(FaultPolicy::Fail);
        assert_eq!((out.completed, out.fault), (1, None));
        let done = self.d.take_used(&sub);
        assert_eq!(done.head, sub.head);
        done
    }
}

/// One step of the scenario: a request, and whether a `direct=on` device must bounce it.
struct Step {
    kind: u32,
    sector: u64,
    pieces: Vec<Piece>,
    bounces: bool,
}

fn step(kind: u32, sector: u64, pieces: Vec<Piece>, bounces: bool) -> Step {
    Step {
        kind,
        sector,
        pieces,
        bounces,
    }
}

/// Every request type, with buffers at unaligned addresses (+1, +3, +512 bytes) and lengths
/// split across descriptors, and aligned ones that must go straight to the file. Offsets and
/// lengths are multiples of 4096, so a disk with 4K blocks takes them too.
fn scenario() -> Vec<Step> {
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let big = (bounce::ENGINE_MAX + 2 * PAGE) as usize;
    vec![
        // 8 KiB split 1000 + 3096 + 4096, at +1, +512 and aligned.
        step(
            VIRTIO_BLK_T_OUT,
            8,
            vec![
                (1, Buf::Out(pattern(1000, 1))),
                (512, Buf::Out(pattern(3096, 2))),
                (0, Buf::Out(pattern(4096, 3))),
            ],
            true,
        ),
        // Aligned address and length: no bounce.
        step(
            VIRTIO_BLK_T_OUT,
            64,
            vec![(0, Buf::Out(pattern(8192, 4)))],
            false,
        ),
        step(
            VIRTIO_BLK_T_IN,
            8,
            vec![(0, Buf::In(4096)), (1, Buf::In(4096))],
            true,
        ),
        step(
            VIRTIO_BLK_T_IN,
            0,
            vec![(512, Buf::In(700)), (3, Buf::In(3396)), (0, Buf::In(16384))],
            true,
        ),
        step(VIRTIO_BLK_T_IN, 64, vec![(0, Buf::In(8192))], false),
        step(VIRTIO_BLK_T_FLUSH, 0, vec![], false),
        step(VIRTIO_BLK_T_GET_ID, 0, vec![(1, Buf::In(20))], false),
        step(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            vec![(1, Buf::Out(blk_segments(&[(10, 4, 0), (66, 2, unmap)])))],
            false,
        ),
        step(
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![(0, Buf::Out(blk_segments(&[(200, 8, 0)])))],
            false,
        ),
        // Larger than an engine bounce: the async path moves it synchronously in chunks.
        step(
            VIRTIO_BLK_T_OUT,
            1024,
            vec![(1, Buf::Out(pattern(big, 5)))],
            true,
        ),
        step(
            VIRTIO_BLK_T_IN,
            1024,
            vec![(512, Buf::In(big as u32 - 4096)), (7, Buf::In(4096))],
            true,
        ),
        // Everything written so far, unaligned.
        step(
            VIRTIO_BLK_T_IN,
            0,
            vec![(1, Buf::In(512)), (2, Buf::In(96 * 512 - 512))],
            true,
        ),
        // A request the disk refuses: still answered, no bounce.
        step(VIRTIO_BLK_T_IN, DISK / 512, vec![(1, Buf::In(4096))], false),
    ]
}

/// Run the scenario on `dev` on the engine `path`, and on the RAM model; every completion and
/// every byte of both disks must agree, and `dev` must bounce exactly the unaligned reads and
/// writes when `bouncing`.
fn matches_the_model(dev: &Arc<BlkDevice>, path: Aio, bouncing: bool) {
    let (mem, model_mem) = (plain_mem(), plain_mem());
    let model = ram_blk(dev.capacity_bytes(), cfg());
    let mut sub = Runner::new(&mem, dev, path);
    let mut reference = Runner::new(&model_mem, &model, Aio::Sync);
    for (i, s) in scenario().iter().enumerate() {
        let before = bounce::bounced();
        let got = sub.exec(s.kind, s.sector, &s.pieces);
        let bounced = bounce::bounced() - before;
        let want = reference.exec(s.kind, s.sector, &s.pieces);
        let what = format!("step {i} ({path:?}, type {})", s.kind);
        assert_eq!(got.status, want.status, "{what}: status");
        assert_eq!(got.used_len, want.used_len, "{what}: used length");
        assert!(got.data == want.data, "{what}: data differ");
        assert_eq!(bounced, u64::from(bouncing && s.bounces), "{what}: bounces");
    }
    assert_eq!(sub.d.blk.in_flight(), 0);
    let read_all = |d: &Arc<BlkDevice>| {
        let mut all = AlignedBuf::new(DISK as usize, PAGE as usize).unwrap();
        d.backend()
            .read_at(0, &VolatileSlice::from(&mut all[..]))
            .unwrap();
        all.to_vec()
    };
    assert!(read_all(dev) == read_all(&model), "{path:?}: disks differ");
}

/// Alignment as the file reports it, printed for the record; the backend advertises it.
#[test]
fn alignment_is_discovered() {
    let mut dirs: Vec<PathBuf> = dio_dir().into_iter().collect();
    dirs.push(PathBuf::from("/dev/shm"));
    for dir in dirs {
        if !dir.is_dir() {
            continue;
        }
        let img = image_in(&dir, 1 << 20);
        let file = File::open(&img.path).unwrap();
        let a = dio_alignment(&file);
        eprintln!("O_DIRECT alignment in {}: {a:?}", dir.display());
        assert!(
            a.mem.is_power_of_two() && a.offset.is_power_of_two(),
            "{a:?}"
        );
        let options = FileOptions {
            read_only: false,
            direct: true,
        };
        match FileBackend::open_with(&img.path, options) {
            Ok(b) => {
                assert_eq!(b.direct(), Some(a));
                assert_eq!(b.mem_align(), a.mem as usize);
                assert_eq!(b.block_size(), a.offset.max(512));
                let dev = BlkDevice::new(Arc::new(b), cfg()).unwrap();
                let mut blk_size = [0u8; 4];
                dev.read_config(BLK_SIZE, &mut blk_size);
                assert_eq!(u32::from_le_bytes(blk_size), a.offset.max(512));
            }
            Err(e) => eprintln!("  O_DIRECT open refused there: {e}"),
        }
    }
    // Without direct=on, no alignment is asked for and blk_size stays 512.
    let img = TempImage::new(1 << 20);
    let b = FileBackend::open(&img.path, false).unwrap();
    assert_eq!((b.direct(), b.mem_align(), b.block_size()), (None, 1, 512));
}

#[test]
fn direct_file_through_io_uring_matches_the_model() {
    let Some(dir) = dio_dir() else {
        eprintln!("SKIP: no directory here supports O_DIRECT");
        return;
    };
    let img = image_in(&dir, DISK);
    matches_the_model(&direct_device(&img), Aio::IoUring, true);
}

#[test]
fn direct_file_through_sync_engine_matches_the_model() {
    let Some(dir) = dio_dir() else {
        eprintln!("SKIP: no directory here supports O_DIRECT");
        return;
    };
    let img = image_in(&dir, DISK);
    matches_the_model(&direct_device(&img), Aio::Sync, true);
}

/// Without direct=on nothing is bounced, whatever the buffers.
#[test]
fn buffered_file_is_never_bounced() {
    let img = TempImage::new(DISK);
    let backend: Arc<dyn BlockBackend> = Arc::new(FileBackend::open(&img.path, false).unwrap());
    let dev = Arc::new(BlkDevice::new(backend, cfg()).unwrap());
    matches_the_model(&dev, Aio::Sync, false);
    matches_the_model(&dev, Aio::IoUring, false);
}

/// A RAM disk that says its blocks are 4096 bytes and its buffers must be page-aligned, like
/// a 4K-native disk under O_DIRECT. It fails a transfer from or to an unaligned buffer, but
/// takes any offset (so only the device's blk_size rule refuses those), and counts transfers.
#[derive(Debug)]
struct FourK(RamBackend, AtomicU32);

impl FourK {
    fn check(&self, buf: &VolatileSlice<'_>) -> io::Result<()> {
        self.1.fetch_add(1, Ordering::Relaxed);
        if buf.len() % 4096 == 0 && buf.ptr_guard().as_ptr().addr() % 4096 == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }
}

impl BlockBackend for FourK {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        self.check(buf)?;
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        self.check(buf)?;
        self.0.write_at(offset, buf)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.0.write_zeroes(offset, len, unmap)
    }
    fn mem_align(&self) -> usize {
        4096
    }
    fn block_size(&self) -> u32 {
        4096
    }
}

/// Runs reads and writes on a device with 4096-byte blocks: offsets or lengths that are not
/// multiples of 4096 get IOERR (without reaching the disk, as `transfers` counts when it can);
/// aligned ones work, bounced when the guest's buffers are not page-aligned.
fn block_size_rule(dev: &Arc<BlkDevice>, path: Aio, transfers: &dyn Fn() -> u32) {
    let mut blk_size = [0u8; 4];
    dev.read_config(BLK_SIZE, &mut blk_size);
    assert_eq!(u32::from_le_bytes(blk_size), 4096);
    let mem = plain_mem();
    let mut r = Runner::new(&mem, dev, path);
    let data = pattern(8192, 9);
    let before = transfers();
    for (sector, len) in [(1u64, 4096u32), (8, 512), (8, 4096 + 512), (4, 4096)] {
        let w = r.exec(
            VIRTIO_BLK_T_OUT,
            sector,
            &[(0, Buf::Out(vec![1; len as usize]))],
        );
        assert_eq!(
            w.status, IOERR,
            "{path:?}: write of {len} at sector {sector}"
        );
        let rd = r.exec(VIRTIO_BLK_T_IN, sector, &[(0, Buf::In(len))]);
        assert_eq!(
            rd.status, IOERR,
            "{path:?}: read of {len} at sector {sector}"
        );
    }
    assert_eq!(
        transfers(),
        before,
        "{path:?}: a refused request reached the disk"
    );
    let before = bounce::bounced();
    let w = r.exec(
        VIRTIO_BLK_T_OUT,
        8,
        &[
            (1, Buf::Out(data[..100].to_vec())),
            (0, Buf::Out(data[100..].to_vec())),
        ],
    );
    assert_eq!(w.status, OK, "{path:?}");
    let rd = r.exec(VIRTIO_BLK_T_IN, 8, &[(3, Buf::In(8192))]);
    assert_eq!(rd.status, OK, "{path:?}");
    assert!(rd.data == data, "{path:?}: data differ");
    assert_eq!(bounce::bounced() - before, 2, "{path:?}: bounces");
    let rd = r.exec(
        VIRTIO_BLK_T_IN,
        8,
        &[(0, Buf::In(4096)), (0, Buf::In(4096))],
    );
    assert_eq!(rd.status, OK, "{path:?}");
    assert!(rd.data == data, "{path:?}: data differ");
    assert_eq!(
        bounce::bounced() - before,
        2,
        "{path:?}: aligned read bounced"
    );
}

/// (A backing without a file: the sync engine.)
#[test]
fn offsets_off_a_4096_block_get_ioerr() {
    let disk = Arc::new(FourK(RamBackend::new(1 << 20).unwrap(), AtomicU32::new(0)));
    let dev = Arc::new(BlkDevice::new(disk.clone(), cfg()).unwrap());
    block_size_rule(&dev, Aio::Sync, &|| disk.1.load(Ordering::Relaxed));
}

/// A loop device with 4096-byte logical blocks, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(image: &Path) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "-b", "4096", "--direct-io=on"])
            .arg(image)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The same rule on a real 4K-sector block device under O_DIRECT (root and `losetup` needed).
#[test]
fn loop_device_with_4096_byte_blocks() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: loop devices need root");
        return;
    }
    let Some(dir) = dio_dir() else {
        eprintln!("SKIP: no directory here supports O_DIRECT");
        return;
    };
    let img = image_in(&dir, 1 << 20);
    let dev = match Loop::attach(&img.path) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIP: losetup failed: {e}");
            return;
        }
    };
    let options = FileOptions {
        read_only: false,
        direct: true,
    };
    let file = FileBackend::open_with(Path::new(&dev.0), options).unwrap();
    let a = file.direct().unwrap();
    eprintln!("O_DIRECT alignment of {}: {a:?}", dev.0);
    assert_eq!(a.offset, 4096, "{a:?}");
    assert!(matches!(
        a.source,
        AlignSource::Statx | AlignSource::BlockDevice
    ));
    assert_eq!(file.block_size(), 4096);
    let blk = Arc::new(BlkDevice::new(Arc::new(file), cfg()).unwrap());
    block_size_rule(&blk, Aio::Sync, &|| 0);
    block_size_rule(&blk, Aio::IoUring, &|| 0);
}
