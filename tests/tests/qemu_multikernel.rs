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
/// The window's first word, where the spawned kernel's init writes
/// [`MARK`] ("MKOK") through `/dev/mem` and the host polls for it.
const WINDOW: &str = "0x2f000000";
const MARK: &str = "0x4D4B4F4B";
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
cmdline = "console=ttyS1,115200 earlyprintk=serial,ttyS1,115200 acpi=off nosmp noapic pci=off no5lvl hpet=disable"

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
    boot_initramfs_with(s, kernel, script, None)
}

/// [`boot_initramfs`], and with `guest` (a static guest-init) the spawned
/// kernel boots the initramfs mkctl builds around it (guest-init as
/// `/init`, busybox applets) instead of the busybox script.
fn boot_initramfs_with(s: &Scratch, kernel: &Path, script: &str, guest: Option<&Path>) -> PathBuf {
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
         mount -t devtmpfs dev /dev\n\
         echo \"mk-spawned: user space up on $(uname -r), CPUs $(cat /sys/devices/system/cpu/online), $(grep -m1 apicid /proc/cpuinfo | tr -d '\\t')\"\n\
         echo \"mk-spawned: $(grep MemTotal /proc/meminfo)\"\n\
         devmem {WINDOW} 32 {MARK}\n\
         echo \"mk-spawned: wrote {MARK} to the window at {WINDOW}, reads back $(devmem {WINDOW} 32)\"\n\
         poweroff -f\n"
        .replace("{WINDOW}", WINDOW)
        .replace("{MARK}", MARK),
        0o755,
    )
    .expect("init");
    if let Some(guest_init) = guest {
        ir = Initramfs::for_topology(guest_init, &[]).expect("guest-init initramfs");
    }
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

/// Stages 2 to 4: `mkctl boot` inside the QEMU host drives our kernel's v1
/// interface through `RealKernel`, the code path of any multikernel host:
/// preflight passes (filesystem, `/proc/kimage`, config), the filesystem
/// mounts, the device tree creates the instance with memory from the pool
/// reserved at boot, its CPU goes offline, `kexec_file_load` places the
/// bzImage, initrd, command line and boot parameters in the instance's
/// region, and the start command wakes CPU 1 with INIT/SIPI into it. The
/// spawned kernel boots on its own serial port (ttyS1) with an e820 map of
/// its region only, reaches user space on APIC id 1, and writes a word into
/// the window that the host reads back: two kernels, one machine.
#[test]
fn mkctl_boot_spawns_a_kernel_on_cpu_1() {
    let kernel = mk_kernel();
    let s = Scratch::new("mk-v1");
    let initrd = boot_initramfs(
        &s,
        &kernel,
        &format!(
            "grep -i 'multikernel' /proc/iomem\n\
             cd /boot\n\
             mkctl boot --timeout 3 mk.toml\n\
             echo \"mkctl-boot-exit=$?\"\n\
             echo \"after: cpus online $(cat /sys/devices/system/cpu/online)\"\n\
             echo \"after: kimage [$(cat /proc/kimage)]\"\n\
             for i in $(seq 1 300); do\n\
               v=$(devmem {WINDOW} 32); [ \"$v\" = {MARK} ] && break\n\
               [ $((i % 50)) = 0 ] && echo \"host: poll $i reads $v\"; sleep 0.1\n\
             done\n\
             echo \"host: the window reads $v\"\n\
             echo 1 > /sys/devices/system/cpu/cpu1/online 2>/dev/null; \
             echo \"host: onlining CPU 1 exit=$?\"\n\
             mkctl status\n\
             mkctl stop worker\n\
             echo \"mkctl-stop-exit=$?\""
        ),
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
        "[kexec]   ok: load the kernel of \"worker\"",
        "multikernel: loaded 'worker': kernel 0x0000000020200000",
        "[kexec]   ok: check \"worker\" is loading",
        "multikernel: starting 'worker' on CPU 1 (APIC id 1): INIT, SIPI to 0x8f000",
        "multikernel: 'worker': CPU 1 entered the kernel at 0x0000000020200000",
        "[kexec]   ok: wait for \"worker\" to be active",
        "worker active (multikernel v1 interface)",
        // The daemon formatted the window and held endpoint 0 first, but
        // this spawned kernel runs a busybox script, not guest-init: no
        // agent answers, and the boot says so.
        "the host's agent holds endpoint 0 of /dev/mem at 0x2f000000 (16 MiB) for worker",
        "worker: its kernel runs, but no agent answered over the window within 3s (it never attached: is guest-init its init?)",
        "mkctl-boot-exit=1",
        "after: cpus online 0\r",
        "after: kimage [1 worker active 0x0000000020000000-0x0000000023ffffff boot_params=0x0000000020000000 kernel=0x0000000020200000+",
        // The spawned kernel wrote into the window; the host read it.
        &format!("host: the window reads {MARK}"),
        // The host cannot take the CPU back while the instance runs.
        "multikernel: CPU 1 runs a spawned kernel; it cannot come back to the host",
        "host: onlining CPU 1 exit=1",
        // v1 has no halt command; this kernel's forced halt (INIT) takes
        // the instance back to ready, and it is removed.
        "[kexec]   ok: force-halt \"worker\" (v1)",
        "[kexec]   ok: remove instance \"worker\"",
        "mkctl-stop-exit=0",
        "mk-host: done",
    ] {
        assert!(run.host.contains(want), "no \"{want}\" on the host\n{}", run.report());
    }
    for want in [
        "Linux version 7.2.",
        "mk.name=worker mk.id=1 mk.window=0x2f000000@0x1000000",
        // Its memory map is its region and the low block, nothing else.
        "BIOS-e820: [mem 0x0000000000070000-0x000000000008efff]  System RAM",
        "BIOS-e820: [mem 0x0000000020000000-0x0000000023ffffff]  System RAM",
        "RAMDISK: [mem 0x23e",
        "mk-spawned: user space up on 7.2.13, CPUs 0, apicid: 1",
        &format!("mk-spawned: wrote {MARK} to the window at {WINDOW}, reads back {MARK}"),
    ] {
        assert!(
            run.spawned.contains(want),
            "no \"{want}\" from the spawned kernel\n{}",
            run.report()
        );
    }
    // Its clocks come from the host (appended by the loader), not from the
    // PIT the host owns.
    for want in ["cpu_early_khz=", "tsc_early_khz=", "lapic_timer_period="] {
        assert!(run.spawned.contains(want), "no {want}\n{}", run.report());
    }
    assert!(
        !run.spawned.contains("PIT"),
        "the spawned kernel used the PIT\n{}",
        run.report()
    );
    assert_eq!(
        run.spawned.matches("BIOS-e820: [mem").count(),
        2,
        "the spawned kernel sees other memory\n{}",
        run.report()
    );
    eprintln!(
        "multikernel host: mkctl boot, spawned kernel to user space, window handshake, power-off {:.2} s",
        run.elapsed.as_secs_f64()
    );
}

