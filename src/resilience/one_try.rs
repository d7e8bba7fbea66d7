//! One try of an [`Attempt`], as a tower service: the one adapter between the retry
//! layer and whatever runs a call (a pool here, an upstream in `backend`).
//!
//! [`TryService`] owns what every kind of backend shares: the per-try deadline
//! ([`Attempt::try_deadline`]), the class of a failed try ([`class_of_try`]: a
//! deadline of ours is `worker_timeout`), and the attempts count. A [`OneTry`] only
//! runs the request and says how its errors are classified.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tower::Service;

use super::class::{ErrorClass, ExceptionRules};
use super::error::CallError;
use super::outlier::OutlierDetector;
use super::retry::{class_of_try, Attempt, Failed, Served};
use crate::pool::{Pool, PoolResponse};

/// What one try returns on success.
#[derive(Debug, Clone)]
pub struct Reply {
    pub response: PoolResponse,
    /// The worker as a remote backend named it.
    pub remote_worker: Option<String>,
    /// A `grpc_proxy`'s answer metadata (see [`Served::wire`]).
    pub wire: Option<Arc<crate::wire::WireReply>>,
}

/// Something that runs one try of a call before a deadline: a pool, an upstream.
pub trait OneTry: Clone + Send + Sync + 'static {
    /// Runs `attempt` once. Its request's `deadline` is already the try's deadline
    /// (`try_deadline`), which the try must not outlive.
    fn run(
        &self,
        attempt: Attempt,
        try_deadline: Instant,
    ) -> BoxFuture<'static, Result<Reply, CallError>>;

    /// The class of a failed try, before the per-try deadline is taken into account.
    fn classify(&self, error: &CallError) -> ErrorClass;

    /// Hears each try's outcome, classified (e.g. for outlier ejection).
    fn tried(&self, _outcome: Result<&Served, &Failed>) {}
}

/// Any [`OneTry`] as a tower service of attempts; see the module docs.
#[derive(Clone)]
pub struct TryService<T> {
    target: T,
    per_try_timeout: Option<Duration>,
}

// === impl TryService ===

impl<T: OneTry> TryService<T> {
    pub fn with_target(target: T, per_try_timeout: Option<Duration>) -> Self {
        TryService {
            target,
            per_try_timeout,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.target
    }
}

impl<T: OneTry> Service<Attempt> for TryService<T> {
    type Response = Served;
    type Error = Failed;
    type Future = BoxFuture<'static, Result<Served, Failed>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        // A pool queues and sheds load itself; an upstream's client is lazy.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut attempt: Attempt) -> Self::Future {
        let target = self.target.clone();
        let try_deadline = attempt.try_deadline(self.per_try_timeout);
        let (number, deadline) = (attempt.number, attempt.deadline);
        attempt.request.deadline = Some(try_deadline);
        let run = target.run(attempt, try_deadline);
        Box::pin(async move {
            let outcome = match run.await {
                Ok(reply) => Ok(Served {
                    response: reply.response,
                    attempts: number,
                    remote_worker: reply.remote_worker,
                    wire: reply.wire,
                }),
                Err(error) => Err(Failed {
                    class: class_of_try(target.classify(&error), try_deadline, deadline),
                    error,
                    attempts: number,
                    budget_exhausted: false,
                }),
            };
            target.tried(outcome.as_ref());
            outcome
        })
    }
}

// === impl PoolTry ===

/// A pool's try: the pool's own admission and per-request deadline, its exception
/// rules, and outlier ejection of the worker that served or failed it.
#[derive(Clone)]
pub struct PoolTry {
    pool: Pool,
    rules: Arc<ExceptionRules>,
    outliers: Arc<OutlierDetector>,
}

/// The pool as a tower service of attempts.
pub type PoolService = TryService<PoolTry>;

impl TryService<PoolTry> {
    pub fn new(
        pool: Pool,
        rules: Arc<ExceptionRules>,
        per_try_timeout: Option<Duration>,
        outliers: Arc<OutlierDetector>,
    ) -> Self {
        TryService::with_target(
            PoolTry {
                pool,
                rules,
                outliers,
            },
            per_try_timeout,
        )
    }
}

