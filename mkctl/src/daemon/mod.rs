//! The host daemon: owns the run directory, the shared window and one QEMU
//! process per instance, runs the host's agent (endpoint 0), and serves the
//! CLI over a Unix socket.
//!
//! - [`server`]: the daemon process (`mkctl daemon run`);
//! - [`client`]: the CLI's side, starting a daemon when needed;
//! - [`control`]: the frames between them;
//! - [`window`]: the host's side of the shared window;
//! - [`qmp`]: QEMU's control protocol;
//! - [`paths`]: the run directory and the setup cache.

pub mod client;
pub mod control;
pub mod paths;
pub mod qmp;
pub mod server;
pub mod window;
