//! How a blocking call waits: spin, then yield, then sleep. A receiver with
//! a doorbell sleeps on it once spinning and yielding found nothing
//! (`Receiver::doze` in `channel.rs`): on this kind of machine a blocking
//! hand-off between two vCPUs costs ~25 µs, so the spin phase covers the
//! tens of microseconds in which a busy peer answers, and only a receiver
//! that is idle pays the wake-up. Senders waiting for room, and receivers
//! without a doorbell, sleep with exponential back-off instead.

use std::hint::spin_loop;
use std::time::{Duration, Instant};

/// Spin this long before yielding the CPU.
pub const SPIN_FOR: Duration = Duration::from_micros(50);
/// Then yield for this long before sleeping.
pub const YIELD_FOR: Duration = Duration::from_micros(100);
/// First sleep; it doubles on each round up to [`MAX_SLEEP`].
pub const FIRST_SLEEP: Duration = Duration::from_micros(10);
/// Longest sleep between two polls in the first ~10 ms of a wait.
pub const MAX_SLEEP: Duration = Duration::from_millis(1);
/// Longest sleep between two polls of a receiver idle for long (at least
/// [`IDLE_AFTER`]): sleeps grow to a tenth of the time it has been idle (so
/// a message is seen at most ~10% of the idle time late), up to this.
pub const IDLE_SLEEP: Duration = Duration::from_millis(10);
/// How long a receiver must have waited in vain before its sleeps grow past
/// [`MAX_SLEEP`]: a peer in the middle of an exchange (an image that takes a
/// few hundred ms to stream) is still answered within 1 ms.
pub const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Longest sleep on a doorbell before a receiver looks at its peer's
/// liveness (and at the producer's broken flag) again; shorter when the
/// endpoint's `Liveness::dead_after` is below four times this. Also the
/// bound on how late a message is when its ring got lost on the way.
pub const LOOK_EVERY: Duration = Duration::from_millis(100);

/// How many spin rounds between two clock reads.
const SPINS_PER_CHECK: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Spin,
    Yield,
    Sleep,
}

/// The state of one wait. The clock is first read after `SPINS_PER_CHECK`
/// polls, not when the wait begins: most waits between two busy peers are
/// shorter than that, and a clock read costs as much as a poll.
#[derive(Debug)]
pub(crate) struct Waiter {
    start: Option<Instant>,
    phase: Phase,
    spins: u32,
    sleep: Duration,
    /// Idle time before this wait (earlier waits that found nothing).
    idle: Duration,
    /// How long the spin phase lasts ([`SPIN_FOR`] unless told otherwise).
    spin: Duration,
}

impl Waiter {
    pub(crate) fn new() -> Waiter {
        Waiter {
            start: None,
            phase: Phase::Spin,
            spins: 0,
            sleep: FIRST_SLEEP,
            idle: Duration::ZERO,
            spin: SPIN_FOR,
        }
    }

    /// This wait with a spin phase of `spin` instead of [`SPIN_FOR`]; zero
    /// goes straight to yielding (a waiter with more threads than CPUs
    /// around it: see [`crate::Receiver::set_spin`]).
    pub(crate) fn spinning_for(mut self, spin: Duration) -> Waiter {
        self.spin = spin;
        if spin.is_zero() && self.phase == Phase::Spin {
            self.phase = Phase::Yield;
        }
        self
    }

    /// A wait that goes on from `idle` of waiting that found nothing (a
    /// receiver polled in a loop of timeouts). Once that is past the spin
    /// and yield phases, it sleeps at once, as long as the whole idle time
    /// allows (see [`IDLE_SLEEP`]).
    pub(crate) fn after_idle(idle: Duration) -> Waiter {
        if idle < IDLE_AFTER {
            return Waiter {
                idle,
                ..Waiter::new()
            };
        }
        Waiter {
            start: Some(Instant::now()),
            phase: Phase::Sleep,
            spins: 0,
            sleep: sleep_cap(idle),
            idle,
            spin: SPIN_FOR,
        }
    }

