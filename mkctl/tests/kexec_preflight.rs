//! A `kexec` instance on a kernel without the multikernel interface is
//! refused before anything is touched, with a message that names what is
//! missing and suggests the qemu backend; fake sysroots show each case.

use std::path::{Path, PathBuf};

use mkctl::kexec::{preflight, probe, Generation};
use mkctl::topology::{self, Source};

fn kexec_topology() -> topology::Topology {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/kexec.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    topology::parse(Source::new(&path, text), || None).unwrap_or_else(|e| panic!("{}", e.render()))
}

fn host_state() -> (String, String, String) {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    (
        read("/sys/devices/system/cpu/online"),
        read("/proc/mounts"),
        read("/sys/kernel/kexec_loaded"),
    )
}

/// This machine has no multikernel kernel: the refusal names the missing
/// filesystem and option, suggests backend = "qemu", and nothing changes.
#[test]
fn this_host_is_refused_and_left_alone() {
    let before = host_state();
    let t = kexec_topology();
    let r = preflight(Path::new("/"), &t).unwrap_err();
    let text = r.to_string();
    assert_eq!(r.instances, vec!["worker".to_string()]);
    assert!(
        text.contains("/sys/fs/multikernel does not exist"),
        "{text}"
    );
    assert!(text.contains("backend = \"qemu\""), "{text}");
    if Path::new("/proc/config.gz").exists() {
        assert!(
            text.contains("CONFIG_MULTIKERNEL is not set (/proc/config.gz)"),
            "{text}"
        );
    }
    assert_eq!(host_state(), before);
}

fn sysroot(files: &[(&str, &str)], dirs: &[&str]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for dir in dirs {
        std::fs::create_dir_all(d.path().join(dir)).unwrap();
    }
    for (p, text) in files {
        let p = d.path().join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    d
}

const GOOD_CONFIG: &str = "CONFIG_KEXEC_FILE=y\nCONFIG_MULTIKERNEL=y\n";
/// What `/proc/kimage` reads with nothing loaded (RFC v2 patch 11/16);
/// only its presence matters to mkctl.
const KIMAGE: &str = "MK_ID  Type        Start Address   Segments\n\
                      -----  ----------  --------------  --------\n\
                      No kimages loaded\n";

#[test]
fn a_multikernel_host_passes() {
    let root = sysroot(
        &[
            ("proc/filesystems", "nodev\tsysfs\nnodev\tmultikernel\n"),
            ("proc/kimage", KIMAGE),
            ("proc/sys/kernel/osrelease", "7.0.0-mk2\n"),
            ("boot/config-7.0.0-mk2", GOOD_CONFIG),
            ("proc/mounts", "sysfs /sys sysfs rw 0 0\n"),
        ],
        &["sys/fs/multikernel"],
    );
    assert_eq!(preflight(root.path(), &kexec_topology()), Ok(None));

    // Mounted, with overlays/: the current generation.
    let root = sysroot(
        &[
            ("proc/filesystems", "nodev\tmultikernel\n"),
            ("proc/kimage", KIMAGE),
            ("proc/sys/kernel/osrelease", "7.0.0-mk2\n"),
            ("boot/config-7.0.0-mk2", GOOD_CONFIG),
            (
                "proc/mounts",
                "none /sys/fs/multikernel multikernel rw 0 0\n",
            ),
            ("sys/fs/multikernel/instances/web/id", "1\n"),
            ("sys/fs/multikernel/instances/web/status", "active\n"),
        ],
        &["sys/fs/multikernel/overlays"],
    );
    assert_eq!(
        preflight(root.path(), &kexec_topology()),
        Ok(Some(Generation::Current))
    );
    let fs = probe(root.path());
    assert_eq!(fs.instances.len(), 1);
    assert_eq!(fs.instances[0].status.as_deref(), Some("active"));

    // Mounted without overlays/: v1.
    let root = sysroot(
        &[
            ("proc/filesystems", "nodev\tmultikernel\n"),
            ("proc/kimage", KIMAGE),
            ("proc/sys/kernel/osrelease", "6.18.0-rfc\n"),
            ("boot/config-6.18.0-rfc", GOOD_CONFIG),
            (
                "proc/mounts",
                "none /sys/fs/multikernel multikernel rw 0 0\n",
            ),
        ],
        &["sys/fs/multikernel/instances"],
    );
    assert_eq!(
        preflight(root.path(), &kexec_topology()),
        Ok(Some(Generation::V1))
    );
}

#[test]
fn each_missing_piece_is_named_at_once() {
    let root = sysroot(
        &[
            ("proc/filesystems", "nodev\tsysfs\n"),
            ("proc/sys/kernel/osrelease", "6.1.0\n"),
            (
                "boot/config-6.1.0",
                "CONFIG_KEXEC_FILE=y\n# CONFIG_MULTIKERNEL is not set\n",
            ),
        ],
        &[],
    );
    let r = preflight(root.path(), &kexec_topology()).unwrap_err();
    assert_eq!(r.missing.len(), 2, "{r}");
    assert!(r.missing[0].contains("multikernel filesystem"), "{r}");
    assert_eq!(
        r.missing[1],
        "CONFIG_MULTIKERNEL is not set (/boot/config-6.1.0)"
    );

    // No config readable at all: the filesystem and the unreadable config.
    let root = sysroot(&[("proc/filesystems", "nodev\tsysfs\n")], &[]);
    let r = preflight(root.path(), &kexec_topology()).unwrap_err();
    assert!(r.missing[1].contains("the kernel configuration"), "{r}");
}

#[test]
fn qemu_only_topologies_are_not_checked() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs/demo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let t = topology::parse(Source::new(&path, text), || None).unwrap();
    let root = tempfile::tempdir().unwrap();
    assert_eq!(preflight(root.path(), &t), Ok(None));
}

