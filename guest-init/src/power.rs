//! Ending the guest: `sync`, then `reboot(RB_POWER_OFF)`, which makes QEMU exit
//! (ACPI S5) and on real hardware hands the CPUs back.
//!
//! PID 1 must never return or exit: the kernel would panic with "Attempted to
//! kill init" and, without `panic=`, hang. Everything that ends guest-init goes
//! through [`power_off`], including the panic hook installed by
//! [`install_panic_hook`].

use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};

use crate::say;

/// Flushes filesystems and powers the machine off. Never returns.
///
/// Refuses to act when this process is not PID 1, so running the binary by
/// mistake on a host cannot switch the host off; it exits with status 70 then.
pub fn power_off() -> ! {
    if std::process::id() != 1 {
        say!("not PID 1: not powering off this machine; exiting instead");
        std::process::exit(70);
    }
    nix::unistd::sync();
    say!("powering off");
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    say!("reboot(RB_POWER_OFF) failed: {e}; halting instead");
    let _ = reboot(RebootMode::RB_HALT_SYSTEM);
    // Only reached if both calls failed; returning would panic the kernel.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Prints a fatal condition on the console and powers off.
pub fn fatal(what: &dyn std::error::Error) -> ! {
    say!("fatal: {}", error_chain(what));
    power_off()
}

/// Makes a panic anywhere print its message and power the guest off, instead
/// of unwinding out of `main` into "Attempted to kill init".
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        say!("panic: {info}");
        power_off();
    }));
}

/// The error and its causes joined with ": " (mknode's printer).
pub use mknode::error_text as error_chain;
