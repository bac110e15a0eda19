//! The qemu backend's building blocks: how one instance becomes a QEMU
//! process running a stock kernel with mkctl's initramfs.
//!
//! - [`machine`]: the QEMU command line for one instance (NUMA nodes backed
//!   by files, the shared window as an `ivshmem-plain` device, console to a
//!   log and a socket, QMP);
//! - [`cmdline`]: the kernel command line, with the `mk.*` keys guest-init
//!   reads.
//!
//! This module only builds values; starting, pinning and watching QEMU
//! processes belongs to the daemon. The initramfs itself is built by
//! [`crate::initramfs`]; the kernel and static guest-init come from
//! `qemu/setup.sh`.

pub mod cmdline;
pub mod machine;

pub use cmdline::GuestCmdline;
pub use machine::{
    flags_the_host_lacks, guest_numa, Accel, Console, MachineError, MachineSpec, NumaNode,
    SharedWindow,
};
