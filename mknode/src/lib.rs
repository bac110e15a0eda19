//! The agent that runs on every kernel (the host's daemon and each guest's
//! `guest-init` alike), so the protocols between kernels are symmetric.
//!
//! - [`wire`]: every message between agents, declared once in a table, on
//!   the little-endian [`codec`] the process image shares;
//! - [`link`]: a duplex message connection to one peer (a `shmem-ring`
//!   channel between kernels, a TCP connection, an in-process pair in
//!   tests);
//! - [`agent`]: the core (links, requests and answers, peer liveness) and
//!   its facets — exec, diagnostics, migration — each a file of its own;
//!   its module doc says how to add a message and a facet;
//! - [`migrate`]: capture and restore of a process, lazy pages, and a
//!   process split across kernels (thread migration);
//! - [`dsm`]: distributed shared memory; [`thread`]: the process side of
//!   thread migration (`mk_migrate`);
//! - [`bootargs`]: the `mk.*` kernel command line keys mkctl writes and
//!   guest-init reads.
//!
//! It does not know how kernels are booted. It logs through the `log`
//! facade; the program that embeds it decides where that goes.

pub mod agent;
pub mod bootargs;
pub mod codec;
pub mod dsm;
pub mod link;
pub mod migrate;
pub mod thread;
mod uffd;
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
