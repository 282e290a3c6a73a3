//! The grid's generator puts the needle where the grid says: for both tasks, every sequence is
//! exactly the requested length, the needle starts at the filler sentence boundary at or before
//! `depth` of the filler (so the stated depth falls inside the sentence that follows the needle),
//! and the answer (the key) ends the sequence after the question. Plus the CLI's refusals.
mod common;
mod data_common;
mod eval_common;
use common::*;
use eval_common::*;
use ulysses::data::needle::needle_sample;
use ulysses::data::needle::SynthTask;
use ulysses::data::tokenizer::TextTokenizer;

fn text_of(tokens: &[i32]) -> String {
    tokens.iter().map(|&t| char::from(u8::try_from(t).expect("byte tokens"))).collect()
}

/// The needle and question texts of each task, as docs/eval.md states them.
fn texts(task: SynthTask, key: u64) -> (String, &'static str) {
    match task {
        SynthTask::Niah => (
            format!("The special magic number is {key}. "),
            "What is the special magic number mentioned in the text above? The special magic number is ",
        ),
        _ => (
            format!("The pass key is {key}. Remember it. {key} is the pass key. "),
            "What is the pass key? The pass key is ",
        ),
    }
}

#[test]
fn the_needle_sits_at_the_stated_depth() {
    let tok = TextTokenizer::load("byte", None).unwrap();
    for task in [SynthTask::Passkey, SynthTask::Niah] {
        for len in [200, 1000, 4099] {
            for depth in [0.0f32, 0.1, 0.33, 0.5, 0.77, 0.9, 1.0] {
                for seed in 0..3 {
                    let what = format!("{} length {len} depth {depth} seed {seed}", task.name());
                    let (seq, info) = needle_sample(&tok, task, len, depth, 5, seed).unwrap();
                    let text = text_of(&seq);
                    let (key, start) = (info.key.to_string(), info.needle_start);
                    let (needle, question) = texts(task, info.key);
                    // [filler .. needle .. filler][question][key], exactly `len` tokens.
                    assert_eq!(seq.len(), len, "{what}: length");
                    assert_eq!(key.len(), 5, "{what}: key digits");
                    assert_eq!(info.answer_start, len - 5, "{what}: answer start");
                    assert_eq!(&text[info.answer_start..], key, "{what}: answer");
                    assert_eq!(
                        &text[info.answer_start - question.len()..info.answer_start],
                        question,
                        "{what}: question"
                    );
                    assert_eq!(&text[start..start + needle.len()], needle, "{what}: needle at {start}");
                    // The key appears nowhere else: the filler has no digits.
                    let filler = format!(
                        "{}{}",
                        &text[..start],
                        &text[start + needle.len()..info.answer_start - question.len()]
                    );
                    assert!(!filler.chars().any(|c| c.is_ascii_digit()), "{what}: digits in the filler");
                    // Depth: the needle starts at the sentence boundary at or before the target,
                    // so the target falls inside the filler sentence right after the needle.
                    let target = (f64::from(depth) * filler.len() as f64).round() as usize;
                    let after = &filler[start..];
                    let next = after.find(". ").map_or(after.len(), |i| i + 2);
                    assert!(
                        start <= target && (target == start || target < start + next),
                        "{what}: needle at {start} of {} filler tokens, target {target}, next sentence {next} tokens",
                        filler.len()
                    );
                    // A sentence boundary, or the end of the (cut) filler: nothing but the
                    // question after the needle.
                    let boundary = start == 0 || start == filler.len() || filler[..start].ends_with(". ");
                    assert!(boundary, "{what}: the needle starts a sentence");
                    assert!(next <= 80, "{what}: a sentence of {next} tokens");
                }
            }
        }
    }
}

#[test]
fn samples_are_deterministic_and_seeds_differ() {
    let tok = TextTokenizer::load("byte", None).unwrap();
    let a = needle_sample(&tok, SynthTask::Niah, 600, 0.5, 6, 42).unwrap();
    assert_eq!(a, needle_sample(&tok, SynthTask::Niah, 600, 0.5, 6, 42).unwrap());
    let keys: std::collections::BTreeSet<u64> =
        (0..20).map(|s| needle_sample(&tok, SynthTask::Niah, 600, 0.5, 6, s).unwrap().1.key).collect();
    assert!(keys.len() >= 19, "20 seeds gave {} distinct keys", keys.len());
    // niah filler is drawn from the seed; passkey filler is a fixed cycle.
    let filler = |task, seed| needle_sample(&tok, task, 600, 1.0, 6, seed).unwrap().0[..400].to_vec();
    assert_ne!(filler(SynthTask::Niah, 1), filler(SynthTask::Niah, 2));
    assert_eq!(filler(SynthTask::Passkey, 1), filler(SynthTask::Passkey, 2));
    let err = needle_sample(&tok, SynthTask::Passkey, 50, 0.5, 5, 0).unwrap_err().to_string();
    assert!(err.contains("too short") && err.contains("at least"), "{err}");
    assert!(needle_sample(&tok, SynthTask::Random, 600, 0.5, 5, 0).is_err());
    assert!(needle_sample(&tok, SynthTask::Passkey, 600, 1.5, 5, 0).is_err());
}

