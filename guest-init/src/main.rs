//! `guest-init`: PID 1 of every kernel that mkctl spawns.
//!
//! It will mount the pseudo filesystems, name the host after its instance, find
//! the shared window (the ivshmem BAR under QEMU, or `/dev/mem` at the address
//! given by `mk.window=` on the kexec backend), attach to it as its endpoint, and
//! run the `mknode` agent until asked to power off. It is built as a static binary.

fn main() {
    eprintln!("guest-init: not yet implemented; this binary is a placeholder");
    std::process::exit(1);
}
