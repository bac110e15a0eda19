//! Process trees on this kernel: `freeze_tree` + `restore_tree` of
//! mktree (a session leader, a kid in its own group, a zombie, a log file
//! both write through one open file description), and the refusals.

mod common;

use std::process::{Command, Stdio};

use common::{field, null, pipe, serial, start_prog, testprog, Line, Output, T};
use mknode::migrate::{freeze, freeze_tree, restore_tree, ImageOptions, StdioPlan};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

/// The next line starting with `prefix`.
fn next_line(out: &Output, prefix: &str) -> (Vec<String>, String) {
    let lines = out.until(T, |l| matches!(l, Line::Tree(s) if s.starts_with(prefix)));
    let mut all: Vec<String> = lines
        .into_iter()
        .filter_map(|l| match l {
            Line::Tree(s) => Some(s),
            _ => None,
        })
        .collect();
    let last = all.pop().expect("the matching line");
    (all, last)
}

fn get(line: &str, name: &str) -> i64 {
    field(line, name).unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

/// Kills the processes it holds, and their descendants, when dropped (a
/// failed test leaves none).
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &p in &self.0 {
            let all = mknode::migrate::tree_of(p).unwrap_or_else(|_| vec![p]);
            for q in all {
                let _ = kill(Pid::from_raw(q), Signal::SIGKILL);
            }
        }
    }
}

/// A copy of the frozen tree here, through an image in memory, its stdout
/// a new pipe: the copy and that pipe's read end.
fn copy(
    frozen: &mknode::migrate::FrozenTree,
) -> (mknode::migrate::RestoredTree, std::os::fd::OwnedFd) {
    let mut img = Vec::new();
    frozen
        .write_image(&mut img, ImageOptions::default())
        .expect("write the tree image");
    let (r, w) = pipe();
    let plan = StdioPlan {
        stdin: null(),
        stdout: w,
        stderr: null(),
    };
    (restore_tree(&img[..], plan).expect("restore the tree"), r)
}

/// A lazy copy of `frozen` here: its lazy image, a page server per process
/// joined to its pager by an in-process link pushing as `push` says, and
/// the copy restored with its stdout a new pipe. The copy, its pagers, that
/// pipe's read end and the origins' loops (kept while pages flow).
fn lazy_copy(
    frozen: &mknode::migrate::FrozenTree,
    push: mknode::migrate::PushPolicy,
) -> (
    mknode::migrate::RestoredTree,
    Vec<mknode::migrate::Pager>,
    std::os::fd::OwnedFd,
    Vec<mknode::migrate::OriginLoops>,
) {
    use mknode::migrate::{channel_link, restore_tree_lazy, LazyLink, LazyOptions, PagerOptions};
    let mut img = Vec::new();
    let (_, servers) = frozen
        .write_lazy_image(&mut img, LazyOptions::default())
        .expect("the lazy tree image");
    let mut origins = Vec::new();
    let mut links: Vec<Option<LazyLink>> = servers
        .into_iter()
        .map(|s| {
            let (link, loops) = channel_link(s, push).expect("link");
            origins.push(loops);
            Some(link)
        })
        .collect();
    let (r, w) = pipe();
    let plan = StdioPlan {
        stdin: null(),
        stdout: w,
        stderr: null(),
    };
    let (tree, pagers) = restore_tree_lazy(
        &img[..],
        plan,
        &mut |k| links[k].take().expect("one link per process"),
        PagerOptions::default(),
    )
    .expect("restore the tree lazily");
    (tree, pagers, r, origins)
}

/// `sh -c script` with `stdout`, stdin and stderr null, and an
/// environment of its own (PATH only: the same wherever the test runs).
fn sh_c(script: &str, stdout: Stdio) -> std::process::Child {
    Command::new("sh")
        .args(["-c", script])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sh")
}

/// The numbers `n` of the lines `who` wrote to the log, in order.
fn log_numbers(text: &str, who: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(who)?.strip_prefix(' '))
        .map(|n| {
            n.parse()
                .unwrap_or_else(|_| panic!("a clobbered log line in {text:?}"))
        })
        .collect()
}

