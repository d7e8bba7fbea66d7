//! Progressive rollout between the `legacy` and the `new` backend.
//!
//! - [`bucket`]: the sticky, monotone split (pure).
//! - [`flags`]: the flags file as validated types, and the pure routing decision.
//! - [`reload`]: hot reload of the flags file (directory watch, atomic swap).
//!
//! Still to come (issue 5): a second backend, shadow comparison,
//! auto-rollback and the admin RPCs.

pub mod bucket;
pub mod flags;
pub mod reload;

pub use bucket::{bucket, in_new, Percent, BUCKETS};
pub use flags::{route, sticky_key, Flags, Mode, Route};
pub use reload::LiveFlags;
