//! The vDSO proxy: a process restored on another kernel build keeps
//! calling into the vDSO it started with (its libc looked the functions up
//! once, at start), at the old address. The restore maps this kernel's own
//! vDSO (with its data pages) where the process has room, and puts the old
//! vDSO's bytes back at the old address with every exported function's
//! entry replaced by a jump to the same function of the new one; a function
//! the new vDSO lacks becomes its system call (`getrandom` on a kernel
//! before 6.11), or `-ENOSYS` when there is none.
//!
//! Only entry points are redirected: code resumed in the middle of an old
//! function would read the old kernel's data pages, which are gone. The
//! freeze takes every thread out of the vDSO first (`capture`); a signal
//! handler interrupting a vDSO function at the freeze would still return
//! into it, and is not handled.
//!
//! The old vDSO comes from the image, from another kernel: it is parsed
//! with every offset checked, and a malformed one is an error, never a
//! panic.

use super::image::{Mapping, MappingKind, PAGE, USER_TOP};

/// Why no proxy can be built.
#[derive(Debug, thiserror::Error)]
pub enum VdsoError {
    #[error("the {which} vDSO is not a 64-bit little-endian ELF image: {why}")]
    Elf { which: &'static str, why: String },
    #[error("the old vDSO's {name} is {size} bytes, too short for a jump")]
    TooShort { name: String, size: u64 },
    #[error("no room for this kernel's vDSO ({len:#x} bytes) in the process's address space")]
    NoRoom { len: u64 },
    #[error("the image has no [vdso] mapping of {len} bytes to put the old vDSO back at")]
    NoOldMapping { len: usize },
    #[error("thread {tid} was inside the old vDSO at the freeze (at {rip:#x}), where only its entries are redirected")]
    ThreadInside { tid: u32, rip: u64 },
}

/// One function a vDSO exports: its name (without version) and where it
/// lies, as an offset into the mapped vDSO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Symbol {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// Little-endian reads bounded by the image: `None` past its end.
struct Elf<'a>(&'a [u8]);

impl Elf<'_> {
    fn bytes<const N: usize>(&self, at: u64) -> Option<[u8; N]> {
        let at = usize::try_from(at).ok()?;
        self.0.get(at..at.checked_add(N)?)?.try_into().ok()
    }
    fn u16(&self, at: u64) -> Option<u16> {
        self.bytes(at).map(u16::from_le_bytes)
    }
    fn u32(&self, at: u64) -> Option<u32> {
        self.bytes(at).map(u32::from_le_bytes)
    }
    fn u64(&self, at: u64) -> Option<u64> {
        self.bytes(at).map(u64::from_le_bytes)
    }
}

const PT_LOAD: u32 = 1;
const SHT_DYNSYM: u32 = 11;
const STT_FUNC: u8 = 2;
const STB_GLOBAL: u8 = 1;
const STB_WEAK: u8 = 2;

