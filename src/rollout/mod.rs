//! Progressive rollout between the `legacy` and the `new` backend.
//!
//! - [`bucket`](mod@bucket): the sticky, monotone split (pure).
//! - [`flags`]: the flags file as validated types, and the pure routing decision.
//! - [`reload`]: hot reload of the flags file (directory watch, atomic swap).
//!
//! - [`shadow`]: comparing legacy's and new's answers (pure).
//! - [`stats`]: per-backend rolling statistics and the rollback decision (pure).
//! - [`controller`]: the live rollout: routing, recording, auto-rollback, changes.
//! - [`sessions`]: which backend holds each session.
//! - [`promotion`]: automatic step promotion: steps, gates, and the walk (pure).
//! - [`store`]: where the flags live ([`store::FlagStore`]: a file, or etcd shared by
//!   the tier), with the audit log and the tier's coordination.
//! - [`tier`]: the statistics each instance publishes, and their sum (pure).
//! - [`split`]: the owner of both backends: runs every call where the rollout says,
//!   with fallback, shadow and the recording of outcomes.

pub mod bucket;
pub mod controller;
pub mod flags;
pub mod promotion;
pub mod reload;
pub mod sessions;
pub mod shadow;
pub mod split;
pub mod stats;
pub mod steps;
pub mod store;
pub mod tier;

pub use bucket::{bucket, in_new, InvalidPercent, Percent, BUCKETS};
pub use flags::{route, sticky_key, Flags, Mode, Route};
pub use reload::{LiveFlags, UpdateError};
