//! The commands that act on running instances through the daemon: boot,
//! status, exec, info, ping, traffic, stop, console, daemon.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use mknode::wire::{ExitStatus, Msg, Stream, MAX_CHUNK};

use super::{DaemonAction, Res, EXIT_FAIL, EXIT_OK, EXIT_USAGE};
use crate::daemon::client::{Client, ClientError};
use crate::daemon::control::{DaemonStatus, Frame, Reply, Request};
use crate::daemon::paths::RunDir;
use crate::topology;
use crate::units::ByteSize;

fn progress(instance: &str, message: &str) {
    eprintln!("[{instance}] {message}");
}

/// Prints an error reply and returns its exit code.
fn failed(message: &str, code: i32) -> i32 {
    eprintln!("mkctl: {message}");
    code
}

fn connect() -> Result<Client, i32> {
    let run = RunDir::from_env();
    Client::connect(&run).map_err(|e| {
        eprintln!(
            "mkctl: {} (start instances with `mkctl boot <topology>`)",
            crate::error_chain(&e)
        );
        EXIT_FAIL
    })
}

pub(super) fn boot(
    sysroot: &Path,
    file: &Path,
    instances: &[String],
    timeout: u64,
    dry_run: bool,
) -> Res {
    // Validate here first: an invalid topology starts nothing, not even
    // the daemon.
    let t = match topology::load(file, || {
        crate::host::HostInfo::discover(Path::new("/"))
            .ok()
            .map(|h| topology::Machine::from_host(&h))
    }) {
        Ok(t) => t,
        Err(e) => {
            eprint!("{}", e.render());
            return Ok(match e {
                topology::LoadError::Read { .. } => EXIT_USAGE,
                topology::LoadError::Invalid { .. } => EXIT_FAIL,
            });
        }
    };
    for n in instances {
        if t.instance(n).is_none() {
            let names: Vec<&str> = t.instances.iter().map(|i| i.name.as_str()).collect();
            eprintln!(
                "mkctl: {} has no instance \"{n}\"; it has: {}",
                file.display(),
                names.join(", ")
            );
            return Ok(EXIT_USAGE);
        }
    }
    // kexec instances boot through the kernel's interface, without the
    // daemon; a refusal stops everything before any instance starts.
    let qemu: Vec<String> = t
        .instances
        .iter()
        .filter(|i| i.backend == topology::Backend::Qemu)
        .filter(|i| instances.is_empty() || instances.contains(&i.name))
        .map(|i| i.name.clone())
        .collect();
    if super::kexec::wants_kexec(&t, instances) {
        let kexec_only: Vec<String> = instances
            .iter()
            .filter(|n| !qemu.contains(n))
            .cloned()
            .collect();
        let code = super::kexec::boot(sysroot, &t, &kexec_only, dry_run)?;
        if code != EXIT_OK || qemu.is_empty() {
            return Ok(code);
        }
    } else if dry_run {
        eprintln!(
            "mkctl: --dry-run applies to kexec instances; {} has none to boot",
            file.display()
        );
        return Ok(EXIT_USAGE);
    }
    let config = std::fs::canonicalize(file)?;
    let run = RunDir::from_env();
    // A daemon about to be started would find the same images missing: say
    // so now and start nothing. (A running one was started with its own
    // environment and judges for itself.)
    if Client::connect(&run).is_err() {
        let chosen = t.instances.iter().filter(|i| qemu.contains(&i.name));
        if let Some(why) = crate::daemon::paths::missing_auto_images(chosen) {
            return Ok(failed(&why, EXIT_FAIL));
        }
    }
    let mut c = Client::connect_or_start(&run, |m| eprintln!("mkctl: {m}"))?;
    let reply = c.call(
        &Request::Boot {
            config,
            instances: qemu,
            timeout_ms: timeout.saturating_mul(1000),
        },
        progress,
    )?;
    Ok(match reply {
        Reply::Ok { message } => {
            println!("{message}");
            EXIT_OK
        }
        Reply::Error { message, code } => failed(&message, code),
        other => failed(&format!("unexpected reply {other:?}"), EXIT_FAIL),
    })
}

