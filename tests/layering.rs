//! The layering of src/ (docs/architecture.md), enforced on the source text: which top-level
//! module may import which (so no upward import comes back); the model knows nothing of
//! communication, parallelism or the training loop; the plain-data layers (config, data,
//! model::spec, the plan, units, layout, rng) never touch libtorch; and every declaration of a C++
//! shim function lives in src/ffi. A violation names the file, the line and the rule.
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn src(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(rel)
}

/// Lines of the files under `paths` (relative to src/) that mention any of `forbidden`, outside
/// comments.
fn violations(paths: &[&str], forbidden: &[&str]) -> Vec<String> {
    violations_in(&src(""), paths, forbidden)
}

fn violations_in(base: &Path, paths: &[&str], forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for p in paths {
        let root = base.join(p);
        let files = if root.is_dir() { rust_files(&root) } else { vec![root] };
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (i, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for f in forbidden {
                    if code.contains(f) {
                        found.push(format!("{}:{}: `{f}` in {:?}", file.display(), i + 1, line.trim()));
                    }
                }
            }
        }
    }
    found
}

/// Each top-level module of src/ and the modules of the crate it may import; anything else is an
/// upward (or sideways) import. The loop (`train`) sits on top; `eval` and `report` beside it
/// never import it; `checkpoint` and `metrics` are the run's products, below the loop; `plan` is
/// arithmetic on plain data.
const MAY_IMPORT: &[(&str, &[&str])] = &[
    (
        "train",
        &[
            "checkpoint",
            "comm",
            "config",
            "data",
            "ffi",
            "files",
            "metrics",
            "model",
            "oom",
            "optim",
            "parallel",
            "plan",
            "units",
        ],
    ),
    (
        "eval",
        &[
            "checkpoint",
            "comm",
            "config",
            "data",
            "files",
            "h5",
            "launch",
            "layout",
            "metrics",
            "model",
            "parallel",
            "rng",
        ],
    ),
    ("report", &["checkpoint", "eval", "files", "h5", "metrics", "units"]),
    ("launch", &["comm", "ffi", "h5", "oom", "parallel"]),
    (
        "checkpoint",
        &["comm", "config", "data", "ffi", "files", "metrics", "model", "oom", "parallel", "plan", "units", "versions"],
    ),
    ("metrics", &["comm", "config", "data", "ffi", "files", "h5", "units", "versions"]),
    // parallel and optim are one layer: the ZeRO shards run AdamW, AdamW walks the shards.
    ("parallel", &["comm", "config", "data", "ffi", "layout", "model", "optim", "plan"]),
    ("optim", &["comm", "config", "ffi", "parallel", "plan"]),
    ("model", &["config", "data", "files", "rng"]),
    ("comm", &["ffi", "files", "layout"]),
    ("ffi", &["config", "model"]),
    ("plan", &["config", "data", "layout", "model", "units"]),
    ("data", &["h5", "layout", "rng"]),
    ("config", &["data", "model"]),
    ("files", &[]),
    ("oom", &[]),
    ("h5", &[]),
    ("layout", &[]),
    ("rng", &[]),
    ("units", &[]),
    ("versions", &[]),
];

/// `crate::NAME` paths in `text` outside comments, with their line numbers.
fn crate_imports(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for piece in code.split("crate::").skip(1) {
            let name: String = piece.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            found.push((i + 1, name));
        }
    }
    found
}

fn direction_violations(base: &Path, table: &[(&str, &[&str])]) -> Vec<String> {
    let mut found = Vec::new();
    for (module, allowed) in table {
        let dir = base.join(module);
        let files = if dir.is_dir() { rust_files(&dir) } else { vec![base.join(format!("{module}.rs"))] };
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            for (line, name) in crate_imports(&text) {
                if name != *module && !allowed.contains(&name.as_str()) {
                    found.push(format!("{}:{line}: {module} imports crate::{name}", file.display()));
                }
            }
        }
    }
    found
}

#[test]
fn modules_import_only_downward() {
    let v = direction_violations(&src(""), MAY_IMPORT);
    assert!(
        v.is_empty(),
        "imports against the layering (tests/layering.rs MAY_IMPORT, docs/architecture.md):\n{}",
        v.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_direction() {
    // A new module must be placed in the table, or its imports would go unchecked.
    let lib = std::fs::read_to_string(src("lib.rs")).unwrap();
    let declared: Vec<&str> =
        lib.lines().filter_map(|l| l.strip_prefix("pub mod ").and_then(|r| r.strip_suffix(';'))).collect();
    assert!(declared.len() > 10, "{declared:?}");
    for m in declared {
        assert!(MAY_IMPORT.iter().any(|(name, _)| *name == m), "src/{m} has no row in MAY_IMPORT");
    }
}

#[test]
fn the_direction_check_would_catch_an_upward_import() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("plan")).unwrap();
    let text = "use crate::config::X; // crate::train in a comment\nuse crate::train::flops;\n";
    std::fs::write(dir.path().join("plan/check.rs"), text).unwrap();
    let hits = direction_violations(dir.path(), &[("plan", &["config"])]);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(hits[0].contains("check.rs:2: plan imports crate::train"), "{hits:?}");
}

#[test]
fn the_model_imports_no_communication_parallelism_or_training() {
    let v = violations(&["model"], &["crate::comm", "crate::parallel", "crate::train", "crate::launch"]);
    assert!(v.is_empty(), "model/ must reach parallelism only through its seams:\n{}", v.join("\n"));
}

#[test]
fn plain_data_layers_do_not_touch_libtorch() {
    let plain = ["config", "data", "model/spec", "plan", "units.rs", "layout.rs", "rng.rs", "h5.rs"];
    let v = violations(&plain, &["tch::", "use tch", "torch_sys", "crate::ffi"]);
    assert!(v.is_empty(), "these layers are plain data (no libtorch):\n{}", v.join("\n"));
}

#[test]
fn shim_declarations_live_in_ffi() {
    let all: Vec<String> = rust_files(&src(""))
        .into_iter()
        .filter(|f| !f.starts_with(src("ffi")))
        .map(|f| f.strip_prefix(src("")).unwrap().display().to_string())
        .collect();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let v = violations(&refs, &["extern \"C\""]);
    assert!(v.is_empty(), "every extern \"C\" block of the shim belongs in src/ffi:\n{}", v.join("\n"));
}

#[test]
fn the_checks_would_catch_a_violation() {
    // The scanner itself: a forbidden token in code is found, the same token in a comment is not.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("model")).unwrap();
    std::fs::write(dir.path().join("model/x.rs"), "// crate::comm in a comment\nuse crate::comm::Groups;\n").unwrap();
    let hits = violations_in(dir.path(), &["model"], &["crate::comm"]);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(hits[0].contains("x.rs:2"), "{hits:?}");
}
