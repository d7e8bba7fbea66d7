//! Issue 17: pitboss in front of an existing gRPC service, with no client change.
//!
//! A real grpcio service with its own proto (`python/examples/calculator`: the
//! "legacy" a team already runs), pitboss in front of it as a `grpc_proxy` legacy, a
//! `new` pool whose adapter implements the same methods with the generated classes,
//! and a grpcio client on the generated stubs, unchanged, calling both.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use pitboss::rollout::flags::RolloutState;
use pitboss::rollout::{bucket, bucket::in_new, Percent};
use pitboss::server::RunningServer;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

const LONG: Duration = Duration::from_secs(30);

/// During the migration: the grpcio service as legacy, pitboss workers as new.
const PROXY_LEGACY_POOL_NEW: &str = "[backends.legacy]\nkind = \"grpc_proxy\"\n\
     address = \"http://{legacy}\"\n[backends.new]\nkind = \"pool\"\n";

fn example_dir() -> PathBuf {
    python_dir().join("examples/calculator")
}

/// Starts the legacy grpcio service on `port` ("0": a free one); its port.
async fn spawn_legacy(
    py: &Path,
    gen: &Path,
    events: &Path,
    env: &[(String, String)],
    port: &str,
) -> (tokio::process::Child, String) {
    let mut legacy = tokio::process::Command::new(py)
        .arg(example_dir().join("legacy_server.py"))
        .arg(port)
        .arg(events)
        .env("PYTHONPATH", gen)
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(legacy.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(LONG, lines.next_line())
        .await
        .expect("the legacy service did not start")
        .unwrap()
        .unwrap();
    let port = line.strip_prefix("listening on ").unwrap().to_string();
    (legacy, port)
}

/// How a [`Setup`] differs from the plain one.
struct Opts<'a> {
    /// The `[backends.*]` sections (`{legacy}`: legacy's address).
    backends: &'a str,
    /// The `[transparent]` keys that give the descriptors (`{gen}`: the generated
    /// code's directory).
    descriptors: &'a str,
    /// More `[transparent]` keys.
    transparent: &'a str,
    /// The pool's adapter instead of the example's: (module name, its source).
    adapter: Option<(&'a str, &'a str)>,
    /// The legacy service's environment (its TLS files).
    legacy_env: Vec<(String, String)>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            backends: PROXY_LEGACY_POOL_NEW,
            descriptors: "descriptor_set = \"{gen}/calc.pb\"\n",
            transparent: "",
            adapter: None,
            legacy_env: vec![],
        }
    }
}

/// The legacy grpcio service, its generated code, pitboss in front of it.
struct Setup {
    py: PathBuf,
    gen: PathBuf,
    dir: PathBuf,
    legacy_addr: String,
    events: PathBuf,
    /// pitboss's config (its listeners on port 0: another pitboss can start on it).
    text: String,
    legacy: tokio::process::Child,
    server: RunningServer,
}

impl Setup {
    async fn start(tag: &str, flags: &str) -> Setup {
        Setup::start_with(tag, flags, PROXY_LEGACY_POOL_NEW).await
    }

    /// With `backends` as the `[backends.*]` sections (`{legacy}`: legacy's address).
    async fn start_with(tag: &str, flags: &str, backends: &str) -> Setup {
        Setup::start_full(tag, flags, backends, "descriptor_set = \"{gen}/calc.pb\"\n").await
    }

    /// And `descriptors` as the `[transparent]` keys that give the descriptors
    /// (`{gen}`: the generated code's directory).
    async fn start_full(tag: &str, flags: &str, backends: &str, descriptors: &str) -> Setup {
        let opts = Opts {
            backends,
            descriptors,
            ..Opts::default()
        };
        Setup::start_opts(tag, flags, opts).await
    }

