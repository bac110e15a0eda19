//! Wire messages between agents: one message per ring frame.
//!
//! Every message is declared once, in the `messages!` table below: its
//! kind number, its role in a request (see [`Role`]), its name and its
//! fields. The variant of [`Msg`], the [`Kind`] number, the encoding, the
//! decoding, [`Msg::req`] and [`Msg::is_final`] all come from that row, so
//! they cannot disagree.
//!
//! The encoding is little-endian and explicit (no serde, no layout tricks;
//! the codec is [`crate::codec`], shared with the process image): a 4-byte
//! header — kind (`u16`) and format version (`u16`) — then the fields in
//! order, each laid out as its type's [`Field`] impl says. Decoding treats
//! every byte as hostile: each length is checked against what is left,
//! each count against the least bytes an item takes, every string is
//! checked UTF-8, every flag and code against its set, trailing bytes are
//! an error. It never panics and never allocates more than the frame it was
//! handed.
//!
//! Adding a message: a new row with a new kind number (old numbers are
//! never renumbered or reused), then handle its [`Kind`] in the agent facet
//! it belongs to (see [`crate::agent`]). The round-trip and garbage
//! property tests cover every row by themselves.

use std::fmt;

use crate::codec::{field_struct, Field, FieldError, Reader, Short, Writer};

/// The version of this encoding; a peer speaking another is refused at
/// `Hello` rather than misread. Version 2 added `any_cpu` to the move
/// requests (`MigrateOut`, `MigrateTreeOut`, `MigrateLazyTreeOut`), and
/// `DsmForgetProcess`.
pub const WIRE_VERSION: u16 = 2;

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

impl From<Short> for DecodeError {
    fn from(s: Short) -> Self {
        DecodeError::Truncated {
            at: s.at,
            need: s.need,
        }
    }
}

impl From<FieldError> for DecodeError {
    fn from(e: FieldError) -> Self {
        match e {
            FieldError::Short(s) => s.into(),
            FieldError::BadValue { field, value } => DecodeError::BadValue { field, value },
            FieldError::Utf8(field) => DecodeError::Utf8(field),
        }
    }
}

/// Which output stream of a remote process a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

