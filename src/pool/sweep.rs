//! Background upkeep: expiring idle sessions.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::shared::Shared;
use crate::worker::WorkerId;

pub(super) fn end_session(shared: &Shared, id: &str, worker: WorkerId, alive: bool) {
    shared.dispatcher.session_ended(worker);
    if alive {
        if let Some(conn) = shared.dispatcher.connection(worker) {
            conn.close_session(id);
        }
    }
}

pub(super) async fn sweep_sessions(shared: Arc<Shared>) {
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
