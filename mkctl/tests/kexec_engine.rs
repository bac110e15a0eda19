//! The kexec backend's sequences against a scripted multikernel kernel:
//! the exact calls of a boot, a stop and a release, and a failure at each
//! step with the rollback that follows (tests for issue 9, items 3-4).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mkctl::dtb;
use mkctl::kexec::engine::Options;
use mkctl::kexec::fake::{FaultAt, ScriptedKernel};
use mkctl::kexec::request::Images;
use mkctl::kexec::{plan_boot, BootPlan, Engine, Errno, Generation, KernelIface};
use mkctl::topology::{self, Source, Topology};

struct Fixture {
    dir: tempfile::TempDir,
    topo: Topology,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kexec/two.toml"),
        )
        .unwrap();
        std::fs::write(dir.path().join("vmlinux"), common::tiny_elf()).unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"070701").unwrap();
        let path = dir.path().join("two.toml");
        std::fs::write(&path, &text).unwrap();
        let topo = topology::parse(Source::new(&path, text), || None)
            .unwrap_or_else(|e| panic!("{}", e.render()));
        Self { dir, topo }
    }

    fn plan(&self, only: &[&str]) -> BootPlan {
        let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
        plan_boot(&self.topo, &only, &apic_map(), &images).unwrap()
    }

    fn sysroot(&self) -> &Path {
        self.dir.path()
    }
}

/// Logical CPU n has APIC id 2n (so a mix-up shows).
fn apic_map() -> BTreeMap<u32, u32> {
    (0..8).map(|c| (c, 2 * c)).collect()
}

fn images(i: &topology::Instance) -> Result<Images, String> {
    let path = |s: &topology::ImageSpec| match s {
        topology::ImageSpec::Path(p) => Some(p.clone()),
        topology::ImageSpec::Auto | topology::ImageSpec::AutoSeries(_) => None,
    };
    Ok(Images {
        kernel: path(&i.kernel).ok_or("kernel = auto in a test")?,
        initrd: path(&i.initrd),
    })
}

fn kernel(root: &Path, g: Generation) -> ScriptedKernel {
    ScriptedKernel::new(root, g, (0..8).map(|c| 2 * c).collect())
}

fn fast() -> Options {
    Options {
        poll_interval: std::time::Duration::from_millis(100),
        start_timeout: std::time::Duration::from_millis(300),
        halt_timeout: std::time::Duration::from_millis(200),
        log_lines: 5,
    }
}

/// Calls as lines with the sysroot cut off.
fn lines(k: &ScriptedKernel, root: &Path) -> Vec<String> {
    let r = root.display().to_string();
    k.call_lines()
        .into_iter()
        .map(|l| l.replace(&r, ""))
        .collect()
}

fn run_boot(
    k: &mut ScriptedKernel,
    root: &Path,
    plan: &BootPlan,
) -> (Result<Generation, mkctl::kexec::StepError>, Vec<String>) {
    let mut log = Vec::new();
    let mut sink = |l: &str| log.push(l.to_string());
    let r = Engine::new(k, root, fast(), &mut sink).boot(plan);
    (r, log)
}

const MK: &str = "/sys/fs/multikernel";

fn expected_boot_prefix() -> Vec<String> {
    vec![
        format!("readdir(\"{MK}\")"),
        format!("mount(\"none\", \"{MK}\", \"multikernel\", 0, NULL)"),
        format!("readdir(\"{MK}\")"),
        format!("read(\"{MK}/device_tree\")"),
    ]
}

