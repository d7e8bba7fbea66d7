//! `pitboss.v1.Admin`: status and the rollout controls, behind a bearer token.
//!
//! With a token configured, every admin call needs `authorization: Bearer <token>`:
//! a missing or wrong token is `UNAUTHENTICATED` (gRPC's code for credentials that
//! are not valid; `PERMISSION_DENIED` is for a known caller without the right). Without one,
//! only the read-only calls are served, so a fresh install can be inspected but not
//! changed by anyone who can reach the (loopback) admin port.
//!
//! Under mTLS with `tls.admin.allow_read` or `allow_write` set, the client's identity
//! decides instead of the token ([`authorize_call`]): a writer may make every call, a
//! reader only the read-only ones, anyone else nothing (PERMISSION_DENIED).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::admin_server::Admin;
use super::{duration, pb, Edge};
use crate::rollout::flags::{Action, Change, Mode, UnknownAction, UnknownMode};
use crate::rollout::{InvalidPercent, Percent};
use crate::tls::{AdminAllowlists, AdminGrant, ClientIdentity, PeerInfo};

/// The verified client identity of a call that came over mTLS.
fn identity_of<T>(req: &Request<T>) -> Option<&ClientIdentity> {
    PeerInfo::of(req.extensions()).and_then(|p| p.identity.as_deref())
}

/// Compares in constant time for equal lengths, so the time taken does not tell an
/// attacker how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The authorization decision, pure.
pub fn authorize(token: Option<&str>, header: Option<&str>, mutating: bool) -> Result<(), Status> {
    let Some(token) = token else {
        if mutating {
            return Err(Status::failed_precondition(
                "the admin API is read-only: no admin token is configured; set \
                 PITBOSS_ADMIN_TOKEN (or rollout.admin_token_file) and restart pitboss",
            ));
        }
        return Ok(());
    };
    let Some(header) = header else {
        return Err(Status::unauthenticated(
            "missing admin token: send the metadata `authorization: Bearer <token>`",
        ));
    };
    let given = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .unwrap_or(header)
        .trim();
    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "wrong admin token: the bearer token sent is not the one pitboss was given \
             (PITBOSS_ADMIN_TOKEN or rollout.admin_token_file)",
        ))
    }
}

/// The decision for one call, pure: the identity when admin allowlists are set,
/// else the token ([`authorize`]).
pub fn authorize_call(
    allow: &AdminAllowlists,
    identity: Option<&ClientIdentity>,
    token: Option<&str>,
    header: Option<&str>,
    mutating: bool,
) -> Result<(), Status> {
    let who = || {
        identity
            .map(|i| format!("client identity {i}"))
            .unwrap_or_else(|| "a client without a certificate".into())
    };
    match allow.grant(identity) {
        AdminGrant::TokenDecides => authorize(token, header, mutating),
        AdminGrant::Write => Ok(()),
        AdminGrant::Read if !mutating => Ok(()),
        AdminGrant::Read => Err(Status::permission_denied(format!(
            "{} may only read: changes need an identity in tls.admin.allow_write",
            who()
        ))),
        AdminGrant::Nothing => Err(Status::permission_denied(format!(
            "{} is not in tls.admin.allow_read or tls.admin.allow_write",
            who()
        ))),
    }
}

/// The Admin service.
#[derive(Clone)]
pub struct AdminService(pub Arc<Edge>);

