//! `pitboss init <dir>`: a working starting point for a new adapter (its module, a
//! config, a flags file and a unit test of the adapter), so a new user goes from an
//! installed binary to a served adapter in two commands. Existing files are never
//! overwritten.

use std::path::{Path, PathBuf};

/// The scaffold's files: (name, contents).
const FILES: &[(&str, &str)] = &[
    ("app.py", include_str!("init/app.py")),
    ("test_app.py", include_str!("init/test_app.py")),
    ("pitboss.toml", include_str!("init/pitboss.toml")),
    ("flags.toml", include_str!("init/flags.toml")),
];

/// Writes the scaffold into `dir` (created if missing); returns the files written.
pub fn init(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let taken: Vec<String> = FILES
        .iter()
        .map(|(name, _)| dir.join(name))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !taken.is_empty() {
        return Err(format!(
            "pitboss init: not overwriting {}; choose an empty directory",
            taken.join(", ")
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("pitboss init: cannot create {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for (name, text) in FILES {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| format!("pitboss init: cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}
