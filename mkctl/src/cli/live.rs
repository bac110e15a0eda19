//! The commands that act on running instances through the daemon: boot,
//! status, exec, info, ping, traffic, stop, restart, migrate, console, daemon
//! (checkpoint and restore are in `image.rs`).
//!
//! Each sends one [`Request`] and reads its replies; a failure is returned
//! as a [`Failure`] with the daemon's message and exit code, and printed
//! once by `cli::run` (as JSON too under `--json`).

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use mknode::wire::{ExitStatus, Msg, Stream, MAX_CHUNK};

use super::{DaemonAction, Failure, Res, EXIT_FAIL, EXIT_OK, EXIT_USAGE};
use crate::daemon::client::{Client, ClientError};
use crate::daemon::control::{DaemonStatus, Frame, Reply, Request};
use crate::daemon::paths::RunDir;
use crate::topology;
use crate::units::ByteSize;

pub(super) fn progress(instance: &str, message: &str) {
    eprintln!("[{instance}] {message}");
}

/// A connection to the running daemon (one is started when an earlier one
/// left instances running, to adopt them).
pub(super) fn connect() -> Result<Client, Failure> {
    Client::connect_or_adopt(&RunDir::from_env(), |m| eprintln!("mkctl: {m}")).map_err(|e| {
        Failure::Failed(format!(
            "{} (start instances with `mkctl boot <topology>`)",
            crate::error_chain(&e)
        ))
    })
}

/// What a reply that is not the one expected means: the daemon's error,
/// or an answer this command does not know.
pub(super) fn refused(r: Reply) -> Failure {
    match r {
        Reply::Error { message, code } => Failure::Daemon { message, code },
        other => Failure::Unexpected(other.kind()),
    }
}

