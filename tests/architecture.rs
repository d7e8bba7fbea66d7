//! The layering of `src/`, enforced: every `crate::` path in a module's code (tests
//! excluded) is an edge, and an edge may only point down the layers below.
//!
//! ```text
//! main  >  cli (bench)  >  server  >  grpc  >  telemetry  >  rollout  >  backend  >  resilience  >  pool  >  worker
//!                                (config, proto and runtime_files: leaves anyone may use)
//! ```
//!
//! No exception is listed: an edge that points up (or sideways, within one layer)
//! fails the test. With strictly decreasing layers there can be no cycle either, and a
//! cycle between files of one module is not an edge this test counts (a module is its
//! own unit).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module's layer; an edge must go to a strictly lower layer.
const LAYERS: &[(&str, i32)] = &[
    ("runtime_files", -2),
    ("proto", -1),
    ("config", -1),
    // A transparent call on the wire (issue 17): shared by the edge, the split and
    // the grpc_proxy backend, and it imports none of them.
    ("wire", -1),
    ("worker", 0),
    // TLS material, reload, accepting and client identities: it uses only config, and
    // the server (listeners), grpc (who may call) and backend (https upstreams) use
    // it. Nothing below backend needs it, so it shares worker's layer with no edge
    // between the two.
    ("tls", 0),
    ("pool", 1),
    ("resilience", 2),
    ("backend", 3),
    ("rollout", 4),
    ("telemetry", 5),
    ("grpc", 6),
    ("server", 7),
    ("cli", 8),
    ("main", 9),
];

/// The module a source file belongs to: its first path component under `src/`.
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix("src").unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The source without its `#[cfg(test)]` part (tests may reach anywhere) and without
/// comments, which often name other modules.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![Path::new("src").to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let from = module_of(&path);
            if from == "lib" {
                continue; // declares the modules
            }
            let code = code_of(&std::fs::read_to_string(&path).unwrap());
            for (i, _) in code.match_indices("crate::") {
                let to: String = code[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !to.is_empty() && to != from {
                    out.entry(from.clone()).or_default().insert(to);
                }
            }
            // The binary reaches the library as `pitboss::`.
            if from == "main" || from == "cli" {
                for (i, _) in code.match_indices("pitboss::") {
                    let to: String = code[i + "pitboss::".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !to.is_empty() && to != from {
                        out.entry(from.clone()).or_default().insert(to);
                    }
                }
            }
        }
    }
    out
}

fn layer(module: &str) -> i32 {
    LAYERS
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module `{module}` has no layer in tests/architecture.rs"))
}

#[test]
fn every_edge_points_down_the_layers() {
    let mut violations = BTreeSet::new();
    for (from, tos) in edges() {
        for to in tos {
            if layer(&from) <= layer(&to) {
                violations.insert((from.clone(), to));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "edges that break the layering (see the table at the top of tests/architecture.rs): {violations:?}"
    );
}

#[test]
fn the_scan_sees_the_real_edges() {
    // Guards the scanner itself: edges everyone can see in the code.
    let e = edges();
    assert!(e["pool"].contains("worker"), "{e:?}");
    assert!(e["grpc"].contains("rollout"), "{e:?}");
    assert!(e["server"].contains("grpc"), "{e:?}");
    assert!(
        !e.get("worker")
            .is_some_and(|w| w.contains("pool") || w.contains("grpc")),
        "{e:?}"
    );
}

/// The names that follow `prefix` in `code` (`super::` → the sibling named).
fn names_after<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = String> + 'a {
    code.match_indices(prefix).map(move |(i, _)| {
        code[i + prefix.len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    })
}

/// Within each module's folder, which file uses which sibling file (`super::x`, or
/// `crate::module::x`). `mod.rs` is left out: it declares and re-exports the files,
/// so edges to and from it say nothing about how the files depend on each other.
fn file_edges() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for dir in std::fs::read_dir("src").unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let module = dir.file_name().unwrap().to_string_lossy().to_string();
        let files: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("rs"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().to_string())
            .filter(|f| f != "mod")
            .collect();
        for file in &files {
            let code = code_of(&std::fs::read_to_string(dir.join(format!("{file}.rs"))).unwrap());
            let own = format!("crate::{module}::");
            for to in names_after(&code, "super::").chain(names_after(&code, &own)) {
                if files.contains(&to) && &to != file {
                    out.entry(format!("{module}/{file}"))
                        .or_default()
                        .insert(format!("{module}/{to}"));
                }
            }
        }
    }
    out
}

/// A cycle in `edges`, if there is one, as the path around it.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

/// No two files of one module use each other, directly or around a loop (issue 14:
/// `worker/connection.rs` and `worker/error.rs` did), and no two modules do.
#[test]
fn no_cycles_between_files_or_modules() {
    let files = file_edges();
    assert!(
        files.contains_key("worker/connection"),
        "the scan sees sibling edges: {files:?}"
    );
    assert_eq!(find_cycle(&files), None, "files that depend on each other");
    assert_eq!(
        find_cycle(&edges()),
        None,
        "modules that depend on each other"
    );
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph = |pairs: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in pairs {
            g.entry(a.to_string()).or_default().insert(b.to_string());
        }
        g
    };
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])),
        None
    );
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
