//! Runs pitboss: the pool, the Bridge listener (with health and reflection) and the
//! Admin listener, and shuts them down in order.
//!
//! Shutdown: health goes NOT_SERVING and new calls get UNAVAILABLE at once; in-flight
//! calls get `shutdown_grace` to finish; then the workers are stopped (SHUTDOWN frame,
//! SIGTERM, SIGKILL).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::grpc::pb::admin_server::AdminServer;
use crate::grpc::pb::bridge_server::BridgeServer;
use crate::grpc::{pb, AdminService, BridgeService, Edge};
use crate::pool::{Pool, PoolObserver};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Pool(#[from] crate::pool::PoolError),
    #[error("reflection: {0}")]
    Reflection(String),
}

const BRIDGE_SERVICE: &str = "pitboss.v1.Bridge";

struct Observer;
impl PoolObserver for Observer {}

/// A running pitboss.
pub struct RunningServer {
    pub bridge_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    edge: Arc<Edge>,
    stop_listeners: CancellationToken,
    stop_health: CancellationToken,
    health: tonic_health::server::HealthReporter,
    servers: Vec<JoinHandle<()>>,
    grace: Duration,
}

impl RunningServer {
    /// Binds the listeners (port 0 picks a free one) and starts serving at once;
    /// health says NOT_SERVING until a worker is ready.
    pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
        let bridge_listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.server.listen,
                source,
            })?;
        let admin_listener = TcpListener::bind(config.server.admin_listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.server.admin_listen,
                source,
            })?;
        let bridge_addr = bridge_listener
            .local_addr()
            .map_err(|source| ServerError::Bind {
                addr: config.server.listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| ServerError::Bind {
                addr: config.server.admin_listen,
                source,
            })?;

        let pool = Pool::launch(config.pool_config("legacy"), Arc::new(Observer)).await?;
        let retry_settings = config.retry_settings();
        let rules = config.exception_rules();
        let policy = crate::resilience::RetryPolicy::new(&retry_settings).map_err(|e| {
            ServerError::Pool(crate::pool::PoolError::InvalidRequest(format!(
                "retry: {e}"
            )))
        })?;
        let breaker = crate::resilience::Breaker::new("legacy", config.breaker_settings())
            .map_err(|e| {
                ServerError::Pool(crate::pool::PoolError::InvalidRequest(format!(
                    "circuit_breaker: {e}"
                )))
            })?;
        let guarded = tower::Layer::layer(
            &crate::resilience::BreakerLayer::new(breaker.clone()),
            crate::resilience::PoolService::new(
                pool.clone(),
                Arc::new(rules.clone()),
                retry_settings.per_try_timeout,
                Arc::new(crate::resilience::OutlierDetector::new(
                    config.outlier_settings(),
                )),
            ),
        );
        let retry = tower::retry::Retry::new(policy, guarded);
        let limit = match config.limits.max_concurrency {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n.min(tokio::sync::Semaphore::MAX_PERMITS as u64) as usize,
        };
        let stack = tower::ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(limit)
            .service(retry);
        let instance_id = instance_id();
        let edge = Arc::new(Edge {
            pool,
            include_tracebacks: config.server.include_tracebacks,
            rules,
            stack,
            breaker,
            draining: Default::default(),
            started: tokio::time::Instant::now(),
            instance_header: instance_id.parse().ok(),
            instance_id,
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_not_serving::<BridgeServer<BridgeService>>()
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let stop_health = CancellationToken::new();
        tokio::spawn(track_health(
            edge.clone(),
            health.clone(),
            stop_health.clone(),
        ));

        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;

        let max = config.server.max_message_bytes.0 as usize;
        let bridge = BridgeServer::new(BridgeService(edge.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let admin = AdminServer::new(AdminService(edge.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);

        let stop_listeners = CancellationToken::new();
        let s1 = stop_listeners.clone();
        let bridge_task = tokio::spawn(async move {
            let r = Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(bridge)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(bridge_listener),
                    s1.cancelled_owned(),
                )
                .await;
            if let Err(e) = r {
                tracing::error!("bridge listener failed: {e}");
            }
        });
        let s2 = stop_listeners.clone();
        let admin_task = tokio::spawn(async move {
            let r = Server::builder()
                .add_service(admin)
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(admin_listener),
                    s2.cancelled_owned(),
                )
                .await;
            if let Err(e) = r {
                tracing::error!("admin listener failed: {e}");
            }
        });
        tracing::info!(%bridge_addr, %admin_addr, "pitboss listening");
        Ok(RunningServer {
            bridge_addr,
            admin_addr,
            edge,
            stop_listeners,
            stop_health,
            health,
            servers: vec![bridge_task, admin_task],
            grace: config.server.shutdown_grace.0,
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.edge.pool
    }

    /// Graceful shutdown; see the module docs for the order.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: refusing new calls, draining in-flight calls");
        self.edge.draining.store(true, Ordering::Release);
        self.stop_health.cancel();
        self.health
            .set_not_serving::<BridgeServer<BridgeService>>()
            .await;
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.stop_listeners.cancel();
        let servers = futures_util::future::join_all(self.servers);
        if tokio::time::timeout(self.grace, servers).await.is_err() {
            tracing::warn!("in-flight calls did not finish within {:?}", self.grace);
        }
        self.edge.pool.shutdown().await;
        tracing::info!("pitboss stopped");
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        self.shutdown().await;
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can still be stopped by SIGKILL; serve forever.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Keeps grpc.health.v1 in step with the pool: SERVING while a worker is ready.
/// Driven by the pool's change notifications, with a slow tick as a backstop.
async fn track_health(
    edge: Arc<Edge>,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut last = None;
    loop {
        let changed = edge.pool.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let serving = edge.pool.status().ready > 0 && !edge.draining.load(Ordering::Acquire);
        if last != Some(serving) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(BRIDGE_SERVICE, status).await;
            health.set_service_status("", status).await;
            tracing::info!(serving, "health changed");
            last = Some(serving);
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// A random id for this process, reported in status and response metadata.
fn instance_id() -> String {
    std::env::var("PITBOSS_INSTANCE_ID")
        .unwrap_or_else(|_| format!("{:016x}", rand::random::<u64>()))
}
