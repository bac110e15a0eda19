//! The CLI's side of the control socket: connect to the daemon (starting it
//! when a command needs one and none runs), send a request, read replies.

use std::io;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::control::{self, Frame, FrameError, Reply, Request, Side};
use super::paths::RunDir;

/// Talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no mkctl daemon runs for {}", .0.display())]
    NotRunning(std::path::PathBuf),
    #[error("cannot start the daemon (its log: {})", .log.display())]
    Start {
        log: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon did not come up within {0:?} (see {1})")]
    StartTimeout(Duration, String),
    #[error("control connection")]
    Frame(#[from] FrameError),
    #[error("control connection")]
    Io(#[from] io::Error),
}

/// A connection to the daemon.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    run: RunDir,
}

/// Whether a failed exchange means the daemon closed the connection with
/// our request unread (`ECONNRESET`, or `EPIPE` when it was gone before
/// we wrote).
fn never_read(e: &ClientError) -> bool {
    let io = match e {
        ClientError::Io(e) | ClientError::Frame(FrameError::Io(e)) => e,
        _ => return false,
    };
    matches!(
        io.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

impl Client {
    /// Connects to a running daemon.
    pub fn connect(run: &RunDir) -> Result<Client, ClientError> {
        match UnixStream::connect(run.socket()) {
            Ok(stream) => Ok(Client {
                stream,
                run: run.clone(),
            }),
            Err(_) => Err(ClientError::NotRunning(run.path().to_path_buf())),
        }
    }

    /// Connects to a running daemon or, when none runs but the last one
    /// left instances running (it was killed or crashed), starts one, which
    /// adopts them.
    pub fn connect_or_adopt(run: &RunDir, progress: impl Fn(&str)) -> Result<Client, ClientError> {
        match Client::connect(run) {
            Err(ClientError::NotRunning(_))
                if super::saved::Saved::load(&run.state())
                    .ok()
                    .flatten()
                    .is_some_and(|s| s.has_processes()) =>
            {
                progress("no daemon runs, but the last one left instances running: starting one to adopt them");
                Client::connect_or_start(run, progress)
            }
            other => other,
        }
    }

    /// Connects, starting the daemon first when none runs. `progress` is
    /// told when a daemon is being started.
    pub fn connect_or_start(run: &RunDir, progress: impl Fn(&str)) -> Result<Client, ClientError> {
        if let Ok(mut c) = Client::connect(run) {
            // A daemon started by another mkctl build (the binary was
            // rebuilt) would serve old code: replace it when it runs
            // nothing, otherwise say so.
            let status = c.call(&Request::Status, |_, _| {});
            let Ok(Reply::Status { status }) = status else {
                return Client::connect(run);
            };
            if status.build == super::control::build_id() {
                return Client::connect(run);
            }
            let busy = status
                .instances
                .iter()
                .any(|i| matches!(i.state.as_str(), "booting" | "ready" | "stopping"));
            if busy {
                progress(&format!(
                    "warning: the daemon (pid {}) runs another mkctl build; `mkctl daemon restart` to use this one (the instances run on)",
                    status.pid
                ));
                return Client::connect(run);
            }
            progress("replacing the daemon, which runs another mkctl build");
            let _ = Client::connect(run).and_then(|mut c| c.call(&Request::Shutdown, |_, _| {}));
            let deadline = Instant::now() + Duration::from_secs(10);
            while UnixStream::connect(run.socket()).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::fs::create_dir_all(run.path()).map_err(|source| ClientError::Start {
            log: run.log(),
            source,
        })?;
        // A socket left by a daemon that died would refuse connections.
        let _ = std::fs::remove_file(run.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.log())
            .map_err(|source| ClientError::Start {
                log: run.log(),
                source,
            })?;
        let exe = std::env::current_exe().map_err(|source| ClientError::Start {
            log: run.log(),
            source,
        })?;
        progress(&format!(
            "starting the mkctl daemon in {}",
            run.path().display()
        ));
        let mut cmd = Command::new(exe);
        cmd.args(["daemon", "run"])
            .env("MKCTL_RUN_DIR", run.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own session: the daemon outlives this command and its
            // terminal, and a Ctrl-C here does not reach it.
            .process_group(0);
        // Nothing else this command inherited goes with it: a descriptor a
        // script's shell or CI runner leaked to us (a pipe it waits on, say)
        // would be held for the daemon's whole life.
        // SAFETY: runs in the forked child before exec; close_range is a
        // plain system call (async-signal-safe), allocates nothing and
        // takes no lock. Marking instead of closing keeps std's own
        // exec-error pipe (already close-on-exec) working.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                let r = libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|source| ClientError::Start {
            log: run.log(),
            source,
        })?;
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(c) = Client::connect(run) {
                return Ok(c);
            }
            if Instant::now() > deadline {
                return Err(ClientError::StartTimeout(
                    timeout,
                    run.log().display().to_string(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn send(&mut self, r: &Request) -> Result<(), ClientError> {
        control::send_request(&mut self.stream, r)?;
        Ok(())
    }

    pub fn send_wire(&mut self, m: &mknode::wire::Msg) -> Result<(), ClientError> {
        control::send_wire(&mut self.stream, m)?;
        Ok(())
    }

    pub fn read(&mut self) -> Result<Frame, ClientError> {
        Ok(control::read_frame(&mut self.stream, Side::Client)?)
    }

    /// Sends a request and returns the first reply that is not progress,
    /// handing progress lines to `progress`.
    pub fn call(
        &mut self,
        r: &Request,
        progress: impl Fn(&str, &str),
    ) -> Result<Reply, ClientError> {
        self.call_watching(r, progress, |_| {})
    }

    /// [`Client::call`], with the bytes a long transfer has carried so far
    /// told to `transfer` as they come.
    pub fn call_watching(
        &mut self,
        r: &Request,
        progress: impl Fn(&str, &str),
        mut transfer: impl FnMut(u64),
    ) -> Result<Reply, ClientError> {
        let mut frame = self.request(r, &|m| progress("mkctl", m))?;
        loop {
            match frame {
                Frame::Reply(Reply::Progress { instance, message }) => {
                    progress(&instance, &message)
                }
                Frame::Reply(Reply::Transfer { bytes }) => transfer(bytes),
                Frame::Reply(reply) => return Ok(reply),
                Frame::Request(_) | Frame::Wire(_) => {}
            }
            frame = self.read()?;
        }
    }

    /// Sends a request and reads the first frame of its answer.
    ///
    /// A daemon killed just as we connected (its listening socket still
    /// open while it exits) resets the connection. A reset before any
    /// answer means the daemon never read the whole request: the kernel
    /// reports a reset only to a peer whose bytes were left unread, or
    /// whose connection was never accepted. The request did nothing, so it
    /// goes, once the old socket is gone, to the daemon that replaces the
    /// dead one (started to adopt its instances, as any command would).
    /// `progress` is told when that happens.
    pub fn request(&mut self, r: &Request, progress: &dyn Fn(&str)) -> Result<Frame, ClientError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut told = false;
        loop {
            match self.send(r).and_then(|()| self.read()) {
                Err(e) if never_read(&e) && Instant::now() < deadline => {
                    if !told {
                        progress("the daemon ended before it read this request; asking again");
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    *self = Client::connect_or_adopt(&self.run.clone(), progress)?;
                }
                other => return other,
            }
        }
    }

    /// A second handle on the same connection (one thread writes stdin
    /// while another reads output).
    pub fn try_clone(&self) -> Result<Client, ClientError> {
        Ok(Client {
            stream: self.stream.try_clone()?,
            run: self.run.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::{Arc, Mutex};

    use super::*;

    fn run_dir() -> (tempfile::TempDir, RunDir) {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir(dir.path().to_path_buf());
        (dir, run)
    }

    /// A daemon killed while our connection waited in its listen queue
    /// (what `kill -9` and an immediate command do): the request goes to
    /// the daemon that listens next, and the user is told.
    #[test]
    fn a_request_a_dying_daemon_never_read_goes_to_the_next_one() {
        let (_dir, run) = run_dir();
        let dying = UnixListener::bind(run.socket()).unwrap();
        let mut c = Client::connect(&run).unwrap();
        let path = run.socket();
        let next = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            // The next daemon listens before the dying one's socket closes.
            let tmp = path.with_extension("next");
            let l = UnixListener::bind(&tmp).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            drop(dying);
            let (mut s, _) = l.accept().unwrap();
            let Frame::Request(r) = control::read_frame(&mut s, Side::Daemon).unwrap() else {
                panic!("not a request");
            };
            control::send_reply(
                &mut s,
                &Reply::Ok {
                    message: format!("{r:?}"),
                },
            )
            .unwrap();
        });
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        let frame = c
            .request(&Request::Status, &move |m| {
                t.lock().unwrap().push(m.to_string())
            })
            .unwrap();
        next.join().unwrap();
        let Frame::Reply(Reply::Ok { message }) = frame else {
            panic!("{frame:?}");
        };
        assert_eq!(message, "Status");
        assert_eq!(told.lock().unwrap().len(), 1, "{told:?}");
    }

    /// A daemon that read the request and then ended may have acted on it:
    /// that is an error, never a second request.
    #[test]
    fn a_request_read_by_a_daemon_that_ended_is_not_sent_again() {
        let (_dir, run) = run_dir();
        let l = UnixListener::bind(run.socket()).unwrap();
        let mut c = Client::connect(&run).unwrap();
        let path = run.socket();
        let daemon = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            control::read_frame(&mut s, Side::Daemon).unwrap();
            drop(s);
            drop(l);
            // Were the request sent again, it would find this one.
            std::fs::remove_file(&path).unwrap();
            let again = UnixListener::bind(&path).unwrap();
            again.set_nonblocking(true).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            again.accept().is_ok()
        });
        let r = c.request(&Request::Status, &|_| {});
        assert!(
            matches!(r, Err(ClientError::Frame(FrameError::Closed))),
            "{r:?}"
        );
        assert!(!daemon.join().unwrap(), "the request was sent again");
    }
}
