//! Hot reload of the flags file.
//!
//! The watcher watches the file's *directory*, not the file: editors and
//! `kubectl`-mounted ConfigMaps replace a file by writing a temporary one and renaming
//! it over the original, which a watch on the old inode would miss. Every change is
//! re-read and validated; a valid file is swapped in atomically (`ArcSwap`), so calls in
//! flight keep the flags they started with and none is dropped. An invalid file is
//! logged with its line and key, counted, and the previous flags stay in force.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::flags::Flags;

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
}

impl LiveFlags {
    /// Reads the file (a missing file means the embedded defaults) and returns the
    /// live flags. A present but invalid file is an error at startup.
    pub fn load(path: &Path) -> Result<Arc<LiveFlags>, crate::config::ConfigError> {
        let flags = match std::fs::read_to_string(path) {
            Ok(text) => Flags::parse(&path.display().to_string(), &text)?,
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
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Applies a change computed from the flags in force, and writes the result to the
    /// file atomically (a temporary file in the same directory, synced, then renamed
    /// over the original), so a restart keeps it and a reader never sees half a file.
    /// Returns the old and the new flags. The file is written before the swap: if it
    /// cannot be written, nothing changes and the error says why.
    pub async fn update(
        &self,
        change: impl FnOnce(&Flags) -> Result<Flags, String>,
    ) -> Result<(Arc<Flags>, Arc<Flags>), String> {
        let _guard = self.write_lock.lock().await;
        let old = self.get();
        let new = change(&old)?;
        if let Some(path) = &self.path {
            write_atomically(path, &new.to_toml())
                .map_err(|e| format!("cannot write the flags file {}: {e}", path.display()))?;
        }
        let new = Arc::new(new);
        self.current.store(new.clone());
        Ok((old, new))
    }

    /// The flags in force now. Cheap: one atomic load.
    pub fn get(&self) -> Arc<Flags> {
        self.current.load_full()
    }

    /// Replaces the flags in force (admin changes, auto-rollback).
    pub fn set(&self, flags: Flags) {
        self.current.store(Arc::new(flags));
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
        let result = std::fs::read_to_string(path)
            .map_err(|e| format!("{origin}: cannot read: {e}"))
            .and_then(|text| Flags::parse(&origin, &text).map_err(|e| e.to_string()));
        match result {
            Ok(flags) => {
                if *self.get() != flags {
                    tracing::info!(file = %origin, mode = ?flags.mode, percent = flags.percent.0.as_f64(), "flags reloaded");
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
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
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
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(event) = event {
                    if should_reload(&event, name.as_deref()) {
                        let _ = tx.send(());
                    }
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        let live = self.clone();
        let task = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Coalesce the burst of events one save produces (write, chmod, rename).
                tokio::time::sleep(Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
                live.reload();
            }
        });
        Ok(WatchGuard {
            _watcher: watcher,
            task,
        })
    }
}

/// Whether a file-system event may have changed the flags file.
///
/// * Access events (open, read, close without writing) never do, and pitboss's own
///   reads produce them: reacting to them made every reload trigger the next one. A
///   close after writing does count.
/// * A Kubernetes ConfigMap volume updates by swapping its `..data` symlink; the
///   `flags.toml` link itself never changes, so an event on `..data` counts too.
fn should_reload(event: &notify::Event, name: Option<&std::ffi::OsStr>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    // A file closed after writing is the one access that means "changed" (and the
    // surest sign a slow writer has finished).
    if matches!(event.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) {
        return false;
    }
    event.paths.iter().any(|p| {
        let file = p.file_name();
        (name.is_some() && file == name) || file == Some(std::ffi::OsStr::new("..data"))
    })
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "flags.toml".into());
    let tmp = path.with_file_name(format!(".{name}.pitboss-{}.tmp", std::process::id()));
    let header = "# Rollout flags, written by pitboss (auto-rollback or an admin change).\n\
                  # Edits are hot reloaded; comments are not kept when pitboss writes.\n\n";
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
                Ok(f)
            })
            .await
            .unwrap();
        assert_eq!(old.percent.0.as_f64(), 5.0);
        let again = LiveFlags::load(&path).unwrap();
        assert_eq!(*again.get(), *new, "the file holds what is in force");
        assert!(
            std::fs::read_dir(&dir).unwrap().count() == 1,
            "no temp file left"
        );
        // A failed change changes nothing.
        assert!(live.update(|_| Err("no".into())).await.is_err());
        assert_eq!(*live.get(), *new);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_file_means_the_defaults() {
        let live = LiveFlags::load(Path::new("/nonexistent/pitboss/flags.toml")).unwrap();
        assert_eq!(live.get().mode, Mode::Off);
    }
}
