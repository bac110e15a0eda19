//! The host daemon: owns the run directory, the shared window and one QEMU
//! process per instance, runs the host's agent (endpoint 0), and serves the
//! CLI over a Unix socket.
//!
//! - [`server`]: the daemon process (`mkctl daemon run`): accept loop and
//!   dispatch, with the instances' lifecycle and the relays to agents in
//!   its children;
//! - [`state`]: the instances and the rules of their lifecycle (what each
//!   request may do in each state), apart from sockets and QEMU;
//! - [`error`]: why a request failed, and its exit code;
//! - [`events`]: the bus of state changes and migration steps that
//!   `mkctl events` streams;
//! - [`client`]: the CLI's side, starting a daemon when needed;
//! - [`control`]: the frames between them;
//! - [`window`]: the host's side of the shared window;
//! - [`qmp`]: QEMU's control protocol;
//! - [`process`]: the handle on an instance's QEMU, spawned or adopted;
//! - [`saved`]: the state a restarted daemon adopts the instances from;
//! - [`paths`]: the run directory and the setup cache.

pub mod client;
pub mod control;
pub mod doorbell;
pub mod error;
pub mod events;
pub mod paths;
pub mod process;
pub mod qmp;
pub mod saved;
pub mod server;
pub mod state;
pub mod window;
