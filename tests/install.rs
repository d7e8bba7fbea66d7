//! The binary carries its worker runtime (issue 19): a copy of `pitboss` outside the
//! source tree, started from another directory on a user adapter outside the repo,
//! writes the embedded `pitboss_worker` to its cache once and serves calls, without
//! writing into its install prefix; and with no writable cache but the temp dir (a
//! read-only root file system) it falls back to a private directory there.
//!
//! The binary under test is the one `cargo install --path . --root <tmp>` made when
//! `$PITBOSS_TEST_INSTALLED_BIN` names it (`.ci/run` runs this file a second time that way,
//! after the suite), else the one this test build made; either is copied into a
//! prefix outside the checkout, which is what the runtime's lookup sees.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// `<dir>/prefix/bin/pitboss` (a copy of the binary under test), a user adapter in
/// `<dir>/app` and its config; returns the binary and the config.
fn install(dir: &Path) -> (PathBuf, PathBuf) {
    let bin = dir.join("prefix/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("pitboss");
    let built = std::env::var_os("PITBOSS_TEST_INSTALLED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pitboss")));
    std::fs::copy(&built, &exe).unwrap_or_else(|e| panic!("{}: {e}", built.display()));
    let app = dir.join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(
        app.join("greeter.py"),
        "from pitboss_worker import Adapter\n\n\
         adapter = Adapter(\"greeter\")\n\n\n\
         @adapter.command\n\
         def hello(req):\n    return {\"hello\": req.text()}\n",
    )
    .unwrap();
    let config = app.join("pitboss.toml");
    std::fs::write(
        &config,
        on_free_ports(
            "",
            "[pool]\nadapter = \"greeter:adapter\"\nsize = 1\npython_path = [\".\"]\n",
        ),
    )
    .unwrap();
    (exe, config)
}

/// Every file under `dir`, sorted (to see that nothing was written there).
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

fn command(exe: &Path, cwd: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(exe);
    c.current_dir(cwd)
        .env_remove("PITBOSS_RUNTIME_DIR")
        .env_remove("PITBOSS_CACHE_DIR")
        .env_remove("PYTHONPATH");
    c
}