/// One request and its reply; an error reply is the daemon's failure.
fn ask(req: Request) -> Result<Reply, Failure> {
    match connect()?
        .call(&req, progress)
        .map_err(|e| Failure::Failed(crate::error_chain(&e)))?
    {
        r @ Reply::Error { .. } => Err(refused(r)),
        r => Ok(r),
    }
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
    if let Some(n) = instances.iter().find(|n| t.instance(n).is_none()) {
        let names: Vec<&str> = t.instances.iter().map(|i| i.name.as_str()).collect();
        return Err(Failure::Usage(format!(
            "{} has no instance \"{n}\"; it has: {}",
            file.display(),
            names.join(", ")
        ))
        .into());
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
        let code = super::kexec::boot(sysroot, file, &t, &kexec_only, timeout, dry_run)?;
        if code != EXIT_OK || qemu.is_empty() {
            return Ok(code);
        }
    } else if dry_run {
        return Err(Failure::Usage(format!(
            "--dry-run applies to kexec instances; {} has none to boot",
            file.display()
        ))
        .into());
    }
    let config = std::fs::canonicalize(file)?;
    let run = RunDir::from_env();
    // A daemon about to be started would find the same images missing: say
    // so now and start nothing. (A running one was started with its own
    // environment and judges for itself.)
    if Client::connect(&run).is_err() {
        let chosen = t.instances.iter().filter(|i| qemu.contains(&i.name));
        if let Some(why) = crate::daemon::paths::missing_auto_images(chosen) {
            return Err(Failure::Failed(why).into());
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
    match reply {
        Reply::Ok { message } => {
            println!("{message}");
            Ok(EXIT_OK)
        }
        other => Err(refused(other).into()),
    }
}

fn fetch_status() -> Result<Option<DaemonStatus>, Box<dyn std::error::Error>> {
    let run = RunDir::from_env();
    let mut c = match Client::connect_or_adopt(&run, |m| eprintln!("mkctl: {m}")) {
        Ok(c) => c,
        Err(ClientError::NotRunning(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match c.call(&Request::Status, progress)? {
        Reply::Status { status } => Ok(Some(status)),
        other => Err(refused(other).into()),
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
        "{:<12} {:>3}  {:<9} {:>8}  {:<8} {:>7}  {:>9}  {:>9}  {:>8}  KERNEL / REASON",
        "INSTANCE", "ID", "STATE", "PID", "CPUS", "MEMORY", "UPTIME", "HEARTBEAT", "RESTARTS"
    );
    for i in &st.instances {
        let dash = || "-".to_string();
        println!(
            "{:<12} {:>3}  {:<9} {:>8}  {:<8} {:>7}  {:>9}  {:>9}  {:>8}  {}",
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
            // Restarts by the policy, of how many it may make.
            i.restart_limit
                .map_or_else(dash, |l| format!("{}/{l}", i.restarts)),
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
            _ => return Err(Failure::Usage(format!("--env takes NAME=VALUE, got {e:?}")).into()),
        }
    }
    if !pairs.iter().any(|(k, _)| k == "PATH") {
        pairs.push(("PATH".into(), "/bin:/sbin:/usr/bin:/usr/sbin".into()));
    }
    let forward_stdin = interactive || !std::io::stdin().is_terminal();
    let mut c = connect()?;
    let req = Request::Exec {
        instance: instance.to_string(),
        argv: command,
        env: pairs,
        cwd,
        stdin: forward_stdin,
    };
    started(&mut c, &req)?;
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

/// Sends a streamed request (exec, restore) and waits for the daemon to
/// accept it.
pub(super) fn started(c: &mut Client, req: &Request) -> Result<(), Box<dyn std::error::Error>> {
    match c.request(req, &|m| eprintln!("mkctl: {m}"))? {
        Frame::Reply(Reply::ExecStarted) => Ok(()),
        Frame::Reply(r) => Err(refused(r).into()),
        _ => Err(Failure::Unexpected("wire message").into()),
    }
}

/// Streams a remote process's output here until it ends, and returns its
/// exit status as ours; `restored` (the image file) has its new pid said
/// on stderr when it starts.
pub(super) fn relay_output(c: &mut Client, instance: &str, restored: Option<&Path>) -> Res {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    loop {
        let frame = match c.read() {
            Ok(f) => f,
            Err(ClientError::Frame(crate::daemon::control::FrameError::Closed)) => {
                let _ = out.flush();
                return Err(Failure::Failed(format!(
                    "the daemon went away (it was stopped, restarted or killed) while it relayed this output; the process may still run on {instance}"
                ))
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        match frame {
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
                return Err(Failure::Failed(format!("{instance}: {message}")).into());
            }
            Frame::Reply(r @ Reply::Error { .. }) => return Err(refused(r).into()),
            _ => {}
        }
    }
}

pub(super) fn info(instance: &str, json: bool) -> Res {
    let info = match ask(Request::Info {
        instance: instance.to_string(),
    })? {
        Reply::Info { info } => info,
        other => return Err(refused(other).into()),
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
    match ask(Request::Ping {
        from: from.to_string(),
        to: to.to_string(),
        count,
    })? {
        Reply::Ping {
            count,
            min_ns,
            median_ns,
            max_ns,
        } => {
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
        other => Err(refused(other).into()),
    }
}

pub(super) fn traffic(from: &str, to: &str, count: u32, size: u32, json: bool) -> Res {
    match ask(Request::Traffic {
        from: from.to_string(),
        to: to.to_string(),
        count,
        size,
    })? {
        Reply::Traffic {
            sent,
            good,
            bad,
            elapsed_ns,
        } => {
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
        other => Err(refused(other).into()),
    }
}

/// What `mkctl stop` was asked.
#[derive(Debug, Clone, Copy)]
pub(super) struct StopArgs {
    pub all: bool,
    pub timeout: u64,
    pub force: bool,
    pub dry_run: bool,
    pub json: bool,
}

pub(super) fn stop(sysroot: &Path, instances: &[String], args: StopArgs) -> Res {
    let StopArgs {
        all,
        timeout,
        force,
        dry_run,
        json,
    } = args;
    if instances.is_empty() && !all {
        return Err(Failure::Usage("name the instances to stop, or use --all".into()).into());
    }
    // Instances the kernel lists are kexec instances: stop them there.
    let listed: Vec<String> = super::kexec::listed(sysroot)
        .into_iter()
        .map(|k| k.name)
        .filter(|n| all || instances.contains(n))
        .collect();
    if !listed.is_empty() {
        // The kernel's own halt escalates by itself (halt, then force) and
        // reports as it goes: these options are the daemon's.
        if json || force {
            return Err(Failure::Usage(format!(
                "--json and --force apply to QEMU instances; {} {} kexec: stop without them",
                listed.join(", "),
                if listed.len() == 1 { "is" } else { "are" }
            ))
            .into());
        }
        if !dry_run {
            agents_power_off(&listed, timeout);
        }
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
            if json {
                println!(
                    "{}",
                    serde_json::json!({"message": "no mkctl daemon runs; nothing to stop", "instances": []})
                );
            } else {
                println!("no mkctl daemon runs; nothing to stop");
            }
            return Ok(EXIT_OK);
        }
        Err(e) => return Err(e.into()),
    };
    match c.call(
        &Request::Stop {
            instances: if all { Vec::new() } else { instances.to_vec() },
            timeout_ms: timeout.saturating_mul(1000),
            force,
        },
        progress,
    )? {
        Reply::Stopped { message, instances } => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"message": message, "instances": instances})
                    )?
                );
            } else {
                println!("{message}");
            }
            Ok(EXIT_OK)
        }
        other => Err(refused(other).into()),
    }
}

/// Asks the daemon, when one runs and hosts the window of the kexec
/// instances `names`, to power them off through their agents (their
/// kernels halt their CPUs); the kernel's own stop comes after.
fn agents_power_off(names: &[String], timeout: u64) {
    let Ok(Some(st)) = fetch_status() else {
        return;
    };
    let known: Vec<String> = names
        .iter()
        .filter(|n| st.instances.iter().any(|i| &i.name == *n))
        .cloned()
        .collect();
    if known.is_empty() {
        return;
    }
    let r = Client::connect(&RunDir::from_env()).map(|mut c| {
        c.call(
            &Request::Stop {
                instances: known,
                timeout_ms: timeout.saturating_mul(1000),
                force: false,
            },
            progress,
        )
    });
    match r {
        Ok(Ok(Reply::Stopped { message, .. })) => eprintln!("mkctl: agents: {message}"),
        Ok(Ok(other)) => eprintln!("mkctl: agents: {}", refused(other)),
        Ok(Err(e)) => eprintln!("mkctl: agents: {}", crate::error_chain(&e)),
        Err(e) => eprintln!("mkctl: agents: {}", crate::error_chain(&e)),
    }
}

pub(super) fn restart(
    sysroot: &Path,
    instances: &[String],
    stop_timeout: u64,
    timeout: u64,
) -> Res {
    // The daemon runs QEMU instances only; the kernel's own instances have
    // no daemon state to come back from.
    let kexec = super::kexec::listed(sysroot);
    if let Some(k) = kexec.iter().find(|k| instances.contains(&k.name)) {
        return Err(Failure::Failed(format!(
            "\"{0}\" is a kexec instance, which restart does not handle yet: \
             mkctl stop {0}, then mkctl boot <topology> {0}",
            k.name
        ))
        .into());
    }
    let names: Vec<String> = instances.iter().map(|n| named(n)).collect();
    match ask(Request::Restart {
        instances: names,
        stop_timeout_ms: stop_timeout.saturating_mul(1000),
        boot_timeout_ms: timeout.saturating_mul(1000),
    })? {
        Reply::Ok { message } => {
            println!("{message}");
            Ok(EXIT_OK)
        }
        other => Err(refused(other).into()),
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
        return Err(Failure::Usage(format!(
            "no instance \"{instance}\" was booted in {}",
            run.path().display()
        ))
        .into());
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

/// Waits (at most 30 s) until the daemon `pid` has exited.
fn wait_gone(pid: Option<i32>) {
    let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()) else {
        return;
    };
    let t0 = std::time::Instant::now();
    // A zombie counts as gone: its parent, not us, reaps it.
    while crate::daemon::process::start_time(pid).is_some()
        && t0.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
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
            let mut c = match Client::connect_or_adopt(&run, |m| eprintln!("mkctl: {m}")) {
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
                r @ Reply::Error { .. } => return Err(refused(r).into()),
                _ => {}
            }
            // Wait for it to be gone, so a following `boot` starts afresh.
            wait_gone(pid);
            Ok(EXIT_OK)
        }
        DaemonAction::Restart { json } => {
            match Client::connect(&run) {
                Ok(mut c) => {
                    let pid = std::fs::read_to_string(run.pid_file())
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok());
                    match c.call(&Request::Handover, progress)? {
                        Reply::Ok { message } => eprintln!("mkctl: {message}"),
                        r @ Reply::Error { .. } => return Err(refused(r).into()),
                        _ => {}
                    }
                    wait_gone(pid);
                }
                Err(ClientError::NotRunning(_)) => {}
                Err(e) => return Err(e.into()),
            }
            let mut c = Client::connect_or_start(&run, |m| eprintln!("mkctl: {m}"))?;
            let st = match c.call(&Request::Status, progress)? {
                Reply::Status { status } => status,
                other => return Err(refused(other).into()),
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({ "daemon": st }))?
                );
                return Ok(EXIT_OK);
            }
            let adopted: Vec<String> = st
                .instances
                .iter()
                .filter(|i| i.adopted)
                .map(|i| match i.pid {
                    Some(pid) => format!("{} ({}, qemu pid {pid})", i.name, i.state),
                    None => format!("{} ({}, kexec)", i.name, i.state),
                })
                .collect();
            let lost: Vec<String> = st
                .instances
                .iter()
                .filter(|i| !i.adopted && i.state == "failed")
                .map(|i| format!("{}: {}", i.name, i.reason.as_deref().unwrap_or("failed")))
                .collect();
            println!(
                "daemon pid {} serves {}; adopted {}",
                st.pid,
                run.socket().display(),
                if adopted.is_empty() {
                    "nothing".to_string()
                } else {
                    adopted.join(", ")
                }
            );
            for l in lost {
                println!("failed {l}");
            }
            Ok(EXIT_OK)
        }
    }
}