/// A multikernel kernel without `/proc/kimage` is the instance-descriptor
/// generation (v7.0-mk5, kerf 0.6.0): refused as unsupported, mounted or
/// not, with no list of things to install.
#[test]
fn the_descriptor_generation_is_recognised_and_refused() {
    for mounted in [false, true] {
        let mounts = if mounted {
            "none /sys/fs/multikernel multikernel rw 0 0\n"
        } else {
            "sysfs /sys sysfs rw 0 0\n"
        };
        let root = sysroot(
            &[
                ("proc/filesystems", "nodev\tmultikernel\n"),
                ("proc/sys/kernel/osrelease", "7.0.0-mk5\n"),
                ("boot/config-7.0.0-mk5", GOOD_CONFIG),
                ("proc/mounts", mounts),
            ],
            if mounted {
                &[
                    "sys/fs/multikernel/overlays",
                    "sys/fs/multikernel/instances",
                ]
            } else {
                &["sys/fs/multikernel"]
            },
        );
        let fs = probe(root.path());
        assert!(fs.descriptor_interface(), "mounted={mounted}");
        let r = preflight(root.path(), &kexec_topology()).unwrap_err();
        assert!(r.unsupported_generation);
        assert_eq!(r.missing.len(), 1, "{r}");
        let text = r.to_string();
        assert!(text.contains("no /proc/kimage"), "{text}");
        assert!(text.contains("v7.0-mk5"), "{text}");
        assert!(text.contains("does not support that generation"), "{text}");
        assert!(!text.contains("CONFIG_MULTIKERNEL=y"), "{text}");

        // The same tree with /proc/kimage is an ordinary multikernel host.
        std::fs::write(root.path().join("proc/kimage"), KIMAGE).unwrap();
        assert!(!probe(root.path()).descriptor_interface());
        assert!(preflight(root.path(), &kexec_topology()).is_ok());
    }
    // No multikernel filesystem at all is not this generation.
    let root = sysroot(&[("proc/filesystems", "nodev\tsysfs\n")], &[]);
    assert!(!probe(root.path()).descriptor_interface());
    assert!(
        !preflight(root.path(), &kexec_topology())
            .unwrap_err()
            .unsupported_generation
    );
}
