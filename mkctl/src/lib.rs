//! mkctl: one machine, several Linux kernels side by side.
//!
//! The library behind the `mkctl` binary:
//! - [`topology`]: a TOML file parsed into a validated model, with
//!   diagnostics that point at file:line:column; [`plan`] shows how it
//!   splits the machine; [`units`] are the typed quantities;
//! - [`host`]: what this machine has and what is reserved;
//! - [`dtb`]: the device trees the Linux multikernel interface takes;
//! - the boot backends: [`kexec`] (the multikernel interface itself) and
//!   [`qemu`] (an instance as a QEMU process, with an [`initramfs`] built
//!   here);
//! - [`daemon`]: the host daemon that owns QEMU instances and the shared
//!   window, runs the host's agent, and serves the CLI;
//! - [`doctor`]: what each backend needs on this machine, and what is missing;
//! - [`cli`]: the command line; [`exit`]: its exit codes.
//!
//! Nothing here starts a kernel before [`topology::Topology`] has been built,
//! and a `Topology` only exists once every validation rule has passed.

pub mod cli;
pub mod daemon;
pub mod doctor;
pub mod dtb;
pub mod exit;
pub mod host;
pub mod initramfs;
pub mod kexec;
pub mod plan;
pub mod qemu;
pub mod topology;
pub mod units;

/// Formats an error and its chain of causes as `outer: inner: innermost`
/// (each message says only its own part; this printer joins them). One
/// printer for every crate: mknode's.
pub use mknode::error_text as error_chain;
