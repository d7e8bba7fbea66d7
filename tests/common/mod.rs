//! Helpers shared by the integration tests: pools of the real example adapters, a
//! server in process or the real binary on free ports, metrics scrapes, and process
//! checks through /proc.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pitboss::config::Config;
use pitboss::grpc::pb;
use pitboss::pool::{Pool, PoolConfig, PoolRequest, PoolResponse, WorkerCommand};
use pitboss::server::RunningServer;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

pub mod certs;
pub mod tls;

/// A client of `pitboss.v1.Bridge`.
pub type Client = pb::bridge_client::BridgeClient<Channel>;
/// A client of `pitboss.v1.Admin`.
pub type AdminClient = pb::admin_client::AdminClient<Channel>;

/// How long a server (in process or the binary) may take to start its workers.
const START_BOUND: Duration = Duration::from_secs(30);

pub fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=pitboss=debug`).
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

fn base(adapter: &str, size: usize) -> PoolConfig {
    init_tracing();
    let mut worker = WorkerCommand::demo(python_dir());
    worker.adapter = adapter.into();
    let mut c = PoolConfig::new("test", worker);
    c.size = size;
    c.startup_timeout = Duration::from_secs(30);
    c.heartbeat_interval = Duration::from_millis(200);
    c.heartbeat_timeout = Duration::from_secs(5);
    c.restart.backoff_base = Duration::from_millis(20);
    c.restart.jitter = 0.0;
    c
}

/// A pool of `python/examples/demo.py`.
pub fn demo(size: usize) -> PoolConfig {
    base("demo:adapter", size)
}

/// A pool of `python/examples/faults.py`.
pub fn faults(size: usize) -> PoolConfig {
    base("faults:adapter", size)
}

pub fn req(command: &str, payload: Value) -> PoolRequest {
    PoolRequest::new(command, serde_json::to_vec(&payload).unwrap())
}

pub fn json(r: &PoolResponse) -> Value {
    serde_json::from_slice(&r.payload).unwrap_or_else(|e| {
        panic!(
            "response is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&r.payload)
        )
    })
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// The live (not zombie) processes of process group `pgid`, from /proc: a worker is
/// the leader of its own group, so this is the worker, its reaper and whatever a
/// command started that did not leave the group.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // After the parenthesised name: state, ppid, pgrp.
            let mut f = stat.rsplit(')').next().unwrap_or("").split_whitespace();
            let state = f.next().unwrap_or("Z");
            let pgrp = f.nth(1).and_then(|g| g.parse::<u32>().ok());
            pgrp == Some(pgid) && !state.starts_with('Z') && !state.starts_with('X')
        })
        .collect()
}

/// [`eventually`] for a check that must wait for something (an RPC, a scrape).
pub async fn eventually_async<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` every 20 ms until it holds or `timeout` passes. Returns whether it held.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn kill(pid: u32, signal: i32) {
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// An `ExecuteRequest` for the gRPC tests.
pub fn exec(command: &str, payload: impl AsRef<[u8]>) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        command: command.into(),
        payload: payload.as_ref().to_vec().into(),
        ..Default::default()
    }
}

/// The same request, marked safe to run twice.
pub fn idempotent(req: pb::ExecuteRequest) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        idempotent: true,
        ..req
    }
}

/// Requests in flight over the whole pool.
pub fn in_flight(pool: &Pool) -> u32 {
    pool.status().workers.iter().map(|w| w.in_flight).sum()
}

/// A plain HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, body)
}

/// Every message of a stream, in order.
pub async fn collect<T>(mut stream: tonic::Streaming<T>) -> Vec<T> {
    let mut out = vec![];
    while let Some(m) = stream.message().await.unwrap() {
        out.push(m);
    }
    out
}

/// The value of the sample `name{labels}` with exactly these labels, if present.
pub fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: std::collections::BTreeMap<&str, &str> = labels.iter().copied().collect();
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let got: std::collections::BTreeMap<&str, &str> = rest
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once("=\"")?;
                    Some((k, v.trim_end_matches('"')))
                })
                .collect();
            (got == want).then(|| value.parse().ok()).flatten()
        })
}