#[test]
fn boot_current_exact_sequence() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&[]);
    let mut k = kernel(root, Generation::Current);
    let (r, log) = run_boot(&mut k, root, &plan);
    assert_eq!(r.unwrap(), Generation::Current, "{log:#?}");

    let baseline = plan.baseline().to_dtb().unwrap();
    let web = dtb::create_overlay(&plan.targets[0].create_request())
        .to_dtb()
        .unwrap();
    let db = dtb::create_overlay(&plan.targets[1].create_request())
        .to_dtb()
        .unwrap();
    let vm = fx.dir.path().join("vmlinux");
    let initrd = fx.dir.path().join("initrd.img");
    let vm = vm
        .display()
        .to_string()
        .replace(&root.display().to_string(), "");
    let initrd = initrd
        .display()
        .to_string()
        .replace(&root.display().to_string(), "");
    let mut want = expected_boot_prefix();
    want.extend([
        format!("write(\"{MK}/device_tree\", {} bytes)", baseline.len()),
        format!("write(\"{MK}/overlays/new\", {} bytes)", web.len()),
        format!("readdir(\"{MK}/overlays\")"),
        format!("read(\"{MK}/overlays/tx_2/status\")"),
        format!("write(\"{MK}/overlays/new\", {} bytes)", db.len()),
        format!("readdir(\"{MK}/overlays\")"),
        format!("read(\"{MK}/overlays/tx_3/status\")"),
        "read(\"/proc/iomem\")".to_string(),
        format!("kexec_file_load(kernel_fd=open(\"{vm}\"), initrd_fd=-1, cmdline_len=100, cmdline=\"quiet console=mktty0 mk.name=web mk.id=1 mk.window=0x3ff000000@0x1000000 mk.peers=0:host,1:web,2:db\", flags=0x34 [KEXEC_FILE_NO_INITRAMFS|KEXEC_MULTIKERNEL|KEXEC_MK_ID(1)])"),
        format!("read(\"{MK}/instances/web/status\")"),
        "reboot(0xfee1dead, 672274793, 0x4d4b4c49 [LINUX_REBOOT_CMD_MULTIKERNEL], &{mk_id=1})".to_string(),
        format!("read(\"{MK}/instances/web/status\")"),
        format!("kexec_file_load(kernel_fd=open(\"{vm}\"), initrd_fd=open(\"{initrd}\"), cmdline_len=99, cmdline=\"quiet console=mktty0 mk.name=db mk.id=2 mk.window=0x3ff000000@0x1000000 mk.peers=0:host,1:web,2:db\", flags=0x50 [KEXEC_MULTIKERNEL|KEXEC_MK_ID(2)])"),
        format!("read(\"{MK}/instances/db/status\")"),
        "reboot(0xfee1dead, 672274793, 0x4d4b4c49 [LINUX_REBOOT_CMD_MULTIKERNEL], &{mk_id=2})".to_string(),
        format!("read(\"{MK}/instances/db/status\")"),
    ]);
    assert_eq!(lines(&k, root), want);

    // The bytes written are the trees dtb.rs builds.
    let writes: Vec<&Vec<u8>> = k
        .calls
        .iter()
        .filter_map(|c| match c {
            mkctl::kexec::Call::Write(_, b) => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![&baseline, &web, &db]);
    // The model now holds the pool and two active instances on APIC ids.
    assert_eq!(k.instances["web"].status, "active");
    assert_eq!(k.instances["web"].cpus, vec![8, 10]);
    assert_eq!(k.instances["db"].cpus, vec![12, 14]);
    let pool = k.pool.as_ref().unwrap();
    assert_eq!(
        pool.cpus.iter().copied().collect::<Vec<_>>(),
        vec![8, 10, 12, 14]
    );
    assert_eq!(pool.chunks.len(), 1);
    assert_eq!(pool.chunks[0].size, 8 << 30);
    assert_eq!(pool.chunks[0].numa_node, Some(1));
    // Every step is logged.
    for step in [
        "mount the multikernel filesystem",
        "write the baseline",
        "create instance \"web\"",
        "load the kernel of \"db\"",
        "start \"db\"",
        "wait for \"db\" to be active",
    ] {
        assert!(
            log.iter().any(|l| l == &format!("step: {step}")),
            "{step} not logged: {log:#?}"
        );
    }
}

