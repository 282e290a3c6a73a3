//! `ulysses check`'s look at the data: when the experiment's shards are on this machine, the checks
//! training makes before its first step (every shard's format and attributes, the sequence length,
//! the vocabulary against the model's, passkey answers for `loss_on = "answer"`, enough sequences
//! for one step), and what remains unchecked. A machine without the data (a laptop planning a
//! cluster job) gets the plan and a clear "not checked", not a failure.
use crate::config::Experiment;
use crate::data::{shard_files, Dataset, LossOn};
use crate::model::spec::ModelSpec;
use std::fmt::Write;

/// What the data check found: lines for the report, and the problems that make training fail.
pub struct DataCheck {
    pub report: String,
    pub problems: Vec<String>,
    /// False when none of `data.paths` is on this machine (nothing could be checked).
    pub checked: bool,
}

/// Checks the shards of `exp.data` against the rest of the experiment and the model (`spec`).
pub fn check_data(exp: &Experiment, spec: &ModelSpec) -> DataCheck {
    let d = &exp.data;
    let mut report = String::new();
    let missing: Vec<String> = d.paths.iter().filter(|p| !p.exists()).map(|p| p.display().to_string()).collect();
    if missing.len() == d.paths.len() {
        let _ = writeln!(
            report,
            "data       NOT CHECKED: {} not found on this machine (training needs it: make shards with \
             `ulysses data synth` or `ulysses data prepare`, or fix data.paths)",
            missing.join(", ")
        );
        return DataCheck { report, problems: Vec::new(), checked: false };
    }
    let fail = |problems: Vec<String>, mut report: String| {
        let _ = writeln!(report, "data       does not fit the experiment (see the problems below)");
        DataCheck { report, problems, checked: true }
    };
    if !missing.is_empty() {
        let problems =
            missing.iter().map(|p| format!("data.paths: \"{p}\" does not exist (the other paths do)")).collect();
        return fail(problems, report);
    }
    let dataset = match Dataset::open(&d.paths, d.seq_len) {
        Ok(ds) => ds,
        Err(e) => return fail(vec![format!("data: {e}")], report),
    };
    let shards = shard_files(&d.paths).map(|f| f.len()).unwrap_or(0);
    let mut problems = Vec::new();
    if dataset.vocab_size() > spec.vocab_size {
        problems.push(format!(
            "data: the shards' vocabulary has {} tokens (tokenizer {}) but the model's has {}; prepare the data with the model's tokenizer or use a model with a larger vocabulary",
            dataset.vocab_size(),
            dataset.tokenizer(),
            spec.vocab_size
        ));
    }
    let per_step = exp.parallel.dp * exp.train.micro_batch;
    if dataset.len() < per_step {
        problems.push(format!(
            "data: {} sequences, fewer than parallel.dp × train.micro_batch = {} × {} that one step takes",
            dataset.len(),
            exp.parallel.dp,
            exp.train.micro_batch
        ));
    }
    let answers = match dataset.passkey(0) {
        Ok(info) => info.is_some(),
        Err(e) => {
            problems.push(format!("data: {e}"));
            false
        }
    };
    if d.loss_on == LossOn::Answer && !answers {
        problems.push(
            "data.loss_on: = \"answer\" needs passkey answers in the shards, and they have none; use loss_on = \"all\" or data from `ulysses data synth --task passkey`".into(),
        );
    }
    let documents = matches!(dataset.doc_starts(0), Ok(Some(_)));
    let samples_per_step = per_step * exp.train.grad_accum;
    let steps_per_epoch = dataset.len() / samples_per_step.max(1);
    let epochs = (exp.train.steps * samples_per_step) as f64 / dataset.len().max(1) as f64;
    let _ = writeln!(
        report,
        "data       {} sequences of {} tokens in {shards} shard(s); vocabulary {} of the model's {} (tokenizer {}); {}{}",
        dataset.len(),
        dataset.seq_len(),
        dataset.vocab_size(),
        spec.vocab_size,
        dataset.tokenizer(),
        if answers { "passkey answers recorded" } else { "no passkey answers" },
        if documents { ", document boundaries recorded" } else { "" },
    );
    let _ = writeln!(
        report,
        "           {steps_per_epoch} optimizer steps per epoch: train.steps = {} is {epochs:.2} epoch(s)",
        exp.train.steps
    );
    if !problems.is_empty() {
        return fail(problems, report);
    }
    let _ = writeln!(
        report,
        "           not checked: token ids of every sequence (`ulysses data inspect FILE --scan`), that the \
         tokenizer is the model's (only the vocabulary size is compared)"
    );
    DataCheck { report, problems, checked: true }
}
