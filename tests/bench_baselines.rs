//! The benchmark baselines are real servers: `pitboss bench ceiling` answers Bridge
//! calls without Python, and `pitboss bench proxy-ceiling` forwards any call, as it
//! is, to its upstream. BENCHMARKS.md's ratios are only as good as these, so they
//! are checked through real gRPC, as the load generator uses them.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use pitboss::grpc::pb::bridge_client::BridgeClient;
use tokio::io::AsyncBufReadExt;

const BOUND: Duration = Duration::from_secs(30);

/// Runs `pitboss bench ARGS` (a server) and returns it with the address it prints.
async fn serve(args: &[&str]) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .arg("bench")
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(BOUND, lines.next_line())
        .await
        .expect("the baseline printed its address")
        .unwrap()
        .expect("the baseline exited before listening");
    let addr = line.strip_prefix("LISTENING ").expect(&line).to_string();
    (child, format!("http://{addr}"))
}

#[tokio::test]
async fn the_passthrough_ceiling_forwards_calls_and_statuses_unchanged() {
    let (_ceiling, ceiling) = serve(&["ceiling"]).await;
    let (_proxy, proxy) = serve(&["proxy-ceiling", "--upstream", &ceiling]).await;
    let mut client = BridgeClient::connect(proxy.clone()).await.unwrap();

    // A unary call: the ceiling's own answer, through the proxy.
    for i in 0..20 {
        let payload = format!("{{\"i\":{i}}}");
        let r = client
            .execute(exec("echo", payload.as_bytes()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.payload, payload.as_bytes());
        assert_eq!(r.backend, "ceiling");
    }
    // A server stream: every chunk, in order.
    let chunks = collect(
        client
            .execute_stream(exec("stream", br#"{"n": 4}"#))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let payloads: Vec<&[u8]> = chunks.iter().map(|c| &c.payload[..]).collect();
    assert_eq!(
        payloads,
        [&b"{\"i\":0}"[..], b"{\"i\":1}", b"{\"i\":2}", b"{\"i\":3}"]
    );
    // The upstream's error status, with its message, not the proxy's.
    let err = client
        .get_session(pitboss::grpc::pb::GetSessionRequest {
            session_id: "s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert_eq!(err.message(), "ceiling");
}

#[tokio::test]
async fn the_passthrough_ceiling_answers_unavailable_without_its_upstream() {
    let upstream = format!("http://127.0.0.1:{}", free_port());
    let (_proxy, proxy) = serve(&["proxy-ceiling", "--upstream", &upstream]).await;
    let mut client = BridgeClient::connect(proxy).await.unwrap();
    let err = client.execute(exec("echo", b"x")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("cannot connect"), "{err:?}");

    // A bad --upstream is refused at start, saying what was expected.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .args(["bench", "proxy-ceiling", "--upstream", "127.0.0.1:1"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected http://HOST:PORT"), "{stderr}");
}

/// `pitboss bench load --floor` drives the config's own workers over frames: every
/// call answered, in sessions too, and a command that fails counted as an error
/// (with its message), not as an answer.
#[tokio::test]
async fn the_floor_answers_every_call_and_counts_failures() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/pitboss-bench.toml");
    let dir = temp_dir("floor");
    let run = |name: &'static str, extra: &'static [&'static str]| {
        let json = dir.join(format!("{name}.json"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
            .args([
                "--config",
                config,
                "bench",
                "load",
                "--floor",
                "--workers",
                "2",
            ])
            .args([
                "--concurrency",
                "8",
                "--requests",
                "2000",
                "--warmup-s",
                "0",
            ])
            .args(extra)
            .arg("--json")
            .arg(&json)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&json).unwrap()).unwrap()
    };
    let echo = run("echo", &[]);
    assert_eq!(echo["requests"], 2000, "{echo}");
    assert_eq!(echo["errors"], 0, "{echo}");
    let sessions = run("sessions", &["--sessions", "16"]);
    assert_eq!(sessions["requests"], 2000, "{sessions}");
    assert_eq!(sessions["errors"], 0, "{sessions}");
    let failing = run("fail", &["--command", "no_such_command"]);
    assert_eq!(failing["errors"], 2000, "{failing}");
    assert!(
        failing["first_error"]
            .as_str()
            .is_some_and(|e| e.contains("no_such_command")),
        "{failing}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
