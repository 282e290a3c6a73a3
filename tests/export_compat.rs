//! Exports load in older transformers: every safetensors file ulysses writes carries
//! `__metadata__ = {"format": "pt"}` (transformers before 4.47 reads it and failed on our files
//! with `'NoneType' object has no attribute 'get'`). A run's `final/` is loaded by transformers
//! 4.46 (a venv of its own, tests/compat/venv.sh) and by the test venv's, with the same logits.
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;
use std::path::Path;
use std::process::Command;

/// What tests/compat/load_export.py prints for `model` under `python`.
fn load(python: &Path, model: &Path) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(python).arg(root.join("tests/compat/load_export.py")).arg(model).output().unwrap();
    assert!(o.status.success(), "{}: {}", python.display(), text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn an_export_loads_in_transformers_4_46_as_in_the_current_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new("bash")
        .arg(root.join("tests/compat/venv.sh"))
        .arg(root.join("tests/compat/transformers-4.46.txt"))
        .output()
        .unwrap();
    assert!(o.status.success(), "making the transformers 4.46 venv: {}", text(&o));
    let old_python = String::from_utf8_lossy(&o.stdout).trim().to_string();

    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("compat", 1, 1, 2, 2);
    exp.train(dir, &data);
    let model = exp.run_dir(dir).join("final");

    let old = load(Path::new(&old_python), &model);
    let new = load(Path::new(PYTHON), &model);
    assert!(old["version"].as_str().unwrap().starts_with("4.46."), "{}", old["version"]);
    assert!(!new["version"].as_str().unwrap().starts_with("4.46."), "{}", new["version"]);
    for got in [&old, &new] {
        let files = got["metadata"].as_object().unwrap();
        assert!(!files.is_empty(), "{got}");
        for (file, metadata) in files {
            assert_eq!(metadata, &serde_json::json!({ "format": "pt" }), "{file}");
        }
    }
    let logits = |v: &serde_json::Value| -> Vec<f64> {
        v["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let (a, b) = (logits(&old), logits(&new));
    assert_eq!(a.len(), b.len());
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f64::max);
    assert!(worst < 1e-5, "transformers 4.46 and the current one disagree by {worst:.2e}");
}
