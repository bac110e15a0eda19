//! The unsafe core: owns the mapped pointer and nothing else may touch it.
//!
//! Everything above this module works with byte offsets into the window and
//! calls the bounds-checked operations here:
//!
//! - [`Region::word`]: a `&AtomicU64` at an 8-aligned offset inside the window,
//! - [`Region::write_bytes`] / [`Region::read_bytes`] / [`Region::zero`]: copies,
//! - [`RingArea`]: one ring's control words and data area, checked once when it
//!   is built, so the hot path needs only a mask or one comparison per access.
//!
//! # The safety argument
//!
//! The window is *foreign memory*: another process or another kernel may write
//! any byte of it at any time, and it lives as long as the `memmap2::MmapRaw`
//! owned by [`Region`]. Hence:
//!
//! 1. Every access is bounds-checked against the mapping's length before a
//!    pointer is formed, so nothing outside the window is ever read or written.
//! 2. Words that steer control flow (indices, frame headers, directory entries)
//!    are read through `AtomicU64` exactly once into a local, then validated by
//!    the caller. `AtomicU64` has interior mutability, so a `&AtomicU64` to a word
//!    that others modify concurrently is allowed, and every bit pattern is a
//!    valid `u64`. The mapping's base is page aligned (checked: 8-aligned) and
//!    offsets are checked to be multiples of 8, so the atomics are aligned.
//! 3. Payload bytes are copied with `ptr::copy` (memmove: memcpy speed, no
//!    assumption that source and destination are disjoint), with a vector loop
//!    for large disjoint copies on x86_64 (`vector_copy`), or exposed as `[u8]`
//!    slices, only over ranges that the ring protocol (Acquire/Release on the
//!    positions, `ring.rs`) assigns to the caller's role at that moment; a
//!    well-behaved peer does not touch them concurrently. A hostile peer can
//!    still change those bytes under us; as every bit pattern is a valid `u8`
//!    and no index is ever taken from payload bytes inside this crate, the worst
//!    outcome is wrong payload bytes, which the protocol above must check anyway.
//!    Volatile copies were not used because they cannot be vectorised and would
//!    cost the 4 KiB throughput target; nothing relies on a payload byte being
//!    read exactly once.
//! 4. Within this process, a range is handed out as `&mut [u8]` only through a
//!    [`Lease`] borrowed mutably, and `ring.rs` creates a lease only for the
//!    free space of a ring whose single [`crate::Sender`] it belongs to (or the
//!    filled space for the single [`crate::Receiver`]); those two ranges are
//!    disjoint by the index protocol that the loom model checks.
//! 5. The futex calls ([`Region::futex_wait`], [`Region::futex_wake`]) pass
//!    the kernel the address of a checked, aligned word inside the mapping
//!    and nothing else; the kernel reads it (atomically, for the wait) and
//!    writes nothing. A word that a peer changes at any time is exactly what
//!    a futex is for.

use std::ptr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// A mapped window: the only owner of the raw pointer.
#[derive(Debug)]
pub(crate) struct Region {
    map: memmap2::MmapRaw,
}

impl Region {
    /// Wraps a mapping. Fails with the mapping's address when it is not 8-byte
    /// aligned (possible only for a mapping at an odd offset of a device file).
    pub(crate) fn new(map: memmap2::MmapRaw) -> Result<Region, usize> {
        let addr = map.as_ptr() as usize;
        if addr % 8 != 0 {
            return Err(addr);
        }
        Ok(Region { map })
    }

