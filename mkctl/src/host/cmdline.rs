//! The kernel command line (`/proc/cmdline`): the options that set memory or
//! CPUs aside at boot — `memmap=`, `isolcpus=`, `nohz_full=`, `crashkernel=`
//! and the multikernel RFC's `mkkernel_pool=`.
//!
//! Parsing follows the kernel's own rules (`memparse`, `bitmap_parselist`,
//! `next_arg` quoting, `--` ending the kernel's part). A value the kernel
//! would reject is kept as text with a warning; nothing here panics.

use crate::units::{ByteSize, CpuSet, MemRange, PhysAddr, MAX_CPU};

/// What the command line reserves. Options that are absent leave their
/// field empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CmdlineReservations {
    /// The kernel's part of the command line (up to `--`), as read.
    pub raw: String,
    /// Every `memmap=` item, in order (a comma-separated option gives one
    /// item per element).
    pub memmap: Vec<Memmap>,
    /// `isolcpus=` CPUs (union when given more than once).
    pub isolcpus: CpuSet,
    /// `isolcpus=` flags as written (`nohz`, `domain`, `managed_irq`); none
    /// written means `domain`.
    pub isolcpus_flags: Vec<String>,
    /// `nohz_full=` CPUs.
    pub nohz_full: CpuSet,
    /// Every `crashkernel=` option (`,high` and `,low` come as a pair).
    pub crashkernel: Vec<CrashKernel>,
    /// `mkkernel_pool=size[@addr]`: the multikernel memory pool (RFC series).
    pub mkkernel_pool: Option<MkPool>,
}

/// One `memmap=` item.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Memmap {
    /// The option as written, e.g. `memmap=4G$0x100000000`.
    pub text: String,
    #[serde(flatten)]
    pub kind: MemmapKind,
}

/// What a `memmap=` item does (kernel-parameters.txt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MemmapKind {
    /// `exactmap`: the firmware map is dropped; later `@` items define RAM.
    ExactMap,
    /// `nn@ss`: usable RAM.
    Ram { range: MemRange },
    /// `nn#ss`: ACPI data.
    AcpiData { range: MemRange },
    /// `nn$ss`: reserved, unused by the kernel (the usual way to set a pool
    /// aside).
    Reserved { range: MemRange },
    /// `nn!ss`: legacy persistent memory (a pmem device).
    Persistent { range: MemRange },
    /// `nn%ss-old+new`: retype a range; either type may be left out.
    Retype {
        range: MemRange,
        from: Option<u32>,
        to: Option<u32>,
    },
    /// `nn` alone: RAM above `nn` is dropped (like `mem=`).
    Limit { max: ByteSize },
}

/// E820 type numbers that `memmap=%` may name (arch/x86 e820 types).
const E820_RESERVED: u32 = 2;
const E820_PRAM: u32 = 12;

impl MemmapKind {
    /// The range this item takes away from the kernel, and how: `Some` for
    /// reserved, persistent and ACPI-data ranges.
    pub fn reservation(&self) -> Option<(MemRange, ReservedAs)> {
        match *self {
            MemmapKind::Reserved { range } => Some((range, ReservedAs::Reserved)),
            MemmapKind::Persistent { range } => Some((range, ReservedAs::Persistent)),
            MemmapKind::AcpiData { range } => Some((range, ReservedAs::AcpiData)),
            MemmapKind::Retype {
                range,
                to: Some(E820_RESERVED),
                ..
            } => Some((range, ReservedAs::Reserved)),
            MemmapKind::Retype {
                range,
                to: Some(E820_PRAM),
                ..
            } => Some((range, ReservedAs::Persistent)),
            _ => None,
        }
    }
}

/// The e820 type a `memmap=` item gives its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservedAs {
    Reserved,
    Persistent,
    AcpiData,
}

/// One `crashkernel=` option.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CrashKernel {
    /// The option as written, e.g. `crashkernel=256M@16M`.
    pub text: String,
    #[serde(flatten)]
    pub spec: CrashSpec,
}

