//! `ulysses check`'s look at the data: when the experiment's shards are on this machine, the checks
//! training makes before its first step (every shard's format and attributes, the sequence length,
//! the vocabulary against the model's, passkey answers for `loss_on = "answer"`, enough sequences
//! for one step, the held-out shards of `data.eval_paths`), the fraction of labels training takes
//! its loss over, and what remains unchecked. A machine without the data (a laptop planning a
//! cluster job) gets the plan and a clear "not checked", not a failure.
use crate::config::Experiment;
use crate::data::model_files::model_eos_ids;
use crate::data::{build_batch, shard_files, DataError, Dataset, LoaderSpec, LossOn, IGNORE_INDEX};
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
    let eos_note = check_eos(exp, &dataset, &mut problems);
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
    if let Some(note) = eos_note {
        let _ = writeln!(report, "           {note}");
    }
    let _ = writeln!(
        report,
        "           {steps_per_epoch} optimizer steps per epoch: train.steps = {} is {epochs:.2} epoch(s)",
        exp.train.steps
    );
    if problems.is_empty() {
        trained_line(exp, &dataset, "data", &mut report, &mut problems);
    }
    if !d.eval_paths.is_empty() {
        check_held_out(exp, spec, &mut report, &mut problems);
    }
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

/// Sequences the trained fraction reads at most, spread evenly over the data: enough for a
/// fraction to two digits, few enough that `check` stays quick on terabytes of shards.
const TRAINED_SAMPLE: usize = 256;

/// The fraction of labels the loss is taken over, as the loader makes them (loss mask, passkey
/// answers, document boundaries, padding), over up to `TRAINED_SAMPLE` sequences: (trained
/// labels, labels, sequences read).
fn trained_fraction(exp: &Experiment, dataset: &Dataset) -> Result<(usize, usize, usize), DataError> {
    let spec = LoaderSpec {
        seed: 0,
        shuffle: false,
        dp: 1,
        dp_rank: 0,
        sp: 1,
        sp_rank: 0,
        ring: 1,
        micro_batch: 1,
        loss_on: exp.data.loss_on,
        packing: exp.data.packing(),
    };
    let n = dataset.len().min(TRAINED_SAMPLE);
    let (mut trained, mut labels) = (0, 0);
    for k in 0..n {
        let batch = build_batch(dataset, &spec, &[k * dataset.len() / n])?;
        trained += batch.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        // The last position has no next token: never a label.
        labels += batch.labels.len() - 1;
    }
    Ok((trained, labels, n))
}

/// The report's line on the trained fraction of `what` (`data` or `data.eval_paths`); a set that
/// trains no label at all is a problem (training on it learns nothing, a held-out loss of it is
/// NaN).
fn trained_line(exp: &Experiment, dataset: &Dataset, what: &str, report: &mut String, problems: &mut Vec<String>) {
    let (trained, labels, read) = match trained_fraction(exp, dataset) {
        Ok(counts) => counts,
        Err(e) => return problems.push(format!("{what}: {e}")),
    };
    let of = if read < dataset.len() {
        format!("{read} of {} sequences read", dataset.len())
    } else {
        "every sequence read".into()
    };
    let mask = if dataset.has_loss_mask() { "loss mask recorded" } else { "no loss mask" };
    let _ = writeln!(
        report,
        "           trained: {trained} of {labels} labels ({:.1}%; {mask}, data.loss_on = \"{}\"; {of})",
        100.0 * trained as f64 / labels.max(1) as f64,
        match exp.data.loss_on {
            LossOn::All => "all",
            LossOn::Answer => "answer",
        },
    );
    if trained == 0 {
        problems.push(format!(
            "{what}: no label is trained in the {read} sequence(s) read (loss mask, data.loss_on, documents and padding leave none); check how the data was prepared"
        ));
    }
}

/// `data.eval_paths`: the held-out shards open with the training data's sequence length and
/// vocabulary, and train some label.
fn check_held_out(exp: &Experiment, spec: &ModelSpec, report: &mut String, problems: &mut Vec<String>) {
    let d = &exp.data;
    if let Some(p) = d.eval_paths.iter().find(|p| !p.exists()) {
        return problems.push(format!("data.eval_paths: \"{}\" does not exist", p.display()));
    }
    let dataset = match Dataset::open(&d.eval_paths, d.seq_len) {
        Ok(ds) => ds,
        Err(e) => return problems.push(format!("data.eval_paths: {e}")),
    };
    if dataset.vocab_size() > spec.vocab_size {
        return problems.push(format!(
            "data.eval_paths: the shards' vocabulary has {} tokens but the model's has {}; prepare the held-out data with the model's tokenizer",
            dataset.vocab_size(),
            spec.vocab_size
        ));
    }
    let _ = writeln!(
        report,
        "held-out   {} sequences (data.eval_paths), evaluated every {} steps",
        dataset.len(),
        exp.train.eval_every
    );
    trained_line(exp, &dataset, "data.eval_paths", report, problems);
}

/// The shards' EOS against the ids the model folder ends sequences with (tokenizer_config.json's
/// `eos_token`, generation_config.json's and config.json's `eos_token_id`): data prepared with
/// another EOS teaches the model to stop with a token it never stops on. A problem for data of a
/// Hugging Face tokenizer; for the byte tokenizer's (test and demo data) a note.
fn check_eos(exp: &Experiment, dataset: &Dataset, problems: &mut Vec<String>) -> Option<String> {
    // The model folder: model.path, or the folder of model.weights or model.config.
    let named = exp.model.weights_path().or(exp.model.config.as_deref())?;
    let dir = if named.is_dir() { named } else { named.parent()? };
    let ids = match model_eos_ids(dir) {
        Ok(ids) if !ids.is_empty() => ids,
        Ok(_) => return None,
        Err(e) => {
            problems.push(format!("model: {e}"));
            return None;
        }
    };
    if ids.contains(&dataset.eos_id()) {
        return None;
    }
    let message = format!(
        "the shards' EOS id is {} but the model {} ends sequences with {ids:?} (tokenizer_config.json `eos_token`, generation_config.json / config.json `eos_token_id`); prepare the data with `ulysses data prepare --tokenizer {}`",
        dataset.eos_id(),
        dir.display(),
        dir.display()
    );
    if dataset.tokenizer() == "byte" {
        return Some(format!("note: {message}"));
    }
    problems.push(format!("data: {message}"));
    None
}