#[test]
fn a_tree_moves_with_its_pids_group_session_zombie_and_shared_log() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("log");
    let (mut top, out) = start_prog(
        &testprog("mktree"),
        &["--log", log.to_str().expect("utf-8"), "--interval-ms", "20"],
    );
    // A few lines of each first, in the log too.
    let (mut old, first) = next_line(&out, "top n=5 ");
    old.push(first.clone());
    let (more, kid) = next_line(&out, "kid ");
    old.extend(more);
    old.push(kid);
    let (top_pid, kid_pid, zombie_pid) = (
        get(&first, "pid") as i32,
        get(&first, "kid") as i32,
        get(&first, "zombie") as i32,
    );
    assert_eq!(top_pid, top.id() as i32);
    let mut guard = KillOnDrop(vec![top_pid, kid_pid]);

    let frozen = freeze_tree(top_pid).expect("freeze the tree");
    let meta = frozen.meta().clone();
    assert_eq!(frozen.pids(), [top_pid, zombie_pid, kid_pid]);
    assert_eq!(meta.procs[0].sid, Some(0), "the top leads its session");
    assert_eq!(meta.procs[1].zombie, Some(7 << 8), "the zombie's status");
    assert_eq!(meta.procs[2].pgid, Some(2), "the kid leads its group");
    assert_eq!(meta.procs[2].sid, Some(0));
    let log_fd = std::fs::read_dir(format!("/proc/{top_pid}/fd"))
        .expect("fds")
        .flatten()
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == log))
        .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .expect("the top's log descriptor");
    assert!(
        meta.shares
            .iter()
            .any(|s| s.proc == 2 && s.from == 0 && s.fd == log_fd && s.from_fd == log_fd),
        "the log is one description: {:?}",
        meta.shares
    );
    let (tree, r) = copy(&frozen);
    guard.0.push(tree.holder);
    guard.0.extend(tree.pids.iter().map(|p| p.0));
    frozen.kill();
    let _ = top.wait();
    // Every line the originals wrote: read so far, and up to the end.
    old.extend(out.drain(T).into_iter().filter_map(|l| match l {
        Line::Tree(s) => Some(s),
        _ => None,
    }));
    let last = |who: &str| {
        let n: Vec<i64> = old
            .iter()
            .filter(|l| l.starts_with(who))
            .map(|l| get(l, "n"))
            .collect();
        for w in n.windows(2) {
            assert_eq!(w[1], w[0] + 1, "{who}lines before the move: {n:?}");
        }
        *n.last().expect("lines before the move")
    };
    let (old_top, old_kid) = (last("top "), last("kid "));

    // Every pid as the tree knows it, in a namespace of its own.
    assert_eq!(
        tree.pids.iter().map(|p| p.1).collect::<Vec<_>>(),
        [top_pid, zombie_pid, kid_pid]
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", tree.top())).expect("status");
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .expect("NSpid");
    assert!(
        nspid.split_whitespace().last() == Some(&top_pid.to_string()),
        "{nspid}"
    );

    // Its executable, and the signals left pending (SIGWINCH, blocked):
    // the top's for its thread, the kid's for the process.
    let exe = |p: i32| std::fs::read_link(format!("/proc/{p}/exe")).expect("exe");
    let pending = |p: i32, what: &str| {
        let s = std::fs::read_to_string(format!("/proc/{p}/status")).expect("status");
        let v = s
            .lines()
            .find_map(|l| l.strip_prefix(what))
            .expect("the field");
        u64::from_str_radix(v.trim(), 16).expect("hex") & (1 << (libc::SIGWINCH - 1)) != 0
    };
    for (here, _) in &tree.pids {
        if *here != tree.pids[1].0 {
            assert_eq!(exe(*here), testprog("mktree"), "process {here}'s exe");
        }
    }
    assert!(pending(tree.top(), "SigPnd:"), "the top's SIGWINCH");
    assert!(pending(tree.pids[2].0, "ShdPnd:"), "the kid's SIGWINCH");

    let out = Output::new(r);
    let (before, t) = next_line(&out, "top ");
    assert_eq!(get(&t, "n"), old_top + 1, "the top counts on: {t}");
    for (k, v) in [
        ("pid", top_pid),
        ("pgid", top_pid),
        ("sid", top_pid),
        ("kid", kid_pid),
        ("zombie", zombie_pid),
    ] {
        assert_eq!(get(&t, k), i64::from(v), "{k} in {t}");
    }
    let k = match before.into_iter().find(|l| l.starts_with("kid ")) {
        Some(k) => k,
        None => next_line(&out, "kid ").1,
    };
    assert_eq!(get(&k, "n"), old_kid + 1, "the kid counts on: {k}");
    for (f, v) in [
        ("pid", kid_pid),
        ("ppid", top_pid),
        ("pgid", kid_pid),
        ("sid", top_pid),
    ] {
        assert_eq!(get(&k, f), i64::from(v), "{f} in {k}");
    }

    // The zombie is the top's to reap, with its code.
    kill(Pid::from_raw(tree.top()), Signal::SIGUSR1).expect("SIGUSR1");
    let (_, reaped) = next_line(&out, "reaped ");
    assert_eq!(reaped, format!("reaped pid={zombie_pid} code=7"));
    // The kid is the top's child: it can end it and wait for it.
    kill(Pid::from_raw(tree.top()), Signal::SIGUSR2).expect("SIGUSR2");
    let (_, ended) = next_line(&out, "ended ");
    assert_eq!(ended, format!("ended pid={kid_pid} signal=15"));
    // The holder exits with the top's code once the namespace is empty.
    assert_eq!(
        waitpid(Pid::from_raw(tree.holder), None).expect("wait for the holder"),
        WaitStatus::Exited(Pid::from_raw(tree.holder), 3)
    );

    // Both wrote the log through one offset, before and after: every line
    // whole, each count without a gap, up to (at least) the lines seen
    // after the move. (With an offset each, their lines, of one length,
    // would overwrite each other's.)
    let text = std::fs::read_to_string(&log).expect("log");
    for (who, seen) in [("top", get(&t, "n")), ("kid", get(&k, "n"))] {
        let n = log_numbers(&text, who);
        assert!(
            n.len() as i64 > seen,
            "{who} wrote {seen} after the move: {n:?}"
        );
        for (i, x) in n.iter().enumerate() {
            assert_eq!(*x, i as u64, "{who}'s log lines: {n:?}");
        }
    }
}

