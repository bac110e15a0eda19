//! The `mkctl` command line: argument definitions (clap derive) and the
//! dispatch to the library. Each subcommand maps its outcome to the exit
//! codes documented in `--help`: 0 success, 1 the request failed or the
//! topology is invalid, 2 usage error (bad arguments, unreadable file).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::topology::{self, LoadError, Topology};

mod dsm;
mod image;
mod kexec;
mod live;
mod progress;

pub use crate::exit::{EXIT_FAIL, EXIT_OK, EXIT_USAGE};

const AFTER_HELP: &str = "\
Exit codes: 0 success; 1 invalid topology or failed operation; 2 usage error.

Environment:
  MKCTL_RUN_DIR     the daemon's run directory: socket, logs, window, one
                    directory per instance (default /run/mkctl)
  MKCTL_CACHE       what scripts/setup.sh fills: guest kernel, guest-init
                    (default: .cache of the checkout mkctl was built in,
                    else /var/cache/mkctl)
  MKCTL_KERNEL, MKCTL_GUEST_INIT
                    a guest kernel image / static guest-init other than the
                    cache's
  MKCTL_RAM_DIR     where guest RAM files go (default a directory in /dev/shm)
  MKCTL_QEMU        the QEMU binary (default qemu-system-x86_64)
  MKCTL_DOORBELL    off: guests get no doorbell port and every ring
                    receiver polls (default: the daemon relays the rings)
  MK_AGENT          for DSM programs: the agent's socket (see mk.h)

Start with `mkctl doctor` to see what this machine lacks for each backend,
`mkctl plan configs/demo.toml` to see how the demo topology splits the
machine, and `mkctl host` to see what this machine has.";