    /// Length of the mapping in bytes.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    fn in_bounds(&self, off: usize, len: usize) -> bool {
        off.checked_add(len)
            .is_some_and(|end| end <= self.map.len())
    }

    /// The 64-bit word at `off`, if `off` is 8-aligned and the word lies inside
    /// the window.
    pub(crate) fn word(&self, off: usize) -> Option<&AtomicU64> {
        if off % 8 != 0 || !self.in_bounds(off, 8) {
            return None;
        }
        // SAFETY: `off + 8 <= len` (checked above), so the 8 bytes lie inside the
        // mapping, which stays mapped while `self` (and so the returned borrow)
        // lives. The base is 8-aligned (checked in `new`) and `off % 8 == 0`, so
        // the pointer is aligned for `AtomicU64`. Concurrent writers elsewhere
        // are allowed by `AtomicU64`'s interior mutability; any bits are a valid
        // `u64` (safety argument, points 1 and 2).
        Some(unsafe { &*self.map.as_mut_ptr().add(off).cast::<AtomicU64>() })
    }

    /// Copies `src` into the window at `off`; `None` (nothing written) if the
    /// range is not inside the window.
    pub(crate) fn write_bytes(&self, off: usize, src: &[u8]) -> Option<()> {
        if !self.in_bounds(off, src.len()) {
            return None;
        }
        // SAFETY: the destination range [off, off + src.len()) is inside the
        // mapping (checked above); `ptr::copy` allows overlap should `src` itself
        // point into the window; u8 has no alignment or validity requirement.
        unsafe { ptr::copy(src.as_ptr(), self.map.as_mut_ptr().add(off), src.len()) };
        Some(())
    }

    /// Copies window bytes at `off` into `dst`; `None` (nothing read) if the
    /// range is not inside the window.
    pub(crate) fn read_bytes(&self, off: usize, dst: &mut [u8]) -> Option<()> {
        if !self.in_bounds(off, dst.len()) {
            return None;
        }
        // SAFETY: the source range is inside the mapping (checked above); `dst`
        // is a unique borrow of `dst.len()` bytes; `ptr::copy` allows overlap;
        // any byte value is a valid u8 (safety argument, point 3).
        unsafe { ptr::copy(self.map.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) };
        Some(())
    }

    /// The address of the 32-bit futex word of the 64-bit word at `off`: its
    /// low half (the doorbell's values fit in it), if the word is inside the
    /// window.
    fn futex_word(&self, off: usize) -> Option<*const u32> {
        let word = self.word(off)?;
        let low_half = if cfg!(target_endian = "little") { 0 } else { 4 };
        // `wrapping_byte_add` keeps this a pointer computation; the word is
        // 8 bytes inside the mapping (checked by `word`), so `+ 4` is too.
        Some(
            std::ptr::from_ref(word)
                .cast::<u32>()
                .wrapping_byte_add(low_half),
        )
    }

    /// `FUTEX_WAIT` (shared: other processes map the same file) on the low
    /// half of the word at `off`: sleeps while it holds `expected`, until a
    /// `FUTEX_WAKE` on the same word, `timeout`, or a signal. A value that
    /// differs already, a timeout and a signal are all `Ok`: the caller looks
    /// again either way. Fails with `EFAULT` on mappings the kernel cannot
    /// key a shared futex on (a PCI BAR, `/dev/mem`), `ENOSYS` without
    /// futexes, `EINVAL` for a word outside the window.
    pub(crate) fn futex_wait(
        &self,
        off: usize,
        expected: u32,
        timeout: std::time::Duration,
    ) -> std::io::Result<()> {
        let addr = self
            .futex_word(off)
            .ok_or(std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
        };
        // SAFETY: `addr` is a 4-aligned u32 inside the mapping (`futex_word`:
        // an 8-aligned word checked to lie inside it), which stays mapped
        // while `self` lives; FUTEX_WAIT only reads it. `ts` is a valid
        // timespec on this stack frame for the duration of the call; the
        // last two arguments are unused by FUTEX_WAIT.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex,
                addr,
                libc::FUTEX_WAIT,
                expected,
                std::ptr::from_ref(&ts),
                std::ptr::null::<u32>(),
                0u32,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ETIMEDOUT | libc::EINTR) => Ok(()),
            _ => Err(e),
        }
    }

    /// `FUTEX_WAKE` of every waiter on the low half of the word at `off`.
    pub(crate) fn futex_wake(&self, off: usize) -> std::io::Result<()> {
        let addr = self
            .futex_word(off)
            .ok_or(std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: as in `futex_wait`: a checked, aligned word inside the
        // mapping; FUTEX_WAKE reads no memory (it only keys on the address)
        // and ignores the last three arguments.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex,
                addr,
                libc::FUTEX_WAKE,
                i32::MAX,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<u32>(),
                0u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets `len` bytes at `off` to zero; `None` if the range is not inside the
    /// window.
    pub(crate) fn zero(&self, off: usize, len: usize) -> Option<()> {
        if !self.in_bounds(off, len) {
            return None;
        }
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { ptr::write_bytes(self.map.as_mut_ptr().add(off), 0, len) };
        Some(())
    }
}

/// Where one ring lives in the window, as byte offsets (see `layout.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingPlace {
    /// The consumer-owned word holding the read position.
    pub(crate) tail: usize,
    /// The consumer's doorbell word (`ring.rs`, "The doorbell").
    pub(crate) bell: usize,
    /// Start of the data area.
    pub(crate) data: usize,
    /// Size of the data area: a power of two, multiple of 8.
    pub(crate) capacity: usize,
}

