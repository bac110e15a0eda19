//! The guest's doorbell: how the agent's receivers in this kernel sleep
//! until a sender on another kernel rings, and how its senders ring
//! receivers elsewhere (see `shmem_ring::doorbell`).
//!
//! A futex cannot cross kernels, and the ivshmem window has no interrupt
//! user space can wait on here: `ivshmem-doorbell` raises MSI-X only, which
//! neither `uio_pci_generic` (INTx only) nor VFIO (this kernel has no
//! no-IOMMU mode) hands to user space. So each guest gets one
//! `virtserialport` named [`PORT_NAME`], whose other end is a socket of the
//! host daemon, and a ring is a 4-byte [`RingMsg`] written to the port: the
//! daemon wakes the host's receiver itself, or forwards the record to the
//! receiving guest's port. The virtio console driver is a module in the
//! cloud kernel; it and what it needs come in the initramfs
//! ([`MODULE_DIR`], in [`MODULES`] order).
//!
//! One thread reads the port and wakes the receiver the record names: each
//! ring this kernel receives on has a counter under a lock, which a wait
//! sleeps on; the wait also returns as soon as the ring's doorbell word no
//! longer says asleep, so a ring that came before the wait began is not
//! slept through (the sender clears the word before it rings). A wait on
//! a sender not yet known to ring lasts no longer than a poll would: the
//! daemon asks whether this kernel rings when it connects, this kernel
//! answers, and the daemon rings once on behalf of every kernel that
//! answered (`RingMsg::QUERY`, `RingMsg::hello`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use shmem_ring::{Bell, Doorbell, RingMsg};

/// The name of the doorbell port (`virtserialport,name=`), as
/// `/sys/class/virtio-ports/vport*/name` shows it.
pub const PORT_NAME: &str = "org.mkctl.doorbell";

/// Where the initramfs holds the modules, relative to the root.
pub const MODULE_DIR: &str = "lib/modules/mkctl";

/// The modules for a virtio-serial port, in load order (each needs the
/// ones before it); `qemu/setup.sh` copies them from the kernel's package.
pub const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
];

/// The PCI ids of a virtio console (virtio-serial) device: vendor, and the
/// transitional and modern device ids.
const VIRTIO_VENDOR: u32 = 0x1af4;
const VIRTIO_CONSOLE: [u32; 2] = [0x1003, 0x1043];

/// Whether the machine has a virtio-serial device, from
/// `root/sys/bus/pci/devices/*/{vendor,device}`: without one there is no
/// port to wait for (the daemon booted this machine without a doorbell).
pub fn has_device(root: &Path) -> bool {
    let hex = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
    };
    std::fs::read_dir(root.join("sys/bus/pci/devices"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|d| {
            hex(d.path().join("vendor")) == Some(VIRTIO_VENDOR)
                && hex(d.path().join("device")).is_some_and(|id| VIRTIO_CONSOLE.contains(&id))
        })
}

/// How long to wait for the port after the driver is loaded (the port and
/// its name come from QEMU through the device's control queue).
const PORT_WAIT: Duration = Duration::from_secs(5);

/// While the daemon's end of the port is closed, the port polls as hung
/// up: look again this often.
const HUNG_UP_NAP: Duration = Duration::from_millis(50);

/// Why the guest has no doorbell (its receivers then poll).
#[derive(Debug, thiserror::Error)]
pub enum DoorbellError {
    #[error("cannot open {}", .0.display())]
    Open(PathBuf, #[source] io::Error),
    #[error("cannot load the kernel module {}", .0.display())]
    Module(PathBuf, #[source] nix::Error),
    #[error(
        "the machine has no virtio-serial device (booted without a doorbell: MKCTL_DOORBELL=off?)"
    )]
    NoDevice,
    #[error("no virtio-serial port named {PORT_NAME} appeared within {0:?}")]
    NoPort(Duration),
    #[error("cannot start the doorbell thread")]
    Thread(#[source] io::Error),
}

/// The modules migration needs: `unix_diag`, which tells the agent a
/// socket's peer (socket pairs are carried only when both ends move).
pub const MIGRATION_MODULES: [&str; 1] = ["unix_diag"];

/// Loads `names` from `root`/[`MODULE_DIR`], in order; a module file that
/// is not there is skipped (a kernel with the driver built in needs none)
/// and one already loaded is fine. Returns how many it loaded.
pub fn load_modules(root: &Path, names: &[&str]) -> Result<usize, DoorbellError> {
    let dir = root.join(MODULE_DIR);
    let mut loaded = 0;
    for name in names {
        let path = dir.join(format!("{name}.ko"));
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(DoorbellError::Open(path, e)),
        };
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) => loaded += 1,
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(DoorbellError::Module(path, e)),
        }
    }
    Ok(loaded)
}

