//! `ulysses train` with `[lora]`: real mpirun jobs (CPU, fp32) that train adapters on a frozen
//! base. The single-rank run equals the readable reference (`Reference::with_lora`: the seeded
//! base as a constant, PEFT's initial adapters) step by step, which also shows the base never
//! moved; every (sp, dp) layout, packed documents, the ring and state on disk equal one rank
//! (loss 1e-6 relative, adapters 1e-5); checkpoints hold only the trained units and resume
//! exactly, in the same layout and in another; bad `[lora]` input stops with one message. With
//! `lora.dropout` the single-rank run equals the reference drawing the same masks, sp 2 and 4, dp
//! 2 and the ring equal one rank, and the held-out loss is computed without dropout.
mod ckpt_common;
mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

const SEQ: usize = 240;
const STEPS: usize = 4;

fn synth(dir: &Path) -> PathBuf {
    synth_task(dir, "data", &["--task", "passkey"])
}

/// `ulysses data synth` of 16 sequences of `SEQ` tokens into `dir/name`.
fn synth_task(dir: &Path, name: &str, task: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let args = ["data", "synth", "--seq-len", "240", "--num", "16", "--seed", "3", "--out", out.to_str().unwrap()];
    let o = ulysses(&[&args[..], task].concat(), dir);
    assert!(o.status.success(), "{}", text(&o));
    out
}

#[derive(Clone)]
struct Run {
    name: String,
    sp: usize,
    dp: usize,
    micro_batch: usize,
    steps: usize,
    /// `--set` overrides (ring, packed documents, state tiers, ...).
    sets: Vec<String>,
}

impl Run {
    fn new(name: &str, sp: usize, dp: usize) -> Run {
        Run { name: name.into(), sp, dp, micro_batch: 1, steps: STEPS, sets: Vec::new() }
    }

    fn set(mut self, s: &str) -> Run {
        self.sets.push(s.into());
        self
    }

    fn write(&self, dir: &Path, data: &Path) -> PathBuf {
        let toml = format!(
            "[run]\nname = \"{name}\"\noutput_dir = \"{out}\"\nseed = 11\n[model]\npreset = \"tiny\"\n\
             [parallel]\nsp = {sp}\ndp = {dp}\nzero_stage = 3\n[data]\npaths = [\"{data}\"]\nseq_len = {SEQ}\n\
             [train]\nsteps = {steps}\nmicro_batch = {mb}\nlr = 5e-3\nmin_lr = 5e-4\nwarmup_steps = 1\n\
             weight_decay = 0.1\nclip_grad_norm = 0.5\n[checkpoint]\nevery = 2\nresume = \"auto\"\n\
             [lora]\nrank = 4\nalpha = 16.0\n",
            name = self.name,
            out = dir.join("runs").display(),
            sp = self.sp,
            dp = self.dp,
            data = data.display(),
            steps = self.steps,
            mb = self.micro_batch,
        );
        let path = dir.join(format!("{}.toml", self.name));
        std::fs::write(&path, toml).unwrap();
        path
    }

    fn run_dir(&self, dir: &Path) -> PathBuf {
        dir.join("runs").join(&self.name)
    }

    /// Trains (or resumes) to `steps`; returns the job's output.
    fn train(&self, dir: &Path, data: &Path) -> String {
        let exp = self.write(dir, data);
        let mut args = vec![exp.to_str().unwrap().to_string()];
        for s in &self.sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = mpirun(self.sp * self.dp, &args, dir, &[("OMP_NUM_THREADS", "1")]);
        assert!(out.status.success(), "{}: {}", self.name, text(&out));
        text(&out)
    }

    /// The losses of metrics.h5 and the trained tensors of the last checkpoint.
    fn outputs(&self, dir: &Path) -> RunOutputs {
        let run_dir = self.run_dir(dir);
        let f = hdf5::File::open(run_dir.join("metrics.h5")).unwrap();
        let losses: Vec<f64> = f.dataset("steps/loss").unwrap().read_raw().unwrap();
        let last = run_dir.join("checkpoints").join(format!("step-{:06}", self.steps));
        (losses, checkpoint_master(&last))
    }
}

