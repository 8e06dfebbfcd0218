//! The services' error: what went wrong, with every cause kept as a source, and the one place
//! that classifies it into an [`ErrorKind`] (which decides the HTTP status and the exit code).

use crate::api::ErrorBody;
use crate::domain::Invalid;
use crate::images::ImageError;
use crate::net::firewall::FirewallError;
use crate::net::link::LinkError;
use crate::store::StoreError;
use serde::{Deserialize, Serialize};
use sistemo_vmm::VmmError;

/// What kind of failure an error is; decides the HTTP status and the CLI's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad input: the message names the value and what is allowed.
    Invalid,
    /// Something named does not exist.
    NotFound,
    /// Taken, in use, or in the wrong state.
    Conflict,
    /// The host's disk is full.
    InsufficientStorage,
    /// The TCP API was called without valid credentials (no or an unknown token or session).
    Unauthorized,
    /// The caller is known but may not do this (a viewer changing something, a revoked or
    /// expired token, a missing CSRF token).
    Forbidden,
    /// Too many failed log-ins: wait before trying again.
    TooManyRequests,
    /// The host failed us (I/O, netlink, a VMM that did not boot).
    Internal,
}

impl ErrorKind {
    /// The HTTP status of this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::Invalid => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::InsufficientStorage => 507,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::TooManyRequests => 429,
            ErrorKind::Internal => 500,
        }
    }

    /// The kind of an HTTP status (for bodies from older daemons without a `kind`).
    pub fn from_status(status: u16) -> ErrorKind {
        match status {
            400 | 422 => ErrorKind::Invalid,
            401 => ErrorKind::Unauthorized,
            403 => ErrorKind::Forbidden,
            429 => ErrorKind::TooManyRequests,
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            507 => ErrorKind::InsufficientStorage,
            _ => ErrorKind::Internal,
        }
    }

    /// The CLI's exit code: 2 for bad input (like a usage error), 1 for everything else.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Invalid => 2,
            _ => 1,
        }
    }
}

/// An error of a service (machines, networks, images, the daemon's start-up).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: names the value and what is allowed.
    #[error("{0}")]
    Invalid(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Taken, in use, or in the wrong state.
    #[error("{0}")]
    Conflict(String),
    /// Not enough room on the host's disk for what was asked.
    #[error("{0}")]
    NoSpace(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A link operation failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The firewall refused or failed.
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    /// The hypervisor backend failed.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// The image backend failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Accounts or authentication refused or failed.
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// A file operation of the daemon's own failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<Invalid> for Error {
    fn from(e: Invalid) -> Self {
        Error::Invalid(e.0)
    }
}

/// Shorthand for results of services.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wrap an I/O error with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// The kind of failure: the one classification behind HTTP statuses and exit codes.
    pub fn kind(&self) -> ErrorKind {
        let own = match self {
            Error::Invalid(_) => Some(ErrorKind::Invalid),
            Error::NotFound(_) => Some(ErrorKind::NotFound),
            Error::Conflict(_) => Some(ErrorKind::Conflict),
            Error::NoSpace(_) => Some(ErrorKind::InsufficientStorage),
            Error::Store(e) => match e {
                StoreError::NotFound(_) => Some(ErrorKind::NotFound),
                StoreError::Conflict(_) | StoreError::WrongState { .. } | StoreError::Exhausted { .. } => {
                    Some(ErrorKind::Conflict)
                }
                StoreError::Sql(rusqlite::Error::SqliteFailure(f, _))
                    if f.code == rusqlite::ErrorCode::DiskFull =>
                {
                    Some(ErrorKind::InsufficientStorage)
                }
                _ => None,
            },
            Error::Vmm(VmmError::ImageNotFound { .. } | VmmError::NotInRegistry { .. }) => {
                Some(ErrorKind::NotFound)
            }
            Error::Vmm(VmmError::ImageRefused { .. }) => Some(ErrorKind::Invalid),
            Error::Image(e) => e.kind(),
            Error::Auth(e) => e.kind(),
            _ => None,
        };
        own.unwrap_or_else(|| {
            if disk_full(self) {
                ErrorKind::InsufficientStorage
            } else {
                ErrorKind::Internal
            }
        })
    }

    /// The error as the API sends it: its kind and its whole chain in one line.
    pub fn body(&self) -> ErrorBody {
        ErrorBody::new(self.kind(), chain(self))
    }
}

/// Whether an I/O error somewhere in the chain says the disk (or the quota) is full.
pub fn disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && (io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(nix::libc::EDQUOT))
        {
            return true;
        }
        cur = c.source();
    }
    false
}

/// The error and its causes on one line, `outer: inner: root`, skipping a cause whose text the
/// line already holds (errors that print their source themselves).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !line.contains(&m) {
            line.push_str(": ");
            line.push_str(&m);
        }
        cur = c.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_507_wherever_it_hides() {
        let full = std::io::Error::from_raw_os_error(nix::libc::ENOSPC);
        let e = Error::Image(ImageError::Vmm(VmmError::Io {
            context: "cloning the disk".into(),
            source: full,
        }));
        assert_eq!(e.kind(), ErrorKind::InsufficientStorage);
        assert_eq!(e.body().status, 507);
        assert!(e.body().error.contains("cloning the disk"), "{}", e.body().error);
        let other = Error::io("writing x")(std::io::Error::other("boom"));
        assert_eq!(other.kind(), ErrorKind::Internal);
        assert_eq!(other.body().error, "writing x: boom");
    }

    #[test]
    fn kinds_map_to_statuses_and_exit_codes() {
        let nf = Error::Vmm(VmmError::ImageNotFound {
            reference: "nope".into(),
        });
        assert_eq!((nf.kind().status(), nf.kind().exit_code()), (404, 1));
        let bad = Error::Invalid("x".into());
        assert_eq!((bad.kind().status(), bad.kind().exit_code()), (400, 2));
        let taken = Error::Store(StoreError::Conflict("taken".into()));
        assert_eq!(taken.kind().status(), 409);
    }
}
