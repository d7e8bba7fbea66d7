//! Starting one Python worker process: argv without a shell, an explicit environment,
//! its own process group, and a parent-death signal.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};

use tokio::process::{Child, Command};

use crate::config::PoolSection;

/// How to start a worker: the spawn settings, as configured (the `[pool]` section's
/// spawn keys, converted by [`WorkerCommand::from_section`], or code). The pool and
/// the worker share this one type; [`WorkerCommand::resolve`] turns it into the
/// [`WorkerSpec`] a worker is spawned from.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// Interpreter name or path; resolved to the real executable once, by
    /// [`WorkerCommand::resolve`].
    pub python: String,
    /// `MODULE:OBJECT` naming the adapter.
    pub adapter: String,
    /// The directory that holds the `pitboss_worker` package; put first on `PYTHONPATH`.
    pub runtime_dir: PathBuf,
    /// Extra `PYTHONPATH` entries, e.g. the directory of the adapter module.
    pub python_path: Vec<PathBuf>,
    pub working_dir: Option<PathBuf>,
    /// Variables set for the worker, after the defaults (so they can override them).
    pub env: Vec<(String, String)>,
    /// Names of variables inherited from pitboss's own environment. Everything else is
    /// dropped, so secrets in pitboss's environment do not leak into user code.
    pub inherit_env: Vec<String>,
}

impl WorkerCommand {
    /// The demo adapter shipped in `python/examples`, run from a source checkout.
    pub fn demo(python_dir: PathBuf) -> WorkerCommand {
        WorkerCommand {
            python: "python3".into(),
            adapter: "demo:adapter".into(),
            python_path: vec![python_dir.join("examples")],
            runtime_dir: python_dir,
            working_dir: None,
            env: Vec::new(),
            inherit_env: vec![
                "PATH".into(),
                "HOME".into(),
                "LANG".into(),
                "PYENV_VERSION".into(),
            ],
        }
    }

    /// How to start the workers, from `[pool]`'s spawn keys, with relative paths
    /// resolved against `base_dir` (the config file's directory).
    pub fn from_section(p: &PoolSection, base_dir: &Path) -> WorkerCommand {
        let resolve = |s: &str| {
            let path = PathBuf::from(s);
            if path.is_absolute() {
                path
            } else {
                base_dir.join(path)
            }
        };
        let runtime_dir = if p.runtime_dir.is_empty() {
            crate::runtime_files::runtime_dir()
        } else {
            resolve(&p.runtime_dir)
        };
        let python_path = p
            .python_path
            .iter()
            .map(|s| {
                if s.is_empty() {
                    runtime_dir.clone()
                } else if let Some(rest) = s.strip_prefix("@runtime/") {
                    runtime_dir.join(rest)
                } else {
                    resolve(s)
                }
            })
            .collect();
        let env = p
            .env
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect();
        WorkerCommand {
            python: p.python.clone(),
            adapter: p.adapter.clone(),
            runtime_dir,
            python_path,
            working_dir: (!p.working_dir.is_empty()).then(|| resolve(&p.working_dir)),
            env,
            inherit_env: p.inherit_env.clone(),
        }
    }

    /// The spec to spawn workers from: this command with its interpreter resolved
    /// ([`resolve_python`], once per pool: a pyenv shim costs 70-100 ms on every
    /// spawn) and the protocol limits the worker is started with.
    /// Also checks that the runtime directory holds `pitboss_worker`, so a wrong
    /// `runtime_dir` is one clear error here, not every worker failing to import.
    pub async fn resolve(self, max_frame_bytes: usize, concurrency: u32) -> io::Result<WorkerSpec> {
        crate::runtime_files::check(&self.runtime_dir).map_err(io::Error::other)?;
        let python = resolve_python(&self.python, self.working_dir.as_deref()).await?;
        Ok(WorkerSpec {
            command: self,
            python,
            max_frame_bytes,
            concurrency,
        })
    }
}

/// Everything needed to start a worker: its [`WorkerCommand`] with the interpreter
/// resolved, and the limits passed on its command line. Built once per pool, by
/// [`WorkerCommand::resolve`].
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// The spawn settings as configured.
    pub command: WorkerCommand,
    /// The real interpreter (`command.python` resolved by [`resolve_python`]).
    pub python: PathBuf,
    pub max_frame_bytes: usize,
    pub concurrency: u32,
}

