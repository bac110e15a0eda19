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

/// A tiny but valid ELF64 little-endian x86-64 header: what a vmlinux
/// starts with (the kexec tests load it as a kernel).
pub(crate) fn tiny_elf() -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // ELFCLASS64
    h[5] = 1; // little-endian
    h[6] = 1; // EV_CURRENT
    h[16] = 2; // ET_EXEC
    h[18] = 62; // EM_X86_64
    h[20] = 1; // e_version
    h[52] = 64; // e_ehsize
    h[54] = 56; // e_phentsize
    h[58] = 64; // e_shentsize
    h
}
