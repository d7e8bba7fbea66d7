//! Compiles `proto/` with protox (pure Rust), so no `protoc` install is needed; and
//! embeds the Python worker runtime (`python/pitboss_worker`, the demo adapters and the
//! package's `pyproject.toml`) in the binary, so that an installed or copied `pitboss`
//! needs no source checkout (`src/runtime_files.rs` writes them out at start).

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/pitboss/v1/bridge.proto",
        "proto/pitboss/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("pitboss_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Payloads as `Bytes`: handed to the pool without a copy.
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    embed_runtime(&out)?;
    Ok(())
}

/// The files of the runtime, relative to `python/`: the package (its `.py` files and
/// `py.typed`), the demo adapters the embedded default config serves, and the
/// package's metadata (so the written-out directory is also `pip install`-able).
fn runtime_files(python: &Path) -> std::io::Result<Vec<String>> {
    let mut files = vec![
        "pyproject.toml".to_string(),
        "examples/demo.py".to_string(),
        "examples/demo_v2.py".to_string(),
    ];
    let mut package: Vec<String> = std::fs::read_dir(python.join("pitboss_worker"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.ends_with(".py") || name == "py.typed")
        .map(|name| format!("pitboss_worker/{name}"))
        .collect();
    package.sort();
    files.extend(package);
    Ok(files)
}

/// FNV-1a, 64 bits: names the runtime's directory by its contents (not a security
/// measure: pitboss compares the written files byte by byte before it uses them).
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// Writes `$OUT_DIR/runtime_files.rs`: `FILES` (path, contents) and `DIGEST`.
///
/// Each file is watched, and the package's directory too, so a file added to the
/// package is embedded at the next build (before, a checkout whose build predated the
/// file kept embedding the old list, and `runtime_files`'s tests failed until a clean
/// build). Workers and the test suite's Python run with `PYTHONDONTWRITEBYTECODE=1`,
/// so no `__pycache__` there triggers rebuilds; one written by hand costs one rebuild.
fn embed_runtime(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let python = manifest.join("python");
    println!(
        "cargo:rerun-if-changed={}",
        python.join("pitboss_worker").display()
    );
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut entries = String::new();
    for rel in runtime_files(&python)? {
        let path = python.join(&rel);
        println!("cargo:rerun-if-changed={}", path.display());
        let bytes = std::fs::read(&path)?;
        fnv1a(&mut hash, rel.as_bytes());
        fnv1a(&mut hash, &(bytes.len() as u64).to_le_bytes());
        fnv1a(&mut hash, &bytes);
        entries.push_str(&format!(
            "    ({rel:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    let code = format!(
        "/// The runtime's files: (path relative to the runtime directory, contents).\n\
         pub static FILES: &[(&str, &[u8])] = &[\n{entries}];\n\
         /// FNV-1a 64 of the paths and contents of [`FILES`], in hex.\n\
         pub const DIGEST: &str = \"{hash:016x}\";\n"
    );
    let target = out.join("runtime_files.rs");
    // Unchanged output keeps its timestamp, so nothing downstream rebuilds for nothing.
    if std::fs::read_to_string(&target).ok().as_deref() != Some(code.as_str()) {
        std::fs::write(target, code)?;
    }
    Ok(())
}
