//! The `kexec` backend: boots instances through the real Linux multikernel
//! interface (GitHub `multikernel/linux`; its user-space peer is kerf).
//!
//! Layers, each depending only on those below it:
//! - [`iface`]: the one narrow trait every kernel-touching call goes
//!   through (mount, files, `kexec_file_load`, `reboot`), and the real
//!   syscalls (the backend's only `unsafe`);
//! - [`fake`] and [`dryrun`]: a scripted model of a multikernel kernel for
//!   tests, and a printer of the exact sequence that changes nothing;
//! - [`probe`]: what a sysroot offers, read-only, and [`preflight`], which
//!   refuses before anything is touched on a kernel without the interface;
//! - [`image`]: bzImage → ELF vmlinux ([`xz`]: the x86-filtered `.xz`
//!   payload of `CONFIG_KERNEL_XZ` kernels);
//! - [`request`]: a validated plan from a topology (APIC ids, trees, images);
//! - [`console`]: the `/dev/mktty` handshake for `mkctl console`;
//! - [`engine`]: boot / stop / release / status as logged steps, each
//!   failure undoing the earlier steps in reverse.
//!
//! This module never parses command lines and never prints on its own; the
//! CLI owns both.
//!
//! ## The window on this backend
//!
//! A topology's `[window] base` is a physical range every kernel maps. Each
//! kexec instance gets it on its command line as
//! `mk.window=<phys>@<size>` (both hex with `0x`, e.g.
//! `mk.window=0x3ff000000@0x1000000`); guest-init maps that range through
//! `/dev/mem`. The current interface places pool and instance memory
//! itself, so the boot checks (step `check window`) that no instance was
//! given memory overlapping the window.
//!
//! The host's end of that window is the mkctl daemon's
//! (`daemon::server::kexec`): `mkctl boot` asks it to format the range
//! through `/dev/mem` and attach the host's agent as endpoint 0 before the
//! kernel starts anything, so exec, info, ping, traffic and status reach
//! kexec instances as they reach QEMU guests.
//!
//! The command line also carries the keys a QEMU guest gets
//! (`qemu::cmdline`): `mk.name`, `mk.id` (guest-init's agent needs its
//! endpoint id) and `mk.peers` (the endpoint names for its messages).

pub mod console;
pub mod dryrun;
pub mod engine;
pub mod fake;
pub mod iface;
pub mod image;
pub mod probe;
pub mod request;
pub mod xz;

pub use engine::{Engine, Options, StepError};
pub use iface::{Call, Errno, KernelIface, KexecLoad, RealKernel, RebootCmd};
pub use probe::{preflight, probe, FsState, InstanceState, Refusal};
pub use request::{plan_boot, BootPlan, BootTarget, PlanError, PoolState};

/// The two generations of the kernel interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Generation {
    /// The LKML RFC v2 series (October 2025): one DTB with
    /// `compatible = "multikernel-v1"` and the instances in it.
    V1,
    /// multikernel/linux v7.0-mk2 and later, kerf 0.4.0: a baseline plus
    /// overlays (`overlays/` exists).
    Current,
}

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Generation::V1 => "v1",
            Generation::Current => "current",
        })
    }
}
