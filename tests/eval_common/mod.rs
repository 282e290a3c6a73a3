//! Helpers for the eval tests: a tiny experiment file and a checkpoint to evaluate.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use ulysses::eval::results::{read, EvalResults};
use ulysses::model::llama::ModelWeights;
use ulysses::model::spec::{ModelSpec, Preset};

/// An experiment for the tiny preset with sp = dp = 1 (evals pick their mesh with --sp).
pub fn experiment(dir: &Path, data: &Path) -> PathBuf {
    let toml = format!(
        "[run]\nname = \"eval\"\noutput_dir = \"{}\"\n[model]\npreset = \"tiny\"\n[data]\npaths = [\"{}\"]\nseq_len = 160\n",
        dir.join("runs").display(),
        data.display()
    );
    let path = dir.join("eval.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// A tiny model with random weights, drawn larger than at initialization (std 0.02) so that
/// logits vary from token to token and argmax comparisons mean something.
pub fn random_checkpoint(dir: &Path, seed: i64) -> PathBuf {
    let spec = ModelSpec::preset(Preset::Tiny);
    let w = ModelWeights::init(&spec, seed, tch::Kind::Float, tch::Device::Cpu);
    let named = w
        .named_tensors()
        .into_iter()
        .map(|(n, t)| {
            let t = if n.ends_with("norm.weight") { t } else { t * 10.0 };
            (n, t)
        })
        .collect();
    let w = ModelWeights::from_named(&spec, named).unwrap();
    let out = dir.join(format!("random-{seed}"));
    ulysses::model::weights::save_hf(&w, &spec, &out, 1 << 30).unwrap();
    out
}

pub fn results(path: &Path) -> EvalResults {
    read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