pub(super) fn migrate(
    pid: u32,
    (from, to): (&str, &str),
    (mode, any_cpu): (&str, bool),
    json: bool,
) -> Res {
    let req = Request::Migrate {
        pid,
        from: from.to_string(),
        to: to.to_string(),
        lazy: mode == "lazy" || mode == "lazy-tree",
        tree: mode == "tree" || mode == "lazy-tree",
        any_cpu,
    };
    // Bytes and rate on a terminal while the image and pages flow; erased
    // (dropped) before the summary.
    let meter = std::cell::RefCell::new(super::progress::Progress::new("moving"));
    let reply = connect()?
        .call_watching(
            &req,
            |instance, message| {
                meter.borrow_mut().clear();
                progress(instance, message);
            },
            |bytes| meter.borrow_mut().set(bytes),
        )
        .map_err(|e| Failure::Failed(crate::error_chain(&e)))?;
    drop(meter);
    match reply {
        Reply::Migrated {
            new_pid,
            downtime_ns,
            total_ns,
            image_bytes,
            pages,
        } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"pid": pid, "from": from, "to": to, "new_pid": new_pid, "mode": mode, "downtime_ns": downtime_ns, "total_ns": total_ns, "bytes": image_bytes, "pages": pages})
                );
            } else {
                println!(
                    "moved {pid} from {from} to {to}: now pid {new_pid}; downtime {:.1} ms, total {:.1} ms, {} moved ({pages} pages)",
                    downtime_ns as f64 / 1e6,
                    total_ns as f64 / 1e6,
                    ByteSize(image_bytes).human()
                );
            }
            Ok(EXIT_OK)
        }
        other => Err(refused(other).into()),
    }
}

