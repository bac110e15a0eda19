//! The selftest record (`mk.selftest=1`): what a guest writes into the window
//! to prove it mapped it, and what the host-side tests decode.
//!
//! Layout (little endian), from the start of the window:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0x00 | 8 | magic `MKSELFT1` (written last: a reader that sees it sees the rest) |
//! | 0x08 | 4 | layout version, [`VERSION`] |
//! | 0x0c | 4 | instance id (`mk.id`; `u32::MAX` when absent) |
//! | 0x10 | 4 | CPUs online |
//! | 0x14 | 4 | NUMA nodes |
//! | 0x18 | 8 | `MemTotal` in bytes |
//! | 0x20 | 4 | length of the text block |
//! | 0x24 | 28 | zero |
//! | 0x40 | ≤ 4032 | text: `key=value` lines (`name`, `release`, `cpus`, `nodes`, `node<N>.cpus`, `node<N>.mem_kb`, `window`, `window.kind`, `window.phys`, `window.size`, `uptime`) |
//! | 0x1000 | 64 KiB | fill: byte `i` is [`fill_byte`]`(id, i)` |
//! | len − 8 | 8 | tail marker `MKTAIL01` (proves the whole BAR is mapped) |

use std::collections::BTreeMap;

use crate::probe::SystemFacts;
use crate::window::{OutOfBounds, Window, WindowSource};

/// First 8 bytes of a record.
pub const MAGIC: [u8; 8] = *b"MKSELFT1";
/// Last 8 bytes of the window after a selftest.
pub const TAIL: [u8; 8] = *b"MKTAIL01";
/// Layout version.
pub const VERSION: u32 = 1;
/// Offset of the text block.
pub const TEXT_OFFSET: usize = 0x40;
/// Largest text block.
pub const TEXT_MAX: usize = FILL_OFFSET - TEXT_OFFSET;
/// Offset of the fill pattern.
pub const FILL_OFFSET: usize = 0x1000;
/// Length of the fill pattern.
pub const FILL_LEN: usize = 64 << 10;
/// Smallest window a selftest fits in.
pub const MIN_WINDOW: usize = FILL_OFFSET + FILL_LEN + TAIL.len();

/// Byte `i` of the fill pattern of instance `id` (251 is prime, so the
/// pattern does not line up with pages or cache lines).
pub fn fill_byte(id: u32, i: usize) -> u8 {
    ((i % 251) as u8) ^ (id as u8)
}

/// A decoded selftest record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Instance id.
    pub id: u32,
    /// CPUs online.
    pub cpus: u32,
    /// NUMA nodes.
    pub nodes: u32,
    /// `MemTotal` in bytes.
    pub mem_total: u64,
    /// The text block's `key=value` lines.
    pub text: BTreeMap<String, String>,
}

impl Record {
    /// Builds the record a guest writes from what it found.
    pub fn new(
        id: Option<u32>,
        name: Option<&str>,
        facts: &SystemFacts,
        window: &Window,
    ) -> Record {
        let mut text = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            text.insert(k.to_string(), v);
        };
        put("name", name.unwrap_or("").to_string());
        put("release", facts.release.clone());
        put("cpus", facts.cpus_online.clone());
        let ids: Vec<String> = facts.nodes.iter().map(|n| n.id.to_string()).collect();
        put("nodes", ids.join(","));
        for n in &facts.nodes {
            put(&format!("node{}.cpus", n.id), n.cpulist.clone());
            put(&format!("node{}.mem_kb", n.id), n.mem_total_kb.to_string());
        }
        put("window", window.source().to_string());
        let (kind, phys) = match window.source() {
            WindowSource::Ivshmem { phys, .. } => ("ivshmem", *phys),
            WindowSource::DevMem { phys } => ("devmem", *phys),
        };
        put("window.kind", kind.to_string());
        put("window.phys", format!("0x{phys:x}"));
        put("window.size", window.len().to_string());
        if let Some(t) = crate::console::uptime() {
            put("uptime", format!("{t:.3}"));
        }
        Record {
            id: id.unwrap_or(u32::MAX),
            cpus: facts.cpu_count,
            nodes: u32::try_from(facts.nodes.len()).unwrap_or(u32::MAX),
            mem_total: facts.mem_total_kb.saturating_mul(1024),
            text,
        }
    }

    /// Header and text block as bytes (magic included), at most
    /// [`FILL_OFFSET`] long; text that does not fit is cut at a line end.
    pub fn encode(&self) -> Vec<u8> {
        let mut text = String::new();
        for (k, v) in &self.text {
            let line = format!("{k}={v}\n");
            if text.len() + line.len() > TEXT_MAX {
                break;
            }
            text.push_str(&line);
        }
        let mut b = Vec::with_capacity(TEXT_OFFSET + text.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.cpus.to_le_bytes());
        b.extend_from_slice(&self.nodes.to_le_bytes());
        b.extend_from_slice(&self.mem_total.to_le_bytes());
        // TEXT_MAX < 4 GiB: the length fits.
        b.extend_from_slice(&(text.len() as u32).to_le_bytes());
        b.resize(TEXT_OFFSET, 0);
        b.extend_from_slice(text.as_bytes());
        b
    }

    /// Decodes the start of a window; checks magic, version and lengths.
    pub fn decode(window: &[u8]) -> Result<Record, String> {
        let head = window
            .get(..TEXT_OFFSET)
            .ok_or("window shorter than a record header")?;
        if head[..8] != MAGIC {
            return Err(format!(
                "no selftest magic: first bytes {:02x?}",
                &head[..8]
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return Err(format!("layout version {} (expected {VERSION})", u32_at(8)));
        }
        let len = u32_at(0x20) as usize;
        if len > TEXT_MAX {
            return Err(format!("text length {len} exceeds {TEXT_MAX}"));
        }
        let raw = window
            .get(TEXT_OFFSET..TEXT_OFFSET + len)
            .ok_or("window shorter than the text block")?;
        let raw = std::str::from_utf8(raw).map_err(|e| format!("text block: {e}"))?;
        let text = raw
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Record {
            id: u32_at(0x0c),
            cpus: u32_at(0x10),
            nodes: u32_at(0x14),
            mem_total: u64_at(0x18),
            text,
        })
    }
}

