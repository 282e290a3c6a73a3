//! Checkpoint files: save -> load is bit-exact for every state in any layout; transformers loads
//! a checkpoint with no ulysses code and gives our logits; bad checkpoints fail with a clear
//! message (the tensor and both shapes, the broken file, the missing index), exit != 0.
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use ulysses::comm::solo::Solo;
use ulysses::config::ZeroStage;
use ulysses::model::llama::{forward_logits, LocalAttention};
use ulysses::model::params::init_tensor;
use ulysses::model::spec::{ModelSpec, Preset};
use ulysses::optim::AdamW;
use ulysses::parallel::zero::{ShardedParams, State};
use ulysses::train::checkpoint::{self, DataPosition, Layout, RunState, Versions};

fn run_state(step: u64) -> RunState {
    RunState {
        format: checkpoint::FORMAT,
        step,
        total_steps: 10,
        data: DataPosition { epoch: 1, samples: 6 },
        seed: 5,
        layout: Layout { world: 1, sp: 1, dp: 1, zero_stage: ZeroStage::Sharded, micro_batch: 2, grad_accum: 1 },
        versions: Versions::current(),
        model_dtype: "float32".into(),
        config_toml: "[run]\n".into(),
    }
}

#[test]
fn save_then_load_is_bit_exact() {
    let spec = ModelSpec::preset(Preset::Tiny);
    let mut params = ShardedParams::new(&spec, ZeroStage::Sharded, &Solo, Device::Cpu, |u| {
        u.tensors.iter().map(|(n, s)| init_tensor(n, s, 3, Kind::Float, Device::Cpu)).collect()
    });
    // Two optimizer steps on random gradients, so the moments are non-zero and unlike the weights.
    let adamw = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    for step in 1..=2 {
        for (_, _, s) in params.local_shards().unwrap() {
            s.grad = Tensor::randn(s.grad.size(), (Kind::Float, Device::Cpu));
        }
        adamw.step(&mut params, 1e-2, step, 0.7).unwrap();
    }
    let run = tempfile::tempdir().unwrap();
    let state = run_state(2);
    let dir = checkpoint::save(&params, &state, &spec, &[], run.path(), 2, &Solo).unwrap();
    assert!(dir.ends_with("checkpoints/step-000002") && dir.join("COMPLETE").exists());
    assert_eq!(checkpoint::read_state(&dir).unwrap(), state);
    for stage in [ZeroStage::Replicated, ZeroStage::Sharded] {
        let back = checkpoint::load_params(&dir, &spec, stage, &Solo, Device::Cpu).unwrap();
        for which in [State::Master, State::ExpAvg, State::ExpAvgSq] {
            let a = params.gather_named_state(&Solo, which, true).unwrap();
            let b = back.gather_named_state(&Solo, which, true).unwrap();
            assert_eq!(a.len(), b.len());
            for ((n1, t1), (n2, t2)) in a.iter().zip(&b) {
                assert_eq!(n1, n2);
                assert!(t1.equal(t2), "stage {stage}: {which:?} of {n1} changed in save -> load");
                assert!(which == State::Master || t1.abs().sum(Kind::Double).double_value(&[]) > 0.0);
            }
        }
    }
}