/// The forms of `crashkernel=`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "form", rename_all = "snake_case")]
pub enum CrashSpec {
    /// `size[@offset]`; without an offset the kernel picks the place.
    Size {
        size: ByteSize,
        offset: Option<PhysAddr>,
    },
    /// `start-[end]:size[,...][@offset]`: the size depends on the RAM size.
    Ranges {
        ranges: Vec<CrashRange>,
        offset: Option<PhysAddr>,
    },
    /// `size,high`: above 4 GiB.
    High { size: ByteSize },
    /// `size,low`: the low part that goes with `,high`.
    Low { size: ByteSize },
    /// `size,cma`: extra crash memory from CMA (Linux 6.16+).
    Cma { size: ByteSize },
}

/// One `start-[end]:size` element: when `start <= RAM < end`, reserve `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CrashRange {
    pub from: ByteSize,
    /// `None` for an open end (`2G-:256M`).
    pub to: Option<ByteSize>,
    pub size: ByteSize,
}

impl CrashSpec {
    /// The fixed range this option reserves, when it names an offset and
    /// (for the ranges form) `system_ram` selects a size.
    pub fn fixed_range(&self, system_ram: u64) -> Option<MemRange> {
        match self {
            CrashSpec::Size {
                size,
                offset: Some(off),
            } => MemRange::new(off.0, size.0),
            CrashSpec::Ranges {
                offset: Some(off), ..
            } => self
                .size_for(system_ram)
                .and_then(|s| MemRange::new(off.0, s.0)),
            _ => None,
        }
    }

    /// The size the kernel reserves on a machine with `system_ram` bytes.
    pub fn size_for(&self, system_ram: u64) -> Option<ByteSize> {
        match self {
            CrashSpec::Size { size, .. }
            | CrashSpec::High { size }
            | CrashSpec::Low { size }
            | CrashSpec::Cma { size } => Some(*size),
            CrashSpec::Ranges { ranges, .. } => ranges
                .iter()
                .find(|r| system_ram >= r.from.0 && r.to.is_none_or(|to| system_ram < to.0))
                .map(|r| r.size),
        }
    }
}

/// `mkkernel_pool=size[@addr]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MkPool {
    pub text: String,
    pub size: ByteSize,
    /// `None`: the kernel picks the place at boot (see `/proc/iomem`).
    pub start: Option<PhysAddr>,
}

impl MkPool {
    /// The pool's range when the command line fixes its address.
    pub fn range(&self) -> Option<MemRange> {
        self.start.and_then(|s| MemRange::new(s.0, self.size.0))
    }
}

