//! The flags file as operators and their tools write it (issue 13, items 2 to 4):
//! in-place rewrites that pause mid-write, files without `[status]`, and a bad file at
//! start. A real pitboss (in process, or the real binary) with a `legacy` backend of
//! `python/examples/demo.py` and a `new` one of `demo_v2.py`: `version` tells them
//! apart.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use pitboss::grpc::pb;
use pitboss::rollout::bucket::{bucket, in_new};
use pitboss::rollout::flags::RolloutState;
use pitboss::rollout::Percent;
use pitboss::server::RunningServer;

const TOKEN: &str = "flags-file-test-token";

/// A config with both backends and the flags file `dir/flags.toml`.
fn config_text(dir: &Path) -> String {
    let rest = format!(
        "{pool}{rollout}[backends.new]\nkind = \"pool\"\n[backends.new.pool]\nadapter = \"demo_v2:adapter\"\n",
        pool = pool_section("demo:adapter", 1),
        rollout = rollout_section(dir),
    );
    on_free_ports("shutdown_grace = \"10s\"", &rest)
}

struct Setup {
    dir: PathBuf,
    server: RunningServer,
    client: Client,
    admin: AdminClient,
}

async fn start(tag: &str, flags: &str) -> Setup {
    let dir = temp_dir(&format!("flagsfile-{tag}"));
    std::fs::write(dir.join("flags.toml"), flags).unwrap();
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    serve(dir).await
}

/// A pitboss on the flags file (and token) already in `dir`.
async fn serve(dir: PathBuf) -> Setup {
    let (server, client) = common::start(config(&config_text(&dir))).await;
    let admin = AdminClient::connect(format!("http://{}", server.admin_addr))
        .await
        .unwrap();
    Setup {
        dir,
        server,
        client,
        admin,
    }
}

impl Setup {
    fn flags_path(&self) -> PathBuf {
        self.dir.join("flags.toml")
    }

    fn flags(&self) -> Arc<pitboss::rollout::Flags> {
        self.server.edge().rollout().flags.get()
    }

