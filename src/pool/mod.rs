//! A supervised pool of Python workers: startup, supervision, selection, queueing,
//! session affinity and graceful shutdown. The pool knows nothing about gRPC, nor
//! whether it serves the legacy or the new backend.
//!
//! # Layout
//! - [`config`]: validated settings.
//! - `dispatch`: request slots per worker and the bounded wait queue.
//! - [`select`]: the pure choice of a worker.
//! - [`sessions`]: which worker holds each session.
//! - [`restart`]: backoff and crash-loop decisions.
//! - `supervisor`: one task per slot that runs, watches and replaces a worker.

pub mod config;
mod dispatch;
mod error;
pub mod restart;
pub mod select;
pub mod sessions;
mod supervisor;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use config::{InvalidPoolConfig, PoolConfig, WorkerCommand};
pub use error::{ExhaustedReason, PoolError, TimeoutStage};
pub use select::Target;
pub use sessions::{AffinityMode, SessionInfo, SessionTable, UnknownAffinityMode};
pub use supervisor::{ExitReason, StopReason};

use dispatch::{Dispatcher, Lease};
use restart::RestartTracker;

use crate::worker::{
    resolve_python, signal_group, CallRequest, CommandInfo, ReadyInfo, ReplyMode, WorkerId,
    WorkerSpec,
};

/// One request to the pool.
#[derive(Debug, Clone)]
pub struct PoolRequest {
    pub command: String,
    pub payload: Bytes,
    pub content_type: String,
    pub session_id: Option<String>,
    /// Absolute deadline; the pool's `default_timeout` applies when `None`.
    pub deadline: Option<Instant>,
    /// Prefer another worker than this one (a retry after it failed).
    pub avoid_worker: Option<WorkerId>,
}

impl PoolRequest {
    pub fn new(command: impl Into<String>, payload: impl Into<Bytes>) -> PoolRequest {
        PoolRequest {
            command: command.into(),
            payload: payload.into(),
            content_type: "application/json".into(),
            session_id: None,
            deadline: None,
            avoid_worker: None,
        }
    }

    pub fn session(mut self, id: impl Into<String>) -> Self {
        self.session_id = Some(id.into());
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.deadline = Some(Instant::now() + t);
        self
    }
}

/// A unary reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolResponse {
    pub payload: Bytes,
    pub content_type: String,
    pub worker: WorkerId,
}

/// Life-cycle state of a pool slot, for status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Starting,
    Ready,
    Draining,
    /// Waiting to restart after an exit.
    BackingOff,
    Stopped,
}

impl SlotState {
    pub fn as_str(&self) -> &'static str {
        match self {
            SlotState::Starting => "starting",
            SlotState::Ready => "ready",
            SlotState::Draining => "draining",
            SlotState::BackingOff => "backing_off",
            SlotState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone)]
struct SlotInfo {
    state: SlotState,
    worker: Option<WorkerId>,
    pid: Option<u32>,
    started: Option<Instant>,
    restarts: u32,
    last_exit: Option<String>,
    rss_bytes: Option<u64>,
    tracker_snapshot: Option<RestartTracker>,
    retry_at: Option<Instant>,
    /// The first start attempt has finished (either way).
    attempted: bool,
}

/// One worker in a status report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    pub slot: usize,
    pub worker: Option<WorkerId>,
    pub pid: Option<u32>,
    pub state: SlotState,
    pub in_flight: u32,
    pub served: u64,
    pub sessions: usize,
    /// Out of general rotation (outlier ejection).
    pub ejected: bool,
    pub restarts: u32,
    pub rss_bytes: Option<u64>,
    pub uptime: Option<Duration>,
    pub last_exit: Option<String>,
    /// Crashes within the crash-loop window.
    pub recent_crashes: usize,
    /// When a backing-off slot will try again.
    pub retry_in: Option<Duration>,
}

/// A point-in-time view of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    pub name: String,
    pub size: usize,
    pub ready: usize,
    /// Some slot is in a crash loop.
    pub degraded: bool,
    pub shutting_down: bool,
    pub queue_depth: usize,
    pub sessions: usize,
    pub workers: Vec<WorkerStatus>,
}

/// Hooks for metrics and logs; the pool calls them, the caller decides what to record.
pub trait PoolObserver: Send + Sync + 'static {
    fn worker_exited(&self, _pool: &str, _reason: &ExitReason) {}
}

