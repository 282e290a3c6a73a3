//! Training on shards with a per-token loss mask (chat data: the assistant's turns only), in real
//! multi-rank jobs (mpirun, CPU, fp32):
//! - sp ∈ {1, 2, 4} (ZeRO 0 and 3) give every step's loss within 1e-6 and every parameter within
//!   1e-5 of the single-rank run, which equals the readable reference trainer on the same masked
//!   labels; the first step's sample trains nothing in its first half, so at sp = 2 and 4 whole SP
//!   ranks hold no trained label (they add zero: no NaN); metrics.h5 counts each step's trained
//!   labels (`trained_tokens`) as the mask says;
//! - the held-out loss (`data.eval_paths`, `train.eval_every`) under sp = 1, sp = 2 × dp = 2 and
//!   sp = 4 is the reference's masked loss of the run's final weights on the held-out set, each
//!   held-out sequence counted once (5 sequences over 2 dp ranks: the last round is short), and it
//!   is recorded on the steps it says (NaN elsewhere), with its labels and time, and printed;
//!   `eval --task loss` of the final weights scores the same labels to the same loss;
//! - transformers' masked loss of the final checkpoint of a model folder it made equals the run's.
mod common;
mod model_support;
use common::*;
use std::path::{Path, PathBuf};
use ulysses::config::Experiment;
use ulysses::data::format::{ShardMeta, ShardWriter};
use ulysses::data::{build_batch, Dataset, LoaderSpec};
use ulysses::train::reference::Reference;
use ulysses::train::step::MicroBatch;

const SEQ: usize = 240;
const STEPS: usize = 3;
/// A conversation in bytes; the mask trains the assistant's part.
const TURN: &str = "user: The grass is green. What colour is the sky? assistant: The sky is blue. ";

/// Sequence `i` of a set: the conversation from an offset that varies with `i`, with its mask:
/// 1 on the assistant's words (after "assistant: " up to the end of the turn), 0 elsewhere;
/// with `silent_start` the first half of the sequence (and one token more) trains nothing.
fn sequence(i: usize, silent_start: bool) -> (Vec<i32>, Vec<u8>) {
    let turn = TURN.as_bytes();
    let answer = TURN.find("assistant: ").unwrap() + "assistant: ".len();
    let (tokens, mut mask): (Vec<i32>, Vec<u8>) = (0..SEQ)
        .map(|p| {
            let at = (p + 13 * i) % turn.len();
            (i32::from(turn[at]), u8::from(at >= answer))
        })
        .unzip();
    if silent_start {
        mask[..=SEQ / 2].fill(0);
    }
    (tokens, mask)
}

/// A shard of byte tokens with a loss mask, in `dir`.
fn masked_writer(dir: &Path) -> ShardWriter {
    std::fs::create_dir_all(dir).unwrap();
    let meta = ShardMeta {
        vocab_size: 258,
        eos_id: 257,
        tokenizer: "byte".into(),
        tokenizer_source: "built-in".into(),
        task: "chat".into(),
    };
    ShardWriter::create(&dir.join("shard-00000.h5"), SEQ, &meta, false).unwrap().with_loss_mask().unwrap()
}

/// Writes sequences `first..first + n` (the first of them with a silent first half) into a shard
/// with a loss mask; returns the folder and each sequence's trained labels (label p counts when
/// token p + 1 is trained).
fn masked_shard(dir: &Path, name: &str, first: usize, n: usize) -> (PathBuf, Vec<u64>) {
    let out = dir.join(name);
    let mut w = masked_writer(&out);
    let mut trained = Vec::new();
    for i in first..first + n {
        let (tokens, mask) = sequence(i, i == first);
        w.push_masked(&tokens, Some(&mask), &[], SEQ).unwrap();
        trained.push(mask[1..].iter().map(|&m| u64::from(m)).sum());
    }
    w.finish().unwrap();
    (out, trained)
}

struct Run {
    sp: usize,
    dp: usize,
    zero: u8,
    /// `data.eval_paths` and `train.eval_every`, when the run evaluates a held-out set.
    held_out: Option<(PathBuf, usize)>,
    /// A Hugging Face model folder (`model.path`); None: the tiny preset.
    model: Option<PathBuf>,
}

impl Run {
    fn name(&self) -> String {
        let model =
            self.model.as_ref().map_or("tiny".into(), |p| p.file_name().unwrap().to_string_lossy().into_owned());
        let set = if self.held_out.is_some() { "eval" } else { "train" };
        format!("{model}-sp{}-dp{}-z{}-{set}", self.sp, self.dp, self.zero)
    }
}

