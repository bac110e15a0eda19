//! The coherence protocol for one page, as two pure state machines: the
//! home's [`Directory`] and every kernel's [`Cache`] (the home kernel has a
//! cache too, like any other). They perform no system call: data moves
//! through the [`Memory`] and [`Store`] traits and messages are pushed to an
//! outbox, so the engine drives them with real pages and links and the model
//! checker (`model.rs`) drives the very same code with numbers. The protocol
//! and the argument why it is correct are in `README.md` beside this file.

use std::collections::{BTreeSet, VecDeque};

/// A kernel, by its endpoint id.
pub type Node = u16;

/// What a fault needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Access {
    Read,
    Write,
}

/// One page's messages (the wire adds the region and the page number).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Msg<D> {
    /// Cache → home: a fault here needs `access`.
    Request { access: Access },
    /// Home → cache: granted; `data` unless the cache already holds the
    /// current content. `version` counts the exclusive grants of the page.
    Grant {
        access: Access,
        version: u64,
        data: Option<D>,
    },
    /// Home → cache: give the page up (`downgrade`: keep a read-only copy).
    Invalidate { downgrade: bool },
    /// Cache → home: done; the content when it held the page exclusive.
    Ack { data: Option<D> },
    /// Home → cache: the request cannot be served, ever (the page was lost
    /// with the kernel that held it).
    Fail,
}

/// Messages to send: (to, message).
pub type Outbox<D> = Vec<(Node, Msg<D>)>;

/// The home's copy of the page's content: valid while no cache holds the
/// page exclusive.
pub trait Memory<D> {
    fn read(&mut self) -> D;
    fn write(&mut self, data: D);
}

/// A kernel's local copy of the page, as its processes map it.
pub trait Store<D> {
    /// The content (the page is readable when this is called).
    fn read(&mut self) -> D;
    /// Puts `data` in place; read-only (every mapper write-protected first)
    /// unless `writable`.
    fn install(&mut self, data: D, writable: bool);
    /// Write-protects the page in every mapper (the copy stays).
    fn protect(&mut self);
    /// Drops the copy: the next access faults.
    fn drop_copy(&mut self);
}

/// A message that makes no sense in the state it arrives in: counted and
/// dropped, the protocol state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unexpected {
    #[error("an acknowledgement from kernel {0}, which was not asked")]
    Ack(Node),
    #[error("a grant with no request outstanding")]
    Grant,
    #[error("an exclusive grant without the content for a page not held")]
    GrantWithoutData,
    #[error("a {0} from the home, which only the home sends")]
    ToHome(&'static str),
    #[error("a {0} for the home, which only caches send")]
    ToCache(&'static str),
}

/// Knobs of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Config {
    /// A cache keeps a granted page at least this long before it answers
    /// an invalidation (in the clock's unit): the faulting thread gets to
    /// use it, so two writers cannot take a page from each other forever.
    pub hold: u64,
    /// Test-only mutation: grant a write before every other copy has been
    /// invalidated. The model checker must find it wrong.
    #[doc(hidden)]
    pub skip_ack_wait: bool,
}

// ------------------------------------------------------------------ home

/// Where the page is, as the home knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DirState {
    /// The home's memory is current; these caches hold read-only copies.
    Shared(BTreeSet<Node>),
    /// This cache holds the only copy, writable; the memory is stale.
    Exclusive(Node),
    /// The exclusive copy went down with its kernel: every request fails.
    Lost,
}

/// A request the home is serving.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Txn {
    /// Invalidating read-only copies before `to` may write (`None`: its
    /// kernel went down meanwhile; the invalidations still complete).
    Invalidating {
        to: Option<Node>,
        waiting: BTreeSet<Node>,
    },
    /// Taking the page back from its owner for `to` (`None` as above).
    Recalling {
        to: Option<Node>,
        access: Access,
        from: Node,
    },
}

/// The home's record of one page: serialises every request for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Directory {
    state: DirState,
    version: u64,
    busy: Option<Txn>,
    queue: VecDeque<(Node, Access)>,
    config: Config,
}

