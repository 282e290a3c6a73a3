//! Checkpoint files: save -> load is bit-exact for every state, writer (synchronous, asynchronous,
//! format 1) and ZeRO stage; transformers loads the run's `final/` export and `ulysses export`
//! (fp32 and bf16, sharded) with no ulysses code and gives our logits and loss; format-1
//! checkpoints resume; bad checkpoints fail with a clear message (the tensor and both shapes, the
//! broken file, the missing index), exit != 0; a user's folder named `final` is never replaced.
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use ulysses::checkpoint::{self, format1, Checkpointer, DataPosition, Layout, RunState, Versions};
use ulysses::comm::solo::Solo;
use ulysses::config::ZeroStage;
use ulysses::model::llama::{forward_logits, LocalAttention};
use ulysses::model::params::init_tensor;
use ulysses::model::spec::{ModelSpec, Preset};
use ulysses::optim::AdamW;
use ulysses::parallel::zero::{ShardMut, ShardedParams, State};

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
    })
    .unwrap();
    // Two optimizer steps on random gradients, so the moments are non-zero and unlike the weights.
    let adamw = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    for step in 1..=2 {
        for (_, _, s) in params.shards_mut().unwrap() {
            let ShardMut::Memory(s) = s else { unreachable!("in memory") };
            s.grad = Tensor::randn(s.grad.size(), (Kind::Float, Device::Cpu));
        }
        adamw.step(&mut params, 1e-2, step, 0.7).unwrap();
    }
    let state = run_state(2);
    for writer in ["synchronous", "asynchronous", "format 1"] {
        let run = tempfile::tempdir().unwrap();
        let dir = match writer {
            "format 1" => format1::save(&params, &state, &spec, run.path(), &Solo).unwrap(),
            _ => {
                let asynchronous = writer == "asynchronous";
                let mut c = Checkpointer::new(run.path(), 2, asynchronous, Vec::new(), &params, &Solo).unwrap();
                c.save(&params, &state, &spec, false, &Solo).unwrap();
                c.finish(&Solo).unwrap();
                run.path().join("checkpoints/step-000002")
            }
        };
        assert!(dir.ends_with("checkpoints/step-000002") && dir.join("COMPLETE").exists(), "{writer}");
        let read = checkpoint::read_state(&dir).unwrap();
        let format = if writer == "format 1" { 1 } else { 2 };
        assert_eq!(read, RunState { format, ..state.clone() }, "{writer}");
        for stage in [ZeroStage::Replicated, ZeroStage::Sharded] {
            let back = checkpoint::load_params(&dir, format, &spec, stage, &Solo, Device::Cpu).unwrap();
            for which in State::ALL {
                let a = params.gather_named_state(&Solo, which, true).unwrap();
                let b = back.gather_named_state(&Solo, which, true).unwrap();
                assert_eq!(a.len(), b.len());
                for ((n1, t1), (n2, t2)) in a.iter().zip(&b) {
                    assert_eq!(n1, n2);
                    assert!(t1.equal(t2), "{writer}, stage {stage}: {which:?} of {n1} changed in save -> load");
                    assert!(which == State::Master || t1.abs().sum(Kind::Double).double_value(&[]) > 0.0);
                }
            }
        }
    }
}

/// transformers' logits and loss (labels = ids) for `ids` from the model folder `model_dir`.
fn python_logits(model_dir: &Path, ids: &Tensor, work: &Path) -> (Tensor, f64) {
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
    let mut t: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&out).unwrap().into_iter().collect();
    let loss = t["loss"].double_value(&[0]);
    (t.remove("logits").unwrap(), loss)
}

