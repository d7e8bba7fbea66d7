//! Which worker gets a request: a pure function over a snapshot of the workers.

use crate::worker::WorkerId;

/// What the dispatcher knows about one worker when it picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: WorkerId,
    /// Ready and not draining.
    pub accepting: bool,
    pub in_flight: u32,
    pub max_in_flight: u32,
    /// Requests served so far; breaks ties so that equal load rotates over workers.
    pub served: u64,
    /// Taken out of general rotation (outlier ejection); its sessions still reach it.
    pub ejected: bool,
}

impl Candidate {
    fn has_room(&self) -> bool {
        self.accepting && self.in_flight < self.max_in_flight
    }
}

/// Which workers a request may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Any worker, preferring not to use `avoid` (the worker a retry just failed on).
    Any { avoid: Option<WorkerId> },
    /// Only this worker (session affinity).
    Exactly(WorkerId),
}

impl Target {
    pub fn any() -> Target {
        Target::Any { avoid: None }
    }

    /// Whether a free slot on `worker` can serve a request waiting for this target.
    pub fn accepts(&self, worker: WorkerId) -> bool {
        match self {
            Target::Any { .. } => true,
            Target::Exactly(w) => *w == worker,
        }
    }
}

/// The index of the least-loaded worker with room, or `None` if all are full.
///
/// Least in-flight first, then least served. With `avoid`, another worker with room is
/// preferred even if busier; the avoided one is used only when it alone has room.
pub fn pick(candidates: &[Candidate], target: Target) -> Option<usize> {
    match target {
        Target::Exactly(id) => candidates
            .iter()
            .position(|c| c.id == id)
            .filter(|&i| candidates[i].has_room()),
        Target::Any { avoid } => {
            let best = |skip: Option<WorkerId>| {
                candidates
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.has_room() && !c.ejected && Some(c.id) != skip)
                    .min_by_key(|(_, c)| (c.in_flight, c.served))
                    .map(|(i, _)| i)
            };
            best(avoid).or_else(|| avoid.and_then(|_| best(None)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, in_flight: u32, served: u64) -> Candidate {
        Candidate {
            id: WorkerId(id),
            accepting: true,
            in_flight,
            max_in_flight: 4,
            served,
            ejected: false,
        }
    }

    #[test]
    fn ejected_workers_serve_only_their_sessions() {
        let mut ws = [c(1, 0, 0), c(2, 3, 0)];
        ws[0].ejected = true;
        assert_eq!(pick(&ws, Target::any()), Some(1));
        assert_eq!(pick(&ws, Target::Exactly(WorkerId(1))), Some(0));
    }

    #[test]
    fn least_loaded_then_least_served() {
        let ws = [c(1, 2, 0), c(2, 1, 9), c(3, 1, 3)];
        assert_eq!(pick(&ws, Target::any()), Some(2));
    }

    #[test]
    fn full_and_draining_workers_are_skipped() {
        let mut ws = [c(1, 4, 0), c(2, 0, 0)];
        assert_eq!(pick(&ws, Target::any()), Some(1));
        ws[1].accepting = false;
        assert_eq!(pick(&ws, Target::any()), None);
    }

    #[test]
    fn avoid_is_a_preference_not_a_ban() {
        let ws = [c(1, 0, 0), c(2, 3, 0)];
        let t = Target::Any {
            avoid: Some(WorkerId(1)),
        };
        assert_eq!(pick(&ws, t), Some(1));
        let ws = [c(1, 0, 0), c(2, 4, 0)];
        assert_eq!(pick(&ws, t), Some(0), "only the avoided worker has room");
    }

    #[test]
    fn exactly_waits_for_its_worker() {
        let ws = [c(1, 0, 0), c(2, 4, 0)];
        assert_eq!(pick(&ws, Target::Exactly(WorkerId(2))), None);
        assert_eq!(pick(&ws, Target::Exactly(WorkerId(1))), Some(0));
        assert_eq!(pick(&ws, Target::Exactly(WorkerId(7))), None);
    }
}
