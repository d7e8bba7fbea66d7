//! A worker's identity: its own file, so the connection and the errors that name a
//! worker both depend on it, not on each other.

use std::fmt;

/// A worker's identity, unique for the life of the pool: a restarted worker gets a new
/// id, so a session pinned to the old one can tell that its state is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}