impl Field for Stream {
    const MIN: usize = 1;
    fn put(&self, w: &mut Writer<'_>) {
        w.u8(match self {
            Stream::Stdin => 0,
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        });
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, FieldError> {
        match r.u8()? {
            0 => Ok(Stream::Stdin),
            1 => Ok(Stream::Stdout),
            2 => Ok(Stream::Stderr),
            v => Err(FieldError::BadValue {
                field,
                value: u64::from(v),
            }),
        }
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

/// A byte (0 exited, 1 killed by a signal), then the code or signal.
impl Field for ExitStatus {
    const MIN: usize = 5;
    fn put(&self, w: &mut Writer<'_>) {
        let (how, v) = match *self {
            ExitStatus::Code(c) => (0, c),
            ExitStatus::Signal(s) => (1, s),
        };
        w.u8(how);
        w.i32(v);
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, FieldError> {
        match r.u8()? {
            0 => Ok(ExitStatus::Code(r.i32()?)),
            1 => Ok(ExitStatus::Signal(r.i32()?)),
            v => Err(FieldError::BadValue {
                field,
                value: u64::from(v),
            }),
        }
    }
}

field_struct! {
    /// A NUMA node as a kernel sees it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct NodeInfo {
        pub id: u32,
        /// Linux cpulist text, as in `/sys/devices/system/node/nodeN/cpulist`.
        pub cpus: String,
        pub mem_total: u64,
    }
}

field_struct! {
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
}

field_struct! {
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
}

field_struct! {
    /// One region as one kernel's DSM sees it (`mkctl dsm show`).
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct DsmRegionStat {
        pub region: u32,
        pub name: String,
        pub size: u64,
        pub home: u16,
        /// Processes mapping it here.
        pub mappers: u64,
        /// Pages held read-only, and exclusive, here.
        pub shared: u64,
        pub exclusive: u64,
        pub read_faults: u64,
        pub write_faults: u64,
        /// Requests sent to the home.
        pub requests: u64,
        pub invalidations: u64,
        pub bytes_in: u64,
        pub bytes_out: u64,
        /// Faults failed (SIGBUS).
        pub failed: u64,
        /// Pages lost with their owner (at the home).
        pub lost_pages: u64,
        /// Faults resolved, their mean and 99th percentile latency.
        pub faults: u64,
        pub mean_us: u64,
        pub p99_us: u64,
        /// Why it cannot be served any more (empty when it can).
        pub error: String,
    }
}

field_struct! {
    /// A thread of a split process away from its kernel (`mkctl threads`).
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct AwayThread {
        /// The process and the thread, as the process's kernel sees them.
        pub pid: u32,
        pub tid: u32,
        /// The kernel it runs on, and its shadow's pid there.
        pub at: u16,
        pub shadow_pid: u32,
    }
}

/// A message's part in the request/answer pattern (the second column of
/// the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not tied to a request (`peer` in the table): greetings, probes,
    /// traffic, and the protocols that key their own conversations (a
    /// migration's `mig`).
    Peer,
    /// Carries the request id `req` (`req`): a request, or an answer that
    /// is not the last.
    Req,
    /// Carries `req` and ends the request (`end`): the final answer.
    End,
}

macro_rules! role {
    (peer) => {
        Role::Peer
    };
    (req) => {
        Role::Req
    };
    (end) => {
        Role::End
    };
}

/// The request id of `$m`, a `Msg::$name`, by its role.
macro_rules! req_of {
    (peer, $m:ident, $name:ident) => {{
        let _ = $m;
        None
    }};
    ($role:ident, $m:ident, $name:ident) => {
        if let Msg::$name { req, .. } = $m {
            Some(*req)
        } else {
            None
        }
    };
}

/// Declares every message: `kind role Name { fields }` per row.
macro_rules! messages {
    ($(
        $(#[$doc:meta])*
        $kind:literal $role:ident $name:ident $({ $( $(#[$fdoc:meta])* $f:ident : $t:ty ),* $(,)? })?
    ),* $(,)?) => {
        /// One message between two agents (or the host daemon and an agent).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Msg {
            $( $(#[$doc])* $name $({ $( $(#[$fdoc])* $f: $t ),* })?, )*
        }

        /// A message's kind number, as it goes on the wire.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum Kind {
            $( $name = $kind, )*
        }

        impl Kind {
            /// Every kind, in table order.
            pub const ALL: &'static [Kind] = &[$(Kind::$name),*];

            pub fn from_u16(k: u16) -> Option<Kind> {
                match k {
                    $( $kind => Some(Kind::$name), )*
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $( Kind::$name => stringify!($name), )*
                }
            }

            pub fn role(self) -> Role {
                match self {
                    $( Kind::$name => role!($role), )*
                }
            }
        }

        impl Msg {
            pub fn kind(&self) -> Kind {
                match self {
                    $( Msg::$name { .. } => Kind::$name, )*
                }
            }

            /// The request id the message answers or belongs to, if any.
            pub fn req(&self) -> Option<u32> {
                match self {
                    $( m @ Msg::$name { .. } => req_of!($role, m, $name), )*
                }
            }

            /// Appends the encoded message to `out` (which is not cleared,
            /// so a caller can encode straight into a reused buffer).
            pub fn encode_into(&self, out: &mut Vec<u8>) {
                let w = &mut Writer(out);
                w.u16(self.kind() as u16);
                w.u16(WIRE_VERSION);
                match self {
                    $( Msg::$name $({ $($f),* })? => { $($( Field::put($f, w); )*)? } )*
                }
            }

            /// Decodes one message; the whole frame must be consumed.
            pub fn decode(frame: &[u8]) -> Result<Msg, DecodeError> {
                let r = &mut Reader::new(frame);
                let kind = r.u16()?;
                let version = r.u16()?;
                if version != WIRE_VERSION {
                    return Err(DecodeError::Version(version));
                }
                let msg = match Kind::from_u16(kind) {
                    $( Some(Kind::$name) => Msg::$name $({ $(
                        $f: <$t as Field>::get(r, stringify!($f))?
                    ),* })?, )*
                    None => return Err(DecodeError::UnknownKind(kind)),
                };
                match r.remaining() {
                    0 => Ok(msg),
                    count => Err(DecodeError::Trailing { count }),
                }
            }
        }

        /// Strategies for every kind, for the property tests.
        #[cfg(test)]
        pub(crate) fn arb_of(kind: Kind) -> proptest::strategy::BoxedStrategy<Msg> {
            use proptest::prelude::*;
            match kind {
                $( Kind::$name => arb_variant!($name $({ $($f : $t),* })?), )*
            }
        }
    };
}

#[cfg(test)]
macro_rules! arb_variant {
    ($name:ident) => {
        Just(Msg::$name).boxed()
    };
    ($name:ident { $($f:ident : $t:ty),* }) => {
        any::<($($t,)*)>()
            .prop_map(|($($f,)*)| Msg::$name { $($f),* })
            .boxed()
    };
}

messages! {
    /// First frame on a channel after attaching: who is talking.
    1 peer Hello { endpoint: u16, generation: u32, release: String },
    /// Latency probe; the peer answers `Pong` with the same fields.
    2 peer Ping { seq: u64, t_ns: u64 },
    3 peer Pong { seq: u64, t_ns: u64 },
    /// Asks for `KernelInfo`.
    4 req InfoRequest { req: u32 },
    5 end Info { req: u32, info: KernelInfo },
    /// Runs a process; `Started`, then `Data`/`Eof`, then `Exited` follow,
    /// all carrying `req`.
    6 req Exec { req: u32, exec: ExecRequest },
    7 req Started { req: u32, pid: u32 },
    8 req Data { req: u32, stream: Stream, bytes: Vec<u8> },
    9 req Eof { req: u32, stream: Stream },
    10 end Exited { req: u32, status: ExitStatus },
    /// Sends a signal to a process started by `Exec` (by its `req`).
    11 req Signal { req: u32, signal: i32 },
    /// The request failed before or instead of its normal answer.
    12 end Failed { req: u32, message: String },
    /// Power the kernel off cleanly.
    13 peer PowerOff,
    /// Asks the agent to ping `peer` directly, `count` times, and report.
    14 req PingPeer { req: u32, peer: u16, count: u32 },
    15 end PingReport {
        req: u32,
        count: u32,
        rtt_min_ns: u64,
        rtt_median_ns: u64,
        rtt_max_ns: u64,
    },
    /// Traffic check: the receiver verifies the order and checksum of
    /// `Blob`s from each sender, and reports on `BlobCheck`.
    16 peer Blob { seq: u64, checksum: u64, payload: Vec<u8> },
    /// Asks the agent to send `count` blobs of `size` bytes to `peer`
    /// (endpoint 0 is the host), seeded by `seed`.
    17 req SendBlobs { req: u32, peer: u16, count: u32, size: u32, seed: u64 },
    /// Asks the agent how many blobs arrived from `from`, intact and in order.
    18 req BlobCheck { req: u32, from: u16 },
    19 end BlobReport { req: u32, from: u16, good: u64, bad: u64, next_seq: u64 },
    /// Generic success answer to a request without data.
    20 end Done { req: u32 },
    /// Asks the agent to move its process `pid` to endpoint `to`; `lazy`:
    /// resume after the eager pages, the rest follows on demand; `any_cpu`:
    /// the destination is not asked for the CPU extensions the program
    /// picked its code for (the user vouches it does not use those it
    /// lacks; `migrate::cpu::unchecked`).
    21 req MigrateOut { req: u32, pid: u32, to: u16, lazy: bool, any_cpu: bool },
    /// The end of a `MigrateOut`: the process runs on the destination as
    /// `new_pid`; the frozen original is gone.
    22 end MigrateReport {
        req: u32,
        new_pid: u32,
        downtime_ns: u64,
        total_ns: u64,
        image_bytes: u64,
        /// Pages carried, with content or marked all-zero (in the image and
        /// after it).
        pages: u64,
    },
    /// Origin to destination: a process image follows in `MigrateChunk`s,
    /// closed by `MigrateEnd` (or `MigrateAbort`). `mig` is the origin's id.
    /// The process's output and end go to its home, the kernel whose exec
    /// (or restore) holds its first output, as `home`'s move `home_mig`
    /// (the origin itself and `mig` on a first move).
    23 peer MigrateBegin { mig: u32, home: u16, home_mig: u32 },
    24 peer MigrateChunk { mig: u32, bytes: Vec<u8> },
    25 peer MigrateEnd { mig: u32 },
    26 peer MigrateAbort { mig: u32 },
    /// Destination to origin: the process runs here as `pid`.
    27 peer MigrateRunning { mig: u32, pid: u32 },
    /// Destination to origin: the restore failed; nothing of it runs.
    28 peer MigrateFailed { mig: u32, message: String },
    /// Where a moved process runs, to its home (`mig` is the home's id):
    /// what it wrote, for its original stdout/stderr.
    29 peer MigratedOutput { mig: u32, stream: Stream, bytes: Vec<u8> },
    /// Where a moved process ran, to its home: it ended.
    30 peer MigratedExit { mig: u32, status: ExitStatus },
    /// Asks for an image of process `pid` (checkpoint); `ImageChunk`s then
    /// `Done` answer. With `kill` the process is stopped after the image.
    31 req Checkpoint { req: u32, pid: u32, kill: bool },
    32 req ImageChunk { req: u32, bytes: Vec<u8> },
    /// Restores the image that follows in `ImageChunk`s (closed by an
    /// empty chunk); answered like `Exec`: `Started`, `Data`, `Exited`.
    33 req RestoreImage { req: u32 },
    /// Origin to destination: a lazy image follows (see `MigrateBegin`).
    34 peer MigrateBeginLazy { mig: u32, home: u16, home_mig: u32 },
    /// Destination to origin: `len` bytes of pages at `addr` (answer
    /// `PageData` with the same `id`, or `PageRefused`). In a lazy tree's
    /// move, the page messages of its `k`-th live process carry
    /// [`tree_page_id`]`(mig, k)` for `mig`.
    35 peer PageFetch { mig: u32, id: u32, addr: u64, len: u32 },
    /// Origin to destination: pages at `addr`; `id` 0 is a background push.
    36 peer PageData { mig: u32, id: u32, addr: u64, bytes: Vec<u8> },
    37 peer PageRefused { mig: u32, id: u32, message: String },
    /// Origin to destination: every page has been pushed.
    38 peer PagesDone { mig: u32 },
    /// Destination to origin: the copy's pager needs nothing more (every
    /// page is in, or the process ended). Only then may the origin drop
    /// what serves fetches and let go of its frozen original: a fetch sent
    /// just before the last push arrived is still answered.
    39 peer PagesIn { mig: u32 },
    /// Progress of a `MigrateOut` (not its end): the copy runs on the
    /// destination as `new_pid`, after `downtime_ns`; a lazy move goes on
    /// moving pages until its `MigrateReport`.
    40 req MigrateProgress { req: u32, new_pid: u32, downtime_ns: u64 },
    /// DSM, a kernel's cache to the page's home: a fault here needs the
    /// page (`write`: the only, writable copy). See `dsm/README.md`.
    41 peer DsmRequest { region: u32, page: u64, write: bool },
    /// DSM, home to cache: granted; `data` is the page's content, or empty
    /// when the cache holds the current one. `version` counts the page's
    /// exclusive grants.
    42 peer DsmGrant { region: u32, page: u64, write: bool, version: u64, data: Vec<u8> },
    /// DSM, home to cache: give the page up (`downgrade`: keep a read-only
    /// copy).
    43 peer DsmInvalidate { region: u32, page: u64, downgrade: bool },
    /// DSM, cache to home: done; the content when it held the page
    /// exclusive, else empty.
    44 peer DsmAck { region: u32, page: u64, data: Vec<u8> },
    /// DSM, home to cache: the page can never be served (it was lost with
    /// the kernel that held it).
    45 peer DsmFail { region: u32, page: u64 },
    /// DSM, to the registry (endpoint 0): open region `name` of `size`
    /// bytes, creating it (zero-filled, homed at the asking kernel) the
    /// first time.
    46 req DsmOpen { req: u32, name: String, size: u64 },
    47 end DsmOpened { req: u32, region: u32, size: u64, home: u16 },
    /// DSM: what a kernel holds and counted, per region.
    48 req DsmStat { req: u32 },
    49 end DsmStats { req: u32, regions: Vec<DsmRegionStat> },
    /// DSM, registry to every kernel: region `region` was removed; forget
    /// it (it is mapped nowhere).
    50 peer DsmDrop { region: u32 },
    /// Before a move, origin to destination: could a process with these
    /// files open be restored there (the files, time namespaces, the CPU)?
    /// `devices[i]`: `paths[i]` is one of the devices carried (else a
    /// regular file); `cpu`: the user-visible extensions the processes'
    /// code was picked for (`migrate::cpu::picked`: the origin CPU's, or
    /// fewer), `fp_size` and `xfeatures` the origin's register state's size
    /// and components
    /// (`migrate::cpu`). `problems`
    /// names what would fail, and why.
    51 req RestoreProbe { req: u32, paths: Vec<String>, devices: Vec<bool>, cpu: Vec<String>, fp_size: u32, xfeatures: u64 },
    52 end RestoreProbed { req: u32, problems: Vec<String> },
    /// To the kernel where process `pid` began: move its thread `tid` to
    /// endpoint `to` (back home when `to` is that kernel). See
    /// `agent/threads.rs`.
    /// `reply_buf` non-zero: the thread asked itself (`mk_migrate`) and
    /// waits in `read(reply_fd, reply_buf, ..)` where it runs now.
    53 req ThreadMove { req: u32, pid: u32, tid: u32, to: u16, reply_fd: i32, reply_buf: u64 },
    /// The thread runs at `at` (in shadow process `shadow_pid` there; 0 at
    /// home), after `downtime_ns` stopped.
    54 end ThreadMoved { req: u32, at: u16, shadow_pid: u32, downtime_ns: u64 },
    /// Origin to destination: restore a shadow for thread `tid` of the
    /// origin's process `pid` from the image that follows in
    /// `ThreadImage`s (an empty one ends it); `ShadowStarted` answers.
    /// `reply_buf` non-zero: the shadow's thread moved itself; it gets a
    /// connection to this agent and its answer there.
    55 req ShadowStart { req: u32, pid: u32, tid: u32, reply_buf: u64 },
    56 req ThreadImage { req: u32, bytes: Vec<u8> },
    57 end ShadowStarted { req: u32, pid: u32 },
    /// Origin to destination: stop shadow `pid` and give its thread's
    /// state back (an image without pages).
    /// (`reply_buf` non-zero: its thread moves itself and waits in a read
    /// of `reply_fd`, which the state given back completes.)
    58 req ShadowStop { req: u32, pid: u32, reply_fd: i32, reply_buf: u64 },
    59 end ShadowStopped { req: u32, image: Vec<u8> },
    /// Destination to origin: the shadow of thread `tid` of the origin's
    /// process `pid` ended by itself.
    60 peer ShadowEnded { pid: u32, tid: u32, status: ExitStatus },
    /// Origin to destination: the process ended; kill shadow `pid`.
    61 peer ShadowKill { pid: u32 },
    /// Destination to origin: what a shadow of the origin's process `pid`
    /// wrote, for the process's own stdout/stderr.
    62 peer ShadowOutput { pid: u32, stream: Stream, bytes: Vec<u8> },
    /// Which threads of this kernel's processes run elsewhere?
    63 req ThreadsList { req: u32 },
    64 end ThreadsListed { req: u32, away: Vec<AwayThread> },
    /// A shadow's `futex` call (its six arguments), to the kernel of the
    /// process `pid`, every futex's home; `FutexDone` answers with the
    /// call's result (`ret` as i64: >= 0 the value, < 0 a -errno).
    65 req FutexCall { req: u32, pid: u32, args: Vec<u64> },
    66 end FutexDone { req: u32, ret: u64 },
    /// Destination to origin: the shadow of thread `tid` of the origin's
    /// process `pid` called `exit_group(code)`: the whole process ends.
    67 peer ShadowExitGroup { pid: u32, tid: u32, code: i32 },
    /// Progress of a `MigrateOut` (not its end): `bytes` of image and pages
    /// have gone to the destination so far (sent every few hundred ms while
    /// they flow).
    68 req MigrateSent { req: u32, bytes: u64 },
    /// A kernel a moved process left, to its home (`mig` is the home's id):
    /// all it wrote there has been sent; what follows comes from `to`.
    69 peer MigratedAway { mig: u32, to: u16 },
    /// Origin to destination: a background push of `npages` pages of
    /// zeros at `addr` (a count, not 4096 bytes each; at most
    /// `migrate::image::MAX_RUN_PAGES`).
    70 peer PagesZero { mig: u32, addr: u64, npages: u32 },
    /// A `MigrateOut` of `pid` with all its descendants (`--tree`;
    /// stop-and-copy), answered as one: `MigrateProgress`, then
    /// `MigrateReport` (the top's new pid) or `Failed`.
    71 req MigrateTreeOut { req: u32, pid: u32, to: u16, any_cpu: bool },
    /// A `Checkpoint` of `pid` with all its descendants: a tree image.
    72 req CheckpointTree { req: u32, pid: u32, kill: bool },
    /// A `MigrateTreeOut` in lazy mode: each process of the tree resumes
    /// before its pages have moved, which follow as for a lazy `MigrateOut`.
    73 req MigrateLazyTreeOut { req: u32, pid: u32, to: u16, any_cpu: bool },
    /// DSM, a kernel to the registry: its split process `pid` ended; the
    /// regions its memory became (`p<kernel>.<pid>.*`, homed there) go.
    74 peer DsmForgetProcess { pid: u32 },
}

/// The id a lazy tree's `k`-th live process's pages go by (`PageFetch`,
/// `PageData`, `PagesZero`, `PagesDone`) in the move `mig`: `mig` plus
/// `(k + 1) * 2^24`. Move ids stay below 2^24 (see
/// `agent::migration`), so the ids of no two processes of any moves meet.
pub fn tree_page_id(mig: u32, k: usize) -> u32 {
    (mig & 0x00ff_ffff) | (((k as u32) + 1) << 24)
}

impl Msg {
    /// The encoded message in a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// True for the answer that ends a request.
    pub fn is_final(&self) -> bool {
        self.kind().role() == Role::End
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
    use proptest::strategy::Union;
    use proptest::test_runner::TestRunner;

    impl Arbitrary for Stream {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            prop_oneof![
                Just(Stream::Stdin),
                Just(Stream::Stdout),
                Just(Stream::Stderr)
            ]
            .boxed()
        }
    }

    impl Arbitrary for ExitStatus {
        type Parameters = ();
        type Strategy = BoxedStrategy<Self>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            (any::<bool>(), any::<i32>())
                .prop_map(|(sig, v)| {
                    if sig {
                        ExitStatus::Signal(v)
                    } else {
                        ExitStatus::Code(v)
                    }
                })
                .boxed()
        }
    }

    fn hex(v: &[u8]) -> String {
        v.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sample() -> Vec<Msg> {
        vec![
            Msg::Info {
                req: 4,
                info: KernelInfo {
                    hostname: "alpha".into(),
                    sysname: "Linux".into(),
                    release: "6.1".into(),
                    version: "#1".into(),
                    machine: "x86_64".into(),
                    cpus_online: "0-1".into(),
                    nodes: vec![NodeInfo {
                        id: 1,
                        cpus: "0".into(),
                        mem_total: 1 << 28,
                    }],
                    mem_total: 1 << 29,
                    uptime_ms: 1234,
                },
            },
            Msg::Exec {
                req: 5,
                exec: ExecRequest {
                    argv: vec!["sh".into(), "-c".into()],
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
            Msg::MigrateOut {
                req: 1,
                pid: 2,
                to: 3,
                lazy: true,
                any_cpu: true,
            },
            Msg::PowerOff,
            Msg::PageData {
                mig: 7,
                id: 8,
                addr: 0x7fff_0000,
                bytes: vec![1, 2],
            },
            Msg::MigratedExit {
                mig: 9,
                status: ExitStatus::Code(-1),
            },
        ]
    }

    /// The bytes the hand-written encoder of wire version 1 produced for
    /// `sample()` (with version 2's number, and `MigrateOut`'s `any_cpu`
    /// byte): the table-made one must match them byte for byte, or agents
    /// of the two builds would misread each other.
    const GOLDEN: [&str; 8] = [
        "050002000400000005000000616c706861050000004c696e757803000000362e31020000002331060000007838365f363403000000302d310100000001000000010000003000000010000000000000002000000000d204000000000000",
        "060002000500000002000000020000007368020000002d63010000000100000041010000006201040000002f746d7001",
        "0800020005000000020300000000ff0a",
        "0a000200050000000109000000",
        "15000200010000000200000003000101",
        "0d000200",
        "2400020007000000080000000000ff7f00000000020000000102",
        "1e0002000900000000ffffffff",
    ];

    #[test]
    fn encoding_is_the_one_of_wire_version_2() {
        for (m, golden) in sample().iter().zip(GOLDEN) {
            assert_eq!(hex(&m.encode()), golden, "{m:?}");
            assert_eq!(&Msg::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn kinds_roles_and_request_ids_come_from_the_table() {
        for &k in Kind::ALL {
            assert_eq!(Kind::from_u16(k as u16), Some(k), "{}", k.name());
        }
        assert_eq!(Kind::ALL.len(), 74);
        assert_eq!(Kind::from_u16(0), None);
        let exited = Msg::Exited {
            req: 5,
            status: ExitStatus::Code(0),
        };
        assert_eq!((exited.req(), exited.is_final()), (Some(5), true));
        let data = &sample()[2];
        assert_eq!((data.req(), data.is_final()), (Some(5), false));
        let page = &sample()[6];
        assert_eq!((page.req(), page.is_final()), (None, false));
        assert_eq!(Msg::PowerOff.kind(), Kind::PowerOff);
        assert_eq!(Kind::MigrateProgress.role(), Role::Req);
        assert_eq!(Kind::ThreadImage.role(), Role::Req);
        assert_eq!(Kind::ShadowStopped.role(), Role::End);
        assert_eq!(Kind::ShadowKill.role(), Role::Peer);
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
        // A flag other than 0 or 1 is refused by name.
        let mut flag = m.clone();
        *flag.last_mut().unwrap() = 2;
        assert_eq!(
            Msg::decode(&flag),
            Err(DecodeError::BadValue {
                field: "stdin",
                value: 2
            })
        );
        assert_eq!(
            Msg::decode(&[&[0xff, 0xff][..], &WIRE_VERSION.to_le_bytes()].concat()),
            Err(DecodeError::UnknownKind(0xffff))
        );
        assert_eq!(Msg::decode(&[1, 0, 9, 0]), Err(DecodeError::Version(9)));
        let bad_utf8 = [
            &(Kind::Failed as u16).to_le_bytes()[..],
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

    /// Any message of any kind.
    fn arb_msg() -> impl Strategy<Value = Msg> {
        Union::new(Kind::ALL.iter().map(|&k| arb_of(k)))
    }

    /// Every kind on its own, so none is left to chance: values round-trip,
    /// every truncation is an error, and any bytes after a valid header of
    /// that kind decode to an error or a message, never a panic.
    #[test]
    fn every_kind_round_trips_and_survives_garbage() {
        for &k in Kind::ALL {
            let mut runner = TestRunner::new(proptest::test_runner::Config::with_cases(32));
            let garbage = (arb_of(k), proptest::collection::vec(any::<u8>(), 0..96));
            runner
                .run(&garbage, |(m, junk)| {
                    prop_assert_eq!(m.kind(), k);
                    let b = m.encode();
                    prop_assert_eq!(&Msg::decode(&b).unwrap(), &m);
                    for n in 0..b.len() {
                        prop_assert!(Msg::decode(&b[..n]).is_err());
                    }
                    let mut g = b[..4].to_vec();
                    g.extend_from_slice(&junk);
                    let _ = Msg::decode(&g);
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("{}: {e}", k.name()));
        }
    }

    proptest! {
        // Every kind is covered on its own above; these mix them.
        #![proptest_config(proptest::test_runner::Config::with_cases(96))]

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
