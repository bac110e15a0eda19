//! The running kernel's build configuration (`CONFIG_*` options), from
//! `/proc/config.gz` or `/boot/config-<release>` under a sysroot: the one
//! reader `mkctl host` and the kexec backend's preflight share.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The options the kexec backend needs built in (`=y`): the multikernel
/// interface and `kexec_file_load`. The one list the kexec preflight and
/// `mkctl doctor` check.
pub const KEXEC_BACKEND_OPTIONS: [&str; 2] = ["CONFIG_MULTIKERNEL", "CONFIG_KEXEC_FILE"];

/// A kernel build configuration: `CONFIG_*` options and where they came
/// from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KconfigFile {
    pub source: PathBuf,
    pub options: BTreeMap<String, String>,
}

impl KconfigFile {
    /// Parses `.config` text (`CONFIG_X=y`, `# CONFIG_X is not set`).
    pub fn parse(source: PathBuf, text: &str) -> Self {
        let options = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| k.starts_with("CONFIG_"))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        Self { source, options }
    }

    /// True when `option` is built in (`=y`).
    pub fn enabled(&self, option: &str) -> bool {
        self.options.get(option).map(String::as_str) == Some("y")
    }
}

/// The running kernel's configuration, from `/proc/config.gz` or
/// `/boot/config-<release>` under `sysroot`; `None` when neither is there.
pub fn read(sysroot: &Path) -> Option<KconfigFile> {
    let gz = sysroot.join("proc/config.gz");
    if let Ok(raw) = std::fs::read(&gz) {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(&raw[..])
            .take(16 << 20)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(KconfigFile::parse(PathBuf::from("/proc/config.gz"), &text));
        }
    }
    let release = std::fs::read_to_string(sysroot.join("proc/sys/kernel/osrelease")).ok()?;
    let rel = format!("boot/config-{}", release.trim());
    let text = std::fs::read_to_string(sysroot.join(&rel)).ok()?;
    Some(KconfigFile::parse(PathBuf::from("/").join(rel), &text))
}
