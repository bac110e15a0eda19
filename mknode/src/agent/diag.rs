//! The diagnostics facet: what this kernel is (`InfoRequest`), powering it
//! off, round trips to a peer (`Ping`, and `PingPeer` on a requester's
//! behalf), and traffic checks (`Blob`s whose order and content the
//! receiver verifies, `SendBlobs`, `BlobCheck`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};

use super::{lock, Agent, AgentError, AgentRef, Facet, SEND_TIMEOUT};
use crate::wire::{self, KernelInfo, Kind, Msg};

/// How long one ping may take before it counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default, Clone, Copy)]
struct BlobStats {
    good: u64,
    bad: u64,
    next_seq: u64,
}

/// What arrived of a traffic check from one sender.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlobReport {
    /// Blobs that arrived intact and in order.
    pub good: u64,
    /// Blobs out of order or with a wrong checksum.
    pub bad: u64,
    /// The sequence number expected next.
    pub next_seq: u64,
}

/// Round-trip times, summarised.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RttSummary {
    pub count: u32,
    pub min_ns: u64,
    pub median_ns: u64,
    pub max_ns: u64,
}

impl RttSummary {
    pub fn of(rtts: &[Duration]) -> RttSummary {
        let mut ns: Vec<u64> = rtts
            .iter()
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .collect();
        ns.sort_unstable();
        RttSummary {
            count: u32::try_from(ns.len()).unwrap_or(u32::MAX),
            min_ns: ns.first().copied().unwrap_or(0),
            median_ns: ns.get(ns.len() / 2).copied().unwrap_or(0),
            max_ns: ns.last().copied().unwrap_or(0),
        }
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct Diag {
    agent: AgentRef,
    next_ping: AtomicU64,
    /// Pings waiting for their pong, by (peer, seq).
    pongs: Mutex<HashMap<(u16, u64), Sender<Instant>>>,
    /// Traffic received, by sender.
    blobs: Mutex<HashMap<u16, BlobStats>>,
}

impl Facet for Diag {
    fn kinds(&self) -> &'static [Kind] {
        &[
            Kind::InfoRequest,
            Kind::PowerOff,
            Kind::Ping,
            Kind::Pong,
            Kind::PingPeer,
            Kind::Blob,
            Kind::SendBlobs,
            Kind::BlobCheck,
        ]
    }

    fn handle(self: Arc<Self>, agent: &Arc<Agent>, peer: u16, m: Msg) -> Option<Msg> {
        match m {
            Msg::InfoRequest { req } => {
                let info = (agent.hooks().info)();
                let _ = agent.post(peer, &Msg::Info { req, info });
            }
            Msg::PowerOff => (agent.hooks().power_off)(),
            Msg::Ping { seq, t_ns } => {
                let _ = agent.post(peer, &Msg::Pong { seq, t_ns });
            }
            Msg::Pong { seq, .. } => {
                if let Some(tx) = lock(&self.pongs).remove(&(peer, seq)) {
                    let _ = tx.send(Instant::now());
                }
            }
            Msg::PingPeer {
                req,
                peer: target,
                count,
            } => agent.answer_later(peer, req, move |_| {
                let s = RttSummary::of(&self.ping(target, count)?);
                Ok::<_, AgentError>(Msg::PingReport {
                    req,
                    count: s.count,
                    rtt_min_ns: s.min_ns,
                    rtt_median_ns: s.median_ns,
                    rtt_max_ns: s.max_ns,
                })
            }),
            Msg::SendBlobs {
                req,
                peer: target,
                count,
                size,
                seed,
            } => agent.answer_later(peer, req, move |_| {
                self.send_blobs(target, count, size, seed)?;
                Ok::<_, AgentError>(Msg::Done { req })
            }),
            Msg::Blob {
                seq,
                checksum,
                payload,
            } => {
                let mut b = lock(&self.blobs);
                // A burst starts at sequence 0: forget the previous one.
                if seq == 0 {
                    b.remove(&peer);
                }
                let s = b.entry(peer).or_default();
                if seq == s.next_seq && wire::checksum(&payload) == checksum {
                    s.good += 1;
                } else {
                    s.bad += 1;
                }
                s.next_seq = seq.wrapping_add(1);
            }
            Msg::BlobCheck { req, from } => {
                let r = self.blob_report(from);
                let _ = agent.post(
                    peer,
                    &Msg::BlobReport {
                        req,
                        from,
                        good: r.good,
                        bad: r.bad,
                        next_seq: r.next_seq,
                    },
                );
            }
            other => return Some(other),
        }
        None
    }
}

impl Diag {
    pub fn new(agent: AgentRef) -> Self {
        Diag {
            agent,
            next_ping: AtomicU64::new(1),
            pongs: Mutex::new(HashMap::new()),
            blobs: Mutex::new(HashMap::new()),
        }
    }

