//! LoRA against peft (tests/hf/peft_lora.py, on the tiny models of make_tiny_models.py): the same
//! initial adapter on a tiny Llama and a tiny Qwen3 gives peft's step-1 loss and every adapter
//! gradient (and the LM head's when it trains in full); an adapter trained here and written as a
//! PEFT folder loads in `PeftModel.from_pretrained` to the same logits; merging gives peft's
//! `merge_and_unload` weights. With `lora.dropout` > 0, peft's forward with its dropout modules
//! drawing ulysses' masks (peft_lora.py reimplements the documented formula of
//! src/model/dropout.rs) gives the same loss and adapter gradients. Bad input (an adapter of another model, rank 0, a target the model
//! does not have, a dropout outside [0, 1)) gives one clear message. Nothing is skipped: without peft in the venv
//! these tests fail.
mod model_support;

use model_support::{assert_close, hf_models, positions};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use ulysses::config::{validate, Experiment, FullModule, LoraConfig, LoraTarget};
use ulysses::model::llama::{forward_logits, LocalAttention, IGNORE_INDEX};
use ulysses::model::lora;
use ulysses::model::spec::adapter::{check_adapter, peft_key};
use ulysses::model::spec::ModelSpec;
use ulysses::model::weights::load_hf;
use ulysses::optim::AdamW;
use ulysses::train::reference::Reference;
use ulysses::train::step::MicroBatch;

const LOSS_REL_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-5;
const LOGITS_TOL: f64 = 1e-4;
/// The run seed, optimizer step and probability of the dropout cases (peft_lora.py make-dropout
/// draws the same masks from them).
const SEED: u64 = 21;
const STEP: u64 = 3;
const DROPOUT: f64 = 0.2;

