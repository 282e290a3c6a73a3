//! Helpers shared by the tests/model_*.rs binaries (each uses a subset).
#![allow(dead_code)]
use tch::{Kind, Tensor};
use ulysses::model::llama::{LayerWeights, ModelWeights};
use ulysses::model::spec::{ModelSpec, Preset};

/// The `tiny` preset, optionally with tied embeddings.
pub fn tiny(tied: bool) -> ModelSpec {
    let mut spec = ModelSpec::preset(Preset::Tiny);
    spec.tie_word_embeddings = tied;
    spec
}

/// Random fp32 weights scaled so activations and logits are O(1) (the 0.02 init makes them tiny,
/// where a wrong gradient can hide under any tolerance), with norm weights away from 1.
pub fn scaled_weights(spec: &ModelSpec, seed: i64) -> ModelWeights {
    let w = ModelWeights::init(spec, seed, Kind::Float, tch::Device::Cpu);
    tch::manual_seed(seed);
    let named = w
        .named_tensors()
        .into_iter()
        .map(|(name, t)| {
            let t = if t.dim() == 1 {
                &t + Tensor::randn_like(&t) * 0.2
            } else if name == "model.embed_tokens.weight" && !spec.tie_word_embeddings {
                t / 0.02
            } else {
                &t / (0.02 * (t.size()[1] as f64).sqrt())
            };
            (name, t)
        })
        .collect();
    ModelWeights::from_named(spec, named).expect("valid weights")
}

/// Every weight of `w` becomes a leaf that requires grad, in `named_tensors()` order.
pub fn leaves(w: &ModelWeights) -> Vec<(String, Tensor)> {
    w.named_tensors().into_iter().map(|(n, t)| (n, t.detach().set_requires_grad(true))).collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a - b).abs().max().double_value(&[])
}

pub fn max_abs(a: &Tensor) -> f64 {
    a.abs().max().double_value(&[])
}

/// Asserts |a - b| <= tol * (1 + max|b|), naming `what`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let (diff, scale) = (max_abs_diff(a, b), max_abs(b));
    assert!(diff <= tol * (1.0 + scale), "{what}: max abs diff {diff:e} (max |reference| {scale:e}, tol {tol:e})");
}

/// Global positions [b, s] = start..start+s for every row.
pub fn positions(b: i64, start: i64, s: i64) -> Tensor {
    Tensor::arange_start(start, start + s, (Kind::Int64, tch::Device::Cpu)).unsqueeze(0).expand([b, s], false)
}

/// Layer `i` of `w` with every tensor a leaf that requires grad.
pub fn layer_leaves(spec: &ModelSpec, w: &ModelWeights, i: usize) -> LayerWeights {
    let named =
        w.layers[i].tensors().into_iter().map(|(n, t)| (n.to_string(), t.detach().set_requires_grad(true))).collect();
    LayerWeights::from_tensors(spec, named).expect("layer tensors")
}

/// Runs tests/hf/make_tiny_models.py with `args` in the project venv; its stdout. Fails the test
/// (nothing is skipped) when the venv or transformers is missing or the script fails.
pub fn hf_python(args: &[&std::path::Path]) -> String {
    venv_python("make_tiny_models.py", &args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>())
}

/// Runs tests/hf/`script` with `args` in the project venv; its stdout. Fails the test (nothing is
/// skipped) when the venv or the packages are missing or the script fails.
pub fn venv_python(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python3");
    let script = root.join("tests/hf").join(script);
    let out = std::process::Command::new(&python).arg(&script).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {}: {e}. These tests need the project venv: run scripts/setup.sh", python.display())
    });
    assert!(
        out.status.success(),
        "{} {} {:?} failed ({}):\n{}\n{}",
        python.display(),
        script.display(),
        args,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The tiny transformers models of every family and variant (`make_tiny_models.py make`), built
/// once per test binary.
pub fn hf_models() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        hf_python(&[std::path::Path::new("make"), dir.path()]);
        dir
    })
    .path()
}
