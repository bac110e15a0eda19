//! Typed values of a topology: CPU sets, byte sizes, physical addresses and
//! instance ids, with the parsers and printers for their written forms.
//!
//! Every parser here takes text a person wrote and returns either the value or
//! a message that says what was expected; none of them panics. Printing a value
//! and parsing the text back gives the same value (checked by property tests).

use std::collections::BTreeSet;
use std::fmt;

/// A set of logical CPU numbers, written as a Linux cpulist: `"0-3,8,10-11"`.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct CpuSet(BTreeSet<u32>);

/// The highest CPU number a cpulist may name (the kernel's `NR_CPUS` limit is
/// 8192 on x86_64; anything past it is a typo, not a machine).
pub const MAX_CPU: u32 = 8191;

impl CpuSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a cpulist such as `"2-3,6"`. Whitespace around items is allowed;
    /// an empty string is the empty set (as in sysfs files of offline nodes).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut set = BTreeSet::new();
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self(set));
        }
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(format!("empty item in CPU list \"{text}\""));
            }
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (parse_cpu(a, item)?, parse_cpu(b, item)?),
                None => {
                    let c = parse_cpu(item, item)?;
                    (c, c)
                }
            };
            if lo > hi {
                return Err(format!(
                    "range \"{item}\" runs backwards; write it as \"{hi}-{lo}\""
                ));
            }
            set.extend(lo..=hi);
        }
        Ok(Self(set))
    }

    /// Builds a set from CPU numbers.
    pub fn from_cpus(cpus: impl IntoIterator<Item = u32>) -> Self {
        Self(cpus.into_iter().collect())
    }

    /// Number of CPUs in the set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the set holds no CPU.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `cpu` is in the set.
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    /// Adds one CPU.
    pub fn insert(&mut self, cpu: u32) {
        self.0.insert(cpu);
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    /// The lowest CPU, if any.
    pub fn first(&self) -> Option<u32> {
        self.0.first().copied()
    }

    /// CPUs in both sets.
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        Self(self.0.intersection(&other.0).copied().collect())
    }

    /// CPUs in `self` but not in `other`.
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        Self(self.0.difference(&other.0).copied().collect())
    }

    /// CPUs in either set.
    pub fn union(&self, other: &CpuSet) -> CpuSet {
        Self(self.0.union(&other.0).copied().collect())
    }

    /// True when every CPU of `self` is in `other`.
    pub fn is_subset(&self, other: &CpuSet) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The first `n` CPUs of the set (fewer if it is smaller).
    pub fn take(&self, n: usize) -> CpuSet {
        Self(self.0.iter().take(n).copied().collect())
    }
}

fn parse_cpu(text: &str, item: &str) -> Result<u32, String> {
    let text = text.trim();
    let cpu: u32 = text
        .parse()
        .map_err(|_| format!("\"{item}\" is not a CPU number or range like \"2-5\""))?;
    if cpu > MAX_CPU {
        return Err(format!("CPU {cpu} is past the kernel's limit of {MAX_CPU}"));
    }
    Ok(cpu)
}

/// Prints the canonical cpulist: ascending, ranges of three or more CPUs
/// collapsed (`0-3,5,7-9`), pairs written as a range too (`4-5`).
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut iter = self.0.iter().copied().peekable();
        while let Some(lo) = iter.next() {
            let mut hi = lo;
            while iter.peek() == Some(&(hi + 1)) {
                hi += 1;
                iter.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet(\"{self}\")")
    }
}

impl serde::Serialize for CpuSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A size in bytes. Written as a plain number of bytes, a hex number
/// (`0x20000000`) or a number with a binary unit: `K`, `M`, `G`, `T`
/// (optionally followed by `iB` or `B`; all units are powers of 1024).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

impl ByteSize {
    /// Parses `"512M"`, `"4G"`, `"0x1000"`, `"4096"`, `"2MiB"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_u64_with_unit(text).map(Self)
    }

    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// A short reading for people (`176.1G`, `512M`): exact when a unit
    /// divides the size, else one decimal of the largest unit that fits.
    pub fn human(self) -> String {
        let b = self.0;
        for (unit, name) in [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")] {
            if b >= unit {
                if b.is_multiple_of(unit) {
                    return format!("{}{name}", b / unit);
                }
                // One decimal is all a report needs; precision loss is fine.
                #[allow(clippy::cast_precision_loss)]
                return format!("{:.1}{name}", b as f64 / unit as f64);
            }
        }
        format!("{b}")
    }
}

