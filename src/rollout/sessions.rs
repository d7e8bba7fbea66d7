//! Which backend holds each session. A session is pinned to one backend when it is
//! created and stays there for its whole life, whatever the rollout does later: its
//! state lives in that backend's worker.

use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use crate::backend::Role;

struct Pin {
    role: Role,
    last_used: Instant,
}

/// Session id → backend. Entries leave on close, as soon as the backend says the
/// session is gone (expired by TTL, or lost with its worker), or once idle for longer
/// than the session TTL plus a margin (a last sweep for sessions nobody named again).
/// The backend is the authority on whether a session lives: a pin is only where to
/// ask.
pub struct SessionRoutes {
    /// `Box<str>` keys: 8 bytes smaller than `String` in every slot.
    map: DashMap<Box<str>, Pin>,
    ttl: Duration,
}

impl SessionRoutes {
    pub fn new(ttl: Duration) -> SessionRoutes {
        SessionRoutes {
            map: DashMap::new(),
            ttl,
        }
    }

    pub fn pin(&self, id: &str, role: Role) {
        self.map.insert(
            id.into(),
            Pin {
                role,
                last_used: Instant::now(),
            },
        );
    }

    /// The session's backend, marking it used.
    pub fn role(&self, id: &str) -> Option<Role> {
        self.map.get_mut(id).map(|mut p| {
            p.last_used = Instant::now();
            p.role
        })
    }

    /// The session's backend, without marking it used: for a check that must not
    /// keep a stale pin alive (a refused CreateSession extends nothing).
    pub fn peek(&self, id: &str) -> Option<Role> {
        self.map.get(id).map(|p| p.role)
    }

    pub fn unpin(&self, id: &str) {
        self.map.remove(id);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Sessions pinned to each role: (legacy, new).
    pub fn counts(&self) -> (usize, usize) {
        self.map.iter().fold((0, 0), |(l, n), p| match p.role {
            Role::Legacy => (l + 1, n),
            Role::New => (l, n + 1),
        })
    }

    /// Drops the pins whose session is `gone` (the backend no longer has it: a pool
    /// backend answers that at once), and pins idle for longer than the TTL plus a
    /// margin (for an upstream, which is not asked). Returns how many.
    pub fn prune(&self, now: Instant, gone: impl Fn(&str, Role) -> bool) -> usize {
        let before = self.map.len();
        let keep_for = self.ttl + Duration::from_secs(60);
        self.map.retain(|id, p| {
            now.saturating_duration_since(p.last_used) <= keep_for && !gone(id, p.role)
        });
        before - self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pins_last_while_used_and_leave_when_idle_or_closed() {
        let r = SessionRoutes::new(Duration::from_secs(600));
        r.pin("a", Role::New);
        r.pin("b", Role::Legacy);
        assert_eq!(r.counts(), (1, 1));
        tokio::time::advance(Duration::from_secs(500)).await;
        assert_eq!(r.role("a"), Some(Role::New), "used: stays");
        tokio::time::advance(Duration::from_secs(500)).await;
        assert_eq!(
            r.prune(Instant::now(), |_, _| false),
            1,
            "b idle past ttl + margin"
        );
        assert_eq!(r.role("b"), None);
        r.unpin("a");
        assert!(r.is_empty());
    }

    /// Issue 13 item 19: a pin ends with its session. A pin whose backend says the
    /// session is gone (expired, lost) leaves at the next prune, however recently it
    /// was named; the others stay.
    #[tokio::test(start_paused = true)]
    async fn pins_of_sessions_the_backend_no_longer_has_leave_at_once() {
        let r = SessionRoutes::new(Duration::from_secs(600));
        r.pin("expired", Role::Legacy);
        r.pin("live", Role::Legacy);
        r.pin("upstream", Role::New);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            r.role("expired"),
            Some(Role::Legacy),
            "named: used just now"
        );
        let pruned = r.prune(Instant::now(), |id, role| {
            id == "expired" && role == Role::Legacy
        });
        assert_eq!(pruned, 1);
        assert_eq!(r.peek("expired"), None);
        assert_eq!(r.counts(), (1, 1));
    }
}
