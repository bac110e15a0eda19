//! Destination side of lazy migration: the pager that fills a restored
//! process's memory while it runs.
//!
//! One thread owns the process's userfaultfd (missing mode on every carried
//! mapping) and does all of: read its messages, serve each fault from the
//! [`PageSource`] (with a few neighbours prefetched), install the origin's
//! background pushes, and, once the origin says it pushed everything, fetch
//! whatever is still missing. Installing is `UFFDIO_COPY` (`UFFDIO_ZEROPAGE`
//! for an all-zero page); `EEXIST` means the page got there first by the
//! other path, which is fine. Because the events (`mremap`, `munmap`,
//! `madvise(DONTNEED)`) are read by the same thread that installs pages, a
//! page the process discarded is never put back with stale content: it is
//! marked gone and faults on it get zeros, as they would natively.
//!
//! Once every page is in, the userfaultfd is closed (the kernel unregisters
//! the ranges) and the process runs without it. If the origin is lost before
//! that, or a fetch outlives its timeout (a watchdog thread enforces it even
//! if the source never returns), the process is killed: a process blocked
//! forever on a page that cannot come is worse than one that ended.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::image::{Mapping, PAGE};
use super::lazy::{carried, LazyLink, PageSource, Pushed, SourceError};
use crate::uffd::{pidfd_kill, Msg, Uffd};

/// How the destination fetches pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagerOptions {
    /// A fetch that takes longer kills the process (the origin is taken
    /// for lost).
    pub fetch_timeout: Duration,
    /// Pages fetched per fault: the faulting one and those after it that
    /// are still missing.
    pub prefetch: u64,
    /// Pages per fetch when sweeping what the pushes did not bring.
    pub sweep_batch: u64,
}

impl Default for PagerOptions {
    fn default() -> Self {
        PagerOptions {
            fetch_timeout: Duration::from_secs(10),
            prefetch: 16,
            sweep_batch: 256,
        }
    }
}

/// What the pager did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Pages of carried mappings.
    pub total_pages: u64,
    /// Pages that came with the image.
    pub eager_pages: u64,
    /// Page faults the process raised on missing pages.
    pub faults: u64,
    /// Pages installed from demand fetches (faults, prefetch, sweep).
    pub fetched_pages: u64,
    /// Pages installed from background pushes.
    pub pushed_pages: u64,
    /// Of those installed, how many were all-zero (`UFFDIO_ZEROPAGE`).
    pub zero_pages: u64,
    /// Pages the process unmapped or discarded before they arrived.
    pub gone_pages: u64,
    /// Pages that arrived but could not be placed and were given up on.
    pub lost_pages: u64,
    /// Pages placed in children the process forked before they arrived
    /// (see `UFFD_FEATURE_EVENT_FORK`).
    pub child_pages: u64,
    /// Longest single fetch.
    pub max_fetch: Duration,
    /// From the pager's start to the last page in; `None` if the process
    /// ended first.
    pub complete_after: Option<Duration>,
    /// The process exited (or was killed by someone else) before all pages
    /// were in.
    pub process_exited: bool,
}

/// Why lazy paging failed. In every case the process has been killed.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error(
        "origin lost after resume: process {pid} killed rather than left hanging on a missing page"
    )]
    OriginLost {
        pid: i32,
        #[source]
        source: SourceError,
    },
    #[error("the origin stopped serving pages before process {pid} ran; it was not resumed here")]
    OriginLostBeforeResume {
        pid: i32,
        #[source]
        source: SourceError,
    },
    #[error("{op} at {addr:#x} in process {pid} failed; the process was killed")]
    Uffd {
        op: &'static str,
        addr: u64,
        pid: i32,
        #[source]
        source: Errno,
    },
    #[error("the origin pushed a malformed run ({len} bytes at {addr:#x}); process {pid} killed")]
    BadPush { addr: u64, len: usize, pid: i32 },
}

const MISSING: u8 = 0;
const PRESENT: u8 = 1;
const GONE: u8 = 2;

/// Tries before a page that cannot be placed (its spot is not registered
/// and no event explains why) is given up.
const MAX_STRIKES: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Move {
    from: u64,
    to: u64,
    len: u64,
}