/// Split one machine into partitions and run a Linux kernel in each,
/// linked by message rings in shared memory.
#[derive(Debug, Parser)]
#[command(name = "mkctl", version, about, long_about = None, after_help = AFTER_HELP)]
pub struct Cli {
    /// Read /sys and /proc under this directory instead of / (for tests
    /// and for looking at another machine's captured tree).
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    pub sysroot: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what this machine has (CPUs, NUMA nodes, memory, APIC ids) and
    /// what is already reserved (memmap=, isolcpus=, crashkernel=, the
    /// multikernel pool), and whether the kexec backend can run here.
    Host {
        /// Print JSON for tools instead of the report.
        #[arg(long)]
        json: bool,
    },
    /// Check what each backend needs on this machine: one line per piece,
    /// ok, or missing and what to do about it.
    ///
    /// The QEMU backend: qemu-system-x86_64 (or MKCTL_QEMU) and its
    /// version; the guest kernel and static guest-init in the cache
    /// (MKCTL_CACHE; scripts/setup.sh fills it) and a static /bin/busybox;
    /// free space in /dev/shm (or MKCTL_RAM_DIR) for the guest RAM and the
    /// window of a topology (--topology, default configs/demo.toml of this
    /// checkout); no QEMU instances left running by a daemon that was
    /// killed (MKCTL_RUN_DIR). Moving processes to and from the host kernel:
    /// userfaultfd, the ptrace scope, time namespaces. The kexec backend:
    /// /sys/fs/multikernel and its interface generation, and the kernel
    /// options it needs (CONFIG_MULTIKERNEL, CONFIG_KEXEC_FILE). Everything
    /// is read under --sysroot.
    ///
    /// Exit codes: 0 when everything the QEMU backend and migration with
    /// the host need is there; what the kexec backend lacks is shown as
    /// "n/a" (not available here) and is not an error. 1 when something
    /// they need is MISSING (its line ends with what to do), or the
    /// --topology file is invalid. 2 usage error (bad arguments, an
    /// unreadable --topology file).
    Doctor {
        /// Print one JSON object: {"ok", "qemu_ready", "migration_ready",
        /// "kexec_ready", "checks": [{"name", "backend", "ok", "detail",
        /// "fix"}]}.
        #[arg(long)]
        json: bool,
        /// Size /dev/shm for this topology instead of configs/demo.toml.
        #[arg(long, value_name = "FILE")]
        topology: Option<PathBuf>,
    },
    /// Check a topology file against every rule; print all problems at once.
    ///
    /// Each problem names the file, line and column, the instances involved
    /// and what to change. Exit code 0 when valid (warnings allowed), 1 when
    /// invalid.
    Validate {
        /// The topology file (TOML).
        file: PathBuf,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show how a topology splits the machine: per instance and per NUMA
    /// node, with utilisation. Validates first; nothing is started.
    Plan {
        /// The topology file (TOML).
        file: PathBuf,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compile a topology to the device tree the multikernel interface takes.
    Dtb {
        /// The topology file (TOML).
        file: PathBuf,
        /// Write the blob here (default: standard output).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Only this instance (may be given several times).
        #[arg(long, value_name = "NAME")]
        instance: Vec<String>,
        /// Interface generation: `v1` (one tree with the instances) or
        /// `current` (the host baseline, or with --overlay one instance's
        /// create overlay).
        #[arg(long, value_enum, default_value_t = Abi::V1)]
        abi: Abi,
        /// With --abi current: the create overlay of this instance instead
        /// of the baseline.
        #[arg(long, value_name = "NAME")]
        overlay: Option<String>,
        /// Print the DTS source form instead of the blob.
        #[arg(long)]
        dts: bool,
    },
    /// Boot a topology's instances and wait until each is up: QEMU ones
    /// (through the daemon, started if needed) until their agent answers
    /// over the shared window; kexec ones through the multikernel interface
    /// until the kernel reports them active and then, when the topology
    /// has a `[window] base`, until their agent answers over that window,
    /// which the daemon formats in the pool through /dev/mem first.
    Boot {
        /// The topology file (TOML).
        file: PathBuf,
        /// Instances to boot (default: all of them).
        instances: Vec<String>,
        /// Boot every instance (the default when none is named).
        #[arg(long)]
        all: bool,
        /// Give up on an instance that is not ready after this many seconds.
        #[arg(long, default_value_t = 120, value_name = "SECS")]
        timeout: u64,
        /// kexec instances: print the exact sequence of files, blobs and
        /// syscalls against a model of the host, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show every instance: state, pid, CPUs, memory, uptime, heartbeat,
    /// restarts by its restart policy (of its limit).
    Status {
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Stream the daemon's events: instance state changes and migrations,
    /// one line each, as they happen, until the daemon stops.
    ///
    /// A line for people is `HH:MM:SS.mmm` (local time) and what happened:
    /// `alpha booting -> ready`, `alpha ready -> failed: <reason>`,
    /// `migrate pid 42 alpha -> beta (lazy): started`, `...: running as pid
    /// 7 after 3.1 ms of downtime`, `...: done, ...`, `...: failed: <why>`.
    ///
    /// With --json, one JSON object per line, each with "seq" (1, 2, ...
    /// for the daemon's lifetime), "time_ms" (Unix epoch milliseconds) and
    /// "event", one of: "state" {"instance", "from" (null when new), "to",
    /// "reason" (when failed), "restarts" (null without a restart
    /// policy)}; "migrate-start" {"pid", "from", "to", "mode"};
    /// "migrate-running" {"pid", "from", "to", "new_pid", "downtime_ns"};
    /// "migrate-end" {..., "new_pid", "downtime_ns", "total_ns",
    /// "image_bytes", "pages"}; "migrate-failed" {"pid", "from", "to", "error"};
    /// "thread-migrate-start" / "-end" / "-failed" (with "tid"; the end has
    /// "at", "shadow_pid", "downtime_ns"); "daemon-stopping"; "gap"
    /// {"missed", "first_seq"}: this reader fell behind (more than 256
    /// events waiting) and missed those events.
    ///
    /// Every line is flushed as it is written. Exit codes: 0 when the
    /// daemon stopped (the stream ends after its instances' stops) or
    /// stdout was closed; 1 when no daemon runs or it went away without
    /// saying so. Ctrl-C ends it at once.
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Print first the last N events the daemon kept (it keeps 1024),
        /// then the new ones.
        #[arg(long, value_name = "N", default_value_t = 0)]
        last: u32,
    },
    /// Run a command on an instance; its exit status becomes mkctl's.
    ///
    /// stdin is forwarded when it is not a terminal (or with -i); stdout
    /// and stderr come back byte-exact.
    Exec {
        /// Instance name or id.
        instance: String,
        /// Forward stdin even when it is a terminal.
        #[arg(short, long)]
        interactive: bool,
        /// Environment for the command (NAME=VALUE, repeatable).
        #[arg(short, long, value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Working directory on the instance.
        #[arg(long)]
        cwd: Option<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Describe an instance's kernel as its agent sees it (uname, CPUs,
    /// NUMA nodes, memory).
    Info {
        /// Instance name, id, or "host".
        instance: String,
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Round trips between two kernels over the shared window, measured by
    /// the first one's agent (either may be "host").
    Ping {
        /// The kernel that measures: an instance name or id, or `host`.
        from: String,
        /// The kernel that answers: an instance name or id, or `host`.
        to: String,
        /// Number of round trips (1 or more).
        #[arg(short, long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Send checksummed messages from one kernel to another and report how
    /// many arrived intact and in order (either may be "host").
    Traffic {
        /// The sending kernel: an instance name or id, or `host`.
        from: String,
        /// The receiving kernel: an instance name or id, or `host`.
        to: String,
        /// Number of messages (1 or more).
        #[arg(short, long, default_value_t = 10000, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
        /// Payload bytes per message.
        #[arg(short, long, default_value_t = 256)]
        size: u32,
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Stop instances: clean power-off through the agent, then QMP quit
    /// after --timeout, then a kill 3 s later; says which step ended each.
    ///
    /// The result names, per instance, the step that ended its QEMU:
    /// "powered off by its agent" (`agent` in --json), "QMP quit"
    /// (`qmp-quit`) or "killed" (`kill`), and how long it took; instances
    /// that were not running or had failed are named as such.
    Stop {
        /// Instances to stop.
        instances: Vec<String>,
        /// Stop every instance.
        #[arg(long)]
        all: bool,
        /// Seconds to wait for a clean power-off before QMP quit.
        #[arg(long, default_value_t = 15, value_name = "SECS")]
        timeout: u64,
        /// QEMU instances: skip the agent; QMP quit at once, a kill 3 s later
        /// (for a guest that hangs).
        #[arg(long, conflicts_with = "timeout")]
        force: bool,
        /// kexec instances: print the sequence, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON for tools: {"message", "instances": [{"name",
        /// "before", "step", "elapsed_ms"}]} (QEMU instances).
        #[arg(long)]
        json: bool,
    },
    /// Stop instances, then boot them again from the topology the daemon
    /// runs, and return when each one's agent answers (as boot does).
    ///
    /// The stop is `mkctl stop`'s (agent power-off, then QMP quit, then
    /// kill after --stop-timeout); a failed instance is booted again too,
    /// and its count of restarts by `restart = "on-failure"` starts again.
    /// Exit codes: 0 every instance is ready again; 1 one did not come
    /// back (the message says which and why) or no daemon runs; 2 a name
    /// the daemon does not have (nothing was stopped).
    Restart {
        /// Instances to restart (QEMU instances of the daemon).
        #[arg(required = true)]
        instances: Vec<String>,
        /// Seconds to wait for a clean power-off before QMP quit and kill.
        #[arg(long, default_value_t = 15, value_name = "SECS")]
        stop_timeout: u64,
        /// Give up on an instance that is not ready after this many seconds.
        #[arg(long, default_value_t = 120, value_name = "SECS")]
        timeout: u64,
    },
    /// Move a running process to another kernel: freeze it with ptrace,
    /// stream its image over the window, restore it there;
    /// its output keeps flowing where it went. A failure before the copy
    /// runs leaves the original running. Says on stderr as soon as the copy
    /// runs; returns when the move is over (lazy: once every page has moved
    /// and the original is gone) with the new pid, the downtime, the total
    /// time, the bytes and the pages moved; meanwhile, on a terminal, a
    /// line shows the bytes moved so far and the rate. Both
    /// kernels must run the same kernel build (the vDSO moves with it).
    ///
    /// `PID/TID` moves one thread of the process instead, while its other
    /// threads run on: the thread runs on the destination in a shadow
    /// process whose memory stays one with the process's through the DSM
    /// (the process's kernel stays every page's first home). `--from` is
    /// the process's kernel whether or not the thread is there now;
    /// `--to` that kernel brings the thread home. Mutexes, condition
    /// variables and joins work across kernels (futexes go to the
    /// process's kernel). See README, "Thread migration".
    Migrate {
        /// The process id on the origin kernel, or PID/TID for one thread.
        #[arg(value_name = "PID[/TID]", value_parser = parse_target)]
        target: (u32, Option<u32>),
        /// Origin: instance name, id, or "host" (where a pid you see with
        /// `ps` lives).
        #[arg(long, default_value = "host")]
        from: String,
        /// Destination: instance name, id, or "host".
        #[arg(long)]
        to: String,
        /// `lazy` (the default): resume after the stack and the pages
        /// around each thread's instruction pointer; the rest is fetched on
        /// demand (userfaultfd) and pushed in the background. `stop-copy`:
        /// every page first.
        #[arg(long, value_parser = ["stop-copy", "lazy"])]
        mode: Option<String>,
        /// Move the process with all its descendants (a shell script with
        /// its children, a pipeline's processes): their pids, parents,
        /// process groups, session and zombies, and the files they share.
        /// Stop-and-copy unless --mode lazy is given. Without it, a process
        /// with children is refused. See README, "Process trees".
        #[arg(long)]
        tree: bool,
        /// Move it even to a CPU that lacks extensions the program picked
        /// its code for when it started (refused otherwise, by name). You
        /// vouch that it uses none of them: e.g. it was started with
        /// GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL,... naming
        /// them, and no library of it reads CPUID itself. Register state
        /// the destination cannot hold still fails the move (the original
        /// runs on). See README, "Another CPU".
        #[arg(long)]
        any_cpu: bool,
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Save a process's image to a file (it keeps running unless --kill).
    Checkpoint {
        /// The process id on that kernel.
        pid: u32,
        /// The kernel it runs on: an instance name or id, or `host` (done
        /// by this mkctl itself, no daemon needed).
        #[arg(long)]
        on: String,
        /// The image file to write (through FILE.partial, renamed once
        /// whole), or `-` for stdout, e.g. to pipe it into `mkctl restore -`.
        #[arg(short, long)]
        output: PathBuf,
        /// Kill the process (SIGKILL; with --tree, every process of the
        /// tree) once the image is written, instead of letting it go on.
        #[arg(long)]
        kill: bool,
        /// Save the process with all its descendants (a tree image, which
        /// `restore` rebuilds in a pid namespace of its own). Without it, a
        /// process with children is refused.
        #[arg(long)]
        tree: bool,
        /// Print what was written as JSON: pid, on, image, bytes, tree,
        /// processes, killed, seconds, frozen_seconds (on the host only,
        /// else null). On stdout, or on stderr with `-o -`.
        #[arg(long)]
        json: bool,
    },
    /// Run a process from an image file on a kernel; like exec, its output
    /// comes back and its exit status becomes mkctl's.
    Restore {
        /// The image file (from `mkctl checkpoint`), or `-` to read it from
        /// stdin (a process restored on the host then gets /dev/null as its
        /// stdin).
        file: PathBuf,
        /// The kernel to run it on: an instance name or id, or `host` (the
        /// process then runs as this mkctl's child, with its stdio).
        #[arg(long)]
        on: String,
    },
    /// Threads running away from their process's kernel (thread migration):
    /// the process's kernel and pid, the thread, where it runs and its
    /// shadow process there.
    Threads {
        /// Print JSON for tools: [{"kernel", "pid", "tid", "at",
        /// "shadow_pid"}].
        #[arg(long)]
        json: bool,
    },
    /// Distributed shared memory: the regions programs map with
    /// mkdsm_map() (mk.h / libmk), across every kernel of the daemon.
    Dsm {
        #[command(subcommand)]
        action: DsmAction,
    },
    /// The multikernel memory and CPU pool (kexec backend).
    Pool {
        #[command(subcommand)]
        action: PoolAction,
    },
    /// Attach to an instance's serial console (Ctrl-] detaches), or print
    /// its log with --tail.
    Console {
        /// Instance name or id.
        instance: String,
        /// Print the last N lines of the console log and exit.
        #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "40")]
        tail: Option<usize>,
    },
    /// The daemon that owns the instances.
    Daemon {
        #[command(subcommand)]
        action: DaemonAction,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output.
    Man,
}

#[derive(Debug, Subcommand)]
pub enum PoolAction {
    /// Give the pool's CPUs and memory back to the host, so that boot ->
    /// stop -> release leaves the host as it was.
    Release {
        /// Also unmount /sys/fs/multikernel.
        #[arg(long)]
        unmount: bool,
        /// Print the sequence, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DsmAction {
    /// Every region: size, home kernel, and where it is mapped.
    Ls {
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// One region on every kernel: pages held read-only and exclusive,
    /// faults, fetches, invalidations, bytes, fault latency (mean, p99),
    /// failures and why.
    Show {
        /// The region's name.
        name: String,
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Remove a region (refused while a process maps it anywhere); its
    /// content is gone.
    Rm {
        /// The region's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DaemonAction {
    /// Is a daemon running, and what does it run?
    Status {
        /// Print JSON for tools.
        #[arg(long)]
        json: bool,
    },
    /// Stop every instance and the daemon.
    Stop,
    /// Replace the daemon with a new one (this mkctl build) that adopts the
    /// running instances: their QEMUs, window, agents and consoles carry
    /// on. Also starts a daemon when none runs, which adopts what a daemon
    /// that died (killed, crashed) left running; any command that needs
    /// the daemon does that by itself too.
    ///
    /// Lost in the change: requests under way (their clients see the
    /// connection close), DSM regions mapped by host processes, threads
    /// moved from host processes. Exit status: 0 when a daemon serves
    /// afterwards, 1 otherwise.
    Restart {
        /// Print the new daemon's status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon in the foreground (`boot` starts one in the
    /// background when needed).
    Run,
}

/// Generations of the Linux multikernel interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Abi {
    /// The LKML RFC v2 series: one DTB with /instances, written to
    /// /sys/fs/multikernel/device_tree.
    V1,
    /// multikernel/linux v7.0-mk2 and kerf 0.4: a host baseline
    /// (`linux,multikernel-host`) plus one create overlay per instance.
    Current,
}

/// Runs the command line and returns the process exit code.
pub fn run() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            if !e.use_stderr() {
                return EXIT_OK;
            }
            // A script that asked for JSON gets JSON, even for bad arguments.
            if json_in_args(std::env::args()) {
                print_json_error(&e.kind().to_string(), EXIT_USAGE);
            }
            return EXIT_USAGE;
        }
    };
    let json = cli.command.json();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => report(e.as_ref(), json),
    }
}

/// Prints a failed command's error (and its causes) on stderr — and, when
/// the command was asked for JSON, `{"error", "exit_code"}` on stdout — and
/// returns its exit code: the [`Failure`]'s own, or 1 for any other error.
fn report(e: &(dyn std::error::Error + 'static), json: bool) -> i32 {
    let code = e
        .downcast_ref::<Failure>()
        .map_or(EXIT_FAIL, Failure::exit_code);
    let message = crate::error_chain(e);
    eprintln!("mkctl: {message}");
    if json {
        print_json_error(&message, code);
    }
    code
}

fn print_json_error(message: &str, code: i32) {
    println!(
        "{}",
        serde_json::json!({ "error": message, "exit_code": code })
    );
}

/// Whether `--json` is among the arguments (before any `--`, after which
/// they belong to a command run elsewhere).
fn json_in_args(args: impl Iterator<Item = String>) -> bool {
    args.take_while(|a| a != "--").any(|a| a == "--json")
}

/// Why a command failed, with its exit code. A command returns it as its
/// error; [`run`] prints it once.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad arguments or input; nothing was done (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The command failed (exit 1).
    #[error("{0}")]
    Failed(String),
    /// The daemon's error reply: its message (the whole chain) and code.
    #[error("{message}")]
    Daemon { message: String, code: i32 },
    /// The daemon answered something this command does not expect.
    #[error("the daemon answered with an unexpected {0}")]
    Unexpected(&'static str),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Failed(_) | Failure::Unexpected(_) => EXIT_FAIL,
            Failure::Daemon { code, .. } => *code,
        }
    }
}

impl Command {
    /// Whether the command was asked for JSON output.
    fn json(&self) -> bool {
        match self {
            Command::Host { json }
            | Command::Doctor { json, .. }
            | Command::Validate { json, .. }
            | Command::Plan { json, .. }
            | Command::Status { json }
            | Command::Info { json, .. }
            | Command::Ping { json, .. }
            | Command::Traffic { json, .. }
            | Command::Stop { json, .. }
            | Command::Migrate { json, .. }
            | Command::Events { json, .. } => *json,
            Command::Daemon {
                action: DaemonAction::Status { json },
            }
            | Command::Dsm {
                action: DsmAction::Ls { json } | DsmAction::Show { json, .. },
            }
            | Command::Threads { json } => *json,
            _ => false,
        }
    }
}

pub(crate) type Res = Result<i32, Box<dyn std::error::Error>>;

/// `PID` or `PID/TID`.
fn parse_target(s: &str) -> Result<(u32, Option<u32>), String> {
    let num = |v: &str, what: &str| {
        v.parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{what} {v:?} is not a process id: give PID or PID/TID"))
    };
    match s.split_once('/') {
        None => Ok((num(s, "pid")?, None)),
        Some((p, t)) => Ok((num(p, "pid")?, Some(num(t, "thread id")?))),
    }
}

fn dispatch(cli: Cli) -> Res {
    match cli.command {
        Command::Host { json } => cmd_host(&cli.sysroot, json),
        Command::Doctor { json, topology } => cmd_doctor(&cli.sysroot, topology.as_deref(), json),
        Command::Validate { file, json } => cmd_validate(&cli.sysroot, &file, json),
        Command::Plan { file, json } => cmd_plan(&cli.sysroot, &file, json),
        Command::Dtb {
            file,
            output,
            instance,
            abi,
            overlay,
            dts,
        } => cmd_dtb(
            &cli.sysroot,
            &file,
            output.as_deref(),
            &instance,
            abi,
            overlay.as_deref(),
            dts,
        ),
        Command::Boot {
            file,
            instances,
            all,
            timeout,
            dry_run,
        } => live::boot(
            &cli.sysroot,
            &file,
            if all { &[] } else { &instances },
            timeout,
            dry_run,
        ),
        Command::Status { json } => live::status(&cli.sysroot, json),
        Command::Events { json, last } => live::events(json, last),
        Command::Exec {
            instance,
            interactive,
            env,
            cwd,
            command,
        } => live::exec(&live::named(&instance), interactive, &env, cwd, command),
        Command::Info { instance, json } => live::info(&live::named(&instance), json),
        Command::Ping {
            from,
            to,
            count,
            json,
        } => live::ping(&live::named(&from), &live::named(&to), count, json),
        Command::Traffic {
            from,
            to,
            count,
            size,
            json,
        } => live::traffic(&live::named(&from), &live::named(&to), count, size, json),
        Command::Stop {
            instances,
            all,
            timeout,
            force,
            dry_run,
            json,
        } => live::stop(
            &cli.sysroot,
            &instances,
            live::StopArgs {
                all,
                timeout,
                force,
                dry_run,
                json,
            },
        ),
        Command::Restart {
            instances,
            stop_timeout,
            timeout,
        } => live::restart(&cli.sysroot, &instances, stop_timeout, timeout),
        Command::Dsm { action } => dsm::run(action),
        Command::Threads { json } => live::threads(json),
        Command::Migrate {
            target: (pid, None),
            from,
            to,
            mode,
            tree,
            any_cpu,
            json,
        } => {
            let mode = match (mode.as_deref(), tree) {
                (Some("lazy"), true) => "lazy-tree",
                (_, true) => "tree",
                (m, false) => m.unwrap_or("lazy"),
            };
            live::migrate(
                pid,
                (&live::named(&from), &live::named(&to)),
                (mode, any_cpu),
                json,
            )
        }
        Command::Migrate {
            target: (_, Some(_)),
            tree: true,
            ..
        } => Err(Failure::Usage(
            "--tree moves a process with its descendants; PID/TID moves one thread: give one or the other".into(),
        )
        .into()),
        Command::Migrate {
            target: (_, Some(_)),
            any_cpu: true,
            ..
        } => Err(Failure::Usage(
            "--any-cpu is for a process's move: a thread's (PID/TID) runs the code of a process that stays, and is always checked".into(),
        )
        .into()),
        Command::Migrate {
            target: (pid, Some(tid)),
            from,
            to,
            json,
            ..
        } => live::migrate_thread(pid, tid, &live::named(&from), &live::named(&to), json),
        Command::Checkpoint {
            pid,
            on,
            output,
            kill,
            tree,
            json,
        } => image::checkpoint(
            pid,
            &live::named(&on),
            &output,
            image::Asked { kill, tree, json },
        ),
        Command::Restore { file, on } => image::restore(&file, &live::named(&on)),
        Command::Pool {
            action: PoolAction::Release { unmount, dry_run },
        } => kexec::release(&cli.sysroot, unmount, dry_run),
        Command::Console { instance, tail } => {
            live::console(&cli.sysroot, &live::named(&instance), tail)
        }
        Command::Daemon { action } => live::daemon(action),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "mkctl", &mut std::io::stdout());
            Ok(EXIT_OK)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(EXIT_OK)
        }
    }
}

/// The running machine as a topology `Machine`, for files without
/// `[machine]`; `None` (reported as such) when the host cannot be read.
fn discover_machine(sysroot: &Path) -> Option<crate::topology::Machine> {
    crate::host::HostInfo::discover(sysroot)
        .ok()
        .map(|h| crate::topology::Machine::from_host(&h))
}

fn cmd_host(sysroot: &Path, json: bool) -> Res {
    let info = crate::host::HostInfo::discover(sysroot)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", info.render());
    }
    Ok(EXIT_OK)
}

fn cmd_doctor(sysroot: &Path, file: Option<&Path>, json: bool) -> Res {
    use crate::doctor::{self, Sizing};
    let env = doctor::Env::from_process(sysroot);
    let machine = {
        let sysroot = sysroot.to_path_buf();
        move || discover_machine(&sysroot)
    };
    let (file, loaded) = match file {
        // A topology asked for must load: its errors are the command's.
        Some(f) => match topology::load(f, machine) {
            Ok(t) => (Some(f.to_path_buf()), Ok(t)),
            Err(e @ LoadError::Read { .. }) => {
                return Err(Failure::Usage(crate::error_chain(&e)).into())
            }
            Err(e) => return Err(Failure::Failed(e.render().trim_end().to_string()).into()),
        },
        None => match doctor::default_topology() {
            Some(f) => {
                let t = topology::load(&f, machine).map_err(|e| e.render().trim_end().to_string());
                (Some(f), t)
            }
            None => (None, Err(String::new())),
        },
    };
    let sizing = match (&file, &loaded) {
        (Some(file), Ok(topology)) => Sizing::Topology {
            file: file.clone(),
            topology,
        },
        (Some(file), Err(why)) => Sizing::Unusable {
            file: file.clone(),
            why: why.clone(),
        },
        (None, _) => Sizing::None,
    };
    let report = doctor::run(&env, &sizing);
    if json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.render());
    }
    Ok(report.exit_code())
}

/// Loads a topology; on failure prints the findings and returns the exit code.
fn load(sysroot: &Path, file: &Path) -> Result<Topology, i32> {
    let sysroot = sysroot.to_path_buf();
    topology::load(file, move || discover_machine(&sysroot)).map_err(|e| {
        eprint!("{}", e.render());
        match e {
            LoadError::Read { .. } => EXIT_USAGE,
            LoadError::Invalid { .. } => EXIT_FAIL,
        }
    })
}

fn print_warnings(t: &Topology) {
    if !t.warnings.is_empty() {
        eprint!("{}", topology::render_all(&t.source, &t.warnings));
    }
}

fn cmd_validate(sysroot: &Path, file: &Path, json: bool) -> Res {
    if json {
        let sysroot = sysroot.to_path_buf();
        let result = topology::load(file, move || discover_machine(&sysroot));
        let (code, source, diags) = match &result {
            Ok(t) => (EXIT_OK, &t.source, t.warnings.as_slice()),
            Err(LoadError::Invalid { file, diagnostics }) => {
                (EXIT_FAIL, file.as_ref(), diagnostics.as_slice())
            }
            Err(e @ LoadError::Read { .. }) => {
                eprintln!("mkctl: {}", crate::error_chain(e));
                return Ok(EXIT_USAGE);
            }
        };
        let out = serde_json::json!({
            "file": file.display().to_string(),
            "valid": code == EXIT_OK,
            "diagnostics": diags.iter().map(|d| source.to_json(d)).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(code);
    }
    match load(sysroot, file) {
        Ok(t) => {
            print_warnings(&t);
            println!(
                "{}: valid ({} instance(s), {} warning(s))",
                file.display(),
                t.instances.len(),
                t.warnings.len()
            );
            Ok(EXIT_OK)
        }
        Err(code) => Ok(code),
    }
}

fn cmd_plan(sysroot: &Path, file: &Path, json: bool) -> Res {
    let t = match load(sysroot, file) {
        Ok(t) => t,
        Err(code) => return Ok(code),
    };
    let plan = crate::plan::Plan::new(&t);
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", plan.render());
    }
    Ok(EXIT_OK)
}

fn cmd_dtb(
    sysroot: &Path,
    file: &Path,
    output: Option<&Path>,
    only: &[String],
    abi: Abi,
    overlay: Option<&str>,
    dts: bool,
) -> Res {
    let t = match load(sysroot, file) {
        Ok(t) => t,
        Err(code) => return Ok(code),
    };
    print_warnings(&t);
    for name in only {
        if t.instance(name).is_none() {
            let names: Vec<&str> = t.instances.iter().map(|i| i.name.as_str()).collect();
            eprintln!(
                "mkctl: {} has no instance \"{name}\"; it has: {}",
                file.display(),
                names.join(", ")
            );
            return Ok(EXIT_USAGE);
        }
    }
    let selected = t
        .instances
        .iter()
        .filter(|i| only.is_empty() || only.contains(&i.name));
    if overlay.is_some() && abi != Abi::Current {
        eprintln!("mkctl: --overlay needs --abi current (v1 has no overlays)");
        return Ok(EXIT_USAGE);
    }
    let tree = match abi {
        Abi::V1 => crate::dtb::v1_tree(&t, selected),
        Abi::Current => match kexec::current_tree(sysroot, &t, overlay) {
            Ok(tree) => tree,
            Err(code) => return Ok(code),
        },
    };
    let bytes = if dts {
        tree.to_dts().into_bytes()
    } else {
        tree.to_dtb()?
    };
    match output {
        Some(path) => std::fs::write(path, &bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        None => {
            if !dts && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                eprintln!(
                    "mkctl: refusing to write a binary blob to a terminal; use -o FILE or --dts"
                );
                return Ok(EXIT_USAGE);
            }
            std::io::stdout().write_all(&bytes)?;
        }
    }
    Ok(EXIT_OK)
}
