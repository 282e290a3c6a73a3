//! Every family trains as Llama does: for Qwen3 (q/k norms, head_dim 24 ≠ hidden / heads), Qwen2
//! (q/k/v biases, tied embeddings, YaRN) and Mistral, tiny random models made by transformers
//! (tests/hf/make_tiny_models.py) are trained from their folder (`[model] path`) by the binary
//! under mpirun at sp = 1, 2 and 4 (2 KV heads, so sp = 4 replicates them), ZeRO-3, CPU fp32:
//! - the single-rank run equals the readable reference trainer (`train::reference`) started from
//!   the same weights: the layer-wise recompute across the segments is exact for each family;
//! - sp = 2 and 4 equal sp = 1 (loss 1e-6 relative, parameters 1e-5): the norms and biases are
//!   applied before the all-to-all exactly as unsharded;
//! - the final checkpoint loads in transformers (AutoModelForCausalLM) with our logits and loss,
//!   its config.json is the input config with only the dtype changed, and its tokenizer (copied
//!   from the model folder) loads with AutoTokenizer.
//!
//! And a run whose model folder has no tokenizer carries the tokenizer.json the data was prepared
//! with.
//!
//! Adam's eps is 1e-6 here, not 1e-8: a k bias has an exactly zero gradient (adding a vector to
//! every key adds the same number to each score of a query, which softmax ignores), and so has a
//! q/k-normed projection along each head's own direction (the norm undoes any scaling). Adam
//! divides by the gradient's running RMS, so at eps 1e-8 it turns the fp32 rounding noise of
//! those gradients, which differs with each layout's summation order, into updates of size lr
//! (up to 1e-3 apart); at 1e-6 that noise moves them by about 1e-6, while every gradient that
//! exists (1e-4 and up here) is followed as before.
mod common;
mod model_support;

use common::*;
use model_support::{hf_models, hf_python, max_abs_diff, positions};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use ulysses::config::Experiment;
use ulysses::model::llama::{forward_logits, LocalAttention};
use ulysses::model::spec::ModelSpec;
use ulysses::model::weights::load_hf;

/// The shortest sequence the test needs: divisible by sp = 4, long enough that every rank's chunk
/// attends across earlier ranks' tokens.
const SEQ: usize = 32;
const STEPS: usize = 3;

/// English text through the built-in byte tokenizer (258 ids < the models' 300): learnable, so
/// the loss falls within the few steps the runs take.
fn text_data(dir: &Path, tokenizer: &str) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, "The quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let out = dir.join("data");
    let args = ["data", "prepare", corpus.to_str().unwrap(), "--tokenizer", tokenizer];
    let o = ulysses(&[&args[..], &["--seq-len", &SEQ.to_string(), "--out", out.to_str().unwrap()]].concat(), dir);
    assert!(o.status.success(), "{}", text(&o));
    out
}

