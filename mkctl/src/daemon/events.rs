//! The daemon's event bus: every instance state change and every migration
//! step the daemon sees, numbered and timestamped, for `mkctl events`.
//!
//! - [`Bus::publish`] numbers an event (`seq`, from 1, no holes), stamps
//!   it, keeps it in a ring of the last [`RING`] events and offers it to
//!   every subscriber. It never blocks: each subscriber has a queue of
//!   [`QUEUE`] events, and an event that does not fit is dropped *for that
//!   subscriber only* and counted; it then gets one `gap` event saying how
//!   many it missed (and their seqs) before the events that follow, or,
//!   when none follows, once it has read its queue ([`Bus::take_gap`]). A subscriber that went away is forgotten at the
//!   next event.
//! - [`Bus::subscribe`] hands out the last `last` events of the ring and a
//!   queue of everything published after them, atomically: nothing is
//!   missed or repeated between the two.
//! - [`Bus::close`] ends every subscription (the daemon is stopping): a
//!   subscriber drains its queue, then sees its end.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};

/// How many past events the bus keeps for late subscribers (`--last N`).
pub const RING: usize = 1024;
/// How many events may wait for one subscriber before it misses some.
pub const QUEUE: usize = 256;

/// One event as subscribers get it (and `mkctl events --json` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// 1, 2, 3... in publication order, for the daemon's lifetime; a gap
    /// event carries the seq of the last event it stands for.
    pub seq: u64,
    /// When it was published: milliseconds since the Unix epoch.
    pub time_ms: u64,
    #[serde(flatten)]
    pub what: What,
}

/// What happened. The JSON field `event` names the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum What {
    /// An instance went from one state to another (`from` is null the first
    /// time the daemon runs it). `reason`: why, when `to` is `failed`.
    /// `restarts`: restarts by its policy so far, with `restart =
    /// "on-failure"` (null without a policy).
    State {
        instance: String,
        from: Option<String>,
        to: String,
        reason: Option<String>,
        restarts: Option<u32>,
    },
    /// A process migration began (`mode`: `lazy` or `stop-copy`).
    MigrateStart {
        pid: u32,
        from: String,
        to: String,
        mode: String,
    },
    /// The process runs on the destination as `new_pid` after `downtime_ns`
    /// frozen (with `lazy`, its remaining pages follow on demand).
    MigrateRunning {
        pid: u32,
        from: String,
        to: String,
        new_pid: u32,
        downtime_ns: u64,
    },
    /// The migration is done: `image_bytes` went in the image and after it
    /// (registers, map and pages); `pages` pages carried (with content or
    /// marked all-zero).
    MigrateEnd {
        pid: u32,
        from: String,
        to: String,
        new_pid: u32,
        downtime_ns: u64,
        total_ns: u64,
        image_bytes: u64,
        #[serde(default)]
        pages: u64,
    },
    /// The migration failed; the process runs on where it was unless
    /// `error` says otherwise.
    MigrateFailed {
        pid: u32,
        from: String,
        to: String,
        error: String,
    },
    /// A thread move began (`from` is the process's kernel).
    ThreadMigrateStart {
        pid: u32,
        tid: u32,
        from: String,
        to: String,
    },
    /// The thread runs on `at` (in shadow process `shadow_pid`; 0 when
    /// home) after `downtime_ns` stopped.
    ThreadMigrateEnd {
        pid: u32,
        tid: u32,
        from: String,
        to: String,
        at: String,
        shadow_pid: u32,
        downtime_ns: u64,
    },
    ThreadMigrateFailed {
        pid: u32,
        tid: u32,
        from: String,
        to: String,
        error: String,
    },
    /// The daemon is stopping: its instances' stops follow, then the end.
    DaemonStopping,
    /// This subscriber fell behind and missed `missed` events, seqs
    /// `first_seq` to `seq`; it is never in the ring.
    Gap { missed: u64, first_seq: u64 },
}

impl Event {
    /// One line for people: `12:03:04.123 alpha booting -> ready`.
    pub fn human(&self) -> String {
        format!("{} {}", clock(self.time_ms), self.what.human())
    }
}

fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

