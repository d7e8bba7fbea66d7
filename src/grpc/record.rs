//! Counting calls: every call that reached the Bridge is recorded in
//! `pitboss_requests_total` exactly once, with an outcome, however it ends.
//!
//! A handler's future is dropped when the client goes away (its cancel, or its own
//! deadline timer firing a network hop before pitboss's): code after an `.await` then
//! never runs. So the recording lives in a guard whose `Drop` records the call as
//! [`unfinished_class`] unless it was finished with its real outcome.

use std::sync::Mutex;

use tokio::time::Instant;

use crate::backend::Role;
use crate::resilience::ErrorClass;
use crate::rollout::split::{unfinished_class, CallProgress};

/// The `command` label of CreateSession calls (they run no command).
pub const CREATE_SESSION: &str = "CreateSession";

/// The `command` label of a Bridge call answered before its request message was read
/// (the command is in that message): "other" for Execute and ExecuteStream,
/// CreateSession's own; `None` for the Bridge methods pitboss does not count.
pub fn label_before_message(path: &str) -> Option<&'static str> {
    match path {
        "/pitboss.v1.Bridge/Execute" | "/pitboss.v1.Bridge/ExecuteStream" => Some("other"),
        "/pitboss.v1.Bridge/CreateSession" => Some(CREATE_SESSION),
        _ => None,
    }
}

/// Records one call exactly once: by [`CallRecord::finish`] with its outcome, else on
/// drop as [`unfinished_class`]. Shared by reference between a handler and its
/// deadline backstop, hence the lock (never contended: one call, one task).
pub struct CallRecord {
    command: String,
    arrived: Instant,
    deadline: Option<Instant>,
    /// The backend answering now (it changes on a fallback), and whether recorded.
    state: Mutex<(Role, bool)>,
}

impl CallRecord {
    pub fn new(command: String, arrived: Instant, deadline: Option<Instant>) -> CallRecord {
        CallRecord {
            command,
            arrived,
            deadline,
            state: Mutex::new((Role::Legacy, false)),
        }
    }

    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The backend now serving the call, for the record if the client goes away.
    pub fn answering(&self, role: Role) {
        self.lock().0 = role;
    }

    pub fn role(&self) -> Role {
        self.lock().0
    }

    /// Records the outcome; later calls (and the drop) record nothing.
    pub fn finish(&self, role: Role, failure: Option<ErrorClass>) {
        let mut state = self.lock();
        if std::mem::replace(&mut state.1, true) {
            return;
        }
        state.0 = role;
        drop(state);
        crate::telemetry::record_call(role, &self.command, failure, self.arrived.elapsed());
    }

    /// What the call would be recorded as if it ended now without an answer.
    pub fn unfinished_class(&self) -> ErrorClass {
        unfinished_class(Instant::now(), self.arrived, self.deadline)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Role, bool)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let role = self.role();
        let class = self.unfinished_class();
        self.finish(role, Some(class));
    }
}

/// The split tells the record which backend answers, for a call abandoned midway.
impl CallProgress for CallRecord {
    fn answering(&self, role: Role) {
        CallRecord::answering(self, role)
    }
}
