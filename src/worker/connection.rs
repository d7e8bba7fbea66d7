//! The connection to one running worker: its outbox (callers write their own frames;
//! a writer task only drains what the pipe could not take at once), a reader task, and
//! a table of requests in flight keyed by request id.
//!
//! Several requests may be in flight at once (pipelining): frames queued behind a full
//! pipe go out together in as few writes as it allows, and the worker batches its
//! replies too. A reply is
//! routed to its caller by request id. Anything the worker sends that breaks the
//! protocol marks the connection broken and asks the supervisor to kill the process:
//! a worker that lied once is never trusted again.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Notify};

use super::outbox::{Outbox, OutboxHandle, SendError};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use super::error::WorkerError;
use super::frame::{
    ErrorBody, Frame, FrameCodec, ReadyInfo, RequestContext, RequestFrame, CONTEXT_REVISION,
};
use super::id::WorkerId;

/// Why the supervisor should kill a worker that is still running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillReason {
    /// It sent bytes that are not valid protocol.
    Protocol(String),
    /// It closed its stdout but did not exit.
    StdoutClosed,
    /// A cancelled request did not finish within the grace period.
    CancelTimeout,
}

impl fmt::Display for KillReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KillReason::Protocol(d) => write!(f, "protocol violation: {d}"),
            KillReason::StdoutClosed => f.write_str("it closed its stdout"),
            KillReason::CancelTimeout => {
                f.write_str("a cancelled request did not stop within the grace period")
            }
        }
    }
}

/// What a unary call returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub content_type: String,
    pub payload: Bytes,
}

/// One event of a streaming call.
#[derive(Debug)]
pub enum StreamEvent {
    Chunk(Reply),
    End,
    Failed(WorkerError),
}

/// Something the caller wants dropped when the worker has finished with a request:
/// the pool puts its concurrency slot here. The worker layer knows nothing about it.
pub type SlotGuard = Box<dyn Send + Sync>;

enum ReplyTx {
    Unary(oneshot::Sender<Result<Reply, WorkerError>>),
    Stream(mpsc::UnboundedSender<StreamEvent>),
    /// The caller gave up; we wait for the worker's terminal frame to free the slot.
    Cancelled,
}

struct Pending {
    tx: ReplyTx,
    _slot: Option<SlotGuard>,
}

/// The request-routing table and the connection's fate, shared by the tasks.
struct Shared {
    id: WorkerId,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Set once, when the connection can no longer carry requests.
    broken: Mutex<Option<WorkerError>>,
    kill: Mutex<Option<KillReason>>,
    kill_notify: Notify,
    last_pong: Mutex<Instant>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request_kill(&self, reason: KillReason) {
        let mut kill = self.kill.lock().unwrap_or_else(|e| e.into_inner());
        if kill.is_none() {
            *kill = Some(reason);
        }
        drop(kill);
        self.kill_notify.notify_one();
    }

    /// Marks the connection broken and fails everything in flight with `error`.
    fn fail_all(&self, error: WorkerError) {
        {
            let mut broken = self.broken.lock().unwrap_or_else(|e| e.into_inner());
            if broken.is_none() {
                *broken = Some(error.clone());
            }
        }
        let drained: Vec<Pending> = self.pending().drain().map(|(_, p)| p).collect();
        for p in drained {
            match p.tx {
                ReplyTx::Unary(tx) => {
                    let _ = tx.send(Err(error.clone()));
                }
                ReplyTx::Stream(tx) => {
                    let _ = tx.send(StreamEvent::Failed(error.clone()));
                }
                ReplyTx::Cancelled => {}
            }
        }
    }

    fn violation(&self, detail: impl fmt::Display) {
        let detail = detail.to_string();
        tracing::warn!(worker = %self.id, "protocol violation: {detail}");
        self.fail_all(WorkerError::Protocol {
            worker: self.id,
            detail: detail.clone(),
        });
        self.request_kill(KillReason::Protocol(detail));
    }