/// Our logits for `ids` from the model folder `model_dir`, and their next-token loss.
fn our_logits(model_dir: &Path, ids: &Tensor) -> (Tensor, f64) {
    let spec = ModelSpec::from_hf_config(&model_dir.join("config.json")).unwrap();
    let w = ulysses::model::weights::load_hf(model_dir, &spec, Kind::Float, Device::Cpu).unwrap();
    let (b, s) = (ids.size()[0], ids.size()[1]);
    let positions = Tensor::arange(s, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([b, 1]);
    let logits = tch::no_grad(|| forward_logits(&spec, &w, ids, &positions, &LocalAttention));
    let v = logits.size()[2];
    let loss =
        logits.narrow(1, 0, s - 1).reshape([-1, v]).cross_entropy_for_logits(&ids.narrow(1, 1, s - 1).reshape([-1]));
    (logits, loss.double_value(&[]))
}

/// The dtype of every tensor of a model folder's safetensors files.
fn file_dtypes(model_dir: &Path) -> Vec<Kind> {
    let mut kinds = Vec::new();
    for e in std::fs::read_dir(model_dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            kinds.extend(Tensor::read_safetensors(&p).unwrap().into_iter().map(|(_, t)| t.kind()));
        }
    }
    kinds
}

#[test]
fn transformers_loads_the_export_with_our_logits_and_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("hf", 2, 2, 3, 0);
    let out = exp.train(dir, &data);
    let run = exp.run_dir(dir);
    let fin = run.join("final");
    assert!(out.contains("final model:"), "{out}");
    assert!(fin.is_dir() && !fin.is_symlink(), "final is an exported folder");
    let marker: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fin.join("ulysses-export.json")).unwrap()).unwrap();
    assert_eq!((marker["step"].as_u64(), marker["dtype"].as_str()), (Some(3), Some("float32")));
    let ids = Tensor::randint(512, [2, 48], (Kind::Int64, Device::Cpu));
    let (ours, our_loss) = our_logits(&fin, &ids);
    let (theirs, their_loss) = python_logits(&fin, &ids, dir);
    let diff = (&ours - &theirs).abs().max().double_value(&[]);
    assert!(diff <= 1e-4, "transformers' logits differ from ours by {diff:e}");
    assert!((our_loss - their_loss).abs() <= 1e-5 * their_loss, "loss: ours {our_loss}, transformers {their_loss}");
    assert!(file_dtypes(&fin).iter().all(|&k| k == Kind::Float));

    // The checkpoint's index lists every parameter under its Hugging Face name and shape, and
    // the 4 ranks' slices of each unit tile it.
    let ckpt = run.join("checkpoints/step-000003");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("index.json")).unwrap()).unwrap();
    let spec = ModelSpec::preset(Preset::Tiny);
    let mut listed: Vec<(String, Vec<i64>)> = index["units"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|u| u["tensors"].as_array().unwrap().clone())
        .map(|t| (t["name"].as_str().unwrap().to_string(), serde_json::from_value(t["shape"].clone()).unwrap()))
        .collect();
    let mut model = ulysses::model::params::ModelWeights::shapes(&spec);
    listed.sort();
    model.sort();
    assert_eq!(listed, model);
    for u in index["units"].as_array().unwrap() {
        let mut at = 0;
        for (r, s) in u["slices"].as_array().unwrap().iter().enumerate() {
            assert_eq!((s["file"].as_u64(), s["start"].as_i64()), (Some(r as u64), Some(at)), "{u}");
            at += s["len"].as_i64().unwrap();
        }
        assert_eq!(Some(at), u["numel"].as_i64());
    }

    // `ulysses export` in bf16 with small shards: an index and several files, all bf16, that
    // transformers loads with the fp32 model's loss up to bf16 rounding.
    let bf16 = dir.join("exported-bf16");
    let args = [
        "export",
        ckpt.to_str().unwrap(),
        "--out",
        bf16.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--max-shard-size",
        "40KB",
    ];
    let o = ulysses(&args, dir);
    assert!(o.status.success(), "{}", text(&o));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bf16.join("model.safetensors.index.json")).unwrap()).unwrap();
    let mut files: Vec<String> =
        index["weight_map"].as_object().unwrap().values().map(|f| f.as_str().unwrap().to_string()).collect();
    files.sort();
    files.dedup();
    assert!(files.len() >= 3 && files.iter().all(|f| bf16.join(f).exists()), "{files:?}");
    assert!(file_dtypes(&bf16).iter().all(|&k| k == Kind::BFloat16));
    let (_, loss16) = python_logits(&bf16, &ids, dir);
    assert!((loss16 - their_loss).abs() <= 2e-2 * their_loss, "bf16 loss {loss16} vs fp32 {their_loss}");
    // Exported again over itself: replaced (an earlier export), in fp32 by default (the run's dtype).
    let o = ulysses(&args[..4], dir);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        file_dtypes(&bf16).iter().all(|&k| k == Kind::Float) && !bf16.join("model.safetensors.index.json").exists()
    );
    let (_, loss32) = python_logits(&bf16, &ids, dir);
    assert!((loss32 - their_loss).abs() <= 1e-6 * their_loss, "{loss32} vs {their_loss}");
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

