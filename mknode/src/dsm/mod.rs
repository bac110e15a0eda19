//! Distributed shared memory: pages replicated on read and invalidated on
//! write, across kernels, in user space (userfaultfd over the agents'
//! links). The protocol is `protocol.rs`, written down with its
//! correctness argument in `README.md`; `model.rs` checks it exhaustively
//! for small systems.

pub mod protocol;

#[cfg(test)]
mod model;