/// After a boot, stop then release leaves the model as it was before the
/// boot: no instance, no pool, every CPU back with the host, unmounted.
#[test]
fn boot_stop_release_leaves_the_host_as_it_was() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&[]);
    let mut k = kernel(root, Generation::Current);
    let before_cpus = k.host_cpus.clone();
    run_boot(&mut k, root, &plan).0.unwrap();
    k.calls.clear();

    let mut log = Vec::new();
    let mut sink = |l: &str| log.push(l.to_string());
    Engine::new(&mut k, root, fast(), &mut sink)
        .stop(&["web".into()])
        .unwrap();
    let remove = dtb::remove_overlay("web").to_dtb().unwrap();
    assert_eq!(
        lines(&k, root),
        vec![
            format!("readdir(\"{MK}\")"),
            format!("read(\"{MK}/instances/web/id\")"),
            format!("read(\"{MK}/instances/web/status\")"),
            "reboot(0xfee1dead, 672274793, 0x4d4b4c48 [LINUX_REBOOT_CMD_MULTIKERNEL_HALT], &{mk_id=1})".to_string(),
            format!("read(\"{MK}/instances/web/status\")"),
            format!("read(\"{MK}/instances/web/status\")"),
            "kexec_file_load(kernel_fd=-1, initrd_fd=-1, cmdline_len=0, cmdline=NULL, flags=0x31 [KEXEC_FILE_UNLOAD|KEXEC_MULTIKERNEL|KEXEC_MK_ID(1)])".to_string(),
            format!("write(\"{MK}/overlays/new\", {} bytes)", remove.len()),
            format!("readdir(\"{MK}/overlays\")"),
            format!("read(\"{MK}/overlays/tx_4/status\")"),
        ]
    );
    assert!(!k.instances.contains_key("web"));

    // Release refuses while "db" still holds pool resources.
    let mut sink = |_: &str| {};
    let err = Engine::new(&mut k, root, fast(), &mut sink)
        .release(true)
        .unwrap_err();
    assert!(
        err.to_string().contains("still holds instance(s) db"),
        "{err}"
    );
    assert!(k.pool.is_some());

    let mut sink = |_: &str| {};
    Engine::new(&mut k, root, fast(), &mut sink)
        .stop(&["db".into()])
        .unwrap();
    k.calls.clear();
    let mut sink = |_: &str| {};
    Engine::new(&mut k, root, fast(), &mut sink)
        .release(true)
        .unwrap();
    let release = dtb::pool_overlay(&dtb::PoolChange {
        cpu_remove: vec![8, 10, 12, 14],
        memory_remove: vec![dtb::PoolChunk {
            base: 0x1_0000_0000,
            size: 8 << 30,
            numa_node: Some(1),
        }],
        ..Default::default()
    })
    .to_dtb()
    .unwrap();
    assert_eq!(
        lines(&k, root),
        vec![
            format!("readdir(\"{MK}\")"),
            format!("readdir(\"{MK}/instances\")"),
            format!("read(\"{MK}/device_tree\")"),
            format!("read(\"{MK}/device_tree\")"),
            format!("write(\"{MK}/overlays/new\", {} bytes)", release.len()),
            format!("readdir(\"{MK}/overlays\")"),
            format!("read(\"{MK}/overlays/tx_6/status\")"),
            format!("read(\"{MK}/device_tree\")"),
            format!("umount(\"{MK}\")"),
        ]
    );
    assert!(k.pool.is_none());
    assert!(k.instances.is_empty());
    assert_eq!(k.host_cpus, before_cpus);
    assert!(!k.mounted);
}

