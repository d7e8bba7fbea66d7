//! One Python worker process: how it is spawned, the frames it speaks, and the
//! connection that routes its replies. A worker knows nothing about the pool.

mod connection;
mod error;
pub mod frame;
mod id;
mod outbox;
mod process;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

pub use connection::{Call, CallRequest, Connection, KillReason, Reply, ReplyMode, SlotGuard};
pub use error::WorkerError;
pub use frame::{
    BodyError, CallIds, CommandInfo, ContextBackend, Frame, FrameCodec, FrameError, ReadyInfo,
    RequestContext, PROTOCOL_VERSION,
};
pub use id::WorkerId;
/// Also the floor's (`pitboss bench load --floor`): it writes frames the way pitboss does.
pub use outbox::{Outbox, OutboxHandle, SendError};
pub use process::{resolve_python, rss_bytes, signal_group, WorkerCommand, WorkerSpec};

/// Lines of stderr kept per worker, so a worker that dies at startup can say why.
const STDERR_TAIL_LINES: usize = 20;
/// Longer stderr lines are cut; a worker cannot make us buffer without bound.
const STDERR_MAX_LINE: usize = 8 * 1024;

/// Why a worker did not reach `READY`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot spawn {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("no READY handshake within {0:?}{1}")]
    Timeout(Duration, StderrTail),
    #[error("worker exited before its READY handshake ({status}){tail}")]
    Exited { status: String, tail: StderrTail },
    #[error("bad handshake: {detail}{tail}")]
    Handshake {
        #[source]
        detail: BadHandshake,
        tail: StderrTail,
    },
}

/// A first frame from a new worker that is not the `READY` pitboss expects.
#[derive(Debug, thiserror::Error)]
pub enum BadHandshake {
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    /// A runtime of another protocol version: the Python package and the binary do
    /// not belong together (named here, before any request could fail on it).
    #[error(
        "the worker runtime in {} (pitboss_worker {}) speaks protocol {got}, this pitboss ({}) speaks {PROTOCOL_VERSION}: \
         the runtime and the binary must come from the same release; leave pool.runtime_dir and \
         $PITBOSS_RUNTIME_DIR unset to use the runtime embedded in pitboss, or install \
         pitboss-worker=={} (check PYTHONPATH / pool.python_path for another copy of pitboss_worker)",
        dir.display(),
        if runtime.is_empty() { "of unknown version" } else { runtime.as_str() },
        crate::runtime_files::VERSION,
        crate::runtime_files::VERSION
    )]
    Protocol {
        got: u32,
        runtime: String,
        dir: std::path::PathBuf,
    },
    #[error("READY says pid {said}, but the child is {child}")]
    Pid { said: u32, child: u32 },
    #[error("expected READY first, got {0:?}")]
    NotReady(frame::Kind),
}

/// The last lines a worker wrote to stderr, formatted for an error message.
#[derive(Debug, Default, Clone)]
pub struct StderrTail(pub Vec<String>);

impl std::fmt::Display for StderrTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        write!(f, "; its stderr ended with:\n  {}", self.0.join("\n  "))
    }
}

/// A spawned worker process, owned by its supervisor, which alone waits for it.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub pid: u32,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_task: Option<JoinHandle<()>>,
}

impl Process {
    /// SIGKILL to the worker's whole process group. Call it before reaping the child,
    /// while the pid still belongs to it.
    pub fn kill_group(&mut self) {
        signal_group(self.pid, libc::SIGKILL);
        let _ = self.child.start_kill();
    }

    pub fn signal_group(&self, signal: libc::c_int) {
        signal_group(self.pid, signal);
    }

    /// What the worker last wrote to stderr, waiting briefly for the pipe to drain.
    pub async fn stderr_tail(&mut self) -> StderrTail {
        if let Some(task) = self.stderr_task.take() {
            let _ = tokio::time::timeout(Duration::from_millis(500), task).await;
        }
        let tail = self.stderr_tail.lock().unwrap_or_else(|e| e.into_inner());
        StderrTail(tail.iter().cloned().collect())
    }
}

