//! `cargo xtask layers`: the daemon's import graph follows the data path. Each source file of
//! the workspace's crates is a node; a `use` or a path naming another file's module is an arrow.
//! It fails on a circle of files (in any crate) and on an arrow from a lower layer of the
//! daemon (`LAYERS`) to a higher one. Tests (`#[cfg(test)]` items) are not part of the design.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use syn::visit::Visit;

/// The daemon's layers, bottom first: a module may import its own layer and those below.
/// The longest matching module path decides (a folder's file may sit on another layer).
const LAYERS: &[(&str, &[&str])] = &[
    ("vocabulary", &["mark", "netstack", "clock"]),
    ("node state", &["nodestate", "netns", "lab", "registry"]),
    ("kernel", &["kernel"]),
    ("inventory", &["inventory"]),
    ("event model", &["place", "event"]),
    ("decode and flows", &["decode", "flows"]),
    ("attribution", &["attribution"]),
    ("pipeline", &["pipeline"]),
    ("why replies die", &["why"]),
    ("outputs", &["output", "recording"]),
    ("commands", &["commands", "privileges", "fixtures"]),
    ("entry points", &["cli", "fuzzing", "test_support", ""]),
];

/// The crates whose files may not import each other in a circle, and the one with layers.
const CRATES: &[(&str, bool)] = &[
    ("fwmark-trace/src", true),
    ("fwmark-trace-common/src", false),
    ("fwmark-trace-ebpf/src", false),
    ("xtask/src", false),
];

pub fn check() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut problems = Vec::new();
    for &(dir, layered) in CRATES {
        let graph = Graph::read(&root.join(dir), Path::new(dir))?;
        for circle in graph.circles() {
            problems.push(format!("{dir}: import circle: {}", graph.describe(&circle)));
        }
        if layered {
            problems.extend(graph.upward().into_iter().map(|p| format!("{dir}: {p}")));
        }
    }
    if !problems.is_empty() {
        bail!(
            "the import graph does not follow the layers (xtask/src/layers.rs):\n  {}",
            problems.join("\n  ")
        );
    }
    println!("layers: no import circle, no upward import");
    Ok(())
}

/// A module path (`["inventory", "nft"]`; the crate root is empty).
type Module = Vec<String>;

struct Graph {
    /// Each file's module.
    modules: BTreeMap<Module, PathBuf>,
    /// Arrows from a module to the modules it names, with the first name seen.
    arrows: BTreeMap<Module, BTreeMap<Module, String>>,
}

impl Graph {
    /// The files under `src`, named `shown/…` in reports.
    fn read(src: &Path, shown: &Path) -> Result<Graph> {
        let mut files = Vec::new();
        walk(src, &mut files)?;
        let mut parsed = BTreeMap::new();
        for file in files {
            let Some(module) = module_of(src, &file) else {
                continue;
            };
            let text = std::fs::read_to_string(&file)?;
            let ast =
                syn::parse_file(&text).with_context(|| format!("parsing {}", file.display()))?;
            let name = shown.join(file.strip_prefix(src)?);
            parsed.insert(module, (name, ast));
        }
        let modules: BTreeMap<Module, PathBuf> = parsed
            .iter()
            .map(|(m, (f, _))| (m.clone(), f.clone()))
            .collect();
        let reexports: BTreeMap<Module, BTreeMap<String, Module>> = parsed
            .iter()
            .map(|(m, (_, ast))| (m.clone(), reexports_of(m, ast)))
            .collect();
        let mut arrows = BTreeMap::new();
        for (module, (_, ast)) in &parsed {
            let mut names = Names {
                here: module,
                children: children_of(ast),
                paths: Vec::new(),
            };
            names.visit_file(ast);
            let mut to: BTreeMap<Module, String> = BTreeMap::new();
            for path in names.paths {
                if let Some(target) = resolve(&modules, &reexports, &path, 0) {
                    if &target != module {
                        to.entry(target).or_insert_with(|| path.join("::"));
                    }
                }
            }
            arrows.insert(module.clone(), to);
        }
        Ok(Graph { modules, arrows })
    }