/// One ring's control words and data area, bounds-checked once.
#[derive(Debug)]
pub(crate) struct RingArea {
    region: Arc<Region>,
    place: RingPlace,
    /// Start of the data area inside `region`'s mapping, computed once so the
    /// hot path does not chase `region` for it.
    data: *mut u8,
    /// The read position word inside `region`'s mapping, likewise.
    tail: *const AtomicU64,
    /// The doorbell word, likewise (the producer loads it on every publish).
    bell: *const AtomicU64,
}

// SAFETY: `data`, `tail` and `bell` point into the mapping owned by `region`, which
// `RingArea` keeps alive; `Region` (a `memmap2::MmapRaw`) is `Send + Sync`, and the
// pointer is only used for the same bounds-checked accesses as `region`'s own
// (module doc). Sending or sharing a `RingArea` shares nothing `Region` does
// not already share.
unsafe impl Send for RingArea {}
// SAFETY: as for `Send`: `&RingArea` gives only the accesses `&Region` gives.
unsafe impl Sync for RingArea {}

/// A checked byte range inside a ring's data area, handed to one role (module
/// doc, point 4). Not `Clone`: one lease gives at most one `&mut [u8]` at a time.
#[derive(Debug)]
pub(crate) struct Lease {
    off: usize,
    len: usize,
}

impl RingArea {
    /// Checks that the control word and the whole data area lie inside the
    /// window and are 8-aligned, and that the capacity is a power of two.
    pub(crate) fn new(region: Arc<Region>, place: RingPlace) -> Option<RingArea> {
        let ok = place.capacity.is_power_of_two()
            && place.capacity >= 8
            && place.data % 8 == 0
            && region.in_bounds(place.data, place.capacity)
            && region.word(place.tail).is_some()
            && region.word(place.bell).is_some();
        if !ok {
            return None;
        }
        // SAFETY: `data + capacity <= len`, `tail + 8 <= len` and
        // `bell + 8 <= len` (checked above), so the pointers are inside the
        // mapping, which `region` keeps alive.
        let (data, tail, bell) = unsafe {
            let base = region.map.as_mut_ptr();
            (
                base.add(place.data),
                base.add(place.tail).cast::<AtomicU64>(),
                base.add(place.bell).cast::<AtomicU64>(),
            )
        };
        Some(RingArea {
            region,
            place,
            data,
            tail,
            bell,
        })
    }

