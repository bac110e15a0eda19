//! The host's side of the shared window: the file every QEMU maps as its
//! ivshmem BAR, formatted by the daemon, with the host's agent attached as
//! endpoint 0 and one link per instance, and the doorbell relay that wakes
//! sleeping receivers across kernels ([`super::doorbell`]).
//!
//! On a multikernel host (kexec instances) the window is a range of
//! physical memory in the pool instead, mapped from `/dev/mem`
//! ([`HostWindow::create_phys`]): the spawned kernels map the same range
//! (`mk.window=`). No doorbell reaches a spawned kernel there (it has no
//! virtio-serial port), so the relay is off and every receiver polls.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mknode::agent::Agent;
use mknode::link::RingLink;
use shmem_ring::{Endpoint, Layout, Liveness, PeerState, Window};

use super::doorbell::Relay;

/// How often the host beats (peers call it silent after 200 ms).
const BEAT: Duration = Duration::from_millis(50);

/// The window could not be made, or a channel in it reset.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("cannot create the window {}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lay out the window {}", path.display())]
    Ring {
        path: std::path::PathBuf,
        #[source]
        source: shmem_ring::Error,
    },
    #[error("cannot start the heartbeat thread")]
    Thread(#[source] std::io::Error),
    #[error("channel to endpoint {id}")]
    Channel {
        id: u16,
        #[source]
        source: shmem_ring::Error,
    },
}

