//! Lazy (post-copy) migration: which pages go with the image, the origin's
//! page server, and the page transport the two sides talk through.
//!
//! ```text
//! origin                                          destination
//! freeze(pid) -> Frozen
//! frozen.write_lazy_image(w, LazyOptions)  ─ image (state + eager pages) ─▶
//!   -> (ImageStats, PageServer)                   restore_lazy(r, stdio, LazyLink, PagerOptions)
//!                                                   -> LazyRestored { restored, pager }  (running)
//! PageServer::read(addr, n)      ◀─ fetch ──────  PageSource::fetch   (fault handler, on demand)
//! PageServer::next_push(n)       ── Pushed ─────▶ LazyLink::pushes    (background)
//! server.wait_all_sent(t); frozen.kill()          pager.wait() -> PagerStats (all pages in)
//! ```
//!
//! The transport is abstract: the destination sees a [`PageSource`] (ask for
//! pages, wait for them) and a channel of [`Pushed`] runs; the origin answers
//! from a [`PageServer`]. [`channel_link`] joins the two in one process
//! (tests, bench); the agents put their ring under the same two ends.
//!
//! This module must not touch the restored process: that is `pager.rs`.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use nix::unistd::Pid;

use super::image::{ImageMeta, Mapping, MAX_RUN_PAGES, PAGE};

/// Which pages travel with a lazy image; all others are served later.
/// Counts are pages, taken around each thread's registers and clipped to
/// the mapping they fall in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LazyOptions {
    /// Pages at and above `rsp`: the live frames (the stack grows down).
    pub stack_above: u64,
    /// Pages below `rsp`: the red zone, the next calls and a signal frame.
    pub stack_below: u64,
    /// Pages either side of `rip` (text is carried as private memory).
    pub text_around: u64,
    /// Pages either side of the TLS base (`fs_base`), the thread's
    /// `clear_child_tid`, rseq area and robust list head (glibc keeps them
    /// in `struct pthread`, which restore itself touches).
    pub tls_around: u64,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            stack_above: 16,
            stack_below: 4,
            text_around: 4,
            tls_around: 2,
        }
    }
}

/// Whether a mapping's pages are carried at all (lazily or not): the kernel's
/// own mappings are not, `PROT_NONE` ones are recreated empty, and DSM
/// memory comes through the DSM.
pub(crate) fn carried(m: &Mapping) -> bool {
    !m.kind.is_special() && m.prot != 0 && m.flags & super::image::MAPF_DSM == 0
}