impl Directory {
    /// A page nobody holds yet; the memory is its content (zeros).
    pub fn new(config: Config) -> Self {
        Directory {
            state: DirState::Shared(BTreeSet::new()),
            version: 0,
            busy: None,
            queue: VecDeque::new(),
            config,
        }
    }

    pub fn state(&self) -> &DirState {
        &self.state
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Forgets the version (the model checker's states would otherwise
    /// differ by it forever: versions only count).
    #[cfg(test)]
    pub(super) fn forget_version(&mut self) {
        self.version = 0;
    }

    /// Requests waiting behind the one being served.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// True while a request is being served.
    pub fn busy(&self) -> bool {
        self.busy.is_some()
    }

    /// A cache's request; served now or after those before it (FIFO).
    pub fn on_request<D>(
        &mut self,
        from: Node,
        access: Access,
        mem: &mut dyn Memory<D>,
        out: &mut Outbox<D>,
    ) {
        self.queue.push_back((from, access));
        self.pump(mem, out);
    }

    /// A cache's acknowledgement of an invalidation.
    pub fn on_ack<D>(
        &mut self,
        from: Node,
        data: Option<D>,
        mem: &mut dyn Memory<D>,
        out: &mut Outbox<D>,
    ) -> Result<(), Unexpected> {
        match self.busy.take() {
            Some(Txn::Invalidating { to, mut waiting }) if waiting.contains(&from) => {
                waiting.remove(&from);
                if let DirState::Shared(s) = &mut self.state {
                    s.remove(&from);
                }
                if waiting.is_empty() {
                    if let Some(to) = to {
                        self.grant_write(to, mem, out);
                    }
                    self.pump(mem, out);
                } else {
                    self.busy = Some(Txn::Invalidating { to, waiting });
                }
                Ok(())
            }
            Some(Txn::Recalling {
                to,
                access,
                from: owner,
            }) if owner == from => {
                let Some(data) = data else {
                    // An owner must hand the content back; without it the
                    // page is as good as lost.
                    self.state = DirState::Lost;
                    if let Some(to) = to {
                        out.push((to, Msg::Fail));
                    }
                    self.pump(mem, out);
                    return Ok(());
                };
                mem.write(data);
                // A downgraded owner keeps a read-only copy.
                self.state = DirState::Shared(match access {
                    Access::Read => BTreeSet::from([owner]),
                    Access::Write => BTreeSet::new(),
                });
                match (to, access) {
                    (Some(to), Access::Read) => self.grant_read(to, mem, out),
                    (Some(to), Access::Write) => self.grant_write(to, mem, out),
                    (None, _) => {}
                }
                self.pump(mem, out);
                Ok(())
            }
            other => {
                self.busy = other;
                Err(Unexpected::Ack(from))
            }
        }
    }

    /// `node`'s kernel is gone: its copies with it. A page it held
    /// exclusive is lost; its requests are dropped.
    pub fn on_lost<D>(&mut self, node: Node, mem: &mut dyn Memory<D>, out: &mut Outbox<D>) {
        self.queue.retain(|(n, _)| *n != node);
        match &mut self.state {
            DirState::Shared(s) => {
                s.remove(&node);
            }
            DirState::Exclusive(o) if *o == node && self.busy.is_none() => {
                self.state = DirState::Lost;
            }
            _ => {}
        }
        match self.busy.take() {
            Some(Txn::Invalidating { to, mut waiting }) => {
                waiting.remove(&node);
                let to = to.filter(|&t| t != node);
                if waiting.is_empty() {
                    if let Some(to) = to {
                        self.grant_write(to, mem, out);
                    }
                } else {
                    self.busy = Some(Txn::Invalidating { to, waiting });
                }
            }
            Some(Txn::Recalling { to, from, .. }) if from == node => {
                self.state = DirState::Lost;
                if let Some(to) = to.filter(|&t| t != node) {
                    out.push((to, Msg::Fail));
                }
            }
            Some(Txn::Recalling { to, access, from }) => {
                // The owner's answer still comes; nobody gets the page then.
                let to = to.filter(|&t| t != node);
                self.busy = Some(Txn::Recalling { to, access, from });
            }
            None => {}
        }
        self.pump(mem, out);
    }

    /// Serves queued requests until one must wait for answers.
    fn pump<D>(&mut self, mem: &mut dyn Memory<D>, out: &mut Outbox<D>) {
        while self.busy.is_none() {
            let Some((from, access)) = self.queue.pop_front() else {
                return;
            };
            match (&self.state, access) {
                (DirState::Lost, _) => out.push((from, Msg::Fail)),
                (DirState::Shared(_), Access::Read) => self.grant_read(from, mem, out),
                (DirState::Shared(s), Access::Write) => {
                    let waiting: BTreeSet<Node> =
                        s.iter().copied().filter(|&n| n != from).collect();
                    if waiting.is_empty() || self.config.skip_ack_wait {
                        for &n in &waiting {
                            out.push((n, Msg::Invalidate { downgrade: false }));
                        }
                        self.grant_write(from, mem, out);
                    } else {
                        for &n in &waiting {
                            out.push((n, Msg::Invalidate { downgrade: false }));
                        }
                        self.busy = Some(Txn::Invalidating {
                            to: Some(from),
                            waiting,
                        });
                    }
                }
                (DirState::Exclusive(o), _) if *o == from => {
                    // It holds the page already (a request that crossed its
                    // own grant): confirm, nothing moves.
                    out.push((
                        from,
                        Msg::Grant {
                            access: Access::Write,
                            version: self.version,
                            data: None,
                        },
                    ));
                }
                (DirState::Exclusive(o), access) => {
                    let owner = *o;
                    out.push((
                        owner,
                        Msg::Invalidate {
                            downgrade: access == Access::Read,
                        },
                    ));
                    self.busy = Some(Txn::Recalling {
                        to: Some(from),
                        access,
                        from: owner,
                    });
                }
            }
        }
    }

    fn grant_read<D>(&mut self, to: Node, mem: &mut dyn Memory<D>, out: &mut Outbox<D>) {
        if let DirState::Shared(s) = &mut self.state {
            s.insert(to);
        }
        out.push((
            to,
            Msg::Grant {
                access: Access::Read,
                version: self.version,
                data: Some(mem.read()),
            },
        ));
    }

    /// Grants `to` the only copy; the content goes along unless it holds a
    /// current read-only copy.
    fn grant_write<D>(&mut self, to: Node, mem: &mut dyn Memory<D>, out: &mut Outbox<D>) {
        let had = matches!(&self.state, DirState::Shared(s) if s.contains(&to));
        self.version += 1;
        self.state = DirState::Exclusive(to);
        out.push((
            to,
            Msg::Grant {
                access: Access::Write,
                version: self.version,
                data: (!had).then(|| mem.read()),
            },
        ));
    }
}

// ------------------------------------------------------------------ cache

/// A kernel's copy of the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Local {
    Invalid,
    Shared,
    Exclusive,
}

impl Local {
    /// Whether a fault needing `access` can be served with this copy.
    pub fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (Local::Exclusive, _) | (Local::Shared, Access::Read)
        )
    }
}

