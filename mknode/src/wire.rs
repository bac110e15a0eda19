//! Wire messages between agents: one message per ring frame.
//!
//! The encoding is little-endian and explicit (no serde, no layout tricks):
//! a 4-byte header — kind (`u16`) and format version (`u16`) — then the
//! fields of that kind in order. Integers are fixed width, byte strings and
//! UTF-8 strings are a `u32` length and the bytes, lists a `u32` count and
//! the items. Decoding treats every byte as hostile: each length is checked
//! against what is left, each count against the least bytes an item takes,
//! every string is checked UTF-8, trailing bytes are an error. It never
//! panics and never allocates more than the frame it was handed.
//!
//! The set of messages grows with the protocols (exec now; migration and DSM
//! later): a new kind gets a new number, old numbers are never reused.

use std::fmt;

/// The version of this encoding; a peer speaking another is refused at
/// `Hello` rather than misread.
pub const WIRE_VERSION: u16 = 1;

/// Largest payload of one `Data` frame; bigger streams are split. Keeps
/// every frame well below the smallest ring we create.
pub const MAX_CHUNK: usize = 32 * 1024;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame ends at byte {at} but {need} more bytes were expected")]
    Truncated { at: usize, need: usize },
    #[error("unknown message kind {0:#06x}")]
    UnknownKind(u16),
    #[error("wire version {0} is not the version {WIRE_VERSION} this agent speaks")]
    Version(u16),
    #[error("{field}: invalid value {value:#x}")]
    BadValue { field: &'static str, value: u64 },
    #[error("{0}: not valid UTF-8")]
    Utf8(&'static str),
    #[error("{count} trailing bytes after the message")]
    Trailing { count: usize },
}

/// Which output stream of a remote process a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

impl Stream {
    fn code(self) -> u8 {
        match self {
            Stream::Stdin => 0,
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }

    fn from_code(c: u8) -> Result<Self, DecodeError> {
        match c {
            0 => Ok(Stream::Stdin),
            1 => Ok(Stream::Stdout),
            2 => Ok(Stream::Stderr),
            v => Err(DecodeError::BadValue {
                field: "stream",
                value: u64::from(v),
            }),
        }
    }
}

/// How a remote process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal number.
    pub fn as_shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// A NUMA node as a kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: u32,
    /// Linux cpulist text, as in `/sys/devices/system/node/nodeN/cpulist`.
    pub cpus: String,
    pub mem_total: u64,
}

/// What an agent reports about its kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    pub hostname: String,
    pub sysname: String,
    pub release: String,
    pub version: String,
    pub machine: String,
    /// `/sys/devices/system/cpu/online`.
    pub cpus_online: String,
    pub nodes: Vec<NodeInfo>,
    /// `MemTotal` from `/proc/meminfo`, in bytes.
    pub mem_total: u64,
    pub uptime_ms: u64,
}

/// A command to run on a remote kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// When true the caller streams stdin with `Data { stream: Stdin }`
    /// frames ending with `Eof`; when false stdin is `/dev/null`.
    pub stdin: bool,
}

