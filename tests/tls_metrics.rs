//! The TLS metrics' values after real events (issue 18): failed and timed-out
//! handshakes, the expiry of the certificate in force before and after a rotation,
//! reloads that succeed and reloads that are refused, and refused identities.
//!
//! Its own test binary, so that the process-wide recorder holds only this test's
//! series: the expiry gauge is a value, not a count, and another test's server on the
//! same listener would overwrite it. The counters are still checked as deltas.

mod common;

use common::certs::{unix_midnight, Ca};
use common::tls::{channel, echo, listener_tls, serve, BOUND};
use common::{exec, sample, scrape, temp_dir};
use tokio::io::AsyncWriteExt;

const FAILURES: &str = "pitboss_tls_handshake_failures_total";
const EXPIRY: &str = "pitboss_tls_certificate_expiry_timestamp_seconds";
const RELOADS: &str = "pitboss_config_reloads_total";
const DENIED: &str = "pitboss_access_denied_total";

#[tokio::test]
async fn tls_metrics_follow_handshakes_rotations_and_refusals() {
    let dir = temp_dir("tls-metrics-values");
    let ca = Ca::new("metrics values ca");
    let (first, second) = ((2031, 5, 1), (2032, 7, 15));
    let tls = listener_tls(
        "bridge",
        &dir,
        &ca.server_until(first),
        Some(&ca),
        "allow = [\"spiffe://test/allowed\"]\n",
    ) + "[tls]\nreload_interval = \"200ms\"\nhandshake_timeout = \"300ms\"\n";
    let server = serve(&dir, "demo:adapter", &tls).await;
    let (bridge, metrics) = (server.bridge_addr, server.metrics_addr);
    let allowed = ca.client("spiffe://test/allowed");
    echo(bridge, &ca.pem, Some(&allowed)).await.unwrap();

    let value =
        |body: &str, name: &str, labels: &[(&str, &str)]| sample(body, name, labels).unwrap_or(0.0);
    let failures = |body: &str, reason: &str| {
        value(
            body,
            FAILURES,
            &[("listener", "tls.bridge"), ("reason", reason)],
        )
    };
    let reloads = |body: &str, result: &str| {
        value(body, RELOADS, &[("file", "tls.bridge"), ("result", result)])
    };

    // The certificate in force at start.
    let before = scrape(metrics).await;
    assert_eq!(
        sample(&before, EXPIRY, &[("file", "tls.bridge")]),
        Some(unix_midnight(first) as f64),
        "the expiry of the first certificate"
    );

    // Three plaintext clients and one without a client certificate fail their
    // handshakes; one that connects and says nothing times out.
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(bridge).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    }
    echo(bridge, &ca.pem, None).await.unwrap_err();
    let silent = tokio::net::TcpStream::connect(bridge).await.unwrap();
    let (counted, after) = scrape_until(metrics, |after| {
        failures(after, "error") >= failures(&before, "error") + 4.0
            && failures(after, "timeout") >= failures(&before, "timeout") + 1.0
    })
    .await;
    assert!(
        counted,
        "4 failed and 1 timed-out handshakes counted within {BOUND:?}:\n{}",
        after
            .lines()
            .filter(|l| l.contains(FAILURES))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(silent);

    // An identity that is not listed: PERMISSION_DENIED, counted.
    let denied_before = value(&after, DENIED, &[("listener", "bridge")]);
    let stranger = ca.client("spiffe://test/stranger");
    let e = echo(bridge, &ca.pem, Some(&stranger)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let body = scrape(metrics).await;
    assert!(
        value(&body, DENIED, &[("listener", "bridge")]) >= denied_before + 1.0,
        "the refusal counted"
    );

    // A rotation: the reload counts as ok and the gauge shows the new expiry.
    let ok_before = reloads(&body, "ok");
    ca.server_until(second).write(&dir, "bridge");
    let (rotated, now) = scrape_until(metrics, |now| {
        sample(now, EXPIRY, &[("file", "tls.bridge")]) == Some(unix_midnight(second) as f64)
    })
    .await;
    assert!(rotated, "the gauge shows the second certificate's expiry");
    assert!(reloads(&now, "ok") >= ok_before + 1.0, "the reload counted");

    // A broken rotation (not a certificate): refused, counted, the gauge and the
    // certificate in force stay.
    let error_before = reloads(&now, "error");
    std::fs::write(dir.join("bridge.crt"), "not a certificate\n").unwrap();
    let (refused, now) =
        scrape_until(metrics, |now| reloads(now, "error") >= error_before + 1.0).await;
    assert!(refused, "the refused reload counted within {BOUND:?}");
    assert_eq!(
        sample(&now, EXPIRY, &[("file", "tls.bridge")]),
        Some(unix_midnight(second) as f64),
        "a refused change leaves the gauge at the certificate in force"
    );
    let ch = channel(bridge, &ca.pem, Some(&allowed)).await.unwrap();
    common::Client::new(ch)
        .execute(exec("echo", "{}"))
        .await
        .unwrap();
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Scrapes every 100 ms until `holds` is true of the scrape or [`BOUND`] passes:
/// whether it held, and the last scrape.
async fn scrape_until(
    metrics: std::net::SocketAddr,
    holds: impl Fn(&str) -> bool,
) -> (bool, String) {
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let body = scrape(metrics).await;
        if holds(&body) {
            return (true, body);
        }
        if tokio::time::Instant::now() >= deadline {
            return (false, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
