//! Process migration core: capture a running process into an image, and
//! restore an image as a running process, on a kernel of the same build or
//! of another (the vDSO proxy) and a CPU with the origin's extensions.
//!
//! It owns the freeze (ptrace), the image format and its codec, and the
//! rebuild; it does not own transport (the image goes through any
//! `io::Write` / `io::Read`: a file, a buffer, a ring stream) nor the agents'
//! protocol. The format and the limits are in `README.md` beside this file.
//!
//! ```no_run
//! use mknode::migrate::{freeze, restore, ImageOptions, StdioPlan};
//! let frozen = freeze(1234)?;                       // refuses up front if unmigratable
//! let mut img = Vec::new();
//! frozen.write_image(&mut img, ImageOptions::default())?;
//! match restore(&img[..], StdioPlan::null()?) {
//!     Ok(r) => { frozen.kill(); println!("now pid {}", r.pid) }
//!     Err(e) => { drop(frozen); eprintln!("{e}") }  // original runs on
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layers, each using only those before it:
//! - `procfs` (parsers of `/proc/pid/*`) → `precheck` (what cannot move,
//!   said before anything is frozen);
//! - `sys` (the only unsafe: ptrace register sets, signal queues, the
//!   stub's fork), `uffd` (userfaultfd and pidfd), `memory` (another
//!   process's pages and mappings, the kernel fingerprint);
//! - `cpu` (what of the CPU a process depends on; register state between
//!   XSAVE layouts) and `vdso` (the old vDSO redirected to this kernel's),
//!   pure but for reading this CPU (through `sys`) and kernel;
//! - `inject` (one syscall in a stopped thread);
//! - `lazy` (the origin's page server), then `capture` (freeze and write an
//!   image) and `pager` (the destination's fault handler), then `restore`;
//! - `split` (a thread leaves its process for another kernel; the process's
//!   memory becomes DSM memory), on `capture` and `restore`;
//! - `tree` (a process with all its descendants, rebuilt in a pid
//!   namespace of its own), on `capture` and `restore`.
//!
//! `image` is the format, pure, on the shared codec. The agents' protocol
//! around all this (streaming, page fetches over the links) is the
//! migration facet's, in `crate::agent::migration`.

mod capture;
pub mod cpu;
mod filter;
pub mod image;
mod inject;
mod lazy;
mod memory;
mod pager;
mod precheck;
mod procfs;
mod restore;
pub mod split;
mod sys;
mod tree;
mod unixdiag;
mod vdso;

/// `pidfd_open(pid, 0)`.
pub use crate::uffd::pidfd_open;
pub(crate) use crate::uffd::wait_exit;
pub use capture::{freeze, reap_orphans, CaptureError, Frozen, ImageOptions};
pub use image::{
    FileKind, FileState, ImageError, ImageMeta, ImageStats, OpenFile, PipeState, TimerState,
};
pub use lazy::{
    channel_link, LazyLink, LazyOptions, OriginLoops, PageRun, PageServer, PageSource, Progress,
    PushPolicy, Pushed, ServeError, SourceError,
};
pub use memory::is_zero;
pub use pager::{LazyError, Pager, PagerOptions, PagerStats};
pub use precheck::{check_at, check_migratable, files_of, Blocker, Precheck, Refusal};
pub use restore::{
    restore, restore_any, restore_any_lazy, restore_lazy, restore_shadow, LazyRestored,
    RestoreError, Restored, StdioPlan,
};
pub use tree::{
    freeze_any, freeze_tree, restore_tree, restore_tree_lazy, tree_of, Captured, FrozenTree,
    RestoredTree, SharedFile, TreeError, TreeMeta, TreeProc, MAX_TREE, TREE_MAGIC,
};

/// A failed system call made on behalf of capture or restore.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{op} on thread {tid}")]
    Ptrace {
        op: &'static str,
        tid: i32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{name}() injected into thread {tid} failed")]
    Syscall {
        name: &'static str,
        tid: i32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("thread {tid}: {status} while waiting for {wanted}")]
    Stop {
        tid: i32,
        status: String,
        wanted: &'static str,
    },
    #[error("{what} of process {pid}")]
    Mem {
        what: &'static str,
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}
