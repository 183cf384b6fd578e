//! `vfio_blk`: one userspace virtio-blk driver ([`vcdev_tests::blk`]) run
//! against one VFIO device on either transport, statically linked so that
//! the same binary runs in the test guest (issue #13).
//!
//! ```text
//! vfio_blk blk   --transport kernel|vcdev
//!                (--container PATH --group PATH --device NAME | --iommu PATH --cdev PATH)
//!                [--irq msix|poll] [--notify ioeventfd|write] [--access rw|mmap]
//!                [--sector N] [--bytes N] [--seed N] [--queue-size N]
//! vfio_blk cases --transport kernel|vcdev --container PATH --group PATH --device NAME
//! ```
//!
//! `--access mmap` reaches the virtio structures through an mmap of their
//! BAR when the region allows it, and says `access=rw` when none does.
//! `blk` resets the device (VFIO_DEVICE_RESET, when it has it), brings
//! it up, writes `--bytes` of [`vcdev_tests::mem::pattern`]`(seed)` at
//! `--sector`, flushes, reads them back and compares; then it unmaps the
//! data buffers from the IOMMU and reads into them again, which must fail
//! with VIRTIO_BLK_S_IOERR (`unmapped_read=1:untouched`) and leave them
//! as they were; last it writes virtio status 0 and turns MSI-X off. It
//! prints one line:
//!
//! ```text
//! VCDEV-RESULT vfio_blk=ok|fail transport=.. path=group|iommufd irq=.. notify=.. access=rw|mmap
//!     ids=VVVV:DDDD
//!     common=BAR:OFF notify_at=BAR:OFF msix_bar=N features=0x.. sector=N bytes=N seed=N
//!     match=yes|no unmapped_read=STATUS:untouched|written requests=N irqs=N kicks=N io_us=N
//! ```
//!
//! (on one line), or `VCDEV-ERROR vfio_blk: <what failed>`. `cases` runs the
//! errno table of [`vcdev_tests::cases`] and prints `VCDEV-RESULT case=NAME
//! got=OUTCOME` per case. An invalid argument exits with 2, a failure with 1.

use std::path::PathBuf;
use std::process::ExitCode;

use vcdev::cdev::client::File as SockFile;
use vcdev_tests::blk::{BlkDriver, IrqMode, Notify, StartOpts};
use vcdev_tests::cases::{self, Env};
use vcdev_tests::mem::pattern;
use vcdev_tests::vfio::kernel::KernelFile;
use vcdev_tests::vfio::{GroupBinding, IommufdBinding, Transport, Vfio};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

/// The exit code of an invalid argument.
const EXIT_USAGE: u8 = 2;

const USAGE: &str = "usage: vfio_blk blk|cases --transport kernel|vcdev \
(--container PATH --group PATH --device NAME | --iommu PATH --cdev PATH) \
[--irq msix|poll] [--notify ioeventfd|write] [--access rw|mmap] [--sector N] [--bytes N] \
[--seed N] [--queue-size N]";

/// The validated arguments.
#[derive(Debug)]
struct Config {
    cases: bool,
    kernel: bool,
    container: Option<PathBuf>,
    group: Option<PathBuf>,
    device: Option<String>,
    iommu: Option<PathBuf>,
    cdev: Option<PathBuf>,
    irq: IrqMode,
    notify: Notify,
    sector: u64,
    bytes: u32,
    seed: u8,
    queue_size: u16,
    mmap: bool,
}

fn parse() -> Result<Config, String> {
    let mut args = std::env::args().skip(1);
    let cases = match args.next().as_deref() {
        Some("blk") => false,
        Some("cases") => true,
        _ => return Err("the first argument is blk or cases".into()),
    };
    let mut c = Config {
        cases,
        kernel: false,
        container: None,
        group: None,
        device: None,
        iommu: None,
        cdev: None,
        irq: IrqMode::Msix,
        notify: Notify::Ioeventfd,
        sector: 8,
        bytes: 64 << 10,
        seed: 1,
        queue_size: 64,
        mmap: false,
    };
    let mut transport = None;
    while let Some(opt) = args.next() {
        let v = args.next().ok_or_else(|| format!("{opt} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{opt} {v}: {e}"));
        match opt.as_str() {
            "--transport" => transport = Some(v),
            "--container" => c.container = Some(v.into()),
            "--group" => c.group = Some(v.into()),
            "--device" => c.device = Some(v),
            "--iommu" => c.iommu = Some(v.into()),
            "--cdev" => c.cdev = Some(v.into()),
            "--irq" => {
                c.irq = match v.as_str() {
                    "msix" => IrqMode::Msix,
                    "poll" => IrqMode::Poll,
                    _ => return Err(format!("--irq {v}: msix or poll")),
                }
            }
            "--notify" => {
                c.notify = match v.as_str() {
                    "ioeventfd" => Notify::Ioeventfd,
                    "write" => Notify::Write,
                    _ => return Err(format!("--notify {v}: ioeventfd or write")),
                }
            }
            "--sector" => c.sector = num(&v)?,
            "--bytes" => {
                c.bytes = u32::try_from(num(&v)?).map_err(|e| format!("--bytes: {e}"))?;
                if c.bytes == 0 || !c.bytes.is_multiple_of(512) || c.bytes > 1 << 20 {
                    return Err("--bytes: a multiple of 512 up to 1 MiB".into());
                }
            }
            "--seed" => c.seed = u8::try_from(num(&v)?).map_err(|e| format!("--seed: {e}"))?,
            "--access" => {
                c.mmap = match v.as_str() {
                    "mmap" => true,
                    "rw" => false,
                    _ => return Err(format!("--access {v}: mmap or rw")),
                }
            }
            "--queue-size" => {
                c.queue_size = u16::try_from(num(&v)?).map_err(|e| format!("--queue-size: {e}"))?;
            }
            _ => return Err(format!("unknown option {opt}")),
        }
    }
    c.kernel = match transport.as_deref() {
        Some("kernel") => true,
        Some("vcdev") => false,
        _ => return Err("--transport kernel or vcdev".into()),
    };
    let group_path = c.container.is_some() && c.group.is_some() && c.device.is_some();
    let cdev_path = c.iommu.is_some() && c.cdev.is_some();
    if group_path == cdev_path || (cases && !group_path) {
        return Err(
            "give --container, --group and --device, or (blk only) --iommu and --cdev".into(),
        );
    }
    Ok(c)
}

