//! The process image: its types, a streaming encoder over `io::Write` and a
//! paranoid streaming decoder over `io::Read`. The byte layout is specified in
//! `README.md` beside this file; this module is its only implementation.
//!
//! The decoder treats the stream as hostile (it may come from another
//! kernel): every count and length is bounded before anything is allocated,
//! addresses are page-aligned and below [`USER_TOP`], mappings are sorted and
//! disjoint, every page lands inside a recorded, accessible, non-special
//! mapping and at most once, and a checksum over every byte closes the image.
//! It returns errors; it never panics. This module does no syscalls.

use std::io::{self, Read, Write};

use xxhash_rust::xxh3::Xxh3;

use crate::codec::{Reader, Short, Writer};

/// First bytes of every image.
pub const MAGIC: [u8; 8] = *b"MKPROCIM";
/// Version of the layout written by this code; others are refused.
/// Version 2 added the header checksum; version 3 the open files; version 4
/// timerfds, signalfds, pipes and socket pairs with their bytes, and shared
/// descriptions; version 5 epolls with their watches and POSIX timers;
/// version 6 memfds; version 7 the origin's vDSO bytes and XSAVE
/// components; version 8 the CPU extensions the program's code was picked
/// for.
pub const VERSION: u16 = 8;
/// ELF machine number of x86_64, the only architecture of version 1.
pub const ARCH_X86_64: u16 = 0x3E;
/// Page size of the image.
pub const PAGE: u64 = 4096;
/// Exclusive upper bound of user addresses (x86_64 four-level TASK_SIZE).
pub const USER_TOP: u64 = 0x7fff_ffff_f000;
/// Largest number of pages in one data record (1 MiB), so the decoder's
/// buffer is bounded.
pub const MAX_RUN_PAGES: u32 = 256;
/// Bounds the decoder enforces.
pub const MAX_THREADS: usize = 4096;
pub const MAX_MAPPINGS: usize = 65_536;
pub const MAX_NAME: usize = 4096;
pub const MAX_XSTATE: usize = 64 * 1024;
pub const MAX_AUXV: usize = 64;
pub const MAX_PENDING: usize = 1024;
pub const MAX_KSTR: usize = 256;
/// Most open files one process may carry, and the highest descriptor.
pub const MAX_FILES: usize = 1024;
pub const MAX_FD: u32 = 1 << 20;
/// The open flags a carried file keeps (`O_ACCMODE`, `O_APPEND`,
/// `O_NONBLOCK`, `O_DSYNC`, `O_DIRECT`, `O_NOATIME`, `O_CLOEXEC`, `O_SYNC`;
/// `O_LARGEFILE` is implied on x86_64).
pub const FILE_FLAGS: u32 =
    0o3 | 0o2000 | 0o4000 | 0o10000 | 0o40000 | 0o1000000 | 0o2000000 | 0o4010000;
/// Most bytes in flight all carried pipes and socket pairs together may
/// hold (they travel in the process record, which is bounded).
pub const MAX_PIPE_BYTES: usize = 512 * 1024;
/// Bytes of memfds carried in the process record: those outside every
/// range the process maps (what it maps goes with its pages).
pub const MAX_MEMFD_BYTES: usize = 256 * 1024;
/// Bytes of the origin's vDSO in the process record (it is 8 KiB on the
/// kernels seen).
pub const MAX_VDSO: usize = 64 * 1024;
/// The largest memfd carried (its size; sparse content is cheap).
pub const MAX_MEMFD_SIZE: u64 = 1 << 40;
/// The longest memfd name (`memfd_create`'s limit).
pub const MAX_MEMFD_NAME: usize = 249;
/// CPU extensions in the process record, and bytes of one's name.
const MAX_CPU_FLAGS: usize = 256;
const MAX_CPU_FLAG: usize = 32;
/// The seals a memfd may carry: `F_SEAL_SEAL`, `_SHRINK`, `_GROW`,
/// `_WRITE`, `_FUTURE_WRITE`, `_EXEC`.
pub const MEMFD_SEALS: u32 = 0x3f;
/// Most datagrams queued at one end of a socket pair.
pub const MAX_DGRAMS: usize = 1024;
/// Largest pipe capacity carried (`F_SETPIPE_SZ`; Linux's default
/// `pipe-max-size`, what an unprivileged process may set).
pub const MAX_PIPE_CAPACITY: u32 = 1 << 20;
/// Size of one `siginfo_t` as the kernel copies it.
pub const SIGINFO_SIZE: usize = 128;
/// Number of `u64` in x86_64 `user_regs_struct`.
pub const NREGS: usize = 27;

/// Flag bit: ranges of all-zero pages are marked with zero-run records.
pub const FLAG_ZERO_RUNS: u16 = 1;
/// Flag bit: a lazy (post-copy) image. It carries only the pages needed to
/// resume; every other page of a mapping that is not special and not
/// `PROT_NONE` is served by the origin (see `lazy.rs`). A stop-and-copy
/// restore refuses it.
pub const FLAG_LAZY: u16 = 2;

const TAG_PROCESS: u8 = 1;
const TAG_THREAD: u8 = 2;
const TAG_MAPPING: u8 = 3;
const TAG_DATA: u8 = 4;
const TAG_ZERO: u8 = 5;
const TAG_END: u8 = 0xFF;

/// Largest record payload: a full data run plus its address and count.
const MAX_RECORD: u32 = MAX_RUN_PAGES * PAGE as u32 + 12;

/// Why an image could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("i/o on the image stream")]
    Io(#[source] io::Error),
    #[error("the image ends early, at byte {at}: it was cut short")]
    Truncated { at: u64 },
    #[error("not a process image (it begins with {:?})", String::from_utf8_lossy(.0))]
    Magic([u8; 8]),
    #[error(
        "image version {0}, this code reads version {VERSION}: it was written by another mkctl"
    )]
    Version(u16),
    #[error("image architecture {0:#x}, this code restores x86_64 (0x3e) only")]
    Arch(u16),
    #[error("unknown image flags {0:#x}")]
    Flags(u16),
    #[error("the image is damaged: record at byte {at}: unexpected tag {tag:#x} ({why})")]
    Tag { at: u64, tag: u8, why: &'static str },
    #[error("the image is damaged: record at byte {at}: {what} = {value:#x} is out of bounds")]
    Bound {
        at: u64,
        what: &'static str,
        value: u64,
    },
    #[error("the image is damaged: record at byte {at}: {why}")]
    Invalid { at: u64, why: String },
    #[error("the tree header is damaged: {0}")]
    Tree(super::tree::TreeError),
    #[error("the image is damaged: it says its checksum is {stored:#018x}, its bytes hash to {computed:#018x}")]
    Checksum { stored: u64, computed: u64 },
    #[error(
        "the image header is damaged: it says {stored:#018x}, its bytes hash to {computed:#018x}"
    )]
    HeaderChecksum { stored: u64, computed: u64 },
    #[error("writer misuse: {0}")]
    Order(&'static str),
}

impl From<io::Error> for ImageError {
    fn from(e: io::Error) -> Self {
        ImageError::Io(e)
    }
}

/// The kernel the image was taken on. Restoring needs the same vDSO image
/// (the restored code calls into it at the recorded address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFingerprint {
    /// `uname -r`.
    pub release: String,
    /// `uname -v` (build number and date).
    pub version: String,
    /// xxh3-64 of the `[vdso]` bytes.
    pub vdso_hash: u64,
    /// Length of `[vdso]` in bytes.
    pub vdso_len: u32,
}

/// Image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub flags: u16,
    pub kernel: KernelFingerprint,
}

/// What one of fds 0/1/2 was on the origin. The destination supplies its
/// own for all but `File`, which is in [`ProcessInfo::files`] and reopened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioKind {
    Closed,
    DevNull,
    Pipe,
    Tty,
    File,
}

/// What an open file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file: reopened only where it is the same file (same size
    /// and modification time).
    Regular,
    /// `/dev/null`, `/dev/zero`, `/dev/random` or `/dev/urandom`.
    Device,
    /// An eventfd (path [`EVENTFD`]): recreated with its counter (in
    /// `size`) and semaphore mode (`mtime_ns` 1).
    Eventfd,
    /// A timerfd (path [`TIMERFD`]): recreated from [`FileState::Timer`].
    Timerfd,
    /// A signalfd (path [`SIGNALFD`]): recreated with its mask
    /// ([`FileState::Signals`]).
    Signalfd,
    /// One end of a pipe whose every end is in the process (path
    /// `pipe:[inode]`, informative): [`FileState::Pipe`] names its entry in
    /// [`ProcessInfo::pipes`].
    Pipe,
    /// One end of an AF_UNIX stream or datagram socket pair whose two ends
    /// are in the process (path `socket:[inode]`, informative):
    /// [`FileState::Socket`] names its entry in [`ProcessInfo::socketpairs`]
    /// and which end it is.
    Socket,
    /// An epoll instance (path [`EPOLL`]): recreated, then given its
    /// watches ([`ProcessInfo::epolls`]) once every descriptor is in place.
    Epoll,
    /// A memfd (path `/memfd:<name> (deleted)`): [`FileState::Memfd`] names
    /// its entry in [`ProcessInfo::memfds`], which the restore makes again
    /// with its content and seals.
    Memfd,
}

/// The codes of [`FileKind`] in the image (the one table both directions use).
const FILE_KINDS: [(FileKind, u8); 9] = [
    (FileKind::Regular, 0),
    (FileKind::Device, 1),
    (FileKind::Eventfd, 2),
    (FileKind::Timerfd, 3),
    (FileKind::Signalfd, 4),
    (FileKind::Pipe, 5),
    (FileKind::Socket, 6),
    (FileKind::Epoll, 7),
    (FileKind::Memfd, 8),
];

impl FileKind {
    fn code(self) -> u8 {
        FILE_KINDS
            .iter()
            .find(|(k, _)| *k == self)
            .map_or(u8::MAX, |(_, c)| *c)
    }
    fn from_code(c: u8) -> Option<Self> {
        FILE_KINDS.iter().find(|(_, x)| *x == c).map(|(k, _)| *k)
    }
    /// Reopened by its path on the destination (which can be asked about
    /// it before the freeze); the other kinds are recreated.
    pub fn by_path(self) -> bool {
        matches!(self, FileKind::Regular | FileKind::Device)
    }
}

/// What `/proc/pid/fd` says an eventfd is open on.
pub const EVENTFD: &str = "anon_inode:[eventfd]";
/// ... a timerfd.
pub const TIMERFD: &str = "anon_inode:[timerfd]";
/// ... a signalfd.
pub const SIGNALFD: &str = "anon_inode:[signalfd]";
/// ... an epoll instance.
pub const EPOLL: &str = "anon_inode:[eventpoll]";
/// Most watches all carried epolls together may hold.
pub const MAX_WATCHES: usize = 65_536;
/// The clocks a timerfd may use: `CLOCK_REALTIME`, `CLOCK_MONOTONIC`,
/// `CLOCK_BOOTTIME`, `CLOCK_REALTIME_ALARM`, `CLOCK_BOOTTIME_ALARM`.
pub const TIMERFD_CLOCKS: [u32; 5] = [0, 1, 7, 8, 9];
/// `TFD_TIMER_ABSTIME` and `TFD_TIMER_CANCEL_ON_SET`.
pub const TFD_ABSTIME: u32 = 1;
pub const TFD_CANCEL_ON_SET: u32 = 2;

/// A timerfd's state at the freeze.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerState {
    /// One of [`TIMERFD_CLOCKS`].
    pub clockid: u32,
    /// `timerfd_settime` flags ([`TFD_ABSTIME`], [`TFD_CANCEL_ON_SET`]).
    pub settime_flags: u32,
    /// Expirations not read yet.
    pub ticks: u64,
    /// Armed (else `value_ns` is 0).
    pub armed: bool,
    /// Next expiry: the time left at the moment the process's clocks were
    /// captured ([`ProcessInfo::monotonic_ns`]), in ns; negative when it
    /// was due by then. For an absolute `CLOCK_REALTIME(_ALARM)` timer the
    /// absolute expiry instead (real time passes while the process is
    /// away, and is the same clock everywhere; >= 0).
    pub value_ns: i64,
    /// Period (ns); 0: one-shot.
    pub interval_ns: u64,
}

/// The state of a descriptor that is recreated rather than reopened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FileState {
    /// Regular files, devices and eventfds (their state is in `size` and
    /// `mtime_ns`).
    #[default]
    None,
    Timer(TimerState),
    /// A signalfd's mask (bit n-1 for signal n).
    Signals(u64),
    /// A pipe end: the `id` of its [`PipeState`].
    Pipe(u32),
    /// A socket pair's end (0 or 1) of the [`SocketPairState`] `id`.
    Socket {
        id: u32,
        end: u8,
    },
    /// A memfd: the `id` of its [`MemfdState`].
    Memfd(u32),
}

