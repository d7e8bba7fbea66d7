//! One supervisor task per pool slot: start a worker, watch it, replace it.
//!
//! The life of one worker is a small state machine ([`Phase`]):
//!
//! ```text
//! Serving ──recycle/shutdown──> Draining ──idle or drain timeout──> AskedToExit
//!    AskedToExit ──term_grace──> Terminated (SIGTERM) ──term_grace──> SIGKILL
//! any phase ──process exits──> done; ──kill requested / heartbeat missed──> SIGKILL
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::restart::RestartTracker;
use super::shared::Shared;
use super::status::SlotState;
use crate::worker::{
    self, describe_exit, rss_bytes, Connection, KillReason, Process, WorkerError, WorkerId,
};

/// How long a worker that closed its stdout has to exit before it counts as a live
/// worker that closed its channel (and is killed).
const STDOUT_EOF_GRACE: Duration = Duration::from_millis(500);

/// Why a worker is stopped on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    RecycleRequests,
    /// Ejected too often as an outlier: alive but misbehaving.
    Replaced,
    RecycleLifetime,
    RecycleMemory,
    Shutdown,
}

/// Why a worker's process ended, as reported in status, logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// It exited (or was killed) on its own.
    Crashed(String),
    /// It missed heartbeats.
    Heartbeat,
    /// A cancelled request did not stop within the grace period.
    CancelTimeout,
    Protocol(String),
    StdoutClosed,
    Stopped(StopReason),
}

impl ExitReason {
    /// A bounded label: crash, heartbeat, timeout, protocol, recycle_requests,
    /// recycle_ttl, recycle_memory or shutdown.
    pub fn label(&self) -> &'static str {
        match self {
            ExitReason::Crashed(_) | ExitReason::StdoutClosed => "crash",
            ExitReason::Heartbeat => "heartbeat",
            ExitReason::CancelTimeout => "timeout",
            ExitReason::Protocol(_) => "protocol",
            ExitReason::Stopped(StopReason::RecycleRequests) => "recycle_requests",
            ExitReason::Stopped(StopReason::Replaced) => "outlier",
            ExitReason::Stopped(StopReason::RecycleLifetime) => "recycle_ttl",
            ExitReason::Stopped(StopReason::RecycleMemory) => "recycle_memory",
            ExitReason::Stopped(StopReason::Shutdown) => "shutdown",
        }
    }

    fn planned(&self) -> bool {
        matches!(self, ExitReason::Stopped(_))
    }

    /// The error for requests still in flight when the process went away.
    fn error_for_pending(&self, worker: WorkerId) -> WorkerError {
        match self {
            ExitReason::Protocol(detail) => WorkerError::Protocol {
                worker,
                detail: detail.clone(),
            },
            other => WorkerError::Exited {
                worker,
                reason: other.to_string(),
                sent: true,
            },
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Crashed(status) => write!(f, "exited unexpectedly ({status})"),
            ExitReason::Heartbeat => f.write_str("was killed after missing heartbeats"),
            ExitReason::CancelTimeout => {
                f.write_str("was killed: a cancelled request did not stop within the grace period")
            }
            ExitReason::Protocol(d) => write!(f, "was killed after a protocol violation: {d}"),
            ExitReason::StdoutClosed => f.write_str("was killed: it closed its stdout"),
            ExitReason::Stopped(r) => {
                write!(f, "was stopped ({})", ExitReason::Stopped(*r).label())
            }
        }
    }
}

impl From<KillReason> for ExitReason {
    fn from(k: KillReason) -> Self {
        match k {
            KillReason::Protocol(d) => ExitReason::Protocol(d),
            KillReason::StdoutClosed => ExitReason::StdoutClosed,
            KillReason::CancelTimeout => ExitReason::CancelTimeout,
        }
    }
}

/// Where a running worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// No new requests; waiting for in-flight ones until `until`.
    Draining {
        reason: StopReason,
        until: Instant,
    },
    /// SHUTDOWN sent; SIGTERM at `until`.
    AskedToExit {
        reason: StopReason,
        until: Instant,
    },
    /// SIGTERM sent; SIGKILL at `until`.
    Terminated {
        reason: StopReason,
        until: Instant,
    },
}

impl Phase {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Serving => None,
            Phase::Draining { until, .. }
            | Phase::AskedToExit { until, .. }
            | Phase::Terminated { until, .. } => Some(*until),
        }
    }

    fn stop_reason(&self) -> Option<StopReason> {
        match self {
            Phase::Serving => None,
            Phase::Draining { reason, .. }
            | Phase::AskedToExit { reason, .. }
            | Phase::Terminated { reason, .. } => Some(*reason),
        }
    }
}

