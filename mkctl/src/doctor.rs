//! `mkctl doctor`: what each backend needs on this machine, checked one
//! piece at a time, each found ok or missing with what to do about it.
//!
//! - the QEMU backend: the QEMU binary, the guest kernel, the other stock
//!   kernels (`kernel = "auto-6.12"`: missing only counts when the topology
//!   asks for one) and what the guests' initramfs is built from (the cache
//!   `scripts/setup.sh` fills),
//!   room in `/dev/shm` for a topology's guest RAM and window, and no
//!   instances left running by a daemon that is gone;
//! - moving processes to and from the host kernel (`migrate`, `checkpoint`,
//!   `restore` with `host`): userfaultfd, ptrace, time namespaces;
//! - the kexec backend: the multikernel interface and the kernel options
//!   it needs.
//!
//! It only reads, and every path it reads is under the sysroot (`/` on a
//! real host), so tests lay out fake roots. What it reads about the kexec
//! backend comes from the code the backend itself uses
//! ([`crate::host::multikernel`], [`crate::host::kconfig`]), so the two
//! cannot disagree. The one thing it runs is `<qemu> --version`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::exit::{EXIT_FAIL, EXIT_OK};
use crate::host::kconfig;
use crate::host::multikernel::{self, Generation, MOUNT_POINT};
use crate::initramfs::is_static;
use crate::topology::{Backend as TopologyBackend, ImageSpec, KernelSeries, Topology};
use crate::units::ByteSize;

/// What a check is needed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Need {
    /// Booting instances under QEMU.
    Qemu,
    /// Moving processes to and from the host kernel.
    Migration,
    /// Booting instances through the multikernel interface.
    Kexec,
}

impl Need {
    pub fn as_str(self) -> &'static str {
        match self {
            Need::Qemu => "qemu",
            Need::Migration => "migration",
            Need::Kexec => "kexec",
        }
    }

    /// Whether a missing piece makes `doctor` fail: the kexec backend
    /// needs a multikernel host kernel, which most machines do not run; its
    /// lack means "not available here", not an error.
    pub fn required(self) -> bool {
        self != Need::Kexec
    }
}

/// One piece, found ok or missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// A stable name for scripts (`qemu`, `guest-kernel`, `CONFIG_...`).
    pub name: String,
    /// What needs it (`backend` in the JSON, as scripts read it).
    #[serde(rename = "backend")]
    pub need: Need,
    pub ok: bool,
    /// What was found (or not), with the path or value read.
    pub detail: String,
    /// What to do when it is missing.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &str, need: Need, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            need,
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn missing(name: &str, need: Need, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            need,
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Where to look: the sysroot and the paths mkctl itself would use (from
/// its environment, see [`Env::from_process`]). Absolute paths are read
/// under the sysroot.
#[derive(Debug, Clone)]
pub struct Env {
    pub sysroot: PathBuf,
    /// `$MKCTL_QEMU`, or `qemu-system-x86_64` (looked up on `path`).
    pub qemu: PathBuf,
    /// The directories of `$PATH`.
    pub path: Vec<PathBuf>,
    /// The guest kernel (`kernel = "auto"`).
    pub kernel: PathBuf,
    /// The static guest-init (`initrd = "auto"`).
    pub guest_init: PathBuf,
    /// The guest kernel's modules for the doorbell port.
    pub kernel_modules: PathBuf,
    /// The other stock kernels (`kernel = "auto-6.12"`): each one's image
    /// and modules directory.
    pub series: Vec<(KernelSeries, PathBuf, PathBuf)>,
    /// Where guest RAM files go: `$MKCTL_RAM_DIR`, or `/dev/shm`.
    pub ram_dir: PathBuf,
    /// The daemon's run directory (`$MKCTL_RUN_DIR`, or `/run/mkctl`).
    pub run_dir: PathBuf,
}

impl Env {
    /// The paths this mkctl would use, read under `sysroot`.
    pub fn from_process(sysroot: &Path) -> Env {
        use crate::daemon::paths;
        Env {
            sysroot: sysroot.to_path_buf(),
            qemu: std::env::var_os("MKCTL_QEMU")
                .filter(|q| !q.is_empty())
                .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from),
            path: std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default(),
            kernel: paths::auto_kernel(),
            guest_init: paths::guest_init(),
            kernel_modules: paths::auto_kernel_modules(),
            series: KernelSeries::ALL
                .into_iter()
                .map(|k| (k, paths::series_kernel(k), paths::series_kernel_modules(k)))
                .collect(),
            ram_dir: std::env::var_os("MKCTL_RAM_DIR")
                .map_or_else(|| PathBuf::from("/dev/shm"), PathBuf::from),
            run_dir: crate::daemon::paths::RunDir::from_env().0,
        }
    }

    /// `p` as read under the sysroot.
    fn at(&self, p: &Path) -> PathBuf {
        if self.sysroot == Path::new("/") {
            return p.to_path_buf();
        }
        self.sysroot.join(p.strip_prefix("/").unwrap_or(p))
    }

    fn read(&self, p: &str) -> Option<String> {
        std::fs::read_to_string(self.at(Path::new(p))).ok()
    }
}

/// The topology `doctor` sizes `/dev/shm` against.
#[derive(Debug)]
pub enum Sizing<'a> {
    /// No topology was found (no `--topology`, no `configs/demo.toml`).
    None,
    /// The topology file could not be loaded: why.
    Unusable { file: PathBuf, why: String },
    Topology {
        file: PathBuf,
        topology: &'a Topology,
    },
}

/// Every check, in the order they print.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

/// Runs every check.
pub fn run(env: &Env, sizing: &Sizing<'_>) -> Report {
    let privileged = ptrace_capable(env);
    let mut checks = vec![qemu(env), guest_kernel(env)];
    checks.extend(
        env.series
            .iter()
            .map(|(k, kernel, modules)| series_kernel(env, sizing, *k, kernel, modules)),
    );
    checks.extend([
        guest_initramfs(env),
        shm(env, sizing),
        left_running(env),
        userfaultfd(env, privileged),
        ptrace(env, privileged),
        time_namespaces(env),
        multikernel_interface(env),
    ]);
    checks.extend(kernel_options(env));
    Report { checks }
}

