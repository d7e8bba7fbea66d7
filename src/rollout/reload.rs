//! Hot reload of the flags file.
//!
//! The watcher watches the file's *directory*, not the file: editors and
//! `kubectl`-mounted ConfigMaps replace a file by writing a temporary one and renaming
//! it over the original, which a watch on the old inode would miss. Every change is
//! re-read and validated; a valid file is swapped in atomically (`ArcSwap`), so calls in
//! flight keep the flags they started with and none is dropped. An invalid file is
//! logged with its line and key, counted, and the previous flags stay in force.
//!
//! A file is read only once it is complete. A rename (editors, `kubectl`, pitboss's
//! own writes) and a ConfigMap's `..data` swap are complete at once; a file written
//! in place (`open('w')`, write, close) is complete when its writer closes it, however
//! long the writer pauses in between. A writer that never closes is read after
//! [`QUIET`] without any event. An empty read of the file is never applied: it is a
//! writer caught between truncating and writing.
//!
//! A file that is invalid when pitboss starts does not stop it ([`LiveFlags::start`]):
//! pitboss serves with the last good copy of the flags it applied (kept next to the
//! file, when that directory is writable), else with everything on legacy, and says
//! so in its log, its metrics and `/readyz`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::flags::Flags;

/// Why [`LiveFlags::update`] changed nothing: the change itself was refused, or the
/// file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError<E> {
    #[error(transparent)]
    Refused(E),
    #[error("cannot write the flags file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a reload of the flags file was rejected (the previous flags stay in force).
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("{origin}: cannot read: {source}")]
    Read {
        origin: String,
        source: std::io::Error,
    },
    #[error("{origin}: the file is empty (a writer may be mid-write); write `mode = \"off\"` to turn the rollout off")]
    Empty { origin: String },
    #[error(transparent)]
    Invalid(#[from] crate::config::ConfigError),
}

/// The flags in force, shared by every call.
pub struct LiveFlags {
    current: ArcSwap<Flags>,
    /// `None`: flags live in memory only (no flags file configured).
    path: Option<PathBuf>,
    /// Serialises writers (admin changes, auto-rollback), so two read-modify-write
    /// changes never lose one another.
    write_lock: tokio::sync::Mutex<()>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
    /// The revision of the flags in force: the store's (etcd's mod revision), or a
    /// count of the changes applied (file, memory). Writers compare-and-swap on it.
    revision: AtomicU64,
    /// Makes a (flags, revision) pair change together.
    apply_lock: std::sync::Mutex<()>,
    /// What the store says about itself, for readiness (e.g. unreachable since ...).
    store_note: std::sync::Mutex<Option<String>>,
}

/// [`LiveFlags::write_if`] found another revision in force.
#[derive(Debug, thiserror::Error)]
pub enum WriteIfError {
    #[error("the flags changed: revision {expected} is now {current}")]
    Conflict {
        expected: u64,
        current: u64,
        now: Arc<Flags>,
    },
    #[error("cannot write the flags file {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl LiveFlags {
    /// Reads the file (a missing file means the embedded defaults) and returns the
    /// live flags. A present but invalid file is an error at startup.
    pub fn load(path: &Path) -> Result<Arc<LiveFlags>, crate::config::ConfigError> {
        LiveFlags::load_keeping(path, None)
    }

