//! Shared pieces of mkctl's integration tests: paths into the repository
//! and finding the external tools the tests drive (dtc, kerf).
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("mkctl/ has a parent")
        .to_path_buf()
}

/// A shipped example topology.
pub(crate) fn config(name: &str) -> PathBuf {
    repo().join("configs").join(format!("{name}.toml"))
}

/// The cache directory the setup scripts fill.
pub(crate) fn cache() -> PathBuf {
    std::env::var_os("MKCTL_CACHE").map_or_else(|| repo().join(".cache"), PathBuf::from)
}

/// A program the tests need; fails loudly (never skips) when it is missing,
/// naming the setup step that installs it.
pub(crate) fn require_tool(candidates: &[PathBuf], what: &str) -> PathBuf {
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{what} is missing (looked at {candidates:?}); run scripts/setup.sh, which installs it"
            )
        })
}

/// `dtc` from the device-tree-compiler package.
pub(crate) fn dtc() -> PathBuf {
    require_tool(
        &[
            PathBuf::from("/usr/bin/dtc"),
            PathBuf::from("/usr/local/bin/dtc"),
        ],
        "dtc (Debian package device-tree-compiler)",
    )
}

/// The `kerf` CLI (PyPI kerf-multikernel 0.4.0) in the venv setup makes.
pub(crate) fn kerf() -> PathBuf {
    let mut c = vec![cache().join("kerf-venv/bin/kerf")];
    if let Some(p) = std::env::var_os("MKCTL_KERF") {
        c.insert(0, PathBuf::from(p));
    }
    require_tool(&c, "kerf (PyPI kerf-multikernel 0.4.0)")
}
