//! The flags file (or memory) as a [`FlagStore`]: one instance's flags.
//!
//! The file is hot reloaded by [`LiveFlags::watch`]; a write is a compare-and-swap on
//! the instance's own revision (a count of the changes applied), under the writers'
//! lock, then an atomic rename. The audit log is kept in memory (the last
//! [`KEPT`] records) and appended, one JSON line per change, to
//! `.<flags file>.audit.jsonl` next to the file when that directory is writable.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::{AuditRecord, CasError, FlagStore, StoreError, Versioned};
use crate::rollout::flags::Flags;
use crate::rollout::reload::{LiveFlags, WriteIfError};

/// Audit records kept in memory.
pub const KEPT: usize = 1000;

pub struct FileStore {
    live: Arc<LiveFlags>,
    log: Mutex<VecDeque<AuditRecord>>,
}

impl FileStore {
    /// The store of `live`'s file (or of memory, without one).
    pub fn new(live: Arc<LiveFlags>) -> Arc<FileStore> {
        Arc::new(FileStore {
            live,
            log: Mutex::new(VecDeque::new()),
        })
    }

    fn audit_path(&self) -> Option<PathBuf> {
        self.live.path().map(audit_path)
    }
}

/// `.flags.toml.audit.jsonl` next to `flags.toml`.
pub fn audit_path(flags: &Path) -> PathBuf {
    let name = flags
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "flags.toml".into());
    flags.with_file_name(format!(".{name}.audit.jsonl"))
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(format!("{line}\n").as_bytes())
}

#[tonic::async_trait]
impl FlagStore for FileStore {
    fn describe(&self) -> String {
        match self.live.path() {
            Some(p) => format!("file {}", p.display()),
            None => "memory (not persisted)".into(),
        }
    }

    async fn load(&self) -> Result<Option<Versioned>, StoreError> {
        let (flags, revision) = self.live.current();
        Ok(Some(Versioned {
            flags: (*flags).clone(),
            revision,
        }))
    }

    fn watch(&self, live: Arc<LiveFlags>, stop: CancellationToken) {
        if live.path().is_none() {
            return;
        }
        match live.watch() {
            Ok(guard) => {
                tokio::spawn(async move {
                    stop.cancelled().await;
                    drop(guard);
                });
            }
            Err(e) => tracing::error!("cannot watch the flags file; edits need a restart: {e}"),
        }
    }

    async fn compare_and_swap(
        &self,
        expected: u64,
        flags: &Flags,
        record: &AuditRecord,
    ) -> Result<u64, CasError> {
        let revision = self
            .live
            .write_if(expected, flags)
            .await
            .map_err(|e| match e {
                WriteIfError::Conflict {
                    expected,
                    current,
                    now,
                } => CasError::Conflict {
                    expected,
                    current,
                    by: now.status.changed_by.clone(),
                    now: Some(Box::new(((*now).clone(), current))),
                },
                WriteIfError::Write { path, source } => {
                    CasError::Store(StoreError::Write { path, source })
                }
            })?;
        let record = AuditRecord {
            revision,
            ..record.clone()
        };
        if let Some(path) = self.audit_path() {
            let line = serde_json::to_string(&record).unwrap_or_default();
            if let Err(e) = append_line(&path, &line) {
                tracing::debug!("cannot append to the audit log {}: {e}", path.display());
            }
        }
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() == KEPT {
            log.pop_front();
        }
        log.push_back(record);
        Ok(revision)
    }

    async fn history(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        // The file outlives restarts; memory has this run's records only.
        if let Some(text) = self
            .audit_path()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            let records: Vec<AuditRecord> = text
                .lines()
                .rev()
                .filter_map(|l| serde_json::from_str(l).ok())
                .take(limit)
                .collect();
            return Ok(records);
        }
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        Ok(log.iter().rev().take(limit).cloned().collect())
    }
}
