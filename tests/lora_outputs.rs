//! A LoRA run's outputs (issue 32) against peft 0.21.2 and transformers in the test venv
//! (tests/hf/peft_lora.py), on the tiny Llama and Qwen3 of make_tiny_models.py, trained by real
//! `mpirun -n 2` jobs (sp = 2, CPU, fp32) from the model folders (`model.path`):
//! - `final/` is a PEFT adapter folder (the config peft needs, the tokenizer files) that
//!   `PeftModel.from_pretrained` loads with no warning about keys; peft's loss on the held-out set
//!   is the run's held-out loss (1e-5 relative) and its logits are those of the trained model as
//!   ulysses loads it (`load_weights(final/)`: base + adapters; 1e-4 absolute);
//! - `ulysses export` of the last checkpoint writes the same folder as `final/`;
//! - `ulysses export --merge` equals peft's `merge_and_unload` (every weight, 1e-6), and
//!   transformers on the merged folder gives peft's logits (1e-4);
//! - `ulysses eval --task loss` of `final/` scores the run's held-out loss (1e-5 relative);
//! - a second run that starts from `final/` (`lora.adapter`) and trains on the held-out set has
//!   as its step-1 loss the first run's held-out loss and peft's (1e-5 relative), and so has a
//!   full run whose `model.weights` is `final/` (base + adapters, merged);
//! - bad input (merging without the base or over another model, `--merge` of a full run's
//!   checkpoint, an adapter folder of another model) stops with one clear message.
mod common;
mod model_support;

use common::{assert_clean_failure, column, mpirun, text, ulysses};
use model_support::{assert_close, hf_models, hf_python, positions, venv_python};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use ulysses::data::format::{ShardMeta, ShardWriter};
use ulysses::model::llama::{forward_logits, LocalAttention};
use ulysses::model::spec::ModelSpec;
use ulysses::model::weights::load_hf;

const SEQ: usize = 64;
const STEPS: usize = 3;
const LOSS_REL_TOL: f64 = 1e-5;
const LOGITS_TOL: f64 = 1e-4;
const WEIGHTS_TOL: f64 = 1e-6;
const TEXT: &str = "Long contexts need rotary positions that stretch; the heads come back together. ";

/// The `[model]` lines of a model folder.
fn folder(model: &Path) -> String {
    format!("path = \"{}\"", model.display())
}

/// A shard of `n` byte-token sequences (the text from offsets `first..`) in `dir/name`.
fn shard(dir: &Path, name: &str, first: usize, n: usize) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let meta = ShardMeta {
        vocab_size: 258,
        eos_id: 257,
        tokenizer: "byte".into(),
        tokenizer_source: "built-in".into(),
        task: "text".into(),
    };
    let mut w = ShardWriter::create(&out.join("shard-00000.h5"), SEQ, &meta, false).unwrap();
    let bytes = TEXT.as_bytes();
    for i in first..first + n {
        let seq: Vec<i32> = (0..SEQ).map(|p| i32::from(bytes[(p + 7 * i) % bytes.len()])).collect();
        w.push(&seq, &[]).unwrap();
    }
    w.finish().unwrap();
    out
}

