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

impl Host {
    fn start(s: &Scratch, kernel: &Path, initrd: &Path, append: &str, memory_mib: u64) -> Self {
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