/// The functions a vDSO image exports (from `.dynsym`), by their offset
/// into the mapping.
pub(crate) fn symbols(image: &[u8], which: &'static str) -> Result<Vec<Symbol>, VdsoError> {
    let bad = |why: &str| VdsoError::Elf {
        which,
        why: why.to_string(),
    };
    let e = Elf(image);
    if e.bytes::<4>(0) != Some(*b"\x7fELF") || e.bytes::<2>(4) != Some([2, 1]) {
        return Err(bad("no ELF64 LE header"));
    }
    let short = || bad("truncated");
    let (phoff, shoff) = (
        e.u64(0x20).ok_or_else(short)?,
        e.u64(0x28).ok_or_else(short)?,
    );
    let (phentsize, phnum) = (
        e.u16(0x36).ok_or_else(short)?,
        e.u16(0x38).ok_or_else(short)?,
    );
    let (shentsize, shnum) = (
        e.u16(0x3a).ok_or_else(short)?,
        e.u16(0x3c).ok_or_else(short)?,
    );
    if phentsize < 0x38 || shentsize < 0x40 {
        return Err(bad("header entry sizes too small"));
    }
    // Symbol values are link addresses; the mapping starts at the first
    // loaded segment's address minus its file offset.
    let bias = (0..u64::from(phnum))
        .map(|i| phoff + i * u64::from(phentsize))
        .find(|&p| e.u32(p) == Some(PT_LOAD))
        .and_then(|p| Some(e.u64(p + 0x10)?.wrapping_sub(e.u64(p + 8)?)))
        .ok_or_else(|| bad("no loadable segment"))?;
    let sh = |i: u64| shoff + i * u64::from(shentsize);
    let dynsym = (0..u64::from(shnum))
        .map(sh)
        .find(|&s| e.u32(s + 4) == Some(SHT_DYNSYM))
        .ok_or_else(|| bad("no .dynsym section"))?;
    let (off, size) = (
        e.u64(dynsym + 0x18).ok_or_else(short)?,
        e.u64(dynsym + 0x20).ok_or_else(short)?,
    );
    let link = e.u32(dynsym + 0x28).ok_or_else(short)?;
    if u64::from(link) >= u64::from(shnum) {
        return Err(bad(".dynsym links to no section"));
    }
    let strtab = e.u64(sh(u64::from(link)) + 0x18).ok_or_else(short)?;
    let mut out = Vec::new();
    for s in (0..size / 24).map(|i| off + i * 24) {
        let (name, info) = (
            e.u32(s).ok_or_else(short)?,
            e.bytes::<1>(s + 4).ok_or_else(short)?[0],
        );
        let shndx = e.u16(s + 6).ok_or_else(short)?;
        let (value, len) = (
            e.u64(s + 8).ok_or_else(short)?,
            e.u64(s + 16).ok_or_else(short)?,
        );
        if info & 0xf != STT_FUNC || !matches!(info >> 4, STB_GLOBAL | STB_WEAK) || shndx == 0 {
            continue;
        }
        let start = strtab
            .checked_add(u64::from(name))
            .and_then(|a| usize::try_from(a).ok())
            .filter(|&a| a < image.len())
            .ok_or_else(|| bad("symbol name outside the image"))?;
        let name = image[start..]
            .split(|&b| b == 0)
            .next()
            .and_then(|n| std::str::from_utf8(n).ok())
            .filter(|n| !n.is_empty() && n.len() < 64)
            .ok_or_else(|| bad("symbol name not text"))?;
        let offset = value.wrapping_sub(bias);
        if offset
            .checked_add(len)
            .is_none_or(|end| end > image.len() as u64)
        {
            return Err(bad("symbol outside the image"));
        }
        out.push(Symbol {
            name: name.to_string(),
            offset,
            size: len,
        });
    }
    if out.is_empty() {
        return Err(bad("it exports no function"));
    }
    Ok(out)
}

/// The name without `__vdso_`: `clock_gettime` for both its names.
fn base_name(n: &str) -> &str {
    n.strip_prefix("__vdso_").unwrap_or(n)
}

/// The system call a vDSO function stands for, with the same first
/// arguments: what it falls back to itself.
fn syscall_of(name: &str) -> Option<u32> {
    Some(match base_name(name) {
        "clock_gettime" => 228,
        "gettimeofday" => 96,
        "time" => 201,
        "getcpu" => 309,
        "clock_getres" => 229,
        // (buffer, len, flags) as getrandom(2); the state arguments are
        // the vDSO's own.
        "getrandom" => 318,
        _ => return None,
    })
}

