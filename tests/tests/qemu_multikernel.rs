//! A real multikernel machine inside QEMU (issue 18): the kernel that
//! `qemu/multikernel/build.sh` builds from Linux 7.2 and our patch boots as a
//! multikernel host under TCG (q35, `-cpu max`, 2 vCPUs, two serial ports:
//! ttyS0 for the host, ttyS1 for the kernel it spawns), with a busybox
//! initramfs whose `/init` script does what each test asks.
//!
//! The kernel is cached by a hash of its inputs; without it every test here
//! fails (never skips) with "run qemu/multikernel/build.sh". Times are
//! printed with `cargo test -p mkctl-e2e --test qemu_multikernel -- --nocapture`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mkctl::initramfs::{is_static, Initramfs};
use mkctl_e2e::{repo_root, Artifacts, Scratch};

/// The multikernel bzImage for the current inputs, or a failure that says
/// how to build it.
fn mk_kernel() -> PathBuf {
    let script = repo_root().join("qemu/multikernel/build.sh");
    let out = Command::new(&script)
        .arg("--print")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && Path::new(&path).is_file(),
        "the multikernel kernel is not built for the current inputs: run qemu/multikernel/build.sh \
         (scripts/setup.sh does; about 5 min cold on 2 cores)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(path)
}

const BUSYBOX: &str = "/bin/busybox";

/// A host initramfs: busybox (every applet through `--install`), `/init` =
/// `script` after a common preamble that mounts proc, sys and devtmpfs.
fn host_initramfs(script: &str, extra: &[(&str, &Path)]) -> Initramfs {
    assert!(
        is_static(Path::new(BUSYBOX)),
        "{BUSYBOX} is not a static busybox: apt-get install busybox-static (qemu/setup.sh does)"
    );
    let mut ir = Initramfs::base();
    ir.host_file(BUSYBOX, Path::new(BUSYBOX), Some(0o755))
        .expect("busybox");
    for (guest, host) in extra {
        ir.host_file(guest, host, Some(0o755)).expect("extra file");
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         echo \"mk-host: user space up on $(uname -r)\"\n\
         {script}\n\
         echo mk-host: done\n\
         poweroff -f\n"
    );
    ir.file("/init", init, 0o755).expect("init");
    ir
}

/// One QEMU host machine; both serial ports go to log files.
struct Host {
    _one: std::sync::MutexGuard<'static, ()>,
    child: Child,
    started: Instant,
    host_log: PathBuf,
    spawned_log: PathBuf,
}

struct Outcome {
    host: String,
    spawned: String,
    elapsed: Duration,
    exited: bool,
}

impl Outcome {
    fn report(&self) -> String {
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "--- host console (ttyS0, last 60 lines) ---\n{}\n--- spawned console (ttyS1, last 60 lines) ---\n{}\n---",
            tail(&self.host),
            tail(&self.spawned)
        )
    }
}

/// One QEMU at a time: the tests of this file share 2 cores with the rest
/// of the suite, and TCG is CPU bound.
static ONE_QEMU: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Host {
    fn start(s: &Scratch, kernel: &Path, initrd: &Path, append: &str, memory_mib: u64) -> Self {
        let one = ONE_QEMU.lock().unwrap_or_else(|e| e.into_inner());
        let qemu = Artifacts::locate()
            .map(|a| a.qemu)
            .unwrap_or_else(|_| PathBuf::from("qemu-system-x86_64"));
        let host_log = s.join("host.console.log");
        let spawned_log = s.join("spawned.console.log");
        let esc = |p: &Path| p.display().to_string().replace(',', ",,");
        let child = Command::new(qemu)
            .args([
                "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", "2",
            ])
            .args(["-m", &format!("{memory_mib}M")])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append])
            .args([
                "-chardev",
                &format!("file,id=s0,path={}", esc(&host_log)),
                "-serial",
                "chardev:s0",
                "-chardev",
                &format!("file,id=s1,path={}", esc(&spawned_log)),
                "-serial",
                "chardev:s1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-system-x86_64");
        Host {
            _one: one,
            child,
            started: Instant::now(),
            host_log,
            spawned_log,
        }
    }

    /// Waits for QEMU to exit (the host powers off) or kills it at `timeout`.
    fn wait(mut self, timeout: Duration) -> Outcome {
        let exited = loop {
            if self.child.try_wait().expect("wait for qemu").is_some() {
                break true;
            }
            if self.started.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        Outcome {
            host: fs::read_to_string(&self.host_log).unwrap_or_default(),
            spawned: fs::read_to_string(&self.spawned_log).unwrap_or_default(),
            elapsed: self.started.elapsed(),
            exited,
        }
    }
}

