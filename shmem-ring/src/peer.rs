//! The endpoint directory as one attached endpoint sees it: its claim on an
//! id (generation, heartbeat, detach on drop) and what it knows of its
//! peers.
//!
//! There is no shared clock between kernels, so liveness is judged by each
//! observer with its own monotonic clock: a peer is alive while its heartbeat
//! counter (or its generation) keeps changing, silent once it has not changed
//! for `silent_after`, dead past `dead_after`. Only the dead view may clean up
//! (`Endpoint::reset_channel`).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::doorbell::Doorbell;
use crate::layout;
use crate::window::Window;
use crate::Error;

pub(crate) const STATE_FREE: u64 = 0;
pub(crate) const STATE_ATTACHED: u64 = 1;
pub(crate) const STATE_DETACHED: u64 = 2;
const GENERATION_MASK: u64 = (1 << 56) - 1;

/// Thresholds that turn "no heartbeat for a while" into [`PeerState::Silent`]
/// and then [`PeerState::Dead`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// No heartbeat for this long: [`PeerState::Silent`].
    pub silent_after: Duration,
    /// No heartbeat for this long: [`PeerState::Dead`], and blocking calls
    /// on a channel to that peer fail with [`Error::PeerDead`].
    pub dead_after: Duration,
}

impl Default for Liveness {
    /// 200 ms and 2 s: an agent beating every 50 ms is never reported silent
    /// by scheduling noise, and a crash is noticed within seconds.
    fn default() -> Self {
        Liveness {
            silent_after: Duration::from_millis(200),
            dead_after: Duration::from_secs(2),
        }
    }
}

/// What an observer knows about a peer endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Never attached since the window was formatted (not started yet).
    Absent,
    /// Attached and its heartbeat moved within `silent_after`.
    Alive,
    /// Attached, but no heartbeat for `silent_after` (not yet `dead_after`).
    Silent,
    /// Attached, but no heartbeat for `dead_after`: crashed or hung.
    Dead,
    /// Detached cleanly (or its directory entry holds an unknown state).
    Gone,
}

/// A peer's state with the numbers it was judged from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer's endpoint id.
    pub id: u16,
    /// The verdict.
    pub state: PeerState,
    /// The peer's generation: changes every time it attaches.
    pub generation: u64,
    /// The peer's heartbeat counter.
    pub heartbeat: u64,
    /// How long this observer has seen neither change.
    pub quiet: Duration,
}

/// One observer's memory of a peer's directory entry (and of the progress of
/// the ring it shares with the peer: a peer that moves data is alive).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PeerWatch {
    seen: Option<(u64, u64, u64)>,
    changed_at: Instant,
}

impl PeerWatch {
    pub(crate) fn new() -> PeerWatch {
        PeerWatch {
            seen: None,
            changed_at: Instant::now(),
        }
    }

    /// Judges the peer from its entry words, read now, and `progress` (a ring
    /// position that moves only when the peer works the ring). The first
    /// observation counts as a change: a peer gets `dead_after` from when we
    /// start looking.
    pub(crate) fn observe(
        &mut self,
        id: u16,
        (state_word, heartbeat): (u64, u64),
        progress: u64,
        now: Instant,
        liveness: &Liveness,
    ) -> PeerStatus {
        let seen = (state_word, heartbeat, progress);
        if self.seen != Some(seen) {
            self.seen = Some(seen);
            self.changed_at = now;
        }
        let quiet = now.saturating_duration_since(self.changed_at);
        let generation = state_word >> 8;
        let state = match state_word & 0xff {
            STATE_FREE if generation == 0 => PeerState::Absent,
            STATE_ATTACHED if quiet >= liveness.dead_after => PeerState::Dead,
            STATE_ATTACHED if quiet >= liveness.silent_after => PeerState::Silent,
            STATE_ATTACHED => PeerState::Alive,
            _ => PeerState::Gone,
        };
        PeerStatus {
            id,
            state,
            generation,
            heartbeat,
            quiet,
        }
    }
}

#[derive(Debug)]
pub(crate) struct EndpointInner {
    pub(crate) window: Window,
    pub(crate) id: u16,
    pub(crate) generation: u64,
    pub(crate) liveness: Liveness,
    entry: u64,
    pub(crate) watches: Mutex<Vec<PeerWatch>>,
    /// How this endpoint's receivers sleep and its senders wake peers
    /// (`None`: poll with back-off, never ring).
    pub(crate) doorbell: Option<Arc<dyn Doorbell>>,
}

impl EndpointInner {
    /// Claims endpoint `id` of `window`: marks it attached and bumps its
    /// generation (see [`Window::attach_with`]).
    pub(crate) fn claim(
        window: Window,
        id: u16,
        liveness: Liveness,
        doorbell: Option<Arc<dyn Doorbell>>,
    ) -> Result<Arc<Self>, Error> {
        let layout = *window.layout();
        let entry = layout.entry_offset(id).ok_or(Error::NoSuchEndpoint {
            id,
            endpoints: layout.endpoints(),
        })?;
        let found = window.read_word(entry + layout::E_ID).unwrap_or(u64::MAX);
        if found != u64::from(id) {
            return Err(Error::BadDirectory { id, found });
        }
        let state = window
            .inner()
            .region
            .word(usize::try_from(entry + layout::E_STATE).unwrap_or(usize::MAX))
            .ok_or(Error::BadDirectory { id, found })?;
        let mut current = state.load(Ordering::Acquire);
        let generation = loop {
            let next = ((current >> 8) + 1) & GENERATION_MASK;
            let next = next.max(1);
            match state.compare_exchange_weak(
                current,
                next << 8 | STATE_ATTACHED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break next,
                Err(now) => current = now,
            }
        };
        let inner = Arc::new(EndpointInner {
            window,
            id,
            generation,
            liveness,
            entry,
            watches: Mutex::new(vec![PeerWatch::new(); usize::from(layout.endpoints())]),
            doorbell,
        });
        inner.beat()?;
        Ok(inner)
    }

    /// Reads endpoint `id`'s state word and heartbeat.
    pub(crate) fn entry_words(&self, id: u16) -> (u64, u64) {
        let layout = self.window.layout();
        let Some(e) = layout.entry_offset(id) else {
            return (STATE_DETACHED, 0);
        };
        (
            self.window
                .read_word(e + layout::E_STATE)
                .unwrap_or(STATE_DETACHED),
            self.window.read_word(e + layout::E_HEARTBEAT).unwrap_or(0),
        )
    }

    /// Fails if another attach of this id has taken over.
    pub(crate) fn check_current(&self) -> Result<(), Error> {
        let current = self
            .window
            .read_word(self.entry + layout::E_STATE)
            .unwrap_or(0)
            >> 8;
        if current != self.generation {
            return Err(Error::Superseded {
                id: self.id,
                ours: self.generation,
                current,
            });
        }
        Ok(())
    }

    pub(crate) fn beat(&self) -> Result<(), Error> {
        self.check_current()?;
        let off = usize::try_from(self.entry + layout::E_HEARTBEAT).unwrap_or(usize::MAX);
        if let Some(w) = self.window.inner().region.word(off) {
            w.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Drop for EndpointInner {
    fn drop(&mut self) {
        let off = usize::try_from(self.entry + layout::E_STATE).unwrap_or(usize::MAX);
        if let Some(w) = self.window.inner().region.word(off) {
            // Only if no newer incarnation took the id over meanwhile.
            let _ = w.compare_exchange(
                self.generation << 8 | STATE_ATTACHED,
                self.generation << 8 | STATE_DETACHED,
                Ordering::Release,
                Ordering::Relaxed,
            );
        }
    }
}