    /// Size of the data area in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.place.capacity
    }

    /// The window this ring lives in.
    pub(crate) fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// The read position word.
    #[inline(always)]
    pub(crate) fn tail(&self) -> &AtomicU64 {
        // SAFETY: `place.tail` was checked by `new` to be an aligned word inside
        // the mapping, which lives as long as `self.region`; see `Region::word`
        // for why a shared `&AtomicU64` is fine.
        unsafe { &*self.tail }
    }

    /// The doorbell word.
    #[inline(always)]
    pub(crate) fn bell(&self) -> &AtomicU64 {
        // SAFETY: as for `tail`: `place.bell` was checked by `new` to be an
        // aligned word inside the mapping, which `self.region` keeps alive.
        unsafe { &*self.bell }
    }

    /// The data-area word containing byte `pos mod capacity`, rounded down to 8.
    #[inline(always)]
    pub(crate) fn data_word(&self, pos: u64) -> &AtomicU64 {
        // Truncating `pos` is intended: only its low bits select the offset.
        #[allow(clippy::cast_possible_truncation)]
        let off = (pos as usize) & (self.place.capacity - 1) & !7;
        // SAFETY: `off < capacity` (mask with a power of two) and `off % 8 == 0`,
        // so with `capacity % 8 == 0` the word lies inside the data area, which
        // `new` checked is inside the mapping with an 8-aligned start.
        unsafe { &*self.data.add(off).cast::<AtomicU64>() }
    }

    /// Asks the CPU to fetch the cache line holding byte `pos mod capacity`
    /// of the data area (a hint; nothing is read).
    #[inline(always)]
    pub(crate) fn prefetch(&self, pos: u64) {
        // Truncating `pos` is intended: only its low bits select the offset.
        #[allow(clippy::cast_possible_truncation)]
        let off = (pos as usize) & (self.place.capacity - 1);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `off < capacity`, so the address is inside the data area
        // (checked by `new`); a prefetch never faults and is not a memory
        // access in the language's sense, so it cannot race with anything.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(self.data.add(off).cast::<i8>());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = off;
    }

    /// A lease on `len` bytes at data-area offset `off`, if they fit inside the
    /// data area without wrapping.
    pub(crate) fn lease(&self, off: usize, len: usize) -> Option<Lease> {
        let end = off.checked_add(len)?;
        (end <= self.place.capacity).then_some(Lease { off, len })
    }

    /// Checks (again) that a lease is inside this ring's data area: a lease of
    /// another ring with a larger capacity must not reach outside the window.
    fn lease_ptr(&self, lease: &Lease) -> Option<*mut u8> {
        if lease.off.checked_add(lease.len)? > self.place.capacity {
            return None;
        }
        // SAFETY: `off + len <= capacity`, inside the data area (checked by
        // `new`), so the pointer stays within the mapping.
        Some(unsafe { self.data.add(lease.off) })
    }

    /// The leased bytes, read-only (a receiver's view of a frame).
    pub(crate) fn bytes<'a>(&'a self, lease: &'a Lease) -> &'a [u8] {
        match self.lease_ptr(lease) {
            // SAFETY: the range is inside the mapping (lease_ptr) and lives as
            // long as `self`; `ring.rs` leases to the consumer only published
            // frames, which the producer does not write until the consumer moves
            // its read position past them (module doc, points 3 and 4).
            Some(p) => unsafe { std::slice::from_raw_parts(p, lease.len) },
            None => &[],
        }
    }

    /// The leased bytes, writable (a sender's slot). The `&mut Lease` makes the
    /// slice unique for its lifetime.
    pub(crate) fn bytes_mut<'a>(&'a self, lease: &'a mut Lease) -> &'a mut [u8] {
        match self.lease_ptr(lease) {
            // SAFETY: the range is inside the mapping (lease_ptr) and lives as
            // long as `self`; `ring.rs` leases to the producer only free space,
            // which the consumer does not read until it is published, and the
            // unique borrow of the lease prevents a second slice over it
            // (module doc, points 3 and 4).
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p, lease.len) },
            None => &mut [],
        }
    }

    /// Copies `src` to data-area offset `off`; false (nothing written) if it
    /// would not fit before the end of the data area. The copy is [`copy`]'s
    /// (inline for small payloads).
    #[inline(always)]
    pub(crate) fn copy_in(&self, off: usize, src: &[u8]) -> bool {
        let len = src.len();
        if self.lease(off, len).is_none() {
            return false;
        }
        // SAFETY: `off + len <= capacity`: inside the data area, which `new`
        // checked is inside the mapping.
        let dst = unsafe { self.data.add(off) };
        // SAFETY: the destination range is inside the mapping (above) and
        // `src` is a live slice of `len` bytes; `copy` allows the two to
        // overlap (should `src` point into the window).
        unsafe { copy(dst, src.as_ptr(), len) };
        true
    }

    /// Appends `len` bytes from data-area offset `off` to `dst`; false (nothing
    /// appended) if they would not fit before the end of the data area.
    #[inline(always)]
    pub(crate) fn append_to(&self, off: usize, len: usize, dst: &mut Vec<u8>) -> bool {
        if self.lease(off, len).is_none() {
            return false;
        }
        dst.reserve(len);
        let start = dst.len();
        // SAFETY: the source range is inside the data area (checked above),
        // thus inside the mapping; `reserve` made room for `len` bytes after
        // `start` in `dst`, whose unique borrow the window cannot alias; any
        // byte is a valid u8 (safety argument, point 3). After the copy the
        // first `start + len` bytes are initialised, so `set_len` is sound.
        unsafe {
            copy(dst.as_mut_ptr().add(start), self.data.add(off), len);
            dst.set_len(start + len);
        }
        true
    }
}

