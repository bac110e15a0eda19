//! The crate's one error enum, and the corruption causes that break a channel.
//!
//! Messages name the offending values in hex and do not repeat their source;
//! print the chain with `source()` to get the whole story.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong with a window, an endpoint or a channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call on the window's file failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done ("open", "map", "resize", ...).
        op: &'static str,
        /// The window's file.
        path: PathBuf,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
    /// Layout parameters out of range.
    #[error("invalid layout: {what} = 0x{value:x} {why}")]
    InvalidLayout {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        why: &'static str,
    },
    /// The window (file or mapping) is smaller than the layout needs.
    #[error("window of 0x{size:x} bytes is too small: the layout needs 0x{needed:x}")]
    TooSmall {
        /// Bytes available.
        size: u64,
        /// Bytes needed.
        needed: u64,
    },
    /// The mapping's address is not 8-byte aligned (a device file mapped at an
    /// odd offset).
    #[error("window mapping at address 0x{addr:x} is not 8-byte aligned; map at an offset that is a multiple of 8")]
    Misaligned {
        /// The mapping's address.
        addr: usize,
    },
    /// The first word is not the magic: not a window, or not formatted yet.
    #[error("window magic is 0x{found:016x}, expected 0x{expected:016x} (\"MKSHRING\"): not an mkctl window, or not formatted yet")]
    BadMagic {
        /// What the window holds.
        found: u64,
        /// [`crate::MAGIC`].
        expected: u64,
    },
    /// The window was formatted by a build with another layout version.
    #[error(
        "window layout version {found} is not supported; this build reads version {supported}"
    )]
    BadVersion {
        /// Version found in the header.
        found: u32,
        /// [`crate::LAYOUT_VERSION`].
        supported: u32,
    },
    /// A header field holds a value no layout can have.
    #[error("window header field {field} is 0x{found:x}, which {rule}")]
    BadHeader {
        /// Which field.
        field: &'static str,
        /// Its value in the window.
        found: u64,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A header field disagrees with the layout recomputed from the endpoint
    /// count and the ring capacity.
    #[error("window header field {field} is 0x{found:x}, expected 0x{expected:x} for this endpoint count and ring capacity")]
    HeaderMismatch {
        /// Which field.
        field: &'static str,
        /// Its value in the window.
        found: u64,
        /// The value the layout requires.
        expected: u64,
    },
    /// The header describes more bytes than are mapped.
    #[error(
        "window header says the layout takes 0x{header:x} bytes but only 0x{mapped:x} are mapped"
    )]
    SizeMismatch {
        /// Size in the header.
        header: u64,
        /// Bytes mapped.
        mapped: u64,
    },
    /// An endpoint id outside the window's directory.
    #[error("endpoint {id} does not exist: the window has endpoints 0..{endpoints}")]
    NoSuchEndpoint {
        /// The id asked for.
        id: u16,
        /// Number of endpoints in the window.
        endpoints: u16,
    },
    /// A directory entry's id field does not match its position.
    #[error("directory entry {id} is corrupt: its id field reads 0x{found:x}")]
    BadDirectory {
        /// The entry's position.
        id: u16,
        /// The id field's value.
        found: u64,
    },
    /// An endpoint asked for a channel to itself.
    #[error("endpoint {id} cannot open a channel to itself")]
    SelfChannel {
        /// The endpoint.
        id: u16,
    },
    /// The sender or receiver of a ring is already held by this incarnation.
    #[error("the {role} of ring {from}->{to} is already held by this endpoint")]
    AlreadyClaimed {
        /// "sender" or "receiver".
        role: &'static str,
        /// Producing endpoint.
        from: u16,
        /// Consuming endpoint.
        to: u16,
    },
    /// The endpoint id was attached again (by this or another process) since
    /// this handle attached; the newer incarnation owns it now.
    #[error(
        "endpoint {id} was attached again (generation {current}; this handle is generation {ours})"
    )]
    Superseded {
        /// The endpoint.
        id: u16,
        /// This handle's generation.
        ours: u64,
        /// The window's current generation.
        current: u64,
    },
    /// A channel reset was refused because the peer still looks alive.
    #[error(
        "peer {peer} is {state:?}; only the channel of a dead, gone or absent peer can be reset"
    )]
    PeerAlive {
        /// The peer endpoint.
        peer: u16,
        /// Its state as observed.
        state: crate::PeerState,
    },
    /// A message longer than the ring can ever hold; it is refused whole.
    #[error("message of 0x{len:x} bytes exceeds the ring's limit of 0x{max:x} bytes")]
    TooLarge {
        /// Length of the message.
        len: usize,
        /// [`crate::Layout::max_message`].
        max: usize,
    },
    /// No room in the ring right now (try again later).
    #[error("ring {from}->{to} is full")]
    Full {
        /// Producing endpoint.
        from: u16,
        /// Consuming endpoint.
        to: u16,
    },
    /// No message in the ring right now (try again later).
    #[error("ring {from}->{to} is empty")]
    Empty {
        /// Producing endpoint.
        from: u16,
        /// Consuming endpoint.
        to: u16,
    },
    /// A blocking call waited its whole timeout; the peer is alive or silent.
    #[error("timed out after {:.3} s on ring {from}->{to}", .waited.as_secs_f64())]
    Timeout {
        /// Producing endpoint.
        from: u16,
        /// Consuming endpoint.
        to: u16,
        /// How long the call waited.
        waited: Duration,
    },
    /// The peer's heartbeat has not moved for longer than the dead threshold.
    #[error("peer {peer} is dead: no heartbeat for {:.1} s", .quiet.as_secs_f64())]
    PeerDead {
        /// The peer endpoint.
        peer: u16,
        /// How long its heartbeat has been still.
        quiet: Duration,
    },
    /// The peer detached from the window.
    #[error("peer {peer} has detached")]
    PeerGone {
        /// The peer endpoint.
        peer: u16,
    },
    /// The channel found corrupt data and stopped; this sticks.
    #[error("ring {from}->{to} is broken")]
    Broken {
        /// Producing endpoint.
        from: u16,
        /// Consuming endpoint.
        to: u16,
        /// What was found.
        #[source]
        cause: Corruption,
    },
    /// A raw access outside the window (tools and tests only).
    #[error("range 0x{offset:x}+0x{len:x} is outside the 0x{size:x}-byte window")]
    OutOfBounds {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// The window's size.
        size: u64,
    },
}