impl WorkerSpec {
    /// The variables the worker starts with, in order; later entries win.
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        let c = &self.command;
        for name in &c.inherit_env {
            if let Ok(value) = std::env::var(name) {
                env.push((name.clone(), value));
            }
        }
        env.push(("PYTHONUNBUFFERED".into(), "1".into()));
        env.push(("OMP_NUM_THREADS".into(), "1".into()));
        env.push(("PYTHONDONTWRITEBYTECODE".into(), "1".into()));
        let mut path = vec![c.runtime_dir.display().to_string()];
        path.extend(c.python_path.iter().map(|p| p.display().to_string()));
        env.push(("PYTHONPATH".into(), path.join(":")));
        env.extend(c.env.iter().cloned());
        env
    }

    /// The argv after the interpreter. Never passed through a shell.
    pub fn args(&self) -> Vec<String> {
        vec![
            "-m".into(),
            "pitboss_worker".into(),
            "--adapter".into(),
            self.command.adapter.clone(),
            "--max-frame-bytes".into(),
            self.max_frame_bytes.to_string(),
            "--concurrency".into(),
            self.concurrency.to_string(),
        ]
    }

    /// Spawns the process with piped stdio. The caller owns the child and must reap it.
    pub fn spawn(&self) -> io::Result<Child> {
        let mut cmd = Command::new(&self.python);
        cmd.args(self.args())
            .env_clear()
            .envs(self.environment())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Backstop only: the supervisor kills the whole process group itself.
            .kill_on_drop(true)
            // Own process group: one signal reaches the worker and anything it spawned.
            .process_group(0);
        if let Some(dir) = &self.command.working_dir {
            cmd.current_dir(dir);
        }
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) run between fork
        // and exec.
        unsafe {
            cmd.pre_exec(move || {
                // No worker outlives pitboss, even after `kill -9`: the kernel sends
                // SIGKILL when the spawning thread dies. The spawning threads are tokio
                // runtime threads, which live as long as the runtime that owns the pool.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        cmd.spawn()
    }
}

/// Resolves an interpreter name or path (e.g. `python3`, a pyenv shim, or a venv's
/// `bin/python`) to the real executable, by asking it once for `sys.executable`.
///
/// Results are cached per (program, working dir), because pyenv picks the version from
/// the directory. Measured: a shim adds 70-100 ms to each spawn; this runs it once.
pub async fn resolve_python(program: &str, working_dir: Option<&Path>) -> io::Result<PathBuf> {
    type Cache = Mutex<HashMap<(String, Option<PathBuf>), PathBuf>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (program.to_string(), working_dir.map(Path::to_path_buf));
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    let mut cmd = Command::new(program);
    cmd.args(["-c", "import sys; sys.stdout.write(sys.executable)"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = working_dir {
        cmd.current_dir(dir);
    }
    let out = cmd.output().await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run python executable {program:?}: {e}"),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "python executable {program:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    // sys.executable is empty when Python cannot tell; fall back to what we were given.
    let resolved = if path.as_os_str().is_empty() {
        PathBuf::from(program)
    } else {
        path
    };
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, resolved.clone());
    Ok(resolved)
}

/// Sends `signal` to a whole process group. Errors (the group is already gone) are
/// ignored: the caller only wants it dead.
pub fn signal_group(pgid: u32, signal: libc::c_int) {
    if pgid > 1 {
        // SAFETY: plain syscall; a negative pid addresses the process group.
        unsafe {
            libc::kill(-(pgid as libc::pid_t), signal);
        }
    }
}

/// Resident set size of a process, read from `/proc/<pid>/statm`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(resident_pages * page.max(4096) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkerSpec {
        WorkerSpec {
            command: WorkerCommand {
                python: "python3".into(),
                adapter: "examples.demo:adapter".into(),
                runtime_dir: "/opt/pitboss/python".into(),
                python_path: vec!["/srv/app".into()],
                working_dir: None,
                env: vec![("OMP_NUM_THREADS".into(), "4".into())],
                inherit_env: vec!["PITBOSS_TEST_SURELY_UNSET_VAR".into()],
            },
            python: "python3".into(),
            max_frame_bytes: 1024,
            concurrency: 8,
        }
    }

    #[test]
    fn environment_has_defaults_that_config_can_override() {
        let env = spec().environment();
        let get = |k: &str| {
            env.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PYTHONUNBUFFERED"), Some("1"));
        assert_eq!(get("OMP_NUM_THREADS"), Some("4"));
        assert_eq!(get("PYTHONPATH"), Some("/opt/pitboss/python:/srv/app"));
        assert_eq!(get("PITBOSS_TEST_SURELY_UNSET_VAR"), None);
        assert_eq!(get("HOME"), None, "nothing is inherited unless allowed");
    }

    #[test]
    fn argv_names_the_adapter_and_limits() {
        assert_eq!(
            spec().args().join(" "),
            "-m pitboss_worker --adapter examples.demo:adapter --max-frame-bytes 1024 --concurrency 8"
        );
    }

    #[tokio::test]
    async fn the_command_is_argv_never_a_shell() {
        // Shell metacharacters in config values reach Python verbatim: nothing runs them.
        let marker = std::env::temp_dir().join(format!("pitboss-no-shell-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let mut s = spec();
        s.python = "python3".into();
        s.command.runtime_dir = crate::runtime_files::runtime_dir();
        s.command.inherit_env = vec!["PATH".into(), "HOME".into(), "PYENV_VERSION".into()];
        s.command.adapter = format!(
            "nope; touch {}; echo $(touch {})",
            marker.display(),
            marker.display()
        );
        let mut child = s.spawn().expect("spawn python3");
        let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
            .await
            .expect("exits")
            .unwrap();
        assert!(!status.success(), "a nonsense adapter cannot start");
        assert!(!marker.exists(), "something ran a shell");
    }

    #[tokio::test]
    async fn resolving_a_command_keeps_it_and_adds_the_interpreter_and_limits() {
        let command = WorkerCommand::demo(crate::runtime_files::runtime_dir());
        let spec = command
            .clone()
            .resolve(4096, 3)
            .await
            .expect("python3 resolves");
        assert!(spec.python.is_absolute(), "{:?}", spec.python);
        assert_eq!(format!("{:?}", spec.command), format!("{command:?}"));
        assert_eq!(
            spec.args().join(" "),
            "-m pitboss_worker --adapter demo:adapter --max-frame-bytes 4096 --concurrency 3"
        );
    }

    #[test]
    fn rss_of_this_process_is_readable() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
        assert_eq!(rss_bytes(u32::MAX), None);
    }
}