fn python_logits(model_dir: &Path, ids: &Tensor, work: &Path) -> Tensor {
    let ids_file = work.join("ids.safetensors");
    Tensor::write_safetensors(&[("ids", ids)], &ids_file).unwrap();
    let out = work.join("hf_logits.safetensors");
    let o = std::process::Command::new(PYTHON)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf/make_tiny_models.py"))
        .args(["logits".as_ref(), model_dir.as_os_str(), ids_file.as_os_str(), out.as_os_str()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "transformers could not load {}:\n{}",
        model_dir.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    Tensor::read_safetensors(&out).unwrap().into_iter().find(|(n, _)| n == "logits").expect("logits").1
}

#[test]
fn transformers_loads_a_checkpoint_with_our_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("hf", 2, 2, 3, 0);
    exp.train(dir, &data);
    let ckpt = exp.run_dir(dir).join("final");
    assert_eq!(std::fs::read_link(&ckpt).unwrap(), Path::new("checkpoints/step-000003"));
    let spec = ModelSpec::from_hf_config(&ckpt.join("config.json")).unwrap();
    let w = ulysses::model::weights::load_hf(&ckpt, &spec, Kind::Float, Device::Cpu).unwrap();
    let ids = Tensor::randint(spec.vocab_size, [2, 48], (Kind::Int64, Device::Cpu));
    let positions = Tensor::arange(48, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([2, 1]);
    let ours = tch::no_grad(|| forward_logits(&spec, &w, &ids, &positions, &LocalAttention));
    let theirs = python_logits(&ckpt, &ids, dir);
    let diff = (&ours - &theirs).abs().max().double_value(&[]);
    assert!(diff <= 1e-4, "transformers' logits differ from ours by {diff:e}");
    // The optimizer files hold one fp32 tensor per parameter under the same names and shapes.
    let opt = Tensor::read_safetensors(ckpt.join("optimizer/exp_avg_sq.safetensors")).unwrap();
    let model: Vec<(String, Vec<i64>)> = w.named_tensors().iter().map(|(n, t)| (n.clone(), t.size())).collect();
    let mut opt: Vec<(String, Vec<i64>)> = opt.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    let mut model_sorted = model.clone();
    model_sorted.sort();
    opt.sort();
    assert_eq!(opt, model_sorted);
}

/// A 2-rank job resuming from `ckpt` must fail cleanly with every piece of `expected` in its output.
fn assert_refused(dir: &Path, data: &Path, exp: Exp, expected: &[&str]) {
    let path = exp.write(dir, data);
    let o = mpirun(exp.ranks(), &[path.to_str().unwrap()], dir, &[]);
    let out = assert_clean_failure(&o);
    for piece in expected {
        assert!(out.contains(piece), "{}: expected {piece:?} in:\n{out}", exp.name);
    }
}

#[test]
fn bad_checkpoints_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let good = Exp::new("good", 2, 1, 2, 0);
    good.train(dir, &data);
    let good_ckpt = good.run_dir(dir).join("checkpoints/step-000002");
    let broken = |name: &str, damage: &dyn Fn(&Path)| {
        let ckpt = dir.join("broken").join(name);
        copy_dir(&good_ckpt, &ckpt);
        damage(&ckpt);
        ckpt.display().to_string()
    };
    let resume_from = |name: &'static str, ckpt: String| Exp { resume: ckpt, ..Exp::new(name, 2, 1, 4, 0) };

    // Another model shape: the same checkpoint with an MLP twice as wide in the config.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(good_ckpt.join("config.json")).unwrap()).unwrap();
    let width = config["intermediate_size"].as_i64().unwrap();
    config["intermediate_size"] = (2 * width).into();
    std::fs::write(dir.join("wider.json"), config.to_string()).unwrap();
    let wider = Exp {
        model: format!("config = \"{}\"", dir.join("wider.json").display()),
        ..resume_from("shape", good_ckpt.display().to_string())
    };
    let hidden = config["hidden_size"].as_i64().unwrap();
    assert_refused(
        dir,
        &data,
        wider,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            &format!("[{width}, {hidden}]"),
            &format!("[{}, {hidden}]", 2 * width),
        ],
    );

    let truncate = |file: &'static str| {
        move |ckpt: &Path| {
            let path = ckpt.join(file);
            let len = std::fs::metadata(&path).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
        }
    };
    let ckpt = broken("truncated-model", &truncate("model.safetensors"));
    assert_refused(dir, &data, resume_from("truncated_model", ckpt), &["model.safetensors", "truncated or corrupt"]);
    let ckpt = broken("truncated-optimizer", &truncate("optimizer/exp_avg.safetensors"));
    assert_refused(
        dir,
        &data,
        resume_from("truncated_optimizer", ckpt),
        &["optimizer/exp_avg.safetensors", "truncated or corrupt"],
    );

    // Shards without their index.
    let ckpt = broken("no-index", &|c: &Path| {
        std::fs::rename(c.join("model.safetensors"), c.join("model-00001-of-00002.safetensors")).unwrap()
    });
    assert_refused(dir, &data, resume_from("no_index", ckpt), &["model.safetensors.index.json"]);

    let ckpt = broken("unfinished", &|c: &Path| std::fs::remove_file(c.join("COMPLETE")).unwrap());
    assert_refused(dir, &data, resume_from("unfinished", ckpt), &["not a complete checkpoint"]);

    let other_seed = Exp { seed: 12, ..resume_from("seed", good_ckpt.display().to_string()) };
    assert_refused(dir, &data, other_seed, &["run.seed = 11"]);
}