/// Runs one slot until the pool stops.
pub(crate) async fn supervise(shared: Arc<Shared>, slot: usize) {
    let mut tracker = RestartTracker::new(shared.config.restart.clone());
    loop {
        if shared.stop.is_cancelled() {
            break;
        }
        let id = shared.next_worker_id();
        shared.update_slot(slot, |s| {
            s.state = SlotState::Starting;
            s.worker = Some(id);
            s.pid = None;
            s.rss_bytes = None;
        });
        let started = tokio::select! {
            r = worker::start(&shared.spec, id, shared.config.startup_timeout) => r,
            _ = shared.stop.cancelled() => break,
        };
        let (reason, uptime) = match started {
            Err(e) => {
                tracing::warn!(pool = %shared.config.name, slot, worker = %id, "worker failed to start: {e}");
                (
                    ExitReason::Crashed(format!("failed to start: {e}")),
                    Duration::ZERO,
                )
            }
            Ok((conn, process)) => {
                shared.learn_commands(conn.ready_info());
                let began = Instant::now();
                let reason = run_worker(&shared, slot, conn, process).await;
                (reason, began.elapsed())
            }
        };
        shared.events.worker_exited(&shared.config.name, &reason);
        if reason == ExitReason::Stopped(StopReason::Shutdown) {
            break;
        }
        let decision = if reason.planned() {
            tracker.on_planned_exit()
        } else {
            tracker.on_crash(Instant::now(), uptime, rand::random::<f64>())
        };
        if decision.degraded {
            tracing::error!(
                pool = %shared.config.name, slot,
                "crash loop: more than {} restarts within {:?}; pool degraded, retrying every {:?}",
                shared.config.restart.max_restarts, shared.config.restart.window, decision.delay
            );
        }
        let retry_at = Instant::now() + decision.delay;
        shared.update_slot(slot, |s| {
            s.state = SlotState::BackingOff;
            s.pid = None;
            s.worker = None;
            s.restarts += 1;
            s.last_exit = Some(reason.to_string());
            s.tracker_snapshot = Some(tracker.clone());
            s.retry_at = Some(retry_at);
        });
        if !decision.delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep_until(retry_at) => {}
                _ = shared.stop.cancelled() => break,
            }
        }
    }
    shared.update_slot(slot, |s| {
        s.state = SlotState::Stopped;
        s.pid = None;
        s.worker = None;
    });
}