impl What {
    fn human(&self) -> String {
        match self {
            What::State {
                instance,
                from,
                to,
                reason,
                restarts,
            } => {
                let mut s = format!(
                    "{instance} {} -> {to}",
                    from.as_deref().unwrap_or("(new)")
                );
                if let Some(r) = reason.as_ref().filter(|_| to == "failed") {
                    s.push_str(&format!(": {r}"));
                }
                if let Some(n) = restarts.filter(|n| *n > 0) {
                    s.push_str(&format!(" (restarts: {n})"));
                }
                s
            }
            What::MigrateStart {
                pid,
                from,
                to,
                mode,
            } => format!("migrate pid {pid} {from} -> {to} ({mode}): started"),
            What::MigrateRunning {
                pid,
                from,
                to,
                new_pid,
                downtime_ns,
            } => format!(
                "migrate pid {pid} {from} -> {to}: running as pid {new_pid} after {} of downtime",
                ms(*downtime_ns)
            ),
            What::MigrateEnd {
                pid,
                from,
                to,
                new_pid,
                downtime_ns,
                total_ns,
                image_bytes,
                pages,
            } => format!(
                "migrate pid {pid} {from} -> {to}: done, pid {new_pid}, downtime {}, total {}, {} moved ({pages} pages)",
                ms(*downtime_ns),
                ms(*total_ns),
                crate::units::ByteSize(*image_bytes).human()
            ),
            What::MigrateFailed {
                pid,
                from,
                to,
                error,
            } => format!("migrate pid {pid} {from} -> {to}: failed: {error}"),
            What::ThreadMigrateStart { pid, tid, from, to } => {
                format!("migrate thread {pid}/{tid} {from} -> {to}: started")
            }
            What::ThreadMigrateEnd {
                pid,
                tid,
                from,
                to,
                at,
                shadow_pid,
                downtime_ns,
            } => format!(
                "migrate thread {pid}/{tid} {from} -> {to}: runs on {at} (shadow pid {shadow_pid}) after {} stopped",
                ms(*downtime_ns)
            ),
            What::ThreadMigrateFailed {
                pid,
                tid,
                from,
                to,
                error,
            } => format!("migrate thread {pid}/{tid} {from} -> {to}: failed: {error}"),
            What::DaemonStopping => "daemon stopping".into(),
            What::Gap { missed, first_seq } => format!(
                "gap: {missed} event(s) missed (seq {first_seq}..), this subscriber fell behind"
            ),
        }
    }
}

/// `HH:MM:SS.mmm` of `time_ms` in the local time zone.
fn clock(time_ms: u64) -> String {
    let secs = libc::time_t::try_from(time_ms / 1000).unwrap_or(0);
    // SAFETY: localtime_r writes only into `tm`, which lives here; `secs`
    // is a valid time_t.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&secs, &mut tm).is_null() {
            None
        } else {
            Some(tm)
        }
    };
    let (h, m, s) = tm.map_or(
        (
            (time_ms / 3_600_000) % 24,
            (time_ms / 60_000) % 60,
            (time_ms / 1000) % 60,
        ),
        |tm| (tm.tm_hour as u64, tm.tm_min as u64, tm.tm_sec as u64),
    );
    format!("{h:02}:{m:02}:{s:02}.{:03}", time_ms % 1000)
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

#[derive(Debug)]
struct Sub {
    id: u64,
    tx: Sender<Event>,
    /// Events it missed since it last got one, and the first one's seq.
    missed: u64,
    first_missed: u64,
}

#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    next_sub: u64,
    ring: VecDeque<Event>,
    subs: Vec<Sub>,
    closed: bool,
}

/// The bus (see the module's documentation).
#[derive(Debug, Default)]
pub struct Bus {
    inner: Mutex<Inner>,
}

/// What a subscriber gets: the past events it asked for, then its queue
/// (which ends, once drained, when the bus closes).
#[derive(Debug)]
pub struct Subscription {
    /// Its name for [`Bus::take_gap`].
    pub id: u64,
    /// The seq of the last event published before it began (0: none).
    pub seq: u64,
    pub past: Vec<Event>,
    pub rx: Receiver<Event>,
}

