//! `pitboss doctor`, run as a user would: on a fresh `pitboss init` project it finds
//! nothing wrong; on a broken one each problem is one FAIL line with its fix, and the
//! exit status is 1.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

fn pitboss(args: &[&str], dir: &Path) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The project's config with its listeners moved to `listen`, free ports elsewhere,
/// and `pool` lines appended to `[pool]`.
fn write_config(dir: &Path, listen: &str, pool: &str) {
    let text = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n\
         [pool]\nadapter = \"app:adapter\"\npython_path = [\".\"]\nsize = 1\n{pool}\n\
         [rollout]\nflags_file = \"flags.toml\"\n"
    );
    std::fs::write(dir.join("pitboss.toml"), text).unwrap();
}

#[test]
fn a_fresh_project_is_healthy_and_each_problem_is_named_with_its_fix() {
    let root = temp_dir("doctor");
    let dir = root.join("app");
    assert!(pitboss(&["init", dir.to_str().unwrap()], &root)
        .status
        .success());
    write_config(&dir, "127.0.0.1:0", "");
    let out = pitboss(&["doctor", "--config", "pitboss.toml"], &dir);
    let report = text(&out);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!report.contains("FAIL"), "{report}");
    for want in [
        "ok   config: pitboss.toml is valid",
        "ok   runtime: ",
        "legacy python: python3 -> ",
        "ok   legacy adapter: app:adapter imports and is ready in ",
        "2 command(s): hello, words",
        "ok   server.listen: 127.0.0.1:0: any free port",
        "ok   flags file: ",
        "is writable: automatic rollback and admin changes are saved to it",
    ] {
        assert!(report.contains(want), "{want:?} not in:\n{report}");
    }

    // Broken four ways: a port another process holds, an adapter that does not
    // import, an interpreter that is not there (on new, so legacy's check still runs),
    // a TLS certificate that is not there.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap();
    std::fs::write(dir.join("app.py"), "import no_such_module_here\n").unwrap();
    write_config(&dir, &port.to_string(), "");
    let cfg = std::fs::read_to_string(dir.join("pitboss.toml")).unwrap()
        + "[backends.new]\nkind = \"pool\"\n[backends.new.pool]\npython = \"/nonexistent/python3\"\n"
        + "[tls.bridge]\ncert_file = \"missing.pem\"\nkey_file = \"missing.key\"\n";
    std::fs::write(dir.join("pitboss.toml"), cfg).unwrap();
    let out = pitboss(&["doctor", "--config", "pitboss.toml"], &dir);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("FAIL"),
        "the error says why it failed"
    );
    // A finding runs from its verdict to the next one (a worker's stderr may follow
    // it on its own lines); its last line is its fix.
    let finding = |start: &str| -> (String, String) {
        let lines: Vec<&str> = report.lines().collect();
        let i = lines
            .iter()
            .position(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no finding {start:?} in:\n{report}"));
        let end = lines[i + 1..]
            .iter()
            .position(|l| ["ok ", "warn", "FAIL"].iter().any(|m| l.starts_with(m)))
            .map_or(lines.len(), |n| i + 1 + n);
        let block = &lines[i..end];
        let fix = block.last().unwrap().trim().to_string();
        (block.join("\n"), fix)
    };
    let (found, fix) = finding("FAIL server.listen");
    assert!(
        found.contains(&format!("cannot listen on {port}")),
        "{found}"
    );
    assert!(fix.starts_with("fix: another process holds it"), "{fix}");
    let (found, fix) = finding("FAIL legacy adapter");
    assert!(
        found.contains("No module named 'no_such_module_here'"),
        "{found}"
    );
    assert!(
        fix.starts_with("fix: pool.adapter is MODULE:OBJECT"),
        "{fix}"
    );
    let (found, fix) = finding("FAIL new python");
    assert!(found.contains("/nonexistent/python3"), "{found}");
    assert!(
        fix.starts_with("fix: install Python 3.9+ or set pool.python"),
        "{fix}"
    );
    let (found, fix) = finding("FAIL tls");
    assert!(
        found.contains("tls.bridge.cert_file") && found.contains("missing.pem"),
        "{found}"
    );
    assert!(
        fix.starts_with("fix: fix the files the [tls] settings name"),
        "{fix}"
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&root);
}