fn fetch_status() -> Result<Option<DaemonStatus>, Box<dyn std::error::Error>> {
    let run = RunDir::from_env();
    let mut c = match Client::connect(&run) {
        Ok(c) => c,
        Err(ClientError::NotRunning(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match c.call(&Request::Status, progress)? {
        Reply::Status { status } => Ok(Some(status)),
        other => Err(format!("unexpected reply {other:?}").into()),
    }
}

pub(super) fn status(sysroot: &Path, json: bool) -> Res {
    let st = fetch_status()?;
    let kexec = super::kexec::listed(sysroot);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "daemon": st, "kexec": kexec }))?
        );
        return Ok(EXIT_OK);
    }
    if !kexec.is_empty() {
        println!("kexec instances (/sys/fs/multikernel):");
        for k in &kexec {
            println!(
                "  {:<12} id {:>3}  {}",
                k.name,
                k.id.map_or_else(|| "-".into(), |i| i.to_string()),
                k.status.as_deref().unwrap_or("-")
            );
        }
    }
    let Some(st) = st else {
        println!(
            "no mkctl daemon runs for {}; nothing is booted",
            RunDir::from_env().path().display()
        );
        return Ok(EXIT_OK);
    };
    println!(
        "daemon pid {} in {}{}",
        st.pid,
        st.run_dir.display(),
        st.config
            .as_ref()
            .map(|c| format!(", topology {}", c.display()))
            .unwrap_or_default()
    );
    if st.instances.is_empty() {
        println!("no instances");
        return Ok(EXIT_OK);
    }
    println!(
        "{:<12} {:>3}  {:<9} {:>8}  {:<8} {:>7}  {:>9}  {:>9}  KERNEL / REASON",
        "INSTANCE", "ID", "STATE", "PID", "CPUS", "MEMORY", "UPTIME", "HEARTBEAT"
    );
    for i in &st.instances {
        let dash = || "-".to_string();
        println!(
            "{:<12} {:>3}  {:<9} {:>8}  {:<8} {:>7}  {:>9}  {:>9}  {}",
            i.name,
            i.id,
            i.state,
            i.pid.map_or_else(dash, |p| p.to_string()),
            i.cpus,
            ByteSize(i.memory).human(),
            i.uptime_ms
                .map_or_else(dash, |u| format!("{:.1}s", u as f64 / 1000.0)),
            i.heartbeat_age_ms
                .map_or_else(dash, |h| format!("{h}ms ago")),
            i.reason
                .clone()
                .or_else(|| i.kernel.clone())
                .unwrap_or_default()
        );
    }
    Ok(EXIT_OK)
}

pub(super) fn exec(
    instance: &str,
    interactive: bool,
    env: &[String],
    cwd: Option<String>,
    command: Vec<String>,
) -> Res {
    let mut pairs = Vec::new();
    for e in env {
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => pairs.push((k.to_string(), v.to_string())),
            _ => {
                eprintln!("mkctl: --env takes NAME=VALUE, got {e:?}");
                return Ok(EXIT_USAGE);
            }
        }
    }
    if !pairs.iter().any(|(k, _)| k == "PATH") {
        pairs.push(("PATH".into(), "/bin:/sbin:/usr/bin:/usr/sbin".into()));
    }
    let forward_stdin = interactive || !std::io::stdin().is_terminal();
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    c.send(&Request::Exec {
        instance: instance.to_string(),
        argv: command,
        env: pairs,
        cwd,
        stdin: forward_stdin,
    })?;
    match c.read()? {
        Frame::Reply(Reply::ExecStarted) => {}
        Frame::Reply(Reply::Error { message, code }) => return Ok(failed(&message, code)),
        other => return Ok(failed(&format!("unexpected reply {other:?}"), EXIT_FAIL)),
    }
    if forward_stdin {
        let mut w = c.try_clone()?;
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; MAX_CHUNK];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let m = Msg::Data {
                            req: 0,
                            stream: Stream::Stdin,
                            bytes: buf[..n].to_vec(),
                        };
                        if w.send_wire(&m).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = w.send_wire(&Msg::Eof {
                req: 0,
                stream: Stream::Stdin,
            });
        });
    }
    relay_output(&mut c, instance, None)
}

