//! Chat data against transformers: `data prepare` renders conversations with a model folder's chat
//! template into the token ids transformers' `apply_chat_template` gives, with the loss mask
//! transformers' own assistant mask gives for the same template marked with `{% generation %}`
//! (tests/hf/chat_templates.py builds Llama-3-style and Qwen3-style tokenizers locally); Parquet,
//! Arrow and `save_to_disk` folders written by pyarrow read back to the same shards; bad input
//! gives one message naming the file, the record and the field.
mod chat_common;
mod data_common;

use chat_common::chat_python;
use data_common::ulysses;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use ulysses::data::Dataset;

const SEQ: usize = 256;

/// The tiny llama3 and qwen3 tokenizer folders, built once per test binary.
fn models() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        chat_python(&["make", dir.path().to_str().unwrap()]);
        dir
    })
    .path()
}

/// Single and multi-turn conversations, with and without a system prompt, reasoning in the answer
/// (`<think>` in the content, `reasoning_content`), non-ASCII text.
fn conversations() -> Value {
    json!([
        [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "The capital of France is Paris."}],
        [{"role": "user", "content": "Think first: 2+2?"},
         {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\nIt is 4."}],
        [{"role": "user", "content": "é ü — ünïcode ✓"},
         {"role": "assistant", "content": "Ça va ✓", "reasoning_content": "The user writes unicode."},
         {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Fine."}]
    ])
}

struct Expected {
    ids: Vec<i32>,
    mask: Vec<u8>,
}

/// transformers' ids and assistant mask of every conversation for `family`.
fn expected(family: &str, dir: &Path) -> Vec<Expected> {
    let conv = dir.join("conversations.json");
    std::fs::write(&conv, conversations().to_string()).unwrap();
    let out = dir.join(format!("{family}.json"));
    let model = models().join(family);
    chat_python(&["expect", model.to_str().unwrap(), conv.to_str().unwrap(), out.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    let ints = |x: &Value| x.as_array().unwrap().iter().map(|i| i.as_i64().unwrap()).collect::<Vec<_>>();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| Expected {
            ids: ints(&e["ids"]).into_iter().map(|i| i as i32).collect(),
            mask: ints(&e["mask"]).into_iter().map(|i| i as u8).collect(),
        })
        .collect()
}

fn write_jsonl(path: &Path, records: &[Value]) {
    let lines: Vec<String> = records.iter().map(Value::to_string).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `data prepare INPUTS --layout pad` (one conversation per sequence) with `extra` flags.
fn prepare(inputs: &[&Path], family: &str, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let model = models().join(family);
    let mut args = vec!["data", "prepare"];
    args.extend(inputs.iter().map(|p| p.to_str().unwrap()));
    let seq = SEQ.to_string();
    args.extend(["--tokenizer", model.to_str().unwrap(), "--seq-len", &seq, "--layout", "pad"]);
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(extra);
    ulysses(&args)
}

/// Each sequence's tokens and loss mask up to its padding.
fn sequences(out: &Path) -> Vec<(Vec<i32>, Vec<u8>)> {
    let ds = Dataset::open(&[out.to_path_buf()], SEQ).unwrap();
    (0..ds.len())
        .map(|i| {
            let end = ds.pad_start(i).unwrap().unwrap_or(SEQ);
            let mask = ds.loss_mask(i, 0, end).unwrap().unwrap_or_else(|| vec![1; end]);
            (ds.read_span(i, 0, end).unwrap(), mask)
        })
        .collect()
}

/// Only the last run of ones (the last assistant turn: turns are separated by headers).
fn last_run(mask: &[u8]) -> Vec<u8> {
    let end = mask.iter().rposition(|&m| m == 1).unwrap() + 1;
    let start = mask[..end].iter().rposition(|&m| m == 0).map_or(0, |p| p + 1);
    (0..mask.len()).map(|i| u8::from((start..end).contains(&i))).collect()
}

#[test]
fn conversations_render_and_mask_as_transformers_does() {
    for family in ["llama3", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        let want = expected(family, dir.path());
        let jsonl = dir.path().join("chat.jsonl");
        let records: Vec<Value> = conversations().as_array().unwrap().iter().map(|m| json!({"messages": m})).collect();
        write_jsonl(&jsonl, &records);
        for (train_on, out) in [("assistant", "a"), ("last-assistant", "l"), ("all", "all")] {
            let out = dir.path().join(out);
            let (code, stdout, stderr) = prepare(&[&jsonl], family, &out, &["--train-on", train_on]);
            assert_eq!(code, 0, "{family} {train_on}: {stderr}");
            let got = sequences(&out);
            assert_eq!(got.len(), want.len(), "{family}: one sequence per conversation\n{stdout}");
            for (k, ((ids, mask), w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(ids, &w.ids, "{family} conversation {k}: token ids differ from apply_chat_template");
                let expected_mask = match train_on {
                    "assistant" => w.mask.clone(),
                    "last-assistant" => last_run(&w.mask),
                    _ => vec![1; w.ids.len()],
                };
                assert_eq!(mask, &expected_mask, "{family} {train_on} conversation {k}: loss mask");
            }
            let has_mask = Dataset::open(&[out.clone()], SEQ).unwrap().has_loss_mask();
            assert_eq!(has_mask, train_on != "all", "{family} {train_on}: a mask is written unless all tokens train");
        }
        // The shards record the model's EOS from tokenizer_config.json (`<|eot_id|>`, `<|im_end|>`).
        let ds = Dataset::open(&[dir.path().join("a")], SEQ).unwrap();
        let eos = if family == "llama3" { "<|eot_id|>" } else { "<|im_end|>" };
        let tok = tokenizers::Tokenizer::from_file(models().join(family).join("tokenizer.json")).unwrap();
        assert_eq!(ds.eos_id(), tok.token_to_id(eos).unwrap() as i64, "{family}: EOS from tokenizer_config.json");
    }
}

#[test]
fn prompt_response_pairs_render_as_a_user_and_an_assistant_message() {
    let dir = tempfile::tempdir().unwrap();
    let want = expected("qwen3", dir.path());
    let jsonl = dir.path().join("pairs.jsonl");
    write_jsonl(&jsonl, &[json!({"q": "What is the capital of France?", "a": "Paris."})]);
    let out = dir.path().join("out");
    let (code, _, stderr) = prepare(&[&jsonl], "qwen3", &out, &["--prompt-field", "q", "--response-field", "a"]);
    assert_eq!(code, 0, "{stderr}");
    let got = sequences(&out);
    assert_eq!((&got[0].0, &got[0].1), (&want[0].ids, &want[0].mask), "the pair is conversation 0");
}

#[test]
fn parquet_arrow_and_saved_datasets_from_pyarrow_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let conv = dir.path().join("conversations.json");
    std::fs::write(&conv, conversations().to_string()).unwrap();
    let tables = dir.path().join("tables");
    chat_python(&["tables", conv.to_str().unwrap(), tables.to_str().unwrap()]);
    // The reference: the same records as JSONL, and compressed.
    let records: Vec<Value> = conversations().as_array().unwrap().iter().map(|m| json!({"messages": m})).collect();
    let jsonl = dir.path().join("chat.jsonl");
    write_jsonl(&jsonl, &records);
    let bytes = std::fs::read(&jsonl).unwrap();
    let gz = dir.path().join("chat.jsonl.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::default());
    enc.write_all(&bytes).unwrap();
    enc.finish().unwrap();
    let zst = dir.path().join("chat.jsonl.zst");
    std::fs::write(&zst, zstd::encode_all(&bytes[..], 3).unwrap()).unwrap();

    let reference = dir.path().join("ref");
    assert_eq!(prepare(&[&jsonl], "llama3", &reference, &[]).0, 0);
    let reference = sequences(&reference);
    assert_eq!(reference.len(), 4);
    let inputs: [(&str, PathBuf); 6] = [
        ("parquet", tables.join("chat.parquet")),
        ("arrow file", tables.join("chat.arrow")),
        ("arrow stream", tables.join("chat-stream.arrow")),
        ("save_to_disk folder", tables.join("saved")),
        ("jsonl.gz", gz),
        ("jsonl.zst", zst),
    ];
    for (k, (what, input)) in inputs.iter().enumerate() {
        let out = dir.path().join(format!("out{k}"));
        let (code, _, stderr) = prepare(&[input], "llama3", &out, &[]);
        assert_eq!(code, 0, "{what}: {stderr}");
        assert_eq!(sequences(&out), reference, "{what}: the same shards as from JSONL");
    }
}

/// `data prepare` on `input` fails with one message that names every part of `parts`.
fn assert_refused(input: &Path, family: &str, extra: &[&str], parts: &[&str]) {
    let out = input.with_extension("out");
    let (code, _, stderr) = prepare(&[input], family, &out, extra);
    assert_ne!(code, 0, "{input:?} was accepted");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "one message: {stderr}");
    for p in parts {
        assert!(stderr.contains(p), "{p:?} missing from: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_chat_input_names_the_file_record_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]});

    let no_messages = d.join("no-messages.jsonl");
    write_jsonl(&no_messages, &[ok.clone(), json!({"conversation": []})]);
    assert_refused(&no_messages, "qwen3", &[], &["no-messages.jsonl", "record 2", "`messages`", "is missing"]);

    let bad_role = d.join("bad-role.jsonl");
    let tool = json!({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]});
    write_jsonl(&bad_role, &[ok.clone(), ok.clone(), tool]);
    assert_refused(
        &bad_role,
        "qwen3",
        &[],
        &["bad-role.jsonl", "record 3", "`messages`", "Unexpected message role: robot"],
    );

    let not_a_list = d.join("not-a-list.jsonl");
    write_jsonl(&not_a_list, &[json!({"messages": "hello"})]);
    assert_refused(&not_a_list, "qwen3", &[], &["not-a-list.jsonl", "record 1", "`messages`", "not a list"]);

    let mut bytes = serde_json::to_vec(&ok).unwrap();
    bytes.extend_from_slice(b"\n{\"messages\": \"caf\xe9\"}\n");
    let latin1 = d.join("latin1.jsonl");
    std::fs::write(&latin1, bytes).unwrap();
    assert_refused(&latin1, "qwen3", &[], &["latin1.jsonl", "line 2", "invalid UTF-8"]);

    // A template that fails while rendering: an undefined filter.
    let broken = d.join("broken-model");
    std::fs::create_dir(&broken).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(models().join("qwen3").join(f), broken.join(f)).unwrap();
    }
    std::fs::write(
        broken.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}",
    )
    .unwrap();
    let one = d.join("one.jsonl");
    write_jsonl(&one, &[ok]);
    let out = d.join("broken.out");
    let (code, _, stderr) = ulysses(&[
        "data",
        "prepare",
        one.to_str().unwrap(),
        "--tokenizer",
        broken.to_str().unwrap(),
        "--seq-len",
        "64",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("nosuchfilter") && stderr.contains("chat template"), "{stderr}");

    // A truncated Parquet file: its footer is gone.
    let conv = d.join("conversations.json");
    std::fs::write(&conv, conversations().to_string()).unwrap();
    let tables = d.join("tables");
    chat_python(&["tables", conv.to_str().unwrap(), tables.to_str().unwrap()]);
    let whole = std::fs::read(tables.join("chat.parquet")).unwrap();
    let cut = d.join("cut.parquet");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    assert_refused(&cut, "qwen3", &[], &["cut.parquet", "Parquet", "truncated"]);
}

/// A Qwen3 model folder without weights (`model.config` names its config.json): config.json and
/// the qwen3 test tokenizer.
fn model_folder(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
        std::fs::copy(models().join("qwen3").join(f), model.join(f)).unwrap();
    }
    let config = json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 400, "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "tie_word_embeddings": true, "hidden_act": "silu", "torch_dtype": "float32"
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

#[test]
fn check_flags_shards_whose_eos_is_not_the_models() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_folder(dir.path());
    let jsonl = dir.path().join("chat.jsonl");
    let records: Vec<Value> = conversations().as_array().unwrap().iter().map(|m| json!({"messages": m})).collect();
    write_jsonl(&jsonl, &records);
    let tiny = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tiny.toml")).unwrap();
    for (family, ok) in [("qwen3", true), ("llama3", false)] {
        let data = dir.path().join(family);
        assert_eq!(prepare(&[&jsonl], family, &data, &[]).0, 0);
        let exp = tiny
            .replace("preset = \"tiny\"", &format!("config = {:?}", model.join("config.json").to_str().unwrap()))
            .replace("paths = [\"data/passkey-tiny\"]", &format!("paths = [{:?}]", data.to_str().unwrap()))
            .replace("seq_len = 1024", &format!("seq_len = {SEQ}"))
            .replace("sp = 2", "sp = 1")
            .replace("dp = 2", "dp = 1");
        let toml = dir.path().join(format!("{family}.toml"));
        std::fs::write(&toml, exp).unwrap();
        let (code, stdout, stderr) = ulysses(&["check", toml.to_str().unwrap(), "--world-size", "1"]);
        let all = format!("{stdout}{stderr}");
        if ok {
            assert_eq!(code, 0, "{family}: the model's own EOS passes: {all}");
            // The trained-fraction line, printed when the data has no problem, names the mask.
            assert!(all.contains("loss mask recorded"), "{family}: {all}");
            assert!(!all.contains("EOS id"), "{all}");
        } else {
            assert_ne!(code, 0, "{family}: another EOS fails check");
            let eot = tokenizers::Tokenizer::from_file(models().join("llama3/tokenizer.json")).unwrap();
            let eot = eot.token_to_id("<|eot_id|>").unwrap();
            assert!(
                all.contains(&format!("the shards' EOS id is {eot}")) && all.contains("ends sequences with"),
                "{all}"
            );
        }
    }
}