impl CmdlineReservations {
    /// Parses a command line. `last_cpu` is the highest possible CPU (what
    /// `N` means in a kernel cpulist); problems go to `warnings`.
    pub fn parse(text: &str, last_cpu: Option<u32>, warnings: &mut Vec<String>) -> Self {
        let mut out = CmdlineReservations::default();
        let args = split_args(text);
        out.raw = args
            .iter()
            .map(|(n, v)| match v {
                Some(v) => format!("{n}={v}"),
                None => n.clone(),
            })
            .collect::<Vec<_>>()
            .join(" ");
        for (name, value) in &args {
            // The kernel treats '-' and '_' in parameter names alike.
            let key = name.replace('-', "_");
            let Some(value) = value else {
                if matches!(
                    key.as_str(),
                    "memmap" | "isolcpus" | "nohz_full" | "crashkernel" | "mkkernel_pool"
                ) {
                    warnings.push(format!("kernel command line: {name} has no value"));
                }
                continue;
            };
            match key.as_str() {
                "memmap" => {
                    for item in value.split(',') {
                        match parse_memmap_item(item) {
                            Ok(kind) => out.memmap.push(Memmap {
                                text: format!("memmap={item}"),
                                kind,
                            }),
                            Err(e) => warnings
                                .push(format!("kernel command line: memmap={item}: {e}; ignored")),
                        }
                    }
                }
                "isolcpus" => match parse_isolcpus(value, last_cpu) {
                    Ok((flags, cpus, unknown)) => {
                        for f in unknown {
                            warnings.push(format!(
                                "kernel command line: isolcpus={value}: unknown flag \"{f}\" \
                                 (the kernel knows nohz, domain, managed_irq and skips it)"
                            ));
                        }
                        for f in flags {
                            if !out.isolcpus_flags.contains(&f) {
                                out.isolcpus_flags.push(f);
                            }
                        }
                        out.isolcpus = out.isolcpus.union(&cpus);
                    }
                    Err(e) => warnings.push(format!(
                        "kernel command line: isolcpus={value}: {e}; ignored"
                    )),
                },
                "nohz_full" => match parse_kernel_cpulist(value, last_cpu) {
                    Ok(cpus) => out.nohz_full = cpus,
                    Err(e) => warnings.push(format!(
                        "kernel command line: nohz_full={value}: {e}; ignored"
                    )),
                },
                "crashkernel" => match parse_crashkernel(value) {
                    Ok(spec) => out.crashkernel.push(CrashKernel {
                        text: format!("crashkernel={value}"),
                        spec,
                    }),
                    Err(e) => warnings.push(format!(
                        "kernel command line: crashkernel={value}: {e}; ignored"
                    )),
                },
                "mkkernel_pool" => match parse_mkkernel_pool(value) {
                    Ok((size, start)) => {
                        out.mkkernel_pool = Some(MkPool {
                            text: format!("mkkernel_pool={value}"),
                            size,
                            start,
                        })
                    }
                    Err(e) => warnings.push(format!(
                        "kernel command line: mkkernel_pool={value}: {e}; ignored"
                    )),
                },
                _ => {}
            }
        }
        out
    }
}

/// Splits a command line into `(name, value)` pairs as the kernel's
/// `next_arg` does: whitespace separates, double quotes group, and `--`
/// ends the kernel's part (the rest belongs to init).
pub fn split_args(text: &str) -> Vec<(String, Option<String>)> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    let mut started = false;
    for c in text.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_quote = !in_quote;
            started = true;
            continue;
        }
        if c.is_whitespace() && !in_quote {
            if started {
                if cur == "--" {
                    return args;
                }
                let arg = std::mem::take(&mut cur);
                args.push(match arg.split_once('=') {
                    Some((n, v)) => (n.to_string(), Some(v.to_string())),
                    None => (arg, None),
                });
                started = false;
            }
            continue;
        }
        cur.push(c);
        started = true;
    }
    args
}

/// The kernel's `memparse`: a number (C base rules: `0x` hex, leading `0`
/// octal, else decimal) and an optional `K M G T P E` suffix. Returns the
/// value and the text after it.
pub fn memparse(text: &str) -> Result<(u64, &str), String> {
    let b = text.as_bytes();
    let (radix, start) = if b.len() > 2
        && b[0] == b'0'
        && (b[1] == b'x' || b[1] == b'X')
        && b[2].is_ascii_hexdigit()
    {
        (16, 2)
    } else if b.first() == Some(&b'0') {
        (8, 0)
    } else {
        (10, 0)
    };
    let digits = text[start..]
        .find(|c: char| !c.is_digit(radix))
        .map_or(text.len(), |i| start + i);
    if digits == start {
        return Err(format!(
            "expected a size or address like 4G or 0x100000000 at \"{text}\""
        ));
    }
    let n = u64::from_str_radix(&text[start..digits], radix)
        .map_err(|_| format!("\"{}\" does not fit in 64 bits", &text[..digits]))?;
    let rest = &text[digits..];
    let shift = match rest.bytes().next().map(|c| c.to_ascii_uppercase()) {
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        Some(b'P') => 50,
        Some(b'E') => 60,
        _ => return Ok((n, rest)),
    };
    let v = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("\"{}\" does not fit in 64 bits", &text[..=digits]))?;
    Ok((v, &rest[1..]))
}