/// Every tensor's fp32 master weights in a format-2 checkpoint, whole: each unit's slices from
/// the rank files (`<unit>.master`) in order, cut at the tensors' offsets (read here from
/// index.json and the safetensors files, not by the code under test).
fn checkpoint_master(dir: &Path) -> BTreeMap<String, Tensor> {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let files: Vec<BTreeMap<String, Tensor>> = index["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| Tensor::read_safetensors(dir.join(f["name"].as_str().unwrap())).unwrap().into_iter().collect())
        .collect();
    let mut out = BTreeMap::new();
    for u in index["units"].as_array().unwrap() {
        let key = format!("{}.master", u["unit"].as_str().unwrap());
        let parts: Vec<Tensor> = u["slices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| files[s["file"].as_u64().unwrap() as usize][&key].copy())
            .collect();
        let flat = Tensor::cat(&parts, 0);
        assert_eq!(flat.numel() as i64, u["numel"].as_i64().unwrap());
        for t in u["tensors"].as_array().unwrap() {
            let shape: Vec<i64> = t["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
            let n: i64 = shape.iter().product();
            let name = t["name"].as_str().unwrap().to_string();
            out.insert(name, flat.narrow(0, t["offset"].as_i64().unwrap(), n).view(shape.as_slice()));
        }
    }
    out
}

/// A checkpoint of a LoRA run holds the adapters (and nothing of the frozen base).
fn assert_adapters_only(params: &BTreeMap<String, Tensor>, full: &[&str]) {
    let others: Vec<&String> = params.keys().filter(|n| !n.contains(".lora_") && !full.contains(&n.as_str())).collect();
    assert!(others.is_empty(), "the checkpoint holds base tensors: {others:?}");
    assert!(params.keys().any(|n| n.contains("lora_A")), "no adapters in the checkpoint");
}

/// The binary's single-rank LoRA run equals the reference trainer on the seeded base with PEFT's
/// initial adapters (A seeded, B zero): every step's loss 1e-6, every adapter 1e-5. A base that
/// changed during training (a gradient, an update, an in-place write into a gathered view) would
/// move the loss away from the reference's constant base.
#[test]
fn single_rank_lora_run_equals_the_reference() {
    use ulysses::config::Experiment;
    use ulysses::model::lora::init_adapters;
    use ulysses::train::reference::Reference;

    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let run = Run::new("one", 1, 1);
    let exp = Experiment::load(&run.write(dir.path(), &data)).unwrap();
    run.train(dir.path(), &data);
    let got = run.outputs(dir.path());
    assert_adapters_only(&got.1, &[]);

    let spec = ulysses::config::validate(&exp, Some(1)).unwrap();
    let lora = exp.lora.clone().unwrap();
    let base = common::reference::initial_weights(&exp);
    let reference = Reference::with_lora(&spec, &lora, exp.run.seed, base, init_adapters(&spec, &lora, exp.run.seed));
    let want = train_reference(&exp, reference);
    assert_same_run("single-rank LoRA vs the reference", &want, &got);
}

/// With dropout 0.1: the single-rank run equals the reference (which draws each step's masks
/// over whole sequences), and sp 2 and 4, dp 2 (against one rank's micro batch of 2) and ulysses 1
/// × ring 2 (zigzag halves) equal one rank: every rank draws its tokens' part of the same masks,
/// in the forward and in backward's recompute.
#[test]
fn lora_dropout_equals_the_reference_and_one_rank_in_every_layout() {
    use ulysses::config::Experiment;
    use ulysses::model::lora::init_adapters;
    use ulysses::train::reference::Reference;

    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let d = dir.path();
    let drop = |r: Run| r.set("lora.dropout=0.1");
    let one = drop(Run::new("drop-one", 1, 1));
    one.train(d, &data);
    let single = one.outputs(d);
    let exp = Experiment::load(&one.write(d, &data)).unwrap();
    let spec = ulysses::config::validate(&exp, Some(1)).unwrap();
    let lora = ulysses::config::LoraConfig { dropout: 0.1, ..exp.lora.clone().unwrap() };
    let base = common::reference::initial_weights(&exp);
    let reference = Reference::with_lora(&spec, &lora, exp.run.seed, base, init_adapters(&spec, &lora, exp.run.seed));
    let want = train_reference(&exp, reference);
    assert_same_run("single-rank LoRA with dropout vs the reference", &want, &single);
    // The masks drop something: the run without dropout has other losses from step 2 on (B = 0
    // at step 1, so the adapters add nothing there yet).
    let plain = Run::new("plain-one", 1, 1);
    plain.train(d, &data);
    let (plain_losses, _) = plain.outputs(d);
    assert!((plain_losses[1] - single.0[1]).abs() > 1e-6 * plain_losses[1], "{plain_losses:?} vs {:?}", single.0);

    for sp in [2, 4] {
        let r = drop(Run::new(&format!("drop-sp{sp}"), sp, 1));
        r.train(d, &data);
        assert_same_run(&r.name, &single, &r.outputs(d));
    }
    let ring = drop(Run::new("drop-ring", 2, 1)).set("parallel.ring=2");
    ring.train(d, &data);
    assert_same_run(&ring.name, &single, &ring.outputs(d));
    let mb2 = drop(Run { micro_batch: 2, ..Run::new("drop-mb2", 1, 1) });
    mb2.train(d, &data);
    let dp2 = drop(Run::new("drop-dp2", 1, 2));
    dp2.train(d, &data);
    assert_same_run(&dp2.name, &mb2.outputs(d), &dp2.outputs(d));
}

/// The held-out loss is computed without dropout: from an adapter with B ≠ 0 and a learning rate
/// too small to move any fp32 weight, a run with dropout 0.1 has the run without dropout's
/// held-out losses bit for bit, while its training losses differ (the masks act in training).
#[test]
fn the_held_out_loss_does_not_drop() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let d = dir.path();
    let spec = ulysses::model::spec::ModelSpec::preset(ulysses::model::spec::Preset::Tiny);
    let lora = ulysses::config::LoraConfig { rank: 4, alpha: 16.0, ..Default::default() };
    let named: Vec<(String, Tensor)> = ulysses::model::lora::init_adapters(&spec, &lora, 5)
        .into_iter()
        .map(|(n, t)| if n.contains("lora_B") { (n, Tensor::randn_like(&t) * 0.3) } else { (n, t) })
        .collect();
    let adapter = d.join("adapter");
    ulysses::model::lora::save_peft(&adapter, &spec, &lora, &named, tch::Kind::Float, "tiny").unwrap();
    let run = |name: &str, dropout: f64| {
        let r = Run { steps: 2, ..Run::new(name, 1, 1) }
            .set(&format!("lora.adapter=\"{}\"", adapter.display()))
            .set(&format!("lora.dropout={dropout}"))
            .set(&format!("data.eval_paths=[\"{}\"]", data.display()))
            .set("train.eval_every=1")
            .set("train.lr=1e-30")
            .set("train.min_lr=0.0");
        r.train(d, &data);
        let f = hdf5::File::open(r.run_dir(d).join("metrics.h5")).unwrap();
        let read = |name: &str| -> Vec<f64> { f.dataset(&format!("steps/{name}")).unwrap().read_raw().unwrap() };
        (read("loss"), read("eval_loss"))
    };
    let (dropped, dropped_eval) = run("dropped", 0.1);
    let (plain, plain_eval) = run("plain", 0.0);
    assert!(dropped_eval.iter().all(|l| l.is_finite()) && dropped_eval.len() == 2, "{dropped_eval:?}");
    assert_eq!(dropped_eval, plain_eval, "held-out losses");
    for (a, b) in dropped.iter().zip(&plain) {
        assert!((a - b).abs() > 1e-6 * b, "training losses differ: {dropped:?} vs {plain:?}");
    }
}

#[test]
fn lora_layouts_match_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let d = dir.path();
    let one = Run::new("sp1-dp1", 1, 1);
    one.train(d, &data);
    let single = one.outputs(d);
    for sp in [2, 4] {
        let r = Run::new(&format!("sp{sp}-dp1"), sp, 1);
        r.train(d, &data);
        assert_same_run(&r.name, &single, &r.outputs(d));
    }
    // dp = 2 ranks at micro batch 1 see what one rank sees at micro batch 2.
    let mb2 = Run { micro_batch: 2, ..Run::new("sp1-dp1-mb2", 1, 1) };
    mb2.train(d, &data);
    let single = mb2.outputs(d);
    for sp in [1, 2, 4] {
        let r = Run::new(&format!("sp{sp}-dp2"), sp, 2);
        r.train(d, &data);
        assert_same_run(&r.name, &single, &r.outputs(d));
    }
}

/// Packed documents, the ring, the LM head trained in full and state on disk, each against its
/// one-rank run.
#[test]
fn lora_with_packing_ring_full_modules_and_disk_state_matches_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let d = dir.path();
    let off = format!("memory.offload_dir=\"{}\"", d.join("off").display());
    // Documents of up to 70 tokens packed: many cross the SP chunks of 120.
    let packed = synth_task(d, "packed", &["--task", "random", "--doc-len", "70"]);
    let cases: [(&str, Vec<&str>, usize); 4] = [
        ("packed", vec!["data.documents=\"mask\"", "data.positions=\"document\""], 2),
        ("ring", vec!["parallel.ring=2"], 2),
        ("head", vec!["lora.train_fully=[\"lm_head\"]"], 2),
        ("disk", vec!["parallel.offload_optimizer=\"disk\"", &off], 2),
    ];
    for (name, sets, sp) in cases {
        let data = if name == "packed" { &packed } else { &data };
        let with = |r: Run| sets.iter().fold(r, |r, s| r.set(s));
        // The ring's one-rank run is plain attention: a ring of one is no ring.
        let one =
            if name == "ring" { Run::new("ring-one", 1, 1) } else { with(Run::new(&format!("{name}-one"), 1, 1)) };
        one.train(d, data);
        let r = with(Run::new(&format!("{name}-sp{sp}"), sp, 1));
        let log = r.train(d, data);
        let (want, got) = (one.outputs(d), r.outputs(d));
        assert_same_run(&r.name, &want, &got);
        if name == "head" {
            assert!(got.1.contains_key("lm_head.weight"), "the LM head trains in full");
            assert_adapters_only(&got.1, &["lm_head.weight"]);
        }
        if name == "disk" {
            assert!(log.contains("optimizer state of 0 of 4 units in memory / 4 on disk"), "{log}");
        }
    }
}