/// Copies a remote process's output to ours until it ends; returns its
/// exit status as ours.
/// Streams a remote process's output here until it ends; `restored` (the
/// image file) has its new pid said on stderr when it starts.
fn relay_output(c: &mut Client, instance: &str, restored: Option<&Path>) -> Res {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    loop {
        match c.read()? {
            Frame::Wire(Msg::Data { stream, bytes, .. }) => {
                let r = if stream == Stream::Stderr {
                    err.write_all(&bytes)
                } else {
                    out.write_all(&bytes)
                };
                if r.is_err() {
                    // Our stdout was closed (e.g. piped into `head`).
                    return Ok(EXIT_FAIL);
                }
            }
            Frame::Wire(Msg::Started { pid, .. }) => {
                if let Some(file) = restored {
                    eprintln!(
                        "mkctl: restored {} on {instance} as pid {pid}",
                        file.display()
                    );
                }
            }
            Frame::Wire(Msg::Exited { status, .. }) => {
                out.flush()?;
                if let ExitStatus::Signal(s) = status {
                    eprintln!("mkctl: the command on {instance} was killed by signal {s}");
                }
                return Ok(status.as_shell_code());
            }
            Frame::Wire(Msg::Failed { message, .. }) => {
                out.flush()?;
                return Ok(failed(&format!("{instance}: {message}"), EXIT_FAIL));
            }
            Frame::Reply(Reply::Error { message, code }) => return Ok(failed(&message, code)),
            _ => {}
        }
    }
}

/// One request, one reply. With `json`, a failure is also printed on stdout
/// as `{"error": ..., "exit_code": ...}`, so a script reading stdout gets
/// JSON either way.
fn simple(req: Request, json: bool) -> Result<Result<Reply, i32>, Box<dyn std::error::Error>> {
    let json_error = |message: &str, code: i32| {
        if json {
            println!(
                "{}",
                serde_json::json!({ "error": message, "exit_code": code })
            );
        }
    };
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => {
            json_error("no mkctl daemon runs", code);
            return Ok(Err(code));
        }
    };
    match c.call(&req, progress)? {
        Reply::Error { message, code } => {
            json_error(&message, code);
            Ok(Err(failed(&message, code)))
        }
        r => Ok(Ok(r)),
    }
}

pub(super) fn info(instance: &str, json: bool) -> Res {
    let info = match simple(
        Request::Info {
            instance: instance.to_string(),
        },
        json,
    )? {
        Ok(Reply::Info { info }) => info,
        Ok(other) => return Ok(failed(&format!("unexpected reply {other:?}"), EXIT_FAIL)),
        Err(code) => return Ok(code),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(EXIT_OK);
    }
    println!(
        "{instance}: {} {} {} ({})",
        info["sysname"].as_str().unwrap_or(""),
        info["release"].as_str().unwrap_or(""),
        info["machine"].as_str().unwrap_or(""),
        info["hostname"].as_str().unwrap_or("")
    );
    println!(
        "  cpus online {}",
        info["cpus_online"].as_str().unwrap_or("")
    );
    println!(
        "  memory      {}",
        ByteSize(info["mem_total"].as_u64().unwrap_or(0)).human()
    );
    for n in info["nodes"].as_array().into_iter().flatten() {
        println!(
            "  node {}      cpus {}, memory {}",
            n["id"],
            n["cpus"].as_str().unwrap_or(""),
            ByteSize(n["mem_total"].as_u64().unwrap_or(0)).human()
        );
    }
    Ok(EXIT_OK)
}

