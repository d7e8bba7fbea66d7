//! # pitboss
//!
//! A supervised, observable sidecar that runs Python code for services that are not
//! written in Python.
//!
//! # Layout
//!
//! A call travels down these layers; each knows only the ones below it.
//!
//! - [`pool`]: a supervised pool of Python workers (supervision, selection, queueing,
//!   session affinity, recycling, graceful shutdown).
//! - [`server`]: runs the listeners and the pool; shuts them down in order.
//! - [`grpc`]: the edge: `pitboss.v1.Bridge` and `Admin`, and the one mapping from
//!   errors to gRPC statuses.
//! - [`rollout`]: the split between the legacy and the new backend: flags, sticky
//!   bucketing, shadow comparison, rolling statistics and auto-rollback.
//! - [`backend`]: what serves a role (`legacy` or `new`): a pool or a grpc upstream,
//!   each behind its own resilience stack.
//! - [`resilience`]: the single error classification (and, next, retry and breakers).
//! - [`telemetry`]: Prometheus metrics, readiness, and the HTTP listener for them.
//! - [`config`]: the config file, parsed into validated types.
//! - [`worker`]: one Python process: spawning, the length-prefixed frame protocol
//!   (`docs/PROTOCOL.md`), and the connection that routes replies by request id.
//!
//! The benchmark harness behind `pitboss bench` (load generator, baselines) is part of
//! the binary, not of this library: `src/cli/bench.rs`.

pub mod backend;
pub mod config;
pub mod grpc;
pub mod pool;
pub mod resilience;
pub mod rollout;
pub mod runtime_files;
pub mod server;
pub mod telemetry;
pub mod worker;
