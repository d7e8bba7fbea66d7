//! Where the Python worker runtime (`pitboss_worker`) lives.

use std::path::PathBuf;

/// The directory holding `pitboss_worker` and `examples/`: `$PITBOSS_RUNTIME_DIR` if
/// set, else `python/` in the source tree pitboss was built from, else
/// `../share/pitboss/python` next to the executable.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PITBOSS_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python");
    if source.join("pitboss_worker").is_dir() {
        return source;
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("../share/pitboss/python")))
        .unwrap_or(source)
}