    async fn start_opts(tag: &str, flags: &str, opts: Opts<'_>) -> Setup {
        let Opts {
            backends,
            descriptors,
            transparent,
            adapter,
            legacy_env,
        } = opts;
        let py = tokio::task::spawn_blocking(grpcio_python).await.unwrap();
        let dir = temp_dir(&format!("transparent-{tag}"));
        let gen = dir.join("gen");
        std::fs::create_dir_all(&gen).unwrap();
        let st = std::process::Command::new(&py)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(example_dir())
            .arg(format!("--python_out={}", gen.display()))
            .arg(format!("--grpc_python_out={}", gen.display()))
            .arg("--include_imports")
            .arg(format!(
                "--descriptor_set_out={}",
                gen.join("calc.pb").display()
            ))
            .arg("calc.proto")
            .status()
            .unwrap();
        assert!(st.success(), "protoc failed");
        let events = dir.join("legacy-events");
        let (legacy, port) = spawn_legacy(&py, &gen, &events, &legacy_env, "0").await;
        let legacy_addr = format!("127.0.0.1:{port}");

        std::fs::write(dir.join("flags.toml"), flags).unwrap();
        std::fs::write(dir.join("token"), "transparent-token\n").unwrap();
        let (adapter, adapter_dir) = match adapter {
            Some((module, text)) => {
                std::fs::write(dir.join(format!("{module}.py")), text).unwrap();
                (
                    format!("{module}:adapter"),
                    format!(", \"{}\"", dir.display()),
                )
            }
            None => ("adapter:adapter".to_string(), String::new()),
        };
        let rest = format!(
            "[pool]\nadapter = \"{adapter}\"\nsize = 1\nmax_frame_bytes = 65536\npython = \"{py}\"\n\
             python_path = [\"{example}\", \"{gen}\"{adapter_dir}]\nruntime_dir = \"{runtime}\"\n\
             {rollout}\
             [transparent]\nservices = [\"calc.Calculator\"]\n\
             {descriptors}idempotent = [\"/calc.Calculator/*\"]\n{transparent}\
             {backends}",
            descriptors = descriptors.replace("{gen}", &gen.display().to_string()),
            backends = backends.replace("{legacy}", &legacy_addr),
            py = py.display(),
            example = example_dir().display(),
            gen = gen.display(),
            runtime = python_dir().display(),
            rollout = rollout_section(&dir),
        );
        let text = on_free_ports("max_message_bytes = 65536", &rest);
        let (server, _client) = start(config(&text)).await;
        Setup {
            py,
            gen,
            dir,
            legacy_addr,
            events,
            text,
            legacy,
            server,
        }
    }

    fn pitboss(&self) -> String {
        self.server.bridge_addr.to_string()
    }