impl Report {
    /// Whether what `need` needs is all there.
    pub fn ready(&self, need: Need) -> bool {
        self.checks.iter().filter(|c| c.need == need).all(|c| c.ok)
    }

    /// 0 when everything the QEMU backend and migration with the host need
    /// is there (whatever the kexec backend lacks); 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.checks.iter().all(|c| c.ok || !c.need.required()) {
            EXIT_OK
        } else {
            EXIT_FAIL
        }
    }

    /// One line per check, then a summary per backend.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let state = match (c.ok, c.need.required()) {
                (true, _) => "ok",
                (false, true) => "MISSING",
                (false, false) => "n/a",
            };
            let _ = write!(
                out,
                "{state:<8} {:<10} {:<19} {}",
                c.need.as_str(),
                c.name,
                c.detail
            );
            if let Some(fix) = &c.fix {
                let _ = write!(out, " -> {fix}");
            }
            out.push('\n');
        }
        let say = |ready: bool, yes: &str, no: &str| {
            if ready {
                yes.to_string()
            } else {
                no.to_string()
            }
        };
        let _ = writeln!(
            out,
            "QEMU backend: {}; migration with the host: {}; kexec backend: {}",
            say(
                self.ready(Need::Qemu),
                "ready",
                "NOT READY (see MISSING above)"
            ),
            say(
                self.ready(Need::Migration),
                "ready",
                "NOT READY (see MISSING above)"
            ),
            say(
                self.ready(Need::Kexec),
                "ready",
                "not available here (needs a multikernel host kernel)"
            ),
        );
        out
    }

    /// The `--json` object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ok": self.exit_code() == EXIT_OK,
            "qemu_ready": self.ready(Need::Qemu),
            "migration_ready": self.ready(Need::Migration),
            "kexec_ready": self.ready(Need::Kexec),
            "checks": self.checks,
        })
    }
}

const SETUP: &str =
    "run scripts/setup.sh (it fills the cache), or set MKCTL_CACHE to a cache it filled";

fn qemu(env: &Env) -> Check {
    const NAME: &str = "qemu";
    let found = if env.qemu.components().count() > 1 {
        Some(env.at(&env.qemu)).filter(|p| p.is_file())
    } else {
        env.path
            .iter()
            .map(|d| env.at(&d.join(&env.qemu)))
            .find(|p| p.is_file())
    };
    let install = "apt-get install qemu-system-x86 (scripts/setup.sh does), or set MKCTL_QEMU to a qemu-system-x86_64";
    let Some(bin) = found else {
        return Check::missing(
            NAME,
            Need::Qemu,
            format!("{} not found (PATH, MKCTL_QEMU)", env.qemu.display()),
            install,
        );
    };
    match version_output(&bin) {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let version = text.lines().next().unwrap_or("").trim();
            Check::ok(NAME, Need::Qemu, format!("{}: {version}", bin.display()))
        }
        Ok(out) => Check::missing(
            NAME,
            Need::Qemu,
            format!(
                "{} --version failed ({}): {}",
                bin.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            install,
        ),
        Err(e) => Check::missing(
            NAME,
            Need::Qemu,
            format!("cannot run {}: {e}", bin.display()),
            install,
        ),
    }
}

