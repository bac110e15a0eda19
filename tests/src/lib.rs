//! Helpers for the end-to-end tests in `tests/tests/`: where the repository
//! and its cache are, the guest kernels (the stock one and the 6.12 one)
//! and static guest-init that `qemu/setup.sh` prepares, scratch directories, and a QEMU runner with a
//! timeout that keeps the console for the failure message.
//!
//! Missing artifacts are a failure with the message "run qemu/setup.sh first",
//! never a silent skip: a test that did not boot anything must not pass.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use mkctl::initramfs::Initramfs;
use mkctl::qemu::MachineSpec;

/// What to tell a person whose machine lacks the artifacts.
pub const SETUP_HINT: &str = "run qemu/setup.sh first";

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `$MKCTL_CACHE`, or `<root>/.cache` (the same rule as qemu/setup.sh).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("MKCTL_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join(".cache"),
    }
}

/// The guest kernel, its release and the static guest-init.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// `$MKCTL_KERNEL` or `<cache>/kernel/vmlinuz`.
    pub kernel: PathBuf,
    /// Contents of `<cache>/kernel/version` (what `uname -r` says in the guest).
    pub kernel_release: String,
    /// `$MKCTL_GUEST_INIT` or `<cache>/guest-init`.
    pub guest_init: PathBuf,
    /// The QEMU binary: `$MKCTL_QEMU` or `qemu-system-x86_64` on `PATH`.
    pub qemu: PathBuf,
}

impl Artifacts {
    /// Finds everything, or says what is missing.
    pub fn locate() -> Result<Self, String> {
        let cache = cache_dir();
        let env_path = |var: &str| {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let kernel = env_path("MKCTL_KERNEL").unwrap_or_else(|| cache.join("kernel/vmlinuz"));
        let explicit_init = env_path("MKCTL_GUEST_INIT");
        let guest_init = explicit_init
            .clone()
            .unwrap_or_else(|| cache.join("guest-init"));
        let version = cache.join("kernel/version");
        for p in [&kernel, &guest_init, &version] {
            if !p.is_file() {
                return Err(format!("{} is missing", p.display()));
            }
        }
        let kernel_release = fs::read_to_string(&version)
            .map_err(|e| format!("cannot read {}: {e}", version.display()))?
            .trim()
            .to_string();
        if explicit_init.is_none() {
            check_not_stale(&guest_init)?;
        }
        let qemu = match env_path("MKCTL_QEMU") {
            Some(q) => q,
            None => find_on_path("qemu-system-x86_64")
                .ok_or("qemu-system-x86_64 is not on PATH (Debian package qemu-system-x86)")?,
        };
        Ok(Self {
            kernel,
            kernel_release,
            guest_init,
            qemu,
        })
    }

    /// [`Artifacts::locate`], failing the test with [`SETUP_HINT`] when
    /// something is missing (in CI and outside it alike).
    pub fn require() -> Self {
        match Self::locate() {
            Ok(a) => a,
            Err(e) => {
                let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
                panic!(
                    "{SETUP_HINT}: {e}{}",
                    if ci {
                        " (CI: the setup step did not run or failed)"
                    } else {
                        ""
                    }
                )
            }
        }
    }

    /// The initramfs of a guest: the base layout and guest-init as `/init`.
    pub fn initramfs(&self) -> Initramfs {
        Initramfs::for_guest(&self.guest_init)
            .unwrap_or_else(|e| panic!("building the initramfs: {}", mkctl::error_chain(&e)))
    }
}

/// A stock kernel besides the default one (`kernel = "auto-6.12"`) that
/// `qemu/setup.sh` fetched into `<cache>/kernel-<series>/`.
#[derive(Debug, Clone)]
pub struct SeriesKernel {
    /// `<cache>/kernel-<series>/vmlinuz`.
    pub kernel: PathBuf,
    /// Contents of its `version` (what `uname -r` says in the guest).
    pub release: String,
    /// Its modules for the guests' initramfs.
    pub modules: PathBuf,
}

impl SeriesKernel {
    /// The `series` kernel (`"6.12"`), or the test fails with
    /// [`SETUP_HINT`] (in CI and outside it alike: never a skip).
    pub fn require(series: &str) -> Self {
        let dir = cache_dir().join(format!("kernel-{series}"));
        let (kernel, version) = (dir.join("vmlinuz"), dir.join("version"));
        let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
        let fail = |what: String| -> ! {
            panic!(
                "{SETUP_HINT} (it fetches the {series} kernel too): {what}{}",
                if ci {
                    " (CI: the setup step did not run or failed)"
                } else {
                    ""
                }
            )
        };
        if !kernel.is_file() {
            fail(format!("{} is missing", kernel.display()));
        }
        let release = fs::read_to_string(&version)
            .unwrap_or_else(|e| fail(format!("cannot read {}: {e}", version.display())))
            .trim()
            .to_string();
        Self {
            kernel,
            release,
            modules: dir.join("modules"),
        }
    }
}

/// The cached guest-init must be newer than every source of the crate, or the
/// test would boot yesterday's code.
fn check_not_stale(bin: &Path) -> Result<(), String> {
    let built = mtime(bin).ok_or_else(|| format!("cannot stat {}", bin.display()))?;
    // guest-init links the agent (mknode) and the ring (shmem-ring): a
    // change in any of them makes the cached binary stale.
    let root = repo_root();
    let mut newest = (SystemTime::UNIX_EPOCH, PathBuf::new());
    let mut stack: Vec<PathBuf> = ["guest-init", "mknode", "shmem-ring"]
        .iter()
        .flat_map(|c| [root.join(c).join("src"), root.join(c).join("Cargo.toml")])
        .collect();
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in fs::read_dir(&p).into_iter().flatten().flatten() {
                stack.push(e.path());
            }
        } else if let Some(t) = mtime(&p) {
            if t > newest.0 {
                newest = (t, p);
            }
        }
    }
    if newest.0 > built {
        return Err(format!(
            "{} is older than {} (guest-init or what it links changed since the last setup)",
            bin.display(),
            newest.1.display()
        ));
    }
    Ok(())
}

