//! mkctl: one machine, several Linux kernels side by side.
//!
//! The library behind the `mkctl` binary. It owns the topology (parsing a TOML
//! file into a validated model), host discovery, allocation planning, device
//! tree output for the Linux multikernel interface, and, later, the boot
//! backends (`qemu`, `kexec`) and the host daemon that talks to the agents.
//!
//! Nothing here starts a kernel before [`topology::Topology`] has been built,
//! and a `Topology` only exists once every validation rule has passed.

pub mod cli;
pub mod daemon;
pub mod dtb;
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
