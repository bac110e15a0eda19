//! The control connection between the `mkctl` CLI and its daemon: a Unix
//! stream socket in the run directory carrying length-prefixed frames.
//!
//! A frame is `u32` length (little-endian, counting what follows), a tag
//! byte, and the payload: tag 1 is a JSON control message ([`Request`] or
//! [`Reply`]), tag 2 is an agent wire message ([`mknode::wire::Msg`]) — so
//! `exec` streams stdin/stdout/stderr bytes unchanged, without base64.
//! The CLI is trusted less than the daemon's own state: sizes are bounded
//! and every decode error is an error, not a panic.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use mknode::wire::{DecodeError, Msg};
use serde::{Deserialize, Serialize};

use super::state::{StopStep, Stopped};

/// Largest frame either side accepts (a 32 KiB exec chunk is far below).
pub const MAX_FRAME: usize = 16 << 20;

const TAG_JSON: u8 = 1;
const TAG_WIRE: u8 = 2;

/// What the CLI asks the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Boot instances of a topology (all when `instances` is empty).
    Boot {
        config: PathBuf,
        instances: Vec<String>,
        timeout_ms: u64,
    },
    Status,
    /// Before `mkctl boot` starts kexec `instances` of a topology through
    /// the multikernel interface: format the topology's window in the pool
    /// through `/dev/mem` (once), attach the host's agent as endpoint 0,
    /// and register the instances as booting.
    KexecPrepare {
        config: PathBuf,
        instances: Vec<String>,
    },
    /// The kernel side of their boot is over: with `booted`, wait (at most
    /// `timeout_ms`) until each one's agent answers over the window, as a
    /// QEMU boot does; without, they failed to start (`reason`).
    KexecBooted {
        instances: Vec<String>,
        booted: bool,
        reason: String,
        timeout_ms: u64,
    },
    /// Run a command; wire `Msg`s follow in both directions.
    Exec {
        instance: String,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        stdin: bool,
    },
    Info {
        instance: String,
    },
    /// Round trips between two kernels, measured by the first one's agent.
    Ping {
        from: String,
        to: String,
        count: u32,
    },
    /// Traffic check: `from` sends `count` checksummed blobs to `to`
    /// (either may be "host"); the receiver reports what arrived intact.
    Traffic {
        from: String,
        to: String,
        count: u32,
        size: u32,
    },
    Stop {
        instances: Vec<String>,
        timeout_ms: u64,
        /// Skip the agent: QMP quit at once, a kill 3 s later.
        #[serde(default)]
        force: bool,
    },
    /// Stop instances, then boot them again from the topology the daemon
    /// runs (all when `instances` is empty).
    Restart {
        instances: Vec<String>,
        stop_timeout_ms: u64,
        boot_timeout_ms: u64,
    },
    /// Move process `pid` from one kernel to another (names, ids or "host").
    Migrate {
        pid: u32,
        from: String,
        to: String,
        /// Post-copy: resume first, pages follow on demand.
        lazy: bool,
        /// The process with all its descendants (stop-and-copy).
        #[serde(default)]
        tree: bool,
        /// Do not ask the destination for the CPU extensions the program
        /// picked its code for (the user vouches it uses none it lacks).
        #[serde(default)]
        any_cpu: bool,
    },
    /// Move thread `tid` of process `pid` (whose kernel is `from`) to `to`
    /// (back to `from` brings it home).
    MigrateThread {
        pid: u32,
        tid: u32,
        from: String,
        to: String,
    },
    /// An image of process `pid` on `on`: `ImageChunk` wire frames, then Ok.
    Checkpoint {
        pid: u32,
        on: String,
        kill: bool,
        /// With all its descendants: a tree image.
        #[serde(default)]
        tree: bool,
    },
    /// Restore the image the client then sends as `ImageChunk` wire frames
    /// (an empty one ends it); answered like exec.
    Restore {
        on: String,
    },
    /// Every thread running away from its process's kernel.
    Threads,
    /// DSM regions: every one the registry knows, with what each kernel
    /// holds of it (`name`: only that one).
    DsmReport {
        name: Option<String>,
    },
    /// Remove DSM region `name` (refused while it is mapped anywhere).
    DsmRemove {
        name: String,
    },
    /// Stop every instance and exit.
    Shutdown,
    /// Exit and leave every instance running, for the next daemon to adopt
    /// (`mkctl daemon restart`).
    Handover,
    /// Subscribe to the event bus: `Reply::Subscribed`, then the last
    /// `last` events it kept and every event as it happens, each as a
    /// `Reply::Event`, until the daemon stops (`Reply::Ok`) or the client
    /// hangs up.
    Events {
        #[serde(default)]
        last: u32,
    },
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    /// A step of a long operation, for progress display.
    Progress {
        instance: String,
        message: String,
    },
    /// How many bytes a long transfer (a move) has carried so far, for a
    /// progress line.
    Transfer {
        bytes: u64,
    },
    /// The request is complete.
    Ok {
        message: String,
    },
    /// The request failed; `code` is the exit code the CLI should use.
    Error {
        message: String,
        code: i32,
    },
    Status {
        status: DaemonStatus,
    },
    Info {
        info: serde_json::Value,
    },
    Ping {
        count: u32,
        min_ns: u64,
        median_ns: u64,
        max_ns: u64,
    },
    Traffic {
        sent: u64,
        good: u64,
        bad: u64,
        elapsed_ns: u64,
    },
    /// A stop is done: what it did, for people and per instance.
    Stopped {
        message: String,
        instances: Vec<StoppedInstance>,
    },
    /// `exec` accepted: wire messages follow.
    ExecStarted,
    Migrated {
        new_pid: u32,
        downtime_ns: u64,
        total_ns: u64,
        image_bytes: u64,
        /// Pages carried (with content, or marked all-zero).
        #[serde(default)]
        pages: u64,
    },
    /// A thread runs on `at` (in shadow process `shadow_pid` there; 0 back
    /// home) after `downtime_ns` stopped.
    ThreadMigrated {
        at: String,
        shadow_pid: u32,
        downtime_ns: u64,
    },
    /// Threads away from their process's kernel (see `Request::Threads`).
    Threads {
        threads: Vec<ThreadRow>,
    },
    /// DSM regions (see `Request::DsmReport`).
    Dsm {
        regions: Vec<DsmRegion>,
    },
    /// A subscription began (see `Request::Events`); `seq` is the last
    /// event published before it (0: none yet). Its events follow.
    Subscribed {
        seq: u64,
    },
    /// One event of a subscription (see `Request::Events`).
    Event {
        event: super::events::Event,
    },
}

