//! Where the Python worker runtime (`pitboss_worker`) lives.
//!
//! The binary carries the runtime (embedded by `build.rs`: the package, the demo
//! adapters and `pyproject.toml`), so an installed or copied `pitboss` needs no
//! source checkout. At its first use in a process, [`location`] picks the directory:
//!
//! 1. `$PITBOSS_RUNTIME_DIR`, when set (development, or a runtime you ship yourself);
//! 2. the source checkout's `python/`, when this executable runs from that checkout's
//!    build tree (`cargo run`, `cargo test`): edits to the runtime are live;
//! 3. otherwise the embedded runtime, written out once to a versioned,
//!    content-addressed directory `runtime-<version>-<digest>` under the first
//!    writable of: `$PITBOSS_CACHE_DIR` (only that one, when set),
//!    `$XDG_CACHE_HOME/pitboss`, `$HOME/.cache/pitboss`, and a private (0700, owned by
//!    this user) `pitboss-<uid>` in the temp directory (for a read-only root file
//!    system with a writable `/tmp`). A directory that already holds the same files
//!    is used as it is (compared byte by byte, so a damaged copy is replaced); a new
//!    one is written beside it and renamed into place, so a concurrent start never
//!    sees half a runtime.
//!
//! Why not the checkout whenever it exists: `cargo install --path .` leaves the
//! binary's source path in it, and an installed binary must not start running
//! whatever that clone holds later (or fail when it is deleted). A build-tree binary
//! embeds the same files anyway, rebuilt whenever they change.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/runtime_files.rs"));
}

pub use embedded::{DIGEST, FILES};

/// The version of pitboss (and of the `pitboss_worker` package it embeds).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The name of the directory the embedded runtime is written to, under a cache root.
pub fn versioned_name() -> String {
    format!("runtime-{VERSION}-{DIGEST}")
}

/// Where the runtime was found, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `$PITBOSS_RUNTIME_DIR`.
    Env,
    /// The source checkout this executable was built from and runs in.
    Checkout,
    /// The embedded runtime, written out now (`fresh`) or found already written.
    Embedded { fresh: bool },
    /// The embedded runtime could not be written anywhere.
    Unwritable(String),
}

/// The runtime directory of this process, chosen once ([`location`]).
#[derive(Debug, Clone)]
pub struct Location {
    pub dir: PathBuf,
    pub source: Source,
    /// How long choosing (and, for the embedded runtime, checking or writing) took.
    pub took: Duration,
}

impl Location {
    /// One line for logs and `pitboss doctor`.
    pub fn describe(&self) -> String {
        let ms = self.took.as_secs_f64() * 1000.0;
        match &self.source {
            Source::Env => format!("{} (from $PITBOSS_RUNTIME_DIR)", self.dir.display()),
            Source::Checkout => format!("{} (the source checkout)", self.dir.display()),
            Source::Embedded { fresh: true } => format!(
                "{} (embedded in the binary, written out in {ms:.1} ms)",
                self.dir.display()
            ),
            Source::Embedded { fresh: false } => format!(
                "{} (embedded in the binary, already written; checked in {ms:.1} ms)",
                self.dir.display()
            ),
            Source::Unwritable(why) => format!("none: {why}"),
        }
    }
}

/// Why a runtime directory cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    Unwritable(String),
    #[error(
        "no pitboss_worker package in the worker runtime directory {dir} (expected {dir}/pitboss_worker/__init__.py); \
         leave pool.runtime_dir empty (and $PITBOSS_RUNTIME_DIR unset) to use the runtime embedded in pitboss"
    )]
    Missing { dir: PathBuf },
}