pub(super) fn ping(from: &str, to: &str, count: u32, json: bool) -> Res {
    match simple(
        Request::Ping {
            from: from.to_string(),
            to: to.to_string(),
            count,
        },
        json,
    )? {
        Ok(Reply::Ping {
            count,
            min_ns,
            median_ns,
            max_ns,
        }) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"from": from, "to": to, "count": count, "rtt_min_ns": min_ns, "rtt_median_ns": median_ns, "rtt_max_ns": max_ns})
                );
            } else {
                println!(
                    "{from} -> {to}: {count} round trips over the window, rtt min {:.1} µs, median {:.1} µs, max {:.1} µs",
                    min_ns as f64 / 1e3,
                    median_ns as f64 / 1e3,
                    max_ns as f64 / 1e3
                );
            }
            Ok(EXIT_OK)
        }
        Ok(other) => Ok(failed(&format!("unexpected reply {other:?}"), EXIT_FAIL)),
        Err(code) => Ok(code),
    }
}

pub(super) fn traffic(from: &str, to: &str, count: u32, size: u32, json: bool) -> Res {
    match simple(
        Request::Traffic {
            from: from.to_string(),
            to: to.to_string(),
            count,
            size,
        },
        json,
    )? {
        Ok(Reply::Traffic {
            sent,
            good,
            bad,
            elapsed_ns,
        }) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"from": from, "to": to, "sent": sent, "good": good, "bad": bad, "elapsed_ns": elapsed_ns})
                );
            } else {
                println!(
                    "{from} -> {to}: {sent} messages of {size} B sent, {good} arrived intact and in order, {bad} bad ({:.1} ms)",
                    elapsed_ns as f64 / 1e6
                );
            }
            Ok(if good == sent && bad == 0 {
                EXIT_OK
            } else {
                EXIT_FAIL
            })
        }
        Ok(other) => Ok(failed(&format!("unexpected reply {other:?}"), EXIT_FAIL)),
        Err(code) => Ok(code),
    }
}

pub(super) fn stop(
    sysroot: &Path,
    instances: &[String],
    all: bool,
    timeout: u64,
    dry_run: bool,
) -> Res {
    if instances.is_empty() && !all {
        eprintln!("mkctl: name the instances to stop, or use --all");
        return Ok(EXIT_USAGE);
    }
    // Instances the kernel lists are kexec instances: stop them there.
    let listed: Vec<String> = super::kexec::listed(sysroot)
        .into_iter()
        .map(|k| k.name)
        .filter(|n| all || instances.contains(n))
        .collect();
    if !listed.is_empty() {
        let code = super::kexec::stop(sysroot, &listed, dry_run)?;
        let rest: Vec<String> = instances
            .iter()
            .filter(|n| !listed.contains(n))
            .cloned()
            .collect();
        if code != EXIT_OK || (!all && rest.is_empty()) {
            return Ok(code);
        }
    }
    let run = RunDir::from_env();
    let mut c = match Client::connect(&run) {
        Ok(c) => c,
        Err(ClientError::NotRunning(_)) if all => {
            println!("no mkctl daemon runs; nothing to stop");
            return Ok(EXIT_OK);
        }
        Err(e) => return Ok(failed(&crate::error_chain(&e), EXIT_FAIL)),
    };
    match c.call(
        &Request::Stop {
            instances: if all { Vec::new() } else { instances.to_vec() },
            timeout_ms: timeout.saturating_mul(1000),
        },
        progress,
    )? {
        Reply::Ok { message } => {
            println!("{message}");
            Ok(EXIT_OK)
        }
        Reply::Error { message, code } => Ok(failed(&message, code)),
        other => Ok(failed(&format!("unexpected reply {other:?}"), EXIT_FAIL)),
    }
}

