//! mkctl: one machine, several Linux kernels side by side.
//!
//! The library behind the `mkctl` binary. It owns the topology (parsing a TOML
//! file into a validated model), host discovery, allocation planning, device
//! tree output for the Linux multikernel interface, and, later, the boot
//! backends (`qemu`, `kexec`) and the host daemon that talks to the agents.
//!
//! Nothing here starts a kernel before [`topology::Topology`] has been built,
//! and a `Topology` only exists once every validation rule has passed.

pub mod units;
pub mod initramfs;