/// A failure at each boot step: the error names the step and errno, and
/// the rollback undoes every earlier step in reverse, leaving the model
/// as it was.
#[test]
fn failure_at_each_step_rolls_back_in_reverse() {
    struct Case {
        name: &'static str,
        script: fn(&mut ScriptedKernel),
        step: &'static str,
        says: &'static str,
        rollback: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "mount fails",
            script: |k| {
                k.fail(FaultAt::Mount, Errno::ENODEV);
            },
            step: "mount the multikernel filesystem",
            says: "ENODEV",
            rollback: &[],
        },
        Case {
            name: "baseline refused",
            script: |k| {
                k.fail(FaultAt::DeviceTree, Errno::EINVAL);
            },
            step: "write the baseline",
            says: "EINVAL",
            rollback: &[
                "ok: give the pool back to the host",
                "ok: unmount the multikernel filesystem",
            ],
        },
        Case {
            name: "create overlay reads failed",
            script: |k| {
                k.fail_overlay("instance-create");
            },
            step: "create instance \"web\"",
            says: "reads status \"failed\"",
            rollback: &[
                "ok: give the pool back to the host",
                "ok: unmount the multikernel filesystem",
            ],
        },
        Case {
            name: "second create fails",
            script: |k| {
                k.fail_for(
                    FaultAt::OverlayWrite("instance-create"),
                    "db",
                    Errno::ENOMEM,
                );
            },
            step: "create instance \"db\"",
            says: "ENOMEM",
            rollback: &[
                "ok: roll back overlay tx_2",
                "ok: give the pool back to the host",
                "ok: unmount the multikernel filesystem",
            ],
        },
        Case {
            name: "load busy",
            script: |k| {
                k.fail_for(FaultAt::Load, "web", Errno::EBUSY);
            },
            step: "load the kernel of \"web\"",
            says: "EBUSY",
            rollback: &[
                "ok: roll back overlay tx_3",
                "ok: roll back overlay tx_2",
                "ok: give the pool back to the host",
                "ok: unmount the multikernel filesystem",
            ],
        },
        Case {
            name: "load of the second finds no id",
            script: |k| {
                k.fail_for(FaultAt::Load, "db", Errno::ENOENT);
            },
            step: "load the kernel of \"db\"",
            says: "ENOENT",
            rollback: &[
                "ok: force-halt \"web\"",
                "ok: unload the kernel of \"web\"",
                "ok: roll back overlay tx_3",
                "ok: roll back overlay tx_2",
                "ok: give the pool back to the host",
                "ok: unmount the multikernel filesystem",
            ],
        },
        Case {
            name: "start refused",
            script: |k| {
                k.fail_for(FaultAt::Start, "web", Errno::EINVAL);
            },
            step: "start \"web\"",
            says: "EINVAL",
            rollback: &[
                "ok: unload the kernel of \"web\"",
                "ok: roll back overlay tx_3",
                "ok: roll back overlay tx_2",
                "ok: give the pool back to the host",
                "ok: unmount the multikernel filesystem",
            ],
        },
        Case {
            name: "never active",
            script: |k| k.never_active = true,
            step: "wait for \"web\" to be active",
            says: "still reads \"loaded\" after 0.3s, expected \"active\"",
            rollback: &[
                "ok: force-halt \"web\"",
                "ok: unload the kernel of \"web\"",
                "ok: roll back overlay tx_3",
                "ok: roll back overlay tx_2",
                "ok: give the pool back to the host",
                "ok: unmount the multikernel filesystem",
            ],
        },
    ];
    for c in cases {
        let fx = Fixture::new();
        let root = fx.sysroot();
        let plan = fx.plan(&[]);
        let mut k = kernel(root, Generation::Current);
        let host = k.host_cpus.clone();
        (c.script)(&mut k);
        let (r, _) = run_boot(&mut k, root, &plan);
        let e = r.expect_err(c.name);
        assert_eq!(e.step, c.step, "{}: {}", c.name, e.render());
        assert!(e.to_string().contains(c.says), "{}: {}", c.name, e.render());
        assert_eq!(e.rollback, c.rollback, "{}: {}", c.name, e.render());
        assert!(k.instances.is_empty(), "{}: {:?}", c.name, k.instances);
        assert!(k.pool.is_none(), "{}: {:?}", c.name, k.pool);
        assert_eq!(k.host_cpus, host, "{}", c.name);
        assert!(!k.mounted, "{}", c.name);
    }
}

