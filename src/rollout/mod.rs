//! Progressive rollout between the `legacy` and the `new` backend.
//!
//! - [`bucket`]: the sticky, monotone split decision (pure).
//!
//! Still to come (issue 5): the flags file with hot reload, shadow comparison,
//! auto-rollback and the admin RPCs.

pub mod bucket;

pub use bucket::{bucket, in_new, Percent, BUCKETS};
