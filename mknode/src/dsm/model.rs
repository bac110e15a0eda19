//! An exhaustive model check of the coherence protocol: every interleaving
//! of a few kernels' accesses and of message deliveries (FIFO per link, as
//! the rings and TCP give), held-back invalidations released at any later
//! point, and a kernel lost at any point, explored breadth-first over the
//! real [`Directory`] and [`Cache`] code with a page's content modelled as
//! the number of the write that produced it.
//!
//! In every reachable state it checks:
//! - **single writer**: at most one cache holds a page exclusive, and then
//!   no other holds a copy;
//! - **no stale copy**: every copy a cache holds is the latest write (so no
//!   read after a completed write returns older content, and no update is
//!   lost);
//! - **copies match the protocol state**: a shared copy is present and
//!   write-protected (no write passes uncaught), an exclusive one present,
//!   an invalid one absent;
//! - **no deadlock**: when nothing can happen any more, every access has
//!   completed (or failed, with the kernel it needed gone).
//!
//! It must find a violation when the home grants a write without waiting
//! for the invalidations to be acknowledged (`Config::skip_ack_wait`).

use std::collections::{BTreeMap, HashSet, VecDeque};

use super::protocol::{Access, Cache, Config, Directory, Fault, Local, Memory, Msg, Node, Store};

/// One access of a kernel's program: (page, access).
type Op = (usize, Access);

/// Messages in flight on one link, oldest first: (page, message).
type Channel = VecDeque<(usize, Msg<u64>)>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Prog {
    ops: Vec<Op>,
    pc: usize,
    blocked: bool,
    failed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct World {
    dirs: Vec<Directory>,
    /// [node][page]
    caches: Vec<Vec<Cache>>,
    /// [node][page]: (content, write-protected)
    stores: Vec<Vec<(Option<u64>, bool)>>,
    mem: Vec<u64>,
    chans: BTreeMap<(Node, Node), Channel>,
    progs: Vec<Prog>,
    /// The latest write of each page.
    ghost: Vec<u64>,
    next: u64,
    /// A crashed kernel, and whether the others were told.
    crashed: Option<(Node, bool)>,
    violation: Option<String>,
}

struct Mem<'a>(&'a mut u64);

impl Memory<u64> for Mem<'_> {
    fn read(&mut self) -> u64 {
        *self.0
    }
    fn write(&mut self, d: u64) {
        *self.0 = d;
    }
}

struct Slot<'a>(&'a mut (Option<u64>, bool));

impl Store<u64> for Slot<'_> {
    fn read(&mut self) -> u64 {
        // The protocol reads only what it holds; u64::MAX would show up as
        // a stale copy at once.
        self.0 .0.unwrap_or(u64::MAX)
    }
    fn install(&mut self, d: u64, writable: bool) {
        *self.0 = (Some(d), !writable);
    }
    fn protect(&mut self) {
        self.0 .1 = true;
    }
    fn drop_copy(&mut self) {
        self.0 .0 = None;
    }
}

/// What to explore.
#[derive(Debug, Clone)]
pub(super) struct Setup {
    pub(super) pages: usize,
    /// One program per kernel; kernel 0 is every page's home.
    pub(super) programs: Vec<Vec<Op>>,
    pub(super) config: Config,
    /// This kernel may crash at any point.
    pub(super) crash: Option<Node>,
}

#[derive(Debug)]
pub(super) struct Report {
    pub(super) states: usize,
    pub(super) violation: Option<String>,
}

const HOME: Node = 0;
const LIMIT: usize = 3_000_000;

impl World {
    fn new(s: &Setup) -> World {
        let n = s.programs.len();
        World {
            dirs: vec![Directory::new(s.config); s.pages],
            caches: vec![vec![Cache::new(HOME, s.config); s.pages]; n],
            stores: vec![vec![(None, false); s.pages]; n],
            mem: vec![0; s.pages],
            chans: BTreeMap::new(),
            progs: s
                .programs
                .iter()
                .map(|ops| Prog {
                    ops: ops.clone(),
                    pc: 0,
                    blocked: false,
                    failed: 0,
                })
                .collect(),
            ghost: vec![0; s.pages],
            next: 1,
            crashed: None,
            violation: None,
        }
    }

