//! Runs pitboss: the pool, the Bridge listener (with health and reflection) and the
//! Admin listener, and shuts them down in order.
//!
//! Shutdown: health goes NOT_SERVING and new calls get UNAVAILABLE at once; in-flight
//! calls get `shutdown_grace` to finish; then the workers are stopped (SHUTDOWN frame,
//! SIGTERM, SIGKILL). The stages are one token tree (`Shutdown`), so stopping a
//! stage stops every earlier one too.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::backend::Backend;
use crate::config::BackendKind;
use crate::config::Config;
use crate::grpc::pb::admin_server::AdminServer;
use crate::grpc::pb::bridge_server::BridgeServer;
use crate::grpc::{pb, AdminService, BridgeService, Edge};
use crate::pool::{Pool, PoolObserver};
use crate::rollout::controller::Rollout;
use crate::rollout::sessions::SessionRoutes;
use crate::rollout::split::Split;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Pool(#[from] crate::pool::PoolError),
    #[error(transparent)]
    Backend(#[from] crate::backend::StartError),
    #[error("reflection: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] crate::rollout::store::StoreError),
    #[error(transparent)]
    Transparent(#[from] crate::grpc::transparent::TransparentError),
    /// A listener's TLS material (boxed: its variants carry several paths and names).
    #[error(transparent)]
    Tls(Box<crate::tls::TlsError>),
}

impl From<crate::tls::TlsError> for ServerError {
    fn from(e: crate::tls::TlsError) -> ServerError {
        ServerError::Tls(Box::new(e))
    }
}

const BRIDGE_SERVICE: &str = "pitboss.v1.Bridge";
const ADMIN_SERVICE: &str = "pitboss.v1.Admin";

/// A running pitboss.
pub struct RunningServer {
    pub bridge_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The HTTP listener: `/metrics`, `/healthz`, `/readyz`.
    pub metrics_addr: SocketAddr,
    edge: Arc<Edge>,
    stop: Shutdown,
    http_server: JoinHandle<()>,
    health: tonic_health::server::HealthReporter,
    servers: Vec<JoinHandle<()>>,
    grace: Duration,
}

/// The stages of shutdown as one token tree, in the order [`RunningServer::shutdown`]
/// runs them: health tracking, then the gRPC listeners (after which in-flight calls
/// drain), then the background tasks (rollout checks, pruning, command refresh), then
/// the HTTP listener last, so `/readyz` says "draining" until the end. Each stage's
/// token is the parent of the stages before it: stopping a stage also stops every
/// earlier one, so no order of calls can leave an earlier stage running, and
/// cancelling `http` (the root) stops everything.
struct Shutdown {
    http: CancellationToken,
    background: CancellationToken,
    listeners: CancellationToken,
    health: CancellationToken,
}

impl Shutdown {
    fn new() -> Shutdown {
        let http = CancellationToken::new();
        let background = http.child_token();
        let listeners = background.child_token();
        let health = listeners.child_token();
        Shutdown {
            http,
            background,
            listeners,
            health,
        }
    }
}

impl Drop for Shutdown {
    /// A server dropped without `shutdown` (a test that panicked, a failed start) does
    /// not leave its tasks running.
    fn drop(&mut self) {
        self.http.cancel();
    }
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
        let metrics_listener = TcpListener::bind(config.server.metrics_listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.server.metrics_listen,
                source,
            })?;
        let metrics_addr = metrics_listener
            .local_addr()
            .map_err(|source| ServerError::Bind {
                addr: config.server.metrics_listen,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| ServerError::Bind {
                addr: config.server.admin_listen,
                source,
            })?;

        // The recorder first: what the start records (the TLS expiry gauges, the
        // upstreams' TLS, the pools' first events) is lost if it comes later.
        if crate::telemetry::prometheus().is_none() {
            tracing::warn!("another metrics recorder is installed: /metrics will be empty");
        }
        // TLS material is checked before any worker starts: a bad certificate stops
        // the start at once, with the setting and file.
        let tls = crate::tls::Listeners::from_config(&config);
        let tls_live = TlsLive::start(&tls)?;
        warn_about_exposure(&config, &tls);

        let observer: Arc<dyn PoolObserver> = Arc::new(crate::telemetry::RestartCounter);
        let legacy_cfg = config.backend("legacy")?;
        let new_cfg = config.backend("new")?;
        let admin_token = config.admin_token()?;
        let instance_id = instance_id();
        let (flags, store) = crate::rollout::store::open(&config, &instance_id).await?;
        let observers = |role: &'static str| crate::backend::Observers {
            pool: observer.clone(),
            retries: Arc::new(crate::telemetry::RetryCounter(role)),
        };
        let legacy = Backend::start(&legacy_cfg, observers("legacy")).await?;
        let new = match new_cfg.kind {
            BackendKind::None => None,
            _ => Some(Backend::start(&new_cfg, observers("new")).await?),
        };
        let stop = Shutdown::new();
        store.watch(flags.clone(), stop.background.clone());
        let rollout = Rollout::with_store(flags, store, new.is_some(), &instance_id);
        rollout.spawn_checker(config.rollout.check_interval.0, stop.background.clone());
        let split = Split::new(
            legacy,
            new,
            rollout,
            SessionRoutes::new(config.sessions.ttl.0),
            config.server.max_message_bytes.0 as usize,
        );
        let edge = Arc::new(Edge {
            split: Arc::new(split),
            include_tracebacks: config.server.include_tracebacks,
            draining: Default::default(),
            started: tokio::time::Instant::now(),
            instance_header: instance_id.parse().ok(),
            instance_id,
            admin_token,
            admin_allow: tls.admin_allow.clone(),
            commands: Default::default(),
        });
        // The user's own services (issue 17), served next to the Bridge.
        let catalog = crate::grpc::transparent::load_catalog(&config, edge.split.legacy()).await?;
        metrics::gauge!(
            "pitboss_build_info",
            "version" => env!("CARGO_PKG_VERSION"),
            "instance_id" => edge.instance_id.clone()
        )
        .set(1.0);
        {
            let pools: Vec<&str> = edge
                .backends()
                .filter(|b| b.pool().is_some())
                .map(|b| b.role.as_str())
                .collect();
            let all: Vec<&str> = edge.backends().map(|b| b.role.as_str()).collect();
            crate::telemetry::register_known_counters(
                &pools,
                &all,
                edge.rollout().flags.path().is_some(),
            );
            crate::grpc::admin_record::register();
        }
        spawn_session_pruning(edge.clone(), stop.background.clone());
        spawn_command_refresh(edge.clone(), stop.background.clone());
        if edge.admin_token.is_none() {
            tracing::warn!(
                "no admin token is configured: the admin API serves read-only calls only"
            );
        }

        let health = tonic_health::server::HealthReporter::new();
        // Its watches end when the drain starts (they would hold the shutdown).
        let health_service = crate::grpc::health::service(health.clone(), stop.health.clone());
        health
            .set_not_serving::<BridgeServer<BridgeService>>()
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        tokio::spawn(track_health(
            edge.clone(),
            health.clone(),
            stop.health.clone(),
        ));

        let (bridge_reflection_v1, bridge_reflection_v1alpha) = reflection(
            &["pitboss.v1.Bridge", "grpc.health.v1.Health"],
            catalog.as_deref(),
        )?;
        let (admin_reflection_v1, admin_reflection_v1alpha) =
            reflection(&["pitboss.v1.Admin"], None)?;

        // Compressed requests are accepted (grpc-go and grpc-java clients are often set
        // to gzip); the limit applies to the inflated message. Answers go out
        // uncompressed, which every client reads, so no call pays for compressing.
        use tonic::codec::CompressionEncoding::{Deflate, Gzip};
        let max = config.server.max_message_bytes.0 as usize;
        let bridge = BridgeServer::new(BridgeService(edge.clone()))
            .accept_compressed(Gzip)
            .accept_compressed(Deflate)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let admin = AdminServer::new(AdminService(edge.clone()))
            .accept_compressed(Gzip)
            .accept_compressed(Deflate)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);

        let mut bridge_routes = tonic::service::Routes::builder();
        bridge_routes
            .add_service(health_service)
            .add_service(bridge_reflection_v1)
            .add_service(bridge_reflection_v1alpha)
            .add_service(bridge);
        let mut bridge_routes = bridge_routes.routes();
        if let Some(catalog) = &catalog {
            bridge_routes = crate::grpc::transparent::TransparentService::new(
                edge.clone(),
                catalog.clone(),
                max,
            )
            .mount(bridge_routes);
        }

        let (e1, e2) = (edge.clone(), edge.clone());
        let (i1, i2, i3) = (edge.clone(), edge.clone(), edge.clone());
        let timeout_gate =
            crate::grpc::timeout_gate::TimeoutGateLayer::new(edge.clone(), catalog.clone());
        let s1 = stop.listeners.clone();
        let bridge_conns = Conns::new(bridge_listener, tls_live.bridge, "bridge", &tls, &s1);
        let bridge_gate = crate::grpc::access::BridgeGateLayer::new(tls.bridge_allow.clone());
        let http2 = (
            config.server.keepalive_interval.0,
            config.server.keepalive_timeout.0,
            // Validated to fit in 32 bits.
            config.server.max_header_list_bytes.0 as u32,
        );
        let bridge_task = tokio::spawn(async move {
            let router = http2_settings(Server::builder(), http2)
                .layer(message_limit_layer(e1, max))
                .layer(tower::util::MapRequestLayer::new(
                    crate::grpc::deadline::stamp_arrival::<tonic::body::Body>,
                ))
                .layer(tower::util::MapRequestLayer::new(
                    crate::tls::accept::expose_addresses::<tonic::body::Body>,
                ))
                .layer(tower::util::MapRequestLayer::new(
                    crate::grpc::one_message::check_request(i1, max),
                ))
                .layer(bridge_gate)
                .layer(timeout_gate)
                .add_routes(bridge_routes.prepare());
            let r = match bridge_conns {
                Conns::Tls(conns) => {
                    router
                        .serve_with_incoming_shutdown(
                            crate::tls::accept::incoming(conns),
                            s1.cancelled_owned(),
                        )
                        .await
                }
                Conns::Plain(l) => {
                    router
                        .serve_with_incoming_shutdown(incoming(l), s1.cancelled_owned())
                        .await
                }
            };
            if let Err(e) = r {
                tracing::error!("bridge listener failed: {e}");
            }
        });
        let s2 = stop.listeners.clone();
        let admin_conns = Conns::new(admin_listener, tls_live.admin, "admin", &tls, &s2);
        let admin_task = tokio::spawn(async move {
            let router = http2_settings(Server::builder(), http2)
                .layer(crate::grpc::admin_record::AdminRecordLayer)
                .layer(message_limit_layer(e2, max))
                .layer(tower::util::MapRequestLayer::new(
                    crate::tls::accept::expose_addresses::<tonic::body::Body>,
                ))
                .layer(tower::util::MapRequestLayer::new(
                    crate::grpc::one_message::check_request(i2, max),
                ))
                .layer(crate::grpc::timeout_gate::TimeoutGateLayer::new(i3, None))
                .add_service(admin_reflection_v1)
                .add_service(admin_reflection_v1alpha)
                .add_service(admin);
            let r = match admin_conns {
                Conns::Tls(conns) => {
                    router
                        .serve_with_incoming_shutdown(
                            crate::tls::accept::incoming(conns),
                            s2.cancelled_owned(),
                        )
                        .await
                }
                Conns::Plain(l) => {
                    router
                        .serve_with_incoming_shutdown(incoming(l), s2.cancelled_owned())
                        .await
                }
            };
            if let Err(e) = r {
                tracing::error!("admin listener failed: {e}");
            }
        });
        // The HTTP listener outlives the gRPC ones during shutdown, so that /readyz
        // says "draining" (503) while in-flight calls finish.
        let s3 = stop.http.clone();
        let http = crate::telemetry::router(edge.clone());
        let metrics_conns = Conns::new(metrics_listener, tls_live.metrics, "metrics", &tls, &s3);
        let metrics_task = tokio::spawn(async move {
            let r = match metrics_conns {
                Conns::Tls(conns) => {
                    let l = crate::tls::accept::HttpListener::new(conns, metrics_addr);
                    axum::serve(l, http)
                        .with_graceful_shutdown(s3.cancelled_owned())
                        .await
                }
                Conns::Plain(l) => {
                    axum::serve(l, http)
                        .with_graceful_shutdown(s3.cancelled_owned())
                        .await
                }
            };
            if let Err(e) = r {
                tracing::error!("metrics listener failed: {e}");
            }
        });
        tracing::info!(%bridge_addr, %admin_addr, %metrics_addr, "pitboss listening");
        Ok(RunningServer {
            bridge_addr,
            admin_addr,
            metrics_addr,
            edge,
            stop,
            health,
            servers: vec![bridge_task, admin_task],
            http_server: metrics_task,
            grace: config.server.shutdown_grace.0,
        })
    }

    /// The legacy backend's pool (`None` when legacy is a grpc upstream).
    pub fn pool(&self) -> &Pool {
        self.edge
            .split
            .legacy()
            .pool()
            .expect("the legacy backend is a pool")
    }

    /// The new backend's pool, when it is one.
    pub fn new_pool(&self) -> Option<&Pool> {
        self.edge.split.new_backend().and_then(|b| b.pool())
    }

    pub fn edge(&self) -> &Arc<Edge> {
        &self.edge
    }

    /// Graceful shutdown; see the module docs for the order.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: refusing new calls, draining in-flight calls");
        self.edge.draining.store(true, Ordering::Release);
        self.stop.health.cancel();
        self.health
            .set_not_serving::<BridgeServer<BridgeService>>()
            .await;
        for service in ["", BRIDGE_SERVICE, ADMIN_SERVICE] {
            self.health
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        self.stop.listeners.cancel();
        let servers = futures_util::future::join_all(self.servers);
        if tokio::time::timeout(self.grace, servers).await.is_err() {
            tracing::warn!("in-flight calls did not finish within {:?}", self.grace);
        }
        self.stop.background.cancel();
        for b in self.edge.backends() {
            b.shutdown().await;
        }
        self.stop.http.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.http_server).await;
        tracing::info!("pitboss stopped");
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully. SIGHUP re-reads
    /// the flags file ([`RunningServer::reload_flags`]) and serves on. A second SIGTERM
    /// or SIGINT during the drain (a second Ctrl-C) exits at once, with 128 + the
    /// signal's number, as shells report a process killed by it: the calls still in
    /// flight fail, and the workers die with pitboss (their parent-death signal).
    /// `signals` are the handlers `pitboss serve` installed before starting
    /// ([`StopSignals::install`]); `None` installs them now.
    pub async fn run_until_signal(self, signals: Option<StopSignals>) {
        let Some(mut signals) = signals.or_else(StopSignals::install) else {
            // Without signal handlers we can still be stopped by SIGKILL; serve forever.
            return std::future::pending().await;
        };
        signals
            .next(|| {
                self.reload_flags();
            })
            .await;
        let drain = self.shutdown();
        tokio::pin!(drain);
        tokio::select! {
            () = &mut drain => {}
            signal = signals.next(|| {}) => {
                tracing::warn!(
                    "a second {} during the drain: exiting now, without waiting for the calls in flight",
                    signal.name()
                );
                std::process::exit(128 + signal as i32);
            }
        }
    }

    /// Re-reads the flags file now, as SIGHUP asks (`systemctl reload`, `kill -HUP`):
    /// for a file whose change the watcher cannot see (a file system without
    /// notifications) or an operator who wants it read at once. A file that does not
    /// validate is refused as on any reload (logged, counted, the flags in force
    /// stay). Returns whether the file was read and is valid; false without a flags
    /// file (the flags live in memory or in etcd, which pitboss watches).
    pub fn reload_flags(&self) -> bool {
        let rollout = self.edge.rollout();
        let flags = &rollout.flags;
        match flags.path() {
            Some(path) => {
                let valid = flags.reload();
                tracing::info!(file = %path.display(), valid, "SIGHUP: flags file re-read");
                valid
            }
            None => {
                tracing::info!(
                    store = %rollout.store.describe(),
                    "SIGHUP: no flags file to re-read"
                );
                false
            }
        }
    }
}

