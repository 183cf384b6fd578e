//! A page-granular reference model of the IOAS commands (map at a fixed
//! or an allocated IOVA, unmap, copy, and writes through a translation),
//! and a checker that runs commands on a real [`Iommufd`] and on the model
//! side by side. The proptest in [`crate::ioas`] and the fuzz target
//! `iommufd_model` (`tests/fuzz`) drive it (feature `testing`).
//!
//! After every command the checker compares the result (the IOVA, the
//! bytes unmapped, or the errno) with the model's, each IOAS's areas with
//! the model's, and what every page of the window translates to (the u64
//! at its start, a tag of the file page behind it) with the model's.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::ioas::IoasError;
use crate::object::Iommufd;
use crate::test_util::*;
use crate::{Errno, IovaRange};

/// Pages of the IOVA space checked after every command.
pub const PAGES: u64 = 32;
/// Allocation window of both IOASes, first and last page.
pub const WIN: (u64, u64) = (1, 24);
/// Pages of the memfd every map uses.
pub const FILE_PAGES: u64 = 16;
/// The IOASes the checker allocates.
pub const IOASES: usize = 2;

/// One command, in pages. `ioas`, `dst` and `src` index the checker's
/// IOASes (taken modulo [`IOASES`]).
#[derive(Clone, Debug)]
pub enum Op {
    /// IOAS_MAP at a fixed IOVA of `npages` of the file from `file_page`.
    MapFixed {
        ioas: usize,
        page: u64,
        npages: u64,
        file_page: u64,
    },
    /// IOAS_MAP at an IOVA the IOAS allocates.
    MapAuto {
        ioas: usize,
        npages: u64,
        file_page: u64,
    },
    /// IOAS_UNMAP of `page..page+npages`.
    Unmap { ioas: usize, page: u64, npages: u64 },
    /// IOAS_UNMAP of everything (iova 0, length U64_MAX).
    UnmapAll { ioas: usize },
    /// IOAS_COPY, to a fixed IOVA when `dst_page` is given.
    Copy {
        dst: usize,
        src: usize,
        src_page: u64,
        npages: u64,
        dst_page: Option<u64>,
    },
    /// Writes `value` at the start of `page` through a translation.
    Write { ioas: usize, page: u64, value: u64 },
}

/// An IOAS of the model: first page -> (pages, file page of the first).
pub type Model = BTreeMap<u64, (u64, u64)>;

/// The area of `m` holding `page`: (first page, pages, file page).
pub fn model_find(m: &Model, page: u64) -> Option<(u64, u64, u64)> {
    let (&s, &(n, f)) = m.range(..=page).next_back()?;
    (page < s.saturating_add(n)).then_some((s, n, f))
}

/// Whether any page of `page..page+npages` is mapped in `m`.
pub fn model_overlaps(m: &Model, page: u64, npages: u64) -> bool {
    (page..page.saturating_add(npages)).any(|p| model_find(m, p).is_some())
}

/// The lowest page-aligned free position for an allocation (first fit;
/// the file offset's alignment bounds the IOVA's).
pub fn model_alloc(m: &Model, npages: u64, file_page: u64) -> Option<u64> {
    let mut align = (npages * P).next_power_of_two();
    if file_page != 0 {
        align = align.min(1 << (file_page * P).trailing_zeros());
    }
    let align = align / P;
    (WIN.0..=WIN.1)
        .filter(|p| p % align == 0 && p + npages - 1 <= WIN.1)
        .find(|&p| !model_overlaps(m, p, npages))
}

/// A real iommufd context and the model, run side by side.
pub struct Checker {
    ictx: Arc<Iommufd>,
    ids: [u32; IOASES],
    fd: OwnedFd,
    models: [Model; IOASES],
    /// File page -> the u64 at its start.
    content: Vec<u64>,
}

impl Default for Checker {
    fn default() -> Self {
        Self::new()
    }
}

/// The errno of a result that must be an error.
fn errno_of<T: std::fmt::Debug>(r: Result<T, IoasError>) -> Result<Errno, String> {
    match r {
        Ok(v) => Err(format!("expected an error, got {v:?}")),
        Err(e) => Ok(e.errno()),
    }
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, IoasError>, want: Errno) -> Result<(), String> {
    let got = errno_of(r)?;
    if got == want {
        Ok(())
    } else {
        Err(format!("errno {got}, the model says {want}"))
    }
}

fn expect_ok(r: Result<u64, IoasError>, want: u64) -> Result<(), String> {
    match r {
        Ok(v) if v == want => Ok(()),
        Ok(v) => Err(format!("returned {v:#x}, the model says {want:#x}")),
        Err(e) => Err(format!(
            "{e:?} (errno {}), the model says Ok({want:#x})",
            e.errno()
        )),
    }
}

impl Checker {
    /// Two IOASes, each allowed only the window, and a file of
    /// [`FILE_PAGES`] pages whose page i starts with the u64 i.
    pub fn new() -> Checker {
        let ictx = ctx();
        let ids = [ioas_alloc(&ictx), ioas_alloc(&ictx)];
        for id in ids {
            allow(&ictx, id, &[(WIN.0 * P, (WIN.1 + 1) * P - 1)]).expect("allow the window");
        }
        Checker {
            ictx,
            ids,
            fd: memfd(FILE_PAGES),
            models: [Model::new(), Model::new()],
            content: (0..FILE_PAGES).collect(),
        }
    }

    /// Runs `op` on both sides; an error names the first difference.
    pub fn apply(&mut self, op: &Op) -> Result<(), String> {
        self.command(op).map_err(|e| format!("{op:?}: {e}"))?;
        self.compare().map_err(|e| format!("after {op:?}: {e}"))
    }