struct NoObserver;
impl PoolObserver for NoObserver {}

/// The commands the workers announced, learnt from the first READY.
#[derive(Debug, Default)]
struct Commands {
    list: Vec<CommandInfo>,
    by_name: HashMap<String, CommandInfo>,
    names: Vec<String>,
}

pub(crate) struct Shared {
    config: PoolConfig,
    spec: WorkerSpec,
    dispatcher: Arc<Dispatcher>,
    sessions: SessionTable,
    slots: Vec<Mutex<SlotInfo>>,
    commands: RwLock<Arc<Commands>>,
    next_worker: AtomicU64,
    stop: CancellationToken,
    changed: Notify,
    events: Arc<dyn PoolObserver>,
}

impl Shared {
    fn next_worker_id(&self) -> WorkerId {
        WorkerId(self.next_worker.fetch_add(1, Ordering::Relaxed))
    }

    fn update_slot(&self, slot: usize, f: impl FnOnce(&mut SlotInfo)) {
        {
            let mut s = self.slots[slot].lock().unwrap_or_else(|e| e.into_inner());
            f(&mut s);
            if s.state != SlotState::Starting {
                s.attempted = true;
            }
        }
        self.changed.notify_waiters();
    }

    fn learn_commands(&self, ready: &ReadyInfo) {
        let mut cmds = self.commands.write().unwrap_or_else(|e| e.into_inner());
        if cmds.list == ready.commands {
            return;
        }
        if !cmds.list.is_empty() {
            tracing::warn!(pool = %self.config.name, "a worker announced a different command list; using the newest");
        }
        *cmds = Arc::new(Commands {
            list: ready.commands.clone(),
            by_name: ready
                .commands
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect(),
            names: ready.commands.iter().map(|c| c.name.clone()).collect(),
        });
    }

    fn commands(&self) -> Arc<Commands> {
        self.commands
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Kills every worker's process group at once (the pool handle was dropped).
    fn hard_stop(&self) {
        self.stop.cancel();
        self.dispatcher.close();
        for slot in &self.slots {
            if let Some(pid) = slot.lock().unwrap_or_else(|e| e.into_inner()).pid {
                signal_group(pid, libc::SIGKILL);
            }
        }
    }
}

/// Kills the workers when the last [`Pool`] handle goes away without `shutdown()`.
struct Owner {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.hard_stop();
    }
}

/// A supervised pool of Python workers. Cheap to clone; dropping the last clone kills
/// the workers, while [`Pool::shutdown`] lets in-flight requests finish first.
#[derive(Clone)]
pub struct Pool {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.shared().config.name)
            .finish()
    }
}

/// The directory that holds `pitboss_worker` in a source checkout.
pub fn default_runtime_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

impl Pool {
    /// Starts the workers and waits until each has either become ready or failed its
    /// first start. Fails if none is ready.
    pub async fn start(config: PoolConfig) -> Result<Pool, PoolError> {
        let wait = config.startup_timeout + Duration::from_secs(5);
        let pool = Pool::launch(config, Arc::new(NoObserver)).await?;
        pool.wait_started(wait).await?;
        Ok(pool)
    }