    async fn stop(self) {
        self.server.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A routing key whose bucket is on new at `percent` with the default salt.
fn key_on_new(percent: f64) -> String {
    let p = Percent::from_f64(percent).unwrap();
    (0..)
        .map(|i| format!("user-{i}"))
        .find(|k| in_new(bucket("pitboss", k), p))
        .unwrap()
}

fn keyed(key: &str) -> pb::ExecuteRequest {
    let mut r = exec("version", "{}");
    r.routing_key = key.into();
    r
}

/// The backend that answered `version` for this key.
async fn answered_by(client: &mut Client, key: &str) -> String {
    client
        .execute(keyed(key))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner()
        .backend
}

/// Writes `text` over the file in place, the way `open(path, "w")` does: truncate,
/// write `text[..cut]`, flush, pause, write the rest, close.
fn write_in_place_with_a_pause(path: &Path, text: &str, cut: usize, pause: Duration) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(&text.as_bytes()[..cut]).unwrap();
    f.flush().unwrap();
    std::thread::sleep(pause);
    f.write_all(&text.as_bytes()[cut..]).unwrap();
    f.flush().unwrap();
    drop(f);
}

/// Issue 13, item 2. A rolled-back canary at 50%, rewritten in place with the same
/// content and a 300 ms pause mid-write (once right after the truncate: an empty file;
/// once cut before `percent` and `[status]`). Neither half-written state is ever
/// applied: GetRollout keeps saying rolled back at 50%, and a key on new's side of the
/// split keeps going to legacy. The complete file is applied after each write.
#[tokio::test]
async fn an_in_place_rewrite_that_pauses_mid_write_is_never_applied_half_written() {
    const FULL: &str = "mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\n\n\
                        [status]\nstate = \"rolled_back\"\nreason = \"by the test\"\n";
    let mut s = start("inplace", FULL).await;
    let key = key_on_new(50.0);
    assert_eq!(answered_by(&mut s.client, &key).await, "legacy");

    // Watch GetRollout and the key's route, as fast as they answer, for the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let seen_bad: Arc<Mutex<Vec<String>>> = Default::default();
    let watcher = {
        let (stop, seen_bad) = (stop.clone(), seen_bad.clone());
        let (mut client, mut admin, key) = (s.client.clone(), s.admin.clone(), key.clone());
        tokio::spawn(async move {
            let mut samples = 0u64;
            while !stop.load(Ordering::Acquire) {
                let r = admin
                    .get_rollout(authed(pb::GetRolloutRequest {}, TOKEN))
                    .await
                    .unwrap()
                    .into_inner();
                let backend = answered_by(&mut client, &key).await;
                if r.state != "rolled_back"
                    || r.mode != "canary"
                    || r.percent != 50.0
                    || backend != "legacy"
                {
                    seen_bad.lock().unwrap().push(format!(
                        "state {} mode {} percent {} key to {backend}",
                        r.state, r.mode, r.percent
                    ));
                }
                samples += 1;
            }
            samples
        })
    };

    let path = s.flags_path();
    let reloads_before = s.server.edge().rollout().flags.reloads();
    let cut_before_percent = FULL.find("percent").unwrap();
    for cut in [0, cut_before_percent] {
        let p = path.clone();
        tokio::task::spawn_blocking(move || {
            write_in_place_with_a_pause(&p, FULL, cut, Duration::from_millis(300))
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The complete file is applied (here: the same flags, a reload that changes
    // nothing), and a complete in-place edit without a pause still is.
    assert!(
        eventually(Duration::from_secs(10), || s
            .server
            .edge()
            .rollout()
            .flags
            .reloads()
            .0
            > reloads_before.0)
        .await,
        "the complete file was never read"
    );
    let edited = FULL.replace("percent = 50.0", "percent = 40.0");
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        write_in_place_with_a_pause(&p, &edited, edited.len(), Duration::ZERO)
    })
    .await
    .unwrap();
    let applied = eventually(Duration::from_secs(10), || {
        s.flags().percent.0.as_f64() == 40.0
    })
    .await;
    stop.store(true, Ordering::Release);
    let samples = watcher.await.unwrap();
    let bad = seen_bad.lock().unwrap().clone();
    // The last edit (40%) may be seen by the watcher just before it stopped.
    let bad: Vec<_> = bad
        .into_iter()
        .filter(|b| !b.contains("percent 40"))
        .collect();
    assert!(applied, "a complete in-place edit was not applied");
    assert!(samples >= 20, "only {samples} samples");
    assert!(
        bad.is_empty(),
        "a half-written flags file was applied ({} of {samples} samples): {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert_eq!(s.flags().status.state, RolloutState::RolledBack);
    s.stop().await;
}

/// Issue 13, item 3. After a rollback, a file renamed in with only mode, percent,
/// commands and salt (no `[status]`) changes those and keeps the rollout rolled back;
/// only a file that says `state = "active"` resumes it.
#[tokio::test]
async fn a_flags_file_without_status_keeps_a_rolled_back_rollout_rolled_back() {
    let mut s = start(
        "nostatus",
        "mode = \"canary\"\npercent = 10.0\ncommands = [\"*\"]\n",
    )
    .await;
    let req = authed(
        pb::SetRolloutRequest {
            action: "rollback".into(),
            actor: "ops".into(),
            percent: -1.0,
            ..Default::default()
        },
        TOKEN,
    );
    s.admin.set_rollout(req).await.unwrap();
    assert_eq!(s.flags().status.state, RolloutState::RolledBack);

    let (dir, path) = (s.dir.clone(), s.flags_path());
    let rename_in = |text: &str| {
        let tmp = dir.join(".flags.toml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    rename_in("mode = \"canary\"\npercent = 20.0\ncommands = [\"*\"]\nsalt = \"pitboss\"\n");
    assert!(
        eventually(Duration::from_secs(10), || s.flags().percent.0.as_f64()
            == 20.0)
        .await,
        "the file was not applied"
    );
    let f = s.flags();
    assert_eq!(
        f.status.state,
        RolloutState::RolledBack,
        "a file without [status] resumed the rollout"
    );
    assert!(
        f.status.changed_by.starts_with("ops"),
        "the status is kept whole: {:?}",
        f.status
    );
    let r = s
        .admin
        .get_rollout(authed(pb::GetRolloutRequest {}, TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.state.as_str(), r.effective_percent),
        ("rolled_back", 0.0)
    );
    assert_eq!(
        answered_by(&mut s.client, &key_on_new(20.0)).await,
        "legacy"
    );

    // A restart on that file keeps it rolled back too (the status of the last good
    // copy that pitboss keeps next to the file).
    let dir = s.dir.clone();
    s.server.shutdown().await;
    let mut s = serve(dir).await;
    let r = s
        .admin
        .get_rollout(authed(pb::GetRolloutRequest {}, TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.state.as_str(), r.percent),
        ("rolled_back", 20.0),
        "a restart resumed the rollout"
    );
    assert!(r.changed_by.starts_with("ops@"), "{}", r.changed_by);
    assert_eq!(
        answered_by(&mut s.client, &key_on_new(20.0)).await,
        "legacy"
    );

    // An explicit state does resume it.
    rename_in(
        "mode = \"canary\"\npercent = 20.0\ncommands = [\"*\"]\n[status]\nstate = \"active\"\n",
    );
    assert!(
        eventually(Duration::from_secs(10), || s.flags().status.state
            == RolloutState::Active)
        .await,
        "state = \"active\" did not resume"
    );
    assert_eq!(answered_by(&mut s.client, &key_on_new(20.0)).await, "new");
    s.stop().await;
}

/// Waits until legacy answers through the binary; returns which backend did.
async fn first_answer(p: &Proc, key: &str) -> String {
    let mut client = None;
    for _ in 0..300 {
        if client.is_none() {
            client = Client::connect(p.bridge.clone()).await.ok();
        }
        if let Some(c) = client.as_mut() {
            if let Ok(r) = c.execute(keyed(key)).await {
                return r.into_inner().backend;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pitboss never answered");
}

/// /readyz once both backends have a ready worker (or its last answer after 30 s).
async fn ready(p: &Proc) -> (u16, String) {
    let mut last = (0, String::new());
    for _ in 0..300 {
        last = http_get(p.metrics, "/readyz").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Issue 13, item 4. A flags file that a running pitboss would reject (percent 150)
/// does not stop a start: pitboss serves with everything on legacy (no last good copy
/// yet), says why in the log, in a metric and in /readyz, and `check-flags` still
/// fails on the file. Once it has applied a good file (kept as `.flags.toml.last-good`
/// next to it), a later bad one at start means the last good copy.
#[tokio::test]
async fn a_bad_flags_file_at_start_serves_on_legacy_or_the_last_good_copy() {
    let dir = temp_dir("flagsfile-badstart");
    let cfg = dir.join("pitboss.toml");
    std::fs::write(&cfg, config_text(&dir)).unwrap();
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let flags = dir.join("flags.toml");
    let bad = "mode = \"full\"\ncommands = [\"*\"]\npercent = 150.0\n";
    std::fs::write(&flags, bad).unwrap();

    // check-flags fails on it, naming the line and key.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .arg("check-flags")
        .arg(&flags)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check-flags accepted it");
    assert!(
        err.contains("flags.toml:3") && err.contains("percent"),
        "{err}"
    );

    let mut p = spawn(&cfg).await;
    let key = key_on_new(50.0);
    assert_eq!(first_answer(&p, &key).await, "legacy", "all on legacy");
    let (code, body) = ready(&p).await;
    assert_eq!(code, 200, "legacy serves: ready ({body})");
    assert!(
        body.contains("flags file rejected") && body.contains("percent"),
        "/readyz does not say why: {body}"
    );
    let metrics = common::scrape(p.metrics).await;
    assert_eq!(
        sample(&metrics, "pitboss_flags_file_valid", &[]),
        Some(0.0),
        "{metrics}"
    );
    assert!(
        p.logged(|l| l.contains("ERROR") && l.contains("flags.toml:3")),
        "not logged as an error"
    );

    // A good file is applied (and remembered); the gauge clears.
    let good = "mode = \"canary\"\npercent = 100.0\ncommands = [\"*\"]\n";
    std::fs::write(dir.join(".swp"), good).unwrap();
    std::fs::rename(dir.join(".swp"), &flags).unwrap();
    let mut client = Client::connect(p.bridge.clone()).await.unwrap();
    let mut on_new = false;
    for _ in 0..100 {
        if answered_by(&mut client, &key).await == "new" {
            on_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(on_new, "the good file was not applied");
    let metrics = common::scrape(p.metrics).await;
    assert_eq!(sample(&metrics, "pitboss_flags_file_valid", &[]), Some(1.0));
    assert!(
        dir.join(".flags.toml.last-good").exists(),
        "no last good copy kept next to the file"
    );
    let _ = p.child.kill().await;

    // Restarted on a bad file, it uses the last good copy: the key stays on new.
    std::fs::write(&flags, bad).unwrap();
    let p = spawn(&cfg).await;
    assert_eq!(first_answer(&p, &key).await, "new", "the last good copy");
    let (code, body) = ready(&p).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("last good copy"), "{body}");
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGHUP (`kill -HUP`, systemd's `ExecReload`) re-reads the flags file at once and
/// pitboss serves on. Before, SIGHUP had no handler: its default action killed
/// pitboss on the spot, with no drain.
#[tokio::test]
async fn sighup_re_reads_the_flags_file_and_pitboss_serves_on() {
    let dir = temp_dir("flagsfile-sighup");
    let cfg = dir.join("pitboss.toml");
    std::fs::write(&cfg, config_text(&dir)).unwrap();
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        dir.join("flags.toml"),
        "mode = \"canary\"\npercent = 100.0\ncommands = [\"*\"]\n",
    )
    .unwrap();
    let mut p = spawn(&cfg).await;
    let key = key_on_new(50.0);
    assert_eq!(first_answer(&p, &key).await, "new");
    let reloads = |m: &str| {
        sample(
            m,
            "pitboss_config_reloads_total",
            &[("file", "flags"), ("result", "ok")],
        )
        .unwrap_or(0.0)
    };
    let before = reloads(&common::scrape(p.metrics).await);
    let pid = p.child.id().unwrap();
    for n in 1..=2 {
        kill(pid, libc::SIGHUP);
        let mut seen = 0.0;
        for _ in 0..100 {
            seen = reloads(&common::scrape(p.metrics).await);
            if seen >= before + n as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            seen,
            before + n as f64,
            "SIGHUP {n} did not re-read the file"
        );
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "SIGHUP killed pitboss"
        );
    }
    assert!(
        p.logged(|l| l.contains("SIGHUP: flags file re-read")),
        "not logged"
    );
    let mut client = Client::connect(p.bridge.clone()).await.unwrap();
    assert_eq!(answered_by(&mut client, &key).await, "new", "serves on");
    let _ = p.child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}
