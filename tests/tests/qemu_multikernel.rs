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
         {SETTLE}\n\
         echo \"mk-host: user space up on $(uname -r)\"\n\
         {script}\n\
         echo mk-host: done\n\
         poweroff -f\n"
    );
    ir.file("/init", init, 0o755).expect("init");
    ir
}

/// Waits (5 s at most) for the kernel's switch to the refined TSC, whose
/// two lines come a second or more after boot and would otherwise land in
/// the middle of a line the script prints: the console is one stream.
const SETTLE: &str = "for i in $(seq 50); do \
     grep -qx tsc /sys/devices/system/clocksource/clocksource0/current_clocksource && break; \
     sleep 0.1; done";

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
    static_bin("mkctl", "mkctl")
}

/// Binary `bin` of package `package`, built as [`static_mkctl`] is (in the
/// target directory `qemu/setup.sh` uses for guest-init and testprogs).
fn static_bin(package: &str, bin: &str) -> PathBuf {
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
        .args(["build", "--quiet", "--release", "-p", package, "--bin", bin])
        .args(["--target", TRIPLE])
        .arg("--target-dir")
        .arg(&target)
        .output()
        .unwrap_or_else(|e| panic!("run cargo build for the static {bin}: {e}"));
    assert!(
        out.status.success(),
        "static build of {bin} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = target.join(TRIPLE).join("release").join(bin);
    assert!(
        is_static(&path),
        "{} is not statically linked",
        path.display()
    );
    path
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
    boot_initramfs_extra(s, kernel, script, guest, &[])
}

/// [`boot_initramfs_with`], and `extra` files in the host's initramfs.
fn boot_initramfs_extra(
    s: &Scratch,
    kernel: &Path,
    script: &str,
    guest: Option<&Path>,
    extra: &[(&str, &Path)],
) -> PathBuf {
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
    let mut files: Vec<(&str, &Path)> = vec![
        ("/bin/mkctl", &mkctl),
        ("/boot/bzImage", kernel),
        ("/boot/spawned.cpio", &spawned),
        ("/boot/mk.toml", &topology),
    ];
    files.extend_from_slice(extra);
    host_initramfs(script, &files)
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
         d=$(cat /run/mkctl/daemon.pid); kill -9 $d\n\
         for i in $(seq 50); do grep -q 'State:.*[RSDT]' /proc/$d/status 2>/dev/null || break; sleep 0.1; done\n\
         echo \"daemon $d killed\"\n\
         mkctl status\n\
         mkctl ping --count 5 host worker\n\
         echo \"adopted-ping-exit=$?\"\n\
         echo \"adopted-exec: [$(mkctl exec worker -- uname -r)] exit=$?\"\n\
         mkctl daemon restart\n\
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
        // The daemon killed: the next mkctl starts one, which takes the
        // running kernel back (its window in /dev/mem, not formatted
        // again) and talks to it; the stop below goes through it.
        "no daemon runs, but the last one left instances running: starting one to adopt them",
        "adopted-ping-exit=0",
        "adopted-exec: [7.2.13] exit=0",
        // And handed over on purpose: the next daemon takes it again.
        "; adopted worker (ready, kexec)",
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

/// The moves of [`a_process_moves_between_the_two_kernels`]: destination
/// and mode, so each direction is done lazily and by stop-and-copy.
const MOVES: [(&str, &str); 4] = [
    ("worker", "lazy"),
    ("host", "stop-copy"),
    ("worker", "stop-copy"),
    ("host", "lazy"),
];

/// Stage 6: a process moves from the host kernel to the kernel it spawned
/// and back, twice, with the same `mkctl migrate` as between any two
/// kernels (both sides run this one bzImage, so the same vDSO). The static
/// `mkcounter` (2 counting threads, 1 MiB of patterned heap, a line every
/// 100 ms) starts on the host from the initramfs' shell, its output into a
/// pipe read by `cat`; the daemon's host agent freezes it with ptrace and
/// streams it over the window's rings to guest-init's agent on the spawned
/// kernel, which restores it (lazily: the rest of its pages follow on
/// demand through userfaultfd); then guest-init's agent sends it back, and
/// so on, stop-and-copy each way too. After each move the original is gone
/// from the kernel it left, the copy runs on the other one under a pid of
/// that kernel, and nothing runs it where it was; its output comes back
/// through the moves to the same pipe. Its lines go on with no gap and no
/// repeat, each thread's counter never goes back, `CLOCK_MONOTONIC` goes on
/// across two kernels that booted at different moments (time namespaces),
/// and the checksum of its memory (on SIGUSR1) is the same on both sides.
#[test]
fn a_process_moves_between_the_two_kernels() {
    let kernel = mk_kernel();
    // Both agents that take part in a move (the daemon's, in this mkctl,
    // and guest-init's) and the program moved, from this tree.
    let guest_init = static_bin("guest-init", "guest-init");
    let mkcounter = static_bin("testprogs", "mkcounter");
    let s = Scratch::new("mk-move");
    let moves: String = MOVES
        .iter()
        .map(|(to, mode)| format!("{to}:{mode} "))
        .collect();
    let script = r#"
cd /boot
mkctl boot --timeout 60 mk.toml
echo "mkctl-boot-exit=$?"
# Runs a command on a kernel: here, or on the worker through its agent.
on() { k=$1; shift; if [ "$k" = host ]; then sh -c "$*"; else mkctl exec "$k" -- sh -c "$*"; fi; }
state() { on "$1" "if [ -e /proc/$2 ]; then set -- \$(cat /proc/$2/stat); echo \$3; else echo gone; fi"; }
lines() { grep -c '^seq=' /tmp/counter.log; }
/bin/mkcounter --mem 1M --threads 2 --interval-ms 100 </dev/null 2>&1 | cat > /tmp/counter.log &
reader=$!
for i in $(seq 1 100); do
  pid=$(pidof mkcounter); [ -n "$pid" ] && [ "$(lines)" -ge 10 ] && break; sleep 0.1
done
echo "move 0: pid $pid on host, $(lines) lines"
kill -USR1 "$pid"
where=host
hop=0
for step in @MOVES@; do
  to=${step%%:*}; mode=${step#*:}; hop=$((hop + 1))
  sleep 1
  t0=$(cut -d' ' -f1 /proc/uptime)
  mkctl migrate "$pid" --from "$where" --to "$to" --mode "$mode" --json > /tmp/move.json
  rc=$?
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "move $hop: $where -> $to ($mode) exit=$rc in $t0..$t1 s: $(cat /tmp/move.json)"
  [ "$rc" = 0 ] || break
  new=$(sed -n 's/.*"new_pid":\([0-9]*\).*/\1/p' /tmp/move.json)
  for i in $(seq 1 100); do st=$(state "$where" "$pid"); [ "$st" = gone ] && break; sleep 0.2; done
  echo "move $hop: the original $pid on $where: $st"
  echo "move $hop: pid $new on $to: $(on "$to" "cat /proc/$new/comm"), state $(state "$to" "$new")"
  echo "move $hop: mkcounter on the host: [$(pidof mkcounter)]"
  n1=$(lines); sleep 3; n2=$(lines)
  echo "move $hop: $n1 lines after the move, $n2 three seconds later"
  on "$to" "kill -USR1 $new"
  pid=$new; where=$to
done
sleep 1
kill -TERM "$pid"
for i in $(seq 1 300); do kill -0 "$reader" 2>/dev/null || break; sleep 0.1; done
echo "end: the reader is $(kill -0 "$reader" 2>/dev/null && echo running || echo done), mkcounter on the host: [$(pidof mkcounter)]"
sed 's/^/counter: /' /tmp/counter.log
echo '--- daemon log (tail) ---'; tail -n 40 /run/mkctl/daemon.log; echo '--- end ---'
"#
    .replace("@MOVES@", moves.trim());
    let initrd = boot_initramfs_extra(
        &s,
        &kernel,
        &script,
        Some(&guest_init),
        &[("/bin/mkcounter", &mkcounter)],
    );
    let append = format!("console=ttyS0 panic=-1 {POOL_PARAM}");
    let run = Host::start(&s, &kernel, &initrd, &append, 1024)
        .wait(timeout().max(Duration::from_secs(600)));
    assert!(run.exited, "QEMU did not power off\n{}", run.report());
    let host = run.host.replace('\r', "");
    let line = |prefix: &str| -> &str {
        host.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no \"{prefix}\" line\n{}", run.report()))
    };
    assert!(host.contains("mkctl-boot-exit=0"), "{}", run.report());
    let pid0 = line("move 0: pid ")
        .split_whitespace()
        .nth(3)
        .and_then(|p| p.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no mkcounter started on the host\n{}", run.report()));
    let mut pid = pid0;
    let mut from = "host";
    for (n, (to, mode)) in MOVES.iter().enumerate() {
        let hop = n + 1;
        let head = line(&format!("move {hop}: {from} -> {to} ({mode}) exit="));
        assert!(
            head.contains(" exit=0 "),
            "move {hop} failed: {head}\n{}",
            run.report()
        );
        let json = &head[head.find('{').unwrap_or(head.len() - 1)..];
        let r: serde_json::Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("move {hop}: {e}: {json}\n{}", run.report()));
        let new = r["new_pid"].as_u64().expect("new_pid") as u32;
        assert_eq!(r["pid"], pid, "{head}");
        assert_eq!(r["mode"], *mode, "{head}");
        eprintln!(
            "move {hop}: {from} -> {to} ({mode}): downtime {:.1} ms, total {:.1} ms, {} bytes, {} pages",
            r["downtime_ns"].as_f64().unwrap_or(0.0) / 1e6,
            r["total_ns"].as_f64().unwrap_or(0.0) / 1e6,
            r["bytes"],
            r["pages"]
        );
        // The daemon said where it runs as soon as it did.
        assert!(
            host.contains(&format!("[{to}] running as pid {new} after ")),
            "move {hop}: no progress line\n{}",
            run.report()
        );
        // The original is gone from the kernel it left (killed, and reaped
        // by its parent there).
        assert_eq!(
            line(&format!("move {hop}: the original {pid} on {from}: ")),
            format!("move {hop}: the original {pid} on {from}: gone"),
            "{}",
            run.report()
        );
        // The copy runs on the destination under a pid of that kernel.
        let runs = line(&format!("move {hop}: pid {new} on {to}: "));
        assert!(
            runs.starts_with(&format!("move {hop}: pid {new} on {to}: mkcounter, state "))
                && !runs.ends_with("gone")
                && !runs.ends_with(" Z"),
            "{runs}\n{}",
            run.report()
        );
        // Nothing runs it on the host while it is on the worker; on the
        // host it is the copy alone.
        let here = line(&format!("move {hop}: mkcounter on the host: "));
        let want = if *to == "host" {
            new.to_string()
        } else {
            String::new()
        };
        assert_eq!(
            here,
            format!("move {hop}: mkcounter on the host: [{want}]"),
            "{}",
            run.report()
        );
        // And it counts there: its lines go on.
        let counts: Vec<u64> = host
            .lines()
            .find(|l| {
                l.starts_with(&format!("move {hop}: ")) && l.contains(" lines after the move")
            })
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // ("move N: A lines after the move, B three seconds later")
        assert!(
            counts.len() == 2 && counts[1] >= counts[0] + 10,
            "move {hop}: no output from {to} after the move: {counts:?}\n{}",
            run.report()
        );
        pid = new;
        from = to;
    }
    // The whole output, through the moves, in the pipe it started on.
    let out: Vec<&str> = host
        .lines()
        .filter_map(|l| l.strip_prefix("counter: "))
        .collect();
    let seqs: Vec<(u64, Vec<u64>, u64)> = out
        .iter()
        .filter(|l| l.starts_with("seq="))
        .map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix(k))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("no {k} in {l:?}"))
            };
            (
                field("seq="),
                vec![field("t0="), field("t1=")],
                field("mono_ms="),
            )
        })
        .collect();
    assert!(seqs.len() > 100, "{} lines\n{}", seqs.len(), run.report());
    assert_eq!(seqs[0].0, 1, "{}", run.report());
    for w in seqs.windows(2) {
        let ((a, ta, ma), (b, tb, mb)) = (&w[0], &w[1]);
        assert_eq!(*b, a + 1, "gap or repeat between seq {a} and {b}");
        for (i, (x, y)) in ta.iter().zip(tb).enumerate() {
            assert!(
                y >= x,
                "thread {i}'s counter went back from {x} to {y} (seq {b})"
            );
        }
        // A line every 100 ms; the time it was frozen does not show (the
        // spawned kernel booted seconds after the host: without a time
        // namespace the clock would jump back on the way there).
        assert!(
            mb >= ma && mb - ma < 3000,
            "CLOCK_MONOTONIC went from {ma} to {mb} ms (seq {b})"
        );
    }
    let sums: Vec<&str> = out
        .iter()
        .copied()
        .filter(|l| l.starts_with("checksum="))
        .collect();
    assert_eq!(
        sums.len(),
        MOVES.len() + 1,
        "one checksum before the moves and one after each: {sums:?}\n{}",
        run.report()
    );
    assert!(
        sums.iter().all(|c| *c == sums[0]),
        "its memory changed: {sums:?}"
    );
    // Its end: SIGTERM on the host, and the reader saw the pipe close.
    assert!(
        host.contains("end: the reader is done, mkcounter on the host: []"),
        "{}",
        run.report()
    );
    eprintln!(
        "multikernel host: mkctl boot, mkcounter host -> worker -> host -> worker -> host ({} lines, no gap), power-off {:.2} s",
        seqs.len(),
        run.elapsed.as_secs_f64()
    );
}
