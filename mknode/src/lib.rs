//! The agent that runs on every kernel (the host's daemon and each guest's
//! `guest-init` alike), so the protocols between kernels are symmetric.
//!
//! It will own the wire messages carried over `shmem-ring` channels (requests,
//! replies, streams), remote exec, process capture/restore for migration, and the
//! DSM page-coherence engine. It does not know how kernels are booted.

pub mod agent;
pub mod codec;
pub mod link;
pub mod migrate;
pub mod wire;

/// An I/O error's text without the ` (os error N)` Rust appends, for
/// messages a user reads.
pub fn io_error_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// An error and its causes joined with ": " (each message says only its
/// own part).
pub fn error_text(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