/// What goes at an old entry point `at` for a function that now lives at
/// `target` (None: not in the new vDSO).
fn entry(at: u64, target: Option<u64>, name: &str) -> Vec<u8> {
    match target {
        Some(t) => {
            let rel = t.wrapping_sub(at + 5) as i64;
            match i32::try_from(rel) {
                // jmp rel32
                Ok(r) => [&[0xe9][..], &r.to_le_bytes()].concat(),
                // movabs $t, %rax; jmp *%rax (rax is free at a call).
                Err(_) => [&[0x48, 0xb8][..], &t.to_le_bytes(), &[0xff, 0xe0]].concat(),
            }
        }
        None => match syscall_of(name) {
            // mov $nr, %eax; syscall; ret
            Some(nr) => [&[0xb8][..], &nr.to_le_bytes(), &[0x0f, 0x05, 0xc3]].concat(),
            // mov $-ENOSYS, %rax; ret
            None => [&[0x48, 0xc7, 0xc0][..], &(-38i32).to_le_bytes(), &[0xc3]].concat(),
        },
    }
}

/// The old vDSO's bytes for `old_at`, with every function's entry sent to
/// its namesake among `new` (this kernel's vDSO symbols, mapped at
/// `new_at`).
pub(crate) fn patch(
    old: &[u8],
    old_at: u64,
    new: &[Symbol],
    new_at: u64,
) -> Result<Vec<u8>, VdsoError> {
    let mut syms = symbols(old, "image's")?;
    syms.sort_by_key(|s| s.offset);
    let mut out = old.to_vec();
    let mut done = Vec::new();
    for (i, s) in syms.iter().enumerate() {
        if done.contains(&s.offset) {
            continue;
        }
        // All names at this address (`time` and `__vdso_time`): the first
        // the new vDSO has.
        let target = syms.iter().filter(|o| o.offset == s.offset).find_map(|o| {
            new.iter()
                .find(|n| base_name(&n.name) == base_name(&o.name))
                .map(|n| new_at + n.offset)
        });
        let code = entry(old_at + s.offset, target, &s.name);
        // Room up to the next function, or the symbol's own size.
        let next = syms[i + 1..]
            .iter()
            .map(|n| n.offset)
            .find(|&o| o > s.offset)
            .unwrap_or(old.len() as u64);
        let room = next - s.offset;
        if (code.len() as u64) > room {
            return Err(VdsoError::TooShort {
                name: s.name.clone(),
                size: room,
            });
        }
        let at = s.offset as usize;
        out[at..at + code.len()].copy_from_slice(&code);
        done.push(s.offset);
    }
    Ok(out)
}

/// Where this kernel's special mappings (`local`: `[vvar]`... `[vdso]`, as
/// in its own `/proc/self/maps`) can go in a process laid out as `image`
/// (and holding `also`, the stub's control page): the highest free range
/// below the old ones within 1 GiB (so entries reach it with a 5-byte
/// jump), else above them.
pub(crate) fn place(
    image: &[Mapping],
    local: &[Mapping],
    also: (u64, u64),
) -> Result<u64, VdsoError> {
    let special = |v: &[Mapping]| -> Option<(u64, u64)> {
        let s: Vec<&Mapping> = v.iter().filter(|m| m.kind.is_special()).collect();
        Some((s.first()?.start, s.last()?.end))
    };
    let len = special(local).map_or(0, |(a, b)| b - a);
    let (old_start, old_end) = special(image).ok_or(VdsoError::NoRoom { len })?;
    let mut busy: Vec<(u64, u64)> = image.iter().map(|m| (m.start, m.end)).collect();
    busy.push(also);
    // A guard page either side of every mapping (a stack grows down into
    // the page below it).
    let free = |a: u64| {
        a >= PAGE
            && a + len + PAGE <= USER_TOP
            && busy
                .iter()
                .all(|&(s, e)| a + len + PAGE <= s || a >= e + PAGE)
    };
    const REACH: u64 = 1 << 30;
    let below = busy
        .iter()
        .map(|&(s, _)| s)
        .chain([old_start])
        .filter_map(|s| s.checked_sub(len + PAGE))
        .filter(|&a| a + REACH >= old_start && a < old_start && free(a))
        .max();
    let above = busy
        .iter()
        .map(|&(_, e)| e + PAGE)
        .chain([old_end + PAGE])
        .filter(|&a| a >= old_end && a <= old_end + REACH && free(a))
        .min();
    below.or(above).ok_or(VdsoError::NoRoom { len })
}