fn mtime(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn find_on_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// A scratch directory under the system temp dir (short paths: Unix socket
/// paths are limited to 107 bytes), removed on drop unless
/// `MKCTL_E2E_KEEP` is set.
#[derive(Debug)]
pub struct Scratch {
    /// Removes the directory on drop (`None` when kept).
    _dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    /// A new directory named after the test.
    pub fn new(test: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mk-{test}-"))
            .tempdir()
            .expect("create scratch dir");
        let path = dir.path().to_path_buf();
        if std::env::var_os("MKCTL_E2E_KEEP").is_some() {
            eprintln!("keeping {}", path.display());
            Self {
                _dir: None,
                path: dir.keep(),
            }
        } else {
            Self {
                _dir: Some(dir),
                path,
            }
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// A zero-filled file of `size` bytes (sparse).
pub fn make_window_file(path: &Path, size: u64) {
    let f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("size window file");
}

/// The per-boot timeout: `$MKCTL_E2E_TIMEOUT` seconds, default 60.
pub fn boot_timeout() -> Duration {
    let secs = std::env::var("MKCTL_E2E_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// How a QEMU run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// Exit status; `None` when it was killed at the timeout.
    pub status: Option<ExitStatus>,
    /// From spawn to exit (or to the kill).
    pub elapsed: Duration,
    /// The serial console log.
    pub console: String,
    /// QEMU's own stderr (option errors, warnings).
    pub stderr: String,
}

impl RunOutcome {
    /// The last `n` lines of the console.
    pub fn console_tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// What to print when an assertion about this run fails.
    pub fn report(&self) -> String {
        format!(
            "QEMU {} after {:.1} s\n--- QEMU stderr ---\n{}\n--- console (last 40 lines) ---\n{}",
            match self.status {
                Some(s) => format!("exited with {s}"),
                None => "was killed at the timeout".to_string(),
            },
            self.elapsed.as_secs_f64(),
            self.stderr.trim_end(),
            self.console_tail(40)
        )
    }

    /// Fails unless QEMU exited by itself with status 0 (the guest powered
    /// off) and the console shows guest-init's power-off line.
    pub fn assert_powered_off(&self) {
        assert!(
            self.status.is_some_and(|s| s.success()),
            "the guest did not power off by itself\n{}",
            self.report()
        );
        assert!(
            self.console.contains("guest-init: ") && self.console.contains("powering off"),
            "QEMU exited, but not through guest-init's power-off\n{}",
            self.report()
        );
    }
}

/// Starts QEMU for `spec`, waits until it exits or `timeout` passes (then
/// kills it), and collects console and stderr. QEMU's stdout and stderr go to
/// files next to the console log.
pub fn run_qemu(spec: &MachineSpec, timeout: Duration) -> RunOutcome {
    let mut cmd: Command = spec
        .command()
        .unwrap_or_else(|e| panic!("bad machine spec: {}", mkctl::error_chain(&e)));
    let dir = spec.console.log.parent().unwrap_or(Path::new("."));
    let out_path = dir.join(format!("{}.qemu-stdout", spec.name));
    let err_path = dir.join(format!("{}.qemu-stderr", spec.name));
    let out = fs::File::create(&out_path).expect("create qemu stdout file");
    let err = fs::File::create(&err_path).expect("create qemu stderr file");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", spec.qemu.display()));
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for qemu") {
            break Some(s);
        }
        if start.elapsed() >= timeout {
            // Only this child, by its own handle.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    RunOutcome {
        status,
        elapsed,
        console: read(&spec.console.log),
        stderr: read(&err_path),
    }
}

/// The `mkctl` binary built next to this test (`target/<profile>/mkctl`).
pub fn mkctl_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/mkctl
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("mkctl"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p mkctl, or cargo test --workspace)",
        bin.display()
    );
    bin
}

/// What one `mkctl` command did.
#[derive(Debug)]
pub struct CmdOut {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl CmdOut {
    /// stdout as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Fails with everything the command said unless it exited 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code,
            0,
            "mkctl failed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.text(),
            self.stderr
        );
        self
    }

    /// stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.text(), self.stderr))
    }
}