    /// [`LiveFlags::load`], with the status of `status_from` (the last good copy) for
    /// the `[status]` keys the file leaves out, as a reload keeps the status in force.
    fn load_keeping(
        path: &Path,
        status_from: Option<&Flags>,
    ) -> Result<Arc<LiveFlags>, crate::config::ConfigError> {
        let origin = path.display().to_string();
        let flags = match std::fs::read_to_string(path) {
            Ok(text) => match status_from {
                Some(kept) => Flags::parse_reload(&origin, &text, kept)?,
                None => Flags::parse(&origin, &text)?,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Flags::defaults(),
            Err(e) => {
                return Err(crate::config::ConfigError {
                    origin: path.display().to_string(),
                    line: None,
                    key: None,
                    message: format!("cannot read: {e}"),
                })
            }
        };
        Ok(Arc::new(LiveFlags::new(flags, Some(path.to_path_buf()))))
    }

    /// The flags at start, never failing on a bad file: a crash-looping pod on a bad
    /// ConfigMap edit, while the running pods keep their flags, is worse than a pod
    /// that serves safely and says what is wrong. An invalid (or unreadable) file is
    /// logged, counted as a failed reload, and kept as `last_error` (readiness notes
    /// it); the flags are the last good copy if there is one, else the defaults
    /// (everything on legacy). `pitboss check-flags` still rejects the file.
    ///
    /// A valid file that leaves `[status]` out keeps the status of the last good copy,
    /// as a reload keeps the status in force: a rollback that a file without
    /// `[status]` did not undo is not undone by a restart either.
    pub fn start(path: &Path) -> Arc<LiveFlags> {
        let last_good = read_last_good(path);
        match LiveFlags::load_keeping(path, last_good.as_ref()) {
            Ok(live) => {
                save_last_good(path, &live.get());
                live
            }
            Err(e) => {
                let (flags, from) = match last_good {
                    Some(flags) => (
                        flags,
                        format!("the last good copy ({})", last_good_path(path).display()),
                    ),
                    None => (Flags::defaults(), "everything on legacy".to_string()),
                };
                let message = format!(
                    "flags file rejected at start: {e}; serving with {from} until the file is fixed"
                );
                tracing::error!("{message}");
                metrics::counter!("pitboss_config_reloads_total", "file" => "flags", "result" => "error").increment(1);
                let live = LiveFlags::new(flags, Some(path.to_path_buf()));
                live.reloads_failed.store(1, Ordering::Relaxed);
                *live.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
                Arc::new(live)
            }
        }
    }

    /// Flags without a file: changes apply in memory and are lost on restart.
    pub fn in_memory(flags: Flags) -> Arc<LiveFlags> {
        Arc::new(LiveFlags::new(flags, None))
    }

    fn new(flags: Flags, path: Option<PathBuf>) -> LiveFlags {
        LiveFlags {
            current: ArcSwap::from_pointee(flags),
            path,
            write_lock: Default::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_error: Default::default(),
            revision: AtomicU64::new(1),
            apply_lock: Default::default(),
            store_note: Default::default(),
        }
    }

    /// The flags in force and their revision, as one pair.
    pub fn current(&self) -> (Arc<Flags>, u64) {
        let _g = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        (self.get(), self.revision.load(Ordering::Acquire))
    }

    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Applies flags a store delivered at `revision`: only a newer revision replaces
    /// the flags in force (a watch event for a write this instance already applied,
    /// or a late answer, changes nothing). Returns whether it applied them.
    pub fn apply(&self, flags: Flags, revision: u64) -> bool {
        let _g = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        if revision <= self.revision.load(Ordering::Acquire) {
            return false;
        }
        self.current.store(Arc::new(flags));
        self.revision.store(revision, Ordering::Release);
        true
    }

    /// Replaces the flags in force with the next local revision (file and memory).
    fn bump(&self, flags: Arc<Flags>) -> u64 {
        let _g = self.apply_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.current.store(flags);
        self.revision.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Writes `new` (to the file, when there is one, atomically) if the revision in
    /// force is still `expected`, then applies it with the next revision. The
    /// compare-and-swap of the file store.
    pub async fn write_if(&self, expected: u64, new: &Flags) -> Result<u64, WriteIfError> {
        let _guard = self.write_lock.lock().await;
        let (now, current) = self.current();
        if current != expected {
            return Err(WriteIfError::Conflict {
                expected,
                current,
                now,
            });
        }
        if let Some(path) = &self.path {
            write_atomically(path, WRITTEN_BY_PITBOSS, &new.to_toml()).map_err(|source| {
                WriteIfError::Write {
                    path: path.clone(),
                    source,
                }
            })?;
            save_last_good(path, new);
        }
        Ok(self.bump(Arc::new(new.clone())))
    }

    /// A store's value was rejected (the previous flags stay): logged, counted, and
    /// noted for readiness, as a rejected flags file is.
    pub fn rejected(&self, message: String) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() != Some(message.as_str()) {
            tracing::error!("{message}");
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("pitboss_config_reloads_total", "file" => "flags", "result" => "error").increment(1);
        }
        *last = Some(message);
    }

    /// A store's value was read and is valid: a past rejection no longer holds.
    pub fn accepted(&self) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Flags held in memory, starting at `revision` (0 for a store that has not
    /// delivered any yet: its first value replaces these, whatever its revision).
    pub fn in_memory_at(flags: Flags, revision: u64) -> Arc<LiveFlags> {
        let live = LiveFlags::new(flags, None);
        live.revision.store(revision, Ordering::Release);
        Arc::new(live)
    }

    /// Says what the store's state means for this instance (`None`: nothing to say);
    /// `/readyz` adds it as a note without going unready.
    pub fn set_store_note(&self, note: Option<String>) {
        *self.store_note.lock().unwrap_or_else(|e| e.into_inner()) = note;
    }

    /// What `/readyz` notes: a rejected flags file, the store's state.
    pub fn notes(&self) -> Option<String> {
        let notes: Vec<String> = [
            self.last_error(),
            self.store_note
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!notes.is_empty()).then(|| notes.join("; note: "))
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Applies a change computed from the flags in force, and writes the result to the
    /// file atomically (a temporary file in the same directory, synced, then renamed
    /// over the original), so a restart keeps it and a reader never sees half a file.
    /// Returns the old and the new flags. The file is written before the swap: if it
    /// cannot be written, nothing changes and the error says why.
    pub async fn update<E>(
        &self,
        change: impl FnOnce(&Flags) -> Result<Flags, E>,
    ) -> Result<(Arc<Flags>, Arc<Flags>), UpdateError<E>> {
        let _guard = self.write_lock.lock().await;
        let old = self.get();
        let new = change(&old).map_err(UpdateError::Refused)?;
        if let Some(path) = &self.path {
            write_atomically(path, WRITTEN_BY_PITBOSS, &new.to_toml()).map_err(|source| {
                UpdateError::Write {
                    path: path.clone(),
                    source,
                }
            })?;
            save_last_good(path, &new);
        }
        let new = Arc::new(new);
        self.bump(new.clone());
        Ok((old, new))
    }

    /// The flags in force now. Cheap: one atomic load.
    pub fn get(&self) -> Arc<Flags> {
        self.current.load_full()
    }

    /// Replaces the flags in force (with the next local revision).
    pub fn set(&self, flags: Flags) {
        self.bump(Arc::new(flags));
    }

    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the file now. Returns whether new flags were applied.
    pub fn reload(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let origin = path.display().to_string();
        let current = self.get();
        let result = std::fs::read_to_string(path)
            .map_err(|source| ReloadError::Read {
                origin: origin.clone(),
                source,
            })
            .and_then(|text| {
                if text.trim().is_empty() {
                    // A writer between truncating and writing, or a mistake: either
                    // way "everything back to the defaults" is not what anyone meant.
                    return Err(ReloadError::Empty {
                        origin: origin.clone(),
                    });
                }
                Ok(Flags::parse_reload(&origin, &text, &current)?)
            });
        match result {
            Ok(flags) => {
                if *current != flags {
                    tracing::info!(file = %origin, mode = ?flags.mode, percent = flags.percent.0.as_f64(), state = ?flags.status.state, "flags reloaded");
                    save_last_good(path, &flags);
                    self.set(flags);
                }
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("pitboss_config_reloads_total", "file" => "flags", "result" => "ok").increment(1);
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                true
            }
            Err(e) => {
                tracing::error!("flags file rejected, previous flags stay in force: {e}");
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("pitboss_config_reloads_total", "file" => "flags", "result" => "error").increment(1);
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                false
            }
        }
    }

    /// Watches the file's directory and reloads on every change to the file, until the
    /// returned guard is dropped.
    pub fn watch(self: &Arc<Self>) -> notify::Result<WatchGuard> {
        let Some(path) = &self.path else {
            return Err(notify::Error::generic("no flags file to watch"));
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let name = path.file_name().map(|n| n.to_os_string());
        let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    if let Some(change) = change_of(&event, name.as_deref()) {
                        let _ = tx.send(change);
                    }
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        let live = self.clone();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // Wait for the file to be complete: a burst of events ending in a
                // complete one (coalesced for 50 ms), or a writer gone quiet.
                let mut complete = first == Change::Complete;
                loop {
                    let wait = if complete { SETTLE } else { QUIET };
                    match tokio::time::timeout(wait, rx.recv()).await {
                        Ok(Some(change)) => complete = change == Change::Complete,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                live.reload();
            }
        });
        Ok(WatchGuard {
            _watcher: watcher,
            task,
        })
    }
}

/// How long the events of one save are coalesced once the file is complete.
const SETTLE: Duration = Duration::from_millis(50);

/// How long a file written in place may go without any event before it is read even
/// though its writer has not closed it (a writer that keeps the file open).
pub const QUIET: Duration = Duration::from_secs(2);

/// What a file-system event says about the flags file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// The file is whole now: renamed into place, closed by its writer, or a
    /// ConfigMap's `..data` swapped.
    Complete,
    /// The file is being written (truncated, written, created): wait for the writer.
    Partial,
}

/// What a file-system event means for the flags file, if anything.
///
/// * Access events (open, read, close without writing) mean nothing, and pitboss's
///   own reads produce them: reacting to them made every reload trigger the next one.
///   A close after writing means the writer has finished.
/// * A Kubernetes ConfigMap volume updates by swapping its `..data` symlink; the
///   `flags.toml` link itself never changes, so an event on `..data` counts too.
fn change_of(event: &notify::Event, name: Option<&std::ffi::OsStr>) -> Option<Change> {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    let ours = event.paths.iter().any(|p| {
        let file = p.file_name();
        (name.is_some() && file == name) || file == Some(std::ffi::OsStr::new("..data"))
    });
    if !ours {
        return None;
    }
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Change::Complete),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Name(_)) => Some(Change::Complete),
        _ => Some(Change::Partial),
    }
}

