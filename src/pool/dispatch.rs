//! Hands out request slots on workers, and queues requests when every worker is full.
//!
//! One mutex guards the slots and the wait queue together; it is held for a few
//! hundred nanoseconds per acquire or release. The invariant that makes the queue
//! correct: **a free slot is never wanted by a queued request**. A released slot is
//! handed straight to the first matching waiter, so a new request that finds a free
//! slot may take it without jumping the queue, and no waiter sleeps while a slot it
//! could use stands idle.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::error::{ExhaustedReason, PoolError};
use super::select::{pick, Candidate, Target};
use crate::worker::{Connection, WorkerId};

struct Slot {
    conn: Connection,
    id: WorkerId,
    in_flight: u32,
    max_in_flight: u32,
    accepting: bool,
    served: u64,
    /// Recycle after this many requests (0 = never).
    recycle_after: u64,
    sessions: usize,
    /// Out of general rotation until then (outlier ejection).
    ejected_until: Option<Instant>,
    /// The resilience layer asked for this worker to be replaced.
    replace_requested: bool,
    /// Signalled when a draining worker has nothing in flight.
    idle: Arc<Notify>,
    /// Signalled when the worker has served `recycle_after` requests.
    recycle: Arc<Notify>,
}

impl Slot {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }

    fn candidate(&self, now: Instant) -> Candidate {
        Candidate {
            id: self.id,
            accepting: self.accepting,
            in_flight: self.in_flight,
            max_in_flight: self.max_in_flight,
            served: self.served,
            ejected: self.ejected(now),
        }
    }
}

struct Waiter {
    ticket: u64,
    target: Target,
    tx: oneshot::Sender<Result<Lease, PoolError>>,
}

struct State {
    slots: Vec<Slot>,
    waiters: VecDeque<Waiter>,
    next_ticket: u64,
    closed: bool,
}

/// The pool's slot allocator and wait queue.
pub struct Dispatcher {
    state: Mutex<State>,
    queue_capacity: usize,
}

/// Signals a supervisor listens to for its worker.
#[derive(Clone)]
pub struct SlotSignals {
    pub idle: Arc<Notify>,
    pub recycle: Arc<Notify>,
}

/// A reserved request slot on one worker. Dropping it frees the slot, which the
/// dispatcher hands to the next queued request. The pool moves it into the worker
/// connection, so the slot stays taken until the worker has answered.
pub struct Lease {
    dispatcher: Arc<Dispatcher>,
    conn: Connection,
    armed: bool,
}

impl Lease {
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            self.dispatcher.release(self.conn.id());
        }
    }
}

/// Point-in-time numbers for status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotSnapshot {
    pub id: WorkerId,
    pub accepting: bool,
    pub ejected: bool,
    pub in_flight: u32,
    pub served: u64,
    pub sessions: usize,
}

impl Dispatcher {
    pub fn new(queue_capacity: usize) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            state: Mutex::new(State {
                slots: Vec::new(),
                waiters: VecDeque::new(),
                next_ticket: 0,
                closed: false,
            }),
            queue_capacity,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a ready worker and gives its capacity to queued requests.
    pub fn add(
        self: &Arc<Self>,
        conn: Connection,
        max_in_flight: u32,
        recycle_after: u64,
    ) -> SlotSignals {
        let signals = SlotSignals {
            idle: Arc::new(Notify::new()),
            recycle: Arc::new(Notify::new()),
        };
        let mut st = self.lock();
        st.slots.push(Slot {
            id: conn.id(),
            conn,
            in_flight: 0,
            max_in_flight: max_in_flight.max(1),
            accepting: true,
            served: 0,
            recycle_after,
            sessions: 0,
            ejected_until: None,
            replace_requested: false,
            idle: signals.idle.clone(),
            recycle: signals.recycle.clone(),
        });
        let idx = st.slots.len() - 1;
        while st.slots[idx].in_flight < st.slots[idx].max_in_flight {
            if !self.hand_over(&mut st, idx) {
                break;
            }
        }
        signals
    }

