//! The request table of every file kind, in the style of the kernel's
//! `iommufd_ioctl_ops` (`drivers/iommu/iommufd/main.c`): code -> (argument
//! shape, descriptors taken, handler). The struct rules of PROTOCOL.md
//! ("Struct rules", "Framing") are applied here, once, in the kernel's
//! order (`iommufd_fops_ioctl` + `copy_struct_from_user`):
//!
//! 1. more descriptors than the request takes: protocol violation;
//! 2. the file kind's gate (a device file before BIND: EINVAL);
//! 3. an unknown code: ENOTTY;
//! 4. a payload too short to hold the `size`/`argsz` word: EFAULT;
//! 5. `size` below the minimum: EINVAL;
//! 6. a payload shorter than `size`: EFAULT;
//! 7. `size` beyond the known struct with a non-zero excess byte: E2BIG.
//!
//! The handler then gets the struct at its known size (zero-extended when
//! the client's is shorter, as `copy_struct_from_user` does), the bytes
//! that follow `size` (arrays, region data) and the descriptors. On
//! success the reply carries the struct as the handler left it, cut to
//! `min(size, known size)` as the kernel copies it back, then any trailing
//! data the handler adds.

use std::os::fd::OwnedFd;

use vcdev_iommu::Errno;
use vm_memory::ByteValued;

/// What a request's payload starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// A struct whose first u32 is its `size` (iommufd) or `argsz` (vfio):
    /// the size the server knows and the end of the last mandatory field.
    Sized {
        /// `size_of` the struct.
        size: usize,
        /// Its minimum size.
        min: usize,
    },
    /// A vfio struct whose `argsz` also covers a flexible tail (the `data`
    /// of SET_IRQS and UNMAP_DMA, capability chains of GET_INFO,
    /// GET_REGION_INFO and IOMMU_GET_INFO): as `Sized`, but the bytes
    /// between the known size and `argsz` are that tail, never E2BIG (the
    /// kernel's `vfio_set_irqs_validate_and_prepare` reads them as data).
    Flex {
        /// `size_of` the struct.
        size: usize,
        /// Its minimum size.
        min: usize,
    },
    /// A fixed number of bytes without a size word (a by-value argument,
    /// the region read/write header); a shorter payload is EFAULT.
    Fixed(usize),
    /// Whatever the payload holds (none, or a string).
    Bytes,
}

/// One request a file kind answers.
pub struct Op<F: ?Sized> {
    /// The request code.
    pub code: u32,
    /// The kernel's name, for logs.
    pub name: &'static str,
    /// Its argument.
    pub arg: Arg,
    /// The most descriptors it takes.
    pub max_fds: usize,
    /// The handler.
    pub handler: fn(&F, &mut Req) -> Result<Out, Errno>,
}

impl<F: ?Sized> std::fmt::Debug for Op<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// A decoded request, handed to the handler.
#[derive(Debug)]
pub struct Req {
    /// The request code.
    pub code: u32,
    /// The struct at its known size ([`Arg::Sized`]), the fixed bytes
    /// ([`Arg::Fixed`]) or the whole payload ([`Arg::Bytes`]).
    pub cmd: Vec<u8>,
    /// The client's `size` (or the fixed length).
    pub user_size: usize,
    /// The bytes after the struct.
    pub trailing: Vec<u8>,
    /// The descriptors that came with the request.
    pub fds: Vec<OwnedFd>,
}

impl Req {
    /// The struct as a `T` (`cmd` holds exactly `size_of::<T>()` bytes for
    /// the op's own struct; a shorter `cmd` leaves the rest zero).
    pub fn get<T: ByteValued + Default>(&self) -> T {
        crate::pod::pod_from(&self.cmd)
    }

    /// The int argument of an [`Arg::Fixed`]`(4)` request (vfio's
    /// `ioctl(fd, CMD, int)`), as its 4 little-endian bytes; EFAULT if
    /// shorter.
    pub fn int_arg(&self) -> Result<[u8; 4], Errno> {
        self.cmd
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(Errno::EFAULT)
    }

    /// Takes the first descriptor, if any came.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        (!self.fds.is_empty()).then(|| self.fds.remove(0))
    }
}

/// `Arg::Sized` for a struct of the iommufd or vfio uAPI (its `MIN_SIZE`).
macro_rules! sized {
    ($t:ty) => {
        $crate::cdev::dispatch::Arg::Sized {
            size: std::mem::size_of::<$t>(),
            min: <$t>::MIN_SIZE,
        }
    };
}
pub(crate) use sized;

/// A successful (or partly successful) answer.
#[derive(Debug, Default)]
pub struct Out {
    /// The result (>= 0, or `-EMSGSIZE` for IOVA_RANGES' partial answer).
    pub result: i32,
    /// What follows the result: the struct and trailing data.
    pub body: Vec<u8>,
    /// Descriptors riding with the reply.
    pub fds: Vec<OwnedFd>,
}

impl Out {
    /// Result 0, nothing else.
    pub fn ok() -> Out {
        Out::default()
    }

    /// Result `result`, nothing else.
    pub fn result(result: i32) -> Out {
        Out {
            result,
            ..Out::default()
        }
    }

    /// Result 0 and the struct `t` written back as the kernel does
    /// (`min(user size, known size)` bytes).
    pub fn with<T: ByteValued>(req: &Req, t: &T) -> Out {
        let bytes = t.as_slice();
        let n = bytes.len().min(req.user_size);
        Out {
            result: 0,
            body: bytes.get(..n).unwrap_or_default().to_vec(),
            fds: Vec::new(),
        }
    }

