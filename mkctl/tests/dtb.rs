//! The device tree mkctl compiles, decoded by the reference tools: `dtc`
//! must read it back with the nodes and values of the topology, and the
//! multikernel project's own `kerf` is fed it to pin down where the two
//! interface generations differ.

mod common;

use std::process::Command;

use assert_cmd::cargo::cargo_bin_cmd;

fn compile(config: &str, extra: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.dtb");
    cargo_bin_cmd!("mkctl")
        .arg("dtb")
        .arg(common::config(config))
        .arg("-o")
        .arg(&out)
        .args(extra)
        .assert()
        .success();
    (dir, out)
}

fn decompile(dtb: &std::path::Path) -> String {
    let out = Command::new(common::dtc())
        .args(["-I", "dtb", "-O", "dts"])
        .arg(dtb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dtc rejected our blob: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The body of node `name` in dtc's output (from its line to its `};`).
fn node<'a>(dts: &'a str, name: &str) -> &'a str {
    let start = dts
        .find(&format!("\t{name} {{"))
        .unwrap_or_else(|| panic!("no node {name} in:\n{dts}"));
    let end = dts[start..].find("};").unwrap() + start;
    &dts[start..end]
}

#[test]
fn dtc_reads_back_every_instance() {
    let (_d, dtb) = compile("large", &[]);
    let dts = decompile(&dtb);
    assert!(dts.contains("compatible = \"multikernel-v1\";"), "{dts}");
    assert!(dts.contains("instances {"));
    // dtc prints u64 properties as pairs of u32 cells.
    let db = node(&dts, "db");
    assert!(db.contains("id = <0x02>;"), "{db}");
    let res = node(&dts, "resources");
    assert!(
        res.contains("cpus = <0x04 0x05 0x06 0x07 0x08 0x09 0x0a 0x0b 0x0c 0x0d 0x0e 0x0f>;"),
        "{res}"
    );
    // 24G for edge; no memory-base because mkctl placed it.
    assert!(res.contains("memory-bytes = <0x06 0x00>;"), "{res}");
    assert!(!res.contains("memory-base"));
    // db pins its base in the file: 64G = 0x10_0000_0000.
    let db_full = &dts[dts.find("\tdb {").unwrap()..];
    let db_res = node(db_full, "resources");
    assert!(db_res.contains("memory-base = <0x10 0x00>;"), "{db_res}");
    assert!(db_res.contains("memory-bytes = <0x0c 0x00>;"), "{db_res}");
    for name in ["edge", "db", "web", "cache", "batch"] {
        node(&dts, name);
    }
}

#[test]
fn one_instance_only() {
    let (_d, dtb) = compile("demo", &["--instance", "beta"]);
    let dts = decompile(&dtb);
    assert!(dts.contains("beta {"));
    assert!(!dts.contains("alpha {"), "{dts}");
    assert!(node(&dts, "resources").contains("cpus = <0x02 0x03>;"));
}

#[test]
fn dts_output_is_what_dtc_compiles_to_the_same_blob() {
    let (dir, dtb) = compile("demo", &[]);
    let dts_path = dir.path().join("ours.dts");
    let out = cargo_bin_cmd!("mkctl")
        .args(["dtb", "--dts"])
        .arg(common::config("demo"))
        .output()
        .unwrap();
    std::fs::write(&dts_path, &out.stdout).unwrap();
    let recompiled = dir.path().join("re.dtb");
    let st = Command::new(common::dtc())
        .args(["-I", "dts", "-O", "dtb", "-o"])
        .arg(&recompiled)
        .arg(&dts_path)
        .status()
        .unwrap();
    assert!(st.success());
    // Same tree: both decompile to the same text.
    assert_eq!(decompile(&dtb), decompile(&recompiled));
}

/// kerf 0.4.0 speaks the current interface generation (a host baseline with
/// `/resources { cpus (APIC ids, u64); memory@N { size; numa-node-id } }`
/// and one overlay per instance). Our v1 blob has no `/resources` and puts
/// instances in the tree, so kerf must refuse it, and say why; the README
/// ("Device tree: v1 and kerf") explains the difference. kerf needs
/// /sys/fs/multikernel mounted: a tmpfs there, in a private mount
/// namespace, satisfies its check without touching the host.
#[test]
fn kerf_refuses_v1_and_names_the_difference() {
    let (_d, dtb) = compile("demo", &[]);
    let script = format!(
        "set -e; mount -t tmpfs none /sys/fs; mkdir -p /sys/fs/multikernel; \
         mount -t tmpfs none /sys/fs/multikernel; exec {} init --input {} --dry-run",
        common::kerf().display(),
        dtb.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "kerf: {stderr}");
    assert!(
        stderr.contains("Missing /resources node"),
        "kerf said: {stderr}"
    );
}
