//! `grpc.health.v1.Health` as the clients that *watch* it need it.
//!
//! tonic-health answers `Check` and `Watch` from the statuses [`crate::server`] keeps
//! current. Two things its `Watch` does not do, which this wrapper adds:
//!
//! * **A drain ends every watch.** A `Watch` stream never ends by itself, and
//!   client-side health checking (grpc-go's `healthCheckConfig`, grpc-java's health
//!   checking load balancers) keeps one open on every connection with no deadline.
//!   The graceful shutdown waits for every open call, so each such client held every
//!   shutdown for the whole `server.shutdown_grace` (30 s by default) and made it end
//!   with "in-flight calls did not finish". Once the drain starts, each watcher gets
//!   `NOT_SERVING` (if that was not its last message) and then `UNAVAILABLE`, which
//!   these clients take as "reconnect elsewhere".
//! * **An unknown service is `SERVICE_UNKNOWN`, and the watch stays open**, as the
//!   health protocol says (tonic-health fails it with NOT_FOUND, which a client
//!   reads as "health checking is broken").

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// The health service for the Bridge listener: `reporter`'s statuses, with every
/// watch ended once `drain` is cancelled.
pub fn service(reporter: HealthReporter, drain: CancellationToken) -> HealthServer<DrainingHealth> {
    HealthServer::new(DrainingHealth {
        inner: HealthService::from_health_reporter(reporter),
        drain,
    })
}

pub struct DrainingHealth {
    inner: HealthService,
    drain: CancellationToken,
}

type Watch = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

/// What a watcher is told when the drain starts, after its last message.
fn drain_messages(last: Option<ServingStatus>) -> Vec<Result<HealthCheckResponse, Status>> {
    let mut out = Vec::with_capacity(2);
    if last != Some(ServingStatus::NotServing) {
        out.push(Ok(response(ServingStatus::NotServing)));
    }
    out.push(Err(Status::unavailable(
        "pitboss is shutting down: watch another instance",
    )));
    out
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = Watch;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Watch>, Status> {
        let drain = self.drain.clone();
        let statuses: Watch = match self.inner.watch(request).await {
            Ok(watch) => Box::pin(watch.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound => {
                let unknown = response(ServingStatus::ServiceUnknown);
                Box::pin(tokio_stream::once(Ok(unknown)).chain(tokio_stream::pending()))
            }
            Err(status) => return Err(status),
        };
        let stream = futures_util::stream::unfold(
            (Some(statuses), None::<ServingStatus>, Vec::new()),
            move |(statuses, last, mut tail)| {
                let drain = drain.clone();
                async move {
                    let Some(mut statuses) = statuses else {
                        // Draining: what drain_messages said, then the end.
                        return (!tail.is_empty()).then(|| {
                            let item = tail.remove(0);
                            (item, (None, last, tail))
                        });
                    };
                    tokio::select! {
                        biased;
                        item = statuses.next() => {
                            let item = item?;
                            let last = match &item {
                                Ok(r) => ServingStatus::try_from(r.status).ok(),
                                Err(_) => last,
                            };
                            Some((item, (Some(statuses), last, tail)))
                        }
                        _ = drain.cancelled() => {
                            let mut tail = drain_messages(last);
                            let item = tail.remove(0);
                            Some((item, (None, last, tail)))
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses(items: &[Result<HealthCheckResponse, Status>]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                Ok(r) => format!("{:?}", ServingStatus::try_from(r.status).unwrap()),
                Err(s) => format!("{:?}", s.code()),
            })
            .collect()
    }

    #[test]
    fn a_drain_says_not_serving_once_then_unavailable() {
        assert_eq!(
            statuses(&drain_messages(Some(ServingStatus::Serving))),
            ["NotServing", "Unavailable"]
        );
        assert_eq!(
            statuses(&drain_messages(None)),
            ["NotServing", "Unavailable"]
        );
        assert_eq!(
            statuses(&drain_messages(Some(ServingStatus::NotServing))),
            ["Unavailable"]
        );
    }

    /// Over a real reporter: the watch follows the status, then ends with the drain;
    /// an unknown service is SERVICE_UNKNOWN and stays open until the drain.
    #[tokio::test]
    async fn watches_follow_the_status_and_end_with_the_drain() {
        let (reporter, _) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("svc", tonic_health::ServingStatus::Serving)
            .await;
        let drain = CancellationToken::new();
        let health = DrainingHealth {
            inner: HealthService::from_health_reporter(reporter.clone()),
            drain: drain.clone(),
        };
        let watch = |name: &str| {
            Request::new(HealthCheckRequest {
                service: name.into(),
            })
        };
        let mut known = health.watch(watch("svc")).await.unwrap().into_inner();
        let mut unknown = health.watch(watch("nope")).await.unwrap().into_inner();
        let next = |s: Option<Result<HealthCheckResponse, Status>>| statuses(&[s.unwrap()]);
        assert_eq!(next(known.next().await), ["Serving"]);
        assert_eq!(next(unknown.next().await), ["ServiceUnknown"]);
        reporter
            .set_service_status("svc", tonic_health::ServingStatus::NotServing)
            .await;
        assert_eq!(next(known.next().await), ["NotServing"]);
        drain.cancel();
        assert_eq!(next(known.next().await), ["Unavailable"]);
        assert!(known.next().await.is_none());
        assert_eq!(next(unknown.next().await), ["NotServing"]);
        assert_eq!(next(unknown.next().await), ["Unavailable"]);
        assert!(unknown.next().await.is_none());
    }
}
