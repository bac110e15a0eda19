//! The host daemon: owns the run directory, the shared window and one QEMU
//! process per instance, runs the host's agent (endpoint 0), and serves the
//! CLI over a Unix socket. This module grows with the QEMU backend.

pub mod control;
pub mod qmp;