/// An AF_UNIX socket pair both of whose ends are in the process, with what
/// is queued at each end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketPairState {
    /// Unique within the image; the ends' [`FileState::Socket`].
    pub id: u32,
    /// `SOCK_STREAM` (1) or `SOCK_DGRAM` (2).
    pub kind: u8,
    /// Each end's shutdown bits (1 receive, 2 send).
    pub shutdown: [u8; 2],
    /// What a read at each end would return: the stream's bytes (one
    /// chunk, or none), or the datagrams in order.
    pub queued: [Vec<Vec<u8>>; 2],
}

/// Most POSIX timers carried, and the bound of their ids (a restore makes
/// every id below the highest one, see `restore`).
pub const MAX_POSIX_TIMERS: usize = 64;
pub const MAX_TIMER_ID: u32 = 1024;
/// The clocks a carried POSIX timer may use: `CLOCK_REALTIME`,
/// `CLOCK_MONOTONIC`, `CLOCK_PROCESS_CPUTIME_ID` (armed again with the CPU
/// time it had left: the copy's CPU clock starts from about zero, so an
/// absolute target would be far off), `CLOCK_BOOTTIME`. Not
/// `CLOCK_THREAD_CPUTIME_ID`: `/proc` does not say which thread's.
pub const POSIX_TIMER_CLOCKS: [u32; 4] = [0, 1, 2, 7];
/// `sigev_notify` values carried: `SIGEV_SIGNAL`, `SIGEV_NONE`,
/// `SIGEV_THREAD_ID` (`SIGEV_SIGNAL | 4`: to one thread).
pub const SIGEV_SIGNAL: u8 = 0;
pub const SIGEV_NONE: u8 = 1;
pub const SIGEV_THREAD_ID: u8 = 4;

/// A POSIX timer (`timer_create`) at the freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PosixTimer {
    /// Its id (`timer_t`), below [`MAX_TIMER_ID`].
    pub id: u32,
    /// One of [`POSIX_TIMER_CLOCKS`].
    pub clockid: u32,
    /// How it notifies ([`SIGEV_SIGNAL`], [`SIGEV_NONE`],
    /// [`SIGEV_THREAD_ID`]), with which signal and `sigev_value`.
    pub notify: u8,
    pub signo: u8,
    pub sigval: u64,
    /// With [`SIGEV_THREAD_ID`]: the index of the thread in the image.
    pub thread: u32,
    /// Period (ns; 0: one-shot) and time left at the freeze (ns; 0:
    /// disarmed).
    pub interval_ns: u64,
    pub value_ns: u64,
}

/// What an epoll instance watches, as `epoll_ctl(EPOLL_CTL_ADD)` set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpollWatch {
    /// The watched descriptor (a carried file or one of fds 0-2).
    pub fd: u32,
    /// `struct epoll_event`'s `events` (with `EPOLLET`, `EPOLLONESHOT`
    /// and the like) and `data`.
    pub events: u32,
    pub data: u64,
}

/// An epoll instance's watches; `fd` is the first descriptor of it (a
/// `dup` of it shares them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpollState {
    pub fd: u32,
    pub watches: Vec<EpollWatch>,
}

/// A memfd the process holds (by a descriptor or a shared mapping), and no
/// other process does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemfdState {
    /// Unique within the image; descriptors' [`FileState::Memfd`].
    pub id: u32,
    /// Its name (after `/memfd:`).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// `F_GET_SEALS`; `F_SEAL_SEAL` alone also stands for "made without
    /// `MFD_ALLOW_SEALING`" (the two behave alike).
    pub seals: u32,
    /// The start of each mapping of it (`MAP_SHARED`, carried with its
    /// pages like anonymous shared memory, at the mapping's file offset).
    pub maps: Vec<u64>,
    /// Its content outside every mapping: (file offset, bytes), ascending,
    /// holes left out.
    pub data: Vec<(u64, Vec<u8>)>,
}

/// A pipe all of whose ends are in the process, with its bytes in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeState {
    /// Unique within the image; the pipe ends' [`FileState::Pipe`].
    pub id: u32,
    /// `F_GETPIPE_SZ` (bytes).
    pub capacity: u32,
    /// What a read would return, in order.
    pub bytes: Vec<u8>,
}

/// A descriptor open on a file, carried by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFile {
    pub fd: u32,
    pub kind: FileKind,
    /// Open flags (within [`FILE_FLAGS`]; `O_CLOEXEC` is the descriptor's).
    pub flags: u32,
    /// File offset.
    pub pos: u64,
    /// Absolute path on the origin.
    pub path: String,
    /// Size and modification time (ns since the epoch) when frozen;
    /// zero for devices.
    pub size: u64,
    pub mtime_ns: u64,
    /// What a recreated descriptor was.
    pub state: FileState,
    /// The earlier descriptor (in this list) whose open file description
    /// this one shares (`dup`): restored as a `dup` of it.
    pub share: Option<u32>,
}

/// The devices a descriptor may be open on.
pub const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"];

impl StdioKind {
    fn code(self) -> u8 {
        match self {
            StdioKind::Closed => 0,
            StdioKind::DevNull => 1,
            StdioKind::Pipe => 2,
            StdioKind::Tty => 3,
            StdioKind::File => 4,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => StdioKind::Closed,
            1 => StdioKind::DevNull,
            2 => StdioKind::Pipe,
            3 => StdioKind::Tty,
            4 => StdioKind::File,
            _ => return None,
        })
    }
}

/// The `mm_struct` fields `prctl(PR_SET_MM_MAP)` takes, in its order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

impl MmFields {
    fn to_array(self) -> [u64; 11] {
        [
            self.start_code,
            self.end_code,
            self.start_data,
            self.end_data,
            self.start_brk,
            self.brk,
            self.start_stack,
            self.arg_start,
            self.arg_end,
            self.env_start,
            self.env_end,
        ]
    }
    fn from_array(a: [u64; 11]) -> Self {
        MmFields {
            start_code: a[0],
            end_code: a[1],
            start_data: a[2],
            end_data: a[3],
            start_brk: a[4],
            brk: a[5],
            start_stack: a[6],
            arg_start: a[7],
            arg_end: a[8],
            env_start: a[9],
            env_end: a[10],
        }
    }
}

/// One non-default signal disposition (the kernel's `struct sigaction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigAction {
    pub signo: u8,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// A queued signal, as `PTRACE_PEEKSIGINFO` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigInfo(pub [u8; SIGINFO_SIZE]);

impl SigInfo {
    /// `si_signo`.
    pub fn signo(&self) -> i32 {
        i32::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }
}

/// Process-wide state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Pid on the origin (informative).
    pub pid: u32,
    pub personality: u32,
    pub mm: MmFields,
    /// `(type, value)` pairs of `/proc/pid/auxv`, without the final AT_NULL.
    pub auxv: Vec<(u64, u64)>,
    pub stdio: [StdioKind; 3],
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process.
    pub shared_pending: Vec<SigInfo>,
    /// `/proc/pid/exe` target on the origin (informative).
    pub exe: String,
    /// Descriptors open on files (stdio ones included), by fd.
    pub files: Vec<OpenFile>,
    /// `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` as the process saw them at
    /// the freeze (its time namespace's offsets included), in ns; zero:
    /// unknown (the restore then leaves its clocks to the kernel's).
    pub monotonic_ns: u64,
    pub boottime_ns: u64,
    /// Armed interval timers (`setitimer`; `alarm` is `ITIMER_REAL`):
    /// which (0 real, 1 virtual, 2 prof) and the `struct itimerval`
    /// (interval sec, usec, value sec, usec) left at the freeze.
    pub itimers: Vec<(u8, [u64; 4])>,
    /// Pipes whose ends are among `files`, with their bytes.
    pub pipes: Vec<PipeState>,
    /// Socket pairs whose ends are among `files`, with their queues.
    pub socketpairs: Vec<SocketPairState>,
    /// The watches of each epoll instance among `files`.
    pub epolls: Vec<EpollState>,
    /// POSIX timers, by id.
    pub posix_timers: Vec<PosixTimer>,
    /// The memfds the process holds.
    pub memfds: Vec<MemfdState>,
    /// The origin's `[vdso]` bytes (their hash and length are the
    /// header's): a restore on another kernel build puts them back at the
    /// old address, entries redirected to its own vDSO (`vdso`).
    pub vdso: Vec<u8>,
    /// The origin CPU's XSAVE components (XCR0): the layout of the
    /// threads' `NT_X86_XSTATE` (`cpu::convert`).
    pub xfeatures: u64,
    /// The CPU extensions the program picked its code for when it started
    /// (`cpu::picked`), sorted: a restore refuses a CPU that lacks one.
    pub cpu: Vec<String>,
}

/// Which register file the FP blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FpKind {
    /// `NT_X86_XSTATE` (XSAVE layout, user ABI).
    Xstate,
    /// `NT_PRFPREG` (512-byte FXSAVE layout).
    Fxsave,
}

/// `struct ptrace_rseq_configuration`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rseq {
    pub abi_pointer: u64,
    pub abi_size: u32,
    pub signature: u32,
    pub flags: u32,
}

/// `stack_t` of `sigaltstack`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AltStack {
    pub sp: u64,
    pub flags: u32,
    pub size: u64,
}

/// One thread's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadState {
    /// Tid on the origin.
    pub tid: u32,
    /// `user_regs_struct` as 27 words in declaration order.
    pub regs: [u64; NREGS],
    pub fp_kind: FpKind,
    pub fp: Vec<u8>,
    pub sigmask: u64,
    /// Zero `abi_pointer` = not registered.
    pub rseq: Rseq,
    /// `clear_child_tid` (`set_tid_address`); 0 = none or unknown.
    pub clear_child_tid: u64,
    pub robust_list: u64,
    pub robust_len: u64,
    pub altstack: AltStack,
    pub comm: [u8; 16],
    pub pending: Vec<SigInfo>,
}

/// How a mapping came to be on the origin. Special ones carry no pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingKind {
    Anon,
    File,
    Heap,
    Stack,
    Vvar,
    VvarVclock,
    Vdso,
}

impl MappingKind {
    fn code(self) -> u8 {
        match self {
            MappingKind::Anon => 0,
            MappingKind::File => 1,
            MappingKind::Heap => 2,
            MappingKind::Stack => 3,
            MappingKind::Vvar => 4,
            MappingKind::VvarVclock => 5,
            MappingKind::Vdso => 6,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => MappingKind::Anon,
            1 => MappingKind::File,
            2 => MappingKind::Heap,
            3 => MappingKind::Stack,
            4 => MappingKind::Vvar,
            5 => MappingKind::VvarVclock,
            6 => MappingKind::Vdso,
            _ => return None,
        })
    }
    /// Kernel-provided mappings, recreated by the kernel, never by content.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            MappingKind::Vvar | MappingKind::VvarVclock | MappingKind::Vdso
        )
    }
}

/// Protection bits of a mapping.
pub const PROT_R: u8 = 1;
pub const PROT_W: u8 = 2;
pub const PROT_X: u8 = 4;
/// Mapping flag: grows down (the main stack).
pub const MAPF_GROWSDOWN: u8 = 1;
/// Mapping flag: the origin had `MADV_HUGEPAGE` on it.
pub const MAPF_HUGEPAGE: u8 = 2;
/// Mapping flag: the origin had `MADV_NOHUGEPAGE` on it.
pub const MAPF_NOHUGEPAGE: u8 = 4;
/// Mapping flag: DSM memory of a split process (a thread that left its
/// process): the mapping is the DSM region whose name is the mapping's
/// `name`, and its pages come through the DSM, never in the image.
pub const MAPF_DSM: u8 = 8;
/// Mapping flag: anonymous shared memory (`MAP_SHARED | MAP_ANONYMOUS`),
/// which the process alone maps: made again shared, its pages carried as
/// a private mapping's are (kind [`MappingKind::Anon`] only).
pub const MAPF_SHARED: u8 = 16;

/// One virtual memory area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub prot: u8,
    pub flags: u8,
    pub kind: MappingKind,
    /// File offset on the origin (informative).
    pub offset: u64,
    /// Pages resident on the origin (a hint: restore backs dense mappings
    /// with huge pages).
    pub resident: u64,
    /// Path or `[name]` on the origin (informative).
    pub name: String,
}

impl Mapping {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    fn contains_range(&self, addr: u64, len: u64) -> bool {
        addr >= self.start && addr.checked_add(len).is_some_and(|e| e <= self.end)
    }
}

/// Everything before the pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMeta {
    pub header: Header,
    pub process: ProcessInfo,
    pub threads: Vec<ThreadState>,
    pub mappings: Vec<Mapping>,
}

/// What a finished image held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Pages carried with content.
    pub data_pages: u64,
    /// Pages marked all-zero.
    pub zero_pages: u64,
    /// Bytes of the whole image.
    pub bytes: u64,
    pub checksum: u64,
}

/// `buf` whole from `r`, which is at byte `at` of an image: its end there
/// is [`ImageError::Truncated`].
pub(crate) fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], at: u64) -> Result<(), ImageError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ImageError::Truncated { at }
        } else {
            ImageError::Io(e)
        }
    })
}

// ---------------------------------------------------------------- writing

struct HashW<W> {
    inner: W,
    hash: Xxh3,
    n: u64,
}