/// One message between two agents (or the host daemon and an agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// First frame on a channel after attaching: who is talking.
    Hello {
        endpoint: u16,
        generation: u32,
        release: String,
    },
    /// Latency probe; the peer answers `Pong` with the same fields.
    Ping {
        seq: u64,
        t_ns: u64,
    },
    Pong {
        seq: u64,
        t_ns: u64,
    },
    /// Asks for `KernelInfo`.
    InfoRequest {
        req: u32,
    },
    Info {
        req: u32,
        info: KernelInfo,
    },
    /// Runs a process; `Started`, then `Data`/`Eof`, then `Exited` follow,
    /// all carrying `req`.
    Exec {
        req: u32,
        exec: ExecRequest,
    },
    Started {
        req: u32,
        pid: u32,
    },
    Data {
        req: u32,
        stream: Stream,
        bytes: Vec<u8>,
    },
    Eof {
        req: u32,
        stream: Stream,
    },
    Exited {
        req: u32,
        status: ExitStatus,
    },
    /// Sends a signal to a process started by `Exec` (by its `req`).
    Signal {
        req: u32,
        signal: i32,
    },
    /// The request failed before or instead of its normal answer.
    Failed {
        req: u32,
        message: String,
    },
    /// Power the kernel off cleanly.
    PowerOff,
    /// Asks the agent to ping `peer` directly, `count` times, and report.
    PingPeer {
        req: u32,
        peer: u16,
        count: u32,
    },
    PingReport {
        req: u32,
        count: u32,
        rtt_min_ns: u64,
        rtt_median_ns: u64,
        rtt_max_ns: u64,
    },
    /// Traffic check: the receiver verifies the order and checksum of
    /// `Blob`s from each sender, and reports on `BlobCheck`.
    Blob {
        seq: u64,
        checksum: u64,
        payload: Vec<u8>,
    },
    /// Asks the agent to send `count` blobs of `size` bytes to `peer`
    /// (endpoint 0 is the host), seeded by `seed`.
    SendBlobs {
        req: u32,
        peer: u16,
        count: u32,
        size: u32,
        seed: u64,
    },
    /// Asks the agent how many blobs arrived from `from`, intact and in order.
    BlobCheck {
        req: u32,
        from: u16,
    },
    BlobReport {
        req: u32,
        from: u16,
        good: u64,
        bad: u64,
        next_seq: u64,
    },
    /// Generic success answer to a request without data.
    Done {
        req: u32,
    },
    /// Asks the agent to move its process `pid` to endpoint `to`; `lazy`:
    /// resume after the eager pages, the rest follows on demand.
    MigrateOut {
        req: u32,
        pid: u32,
        to: u16,
        lazy: bool,
    },
    /// The end of a `MigrateOut`: the process runs on the destination as
    /// `new_pid`; the frozen original is gone.
    MigrateReport {
        req: u32,
        new_pid: u32,
        downtime_ns: u64,
        total_ns: u64,
        image_bytes: u64,
    },
    /// Progress of a `MigrateOut` (not its end): the copy runs on the
    /// destination as `new_pid`, after `downtime_ns`; a lazy move goes on
    /// moving pages until its `MigrateReport`.
    MigrateProgress {
        req: u32,
        new_pid: u32,
        downtime_ns: u64,
    },
    /// Origin to destination: a process image follows in `MigrateChunk`s,
    /// closed by `MigrateEnd` (or `MigrateAbort`). `mig` is the origin's id.
    MigrateBegin {
        mig: u32,
    },
    MigrateChunk {
        mig: u32,
        bytes: Vec<u8>,
    },
    MigrateEnd {
        mig: u32,
    },
    MigrateAbort {
        mig: u32,
    },
    /// Destination to origin: the process runs here as `pid`.
    MigrateRunning {
        mig: u32,
        pid: u32,
    },
    /// Destination to origin: the restore failed; nothing of it runs.
    MigrateFailed {
        mig: u32,
        message: String,
    },
    /// Destination to origin: what the moved process wrote, for its
    /// original stdout/stderr.
    MigratedOutput {
        mig: u32,
        stream: Stream,
        bytes: Vec<u8>,
    },
    /// Destination to origin: the moved process ended.
    MigratedExit {
        mig: u32,
        status: ExitStatus,
    },
    /// Asks for an image of process `pid` (checkpoint); `ImageChunk`s then
    /// `Done` answer. With `kill` the process is stopped after the image.
    Checkpoint {
        req: u32,
        pid: u32,
        kill: bool,
    },
    ImageChunk {
        req: u32,
        bytes: Vec<u8>,
    },
    /// Restores the image that follows in `ImageChunk`s (closed by an
    /// empty chunk); answered like `Exec`: `Started`, `Data`, `Exited`.
    RestoreImage {
        req: u32,
    },
    /// Origin to destination: a lazy image follows (see `MigrateBegin`).
    MigrateBeginLazy {
        mig: u32,
    },
    /// Destination to origin: `len` bytes of pages at `addr` (answer
    /// `PageData` with the same `id`, or `PageRefused`).
    PageFetch {
        mig: u32,
        id: u32,
        addr: u64,
        len: u32,
    },
    /// Origin to destination: pages at `addr`; `id` 0 is a background push.
    PageData {
        mig: u32,
        id: u32,
        addr: u64,
        bytes: Vec<u8>,
    },
    PageRefused {
        mig: u32,
        id: u32,
        message: String,
    },
    /// Origin to destination: every page has been pushed.
    PagesDone {
        mig: u32,
    },
    /// Destination to origin: the copy's pager needs nothing more (every
    /// page is in, or the process ended). Only then may the origin drop
    /// what serves fetches and let go of its frozen original: a fetch sent
    /// just before the last push arrived is still answered.
    PagesIn {
        mig: u32,
    },
}

