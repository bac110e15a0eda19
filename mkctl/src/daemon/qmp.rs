//! A minimal QMP client: QEMU's JSON control protocol over a Unix socket.
//!
//! We need a handful of commands (`query-cpus-fast` for vCPU thread ids,
//! `query-status`, `system_powerdown`, `quit`), so this is a few lines of
//! `serde_json` rather than a QMP crate. Asynchronous events that arrive
//! between a command and its answer are skipped (kept for inspection).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP i/o")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not JSON: {0:?}")]
    Json(String),
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

/// A connected QMP session, in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen so far (e.g. `SHUTDOWN`, `POWERDOWN`).
    pub events: Vec<Value>,
}

/// One vCPU as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuThread {
    pub cpu_index: u32,
    pub thread_id: i32,
}

impl Qmp {
    /// Connects, waiting up to `timeout` for the socket to appear (QEMU
    /// creates it shortly after it starts), reads the greeting and enters
    /// command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        Self::connect_within(path, timeout, Duration::from_secs(10))
    }

    /// [`Qmp::connect`], giving up on every answer (the greeting too) that
    /// takes longer than `answer`: a frozen QEMU accepts the connection and
    /// says nothing.
    pub fn connect_within(
        path: &Path,
        timeout: Duration,
        answer: Duration,
    ) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        };
        stream.set_read_timeout(Some(answer))?;
        let writer = stream.try_clone()?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = q.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Json(greeting.to_string()));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_value(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(&line).map_err(|_| QmpError::Json(line.trim().to_string()))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let v = self.read_value()?;
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("?").to_string(),
                    desc: e["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(QmpError::Json(v.to_string()));
        }
    }

    /// The host thread of each vCPU, for pinning.
    pub fn vcpu_threads(&mut self) -> Result<Vec<VcpuThread>, QmpError> {
        let v = self.execute("query-cpus-fast", None)?;
        let list = v.as_array().ok_or_else(|| QmpError::Json(v.to_string()))?;
        list.iter()
            .map(|c| {
                let idx = c["cpu-index"].as_u64();
                let tid = c["thread-id"].as_i64();
                match (idx, tid) {
                    (Some(i), Some(t)) => Ok(VcpuThread {
                        cpu_index: u32::try_from(i).map_err(|_| QmpError::Json(c.to_string()))?,
                        thread_id: i32::try_from(t).map_err(|_| QmpError::Json(c.to_string()))?,
                    }),
                    _ => Err(QmpError::Json(c.to_string())),
                }
            })
            .collect()
    }

    /// `running`, `paused`, `shutdown`, ... as QEMU names it.
    pub fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None)?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// Asks QEMU to exit now. The connection closes as it does, which is
    /// the expected answer here.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }
}