impl AdminService {
    fn check<T>(&self, req: &Request<T>, mutating: bool) -> Result<(), Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let identity = identity_of(req);
        let r = authorize_call(
            &self.0.admin_allow,
            identity,
            self.0.admin_token.as_deref(),
            header,
            mutating,
        );
        if r.is_err() {
            super::access::count_denied("admin");
        }
        r
    }

    fn rollout_msg(&self) -> pb::Rollout {
        let edge = &self.0;
        let f = edge.rollout().flags.get();
        let c = &edge.rollout().counters;
        let backends = edge
            .backends()
            .map(|b| {
                let s = edge.rollout().stats(b.role);
                let ms = |d: Option<std::time::Duration>| {
                    d.map(|d| d.as_secs_f64() * 1000.0).unwrap_or(f64::NAN)
                };
                pb::BackendStats {
                    backend: b.role.as_str().into(),
                    target: b.describe.clone(),
                    requests: s.requests,
                    errors: s.errors,
                    error_rate: s.error_rate().unwrap_or(f64::NAN),
                    p50_ms: ms(s.p50),
                    p99_ms: ms(s.p99),
                    window: Some(duration(s.window)),
                    errors_by_class: s
                        .by_class
                        .iter()
                        .map(|(k, v)| (k.to_string(), *v))
                        .collect(),
                    breaker: match b.breaker.state() {
                        crate::resilience::BreakerState::Closed => "closed",
                        crate::resilience::BreakerState::HalfOpen => "half_open",
                        crate::resilience::BreakerState::Open => "open",
                    }
                    .into(),
                }
            })
            .collect();
        let rollout = edge.rollout();
        let analysis = rollout.analysis();
        pb::Rollout {
            revision: rollout.flags.revision(),
            store: rollout.store.describe(),
            store_up: rollout.store.up(),
            steps: f
                .promotion
                .steps
                .iter()
                .map(|s| match s.at {
                    crate::rollout::promotion::StepAt::Shadow => "shadow".to_string(),
                    crate::rollout::promotion::StepAt::Percent(p) => p.as_f64().to_string(),
                })
                .collect(),
            step: crate::rollout::promotion::step_number(&f) as u32,
            promotion: analysis.promotion,
            analysis: analysis.scope,
            promotions: c.promotions.load(Ordering::Relaxed),
            step_started_at: f.status.step_started_at.clone(),
            pause_at: f.promotion.pause_at,
            mode: f.mode.as_str().into(),
            percent: f.percent.0.as_f64(),
            state: f.status.state.as_str().into(),
            reason: f.status.reason.clone(),
            effective_percent: f.effective_percent().as_f64(),
            commands: f.commands.iter().cloned().collect(),
            changed_at: f.status.changed_at.clone(),
            changed_by: f.status.changed_by.clone(),
            flags_file: edge
                .rollout()
                .flags
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            has_new: edge.split.new_backend().is_some(),
            backends,
            shadow_matches: c.shadow_match.load(Ordering::Relaxed),
            shadow_mismatches: c.shadow_mismatch.load(Ordering::Relaxed),
            shadow_errors: c.shadow_error.load(Ordering::Relaxed),
            fallbacks: c.fallbacks.load(Ordering::Relaxed),
            rollbacks: c.rollbacks.load(Ordering::Relaxed),
        }
    }
}

