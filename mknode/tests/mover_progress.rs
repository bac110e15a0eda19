//! What a move tells whoever asked for it while it runs: `MigrateSent`
//! answers with the bytes gone so far (growing, never more than the final
//! count), `MigrateProgress` once the copy runs, and a `MigrateReport`
//! that counts the pages carried — at least every page the process made
//! resident. Three agents on the host kernel over a real
//! window (`common::agents`), both modes.

mod common;

use std::time::Duration;

use common::agents::{net, start};
use mknode::wire::Msg;

/// Moves `pid` from agent 1 to 2, collecting every answer to the request.
fn move_collecting(n: &common::agents::Net, pid: u32, lazy: bool) -> Vec<Msg> {
    let (req, rx) = n.agents[0]
        .request(1, |req| Msg::MigrateOut {
            req,
            pid,
            to: 2,
            lazy,
            any_cpu: false,
        })
        .expect("request");
    let mut got = Vec::new();
    loop {
        let m = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("an answer within 120 s");
        let last = m.is_final();
        got.push(m);
        if last {
            break;
        }
    }
    n.agents[0].forget(1, req);
    got
}

fn check(lazy: bool) {
    let n = net();
    // 32 MiB touched: 8192 pages at least.
    let (pid, _out) = start(&n, 1, &["--mem", "32M", "--interval-ms", "5"]);
    let got = move_collecting(&n, pid, lazy);
    let sent: Vec<u64> = got
        .iter()
        .filter_map(|m| match m {
            Msg::MigrateSent { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .collect();
    let Some(Msg::MigrateReport {
        image_bytes, pages, ..
    }) = got.last()
    else {
        panic!("no report: {got:?}");
    };
    assert!(!sent.is_empty(), "no progress at all (lazy: {lazy})");
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "{sent:?}");
    assert!(
        sent.last().unwrap() <= image_bytes,
        "{sent:?} > {image_bytes}"
    );
    assert!(*pages >= 8192, "{pages} pages for 32 MiB resident");
    assert_eq!(
        got.iter()
            .filter(|m| matches!(m, Msg::MigrateProgress { .. }))
            .count(),
        1,
        "the copy runs once"
    );
    eprintln!(
        "lazy {lazy}: {} progress answers, last {} of {image_bytes} bytes, {pages} pages",
        sent.len(),
        sent.last().unwrap()
    );
}

#[test]
fn a_stop_copy_move_says_how_much_has_gone_and_counts_its_pages() {
    check(false);
}

#[test]
fn a_lazy_move_says_how_much_has_gone_and_counts_its_pages() {
    check(true);
}
