//! The host's side of the shared window: the file every QEMU maps as its
//! ivshmem BAR, formatted by the daemon, with the host's agent attached as
//! endpoint 0 and one link per instance.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mknode::agent::Agent;
use mknode::link::RingLink;
use shmem_ring::{Endpoint, Layout, PeerState, Window};

/// How often the host beats (peers call it silent after 200 ms).
const BEAT: Duration = Duration::from_millis(50);

/// The formatted window, endpoint 0 and the host agent's links.
#[derive(Debug)]
pub struct HostWindow {
    pub agent: Arc<Agent>,
    endpoint: Endpoint,
    endpoints: u16,
    stop: Arc<AtomicBool>,
}

impl HostWindow {
    /// Creates (or re-creates) the window file with room for endpoints
    /// `0..endpoints`, attaches as endpoint 0 and links `agent` to every
    /// other endpoint.
    pub fn create(
        path: &Path,
        size: u64,
        endpoints: u16,
        agent: Arc<Agent>,
    ) -> Result<HostWindow, String> {
        // The file must be exactly `size` bytes (QEMU checks the backing
        // store against the BAR size); the layout fills what it needs of it.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        file.set_len(size)
            .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
        drop(file);
        let layout = Layout::for_size(size, endpoints).map_err(|e| crate::error_chain(&e))?;
        let window =
            Window::format_at(path, 0, size, layout).map_err(|e| crate::error_chain(&e))?;
        let endpoint = window.attach(0).map_err(|e| crate::error_chain(&e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let beat = endpoint.heartbeat_handle();
        let st = Arc::clone(&stop);
        thread::Builder::new()
            .name("window-heartbeat".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    if beat.beat().is_err() {
                        eprintln!(
                            "mkctl daemon: endpoint 0 was attached elsewhere; heartbeat stops"
                        );
                        return;
                    }
                    thread::sleep(BEAT);
                }
            })
            .map_err(|e| e.to_string())?;
        for peer in 1..endpoints {
            let link = RingLink::open(&endpoint, peer).map_err(|e| crate::error_chain(&e))?;
            agent.add_link(peer, Arc::new(link));
        }
        Ok(HostWindow {
            agent,
            endpoint,
            endpoints,
            stop,
        })
    }

    /// Number of endpoints (ids `0..endpoints()`).
    pub fn endpoints(&self) -> u16 {
        self.endpoints
    }

    /// Empties the channel to `id` before its kernel (re)boots, so nothing
    /// a previous incarnation left behind is delivered to the new one.
    /// Waits up to 3 s for a previous incarnation to be seen dead.
    pub fn reset(&self, id: u16) -> Result<(), String> {
        self.agent.remove_link(id);
        let deadline = Instant::now() + Duration::from_secs(3);
        let result = loop {
            match self.endpoint.reset_channel(id) {
                Ok(_) => break Ok(()),
                Err(shmem_ring::Error::PeerAlive { .. }) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => break Err(crate::error_chain(&e)),
            }
        };
        // Whatever happened, the instance gets a link again.
        let link = RingLink::open(&self.endpoint, id).map_err(|e| crate::error_chain(&e))?;
        self.agent.add_link(id, Arc::new(link));
        result
    }

    fn state(&self, id: u16) -> Option<shmem_ring::PeerStatus> {
        self.endpoint.peer(id).ok()
    }

    /// True when `id` is attached and beating.
    pub fn peer_alive(&self, id: u16) -> bool {
        self.state(id).is_some_and(|s| s.state == PeerState::Alive)
    }

    /// How long `id` has been still, when it is attached but dead.
    pub fn peer_dead(&self, id: u16) -> Option<Duration> {
        self.state(id)
            .filter(|s| s.state == PeerState::Dead)
            .map(|s| s.quiet)
    }

    /// How long since `id`'s heartbeat moved, while it is attached.
    pub fn heartbeat_age(&self, id: u16) -> Option<Duration> {
        self.state(id)
            .filter(|s| {
                matches!(
                    s.state,
                    PeerState::Alive | PeerState::Silent | PeerState::Dead
                )
            })
            .map(|s| s.quiet)
    }
}

impl Drop for HostWindow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.agent.shutdown();
    }
}