impl<W: Write> HashW<W> {
    fn put(&mut self, b: &[u8]) -> Result<(), ImageError> {
        self.inner.write_all(b)?;
        self.hash.update(b);
        self.n += b.len() as u64;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Process,
    Threads,
    Mappings,
    Pages,
}

/// Streaming encoder. Records must come in the order of the format: process,
/// threads, mappings, pages (ascending), then [`ImageWriter::finish`].
pub struct ImageWriter<W: Write> {
    w: HashW<W>,
    stage: Stage,
    threads: usize,
    stats: ImageStats,
    next_page: u64,
}

impl<W: Write> std::fmt::Debug for ImageWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageWriter")
            .field("stage", &self.stage)
            .field("stats", &self.stats)
            .finish()
    }
}

fn put_str(w: &mut Writer<'_>, s: &str, max: usize) {
    let b = s.as_bytes();
    let b = &b[..b.len().min(max)];
    // Bounded by `max` <= u16::MAX above.
    w.u16(b.len() as u16);
    w.raw(b);
}

fn put_sigs(w: &mut Writer<'_>, s: &[SigInfo]) {
    let n = s.len().min(MAX_PENDING);
    w.u16(n as u16);
    for si in &s[..n] {
        w.raw(&si.0);
    }
}

impl<W: Write> ImageWriter<W> {
    /// Writes the header.
    pub fn new(inner: W, header: &Header) -> Result<Self, ImageError> {
        let mut w = HashW {
            inner,
            hash: Xxh3::new(),
            n: 0,
        };
        let mut v = Vec::with_capacity(600);
        let h = &mut Writer(&mut v);
        h.raw(&MAGIC);
        h.le(VERSION);
        h.le(header.flags);
        h.le(ARCH_X86_64);
        h.le(0u16);
        put_str(h, &header.kernel.release, MAX_KSTR);
        put_str(h, &header.kernel.version, MAX_KSTR);
        h.le(header.kernel.vdso_hash);
        h.le(header.kernel.vdso_len);
        h.le(PAGE as u32);
        w.put(&v)?;
        // The header's own checksum, so a reader can trust the kernel
        // fingerprint before it has the whole image.
        let check = w.hash.digest();
        w.put(&check.to_le_bytes())?;
        Ok(ImageWriter {
            w,
            stage: Stage::Process,
            threads: 0,
            stats: ImageStats::default(),
            next_page: 0,
        })
    }

    fn record(&mut self, tag: u8, payload: &[u8]) -> Result<(), ImageError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_RECORD)
            .ok_or(ImageError::Order("record too big"))?;
        let mut h = Vec::with_capacity(5);
        let w = &mut Writer(&mut h);
        w.u8(tag);
        w.u32(len);
        self.w.put(&h)?;
        self.w.put(payload)
    }

    pub fn process(&mut self, p: &ProcessInfo) -> Result<(), ImageError> {
        if self.stage != Stage::Process {
            return Err(ImageError::Order("process record must come first, once"));
        }
        let mut v = Vec::with_capacity(512);
        let w = &mut Writer(&mut v);
        w.le(p.pid);
        w.le(p.personality);
        for x in p.mm.to_array() {
            w.le(x);
        }
        if p.auxv.len() > MAX_AUXV {
            return Err(ImageError::Order("auxv too long"));
        }
        w.le(p.auxv.len() as u16);
        for (t, val) in &p.auxv {
            w.le(*t);
            w.le(*val);
        }
        for k in p.stdio {
            w.u8(k.code());
        }
        if p.sigactions.len() > 64 {
            return Err(ImageError::Order("more than 64 signal actions"));
        }
        w.u8(p.sigactions.len() as u8);
        for a in &p.sigactions {
            w.u8(a.signo);
            for x in [a.handler, a.flags, a.restorer, a.mask] {
                w.le(x);
            }
        }
        put_sigs(w, &p.shared_pending);
        put_str(w, &p.exe, MAX_NAME);
        if p.files.len() > MAX_FILES {
            return Err(ImageError::Order("too many open files"));
        }
        w.le(p.files.len() as u16);
        for f in &p.files {
            w.le(f.fd);
            w.u8(f.kind.code());
            w.le(f.flags);
            w.le(f.pos);
            w.le(f.size);
            w.le(f.mtime_ns);
            put_str(w, &f.path, MAX_NAME);
            w.le(f.share.unwrap_or(u32::MAX));
            match f.state {
                FileState::None => w.u8(0),
                FileState::Timer(t) => {
                    w.u8(1);
                    w.le(t.clockid);
                    w.le(t.settime_flags);
                    w.u8(u8::from(t.armed));
                    w.le(t.ticks);
                    w.le(t.value_ns as u64);
                    w.le(t.interval_ns);
                }
                FileState::Signals(mask) => {
                    w.u8(2);
                    w.le(mask);
                }
                FileState::Pipe(id) => {
                    w.u8(3);
                    w.le(id);
                }
                FileState::Socket { id, end } => {
                    w.u8(4);
                    w.le(id);
                    w.u8(end);
                }
                FileState::Memfd(id) => {
                    w.u8(5);
                    w.le(id);
                }
            }
        }
        w.le(p.monotonic_ns);
        w.le(p.boottime_ns);
        if p.itimers.len() > 3 {
            return Err(ImageError::Order("more than 3 interval timers"));
        }
        w.u8(p.itimers.len() as u8);
        for (which, t) in &p.itimers {
            w.u8(*which);
            for x in t {
                w.le(*x);
            }
        }
        let in_flight = p.pipes.iter().map(|x| x.bytes.len()).sum::<usize>()
            + p.socketpairs
                .iter()
                .flat_map(|x| x.queued.iter().flatten())
                .map(Vec::len)
                .sum::<usize>();
        if p.pipes.len() > MAX_FILES
            || p.socketpairs.len() > MAX_FILES
            || p.socketpairs
                .iter()
                .any(|x| x.queued.iter().any(|q| q.len() > MAX_DGRAMS))
            || in_flight > MAX_PIPE_BYTES
        {
            return Err(ImageError::Order(
                "too many pipes or socket pairs or bytes in them",
            ));
        }
        w.le(p.pipes.len() as u16);
        for x in &p.pipes {
            w.le(x.id);
            w.le(x.capacity);
            w.le(x.bytes.len() as u32);
            w.raw(&x.bytes);
        }
        w.le(p.socketpairs.len() as u16);
        for x in &p.socketpairs {
            w.le(x.id);
            w.u8(x.kind);
            w.u8(x.shutdown[0]);
            w.u8(x.shutdown[1]);
            for q in &x.queued {
                w.le(q.len() as u16);
                for m in q {
                    w.le(m.len() as u32);
                    w.raw(m);
                }
            }
        }
        let watches: usize = p.epolls.iter().map(|e| e.watches.len()).sum();
        if p.epolls.len() > MAX_FILES || watches > MAX_WATCHES {
            return Err(ImageError::Order("too many epolls or watches"));
        }
        w.le(p.epolls.len() as u16);
        for e in &p.epolls {
            w.le(e.fd);
            w.le(e.watches.len() as u32);
            for x in &e.watches {
                w.le(x.fd);
                w.le(x.events);
                w.le(x.data);
            }
        }
        if p.posix_timers.len() > MAX_POSIX_TIMERS {
            return Err(ImageError::Order("too many POSIX timers"));
        }
        w.u8(p.posix_timers.len() as u8);
        for t in &p.posix_timers {
            w.le(t.id);
            w.le(t.clockid);
            w.u8(t.notify);
            w.u8(t.signo);
            w.le(t.sigval);
            w.le(t.thread);
            w.le(t.interval_ns);
            w.le(t.value_ns);
        }
        let inline: usize = p
            .memfds
            .iter()
            .flat_map(|m| &m.data)
            .map(|(_, b)| b.len())
            .sum();
        if p.memfds.len() > MAX_FILES
            || inline > MAX_MEMFD_BYTES
            || p.memfds.iter().any(|m| m.maps.len() > MAX_MAPPINGS)
        {
            return Err(ImageError::Order("too many memfds or bytes in them"));
        }
        w.le(p.memfds.len() as u16);
        for m in &p.memfds {
            w.le(m.id);
            put_str(w, &m.name, MAX_MEMFD_NAME);
            w.le(m.size);
            w.le(m.seals);
            w.le(m.maps.len() as u32);
            for a in &m.maps {
                w.le(*a);
            }
            w.le(m.data.len() as u32);
            for (off, b) in &m.data {
                w.le(*off);
                w.le(b.len() as u32);
                w.raw(b);
            }
        }
        if p.vdso.len() > MAX_VDSO {
            return Err(ImageError::Order("vDSO larger than 64 KiB"));
        }
        w.le(p.vdso.len() as u32);
        w.raw(&p.vdso);
        w.le(p.xfeatures);
        let cpu = &p.cpu[..p.cpu.len().min(MAX_CPU_FLAGS)];
        w.u16(cpu.len() as u16);
        for f in cpu {
            put_str(w, f, MAX_CPU_FLAG);
        }
        self.record(TAG_PROCESS, &v)?;
        self.stage = Stage::Threads;
        Ok(())
    }

    pub fn thread(&mut self, t: &ThreadState) -> Result<(), ImageError> {
        if self.stage != Stage::Threads || self.threads >= MAX_THREADS {
            return Err(ImageError::Order(
                "thread records come after the process record",
            ));
        }
        if t.fp.len() > MAX_XSTATE {
            return Err(ImageError::Order("FP state too big"));
        }
        let mut v = Vec::with_capacity(512 + t.fp.len());
        let w = &mut Writer(&mut v);
        w.le(t.tid);
        for r in t.regs {
            w.le(r);
        }
        w.u8(match t.fp_kind {
            FpKind::Xstate => 1,
            FpKind::Fxsave => 2,
        });
        w.le(t.fp.len() as u32);
        w.raw(&t.fp);
        w.le(t.sigmask);
        w.le(t.rseq.abi_pointer);
        w.le(t.rseq.abi_size);
        w.le(t.rseq.signature);
        w.le(t.rseq.flags);
        for x in [
            t.clear_child_tid,
            t.robust_list,
            t.robust_len,
            t.altstack.sp,
        ] {
            w.le(x);
        }
        w.le(t.altstack.flags);
        w.le(t.altstack.size);
        w.raw(&t.comm);
        put_sigs(w, &t.pending);
        self.record(TAG_THREAD, &v)?;
        self.threads += 1;
        Ok(())
    }

    pub fn mapping(&mut self, m: &Mapping) -> Result<(), ImageError> {
        if self.stage == Stage::Threads && self.threads > 0 {
            self.stage = Stage::Mappings;
        }
        if self.stage != Stage::Mappings {
            return Err(ImageError::Order(
                "mapping records come after at least one thread",
            ));
        }
        let mut v = Vec::with_capacity(40 + m.name.len());
        let w = &mut Writer(&mut v);
        w.le(m.start);
        w.le(m.end);
        w.u8(m.prot);
        w.u8(m.flags);
        w.u8(m.kind.code());
        w.le(m.offset);
        w.le(m.resident);
        put_str(w, &m.name, MAX_NAME);
        self.record(TAG_MAPPING, &v)
    }

    fn enter_pages(&mut self, addr: u64) -> Result<(), ImageError> {
        if self.stage == Stage::Mappings {
            self.stage = Stage::Pages;
        }
        if self.stage != Stage::Pages {
            return Err(ImageError::Order("pages come after the mappings"));
        }
        if addr < self.next_page || !addr.is_multiple_of(PAGE) {
            return Err(ImageError::Order(
                "page runs must be ascending and page-aligned",
            ));
        }
        Ok(())
    }

    /// Writes the content of the pages starting at `addr`; `data.len()` must
    /// be a multiple of the page size. Split into runs of at most
    /// [`MAX_RUN_PAGES`].
    pub fn data(&mut self, mut addr: u64, data: &[u8]) -> Result<(), ImageError> {
        if !(data.len() as u64).is_multiple_of(PAGE) {
            return Err(ImageError::Order("data is not whole pages"));
        }
        for chunk in data.chunks(MAX_RUN_PAGES as usize * PAGE as usize) {
            self.enter_pages(addr)?;
            let npages = (chunk.len() as u64 / PAGE) as u32;
            let mut h = Vec::with_capacity(17);
            let w = &mut Writer(&mut h);
            w.u8(TAG_DATA);
            w.u32(chunk.len() as u32 + 12);
            w.u64(addr);
            w.u32(npages);
            self.w.put(&h)?;
            self.w.put(chunk)?;
            addr += chunk.len() as u64;
            self.next_page = addr;
            self.stats.data_pages += u64::from(npages);
        }
        Ok(())
    }

    /// Marks `npages` all-zero pages starting at `addr`.
    pub fn zero(&mut self, addr: u64, npages: u64) -> Result<(), ImageError> {
        self.enter_pages(addr)?;
        let mut v = Vec::with_capacity(16);
        let w = &mut Writer(&mut v);
        w.u64(addr);
        w.u64(npages);
        self.record(TAG_ZERO, &v)?;
        self.next_page = addr
            .checked_add(
                npages
                    .checked_mul(PAGE)
                    .ok_or(ImageError::Order("zero run"))?,
            )
            .ok_or(ImageError::Order("zero run"))?;
        self.stats.zero_pages += npages;
        Ok(())
    }

    /// Writes the end record with the checksum and hands back the stream.
    pub fn finish(mut self) -> Result<(W, ImageStats), ImageError> {
        if self.stage < Stage::Mappings {
            return Err(ImageError::Order("an image needs threads and mappings"));
        }
        // The length counts the checksum that follows, outside the hash.
        let mut v = Vec::with_capacity(21);
        let w = &mut Writer(&mut v);
        w.u8(TAG_END);
        w.u32(24);
        w.u64(self.stats.data_pages);
        w.u64(self.stats.zero_pages);
        self.w.put(&v)?;
        let sum = self.w.hash.digest();
        self.w.inner.write_all(&sum.to_le_bytes())?;
        self.w.inner.flush()?;
        self.stats.checksum = sum;
        self.stats.bytes = self.w.n + 8;
        Ok((self.w.inner, self.stats))
    }
}

