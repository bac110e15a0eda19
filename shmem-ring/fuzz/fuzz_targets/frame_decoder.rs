//! Fuzzes the frame decoder and the producer's checks of the read position
//! with arbitrary ring contents: `cargo +nightly fuzz run frame_decoder`.
//! `tests/props.rs` runs the same entry point with proptest in CI.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shmem_ring::fuzz::frame_decoder(data);
});
