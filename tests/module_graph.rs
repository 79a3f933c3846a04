//! The top-level modules of `src/` import each other without cycles, and
//! docs/architecture.md states their dependency order truthfully: every module comes
//! after every module it imports (`crate::<module>` anywhere in its files, tests
//! included, `use crate::{a, b::c}` groups over several lines too).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The source with comments, string and character literals blanked out, so that
/// only code is searched for module paths.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < chars.len() {
        let (c, next) = (chars[i], chars.get(i + 1).copied());
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && starts_literal(&chars, i) {
            // A raw string: r"..." or r#"..."#, with as many hashes at both ends.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            while j < chars.len() {
                if chars[j] == '"' && (0..hashes).all(|k| chars.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push_str("\"\"");
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A character literal ('a', '\n', '\''); otherwise a lifetime.
            if next == Some('\\') {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Whether the `r` at `i` opens a raw string (`r"`, `br"`) rather than ending an
/// identifier (`for"` cannot occur, `bar#` can in a macro).
fn starts_literal(chars: &[char], i: usize) -> bool {
    let identifier = |j: usize| chars[j].is_alphanumeric() || chars[j] == '_';
    match i {
        0 => true,
        1 => !identifier(0) || chars[0] == 'b',
        _ => !identifier(i - 1) || (chars[i - 1] == 'b' && !identifier(i - 2)),
    }
}

/// The first path segments that follow `crate::` in code: `crate::a::b` gives `a`,
/// `crate::{a::b, c, d::{e, f}}` gives `a`, `c` and `d`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(offset) = code[from..].find("crate::") {
        let at = from + offset;
        from = at + "crate::".len();
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue; // e.g. `$crate::` or a longer identifier ending in `crate`.
        }
        let rest = code[from..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            let mut word = String::new();
            for c in group.chars() {
                if item_start {
                    if c.is_alphanumeric() || c == '_' {
                        word.push(c);
                    } else if !word.is_empty() {
                        found.insert(std::mem::take(&mut word));
                        item_start = false;
                    }
                }
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    _ => {}
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// The top-level modules `lib.rs` declares.
fn top_level_modules(lib: &str) -> BTreeSet<String> {
    code_only(lib)
        .lines()
        .filter_map(|line| {
            let line = line.trim().strip_prefix("pub ").unwrap_or(line.trim());
            line.strip_prefix("mod ")?.strip_suffix(';').map(|name| name.trim().to_string())
        })
        .collect()
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// Which top-level module imports which, from the files under `src/`.
fn module_graph(src: &Path) -> Graph {
    let modules = top_level_modules(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut graph: Graph = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        let first = relative.components().next().unwrap().as_os_str().to_string_lossy().to_string();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        let Some(imports) = graph.get_mut(&module) else { continue }; // lib.rs, main.rs
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        for used in crate_paths(&code) {
            if used != module && modules.contains(&used) {
                imports.insert(used);
            }
        }
    }
    graph
}

/// A cycle of the graph, as the modules along it (first repeated at the end).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &Graph, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// The modules named, in order, by the list items of a document's
/// `## Module dependency order` section (the first `code` span of each item).
fn documented_order(document: &str) -> Vec<String> {
    document
        .lines()
        .skip_while(|line| line.trim() != "## Module dependency order")
        .skip(1)
        .take_while(|line| !line.starts_with("## "))
        .filter(|line| {
            let item = line.trim_start();
            item.starts_with("- ") || item.split_once(". ").is_some_and(|(n, _)| n.parse::<u32>().is_ok())
        })
        .filter_map(|line| line.split('`').nth(1).map(str::to_string))
        .collect()
}

/// Where a documented order breaks the graph: missing or unknown modules, and
/// modules listed before what they import.
fn order_problems(graph: &Graph, order: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let listed: BTreeSet<&String> = order.iter().collect();
    for module in graph.keys().filter(|m| !listed.contains(m)) {
        problems.push(format!("`{module}` is not listed"));
    }
    for module in order.iter().filter(|m| !graph.contains_key(*m)) {
        problems.push(format!("`{module}` is listed but is not a module of lib.rs"));
    }
    for (position, module) in order.iter().enumerate() {
        for import in graph.get(module).into_iter().flatten() {
            if !order[..position].contains(import) {
                problems.push(format!("`{module}` imports `{import}`, which is not listed before it"));
            }
        }
    }
    problems
}

fn describe(graph: &Graph) -> String {
    graph.iter().map(|(m, imports)| format!("{m} -> {imports:?}\n")).collect()
}

#[test]
fn the_top_level_modules_import_each_other_without_cycles() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.len() > 5, "lib.rs declares too few modules to be read right:\n{}", describe(&graph));
    assert!(graph.values().any(|imports| !imports.is_empty()), "no import found:\n{}", describe(&graph));
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}\n{}", cycle.join(" -> "), describe(&graph));
    }
}

#[test]
fn the_architecture_document_lists_the_modules_in_dependency_order() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let graph = module_graph(&root.join("src"));
    let document = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let order = documented_order(&document);
    let problems = order_problems(&graph, &order);
    assert!(
        problems.is_empty(),
        "docs/architecture.md, `## Module dependency order`:\n{}\nactual imports:\n{}",
        problems.join("\n"),
        describe(&graph)
    );
}

