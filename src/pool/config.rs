//! Validated settings of one worker pool. The config file's `[pool]` and `[sessions]`
//! sections (converted here, by the pool: [`PoolConfig::from_sections`]) or code build
//! this; the pool never sees an unchecked value. How to spawn a worker is the
//! worker's own type, [`WorkerCommand`], which the pool holds and hands on.

use std::path::Path;
use std::time::Duration;

use super::restart::RestartPolicy;
use super::sessions::AffinityMode;
use crate::config::{Affinity, PoolSection, RestartSection, SessionsSection};
use crate::worker::frame::DEFAULT_MAX_FRAME_BYTES;
use crate::worker::WorkerCommand;

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Used in logs, e.g. the backend name.
    pub name: String,
    pub worker: WorkerCommand,
    /// Number of worker processes.
    pub size: usize,
    /// Requests in flight per worker (pipelined; async commands run concurrently).
    pub worker_concurrency: u32,
    pub max_frame_bytes: usize,
    /// How long a worker may take to send READY.
    pub startup_timeout: Duration,
    /// Deadline for requests that arrive without one.
    pub default_timeout: Duration,
    /// After a cancel, how long a worker may take to stop before it is killed.
    pub cancel_grace: Duration,
    /// Requests that may wait for a worker; more are refused at once.
    pub queue_size: usize,
    /// The longest a request waits in the queue.
    pub queue_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// A worker whose last pong is older than this is killed and replaced.
    pub heartbeat_timeout: Duration,
    pub restart: RestartPolicy,
    /// Recycle a worker after this many requests (0 = never), plus up to
    /// `max_requests_jitter` more so workers do not recycle together.
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    /// Recycle a worker after it has run this long.
    pub max_lifetime: Option<Duration>,
    /// Recycle a worker whose resident memory exceeds this.
    pub max_rss_bytes: Option<u64>,
    pub affinity: AffinityMode,
    pub session_ttl: Duration,
    pub max_sessions: usize,
    /// On shutdown or recycling, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
    /// After asking a worker to exit: wait this long, then SIGTERM, wait again, SIGKILL.
    pub term_grace: Duration,
}

impl PoolConfig {
    pub fn new(name: impl Into<String>, worker: WorkerCommand) -> PoolConfig {
        PoolConfig {
            name: name.into(),
            worker,
            size: 2,
            worker_concurrency: 8,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            startup_timeout: Duration::from_secs(30),
            default_timeout: Duration::from_secs(60),
            cancel_grace: Duration::from_secs(2),
            queue_size: 1024,
            queue_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(5),
            restart: RestartPolicy::default(),
            max_requests: 0,
            max_requests_jitter: 0,
            max_lifetime: None,
            max_rss_bytes: None,
            affinity: AffinityMode::default(),
            session_ttl: Duration::from_secs(600),
            max_sessions: 100_000,
            drain_timeout: Duration::from_secs(30),
            term_grace: Duration::from_secs(2),
        }
    }

    /// Checks the relations between settings; every field on its own is typed.
    pub fn validate(&self) -> Result<(), InvalidPoolConfig> {
        let mut errors = Vec::new();
        if self.size == 0 {
            errors.push("size must be at least 1");
        }
        if self.worker_concurrency == 0 {
            errors.push("worker_concurrency must be at least 1");
        }
        if self.max_frame_bytes < 1024 {
            errors.push("max_frame_bytes must be at least 1024");
        }
        if self.heartbeat_interval.is_zero() {
            errors.push("heartbeat_interval must be positive");
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            errors.push("heartbeat_timeout must be longer than heartbeat_interval");
        }
        if self.worker.adapter.trim().is_empty() {
            errors.push("adapter must name MODULE:OBJECT");
        }
        if self.max_sessions == 0 {
            errors.push("max_sessions must be at least 1");
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(InvalidPoolConfig { problems: errors })
        }
    }
}

// === conversions from the config file's sections ===