    /// Takes a slot if one is free; otherwise queues until one is, `queue_deadline`
    /// passes, or (with `fail_fast`) fails at once.
    pub async fn acquire(
        self: &Arc<Self>,
        target: Target,
        queue_deadline: Instant,
        fail_fast: bool,
    ) -> Result<Lease, PoolError> {
        let (ticket, rx) = {
            let mut st = self.lock();
            if st.closed {
                return Err(PoolError::ShuttingDown);
            }
            let now = Instant::now();
            let candidates: Vec<Candidate> = st.slots.iter().map(|s| s.candidate(now)).collect();
            if let Some(idx) = pick(&candidates, target) {
                return Ok(self.take(&mut st, idx));
            }
            if let Target::Exactly(w) = target {
                if !st.slots.iter().any(|s| s.id == w && s.accepting) {
                    return Err(PoolError::WorkerGone { worker: w });
                }
            }
            if fail_fast {
                return Err(PoolError::PoolExhausted {
                    reason: ExhaustedReason::WorkerBusy,
                });
            }
            if st.waiters.len() >= self.queue_capacity {
                return Err(PoolError::PoolExhausted {
                    reason: ExhaustedReason::QueueFull,
                });
            }
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(Waiter { ticket, target, tx });
            (ticket, rx)
        };
        let _leave = LeaveQueue {
            dispatcher: self,
            ticket,
        };
        match tokio::time::timeout_at(queue_deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PoolError::ShuttingDown),
            Err(_) => Err(PoolError::PoolExhausted {
                reason: ExhaustedReason::QueueTimeout,
            }),
        }
    }

    /// Marks a slot taken and returns its lease. Called under the lock.
    fn take(self: &Arc<Self>, st: &mut State, idx: usize) -> Lease {
        let slot = &mut st.slots[idx];
        slot.in_flight += 1;
        self.count_served(slot);
        Lease {
            dispatcher: self.clone(),
            conn: slot.conn.clone(),
            armed: true,
        }
    }

    fn count_served(&self, slot: &mut Slot) {
        slot.served += 1;
        if slot.recycle_after > 0 && slot.served >= slot.recycle_after && slot.accepting {
            // Stop routing here now; the supervisor drains and replaces the worker.
            slot.accepting = false;
            slot.recycle.notify_one();
        }
    }

    /// Gives one slot of worker `idx` (already counted in `in_flight`, or about to be)
    /// to the first waiter that can use it. Returns false if no waiter took it.
    fn hand_over(self: &Arc<Self>, st: &mut State, idx: usize) -> bool {
        if !st.slots[idx].accepting {
            return false;
        }
        let id = st.slots[idx].id;
        let ejected = st.slots[idx].ejected(Instant::now());
        // An ejected worker's free slots go only to requests that must have it.
        let wants = |t: &Target| {
            if ejected {
                *t == Target::Exactly(id)
            } else {
                t.accepts(id)
            }
        };
        while let Some(pos) = st.waiters.iter().position(|w| wants(&w.target)) {
            let Some(waiter) = st.waiters.remove(pos) else {
                break;
            };
            let lease = self.take(st, idx);
            match waiter.tx.send(Ok(lease)) {
                Ok(()) => return true,
                Err(Ok(mut lease)) => {
                    // The waiter gave up; undo and try the next one.
                    lease.armed = false;
                    let slot = &mut st.slots[idx];
                    slot.in_flight -= 1;
                    slot.served -= 1;
                }
                Err(Err(_)) => {}
            }
        }
        false
    }

    fn release(self: &Arc<Self>, worker: WorkerId) {
        let mut st = self.lock();
        let Some(idx) = st.slots.iter().position(|s| s.id == worker) else {
            return; // the worker was removed; its slots went with it
        };
        st.slots[idx].in_flight -= 1;
        if self.hand_over(&mut st, idx) {
            return;
        }
        let slot = &st.slots[idx];
        if !slot.accepting && slot.in_flight == 0 {
            slot.idle.notify_one();
        }
    }

    /// Stops routing new requests to `worker`. Requests queued for it alone (session
    /// affinity) fail: it is about to go away. Returns whether it is already idle.
    pub fn drain(&self, worker: WorkerId) -> bool {
        let mut st = self.lock();
        let Some(slot) = st.slots.iter_mut().find(|s| s.id == worker) else {
            return true;
        };
        slot.accepting = false;
        let idle = slot.in_flight == 0;
        fail_waiters_for(&mut st, worker);
        idle
    }

    /// Takes `worker` out of general rotation until `until`, unless that would leave
    /// more than `max_share` of the workers ejected. Returns whether it was ejected.
    pub fn eject(&self, worker: WorkerId, until: Instant, max_share: f64) -> bool {
        let mut st = self.lock();
        let now = Instant::now();
        let total = st.slots.len();
        let already = st.slots.iter().filter(|s| s.ejected(now)).count();
        let cap = ((total as f64) * max_share).floor() as usize;
        let Some(slot) = st.slots.iter_mut().find(|s| s.id == worker) else {
            return false;
        };
        if slot.ejected(now) {
            slot.ejected_until = Some(until);
            return true;
        }
        if already + 1 > cap {
            return false;
        }
        slot.ejected_until = Some(until);
        true
    }

    /// Asks the supervisor to drain and replace `worker`.
    pub fn request_replace(&self, worker: WorkerId) {
        let mut st = self.lock();
        if let Some(slot) = st.slots.iter_mut().find(|s| s.id == worker) {
            if slot.accepting {
                slot.accepting = false;
                slot.replace_requested = true;
                slot.recycle.notify_one();
            }
        }
    }

    /// Whether the last recycle signal of `worker` was a replacement request.
    pub fn replace_requested(&self, worker: WorkerId) -> bool {
        self.lock()
            .slots
            .iter()
            .any(|s| s.id == worker && s.replace_requested)
    }

    /// Forgets a worker that has exited.
    pub fn remove(&self, worker: WorkerId) {
        let mut st = self.lock();
        st.slots.retain(|s| s.id != worker);
        fail_waiters_for(&mut st, worker);
    }

    /// Refuses new requests and fails every queued one.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        for w in st.waiters.drain(..) {
            let _ = w.tx.send(Err(PoolError::ShuttingDown));
        }
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn connection(&self, worker: WorkerId) -> Option<Connection> {
        self.lock()
            .slots
            .iter()
            .find(|s| s.id == worker)
            .map(|s| s.conn.clone())
    }

    /// Picks the accepting worker with the fewest sessions for a new session.
    pub fn place_session(&self) -> Option<WorkerId> {
        let mut st = self.lock();
        let slot = st
            .slots
            .iter_mut()
            .filter(|s| s.accepting)
            .min_by_key(|s| (s.sessions, s.in_flight, s.served))?;
        slot.sessions += 1;
        Some(slot.id)
    }

    pub fn session_ended(&self, worker: WorkerId) {
        let mut st = self.lock();
        if let Some(s) = st.slots.iter_mut().find(|s| s.id == worker) {
            s.sessions = s.sessions.saturating_sub(1);
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.lock().waiters.len()
    }

    pub fn snapshot(&self) -> Vec<SlotSnapshot> {
        self.lock()
            .slots
            .iter()
            .map(|s| SlotSnapshot {
                id: s.id,
                accepting: s.accepting,
                ejected: s.ejected(Instant::now()),
                in_flight: s.in_flight,
                served: s.served,
                sessions: s.sessions,
            })
            .collect()
    }

    pub fn accepting_workers(&self) -> usize {
        self.lock().slots.iter().filter(|s| s.accepting).count()
    }
}

