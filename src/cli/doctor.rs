//! `pitboss doctor [--config FILE]`: checks what a start needs, one line per finding,
//! each with its fix. It runs what a start would run (the interpreter, the adapter's
//! import through a real worker and its `READY`, the listeners' binds, the flags
//! file's permissions, the TLS material) without serving, so a new user learns why pitboss would not
//! start, or would start slowly or unable to roll back, before it does.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pitboss::config::{BackendKind, Config, StoreKind};
use pitboss::pool::PoolConfig;
use pitboss::worker::{self, WorkerId};

/// How a finding reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    /// pitboss works, but worse than it could (slow spawns, no rollback).
    Warn,
    /// pitboss would not start, or a role would not serve.
    Fail,
}

/// One line of the report: what was checked, what was found, and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    pub topic: String,
    pub found: String,
    pub fix: Option<String>,
}

impl Finding {
    fn ok(topic: impl Into<String>, found: impl Into<String>) -> Finding {
        Finding {
            verdict: Verdict::Ok,
            topic: topic.into(),
            found: found.into(),
            fix: None,
        }
    }

    fn bad(
        verdict: Verdict,
        topic: impl Into<String>,
        found: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            verdict,
            topic: topic.into(),
            found: found.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        write!(f, "{mark} {}: {}", self.topic, self.found)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n       fix: {fix}")?;
        }
        Ok(())
    }
}

/// The oldest Python the runtime supports.
const MIN_PYTHON: (u32, u32) = (3, 9);

/// Whether an interpreter version string ("3.11.7") is one the runtime supports; a
/// version that does not parse is not.
pub fn python_supported(version: &str) -> bool {
    let mut parts = version.trim().split('.').map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= MIN_PYTHON,
        _ => false,
    }
}