async fn call_hello(p: &Proc) -> serde_json::Value {
    let mut client = Client::connect(p.bridge.clone()).await.unwrap();
    let mut last = None;
    for _ in 0..300 {
        match client.execute(exec("hello", "world")).await {
            Ok(r) => return serde_json::from_slice(&r.into_inner().payload).unwrap(),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("hello never answered: {last:?}");
}

fn runtime_line(p: &Proc) -> String {
    p.log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("worker runtime:"))
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn an_installed_binary_serves_a_user_adapter_from_its_embedded_runtime() {
    let dir = temp_dir("install");
    let (exe, config) = install(&dir);
    let cwd = dir.join("elsewhere");
    let cache = dir.join("cache");
    std::fs::create_dir_all(&cwd).unwrap();
    let prefix_before = tree(&dir.join("prefix"));

    let mut c = command(&exe, &cwd);
    c.env("XDG_CACHE_HOME", &cache)
        .env("HOME", dir.join("home"));
    let p = spawn_exe(c, &config).await;
    assert_eq!(call_hello(&p).await, serde_json::json!({"hello": "world"}));
    let line = runtime_line(&p);
    assert!(line.contains("embedded in the binary"), "{line}");

    let runtime = cache
        .join("pitboss")
        .join(pitboss::runtime_files::versioned_name());
    assert!(line.contains(&runtime.display().to_string()), "{line}");
    for (rel, bytes) in pitboss::runtime_files::FILES {
        assert_eq!(std::fs::read(runtime.join(rel)).unwrap(), *bytes, "{rel}");
    }
    assert_eq!(
        tree(&dir.join("prefix")),
        prefix_before,
        "wrote into the prefix"
    );
    drop(p);

    // A second start finds the runtime written and uses it as it is.
    let mut c = command(&exe, &cwd);
    c.env("XDG_CACHE_HOME", &cache)
        .env("HOME", dir.join("home"));
    let p = spawn_exe(c, &config).await;
    assert_eq!(call_hello(&p).await, serde_json::json!({"hello": "world"}));
    drop(p);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn with_only_the_temp_dir_writable_the_runtime_goes_to_a_private_dir_there() {
    let dir = temp_dir("install-ro");
    let (exe, config) = install(&dir);
    // Paths under a regular file cannot be created (by root either): the cache dirs
    // of a read-only root file system.
    let blocked = dir.join("readonly");
    std::fs::write(&blocked, b"").unwrap();
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let prefix_before = tree(&dir.join("prefix"));

    let mut c = command(&exe, &dir);
    c.env("XDG_CACHE_HOME", blocked.join("xdg"))
        .env("HOME", blocked.join("home"))
        .env("TMPDIR", &tmp);
    let p = spawn_exe(c, &config).await;
    assert_eq!(call_hello(&p).await, serde_json::json!({"hello": "world"}));
    let line = runtime_line(&p);
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let private = tmp.join(format!("pitboss-{uid}"));
    assert!(line.contains(&private.display().to_string()), "{line}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(
        tree(&dir.join("prefix")),
        prefix_before,
        "wrote into the prefix"
    );
    drop(p);

    // Nothing writable at all: a clear error naming what was tried and the fix.
    let mut c = command(&exe, &dir);
    c.env("XDG_CACHE_HOME", blocked.join("xdg"))
        .env("HOME", blocked.join("home"))
        .env("TMPDIR", blocked.join("tmp"))
        .env("RUST_LOG", "info")
        .args(["--log-format", "json", "--config"])
        .arg(&config)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("exits")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot write the worker runtime"), "{err}");
    assert!(err.contains("PITBOSS_CACHE_DIR"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A copy of the runtime whose protocol version is not pitboss's, in `dir`.
fn runtime_of_protocol(dir: &Path, version: u32) -> PathBuf {
    let rt = dir.join("runtime");
    for (rel, bytes) in pitboss::runtime_files::FILES {
        let path = rt.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut text = String::from_utf8(bytes.to_vec()).unwrap();
        if *rel == "pitboss_worker/protocol.py" {
            assert!(text.contains("\nPROTOCOL_VERSION = 1\n"));
            text = text.replace(
                "\nPROTOCOL_VERSION = 1\n",
                &format!("\nPROTOCOL_VERSION = {version}\n"),
            );
        }
        std::fs::write(path, text).unwrap();
    }
    rt
}

#[tokio::test]
async fn a_runtime_of_another_protocol_is_refused_at_ready_with_both_versions() {
    let dir = temp_dir("install-proto");
    let rt = runtime_of_protocol(&dir, 2);
    let spec = pitboss::worker::WorkerCommand::demo(rt.clone())
        .resolve(1 << 20, 1)
        .await
        .unwrap();
    let err =
        match pitboss::worker::start(&spec, pitboss::worker::WorkerId(1), Duration::from_secs(30))
            .await
        {
            Ok(_) => panic!("a protocol 2 worker was accepted"),
            Err(e) => e.to_string(),
        };
    assert!(err.contains("speaks protocol 2"), "{err}");
    assert!(err.contains(&rt.display().to_string()), "{err}");
    assert!(
        err.contains(&format!(
            "this pitboss ({}) speaks 1",
            pitboss::runtime_files::VERSION
        )),
        "{err}"
    );
    assert!(err.contains("pool.runtime_dir"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn pitboss_runtime_prints_a_pip_installable_directory() {
    let dir = temp_dir("install-cmd");
    let (exe, _) = install(&dir);
    let cache = dir.join("cache");
    let mut c = command(&exe, &dir);
    c.env("PITBOSS_CACHE_DIR", &cache).arg("runtime");
    let out = tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("exits")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert_eq!(
        printed,
        cache.join(pitboss::runtime_files::versioned_name())
    );
    assert!(printed.join("pyproject.toml").is_file());
    assert!(printed.join("pitboss_worker/py.typed").is_file());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn pitboss_init_scaffolds_a_project_that_serves_and_whose_test_passes() {
    let dir = temp_dir("install-init");
    let (exe, _) = install(&dir);
    let project = dir.join("myapp");
    let cache = dir.join("cache");
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(&exe);
        c.current_dir(&dir)
            .env_remove("PITBOSS_RUNTIME_DIR")
            .env("PITBOSS_CACHE_DIR", &cache)
            .args(args);
        c.output().unwrap()
    };
    let out = run(&["init", project.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    for f in ["app.py", "test_app.py", "pitboss.toml", "flags.toml"] {
        assert!(project.join(f).is_file(), "{f}");
    }
    // A second init refuses to overwrite, and says which files are in the way.
    let again = run(&["init", project.to_str().unwrap()]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("not overwriting") && err.contains("app.py"),
        "{err}"
    );
    // The config and the flags file are valid as written.
    let config = project.join("pitboss.toml");
    let checked = run(&["check-config", config.to_str().unwrap()]);
    assert!(checked.status.success(), "{checked:?}");
    let flags = project.join("flags.toml");
    let checked = run(&["check-flags", flags.to_str().unwrap()]);
    assert!(checked.status.success(), "{checked:?}");

    // The adapter's own test passes against the runtime the binary carries.
    let runtime = String::from_utf8(run(&["runtime"]).stdout).unwrap();
    let test = std::process::Command::new("python3")
        .current_dir(&project)
        .env("PYTHONPATH", runtime.trim())
        .args(["-m", "unittest", "test_app"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&test.stderr);
    assert!(test.status.success(), "{stderr}");
    assert!(stderr.contains("Ran 4 tests"), "{stderr}");

    // Served as written (on free ports instead of the default ones).
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .replace("127.0.0.1:50051", "127.0.0.1:0")
        .replace("127.0.0.1:50052", "127.0.0.1:0")
        .replace("127.0.0.1:9464", "127.0.0.1:0");
    std::fs::write(&config, text).unwrap();
    let mut c = command(&exe, &dir);
    c.env("PITBOSS_CACHE_DIR", &cache);
    let p = spawn_exe(c, &config).await;
    let mut client = Client::connect(p.bridge.clone()).await.unwrap();
    let mut reply = None;
    for _ in 0..300 {
        if let Ok(r) = client.execute(exec("hello", r#"{"name": "ada"}"#)).await {
            reply = Some(r.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = reply.expect("hello answered");
    let v: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v, serde_json::json!({"hello": "ada"}));
    let chunks = collect(
        client
            .execute_stream(exec("words", r#""one two""#))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let words: Vec<String> = chunks
        .iter()
        .filter(|c| !(c.last && c.payload.is_empty()))
        .map(|c| String::from_utf8(c.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(words, ["one", "two"]);
    drop(p);
    let _ = std::fs::remove_dir_all(dir);
}