// Kind numbers: never renumber, never reuse.
const K_HELLO: u16 = 1;
const K_PING: u16 = 2;
const K_PONG: u16 = 3;
const K_INFO_REQ: u16 = 4;
const K_INFO: u16 = 5;
const K_EXEC: u16 = 6;
const K_STARTED: u16 = 7;
const K_DATA: u16 = 8;
const K_EOF: u16 = 9;
const K_EXITED: u16 = 10;
const K_SIGNAL: u16 = 11;
const K_FAILED: u16 = 12;
const K_POWEROFF: u16 = 13;
const K_PING_PEER: u16 = 14;
const K_PING_REPORT: u16 = 15;
const K_BLOB: u16 = 16;
const K_SEND_BLOBS: u16 = 17;
const K_BLOB_CHECK: u16 = 18;
const K_BLOB_REPORT: u16 = 19;
const K_DONE: u16 = 20;
const K_MIGRATE_OUT: u16 = 21;
const K_MIGRATE_REPORT: u16 = 22;
const K_MIGRATE_BEGIN: u16 = 23;
const K_MIGRATE_CHUNK: u16 = 24;
const K_MIGRATE_END: u16 = 25;
const K_MIGRATE_ABORT: u16 = 26;
const K_MIGRATE_RUNNING: u16 = 27;
const K_MIGRATE_FAILED: u16 = 28;
const K_MIGRATED_OUTPUT: u16 = 29;
const K_MIGRATED_EXIT: u16 = 30;
const K_CHECKPOINT: u16 = 31;
const K_IMAGE_CHUNK: u16 = 32;
const K_RESTORE_IMAGE: u16 = 33;
const K_MIGRATE_BEGIN_LAZY: u16 = 34;
const K_PAGE_FETCH: u16 = 35;
const K_PAGE_DATA: u16 = 36;
const K_PAGE_REFUSED: u16 = 37;
const K_PAGES_DONE: u16 = 38;
const K_PAGES_IN: u16 = 39;
const K_MIGRATE_PROGRESS: u16 = 40;

impl Msg {
    /// The request id the message answers or belongs to, if any.
    pub fn req(&self) -> Option<u32> {
        match self {
            Msg::InfoRequest { req }
            | Msg::Info { req, .. }
            | Msg::Exec { req, .. }
            | Msg::Started { req, .. }
            | Msg::Data { req, .. }
            | Msg::Eof { req, .. }
            | Msg::Exited { req, .. }
            | Msg::Signal { req, .. }
            | Msg::Failed { req, .. }
            | Msg::PingPeer { req, .. }
            | Msg::PingReport { req, .. }
            | Msg::SendBlobs { req, .. }
            | Msg::BlobCheck { req, .. }
            | Msg::BlobReport { req, .. }
            | Msg::Done { req }
            | Msg::MigrateOut { req, .. }
            | Msg::MigrateReport { req, .. }
            | Msg::MigrateProgress { req, .. }
            | Msg::Checkpoint { req, .. }
            | Msg::ImageChunk { req, .. }
            | Msg::RestoreImage { req } => Some(*req),
            Msg::Hello { .. }
            | Msg::Ping { .. }
            | Msg::Pong { .. }
            | Msg::PowerOff
            | Msg::Blob { .. }
            | Msg::MigrateBegin { .. }
            | Msg::MigrateChunk { .. }
            | Msg::MigrateEnd { .. }
            | Msg::MigrateAbort { .. }
            | Msg::MigrateRunning { .. }
            | Msg::MigrateFailed { .. }
            | Msg::MigratedOutput { .. }
            | Msg::MigratedExit { .. }
            | Msg::MigrateBeginLazy { .. }
            | Msg::PageFetch { .. }
            | Msg::PageData { .. }
            | Msg::PageRefused { .. }
            | Msg::PagesDone { .. }
            | Msg::PagesIn { .. } => None,
        }
    }

