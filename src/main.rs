//! The `pitboss` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pitboss::config::{Config, LogFormat};
use pitboss::grpc::pb;
use pitboss::server::RunningServer;

/// The parts of the command line that are not the library's: the benchmark harness
/// measures pitboss from outside, through its public API and its gRPC surface.
mod cli {
    pub mod bench;
    pub mod connect;
    pub mod doctor;
    pub mod init;
}

#[derive(Parser)]
#[command(
    name = "pitboss",
    version,
    about = "A supervised sidecar that runs Python code for services in any language"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file for `serve` (the default command). Without one, the embedded default.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format for `serve`: text or json (overrides server.log_format).
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Validate a config file and print the effective configuration.
    CheckConfig { file: PathBuf },
    /// Validate a rollout flags file and print the flags it sets (all keys).
    CheckFlags { file: PathBuf },
    /// Write a new adapter project into DIR: app.py, test_app.py, pitboss.toml and
    /// flags.toml (never overwriting a file); then `pitboss --config DIR/pitboss.toml`.
    Init { dir: PathBuf },
    /// Print the directory of the Python worker runtime (writing the one embedded in
    /// this binary out first, if need be): `pip install "$(pitboss runtime)"` installs
    /// the matching pitboss_worker package for your editor and your tests.
    Runtime,
    /// Check what a start needs (the interpreter, the adapter, the ports, the flags
    /// file, the runtime), one line each with the fix; exits 1 if something fails.
    Doctor,
    /// Print the Admin status as a table.
    Status {
        /// The admin listener: http://HOST:PORT, or https://HOST:PORT for TLS.
        #[arg(long, default_value = "http://127.0.0.1:50052")]
        addr: String,
        /// The admin token; default: $PITBOSS_ADMIN_TOKEN.
        #[arg(long, env = "PITBOSS_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(flatten)]
        tls: cli::connect::TlsArgs,
    },
    /// Benchmarks: load generator and baselines (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Drive the rollout from legacy to new (see docs/ROLLOUT.md). Over TLS: an
    /// https:// --addr with --ca; with mTLS, --cert and --key (docs/SECURITY.md).
    Rollout {
        #[command(subcommand)]
        action: RolloutCommand,
        /// The admin listener: http://HOST:PORT, or https://HOST:PORT for TLS.
        #[arg(long, global = true, default_value = "http://127.0.0.1:50052")]
        addr: String,
        /// The admin token; default: $PITBOSS_ADMIN_TOKEN.
        #[arg(
            long,
            global = true,
            env = "PITBOSS_ADMIN_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        /// Who makes the change, for the audit log; default: $USER.
        #[arg(long, global = true)]
        actor: Option<String>,
        /// Make the change only if the flags are still at this revision (from
        /// `rollout status`); otherwise nothing changes and the command fails.
        #[arg(long, global = true, default_value_t = 0)]
        expected_revision: u64,
        #[command(flatten)]
        tls: cli::connect::TlsArgs,
    },
    /// Check grpc.health.v1: prints SERVING or NOT_SERVING; exits 0 only when serving.
    Health {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// The service to check; empty for the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
        #[command(flatten)]
        tls: cli::connect::TlsArgs,
    },
    /// Call a command, print its result.
    Call {
        command: String,
        /// The payload, usually JSON; `@FILE` reads it from a file, `-` from stdin
        /// (as curl and grpcurl do), byte for byte.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// The payload's content type, passed to the command.
        #[arg(long, default_value = "application/json")]
        content_type: String,
        /// Route to this session's worker (also sent as x-session-id metadata).
        #[arg(long)]
        session: Option<String>,
        /// The stickiness key for the rollout split (calls without a session).
        #[arg(long)]
        routing_key: Option<String>,
        /// The command is safe to run twice (permits retries, fallback, shadowing).
        #[arg(long)]
        idempotent: bool,
        /// Stream the result (for generator commands).
        #[arg(long)]
        stream: bool,
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Deadline in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[command(flatten)]
        tls: cli::connect::TlsArgs,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Drive load at a Bridge server (`--addr`) or at the floor (`--floor`), report
    /// requests/s and latency percentiles, optionally as JSON.
    Load(Box<LoadArgs>),
    /// Worker pool startup: the floor's (spawn N workers, wait for READY) and
    /// pitboss's pool, alternating, `--runs` times each.
    Startup {
        #[arg(long, default_value_t = 4)]
        workers: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Serve the gRPC ceiling: a Bridge answering without Python. Prints LISTENING ADDR.
    Ceiling {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// Serve the passthrough ceiling: a bare HTTP/2 proxy (hyper and the grpc_proxy's
    /// connection, nothing else) to UPSTREAM. Prints LISTENING ADDR.
    ProxyCeiling {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// The service to forward every call to: http://HOST:PORT.
        #[arg(long)]
        upstream: String,
    },
    /// Create SESSIONS sessions on a pitboss and report its RSS (by --pid) before and after.
    Sessions {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct LoadArgs {
    /// A Bridge server to load (pitboss, the grpcio peer, the ceiling).
    #[arg(long, conflicts_with = "floor")]
    addr: Option<String>,
    /// Drive the config's workers directly over frames instead (no gRPC, no pool).
    #[arg(long)]
    floor: bool,
    /// Workers for --floor.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Stop after this many calls (default 10000 unless --duration-s is given).
    #[arg(long)]
    requests: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration_s: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    #[arg(long, default_value = "echo")]
    command: String,
    /// A JSON payload of about this many bytes ...
    #[arg(long, default_value_t = 64)]
    payload_size: usize,
    /// ... or this exact payload.
    #[arg(long)]
    payload: Option<String>,
    /// Call this method of any gRPC service (`/package.Service/Method`, e.g. a
    /// transparent one) with the payload as its raw request message, instead of
    /// Bridge `Execute`.
    #[arg(long, requires = "addr")]
    method: Option<String>,
    /// The payload as hex (the request message's protobuf bytes, for --method).
    #[arg(long, conflicts_with = "payload")]
    payload_hex: Option<String>,
    /// Spread calls over this many sessions (0: none).
    #[arg(long, default_value_t = 0)]
    sessions: usize,
    #[arg(long)]
    stream: bool,
    #[arg(long)]
    idempotent: bool,
    /// A name for the report.
    #[arg(long, default_value = "")]
    name: String,
    /// Also write the report here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure the CPU per request of this server process and of its descendants
    /// (its workers), from /proc. The load generator's own is always measured.
    #[arg(long)]
    cpu_pid: Option<u32>,
    /// For an https:// --addr (benches/run.sh measures TLS against plaintext).
    #[command(flatten)]
    tls: cli::connect::TlsArgs,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Mode, percentage, state, and both backends' live error rate and p99.
    Status,
    /// Send PERCENT (0 to 100, steps of 0.01) of eligible keys to new (canary mode).
    Set { percent: f64 },
    /// Set the mode: off, shadow, canary or full.
    Mode { mode: String },
    /// Set the commands eligible for new ("*" for all; none for an empty list).
    Commands { commands: Vec<String> },
    /// Hold: new takes no new traffic until `resume`.
    Pause,
    /// Resume after a pause or a rollback.
    Resume,
    /// Send everything back to legacy now (state rolled_back until `resume`).
    Rollback,
    /// Move to the next of the `[promotion]` steps now (past a `pause_at` hold too).
    Promote,
    /// The audit log: every change of the rollout, newest first.
    History {
        /// How many changes to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

/// `pitboss init DIR`: the scaffold, then what to do next.
fn init(dir: PathBuf) -> Result<(), String> {
    for path in cli::init::init(&dir)? {
        println!("wrote {}", path.display());
    }
    let d = dir.display();
    println!(
        "\nnext:\n  pitboss --config {d}/pitboss.toml          # serve it\n  \
         pitboss call hello --payload '{{\"name\": \"you\"}}' # call it\n  \
         (cd {d} && PYTHONPATH=\"$(pitboss runtime)\" python3 -m unittest test_app)  # test it"
    );
    Ok(())
}

/// `pitboss runtime`: the runtime directory on stdout, how it was found on stderr.
fn print_runtime() -> Result<(), String> {
    let location = pitboss::runtime_files::location();
    pitboss::runtime_files::check(&location.dir).map_err(|e| e.to_string())?;
    println!("{}", location.dir.display());
    eprintln!("pitboss runtime: {}", location.describe());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pitboss: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(cli.config, cli.log_format).await,
            Command::CheckConfig { file } => check_config(file),
            Command::CheckFlags { file } => check_flags(file),
            Command::Runtime => print_runtime(),
            Command::Init { dir } => init(dir),
            Command::Doctor => doctor(cli.config).await,
            Command::Bench { what } => bench(cli.config, what).await,
            Command::Status { addr, token, tls } => status(addr, token, tls).await,
            Command::Rollout {
                action,
                addr,
                token,
                actor,
                expected_revision,
                tls,
            } => rollout(addr, tls, token, actor, expected_revision, action).await,
            Command::Health { addr, service, tls } => health(addr, service, tls).await,
            Command::Call {
                command,
                payload,
                content_type,
                session,
                routing_key,
                idempotent,
                stream,
                addr,
                timeout_ms,
                tls,
            } => {
                let payload = read_payload(&payload)?;
                let channel = cli::connect::channel(&addr, &tls, "the bridge listener").await?;
                let opts = CallOptions {
                    content_type,
                    session,
                    routing_key,
                    idempotent,
                    stream,
                    timeout_ms,
                };
                call(channel, command, payload, opts).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pitboss: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(config: Option<PathBuf>) -> Result<Config, String> {
    match config {
        Some(path) => Config::load_file(&path),
        None => Config::load_default(),
    }
    .map_err(|e| e.to_string())
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_logs(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Text logs are coloured only for a person at a terminal: a file, a pipe, journald
/// or a container log collector would store the escape codes as text. `NO_COLOR`
/// (any non-empty value, no-color.org) turns colour off at a terminal too.
fn colour_logs(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.map_or(true, |v| v.is_empty())
}

async fn serve(config: Option<PathBuf>, log_format: Option<String>) -> Result<(), String> {
    let cfg = load(config)?;
    init_logs(match log_format.as_deref() {
        Some("json") => LogFormat::Json,
        Some(_) => LogFormat::Text,
        None => cfg.server.log_format,
    });
    // Before startup, which may wait for etcd or for legacy's reflection: a SIGTERM
    // then stops pitboss at once, and a SIGHUP does not kill it.
    let mut signals = pitboss::server::StopSignals::install();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "pitboss starting");
    let starting = RunningServer::start(cfg);
    let server = match signals.as_mut() {
        None => starting.await,
        Some(s) => tokio::select! {
            started = starting => started,
            signal = s.next(|| tracing::info!(
                "SIGHUP during startup: nothing to re-read yet (the flags file is read as pitboss starts, and watched from then on)"
            )) => {
                tracing::info!("{} during startup: exiting before serving", signal.name());
                // The workers already started die with pitboss (their parent-death signal).
                std::process::exit(128 + signal as i32);
            }
        },
    }
    .map_err(|e| e.to_string())?;
    server.run_until_signal(signals).await;
    Ok(())
}

async fn doctor(config: Option<PathBuf>) -> Result<(), String> {
    let origin = config
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the embedded default config".into());
    let cfg = load(config)?;
    let findings = cli::doctor::run(&cfg, &origin).await;
    for f in &findings {
        println!("{f}");
    }
    let worst = findings.iter().map(|f| f.verdict).max();
    match worst {
        Some(cli::doctor::Verdict::Fail) => {
            Err("doctor: something above would stop pitboss (FAIL)".into())
        }
        _ => Ok(()),
    }
}

fn check_config(file: PathBuf) -> Result<(), String> {
    let cfg = Config::load_file(&file).map_err(|e| e.to_string())?;
    // The TLS material is loaded as a start would: readable, unexpired, key matching.
    let tls = pitboss::tls::check(&cfg).map_err(|e| e.to_string())?;
    for line in &tls {
        println!("# TLS {line}");
    }
    println!("# {}: valid. Effective configuration:", file.display());
    print!("{}", cfg.to_toml());
    Ok(())
}

/// An admin request carrying the bearer token, when there is one.
fn admin_request<T>(msg: T, token: &Option<String>) -> Result<tonic::Request<T>, String> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token.as_deref().filter(|t| !t.is_empty()) {
        let v = format!("Bearer {t}")
            .parse()
            .map_err(|_| "the admin token is not valid metadata".to_string())?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

/// The Admin service at `addr`: plaintext, TLS or mTLS (see [`cli::connect`]).
async fn admin_client(
    addr: &str,
    tls: &cli::connect::TlsArgs,
) -> Result<pb::admin_client::AdminClient<tonic::transport::Channel>, String> {
    let channel = cli::connect::channel(addr, tls, "the admin listener").await?;
    Ok(pb::admin_client::AdminClient::new(channel))
}

/// Prints a failed call to `addr` (see [`cli::connect::call_failed`]).
fn failed_at(addr: &str) -> impl Fn(tonic::Status) -> String + '_ {
    move |s| cli::connect::call_failed(addr, &s)
}

async fn rollout(
    addr: String,
    tls: cli::connect::TlsArgs,
    token: Option<String>,
    actor: Option<String>,
    expected_revision: u64,
    action: RolloutCommand,
) -> Result<(), String> {
    let mut client = admin_client(&addr, &tls).await?;
    let show_status = failed_at(&addr);
    let set = |mode: &str, percent: f64, action: &str| pb::SetRolloutRequest {
        mode: mode.into(),
        percent,
        action: action.into(),
        actor: actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_default(),
        expected_revision,
        ..Default::default()
    };
    if let RolloutCommand::History { limit } = action {
        let h = client
            .get_rollout_history(admin_request(
                pb::GetRolloutHistoryRequest { limit },
                &token,
            )?)
            .await
            .map_err(show_status)?
            .into_inner();
        print!("{}", render_history(&h));
        return Ok(());
    }
    let r = match action {
        RolloutCommand::Status => client
            .get_rollout(admin_request(pb::GetRolloutRequest {}, &token)?)
            .await
            .map_err(show_status)?,
        other => {
            let msg = match other {
                RolloutCommand::Set { percent } => set("", percent, ""),
                RolloutCommand::Mode { mode } => set(&mode, -1.0, ""),
                RolloutCommand::Commands { commands } => pb::SetRolloutRequest {
                    commands,
                    set_commands: true,
                    ..set("", -1.0, "")
                },
                RolloutCommand::Pause => set("", -1.0, "pause"),
                RolloutCommand::Resume => set("", -1.0, "resume"),
                RolloutCommand::Rollback => set("", -1.0, "rollback"),
                RolloutCommand::Promote => set("", -1.0, "promote"),
                RolloutCommand::Status | RolloutCommand::History { .. } => {
                    unreachable!("handled above")
                }
            };
            client
                .set_rollout(admin_request(msg, &token)?)
                .await
                .map_err(show_status)?
        }
    }
    .into_inner();
    print!("{}", render_rollout(&r));
    Ok(())
}

/// `pitboss rollout history` as text: one change a line, newest first.
fn render_history(h: &pb::RolloutHistory) -> String {
    if h.changes.is_empty() {
        return "no changes recorded\n".into();
    }
    let mut out = String::new();
    for c in &h.changes {
        out.push_str(&format!(
            "{}  {:<14} {} -> {}  by {} on {} (revision {}): {}\n",
            if c.at.is_empty() { "-" } else { &c.at },
            c.action,
            c.before,
            c.after,
            if c.actor.is_empty() { "-" } else { &c.actor },
            if c.instance.is_empty() {
                "-"
            } else {
                &c.instance
            },
            c.revision,
            if c.reason.is_empty() { "-" } else { &c.reason },
        ));
    }
    out
}

/// `pitboss rollout status` as text: the flags, then both backends side by side.
fn render_rollout(r: &pb::Rollout) -> String {
    let mut out = String::new();
    let commands = if r.commands.is_empty() {
        "(none)".to_string()
    } else {
        r.commands.join(", ")
    };
    out.push_str(&format!(
        "mode {}  percent {}  effective {}%  state {}\n",
        r.mode, r.percent, r.effective_percent, r.state
    ));
    out.push_str(&format!("commands {commands}\n"));
    if !r.reason.is_empty() || !r.changed_at.is_empty() {
        out.push_str(&format!(
            "last change {} by {}: {}\n",
            if r.changed_at.is_empty() {
                "-"
            } else {
                &r.changed_at
            },
            if r.changed_by.is_empty() {
                "-"
            } else {
                &r.changed_by
            },
            if r.reason.is_empty() { "-" } else { &r.reason }
        ));
    }
    out.push_str(&format!(
        "flags file {}\n",
        if r.flags_file.is_empty() {
            "(none: in memory only)"
        } else {
            &r.flags_file
        }
    ));
    out.push_str(&format!(
        "store {}{}  revision {}\n",
        r.store,
        if r.store_up {
            ""
        } else {
            " (UNREACHABLE: serving the last flags it gave)"
        },
        r.revision
    ));
    if !r.steps.is_empty() {
        out.push_str(&format!(
            "steps {}  at step {} of {}{}  since {}  promotions {}\n",
            r.steps.join(" "),
            r.step,
            r.steps.len(),
            if r.pause_at != 0.0 {
                format!("  pause_at {}", r.pause_at)
            } else {
                String::new()
            },
            if r.step_started_at.is_empty() {
                "-"
            } else {
                &r.step_started_at
            },
            r.promotions
        ));
        if !r.promotion.is_empty() {
            out.push_str(&format!("promotion {}\n", r.promotion));
        }
    }
    if !r.analysis.is_empty() {
        out.push_str(&format!("analysis over {}\n", r.analysis));
    }
    if !r.has_new {
        out.push_str("no new backend is configured: everything is served by legacy\n");
    }
    out.push_str(&format!(
        "shadow match {}  mismatch {}  error {}   fallbacks {}   rollbacks {}\n\n",
        r.shadow_matches, r.shadow_mismatches, r.shadow_errors, r.fallbacks, r.rollbacks
    ));
    let window = r
        .backends
        .first()
        .and_then(|b| b.window)
        .map(|w| w.seconds)
        .unwrap_or(0);
    out.push_str(&format!(
        "{:<8} {:>9} {:>8} {:>10} {:>10} {:>10} {:<10} {}\n",
        "BACKEND", "REQUESTS", "ERRORS", "ERROR-RATE", "P50-MS", "P99-MS", "BREAKER", "TARGET"
    ));
    let num = |v: f64, pct: bool| {
        if v.is_nan() {
            "-".to_string()
        } else if pct {
            format!("{:.2}%", v * 100.0)
        } else {
            format!("{v:.1}")
        }
    };
    for b in &r.backends {
        out.push_str(&format!(
            "{:<8} {:>9} {:>8} {:>10} {:>10} {:>10} {:<10} {}\n",
            b.backend,
            b.requests,
            b.errors,
            num(b.error_rate, true),
            num(b.p50_ms, false),
            num(b.p99_ms, false),
            b.breaker,
            b.target
        ));
        if !b.errors_by_class.is_empty() {
            let mut classes: Vec<_> = b.errors_by_class.iter().collect();
            classes.sort();
            let list: Vec<String> = classes.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out.push_str(&format!("         failures: {}\n", list.join(", ")));
        }
    }
    out.push_str(&format!("(statistics over the last {window}s)\n"));
    if r.state == "rolled_back" {
        out.push_str("rolled back: new takes no traffic until `pitboss rollout resume`\n");
    }
    out
}

fn write_json(path: &Option<PathBuf>, value: &impl serde::Serialize) -> Result<(), String> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
        std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Binds a baseline server's listener and prints `LISTENING ADDR` (the port it got),
/// which benches/run.sh and the tests wait for.
async fn bind_and_announce(
    listen: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, String> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("{listen}: {e}"))?;
    println!("LISTENING {}", l.local_addr().map_err(|e| e.to_string())?);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    Ok(l)
}

async fn bench(config: Option<PathBuf>, what: BenchCommand) -> Result<(), String> {
    use cli::bench;
    match what {
        BenchCommand::Load(a) => {
            let (target, name) = if a.floor {
                let cfg = load(config)?;
                let spec = bench::floor_spec(&cfg).await?;
                let (floor, took) = bench::Floor::start(&spec, a.workers).await?;
                eprintln!("floor: {} workers ready in {took:?}", a.workers);
                (
                    bench::Target::Floor(std::sync::Arc::new(floor)),
                    "floor".to_string(),
                )
            } else {
                let addr = a
                    .addr
                    .clone()
                    .unwrap_or_else(|| "http://127.0.0.1:50051".into());
                match &a.method {
                    Some(m) => (bench::Target::raw(&addr, m, &a.tls).await?, addr),
                    None => (bench::Target::grpc(&addr, &a.tls).await?, addr),
                }
            };
            let payload = match (&a.payload, &a.payload_hex) {
                (Some(p), _) => p.clone().into_bytes().into(),
                (None, Some(h)) => bench::payload_of_hex(h)?,
                (None, None) => bench::payload_of_size(a.payload_size),
            };
            let spec = bench::LoadSpec {
                concurrency: a.concurrency,
                requests: a.requests.or(if a.duration_s.is_none() {
                    Some(10_000)
                } else {
                    None
                }),
                duration: a.duration_s.map(std::time::Duration::from_secs_f64),
                warmup: std::time::Duration::from_secs_f64(a.warmup_s),
                command: a.method.clone().unwrap_or_else(|| a.command.clone()),
                payload,
                sessions: a.sessions,
                stream: a.stream,
                idempotent: a.idempotent,
            };
            let name = if a.name.is_empty() {
                name
            } else {
                a.name.clone()
            };
            let r = bench::run(target, &name, spec, a.cpu_pid).await?;
            let cpu = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
            println!(
                "{}: {} {} B c={} s={}: {:.0} req/s  p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  ({} calls, {} errors)  CPU µs/req: server {} workers {} client {}",
                r.target, r.command, r.payload_bytes, r.concurrency, r.sessions, r.rps,
                r.p50_us, r.p90_us, r.p99_us, r.p999_us, r.requests, r.errors,
                cpu(r.cpu_server_us_per_req), cpu(r.cpu_workers_us_per_req), cpu(r.cpu_client_us_per_req)
            );
            if let Some(e) = &r.first_error {
                eprintln!("first error: {e}");
            }
            write_json(&a.json, &r)
        }
        BenchCommand::Startup {
            workers,
            runs,
            json,
        } => {
            let cfg = load(config)?;
            let spec = bench::floor_spec(&cfg).await?;
            let mut floor_ms = vec![];
            let mut pool_ms = vec![];
            for _ in 0..runs {
                let (floor, took) = bench::Floor::start(&spec, workers).await?;
                floor_ms.push(took.as_secs_f64() * 1000.0);
                drop(floor);
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let mut pc = pitboss::pool::PoolConfig::from_sections(
                    "bench",
                    &cfg.pool,
                    &cfg.sessions,
                    &cfg.base_dir,
                );
                pc.size = workers;
                let t = tokio::time::Instant::now();
                let pool = pitboss::pool::Pool::launch(
                    pc,
                    std::sync::Arc::new(pitboss::telemetry::RestartCounter),
                )
                .await
                .map_err(|e| e.to_string())?;
                pool.wait_ready(workers, std::time::Duration::from_secs(60))
                    .await
                    .map_err(|e| e.to_string())?;
                pool_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                pool.shutdown().await;
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
            let (f, p) = (median(floor_ms.clone()), median(pool_ms.clone()));
            println!(
                "startup of {workers} workers, median of {runs}: floor {f:.1} ms, pitboss pool {p:.1} ms, ratio {:.2}",
                p / f
            );
            write_json(
                &json,
                &serde_json::json!({"workers": workers, "runs": runs, "floor_ms": floor_ms,
                    "pool_ms": pool_ms, "floor_median_ms": f, "pool_median_ms": p, "ratio": p / f}),
            )
        }
        BenchCommand::Ceiling { listen } => {
            let l = bind_and_announce(listen).await?;
            tonic::transport::Server::builder()
                .add_service(pb::bridge_server::BridgeServer::new(bench::CeilingBridge))
                .serve_with_incoming(pitboss::server::incoming(l))
                .await
                .map_err(|e| e.to_string())
        }
        BenchCommand::ProxyCeiling { listen, upstream } => {
            let uri: http::Uri = upstream
                .parse()
                .map_err(|e| format!("--upstream {upstream}: {e}"))?;
            let (Some("http"), Some(authority)) = (uri.scheme_str(), uri.authority().cloned())
            else {
                return Err(format!("--upstream {upstream}: expected http://HOST:PORT"));
            };
            let port = authority.port_u16().unwrap_or(80);
            let host = pitboss::tls::client::connect_host(&uri).unwrap_or_default();
            let connect = pitboss::backend::direct::Direct::tcp(host.to_string(), port);
            let direct = pitboss::backend::direct::Direct::new(
                http::uri::Scheme::HTTP,
                authority,
                connect,
                std::time::Duration::from_secs(5),
            );
            let l = bind_and_announce(listen).await?;
            bench::serve_proxy_ceiling(l, direct).await
        }
        BenchCommand::Sessions {
            addr,
            pid,
            sessions,
            concurrency,
            json,
        } => {
            let before = bench::rss_of(pid).ok_or(format!("no process {pid}"))?;
            let target = bench::Target::grpc(&addr, &Default::default()).await?;
            let bench::Target::Grpc(client) = target else {
                unreachable!()
            };
            let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (mut c, next) = (client.clone(), next.clone());
                    tokio::spawn(async move {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= sessions {
                                return Ok::<(), String>(());
                            }
                            c.create_session(pb::CreateSessionRequest::default())
                                .await
                                .map_err(|s| s.message().to_string())?;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.map_err(|e| e.to_string())??;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let after = bench::rss_of(pid).ok_or(format!("no process {pid}"))?;
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            println!(
                "pitboss RSS: {:.1} MiB idle, {:.1} MiB with {sessions} sessions (+{:.0} bytes/session)",
                mib(before),
                mib(after),
                (after.saturating_sub(before)) as f64 / sessions as f64
            );
            write_json(
                &json,
                &serde_json::json!({"sessions": sessions, "rss_idle_bytes": before, "rss_sessions_bytes": after}),
            )
        }
    }
}

fn check_flags(file: PathBuf) -> Result<(), String> {
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("{}: cannot read: {e}", file.display()))?;
    let flags = pitboss::rollout::Flags::parse(&file.display().to_string(), &text)
        .map_err(|e| e.to_string())?;
    println!(
        "# {}: valid; new gets {}% of eligible keys now. Effective flags:",
        file.display(),
        flags.effective_percent().as_f64()
    );
    print!("{}", flags.to_toml());
    Ok(())
}

async fn status(
    addr: String,
    token: Option<String>,
    tls: cli::connect::TlsArgs,
) -> Result<(), String> {
    let mut client = admin_client(&addr, &tls).await?;
    let show_status = failed_at(&addr);
    let st = client
        .get_status(admin_request(pb::GetStatusRequest {}, &token)?)
        .await
        .map_err(show_status)?
        .into_inner();
    let uptime = st.uptime.map(|d| d.seconds).unwrap_or(0);
    println!(
        "pitboss {}  instance {}  uptime {}s  serving {}  sessions {}",
        st.version, st.instance_id, uptime, st.serving, st.sessions
    );
    for p in st.pools {
        println!(
            "\npool {} ({})  ready {}/{}  queue {}  sessions {}{}",
            p.backend,
            p.adapter,
            p.ready,
            p.size,
            p.queue_depth,
            p.sessions,
            if p.degraded { "  DEGRADED" } else { "" }
        );
        println!(
            "{:<6} {:<5} {:>8} {:<12} {:>9} {:>9} {:>8} {:>9} {:>9}",
            "WORKER",
            "SLOT",
            "PID",
            "STATE",
            "IN-FLIGHT",
            "SERVED",
            "RESTARTS",
            "RSS-MIB",
            "SESSIONS"
        );
        for w in p.workers {
            println!(
                "{:<6} {:<5} {:>8} {:<12} {:>9} {:>9} {:>8} {:>9.1} {:>9}",
                if w.id.is_empty() { "-".into() } else { w.id },
                w.slot,
                w.pid,
                w.state,
                w.in_flight,
                w.requests_served,
                w.restarts,
                w.rss_bytes as f64 / (1024.0 * 1024.0),
                w.sessions
            );
            if !w.last_exit.is_empty() {
                println!("       last exit: {}", w.last_exit);
            }
        }
    }
    Ok(())
}

async fn health(addr: String, service: String, tls: cli::connect::TlsArgs) -> Result<(), String> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = cli::connect::channel(&addr, &tls, "the bridge listener").await?;
    let mut client = HealthClient::new(channel);
    let show_status = failed_at(&addr);
    let resp = client
        .check(HealthCheckRequest { service })
        .await
        .map_err(show_status)?
        .into_inner();
    let status = resp.status().as_str_name();
    println!("{status}");
    if resp.status() == tonic_health::pb::health_check_response::ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("not serving ({status})"))
    }
}

struct CallOptions {
    content_type: String,
    session: Option<String>,
    routing_key: Option<String>,
    idempotent: bool,
    stream: bool,
    timeout_ms: Option<u64>,
}

/// `pitboss call --payload`: the text itself, `@FILE`'s bytes, or stdin's for `-`.
fn read_payload(arg: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    if arg == "-" {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| format!("--payload -: cannot read stdin: {e}"))?;
        return Ok(bytes);
    }
    match arg.strip_prefix('@') {
        Some(file) => {
            std::fs::read(file).map_err(|e| format!("--payload @{file}: cannot read: {e}"))
        }
        None => Ok(arg.as_bytes().to_vec()),
    }
}

/// Writes a result to stdout as it came: binary payloads (an image, a pickle) stay
/// byte-exact when redirected to a file. Text that does not end in a newline gets
/// one, so that results and stream chunks read as lines.
fn print_payload(out: &mut impl std::io::Write, payload: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(payload).is_ok();
    out.write_all(payload)
        .and_then(|()| {
            if text && !payload.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
            out.flush()
        })
        .map_err(|e| format!("cannot write the result to stdout: {e}"))
}

async fn call(
    channel: tonic::transport::Channel,
    command: String,
    payload: Vec<u8>,
    opts: CallOptions,
) -> Result<(), String> {
    let CallOptions {
        content_type,
        session,
        routing_key,
        idempotent,
        stream,
        timeout_ms,
    } = opts;
    let mut client = pb::bridge_client::BridgeClient::new(channel);
    let mut req = tonic::Request::new(pb::ExecuteRequest {
        command,
        payload: payload.into(),
        content_type,
        session_id: session.clone().unwrap_or_default(),
        idempotent,
        routing_key: routing_key.unwrap_or_default(),
    });
    if let Some(s) = &session {
        // Load balancers hash on this header to keep a session on its instance.
        let v = s
            .parse()
            .map_err(|_| "session id is not valid metadata".to_string())?;
        req.metadata_mut().insert("x-session-id", v);
    }
    if let Some(ms) = timeout_ms {
        req.set_timeout(std::time::Duration::from_millis(ms));
    }
    let show = |s: tonic::Status| {
        let mut msg = format!("{:?}: {}", s.code(), s.message());
        for key in [
            "x-pitboss-error-class",
            "x-pitboss-python-type",
            "x-pitboss-worker",
        ] {
            if let Some(v) = s.metadata().get(key).and_then(|v| v.to_str().ok()) {
                msg.push_str(&format!("\n  {key}: {v}"));
            }
        }
        msg
    };
    if stream {
        let mut s = client.execute_stream(req).await.map_err(show)?.into_inner();
        let mut out = std::io::stdout().lock();
        while let Some(chunk) = s.message().await.map_err(show)? {
            print_payload(&mut out, &chunk.payload)?;
            if chunk.last {
                eprintln!("(backend {}, worker {})", chunk.backend, chunk.worker_id);
            }
        }
    } else {
        let r = client.execute(req).await.map_err(show)?.into_inner();
        print_payload(&mut std::io::stdout().lock(), &r.payload)?;
        eprintln!(
            "(backend {}, worker {}, attempts {})",
            r.backend, r.worker_id, r.attempts
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{colour_logs, print_payload, read_payload};

    #[test]
    fn results_print_byte_exact_and_text_as_lines() {
        let printed = |p: &[u8]| {
            let mut out = Vec::new();
            print_payload(&mut out, p).unwrap();
            out
        };
        assert_eq!(printed(b"{\"x\":1}"), b"{\"x\":1}\n");
        assert_eq!(printed(b"line\n"), b"line\n");
        let png = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0xff];
        assert_eq!(printed(&png), png, "binary is not re-encoded nor extended");
    }

    #[test]
    fn a_payload_argument_is_text_or_a_file() {
        assert_eq!(read_payload("{}").unwrap(), b"{}");
        let file = std::env::temp_dir().join(format!("pitboss-payload-{}", std::process::id()));
        std::fs::write(&file, [0u8, 159, 146, 150]).unwrap();
        assert_eq!(
            read_payload(&format!("@{}", file.display())).unwrap(),
            [0u8, 159, 146, 150]
        );
        std::fs::remove_file(&file).unwrap();
        let err = read_payload("@/nonexistent/p.json").unwrap_err();
        assert!(
            err.contains("--payload @/nonexistent/p.json: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn logs_are_coloured_only_at_a_terminal_without_no_color() {
        assert!(colour_logs(true, None));
        assert!(
            colour_logs(true, Some("".into())),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour_logs(true, Some("1".into())));
        assert!(!colour_logs(false, None));
    }
}
