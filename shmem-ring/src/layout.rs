//! The versioned layout of a window: where the header, the endpoint directory,
//! the ring control blocks and the ring data areas live.
//!
//! Pure arithmetic over offsets, no memory access: the same numbers are
//! computed by whoever formats the window and by whoever attaches to it, and
//! the header's copy is only compared against them, never trusted.
//!
//! ```text
//! 0x0000  header, 256 B (all fields little-endian u64 words)
//!         +0x00 magic "MKSHRING"          written last when formatting
//!         +0x08 layout version (u32) | endpoints (u16) << 32
//!         +0x10 size of the layout in bytes
//!         +0x18 ring capacity in bytes (per direction)
//!         +0x20 directory offset  +0x28 control offset  +0x30 data offset
//!         +0x38 format id (changes on every format)
//! 0x0100  directory: one 64 B entry per endpoint id
//!         +0x00 generation << 8 | state (0 free, 1 attached, 2 detached)
//!         +0x08 heartbeat counter
//!         +0x10 id (written when formatting, checked on attach)
//! align 64: ring control blocks, 256 B per ring, ring index = from*(N-1) + to'
//!         +0x00 reserved, 0 (the write position in layout version 1)
//!         +0x08 producer claim (generation of the sending endpoint, 0 = none)
//!         +0x10 producer flags (bit 0: producer found the ring corrupt)
//!         +0x80 tail (read position, consumer's line)
//!         +0x88 consumer claim   +0x90 consumer flags
//!         +0xc0 doorbell word (consumer's second line: 1 = asleep, ring me)
//! align 4096: ring data areas, `capacity` bytes each, in ring index order;
//!         frames as described in `ring.rs`; the first word of each is zeroed
//!         when formatting (the "no frame yet" marker for position 0)
//! ```

use crate::Error;

/// First word of a formatted window: "MKSHRING" in little-endian bytes.
pub const MAGIC: u64 = u64::from_le_bytes(*b"MKSHRING");
/// Version of the layout described in this module; bumped on any change.
/// (3: the doorbell word; a consumer of version 2 would never announce its
/// sleep, and one of version 3 would wait for a ring a version 2 producer
/// never gives.)
pub const LAYOUT_VERSION: u32 = 3;
/// Most endpoints a window can hold (each pair costs two rings).
pub const MAX_ENDPOINTS: u16 = 64;
/// Smallest ring data area (one page).
pub const MIN_RING_CAPACITY: u64 = 4096;
/// Largest ring data area, so frame lengths fit in the 32-bit length field.
pub const MAX_RING_CAPACITY: u64 = 1 << 31;
/// Bytes of the length header in front of every frame.
pub const FRAME_HEADER: u64 = 8;

pub(crate) const HEADER_SIZE: u64 = 0x100;
pub(crate) const ENTRY_SIZE: u64 = 64;
pub(crate) const CONTROL_SIZE: u64 = 256;
const PAGE: u64 = 4096;

// Header words.
pub(crate) const H_MAGIC: u64 = 0x00;
pub(crate) const H_VERSION: u64 = 0x08;
pub(crate) const H_SIZE: u64 = 0x10;
pub(crate) const H_CAPACITY: u64 = 0x18;
pub(crate) const H_DIRECTORY: u64 = 0x20;
pub(crate) const H_CONTROL: u64 = 0x28;
pub(crate) const H_DATA: u64 = 0x30;
pub(crate) const H_FORMAT_ID: u64 = 0x38;

// Directory entry words.
pub(crate) const E_STATE: u64 = 0x00;
pub(crate) const E_HEARTBEAT: u64 = 0x08;
pub(crate) const E_ID: u64 = 0x10;

