//! A `pool` backend: a local pool of Python workers, as a [`Target`].

use std::collections::BTreeMap;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Chunks, Role, Target};
use crate::pool::{Pool, PoolRequest, PoolStream, SessionInfo};
use crate::proto as pb;
use crate::resilience::CallError;

#[tonic::async_trait]
impl Target for Pool {
    fn pool(&self) -> Option<&Pool> {
        Some(self)
    }

    fn ready(&self) -> bool {
        self.status().ready > 0
    }

    fn serves(&self, command: &str) -> bool {
        self.knows_command(command)
    }

    fn lacks_session(&self, id: &str) -> bool {
        Pool::get_session(self, id).is_err()
    }

    /// The pool enforces the request's own deadline (set by the backend).
    async fn open_stream(
        &self,
        mut req: PoolRequest,
        deadline: Instant,
    ) -> Result<Box<dyn Chunks>, CallError> {
        req.deadline = Some(deadline);
        let stream = self.execute_stream(req).await?;
        Ok(Box::new(stream))
    }

    async fn create_session(
        &self,
        role: Role,
        id: String,
        metadata: BTreeMap<String, String>,
        _deadline: Instant,
    ) -> Result<pb::Session, CallError> {
        let info = Pool::create_session(self, Some(id), metadata)?;
        Ok(session_msg(role, info))
    }

    async fn get_session(
        &self,
        role: Role,
        id: &str,
        _deadline: Instant,
    ) -> Result<pb::Session, CallError> {
        let info = Pool::get_session(self, id)?;
        Ok(session_msg(role, info))
    }

    async fn close_session(&self, id: &str, _deadline: Instant) -> Result<(), CallError> {
        Ok(Pool::close_session(self, id)?)
    }

    async fn commands(&self) -> Vec<pb::CommandInfo> {
        Pool::commands(self)
            .into_iter()
            .map(|c| pb::CommandInfo {
                name: c.name,
                streaming: c.streaming,
                is_async: c.is_async,
                doc: c.doc,
                backends: vec![],
            })
            .collect()
    }

    async fn shutdown(&self) {
        Pool::shutdown(self).await
    }
}

#[tonic::async_trait]
impl Chunks for PoolStream {
    fn worker(&self) -> String {
        PoolStream::worker(self)
            .map(|w| w.to_string())
            .unwrap_or_default()
    }

    async fn next(&mut self) -> Option<Result<(Bytes, String), CallError>> {
        let next = PoolStream::next(self).await?;
        Some(
            next.map(|c| (c.payload, c.content_type))
                .map_err(CallError::Pool),
        )
    }
}

fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn session_msg(role: Role, s: SessionInfo) -> pb::Session {
    pb::Session {
        session_id: s.session_id,
        backend: role.as_str().into(),
        worker_id: s.worker.to_string(),
        created_at: Some(timestamp(s.created)),
        expires_at: Some(timestamp(s.expires)),
        metadata: s
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}