pub(super) fn migrate_thread(pid: u32, tid: u32, from: &str, to: &str, json: bool) -> Res {
    match ask(Request::MigrateThread {
        pid,
        tid,
        from: from.to_string(),
        to: to.to_string(),
    })? {
        Reply::ThreadMigrated {
            at,
            shadow_pid,
            downtime_ns,
        } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"pid": pid, "tid": tid, "from": from, "at": at, "shadow_pid": shadow_pid, "downtime_ns": downtime_ns})
                );
            } else if shadow_pid == 0 {
                println!(
                    "thread {tid} of {pid} is back on {at}; stopped {:.1} ms",
                    downtime_ns as f64 / 1e6
                );
            } else {
                println!(
                    "thread {tid} of {pid} runs on {at} (shadow pid {shadow_pid} there); stopped {:.1} ms",
                    downtime_ns as f64 / 1e6
                );
            }
            Ok(EXIT_OK)
        }
        other => Err(refused(other).into()),
    }
}

pub(super) fn threads(json: bool) -> Res {
    match ask(Request::Threads)? {
        Reply::Threads { threads } => {
            if json {
                println!("{}", serde_json::to_string(&threads)?);
            } else if threads.is_empty() {
                println!("no thread runs away from its process's kernel");
            } else {
                println!(
                    "{:<10} {:>8} {:>8}  {:<10} {:>8}",
                    "KERNEL", "PID", "TID", "RUNS ON", "SHADOW"
                );
                for t in &threads {
                    println!(
                        "{:<10} {:>8} {:>8}  {:<10} {:>8}",
                        t.kernel, t.pid, t.tid, t.at, t.shadow_pid
                    );
                }
            }
            Ok(EXIT_OK)
        }
        other => Err(refused(other).into()),
    }
}