/// The signals that stop pitboss, numbered as the kernel numbers them.
#[derive(Debug, Clone, Copy)]
#[repr(i32)]
pub enum StopSignal {
    Sigterm = libc::SIGTERM,
    Sigint = libc::SIGINT,
}

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Sigterm => "SIGTERM",
            StopSignal::Sigint => "SIGINT",
        }
    }
}

/// The handlers of the signals `pitboss serve` answers: SIGTERM and SIGINT stop it,
/// SIGHUP re-reads the flags file. Installed before startup, so that neither signal
/// finds the kernel's default action while pitboss waits for etcd or for legacy's
/// reflection: SIGHUP's would kill pitboss, and a SIGTERM taken by a handler nobody
/// listens to would be lost. Once a handler is installed it stays for the process's
/// life (tokio never restores the default), so these are kept and reused.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// The handlers, or `None` when they cannot be installed.
    pub fn install() -> Option<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Some(StopSignals {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
        })
    }

    /// Waits for SIGTERM or SIGINT; calls `on_hangup` for each SIGHUP meanwhile.
    pub async fn next(&mut self, on_hangup: impl Fn()) -> StopSignal {
        let signal = loop {
            tokio::select! {
                _ = self.term.recv() => break StopSignal::Sigterm,
                _ = self.int.recv() => break StopSignal::Sigint,
                _ = self.hup.recv() => on_hangup(),
            }
        };
        tracing::info!("{} received", signal.name());
        signal
    }
}