/// The image's `[vdso]` mapping (where the old bytes go back).
pub(crate) fn old_vdso(image: &[Mapping], len: usize) -> Result<&Mapping, VdsoError> {
    image
        .iter()
        .find(|m| m.kind == MappingKind::Vdso && m.len() == len as u64)
        .ok_or(VdsoError::NoOldMapping { len })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's own vDSO, read from its memory.
    fn own_vdso() -> (u64, Vec<u8>) {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps.lines().find(|l| l.ends_with("[vdso]")).unwrap();
        let (a, b) = line
            .split_whitespace()
            .next()
            .unwrap()
            .split_once('-')
            .unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        use std::os::unix::fs::FileExt;
        std::fs::File::open("/proc/self/mem")
            .unwrap()
            .read_exact_at(&mut buf, a)
            .unwrap();
        (a, buf)
    }

    #[test]
    fn finds_the_functions_of_this_kernels_vdso() {
        let (at, bytes) = own_vdso();
        let syms = symbols(&bytes, "own").unwrap();
        let names: Vec<&str> = syms.iter().map(|s| s.name.as_str()).collect();
        for n in [
            "__vdso_clock_gettime",
            "__vdso_gettimeofday",
            "__vdso_time",
            "__vdso_getcpu",
        ] {
            assert!(names.contains(&n), "{n} not in {names:?}");
        }
        // Its clock_gettime, called at that offset, tells the time.
        let s = syms
            .iter()
            .find(|s| s.name == "__vdso_clock_gettime")
            .unwrap();
        assert!(s.size > 0 && s.offset + s.size <= bytes.len() as u64);
        type ClockGettime = unsafe extern "C" fn(libc::clockid_t, *mut libc::timespec) -> i32;
        // SAFETY: `at + offset` is the entry of this process's own vDSO
        // clock_gettime (the mapping is live for the process's life), whose
        // C signature this is; it writes one timespec into a live local.
        let (r, t) = unsafe {
            let f: ClockGettime = std::mem::transmute((at + s.offset) as usize);
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            (f(libc::CLOCK_MONOTONIC, &mut t), t)
        };
        let mut libc_t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into a live local.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut libc_t) };
        assert_eq!(r, 0);
        assert!(
            t.tv_sec > 0 && (libc_t.tv_sec - t.tv_sec).abs() <= 1,
            "{} {}",
            t.tv_sec,
            libc_t.tv_sec
        );
    }

    #[test]
    fn entries_jump_to_their_namesakes_or_make_the_syscall() {
        let (_, bytes) = own_vdso();
        let syms = symbols(&bytes, "own").unwrap();
        // A "new" vDSO with clock_gettime only, 0x10000 above.
        let ct = syms
            .iter()
            .find(|s| s.name == "__vdso_clock_gettime")
            .unwrap();
        let new = vec![Symbol {
            name: "clock_gettime".into(),
            offset: 0x100,
            size: 16,
        }];
        let old_at = 0x7f00_0000_0000;
        let out = patch(&bytes, old_at, &new, old_at + 0x10000).unwrap();
        let at = ct.offset as usize;
        assert_eq!(out[at], 0xe9);
        let rel = i32::from_le_bytes(out[at + 1..at + 5].try_into().unwrap());
        assert_eq!(
            old_at + ct.offset + 5 + rel as u64,
            old_at + 0x10000 + 0x100
        );
        // time is not in the new one: its syscall, 201.
        let t = syms.iter().find(|s| s.name == "__vdso_time").unwrap();
        let at = t.offset as usize;
        assert_eq!(&out[at..at + 8], &[0xb8, 201, 0, 0, 0, 0x0f, 0x05, 0xc3]);
        // Far away: an absolute jump.
        let far = patch(&bytes, old_at, &new, 0x1000_0000).unwrap();
        let at = ct.offset as usize;
        assert_eq!(&far[at..at + 2], &[0x48, 0xb8]);
        assert_eq!(
            u64::from_le_bytes(far[at + 2..at + 10].try_into().unwrap()),
            0x1000_0100
        );
        // Nothing else changed: the bytes between entries are the old ones.
        let entries: Vec<u64> = syms.iter().map(|s| s.offset).collect();
        let changed = (0..bytes.len())
            .filter(|&i| out[i] != bytes[i])
            .all(|i| entries.iter().any(|&e| (e..e + 8).contains(&(i as u64))));
        assert!(changed);
    }

    #[test]
    fn malformed_images_are_errors() {
        let (_, bytes) = own_vdso();
        assert!(symbols(&bytes[..64], "x").is_err());
        assert!(symbols(b"not an elf", "x").is_err());
        // Every single truncation and a run of byte flips: an error or a
        // result, never a panic.
        for n in (0..bytes.len()).step_by(97) {
            let _ = symbols(&bytes[..n], "x");
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut b = bytes.clone();
            for _ in 0..4 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng % 0x400) as usize % b.len();
                b[i] = (rng >> 32) as u8;
            }
            let _ = symbols(&b, "x");
            let _ = patch(&b, 0x7f00_0000_0000, &[], 0x7f00_0010_0000);
        }
    }

    fn m(start: u64, end: u64, kind: MappingKind) -> Mapping {
        crate::migrate::image::tests::mapping(start, end, 0, kind)
    }

    #[test]
    fn the_new_vdso_goes_in_a_free_range_near_the_old() {
        let image = vec![
            m(0x7f00_0000_0000, 0x7f00_0010_0000, MappingKind::Anon),
            m(0x7ffd_0000_0000, 0x7ffd_0002_0000, MappingKind::Anon),
            m(0x7ffd_0003_0000, 0x7ffd_0003_4000, MappingKind::Vvar),
            m(0x7ffd_0003_4000, 0x7ffd_0003_6000, MappingKind::Vdso),
        ];
        let local = vec![
            m(0x1000_0000, 0x1000_3000, MappingKind::Vvar),
            m(0x1000_3000, 0x1000_4000, MappingKind::VvarVclock),
            m(0x1000_4000, 0x1000_6000, MappingKind::Vdso),
        ];
        let at = place(&image, &local, (0x5000_0000, 0x5000_1000)).unwrap();
        // The highest free range below the old: in the gap just under it.
        assert_eq!(at, 0x7ffd_0003_0000 - 0x6000 - PAGE);
        for x in &image {
            assert!(
                at + 0x6000 <= x.start || at >= x.end,
                "{at:#x} overlaps {x:?}"
            );
        }
        // That gap taken: further down, past the next mapping.
        let mut busier = image.clone();
        busier.push(m(0x7ffd_0002_0000, 0x7ffd_0003_0000, MappingKind::Anon));
        let at = place(&busier, &local, (0x5000_0000, 0x5000_1000)).unwrap();
        assert_eq!(at, 0x7ffd_0000_0000 - 0x6000 - PAGE);
        // Nothing free within reach: an error, not an overlap.
        let full = vec![
            m(0x1000, 0x7ffd_0003_0000, MappingKind::Anon),
            m(0x7ffd_0003_0000, 0x7ffd_0003_4000, MappingKind::Vvar),
            m(0x7ffd_0003_4000, 0x7ffd_0003_6000, MappingKind::Vdso),
            m(0x7ffd_0003_6000, USER_TOP, MappingKind::Anon),
        ];
        assert!(place(&full, &local, (0, 0)).is_err());
    }
}