impl Error {
    /// True for errors that say "not now" rather than "never": a full or empty
    /// ring, or a timeout. Everything else will not go away by retrying.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Full { .. } | Error::Empty { .. } | Error::Timeout { .. }
        )
    }
}

/// What was found wrong in a ring. Positions are the ever-increasing byte
/// positions of the index protocol; offsets in the data area are
/// `position mod capacity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// The read position read from the window is not 8-aligned or not within
    /// `lowest..=highest` (it may not move back, nor past what was published).
    #[error("read position 0x{tail:x} is outside 0x{lowest:x}..=0x{highest:x} or not 8-aligned")]
    TailOutOfRange {
        /// The value read.
        tail: u64,
        /// Smallest acceptable value.
        lowest: u64,
        /// Largest acceptable value.
        highest: u64,
    },
    /// A frame header whose kind or check field is wrong (garbage, or a stale
    /// frame from an earlier lap).
    #[error("frame header 0x{word:016x} at position 0x{pos:x} has a bad kind or check")]
    FrameHeader {
        /// Position of the header.
        pos: u64,
        /// The header word.
        word: u64,
    },
    /// A frame that would run past the end of the data area.
    #[error("frame length 0x{len:x} at offset 0x{offset:x} exceeds ring capacity 0x{capacity:x}")]
    FrameLength {
        /// Payload length in the header.
        len: u32,
        /// Offset of the header in the data area.
        offset: u64,
        /// Size of the data area.
        capacity: u64,
    },
    /// A padding record that does not cover exactly the rest of the data area.
    #[error("padding at position 0x{pos:x} covers 0x{len:x} bytes, expected 0x{expected:x}")]
    Padding {
        /// Position of the padding header.
        pos: u64,
        /// Bytes it claims to cover after its header.
        len: u32,
        /// Bytes left before the end of the data area after its header.
        expected: u64,
    },
    /// The other side flagged the ring as corrupt.
    #[error("the other side marked the ring as corrupt")]
    PeerFlagged,
}
