//! The one Linux errno type of vcdev.
//!
//! Every error that crosses a protocol boundary turns into exactly one
//! [`Errno`] (several errors may share one). The numbers are Linux's, taken
//! from `libc`, and go on the wire negated as the kernel's ioctl would
//! return them.

use std::fmt;

/// A Linux errno value (positive).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Errno(pub i32);

macro_rules! errnos {
    ($($name:ident),* $(,)?) => {
        impl Errno {
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                pub const $name: Errno = Errno(libc::$name);
            )*

            /// The symbolic name of a known errno.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $(libc::$name => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

errnos!(
    EPERM, ENOENT, EINTR, EIO, E2BIG, EBADF, EAGAIN, ENOMEM, EFAULT, EBUSY, EEXIST, ENODEV, EINVAL,
    ENOSPC, ENOTTY, ERANGE, EOVERFLOW, EBADFD, EMSGSIZE, EOPNOTSUPP, EADDRINUSE, ETIMEDOUT, EROFS,
    EFBIG,
);

impl Errno {
    /// The value a kernel ioctl returns for this error: `-errno`.
    pub fn to_result(self) -> i32 {
        -self.0
    }

    /// The errno behind an I/O error, `EIO` when it carries none.
    pub fn from_io(e: &std::io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "Errno({})", self.0),
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_results() {
        assert_eq!(Errno::EINVAL.name(), Some("EINVAL"));
        assert_eq!(Errno::EINVAL.to_result(), -22);
        assert_eq!(format!("{:?}", Errno(4242)), "Errno(4242)");
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(Errno::from_io(&io), Errno::ENOSPC);
    }
}