fn experiment(dir: &Path, data: &Path, r: &Run) -> PathBuf {
    let (eval_paths, eval_every) = match &r.held_out {
        Some((path, every)) => (format!("eval_paths = [\"{}\"]", path.display()), format!("eval_every = {every}")),
        None => (String::new(), String::new()),
    };
    let model = r.model.as_ref().map_or("preset = \"tiny\"".into(), |p| format!("path = \"{}\"", p.display()));
    let toml = format!(
        r#"[run]
name = "{name}"
output_dir = "{out}"
seed = 11
[model]
{model}
[parallel]
sp = {sp}
dp = {dp}
zero_stage = {zero}
[data]
paths = ["{data}"]
seq_len = {SEQ}
shuffle = false
{eval_paths}
[train]
steps = {STEPS}
lr = 2e-3
min_lr = 2e-4
warmup_steps = 1
weight_decay = 0.1
clip_grad_norm = 0.5
{eval_every}
[checkpoint]
resume = "none"
"#,
        name = r.name(),
        out = dir.join("runs").display(),
        sp = r.sp,
        dp = r.dp,
        zero = r.zero,
        data = data.display(),
    );
    let path = dir.join(format!("{}.toml", r.name()));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Trains; returns the run's losses and final parameters, its folder and its printed output.
fn train(dir: &Path, data: &Path, r: &Run) -> (RunOutputs, PathBuf, String) {
    let exp = experiment(dir, data, r);
    let out = mpirun(r.sp * r.dp, &[exp.to_str().unwrap()], dir, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = dir.join("runs").join(r.name());
    let outputs = run_outputs(&run_dir);
    assert_eq!(outputs.0.len(), STEPS);
    (outputs, run_dir, text(&out))
}

#[test]
fn masked_training_under_sp_1_2_4_equals_one_rank_and_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (data, trained) = masked_shard(dir.path(), "chat", 0, 8);
    let run = |sp, zero| train(dir.path(), &data, &Run { sp, dp: 1, zero, held_out: None, model: None });
    let (single, run_dir, _) = run(1, 0);
    // One sample per step, in order (no shuffling): the step trains on what its sample's mask says.
    assert_eq!(column::<u64>(&run_dir, "trained_tokens"), trained[..STEPS].to_vec());
    assert!(trained[0] < trained[1], "the first sample's silent half trains less: {trained:?}");

    let exp =
        Experiment::load(&experiment(dir.path(), &data, &Run { sp: 1, dp: 1, zero: 0, held_out: None, model: None }))
            .unwrap();
    let reference = reference_run(&exp, common::reference::initial_weights(&exp));
    assert_same_run("single rank vs the reference trainer on masked labels", &reference, &single);
    for (sp, zero) in [(2, 3), (4, 0), (4, 3)] {
        let (got, run_dir, _) = run(sp, zero);
        assert_same_run(&format!("masked sp={sp} zero={zero}"), &single, &got);
        assert_eq!(column::<u64>(&run_dir, "trained_tokens"), trained[..STEPS].to_vec(), "sp={sp}");
    }
}

/// The reference trainer's masked loss of `params` on every sequence of `data`: the same labels
/// the loader makes (one rank, the whole sequence), the whole model as one graph.
fn reference_loss(exp: &Experiment, params: &RunOutputs, data: &Path) -> f64 {
    let spec = ulysses::config::validate(exp, None).unwrap();
    let named = params.1.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let reference = Reference::new(&spec, named);
    let dataset = Dataset::open(&[data.to_path_buf()], SEQ).unwrap();
    let spec = LoaderSpec {
        seed: 0,
        shuffle: false,
        dp: 1,
        dp_rank: 0,
        sp: 1,
        sp_rank: 0,
        ring: 1,
        micro_batch: dataset.len(),
        loss_on: exp.data.loss_on,
        packing: exp.data.packing(),
    };
    let batch = build_batch(&dataset, &spec, &(0..dataset.len()).collect::<Vec<_>>()).unwrap();
    reference.loss_and_grads(&[MicroBatch::from_batch(&batch, tch::Device::Cpu)]).0
}

#[test]
fn held_out_loss_under_every_layout_is_the_reference_forward() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = masked_shard(dir.path(), "chat", 0, 8);
    // Five held-out conversations: dp = 2 ranks take two rounds, the second one row short.
    let (held_out, held_out_trained) = masked_shard(dir.path(), "held-out", 100, 5);
    let expected_tokens: u64 = held_out_trained.iter().sum();
    for (sp, dp, zero) in [(1, 1, 0), (2, 2, 3), (4, 1, 3)] {
        let what = format!("sp={sp} dp={dp} zero={zero}");
        let r = Run { sp, dp, zero, held_out: Some((held_out.clone(), 2)), model: None };
        let (outputs, run_dir, printed) = train(dir.path(), &data, &r);
        // Every second step and the last.
        let eval_loss = column::<f64>(&run_dir, "eval_loss");
        assert!(eval_loss[0].is_nan() && eval_loss[1].is_finite() && eval_loss[2].is_finite(), "{what}: {eval_loss:?}");
        assert_eq!(column::<u64>(&run_dir, "eval_tokens"), vec![0, expected_tokens, expected_tokens], "{what}");
        let seconds = column::<f64>(&run_dir, "time_eval");
        assert!(seconds[0] == 0.0 && seconds[1] > 0.0 && seconds[2] > 0.0, "{what}: {seconds:?}");
        assert_eq!(printed.matches("eval_loss").count(), 2, "{what}: the step lines of steps 2 and 3:\n{printed}");

        let exp = Experiment::load(&experiment(dir.path(), &data, &r)).unwrap();
        let expected = reference_loss(&exp, &outputs, &held_out);
        let rel = (eval_loss[2] - expected).abs() / expected;
        assert!(
            rel <= 1e-6,
            "{what}: held-out loss {} vs the reference's {expected} (relative {rel:.2e})",
            eval_loss[2]
        );
        // The model learned between the two evaluations, on the same held-out labels.
        assert_ne!(eval_loss[1], eval_loss[2], "{what}");
        if sp == 1 {
            // `eval --task loss` of the final weights scores the same trained labels.
            let out = dir.path().join("loss.h5");
            let (exp, final_dir) = (experiment(dir.path(), &data, &r), run_dir.join("final"));
            let args = [
                "eval",
                exp.to_str().unwrap(),
                "--task",
                "loss",
                "--data",
                held_out.to_str().unwrap(),
                "--checkpoint",
                final_dir.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ];
            let o = ulysses(&args, dir.path());
            assert!(o.status.success(), "{}", text(&o));
            let Ok(ulysses::eval::results::EvalResults::Loss(curve)) = ulysses::eval::results::read(&out) else {
                panic!("{}: no loss curve", out.display())
            };
            assert_eq!(curve.tokens.iter().sum::<i64>() as u64, expected_tokens, "eval --task loss: trained labels");
            let mean =
                curve.loss.iter().zip(&curve.tokens).filter(|(_, &n)| n > 0).map(|(l, &n)| l * n as f64).sum::<f64>()
                    / expected_tokens as f64;
            let rel = (mean - eval_loss[2]).abs() / eval_loss[2];
            assert!(rel <= 1e-5, "eval --task loss {mean} vs the run's held-out loss {} ({rel:.2e})", eval_loss[2]);
        }
    }
}

