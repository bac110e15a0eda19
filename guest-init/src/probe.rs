//! What the running kernel sees of its machine: release, online CPUs, memory,
//! NUMA nodes. Every reader takes a root directory so tests run it against a
//! fake `/proc` + `/sys` tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One NUMA node as `/sys/devices/system/node/node<N>` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// Node number.
    pub id: u32,
    /// Its CPUs (cpulist text, e.g. `0-1`).
    pub cpulist: String,
    /// Its `MemTotal` in KiB.
    pub mem_total_kb: u64,
}

/// A summary of the running kernel and its machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemFacts {
    /// `uname -r`.
    pub release: String,
    /// Online CPUs (cpulist text).
    pub cpus_online: String,
    /// Number of online CPUs.
    pub cpu_count: u32,
    /// `MemTotal` of `/proc/meminfo`, in KiB.
    pub mem_total_kb: u64,
    /// NUMA nodes, by id (empty on a kernel built without NUMA).
    pub nodes: Vec<NodeFacts>,
}

/// A file of `/proc` or `/sys` that could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The file could not be read.
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    /// The file did not hold what was expected.
    #[error("unexpected content in {}: {}", .0.display(), .1)]
    Parse(PathBuf, String),
}

fn read(path: PathBuf) -> Result<(String, PathBuf), ProbeError> {
    match fs::read_to_string(&path) {
        Ok(s) => Ok((s, path)),
        Err(e) => Err(ProbeError::Read(path, e)),
    }
}

/// Collects [`SystemFacts`] under `root` (`/` in the guest).
pub fn gather(root: &Path) -> Result<SystemFacts, ProbeError> {
    let (release, _) = read(root.join("proc/sys/kernel/osrelease"))?;
    let (online, online_path) = read(root.join("sys/devices/system/cpu/online"))?;
    let cpus_online = online.trim().to_string();
    let cpu_count = cpulist_count(&cpus_online)
        .ok_or_else(|| ProbeError::Parse(online_path, format!("not a cpulist: {cpus_online:?}")))?;
    let (meminfo, meminfo_path) = read(root.join("proc/meminfo"))?;
    let mem_total_kb = meminfo_total_kb(&meminfo)
        .ok_or_else(|| ProbeError::Parse(meminfo_path, "no MemTotal line".into()))?;
    Ok(SystemFacts {
        release: release.trim().to_string(),
        cpus_online,
        cpu_count,
        mem_total_kb,
        nodes: nodes(root)?,
    })
}

fn nodes(root: &Path) -> Result<Vec<NodeFacts>, ProbeError> {
    let dir = root.join("sys/devices/system/node");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ProbeError::Read(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ProbeError::Read(dir.clone(), e))?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let (cpulist, _) = read(entry.path().join("cpulist"))?;
        let (meminfo, meminfo_path) = read(entry.path().join("meminfo"))?;
        let mem_total_kb = meminfo_total_kb(&meminfo)
            .ok_or_else(|| ProbeError::Parse(meminfo_path, "no MemTotal line".into()))?;
        out.push(NodeFacts {
            id,
            cpulist: cpulist.trim().to_string(),
            mem_total_kb,
        });
    }
    out.sort_by_key(|n| n.id);
    Ok(out)
}

/// Number of CPUs in a cpulist such as `0-3,8`; `None` if it is malformed.
pub fn cpulist_count(text: &str) -> Option<u32> {
    let text = text.trim();
    if text.is_empty() {
        return Some(0);
    }
    let mut n: u32 = 0;
    for item in text.split(',') {
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?),
            None => {
                let c = item.trim().parse::<u32>().ok()?;
                (c, c)
            }
        };
        n = n.checked_add(hi.checked_sub(lo)?.checked_add(1)?)?;
    }
    Some(n)
}

/// The `MemTotal` value in KiB of a `/proc/meminfo` or a node's `meminfo`
/// (`Node 0 MemTotal:  123 kB`).
pub fn meminfo_total_kb(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (_, rest) = line.split_once("MemTotal:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    #[test]
    fn gathers_from_a_fake_tree() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        put(r, "proc/sys/kernel/osrelease", "6.1.0-56-cloud-amd64\n");
        put(r, "sys/devices/system/cpu/online", "0-1\n");
        put(
            r,
            "proc/meminfo",
            "MemTotal:         480000 kB\nMemFree: 1 kB\n",
        );
        put(r, "sys/devices/system/node/node1/cpulist", "1\n");
        put(
            r,
            "sys/devices/system/node/node1/meminfo",
            "Node 1 MemTotal:       250000 kB\n",
        );
        put(r, "sys/devices/system/node/node0/cpulist", "0\n");
        put(
            r,
            "sys/devices/system/node/node0/meminfo",
            "Node 0 MemTotal:       230000 kB\n",
        );
        put(r, "sys/devices/system/node/online", "0-1\n");
        let f = gather(r).unwrap();
        assert_eq!(f.release, "6.1.0-56-cloud-amd64");
        assert_eq!(f.cpu_count, 2);
        assert_eq!(f.mem_total_kb, 480000);
        assert_eq!(f.nodes.len(), 2);
        assert_eq!(f.nodes[0].id, 0);
        assert_eq!(f.nodes[1].mem_total_kb, 250000);
        assert_eq!(f.nodes[1].cpulist, "1");
    }

    #[test]
    fn reports_which_file_is_missing() {
        let t = tempfile::tempdir().unwrap();
        let e = gather(t.path()).unwrap_err();
        assert!(e.to_string().contains("osrelease"), "{e}");
    }

    #[test]
    fn counts_cpulists() {
        assert_eq!(cpulist_count("0-3,8,10-11"), Some(7));
        assert_eq!(cpulist_count(""), Some(0));
        assert_eq!(cpulist_count("3-1"), None);
        assert_eq!(cpulist_count("a"), None);
    }
}