pub(super) fn console(sysroot: &Path, instance: &str, tail: Option<usize>) -> Res {
    let run = RunDir::from_env();
    let dir = run.instance(instance);
    if !dir.path().is_dir() {
        if let Some(id) = super::kexec::listed(sysroot)
            .into_iter()
            .find(|k| k.name == instance)
            .and_then(|k| k.id)
        {
            return super::kexec::console(sysroot, id);
        }
        eprintln!(
            "mkctl: no instance \"{instance}\" was booted in {}",
            run.path().display()
        );
        return Ok(EXIT_USAGE);
    }
    if let Some(n) = tail {
        println!("{}", dir.console_tail(n));
        return Ok(EXIT_OK);
    }
    let sock = UnixStream::connect(dir.console_socket()).map_err(|e| {
        format!(
            "cannot attach to {}: {e} (is \"{instance}\" running?)",
            dir.console_socket().display()
        )
    })?;
    eprintln!("mkctl: attached to {instance}'s console; Ctrl-] detaches");
    let raw = RawTerminal::enter();
    let mut from_guest = sock.try_clone()?;
    let reader = std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_guest.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
    });
    let mut to_guest = sock;
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(p) = buf[..n].iter().position(|&b| b == 0x1d) {
            let _ = to_guest.write_all(&buf[..p]);
            break;
        }
        if to_guest.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to_guest.shutdown(std::net::Shutdown::Both);
    drop(raw);
    let _ = reader.join();
    eprintln!("\r\nmkctl: detached");
    Ok(EXIT_OK)
}

/// Puts the terminal in raw mode while it lives (when stdin is one).
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawTerminal(None);
        }
        let Ok(saved) = nix::sys::termios::tcgetattr(&stdin) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw);
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

pub(super) fn daemon(action: DaemonAction) -> Res {
    let run = RunDir::from_env();
    match action {
        DaemonAction::Run => {
            crate::daemon::server::run(run)?;
            Ok(EXIT_OK)
        }
        DaemonAction::Status { json } => {
            let st = fetch_status()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "daemon": st }))?
                );
                return Ok(if st.is_some() { EXIT_OK } else { EXIT_FAIL });
            }
            match st {
                Some(st) => {
                    println!(
                        "daemon pid {} serves {} ({} instance(s))",
                        st.pid,
                        run.socket().display(),
                        st.instances.len()
                    );
                    Ok(EXIT_OK)
                }
                None => {
                    println!("no mkctl daemon runs for {}", run.path().display());
                    Ok(EXIT_FAIL)
                }
            }
        }
        DaemonAction::Stop => {
            let mut c = match Client::connect(&run) {
                Ok(c) => c,
                Err(ClientError::NotRunning(_)) => {
                    println!("no mkctl daemon runs for {}", run.path().display());
                    return Ok(EXIT_OK);
                }
                Err(e) => return Err(e.into()),
            };
            let pid = std::fs::read_to_string(run.pid_file())
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            match c.call(&Request::Shutdown, progress)? {
                Reply::Ok { message } => println!("{message}"),
                Reply::Error { message, code } => return Ok(failed(&message, code)),
                _ => {}
            }
            // Wait for it to be gone, so a following `boot` starts afresh.
            if let Some(pid) = pid {
                let t0 = std::time::Instant::now();
                while std::path::Path::new(&format!("/proc/{pid}")).exists()
                    && t0.elapsed() < Duration::from_secs(30)
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Ok(EXIT_OK)
        }
    }
}

pub(super) fn migrate(pid: u32, from: &str, to: &str, mode: &str, json: bool) -> Res {
    match simple(
        Request::Migrate {
            pid,
            from: from.to_string(),
            to: to.to_string(),
            lazy: mode == "lazy",
        },
        json,
    )? {
        Ok(Reply::Migrated {
            new_pid,
            downtime_ns,
            total_ns,
            image_bytes,
        }) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"pid": pid, "from": from, "to": to, "new_pid": new_pid, "mode": mode, "downtime_ns": downtime_ns, "total_ns": total_ns, "bytes": image_bytes})
                );
            } else {
                println!(
                    "moved {pid} from {from} to {to}: now pid {new_pid}; downtime {:.1} ms, total {:.1} ms, {} moved",
                    downtime_ns as f64 / 1e6,
                    total_ns as f64 / 1e6,
                    ByteSize(image_bytes).human()
                );
            }
            Ok(EXIT_OK)
        }
        Ok(other) => Ok(failed(&format!("unexpected reply {other:?}"), EXIT_FAIL)),
        Err(code) => Ok(code),
    }
}