/// Copies `len` bytes from `src` to `dst` as `ptr::copy` (memmove) does: the
/// ranges may overlap. Up to 64 bytes are copied inline ([`small_copy`]);
/// large disjoint copies on x86_64 go through [`vector_copy`]; the rest
/// through `ptr::copy`.
///
/// # Safety
///
/// `src..src + len` must be readable and `dst..dst + len` writable.
#[inline]
unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) {
    if len <= SMALL_MAX {
        // SAFETY: forwarded from the caller.
        unsafe { small_copy(dst, src, len) };
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { large_copy(dst, src, len) };
    }
}

/// [`copy`] for more than [`SMALL_MAX`] bytes, out of line so the small
/// case stays short.
///
/// # Safety
///
/// As for [`copy`].
#[inline(never)]
unsafe fn large_copy(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if len >= VECTOR_MIN {
        let (d, s) = (dst as usize, src as usize);
        // Only in the band where `rep movsb` is slow: the destination a few
        // bytes past the source modulo 4 KiB (see `vector_copy`).
        let slow_band = d.wrapping_sub(s) % 4096 < 64;
        if slow_band && (d + len <= s || s + len <= d) {
            // SAFETY: forwarded from the caller; the ranges do not overlap
            // (checked just now).
            unsafe { vector_copy(dst, src, len) };
            return;
        }
    }
    // SAFETY: forwarded from the caller; `ptr::copy` allows overlap.
    unsafe { ptr::copy(src, dst, len) };
}

/// The largest copy [`small_copy`] does.
const SMALL_MAX: usize = 64;