fn graph_of(edges: &[(&str, &[&str])]) -> Graph {
    edges.iter().map(|(m, imports)| (m.to_string(), imports.iter().map(|i| i.to_string()).collect())).collect()
}

#[test]
fn a_cycle_is_found_and_named() {
    let acyclic = graph_of(&[("units", &[]), ("config", &["units", "monitor"]), ("monitor", &["units"])]);
    assert_eq!(find_cycle(&acyclic), None);
    let cyclic = graph_of(&[("cli", &["send"]), ("send", &["sinks"]), ("sinks", &["cli"]), ("units", &[])]);
    assert_eq!(find_cycle(&cyclic).unwrap(), ["cli", "send", "sinks", "cli"]);
    let itself = graph_of(&[("a", &["a"])]);
    assert_eq!(find_cycle(&itself).unwrap(), ["a", "a"]);
}

#[test]
fn use_groups_paths_and_only_code_count_as_imports() {
    let source = r##"
        use crate::{
            capture::{Exchange, Protocol},
            monitor,
            sinks::files::FileSink,
        };
        use crate::units::ConfigError;
        fn f<'a>(x: &'a str) -> char { let _ = crate::worker::spawn; '{' }
        // use crate::commented;
        /* crate::blocked */
        const S: &str = "crate::quoted";
        const R: &str = r"crate::raw";
        const B: &[u8] = br#"crate::"bytes""#;
    "##;
    let found = crate_paths(&code_only(source));
    let expected: BTreeSet<String> =
        ["capture", "monitor", "sinks", "units", "worker"].iter().map(|s| s.to_string()).collect();
    assert_eq!(found, expected);
}

#[test]
fn an_order_that_lists_a_module_before_its_imports_is_refused() {
    let graph = graph_of(&[("units", &[]), ("capture", &["units"]), ("proxy", &["capture", "units"])]);
    let order = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(order_problems(&graph, &order(&["units", "capture", "proxy"])).is_empty());
    let wrong = order_problems(&graph, &order(&["units", "proxy", "capture"]));
    assert_eq!(wrong, ["`proxy` imports `capture`, which is not listed before it"]);
    assert_eq!(order_problems(&graph, &order(&["units", "capture"])), ["`proxy` is not listed"]);
    let document = "# T\n\n## Module dependency order\n\n1. `units` — leaf\n2. `capture` — queue\n\n## Next\n- `x`\n";
    assert_eq!(documented_order(document), ["units", "capture"]);
}
