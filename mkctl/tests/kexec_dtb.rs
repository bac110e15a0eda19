//! The current generation's device trees: decoded by dtc node by node, read
//! back by our own parser, and the parser's behaviour on hostile blobs.

mod common;

use std::process::Command;

use mkctl::dtb::{
    self, DtNode, DtValue, InstanceRequest, PoolChange, PoolChunk, PoolMemory, PoolRequest,
};
use mkctl::units::InstanceId;
use proptest::prelude::*;

fn dtc_dts(blob: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.dtb");
    std::fs::write(&p, blob).unwrap();
    let out = Command::new(common::dtc())
        .args(["-I", "dtb", "-O", "dts"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dtc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pool() -> PoolRequest {
    PoolRequest {
        cpus: vec![8, 10, 12, 14],
        memory: vec![
            PoolMemory {
                size: 4 << 30,
                numa_node: Some(0),
            },
            PoolMemory {
                size: 8 << 30,
                numa_node: Some(1),
            },
        ],
    }
}

fn web() -> InstanceRequest {
    InstanceRequest {
        name: "web".into(),
        id: InstanceId(3),
        cpus: vec![8, 10],
        memory_bytes: 1 << 30,
        numa_node: Some(1),
    }
}

#[test]
fn baseline_as_dtc_reads_it() {
    let dts = dtc_dts(&dtb::current_baseline(&pool()).to_dtb().unwrap());
    for want in [
        "compatible = \"linux,multikernel-host\";",
        "cpus = <0x00 0x08 0x00 0x0a 0x00 0x0c 0x00 0x0e>;",
        "memory@0 {",
        "size = <0x01 0x00>;",
        "numa-node-id = <0x00>;",
        "memory@1 {",
        "size = <0x02 0x00>;",
        "numa-node-id = <0x01>;",
    ] {
        assert!(dts.contains(want), "missing {want:?} in\n{dts}");
    }
    assert!(!dts.contains("instances"), "{dts}");
}

#[test]
fn create_and_remove_overlays_as_dtc_reads_them() {
    let blob = dtb::create_overlay(&web()).to_dtb().unwrap();
    assert!(blob.len() < dtb::MAX_OVERLAY_BYTES);
    let dts = dtc_dts(&blob);
    for want in [
        "compatible = \"linux,multikernel-overlay\";",
        "fragment@0 {",
        "target-path = \"/instances\";",
        "__overlay__ {",
        "instance-create {",
        "instance-name = \"web\";",
        "id = <0x03>;",
        "cpus = <0x00 0x08 0x00 0x0a>;",
        "memory-bytes = <0x00 0x40000000>;",
        "numa-nodes = <0x01>;",
    ] {
        assert!(dts.contains(want), "missing {want:?} in\n{dts}");
    }
    let dts = dtc_dts(&dtb::remove_overlay("web").to_dtb().unwrap());
    assert!(
        dts.contains("instance-remove {") && dts.contains("instance-name = \"web\";"),
        "{dts}"
    );
}

#[test]
fn pool_overlay_as_dtc_reads_it() {
    let change = PoolChange {
        cpu_add: vec![16],
        cpu_remove: vec![8],
        memory_add: vec![PoolMemory {
            size: 1 << 30,
            numa_node: None,
        }],
        memory_remove: vec![PoolChunk {
            base: 0x1_0000_0000,
            size: 1 << 30,
            numa_node: Some(0),
        }],
    };
    let dts = dtc_dts(&dtb::pool_overlay(&change).to_dtb().unwrap());
    for want in [
        "target-path = \"/resources\";",
        "memory-remove {",
        "reg = <0x01 0x00 0x00 0x40000000>;",
        "memory-add {",
        "cpu-remove {",
        "cpu@8 {",
        "reg = <0x00 0x08>;",
        "cpu-add {",
        "cpu@16 {",
    ] {
        assert!(dts.contains(want), "missing {want:?} in\n{dts}");
    }
}

/// Our DTS text compiles (dtc) to a blob our parser reads back to the
/// same tree, and our blob parses back to the tree we built.
#[test]
fn round_trips() {
    for tree in [
        dtb::current_baseline(&pool()),
        dtb::create_overlay(&web()),
        dtb::remove_overlay("web"),
    ] {
        let blob = tree.to_dtb().unwrap();
        let back = dtb::parse_dtb(&blob).unwrap();
        assert_eq!(back, tree.canonical());
        assert!(tree.diff(&back).is_empty());

        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("t.dts");
        let out = dir.path().join("t.dtb");
        std::fs::write(&src, tree.to_dts()).unwrap();
        let st = Command::new(common::dtc())
            .args(["-I", "dts", "-O", "dtb", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success(), "dtc rejected:\n{}", tree.to_dts());
        let via_dtc = dtb::parse_dtb(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(via_dtc.diff(&tree), Vec::<String>::new());
    }
}

#[test]
fn diff_names_each_difference() {
    let a = DtNode::new("").child(DtNode::new("r").prop("x", DtValue::U32(vec![1])));
    let b = DtNode::new("")
        .child(
            DtNode::new("r")
                .prop("x", DtValue::U32(vec![2]))
                .prop("y", DtValue::U32(vec![0])),
        )
        .child(DtNode::new("s"));
    assert_eq!(
        a.diff(&b),
        vec![
            "/r: x: [00 00 00 01] != [00 00 00 02]",
            "/r: property y only in the second tree",
            "/s: node only in the second tree",
        ]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = dtb::parse_dtb(&data);
    }

    #[test]
    fn corrupted_blobs_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut blob = dtb::create_overlay(&web()).to_dtb().unwrap();
        for (at, v) in flips {
            let i = at.index(blob.len());
            blob[i] ^= v;
        }
        let _ = dtb::parse_dtb(&blob);
    }
}
