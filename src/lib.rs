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
//! - [`config`]: the config file, parsed into validated types.
//! - [`worker`]: one Python process: spawning, the length-prefixed frame protocol
//!   (`docs/PROTOCOL.md`), and the connection that routes replies by request id.

pub mod config;
pub mod pool;
pub mod runtime_files;
pub mod worker;