    /// Starts the supervisors and returns at once; workers become ready in the
    /// background. Fails only for invalid config or an unusable interpreter.
    pub async fn launch(
        config: PoolConfig,
        events: Arc<dyn PoolObserver>,
    ) -> Result<Pool, PoolError> {
        config
            .validate()
            .map_err(|e| PoolError::InvalidRequest(format!("pool {}: {e}", config.name)))?;
        let w = &config.worker;
        let python = resolve_python(&w.python, w.working_dir.as_deref())
            .await
            .map_err(|e| PoolError::Unavailable(format!("pool {}: {e}", config.name)))?;
        tracing::info!(pool = %config.name, python = %python.display(), size = config.size, adapter = %w.adapter, "starting pool");
        let spec = WorkerSpec {
            python,
            adapter: w.adapter.clone(),
            runtime_dir: w.runtime_dir.clone(),
            python_path: w.python_path.clone(),
            working_dir: w.working_dir.clone(),
            env: w.env.clone(),
            inherit_env: w.inherit_env.clone(),
            max_frame_bytes: config.max_frame_bytes,
            concurrency: config.worker_concurrency,
        };
        let slots = (0..config.size)
            .map(|_| {
                Mutex::new(SlotInfo {
                    state: SlotState::Starting,
                    worker: None,
                    pid: None,
                    started: None,
                    restarts: 0,
                    last_exit: None,
                    rss_bytes: None,
                    tracker_snapshot: None,
                    retry_at: None,
                    attempted: false,
                })
            })
            .collect();
        let shared = Arc::new(Shared {
            dispatcher: Dispatcher::new(config.queue_size),
            sessions: SessionTable::new(config.session_ttl, config.max_sessions),
            spec,
            slots,
            commands: RwLock::new(Arc::new(Commands::default())),
            next_worker: AtomicU64::new(1),
            stop: CancellationToken::new(),
            changed: Notify::new(),
            events,
            config,
        });
        // All workers start at once: a pool of 8 is ready in about the time of one.
        let mut tasks: Vec<JoinHandle<()>> = (0..shared.config.size)
            .map(|slot| tokio::spawn(supervisor::supervise(shared.clone(), slot)))
            .collect();
        tasks.push(tokio::spawn(sweep_sessions(shared.clone())));
        Ok(Pool {
            owner: Arc::new(Owner {
                shared,
                tasks: Mutex::new(tasks),
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.owner.shared
    }

    /// Waits until every slot has finished its first start attempt; fails if none is
    /// ready then, with the reasons.
    pub async fn wait_started(&self, timeout: Duration) -> Result<(), PoolError> {
        let shared = self.shared();
        let deadline = Instant::now() + timeout;
        loop {
            let notified = shared.changed.notified();
            let (all_tried, ready, errors) = {
                let mut all = true;
                let mut errors = Vec::new();
                for s in &shared.slots {
                    let s = s.lock().unwrap_or_else(|e| e.into_inner());
                    all &= s.attempted;
                    if let Some(e) = &s.last_exit {
                        errors.push(e.clone());
                    }
                }
                (all, shared.dispatcher.accepting_workers(), errors)
            };
            if all_tried && ready > 0 {
                return Ok(());
            }
            if all_tried {
                return Err(PoolError::Unavailable(format!(
                    "pool {}: no worker started: {}",
                    shared.config.name,
                    errors
                        .first()
                        .map(String::as_str)
                        .unwrap_or("unknown error")
                )));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(PoolError::Unavailable(format!(
                    "pool {}: workers not ready within {timeout:?}",
                    shared.config.name
                )));
            }
        }
    }

    /// Waits until `n` workers are ready (tests and readiness checks).
    pub async fn wait_ready(&self, n: usize, timeout: Duration) -> Result<(), PoolError> {
        let shared = self.shared();
        let deadline = Instant::now() + timeout;
        loop {
            let notified = shared.changed.notified();
            if self.status().ready >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(PoolError::Unavailable(format!(
                    "fewer than {n} workers ready after {timeout:?}"
                )));
            }
        }
    }

    /// Resolves at the next change of any slot's state (a worker ready, exited, ...).
    /// Create it before reading the status, so no change is missed in between.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared().changed.notified()
    }

    pub fn config(&self) -> &PoolConfig {
        &self.shared().config
    }

    /// The commands the workers registered (empty until one has started).
    pub fn commands(&self) -> Vec<CommandInfo> {
        self.shared().commands().list.clone()
    }

    /// Whether a worker registered `name`: known from the first READY on.
    pub fn knows_command(&self, name: &str) -> bool {
        self.shared().commands().by_name.contains_key(name)
    }

    /// Runs a unary command.
    pub async fn execute(&self, req: PoolRequest) -> Result<PoolResponse, PoolError> {
        let (mut call, deadline, total) = self.start_call(req, ReplyMode::Unary).await?;
        let worker = call.worker();
        match tokio::time::timeout_at(deadline, call.reply()).await {
            Ok(Ok(reply)) => Ok(PoolResponse {
                payload: reply.payload,
                content_type: reply.content_type,
                worker,
            }),
            Ok(Err(e)) => Err(call.map_error(e)),
            Err(_) => Err(PoolError::Timeout {
                worker: Some(worker),
                after: total,
                stage: TimeoutStage::Running,
            }), // dropping `call` sends the cancel
        }
    }

    /// Runs a command and streams its chunks. A unary command yields one chunk.
    pub async fn execute_stream(&self, req: PoolRequest) -> Result<PoolStream, PoolError> {
        let (call, deadline, total) = self.start_call(req, ReplyMode::Stream).await?;
        Ok(PoolStream {
            call: Some(call),
            deadline,
            total,
        })
    }

    async fn start_call(
        &self,
        req: PoolRequest,
        mode: ReplyMode,
    ) -> Result<(PendingCall, Instant, Duration), PoolError> {
        let shared = self.shared();
        let now = Instant::now();
        let deadline = req.deadline.unwrap_or(now + shared.config.default_timeout);
        let total = deadline.saturating_duration_since(now);
        if req.command.is_empty() {
            return Err(PoolError::InvalidRequest(
                "command must not be empty".into(),
            ));
        }
        let commands = shared.commands();
        if !commands.list.is_empty() {
            match commands.by_name.get(&req.command) {
                None => {
                    return Err(PoolError::UnknownCommand {
                        command: req.command,
                        known: commands.names.clone(),
                    })
                }
                Some(c) if c.streaming && mode == ReplyMode::Unary => {
                    return Err(PoolError::InvalidRequest(format!(
                        "command {:?} streams its result; call it with ExecuteStream",
                        req.command
                    )))
                }
                Some(_) => {}
            }
        }
        // A request the frame codec would refuse is the caller's error, found here
        // before a worker is chosen: not the worker's (a protocol error would count
        // against it and mark its sessions lost).
        if req.content_type.len() > usize::from(u16::MAX) {
            return Err(PoolError::InvalidRequest(format!(
                "the content type is {} bytes, the limit is {}",
                req.content_type.len(),
                u16::MAX
            )));
        }
        let frame_len = crate::worker::frame::request_frame_len(
            &req.command,
            req.session_id.as_deref().unwrap_or(""),
            &req.content_type,
            req.payload.len(),
        );
        if frame_len > shared.config.max_frame_bytes {
            return Err(PoolError::RequestTooLarge {
                len: frame_len,
                max: shared.config.max_frame_bytes,
                limit: "pool.max_frame_bytes",
            });
        }
        if now >= deadline {
            return Err(PoolError::Timeout {
                worker: None,
                after: Duration::ZERO,
                stage: TimeoutStage::Queued,
            });
        }
        if shared.dispatcher.accepting_workers() == 0 {
            // Waiting in the queue is pointless when the pool is in a crash loop.
            let st = self.status();
            if st.degraded && st.ready == 0 {
                let last = st
                    .workers
                    .iter()
                    .find_map(|w| w.last_exit.clone())
                    .unwrap_or_default();
                return Err(PoolError::Unavailable(format!(
                    "pool {} is degraded: its workers keep crashing ({last})",
                    shared.config.name
                )));
            }
        }
        let lease = self.acquire(&req, deadline).await?;
        let conn = lease.connection().clone();
        let worker = conn.id();
        let call = conn
            .call(
                CallRequest {
                    command: req.command.clone(),
                    session_id: req.session_id.clone(),
                    content_type: req.content_type,
                    timeout: Some(deadline.saturating_duration_since(Instant::now())),
                    payload: req.payload,
                },
                mode,
                Some(Box::new(lease)),
                shared.config.cancel_grace,
            )
            .map_err(|e| PoolError::from_worker(e, &req.command, &commands.names))?;
        Ok((
            PendingCall {
                call,
                command: req.command,
                commands,
                session: req.session_id.map(|s| (s, worker)),
                shared: shared.clone(),
            },
            deadline,
            total,
        ))
    }

    /// Finds a slot for the request, honouring session affinity.
    async fn acquire(&self, req: &PoolRequest, deadline: Instant) -> Result<Lease, PoolError> {
        let shared = self.shared();
        let queue_deadline = deadline.min(Instant::now() + shared.config.queue_timeout);
        let queued_timeout = |e: PoolError| match e {
            PoolError::PoolExhausted {
                reason: ExhaustedReason::QueueTimeout,
            } if queue_deadline >= deadline => PoolError::Timeout {
                worker: None,
                after: deadline.saturating_duration_since(Instant::now()),
                stage: TimeoutStage::Queued,
            },
            other => other,
        };
        let Some(session_id) = &req.session_id else {
            return shared
                .dispatcher
                .acquire(
                    Target::Any {
                        avoid: req.avoid_worker,
                    },
                    queue_deadline,
                    false,
                )
                .await
                .map_err(queued_timeout);
        };
        let worker = shared.sessions.route(session_id)?;
        let lost = |e: PoolError| match e {
            PoolError::WorkerGone { worker } => {
                shared.sessions.mark_lost(worker);
                PoolError::SessionLost {
                    session_id: session_id.clone(),
                    worker,
                }
            }
            other => other,
        };
        let exact = Target::Exactly(worker);
        match shared.config.affinity {
            AffinityMode::StrictQueue => shared
                .dispatcher
                .acquire(exact, queue_deadline, false)
                .await
                .map_err(lost)
                .map_err(queued_timeout),
            AffinityMode::StrictFailFast => shared
                .dispatcher
                .acquire(exact, queue_deadline, true)
                .await
                .map_err(lost),
            AffinityMode::Hint => {
                match shared.dispatcher.acquire(exact, queue_deadline, true).await {
                    Ok(lease) => Ok(lease),
                    Err(PoolError::PoolExhausted { .. }) => shared
                        .dispatcher
                        .acquire(Target::any(), queue_deadline, false)
                        .await
                        .map_err(queued_timeout),
                    Err(e) => Err(lost(e)),
                }
            }
        }
    }

    /// Creates a session pinned to the least-loaded worker. With `None`, a random
    /// 128-bit id is generated.
    pub fn create_session(
        &self,
        id: Option<String>,
        metadata: std::collections::BTreeMap<String, String>,
    ) -> Result<SessionInfo, PoolError> {
        let shared = self.shared();
        if shared.dispatcher.is_closed() {
            return Err(PoolError::ShuttingDown);
        }
        let id = id.unwrap_or_else(SessionTable::new_id);
        SessionTable::validate_id(&id)?;
        shared.sessions.check_room(&id)?;
        let worker = shared
            .dispatcher
            .place_session()
            .ok_or_else(|| PoolError::Unavailable("no worker is ready to hold a session".into()))?;
        shared
            .sessions
            .insert(id, worker, metadata)
            .inspect_err(|_| {
                shared.dispatcher.session_ended(worker);
            })
    }

    pub fn get_session(&self, id: &str) -> Result<SessionInfo, PoolError> {
        self.shared().sessions.get(id)
    }

    /// Closes a session and drops its state in the worker.
    pub fn close_session(&self, id: &str) -> Result<(), PoolError> {
        let shared = self.shared();
        let (worker, alive) = shared.sessions.remove(id)?;
        end_session(shared, id, worker, alive);
        Ok(())
    }

    pub fn status(&self) -> PoolStatus {
        let shared = self.shared();
        let slots = shared.dispatcher.snapshot();
        let now = Instant::now();
        let mut degraded = false;
        let workers: Vec<WorkerStatus> = shared
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let live = s.worker.and_then(|w| slots.iter().find(|x| x.id == w));
                let recent = s
                    .tracker_snapshot
                    .as_ref()
                    .map(|t| t.recent_crashes(now))
                    .unwrap_or(0);
                if s.tracker_snapshot
                    .as_ref()
                    .is_some_and(|t| t.is_degraded(now))
                {
                    degraded = true;
                }
                WorkerStatus {
                    slot: i,
                    worker: s.worker,
                    pid: s.pid,
                    state: s.state,
                    in_flight: live.map(|l| l.in_flight).unwrap_or(0),
                    served: live.map(|l| l.served).unwrap_or(0),
                    sessions: live.map(|l| l.sessions).unwrap_or(0),
                    ejected: live.is_some_and(|l| l.ejected),
                    restarts: s.restarts,
                    rss_bytes: s.rss_bytes,
                    uptime: s
                        .started
                        .filter(|_| s.state == SlotState::Ready || s.state == SlotState::Draining)
                        .map(|t| now.saturating_duration_since(t)),
                    last_exit: s.last_exit,
                    recent_crashes: recent,
                    retry_in: s
                        .retry_at
                        .filter(|_| s.state == SlotState::BackingOff)
                        .map(|t| t.saturating_duration_since(now)),
                }
            })
            .collect();
        PoolStatus {
            name: shared.config.name.clone(),
            size: shared.config.size,
            ready: workers
                .iter()
                .filter(|w| w.state == SlotState::Ready)
                .count(),
            degraded,
            shutting_down: shared.stop.is_cancelled(),
            queue_depth: shared.dispatcher.queue_depth(),
            sessions: shared.sessions.len(),
            workers,
        }
    }