/// The kernel's message comes with the error.
#[test]
fn failure_report_carries_the_kernel_log() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&["web"]);
    let mut k = kernel(root, Generation::Current);
    // Someone else holds CPU 8 (APIC) in an instance already: create fails.
    k.mounted = true;
    let other = dtb::PoolRequest {
        cpus: vec![8, 10, 12, 14],
        memory: vec![dtb::PoolMemory {
            size: 8 << 30,
            numa_node: Some(1),
        }],
    };
    k.write_file(
        &root.join("sys/fs/multikernel/device_tree"),
        &dtb::current_baseline(&other).to_dtb().unwrap(),
    )
    .unwrap();
    let squat = dtb::InstanceRequest {
        name: "squat".into(),
        id: mkctl::units::InstanceId(9),
        cpus: vec![8],
        memory_bytes: 1 << 20,
        numa_node: None,
    };
    k.write_file(
        &root.join("sys/fs/multikernel/overlays/new"),
        &dtb::create_overlay(&squat).to_dtb().unwrap(),
    )
    .unwrap();
    let (r, _) = run_boot(&mut k, root, &plan);
    let e = r.unwrap_err();
    assert_eq!(e.step, "create instance \"web\"");
    assert!(
        e.kernel_log
            .iter()
            .any(|l| l.contains("CPU 8 not available in the pool")),
        "{}",
        e.render()
    );
    let text = e.render();
    assert!(text.contains("kernel log (last lines):"), "{text}");
    // The pool existed before this boot: it is left alone, squat untouched.
    assert!(k.pool.is_some());
    assert!(k.instances.contains_key("squat"));
}

/// A pool that exists already is grown by an overlay with what is missing,
/// and a failure gives back exactly that.
#[test]
fn existing_pool_is_grown_and_shrunk_back() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&["web"]);
    let mut k = kernel(root, Generation::Current);
    k.mounted = true;
    let small = dtb::PoolRequest {
        cpus: vec![8, 10],
        memory: vec![dtb::PoolMemory {
            size: 4 << 30,
            numa_node: Some(1),
        }],
    };
    k.write_file(
        &root.join("sys/fs/multikernel/device_tree"),
        &dtb::current_baseline(&small).to_dtb().unwrap(),
    )
    .unwrap();
    let pool_before = k.pool.clone();
    k.calls.clear();
    k.fail_for(FaultAt::Start, "web", Errno::EIO);
    let (r, _) = run_boot(&mut k, root, &plan);
    let e = r.unwrap_err();
    let grow = dtb::pool_overlay(&dtb::PoolChange {
        cpu_add: vec![12, 14],
        memory_add: vec![dtb::PoolMemory {
            size: 4 << 30,
            numa_node: Some(1),
        }],
        ..Default::default()
    })
    .to_dtb()
    .unwrap();
    assert!(lines(&k, root).contains(&format!(
        "write(\"{MK}/overlays/new\", {} bytes)",
        grow.len()
    )));
    assert_eq!(
        e.rollback,
        vec![
            "ok: unload the kernel of \"web\"",
            "ok: roll back overlay tx_3",
            "ok: take back what was added to the pool"
        ]
    );
    assert_eq!(k.pool, pool_before);
}

#[test]
fn stop_forces_a_halt_nobody_answers() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&["web"]);
    let mut k = kernel(root, Generation::Current);
    run_boot(&mut k, root, &plan).0.unwrap();
    k.halt_unanswered = true;
    k.calls.clear();
    let mut log = Vec::new();
    let mut sink = |l: &str| log.push(l.to_string());
    Engine::new(&mut k, root, fast(), &mut sink)
        .stop(&["web".into()])
        .unwrap();
    let l = lines(&k, root);
    assert!(l.contains(&"reboot(0xfee1dead, 672274793, 0x4d4b4c48 [LINUX_REBOOT_CMD_MULTIKERNEL_HALT], &{mk_id=1})".to_string()));
    assert!(l.contains(&"reboot(0xfee1dead, 672274793, 0x4d4b4c46 [LINUX_REBOOT_CMD_MULTIKERNEL_HALT_FORCE], &{mk_id=1})".to_string()));
    assert!(log.iter().any(|x| x.contains("forcing it")), "{log:#?}");
    assert!(!k.instances.contains_key("web"));
}