/// The sum of every `name` sample whose labels include all of `labels`.
pub fn sum_of(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            let rest = rest.strip_suffix('}')?;
            let got: Vec<(&str, &str)> = rest
                .split("\",")
                .filter_map(|p| {
                    let (k, v) = p.split_once("=\"")?;
                    Some((k, v.trim_end_matches('"')))
                })
                .collect();
            let all = labels.iter().all(|want| got.contains(want));
            (n == name && all)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The `x-pitboss-error-class` trailer of a status, or "" when there is none.
pub fn error_class(s: &tonic::Status) -> &str {
    s.metadata()
        .get("x-pitboss-error-class")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A fresh, empty directory `pitboss-<tag>-<pid>` in the system's temp directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pitboss-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A config text whose three listeners take free ports on 127.0.0.1: `server` goes
/// into `[server]` (e.g. `shutdown_grace = "10s"`), `rest` after it.
pub fn on_free_ports(server: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         metrics_listen = \"127.0.0.1:0\"\n{server}\n{rest}"
    )
}

/// A `[pool]` section of `size` workers of an adapter of `python/examples` (e.g.
/// `faults:adapter`); more `[pool]` keys may follow it.
pub fn pool_section(adapter: &str, size: usize) -> String {
    format!(
        "[pool]\nadapter = \"{adapter}\"\nsize = {size}\npython_path = [\"{py}/examples\"]\n\
         runtime_dir = \"{py}\"\n",
        py = python_dir().display()
    )
}

/// The two backends most rollout tests use: `legacy` a pool of one `demo.py` worker
/// (`[pool]`), `new` a pool of one `demo_v2.py` worker with `new_env` (inline TOML
/// table entries, e.g. `DEMO_V2_BROKEN = "raise"`) in its environment.
pub fn legacy_and_new(new_env: &str) -> String {
    format!(
        "{pool}[backends.new]\nkind = \"pool\"\n[backends.new.pool]\n\
         adapter = \"demo_v2:adapter\"\nsize = 1\nenv = {{ {new_env} }}\n",
        pool = pool_section("demo:adapter", 1),
    )
}

/// A `[rollout]` section on the flags file `dir/flags.toml` (checked every 100 ms) and
/// the admin token in `dir/token`.
pub fn rollout_section(dir: &Path) -> String {
    format!(
        "[rollout]\nflags_file = \"{flags}\"\ncheck_interval = \"100ms\"\n\
         admin_token_file = \"{token}\"\n",
        flags = dir.join("flags.toml").display(),
        token = dir.join("token").display(),
    )
}

/// A request that carries `token` as its bearer token (the Admin service wants one).
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// A config parsed from `text` alone (no environment overrides); panics with the
/// error.
pub fn config(text: &str) -> Config {
    init_tracing();
    Config::from_sources("test.toml", Some(text), Vec::<(String, String)>::new())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Starts the server in process, waits until every worker of the legacy pool and of
/// the new one (when `new` is a pool) is ready, and connects a Bridge client.
pub async fn start(config: Config) -> (RunningServer, Client) {
    let server = RunningServer::start(config).await.unwrap();
    let legacy = server.edge().split.legacy().pool();
    for pool in legacy.into_iter().chain(server.new_pool()) {
        pool.wait_started(START_BOUND).await.unwrap();
        pool.wait_ready(pool.config().size, START_BOUND)
            .await
            .unwrap();
    }
    let client = Client::connect(format!("http://{}", server.bridge_addr))
        .await
        .unwrap();
    (server, client)
}

/// Waits until the edge knows `command` from the workers' READY frames (before, a call
/// of it is labelled as unknown in the metrics).
pub async fn wait_known(server: &RunningServer, command: &str) {
    let edge = server.edge().clone();
    assert!(
        eventually(START_BOUND, || edge.commands.label(command) == command).await,
        "{command} not known within {START_BOUND:?}"
    );
}

/// The body of a `GET /metrics` on a metrics listener (which must answer 200).
pub async fn scrape(metrics: std::net::SocketAddr) -> String {
    let (status, body) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    body
}

/// The real binary, started by [`spawn`], with the addresses it listens on.
pub struct Proc {
    pub child: tokio::process::Child,
    /// `http://` and the Bridge listener's address.
    pub bridge: String,
    /// `http://` and the Admin listener's address.
    pub admin: String,
    pub metrics: std::net::SocketAddr,
    /// Every line the process has logged so far (JSON), kept as it runs.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Whether a line logged so far satisfies `line`.
    pub fn logged(&self, line: impl Fn(&str) -> bool) -> bool {
        self.log.lock().unwrap().iter().any(|l| line(l))
    }
}

/// Starts the real binary on `config` with JSON logs at `info` (or the caller's
/// `RUST_LOG`, for [`spawn_exe`]), and reads its
/// listening addresses from the log. Its stderr is drained into [`Proc::log`] for as
/// long as it runs, so it never blocks on a full pipe.
pub async fn spawn(config: &Path) -> Proc {
    spawn_exe(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss")),
        config,
    )
    .await
}

/// [`spawn`] with a command set up by the caller: another copy of the binary, its
/// environment, its working directory.
pub async fn spawn_exe(mut command: tokio::process::Command, config: &Path) -> Proc {
    // `info` unless the caller chose a level.
    if !command.as_std().get_envs().any(|(k, _)| k == "RUST_LOG") {
        command.env("RUST_LOG", "info");
    }
    let mut child = command
        .args(["--log-format", "json", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log: Arc<Mutex<Vec<String>>> = Default::default();
    let fields = tokio::time::timeout(START_BOUND, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap_or_default();
            log.lock().unwrap().push(line.clone());
            if v["fields"]["message"] == "pitboss listening" {
                return v["fields"].clone();
            }
        }
        panic!("pitboss exited before listening: {:?}", log.lock().unwrap());
    })
    .await
    .expect("listening within the bound");
    let sink = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    Proc {
        child,
        bridge: format!("http://{}", fields["bridge_addr"].as_str().unwrap()),
        admin: format!("http://{}", fields["admin_addr"].as_str().unwrap()),
        metrics: fields["metrics_addr"].as_str().unwrap().parse().unwrap(),
        log,
    }
}

/// Runs `pitboss rollout ARGS` against the Admin listener `admin` (an address) with
/// `token`, and returns its stdout; panics with its stderr when it fails.
pub async fn rollout_cli(admin: std::net::SocketAddr, token: &str, args: &[&str]) -> String {
    let out = rollout_cli_at(&format!("http://{admin}"), token, args).await;
    assert!(
        out.status.success(),
        "pitboss rollout {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `pitboss rollout ARGS --addr ADMIN --actor tester` (`admin`: a URL, as in
/// [`Proc::admin`]) with `token`, whatever its outcome.
pub async fn rollout_cli_at(admin: &str, token: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .arg("rollout")
        .args(args)
        .args(["--addr", admin, "--actor", "tester"])
        .env("PITBOSS_ADMIN_TOKEN", token)
        .output()
        .await
        .unwrap()
}

/// A steady, concurrent load on one Bridge listener: `tasks` callers, each calling
/// `version` with a fresh routing key (so every rollout step sends some calls to new)
/// back to back until [`Load::stop`]. Counts the calls and the failed ones, and keeps
/// the first failures for the assertion's message.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    calls: Arc<std::sync::atomic::AtomicU64>,
    failed: Arc<std::sync::atomic::AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a [`Load`] did.
#[derive(Debug)]
pub struct LoadReport {
    pub calls: u64,
    pub failed: u64,
    /// The first failures (up to 5), as the client saw them.
    pub errors: Vec<String>,
}

impl Load {
    pub fn start(client: &Client, tasks: usize, tag: &str) -> Load {
        use std::sync::atomic::Ordering;
        let stop: Arc<std::sync::atomic::AtomicBool> = Default::default();
        let calls: Arc<std::sync::atomic::AtomicU64> = Default::default();
        let failed: Arc<std::sync::atomic::AtomicU64> = Default::default();
        let errors: Arc<Mutex<Vec<String>>> = Default::default();
        let tasks = (0..tasks)
            .map(|t| {
                let (mut client, stop, calls, failed, errors) = (
                    client.clone(),
                    stop.clone(),
                    calls.clone(),
                    failed.clone(),
                    errors.clone(),
                );
                let tag = tag.to_string();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        i += 1;
                        let mut r = exec("version", "{}");
                        r.routing_key = format!("{tag}-{t}-{i}");
                        if let Err(e) = client.execute(r).await {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let mut errors = errors.lock().unwrap();
                            if errors.len() < 5 {
                                errors.push(format!("{:?}: {}", e.code(), e.message()));
                            }
                        }
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            calls,
            failed,
            errors,
            tasks,
        }
    }

    /// Calls made so far (failed ones included).
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Failed calls so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the callers and waits for their last calls.
    pub async fn stop(mut self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        for t in std::mem::take(&mut self.tasks) {
            t.await.unwrap();
        }
        LoadReport {
            calls: self.calls(),
            failed: self.failed(),
            errors: self.errors.lock().unwrap().clone(),
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released for the caller to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real single-member etcd (Debian's `etcd-server`) on loopback ports, its data in
/// a temp dir; killed on drop. [`Etcd::stop`] and [`Etcd::start`] take it down and
/// bring it back on the same ports and data, for outage tests.
pub struct Etcd {
    pub dir: PathBuf,
    pub client_url: String,
    peer_url: String,
    child: Option<std::process::Child>,
}

impl Etcd {
    pub async fn launch(tag: &str) -> Etcd {
        let dir = temp_dir(&format!("etcd-{tag}"));
        let mut e = Etcd {
            client_url: format!("http://127.0.0.1:{}", free_port()),
            peer_url: format!("http://127.0.0.1:{}", free_port()),
            dir,
            child: None,
        };
        e.start().await;
        e
    }

    /// Starts etcd and waits until it answers a read.
    pub async fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        let child = std::process::Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={}", self.client_url))
            .arg(format!("--advertise-client-urls={}", self.client_url))
            .arg(format!("--listen-peer-urls={}", self.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", self.peer_url))
            .arg(format!("--initial-cluster=test={}", self.peer_url))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([self.client_url.as_str()], None).await
            {
                if c.get("/health-probe", None).await.is_ok() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd did not answer within 30s: {}",
                std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills etcd (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A `[rollout.store]` section on this etcd for rollout `name`.
    pub fn store_section(&self, name: &str, cache_file: &Path) -> String {
        etcd_store_section(&[self.client_url.as_str()], name, cache_file, "2s")
    }
}

/// A `[rollout.store]` section on etcd `endpoints` for rollout `name`: requests time
/// out after 500 ms, the lease lasts `lease_ttl`.
pub fn etcd_store_section(
    endpoints: &[&str],
    name: &str,
    cache_file: &Path,
    lease_ttl: &str,
) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[rollout.store]\nkind = \"etcd\"\nendpoints = [{}]\nname = \"{name}\"\n\
         lease_ttl = \"{lease_ttl}\"\ntimeout = \"500ms\"\ncache_file = \"{}\"\n",
        endpoints.join(", "),
        cache_file.display()
    )
}

/// A real 3-member etcd cluster on loopback ports, each member's data in its own temp
/// dir; killed on drop. [`EtcdCluster::stop`] and [`EtcdCluster::start`] take single
/// members down and back (same ports, same data), for quorum-loss tests.
pub struct EtcdCluster {
    pub dir: PathBuf,
    /// Each member's client URL.
    pub client_urls: Vec<String>,
    peer_urls: Vec<String>,
    children: Vec<Option<std::process::Child>>,
}

impl EtcdCluster {
    pub const MEMBERS: usize = 3;

    /// Starts the three members together (each needs the others for a quorum) and
    /// waits until every member answers a linearizable read. A member that cannot
    /// take its port (another process took it between [`free_port`] and etcd's bind)
    /// exits: then the cluster starts again on new ports, up to three times.
    pub async fn launch(tag: &str) -> EtcdCluster {
        let dir = temp_dir(&format!("etcd-cluster-{tag}"));
        let ports = |_| format!("http://127.0.0.1:{}", free_port());
        let mut c = EtcdCluster {
            dir,
            client_urls: (0..Self::MEMBERS).map(ports).collect(),
            peer_urls: (0..Self::MEMBERS).map(ports).collect(),
            children: (0..Self::MEMBERS).map(|_| None).collect(),
        };
        for attempt in 1..=3 {
            for i in 0..Self::MEMBERS {
                c.spawn(i);
            }
            if c.every_member_answers().await {
                return c;
            }
            assert!(
                attempt < 3,
                "the etcd cluster did not start; logs in {}",
                c.dir.display()
            );
            for i in 0..Self::MEMBERS {
                c.stop(i);
                let _ = std::fs::remove_dir_all(c.dir.join(format!("m{i}")));
            }
            c.client_urls = (0..Self::MEMBERS).map(ports).collect();
            c.peer_urls = (0..Self::MEMBERS).map(ports).collect();
        }
        unreachable!("returned or asserted above")
    }

    /// Whether each member answers a linearizable read through its own endpoint
    /// within 60 s; false at once when a member exited.
    async fn every_member_answers(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut pending: Vec<usize> = (0..Self::MEMBERS).collect();
        while !pending.is_empty() {
            for i in 0..Self::MEMBERS {
                if let Some(child) = self.children[i].as_mut() {
                    if child.try_wait().ok().flatten().is_some() {
                        return false;
                    }
                }
            }
            let mut still = Vec::new();
            for &i in &pending {
                let options = etcd_client::ConnectOptions::new()
                    .with_timeout(Duration::from_secs(1))
                    .with_require_leader(true);
                let ok = match etcd_client::Client::connect([&self.client_urls[i]], Some(options))
                    .await
                {
                    Ok(mut c) => c.get("/health-probe", None).await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    still.push(i);
                }
            }
            pending = still;
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        true
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .peer_urls
            .iter()
            .enumerate()
            .map(|(j, url)| format!("m{j}={url}"))
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("m{i}.log")))
            .unwrap();
        let child = std::process::Command::new("etcd")
            .arg(format!("--name=m{i}"))
            .arg(format!(
                "--data-dir={}",
                self.dir.join(format!("m{i}")).display()
            ))
            .arg(format!("--listen-client-urls={}", self.client_urls[i]))
            .arg(format!("--advertise-client-urls={}", self.client_urls[i]))
            .arg(format!("--listen-peer-urls={}", self.peer_urls[i]))
            .arg(format!(
                "--initial-advertise-peer-urls={}",
                self.peer_urls[i]
            ))
            .arg(format!("--initial-cluster={}", cluster.join(",")))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=pitboss-test")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (apt-get install etcd-server)");
        self.children[i] = Some(child);
    }

    /// The members' client URLs, for [`etcd_store_section`].
    pub fn endpoints(&self) -> Vec<&str> {
        self.client_urls.iter().map(String::as_str).collect()
    }

    /// Waits until a linearizable read through any member succeeds (a leader exists).
    pub async fn wait_for_quorum(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let options = etcd_client::ConnectOptions::new()
                .with_timeout(Duration::from_secs(1))
                .with_require_leader(true);
            if let Ok(mut c) = etcd_client::Client::connect(&self.client_urls, Some(options)).await
            {
                if c.get("/health-probe", None).await.is_ok() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the etcd cluster has no quorum within 60s; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills member `i` (its data stays).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its ports and data.
    pub fn start(&mut self, i: usize) {
        assert!(self.children[i].is_none(), "member {i} is running");
        self.spawn(i);
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..Self::MEMBERS {
            self.stop(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Python virtualenv with grpcio (and its tools and reflection), made once under target/ (pip reaches PyPI).
pub fn grpcio_python() -> std::path::PathBuf {
    // Tests run in parallel: one of them builds the venv, the others wait for it.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/grpcio-venv");
    let py = venv.join("bin/python");
    let ok = |py: &std::path::Path| {
        std::process::Command::new(py)
            .args(["-c", "import grpc, grpc_tools, grpc_reflection"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok(&py) {
        let st = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "cannot create a venv (is python3-venv installed?)"
        );
        let st = std::process::Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "grpcio",
                "grpcio-tools",
                "grpcio-reflection",
            ])
            .status()
            .unwrap();
        assert!(
            st.success(),
            "pip install grpcio grpcio-tools grpcio-reflection failed"
        );
    }
    py
}

/// One call over a raw HTTP/2 connection, with `grpc_timeout` as sent (no checking:
/// the point is to send what gRPC's own clients would not), its body sent as `chunks`
/// (one DATA frame each, the last ending the stream). Returns grpc-status,
/// grpc-message (percent-decoded) and the error class trailer.
pub async fn raw_grpc_with(
    addr: std::net::SocketAddr,
    path: &str,
    grpc_timeout: &str,
    chunks: Vec<bytes::Bytes>,
) -> (u32, String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        send.send_data(chunk, i == last).unwrap();
    }
    let (parts, mut recv) = resp.await.unwrap().into_parts();
    let mut md = parts.headers;
    if md.get("grpc-status").is_none() {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        if let Some(trailers) = recv.trailers().await.unwrap() {
            md.extend(trailers);
        }
    }
    let text = |key: &str| {
        md.get(key)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let status = text("grpc-status").parse().expect("a grpc-status");
    (
        status,
        percent_decoded(&text("grpc-message")),
        text("x-pitboss-error-class"),
    )
}

/// grpc-message as the client reads it: gRPC percent-encodes it on the wire.
pub fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(byte) if b[i] == b'%' => {
                out.push(byte);
                i += 3;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A message in gRPC's framing: flag 0, the length, the bytes.
pub fn framed(message: &impl prost::Message) -> bytes::Bytes {
    let msg = message.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    out.into()
}
