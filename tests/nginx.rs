//! Scale-out behind a real nginx (`config/nginx/pitboss.conf`): 3 pitboss instances on
//! loopback, nginx hashing on `x-session-id`. Sessions keep their affinity, load spreads
//! over the instances, stopping one moves only its sessions (whose clients are told
//! `session_not_found`), and the instance comes back and takes new sessions.
//!
//! Needs nginx with the gRPC module (Debian's `nginx-light`); skipped with a message
//! when it is missing, unless PITBOSS_REQUIRE_NGINX=1 (set by `.ci/run`).
//!
//! The instances listen on fixed ports and the session ids are fixed, so nginx's ring
//! (built from the servers' addresses) and every session's place on it are the same on
//! every run: the spread asserted below is deterministic, not luck.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use pitboss::grpc::pb;
use pitboss::server::RunningServer;
use tonic::transport::Channel;
use tonic::Code;

const PORTS: [u16; 3] = [47151, 47152, 47153];
const NGINX_PORT: u16 = 47150;
const SESSIONS: usize = 300;

fn have_nginx() -> bool {
    std::process::Command::new("nginx")
        .arg("-v")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn instance(port: u16) -> RunningServer {
    let cfg = config(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n\
         metrics_listen = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n{pool}",
        pool = pool_section("demo:adapter", 1)
    ));
    let s = RunningServer::start(cfg).await.unwrap();
    s.pool()
        .wait_ready(1, Duration::from_secs(30))
        .await
        .unwrap();
    s
}

/// The shipped config with this test's addresses (and a 1 s fail_timeout, so the
/// restarted instance is tried again quickly).
fn nginx_conf(dir: &Path) -> std::path::PathBuf {
    let template = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/nginx/pitboss.conf"),
    )
    .unwrap();
    let mut out = String::new();
    let mut servers = PORTS.iter();
    for line in template.lines() {
        if line.contains("# pitboss-instance") {
            let port = servers.next().expect("three instance lines");
            out.push_str(&format!(
                "        server 127.0.0.1:{port} max_fails=1 fail_timeout=1s;\n"
            ));
        } else if line.contains("# pitboss-listen") {
            out.push_str(&format!("        listen 127.0.0.1:{NGINX_PORT} http2;\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let path = dir.join("nginx.conf");
    std::fs::write(&path, out).unwrap();
    path
}

fn with_session<T>(msg: T, id: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("x-session-id", id.parse().unwrap());
    r.set_timeout(Duration::from_secs(10));
    r
}

/// Calls `counter` in a session: (count, instance) or the error.
async fn count(
    client: &mut pb::bridge_client::BridgeClient<Channel>,
    id: &str,
) -> Result<(u64, String), tonic::Status> {
    let mut req = exec("counter", "{}");
    req.session_id = id.to_string();
    let resp = client.execute(with_session(req, id)).await?;
    let instance = resp
        .metadata()
        .get("x-pitboss-instance")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let v: serde_json::Value = serde_json::from_slice(&resp.into_inner().payload).unwrap();
    Ok((v["count"].as_u64().unwrap(), instance))
}

#[tokio::test]
async fn sessions_keep_affinity_through_nginx_and_only_a_stopped_instances_sessions_move() {
    if !have_nginx() {
        assert!(
            std::env::var("PITBOSS_REQUIRE_NGINX").as_deref() != Ok("1"),
            "nginx is required but missing"
        );
        eprintln!("SKIPPED: nginx is not installed (Debian: apt-get install nginx-light)");
        return;
    }
    init_tracing();
    let dir = temp_dir("nginx");
    let mut servers = vec![];
    for port in PORTS {
        servers.push(Some(instance(port).await));
    }
    let conf = nginx_conf(&dir);
    let mut nginx = tokio::process::Command::new("nginx")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .arg("-g")
        .arg(format!(
            "daemon off; master_process off; pid {}; error_log {} warn;",
            dir.join("nginx.pid").display(),
            dir.join("error.log").display()
        ))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = format!("http://127.0.0.1:{NGINX_PORT}");
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = Client::connect(addr.clone()).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("nginx listens");
    let ids: HashMap<String, String> = servers
        .iter()
        .map(|s| {
            let s = s.as_ref().unwrap();
            (s.edge().instance_id.clone(), s.bridge_addr.to_string())
        })
        .collect();

    // 300 sessions, created through nginx, each with 3 calls: one instance each.
    let mut home: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..SESSIONS {
        let id = format!("session-{i:04}");
        let created = client
            .create_session(with_session(
                pb::CreateSessionRequest {
                    session_id: id.clone(),
                    ..Default::default()
                },
                &id,
            ))
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e:?}"));
        let at = created
            .metadata()
            .get("x-pitboss-instance")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        for n in 1..=3 {
            let (c, instance) = count(&mut client, &id).await.unwrap();
            assert_eq!(
                (c, instance.as_str()),
                (n, at.as_str()),
                "{id} lost its affinity"
            );
        }
        home.insert(id, at);
    }
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for at in home.values() {
        *per.entry(at.as_str()).or_default() += 1;
    }
    eprintln!("sessions per instance: {per:?}");
    assert_eq!(per.len(), 3, "every instance holds sessions");
    for n in per.values() {
        assert!((85..=115).contains(n), "within ±15% of a third: {per:?}");
    }

    // Stop one instance: only its sessions move, and their clients are told.
    let victim = servers[1].take().unwrap();
    let victim_id = victim.edge().instance_id.clone();
    victim.shutdown().await;
    let mut moved = 0;
    for (id, at) in &home {
        match count(&mut client, id).await {
            Ok((c, instance)) => {
                assert_ne!(at, &victim_id, "{id} was on the stopped instance");
                assert_eq!(
                    (c, instance.as_str()),
                    (4, at.as_str()),
                    "{id} was disturbed"
                );
            }
            Err(e) => {
                assert_eq!(at, &victim_id, "{id} failed but its instance is up: {e:?}");
                assert_eq!(e.code(), Code::NotFound, "{e:?}");
                assert_eq!(error_class(&e), "session_not_found");
                let answered_by = e
                    .metadata()
                    .get("x-pitboss-instance")
                    .unwrap()
                    .to_str()
                    .unwrap();
                assert!(ids.contains_key(answered_by) && answered_by != victim_id);
                moved += 1;
            }
        }
    }
    assert_eq!(
        moved,
        per[victim_id.as_str()],
        "exactly the stopped instance's sessions moved"
    );

    // It comes back (a new process: a new instance id) and takes new sessions.
    let back = instance(PORTS[1]).await;
    let back_id = back.edge().instance_id.clone();
    // nginx's fail_timeout (1 s, compared in whole seconds: up to 2 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut landed = 0;
    for i in 0..60 {
        let id = format!("late-{i:04}");
        let created = client
            .create_session(with_session(
                pb::CreateSessionRequest {
                    session_id: id.clone(),
                    ..Default::default()
                },
                &id,
            ))
            .await
            .unwrap();
        if created.metadata().get("x-pitboss-instance").unwrap() == back_id.as_str() {
            landed += 1;
        }
    }
    assert!(
        landed > 0,
        "the instance that came back takes no new sessions"
    );
    eprintln!("after the restart, {landed} of 60 new sessions went to the returning instance");

    let _ = nginx.kill().await;
    back.shutdown().await;
    for s in servers.into_iter().flatten() {
        s.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