/// `mkctl events`: subscribes and prints one line per event, flushed, until
/// the daemon stops (exit 0) or stdout closes (exit 0: a pipe into `head`
/// is a normal end). The daemon going away without saying it stopped is a
/// failure.
pub(super) fn events(json: bool, last: u32) -> Res {
    let mut c = connect()?;
    c.send(&Request::Events { last })
        .map_err(|e| Failure::Failed(crate::error_chain(&e)))?;
    let stdout = std::io::stdout();
    let mut first = true;
    loop {
        let frame = match c.read() {
            Ok(f) => f,
            // Before it said the subscription began: a daemon of an older
            // build, which does not know the request.
            Err(ClientError::Frame(crate::daemon::control::FrameError::Closed)) if first => {
                return Err(Failure::Failed(
                    "the daemon did not take the events request: it probably runs an older mkctl build (`mkctl daemon stop` ends it, with its instances)"
                        .into(),
                )
                .into())
            }
            Err(ClientError::Frame(crate::daemon::control::FrameError::Closed)) => {
                return Err(Failure::Failed(
                    "the daemon closed the event stream without saying it stopped (see its log)"
                        .into(),
                )
                .into())
            }
            Err(e) => return Err(Failure::Failed(crate::error_chain(&e)).into()),
        };
        let line = match frame {
            Frame::Reply(Reply::Event { event }) if json => serde_json::to_string(&event)?,
            Frame::Reply(Reply::Event { event }) => event.human(),
            Frame::Reply(Reply::Ok { message }) => {
                if !json {
                    eprintln!("mkctl: {message}");
                }
                return Ok(EXIT_OK);
            }
            Frame::Reply(r @ Reply::Error { .. }) => return Err(refused(r).into()),
            Frame::Reply(Reply::Subscribed { .. }) => {
                first = false;
                continue;
            }
            Frame::Reply(other) => return Err(refused(other).into()),
            Frame::Request(_) | Frame::Wire(_) => continue,
        };
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            // The reader went away (SIGPIPE is ignored: EPIPE here).
            return Ok(EXIT_OK);
        }
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
pub(super) fn is_host(on: &str) -> bool {
    on.eq_ignore_ascii_case("host") || on == "0"
}
