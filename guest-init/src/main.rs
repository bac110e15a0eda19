//! The PID 1 sequence: mounts, command line, hostname, window, then the
//! selftest or the idle loop, and power-off. See the library docs.

use std::path::Path;

use guest_init::power::{fatal, power_off};
use guest_init::window::{Window, WindowError};
use guest_init::{agent, console, doorbell, mounts, power, probe, say, selftest, supervise};
use mknode::bootargs::BootArgs;

fn main() {
    if std::process::id() != 1 {
        eprintln!(
            "guest-init: must run as PID 1 of a guest kernel (it mounts filesystems \
             and powers the machine off); refusing to run as pid {}",
            std::process::id()
        );
        std::process::exit(2);
    }
    power::install_panic_hook();
    console::install_log();
    if let Err(e) = supervise::block_signals() {
        say!("cannot block signals: {e}");
    }
    say!("starting (v{})", env!("CARGO_PKG_VERSION"));

    match mounts::mount_all() {
        Ok(soft) => {
            for e in soft {
                say!("warning: {}", power::error_chain(&e));
            }
        }
        Err(e) => fatal(&e),
    }
    console::ensure_stdio();

    // Before any agent runs: a migration asks the kernel about sockets.
    if let Err(e) = doorbell::load_modules(Path::new("/"), &doorbell::MIGRATION_MODULES) {
        say!(
            "warning: {}; socket pairs will not be carried",
            power::error_chain(&e)
        );
    }

    let raw = std::fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| fatal(&e));
    let args = BootArgs::parse(&raw).unwrap_or_else(|e| fatal(&e));
    let id = args.id.map_or("none".into(), |i| i.to_string());
    let name = args.name.as_deref().unwrap_or("(unnamed)");
    say!("instance {name}, id {id}");
    if let Some(n) = &args.name {
        if let Err(e) = nix::unistd::sethostname(n) {
            say!("warning: cannot set hostname {n}: {e}");
        }
    }

    let mut window = match Window::discover(&args, Path::new("/")) {
        Ok(w) => w,
        Err(e @ WindowError::NotFound(_)) => {
            say!("{e}; powering off");
            power_off();
        }
        Err(e) => fatal(&e),
    };
    say!(
        "window {} mapped, {} MiB",
        window.source(),
        window.len() >> 20
    );

    if args.selftest {
        let facts = probe::gather(Path::new("/")).unwrap_or_else(|e| fatal(&e));
        let record = selftest::Record::new(args.id, args.name.as_deref(), &facts, &window);
        if let Err(e) = selftest::write(&mut window, &record) {
            fatal(&e);
        }
        say!(
            "selftest: record written (release {}, {} cpus, {} nodes, MemTotal {} kB)",
            facts.release,
            facts.cpu_count,
            facts.nodes.len(),
            facts.mem_total_kb
        );
        power_off();
    }

    // The agent maps the window through shmem-ring; guest-init's own
    // mapping only found and enabled it.
    let (file, offset) = agent::window_file(window.source(), Path::new("/"));
    let len = window.len() as u64;
    drop(window);
    if let Err(e) = agent::run(args.id, &args.peers, &file, offset, len) {
        say!("agent: {}", power::error_chain(&e));
    }
    power_off();
}