#[test]
fn a_process_with_children_is_refused_without_the_tree() {
    let _g = serial();
    let (mut top, out) = start_prog(&testprog("mktree"), &[]);
    let (_, kid) = next_line(&out, "kid ");
    let e = freeze(top.id() as i32).expect_err("children refuse a lone move");
    let _ = kill(Pid::from_raw(get(&kid, "pid") as i32), Signal::SIGKILL);
    let _ = top.kill();
    let _ = top.wait();
    let msg = e.to_string();
    assert!(
        msg.contains("has child processes") && msg.contains("--tree"),
        "{msg}"
    );
}

/// A shell pipeline: a writer subshell faster than the reader, so that the
/// pipe between them holds lines in flight at the freeze. After the move
/// the reader's lines go on from the next number: the pipe is one again
/// between the two copies, with its bytes.
#[test]
fn a_pipeline_moves_with_the_bytes_in_its_pipe() {
    let _g = serial();
    let mut sh = sh_c(
        "i=0; while true; do echo $i; i=$((i+1)); sleep 0.01; done | while read x; do echo got=$x; sleep 0.05; done",
        Stdio::piped(),
    );
    let pid = sh.id() as i32;
    let mut guard = KillOnDrop(vec![pid]);
    let r0 = sh.stdout.take().expect("stdout");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let reader = |f: std::fs::File, into: std::sync::Arc<std::sync::Mutex<Vec<u64>>>| {
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(f).lines() {
                let Ok(l) = l else { break };
                if let Some(n) = l.strip_prefix("got=").and_then(|n| n.parse().ok()) {
                    into.lock().expect("lines").push(n);
                }
            }
        })
    };
    let old = reader(
        std::fs::File::from(std::os::fd::OwnedFd::from(r0)),
        lines.clone(),
    );
    let t0 = std::time::Instant::now();
    while lines.lock().expect("lines").len() < 20 {
        assert!(t0.elapsed() < T, "no output from the pipeline");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let frozen = freeze_tree(pid).expect("freeze the pipeline");
    guard.0.extend(frozen.pids());
    assert!(!frozen.meta().pipes.is_empty(), "the pipe is the tree's");
    let (tree, r) = copy(&frozen);
    guard.0.push(tree.holder);
    frozen.kill();
    let _ = sh.wait();
    old.join().expect("old reader");
    let before = lines.lock().expect("lines").clone();
    let last = *before.last().expect("lines before");
    let new = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let _r = reader(std::fs::File::from(r), new.clone());
    let t0 = std::time::Instant::now();
    while new.lock().expect("lines").len() < 30 {
        assert!(t0.elapsed() < T, "no output after the move");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let after = new.lock().expect("lines").clone();
    assert_eq!(
        after[0],
        last + 1,
        "the reader goes on: {before:?} then {after:?}"
    );
    for w in before.windows(2).chain(after.windows(2)) {
        assert_eq!(w[1], w[0] + 1, "before {before:?} after {after:?}");
    }
    // The writer ran ahead: what it had written and the reader had not
    // read was in the pipe, and came through it.
    let _ = kill(Pid::from_raw(tree.holder), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(tree.holder), None);
}

/// A datagram socket pair between the top and its kid (mktree
/// `--socketpair`: the kid sends a number with every line, the top reads
/// one every other line, so datagrams wait in the pair): after the move
/// the top relays the next number, none lost, none twice, and the pair
/// still joins the two copies.
#[test]
fn a_socket_pair_between_two_processes_moves_with_what_is_queued() {
    let _g = serial();
    let (mut top, out) = start_prog(
        &testprog("mktree"),
        &["--interval-ms", "10", "--socketpair"],
    );
    let (mut old, kid) = next_line(&out, "kid n=10 ");
    old.push(kid.clone());
    let top_pid = top.id() as i32;
    let mut guard = KillOnDrop(vec![top_pid, get(&kid, "pid") as i32]);
    let frozen = freeze_tree(top_pid).expect("freeze the tree");
    assert!(
        frozen.meta().sockets.len() == 2
            && frozen.meta().sockets[0].global == frozen.meta().sockets[1].global,
        "one pair, an end in each: {:?}",
        frozen.meta().sockets
    );
    let (tree, r) = copy(&frozen);
    guard.0.push(tree.holder);
    frozen.kill();
    let _ = top.wait();
    old.extend(out.drain(T).into_iter().filter_map(|l| match l {
        Line::Tree(s) => Some(s),
        _ => None,
    }));
    let relayed = |lines: &[String]| -> Vec<i64> {
        lines
            .iter()
            .filter(|l| l.starts_with("relay "))
            .map(|l| get(l, "kid"))
            .collect()
    };
    let before = relayed(&old);
    let sent = old.iter().filter(|l| l.starts_with("kid ")).count();
    assert!(
        (sent as i64) > *before.last().expect("relayed before") + 2,
        "datagrams were waiting at the freeze: {sent} sent, {before:?} relayed"
    );
    let out = Output::new(r);
    let mut after = Vec::new();
    while after.len() < 10 {
        let (_, l) = next_line(&out, "relay ");
        after.push(get(&l, "kid"));
    }
    let all: Vec<i64> = before.iter().chain(&after).copied().collect();
    for (i, n) in all.iter().enumerate() {
        assert_eq!(*n, i as i64, "relayed: {all:?}");
    }
    let _ = kill(Pid::from_raw(tree.holder), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(tree.holder), None);
}

/// A tree that forks all the time (a `sleep` every 10 ms): a child forked
/// between the tree's listing and its parent's freeze holds the tree's
/// pipes too, and is part of it, not "another process"; a `sleep` caught
/// between letting go of its memory and its zombie is a zombie, not
/// refused: sixty freezes in a row all work, and let the tree run on.
#[test]
fn a_tree_that_forks_all_the_time_is_frozen_every_time() {
    let _g = serial();
    let mut sh = sh_c(
        "i=0; while true; do echo $i; i=$((i+1)); sleep 0.01; done | while read x; do echo got=$x; done",
        Stdio::null(),
    );
    let pid = sh.id() as i32;
    let _guard = KillOnDrop(vec![pid]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    for i in 0..60 {
        let t = freeze_tree(pid).unwrap_or_else(|e| panic!("freeze {i}: {e}"));
        assert!(t.pids().len() >= 3, "{:?}", t.pids());
        t.resume();
        std::thread::sleep(std::time::Duration::from_millis(7));
    }
    drop(_guard);
    let _ = sh.wait();
}

/// The kid's third line from `out` (its second thread has written its
/// tid down by then): that thread's tid and what `pthread_kill(thread, 0)`
/// returned.
fn kid_thread(out: &Output) -> (i64, i64, String) {
    let mut k = String::new();
    for _ in 0..3 {
        k = next_line(out, "kid ").1;
    }
    (get(&k, "thread"), get(&k, "ping"), k)
}

/// A tree moved twice keeps its threads' ids as it keeps its pids: the
/// kid's second thread has the tid it had (`gettid`), and glibc's cached
/// tid of it still names it (`pthread_kill` finds it), after each move.
#[test]
fn a_tree_moved_twice_keeps_its_thread_ids() {
    let _g = serial();
    let (mut top, out) = start_prog(&testprog("mktree"), &["--thread", "--interval-ms", "20"]);
    let top_pid = top.id() as i32;
    let (tid, ping, k) = kid_thread(&out);
    let kid_pid = get(&k, "pid") as i32;
    assert!(tid > 0 && tid != i64::from(kid_pid) && ping == 0, "{k}");
    let mut guard = KillOnDrop(vec![top_pid, kid_pid]);

    let frozen = freeze_tree(top_pid).expect("freeze the tree");
    let (first, r) = copy(&frozen);
    guard.0.push(first.holder);
    frozen.kill();
    let _ = top.wait();
    let out = Output::new(r);
    let (t1, p1, k1) = kid_thread(&out);
    assert_eq!((t1, p1), (tid, 0), "after the first move: {k1}");

    // Again, from the copy's namespace into another.
    let frozen = freeze_tree(first.top()).expect("freeze the copy");
    let (second, r) = copy(&frozen);
    guard.0.push(second.holder);
    frozen.kill();
    let _ = waitpid(Pid::from_raw(first.holder), None);
    let out = Output::new(r);
    let (t2, p2, k2) = kid_thread(&out);
    assert_eq!((t2, p2), (tid, 0), "after the second move: {k2}");
    let _ = kill(Pid::from_raw(second.holder), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(second.holder), None);
}

/// Every process of a tree that cannot move is named in one refusal (two
/// subshells, each holding a pty master it opened), and the tree runs on.
#[test]
fn every_refused_process_of_a_tree_is_named_at_once() {
    use mknode::migrate::{Blocker, CaptureError, TreeError};
    let _g = serial();
    let mut sh = sh_c(
        "(exec 5<>/dev/ptmx; sleep 100) & (exec 6<>/dev/ptmx; sleep 100) & wait",
        Stdio::null(),
    );
    let pid = sh.id() as i32;
    let _guard = KillOnDrop(vec![pid]);
    let holds = |fd: u32| {
        mknode::migrate::tree_of(pid)
            .unwrap_or_default()
            .iter()
            .any(|p| std::fs::read_link(format!("/proc/{p}/fd/{fd}")).is_ok())
    };
    let t0 = std::time::Instant::now();
    while !(holds(5) && holds(6)) {
        assert!(t0.elapsed() < T, "the subshells never opened their ptys");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let e = freeze_tree(pid).expect_err("pty masters are not carried");
    let all = match &e {
        CaptureError::Tree {
            why: TreeError::Blocked(all),
            ..
        } => all.clone(),
        other => panic!("not every refusal at once: {other}"),
    };
    let fds: Vec<i32> = all
        .iter()
        .flat_map(|(_, b)| b.iter())
        .filter_map(|b| match b {
            Blocker::OpenFd { fd, target } if target == "/dev/ptmx" => Some(*fd),
            _ => None,
        })
        .collect();
    assert!(fds.contains(&5) && fds.contains(&6), "{e}");
    let text = e.to_string();
    assert_eq!(
        text.matches("(descriptors are carried when").count(),
        1,
        "the rule once: {text}"
    );
    // None of it was left stopped.
    for p in mknode::migrate::tree_of(pid).expect("the tree") {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).expect("stat");
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        assert!(matches!(state, Some("S" | "R")), "process {p}: {stat}");
    }
    drop(_guard);
    let _ = sh.wait();
}

/// A tree restored lazily: the image carries each live process's state
/// and only the pages around its registers; each process runs on the copy
/// and its pager brings the rest (from a page server each, over in-process
/// links here), fetched and pushed after it ran.
#[test]
fn a_tree_restored_lazily_gets_its_pages_after_it_runs() {
    use mknode::migrate::PushPolicy;
    let _g = serial();
    let (mut top, out) = start_prog(&testprog("mktree"), &["--interval-ms", "20"]);
    let (_, first) = next_line(&out, "top n=3 ");
    let (top_pid, kid_pid) = (get(&first, "pid") as i32, get(&first, "kid") as i32);
    let mut guard = KillOnDrop(vec![top_pid, kid_pid]);
    let frozen = freeze_tree(top_pid).expect("freeze the tree");
    let (tree, pagers, r, _origins) = lazy_copy(&frozen, PushPolicy::default());
    assert_eq!(
        pagers.len(),
        2,
        "the top and the kid (a zombie has no pages)"
    );
    guard.0.push(tree.holder);
    let copy = Output::new(r);
    let (_, t) = next_line(&copy, "top ");
    let (_, k) = next_line(&copy, "kid ");
    assert_eq!(get(&t, "pid"), i64::from(top_pid), "{t}");
    assert_eq!(get(&k, "ppid"), i64::from(top_pid), "{k}");
    for p in pagers {
        let st = p.wait().expect("every page in");
        assert!(
            st.eager_pages < st.total_pages && st.fetched_pages + st.pushed_pages > 0,
            "{st:?}"
        );
    }
    frozen.kill();
    let _ = top.wait();
    let _ = kill(Pid::from_raw(tree.holder), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(tree.holder), None);
}

/// A shell restored lazily forks a subshell that reads a 140 KB variable
/// and a `sleep` every few milliseconds while its pages are still coming
/// (pushed slowly here): each child lacks what
/// its parent lacked at the fork, and the pager fills the child from the
/// origin before closing the child's userfaultfd. Without that, a child
/// read zeros where pages had not arrived and died of SIGSEGV (seen as
/// `sleep_failed=139` from a busybox loop moved lazily between guests).
#[test]
fn a_lazily_restored_shell_forks_children_that_have_its_memory() {
    use mknode::migrate::PushPolicy;
    use std::io::BufRead;
    let _g = serial();
    // busybox's shell forks its children (dash's vforks: no new memory).
    let mut sh = Command::new("/bin/busybox")
        .args([
            "sh",
            "-c",
            "x=$(seq 1 30000 | tr -d '\\n'); i=0; while true; do (case \"$x\" in 1234*2999930000) exit 0;; esac; exit 3) || echo bad_memory=$?; sleep 0.01 || echo sleep_failed=$?; i=$((i+1)); echo n=$i; done",
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn busybox sh");
    let pid = sh.id() as i32;
    let _guard = KillOnDrop(vec![pid]);
    let lines = |r: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(r).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        rx
    };
    let before = lines(Box::new(sh.stdout.take().expect("stdout")));
    for _ in 0..5 {
        before.recv_timeout(T).expect("the loop's lines");
    }
    let frozen = freeze_tree(pid).expect("freeze the shell");
    // Slow pushes: the copy forks many children before its pages are in.
    let slow = PushPolicy {
        enabled: true,
        batch_pages: 4,
        pause: std::time::Duration::from_millis(2),
    };
    let (tree, pagers, r, _origins) = lazy_copy(&frozen, slow);
    let after = lines(Box::new(std::fs::File::from(r)));
    let mut seen = Vec::new();
    while seen.len() < 60 {
        seen.push(after.recv_timeout(T).expect("the copy's lines"));
    }
    let stats: Vec<_> = pagers
        .into_iter()
        .map(|p| p.wait().expect("every page in"))
        .collect();
    frozen.kill();
    let _ = sh.wait();
    let _ = kill(Pid::from_raw(tree.holder), Signal::SIGKILL);
    let _ = waitpid(Pid::from_raw(tree.holder), None);
    assert!(
        !seen
            .iter()
            .any(|l| l.starts_with("sleep_failed") || l.starts_with("bad_memory")),
        "a child of the copy failed: {seen:?}"
    );
    assert!(
        stats.iter().any(|s| s.child_pages > 0),
        "no child was filled (did the copy fork before its pages were in?): {stats:?}"
    );
}
