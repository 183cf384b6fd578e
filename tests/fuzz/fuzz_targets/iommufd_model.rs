//! iommufd command sequences (map at a fixed or an allocated IOVA, unmap,
//! unmap all, copy, writes through a translation) on two IOASes, each
//! checked against the page-granular reference model of the iommu crate
//! (`vcdev_iommu::model`, which its proptest uses too): the same result
//! or errno, the same areas, and every page translating to the file page
//! the model says. Input format: `vcdev_fuzz::model_op`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vcdev_fuzz::{model_op, Input};
use vcdev_iommu::model::Checker;

/// Commands per input: enough to fill and empty the window.
const MAX_OPS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let mut check = Checker::new();
    let mut n = 0;
    while !inp.is_empty() && n < MAX_OPS {
        n += 1;
        let op = model_op(&mut inp);
        if let Err(e) = check.apply(&op) {
            panic!("iommufd differs from the reference model: {e}");
        }
    }
});