/// A `SetRolloutRequest` that is not a valid change: which field, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidChange {
    #[error(transparent)]
    Mode(#[from] UnknownMode),
    #[error(transparent)]
    Percent(#[from] InvalidPercent),
    #[error(transparent)]
    Action(#[from] UnknownAction),
    #[error("nothing to change: give a mode, a percent (0 to 100), commands or an action")]
    Nothing,
}

/// Turns a `SetRolloutRequest` into a change, checking every field.
pub fn parse_change(r: &pb::SetRolloutRequest) -> Result<Change, InvalidChange> {
    let mode = if r.mode.is_empty() {
        None
    } else {
        Some(Mode::parse(&r.mode)?)
    };
    let percent = if r.percent < 0.0 {
        None
    } else {
        Some(Percent::from_f64(r.percent)?)
    };
    let action = Action::parse(&r.action)?;
    let commands = if r.set_commands {
        let set: std::collections::BTreeSet<String> = r
            .commands
            .iter()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect();
        Some(set)
    } else {
        None
    };
    if mode.is_none() && percent.is_none() && action.is_none() && commands.is_none() {
        return Err(InvalidChange::Nothing);
    }
    Ok(Change {
        mode,
        percent,
        commands,
        action,
    })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        self.check(&req, false)?;
        let edge = &self.0;
        let mut pools = Vec::new();
        let mut sessions = 0;
        for b in edge.backends() {
            match b.pool() {
                Some(pool) => {
                    let st = pool.status();
                    sessions += st.sessions as u64;
                    let workers = st
                        .workers
                        .iter()
                        .map(|w| pb::WorkerStatus {
                            id: w.worker.map(|w| w.to_string()).unwrap_or_default(),
                            slot: w.slot as u32,
                            pid: w.pid.unwrap_or(0),
                            state: if w.ejected {
                                "ejected".into()
                            } else {
                                w.state.as_str().into()
                            },
                            in_flight: w.in_flight,
                            requests_served: w.served,
                            restarts: w.restarts,
                            rss_bytes: w.rss_bytes.unwrap_or(0),
                            sessions: w.sessions as u64,
                            last_exit: w.last_exit.clone().unwrap_or_default(),
                            uptime: w.uptime.map(duration),
                        })
                        .collect();
                    pools.push(pb::PoolStatus {
                        backend: b.role.as_str().into(),
                        adapter: pool.config().worker.adapter.clone(),
                        size: st.size as u32,
                        ready: st.ready as u32,
                        degraded: st.degraded,
                        queue_depth: st.queue_depth as u32,
                        sessions: st.sessions as u64,
                        workers,
                    });
                }
                None => pools.push(pb::PoolStatus {
                    backend: b.role.as_str().into(),
                    adapter: format!("grpc upstream {}", b.describe),
                    ..Default::default()
                }),
            }
        }
        let (_, new_sessions) = edge.split.pinned_sessions();
        if edge.split.new_backend().is_some_and(|b| b.pool().is_none()) {
            sessions += new_sessions as u64;
        }
        Ok(Response::new(pb::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            instance_id: edge.instance_id.clone(),
            uptime: Some(duration(edge.started.elapsed())),
            pools,
            sessions,
            serving: edge.split.legacy().ready() && !edge.draining.load(Ordering::Acquire),
        }))
    }

    async fn get_rollout(
        &self,
        req: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.check(&req, false)?;
        Ok(Response::new(self.rollout_msg()))
    }

    async fn set_rollout(
        &self,
        req: Request<pb::SetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.check(&req, true)?;
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        // The audit trail names the certificate's identity too, under mTLS.
        let peer = match identity_of(&req) {
            Some(id) => format!("{peer} [{id}]"),
            None => peer,
        };
        let r = req.into_inner();
        let change = parse_change(&r).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if self.0.split.new_backend().is_none() && change.action != Some(Action::Rollback) {
            let wants_new = change.mode.is_some_and(|m| m != Mode::Off)
                || change.percent.is_some_and(|p| p != Percent::ZERO);
            if wants_new {
                return Err(Status::failed_precondition(
                    "no new backend is configured ([backends.new] kind is \"none\"): \
                     nothing to send traffic to",
                ));
            }
        }
        let actor = if r.actor.is_empty() {
            format!("admin@{peer}")
        } else {
            format!("{}@{peer}", r.actor)
        };
        let expected = (r.expected_revision > 0).then_some(r.expected_revision);
        self.0
            .rollout()
            .change(&change, &actor, expected)
            .await
            .map_err(|e| crate::grpc::status::rollout_change_status(&e))?;
        Ok(Response::new(self.rollout_msg()))
    }

    async fn get_rollout_history(
        &self,
        req: Request<pb::GetRolloutHistoryRequest>,
    ) -> Result<Response<pb::RolloutHistory>, Status> {
        self.check(&req, false)?;
        let limit = match req.get_ref().limit {
            0 => 20,
            n => n.min(1000) as usize,
        };
        let records = self
            .0
            .rollout()
            .store
            .history(limit)
            .await
            .map_err(|e| crate::grpc::status::store_status(&e))?;
        Ok(Response::new(pb::RolloutHistory {
            changes: records
                .into_iter()
                .map(|r| pb::RolloutChange {
                    at: r.at,
                    actor: r.actor,
                    action: r.action,
                    reason: r.reason,
                    before: r.before,
                    after: r.after,
                    instance: r.instance,
                    revision: r.revision,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_required_and_compared_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        let t = Some("s3cret");
        assert_eq!(
            authorize(t, None, false).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            authorize(t, Some("Bearer nope"), true).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(authorize(t, Some("Bearer s3cret"), true).is_ok());
        // Without a token: reads only.
        assert!(authorize(None, None, false).is_ok());
        assert_eq!(
            authorize(None, Some("Bearer x"), true).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[test]
    fn under_admin_allowlists_the_identity_replaces_the_token() {
        let list = |p: &str| crate::tls::Allowlist::new(&[p.to_string()]);
        let allow = AdminAllowlists {
            read: list("spiffe://prod/monitoring/*"),
            write: list("spiffe://prod/ops"),
        };
        let id = |u: &str| ClientIdentity {
            uris: vec![u.into()],
            dns: vec![],
        };
        let (ops, mon, other) = (
            id("spiffe://prod/ops"),
            id("spiffe://prod/monitoring/x"),
            id("spiffe://prod/shop"),
        );
        let t = Some("s3cret");
        assert!(authorize_call(&allow, Some(&ops), t, None, true).is_ok());
        assert!(authorize_call(&allow, Some(&mon), t, None, false).is_ok());
        let e = authorize_call(&allow, Some(&mon), t, Some("Bearer s3cret"), true).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("allow_write"), "{}", e.message());
        let e = authorize_call(&allow, Some(&other), t, Some("Bearer s3cret"), false).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message().contains("spiffe://prod/shop"),
            "{}",
            e.message()
        );
        // Without allowlists the token decides, certificate or not.
        let none = AdminAllowlists::default();
        assert!(authorize_call(&none, Some(&other), t, Some("Bearer s3cret"), true).is_ok());
        assert_eq!(
            authorize_call(&none, Some(&ops), t, None, false)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn set_requests_are_validated() {
        let mut r = pb::SetRolloutRequest {
            percent: -1.0,
            ..Default::default()
        };
        let err = parse_change(&r).unwrap_err();
        assert_eq!(err, InvalidChange::Nothing);
        assert!(err.to_string().contains("nothing to change"));
        r.percent = 150.0;
        assert_eq!(
            parse_change(&r),
            Err(InvalidChange::Percent(InvalidPercent::OutOfRange(150.0)))
        );
        r.percent = 12.5;
        r.mode = "sideways".into();
        let err = parse_change(&r).unwrap_err();
        assert_eq!(err, InvalidChange::Mode(UnknownMode("sideways".into())));
        assert!(err.to_string().contains("unknown mode"));
        r.mode = "canary".into();
        r.action = "resume".into();
        let c = parse_change(&r).unwrap();
        assert_eq!(c.mode, Some(Mode::Canary));
        assert_eq!(c.action, Some(Action::Resume));
    }
}
