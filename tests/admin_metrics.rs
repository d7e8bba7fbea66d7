//! `pitboss_admin_requests_total`: every call of `pitboss.v1.Admin` counted once, by
//! method and gRPC code, on a real server: reads, changes, refusals by the token, by
//! validation, before the handler (a malformed `grpc-timeout`), an unknown method, and
//! a call its client cancelled. Reflection, on the same listener, is not an Admin call.
//!
//! Its own test binary, so that the process-wide recorder holds only this test's
//! Admin calls and every count can be checked exactly.

mod common;

use std::time::Duration;

use common::*;
use pitboss::grpc::pb;
use tonic::Code;

const ADMIN: &str = "pitboss_admin_requests_total";
const TOKEN: &str = "admin-metrics-token";

fn count(body: &str, method: &str, code: &str) -> f64 {
    sample(body, ADMIN, &[("method", method), ("code", code)]).unwrap_or(0.0)
}

#[tokio::test]
async fn every_admin_call_is_counted_once_by_method_and_code() {
    let dir = temp_dir("admin-metrics");
    std::fs::write(dir.join("flags.toml"), "mode = \"off\"\n").unwrap();
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let text = on_free_ports(
        "",
        &format!(
            "{}{}",
            pool_section("demo:adapter", 1),
            rollout_section(&dir)
        ),
    );
    let (server, _client) = start(config(&text)).await;
    let (admin_addr, metrics) = (server.admin_addr, server.metrics_addr);

    // Each method's OK series is there from the first scrape, at 0.
    let first = scrape(metrics).await;
    for method in ["GetStatus", "GetRollout", "SetRollout", "GetRolloutHistory"] {
        assert_eq!(
            sample(&first, ADMIN, &[("method", method), ("code", "OK")]),
            Some(0.0),
            "{method} OK registered at 0"
        );
    }

    let mut admin = AdminClient::connect(format!("http://{admin_addr}"))
        .await
        .unwrap();
    // Reads: one without the token, two with it.
    let e = admin
        .get_rollout(pb::GetRolloutRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    for _ in 0..2 {
        admin
            .get_rollout(authed(pb::GetRolloutRequest {}, TOKEN))
            .await
            .unwrap();
    }
    admin
        .get_status(authed(pb::GetStatusRequest {}, TOKEN))
        .await
        .unwrap();
    admin
        .get_rollout_history(authed(pb::GetRolloutHistoryRequest { limit: 5 }, TOKEN))
        .await
        .unwrap();
    // Changes: a wrong token, an invalid percent, one that is made.
    let e = admin
        .set_rollout(authed(
            pb::SetRolloutRequest {
                mode: "off".into(),
                ..Default::default()
            },
            "wrong",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = admin
        .set_rollout(authed(
            pb::SetRolloutRequest {
                percent: 101.0,
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    admin
        .set_rollout(authed(
            pb::SetRolloutRequest {
                mode: "off".into(),
                actor: "metrics-test".into(),
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .unwrap();

    // Refused before the handler runs: a malformed grpc-timeout.
    let request = framed(&pb::GetStatusRequest {});
    let (status, message, _) = raw_grpc_with(
        admin_addr,
        "/pitboss.v1.Admin/GetStatus",
        "5",
        vec![request],
    )
    .await;
    assert_eq!(status, Code::Internal as u32, "{message}");
    // A method the Admin service does not have.
    let (status, message, _) = raw_grpc_with(
        admin_addr,
        "/pitboss.v1.Admin/DropEverything",
        "5S",
        vec![framed(&pb::GetStatusRequest {})],
    )
    .await;
    assert_eq!(status, Code::Unimplemented as u32, "{message}");

    // Reflection shares the listener and is not counted.
    {
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, ServerReflectionRequest,
        };
        let channel = tonic::transport::Channel::from_shared(format!("http://{admin_addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let ask = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let answers = ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter(vec![ask]))
            .await
            .unwrap()
            .into_inner();
        let answers = collect(answers).await;
        assert_eq!(answers.len(), 1);
    }

    // A call whose client cancels it (RST_STREAM CANCEL, as gRPC clients send) while
    // its request message is still on the way: counted as CANCELLED. A second call on
    // the same connection, answered, shows that the server has dispatched the first
    // (HTTP/2 streams are taken in order).
    let tcp = tokio::net::TcpStream::connect(admin_addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let head = |path: &str| {
        http::Request::builder()
            .method("POST")
            .uri(format!("http://{admin_addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(())
            .unwrap()
    };
    let (_pending, mut half) = h2
        .send_request(head("/pitboss.v1.Admin/SetRollout"), false)
        .unwrap();
    // The 5-byte prefix announces 10 bytes; 2 come.
    half.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 10, 8, 1]), false)
        .unwrap();
    let mut h2 = h2.ready().await.unwrap();
    let (answer, mut send) = h2
        .send_request(head("/pitboss.v1.Admin/GetRollout"), false)
        .unwrap();
    send.send_data(framed(&pb::GetRolloutRequest {}), true)
        .unwrap();
    let (parts, mut body) = answer.await.unwrap().into_parts();
    assert_eq!(parts.status, 200);
    while let Some(chunk) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.unwrap().len());
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
    half.send_reset(h2::Reason::CANCEL);

    let expected = [
        ("GetRollout", "UNAUTHENTICATED", 1.0),
        ("GetRollout", "OK", 3.0),
        ("GetStatus", "OK", 1.0),
        ("GetStatus", "INTERNAL", 1.0),
        ("GetRolloutHistory", "OK", 1.0),
        ("SetRollout", "UNAUTHENTICATED", 1.0),
        ("SetRollout", "INVALID_ARGUMENT", 1.0),
        ("SetRollout", "OK", 1.0),
        ("SetRollout", "CANCELLED", 1.0),
        ("other", "UNIMPLEMENTED", 1.0),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let last = loop {
        let body = scrape(metrics).await;
        if count(&body, "SetRollout", "CANCELLED") >= 1.0 {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cancelled call not counted within 10 s:\n{}",
            admin_lines(&body)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for (method, code, n) in expected {
        assert_eq!(
            count(&last, method, code),
            n,
            "{method} {code}:\n{}",
            admin_lines(&last)
        );
    }
    // Nothing else: 12 calls in all, each once.
    let total = sum_of(&last, ADMIN, &[]);
    assert_eq!(total, 12.0, "{}", admin_lines(&last));

    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn admin_lines(body: &str) -> String {
    body.lines()
        .filter(|l| l.starts_with(ADMIN))
        .collect::<Vec<_>>()
        .join("\n")
}
