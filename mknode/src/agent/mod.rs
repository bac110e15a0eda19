//! The agent: one per kernel (the host's daemon and each guest's
//! `guest-init` alike), so every kernel can ask every other one the same
//! things.
//!
//! This file is the core: the links to peer agents, sending, requests and
//! their answers ([`Agent::request`], [`Agent::call`]), one receive thread
//! per link, and peer liveness. It knows no protocol. Every message kind
//! belongs to one *facet*, a file of its own that owns its state and
//! registers the kinds it handles:
//!
//! - [`exec`]: running commands for a peer (stdin, output, signals, exit);
//! - [`diag`]: what this kernel is (info, power-off), ping and traffic
//!   checks;
//! - [`migration`]: moving processes between kernels, checkpoint and
//!   restore through a peer;
//! - [`dsm`]: distributed shared memory (the protocol's messages, the
//!   region registry, the local socket for processes);
//! - [`threads`]: one thread of a process moving to another kernel while
//!   its siblings stay (its memory kept one by the DSM).
//!
//! The receive thread decodes each frame and hands it to the facet that
//! registered its kind. A facet may give a message back (a `Data` frame
//! that answers one of our requests rather than feeding a command's
//! stdin); messages nobody keeps that carry a request id go to whoever
//! waits on that request. Long work runs on threads of the facet's own, so
//! a link is never blocked by one request. A frame that does not decode is
//! counted and dropped: the peer is untrusted, the agent survives.
//!
//! A receive thread never waits for room in a ring: what a facet answers
//! from it goes out with [`Agent::post`], which queues the frame when the
//! ring is full (each link has a thread that sends what is queued, in
//! order). Two agents whose receive threads both waited to send to each
//! other, over rings the other one no longer drains, would both stop
//! answering: lazy moves in both directions between two kernels did that
//! (each answering the other's page fetches while its own pushes filled
//! the rings), and their copies were killed when fetches timed out.
//!
//! ## Adding a message and a facet
//!
//! 1. Add a row to the table in `wire.rs` (`kind role Name { fields }`,
//!    a new kind number). The codec and the property tests follow.
//! 2. Write `agent/<facet>.rs`: a struct holding the facet's state and
//!    an [`AgentRef`], made by `fn new(agent: AgentRef) -> Self`, and
//!    `impl Facet` for it: [`Facet::kinds`] lists the kinds it serves,
//!    [`Facet::handle`] serves one message, [`Facet::peer_lost`] fails what
//!    waits on a peer that went down.
//! 3. Register it in [`standard_facets`] (one line). Other code reaches it
//!    with `agent.facet::<YourFacet>()`.
//!
//! A kind served by two facets is refused when the agent is built.

pub mod diag;
pub mod dsm;
pub mod exec;
pub mod migration;
pub mod threads;

use std::any::{Any, TypeId};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};

use crate::link::{Link, LinkError};
use crate::wire::{KernelInfo, Kind, Msg};

pub use diag::{kernel_info, BlobReport, Diag, RttSummary};
pub use dsm::Dsm;
pub use exec::Exec;
pub use migration::{Migration, Mode, MoveError, MoveReport, MoveWatch};
pub use threads::Threads;

/// How long a send may wait for room before the peer is given up on.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// A peer whose link has reported it dead (no heartbeat for the ring's
/// `dead_after`, 2 s) this much longer is taken as lost: what waits on it
/// fails. One that detached is lost at once.
const PEER_LOST_AFTER: Duration = Duration::from_secs(3);

/// What the embedding program provides.
pub struct Hooks {
    /// Power the kernel off (guest-init), or ignore (host).
    pub power_off: Box<dyn Fn() + Send + Sync>,
    /// Describe this kernel.
    pub info: Box<dyn Fn() -> KernelInfo + Send + Sync>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hooks")
    }
}

/// One part of the agent's protocol: the message kinds it serves and the
/// state it keeps for them.
pub trait Facet: Send + Sync + std::fmt::Debug + 'static {
    /// The kinds this facet serves: every message of these kinds is handed
    /// to [`Facet::handle`].
    fn kinds(&self) -> &'static [Kind];

    /// Serves one message from `peer`, or gives it back when it is not the
    /// facet's after all (it then goes to whoever waits on its request id).
    /// Runs on the link's receive thread: anything that may block goes to a
    /// thread of its own.
    fn handle(self: Arc<Self>, agent: &Arc<Agent>, peer: u16, msg: Msg) -> Option<Msg>;

    /// `peer`'s kernel went down (`why` says how): fail what waits on it.
    fn peer_lost(&self, _peer: u16, _why: &str) {}
}