    /// Graceful shutdown: refuse new work, let in-flight requests finish within
    /// `drain_timeout`, then ask workers to exit, then SIGTERM, then SIGKILL.
    pub async fn shutdown(&self) {
        let shared = self.shared();
        tracing::info!(pool = %shared.config.name, "shutting down");
        shared.dispatcher.close();
        shared.stop.cancel();
        let tasks =
            std::mem::take(&mut *self.owner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        tracing::info!(pool = %shared.config.name, "all workers stopped");
    }

    /// Takes a misbehaving worker out of general rotation for `cooldown`, unless more
    /// than `max_share` of the pool would be ejected. Its sessions still reach it.
    pub fn eject(&self, worker: WorkerId, cooldown: Duration, max_share: f64) -> bool {
        let ok = self
            .shared()
            .dispatcher
            .eject(worker, Instant::now() + cooldown, max_share);
        if ok {
            tracing::warn!(pool = %self.shared().config.name, worker = %worker, ?cooldown, "worker ejected as an outlier");
        }
        ok
    }

    /// Drains and replaces a worker that is alive but keeps failing.
    pub fn replace(&self, worker: WorkerId) {
        self.shared().dispatcher.request_replace(worker);
    }

    /// The worker pids, for tests and diagnostics.
    pub fn pids(&self) -> Vec<u32> {
        self.status().workers.iter().filter_map(|w| w.pid).collect()
    }
}

fn end_session(shared: &Shared, id: &str, worker: WorkerId, alive: bool) {
    shared.dispatcher.session_ended(worker);
    if alive {
        if let Some(conn) = shared.dispatcher.connection(worker) {
            conn.close_session(id);
        }
    }
}

async fn sweep_sessions(shared: Arc<Shared>) {
    let every =
        (shared.sessions.ttl() / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop.cancelled() => return,
        }
        for (id, worker, alive) in shared.sessions.expire(Instant::now()) {
            tracing::debug!(session = %id, worker = %worker, "session expired");
            end_session(&shared, &id, worker, alive);
        }
    }
}

