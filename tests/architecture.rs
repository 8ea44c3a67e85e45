//! The codebase's shape, checked from its source: the layers import one way only (the table
//! below), and the model kinds the code registers are the kinds the docs and the OpenAPI
//! description list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and the modules it may import (`crate::<module>`), lowest
/// layer first. A module imports only modules listed before it: the table is the layering of
/// `lib.rs`'s opening comment.
const LAYERS: &[(&str, &[&str])] = &[
    ("tensor", &[]),
    ("config", &["tensor"]),
    ("engine", &["config", "tensor"]),
    ("batcher", &["engine", "config", "tensor"]),
    ("generate", &["engine", "config", "tensor"]),
    ("codec", &["config", "generate", "tensor"]),
    ("telemetry", &["batcher", "config", "generate", "tensor"]),
    ("repository", &["config"]),
    ("idle_poll", &[]),
    (
        "registry",
        &[
            "batcher",
            "codec",
            "config",
            "engine",
            "generate",
            "idle_poll",
            "repository",
            "telemetry",
            "tensor",
        ],
    ),
    (
        "http",
        &[
            "registry",
            "codec",
            "config",
            "idle_poll",
            "repository",
            "telemetry",
            "tensor",
        ],
    ),
    (
        "grpc",
        &["http", "registry", "codec", "config", "telemetry", "tensor"],
    ),
    ("connections", &[]),
    (
        "server",
        &[
            "connections",
            "engine",
            "grpc",
            "http",
            "registry",
            "repository",
            "telemetry",
        ],
    ),
    ("fuzzing", &["codec", "registry"]),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/codec/kinds/tensor.rs`: `codec`);
/// `None` for the crate root, `main.rs` and `src/bin`.
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root().join("src")).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

/// The top-level modules a file names as `crate::<module>`, outside comments.
fn imports(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = after;
        }
    }
    out
}

/// Every edge `module -> imported module`, with the files that make it.
fn edges() -> BTreeMap<(String, String), Vec<String>> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for file in files {
        let Some(from) = module_of(&file) else {
            continue;
        };
        for to in imports(&std::fs::read_to_string(&file).unwrap()) {
            if to != from {
                let rel = file.strip_prefix(root()).unwrap().display().to_string();
                edges.entry((from.clone(), to)).or_default().push(rel);
            }
        }
    }
    edges
}

#[test]
fn layers_import_only_the_layers_below_them() {
    let allowed: BTreeMap<&str, &[&str]> = LAYERS.iter().copied().collect();
    // the table itself runs one way: each module lists only modules above it in the table
    for (i, (module, below)) in LAYERS.iter().enumerate() {
        for b in *below {
            let at = LAYERS.iter().position(|(m, _)| m == b);
            assert!(
                at.is_some_and(|at| at < i),
                "LAYERS: {module} may import {b}, which is not a layer below it"
            );
        }
    }
    let edges = edges();
    assert!(
        edges.contains_key(&("http".to_string(), "registry".to_string())),
        "the scan found no http -> registry import: it is broken"
    );
    let mut wrong = Vec::new();
    for ((from, to), files) in &edges {
        let Some(may) = allowed.get(from.as_str()) else {
            wrong.push(format!(
                "{from} is a top-level module missing from LAYERS ({})",
                files.join(", ")
            ));
            continue;
        };
        if !may.contains(&to.as_str()) {
            wrong.push(format!("{from} -> {to} in {}", files.join(", ")));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering (tests/architecture.rs LAYERS):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scan_sees_imports_and_ignores_comments() {
    let found =
        imports("use crate::codec::Item; // crate::http\nlet x = crate::tensor::DType::Fp32;");
    assert_eq!(
        found,
        BTreeSet::from(["codec".to_string(), "tensor".to_string()])
    );
}

/// The kinds the code registers, in order.
fn kinds() -> Vec<String> {
    aiaas::codec::kinds::KINDS
        .iter()
        .map(|k| k.name.to_string())
        .collect()
}

#[test]
fn the_docs_list_the_kinds_the_code_registers() {
    let models = std::fs::read_to_string(root().join("docs/MODELS.md")).unwrap();
    let section = models
        .split("\n## Model kinds")
        .nth(1)
        .expect("docs/MODELS.md has a '## Model kinds' section");
    let section = section.split("\n## ").next().unwrap();
    // the table's rows: `| \`kind\` | ...`
    let listed: Vec<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(String::from)
        .collect();
    assert_eq!(listed, kinds(), "docs/MODELS.md's table of kinds");
}

#[test]
fn the_openapi_description_lists_the_kinds_the_code_registers() {
    let spec = std::fs::read_to_string(root().join("openapi.yaml")).unwrap();
    let description = spec
        .split("\n    ModelDescription:")
        .nth(1)
        .expect("openapi.yaml has a ModelDescription schema");
    let after_kind = description
        .split("\n          kind:")
        .nth(1)
        .expect("ModelDescription has a kind property");
    let listed: Vec<String> = after_kind
        .lines()
        .skip_while(|l| l.trim() != "enum:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- ").map(String::from))
        .collect();
    assert_eq!(listed, kinds(), "openapi.yaml's ModelDescription.kind enum");
}

#[test]
fn every_kind_has_a_unique_name() {
    let names = kinds();
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "{names:?}");
}