    fn alive(&self, n: Node) -> bool {
        self.crashed.is_none_or(|(c, _)| c != n)
    }

    fn send(&mut self, from: Node, page: usize, out: Vec<(Node, Msg<u64>)>) {
        for (to, m) in out {
            if self.alive(to) && self.alive(from) {
                self.chans
                    .entry((from, to))
                    .or_default()
                    .push_back((page, m));
            }
        }
    }

    fn violate(&mut self, why: String) {
        self.violation.get_or_insert(why);
    }

    /// Runs node `n`'s next access.
    fn app_step(&mut self, n: Node) {
        let ni = usize::from(n);
        let (page, access) = self.progs[ni].ops[self.progs[ni].pc];
        let mut out = Vec::new();
        match self.caches[ni][page].fault(access, &mut out) {
            Fault::Ready => {
                let (seen, protected) = self.stores[ni][page];
                match access {
                    Access::Read => {
                        if seen != Some(self.ghost[page]) {
                            self.violate(format!(
                                "kernel {n} read {seen:?} from page {page}, the latest write is {}",
                                self.ghost[page]
                            ));
                        }
                    }
                    Access::Write => {
                        // Served here means exclusive: the engine lifts the
                        // faulting mapper's write protection.
                        let _ = protected;
                        self.stores[ni][page] = (Some(self.next), false);
                        self.ghost[page] = self.next;
                        self.next += 1;
                    }
                }
                self.progs[ni].pc += 1;
            }
            Fault::Wait => self.progs[ni].blocked = true,
            Fault::Failed => {
                self.progs[ni].pc += 1;
                self.progs[ni].failed += 1;
            }
        }
        self.send(n, page, out);
    }

    fn deliver(&mut self, from: Node, to: Node) {
        let Some((page, msg)) = self
            .chans
            .get_mut(&(from, to))
            .and_then(VecDeque::pop_front)
        else {
            return;
        };
        self.chans.retain(|_, q| !q.is_empty());
        let mut out = Vec::new();
        let ti = usize::from(to);
        match msg {
            Msg::Request { access } => {
                self.dirs[page].on_request(from, access, &mut Mem(&mut self.mem[page]), &mut out)
            }
            Msg::Ack { data } => {
                if let Err(e) =
                    self.dirs[page].on_ack(from, data, &mut Mem(&mut self.mem[page]), &mut out)
                {
                    // Only a crashed kernel's late ack may be unexpected.
                    if self.crashed.is_none() {
                        self.violate(format!("home: {e}"));
                    }
                }
            }
            other => {
                let r = self.caches[ti][page].on_message(
                    other,
                    0,
                    &mut Slot(&mut self.stores[ti][page]),
                    &mut out,
                );
                match r {
                    Ok(r) => self.release(ti, page, r.reads || r.writes, r.fail),
                    Err(e) => self.violate(format!("kernel {to}: {e}")),
                }
                self.send(to, page, out);
                return;
            }
        }
        self.send(HOME, page, out);
    }

    /// Lets node `ni`'s program go on after an answer about `page`.
    fn release(&mut self, ni: usize, page: usize, go: bool, fail: bool) {
        let p = &mut self.progs[ni];
        if !p.blocked || p.ops.get(p.pc).map(|o| o.0) != Some(page) {
            return;
        }
        if fail {
            p.blocked = false;
            p.pc += 1;
            p.failed += 1;
        } else if go {
            // It retries its access (which may fault again).
            p.blocked = false;
        }
    }

    fn timer(&mut self, ni: usize, page: usize) {
        let mut out = Vec::new();
        self.caches[ni][page].on_timer(u64::MAX, &mut Slot(&mut self.stores[ni][page]), &mut out);
        let n = Node::try_from(ni).unwrap_or(Node::MAX);
        self.send(n, page, out);
    }