fn timeout() -> Duration {
    Duration::from_secs(
        std::env::var("MKCTL_E2E_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(120),
    )
}

/// Stage 1: the kernel built with our patch boots to user space under TCG,
/// with both vCPUs, and the configuration mkctl's preflight reads
/// (`/proc/config.gz`) says it has the multikernel interface and
/// `kexec_file_load`.
#[test]
fn patched_kernel_boots_to_user_space() {
    let kernel = mk_kernel();
    let s = Scratch::new("mk-boot");
    let initrd = s.join("host.cpio");
    host_initramfs(
        "echo \"cpus online: $(cat /sys/devices/system/cpu/online)\"\n\
         zcat /proc/config.gz | grep -E '^CONFIG_(MULTIKERNEL|KEXEC_FILE|HOTPLUG_CPU)='",
        &[],
    )
    .write_file(&initrd)
    .expect("write initramfs");
    let run = Host::start(&s, &kernel, &initrd, "console=ttyS0 panic=-1", 512).wait(timeout());
    assert!(run.exited, "QEMU did not power off\n{}", run.report());
    for want in [
        "Linux version 7.2.",
        "multikernel: v1 interface (mkctl test patch)",
        "mk-host: user space up on 7.2.",
        // Both vCPUs came up (an instance will take the second).
        "cpus online: 0-1",
        "CONFIG_MULTIKERNEL=y",
        "CONFIG_KEXEC_FILE=y",
        "CONFIG_HOTPLUG_CPU=y",
        "mk-host: done",
    ] {
        assert!(run.host.contains(want), "no \"{want}\"\n{}", run.report());
    }
    eprintln!(
        "multikernel host: boot to power-off {:.2} s",
        run.elapsed.as_secs_f64()
    );
}

/// mkctl, linked statically so it runs in the busybox initramfs; built with
/// the flags `qemu/setup.sh` uses for guest-init (a no-op when up to date,
/// so the test never runs a stale mkctl).
fn static_mkctl() -> PathBuf {
    const TRIPLE: &str = "x86_64-unknown-linux-gnu";
    let root = repo_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("static");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=debuginfo",
        )
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "mkctl",
            "--target",
            TRIPLE,
        ])
        .arg("--target-dir")
        .arg(&target)
        .output()
        .expect("run cargo build for the static mkctl");
    assert!(
        out.status.success(),
        "static build of mkctl failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = target.join(TRIPLE).join("release/mkctl");
    assert!(
        is_static(&bin),
        "{} is not statically linked",
        bin.display()
    );
    bin
}

/// The pool the host kernel reserves at boot, and the topology mkctl boots
/// from it: one instance on CPU 1 with 64 MiB, the window in the pool's
/// last 16 MiB.
const POOL_PARAM: &str = "mkkernel_pool=256M@0x20000000";
const TOPOLOGY: &str = r#"
[[machine.node]]
id = 0
cpus = "0-1"
memory = "1G"

[host]
cpus = "0"
memory = "512M"

[pool]
base = "0x20000000"
size = "256M"

[window]
size = "16M"
base = "0x2f000000"

[defaults]
backend = "kexec"
kernel = "bzImage"
initrd = "spawned.cpio"
cmdline = "console=ttyS1,115200 earlyprintk=serial,ttyS1,115200"

[[instance]]
name = "worker"
id = 1
cpus = "1"
memory = "64M"
"#;

