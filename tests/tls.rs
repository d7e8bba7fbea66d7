//! TLS and mTLS on the listeners and to an `https://` upstream (issue 18), with real
//! servers, real Python workers and certificates made at test time.

mod common;

use std::path::Path;

use common::certs::{Ca, Leaf};
use common::tls::{channel, echo, listener_tls, serve, write_token, BOUND};
use common::{config, eventually, exec, on_free_ports, pool_section, rollout_section, temp_dir};
use pitboss::grpc::pb;
use pitboss::server::RunningServer;
use tonic::Code;

#[tokio::test]
async fn tls_on_the_bridge_serves_tls_clients_and_refuses_plaintext_and_the_wrong_ca() {
    let dir = temp_dir("tls-basic");
    let ca = Ca::new("bridge ca");
    let tls = listener_tls("bridge", &dir, &ca.server(), None, "");
    let server = serve(&dir, "demo:adapter", &tls).await;
    let addr = server.bridge_addr;

    let out = echo(addr, &ca.pem, None).await.unwrap();
    assert!(out.contains("\"hi\""), "{out}");

    // Plaintext to the TLS port fails cleanly (no hang, no answer).
    let plain = tokio::time::timeout(BOUND, async {
        match common::Client::connect(format!("http://{addr}")).await {
            Ok(mut c) => c.execute(exec("echo", "{}")).await.map(|_| ()),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        }
    })
    .await
    .expect("a plaintext client gets an answer within the bound");
    assert!(plain.is_err(), "plaintext to a TLS port must fail");

    // A client that trusts another CA refuses the server.
    let other = Ca::new("another ca");
    let e = echo(addr, &other.pem, None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");

    // And the server still serves.
    echo(addr, &ca.pem, None).await.unwrap();
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate_and_unlisted_identities() {
    let dir = temp_dir("tls-mtls");
    let ca = Ca::new("mesh ca");
    let tls = listener_tls(
        "bridge",
        &dir,
        &ca.server(),
        Some(&ca),
        "allow = [\"spiffe://test/ns/shop/*\"]\n",
    );
    let server = serve(&dir, "demo:adapter", &tls).await;
    let addr = server.bridge_addr;

    let shop = ca.client("spiffe://test/ns/shop/sa/api");
    echo(addr, &ca.pem, Some(&shop)).await.unwrap();

    // No certificate: the handshake (or the first call after it) is refused.
    let e = echo(addr, &ca.pem, None).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    assert_ne!(
        e.code(),
        Code::PermissionDenied,
        "refused at the handshake: {e}"
    );

    // A certificate from another CA is refused too.
    let stranger = Ca::new("stranger ca").client("spiffe://test/ns/shop/sa/api");
    echo(addr, &ca.pem, Some(&stranger)).await.unwrap_err();

    // A valid certificate whose identity is not listed: PERMISSION_DENIED.
    let ads = ca.client("spiffe://test/ns/ads/sa/api");
    let e = echo(addr, &ca.pem, Some(&ads)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("spiffe://test/ns/ads/sa/api"), "{e}");

    // Health stays open to every client that completed the handshake.
    let ch = channel(addr, &ca.pem, Some(&ads)).await.unwrap();
    let h = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(h.is_ok(), "{h:?}");
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn admin_identities_replace_the_token_with_read_and_write_apart() {
    let dir = temp_dir("tls-admin");
    std::fs::write(dir.join("token"), "admin-token\n").unwrap();
    let ca = Ca::new("ops ca");
    let tls = listener_tls(
        "admin",
        &dir,
        &ca.server(),
        Some(&ca),
        "allow_read = [\"spiffe://test/monitoring\"]\nallow_write = [\"spiffe://test/ops\"]\n",
    );
    let server = serve(&dir, "demo:adapter", &tls).await;
    let addr = server.admin_addr;
    let admin = |id: Leaf| {
        let pem = ca.pem.clone();
        async move { common::AdminClient::new(channel(addr, &pem, Some(&id)).await.unwrap()) }
    };
    // A rollback is a change the admin API takes without a new backend.
    let change = || pb::SetRolloutRequest {
        action: "rollback".into(),
        actor: "test".into(),
        ..Default::default()
    };

    let mut monitoring = admin(ca.client("spiffe://test/monitoring")).await;
    monitoring
        .get_rollout(pb::GetRolloutRequest {})
        .await
        .unwrap();
    let e = monitoring.set_rollout(change()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("allow_write"), "{e}");

    let mut stranger = admin(ca.client("spiffe://test/shop")).await;
    let e = stranger
        .get_rollout(common::authed(pb::GetRolloutRequest {}, "admin-token"))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "the token does not replace an identity: {e}"
    );

    let mut ops = admin(ca.client("spiffe://test/ops")).await;
    ops.set_rollout(change()).await.unwrap();
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_admin_token_keeps_working_over_tls() {
    let dir = temp_dir("tls-admin-token");
    std::fs::write(dir.join("token"), "admin-token\n").unwrap();
    let ca = Ca::new("admin ca");
    let tls = listener_tls("admin", &dir, &ca.server(), None, "");
    let server = serve(&dir, "demo:adapter", &tls).await;
    let mut admin =
        common::AdminClient::new(channel(server.admin_addr, &ca.pem, None).await.unwrap());
    let e = admin
        .get_rollout(pb::GetRolloutRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    admin
        .get_rollout(common::authed(pb::GetRolloutRequest {}, "admin-token"))
        .await
        .unwrap();
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn rotated_files_serve_new_connections_without_a_restart_or_a_failed_call() {
    let dir = temp_dir("tls-rotate");
    let (old_ca, new_ca) = (Ca::new("old ca"), Ca::new("new ca"));
    let tls = listener_tls("bridge", &dir, &old_ca.server(), None, "")
        + "[tls]\nreload_interval = \"200ms\"\n";
    let server = serve(&dir, "demo:adapter", &tls).await;
    let addr = server.bridge_addr;

    // A call in flight on a connection made with the old certificate.
    let old = channel(addr, &old_ca.pem, None).await.unwrap();
    let mut in_flight_client = common::Client::new(old.clone());
    let in_flight = tokio::spawn(async move {
        in_flight_client
            .execute(exec("sleep", r#"{"seconds": 2}"#))
            .await
    });
    echo(addr, &new_ca.pem, None).await.unwrap_err();

    new_ca.server().write(&dir, "bridge");
    assert!(
        common::tls::until(|| async { echo(addr, &new_ca.pem, None).await.is_ok() }).await,
        "new connections got the new certificate within {BOUND:?}"
    );
    // New connections no longer get the old one.
    echo(addr, &old_ca.pem, None).await.unwrap_err();
    // The call in flight finished, and its connection still serves.
    let r = in_flight.await.unwrap().unwrap().into_inner();
    assert!(String::from_utf8_lossy(&r.payload).contains("slept"));
    common::Client::new(old)
        .execute(exec("echo", "{}"))
        .await
        .unwrap();
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_expired_certificate_stops_the_start_and_check_config_with_a_clear_error() {
    let dir = temp_dir("tls-expired");
    let ca = Ca::new("ca");
    write_token(&dir);
    let tls = listener_tls("bridge", &dir, &ca.expired_server(), None, "");
    let text = on_free_ports(
        "",
        &format!(
            "{}{}{tls}",
            pool_section("demo:adapter", 1),
            rollout_section(&dir)
        ),
    );
    let e = RunningServer::start(config(&text))
        .await
        .err()
        .expect("refused");
    let msg = e.to_string();
    assert!(msg.contains("tls.bridge.cert_file"), "{msg}");
    assert!(msg.contains("expired"), "{msg}");

    let file = dir.join("pitboss.toml");
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.bridge.cert_file") && err.contains("expired"),
        "{err}"
    );

    // A key that belongs to another certificate is named as such.
    let (c, _) = ca.server().write(&dir, "one");
    let (_, k) = ca.server().write(&dir, "two");
    let text = on_free_ports(
        "",
        &format!(
            "{}{}[tls.bridge]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            pool_section("demo:adapter", 1),
            rollout_section(&dir),
            c.display(),
            k.display()
        ),
    );
    let msg = RunningServer::start(config(&text))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(msg.contains("does not match"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_https_upstream_with_mtls_serves_the_new_role_through_the_rollout() {
    let up_dir = temp_dir("tls-upstream");
    let ca = Ca::new("upstream ca");
    let up_tls = listener_tls(
        "bridge",
        &up_dir,
        &ca.server(),
        Some(&ca),
        "allow = [\"spiffe://test/front\"]\n",
    );
    let upstream = serve(&up_dir, "demo_v2:adapter", &up_tls).await;

    let dir = temp_dir("tls-front");
    std::fs::write(
        dir.join("flags.toml"),
        "mode = \"canary\"\npercent = 100.0\ncommands = [\"*\"]\n",
    )
    .unwrap();
    let (c, k) = ca.client("spiffe://test/front").write(&dir, "front");
    let front_tls = format!(
        "[backends.new]\nkind = \"grpc\"\naddress = \"https://127.0.0.1:{}\"\n\
         [backends.new.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         server_name = \"localhost\"\n",
        upstream.bridge_addr.port(),
        ca.write(&dir, "upstream-ca.pem").display(),
        c.display(),
        k.display()
    );
    let front = serve(&dir, "demo:adapter", &front_tls).await;
    let mut client = common::Client::connect(format!("http://{}", front.bridge_addr))
        .await
        .unwrap();
    let r = client
        .execute(exec("version", "{}"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.backend, "new");
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["version"], 2);
    front.shutdown().await;
    upstream.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&up_dir).unwrap();
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[tokio::test]
async fn a_flood_of_failed_handshakes_leaves_pitboss_serving_and_its_fds_at_baseline() {
    use tokio::io::AsyncWriteExt;
    let dir = temp_dir("tls-flood");
    let ca = Ca::new("ca");
    let tls = listener_tls("bridge", &dir, &ca.server(), None, "");
    write_token(&dir);
    let file = dir.join("pitboss.toml");
    std::fs::write(
        &file,
        on_free_ports(
            "",
            &format!(
                "{}{}{tls}",
                pool_section("demo:adapter", 1),
                rollout_section(&dir)
            ),
        ),
    )
    .unwrap();
    // The real binary, so that its descriptors are its own.
    let proc = common::spawn(&file).await;
    let pid = proc.child.id().unwrap();
    let addr: std::net::SocketAddr = proc.bridge.trim_start_matches("http://").parse().unwrap();
    assert!(
        common::tls::until(|| async { echo(addr, &ca.pem, None).await.is_ok() }).await,
        "serving over TLS within {BOUND:?}"
    );
    let baseline = open_fds(pid);

    // 1,000 failed handshakes, 50 at a time: plaintext HTTP, or the start of a TLS
    // record and then a close.
    for round in 0..20 {
        let mut tasks = Vec::new();
        for i in 0..50 {
            tasks.push(tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                if (round + i) % 2 == 0 {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                } else {
                    let _ = s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x40]).await;
                }
                drop(s);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    echo(addr, &ca.pem, None).await.unwrap();
    assert!(
        eventually(BOUND, || open_fds(pid) <= baseline + 2).await,
        "file descriptors back to baseline {baseline}: now {}",
        open_fds(pid)
    );
    drop(proc);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stock grpcio client (Python), as a real user's would connect: TLS trusting the
/// CA, then mTLS with a client certificate; without one it is refused.
#[tokio::test]
async fn a_grpcio_client_connects_with_tls_and_mtls() {
    let py = tokio::task::spawn_blocking(common::grpcio_python)
        .await
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/examples/client.py");
    let dir = temp_dir("tls-grpcio");
    let ca = Ca::new("grpcio ca");
    let ca_file = ca.write(&dir, "ca.pem");
    let run = |addr: std::net::SocketAddr, extra: Vec<String>| {
        let (py, script, ca_file) = (py.clone(), script.clone(), ca_file.clone());
        async move {
            tokio::process::Command::new(py)
                .arg(script)
                .arg(format!("localhost:{}", addr.port()))
                .arg("--ca")
                .arg(ca_file)
                .args(extra)
                .output()
                .await
                .unwrap()
        }
    };

    // TLS.
    let tls = listener_tls("bridge", &dir, &ca.server(), None, "");
    let server = serve(&dir, "demo:adapter", &tls).await;
    let out = run(server.bridge_addr, vec![]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#"echo -> {"hello": "world"} from legacy"#),
        "{stdout}"
    );
    server.shutdown().await;

    // mTLS.
    let tls = listener_tls(
        "bridge",
        &dir,
        &ca.server(),
        Some(&ca),
        "allow = [\"spiffe://test/python-client\"]\n",
    );
    let server = serve(&dir, "demo:adapter", &tls).await;
    let (c, k) = ca
        .client("spiffe://test/python-client")
        .write(&dir, "client");
    let with_cert = vec![
        "--cert".to_string(),
        c.display().to_string(),
        "--key".to_string(),
        k.display().to_string(),
    ];
    let out = run(server.bridge_addr, with_cert).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#"echo -> {"hello": "world"} from legacy"#),
        "{stdout}"
    );
    let out = run(server.bridge_addr, vec![]).await;
    assert!(
        !out.status.success(),
        "a grpcio client without a certificate is refused"
    );
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `[tls.metrics]`: /healthz over HTTPS (HTTP/1.1), as a kubelet with `scheme: HTTPS`.
#[tokio::test]
async fn the_metrics_listener_serves_https_when_tls_metrics_is_set() {
    let dir = temp_dir("tls-metrics");
    let ca = Ca::new("metrics ca");
    let tls = listener_tls("metrics", &dir, &ca.server(), None, "");
    let server = serve(&dir, "demo:adapter", &tls).await;
    let mut https = common::tls::Https::connect(server.metrics_addr, &ca)
        .await
        .unwrap();
    let (status, body) = https.get("/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An admin listener off loopback without TLS is warned about at start.
#[tokio::test]
async fn an_admin_listener_off_loopback_without_tls_is_warned_about() {
    let dir = temp_dir("tls-admin-warning");
    write_token(&dir);
    let file = dir.join("pitboss.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\n\
             metrics_listen = \"127.0.0.1:0\"\n{}{}",
            pool_section("demo:adapter", 1),
            rollout_section(&dir)
        ),
    )
    .unwrap();
    let proc = common::spawn(&file).await;
    let warned = proc
        .logged(|l| l.contains("WARN") && l.contains("not on loopback") && l.contains("tls.admin"));
    assert!(warned, "{:?}", proc.log.lock().unwrap());
    drop(proc);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The admin listener rotates like the Bridge: replace the files, and new
/// connections get the new certificate, while calls keep going on a connection made
/// with the old one, none failing.
#[tokio::test]
async fn the_admin_listener_rotates_its_certificate_without_a_failed_call() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = temp_dir("tls-rotate-admin");
    let (old_ca, new_ca) = (Ca::new("old admin ca"), Ca::new("new admin ca"));
    let tls = listener_tls("admin", &dir, &old_ca.server(), None, "")
        + "[tls]\nreload_interval = \"200ms\"\n";
    let server = serve(&dir, "demo:adapter", &tls).await;
    let addr = server.admin_addr;
    common::tls::get_rollout(addr, &old_ca.pem).await.unwrap();
    common::tls::get_rollout(addr, &new_ca.pem)
        .await
        .unwrap_err();

    // Calls one after the other on a connection made with the old certificate, for
    // as long as the rotation takes.
    let old = channel(addr, &old_ca.pem, None).await.unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let calls = tokio::spawn({
        let (old, stop) = (old.clone(), stop.clone());
        async move {
            let mut client = common::AdminClient::new(old);
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match client
                    .get_rollout(common::authed(pb::GetRolloutRequest {}, "admin-token"))
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            (ok, failed)
        }
    });

    new_ca.server().write(&dir, "admin");
    assert!(
        common::tls::until(|| async { common::tls::get_rollout(addr, &new_ca.pem).await.is_ok() })
            .await,
        "new admin connections got the new certificate within {BOUND:?}"
    );
    common::tls::get_rollout(addr, &old_ca.pem)
        .await
        .unwrap_err();
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = calls.await.unwrap();
    assert!(
        failed.is_empty(),
        "calls failed during the rotation: {failed:?}"
    );
    assert!(
        ok > 0,
        "calls ran on the old connection during the rotation"
    );
    // And the old connection still serves after it.
    common::AdminClient::new(old)
        .get_rollout(common::authed(pb::GetRolloutRequest {}, "admin-token"))
        .await
        .unwrap();
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `[tls.metrics]` rotates too: a scraper's keep-alive connection keeps its session,
/// new connections get the new certificate.
#[tokio::test]
async fn the_metrics_listener_rotates_its_certificate_without_a_restart() {
    let dir = temp_dir("tls-rotate-metrics");
    let (old_ca, new_ca) = (Ca::new("old metrics ca"), Ca::new("new metrics ca"));
    let tls = listener_tls("metrics", &dir, &old_ca.server(), None, "")
        + "[tls]\nreload_interval = \"200ms\"\n";
    let server = serve(&dir, "demo:adapter", &tls).await;
    let addr = server.metrics_addr;
    let mut kept = common::tls::Https::connect(addr, &old_ca).await.unwrap();
    assert_eq!(kept.get("/healthz").await.unwrap().0, 200);
    assert!(common::tls::Https::connect(addr, &new_ca).await.is_err());

    new_ca.server().write(&dir, "metrics");
    let rotated = common::tls::until(|| async {
        match common::tls::Https::connect(addr, &new_ca).await {
            Ok(mut c) => c.get("/healthz").await.is_ok_and(|(s, _)| s == 200),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        rotated,
        "new connections got the new certificate within {BOUND:?}"
    );
    assert!(common::tls::Https::connect(addr, &old_ca).await.is_err());
    // The connection made before the rotation still answers.
    let (status, body) = kept.get("/healthz").await.unwrap();
    assert_eq!(status, 200, "{body}");
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `pitboss rollout --addr https://...`, on its stdout and stderr.
async fn rollout_cli(args: &[&str], token: Option<&str>) -> (bool, String, String) {
    let mut all = vec!["rollout"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--actor", "tester"]);
    let out = common::tls::pitboss_cli(&all, token).await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The real `pitboss rollout` and `pitboss status` against a TLS admin listener,
/// with the token; and the mistakes a user makes get an error that says what to do.
#[tokio::test]
async fn the_rollout_cli_reaches_a_tls_admin_listener_with_the_token() {
    let dir = temp_dir("tls-cli-token");
    let ca = Ca::new("cli ca");
    let tls = listener_tls("admin", &dir, &ca.server(), None, "");
    let server = serve(&dir, "demo:adapter", &tls).await;
    let ca_file = ca.write(&dir, "ca.pem");
    let ca_file = ca_file.to_str().unwrap();
    let https = format!("https://{}", server.admin_addr);
    let by_name = format!("https://localhost:{}", server.admin_addr.port());
    let token = Some("admin-token");

    let (ok, out, err) = rollout_cli(&["status", "--addr", &https, "--ca", ca_file], token).await;
    assert!(ok, "{err}");
    assert!(out.contains("mode"), "{out}");
    // A write, with the token, over TLS; `--tls-server-name` for an address the
    // certificate does not carry as a name (an IP it does carry works as well).
    let (ok, out, err) = rollout_cli(
        &[
            "pause",
            "--addr",
            &https,
            "--ca",
            ca_file,
            "--tls-server-name",
            "localhost",
        ],
        token,
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("state paused"), "{out}");
    let (ok, out, err) = rollout_cli(&["resume", "--addr", &by_name, "--ca", ca_file], token).await;
    assert!(ok, "{err}");
    assert!(out.contains("state active"), "{out}");
    // `pitboss status` takes the same flags.
    let out = common::tls::pitboss_cli(&["status", "--addr", &https, "--ca", ca_file], token).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pool"));

    // Without the token: UNAUTHENTICATED, said so.
    let (ok, _, err) = rollout_cli(&["pause", "--addr", &https, "--ca", ca_file], None).await;
    assert!(!ok);
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("--token"),
        "{err}"
    );
    // Without --ca the system's roots do not know the test CA.
    let (ok, _, err) = rollout_cli(&["status", "--addr", &https], token).await;
    assert!(!ok);
    assert!(
        err.contains("UnknownIssuer") && err.contains("--ca"),
        "{err}"
    );
    // A name the certificate does not carry.
    let (ok, _, err) = rollout_cli(
        &[
            "status",
            "--addr",
            &https,
            "--ca",
            ca_file,
            "--tls-server-name",
            "elsewhere.example",
        ],
        token,
    )
    .await;
    assert!(!ok);
    assert!(err.contains("--tls-server-name"), "{err}");
    // An unreadable CA file is named by its flag.
    let missing = dir.join("no-such-ca.pem");
    let (ok, _, err) = rollout_cli(
        &[
            "status",
            "--addr",
            &https,
            "--ca",
            missing.to_str().unwrap(),
        ],
        token,
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains(&format!("--ca = {}: cannot read", missing.display())),
        "{err}"
    );
    // A file that is not a certificate.
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let (ok, _, err) = rollout_cli(
        &["status", "--addr", &https, "--ca", junk.to_str().unwrap()],
        token,
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("--ca") && err.contains("no PEM certificate"),
        "{err}"
    );
    // TLS flags with a plaintext address, and plaintext to the TLS port.
    let http = format!("http://{}", server.admin_addr);
    let (ok, _, err) = rollout_cli(&["status", "--addr", &http, "--ca", ca_file], token).await;
    assert!(!ok);
    assert!(err.contains("use https://"), "{err}");
    let (ok, _, err) = rollout_cli(&["status", "--addr", &http], token).await;
    assert!(!ok, "plaintext to a TLS admin listener must fail");
    assert!(err.contains("use an https:// address"), "{err}");
    // --cert without --key is refused by the parser.
    let (ok, _, err) = rollout_cli(&["status", "--addr", &https, "--cert", ca_file], token).await;
    assert!(!ok);
    assert!(err.contains("--key"), "{err}");
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With mTLS and admin allowlists, the CLI's client certificate replaces the token:
/// a writer changes the rollout, a reader reads and is refused PERMISSION_DENIED on a
/// change, and no certificate is refused at the handshake.
#[tokio::test]
async fn the_rollout_cli_uses_an_mtls_identity_instead_of_the_token() {
    let dir = temp_dir("tls-cli-mtls");
    let ca = Ca::new("cli ops ca");
    let tls = listener_tls(
        "admin",
        &dir,
        &ca.server(),
        Some(&ca),
        "allow_read = [\"spiffe://test/monitoring\"]\nallow_write = [\"spiffe://test/ops\"]\n",
    );
    let server = serve(&dir, "demo:adapter", &tls).await;
    let ca_file = ca.write(&dir, "ca.pem").display().to_string();
    let https = format!("https://{}", server.admin_addr);
    let (ops_c, ops_k) = ca.client("spiffe://test/ops").write(&dir, "ops");
    let (mon_c, mon_k) = ca
        .client("spiffe://test/monitoring")
        .write(&dir, "monitoring");
    let with = |cert: &Path, key: &Path, action: &str| {
        vec![
            action.to_string(),
            "--addr".into(),
            https.clone(),
            "--ca".into(),
            ca_file.clone(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
        ]
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rollout_cli(&args, None).await
    };

    // The writer: no token, its identity is enough.
    let (ok, out, err) = run(with(&ops_c, &ops_k, "pause")).await;
    assert!(ok, "{err}");
    assert!(out.contains("state paused"), "{out}");
    let (ok, _, err) = run(with(&ops_c, &ops_k, "history")).await;
    assert!(ok, "{err}");

    // The reader reads, and may not write: PERMISSION_DENIED, clearly.
    let (ok, out, err) = run(with(&mon_c, &mon_k, "status")).await;
    assert!(ok, "{err}");
    assert!(out.contains("state paused"), "{out}");
    let (ok, _, err) = run(with(&mon_c, &mon_k, "resume")).await;
    assert!(!ok, "a read-only identity must not change the rollout");
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    assert!(err.contains("allow_write"), "{err}");
    // Not even with the token: the identity decides.
    let mut args = with(&mon_c, &mon_k, "resume");
    args.extend(["--token".to_string(), "admin-token".to_string()]);
    let (ok, _, err) = run(args).await;
    assert!(!ok);
    assert!(err.contains("PERMISSION_DENIED"), "{err}");
    // Nothing changed.
    let (ok, out, err) = run(with(&ops_c, &ops_k, "status")).await;
    assert!(ok, "{err}");
    assert!(out.contains("state paused"), "{out}");

    // No client certificate: refused at the handshake, with the hint.
    let (ok, _, err) = rollout_cli(&["status", "--addr", &https, "--ca", &ca_file], None).await;
    assert!(!ok);
    assert!(err.contains("--cert"), "{err}");
    // A key that is not the certificate's.
    let (ok, _, err) = run(with(&ops_c, &mon_k, "status")).await;
    assert!(!ok);
    assert!(
        err.contains("--key") && err.contains("does not match"),
        "{err}"
    );
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
