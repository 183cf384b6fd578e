//! The group/container errno agreement table (issue #13): one list of
//! cases, each a short sequence of VFIO calls on fresh files, run through
//! either transport. The guest runs it on Linux's legacy type1 container
//! (`drivers/vfio/container.c`, `vfio_iommu_type1.c`, `group.c`), the host
//! on vcdev's group door, which follows the kernel's iommufd-backed
//! container compat (`drivers/iommu/iommufd/vfio_compat.c`) by design
//! (PROTOCOL.md "Container and group files"). Where the two kernels
//! differ, the case records both answers and why.

use std::fmt;
use std::path::Path;

use vcdev::cdev::vfio_uapi::{
    VFIO_DMA_CC_IOMMU, VFIO_DMA_UNMAP_FLAG_ALL, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_TYPE1V2_IOMMU, VFIO_UNMAP_ALL,
};
use vcdev_device_model::pci::RegionIndex;
use vcdev_iommu::Errno;
use vmm_sys_util::eventfd::EventFd;

use crate::blk::{evfd, VFIO_PCI_MSIX_IRQ_INDEX};
use crate::mem::Region;
use crate::vfio::{Vfio, DMA_RW};

/// `VFIO_SPAPR_TCE_IOMMU`: an IOMMU type neither x86 kernel nor vcdev has.
pub const VFIO_SPAPR_TCE_IOMMU: u32 = 2;

/// The IOVA the DMA cases map at.
const IOVA: u64 = 0x10_0000;
/// The bytes they map.
const LEN: u64 = 0x1_0000;
/// One page.
const PAGE: u64 = 0x1000;

/// The result of a case: a value (ioctl result, or the field named in the
/// case) or an errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success with this value.
    Ok(u64),
    /// Failure with this errno.
    Err(Errno),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok(v) => write!(f, "{v:#x}"),
            Outcome::Err(e) => write!(f, "{e}"),
        }
    }
}

impl Outcome {
    /// Parses [`Outcome`]'s `Display` form.
    pub fn parse(s: &str) -> Option<Outcome> {
        if let Some(hex) = s.strip_prefix("0x") {
            return u64::from_str_radix(hex, 16).ok().map(Outcome::Ok);
        }
        ERRNO_NAMES
            .iter()
            .find(|e| e.name() == Some(s))
            .map(|&e| Outcome::Err(e))
    }
}

const ERRNO_NAMES: [Errno; 12] = [
    Errno::EINVAL,
    Errno::ENODEV,
    Errno::EBUSY,
    Errno::EBADF,
    Errno::EBADFD,
    Errno::EEXIST,
    Errno::ENOENT,
    Errno::ENOTTY,
    Errno::EFAULT,
    Errno::EPERM,
    Errno::ENOSPC,
    Errno::EOPNOTSUPP,
];

/// Where the nodes are and which device to ask for.
pub struct Env<'a> {
    /// `/dev/vfio/vfio` or `DIR/vfio/vfio`.
    pub container: &'a Path,
    /// `/dev/vfio/N` or `DIR/vfio/N`: the group of `device`.
    pub group: &'a Path,
    /// The device's name in the group (a PCI address for the kernel, the
    /// device NAME for vcdev).
    pub device: &'a str,
}

/// Expected outcomes: `Ok(v)` or an errno, the same string
/// [`Outcome`]'s `Display` gives.
type Want = &'static str;

/// One case of the table.
pub struct Case {
    /// Its name (`VCDEV-RESULT case=NAME`).
    pub name: &'static str,
    /// What it does.
    pub what: &'static str,
    /// The answer of Linux's legacy type1 container (the guest's kernel).
    pub type1: Want,
    /// vcdev's answer (iommufd's container compat).
    pub vcdev: Want,
    /// Why the two differ, empty when they agree.
    pub why: &'static str,
}

impl Case {
    /// Whether the two transports agree.
    pub fn agrees(&self) -> bool {
        self.type1 == self.vcdev
    }
}

