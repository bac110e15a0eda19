//! The `mkctl` command line.
fn main() {}
