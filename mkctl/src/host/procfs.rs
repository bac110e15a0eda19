//! Parsers for the `/proc` files host discovery reads: `iomem`, `meminfo`
//! (and the per-node `meminfo` of sysfs, same format), `cpuinfo`, `mounts`,
//! `filesystems` and kernel config text.
//!
//! Each takes the file's text and returns values plus warnings; reading the
//! files is the caller's job, so every parser is tested on strings.

use std::collections::BTreeMap;

use crate::units::MemRange;

/// One line of `/proc/iomem`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IomemEntry {
    /// Nesting level: 0 for top-level lines (two spaces per level).
    pub depth: usize,
    pub range: MemRange,
    pub name: String,
}

/// `/proc/iomem`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Iomem {
    pub entries: Vec<IomemEntry>,
    /// Every address read as 0: the file was read without `CAP_SYS_ADMIN`
    /// and the kernel hid the addresses.
    pub addresses_hidden: bool,
}

impl Iomem {
    /// Parses `/proc/iomem`. Lines are `start-end : name`, `end` inclusive,
    /// hex without `0x`, indented two spaces per nesting level.
    pub fn parse(text: &str, warnings: &mut Vec<String>) -> Self {
        let mut entries = Vec::new();
        let mut bad = 0usize;
        for line in text.lines() {
            if line.trim().is_empty() {
                continue;
            }
            let indent = line.len() - line.trim_start_matches(' ').len();
            match parse_iomem_line(line.trim()) {
                Some((range, name)) => entries.push(IomemEntry {
                    depth: indent / 2,
                    range,
                    name,
                }),
                None => bad += 1,
            }
        }
        if bad > 0 {
            warnings.push(format!(
                "/proc/iomem: {bad} line(s) not of the form \"start-end : name\"; skipped"
            ));
        }
        let addresses_hidden = !entries.is_empty()
            && entries
                .iter()
                .all(|e| e.range.start.0 == 0 && e.range.end.0 <= 1);
        Iomem {
            entries,
            addresses_hidden,
        }
    }

    /// The top-level `System RAM` ranges, in file order.
    pub fn system_ram(&self) -> Vec<MemRange> {
        if self.addresses_hidden {
            return Vec::new();
        }
        self.entries
            .iter()
            .filter(|e| e.depth == 0 && e.name == "System RAM")
            .map(|e| e.range)
            .collect()
    }
}

fn parse_iomem_line(line: &str) -> Option<(MemRange, String)> {
    let (range, name) = line.split_once(" : ")?;
    let (start, end) = range.trim().split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if end < start {
        return None;
    }
    // `end` is inclusive; a range that ends at the last byte of the address
    // space cannot be written half-open in 64 bits, so it loses that byte.
    let range = (end - start)
        .checked_add(1)
        .and_then(|size| MemRange::new(start, size))
        .unwrap_or(MemRange {
            start: crate::units::PhysAddr(start),
            end: crate::units::PhysAddr(u64::MAX),
        });
    Some((range, name.trim().to_string()))
}

/// Parses `meminfo` text into `key -> bytes`. Values in `kB` are converted
/// to bytes; plain counts (`HugePages_Total: 0`) are kept as they are. The
/// per-node form (`Node 0 MemTotal:  5335244 kB`) loses its `Node N` prefix.
pub fn parse_meminfo(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        let key = match key.strip_prefix("Node ") {
            Some(rest) => rest.split_once(' ').map_or(rest, |(_, k)| k.trim_start()),
            None => key,
        };
        let mut parts = value.split_whitespace();
        let Some(Ok(n)) = parts.next().map(str::parse::<u64>) else {
            continue;
        };
        let v = match parts.next() {
            Some("kB") => n.checked_mul(1024),
            None => Some(n),
            Some(_) => None,
        };
        if let Some(v) = v {
            out.insert(key.to_string(), v);
        }
    }
    out
}

/// Logical CPU -> APIC id from `/proc/cpuinfo` (`processor` and `apicid`
/// of each block). Empty on architectures without `apicid`.
pub fn parse_cpuinfo_apic_ids(text: &str, warnings: &mut Vec<String>) -> BTreeMap<u32, u32> {
    let mut map = BTreeMap::new();
    let mut cpu: Option<u32> = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "processor" => {
                cpu = value.parse().ok();
                if cpu.is_none() {
                    warnings.push(format!(
                        "/proc/cpuinfo: \"processor : {value}\" is not a CPU number"
                    ));
                }
            }
            "apicid" => match (cpu, value.parse::<u32>()) {
                (Some(c), Ok(a)) => {
                    map.insert(c, a);
                }
                (Some(c), Err(_)) => warnings.push(format!(
                    "/proc/cpuinfo: CPU {c} has apicid \"{value}\", not a number"
                )),
                (None, _) => {}
            },
            _ => {}
        }
    }
    map
}

/// The filesystem type mounted at `mount_point` per `/proc/mounts` (the
/// last mount wins, as it hides the earlier ones).
pub fn mounted_fstype(mounts: &str, mount_point: &str) -> Option<String> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let _device = f.next()?;
            let target = f.next()?;
            let fstype = f.next()?;
            // /proc/mounts escapes spaces and such as \040; the paths we look
            // for have none, so a plain comparison is enough.
            (target.trim_end_matches('/') == mount_point.trim_end_matches('/'))
                .then(|| fstype.to_string())
        })
        .next_back()
}