/// The device node of the port named [`PORT_NAME`], if there is one:
/// `root/sys/class/virtio-ports/<port>/name` holds the name, and devtmpfs
/// makes `root/dev/<port>`.
pub fn find_port(root: &Path) -> Option<PathBuf> {
    let ports = std::fs::read_dir(root.join("sys/class/virtio-ports")).ok()?;
    for port in ports.flatten() {
        let name = std::fs::read_to_string(port.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            let dev = root.join("dev").join(port.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

/// One ring this kernel receives on: how many rings came for it, and
/// whether its sender is known to ring at all.
#[derive(Debug, Default)]
struct Slot {
    rung: Mutex<u64>,
    woken: Condvar,
    /// A ring from this sender came (the relay rings once on behalf of
    /// every kernel that said it rings: `RingMsg::hello`). Until then a
    /// wait lasts no longer than a poll would ([`UNPROVEN_WAIT`]): a sender
    /// whose kernel has no doorbell never rings.
    rings: AtomicBool,
}

/// The longest wait on a sender not known to ring: the idle poll period
/// of a receiver without a doorbell.
const UNPROVEN_WAIT: Duration = shmem_ring::wait::IDLE_SLEEP;

#[derive(Debug)]
struct Shared {
    me: u16,
    port: File,
    /// By sending endpoint id.
    slots: Vec<Slot>,
    /// Bytes off the port that were not a record for this kernel.
    bad: AtomicU64,
}

/// The doorbell of a guest, over its virtio-serial port (module doc).
#[derive(Debug, Clone)]
pub struct SerialBell {
    shared: Arc<Shared>,
}

impl SerialBell {
    /// Loads the driver, waits for the port to appear under `root`, opens
    /// it and starts the thread that reads it, for endpoint `me` of a
    /// window with `endpoints` endpoints.
    pub fn open(root: &Path, me: u16, endpoints: u16) -> Result<SerialBell, DoorbellError> {
        if !has_device(root) {
            return Err(DoorbellError::NoDevice);
        }
        load_modules(root, &MODULES)?;
        let t0 = Instant::now();
        let dev = loop {
            if let Some(dev) = find_port(root) {
                break dev;
            }
            if t0.elapsed() > PORT_WAIT {
                return Err(DoorbellError::NoPort(PORT_WAIT));
            }
            thread::sleep(Duration::from_millis(20));
        };
        let port = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&dev)
            .map_err(|e| DoorbellError::Open(dev, e))?;
        Self::with_port(port, me, endpoints)
    }

    /// A doorbell over `port`, any non-blocking byte stream whose other end
    /// relays [`RingMsg`] records (the virtio-serial port; a socket in tests).
    pub fn with_port(port: File, me: u16, endpoints: u16) -> Result<SerialBell, DoorbellError> {
        let shared = Arc::new(Shared {
            me,
            port,
            slots: (0..endpoints).map(|_| Slot::default()).collect(),
            bad: AtomicU64::new(0),
        });
        let reader = Arc::clone(&shared);
        thread::Builder::new()
            .name("doorbell".into())
            .spawn(move || reader.read_port())
            .map_err(DoorbellError::Thread)?;
        Ok(SerialBell { shared })
    }

    /// Bytes off the port that were not a record for this kernel, so far.
    pub fn bad_bytes(&self) -> u64 {
        self.shared.bad.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// Reads records off the port for good and wakes the receivers they
    /// name.
    fn read_port(&self) {
        let mut pending = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let mut fds = [PollFd::new(self.port.as_fd(), PollFlags::POLLIN)];
            let revents = match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => {
                    thread::sleep(HUNG_UP_NAP);
                    continue;
                }
            };
            if !revents.contains(PollFlags::POLLIN) {
                // The daemon's end is not connected (yet, or any more): the
                // port reads as hung up until it is.
                thread::sleep(HUNG_UP_NAP);
                continue;
            }
            loop {
                match (&self.port).read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            let (rings, skipped) = RingMsg::drain(&mut pending);
            let mut bad = skipped as u64;
            for r in rings {
                if r.is_query() {
                    // The daemon asks whether this kernel rings: it does.
                    if let Some(rec) = RingMsg::hello(self.me).encode() {
                        let _ = (&self.port).write(&rec);
                    }
                    continue;
                }
                match self.slots.get(usize::from(r.from)) {
                    Some(slot) if r.to == self.me && r.from != self.me => {
                        slot.rings.store(true, Ordering::Relaxed);
                        *slot.rung.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                        slot.woken.notify_all();
                    }
                    _ => bad += RingMsg::LEN as u64,
                }
            }
            if bad > 0 {
                self.bad.fetch_add(bad, Ordering::Relaxed);
            }
        }
    }
}

impl Doorbell for SerialBell {
    fn ring(&self, bell: &Bell) {
        // Never block a sender: a ring the port cannot take now (the daemon
        // not connected, its queue full) is dropped, and the receiver finds
        // the message when it next looks at its peer.
        if let Some(rec) = RingMsg::of(bell).encode() {
            let _ = (&self.shared.port).write(&rec);
        }
    }

    fn wait(&self, bell: &Bell, deadline: Instant) -> io::Result<()> {
        let slot = self
            .shared
            .slots
            .get(usize::from(bell.from()))
            .ok_or(io::ErrorKind::InvalidInput)?;
        let deadline = if slot.rings.load(Ordering::Relaxed) {
            deadline
        } else {
            deadline.min(Instant::now() + UNPROVEN_WAIT)
        };
        let mut rung = slot.rung.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = *rung;
        // Checked under the lock the reader takes before it counts a ring:
        // a ring counted before `seen` was read came after the sender
        // cleared the word, so `asleep` is already false then.
        while *rung == seen && bell.asleep() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            rung = slot
                .woken
                .wait_timeout(rung, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use shmem_ring::{Layout, Liveness, Window};

    #[test]
    fn finds_the_port_by_name_and_skips_missing_modules() {
        let root = tempfile::tempdir().unwrap();
        let class = root.path().join("sys/class/virtio-ports");
        for (port, name) in [
            ("vport1p1", "org.qemu.guest_agent.0"),
            ("vport2p1", PORT_NAME),
        ] {
            std::fs::create_dir_all(class.join(port)).unwrap();
            std::fs::write(class.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(find_port(root.path()), None, "no device node yet");
        std::fs::create_dir_all(root.path().join("dev")).unwrap();
        std::fs::write(root.path().join("dev/vport2p1"), "").unwrap();
        assert_eq!(
            find_port(root.path()),
            Some(root.path().join("dev/vport2p1"))
        );
        // No module files: nothing to load, not an error.
        assert_eq!(load_modules(root.path(), &MODULES).unwrap(), 0);
        // No virtio console on the PCI bus: no port to wait for.
        assert!(!has_device(root.path()));
        assert!(matches!(
            SerialBell::open(root.path(), 1, 3),
            Err(DoorbellError::NoDevice)
        ));
        let dev = root.path().join("sys/bus/pci/devices/0000:00:04.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vendor"), "0x1af4\n").unwrap();
        std::fs::write(dev.join("device"), "0x1000\n").unwrap();
        assert!(!has_device(root.path()), "virtio-net is not a console");
        std::fs::write(dev.join("device"), "0x1003\n").unwrap();
        assert!(has_device(root.path()));
    }

    /// Guest endpoint 1 with a SerialBell over one end of a socket pair;
    /// the test plays the daemon on the other end.
    #[test]
    fn rings_go_out_as_records_and_records_wake_the_receiver() {
        let w = Window::anonymous(Layout::with_capacity(3, 64 << 10).unwrap()).unwrap();
        let (guest_end, mut daemon_end) = UnixStream::pair().unwrap();
        guest_end.set_nonblocking(true).unwrap();
        let port = File::from(OwnedFd::from(guest_end));
        let bell = Arc::new(SerialBell::with_port(port, 1, 3).unwrap());
        let guest = w
            .attach_with_doorbell(1, Liveness::default(), Some(bell.clone()))
            .unwrap();
        // The host (endpoint 0) rings through the "daemon": it has no
        // doorbell of its own here, the test relays by hand.
        let host = w
            .attach_with_doorbell(0, Liveness::default(), None)
            .unwrap();
        let (mut host_tx, _) = host.channel(1).unwrap();
        let (mut guest_tx, mut guest_rx) = guest.channel(0).unwrap();

        // The daemon asks whether this kernel rings; it answers that it does.
        daemon_end
            .write_all(&RingMsg::QUERY.encode().unwrap())
            .unwrap();
        let mut rec = [0u8; RingMsg::LEN];
        daemon_end.read_exact(&mut rec).unwrap();
        assert_eq!(RingMsg::drain(&mut rec.to_vec()).0, [RingMsg::hello(1)]);

        // The guest's sender rings a sleeping host receiver: a record on
        // the port. (The host announces by hand, as its receiver would.)
        w.poke(
            w.layout().ring(1, 0).unwrap().control + 0xC0,
            &1u64.to_le_bytes(),
        )
        .unwrap();
        guest_tx.try_send(b"to host").unwrap();
        let mut rec = [0u8; RingMsg::LEN];
        daemon_end.read_exact(&mut rec).unwrap();
        assert_eq!(
            RingMsg::drain(&mut rec.to_vec()).0,
            [RingMsg { from: 1, to: 0 }]
        );

        // The host sends while the guest's receiver sleeps; the daemon
        // relays the ring to the port; the receiver wakes long before its
        // next look at the peer (100 ms).
        let (got_tx, got_rx) = std::sync::mpsc::channel();
        let receiver = thread::spawn(move || {
            for _ in 0..2 {
                let mut buf = Vec::new();
                guest_rx.recv(&mut buf, Duration::from_secs(5)).unwrap();
                got_tx.send((buf, Instant::now())).unwrap();
            }
        });
        let bell01 = w.bell(0, 1).unwrap();
        let dozing = || {
            let t0 = Instant::now();
            while !bell01.asleep() {
                assert!(t0.elapsed() < Duration::from_secs(5), "never dozes");
                thread::sleep(Duration::from_millis(1));
            }
        };

        // The host is not known to ring yet: the receiver looks as often
        // as a poll would, so a message that is not rung for comes in
        // ~10 ms, not at the next look at the peer (100 ms).
        dozing();
        thread::sleep(Duration::from_millis(5));
        host_tx.try_send(b"unrung").unwrap();
        let sent = Instant::now();
        let (buf, got) = got_rx.recv().unwrap();
        assert_eq!(buf, b"unrung");
        let took = got.duration_since(sent);
        assert!(
            took < Duration::from_millis(60),
            "found {took:?} after it was sent"
        );

        // The relay rings once for the host (it said it rings): from now on
        // the receiver sleeps until rung.
        daemon_end
            .write_all(&RingMsg { from: 0, to: 1 }.encode().unwrap())
            .unwrap();
        dozing();
        thread::sleep(Duration::from_millis(300));
        assert!(bell01.asleep(), "the receiver dozes");
        host_tx.try_send(b"to guest").unwrap();
        let sent = Instant::now();
        daemon_end
            .write_all(&RingMsg { from: 0, to: 1 }.encode().unwrap())
            .unwrap();
        let (buf, got) = got_rx.recv().unwrap();
        receiver.join().unwrap();
        assert_eq!(buf, b"to guest");
        assert!(
            got.duration_since(sent) < Duration::from_millis(50),
            "woken {:?} after the ring",
            got.duration_since(sent)
        );
        // A record for another kernel is counted, not obeyed.
        daemon_end
            .write_all(&RingMsg { from: 0, to: 2 }.encode().unwrap())
            .unwrap();
        let t0 = Instant::now();
        while bell.bad_bytes() == 0 && t0.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(bell.bad_bytes(), RingMsg::LEN as u64);
    }
}