fn fail_waiters_for(st: &mut State, worker: WorkerId) {
    let mut kept = VecDeque::with_capacity(st.waiters.len());
    for w in st.waiters.drain(..) {
        if w.target == Target::Exactly(worker) {
            let _ = w.tx.send(Err(PoolError::WorkerGone { worker }));
        } else {
            kept.push_back(w);
        }
    }
    st.waiters = kept;
}

/// Removes a waiter that stopped waiting (timeout or its caller went away), so it does
/// not hold a place in the bounded queue.
struct LeaveQueue<'a> {
    dispatcher: &'a Arc<Dispatcher>,
    ticket: u64,
}

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        let mut st = self.dispatcher.lock();
        if let Some(pos) = st.waiters.iter().position(|w| w.ticket == self.ticket) {
            st.waiters.remove(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{FrameCodec, ReadyInfo};
    use std::time::Duration;
    use tokio::io::DuplexStream;
    use tokio_util::codec::FramedRead;

    /// A connection to nobody: enough for slot accounting.
    fn conn(id: u64) -> (Connection, DuplexStream, DuplexStream) {
        let (a, b) = tokio::io::duplex(1024);
        let (c, d) = tokio::io::duplex(1024);
        let ready = ReadyInfo {
            protocol: 1,
            pid: 0,
            adapter: String::new(),
            commands: vec![],
            python: String::new(),
            runtime: String::new(),
            revision: 0,
        };
        let conn = Connection::start(
            WorkerId(id),
            ready,
            FramedRead::new(a, FrameCodec::default()),
            c,
        );
        (conn, b, d)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_slot_goes_to_the_oldest_waiter() {
        let d = Dispatcher::new(8);
        let (c1, _x, _y) = conn(1);
        d.add(c1, 1, 0);
        let held = d.acquire(Target::any(), soon(), false).await.unwrap();
        let d2 = d.clone();
        let first =
            tokio::spawn(async move { d2.acquire(Target::any(), soon(), false).await.map(|_| 1) });
        tokio::task::yield_now().await;
        let d3 = d.clone();
        let second =
            tokio::spawn(async move { d3.acquire(Target::any(), soon(), false).await.map(|_| 2) });
        tokio::task::yield_now().await;
        assert_eq!(d.queue_depth(), 2);
        drop(held);
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(second.await.unwrap().unwrap(), 2);
        assert_eq!(d.snapshot()[0].in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_and_times_out() {
        let d = Dispatcher::new(1);
        let (c1, _x, _y) = conn(1);
        d.add(c1, 1, 0);
        let _held = d.acquire(Target::any(), soon(), false).await.unwrap();
        let d2 = d.clone();
        let waiting = tokio::spawn(async move {
            d2.acquire(
                Target::any(),
                Instant::now() + Duration::from_secs(1),
                false,
            )
            .await
            .err()
        });
        tokio::task::yield_now().await;
        let full = d.acquire(Target::any(), soon(), false).await.err();
        assert!(matches!(
            full,
            Some(PoolError::PoolExhausted {
                reason: ExhaustedReason::QueueFull
            })
        ));
        let timed_out = waiting.await.unwrap();
        assert!(matches!(
            timed_out,
            Some(PoolError::PoolExhausted {
                reason: ExhaustedReason::QueueTimeout
            })
        ));
        assert_eq!(d.queue_depth(), 0, "a waiter that gave up leaves the queue");
    }

    #[tokio::test(start_paused = true)]
    async fn exact_waiters_get_only_their_worker_and_fail_when_it_goes() {
        let d = Dispatcher::new(8);
        let (c1, _a, _b) = conn(1);
        let (c2, _c, _d) = conn(2);
        d.add(c1, 1, 0);
        d.add(c2, 1, 0);
        let on1 = d
            .acquire(Target::Exactly(WorkerId(1)), soon(), false)
            .await
            .unwrap();
        let busy = d
            .acquire(Target::Exactly(WorkerId(1)), soon(), true)
            .await
            .err();
        assert!(matches!(
            busy,
            Some(PoolError::PoolExhausted {
                reason: ExhaustedReason::WorkerBusy
            })
        ));
        let d2 = d.clone();
        let exact = tokio::spawn(async move {
            d2.acquire(Target::Exactly(WorkerId(1)), soon(), false)
                .await
                .err()
        });
        tokio::task::yield_now().await;
        // A free slot on worker 2 does not satisfy a waiter for worker 1.
        let other = d.acquire(Target::any(), soon(), false).await.unwrap();
        assert_eq!(other.connection().id(), WorkerId(2));
        d.remove(WorkerId(1));
        assert!(matches!(
            exact.await.unwrap(),
            Some(PoolError::WorkerGone {
                worker: WorkerId(1)
            })
        ));
        drop(on1); // releasing on a removed worker is harmless
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_worker_serves_the_queue_and_recycling_stops_routing() {
        let d = Dispatcher::new(8);
        let d2 = d.clone();
        let waiting = tokio::spawn(async move {
            d2.acquire(Target::any(), soon(), false)
                .await
                .map(|l| l.connection().id())
        });
        tokio::task::yield_now().await;
        let (c1, _a, _b) = conn(1);
        let signals = d.add(c1, 4, 2);
        let first = waiting.await.unwrap().unwrap();
        assert_eq!(first, WorkerId(1));
        let _second = d.acquire(Target::any(), soon(), false).await.unwrap();
        // Two served: the worker is due for recycling and takes no more requests.
        tokio::time::timeout(Duration::from_secs(1), signals.recycle.notified())
            .await
            .unwrap();
        assert!(!d.snapshot()[0].accepting);
    }

    #[tokio::test(start_paused = true)]
    async fn close_fails_waiters_and_refuses_new_requests() {
        let d = Dispatcher::new(8);
        let d2 = d.clone();
        let waiting =
            tokio::spawn(async move { d2.acquire(Target::any(), soon(), false).await.err() });
        tokio::task::yield_now().await;
        d.close();
        assert!(matches!(
            waiting.await.unwrap(),
            Some(PoolError::ShuttingDown)
        ));
        assert!(matches!(
            d.acquire(Target::any(), soon(), false).await.err(),
            Some(PoolError::ShuttingDown)
        ));
    }
}