/// `<bin> --version`. A binary that was just written (being installed, or
/// a test's fake) can be busy for a moment while another thread's fork
/// still holds it open for writing: try again then.
fn version_output(bin: &Path) -> std::io::Result<std::process::Output> {
    let mut tries = 0;
    loop {
        match Command::new(bin).arg("--version").output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn guest_kernel(env: &Env) -> Check {
    const NAME: &str = "guest-kernel";
    let kernel = env.at(&env.kernel);
    match std::fs::metadata(&kernel) {
        Ok(m) if m.is_file() && m.len() > 0 => Check::ok(
            NAME,
            Need::Qemu,
            format!("{}{}", kernel.display(), release(&kernel)),
        ),
        _ => Check::missing(
            NAME,
            Need::Qemu,
            format!("{} does not exist", kernel.display()),
            format!("{SETUP} (MKCTL_KERNEL names another kernel image)"),
        ),
    }
}

/// " (release R)" from the `version` file next to a cached kernel.
fn release(kernel: &Path) -> String {
    kernel
        .parent()
        .and_then(|d| std::fs::read_to_string(d.join("version")).ok())
        .map(|v| format!(" (release {})", v.trim()))
        .unwrap_or_default()
}

/// Another stock kernel (`kernel = "auto-6.12"`): ok when it is there;
/// missing only when the topology asks for it (a machine set up before
/// `qemu/setup.sh` fetched it boots every other topology).
fn series_kernel(
    env: &Env,
    sizing: &Sizing<'_>,
    k: KernelSeries,
    kernel: &Path,
    modules: &Path,
) -> Check {
    let name = format!("guest-kernel-{}", k.as_str());
    let spelling = k.spelling();
    let kernel = env.at(kernel);
    let modules = env.at(modules);
    if std::fs::metadata(&kernel).is_ok_and(|m| m.is_file() && m.len() > 0) {
        let no_modules = if modules.is_dir() {
            String::new()
        } else {
            format!(
                "; no modules at {} (its guests poll instead; scripts/setup.sh copies them)",
                modules.display()
            )
        };
        return Check::ok(
            &name,
            Need::Qemu,
            format!("{}{}{no_modules}", kernel.display(), release(&kernel)),
        );
    }
    let asking: Vec<&str> = match sizing {
        Sizing::Topology { topology, .. } => topology
            .instances
            .iter()
            .filter(|i| i.kernel == ImageSpec::AutoSeries(k))
            .map(|i| i.name.as_str())
            .collect(),
        Sizing::None | Sizing::Unusable { .. } => Vec::new(),
    };
    match sizing {
        Sizing::Topology { file, .. } if !asking.is_empty() => Check::missing(
            &name,
            Need::Qemu,
            format!(
                "{} does not exist, and {} asks for kernel = \"{spelling}\" ({})",
                kernel.display(),
                file.display(),
                asking.join(", ")
            ),
            SETUP,
        ),
        _ => Check::ok(
            &name,
            Need::Qemu,
            format!(
                "not fetched ({} does not exist): only kernel = \"{spelling}\" needs it, and qemu/setup.sh fetches it",
                kernel.display()
            ),
        ),
    }
}

/// What mkctl builds each guest's initramfs from: the static guest-init
/// and the host's static busybox (the guests' shell for `exec`); the
/// doorbell modules are optional (without them the guests poll).
fn guest_initramfs(env: &Env) -> Check {
    const NAME: &str = "guest-initramfs";
    let init = env.at(&env.guest_init);
    if !init.is_file() {
        return Check::missing(
            NAME,
            Need::Qemu,
            format!("no static guest-init at {}", init.display()),
            format!("{SETUP} (MKCTL_GUEST_INIT names another guest-init)"),
        );
    }
    if !is_static(&init) {
        return Check::missing(
            NAME,
            Need::Qemu,
            format!(
                "{} is not a static x86-64 executable: guests have no libc",
                init.display()
            ),
            SETUP,
        );
    }
    let busybox = env.at(Path::new(crate::initramfs::HOST_BUSYBOX));
    if !is_static(&busybox) {
        return Check::missing(
            NAME,
            Need::Qemu,
            format!(
                "guest-init {} ok, but {} is missing or not static: guests would have no shell for `mkctl exec`",
                init.display(),
                busybox.display()
            ),
            "apt-get install busybox-static (scripts/setup.sh does)",
        );
    }
    let modules = env.at(&env.kernel_modules);
    let doorbell = if modules.is_dir() {
        String::new()
    } else {
        format!(
            "; no doorbell modules at {} (guests poll instead; scripts/setup.sh copies them)",
            modules.display()
        )
    };
    Check::ok(
        NAME,
        Need::Qemu,
        format!(
            "guest-init {}, busybox {}{doorbell}",
            init.display(),
            busybox.display()
        ),
    )
}

/// Room for the guests' RAM files and the window: the topology's QEMU
/// instances' memory plus its window, against what the RAM directory's
/// filesystem has free.
fn shm(env: &Env, sizing: &Sizing<'_>) -> Check {
    const NAME: &str = "shm";
    let dir = env.at(&env.ram_dir);
    // $MKCTL_RAM_DIR may not exist yet: the daemon creates it; its
    // filesystem is that of the nearest existing parent.
    let Some(existing) = dir.ancestors().find(|d| d.is_dir()) else {
        return Check::missing(
            NAME,
            Need::Qemu,
            format!("no {}", dir.display()),
            "set MKCTL_RAM_DIR to a directory on a tmpfs",
        );
    };
    if env.ram_dir == Path::new("/dev/shm") && existing != dir {
        return Check::missing(
            NAME,
            Need::Qemu,
            format!("no {}: guest RAM has nowhere to go", dir.display()),
            "mount a tmpfs there (mount -t tmpfs tmpfs /dev/shm), or set MKCTL_RAM_DIR to a directory on a tmpfs",
        );
    }
    let free = match nix::sys::statvfs::statvfs(existing) {
        Ok(s) => s.blocks_available().saturating_mul(s.fragment_size()),
        Err(e) => {
            return Check::missing(
                NAME,
                Need::Qemu,
                format!("statvfs({}): {e}", existing.display()),
                "check that the directory is readable (run as the daemon's user)",
            )
        }
    };
    let free_h = ByteSize(free).human();
    match sizing {
        Sizing::None => Check::ok(
            NAME,
            Need::Qemu,
            format!(
                "{} free in {} (no topology found to size against: give --topology FILE)",
                free_h,
                dir.display()
            ),
        ),
        Sizing::Unusable { file, why } => Check::missing(
            NAME,
            Need::Qemu,
            format!(
                "{free_h} free in {}, but {} cannot be read to size against: {why}",
                dir.display(),
                file.display()
            ),
            "fix the topology (mkctl validate FILE), or give another with --topology FILE",
        ),
        Sizing::Topology { file, topology } => {
            let guests: Vec<_> = topology
                .instances
                .iter()
                .filter(|i| i.backend == TopologyBackend::Qemu)
                .collect();
            let ram: u64 = guests.iter().map(|i| i.memory.size()).sum();
            // The window is a file only for QEMU guests (kexec instances
            // share physical memory).
            let window = if guests.is_empty() {
                0
            } else {
                topology.window.size.0
            };
            let need = ram.saturating_add(window);
            let what = format!(
                "{} needs {} ({} guest RAM for {} QEMU instance(s) + {} window)",
                file.display(),
                ByteSize(need).human(),
                ByteSize(ram).human(),
                guests.len(),
                ByteSize(window).human()
            );
            if free >= need {
                Check::ok(
                    NAME,
                    Need::Qemu,
                    format!("{free_h} free in {}; {what}", dir.display()),
                )
            } else {
                Check::missing(
                    NAME,
                    Need::Qemu,
                    format!("only {free_h} free in {}; {what}", dir.display()),
                    format!(
                        "free space there (stale {}/mkctl-* directories of daemons that were killed can go), \
                         enlarge it (mount -o remount,size=... {}), set MKCTL_RAM_DIR to a larger tmpfs, \
                         or boot a smaller topology",
                        env.ram_dir.display(),
                        env.ram_dir.display()
                    ),
                )
            }
        }
    }
}

/// Whether this process may do what only root or `CAP_SYS_PTRACE` may
/// (attach to any process, an unprivileged userfaultfd when the sysctl
/// forbids it): `CapEff` of `/proc/self/status`, else its effective uid.
/// The start time in `/proc/<pid>/stat` under the sysroot, if it runs.
fn started(env: &Env, pid: u32) -> Option<u64> {
    let stat = env.read(&format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    if matches!(f.next()?, "Z" | "X") {
        return None;
    }
    f.nth(18)?.parse().ok()
}

/// QEMU instances whose daemon is gone (killed, crashed): its state file
/// lists them, they still run, and its pid does not.
fn left_running(env: &Env) -> Check {
    const NAME: &str = "instances";
    let state = env.at(&env.run_dir.join("state.json"));
    let Ok(Some(saved)) = crate::daemon::saved::Saved::load(&state) else {
        return Check::ok(NAME, Need::Qemu, "none left running without a daemon");
    };
    let daemon = env
        .read(&env.run_dir.join("daemon.pid").to_string_lossy())
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|&p| started(env, p).is_some());
    let left: Vec<String> = saved
        .instances
        .iter()
        .filter_map(|i| match i.qemu {
            Some((pid, start)) => {
                (started(env, pid) == Some(start)).then(|| format!("{} (qemu pid {pid})", i.name))
            }
            // No process tells whether its kernel still runs: what the
            // state file says is all there is.
            None => (i.kexec
                && saved.kexec_window.is_some()
                && matches!(
                    i.state(),
                    crate::daemon::state::State::Ready | crate::daemon::state::State::Booting
                ))
            .then(|| format!("{} (a kexec instance)", i.name)),
        })
        .collect();
    match (daemon, left.is_empty()) {
        (Some(pid), _) => Check::ok(
            NAME,
            Need::Qemu,
            format!("the daemon (pid {pid}) serves {}", env.run_dir.display()),
        ),
        (None, true) => Check::ok(NAME, Need::Qemu, "none left running without a daemon"),
        (None, false) => Check::missing(
            NAME,
            Need::Qemu,
            format!(
                "{} run{} with no daemon in {} (it was killed or crashed)",
                left.join(", "),
                if left.len() == 1 { "s" } else { "" },
                env.run_dir.display()
            ),
            "`mkctl daemon restart` adopts them (any mkctl command that needs the daemon does too); `mkctl daemon stop` stops them",
        ),
    }
}

fn ptrace_capable(env: &Env) -> bool {
    const CAP_SYS_PTRACE: u32 = 19;
    let Some(status) = env.read("/proc/self/status") else {
        return false;
    };
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
    };
    if let Some(caps) = field("CapEff:").and_then(|c| u64::from_str_radix(c, 16).ok()) {
        return caps & (1 << CAP_SYS_PTRACE) != 0;
    }
    field("Uid:")
        .and_then(|u| u.split_whitespace().nth(1))
        .is_some_and(|euid| euid == "0")
}

fn userfaultfd(env: &Env, privileged: bool) -> Check {
    const NAME: &str = "userfaultfd";
    let file = "/proc/sys/vm/unprivileged_userfaultfd";
    let at = env.at(Path::new(file));
    match env.read(file).as_deref().map(str::trim) {
        None => Check::missing(
            NAME,
            Need::Migration,
            format!(
                "no {}: this kernel has no userfaultfd (CONFIG_USERFAULTFD), so a lazy move to the host cannot fetch its pages",
                at.display()
            ),
            "move processes to the host with --mode stop-copy, or boot a host kernel with CONFIG_USERFAULTFD=y",
        ),
        Some("1") => Check::ok(
            NAME,
            Need::Migration,
            "vm.unprivileged_userfaultfd = 1: available to every user",
        ),
        Some(v) if privileged => Check::ok(
            NAME,
            Need::Migration,
            format!("vm.unprivileged_userfaultfd = {v}, and mkctl runs with CAP_SYS_PTRACE"),
        ),
        Some(v) => Check::missing(
            NAME,
            Need::Migration,
            format!("vm.unprivileged_userfaultfd = {v} and mkctl runs without CAP_SYS_PTRACE: a lazy move to the host cannot create its userfaultfd"),
            "run mkctl as root, or sysctl -w vm.unprivileged_userfaultfd=1",
        ),
    }
}

fn ptrace(env: &Env, privileged: bool) -> Check {
    const NAME: &str = "ptrace";
    let file = "/proc/sys/kernel/yama/ptrace_scope";
    let Some(scope) = env.read(file) else {
        return Check::ok(
            NAME,
            Need::Migration,
            format!(
                "no {} (no Yama): attaching is limited by ordinary permissions only",
                env.at(Path::new(file)).display()
            ),
        );
    };
    let detail = |what: &str| format!("kernel.yama.ptrace_scope = {}: {what}", scope.trim());
    match scope.trim() {
        "0" => Check::ok(NAME, Need::Migration, detail("any process of the same user")),
        "1" | "2" if privileged => Check::ok(
            NAME,
            Need::Migration,
            detail("mkctl runs with CAP_SYS_PTRACE, which may attach"),
        ),
        "1" => Check::missing(
            NAME,
            Need::Migration,
            detail("only descendants, and mkctl runs without CAP_SYS_PTRACE: it cannot freeze a host process to move it"),
            "run mkctl as root, or sysctl -w kernel.yama.ptrace_scope=0",
        ),
        "2" => Check::missing(
            NAME,
            Need::Migration,
            detail("only with CAP_SYS_PTRACE, which mkctl runs without"),
            "run mkctl as root",
        ),
        _ => Check::missing(
            NAME,
            Need::Migration,
            detail("no process may attach, not even root: mkctl cannot freeze a host process to move or checkpoint it"),
            "scope 3 cannot be lowered until reboot: boot with a lower kernel.yama.ptrace_scope (sysctl.d), and move processes between guests only meanwhile",
        ),
    }
}

fn time_namespaces(env: &Env) -> Check {
    const NAME: &str = "time-namespaces";
    let ns = env.at(Path::new("/proc/self/ns/time"));
    if std::fs::symlink_metadata(&ns).is_ok() {
        Check::ok(
            NAME,
            Need::Migration,
            format!(
                "{} exists: a process moved to the host keeps its clocks",
                ns.display()
            ),
        )
    } else {
        Check::missing(
            NAME,
            Need::Migration,
            format!(
                "no {}: this kernel has no time namespaces (Linux 5.6+, CONFIG_TIME_NS), so a process restored on the host cannot keep its CLOCK_MONOTONIC",
                ns.display()
            ),
            "boot a host kernel with CONFIG_TIME_NS=y (Linux 5.6 or later)",
        )
    }
}

fn multikernel_interface(env: &Env) -> Check {
    const NAME: &str = "multikernel";
    let (mk, _) = multikernel::discover(&env.sysroot);
    let mp = env.at(Path::new(MOUNT_POINT));
    let boot_one = "boot a host kernel built from GitHub multikernel/linux (v7.0-mk2 or later) \
                    with CONFIG_MULTIKERNEL=y (README: Running on a multikernel kernel); \
                    meanwhile use backend = \"qemu\"";
    if !mk.present {
        return Check::missing(
            NAME,
            Need::Kexec,
            format!(
                "no {}: this kernel has no multikernel interface",
                mp.display()
            ),
            boot_one,
        );
    }
    if let Some(other) = &mk.other_mount {
        return Check::missing(
            NAME,
            Need::Kexec,
            format!("{} has a {other} filesystem mounted on it", mp.display()),
            format!("umount {MOUNT_POINT} (mkctl boot mounts the multikernel filesystem there)"),
        );
    }
    match mk.generation {
        Some(Generation::Descriptors) => Check::missing(
            NAME,
            Need::Kexec,
            format!(
                "{} is there, interface generation descriptors ({}), which mkctl does not speak yet",
                mp.display(),
                Generation::Descriptors.evidence()
            ),
            "boot a host kernel of the v1 or current generation (multikernel/linux v7.0-mk2 to mk4)",
        ),
        Some(g) if mk.mounted => Check::ok(
            NAME,
            Need::Kexec,
            format!(
                "{} mounted, interface generation {} ({})",
                mp.display(),
                g.as_str(),
                g.evidence()
            ),
        ),
        None if mk.mounted => Check::missing(
            NAME,
            Need::Kexec,
            format!(
                "{} is mounted but has neither overlays/ nor device_tree: unknown interface generation",
                mp.display()
            ),
            boot_one,
        ),
        _ => Check::ok(
            NAME,
            Need::Kexec,
            format!("{} is there, not mounted yet (mkctl boot mounts it)", mp.display()),
        ),
    }
}

/// One check per option of [`kconfig::KEXEC_BACKEND_OPTIONS`].
fn kernel_options(env: &Env) -> Vec<Check> {
    let config = kconfig::read(&env.sysroot);
    kconfig::KEXEC_BACKEND_OPTIONS
        .iter()
        .map(|opt| match &config {
            Some(c) if c.enabled(opt) => {
                Check::ok(opt, Need::Kexec, format!("{opt}=y ({})", c.source.display()))
            }
            Some(c) => Check::missing(
                opt,
                Need::Kexec,
                format!(
                    "{opt} is {} ({})",
                    c.options
                        .get(*opt)
                        .map_or_else(|| "not set".to_string(), |v| format!("={v}")),
                    c.source.display()
                ),
                format!("boot a host kernel built with {opt}=y (multikernel/linux v7.0-mk2 or later)"),
            ),
            None => Check::missing(
                opt,
                Need::Kexec,
                format!(
                    "{opt} cannot be checked: neither {} nor {} is readable",
                    env.at(Path::new("/proc/config.gz")).display(),
                    env.at(Path::new("/boot/config-<release>")).display()
                ),
                "modprobe configs (for /proc/config.gz), or install the kernel's /boot/config-<release>",
            ),
        })
        .collect()
}

/// The topology `doctor` sizes against when given none: `configs/demo.toml`
/// of the checkout mkctl is run from or was built in.
pub fn default_topology() -> Option<PathBuf> {
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    let found = [cwd.as_deref(), exe.as_deref()]
        .into_iter()
        .flatten()
        .flat_map(Path::ancestors)
        .map(|d| d.join("configs/demo.toml"))
        .find(|f| f.is_file());
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// A minimal 64-bit x86 ELF header with no program interpreter: what
    /// [`is_static`] calls static.
    fn static_elf() -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2; // 64-bit
        h[5] = 1; // little-endian
        h[6] = 1; // version
        h[16] = 2; // ET_EXEC
        h[18] = 0x3e; // x86-64
        h[20] = 1; // version
        h[52] = 64; // e_ehsize
        h[54] = 56; // e_phentsize
        h[58] = 64; // e_shentsize
        h
    }

    /// A fake root where every check passes, as root would see it on a
    /// multikernel host of the current generation.
    struct Root {
        dir: tempfile::TempDir,
    }

    impl Root {
        fn all_ok() -> Root {
            let r = Root {
                dir: tempfile::tempdir().unwrap(),
            };
            r.write_exec(
                "usr/bin/qemu-system-x86_64",
                "#!/bin/sh\necho 'QEMU emulator version 7.2.22 (fake)'\n",
            );
            r.write("cache/kernel/vmlinuz", "not really a kernel");
            r.write("cache/kernel/version", "6.1.0-test\n");
            r.write("cache/kernel/modules/virtio.ko", "");
            r.write("cache/kernel-6.12/vmlinuz", "not really a kernel either");
            r.write("cache/kernel-6.12/version", "6.12.0-test\n");
            r.write("cache/kernel-6.12/modules/unix_diag.ko", "");
            r.write_bytes("cache/guest-init", &static_elf());
            r.write_bytes("bin/busybox", &static_elf());
            fs::create_dir_all(r.path("dev/shm")).unwrap();
            r.write(
                "proc/self/status",
                "Name:\tmkctl\nUid:\t0\t0\t0\t0\nCapEff:\t000001ffffffffff\n",
            );
            r.write("proc/sys/vm/unprivileged_userfaultfd", "0\n");
            r.write("proc/sys/kernel/yama/ptrace_scope", "1\n");
            fs::create_dir_all(r.path("proc/self/ns")).unwrap();
            std::os::unix::fs::symlink("time:[4026531834]", r.path("proc/self/ns/time")).unwrap();
            fs::create_dir_all(r.path("sys/fs/multikernel/overlays")).unwrap();
            r.write("proc/kimage", "");
            r.write(
                "proc/mounts",
                "sysfs /sys sysfs rw 0 0\nnone /sys/fs/multikernel multikernel rw 0 0\n",
            );
            r.write("proc/filesystems", "nodev\tsysfs\nnodev\tmultikernel\n");
            r.write("proc/sys/kernel/osrelease", "7.0.0-mk2\n");
            r.write(
                "boot/config-7.0.0-mk2",
                "CONFIG_MULTIKERNEL=y\nCONFIG_KEXEC_FILE=y\n",
            );
            r
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn write_bytes(&self, rel: &str, bytes: &[u8]) {
            let p = self.path(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, bytes).unwrap();
        }

        fn write(&self, rel: &str, text: &str) {
            self.write_bytes(rel, text.as_bytes());
        }

        fn write_exec(&self, rel: &str, text: &str) {
            self.write(rel, text);
            fs::set_permissions(self.path(rel), fs::Permissions::from_mode(0o755)).unwrap();
        }

        fn remove(&self, rel: &str) {
            let p = self.path(rel);
            if p.is_dir() {
                fs::remove_dir_all(p).unwrap();
            } else {
                fs::remove_file(p).unwrap();
            }
        }

        fn env(&self) -> Env {
            Env {
                sysroot: self.dir.path().to_path_buf(),
                qemu: "qemu-system-x86_64".into(),
                path: vec!["/usr/local/bin".into(), "/usr/bin".into()],
                kernel: "/cache/kernel/vmlinuz".into(),
                guest_init: "/cache/guest-init".into(),
                kernel_modules: "/cache/kernel/modules".into(),
                series: vec![(
                    KernelSeries::V6_12,
                    "/cache/kernel-6.12/vmlinuz".into(),
                    "/cache/kernel-6.12/modules".into(),
                )],
                ram_dir: "/dev/shm".into(),
                run_dir: "/run/mkctl".into(),
            }
        }

        fn report(&self) -> Report {
            run(&self.env(), &Sizing::None)
        }
    }

    fn demo() -> Topology {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/demo.toml");
        crate::topology::load(&demo, || None).expect("the demo topology loads")
    }

    fn check<'a>(r: &'a Report, name: &str) -> &'a Check {
        r.checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name} in {r:#?}"))
    }

    /// The check `name` reports missing, with a fix that mentions `fix`,
    /// and (for what the QEMU backend or migration need) doctor fails.
    #[track_caller]
    fn assert_missing(r: &Report, name: &str, detail: &str, fix: &str) {
        let c = check(r, name);
        assert!(!c.ok, "{name} should be missing:\n{}", r.render());
        assert!(
            c.detail.contains(detail),
            "{name}: detail {:?} lacks {detail:?}",
            c.detail
        );
        let f = c.fix.as_deref().unwrap_or_default();
        assert!(f.contains(fix), "{name}: fix {f:?} lacks {fix:?}");
        let others_ok = r.checks.iter().filter(|o| o.name != name).all(|o| o.ok);
        assert!(others_ok, "only {name} should be missing:\n{}", r.render());
        let code = if c.need.required() {
            EXIT_FAIL
        } else {
            EXIT_OK
        };
        assert_eq!(r.exit_code(), code, "{}", r.render());
        assert!(r.render().contains(fix), "{}", r.render());
    }

    #[test]
    fn a_complete_root_passes_every_check() {
        let root = Root::all_ok();
        let t = demo();
        let r = run(
            &root.env(),
            &Sizing::Topology {
                file: "demo.toml".into(),
                topology: &t,
            },
        );
        assert!(
            r.checks.iter().all(|c| c.ok && c.fix.is_none()),
            "{}",
            r.render()
        );
        assert_eq!(r.exit_code(), EXIT_OK);
        let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "qemu",
                "guest-kernel",
                "guest-kernel-6.12",
                "guest-initramfs",
                "shm",
                "instances",
                "userfaultfd",
                "ptrace",
                "time-namespaces",
                "multikernel",
                "CONFIG_MULTIKERNEL",
                "CONFIG_KEXEC_FILE"
            ]
        );
        assert!(check(&r, "qemu")
            .detail
            .contains("QEMU emulator version 7.2.22"));
        assert!(check(&r, "guest-kernel")
            .detail
            .contains("release 6.1.0-test"));
        assert!(check(&r, "guest-kernel-6.12")
            .detail
            .contains("release 6.12.0-test"));
        // demo.toml: two guests of 256 MiB and a 16 MiB window.
        assert!(
            check(&r, "shm")
                .detail
                .contains("needs 528M (512M guest RAM for 2 QEMU instance(s) + 16M window)"),
            "{}",
            check(&r, "shm").detail
        );
        assert!(check(&r, "multikernel")
            .detail
            .contains("generation current"));
        let json = r.to_json();
        assert_eq!(json["ok"], true);
        assert_eq!(json["kexec_ready"], true);
        let first = &json["checks"][0];
        assert_eq!(first["name"], "qemu");
        assert_eq!(first["backend"], "qemu");
        assert_eq!(first["ok"], true);
        assert!(first["fix"].is_null());
        assert!(r.render().ends_with(
            "QEMU backend: ready; migration with the host: ready; kexec backend: ready\n"
        ));
    }

    /// QEMUs a killed daemon left are named, with how to adopt them; once a
    /// daemon runs, or they are gone, nothing is said against them.
    #[test]
    fn instances_left_by_a_killed_daemon() {
        use crate::daemon::saved::{Saved, SavedInst, FORMAT};
        let root = Root::all_ok();
        let inst = |name: &str, pid: u32| SavedInst {
            name: name.into(),
            id: 1,
            cpus: "1".into(),
            memory: 1 << 28,
            state: "ready".into(),
            reason: None,
            qemu: Some((pid, 4242)),
            kernel: None,
            restart: crate::topology::Restart::No,
            restarts: 0,
            armed: false,
            kexec: false,
        };
        fs::create_dir_all(root.path("run/mkctl")).unwrap();
        let kexec = SavedInst {
            qemu: None,
            kexec: true,
            ..inst("gamma", 0)
        };
        Saved {
            format: FORMAT,
            config: None,
            names: vec![],
            instances: vec![inst("alpha", 300), inst("beta", 301), kexec],
            kexec_window: Some((0x2f00_0000, 16 << 20)),
        }
        .store(&root.path("run/mkctl/state.json"))
        .unwrap();
        let stat = |start: u64| {
            let fields: String = (4..=21).map(|f| format!(" {f}")).collect();
            format!("300 (qemu-system-x86) S{fields} {start} 0\n")
        };
        root.write("proc/300/stat", &stat(4242));
        // Pid 301 now belongs to another process: not beta's QEMU.
        root.write("proc/301/stat", &stat(9999));
        root.write("run/mkctl/daemon.pid", "77\n");
        assert_missing(
            &root.report(),
            "instances",
            "alpha (qemu pid 300), gamma (a kexec instance) run with no daemon in /run/mkctl",
            "`mkctl daemon restart` adopts them",
        );
        root.write("proc/77/stat", &stat(1));
        let r = root.report();
        assert!(check(&r, "instances").ok, "{}", r.render());
        assert!(check(&r, "instances")
            .detail
            .contains("the daemon (pid 77)"));
    }

    #[test]
    fn no_qemu_binary() {
        let root = Root::all_ok();
        root.remove("usr/bin/qemu-system-x86_64");
        assert_missing(
            &root.report(),
            "qemu",
            "qemu-system-x86_64 not found",
            "apt-get install qemu-system-x86",
        );
    }

    #[test]
    fn a_qemu_that_does_not_run() {
        let root = Root::all_ok();
        root.write_exec(
            "usr/bin/qemu-system-x86_64",
            "#!/bin/sh\necho broken >&2\nexit 3\n",
        );
        assert_missing(&root.report(), "qemu", "--version failed", "MKCTL_QEMU");
    }

    #[test]
    fn no_guest_kernel() {
        let root = Root::all_ok();
        root.remove("cache/kernel/vmlinuz");
        assert_missing(
            &root.report(),
            "guest-kernel",
            "vmlinuz does not exist",
            "run scripts/setup.sh",
        );
    }

    /// The 6.12 kernel missing is fine until a topology asks for it.
    #[test]
    fn no_612_kernel() {
        let root = Root::all_ok();
        root.remove("cache/kernel-6.12");
        let r = root.report();
        let c = check(&r, "guest-kernel-6.12");
        assert!(c.ok, "{}", r.render());
        assert!(c.detail.contains("not fetched"), "{}", c.detail);
        assert!(c.detail.contains("auto-6.12"), "{}", c.detail);
        assert_eq!(r.exit_code(), EXIT_OK);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.toml");
        fs::write(
            &file,
            "[[machine.node]]\nid = 0\ncpus = \"0-3\"\nmemory = \"4G\"\n\
             [host]\ncpus = \"0\"\n[pool]\nbase = \"0x40000000\"\nsize = \"1G\"\n\
             [[instance]]\nname = \"old\"\nid = 1\ncpus = \"1\"\nmemory = \"256M\"\n\
             [[instance]]\nname = \"new\"\nid = 2\ncpus = \"2\"\nmemory = \"256M\"\nkernel = \"auto-6.12\"\n",
        )
        .unwrap();
        let t = crate::topology::load(&file, || None).expect("the topology loads");
        let r = run(
            &root.env(),
            &Sizing::Topology {
                file: file.clone(),
                topology: &t,
            },
        );
        let c = check(&r, "guest-kernel-6.12");
        assert!(!c.ok, "{}", r.render());
        assert!(
            c.detail.contains("asks for kernel = \"auto-6.12\" (new)"),
            "{}",
            c.detail
        );
        assert!(c
            .fix
            .as_deref()
            .unwrap_or_default()
            .contains("run scripts/setup.sh"));
        assert_eq!(r.exit_code(), EXIT_FAIL);
    }

    #[test]
    fn no_guest_init() {
        let root = Root::all_ok();
        root.remove("cache/guest-init");
        assert_missing(
            &root.report(),
            "guest-initramfs",
            "no static guest-init",
            "run scripts/setup.sh",
        );
    }

    #[test]
    fn a_dynamic_guest_init() {
        let root = Root::all_ok();
        root.write("cache/guest-init", "#!/bin/sh\n");
        assert_missing(
            &root.report(),
            "guest-initramfs",
            "is not a static",
            "run scripts/setup.sh",
        );
    }

    #[test]
    fn no_static_busybox() {
        let root = Root::all_ok();
        root.remove("bin/busybox");
        assert_missing(
            &root.report(),
            "guest-initramfs",
            "no shell",
            "busybox-static",
        );
    }

    #[test]
    fn no_dev_shm() {
        let root = Root::all_ok();
        root.remove("dev/shm");
        assert_missing(
            &root.report(),
            "shm",
            "guest RAM has nowhere to go",
            "mount -t tmpfs",
        );
    }

    #[test]
    fn too_little_room_in_dev_shm() {
        let root = Root::all_ok();
        // A topology whose guests need more RAM than any disk here has.
        let big = root.path("big.toml");
        fs::write(
            &big,
            "[[machine.node]]\nid = 0\ncpus = \"0-1\"\nmemory = \"4096T\"\n\
             [host]\ncpus = \"0\"\nmemory = \"1G\"\n\
             [pool]\nbase = \"0x40000000\"\nsize = \"2048T\"\n\
             [window]\nsize = \"16M\"\n\
             [defaults]\nbackend = \"qemu\"\n\
             [[instance]]\nname = \"huge\"\nid = 1\ncpus = \"1\"\nmemory = \"1024T\"\n",
        )
        .unwrap();
        let t = crate::topology::load(&big, || None).unwrap_or_else(|e| panic!("{}", e.render()));
        let r = run(
            &root.env(),
            &Sizing::Topology {
                file: big.clone(),
                topology: &t,
            },
        );
        assert_missing(
            &r,
            "shm",
            "guest RAM for 1 QEMU instance(s)",
            "MKCTL_RAM_DIR",
        );
        assert!(
            check(&r, "shm").detail.starts_with("only "),
            "{:?}",
            check(&r, "shm")
        );
    }

    #[test]
    fn an_unreadable_topology_cannot_size_dev_shm() {
        let root = Root::all_ok();
        let r = run(
            &root.env(),
            &Sizing::Unusable {
                file: "nowhere.toml".into(),
                why: "no such file".into(),
            },
        );
        assert_missing(&r, "shm", "nowhere.toml cannot be read", "--topology");
    }

    #[test]
    fn no_userfaultfd_in_the_kernel() {
        let root = Root::all_ok();
        root.remove("proc/sys/vm/unprivileged_userfaultfd");
        assert_missing(
            &root.report(),
            "userfaultfd",
            "CONFIG_USERFAULTFD",
            "--mode stop-copy",
        );
    }

    #[test]
    fn userfaultfd_forbidden_to_an_unprivileged_user() {
        let root = Root::all_ok();
        root.write(
            "proc/self/status",
            "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\n",
        );
        // ptrace scope 1 needs the capability too: allow it, so that only
        // userfaultfd is missing.
        root.write("proc/sys/kernel/yama/ptrace_scope", "0\n");
        assert_missing(
            &root.report(),
            "userfaultfd",
            "without CAP_SYS_PTRACE",
            "sysctl -w vm.unprivileged_userfaultfd=1",
        );
        root.write("proc/sys/vm/unprivileged_userfaultfd", "1\n");
        assert!(root.report().checks.iter().all(|c| c.ok));
    }

    #[test]
    fn ptrace_scope_3_blocks_even_root() {
        let root = Root::all_ok();
        root.write("proc/sys/kernel/yama/ptrace_scope", "3\n");
        assert_missing(
            &root.report(),
            "ptrace",
            "not even root",
            "cannot be lowered until reboot",
        );
    }

    #[test]
    fn ptrace_scope_1_blocks_an_unprivileged_user() {
        let root = Root::all_ok();
        root.write(
            "proc/self/status",
            "Uid:\t1000\t1000\t1000\t1000\nCapEff:\t0000000000000000\n",
        );
        root.write("proc/sys/vm/unprivileged_userfaultfd", "1\n");
        assert_missing(
            &root.report(),
            "ptrace",
            "only descendants",
            "kernel.yama.ptrace_scope=0",
        );
        // Without Yama, nothing restricts attaching beyond permissions.
        root.remove("proc/sys/kernel/yama/ptrace_scope");
        assert!(check(&root.report(), "ptrace").ok);
    }

    #[test]
    fn no_time_namespaces() {
        let root = Root::all_ok();
        root.remove("proc/self/ns/time");
        assert_missing(
            &root.report(),
            "time-namespaces",
            "no time namespaces",
            "CONFIG_TIME_NS=y",
        );
    }

    #[test]
    fn no_multikernel_interface_is_not_an_error() {
        let root = Root::all_ok();
        root.remove("sys/fs/multikernel");
        root.write("proc/mounts", "sysfs /sys sysfs rw 0 0\n");
        assert_missing(
            &root.report(),
            "multikernel",
            "no multikernel interface",
            "multikernel/linux",
        );
        let r = root.report();
        assert_eq!(r.to_json()["kexec_ready"], false);
        assert!(r.render().contains("n/a      kexec"), "{}", r.render());
        assert!(
            r.render().contains("kexec backend: not available here"),
            "{}",
            r.render()
        );
    }

    #[test]
    fn the_descriptor_generation_is_not_spoken() {
        let root = Root::all_ok();
        root.remove("proc/kimage");
        assert_missing(
            &root.report(),
            "multikernel",
            "generation descriptors",
            "v1 or current generation",
        );
    }

    #[test]
    fn a_kernel_option_not_set() {
        let root = Root::all_ok();
        root.write(
            "boot/config-7.0.0-mk2",
            "CONFIG_MULTIKERNEL=y\n# CONFIG_KEXEC_FILE is not set\n",
        );
        assert_missing(
            &root.report(),
            "CONFIG_KEXEC_FILE",
            "is not set",
            "CONFIG_KEXEC_FILE=y",
        );
    }

    #[test]
    fn no_readable_kernel_config() {
        let root = Root::all_ok();
        root.remove("boot/config-7.0.0-mk2");
        let r = root.report();
        for opt in kconfig::KEXEC_BACKEND_OPTIONS {
            let c = check(&r, opt);
            assert!(!c.ok && c.detail.contains("cannot be checked"), "{c:?}");
            assert!(c.fix.as_deref().unwrap().contains("modprobe configs"));
        }
        assert_eq!(r.exit_code(), EXIT_OK, "the kexec backend is optional");
    }
}
