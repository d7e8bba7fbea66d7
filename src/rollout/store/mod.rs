//! Where the rollout flags live: the [`FlagStore`] boundary.
//!
//! A store delivers flags to the instance ([`LiveFlags`], which routing reads) and
//! takes writes as a compare-and-swap on a revision, so two writers never silently
//! overwrite each other. Routing never sees the store: it reads the flags in force,
//! which the store only replaces.
//!
//! - [`file`]: the flags file (hot reloaded) or memory, on one instance (the default).
//! - [`etcd`]: one key in etcd shared by the tier, watched by every instance, with an
//!   audit log, lease-bound statistics of each instance and an elected analyser.
//!
//! A second shared store (the Kubernetes API: a ConfigMap and a Lease) would
//! implement the same two traits.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::flags::{step_of, Flags};
use super::reload::LiveFlags;
use super::tier::Published;

pub mod etcd;
pub mod file;

/// Opens the store `[rollout.store]` names, and the flags it starts with.
///
/// `file`: the flags file (an invalid one starts on the last good copy, see
/// [`LiveFlags::start`]) or memory. `etcd`: one read of the key, bounded by the
/// store's timeout; if etcd does not answer, the cached flags (`cache_file`) or
/// everything on legacy, said in the log and `/readyz`, until it answers. Nothing is
/// watched until [`FlagStore::watch`].
pub async fn open(
    config: &crate::config::Config,
    instance: &str,
) -> Result<(Arc<LiveFlags>, Arc<dyn FlagStore>), StoreError> {
    use crate::config::StoreKind;
    match config.rollout.store.kind {
        StoreKind::File => {
            let live = match config.flags_path() {
                Some(path) => LiveFlags::start(&path),
                None => LiveFlags::in_memory(Flags::defaults()),
            };
            let store: Arc<dyn FlagStore> = file::FileStore::new(live.clone());
            Ok((live, store))
        }
        StoreKind::Etcd => {
            let settings = etcd::EtcdSettings::from_section(
                &config.rollout.store,
                config.store_cache_path(),
                instance,
            );
            let store = etcd::EtcdStore::new(settings).await?;
            let cached = store.cached();
            let live = LiveFlags::in_memory_at(cached.clone().unwrap_or_else(Flags::defaults), 0);
            store.attach(live.clone(), cached.is_some());
            match store.load().await {
                Ok(Some(v)) => store.deliver(&live, v),
                Ok(None) => {}
                Err(e) => {
                    let with = if cached.is_some() {
                        "the cached flags"
                    } else {
                        "everything on legacy (no cached flags)"
                    };
                    tracing::warn!(
                        "{e}: serving with {with} until it answers; its flags apply as soon as it does"
                    );
                }
            }
            let store: Arc<dyn FlagStore> = store;
            Ok((live, store))
        }
    }
}

/// Why the store could not serve a request. All but [`StoreError::Unconfirmed`] mean
/// nothing was read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the rollout store ({store}) is unreachable: {message}")]
    Unreachable { store: String, message: String },
    /// A write sent but not confirmed in time (etcd without a quorum, or too slow):
    /// it may still be applied, since etcd commits a proposal it accepted once its
    /// quorum is back. It stays a compare-and-swap: it lands on the revision it was
    /// made on, with its audit record, or not at all.
    #[error(
        "the rollout store ({store}) did not confirm the write (unreachable, or without \
         a quorum): {message}; it may still apply it when it recovers"
    )]
    Unconfirmed { store: String, message: String },
    #[error("cannot write the flags file {}: {source}", path.display())]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the rollout store ({store}) holds flags pitboss cannot read: {message}")]
    Invalid { store: String, message: String },
}

/// Why a compare-and-swap wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// Another writer changed the flags since `expected`: the caller recomputes on
    /// the flags now in force (`current`), or reports.
    #[error(
        "the rollout changed while this change was being made (revision {expected} is now \
         {current}{}): nothing was written; read it again (`pitboss rollout status`) and retry",
        by_whom(.by)
    )]
    Conflict {
        expected: u64,
        current: u64,
        /// Who made the change that won, when the store knows.
        by: String,
        /// The flags in force now, when the store returned them with its refusal.
        now: Option<Box<(Flags, u64)>>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn by_whom(by: &str) -> String {
    if by.is_empty() {
        String::new()
    } else {
        format!(", changed by {by}")
    }
}

/// One change of the rollout: who, what, why and when. Every write appends one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub at: String,
    pub actor: String,
    /// `set`, `pause`, `resume`, `rollback`, `promote` (an operator's), or
    /// `auto-rollback`, `auto-promotion`, `create`.
    pub action: String,
    pub reason: String,
    /// The rollout before and after: "canary 5% active".
    pub before: String,
    pub after: String,
    /// The instance that wrote it.
    pub instance: String,
    /// The flags' revision this change wrote (0 when unknown).
    pub revision: u64,
}

impl AuditRecord {
    pub fn new(action: &str, actor: &str, instance: &str, old: &Flags, new: &Flags) -> AuditRecord {
        let summary = |f: &Flags| format!("{} {}", step_of(f), f.status.state.as_str());
        AuditRecord {
            at: new.status.changed_at.clone(),
            actor: actor.to_string(),
            action: action.to_string(),
            reason: new.status.reason.clone(),
            before: summary(old),
            after: summary(new),
            instance: instance.to_string(),
            revision: 0,
        }
    }
}

/// Flags with the revision they were stored at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub flags: Flags,
    pub revision: u64,
}

/// The store of the flags: load, watch, compare-and-swap, and the audit log.
#[tonic::async_trait]
pub trait FlagStore: Send + Sync + 'static {
    /// What and where, for status and messages: "file flags.toml", "etcd ... key ...".
    fn describe(&self) -> String;

    /// Whether the store answered its last request (always, for a file).
    fn up(&self) -> bool {
        true
    }

    /// The flags stored now; `None` when the store holds none yet.
    async fn load(&self) -> Result<Option<Versioned>, StoreError>;

    /// Delivers every change of the stored flags to `live` until `stop`: each applied
    /// change replaces the flags in force atomically, with its revision.
    fn watch(&self, live: Arc<LiveFlags>, stop: CancellationToken);

    /// Writes `flags` if the stored revision is still `expected`, with its audit
    /// record, atomically. Returns the new revision. The caller applies the written
    /// flags to its [`LiveFlags`] at once (the watch delivers them everywhere else).
    async fn compare_and_swap(
        &self,
        expected: u64,
        flags: &Flags,
        record: &AuditRecord,
    ) -> Result<u64, CasError>;

    /// The last `limit` audit records, newest first.
    async fn history(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;

    /// The tier's coordination, for a store that several instances share.
    fn tier(&self) -> Option<Arc<dyn Tier>> {
        None
    }
}

/// What instances sharing a store need for one analysis of the whole tier: each
/// publishes its statistics (bound to its lease, so they vanish with it), and one
/// of them, the elected leader, analyses their sum.
#[tonic::async_trait]
pub trait Tier: Send + Sync + 'static {
    /// Publishes this instance's statistics (replacing its previous ones).
    async fn publish(&self, stats: &Published) -> Result<(), StoreError>;
    /// Every live instance's published statistics.
    async fn gather(&self) -> Result<Vec<Published>, StoreError>;
    /// Whether this instance holds the analyser's lease now.
    fn is_leader(&self) -> bool;
    /// The instance that holds it, when known.
    fn leader(&self) -> Option<String>;
}
