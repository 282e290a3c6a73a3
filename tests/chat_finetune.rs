//! Issue 31's newcomer path, end to end: a folder of Parquet chat data written by pyarrow and a
//! Hugging Face model folder (a tiny random Qwen3 with a Qwen3-style chat template, written by
//! transformers) -> `ulysses data prepare --split` (packed; documents held out by seed) ->
//! `ulysses train` under sp = 2 with the held-out loss -> transformers loads the run's `final/`
//! and its loss on the held-out shard, with labels it makes itself (each conversation's own
//! assistant mask, from the template marked with `{% generation %}`; -100 elsewhere), equals the
//! run's held-out loss after the last step within 1e-5 relative (fp32 on both sides, which differ
//! only in summation order).
mod chat_common;
mod common;

use chat_common::chat_python;
use common::{column, mpirun, text, ulysses};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const SEQ: usize = 128;
const STEPS: usize = 3;
const CONVERSATIONS: usize = 24;
const HELD_OUT: usize = 6;

/// Distinct conversations (each opens with its own number, so transformers' side tells them
/// apart in a packed stream): one or two turns, some with a system prompt, some with reasoning.
fn conversations() -> Value {
    let all = (0..CONVERSATIONS)
        .map(|k| {
            let (a, b) = (k * 7 + 3, k * 5 + 11);
            let mut m = Vec::new();
            if k % 3 == 0 {
                m.push(json!({"role": "system", "content": "You are a helpful assistant."}));
            }
            m.push(json!({"role": "user", "content": format!("{k}: what is {a} plus {b}?")}));
            let answer = if k % 4 == 1 {
                format!("<think>\nAdd {a} and {b}.\n</think>\n\nIt is {}.", a + b)
            } else {
                format!("{a} plus {b} is {}.", a + b)
            };
            m.push(json!({"role": "assistant", "content": answer}));
            if k % 2 == 0 {
                m.push(json!({"role": "user", "content": "And the capital of France?"}));
                m.push(json!({"role": "assistant", "content": "The capital of France is Paris."}));
            }
            Value::Array(m)
        })
        .collect();
    Value::Array(all)
}

/// The README's experiment: the model folder, the prepared data, its held-out set.
fn experiment(dir: &Path, model: &Path, data: &Path) -> PathBuf {
    let toml = format!(
        r#"[run]
name = "sft"
output_dir = "{runs}"
seed = 5
[model]
path = "{model}"
[parallel]
sp = 2
zero_stage = 3
[data]
paths = ["{data}"]
eval_paths = ["{held_out}"]
seq_len = {SEQ}
[train]
steps = {STEPS}
lr = 2e-3
warmup_steps = 1
eval_every = {STEPS}
[checkpoint]
resume = "none"
"#,
        runs = dir.join("runs").display(),
        model = model.display(),
        data = data.display(),
        held_out = data.join("heldout").display(),
    );
    let path = dir.join("sft.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// transformers' view of each shard under `model`: its masked loss, trained labels and the
/// conversations it packs.
fn transformers_view(model: &Path, conversations: &Path, shards: &[PathBuf]) -> Vec<Value> {
    let mut args = vec!["chat_loss", model.to_str().unwrap(), conversations.to_str().unwrap()];
    args.extend(shards.iter().map(|s| s.to_str().unwrap()));
    chat_python(&args).lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn indices(view: &Value) -> Vec<u64> {
    view["conversations"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

#[test]
fn parquet_chats_train_to_a_checkpoint_whose_masked_loss_is_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("Qwen3-tiny");
    chat_python(&["model", model.to_str().unwrap()]);
    let conv = d.join("conversations.json");
    std::fs::write(&conv, conversations().to_string()).unwrap();
    let chats = d.join("chats");
    chat_python(&["parquet", conv.to_str().unwrap(), chats.to_str().unwrap()]);
    let mut parts: Vec<PathBuf> = std::fs::read_dir(&chats).unwrap().map(|e| e.unwrap().path()).collect();
    parts.sort();
    assert_eq!(parts.len(), 2, "{parts:?}");

    // `data prepare chats/*.parquet --tokenizer MODEL ... --split N`, as the README says.
    let data = d.join("data");
    let (seq, held) = (SEQ.to_string(), HELD_OUT.to_string());
    let mut args = vec!["data", "prepare"];
    args.extend(parts.iter().map(|p| p.to_str().unwrap()));
    args.extend(["--tokenizer", model.to_str().unwrap(), "--seq-len", &seq, "--out", data.to_str().unwrap()]);
    args.extend(["--split", &held, "--seed", "3"]);
    let o = ulysses(&args, d);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("held out {HELD_OUT} documents")), "{}", text(&o));

    // transformers finds in the shards the conversations it renders, in packed streams: the
    // held-out ones in input order, none of them in the training shards.
    let train_shards: Vec<PathBuf> = ulysses::data::shard_files(&[data.clone()]).unwrap();
    let held_shard = data.join("heldout/shard-00000.h5");
    let views = transformers_view(&model, &conv, &[train_shards.clone(), vec![held_shard.clone()]].concat());
    let held_view = views.last().unwrap();
    let held_out = indices(held_view);
    assert!(held_view["sequences"].as_u64().unwrap() >= 2, "{held_view}");
    assert!(held_out.windows(2).all(|w| w[0] < w[1]), "held out in input order: {held_out:?}");
    let trained: Vec<u64> = views[..views.len() - 1].iter().flat_map(indices).collect();
    assert!(trained.iter().all(|k| !held_out.contains(k)), "train {trained:?} and held out {held_out:?} overlap");

    // `ulysses train` under sp = 2, evaluating the held-out set after the last step.
    let exp = experiment(d, &model, &data);
    let o = mpirun(2, &["train", exp.to_str().unwrap()], d, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let run_dir = d.join("runs/sft");
    let losses = column::<f64>(&run_dir, "loss");
    assert!(losses.iter().all(|l| l.is_finite()) && losses[STEPS - 1] < losses[0], "it trained: {losses:?}");
    let eval_loss = column::<f64>(&run_dir, "eval_loss")[STEPS - 1];
    let eval_tokens = column::<u64>(&run_dir, "eval_tokens")[STEPS - 1];

    // transformers on the final checkpoint, labels from its own assistant masks.
    let view = &transformers_view(&run_dir.join("final"), &conv, &[held_shard])[0];
    assert_eq!(indices(view), held_out);
    assert_eq!(view["trained"].as_u64().unwrap(), eval_tokens, "the same trained labels");
    let hf_loss = view["loss"].as_f64().unwrap();
    let rel = (eval_loss - hf_loss).abs() / hf_loss;
    assert!(rel <= 1e-5, "held-out loss {eval_loss} vs transformers' {hf_loss} (relative {rel:.2e})");
    // The untrained model's loss differs: the comparison sees the training.
    let before = held_view["loss"].as_f64().unwrap();
    assert!((before - hf_loss).abs() > 1e-3 * hf_loss, "final {hf_loss} vs initial {before}");
}