/// The cases, in the order they run.
pub const CASES: &[Case] = &[
    Case { name: "api_version", what: "GET_API_VERSION", type1: "0x0", vcdev: "0x0", why: "" },
    Case { name: "ext_type1v2", what: "CHECK_EXTENSION(TYPE1v2)", type1: "0x1", vcdev: "0x1", why: "" },
    Case { name: "ext_spapr", what: "CHECK_EXTENSION(SPAPR_TCE)", type1: "0x0", vcdev: "0x0", why: "" },
    Case { name: "ext_unmap_all", what: "CHECK_EXTENSION(UNMAP_ALL)", type1: "0x1", vcdev: "0x1", why: "" },
    Case {
        name: "ext_dma_cc_empty",
        what: "CHECK_EXTENSION(DMA_CC_IOMMU) on a container without a group",
        type1: "0x0",
        vcdev: "ENODEV",
        why: "type1 asks each driver with no container data: 0; the compat asks the compat IOAS, which does not exist yet (`iommufd_vfio_cc_iommu`: ENODEV)",
    },
    Case {
        name: "set_iommu_empty",
        what: "SET_IOMMU(TYPE1v2) on a container without a group",
        type1: "EINVAL",
        vcdev: "ENODEV",
        why: "`vfio_ioctl_set_iommu`: no group is EINVAL; the compat looks the compat IOAS up first (`get_compat_ioas`: ENODEV)",
    },
    Case { name: "group_status", what: "GROUP_GET_STATUS of a fresh group (flags)", type1: "0x1", vcdev: "0x1", why: "" },
    Case { name: "group_open_twice", what: "open the group node a second time", type1: "EBUSY", vcdev: "EBUSY", why: "" },
    Case { name: "get_device_fd_no_container", what: "GROUP_GET_DEVICE_FD before SET_CONTAINER", type1: "EINVAL", vcdev: "EINVAL", why: "" },
    Case { name: "get_device_fd_unknown", what: "GROUP_GET_DEVICE_FD of a name not in the group, no container", type1: "ENODEV", vcdev: "ENODEV", why: "" },
    Case { name: "set_container_eventfd", what: "GROUP_SET_CONTAINER with an eventfd", type1: "EBADFD", vcdev: "EBADFD", why: "" },
    Case { name: "unset_container_none", what: "GROUP_UNSET_CONTAINER without a container", type1: "EINVAL", vcdev: "EINVAL", why: "" },
    Case { name: "group_status_set", what: "GROUP_GET_STATUS after SET_CONTAINER (flags)", type1: "0x3", vcdev: "0x3", why: "" },
    Case { name: "set_container_twice", what: "a second GROUP_SET_CONTAINER", type1: "EINVAL", vcdev: "EINVAL", why: "" },
    Case {
        name: "map_dma_before_set_iommu",
        what: "MAP_DMA with the group set, before SET_IOMMU",
        type1: "EINVAL",
        vcdev: "0x0",
        why: "type1 has no IOMMU driver until SET_IOMMU (`vfio_fops_unl_ioctl`: EINVAL); the compat IOAS exists once a group joined, and MAP_DMA goes to it",
    },
    Case { name: "set_iommu_unknown", what: "SET_IOMMU(SPAPR_TCE) with the group set", type1: "ENODEV", vcdev: "EINVAL", why: "`vfio_ioctl_set_iommu`: no driver takes the type, ENODEV; `iommufd_vfio_set_iommu` refuses types other than TYPE1/TYPE1v2 with EINVAL" },
    Case { name: "set_iommu", what: "SET_IOMMU(TYPE1v2) with the group set", type1: "0x0", vcdev: "0x0", why: "" },
    Case {
        name: "set_iommu_twice",
        what: "a second SET_IOMMU(TYPE1v2)",
        type1: "EINVAL",
        vcdev: "0x0",
        why: "`vfio_ioctl_set_iommu` refuses a container that has its IOMMU driver (EINVAL); `iommufd_vfio_set_iommu` only records the type again",
    },
    Case { name: "iommu_info_flags", what: "IOMMU_GET_INFO flags & (PGSIZES | CAPS)", type1: "0x3", vcdev: "0x3", why: "" },
    Case { name: "map_dma", what: "MAP_DMA 64 KiB read-write at 0x100000", type1: "0x0", vcdev: "0x0", why: "" },
    Case { name: "map_dma_overlap", what: "MAP_DMA over a mapped range", type1: "EEXIST", vcdev: "EEXIST", why: "" },
    Case {
        name: "map_dma_unaligned",
        what: "MAP_DMA of a page at an IOVA half a page off, no device open",
        type1: "EINVAL",
        vcdev: "0x0",
        why: "type1 requires the smallest IOMMU page size alignment (`vfio_dma_do_map`); an IOAS no device is attached to has alignment 1 (PROTOCOL.md, `iopt_check_iova`), and the compat attaches the group's devices only when their files open",
    },
    Case {
        name: "map_dma_no_prot",
        what: "MAP_DMA with neither READ nor WRITE (the kernel's IOMMU drivers refuse it in the domain, e.g. intel `__domain_mapping`; vcdev always)",
        type1: "EINVAL",
        vcdev: "EINVAL",
        why: "",
    },
    Case { name: "map_dma_zero", what: "MAP_DMA of 0 bytes", type1: "EINVAL", vcdev: "EINVAL", why: "" },
    Case {
        name: "unmap_dma_partial",
        what: "UNMAP_DMA of the first page of a 64 KiB mapping",
        type1: "EINVAL",
        vcdev: "ENOENT",
        why: "TYPE1v2 refuses to split a mapping with EINVAL (`vfio_dma_do_unmap`); iommufd refuses to cut an area with ENOENT (`iopt_unmap_iova_range`)",
    },
    Case {
        name: "unmap_dma_nothing",
        what: "UNMAP_DMA of a range with no mapping (bytes unmapped)",
        type1: "0x0",
        vcdev: "ENOENT",
        why: "type1 unmaps nothing and says 0 bytes; iommufd's `iopt_unmap_iova_range` answers ENOENT when no area was unmapped",
    },
    Case {
        name: "unmap_dma_unaligned",
        what: "UNMAP_DMA of half a page of a 64 KiB mapping",
        type1: "EINVAL",
        vcdev: "ENOENT",
        why: "type1 wants iova and size aligned to its smallest page (`vfio_dma_do_unmap`: EINVAL); iommufd unmaps whole areas inside the range and this one ends past it (`iopt_unmap_iova_range`: ENOENT)",
    },
    Case { name: "unmap_dma_bad_flags", what: "UNMAP_DMA with flag bit 5", type1: "EINVAL", vcdev: "EINVAL", why: "" },
    Case { name: "unmap_dma_all", what: "UNMAP_DMA with FLAG_ALL (bytes unmapped)", type1: "0x10000", vcdev: "0x10000", why: "" },
    Case { name: "get_device_fd", what: "GROUP_GET_DEVICE_FD of the device", type1: "0x0", vcdev: "0x0", why: "" },
    Case { name: "unset_container_device_open", what: "GROUP_UNSET_CONTAINER while a device file is open", type1: "EBUSY", vcdev: "EBUSY", why: "" },
    Case { name: "device_flags", what: "DEVICE_GET_INFO flags (PCI | RESET)", type1: "0x3", vcdev: "0x3", why: "" },
    Case { name: "device_regions", what: "DEVICE_GET_INFO num_regions", type1: "0x9", vcdev: "0x9", why: "" },
    Case { name: "device_irqs", what: "DEVICE_GET_INFO num_irqs", type1: "0x5", vcdev: "0x5", why: "" },
    Case { name: "msix_count", what: "DEVICE_GET_IRQ_INFO(MSIX) count (1 queue + config)", type1: "0x2", vcdev: "0x2", why: "" },
    Case { name: "msix_disable_when_off", what: "SET_IRQS(MSIX, DATA_NONE, count 0) while MSI-X is off", type1: "EINVAL", vcdev: "EINVAL", why: "" },
    Case { name: "ioeventfd_config", what: "DEVICE_IOEVENTFD on config space", type1: "EINVAL", vcdev: "EINVAL", why: "" },
    Case { name: "attach_pt_group_device", what: "DEVICE_ATTACH_IOMMUFD_PT on a device file got through the group", type1: "ENOTTY", vcdev: "ENOTTY", why: "" },
    Case {
        name: "bind_iommufd_group_device",
        what: "DEVICE_BIND_IOMMUFD on a device file got through the group",
        type1: "ENOTTY",
        vcdev: "EINVAL",
        why: "the guest kernel (Debian, no IOMMUFD) is built without VFIO_DEVICE_CDEV, so BIND reaches vfio-pci: ENOTTY; with the cdev, `vfio_df_ioctl_bind_iommufd` refuses a group's device file with EINVAL, as vcdev does",
    },
    Case { name: "reset", what: "DEVICE_RESET", type1: "0x0", vcdev: "0x0", why: "" },
];

