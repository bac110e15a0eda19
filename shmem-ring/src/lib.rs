//! Message rings in a shared memory window.
//!
//! This crate owns the transport every mkctl protocol runs on: a mapped window
//! (a `/dev/shm` file, an ivshmem BAR, a `/dev/mem` range), a versioned layout
//! inside it (header, endpoint directory, one duplex channel per pair of
//! endpoints) and single-producer single-consumer rings of length-prefixed frames.
//!
//! It knows bytes, not protocols. The peer on the other side of a window may be
//! another kernel and is untrusted: every index and length read from the window
//! is checked before use.