fn experiment(dir: &Path, name: &str, model: &str, data: &Path, sp: usize, steps: usize) -> PathBuf {
    let toml = format!(
        r#"[run]
name = "{name}"
output_dir = "{out}"
seed = 11
[model]
{model}
[parallel]
sp = {sp}
zero_stage = 3
[data]
paths = ["{data}"]
seq_len = {SEQ}
[train]
steps = {steps}
lr = 1e-3
min_lr = 1e-4
warmup_steps = 1
weight_decay = 0.1
clip_grad_norm = 0.5
eps = 1e-6
[checkpoint]
resume = "none"
[metrics]
position_bins = 8
"#,
        out = dir.join("runs").display(),
        data = data.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

fn train(dir: &Path, exp: &Path, ranks: usize) -> PathBuf {
    let out = mpirun(ranks, &[exp.to_str().unwrap()], dir, &[]);
    assert!(out.status.success(), "{}", text(&out));
    dir.join("runs").join(exp.file_stem().unwrap())
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Our logits and loss (labels = ids) of the checkpoint `dir` on `ids`.
fn our_logits_and_loss(dir: &Path, ids: &Tensor) -> (Tensor, f64) {
    let spec = ModelSpec::from_hf_config(&dir.join("config.json")).unwrap();
    let w = load_hf(dir, &spec, Kind::Float, Device::Cpu).unwrap();
    let (b, s) = (ids.size()[0], ids.size()[1]);
    let logits = tch::no_grad(|| forward_logits(&spec, &w, ids, &positions(b, 0, s), &LocalAttention));
    let (pred, target) =
        (logits.narrow(1, 0, s - 1).reshape([-1, spec.vocab_size]), ids.narrow(1, 1, s - 1).reshape([-1]));
    (logits, pred.cross_entropy_for_logits(&target).double_value(&[]))
}

fn family_trains_like_llama(variant: &str) {
    let hf = hf_models().join(variant);
    let dir = tempfile::tempdir().unwrap();
    let data = text_data(dir.path(), "byte");
    let model = format!("path = {:?}", hf.display().to_string());
    let runs: Vec<(usize, PathBuf)> = [1, 2, 4]
        .into_iter()
        .map(|sp| {
            let exp = experiment(dir.path(), &format!("{variant}-sp{sp}"), &model, &data, sp, STEPS);
            (sp, train(dir.path(), &exp, sp))
        })
        .collect();
    let single = run_outputs(&runs[0].1);
    assert_eq!(single.0.len(), STEPS);

    // The single-rank run is the reference trainer, from the model folder's weights.
    let exp = Experiment::load(&dir.path().join(format!("{variant}-sp1.toml"))).unwrap();
    let spec = ulysses::config::validate(&exp, Some(1)).unwrap();
    let initial = load_hf(&hf, &spec, Kind::Float, Device::Cpu).unwrap().named_tensors();
    assert_same_run(&format!("{variant}: reference trainer vs sp=1"), &reference_run(&exp, initial), &single);
    for (sp, run) in &runs[1..] {
        assert_same_run(&format!("{variant}: sp={sp} vs sp=1"), &single, &run_outputs(run));
    }

    // The final checkpoint is a Hugging Face model folder transformers serves.
    let final_dir = runs[0].1.join("final");
    let (mut before, after) = (json(&hf.join("config.json")), json(&final_dir.join("config.json")));
    before["torch_dtype"] = "float32".into();
    before["dtype"] = "float32".into();
    assert_eq!(before, after, "{variant}: config.json written back changed beyond the dtype");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        let (a, b) = (std::fs::read(hf.join(f)).unwrap(), std::fs::read(final_dir.join(f)));
        assert_eq!(Some(a), b.ok(), "{variant}: {f} not carried into the checkpoint");
    }
    let ids = Tensor::randint(300, [2, 40], (Kind::Int64, Device::Cpu));
    let ids_file = dir.path().join("ids.safetensors");
    Tensor::write_safetensors(&[("ids", &ids)], &ids_file).unwrap();
    let hf_file = dir.path().join("hf.safetensors");
    hf_python(&[Path::new("logits"), &final_dir, &ids_file, &hf_file]);
    let tok = hf_python(&[Path::new("tokenizer"), &final_dir]);
    assert!(tok.contains(&format!("\"model_type\": \"{}\"", spec.family.model_type())), "{variant}: {tok}");
    let hf_out = Tensor::read_safetensors(&hf_file).unwrap();
    let get = |n: &str| hf_out.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let (logits, loss) = our_logits_and_loss(&final_dir, &ids);
    let diff = max_abs_diff(&logits, &get("logits"));
    let hf_loss = get("loss").double_value(&[0]);
    println!("{variant}: trained checkpoint in transformers: logits diff {diff:e}, loss {hf_loss} vs ours {loss}");
    assert!(diff <= 1e-4, "{variant}: transformers' logits on our checkpoint differ by {diff:e}");
    assert!((hf_loss - loss).abs() <= 1e-5 * loss, "{variant}: transformers' loss {hf_loss} vs ours {loss}");
}

#[test]
fn qwen3_trains_like_llama_and_serves_in_transformers() {
    family_trains_like_llama("qwen3");
}

#[test]
fn qwen2_trains_like_llama_and_serves_in_transformers() {
    family_trains_like_llama("qwen2");
}

#[test]
fn mistral_trains_like_llama_and_serves_in_transformers() {
    family_trains_like_llama("mistral");
}

/// A model named by its config.json alone (random weights, no tokenizer beside it) on data
/// prepared with a tokenizer.json: the checkpoint carries that tokenizer, byte for byte, with the
/// tokenizer files next to it, and AutoTokenizer loads it.
#[test]
fn checkpoints_carry_the_tokenizer_the_data_was_prepared_with() {
    let hf = hf_models().join("qwen3");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("model/config.json");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::copy(hf.join("config.json"), &config).unwrap();
    let tok_dir = dir.path().join("tok");
    std::fs::create_dir_all(&tok_dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(hf.join(f), tok_dir.join(f)).unwrap();
    }
    let data = text_data(dir.path(), tok_dir.join("tokenizer.json").to_str().unwrap());
    let model = format!("config = {:?}", config.display().to_string());
    let exp = experiment(dir.path(), "prepared", &model, &data, 1, 1);
    let o = ulysses(&[exp.to_str().unwrap()], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("checkpoints carry the tokenizer files of {}", tok_dir.display())),
        "{}",
        text(&o)
    );
    let final_dir = dir.path().join("runs/prepared/final");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(tok_dir.join(f)).unwrap(), std::fs::read(final_dir.join(f)).unwrap(), "{f}");
    }
    assert!(!final_dir.join("generation_config.json").exists(), "nothing is invented");
    let tok = hf_python(&[Path::new("tokenizer"), &final_dir]);
    assert!(tok.contains("\"model_type\": \"qwen3\""), "{tok}");
}
