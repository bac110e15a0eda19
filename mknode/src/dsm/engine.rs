//! The DSM engine of one kernel: its regions, the processes that map them,
//! their page faults, and the protocol messages. All DSM state is one
//! `Worker` behind one lock, taken by whichever thread has work for it:
//!
//! - the agent's receive threads hand it protocol messages
//!   ([`Engine::deliver`]) and handle them on the spot: a page request is
//!   answered, a grant installed, by the thread that received it, with no
//!   hand-off to another thread (each hand-off costs a wake-up, ~20 µs
//!   here, and a DSM fault would take four);
//! - the engine's own thread watches one userfaultfd per mapping through an
//!   epoll set, runs the protocol's timers, and serves what is posted to it
//!   as [`Event`]s: a peer lost (the agent core), commands from local
//!   processes (the local socket).
//!
//! No thread ever waits for a link while it holds the lock, or a receive
//! thread for a link at all: messages to other kernels go to an outbox, in
//! the order the protocol made them, and leave at once when the link has
//! room ([`Outlet::try_send`]); what cannot is sent by the engine's thread,
//! which may wait. Two receive threads blocked on each other's full rings
//! could otherwise stop both kernels.
//!
//! How protocol states map onto memory here (see `README.md` beside this
//! file for the protocol):
//! - each region has a memfd on each kernel — the kernel's copy, mapped
//!   `MAP_SHARED` by every local process, so they share one copy; the home
//!   keeps a second memfd, the home's memory;
//! - every mapping is registered with userfaultfd in missing and
//!   write-protect modes: a page absent from the memfd faults *missing*, a
//!   write to a write-protected page faults *wp*;
//! - a read-only copy is installed by first write-protecting the page in
//!   every mapper (on a page not mapped yet this leaves a marker, so a
//!   mapper that never touched it cannot write it unseen) and then writing
//!   the content into the memfd; the faulting threads are woken;
//! - a writable copy: the content is written into the memfd, and each
//!   writer's write protection is lifted for that page;
//! - dropping a copy punches a hole in the memfd: every mapper's page goes,
//!   and the next access faults missing;
//! - handing the content back: write-protect every mapper, then read it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::protocol::{
    self, Access, Cache, Config, Directory, Fault, Memory, Node, Release, Store,
};
use super::stats::{RegionStats, Stats};
use super::{DsmError, RegionInfo, PAGE};
use crate::uffd::{self, Uffd};
use crate::wire::Msg;

/// Knobs of a kernel's DSM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsmConfig {
    /// A granted page is kept at least this long before it is given up
    /// (the fairness rule; see the protocol's README).
    pub hold: Duration,
    /// How long the engine keeps polling (yielding the CPU between polls)
    /// after activity before it sleeps. Busy-spinning was measured worse
    /// here: with more threads than CPUs it takes the CPU from the very
    /// thread it waits for (remote read fault 146 µs without spinning,
    /// 269 µs spinning 50 µs, 2 ms spinning 1 ms; yielding 100 µs: 139 µs).
    pub spin: Duration,
    /// A message for a region this kernel is still creating waits this
    /// long before it is dropped.
    pub early_wait: Duration,
}

impl Default for DsmConfig {
    fn default() -> Self {
        DsmConfig {
            hold: Duration::from_micros(250),
            spin: Duration::from_micros(100),
            early_wait: Duration::from_secs(5),
        }
    }
}

/// Where protocol messages to other kernels go (the agent's links).
pub trait Outlet: Send + Sync {
    /// Sends `m` to `to` if that needs no wait; `false`: send it later with
    /// [`Outlet::send`], from a thread that may wait. A message that cannot
    /// be sent at all (the link is gone) is logged and counts as sent: the
    /// peer's loss reaches the engine as [`Event::PeerLost`].
    fn try_send(&self, to: Node, m: &Msg) -> bool;
    /// Sends `m` to `to`, waiting for room; failures as for `try_send`.
    fn send(&self, to: Node, m: &Msg);
}

/// A local process's mapping of a region, registered with userfaultfd.
#[derive(Debug)]
struct Mapper {
    region: u32,
    uffd: Uffd,
    base: u64,
    len: u64,
    /// The process (for SIGBUS).
    pid: i32,
    /// The local connection it came through (its mappings go with it).
    conn: u64,
}

/// A fault waiting for the home's answer.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    mapper: u64,
    addr: u64,
    access: Access,
    tid: u32,
    since: Instant,
}

/// One region on this kernel.
#[derive(Debug)]
struct Region {
    info: RegionInfo,
    npages: u64,
    /// This kernel's copy.
    copy: File,
    /// The home's memory (home only).
    memory: Option<File>,
    /// Per page (home only).
    dirs: Vec<Directory>,
    caches: Vec<Cache>,
    waiters: HashMap<u64, Vec<Waiter>>,
    mappers: Vec<u64>,
    stats: RegionStats,
    /// Read-ahead: the page a sequential reader faults on next, and how
    /// many pages past it are being fetched ahead.
    next_read: u64,
    ahead: u64,
}