/// The experiment `name`: `model` (its `[model]` lines) with `[lora]` (rank 4, alpha 8, every
/// projection, and `lora_extra`) at sp = 2, or without `[lora]` when `lora_extra` is None; `steps`
/// steps of `micro_batch` sequences.
fn experiment(
    dir: &Path,
    name: &str,
    model: &str,
    data: &Path,
    held_out: Option<&Path>,
    lora_extra: Option<&str>,
    (steps, micro_batch): (usize, usize),
) -> PathBuf {
    let eval = held_out.map_or(String::new(), |h| format!("eval_paths = [\"{}\"]\n", h.display()));
    let eval_every = if held_out.is_some() { format!("eval_every = {steps}\n") } else { String::new() };
    let lora = lora_extra.map_or(String::new(), |extra| format!("[lora]\nrank = 4\nalpha = 8.0\n{extra}\n"));
    let toml = format!(
        "[run]\nname = \"{name}\"\noutput_dir = \"{out}\"\nseed = 7\n[model]\n{model}\n\
         [parallel]\nsp = 2\nzero_stage = 3\n[data]\npaths = [\"{data}\"]\n{eval}seq_len = {SEQ}\nshuffle = false\n\
         [train]\nsteps = {steps}\nmicro_batch = {micro_batch}\nlr = 2e-2\nmin_lr = 2e-3\nwarmup_steps = 1\n\
         {eval_every}[checkpoint]\nevery = 2\nresume = \"none\"\n{lora}",
        out = dir.join("runs").display(),
        data = data.display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

fn train_sp2(exp: &Path, dir: &Path) -> String {
    let o = mpirun(2, &[exp.to_str().unwrap()], dir, &[]);
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

/// tests/hf/peft_lora.py `args`, which must succeed.
fn peft(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    venv_python("peft_lora.py", &args.iter().map(|a| a.as_ref()).collect::<Vec<_>>())
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn get(named: &[(String, Tensor)], name: &str) -> Tensor {
    named.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1.shallow_clone()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// `ulysses export ARGS`, which must succeed.
fn export(args: &[&str], dir: &Path) {
    let o = ulysses(&[&["export"], args].concat(), dir);
    assert!(o.status.success(), "{}", text(&o));
}

fn outputs_match_peft(variant: &str, train_fully: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = hf_models().join(variant);
    let spec = ModelSpec::from_hf_config(&model.join("config.json")).unwrap();
    let (data, held_out) = (shard(d, "train", 0, 6), shard(d, "held-out", 50, 2));
    let full = train_fully.iter().map(|m| format!("\"{m}\"")).collect::<Vec<_>>().join(", ");
    let lora = format!("train_fully = [{full}]");
    let exp = experiment(d, "first", &folder(&model), &data, Some(&held_out), Some(&lora), (STEPS, 1));
    let printed = train_sp2(&exp, d);
    let run_dir = d.join("runs/first");
    let eval_loss = column::<f64>(&run_dir, "eval_loss")[STEPS - 1];
    assert!(eval_loss.is_finite(), "{variant}: held-out loss {eval_loss}");

    // final/: a PEFT folder over the model folder, with its tokenizer.
    let fin = run_dir.join("final");
    assert!(
        printed.contains(&format!("final model: {} (step {STEPS}, the LoRA adapters as a PEFT folder", fin.display())),
        "{printed}"
    );
    let config = json(&fin.join("adapter_config.json"));
    assert_eq!(config["base_model_name_or_path"], model.display().to_string());
    assert_eq!((config["r"].as_i64(), config["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    assert_eq!(config["lora_dropout"].as_f64(), Some(0.0));
    let mut targets: Vec<&str> =
        config["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    targets.sort();
    assert_eq!(targets, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]);
    let modules: Option<Vec<&str>> =
        config["modules_to_save"].as_array().map(|m| m.iter().map(|x| x.as_str().unwrap()).collect());
    assert_eq!(modules.unwrap_or_default(), train_fully.to_vec());
    for file in ["adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(fin.join(file).is_file(), "{variant}: final/ has no {file}");
    }
    assert!(
        !fin.join("config.json").exists(),
        "a PEFT folder has no config.json (transformers would take it for a model)"
    );

    // peft over the base: no key warnings, the run's held-out loss, ulysses' logits.
    let peft_out = d.join("peft.safetensors");
    peft(&[&"load", &model, &fin, &held_out.join("shard-00000.h5"), &peft_out]);
    let theirs = read(&peft_out);
    let peft_loss = get(&theirs, "loss").double_value(&[0]);
    println!("{variant}: held-out loss {eval_loss} vs peft {peft_loss} (rel {:.2e})", rel(eval_loss, peft_loss));
    assert!(rel(eval_loss, peft_loss) <= LOSS_REL_TOL, "{variant}: held-out loss {eval_loss} vs peft's {peft_loss}");
    let ids = get(&theirs, "ids");
    let (b, s) = (ids.size()[0], ids.size()[1]);
    let trained = ulysses::checkpoint::load_weights(&fin, &spec, Kind::Float, Device::Cpu).expect("final/ loads");
    let ours = tch::no_grad(|| forward_logits(&spec, &trained, &ids, &positions(b, 0, s), &LocalAttention));
    assert_close(&format!("{variant}: logits of final/ vs peft"), &ours, &get(&theirs, "logits"), LOGITS_TOL);
    let base = load_hf(&model, &spec, Kind::Float, Device::Cpu).unwrap();
    let untrained = tch::no_grad(|| forward_logits(&spec, &base, &ids, &positions(b, 0, s), &LocalAttention));
    let moved = (&untrained - &ours).abs().max().double_value(&[]);
    assert!(moved > 10.0 * LOGITS_TOL, "{variant}: the adapters changed the logits by only {moved:e}");

    // `export` of the last checkpoint is final/.
    let last = run_dir.join(format!("checkpoints/step-{STEPS:06}"));
    let exported = d.join("exported");
    export(&[last.to_str().unwrap(), "--out", exported.to_str().unwrap()], d);
    assert_eq!(json(&exported.join("adapter_config.json")), config);
    let (a, b) = (read(&exported.join("adapter_model.safetensors")), read(&fin.join("adapter_model.safetensors")));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&get(&b, name)), "{variant}: exported {name} differs from final/'s");
    }

    // `export --merge` is peft's merge_and_unload, and transformers reads it to peft's logits.
    let merged = d.join("merged");
    export(&[last.to_str().unwrap(), "--out", merged.to_str().unwrap(), "--merge"], d);
    let peft_merged = d.join("peft-merged.safetensors");
    peft(&[&"merge", &model, &fin, &peft_merged]);
    let theirs_merged = read(&peft_merged);
    let ours_merged =
        load_hf(&merged, &spec, Kind::Float, Device::Cpu).expect("the merged folder loads").named_tensors();
    for (name, t) in &ours_merged {
        assert_close(&format!("{variant}: merged {name}"), t, &get(&theirs_merged, name), WEIGHTS_TOL);
    }
    assert!(merged.join("tokenizer.json").is_file(), "{variant}: the merged model has no tokenizer");
    let ids_file = d.join("ids.safetensors");
    Tensor::write_safetensors(&[("ids", &ids)], &ids_file).unwrap();
    let hf_out = d.join("merged-logits.safetensors");
    hf_python(&[Path::new("logits"), &merged, &ids_file, &hf_out]);
    assert_close(
        &format!("{variant}: transformers on the merged export vs peft"),
        &get(&read(&hf_out), "logits"),
        &get(&theirs, "logits"),
        LOGITS_TOL,
    );

    // `eval --task loss` of final/: base + adapters, the run's held-out loss.
    let loss_file = d.join("loss.h5");
    let args = ["eval", exp.to_str().unwrap(), "--task", "loss", "--data", held_out.to_str().unwrap()];
    let o = ulysses(
        &[&args[..], &["--checkpoint", fin.to_str().unwrap(), "--out", loss_file.to_str().unwrap()]].concat(),
        d,
    );
    assert!(o.status.success(), "{}", text(&o));
    let Ok(ulysses::eval::results::EvalResults::Loss(curve)) = ulysses::eval::results::read(&loss_file) else {
        panic!("{}: no loss curve", loss_file.display())
    };
    let tokens: i64 = curve.tokens.iter().sum();
    let mean = curve.loss.iter().zip(&curve.tokens).filter(|(_, &n)| n > 0).map(|(l, &n)| l * n as f64).sum::<f64>()
        / tokens as f64;
    assert!(rel(mean, eval_loss) <= LOSS_REL_TOL, "{variant}: eval of final/ {mean} vs the run's {eval_loss}");

    // A second run from final/ (lora.adapter), one step over the held-out set: its loss before
    // any update is the first run's held-out loss.
    let lora = format!("train_fully = [{full}]\nadapter = \"{}\"", fin.display());
    let exp = experiment(d, "second", &folder(&model), &held_out, None, Some(&lora), (1, 2));
    train_sp2(&exp, d);
    let first = column::<f64>(&d.join("runs/second"), "loss")[0];
    println!("{variant}: second run's step-1 loss {first} vs first run's held-out {eval_loss}, peft {peft_loss}");
    assert!(rel(first, eval_loss) <= LOSS_REL_TOL, "{variant}: step-1 loss {first} vs held-out {eval_loss}");
    assert!(rel(first, peft_loss) <= LOSS_REL_TOL, "{variant}: step-1 loss {first} vs peft's {peft_loss}");

    // A full run whose model.weights is final/ starts from base + adapters, merged.
    let weights = format!("config = \"{}\"\nweights = \"{}\"", model.join("config.json").display(), fin.display());
    let exp = experiment(d, "third", &weights, &held_out, None, None, (1, 2));
    train_sp2(&exp, d);
    let first = column::<f64>(&d.join("runs/third"), "loss")[0];
    assert!(rel(first, eval_loss) <= LOSS_REL_TOL, "{variant}: model.weights = final/: {first} vs {eval_loss}");
}

#[test]
fn llama_with_the_lm_head_trained_in_full_outputs_what_peft_loads() {
    outputs_match_peft("untied", &["lm_head"]);
}

/// Tied embeddings trained in full: peft ties its head to them (`ensure_weight_tying`).
#[test]
fn qwen3_with_tied_embeddings_trained_in_full_outputs_what_peft_loads() {
    outputs_match_peft("qwen3-yarn", &["embed_tokens"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

#[test]
fn bad_input_stops_with_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base");
    copy_dir(&hf_models().join("untied"), &base);
    let data = shard(d, "train", 0, 4);
    // model.path relative to the job's working directory: final/ names the base absolutely.
    train_sp2(&experiment(d, "lora", &folder(Path::new("base")), &data, None, Some(""), (2, 1)), d);
    train_sp2(&experiment(d, "full", &folder(&base), &data, None, None, (2, 1)), d);
    let (lora_ckpt, fin) = (d.join("runs/lora/checkpoints/step-000002"), d.join("runs/lora/final"));
    let named = json(&fin.join("adapter_config.json"))["base_model_name_or_path"].clone();
    let named = PathBuf::from(named.as_str().unwrap());
    assert!(named.is_absolute() && named.canonicalize().unwrap() == base.canonicalize().unwrap(), "{named:?}");
    let out = d.join("out");
    let export = |what: &Path, merge: bool| {
        let mut args = vec!["export", what.to_str().unwrap(), "--out", out.to_str().unwrap()];
        if merge {
            args.push("--merge");
        }
        assert_clean_failure(&ulysses(&args, d))
    };

    let t = export(&d.join("runs/full/checkpoints/step-000002"), true);
    assert!(t.contains("holds a whole model, not LoRA adapters") && t.contains("without --merge"), "{t}");
    let t = export(&fin, false);
    assert!(t.contains("is a PEFT adapter folder already") && t.contains("--merge"), "{t}");

    // An adapter folder of another model, as a run's starting point.
    let qwen3 = hf_models().join("qwen3");
    let lora = format!("adapter = \"{}\"", fin.display());
    let exp = experiment(d, "other", &folder(&qwen3), &data, None, Some(&lora), (1, 1));
    let t = assert_clean_failure(&mpirun(2, &[exp.to_str().unwrap()], d, &[]));
    assert!(t.contains("lora.adapter") && t.contains("belongs to another model"), "{t}");

    // The base gone: merging names it and the field it came from.
    std::fs::rename(&base, d.join("moved")).unwrap();
    let t = export(&lora_ckpt, true);
    let shown = base.display().to_string();
    assert!(t.contains("model.path = \"base\", which does not exist"), "{t}");
    let t = export(&fin, true);
    assert!(t.contains(&format!("base_model_name_or_path = \"{shown}\", which is no folder or file here")), "{t}");
    assert!(!out.exists(), "nothing written");

    // Another model where the base was.
    copy_dir(&qwen3, &base);
    let t = export(&lora_ckpt, true);
    assert!(t.contains("holds LoRA adapters of llama") && t.contains("is now qwen3"), "{t}");
    let t = export(&fin, true);
    assert!(t.contains("belongs to another model"), "{t}");
    let exp = experiment(d, "lora", &folder(&hf_models().join("untied")), &data, None, Some(""), (2, 1));
    let args = ["eval", exp.to_str().unwrap(), "--task", "loss", "--data", data.to_str().unwrap()];
    let t = assert_clean_failure(&ulysses(&[&args[..], &["--checkpoint", lora_ckpt.to_str().unwrap()]].concat(), d));
    assert!(t.contains("is now qwen3") && t.contains(&lora_ckpt.display().to_string()), "{t}");
}