/// Train N, resume to 2N == straight 2N: the straight run's checkpoint of step N copied into a
/// new run, which resumes from it: bit-identical in the same layout, within the layout
/// tolerances at sp = 2 × dp = 2 (dp × micro batch kept).
#[test]
fn lora_resume_is_exact_in_any_layout() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let d = dir.path();
    let straight = Run { micro_batch: 2, ..Run::new("straight", 1, 1) };
    straight.train(d, &data);
    let want = straight.outputs(d);
    let half = straight.run_dir(d).join(format!("checkpoints/step-{:06}", STEPS / 2));
    assert_adapters_only(&checkpoint_master(&half), &[]);

    let resume = |r: Run| {
        ckpt_common::copy_dir(&half, &r.run_dir(d).join(format!("checkpoints/step-{:06}", STEPS / 2)));
        let log = r.train(d, &data);
        assert!(log.contains("resuming from") && log.contains("written by a 1-rank sp=1 dp=1 job"), "{log}");
        let (steps, losses) = ckpt_common::losses(&r.run_dir(d));
        assert_eq!(steps, ((STEPS / 2 + 1) as u64..=STEPS as u64).collect::<Vec<_>>());
        (losses, r.outputs(d).1)
    };
    let (losses, params) = resume(Run { micro_batch: 2, ..Run::new("resumed", 1, 1) });
    assert_eq!(want.0[STEPS / 2..], losses[..], "losses after the resume");
    assert_eq!(want.1.keys().collect::<Vec<_>>(), params.keys().collect::<Vec<_>>());
    for (name, t) in &want.1 {
        assert!(t.equal(&params[name]), "{name} differs after the resume");
    }

    let (losses, params) = resume(Run::new("moved", 2, 2));
    let straight_rest = (want.0[STEPS / 2..].to_vec(), want.1);
    assert_same_run("resumed at sp=2 dp=2", &straight_rest, &(losses, params));
}

