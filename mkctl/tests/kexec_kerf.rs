//! Conformance with the multikernel project's own tool, kerf 0.4.0 (PyPI
//! `kerf-multikernel`), the reference user space of the current interface.
//!
//! kerf runs in a private mount namespace with a tmpfs on `/sys/fs` and
//! another on `/sys/fs/multikernel` (its "mounted" check), and fake
//! `/proc/cpuinfo` (APIC id = 2 × logical CPU), `/proc/iomem` and NUMA
//! cpulists bind-mounted over the real ones, so it believes it runs on a
//! multikernel host; what it writes lands in the tmpfs and is copied out.
//! For the same request, mkctl's trees must equal kerf's node by node, and
//! kerf must accept mkctl's baseline with `init --input`. Where they differ
//! on purpose, the assertion says why.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mkctl::dtb::{self, PoolChange};
use mkctl::kexec::fake::ScriptedKernel;
use mkctl::kexec::request::Images;
use mkctl::kexec::{plan_boot, Generation, KernelIface, PoolState};
use mkctl::topology::{self, Source};

fn fake_host(dir: &Path) {
    let cpuinfo: String = (0..8)
        .map(|i| {
            format!(
                "processor\t: {i}\nvendor_id\t: AuthenticAMD\nphysical id\t: 0\ncore id\t\t: {i}\napicid\t\t: {a}\ninitial apicid\t: {a}\n\n",
                a = 2 * i
            )
        })
        .collect();
    std::fs::write(dir.join("cpuinfo"), cpuinfo).unwrap();
    std::fs::write(
        dir.join("iomem"),
        "00000000-00000fff : Reserved\n00100000-7fffffff : System RAM\n100000000-47fffffff : System RAM\n\
         100000000-2ffffffff : Multikernel Memory Pool\n",
    )
    .unwrap();
    for (n, cpus) in [(0, "0-3"), (1, "4-7")] {
        let d = dir.join(format!("node/node{n}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cpulist"), format!("{cpus}\n")).unwrap();
    }
}

/// Runs `script` (which may use $KERF and $OUT) as kerf's fake host; its
/// output is returned for messages.
fn as_fake_host(out: &Path, script: &str) -> String {
    let setup = format!(
        "set -e
mount -t tmpfs none /sys/fs
mkdir -p /sys/fs/multikernel
mount -t tmpfs none /sys/fs/multikernel
M=/sys/fs/multikernel
mkdir -p $M/overlays/tx_1 $M/instances
: > $M/overlays/new
echo applied > $M/overlays/tx_1/status
mount --bind $OUT/cpuinfo /proc/cpuinfo
mount --bind $OUT/iomem /proc/iomem
mount --bind $OUT/node /sys/devices/system/node
{script}"
    );
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &setup])
        .env("KERF", common::kerf())
        .env("OUT", out)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "kerf's fake host failed:\n{text}");
    text
}

#[test]
fn kerf_writes_what_mkctl_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    fake_host(out);

    // mkctl's side: the recorder fixture (web: CPUs 4-5 = APIC 8,10, 1G on
    // node 1; pool: CPUs 4-7 = APIC 8..14, 8G on node 1).
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kexec/two.toml");
    let text = std::fs::read_to_string(&src).unwrap();
    std::fs::write(out.join("vmlinux"), common::tiny_elf()).unwrap();
    std::fs::write(out.join("initrd.img"), b"x").unwrap();
    let topo_path = out.join("two.toml");
    std::fs::write(&topo_path, &text).unwrap();
    let t = topology::parse(Source::new(&topo_path, text), || None).unwrap();
    let apic: BTreeMap<u32, u32> = (0..8).map(|c| (c, 2 * c)).collect();
    let plan = plan_boot(&t, &["web".into()], &apic, &|i| {
        Ok(Images {
            kernel: match &i.kernel {
                topology::ImageSpec::Path(p) => p.clone(),
                topology::ImageSpec::Auto | topology::ImageSpec::AutoSeries(_) => unreachable!(),
            },
            initrd: None,
        })
    })
    .unwrap();
    let baseline = plan.baseline();
    let create = dtb::create_overlay(&plan.targets[0].create_request());
    std::fs::write(out.join("mkctl-baseline.dtb"), baseline.to_dtb().unwrap()).unwrap();

    // The kernel's read-back of a live pool, from the scripted model after
    // our baseline: what `kerf init --cpus none --memory none` diffs.
    let mut k = ScriptedKernel::new(out, Generation::Current, (0..8).map(|c| 2 * c).collect());
    k.mounted = true;
    let dt = out.join("sys/fs/multikernel/device_tree");
    k.write_file(&dt, &baseline.to_dtb().unwrap()).unwrap();
    let readback = k.read_file(&dt).unwrap();
    std::fs::write(out.join("readback.dtb"), &readback).unwrap();
    let pool = PoolState::from_dtb(&readback).unwrap();
    let release = dtb::pool_overlay(&PoolChange {
        cpu_remove: pool.cpus.clone(),
        memory_remove: pool.chunks.clone(),
        ..Default::default()
    });

    let log = as_fake_host(
        out,
        "$KERF --debug init --cpus 8,10,12,14 --memory 8GB@1
cp $M/device_tree $OUT/kerf-baseline.dtb
$KERF --debug create web --id 1 --cpus 8,10 --memory 1GB --numa-nodes 1
cp $M/overlays/new $OUT/kerf-create.dtb
mkdir $M/instances/web; echo 1 > $M/instances/web/id; echo ready > $M/instances/web/status
$KERF --debug delete web
cp $M/overlays/new $OUT/kerf-remove.dtb
rm -r $M/instances/web $M/device_tree
$KERF --debug init --input $OUT/mkctl-baseline.dtb
cp $M/device_tree $OUT/kerf-replay.dtb
cp $OUT/readback.dtb $M/device_tree
$KERF --debug init --cpus none --memory none
cp $M/overlays/new $OUT/kerf-release.dtb
",
    );
    let kerf = |name: &str| {
        dtb::parse_dtb(&std::fs::read(out.join(name)).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}\n{log}"))
    };

    // Baseline: identical.
    assert_eq!(
        baseline.diff(&kerf("kerf-baseline.dtb")),
        Vec::<String>::new(),
        "{log}"
    );

    // Create: identical but for kerf's `cpu-affinity = "compact"`, its
    // default CPU placement policy, which kerf writes into every overlay;
    // the kernel ignores it (kernel/multikernel/dts.c reads cpus,
    // memory-bytes, numa-nodes, devices and virtio only) and mkctl places
    // CPUs itself from the topology, so it leaves it out.
    assert_eq!(
        create.diff(&kerf("kerf-create.dtb")),
        vec!["/fragment@0/__overlay__/instance-create/resources: property cpu-affinity only in the second tree"],
        "{log}"
    );

    // Remove: identical.
    assert_eq!(
        dtb::remove_overlay("web").diff(&kerf("kerf-remove.dtb")),
        Vec::<String>::new(),
        "{log}"
    );

    // kerf takes our baseline as input and writes the same tree back.
    assert!(
        log.contains("Baseline applied to kernel successfully"),
        "{log}"
    );
    assert_eq!(
        baseline.diff(&kerf("kerf-replay.dtb")),
        Vec::<String>::new(),
        "{log}"
    );

    // Release: kerf's "give the whole pool back" overlay equals ours.
    assert_eq!(
        release.diff(&kerf("kerf-release.dtb")),
        Vec::<String>::new(),
        "{log}"
    );
}
