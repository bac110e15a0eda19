//! Two threads, one ring each way: a million self-checking messages of
//! varying sizes from one thread to the other, in order and intact, using
//! every sending and receiving path (copy, batched, zero copy).

use std::time::Duration;

use shmem_ring::{Error, Layout, Window};

mod common;

const MESSAGES: u64 = 1_000_000;
const LONG: Duration = Duration::from_secs(30);

#[test]
fn a_million_messages_between_two_threads() {
    // A small ring, so the sender keeps running into a full ring and wraps
    // thousands of times.
    let w = Window::anonymous(Layout::with_capacity(2, 16 << 10).unwrap()).unwrap();
    let a = w.attach(0).unwrap();
    let b = w.attach(1).unwrap();
    let (mut tx, _) = a.channel(1).unwrap();
    let (mut echo_tx, mut rx) = b.channel(0).unwrap();

    let sender = std::thread::spawn(move || {
        let mut msg = Vec::new();
        for seq in 0..MESSAGES {
            let len = common::message_len(seq, 200);
            match seq % 3 {
                0 => {
                    common::make_message(seq, len, &mut msg);
                    tx.send(&msg, LONG).unwrap();
                }
                1 => {
                    common::make_message(seq, len, &mut msg);
                    tx.send_batched(&msg, LONG).unwrap();
                    if seq % 64 == 1 {
                        tx.flush();
                    }
                }
                _ => {
                    common::make_message(seq, len, &mut msg);
                    let mut slot = tx.reserve(len, LONG).unwrap();
                    slot.copy_from_slice(&msg);
                    slot.commit();
                }
            }
        }
        tx.flush();
        tx
    });

    let mut buf = Vec::new();
    for seq in 0..MESSAGES {
        if seq % 2 == 0 {
            rx.recv(&mut buf, LONG).unwrap();
            assert_eq!(common::check_message(&buf), Ok(seq));
        } else {
            let slot = rx.peek(LONG).unwrap();
            assert_eq!(common::check_message(&slot), Ok(seq));
            slot.release();
        }
    }
    let _tx = sender.join().unwrap();
    assert!(matches!(rx.try_recv(&mut buf), Err(Error::Empty { .. })));
    echo_tx.try_send(b"done").unwrap();
}
