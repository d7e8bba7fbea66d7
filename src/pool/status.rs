//! The pool's state as it reports it: each slot's life cycle and the status snapshot.

use std::time::Duration;

use tokio::time::Instant;

use super::restart::RestartTracker;
use super::Pool;
use crate::worker::WorkerId;

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
pub(super) struct SlotInfo {
    pub(super) state: SlotState,
    pub(super) worker: Option<WorkerId>,
    pub(super) pid: Option<u32>,
    pub(super) started: Option<Instant>,
    pub(super) restarts: u32,
    pub(super) last_exit: Option<String>,
    pub(super) rss_bytes: Option<u64>,
    pub(super) tracker_snapshot: Option<RestartTracker>,
    pub(super) retry_at: Option<Instant>,
    /// The first start attempt has finished (either way).
    pub(super) attempted: bool,
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

impl Pool {
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
}
