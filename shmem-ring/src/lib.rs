//! Message rings in a shared memory window, across processes and kernels.
//!
//! This crate owns the transport every mkctl protocol runs on: a mapped
//! [`Window`] (a `/dev/shm` file, an ivshmem BAR, a `/dev/mem` range), a
//! versioned [`Layout`] inside it (header, endpoint directory, one duplex
//! channel per pair of endpoints) and single-producer single-consumer rings of
//! length-prefixed frames. It knows bytes, not protocols.
//!
//! The peer on the other side of a window may be another kernel and is
//! untrusted: every index and length read from the window is checked before
//! use; a corrupt ring reports [`Error::Broken`] (for good) and never makes this
//! side panic or touch memory outside the window; other rings keep working.
//!
//! # Use
//!
//! ```
//! use std::time::Duration;
//! use shmem_ring::{Layout, Window};
//!
//! # fn main() -> Result<(), shmem_ring::Error> {
//! // The host formats the window (here anonymous memory; usually
//! // `Window::create("/dev/shm/mk", 16 << 20, 4)` or `Window::format_at`).
//! let window = Window::anonymous(Layout::with_capacity(2, 64 << 10)?)?;
//! // Each side attaches by id (another process would `Window::open` first).
//! let a = window.attach(0)?;
//! let b = window.attach(1)?;
//! let (mut a_tx, _a_rx) = a.channel(1)?;
//! let (_b_tx, mut b_rx) = b.channel(0)?;
//!
//! a_tx.try_send(b"hello")?;
//! // Zero copy: fill a slot in place, then commit.
//! let mut slot = a_tx.reserve(4096, Duration::from_millis(10))?;
//! slot.fill(7);
//! slot.commit();
//! // Bursts: publish many frames with one store.
//! for i in 0u8..10 {
//!     a_tx.send_batched(&[i], Duration::from_millis(10))?;
//! }
//! a_tx.flush();
//!
//! let mut buf = Vec::new();
//! b_rx.recv(&mut buf, Duration::from_secs(1))?;
//! assert_eq!(buf, b"hello");
//! let page = b_rx.peek(Duration::from_secs(1))?;
//! assert!(page.iter().all(|&x| x == 7));
//! page.release();
//! for i in 0u8..10 {
//!     b_rx.try_recv(&mut buf)?;
//!     assert_eq!(buf, [i]);
//! }
//! // Liveness: a thread calls `a.heartbeat()` periodically; `b.peer(0)` says
//! // Alive, Silent, Dead or Gone, and blocking calls fail with PeerDead or
//! // PeerGone instead of waiting out their timeout.
//! a.heartbeat()?;
//! assert_eq!(b.peer(0)?.state, shmem_ring::PeerState::Alive);
//! # Ok(())
//! # }
//! ```
//!
//! # Pieces
//!
//! - [`Window`]: `create`, `format_at`, `anonymous` (format), `open`, `open_at`
//!   (validate), `attach` (claim an endpoint id, bump its generation).
//! - [`Endpoint`]: `channel(peer)` gives the [`Sender`] of `self -> peer` and
//!   the [`Receiver`] of `peer -> self`; `heartbeat`, `peer`, `reset_channel`.
//! - [`Sender`]: `try_send`/`send`, `*_batched` + `flush`, `try_reserve`/
//!   `reserve` -> [`SendSlot`] (`commit`, `commit_batched`).
//! - [`Receiver`]: `try_recv`/`recv`, `try_peek`/`peek` -> [`RecvSlot`]
//!   (`release`).
//! - Waiting spins for [`wait::SPIN_FOR`] (a receiver: as long as
//!   [`Receiver::set_spin`] says), yields, then sleeps: a receiver
//!   on its endpoint's [`Doorbell`] (the sender rings it only when the
//!   receiver announced its sleep in the ring's doorbell word, so busy
//!   traffic makes no system call), a sender waiting for room with back-off
//!   up to [`wait::MAX_SLEEP`]. [`FutexBell`] serves peers on one kernel;
//!   peers on other kernels need a doorbell that reaches them
//!   ([`Window::attach_with_doorbell`]).
//!
//! Unsafe code lives in one private module (`raw`), which owns the mapping
//! and offers bounds-checked atomics and copies; its doc holds the safety
//! argument. Everything is `Send`; there is no global state.

#![deny(unsafe_op_in_unsafe_fn)]

mod channel;
pub mod doorbell;
mod endpoint;
mod error;
#[doc(hidden)]
pub mod fuzz;
mod layout;
mod peer;
mod raw;
mod ring;
pub mod wait;
mod window;

#[cfg(all(test, loom))]
mod loom_model;

pub use channel::{Receiver, RecvSlot, SendSlot, Sender};
pub use doorbell::{Bell, Doorbell, FutexBell, RingMsg};
pub use endpoint::{Endpoint, Heartbeat};
pub use error::{Corruption, Error};
pub use layout::{
    Layout, RingOffsets, FRAME_HEADER, LAYOUT_VERSION, MAGIC, MAX_ENDPOINTS, MAX_RING_CAPACITY,
    MIN_RING_CAPACITY,
};
pub use peer::{Liveness, PeerState, PeerStatus};
pub use window::Window;