/// A window too small for the selftest.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Smaller than [`MIN_WINDOW`].
    #[error("window of {0} bytes is too small for the selftest (needs {MIN_WINDOW})")]
    TooSmall(usize),
    /// An access failed its bounds check (a bug in this module).
    #[error(transparent)]
    Bounds(#[from] OutOfBounds),
}

/// Writes fill, tail, then the record with its magic last.
pub fn write(window: &mut Window, record: &Record) -> Result<(), WriteError> {
    if window.len() < MIN_WINDOW {
        return Err(WriteError::TooSmall(window.len()));
    }
    let fill: Vec<u8> = (0..FILL_LEN).map(|i| fill_byte(record.id, i)).collect();
    window.write_at(FILL_OFFSET, &fill)?;
    window.write_at(window.len() - TAIL.len(), &TAIL)?;
    let bytes = record.encode();
    window.write_at(MAGIC.len(), &bytes[MAGIC.len()..])?;
    window.write_at(0, &MAGIC)?;
    // Device memory needs no write-back; a file-backed window in tests does.
    let _ = window.flush();
    Ok(())
}

/// Checks the fill pattern and tail marker of a whole window image (host side).
pub fn check_fill_and_tail(window: &[u8], id: u32) -> Result<(), String> {
    if window.len() < MIN_WINDOW {
        return Err(format!("window of {} bytes is too small", window.len()));
    }
    let fill = &window[FILL_OFFSET..FILL_OFFSET + FILL_LEN];
    if let Some(i) = (0..FILL_LEN).find(|&i| fill[i] != fill_byte(id, i)) {
        return Err(format!(
            "fill byte at offset 0x{:x} is 0x{:02x}, expected 0x{:02x}",
            FILL_OFFSET + i,
            fill[i],
            fill_byte(id, i)
        ));
    }
    let tail = &window[window.len() - TAIL.len()..];
    if tail != TAIL {
        return Err(format!("tail marker is {tail:02x?}, expected {TAIL:02x?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::NodeFacts;

    fn facts() -> SystemFacts {
        SystemFacts {
            release: "6.1.0-56-cloud-amd64".into(),
            cpus_online: "0-1".into(),
            cpu_count: 2,
            mem_total_kb: 480_000,
            nodes: vec![
                NodeFacts {
                    id: 0,
                    cpulist: "0".into(),
                    mem_total_kb: 230_000,
                },
                NodeFacts {
                    id: 1,
                    cpulist: "1".into(),
                    mem_total_kb: 250_000,
                },
            ],
        }
    }

    fn file_window(t: &tempfile::TempDir) -> (std::path::PathBuf, Window) {
        let mem = t.path().join("mem");
        let size = 256 << 10;
        std::fs::File::create(&mem).unwrap().set_len(size).unwrap();
        let w = Window::open_phys(&mem, mknode::bootargs::PhysWindow { phys: 0, size }).unwrap();
        (mem, w)
    }

    #[test]
    fn record_round_trips() {
        let t = tempfile::tempdir().unwrap();
        let (_, w) = file_window(&t);
        let r = Record::new(Some(3), Some("alpha"), &facts(), &w);
        let mut img = r.encode();
        img.resize(MIN_WINDOW, 0);
        let d = Record::decode(&img).unwrap();
        assert_eq!(d, r);
        assert_eq!(d.id, 3);
        assert_eq!(d.mem_total, 480_000 * 1024);
        assert_eq!(d.text["release"], "6.1.0-56-cloud-amd64");
        assert_eq!(d.text["nodes"], "0,1");
        assert_eq!(d.text["node1.mem_kb"], "250000");
        assert_eq!(d.text["window.kind"], "devmem");
        assert_eq!(d.text["window.phys"], "0x0");
        assert_eq!(d.text["window.size"], "262144");
        assert_eq!(&img[..8], b"MKSELFT1");
    }

    #[test]
    fn decode_refuses_garbage() {
        assert!(Record::decode(&[0u8; 100]).unwrap_err().contains("magic"));
        assert!(Record::decode(b"MKSELFT1").is_err());
        let t = tempfile::tempdir().unwrap();
        let (_, w) = file_window(&t);
        let mut img = Record::new(None, None, &facts(), &w).encode();
        img[0x20..0x24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Record::decode(&img).unwrap_err().contains("text length"));
    }

    #[test]
    fn writes_into_a_window() {
        let t = tempfile::tempdir().unwrap();
        let (mem, mut w) = file_window(&t);
        let r = Record::new(Some(9), Some("beta"), &facts(), &w);
        write(&mut w, &r).unwrap();
        drop(w);
        let img = std::fs::read(&mem).unwrap();
        assert_eq!(Record::decode(&img).unwrap(), r);
        check_fill_and_tail(&img, 9).unwrap();
        assert!(check_fill_and_tail(&img, 8).is_err());
    }
}