/// A facet's handle on the agent it belongs to (weak: the agent owns its
/// facets).
#[derive(Debug, Clone)]
pub struct AgentRef(Weak<Agent>);

impl AgentRef {
    /// The agent, unless it has been dropped.
    pub fn get(&self) -> Result<Arc<Agent>, AgentError> {
        self.0.upgrade().ok_or(AgentError::Gone)
    }
}

/// The facets of an agent under construction; see [`Agent::with_facets`].
#[derive(Debug)]
pub struct Facets {
    agent: Weak<Agent>,
    list: Vec<Arc<dyn Facet>>,
    by_type: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Facets {
    /// Adds the facet `make` builds. Panics when it serves a kind another
    /// facet serves, or when a facet of its type is already there: both are
    /// bugs of the program that builds the agent.
    pub fn add<F: Facet>(&mut self, make: impl FnOnce(AgentRef) -> F) {
        let f = Arc::new(make(AgentRef(self.agent.clone())));
        for k in f.kinds() {
            if let Some(other) = self.list.iter().find(|o| o.kinds().contains(k)) {
                panic!("message kind {} is served by {other:?} and {f:?}", k.name());
            }
        }
        let any: Arc<dyn Any + Send + Sync> = f.clone();
        assert!(
            self.by_type.insert(TypeId::of::<F>(), any).is_none(),
            "facet {f:?} added twice"
        );
        self.list.push(f);
    }
}

/// Every facet a kernel's agent runs.
pub fn standard_facets(f: &mut Facets) {
    f.add(Exec::new);
    f.add(Diag::new);
    f.add(Migration::new);
    f.add(Dsm::new);
    f.add(Threads::new);
}

#[derive(Debug)]
struct LinkEntry {
    link: Arc<dyn Link>,
    /// Tells this link's receive and post threads to stop.
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    posts: Arc<Posts>,
    poster: Option<thread::JoinHandle<()>>,
}

/// Frames [`Agent::post`] could not send at once, in order, for a link's
/// post thread.
#[derive(Debug, Default)]
struct Posts {
    queue: Mutex<PostQueue>,
    more: Condvar,
}

/// A frame, and where a [`Agent::send_bytes`] waiting behind posts learns
/// how its send went.
type Queued = (Vec<u8>, Option<Sender<Result<(), LinkError>>>);

#[derive(Debug, Default)]
struct PostQueue {
    frames: VecDeque<Queued>,
    /// The post thread is sending a frame it took off the queue: a later
    /// post must queue behind it, not overtake it.
    sending: bool,
    /// The post thread has ended (the link was removed): nothing queues.
    closed: bool,
}

impl PostQueue {
    /// Nothing queued or being sent: a new frame may go out directly.
    fn idle(&self) -> bool {
        self.frames.is_empty() && !self.sending
    }
}

impl Posts {
    /// Queues `item` for the post thread.
    fn push(&self, mut q: MutexGuard<'_, PostQueue>, item: Queued) {
        q.frames.push_back(item);
        drop(q);
        self.more.notify_one();
    }

    /// The post thread: sends queued frames in order, waiting for room as
    /// long as a send does ([`SEND_TIMEOUT`]); a posted frame whose send
    /// fails is dropped with a warning (its peer is down or gone), a sent
    /// one's sender learns the error.
    fn run(&self, agent: &Agent, peer: u16, link: &dyn Link, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) && !agent.stop.load(Ordering::Relaxed) {
            let (frame, waiter) = {
                let mut q = lock(&self.queue);
                q.sending = false;
                match q.frames.pop_front() {
                    Some(f) => {
                        q.sending = true;
                        f
                    }
                    None => {
                        let _ = self.more.wait_timeout(q, Duration::from_millis(100));
                        continue;
                    }
                }
            };
            let sent = link.send(&frame, SEND_TIMEOUT);
            match waiter {
                Some(w) => {
                    let _ = w.send(sent);
                }
                None => {
                    if let Err(e) = sent {
                        log::warn!("a message to {} was dropped: {e}", agent.peer(peer));
                    }
                }
            }
        }
        // Waiting senders learn the link is gone (their channels drop).
        let mut q = lock(&self.queue);
        q.closed = true;
        q.frames.clear();
    }
}