/// Copies up to [`SMALL_MAX`] bytes inline, without a call into libc: a
/// message of a few dozen bytes costs less to copy than the call and
/// dispatch of `memmove` (measured with `examples/hotpath.rs`). Every load
/// is done before the first store, so overlapping ranges copy as memmove
/// does; the loads and stores are unaligned and may overlap each other.
///
/// # Safety
///
/// `len <= SMALL_MAX`, `src..src + len` readable, `dst..dst + len` writable.
#[inline]
unsafe fn small_copy(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: each access below covers `[i, i + w)` with `0 <= i` and
    // `i + w <= len`, so it stays inside both ranges the caller guarantees;
    // unaligned reads and writes of plain integers have no alignment
    // requirement and any bits are valid.
    unsafe {
        if len > 32 {
            let r = |i: usize| ptr::read_unaligned(src.add(i).cast::<u128>());
            let w = |i: usize, v: u128| ptr::write_unaligned(dst.add(i).cast::<u128>(), v);
            let (a, b, c, d) = (r(0), r(16), r(len - 32), r(len - 16));
            w(0, a);
            w(16, b);
            w(len - 32, c);
            w(len - 16, d);
        } else if len >= 16 {
            both_ends::<u128>(dst, src, len);
        } else if len >= 8 {
            both_ends::<u64>(dst, src, len);
        } else if len >= 4 {
            both_ends::<u32>(dst, src, len);
        } else if len > 0 {
            let (a, m, d) = (*src, *src.add(len / 2), *src.add(len - 1));
            *dst = a;
            *dst.add(len / 2) = m;
            *dst.add(len - 1) = d;
        }
    }
}

/// Copies the first and the last `size_of::<T>()` bytes, both loaded before
/// either is stored: all of them when `len` is at most twice that size.
///
/// # Safety
///
/// `size_of::<T>() <= len`, `src..src + len` readable, `dst..dst + len`
/// writable.
#[inline(always)]
unsafe fn both_ends<T: Copy>(dst: *mut u8, src: *const u8, len: usize) {
    let w = std::mem::size_of::<T>();
    // SAFETY: both accesses cover `[0, w)` and `[len - w, len)`, inside the
    // ranges the caller guarantees (`w <= len`); unaligned plain integers.
    unsafe {
        let (a, d) = (
            ptr::read_unaligned(src.cast::<T>()),
            ptr::read_unaligned(src.add(len - w).cast::<T>()),
        );
        ptr::write_unaligned(dst.cast::<T>(), a);
        ptr::write_unaligned(dst.add(len - w).cast::<T>(), d);
    }
}

/// Payloads at least this long are copied in and out of the ring with a
/// plain vector loop (`vector_copy`) instead of memcpy.
#[cfg(target_arch = "x86_64")]
const VECTOR_MIN: usize = 2048;

/// Copies `len` bytes from `src` to `dst` with 16-byte unaligned loads and
/// stores. glibc's memcpy uses `rep movsb` for page-sized copies, which on
/// this machine's AMD cores drops from ~50 to ~2 GB/s when the destination is
/// 8-24 bytes past the source modulo 4 KiB; frames of 4 KiB + 8 step through
/// every such distance, so one frame in ~170 would hit it. The loop has no
/// such case (worst ~29 GB/s in cache over all 512 distances), but is slower
/// than memcpy elsewhere, so `large_copy` uses it only in that band. The stores
/// are ordinary cached ones: streaming stores, tried before, send the bytes
/// to DRAM, and the receiving core then reads them at DRAM speed instead of
/// from this core's cache.
///
/// # Safety
///
/// `src..src + len` must be readable, `dst..dst + len` writable, and the two
/// ranges must not overlap.
#[cfg(target_arch = "x86_64")]
unsafe fn vector_copy(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
    let mut i = 0;
    // SAFETY: the caller guarantees both ranges for `0..len`; every access
    // stays inside: the loop stops 16 bytes before `len`, the rest copies
    // `len - i` bytes. The loads and stores are the unaligned kinds; SSE2 is
    // part of the x86_64 baseline.
    unsafe {
        while i + 16 <= len {
            let v = _mm_loadu_si128(src.add(i).cast::<__m128i>());
            _mm_storeu_si128(dst.add(i).cast::<__m128i>(), v);
            i += 16;
        }
        ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
    }
}

/// Heap bytes for the loom model of the index protocol (`loom_model.rs`):
/// loom checks every access against the happens-before order its atomics
/// build and fails the model on any pair of accesses that is not ordered.
#[cfg(all(test, loom))]
#[derive(Debug)]
pub(crate) struct LoomCells(Vec<loom::cell::UnsafeCell<u8>>);

