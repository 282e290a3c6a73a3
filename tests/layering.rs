//! The layering of src/ (docs/architecture.md), enforced on the source text: the model knows
//! nothing of communication, parallelism or the training loop; the plain-data layers (config,
//! data, model::spec, the plan, units, layout, rng) never touch libtorch; and every declaration of
//! a C++ shim function lives in src/ffi. A violation names the file, the line and the rule.
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