// ---------------------------------------------------------------- reading

struct HashR<R> {
    inner: R,
    hash: Xxh3,
    n: u64,
}

impl<R: Read> HashR<R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), ImageError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(ImageError::Truncated {
                        at: self.n + got as u64,
                    })
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ImageError::Io(e)),
            }
        }
        self.hash.update(buf);
        self.n += buf.len() as u64;
        Ok(())
    }
}

/// A cursor over one record's payload, already read and bounded; `at` is
/// the record's offset in the stream, for errors.
struct Cur<'a> {
    r: Reader<'a>,
    at: u64,
}

impl<'a> Cur<'a> {
    fn new(b: &'a [u8], at: u64) -> Self {
        Cur {
            r: Reader::new(b),
            at,
        }
    }
    fn short(&self, s: Short) -> ImageError {
        let left = self.r.remaining();
        ImageError::Invalid {
            at: self.at,
            why: format!(
                "record payload too short ({left} bytes left, {} needed)",
                left + s.need
            ),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ImageError> {
        self.r.take(n).map_err(|s| self.short(s))
    }
    fn u8(&mut self) -> Result<u8, ImageError> {
        self.r.u8().map_err(|s| self.short(s))
    }
    fn u16(&mut self) -> Result<u16, ImageError> {
        self.r.u16().map_err(|s| self.short(s))
    }
    fn u32(&mut self) -> Result<u32, ImageError> {
        self.r.u32().map_err(|s| self.short(s))
    }
    fn u64(&mut self) -> Result<u64, ImageError> {
        self.r.u64().map_err(|s| self.short(s))
    }
    /// A `u16` count, refused above `max` (`what` names it).
    fn count16(&mut self, max: usize, what: &'static str) -> Result<usize, ImageError> {
        let n = usize::from(self.u16()?);
        self.within(n, max, what)
    }
    /// A `u8` count, refused above `max`.
    fn count8(&mut self, max: usize, what: &'static str) -> Result<usize, ImageError> {
        let n = usize::from(self.u8()?);
        self.within(n, max, what)
    }
    /// `n`, or a bound error naming `what` when it is above `max`.
    fn within(&self, n: usize, max: usize, what: &'static str) -> Result<usize, ImageError> {
        if n > max {
            return Err(ImageError::Bound {
                at: self.at,
                what,
                value: n as u64,
            });
        }
        Ok(n)
    }
    fn str(&mut self, max: usize, what: &'static str) -> Result<String, ImageError> {
        let n = self.count16(max, what)?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| ImageError::Invalid {
            at: self.at,
            why: format!("{what} is not UTF-8"),
        })
    }
    fn sigs(&mut self) -> Result<Vec<SigInfo>, ImageError> {
        let n = self.count16(MAX_PENDING, "pending signal count")?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let mut a = [0u8; SIGINFO_SIZE];
            a.copy_from_slice(self.take(SIGINFO_SIZE)?);
            let s = SigInfo(a);
            if !(1..=64).contains(&s.signo()) {
                return Err(ImageError::Bound {
                    at: self.at,
                    what: "queued signal number",
                    value: s.signo() as u64,
                });
            }
            v.push(s);
        }
        Ok(v)
    }
    fn done(&self) -> Result<(), ImageError> {
        match self.r.remaining() {
            0 => Ok(()),
            n => Err(ImageError::Invalid {
                at: self.at,
                why: format!("{n} trailing bytes in record"),
            }),
        }
    }
}

/// One batch of pages handed out by [`ImageReader::next_pages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// `npages` pages of content at `addr`, now in the caller's buffer.
    Data { addr: u64, npages: u32 },
    /// `npages` all-zero pages at `addr`.
    Zero { addr: u64, npages: u64 },
}

/// Streaming decoder: [`ImageReader::open`] reads and validates everything up
/// to the pages, then [`ImageReader::next_pages`] hands them out one record at
/// a time until the end record, whose checksum it verifies.
pub struct ImageReader<R: Read> {
    r: HashR<R>,
    /// Index into the mappings of the page cursor (pages are ascending).
    map_idx: usize,
    next_page: u64,
    pending_tag: Option<(u8, u32, u64)>,
    stats: ImageStats,
    mappings: Vec<Mapping>,
    finished: bool,
}

impl<R: Read> std::fmt::Debug for ImageReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageReader")
            .field("at", &self.r.n)
            .field("stats", &self.stats)
            .finish()
    }
}

fn check_addr(at: u64, what: &'static str, a: u64) -> Result<(), ImageError> {
    if !a.is_multiple_of(PAGE) || a > USER_TOP {
        return Err(ImageError::Bound { at, what, value: a });
    }
    Ok(())
}

impl<R: Read> ImageReader<R> {
    fn rec_header(&mut self) -> Result<(u8, u32, u64), ImageError> {
        if let Some(h) = self.pending_tag.take() {
            return Ok(h);
        }
        let at = self.r.n;
        let mut h = [0u8; 5];
        self.r.fill(&mut h)?;
        let mut c = Cur::new(&h, at);
        let (tag, len) = (c.u8()?, c.u32()?);
        if len > MAX_RECORD {
            return Err(ImageError::Bound {
                at,
                what: "record length",
                value: u64::from(len),
            });
        }
        Ok((tag, len, at))
    }

    fn payload(&mut self, len: u32) -> Result<Vec<u8>, ImageError> {
        // `len` <= MAX_RECORD (checked in rec_header): bounded allocation.
        let mut v = vec![0u8; len as usize];
        self.r.fill(&mut v)?;
        Ok(v)
    }

    /// Reads and validates the header, process, thread and mapping records.
    pub fn open(inner: R) -> Result<(Self, ImageMeta), ImageError> {
        let mut me = ImageReader {
            r: HashR {
                inner,
                hash: Xxh3::new(),
                n: 0,
            },
            map_idx: 0,
            next_page: 0,
            pending_tag: None,
            stats: ImageStats::default(),
            mappings: Vec::new(),
            finished: false,
        };
        let header = me.read_header()?;

        let (tag, len, at) = me.rec_header()?;
        if tag != TAG_PROCESS {
            return Err(ImageError::Tag {
                at,
                tag,
                why: "expected the process record",
            });
        }
        let p = me.payload(len)?;
        let process = parse_process(&mut Cur::new(&p, at))?;
        // The vDSO bytes are the ones the header's fingerprint names (an
        // image from before the fingerprint had them carries none).
        if !process.vdso.is_empty()
            && (process.vdso.len() as u64 != u64::from(header.kernel.vdso_len)
                || xxhash_rust::xxh3::xxh3_64(&process.vdso) != header.kernel.vdso_hash)
        {
            return Err(ImageError::Invalid {
                at,
                why: format!(
                    "the process record's vDSO ({} bytes) is not the one the header names ({} bytes, xxh3 {:#018x})",
                    process.vdso.len(),
                    header.kernel.vdso_len,
                    header.kernel.vdso_hash
                ),
            });
        }

        let mut threads: Vec<ThreadState> = Vec::new();
        let mut mappings: Vec<Mapping> = Vec::new();
        loop {
            let (tag, len, at) = me.rec_header()?;
            match tag {
                TAG_THREAD if mappings.is_empty() => {
                    if threads.len() >= MAX_THREADS {
                        return Err(ImageError::Bound {
                            at,
                            what: "thread count",
                            value: threads.len() as u64 + 1,
                        });
                    }
                    let p = me.payload(len)?;
                    let t = parse_thread(&mut Cur::new(&p, at))?;
                    if threads.is_empty() && t.tid != process.pid {
                        return Err(ImageError::Invalid {
                            at,
                            why: format!(
                                "first thread {} is not the thread-group leader {}",
                                t.tid, process.pid
                            ),
                        });
                    }
                    if threads.iter().any(|o| o.tid == t.tid) {
                        return Err(ImageError::Invalid {
                            at,
                            why: format!("thread {} recorded twice", t.tid),
                        });
                    }
                    threads.push(t);
                }
                TAG_MAPPING if !threads.is_empty() => {
                    if mappings.len() >= MAX_MAPPINGS {
                        return Err(ImageError::Bound {
                            at,
                            what: "mapping count",
                            value: mappings.len() as u64 + 1,
                        });
                    }
                    let p = me.payload(len)?;
                    let m = parse_mapping(&mut Cur::new(&p, at))?;
                    if let Some(prev) = mappings.last() {
                        if m.start < prev.end {
                            return Err(ImageError::Invalid {
                                at,
                                why: format!(
                                    "mapping {:#x}-{:#x} overlaps or precedes {:#x}-{:#x}",
                                    m.start, m.end, prev.start, prev.end
                                ),
                            });
                        }
                    }
                    if m.kind.is_special() && mappings.iter().any(|o| o.kind == m.kind) {
                        return Err(ImageError::Invalid {
                            at,
                            why: format!("{:?} recorded twice", m.kind),
                        });
                    }
                    mappings.push(m);
                }
                TAG_DATA | TAG_ZERO | TAG_END if !mappings.is_empty() => {
                    me.pending_tag = Some((tag, len, at));
                    break;
                }
                _ => {
                    return Err(ImageError::Tag {
                        at,
                        tag,
                        why: "out of order (header, process, threads, mappings, pages, end)",
                    })
                }
            }
        }
        me.mappings = mappings.clone();
        Ok((
            me,
            ImageMeta {
                header,
                process,
                threads,
                mappings,
            },
        ))
    }