    /// Routes one frame from the worker. Returns false when the connection is unusable.
    fn route(&self, frame: Frame) -> bool {
        let id = self.id;
        match frame {
            Frame::Pong { .. } => {
                *self.last_pong.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
                true
            }
            Frame::Response {
                id: rid,
                content_type,
                payload,
            } => self.finish(rid, "RESPONSE", |tx| match tx {
                ReplyTx::Unary(tx) => {
                    let _ = tx.send(Ok(Reply {
                        content_type,
                        payload,
                    }));
                    Ok(())
                }
                ReplyTx::Stream(tx) => {
                    // A unary command asked for as a stream: one chunk, then the end.
                    let _ = tx.send(StreamEvent::Chunk(Reply {
                        content_type,
                        payload,
                    }));
                    let _ = tx.send(StreamEvent::End);
                    Ok(())
                }
                ReplyTx::Cancelled => Ok(()),
            }),
            Frame::Error { id: rid, body } => self.finish(rid, "ERROR", |tx| {
                let error = WorkerError::from_body(id, body);
                match tx {
                    ReplyTx::Unary(tx) => {
                        let _ = tx.send(Err(error));
                    }
                    ReplyTx::Stream(tx) => {
                        let _ = tx.send(StreamEvent::Failed(error));
                    }
                    ReplyTx::Cancelled => {}
                }
                Ok(())
            }),
            Frame::StreamEnd { id: rid } => self.finish(rid, "STREAM_END", |tx| match tx {
                ReplyTx::Stream(tx) => {
                    let _ = tx.send(StreamEvent::End);
                    Ok(())
                }
                ReplyTx::Cancelled => Ok(()),
                ReplyTx::Unary(_) => Err(Misrouted::StreamEndForUnary),
            }),
            Frame::StreamChunk {
                id: rid,
                content_type,
                payload,
            } => {
                let pending = self.pending();
                let outcome = match pending.get(&rid).map(|p| &p.tx) {
                    Some(ReplyTx::Stream(tx)) => {
                        let _ = tx.send(StreamEvent::Chunk(Reply {
                            content_type,
                            payload,
                        }));
                        Ok(())
                    }
                    Some(ReplyTx::Cancelled) => Ok(()),
                    Some(ReplyTx::Unary(_)) => Err(Misrouted::ChunkForUnary(rid)),
                    None => Err(Misrouted::UnknownId {
                        what: "STREAM_CHUNK",
                        rid,
                    }),
                };
                drop(pending);
                match outcome {
                    Ok(()) => true,
                    Err(detail) => {
                        self.violation(detail);
                        false
                    }
                }
            }
            other => {
                self.violation(format!("unexpected {:?} frame from a worker", other.kind()));
                false
            }
        }
    }

    /// Completes request `rid` with a terminal frame.
    fn finish(
        &self,
        rid: u64,
        what: &'static str,
        deliver: impl FnOnce(ReplyTx) -> Result<(), Misrouted>,
    ) -> bool {
        let entry = self.pending().remove(&rid);
        let outcome = match entry {
            // The slot guard drops at the end of this block: the pool sees the worker
            // free only once its reply is routed.
            Some(p) => deliver(p.tx),
            None => Err(Misrouted::UnknownId { what, rid }),
        };
        match outcome {
            Ok(()) => true,
            Err(detail) => {
                self.violation(detail);
                false
            }
        }
    }
}

/// A reply frame that does not fit the request it names: a protocol violation.
#[derive(Debug, thiserror::Error)]
enum Misrouted {
    #[error("{what} for unknown request id {rid}")]
    UnknownId { what: &'static str, rid: u64 },
    #[error("STREAM_END for a unary request")]
    StreamEndForUnary,
    #[error("STREAM_CHUNK for unary request {0}")]
    ChunkForUnary(u64),
}

/// A handle to a ready worker's connection. Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    outbox: Arc<OutboxHandle>,
    ready: Arc<ReadyInfo>,
    next_id: Arc<AtomicU64>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("worker", &self.shared.id)
            .field("pid", &self.ready.pid)
            .finish()
    }
}