    /// Appends the encoded message to `out` (which is not cleared, so a
    /// caller can encode straight into a reused buffer).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        match self {
            Msg::Hello {
                endpoint,
                generation,
                release,
            } => {
                w.head(K_HELLO);
                w.u16(*endpoint);
                w.u32(*generation);
                w.str(release);
            }
            Msg::Ping { seq, t_ns } => {
                w.head(K_PING);
                w.u64(*seq);
                w.u64(*t_ns);
            }
            Msg::Pong { seq, t_ns } => {
                w.head(K_PONG);
                w.u64(*seq);
                w.u64(*t_ns);
            }
            Msg::InfoRequest { req } => {
                w.head(K_INFO_REQ);
                w.u32(*req);
            }
            Msg::Info { req, info } => {
                w.head(K_INFO);
                w.u32(*req);
                for s in [
                    &info.hostname,
                    &info.sysname,
                    &info.release,
                    &info.version,
                    &info.machine,
                    &info.cpus_online,
                ] {
                    w.str(s);
                }
                w.count(info.nodes.len());
                for n in &info.nodes {
                    w.u32(n.id);
                    w.str(&n.cpus);
                    w.u64(n.mem_total);
                }
                w.u64(info.mem_total);
                w.u64(info.uptime_ms);
            }
            Msg::Exec { req, exec } => {
                w.head(K_EXEC);
                w.u32(*req);
                w.count(exec.argv.len());
                for a in &exec.argv {
                    w.str(a);
                }
                w.count(exec.env.len());
                for (k, v) in &exec.env {
                    w.str(k);
                    w.str(v);
                }
                match &exec.cwd {
                    Some(c) => {
                        w.u8(1);
                        w.str(c);
                    }
                    None => w.u8(0),
                }
                w.u8(u8::from(exec.stdin));
            }
            Msg::Started { req, pid } => {
                w.head(K_STARTED);
                w.u32(*req);
                w.u32(*pid);
            }
            Msg::Data { req, stream, bytes } => {
                w.head(K_DATA);
                w.u32(*req);
                w.u8(stream.code());
                w.bytes(bytes);
            }
            Msg::Eof { req, stream } => {
                w.head(K_EOF);
                w.u32(*req);
                w.u8(stream.code());
            }
            Msg::Exited { req, status } => {
                w.head(K_EXITED);
                w.u32(*req);
                w.exit(*status);
            }
            Msg::Signal { req, signal } => {
                w.head(K_SIGNAL);
                w.u32(*req);
                w.i32(*signal);
            }
            Msg::Failed { req, message } => {
                w.head(K_FAILED);
                w.u32(*req);
                w.str(message);
            }
            Msg::PowerOff => w.head(K_POWEROFF),
            Msg::PingPeer { req, peer, count } => {
                w.head(K_PING_PEER);
                w.u32(*req);
                w.u16(*peer);
                w.u32(*count);
            }
            Msg::PingReport {
                req,
                count,
                rtt_min_ns,
                rtt_median_ns,
                rtt_max_ns,
            } => {
                w.head(K_PING_REPORT);
                w.u32(*req);
                w.u32(*count);
                w.u64(*rtt_min_ns);
                w.u64(*rtt_median_ns);
                w.u64(*rtt_max_ns);
            }
            Msg::Blob {
                seq,
                checksum,
                payload,
            } => {
                w.head(K_BLOB);
                w.u64(*seq);
                w.u64(*checksum);
                w.bytes(payload);
            }
            Msg::SendBlobs {
                req,
                peer,
                count,
                size,
                seed,
            } => {
                w.head(K_SEND_BLOBS);
                w.u32(*req);
                w.u16(*peer);
                w.u32(*count);
                w.u32(*size);
                w.u64(*seed);
            }
            Msg::BlobCheck { req, from } => {
                w.head(K_BLOB_CHECK);
                w.u32(*req);
                w.u16(*from);
            }
            Msg::BlobReport {
                req,
                from,
                good,
                bad,
                next_seq,
            } => {
                w.head(K_BLOB_REPORT);
                w.u32(*req);
                w.u16(*from);
                w.u64(*good);
                w.u64(*bad);
                w.u64(*next_seq);
            }
            Msg::Done { req } => {
                w.head(K_DONE);
                w.u32(*req);
            }
            Msg::MigrateOut { req, pid, to, lazy } => {
                w.head(K_MIGRATE_OUT);
                w.u32(*req);
                w.u32(*pid);
                w.u16(*to);
                w.u8(u8::from(*lazy));
            }
            Msg::MigrateBeginLazy { mig } => {
                w.head(K_MIGRATE_BEGIN_LAZY);
                w.u32(*mig);
            }
            Msg::PageFetch { mig, id, addr, len } => {
                w.head(K_PAGE_FETCH);
                w.u32(*mig);
                w.u32(*id);
                w.u64(*addr);
                w.u32(*len);
            }
            Msg::PageData {
                mig,
                id,
                addr,
                bytes,
            } => {
                w.head(K_PAGE_DATA);
                w.u32(*mig);
                w.u32(*id);
                w.u64(*addr);
                w.bytes(bytes);
            }
            Msg::PageRefused { mig, id, message } => {
                w.head(K_PAGE_REFUSED);
                w.u32(*mig);
                w.u32(*id);
                w.str(message);
            }
            Msg::PagesDone { mig } => {
                w.head(K_PAGES_DONE);
                w.u32(*mig);
            }
            Msg::PagesIn { mig } => {
                w.head(K_PAGES_IN);
                w.u32(*mig);
            }
            Msg::MigrateReport {
                req,
                new_pid,
                downtime_ns,
                total_ns,
                image_bytes,
            } => {
                w.head(K_MIGRATE_REPORT);
                w.u32(*req);
                w.u32(*new_pid);
                w.u64(*downtime_ns);
                w.u64(*total_ns);
                w.u64(*image_bytes);
            }
            Msg::MigrateProgress {
                req,
                new_pid,
                downtime_ns,
            } => {
                w.head(K_MIGRATE_PROGRESS);
                w.u32(*req);
                w.u32(*new_pid);
                w.u64(*downtime_ns);
            }
            Msg::MigrateBegin { mig } => {
                w.head(K_MIGRATE_BEGIN);
                w.u32(*mig);
            }
            Msg::MigrateChunk { mig, bytes } => {
                w.head(K_MIGRATE_CHUNK);
                w.u32(*mig);
                w.bytes(bytes);
            }
            Msg::MigrateEnd { mig } => {
                w.head(K_MIGRATE_END);
                w.u32(*mig);
            }
            Msg::MigrateAbort { mig } => {
                w.head(K_MIGRATE_ABORT);
                w.u32(*mig);
            }
            Msg::MigrateRunning { mig, pid } => {
                w.head(K_MIGRATE_RUNNING);
                w.u32(*mig);
                w.u32(*pid);
            }
            Msg::MigrateFailed { mig, message } => {
                w.head(K_MIGRATE_FAILED);
                w.u32(*mig);
                w.str(message);
            }
            Msg::MigratedOutput { mig, stream, bytes } => {
                w.head(K_MIGRATED_OUTPUT);
                w.u32(*mig);
                w.u8(stream.code());
                w.bytes(bytes);
            }
            Msg::MigratedExit { mig, status } => {
                w.head(K_MIGRATED_EXIT);
                w.u32(*mig);
                w.exit(*status);
            }
            Msg::Checkpoint { req, pid, kill } => {
                w.head(K_CHECKPOINT);
                w.u32(*req);
                w.u32(*pid);
                w.u8(u8::from(*kill));
            }
            Msg::ImageChunk { req, bytes } => {
                w.head(K_IMAGE_CHUNK);
                w.u32(*req);
                w.bytes(bytes);
            }
            Msg::RestoreImage { req } => {
                w.head(K_RESTORE_IMAGE);
                w.u32(*req);
            }
        }
    }

    /// The encoded message in a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// Decodes one message; the whole frame must be consumed.
    pub fn decode(frame: &[u8]) -> Result<Msg, DecodeError> {
        let mut r = Reader { buf: frame, at: 0 };
        let kind = r.u16()?;
        let version = r.u16()?;
        if version != WIRE_VERSION {
            return Err(DecodeError::Version(version));
        }
        let msg = match kind {
            K_HELLO => Msg::Hello {
                endpoint: r.u16()?,
                generation: r.u32()?,
                release: r.str("release")?,
            },
            K_PING => Msg::Ping {
                seq: r.u64()?,
                t_ns: r.u64()?,
            },
            K_PONG => Msg::Pong {
                seq: r.u64()?,
                t_ns: r.u64()?,
            },
            K_INFO_REQ => Msg::InfoRequest { req: r.u32()? },
            K_INFO => {
                let req = r.u32()?;
                let hostname = r.str("hostname")?;
                let sysname = r.str("sysname")?;
                let release = r.str("release")?;
                let version = r.str("version")?;
                let machine = r.str("machine")?;
                let cpus_online = r.str("cpus_online")?;
                // Each node takes at least 4 + 4 + 8 bytes.
                let n = r.count(16)?;
                let mut nodes = Vec::with_capacity(n);
                for _ in 0..n {
                    nodes.push(NodeInfo {
                        id: r.u32()?,
                        cpus: r.str("node cpus")?,
                        mem_total: r.u64()?,
                    });
                }
                Msg::Info {
                    req,
                    info: KernelInfo {
                        hostname,
                        sysname,
                        release,
                        version,
                        machine,
                        cpus_online,
                        nodes,
                        mem_total: r.u64()?,
                        uptime_ms: r.u64()?,
                    },
                }
            }
            K_EXEC => {
                let req = r.u32()?;
                let n = r.count(4)?;
                let mut argv = Vec::with_capacity(n);
                for _ in 0..n {
                    argv.push(r.str("argv")?);
                }
                let n = r.count(8)?;
                let mut env = Vec::with_capacity(n);
                for _ in 0..n {
                    env.push((r.str("env key")?, r.str("env value")?));
                }
                let cwd = match r.u8()? {
                    0 => None,
                    1 => Some(r.str("cwd")?),
                    v => return Err(bad("cwd flag", v)),
                };
                let stdin = match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(bad("stdin flag", v)),
                };
                Msg::Exec {
                    req,
                    exec: ExecRequest {
                        argv,
                        env,
                        cwd,
                        stdin,
                    },
                }
            }
            K_STARTED => Msg::Started {
                req: r.u32()?,
                pid: r.u32()?,
            },
            K_DATA => Msg::Data {
                req: r.u32()?,
                stream: Stream::from_code(r.u8()?)?,
                bytes: r.bytes()?.to_vec(),
            },
            K_EOF => Msg::Eof {
                req: r.u32()?,
                stream: Stream::from_code(r.u8()?)?,
            },
            K_EXITED => Msg::Exited {
                req: r.u32()?,
                status: r.exit()?,
            },
            K_SIGNAL => Msg::Signal {
                req: r.u32()?,
                signal: r.i32()?,
            },
            K_FAILED => Msg::Failed {
                req: r.u32()?,
                message: r.str("message")?,
            },
            K_POWEROFF => Msg::PowerOff,
            K_PING_PEER => Msg::PingPeer {
                req: r.u32()?,
                peer: r.u16()?,
                count: r.u32()?,
            },
            K_PING_REPORT => Msg::PingReport {
                req: r.u32()?,
                count: r.u32()?,
                rtt_min_ns: r.u64()?,
                rtt_median_ns: r.u64()?,
                rtt_max_ns: r.u64()?,
            },
            K_BLOB => Msg::Blob {
                seq: r.u64()?,
                checksum: r.u64()?,
                payload: r.bytes()?.to_vec(),
            },
            K_SEND_BLOBS => Msg::SendBlobs {
                req: r.u32()?,
                peer: r.u16()?,
                count: r.u32()?,
                size: r.u32()?,
                seed: r.u64()?,
            },
            K_BLOB_CHECK => Msg::BlobCheck {
                req: r.u32()?,
                from: r.u16()?,
            },
            K_BLOB_REPORT => Msg::BlobReport {
                req: r.u32()?,
                from: r.u16()?,
                good: r.u64()?,
                bad: r.u64()?,
                next_seq: r.u64()?,
            },
            K_DONE => Msg::Done { req: r.u32()? },
            K_MIGRATE_OUT => Msg::MigrateOut {
                req: r.u32()?,
                pid: r.u32()?,
                to: r.u16()?,
                lazy: match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(bad("lazy flag", v)),
                },
            },
            K_MIGRATE_BEGIN_LAZY => Msg::MigrateBeginLazy { mig: r.u32()? },
            K_PAGE_FETCH => Msg::PageFetch {
                mig: r.u32()?,
                id: r.u32()?,
                addr: r.u64()?,
                len: r.u32()?,
            },
            K_PAGE_DATA => Msg::PageData {
                mig: r.u32()?,
                id: r.u32()?,
                addr: r.u64()?,
                bytes: r.bytes()?.to_vec(),
            },
            K_PAGE_REFUSED => Msg::PageRefused {
                mig: r.u32()?,
                id: r.u32()?,
                message: r.str("message")?,
            },
            K_PAGES_DONE => Msg::PagesDone { mig: r.u32()? },
            K_PAGES_IN => Msg::PagesIn { mig: r.u32()? },
            K_MIGRATE_REPORT => Msg::MigrateReport {
                req: r.u32()?,
                new_pid: r.u32()?,
                downtime_ns: r.u64()?,
                total_ns: r.u64()?,
                image_bytes: r.u64()?,
            },
            K_MIGRATE_PROGRESS => Msg::MigrateProgress {
                req: r.u32()?,
                new_pid: r.u32()?,
                downtime_ns: r.u64()?,
            },
            K_MIGRATE_BEGIN => Msg::MigrateBegin { mig: r.u32()? },
            K_MIGRATE_CHUNK => Msg::MigrateChunk {
                mig: r.u32()?,
                bytes: r.bytes()?.to_vec(),
            },
            K_MIGRATE_END => Msg::MigrateEnd { mig: r.u32()? },
            K_MIGRATE_ABORT => Msg::MigrateAbort { mig: r.u32()? },
            K_MIGRATE_RUNNING => Msg::MigrateRunning {
                mig: r.u32()?,
                pid: r.u32()?,
            },
            K_MIGRATE_FAILED => Msg::MigrateFailed {
                mig: r.u32()?,
                message: r.str("message")?,
            },
            K_MIGRATED_OUTPUT => Msg::MigratedOutput {
                mig: r.u32()?,
                stream: Stream::from_code(r.u8()?)?,
                bytes: r.bytes()?.to_vec(),
            },
            K_MIGRATED_EXIT => Msg::MigratedExit {
                mig: r.u32()?,
                status: r.exit()?,
            },
            K_CHECKPOINT => Msg::Checkpoint {
                req: r.u32()?,
                pid: r.u32()?,
                kill: match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(bad("kill flag", v)),
                },
            },
            K_IMAGE_CHUNK => Msg::ImageChunk {
                req: r.u32()?,
                bytes: r.bytes()?.to_vec(),
            },
            K_RESTORE_IMAGE => Msg::RestoreImage { req: r.u32()? },
            k => return Err(DecodeError::UnknownKind(k)),
        };
        let left = frame.len() - r.at;
        if left != 0 {
            return Err(DecodeError::Trailing { count: left });
        }
        Ok(msg)
    }
}

