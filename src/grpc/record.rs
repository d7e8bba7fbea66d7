//! Counting calls: every call that reached the Bridge is recorded in
//! `pitboss_requests_total` exactly once, with an outcome, however it ends.
//!
//! A handler's future is dropped when the client goes away (its cancel, or its own
//! deadline timer firing a network hop before pitboss's): code after an `.await` then
//! never runs. So the recording lives in a guard whose `Drop` records the call as
//! [`unfinished_class`] unless it was finished with its real outcome.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Role;
use crate::resilience::ErrorClass;

/// The `command` label of CreateSession calls (they run no command).
pub const CREATE_SESSION: &str = "CreateSession";

/// The least and the most a client's timer may run ahead of pitboss's deadline and
/// still be counted as the deadline (a tenth of the client's timeout, within these).
pub const DEADLINE_SLACK_MIN: Duration = Duration::from_millis(20);
pub const DEADLINE_SLACK_MAX: Duration = Duration::from_millis(250);

/// The class of a call that ended without an answer: the client went away.
///
/// The client's own timer starts before the request leaves it, pitboss's when the
/// request arrives, so a client that gives up at its deadline does so a little before
/// pitboss's: a call abandoned within the slack (a tenth of its timeout, 20 to 250 ms)
/// of its deadline is `deadline_exceeded`; any other abandoned call is `cancelled`.
/// Pure.
pub fn unfinished_class(now: Instant, arrived: Instant, deadline: Option<Instant>) -> ErrorClass {
    let Some(deadline) = deadline else {
        return ErrorClass::Cancelled;
    };
    let slack = (deadline.saturating_duration_since(arrived) / 10)
        .clamp(DEADLINE_SLACK_MIN, DEADLINE_SLACK_MAX);
    if now + slack >= deadline {
        ErrorClass::DeadlineExceeded
    } else {
        ErrorClass::Cancelled
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_call_is_a_deadline_near_its_deadline_else_a_cancel() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // No deadline: the client cancelled.
        assert_eq!(
            unfinished_class(t0 + ms(5000), t0, None),
            ErrorClass::Cancelled
        );
        // 1 s timeout: 100 ms of slack.
        let d = Some(t0 + ms(1000));
        assert_eq!(unfinished_class(t0 + ms(500), t0, d), ErrorClass::Cancelled);
        assert_eq!(unfinished_class(t0 + ms(899), t0, d), ErrorClass::Cancelled);
        assert_eq!(
            unfinished_class(t0 + ms(905), t0, d),
            ErrorClass::DeadlineExceeded
        );
        assert_eq!(
            unfinished_class(t0 + ms(1000), t0, d),
            ErrorClass::DeadlineExceeded
        );
        assert_eq!(
            unfinished_class(t0 + ms(2000), t0, d),
            ErrorClass::DeadlineExceeded
        );
        // Short timeouts get at least 20 ms, long ones at most 250 ms.
        let d = Some(t0 + ms(100));
        assert_eq!(
            unfinished_class(t0 + ms(85), t0, d),
            ErrorClass::DeadlineExceeded
        );
        assert_eq!(unfinished_class(t0 + ms(75), t0, d), ErrorClass::Cancelled);
        let d = Some(t0 + ms(60_000));
        assert_eq!(
            unfinished_class(t0 + ms(59_800), t0, d),
            ErrorClass::DeadlineExceeded
        );
        assert_eq!(
            unfinished_class(t0 + ms(59_000), t0, d),
            ErrorClass::Cancelled
        );
    }
}