/// The formatted window, endpoint 0 and the host agent's links.
#[derive(Debug)]
pub struct HostWindow {
    pub agent: Arc<Agent>,
    endpoint: Endpoint,
    /// `None` when the doorbell is off (`MKCTL_DOORBELL=off`).
    relay: Option<Relay>,
    endpoints: u16,
    stop: Arc<AtomicBool>,
    /// Where the window lives, for people: the file, or `/dev/mem at 0x…`.
    place: String,
    /// The physical range on a multikernel host (`None`: a file).
    phys: Option<(u64, u64)>,
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
    ) -> Result<HostWindow, WindowError> {
        // The file must be exactly `size` bytes (QEMU checks the backing
        // store against the BAR size); the layout fills what it needs of it.
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .and_then(|f| f.set_len(size))
            .map_err(|source| WindowError::File {
                path: path.into(),
                source,
            })?;
        let ring = |source| WindowError::Ring {
            path: path.into(),
            source,
        };
        let layout = Layout::for_size(size, endpoints).map_err(ring)?;
        let window = Window::format_at(path, 0, size, layout).map_err(ring)?;
        HostWindow::attach(window, agent, super::doorbell::enabled(), None)
    }

    /// Formats `size` bytes of physical memory at `phys` through `dev_mem`
    /// (`/dev/mem`) for endpoints `0..endpoints`, attaches as endpoint 0
    /// and links `agent` to every other endpoint. The relay is off: the
    /// kernels on the other side have no doorbell port, so receivers poll.
    pub fn create_phys(
        dev_mem: &Path,
        phys: u64,
        size: u64,
        endpoints: u16,
        agent: Arc<Agent>,
    ) -> Result<HostWindow, WindowError> {
        let ring = |source| WindowError::Ring {
            path: dev_mem.into(),
            source,
        };
        let layout = Layout::for_size(size, endpoints).map_err(ring)?;
        let window = Window::format_at(dev_mem, phys, size, layout).map_err(ring)?;
        HostWindow::attach(window, agent, false, Some((phys, size)))
    }

    /// Opens the window an earlier daemon formatted (its guests still
    /// attached to it) and takes endpoint 0 over: the channels go on from
    /// the positions left in the window, and the guests' links, which
    /// outlive a peer's restart, carry on with this agent.
    pub fn adopt(path: &Path, agent: Arc<Agent>) -> Result<HostWindow, WindowError> {
        let window = Window::open(path).map_err(|source| WindowError::Ring {
            path: path.into(),
            source,
        })?;
        HostWindow::attach(window, agent, super::doorbell::enabled(), None)
    }

    /// [`HostWindow::adopt`] of a `/dev/mem` window: `size` bytes at
    /// `phys` through `dev_mem`, formatted by an earlier daemon, whose
    /// kexec instances' agents are still attached to it.
    pub fn adopt_phys(
        dev_mem: &Path,
        phys: u64,
        size: u64,
        agent: Arc<Agent>,
    ) -> Result<HostWindow, WindowError> {
        let window = Window::open_at(dev_mem, phys, size).map_err(|source| WindowError::Ring {
            path: dev_mem.into(),
            source,
        })?;
        HostWindow::attach(window, agent, false, Some((phys, size)))
    }

    /// Attaches as endpoint 0 of `window`, beats, and links `agent` to every
    /// other endpoint; with `doorbell`, through the relay. `phys` is the
    /// physical range of a `/dev/mem` window.
    fn attach(
        window: Window,
        agent: Arc<Agent>,
        doorbell: bool,
        phys: Option<(u64, u64)>,
    ) -> Result<HostWindow, WindowError> {
        let path = window.path().to_path_buf();
        let place = match phys {
            Some((base, size)) => format!("{} at 0x{base:x} ({} MiB)", path.display(), size >> 20),
            None => path.display().to_string(),
        };
        let ring = |source| WindowError::Ring {
            path: path.clone(),
            source,
        };
        let endpoints = window.layout().endpoints();
        // Every peer of the daemon's endpoint is a guest, which no futex
        // reaches: the relay carries the rings over each guest's doorbell
        // port. Without it (MKCTL_DOORBELL=off) the receivers poll.
        let relay = doorbell.then(|| Relay::new(window.clone()));
        let endpoint = window
            .attach_with_doorbell(0, Liveness::default(), relay.as_ref().map(Relay::host_bell))
            .map_err(ring)?;
        // Answers to an earlier daemon's requests may still be on their way
        // from the guests: this one numbers its requests where that one's
        // cannot be (each attach of endpoint 0 has its own generation).
        agent.number_requests_from(request_base(endpoint.generation()));
        let stop = Arc::new(AtomicBool::new(false));
        let beat = endpoint.heartbeat_handle();
        let st = Arc::clone(&stop);
        thread::Builder::new()
            .name("window-heartbeat".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    if beat.beat().is_err() {
                        log::error!("endpoint 0 was attached elsewhere; heartbeat stops");
                        return;
                    }
                    thread::sleep(BEAT);
                }
            })
            .map_err(WindowError::Thread)?;
        for peer in 1..endpoints {
            let link = RingLink::open(&endpoint, peer)
                .map_err(|source| WindowError::Channel { id: peer, source })?;
            agent.add_link(peer, Arc::new(link));
        }
        Ok(HostWindow {
            agent,
            endpoint,
            relay,
            endpoints,
            stop,
            place,
            phys,
        })
    }

    /// Where the window lives, for people.
    pub fn place(&self) -> &str {
        &self.place
    }

    /// The physical range (base, size) of a `/dev/mem` window.
    pub fn phys(&self) -> Option<(u64, u64)> {
        self.phys
    }

    /// Number of endpoints (ids `0..endpoints()`).
    pub fn endpoints(&self) -> u16 {
        self.endpoints
    }

    /// Empties the channel to `id` before its kernel (re)boots, so nothing
    /// a previous incarnation left behind is delivered to the new one.
    /// Waits up to 3 s for a previous incarnation to be seen dead.
    pub fn reset(&self, id: u16) -> Result<(), WindowError> {
        self.agent.remove_link(id);
        let deadline = Instant::now() + Duration::from_secs(3);
        let result = loop {
            match self.endpoint.reset_channel(id) {
                Ok(_) => break Ok(()),
                Err(shmem_ring::Error::PeerAlive { .. }) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(source) => break Err(WindowError::Channel { id, source }),
            }
        };
        // Whatever happened, the instance gets a link again.
        let link = RingLink::open(&self.endpoint, id)
            .map_err(|source| WindowError::Channel { id, source })?;
        self.agent.add_link(id, Arc::new(link));
        result
    }

    /// The doorbell relay, unless it is off (`MKCTL_DOORBELL=off`): then
    /// machines get no doorbell port and every receiver polls.
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    fn state(&self, id: u16) -> Option<shmem_ring::PeerStatus> {
        self.endpoint.peer(id).ok()
    }

    /// True when `id` is attached and beating.
    pub fn peer_alive(&self, id: u16) -> bool {
        self.state(id).is_some_and(|s| s.state == PeerState::Alive)
    }

    /// True when `id` is attached and its heartbeat has not stopped for
    /// long (alive or silent).
    pub fn peer_attached(&self, id: u16) -> bool {
        self.state(id)
            .is_some_and(|s| matches!(s.state, PeerState::Alive | PeerState::Silent))
    }

    /// True when `id` detached cleanly: its agent let go of the window on
    /// purpose (a power-off asked for inside the guest), unlike a crash or
    /// a panic, which leave it attached and still.
    pub fn peer_left(&self, id: u16) -> bool {
        self.state(id).is_some_and(|s| s.state == PeerState::Gone)
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

/// The first request number of the daemon whose endpoint 0 has
/// `generation`: 2^24 numbers for each of 256 generations in turn.
fn request_base(generation: u64) -> u32 {
    (u32::try_from(generation & 0xff).unwrap_or(0) << 24).max(1)
}

impl Drop for HostWindow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.agent.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mknode::agent::Hooks;

    const MIB: u64 = 1 << 20;

    fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !ok() {
            assert!(t0.elapsed() < Duration::from_secs(5), "no {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// A window in physical memory, with a file standing for `/dev/mem`:
    /// formatted at its offset and nowhere else, endpoint 0 held without a
    /// relay; a peer that opens the same range (as guest-init does) is seen
    /// attached, and gone when it lets go.
    #[test]
    fn a_phys_window_is_formatted_at_its_offset_without_a_relay() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("mem");
        std::fs::File::create(&mem)
            .and_then(|f| f.set_len(8 * MIB))
            .unwrap();
        let agent = Agent::new(
            0,
            Hooks {
                power_off: Box::new(|| {}),
                info: Box::new(mknode::agent::kernel_info),
            },
        );
        let hw = HostWindow::create_phys(&mem, 4 * MIB, 4 * MIB, 2, agent).unwrap();
        assert!(hw.relay().is_none());
        assert_eq!(hw.phys(), Some((4 * MIB, 4 * MIB)));
        assert_eq!(hw.endpoints(), 2);
        assert_eq!(hw.place(), format!("{} at 0x400000 (4 MiB)", mem.display()));
        let bytes = std::fs::read(&mem).unwrap();
        let (before, window) = bytes.split_at(4 * MIB as usize);
        assert!(before.iter().all(|&b| b == 0), "written before the window");
        assert!(
            window.iter().any(|&b| b != 0),
            "the window is not formatted"
        );

        let guest = Window::open_at(&mem, 4 * MIB, 4 * MIB).unwrap();
        let ep = guest
            .attach_with_doorbell(1, Liveness::default(), None)
            .unwrap();
        ep.heartbeat_handle().beat().unwrap();
        wait_for("peer attached", || hw.peer_attached(1));
        drop(ep);
        wait_for("peer gone", || hw.peer_left(1));
        assert!(!hw.peer_attached(1));
    }
}