/// Commands from local processes (through the local socket's threads).
#[derive(Debug)]
pub enum Command {
    /// Make `info` known here (creating its copy; the home's memory and
    /// directory too when this kernel is its home); answers a descriptor of
    /// the copy for the process to map.
    Open {
        info: RegionInfo,
        reply: Sender<Result<OwnedFd, DsmError>>,
    },
    /// Make `info` known here with this kernel as its home, from memory a
    /// process already has: `copy` is the memfd that process maps (empty:
    /// its pages fault in), `memory` holds the content. A process's private
    /// memory becomes a region this way when one of its threads leaves for
    /// another kernel (`crate::migrate` splits it).
    Adopt {
        info: RegionInfo,
        copy: File,
        memory: File,
        reply: Sender<Result<(), DsmError>>,
    },
    /// A process mapped the region at `[addr, addr + len)` and hands over
    /// its userfaultfd.
    Attach {
        region: u32,
        addr: u64,
        len: u64,
        uffd: OwnedFd,
        pid: i32,
        conn: u64,
        reply: Sender<Result<(), DsmError>>,
    },
    /// The process unmapped it.
    Detach {
        addr: u64,
        conn: u64,
        reply: Sender<Result<(), DsmError>>,
    },
    /// The connection closed (the process exited): its mappings go.
    Closed { conn: u64 },
    /// What this kernel knows of its regions.
    Stats { reply: Sender<Stats> },
}

/// What the engine's thread is told.
#[derive(Debug)]
pub enum Event {
    PeerLost { node: Node, why: String },
    Command(Command),
    Stop,
}

/// Wakes the engine's thread when it sleeps.
#[derive(Debug)]
struct Waker {
    efd: EventFd,
    sleeping: AtomicBool,
}

impl Waker {
    /// Wakes the engine's thread if it sleeps (after the caller made the
    /// work it should see visible).
    fn wake(&self) {
        // SYNC POINT: pairs with the fence in `Shared::sleep`: either the
        // thread sees the work before it sleeps, or we see it asleep.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            let _ = self.efd.write(1);
        }
    }
}

/// Messages to other kernels not sent yet, per kernel in the order the
/// protocol made them (links are FIFO, and the protocol counts on it).
#[derive(Debug, Default)]
struct Outbox {
    queues: HashMap<Node, VecDeque<Msg>>,
    /// Kernels a thread is sending to right now (one at a time, to keep
    /// the order); it sends their whole queue.
    sending: HashSet<Node>,
}

impl Outbox {
    /// Sends what the outbox holds, each kernel's queue by one thread at a
    /// time. `wait`: wait for room (the engine's thread only); else send
    /// only what goes at once. True when nothing is left that this call
    /// should have sent (queues another thread is sending are its own).
    fn flush(outbox: &Mutex<Outbox>, outlet: &dyn Outlet, wait: bool) -> bool {
        let mut ob = lock(outbox);
        let mut stuck: Vec<Node> = Vec::new();
        loop {
            let next = ob
                .queues
                .iter()
                .find(|(to, q)| !q.is_empty() && !ob.sending.contains(*to) && !stuck.contains(*to))
                .map(|(to, _)| *to);
            let Some(to) = next else {
                return stuck.is_empty();
            };
            ob.sending.insert(to);
            while let Some(m) = ob.queues.get_mut(&to).and_then(VecDeque::pop_front) {
                drop(ob);
                let sent = if wait {
                    outlet.send(to, &m);
                    true
                } else {
                    outlet.try_send(to, &m)
                };
                ob = lock(outbox);
                if !sent {
                    ob.queues.entry(to).or_default().push_front(m);
                    stuck.push(to);
                    break;
                }
            }
            ob.sending.remove(&to);
        }
    }
}

/// What the engine's thread and the threads that deliver share.
struct Shared {
    worker: Mutex<Worker>,
    epoll: Arc<Epoll>,
    waker: Waker,
    outbox: Mutex<Outbox>,
    outlet: Box<dyn Outlet>,
    /// How long the thread polls after activity (`DsmConfig::spin`).
    spin: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A handle on the engine's thread.
pub struct Engine {
    tx: Sender<Event>,
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

const WAKE_TOKEN: u64 = u64::MAX;
/// The largest read-ahead window, in pages.
const MAX_AHEAD: u64 = 32;

impl Engine {
    /// Starts kernel `me`'s engine.
    pub fn start(me: Node, config: DsmConfig, outlet: Box<dyn Outlet>) -> Result<Engine, DsmError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(DsmError::sys("epoll"))?;
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(DsmError::sys("eventfd"))?;
        epoll
            .add(
                efd.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
            )
            .map_err(DsmError::sys("epoll_ctl"))?;
        let epoll = Arc::new(epoll);
        let shared = Arc::new(Shared {
            worker: Mutex::new(Worker {
                me,
                config,
                proto: Config {
                    hold: u64::try_from(config.hold.as_nanos()).unwrap_or(u64::MAX),
                    skip_ack_wait: false,
                },
                out: Vec::new(),
                new_timer: false,
                epoll: Arc::clone(&epoll),
                start: Instant::now(),
                regions: HashMap::new(),
                mappers: HashMap::new(),
                next_mapper: 0,
                early: Vec::new(),
                timers: BinaryHeap::new(),
                local: VecDeque::new(),
                bad: 0,
            }),
            epoll,
            waker: Waker {
                efd,
                sleeping: AtomicBool::new(false),
            },
            outbox: Mutex::new(Outbox::default()),
            outlet,
            spin: config.spin,
        });
        let (tx, rx) = unbounded();
        let sh = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("mknode-dsm".into())
            .spawn(move || sh.run(&rx))
            .map_err(|e| DsmError::Sys {
                what: "spawning the engine thread",
                source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
            })?;
        Ok(Engine {
            tx,
            shared,
            thread: Some(thread),
        })
    }

    /// Hands `ev` to the engine's thread.
    pub fn post(&self, ev: Event) {
        if self.tx.send(ev).is_err() {
            return;
        }
        self.shared.waker.wake();
    }

    /// Handles a protocol message from kernel `from` on the calling thread
    /// (an agent's receive thread): what it answers leaves at once when the
    /// link has room, or later from the engine's thread. Never waits for a
    /// link.
    pub fn deliver(&self, from: Node, msg: Msg) {
        let timer = self.shared.with_worker(|w| {
            w.message_and_follow_ups(from, msg);
            std::mem::take(&mut w.new_timer)
        });
        if !self.shared.flush(false) || timer {
            self.shared.waker.wake();
        }
    }

