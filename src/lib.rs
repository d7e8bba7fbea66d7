//! # pitboss
//!
//! A supervised, observable sidecar that runs Python code for services that are not
//! written in Python.
//!
//! # Layout
//!
//! The modules are layers; each imports only the layers below it, and
//! `tests/architecture.rs` fails on any `crate::` edge that points up, and on any
//! cycle.
//!
//! ```text
//! server ─▶ grpc ─▶ telemetry ─▶ rollout ─▶ backend ─▶ resilience ─▶ pool ─▶ worker
//!                  (config, proto, wire, runtime_files: leaves every layer may use)
//! ```
//!
//! - [`server`]: runs the listeners and the backends, and shuts them down in order
//!   (one token tree).
//! - [`grpc`]: the edge: `pitboss.v1.Bridge` and `Admin`, the deadline taken from the
//!   arrival, the record that counts every call once, and the one mapping from errors
//!   to gRPC statuses ([`grpc::status`]).
//! - [`telemetry`]: Prometheus metrics, readiness, and the HTTP listener for them. It
//!   sits below the edge and reads it only through [`telemetry::Observed`], which the
//!   edge implements.
//! - [`rollout`]: the split between the legacy and the new backend. Its
//!   [`rollout::split::Split`] owns both backends and the session pins, and runs
//!   every call (unary, stream, session) where the rollout says: fallback, shadow and
//!   the recording of outcomes in the rolling statistics are its. Below it: flags
//!   (hot reloaded, applied only when complete), sticky bucketing, shadow comparison,
//!   rolling statistics and auto-rollback.
//! - [`backend`]: what serves a role (`legacy` or `new`): the shared part (the tower
//!   stack, the breaker around streams, the classification of every failure by the
//!   backend's rules) over one [`backend::Target`] per kind (a local pool, a grpc
//!   upstream); it reports through the observers the server hands it.
//! - [`resilience`]: the single error classification (one table: retry, breaker,
//!   rollback, fallback), the error of a call ([`resilience::CallError`]: a pool's
//!   error, or what only the layers above the pool know: circuit open, overloaded, a
//!   remote failure), retry with backoff and a budget, breakers, outlier ejection,
//!   and the one adapter from an attempt to a try on a pool or an upstream.
//! - [`pool`]: a supervised pool of Python workers (supervision, admission and
//!   queueing, session affinity, recycling, graceful shutdown).
//! - [`worker`]: one Python process: spawning, the length-prefixed frame protocol
//!   (`docs/PROTOCOL.md`), and the connection that routes replies by request id.
//! - [`config`]: the config file and `PITBOSS_*` overrides, parsed and validated into
//!   sections; each layer converts its own section into its settings.
//! - [`proto`]: the generated `pitboss.v1` types, shared by the edge and the `grpc`
//!   backend.
//! - [`wire`]: a transparent call (a client's call of its own gRPC service's method,
//!   served without decoding): its framing, the metadata that travels with it and the
//!   status that comes back, shared by the edge, the split and the `grpc_proxy` backend.
//!
//! # A unary call's path
//!
//! The outermost layer stamps the arrival ([`grpc::deadline`]); `Bridge::execute`
//! opens a call record, turns the proto request into a [`rollout::split::Call`] and
//! hands it to the [`rollout::split::Split`]. The split picks the route (a session's
//! pinned backend, else the sticky split) and runs the call on that [`backend`]'s
//! stack: load shedding, a concurrency limit, retry (backoff, budget, per-try
//! deadline), the breaker, then the one try adapter ([`resilience::TryService`])
//! over the [`pool`] (admission, queueing, affinity) and a [`worker`] connection, or
//! over an upstream. A failure is classified once, where it is understood (the pool's
//! error by the backend's exception rules, the breaker's refusal, an upstream's
//! reported class), and travels up as a [`resilience::Failed`]: its error and class.
//! A failure of `new` that the table allows is served again by legacy; the split
//! records each backend's outcome in the rollout statistics and answers the edge
//! with an [`rollout::split::Answer`] (the backend, and the result). The edge records
//! the call once (metrics) and maps a failure to a status in [`grpc::status`], with
//! the class it carries.
//!
//! The benchmark harness behind `pitboss bench` (load generator, baselines) is part of
//! the binary, not of this library: `src/cli/bench.rs`.