    fn command(&mut self, op: &Op) -> Result<(), String> {
        let (ictx, fd) = (&self.ictx, &self.fd);
        match *op {
            Op::MapFixed {
                ioas,
                page,
                npages,
                file_page,
            } => {
                let ioas = ioas % IOASES;
                let r = map_fixed(
                    ictx,
                    self.ids[ioas],
                    fd,
                    file_page * P,
                    npages * P,
                    page * P,
                );
                if file_page + npages > FILE_PAGES {
                    expect_err(r, Errno::EFAULT)
                } else if model_overlaps(&self.models[ioas], page, npages) {
                    expect_err(r, Errno::EEXIST)
                } else {
                    expect_ok(r, page * P)?;
                    self.models[ioas].insert(page, (npages, file_page));
                    Ok(())
                }
            }
            Op::MapAuto {
                ioas,
                npages,
                file_page,
            } => {
                let ioas = ioas % IOASES;
                let r = map_auto(ictx, self.ids[ioas], fd, file_page * P, npages * P);
                if file_page + npages > FILE_PAGES {
                    return expect_err(r, Errno::EFAULT);
                }
                match model_alloc(&self.models[ioas], npages, file_page) {
                    None => expect_err(r, Errno::ENOSPC),
                    Some(p) => {
                        expect_ok(r, p * P)?;
                        self.models[ioas].insert(p, (npages, file_page));
                        Ok(())
                    }
                }
            }
            Op::Unmap { ioas, page, npages } => {
                let ioas = ioas % IOASES;
                let r = unmap(ictx, self.ids[ioas], page * P, npages * P);
                let m = &mut self.models[ioas];
                let hit: Vec<(u64, u64)> = m
                    .iter()
                    .filter(|(s, (n, _))| **s < page + npages && page < **s + *n)
                    .map(|(s, (n, _))| (*s, *n))
                    .collect();
                if hit.is_empty() || hit.iter().any(|(s, n)| *s < page || s + n > page + npages) {
                    return expect_err(r, Errno::ENOENT);
                }
                expect_ok(r, hit.iter().map(|(_, n)| n * P).sum::<u64>())?;
                for (s, _) in hit {
                    m.remove(&s);
                }
                Ok(())
            }
            Op::UnmapAll { ioas } => {
                let ioas = ioas % IOASES;
                let r = unmap(ictx, self.ids[ioas], 0, u64::MAX);
                let m = &mut self.models[ioas];
                // An empty IOAS is no error: 0 bytes.
                expect_ok(r, m.values().map(|(n, _)| n * P).sum::<u64>())?;
                m.clear();
                Ok(())
            }
            Op::Copy {
                dst,
                src,
                src_page,
                npages,
                dst_page,
            } => {
                let (dst, src) = (dst % IOASES, src % IOASES);
                let flags = if dst_page.is_some() { FIXED } else { RW };
                let r = copy(
                    ictx,
                    flags,
                    self.ids[dst],
                    dst_page.unwrap_or(0) * P,
                    self.ids[src],
                    src_page * P,
                    npages * P,
                );
                // The pieces: one per source area touched.
                let mut pieces = Vec::new();
                let mut p = src_page;
                while p < src_page + npages {
                    let Some((s, n, f)) = model_find(&self.models[src], p) else {
                        break;
                    };
                    let end = (s + n).min(src_page + npages);
                    pieces.push((end - p, f + (p - s)));
                    p = end;
                }
                if p < src_page + npages {
                    return expect_err(r, Errno::ENOENT);
                }
                let at = match dst_page {
                    Some(d) if model_overlaps(&self.models[dst], d, npages) => {
                        return expect_err(r, Errno::EEXIST);
                    }
                    Some(d) => d,
                    None => match model_alloc(&self.models[dst], npages, pieces[0].1) {
                        None => return expect_err(r, Errno::ENOSPC),
                        Some(d) => d,
                    },
                };
                expect_ok(r, at * P)?;
                let mut cur = at;
                for (n, f) in pieces {
                    self.models[dst].insert(cur, (n, f));
                    cur += n;
                }
                Ok(())
            }
            Op::Write { ioas, page, value } => {
                let ioas = ioas % IOASES;
                if let Some((s, _, f)) = model_find(&self.models[ioas], page) {
                    write_u64(ictx, self.ids[ioas], page * P, value);
                    let i = usize::try_from(f + page - s).expect("a file page");
                    self.content[i] = value;
                }
                Ok(())
            }
        }
    }

    /// Areas and every page's translation, as the model has them.
    fn compare(&self) -> Result<(), String> {
        for (i, m) in self.models.iter().enumerate() {
            let areas = self
                .ictx
                .ioas(self.ids[i])
                .map_err(|e| format!("IOAS {i} is gone: {e:?}"))?
                .iopt()
                .areas();
            let want: Vec<IovaRange> = m
                .iter()
                .map(|(s, (n, _))| IovaRange::new(s * P, (s + n) * P - 1))
                .collect();
            if areas != want {
                return Err(format!(
                    "IOAS {i}: areas {areas:x?}, the model has {want:x?}"
                ));
            }
            for page in 0..PAGES {
                let got = read_u64(&self.ictx, self.ids[i], page * P);
                let want = model_find(m, page).map(|(s, _, f)| {
                    self.content[usize::try_from(f + page - s).expect("a file page")]
                });
                if got != want {
                    return Err(format!(
                        "IOAS {i} page {page}: reads {got:x?}, the model says {want:x?}"
                    ));
                }
            }
        }
        Ok(())
    }
}
