//! Metrics at start: counters with known label sets exist at 0 before anything has
//! happened, and the very first call after the workers are ready is labelled with its
//! command. The Prometheus recorder is process-wide, so this binary holds one test.

mod common;

use std::time::Duration;

use common::*;
use pitboss::server::RunningServer;

const LONG: Duration = Duration::from_secs(30);

/// The value of the sample written exactly as `series` (name and labels in the
/// exporter's order), if present.
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Issue 13 items 16 and 11.
#[tokio::test]
async fn known_counters_start_at_zero_and_the_first_call_has_its_command_label() {
    let dir = temp_dir("metrics-start");
    std::fs::write(dir.join("flags.toml"), "mode = \"off\"\n").unwrap();
    let rest = format!(
        "[pool]\nsize = 1\n[rollout]\nflags_file = \"{}\"\n",
        dir.join("flags.toml").display()
    );
    let server = RunningServer::start(config(&on_free_ports("", &rest)))
        .await
        .unwrap();

    // Before any traffic or fault: every known counter is there, at 0.
    let scrape = common::scrape(server.metrics_addr).await;
    for reason in pitboss::telemetry::RESTART_REASONS {
        let series =
            format!("pitboss_worker_restarts_total{{backend=\"legacy\",reason=\"{reason}\"}}");
        assert_eq!(value(&scrape, &series), Some(0.0), "{series} in:\n{scrape}");
    }
    for reason in pitboss::telemetry::ROLLBACK_REASONS {
        let series = format!("pitboss_rollout_rollbacks_total{{reason=\"{reason}\"}}");
        assert_eq!(value(&scrape, &series), Some(0.0), "{series}");
    }
    for series in [
        "pitboss_fallbacks_total",
        "pitboss_rollout_rollback_failures_total",
        "pitboss_retry_budget_exhausted_total{backend=\"legacy\"}",
        "pitboss_retries_total{backend=\"legacy\",error_class=\"worker_crashed\"}",
        "pitboss_shadow_comparisons_total{result=\"mismatch\"}",
        "pitboss_config_reloads_total{file=\"flags\",result=\"error\"}",
        "pitboss_circuit_transitions_total{backend=\"legacy\",scope=\"backend\"}",
    ] {
        assert_eq!(value(&scrape, series), Some(0.0), "{series} in:\n{scrape}");
    }

    // The first call once a worker is READY is counted under its own name.
    server.pool().wait_ready(1, LONG).await.unwrap();
    let mut client = Client::connect(format!("http://{}", server.bridge_addr))
        .await
        .unwrap();
    client.execute(exec("echo", "{}")).await.unwrap();
    let scrape = common::scrape(server.metrics_addr).await;
    let echo = "pitboss_requests_total{backend=\"legacy\",command=\"echo\",outcome=\"ok\",error_class=\"\"}";
    assert_eq!(value(&scrape, echo), Some(1.0), "in:\n{scrape}");
    assert!(
        !scrape.contains("command=\"other\""),
        "a call was labelled other:\n{scrape}"
    );
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