/// `memparse` that must consume all of `text`.
fn memparse_all(text: &str) -> Result<u64, String> {
    let (v, rest) = memparse(text)?;
    if rest.is_empty() {
        Ok(v)
    } else {
        Err(format!(
            "unexpected \"{rest}\" after \"{}\"",
            &text[..text.len() - rest.len()]
        ))
    }
}

/// One element of `memmap=` (without the `memmap=`).
pub fn parse_memmap_item(item: &str) -> Result<MemmapKind, String> {
    if item == "exactmap" {
        return Ok(MemmapKind::ExactMap);
    }
    let (size, rest) = memparse(item)?;
    let Some(op) = rest.chars().next() else {
        return Ok(MemmapKind::Limit {
            max: ByteSize(size),
        });
    };
    let tail = &rest[op.len_utf8()..];
    let range_at = |text: &str| -> Result<MemRange, String> {
        let start = memparse_all(text)?;
        MemRange::new(start, size)
            .ok_or_else(|| format!("{size:#x} bytes at {start:#x} run past the end of memory"))
    };
    match op {
        '@' => Ok(MemmapKind::Ram {
            range: range_at(tail)?,
        }),
        '#' => Ok(MemmapKind::AcpiData {
            range: range_at(tail)?,
        }),
        '$' => Ok(MemmapKind::Reserved {
            range: range_at(tail)?,
        }),
        '!' => Ok(MemmapKind::Persistent {
            range: range_at(tail)?,
        }),
        '%' => {
            let (start, mut r) = memparse(tail)?;
            let range = MemRange::new(start, size).ok_or_else(|| {
                format!("{size:#x} bytes at {start:#x} run past the end of memory")
            })?;
            let mut from = None;
            let mut to = None;
            if let Some(t) = r.strip_prefix('-') {
                let (v, rest) = parse_type(t)?;
                from = Some(v);
                r = rest;
            }
            if let Some(t) = r.strip_prefix('+') {
                let (v, rest) = parse_type(t)?;
                to = Some(v);
                r = rest;
            }
            if !r.is_empty() {
                return Err(format!(
                    "unexpected \"{r}\"; the form is size%offset-oldtype+newtype"
                ));
            }
            Ok(MemmapKind::Retype { range, from, to })
        }
        '\\' => Err(
            "a backslash reached the kernel (a grub escape such as \\$ gone wrong): \
             the kernel reserves nothing for this item"
                .into(),
        ),
        _ => Err(format!(
            "unknown separator '{op}'; use @ (RAM), # (ACPI), $ (reserved), ! (pmem) or %"
        )),
    }
}

fn parse_type(t: &str) -> Result<(u32, &str), String> {
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let v = t[..end]
        .parse()
        .map_err(|_| format!("expected an e820 type number at \"{t}\""))?;
    Ok((v, &t[end..]))
}

/// `isolcpus=[flag,...,]cpulist`: the flags as written, the CPUs, and the
/// flags the kernel does not know.
fn parse_isolcpus(
    value: &str,
    last_cpu: Option<u32>,
) -> Result<(Vec<String>, CpuSet, Vec<String>), String> {
    let mut flags = Vec::new();
    let mut unknown = Vec::new();
    let mut rest = value;
    // The kernel takes leading alphabetic words ending in ',' as flags.
    while let Some((word, tail)) = rest.split_once(',') {
        if word.is_empty() || !word.chars().all(|c| c.is_ascii_alphabetic() || c == '_') {
            break;
        }
        if word == "N" {
            break;
        }
        if matches!(word, "nohz" | "domain" | "managed_irq") {
            flags.push(word.to_string());
        } else {
            unknown.push(word.to_string());
        }
        rest = tail;
    }
    let cpus = parse_kernel_cpulist(rest, last_cpu)?;
    Ok((flags, cpus, unknown))
}

