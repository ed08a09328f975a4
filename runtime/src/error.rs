//! One error type for the domain layer. Each variant says which gRPC code the
//! CRI layer reports, so mapping stays in one place (`cri::server::instrument`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The node's configuration does not allow what the request asks for
    /// (the message says which setting).
    #[error("{0}")]
    PermissionDenied(String),
    /// The node or the object is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (containerd, a registry) cannot be reached right now.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// An answer would be larger than it may be; the message says why.
    #[error("{0}")]
    ResourceExhausted(String),
    /// This node cannot do what was asked; the message says why.
    #[error("{0}")]
    Unimplemented(String),
    #[error("containerd: {context}: {source}")]
    Containerd {
        context: String,
        #[source]
        source: tonic::Status,
    },
    #[error("registry: {0}")]
    Registry(String),
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
    /// Something outside imacri holds on to what a call waits for (a
    /// process keeping an exec's output open): reported as containerd
    /// reports it, with gRPC's Unknown.
    #[error("{0}")]
    Held(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }

    /// Wraps a containerd status, keeping its code for the caller to inspect.
    pub fn containerd(context: impl Into<String>, source: tonic::Status) -> Self {
        Error::Containerd {
            context: context.into(),
            source,
        }
    }

    /// True when containerd (or we) said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::NotFound(_) => true,
            Error::Containerd { source, .. } => source.code() == tonic::Code::NotFound,
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }

    pub fn is_already_exists(&self) -> bool {
        match self {
            Error::AlreadyExists(_) => true,
            Error::Containerd { source, .. } => source.code() == tonic::Code::AlreadyExists,
            _ => false,
        }
    }
}

/// Adds "not found is fine" semantics to cleanup calls.
pub trait IgnoreNotFound {
    fn ignore_not_found(self) -> Result<()>;
}

impl<T> IgnoreNotFound for Result<T> {
    fn ignore_not_found(self) -> Result<()> {
        match self {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}
