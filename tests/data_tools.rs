//! `ulysses data prepare | synth | inspect`: round trips through the built binary and the library.
mod data_common;

use data_common::{train_tokenizer, ulysses};
use tokenizers::Tokenizer;
use ulysses::data::needle::SynthTask;
use ulysses::data::prepare::{prepare, InputFormat, Layout, PrepareOptions};
use ulysses::data::synth::{synth, SynthOptions};
use ulysses::data::tokenizer::TextTokenizer;
use ulysses::data::Dataset;

/// Small documents of varying length, with multi-byte characters.
fn documents() -> Vec<String> {
    let words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "Grüße", "naïve", "ünïcode", "42"];
    (0..30)
        .map(|k| (0..5 + (k * 7) % 23).map(|j| words[(k * 3 + j * 5) % words.len()]).collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn prepare_round_trip_with_a_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let (corpus, jsonl, tok_path, out) = (
        dir.path().join("corpus.txt"),
        dir.path().join("docs.jsonl"),
        dir.path().join("tokenizer.json"),
        dir.path().join("out"),
    );
    let docs = documents();
    std::fs::write(&corpus, docs.join("\n")).unwrap();
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "id": 1, "text": d }).to_string()).collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n\n").unwrap();
    train_tokenizer(&corpus, &tok_path);

    let seq_len = 50;
    let (code, stdout, stderr) = ulysses(&[
        "data",
        "prepare",
        jsonl.to_str().unwrap(),
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--seq-len",
        "50",
        "--shard-mib",
        "0.0008",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");

    // Expected: each document's ids followed by EOS, cut into sequences of seq_len.
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    let eos = tok.token_to_id("<|endoftext|>").unwrap() as i32;
    let (mut stream, mut starts) = (Vec::new(), Vec::new());
    for d in &docs {
        starts.push(stream.len());
        stream.extend(tok.encode(d.as_str(), false).unwrap().get_ids().iter().map(|&i| i as i32));
        stream.push(eos);
    }
    let n = stream.len() / seq_len;
    assert!(n >= 8, "the corpus makes several shards ({n} sequences)");
    assert!(
        stdout.contains(&format!(
            "prepared 30 documents, {} tokens -> {n} sequences of 50 tokens in {} shard(s)",
            stream.len(),
            n.div_ceil(4)
        )),
        "{stdout}"
    );

    let ds = Dataset::open(&[out.clone()], seq_len).unwrap();
    assert_eq!((ds.len(), ds.eos_id(), ds.shard_paths().len()), (n, eos as i64, n.div_ceil(4)));
    assert_eq!(ds.vocab_size(), tok.get_vocab(true).values().max().map(|&m| m as i64 + 1).unwrap());
    assert!(ds.tokenizer().starts_with("huggingface fnv1a64:"), "{}", ds.tokenizer());
    for i in 0..n {
        let range = i * seq_len..(i + 1) * seq_len;
        assert_eq!(ds.read_span(i, 0, seq_len).unwrap(), stream[range.clone()], "sequence {i}");
        let expected: Vec<usize> = starts.iter().filter(|s| range.contains(s)).map(|s| s - range.start).collect();
        assert_eq!(ds.doc_starts(i).unwrap(), Some(expected), "document starts of sequence {i}");
    }

    // The same tokenizer in synth: the answer is the key tokenized as text.
    let pk = dir.path().join("pk.h5");
    let (code, _, stderr) = ulysses(&[
        "data",
        "synth",
        "--task",
        "passkey",
        "--seq-len",
        "300",
        "--num",
        "2",
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--out",
        pk.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let ds = Dataset::open(&[pk], 300).unwrap();
    let info = ds.passkey(1).unwrap().unwrap();
    let key_ids: Vec<i32> =
        tok.encode(info.key.to_string().as_str(), false).unwrap().get_ids().iter().map(|&i| i as i32).collect();
    assert_eq!(info.answer_tokens, key_ids);
    assert_eq!(ds.read_span(1, info.answer_start, 300).unwrap(), key_ids, "the answer ends the sequence");
}

#[test]
fn prepare_plain_text_streams_long_lines_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // One line longer than the 1 MiB piece, with 2-byte characters straddling the piece border.
    let long = format!("a{}\nend", "é".repeat(600_000));
    let (a, b, out) = (dir.path().join("a.txt"), dir.path().join("b.md"), dir.path().join("out"));
    std::fs::write(&a, &long).unwrap();
    std::fs::write(&b, "short doc\n").unwrap();
    let opts = PrepareOptions {
        inputs: vec![b, a],
        format: InputFormat::Auto,
        text_field: "text".into(),
        messages_field: "messages".into(),
        pair_fields: None,
        train_on: Default::default(),
        seq_len: 1000,
        shard_mib: 1.0,
        out: out.clone(),
        force: false,
        layout: Layout::Pack,
        bos: None,
        split: None,
        seed: 0,
    };
    let mut consumed = 0;
    let summary = prepare(&opts, &TextTokenizer::load("byte", None).unwrap(), &mut |n| consumed += n).unwrap().train;
    let total = long.len() + 10;
    assert_eq!(consumed, total as u64, "progress reports every input byte");
    assert_eq!((summary.documents, summary.tokens), (2, total as u64 + 2));
    assert_eq!(summary.sequences, (total as u64 + 2) / 1000);
    assert_eq!(summary.shards.len(), 5, "1 MiB shards hold 262 sequences of 1000 tokens");

    let mut stream: Vec<i32> = b"short doc\n".iter().map(|&b| b as i32).collect();
    stream.push(257);
    stream.extend(long.bytes().map(i32::from));
    let ds = Dataset::open(&[out.clone()], 1000).unwrap();
    let n = ds.len();
    assert_eq!(ds.read_span(n - 1, 0, 1000).unwrap(), stream[(n - 1) * 1000..n * 1000]);
    assert_eq!(ds.read_span(600, 0, 1000).unwrap(), stream[600_000..601_000]);
    assert_eq!(ds.doc_starts(0).unwrap(), Some(vec![0, 11]));
    assert_eq!(ds.doc_starts(1).unwrap(), Some(vec![]), "the long document continues");

    // A second run must not mix with the first one's shards.
    let err = prepare(&opts, &TextTokenizer::Byte, &mut |_| ()).unwrap_err().to_string();
    assert!(err.contains("already holds 5 .h5 file(s)") && err.contains("--force"), "{err}");
}

#[test]
fn synth_passkey_is_deterministic_and_records_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &str, seed: u64| {
        let out = dir.path().join(name);
        let opts = SynthOptions {
            task: SynthTask::Passkey,
            seq_len: 300,
            num: 6,
            seed,
            out: out.clone(),
            depths: Some(vec![0.0, 0.5, 1.0]),
            key_digits: 5,
            doc_len: None,
            force: false,
        };
        assert_eq!(synth(&opts, &TextTokenizer::Byte).unwrap(), out.join("shard-00000.h5"));
        Dataset::open(&[out], 300).unwrap()
    };
    let (a, b, c) = (make("a", 3), make("b", 3), make("c", 4));
    let all = |ds: &Dataset| {
        (0..6).map(|i| (ds.read_span(i, 0, 300).unwrap(), ds.passkey(i).unwrap().unwrap())).collect::<Vec<_>>()
    };
    assert_eq!(all(&a), all(&b), "same seed, same data");
    assert_ne!(all(&a), all(&c), "another seed, other keys");

    let question = b"What is the pass key? The pass key is ";
    for (i, (tokens, info)) in all(&a).into_iter().enumerate() {
        let text: Vec<u8> = tokens.iter().map(|&t| t as u8).collect();
        let key = info.key.to_string();
        assert_eq!(info.depth, [0.0, 0.5, 1.0][i % 3]);
        assert_eq!((key.len(), info.answer_start), (5, 295));
        assert_eq!(info.answer_tokens, key.bytes().map(i32::from).collect::<Vec<_>>());
        assert_eq!(&text[295..], key.as_bytes(), "the answer ends the sequence");
        assert_eq!(&text[295 - question.len()..295], question);
        let needle = format!("The pass key is {key}. Remember it. {key} is the pass key. ");
        assert_eq!(&text[info.needle_start..info.needle_start + needle.len()], needle.as_bytes());
        let expected_start = match i % 3 {
            0 => 0,
            2 => 295 - question.len() - needle.len(), // depth 1: right before the question
            _ => info.needle_start,
        };
        assert_eq!(info.needle_start, expected_start, "sequence {i}");
        assert!(
            i % 3 != 1 || (60..=140).contains(&info.needle_start),
            "depth 0.5 lands mid-filler: {}",
            info.needle_start
        );
    }
}

#[test]
fn synth_random_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rand");
    let (code, stdout, stderr) = ulysses(&[
        "data",
        "synth",
        "--task",
        "random",
        "--seq-len",
        "96",
        "--num",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote 3 random sequences of 96 tokens (seed 0)"), "{stdout}");
    let ds = Dataset::open(&[out.clone()], 96).unwrap();
    let tokens: Vec<i32> = (0..3).flat_map(|i| ds.read_span(i, 0, 96).unwrap()).collect();
    assert!(tokens.iter().all(|&t| (0..258).contains(&t)));
    assert!(tokens.iter().collect::<std::collections::HashSet<_>>().len() > 100, "tokens look uniform");

    let shard = out.join("shard-00000.h5");
    let (code, stdout, stderr) = ulysses(&["data", "inspect", shard.to_str().unwrap(), "--tokens", "4", "--scan"]);
    assert_eq!(code, 0, "{stderr}");
    for expected in [
        "shape [3, 96]",
        "chunks Some([1, 96])",
        "Fletcher32",
        "format_version  2",
        "task            random",
        "tokenizer       byte",
        "vocab_size      258",
        "ok: 3 sequences, every token id in [0, 258)",
    ] {
        assert!(stdout.contains(expected), "inspect output lacks {expected:?}:\n{stdout}");
    }
    assert!(stdout.contains(&format!("{:?}", &tokens[..4])), "{stdout}");
}

#[test]
fn prepare_pads_one_document_per_sequence_with_bos_and_summarizes_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("docs.jsonl");
    let docs = ["a".repeat(5), "b".repeat(20), "c".repeat(3)];
    let lines: Vec<String> = docs.iter().map(|d| format!("{{\"text\": \"{d}\"}}")).collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let out = dir.path().join("padded");
    let (code, stdout, stderr) = ulysses(&[
        "data",
        "prepare",
        jsonl.to_str().unwrap(),
        "--seq-len",
        "16",
        "--layout",
        "pad",
        "--bos",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    // BOS + text + EOS: 7, 22 (longer than a sequence: it continues in the next) and 5 tokens.
    for expected in [
        "prepared 3 documents, 34 tokens -> 4 sequences of 16 tokens in 1 shard(s)",
        "30 padding tokens",
        "documents crossing into the next sequence: 1 of 3",
        "3 documents, 34 tokens: min 5, mean 11.3, median in [4, 8), max 22",
        "data.documents = \"mask\"",
    ] {
        assert!(stdout.contains(expected), "prepare output lacks {expected:?}:\n{stdout}");
    }
    let ds = Dataset::open(&[out.clone()], 16).unwrap();
    let seq = |i| ds.read_span(i, 0, 16).unwrap();
    let text = |c: u8, n| std::iter::repeat_n(c as i32, n);
    let padded = |mut v: Vec<i32>| {
        v.resize(16, 257);
        v
    };
    assert_eq!(seq(0), padded([256].into_iter().chain(text(b'a', 5)).chain([257]).collect()));
    assert_eq!(seq(1), [256].into_iter().chain(text(b'b', 15)).collect::<Vec<_>>());
    assert_eq!(seq(2), padded(text(b'b', 5).chain([257]).collect()));
    assert_eq!(seq(3), padded([256].into_iter().chain(text(b'c', 3)).chain([257]).collect()));
    let starts: Vec<_> = (0..4).map(|i| ds.doc_starts(i).unwrap().unwrap()).collect();
    assert_eq!(starts, vec![vec![0, 7], vec![0], vec![6], vec![0, 5]], "padding is a document of its own");
    let pads: Vec<_> = (0..4).map(|i| ds.pad_start(i).unwrap()).collect();
    assert_eq!(pads, vec![Some(7), None, Some(6), Some(5)]);

    let shard = out.join("shard-00000.h5");
    let (code, stdout, stderr) = ulysses(&["data", "inspect", shard.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    for expected in [
        "documents       4 in 4 sequences (1.0 per sequence, at most 1), 3 padded",
        "4 documents, 34 tokens: min 5, mean 8.5",
        "within documents costs",
    ] {
        assert!(stdout.contains(expected), "inspect output lacks {expected:?}:\n{stdout}");
    }
}

#[test]
fn synth_random_packs_documents_of_a_fixed_length() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("docs");
    let args = ["data", "synth", "--task", "random", "--seq-len", "100", "--num", "2", "--doc-len", "32"];
    let (code, _, stderr) = ulysses(&[&args[..], &["--out", out.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stderr}");
    let ds = Dataset::open(&[out.clone()], 100).unwrap();
    assert_eq!(ds.doc_starts(1).unwrap(), Some(vec![0, 32, 64, 96]));
    let shard = out.join("shard-00000.h5");
    let (_, stdout, _) = ulysses(&["data", "inspect", shard.to_str().unwrap()]);
    // (3·32² + 4²) / 100² of full causal attention.
    assert!(stdout.contains("within documents costs 30.88% of full causal attention"), "{stdout}");
    let opts = SynthOptions {
        task: SynthTask::Passkey,
        seq_len: 100,
        num: 1,
        seed: 0,
        out: dir.path().join("p"),
        depths: None,
        key_digits: 5,
        doc_len: Some(8),
        force: false,
    };
    let err = synth(&opts, &TextTokenizer::Byte).unwrap_err().to_string();
    assert!(err.contains("--doc-len 8 applies to --task random"), "{err}");
}

/// The documents of a `--layout pad` set of byte-tokenized texts, each up to its EOS.
fn padded_texts(out: &std::path::Path, seq_len: usize) -> Vec<String> {
    let ds = Dataset::open(&[out.to_path_buf()], seq_len).unwrap();
    (0..ds.len())
        .map(|i| {
            let end = ds.pad_start(i).unwrap().unwrap();
            let bytes: Vec<u8> = ds.read_span(i, 0, end - 1).unwrap().iter().map(|&t| t as u8).collect();
            String::from_utf8(bytes).unwrap()
        })
        .collect()
}

#[test]
fn prepare_split_holds_out_documents_by_seed() {
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<String> = (0..40).map(|k| format!("document {k}: {}", documents()[k % 30])).collect();
    let jsonl = dir.path().join("docs.jsonl");
    let lines: Vec<String> = docs.iter().map(|d| serde_json::json!({ "text": d }).to_string()).collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    const SEQ: usize = 256;
    let run = |name: &str, split: &str, seed: &str| {
        let out = dir.path().join(name);
        let args = ["data", "prepare", jsonl.to_str().unwrap(), "--seq-len", "256", "--layout", "pad", "--out"];
        let (code, stdout, stderr) =
            ulysses(&[&args[..], &[out.to_str().unwrap(), "--split", split, "--seed", seed]].concat());
        assert_eq!(code, 0, "{stderr}");
        let (train, held) = (padded_texts(&out, SEQ), padded_texts(&out.join("heldout"), SEQ));
        // Every document once, in one of the two sets.
        let mut all: Vec<&String> = train.iter().chain(&held).collect();
        all.sort();
        let mut want: Vec<&String> = docs.iter().collect();
        want.sort();
        assert_eq!(all, want, "--split {split} --seed {seed}");
        assert!(stdout.contains(&format!("held out {} documents", held.len())), "{stdout}");
        assert!(stdout.contains("data.eval_paths"), "{stdout}");
        held
    };
    let held = run("n5", "5", "1");
    assert_eq!(held.len(), 5);
    let index = |d: &String| docs.iter().position(|x| x == d).unwrap();
    assert!(held.windows(2).all(|w| index(&w[0]) < index(&w[1])), "held out in input order: {held:?}");
    assert_eq!(run("n5-again", "5", "1"), held, "the same seed holds out the same documents");
    assert_ne!(run("n5-seed2", "5", "2"), held, "another seed, others");
    let quarter = run("quarter", "0.25", "1");
    assert!((3..=20).contains(&quarter.len()), "about 10 of 40: {}", quarter.len());
    assert_eq!(run("quarter-again", "0.25", "1"), quarter);

    // A held-out set too small for one packed sequence, a count over plain text, bad values.
    let refused = |args: &[&str], wanted: &[&str]| {
        let out = dir.path().join("refused");
        let base = ["data", "prepare", "--seq-len", "256", "--force", "--out", out.to_str().unwrap()];
        let (code, _, stderr) = ulysses(&[&base[..], args].concat());
        assert_ne!(code, 0, "{args:?} was accepted");
        assert!(wanted.iter().all(|w| stderr.contains(w)) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    };
    refused(&[jsonl.to_str().unwrap(), "--split", "1"], &["--split held out 1 documents", "--layout pad"]);
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, docs.concat()).unwrap();
    refused(&[text.to_str().unwrap(), "--split", "3"], &["notes.txt", "plain-text", "--split 0.01"]);
    refused(&[jsonl.to_str().unwrap(), "--split", "0"], &["--split", "holds out nothing"]);
    refused(&[jsonl.to_str().unwrap(), "--split", "1.5"], &["--split", "a fraction of the documents in (0, 1)"]);
}