    /// Reads the header and checks its own checksum before it believes any
    /// field but the magic: a damaged header is reported as such, not as
    /// another version, architecture or kernel.
    fn read_header(&mut self) -> Result<Header, ImageError> {
        let mut fixed = [0u8; 16];
        self.r.fill(&mut fixed)?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&fixed[..8]);
        if magic != MAGIC {
            return Err(ImageError::Magic(magic));
        }
        let mut f = Cur::new(&fixed[8..], 8);
        let (version, flags, arch) = (f.u16()?, f.u16()?, f.u16()?);
        // Version 1 had no header checksum: say so rather than "damaged".
        if version == 1 {
            return Err(ImageError::Version(version));
        }
        let release = self.read_kstr("kernel release length")?;
        let version_s = self.read_kstr("kernel version length")?;
        let mut tail = [0u8; 16];
        self.r.fill(&mut tail)?;
        let computed = self.r.hash.digest();
        let mut stored = [0u8; 8];
        self.r.fill(&mut stored)?;
        let stored = u64::from_le_bytes(stored);
        if stored != computed {
            return Err(ImageError::HeaderChecksum { stored, computed });
        }
        if version != VERSION {
            return Err(ImageError::Version(version));
        }
        if flags & !(FLAG_ZERO_RUNS | FLAG_LAZY) != 0 {
            return Err(ImageError::Flags(flags));
        }
        if arch != ARCH_X86_64 {
            return Err(ImageError::Arch(arch));
        }
        let mut t = Cur::new(&tail, self.r.n);
        let (vdso_hash, vdso_len, page) = (t.u64()?, t.u32()?, t.u32()?);
        if u64::from(page) != PAGE {
            return Err(ImageError::Bound {
                at: self.r.n,
                what: "page size",
                value: u64::from(page),
            });
        }
        let text = |b: Vec<u8>| {
            String::from_utf8(b).map_err(|_| ImageError::Invalid {
                at: 16,
                why: "kernel string is not UTF-8".into(),
            })
        };
        Ok(Header {
            flags,
            kernel: KernelFingerprint {
                release: text(release)?,
                version: text(version_s)?,
                vdso_hash,
                vdso_len,
            },
        })
    }

    /// A `str16` of the header, as bytes (decoded once the header checksum
    /// is known good).
    fn read_kstr(&mut self, what: &'static str) -> Result<Vec<u8>, ImageError> {
        let at = self.r.n;
        let mut l = [0u8; 2];
        self.r.fill(&mut l)?;
        let n = usize::from(u16::from_le_bytes(l));
        if n > MAX_KSTR {
            return Err(ImageError::Bound {
                at,
                what,
                value: n as u64,
            });
        }
        let mut b = vec![0u8; n];
        self.r.fill(&mut b)?;
        Ok(b)
    }

    /// Finds the mapping that holds `[addr, addr+len)` at or after the
    /// cursor (pages are ascending, so the cursor only moves forward).
    fn page_target(&mut self, at: u64, addr: u64, len: u64) -> Result<(), ImageError> {
        if addr < self.next_page {
            return Err(ImageError::Invalid {
                at,
                why: format!(
                    "page run at {addr:#x} is not above the previous one (ends {:#x})",
                    self.next_page
                ),
            });
        }
        check_addr(at, "page address", addr)?;
        while self.map_idx < self.mappings.len() && self.mappings[self.map_idx].end <= addr {
            self.map_idx += 1;
        }
        let Some(m) = self.mappings.get(self.map_idx) else {
            return Err(ImageError::Invalid {
                at,
                why: format!("page run at {addr:#x} lies in no recorded mapping"),
            });
        };
        if !m.contains_range(addr, len) {
            return Err(ImageError::Invalid {
                at,
                why: format!(
                    "page run {addr:#x}+{len:#x} is not inside one mapping (nearest {:#x}-{:#x})",
                    m.start, m.end
                ),
            });
        }
        if m.kind.is_special() || m.prot & (PROT_R | PROT_W) == 0 {
            return Err(ImageError::Invalid {
                at,
                why: format!(
                    "page run at {addr:#x} targets a {:?} mapping with prot {:#x}",
                    m.kind, m.prot
                ),
            });
        }
        self.next_page = addr + len;
        Ok(())
    }

    /// The next batch of pages; `Data` content is placed in `buf` (resized to
    /// `npages * PAGE`). `None` after the end record, whose counts and
    /// checksum have then been verified.
    pub fn next_pages(&mut self, buf: &mut Vec<u8>) -> Result<Option<Pages>, ImageError> {
        if self.finished {
            return Ok(None);
        }
        let (tag, len, at) = self.rec_header()?;
        match tag {
            TAG_DATA => {
                if len < 12 {
                    return Err(ImageError::Bound {
                        at,
                        what: "data record length",
                        value: u64::from(len),
                    });
                }
                let mut h = [0u8; 12];
                self.r.fill(&mut h)?;
                let mut c = Cur::new(&h, at);
                let (addr, npages) = (c.u64()?, c.u32()?);
                if npages == 0 || npages > MAX_RUN_PAGES {
                    return Err(ImageError::Bound {
                        at,
                        what: "pages in a data record",
                        value: u64::from(npages),
                    });
                }
                let bytes = u64::from(npages) * PAGE;
                if u64::from(len) != bytes + 12 {
                    return Err(ImageError::Invalid {
                        at,
                        why: format!("data record of {npages} pages has length {len}"),
                    });
                }
                self.page_target(at, addr, bytes)?;
                // bytes <= MAX_RUN_PAGES * PAGE = 1 MiB.
                buf.resize(bytes as usize, 0);
                self.r.fill(buf)?;
                self.stats.data_pages += u64::from(npages);
                Ok(Some(Pages::Data { addr, npages }))
            }
            TAG_ZERO => {
                if len != 16 {
                    return Err(ImageError::Bound {
                        at,
                        what: "zero record length",
                        value: u64::from(len),
                    });
                }
                let p = self.payload(len)?;
                let mut c = Cur::new(&p, at);
                let addr = c.u64()?;
                let npages = c.u64()?;
                let bytes = npages
                    .checked_mul(PAGE)
                    .filter(|&b| b > 0 && b <= USER_TOP)
                    .ok_or(ImageError::Bound {
                        at,
                        what: "pages in a zero record",
                        value: npages,
                    })?;
                self.page_target(at, addr, bytes)?;
                self.stats.zero_pages += npages;
                Ok(Some(Pages::Zero { addr, npages }))
            }
            TAG_END => {
                if len != 24 {
                    return Err(ImageError::Bound {
                        at,
                        what: "end record length",
                        value: u64::from(len),
                    });
                }
                let mut counts = [0u8; 16];
                self.r.fill(&mut counts)?;
                let computed = self.r.hash.digest();
                let mut s = [0u8; 8];
                let got = read_exact_plain(&mut self.r.inner, &mut s);
                if got.is_err() {
                    return Err(ImageError::Truncated { at: self.r.n });
                }
                let stored = u64::from_le_bytes(s);
                let mut c = Cur::new(&counts, at);
                let (data, zero) = (c.u64()?, c.u64()?);
                if stored != computed {
                    return Err(ImageError::Checksum { stored, computed });
                }
                if data != self.stats.data_pages || zero != self.stats.zero_pages {
                    return Err(ImageError::Invalid {
                        at,
                        why: format!(
                            "end record counts {data} data + {zero} zero pages, stream had {} + {}",
                            self.stats.data_pages, self.stats.zero_pages
                        ),
                    });
                }
                self.stats.checksum = stored;
                self.stats.bytes = self.r.n + 8;
                self.finished = true;
                Ok(None)
            }
            _ => Err(ImageError::Tag {
                at,
                tag,
                why: "expected a page record or the end record",
            }),
        }
    }

    /// Counts so far (final once `next_pages` returned `None`).
    pub fn stats(&self) -> ImageStats {
        self.stats
    }
}

fn read_exact_plain<R: Read>(r: &mut R, b: &mut [u8]) -> io::Result<()> {
    r.read_exact(b)
}

fn parse_process(c: &mut Cur<'_>) -> Result<ProcessInfo, ImageError> {
    let at = c.at;
    let pid = c.u32()?;
    if pid == 0 || pid > 1 << 22 {
        return Err(ImageError::Bound {
            at,
            what: "pid",
            value: u64::from(pid),
        });
    }
    let personality = c.u32()?;
    let mut mm = [0u64; 11];
    for x in &mut mm {
        *x = c.u64()?;
        if *x > USER_TOP {
            return Err(ImageError::Bound {
                at,
                what: "mm field",
                value: *x,
            });
        }
    }
    let n = c.count16(MAX_AUXV, "auxv entries")?;
    let mut auxv = Vec::with_capacity(n);
    for _ in 0..n {
        auxv.push((c.u64()?, c.u64()?));
    }
    let mut stdio = [StdioKind::Closed; 3];
    for s in &mut stdio {
        let k = c.u8()?;
        *s = StdioKind::from_code(k).ok_or(ImageError::Bound {
            at,
            what: "stdio kind",
            value: u64::from(k),
        })?;
    }
    let n = c.count8(64, "signal actions")?;
    let mut sigactions = Vec::with_capacity(n);
    for _ in 0..n {
        let signo = c.u8()?;
        if !(1..=64).contains(&signo)
            || signo == 9
            || signo == 19
            || sigactions.iter().any(|a: &SigAction| a.signo == signo)
        {
            return Err(ImageError::Bound {
                at,
                what: "signal action number",
                value: u64::from(signo),
            });
        }
        sigactions.push(SigAction {
            signo,
            handler: c.u64()?,
            flags: c.u64()?,
            restorer: c.u64()?,
            mask: c.u64()?,
        });
    }
    let shared_pending = c.sigs()?;
    let exe = c.str(MAX_NAME, "exe path length")?;
    let files = parse_files(c, &stdio)?;
    let (monotonic_ns, boottime_ns) = (c.u64()?, c.u64()?);
    let n = c.count8(3, "interval timers")?;
    let mut itimers: Vec<(u8, [u64; 4])> = Vec::with_capacity(n);
    for _ in 0..n {
        let which = c.u8()?;
        let t = [c.u64()?, c.u64()?, c.u64()?, c.u64()?];
        // Seconds within what the kernel takes, microseconds below 10^6,
        // each timer once.
        if which > 2
            || itimers.iter().any(|(w, _)| *w == which)
            || t[1] >= 1_000_000
            || t[3] >= 1_000_000
            || t[0] > i64::MAX as u64
            || t[2] > i64::MAX as u64
        {
            return Err(ImageError::Bound {
                at: c.at,
                what: "interval timer",
                value: u64::from(which),
            });
        }
        itimers.push((which, t));
    }
    let (pipes, in_flight) = parse_pipes(c, &files)?;
    let socketpairs = parse_socketpairs(c, &files, in_flight)?;
    let epolls = parse_epolls(c, &files, &stdio)?;
    let posix_timers = parse_posix_timers(c)?;
    let memfds = parse_memfds(c, &files)?;
    let n = c.u32()? as usize;
    if n > MAX_VDSO {
        return Err(ImageError::Bound {
            at: c.at,
            what: "vDSO length",
            value: n as u64,
        });
    }
    let vdso = c.take(n)?.to_vec();
    let xfeatures = c.u64()?;
    let n = c.count16(MAX_CPU_FLAGS, "CPU extension count")?;
    let cpu = (0..n)
        .map(|_| c.str(MAX_CPU_FLAG, "CPU extension name"))
        .collect::<Result<Vec<_>, _>>()?;
    c.done()?;
    Ok(ProcessInfo {
        pid,
        personality,
        mm: MmFields::from_array(mm),
        auxv,
        stdio,
        sigactions,
        shared_pending,
        exe,
        files,
        monotonic_ns,
        boottime_ns,
        itimers,
        pipes,
        socketpairs,
        epolls,
        posix_timers,
        memfds,
        vdso,
        xfeatures,
        cpu,
    })
}

/// The memfds: unique ids, each used by a descriptor or a mapping, names
/// within `memfd_create`'s limit, sizes within [`MAX_MEMFD_SIZE`], known
/// seals, content ascending within the size and all together within
/// [`MAX_MEMFD_BYTES`]; every memfd descriptor's id listed. (That each
/// mapping start is a shared mapping of the image is the restore's to
/// check: mappings come after this record.)
fn parse_memfds(c: &mut Cur<'_>, files: &[OpenFile]) -> Result<Vec<MemfdState>, ImageError> {
    let at = c.at;
    let invalid = |why: String| ImageError::Invalid { at, why };
    let n = c.count16(MAX_FILES, "memfds")?;
    let mut out: Vec<MemfdState> = Vec::with_capacity(n);
    let mut total = 0usize;
    for _ in 0..n {
        let id = c.u32()?;
        let name = c.str(MAX_MEMFD_NAME, "memfd name")?;
        let (size, seals) = (c.u64()?, c.u32()?);
        let nmaps = c.u32()? as usize;
        if nmaps > MAX_MAPPINGS {
            return Err(invalid(format!("memfd {id}: {nmaps} mappings")));
        }
        let mut maps = Vec::with_capacity(nmaps);
        for _ in 0..nmaps {
            maps.push(c.u64()?);
        }
        let nchunks = c.u32()? as usize;
        if nchunks > MAX_MEMFD_BYTES {
            return Err(invalid(format!("memfd {id}: {nchunks} pieces")));
        }
        let mut data: Vec<(u64, Vec<u8>)> = Vec::with_capacity(nchunks.min(1024));
        let mut end = 0u64;
        for _ in 0..nchunks {
            let (off, len) = (c.u64()?, c.u32()? as usize);
            total = total.saturating_add(len);
            if total > MAX_MEMFD_BYTES
                || off < end
                || off.checked_add(len as u64).is_none_or(|e| e > size)
            {
                return Err(invalid(format!(
                    "memfd {id}: {len} bytes at {off} of {size} ({total} in all): out of order, outside it or too many"
                )));
            }
            end = off + len as u64;
            data.push((off, c.take(len)?.to_vec()));
        }
        let used = !maps.is_empty() || files.iter().any(|f| f.state == FileState::Memfd(id));
        if out.iter().any(|m| m.id == id)
            || !used
            || size > MAX_MEMFD_SIZE
            || seals & !MEMFD_SEALS != 0
            || name.contains('/')
        {
            return Err(invalid(format!(
                "memfd {id} ({name:?}, {size} bytes, seals {seals:#x}): listed twice, unused, too large, or unknown seals"
            )));
        }
        out.push(MemfdState {
            id,
            name,
            size,
            seals,
            maps,
            data,
        });
    }
    for f in files {
        if let FileState::Memfd(id) = f.state {
            if !out.iter().any(|m| m.id == id) {
                return Err(invalid(format!("fd {}: memfd {id} is not listed", f.fd)));
            }
        }
    }
    Ok(out)
}

/// The POSIX timers: at most [`MAX_POSIX_TIMERS`], ids unique, ascending
/// and below [`MAX_TIMER_ID`], known clocks and notifications, a signal
/// (1-64) where one is sent, a thread index within [`MAX_THREADS`] (the
/// restore checks it against the threads).
fn parse_posix_timers(c: &mut Cur<'_>) -> Result<Vec<PosixTimer>, ImageError> {
    let at = c.at;
    let n = c.count8(MAX_POSIX_TIMERS, "POSIX timers")?;
    let mut out: Vec<PosixTimer> = Vec::with_capacity(n);
    for _ in 0..n {
        let t = PosixTimer {
            id: c.u32()?,
            clockid: c.u32()?,
            notify: c.u8()?,
            signo: c.u8()?,
            sigval: c.u64()?,
            thread: c.u32()?,
            interval_ns: c.u64()?,
            value_ns: c.u64()?,
        };
        let fits = t.id < MAX_TIMER_ID
            && out.last().is_none_or(|p| p.id < t.id)
            && POSIX_TIMER_CLOCKS.contains(&t.clockid)
            && matches!(t.notify, SIGEV_SIGNAL | SIGEV_NONE | SIGEV_THREAD_ID)
            && (t.notify == SIGEV_NONE || (1..=64).contains(&t.signo))
            && (t.notify != SIGEV_THREAD_ID || (t.thread as usize) < MAX_THREADS)
            && t.interval_ns <= i64::MAX as u64
            && t.value_ns <= i64::MAX as u64;
        if !fits {
            return Err(ImageError::Invalid {
                at,
                why: format!("POSIX timer {t:?} is not one as carried"),
            });
        }
        out.push(t);
    }
    Ok(out)
}

