//! Hot reload of TLS material: the files are watched, re-read, re-validated and
//! swapped in whole, so each new connection takes the config in force when it arrives
//! and connections already open keep theirs.
//!
//! The watch is on the files' *directories* (a Kubernetes Secret volume swaps its
//! `..data` symlink; cert-manager and editors rename over the file), backed by a
//! re-read every `tls.reload_interval` in case an event was missed. Nothing changes
//! unless the bytes did. A certificate and its key are two files written one after
//! the other: a change that does not validate is tried again once the writes have
//! settled, and only a state that stays invalid is logged and counted as a failed
//! reload; the material in force stays until a valid one replaces it.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{material, Named, Summary, TlsError};

/// How long the events of one rotation are coalesced before the files are read.
const SETTLE: Duration = Duration::from_millis(100);

/// How long a change that does not validate (a key written after its certificate)
/// is given before it counts as a failed reload.
const RETRY_AFTER: Duration = Duration::from_millis(1000);

/// Builds a value (a rustls config) from the bytes of its files, in their order.
pub type Build<T> = Box<dyn Fn(&[Vec<u8>]) -> Result<(Arc<T>, Summary), TlsError> + Send + Sync>;

/// Reads and builds now (an error is a startup error), then keeps the value current
/// in the background for as long as the returned `ArcSwap` has an owner.
pub fn start<T: Send + Sync + 'static>(
    label: String,
    files: Vec<Named>,
    build: Build<T>,
    interval: Duration,
) -> Result<(Arc<ArcSwap<T>>, Summary), TlsError> {
    let contents = material::read_all(&files)?;
    let (value, summary) = build(&contents)?;
    expiry_gauge(&label, &summary);
    let live = Arc::new(ArcSwap::new(value));
    let weak = Arc::downgrade(&live);
    tokio::spawn(watch(label, files, contents, weak, build, interval));
    Ok((live, summary))
}

fn expiry_gauge(label: &str, summary: &Summary) {
    metrics::gauge!("pitboss_tls_certificate_expiry_timestamp_seconds", "file" => label.to_string())
        .set(summary.not_after_unix as f64);
}

async fn watch<T: Send + Sync + 'static>(
    label: String,
    files: Vec<Named>,
    mut in_force: Vec<Vec<u8>>,
    live: Weak<ArcSwap<T>>,
    build: Build<T>,
    interval: Duration,
) {
    let (tx, mut events) = mpsc::unbounded_channel::<()>();
    let _watcher = match watcher(&files, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(file = %label, "cannot watch the TLS files ({e}); they are re-read every {interval:?}");
            None
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    // The bytes of the last change refused, so that it is reported once.
    let mut refused: Option<Vec<Vec<u8>>> = None;
    loop {
        tokio::select! {
            e = events.recv() => {
                if e.is_none() {
                    return;
                }
                settle(&mut events).await;
            }
            _ = tick.tick() => {}
        }
        let Some(target) = live.upgrade() else {
            return; // the listener or upstream is gone
        };
        let mut attempt = 0;
        loop {
            let (contents, result) = match material::read_all(&files) {
                Ok(c) if c == in_force => break,
                Ok(c) => {
                    let r = build(&c);
                    (c, r)
                }
                Err(e) => (Vec::new(), Err(e)),
            };
            match result {
                Ok((value, summary)) => {
                    target.store(value);
                    in_force = contents;
                    refused = None;
                    expiry_gauge(&label, &summary);
                    metrics::counter!("pitboss_config_reloads_total", "file" => label.clone(), "result" => "ok").increment(1);
                    tracing::info!(file = %label, certificate = %summary, "TLS certificate reloaded: new connections use it");
                    break;
                }
                Err(e) if attempt == 0 => {
                    // Perhaps half a rotation (the certificate written, not yet its
                    // key): look again once the writes settle.
                    tracing::debug!(file = %label, "TLS files changed but do not validate yet: {e}");
                    attempt += 1;
                    tokio::time::sleep(RETRY_AFTER).await;
                    while events.try_recv().is_ok() {}
                }
                Err(e) => {
                    if refused.as_ref() != Some(&contents) {
                        metrics::counter!("pitboss_config_reloads_total", "file" => label.clone(), "result" => "error").increment(1);
                        tracing::error!(file = %label, "TLS files rejected, the certificate in force stays: {e}");
                        refused = Some(contents);
                    }
                    break;
                }
            }
        }
    }
}

/// Waits until no event has come for [`SETTLE`].
async fn settle(events: &mut mpsc::UnboundedReceiver<()>) {
    while let Ok(Some(())) = tokio::time::timeout(SETTLE, events.recv()).await {}
}

/// A watcher of the files' directories. Reads (pitboss's own included) are not
/// changes, or every reload would trigger the next.
fn watcher(
    files: &[Named],
    tx: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode, EventKind};
    let mut w = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let change = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        };
        if change {
            let _ = tx.send(());
        }
    })?;
    let mut dirs: Vec<PathBuf> = files
        .iter()
        .map(|f| {
            f.path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."))
                .to_path_buf()
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        w.watch(&d, RecursiveMode::NonRecursive)?;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary() -> Summary {
        Summary {
            subject: "test".into(),
            names: vec![],
            not_after: "-".into(),
            not_after_unix: 0,
        }
    }

    /// Polls (real time: the watch is on real files) until `check` holds.
    async fn until(mut check: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// A change is swapped in; a change that does not build is refused and the value
    /// in force stays until a good one replaces it.
    #[tokio::test]
    async fn a_good_change_is_swapped_in_and_a_bad_one_leaves_the_old_in_force() {
        let dir = std::env::temp_dir().join(format!("pitboss-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("material.pem");
        std::fs::write(&path, "one").unwrap();
        let build: Build<String> = Box::new(|c: &[Vec<u8>]| {
            let text = String::from_utf8_lossy(&c[0]).into_owned();
            if text.starts_with("bad") {
                return Err(TlsError::Setup {
                    key: "test".into(),
                    what: "bad material".into(),
                });
            }
            Ok((Arc::new(text), summary()))
        });
        let (live, _) = start(
            "tls.test".into(),
            vec![Named::new("tls.test.cert_file", &path)],
            build,
            Duration::from_millis(200),
        )
        .unwrap();
        assert_eq!(**live.load(), "one");

        std::fs::write(&path, "two").unwrap();
        assert!(
            until(|| **live.load() == "two").await,
            "the change was swapped in"
        );

        std::fs::write(&path, "bad three").unwrap();
        // Past the settle and retry delays and a few re-reads: still "two".
        tokio::time::sleep(RETRY_AFTER + Duration::from_millis(800)).await;
        assert_eq!(**live.load(), "two", "a bad change is refused");

        std::fs::write(&path, "four").unwrap();
        assert!(
            until(|| **live.load() == "four").await,
            "a good change after it is taken"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