    /// Runs `cmd` and waits for its answer (`make` builds it around the
    /// reply channel).
    pub fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Command) -> Result<T, DsmError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.post(Event::Command(make(tx)));
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| DsmError::EngineGone)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.post(Event::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The engine's thread and everything it owns.
struct Worker {
    me: Node,
    config: DsmConfig,
    proto: Config,
    /// What this worker sent since its lock was taken (see `Shared::with_worker`).
    out: Vec<(Node, Msg)>,
    /// A timer was set since the engine's thread last looked: a receive
    /// thread that set one wakes it (it may sleep past the timer's due
    /// time otherwise).
    new_timer: bool,
    epoll: Arc<Epoll>,
    start: Instant,
    regions: HashMap<u32, Region>,
    mappers: HashMap<u64, Mapper>,
    next_mapper: u64,
    /// Messages for regions not created here yet.
    early: Vec<(Instant, Node, Msg)>,
    /// Held-back invalidations: (due, region, page).
    timers: BinaryHeap<Reverse<(u64, u32, u64)>>,
    /// Protocol messages this kernel sends itself (its cache and its
    /// directory), handled in order before anything else.
    local: VecDeque<(u32, u64, protocol::Msg<Vec<u8>>)>,
    /// Messages refused as malformed or out of place.
    bad: u64,
}

/// The page content of a message: empty means none.
fn data(bytes: Vec<u8>) -> Option<Vec<u8>> {
    (!bytes.is_empty()).then_some(bytes)
}

fn to_wire(region: u32, page: u64, m: protocol::Msg<Vec<u8>>) -> Msg {
    match m {
        protocol::Msg::Request { access } => Msg::DsmRequest {
            region,
            page,
            write: access == Access::Write,
        },
        protocol::Msg::Grant {
            access,
            version,
            data,
        } => Msg::DsmGrant {
            region,
            page,
            write: access == Access::Write,
            version,
            data: data.unwrap_or_default(),
        },
        protocol::Msg::Invalidate { downgrade } => Msg::DsmInvalidate {
            region,
            page,
            downgrade,
        },
        protocol::Msg::Ack { data } => Msg::DsmAck {
            region,
            page,
            data: data.unwrap_or_default(),
        },
        protocol::Msg::Fail => Msg::DsmFail { region, page },
    }
}

/// A wire message as (region, page, protocol message), if it is one and
/// its content is a whole page or nothing.
fn from_wire(m: Msg) -> Option<(u32, u64, protocol::Msg<Vec<u8>>)> {
    let access = |w| if w { Access::Write } else { Access::Read };
    let ok = |d: &Vec<u8>| d.is_empty() || d.len() == PAGE;
    Some(match m {
        Msg::DsmRequest {
            region,
            page,
            write,
        } => (
            region,
            page,
            protocol::Msg::Request {
                access: access(write),
            },
        ),
        Msg::DsmGrant {
            region,
            page,
            write,
            version,
            data: d,
        } if ok(&d) => (
            region,
            page,
            protocol::Msg::Grant {
                access: access(write),
                version,
                data: data(d),
            },
        ),
        Msg::DsmInvalidate {
            region,
            page,
            downgrade,
        } => (region, page, protocol::Msg::Invalidate { downgrade }),
        Msg::DsmAck {
            region,
            page,
            data: d,
        } if ok(&d) => (region, page, protocol::Msg::Ack { data: data(d) }),
        Msg::DsmFail { region, page } => (region, page, protocol::Msg::Fail),
        _ => return None,
    })
}

/// The home's memory of one page: a memfd, read and written in place.
struct PageMemory<'a> {
    fd: &'a File,
    off: u64,
}

impl Memory<Vec<u8>> for PageMemory<'_> {
    fn read(&mut self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE];
        if let Err(e) = self.fd.read_exact_at(&mut b, self.off) {
            log::error!("dsm: reading the home's memory: {e}");
        }
        b
    }
    fn write(&mut self, data: Vec<u8>) {
        if let Err(e) = self.fd.write_all_at(&data, self.off) {
            log::error!("dsm: writing the home's memory: {e}");
        }
    }
}

/// This kernel's copy of one page, with every local mapping of it.
struct PageCopy<'a> {
    fd: &'a File,
    off: u64,
    /// (userfaultfd, address of the page in that mapping)
    mappers: Vec<(&'a Uffd, u64)>,
}

impl<'a> PageCopy<'a> {
    /// The page at `off` of a region's copy `fd`, as mapped by the mappers
    /// `ids` (those still in `mappers`).
    fn new(fd: &'a File, off: u64, ids: &[u64], mappers: &'a HashMap<u64, Mapper>) -> Self {
        PageCopy {
            fd,
            off,
            mappers: ids
                .iter()
                .filter_map(|id| mappers.get(id))
                .map(|mp| (&mp.uffd, mp.base + off))
                .collect(),
        }
    }
}

impl Store<Vec<u8>> for PageCopy<'_> {
    fn read(&mut self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE];
        if let Err(e) = self.fd.read_exact_at(&mut b, self.off) {
            log::error!("dsm: reading a page copy: {e}");
        }
        b
    }
    fn install(&mut self, data: Vec<u8>, writable: bool) {
        if !writable {
            // Markers first: no mapper may write the page once it is in.
            self.protect();
        }
        if let Err(e) = self.fd.write_all_at(&data, self.off) {
            log::error!("dsm: installing a page copy: {e}");
        }
    }
    fn protect(&mut self) {
        for (u, addr) in &self.mappers {
            // A mapper whose process is gone (ESRCH) has nothing to protect.
            let _ = u.write_protect(*addr, PAGE as u64, true);
        }
    }
    fn drop_copy(&mut self) {
        let off = libc::off_t::try_from(self.off).unwrap_or(libc::off_t::MAX);
        if let Err(e) = nix::fcntl::fallocate(
            self.fd,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            PAGE as libc::off_t,
        ) {
            log::error!("dsm: dropping a page copy: {e}");
        }
    }
}