/// Where the last flags applied are kept, for a start on an invalid file.
fn last_good_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "flags.toml".into());
    path.with_file_name(format!(".{name}.last-good"))
}

/// Keeps a copy of flags that were applied. Best effort: a read-only directory (a
/// ConfigMap volume) simply has no copy.
fn save_last_good(path: &Path, flags: &Flags) {
    let copy = last_good_path(path);
    let text = flags.to_toml();
    if std::fs::read_to_string(&copy).ok().as_deref() == Some(text.as_str()) {
        return;
    }
    if let Err(e) = write_atomically(&copy, "", &text) {
        tracing::debug!(
            "cannot keep a last good copy of the flags at {}: {e}",
            copy.display()
        );
    }
}

fn read_last_good(path: &Path) -> Option<Flags> {
    let copy = last_good_path(path);
    let text = std::fs::read_to_string(&copy).ok()?;
    Flags::parse(&copy.display().to_string(), &text).ok()
}

/// The header of a flags file pitboss writes.
const WRITTEN_BY_PITBOSS: &str = "# Rollout flags, written by pitboss (auto-rollback or an admin change).\n\
                                  # Edits are hot reloaded; comments are not kept when pitboss writes.\n\n";

/// Writes `header` and `text` to a temporary file in the same directory, syncs it and
/// renames it over `path`: a reader never sees half a file.
pub(crate) fn write_atomically(path: &Path, header: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "flags.toml".into());
    let tmp = path.with_file_name(format!(".{name}.pitboss-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(header.as_bytes())?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Keeps the watch alive; dropping it stops reloading.
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Mode;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pitboss-flags-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn until(mut f: impl FnMut() -> bool) -> bool {
        // Real file-system events: poll with a generous bound.
        for _ in 0..200 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn edits_in_place_and_by_rename_are_applied_and_bad_files_are_rejected() {
        let dir = temp_dir("reload");
        let path = dir.join("flags.toml");
        std::fs::write(&path, "mode = \"off\"\n").unwrap();
        let live = LiveFlags::load(&path).unwrap();
        let _guard = live.watch().unwrap();
        assert_eq!(live.get().mode, Mode::Off);

        // An in-place write.
        std::fs::write(&path, "mode = \"canary\"\npercent = 10.0\n").unwrap();
        assert!(
            until(|| live.get().mode == Mode::Canary).await,
            "in-place edit not applied"
        );

        // An editor's write-temp-then-rename.
        let tmp = dir.join(".flags.toml.swp");
        std::fs::write(&tmp, "mode = \"canary\"\npercent = 50.0\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(
            until(|| live.get().percent.0.as_f64() == 50.0).await,
            "rename not applied"
        );

        // A bad file: rejected with its line, the old flags stay.
        let (_, failed_before) = live.reloads();
        std::fs::write(&path, "mode = \"canary\"\npercent = 500.0\n").unwrap();
        assert!(
            until(|| live.reloads().1 > failed_before).await,
            "bad file not noticed"
        );
        assert_eq!(
            live.get().percent.0.as_f64(),
            50.0,
            "previous flags stay in force"
        );
        let err = live.last_error().unwrap();
        assert!(
            err.contains("flags.toml:2") && err.contains("percent"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    const ROLLED_BACK: &str = "mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\n\
        [status]\nstate = \"rolled_back\"\nreason = \"test\"\n";

    /// Issue 13 item 2: a file rewritten in place by a writer that pauses halfway is
    /// not read until the writer closes it; an empty read is never applied.
    #[tokio::test]
    async fn a_file_written_in_place_is_applied_only_once_complete() {
        use std::io::Write;
        let dir = temp_dir("partial");
        let path = dir.join("flags.toml");
        std::fs::write(&path, ROLLED_BACK).unwrap();
        let live = LiveFlags::load(&path).unwrap();
        let _guard = live.watch().unwrap();
        let before = live.get();
        // The same content, rewritten in place: truncate, half (cut in the middle of
        // "50.0", so a half read says percent = 5 and no status), pause, the rest.
        let (head, rest) = ROLLED_BACK.split_at(ROLLED_BACK.find("0.0").unwrap());
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(head.as_bytes()).unwrap();
        f.flush().unwrap();
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!(live.get(), before, "a half-written file was applied");
        }
        f.write_all(rest.as_bytes()).unwrap();
        drop(f);
        // Now it is complete and read (the reload counter moves), with no change.
        assert!(
            until(|| live.reloads().0 >= 1).await,
            "the complete file was not read"
        );
        assert_eq!(live.get(), before);

        // A truncate alone (an empty file) is never applied.
        let (_, failed) = live.reloads();
        std::fs::File::create(&path).unwrap();
        assert!(
            until(|| live.reloads().1 > failed).await,
            "the empty file was not noticed"
        );
        assert_eq!(live.get(), before, "an empty read was applied");
        assert!(live.last_error().unwrap().contains("empty"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 13 item 3: a file without `[status]` keeps the status in force.
    #[tokio::test]
    async fn a_file_without_status_does_not_resume_a_rolled_back_rollout() {
        let dir = temp_dir("status");
        let path = dir.join("flags.toml");
        std::fs::write(&path, ROLLED_BACK).unwrap();
        let live = LiveFlags::load(&path).unwrap();
        assert_eq!(
            live.get().status.state,
            crate::rollout::flags::RolloutState::RolledBack
        );
        let _guard = live.watch().unwrap();
        let tmp = dir.join(".flags.toml.new");
        std::fs::write(
            &tmp,
            "mode = \"canary\"\npercent = 20.0\ncommands = [\"*\"]\nsalt = \"s2\"\n",
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(
            until(|| live.get().percent.0.as_f64() == 20.0).await,
            "not applied"
        );
        let f = live.get();
        assert_eq!(
            f.status.state,
            crate::rollout::flags::RolloutState::RolledBack
        );
        assert_eq!(f.status.reason, "test");
        assert!(!f.serving_new(), "still rolled back: new gets nothing");
        // An explicit state does resume.
        std::fs::write(
            &tmp,
            "mode = \"canary\"\npercent = 20.0\n[status]\nstate = \"active\"\n",
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(
            until(|| live.get().serving_new()).await,
            "explicit resume not applied"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 13 item 3, across a restart: a rollback kept by a file without
    /// `[status]` is kept by the next start too (the status comes from the last good
    /// copy), while a file with an explicit state still decides at start.
    #[tokio::test]
    async fn a_status_kept_by_a_file_without_status_survives_a_restart() {
        use crate::rollout::flags::RolloutState;
        let dir = temp_dir("restart");
        let path = dir.join("flags.toml");
        std::fs::write(&path, ROLLED_BACK).unwrap();
        let live = LiveFlags::start(&path);
        let guard = live.watch().unwrap();
        let tmp = dir.join(".flags.toml.new");
        std::fs::write(
            &tmp,
            "mode = \"canary\"\npercent = 20.0\ncommands = [\"*\"]\n",
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(
            until(|| live.get().percent.0.as_f64() == 20.0).await,
            "not applied"
        );
        assert_eq!(live.get().status.state, RolloutState::RolledBack);
        drop(guard);

        let restarted = LiveFlags::start(&path);
        let f = restarted.get();
        assert_eq!(f.percent.0.as_f64(), 20.0, "the file decides the rest");
        assert_eq!(
            f.status.state,
            RolloutState::RolledBack,
            "a restart resumed a rollout that a file without [status] kept rolled back"
        );
        assert_eq!(f.status.reason, "test");
        assert!(restarted.last_error().is_none());

        // An explicit state in the file wins at start.
        std::fs::write(
            &path,
            "mode = \"canary\"\npercent = 20.0\n[status]\nstate = \"active\"\n",
        )
        .unwrap();
        assert_eq!(
            LiveFlags::start(&path).get().status.state,
            RolloutState::Active
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Issue 13 item 4: an invalid file at start does not stop pitboss; the last good
    /// copy is used, else everything goes to legacy; the error is kept.
    #[test]
    fn an_invalid_file_at_start_falls_back_to_the_last_good_copy_or_legacy() {
        let dir = temp_dir("start");
        let path = dir.join("flags.toml");
        std::fs::write(&path, "mode = \"canary\"\npercent = 500.0\n").unwrap();
        let live = LiveFlags::start(&path);
        assert_eq!(live.get().mode, Mode::Off, "no copy: everything on legacy");
        let err = live.last_error().unwrap();
        assert!(
            err.contains("percent") && err.contains("everything on legacy"),
            "{err}"
        );
        assert_eq!(live.reloads().1, 1);

        std::fs::write(&path, "mode = \"canary\"\npercent = 30.0\n").unwrap();
        let good = LiveFlags::start(&path);
        assert!(good.last_error().is_none());
        assert_eq!(good.get().percent.0.as_f64(), 30.0);
        std::fs::write(&path, "mode = \"canary\"\npercent = 500.0\n").unwrap();
        let again = LiveFlags::start(&path);
        assert_eq!(again.get().percent.0.as_f64(), 30.0, "the last good copy");
        assert!(again.last_error().unwrap().contains("last good copy"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn updates_are_written_atomically_and_survive_a_reload() {
        let dir = temp_dir("update");
        let path = dir.join("flags.toml");
        std::fs::write(&path, "mode = \"canary\"\npercent = 5.0\n").unwrap();
        let live = LiveFlags::load(&path).unwrap();
        let (old, new) = live
            .update(|f| {
                let mut f = f.clone();
                f.status.state = crate::rollout::flags::RolloutState::RolledBack;
                f.status.reason = "error rate".into();
                Ok::<_, std::convert::Infallible>(f)
            })
            .await
            .unwrap();
        assert_eq!(old.percent.0.as_f64(), 5.0);
        let again = LiveFlags::load(&path).unwrap();
        assert_eq!(*again.get(), *new, "the file holds what is in force");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".last-good"))
            .collect();
        assert_eq!(left, vec!["flags.toml".to_string()], "no temp file left");
        // A failed change changes nothing.
        let refused = live.update(|_| Err::<Flags, _>("no")).await;
        assert!(matches!(refused, Err(UpdateError::Refused("no"))));
        assert_eq!(*live.get(), *new);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_file_means_the_defaults() {
        let live = LiveFlags::load(Path::new("/nonexistent/pitboss/flags.toml")).unwrap();
        assert_eq!(live.get().mode, Mode::Off);
    }
}