pub mod backend;
pub mod config;
pub mod grpc;
pub mod pool;
pub mod proto;
pub mod resilience;
pub mod rollout;
pub mod runtime_files;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Every `Result<..>` in `text` whose error type is a bare `String`, as
    /// (line, the type as written). `io::Result<String>` (one argument) is fine.
    fn string_errors(text: &str) -> Vec<(usize, String)> {
        let open = concat!("Result", "<");
        let mut found = Vec::new();
        for (start, _) in text.match_indices(open) {
            let rest = &text[start + open.len()..];
            let (mut depth, mut parens, mut prev) = (1usize, 0usize, ' ');
            let mut args = vec![String::new()];
            let mut end = None;
            for (i, c) in rest.char_indices() {
                match c {
                    '<' => depth += 1,
                    '>' if prev != '-' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(i);
                            break;
                        }
                    }
                    '(' | '[' => parens += 1,
                    ')' | ']' => parens = parens.saturating_sub(1),
                    ',' if depth == 1 && parens == 0 => {
                        args.push(String::new());
                        prev = c;
                        continue;
                    }
                    _ => {}
                }
                args.last_mut().expect("at least one").push(c);
                prev = c;
            }
            if args.len() > 1 && args.last().is_some_and(|a| a.trim().is_empty()) {
                args.pop(); // a trailing comma
            }
            let last = args.last().map(|a| a.trim()).unwrap_or("");
            if end.is_some() && args.len() == 2 && matches!(last, "String" | "std::string::String")
            {
                let line = text[..start].lines().count().max(1);
                found.push((line, format!("{open}{}>", args.join(","))));
            }
        }
        let from_str = concat!("type Err", " = String;");
        for (start, _) in text.match_indices(from_str) {
            found.push((text[..start].lines().count(), from_str.to_string()));
        }
        found
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn the_scan_finds_string_errors_and_nothing_else() {
        let r = "Result";
        let bad = [
            format!("fn f() -> {r}<u8, String> {{"),
            format!("fn f() -> {r}<Vec<(u8, u16)>, String> {{"),
            format!("fn f(g: impl Fn() -> u8) -> {r}<\n    (),\n    String,\n> {{"),
            format!("deliver: impl FnOnce(u8) -> {r}<(), String>,"),
        ];
        for text in &bad {
            assert_eq!(string_errors(text).len(), 1, "{text}");
        }
        let good = [
            format!("fn f() -> std::io::{r}<String> {{"),
            format!("fn f() -> {r}<String, Error> {{"),
            format!("fn f() -> {r}<HashMap<String, String>, Error> {{"),
            format!("fn f(g: impl Fn(u8, String) -> u8) -> {r}<u8, E> {{"),
        ];
        for text in &good {
            assert!(string_errors(text).is_empty(), "{text}");
        }
    }

    /// Issue 14: each layer owns its errors. A library function that fails with a
    /// bare `String` loses the cause, its class and its `source()` chain; only the
    /// outermost edge (the binary: the CLI in `main.rs` and the load generator in
    /// `cli/`) may turn errors into text.
    #[test]
    fn no_library_signature_fails_with_a_bare_string() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        assert!(files.len() > 10, "found the sources: {files:?}");
        let mut offenders = Vec::new();
        for file in files {
            let rel = file.strip_prefix(&src).expect("under src/");
            if rel == Path::new("main.rs") || rel.starts_with("cli") {
                continue;
            }
            let text = std::fs::read_to_string(&file).expect("a readable source file");
            for (line, ty) in string_errors(&text) {
                offenders.push(format!("src/{}:{line}: {ty}", rel.display()));
            }
        }
        assert!(
            offenders.is_empty(),
            "give these a thiserror type owned by their layer:\n{}",
            offenders.join("\n")
        );
    }
}