impl Shared {
    /// Runs `f` on the worker, then queues what it sent, in order, before
    /// the lock goes (so queues keep the order the protocol made).
    fn with_worker<T>(&self, f: impl FnOnce(&mut Worker) -> T) -> T {
        let mut w = lock(&self.worker);
        let t = f(&mut w);
        if !w.out.is_empty() {
            let mut ob = lock(&self.outbox);
            for (to, m) in w.out.drain(..) {
                ob.queues.entry(to).or_default().push_back(m);
            }
        }
        t
    }

    /// Sends what the outbox holds (see [`Outbox::flush`]).
    fn flush(&self, wait: bool) -> bool {
        Outbox::flush(&self.outbox, self.outlet.as_ref(), wait)
    }

    fn has_outgoing(&self) -> bool {
        lock(&self.outbox).queues.values().any(|q| !q.is_empty())
    }

    /// The engine's thread: faults, timers, events, and what the receive
    /// threads could not send.
    fn run(&self, rx: &Receiver<Event>) {
        let mut idle_since = Instant::now();
        let mut events = [EpollEvent::empty(); 32];
        loop {
            let mut busy = false;
            while let Ok(ev) = rx.try_recv() {
                busy = true;
                if matches!(ev, Event::Stop) {
                    return;
                }
                self.with_worker(|w| w.event(ev));
            }
            let n = self
                .epoll
                .wait(&mut events, EpollTimeout::ZERO)
                .unwrap_or(0);
            if n > 0 {
                busy = true;
                self.ready(&events[..n]);
            }
            // Timers due within the next millisecond (epoll's resolution)
            // keep the thread polling: the hold time is a few 100 µs.
            let soon = self.with_worker(|w| {
                w.new_timer = false;
                w.run_timers();
                w.timer_within(Duration::from_millis(1))
            });
            if self.has_outgoing() {
                busy = true;
                self.flush(true);
            }
            if busy {
                idle_since = Instant::now();
                continue;
            }
            if soon || idle_since.elapsed() < self.spin {
                // Yield rather than spin: with more threads than CPUs, the
                // one this is waiting for may need this CPU.
                thread::yield_now();
                continue;
            }
            if let Some(stop) = self.sleep(rx, &mut events) {
                if stop {
                    return;
                }
                idle_since = Instant::now();
            }
        }
    }

    fn ready(&self, events: &[EpollEvent]) {
        if events.iter().any(|e| e.data() == WAKE_TOKEN) {
            let _ = self.waker.efd.read();
        }
        self.with_worker(|w| w.ready(events));
    }

    /// Sleeps in epoll until a fault, an event, work from a receive thread
    /// or the next timer. `None` when it did not sleep (work came in
    /// meanwhile).
    fn sleep(&self, rx: &Receiver<Event>, events: &mut [EpollEvent]) -> Option<bool> {
        self.waker.sleeping.store(true, Ordering::SeqCst);
        // SYNC POINT: pairs with the fence in `Waker::wake`.
        std::sync::atomic::fence(Ordering::SeqCst);
        if !rx.is_empty() || self.has_outgoing() {
            self.waker.sleeping.store(false, Ordering::SeqCst);
            return None;
        }
        let timeout = lock(&self.worker).sleep_for();
        let n = self.epoll.wait(events, timeout).unwrap_or(0);
        self.waker.sleeping.store(false, Ordering::SeqCst);
        if n > 0 {
            self.ready(&events[..n]);
        }
        Some(false)
    }
}

impl Worker {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Reads what the userfaultfds in `events` say and handles the faults.
    fn ready(&mut self, events: &[EpollEvent]) {
        let mut msgs = Vec::new();
        for e in events {
            let id = e.data();
            if id == WAKE_TOKEN {
                continue;
            }
            msgs.clear();
            let got = match self.mappers.get(&id) {
                Some(m) => m.uffd.read(&mut msgs),
                None => continue,
            };
            if let Err(e) = got {
                log::warn!("dsm: reading a userfaultfd: {e}; dropping that mapping");
                self.remove_mapper(id);
                continue;
            }
            for m in msgs.drain(..) {
                if let uffd::Msg::Fault {
                    address,
                    flags,
                    tid,
                } = m
                {
                    self.fault(id, address, flags, tid);
                    self.drain_local();
                }
            }
        }
    }

    /// The next timer is due within `within`.
    fn timer_within(&self, within: Duration) -> bool {
        self.timers.peek().is_some_and(|Reverse((due, _, _))| {
            due.saturating_sub(self.now()) < u64::try_from(within.as_nanos()).unwrap_or(u64::MAX)
        })
    }

    /// How long the engine's thread may sleep before the next timer.
    fn sleep_for(&self) -> EpollTimeout {
        match self.timers.peek() {
            Some(Reverse((due, _, _))) => {
                let ms = due.saturating_sub(self.now()).div_ceil(1_000_000);
                EpollTimeout::from(u16::try_from(ms.min(100)).unwrap_or(100))
            }
            None => EpollTimeout::from(100u16),
        }
    }

