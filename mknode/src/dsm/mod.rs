//! Distributed shared memory: pages replicated on read and invalidated on
//! write, across kernels, in user space (userfaultfd over the agents'
//! links).
//!
//! - `protocol`: the coherence protocol as pure state machines, written
//!   down with its correctness argument in `README.md`; `model.rs` checks
//!   it exhaustively for small systems;
//! - [`engine`]: one kernel's regions, the processes mapping them, their
//!   faults and the protocol messages: faults on the engine's thread,
//!   messages on the agent's receive thread that got them (no hand-off);
//! - [`local`]: how a process reaches its kernel's engine (a Unix socket),
//!   both sides; [`client`] is the process side as a library call.
//!
//! Regions are named; the registry (kept by the agent at endpoint 0) gives
//! each a number and a home: the kernel that opened it first.

pub mod client;
pub mod engine;
pub mod local;
pub mod protocol;
pub mod stats;

#[cfg(test)]
mod model;

pub use engine::{DsmConfig, Engine};

/// The page size the DSM moves.
pub const PAGE: usize = 4096;
/// The largest region (1 GiB): each page costs the home a directory entry.
pub const MAX_REGION: u64 = 1 << 30;

/// A region as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    pub id: u32,
    pub name: String,
    pub size: u64,
    /// The kernel that keeps its directory (the one that opened it first).
    pub home: u16,
}

/// Why a DSM operation failed; [`DsmError::errno`] is what the C API sets.
#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    #[error("region name {0:?}: use 1 to 64 characters from [A-Za-z0-9._-]")]
    BadName(String),
    #[error("region size {0}: use a non-zero multiple of 4096 up to 1 GiB")]
    BadSize(u64),
    #[error("region {name} exists with {existing} bytes, not {size}")]
    SizeMismatch {
        name: String,
        size: u64,
        existing: u64,
    },
    #[error("region {0} is too large for this kernel")]
    TooLarge(u64),
    #[error("no region {0} on this kernel")]
    NoRegion(u32),
    #[error("nothing of this process is mapped at {0:#x}")]
    NotMapped(u64),
    #[error("a mapping at {addr:#x} of {len} bytes does not cover its region")]
    BadMapping { addr: u64, len: u64 },
    #[error("this kernel lacks {0}")]
    Unsupported(&'static str),
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("i/o")]
    Io(#[source] std::io::Error),
    #[error("no agent answers at {path}")]
    NoAgent {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent refused: {message}")]
    Refused { errno: i32, message: String },
    #[error("the registry")]
    Registry(#[source] crate::agent::AgentError),
    #[error("the DSM engine is gone")]
    EngineGone,
}

impl DsmError {
    pub(crate) fn sys(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> DsmError {
        move |source| DsmError::Sys { what, source }
    }

    pub(crate) fn io(e: std::io::Error) -> DsmError {
        DsmError::Io(e)
    }

    /// The errno the C API reports for it.
    pub fn errno(&self) -> i32 {
        match self {
            DsmError::BadName(_)
            | DsmError::BadSize(_)
            | DsmError::SizeMismatch { .. }
            | DsmError::BadMapping { .. }
            | DsmError::NotMapped(_) => libc::EINVAL,
            DsmError::TooLarge(_) => libc::ENOMEM,
            DsmError::NoRegion(_) => libc::ENOENT,
            DsmError::Unsupported(_) => libc::ENOSYS,
            DsmError::Sys { source, .. } => *source as i32,
            DsmError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            DsmError::NoAgent { source, .. } => source.raw_os_error().unwrap_or(libc::ECONNREFUSED),
            DsmError::Refused { errno, .. } => *errno,
            DsmError::Registry(_) => libc::EHOSTUNREACH,
            DsmError::EngineGone => libc::EIO,
        }
    }
}

/// Checks a region name: 1 to 64 characters from `[A-Za-z0-9._-]`.
pub fn check_name(name: &str) -> Result<(), DsmError> {
    if crate::bootargs::valid_name(name) {
        Ok(())
    } else {
        Err(DsmError::BadName(name.to_string()))
    }
}

/// Checks a region size: a non-zero multiple of the page, at most
/// [`MAX_REGION`].
pub fn check_size(size: u64) -> Result<(), DsmError> {
    if size == 0 || !size.is_multiple_of(PAGE as u64) || size > MAX_REGION {
        Err(DsmError::BadSize(size))
    } else {
        Ok(())
    }
}
