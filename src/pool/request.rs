//! What a caller sends to the pool and what it gets back.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::worker::{RequestContext, WorkerId};

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
    /// A transparent call's method and metadata: what a `grpc_proxy` backend forwards.
    /// A pool ignores it and runs `command` (the method's command) on `payload` (the
    /// request message's bytes).
    pub wire: Option<std::sync::Arc<crate::wire::WireCall>>,
    /// The call's request id and trace, this try's attempt and backend: what the
    /// adapter's `Request` shows and what a `grpc` upstream receives as metadata.
    /// `None` for calls pitboss makes itself (e.g. warm-up).
    pub context: Option<RequestContext>,
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
            wire: None,
            context: None,
        }
    }

    /// The name the rollout and the metrics know the call by: a transparent call's
    /// method (`/package.Service/Method`, whatever command it maps to), else the
    /// command.
    pub fn routing_name(&self) -> &str {
        match &self.wire {
            Some(w) => &w.method,
            None => &self.command,
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
