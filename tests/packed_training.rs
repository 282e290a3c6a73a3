//! Packed documents in real multi-rank jobs (mpirun, CPU, fp32), against the readable reference
//! trainer fed every document as its own sample:
//! - training on packed text with `data.documents = "mask"` and restarting positions gives, for
//!   sp ∈ {1, 2, 4} (kept and recomputed attention, every document by the masked kernel or the
//!   long ones by the causal kernel one by one, two samples per micro batch), every step's
//!   loss within 1e-6 and every parameter within 1e-5 of the reference's (at lr 1e-3: Adam turns
//!   fp32 rounding in near-zero gradient entries into parameter differences proportional to the
//!   learning rate, see tests/train_equivalence.rs; at 2e-3 they reached 1.5e-5), with documents that
//!   cross SP chunks, tiny documents and a document longer than the sequence; metrics.h5 counts
//!   the documents of each step and bins the loss by position within the document;
//! - sequences of one document each give exactly today's run, bit for bit;
//! - a shard with a bad document start stops the run with the file, the sequence and the value;
//! - `eval --task loss --by document` attends within documents: packed text scores as the same
//!   documents padded one per sequence, and sp = 2 scores as sp = 1.
mod common;
mod eval_common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;
use ulysses::config::Experiment;
use ulysses::data::{Dataset, IGNORE_INDEX};
use ulysses::eval::results::EvalResults;
use ulysses::optim::AdamW;
use ulysses::rng::SplitMix64;
use ulysses::train::{schedule::lr_at, step::MicroBatch};

const SEQ: usize = 240;
const STEPS: usize = 3;

/// Writes `lens.len()` JSONL documents of random lowercase text with these lengths (bytes; the
/// byte tokenizer adds EOS) and prepares them into shards of `SEQ` tokens.
fn prepare(dir: &Path, name: &str, lens: &[usize], layout: &str) -> PathBuf {
    let mut rng = SplitMix64::new(3);
    let lines: Vec<String> = lens
        .iter()
        .map(|&n| {
            let text: String = (0..n).map(|_| (b'a' + rng.below(26) as u8) as char).collect();
            format!("{{\"text\": \"{text}\"}}")
        })
        .collect();
    let jsonl = dir.join(format!("{name}.jsonl"));
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let out = dir.join(name);
    let args = ["data", "prepare", jsonl.to_str().unwrap(), "--seq-len", "240", "--layout", layout];
    let o = ulysses(&[&args[..], &["--out", out.to_str().unwrap()]].concat(), dir);
    assert!(o.status.success(), "{}", text(&o));
    out
}

/// Tiny documents (1 to 3 bytes), documents that cross the SP chunks (60 tokens at sp = 4, 120 at
/// sp = 2) and one longer than the sequence, repeated into a dozen sequences.
fn packed_text(dir: &Path) -> PathBuf {
    let cycle = [1, 2, 44, 3, 130, 1, 410, 75, 20, 2, 97];
    let lens: Vec<usize> = cycle.iter().cycle().take(3 * cycle.len()).copied().collect();
    prepare(dir, "packed", &lens, "pack")
}

struct Run<'a> {
    name: &'a str,
    sp: usize,
    zero: u8,
    /// Lines for [parallel] and [data] and [metrics].
    parallel: &'a str,
    data: &'a str,
    metrics: &'a str,
}