/// One agent, with its links and facets.
#[derive(Debug)]
pub struct Agent {
    id: u16,
    /// Instance names by endpoint id, for messages (`host` for 0).
    names: RwLock<HashMap<u16, String>>,
    links: RwLock<HashMap<u16, LinkEntry>>,
    next_req: AtomicU32,
    /// Answers to our requests, by (peer, req).
    pending: Mutex<HashMap<(u16, u32), Sender<Msg>>>,
    bad_frames: AtomicU64,
    /// Peers taken as lost ([`Agent::fail_peer`]) and why, until they are
    /// heard from again.
    lost: Mutex<HashMap<u16, String>>,
    stop: AtomicBool,
    hooks: Hooks,
    facets: Vec<Arc<dyn Facet>>,
    by_type: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
    /// Facet index by kind number (`None`: answers go to `pending`).
    dispatch: Vec<Option<usize>>,
}

/// A peer as messages name it: its instance name when this agent was told
/// it ([`Agent::name_peers`]), `endpoint <id>` otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: u16,
    pub name: Option<String>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => f.write_str(n),
            None => write!(f, "endpoint {}", self.id),
        }
    }
}

/// A request could not be completed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no link to {0}")]
    NoLink(Peer),
    #[error("link to {peer}")]
    Link {
        peer: Peer,
        #[source]
        source: LinkError,
    },
    #[error("{peer} did not answer within {:.1} s", .timeout.as_secs_f64())]
    NoAnswer { peer: Peer, timeout: Duration },
    #[error("{peer} refused: {message}")]
    Failed { peer: Peer, message: String },
    #[error("{peer} answered with an unexpected {got}")]
    Unexpected { peer: Peer, got: String },
    #[error("the agent has shut down")]
    Gone,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    /// An agent with the [`standard_facets`].
    pub fn new(id: u16, hooks: Hooks) -> Arc<Agent> {
        Agent::with_facets(id, hooks, standard_facets)
    }

    /// An agent with the facets `add` registers.
    pub fn with_facets(id: u16, hooks: Hooks, add: impl FnOnce(&mut Facets)) -> Arc<Agent> {
        Arc::new_cyclic(|weak| {
            let mut f = Facets {
                agent: weak.clone(),
                list: Vec::new(),
                by_type: HashMap::new(),
            };
            add(&mut f);
            let top = f
                .list
                .iter()
                .flat_map(|x| x.kinds())
                .map(|&k| k as usize)
                .max()
                .unwrap_or(0);
            let mut dispatch = vec![None; top + 1];
            for (i, x) in f.list.iter().enumerate() {
                for &k in x.kinds() {
                    dispatch[k as usize] = Some(i);
                }
            }
            Agent {
                id,
                names: RwLock::new(HashMap::new()),
                links: RwLock::new(HashMap::new()),
                next_req: AtomicU32::new(1),
                pending: Mutex::new(HashMap::new()),
                bad_frames: AtomicU64::new(0),
                lost: Mutex::new(HashMap::new()),
                stop: AtomicBool::new(false),
                hooks,
                facets: f.list,
                by_type: f.by_type,
                dispatch,
            }
        })
    }

    /// The facet of type `F`. Panics when the agent was built without it
    /// (a bug of the program that built it).
    pub fn facet<F: Facet>(&self) -> Arc<F> {
        self.by_type
            .get(&TypeId::of::<F>())
            .and_then(|f| Arc::clone(f).downcast::<F>().ok())
            .unwrap_or_else(|| panic!("this agent has no {} facet", std::any::type_name::<F>()))
    }

    /// This agent's endpoint id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// What the embedding program provides.
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// Tells the agent the instance names of endpoints (this one's too), so
    /// its messages say `beta` rather than `endpoint 2`.
    pub fn name_peers(&self, names: impl IntoIterator<Item = (u16, String)>) {
        self.names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(names);
    }

    /// `id` as messages name it.
    pub fn peer(&self, id: u16) -> Peer {
        Peer {
            id,
            name: self
                .names
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned(),
        }
    }

    /// Frames from peers that did not decode, so far.
    pub fn bad_frames(&self) -> u64 {
        self.bad_frames.load(Ordering::Relaxed)
    }

    /// Adds a link to `peer` and starts serving it (replacing, and
    /// stopping, any link it had to that peer).
    pub fn add_link(self: &Arc<Self>, peer: u16, link: Arc<dyn Link>) {
        self.remove_link(peer);
        lock(&self.lost).remove(&peer);
        let stop = Arc::new(AtomicBool::new(false));
        let me = Arc::clone(self);
        let (l, st) = (Arc::clone(&link), Arc::clone(&stop));
        let thread = thread::Builder::new()
            .name(format!("mknode-rx-{peer}"))
            .spawn(move || me.serve(peer, l, st))
            .expect("spawning a thread");
        let posts = Arc::new(Posts::default());
        let me = Arc::clone(self);
        let (l, st, p) = (Arc::clone(&link), Arc::clone(&stop), Arc::clone(&posts));
        let poster = thread::Builder::new()
            .name(format!("mknode-post-{peer}"))
            .spawn(move || p.run(&me, peer, &*l, &st))
            .expect("spawning a thread");
        self.links
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                peer,
                LinkEntry {
                    link,
                    stop,
                    thread: Some(thread),
                    posts,
                    poster: Some(poster),
                },
            );
    }

    /// Stops serving `peer` and lets go of the link (its receive thread has
    /// exited when this returns, so the transport's halves are free again).
    /// Requests waiting on that peer fail.
    pub fn remove_link(&self, peer: u16) {
        let entry = self
            .links
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
        if let Some(mut e) = entry {
            e.stop.store(true, Ordering::SeqCst);
            e.posts.more.notify_all();
            for t in [e.thread.take(), e.poster.take()].into_iter().flatten() {
                if t.thread().id() != thread::current().id() {
                    let _ = t.join();
                }
            }
            self.fail_peer(peer, "the link was removed");
        }
    }

    /// Stops the receive threads (they notice within 100 ms).
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Why `peer` is taken as lost, if it is: it failed and has not been
    /// heard from since, or there is no link to it.
    pub fn lost(&self, peer: u16) -> Option<String> {
        if let Some(why) = lock(&self.lost).get(&peer) {
            return Some(why.clone());
        }
        match self.link(peer) {
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// The endpoints this agent has links to.
    pub fn peers(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .links
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// The link to `peer`.
    pub fn link(&self, peer: u16) -> Result<Arc<dyn Link>, AgentError> {
        self.links
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .map(|e| Arc::clone(&e.link))
            .ok_or_else(|| AgentError::NoLink(self.peer(peer)))
    }

    /// Sends one message to `peer`.
    pub fn send(&self, peer: u16, msg: &Msg) -> Result<(), AgentError> {
        self.send_bytes(peer, &msg.encode())
    }

    /// Sends one encoded message to `peer` (for callers that reuse a
    /// buffer).
    pub fn send_bytes(&self, peer: u16, frame: &[u8]) -> Result<(), AgentError> {
        let (link, posts) = self.link_and_posts(peer)?;
        let q = self.post_queue(peer, &posts)?;
        if q.idle() {
            drop(q);
            return link
                .send(frame, SEND_TIMEOUT)
                .map_err(self.link_error(peer));
        }
        // Behind what was posted before: a message sent after a post (an
        // exec's output after its `Started`) must not overtake it.
        let (tx, rx) = crossbeam_channel::bounded(1);
        posts.push(q, (frame.to_vec(), Some(tx)));
        match rx.recv() {
            Ok(sent) => sent.map_err(self.link_error(peer)),
            Err(_) => Err(AgentError::NoLink(self.peer(peer))),
        }
    }

    fn link_and_posts(&self, peer: u16) -> Result<(Arc<dyn Link>, Arc<Posts>), AgentError> {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        let e = links
            .get(&peer)
            .ok_or_else(|| AgentError::NoLink(self.peer(peer)))?;
        Ok((Arc::clone(&e.link), Arc::clone(&e.posts)))
    }

    /// `posts`' queue, locked, unless its post thread has ended (the link
    /// to `peer` went).
    fn post_queue<'a>(
        &self,
        peer: u16,
        posts: &'a Posts,
    ) -> Result<MutexGuard<'a, PostQueue>, AgentError> {
        let q = lock(&posts.queue);
        if q.closed {
            return Err(AgentError::NoLink(self.peer(peer)));
        }
        Ok(q)
    }

    fn link_error(&self, peer: u16) -> impl FnOnce(LinkError) -> AgentError + '_ {
        move |source| AgentError::Link {
            peer: self.peer(peer),
            source,
        }
    }

    /// Sends one message to `peer` without waiting: at once if its ring has
    /// room and nothing posted earlier is still queued, else queued for
    /// the link's post thread (sent in order, dropped with a warning if the
    /// send fails). What a receive thread sends goes this way; see the
    /// module doc.
    pub fn post(&self, peer: u16, msg: &Msg) -> Result<(), AgentError> {
        let (link, posts) = self.link_and_posts(peer)?;
        let frame = msg.encode();
        let q = self.post_queue(peer, &posts)?;
        if q.idle() && link.try_send(&frame).map_err(self.link_error(peer))? {
            return Ok(());
        }
        posts.push(q, (frame, None));
        Ok(())
    }

    /// Sends one message to `peer` if that needs no wait ([`Link::try_send`]):
    /// `Ok(false)` when it should be sent later with [`Agent::send`].
    pub fn try_send(&self, peer: u16, msg: &Msg) -> Result<bool, AgentError> {
        let link = self.link(peer)?;
        link.try_send(&msg.encode()).map_err(self.link_error(peer))
    }

    /// Numbers this agent's requests from `first` on. An agent that takes
    /// an endpoint over from an earlier process (a restarted daemon)
    /// starts where that one's numbers are not, so answers to requests it
    /// never made, still on their way from peers, are not taken for its own
    /// (and a peer's table of running requests never sees a number twice).
    pub fn number_requests_from(&self, first: u32) {
        self.next_req.store(first, Ordering::Relaxed);
    }

    /// Sends a request built around a fresh request id; answers arrive on
    /// the returned channel until a final one ([`Msg::is_final`]).
    pub fn request(
        &self,
        peer: u16,
        build: impl FnOnce(u32) -> Msg,
    ) -> Result<(u32, Receiver<Msg>), AgentError> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded();
        lock(&self.pending).insert((peer, req), tx);
        if let Err(e) = self.send(peer, &build(req)) {
            lock(&self.pending).remove(&(peer, req));
            return Err(e);
        }
        Ok((req, rx))
    }

    /// Sends a request and waits for its final answer (progress answers on
    /// the way are skipped); a `Failed` answer is an error.
    pub fn call(
        &self,
        peer: u16,
        timeout: Duration,
        build: impl FnOnce(u32) -> Msg,
    ) -> Result<Msg, AgentError> {
        let (req, rx) = self.request(peer, build)?;
        let deadline = Instant::now() + timeout;
        let r = loop {
            match rx.recv_deadline(deadline) {
                Ok(m) if !m.is_final() => continue,
                other => break other,
            }
        };
        self.forget(peer, req);
        match r {
            Ok(Msg::Failed { message, .. }) => Err(AgentError::Failed {
                peer: self.peer(peer),
                message,
            }),
            Ok(m) => Ok(m),
            Err(_) => Err(AgentError::NoAnswer {
                peer: self.peer(peer),
                timeout,
            }),
        }
    }

    /// [`Agent::call`], and the answer picked apart by `pick`; an answer it
    /// does not take (`None`) is [`AgentError::Unexpected`].
    pub fn call_for<T>(
        &self,
        peer: u16,
        timeout: Duration,
        build: impl FnOnce(u32) -> Msg,
        pick: impl FnOnce(Msg) -> Option<T>,
    ) -> Result<T, AgentError> {
        let m = self.call(peer, timeout, build)?;
        let kind = m.kind();
        pick(m).ok_or_else(|| AgentError::Unexpected {
            peer: self.peer(peer),
            got: kind.name().to_string(),
        })
    }

    /// Serves request `req` of `peer` on a thread of its own: `work`'s
    /// answer goes back, or a `Failed` that says why (for facets whose work
    /// may block the link).
    pub fn answer_later<E: std::error::Error>(
        self: &Arc<Self>,
        peer: u16,
        req: u32,
        work: impl FnOnce(&Arc<Agent>) -> Result<Msg, E> + Send + 'static,
    ) {
        let me = Arc::clone(self);
        thread::spawn(move || {
            let answer = work(&me).unwrap_or_else(|e| Msg::Failed {
                req,
                message: crate::error_text(&e),
            });
            let _ = me.send(peer, &answer);
        });
    }

    /// Forgets a request (its answers are dropped from now on).
    pub fn forget(&self, peer: u16, req: u32) {
        lock(&self.pending).remove(&(peer, req));
    }

    fn serve(self: Arc<Self>, peer: u16, link: Arc<dyn Link>, stop: Arc<AtomicBool>) {
        let mut buf = Vec::new();
        let mut warned = false;
        // Since when the peer has been down, and whether its requests were
        // failed for it (once per time it goes down).
        let mut down: Option<Instant> = None;
        let mut failed = false;
        while !self.stop.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            let got = link.recv(&mut buf, Duration::from_millis(100));
            // A message, or a wait that ended with the peer there (its
            // heartbeat moving): a peer taken as lost is back (a kernel
            // booted again into its endpoint), though it sent nothing yet.
            if got.is_ok() {
                if failed {
                    lock(&self.lost).remove(&peer);
                }
                down = None;
                failed = false;
            }
            match got {
                Ok(false) => continue,
                Err(LinkError::PeerDown {
                    detached, quiet, ..
                }) => {
                    // Silent past the ring's dead threshold, then another
                    // PEER_LOST_AFTER: a guest starved of CPU for a while
                    // under TCG is not lost.
                    let since = *down.get_or_insert_with(Instant::now);
                    if !failed && (detached || since.elapsed() >= PEER_LOST_AFTER) {
                        let who = self.peer(peer);
                        let why = match quiet {
                            Some(q) if !detached => format!(
                                "{who} stopped answering (no heartbeat for {:.1} s)",
                                q.as_secs_f64()
                            ),
                            _ => format!("{who} stopped (it left the shared window)"),
                        };
                        log::warn!("{why}");
                        self.fail_peer(peer, &why);
                        failed = true;
                    }
                }
                Ok(true) => match Msg::decode(&buf) {
                    Ok(m) => self.dispatch(peer, m),
                    Err(e) => {
                        self.bad_frames.fetch_add(1, Ordering::Relaxed);
                        if !warned {
                            log::warn!(
                                "bad frame from {}: {e} (further ones are counted, not logged)",
                                self.peer(peer)
                            );
                            warned = true;
                        }
                    }
                },
                Err(e) => {
                    log::warn!("link to {} closed: {e}", self.peer(peer));
                    // Its post thread goes too.
                    stop.store(true, Ordering::SeqCst);
                    self.fail_peer(peer, &e.to_string());
                    let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
                    // Only our own entry: a newer link may have replaced it.
                    if links
                        .get(&peer)
                        .is_some_and(|e| Arc::ptr_eq(&e.stop, &stop))
                    {
                        links.remove(&peer);
                    }
                    return;
                }
            }
        }
    }

    /// Every request waiting on `peer` gets a `Failed` answer, and every
    /// facet fails what waits on it (the peer is lost, or stopped).
    pub fn fail_peer(&self, peer: u16, why: &str) {
        lock(&self.lost).insert(peer, why.to_string());
        let mut p = lock(&self.pending);
        let keys: Vec<_> = p.keys().filter(|k| k.0 == peer).copied().collect();
        for k in keys {
            if let Some(tx) = p.remove(&k) {
                let _ = tx.send(Msg::Failed {
                    req: k.1,
                    message: format!("link lost: {why}"),
                });
            }
        }
        drop(p);
        for f in &self.facets {
            f.peer_lost(peer, why);
        }
    }

    /// Hands `m` to the facet that serves its kind; what no facet keeps
    /// goes to the request it answers.
    fn dispatch(self: &Arc<Self>, peer: u16, m: Msg) {
        let facet = self
            .dispatch
            .get(m.kind() as usize)
            .copied()
            .flatten()
            .map(|i| Arc::clone(&self.facets[i]));
        let m = match facet {
            Some(f) => match f.handle(self, peer, m) {
                Some(back) => back,
                None => return,
            },
            None => m,
        };
        // `Hello` and answers nobody waits for (any more) end here.
        let Some(req) = m.req() else { return };
        let last = m.is_final();
        let mut p = lock(&self.pending);
        if let Some(tx) = p.get(&(peer, req)) {
            let _ = tx.send(m);
            if last {
                p.remove(&(peer, req));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::link::MemLink;
    use crate::wire::{ExecRequest, ExitStatus, Stream};

    pub(crate) fn hooks() -> Hooks {
        Hooks {
            power_off: Box::new(|| {}),
            info: Box::new(kernel_info),
        }
    }

    pub(crate) fn pair() -> (Arc<Agent>, Arc<Agent>) {
        let a = Agent::new(0, hooks());
        let b = Agent::new(1, hooks());
        let (la, lb) = MemLink::pair(256, 64 * 1024);
        a.add_link(1, Arc::new(la));
        b.add_link(0, Arc::new(lb));
        (a, b)
    }

    #[test]
    fn errors_name_peers_by_instance_name_once_told() {
        let (a, _b) = pair();
        a.name_peers([(0, "host".to_string()), (7, "gamma".to_string())]);
        let ping = Msg::Ping { seq: 1, t_ns: 0 };
        let e = a.send(7, &ping).unwrap_err();
        assert_eq!(e.to_string(), "no link to gamma");
        let e = a.send(8, &ping).unwrap_err();
        assert_eq!(e.to_string(), "no link to endpoint 8");
    }

    /// Both agents send flat out to each other over links of 4 frames
    /// while their receive threads answer every ping: were an answer sent
    /// with a wait for room, each receive thread would wait on a link the
    /// other no longer drains, and both would stall for `SEND_TIMEOUT`.
    #[test]
    fn receive_threads_never_wait_for_room() {
        let a = Agent::new(0, hooks());
        let b = Agent::new(1, hooks());
        let (la, lb) = MemLink::pair(4, 1024);
        a.add_link(1, Arc::new(la));
        b.add_link(0, Arc::new(lb));
        let t0 = Instant::now();
        let flood = |from: &Arc<Agent>, to: u16| {
            let from = Arc::clone(from);
            thread::spawn(move || {
                for seq in 0..5000 {
                    from.send(to, &Msg::Ping { seq, t_ns: 0 }).unwrap();
                }
            })
        };
        let (fa, fb) = (flood(&a, 1), flood(&b, 0));
        fa.join().unwrap();
        fb.join().unwrap();
        // And the links still answer.
        let rtt = a.facet::<Diag>().ping(1, 1).unwrap();
        assert_eq!(rtt.len(), 1);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the floods took {:?}",
            t0.elapsed()
        );
    }

    /// A message sent after a post that had to queue goes out after it.
    #[test]
    fn a_send_does_not_overtake_what_was_posted() {
        let a = Agent::new(0, hooks());
        let (la, lb) = MemLink::pair(1, 1024);
        a.add_link(1, Arc::new(la));
        // (MemLink has no try_send: every post queues.)
        for seq in 1..=3 {
            a.post(1, &Msg::Ping { seq, t_ns: 0 }).unwrap();
        }
        let me = Arc::clone(&a);
        let sender = thread::spawn(move || me.send(1, &Msg::Ping { seq: 4, t_ns: 0 }));
        let mut buf = Vec::new();
        let mut seqs = Vec::new();
        while seqs.len() < 4 {
            thread::sleep(Duration::from_millis(20));
            assert!(lb.recv(&mut buf, Duration::from_secs(5)).unwrap());
            match Msg::decode(&buf).unwrap() {
                Msg::Ping { seq, .. } => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        sender.join().unwrap().unwrap();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    #[test]
    fn lost_peer_fails_waiting_requests() {
        let a = Agent::new(0, hooks());
        let (la, lb) = MemLink::pair(4, 1024);
        a.add_link(1, Arc::new(la));
        let (_req, rx) = a.request(1, |req| Msg::InfoRequest { req }).unwrap();
        drop(lb);
        let m = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            matches!(m, Msg::Failed { ref message, .. } if message.contains("link lost")),
            "{m:?}"
        );
    }

    /// A kernel booted again into a lost peer's endpoint is reachable at
    /// once, before it has sent anything: a move to it was refused as to a
    /// kernel that "left the shared window" until it happened to speak.
    #[test]
    fn a_lost_peer_that_attaches_again_is_no_longer_lost() {
        use crate::link::RingLink;
        let w =
            shmem_ring::Window::anonymous(shmem_ring::Layout::with_capacity(2, 64 << 10).unwrap())
                .unwrap();
        let e0 = w.attach(0).unwrap();
        let a = Agent::new(0, hooks());
        a.add_link(1, Arc::new(RingLink::open(&e0, 1).unwrap()));
        let until = |what: &str, f: &dyn Fn() -> bool| {
            let t = std::time::Instant::now();
            while !f() {
                assert!(t.elapsed() < Duration::from_secs(10), "{what}");
                thread::sleep(Duration::from_millis(10));
            }
        };
        let e1 = w.attach(1).unwrap();
        let first = RingLink::open(&e1, 0).unwrap();
        assert_eq!(a.lost(1), None);
        drop(first);
        drop(e1);
        until("never taken as lost", &|| a.lost(1).is_some());
        assert!(a.lost(1).unwrap().contains("left the shared window"));
        let e1 = w.attach(1).unwrap();
        let _again = RingLink::open(&e1, 0).unwrap();
        until("still lost after it attached again", &|| {
            a.lost(1).is_none()
        });
        a.shutdown();
    }

    /// A facet of a test's own: it answers `BlobCheck` (a kind no standard
    /// facet of this agent serves, since it is built without `Diag`).
    #[derive(Debug)]
    struct Echo {
        lost: Mutex<Vec<u16>>,
    }

    impl Facet for Echo {
        fn kinds(&self) -> &'static [Kind] {
            &[Kind::BlobCheck]
        }
        fn handle(self: Arc<Self>, agent: &Arc<Agent>, peer: u16, msg: Msg) -> Option<Msg> {
            if let Msg::BlobCheck { req, from } = msg {
                let _ = agent.post(
                    peer,
                    &Msg::BlobReport {
                        req,
                        from,
                        good: 7,
                        bad: 0,
                        next_seq: 7,
                    },
                );
            }
            None
        }
        fn peer_lost(&self, peer: u16, _why: &str) {
            lock(&self.lost).push(peer);
        }
    }

    #[test]
    fn a_facet_serves_the_kinds_it_registered_and_hears_of_lost_peers() {
        let a = Agent::new(0, hooks());
        let b = Agent::with_facets(1, hooks(), |f| {
            f.add(|_| Echo {
                lost: Mutex::new(Vec::new()),
            })
        });
        let (la, lb) = MemLink::pair(16, 4096);
        a.add_link(1, Arc::new(la));
        b.add_link(0, Arc::new(lb));
        let got = a.call_for(
            1,
            Duration::from_secs(5),
            |req| Msg::BlobCheck { req, from: 3 },
            |m| match m {
                Msg::BlobReport { good, from, .. } => Some((good, from)),
                _ => None,
            },
        );
        assert_eq!(got.unwrap(), (7, 3));
        // A kind nobody on b serves (exec lives in a facet b lacks) gets
        // no answer rather than a wrong one.
        let r = a.call(1, Duration::from_millis(300), |req| Msg::InfoRequest {
            req,
        });
        assert!(matches!(r, Err(AgentError::NoAnswer { .. })), "{r:?}");
        b.fail_peer(0, "test");
        assert_eq!(*lock(&b.facet::<Echo>().lost), vec![0]);
    }

    #[test]
    #[should_panic(expected = "served by")]
    fn two_facets_serving_one_kind_are_refused() {
        #[derive(Debug)]
        struct Again;
        impl Facet for Again {
            fn kinds(&self) -> &'static [Kind] {
                &[Kind::Exec]
            }
            fn handle(self: Arc<Self>, _: &Arc<Agent>, _: u16, m: Msg) -> Option<Msg> {
                Some(m)
            }
        }
        let _ = Agent::with_facets(0, hooks(), |f| {
            standard_facets(f);
            f.add(|_| Again);
        });
    }

    #[test]
    fn an_unexpected_answer_is_named_by_its_kind() {
        let (a, _b) = pair();
        let r = a.call_for(
            1,
            Duration::from_secs(5),
            |req| Msg::InfoRequest { req },
            |m| match m {
                Msg::Done { .. } => Some(()),
                _ => None,
            },
        );
        assert_eq!(
            r.unwrap_err().to_string(),
            "endpoint 1 answered with an unexpected Info"
        );
    }

    /// Runs a command on `peer`, returning (stdout, stderr, status).
    pub(crate) fn run(
        a: &Agent,
        peer: u16,
        argv: &[&str],
        stdin: Option<&[u8]>,
    ) -> (Vec<u8>, Vec<u8>, ExitStatus) {
        let exec = ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: None,
            stdin: stdin.is_some(),
        };
        let (req, rx) = a.request(peer, |req| Msg::Exec { req, exec }).unwrap();
        if let Some(input) = stdin {
            for chunk in input.chunks(1000) {
                a.send(
                    peer,
                    &Msg::Data {
                        req,
                        stream: Stream::Stdin,
                        bytes: chunk.to_vec(),
                    },
                )
                .unwrap();
            }
            a.send(
                peer,
                &Msg::Eof {
                    req,
                    stream: Stream::Stdin,
                },
            )
            .unwrap();
        }
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match rx.recv_timeout(Duration::from_secs(20)).expect("answer") {
                Msg::Started { .. } | Msg::Eof { .. } => {}
                Msg::Data {
                    stream: Stream::Stdout,
                    bytes,
                    ..
                } => out.extend(bytes),
                Msg::Data {
                    stream: Stream::Stderr,
                    bytes,
                    ..
                } => err.extend(bytes),
                Msg::Exited { status, .. } => return (out, err, status),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