/// Stage 5, first milestone: the spawned kernel runs guest-init, which
/// maps the window from the pool through `/dev/mem` and attaches its agent
/// as endpoint 1; the mkctl daemon on the host formatted that window first
/// (`mkctl boot` asked it to) and holds endpoint 0. The two kernels then
/// talk over the rings through the daemon's ordinary requests: round trips
/// (`ping`), checksummed messages both ways (`traffic`), a command run on
/// the spawned kernel (`exec`), and `status`. `stop` powers the spawned
/// kernel off through its agent, then forces the halt (INIT) and removes
/// the instance; `pool release` brings CPU 1 back to the host; and a second
/// `mkctl boot` runs a fresh kernel on the same window.
#[test]
fn two_kernels_talk_over_the_rings() {
    let kernel = mk_kernel();
    let guest_init = Artifacts::locate()
        .unwrap_or_else(|e| panic!("{e}"))
        .guest_init;
    let s = Scratch::new("mk-link");
    let initrd = boot_initramfs_with(
        &s,
        &kernel,
        "cd /boot\n\
         mkctl boot --timeout 60 mk.toml\n\
         echo \"mkctl-boot-exit=$?\"\n\
         mkctl status\n\
         mkctl ping --count 20 host worker\n\
         echo \"ping-exit=$?\"\n\
         mkctl traffic --count 200 host worker\n\
         echo \"traffic-to-exit=$?\"\n\
         mkctl traffic --count 200 worker host\n\
         echo \"traffic-from-exit=$?\"\n\
         echo \"exec: [$(mkctl exec worker -- uname -r)] exit=$?\"\n\
         echo \"exec: [$(mkctl exec worker -- cat /proc/cpuinfo | grep -m1 apicid | tr -d '\\t')]\"\n\
         mkctl stop worker\n\
         echo \"mkctl-stop-exit=$?\"\n\
         mkctl status\n\
         mkctl pool release\n\
         echo \"mkctl-release-exit=$?\"\n\
         echo \"after: cpus online $(cat /sys/devices/system/cpu/online), kimage [$(cat /proc/kimage)]\"\n\
         mkctl boot --timeout 60 mk.toml\n\
         echo \"again: mkctl-boot-exit=$?\"\n\
         echo \"again: [$(mkctl exec worker -- cat /proc/uptime)] exit=$?\"\n\
         mkctl traffic --count 50 worker host\n\
         echo '--- daemon log ---'; cat /run/mkctl/daemon.log; echo '--- end ---'",
        Some(&guest_init),
    );
    let append = format!("console=ttyS0 panic=-1 {POOL_PARAM}");
    let run = Host::start(&s, &kernel, &initrd, &append, 1024).wait(timeout());
    assert!(run.exited, "QEMU did not power off\n{}", run.report());
    for want in [
        "the host's agent holds endpoint 0 of /dev/mem at 0x2f000000 (16 MiB) for worker",
        "worker active (multikernel v1 interface)",
        "[worker] agent attached to the window",
        "worker ready",
        "mkctl-boot-exit=0",
        "formatted the kexec window /dev/mem at 0x2f000000 (16 MiB) for endpoints 0-1",
        // The daemon lists it beside the kernel's own view.
        "  worker       id   1  active",
        "worker         1  ready            -  1            64M",
        "ping-exit=0",
        "host -> worker: 200 messages of 256 B sent, 200 arrived intact and in order, 0 bad",
        "traffic-to-exit=0",
        "worker -> host: 200 messages of 256 B sent, 200 arrived intact and in order, 0 bad",
        "traffic-from-exit=0",
        "exec: [7.2.13] exit=0",
        "exec: [apicid: 1]",
        // Stop: the agent powers its kernel off (it leaves the window),
        // then the kernel's forced halt and the instance's removal.
        "[worker] asked the agent to power off",
        "mkctl: agents: stopped worker (powered off by its agent",
        "[kexec]   ok: force-halt \"worker\" (v1)",
        "[kexec]   ok: remove instance \"worker\"",
        "stopped worker",
        "mkctl-stop-exit=0",
        "worker         1  stopped",
        // Release: CPU 1 comes back to the host; the pool is free again.
        "[kexec]   ok: online CPU 1",
        "the pool's CPUs and memory are back with the host",
        "mkctl-release-exit=0",
        "after: cpus online 0-1, kimage []",
        // And again: the same daemon and window, the channel emptied, a
        // fresh kernel (its uptime starts again) on the rings.
        "again: mkctl-boot-exit=0",
        "worker -> host: 50 messages of 256 B sent, 50 arrived intact and in order, 0 bad",
        "mk-host: done",
    ] {
        assert!(
            run.host.contains(want),
            "no \"{want}\" on the host\n{}",
            run.report()
        );
    }
    assert!(
        run.host
            .contains("host -> worker: 20 round trips over the window"),
        "no ping\n{}",
        run.report()
    );
    for want in [
        "mk.name=worker mk.id=1 mk.window=0x2f000000@0x1000000",
        "window /dev/mem at 0x2f000000 mapped, 16 MiB",
        "agent: endpoint 1 of 2 attached (generation 1)",
        "agent: endpoint 1 of 2 attached (generation 2)",
        "agent: ready, serving the host",
        // (Its "System halted" line may come after the host powered off.)
        "power-off requested",
    ] {
        assert!(
            run.spawned.contains(want),
            "no \"{want}\" from the spawned kernel\n{}",
            run.report()
        );
    }
    let again = run
        .host
        .split("again: [")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no uptime from the second kernel\n{}", run.report()));
    assert!(
        again < 30.0,
        "the second boot's kernel has run {again} s: not a fresh kernel\n{}",
        run.report()
    );
    eprintln!(
        "multikernel host: mkctl boot, guest-init's agent on the rings, ping, traffic, exec, stop, release, boot again, power-off {:.2} s",
        run.elapsed.as_secs_f64()
    );
}