    /// Whether the spin and yield phases are over: the caller should sleep
    /// now (on its doorbell, if it has one; [`Waiter::pause`] sleeps with
    /// timed back-off).
    pub(crate) fn sleeping(&self) -> bool {
        self.phase == Phase::Sleep
    }

    /// When the wait's clock started (the first check), or now.
    pub(crate) fn start(&self) -> Instant {
        self.start.unwrap_or_else(Instant::now)
    }

    /// Waits one round. Returns the current time every so often (every round
    /// once spinning is over): the caller then checks its deadline and the
    /// peer's liveness, which are too costly to check on every spin.
    pub(crate) fn pause(&mut self) -> Option<Instant> {
        match self.phase {
            Phase::Spin => {
                spin_loop();
                self.spins = self.spins.wrapping_add(1);
                if self.spins % SPINS_PER_CHECK != 0 {
                    return None;
                }
                let now = Instant::now();
                let start = *self.start.get_or_insert(now);
                if now.duration_since(start) >= self.spin {
                    self.phase = Phase::Yield;
                }
                Some(now)
            }
            Phase::Yield => {
                std::thread::yield_now();
                let now = Instant::now();
                let start = *self.start.get_or_insert(now);
                if now.duration_since(start) >= self.spin + YIELD_FOR {
                    self.phase = Phase::Sleep;
                }
                Some(now)
            }
            Phase::Sleep => {
                std::thread::sleep(self.sleep);
                let now = Instant::now();
                let idle = self.idle + now.saturating_duration_since(self.start());
                self.sleep = (self.sleep * 2).min(sleep_cap(idle));
                Some(now)
            }
        }
    }
}

/// The longest sleep after `idle` of waiting: [`MAX_SLEEP`], or past
/// [`IDLE_AFTER`] a tenth of the idle time, up to [`IDLE_SLEEP`].
fn sleep_cap(idle: Duration) -> Duration {
    if idle < IDLE_AFTER {
        return MAX_SLEEP;
    }
    (idle / 10).clamp(MAX_SLEEP, IDLE_SLEEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_to_sleeping_and_caps_the_sleep() {
        let mut w = Waiter::new();
        let mut polls = 0u32;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(30) {
            w.pause();
            polls += 1;
        }
        assert_eq!(w.phase, Phase::Sleep);
        // 30 ms in: not idle for long yet.
        assert_eq!(w.sleep, MAX_SLEEP);
        // Spinning polls often; sleeping keeps the rest of 30 ms to a few dozen.
        assert!(polls > 100, "{polls} polls");
    }

    #[test]
    fn a_long_idle_receiver_sleeps_at_once_and_longer() {
        let w = Waiter::after_idle(Duration::from_millis(1500));
        assert_eq!(w.phase, Phase::Sleep);
        assert_eq!(w.sleep, Duration::from_millis(10).min(IDLE_SLEEP));
        let w = Waiter::after_idle(Duration::from_secs(60));
        assert_eq!(w.sleep, IDLE_SLEEP);
        // Not idle for long yet: the usual spin first, sleeps up to 1 ms.
        assert_eq!(
            Waiter::after_idle(Duration::from_millis(300)).phase,
            Phase::Spin
        );
        assert_eq!(sleep_cap(Duration::from_millis(900)), MAX_SLEEP);
    }

    #[test]
    fn a_waiter_told_not_to_spin_yields_from_the_start_then_sleeps() {
        let mut w = Waiter::new().spinning_for(Duration::ZERO);
        assert_eq!(w.phase, Phase::Yield);
        // Every round reads the clock (no spin rounds without one).
        assert!(w.pause().is_some());
        let t0 = Instant::now();
        while w.phase == Phase::Yield {
            assert!(w.pause().is_some());
            assert!(t0.elapsed() < Duration::from_secs(1), "never left yielding");
        }
        assert_eq!(w.phase, Phase::Sleep);
        assert!(t0.elapsed() >= YIELD_FOR - Duration::from_micros(1));
        // A longer spin is kept as told.
        let mut w = Waiter::new().spinning_for(Duration::from_millis(5));
        let t0 = Instant::now();
        while w.phase == Phase::Spin {
            w.pause();
        }
        assert!(t0.elapsed() >= Duration::from_millis(5));
    }
}