/// The epolls: one entry for each epoll descriptor of `files` that is not
/// a `dup`, and none else; each watch on a distinct descriptor that is
/// carried or is one of fds 0-2 the destination supplies; at most
/// [`MAX_WATCHES`] in all.
fn parse_epolls(
    c: &mut Cur<'_>,
    files: &[OpenFile],
    stdio: &[StdioKind; 3],
) -> Result<Vec<EpollState>, ImageError> {
    let at = c.at;
    let n = c.count16(MAX_FILES, "epolls")?;
    let invalid = |why: String| ImageError::Invalid { at, why };
    let mut epolls: Vec<EpollState> = Vec::with_capacity(n);
    let mut total = 0usize;
    for _ in 0..n {
        let (fd, count) = (c.u32()?, c.u32()? as usize);
        total = c.within(total.saturating_add(count), MAX_WATCHES, "epoll watches")?;
        if epolls.iter().any(|e| e.fd == fd)
            || !files
                .iter()
                .any(|f| f.fd == fd && f.kind == FileKind::Epoll && f.share.is_none())
        {
            return Err(invalid(format!(
                "epoll on fd {fd}: not an epoll of the image, or listed twice"
            )));
        }
        // `count` <= MAX_WATCHES: a bounded allocation.
        let mut watches: Vec<EpollWatch> = Vec::with_capacity(count);
        for _ in 0..count {
            let x = EpollWatch {
                fd: c.u32()?,
                events: c.u32()?,
                data: c.u64()?,
            };
            let open = files.iter().any(|f| f.fd == x.fd)
                || (x.fd < 3 && stdio[x.fd as usize] != StdioKind::Closed);
            if !open || x.fd == fd || watches.iter().any(|w| w.fd == x.fd) {
                return Err(invalid(format!(
                    "epoll on fd {fd} watches fd {}: not open, itself, or twice",
                    x.fd
                )));
            }
            watches.push(x);
        }
        epolls.push(EpollState { fd, watches });
    }
    if let Some(f) = files.iter().find(|f| {
        f.kind == FileKind::Epoll && f.share.is_none() && !epolls.iter().any(|e| e.fd == f.fd)
    }) {
        return Err(invalid(format!("fd {}: its epoll is not listed", f.fd)));
    }
    Ok(epolls)
}

/// The socket pairs: unique ids, each used by some socket end of `files`
/// and every socket end's pair listed; stream or datagram; shutdown bits
/// known; a stream's queue one non-empty chunk at most; at most
/// [`MAX_DGRAMS`] datagrams an end; their bytes within what `in_flight`
/// (the pipes') leaves of [`MAX_PIPE_BYTES`].
fn parse_socketpairs(
    c: &mut Cur<'_>,
    files: &[OpenFile],
    mut in_flight: usize,
) -> Result<Vec<SocketPairState>, ImageError> {
    let at = c.at;
    let n = c.count16(MAX_FILES, "socket pairs")?;
    let invalid = |why: String| ImageError::Invalid { at, why };
    let mut pairs: Vec<SocketPairState> = Vec::with_capacity(n);
    for _ in 0..n {
        let (id, kind, sh0, sh1) = (c.u32()?, c.u8()?, c.u8()?, c.u8()?);
        if pairs.iter().any(|p| p.id == id)
            || !files
                .iter()
                .any(|f| matches!(f.state, FileState::Socket { id: i, .. } if i == id))
            || !(1..=2).contains(&kind)
            || sh0 > 3
            || sh1 > 3
        {
            return Err(invalid(format!(
                "socket pair {id}: type {kind}, shutdown {sh0}/{sh1}, unknown or listed twice?"
            )));
        }
        let mut queued: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        for q in &mut queued {
            let count = usize::from(c.u16()?);
            if count > MAX_DGRAMS || (kind == 1 && count > 1) {
                return Err(invalid(format!(
                    "socket pair {id}: {count} messages queued"
                )));
            }
            for _ in 0..count {
                let len = c.u32()? as usize;
                in_flight = in_flight.saturating_add(len);
                if in_flight > MAX_PIPE_BYTES || (kind == 1 && len == 0) {
                    return Err(invalid(format!(
                        "socket pair {id}: {len} bytes queued ({in_flight} in flight in all)"
                    )));
                }
                // `len` <= MAX_PIPE_BYTES: bounded; `take` checks the record.
                q.push(c.take(len)?.to_vec());
            }
        }
        pairs.push(SocketPairState {
            id,
            kind,
            shutdown: [sh0, sh1],
            queued,
        });
    }
    for f in files {
        if let FileState::Socket { id, .. } = f.state {
            if !pairs.iter().any(|p| p.id == id) {
                return Err(invalid(format!(
                    "fd {}: socket pair {id} is not listed",
                    f.fd
                )));
            }
        }
    }
    Ok(pairs)
}

/// The pipes: unique ids, each used by some pipe end of `files` and every
/// pipe end's id listed, bytes within the capacity and all together
/// within [`MAX_PIPE_BYTES`].
fn parse_pipes(c: &mut Cur<'_>, files: &[OpenFile]) -> Result<(Vec<PipeState>, usize), ImageError> {
    let at = c.at;
    let n = c.count16(MAX_FILES, "pipes")?;
    let mut pipes: Vec<PipeState> = Vec::with_capacity(n);
    let mut total = 0usize;
    for _ in 0..n {
        let (id, capacity, len) = (c.u32()?, c.u32()?, c.u32()? as usize);
        total = total.saturating_add(len);
        if pipes.iter().any(|p| p.id == id)
            || !files.iter().any(|f| f.state == FileState::Pipe(id))
            || !(4096..=MAX_PIPE_CAPACITY).contains(&capacity)
            || len > capacity as usize
            || total > MAX_PIPE_BYTES
        {
            return Err(ImageError::Invalid {
                at,
                why: format!(
                    "pipe {id}: capacity {capacity}, {len} bytes ({total} in all), unknown or listed twice?"
                ),
            });
        }
        // `len` <= MAX_PIPE_BYTES: a bounded allocation, and `take` checks
        // the record holds it.
        let bytes = c.take(len)?.to_vec();
        pipes.push(PipeState {
            id,
            capacity,
            bytes,
        });
    }
    for f in files {
        if let FileState::Pipe(id) = f.state {
            if !pipes.iter().any(|p| p.id == id) {
                return Err(ImageError::Invalid {
                    at,
                    why: format!("fd {}: pipe {id} is not listed", f.fd),
                });
            }
        }
    }
    Ok((pipes, total))
}

/// The open files: unique fds below [`MAX_FD`], known flags, absolute
/// paths (devices: one of [`DEVICES`]); a stdio fd is listed exactly when
/// its kind is `File`.
fn parse_files(c: &mut Cur<'_>, stdio: &[StdioKind; 3]) -> Result<Vec<OpenFile>, ImageError> {
    let at = c.at;
    let n = c.count16(MAX_FILES, "open files")?;
    let invalid = |why: String| ImageError::Invalid { at, why };
    let mut files: Vec<OpenFile> = Vec::with_capacity(n);
    for _ in 0..n {
        let fd = c.u32()?;
        if fd >= MAX_FD || files.iter().any(|f| f.fd == fd) {
            return Err(ImageError::Bound {
                at,
                what: "file descriptor",
                value: u64::from(fd),
            });
        }
        let k = c.u8()?;
        let kind = FileKind::from_code(k).ok_or(ImageError::Bound {
            at,
            what: "file kind",
            value: u64::from(k),
        })?;
        let flags = c.u32()?;
        if flags & !FILE_FLAGS != 0 || flags & 3 == 3 {
            return Err(ImageError::Bound {
                at,
                what: "open flags",
                value: u64::from(flags),
            });
        }
        let (pos, size, mtime_ns) = (c.u64()?, c.u64()?, c.u64()?);
        let path = c.str(MAX_NAME, "file path length")?;
        let share = match c.u32()? {
            u32::MAX => None,
            s => Some(s),
        };
        let state = match c.u8()? {
            0 => FileState::None,
            1 => {
                let (clockid, settime_flags) = (c.u32()?, c.u32()?);
                let armed = match c.u8()? {
                    0 => false,
                    1 => true,
                    a => {
                        return Err(ImageError::Bound {
                            at,
                            what: "timer armed",
                            value: u64::from(a),
                        })
                    }
                };
                FileState::Timer(TimerState {
                    clockid,
                    settime_flags,
                    armed,
                    ticks: c.u64()?,
                    value_ns: c.u64()? as i64,
                    interval_ns: c.u64()?,
                })
            }
            2 => FileState::Signals(c.u64()?),
            3 => FileState::Pipe(c.u32()?),
            4 => FileState::Socket {
                id: c.u32()?,
                end: c.u8()?,
            },
            5 => FileState::Memfd(c.u32()?),
            s => {
                return Err(ImageError::Bound {
                    at,
                    what: "file state",
                    value: u64::from(s),
                })
            }
        };
        let state_fits = match (kind, state) {
            (FileKind::Timerfd, FileState::Timer(t)) => {
                let realtime = matches!(t.clockid, 0 | 8);
                TIMERFD_CLOCKS.contains(&t.clockid)
                    && t.settime_flags & !(TFD_ABSTIME | TFD_CANCEL_ON_SET) == 0
                    && (t.settime_flags & TFD_CANCEL_ON_SET == 0
                        || (realtime && t.settime_flags & TFD_ABSTIME != 0))
                    && (t.armed || t.value_ns == 0)
                    && (t.value_ns >= 0 || !(realtime && t.settime_flags & TFD_ABSTIME != 0))
                    && t.interval_ns <= i64::MAX as u64
                    && path == TIMERFD
            }
            (FileKind::Signalfd, FileState::Signals(_)) => path == SIGNALFD,
            (FileKind::Pipe, FileState::Pipe(_)) => {
                path.starts_with("pipe:[") && path.ends_with(']')
            }
            (FileKind::Socket, FileState::Socket { end, .. }) => {
                end <= 1 && path.starts_with("socket:[") && path.ends_with(']')
            }
            (FileKind::Eventfd, FileState::None) => {
                path == EVENTFD && mtime_ns <= 1 && size != u64::MAX
            }
            (FileKind::Epoll, FileState::None) => path == EPOLL,
            (FileKind::Memfd, FileState::Memfd(_)) => {
                path.starts_with("/memfd:") && path.ends_with(" (deleted)")
            }
            (FileKind::Regular | FileKind::Device, FileState::None) => {
                path.starts_with('/') && !path.contains('\0')
            }
            _ => false,
        };
        if !state_fits {
            return Err(invalid(format!(
                "fd {fd}: {kind:?} on {path:?} with {state:?} is not one as carried"
            )));
        }
        if kind == FileKind::Device && !DEVICES.contains(&path.as_str()) {
            return Err(invalid(format!(
                "fd {fd}: {path:?} is not a device carried"
            )));
        }
        let f = OpenFile {
            fd,
            kind,
            flags,
            pos,
            path,
            size,
            mtime_ns,
            state,
            share,
        };
        if let Some(s) = share {
            // An earlier descriptor that owns its description, and the same
            // description (only the descriptor's O_CLOEXEC may differ).
            let cloexec = libc::O_CLOEXEC as u32;
            let same = files.iter().any(|g| {
                g.fd == s
                    && g.share.is_none()
                    && OpenFile {
                        fd,
                        flags: g.flags & !cloexec | f.flags & cloexec,
                        share,
                        ..g.clone()
                    } == f
            });
            if !same {
                return Err(invalid(format!(
                    "fd {fd} shares fd {s}'s open file, which is not an earlier one like it"
                )));
            }
        }
        files.push(f);
    }
    for (fd, k) in stdio.iter().enumerate() {
        let listed = files.iter().any(|f| f.fd == fd as u32);
        if listed != (*k == StdioKind::File) {
            return Err(invalid(format!(
                "fd {fd} is {k:?} but is {} among the open files",
                if listed { "listed" } else { "not listed" }
            )));
        }
    }
    Ok(files)
}

