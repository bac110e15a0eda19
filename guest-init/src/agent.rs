//! The guest's agent: attach to the window as this instance's endpoint
//! (with the doorbell port, [`crate::doorbell`], when the machine has one),
//! keep a heartbeat, link to the host and to every other instance, and
//! serve requests until asked to power off.
//!
//! PID 1 keeps one job the agent cannot do from its threads: signals are
//! blocked everywhere and taken here with `sigwait`, so SIGCHLD reaps
//! (statuses of the agent's own commands go to their threads, orphans are
//! just collected) and a power-off request — from the host over the ring,
//! or SIGTERM / SIGINT / SIGPWR — ends here, after detaching from the window
//! so the host sees the endpoint gone rather than dead.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use mknode::agent::{Agent, Hooks};
use mknode::link::RingLink;
use nix::sys::signal::Signal;
use shmem_ring::{Doorbell, Liveness};

use crate::doorbell::{SerialBell, PORT_NAME};
use crate::say;
use crate::supervise::signals;
use crate::window::WindowSource;

/// How often the guest beats (the host calls it silent after 200 ms).
const BEAT: Duration = Duration::from_millis(50);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot open the window {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: shmem_ring::Error,
    },
    #[error("cannot attach to the window as endpoint {id}")]
    Attach {
        id: u16,
        #[source]
        source: shmem_ring::Error,
    },
    #[error("no mk.id= on the kernel command line: the agent needs its endpoint id")]
    NoId,
    #[error("mk.id={0} does not fit an endpoint id (0-65535)")]
    IdRange(u32),
}

/// The file and offset the window lives at, from where guest-init found it.
pub fn window_file(source: &WindowSource, root: &Path) -> (PathBuf, u64) {
    match source {
        WindowSource::Ivshmem { address, .. } => (
            root.join("sys/bus/pci/devices")
                .join(address)
                .join(format!("resource{}", crate::window::IVSHMEM_SHMEM_BAR)),
            0,
        ),
        WindowSource::DevMem { phys } => (root.join("dev/mem"), *phys),
    }
}

/// Runs the agent until a power-off is asked for, and says why on the
/// console before it lets go of the window (the host may halt this kernel
/// as soon as it sees the endpoint gone). The endpoint is detached on
/// return.
/// `peers` names the endpoints for the agent's messages (`mk.peers`).
pub fn run(
    id: Option<u32>,
    peers: &[(u16, String)],
    file: &Path,
    offset: u64,
    len: u64,
) -> Result<(), AgentError> {
    let id = id.ok_or(AgentError::NoId)?;
    let id = u16::try_from(id).map_err(|_| AgentError::IdRange(id))?;
    let window =
        shmem_ring::Window::open_at(file, offset, len).map_err(|source| AgentError::Open {
            path: file.to_path_buf(),
            source,
        })?;
    let endpoints = window.layout().endpoints();
    // No futex reaches the host or the other guests through the BAR: the
    // daemon relays rings through the machine's virtio-serial port. Without
    // it the receivers poll (every 1-10 ms when idle).
    let bell: Option<Arc<dyn Doorbell>> = match SerialBell::open(Path::new("/"), id, endpoints) {
        Ok(b) => {
            say!("agent: doorbell port {PORT_NAME} ready");
            Some(Arc::new(b))
        }
        Err(e) => {
            say!(
                "agent: no doorbell, receivers will poll: {}",
                crate::power::error_chain(&e)
            );
            None
        }
    };
    let endpoint = window
        .attach_with_doorbell(id, Liveness::default(), bell)
        .map_err(|source| AgentError::Attach { id, source })?;
    say!(
        "agent: endpoint {id} of {endpoints} attached (generation {})",
        endpoint.generation()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let beat = endpoint.heartbeat_handle();
    let st = Arc::clone(&stop);
    let beater = thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            if let Err(e) = beat.beat() {
                say!("agent: heartbeat stopped: {e}");
                return;
            }
            thread::sleep(BEAT);
        }
    });

    let hooks = Hooks {
        // The host asked: hand the power-off to PID 1's signal loop, which
        // detaches from the window first.
        power_off: Box::new(|| {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(1), Signal::SIGUSR2);
        }),
        info: Box::new(mknode::agent::kernel_info),
    };
    let agent = Agent::new(id, hooks);
    agent.name_peers(peers.iter().cloned());
    // This kernel's processes reach the DSM here (libmk's default path).
    match agent
        .facet::<mknode::agent::Dsm>()
        .serve_local(std::path::Path::new(mknode::dsm::local::GUEST_SOCKET))
    {
        Ok(()) => say!("agent: DSM served at {}", mknode::dsm::local::GUEST_SOCKET),
        Err(e) => say!(
            "agent: no DSM for this kernel's processes: {}",
            mknode::error_text(&e)
        ),
    }
    for peer in (0..endpoints).filter(|&p| p != id) {
        match RingLink::open(&endpoint, peer) {
            Ok(link) => agent.add_link(peer, Arc::new(link)),
            Err(e) => say!("agent: no channel to endpoint {peer}: {e}"),
        }
    }
    say!(
        "agent: ready, serving the host and {} peer(s)",
        endpoints.saturating_sub(2)
    );

    let set = signals();
    let why = loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                mknode::migrate::reap_orphans();
            }
            Ok(Signal::SIGUSR2) => break "power-off requested".to_string(),
            Ok(sig) => break format!("{sig} received"),
            Err(e) => {
                say!("sigwait: {e}");
                thread::sleep(Duration::from_secs(1));
            }
        }
    };
    say!("{why}");
    stop.store(true, Ordering::Relaxed);
    // Let go of every channel half: they hold the endpoint too.
    for peer in (0..endpoints).filter(|&p| p != id) {
        agent.remove_link(peer);
    }
    agent.shutdown();
    // The heartbeat thread holds the endpoint too: wait for it to let go.
    let _ = beater.join();
    // Dropping the last handle marks the endpoint detached: the host sees
    // "gone", not a heartbeat that stopped.
    drop(endpoint);
    Ok(())
}
