//! End to end: the real server on 127.0.0.1:0 with real Python workers, driven through
//! a tonic client and through the `pitboss` binary.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use pitboss::config::Config;
use pitboss::grpc::pb;
use pitboss::server::RunningServer;
use tonic::transport::Channel;
use tonic::Code;

const LONG: Duration = Duration::from_secs(20);

/// A config on free ports with a 10 s shutdown grace, and `extra`.
fn config_with(extra: &str) -> Config {
    config(&on_free_ports("shutdown_grace = \"10s\"", extra))
}

#[tokio::test]
async fn execute_and_execute_stream_work() {
    let (server, mut client) = start(config_with("")).await;
    let resp = client
        .execute(exec("echo", r#"{"hello":"world"}"#))
        .await
        .unwrap();
    assert_eq!(resp.metadata().get("x-pitboss-backend").unwrap(), "legacy");
    let r = resp.into_inner();
    assert_eq!(&r.payload[..], br#"{"hello":"world"}"#);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.backend, "legacy");
    assert_eq!(r.attempts, 1);
    assert!(r.worker_id.starts_with('w'));

    let chunks = collect(
        client
            .execute_stream(exec("stream", r#"{"n": 5}"#))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(chunks.len(), 5);
    for (i, c) in chunks.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_slice(&c.payload).unwrap();
        assert_eq!(v["i"], i);
        assert_eq!(c.last, i == 4);
    }
    assert_eq!(chunks[4].backend, "legacy");
    assert!(!chunks[4].worker_id.is_empty());

    let cmds = client
        .list_commands(pb::ListCommandsRequest {})
        .await
        .unwrap()
        .into_inner();
    let stream_cmd = cmds.commands.iter().find(|c| c.name == "stream").unwrap();
    assert!(stream_cmd.streaming);
    server.shutdown().await;
}

#[tokio::test]
async fn sessions_create_get_close_and_expire_with_affinity() {
    let (server, mut client) = start(config_with("[sessions]\nttl = \"1s\"\n")).await;
    let mut md = std::collections::HashMap::new();
    md.insert("user".to_string(), "ada".to_string());
    let s = client
        .create_session(pb::CreateSessionRequest {
            metadata: md,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.session_id.len(), 32);
    assert_eq!(s.backend, "legacy");
    assert!(s.expires_at.unwrap().seconds >= s.created_at.unwrap().seconds);
    for n in 1..=4 {
        let mut req = exec("counter", "{}");
        req.session_id = s.session_id.clone();
        let r = client.execute(req).await.unwrap().into_inner();
        assert_eq!(
            r.worker_id, s.worker_id,
            "affinity: the session's worker serves it"
        );
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["count"], n);
    }
    let got = client
        .get_session(pb::GetSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metadata.get("user").map(String::as_str), Some("ada"));
    client
        .close_session(pb::CloseSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .unwrap();
    let err = client
        .get_session(pb::GetSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("create a new session"),
        "{}",
        err.message()
    );

    // An idle session expires after its TTL.
    let s2 = client
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut expired = false;
    let deadline = tokio::time::Instant::now() + LONG;
    while tokio::time::Instant::now() < deadline {
        let r = client
            .get_session(pb::GetSessionRequest {
                session_id: s2.session_id.clone(),
            })
            .await;
        if matches!(&r, Err(e) if e.code() == Code::NotFound) {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "session did not expire");
    server.shutdown().await;
}

#[tokio::test]
async fn a_python_exception_becomes_a_status_with_type_and_message() {
    let (server, mut client) = start(config_with(
        "[pool]\nadapter = \"faults:adapter\"\nsize = 1\n",
    ))
    .await;
    let err = client
        .execute(exec(
            "raise",
            r#"{"type": "ZeroDivisionError", "message": "missing"}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown);
    assert!(
        err.message().contains("ZeroDivisionError"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("missing"), "{}", err.message());
    assert_eq!(
        err.metadata().get("x-pitboss-python-type").unwrap(),
        "ZeroDivisionError"
    );
    assert_eq!(error_class(&err), "python_exception");
    // The traceback travels in the details only (the trailers' budget).
    let details = tonic_types::StatusExt::get_error_details(&err);
    assert!(details.error_info().unwrap().metadata["traceback"].contains("ZeroDivisionError"));
    // pitboss_worker.InvalidRequest is the caller's bad input: INVALID_ARGUMENT.
    let bad = client
        .execute(exec(
            "raise",
            r#"{"type": "InvalidRequest", "message": "n must be positive"}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert_eq!(error_class(&bad), "invalid_request");
    assert!(bad.message().contains("n must be positive"));
    let unknown = client.execute(exec("nope", "{}")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(
        unknown.message().contains("echo"),
        "lists known commands: {}",
        unknown.message()
    );
    let empty = client.execute(exec("", "{}")).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn the_clients_deadline_is_honoured_down_to_the_worker() {
    let (server, mut client) = start(config_with(
        "[pool]\nadapter = \"faults:adapter\"\nsize = 1\n",
    ))
    .await;
    // The worker sees the time left before the client's deadline.
    let mut req = tonic::Request::new(exec("deadline", "{}"));
    req.set_timeout(Duration::from_secs(5));
    let r = client.execute(req).await.unwrap().into_inner();
    let left = serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["timeout"]
        .as_f64()
        .unwrap();
    assert!(left > 3.0 && left <= 5.0, "worker saw {left} s left");

    // At the deadline the command is cancelled on the worker, which is free again at
    // once (the command would otherwise run for 30 s) and is not replaced.
    let pid = server.pool().pids()[0];
    let mut req = tonic::Request::new(exec("sleep", r#"{"seconds": 30}"#));
    req.set_timeout(Duration::from_millis(300));
    let start = tokio::time::Instant::now();
    let err = client.execute(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let pool = server.pool().clone();
    assert!(
        eventually(Duration::from_secs(5), || pool.status().workers[0]
            .in_flight
            == 0)
        .await
    );
    let mut quick = tonic::Request::new(exec("echo", "1"));
    quick.set_timeout(Duration::from_secs(5));
    client.execute(quick).await.unwrap();
    assert_eq!(server.pool().pids(), vec![pid]);
    server.shutdown().await;
}

/// The services that reflection lists on `addr`, asked in `v1` and in `v1alpha`.
async fn reflected_services(addr: std::net::SocketAddr) -> (Vec<String>, Vec<String>) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let v1 = {
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected v1 reflection answer");
        };
        list.service.into_iter().map(|s| s.name).collect()
    };
    let v1alpha = {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("unexpected v1alpha reflection answer");
        };
        list.service.into_iter().map(|s| s.name).collect()
    };
    (v1, v1alpha)
}

/// Issue 13 item 15: reflection answers in v1 and v1alpha (grpcio-reflection, older
/// grpcurl, Postman), and each port lists only what it serves.
#[tokio::test]
async fn reflection_speaks_v1_and_v1alpha_and_each_port_lists_only_its_services() {
    let (server, _client) = start(config_with("")).await;
    let mut reflection = vec![
        "grpc.reflection.v1.ServerReflection".to_string(),
        "grpc.reflection.v1alpha.ServerReflection".to_string(),
    ];
    let mut bridge = vec![
        "grpc.health.v1.Health".to_string(),
        "pitboss.v1.Bridge".to_string(),
    ];
    bridge.extend(reflection.clone());
    bridge.sort();
    let (v1, v1alpha) = reflected_services(server.bridge_addr).await;
    for mut got in [v1, v1alpha] {
        got.sort();
        assert_eq!(got, bridge, "bridge port");
    }
    reflection.push("pitboss.v1.Admin".to_string());
    reflection.sort();
    let (v1, v1alpha) = reflected_services(server.admin_addr).await;
    for mut got in [v1, v1alpha] {
        got.sort();
        assert_eq!(got, reflection, "admin port");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn health_flips_to_not_serving_during_shutdown_and_reflection_lists_services() {
    let (server, _client) = start(config_with("")).await;
    let channel = Channel::from_shared(format!("http://{}", server.bridge_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = |svc: &str| tonic_health::pb::HealthCheckRequest {
        service: svc.into(),
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let mut ok = false;
    for _ in 0..100 {
        if health
            .check(check("pitboss.v1.Bridge"))
            .await
            .unwrap()
            .into_inner()
            .status
            == serving
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "never SERVING");
    assert_eq!(
        health.check(check("")).await.unwrap().into_inner().status,
        serving
    );

    // Reflection lists the services.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in ["pitboss.v1.Bridge", "grpc.health.v1.Health"] {
        assert!(names.contains(&s.to_string()), "{s} not in {names:?}");
    }

    // Watch health while shutting down: it must report NOT_SERVING.
    let mut watch = health
        .watch(check("pitboss.v1.Bridge"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, serving);
    let shutdown = tokio::spawn(server.shutdown());
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    let next = tokio::time::timeout(LONG, watch.message()).await.unwrap();
    assert_eq!(next.unwrap().unwrap().status, not_serving);
    shutdown.await.unwrap();
}

#[tokio::test]
async fn new_calls_are_refused_while_in_flight_calls_finish_on_shutdown() {
    let (server, client) = start(config_with("")).await;
    let mut c1 = client.clone();
    let in_flight =
        tokio::spawn(async move { c1.execute(exec("sleep", r#"{"seconds": 1.0}"#)).await });
    let pool = server.pool().clone();
    assert!(
        eventually(LONG, || pool
            .status()
            .workers
            .iter()
            .any(|w| w.in_flight > 0))
        .await
    );
    let shutdown = tokio::spawn(server.shutdown());
    // New calls are refused with UNAVAILABLE while the in-flight one is still running.
    let mut c2 = client.clone();
    let mut refused = None;
    for _ in 0..100 {
        match c2.execute(exec("echo", "1")).await {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let refused = refused.expect("new calls were still accepted during shutdown");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        !in_flight.is_finished(),
        "the refusal came while the sleep was still running"
    );
    let r = in_flight.await.unwrap().unwrap().into_inner();
    assert_eq!(&r.payload[..], br#"{"slept":1.0}"#);
    shutdown.await.unwrap();
    assert!(pool.status().workers.iter().all(|w| w.pid.is_none()));
}

#[tokio::test]
async fn the_call_and_status_commands_work() {
    let (server, _client) = start(config_with("")).await;
    let bin = env!("CARGO_BIN_EXE_pitboss");
    let addr = format!("http://{}", server.bridge_addr);
    let out = tokio::process::Command::new(bin)
        .args(["call", "echo", "--payload", r#"{"x":42}"#, "--addr", &addr])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"x":42}"#);

    // Binary payloads from a file, or stdin, come back byte-exact on stdout (before:
    // the payload was text only, and the result was printed as lossy UTF-8 plus a
    // newline, so `pitboss call render > out.png` made a broken file).
    let dir = temp_dir("call-binary");
    let input = dir.join("in.bin");
    let bytes: Vec<u8> = (0..=255u8).rev().collect();
    std::fs::write(&input, &bytes).unwrap();
    let at_file = format!("@{}", input.display());
    let out = tokio::process::Command::new(bin)
        .args(["call", "echo", "--payload", &at_file])
        .args([
            "--content-type",
            "application/octet-stream",
            "--addr",
            &addr,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, bytes, "the bytes of the file, exactly");
    let mut child = tokio::process::Command::new(bin)
        .args(["call", "echo", "--payload", "-", "--addr", &addr])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(br#"{"from":"stdin"}"#).await.unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"{\"from\":\"stdin\"}\n");
    let _ = std::fs::remove_dir_all(&dir);

    let out = tokio::process::Command::new(bin)
        .args([
            "call",
            "stream",
            "--stream",
            "--payload",
            r#"{"n":3}"#,
            "--addr",
            &addr,
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);

    let out = tokio::process::Command::new(bin)
        .args(["call", "nope", "--addr", &addr])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));

    let out = tokio::process::Command::new(bin)
        .args(["health", "--addr", &addr])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");

    let out = tokio::process::Command::new(bin)
        .args(["status", "--addr", &format!("http://{}", server.admin_addr)])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pool legacy (demo:adapter)"), "{text}");
    assert!(text.contains("ready 2/2"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with('w') && l.contains(" ready "))
            .count(),
        2,
        "{text}"
    );
    server.shutdown().await;
}

#[test]
fn a_bad_config_file_gives_a_clear_error() {
    let dir = temp_dir("test");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[pool]\nsize = 2\nheartbeat_interval = \"often\"\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_pitboss");
    let out = Command::new(bin)
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3"), "{err}");
    assert!(err.contains("heartbeat_interval"), "{err}");
    // `serve` refuses it too, before starting anything.
    let out = Command::new(bin)
        .args(["serve", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.toml:3"));
    // A good file prints the effective configuration.
    std::fs::write(&file, "[pool]\nsize = 3\n").unwrap();
    let out = Command::new(bin)
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("size = 3"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Issue 13 item 19: once a session has expired, its id can be created again at once,
/// and a refused CreateSession (the id is live) extends nothing.
#[tokio::test]
async fn an_expired_session_id_can_be_created_again_at_once() {
    let (server, mut client) = start(config_with("[sessions]\nttl = \"1s\"\n")).await;
    let create = |id: &str| pb::CreateSessionRequest {
        session_id: id.into(),
        ..Default::default()
    };
    let s = client
        .create_session(create("sess-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.session_id, "sess-a");
    // While it lives, the id is taken.
    let err = client.create_session(create("sess-a")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // Wait until the backend says it expired (no call naming it in between).
    let expired = eventually(LONG, || server.pool().get_session("sess-a").is_err()).await;
    assert!(expired, "the session never expired");
    let err = client
        .get_session(pb::GetSessionRequest {
            session_id: "sess-a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Recreated at once, and it is a fresh session.
    let again = client
        .create_session(create("sess-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.session_id, "sess-a");
    let mut req = exec("counter", "{}");
    req.session_id = "sess-a".into();
    let r = client.execute(req).await.unwrap().into_inner();
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["count"], 1, "a fresh session starts from zero");
    // A closed id can be reused at once too.
    client
        .close_session(pb::CloseSessionRequest {
            session_id: "sess-a".into(),
        })
        .await
        .unwrap();
    client.create_session(create("sess-a")).await.unwrap();
    server.shutdown().await;
}

/// Issue 13 item 19, worker loss: a session lost with its worker leaves a tombstone
/// (calls naming it get session_lost until the TTL), but that tombstone does not hold
/// the id: CreateSession with it starts a fresh session at once.
#[tokio::test]
async fn a_lost_session_id_can_be_created_again_at_once() {
    let (server, mut client) = start(config_with("[pool]\nsize = 1\n")).await;
    let create = || pb::CreateSessionRequest {
        session_id: "sess-l".into(),
        ..Default::default()
    };
    client.create_session(create()).await.unwrap();
    let mut req = exec("counter", "{}");
    req.session_id = "sess-l".into();
    client.execute(req.clone()).await.unwrap();
    let pid = server.pool().pids()[0];
    kill(pid, libc::SIGKILL);
    let lost = eventually(LONG, || {
        matches!(
            server.pool().get_session("sess-l"),
            Err(pitboss::pool::PoolError::SessionLost { .. })
        )
    })
    .await;
    assert!(lost, "the session was never marked lost");
    // A replacement worker is ready.
    let mut ready = false;
    for _ in 0..600 {
        if client.execute(exec("echo", "{}")).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "no replacement worker");
    let again = client.create_session(create()).await.unwrap().into_inner();
    assert_eq!(again.session_id, "sess-l");
    let r = client.execute(req).await.unwrap().into_inner();
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["count"], 1, "a fresh session starts from zero");
    server.shutdown().await;
}

/// Issue 13 items 13 and 14 with the real binary: an override of a key the file does
/// not write takes effect, a typo is refused with the closest key, and (issue 18) an
/// https upstream's TLS material is loaded: a CA file that cannot be read is named.
#[test]
fn check_config_applies_every_env_override_and_refuses_typos_and_bad_upstream_tls() {
    let dir = temp_dir("test-env");
    let file = dir.join("p.toml");
    std::fs::write(&file, "[backends.new]\nkind = \"pool\"\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_pitboss");
    let out = Command::new(bin)
        .args(["check-config", file.to_str().unwrap()])
        .env("PITBOSS_BACKENDS_NEW_POOL_WORKER_CONCURRENCY", "3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("worker_concurrency = 3"), "{text}");

    let out = Command::new(bin)
        .args(["check-config", file.to_str().unwrap()])
        .env("PITBOSS_POOL_SIZ", "4")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PITBOSS_POOL_SIZ"), "{err}");
    assert!(err.contains("PITBOSS_POOL_SIZE"), "{err}");

    std::fs::write(
        &file,
        "[backends.new]\nkind = \"grpc\"\naddress = \"https://127.0.0.1:1\"\n\
         [backends.new.tls]\nca_file = \"missing-ca.pem\"\n",
    )
    .unwrap();
    let out = Command::new(bin)
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backends.new.tls.ca_file"), "{err}");
    assert!(err.contains("missing-ca.pem"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_grpcio_client_in_python_can_call_execute() {
    let py = tokio::task::spawn_blocking(common::grpcio_python)
        .await
        .unwrap();
    let (server, _client) = start(config_with("")).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/examples/client.py");
    let out = tokio::process::Command::new(py)
        .arg(script)
        .arg(server.bridge_addr.to_string())
        .output()
        .await
        .unwrap();
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
    assert!(stdout.contains("counter -> 3"), "{stdout}");
    assert!(
        stdout.contains("stream -> ['{\"i\":0}', '{\"i\":1}', '{\"i\":2}']"),
        "{stdout}"
    );
    assert!(stdout.contains("error -> NOT_FOUND"), "{stdout}");
    server.shutdown().await;
}

/// Issue 13 item 7: huge error texts reach a stock grpcio client (default metadata
/// limits) as their real status with a cut message, not as RESOURCE_EXHAUSTED
/// "received metadata size exceeds hard limit".
#[tokio::test]
async fn a_grpcio_client_reads_errors_with_huge_texts() {
    use prost::Message;
    let py = tokio::task::spawn_blocking(common::grpcio_python)
        .await
        .unwrap();
    let (server, _client) = start(config_with("[pool]\nadapter = \"faults:adapter\"\n")).await;
    let raise = |ty: &str, n: usize| {
        let payload = serde_json::json!({"type": ty, "message": "m".repeat(n)}).to_string();
        exec("raise", payload)
    };
    let cases = [
        (raise("RuntimeError", 8000), "UNKNOWN", "python_exception"),
        (
            raise("InvalidRequest", 3000),
            "INVALID_ARGUMENT",
            "invalid_request",
        ),
        (
            exec(&"c".repeat(9000), "{}"),
            "NOT_FOUND",
            "unknown_command",
        ),
    ];
    let hex: Vec<String> = cases
        .iter()
        .map(|(r, _, _)| {
            r.encode_to_vec()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .collect();
    let script = r#"
import binascii, sys, grpc
call = grpc.insecure_channel(sys.argv[1]).unary_unary("/pitboss.v1.Bridge/Execute")
for h in sys.argv[2:]:
    try:
        call(binascii.unhexlify(h), timeout=20)
        print("OK - -")
    except grpc.RpcError as e:
        md = dict(e.trailing_metadata() or ())
        print(e.code().name, len(e.details() or ""), md.get("x-pitboss-error-class", "-"))
"#;
    let out = tokio::process::Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(server.bridge_addr.to_string())
        .args(&hex)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), cases.len(), "{stdout}");
    for (line, (_, code, class)) in lines.iter().zip(&cases) {
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts[0], *code, "{line}");
        assert_eq!(parts[2], *class, "{line}");
        let len: usize = parts[1].parse().unwrap();
        assert!(
            len > 0 && len < 1024,
            "the message is there and cut: {line}"
        );
    }
    server.shutdown().await;
}

#[tokio::test]
async fn health_is_not_serving_while_no_worker_is_ready() {
    let cfg = config_with(
        "[pool]\nadapter = \"faults:adapter\"\nsize = 1\nenv = { PITBOSS_FAULT_CRASH_ON_START = \"1\" }\n\
         [pool.restart]\nbackoff_base = \"20ms\"\nmax_restarts = 2\n",
    );
    let server = RunningServer::start(cfg).await.unwrap();
    let pool = server.pool().clone();
    // Wait until the crash loop has marked the pool degraded.
    assert!(eventually(LONG, || pool.status().degraded).await);
    let bin = env!("CARGO_BIN_EXE_pitboss");
    let out = tokio::process::Command::new(bin)
        .args([
            "health",
            "--addr",
            &format!("http://{}", server.bridge_addr),
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "NOT_SERVING");
    // Calls fail fast with a clear error rather than hanging.
    let mut client = Client::connect(format!("http://{}", server.bridge_addr))
        .await
        .unwrap();
    let mut req = tonic::Request::new(exec("echo", "1"));
    req.set_timeout(Duration::from_secs(10));
    let start = tokio::time::Instant::now();
    let err = client.execute(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("degraded"), "{}", err.message());
    assert!(
        err.message().contains("exit status 3"),
        "says why: {}",
        err.message()
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "fails fast: {:?}",
        start.elapsed()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn readiness_and_health_follow_every_transition() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let cfg = config_with(
        "[pool]\nadapter = \"faults:adapter\"\nsize = 1\n[pool.restart]\nbackoff_base = \"20ms\"\n\
         [retry]\nmax_attempts = 1\n\
         [circuit_breaker]\nconsecutive_failures = 2\nopen_for = \"2s\"\nworker_consecutive_failures = 0\n",
    );
    let server = RunningServer::start(cfg).await.unwrap();
    let http = server.metrics_addr;
    let channel = Channel::from_shared(format!("http://{}", server.bridge_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = |svc: &'static str| {
        let mut h = health.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest {
                service: svc.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
        }
    };
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    async fn until_status(
        f: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = i32>>>,
        want: i32,
    ) -> bool {
        for _ in 0..200 {
            if f().await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
    let bridge = || Box::pin(status("pitboss.v1.Bridge")) as std::pin::Pin<Box<_>>;

    // Starting -> ready.
    assert!(until_status(bridge, serving).await, "never SERVING");
    assert_eq!(http_get(http, "/readyz").await.0, 200);
    assert_eq!(status("").await, serving);
    assert_eq!(status("pitboss.v1.Admin").await, serving);

    // The backend's breaker opens: not ready, and says why; Admin stays up.
    let mut client = pb::bridge_client::BridgeClient::new(channel.clone());
    for _ in 0..2 {
        let e = client.execute(exec("crash", "{}")).await.unwrap_err();
        assert_eq!(error_class(&e), "worker_crashed");
    }
    assert!(
        until_status(bridge, not_serving).await,
        "open breaker still SERVING"
    );
    let (code, body) = http_get(http, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("circuit breaker is open"), "{body}");
    assert_eq!(status("").await, not_serving);
    assert_eq!(status("pitboss.v1.Admin").await, serving);
    assert_eq!(http_get(http, "/healthz").await.0, 200, "alive all along");

    // Its open period ends: ready to probe again, without any traffic.
    assert!(
        until_status(bridge, serving).await,
        "never ready after open_for"
    );
    assert_eq!(http_get(http, "/readyz").await.0, 200);

    // Draining: everything NOT_SERVING, /readyz says why while calls finish.
    let slow = tokio::spawn({
        let mut c = client.clone();
        async move { c.execute(exec("sleep", r#"{"seconds": 1.0}"#)).await }
    });
    assert!(
        eventually(LONG, || in_flight(server.pool()) == 1).await,
        "the slow call is running"
    );
    let shutdown = tokio::spawn(server.shutdown());
    let mut saw_draining = false;
    for _ in 0..100 {
        let (code, body) = http_get(http, "/readyz").await;
        if code == 503 && body.contains("draining") {
            saw_draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_draining, "/readyz never said draining");
    slow.await.unwrap().expect("the in-flight call finishes");
    shutdown.await.unwrap();
}

/// Runs the real binary on a one-worker config (`server_extra` added to its
/// `[server]`) with `log_args`, reads its stderr until `done` holds for a line, and
/// returns the lines read; then stops it.
async fn stderr_until(
    tag: &str,
    server_extra: &str,
    log_args: &[&str],
    done: impl Fn(&str) -> bool,
) -> Vec<String> {
    use tokio::io::AsyncBufReadExt;
    let dir = temp_dir(tag);
    let cfg = dir.join("p.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
             {server_extra}[pool]\nsize = 1\n"
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .args(log_args)
        .arg("--config")
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = vec![];
    tokio::time::timeout(LONG, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let finished = done(&line);
            seen.push(line);
            if finished {
                return;
            }
        }
        panic!("stderr ended first: {seen:?}");
    })
    .await
    .expect("the line within the bound");
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    seen
}

#[tokio::test]
async fn logs_are_json_lines_on_request() {
    let json = |line: &str| {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let seen = stderr_until("json-logs", "", &["--log-format", "json"], |l| {
        json(l)["fields"]["message"] == "worker ready"
    })
    .await;
    let found = json(seen.last().unwrap());
    assert_eq!(found["level"], "INFO");
    assert!(found["fields"]["worker"].is_string(), "{found}");
}

/// A client that watches health (grpc-go's `healthCheckConfig`, grpc-java's health
/// checking: a `Watch` per connection, no deadline) does not hold the shutdown: the
/// drain tells it NOT_SERVING, then ends its watch with UNAVAILABLE, and pitboss
/// stops at once. Before, the watch never ended and every shutdown waited the whole
/// `shutdown_grace` (here 20 s), then logged unfinished calls. An unknown service is
/// SERVICE_UNKNOWN with the watch kept open (the health protocol), not NOT_FOUND.
#[tokio::test]
async fn health_watchers_do_not_hold_the_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    let server = RunningServer::start(config(&on_free_ports("shutdown_grace = \"20s\"", "")))
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}", server.bridge_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let watch = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let mut bridge = health
        .watch(watch("pitboss.v1.Bridge"))
        .await
        .unwrap()
        .into_inner();
    let mut unknown = health
        .watch(watch("no.such.Service"))
        .await
        .unwrap()
        .into_inner();
    let status =
        |r: tonic_health::pb::HealthCheckResponse| ServingStatus::try_from(r.status).unwrap();
    let mut first = status(bridge.message().await.unwrap().unwrap());
    while first != ServingStatus::Serving {
        first = status(
            tokio::time::timeout(LONG, bridge.message())
                .await
                .expect("SERVING within the bound")
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(
        status(unknown.message().await.unwrap().unwrap()),
        ServingStatus::ServiceUnknown
    );

    let started = std::time::Instant::now();
    let shutdown = tokio::spawn(server.shutdown());
    let mut seen = vec![];
    let end = loop {
        match tokio::time::timeout(LONG, bridge.message())
            .await
            .expect("the watch moves")
        {
            Ok(Some(r)) => seen.push(status(r)),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    assert_eq!(seen, [ServingStatus::NotServing], "told before it ends");
    let end = end.expect("ended with a status");
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert!(end.message().contains("shutting down"), "{end:?}");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("the shutdown does not wait for the watchers")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
}

/// Text logs written to a pipe or a file carry no ANSI colour codes: before, every
/// line a log collector stored had escape sequences around its level, target and
/// field names ("\x1b[32m INFO\x1b[0m"). Colour is for a terminal only.
#[tokio::test]
async fn text_logs_to_a_pipe_have_no_colour_codes() {
    let seen = stderr_until("text-logs", "log_format = \"text\"\n", &[], |l| {
        l.contains("worker ready")
    })
    .await;
    assert!(seen.len() >= 2, "{seen:?}");
    for line in &seen {
        assert!(
            !line.contains('\x1b'),
            "an escape code in a piped log line: {line:?}"
        );
    }
    let ready = seen.last().unwrap();
    assert!(
        ready.contains(" INFO ") && ready.contains("worker="),
        "{ready}"
    );
}

/// gRPC clients in other languages often compress their requests (grpc-go's
/// `UseCompressor(gzip)`, grpc-java's `withCompression("gzip")`): the Bridge and the
/// Admin API accept gzip and deflate, and answer uncompressed, which every client
/// reads. Before, every compressed call got UNIMPLEMENTED ("Content is compressed
/// with `gzip` which isn't supported").
#[tokio::test]
async fn compressed_requests_are_accepted_on_the_bridge_and_admin() {
    use tonic::codec::CompressionEncoding::{Deflate, Gzip};
    let (server, client) = start(config_with("")).await;
    let payload = format!("{{\"text\":\"{}\"}}", "abc".repeat(4000));
    for encoding in [Gzip, Deflate] {
        let mut c = client.clone().send_compressed(encoding);
        let r = c
            .execute(exec("echo", &payload))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.payload, payload.as_bytes(), "{encoding:?}");
        let chunks = collect(
            c.execute_stream(exec("stream", r#"{"n": 3}"#))
                .await
                .unwrap()
                .into_inner(),
        )
        .await;
        assert_eq!(chunks.len(), 3, "{encoding:?}");
        let mut admin =
            pb::admin_client::AdminClient::connect(format!("http://{}", server.admin_addr))
                .await
                .unwrap()
                .send_compressed(encoding);
        let status = admin
            .get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(
            !status.version.is_empty() && !status.pools.is_empty(),
            "{encoding:?}: {status:?}"
        );
    }
    // The size limit holds for the inflated message: 32 MiB of zeros (about 32 KiB
    // gzipped) over the 16 MiB default is refused, and the server goes on serving.
    let bomb = pb::ExecuteRequest {
        command: "echo".into(),
        payload: vec![0u8; 32 << 20].into(),
        content_type: "application/octet-stream".into(),
        ..Default::default()
    };
    let err = client
        .clone()
        .send_compressed(Gzip)
        .execute(bomb)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // A client that accepts compressed answers still reads them: none are compressed.
    let mut c = client.clone().accept_compressed(Gzip);
    let r = c.execute(exec("echo", &payload)).await.unwrap();
    assert!(r.metadata().get("grpc-encoding").is_none());
    assert_eq!(r.into_inner().payload, payload.as_bytes());
    server.shutdown().await;
}

/// A served call's debug line ("call served") carries its backend, worker and
/// attempts. They are recorded into the call's span only when that line is logged
/// (at `info` the formatters rendered them on every call for no line), so this checks
/// the debug path still has them.
#[tokio::test]
async fn a_served_calls_debug_line_names_its_backend_worker_and_attempts() {
    let dir = temp_dir("debug-call-line");
    let cfg = dir.join("p.toml");
    std::fs::write(&cfg, on_free_ports("", &pool_section("demo:adapter", 1))).unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss"));
    command.env("RUST_LOG", "info,pitboss=debug");
    let p = spawn_exe(command, &cfg).await;
    let mut client = pb::bridge_client::BridgeClient::connect(p.bridge.clone())
        .await
        .unwrap();
    client
        .execute(exec("echo", br#"{"x": 1}"#))
        .await
        .expect("echo served");
    let served = |l: &str| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        v["fields"]["message"] == "call served"
    };
    assert!(
        eventually(LONG, || p.logged(served)).await,
        "no 'call served' line: {:?}",
        p.log.lock().unwrap()
    );
    let line = p
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| served(l))
        .cloned()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let span = &v["span"];
    assert_eq!(span["backend"], "legacy", "{line}");
    assert_eq!(span["attempts"], 1, "{line}");
    assert!(
        span["worker"].as_str().is_some_and(|w| !w.is_empty()),
        "{line}"
    );
    assert_eq!(span["command"], "echo", "{line}");
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}
