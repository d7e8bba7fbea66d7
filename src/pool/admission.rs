//! Admission: checking a request, then finding it a worker slot (queueing, session
//! affinity) and starting the call on it.

use std::time::Duration;

use tokio::time::Instant;

use super::call::PendingCall;
use super::dispatch::Lease;
use super::shared::Commands;
use super::{AffinityMode, ExhaustedReason, Pool, PoolError, PoolRequest, Target, TimeoutStage};
use crate::worker::{frame, CallRequest, ReplyMode};

impl Pool {
    pub(super) async fn start_call(
        &self,
        req: PoolRequest,
        mode: ReplyMode,
    ) -> Result<(PendingCall, Instant, Duration), PoolError> {
        let shared = self.shared();
        let now = Instant::now();
        let deadline = req.deadline.unwrap_or(now + shared.config.default_timeout);
        let total = deadline.saturating_duration_since(now);
        let commands = shared.commands();
        check_request(&req, &commands, mode, shared.config.max_frame_bytes)?;
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
        let lease = self.acquire(&req, deadline, total).await?;
        let conn = lease.connection().clone();
        let worker = conn.id();
        let call = conn
            .call(
                CallRequest {
                    command: req.command.clone(),
                    session_id: req.session_id.clone(),
                    content_type: req.content_type,
                    timeout: Some(deadline.saturating_duration_since(Instant::now())),
                    context: req.context,
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

    /// Finds a slot for the request, honouring session affinity. `total` is the time
    /// the call had from its arrival, which a queue timeout reports.
    pub(super) async fn acquire(
        &self,
        req: &PoolRequest,
        deadline: Instant,
        total: Duration,
    ) -> Result<Lease, PoolError> {
        let shared = self.shared();
        let queue_deadline = deadline.min(Instant::now() + shared.config.queue_timeout);
        let queued_timeout = |e: PoolError| match e {
            PoolError::PoolExhausted {
                reason: ExhaustedReason::QueueTimeout,
            } if queue_deadline >= deadline => PoolError::Timeout {
                worker: None,
                after: total,
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
}

/// Whether the pool can take `req` at all, before a worker is chosen: a named command
/// that the workers registered (once they have told), called in a mode it supports,
/// in a frame the codec can carry within `max_frame_bytes`.
fn check_request(
    req: &PoolRequest,
    commands: &Commands,
    mode: ReplyMode,
    max_frame_bytes: usize,
) -> Result<(), PoolError> {
    if req.command.is_empty() {
        return Err(PoolError::InvalidRequest(
            "command must not be empty".into(),
        ));
    }
    if !commands.list.is_empty() {
        match commands.by_name.get(&req.command) {
            None => {
                return Err(PoolError::UnknownCommand {
                    command: req.command.clone(),
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
    let frame_len = frame::request_frame_len(
        &req.command,
        req.session_id.as_deref().unwrap_or(""),
        &req.content_type,
        req.context.as_ref(),
        req.payload.len(),
    );
    if frame_len > max_frame_bytes {
        return Err(PoolError::RequestTooLarge {
            len: frame_len,
            max: max_frame_bytes,
            limit: "pool.max_frame_bytes",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::CommandInfo;

    fn command(name: &str, streaming: bool) -> CommandInfo {
        CommandInfo {
            name: name.into(),
            streaming,
            is_async: false,
            doc: String::new(),
        }
    }

    const BIG: usize = 1 << 20;

    #[test]
    fn an_empty_command_is_refused_even_before_the_workers_register() {
        let req = PoolRequest::new("", "{}");
        let err = check_request(&req, &Commands::default(), ReplyMode::Unary, BIG).unwrap_err();
        assert!(matches!(err, PoolError::InvalidRequest(m) if m.contains("empty")));
    }

    #[test]
    fn any_command_passes_until_the_workers_register_their_list() {
        let req = PoolRequest::new("anything", "{}");
        assert!(check_request(&req, &Commands::default(), ReplyMode::Unary, BIG).is_ok());
    }

    #[test]
    fn an_unknown_command_names_the_known_ones() {
        let cmds = Commands::new(vec![command("echo", false), command("count", true)]);
        let err = check_request(
            &PoolRequest::new("nope", "{}"),
            &cmds,
            ReplyMode::Stream,
            BIG,
        )
        .unwrap_err();
        match err {
            PoolError::UnknownCommand { command, known } => {
                assert_eq!(command, "nope");
                assert_eq!(known, vec!["echo".to_string(), "count".to_string()]);
            }
            other => panic!("expected UnknownCommand, got {other:?}"),
        }
    }

    #[test]
    fn a_streaming_command_is_refused_as_unary_but_not_as_a_stream() {
        let cmds = Commands::new(vec![command("echo", false), command("count", true)]);
        let count = PoolRequest::new("count", "{}");
        let err = check_request(&count, &cmds, ReplyMode::Unary, BIG).unwrap_err();
        assert!(matches!(err, PoolError::InvalidRequest(m) if m.contains("ExecuteStream")));
        assert!(check_request(&count, &cmds, ReplyMode::Stream, BIG).is_ok());
        // A unary command may be streamed: it yields one chunk.
        let echo = PoolRequest::new("echo", "{}");
        assert!(check_request(&echo, &cmds, ReplyMode::Stream, BIG).is_ok());
        assert!(check_request(&echo, &cmds, ReplyMode::Unary, BIG).is_ok());
    }

    #[test]
    fn a_content_type_the_codec_cannot_carry_is_the_callers_error() {
        let mut req = PoolRequest::new("echo", "{}");
        req.content_type = "x".repeat(usize::from(u16::MAX) + 1);
        let err =
            check_request(&req, &Commands::default(), ReplyMode::Unary, usize::MAX).unwrap_err();
        assert!(matches!(err, PoolError::InvalidRequest(m) if m.contains("content type")));
    }

    #[test]
    fn the_frame_limit_counts_the_whole_request_frame() {
        let req = PoolRequest::new("echo", vec![0u8; 100]).session("s1");
        let len = frame::request_frame_len("echo", "s1", "application/json", None, 100);
        assert!(check_request(&req, &Commands::default(), ReplyMode::Unary, len).is_ok());
        match check_request(&req, &Commands::default(), ReplyMode::Unary, len - 1) {
            Err(PoolError::RequestTooLarge { len: l, max, limit }) => {
                assert_eq!((l, max, limit), (len, len - 1, "pool.max_frame_bytes"));
            }
            other => panic!("expected RequestTooLarge, got {other:?}"),
        }
    }
}
