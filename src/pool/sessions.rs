//! Sessions: which worker holds each session's state.
//!
//! A session is pinned to one worker when it is created. If that worker exits, the
//! session's state is gone with it, and the session is marked *lost* rather than being
//! silently moved: the client must know to rebuild its state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::time::Instant;

use super::error::PoolError;
use crate::worker::WorkerId;

/// How strictly a session's requests stick to its worker (as in Snakepit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AffinityMode {
    /// Prefer the session's worker; if it is busy, use another one (which sees a fresh
    /// session state there).
    Hint,
    /// Wait in the queue for the session's worker.
    #[default]
    StrictQueue,
    /// Fail with `pool_exhausted` if the session's worker is busy.
    StrictFailFast,
}

impl std::str::FromStr for AffinityMode {
    type Err = UnknownAffinityMode;
    fn from_str(s: &str) -> Result<Self, UnknownAffinityMode> {
        match s {
            "hint" => Ok(AffinityMode::Hint),
            "strict_queue" => Ok(AffinityMode::StrictQueue),
            "strict_fail_fast" => Ok(AffinityMode::StrictFailFast),
            other => Err(UnknownAffinityMode(other.to_string())),
        }
    }
}

/// A name that is not one of the [`AffinityMode`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown affinity mode {0:?}; expected hint, strict_queue or strict_fail_fast")]
pub struct UnknownAffinityMode(pub String);

#[derive(Debug, Clone)]
struct Entry {
    worker: WorkerId,
    created: SystemTime,
    last_used: Instant,
    /// Set when the worker exited: the state is gone.
    lost: bool,
    metadata: Arc<BTreeMap<String, String>>,
}

/// What callers learn about a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: String,
    pub worker: WorkerId,
    pub created: SystemTime,
    /// When it expires if left idle.
    pub expires: SystemTime,
    /// The caller's labels, given at creation.
    pub metadata: Arc<BTreeMap<String, String>>,
}

/// The session table. Lookups are lock-free across shards (`DashMap`). Keys are
/// `Box<str>` (8 bytes smaller than a `String` in every slot of the table, which
/// holds up to twice as many slots as sessions).
pub struct SessionTable {
    map: DashMap<Box<str>, Entry>,
    ttl: Duration,
    max: usize,
}

/// The labels of a session, shared: most sessions have none, and they all hold the
/// one empty map (an `Arc` of an empty map is 40 bytes of heap per session otherwise).
fn shared_metadata(metadata: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
    static EMPTY: std::sync::OnceLock<Arc<BTreeMap<String, String>>> = std::sync::OnceLock::new();
    if metadata.is_empty() {
        EMPTY.get_or_init(|| Arc::new(BTreeMap::new())).clone()
    } else {
        Arc::new(metadata)
    }
}

/// Longest accepted session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 128;

impl SessionTable {
    pub fn new(ttl: Duration, max: usize) -> SessionTable {
        SessionTable {
            map: DashMap::new(),
            ttl,
            max,
        }
    }

    /// A fresh random 128-bit id, hex-encoded: unique across pitboss instances.
    pub fn new_id() -> String {
        format!("{:032x}", rand::random::<u128>())
    }

    pub fn validate_id(id: &str) -> Result<(), PoolError> {
        if id.is_empty() || id.len() > MAX_SESSION_ID_LEN {
            return Err(PoolError::InvalidRequest(format!(
                "session id must be 1 to {MAX_SESSION_ID_LEN} bytes"
            )));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(PoolError::InvalidRequest(
                "session id may contain only ASCII letters, digits and - _ . :".into(),
            ));
        }
        Ok(())
    }

