//! Helpers for the end-to-end tests in `tests/tests/`: locating the built
//! `mkctl` binary, the guest kernel cache and QEMU, and running scenarios that
//! boot real kernels. The tests themselves live next to this crate.