#[derive(Debug)]
struct Range {
    start: u64,
    end: u64,
    st: Vec<u8>,
}

/// Every carried page by its origin address, with its state, and the
/// moves (`mremap`) that place origin addresses elsewhere now.
#[derive(Debug)]
pub(crate) struct PageTable {
    ranges: Vec<Range>,
    missing: u64,
    total: u64,
    moves: Vec<Move>,
    /// Sweep position: (range, page).
    cursor: (usize, usize),
}

impl PageTable {
    pub(crate) fn new(mappings: &[Mapping]) -> Self {
        let ranges: Vec<Range> = mappings
            .iter()
            .filter(|m| carried(m))
            .map(|m| Range {
                start: m.start,
                end: m.end,
                st: vec![MISSING; (m.len() / PAGE) as usize],
            })
            .collect();
        let total = ranges.iter().map(|r| r.st.len() as u64).sum();
        PageTable {
            ranges,
            missing: total,
            total,
            moves: Vec::new(),
            cursor: (0, 0),
        }
    }

    fn locate(&self, o: u64) -> Option<(usize, usize)> {
        let i = self.ranges.partition_point(|r| r.end <= o);
        let r = self.ranges.get(i)?;
        (r.start <= o).then(|| (i, ((o - r.start) / PAGE) as usize))
    }

    fn state(&self, o: u64) -> Option<u8> {
        self.locate(o).map(|(i, p)| self.ranges[i].st[p])
    }

    fn set(&mut self, o: u64, s: u8) {
        if let Some((i, p)) = self.locate(o) {
            let old = std::mem::replace(&mut self.ranges[i].st[p], s);
            if old == MISSING && s != MISSING {
                self.missing -= 1;
            }
        }
    }

    /// Marks `[addr, addr + npages pages)` (origin) as present: the image's
    /// own pages.
    pub(crate) fn mark_present(&mut self, addr: u64, npages: u64) {
        for k in 0..npages {
            self.set(addr + k * PAGE, PRESENT);
        }
    }

    /// True when origin page `o` is in a carried (registered) mapping.
    pub(crate) fn holds(&self, o: u64) -> bool {
        self.locate(o).is_some()
    }

