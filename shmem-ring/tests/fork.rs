//! Two processes (fork) sharing one window through a file in /dev/shm (or the
//! temp dir): millions of self-checking messages one way, checked in the
//! child, and the child's verdict back through the other ring and its exit
//! code.
//!
//! One `#[test]` only: see `common::fork_child`.

use std::time::Duration;

use shmem_ring::{Error, Window};

mod common;

const MESSAGES: u64 = 2_000_000;
const LONG: Duration = Duration::from_secs(60);

fn shm_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

#[test]
fn millions_of_messages_between_two_processes() {
    let dir = shm_dir();
    let path = dir.path().join("window");
    let w = Window::create(&path, 1 << 20, 2).unwrap();
    let host = w.attach(0).unwrap();

    let child = common::fork_child(|| {
        // The child opens the file on its own, as a guest maps the BAR.
        let w = match Window::open(&path) {
            Ok(w) => w,
            Err(_) => return 2,
        };
        let me = w.attach(1).unwrap();
        let (mut tx, mut rx) = me.channel(0).unwrap();
        let mut buf = Vec::new();
        let mut bad = 0u64;
        let mut sum = 0u64;
        for seq in 0..MESSAGES {
            rx.recv(&mut buf, LONG).unwrap();
            match common::check_message(&buf) {
                Ok(s) if s == seq => sum = sum.wrapping_add(common::checksum(&buf)),
                _ => bad += 1,
            }
        }
        let mut report = bad.to_le_bytes().to_vec();
        report.extend_from_slice(&sum.to_le_bytes());
        tx.send(&report, LONG).unwrap();
        i32::from(bad != 0)
    });

    let (mut tx, mut rx) = host.channel(1).unwrap();
    let mut msg = Vec::new();
    let mut sum = 0u64;
    for seq in 0..MESSAGES {
        common::make_message(seq, common::message_len(seq, 48), &mut msg);
        sum = sum.wrapping_add(common::checksum(&msg));
        if seq % 16 == 15 {
            tx.send(&msg, LONG).unwrap();
        } else {
            tx.send_batched(&msg, LONG).unwrap();
        }
    }
    tx.flush();
    let mut report = Vec::new();
    rx.recv(&mut report, LONG).unwrap();
    let code = common::wait_child(child);
    assert_eq!(code, 0, "child exit code");
    assert_eq!(report.len(), 16);
    assert_eq!(
        u64::from_le_bytes(report[..8].try_into().unwrap()),
        0,
        "bad messages"
    );
    assert_eq!(
        u64::from_le_bytes(report[8..].try_into().unwrap()),
        sum,
        "sum of checksums"
    );

    // The child detached on exit.
    let e = rx.recv(&mut report, LONG).unwrap_err();
    assert!(matches!(e, Error::PeerGone { peer: 1 }), "{e}");
}