/// Spawns a worker and waits for its `READY` handshake.
pub async fn start(
    spec: &WorkerSpec,
    id: WorkerId,
    startup_timeout: Duration,
) -> Result<(Connection, Process), StartError> {
    let mut child = spec.spawn().map_err(|source| StartError::Spawn {
        program: spec.python.display().to_string(),
        source,
    })?;
    let pid = child.id().unwrap_or(0);
    let (stdin, stdout, stderr) =
        match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (Some(i), Some(o), Some(e)) => (i, o, e),
            _ => unreachable!("all three pipes are requested in WorkerSpec::spawn"),
        };
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    let stderr_task = tokio::spawn(forward_stderr(stderr, id, pid, stderr_tail.clone()));
    let mut process = Process {
        child,
        pid,
        stderr_tail,
        stderr_task: Some(stderr_task),
    };
    let mut reader = FramedRead::new(stdout, FrameCodec::new(spec.max_frame_bytes));

    let first = tokio::time::timeout(startup_timeout, reader.next()).await;
    let fail = |process: &mut Process| process.kill_group();
    let ready = match first {
        Err(_) => {
            fail(&mut process);
            let _ = process.child.wait().await;
            let tail = process.stderr_tail().await;
            return Err(StartError::Timeout(startup_timeout, tail));
        }
        Ok(None) => {
            let status = tokio::time::timeout(Duration::from_secs(5), process.child.wait()).await;
            let status = match status {
                Ok(Ok(s)) => describe_exit(&s),
                _ => {
                    fail(&mut process);
                    let _ = process.child.wait().await;
                    "closed its stdout".to_string()
                }
            };
            let tail = process.stderr_tail().await;
            return Err(StartError::Exited { status, tail });
        }
        // A runtime of another protocol version frames its READY with that version.
        Ok(Some(Err(frame::FrameError::Version(got)))) => Err(BadHandshake::Protocol {
            got: u32::from(got),
            runtime: String::new(),
            dir: spec.command.runtime_dir.clone(),
        }),
        Ok(Some(Err(e))) => Err(BadHandshake::from(e)),
        Ok(Some(Ok(Frame::Ready(info)))) => {
            if info.protocol != u32::from(PROTOCOL_VERSION) {
                Err(BadHandshake::Protocol {
                    got: info.protocol,
                    runtime: info.runtime.clone(),
                    dir: spec.command.runtime_dir.clone(),
                })
            } else if info.pid != pid {
                Err(BadHandshake::Pid {
                    said: info.pid,
                    child: pid,
                })
            } else {
                Ok(info)
            }
        }
        Ok(Some(Ok(other))) => Err(BadHandshake::NotReady(other.kind())),
    };
    match ready {
        Ok(info) => {
            tracing::info!(worker = %id, pid, commands = info.commands.len(), "worker ready");
            Ok((Connection::start(id, info, reader, stdin), process))
        }
        Err(detail) => {
            fail(&mut process);
            let _ = process.child.wait().await;
            let tail = process.stderr_tail().await;
            Err(StartError::Handshake { detail, tail })
        }
    }
}

/// Human-readable exit status: `exit status 3` or `killed by signal 9 (SIGKILL)`.
pub fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        format!("exit status {code}")
    } else if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGTERM => " (SIGTERM)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGINT => " (SIGINT)",
            _ => "",
        };
        format!("killed by signal {sig}{name}")
    } else {
        status.to_string()
    }
}

/// Logs each stderr line with the worker id and keeps the last few for error messages.
/// A structured line (an adapter's `logging` record, see [`AdapterRecord`]) is logged
/// at its level under the target `pitboss::adapter`, with its request and trace ids.
async fn forward_stderr(
    mut stderr: ChildStderr,
    id: WorkerId,
    pid: u32,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let emit = |line: &[u8]| {
        let text = match AdapterRecord::parse(line) {
            Some(record) => {
                record.log(id, pid);
                format!("{}: {}", record.logger, record.message)
            }
            None => {
                let text = String::from_utf8_lossy(line).trim_end().to_string();
                tracing::info!(target: "pitboss::worker::stderr", worker = %id, pid, "{text}");
                text
            }
        };
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    };
    loop {
        let n = match stderr.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            emit(&buf[..pos]);
            buf.drain(..=pos);
        }
        if buf.len() > STDERR_MAX_LINE {
            emit(&buf[..STDERR_MAX_LINE]);
            buf.clear();
        }
    }
    if !buf.is_empty() {
        emit(&buf);
    }
}

/// The first byte of a structured stderr line (ASCII record separator), as
/// `pitboss_worker.log` writes it; any other line is plain text.
const RECORD_MARK: u8 = 0x1e;

/// One `logging` record an adapter wrote, as `pitboss_worker.log.PitbossHandler`
/// sends it: the mark, then a JSON object on one line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
struct AdapterRecord {
    #[serde(default)]
    level: String,
    #[serde(default)]
    logger: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    trace_id: Option<String>,
}

impl AdapterRecord {
    /// The record of a structured line; `None` for a plain line or one whose JSON
    /// does not parse (then it is logged as the text it is: nothing is lost).
    fn parse(line: &[u8]) -> Option<AdapterRecord> {
        let rest = line.strip_prefix(&[RECORD_MARK])?;
        serde_json::from_slice(rest).ok()
    }

    fn log(&self, worker: WorkerId, pid: u32) {
        let request_id = self.request_id.as_deref().unwrap_or("");
        let trace_id = self.trace_id.as_deref().unwrap_or("");
        let logger = self.logger.as_str();
        let message = self.message.as_str();
        macro_rules! at {
            ($level:ident) => {
                tracing::$level!(
                    target: "pitboss::adapter",
                    worker = %worker,
                    pid,
                    logger,
                    request_id,
                    trace_id,
                    "{message}"
                )
            };
        }
        match self.level.as_str() {
            "CRITICAL" | "ERROR" => at!(error),
            "WARNING" => at!(warn),
            "DEBUG" | "NOTSET" => at!(debug),
            _ => at!(info),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adapter_record_is_parsed_and_anything_else_is_text() {
        let line = b"\x1e{\"level\":\"WARNING\",\"logger\":\"calc\",\"message\":\"hi\",\"request_id\":\"r1\",\"trace_id\":\"t1\"}";
        assert_eq!(
            AdapterRecord::parse(line),
            Some(AdapterRecord {
                level: "WARNING".into(),
                logger: "calc".into(),
                message: "hi".into(),
                request_id: Some("r1".into()),
                trace_id: Some("t1".into()),
            })
        );
        assert_eq!(AdapterRecord::parse(b"plain text"), None);
        assert_eq!(AdapterRecord::parse(b"\x1e{not json"), None);
        assert_eq!(
            AdapterRecord::parse(b"\x1e{\"message\":\"m\"}").map(|r| r.message),
            Some("m".into()),
            "fields the handler may leave out"
        );
    }
}
