//! Endpoints, the public face of an attached id: attaching
//! ([`Window::attach`]), heartbeats, the state of a peer, and opening and
//! resetting channels. The claim itself and liveness are `peer.rs`'s.

use std::sync::{Arc, PoisonError};
use std::time::Instant;

use crate::channel::{Receiver, Sender};
use crate::doorbell::{Doorbell, FutexBell};
use crate::peer::{EndpointInner, Liveness, PeerState, PeerStatus};
use crate::window::Window;
use crate::Error;

impl Window {
    /// Claims endpoint `id` with the default [`Liveness`] thresholds and the
    /// same-kernel doorbell ([`FutexBell`]).
    pub fn attach(&self, id: u16) -> Result<Endpoint, Error> {
        self.attach_with(id, Liveness::default())
    }

    /// Claims endpoint `id`: marks it attached and bumps its generation, so
    /// peers can tell a restart. Attaching an id again (after a crash, or from
    /// another process) takes it over; the older handle gets
    /// [`Error::Superseded`] from then on. Its receivers sleep on, and its
    /// senders ring, the same-kernel doorbell ([`FutexBell`]): right when
    /// every peer runs on this kernel.
    pub fn attach_with(&self, id: u16, liveness: Liveness) -> Result<Endpoint, Error> {
        self.attach_with_doorbell(id, liveness, Some(Arc::new(FutexBell)))
    }

    /// [`Window::attach_with`] with the doorbell given: one that reaches the
    /// peers' kernels (a relay for QEMU guests), or `None` to poll with
    /// back-off and never ring (see [`crate::doorbell`]). Every endpoint of
    /// a window should use a doorbell that reaches its peers: a receiver
    /// whose sender cannot ring it sleeps until its next look at its peer
    /// (up to [`crate::wait::LOOK_EVERY`]).
    pub fn attach_with_doorbell(
        &self,
        id: u16,
        liveness: Liveness,
        doorbell: Option<Arc<dyn Doorbell>>,
    ) -> Result<Endpoint, Error> {
        Ok(Endpoint {
            inner: EndpointInner::claim(self.clone(), id, liveness, doorbell)?,
        })
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

    /// The doorbell this endpoint's receivers sleep on and senders ring.
    pub fn doorbell(&self) -> Option<&Arc<dyn Doorbell>> {
        self.inner.doorbell.as_ref()
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