/// The same `mkctl boot` on a host booted without a pool: the kernel
/// refuses the device tree and says which boot parameter is missing; mkctl
/// reports the step with the kernel's words and leaves the machine as it
/// was (no instance, CPU 1 online, filesystem unmounted).
#[test]
fn mkctl_boot_without_a_pool_names_the_boot_parameter() {
    let kernel = mk_kernel();
    let s = Scratch::new("mk-nopool");
    let initrd = boot_initramfs(
        &s,
        &kernel,
        "cd /boot\n\
         mkctl boot mk.toml\n\
         echo \"mkctl-boot-exit=$?\"\n\
         echo \"after: cpus online $(cat /sys/devices/system/cpu/online)\"\n\
         echo \"after: mounted [$(grep multikernel /proc/mounts)]\"\n\
         echo \"after: kimage [$(cat /proc/kimage)]\"",
    );
    let run = Host::start(&s, &kernel, &initrd, "console=ttyS0 panic=-1", 1024).wait(timeout());
    assert!(run.exited, "QEMU did not power off\n{}", run.report());
    for want in [
        "multikernel: no pool (mkkernel_pool=<size>@<address>)",
        "step \"write the v1 device tree\" failed: write /sys/fs/multikernel/device_tree",
        "ENOMEM",
        // The kernel's own words, in mkctl's report.
        "  multikernel: device_tree: instance 'worker': there is no pool to take memory from; boot the host with mkkernel_pool=<size>@<address>",
        "rolled back:",
        "mkctl-boot-exit=1",
        "after: cpus online 0-1\r",
        "after: mounted []",
        "after: kimage []",
    ] {
        assert!(run.host.contains(want), "no \"{want}\"\n{}", run.report());
    }
    assert!(run.spawned.is_empty(), "{}", run.report());
}
