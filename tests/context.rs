//! A call's context, end to end (issue 19, item 5): the client's `x-request-id`,
//! `traceparent` and `tracestate` reach the adapter's `Request` (with the attempt, the
//! backend role and the remaining deadline), the adapter's `logging` lines in
//! pitboss's JSON log, the response's metadata, and a `grpc` upstream (here another
//! real pitboss, whose own adapter reports what it received).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use pitboss::grpc::pb;
use serde_json::Value;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// An adapter that answers with its view of the call and logs one line with the
/// standard `logging` module; `crash_first` kills its worker on the first try.
const ADAPTER: &str = r#"
import logging
import os

from pitboss_worker import Adapter

adapter = Adapter("ctxview")
log = logging.getLogger("ctxview")


def _view(req):
    log.info("viewed %s", req.command)
    return {
        "request_id": req.request_id,
        "traceparent": req.traceparent,
        "tracestate": req.tracestate,
        "trace_id": req.trace_id,
        "attempt": req.attempt,
        "backend": req.backend,
        "session_id": req.session_id,
        "timeout": req.timeout,
    }


@adapter.command
def view(req):
    return _view(req)


@adapter.command
def view_up(req):
    return _view(req)


@adapter.command
def crash_first(req):
    if req.attempt == 1:
        os._exit(3)
    return _view(req)
"#;

fn write_config(dir: &Path, size: usize, extra: &str) -> std::path::PathBuf {
    let text = on_free_ports(
        "",
        &format!(
            "[pool]\nadapter = \"ctxview:adapter\"\nsize = {size}\n\
             python_path = [\"{dir}\"]\nruntime_dir = \"{py}\"\n\
             [pool.restart]\nbackoff_base = \"20ms\"\njitter = 0.0\n\
             {rollout}{extra}",
            dir = dir.display(),
            py = python_dir().display(),
            rollout = rollout_section(dir),
        ),
    );
    let path = dir.join("pitboss.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn traced(command: &str, request_id: Option<&str>) -> tonic::Request<pb::ExecuteRequest> {
    let mut r = tonic::Request::new(exec(command, "{}"));
    r.set_timeout(Duration::from_secs(20));
    let md = r.metadata_mut();
    if let Some(id) = request_id {
        md.insert("x-request-id", id.parse().unwrap());
    }
    md.insert("traceparent", TRACEPARENT.parse().unwrap());
    md.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
    r
}

/// The adapter's log line for `request_id` in a process's JSON log, once it is there.
async fn adapter_line(proc: &Proc, request_id: &str) -> Value {
    let mut found = None;
    let seen = eventually(Duration::from_secs(10), || {
        found = proc.log.lock().unwrap().iter().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["target"] == "pitboss::adapter" && v["fields"]["request_id"] == request_id)
                .then_some(v)
        });
        found.is_some()
    })
    .await;
    assert!(
        seen,
        "no adapter log line for {request_id}: {:#?}",
        proc.log.lock().unwrap()
    );
    found.unwrap()
}

async fn connect(bridge: &str) -> Client {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = Client::connect(bridge.to_string()).await {
            // Ready once a worker answers.
            if c.execute(exec("view", "{}")).await.is_ok() {
                return c;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{bridge} never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_calls_ids_reach_the_adapter_the_logs_the_client_and_the_upstream() {
    let up_dir = temp_dir("context-upstream");
    std::fs::write(up_dir.join("ctxview.py"), ADAPTER).unwrap();
    std::fs::write(up_dir.join("token"), "t\n").unwrap();
    let upstream = spawn(&write_config(&up_dir, 1, "")).await;

    let dir = temp_dir("context-edge");
    std::fs::write(dir.join("ctxview.py"), ADAPTER).unwrap();
    std::fs::write(dir.join("token"), "t\n").unwrap();
    // view_up goes to new (the upstream); everything else stays on legacy.
    std::fs::write(
        dir.join("flags.toml"),
        "mode = \"canary\"\npercent = 100.0\ncommands = [\"view_up\"]\n",
    )
    .unwrap();
    let edge = spawn(&write_config(
        &dir,
        2,
        &format!(
            "[backends.new]\nkind = \"grpc\"\naddress = \"{}\"\n",
            upstream.bridge
        ),
    ))
    .await;
    let mut client = connect(&edge.bridge).await;

    // On a local worker: the adapter sees every id, its attempt, role and deadline.
    let resp = client
        .execute(traced("view", Some("req-local-1")))
        .await
        .unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "req-local-1");
    let r = resp.into_inner();
    assert_eq!(r.backend, "legacy");
    let v: Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["request_id"], "req-local-1");
    assert_eq!(v["traceparent"], TRACEPARENT);
    assert_eq!(v["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(v["trace_id"], TRACE_ID);
    assert_eq!(v["attempt"], 1);
    assert_eq!(v["backend"], "legacy");
    let timeout = v["timeout"].as_f64().expect("a deadline was sent");
    assert!(timeout > 0.0 && timeout <= 20.0, "{timeout}");
    // ... and pitboss logs the adapter's logging line with the call's ids.
    let line = adapter_line(&edge, "req-local-1").await;
    assert_eq!(line["fields"]["trace_id"], TRACE_ID);
    assert_eq!(line["fields"]["logger"], "ctxview");
    assert_eq!(line["fields"]["message"], "viewed view");
    assert_eq!(line["level"], "INFO");
    assert!(line["fields"]["worker"].is_string(), "{line}");

    // Through the grpc upstream: the same ids arrive as its metadata, and its own
    // adapter (legacy there) and log see them.
    let resp = client
        .execute(traced("view_up", Some("req-up-1")))
        .await
        .unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "req-up-1");
    let r = resp.into_inner();
    assert_eq!(r.backend, "new");
    let v: Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["request_id"], "req-up-1");
    assert_eq!(v["traceparent"], TRACEPARENT);
    assert_eq!(v["tracestate"], "congo=t61rcWkgMzE");
    assert_eq!(v["backend"], "legacy", "the upstream's own role");
    adapter_line(&upstream, "req-up-1").await;

    // Without an x-request-id, pitboss makes one, gives it to the adapter and
    // returns it.
    let resp = client.execute(traced("view", None)).await.unwrap();
    let made = resp
        .metadata()
        .get("x-request-id")
        .expect("a request id is returned")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(made.len(), 16, "{made}");
    let v: Value = serde_json::from_slice(&resp.into_inner().payload).unwrap();
    assert_eq!(v["request_id"], made.as_str());

    // A retry is the call's second attempt, under the same id.
    let mut req = traced("crash_first", Some("req-retry-1"));
    req.get_mut().idempotent = true;
    let r = client.execute(req).await.unwrap().into_inner();
    assert_eq!(r.attempts, 2);
    let v: Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["attempt"], 2);
    assert_eq!(v["request_id"], "req-retry-1");

    // A failed call returns its id too.
    let e = client
        .execute(traced("no_such_command", Some("req-fail-1")))
        .await
        .unwrap_err();
    assert_eq!(e.metadata().get("x-request-id").unwrap(), "req-fail-1");

    // A malformed traceparent is dropped, not passed on.
    let mut req = traced("view", Some("req-badtrace"));
    req.metadata_mut()
        .insert("traceparent", "not-a-trace".parse().unwrap());
    let v: Value =
        serde_json::from_slice(&client.execute(req).await.unwrap().into_inner().payload).unwrap();
    assert_eq!(v["traceparent"], Value::Null);
    assert_eq!(v["tracestate"], Value::Null);
    assert_eq!(v["request_id"], "req-badtrace");

    drop(edge);
    drop(upstream);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&up_dir);
}