/// What a caller sends.
#[derive(Debug, Clone)]
pub struct CallRequest {
    pub command: String,
    pub session_id: Option<String>,
    pub content_type: String,
    /// Time left before the deadline, forwarded to Python as advice.
    pub timeout: Option<Duration>,
    /// The call's ids and this try's attempt and backend; sent only to a runtime that
    /// reads context blocks (READY's `revision`), so an older one keeps working.
    pub context: Option<RequestContext>,
    pub payload: Bytes,
}

/// Unary or streaming, as decided by the caller from the command's `READY` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    Unary,
    Stream,
}

impl Connection {
    /// Starts the reader task and the outbox over an already-handshaken worker's pipes.
    pub fn start<R, W>(
        id: WorkerId,
        ready: ReadyInfo,
        reader: FramedRead<R, FrameCodec>,
        writer: W,
    ) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Send + 'static,
    {
        let shared = Arc::new(Shared {
            id,
            pending: Mutex::new(HashMap::new()),
            broken: Mutex::new(None),
            kill: Mutex::new(None),
            kill_notify: Notify::new(),
            last_pong: Mutex::new(Instant::now()),
        });
        let codec = reader.decoder().clone();
        let outbox = Outbox::start(writer, codec);
        tokio::spawn(read_loop(shared.clone(), reader));
        Connection {
            shared,
            outbox: Arc::new(outbox),
            ready: Arc::new(ready),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    pub fn id(&self) -> WorkerId {
        self.shared.id
    }

    pub fn ready_info(&self) -> &ReadyInfo {
        &self.ready
    }

    /// Requests in flight on this worker, including cancelled ones it has not yet
    /// acknowledged.
    pub fn in_flight(&self) -> usize {
        self.shared.pending().len()
    }

    /// The error that broke the connection, if it is broken.
    pub fn broken(&self) -> Option<WorkerError> {
        self.shared
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends a request. `slot` is dropped once the worker has sent its terminal frame
    /// (or the connection breaks), not when the caller stops listening.
    pub fn call(
        &self,
        request: CallRequest,
        mode: ReplyMode,
        slot: Option<SlotGuard>,
        cancel_grace: Duration,
    ) -> Result<Call, WorkerError> {
        let rid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = match mode {
            ReplyMode::Unary => {
                let (tx, rx) = oneshot::channel();
                (ReplyTx::Unary(tx), CallRx::Unary(rx))
            }
            ReplyMode::Stream => {
                let (tx, rx) = mpsc::unbounded_channel();
                (ReplyTx::Stream(tx), CallRx::Stream(rx))
            }
        };
        {
            // Checked under the table's lock: fail_all drains the table after setting
            // `broken`, so a request is either refused here or failed there.
            let mut pending = self.shared.pending();
            if let Some(err) = self.broken() {
                return Err(err.not_sent());
            }
            pending.insert(rid, Pending { tx, _slot: slot });
        }
        let timeout_ms = request
            .timeout
            .map(|t| t.as_millis().clamp(1, u32::MAX as u128) as u32)
            .unwrap_or(0);
        let frame = Frame::Request(RequestFrame {
            id: rid,
            command: request.command,
            session_id: request.session_id.unwrap_or_default(),
            content_type: request.content_type,
            timeout_ms,
            context: request
                .context
                .filter(|_| self.ready.revision >= CONTEXT_REVISION),
            payload: request.payload,
        });
        if let Err(e) = self.outbox.send(&frame) {
            self.shared.pending().remove(&rid);
            return Err(match e {
                // Only a request can be too large; it fails, not the worker.
                SendError::Encode(e) => WorkerError::Protocol {
                    worker: self.id(),
                    detail: format!("request not sent: {e}"),
                },
                SendError::Closed => WorkerError::Exited {
                    worker: self.id(),
                    reason: "its input pipe is closed".into(),
                    sent: false,
                },
            });
        }
        Ok(Call {
            conn: self.clone(),
            rid,
            rx,
            done: false,
            cancel_grace,
        })
    }

    /// Sends a heartbeat ping.
    pub fn ping(&self, seq: u64) {
        let _ = self.outbox.send(&Frame::Ping { seq });
    }

    /// When the last `PONG` arrived (or the connection started).
    pub fn last_pong(&self) -> Instant {
        *self
            .shared
            .last_pong
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn close_session(&self, session_id: &str) {
        let _ = self.outbox.send(&Frame::SessionClose {
            session_id: session_id.to_string(),
        });
    }

    /// Asks the worker to finish what it has and exit.
    pub fn shutdown(&self) {
        let _ = self.outbox.send(&Frame::Shutdown);
    }

    /// Resolves when the connection asks to have its process killed.
    pub async fn kill_requested(&self) -> KillReason {
        loop {
            let notified = self.shared.kill_notify.notified();
            if let Some(reason) = self
                .shared
                .kill
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return reason;
            }
            notified.await;
        }
    }

    /// Asks the supervisor to kill this worker.
    pub fn request_kill(&self, reason: KillReason) {
        self.shared.request_kill(reason);
    }

    /// Called by the supervisor once the process is gone: fails whatever is in flight.
    pub fn fail_all(&self, error: WorkerError) {
        self.shared.fail_all(error);
    }

    fn cancel(&self, rid: u64, grace: Duration) {
        {
            let mut pending = self.shared.pending();
            match pending.get_mut(&rid) {
                Some(p) => p.tx = ReplyTx::Cancelled,
                None => return, // already finished
            }
        }
        let _ = self.outbox.send(&Frame::Cancel { id: rid });
        let shared = self.shared.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tokio::time::sleep(grace).await;
                if shared.pending().contains_key(&rid) {
                    shared.request_kill(KillReason::CancelTimeout);
                }
            });
        }
    }
}