/// A thread away from its process's kernel (`mkctl threads`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadRow {
    /// The kernel the process began on (where its pid is).
    pub kernel: String,
    pub pid: u32,
    pub tid: u32,
    /// The kernel the thread runs on, and its shadow's pid there.
    pub at: String,
    pub shadow_pid: u32,
}

/// One instance of a stop (`mkctl stop --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedInstance {
    pub name: String,
    /// Its state before the stop; `None` when the daemon did not know it.
    pub before: Option<String>,
    /// The step that ended its QEMU: `agent`, `qmp-quit` or `kill`; `None`
    /// when no QEMU ran.
    pub step: Option<StopStep>,
    /// From the start of the stop to its QEMU's end.
    pub elapsed_ms: Option<u64>,
}

impl From<&Stopped> for StoppedInstance {
    fn from(s: &Stopped) -> Self {
        StoppedInstance {
            name: s.name.clone(),
            before: s.before.map(|b| b.as_str().to_string()),
            step: s.step.map(|(step, _)| step),
            elapsed_ms: s
                .step
                .map(|(_, took)| u64::try_from(took.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// One DSM region across the kernels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DsmRegion {
    pub name: String,
    pub id: u32,
    pub size: u64,
    /// The kernel that keeps its directory.
    pub home: String,
    /// What each kernel holds and counted (those that know the region).
    pub kernels: Vec<DsmKernel>,
}

/// One region on one kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DsmKernel {
    pub kernel: String,
    pub mappers: u64,
    pub shared_pages: u64,
    pub exclusive_pages: u64,
    pub read_faults: u64,
    pub write_faults: u64,
    /// Requests sent to the home.
    pub fetches: u64,
    pub invalidations: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Faults that failed (SIGBUS).
    pub failed: u64,
    /// Pages lost with the kernel that held them (counted at the home).
    pub lost_pages: u64,
    pub fault_mean_us: u64,
    pub fault_p99_us: u64,
    /// Why faults there cannot be served, if so.
    pub error: Option<String>,
}

impl Reply {
    /// The reply's kind, as its JSON tag names it (for messages).
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Progress { .. } => "progress",
            Reply::Transfer { .. } => "transfer",
            Reply::Ok { .. } => "ok",
            Reply::Error { .. } => "error",
            Reply::Status { .. } => "status",
            Reply::Info { .. } => "info",
            Reply::Ping { .. } => "ping",
            Reply::Traffic { .. } => "traffic",
            Reply::Stopped { .. } => "stopped",
            Reply::ExecStarted => "exec-started",
            Reply::Migrated { .. } => "migrated",
            Reply::ThreadMigrated { .. } => "thread-migrated",
            Reply::Threads { .. } => "threads",
            Reply::Dsm { .. } => "dsm",
            Reply::Subscribed { .. } => "subscribed",
            Reply::Event { .. } => "event",
        }
    }
}

/// The daemon and every instance it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    /// Which mkctl build runs the daemon (see [`build_id`]).
    #[serde(default)]
    pub build: String,
    pub run_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub window: Option<PathBuf>,
    pub instances: Vec<InstanceStatus>,
    /// What the doorbell relay did since the window was made; `None`
    /// without a window or with the relay off (`MKCTL_DOORBELL=off`).
    #[serde(default)]
    pub doorbell: Option<super::doorbell::RelayStats>,
}