/// Serves with one worker until its process is gone; returns why.
async fn run_worker(
    shared: &Arc<Shared>,
    slot: usize,
    conn: Connection,
    mut process: Process,
) -> ExitReason {
    let cfg = &shared.config;
    let id = conn.id();
    let pid = process.pid;
    let recycle_after = if cfg.max_requests == 0 {
        0
    } else {
        cfg.max_requests + rand::random_range(0..=cfg.max_requests_jitter)
    };
    let signals = shared
        .dispatcher
        .add(conn.clone(), cfg.worker_concurrency, recycle_after);
    let started = Instant::now();
    shared.update_slot(slot, |s| {
        s.state = SlotState::Ready;
        s.pid = Some(pid);
        s.started = Some(started);
        s.retry_at = None;
    });

    let mut phase = Phase::Serving;
    let mut tick = tokio::time::interval(cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);

    let reason = loop {
        let escalate_at = phase.deadline();
        tokio::select! {
            status = process.child.wait() => {
                let status = status.map(|s| describe_exit(&s)).unwrap_or_else(|e| e.to_string());
                break match phase.stop_reason() {
                    Some(r) => ExitReason::Stopped(r),
                    None => ExitReason::Crashed(status),
                };
            }
            kill = conn.kill_requested() => {
                // Stdout reaches EOF a moment before an exiting process can be reaped:
                // give it that moment, so a crash is reported with its exit status.
                if kill == KillReason::StdoutClosed {
                    if let Ok(Ok(status)) = tokio::time::timeout(STDOUT_EOF_GRACE, process.child.wait()).await {
                        break match phase.stop_reason() {
                            Some(r) => ExitReason::Stopped(r),
                            None => ExitReason::Crashed(describe_exit(&status)),
                        };
                    }
                }
                process.kill_group();
                let _ = process.child.wait().await;
                break kill.into();
            }
            _ = tick.tick() => {
                if matches!(phase, Phase::Serving | Phase::Draining { .. })
                    && conn.last_pong().elapsed() > cfg.heartbeat_timeout
                {
                    tracing::warn!(pool = %cfg.name, worker = %id, pid, "no heartbeat for {:?}; killing", cfg.heartbeat_timeout);
                    process.kill_group();
                    let _ = process.child.wait().await;
                    break ExitReason::Heartbeat;
                }
                seq += 1;
                conn.ping(seq);
                let rss = rss_bytes(pid);
                shared.update_slot(slot, |s| s.rss_bytes = rss);
                if phase == Phase::Serving {
                    if let (Some(max), Some(rss)) = (cfg.max_rss_bytes, rss) {
                        if rss > max {
                            tracing::info!(pool = %cfg.name, worker = %id, rss, max, "recycling: memory limit");
                            phase = begin_drain(shared, slot, &conn, StopReason::RecycleMemory);
                        }
                    }
                }
                if phase == Phase::Serving && cfg.max_lifetime.is_some_and(|l| started.elapsed() >= l) {
                    tracing::info!(pool = %cfg.name, worker = %id, "recycling: maximum lifetime");
                    phase = begin_drain(shared, slot, &conn, StopReason::RecycleLifetime);
                }
            }
            _ = signals.recycle.notified(), if phase == Phase::Serving => {
                let reason = if shared.dispatcher.replace_requested(id) {
                    tracing::warn!(pool = %cfg.name, worker = %id, "replacing an outlier worker");
                    StopReason::Replaced
                } else {
                    tracing::info!(pool = %cfg.name, worker = %id, "recycling: served {recycle_after} requests");
                    StopReason::RecycleRequests
                };
                phase = begin_drain(shared, slot, &conn, reason);
            }
            _ = signals.idle.notified(), if matches!(phase, Phase::Draining { .. }) => {
                phase = ask_to_exit(shared, &conn, phase);
            }
            _ = shared.stop.cancelled(), if phase == Phase::Serving => {
                phase = begin_drain(shared, slot, &conn, StopReason::Shutdown);
            }
            _ = tokio::time::sleep_until(escalate_at.unwrap_or(far)), if escalate_at.is_some() => {
                match phase {
                    Phase::Serving => {}
                    Phase::Draining { .. } => {
                        tracing::warn!(pool = %cfg.name, worker = %id, "drain timeout with {} requests in flight", conn.in_flight());
                        phase = ask_to_exit(shared, &conn, phase);
                    }
                    Phase::AskedToExit { reason, .. } => {
                        tracing::warn!(pool = %cfg.name, worker = %id, pid, "worker did not exit; sending SIGTERM");
                        process.signal_group(libc::SIGTERM);
                        phase = Phase::Terminated { reason, until: Instant::now() + cfg.term_grace };
                    }
                    Phase::Terminated { reason, .. } => {
                        tracing::warn!(pool = %cfg.name, worker = %id, pid, "worker ignored SIGTERM; sending SIGKILL");
                        process.kill_group();
                        let _ = process.child.wait().await;
                        break ExitReason::Stopped(reason);
                    }
                }
            }
        }
    };
    // Whatever the worker spawned dies with it.
    process.signal_group(libc::SIGKILL);
    shared.dispatcher.remove(id);
    let lost = shared.sessions.mark_lost(id);
    conn.fail_all(reason.error_for_pending(id));
    let log = format!("worker {} (reason: {})", reason, reason.label());
    if reason.planned() {
        tracing::info!(pool = %cfg.name, worker = %id, pid, sessions_lost = lost, "{log}");
    } else {
        tracing::warn!(pool = %cfg.name, worker = %id, pid, sessions_lost = lost, "{log}");
    }
    reason
}

fn begin_drain(shared: &Shared, slot: usize, conn: &Connection, reason: StopReason) -> Phase {
    shared.update_slot(slot, |s| s.state = SlotState::Draining);
    let phase = Phase::Draining {
        reason,
        until: Instant::now() + shared.config.drain_timeout,
    };
    if shared.dispatcher.drain(conn.id()) {
        ask_to_exit(shared, conn, phase)
    } else {
        phase
    }
}

fn ask_to_exit(shared: &Shared, conn: &Connection, phase: Phase) -> Phase {
    let reason = phase.stop_reason().unwrap_or(StopReason::Shutdown);
    conn.shutdown();
    Phase::AskedToExit {
        reason,
        until: Instant::now() + shared.config.term_grace,
    }
}