    /// Checks the limits before a worker is chosen. A lost session's tombstone (kept
    /// so that calls naming it hear session_lost) does not hold its id: a client that
    /// recreates it gets a fresh session at once, not "already exists" until the TTL.
    pub fn check_room(&self, id: &str) -> Result<(), PoolError> {
        let tombstone = match self.map.get(id) {
            Some(e) if !e.lost => return Err(PoolError::SessionExists(id.to_string())),
            Some(_) => 1,
            None => 0,
        };
        if self.map.len() - tombstone >= self.max {
            return Err(PoolError::TooManySessions { max: self.max });
        }
        Ok(())
    }

    pub fn insert(
        &self,
        id: String,
        worker: WorkerId,
        metadata: BTreeMap<String, String>,
    ) -> Result<SessionInfo, PoolError> {
        let now = Instant::now();
        let entry = Entry {
            worker,
            created: SystemTime::now(),
            last_used: now,
            lost: false,
            metadata: shared_metadata(metadata),
        };
        match self.map.entry(id.as_str().into()) {
            // A lost session's worker is dead, and its slot with it: nothing to end.
            dashmap::Entry::Occupied(mut o) if o.get().lost => {
                let info = self.info(&id, &entry, now);
                o.insert(entry);
                Ok(info)
            }
            dashmap::Entry::Occupied(_) => Err(PoolError::SessionExists(id)),
            dashmap::Entry::Vacant(v) => {
                let info = self.info(&id, &entry, now);
                v.insert(entry);
                Ok(info)
            }
        }
    }

    fn info(&self, id: &str, e: &Entry, now: Instant) -> SessionInfo {
        let idle = now.saturating_duration_since(e.last_used);
        SessionInfo {
            session_id: id.to_string(),
            worker: e.worker,
            created: e.created,
            expires: SystemTime::now() + self.ttl.saturating_sub(idle),
            metadata: e.metadata.clone(),
        }
    }