    /// What arrived from `from` in its latest traffic check.
    pub fn blob_report(&self, from: u16) -> BlobReport {
        let s = lock(&self.blobs).get(&from).copied().unwrap_or_default();
        BlobReport {
            good: s.good,
            bad: s.bad,
            next_seq: s.next_seq,
        }
    }

    /// Forgets what arrived from `from` (before a new traffic check).
    pub fn reset_blobs(&self, from: u16) {
        lock(&self.blobs).remove(&from);
    }

    /// Sends `count` checksummed blobs of `size` bytes to `peer`.
    pub fn send_blobs(
        &self,
        peer: u16,
        count: u32,
        size: u32,
        seed: u64,
    ) -> Result<(), AgentError> {
        let agent = self.agent.get()?;
        let link = agent.link(peer)?;
        let size = (size as usize).min(link.max_message().saturating_sub(64));
        let mut buf = Vec::new();
        for seq in 0..u64::from(count) {
            let payload = wire::blob_payload(seed, seq, size);
            let m = Msg::Blob {
                seq,
                checksum: wire::checksum(&payload),
                payload,
            };
            buf.clear();
            m.encode_into(&mut buf);
            agent.send_bytes(peer, &buf)?;
        }
        Ok(())
    }

    /// Round trips to `peer`, each a `Ping` answered by its agent.
    pub fn ping(&self, peer: u16, count: u32) -> Result<Vec<Duration>, AgentError> {
        let agent = self.agent.get()?;
        let link = agent.link(peer)?;
        let mut rtts = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let seq = self.next_ping.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = bounded(1);
            lock(&self.pongs).insert((peer, seq), tx);
            let t0 = Instant::now();
            let m = Msg::Ping { seq, t_ns: 0 };
            link.send(&m.encode(), SEND_TIMEOUT)
                .map_err(|source| AgentError::Link {
                    peer: agent.peer(peer),
                    source,
                })?;
            match rx.recv_timeout(PING_TIMEOUT) {
                Ok(t1) => rtts.push(t1.duration_since(t0)),
                Err(_) => {
                    lock(&self.pongs).remove(&(peer, seq));
                    return Err(AgentError::NoAnswer {
                        peer: agent.peer(peer),
                        timeout: PING_TIMEOUT,
                    });
                }
            }
        }
        Ok(rtts)
    }
}