    /// The strongly connected groups of more than one file (Tarjan's algorithm).
    fn circles(&self) -> Vec<Vec<Module>> {
        struct Walk<'g> {
            g: &'g Graph,
            index: BTreeMap<&'g Module, usize>,
            low: BTreeMap<&'g Module, usize>,
            stack: Vec<&'g Module>,
            on_stack: BTreeSet<&'g Module>,
            out: Vec<Vec<Module>>,
        }
        impl<'g> Walk<'g> {
            fn visit(&mut self, v: &'g Module) {
                let i = self.index.len();
                self.index.insert(v, i);
                self.low.insert(v, i);
                self.stack.push(v);
                self.on_stack.insert(v);
                for w in self.g.arrows[v].keys() {
                    if !self.index.contains_key(w) {
                        self.visit(w);
                        let low = self.low[v].min(self.low[w]);
                        self.low.insert(v, low);
                    } else if self.on_stack.contains(w) {
                        let low = self.low[v].min(self.index[w]);
                        self.low.insert(v, low);
                    }
                }
                if self.low[v] == self.index[v] {
                    let mut group = Vec::new();
                    while let Some(w) = self.stack.pop() {
                        self.on_stack.remove(w);
                        group.push(w.clone());
                        if w == v {
                            break;
                        }
                    }
                    if group.len() > 1 {
                        group.sort();
                        self.out.push(group);
                    }
                }
            }
        }
        let mut walk = Walk {
            g: self,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            out: Vec::new(),
        };
        for m in self.arrows.keys() {
            if !walk.index.contains_key(m) {
                walk.visit(m);
            }
        }
        walk.out
    }

    /// A circle's files and the arrows between them.
    fn describe(&self, circle: &[Module]) -> String {
        let mut arrows = Vec::new();
        for from in circle {
            for (to, name) in &self.arrows[from] {
                if circle.contains(to) {
                    arrows.push(format!("{} -> {} ({name})", self.file(from), self.file(to)));
                }
            }
        }
        arrows.join(", ")
    }

    /// Arrows from a lower layer to a higher one.
    fn upward(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (from, tos) in &self.arrows {
            let lf = layer_of(from);
            for (to, name) in tos {
                let lt = layer_of(to);
                if lt > lf {
                    out.push(format!(
                        "upward import: {} ({}) -> {} ({}) via {name}",
                        self.file(from),
                        LAYERS[lf].0,
                        self.file(to),
                        LAYERS[lt].0
                    ));
                }
            }
        }
        out
    }

    fn file(&self, m: &Module) -> String {
        self.modules[m].display().to_string()
    }
}

/// The layer of a module: its longest prefix named in `LAYERS` (the crate root's if none).
fn layer_of(m: &Module) -> usize {
    let mut best = (0, usize::MAX);
    for (i, (_, prefixes)) in LAYERS.iter().enumerate() {
        for p in *prefixes {
            let parts: Vec<&str> = p.split("::").filter(|s| !s.is_empty()).collect();
            let matches = parts.len() <= m.len() && parts.iter().zip(m).all(|(a, b)| a == b);
            if matches && (best.1 == usize::MAX || parts.len() > best.0) {
                best = (parts.len(), i);
            }
        }
    }
    best.1
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `a/b.rs` and `a/b/mod.rs` are `a::b`; `lib.rs` and `main.rs` the root.
fn module_of(src: &Path, file: &Path) -> Option<Module> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") || parts == ["lib"] || parts == ["main"] {
        parts.pop();
    }
    Some(parts)
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

/// The modules a file declares (`mod x;`): a path may start with their names.
fn children_of(ast: &syn::File) -> BTreeSet<String> {
    ast.items
        .iter()
        .filter_map(|i| match i {
            syn::Item::Mod(m) => Some(m.ident.to_string()),
            _ => None,
        })
        .collect()
}

/// Collects the paths a file names, made absolute (`crate`, `super`, `self` and child modules
/// resolved); paths into other crates are left out.
struct Names<'a> {
    here: &'a Module,
    children: BTreeSet<String>,
    paths: Vec<Vec<String>>,
}

impl Names<'_> {
    fn absolute(&self, segments: &[String]) -> Option<Vec<String>> {
        let mut out = self.here.clone();
        let mut rest = segments;
        match rest.first()?.as_str() {
            "crate" => {
                out.clear();
                rest = &rest[1..];
            }
            "self" => rest = &rest[1..],
            "super" => {
                while rest.first().is_some_and(|s| s == "super") {
                    out.pop()?;
                    rest = &rest[1..];
                }
            }
            first if self.children.contains(first) => {}
            _ => return None,
        }
        out.extend(rest.iter().cloned());
        Some(out)
    }

    fn add(&mut self, segments: &[String]) {
        if let Some(p) = self.absolute(segments) {
            self.paths.push(p);
        }
    }
}

/// Every path of a use tree (`a::{b, c::d}` → `a::b`, `a::c::d`; a glob names its module).
fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let mut p = prefix.clone();
            if n.ident != "self" {
                p.push(n.ident.to_string());
            }
            out.push(p);
        }
        syn::UseTree::Rename(r) => {
            let mut p = prefix.clone();
            if r.ident != "self" {
                p.push(r.ident.to_string());
            }
            out.push(p);
        }
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_paths(t, prefix, out);
            }
        }
    }
}

