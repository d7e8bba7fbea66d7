//! A supervised pool of Python workers: startup, supervision, selection, queueing,
//! session affinity and graceful shutdown. The pool knows nothing about gRPC, nor
//! whether it serves the legacy or the new backend.
//!
//! # Layout
//! - this file: the [`Pool`] handle: start, calls, sessions, status, shutdown.
//! - `request`: [`PoolRequest`] and [`PoolResponse`].
//! - `admission`: checking a request, then queueing and session affinity until a
//!   worker slot is leased.
//! - `call`: a call in flight ([`PoolStream`]) and how its errors read.
//! - `status`: each slot's life cycle and the [`PoolStatus`] snapshot.
//! - `shared`: the state shared by the handle, the supervisors and the calls.
//! - `sweep`: background expiry of idle sessions.
//! - [`config`]: validated settings.
//! - `dispatch`: request slots per worker and the bounded wait queue.
//! - [`select`]: the pure choice of a worker.
//! - [`sessions`]: which worker holds each session.
//! - [`restart`]: backoff and crash-loop decisions.
//! - `supervisor`: one task per slot that runs, watches and replaces a worker.

mod admission;
mod call;
pub mod config;
mod dispatch;
mod error;
mod request;
pub mod restart;
pub mod select;
pub mod sessions;
mod shared;
mod status;
mod supervisor;
mod sweep;

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The workers' spawn settings, shared with [`crate::worker`] (which owns the type).
pub use crate::worker::WorkerCommand;
pub use call::PoolStream;
pub use config::{InvalidPoolConfig, PoolConfig};
pub use error::{ExhaustedReason, PoolError, TimeoutStage};
pub use request::{PoolRequest, PoolResponse};
pub use select::Target;
pub use sessions::{AffinityMode, SessionInfo, SessionTable, UnknownAffinityMode};
pub use shared::PoolObserver;
pub use status::{PoolStatus, SlotState, WorkerStatus};
pub use supervisor::{ExitReason, StopReason};

use dispatch::Dispatcher;
use shared::{Commands, NoObserver, Shared};
use status::SlotInfo;
use sweep::{end_session, sweep_sessions};

use crate::worker::{CommandInfo, ReplyMode, WorkerId};

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
        let spec = config
            .worker
            .clone()
            .resolve(config.max_frame_bytes, config.worker_concurrency)
            .await
            .map_err(|e| PoolError::Unavailable(format!("pool {}: {e}", config.name)))?;
        tracing::info!(pool = %config.name, python = %spec.python.display(), size = config.size, adapter = %spec.command.adapter, runtime = %spec.command.runtime_dir.display(), "starting pool");
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
