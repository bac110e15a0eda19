//! Helpers shared by the integration tests: self-checking messages, a
//! forked child process, cheap random numbers.

#![allow(dead_code, unreachable_pub)]

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// FNV-1a over `bytes`: cheap and order-sensitive.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Payload length of message `seq`: 16..=16+max_extra, varying per message.
pub fn message_len(seq: u64, max_extra: u64) -> usize {
    16 + (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize % (max_extra as usize + 1)
}

/// Message `seq`: its sequence number, filler bytes that depend on it, and a
/// checksum of everything before.
pub fn make_message(seq: u64, len: usize, buf: &mut Vec<u8>) {
    assert!(len >= 16);
    buf.clear();
    buf.extend_from_slice(&seq.to_le_bytes());
    let fill = seq as u8;
    buf.extend((0..len - 16).map(|i| fill.wrapping_add(i as u8)));
    let sum = checksum(buf);
    buf.extend_from_slice(&sum.to_le_bytes());
}

/// Checks a message: returns its sequence number, or what is wrong with it.
pub fn check_message(msg: &[u8]) -> Result<u64, String> {
    if msg.len() < 16 {
        return Err(format!("message of {} bytes is too short", msg.len()));
    }
    let (body, sum) = msg.split_at(msg.len() - 8);
    let want = u64::from_le_bytes(sum.try_into().unwrap());
    if checksum(body) != want {
        return Err(format!("checksum mismatch in a {}-byte message", msg.len()));
    }
    Ok(u64::from_le_bytes(body[..8].try_into().unwrap()))
}

/// Runs `child` in a forked process and returns its pid; the child exits with
/// the code `child` returns (101 if it panics).
///
/// Each test binary that forks keeps to one `#[test]`, so no other test
/// thread can hold a lock across the fork.
pub fn fork_child(child: impl FnOnce() -> i32) -> Pid {
    // SAFETY: the test binary runs this single test, so the only other thread
    // is the harness's main thread, blocked waiting for it and holding no lock
    // the child needs; glibc's malloc is fork-safe. The child leaves through
    // `_exit`, without running the parent's destructors or atexit handlers.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Parent { child } => child,
        ForkResult::Child => {
            // The harness captures `eprintln!` per thread and would never
            // print the child's; write panics straight to stderr instead.
            std::panic::set_hook(Box::new(|info| {
                use std::io::Write;
                let _ = writeln!(std::io::stderr(), "forked child: {info}");
            }));
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(101);
            // SAFETY: `_exit` ends the process at once; nothing after it runs.
            unsafe { nix::libc::_exit(code) }
        }
    }
}

/// Waits for a child and returns its exit code (negative: killed by a signal).
pub fn wait_child(pid: Pid) -> i32 {
    match waitpid(pid, None).expect("waitpid") {
        WaitStatus::Exited(_, code) => code,
        WaitStatus::Signaled(_, sig, _) => -(sig as i32),
        other => panic!("unexpected child status {other:?}"),
    }
}

/// A xorshift generator: cheap, varied numbers, not quality (seed: odd).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