impl<'ast> Visit<'ast> for Names<'_> {
    fn visit_item(&mut self, i: &'ast syn::Item) {
        let attrs = match i {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(f) => &f.attrs,
            syn::Item::Use(u) => &u.attrs,
            _ => return syn::visit::visit_item(self, i),
        };
        if is_test(attrs) {
            return;
        }
        // Paths inside an inline module are relative to it: none of this crate's are not tests.
        if let syn::Item::Mod(m) = i {
            if m.content.is_some() {
                return;
            }
        }
        syn::visit::visit_item(self, i);
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        // A re-export is the folder's front door, not a dependency of this file's code: those
        // who use the name get an arrow to the file that defines it (`resolve`).
        if !matches!(u.vis, syn::Visibility::Inherited) {
            return;
        }
        let mut paths = Vec::new();
        use_paths(&u.tree, &mut Vec::new(), &mut paths);
        for p in paths {
            self.add(&p);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments.len() > 1 {
            self.add(&segments);
        }
        syn::visit::visit_path(self, p);
    }
}

/// A file's `pub use` re-exports: name → the absolute path it stands for.
fn reexports_of(here: &Module, ast: &syn::File) -> BTreeMap<String, Vec<String>> {
    let names = Names {
        here,
        children: children_of(ast),
        paths: Vec::new(),
    };
    let mut out = BTreeMap::new();
    for item in &ast.items {
        let syn::Item::Use(u) = item else { continue };
        if matches!(u.vis, syn::Visibility::Inherited) {
            continue;
        }
        let mut paths = Vec::new();
        use_paths(&u.tree, &mut Vec::new(), &mut paths);
        for p in paths {
            if let (Some(last), Some(abs)) = (p.last(), names.absolute(&p)) {
                out.insert(last.clone(), abs);
            }
        }
    }
    out
}

/// The file a path names: its longest module prefix, through that file's re-exports.
fn resolve(
    modules: &BTreeMap<Module, PathBuf>,
    reexports: &BTreeMap<Module, BTreeMap<String, Module>>,
    path: &[String],
    depth: usize,
) -> Option<Module> {
    let n = (0..=path.len())
        .rev()
        .find(|&n| modules.contains_key(&path[..n]))?;
    let module = path[..n].to_vec();
    if depth < 8 {
        if let Some(next) = path
            .get(n)
            .and_then(|name| reexports.get(&module)?.get(name))
        {
            if let Some(m) = resolve(modules, reexports, next, depth + 1) {
                return Some(m);
            }
        }
    }
    Some(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> Graph {
        let dir = std::env::temp_dir().join(format!(
            "xtask-layers-{}-{}",
            std::process::id(),
            files.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let g = Graph::read(&dir, Path::new("src")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        g
    }

    #[test]
    fn a_reexport_leads_to_its_file_and_a_circle_is_found() {
        let m = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
        let g = graph(&[
            ("lib.rs", "mod a; mod b;"),
            (
                "a/mod.rs",
                "mod x; pub(crate) use x::X; pub struct Y; fn f() { crate::b::g(); }",
            ),
            ("a/x.rs", "pub struct X;"),
            ("b.rs", "use crate::a::{X, Y}; pub fn g() {}"),
        ]);
        assert!(g.arrows[&m("b")].contains_key(&m("a::x")), "{:?}", g.arrows);
        assert_eq!(g.circles(), [[m("a"), m("b")]]);
    }

    #[test]
    fn tests_and_other_crates_are_no_arrows() {
        let g = graph(&[
            (
                "lib.rs",
                "mod mark; mod output; use std::io; use anyhow::Result;",
            ),
            (
                "mark.rs",
                "#[cfg(test)] mod tests { use crate::output::X; }",
            ),
            ("output.rs", "use super::mark::Mark; pub struct X;"),
        ]);
        assert!(g.circles().is_empty());
        assert!(g.upward().is_empty(), "{:?}", g.upward());
        assert_eq!(g.arrows[&vec!["output".to_string()]].len(), 1);
    }

    #[test]
    fn an_import_from_a_lower_layer_is_upward() {
        let g = graph(&[
            ("lib.rs", "mod mark; mod output;"),
            ("mark.rs", "fn f() -> crate::output::X { todo!() }"),
            ("output.rs", "pub struct X;"),
        ]);
        let up = g.upward();
        assert_eq!(up.len(), 1, "{up:?}");
        assert!(
            up[0].contains("mark.rs") && up[0].contains("(outputs)"),
            "{up:?}"
        );
    }

    #[test]
    fn the_longest_prefix_decides_the_layer() {
        let m = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
        assert_eq!(LAYERS[layer_of(&m("event::attribution"))].0, "event model");
        assert_eq!(LAYERS[layer_of(&m("attribution::rules"))].0, "attribution");
        assert_eq!(LAYERS[layer_of(&m("cli"))].0, "entry points");
        assert_eq!(LAYERS[layer_of(&Vec::new())].0, "entry points");
    }
}
