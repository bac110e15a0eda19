//! Endpoints: claiming an id in the directory, heartbeats, telling a live peer
//! from a silent, dead or gone one, and opening channels.
//!
//! There is no shared clock between kernels, so liveness is judged by each
//! observer with its own monotonic clock: a peer is alive while its heartbeat
//! counter (or its generation) keeps changing, silent once it has not changed
//! for `silent_after`, dead past `dead_after`. Only the dead view may clean up
//! ([`Endpoint::reset_channel`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::channel::{Receiver, Sender};
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
    watches: Mutex<Vec<PeerWatch>>,
}

impl EndpointInner {
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

    fn beat(&self) -> Result<(), Error> {
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

/// An attached endpoint: one id of the window's directory, held by this
/// process. Detaches when it and every [`Sender`]/[`Receiver`] made from it
/// are dropped. `Send + Sync`: share it by reference or through [`Heartbeat`].
#[derive(Debug)]
pub struct Endpoint {
    inner: Arc<EndpointInner>,
}

/// A cheap, cloneable handle that bumps one endpoint's heartbeat, for a
/// thread that only keeps the endpoint alive.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    inner: Arc<EndpointInner>,
}

impl Heartbeat {
    /// Bumps the heartbeat counter; fails if the id was attached again since.
    pub fn beat(&self) -> Result<(), Error> {
        self.inner.beat()
    }
}

impl Endpoint {
    pub(crate) fn attach(window: Window, id: u16, liveness: Liveness) -> Result<Endpoint, Error> {
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
        });
        inner.beat()?;
        Ok(Endpoint { inner })
    }

    /// This endpoint's id.
    pub fn id(&self) -> u16 {
        self.inner.id
    }

    /// The generation this attach got (changes on every attach of the id).
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// The window this endpoint is attached to.
    pub fn window(&self) -> &Window {
        &self.inner.window
    }

    /// The liveness thresholds this endpoint judges peers by.
    pub fn liveness(&self) -> Liveness {
        self.inner.liveness
    }

    /// Bumps this endpoint's heartbeat counter (one atomic add). Call it more
    /// often than the peers' `silent_after`; fails with [`Error::Superseded`]
    /// once the id was attached again elsewhere.
    pub fn heartbeat(&self) -> Result<(), Error> {
        self.inner.beat()
    }

    /// A handle for a thread that beats for this endpoint.
    pub fn heartbeat_handle(&self) -> Heartbeat {
        Heartbeat {
            inner: Arc::clone(&self.inner),
        }
    }

    /// The state of endpoint `peer`, as this endpoint has watched it (the
    /// first call starts the watch: `Dead` needs `dead_after` of watching).
    pub fn peer(&self, peer: u16) -> Result<PeerStatus, Error> {
        let endpoints = self.inner.window.layout().endpoints();
        if peer >= endpoints {
            return Err(Error::NoSuchEndpoint {
                id: peer,
                endpoints,
            });
        }
        let words = self.inner.entry_words(peer);
        let mut watches = self
            .inner
            .watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let watch = &mut watches[usize::from(peer)];
        Ok(watch.observe(peer, words, 0, Instant::now(), &self.inner.liveness))
    }

    /// Opens the duplex channel to `peer`: the sender of ring `self -> peer`
    /// and the receiver of ring `peer -> self`. Each ring has exactly one
    /// sender and one receiver: asking twice fails with
    /// [`Error::AlreadyClaimed`] until the first halves are dropped. After a
    /// restart the halves resume at the positions left in the window.
    pub fn channel(&self, peer: u16) -> Result<(Sender, Receiver), Error> {
        self.inner.check_current()?;
        let endpoints = self.inner.window.layout().endpoints();
        if peer >= endpoints {
            return Err(Error::NoSuchEndpoint {
                id: peer,
                endpoints,
            });
        }
        if peer == self.inner.id {
            return Err(Error::SelfChannel { id: peer });
        }
        let tx = Sender::open(Arc::clone(&self.inner), peer)?;
        let rx = Receiver::open(Arc::clone(&self.inner), peer)?;
        Ok((tx, rx))
    }

    /// Puts both rings of the channel to `peer` back to empty and clears their
    /// broken flags. Refused unless the peer is [`PeerState::Absent`],
    /// [`PeerState::Gone`] or [`PeerState::Dead`] as seen by this endpoint,
    /// and unless no half of the channel is held in this process.
    pub fn reset_channel(&self, peer: u16) -> Result<PeerStatus, Error> {
        self.inner.check_current()?;
        if peer == self.inner.id {
            return Err(Error::SelfChannel { id: peer });
        }
        let status = self.peer(peer)?;
        if matches!(status.state, PeerState::Alive | PeerState::Silent) {
            return Err(Error::PeerAlive {
                peer,
                state: status.state,
            });
        }
        crate::channel::reset(&self.inner, peer)?;
        Ok(status)
    }
}