/// `ulysses check` reports the fraction of labels training takes its loss over, for the training
/// data and the held-out set, and refuses a set whose mask trains nothing.
#[test]
fn check_reports_the_trained_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let (data, trained) = masked_shard(dir.path(), "chat", 0, 8);
    let (held_out, held_out_trained) = masked_shard(dir.path(), "held-out", 100, 5);
    let exp = experiment(dir.path(), &data, &Run { sp: 1, dp: 1, zero: 0, held_out: Some((held_out, 2)), model: None });
    let o = ulysses(&["check", exp.to_str().unwrap()], dir.path());
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let line = |trained: &[u64]| {
        let (n, labels) = (trained.iter().sum::<u64>(), trained.len() * (SEQ - 1));
        format!(
            "trained: {n} of {labels} labels ({:.1}%; loss mask recorded, data.loss_on = \"all\"; every sequence read)",
            100.0 * n as f64 / labels as f64
        )
    };
    assert!(t.contains(&line(&trained)) && t.contains(&line(&held_out_trained)), "{t}");
    assert!(t.contains("held-out   5 sequences (data.eval_paths), evaluated every 2 steps"), "{t}");

    // A held-out set whose mask trains nothing: its loss would be NaN.
    let silent = dir.path().join("silent");
    let mut w = masked_writer(&silent);
    w.push_masked(&sequence(0, false).0, Some(&[0; SEQ]), &[], SEQ).unwrap();
    w.finish().unwrap();
    let set = format!("data.eval_paths=[\"{}\"]", silent.display());
    let t = assert_clean_failure(&ulysses(&["check", exp.to_str().unwrap(), "--set", &set], dir.path()));
    assert!(t.contains("data.eval_paths: no label is trained in the 1 sequence(s) read"), "{t}");
}

/// The newcomer's path: a Hugging Face model folder (Qwen3, made by transformers with its
/// tokenizer) trained on masked shards under sp = 2; transformers loads the run's `final/` and
/// its loss on the held-out batch, labels masked as the shard's `loss_mask` says (its own shift),
/// equals the run's held-out loss after the last step, on the same trained labels.
#[test]
fn the_final_checkpoints_masked_loss_is_transformers_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = masked_shard(dir.path(), "chat", 0, 8);
    let (held_out, held_out_trained) = masked_shard(dir.path(), "held-out", 100, 5);
    let model = model_support::hf_models().join("qwen3");
    let r = Run { sp: 2, dp: 1, zero: 3, held_out: Some((held_out.clone(), STEPS)), model: Some(model) };
    let (_, run_dir, _) = train(dir.path(), &data, &r);
    let eval_loss = column::<f64>(&run_dir, "eval_loss")[STEPS - 1];

    let shard = held_out.join("shard-00000.h5");
    let out = model_support::hf_python(&[Path::new("masked_loss"), &run_dir.join("final"), &shard]);
    let hf: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(hf["trained"].as_u64().unwrap(), held_out_trained.iter().sum::<u64>(), "the same trained labels");
    let hf_loss = hf["loss"].as_f64().unwrap();
    let rel = (eval_loss - hf_loss).abs() / hf_loss;
    assert!(rel <= 1e-5, "held-out loss {eval_loss} vs transformers' {hf_loss} (relative {rel:.2e})");
}