    fn message_and_follow_ups(&mut self, from: Node, msg: Msg) {
        self.message(from, msg);
        self.follow_ups();
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::PeerLost { node, why } => self.peer_lost(node, &why),
            Event::Command(c) => self.command(c),
            Event::Stop => {}
        }
        self.follow_ups();
    }

    /// What a step leaves to do: the messages this kernel sent itself, and
    /// early messages whose region may exist now.
    fn follow_ups(&mut self) {
        self.drain_local();
        self.retry_early();
        self.drain_local();
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Open { info, reply } => {
                let _ = reply.send(self.open(info, None));
            }
            Command::Adopt {
                info,
                copy,
                memory,
                reply,
            } => {
                let r = if info.home != self.me {
                    Err(DsmError::Refused {
                        errno: libc::EINVAL,
                        message: format!("region {} is homed at {}", info.name, info.home),
                    })
                } else if self.regions.contains_key(&info.id) {
                    Err(DsmError::Refused {
                        errno: libc::EEXIST,
                        message: format!("region {} exists here already", info.name),
                    })
                } else {
                    self.open(info, Some((copy, memory))).map(drop)
                };
                let _ = reply.send(r);
            }
            Command::Attach {
                region,
                addr,
                len,
                uffd,
                pid,
                conn,
                reply,
            } => {
                let _ = reply.send(self.attach(region, addr, len, uffd, pid, conn));
            }
            Command::Detach { addr, conn, reply } => {
                let id = self
                    .mappers
                    .iter()
                    .find(|(_, m)| m.conn == conn && m.base == addr)
                    .map(|(id, _)| *id);
                let _ = reply.send(match id {
                    Some(id) => {
                        self.remove_mapper(id);
                        Ok(())
                    }
                    None => Err(DsmError::NotMapped(addr)),
                });
            }
            Command::Closed { conn } => {
                let ids: Vec<u64> = self
                    .mappers
                    .iter()
                    .filter(|(_, m)| m.conn == conn)
                    .map(|(id, _)| *id)
                    .collect();
                for id in ids {
                    self.remove_mapper(id);
                }
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
        }
    }

    /// Region `info` here: known already, or created with fresh memfds, or
    /// with `given` (its copy and the home's memory, see `Command::Adopt`).
    fn open(&mut self, info: RegionInfo, given: Option<(File, File)>) -> Result<OwnedFd, DsmError> {
        if let Some(r) = self.regions.get(&info.id) {
            return r.copy.as_fd().try_clone_to_owned().map_err(DsmError::io);
        }
        let npages = info.size / PAGE as u64;
        let memfd = |what| -> Result<File, DsmError> {
            let fd = nix::sys::memfd::memfd_create(
                format!("mkdsm-{}-{what}", info.name).as_str(),
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )
            .map_err(DsmError::sys("memfd_create"))?;
            let f = File::from(fd);
            f.set_len(info.size).map_err(DsmError::io)?;
            Ok(f)
        };
        let home = info.home == self.me;
        let (copy, memory) = match given {
            Some((c, m)) => {
                for f in [&c, &m] {
                    f.set_len(info.size).map_err(DsmError::io)?;
                }
                (c, Some(m))
            }
            None => (
                memfd("copy")?,
                if home { Some(memfd("memory")?) } else { None },
            ),
        };
        let dup = copy.as_fd().try_clone_to_owned().map_err(DsmError::io)?;
        let pages = usize::try_from(npages).map_err(|_| DsmError::TooLarge(info.size))?;
        let region = Region {
            npages,
            memory,
            dirs: if home {
                vec![Directory::new(self.proto); pages]
            } else {
                Vec::new()
            },
            caches: vec![Cache::new(info.home, self.proto); pages],
            copy,
            waiters: HashMap::new(),
            mappers: Vec::new(),
            stats: RegionStats::default(),
            next_read: u64::MAX,
            ahead: 0,
            info,
        };
        log::info!(
            "dsm: region {} ({}, {} pages) opened here, home {}",
            region.info.name,
            region.info.id,
            npages,
            region.info.home
        );
        self.regions.insert(region.info.id, region);
        Ok(dup)
    }

    fn attach(
        &mut self,
        region: u32,
        addr: u64,
        len: u64,
        fd: OwnedFd,
        pid: i32,
        conn: u64,
    ) -> Result<(), DsmError> {
        let r = self
            .regions
            .get_mut(&region)
            .ok_or(DsmError::NoRegion(region))?;
        if len != r.info.size || !addr.is_multiple_of(PAGE as u64) {
            return Err(DsmError::BadMapping { addr, len });
        }
        let u = Uffd::from_fd(fd);
        let want = uffd::FEATURE_MISSING_SHMEM | uffd::FEATURE_WP_SHMEM | uffd::FEATURE_THREAD_ID;
        let got = u.api(want).map_err(DsmError::sys("UFFDIO_API"))?;
        if got & want != want {
            return Err(DsmError::Unsupported(
                "userfaultfd on shared memory with write-protection (Linux 5.19 or later)",
            ));
        }
        u.register_missing_wp(addr, len)
            .map_err(DsmError::sys("UFFDIO_REGISTER"))?;
        // Every page not held exclusive here is write-protected (markers on
        // pages not mapped yet): only a write fault may make it writable.
        u.write_protect(addr, len, true)
            .map_err(DsmError::sys("UFFDIO_WRITEPROTECT"))?;
        let id = self.next_mapper;
        self.next_mapper += 1;
        self.epoll
            .add(u.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, id))
            .map_err(DsmError::sys("epoll_ctl"))?;
        r.mappers.push(id);
        self.mappers.insert(
            id,
            Mapper {
                region,
                uffd: u,
                base: addr,
                len,
                pid,
                conn,
            },
        );
        Ok(())
    }

    fn remove_mapper(&mut self, id: u64) {
        let Some(m) = self.mappers.remove(&id) else {
            return;
        };
        let _ = self.epoll.delete(m.uffd.as_fd());
        if let Some(r) = self.regions.get_mut(&m.region) {
            r.mappers.retain(|x| *x != id);
            for w in r.waiters.values_mut() {
                w.retain(|w| w.mapper != id);
            }
        }
    }

    /// A local fault at `address` of mapper `id`.
    fn fault(&mut self, id: u64, address: u64, flags: u64, tid: u32) {
        let Some(m) = self.mappers.get(&id) else {
            return;
        };
        let (region, base) = (m.region, m.base);
        let Some(off) = address.checked_sub(base).filter(|o| *o < m.len) else {
            return;
        };
        let page = off / PAGE as u64;
        let addr = base + page * PAGE as u64;
        let access = if flags & (uffd::PAGEFAULT_FLAG_WRITE | uffd::PAGEFAULT_FLAG_WP) != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let Some(r) = self.regions.get_mut(&region) else {
            return;
        };
        match access {
            Access::Read => r.stats.read_faults += 1,
            Access::Write => r.stats.write_faults += 1,
        }
        let Some(cache) = usize::try_from(page).ok().and_then(|p| r.caches.get_mut(p)) else {
            return;
        };
        let mut out = Vec::new();
        let outcome = cache.fault(access, &mut out);
        r.stats.requests += out.len() as u64;
        let waiter = Waiter {
            mapper: id,
            addr,
            access,
            tid,
            since: Instant::now(),
        };
        match outcome {
            Fault::Wait => r.waiters.entry(page).or_default().push(waiter),
            Fault::Ready => self.resolve(region, waiter),
            Fault::Failed => self.fail_waiter(region, waiter),
        }
        self.dispatch(region, page, out);
        if access == Access::Read {
            self.read_ahead(region, page);
        }
    }

    /// A reader going through a region page by page gets the next pages
    /// asked for before it faults on them (a window that doubles up to
    /// [`MAX_AHEAD`] while the pattern holds): their round trips overlap.
    fn read_ahead(&mut self, region: u32, page: u64) {
        let Some(r) = self.regions.get_mut(&region) else {
            return;
        };
        if page != r.next_read {
            r.next_read = page + 1;
            r.ahead = 0;
            return;
        }
        r.next_read = page + 1;
        r.ahead = (r.ahead * 2).clamp(4, MAX_AHEAD);
        let end = (page + 1 + r.ahead).min(r.npages);
        let mut batches = Vec::new();
        for q in page + 1..end {
            let Some(c) = usize::try_from(q).ok().and_then(|i| r.caches.get_mut(i)) else {
                break;
            };
            if c.state() != protocol::Local::Invalid || c.pending().is_some() {
                continue;
            }
            let mut out = Vec::new();
            // No waiter: the grant just installs the page.
            if c.fault(Access::Read, &mut out) == Fault::Wait {
                r.stats.requests += out.len() as u64;
                r.stats.read_ahead += 1;
                batches.push((q, out));
            }
        }
        for (q, out) in batches {
            self.dispatch(region, q, out);
        }
    }

    /// Lets one fault go on.
    fn resolve(&mut self, region: u32, w: Waiter) {
        let Some(m) = self.mappers.get(&w.mapper) else {
            return;
        };
        let r = match w.access {
            // Lifting the protection also wakes the thread.
            Access::Write => m.uffd.write_protect(w.addr, PAGE as u64, false),
            Access::Read => m.uffd.wake(w.addr, PAGE as u64),
        };
        if let Err(e) = r {
            log::warn!("dsm: waking a fault at {:#x}: {e}", w.addr);
        }
        if let Some(r) = self.regions.get_mut(&region) {
            r.stats.latency.record(w.since.elapsed());
        }
    }

    /// A fault that can never be served: the thread gets SIGBUS.
    fn fail_waiter(&mut self, region: u32, w: Waiter) {
        let Some(m) = self.mappers.get(&w.mapper) else {
            return;
        };
        if let Err(e) = uffd::tgkill(m.pid, i32::try_from(w.tid).unwrap_or(0), libc::SIGBUS) {
            log::warn!("dsm: SIGBUS to thread {} of {}: {e}", w.tid, m.pid);
        }
        if let Some(r) = self.regions.get_mut(&region) {
            r.stats.failed += 1;
        }
    }

    /// Applies a cache's release to the faults waiting on `page`.
    fn release(&mut self, region: u32, page: u64, rel: Release) {
        let Some(r) = self.regions.get_mut(&region) else {
            return;
        };
        let Some(waiters) = r.waiters.remove(&page) else {
            return;
        };
        let mut keep = Vec::new();
        for w in waiters {
            if rel.fail {
                self.fail_waiter(region, w);
            } else if (w.access == Access::Read && rel.reads)
                || (w.access == Access::Write && rel.writes)
            {
                self.resolve(region, w);
            } else {
                keep.push(w);
            }
        }
        if !keep.is_empty() {
            if let Some(r) = self.regions.get_mut(&region) {
                r.waiters.insert(page, keep);
            }
        }
    }

    /// Sends a batch of protocol messages (those to this kernel are handled
    /// at once, in order).
    fn dispatch(&mut self, region: u32, page: u64, out: Vec<(Node, protocol::Msg<Vec<u8>>)>) {
        for (to, m) in out {
            if to == self.me {
                self.local.push_back((region, page, m));
            } else {
                if let Some(r) = self.regions.get_mut(&region) {
                    r.stats.bytes_out += match &m {
                        protocol::Msg::Grant { data: Some(_), .. }
                        | protocol::Msg::Ack { data: Some(_) } => PAGE as u64,
                        _ => 0,
                    };
                }
                self.out.push((to, to_wire(region, page, m)));
            }
        }
    }

    /// Handles what this kernel sent itself, in order (a step may add more).
    fn drain_local(&mut self) {
        while let Some((region, page, m)) = self.local.pop_front() {
            self.protocol(self.me, region, page, m);
        }
    }

    fn message(&mut self, from: Node, msg: Msg) {
        if let Msg::DsmDrop { region } = msg {
            self.drop_region(from, region);
            return;
        }
        let Some((region, page, m)) = from_wire(msg.clone()) else {
            self.refuse(from, "a malformed DSM message");
            return;
        };
        if !self.regions.contains_key(&region) {
            // Maybe still being opened here.
            self.early.push((Instant::now(), from, msg));
            return;
        }
        if let Some(r) = self.regions.get_mut(&region) {
            if matches!(
                m,
                protocol::Msg::Grant { data: Some(_), .. } | protocol::Msg::Ack { data: Some(_) }
            ) {
                r.stats.bytes_in += PAGE as u64;
            }
        }
        self.protocol(from, region, page, m);
    }

    /// One protocol message for (region, page), from `from` (maybe this
    /// kernel), checked against what the region is.
    fn protocol(&mut self, from: Node, region: u32, page: u64, m: protocol::Msg<Vec<u8>>) {
        let me = self.me;
        let now = self.now();
        let Some((home, npages)) = self.regions.get(&region).map(|r| (r.info.home, r.npages))
        else {
            return;
        };
        let Some(p) = usize::try_from(page).ok().filter(|_| page < npages) else {
            self.refuse(from, "a page number past the region's end");
            return;
        };
        let to_home = matches!(m, protocol::Msg::Request { .. } | protocol::Msg::Ack { .. });
        if to_home && home != me {
            self.refuse(
                from,
                "a request or acknowledgement for a region homed elsewhere",
            );
            return;
        }
        if !to_home && from != home {
            self.refuse(from, "a grant or invalidation not from the region's home");
            return;
        }
        let Some(r) = self.regions.get_mut(&region) else {
            return;
        };
        let off = page * PAGE as u64;
        let mut out = Vec::new();
        let mut release = None;
        let mut unexpected = None;
        match m {
            protocol::Msg::Request { access } => {
                let mut mem = PageMemory {
                    fd: r.memory.as_ref().unwrap_or(&r.copy),
                    off,
                };
                r.dirs[p].on_request(from, access, &mut mem, &mut out);
            }
            protocol::Msg::Ack { data } => {
                let mut mem = PageMemory {
                    fd: r.memory.as_ref().unwrap_or(&r.copy),
                    off,
                };
                unexpected = r.dirs[p].on_ack(from, data, &mut mem, &mut out).err();
            }
            m => {
                if matches!(m, protocol::Msg::Invalidate { .. }) {
                    r.stats.invalidations += 1;
                }
                let mut copy = PageCopy::new(&r.copy, off, &r.mappers, &self.mappers);
                match r.caches[p].on_message(m, now, &mut copy, &mut out) {
                    Ok(rel) => {
                        if let Some(due) = r.caches[p].deferred_until() {
                            self.timers.push(Reverse((due, region, page)));
                            self.new_timer = true;
                        }
                        release = Some(rel);
                    }
                    Err(e) => unexpected = Some(e),
                }
            }
        }
        if let Some(e) = unexpected {
            log::debug!("dsm: region {region} page {page}: {e}");
            self.bad += 1;
        }
        if let Some(rel) = release {
            self.release(region, page, rel);
        }
        self.dispatch(region, page, out);
    }

    /// The registry removed `region`: forget it (only if nothing maps it
    /// here any more; the registry checked, but a process may have mapped
    /// it since).
    fn drop_region(&mut self, from: Node, region: u32) {
        if from != crate::agent::dsm::REGISTRY && from != self.me {
            self.refuse(from, "a region removal not from the registry");
            return;
        }
        match self.regions.get(&region) {
            Some(r) if !r.mappers.is_empty() => {
                log::warn!(
                    "dsm: region {} removed by the registry but still mapped here by {} process(es); kept",
                    r.info.name,
                    r.mappers.len()
                );
            }
            Some(_) => {
                self.regions.remove(&region);
                self.timers.retain(|Reverse((_, r, _))| *r != region);
            }
            None => {}
        }
    }

    fn refuse(&mut self, from: Node, what: &str) {
        self.bad += 1;
        if self.bad == 1 {
            log::warn!("dsm: kernel {from} sent {what} (further ones are counted, not logged)");
        }
    }

    fn run_timers(&mut self) {
        let now = self.now();
        while let Some(Reverse((due, region, page))) = self.timers.peek().copied() {
            if due > now {
                return;
            }
            self.timers.pop();
            let Some(r) = self.regions.get_mut(&region) else {
                continue;
            };
            let Some(p) = usize::try_from(page).ok().filter(|_| page < r.npages) else {
                continue;
            };
            let off = page * PAGE as u64;
            let mut copy = PageCopy::new(&r.copy, off, &r.mappers, &self.mappers);
            let mut out = Vec::new();
            r.caches[p].on_timer(now, &mut copy, &mut out);
            self.dispatch(region, page, out);
            self.drain_local();
        }
    }

    fn retry_early(&mut self) {
        if self.early.is_empty() {
            return;
        }
        let early = std::mem::take(&mut self.early);
        for (at, from, msg) in early {
            let known =
                from_wire(msg.clone()).is_some_and(|(r, _, _)| self.regions.contains_key(&r));
            if known {
                self.message(from, msg);
            } else if at.elapsed() < self.config.early_wait {
                self.early.push((at, from, msg));
            } else {
                // A request must not leave a fault waiting forever (the
                // region's home was restarted and knows it no more).
                if let Msg::DsmRequest { region, page, .. } = msg {
                    self.out.push((from, Msg::DsmFail { region, page }));
                }
                self.refuse(from, "a message for a region unknown here");
            }
        }
    }

    fn peer_lost(&mut self, node: Node, why: &str) {
        // Not remembered: a kernel declared lost may boot again (a new
        // incarnation, with none of the old one's pages); what failed
        // stays failed in the regions it homed.
        let ids: Vec<u32> = self.regions.keys().copied().collect();
        for region in ids {
            let Some(r) = self.regions.get_mut(&region) else {
                continue;
            };
            if r.info.home == node {
                r.stats.error = Some(format!("its home is lost: {why}"));
                let rels: Vec<(u64, Release)> = (0..r.npages)
                    .zip(r.caches.iter_mut())
                    .map(|(p, c)| (p, c.on_home_lost()))
                    .filter(|(_, rel)| rel.fail)
                    .collect();
                for (page, rel) in rels {
                    self.release(region, page, rel);
                }
            } else if r.info.home == self.me {
                for page in 0..r.npages {
                    let Some(r) = self.regions.get_mut(&region) else {
                        break;
                    };
                    let p = usize::try_from(page).unwrap_or(usize::MAX);
                    let mut out = Vec::new();
                    let mut mem = PageMemory {
                        fd: r.memory.as_ref().unwrap_or(&r.copy),
                        off: page * PAGE as u64,
                    };
                    r.dirs[p].on_lost(node, &mut mem, &mut out);
                    if matches!(r.dirs[p].state(), protocol::DirState::Lost) {
                        r.stats.lost_pages += 1;
                    }
                    self.dispatch(region, page, out);
                }
            }
        }
    }

    fn stats(&self) -> Stats {
        let mut regions: Vec<_> = self
            .regions
            .values()
            .map(|r| {
                let mut s = r.stats.clone();
                s.info = Some(r.info.clone());
                s.mappers = r.mappers.len() as u64;
                s.count_states(&r.caches);
                s
            })
            .collect();
        regions.sort_by_key(|s| s.info.as_ref().map(|i| i.id));
        Stats {
            node: self.me,
            bad_messages: self.bad,
            regions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Records what it sends; `try_send` says "later" while `full` holds
    /// for the kernel, and `send` waits for nothing.
    #[derive(Default)]
    struct Recorder {
        sent: Mutex<Vec<(Node, u64)>>,
        full: Mutex<HashSet<Node>>,
        waits: AtomicUsize,
    }

    fn seq(m: &Msg) -> u64 {
        match m {
            Msg::DsmFail { page, .. } => *page,
            other => panic!("unexpected {other:?}"),
        }
    }

    impl Outlet for Recorder {
        fn try_send(&self, to: Node, m: &Msg) -> bool {
            if lock(&self.full).contains(&to) {
                return false;
            }
            lock(&self.sent).push((to, seq(m)));
            true
        }
        fn send(&self, to: Node, m: &Msg) {
            self.waits.fetch_add(1, Ordering::Relaxed);
            lock(&self.sent).push((to, seq(m)));
        }
    }

    fn queue(ob: &Mutex<Outbox>, to: Node, seqs: std::ops::Range<u64>) {
        let mut o = lock(ob);
        for page in seqs {
            o.queues
                .entry(to)
                .or_default()
                .push_back(Msg::DsmFail { region: 0, page });
        }
    }

    fn sent_to(r: &Recorder, to: Node) -> Vec<u64> {
        lock(&r.sent)
            .iter()
            .filter(|(t, _)| *t == to)
            .map(|(_, s)| *s)
            .collect()
    }

    #[test]
    fn what_cannot_go_at_once_waits_for_the_engine_thread_in_order() {
        let ob = Mutex::new(Outbox::default());
        let r = Recorder::default();
        lock(&r.full).insert(2);
        queue(&ob, 1, 0..3);
        queue(&ob, 2, 0..3);
        // A receive thread: kernel 1's queue goes, kernel 2's stays whole.
        assert!(!Outbox::flush(&ob, &r, false));
        assert_eq!(sent_to(&r, 1), [0, 1, 2]);
        assert!(sent_to(&r, 2).is_empty());
        // More for 2 made meanwhile queues behind what is there, even once
        // its link has room again: nothing overtakes.
        queue(&ob, 2, 3..5);
        lock(&r.full).clear();
        assert!(Outbox::flush(&ob, &r, false));
        assert_eq!(sent_to(&r, 2), [0, 1, 2, 3, 4]);
        assert_eq!(r.waits.load(Ordering::Relaxed), 0);
        // The engine's thread sends what is stuck, waiting.
        lock(&r.full).insert(1);
        queue(&ob, 1, 3..6);
        assert!(!Outbox::flush(&ob, &r, false));
        assert!(Outbox::flush(&ob, &r, true));
        assert_eq!(sent_to(&r, 1), [0, 1, 2, 3, 4, 5]);
        assert_eq!(r.waits.load(Ordering::Relaxed), 3);
        assert!(lock(&ob).queues.values().all(VecDeque::is_empty));
    }

    #[test]
    fn a_queue_another_thread_is_sending_is_left_to_it() {
        let ob = Mutex::new(Outbox::default());
        let r = Recorder::default();
        queue(&ob, 1, 0..2);
        lock(&ob).sending.insert(1);
        // Not ours to send (it would break the order), and not stuck.
        assert!(Outbox::flush(&ob, &r, true));
        assert!(sent_to(&r, 1).is_empty());
        lock(&ob).sending.remove(&1);
        assert!(Outbox::flush(&ob, &r, false));
        assert_eq!(sent_to(&r, 1), [0, 1]);
    }
}
