//! Host discovery against fake `/sys` + `/proc` trees (tests/fixtures/sysroot,
//! one directory per machine shape; see its README) and once against this
//! machine. Variants of a shape are made by copying it to a temp dir and
//! changing files there.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use mkctl::host::{
    CrashSpec, Generation, HostError, HostInfo, KexecVerdict, MemmapKind, Reservation,
    ReservationKind,
};
use mkctl::units::{ByteSize, CpuSet, MemRange, PhysAddr, GIB};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysroot")
        .join(name)
}

fn discover(name: &str) -> HostInfo {
    HostInfo::discover(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e:?}"))
}

/// A writable copy of a fixture (symlinks kept as symlinks).
fn scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture(name), dir.path());
    dir
}

fn copy_tree(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        let ty = e.file_type().unwrap();
        if ty.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path()).unwrap(), &to).unwrap();
        } else if ty.is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn r(start: u64, size: u64) -> MemRange {
    MemRange::new(start, size).unwrap()
}

fn cpus(s: &str) -> CpuSet {
    CpuSet::parse(s).unwrap()
}

fn has_warning(h: &HostInfo, needle: &str) -> bool {
    h.warnings.iter().any(|w| w.contains(needle))
}

#[test]
fn one_node_like_this_machine() {
    let h = discover("one-node");
    assert_eq!(h.kernel_release.as_deref(), Some("6.18.44-fc-v669"));
    assert_eq!(h.cpus.online, cpus("0-1"));
    assert_eq!(h.cpus.possible, cpus("0-1"));
    assert!(h.cpus.offline.is_empty());
    assert_eq!(h.mem_total, ByteSize(24_684_084 * 1024));
    assert_eq!(
        h.ram,
        [
            r(0x1000, 0x9ec00),
            r(0x10_0000, 0xbff0_0000),
            r(0x1_0000_0000, 0x5_4000_0000)
        ]
    );
    assert_eq!(h.nodes.len(), 1);
    let n = &h.nodes[0];
    assert_eq!((n.id, &n.cpus), (0, &cpus("0-1")));
    assert_eq!(n.memory, [r(0, 3 * GIB), r(4 * GIB, 21 * GIB)]);
    assert_eq!(n.mem_total, Some(ByteSize(5_335_244 * 1024)));
    assert_eq!(h.apic_ids, BTreeMap::from([(0, 0), (1, 1)]));
    // Firmware holes are reported, nothing else is reserved.
    let kinds: Vec<_> = h.reserved.iter().map(|r| (r.range, r.kind)).collect();
    assert_eq!(
        kinds,
        [
            (r(0, 0x1000), ReservationKind::Reserved),
            (r(0x9fc00, 0x60400), ReservationKind::Reserved),
            (r(0xeec0_0000, 0x1000_0000), ReservationKind::Reserved),
        ]
    );
    assert!(h.free_pool_candidates().is_empty());
    // Everything after `--` belongs to init, not to the kernel.
    assert!(
        h.cmdline.raw.ends_with("rdinit=/process_api"),
        "{}",
        h.cmdline.raw
    );
    assert!(!h.multikernel.present);
    assert_eq!(h.multikernel.fs_registered, Some(false));
    // /proc/config.gz is read (gzip): the option is off, KEXEC_FILE on.
    assert_eq!(h.kernel_config.multikernel.to_string(), "n");
    assert_eq!(h.kernel_config.kexec_file.to_string(), "y");
    assert_eq!(
        h.kernel_config.source.as_deref(),
        Some(std::path::Path::new("/proc/config.gz"))
    );
    assert_eq!(
        h.kexec,
        KexecVerdict::Unavailable {
            missing: vec!["no /sys/fs/multikernel: this kernel lacks CONFIG_MULTIKERNEL".into()]
        }
    );
    assert!(h.warnings.is_empty(), "{:#?}", h.warnings);
    let text = h.render();
    for want in [
        "cpus      online 0-1 (2 of 2 present), offline -, possible 0-1",
        "apic ids  cpu 0-1 -> apic 0-1",
        "node 0   cpus 0-1          memory 24G [0x0-0xc0000000) [0x100000000-0x640000000)",
        "/sys/fs/multikernel: absent",
        "kexec backend: unavailable: no /sys/fs/multikernel: this kernel lacks \
         CONFIG_MULTIKERNEL; use backend = \"qemu\"",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

#[test]
fn two_nodes_offline_cpu_and_memory_block() {
    let h = discover("two-nodes");
    assert_eq!(h.cpus.present, cpus("0-7"));
    assert_eq!(h.cpus.online, cpus("0-2,4-7"));
    assert_eq!(h.cpus.offline, cpus("3"));
    assert_eq!(h.nodes.len(), 2);
    assert_eq!(h.nodes[0].cpus, cpus("0-3"));
    assert_eq!(h.nodes[0].memory, [r(0, 2 * GIB), r(4 * GIB, 2 * GIB)]);
    assert!(h.nodes[0].offline_memory.is_empty());
    assert_eq!(h.nodes[0].mem_total, Some(ByteSize(4_000_000 * 1024)));
    assert_eq!(h.nodes[1].cpus, cpus("4-7"));
    assert_eq!(h.nodes[1].memory, [r(6 * GIB, 4 * GIB)]);
    assert_eq!(h.nodes[1].offline_memory, [r(9 * GIB, GIB)]);
    assert_eq!(h.node_cpus(), cpus("0-7"));
    // APIC ids step by two; the offline CPU is not in /proc/cpuinfo.
    assert_eq!(
        h.apic_ids,
        BTreeMap::from([(0, 0), (1, 2), (2, 4), (4, 8), (5, 10), (6, 12), (7, 14)])
    );
    assert!(has_warning(&h, "CPU(s) 3 offline"));
    assert_eq!(h.kernel_config.kexec_file.to_string(), "y");
    assert_eq!(h.kernel_config.multikernel.to_string(), "n");
    assert!(h
        .kernel_config
        .source
        .as_ref()
        .unwrap()
        .ends_with("boot/config-6.12.0-test"));
    assert!(!h.kexec.is_usable());
    assert!(h
        .render()
        .contains("offline memory [0x240000000-0x280000000)"));
}

#[test]
fn memmap_carve_out_isolcpus_and_crashkernel() {
    let h = discover("memmap-isolcpus");
    let c = &h.cmdline;
    assert_eq!(c.memmap.len(), 1);
    assert_eq!(c.memmap[0].text, "memmap=4G$0x100000000");
    assert_eq!(
        c.memmap[0].kind,
        MemmapKind::Reserved {
            range: r(4 * GIB, 4 * GIB)
        }
    );
    assert_eq!(c.isolcpus, cpus("2-3"));
    assert_eq!(c.isolcpus_flags, ["domain", "managed_irq"]);
    assert_eq!(c.nohz_full, cpus("2-3"));
    assert_eq!(
        c.crashkernel[0].spec,
        CrashSpec::Size {
            size: ByteSize(256 << 20),
            offset: Some(PhysAddr(0x3000_0000))
        }
    );
    assert_eq!(h.cpus.isolated, cpus("2-3"));
    assert_eq!(h.cpus.nohz_full, cpus("2-3"));
    // iomem and the command line agree, so each region is listed once with
    // both pieces of evidence.
    let carved: Vec<&Reservation> = h.reserved.iter().filter(|r| r.cmdline.is_some()).collect();
    assert_eq!(
        carved,
        [
            &Reservation {
                range: r(0x3000_0000, 256 << 20),
                kind: ReservationKind::CrashKernel,
                iomem: Some("Crash kernel".into()),
                cmdline: Some("crashkernel=256M@0x30000000".into()),
            },
            &Reservation {
                range: r(4 * GIB, 4 * GIB),
                kind: ReservationKind::Reserved,
                iomem: Some("Reserved".into()),
                cmdline: Some("memmap=4G$0x100000000".into()),
            },
        ]
    );
    assert_eq!(h.reserved.len(), 4);
    assert_eq!(h.free_pool_candidates(), [r(4 * GIB, 4 * GIB)]);
    assert_eq!(
        h.ram.iter().map(MemRange::size).sum::<u64>(),
        8 * GIB - 0x1000 - 0x60400
    );
    assert!(!has_warning(&h, "did the kernel reject"));
    let text = h.render();
    assert!(
        text.contains("isolcpus 2-3 (flags domain,managed_irq)"),
        "{text}"
    );
    assert!(
        text.contains("pool candidates: [0x100000000-0x200000000)"),
        "{text}"
    );
}

#[test]
fn memmap_the_kernel_did_not_honour_is_a_warning() {
    let dir = scratch("memmap-isolcpus");
    fs::write(
        dir.path().join("proc/cmdline"),
        "root=/dev/vda memmap=1G$0x300000000 memmap=4G\\$0x100000000 memmap=exactmap \
         isolcpus=bogus,2-x crashkernel=1G,high\n",
    )
    .unwrap();
    let h = HostInfo::discover(dir.path()).unwrap();
    assert!(has_warning(
        &h,
        "memmap=1G$0x300000000 asks for reserved [0x300000000-0x340000000) but"
    ));
    assert!(has_warning(
        &h,
        "memmap=4G\\$0x100000000: a backslash reached the kernel"
    ));
    assert!(has_warning(&h, "isolcpus=bogus,2-x"));
    // No "Crash kernel" is missing: the one in iomem takes the ,high option.
    assert!(!has_warning(&h, "crashkernel"));
    assert!(h.cmdline.isolcpus.is_empty());
    assert_eq!(h.cmdline.memmap.len(), 2);
    assert_eq!(h.cmdline.memmap[1].kind, MemmapKind::ExactMap);
    // The region iomem does not show is still listed, marked by its source.
    assert!(h.reserved.contains(&Reservation {
        range: r(0x3_0000_0000, GIB),
        kind: ReservationKind::Reserved,
        iomem: None,
        cmdline: Some("memmap=1G$0x300000000".into()),
    }));
}

#[test]
fn multikernel_current_generation() {
    let h = discover("mk-current");
    let mk = &h.multikernel;
    assert!(mk.present && mk.mounted);
    assert_eq!(mk.generation, Some(Generation::Current));
    assert_eq!(mk.fs_registered, Some(true));
    let inst: Vec<_> = mk
        .instances
        .iter()
        .map(|i| (i.name.as_str(), i.id, i.status.as_deref()))
        .collect();
    assert_eq!(
        inst,
        [
            ("db", Some(2), Some("ready")),
            ("web", Some(1), Some("active"))
        ]
    );
    assert_eq!(h.kernel_config.multikernel.to_string(), "y");
    assert!(!h.kernel_config.multikernel_inferred);
    assert_eq!(
        h.kexec,
        KexecVerdict::Ready {
            generation: Generation::Current,
            unchecked: vec![]
        }
    );
    assert_eq!(h.cpus.offline, cpus("2-3"));
    assert_eq!(
        h.kexec.to_string(),
        "kexec backend: usable (/sys/fs/multikernel mounted, interface generation current)"
    );
    assert!(h
        .render()
        .contains("instance web              id 1    active"));
}

#[test]
fn multikernel_v1_with_pool() {
    let h = discover("mk-v1");
    assert_eq!(h.multikernel.generation, Some(Generation::V1));
    assert_eq!(h.multikernel.instances.len(), 1);
    assert_eq!(h.multikernel.instances[0].name, "web-server");
    assert_eq!(h.multikernel.instances[0].id, Some(1));
    // No config file: CONFIG_MULTIKERNEL inferred from /proc/filesystems.
    assert!(h.kernel_config.multikernel_inferred);
    assert_eq!(h.kernel_config.kexec_file.to_string(), "unknown");
    let pool = Reservation {
        range: r(4 * GIB, 2 * GIB),
        kind: ReservationKind::MultikernelPool,
        iomem: Some("Multikernel Memory Pool".into()),
        cmdline: Some("mkkernel_pool=2G@0x100000000".into()),
    };
    assert!(h.reserved.contains(&pool), "{:#?}", h.reserved);
    assert_eq!(h.free_pool_candidates(), [r(4 * GIB, 2 * GIB)]);
    assert_eq!(
        h.kexec,
        KexecVerdict::Ready {
            generation: Generation::V1,
            unchecked: vec!["CONFIG_KEXEC_FILE (kernel config unknown)".into()]
        }
    );
}

#[test]
fn multikernel_v1_without_pool_says_what_to_add() {
    let dir = scratch("mk-v1");
    fs::write(dir.path().join("proc/cmdline"), "root=/dev/vda\n").unwrap();
    let iomem = fs::read_to_string(dir.path().join("proc/iomem")).unwrap();
    fs::write(
        dir.path().join("proc/iomem"),
        iomem.replace("  100000000-17fffffff : Multikernel Memory Pool\n", ""),
    )
    .unwrap();
    let h = HostInfo::discover(dir.path()).unwrap();
    let KexecVerdict::Unavailable { missing } = &h.kexec else {
        panic!("{:?}", h.kexec)
    };
    assert_eq!(
        missing,
        &["no multikernel memory pool: boot the host with mkkernel_pool=<size>@<address>"]
    );
}

#[test]
fn multikernel_present_but_not_mounted() {
    let dir = scratch("mk-current");
    // Before mounting, /sys/fs/multikernel is an empty directory.
    let mk = dir.path().join("sys/fs/multikernel");
    fs::remove_dir_all(&mk).unwrap();
    fs::create_dir(&mk).unwrap();
    let mounts = fs::read_to_string(dir.path().join("proc/mounts")).unwrap();
    fs::write(
        dir.path().join("proc/mounts"),
        mounts.replace("none /sys/fs/multikernel multikernel rw,relatime 0 0\n", ""),
    )
    .unwrap();
    let h = HostInfo::discover(dir.path()).unwrap();
    assert!(h.multikernel.present);
    assert!(!h.multikernel.mounted);
    assert_eq!(h.multikernel.generation, None);
    assert_eq!(h.kexec, KexecVerdict::NeedsMount);
    assert!(h
        .kexec
        .to_string()
        .contains("mount -t multikernel none /sys/fs/multikernel"));

    // Something else mounted over it is a blocker, not a mount away.
    fs::write(
        dir.path().join("proc/mounts"),
        format!("{mounts}tmpfs /sys/fs/multikernel tmpfs rw 0 0\n"),
    )
    .unwrap();
    let h = HostInfo::discover(dir.path()).unwrap();
    let KexecVerdict::Unavailable { missing } = &h.kexec else {
        panic!("{:?}", h.kexec)
    };
    assert_eq!(
        missing,
        &["/sys/fs/multikernel has a tmpfs filesystem mounted on it"]
    );
}

/// `/sys/fs/multikernel` without `/proc/kimage`: the instance-descriptor
/// generation, named in the report and refused by the verdict.
#[test]
fn multikernel_descriptor_generation_is_recognised_not_supported() {
    let h = discover("mk-descriptors");
    assert_eq!(h.multikernel.generation, Some(Generation::Descriptors));
    let KexecVerdict::Unavailable { missing } = &h.kexec else {
        panic!("{:?}", h.kexec)
    };
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(missing[0].contains("/proc/kimage is not"), "{missing:?}");
    assert!(missing[0].contains("does not support yet"), "{missing:?}");
    let text = h.render();
    assert!(
        text.contains(
            "interface generation descriptors (no /proc/kimage: multikernel v7.0-mk5 or later)"
        ),
        "{text}"
    );
    // Unmounted, it is still told apart: /proc/kimage does not depend on the mount.
    let dir = scratch("mk-descriptors");
    let mounts = fs::read_to_string(dir.path().join("proc/mounts")).unwrap();
    fs::write(
        dir.path().join("proc/mounts"),
        mounts.replace("none /sys/fs/multikernel multikernel rw,relatime 0 0\n", ""),
    )
    .unwrap();
    let h = HostInfo::discover(dir.path()).unwrap();
    assert!(!h.multikernel.mounted);
    assert_eq!(h.multikernel.generation, Some(Generation::Descriptors));
    assert!(!h.kexec.is_usable());
}

#[test]
fn kexec_file_disabled_blocks_kexec() {
    let dir = scratch("mk-current");
    fs::write(
        dir.path().join("boot/config-7.0.0-mk2"),
        "CONFIG_MULTIKERNEL=y\n# CONFIG_KEXEC_FILE is not set\n",
    )
    .unwrap();
    let h = HostInfo::discover(dir.path()).unwrap();
    assert_eq!(
        h.kexec,
        KexecVerdict::Unavailable {
            missing: vec!["CONFIG_KEXEC_FILE is not set: no kexec_file_load".into()]
        }
    );
}

#[test]
fn iomem_read_without_root() {
    let h = discover("no-root");
    assert!(h.iomem_hidden);
    assert!(h.ram.is_empty());
    assert!(has_warning(&h, "run as root to see physical addresses"));
    // Only the command line's fixed carve-out is known; crashkernel=128M
    // has no fixed place, and nothing is claimed to be missing from iomem.
    assert_eq!(
        h.reserved,
        [Reservation {
            range: r(0x8000_0000, GIB),
            kind: ReservationKind::Reserved,
            iomem: None,
            cmdline: Some("memmap=1G$0x80000000".into()),
        }]
    );
    assert!(!has_warning(&h, "did the kernel reject"));
    // Node memory still comes from sysfs memory blocks.
    assert_eq!(h.nodes[0].memory, [r(0, 4 * GIB)]);
    assert!(h
        .render()
        .contains("System RAM unknown (addresses hidden: run as root)"));
}

#[test]
fn kernel_without_numa_is_one_node() {
    let h = discover("no-numa");
    assert_eq!(h.nodes.len(), 1);
    assert_eq!(h.nodes[0].id, 0);
    assert_eq!(h.nodes[0].cpus, cpus("0-3"));
    assert_eq!(h.nodes[0].memory, h.ram);
    assert_eq!(
        h.nodes[0].memory,
        [r(0x1000, 0x9ec00), r(0x10_0000, 0xbff0_0000)]
    );
    assert_eq!(h.nodes[0].mem_total, Some(h.mem_total));
    assert!(has_warning(&h, "kernel without CONFIG_NUMA"));
}

#[test]
fn missing_essential_files_are_errors_naming_the_path() {
    let dir = scratch("one-node");
    let online = dir.path().join("sys/devices/system/cpu/online");
    fs::remove_file(&online).unwrap();
    let err = HostInfo::discover(dir.path()).unwrap_err();
    match &err {
        HostError::Read { path, source } => {
            assert_eq!(path, &online);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.to_string(), format!("cannot read {}", online.display()));
    assert!(std::error::Error::source(&err).is_some());

    fs::write(&online, "0-x\n").unwrap();
    let err = HostInfo::discover(dir.path()).unwrap_err();
    assert!(
        matches!(&err, HostError::Parse { path, .. } if path == &online),
        "{err:?}"
    );

    fs::write(&online, "0-1\n").unwrap();
    let meminfo = dir.path().join("proc/meminfo");
    fs::write(&meminfo, "MemFree: 1 kB\n").unwrap();
    let err = HostInfo::discover(dir.path()).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: no \"MemTotal: <n> kB\" line", meminfo.display())
    );
    fs::remove_file(&meminfo).unwrap();
    assert!(matches!(
        HostInfo::discover(dir.path()),
        Err(HostError::Read { path, .. }) if path == meminfo
    ));
}

#[test]
fn optional_files_missing_degrade_with_warnings() {
    let dir = scratch("two-nodes");
    let p = dir.path();
    for f in [
        "proc/iomem",
        "proc/cmdline",
        "proc/cpuinfo",
        "sys/devices/system/cpu/present",
        "sys/devices/system/node/node1/meminfo",
        "proc/sys/kernel/osrelease",
    ] {
        fs::remove_file(p.join(f)).unwrap();
    }
    fs::write(p.join("sys/devices/system/node/node0/cpulist"), "zz\n").unwrap();
    let h = HostInfo::discover(p).unwrap();
    assert!(h.ram.is_empty());
    assert!(h.reserved.is_empty());
    assert!(h.apic_ids.is_empty());
    assert_eq!(h.cmdline, Default::default());
    assert_eq!(h.cpus.present, cpus("0-7"), "falls back to possible");
    assert_eq!(h.nodes[1].mem_total, None);
    // A malformed cpulist falls back to the node's cpuN entries (none here).
    assert!(h.nodes[0].cpus.is_empty());
    assert_eq!(h.kernel_release, None);
    for want in [
        "proc/iomem: RAM and reserved regions unknown",
        "proc/cmdline: memmap=",
        "proc/cpuinfo: APIC ids",
        "cpu/present",
        "node1/meminfo: node MemTotal unknown",
        "node0/cpulist: \"zz\" is not a CPU number",
        "kernel config unknown",
    ] {
        assert!(
            has_warning(&h, want),
            "no warning {want:?} in {:#?}",
            h.warnings
        );
    }
}

#[test]
fn json_report_shape() {
    let h = discover("memmap-isolcpus");
    let v = serde_json::to_value(&h).unwrap();
    assert_eq!(v["cpus"]["online"], "0-3");
    assert_eq!(v["cmdline"]["memmap"][0]["kind"], "reserved");
    assert_eq!(v["cmdline"]["memmap"][0]["range"]["start"], "0x100000000");
    assert_eq!(v["cmdline"]["crashkernel"][0]["form"], "size");
    assert_eq!(v["reserved"][2]["kind"], "crash_kernel");
    assert_eq!(v["apic_ids"]["3"], 3);
    assert_eq!(v["kexec"]["state"], "unavailable");
    assert_eq!(v["kernel_config"]["kexec_file"], "unknown");
    assert_eq!(v["nodes"][0]["mem_total"], 8_000_000u64 * 1024);
}

/// This machine: what discovery sees must agree with the kernel's own files.
#[test]
fn discover_this_machine() {
    let h = HostInfo::discover(Path::new("/")).unwrap();
    let online = cpus(
        fs::read_to_string("/sys/devices/system/cpu/online")
            .unwrap()
            .trim(),
    );
    assert_eq!(h.cpus.online, online);
    assert!(!h.cpus.online.is_empty());
    // available_parallelism also honours affinity and cgroup limits, so it
    // can only be lower.
    let par = std::thread::available_parallelism().unwrap().get();
    assert!(par <= h.cpus.online.len(), "{par} > {}", h.cpus.online);
    assert!(h.mem_total.0 > 0);
    assert!(!h.nodes.is_empty());
    assert!(h.cpus.online.is_subset(&h.node_cpus()));
    if !h.iomem_hidden {
        assert!(!h.ram.is_empty());
    }
    // On x86 every online CPU has an APIC id.
    if cfg!(target_arch = "x86_64") {
        assert_eq!(CpuSet::from_cpus(h.apic_ids.keys().copied()), h.cpus.online);
    }
    assert!(!h.render().is_empty());
    serde_json::to_string(&h).unwrap();
}