/// A kernel as messages name it: `host` for the host in any spelling (or
/// endpoint 0), an instance's name when given its id (the daemon knows
/// which), otherwise the argument as given.
pub(super) fn named(arg: &str) -> String {
    if is_host(arg) {
        return "host".into();
    }
    if arg.parse::<u32>().is_ok() {
        if let Ok(Some(st)) = fetch_status() {
            if let Some(i) = st.instances.iter().find(|i| i.id.to_string() == arg) {
                return i.name.clone();
            }
        }
    }
    arg.to_string()
}

/// `--on host` (or endpoint 0): the host kernel, where mkctl itself can do
/// the work.
fn is_host(on: &str) -> bool {
    on.eq_ignore_ascii_case("host") || on == "0"
}

/// Writes `path` through a `.partial` file renamed into place once whole.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<(), String>,
) -> Result<u64, String> {
    if path.is_dir() {
        return Err(format!(
            "{} is a directory; give a file name",
            path.display()
        ));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    let file = std::fs::File::create(&tmp).map_err(|e| {
        format!(
            "cannot write {} (through {}): {e}",
            path.display(),
            tmp.display()
        )
    })?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let done = fill(&mut w).and_then(|()| {
        let f = w.into_inner().map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))?;
        Ok(len)
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// `-` as an image path: stdout for checkpoint, stdin for restore.
fn is_stdio(path: &Path) -> bool {
    path == Path::new("-")
}

/// Why `-` cannot be used here, if it cannot: an image is binary, and a
/// terminal is no place to write or type one. Checked before anything is
/// frozen or started.
fn stdio_refusal(path: &Path, reading: bool) -> Option<String> {
    if !is_stdio(path) {
        return None;
    }
    if reading && std::io::stdin().is_terminal() {
        return Some(
            "restore - reads the image from stdin, which is a terminal: pipe an image in (mkctl checkpoint ... -o - | mkctl restore - ...) or give a file"
                .into(),
        );
    }
    if !reading && std::io::stdout().is_terminal() {
        return Some(
            "-o - writes the image to stdout, which is a terminal: redirect it or give a file name"
                .into(),
        );
    }
    None
}

/// Counts what goes through to `inner`.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes an image to `path` (through a `.partial` file, see
/// [`write_atomically`]) or, for `-`, to stdout; returns its size.
fn write_image_out(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), String>,
) -> Result<u64, String> {
    if !is_stdio(path) {
        return write_atomically(path, |w| fill(w));
    }
    let mut out = Counting {
        inner: std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock()),
        bytes: 0,
    };
    fill(&mut out)?;
    out.flush()
        .map_err(|e| format!("cannot write the image to stdout: {e}"))?;
    Ok(out.bytes)
}

/// What a checkpoint that worked prints: on stdout, or on stderr when the
/// image itself went to stdout.
fn say_written(output: &Path, bytes: u64, pid: u32, on: &str, kill: bool) -> Res {
    let line = if is_stdio(output) {
        format!(
            "wrote the image of process {pid} on {on} to stdout ({}){}",
            ByteSize(bytes).human(),
            if kill { "; it was stopped" } else { "" }
        )
    } else {
        format!(
            "wrote {} ({}) of process {pid} on {on}{}",
            output.display(),
            ByteSize(bytes).human(),
            if kill { "; it was stopped" } else { "" }
        )
    };
    if is_stdio(output) {
        eprintln!("mkctl: {line}");
    } else {
        println!("{line}");
    }
    Ok(EXIT_OK)
}

