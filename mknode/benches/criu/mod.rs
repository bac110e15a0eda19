//! CRIU as a peer for the migration bench: the wall time of `criu dump`
//! (freeze a process, write its image, kill it) and of `criu restore -d`
//! (rebuild it from the image and let it run, detached), for a process of a
//! given resident size.
//!
//! Each [`Criu::round`] starts a fresh target, waits until it is resident,
//! and times the two criu commands as seen from here, process start and
//! exit of criu included (that is what a user of criu pays). The images go
//! to a tmpfs (the chroot's `/run`), so neither side pays for a disk.
//!
//! Why a chroot: Debian 12's criu 3.17 does not start on this host's 6.18
//! kernel, and Debian 13's criu must not be installed into the system (it
//! would pull the machine along to Debian 13). `scripts/criu-peer.sh setup`
//! builds a private Debian 13 tree with criu in it (see the script's
//! header and PEERS.md), and criu runs as `chroot <root> criu ...`.
//! The target must run inside the same chroot: criu resolves every open
//! file and the executable through the mounts it sees, and a file opened
//! outside the chroot lives on a mount that criu cannot reach. For the same
//! reason the target's stdio is the chroot's `/dev/null`, and it inherits no
//! other descriptor (an inherited pipe would be dumped too and fail).
//!
//! Needs root (chroot, mount, ptrace).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where in the chroot the target programs are copied to.
const PROG_DIR: &str = "opt/criu-peer";
/// Where in the chroot the dump images go (a tmpfs; see the module doc).
const IMAGE_DIR: &str = "run/criu-peer";
/// How long a target may take to become resident, and a killed process to
/// disappear.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A ready-to-run CRIU: the Debian 13 chroot it lives in, mounted, with
/// `criu check` passing.
#[derive(Debug)]
pub(crate) struct Criu {
    root: PathBuf,
    /// Programs already copied into the chroot: host path → path inside.
    copied: Mutex<HashMap<PathBuf, PathBuf>>,
}

/// One dump + restore, wall times in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CriuRound {
    pub(crate) dump_ms: f64,
    pub(crate) restore_ms: f64,
}

impl Criu {
    /// Runs `scripts/criu-peer.sh setup` (builds the chroot on first use,
    /// ~40 s; under a second afterwards); its progress lines go to stderr.
    /// Err says why CRIU cannot run here.
    pub(crate) fn setup() -> Result<Criu, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/criu-peer.sh");
        let mut child = Command::new(&script)
            .arg("setup")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        // Pass the script's progress through as it comes, and keep it for
        // the error message. Its stdout is one line, so it cannot fill up.
        let mut messages = Vec::new();
        for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
            let line = line.unwrap_or_default();
            eprintln!("{line}");
            messages.push(line);
        }
        let mut out = String::new();
        let _ = child.stdout.take().expect("piped").read_to_string(&mut out);
        let status = child
            .wait()
            .map_err(|e| format!("waiting for {}: {e}", script.display()))?;
        if !status.success() {
            let why = messages
                .iter()
                .rev()
                .find(|l| l.contains("error"))
                .or(messages.last())
                .cloned()
                .unwrap_or_else(|| format!("{status}"));
            return Err(format!(
                "CRIU cannot run here: {} setup: {why}",
                script.display()
            ));
        }
        let root = PathBuf::from(out.lines().last().unwrap_or("").trim());
        if !root.join("usr/sbin/criu").exists() {
            return Err(format!(
                "{} setup printed {:?}, which holds no usr/sbin/criu",
                script.display(),
                root
            ));
        }
        Ok(Criu {
            root,
            copied: Mutex::new(HashMap::new()),
        })
    }

    /// One round: starts `prog args` inside the chroot, waits until its
    /// VmRSS reaches `want_rss_kib`, times `criu dump` (the dumped process
    /// is reaped at once) and `criu restore -d`, then kills the restored
    /// process and removes the images. Err carries the tail of criu's log.
    pub(crate) fn round(
        &self,
        prog: &Path,
        args: &[&str],
        want_rss_kib: u64,
    ) -> Result<CriuRound, String> {
        let inside = self.copy_in(prog)?;
        let mut target = Target::start(&self.root, &inside, args)?;
        let pid = target.pid();
        target.wait_rss(want_rss_kib)?;

        // Image directory, as the chroot sees it and as we see it.
        let dir_in = format!("/{IMAGE_DIR}/{}-{pid}", std::process::id());
        let dir = self.host_path(&dir_in);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let result = self.dump_restore(&mut target, &dir_in, &dir);
        let _ = fs::remove_dir_all(&dir);
        result
    }

    fn dump_restore(
        &self,
        target: &mut Target,
        dir_in: &str,
        dir: &Path,
    ) -> Result<CriuRound, String> {
        let pid = target.pid().to_string();
        let t = Instant::now();
        let dump = self.criu(&["dump", "-t", &pid, "-D", dir_in, "-o", "dump.log"]);
        let dump_ms = ms(t.elapsed());
        // criu killed the target (when it succeeded); free its pid now, or
        // the restore cannot take it ("Can't fork for PID: File exists").
        target.kill_and_reap();
        dump.map_err(|e| format!("criu dump -t {pid}: {e}{}", log_tail(&dir.join("dump.log"))))?;

        let pidfile_in = format!("{dir_in}/restored.pid");
        let t = Instant::now();
        let restore = self.criu(&[
            "restore",
            "-D",
            dir_in,
            "-d",
            "-o",
            "restore.log",
            "--pidfile",
            &pidfile_in,
        ]);
        let restore_ms = ms(t.elapsed());
        // The restored process is detached (its parent, criu, has exited);
        // find it through the pid file even if criu failed half-way.
        let restored = fs::read_to_string(self.host_path(&pidfile_in))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(p) = restored {
            kill_detached(p)?;
        }
        restore.map_err(|e| format!("criu restore: {e}{}", log_tail(&dir.join("restore.log"))))?;
        if restored.is_none() {
            return Err(format!(
                "criu restore wrote no pid file{}",
                log_tail(&dir.join("restore.log"))
            ));
        }
        Ok(CriuRound {
            dump_ms,
            restore_ms,
        })
    }

    /// Runs `chroot <root> criu <args>`; Err with criu's own output.
    fn criu(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("chroot")
            .arg(&self.root)
            .arg("criu")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run chroot: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let mut msg = format!("{}", out.status);
        for s in [&out.stdout, &out.stderr] {
            let s = String::from_utf8_lossy(s);
            if !s.trim().is_empty() {
                msg.push_str("\n  ");
                msg.push_str(s.trim());
            }
        }
        Err(msg)
    }

    /// Copies `prog` into the chroot (once per `Criu`; a fresh copy each
    /// time the bench runs, so a rebuilt program is picked up) and returns
    /// its path inside the chroot.
    fn copy_in(&self, prog: &Path) -> Result<PathBuf, String> {
        let mut copied = self.copied.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = copied.get(prog) {
            return Ok(p.clone());
        }
        let name = prog
            .file_name()
            .ok_or_else(|| format!("{}: not a file name", prog.display()))?;
        let inside = Path::new("/").join(PROG_DIR).join(name);
        let dest = self.host_path(&inside);
        let tmp = dest.with_extension("tmp");
        fs::create_dir_all(dest.parent().expect("has a parent"))
            .and_then(|()| fs::copy(prog, &tmp))
            // Rename, not overwrite: a copy from an earlier run may still
            // be executing ("Text file busy").
            .and_then(|_| fs::rename(&tmp, &dest))
            .map_err(|e| format!("copying {} to {}: {e}", prog.display(), dest.display()))?;
        copied.insert(prog.to_path_buf(), inside.clone());
        Ok(inside)
    }

    /// The host's path of a path inside the chroot.
    fn host_path(&self, inside: impl AsRef<Path>) -> PathBuf {
        let inside = inside.as_ref();
        self.root.join(inside.strip_prefix("/").unwrap_or(inside))
    }
}