/// A kernel cpulist as `bitmap_parselist` reads it: `a`, `a-b`,
/// `a-b:used/group` (e.g. `0-15:2/4` = 0,1,4,5,...), with `N` for the last
/// CPU.
pub fn parse_kernel_cpulist(text: &str, last_cpu: Option<u32>) -> Result<CpuSet, String> {
    let mut set = CpuSet::new();
    let text = text.trim();
    if text.is_empty() {
        return Ok(set);
    }
    let cpu = |t: &str| -> Result<u32, String> {
        let t = t.trim();
        let n = if t == "N" {
            last_cpu.ok_or("\"N\" (the last CPU) but the number of CPUs is unknown")?
        } else {
            t.parse::<u32>()
                .map_err(|_| format!("\"{t}\" is not a CPU number"))?
        };
        if n > MAX_CPU {
            return Err(format!("CPU {n} is past the kernel's limit of {MAX_CPU}"));
        }
        Ok(n)
    };
    for item in text.split(',') {
        let (range, group) = match item.split_once(':') {
            Some((r, g)) => (r, Some(g)),
            None => (item, None),
        };
        let (lo, hi) = match range.split_once('-') {
            Some((a, b)) => (cpu(a)?, cpu(b)?),
            None => {
                let c = cpu(range)?;
                (c, c)
            }
        };
        if lo > hi {
            return Err(format!("range \"{range}\" runs backwards"));
        }
        let (used, size) = match group {
            None => (1, 1),
            Some(g) => {
                let (u, s) = g
                    .split_once('/')
                    .ok_or_else(|| format!("group \"{g}\" should be used/size, e.g. 2/4"))?;
                let u: u32 = u
                    .trim()
                    .parse()
                    .map_err(|_| format!("\"{u}\" is not a number"))?;
                let s: u32 = s
                    .trim()
                    .parse()
                    .map_err(|_| format!("\"{s}\" is not a number"))?;
                if u == 0 || s == 0 || u > s {
                    return Err(format!("group \"{g}\" needs 0 < used <= size"));
                }
                (u, s)
            }
        };
        for c in lo..=hi {
            if (c - lo) % size < used {
                set.insert(c);
            }
        }
    }
    Ok(set)
}

/// The forms of `crashkernel=` (kernel-parameters.txt and
/// admin-guide/kdump/kdump.rst).
pub fn parse_crashkernel(value: &str) -> Result<CrashSpec, String> {
    for (suffix, make) in [
        (
            ",high",
            (|size| CrashSpec::High { size }) as fn(ByteSize) -> CrashSpec,
        ),
        (",low", |size| CrashSpec::Low { size }),
        (",cma", |size| CrashSpec::Cma { size }),
    ] {
        if let Some(s) = value.strip_suffix(suffix) {
            return Ok(make(ByteSize(memparse_all(s)?)));
        }
    }
    let (body, offset) = match value.rsplit_once('@') {
        Some((b, o)) => (b, Some(PhysAddr(memparse_all(o)?))),
        None => (value, None),
    };
    if !body.contains(':') {
        return Ok(CrashSpec::Size {
            size: ByteSize(memparse_all(body)?),
            offset,
        });
    }
    let mut ranges = Vec::new();
    for item in body.split(',') {
        let (range, size) = item
            .split_once(':')
            .ok_or_else(|| format!("\"{item}\" should be start-[end]:size, e.g. 2G-:256M"))?;
        let (from, to) = range
            .split_once('-')
            .ok_or_else(|| format!("\"{range}\" should be start-[end], e.g. 512M-2G or 2G-"))?;
        let from = memparse_all(from)?;
        let to = if to.is_empty() {
            None
        } else {
            Some(memparse_all(to)?)
        };
        if to.is_some_and(|t| t <= from) {
            return Err(format!("range \"{range}\" is empty"));
        }
        ranges.push(CrashRange {
            from: ByteSize(from),
            to: to.map(ByteSize),
            size: ByteSize(memparse_all(size)?),
        });
    }
    Ok(CrashSpec::Ranges { ranges, offset })
}