/// One instance as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub name: String,
    pub id: u32,
    /// `booting`, `ready`, `stopping`, `stopped` or `failed`.
    pub state: String,
    /// Why it failed, when it did.
    pub reason: Option<String>,
    pub pid: Option<u32>,
    pub cpus: String,
    pub memory: u64,
    pub uptime_ms: Option<u64>,
    /// Milliseconds since the agent's heartbeat last moved.
    pub heartbeat_age_ms: Option<u64>,
    pub kernel: Option<String>,
    /// Its restart policy: `no` or `on-failure`.
    #[serde(default)]
    pub restart: String,
    /// How many times the policy may restart it (`None` without a policy).
    #[serde(default)]
    pub restart_limit: Option<u32>,
    /// Restarts the policy began since a request last booted or restarted
    /// it.
    #[serde(default)]
    pub restarts: u32,
    /// Its QEMU was started by an earlier daemon, which this one took over.
    #[serde(default)]
    pub adopted: bool,
}

/// One frame off the socket.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Request(Request),
    Reply(Reply),
    Wire(Msg),
}

/// A frame could not be read or made sense of.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("control socket i/o")]
    Io(#[from] io::Error),
    #[error("control frame of {0} bytes is larger than the {MAX_FRAME} allowed")]
    TooLarge(usize),
    #[error("unknown control frame tag {0}")]
    Tag(u8),
    #[error("control message is not valid JSON of the expected shape")]
    Json(#[from] serde_json::Error),
    #[error("wire message in control frame")]
    Wire(#[from] DecodeError),
    #[error("the other side closed the control connection")]
    Closed,
}

fn write_frame(w: &mut impl Write, tag: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len() + 1)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut buf = Vec::with_capacity(payload.len() + 5);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.push(tag);
    buf.extend_from_slice(payload);
    w.write_all(&buf)
}

/// Sends a JSON request.
pub fn send_request(w: &mut impl Write, r: &Request) -> io::Result<()> {
    write_frame(w, TAG_JSON, &serde_json::to_vec(r)?)
}

/// Sends a JSON reply.
pub fn send_reply(w: &mut impl Write, r: &Reply) -> io::Result<()> {
    write_frame(w, TAG_JSON, &serde_json::to_vec(r)?)
}

/// Sends a wire message.
pub fn send_wire(w: &mut impl Write, m: &Msg) -> io::Result<()> {
    write_frame(w, TAG_WIRE, &m.encode())
}

/// Which JSON shape a reader expects on its side of the connection.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The daemon reads requests.
    Daemon,
    /// The CLI reads replies.
    Client,
}

/// Reads one frame; `Closed` when the peer hung up between frames.
pub fn read_frame(r: &mut impl Read, side: Side) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Err(FrameError::Tag(0));
    }
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    let (tag, payload) = (buf[0], &buf[1..]);
    match (tag, side) {
        (TAG_JSON, Side::Daemon) => Ok(Frame::Request(serde_json::from_slice(payload)?)),
        (TAG_JSON, Side::Client) => Ok(Frame::Reply(serde_json::from_slice(payload)?)),
        (TAG_WIRE, _) => Ok(Frame::Wire(Msg::decode(payload)?)),
        (t, _) => Err(FrameError::Tag(t)),
    }
}

/// This mkctl build: the version and the executable's size and mtime, so a
/// client can tell a daemon started by an older binary (after a rebuild).
pub fn build_id() -> String {
    let meta = std::env::current_exe().and_then(std::fs::metadata);
    let stamp = meta
        .map(|m| {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            format!("{}-{t}", m.len())
        })
        .unwrap_or_default();
    format!("{} {stamp}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mknode::wire::Stream;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        let req = Request::Exec {
            instance: "alpha".into(),
            argv: vec!["uname".into(), "-r".into()],
            env: vec![],
            cwd: None,
            stdin: false,
        };
        send_request(&mut buf, &req).unwrap();
        let data = Msg::Data {
            req: 1,
            stream: Stream::Stdout,
            bytes: vec![0, 1, 255],
        };
        send_wire(&mut buf, &data).unwrap();
        send_reply(
            &mut buf,
            &Reply::Error {
                message: "x".into(),
                code: 1,
            },
        )
        .unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r, Side::Daemon).unwrap(),
            Frame::Request(req)
        );
        assert_eq!(read_frame(&mut r, Side::Daemon).unwrap(), Frame::Wire(data));
        assert!(matches!(
            read_frame(&mut r, Side::Client).unwrap(),
            Frame::Reply(Reply::Error { code: 1, .. })
        ));
        assert!(matches!(
            read_frame(&mut r, Side::Client),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn hostile_frames() {
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(
            read_frame(&mut &huge[..], Side::Daemon),
            Err(FrameError::TooLarge(_))
        ));
        let bad_tag = [1, 0, 0, 0, 9];
        assert!(matches!(
            read_frame(&mut &bad_tag[..], Side::Daemon),
            Err(FrameError::Tag(9))
        ));
        let bad_json = [3, 0, 0, 0, 1, b'{', b'x'];
        assert!(matches!(
            read_frame(&mut &bad_json[..], Side::Daemon),
            Err(FrameError::Json(_))
        ));
        let short = [9, 0, 0, 0, 1, b'{'];
        assert!(matches!(
            read_frame(&mut &short[..], Side::Daemon),
            Err(FrameError::Io(_))
        ));
    }
}