/// The runtime directory of this process, chosen (and written, if need be) at the
/// first call; see the module docs.
pub fn location() -> &'static Location {
    static LOCATION: OnceLock<Location> = OnceLock::new();
    LOCATION.get_or_init(|| {
        let started = Instant::now();
        let (dir, source) = choose();
        let location = Location {
            dir,
            source,
            took: started.elapsed(),
        };
        match location.source {
            Source::Embedded { fresh: true } => {
                tracing::info!("worker runtime: {}", location.describe())
            }
            Source::Unwritable(_) => tracing::error!("worker runtime: {}", location.describe()),
            _ => tracing::debug!("worker runtime: {}", location.describe()),
        }
        location
    })
}

/// The directory holding `pitboss_worker` and `examples/` ([`location`]'s).
pub fn runtime_dir() -> PathBuf {
    location().dir.clone()
}

/// Checks that `dir` holds the `pitboss_worker` package, before a worker is spawned
/// with it: a clear error instead of Python's "No module named pitboss_worker".
pub fn check(dir: &Path) -> Result<(), RuntimeError> {
    if dir.join("pitboss_worker").join("__init__.py").is_file() {
        return Ok(());
    }
    let here = location();
    match &here.source {
        Source::Unwritable(why) if here.dir == dir => Err(RuntimeError::Unwritable(why.clone())),
        _ => Err(RuntimeError::Missing {
            dir: dir.to_path_buf(),
        }),
    }
}

fn choose() -> (PathBuf, Source) {
    if let Some(dir) = std::env::var_os("PITBOSS_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return (PathBuf::from(dir), Source::Env);
    }
    if let Some(dir) = checkout_dir() {
        return (dir, Source::Checkout);
    }
    let candidates = cache_roots(&Env::from_process());
    match write_embedded(&candidates) {
        Ok((dir, fresh)) => (dir, Source::Embedded { fresh }),
        Err(why) => {
            let why = why.to_string();
            let dir = candidates
                .first()
                .map(|c| c.root.join(versioned_name()))
                .unwrap_or_default();
            (dir, Source::Unwritable(why))
        }
    }
}

/// The source checkout's `python/`, when the running executable lives in that
/// checkout's tree (its `target/`).
fn checkout_dir() -> Option<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = source.join("python");
    if !python.join("pitboss_worker").is_dir() {
        return None;
    }
    let exe = std::env::current_exe().ok()?.canonicalize().ok()?;
    let root = source.canonicalize().ok()?;
    exe.starts_with(&root).then_some(python)
}

/// The environment variables that choose the cache root (a struct, for tests).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub pitboss_cache_dir: Option<PathBuf>,
    pub xdg_cache_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
    pub temp_dir: PathBuf,
    pub uid: u32,
}

impl Env {
    pub fn from_process() -> Env {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        Env {
            pitboss_cache_dir: var("PITBOSS_CACHE_DIR"),
            xdg_cache_home: var("XDG_CACHE_HOME"),
            home: var("HOME"),
            temp_dir: std::env::temp_dir(),
            // SAFETY: geteuid has no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
        }
    }
}

/// A directory the runtime may be written under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRoot {
    pub root: PathBuf,
    /// In a shared directory (the temp dir): made 0700, and used only if this user
    /// owns it and nobody else may write to it.
    pub private: bool,
}

/// The cache roots to try, in order: `$PITBOSS_CACHE_DIR` alone when set, else
/// `$XDG_CACHE_HOME/pitboss`, `$HOME/.cache/pitboss`, then `<tmp>/pitboss-<uid>`.
pub fn cache_roots(env: &Env) -> Vec<CacheRoot> {
    let open = |root: PathBuf| CacheRoot {
        root,
        private: false,
    };
    if let Some(dir) = &env.pitboss_cache_dir {
        return vec![open(dir.clone())];
    }
    let mut roots = Vec::new();
    if let Some(xdg) = &env.xdg_cache_home {
        roots.push(open(xdg.join("pitboss")));
    }
    if let Some(home) = &env.home {
        let dot = open(home.join(".cache").join("pitboss"));
        if !roots.contains(&dot) {
            roots.push(dot);
        }
    }
    roots.push(CacheRoot {
        root: env.temp_dir.join(format!("pitboss-{}", env.uid)),
        private: true,
    });
    roots
}