fn parse_mkkernel_pool(value: &str) -> Result<(ByteSize, Option<PhysAddr>), String> {
    let (size, rest) = memparse(value)?;
    if size == 0 {
        return Err("the pool size is 0".into());
    }
    if rest.is_empty() {
        return Ok((ByteSize(size), None));
    }
    let at = rest
        .strip_prefix('@')
        .ok_or_else(|| format!("expected @address after the size, found \"{rest}\""))?;
    Ok((ByteSize(size), Some(PhysAddr(memparse_all(at)?))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::GIB;
    use proptest::prelude::*;

    fn range(start: u64, size: u64) -> MemRange {
        MemRange::new(start, size).unwrap()
    }

    #[test]
    fn memparse_follows_the_kernel() {
        assert_eq!(memparse("4G").unwrap(), (4 * GIB, ""));
        assert_eq!(memparse("0x100000000").unwrap(), (0x1_0000_0000, ""));
        assert_eq!(memparse("0x10k@x").unwrap(), (0x10 << 10, "@x"));
        assert_eq!(memparse("010").unwrap(), (8, ""), "leading 0 is octal");
        assert_eq!(memparse("0").unwrap(), (0, ""));
        assert_eq!(memparse("1E").unwrap(), (1 << 60, ""));
        assert!(memparse("G").is_err());
        assert!(memparse("").is_err());
        assert!(memparse("16E").unwrap_err().contains("64 bits"));
        assert!(memparse("99999999999999999999").is_err());
    }

    #[test]
    fn memmap_forms() {
        let r = |s| parse_memmap_item(s).unwrap();
        assert_eq!(
            r("4G$0x100000000"),
            MemmapKind::Reserved {
                range: range(0x1_0000_0000, 4 * GIB)
            }
        );
        assert_eq!(
            r("100M@2G"),
            MemmapKind::Ram {
                range: range(2 * GIB, 100 << 20)
            }
        );
        assert_eq!(
            r("1M#0x7f000000"),
            MemmapKind::AcpiData {
                range: range(0x7f00_0000, 1 << 20)
            }
        );
        assert_eq!(
            r("2G!8G"),
            MemmapKind::Persistent {
                range: range(8 * GIB, 2 * GIB)
            }
        );
        assert_eq!(r("exactmap"), MemmapKind::ExactMap);
        assert_eq!(
            r("3G"),
            MemmapKind::Limit {
                max: ByteSize(3 * GIB)
            }
        );
        assert_eq!(
            r("1G%4G-1+12"),
            MemmapKind::Retype {
                range: range(4 * GIB, GIB),
                from: Some(1),
                to: Some(12)
            }
        );
        assert_eq!(
            r("1G%4G+2"),
            MemmapKind::Retype {
                range: range(4 * GIB, GIB),
                from: None,
                to: Some(2)
            }
        );
        assert_eq!(
            r("1G%4G+12").reservation(),
            Some((range(4 * GIB, GIB), ReservedAs::Persistent))
        );
    }

    #[test]
    fn memmap_malformed() {
        assert!(parse_memmap_item("4G\\$0x100000000")
            .unwrap_err()
            .contains("backslash"));
        assert!(parse_memmap_item("4G$").unwrap_err().contains("expected"));
        assert!(parse_memmap_item("4G$4Gx")
            .unwrap_err()
            .contains("unexpected"));
        assert!(parse_memmap_item("4G^4G")
            .unwrap_err()
            .contains("separator"));
        assert!(parse_memmap_item("$4G").is_err());
        assert!(parse_memmap_item("16E$1").is_err());
        assert!(parse_memmap_item("8E$0xf000000000000000")
            .unwrap_err()
            .contains("past the end"));
        assert!(parse_memmap_item("1G%4G-x").is_err());
    }

    #[test]
    fn cmdline_reservations() {
        let mut w = Vec::new();
        let c = CmdlineReservations::parse(
            "BOOT_IMAGE=/vmlinuz root=/dev/sda1 memmap=4G$0x100000000 \
             memmap=exactmap,640K@0,1G!8G isolcpus=domain,managed_irq,2-5 \
             nohz-full=2-5 crashkernel=256M@16M mkkernel_pool=2G@0x80000000 \
             init=\"/bin/sh -x\" -- memmap=1G$1G",
            Some(7),
            &mut w,
        );
        assert!(w.is_empty(), "{w:?}");
        let texts: Vec<_> = c.memmap.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "memmap=4G$0x100000000",
                "memmap=exactmap",
                "memmap=640K@0",
                "memmap=1G!8G"
            ]
        );
        assert_eq!(c.isolcpus.to_string(), "2-5");
        assert_eq!(c.isolcpus_flags, ["domain", "managed_irq"]);
        assert_eq!(c.nohz_full.to_string(), "2-5");
        assert_eq!(
            c.crashkernel[0].spec,
            CrashSpec::Size {
                size: ByteSize(256 << 20),
                offset: Some(PhysAddr(16 << 20))
            }
        );
        let pool = c.mkkernel_pool.unwrap();
        assert_eq!(pool.range(), Some(range(0x8000_0000, 2 * GIB)));
        assert!(c.raw.ends_with("init=/bin/sh -x"), "{}", c.raw);
    }

    #[test]
    fn cmdline_malformed_values_warn() {
        let mut w = Vec::new();
        let c = CmdlineReservations::parse(
            "memmap=4G$ memmap=1G$4G isolcpus=bogus,1-x nohz_full=5-2 crashkernel=abc \
             mkkernel_pool=0 isolcpus",
            Some(7),
            &mut w,
        );
        assert_eq!(c.memmap.len(), 1);
        assert!(c.isolcpus.is_empty());
        assert!(c.nohz_full.is_empty());
        assert!(c.crashkernel.is_empty());
        assert!(c.mkkernel_pool.is_none());
        assert_eq!(w.len(), 6, "{w:#?}");
        assert!(w[0].starts_with("kernel command line: memmap=4G$:"));
        assert!(w[1].contains("isolcpus=bogus,1-x"));
        assert!(w[5].contains("isolcpus has no value"));
    }

    #[test]
    fn isolcpus_flags_and_lists() {
        let (f, c, u) = parse_isolcpus("nohz,domain,managed_irq,1,3-4", None).unwrap();
        assert_eq!(f, ["nohz", "domain", "managed_irq"]);
        assert_eq!(c.to_string(), "1,3-4");
        assert!(u.is_empty());
        let (f, c, u) = parse_isolcpus("frob,2", None).unwrap();
        assert!(f.is_empty());
        assert_eq!(u, ["frob"]);
        assert_eq!(c.to_string(), "2");
        let (_, c, _) = parse_isolcpus("N", Some(7)).unwrap();
        assert_eq!(c.to_string(), "7");
        let (_, c, _) = parse_isolcpus("4-N", Some(7)).unwrap();
        assert_eq!(c.to_string(), "4-7");
    }

    #[test]
    fn kernel_cpulist_groups() {
        assert_eq!(
            parse_kernel_cpulist("0-15:2/4", None).unwrap().to_string(),
            "0-1,4-5,8-9,12-13"
        );
        assert_eq!(
            parse_kernel_cpulist("1-N", Some(3)).unwrap().to_string(),
            "1-3"
        );
        assert!(parse_kernel_cpulist("N", None).is_err());
        assert!(parse_kernel_cpulist("0-7:3/2", None).is_err());
        assert!(parse_kernel_cpulist("0-7:0/2", None).is_err());
        assert!(parse_kernel_cpulist("9000", None).is_err());
    }

    #[test]
    fn crashkernel_forms() {
        assert_eq!(
            parse_crashkernel("512M").unwrap(),
            CrashSpec::Size {
                size: ByteSize(512 << 20),
                offset: None
            }
        );
        assert_eq!(
            parse_crashkernel("1G,high").unwrap(),
            CrashSpec::High {
                size: ByteSize(GIB)
            }
        );
        assert_eq!(
            parse_crashkernel("256M,low").unwrap(),
            CrashSpec::Low {
                size: ByteSize(256 << 20)
            }
        );
        assert_eq!(
            parse_crashkernel("64M,cma").unwrap(),
            CrashSpec::Cma {
                size: ByteSize(64 << 20)
            }
        );
        let spec = parse_crashkernel("512M-2G:64M,2G-:256M@16M").unwrap();
        assert_eq!(
            spec,
            CrashSpec::Ranges {
                ranges: vec![
                    CrashRange {
                        from: ByteSize(512 << 20),
                        to: Some(ByteSize(2 * GIB)),
                        size: ByteSize(64 << 20)
                    },
                    CrashRange {
                        from: ByteSize(2 * GIB),
                        to: None,
                        size: ByteSize(256 << 20)
                    },
                ],
                offset: Some(PhysAddr(16 << 20)),
            }
        );
        assert_eq!(spec.size_for(GIB), Some(ByteSize(64 << 20)));
        assert_eq!(spec.size_for(64 * GIB), Some(ByteSize(256 << 20)));
        assert_eq!(spec.size_for(256 << 20), None);
        assert_eq!(spec.fixed_range(64 * GIB), Some(range(16 << 20, 256 << 20)));
        assert!(parse_crashkernel("2G-1G:64M")
            .unwrap_err()
            .contains("empty"));
        assert!(parse_crashkernel("2G:64M").is_err());
        assert!(parse_crashkernel("x,high").is_err());
        assert!(parse_crashkernel("").is_err());
    }

    #[test]
    fn args_quoting_and_end() {
        let a = split_args("a=1  \"b=x y\" c=\"p q\" d -- e=2");
        assert_eq!(
            a,
            [
                ("a".into(), Some("1".into())),
                ("b".into(), Some("x y".into())),
                ("c".into(), Some("p q".into())),
                ("d".into(), None),
            ]
        );
        assert!(split_args("").is_empty());
        assert!(split_args("\n").is_empty());
    }

    proptest! {
        #[test]
        fn memmap_never_panics(item in "[0-9a-fxA-FKMGTPE@#$!%+\\-\\\\]{0,30}") {
            let _ = parse_memmap_item(&item);
        }

        #[test]
        fn crashkernel_never_panics(v in "[0-9a-fxKMG@:,\\-]{0,30}(,high|,low|,cma)?") {
            let _ = parse_crashkernel(&v);
        }

        #[test]
        fn cmdline_never_panics(text in "[ -~]{0,80}") {
            let mut w = Vec::new();
            let _ = CmdlineReservations::parse(&text, Some(3), &mut w);
        }

        #[test]
        fn cmdline_never_panics_on_any_text(
            text in "(memmap|isolcpus|nohz_full|crashkernel|mkkernel_pool)=\\PC{0,30}"
        ) {
            let mut w = Vec::new();
            let _ = CmdlineReservations::parse(&text, None, &mut w);
        }

        #[test]
        fn memmap_round_trips(size in 1u64..1 << 40, start in 0u64..1 << 46, op in 0usize..3) {
            let sep = ['$', '!', '#'][op];
            let kind = parse_memmap_item(&format!("{size}{sep}{start:#x}")).unwrap();
            let (r, _) = kind.reservation().unwrap();
            prop_assert_eq!(r, MemRange::new(start, size).unwrap());
        }
    }
}