/// `mkctl` with a run directory of its own, so tests never share a daemon.
/// Dropping it stops the daemon and checks that no QEMU it started is left.
#[derive(Debug)]
pub struct Mkctl {
    pub scratch: Scratch,
    bin: PathBuf,
}

impl Mkctl {
    pub fn new(test: &str) -> Self {
        Artifacts::require();
        Self {
            scratch: Scratch::new(test),
            bin: mkctl_bin(),
        }
    }

    /// The daemon's run directory.
    pub fn run_dir(&self) -> PathBuf {
        self.scratch.join("run")
    }

    /// A command with the environment set.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("MKCTL_RUN_DIR", self.run_dir())
            .env("MKCTL_CACHE", cache_dir());
        c
    }

    /// Runs `mkctl args...` with `stdin` and collects everything.
    pub fn run_with_input(&self, args: &[&str], stdin: &[u8]) -> CmdOut {
        use std::io::Write;
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mkctl");
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().expect("wait for mkctl");
        let _ = writer.join();
        CmdOut {
            code: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `mkctl args...` with empty stdin.
    pub fn run(&self, args: &[&str]) -> CmdOut {
        self.run_with_input(args, b"")
    }

    /// QEMU processes whose command line names this test's run directory.
    pub fn qemu_pids(&self) -> Vec<u32> {
        let needle = self.run_dir().display().to_string();
        let mut pids = Vec::new();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("qemu-system") && cmd.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Mkctl {
    fn drop(&mut self) {
        let _ = self.run(&["daemon", "stop"]);
        // Belt and braces: nothing of ours may outlive the test.
        for pid in self.qemu_pids() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Builds `libmk.a` (release) and the README's `libmk/examples/counter.c`
/// against it exactly as the README says (`cc -static -s ... libmk.a
/// -lpthread`), once per test process; returns the static binary.
pub fn c_counter() -> PathBuf {
    static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    P.get_or_init(|| c_example("counter")).clone()
}

/// Builds `libmk/examples/<name>.c` against `libmk.a` as the README says;
/// returns the static binary.
pub fn c_example(name: &str) -> PathBuf {
    let root = repo_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--quiet", "--release", "-p", "libmk"])
        .current_dir(&root)
        .status()
        .expect("cargo build -p libmk");
    assert!(st.success(), "building libmk failed");
    let out = target.join(format!("{name}-static"));
    let cc = Command::new("cc")
        .arg("-static")
        .arg("-s")
        .arg(root.join(format!("libmk/examples/{name}.c")))
        .arg("-I")
        .arg(root.join("libmk/include"))
        .arg(target.join("release/libmk.a"))
        .arg("-lpthread")
        .arg("-o")
        .arg(&out)
        .output()
        .expect("running cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    out
}

/// Builds testprogs' `bin` (release, for the host) and returns its path.
pub fn host_testprog(bin: &str) -> PathBuf {
    let root = repo_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "testprogs",
            "--bin",
            bin,
        ])
        .current_dir(&root)
        .status()
        .expect("cargo build -p testprogs");
    assert!(st.success(), "building {bin} failed");
    target.join("release").join(bin)
}

/// The lines `out` (a child's stdout) writes, collected by a thread as they
/// come; the vector grows until the child closes it.
pub fn collect_lines(
    out: std::process::ChildStdout,
) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l2 = std::sync::Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            l2.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    lines
}

/// The numbers of the `seq=N ...` lines among `lines` (mkcounter's output).
pub fn seq_numbers(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("seq="))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The stdout lines of a running `mkctl exec` (or restore), collected as
/// they come.
#[derive(Debug)]
pub struct Watched {
    pub child: std::process::Child,
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Watched {
    pub fn wait_for(&self, what: &str, t: Duration, cond: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + t;
        loop {
            {
                let l = self.lines.lock().unwrap();
                if cond(&l) {
                    return;
                }
                if Instant::now() > deadline {
                    let tail: Vec<&String> = l.iter().rev().take(10).collect();
                    panic!("timed out waiting for {what}; last lines: {tail:?}");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    pub fn count(&self, prefix: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }
    pub fn checksums(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("checksum="))
            .cloned()
            .collect()
    }
    pub fn seqs(&self) -> Vec<u64> {
        seq_numbers(&self.lines.lock().unwrap())
    }
}

/// Instance `name` as `mkctl status --json` shows it (the test fails when
/// there is none).
pub fn instance_status(m: &Mkctl, name: &str) -> serde_json::Value {
    let st = m.run(&["status", "--json"]).ok().json();
    st["daemon"]["instances"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {st}"))
        .clone()
}

/// `mkctl migrate PID --from FROM --to TO`, which must fail (exit 1).
pub fn refused_move(m: &Mkctl, pid: u32, from: &str, to: &str) -> CmdOut {
    let r = m.run(&["migrate", &pid.to_string(), "--from", from, "--to", to]);
    assert_eq!(r.code, 1, "the move must fail: {}", r.text());
    r
}

/// `tests/configs/<name>`, as an argument.
pub fn test_config(name: &str) -> String {
    repo_root()
        .join("tests/configs")
        .join(name)
        .display()
        .to_string()
}

/// A daemon of its own for `test`, with `tests/configs/<config>` booted.
pub fn booted(test: &str, config: &str) -> Mkctl {
    let m = Mkctl::new(test);
    m.run(&["boot", &test_config(config)]).ok();
    m
}

/// Fails unless `guest`'s console says its doorbell port came up.
pub fn assert_doorbell_ready(m: &Mkctl, guest: &str) {
    let log = fs::read_to_string(m.run_dir().join(guest).join("console.log")).unwrap_or_default();
    assert!(
        log.contains("agent: doorbell port org.mkctl.doorbell ready"),
        "{guest} has no doorbell port; its console:\n{log}"
    );
}

/// `mkctl migrate <pid> --from <from> --to <to> --mode <mode> --json`,
/// which must succeed: its JSON report.
/// A failure shows the end of each guest's console too (a guest whose QEMU
/// exited mid-move says why only there).
pub fn migrate_json(m: &Mkctl, pid: u32, from: &str, to: &str, mode: &str) -> serde_json::Value {
    let out = m.run(&[
        "migrate",
        &pid.to_string(),
        "--from",
        from,
        "--to",
        to,
        "--mode",
        mode,
        "--json",
    ]);
    if out.code != 0 {
        let mut consoles = String::new();
        for dir in fs::read_dir(m.run_dir()).into_iter().flatten().flatten() {
            if let Ok(log) = fs::read_to_string(dir.path().join("console.log")) {
                let lines: Vec<&str> = log.lines().collect();
                consoles += &format!(
                    "\n--- {} console (last 30 lines) ---\n{}",
                    dir.file_name().to_string_lossy(),
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
            }
        }
        panic!(
            "mkctl migrate failed\n--- stdout ---\n{}\n--- stderr ---\n{}{consoles}",
            out.text(),
            out.stderr
        );
    }
    out.json()
}

/// `mkctl exec <on> -- <argv>`, its output watched (see [`watch`]).
pub fn exec_watched(m: &Mkctl, on: &str, argv: &[&str]) -> Watched {
    let child = m
        .command()
        .args(["exec", on, "--"])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    watch(child)
}

/// Collects the stdout lines of `child` (an exec or a restore) and waits
/// for its first ones.
pub fn watch(mut child: std::process::Child) -> Watched {
    let lines = collect_lines(child.stdout.take().unwrap());
    let w = Watched { child, lines };
    w.wait_for("first output", Duration::from_secs(30), |l| l.len() >= 5);
    w
}

/// The running (not zombie) mkcounter on `on`.
pub fn pid_on(m: &Mkctl, on: &str) -> u32 {
    let script = "for p in $(pidof mkcounter); do s=$(cut -d' ' -f3 /proc/$p/stat); [ \"$s\" != Z ] && echo $p; done; true";
    let out = m.run(&["exec", on, "--", "sh", "-c", script]).ok().text();
    out.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no mkcounter on {on}: {out:?}"))
}

/// Consecutive sequence numbers, more than 10 of them.
pub fn no_gap(seqs: &[u64]) {
    assert!(seqs.len() > 10);
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "gap or repeat between seq {} and {}",
            w[0],
            w[1]
        );
    }
}
