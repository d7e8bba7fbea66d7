//! A call in flight on a worker: its unary reply or its stream of chunks, with the
//! errors explained in the pool's terms.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::shared::{Commands, Shared};
use super::{PoolError, PoolResponse, TimeoutStage};
use crate::worker::WorkerId;

/// A call in flight, with what is needed to explain its errors.
pub(super) struct PendingCall {
    pub(super) call: crate::worker::Call,
    pub(super) command: String,
    pub(super) commands: Arc<Commands>,
    pub(super) session: Option<(String, WorkerId)>,
    pub(super) shared: Arc<Shared>,
}

impl PendingCall {
    pub(super) fn worker(&self) -> WorkerId {
        self.call.worker()
    }

    pub(super) async fn reply(
        &mut self,
    ) -> Result<crate::worker::Reply, crate::worker::WorkerError> {
        self.call.reply().await
    }

    pub(super) fn map_error(&self, e: crate::worker::WorkerError) -> PoolError {
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
    pub(super) call: Option<PendingCall>,
    pub(super) deadline: Instant,
    pub(super) total: Duration,
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
