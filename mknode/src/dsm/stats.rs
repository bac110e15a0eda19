//! What a kernel's DSM counts, per region: faults, requests, invalidations,
//! bytes, fault latency, and how many pages it holds in which state.

use std::time::Duration;

use super::protocol::{Cache, Local};
use super::RegionInfo;

/// Fault latencies, kept as a bounded sample (the most recent ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latency {
    /// Microseconds, newest last, at most `KEEP`.
    samples: Vec<u32>,
    next: usize,
    count: u64,
}

const KEEP: usize = 4096;

impl Latency {
    pub fn record(&mut self, d: Duration) {
        let us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        if self.samples.len() < KEEP {
            self.samples.push(us);
        } else {
            self.samples[self.next] = us;
        }
        self.next = (self.next + 1) % KEEP;
        self.count += 1;
    }

    /// Faults resolved so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean of the kept samples, in µs.
    pub fn mean_us(&self) -> u64 {
        if self.samples.is_empty() {
            return 0;
        }
        self.samples.iter().map(|&s| u64::from(s)).sum::<u64>() / self.samples.len() as u64
    }

    /// 99th percentile of the kept samples, in µs.
    pub fn p99_us(&self) -> u64 {
        let mut v = self.samples.clone();
        v.sort_unstable();
        // The smallest sample with at least 99% of them at or below it.
        let at = (v.len() * 99).div_ceil(100).saturating_sub(1);
        v.get(at).copied().map_or(0, u64::from)
    }
}

/// One region on one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionStats {
    pub info: Option<RegionInfo>,
    pub mappers: u64,
    pub read_faults: u64,
    pub write_faults: u64,
    /// Requests sent to the home.
    pub requests: u64,
    /// Of those, pages asked for ahead of a sequential reader.
    pub read_ahead: u64,
    /// Invalidations received.
    pub invalidations: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Faults failed (SIGBUS).
    pub failed: u64,
    /// Pages lost with their owner (home only).
    pub lost_pages: u64,
    pub latency: Latency,
    /// Pages held read-only and exclusive here.
    pub shared: u64,
    pub exclusive: u64,
    /// Why it cannot be served any more, if so.
    pub error: Option<String>,
}

impl RegionStats {
    pub(super) fn count_states(&mut self, caches: &[Cache]) {
        self.shared = caches.iter().filter(|c| c.state() == Local::Shared).count() as u64;
        self.exclusive = caches
            .iter()
            .filter(|c| c.state() == Local::Exclusive)
            .count() as u64;
    }
}

impl RegionStats {
    /// As the wire carries it.
    pub fn to_wire(&self) -> crate::wire::DsmRegionStat {
        let info = self.info.clone().unwrap_or(RegionInfo {
            id: 0,
            name: String::new(),
            size: 0,
            home: 0,
        });
        crate::wire::DsmRegionStat {
            region: info.id,
            name: info.name,
            size: info.size,
            home: info.home,
            mappers: self.mappers,
            shared: self.shared,
            exclusive: self.exclusive,
            read_faults: self.read_faults,
            write_faults: self.write_faults,
            requests: self.requests,
            invalidations: self.invalidations,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            failed: self.failed,
            lost_pages: self.lost_pages,
            faults: self.latency.count(),
            mean_us: self.latency.mean_us(),
            p99_us: self.latency.p99_us(),
            error: self.error.clone().unwrap_or_default(),
        }
    }
}

/// A kernel's DSM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub node: u16,
    pub bad_messages: u64,
    pub regions: Vec<RegionStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_p99() {
        let mut l = Latency::default();
        assert_eq!((l.mean_us(), l.p99_us()), (0, 0));
        for us in 1..=100 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!((l.count(), l.mean_us(), l.p99_us()), (100, 50, 99));
        let mut two = Latency::default();
        two.record(Duration::from_micros(5));
        two.record(Duration::from_micros(900));
        assert_eq!(two.p99_us(), 900);
    }
}