enum CallRx {
    Unary(oneshot::Receiver<Result<Reply, WorkerError>>),
    Stream(mpsc::UnboundedReceiver<StreamEvent>),
}

/// One request in flight. Dropping it before its reply arrived cancels it on the
/// worker, which must acknowledge within the cancel grace period or be killed.
pub struct Call {
    conn: Connection,
    rid: u64,
    rx: CallRx,
    done: bool,
    cancel_grace: Duration,
}

impl Call {
    pub fn worker(&self) -> WorkerId {
        self.conn.id()
    }

    /// Waits for the reply of a unary call.
    pub async fn reply(&mut self) -> Result<Reply, WorkerError> {
        let worker = self.conn.id();
        let out = match &mut self.rx {
            CallRx::Unary(rx) => rx.await.unwrap_or_else(|_| Err(gone(worker))),
            CallRx::Stream(_) => Err(WorkerError::Internal(
                "reply() called on a streaming call".into(),
            )),
        };
        self.done = true;
        out
    }

    /// The next chunk of a streaming call; `None` after the end or an error.
    pub async fn next_chunk(&mut self) -> Option<Result<Reply, WorkerError>> {
        if self.done {
            return None;
        }
        let worker = self.conn.id();
        let event = match &mut self.rx {
            CallRx::Stream(rx) => rx.recv().await,
            CallRx::Unary(_) => {
                self.done = true;
                return Some(Err(WorkerError::Internal(
                    "next_chunk() called on a unary call".into(),
                )));
            }
        };
        match event {
            Some(StreamEvent::Chunk(r)) => Some(Ok(r)),
            Some(StreamEvent::End) => {
                self.done = true;
                None
            }
            Some(StreamEvent::Failed(e)) => {
                self.done = true;
                Some(Err(e))
            }
            None => {
                self.done = true;
                Some(Err(gone(worker)))
            }
        }
    }