    /// The session's worker, for routing a request; refreshes its idle timer.
    /// The live entry of `id`: not found, or lost with its worker, are errors.
    fn live(
        &self,
        id: &str,
    ) -> Result<dashmap::mapref::one::RefMut<'_, Box<str>, Entry>, PoolError> {
        let entry = self
            .map
            .get_mut(id)
            .ok_or_else(|| PoolError::SessionNotFound {
                session_id: id.to_string(),
            })?;
        if entry.lost {
            return Err(PoolError::SessionLost {
                session_id: id.to_string(),
                worker: entry.worker,
            });
        }
        Ok(entry)
    }

    pub fn route(&self, id: &str) -> Result<WorkerId, PoolError> {
        let mut entry = self.live(id)?;
        entry.last_used = Instant::now();
        Ok(entry.worker)
    }

    pub fn get(&self, id: &str) -> Result<SessionInfo, PoolError> {
        let entry = self.live(id)?;
        Ok(self.info(id, &entry, Instant::now()))
    }

    /// Removes a session. Returns its worker and whether the state was still alive.
    pub fn remove(&self, id: &str) -> Result<(WorkerId, bool), PoolError> {
        self.map
            .remove(id)
            .map(|(_, e)| (e.worker, !e.lost))
            .ok_or_else(|| PoolError::SessionNotFound {
                session_id: id.to_string(),
            })
    }

    /// Marks every session of `worker` lost. Returns how many.
    pub fn mark_lost(&self, worker: WorkerId) -> usize {
        let mut n = 0;
        for mut e in self.map.iter_mut() {
            if e.worker == worker && !e.lost {
                e.lost = true;
                n += 1;
            }
        }
        n
    }

    /// Removes sessions idle for longer than the TTL at `now`; returns them with their
    /// worker and whether their state was still alive.
    pub fn expire(&self, now: Instant) -> Vec<(String, WorkerId, bool)> {
        let mut expired = Vec::new();
        self.map.retain(|id, e| {
            let keep = now.saturating_duration_since(e.last_used) < self.ttl;
            if !keep {
                expired.push((id.to_string(), e.worker, !e.lost));
            }
            keep
        });
        expired
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_without_labels_share_one_empty_map_and_labels_are_kept() {
        let t = SessionTable::new(Duration::from_secs(10), 100);
        let a = t.insert("a".into(), WorkerId(1), BTreeMap::new()).unwrap();
        let b = t.insert("b".into(), WorkerId(1), BTreeMap::new()).unwrap();
        assert!(Arc::ptr_eq(&a.metadata, &b.metadata));
        let labels = BTreeMap::from([("team".to_string(), "ml".to_string())]);
        t.insert("c".into(), WorkerId(2), labels.clone()).unwrap();
        assert_eq!(*t.get("c").unwrap().metadata, labels);
        assert!(t.get("a").unwrap().metadata.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_expire_and_use_refreshes_them() {
        let t = SessionTable::new(Duration::from_secs(10), 100);
        t.insert("a".into(), WorkerId(1), BTreeMap::new()).unwrap();
        t.insert("b".into(), WorkerId(2), BTreeMap::new()).unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(t.route("a").unwrap(), WorkerId(1));
        tokio::time::advance(Duration::from_secs(6)).await;
        let expired = t.expire(Instant::now());
        assert_eq!(expired, vec![("b".to_string(), WorkerId(2), true)]);
        assert!(t.route("a").is_ok());
        assert!(matches!(
            t.route("b"),
            Err(PoolError::SessionNotFound { .. })
        ));
    }

    #[test]
    fn a_dead_workers_sessions_are_lost_not_moved() {
        let t = SessionTable::new(Duration::from_secs(10), 100);
        t.insert("a".into(), WorkerId(1), BTreeMap::new()).unwrap();
        t.insert("b".into(), WorkerId(2), BTreeMap::new()).unwrap();
        assert_eq!(t.mark_lost(WorkerId(1)), 1);
        assert!(matches!(t.route("a"), Err(PoolError::SessionLost { .. })));
        assert!(matches!(t.get("a"), Err(PoolError::SessionLost { .. })));
        assert_eq!(t.route("b").unwrap(), WorkerId(2));
        assert_eq!(t.remove("a").unwrap(), (WorkerId(1), false));
    }

    /// Issue 13 item 19: a lost session's tombstone answers session_lost to calls that
    /// name it, but does not hold its id: creating it again replaces the tombstone at
    /// once, and the tombstone does not count against the limit.
    #[test]
    fn a_lost_sessions_id_can_be_created_again() {
        let t = SessionTable::new(Duration::from_secs(10), 1);
        t.insert("a".into(), WorkerId(1), BTreeMap::new()).unwrap();
        t.mark_lost(WorkerId(1));
        t.check_room("a").unwrap();
        t.insert("a".into(), WorkerId(2), BTreeMap::new()).unwrap();
        assert_eq!(t.route("a").unwrap(), WorkerId(2));
        assert_eq!(t.len(), 1);
        assert!(matches!(
            t.check_room("a"),
            Err(PoolError::SessionExists(_))
        ));
        assert!(matches!(
            t.insert("a".into(), WorkerId(3), BTreeMap::new()),
            Err(PoolError::SessionExists(_))
        ));
    }

    #[test]
    fn limits_and_duplicates_are_refused() {
        let t = SessionTable::new(Duration::from_secs(10), 1);
        t.insert("a".into(), WorkerId(1), BTreeMap::new()).unwrap();
        assert!(matches!(
            t.check_room("a"),
            Err(PoolError::SessionExists(_))
        ));
        assert!(matches!(
            t.check_room("z"),
            Err(PoolError::TooManySessions { max: 1 })
        ));
        assert!(SessionTable::validate_id("ok-id_1.2:3").is_ok());
        assert!(SessionTable::validate_id("").is_err());
        assert!(SessionTable::validate_id("has space").is_err());
        assert!(SessionTable::validate_id(&"x".repeat(129)).is_err());
        let id = SessionTable::new_id();
        assert_eq!(id.len(), 32);
        assert_ne!(id, SessionTable::new_id());
    }
}
