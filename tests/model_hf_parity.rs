//! Parity with transformers: tests/hf/make_tiny_llama.py builds tiny random LlamaForCausalLM
//! checkpoints (untied and tied, sharded, llama3 rope scaling active at the test length) and their
//! logits and loss; we load them with `load_hf`, run our forward and compare. Then `save_hf` must
//! give a checkpoint that transformers loads to the same logits and `load_hf` reads back bit-exact.
//! Nothing is skipped: without the project venv (torch, transformers) these tests fail.
mod model_support;

use model_support::{max_abs_diff, positions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};
use ulysses::model::llama::{forward_logits, head_loss, LocalAttention, IGNORE_INDEX};
use ulysses::model::spec::ModelSpec;
use ulysses::model::weights::{load_hf, save_hf};

const LOGITS_TOL: f64 = 1e-4;
const LOSS_REL_TOL: f64 = 1e-5;

fn run_python(args: &[&Path]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python3");
    let script = root.join("tests/hf/make_tiny_llama.py");
    let out = Command::new(&python).arg(&script).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {}: {e}. The HF parity test needs the project venv: run scripts/setup.sh", python.display())
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
}

/// The transformers checkpoints, built once per test binary.
fn hf_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        run_python(&[Path::new("make"), dir.path()]);
        dir
    })
    .path()
}

fn reference(variant: &str) -> (Tensor, Tensor, f64) {
    let path = hf_dir().join(variant).join("reference.safetensors");
    let get = |name: &str| {
        Tensor::read_safetensors(&path)
            .expect("reference file")
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} in {}", path.display()))
            .1
    };
    (get("ids"), get("logits"), get("loss").double_value(&[0]))
}

fn load(variant: &str) -> (ModelSpec, ulysses::model::llama::ModelWeights) {
    let dir = hf_dir().join(variant);
    let spec = ModelSpec::from_hf_config(&dir.join("config.json")).expect("config.json");
    let w = load_hf(&dir, &spec, Kind::Float, Device::Cpu).expect("load_hf");
    (spec, w)
}

fn our_logits(spec: &ModelSpec, w: &ulysses::model::llama::ModelWeights, ids: &Tensor) -> Tensor {
    let (b, s) = (ids.size()[0], ids.size()[1]);
    tch::no_grad(|| forward_logits(spec, w, ids, &positions(b, 0, s), &LocalAttention))
}

fn check_parity(variant: &str, tied: bool) {
    let (spec, w) = load(variant);
    assert_eq!(spec.tie_word_embeddings, tied);
    assert_eq!(w.lm_head.is_none(), tied, "lm_head presence for {variant}");
    assert!(spec.rope_scaling.is_some(), "the parity model must exercise llama3 rope scaling");
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
    check_parity("untied", false);
}

#[test]
fn tied_matches_transformers() {
    check_parity("tied", true);
}

/// save_hf -> transformers from_pretrained (no missing or unexpected tensors) gives our logits,
/// and save_hf -> load_hf is bit-exact.
#[test]
fn save_hf_round_trips_through_transformers() {
    for variant in ["untied", "tied"] {
        let (spec, w) = load(variant);
        let out = tempfile::tempdir().expect("temp dir");
        let saved: PathBuf = out.path().join("ckpt");
        save_hf(&w, &spec, &saved, 100_000).expect("save_hf");
        assert!(saved.join("model.safetensors.index.json").exists(), "{variant}: expected a sharded checkpoint");
        let shards = std::fs::read_dir(&saved).unwrap().filter(|e| {
            let name = e.as_ref().unwrap().file_name().to_string_lossy().to_string();
            name.starts_with("model-") && name.ends_with(".safetensors")
        });
        assert!(shards.count() >= 2, "{variant}: expected at least 2 shards");

        let back =
            load_hf(&saved, &ModelSpec::from_hf_config(&saved.join("config.json")).unwrap(), Kind::Float, Device::Cpu)
                .expect("load_hf of save_hf");
        for ((n1, t1), (n2, t2)) in w.named_tensors().iter().zip(back.named_tensors().iter()) {
            assert_eq!(n1, n2);
            assert!(t1.equal(t2), "{variant}: {n1} changed in save_hf -> load_hf");
        }
        assert_eq!(w.named_tensors().len(), back.named_tensors().len());

        let (ids, _, _) = reference(variant);
        let ids_file = out.path().join("ids.safetensors");
        Tensor::write_safetensors(&[("ids", &ids)], &ids_file).unwrap();
        let hf_logits_file = out.path().join("hf_logits.safetensors");
        run_python(&[Path::new("logits"), &saved, &ids_file, &hf_logits_file]);
        let hf_logits =
            Tensor::read_safetensors(&hf_logits_file).unwrap().into_iter().find(|(n, _)| n == "logits").unwrap().1;
        let diff = max_abs_diff(&our_logits(&spec, &w, &ids), &hf_logits);
        println!("{variant}: save_hf -> transformers: max abs logits diff = {diff:e}");
        assert!(diff <= LOGITS_TOL, "{variant}: transformers on our checkpoint differs by {diff:e}");
    }
}
