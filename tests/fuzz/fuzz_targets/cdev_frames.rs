//! cdev requests into each file kind, in-process through the real
//! dispatch tables (`vcdev::cdev::dispatch`): an iommufd file with a
//! device file bound to it (attached to an IOAS or not), an unbound
//! device file, a container file with a group file (its container set or
//! not). The fixtures and the oracle are the proptests'
//! (`vcdev::testing::cdev`): every reply is `>= 0` or an errno the
//! kernel's ioctls give, with no descriptor; after a request that was not
//! a protocol violation, a valid request on the same file still works.
//! Input format: `vcdev_fuzz::cdev_req` (the scenario byte first).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vcdev::cdev::device_file::DeviceFile;
use vcdev::cdev::files::FileKind;
use vcdev::cdev::iommufd_file::IommufdFile;
use vcdev::cdev::vfio_uapi::VFIO_DEVICE_GET_INFO;
use vcdev::testing::cdev::*;
use vcdev_fuzz::{cdev_req, Input};

/// Requests per input.
const MAX_REQS: usize = 48;

fn check(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

fn iommufd_and_device(inp: &mut Input<'_>, dev: usize, bound: bool, attach: bool) {
    let server = server();
    let ictx = IommufdFile::new(server.files(), server.seal_policy());
    let fds = Fds {
        ictx: server.files().hand_out(ictx.clone()).expect("hand out"),
    };
    let d = DeviceFile::new_cdev(server.files(), server.devices()[dev].clone());
    if bound {
        check(bind(&d, &fds));
        if attach {
            check(attach_new_ioas(&ictx, &d).map(drop));
        }
    }
    let mut n = 0;
    while !inp.is_empty() && n < MAX_REQS {
        n += 1;
        let r = cdev_req(inp);
        if r.on_device || !bound {
            let violation = run(d.as_ref(), &r.raw, &fds).unwrap_or_else(|e| panic!("{e}"));
            if !violation && bound {
                check(valid(d.as_ref(), VFIO_DEVICE_GET_INFO, device_info_payload()).map(drop));
            }
        } else {
            let violation = run(ictx.as_ref(), &r.raw, &fds).unwrap_or_else(|e| panic!("{e}"));
            if !violation {
                check(iommufd_still_works(&ictx));
            }
        }
    }
    d.release();
}

fn container_and_group(inp: &mut Input<'_>, set: bool) {
    use vcdev::cdev::vfio_uapi::{VfioGroupStatus, VFIO_GET_API_VERSION, VFIO_GROUP_GET_STATUS};
    use vm_memory::ByteValued;

    let server = server();
    let c = vcdev::cdev::container::open(server.files(), server.seal_policy());
    let fds = Fds {
        ictx: server.files().hand_out(c.clone()).expect("hand out"),
    };
    let group = server.devices()[2].reg().group();
    let g = server.open_group(group, false).expect("group file");
    if set {
        check(set_container(&g, &fds));
    }
    let mut n = 0;
    while !inp.is_empty() && n < MAX_REQS {
        n += 1;
        let r = cdev_req(inp);
        if r.on_device {
            let violation = run(g.as_ref(), &r.raw, &fds).unwrap_or_else(|e| panic!("{e}"));
            if !violation {
                let st = VfioGroupStatus { argsz: 8, flags: 0 };
                check(valid(g.as_ref(), VFIO_GROUP_GET_STATUS, st.as_slice().to_vec()).map(drop));
            }
        } else {
            let violation = run(c.as_ref(), &r.raw, &fds).unwrap_or_else(|e| panic!("{e}"));
            if !violation {
                check(valid(c.as_ref(), VFIO_GET_API_VERSION, Vec::new()).map(drop));
            }
        }
    }
    g.release();
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let s = inp.u8();
    let dev = usize::from(s >> 2 & 1);
    let flag = s & 8 != 0;
    match s % 4 {
        1 => iommufd_and_device(&mut inp, dev, false, false),
        2 => container_and_group(&mut inp, flag),
        _ => iommufd_and_device(&mut inp, dev, true, flag),
    }
});