    fn crash(&mut self, n: Node) {
        self.crashed = Some((n, false));
        // What it was to send dies with it; what it sent may still arrive
        // until the others are told.
        self.chans.retain(|(_, to), _| *to != n);
    }

    fn report_lost(&mut self, n: Node) {
        self.crashed = Some((n, true));
        self.chans.retain(|(from, _), _| *from != n);
        if n == HOME {
            for ni in 0..self.caches.len() {
                for page in 0..self.caches[ni].len() {
                    let r = self.caches[ni][page].on_home_lost();
                    self.release(ni, page, false, r.fail);
                }
            }
        } else {
            for page in 0..self.dirs.len() {
                let mut out = Vec::new();
                self.dirs[page].on_lost(n, &mut Mem(&mut self.mem[page]), &mut out);
                self.send(HOME, page, out);
            }
        }
    }

    /// Every state this one can step to.
    fn successors(&self, crash: Option<Node>) -> Vec<World> {
        let mut next = Vec::new();
        for n in 0..self.progs.len() {
            let node = Node::try_from(n).unwrap_or(Node::MAX);
            let p = &self.progs[n];
            if self.alive(node) && !p.blocked && p.pc < p.ops.len() {
                let mut w = self.clone();
                w.app_step(node);
                next.push(w);
            }
        }
        for &(from, to) in self.chans.keys() {
            let mut w = self.clone();
            w.deliver(from, to);
            next.push(w);
        }
        for (ni, pages) in self.caches.iter().enumerate() {
            let node = Node::try_from(ni).unwrap_or(Node::MAX);
            for (page, c) in pages.iter().enumerate() {
                if self.alive(node) && c.deferred_until().is_some() {
                    let mut w = self.clone();
                    w.timer(ni, page);
                    next.push(w);
                }
            }
        }
        match (crash, self.crashed) {
            (Some(c), None) => {
                let mut w = self.clone();
                w.crash(c);
                next.push(w);
            }
            (_, Some((c, false))) => {
                let mut w = self.clone();
                w.report_lost(c);
                next.push(w);
            }
            _ => {}
        }
        next
    }

    fn check(&self) -> Option<String> {
        if let Some(v) = &self.violation {
            return Some(v.clone());
        }
        for page in 0..self.ghost.len() {
            let holders: Vec<(usize, Local)> = (0..self.caches.len())
                .filter(|&n| self.alive(Node::try_from(n).unwrap_or(Node::MAX)))
                .map(|n| (n, self.caches[n][page].state()))
                .filter(|(_, s)| *s != Local::Invalid)
                .collect();
            let exclusive = holders
                .iter()
                .filter(|(_, s)| *s == Local::Exclusive)
                .count();
            if exclusive > 1 || (exclusive == 1 && holders.len() > 1) {
                return Some(format!("page {page}: {holders:?} hold it at once"));
            }
            for (n, s) in holders {
                let (v, protected) = self.stores[n][page];
                if v != Some(self.ghost[page]) {
                    return Some(format!(
                        "page {page}: kernel {n} ({s:?}) holds {v:?}, the latest write is {}",
                        self.ghost[page]
                    ));
                }
                // A read-only copy must catch every write; an exclusive
                // one may still be protected in mappers that did not write.
                if s == Local::Shared && !protected {
                    return Some(format!(
                        "page {page}: kernel {n} holds a read-only copy that is writable"
                    ));
                }
            }
        }
        None
    }

    fn stuck(&self) -> Option<String> {
        let waiting: Vec<usize> = (0..self.progs.len())
            .filter(|&n| {
                let p = &self.progs[n];
                self.alive(Node::try_from(n).unwrap_or(Node::MAX)) && p.pc < p.ops.len()
            })
            .collect();
        (!waiting.is_empty()).then(|| format!("deadlock: kernels {waiting:?} wait forever"))
    }
}