// Control block words (0x00 is reserved: the write position of version 1;
// readers now learn of frames from their headers).
pub(crate) const C_PRODUCER_CLAIM: u64 = 0x08;
pub(crate) const C_PRODUCER_FLAGS: u64 = 0x10;
pub(crate) const C_TAIL: u64 = 0x80;
pub(crate) const C_CONSUMER_CLAIM: u64 = 0x88;
pub(crate) const C_CONSUMER_FLAGS: u64 = 0x90;
/// The consumer's doorbell word, alone on its cache line: the producer reads
/// it after every publish, and it changes only when the consumer goes to
/// sleep or wakes, so that read stays a hit in the producer's cache while
/// the tail's line (written on every release) moves back and forth.
pub(crate) const C_BELL: u64 = 0xC0;

/// Flag bit: this side found the ring corrupt and stopped using it.
pub(crate) const FLAG_BROKEN: u64 = 1;

/// The offsets of every part of a window for a given endpoint count and ring
/// capacity. Both sides compute it; the header only has to agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    endpoints: u16,
    ring_capacity: u64,
    control: u64,
    data: u64,
    size: u64,
}

/// Offsets of one ring (one direction of a channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingOffsets {
    /// Start of the ring's 256-byte control block.
    pub control: u64,
    /// Start of the ring's data area.
    pub data: u64,
    /// Size of the data area.
    pub capacity: u64,
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? & !(a - 1))
}

impl Layout {
    /// The layout for `endpoints` endpoints with `ring_capacity` bytes per ring
    /// direction (a power of two in `MIN_RING_CAPACITY..=MAX_RING_CAPACITY`).
    pub fn with_capacity(endpoints: u16, ring_capacity: u64) -> Result<Layout, Error> {
        if !(2..=MAX_ENDPOINTS).contains(&endpoints) {
            return Err(Error::InvalidLayout {
                what: "endpoints",
                value: u64::from(endpoints),
                why: "must be between 2 and 64",
            });
        }
        if !ring_capacity.is_power_of_two()
            || !(MIN_RING_CAPACITY..=MAX_RING_CAPACITY).contains(&ring_capacity)
        {
            return Err(Error::InvalidLayout {
                what: "ring capacity",
                value: ring_capacity,
                why: "must be a power of two between 4 KiB and 2 GiB",
            });
        }
        let too_big = Error::InvalidLayout {
            what: "ring capacity",
            value: ring_capacity,
            why: "the layout would not fit in 64 bits",
        };
        let rings = Self::ring_count(endpoints);
        let control = align_up(HEADER_SIZE + ENTRY_SIZE * u64::from(endpoints), 64)
            .expect("small constants cannot overflow");
        let data = align_up(control + CONTROL_SIZE * rings, PAGE)
            .expect("at most 64*63 rings of 256 B cannot overflow");
        let size = rings
            .checked_mul(ring_capacity)
            .and_then(|d| d.checked_add(data))
            .ok_or(too_big)?;
        Ok(Layout {
            endpoints,
            ring_capacity,
            control,
            data,
            size,
        })
    }

    /// The layout with the largest ring capacity (a power of two) that fits in
    /// `size` bytes for `endpoints` endpoints.
    pub fn for_size(size: u64, endpoints: u16) -> Result<Layout, Error> {
        let smallest = Self::with_capacity(endpoints, MIN_RING_CAPACITY)?;
        if smallest.size > size {
            return Err(Error::TooSmall {
                size,
                needed: smallest.size,
            });
        }
        let per_ring = (size - smallest.data) / Self::ring_count(endpoints);
        // per_ring >= MIN_RING_CAPACITY > 0, so the logarithm exists.
        let capacity = (1u64 << per_ring.ilog2()).min(MAX_RING_CAPACITY);
        Self::with_capacity(endpoints, capacity)
    }

    fn ring_count(endpoints: u16) -> u64 {
        let n = u64::from(endpoints);
        n * (n - 1)
    }

    /// Number of endpoint ids (`0..endpoints`).
    pub fn endpoints(&self) -> u16 {
        self.endpoints
    }