    pub(crate) fn missing(&self) -> u64 {
        self.missing
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// The origin address whose content belongs at current address `cur`,
    /// or `None` when what is there now is new memory (moved into a spot
    /// another range left).
    fn to_origin(&self, cur: u64) -> Option<u64> {
        let mut a = cur;
        for m in self.moves.iter().rev() {
            if a >= m.to && a - m.to < m.len {
                a = m.from + (a - m.to);
            } else if a >= m.from && a - m.from < m.len {
                return None;
            }
        }
        Some(a)
    }

    /// Where origin page `o` is now.
    fn to_current(&self, o: u64) -> u64 {
        self.moves.iter().fold(o, |a, m| {
            if a >= m.from && a - m.from < m.len {
                m.to + (a - m.from)
            } else {
                a
            }
        })
    }

    fn remap(&mut self, from: u64, to: u64, len: u64) {
        self.moves.push(Move { from, to, len });
    }

    /// The process dropped `[start, end)` (current addresses): what was
    /// there will not be needed (it reads as zero or is unmapped). Returns
    /// the origin pages that were still missing.
    fn forget(&mut self, start: u64, end: u64) -> Vec<u64> {
        let mut gone = Vec::new();
        let mut p = start & !(PAGE - 1);
        while p < end {
            if let Some(o) = self.to_origin(p) {
                match self.state(o) {
                    Some(MISSING) => {
                        self.set(o, GONE);
                        gone.push(o);
                    }
                    Some(PRESENT) => self.set(o, GONE),
                    _ => {}
                }
            }
            p += PAGE;
        }
        gone
    }

    /// Up to `max` missing pages from `o` on, in its range, none of them in
    /// `skip`.
    fn run_from(&self, o: u64, max: u64, skip: &HashMap<u64, Stashed>) -> u64 {
        let Some((i, p)) = self.locate(o) else {
            return 0;
        };
        let r = &self.ranges[i];
        r.st[p..]
            .iter()
            .enumerate()
            .take(max as usize)
            .take_while(|(k, s)| **s == MISSING && !skip.contains_key(&(o + *k as u64 * PAGE)))
            .count() as u64
    }

    /// The next run of missing pages (not in `skip`) for the sweep.
    fn next_missing(&mut self, max: u64, skip: &HashMap<u64, Stashed>) -> Option<(u64, u64)> {
        if self.missing == 0 {
            return None;
        }
        let (mut i, mut p) = self.cursor;
        for _ in 0..2 {
            while i < self.ranges.len() {
                let r = &self.ranges[i];
                while p < r.st.len() {
                    let o = r.start + p as u64 * PAGE;
                    if r.st[p] == MISSING && !skip.contains_key(&o) {
                        self.cursor = (i, p);
                        let n = self.run_from(o, max, skip);
                        return Some((o, n));
                    }
                    p += 1;
                }
                i += 1;
                p = 0;
            }
            // Wrap once: pages may have been left behind (stashed, retried).
            i = 0;
            p = 0;
        }
        None
    }
}

/// A page that arrived but could not be placed yet.
#[derive(Debug)]
struct Stashed {
    data: Vec<u8>,
    strikes: u32,
}

#[derive(Debug, Default)]
struct Outcome {
    result: Option<Result<PagerStats, LazyError>>,
}

struct Shared {
    pid: i32,
    out: Mutex<Outcome>,
    done: Condvar,
    finished: AtomicBool,
    stop: AtomicBool,
    running: AtomicBool,
    /// Set when the watchdog killed the process.
    killed: AtomicBool,
    fetch_since: Mutex<Option<Instant>>,
    settled: AtomicU64,
    total: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Outcome> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the first result only.
    fn finish(&self, r: Result<PagerStats, LazyError>) {
        let mut o = self.lock();
        if o.result.is_none() {
            o.result = Some(r);
            self.finished.store(true, Ordering::Release);
            self.done.notify_all();
        }
    }

    fn lost(&self, source: SourceError) -> LazyError {
        if self.running.load(Ordering::Acquire) {
            LazyError::OriginLost {
                pid: self.pid,
                source,
            }
        } else {
            LazyError::OriginLostBeforeResume {
                pid: self.pid,
                source,
            }
        }
    }
}

/// The handle on a running pager. Dropping it leaves the pager serving
/// (the process needs it); [`Pager::wait`] collects the outcome.
pub struct Pager {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("pid", &self.shared.pid)
            .field("progress", &self.progress())
            .finish()
    }
}