fn experiment(dir: &Path, data: &Path, r: &Run) -> PathBuf {
    let toml = format!(
        r#"[run]
name = "{name}"
output_dir = "{out}"
seed = 11
[model]
preset = "tiny"
[parallel]
sp = {sp}
dp = 1
zero_stage = {zero}
{parallel}
[data]
paths = ["{data}"]
seq_len = {SEQ}
{data_lines}
[train]
steps = {STEPS}
micro_batch = 2
lr = 1e-3
min_lr = 1e-4
warmup_steps = 1
weight_decay = 0.1
clip_grad_norm = 0.5
[checkpoint]
resume = "none"
[metrics]
{metrics}
"#,
        name = r.name,
        out = dir.join("runs").display(),
        sp = r.sp,
        zero = r.zero,
        parallel = r.parallel,
        data = data.display(),
        data_lines = r.data,
        metrics = r.metrics,
    );
    let path = dir.join(format!("{}.toml", r.name));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Trains under mpirun; returns (loss per step, final parameters by name).
fn train(dir: &Path, data: &Path, r: &Run) -> (Vec<f64>, BTreeMap<String, Tensor>) {
    let exp = experiment(dir, data, r);
    let out = mpirun(r.sp, &[exp.to_str().unwrap()], dir, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let run_dir = dir.join("runs").join(r.name);
    let f = hdf5::File::open(run_dir.join("metrics.h5")).unwrap();
    let losses: Vec<f64> = f.dataset("steps/loss").unwrap().read_raw().unwrap();
    assert_eq!(losses.len(), STEPS);
    let mut params = BTreeMap::new();
    for e in std::fs::read_dir(run_dir.join("final")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            params.extend(Tensor::read_safetensors(&p).unwrap());
        }
    }
    (losses, params)
}

const MASK: &str = "documents = \"mask\"\npositions = \"document\"";

/// What the reference saw in each step: its documents, and its valid labels binned by position
/// within the document into 8 bins of 30 positions (metrics' `position_by = "document"`).
struct Seen {
    documents: Vec<u64>,
    bins: Vec<Vec<u64>>,
}

/// The reference trainer on the same samples in the same order, each document of each sample a
/// micro batch of its own (positions from 0, the last label -100): the step's loss is the sum of
/// their token losses over the step's labels.
fn reference_on_each_document(exp: &Path) -> (Vec<f64>, BTreeMap<String, Tensor>, Seen) {
    let exp = Experiment::load(exp).unwrap();
    let (mut reference, mut loader) = common::reference::reference_and_loader(&exp);
    let t = &exp.train;
    let (mut losses, mut seen) = (Vec::new(), Seen { documents: Vec::new(), bins: Vec::new() });
    for step in 1..=t.steps {
        let b = loader.next_batch().unwrap();
        let mut alone = Vec::new();
        let mut bins = vec![0u64; 8];
        for (row, docs) in b.documents.iter().enumerate() {
            let ids = &b.input_ids[row * SEQ..(row + 1) * SEQ];
            for (&start, len) in docs.starts().iter().zip(docs.lens()) {
                let ids = &ids[start..start + len];
                let mut labels = ids[1..].to_vec();
                labels.push(IGNORE_INDEX);
                for (q, _) in labels.iter().enumerate().filter(|(_, &l)| l != IGNORE_INDEX) {
                    bins[q * 8 / SEQ] += 1;
                }
                let v = |x: &[i64]| Tensor::from_slice(x).view([1, len as i64]);
                alone.push(MicroBatch::unpacked(v(ids), v(&labels), v(&(0..len as i64).collect::<Vec<_>>())));
            }
        }
        seen.documents.push(alone.len() as u64);
        seen.bins.push(bins);
        losses.push(reference.step(&alone, &AdamW::new(t), lr_at(t, step), t.clip_grad_norm).0);
    }
    let params = reference.named().iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();
    (losses, params, seen)
}

#[test]
fn packed_training_equals_each_document_alone_for_sp_1_2_4() {
    let dir = tempfile::tempdir().unwrap();
    let data = packed_text(dir.path());
    let metrics = "position_loss_every = 1\nposition_bins = 8\nposition_by = \"document\"";
    let runs = [
        Run { name: "sp1", sp: 1, zero: 0, parallel: "", data: MASK, metrics },
        Run { name: "sp2-recompute", sp: 2, zero: 3, parallel: "keep_attention = false", data: MASK, metrics: "" },
        Run { name: "sp4", sp: 4, zero: 3, parallel: "", data: MASK, metrics: "" },
        // Documents of 16 tokens or more by the causal kernel one by one, the rest by the mask.
        Run {
            name: "sp2-per-document",
            sp: 2,
            zero: 3,
            parallel: "per_document_min_len = 16",
            data: MASK,
            metrics: "",
        },
    ];
    let (losses, params, seen) = reference_on_each_document(&experiment(dir.path(), &data, &runs[0]));
    assert!(seen.documents.iter().all(|&n| n >= 6), "each step holds several documents: {:?}", seen.documents);
    let reference = (losses, params);
    for r in &runs {
        assert_same_run(&format!("sp = {} ({})", r.sp, r.name), &reference, &train(dir.path(), &data, r));
    }
    // metrics.h5: the documents of each step, and the loss binned by position in the document.
    let f = hdf5::File::open(dir.path().join("runs/sp1/metrics.h5")).unwrap();
    assert_eq!(f.dataset("steps/documents").unwrap().read_raw::<u64>().unwrap(), seen.documents);
    let by: hdf5::types::VarLenUnicode = f.attr("position_by").unwrap().read_scalar().unwrap();
    assert_eq!(by.as_str(), "document");
    let tokens = f.dataset("position_loss/tokens").unwrap().read_2d::<u64>().unwrap();
    for (step, bins) in seen.bins.iter().enumerate() {
        assert_eq!(tokens.row(step).to_vec(), *bins, "step {}: valid labels per bin", step + 1);
    }
}

#[test]
fn one_document_per_sequence_is_todays_path_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("whole");
    let args = ["data", "synth", "--task", "random", "--seq-len", "240", "--num", "8", "--doc-len", "240"];
    let o = ulysses(&[&args[..], &["--out", data.to_str().unwrap()]].concat(), dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let ignore = train(dir.path(), &data, &Run { name: "ignore", sp: 2, zero: 3, parallel: "", data: "", metrics: "" });
    let mask = train(dir.path(), &data, &Run { name: "mask", sp: 2, zero: 3, parallel: "", data: MASK, metrics: "" });
    assert_eq!(
        ignore.0.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        mask.0.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
    );
    for (name, a) in &ignore.1 {
        assert!(a.equal(&mask.1[name]), "{name} differs");
    }
}

#[test]
fn a_bad_document_start_stops_the_run_with_file_sequence_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.h5");
    let meta = ulysses::data::format::ShardMeta {
        vocab_size: 258,
        eos_id: 257,
        tokenizer: "byte".into(),
        tokenizer_source: "built-in".into(),
        task: "text".into(),
    };
    let mut w = ulysses::data::format::ShardWriter::create(&path, SEQ, &meta, true).unwrap();
    for i in 0..4 {
        let starts: &[i32] = if i == 2 { &[0, 90, 60] } else { &[0, 60] };
        w.push(&[7; SEQ], starts).unwrap();
    }
    w.finish().unwrap();
    let exp =
        experiment(dir.path(), &path, &Run { name: "bad", sp: 2, zero: 3, parallel: "", data: MASK, metrics: "" });
    let t = assert_clean_failure(&mpirun(2, &[exp.to_str().unwrap()], dir.path(), &[]));
    for expected in ["bad.h5", "docs/starts", "sequence 2", "document start 60", "unsorted"] {
        assert!(t.contains(expected), "the error lacks {expected:?}:\n{t}");
    }
}

