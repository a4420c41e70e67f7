//! The one error type of the filesystem core and its one errno table.
//!
//! Handlers return `FsResult<T>`; only the FUSE adapter turns an error into an errno, through
//! [`FsError::errno`]. Storage failures are logged once, where they happen, and surface as
//! [`FsError::Io`] (EIO). Expected outcomes (ENOENT, EEXIST…) are not logged above debug.

use std::fmt;

/// A failed filesystem operation, as the caller should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsError {
    NotFound,
    Exists,
    NotDir,
    IsDir,
    NotEmpty,
    NameTooLong,
    Invalid,
    ReadOnly,
    NoSpace,
    NoData,
    Range,
    TooBig,
    NotPermitted,
    Access,
    NoSeekData,
    Unsupported,
    TooManyLinks,
    /// Storage failure or corruption: the detail was logged where it happened.
    Io(String),
}

/// Result of a filesystem operation.
pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    /// The errno the kernel receives. Never ENOSYS: the kernel would disable the op for the
    /// whole mount, so unsupported requests answer EOPNOTSUPP.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid => libc::EINVAL,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NoData => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::TooBig => libc::E2BIG,
            FsError::NotPermitted => libc::EPERM,
            FsError::Access => libc::EACCES,
            FsError::NoSeekData => libc::ENXIO,
            FsError::Unsupported => libc::EOPNOTSUPP,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::Io(_) => libc::EIO,
        }
    }

    /// A storage error: logs it once with its context, and maps a full disk to ENOSPC.
    pub fn storage(context: &str, err: sled::Error) -> FsError {
        if let sled::Error::Io(io) = &err {
            if io.raw_os_error() == Some(libc::ENOSPC)
                || io.kind() == std::io::ErrorKind::StorageFull
            {
                tracing::warn!("{context}: host disk full: {io}");
                return FsError::NoSpace;
            }
        }
        tracing::error!("{context}: storage error: {err}");
        FsError::Io(format!("{context}: {err}"))
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsError::Io(detail) => write!(f, "I/O error: {detail}"),
            other => write!(f, "{}", std::io::Error::from_raw_os_error(other.errno())),
        }
    }
}

impl std::error::Error for FsError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_table_is_exact_and_never_enosys() {
        let table = [
            (FsError::NotFound, libc::ENOENT),
            (FsError::Exists, libc::EEXIST),
            (FsError::NotDir, libc::ENOTDIR),
            (FsError::IsDir, libc::EISDIR),
            (FsError::NotEmpty, libc::ENOTEMPTY),
            (FsError::NameTooLong, libc::ENAMETOOLONG),
            (FsError::Invalid, libc::EINVAL),
            (FsError::ReadOnly, libc::EROFS),
            (FsError::NoSpace, libc::ENOSPC),
            (FsError::NoData, libc::ENODATA),
            (FsError::Range, libc::ERANGE),
            (FsError::TooBig, libc::E2BIG),
            (FsError::NotPermitted, libc::EPERM),
            (FsError::Access, libc::EACCES),
            (FsError::NoSeekData, libc::ENXIO),
            (FsError::Unsupported, libc::EOPNOTSUPP),
            (FsError::TooManyLinks, libc::EMLINK),
            (FsError::Io("x".into()), libc::EIO),
        ];
        for (err, errno) in table {
            assert_eq!(err.errno(), errno, "{err:?}");
            assert_ne!(err.errno(), libc::ENOSYS);
        }
    }
}