impl Bus {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes one event; returns its seq. Never waits for a subscriber.
    pub fn publish(&self, what: What) -> u64 {
        let mut b = self.lock();
        b.next_seq += 1;
        let ev = Event {
            seq: b.next_seq,
            time_ms: now_ms(),
            what,
        };
        if b.ring.len() == RING {
            b.ring.pop_front();
        }
        b.ring.push_back(ev.clone());
        if b.closed {
            return ev.seq;
        }
        b.subs.retain_mut(|s| {
            if s.missed > 0 {
                let gap = Event {
                    seq: ev.seq - 1,
                    time_ms: ev.time_ms,
                    what: What::Gap {
                        missed: s.missed,
                        first_seq: s.first_missed,
                    },
                };
                match s.tx.try_send(gap) {
                    Ok(()) => s.missed = 0,
                    Err(TrySendError::Full(_)) => {
                        s.missed += 1;
                        return true;
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                }
            }
            match s.tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.missed = 1;
                    s.first_missed = ev.seq;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        ev.seq
    }

    /// Subscribes: the last `last` events kept (fewer when the ring has
    /// fewer), then everything published from now on. `None` once closed.
    pub fn subscribe(&self, last: usize) -> Option<Subscription> {
        let mut b = self.lock();
        if b.closed {
            return None;
        }
        let skip = b.ring.len().saturating_sub(last);
        let past = b.ring.iter().skip(skip).cloned().collect();
        let (tx, rx) = bounded(QUEUE);
        b.next_sub += 1;
        let id = b.next_sub;
        b.subs.push(Sub {
            tx,
            id,
            missed: 0,
            first_missed: 0,
        });
        Some(Subscription {
            id,
            seq: b.next_seq,
            past,
            rx,
        })
    }

    /// The gap event of subscriber `id` when it missed events and its
    /// queue is empty (it read everything before them): a subscriber asks
    /// when it runs out of events, so it hears of what it missed without
    /// waiting for the next event to be published.
    pub fn take_gap(&self, id: u64) -> Option<Event> {
        let mut b = self.lock();
        let s = b
            .subs
            .iter_mut()
            .find(|s| s.id == id && s.missed > 0 && s.tx.is_empty())?;
        let gap = Event {
            seq: s.first_missed + s.missed - 1,
            time_ms: now_ms(),
            what: What::Gap {
                missed: s.missed,
                first_seq: s.first_missed,
            },
        };
        s.missed = 0;
        Some(gap)
    }

    /// Ends every subscription: each subscriber's queue ends once drained.
    pub fn close(&self) {
        let mut b = self.lock();
        b.closed = true;
        b.subs.clear();
    }

    /// How many subscribers are registered (for tests and the log).
    pub fn subscribers(&self) -> usize {
        self.lock().subs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn state(instance: &str, from: Option<&str>, to: &str) -> What {
        What::State {
            instance: instance.into(),
            from: from.map(Into::into),
            to: to.into(),
            reason: None,
            restarts: None,
        }
    }

    fn drain(rx: &Receiver<Event>) -> Vec<Event> {
        rx.try_iter().collect()
    }

    #[test]
    fn events_arrive_in_order_numbered_without_holes() {
        let bus = Arc::new(Bus::default());
        let s = bus.subscribe(0).unwrap();
        assert!(s.past.is_empty());
        // Publishers on several threads: the order every subscriber sees
        // is the seq order.
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let bus = Arc::clone(&bus);
                std::thread::spawn(move || {
                    for i in 0..50 {
                        bus.publish(state(&format!("i{t}-{i}"), None, "booting"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let got = drain(&s.rx);
        assert_eq!(got.len(), 200);
        for (n, e) in got.iter().enumerate() {
            assert_eq!(e.seq, n as u64 + 1);
        }
        assert!(got.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
        // Each thread's own events keep their order too.
        let mine: Vec<String> = got
            .iter()
            .filter_map(|e| match &e.what {
                What::State { instance, .. } if instance.starts_with("i2-") => {
                    Some(instance.clone())
                }
                _ => None,
            })
            .collect();
        let want: Vec<String> = (0..50).map(|i| format!("i2-{i}")).collect();
        assert_eq!(mine, want);
    }

    #[test]
    fn the_ring_keeps_the_last_events_for_late_subscribers() {
        let bus = Bus::default();
        for i in 0..(RING as u64 + 10) {
            assert_eq!(bus.publish(What::DaemonStopping), i + 1);
        }
        // At most RING kept: the oldest went first.
        let all = bus.subscribe(usize::MAX).unwrap();
        assert_eq!(all.past.len(), RING);
        assert_eq!(all.past[0].seq, 11);
        assert_eq!(all.past.last().unwrap().seq, RING as u64 + 10);
        let three = bus.subscribe(3).unwrap();
        assert_eq!(three.seq, RING as u64 + 10);
        let seqs: Vec<u64> = three.past.iter().map(|e| e.seq).collect();
        let n = RING as u64 + 10;
        assert_eq!(seqs, [n - 2, n - 1, n]);
        // Then what follows, with nothing repeated.
        bus.publish(state("alpha", Some("booting"), "ready"));
        let next = drain(&three.rx);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].seq, n + 1);
        assert!(bus.subscribe(0).unwrap().past.is_empty());
    }

    #[test]
    fn a_slow_subscriber_misses_events_with_a_gap_and_blocks_nobody() {
        let bus = Bus::default();
        let slow = bus.subscribe(0).unwrap();
        let fast = bus.subscribe(0).unwrap();
        let gone = bus.subscribe(0).unwrap();
        drop(gone);
        let total = QUEUE as u64 * 4;
        let t = Instant::now();
        let mut fast_got = Vec::new();
        for _ in 0..total {
            bus.publish(What::DaemonStopping);
            fast_got.extend(drain(&fast.rx));
        }
        // Nobody reads `slow`: publishing did not wait for it.
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(fast_got.len() as u64, total, "the fast one misses nothing");
        assert_eq!(bus.subscribers(), 2, "the vanished one is forgotten");

        let first = drain(&slow.rx);
        assert_eq!(first.len(), QUEUE);
        assert_eq!(first.last().unwrap().seq, QUEUE as u64);
        // Room again: a gap first, counting every event it missed, then
        // the next event.
        bus.publish(What::DaemonStopping);
        let after = drain(&slow.rx);
        assert_eq!(after.len(), 2, "{after:?}");
        assert_eq!(
            after[0].what,
            What::Gap {
                missed: total - QUEUE as u64,
                first_seq: QUEUE as u64 + 1
            }
        );
        assert_eq!(after[0].seq, total);
        assert_eq!(after[1].seq, total + 1);
        assert!(bus.take_gap(slow.id).is_none(), "told once");

        // Or, without waiting for the next event: the subscriber asks when
        // its queue is empty.
        for _ in 0..QUEUE + 3 {
            bus.publish(What::DaemonStopping);
        }
        assert!(bus.take_gap(slow.id).is_none(), "not before the queue");
        assert_eq!(drain(&slow.rx).len(), QUEUE);
        let gap = bus.take_gap(slow.id).unwrap();
        assert_eq!(
            gap.what,
            What::Gap {
                missed: 3,
                first_seq: total + 2 + QUEUE as u64
            }
        );
        assert_eq!(gap.seq, total + 1 + QUEUE as u64 + 3);
        assert!(bus.take_gap(slow.id).is_none());
        assert!(bus.take_gap(fast.id).is_none());
        // Gaps are the subscriber's, not history.
        assert!(bus
            .subscribe(RING)
            .unwrap()
            .past
            .iter()
            .all(|e| !matches!(e.what, What::Gap { .. })));
    }

    #[test]
    fn close_ends_every_queue_after_what_it_holds() {
        let bus = Bus::default();
        let s = bus.subscribe(0).unwrap();
        bus.publish(What::DaemonStopping);
        bus.close();
        assert_eq!(s.rx.recv().unwrap().seq, 1);
        assert!(s.rx.recv().is_err(), "the queue ends");
        assert!(bus.subscribe(0).is_none());
        // Publishing after the close still numbers and keeps events.
        assert_eq!(bus.publish(What::DaemonStopping), 2);
    }

    #[test]
    fn json_fields_are_flat_and_named() {
        let e = Event {
            seq: 7,
            time_ms: 1_700_000_000_123,
            what: What::State {
                instance: "alpha".into(),
                from: Some("ready".into()),
                to: "failed".into(),
                reason: Some("qemu exited unexpectedly (signal: 9 (SIGKILL))".into()),
                restarts: Some(1),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "seq": 7, "time_ms": 1_700_000_000_123u64, "event": "state",
                "instance": "alpha", "from": "ready", "to": "failed",
                "reason": "qemu exited unexpectedly (signal: 9 (SIGKILL))", "restarts": 1
            })
        );
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
        let line = e.human();
        assert!(
            line.ends_with(
                " alpha ready -> failed: qemu exited unexpectedly (signal: 9 (SIGKILL)) (restarts: 1)"
            ),
            "{line}"
        );
        assert_eq!(line.as_bytes()[2], b':');
        assert_eq!(&line[8..12], ".123");
        let m = serde_json::to_value(Event {
            seq: 8,
            time_ms: 0,
            what: What::MigrateEnd {
                pid: 10,
                from: "alpha".into(),
                to: "beta".into(),
                new_pid: 20,
                downtime_ns: 5,
                total_ns: 9,
                image_bytes: 4096,
                pages: 1,
            },
        })
        .unwrap();
        assert_eq!(m["event"], "migrate-end");
        assert_eq!(m["new_pid"], 20);
        assert_eq!(m["pages"], 1);
    }
}