/// One clear message, exit != 0 and no panic, naming the file, the field, the value and what
/// is valid.
#[test]
fn bad_lora_input_is_refused_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth(dir.path());
    let d = dir.path();
    let train = |r: &Run, extra: &str| {
        let exp = r.write(d, &data);
        let text = std::fs::read_to_string(&exp).unwrap() + extra;
        let text = text.replace("[lora]\nrank = 4\n", "[lora]\n");
        std::fs::write(&exp, text).unwrap();
        assert_clean_failure(&ulysses(&["train", exp.to_str().unwrap()], d))
    };
    let t = train(&Run::new("target", 1, 1), "rank = 4\ntargets = [\"q\", \"qkv_proj\"]\n");
    // The TOML error: the file, the line of [lora]'s `targets`, the value and the valid names.
    assert!(t.contains("target.toml") && t.contains("targets = [\"q\", \"qkv_proj\"]"), "{t}");
    assert!(t.contains("unknown variant `qkv_proj`, expected one of `q`, `q_proj`"), "{t}");

    let t = train(&Run::new("rank0", 1, 1), "rank = 0\n");
    assert!(t.contains("rank0.toml") && t.contains("lora.rank") && t.contains("= 0 must be at least 1"), "{t}");

    // An adapter of another model: the tiny model's adapter with half the hidden size.
    let other = d.join("other-adapter");
    let small = ulysses::model::spec::ModelSpec {
        hidden_size: 32,
        ..ulysses::model::spec::ModelSpec::preset(ulysses::model::spec::Preset::Tiny)
    };
    let lora = ulysses::config::LoraConfig { rank: 4, alpha: 16.0, ..Default::default() };
    let named = ulysses::model::lora::init_adapters(&small, &lora, 1);
    ulysses::model::lora::save_peft(&other, &small, &lora, &named, tch::Kind::Float, "someone/other-model").unwrap();
    let t = train(&Run::new("other", 1, 1), &format!("rank = 4\nadapter = \"{}\"\n", other.display()));
    assert!(t.contains("other.toml") && t.contains("lora.adapter"), "{t}");
    assert!(t.contains("adapter_model.safetensors") && t.contains("another model"), "{t}");
    assert!(t.contains("someone/other-model"), "names the adapter's base model: {t}");
}
