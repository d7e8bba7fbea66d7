//! Runs the Python runtime's own stdlib `unittest` suite, so that `cargo test` is the
//! one command that runs every test.

use std::process::Command;

#[test]
fn python_unit_tests_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let out = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "tests"])
        // No __pycache__ in the package: build.rs watches its directory.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(&dir)
        .output()
        .expect("python3 must be installed to run the worker runtime's tests");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python unittest failed:\n{stderr}");
    // unittest prints "Ran N tests" on stderr; make sure the suite was not empty.
    let ran = stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or(0);
    assert!(ran > 0, "no Python test ran:\n{stderr}");
}