/// The page ranges `[start, end)` that go eagerly, sorted, merged, each
/// inside one carried mapping.
pub(crate) fn eager_ranges(meta: &ImageMeta, o: &LazyOptions) -> Vec<(u64, u64)> {
    let page = |a: u64| a & !(PAGE - 1);
    let mut want: Vec<(u64, u64)> = Vec::new();
    let mut around = |a: u64, below: u64, above: u64| {
        if a == 0 {
            return;
        }
        let p = page(a);
        want.push((
            p.saturating_sub(below * PAGE),
            p.saturating_add((above + 1) * PAGE),
        ));
    };
    for t in &meta.threads {
        let rsp = t.regs[19];
        let rip = t.regs[16];
        let fs = t.regs[21];
        around(rsp, o.stack_below, o.stack_above);
        around(rip, o.text_around, o.text_around);
        around(fs, o.tls_around, o.tls_around);
        around(t.clear_child_tid, 0, 0);
        around(t.rseq.abi_pointer, 0, 0);
        around(t.robust_list, 0, 0);
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in want {
        for m in meta.mappings.iter().filter(|m| carried(m)) {
            let (a, b) = (s.max(m.start), e.min(m.end));
            if a < b {
                out.push((a, b));
            }
        }
    }
    out.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
    for (s, e) in out {
        match merged.last_mut() {
            // Only within one mapping: adjacent mappings stay separate runs.
            Some(l) if s <= l.1 && same_mapping(meta, l.0, s) => l.1 = l.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

fn same_mapping(meta: &ImageMeta, a: u64, b: u64) -> bool {
    meta.mappings
        .iter()
        .any(|m| m.start <= a && a < m.end && m.start <= b && b < m.end)
}

// ---------------------------------------------------------------- origin

/// Why the origin could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("request for {npages} pages at {addr:#x}: not inside one lazily carried mapping")]
    NotLazy { addr: u64, npages: u64 },
    #[error("the original process {pid} is no longer frozen (resumed or killed)")]
    Released { pid: i32 },
    #[error("reading pages of process {pid} at {addr:#x}")]
    Read {
        pid: i32,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
}

/// How far the origin is: pages sent (eager ones included) out of all
/// carried pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub sent: u64,
    pub total: u64,
}

impl Progress {
    pub fn all_sent(&self) -> bool {
        self.sent == self.total
    }
}

struct ServerState {
    /// Per carried mapping, one flag per page: sent yet.
    sent: Vec<Vec<bool>>,
    nsent: u64,
    /// Where the next push starts: (mapping, page).
    cursor: (usize, usize),
}

struct ServerInner {
    pid: Pid,
    /// Cleared by `Frozen` when it lets the original go (resume or kill):
    /// from then on its memory is no longer the image's.
    frozen: Arc<AtomicBool>,
    maps: Vec<Mapping>,
    total: u64,
    st: Mutex<ServerState>,
    all_sent: Condvar,
}

/// The origin's side of lazy pages: answers page requests and hands out
/// background pushes from the frozen original's memory
/// (`process_vm_readv`), and tracks which pages have been sent. Cheap to
/// clone and `Send`: the request loop and the push loop may run on other
/// threads than the one that holds the [`super::Frozen`].
#[derive(Clone)]
pub struct PageServer {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("pid", &self.inner.pid)
            .field("progress", &self.progress())
            .finish()
    }
}

/// One run of pages of a background push (or an answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub addr: u64,
    pub npages: u64,
}

impl PageServer {
    /// `eager`: the ranges the image carried (already sent).
    pub(crate) fn new(
        pid: Pid,
        frozen: Arc<AtomicBool>,
        meta: &ImageMeta,
        eager: &[(u64, u64)],
    ) -> Self {
        let maps: Vec<Mapping> = meta
            .mappings
            .iter()
            .filter(|m| carried(m))
            .cloned()
            .collect();
        let mut sent: Vec<Vec<bool>> = maps
            .iter()
            .map(|m| vec![false; (m.len() / PAGE) as usize])
            .collect();
        let mut nsent = 0;
        for &(s, e) in eager {
            if let Some(i) = maps.iter().position(|m| m.start <= s && e <= m.end) {
                for p in ((s - maps[i].start) / PAGE)..((e - maps[i].start) / PAGE) {
                    if !sent[i][p as usize] {
                        sent[i][p as usize] = true;
                        nsent += 1;
                    }
                }
            }
        }
        let total = maps.iter().map(|m| m.len() / PAGE).sum();
        PageServer {
            inner: Arc::new(ServerInner {
                pid,
                frozen,
                maps,
                total,
                st: Mutex::new(ServerState {
                    sent,
                    nsent,
                    cursor: (0, 0),
                }),
                all_sent: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.inner.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The original's pid.
    pub fn pid(&self) -> i32 {
        self.inner.pid.as_raw()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            sent: self.lock().nsent,
            total: self.inner.total,
        }
    }

    /// Blocks until every page has been sent (pushed, fetched or eager) or
    /// `timeout` passed; true when all have. Then the caller lets the
    /// original go (`Frozen::kill`).
    pub fn wait_all_sent(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut st = self.lock();
        while st.nsent < self.inner.total {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .inner
                .all_sent
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The mapping index holding the run, checked (the request comes from
    /// another kernel).
    fn mapping_of(&self, addr: u64, npages: u64) -> Result<usize, ServeError> {
        let bad = ServeError::NotLazy { addr, npages };
        if !addr.is_multiple_of(PAGE) || npages == 0 || npages > u64::from(MAX_RUN_PAGES) {
            return Err(bad);
        }
        let end = addr
            .checked_add(npages * PAGE)
            .ok_or(ServeError::NotLazy { addr, npages })?;
        self.inner
            .maps
            .iter()
            .position(|m| m.start <= addr && end <= m.end)
            .ok_or(bad)
    }

    fn mark(&self, i: usize, addr: u64, npages: u64) {
        let m = &self.inner.maps[i];
        let mut st = self.lock();
        let first = ((addr - m.start) / PAGE) as usize;
        let mut newly = 0;
        for f in &mut st.sent[i][first..first + npages as usize] {
            if !*f {
                *f = true;
                newly += 1;
            }
        }
        st.nsent += newly;
        if st.nsent == self.inner.total {
            self.inner.all_sent.notify_all();
        }
    }

    fn read_into(&self, i: usize, addr: u64, out: &mut [u8]) -> Result<(), ServeError> {
        let pid = self.inner.pid.as_raw();
        if !self.inner.frozen.load(Ordering::Acquire) {
            return Err(ServeError::Released { pid });
        }
        // `/proc/pid/mem` is opened only for pages process_vm_readv refuses
        // (execute-only): rare, so per call, and the fetch and push loops
        // never wait on each other here.
        let mut mem: Option<File> = None;
        super::memory::read_pages(self.inner.pid, &mut mem, &self.inner.maps[i], addr, out)
            .map_err(|source| ServeError::Read { pid, addr, source })?;
        // Read while it was frozen? Otherwise the bytes may be torn.
        if !self.inner.frozen.load(Ordering::Acquire) {
            return Err(ServeError::Released { pid });
        }
        Ok(())
    }

    /// A demand fetch: fills `out` (`npages` pages) with the pages at `addr`
    /// and counts them as sent. Any carried page may be asked for, again
    /// too (a lost answer); anything else is refused.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), ServeError> {
        let npages = out.len() as u64 / PAGE;
        if out.len() as u64 != npages * PAGE {
            return Err(ServeError::NotLazy { addr, npages });
        }
        let i = self.mapping_of(addr, npages)?;
        self.read_into(i, addr, out)?;
        self.mark(i, addr, npages);
        Ok(())
    }

    /// The next background push: up to `max_pages` consecutive unsent pages
    /// in ascending address order, read into `out` and counted as sent;
    /// `None` when every page has been sent.
    pub fn next_push(
        &self,
        max_pages: u64,
        out: &mut Vec<u8>,
    ) -> Result<Option<PageRun>, ServeError> {
        let max = max_pages.clamp(1, u64::from(MAX_RUN_PAGES)) as usize;
        let (i, run) = {
            let mut st = self.lock();
            let (mut mi, mut pi) = st.cursor;
            loop {
                let Some(flags) = st.sent.get(mi) else {
                    st.cursor = (mi, 0);
                    return Ok(None);
                };
                match flags[pi..].iter().position(|f| !f) {
                    Some(k) => {
                        pi += k;
                        break;
                    }
                    None => {
                        mi += 1;
                        pi = 0;
                    }
                }
            }
            let flags = &st.sent[mi];
            let n = flags[pi..].iter().take(max).take_while(|f| !**f).count();
            st.cursor = (mi, pi + n);
            let addr = self.inner.maps[mi].start + pi as u64 * PAGE;
            (
                mi,
                PageRun {
                    addr,
                    npages: n as u64,
                },
            )
        };
        out.resize((run.npages * PAGE) as usize, 0);
        self.read_into(i, run.addr, out)?;
        self.mark(i, run.addr, run.npages);
        Ok(Some(run))
    }
}

// ---------------------------------------------------------------- transport

/// Why the destination could not get pages.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("no answer from the origin within {:.1} s", .0.as_secs_f64())]
    Timeout(Duration),
    #[error("the link to the origin is closed")]
    Disconnected,
    #[error("the origin refused the request: {0}")]
    Refused(String),
    /// The origin's kernel went down (how, in words).
    #[error("{0}")]
    Lost(String),
}

/// The destination's way to ask the origin for pages. Addresses are the
/// origin's (the image's); `out` is whole pages.
pub trait PageSource: Send {
    /// Fills `out` with the pages at `addr`, returning by `deadline` (the
    /// pager also kills the process itself if a fetch outlives it).
    fn fetch(&mut self, addr: u64, out: &mut [u8], deadline: Instant) -> Result<(), SourceError>;
}

/// What the origin pushes in the background.
#[derive(Debug)]
pub enum Pushed {
    /// Whole pages starting at `addr` (origin address).
    Pages { addr: u64, data: Vec<u8> },
    /// Every page has been sent; nothing more will come.
    Done,
}

/// The destination's end of a lazy migration's page transport.
pub struct LazyLink {
    pub source: Box<dyn PageSource>,
    pub pushes: Receiver<Pushed>,
}

impl std::fmt::Debug for LazyLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLink")
            .field("pushes_queued", &self.pushes.len())
            .finish()
    }
}

/// How the origin's background push runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushPolicy {
    /// Push at all (off: pages move only when the destination asks).
    pub enabled: bool,
    /// Pages per push message.
    pub batch_pages: u64,
    /// Pause after each message (0: as fast as the link takes them).
    pub pause: Duration,
}

impl Default for PushPolicy {
    fn default() -> Self {
        PushPolicy {
            enabled: true,
            batch_pages: 128,
            pause: Duration::ZERO,
        }
    }
}

struct Request {
    id: u64,
    addr: u64,
    npages: u64,
}

type Answer = (u64, Result<Vec<u8>, SourceError>);

/// [`PageSource`] over in-process channels (see [`channel_link`]).
struct ChannelSource {
    next_id: u64,
    req: Sender<Request>,
    ans: Receiver<Answer>,
}

impl PageSource for ChannelSource {
    fn fetch(&mut self, addr: u64, out: &mut [u8], deadline: Instant) -> Result<(), SourceError> {
        self.next_id += 1;
        let id = self.next_id;
        let npages = out.len() as u64 / PAGE;
        self.req
            .send_deadline(Request { id, addr, npages }, deadline)
            .map_err(|e| match e {
                crossbeam_channel::SendTimeoutError::Timeout(_) => {
                    SourceError::Timeout(deadline.saturating_duration_since(Instant::now()))
                }
                crossbeam_channel::SendTimeoutError::Disconnected(_) => SourceError::Disconnected,
            })?;
        loop {
            match self.ans.recv_deadline(deadline) {
                // A late answer to an earlier request that timed out.
                Ok((got, _)) if got != id => continue,
                Ok((_, Ok(data))) if data.len() == out.len() => {
                    out.copy_from_slice(&data);
                    return Ok(());
                }
                Ok((_, Ok(data))) => {
                    return Err(SourceError::Refused(format!(
                        "answer of {} bytes for {} asked",
                        data.len(),
                        out.len()
                    )))
                }
                Ok((_, Err(e))) => return Err(e),
                Err(RecvTimeoutError::Timeout) => return Err(SourceError::Timeout(Duration::ZERO)),
                Err(RecvTimeoutError::Disconnected) => return Err(SourceError::Disconnected),
            }
        }
    }
}

/// The origin's loops of an in-process link: one answers requests, one
/// pushes. [`OriginLoops::stop`] is the origin going away mid-transfer.
#[derive(Debug)]
pub struct OriginLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl OriginLoops {
    /// Stops both loops and closes the link, as if the origin died: the
    /// destination sees its channels disconnect.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for OriginLoops {
    fn drop(&mut self) {
        // Leave them serving: the destination may still need pages. They end
        // when the destination hangs up.
        for t in self.threads.drain(..) {
            drop(t);
        }
    }
}

/// Joins a [`PageServer`] to a destination in this process: returns the
/// destination's [`LazyLink`] and the origin's loops (two threads).
pub fn channel_link(
    server: PageServer,
    push: PushPolicy,
) -> std::io::Result<(LazyLink, OriginLoops)> {
    let (req_tx, req_rx) = bounded::<Request>(1);
    let (ans_tx, ans_rx) = bounded::<Answer>(1);
    let (push_tx, push_rx) = bounded::<Pushed>(4);
    let stop = Arc::new(AtomicBool::new(false));
    let tick = Duration::from_millis(50);

    // Set when the destination stops asking; ends an idle (push-disabled)
    // pusher. A pushing one runs on to `Done` so that every page counts as
    // sent and the original can be let go.
    let hung_up = Arc::new(AtomicBool::new(false));
    let s = server.clone();
    let st = Arc::clone(&stop);
    let hung = Arc::clone(&hung_up);
    let answer = std::thread::Builder::new()
        .name("mk-page-serve".into())
        .spawn(move || {
            let mut buf = Vec::new();
            while !st.load(Ordering::Acquire) {
                let r = match req_rx.recv_timeout(tick) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        // The destination hung up (done, or gone).
                        hung.store(true, Ordering::Release);
                        return;
                    }
                };
                let Some(len) = r
                    .npages
                    .checked_mul(PAGE)
                    .filter(|&l| l <= u64::from(MAX_RUN_PAGES) * PAGE)
                else {
                    let _ = ans_tx.send((
                        r.id,
                        Err(SourceError::Refused(format!("{} pages", r.npages))),
                    ));
                    continue;
                };
                buf.resize(len as usize, 0);
                let a = match s.read(r.addr, &mut buf) {
                    Ok(()) => Ok(std::mem::take(&mut buf)),
                    Err(e) => Err(SourceError::Refused(e.to_string())),
                };
                if ans_tx.send((r.id, a)).is_err() {
                    hung.store(true, Ordering::Release);
                    return;
                }
            }
        })?;
    let st = Arc::clone(&stop);
    let pusher = std::thread::Builder::new()
        .name("mk-page-push".into())
        .spawn(move || {
            if !push.enabled {
                // Hold the channel open (no `Done`): pages move on demand.
                while !st.load(Ordering::Acquire) && !hung_up.load(Ordering::Acquire) {
                    std::thread::sleep(tick);
                }
                return;
            }
            loop {
                if st.load(Ordering::Acquire) {
                    return;
                }
                let mut data = Vec::new();
                let msg = match server.next_push(push.batch_pages, &mut data) {
                    Ok(Some(run)) => Pushed::Pages {
                        addr: run.addr,
                        data,
                    },
                    Ok(None) => Pushed::Done,
                    // The original is gone: the link goes down with it.
                    Err(_) => return,
                };
                let done = matches!(msg, Pushed::Done);
                let mut msg = Some(msg);
                while let Some(m) = msg.take() {
                    match push_tx.send_timeout(m, tick) {
                        Ok(()) => {}
                        Err(crossbeam_channel::SendTimeoutError::Timeout(m)) => {
                            if st.load(Ordering::Acquire) {
                                return;
                            }
                            msg = Some(m);
                        }
                        Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return,
                    }
                }
                if done {
                    return;
                }
                if !push.pause.is_zero() {
                    std::thread::sleep(push.pause);
                }
            }
        })?;
    Ok((
        LazyLink {
            source: Box::new(ChannelSource {
                next_id: 0,
                req: req_tx,
                ans: ans_rx,
            }),
            pushes: push_rx,
        },
        OriginLoops {
            stop,
            threads: vec![answer, pusher],
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::super::image::{tests::sample, MappingKind, PROT_R, PROT_W, PROT_X};
    use super::*;

    fn map(start: u64, pages: u64, prot: u8, kind: MappingKind) -> Mapping {
        crate::migrate::image::tests::mapping(start, start + pages * PAGE, prot, kind)
    }

    #[test]
    fn eager_set_is_around_registers_clipped_and_merged() {
        let (mut meta, _, _) = sample(0, 0);
        let text = 0x40_0000;
        let heap = 0x100_0000;
        let guard = 0x7f00_0000_0000;
        let stack = guard + 16 * PAGE;
        meta.mappings = vec![
            map(text, 64, PROT_R | PROT_X, MappingKind::File),
            map(heap, 1024, PROT_R | PROT_W, MappingKind::Heap),
            map(guard, 16, 0, MappingKind::Anon),
            map(stack, 64, PROT_R | PROT_W, MappingKind::Anon),
            map(0x7fff_0000_0000, 2, PROT_R | PROT_X, MappingKind::Vdso),
        ];
        let t = &mut meta.threads[0];
        t.regs = [0; 27];
        t.regs[16] = text + 2 * PAGE + 0x10; // rip near the start of text
        t.regs[19] = stack + 2 * PAGE + 8; // rsp near the guard
        t.regs[21] = heap + 100 * PAGE + 0x700; // fs_base
        t.clear_child_tid = heap + 101 * PAGE + 0x10; // inside the TLS window
        t.rseq.abi_pointer = heap + 500 * PAGE;
        t.robust_list = 0;
        meta.threads.truncate(1);
        let o = LazyOptions::default();
        let r = eager_ranges(&meta, &o);
        assert_eq!(
            r,
            vec![
                // rip ± 4, clipped at the start of text
                (text, text + 7 * PAGE),
                // fs ± 2 (clear_child_tid inside it)
                (heap + 98 * PAGE, heap + 103 * PAGE),
                // the rseq page
                (heap + 500 * PAGE, heap + 501 * PAGE),
                // rsp - 4 .. rsp + 16: clipped at the PROT_NONE guard
                (stack, stack + 19 * PAGE),
            ]
        );
        let bytes: u64 = r.iter().map(|(s, e)| e - s).sum();
        assert!(bytes <= 32 * PAGE);
    }
}