fn parse_thread(c: &mut Cur<'_>) -> Result<ThreadState, ImageError> {
    let at = c.at;
    let tid = c.u32()?;
    if tid == 0 || tid > 1 << 22 {
        return Err(ImageError::Bound {
            at,
            what: "tid",
            value: u64::from(tid),
        });
    }
    let mut regs = [0u64; NREGS];
    for r in &mut regs {
        *r = c.u64()?;
    }
    let fp_kind = match c.u8()? {
        1 => FpKind::Xstate,
        2 => FpKind::Fxsave,
        k => {
            return Err(ImageError::Bound {
                at,
                what: "FP state kind",
                value: u64::from(k),
            })
        }
    };
    let n = c.u32()? as usize;
    if !(512..=MAX_XSTATE).contains(&n) || (fp_kind == FpKind::Fxsave && n != 512) {
        return Err(ImageError::Bound {
            at,
            what: "FP state size",
            value: n as u64,
        });
    }
    let fp = c.take(n)?.to_vec();
    let sigmask = c.u64()?;
    let rseq = Rseq {
        abi_pointer: c.u64()?,
        abi_size: c.u32()?,
        signature: c.u32()?,
        flags: c.u32()?,
    };
    if rseq.abi_pointer > USER_TOP || rseq.abi_size > 4096 {
        return Err(ImageError::Bound {
            at,
            what: "rseq area",
            value: rseq.abi_pointer,
        });
    }
    let clear_child_tid = c.u64()?;
    let robust_list = c.u64()?;
    let robust_len = c.u64()?;
    let sp = c.u64()?;
    let altstack = AltStack {
        sp,
        flags: c.u32()?,
        size: c.u64()?,
    };
    for (what, v) in [
        ("clear_child_tid", clear_child_tid),
        ("robust list", robust_list),
        ("sigaltstack", altstack.sp),
    ] {
        if v > USER_TOP {
            return Err(ImageError::Bound { at, what, value: v });
        }
    }
    let mut comm = [0u8; 16];
    comm.copy_from_slice(c.take(16)?);
    let pending = c.sigs()?;
    c.done()?;
    Ok(ThreadState {
        tid,
        regs,
        fp_kind,
        fp,
        sigmask,
        rseq,
        clear_child_tid,
        robust_list,
        robust_len,
        altstack,
        comm,
        pending,
    })
}

fn parse_mapping(c: &mut Cur<'_>) -> Result<Mapping, ImageError> {
    let at = c.at;
    let start = c.u64()?;
    let end = c.u64()?;
    check_addr(at, "mapping start", start)?;
    check_addr(at, "mapping end", end)?;
    if start >= end || start < PAGE {
        return Err(ImageError::Invalid {
            at,
            why: format!("empty or reversed mapping {start:#x}-{end:#x}"),
        });
    }
    let prot = c.u8()?;
    if prot & !(PROT_R | PROT_W | PROT_X) != 0 {
        return Err(ImageError::Bound {
            at,
            what: "mapping prot",
            value: u64::from(prot),
        });
    }
    let flags = c.u8()?;
    if flags & !(MAPF_GROWSDOWN | MAPF_HUGEPAGE | MAPF_NOHUGEPAGE | MAPF_DSM | MAPF_SHARED) != 0 {
        return Err(ImageError::Bound {
            at,
            what: "mapping flags",
            value: u64::from(flags),
        });
    }
    let k = c.u8()?;
    let kind = MappingKind::from_code(k).ok_or(ImageError::Bound {
        at,
        what: "mapping kind",
        value: u64::from(k),
    })?;
    if flags & MAPF_SHARED != 0
        && (kind != MappingKind::Anon || flags & (MAPF_GROWSDOWN | MAPF_DSM) != 0)
    {
        return Err(ImageError::Bound {
            at,
            what: "shared mapping's kind or flags",
            value: u64::from(flags),
        });
    }
    let offset = c.u64()?;
    let resident = c.u64()?;
    if resident > (end - start) / PAGE {
        return Err(ImageError::Bound {
            at,
            what: "resident pages of a mapping",
            value: resident,
        });
    }
    let name = c.str(MAX_NAME, "mapping name length")?;
    c.done()?;
    Ok(Mapping {
        start,
        end,
        prot,
        flags,
        kind,
        offset,
        resident,
        name,
    })
}

/// A whole image in memory (tests, tools). Pages are `(addr, content)` for
/// data runs; zero runs are counted in the stats only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    pub meta: ImageMeta,
    pub data: Vec<(u64, Vec<u8>)>,
    pub zero: Vec<(u64, u64)>,
    pub stats: ImageStats,
}