/// Writes the embedded runtime under the first root that takes it; returns its
/// directory and whether it was written now. The error lists every root tried.
pub fn write_embedded(roots: &[CacheRoot]) -> Result<(PathBuf, bool), RuntimeError> {
    let mut tried = Vec::new();
    for root in roots {
        match install_under(root, FILES) {
            Ok(done) => return Ok(done),
            Err(e) => tried.push(format!("{}: {e}", root.root.display())),
        }
    }
    Err(RuntimeError::Unwritable(format!(
        "cannot write the worker runtime embedded in pitboss anywhere (tried {}); \
         set $PITBOSS_CACHE_DIR to a writable directory (on a read-only root file system: \
         mount one, e.g. an emptyDir at /tmp), or set pool.runtime_dir / $PITBOSS_RUNTIME_DIR \
         to a directory holding pitboss_worker",
        tried.join("; ")
    )))
}

/// Writes `files` to `<root>/runtime-<version>-<digest>` unless it already holds
/// exactly them. Returns the directory, and whether it was written now.
pub fn install_under(root: &CacheRoot, files: &[(&str, &[u8])]) -> io::Result<(PathBuf, bool)> {
    prepare_root(root)?;
    let target = root.root.join(versioned_name());
    if holds(&target, files) {
        return Ok((target, false));
    }
    let staging = root.root.join(format!(
        ".{}.{}.{:08x}",
        versioned_name(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = write_tree(&staging, files).and_then(|()| {
        match std::fs::rename(&staging, &target) {
            Ok(()) => Ok(true),
            // Another pitboss got there first, or a damaged copy is in the way.
            Err(_) if holds(&target, files) => Ok(false),
            Err(_) => {
                std::fs::remove_dir_all(&target)?;
                std::fs::rename(&staging, &target).map(|()| true)
            }
        }
    });
    let _ = std::fs::remove_dir_all(&staging);
    Ok((target, written?))
}

/// Creates a cache root; a private one must be this user's alone.
fn prepare_root(root: &CacheRoot) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    if root.private {
        builder.mode(0o700);
    }
    builder.create(&root.root)?;
    if root.private {
        let meta = std::fs::symlink_metadata(&root.root)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "not used: it must be a directory owned by uid {me} that nobody else can write to (owner {}, mode {:o})",
                    meta.uid(),
                    meta.permissions().mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `dir` holds exactly these files' contents (other files may be there too,
/// such as Python's `__pycache__`).
fn holds(dir: &Path, files: &[(&str, &[u8])]) -> bool {
    files.iter().all(|(rel, bytes)| {
        std::fs::read(dir.join(rel)).is_ok_and(|on_disk| on_disk.as_slice() == *bytes)
    })
}

fn write_tree(dir: &Path, files: &[(&str, &[u8])]) -> io::Result<()> {
    std::fs::create_dir(dir)?;
    for (rel, bytes) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "pitboss-rtfiles-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const SAMPLE: &[(&str, &[u8])] = &[
        ("pitboss_worker/__init__.py", b"x = 1\n"),
        ("examples/demo.py", b"y = 2\n"),
    ];

    #[test]
    fn every_file_of_the_package_is_embedded() {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
        let mut on_disk: Vec<String> = std::fs::read_dir(python.join("pitboss_worker"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".py") || n == "py.typed")
            .map(|n| format!("pitboss_worker/{n}"))
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = FILES
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| p.starts_with("pitboss_worker/"))
            .collect();
        assert_eq!(
            embedded, on_disk,
            "the embedded runtime is stale: `touch build.rs` and build again"
        );
        for (rel, bytes) in FILES {
            assert_eq!(
                std::fs::read(python.join(rel)).unwrap(),
                *bytes,
                "{rel} changed since the build"
            );
        }
        assert!(FILES.iter().any(|(p, _)| *p == "pyproject.toml"));
        assert!(FILES.iter().any(|(p, _)| *p == "examples/demo.py"));
    }

    #[test]
    fn roots_are_tried_in_order_and_the_override_stands_alone() {
        let env = Env {
            pitboss_cache_dir: None,
            xdg_cache_home: Some("/x".into()),
            home: Some("/h".into()),
            temp_dir: "/tmp".into(),
            uid: 7,
        };
        let roots: Vec<_> = cache_roots(&env)
            .into_iter()
            .map(|r| (r.root, r.private))
            .collect();
        assert_eq!(
            roots,
            vec![
                (PathBuf::from("/x/pitboss"), false),
                (PathBuf::from("/h/.cache/pitboss"), false),
                (PathBuf::from("/tmp/pitboss-7"), true),
            ]
        );
        let only = Env {
            pitboss_cache_dir: Some("/c".into()),
            ..env
        };
        assert_eq!(
            cache_roots(&only),
            vec![CacheRoot {
                root: "/c".into(),
                private: false
            }]
        );
    }

    #[test]
    fn written_once_then_reused_and_a_damaged_copy_is_replaced() {
        let dir = scratch("once");
        let root = CacheRoot {
            root: dir.join("cache"),
            private: false,
        };
        let (target, fresh) = install_under(&root, SAMPLE).unwrap();
        assert!(fresh);
        assert_eq!(target, root.root.join(versioned_name()));
        assert_eq!(
            std::fs::read(target.join("examples/demo.py")).unwrap(),
            b"y = 2\n"
        );
        let (again, fresh) = install_under(&root, SAMPLE).unwrap();
        assert_eq!((again.clone(), fresh), (target.clone(), false));
        std::fs::write(target.join("pitboss_worker/__init__.py"), b"broken").unwrap();
        let (_, fresh) = install_under(&root, SAMPLE).unwrap();
        assert!(fresh, "a damaged copy is written again");
        assert_eq!(
            std::fs::read(target.join("pitboss_worker/__init__.py")).unwrap(),
            b"x = 1\n"
        );
        // No staging directory is left behind.
        let left: Vec<_> = std::fs::read_dir(&root.root).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_unwritable_root_falls_through_to_the_next_and_the_error_names_them_all() {
        let dir = scratch("fallback");
        // A path under a regular file cannot be created, even by root.
        std::fs::write(dir.join("file"), b"").unwrap();
        let blocked = CacheRoot {
            root: dir.join("file/cache"),
            private: false,
        };
        let private = CacheRoot {
            root: dir.join("tmp/pitboss-me"),
            private: true,
        };
        let (target, _) = write_embedded(&[blocked.clone(), private.clone()]).unwrap();
        assert!(target.starts_with(&private.root), "{target:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&private.root)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let err = write_embedded(std::slice::from_ref(&blocked))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&blocked.root.display().to_string()), "{err}");
        assert!(err.contains("PITBOSS_CACHE_DIR"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_private_root_that_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("shared");
        let root = CacheRoot {
            root: dir.join("pitboss-x"),
            private: true,
        };
        std::fs::create_dir(&root.root).unwrap();
        std::fs::set_permissions(&root.root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = install_under(&root, SAMPLE).unwrap_err();
        assert!(err.to_string().contains("nobody else"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_directory_without_the_package_is_a_clear_error() {
        let dir = scratch("missing");
        let err = check(&dir).unwrap_err().to_string();
        assert!(err.contains("pitboss_worker/__init__.py"), "{err}");
        assert!(err.contains("pool.runtime_dir"), "{err}");
        check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("python")).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tests_run_from_the_checkout() {
        assert_eq!(location().source, Source::Checkout);
        assert!(location().describe().contains("source checkout"));
    }
}