/// True when `/proc/filesystems` lists `fstype` (the kernel can mount it).
pub fn lists_filesystem(filesystems: &str, fstype: &str) -> bool {
    filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fstype))
}

/// The value of option `name` (`CONFIG_...`) in kernel config text: `"y"`,
/// `"m"`, or a string or number as written; `"n"` for `# CONFIG_X is not
/// set` and for an option the file does not mention.
pub fn config_value(text: &str, name: &str) -> String {
    let set = format!("{name}=");
    let unset = format!("# {name} is not set");
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix(&set) {
            return v.trim_matches('"').to_string();
        }
        if line == unset {
            return "n".into();
        }
    }
    "n".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::PhysAddr;

    const IOMEM: &str = "\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-bfffffff : System RAM
  01000000-0220bb07 : Kernel code
  3f000000-3fffffff : Crash kernel
fec00000-fec003ff : IOAPIC 0
100000000-63fffffff : System RAM
4000000000-7fffffffff : PCI Bus 0000:00
  4000000000-400007ffff : 0000:00:01.0
    4000000000-400007ffff : virtio-pci-modern
";

    #[test]
    fn iomem_levels_and_ram() {
        let mut w = Vec::new();
        let io = Iomem::parse(IOMEM, &mut w);
        assert!(w.is_empty());
        assert!(!io.addresses_hidden);
        assert_eq!(io.entries.len(), 12);
        assert_eq!(io.entries[11].depth, 2);
        assert_eq!(io.entries[6].name, "Crash kernel");
        assert_eq!(io.entries[6].depth, 1);
        assert_eq!(
            io.system_ram(),
            [
                MemRange::new(0x1000, 0x9ec00).unwrap(),
                MemRange::new(0x10_0000, 0xbff0_0000).unwrap(),
                MemRange::new(0x1_0000_0000, 0x5_4000_0000).unwrap(),
            ]
        );
    }

    #[test]
    fn iomem_hidden_and_malformed() {
        let mut w = Vec::new();
        let io = Iomem::parse(
            "00000000-00000000 : Reserved\n00000000-00000000 : System RAM\n  00000000-00000000 : Kernel code\n",
            &mut w,
        );
        assert!(io.addresses_hidden);
        assert!(io.system_ram().is_empty());
        let io = Iomem::parse(
            "zz-1 : x\n10-5 : backwards\nno colon\n0-ffffffffffffffff : all\n",
            &mut w,
        );
        assert_eq!(io.entries.len(), 1);
        assert_eq!(io.entries[0].range.end, PhysAddr(u64::MAX));
        assert!(w[0].contains("3 line(s)"), "{w:?}");
        assert!(!Iomem::parse("", &mut w).addresses_hidden);
    }

    #[test]
    fn meminfo_global_and_node() {
        let m = parse_meminfo(
            "MemTotal:       24684084 kB\nHugePages_Total:       0\nbad line\nX: y kB\n",
        );
        assert_eq!(m["MemTotal"], 24_684_084 * 1024);
        assert_eq!(m["HugePages_Total"], 0);
        assert_eq!(m.len(), 2);
        let n = parse_meminfo("Node 1 MemTotal:        5335244 kB\nNode 1 MemFree: 1 kB\n");
        assert_eq!(n["MemTotal"], 5_335_244 * 1024);
        assert_eq!(n["MemFree"], 1024);
        assert!(parse_meminfo("MemTotal: 99999999999999999999 kB").is_empty());
    }

    #[test]
    fn cpuinfo_apic_ids() {
        let mut w = Vec::new();
        let m = parse_cpuinfo_apic_ids(
            "processor\t: 0\napicid\t\t: 0\ninitial apicid\t: 0\n\nprocessor\t: 1\napicid\t\t: 2\n\nprocessor : x\napicid : 4\nprocessor : 3\napicid : ?\n",
            &mut w,
        );
        assert_eq!(m, BTreeMap::from([(0, 0), (1, 2)]));
        assert_eq!(w.len(), 2, "{w:?}");
        let m = parse_cpuinfo_apic_ids("processor : 0\nBogoMIPS : 50.00\n", &mut w);
        assert!(m.is_empty());
    }

    #[test]
    fn mounts_and_filesystems() {
        let mounts = "sysfs /sys sysfs rw 0 0\nnone /sys/fs/multikernel multikernel rw 0 0\n";
        assert_eq!(
            mounted_fstype(mounts, "/sys/fs/multikernel").as_deref(),
            Some("multikernel")
        );
        assert_eq!(mounted_fstype(mounts, "/sys/fs"), None);
        assert_eq!(mounted_fstype("garbage\n", "/x"), None);
        assert!(lists_filesystem(
            "nodev\tsysfs\n\text4\nnodev\tmultikernel\n",
            "multikernel"
        ));
        assert!(!lists_filesystem("nodev\tsysfs\n", "multikernel"));
    }

    #[test]
    fn config_values() {
        let c =
            "CONFIG_KEXEC_FILE=y\n# CONFIG_MULTIKERNEL is not set\nCONFIG_LOCALVERSION=\"-mk\"\n";
        assert_eq!(config_value(c, "CONFIG_KEXEC_FILE"), "y");
        assert_eq!(config_value(c, "CONFIG_MULTIKERNEL"), "n");
        assert_eq!(config_value(c, "CONFIG_LOCALVERSION"), "-mk");
        assert_eq!(config_value(c, "CONFIG_ABSENT"), "n");
    }
}
