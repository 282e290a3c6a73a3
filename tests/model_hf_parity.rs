//! Parity with transformers: tests/hf/make_tiny_models.py builds a tiny random model of every
//! family and variant (Llama untied and tied with llama3 rope scaling, Llama with attention_bias
//! and linear scaling, Qwen3 with its q/k norms and a head_dim independent of hidden / heads, Qwen3
//! tied with YaRN, Qwen2 tied with q/k/v biases and YaRN, Mistral), sharded, and their logits and
//! loss; we load each with `load_hf`, run our forward and compare. Then `save_hf` must give a
//! checkpoint that transformers loads (AutoModelForCausalLM, picking the family from the
//! config.json we write back) to the same logits and loss, and that `load_hf` reads back bit-exact.
//! Nothing is skipped: without the project venv (torch, transformers) these tests fail.
mod model_support;

use model_support::{hf_models, hf_python, max_abs_diff, positions};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use ulysses::model::llama::{forward_logits, head_loss, LocalAttention, IGNORE_INDEX};
use ulysses::model::spec::{Family, ModelSpec};
use ulysses::model::weights::{load_hf, save_hf};

const LOGITS_TOL: f64 = 1e-4;
const LOSS_REL_TOL: f64 = 1e-5;

/// (variant, family, tied, rope type or "default").
const VARIANTS: [(&str, Family, bool, &str); 7] = [
    ("untied", Family::Llama, false, "llama3"),
    ("tied", Family::Llama, true, "llama3"),
    ("llama-bias", Family::Llama, false, "linear"),
    ("qwen3", Family::Qwen3, false, "default"),
    ("qwen3-yarn", Family::Qwen3, true, "yarn"),
    ("qwen2", Family::Qwen2, true, "yarn"),
    ("mistral", Family::Mistral, false, "default"),
];

fn tensor(path: &Path, name: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .expect("reference file")
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} in {}", path.display()))
        .1
}

fn reference(variant: &str) -> (Tensor, Tensor, f64) {
    let path = hf_models().join(variant).join("reference.safetensors");
    (tensor(&path, "ids"), tensor(&path, "logits"), tensor(&path, "loss").double_value(&[0]))
}

fn load(variant: &str) -> (ModelSpec, ulysses::model::llama::ModelWeights) {
    let dir = hf_models().join(variant);
    let spec = ModelSpec::from_hf_config(&dir.join("config.json")).expect("config.json");
    let w = load_hf(&dir, &spec, Kind::Float, Device::Cpu).expect("load_hf");
    (spec, w)
}

fn our_logits(spec: &ModelSpec, w: &ulysses::model::llama::ModelWeights, ids: &Tensor) -> Tensor {
    let (b, s) = (ids.size()[0], ids.size()[1]);
    tch::no_grad(|| forward_logits(spec, w, ids, &positions(b, 0, s), &LocalAttention))
}

fn check_parity(variant: &str) {
    let &(_, family, tied, rope) = VARIANTS.iter().find(|v| v.0 == variant).expect("a known variant");
    let (spec, w) = load(variant);
    assert_eq!(spec.family, family, "{variant}");
    assert_eq!(spec.tie_word_embeddings, tied);
    assert_eq!(w.lm_head.is_none(), tied, "lm_head presence for {variant}");
    let rope_type = spec.rope_scaling.as_ref().map_or("default", |r| r.rope_type());
    assert_eq!(rope_type, rope, "the {variant} model must exercise its rope scaling");
    assert_eq!(spec.qk_norm, family == Family::Qwen3);
    assert_eq!(spec.qkv_bias, family == Family::Qwen2 || variant == "llama-bias");
    let (ids, ref_logits, ref_loss) = reference(variant);
    let logits = our_logits(&spec, &w, &ids);
    let diff = max_abs_diff(&logits, &ref_logits);
    println!("{variant}: max abs logits diff vs transformers = {diff:e}");
    assert!(diff <= LOGITS_TOL, "{variant}: logits differ from transformers by {diff:e} > {LOGITS_TOL:e}");

    // transformers' loss with labels = ids: token t predicts ids[t + 1]; the last has no target.
    let (b, s) = (ids.size()[0], ids.size()[1]);
    let labels =
        Tensor::cat(&[ids.narrow(1, 1, s - 1), Tensor::full([b, 1], IGNORE_INDEX, (Kind::Int64, Device::Cpu))], 1);
    let x = tch::no_grad(|| {
        let rope = ulysses::model::rope::Rope::new(&spec, &positions(b, 0, s), Kind::Float);
        let x0 = ulysses::model::llama::embed(&w, &ids);
        w.layers.iter().fold(x0, |x, l| ulysses::model::llama::layer_forward(&spec, l, &x, &rope, &LocalAttention, 16))
    });
    for tile in [0, 16] {
        let (sum, n) = tch::no_grad(|| head_loss(&spec, &w, &x, &labels, tile));
        assert_eq!(n, b * (s - 1));
        let loss = sum.double_value(&[]) / n as f64;
        let rel = (loss - ref_loss).abs() / ref_loss.abs();
        println!("{variant}: loss {loss} vs transformers {ref_loss} (rel {rel:e}, loss_tile {tile})");
        assert!(rel <= LOSS_REL_TOL, "{variant}: loss {loss} vs transformers {ref_loss}: rel diff {rel:e}");
    }
}

