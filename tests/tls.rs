//! TLS and mTLS on the listeners and to an `https://` upstream (issue 18), with real
//! servers, real Python workers and certificates made at test time.

mod common;

use std::path::Path;
use std::time::Duration;

use common::certs::{Ca, Leaf};
use common::{config, eventually, exec, on_free_ports, pool_section, rollout_section, temp_dir};
use pitboss::grpc::pb;
use pitboss::server::RunningServer;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Code;

const BOUND: Duration = Duration::from_secs(30);

/// A server on `adapter` with `tls` (TOML text) after the pool section, started and
/// ready.
async fn serve(dir: &Path, adapter: &str, tls: &str) -> RunningServer {
    write_token(dir);
    let text = on_free_ports(
        "shutdown_grace = \"5s\"",
        &format!("{}{}{tls}", pool_section(adapter, 1), rollout_section(dir)),
    );
    let server = RunningServer::start(config(&text)).await.unwrap();
    server.pool().wait_ready(1, BOUND).await.unwrap();
    server
}

/// The admin token file [`rollout_section`] names, unless the test wrote its own.
fn write_token(dir: &Path) {
    if !dir.join("token").exists() {
        std::fs::write(dir.join("token"), "admin-token\n").unwrap();
    }
}

/// A channel to `addr` over TLS trusting `ca`, presenting `id` when given.
async fn channel(
    addr: std::net::SocketAddr,
    ca: &str,
    id: Option<&Leaf>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(id) = id {
        tls = tls.identity(id.identity());
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// One `echo` call on a fresh TLS connection: its payload, or the status (a failed
/// connection reads as UNAVAILABLE).
async fn echo(
    addr: std::net::SocketAddr,
    ca: &str,
    id: Option<&Leaf>,
) -> Result<String, tonic::Status> {
    let ch = channel(addr, ca, id)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
    let r = common::Client::new(ch)
        .execute(exec("echo", r#"{"hi":1}"#))
        .await?
        .into_inner();
    Ok(String::from_utf8_lossy(&r.payload).into_owned())
}

fn listener_tls(
    name: &str,
    dir: &Path,
    server: &Leaf,
    client_ca: Option<&Ca>,
    extra: &str,
) -> String {
    let (c, k) = server.write(dir, name);
    let ca = client_ca
        .map(|ca| {
            format!(
                "client_ca_file = \"{}\"\n",
                ca.write(dir, &format!("{name}-client-ca.pem")).display()
            )
        })
        .unwrap_or_default();
    format!(
        "[tls.{name}]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{ca}{extra}",
        c.display(),
        k.display()
    )
}

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
    let mut rotated = false;
    let deadline = tokio::time::Instant::now() + BOUND;
    while tokio::time::Instant::now() < deadline {
        if echo(addr, &new_ca.pem, None).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        rotated,
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
    let mut ok = false;
    let deadline = tokio::time::Instant::now() + BOUND;
    while !ok && tokio::time::Instant::now() < deadline {
        ok = echo(addr, &ca.pem, None).await.is_ok();
        if !ok {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(ok, "serving over TLS within {BOUND:?}");
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = temp_dir("tls-metrics");
    let ca = Ca::new("metrics ca");
    let tls = listener_tls("metrics", &dir, &ca.server(), None, "");
    let server = serve(&dir, "demo:adapter", &tls).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.metrics_addr)
        .await
        .unwrap();
    let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The server may close without close_notify; what arrived is what counts.
    let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
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
    let warned =
        proc.log.lock().unwrap().iter().any(|l| {
            l.contains("WARN") && l.contains("not on loopback") && l.contains("tls.admin")
        });
    assert!(warned, "{:?}", proc.log.lock().unwrap());
    drop(proc);
    std::fs::remove_dir_all(&dir).unwrap();
}