    /// Cancels the request now (dropping the call does the same).
    pub fn cancel(mut self) {
        self.cancel_now();
    }

    fn cancel_now(&mut self) {
        if !self.done {
            self.done = true;
            self.conn.cancel(self.rid, self.cancel_grace);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.cancel_now();
    }
}

fn gone(worker: WorkerId) -> WorkerError {
    WorkerError::Exited {
        worker,
        reason: "its connection closed".into(),
        sent: true,
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut reader: FramedRead<R, FrameCodec>,
) {
    loop {
        match reader.next().await {
            Some(Ok(frame)) => {
                if !shared.route(frame) {
                    return;
                }
            }
            Some(Err(e)) => {
                shared.violation(e);
                return;
            }
            None => {
                // EOF: either the process exited (the supervisor reaps it and fails what
                // is in flight with its exit status) or it closed stdout and lives on.
                shared.request_kill(KillReason::StdoutClosed);
                return;
            }
        }
    }
}

/// Turns an `ERROR` frame's body into the typed error.
impl WorkerError {
    pub(crate) fn from_body(worker: WorkerId, body: ErrorBody) -> WorkerError {
        WorkerError::Python {
            worker,
            kind: body.kind,
            error_type: body.error_type,
            message: body.message,
            traceback: body.traceback,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::SinkExt;
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::FramedWrite;

    fn ready() -> ReadyInfo {
        ReadyInfo {
            protocol: 1,
            pid: 1,
            adapter: "fake".into(),
            commands: vec![],
            python: String::new(),
            runtime: String::new(),
            revision: 0,
        }
    }

    /// A connection whose "worker" is the test, over in-memory pipes.
    fn fake() -> (
        Connection,
        FramedRead<tokio::io::DuplexStream, FrameCodec>,
        FramedWrite<tokio::io::DuplexStream, FrameCodec>,
    ) {
        let (host_out, worker_in) = tokio::io::duplex(1 << 16);
        let (worker_out, host_in) = tokio::io::duplex(1 << 16);
        let conn = Connection::start(
            WorkerId(1),
            ready(),
            FramedRead::new(host_in, FrameCodec::default()),
            host_out,
        );
        (
            conn,
            FramedRead::new(worker_in, FrameCodec::default()),
            FramedWrite::new(worker_out, FrameCodec::default()),
        )
    }

    fn req(cmd: &str) -> CallRequest {
        CallRequest {
            command: cmd.into(),
            session_id: None,
            content_type: "application/json".into(),
            timeout: None,
            context: None,
            payload: Bytes::from_static(b"{}"),
        }
    }

    fn request_id(frame: Frame) -> u64 {
        match frame {
            Frame::Request(r) => r.id,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn replies_are_routed_by_request_id_out_of_order() {
        let (conn, mut from_host, mut to_host) = fake();
        let g = Duration::from_secs(1);
        let mut a = conn.call(req("a"), ReplyMode::Unary, None, g).unwrap();
        let mut b = conn.call(req("b"), ReplyMode::Unary, None, g).unwrap();
        let ia = request_id(from_host.next().await.unwrap().unwrap());
        let ib = request_id(from_host.next().await.unwrap().unwrap());
        assert_eq!(conn.in_flight(), 2);
        for (id, body) in [(ib, "B"), (ia, "A")] {
            to_host
                .send(Frame::Response {
                    id,
                    content_type: "text/plain".into(),
                    payload: Bytes::from(body),
                })
                .await
                .unwrap();
        }
        assert_eq!(b.reply().await.unwrap().payload, "B");
        assert_eq!(a.reply().await.unwrap().payload, "A");
        assert_eq!(conn.in_flight(), 0);
    }

    #[tokio::test]
    async fn the_slot_is_released_only_when_the_worker_answers() {
        let (conn, mut from_host, mut to_host) = fake();
        let slot = Arc::new(());
        let call = conn
            .call(
                req("x"),
                ReplyMode::Unary,
                Some(Box::new(slot.clone())),
                Duration::from_secs(60),
            )
            .unwrap();
        let id = request_id(from_host.next().await.unwrap().unwrap());
        drop(call); // the caller gives up: a CANCEL goes out, the slot stays taken
        assert_eq!(
            from_host.next().await.unwrap().unwrap(),
            Frame::Cancel { id }
        );
        assert_eq!(Arc::strong_count(&slot), 2);
        to_host
            .send(Frame::Error {
                id,
                body: ErrorBody {
                    kind: "cancelled".into(),
                    error_type: String::new(),
                    message: String::new(),
                    traceback: String::new(),
                },
            })
            .await
            .unwrap();
        // Wait for the reader task to route it.
        while Arc::strong_count(&slot) != 1 {
            tokio::task::yield_now().await;
        }
        assert!(conn.broken().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unacknowledged_cancel_asks_for_a_kill_after_the_grace_period() {
        let (conn, mut from_host, _to_host) = fake();
        let call = conn
            .call(req("x"), ReplyMode::Unary, None, Duration::from_millis(500))
            .unwrap();
        let _ = from_host.next().await;
        let start = Instant::now();
        drop(call);
        assert_eq!(conn.kill_requested().await, KillReason::CancelTimeout);
        assert!(start.elapsed() >= Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_reply_to_an_unknown_id_breaks_the_connection_and_fails_pending() {
        let (conn, mut from_host, mut to_host) = fake();
        let mut call = conn
            .call(req("x"), ReplyMode::Unary, None, Duration::from_secs(1))
            .unwrap();
        let _ = from_host.next().await;
        to_host
            .send(Frame::Response {
                id: 0xdead_beef,
                content_type: String::new(),
                payload: Bytes::new(),
            })
            .await
            .unwrap();
        assert!(matches!(
            call.reply().await,
            Err(WorkerError::Protocol { .. })
        ));
        assert!(matches!(
            conn.kill_requested().await,
            KillReason::Protocol(_)
        ));
        let again = conn.call(req("y"), ReplyMode::Unary, None, Duration::from_secs(1));
        assert!(
            matches!(again, Err(WorkerError::Exited { sent: false, .. })),
            "refused before sending, so safe to retry"
        );
    }

    #[tokio::test]
    async fn streams_deliver_chunks_in_order_then_end() {
        let (conn, mut from_host, mut to_host) = fake();
        let mut call = conn
            .call(req("s"), ReplyMode::Stream, None, Duration::from_secs(1))
            .unwrap();
        let id = request_id(from_host.next().await.unwrap().unwrap());
        for i in 0..3u8 {
            to_host
                .send(Frame::StreamChunk {
                    id,
                    content_type: "x".into(),
                    payload: Bytes::from(vec![i]),
                })
                .await
                .unwrap();
        }
        to_host.send(Frame::StreamEnd { id }).await.unwrap();
        for i in 0..3u8 {
            assert_eq!(call.next_chunk().await.unwrap().unwrap().payload[..], [i]);
        }
        assert!(call.next_chunk().await.is_none());
    }

    #[tokio::test]
    async fn garbage_and_eof_are_reported() {
        let (conn, _from_host, to_host) = fake();
        let mut raw = to_host.into_inner();
        raw.write_all(b"\x00\x00\x00\x0chello world!")
            .await
            .unwrap();
        assert!(matches!(
            conn.kill_requested().await,
            KillReason::Protocol(_)
        ));

        let (conn, _from_host, to_host) = fake();
        drop(to_host);
        assert_eq!(conn.kill_requested().await, KillReason::StdoutClosed);
    }
}
