//! Why a request to the daemon failed: one variant per way it can fail,
//! each with the values a person needs to act and the cause kept as a
//! `source`, and [`RequestError::exit_code`], the code the CLI ends with.
//! The server turns an error into its reply in one place
//! ([`RequestError::reply`]); the message there is the whole chain.

use std::path::PathBuf;
use std::time::Duration;

use mknode::agent::{AgentError, MoveError};

use super::control::Reply;
use super::window::WindowError;
use crate::exit::{EXIT_FAIL, EXIT_USAGE};
use crate::initramfs::InitramfsError;
use crate::qemu::MachineError;
use crate::topology::LoadError;

/// A request the daemon could not carry out.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    // -- what the user asked cannot be (exit 2)
    #[error("no instance \"{name}\" in this daemon (it has: {known})")]
    UnknownInstance { name: String, known: String },
    #[error("no instance \"{name}\" (known: host, {known})")]
    UnknownKernel { name: String, known: String },
    #[error("{} has no instance \"{name}\"; it has: {known}", config.display())]
    NotInTopology {
        config: PathBuf,
        name: String,
        known: String,
    },
    #[error("{what} needs two different kernels")]
    SameKernel { what: &'static str },
    #[error("the process is already on {kernel}")]
    AlreadyThere { kernel: String },
    #[error("{what} on the host: {instead}")]
    NotOnHost {
        what: &'static str,
        instead: &'static str,
    },

    // -- the request failed (exit 1)
    #[error("{}", .0.render())]
    Topology(LoadError),
    #[error("instance \"{name}\" uses backend = \"kexec\", which this daemon does not boot; use `mkctl boot` on a multikernel host, or set backend = \"qemu\"")]
    KexecInstance { name: String },
    #[error("this daemon runs {}; stop its instances first (mkctl stop --all)", config.display())]
    OtherTopology { config: PathBuf },
    #[error("{}; wait for it, or stop it first", busy.join(", "))]
    Busy { busy: Vec<String> },
    #[error("{0}")]
    MissingImages(String),
    #[error("the running window has endpoints 0-{}, but the topology uses id {need}; stop the daemon (mkctl daemon stop) and boot again", .endpoints - 1)]
    WindowTooSmall { endpoints: u16, need: u32 },
    #[error("instance ids above 65534")]
    TooManyEndpoints,
    #[error("{config} has no [window] base: kexec instances share a window in the pool, at an address every kernel maps", config = .0.display())]
    NoKexecWindow(PathBuf),
    #[error("instance \"{0}\" uses backend = \"qemu\"; only kexec instances are booted through the multikernel interface")]
    NotKexec(String),
    #[error("this daemon's window is {running}, and this boot needs {wanted}; one daemon hosts one window (stop its instances and the daemon first: mkctl daemon stop)")]
    OtherWindow { running: String, wanted: String },
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error("cannot build the guests' initramfs")]
    Initramfs(#[from] InitramfsError),
    /// Some instances did not come up: each with why, one per line.
    #[error("{}", .0.iter().map(|(n, e)| format!("{n}: {}", crate::error_chain(e))).collect::<Vec<_>>().join("\n"))]
    Boot(Vec<(String, InstanceError)>),
    #[error("instance \"{name}\" {}{}", state_words(.state), .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    NotReady {
        name: String,
        state: &'static str,
        reason: Option<String>,
    },
    #[error("no instance was booted yet")]
    NoWindow,
    #[error("the daemon is stopping")]
    Stopping,
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("the DSM")]
    Dsm(#[from] mknode::dsm::DsmError),
    #[error("no DSM region {0} (mkctl dsm ls lists them)")]
    NoRegion(String),
    #[error("region {name} is still mapped on {places}; unmap it there first")]
    RegionMapped { name: String, places: String },
    /// A move that failed on the kernel that was to send the process.
    #[error("on {on}")]
    Move {
        on: String,
        #[source]
        source: Box<MoveError>,
    },
    /// What the agent of another kernel answered instead of doing it.
    #[error("on {on}: {message}")]
    Remote { on: String, message: String },
    #[error("no answer from {on} within {:.0} s", .timeout.as_secs_f64())]
    NoAnswer { on: String, timeout: Duration },
    #[error("the client went away")]
    ClientGone,
}

fn state_words(state: &str) -> String {
    match state {
        "failed" => "has failed".into(),
        s => format!("is {s}"),
    }
}

impl RequestError {
    /// The exit code the CLI ends with: 2 when the request itself cannot
    /// be (a name that does not exist, a kernel twice), 1 when it failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            RequestError::UnknownInstance { .. }
            | RequestError::UnknownKernel { .. }
            | RequestError::NotInTopology { .. }
            | RequestError::SameKernel { .. }
            | RequestError::AlreadyThere { .. }
            | RequestError::NoRegion(_)
            | RequestError::NotOnHost { .. } => EXIT_USAGE,
            _ => EXIT_FAIL,
        }
    }

    /// The reply that carries this error to the CLI.
    pub fn reply(&self) -> Reply {
        Reply::Error {
            message: crate::error_chain(self),
            code: self.exit_code(),
        }
    }
}

/// Why one instance did not come up.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("id {0} out of range")]
    Id(u32),
    #[error("cannot create {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reset its channel")]
    Channel(#[source] WindowError),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("cannot start {}", qemu.display())]
    Spawn {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU or the kernel stopped; `evidence` is what QEMU said and the
    /// console's last lines.
    #[error("{reason}; {evidence}")]
    Died { reason: String, evidence: String },
    #[error("not ready after {timeout:.0?}; QEMU was killed; {evidence}")]
    Timeout { timeout: Duration, evidence: String },
    /// A kexec instance's kernel runs, but its agent did not answer.
    #[error("its kernel runs, but no agent answered over the window within {timeout:.0?} ({seen}); its console is the kernel's own serial port")]
    NoAgent {
        timeout: Duration,
        seen: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_exit_2_and_failures_exit_1() {
        let usage = RequestError::SameKernel { what: "ping" };
        assert_eq!(usage.exit_code(), 2);
        assert_eq!(usage.to_string(), "ping needs two different kernels");
        let failed = RequestError::NotReady {
            name: "alpha".into(),
            state: "failed",
            reason: Some("qemu exited unexpectedly".into()),
        };
        assert_eq!(failed.exit_code(), 1);
        assert_eq!(
            failed.to_string(),
            "instance \"alpha\" has failed: qemu exited unexpectedly"
        );
        let booting = RequestError::NotReady {
            name: "beta".into(),
            state: "booting",
            reason: None,
        };
        assert_eq!(booting.to_string(), "instance \"beta\" is booting");
    }

    #[test]
    fn the_reply_carries_the_whole_chain_and_the_code() {
        let e = RequestError::Boot(vec![
            ("alpha".into(), InstanceError::Id(70_000)),
            (
                "beta".into(),
                InstanceError::Spawn {
                    qemu: "qemu-system-x86_64".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                },
            ),
        ]);
        match e.reply() {
            Reply::Error { message, code } => {
                assert_eq!(code, 1);
                assert_eq!(
                    message,
                    "alpha: id 70000 out of range\nbeta: cannot start qemu-system-x86_64: entity not found"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