/// Whether `path` (what the configured interpreter name finds on `PATH`) is a
/// version-manager shim: a script that re-resolves the interpreter on every start.
pub fn is_shim(path: &Path, head: &[u8]) -> bool {
    let p = path.to_string_lossy();
    let script = head.starts_with(b"#!");
    p.contains("/shims/") || (script && (contains(head, b"pyenv") || contains(head, b"asdf")))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// What a flags file's permissions mean for the rollout, as a finding.
pub fn flags_finding(
    path: &Path,
    exists: bool,
    file_writable: bool,
    dir_writable: bool,
) -> Finding {
    let topic = "flags file";
    let shown = path.display();
    if !exists {
        return if dir_writable {
            Finding::ok(
                topic,
                format!("{shown} does not exist yet: pitboss starts on legacy and writes it at the first change"),
            )
        } else {
            Finding::bad(
                Verdict::Warn,
                topic,
                format!("{shown} does not exist and its directory is not writable"),
                "create it (pitboss check-flags validates it), or point rollout.flags_file at a writable directory",
            )
        };
    }
    if file_writable && dir_writable {
        Finding::ok(
            topic,
            format!("{shown} is writable: automatic rollback and admin changes are saved to it"),
        )
    } else {
        Finding::bad(
            Verdict::Warn,
            topic,
            format!(
                "{shown} is read-only{}: pitboss reads and hot-reloads it, but an automatic rollback \
                 cannot be written (it is logged and counted in pitboss_rollout_rollback_failures_total) \
                 and admin changes are refused",
                if file_writable { " (its directory is not writable, and writes rename a temporary file into it)" } else { "" }
            ),
            "mount it writable (pitboss writes it atomically), or share the rollout through \
             [rollout.store] kind = \"etcd\" (docs/ROLLOUT.md)",
        )
    }
}

/// Runs every check on `cfg` (loaded from `origin`).
pub async fn run(cfg: &Config, origin: &str) -> Vec<Finding> {
    let mut out = vec![Finding::ok("config", format!("{origin} is valid"))];
    let location = pitboss::runtime_files::location();
    out.push(match location.source {
        pitboss::runtime_files::Source::Unwritable(_) => Finding::bad(
            Verdict::Fail,
            "runtime",
            location.describe(),
            "give pitboss one writable directory ($XDG_CACHE_HOME, or the temp dir), or set \
             $PITBOSS_RUNTIME_DIR / pool.runtime_dir to a copy of `pitboss runtime`",
        ),
        _ => Finding::ok("runtime", location.describe()),
    });
    for role in ["legacy", "new"] {
        let backend = match cfg.backend(role) {
            Ok(b) => b,
            Err(e) => {
                out.push(Finding::bad(
                    Verdict::Fail,
                    role,
                    e.to_string(),
                    "fix the config",
                ));
                continue;
            }
        };
        if backend.kind == BackendKind::Pool {
            let c = &backend.effective;
            let pool = PoolConfig::from_sections(role, &c.pool, &c.sessions, &c.base_dir);
            out.extend(check_pool(role, &pool).await);
        } else if role == "new" && backend.kind == BackendKind::None {
            out.push(Finding::ok(
                "new",
                "none configured: every call goes to legacy",
            ));
        } else {
            out.push(Finding::ok(
                role,
                format!(
                    "{:?} upstream at {} (not called by doctor)",
                    backend.kind, backend.address
                ),
            ));
        }
    }
    for (key, addr) in [
        ("server.listen", cfg.server.listen),
        ("server.admin_listen", cfg.server.admin_listen),
        ("server.metrics_listen", cfg.server.metrics_listen),
    ] {
        out.push(check_port(key, addr));
    }
    out.push(check_flags(cfg));
    // TLS material, loaded as a start would: readable, unexpired, the key matching.
    match pitboss::tls::check(cfg) {
        Ok(lines) => out.extend(lines.into_iter().map(|l| Finding::ok("tls", l))),
        Err(e) => out.push(Finding::bad(
            Verdict::Fail,
            "tls",
            e.to_string(),
            "fix the files the [tls] settings name (docs/SECURITY.md); `pitboss check-config` shows the same check",
        )),
    }
    out
}

async fn check_pool(role: &str, pool: &PoolConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    let w = &pool.worker;
    let topic = format!("{role} python");
    let found_on_path = which(&w.python);
    let started = Instant::now();
    let resolved = match worker::resolve_python(&w.python, w.working_dir.as_deref()).await {
        Ok(p) => p,
        Err(e) => {
            out.push(Finding::bad(
                Verdict::Fail,
                topic,
                e.to_string(),
                "install Python 3.9+ or set pool.python to its path",
            ));
            return out;
        }
    };
    let asked_in = started.elapsed();
    let version = python_version(&resolved, w.working_dir.as_deref()).await;
    let shim = found_on_path.as_deref().filter(|p| {
        // The first 512 bytes say whether it is a script (not the whole interpreter
        // binary, which is megabytes).
        let mut head = Vec::with_capacity(512);
        if let Ok(f) = std::fs::File::open(p) {
            use std::io::Read;
            let _ = f.take(512).read_to_end(&mut head);
        }
        is_shim(p, &head)
    });
    let desc = format!(
        "{} -> {} (Python {})",
        w.python,
        resolved.display(),
        version.as_deref().unwrap_or("?")
    );
    out.push(match (&version, shim) {
        (Some(v), _) if !python_supported(v) => Finding::bad(
            Verdict::Fail,
            topic.clone(),
            desc,
            format!("the runtime needs Python {}.{}+: set pool.python to one", MIN_PYTHON.0, MIN_PYTHON.1),
        ),
        (None, _) => Finding::bad(
            Verdict::Fail,
            topic.clone(),
            desc,
            "the interpreter did not report its version: set pool.python to a working Python 3.9+",
        ),
        (Some(_), Some(shim)) => Finding::bad(
            Verdict::Warn,
            topic.clone(),
            format!(
                "{desc}; {} is a version-manager shim (asking it took {} ms): pitboss resolves it once \
                 per pool, but anything else that starts it pays that every time",
                shim.display(),
                asked_in.as_millis()
            ),
            format!("set pool.python = \"{}\" to skip the shim entirely", resolved.display()),
        ),
        (Some(_), None) => Finding::ok(topic.clone(), desc),
    });
    // The adapter: a real worker, started as the pool would, up to its READY.
    let topic = format!("{role} adapter");
    let spec = match w
        .clone()
        .resolve(pool.max_frame_bytes, pool.worker_concurrency)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            out.push(Finding::bad(
                Verdict::Fail,
                topic,
                e.to_string(),
                "fix pool.runtime_dir (or leave it empty for the embedded runtime)",
            ));
            return out;
        }
    };
    let started = Instant::now();
    let timeout = pool.startup_timeout.max(Duration::from_secs(5));
    match worker::start(&spec, WorkerId(0), timeout).await {
        Ok((conn, mut process)) => {
            let took = started.elapsed();
            let info = conn.ready_info();
            let names: Vec<&str> = info.commands.iter().map(|c| c.name.as_str()).collect();
            out.push(Finding::ok(
                topic,
                format!(
                    "{} imports and is ready in {} ms with {} command(s): {}",
                    w.adapter,
                    took.as_millis(),
                    names.len(),
                    names.join(", ")
                ),
            ));
            conn.shutdown();
            process.kill_group();
            let _ = process.child.wait().await;
        }
        Err(e) => out.push(Finding::bad(
            Verdict::Fail,
            topic,
            format!("{} does not start: {e}", w.adapter),
            format!(
                "pool.adapter is MODULE:OBJECT; the module must be importable from pool.python_path \
                 ({}) or pool.working_dir",
                w.python_path
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
    out
}

/// The interpreter's version ("3.11.7"), asked the way a worker is started.
async fn python_version(python: &Path, working_dir: Option<&Path>) -> Option<String> {
    let mut cmd = tokio::process::Command::new(python);
    cmd.args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = working_dir {
        cmd.current_dir(dir);
    }
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .ok()?
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What `PATH` finds for a bare program name (a path is returned as it is).
fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

fn check_port(key: &str, addr: std::net::SocketAddr) -> Finding {
    if addr.port() == 0 {
        return Finding::ok(key, format!("{addr}: any free port"));
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Finding::ok(key, format!("{addr} is free")),
        Err(e) => Finding::bad(
            Verdict::Fail,
            key,
            format!("cannot listen on {addr}: {e}"),
            if e.kind() == std::io::ErrorKind::AddrInUse {
                format!("another process holds it (`ss -ltnp 'sport = :{}'` shows which): stop it or change {key}", addr.port())
            } else {
                format!("change {key} to an address this host has")
            },
        ),
    }
}

fn check_flags(cfg: &Config) -> Finding {
    if cfg.rollout.store.kind == StoreKind::Etcd {
        let endpoints = cfg.rollout.store.endpoints.join(", ");
        let reachable = cfg.rollout.store.endpoints.iter().any(|e| {
            let hostport = e
                .trim_start_matches("http://")
                .trim_start_matches("https://");
            std::net::ToSocketAddrs::to_socket_addrs(hostport)
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| {
                    std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
                })
        });
        return if reachable {
            Finding::ok("flags store", format!("etcd at {endpoints} answers"))
        } else {
            Finding::bad(
                Verdict::Warn,
                "flags store",
                format!("no etcd endpoint answers ({endpoints}): pitboss would start with its cached flags, or everything on legacy"),
                "start etcd, or fix rollout.store.endpoints",
            )
        };
    }
    let Some(path) = cfg.flags_path() else {
        return Finding::bad(
            Verdict::Warn,
            "flags file",
            "none (rollout.flags_file is empty): the rollout lives in memory; admin changes and rollbacks are lost at a restart",
            "set rollout.flags_file to a writable file to keep them",
        );
    };
    let exists = path.exists();
    let writable = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
            .unwrap_or(false)
    };
    // "flags.toml" (a config given by a relative path) lives in ".".
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    flags_finding(&path, exists, exists && writable(&path), writable(&dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_versions_from_3_9_are_supported() {
        assert!(python_supported("3.9.0"));
        assert!(python_supported("3.13.1\n"));
        assert!(python_supported("4.0"));
        assert!(!python_supported("3.8.18"));
        assert!(!python_supported("2.7.18"));
        assert!(!python_supported("garbage"));
    }

    #[test]
    fn shims_are_recognised() {
        assert!(is_shim(Path::new("/root/.pyenv/shims/python3"), b""));
        assert!(is_shim(
            Path::new("/usr/local/bin/python3"),
            b"#!/usr/bin/env bash\nset -e\nexec \"/root/.pyenv/libexec/pyenv\" exec"
        ));
        assert!(!is_shim(Path::new("/usr/bin/python3"), b"\x7fELF\x02\x01"));
    }

    #[test]
    fn flags_permissions_say_what_they_mean_for_rollback() {
        let p = Path::new("/etc/pitboss/flags.toml");
        assert_eq!(flags_finding(p, true, true, true).verdict, Verdict::Ok);
        let ro = flags_finding(p, true, false, false);
        assert_eq!(ro.verdict, Verdict::Warn);
        assert!(
            ro.found.contains("automatic rollback cannot be written"),
            "{ro}"
        );
        let no_rename = flags_finding(p, true, true, false);
        assert_eq!(no_rename.verdict, Verdict::Warn);
        assert!(
            no_rename.found.contains("directory is not writable"),
            "{no_rename}"
        );
        assert_eq!(flags_finding(p, false, false, true).verdict, Verdict::Ok);
        assert_eq!(flags_finding(p, false, false, false).verdict, Verdict::Warn);
    }

    #[test]
    fn a_finding_prints_on_one_line_with_its_fix_below() {
        let f = Finding::bad(Verdict::Fail, "server.listen", "in use", "stop it");
        assert_eq!(
            f.to_string(),
            "FAIL server.listen: in use\n       fix: stop it"
        );
        assert_eq!(Finding::ok("runtime", "x").to_string(), "ok   runtime: x");
    }
}
