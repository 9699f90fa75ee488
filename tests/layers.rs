//! The import graph of the library (src/, without the binaries' own modules) has no cycle: a
//! module never reaches, through `crate::` paths, a module that reaches it. README's Architecture
//! section draws the layers this keeps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every library module: its path (`proxy::forward`) and its source, tests left out.
fn modules() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if path != src.join("bin") {
                    dirs.push(path);
                }
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") || path == src.join("main.rs") {
                continue;
            }
            let name = module_name(&src, &path);
            let text = std::fs::read_to_string(&path).expect("source is readable");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            found.insert(name, code.to_string());
        }
    }
    found
}

fn module_name(src: &Path, path: &Path) -> String {
    let relative = path
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// The `crate::` paths a source names, `crate::a::{b, c}` as `a::b` and `a::c`; comments left out.
fn crate_paths(code: &str) -> Vec<String> {
    let code: String = code
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut paths = Vec::new();
    for (start, _) in code.match_indices("crate::") {
        let rest = &code[start + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let path = path.trim_end_matches(':').to_string();
        let after = &rest[path.len()..];
        match after.strip_prefix("::{") {
            Some(group) => {
                let group = group.split('}').next().unwrap_or_default();
                for item in group.split(',') {
                    let item = item.trim().split([' ', ':']).next().unwrap_or_default();
                    match item {
                        "" => {}
                        "self" => paths.push(path.clone()),
                        item => paths.push(format!("{path}::{item}")),
                    }
                }
            }
            None => paths.push(path),
        }
    }
    paths
}

/// Edges from each module to the modules it names (the longest module prefix of each path).
fn graph(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, code) in modules {
        for path in crate_paths(code) {
            let parts: Vec<&str> = path.split("::").collect();
            let target = (1..=parts.len())
                .rev()
                .map(|len| parts[..len].join("::"))
                .find(|candidate| modules.contains_key(candidate));
            if let Some(target) = target
                && &target != module
            {
                edges.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    edges
}

/// A cycle, if the graph has one, as the modules along it.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|seen| seen == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, done, path) {
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
        .find_map(|node| visit(node, edges, &mut done, &mut Vec::new()))
}

#[test]
fn no_module_imports_a_module_that_imports_it() {
    let modules = modules();
    assert!(
        modules.contains_key("proxy::forward"),
        "modules found: {modules:?}"
    );
    let edges = graph(&modules);
    assert!(
        edges["proxy::router"].contains("proxy::endpoints"),
        "the graph sees imports: {edges:?}"
    );
    assert_eq!(find_cycle(&edges), None, "import cycle");
}

#[test]
fn no_top_level_module_imports_one_that_imports_it() {
    let modules = modules();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, targets) in graph(&modules) {
        let from_top = from.split("::").next().unwrap_or_default().to_string();
        for to in targets {
            let to_top = to.split("::").next().unwrap_or_default().to_string();
            if from_top != to_top && !from_top.is_empty() {
                edges.entry(from_top.clone()).or_default().insert(to_top);
            }
        }
    }
    assert_eq!(
        find_cycle(&edges),
        None,
        "import cycle between top-level modules"
    );
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into());
    edges.entry("b".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&edges),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
}