    /// Bytes of each ring's data area.
    pub fn ring_capacity(&self) -> u64 {
        self.ring_capacity
    }

    /// Largest message a ring accepts: the capacity less one frame header.
    pub fn max_message(&self) -> usize {
        // capacity <= 2^31, so this fits any usize of 32 bits or more.
        usize::try_from(self.ring_capacity - FRAME_HEADER).unwrap_or(usize::MAX)
    }

    /// Bytes the layout occupies from the window's start.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Offset of the endpoint directory.
    pub fn directory_offset(&self) -> u64 {
        HEADER_SIZE
    }

    /// Offset of the first ring control block.
    pub fn control_offset(&self) -> u64 {
        self.control
    }

    /// Offset of the first ring data area (page aligned).
    pub fn data_offset(&self) -> u64 {
        self.data
    }

    /// Offset of endpoint `id`'s directory entry.
    pub fn entry_offset(&self, id: u16) -> Option<u64> {
        (id < self.endpoints).then(|| HEADER_SIZE + ENTRY_SIZE * u64::from(id))
    }

    /// Offsets of the ring carrying messages from `from` to `to`.
    pub fn ring(&self, from: u16, to: u16) -> Option<RingOffsets> {
        if from >= self.endpoints || to >= self.endpoints || from == to {
            return None;
        }
        let to_index = if to < from { to } else { to - 1 };
        let index = u64::from(from) * u64::from(self.endpoints - 1) + u64::from(to_index);
        Some(RingOffsets {
            control: self.control + CONTROL_SIZE * index,
            data: self.data + self.ring_capacity * index,
            capacity: self.ring_capacity,
        })
    }

    /// Range of bytes holding both rings of the channel between `a` and `b`
    /// (control blocks and data areas), for tools that inspect a channel.
    pub fn channel_ranges(&self, a: u16, b: u16) -> Option<[(u64, u64); 4]> {
        let ab = self.ring(a, b)?;
        let ba = self.ring(b, a)?;
        Some([
            (ab.control, CONTROL_SIZE),
            (ab.data, ab.capacity),
            (ba.control, CONTROL_SIZE),
            (ba.data, ba.capacity),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_do_not_overlap_and_fit() {
        let l = Layout::with_capacity(5, 8192).unwrap();
        let mut spans = vec![(0, HEADER_SIZE), (HEADER_SIZE, ENTRY_SIZE * 5)];
        for a in 0..5 {
            for b in 0..5 {
                if let Some(r) = l.ring(a, b) {
                    spans.push((r.control, CONTROL_SIZE));
                    spans.push((r.data, r.capacity));
                    assert_eq!(r.data % 4096, 0);
                }
            }
        }
        assert_eq!(spans.len(), 2 + 2 * 20);
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:x?} overlap");
        }
        let last = spans.last().unwrap();
        assert_eq!(last.0 + last.1, l.size());
    }

    #[test]
    fn for_size_picks_the_largest_power_of_two() {
        let l = Layout::for_size(1 << 20, 2).unwrap();
        // 2 rings; 1 MiB less a page of header leaves room for 2 x 256 KiB.
        assert_eq!(l.ring_capacity(), 256 << 10);
        assert!(l.size() <= 1 << 20);
        assert!(Layout::with_capacity(2, 512 << 10).unwrap().size() > 1 << 20);
        assert!(matches!(
            Layout::for_size(4096, 2),
            Err(Error::TooSmall { size: 4096, .. })
        ));
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(Layout::with_capacity(1, 4096).is_err());
        assert!(Layout::with_capacity(65, 4096).is_err());
        assert!(Layout::with_capacity(2, 6000).is_err());
        assert!(Layout::with_capacity(2, 2048).is_err());
        assert!(Layout::with_capacity(2, 1 << 32).is_err());
        assert!(Layout::with_capacity(64, 1 << 31).is_ok());
    }
}