/// Explores every reachable state of `setup`.
pub(super) fn explore(setup: &Setup) -> Report {
    let start = World::new(setup);
    let mut seen: HashSet<World> = HashSet::new();
    let mut queue = VecDeque::from([start.clone()]);
    seen.insert(start);
    while let Some(w) = queue.pop_front() {
        if let Some(v) = w.check() {
            return Report {
                states: seen.len(),
                violation: Some(v),
            };
        }
        let next = w.successors(setup.crash);
        if next.is_empty() {
            if let Some(v) = w.stuck() {
                return Report {
                    states: seen.len(),
                    violation: Some(v),
                };
            }
        }
        for mut n in next {
            // Versions only count grants; a page granted back and forth
            // would make the state space infinite.
            n.dirs.iter_mut().for_each(Directory::forget_version);
            n.caches
                .iter_mut()
                .flatten()
                .for_each(Cache::forget_version);
            if seen.len() >= LIMIT {
                break;
            }
            if seen.insert(n.clone()) {
                queue.push_back(n);
            }
        }
    }
    Report {
        states: seen.len(),
        violation: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::{Read as R, Write as W};

    fn run(programs: Vec<Vec<Op>>, pages: usize, config: Config, crash: Option<Node>) -> Report {
        let r = explore(&Setup {
            pages,
            programs,
            config,
            crash,
        });
        assert!(r.states < LIMIT, "the state space was cut at {LIMIT}");
        r
    }

    fn ok(r: Report) -> usize {
        assert_eq!(r.violation, None, "after {} states", r.states);
        eprintln!("{} states, no violation", r.states);
        r.states
    }

    #[test]
    fn two_kernels_writing_and_reading_one_page() {
        let n = ok(run(
            vec![vec![(0, W), (0, R), (0, W)], vec![(0, W), (0, R), (0, W)]],
            1,
            Config::default(),
            None,
        ));
        assert!(n > 300, "{n} states: the model explores too little");
    }

    #[test]
    fn three_kernels_concurrent_writes_and_a_read_racing_invalidation() {
        ok(run(
            vec![
                vec![(0, R), (0, W)],
                vec![(0, W), (0, R)],
                vec![(0, R), (0, W)],
            ],
            1,
            Config::default(),
            None,
        ));
    }

    #[test]
    fn two_pages_crossed() {
        ok(run(
            vec![vec![(0, W), (1, R), (1, W)], vec![(1, W), (0, R), (0, W)]],
            2,
            Config::default(),
            None,
        ));
    }

    #[test]
    fn held_invalidations_released_at_any_time() {
        ok(run(
            vec![vec![(0, W), (0, W)], vec![(0, W), (0, R)], vec![(0, R)]],
            1,
            Config {
                hold: 1,
                ..Config::default()
            },
            None,
        ));
    }

    #[test]
    fn a_kernel_lost_at_any_point() {
        // The lost kernel may hold the page exclusive, be invalidating, or
        // be waiting: the others never read stale content, never wait
        // forever (their access fails if the content died with it).
        ok(run(
            vec![
                vec![(0, R), (0, W)],
                vec![(0, W), (0, R)],
                vec![(0, R), (0, W)],
            ],
            1,
            Config::default(),
            Some(2),
        ));
        ok(run(
            vec![vec![(0, W)], vec![(0, W), (1, W)], vec![(1, R), (0, R)]],
            2,
            Config::default(),
            Some(1),
        ));
    }

    #[test]
    fn the_home_lost_at_any_point() {
        ok(run(
            vec![vec![(0, W)], vec![(0, W), (0, R)], vec![(0, R), (0, W)]],
            1,
            Config::default(),
            Some(0),
        ));
    }

    #[test]
    fn granting_before_the_acks_is_caught() {
        let r = run(
            vec![vec![(0, R)], vec![(0, R), (0, R)], vec![(0, W)]],
            1,
            Config {
                skip_ack_wait: true,
                ..Config::default()
            },
            None,
        );
        let v = r.violation.expect("the mutation must be found");
        assert!(
            v.contains("hold it at once") || v.contains("latest write"),
            "{v}"
        );
    }
}