/// The files of a case: opened fresh, dropped at its end.
struct Files<F> {
    container: F,
    group: F,
}

fn open<F: Vfio>(env: &Env<'_>) -> Result<Files<F>, Errno> {
    Ok(Files {
        container: F::open(env.container)?,
        group: F::open(env.group)?,
    })
}

/// A container with the group set.
fn joined<F: Vfio>(env: &Env<'_>) -> Result<Files<F>, Errno> {
    let f = open::<F>(env)?;
    f.group.group_set_container(&f.container)?;
    Ok(f)
}

/// A container with the group set and TYPE1v2.
fn typed<F: Vfio>(env: &Env<'_>) -> Result<Files<F>, Errno> {
    let f = joined::<F>(env)?;
    f.container.set_iommu(VFIO_TYPE1V2_IOMMU)?;
    Ok(f)
}

fn ok<T>(r: Result<T, Errno>) -> Result<u64, Errno> {
    r.map(|_| 0)
}

fn val(r: Result<i32, Errno>) -> Result<u64, Errno> {
    r.map(|v| u64::try_from(v).unwrap_or(u64::MAX))
}

/// Runs case `name`: its outcome.
fn run_one<F: Vfio>(name: &str, env: &Env<'_>, mem: &Region) -> Result<u64, Errno> {
    match name {
        "api_version" => val(F::open(env.container)?.get_api_version()),
        "ext_type1v2" => val(F::open(env.container)?.check_extension(VFIO_TYPE1V2_IOMMU)),
        "ext_spapr" => val(F::open(env.container)?.check_extension(VFIO_SPAPR_TCE_IOMMU)),
        "ext_unmap_all" => val(F::open(env.container)?.check_extension(VFIO_UNMAP_ALL)),
        "ext_dma_cc_empty" => val(F::open(env.container)?.check_extension(VFIO_DMA_CC_IOMMU)),
        "set_iommu_empty" => ok(F::open(env.container)?.set_iommu(VFIO_TYPE1V2_IOMMU)),
        "group_status" => Ok(u64::from(open::<F>(env)?.group.group_get_status()?)),
        "group_open_twice" => {
            let _f = open::<F>(env)?;
            ok(F::open(env.group))
        }
        "get_device_fd_no_container" => ok(open::<F>(env)?.group.group_get_device_fd(env.device)),
        "get_device_fd_unknown" => ok(open::<F>(env)?.group.group_get_device_fd("nosuch")),
        "set_container_eventfd" => {
            let ev = EventFd::new(0).map_err(|e| Errno::from_io(&e))?;
            ok(open::<F>(env)?.group.group_set_container_fd(evfd(&ev)))
        }
        "unset_container_none" => ok(open::<F>(env)?.group.group_unset_container()),
        "group_status_set" => Ok(u64::from(joined::<F>(env)?.group.group_get_status()?)),
        "set_container_twice" => {
            let f = joined::<F>(env)?;
            ok(f.group.group_set_container(&f.container))
        }
        "map_dma_before_set_iommu" => ok(joined::<F>(env)?
            .container
            .map_dma(mem, 0, IOVA, LEN, DMA_RW)),
        "set_iommu_unknown" => ok(joined::<F>(env)?.container.set_iommu(VFIO_SPAPR_TCE_IOMMU)),
        "set_iommu" => ok(joined::<F>(env)?.container.set_iommu(VFIO_TYPE1V2_IOMMU)),
        "set_iommu_twice" => ok(typed::<F>(env)?.container.set_iommu(VFIO_TYPE1V2_IOMMU)),
        "iommu_info_flags" => Ok(u64::from(
            typed::<F>(env)?.container.iommu_info_flags()?
                & (VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS),
        )),
        "map_dma" => ok(typed::<F>(env)?
            .container
            .map_dma(mem, 0, IOVA, LEN, DMA_RW)),
        "map_dma_overlap" => {
            let f = typed::<F>(env)?;
            f.container.map_dma(mem, 0, IOVA, LEN, DMA_RW)?;
            ok(f.container.map_dma(mem, 0, IOVA + PAGE, PAGE, DMA_RW))
        }
        "map_dma_unaligned" => {
            ok(typed::<F>(env)?
                .container
                .map_dma(mem, 0, IOVA + PAGE / 2, PAGE, DMA_RW))
        }
        "map_dma_no_prot" => ok(typed::<F>(env)?.container.map_dma(mem, 0, IOVA, LEN, 0)),
        "map_dma_zero" => ok(typed::<F>(env)?.container.map_dma(mem, 0, IOVA, 0, DMA_RW)),
        "unmap_dma_partial" => {
            let f = typed::<F>(env)?;
            f.container.map_dma(mem, 0, IOVA, LEN, DMA_RW)?;
            f.container.unmap_dma(IOVA, PAGE, 0)
        }
        "unmap_dma_unaligned" => {
            let f = typed::<F>(env)?;
            f.container.map_dma(mem, 0, IOVA, LEN, DMA_RW)?;
            f.container.unmap_dma(IOVA, PAGE / 2, 0)
        }
        "unmap_dma_nothing" => typed::<F>(env)?.container.unmap_dma(IOVA, PAGE, 0),
        "unmap_dma_bad_flags" => typed::<F>(env)?.container.unmap_dma(IOVA, PAGE, 1 << 5),
        "unmap_dma_all" => {
            let f = typed::<F>(env)?;
            f.container.map_dma(mem, 0, IOVA, LEN, DMA_RW)?;
            f.container.unmap_dma(0, 0, VFIO_DMA_UNMAP_FLAG_ALL)
        }
        "get_device_fd" => ok(typed::<F>(env)?.group.group_get_device_fd(env.device)),
        "unset_container_device_open" => {
            let f = typed::<F>(env)?;
            let _dev = f.group.group_get_device_fd(env.device)?;
            ok(f.group.group_unset_container())
        }
        "device_flags" | "device_regions" | "device_irqs" => {
            let f = typed::<F>(env)?;
            let info = f.group.group_get_device_fd(env.device)?.device_info()?;
            Ok(u64::from(match name {
                "device_flags" => info.flags,
                "device_regions" => info.num_regions,
                _ => info.num_irqs,
            }))
        }
        "msix_count" => {
            let f = typed::<F>(env)?;
            let dev = f.group.group_get_device_fd(env.device)?;
            Ok(u64::from(dev.irq_info(VFIO_PCI_MSIX_IRQ_INDEX)?.count))
        }
        "msix_disable_when_off" => {
            let f = typed::<F>(env)?;
            let dev = f.group.group_get_device_fd(env.device)?;
            ok(dev.set_irqs_disable(VFIO_PCI_MSIX_IRQ_INDEX))
        }
        "ioeventfd_config" => {
            let f = typed::<F>(env)?;
            let dev = f.group.group_get_device_fd(env.device)?;
            let config = dev.region_info(RegionIndex::Config as u32)?.offset;
            let ev = EventFd::new(0).map_err(|e| Errno::from_io(&e))?;
            ok(dev.ioeventfd(config, 2, 0, Some(evfd(&ev))))
        }
        "attach_pt_group_device" => {
            let f = typed::<F>(env)?;
            ok(f.group.group_get_device_fd(env.device)?.attach_pt(1))
        }
        "bind_iommufd_group_device" => {
            let f = typed::<F>(env)?;
            let dev = f.group.group_get_device_fd(env.device)?;
            ok(dev.bind_iommufd(&f.container))
        }
        "reset" => {
            let f = typed::<F>(env)?;
            ok(f.group.group_get_device_fd(env.device)?.reset())
        }
        _ => Err(Errno::ENOTTY),
    }
}