#[test]
fn bad_eval_arguments_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let exp = experiment(dir.path(), &dir.path().join("unused"));
    let ckpt = random_checkpoint(dir.path(), 1);
    let (exp, ckpt) = (exp.to_str().unwrap(), ckpt.to_str().unwrap());
    let run = |extra: &[&str]| {
        assert_clean_failure(&ulysses(&[&["eval", exp, "--checkpoint", ckpt], extra].concat(), dir.path()))
    };
    let t = run(&["--task", "passkey", "--lengths", "50,1000", "--depths", "0,1.5"]);
    assert!(t.contains("too short") && t.contains("outside [0, 1]"), "every grid problem at once:\n{t}");
    let t = run(&["--task", "loss"]);
    assert!(t.contains("needs --data"), "{t}");
    let t = run(&["--task", "passkey", "--sp", "2"]);
    assert!(t.contains("sp = 2 does not divide the 1 rank"), "{t}");
    let t = assert_clean_failure(&ulysses(&["eval", exp, "--task", "passkey", "--checkpoint", "nowhere"], dir.path()));
    assert!(t.contains("nowhere"), "{t}");
    let t = assert_clean_failure(&mpirun(
        2,
        &["eval", exp, "--task", "passkey", "--sp", "2", "--checkpoint", ckpt, "--lengths", "161"],
        dir.path(),
        &[],
    ));
    assert!(t.contains("161 is not a multiple of sp = 2") && t.contains("use e.g. 160 or 162"), "{t}");
}

/// The grid's text goes through the checkpoint's own tokenizer.json when it carries one (each
/// answer is the key as that tokenizer splits it, and the results file names it), a
/// `--tokenizer` that is not the checkpoint's is refused, and a checkpoint without a
/// tokenizer.json (a run on byte-tokenized data) gets the byte tokenizer, said so on the way.
#[test]
fn the_grid_uses_the_checkpoints_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let exp = experiment(dir.path(), &dir.path().join("unused"));
    let (plain, carrying) = (random_checkpoint(dir.path(), 1), random_checkpoint(dir.path(), 2));
    // Passkey text with numbers: the BPE learns the filler's words and some digit pairs.
    let corpus = dir.path().join("corpus.txt");
    let lines: Vec<String> = (0..400)
        .map(|k| format!("The grass is green. The pass key is {}. Here we go.", 10_007 * k % 100_000))
        .collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let own = carrying.join("tokenizer.json");
    data_common::train_tokenizer(&corpus, &own);
    let tokenizer = TextTokenizer::load(own.to_str().unwrap(), None).unwrap();

    let eval = |ckpt: &std::path::Path, extra: &[&str]| {
        let out = dir.path().join(format!("{}.h5", ckpt.file_name().unwrap().to_str().unwrap()));
        let args = [
            &["eval", exp.to_str().unwrap(), "--task", "passkey", "--checkpoint", ckpt.to_str().unwrap()][..],
            &["--lengths", "160", "--depths", "0,1", "--samples", "2", "--out", out.to_str().unwrap()],
            extra,
        ];
        (ulysses(&args.concat(), dir.path()), out)
    };
    let grid = |out: &std::path::Path| {
        let named = hdf5::File::open(out).unwrap().attr("tokenizer").unwrap();
        let named = named.read_scalar::<hdf5::types::VarLenUnicode>().unwrap().to_string();
        match results(out) {
            ulysses::eval::results::EvalResults::Grid { result, .. } => (named, *result),
            _ => panic!("expected a grid"),
        }
    };

    let (o, out) = eval(&carrying, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("tokenizer {}", tokenizer.name())), "{}", text(&o));
    let (named, r) = grid(&out);
    assert_eq!(named, tokenizer.name());
    let mut other_than_digits = 0;
    for (&key, &answer) in r.key.iter().zip(r.answer_tokens.iter()) {
        let expected = tokenizer.encode(&key.to_string()).unwrap().len() as i64;
        assert_eq!(answer, expected, "key {key}: answer tokens as the checkpoint's tokenizer splits it");
        other_than_digits += usize::from(answer != 5);
    }
    assert!(other_than_digits > 0, "the BPE splits keys otherwise than into digits: {:?}", r.answer_tokens);

    // Naming the checkpoint's own tokenizer is fine; another one is refused.
    let (o, _) = eval(&carrying, &["--tokenizer", own.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = assert_clean_failure(&eval(&carrying, &["--tokenizer", "byte"]).0);
    assert!(t.contains("--tokenizer byte (byte) is not the tokenizer the checkpoint carries"), "{t}");
    assert!(t.contains(own.to_str().unwrap()) && t.contains("leave --tokenizer out"), "{t}");

    let (o, out) = eval(&plain, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("tokenizer byte"), "{}", text(&o));
    let (named, r) = grid(&out);
    assert_eq!(named, "byte");
    assert!(r.answer_tokens.iter().all(|&n| n == 5), "byte tokens: one per digit: {:?}", r.answer_tokens);
}
