//! The `pitboss` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pitboss::config::{Config, LogFormat};
use pitboss::grpc::pb;
use pitboss::server::RunningServer;

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
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Validate a config file and print the effective configuration.
    CheckConfig { file: PathBuf },
    /// Print the Admin status as a table.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:50052")]
        addr: String,
    },
    /// Check grpc.health.v1: prints SERVING or NOT_SERVING; exits 0 only when serving.
    Health {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// The service to check; empty for the server as a whole.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Call a command, print its result.
    Call {
        command: String,
        /// The payload, usually JSON.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Route to this session's worker (also sent as x-session-id metadata).
        #[arg(long)]
        session: Option<String>,
        /// Stream the result (for generator commands).
        #[arg(long)]
        stream: bool,
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Deadline in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
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
            Command::Serve => serve(cli.config).await,
            Command::CheckConfig { file } => check_config(file),
            Command::Status { addr } => status(addr).await,
            Command::Health { addr, service } => health(addr, service).await,
            Command::Call {
                command,
                payload,
                session,
                stream,
                addr,
                timeout_ms,
            } => call(addr, command, payload, session, stream, timeout_ms).await,
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
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: Option<PathBuf>) -> Result<(), String> {
    let cfg = load(config)?;
    init_logs(cfg.server.log_format);
    let server = RunningServer::start(cfg).await.map_err(|e| e.to_string())?;
    server.run_until_signal().await;
    Ok(())
}

fn check_config(file: PathBuf) -> Result<(), String> {
    let cfg = Config::load_file(&file).map_err(|e| e.to_string())?;
    println!("# {}: valid. Effective configuration:", file.display());
    print!("{}", cfg.to_toml());
    Ok(())
}

async fn status(addr: String) -> Result<(), String> {
    let mut client = pb::admin_client::AdminClient::connect(addr.clone())
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let st = client
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
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

async fn health(addr: String, service: String) -> Result<(), String> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = tonic::transport::Endpoint::from_shared(addr.clone())
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut client = HealthClient::new(channel);
    let resp = client
        .check(HealthCheckRequest { service })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let status = resp.status().as_str_name();
    println!("{status}");
    if resp.status() == tonic_health::pb::health_check_response::ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("not serving ({status})"))
    }
}

async fn call(
    addr: String,
    command: String,
    payload: String,
    session: Option<String>,
    stream: bool,
    timeout_ms: Option<u64>,
) -> Result<(), String> {
    let mut client = pb::bridge_client::BridgeClient::connect(addr.clone())
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut req = tonic::Request::new(pb::ExecuteRequest {
        command,
        payload: payload.into_bytes().into(),
        content_type: "application/json".into(),
        session_id: session.clone().unwrap_or_default(),
        ..Default::default()
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
        while let Some(chunk) = s.message().await.map_err(show)? {
            println!("{}", String::from_utf8_lossy(&chunk.payload));
            if chunk.last {
                eprintln!("(backend {}, worker {})", chunk.backend, chunk.worker_id);
            }
        }
    } else {
        let r = client.execute(req).await.map_err(show)?.into_inner();
        println!("{}", String::from_utf8_lossy(&r.payload));
        eprintln!(
            "(backend {}, worker {}, attempts {})",
            r.backend, r.worker_id, r.attempts
        );
    }
    Ok(())
}