    /// Runs the example client against `addr`; its one JSON line.
    async fn client(&self, addr: &str, args: &[&str]) -> Value {
        let out = tokio::process::Command::new(&self.py)
            .arg(example_dir().join("client.py"))
            .arg(addr)
            .args(args)
            .env("PYTHONPATH", &self.gen)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client {args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    }

    fn flags(&self) -> std::sync::Arc<pitboss::rollout::Flags> {
        self.server.edge().rollout().flags.get()
    }

    /// Replaces the flags file (temp file, then rename) and waits until applied.
    async fn write_flags(&self, text: &str, applied: impl Fn(&pitboss::rollout::Flags) -> bool) {
        let tmp = self.dir.join(".flags.toml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("flags.toml")).unwrap();
        assert!(
            eventually(LONG, || applied(&self.flags())).await,
            "flags not applied: {text}"
        );
    }

    fn legacy_events(&self) -> String {
        std::fs::read_to_string(&self.events).unwrap_or_default()
    }

    async fn stop(self) {
        self.server.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// At 0% every answer is legacy's, byte for byte as the service answers it directly:
/// messages, error statuses with their trailers, UNIMPLEMENTED for an unknown method,
/// legacy's own verdict on a malformed message. Its deadline and metadata reach
/// legacy; a cancelled call is cancelled there; an oversized message is refused with
/// RESOURCE_EXHAUSTED before any backend sees it.
#[tokio::test]
async fn at_zero_percent_pitboss_answers_exactly_as_the_legacy_service() {
    let s = Setup::start("off", "mode = \"off\"\n").await;
    let mut direct = s.client(&s.legacy_addr, &["probe"]).await;
    let mut through = s.client(&s.pitboss(), &["probe"]).await;
    // A service that transparent.services does not list is pitboss's to answer: the
    // same code, its own (empty) message.
    let unknown = through
        .as_object_mut()
        .unwrap()
        .remove("unknown_service")
        .unwrap();
    direct
        .as_object_mut()
        .unwrap()
        .remove("unknown_service")
        .unwrap();
    assert_eq!(unknown["code"], "UNIMPLEMENTED");
    assert_eq!(direct, through, "pitboss changed an answer");
    // What that is, so the equality above is not two identical failures.
    assert_eq!(through["add"]["code"], "OK");
    assert_eq!(through["divide_by_zero"]["code"], "INVALID_ARGUMENT");
    assert_eq!(through["divide_by_zero"]["message"], "division by zero");
    let trailers = through["divide_by_zero"]["trailers"].to_string();
    assert!(trailers.contains(r#"["x-why","b is 0"]"#), "{trailers}");
    assert_eq!(through["range"]["messages"].as_array().unwrap().len(), 4);
    assert_eq!(through["unknown_method"]["code"], "UNIMPLEMENTED");
    assert_eq!(through["malformed"]["code"], direct["malformed"]["code"]);
    let add = s.client(&s.pitboss(), &["add", "2", "3", "k"]).await;
    assert_eq!(add["computed_by"], "legacy");
    // Client-streaming: relayed whole to legacy.
    let sum = s.client(&s.pitboss(), &["sum", "1", "2", "39"]).await;
    assert_eq!(
        sum,
        s.client(&s.legacy_addr, &["sum", "1", "2", "39"]).await
    );
    assert_eq!(
        (sum["code"].as_str(), sum["value"].as_i64()),
        (Some("OK"), Some(42))
    );

    // Deadline and metadata.
    let seen = s.client(&s.pitboss(), &["inspect", "0", "5"]).await;
    assert_eq!(seen["code"], "OK", "{seen}");
    let left = seen["time_remaining"].as_f64().unwrap();
    assert!(left > 0.5 && left <= 5.0, "legacy saw {left}s left");
    let md = seen["metadata"].to_string();
    assert!(md.contains("x-team=payments"), "{md}");
    assert!(md.contains("x-trace-bin"), "binary metadata too: {md}");
    // The client sent no x-request-id: legacy gets the one pitboss made for the call.
    assert!(md.contains("x-request-id="), "{md}");

    // Cancellation: the client's deadline passes, legacy's call is cancelled.
    let ended_before = s.legacy_events().matches("call ended").count();
    let late = s.client(&s.pitboss(), &["inspect", "30", "1"]).await;
    assert_eq!(late["code"], "DEADLINE_EXCEEDED", "{late}");
    assert!(
        eventually(LONG, || s.legacy_events().matches("call ended").count()
            > ended_before)
        .await,
        "legacy's call was not ended: {}",
        s.legacy_events()
    );
    assert!(
        s.legacy_events().contains("cancelled") || s.legacy_events().contains("active=False"),
        "{}",
        s.legacy_events()
    );

    // Oversized: refused before legacy (which would log the Inspect call's end).
    let ended_before = s.legacy_events().matches("call ended").count();
    let big = s.client(&s.pitboss(), &["big", "100000"]).await;
    assert_eq!(big["code"], "RESOURCE_EXHAUSTED", "{big}");
    let small = s.client(&s.pitboss(), &["inspect", "0", "5"]).await;
    assert_eq!(small["code"], "OK");
    assert!(
        eventually(LONG, || s.legacy_events().matches("call ended").count()
            == ended_before + 1)
        .await
    );
    assert_eq!(
        s.legacy_events().matches("call ended").count(),
        ended_before + 1,
        "the oversized call reached legacy"
    );
    s.stop().await;
}

/// At 50% the split is sticky by `x-session-id` and both backends answer correctly;
/// at 100% a malformed message is the adapter's to judge.
#[tokio::test]
async fn the_canary_split_of_a_grpc_method_is_sticky_and_both_backends_answer() {
    let flags =
        "mode = \"canary\"\npercent = 50.0\ncommands = [\"/calc.Calculator/*\"]\nsalt = \"s\"\n";
    let s = Setup::start("canary", flags).await;
    let first = s.client(&s.pitboss(), &["keys", "40"]).await;
    let second = s.client(&s.pitboss(), &["keys", "40"]).await;
    assert_eq!(first, second, "a key changed backend");
    let p = Percent::from_f64(50.0).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for (i, answer) in first.as_array().unwrap().iter().enumerate() {
        let key = format!("user-{i}");
        assert_eq!(
            answer["value"].as_i64().unwrap(),
            i as i64 + 101,
            "{answer}"
        );
        let expected = if in_new(bucket("s", &key), p) {
            "new"
        } else {
            "legacy"
        };
        assert_eq!(answer["computed_by"], expected, "{key}");
        seen.insert(expected);
    }
    assert_eq!(seen.len(), 2, "both backends answered");

    s.write_flags(
        "mode = \"full\"\ncommands = [\"/calc.Calculator/*\"]\nfallback_to_legacy = false\n",
        |f| f.mode == pitboss::rollout::flags::Mode::Full,
    )
    .await;
    let add = s.client(&s.pitboss(), &["add", "2", "3"]).await;
    assert_eq!(add["computed_by"], "new");
    let bad = s
        .client(&s.pitboss(), &["raw", "/calc.Calculator/Add", "ffffff"])
        .await;
    assert_eq!(bad["code"], "INVALID_ARGUMENT", "{bad}");
    assert!(
        bad["message"].as_str().unwrap().contains("calc.AddRequest"),
        "{bad}"
    );
    s.stop().await;
}

/// Shadow counts exactly the planted mismatches (field-aware, `computed_by` ignored);
/// then `new` failing rolls back, and the client sees only legacy's answers.
#[tokio::test]
async fn shadow_counts_planted_mismatches_and_a_failing_new_is_rolled_back() {
    let flags = "mode = \"shadow\"\ncommands = [\"/calc.Calculator/*\"]\n\
                 [shadow]\ncompare = \"json\"\nignore_fields = [\"computed_by\"]\n";
    let s = Setup::start("shadow", flags).await;
    for a in 0..10 {
        let r = s.client(&s.pitboss(), &["add", &a.to_string(), "1"]).await;
        assert_eq!(r["computed_by"], "legacy");
    }
    for _ in 0..3 {
        // The adapter is off by one at a = 13: a planted mismatch.
        let r = s.client(&s.pitboss(), &["add", "13", "1"]).await;
        assert_eq!(
            (r["computed_by"].as_str(), r["value"].as_i64()),
            (Some("legacy"), Some(14))
        );
    }
    let counters = &s.server.edge().rollout().counters;
    let compared = || {
        counters.shadow_match.load(Ordering::Relaxed)
            + counters.shadow_mismatch.load(Ordering::Relaxed)
            + counters.shadow_error.load(Ordering::Relaxed)
    };
    assert!(
        eventually(LONG, || compared() == 13).await,
        "compared {}",
        compared()
    );
    assert_eq!(counters.shadow_mismatch.load(Ordering::Relaxed), 3);
    assert_eq!(counters.shadow_match.load(Ordering::Relaxed), 10);
    // The admin API shows them (what `pitboss rollout status` prints).
    let mut admin = AdminClient::connect(format!("http://{}", s.server.admin_addr))
        .await
        .unwrap();
    let r = admin
        .get_rollout(authed(
            pitboss::grpc::pb::GetRolloutRequest {},
            "transparent-token",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.shadow_matches, r.shadow_mismatches), (10, 3));

    s.write_flags(
        "mode = \"full\"\ncommands = [\"/calc.Calculator/*\"]\nfallback_to_legacy = false\n\
         [rollback]\nmin_requests = 10\nerror_rate_threshold = 0.2\nwindow = \"30s\"\n",
        |f| f.mode == pitboss::rollout::flags::Mode::Full,
    )
    .await;
    for _ in 0..10 {
        let r = s.client(&s.pitboss(), &["add", "666", "1"]).await;
        assert_ne!(r["code"], "OK", "new's planted failure: {r}");
    }
    assert!(
        eventually(LONG, || s.flags().status.state == RolloutState::RolledBack).await,
        "not rolled back"
    );
    for a in [1, 13, 666] {
        let r = s.client(&s.pitboss(), &["add", &a.to_string(), "1"]).await;
        assert_eq!(r["computed_by"], "legacy", "{r}");
        assert_eq!(r["value"].as_i64(), Some(a + 1));
    }
    // The metrics know each call by its method, per backend. (The recorder is the
    // process's: the other tests' calls are in it too, but only this one makes new
    // raise on Add.)
    let scrape = scrape(s.server.metrics_addr).await;
    let on = |backend: &str, outcome: &str, class: &str| {
        let mut labels = vec![
            ("command", "/calc.Calculator/Add"),
            ("backend", backend),
            ("outcome", outcome),
        ];
        if !class.is_empty() {
            labels.push(("error_class", class));
        }
        sum_of(&scrape, "pitboss_requests_total", &labels)
    };
    let lines: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("pitboss_requests_total") && l.contains("Calculator/Add"))
        .collect();
    assert_eq!(on("new", "error", "python_exception"), 10.0, "{lines:#?}");
    assert!(on("legacy", "ok", "") >= 16.0, "{lines:#?}");
    s.stop().await;
}

/// Reflection through pitboss lists the user's service with its methods' types (what
/// grpcurl and Postman read), next to pitboss's own.
#[tokio::test]
async fn reflection_through_pitboss_lists_the_users_service() {
    let s = Setup::start("reflect", "mode = \"off\"\n").await;
    let r = s.client(&s.pitboss(), &["reflect"]).await;
    let services = r["services"].to_string();
    assert!(services.contains("calc.Calculator"), "{services}");
    assert!(services.contains("pitboss.v1.Bridge"), "{services}");
    assert_eq!(r["methods"]["Add"][0], "calc.AddRequest");
    assert_eq!(r["methods"]["Range"][1], "calc.Reply");
    s.stop().await;
}

/// The end of the migration (MIGRATING.md step 5): the pool is legacy, nothing else;
/// the same client, unchanged, gets its answers from the workers.
#[tokio::test]
async fn after_the_migration_the_workers_alone_serve_the_grpc_methods() {
    let backends = "[backends.legacy]\nkind = \"pool\"\n";
    let s = Setup::start_with("done", "mode = \"off\"\n", backends).await;
    let add = s.client(&s.pitboss(), &["add", "2", "3"]).await;
    assert_eq!(add["computed_by"], "new", "{add}");
    assert_eq!(add["value"], 5);
    let probe = s.client(&s.pitboss(), &["probe"]).await;
    assert_eq!(probe["range"]["code"], "OK", "{probe}");
    assert_eq!(probe["range"]["messages"].as_array().unwrap().len(), 4);
    assert_eq!(probe["divide_by_zero"]["code"], "INVALID_ARGUMENT");
    assert_eq!(probe["unknown_method"]["code"], "UNIMPLEMENTED", "{probe}");
    assert_eq!(probe["malformed"]["code"], "INVALID_ARGUMENT", "{probe}");
    // A client-streaming method has no grpc_proxy legacy to be relayed to.
    let sum = s.client(&s.pitboss(), &["sum", "1", "2"]).await;
    assert_eq!(sum["code"], "UNIMPLEMENTED", "{sum}");
    assert!(
        sum["message"]
            .as_str()
            .unwrap()
            .contains("client-streaming"),
        "{sum}"
    );
    s.stop().await;
}

/// Without a descriptor file, pitboss reads the descriptors from legacy's reflection
/// at start: it then knows Range streams and Sum streams its requests, and lists the
/// service in its own reflection.
#[tokio::test]
async fn descriptors_can_come_from_the_legacy_services_reflection() {
    let s = Setup::start_full(
        "from-reflection",
        "mode = \"off\"\n",
        PROXY_LEGACY_POOL_NEW,
        "descriptors_from_reflection = true\n",
    )
    .await;
    let mut direct = s.client(&s.legacy_addr, &["probe"]).await;
    let mut through = s.client(&s.pitboss(), &["probe"]).await;
    direct.as_object_mut().unwrap().remove("unknown_service");
    through.as_object_mut().unwrap().remove("unknown_service");
    assert_eq!(direct, through);
    assert_eq!(through["range"]["messages"].as_array().unwrap().len(), 4);
    let sum = s.client(&s.pitboss(), &["sum", "40", "2"]).await;
    assert_eq!(sum["value"], 42, "{sum}");
    let r = s.client(&s.pitboss(), &["reflect"]).await;
    assert_eq!(r["methods"]["Sum"][0], "calc.Reply", "{r}");
    s.stop().await;
}

/// A grpcio client that compresses its request (gzip) gets the same answer through
/// pitboss as directly, from legacy at 0% and from the workers at 100%; a client's
/// own cancel reaches legacy's handler, which sees its call end inactive.
#[tokio::test]
async fn a_gzip_request_reaches_both_backends_and_a_client_cancel_reaches_legacy() {
    let s = Setup::start("gzip", "mode = \"off\"\n").await;
    let direct = s.client(&s.legacy_addr, &["gzip-add", "20", "22"]).await;
    let through = s.client(&s.pitboss(), &["gzip-add", "20", "22"]).await;
    assert_eq!(direct, through);
    assert_eq!(
        (through["code"].as_str(), through["value"].as_i64()),
        (Some("OK"), Some(42)),
        "{through}"
    );
    assert_eq!(through["computed_by"], "legacy");

    // The client cancels once legacy's handler is running.
    let events = s.events.display().to_string();
    let ended_before = s.legacy_events().matches("call ended").count();
    let cancel = s.client(&s.pitboss(), &["cancel", &events]).await;
    assert_eq!(cancel["started"], true, "{cancel}");
    assert_eq!(cancel["code"], "CANCELLED", "{cancel}");
    assert!(
        eventually(LONG, || s.legacy_events().matches("call ended").count()
            > ended_before)
        .await,
        "legacy's call did not end: {}",
        s.legacy_events()
    );
    assert!(
        s.legacy_events().contains("cancelled")
            || s.legacy_events().contains("call ended: active=False"),
        "legacy did not see the cancel: {}",
        s.legacy_events()
    );

    s.write_flags(
        "mode = \"full\"\ncommands = [\"/calc.Calculator/*\"]\nfallback_to_legacy = false\n",
        |f| f.mode == pitboss::rollout::flags::Mode::Full,
    )
    .await;
    let new = s.client(&s.pitboss(), &["gzip-add", "20", "22"]).await;
    assert_eq!(
        (new["code"].as_str(), new["value"].as_i64()),
        (Some("OK"), Some(42)),
        "{new}"
    );
    assert_eq!(new["computed_by"], "new");
    s.stop().await;
}

/// `transparent.commands` renames: the pool runs the mapped command for a method; a
/// method without an entry runs its full name, which this adapter lacks, so that
/// call falls back to legacy.
#[tokio::test]
async fn transparent_commands_map_a_method_to_the_command_a_pool_runs() {
    const RENAMED: &str = r#"
from pitboss_worker import Adapter
from pitboss_worker.protobuf import grpc_method
import calc_pb2

adapter = Adapter("renamed")


@adapter.command(name="calc.add")
@grpc_method(calc_pb2.AddRequest, calc_pb2.Reply)
def add(msg, req):
    return calc_pb2.Reply(value=msg.a + msg.b, computed_by="new:calc.add")
"#;
    let opts = Opts {
        transparent: "commands = { \"/calc.Calculator/Add\" = \"calc.add\" }\n",
        adapter: Some(("renamed_adapter", RENAMED)),
        ..Opts::default()
    };
    let flags = "mode = \"full\"\ncommands = [\"/calc.Calculator/*\"]\n";
    let s = Setup::start_opts("renamed", flags, opts).await;
    let add = s.client(&s.pitboss(), &["add", "2", "3"]).await;
    assert_eq!(
        (add["code"].as_str(), add["value"].as_i64()),
        (Some("OK"), Some(5)),
        "{add}"
    );
    assert_eq!(add["computed_by"], "new:calc.add", "{add}");
    // Divide has no entry: the pool is asked for "/calc.Calculator/Divide", which it
    // does not serve, and legacy answers.
    let probe = s.client(&s.pitboss(), &["probe"]).await;
    assert_eq!(
        probe["divide_by_zero"]["code"], "INVALID_ARGUMENT",
        "{probe}"
    );
    let trailers = probe["divide_by_zero"]["trailers"].to_string();
    assert!(
        trailers.contains(r#"["x-why","b is 0"]"#),
        "legacy's: {trailers}"
    );
    s.stop().await;
}

/// The runbook's commands drive a transparent rollout: `pitboss rollout commands`,
/// `mode`, `set`, `status`, `rollback`, against a running pitboss in front of the
/// grpcio service; the same client follows each step.
#[tokio::test]
async fn the_admin_cli_drives_a_transparent_rollout() {
    let s = Setup::start("cli", "mode = \"off\"\n").await;
    let admin = s.server.admin_addr;
    let token = "transparent-token";
    let by = |v: &Value| v["computed_by"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        by(&s.client(&s.pitboss(), &["add", "1", "1", "k"]).await),
        "legacy"
    );

    rollout_cli(admin, token, &["commands", "/calc.Calculator/*"]).await;
    rollout_cli(admin, token, &["mode", "canary"]).await;
    rollout_cli(admin, token, &["set", "100"]).await;
    assert!(
        eventually(LONG, || {
            s.flags().mode == pitboss::rollout::flags::Mode::Canary
        })
        .await
    );
    let add = s.client(&s.pitboss(), &["add", "1", "1", "k"]).await;
    assert_eq!((by(&add), add["value"].as_i64()), ("new".into(), Some(2)));
    let status = rollout_cli(admin, token, &["status"]).await;
    assert!(status.contains("mode canary  percent 100"), "{status}");
    assert!(status.contains("commands /calc.Calculator/*"), "{status}");

    rollout_cli(admin, token, &["rollback"]).await;
    assert!(
        eventually(LONG, || s.flags().status.state == RolloutState::RolledBack).await,
        "not rolled back"
    );
    let add = s.client(&s.pitboss(), &["add", "1", "1", "k"]).await;
    assert_eq!(by(&add), "legacy", "{add}");
    let status = rollout_cli(admin, token, &["status"]).await;
    assert!(status.contains("state rolled_back"), "{status}");
    s.stop().await;
}

/// An `https://` legacy that wants a client certificate (mTLS) and whose certificate
/// names only `calc.internal`: reached with `[backends.legacy.tls]` (its CA, pitboss's
/// client certificate, `server_name`), reflection included; `check-config` loads the
/// same material. Without the client certificate, or without the server name, no
/// call gets through, and each says the legacy service is unavailable.
#[tokio::test]
async fn an_https_legacy_with_mtls_and_a_server_name_is_proxied() {
    let certs = temp_dir("transparent-tls-certs");
    let ca = certs::Ca::new("calc test CA");
    let ca_file = ca.write(&certs, "ca.pem");
    let (server_cert, server_key) = ca.server_named("calc.internal").write(&certs, "legacy");
    let (client_cert, client_key) = ca.client("spiffe://calc/pitboss").write(&certs, "pitboss");
    let path = |p: &PathBuf| p.display().to_string();
    let backends = format!(
        "[backends.legacy]\nkind = \"grpc_proxy\"\naddress = \"https://{{legacy}}\"\n\
         [backends.legacy.tls]\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n\
         server_name = \"calc.internal\"\n[backends.new]\nkind = \"pool\"\n",
        ca = path(&ca_file),
        cert = path(&client_cert),
        key = path(&client_key),
    );
    let opts = Opts {
        backends: &backends,
        descriptors: "descriptors_from_reflection = true\n",
        legacy_env: vec![
            ("CALC_TLS_CERT".into(), path(&server_cert)),
            ("CALC_TLS_KEY".into(), path(&server_key)),
            ("CALC_TLS_CLIENT_CA".into(), path(&ca_file)),
        ],
        ..Opts::default()
    };
    let s = Setup::start_opts("tls", "mode = \"off\"\n", opts).await;
    let probe = s.client(&s.pitboss(), &["probe"]).await;
    assert_eq!(probe["add"]["code"], "OK", "{probe}");
    assert_eq!(probe["divide_by_zero"]["message"], "division by zero");
    let trailers = probe["divide_by_zero"]["trailers"].to_string();
    assert!(trailers.contains(r#"["x-why","b is 0"]"#), "{trailers}");
    assert_eq!(probe["range"]["messages"].as_array().unwrap().len(), 4);
    let add = s.client(&s.pitboss(), &["add", "2", "3"]).await;
    assert_eq!(
        (add["computed_by"].as_str(), add["value"].as_i64()),
        (Some("legacy"), Some(5))
    );
    // The descriptors came from legacy's reflection, over TLS.
    let r = s.client(&s.pitboss(), &["reflect"]).await;
    assert_eq!(r["methods"]["Sum"][0], "calc.Reply", "{r}");
    let sum = s.client(&s.pitboss(), &["sum", "40", "2"]).await;
    assert_eq!(sum["value"], 42, "{sum}");

    // check-config loads the same material, and names what is missing.
    let file = s.dir.join("pitboss.toml");
    std::fs::write(&file, &s.text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("backends.legacy.tls"), "{said}");
    let no_key = s
        .text
        .replace(&format!("key_file = \"{}\"\n", path(&client_key)), "");
    std::fs::write(&file, &no_key).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backends.legacy.tls.key_file"), "{err}");

    // Without pitboss's client certificate, then without the server name: refused
    // by the service, then by pitboss's own check of the certificate.
    let no_client_cert = s
        .text
        .replace(&format!("cert_file = \"{}\"\n", path(&client_cert)), "")
        .replace(&format!("key_file = \"{}\"\n", path(&client_key)), "")
        .replace("descriptors_from_reflection = true\n", "");
    let no_server_name = s
        .text
        .replace("server_name = \"calc.internal\"\n", "")
        .replace("descriptors_from_reflection = true\n", "");
    for text in [no_client_cert, no_server_name] {
        let (other, _client) = start(config(&text)).await;
        let add = s
            .client(&other.bridge_addr.to_string(), &["add", "2", "3"])
            .await;
        assert_eq!(add["code"], "UNAVAILABLE", "{add}");
        other.shutdown().await;
    }
    s.stop().await;
    let _ = std::fs::remove_dir_all(&certs);
}

/// Legacy going away and coming back on its address: the calls in between fail as
/// UNAVAILABLE (nothing ran), and pitboss reconnects by itself once it is back.
#[tokio::test]
async fn pitboss_reconnects_when_the_legacy_service_comes_back() {
    let mut s = Setup::start("reconnect", "mode = \"off\"\n").await;
    let add = s.client(&s.pitboss(), &["add", "2", "3"]).await;
    assert_eq!(add["value"], 5, "{add}");
    s.legacy.kill().await.unwrap();
    let down = s.client(&s.pitboss(), &["add", "2", "3"]).await;
    assert_eq!(down["code"], "UNAVAILABLE", "{down}");
    let port = s.legacy_addr.rsplit(':').next().unwrap().to_string();
    let (legacy, _) = spawn_legacy(&s.py, &s.gen, &s.events, &[], &port).await;
    s.legacy = legacy;
    let add = s.client(&s.pitboss(), &["add", "2", "3"]).await;
    assert_eq!(
        (add["code"].as_str(), add["value"].as_i64()),
        (Some("OK"), Some(5)),
        "{add}"
    );
    s.stop().await;
}

/// A malformed `grpc-timeout` on one of the user's methods is refused by pitboss
/// before legacy sees the call (tonic ignored it, so legacy got the call with no
/// deadline at all), INTERNAL, and counted once under the method.
#[tokio::test]
async fn a_malformed_grpc_timeout_on_a_users_method_is_refused_before_legacy() {
    let s = Setup::start("bad-timeout", "mode = \"off\"\n").await;
    let path = "/calc.Calculator/Inspect";
    // An empty InspectRequest: legacy answers at once, logging "call started".
    let empty = bytes::Bytes::from_static(&[0, 0, 0, 0, 0]);
    let (status, message, _) =
        raw_grpc_with(s.server.bridge_addr, path, "10S", vec![empty.clone()]).await;
    assert_eq!(status, 0, "{message}");
    assert!(
        eventually(LONG, || s.legacy_events().matches("call started").count()
            == 1)
        .await
    );

    let (status, message, class) =
        raw_grpc_with(s.server.bridge_addr, path, "250", vec![empty]).await;
    assert_eq!(status, tonic::Code::Internal as u32, "{message}");
    assert!(
        message.contains("grpc-timeout header \"250\" is malformed"),
        "{message}"
    );
    assert_eq!(class, "invalid_request");
    let labels = [("command", path), ("error_class", "invalid_request")];
    let m = scrape(s.server.metrics_addr).await;
    assert_eq!(sum_of(&m, "pitboss_requests_total", &labels), 1.0, "{m}");
    // The well-formed call answered; the refused one never started.
    let small = s.client(&s.pitboss(), &["inspect", "0", "5"]).await;
    assert_eq!(small["code"], "OK");
    assert!(
        eventually(LONG, || s.legacy_events().matches("call started").count()
            == 2)
        .await
    );
    assert_eq!(
        s.legacy_events().matches("call started").count(),
        2,
        "{}",
        s.legacy_events()
    );
    s.stop().await;
}