/// What this kernel looks like, read from /proc and /sys (the default
/// `info` hook for both the host and guests).
pub fn kernel_info() -> KernelInfo {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let uts = nix::sys::utsname::uname().ok();
    let s = |f: fn(&nix::sys::utsname::UtsName) -> &std::ffi::OsStr| {
        uts.as_ref()
            .map(|u| f(u).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut nodes = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/sys/devices/system/node") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_prefix("node")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let cpus = read(&format!("/sys/devices/system/node/{name}/cpulist"));
            let mem = read(&format!("/sys/devices/system/node/{name}/meminfo"));
            nodes.push(wire::NodeInfo {
                id,
                cpus,
                mem_total: meminfo_kb(&mem, "MemTotal:") * 1024,
            });
        }
    }
    nodes.sort_by_key(|n| n.id);
    let uptime_ms = read("/proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(0, |s| (s * 1000.0) as u64);
    KernelInfo {
        hostname: s(|u| u.nodename()),
        sysname: s(|u| u.sysname()),
        release: s(|u| u.release()),
        version: s(|u| u.version()),
        machine: s(|u| u.machine()),
        cpus_online: read("/sys/devices/system/cpu/online"),
        nodes,
        mem_total: meminfo_kb(&read("/proc/meminfo"), "MemTotal:") * 1024,
        uptime_ms,
    }
}

/// The kB value of `key` in a meminfo-style text (per-node files prefix
/// lines with "Node N ").
fn meminfo_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let at = l.find(key)?;
            l[at + key.len()..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::super::tests::pair;
    use super::*;
    use std::thread;

    #[test]
    fn info_ping_and_blobs() {
        let (a, b) = pair();
        let info = a
            .call(1, Duration::from_secs(5), |req| Msg::InfoRequest { req })
            .unwrap();
        let Msg::Info { info, .. } = info else {
            panic!()
        };
        assert_eq!(info.sysname, "Linux");
        assert!(info.mem_total > 0);
        let (da, db) = (a.facet::<Diag>(), b.facet::<Diag>());
        assert_eq!(da.ping(1, 100).unwrap().len(), 100);
        // b pings a on a's request and reports.
        let r = a
            .call(1, Duration::from_secs(5), |req| Msg::PingPeer {
                req,
                peer: 0,
                count: 10,
            })
            .unwrap();
        assert!(matches!(r, Msg::PingReport { count: 10, .. }), "{r:?}");
        let report = |good, bad, next_seq| BlobReport {
            good,
            bad,
            next_seq,
        };
        // Traffic a -> b, checked by b.
        da.send_blobs(1, 3000, 200, 42).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while db.blob_report(0).good < 3000 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(db.blob_report(0), report(3000, 0, 3000));
        // A second burst starts over at 0 and is counted afresh.
        da.send_blobs(1, 10, 64, 7).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while db.blob_report(0).next_seq != 10 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(db.blob_report(0), report(10, 0, 10));
        // Traffic b -> a on a's request.
        let r = a
            .call(1, Duration::from_secs(10), |req| Msg::SendBlobs {
                req,
                peer: 0,
                count: 500,
                size: 64,
                seed: 1,
            })
            .unwrap();
        assert!(matches!(r, Msg::Done { .. }));
        assert_eq!(da.blob_report(1), report(500, 0, 500));
    }

    #[test]
    fn corrupt_and_reordered_blobs_are_counted_bad() {
        let (a, b) = pair();
        let p = b"hello".to_vec();
        let good = Msg::Blob {
            seq: 0,
            checksum: wire::checksum(&p),
            payload: p.clone(),
        };
        let corrupt = Msg::Blob {
            seq: 1,
            checksum: wire::checksum(&p) ^ 1,
            payload: p.clone(),
        };
        let skipped = Msg::Blob {
            seq: 5,
            checksum: wire::checksum(&p),
            payload: p,
        };
        for m in [good, corrupt, skipped] {
            a.send(1, &m).unwrap();
        }
        let link = a.link(1).unwrap();
        link.send(&[0xde, 0xad], SEND_TIMEOUT).unwrap();
        let r = a
            .call(1, Duration::from_secs(5), |req| Msg::BlobCheck {
                req,
                from: 0,
            })
            .unwrap();
        assert!(
            matches!(
                r,
                Msg::BlobReport {
                    good: 1,
                    bad: 2,
                    next_seq: 6,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(b.bad_frames(), 1);
    }

    #[test]
    fn rtts_are_summarised_by_min_median_max() {
        let ms = |v: u64| Duration::from_millis(v);
        let s = RttSummary::of(&[ms(3), ms(1), ms(2)]);
        assert_eq!(
            (s.count, s.min_ns, s.median_ns, s.max_ns),
            (3, 1_000_000, 2_000_000, 3_000_000)
        );
        assert_eq!(RttSummary::of(&[]), RttSummary::default());
    }
}