/// Keeps grpc.health.v1 in step with readiness ([`crate::telemetry::readiness`]):
/// `pitboss.v1.Bridge` and the server as a whole ("") are SERVING while pitboss is
/// ready; `pitboss.v1.Admin` while it is not draining. Driven by the legacy pool's
/// change notifications, with a 250 ms tick as a backstop (breakers and flags change
/// without notifying).
async fn track_health(
    edge: Arc<Edge>,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut last = None;
    let never = tokio::sync::Notify::new();
    loop {
        let changed = match edge.split.legacy().pool() {
            Some(p) => p.changed(),
            None => never.notified(),
        };
        tokio::pin!(changed);
        changed.as_mut().enable();
        let ready = crate::telemetry::readiness_of(&*edge);
        let draining = edge.draining.load(Ordering::Acquire);
        let now = (ready.is_ok(), draining);
        if last != Some(now) {
            let status = |ok: bool| {
                if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                }
            };
            health
                .set_service_status(BRIDGE_SERVICE, status(now.0))
                .await;
            health.set_service_status("", status(now.0)).await;
            health
                .set_service_status(ADMIN_SERVICE, status(!draining))
                .await;
            match &ready {
                Ok(()) => tracing::info!(serving = true, "health changed"),
                Err(why) => tracing::info!(serving = false, reason = %why, "health changed"),
            }
            last = Some(now);
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Keeps the commands every backend registered (an upstream is asked over gRPC):
/// every second until some are known, then every ten.
fn spawn_command_refresh(edge: Arc<Edge>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let mut all = std::collections::HashSet::new();
            for b in edge.backends() {
                for c in b.commands().await {
                    all.insert(c.name);
                }
            }
            let pause = if all.is_empty() { 1 } else { 10 };
            edge.commands.set(all);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(pause)) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// A listener's connections: plain TCP, or TLS connections whose handshake
/// completed (accepted by [`crate::tls::accept`]).
enum Conns {
    Plain(TcpListener),
    Tls(tokio::sync::mpsc::Receiver<crate::tls::TlsConn>),
}

impl Conns {
    fn new(
        listener: TcpListener,
        config: Option<Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
        name: &str,
        tls: &crate::tls::Listeners,
        stop: &CancellationToken,
    ) -> Conns {
        match config {
            Some(c) => Conns::Tls(crate::tls::accept::spawn(
                listener,
                c,
                format!("tls.{name}"),
                tls.handshake_timeout,
                stop.clone(),
            )),
            None => Conns::Plain(listener),
        }
    }
}

/// The rustls configs of the listeners that have TLS, each kept current.
#[derive(Default)]
struct TlsLive {
    bridge: Option<Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
    admin: Option<Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
    metrics: Option<Arc<arc_swap::ArcSwap<rustls::ServerConfig>>>,
}

impl TlsLive {
    fn start(tls: &crate::tls::Listeners) -> Result<TlsLive, crate::tls::TlsError> {
        let start = |l: &Option<crate::tls::ListenerTls>| {
            l.as_ref()
                .map(|l| {
                    let (config, summary) = l.start(tls.reload_interval)?;
                    tracing::info!(
                        listener = l.name,
                        mtls = l.client_ca.is_some(),
                        certificate = %summary,
                        "TLS on"
                    );
                    Ok::<_, crate::tls::TlsError>(config)
                })
                .transpose()
        };
        Ok(TlsLive {
            bridge: start(&tls.bridge)?,
            admin: start(&tls.admin)?,
            metrics: start(&tls.metrics)?,
        })
    }
}

/// The admin API changes where production traffic goes: reachable from other hosts
/// without TLS, its token travels in clear text.
fn warn_about_exposure(config: &Config, tls: &crate::tls::Listeners) {
    let admin = config.server.admin_listen;
    if !admin.ip().is_loopback() && tls.admin.is_none() {
        tracing::warn!(
            %admin,
            "the admin listener is not on loopback and has neither TLS nor mTLS: its token \
             and every change travel in clear text; set tls.admin (docs/SECURITY.md) or bind \
             server.admin_listen to 127.0.0.1"
        );
    }
}

/// The HTTP/2 settings of `[server]` on a listener's builder: the keepalive pings
/// (`server.keepalive_*`) and the header list limit (`server.max_header_list_bytes`).
fn http2_settings(
    builder: Server,
    (interval, timeout, headers): (Duration, Duration, u32),
) -> Server {
    let builder = builder.http2_max_header_list_size(headers);
    if interval.is_zero() {
        return builder;
    }
    builder
        .http2_keepalive_interval(Some(interval))
        .http2_keepalive_timeout(Some(timeout))
}

/// Accepted connections with `TCP_NODELAY` set. tonic sets it only on listeners it
/// binds itself; without it, small responses wait for Nagle's algorithm and the
/// client's delayed ACK: about 40 ms at p99, measured.
pub fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}

/// tonic refuses a request message over `server.max_message_bytes` with OUT_OF_RANGE,
/// before pitboss sees it. This answers it the way pitboss answers any request over a
/// limit: RESOURCE_EXHAUSTED (the code gRPC itself uses for a message over the limit),
/// class `invalid_request`, naming the setting.
fn message_limit_layer(
    edge: Arc<Edge>,
    max: usize,
) -> tower::util::MapResponseLayer<
    impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone,
> {
    tower::util::MapResponseLayer::new(move |resp: http::Response<tonic::body::Body>| {
        let Some(len) = resp
            .extensions()
            .get::<tonic::Status>()
            .and_then(decoded_too_large)
        else {
            return resp;
        };
        let err = crate::pool::PoolError::RequestTooLarge {
            len,
            max,
            limit: "server.max_message_bytes",
        };
        let ctx = crate::grpc::status::ErrorContext {
            backend: crate::backend::Role::Legacy.as_str(),
            attempts: 1,
            instance: &edge.instance_id,
        };
        let class = crate::resilience::ErrorClass::InvalidRequest;
        crate::grpc::status::to_status(&err.into(), class, edge.include_tracebacks, ctx).into_http()
    })
}

/// The length tonic found, when `status` is its refusal of a request message over the
/// limit ("Error, decoded message length too large: found N bytes, ...").
fn decoded_too_large(status: &tonic::Status) -> Option<usize> {
    if status.code() != tonic::Code::OutOfRange {
        return None;
    }
    let rest = status
        .message()
        .strip_prefix("Error, decoded message length too large: found ")?;
    rest.split(' ').next()?.parse().ok()
}

/// Once a minute, drops the session pins whose session its pool no longer has, and
/// pins idle past their TTL.
fn spawn_session_pruning(edge: Arc<Edge>, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(60)) => {
                    edge.split.prune_sessions(tokio::time::Instant::now());
                }
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// A random id for this process, reported in status and response metadata.
fn instance_id() -> String {
    std::env::var("PITBOSS_INSTANCE_ID")
        .unwrap_or_else(|_| format!("{:016x}", rand::random::<u64>()))
}

/// gRPC reflection for one listener, in both versions: `v1`, and `v1alpha`, which
/// grpcio-reflection's client, older grpcurl and Postman still speak. Each port lists
/// only the services it serves (the Bridge port does not serve Admin), and the Bridge
/// port the transparent services too when pitboss has their descriptors.
#[allow(clippy::type_complexity)]
fn reflection(
    services: &[&str],
    transparent: Option<&crate::grpc::transparent::Catalog>,
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    ServerError,
> {
    const REFLECTION_SERVICES: [&str; 2] = [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        for name in services.iter().chain(REFLECTION_SERVICES.iter()) {
            b = b.with_service_name(*name);
        }
        if let Some(c) = transparent {
            if let Some(d) = c.descriptors() {
                b = b.register_file_descriptor_set(d.set.clone());
                for name in c.services() {
                    b = b.with_service_name(name.as_str());
                }
            }
        }
        b
    };
    let err = ServerError::Reflection;
    Ok((
        builder().build_v1().map_err(err)?,
        builder().build_v1alpha().map_err(err)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shutdown_stage_stops_the_earlier_stages_and_no_later_one() {
        let stop = Shutdown::new();
        stop.listeners.cancel();
        assert!(
            stop.health.is_cancelled(),
            "health stops before the listeners"
        );
        assert!(!stop.background.is_cancelled());
        assert!(
            !stop.http.is_cancelled(),
            "/readyz keeps answering while calls drain"
        );
        stop.background.cancel();
        assert!(!stop.http.is_cancelled());
        let health = stop.health.clone();
        let http = stop.http.clone();
        drop(stop);
        assert!(
            http.is_cancelled() && health.is_cancelled(),
            "dropped: all stopped"
        );
    }
}