#[test]
fn untied_matches_transformers() {
    check_parity("untied");
}

#[test]
fn tied_matches_transformers() {
    check_parity("tied");
}

#[test]
fn llama_with_attention_bias_and_linear_rope_matches_transformers() {
    check_parity("llama-bias");
}

#[test]
fn qwen3_matches_transformers() {
    check_parity("qwen3");
}

#[test]
fn qwen3_tied_with_yarn_matches_transformers() {
    check_parity("qwen3-yarn");
}

#[test]
fn qwen2_with_biases_and_yarn_matches_transformers() {
    check_parity("qwen2");
}

#[test]
fn mistral_matches_transformers() {
    check_parity("mistral");
}

/// save_hf -> transformers from_pretrained (no missing or unexpected tensors) gives our logits,
/// and save_hf -> load_hf is bit-exact; for every variant, in one Python process.
#[test]
fn save_hf_round_trips_through_transformers() {
    let out = tempfile::tempdir().expect("temp dir");
    let mut args: Vec<PathBuf> = Vec::new();
    let mut ours = Vec::new();
    for (variant, ..) in VARIANTS {
        let (spec, w) = load(variant);
        let saved: PathBuf = out.path().join(variant);
        save_hf(&w, &spec, &saved, 100_000).expect("save_hf");
        assert!(saved.join("model.safetensors.index.json").exists(), "{variant}: expected a sharded checkpoint");
        let shards = std::fs::read_dir(&saved).unwrap().filter(|e| {
            let name = e.as_ref().unwrap().file_name().to_string_lossy().to_string();
            name.starts_with("model-") && name.ends_with(".safetensors")
        });
        assert!(shards.count() >= 2, "{variant}: expected at least 2 shards");
        // config.json written back is the one read, but for the dtype of the files.
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
        };
        let (mut before, after) = (read(&hf_models().join(variant)), read(&saved));
        before["torch_dtype"] = "float32".into();
        before["dtype"] = "float32".into();
        assert_eq!(before, after, "{variant}: config.json changed beyond its dtype");

        let back =
            load_hf(&saved, &ModelSpec::from_hf_config(&saved.join("config.json")).unwrap(), Kind::Float, Device::Cpu)
                .expect("load_hf of save_hf");
        for ((n1, t1), (n2, t2)) in w.named_tensors().iter().zip(back.named_tensors().iter()) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{variant}: {n1} changed in save_hf -> load_hf");
        }
        assert_eq!(w.named_tensors().len(), back.named_tensors().len());

        let (ids, _, ref_loss) = reference(variant);
        let ids_file = out.path().join(format!("{variant}-ids.safetensors"));
        Tensor::write_safetensors(&[("ids", &ids)], &ids_file).unwrap();
        let hf_file = out.path().join(format!("{variant}-hf.safetensors"));
        args.extend([saved, ids_file, hf_file.clone()]);
        ours.push((variant, our_logits(&spec, &w, &ids), ref_loss, hf_file));
    }
    let mut python_args: Vec<&Path> = vec![Path::new("logits")];
    python_args.extend(args.iter().map(PathBuf::as_path));
    hf_python(&python_args);
    for (variant, logits, ref_loss, hf_file) in ours {
        let diff = max_abs_diff(&logits, &tensor(&hf_file, "logits"));
        let loss = tensor(&hf_file, "loss").double_value(&[0]);
        println!("{variant}: save_hf -> transformers: max abs logits diff = {diff:e}, loss {loss} vs {ref_loss}");
        assert!(diff <= LOGITS_TOL, "{variant}: transformers on our checkpoint differs by {diff:e}");
        assert!((loss - ref_loss).abs() <= LOSS_REL_TOL * ref_loss.abs(), "{variant}: loss {loss} vs {ref_loss}");
    }
}
