//! The doorbell across real kernels under QEMU: the demo topology (host,
//! alpha, beta) boots with each guest's virtio-serial doorbell port, and the
//! first message on a link that has been silent for 5 s wakes its receiver
//! through the daemon's relay instead of waiting for a poll — host to guest
//! and guest to guest.
//!
//! What the bounds tell apart (figures from `qemu/wake-latency.sh` on the
//! 2-core TCG machine this was written on, while another QEMU and rustc
//! ran): a cold round trip is two first messages, one each way. Polling
//! (`MKCTL_DOORBELL=off`) sleeps up to 10 ms between looks when idle:
//! host <-> alpha took 7-18 ms (medians 13-17 ms). With the relay: 0.6-6 ms
//! host <-> guest (medians 1-3 ms), 1.4-26 ms guest <-> guest (medians
//! 2-5 ms; four hops through QEMU and the daemon, each a host thread to
//! wake on busy cores). A relay that dropped the rings would leave each
//! receiver to its own look every 100 ms: 50-200 ms. Between guests polling
//! gave 7-18 ms (medians 8-9 ms), too close to the relay's figures on busy
//! cores for a bound to tell apart reliably: there the daemon's relay
//! counters (`mkctl status --json`, `doorbell`) show that both guests said
//! they ring and that the rings did go from guest to guest, and the guests'
//! consoles that they use the port.

use std::time::Duration;

use mkctl_e2e::{assert_doorbell_ready, repo_root, Mkctl};

const ROUNDS: usize = 5;
const SILENCE: Duration = Duration::from_secs(5);
/// Median cold round trip, host <-> guest: below what polling gives.
const HOST_GUEST: Duration = Duration::from_millis(6);
/// Median cold round trip, guest <-> guest: far below a receiver's own
/// 100 ms look, with room for four relayed hops on busy cores.
const GUEST_GUEST: Duration = Duration::from_millis(25);

fn cold_rtt(m: &Mkctl, from: &str, to: &str) -> Duration {
    std::thread::sleep(SILENCE);
    let out = m.run(&["ping", from, to, "--count", "1", "--json"]).ok();
    let ns = out.json()["rtt_median_ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rtt_median_ns in {}", out.text()));
    Duration::from_nanos(ns)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn the_first_message_after_silence_wakes_its_receiver_through_the_relay() {
    let m = Mkctl::new("bell");
    let cfg = repo_root().join("configs/demo.toml").display().to_string();
    // Whatever the caller's environment says: this test is about the relay.
    let out = m
        .command()
        .env_remove("MKCTL_DOORBELL")
        .args(["boot", &cfg])
        .output()
        .expect("mkctl boot");
    assert!(out.status.success(), "boot: {out:?}");
    for guest in ["alpha", "beta"] {
        assert_doorbell_ready(&m, guest);
    }

    let (mut host_guest, mut guest_guest) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        host_guest.push(cold_rtt(&m, "host", "alpha"));
        guest_guest.push(cold_rtt(&m, "alpha", "beta"));
    }
    eprintln!("cold round trips host->alpha {host_guest:?}, alpha->beta {guest_guest:?}");
    let (hg, gg) = (median(host_guest.clone()), median(guest_guest.clone()));
    assert!(
        hg < HOST_GUEST,
        "host <-> alpha after {SILENCE:?} of silence: median {hg:?} (all {host_guest:?}), want < {HOST_GUEST:?} — polling, not rung?"
    );
    // Every cold round trip rang on its first message, which finds its
    // receiver asleep: host -> alpha, alpha -> beta. The answer may find
    // the sender still awake, spinning for it, and need no ring (so not
    // 2 per round between guests: that failed under load). And the guests
    // sent nothing the relay had to refuse.
    let status = m.run(&["status", "--json"]).ok().json();
    let bell = &status["daemon"]["doorbell"];
    let count = |k: &str| {
        bell[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no doorbell.{k} in the status: {status}"))
    };
    let rounds = ROUNDS as u64;
    assert!(count("from_host") >= rounds, "{bell}");
    assert!(count("to_host") >= rounds, "{bell}");
    assert!(count("between_guests") >= rounds, "{bell}");
    assert_eq!(count("refused_bytes"), 0, "{bell}");
    assert_eq!(count("guests_ringing"), 2, "{bell}");
    assert!(
        gg < GUEST_GUEST,
        "alpha <-> beta after {SILENCE:?} of silence: median {gg:?} (all {guest_guest:?}), want < {GUEST_GUEST:?} — rings between guests lost?"
    );
}

/// mkctl puts the port's driver where guest-init loads it from.
#[test]
fn the_initramfs_holds_the_modules_where_guest_init_looks() {
    assert_eq!(
        mkctl::initramfs::GUEST_MODULE_DIR.trim_start_matches('/'),
        guest_init::doorbell::MODULE_DIR
    );
    assert_eq!(
        mkctl::qemu::machine::DOORBELL_PORT,
        guest_init::doorbell::PORT_NAME
    );
}