/// A call in flight, with what is needed to explain its errors.
struct PendingCall {
    call: crate::worker::Call,
    command: String,
    commands: Arc<Commands>,
    session: Option<(String, WorkerId)>,
    shared: Arc<Shared>,
}

impl PendingCall {
    fn worker(&self) -> WorkerId {
        self.call.worker()
    }

    async fn reply(&mut self) -> Result<crate::worker::Reply, crate::worker::WorkerError> {
        self.call.reply().await
    }

    fn map_error(&self, e: crate::worker::WorkerError) -> PoolError {
        let err = PoolError::from_worker(e, &self.command, &self.commands.names);
        if let (PoolError::WorkerCrashed { .. } | PoolError::Protocol { .. }, Some((_, w))) =
            (&err, &self.session)
        {
            // The session's state died with the worker; later calls get session_lost.
            self.shared.sessions.mark_lost(*w);
        }
        err
    }
}

/// The chunks of a streaming call. Dropping it cancels the call on the worker.
pub struct PoolStream {
    call: Option<PendingCall>,
    deadline: Instant,
    total: Duration,
}

impl PoolStream {
    pub fn worker(&self) -> Option<WorkerId> {
        self.call.as_ref().map(|c| c.worker())
    }

    /// The next chunk; `None` after the last one or after an error.
    pub async fn next(&mut self) -> Option<Result<PoolResponse, PoolError>> {
        let call = self.call.as_mut()?;
        let worker = call.worker();
        match tokio::time::timeout_at(self.deadline, call.call.next_chunk()).await {
            Ok(Some(Ok(r))) => Some(Ok(PoolResponse {
                payload: r.payload,
                content_type: r.content_type,
                worker,
            })),
            Ok(Some(Err(e))) => {
                let err = call.map_error(e);
                self.call = None;
                Some(Err(err))
            }
            Ok(None) => {
                self.call = None;
                None
            }
            Err(_) => {
                self.call = None; // cancels on the worker
                Some(Err(PoolError::Timeout {
                    worker: Some(worker),
                    after: self.total,
                    stage: TimeoutStage::Running,
                }))
            }
        }
    }
}
