//! Metrics end to end: real traffic with injected faults against a real server, then
//! `/metrics` is scraped over HTTP and the values are checked against what was sent;
//! `promtool check metrics` lints the scrape, and a real Prometheus scrapes pitboss.
//!
//! The Prometheus recorder is process-wide, so this binary holds one test: nothing
//! else adds to the counts it checks.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package (`.ci/run`
//! installs it and sets PITBOSS_REQUIRE_PROMETHEUS=1). Without them the checks that
//! need them are skipped with a message, unless that variable is set.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use pitboss::grpc::pb;
use tokio::io::AsyncWriteExt;

const LONG: Duration = Duration::from_secs(30);

fn require_prometheus() -> bool {
    std::env::var("PITBOSS_REQUIRE_PROMETHEUS").is_ok_and(|v| v == "1")
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn call(client: &mut Client, r: pb::ExecuteRequest) -> Result<(), tonic::Status> {
    client.execute(r).await.map(|_| ())
}

#[tokio::test]
async fn metrics_count_what_clients_saw_and_real_prometheus_scrapes_them() {
    let rest = format!(
        "{pool}[pool.restart]\nbackoff_base = \"20ms\"\njitter = 0.0\n\
         [circuit_breaker]\nconsecutive_failures = 100\nworker_consecutive_failures = 0\n",
        pool = pool_section("faults:adapter", 2)
    );
    let (server, mut client) = start(config(&on_free_ports("", &rest))).await;
    wait_known(&server, "pid").await;
    let addr = server.metrics_addr;

    // The traffic, and what each client saw.
    for _ in 0..10 {
        call(&mut client, exec("pid", "{}")).await.unwrap();
    }
    for _ in 0..3 {
        let e = call(&mut client, exec("raise", r#"{"type": "InvalidRequest"}"#))
            .await
            .unwrap_err();
        assert_eq!(error_class(&e), "invalid_request");
    }
    for _ in 0..2 {
        let e = call(&mut client, exec("raise", r#"{"type": "RuntimeError"}"#))
            .await
            .unwrap_err();
        assert_eq!(error_class(&e), "python_exception");
    }
    let e = call(&mut client, exec("no-such-command", "{}"))
        .await
        .unwrap_err();
    assert_eq!(error_class(&e), "unknown_command");
    // A crash, not retried (not idempotent): one restart.
    let e = call(&mut client, exec("crash", "{}")).await.unwrap_err();
    assert_eq!(error_class(&e), "worker_crashed");
    server.pool().wait_ready(2, LONG).await.unwrap();
    // An idempotent crash: three attempts, two retries, three restarts.
    let e = call(&mut client, idempotent(exec("crash", "{}")))
        .await
        .unwrap_err();
    assert_eq!(e.metadata().get("x-pitboss-attempts").unwrap(), "3");

    // The pool heals; the scrape then shows what the clients saw.
    let ready_again = async {
        for _ in 0..300 {
            let m = scrape(server.metrics_addr).await;
            let ready = sample(
                &m,
                "pitboss_workers",
                &[("backend", "legacy"), ("state", "ready")],
            );
            let restarts = sample(
                &m,
                "pitboss_worker_restarts_total",
                &[("backend", "legacy"), ("reason", "crash")],
            );
            if ready == Some(2.0) && restarts == Some(4.0) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the pool did not report 2 ready workers and 4 crash restarts");
    };
    let m = ready_again.await;
    let req = |command: &str, outcome: &str, class: &str| {
        sample(
            &m,
            "pitboss_requests_total",
            &[
                ("backend", "legacy"),
                ("command", command),
                ("outcome", outcome),
                ("error_class", class),
            ],
        )
    };
    assert_eq!(req("pid", "ok", ""), Some(10.0), "{m}");
    assert_eq!(req("raise", "error", "invalid_request"), Some(3.0));
    assert_eq!(req("raise", "error", "python_exception"), Some(2.0));
    assert_eq!(
        req("other", "error", "unknown_command"),
        Some(1.0),
        "unknown commands are `other`"
    );
    assert_eq!(req("crash", "error", "worker_crashed"), Some(2.0));
    assert!(
        !m.contains("no-such-command"),
        "client input never becomes a label"
    );
    assert_eq!(
        sample(
            &m,
            "pitboss_request_duration_seconds_count",
            &[("backend", "legacy"), ("command", "pid")]
        ),
        Some(10.0)
    );
    assert_eq!(
        sample(
            &m,
            "pitboss_retries_total",
            &[("backend", "legacy"), ("error_class", "worker_crashed")]
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &m,
            "pitboss_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("instance_id", &server.edge().instance_id)
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "pitboss_inflight", &[("backend", "legacy")]),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "pitboss_queue_depth", &[("backend", "legacy")]),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &m,
            "pitboss_circuit_state",
            &[("backend", "legacy"), ("scope", "backend")]
        ),
        Some(0.0)
    );
    assert!(m.contains("pitboss_request_duration_seconds_bucket{backend=\"legacy\",command=\"pid\",le=\"0.0001\"}"), "buckets from 100 µs");
    assert!(m.contains("le=\"60\""), "buckets to 60 s");
    assert!(
        m.contains("# HELP pitboss_requests_total"),
        "metrics are described"
    );
    // The `crash` calls above restarted workers; a new worker's RSS is known from
    // its first heartbeat sample on (0 until then), so wait for it.
    let rss_of_slot_0 = |m: &str| {
        sample(
            m,
            "pitboss_worker_rss_bytes",
            &[("backend", "legacy"), ("slot", "0")],
        )
        .unwrap_or(0.0)
    };
    let mut rss = rss_of_slot_0(&m);
    let by = tokio::time::Instant::now() + Duration::from_secs(30);
    while rss <= 1e6 && tokio::time::Instant::now() < by {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss = rss_of_slot_0(&scrape(addr).await);
    }
    assert!(rss > 1e6, "a Python worker uses more than 1 MB: {rss}");

    // Liveness and readiness.
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (code, body) = http_get(addr, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    assert_eq!(http_get(addr, "/nope").await.0, 404);

    // promtool lints the scrape.
    if have("promtool") {
        let mut child = tokio::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(m.as_bytes())
            .await
            .unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert!(!require_prometheus(), "promtool is required but missing");
        eprintln!("SKIPPED: promtool check metrics (install Debian's prometheus package)");
    }

    // A real Prometheus scrapes pitboss; its query API returns pitboss's series.
    if have("prometheus") {
        let dir = temp_dir("prom");
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pitboss\n    static_configs:\n      - targets: ['{addr}']\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut prom = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let prom_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let query = "/api/v1/query?query=pitboss_requests_total%7Bcommand%3D%22pid%22%7D";
        let mut found = None;
        for _ in 0..300 {
            if let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(prom_addr),
            )
            .await
            {
                let (code, body) = http_get(prom_addr, query).await;
                if code == 200 && body.contains("\"result\":[{") {
                    found = Some(body);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = prom.kill().await;
        let _ = std::fs::remove_dir_all(&dir);
        let body = found.expect("Prometheus never returned a pitboss series");
        assert!(body.contains("\"job\":\"pitboss\""), "{body}");
        assert!(
            body.contains("\"10\"]"),
            "Prometheus saw the 10 pid calls: {body}"
        );
    } else {
        assert!(!require_prometheus(), "prometheus is required but missing");
        eprintln!("SKIPPED: real Prometheus scrape (install Debian's prometheus package)");
    }
    server.shutdown().await;
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn alert_rules_and_the_sample_config_pass_promtool() {
    if !have("promtool") {
        assert!(!require_prometheus(), "promtool is required but missing");
        eprintln!("SKIPPED: promtool checks (install Debian's prometheus package)");
        return;
    }
    for args in [
        vec!["check", "rules", "config/prometheus/alerts.yml"],
        vec!["test", "rules", "config/prometheus/alerts_test.yml"],
        vec!["check", "config", "config/prometheus/prometheus.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(&args)
            .current_dir(repo(""))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_grafana_dashboard_covers_what_operators_watch() {
    let text = std::fs::read_to_string(repo("config/grafana/pitboss.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    let mut ids = std::collections::HashSet::new();
    for p in panels {
        if let Some(id) = p["id"].as_u64() {
            assert!(ids.insert(id), "duplicate panel id {id}");
        }
    }
    for metric in [
        "pitboss_requests_total",
        "pitboss_request_duration_seconds_bucket",
        "pitboss_rollout_percent",
        "pitboss_rollout_state",
        "pitboss_circuit_state",
        "pitboss_worker_restarts_total",
        "pitboss_queue_depth",
        "pitboss_shadow_comparisons_total",
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric)),
            "no panel queries {metric}"
        );
    }
    // Every metric the dashboard queries exists.
    let doc = std::fs::read_to_string(repo("docs/METRICS.md")).unwrap();
    for e in &exprs {
        for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(base) = word.strip_prefix("pitboss_") {
                let name = format!("pitboss_{base}");
                let name = ["_bucket", "_count", "_sum"].iter().fold(name, |n, s| {
                    n.strip_suffix(s).map(str::to_string).unwrap_or(n)
                });
                assert!(
                    doc.contains(&format!("`{name}`")),
                    "the dashboard queries unknown {name}"
                );
            }
        }
    }
}