/// Prints with the largest unit that divides the size exactly (`512M`, `4G`),
/// or plain bytes; the printed text parses back to the same size.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, name) in [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")] {
            if b != 0 && b.is_multiple_of(unit) {
                return write!(f, "{}{name}", b / unit);
            }
        }
        write!(f, "{b}")
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ByteSize({self})")
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// Parses an unsigned number with an optional binary unit, or a hex number.
fn parse_u64_with_unit(text: &str) -> Result<u64, String> {
    let t = text.trim().replace('_', "");
    if t.is_empty() {
        return Err("empty size; write e.g. \"512M\", \"4G\" or \"0x20000000\"".into());
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| format!("\"{text}\" is not a hex number"));
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!(
            "\"{text}\" is not a size; write e.g. \"512M\", \"4G\" or \"0x20000000\""
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("\"{text}\" is too large"))?;
    let mult = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => KIB,
        "M" | "MB" | "MIB" => MIB,
        "G" | "GB" | "GIB" => GIB,
        "T" | "TB" | "TIB" => TIB,
        _ => {
            return Err(format!(
                "unknown unit \"{unit}\" in \"{text}\"; use K, M, G or T (powers of 1024)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("\"{text}\" does not fit in 64 bits"))
}

/// A physical address, printed in hex.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysAddr(pub u64);

impl PhysAddr {
    /// Parses an address: hex (`0x100000000`) or a size-like form (`4G`).
    pub fn parse(text: &str) -> Result<Self, String> {
        parse_u64_with_unit(text).map(Self)
    }

    /// The address as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhysAddr({:#x})", self.0)
    }
}

impl serde::Serialize for PhysAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A half-open physical memory range `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct MemRange {
    pub start: PhysAddr,
    pub end: PhysAddr,
}

impl MemRange {
    /// The range of `size` bytes at `base`; `None` when it would pass 2^64.
    pub fn new(base: u64, size: u64) -> Option<Self> {
        let end = base.checked_add(size)?;
        Some(Self {
            start: PhysAddr(base),
            end: PhysAddr(end),
        })
    }

    /// Number of bytes in the range.
    pub fn size(&self) -> u64 {
        self.end.0 - self.start.0
    }

    /// True when the two ranges share at least one byte.
    pub fn overlaps(&self, other: &MemRange) -> bool {
        self.start.0 < other.end.0 && other.start.0 < self.end.0
    }

    /// True when `other` lies entirely inside `self`.
    pub fn contains(&self, other: &MemRange) -> bool {
        self.start.0 <= other.start.0 && other.end.0 <= self.end.0
    }
}

impl fmt::Display for MemRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}-{:#x})", self.start.0, self.end.0)
    }
}

impl fmt::Debug for MemRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemRange{self}")
    }
}

/// The id of a spawned kernel instance (1..=511 on the multikernel interface;
/// 0 is the host).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize)]
pub struct InstanceId(pub u32);

impl InstanceId {
    /// The host kernel's id.
    pub const HOST: InstanceId = InstanceId(0);
    /// The highest id the multikernel interface takes (kerf allows 1..511;
    /// `KEXEC_MK_ID` keeps 11 bits of it).
    pub const MAX: u32 = 511;
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    v.checked_add(align - 1).map(|x| x & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpulist_forms() {
        assert_eq!(CpuSet::parse("2-3,6").unwrap().to_string(), "2-3,6");
        assert_eq!(CpuSet::parse(" 6, 2-3 ").unwrap().to_string(), "2-3,6");
        assert_eq!(CpuSet::parse("0,1,2,3").unwrap().to_string(), "0-3");
        assert!(CpuSet::parse("").unwrap().is_empty());
        assert!(CpuSet::parse("3-2").unwrap_err().contains("backwards"));
        assert!(CpuSet::parse("a").unwrap_err().contains("not a CPU number"));
        assert!(CpuSet::parse("1,,2").unwrap_err().contains("empty item"));
        assert!(CpuSet::parse("9000").unwrap_err().contains("limit"));
    }

    #[test]
    fn size_forms() {
        assert_eq!(ByteSize::parse("512M").unwrap().0, 512 * MIB);
        assert_eq!(ByteSize::parse("4G").unwrap().0, 4 * GIB);
        assert_eq!(ByteSize::parse("4GiB").unwrap().0, 4 * GIB);
        assert_eq!(ByteSize::parse("0x1000").unwrap().0, 4096);
        assert_eq!(ByteSize::parse("1_024").unwrap().0, 1024);
        assert!(ByteSize::parse("4Q").unwrap_err().contains("unknown unit"));
        assert!(ByteSize::parse("G").unwrap_err().contains("not a size"));
        assert!(ByteSize::parse("99999999999T")
            .unwrap_err()
            .contains("64 bits"));
        assert_eq!(ByteSize(3 * GIB).to_string(), "3G");
        assert_eq!(ByteSize(1536 * MIB).to_string(), "1536M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert_eq!(ByteSize(180288 * MIB).human(), "176.1G");
        assert_eq!(ByteSize(512 * MIB).human(), "512M");
    }

    proptest! {
        #[test]
        fn cpulist_round_trip(cpus in proptest::collection::btree_set(0u32..=MAX_CPU, 0..200)) {
            let set = CpuSet(cpus);
            let text = set.to_string();
            prop_assert_eq!(CpuSet::parse(&text).unwrap(), set);
        }

        #[test]
        fn cpulist_parse_never_panics(text in "[0-9,\\- ]{0,40}") {
            let _ = CpuSet::parse(&text);
        }

        #[test]
        fn size_round_trip(n in any::<u64>(), shift in 0u32..41) {
            let size = ByteSize(n >> shift << shift);
            prop_assert_eq!(ByteSize::parse(&size.to_string()).unwrap(), size);
        }

        #[test]
        fn size_parse_never_panics(text in "(0x)?[0-9a-fA-F_]{0,25}[KMGTiBkmgt]{0,3}") {
            let _ = ByteSize::parse(&text);
        }
    }
}