fn bad(field: &'static str, v: u8) -> DecodeError {
    DecodeError::BadValue {
        field,
        value: u64::from(v),
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Stdin => "stdin",
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        })
    }
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn head(&mut self, kind: u16) {
        self.u16(kind);
        self.u16(WIRE_VERSION);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Lengths and counts are `u32`: a frame never approaches 4 GiB (rings
    /// are far smaller), so the conversion cannot truncate in practice; it
    /// saturates rather than wraps if it ever did, and the decoder then
    /// reports a truncated frame instead of misreading.
    fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.count(b.len());
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn exit(&mut self, status: ExitStatus) {
        match status {
            ExitStatus::Code(c) => {
                self.u8(0);
                self.i32(c);
            }
            ExitStatus::Signal(s) => {
                self.u8(1);
                self.i32(s);
            }
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let left = self.buf.len() - self.at;
        if n > left {
            return Err(DecodeError::Truncated {
                at: self.buf.len(),
                need: n - left,
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.array().map(i32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }
    fn len(&mut self) -> Result<usize, DecodeError> {
        // u32 always fits usize on the 64-bit targets we build for.
        Ok(self.u32()? as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.len()?;
        self.take(n)
    }
    fn exit(&mut self) -> Result<ExitStatus, DecodeError> {
        match self.u8()? {
            0 => Ok(ExitStatus::Code(self.i32()?)),
            1 => Ok(ExitStatus::Signal(self.i32()?)),
            v => Err(bad("exit kind", v)),
        }
    }
    fn str(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8(field))
    }
    /// A list count, refused when the rest of the frame cannot hold that
    /// many items of at least `min_item` bytes (so a forged count cannot
    /// make us reserve memory).
    fn count(&mut self, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.len()?;
        let left = self.buf.len() - self.at;
        if n.saturating_mul(min_item) > left {
            return Err(DecodeError::Truncated {
                at: self.buf.len(),
                need: n.saturating_mul(min_item) - left,
            });
        }
        Ok(n)
    }
}

/// The checksum used by the traffic checks (FNV-1a, 64 bit): cheap, and any
/// flipped or reordered byte changes it.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The deterministic payload of blob `seq` for a `SendBlobs` run: both
/// sides can regenerate it, so the receiver checks content, not just
/// the checksum the sender claims.
pub fn blob_payload(seed: u64, seq: u64, size: usize) -> Vec<u8> {
    let mut x = seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491_4f6c_dd1d;
    (0..size)
        .map(|_| {
            // xorshift64*: fast and good enough to catch corruption.
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()[7]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<Msg> {
        vec![
            Msg::Hello {
                endpoint: 3,
                generation: 7,
                release: "6.1.0-47-cloud-amd64".into(),
            },
            Msg::Ping { seq: 1, t_ns: 99 },
            Msg::Info {
                req: 4,
                info: KernelInfo {
                    hostname: "alpha".into(),
                    sysname: "Linux".into(),
                    release: "6.1".into(),
                    version: "#1 SMP".into(),
                    machine: "x86_64".into(),
                    cpus_online: "0-1".into(),
                    nodes: vec![NodeInfo {
                        id: 0,
                        cpus: "0-1".into(),
                        mem_total: 1 << 28,
                    }],
                    mem_total: 1 << 28,
                    uptime_ms: 1234,
                },
            },
            Msg::Exec {
                req: 5,
                exec: ExecRequest {
                    argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
                    env: vec![("A".into(), "b".into())],
                    cwd: Some("/tmp".into()),
                    stdin: true,
                },
            },
            Msg::Data {
                req: 5,
                stream: Stream::Stderr,
                bytes: vec![0, 255, 10],
            },
            Msg::Exited {
                req: 5,
                status: ExitStatus::Signal(9),
            },
            Msg::PowerOff,
            Msg::Blob {
                seq: 2,
                checksum: 3,
                payload: vec![1; 100],
            },
        ]
    }

    #[test]
    fn round_trip_samples() {
        for m in sample() {
            assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn hostile_frames_are_errors() {
        let m = Msg::Exec {
            req: 1,
            exec: ExecRequest {
                argv: vec!["x".into()],
                env: vec![],
                cwd: None,
                stdin: false,
            },
        }
        .encode();
        // Every truncation is an error, never a panic.
        for n in 0..m.len() {
            assert!(matches!(
                Msg::decode(&m[..n]),
                Err(DecodeError::Truncated { .. })
            ));
        }
        // A forged argv count of 2^32-1 is refused before any allocation.
        let mut forged = m.clone();
        forged[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Msg::decode(&forged),
            Err(DecodeError::Truncated { .. })
        ));
        let mut trailing = m.clone();
        trailing.push(0);
        assert_eq!(
            Msg::decode(&trailing),
            Err(DecodeError::Trailing { count: 1 })
        );
        assert_eq!(
            Msg::decode(&[0xff, 0xff, 1, 0]),
            Err(DecodeError::UnknownKind(0xffff))
        );
        assert_eq!(Msg::decode(&[1, 0, 9, 0]), Err(DecodeError::Version(9)));
        let bad_utf8 = [
            &K_FAILED.to_le_bytes()[..],
            &WIRE_VERSION.to_le_bytes(),
            &1u32.to_le_bytes(),
            &1u32.to_le_bytes(),
            &[0xff],
        ]
        .concat();
        assert_eq!(Msg::decode(&bad_utf8), Err(DecodeError::Utf8("message")));
    }

    #[test]
    fn blob_payload_is_deterministic_and_seed_dependent() {
        assert_eq!(blob_payload(1, 2, 64), blob_payload(1, 2, 64));
        assert_ne!(blob_payload(1, 2, 64), blob_payload(1, 3, 64));
        assert_ne!(
            checksum(&blob_payload(1, 2, 64)),
            checksum(&blob_payload(2, 2, 64))
        );
    }

    fn arb_string() -> impl Strategy<Value = String> {
        proptest::string::string_regex(".{0,12}").unwrap()
    }

    fn arb_msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            (any::<u16>(), any::<u32>(), arb_string()).prop_map(
                |(endpoint, generation, release)| {
                    Msg::Hello {
                        endpoint,
                        generation,
                        release,
                    }
                }
            ),
            (
                any::<u32>(),
                proptest::collection::vec(arb_string(), 0..4),
                proptest::collection::vec((arb_string(), arb_string()), 0..3),
                proptest::option::of(arb_string()),
                any::<bool>()
            )
                .prop_map(|(req, argv, env, cwd, stdin)| Msg::Exec {
                    req,
                    exec: ExecRequest {
                        argv,
                        env,
                        cwd,
                        stdin
                    }
                }),
            (
                any::<u32>(),
                0u8..3,
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(req, s, bytes)| {
                    Msg::Data {
                        req,
                        stream: Stream::from_code(s).unwrap(),
                        bytes,
                    }
                }),
            (any::<u32>(), any::<bool>(), any::<i32>()).prop_map(|(req, sig, v)| Msg::Exited {
                req,
                status: if sig {
                    ExitStatus::Signal(v)
                } else {
                    ExitStatus::Code(v)
                },
            }),
            (any::<u32>(), arb_string()).prop_map(|(req, message)| Msg::Failed { req, message }),
            (
                any::<u32>(),
                any::<u16>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(req, from, good, bad, next_seq)| Msg::BlobReport {
                    req,
                    from,
                    good,
                    bad,
                    next_seq
                }),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(mig, bytes)| Msg::MigrateChunk { mig, bytes }),
            (any::<u32>(), any::<bool>(), any::<i32>()).prop_map(|(mig, sig, v)| {
                Msg::MigratedExit {
                    mig,
                    status: if sig {
                        ExitStatus::Signal(v)
                    } else {
                        ExitStatus::Code(v)
                    },
                }
            }),
            (any::<u32>(), any::<u32>(), any::<u16>(), any::<bool>())
                .prop_map(|(req, pid, to, lazy)| Msg::MigrateOut { req, pid, to, lazy }),
            (
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(mig, id, addr, bytes)| Msg::PageData {
                    mig,
                    id,
                    addr,
                    bytes
                }),
            (any::<u32>(), any::<u32>(), any::<bool>())
                .prop_map(|(req, pid, kill)| Msg::Checkpoint { req, pid, kill }),
            any::<u32>().prop_map(|mig| Msg::PagesDone { mig }),
            any::<u32>().prop_map(|mig| Msg::PagesIn { mig }),
            (any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(req, new_pid, downtime_ns)| {
                Msg::MigrateProgress {
                    req,
                    new_pid,
                    downtime_ns,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(m in arb_msg()) {
            prop_assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
        }

        /// The fuzz target in proptest form: arbitrary bytes never panic.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Msg::decode(&bytes);
        }

        /// Valid frames with a flipped byte decode to an error or another
        /// message, never a panic.
        #[test]
        fn mutated_frames_never_panic(m in arb_msg(), at in any::<usize>(), x in any::<u8>()) {
            let mut b = m.encode();
            let i = at % b.len();
            b[i] ^= x;
            let _ = Msg::decode(&b);
        }
    }
}
