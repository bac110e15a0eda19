//! The DSM engine of one kernel: its regions, the processes that map them,
//! their page faults, and the protocol messages, all handled on one thread
//! that owns every piece of DSM state (no locks around the protocol).
//!
//! What goes in, as [`Event`]s posted from other threads: protocol messages
//! (the agent's receive threads), a peer lost (the agent core), commands
//! from local processes (the local socket). What the thread watches itself:
//! one userfaultfd per mapping, through an epoll set.
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
use std::collections::{BinaryHeap, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// Where protocol messages to other kernels go.
pub type Outlet = Box<dyn Fn(Node, &Msg) + Send>;

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
    Message { from: Node, msg: Msg },
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

/// A handle on the engine's thread.
#[derive(Debug)]
pub struct Engine {
    tx: Sender<Event>,
    waker: Arc<Waker>,
    thread: Option<thread::JoinHandle<()>>,
}

const WAKE_TOKEN: u64 = u64::MAX;
/// The largest read-ahead window, in pages.
const MAX_AHEAD: u64 = 32;

impl Engine {
    /// Starts kernel `me`'s engine.
    pub fn start(me: Node, config: DsmConfig, send: Outlet) -> Result<Engine, DsmError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(DsmError::sys("epoll"))?;
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(DsmError::sys("eventfd"))?;
        epoll
            .add(
                efd.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
            )
            .map_err(DsmError::sys("epoll_ctl"))?;
        let waker = Arc::new(Waker {
            efd,
            sleeping: AtomicBool::new(false),
        });
        let (tx, rx) = unbounded();
        let w = Arc::clone(&waker);
        let thread = thread::Builder::new()
            .name("mknode-dsm".into())
            .spawn(move || {
                Worker {
                    me,
                    config,
                    proto: Config {
                        hold: u64::try_from(config.hold.as_nanos()).unwrap_or(u64::MAX),
                        skip_ack_wait: false,
                    },
                    send,
                    epoll,
                    waker: w,
                    start: Instant::now(),
                    regions: HashMap::new(),
                    mappers: HashMap::new(),
                    next_mapper: 0,
                    early: Vec::new(),
                    timers: BinaryHeap::new(),
                    local: std::collections::VecDeque::new(),
                    bad: 0,
                }
                .run(&rx)
            })
            .map_err(|e| DsmError::Sys {
                what: "spawning the engine thread",
                source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN)),
            })?;
        Ok(Engine {
            tx,
            waker,
            thread: Some(thread),
        })
    }

    /// Hands `ev` to the engine's thread.
    pub fn post(&self, ev: Event) {
        if self.tx.send(ev).is_err() {
            return;
        }
        // SYNC POINT: pairs with the fence in `Worker::sleep`: either the
        // thread sees the event before it sleeps, or we see it asleep.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waker.sleeping.load(Ordering::SeqCst) {
            let _ = self.waker.efd.write(1);
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
    send: Outlet,
    epoll: Epoll,
    waker: Arc<Waker>,
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
    local: std::collections::VecDeque<(u32, u64, protocol::Msg<Vec<u8>>)>,
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

impl Worker {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn run(mut self, rx: &Receiver<Event>) {
        let mut idle_since = Instant::now();
        let mut events = [EpollEvent::empty(); 32];
        loop {
            let mut busy = false;
            while let Ok(ev) = rx.try_recv() {
                busy = true;
                if matches!(ev, Event::Stop) {
                    return;
                }
                self.event(ev);
            }
            let n = self
                .epoll
                .wait(&mut events, EpollTimeout::ZERO)
                .unwrap_or(0);
            if n > 0 {
                busy = true;
                self.ready(&events[..n]);
            }
            self.run_timers();
            if busy {
                idle_since = Instant::now();
                continue;
            }
            if idle_since.elapsed() < self.config.spin {
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

    /// Sleeps in epoll until a fault, an event or the next timer. `None`
    /// when it did not sleep (an event came in meanwhile).
    fn sleep(&mut self, rx: &Receiver<Event>, events: &mut [EpollEvent]) -> Option<bool> {
        self.waker.sleeping.store(true, Ordering::SeqCst);
        // SYNC POINT: pairs with the fence in `Engine::post`.
        std::sync::atomic::fence(Ordering::SeqCst);
        if !rx.is_empty() {
            self.waker.sleeping.store(false, Ordering::SeqCst);
            return None;
        }
        let timeout = match self.timers.peek() {
            Some(Reverse((due, _, _))) => {
                let ms = due.saturating_sub(self.now()).div_ceil(1_000_000);
                EpollTimeout::from(u16::try_from(ms.min(100)).unwrap_or(100))
            }
            None => EpollTimeout::from(100u16),
        };
        let n = self.epoll.wait(events, timeout).unwrap_or(0);
        self.waker.sleeping.store(false, Ordering::SeqCst);
        if n > 0 {
            self.ready(&events[..n]);
        }
        Some(false)
    }

    fn ready(&mut self, events: &[EpollEvent]) {
        let mut msgs = Vec::new();
        for e in events {
            let id = e.data();
            if id == WAKE_TOKEN {
                let _ = self.waker.efd.read();
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

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Message { from, msg } => self.message(from, msg),
            Event::PeerLost { node, why } => self.peer_lost(node, &why),
            Event::Command(c) => self.command(c),
            Event::Stop => {}
        }
        self.drain_local();
        self.retry_early();
        self.drain_local();
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Open { info, reply } => {
                let _ = reply.send(self.open(info));
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

    fn open(&mut self, info: RegionInfo) -> Result<OwnedFd, DsmError> {
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
        let copy = memfd("copy")?;
        let dup = copy.as_fd().try_clone_to_owned().map_err(DsmError::io)?;
        let pages = usize::try_from(npages).map_err(|_| DsmError::TooLarge(info.size))?;
        let region = Region {
            npages,
            memory: if home { Some(memfd("memory")?) } else { None },
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
                (self.send)(to, &to_wire(region, page, m));
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
                let mappers: Vec<(&Uffd, u64)> = r
                    .mappers
                    .iter()
                    .filter_map(|id| self.mappers.get(id))
                    .map(|mp| (&mp.uffd, mp.base + off))
                    .collect();
                let mut copy = PageCopy {
                    fd: &r.copy,
                    off,
                    mappers,
                };
                match r.caches[p].on_message(m, now, &mut copy, &mut out) {
                    Ok(rel) => {
                        if let Some(due) = r.caches[p].deferred_until() {
                            self.timers.push(Reverse((due, region, page)));
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
            let mappers: Vec<(&Uffd, u64)> = r
                .mappers
                .iter()
                .filter_map(|id| self.mappers.get(id))
                .map(|mp| (&mp.uffd, mp.base + off))
                .collect();
            let mut copy = PageCopy {
                fd: &r.copy,
                off,
                mappers,
            };
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
                    (self.send)(from, &Msg::DsmFail { region, page });
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
