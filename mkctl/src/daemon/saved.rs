//! The daemon's state as it keeps it in its run directory (`state.json`),
//! written whenever it changes, so that a daemon started later — after a
//! crash, or by `mkctl daemon restart` — adopts the QEMU instances that
//! still run instead of losing them.
//!
//! What is saved is what a new daemon cannot learn from the processes and
//! the window themselves: which topology runs, each instance's QEMU (its pid
//! and start time, which together name one process) or that it is a kexec
//! instance (and where the `/dev/mem` window of those is), its state and
//! the restart policy's count. The window file, the QMP, console and doorbell
//! sockets are in the run directory already; the guests' agents stay
//! attached to the window while no daemon runs.
//!
//! The file is written whole to a temporary name and renamed over the old
//! one, so a daemon killed at any point leaves either version, never half.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::state::{Inst, Registry, State};
use crate::topology::Restart;

/// Bumped when a field changes meaning: a daemon adopts only what it can
/// read.
pub const FORMAT: u32 = 1;

/// The daemon's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub format: u32,
    /// The topology file the instances were booted from.
    pub config: Option<PathBuf>,
    /// The window's endpoint names, as the host agent says them.
    pub names: Vec<(u16, String)>,
    pub instances: Vec<SavedInst>,
    /// The `/dev/mem` window of the kexec instances: base, size.
    #[serde(default)]
    pub kexec_window: Option<(u64, u64)>,
}

/// One instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedInst {
    pub name: String,
    pub id: u16,
    pub cpus: String,
    pub memory: u64,
    pub state: String,
    pub reason: Option<String>,
    /// Its QEMU, while it has one: pid and start time.
    pub qemu: Option<(u32, u64)>,
    pub kernel: Option<String>,
    pub restart: Restart,
    pub restarts: u32,
    pub armed: bool,
    /// A kexec instance (no QEMU: a kernel on the host's own CPUs).
    #[serde(default)]
    pub kexec: bool,
}

/// The state file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a daemon state file", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has format {found}; this mkctl reads format {FORMAT}", path.display())]
    Format { path: PathBuf, found: u32 },
}

impl Saved {
    /// What `reg` holds.
    pub fn of(reg: &Registry) -> Saved {
        Saved {
            format: FORMAT,
            config: reg.config.clone(),
            names: reg.names.clone(),
            instances: reg.instances.values().map(SavedInst::of).collect(),
            kexec_window: reg.kexec_window,
        }
    }

    /// True when some instance runs to adopt: a QEMU, or a kexec
    /// instance that was booting or ready.
    pub fn has_processes(&self) -> bool {
        self.instances.iter().any(|i| {
            i.qemu.is_some()
                || (i.kexec
                    && self.kexec_window.is_some()
                    && matches!(i.state(), State::Ready | State::Booting))
        })
    }

    /// Reads `path`; `Ok(None)` when there is no such file.
    pub fn load(path: &Path) -> Result<Option<Saved>, LoadError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LoadError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        // The format first, so a newer file says so rather than failing
        // on a field this build does not know.
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let parse = |source| LoadError::Parse {
            path: path.into(),
            source,
        };
        let head: Head = serde_json::from_str(&text).map_err(parse)?;
        if head.format != FORMAT {
            return Err(LoadError::Format {
                path: path.into(),
                found: head.format,
            });
        }
        serde_json::from_str(&text).map(Some).map_err(parse)
    }

    /// Writes it to `path` (through a temporary file and a rename).
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.new");
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }
}

impl SavedInst {
    fn of(i: &Inst) -> SavedInst {
        SavedInst {
            name: i.name.clone(),
            id: i.id,
            cpus: i.cpus.to_string(),
            memory: i.memory,
            state: i.state.as_str().into(),
            reason: i.reason.clone(),
            qemu: i.child.as_ref().and_then(|q| Some((q.id(), q.start()?))),
            kernel: i.kernel.clone(),
            restart: i.restart,
            restarts: i.policy.restarts,
            armed: i.policy.armed,
            kexec: i.kexec,
        }
    }

    /// Its saved state; an unknown word reads as `failed`.
    pub fn state(&self) -> State {
        [
            State::Booting,
            State::Ready,
            State::Stopping,
            State::Stopped,
            State::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == self.state)
        .unwrap_or(State::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Saved {
        Saved {
            format: FORMAT,
            config: Some("/etc/mk/demo.toml".into()),
            names: vec![(0, "host".into()), (1, "alpha".into())],
            instances: vec![SavedInst {
                name: "alpha".into(),
                id: 1,
                cpus: "1".into(),
                memory: 256 << 20,
                state: "ready".into(),
                reason: None,
                qemu: Some((4242, 123_456)),
                kernel: Some("6.1.0-28-cloud-amd64".into()),
                restart: Restart::OnFailure { limit: 3 },
                restarts: 1,
                armed: true,
                kexec: false,
            }],
            kexec_window: None,
        }
    }

    #[test]
    fn a_kexec_instance_is_adopted_only_where_its_window_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut s = sample();
        s.instances[0].qemu = None;
        s.instances[0].kexec = true;
        assert!(!s.has_processes(), "no window: nothing to adopt");
        s.kexec_window = Some((0x2f00_0000, 16 << 20));
        s.store(&path).unwrap();
        let back = Saved::load(&path).unwrap().unwrap();
        assert_eq!(back, s);
        assert!(back.has_processes(), "a ready kexec instance runs on");
        s.instances[0].state = "stopped".into();
        assert!(!s.has_processes(), "a stopped one does not");
        // A file from before these fields reads as no kexec at all.
        let mut old = serde_json::to_value(sample()).unwrap();
        old.as_object_mut().unwrap().remove("kexec_window");
        old["instances"][0].as_object_mut().unwrap().remove("kexec");
        old["instances"][0]["qemu"] = serde_json::Value::Null;
        std::fs::write(&path, old.to_string()).unwrap();
        let back = Saved::load(&path).unwrap().unwrap();
        assert!(!back.instances[0].kexec && back.kexec_window.is_none());
        assert!(!back.has_processes());
    }

    #[test]
    fn stored_state_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(Saved::load(&path).unwrap(), None);
        let s = sample();
        s.store(&path).unwrap();
        let back = Saved::load(&path).unwrap().unwrap();
        assert_eq!(back, s);
        assert!(back.has_processes());
        assert_eq!(back.instances[0].state(), State::Ready);
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn a_damaged_or_newer_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "{\"format\": 1, \"config\": ").unwrap();
        let e = Saved::load(&path).unwrap_err().to_string();
        assert!(e.contains("state.json is not a daemon state file"), "{e}");
        let mut newer = serde_json::to_value(sample()).unwrap();
        newer["format"] = 2.into();
        newer["instances"] = "something else".into();
        std::fs::write(&path, newer.to_string()).unwrap();
        let e = Saved::load(&path).unwrap_err().to_string();
        assert!(e.contains("has format 2; this mkctl reads format 1"), "{e}");
    }
}