#[test]
fn stop_names_a_missing_instance_and_a_busy_remove() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&["web"]);
    let mut k = kernel(root, Generation::Current);
    run_boot(&mut k, root, &plan).0.unwrap();
    let mut sink = |_: &str| {};
    let e = Engine::new(&mut k, root, fast(), &mut sink)
        .stop(&["nope".into()])
        .unwrap_err();
    assert_eq!(e.step, "find instance \"nope\"");
    assert!(e.to_string().contains("no instance \"nope\""));

    k.fail_for(FaultAt::Unload, "web", Errno::EBUSY);
    let mut sink = |_: &str| {};
    let e = Engine::new(&mut k, root, fast(), &mut sink)
        .stop(&["web".into()])
        .unwrap_err();
    assert_eq!(e.step, "unload the kernel of \"web\"");
    assert_eq!(e.errno(), Some(Errno::EBUSY));
}

#[test]
fn boot_v1_writes_one_tree_and_offlines_cpus() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&["web"]);
    let mut k = kernel(root, Generation::V1);
    let (r, log) = run_boot(&mut k, root, &plan);
    assert_eq!(r.unwrap(), Generation::V1, "{log:#?}");
    let v1 = plan.v1_tree.to_dtb().unwrap();
    let vm = fx
        .dir
        .path()
        .join("vmlinux")
        .display()
        .to_string()
        .replace(&root.display().to_string(), "");
    let mut want = expected_boot_prefix();
    want.pop(); // no pool read in v1
    want.extend([
        format!("write(\"{MK}/device_tree\", {} bytes)", v1.len()),
        format!("read(\"{MK}/instances/web/status\")"),
        "write(\"/sys/devices/system/cpu/cpu4/online\", 1 bytes)".to_string(),
        "write(\"/sys/devices/system/cpu/cpu5/online\", 1 bytes)".to_string(),
        format!("kexec_file_load(kernel_fd=open(\"{vm}\"), initrd_fd=-1, cmdline_len=100, cmdline=\"quiet console=mktty0 mk.name=web mk.id=1 mk.window=0x3ff000000@0x1000000 mk.peers=0:host,1:web,2:db\", flags=0x34 [KEXEC_FILE_NO_INITRAMFS|KEXEC_MULTIKERNEL|KEXEC_MK_ID(1)])"),
        format!("read(\"{MK}/instances/web/status\")"),
        "reboot(0xfee1dead, 672274793, 0x4d4b4c49 [LINUX_REBOOT_CMD_MULTIKERNEL], &{mk_id=1})".to_string(),
        format!("read(\"{MK}/instances/web/status\")"),
    ]);
    assert_eq!(lines(&k, root), want);

    // v1 has no halt: stop refuses while active, and says why.
    let mut sink = |_: &str| {};
    let e = Engine::new(&mut k, root, fast(), &mut sink)
        .stop(&["web".into()])
        .unwrap_err();
    assert!(e.to_string().contains("no halt command"), "{e}");
    assert!(e.to_string().contains("no forced halt either"), "{e}");
    assert_eq!(k.instances["web"].status, "active");
}

/// A v1 kernel with the forced halt (ours): stop forces the instance back
/// to `ready` and removes it, and release brings its offlined CPUs back;
/// release refuses while an instance is left.
#[test]
fn v1_stop_forces_the_halt_and_release_onlines_the_cpus() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&["web"]);
    let mut k = kernel(root, Generation::V1);
    k.v1_forced_halt = true;
    run_boot(&mut k, root, &plan).0.unwrap();
    assert_eq!(k.offline.iter().copied().collect::<Vec<_>>(), vec![4, 5]);
    let mut sink = |_: &str| {};
    let e = Engine::new(&mut k, root, fast(), &mut sink)
        .release(false)
        .unwrap_err();
    assert!(e.to_string().contains("still hold their CPUs"), "{e}");
    let mut log = Vec::new();
    let mut logger = |l: &str| log.push(l.to_string());
    Engine::new(&mut k, root, fast(), &mut logger)
        .stop(&["web".into()])
        .unwrap();
    assert!(k.instances.is_empty());
    Engine::new(&mut k, root, fast(), &mut logger)
        .release(false)
        .unwrap();
    assert!(k.offline.is_empty(), "{log:#?}");
    for want in [
        "  ok: force-halt \"web\" (v1)",
        "  ok: remove instance \"web\"",
        "  ok: online CPU 4",
        "  ok: online CPU 5",
    ] {
        assert!(log.iter().any(|l| l == want), "no {want:?} in {log:#?}");
    }
}