/// The process to be dumped: our own child, running inside the chroot.
/// Dropping it kills and reaps it.
struct Target {
    child: Child,
    reaped: bool,
}

impl Target {
    /// Starts `prog` (a path inside the chroot) in its own session inside
    /// the chroot, stdio on the chroot's `/dev/null`, no other descriptors.
    /// No `chroot`/`setsid` programs in between: the child chroots itself
    /// before exec, so the pid we hold is the target's.
    fn start(root: &Path, prog: &Path, args: &[&str]) -> Result<Target, String> {
        let null = || {
            File::options()
                .read(true)
                .write(true)
                .open(root.join("dev/null"))
                .map_err(|e| format!("open {}/dev/null: {e}", root.display()))
        };
        let root_c = CString::new(root.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .stdin(null()?)
            .stdout(null()?)
            .stderr(null()?);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls on memory prepared before the
        // fork (`root_c`, a static string); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::chroot(root_c.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Every inherited descriptor above 2 closes at exec (std's
                // own exec-error pipe included, which it needs until then).
                if libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {} in {}: {e}", prog.display(), root.display()))?;
        let target = Target {
            child,
            reaped: false,
        };
        // Check that the pid is the program's and not some helper's.
        let exe = fs::read_link(format!("/proc/{}/exe", target.pid()))
            .map_err(|e| format!("reading /proc/{}/exe: {e}", target.pid()))?;
        if exe != root.join(prog.strip_prefix("/").unwrap_or(prog)) {
            return Err(format!(
                "pid {} runs {}, not {}",
                target.pid(),
                exe.display(),
                prog.display()
            ));
        }
        Ok(target)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until the target's VmRSS reaches `kib`.
    fn wait_rss(&mut self, kib: u64) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped = true;
                return Err(format!("the target exited before it was dumped: {status}"));
            }
            let rss = vm_rss_kib(self.pid()).unwrap_or(0);
            if rss >= kib {
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "the target's VmRSS stayed at {rss} KiB for {START_TIMEOUT:?}, below the {kib} KiB asked for"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills the target (if criu has not already) and reaps it.
    fn kill_and_reap(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// Kills a process that is not our child and waits until it is gone (or a
/// zombie whose parent has not reaped it yet: dead all the same).
fn kill_detached(pid: i32) -> Result<(), String> {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    let start = Instant::now();
    loop {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return Ok(()),
            Ok(stat) => {
                // "pid (comm) S ...": the state follows the last ')'.
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|s| s.split_whitespace().next());
                if state == Some("Z") && start.elapsed() > Duration::from_secs(1) {
                    return Ok(());
                }
            }
        }
        if start.elapsed() > EXIT_TIMEOUT {
            return Err(format!(
                "the restored process {pid} is still there {EXIT_TIMEOUT:?} after SIGKILL"
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// VmRSS of `pid` in KiB.
fn vm_rss_kib(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The last lines of a criu log, for an error message ("" if unreadable).
fn log_tail(log: &Path) -> String {
    let Ok(text) = fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(12)..];
    format!("\n  {}:\n    {}", log.display(), tail.join("\n    "))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