/// A format-1 copy of checkpoint `ckpt` under `run`/checkpoints, as ulysses wrote them before.
fn to_format1(ckpt: &Path, run: &Path) -> PathBuf {
    let spec = ModelSpec::preset(Preset::Tiny);
    let state = checkpoint::read_state(ckpt).unwrap();
    let params = checkpoint::load_params(ckpt, state.format, &spec, ZeroStage::Sharded, &Solo, Device::Cpu).unwrap();
    format1::save(&params, &state, &spec, run, &Solo).unwrap()
}

#[test]
fn bad_checkpoints_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let good = Exp::new("good", 2, 1, 2, 0);
    good.train(dir, &data);
    let good_ckpt = good.run_dir(dir).join("checkpoints/step-000002");
    let old_ckpt = to_format1(&good_ckpt, &dir.join("format1"));
    let broken = |name: &str, from: &Path, damage: &dyn Fn(&Path)| {
        let ckpt = dir.join("broken").join(name);
        copy_dir(from, &ckpt);
        damage(&ckpt);
        ckpt.display().to_string()
    };
    let resume_from = |name: &'static str, ckpt: String| Exp { resume: ckpt, ..Exp::new(name, 2, 1, 4, 0) };

    // Format 1 still loads: resumed from the format-1 copy, the run continues exactly as from
    // the format-2 original.
    let from_new = resume_from("from_format2", good_ckpt.display().to_string());
    from_new.train(dir, &data);
    let from_old = resume_from("from_format1", old_ckpt.display().to_string());
    let out = from_old.train(dir, &data);
    assert!(out.contains("format 1"), "{out}");
    let ((s1, l1), (s2, l2)) = (losses(&from_new.run_dir(dir)), losses(&from_old.run_dir(dir)));
    assert_eq!((s1.clone(), s2), (vec![3, 4], vec![3, 4]));
    assert_eq!(l1, l2, "a format-1 checkpoint resumes bit for bit like its format-2 original");

    // Another model shape: the same checkpoint with an MLP twice as wide in the config.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(good_ckpt.join("config.json")).unwrap()).unwrap();
    let width = config["intermediate_size"].as_i64().unwrap();
    config["intermediate_size"] = (2 * width).into();
    std::fs::write(dir.join("wider.json"), config.to_string()).unwrap();
    let hidden = config["hidden_size"].as_i64().unwrap();
    for (name, ckpt) in [("shape", &good_ckpt), ("shape_format1", &old_ckpt)] {
        let wider = Exp {
            model: format!("config = \"{}\"", dir.join("wider.json").display()),
            ..resume_from(name, ckpt.display().to_string())
        };
        let shapes = [format!("[{width}, {hidden}]"), format!("[{}, {hidden}]", 2 * width)];
        assert_refused(dir, &data, wider, &["model.layers.0.mlp.gate_proj.weight", &shapes[0], &shapes[1]]);
    }

    let truncate = |file: &'static str| {
        move |ckpt: &Path| {
            let path = ckpt.join(file);
            let len = std::fs::metadata(&path).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
        }
    };
    for (name, file) in
        [("truncated_rank0", "rank-00000-of-00002.safetensors"), ("truncated_rank1", "rank-00001-of-00002.safetensors")]
    {
        let ckpt = broken(name, &good_ckpt, &truncate(file));
        assert_refused(dir, &data, resume_from(name, ckpt), &[file, "truncated or corrupt"]);
    }
    let ckpt = broken("truncated-model", &old_ckpt, &truncate("model.safetensors"));
    assert_refused(dir, &data, resume_from("truncated_model", ckpt), &["model.safetensors", "truncated or corrupt"]);
    let ckpt = broken("truncated-optimizer", &old_ckpt, &truncate("optimizer/exp_avg.safetensors"));
    assert_refused(
        dir,
        &data,
        resume_from("truncated_optimizer", ckpt),
        &["optimizer/exp_avg.safetensors", "truncated or corrupt"],
    );

    // Rank files without their index; format-1 shards without theirs.
    let ckpt = broken("no-index", &good_ckpt, &|c: &Path| std::fs::remove_file(c.join("index.json")).unwrap());
    assert_refused(dir, &data, resume_from("no_index", ckpt), &["index.json", "No such file"]);
    let ckpt = broken("no-hf-index", &old_ckpt, &|c: &Path| {
        std::fs::rename(c.join("model.safetensors"), c.join("model-00001-of-00002.safetensors")).unwrap()
    });
    assert_refused(dir, &data, resume_from("no_hf_index", ckpt), &["model.safetensors.index.json"]);
    // A weight index may only name files inside its folder.
    let ckpt = broken("escaping-index", &old_ckpt, &|c: &Path| {
        let index = serde_json::json!({ "weight_map": { "model.embed_tokens.weight": "../../x.safetensors" } });
        std::fs::write(c.join("model.safetensors.index.json"), index.to_string()).unwrap();
    });
    assert_refused(
        dir,
        &data,
        resume_from("escaping_index", ckpt),
        &["../../x.safetensors", "is not a file name inside"],
    );

    let ckpt = broken("unfinished", &good_ckpt, &|c: &Path| std::fs::remove_file(c.join("COMPLETE")).unwrap());
    assert_refused(dir, &data, resume_from("unfinished", ckpt), &["not a complete checkpoint"]);
    let ckpt = broken("future", &good_ckpt, &|c: &Path| {
        let path = c.join("run_state.json");
        let text = std::fs::read_to_string(&path).unwrap().replace("\"format\": 2", "\"format\": 3");
        std::fs::write(path, text).unwrap();
    });
    assert_refused(dir, &data, resume_from("future", ckpt), &["has format 3", "formats 1 and 2"]);

    let other_seed = Exp { seed: 12, ..resume_from("seed", good_ckpt.display().to_string()) };
    assert_refused(dir, &data, other_seed, &["run.seed = 11"]);
    let o = ulysses(&["export", "no/such/checkpoint", "--out", "x"], dir);
    assert!(assert_clean_failure(&o).contains("no/such/checkpoint"));
}