impl Pager {
    /// (pages in or no longer needed, carried pages).
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.settled.load(Ordering::Relaxed),
            self.shared.total,
        )
    }

    /// Waits up to `t` for the end (all pages in, a failure, or the process
    /// ended); true if it came.
    pub fn wait_timeout(&self, t: Duration) -> bool {
        let end = Instant::now() + t;
        let mut o = self.shared.lock();
        while o.result.is_none() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            o = self
                .shared
                .done
                .wait_timeout(o, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Waits for the end: every page in (the userfaultfd is closed by then),
    /// or the error for which the process was killed.
    pub fn wait(self) -> Result<PagerStats, LazyError> {
        let mut o = self.shared.lock();
        loop {
            if let Some(r) = o.result.take() {
                return r;
            }
            o = self.shared.done.wait(o).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The process is running from now on (errors say "after resume").
    pub(crate) fn set_running(&self) {
        self.shared.running.store(true, Ordering::Release);
    }

    /// The restore failed: stop serving, and hand back the pager's own
    /// error if it is why.
    pub(crate) fn abort(self) -> Option<LazyError> {
        self.shared.stop.store(true, Ordering::Release);
        self.wait_timeout(Duration::from_secs(30));
        match self.shared.lock().result.take() {
            Some(Err(e)) => Some(e),
            _ => None,
        }
    }
}

/// The source after the pager is done with it.
struct Closed;

impl PageSource for Closed {
    fn fetch(&mut self, _: u64, _: &mut [u8], _: Instant) -> Result<(), SourceError> {
        Err(SourceError::Disconnected)
    }
}

enum End {
    Complete,
    Exited,
    Stopped,
}

enum Halt {
    Exited,
    Failed(LazyError),
}

impl From<LazyError> for Halt {
    fn from(e: LazyError) -> Self {
        Halt::Failed(e)
    }
}

struct Run {
    uffd: Option<Uffd>,
    pidfd: Arc<OwnedFd>,
    pid: i32,
    table: PageTable,
    source: Box<dyn PageSource>,
    pushes: Receiver<Pushed>,
    push_done: bool,
    opts: PagerOptions,
    shared: Arc<Shared>,
    stats: PagerStats,
    stash: HashMap<u64, Stashed>,
    pending: Vec<u64>,
    started: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Fetch,
    Push,
}

/// Starts the pager of process `pid` on `uffd` (already registered on every
/// carried mapping). `table` says which pages are already in.
pub(crate) fn start(
    uffd: Uffd,
    pidfd: OwnedFd,
    pid: i32,
    table: PageTable,
    link: LazyLink,
    opts: PagerOptions,
) -> std::io::Result<Pager> {
    let shared = Arc::new(Shared {
        pid,
        out: Mutex::new(Outcome::default()),
        done: Condvar::new(),
        finished: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        running: AtomicBool::new(false),
        killed: AtomicBool::new(false),
        fetch_since: Mutex::new(None),
        settled: AtomicU64::new(table.total() - table.missing()),
        total: table.total(),
    });
    let pidfd = Arc::new(pidfd);
    let stats = PagerStats {
        total_pages: table.total(),
        eager_pages: table.total() - table.missing(),
        ..PagerStats::default()
    };
    let run = Run {
        uffd: Some(uffd),
        pidfd: Arc::clone(&pidfd),
        pid,
        table,
        source: link.source,
        pushes: link.pushes,
        push_done: false,
        opts,
        shared: Arc::clone(&shared),
        stats,
        stash: HashMap::new(),
        pending: Vec::new(),
        started: Instant::now(),
    };
    std::thread::Builder::new()
        .name(format!("mk-pager-{pid}"))
        .spawn(move || run.run())?;
    let sh = Arc::clone(&shared);
    std::thread::Builder::new()
        .name(format!("mk-pagewd-{pid}"))
        .spawn(move || watchdog(&sh, &pidfd, opts.fetch_timeout))?;
    Ok(Pager { shared })
}

/// Kills the process when a fetch outlives `timeout`, even if the source
/// never returns.
fn watchdog(sh: &Shared, pidfd: &OwnedFd, timeout: Duration) {
    while !sh.finished.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
        let since = *sh.fetch_since.lock().unwrap_or_else(|e| e.into_inner());
        if since.is_some_and(|t| t.elapsed() > timeout) {
            sh.killed.store(true, Ordering::Release);
            let _ = pidfd_kill(pidfd, libc::SIGKILL);
            sh.finish(Err(sh.lost(SourceError::Timeout(timeout))));
            return;
        }
    }
}

impl Run {
    fn run(mut self) {
        match self.main_loop() {
            Ok(End::Complete) => {
                self.stats.complete_after = Some(self.started.elapsed());
                // Unregisters every range: the process runs without us.
                self.uffd = None;
                // Hang up the request side: the origin knows no more fetches
                // will come.
                self.source = Box::new(Closed);
                self.publish();
                self.shared.finish(Ok(self.stats));
                // Let the origin finish its pushes so it knows every page
                // went; they are not needed here.
                while !self.push_done {
                    match self.pushes.recv_timeout(Duration::from_secs(1)) {
                        Ok(Pushed::Done) | Err(_) => self.push_done = true,
                        Ok(Pushed::Pages { .. }) => {}
                    }
                }
            }
            Ok(End::Exited) | Err(Halt::Exited) => {
                self.stats.process_exited = true;
                self.shared.finish(Ok(self.stats));
            }
            Ok(End::Stopped) => self.shared.finish(Ok(self.stats)),
            Err(Halt::Failed(e)) => {
                let _ = pidfd_kill(&self.pidfd, libc::SIGKILL);
                self.shared.finish(Err(e));
            }
        }
    }

    fn publish(&self) {
        self.shared
            .settled
            .store(self.table.total - self.table.missing, Ordering::Relaxed);
    }

    fn uffd(&self) -> &Uffd {
        // Only taken away after the loop.
        self.uffd
            .as_ref()
            .unwrap_or_else(|| unreachable!("uffd used after completion"))
    }

    fn uerr(&self, op: &'static str, addr: u64, source: Errno) -> Halt {
        if source == Errno::ESRCH {
            return Halt::Exited;
        }
        Halt::Failed(LazyError::Uffd {
            op,
            addr,
            pid: self.pid,
            source,
        })
    }

    fn main_loop(&mut self) -> Result<End, Halt> {
        let mut msgs = Vec::with_capacity(64);
        loop {
            if self.shared.stop.load(Ordering::Acquire)
                || self.shared.killed.load(Ordering::Acquire)
            {
                return Ok(End::Stopped);
            }
            msgs.clear();
            while self
                .uffd()
                .read(&mut msgs)
                .map_err(|e| self.uerr("read", 0, e))?
                == 64
            {}
            let mut faults = Vec::new();
            for m in msgs.drain(..) {
                match m {
                    Msg::Fault { address, .. } => faults.push(address & !(PAGE - 1)),
                    Msg::Fork { ufd } => self.fill_child(ufd)?,
                    Msg::Remap { from, to, len } => self.table.remap(from, to, len),
                    Msg::Remove { start, end } | Msg::Unmap { start, end } => {
                        for o in self.table.forget(start, end) {
                            self.stash.remove(&o);
                            self.stats.gone_pages += 1;
                        }
                    }
                    Msg::Other(_) => {}
                }
            }
            self.retry()?;
            let busy = !faults.is_empty();
            for f in faults {
                self.stats.faults += 1;
                self.serve_fault(f)?;
            }
            if busy {
                self.publish();
                continue;
            }
            if !self.push_done {
                match self.pushes.try_recv() {
                    Ok(Pushed::Pages { addr, data }) => {
                        if !addr.is_multiple_of(PAGE)
                            || data.is_empty()
                            || !(data.len() as u64).is_multiple_of(PAGE)
                        {
                            return Err(Halt::Failed(LazyError::BadPush {
                                addr,
                                len: data.len(),
                                pid: self.pid,
                            }));
                        }
                        self.install(addr, &data, Via::Push)?;
                        self.publish();
                        continue;
                    }
                    Ok(Pushed::Done) => self.push_done = true,
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => {
                        self.push_done = true;
                        if self.table.missing > 0 {
                            return Err(Halt::Failed(self.shared.lost(SourceError::Disconnected)));
                        }
                    }
                }
            }
            if self.table.missing == 0 && self.pending.is_empty() {
                return Ok(End::Complete);
            }
            if self.push_done && self.stash.is_empty() {
                if let Some((o, n)) = self.table.next_missing(self.opts.sweep_batch, &self.stash) {
                    let mut buf = vec![0u8; (n * PAGE) as usize];
                    self.fetch(o, &mut buf)?;
                    self.install(o, &buf, Via::Fetch)?;
                    self.publish();
                    continue;
                }
            }
            // Nothing to do: wait for a fault, the process's end, or (while
            // pushes are due) a short tick to look at the push channel again.
            let wait_ms: u16 = if self.push_done && self.stash.is_empty() && self.pending.is_empty()
            {
                100
            } else {
                1
            };
            let uffd = self.uffd().as_fd();
            let mut fds = [
                PollFd::new(uffd, PollFlags::POLLIN),
                PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::from(wait_ms)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(self.uerr("poll", 0, e)),
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return Ok(End::Exited);
            }
        }
    }

    /// Pages that could not be placed yet, and faults whose answer must be
    /// tried again, after the events just read.
    fn retry(&mut self) -> Result<(), Halt> {
        if !self.stash.is_empty() {
            let keys: Vec<u64> = self.stash.keys().copied().collect();
            for o in keys {
                let Some(mut s) = self.stash.remove(&o) else {
                    continue;
                };
                s.strikes += 1;
                if s.strikes > MAX_STRIKES {
                    self.table.set(o, GONE);
                    self.stats.lost_pages += 1;
                    continue;
                }
                let data = std::mem::take(&mut s.data);
                self.install(o, &data, Via::Fetch)?;
                if let Some(again) = self.stash.get_mut(&o) {
                    again.strikes = s.strikes;
                }
            }
        }
        for cur in std::mem::take(&mut self.pending) {
            self.serve_fault(cur)?;
        }
        Ok(())
    }

    fn fetch(&mut self, o: u64, buf: &mut [u8]) -> Result<(), Halt> {
        let t = Instant::now();
        *self
            .shared
            .fetch_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(t);
        let r = self.source.fetch(o, buf, t + self.opts.fetch_timeout);
        *self
            .shared
            .fetch_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        if self.shared.killed.load(Ordering::Acquire) {
            // The watchdog already killed the process and said why.
            return Err(Halt::Exited);
        }
        r.map_err(|e| Halt::Failed(self.shared.lost(e)))?;
        self.stats.max_fetch = self.stats.max_fetch.max(t.elapsed());
        Ok(())
    }

    fn serve_fault(&mut self, cur: u64) -> Result<(), Halt> {
        let o = self
            .table
            .to_origin(cur)
            .filter(|&o| self.table.state(o) == Some(MISSING));
        let Some(o) = o else {
            // Not carried, gone, or already in: zeros for the first two
            // (as natively), a wake-up for the last (EEXIST).
            return self.zero_or_wake(cur);
        };
        if let Some(s) = self.stash.remove(&o) {
            self.install(o, &s.data, Via::Fetch)?;
        } else {
            let n = self
                .table
                .run_from(o, self.opts.prefetch, &self.stash)
                .max(1);
            let mut buf = vec![0u8; (n * PAGE) as usize];
            self.fetch(o, &mut buf)?;
            self.install(o, &buf, Via::Fetch)?;
        }
        if self.table.state(o) == Some(MISSING) {
            // Its place is changing under an event not read yet: the thread
            // retries the access and faults again (or gets SIGSEGV, as
            // natively, if the range went away).
            let _ = self.uffd().wake(cur, PAGE);
        }
        Ok(())
    }

    /// The process forked (event `ufd`, the child's userfaultfd): the child
    /// lacks every page the process lacked then, and only this pager could
    /// give them. Each is placed in the child (which waits for a page it
    /// touches meanwhile): those already pushed and waiting here (placed
    /// in the process too), those stashed, and the rest fetched from the
    /// origin. Then the descriptor is closed, so the child's memory is its
    /// own (a page it dropped reads as zeros, as natively). A child that
    /// has already exec'd or exited ends the fill.
    fn fill_child(&mut self, ufd: i32) -> Result<(), Halt> {
        if ufd < 0 {
            return Ok(());
        }
        // SAFETY: the kernel installed `ufd` in this process's table for the
        // fork event just read, and nothing else knows of it: it is ours.
        let child = Uffd::from_fd(unsafe { std::os::fd::FromRawFd::from_raw_fd(ufd) });
        let mut lacks: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
        for r in &self.table.ranges {
            for (p, st) in r.st.iter().enumerate() {
                if *st == MISSING {
                    lacks.insert(r.start + p as u64 * PAGE);
                }
            }
        }
        // Places the pages of `data` (origin address `o0`) the child lacks;
        // false once the child's memory is gone.
        let give = |table: &PageTable,
                    lacks: &mut std::collections::BTreeSet<u64>,
                    o0: u64,
                    data: &[u8]| {
            for (k, page) in data.chunks_exact(PAGE as usize).enumerate() {
                let o = o0 + k as u64 * PAGE;
                if !lacks.remove(&o) {
                    continue;
                }
                match child.copy(table.to_current(o), page) {
                    Ok(_) | Err(Errno::EEXIST) => {}
                    // Its memory is gone (exec, exit) or changing: done.
                    Err(_) => return false,
                }
            }
            true
        };
        let before = lacks.len() as u64;
        let stashed: Vec<(u64, Vec<u8>)> = self
            .stash
            .iter()
            .map(|(o, s)| (*o, s.data.clone()))
            .collect();
        for (o, data) in stashed {
            if !give(&self.table, &mut lacks, o, &data) {
                self.stats.child_pages += before - lacks.len() as u64;
                return Ok(());
            }
        }
        // Pushes bring what the child lacks too (and may be all there is:
        // an origin may go once every page is pushed): take them while they
        // come, fetching only what is left after a pause in them.
        while !self.push_done && !lacks.is_empty() {
            match self.pushes.recv_timeout(Duration::from_millis(50)) {
                Ok(Pushed::Pages { addr, data }) => {
                    if !addr.is_multiple_of(PAGE) || !(data.len() as u64).is_multiple_of(PAGE) {
                        return Err(Halt::Failed(LazyError::BadPush {
                            addr,
                            len: data.len(),
                            pid: self.pid,
                        }));
                    }
                    let alive = give(&self.table, &mut lacks, addr, &data);
                    self.install(addr, &data, Via::Push)?;
                    if !alive {
                        self.stats.child_pages += before - lacks.len() as u64;
                        return Ok(());
                    }
                }
                Ok(Pushed::Done) => self.push_done = true,
                Err(RecvTimeoutError::Disconnected) => self.push_done = true,
                Err(RecvTimeoutError::Timeout) => break,
            }
        }
        let mut buf = Vec::new();
        while let Some(&o) = lacks.first() {
            // One run within one mapping (the origin serves no other).
            let end = self
                .table
                .locate(o)
                .map_or(o + PAGE, |(i, _)| self.table.ranges[i].end);
            let n = (0..self.opts.sweep_batch.max(1))
                .take_while(|k| o + k * PAGE < end && lacks.contains(&(o + k * PAGE)))
                .count() as u64;
            buf.resize((n * PAGE) as usize, 0);
            self.fetch(o, &mut buf)?;
            if !give(&self.table, &mut lacks, o, &buf) {
                break;
            }
        }
        self.stats.child_pages += before - lacks.len() as u64;
        Ok(())
    }

    fn zero_or_wake(&mut self, cur: u64) -> Result<(), Halt> {
        match self.uffd().zeropage(cur, PAGE) {
            Ok(_) => {
                self.stats.zero_pages += 1;
                Ok(())
            }
            Err(Errno::EEXIST) | Err(Errno::ENOENT) => {
                let _ = self.uffd().wake(cur, PAGE);
                Ok(())
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                self.pending.push(cur);
                Ok(())
            }
            Err(e) => Err(self.uerr("UFFDIO_ZEROPAGE", cur, e)),
        }
    }

    /// Places the pages of `data` (origin address `o0`) that are still
    /// missing, where they are now.
    fn install(&mut self, o0: u64, data: &[u8], via: Via) -> Result<(), Halt> {
        let pg = PAGE as usize;
        let n = data.len() / pg;
        let page = |k: usize| &data[k * pg..(k + 1) * pg];
        let mut i = 0;
        while i < n {
            let o = o0 + (i * pg) as u64;
            if self.table.state(o) != Some(MISSING) {
                i += 1;
                continue;
            }
            let cur = self.table.to_current(o);
            let zero = super::memory::is_zero(page(i));
            let mut j = i + 1;
            while j < n {
                let oj = o0 + (j * pg) as u64;
                if self.table.state(oj) != Some(MISSING)
                    || self.table.to_current(oj) != cur + ((j - i) * pg) as u64
                    || super::memory::is_zero(page(j)) != zero
                {
                    break;
                }
                j += 1;
            }
            let len = ((j - i) * pg) as u64;
            let r = if zero {
                self.uffd().zeropage(cur, len)
            } else {
                self.uffd().copy(cur, &data[i * pg..j * pg])
            };
            match r {
                Ok(done) => {
                    let k = (done / PAGE) as usize;
                    for q in 0..k {
                        self.table.set(o + (q * pg) as u64, PRESENT);
                    }
                    let k64 = k as u64;
                    match via {
                        Via::Fetch => self.stats.fetched_pages += k64,
                        Via::Push => self.stats.pushed_pages += k64,
                    }
                    if zero {
                        self.stats.zero_pages += k64;
                    }
                    // A short count: the next page fails; ask again from it
                    // to learn why.
                    i += k.max(if done == 0 { 1 } else { 0 });
                    if done == 0 {
                        // Nothing placed and no error: give it another go
                        // later rather than spin.
                        self.stash_page(o, page(i - 1));
                    }
                }
                Err(Errno::EEXIST) => {
                    // Placed by the other path (fault vs push) meanwhile.
                    self.table.set(o, PRESENT);
                    let _ = self.uffd().wake(cur, PAGE);
                    i += 1;
                }
                Err(Errno::ENOENT) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                    // Its range is being moved or unmapped (event not read
                    // yet) or the mm is changing: keep it for a retry.
                    self.stash_page(o, page(i));
                    i += 1;
                }
                Err(e) => {
                    return Err(self.uerr(
                        if zero {
                            "UFFDIO_ZEROPAGE"
                        } else {
                            "UFFDIO_COPY"
                        },
                        cur,
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    fn stash_page(&mut self, o: u64, data: &[u8]) {
        self.stash.entry(o).or_insert_with(|| Stashed {
            data: data.to_vec(),
            strikes: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::image::MappingKind;
    use super::*;

    fn m(start: u64, end: u64, prot: u8) -> Mapping {
        Mapping {
            start,
            end,
            prot,
            flags: 0,
            kind: MappingKind::Anon,
            offset: 0,
            resident: 0,
            name: String::new(),
        }
    }

    #[test]
    fn table_counts_and_skips_prot_none() {
        let mut t = PageTable::new(&[m(0x10000, 0x14000, 3), m(0x20000, 0x30000, 0)]);
        assert_eq!((t.total(), t.missing()), (4, 4));
        t.mark_present(0x11000, 2);
        assert_eq!(t.missing(), 2);
        assert_eq!(t.state(0x20000), None, "PROT_NONE is not carried");
        assert_eq!(t.next_missing(16, &HashMap::new()), Some((0x10000, 1)));
        t.set(0x10000, PRESENT);
        assert_eq!(t.next_missing(16, &HashMap::new()), Some((0x13000, 1)));
    }

    #[test]
    fn moves_translate_both_ways() {
        let mut t = PageTable::new(&[m(0x100000, 0x110000, 3), m(0x200000, 0x204000, 3)]);
        // mremap 0x100000+64K -> 0x500000, then the second range into the
        // first's old place.
        t.remap(0x100000, 0x500000, 0x10000);
        t.remap(0x200000, 0x100000, 0x4000);
        assert_eq!(t.to_current(0x103000), 0x503000);
        assert_eq!(t.to_origin(0x503000), Some(0x103000));
        assert_eq!(t.to_current(0x201000), 0x101000);
        assert_eq!(t.to_origin(0x101000), Some(0x201000));
        // The second range's old place now holds nothing of the origin's.
        assert_eq!(t.to_origin(0x201000), None);
        // Part of the first range's old place that nothing moved into.
        assert_eq!(t.to_origin(0x108000), None);
        // Unmapping the moved first range forgets its missing pages.
        let gone = t.forget(0x500000, 0x502000);
        assert_eq!(gone, vec![0x100000, 0x101000]);
        assert_eq!(t.missing(), 20 - 2);
        assert_eq!(t.state(0x100000), Some(GONE));
    }

    #[test]
    fn runs_stop_at_present_and_stashed_pages() {
        let mut t = PageTable::new(&[m(0x10000, 0x20000, 3)]);
        t.mark_present(0x14000, 1);
        let mut skip = HashMap::new();
        assert_eq!(t.run_from(0x10000, 16, &skip), 4);
        skip.insert(
            0x12000,
            Stashed {
                data: Vec::new(),
                strikes: 0,
            },
        );
        assert_eq!(t.run_from(0x10000, 16, &skip), 2);
        assert_eq!(t.run_from(0x15000, 3, &skip), 3);
        assert_eq!(t.run_from(0x30000, 3, &skip), 0);
    }
}