fn peft(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python3");
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(root.join("tests/hf/peft_lora.py"));
    for a in args {
        cmd.arg(a);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}; run scripts/setup.sh", python.display()));
    assert!(
        out.status.success(),
        "peft_lora.py failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn get(named: &[(String, Tensor)], name: &str) -> Tensor {
    named.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1.shallow_clone()
}

fn lora_config(full: &[FullModule]) -> LoraConfig {
    LoraConfig { rank: 4, alpha: 8.0, train_fully: full.to_vec(), ..LoraConfig::default() }
}

/// A tiny model with peft's adapter (random A and B) on it, and peft's loss and gradients.
struct Case {
    spec: ModelSpec,
    base: Vec<(String, Tensor)>,
    lora: LoraConfig,
    out: tempfile::TempDir,
}

impl Case {
    fn new(variant: &str, seed: u64, full: &[FullModule]) -> Case {
        let names: Vec<&str> = full.iter().map(|m| m.peft_name()).collect();
        Case::made(variant, &["make", &seed.to_string(), &names.join(",")], lora_config(full))
    }

    /// With `DROPOUT` on every adapter's input, peft's masks drawn as ulysses draws them.
    fn with_dropout(variant: &str, seed: u64) -> Case {
        let args = ["make-dropout", &seed.to_string(), &DROPOUT.to_string(), &SEED.to_string(), &STEP.to_string()];
        Case::made(variant, &args, LoraConfig { dropout: DROPOUT, ..lora_config(&[]) })
    }

    /// peft_lora.py `command MODEL OUT args..` on the tiny model `variant`.
    fn made(variant: &str, args: &[&str], lora: LoraConfig) -> Case {
        let dir = hf_models().join(variant);
        let out = tempfile::tempdir().expect("temp dir");
        let out_dir = out.path().to_path_buf();
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&args[0], &dir, &out_dir];
        all.extend(args[1..].iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        peft(&all);
        let spec = ModelSpec::from_hf_config(&dir.join("config.json")).expect("config.json");
        let base = load_hf(&dir, &spec, Kind::Float, Device::Cpu).expect("load_hf").named_tensors();
        Case { spec, base, lora, out }
    }

    fn model_dir(&self, variant: &str) -> PathBuf {
        hf_models().join(variant)
    }

    fn adapter(&self) -> PathBuf {
        self.out.path().join("adapter")
    }

    fn peft_grads(&self) -> Vec<(String, Tensor)> {
        read(&self.out.path().join("grads.safetensors"))
    }

    fn reference(&self) -> Reference {
        let trainable = lora::load_peft(&self.adapter(), &self.spec, &self.lora).expect("load the PEFT adapter");
        let base = self.base.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        Reference::with_lora(&self.spec, &self.lora, SEED, base, trainable)
    }

    /// peft's ids with transformers' shifted labels (the last position has none), rows of
    /// samples 0, 1, .. in optimizer step `STEP`.
    fn batch(&self) -> MicroBatch {
        let ids = get(&self.peft_grads(), "ids");
        let (b, s) = (ids.size()[0], ids.size()[1]);
        let labels =
            Tensor::cat(&[ids.narrow(1, 1, s - 1), Tensor::full([b, 1], IGNORE_INDEX, (Kind::Int64, Device::Cpu))], 1);
        MicroBatch { step: STEP, ..MicroBatch::unpacked(ids, labels, positions(b, 0, s).copy()) }
    }
}

fn same_loss_and_grads(variant: &str, seed: u64, full: &[FullModule]) {
    same_as_peft(variant, &Case::new(variant, seed, full));
}

/// The reference's loss and adapter gradients on `case` equal peft's; returns the loss.
fn same_as_peft(variant: &str, case: &Case) -> f64 {
    let reference = case.reference();
    let (loss, grads) = reference.loss_and_grads(&[case.batch()]);
    let theirs = case.peft_grads();
    let peft_loss = get(&theirs, "loss").double_value(&[0]);
    let rel = (loss - peft_loss).abs() / peft_loss.abs();
    println!("{variant}: loss {loss} vs peft {peft_loss} (rel {rel:e})");
    assert!(rel <= LOSS_REL_TOL, "{variant}: loss {loss} vs peft {peft_loss}: rel {rel:e}");
    assert_eq!(grads.len() + 2, theirs.len(), "one gradient per trainable tensor (+ ids, loss)");
    for ((name, _), g) in reference.named().iter().zip(&grads) {
        assert!(g.abs().max().double_value(&[]) > 0.0, "{variant}: {name} got no gradient");
        assert_close(&format!("{variant}: gradient of {name}"), g, &get(&theirs, &peft_key(name)), GRAD_TOL);
    }
    loss
}

/// PEFT's dropout semantics (the adapter sees `dropout(x)`, kept values scaled 1/(1-p), the base
/// x) with ulysses' masks: peft's loss and adapter gradients. The masks drop something: the same
/// adapters without dropout give another loss.
#[test]
fn dropout_matches_peft_drawing_the_same_masks() {
    for (variant, seed) in [("untied", 16), ("qwen3", 17)] {
        let case = Case::with_dropout(variant, seed);
        let dropped = same_as_peft(variant, &case);
        let batch = case.batch();
        let plain = Case { lora: lora_config(&[]), ..case }.reference().loss_and_grads(&[batch]).0;
        assert!((dropped - plain).abs() > 1e-4 * plain, "{variant}: dropout changes the loss: {dropped} vs {plain}");
    }
}

#[test]
fn llama_step_one_loss_and_adapter_gradients_match_peft() {
    same_loss_and_grads("untied", 11, &[]);
}

#[test]
fn qwen3_step_one_loss_and_adapter_gradients_match_peft() {
    same_loss_and_grads("qwen3", 12, &[]);
}

#[test]
fn lm_head_trained_in_full_matches_peft_modules_to_save() {
    same_loss_and_grads("untied", 13, &[FullModule::LmHead]);
}

/// Trains the adapter a few steps here, writes it as a PEFT folder, and has peft load it.
#[test]
fn trained_adapter_reloads_in_peft_with_the_same_logits_and_merges_like_peft() {
    let variant = "qwen3";
    let case = Case::new(variant, 14, &[]);
    let mut reference = case.reference();
    let batch = case.batch();
    let before: Vec<Tensor> = reference.named().iter().map(|(_, t)| t.detach().copy()).collect();
    for _ in 0..3 {
        reference.step(
            std::slice::from_ref(&batch),
            &AdamW { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 },
            1e-2,
            1.0,
        );
    }
    let moved = reference.named().iter().zip(&before).any(|((_, t), b)| (t - b).abs().max().double_value(&[]) > 1e-4);
    assert!(moved, "three steps at lr 1e-2 must move the adapters");
    let out = tempfile::tempdir().expect("temp dir");
    let adapter = out.path().join("trained");
    lora::save_peft(&adapter, &case.spec, &case.lora, reference.named(), Kind::Float, "tiny").expect("save_peft");
    check_adapter(&adapter, &case.spec, &case.lora).expect("our own adapter passes our check");

    let ids_file = out.path().join("ids.safetensors");
    Tensor::write_safetensors(&[("ids", &batch.input_ids)], &ids_file).expect("ids");
    let logits_file = out.path().join("logits.safetensors");
    peft(&[&"logits", &case.model_dir(variant), &adapter, &ids_file, &logits_file]);
    let (b, s) = (batch.input_ids.size()[0], batch.input_ids.size()[1]);
    let ours = tch::no_grad(|| {
        forward_logits(&case.spec, &reference.weights(), &batch.input_ids, &positions(b, 0, s), &LocalAttention)
    });
    let theirs = get(&read(&logits_file), "logits");
    let diff = (&ours - &theirs).abs().max().double_value(&[]);
    println!("trained adapter: max abs logits diff vs peft = {diff:e}");
    assert!(diff <= LOGITS_TOL, "logits differ from peft's by {diff:e}");

    let merged_file = out.path().join("merged.safetensors");
    peft(&[&"merge", &case.model_dir(variant), &adapter, &merged_file]);
    let mut merged = reference.weights();
    lora::merge(&mut merged);
    let theirs = read(&merged_file);
    for (name, t) in merged.named_tensors() {
        assert_close(&format!("merged {name}"), &t, &get(&theirs, &name), 1e-6);
    }
}

#[test]
fn an_adapter_of_another_model_is_refused_with_one_clear_message() {
    let case = Case::new("qwen3", 15, &[]);
    let llama = ModelSpec::from_hf_config(&hf_models().join("untied").join("config.json")).expect("config");
    let problems = check_adapter(&case.adapter(), &llama, &case.lora).expect_err("a Qwen3 adapter on a Llama");
    let text = problems.join("\n");
    assert!(text.contains("belongs to another model") && text.contains("adapter_model.safetensors"), "{text}");
    // The same through the experiment's validation, named by its TOML path.
    let toml = format!(
        "[model]\npath = \"{}\"\n[data]\npaths = [\"x\"]\nseq_len = 64\n[lora]\nrank = 4\nalpha = 8.0\nadapter = \"{}\"\n",
        hf_models().join("untied").display(),
        case.adapter().display()
    );
    let exp = Experiment::parse(&toml, "exp.toml").expect("parses");
    let errors: Vec<String> = validate(&exp, None).expect_err("invalid").iter().map(|p| p.to_string()).collect();
    assert!(errors.iter().any(|e| e.starts_with("lora.adapter: ") && e.contains("another model")), "{errors:?}");
    // A rank that differs from the adapter's is named with both values.
    let exp = Experiment::parse(&toml.replace("rank = 4", "rank = 8"), "exp.toml").expect("parses");
    let errors: Vec<String> = validate(&exp, None).expect_err("invalid").iter().map(|p| p.to_string()).collect();
    assert!(errors.iter().any(|e| e.contains("r = 4 but lora.rank = 8")), "{errors:?}");
}

#[test]
fn bad_lora_sections_name_the_field_and_what_is_valid() {
    let base = "[model]\npreset = \"tiny\"\n[data]\npaths = [\"x\"]\nseq_len = 64\n[lora]\n";
    let problems = |extra: &str| -> Vec<String> {
        let exp = Experiment::parse(&format!("{base}{extra}"), "exp.toml").expect("parses");
        validate(&exp, None).expect_err("invalid").iter().map(|p| p.to_string()).collect()
    };
    let p = problems("rank = 0\n");
    assert!(p.iter().any(|e| e.starts_with("lora.rank: = 0 must be at least 1")), "{p:?}");
    for bad in ["1.0", "-0.1", "1.5"] {
        let p = problems(&format!("dropout = {bad}\n"));
        let want = format!("lora.dropout: = {} is outside [0, 1)", bad.parse::<f64>().unwrap());
        assert!(p.iter().any(|e| e.starts_with(&want)), "{p:?}");
    }
    let exp = Experiment::parse(&format!("{base}dropout = 0.1\n"), "exp.toml").expect("parses");
    let errors: Vec<String> = validate(&exp, None).err().into_iter().flatten().map(|p| p.to_string()).collect();
    assert!(errors.iter().all(|e| !e.contains("lora.dropout")), "dropout 0.1 is valid: {errors:?}");
    let p = problems("targets = []\n");
    assert!(p.iter().any(|e| e.starts_with("lora.targets: is empty")), "{p:?}");
    let err = Experiment::parse(&format!("{base}targets = [\"q\", \"fc1\"]\n"), "exp.toml").unwrap_err().to_string();
    assert!(err.contains("exp.toml") && err.contains("fc1") && err.contains("gate"), "{err}");
    // PEFT's module names read too; the default is every projection.
    let exp = Experiment::parse(&format!("{base}targets = [\"q_proj\", \"down_proj\"]\n"), "x").expect("parses");
    assert_eq!(exp.lora.as_ref().map(|l| l.targets.clone()), Some(vec![LoraTarget::Q, LoraTarget::Down]));
    let exp = Experiment::parse(base, "x").expect("parses");
    assert_eq!(exp.lora.map(|l| l.targets.len()), Some(7));
}