/// Runs the driver on `t`: the result line, or what failed.
fn blk<T: Transport>(t: T, c: &Config, transport: &str) -> Result<String, String> {
    let path = t.kind();
    let opts = StartOpts {
        irq: c.irq,
        notify: c.notify,
        mmap: c.mmap,
        reset: true,
        ..StartOpts::default()
    };
    let mut drv = BlkDriver::bring_up(t, c.queue_size, opts).map_err(|e| e.to_string())?;
    let data = pattern(c.seed, c.bytes as usize);
    let t0 = std::time::Instant::now();
    let ok = u8::try_from(VIRTIO_BLK_S_OK).unwrap_or(0);
    let st = drv.try_write(c.sector, &data).map_err(|e| e.to_string())?;
    if st != ok {
        return Err(format!("write status {st}"));
    }
    let st = drv.try_flush().map_err(|e| e.to_string())?;
    if st != ok {
        return Err(format!("flush status {st}"));
    }
    let (st, back) = drv.try_read(c.sector, c.bytes).map_err(|e| e.to_string())?;
    if st != ok {
        return Err(format!("read status {st}"));
    }
    let io_us = t0.elapsed().as_micros();
    let matched = back == data;
    let (st, untouched) = drv
        .try_unmapped_read(c.sector, c.bytes)
        .map_err(|e| e.to_string())?;
    let isolated = st == u8::try_from(VIRTIO_BLK_S_IOERR).unwrap_or(0) && untouched;
    drv.shutdown().map_err(|e| e.to_string())?;
    let at = |b: Option<vcdev_tests::blk::BarOffset>| {
        b.map_or_else(|| "none".into(), |b| format!("{}:{:#x}", b.bar, b.offset))
    };
    let s = drv.stats;
    Ok(format!(
        "VCDEV-RESULT vfio_blk={} transport={transport} path={path} irq={} notify={} access={} \
         ids={:04x}:{:04x} common={} notify_at={} msix_bar={} features={:#x} sector={} \
         bytes={} seed={} match={} unmapped_read={}:{} requests={} irqs={} kicks={} io_us={io_us}",
        if matched && isolated { "ok" } else { "fail" },
        match c.irq {
            IrqMode::Msix => "msix",
            IrqMode::Poll => "poll",
        },
        match c.notify {
            Notify::Ioeventfd => "ioeventfd",
            Notify::Write => "write",
        },
        if drv.maps.is_empty() { "rw" } else { "mmap" },
        drv.caps.ids.0,
        drv.caps.ids.1,
        at(drv.caps.common),
        at(drv.caps.notify.map(|n| n.0)),
        drv.caps
            .msix_bar
            .map_or_else(|| "none".into(), |b| b.to_string()),
        drv.features,
        c.sector,
        c.bytes,
        c.seed,
        if matched { "yes" } else { "no" },
        st,
        if untouched { "untouched" } else { "written" },
        s.requests,
        s.irqs,
        s.kicks,
    ))
}

fn run<F: Vfio>(c: &Config, transport: &str) -> Result<Vec<String>, String> {
    let opened = |e: vcdev_iommu::Errno| format!("opening the device: {e}");
    match (&c.container, &c.group, &c.device, &c.iommu, &c.cdev) {
        (Some(container), Some(group), Some(device), _, _) if c.cases => {
            let env = Env {
                container,
                group,
                device,
            };
            Ok(cases::run::<F>(&env)
                .into_iter()
                .map(|(name, got)| format!("VCDEV-RESULT case={name} got={got}"))
                .collect())
        }
        (Some(container), Some(group), Some(device), _, _) => {
            let t = GroupBinding::<F>::open(container, group, device).map_err(opened)?;
            Ok(vec![blk(t, c, transport)?])
        }
        (_, _, _, Some(iommu), Some(cdev)) => {
            let t = IommufdBinding::<F>::open(iommu, cdev).map_err(opened)?;
            Ok(vec![blk(t, c, transport)?])
        }
        _ => Err(USAGE.into()),
    }
}

fn main() -> ExitCode {
    let c = match parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vfio_blk: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let r = if c.kernel {
        run::<KernelFile>(&c, "kernel")
    } else {
        run::<SockFile>(&c, "vcdev")
    };
    match r {
        Ok(lines) => {
            let fail = lines.iter().any(|l| l.contains("vfio_blk=fail"));
            for l in lines {
                println!("{l}");
            }
            if fail {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            println!("VCDEV-ERROR vfio_blk: {e}");
            ExitCode::FAILURE
        }
    }
}