impl OneTry for PoolTry {
    fn run(
        &self,
        attempt: Attempt,
        _try_deadline: Instant,
    ) -> BoxFuture<'static, Result<Reply, CallError>> {
        // The pool enforces the request's deadline (queued or running) itself.
        let pool = self.pool.clone();
        Box::pin(async move {
            let response = pool
                .execute(attempt.request)
                .await
                .map_err(CallError::Pool)?;
            Ok(Reply {
                response,
                remote_worker: None,
                wire: None,
            })
        })
    }

    fn classify(&self, error: &CallError) -> ErrorClass {
        error.class(&self.rules)
    }

    fn tried(&self, outcome: Result<&Served, &Failed>) {
        match outcome {
            Ok(served) => self
                .outliers
                .apply(&self.pool, served.response.worker, None),
            Err(failed) => {
                if let Some(worker) = failed.error.worker() {
                    self.outliers.apply(&self.pool, worker, Some(failed.class));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pool::{PoolError, PoolRequest, TimeoutStage};
    use crate::worker::WorkerId;

    /// What the fake saw: a run's request deadline on success, and each outcome it
    /// heard (the attempts or the class).
    type Heard = (Option<Instant>, Result<u32, ErrorClass>);

    /// An in-memory backend: succeeds after `takes`, unless the try's deadline comes
    /// first, which it reports as the pool does (a `Timeout`).
    #[derive(Clone)]
    struct Fake {
        takes: Duration,
        seen: Arc<Mutex<Vec<Heard>>>,
    }

    impl OneTry for Fake {
        fn run(
            &self,
            attempt: Attempt,
            try_deadline: Instant,
        ) -> BoxFuture<'static, Result<Reply, CallError>> {
            let (seen, takes) = (self.seen.clone(), self.takes);
            Box::pin(async move {
                assert_eq!(attempt.request.deadline, Some(try_deadline));
                let started = Instant::now();
                if tokio::time::timeout_at(try_deadline, tokio::time::sleep(takes))
                    .await
                    .is_err()
                {
                    return Err(PoolError::Timeout {
                        worker: Some(WorkerId(3)),
                        after: started.elapsed(),
                        stage: TimeoutStage::Running,
                    }
                    .into());
                }
                seen.lock().unwrap().push((attempt.request.deadline, Ok(0)));
                Ok(Reply {
                    response: PoolResponse {
                        payload: "ok".into(),
                        content_type: String::new(),
                        worker: WorkerId(3),
                    },
                    remote_worker: Some("remote/w3".into()),
                    wire: None,
                })
            })
        }

        fn classify(&self, error: &CallError) -> ErrorClass {
            error.class(&Default::default())
        }

        fn tried(&self, outcome: Result<&Served, &Failed>) {
            let heard = outcome.map(|s| s.attempts).map_err(|f| f.class);
            self.seen.lock().unwrap().push((None, heard));
        }
    }

    fn service(takes: Duration, per_try: Option<Duration>) -> TryService<Fake> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        TryService::with_target(Fake { takes, seen }, per_try)
    }

    fn attempt(number: u32, deadline: Duration) -> Attempt {
        Attempt {
            request: PoolRequest::new("echo", "x"),
            idempotent: true,
            number,
            deadline: Instant::now() + deadline,
        }
    }

    /// Runs try `number` of a call that takes 5 s, with `left` before the client's
    /// deadline: how it failed, how long it took, and what the target heard.
    async fn fail(number: u32, left: u64, per_try: Option<u64>) -> (Failed, Duration, Vec<Heard>) {
        let secs = Duration::from_secs;
        let mut s = service(secs(5), per_try.map(secs));
        let start = Instant::now();
        let failed = s.call(attempt(number, secs(left))).await.unwrap_err();
        let heard = s.get_ref().seen.lock().unwrap().clone();
        (failed, Instant::now() - start, heard)
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_ends_at_its_own_deadline_and_is_then_a_worker_timeout() {
        let (failed, took, heard) = fail(2, 10, Some(1)).await;
        assert_eq!(took, Duration::from_secs(1));
        assert_eq!(failed.class, ErrorClass::WorkerTimeout);
        assert_eq!(failed.attempts, 2);
        assert!(!failed.budget_exhausted);
        assert_eq!(
            heard,
            [(None, Err(ErrorClass::WorkerTimeout))],
            "heard, classified"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_clients_deadline_stays_a_deadline_exceeded() {
        // The per-try timeout is longer than what is left (or there is none): the
        // client's deadline ends the try, so it is the client's (not retried), not ours.
        for per_try in [Some(3), None] {
            let (failed, took, _) = fail(1, 2, per_try).await;
            assert_eq!(took, Duration::from_secs(2), "{per_try:?}");
            assert_eq!(failed.class, ErrorClass::DeadlineExceeded, "{per_try:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_keeps_the_reply_and_counts_the_attempt() {
        let mut s = service(Duration::from_millis(10), Some(Duration::from_secs(1)));
        let a = attempt(3, Duration::from_secs(10));
        let try_deadline = Instant::now() + Duration::from_secs(1);
        let served = s.call(a).await.unwrap();
        assert_eq!(served.attempts, 3);
        assert_eq!(served.worker_label(), "remote/w3");
        let seen = s.get_ref().seen.lock().unwrap().clone();
        assert_eq!(seen, [(Some(try_deadline), Ok(0)), (None, Ok(3))]);
    }
}