#[cfg(all(test, loom))]
impl LoomCells {
    pub(crate) fn new(len: usize) -> LoomCells {
        LoomCells((0..len).map(|_| loom::cell::UnsafeCell::new(0)).collect())
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn read(&self, i: usize) -> u8 {
        // SAFETY: the pointer is to a live element of the Vec; loom runs one
        // thread at a time, so the read never physically overlaps a write, and
        // loom itself reports a read not ordered after the last write.
        self.0[i % self.0.len()].with(|p| unsafe { *p })
    }

    pub(crate) fn write(&self, i: usize, v: u8) {
        // SAFETY: as in `read`; loom reports a write not ordered after every
        // earlier read and write of the cell.
        self.0[i % self.0.len()].with_mut(|p| unsafe { *p = v });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `copy` must behave as memmove for every length around the small/large
    /// split, at every relative offset, overlapping in both directions.
    #[test]
    fn copy_is_memmove_for_every_small_length_and_overlap() {
        let pattern: Vec<u8> = (0..=255u8).cycle().take(512).collect();
        for len in 0..=SMALL_MAX + 8 {
            // Disjoint.
            let mut dst = vec![0xAA; len + 16];
            // SAFETY: both ranges are inside live buffers of sufficient length.
            unsafe { copy(dst.as_mut_ptr().add(3), pattern.as_ptr().add(5), len) };
            assert_eq!(&dst[3..3 + len], &pattern[5..5 + len], "len {len}");
            assert!(dst[..3].iter().chain(&dst[3 + len..]).all(|&b| b == 0xAA));
            // Overlapping, destination before and after the source.
            for shift in [1usize, 7, 8, 15, 16, 17, 31, 33] {
                for forward in [true, false] {
                    let mut buf = pattern[..len + 40].to_vec();
                    let (from, to) = if forward { (0, shift) } else { (shift, 0) };
                    let mut want = buf.clone();
                    want.copy_within(from..from + len, to);
                    // SAFETY: `from + len` and `to + len` are at most
                    // `len + 33 < buf.len()`.
                    unsafe { copy(buf.as_mut_ptr().add(to), buf.as_ptr().add(from), len) };
                    assert_eq!(buf, want, "len {len} shift {shift} forward {forward}");
                }
            }
        }
    }

    /// Page-sized copies, in and out of the 4 KiB-aliasing band where the
    /// vector loop takes over, disjoint and overlapping.
    #[test]
    fn large_copies_are_memmove_in_and_out_of_the_aliasing_band() {
        let len = 4096 + 24;
        let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut space = vec![0u8; 3 * 8192];
        let base = space.as_ptr() as usize;
        for distance in [8usize, 24, 63, 64, 2048] {
            // Place the destination `distance` bytes past the source modulo
            // 4 KiB: copy the source into `space` first, then copy within.
            let s_off = (4096 - base % 4096) % 4096;
            let d_off = s_off + 8192 + distance;
            space[s_off..s_off + len].copy_from_slice(&src);
            // SAFETY: both ranges are inside `space` (d_off + len < 3 * 8192).
            unsafe {
                copy(
                    space.as_mut_ptr().add(d_off),
                    space.as_ptr().add(s_off),
                    len,
                )
            };
            assert_eq!(&space[d_off..d_off + len], &src[..], "distance {distance}");
            // Overlapping by all but `distance` bytes.
            let mut buf = space.clone();
            let mut want = buf.clone();
            want.copy_within(s_off..s_off + len, s_off + distance);
            // SAFETY: `s_off + distance + len` is inside `buf`.
            unsafe {
                copy(
                    buf.as_mut_ptr().add(s_off + distance),
                    buf.as_ptr().add(s_off),
                    len,
                )
            };
            assert_eq!(buf, want, "overlapping, distance {distance}");
        }
    }
}