/// The image to restore: a file, or stdin for `-`, checked to begin like a
/// process image before anything is started. Exit code 2 when it cannot be
/// opened or is not an image.
fn open_image(file: &Path) -> Result<Box<dyn Read + Send>, Res> {
    if let Some(why) = stdio_refusal(file, true) {
        return Err(Ok(failed(&why, 2)));
    }
    if file.is_dir() {
        return Err(Ok(failed(
            &format!("{} is a directory; give an image file", file.display()),
            2,
        )));
    }
    let mut r: Box<dyn Read + Send> = if is_stdio(file) {
        Box::new(std::io::stdin())
    } else {
        match std::fs::File::open(file) {
            Ok(f) => Box::new(f),
            Err(e) => {
                return Err(Ok(failed(
                    &format!(
                        "cannot open {}: {}",
                        file.display(),
                        mknode::io_error_text(&e)
                    ),
                    2,
                )))
            }
        }
    };
    let magic = &mknode::migrate::image::MAGIC;
    let mut head = Vec::with_capacity(magic.len());
    if let Err(e) = (&mut r).take(magic.len() as u64).read_to_end(&mut head) {
        return Err(Ok(failed(
            &format!(
                "cannot read {}: {}",
                image_name(file),
                mknode::io_error_text(&e)
            ),
            2,
        )));
    }
    if head.is_empty() {
        let why = if is_stdio(file) {
            "nothing came on stdin (did the checkpoint before the pipe fail?)".to_string()
        } else {
            format!("{} is empty", file.display())
        };
        return Err(Ok(failed(&why, 2)));
    }
    if head != magic[..] {
        return Err(Ok(failed(
            &format!(
                "{} is not a process image (it begins with {:?}, not {:?})",
                image_name(file),
                String::from_utf8_lossy(&head),
                String::from_utf8_lossy(magic)
            ),
            2,
        )));
    }
    Ok(Box::new(std::io::Cursor::new(head).chain(r)))
}

/// Checkpoint of a host process, done here: freeze, write, then let it go
/// on (or kill it). Any failure leaves it running untouched.
fn checkpoint_here(pid: u32, output: &Path, kill: bool) -> Res {
    let pid_i = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
    let frozen = match mknode::migrate::freeze(pid_i) {
        Ok(f) => f,
        Err(e) => return Ok(failed(&crate::error_chain(&e), EXIT_FAIL)),
    };
    let written = write_image_out(output, |w| {
        frozen
            .write_image(w, mknode::migrate::ImageOptions::default())
            .map(|_| ())
            .map_err(|e| crate::error_chain(&e))
    });
    match written {
        Ok(bytes) => {
            if kill {
                frozen.kill();
            } else {
                frozen.resume();
            }
            say_written(output, bytes, pid, "host", kill)
        }
        Err(e) => {
            drop(frozen);
            Ok(failed(
                &format!("checkpoint of {pid}: {e}; the process runs on"),
                EXIT_FAIL,
            ))
        }
    }
}

/// Restore on the host, done here: the process becomes this mkctl's child
/// with its stdin/stdout/stderr, and its exit status becomes mkctl's.
fn restore_here(file: &Path) -> Res {
    use std::os::fd::AsFd;
    let image = match open_image(file) {
        Ok(f) => f,
        Err(res) => return res,
    };
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
    // With the image on stdin, the process gets /dev/null there: what
    // follows the image in the pipe is not its input.
    let stdin = if is_stdio(file) {
        std::fs::File::open("/dev/null")?.into()
    } else {
        dup(std::io::stdin().as_fd())?
    };
    let stdio = mknode::migrate::StdioPlan {
        stdin,
        stdout: dup(std::io::stdout().as_fd())?,
        stderr: dup(std::io::stderr().as_fd())?,
    };
    let restored =
        match mknode::migrate::restore(std::io::BufReader::with_capacity(1 << 20, image), stdio) {
            Ok(r) => r,
            Err(e) => {
                return Ok(failed(
                    &format!(
                        "restore of {}: {}",
                        image_name(file),
                        crate::error_chain(&e)
                    ),
                    EXIT_FAIL,
                ))
            }
        };
    eprintln!(
        "mkctl: restored {} on host as pid {}",
        image_name(file),
        restored.pid
    );
    use nix::sys::wait::{waitpid, WaitStatus};
    let pid = nix::unistd::Pid::from_raw(restored.pid);
    forward_signals_until_exit(pid);
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Ok(failed(&format!("waiting for {pid}: {e}"), EXIT_FAIL)),
        }
    }
}

