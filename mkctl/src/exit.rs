//! The exit codes mkctl ends with (`--help` documents them), shared by the
//! CLI and the daemon's error replies.

/// Success.
pub const EXIT_OK: i32 = 0;
/// The topology is invalid, or the operation failed.
pub const EXIT_FAIL: i32 = 1;
/// Usage error: bad arguments, an unreadable file, a name that does not
/// exist.
pub const EXIT_USAGE: i32 = 2;