#[test]
fn a_user_folder_named_final_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("mine", 2, 1, 2, 0);
    let run = exp.run_dir(dir);
    std::fs::create_dir_all(run.join("final")).unwrap();
    std::fs::write(run.join("final/notes.txt"), "my notes").unwrap();
    let path = exp.write(dir, &data);
    let o = mpirun(2, &[path.to_str().unwrap()], dir, &[]);
    let out = assert_clean_failure(&o);
    assert!(out.contains("final") && out.contains("did not export") && out.contains("move it away"), "{out}");
    assert!(!out.contains("step     1/2"), "refused before training:\n{out}");
    assert_eq!(std::fs::read_to_string(run.join("final/notes.txt")).unwrap(), "my notes");

    // A link elsewhere is the user's too; moved away, the run trains and exports.
    std::fs::rename(run.join("final"), dir.join("notes")).unwrap();
    std::os::unix::fs::symlink(dir.join("notes"), run.join("final")).unwrap();
    let o = mpirun(2, &[path.to_str().unwrap()], dir, &[]);
    assert!(assert_clean_failure(&o).contains("symbolic link"));
    std::fs::remove_file(run.join("final")).unwrap();
    exp.train(dir, &data);
    assert!(run.join("final/model.safetensors").exists());
    assert_eq!(std::fs::read_to_string(dir.join("notes/notes.txt")).unwrap(), "my notes");

    // `ulysses export` refuses a user's folder the same way.
    let o = ulysses(
        &[
            "export",
            run.join("checkpoints/step-000002").to_str().unwrap(),
            "--out",
            dir.join("notes").to_str().unwrap(),
        ],
        dir,
    );
    assert!(assert_clean_failure(&o).contains("did not export"));
    assert_eq!(std::fs::read_dir(dir.join("notes")).unwrap().count(), 1);
}
