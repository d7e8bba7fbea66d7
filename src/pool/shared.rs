//! The state shared by the pool handle, its supervisors and its calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::dispatch::Dispatcher;
use super::status::{SlotInfo, SlotState};
use super::{ExitReason, PoolConfig, SessionTable};
use crate::worker::{signal_group, CommandInfo, ReadyInfo, WorkerId, WorkerSpec};

/// Hooks for metrics and logs; the pool calls them, the caller decides what to record.
pub trait PoolObserver: Send + Sync + 'static {
    fn worker_exited(&self, _pool: &str, _reason: &ExitReason) {}
}

pub(super) struct NoObserver;
impl PoolObserver for NoObserver {}

/// The commands the workers announced, learnt from the first READY.
#[derive(Debug, Default)]
pub(super) struct Commands {
    pub(super) list: Vec<CommandInfo>,
    pub(super) by_name: HashMap<String, CommandInfo>,
    pub(super) names: Vec<String>,
}

impl Commands {
    pub(super) fn new(list: Vec<CommandInfo>) -> Commands {
        Commands {
            by_name: list.iter().map(|c| (c.name.clone(), c.clone())).collect(),
            names: list.iter().map(|c| c.name.clone()).collect(),
            list,
        }
    }
}

pub(crate) struct Shared {
    pub(super) config: PoolConfig,
    pub(super) spec: WorkerSpec,
    pub(super) dispatcher: Arc<Dispatcher>,
    pub(super) sessions: SessionTable,
    pub(super) slots: Vec<Mutex<SlotInfo>>,
    pub(super) commands: RwLock<Arc<Commands>>,
    pub(super) next_worker: AtomicU64,
    pub(super) stop: CancellationToken,
    pub(super) changed: Notify,
    pub(super) events: Arc<dyn PoolObserver>,
}

impl Shared {
    pub(super) fn next_worker_id(&self) -> WorkerId {
        WorkerId(self.next_worker.fetch_add(1, Ordering::Relaxed))
    }

    pub(super) fn update_slot(&self, slot: usize, f: impl FnOnce(&mut SlotInfo)) {
        {
            let mut s = self.slots[slot].lock().unwrap_or_else(|e| e.into_inner());
            f(&mut s);
            if s.state != SlotState::Starting {
                s.attempted = true;
            }
        }
        self.changed.notify_waiters();
    }

    pub(super) fn learn_commands(&self, ready: &ReadyInfo) {
        let mut cmds = self.commands.write().unwrap_or_else(|e| e.into_inner());
        if cmds.list == ready.commands {
            return;
        }
        if !cmds.list.is_empty() {
            tracing::warn!(pool = %self.config.name, "a worker announced a different command list; using the newest");
        }
        *cmds = Arc::new(Commands::new(ready.commands.clone()));
    }

    pub(super) fn commands(&self) -> Arc<Commands> {
        self.commands
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Kills every worker's process group at once (the pool handle was dropped).
    pub(super) fn hard_stop(&self) {
        self.stop.cancel();
        self.dispatcher.close();
        for slot in &self.slots {
            if let Some(pid) = slot.lock().unwrap_or_else(|e| e.into_inner()).pid {
                signal_group(pid, libc::SIGKILL);
            }
        }
    }
}