#[test]
fn boot_v1_failure_onlines_cpus_and_removes_the_instance() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&["web"]);
    let mut k = kernel(root, Generation::V1);
    k.fail(FaultAt::Start, Errno::EBUSY);
    let e = run_boot(&mut k, root, &plan).0.unwrap_err();
    assert_eq!(
        e.rollback,
        vec![
            "ok: unload the kernel of \"web\"",
            "ok: online CPU 5",
            "ok: online CPU 4",
            "ok: remove instance \"web\"",
            "ok: unmount the multikernel filesystem"
        ]
    );
    assert!(k.offline.is_empty());
    assert!(k.instances.is_empty());
}

#[test]
fn status_reads_only() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&["web"]);
    let mut k = kernel(root, Generation::Current);
    let mut sink = |_: &str| {};
    let s = Engine::new(&mut k, root, fast(), &mut sink)
        .status()
        .unwrap();
    assert_eq!(s.generation, None);
    run_boot(&mut k, root, &plan).0.unwrap();
    k.calls.clear();
    let mut sink = |_: &str| {};
    let s = Engine::new(&mut k, root, fast(), &mut sink)
        .status()
        .unwrap();
    assert_eq!(s.generation, Some(Generation::Current));
    assert_eq!(s.instances.len(), 1);
    assert_eq!(s.instances[0].status.as_deref(), Some("active"));
    assert_eq!(s.instances[0].id, Some(1));
    assert!(s.pool.unwrap().live);
    assert!(k.calls.iter().all(|c| matches!(
        c,
        mkctl::kexec::Call::Read(_) | mkctl::kexec::Call::ReadDir(_)
    )));
}

#[test]
fn dry_run_prints_the_sequence_and_touches_nothing() {
    let fx = Fixture::new();
    let root = fx.sysroot();
    let plan = fx.plan(&[]);
    let fs = mkctl::kexec::probe(root);
    let model = ScriptedKernel::from_probe(root, &fs, (0..8).map(|c| 2 * c).collect());
    let mut dry = mkctl::kexec::dryrun::DryRun::new(model, Vec::new());
    let mut sink = |_: &str| {};
    Engine::new(&mut dry, root, fast(), &mut sink)
        .boot(&plan)
        .unwrap();
    let text = String::from_utf8(dry.into_inner()).unwrap();
    for want in [
        "mount(\"none\"",
        "compatible = \"linux,multikernel-host\";",
        "instance-name = \"web\";",
        "flags=0x34 [KEXEC_FILE_NO_INITRAMFS|KEXEC_MULTIKERNEL|KEXEC_MK_ID(1)]",
        "0x4d4b4c49 [LINUX_REBOOT_CMD_MULTIKERNEL], &{mk_id=2}",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Nothing was created under the sysroot.
    assert!(!root.join("sys").exists());
}

#[test]
fn plan_refuses_what_the_interface_cannot_take() {
    let fx = Fixture::new();
    let mut map = apic_map();
    map.remove(&7);
    let e = plan_boot(&fx.topo, &["db".into(), "ghost".into()], &map, &images).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("no instance \"ghost\""), "{text}");
    assert!(text.contains("CPU 7 has no APIC id"), "{text}");
    let e = plan_boot(&fx.topo, &[], &apic_map(), &|_| {
        Ok(Images {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
        })
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("cannot read /nonexistent/vmlinuz"),
        "{e}"
    );
}
