//! The daemon crate's modules depend on each other one way (style.md, issue "one stage, one
//! place"): shared leaves (`config`, `template`, `outcome`, `events`, …) at the bottom, the
//! stages above them, the daemon's wiring on top. This test reads `src/` and fails on any
//! cycle between the crate's top-level modules, naming the modules and the files that make
//! each edge, so a piece put in the wrong room shows at once.
//!
//! An edge is any `crate::<module>` path outside a comment, in code or tests; the Redis
//! manager is a crate of its own (`routemq_redis`, re-exported as `crate::redis`) and cannot
//! import the daemon back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate's top-level modules: `src/<name>.rs` and `src/<name>/`.
fn top_modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .expect("read src/")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_stem()?.to_str()?.to_string();
            let module = path.is_dir() || path.extension().is_some_and(|e| e == "rs");
            (module && name != "lib" && name != "main").then_some(name)
        })
        .collect()
}

/// The identifiers after `crate::` in `code`: `crate::a::b` and `use crate::{a, b::c}`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                found.push(ident(part.trim()));
            }
        } else {
            found.push(ident(rest));
        }
    }
    found
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// Code without `//` comments (doc comments included: links in them are no dependency).
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| {
            // The first `//` outside a string literal ("mqtt://…" is none).
            let comment = line
                .match_indices("//")
                .map(|(at, _)| at)
                .find(|&at| line[..at].matches('"').count() % 2 == 0);
            comment.map_or(line, |at| &line[..at])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One cycle in `edges`, if any (depth-first search).
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut Vec::new(), &mut done))
}

#[test]
fn the_daemon_crates_modules_have_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let tops = top_modules(&src);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // (from, to) → the files that make the edge, for the message.
    let mut why: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("below src/");
        let from = ident(&rel.to_string_lossy());
        if !tops.contains(&from) {
            continue; // lib.rs, main.rs: the crate root wires everything
        }
        let text = std::fs::read_to_string(file).expect("read source");
        for to in crate_paths(&without_comments(&text)) {
            if to != from && tops.contains(&to) {
                edges.entry(from.clone()).or_default().insert(to.clone());
                why.entry((from.clone(), to))
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    assert!(
        edges.len() > 5,
        "the scan found almost no dependencies ({edges:?}): is it reading src/?"
    );
    if let Some(cycle) = find_cycle(&edges) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| {
                let files = &why[&(w[0].clone(), w[1].clone())];
                format!(
                    "  {} -> {} ({})",
                    w[0],
                    w[1],
                    files.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        panic!(
            "module cycle: {}\n{}\nMove the piece that needs the module above it into a \
             leaf, instead of adding the import.",
            cycle.join(" -> "),
            steps.join("\n")
        );
    }
}

#[test]
fn the_scan_sees_grouped_and_plain_paths_and_skips_comments() {
    let code = without_comments(
        "use crate::{alpha, beta::x};\nlet u = \"mqtt://h\"; crate::gamma::f(); // crate::delta\n",
    );
    assert_eq!(crate_paths(&code), ["alpha", "beta", "gamma"]);
    let mut edges = BTreeMap::new();
    edges.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    edges.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        find_cycle(&edges),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
}