/// What a fault comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The copy here serves it (it raced with an install): resolve now.
    Ready,
    /// Wait for the home's answer (a request went out, or one is already
    /// on its way).
    Wait,
    /// It can never be served: send the process SIGBUS.
    Failed,
}

/// Which waiting faults an event lets go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Release {
    pub reads: bool,
    pub writes: bool,
    /// Every waiting fault must fail (SIGBUS).
    pub fail: bool,
}

/// One kernel's view of one page.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cache {
    home: Node,
    state: Local,
    version: u64,
    /// The request on its way to the home, if any.
    pending: Option<Access>,
    /// The strongest access a waiting fault needs.
    waiting: Option<Access>,
    /// When the copy was granted (for the hold time).
    granted_at: u64,
    /// An invalidation held back until the hold time is over.
    deferred: Option<bool>,
    /// The home is gone, or failed the page: faults that need it fail.
    failed: bool,
    config: Config,
}

impl Cache {
    pub fn new(home: Node, config: Config) -> Self {
        Cache {
            home,
            state: Local::Invalid,
            version: 0,
            pending: None,
            waiting: None,
            granted_at: 0,
            deferred: None,
            failed: false,
            config,
        }
    }

    pub fn state(&self) -> Local {
        self.state
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    #[cfg(test)]
    pub(super) fn forget_version(&mut self) {
        self.version = 0;
    }

    pub fn pending(&self) -> Option<Access> {
        self.pending
    }

    /// When a held-back invalidation is due, if one is.
    pub fn deferred_until(&self) -> Option<u64> {
        self.deferred
            .map(|_| self.granted_at.saturating_add(self.config.hold))
    }

    /// A local process faulted on the page needing `access`.
    pub fn fault<D>(&mut self, access: Access, out: &mut Outbox<D>) -> Fault {
        if self.state.allows(access) {
            return Fault::Ready;
        }
        if self.failed {
            return Fault::Failed;
        }
        self.waiting = self.waiting.max(Some(access));
        if self.pending.is_none() {
            self.pending = Some(access);
            out.push((self.home, Msg::Request { access }));
        }
        Fault::Wait
    }

    /// A message from the home.
    pub fn on_message<D>(
        &mut self,
        msg: Msg<D>,
        now: u64,
        store: &mut dyn Store<D>,
        out: &mut Outbox<D>,
    ) -> Result<Release, Unexpected> {
        match msg {
            Msg::Grant {
                access,
                version,
                data,
            } => self.on_grant(access, version, data, now, store, out),
            Msg::Invalidate { downgrade } => {
                if now < self.granted_at.saturating_add(self.config.hold)
                    && self.state != Local::Invalid
                {
                    self.deferred = Some(downgrade);
                } else {
                    self.invalidate(downgrade, store, out);
                }
                Ok(Release::default())
            }
            Msg::Fail => {
                self.failed = true;
                self.pending = None;
                let fail = self.waiting.take().is_some();
                Ok(Release {
                    fail,
                    ..Release::default()
                })
            }
            Msg::Request { .. } => Err(Unexpected::ToCache("request")),
            Msg::Ack { .. } => Err(Unexpected::ToCache("acknowledgement")),
        }
    }

    /// The clock moved on: a held-back invalidation may be due.
    pub fn on_timer<D>(&mut self, now: u64, store: &mut dyn Store<D>, out: &mut Outbox<D>) {
        if let Some(until) = self.deferred_until() {
            if now >= until {
                let downgrade = self.deferred.take().unwrap_or(false);
                self.invalidate(downgrade, store, out);
            }
        }
    }

    /// The home's kernel is gone: what waits fails, and so will every fault
    /// this copy cannot serve.
    pub fn on_home_lost(&mut self) -> Release {
        self.failed = true;
        self.pending = None;
        self.deferred = None;
        Release {
            fail: self.waiting.take().is_some(),
            ..Release::default()
        }
    }

    fn on_grant<D>(
        &mut self,
        access: Access,
        version: u64,
        data: Option<D>,
        now: u64,
        store: &mut dyn Store<D>,
        out: &mut Outbox<D>,
    ) -> Result<Release, Unexpected> {
        if self.pending.is_none() {
            return Err(Unexpected::Grant);
        }
        match (access, data) {
            (Access::Read, Some(d)) => {
                store.install(d, false);
                self.state = Local::Shared;
            }
            (Access::Read, None) => {
                if self.state == Local::Invalid {
                    return Err(Unexpected::GrantWithoutData);
                }
            }
            (Access::Write, Some(d)) => {
                store.install(d, true);
                self.state = Local::Exclusive;
            }
            (Access::Write, None) => {
                if self.state == Local::Invalid {
                    return Err(Unexpected::GrantWithoutData);
                }
                self.state = Local::Exclusive;
            }
        }
        self.version = version;
        self.granted_at = now;
        self.pending = None;
        let release = Release {
            reads: self.state.allows(Access::Read),
            writes: self.state.allows(Access::Write),
            fail: false,
        };
        self.waiting = match self.waiting {
            Some(Access::Write) if !release.writes => {
                // Readers go on; the writers need the page exclusive.
                self.pending = Some(Access::Write);
                out.push((
                    self.home,
                    Msg::Request {
                        access: Access::Write,
                    },
                ));
                Some(Access::Write)
            }
            _ => None,
        };
        Ok(release)
    }

    fn invalidate<D>(&mut self, downgrade: bool, store: &mut dyn Store<D>, out: &mut Outbox<D>) {
        let data = match self.state {
            Local::Exclusive => {
                // No write may land after the content is read.
                store.protect();
                Some(store.read())
            }
            _ => None,
        };
        if downgrade && self.state == Local::Exclusive {
            self.state = Local::Shared;
        } else if self.state != Local::Invalid {
            store.drop_copy();
            self.state = Local::Invalid;
        }
        out.push((self.home, Msg::Ack { data }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page as a number, for tests: memory and stores hold one value.
    #[derive(Debug, Default)]
    struct Val {
        v: Option<u64>,
        protected: bool,
    }

    impl Memory<u64> for u64 {
        fn read(&mut self) -> u64 {
            *self
        }
        fn write(&mut self, d: u64) {
            *self = d;
        }
    }

    impl Store<u64> for Val {
        fn read(&mut self) -> u64 {
            self.v.expect("read of a page not held")
        }
        fn install(&mut self, d: u64, writable: bool) {
            self.v = Some(d);
            self.protected = !writable;
        }
        fn protect(&mut self) {
            self.protected = true;
        }
        fn drop_copy(&mut self) {
            self.v = None;
        }
    }

    #[test]
    fn a_read_then_a_write_elsewhere_invalidates_the_reader_first() {
        let cfg = Config::default();
        let mut dir = Directory::new(cfg);
        let mut mem = 7u64;
        let (mut c1, mut c2) = (Cache::new(0, cfg), Cache::new(0, cfg));
        let (mut s1, mut s2) = (Val::default(), Val::default());
        let mut out = Outbox::new();
        assert_eq!(c1.fault::<u64>(Access::Read, &mut out), Fault::Wait);
        assert_eq!(
            out,
            vec![(
                0,
                Msg::Request {
                    access: Access::Read
                }
            )]
        );
        out.clear();
        dir.on_request(1, Access::Read, &mut mem, &mut out);
        let grant = out.remove(0).1;
        let r = c1.on_message(grant, 0, &mut s1, &mut out).unwrap();
        assert!(r.reads && !r.writes);
        assert_eq!((s1.v, s1.protected), (Some(7), true));

        // Kernel 2 wants to write: kernel 1 is invalidated, and the grant
        // waits for its acknowledgement.
        c2.fault::<u64>(Access::Write, &mut out);
        out.clear();
        dir.on_request(2, Access::Write, &mut mem, &mut out);
        assert_eq!(out, vec![(1, Msg::Invalidate { downgrade: false })]);
        assert!(dir.busy());
        out.clear();
        c1.on_message(Msg::Invalidate { downgrade: false }, 1, &mut s1, &mut out)
            .unwrap();
        assert_eq!(s1.v, None);
        assert_eq!(out, vec![(0, Msg::Ack { data: None })]);
        out.clear();
        dir.on_ack(1, None, &mut mem, &mut out).unwrap();
        assert_eq!(
            out,
            vec![(
                2,
                Msg::Grant {
                    access: Access::Write,
                    version: 1,
                    data: Some(7)
                }
            )]
        );
        assert_eq!(dir.state(), &DirState::Exclusive(2));
        let grant = out.remove(0).1;
        let r = c2.on_message(grant, 2, &mut s2, &mut out).unwrap();
        assert!(r.writes && !s2.protected);
    }

    #[test]
    fn an_owner_hands_its_content_back_on_a_read_elsewhere() {
        let cfg = Config::default();
        let mut dir = Directory::new(cfg);
        let mut mem = 0u64;
        let mut out = Outbox::new();
        dir.on_request(1, Access::Write, &mut mem, &mut out);
        out.clear();
        dir.on_request(2, Access::Read, &mut mem, &mut out);
        assert_eq!(out, vec![(1, Msg::Invalidate { downgrade: true })]);
        out.clear();
        // A third request queues behind.
        dir.on_request(3, Access::Write, &mut mem, &mut out);
        assert!(out.is_empty());
        assert_eq!(dir.queued(), 1);
        dir.on_ack(1, Some(42), &mut mem, &mut out).unwrap();
        assert_eq!(mem, 42);
        // 2 reads 42; then 3's write invalidates both 1 and 2.
        assert_eq!(
            out[0],
            (
                2,
                Msg::Grant {
                    access: Access::Read,
                    version: 1,
                    data: Some(42)
                }
            )
        );
        assert_eq!(
            out[1..],
            [
                (1, Msg::Invalidate { downgrade: false }),
                (2, Msg::Invalidate { downgrade: false })
            ]
        );
    }

    #[test]
    fn a_stray_ack_is_refused_and_changes_nothing() {
        let mut dir = Directory::new(Config::default());
        let before = dir.clone();
        let mut out = Outbox::<u64>::new();
        assert_eq!(
            dir.on_ack(5, Some(1), &mut 0u64, &mut out),
            Err(Unexpected::Ack(5))
        );
        assert_eq!(dir, before);
        let mut c = Cache::new(0, Config::default());
        let mut s = Val::default();
        assert_eq!(
            c.on_message(
                Msg::Grant {
                    access: Access::Write,
                    version: 9,
                    data: None
                },
                0,
                &mut s,
                &mut out
            ),
            Err(Unexpected::Grant)
        );
    }

    #[test]
    fn an_invalidation_waits_out_the_hold_time() {
        let cfg = Config {
            hold: 100,
            ..Config::default()
        };
        let mut c = Cache::new(0, cfg);
        let mut s = Val::default();
        let mut out = Outbox::new();
        c.fault::<u64>(Access::Write, &mut out);
        out.clear();
        c.on_message(
            Msg::Grant {
                access: Access::Write,
                version: 1,
                data: Some(3),
            },
            1000,
            &mut s,
            &mut out,
        )
        .unwrap();
        c.on_message(Msg::Invalidate { downgrade: false }, 1050, &mut s, &mut out)
            .unwrap();
        assert!(out.is_empty(), "answered within the hold time");
        assert_eq!(c.deferred_until(), Some(1100));
        c.on_timer(1099, &mut s, &mut out);
        assert!(out.is_empty());
        c.on_timer(1100, &mut s, &mut out);
        assert_eq!(out, vec![(0, Msg::Ack { data: Some(3) })]);
        assert_eq!(c.state(), Local::Invalid);
    }

    #[test]
    fn a_lost_owner_loses_the_page_and_fails_who_waits() {
        let cfg = Config::default();
        let mut dir = Directory::new(cfg);
        let mut mem = 0u64;
        let mut out = Outbox::new();
        dir.on_request(1, Access::Write, &mut mem, &mut out);
        dir.on_request(2, Access::Read, &mut mem, &mut out);
        out.clear();
        dir.on_lost(1, &mut mem, &mut out);
        assert_eq!(out, vec![(2, Msg::Fail)]);
        assert_eq!(dir.state(), &DirState::Lost);
        out.clear();
        dir.on_request(3, Access::Read, &mut mem, &mut out);
        assert_eq!(out, vec![(3, Msg::Fail)]);
        // A lost sharer costs nothing.
        let mut dir = Directory::new(cfg);
        dir.on_request(1, Access::Read, &mut mem, &mut out);
        dir.on_request(2, Access::Write, &mut mem, &mut out);
        out.clear();
        dir.on_lost(1, &mut mem, &mut out);
        assert!(matches!(
            out[..],
            [(
                2,
                Msg::Grant {
                    access: Access::Write,
                    ..
                }
            )]
        ));
    }
}