/// The host's initramfs for a `mkctl boot` run: busybox, the static mkctl,
/// and in /boot the topology, the same bzImage as the spawned kernel and
/// the spawned kernel's own busybox initramfs.
fn boot_initramfs(s: &Scratch, kernel: &Path, script: &str) -> PathBuf {
    let spawned = s.join("spawned.cpio");
    let mut ir = Initramfs::base();
    ir.host_file(BUSYBOX, Path::new(BUSYBOX), Some(0o755))
        .expect("busybox");
    ir.file(
        "/init",
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         echo \"mk-spawned: user space up on $(uname -r), CPUs $(cat /sys/devices/system/cpu/online)\"\n\
         poweroff -f\n",
        0o755,
    )
    .expect("init");
    ir.write_file(&spawned).expect("write spawned initramfs");
    let topology = s.join("mk.toml");
    fs::write(&topology, TOPOLOGY).expect("write topology");
    let mkctl = static_mkctl();
    let host = s.join("host.cpio");
    host_initramfs(
        script,
        &[
            ("/bin/mkctl", &mkctl),
            ("/boot/bzImage", kernel),
            ("/boot/spawned.cpio", &spawned),
            ("/boot/mk.toml", &topology),
        ],
    )
    .write_file(&host)
    .expect("write host initramfs");
    host
}

/// Stage 2: `mkctl boot` inside the QEMU host drives our kernel's v1
/// interface through `RealKernel`, the code path of any multikernel host:
/// preflight passes (filesystem, `/proc/kimage`, config), the filesystem
/// mounts, the device tree creates the instance with memory from the pool
/// reserved at boot, its CPU goes offline. The load is where the patch
/// stops today: `kexec_file_load` refuses with EOPNOTSUPP, and mkctl rolls
/// everything back (CPU online, instance removed, region back in the pool,
/// filesystem unmounted).
#[test]
fn mkctl_boot_drives_the_v1_interface() {
    let kernel = mk_kernel();
    let s = Scratch::new("mk-v1");
    let initrd = boot_initramfs(
        &s,
        &kernel,
        "grep -i 'multikernel' /proc/iomem\n\
         cd /boot\n\
         mkctl boot mk.toml\n\
         echo \"mkctl-boot-exit=$?\"\n\
         echo \"after: cpus online $(cat /sys/devices/system/cpu/online)\"\n\
         echo \"after: mount point holds [$(ls /sys/fs/multikernel 2>&1)]\"\n\
         echo \"after: mounted [$(grep multikernel /proc/mounts)]\"\n\
         echo \"after: kimage [$(cat /proc/kimage)]\"",
    );
    let append = format!("console=ttyS0 panic=-1 {POOL_PARAM}");
    let run = Host::start(&s, &kernel, &initrd, &append, 1024).wait(timeout());
    assert!(run.exited, "QEMU did not power off\n{}", run.report());
    for want in [
        // The pool, reserved at boot and listed as a resource.
        "multikernel: pool [mem 0x20000000-0x2fffffff] reserved for instances",
        "20000000-2fffffff : multikernel pool",
        // mkctl took the same steps it takes on any v1 host.
        "[kexec] step: mount the multikernel filesystem",
        "[kexec]   ok: write the v1 device tree",
        "multikernel: instance 'worker' (id 1): CPUs 1, memory [mem 0x20000000-0x23ffffff]",
        "[kexec]   ok: check \"worker\" is ready",
        "[kexec]   ok: offline CPU 1 for \"worker\"",
        "step \"load the kernel of \"worker\"\" failed: kexec_file_load(",
        "KEXEC_MULTIKERNEL|KEXEC_MK_ID(1)",
        "EOPNOTSUPP",
        "placing a kernel in an instance's memory is not implemented by this patch yet",
        // The rollback, and the machine as it was.
        "multikernel: instance 'worker' (id 1) removed; [mem 0x20000000-0x23ffffff] back in the pool",
        "mkctl-boot-exit=1",
        "after: cpus online 0-1",
        "after: mount point holds []",
        "after: mounted []",
        "after: kimage []",
    ] {
        assert!(run.host.contains(want), "no \"{want}\"\n{}", run.report());
    }
    eprintln!(
        "multikernel host: mkctl boot (stops at the load) and power-off {:.2} s",
        run.elapsed.as_secs_f64()
    );
}