/// `eval --task loss` on `data` with the experiment's packing; returns its loss curve.
fn eval_loss(
    dir: &Path,
    exp: &Path,
    checkpoint: &Path,
    data: &Path,
    ranks: usize,
    by: &str,
) -> ulysses::eval::loss::LossResult {
    let out = dir.join(format!("loss-{}-{ranks}-{by}.h5", data.file_name().unwrap().to_string_lossy()));
    let sp = ranks.to_string();
    let args = [
        "eval",
        exp.to_str().unwrap(),
        "--task",
        "loss",
        "--sp",
        &sp,
        "--by",
        by,
        "--bins",
        "6",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let o = if ranks == 1 { ulysses(&args, dir) } else { mpirun(ranks, &args, dir, &[]) };
    assert!(o.status.success(), "{}", text(&o));
    match eval_common::results(&out) {
        EvalResults::Loss(r) => r,
        EvalResults::Grid { .. } => panic!("expected a loss curve"),
    }
}

#[test]
fn eval_within_documents_scores_packed_text_as_the_same_documents_padded() {
    let dir = tempfile::tempdir().unwrap();
    // Documents (with their EOS) that tile each 240-token sequence exactly, so packing cuts none.
    let lens: Vec<usize> = [99, 59, 79].iter().cycle().take(12).copied().collect();
    let packed = prepare(dir.path(), "tiled", &lens, "pack");
    let padded = prepare(dir.path(), "padded", &lens, "pad");
    assert_eq!(Dataset::open(&[packed.clone()], SEQ).unwrap().len(), 4);
    assert_eq!(Dataset::open(&[padded.clone()], SEQ).unwrap().len(), 12);
    let exp =
        experiment(dir.path(), &packed, &Run { name: "eval", sp: 1, zero: 3, parallel: "", data: MASK, metrics: "" });
    let checkpoint = eval_common::random_checkpoint(dir.path(), 5);
    let a = eval_loss(dir.path(), &exp, &checkpoint, &packed, 1, "document");
    let b = eval_loss(dir.path(), &exp, &checkpoint, &padded, 1, "document");
    let c = eval_loss(dir.path(), &exp, &checkpoint, &packed, 2, "document");
    // Every document's labels but its last (EOS before the next document, or padding).
    let valid: i64 = lens.iter().map(|&l| l as i64).sum();
    assert_eq!(a.tokens.iter().sum::<i64>(), valid, "{:?}", a.tokens);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.tokens, c.tokens);
    assert!(a.tokens[..3].iter().all(|&n| n > 0) && a.tokens[3..].iter().all(|&n| n == 0), "{:?}", a.tokens);
    for (what, other) in [("padded", &b), ("sp = 2", &c)] {
        for (k, (x, y)) in a.loss.iter().zip(&other.loss).enumerate().take(3) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{what}: bin {k}: {y} vs {x}");
        }
    }
}
