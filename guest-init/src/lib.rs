//! `guest-init`: PID 1 of every kernel that mkctl spawns.
//!
//! It mounts the pseudo filesystems ([`mounts`]), reads what mkctl put on the
//! kernel command line ([`mknode::bootargs`]), names the host after its instance, maps
//! the shared window ([`window`]: the ivshmem BAR under QEMU, or `/dev/mem` at
//! `mk.window=` on the kexec backend) and then either writes the selftest
//! record ([`selftest`]) or runs the `mknode` agent ([`agent`]) until asked
//! to power off. Whatever happens,
//! it ends by powering off ([`power`]), never by exiting.
//!
//! Everything that reads `/proc` or `/sys` takes a root directory, so the
//! library is tested on the host against fake trees; the binary (`main.rs`) is
//! the thin sequence over it, built static by `qemu/setup.sh`.

pub mod agent;
pub mod console;
pub mod doorbell;
pub mod mounts;
pub mod power;
pub mod probe;
pub mod selftest;
pub mod supervise;
pub mod window;