/// Runs every case through transport `F`: (name, outcome) in table order.
pub fn run<F: Vfio>(env: &Env<'_>) -> Vec<(&'static str, Outcome)> {
    let mem = Region::new(0, LEN);
    CASES
        .iter()
        .map(|c| {
            let out = match run_one::<F>(c.name, env, &mem) {
                Ok(v) => Outcome::Ok(v),
                Err(e) => Outcome::Err(e),
            };
            (c.name, out)
        })
        .collect()
}

/// The table as Markdown, and why each disagreement is by design
/// (README.md carries both; a unit test keeps them equal).
pub fn markdown() -> String {
    let mut s = String::from(
        "| case | calls | Linux type1 (guest) | vcdev group door | agree |\n|---|---|---|---|---|\n",
    );
    for c in CASES {
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            c.name,
            c.what,
            c.type1,
            c.vcdev,
            if c.agrees() { "yes" } else { "by design" }
        ));
    }
    s.push('\n');
    for c in CASES.iter().filter(|c| !c.agrees()) {
        s.push_str(&format!("- `{}`: {}.\n", c.name, c.why));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every expected outcome parses, names are unique, and a case has a
    /// reason exactly when the transports disagree.
    #[test]
    fn the_table_is_well_formed() {
        let mut names = std::collections::BTreeSet::new();
        for c in CASES {
            assert!(names.insert(c.name), "{} twice", c.name);
            for want in [c.type1, c.vcdev] {
                assert!(Outcome::parse(want).is_some(), "{}: {want}", c.name);
                assert_eq!(
                    Outcome::parse(want).map(|o| o.to_string()).as_deref(),
                    Some(want)
                );
            }
            assert_eq!(
                c.agrees(),
                c.why.is_empty(),
                "{}: reason iff disagreement",
                c.name
            );
        }
    }

    /// README.md carries the table as [`markdown`] renders it.
    #[test]
    fn readme_carries_the_table() {
        let readme = include_str!("../../README.md");
        let table = markdown();
        assert!(
            readme.contains(&table),
            "README.md lacks the current errno table; it should contain:\n{table}"
        );
    }
}