impl PoolConfig {
    /// The settings of the pool `name` from `[pool]` and `[sessions]`, with relative
    /// paths resolved against `base_dir` (the config file's directory).
    pub fn from_sections(
        name: &str,
        p: &PoolSection,
        sessions: &SessionsSection,
        base_dir: &Path,
    ) -> PoolConfig {
        let worker = WorkerCommand::from_section(p, base_dir);
        let mut c = PoolConfig::new(name, worker);
        c.size = p.size.0 as usize;
        c.worker_concurrency = p.worker_concurrency.0.min(u32::MAX as u64) as u32;
        c.max_frame_bytes = p.max_frame_bytes.0 as usize;
        c.startup_timeout = p.startup_timeout.0;
        c.default_timeout = p.request_timeout.0;
        c.cancel_grace = p.cancel_grace.0;
        c.queue_size = p.queue_size as usize;
        c.queue_timeout = p.queue_timeout.0;
        c.heartbeat_interval = p.heartbeat_interval.0;
        c.heartbeat_timeout = p.heartbeat_timeout.0;
        c.max_requests = p.max_requests;
        c.max_requests_jitter = p.max_requests_jitter;
        c.max_lifetime = p.max_lifetime.nonzero();
        c.max_rss_bytes = (p.max_rss_mb > 0).then_some(p.max_rss_mb.saturating_mul(1024 * 1024));
        c.drain_timeout = p.drain_timeout.0;
        c.term_grace = p.term_grace.0;
        c.restart = RestartPolicy::from(&p.restart);
        c.affinity = sessions.affinity.into();
        c.session_ttl = sessions.ttl.0;
        c.max_sessions = sessions.max.0 as usize;
        c
    }
}

impl From<&RestartSection> for RestartPolicy {
    fn from(r: &RestartSection) -> Self {
        RestartPolicy {
            backoff_base: r.backoff_base.0,
            backoff_max: r.backoff_max.0,
            jitter: r.jitter.0,
            max_restarts: r.max_restarts.0.min(u32::MAX as u64) as u32,
            window: r.window.0,
            degraded_interval: r.degraded_interval.0,
        }
    }
}

impl From<Affinity> for AffinityMode {
    fn from(a: Affinity) -> Self {
        match a {
            Affinity::Hint => AffinityMode::Hint,
            Affinity::StrictQueue => AffinityMode::StrictQueue,
            Affinity::StrictFailFast => AffinityMode::StrictFailFast,
        }
    }
}

/// The relations between a pool's settings that do not hold, each as a sentence
/// naming the setting (`size must be at least 1`), joined by `; `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", problems.join("; "))]
pub struct InvalidPoolConfig {
    pub problems: Vec<&'static str>,
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Config;

    #[test]
    fn the_pool_converts_its_sections_resolving_paths_against_the_config_s_directory() {
        let text = "[pool]\nruntime_dir = \"rt\"\npython_path = [\"\", \"@runtime/ex\", \"lib\", \"/abs\"]\n\
                    working_dir = \"wd\"\nenv = { A = \"x\", N = 3 }\nsize = 3\nmax_rss_mb = 2\n\
                    [sessions]\naffinity = \"hint\"\nmax = 7\n";
        let mut cfg = Config::from_sources("t.toml", Some(text), Vec::<(String, String)>::new())
            .expect("a valid config");
        cfg.base_dir = PathBuf::from("/etc/pb");
        let c = PoolConfig::from_sections("legacy", &cfg.pool, &cfg.sessions, &cfg.base_dir);
        assert_eq!(c.name, "legacy");
        assert_eq!(c.worker.runtime_dir, PathBuf::from("/etc/pb/rt"));
        let paths: Vec<PathBuf> = ["/etc/pb/rt", "/etc/pb/rt/ex", "/etc/pb/lib", "/abs"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(c.worker.python_path, paths);
        assert_eq!(c.worker.working_dir, Some(PathBuf::from("/etc/pb/wd")));
        assert_eq!(
            c.worker.env,
            vec![("A".to_string(), "x".to_string()), ("N".into(), "3".into())]
        );
        assert_eq!((c.size, c.max_sessions), (3, 7));
        assert_eq!(c.max_rss_bytes, Some(2 * 1024 * 1024));
        assert_eq!(c.affinity, AffinityMode::Hint);
        assert_eq!(c.restart.backoff_base, cfg.pool.restart.backoff_base.0);
        assert!(c.validate().is_ok());
    }
}