    /// Appends trailing data after the struct.
    pub fn trailing(mut self, data: &[u8]) -> Out {
        self.body.extend_from_slice(data);
        self
    }
}

/// Why a message ends its file instead of getting a reply.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// More descriptors than the request takes.
    #[error("request {code:#x} carries {got} descriptors, takes at most {max}")]
    TooManyFds {
        /// The request.
        code: u32,
        /// Descriptors received.
        got: usize,
        /// Descriptors it takes.
        max: usize,
    },
    /// A message flagged as a reply.
    #[error("request {0:#x} is flagged as a reply")]
    ReplyFlag(u32),
}

/// Decodes `payload` for `op` (rules 4-7), or the errno.
fn decode(arg: Arg, payload: Vec<u8>) -> Result<(Vec<u8>, usize, Vec<u8>), Errno> {
    match arg {
        Arg::Sized { size, min } | Arg::Flex { size, min } => {
            let flex = matches!(arg, Arg::Flex { .. });
            let word = payload.get(..4).ok_or(Errno::EFAULT)?;
            let user = u32::from_le_bytes(word.try_into().map_err(|_| Errno::EFAULT)?);
            let user = usize::try_from(user).map_err(|_| Errno::EFAULT)?;
            if user < min {
                return Err(Errno::EINVAL);
            }
            if payload.len() < user {
                return Err(Errno::EFAULT);
            }
            if !flex
                && user > size
                && payload
                    .get(size..user)
                    .is_some_and(|x| x.iter().any(|&b| b != 0))
            {
                return Err(Errno::E2BIG);
            }
            let mut cmd = payload.get(..user.min(size)).unwrap_or_default().to_vec();
            cmd.resize(size, 0);
            let tail = if flex {
                user.min(size)..user
            } else {
                user..payload.len()
            };
            let trailing = payload.get(tail).unwrap_or_default().to_vec();
            Ok((cmd, user, trailing))
        }
        Arg::Fixed(n) => {
            let cmd = payload.get(..n).ok_or(Errno::EFAULT)?.to_vec();
            let trailing = payload.get(n..).unwrap_or_default().to_vec();
            Ok((cmd, n, trailing))
        }
        Arg::Bytes => {
            let n = payload.len();
            Ok((payload, n, Vec::new()))
        }
    }
}

/// Runs one request against `ops`: `Ok(out)` is the reply (an errno
/// becomes a bare negative result), `Err` a protocol violation.
///
/// `gate` runs before the code is looked up (rule 2): a device file not yet
/// bound answers EINVAL to everything but BIND, even unknown codes, as
/// `vfio_device_fops_unl_ioctl` does.
pub fn dispatch<F: ?Sized>(
    ops: &[Op<F>],
    file: &F,
    code: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
    gate: impl FnOnce(u32) -> Option<Errno>,
) -> Result<Out, Violation> {
    let op = ops.iter().find(|o| o.code == code);
    let max = op.map_or(0, |o| o.max_fds);
    if fds.len() > max {
        return Err(Violation::TooManyFds {
            code,
            got: fds.len(),
            max,
        });
    }
    if let Some(e) = gate(code) {
        return Ok(Out::result(e.to_result()));
    }
    let Some(op) = op else {
        return Ok(Out::result(Errno::ENOTTY.to_result()));
    };
    let (cmd, user_size, trailing) = match decode(op.arg, payload) {
        Ok(d) => d,
        Err(e) => return Ok(Out::result(e.to_result())),
    };
    let mut req = Req {
        code,
        cmd,
        user_size,
        trailing,
        fds,
    };
    let out = (op.handler)(file, &mut req);
    log::debug!(
        "{}: {}",
        op.name,
        match &out {
            Ok(o) => format!("result {}", o.result),
            Err(e) => format!("{e}"),
        }
    );
    Ok(out.unwrap_or_else(|e| Out::result(e.to_result())))
}

/// The reply payload: `i32 result` then the body.
pub fn reply_payload(out: &Out) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + out.body.len());
    p.extend_from_slice(&out.result.to_le_bytes());
    p.extend_from_slice(&out.body);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<Op<()>> {
        vec![Op {
            code: 7,
            name: "TEST",
            arg: Arg::Sized { size: 12, min: 8 },
            max_fds: 1,
            handler: |_, req| Ok(Out::result(i32::try_from(req.user_size).unwrap_or(-1))),
        }]
    }

    fn run(code: u32, payload: &[u8]) -> i32 {
        dispatch(&ops(), &(), code, payload.to_vec(), Vec::new(), |_| None)
            .unwrap()
            .result
    }

    /// TEST_F(iommufd, cmd_length): the size rules, once.
    #[test]
    fn size_rules() {
        assert_eq!(run(8, &[]), -libc::ENOTTY);
        assert_eq!(run(7, &[1, 0]), -libc::EFAULT);
        assert_eq!(run(7, &[4, 0, 0, 0]), -libc::EINVAL);
        assert_eq!(run(7, &[12, 0, 0, 0, 0, 0, 0, 0]), -libc::EFAULT);
        assert_eq!(run(7, &[8, 0, 0, 0, 0, 0, 0, 0]), 8);
        let mut big = vec![0u8; 16];
        big[0] = 16;
        assert_eq!(run(7, &big), 16);
        big[13] = 1;
        assert_eq!(run(7, &big), -libc::E2BIG);
        let gated = dispatch(&ops(), &(), 99, Vec::new(), Vec::new(), |_| {
            Some(Errno::EINVAL)
        });
        assert_eq!(gated.unwrap().result, -libc::EINVAL);
    }
}