/// Passes SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to mkctl on to `child`
/// (as `mkctl exec` does to a remote command) until it has exited.
/// mkctl blocks them and reads them from a signalfd; the child is not
/// affected (its signal mask came from its image).
fn forward_signals_until_exit(child: nix::unistd::Pid) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::signal::{SigSet, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use std::os::fd::AsFd;
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        set.add(s);
    }
    let Ok(pidfd) = mknode::migrate::pidfd_open(child) else {
        return;
    };
    if set.thread_block().is_err() {
        return;
    }
    let Ok(sfd) = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) else {
        return;
    };
    loop {
        let mut fds = [
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        while let Ok(Some(info)) = sfd.read_signal() {
            if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                let _ = nix::sys::signal::kill(child, sig);
            }
        }
    }
}

pub(super) fn checkpoint(pid: u32, on: &str, output: &Path, kill: bool) -> Res {
    if let Some(why) = stdio_refusal(output, false) {
        return Ok(failed(&why, 2));
    }
    if is_host(on) {
        return checkpoint_here(pid, output, kill);
    }
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    // The exit code the daemon gives a failure (2: no such instance).
    let mut code = EXIT_FAIL;
    // The request goes out once the file is there to take the image.
    let written = write_image_out(output, |w| {
        c.send(&Request::Checkpoint {
            pid,
            on: on.to_string(),
            kill,
        })
        .map_err(|e| e.to_string())?;
        loop {
            match c.read().map_err(|e| e.to_string())? {
                Frame::Wire(Msg::ImageChunk { bytes, .. }) => {
                    w.write_all(&bytes).map_err(|e| e.to_string())?
                }
                Frame::Reply(Reply::Ok { .. }) => return Ok(()),
                Frame::Reply(Reply::Error { message, code: c }) => {
                    code = c;
                    return Err(message);
                }
                _ => {}
            }
        }
    });
    match written {
        Ok(bytes) => say_written(output, bytes, pid, on, kill),
        Err(e) => Ok(failed(&format!("checkpoint of {pid} on {on}: {e}"), code)),
    }
}

pub(super) fn restore(file: &Path, on: &str) -> Res {
    if is_host(on) {
        return restore_here(file);
    }
    let mut image = match open_image(file) {
        Ok(f) => f,
        Err(res) => return res,
    };
    let mut c = match connect() {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    c.send(&Request::Restore { on: on.to_string() })?;
    match c.read()? {
        Frame::Reply(Reply::ExecStarted) => {}
        Frame::Reply(Reply::Error { message, code }) => return Ok(failed(&message, code)),
        other => return Ok(failed(&format!("unexpected reply {other:?}"), EXIT_FAIL)),
    }
    let mut w = c.try_clone()?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let n = image.read(&mut buf).unwrap_or_default();
            let m = Msg::ImageChunk {
                req: 0,
                bytes: buf[..n].to_vec(),
            };
            if w.send_wire(&m).is_err() || n == 0 {
                return;
            }
        }
    });
    relay_output(&mut c, on, Some(Path::new(&image_name(file))))
}

/// How messages name an image path: `-` is stdin.
fn image_name(file: &Path) -> String {
    if is_stdio(file) {
        "the image from stdin".into()
    } else {
        file.display().to_string()
    }
}