/// Decodes a complete image from a reader.
pub fn decode_all<R: Read>(r: R) -> Result<DecodedImage, ImageError> {
    let (mut rd, meta) = ImageReader::open(r)?;
    let mut data = Vec::new();
    let mut zero = Vec::new();
    let mut buf = Vec::new();
    while let Some(p) = rd.next_pages(&mut buf)? {
        match p {
            Pages::Data { addr, .. } => data.push((addr, buf.clone())),
            Pages::Zero { addr, npages } => zero.push((addr, npages)),
        }
    }
    Ok(DecodedImage {
        meta,
        data,
        zero,
        stats: rd.stats(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    type Sample = (ImageMeta, Vec<(u64, Vec<u8>)>, Vec<(u64, u64)>);

    /// A private mapping of `kind` over `start..end`, nothing else set.
    pub(crate) fn mapping(start: u64, end: u64, prot: u8, kind: MappingKind) -> Mapping {
        Mapping {
            start,
            end,
            prot,
            flags: 0,
            kind,
            offset: 0,
            resident: 0,
            name: String::new(),
        }
    }

    pub(crate) fn sample(nmaps: usize, seed: u8) -> Sample {
        let vdso: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let header = Header {
            flags: FLAG_ZERO_RUNS,
            kernel: KernelFingerprint {
                release: "6.18.44".into(),
                version: "#1 SMP".into(),
                vdso_hash: xxhash_rust::xxh3::xxh3_64(&vdso),
                vdso_len: 8192,
            },
        };
        let process = ProcessInfo {
            pid: 100,
            personality: 0,
            mm: MmFields {
                start_code: 0x40_0000,
                end_code: 0x40_1000,
                ..MmFields::default()
            },
            auxv: vec![(6, 4096), (25, 0x7fff_0000)],
            stdio: [StdioKind::DevNull, StdioKind::Pipe, StdioKind::Tty],
            sigactions: vec![SigAction {
                signo: 10,
                handler: 0x40_1000,
                flags: 0x0400_0000,
                restorer: 0x40_2000,
                mask: 0,
            }],
            shared_pending: vec![],
            exe: "/bin/x".into(),
            files: vec![
                OpenFile {
                    fd: 5,
                    kind: FileKind::Regular,
                    flags: 0o2001,
                    pos: 1234,
                    path: "/var/log/x.log".into(),
                    size: 1234,
                    mtime_ns: 1_700_000_000_123_456_789,
                    state: FileState::None,
                    share: None,
                },
                OpenFile {
                    fd: 7,
                    kind: FileKind::Device,
                    flags: 0o2000000,
                    pos: 0,
                    path: "/dev/urandom".into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::None,
                    share: None,
                },
                OpenFile {
                    fd: 8,
                    kind: FileKind::Timerfd,
                    flags: 0o4002,
                    pos: 0,
                    path: TIMERFD.into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::Timer(TimerState {
                        clockid: 1,
                        settime_flags: 0,
                        ticks: 3,
                        armed: true,
                        value_ns: -4_000_000,
                        interval_ns: 5_000_000,
                    }),
                    share: None,
                },
                OpenFile {
                    fd: 9,
                    kind: FileKind::Signalfd,
                    flags: 0o2,
                    pos: 0,
                    path: SIGNALFD.into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::Signals(1 << 11),
                    share: None,
                },
                OpenFile {
                    fd: 10,
                    kind: FileKind::Pipe,
                    flags: 0o4000,
                    pos: 0,
                    path: "pipe:[77]".into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::Pipe(1),
                    share: None,
                },
                OpenFile {
                    fd: 11,
                    kind: FileKind::Pipe,
                    flags: 0o1,
                    pos: 0,
                    path: "pipe:[77]".into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::Pipe(1),
                    share: None,
                },
                OpenFile {
                    fd: 12,
                    kind: FileKind::Pipe,
                    flags: 0o2004000,
                    pos: 0,
                    path: "pipe:[77]".into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::Pipe(1),
                    share: Some(10),
                },
                OpenFile {
                    fd: 13,
                    kind: FileKind::Socket,
                    flags: 0o4002,
                    pos: 0,
                    path: "socket:[88]".into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::Socket { id: 1, end: 0 },
                    share: None,
                },
                OpenFile {
                    fd: 14,
                    kind: FileKind::Socket,
                    flags: 0o2,
                    pos: 0,
                    path: "socket:[89]".into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::Socket { id: 1, end: 1 },
                    share: None,
                },
                OpenFile {
                    fd: 15,
                    kind: FileKind::Epoll,
                    flags: 0o2000002,
                    pos: 0,
                    path: EPOLL.into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::None,
                    share: None,
                },
                OpenFile {
                    fd: 16,
                    kind: FileKind::Epoll,
                    flags: 0o2,
                    pos: 0,
                    path: EPOLL.into(),
                    size: 0,
                    mtime_ns: 0,
                    state: FileState::None,
                    share: Some(15),
                },
                OpenFile {
                    fd: 17,
                    kind: FileKind::Memfd,
                    flags: 0o2000002,
                    pos: 12,
                    path: "/memfd:buf (deleted)".into(),
                    size: 12_298,
                    mtime_ns: 0,
                    state: FileState::Memfd(1),
                    share: None,
                },
            ],
            monotonic_ns: 13_000_000_001,
            boottime_ns: 14_000_000_002,
            itimers: vec![(0, [0, 10_000, 1, 5]), (2, [3, 0, 0, 999_999])],
            pipes: vec![PipeState {
                id: 1,
                capacity: 65536,
                bytes: b"bytes in flight".to_vec(),
            }],
            socketpairs: vec![SocketPairState {
                id: 1,
                kind: 2,
                shutdown: [0, 2],
                queued: [vec![b"one".to_vec(), vec![], b"three".to_vec()], vec![]],
            }],
            posix_timers: vec![
                PosixTimer {
                    id: 1,
                    clockid: 1,
                    notify: SIGEV_SIGNAL,
                    signo: 36,
                    sigval: 0x77,
                    thread: 0,
                    interval_ns: 5_000_000,
                    value_ns: 1_234_567,
                },
                PosixTimer {
                    id: 3,
                    clockid: 7,
                    notify: SIGEV_THREAD_ID,
                    signo: 12,
                    sigval: u64::MAX,
                    thread: 1,
                    interval_ns: 0,
                    value_ns: 0,
                },
            ],
            epolls: vec![EpollState {
                fd: 15,
                watches: vec![
                    EpollWatch {
                        fd: 10,
                        events: 1 | 1 << 31,
                        data: 0x1111,
                    },
                    EpollWatch {
                        fd: 0,
                        events: 4,
                        data: u64::MAX,
                    },
                ],
            }],
            memfds: vec![MemfdState {
                id: 1,
                name: "buf".into(),
                size: 12_298,
                seals: 6,
                maps: vec![],
                data: vec![(0, b"head".to_vec()), (8192, b"memfd tail".to_vec())],
            }],
            vdso,
            xfeatures: 0x207,
            cpu: vec!["avx2".into(), "sse2".into()],
        };
        let mut si = [0u8; SIGINFO_SIZE];
        si[0] = 10;
        let thread = |tid| ThreadState {
            tid,
            regs: [u64::from(seed); NREGS],
            fp_kind: FpKind::Xstate,
            fp: vec![seed; 832],
            sigmask: 0,
            rseq: Rseq::default(),
            clear_child_tid: 0x7000_0000,
            robust_list: 0,
            robust_len: 24,
            altstack: AltStack::default(),
            comm: *b"mkcounter\0\0\0\0\0\0\0",
            pending: vec![SigInfo(si)],
        };
        let mut mappings = Vec::new();
        let mut data = Vec::new();
        let mut zero = Vec::new();
        for i in 0..nmaps as u64 {
            let start = 0x10_0000 + i * 0x10_000;
            mappings.push(Mapping {
                start,
                end: start + 4 * PAGE,
                prot: PROT_R | PROT_W,
                flags: 0,
                kind: MappingKind::Anon,
                offset: 0,
                resident: 2,
                name: format!("m{i}"),
            });
            data.push((start, vec![seed.wrapping_add(i as u8); 2 * PAGE as usize]));
            zero.push((start + 2 * PAGE, 2));
        }
        mappings.push(Mapping {
            start: 0x7fff_0000_0000,
            end: 0x7fff_0000_2000,
            prot: PROT_R | PROT_X,
            flags: 0,
            kind: MappingKind::Vdso,
            offset: 0,
            resident: 0,
            name: "[vdso]".into(),
        });
        (
            ImageMeta {
                header,
                process,
                threads: vec![thread(100), thread(101)],
                mappings,
            },
            data,
            zero,
        )
    }

    fn encode(meta: &ImageMeta, data: &[(u64, Vec<u8>)], zero: &[(u64, u64)]) -> Vec<u8> {
        let mut w = ImageWriter::new(Vec::new(), &meta.header).unwrap();
        w.process(&meta.process).unwrap();
        for t in &meta.threads {
            w.thread(t).unwrap();
        }
        for m in &meta.mappings {
            w.mapping(m).unwrap();
        }
        for ((a, d), (za, zn)) in data.iter().zip(zero) {
            w.data(*a, d).unwrap();
            w.zero(*za, *zn).unwrap();
        }
        w.finish().unwrap().0
    }

    /// The bytes of an image are those of format version 8 (version 2,
    /// as first written by hand before the shared codec, plus the open
    /// files, the clocks and the interval timers (3), plus timerfds,
    /// signalfds, pipes, socket pairs and shared descriptions (4), plus
    /// epolls and POSIX timers (5), plus memfds (6), plus the vDSO's bytes
    /// and the XSAVE components (7), plus the CPU extensions (8)): same
    /// length, same checksum over every byte. A change here is a format
    /// change: bump VERSION and the README's layout.
    #[test]
    fn encoding_is_the_one_of_version_8() {
        let (meta, data, zero) = sample(3, 7);
        let bytes = encode(&meta, &data, &zero);
        let sum = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap());
        assert_eq!((bytes.len(), sum), (36978, 0xf2cd_9baf_3ac3_6ee1));
    }

    /// The vDSO bytes must be the ones the header's fingerprint names;
    /// none at all is an image that cannot go to another kernel build.
    #[test]
    fn a_vdso_other_than_the_headers_is_refused() {
        let (mut meta, data, zero) = sample(1, 3);
        meta.process.vdso[100] ^= 1;
        let e = decode_all(&encode(&meta, &data, &zero)[..]).unwrap_err();
        assert!(
            e.to_string().contains("not the one the header names"),
            "{e}"
        );
        meta.process.vdso.clear();
        let d = decode_all(&encode(&meta, &data, &zero)[..]).unwrap();
        assert!(d.meta.process.vdso.is_empty());
    }

    /// Files the decoder refuses: a stdio fd whose kind and listing
    /// disagree, duplicate fds, unknown flags, relative paths, devices not
    /// carried.
    /// The sample's timer state, changed by `f`.
    fn timer(f: impl Fn(&mut TimerState)) -> FileState {
        let mut t = TimerState {
            clockid: 1,
            settime_flags: 0,
            ticks: 3,
            armed: true,
            value_ns: -4_000_000,
            interval_ns: 5_000_000,
        };
        f(&mut t);
        FileState::Timer(t)
    }

    #[test]
    fn bad_open_files_are_refused() {
        type Change = Box<dyn Fn(&mut ProcessInfo)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "stdio says file, none listed",
                Box::new(|p| p.stdio[1] = StdioKind::File),
            ),
            (
                "listed fd 1 but stdio is a pipe",
                Box::new(|p| p.files[0].fd = 1),
            ),
            ("duplicate fd", Box::new(|p| p.files[1].fd = 5)),
            ("unknown flags", Box::new(|p| p.files[0].flags |= 0o100)),
            ("O_WRONLY|O_RDWR", Box::new(|p| p.files[0].flags |= 3)),
            (
                "relative path",
                Box::new(|p| p.files[0].path = "x.log".into()),
            ),
            (
                "device not carried",
                Box::new(|p| p.files[1].path = "/dev/sda".into()),
            ),
            ("fd too high", Box::new(|p| p.files[0].fd = MAX_FD)),
            ("timer 3", Box::new(|p| p.itimers[0].0 = 3)),
            (
                "eventfd on a path",
                Box::new(|p| p.files[1].kind = FileKind::Eventfd),
            ),
            ("a timer twice", Box::new(|p| p.itimers[1].0 = 0)),
            (
                "timerfd on clock 2",
                Box::new(|p| p.files[2].state = timer(|t| t.clockid = 2)),
            ),
            (
                "cancel-on-set on a monotonic timerfd",
                Box::new(|p| p.files[2].state = timer(|t| t.settime_flags = 3)),
            ),
            (
                "timerfd flags 4",
                Box::new(|p| p.files[2].state = timer(|t| t.settime_flags = 4)),
            ),
            (
                "disarmed timerfd with a value",
                Box::new(|p| p.files[2].state = timer(|t| t.armed = false)),
            ),
            (
                "absolute real-time timerfd at a negative time",
                Box::new(|p| {
                    p.files[2].state = timer(|t| {
                        t.clockid = 0;
                        t.settime_flags = 1;
                    })
                }),
            ),
            (
                "signalfd on the timerfd's path",
                Box::new(|p| p.files[3].path = TIMERFD.into()),
            ),
            (
                "signalfd with a timer's state",
                Box::new(|p| p.files[3].state = p.files[2].state),
            ),
            (
                "pipe end of an unlisted pipe",
                Box::new(|p| p.files[5].state = FileState::Pipe(2)),
            ),
            (
                "memfd of an unlisted memfd",
                Box::new(|p| p.files[11].state = FileState::Memfd(2)),
            ),
            ("memfd unknown seal", Box::new(|p| p.memfds[0].seals = 0x40)),
            (
                "memfd content out of order",
                Box::new(|p| p.memfds[0].data.swap(0, 1)),
            ),
            (
                "memfd content past its end",
                Box::new(|p| p.memfds[0].size = 8195),
            ),
            (
                "memfd used by nothing",
                Box::new(|p| {
                    let mut m = p.memfds[0].clone();
                    m.id = 9;
                    p.memfds.push(m)
                }),
            ),
            (
                "memfd listed twice",
                Box::new(|p| p.memfds.push(p.memfds[0].clone())),
            ),
            (
                "pipe listed twice",
                Box::new(|p| p.pipes.push(p.pipes[0].clone())),
            ),
            (
                "pipe no fd uses",
                Box::new(|p| {
                    let mut x = p.pipes[0].clone();
                    x.id = 9;
                    p.pipes.push(x)
                }),
            ),
            (
                "pipe bytes past its capacity",
                Box::new(|p| {
                    p.pipes[0].capacity = 4096;
                    p.pipes[0].bytes = vec![1; 4097]
                }),
            ),
            (
                "pipe capacity too small",
                Box::new(|p| p.pipes[0].capacity = 100),
            ),
            (
                "shares a later fd",
                Box::new(|p| p.files[6].share = Some(13)),
            ),
            (
                "shares another kind",
                Box::new(|p| p.files[6].share = Some(9)),
            ),
            (
                "shares one with other flags",
                Box::new(|p| p.files[6].share = Some(11)),
            ),
            (
                "shares a sharer",
                Box::new(|p| {
                    let mut x = p.files[6].clone();
                    x.fd = 13;
                    x.share = Some(12);
                    p.files.push(x)
                }),
            ),
            (
                "usec past a second",
                Box::new(|p| p.itimers[0].1[3] = 1_000_000),
            ),
            (
                "epoll listed twice",
                Box::new(|p| p.epolls.push(p.epolls[0].clone())),
            ),
            ("epoll on a pipe", Box::new(|p| p.epolls[0].fd = 10)),
            ("epoll on a dup", Box::new(|p| p.epolls[0].fd = 16)),
            ("epoll not listed", Box::new(|p| p.epolls.clear())),
            (
                "timers out of order",
                Box::new(|p| p.posix_timers.swap(0, 1)),
            ),
            (
                "timer id too high",
                Box::new(|p| p.posix_timers[1].id = MAX_TIMER_ID),
            ),
            ("timer clock", Box::new(|p| p.posix_timers[0].clockid = 3)),
            ("timer notify", Box::new(|p| p.posix_timers[0].notify = 2)),
            ("timer signal", Box::new(|p| p.posix_timers[0].signo = 65)),
            (
                "watch of a closed fd",
                Box::new(|p| p.epolls[0].watches[0].fd = 40),
            ),
            (
                "watch of itself",
                Box::new(|p| p.epolls[0].watches[0].fd = 15),
            ),
            (
                "watch twice",
                Box::new(|p| {
                    let w = p.epolls[0].watches[0];
                    p.epolls[0].watches.push(w)
                }),
            ),
            (
                "watch of a closed stdio fd",
                Box::new(|p| p.stdio[0] = StdioKind::Closed),
            ),
            (
                "epoll with a state",
                Box::new(|p| {
                    let f = p.files.iter_mut().find(|f| f.fd == 15).unwrap();
                    f.state = FileState::Signals(1)
                }),
            ),
        ];
        for (what, change) in cases {
            let (mut meta, data, zero) = sample(1, 1);
            change(&mut meta.process);
            let bytes = encode(&meta, &data, &zero);
            assert!(decode_all(&bytes[..]).is_err(), "{what}: accepted");
        }
        // And the sample itself (a file on stdout) is fine.
        let (mut meta, data, zero) = sample(1, 1);
        meta.process.stdio[1] = StdioKind::File;
        meta.process.files[0].fd = 1;
        let bytes = encode(&meta, &data, &zero);
        assert_eq!(decode_all(&bytes[..]).unwrap().meta, meta);
    }

    #[test]
    fn round_trip() {
        let (meta, data, zero) = sample(3, 7);
        let bytes = encode(&meta, &data, &zero);
        let d = decode_all(&bytes[..]).unwrap();
        assert_eq!(d.meta, meta);
        assert_eq!(d.data, data);
        assert_eq!(d.zero, zero);
        assert_eq!(d.stats.data_pages, 6);
        assert_eq!(d.stats.zero_pages, 6);
        assert_eq!(d.stats.bytes, bytes.len() as u64);
    }

    #[test]
    fn a_damaged_header_is_reported_as_such() {
        let (meta, data, zero) = sample(1, 0);
        let bytes = encode(&meta, &data, &zero);
        // A flipped bit in the kernel release ("6.18.44" -> "6.19.44"): the
        // header check catches it before any kernel comparison could.
        let at = bytes
            .windows(7)
            .position(|w| w == b"6.18.44")
            .expect("release in the header");
        // Also the version (not "version 253"), the flags, and a byte that
        // makes the string invalid UTF-8 (not "not UTF-8").
        for (i, flip) in [
            (at + 3, 0x01u8),
            (at + 1, 0x40),
            (18, 0x01),
            (8, 0xff),
            (10, 0x80),
            (at + 2, 0x80),
        ] {
            let mut bad = bytes.clone();
            bad[i] ^= flip;
            let e = decode_all(&bad[..]).unwrap_err();
            assert!(
                matches!(e, ImageError::HeaderChecksum { .. }),
                "flip at {i}: {e}"
            );
            assert!(e.to_string().contains("header is damaged"), "{e}");
        }
        // An image of the previous version is refused by version.
        let mut old = bytes.clone();
        old[8..10].copy_from_slice(&1u16.to_le_bytes());
        assert!(matches!(decode_all(&old[..]), Err(ImageError::Version(1))));
    }

    #[test]
    fn writer_refuses_misorder() {
        let (meta, _, _) = sample(1, 0);
        let mut w = ImageWriter::new(Vec::new(), &meta.header).unwrap();
        assert!(w.thread(&meta.threads[0]).is_err());
        w.process(&meta.process).unwrap();
        assert!(w.mapping(&meta.mappings[0]).is_err());
        w.thread(&meta.threads[0]).unwrap();
        w.mapping(&meta.mappings[0]).unwrap();
        w.data(0x10_1000, &[0; 4096]).unwrap();
        assert!(w.data(0x10_0000, &[0; 4096]).is_err(), "descending");
    }

    #[test]
    fn page_outside_mappings_is_refused() {
        let (meta, _, _) = sample(1, 0);
        // Bypass the writer's checks by writing a run into the vdso mapping.
        let bytes = encode(
            &meta,
            &[(0x7fff_0000_0000, vec![1; 4096])],
            &[(0x7fff_0000_1000, 1)],
        );
        let e = decode_all(&bytes[..]).unwrap_err();
        assert!(e.to_string().contains("Vdso"), "{e}");
        let bytes = encode(&meta, &[(0x20_0000, vec![1; 4096])], &[(0x20_1000, 1)]);
        assert!(decode_all(&bytes[..]).is_err());
    }

    #[test]
    fn overlapping_mappings_refused() {
        let (mut meta, data, zero) = sample(2, 0);
        meta.mappings[1].start = meta.mappings[0].start + PAGE;
        meta.mappings[1].end = meta.mappings[1].start + 4 * PAGE;
        let bytes = encode(&meta, &data[..1], &zero[..1]);
        let e = decode_all(&bytes[..]).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let (meta, data, zero) = sample(2, 3);
        let bytes = encode(&meta, &data, &zero);
        for cut in 0..bytes.len() {
            assert!(decode_all(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn corruption_never_panics_and_is_caught(
            nmaps in 1usize..4,
            seed in any::<u8>(),
            flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        ) {
            let (meta, data, zero) = sample(nmaps, seed);
            let mut bytes = encode(&meta, &data, &zero);
            for (pos, x) in flips {
                let p = pos % bytes.len();
                bytes[p] ^= x;
            }
            // Any flipped bit is caught: by a bound, a structural check, or
            // at the latest by the checksum.
            prop_assert!(decode_all(&bytes[..]).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_all(&bytes[..]);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode_all(&with_magic[..]);
        }

        #[test]
        fn truncation_is_an_error(nmaps in 1usize..4, seed in any::<u8>(), cut in any::<usize>()) {
            let (meta, data, zero) = sample(nmaps, seed);
            let bytes = encode(&meta, &data, &zero);
            let cut = cut % bytes.len();
            prop_assert!(decode_all(&bytes[..cut]).is_err());
        }
    }
}
