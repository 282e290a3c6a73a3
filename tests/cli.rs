//! The command line on good and bad input: `ulysses check` over every shipped experiment, and one
//! clear message with a non-zero exit (no panic) for each kind of bad input.
mod common;
use common::*;

fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_passes_on_every_shipped_experiment() {
    let mut n = 0;
    for entry in std::fs::read_dir(root().join("experiments")).unwrap() {
        let path = entry.unwrap().path();
        let out = ulysses(&["check", path.to_str().unwrap()], root());
        let t = text(&out);
        assert!(out.status.success(), "{}: {t}", path.display());
        assert!(t.contains("valid for") && t.contains("mesh") && t.contains("tokens per sample"), "{t}");
        n += 1;
    }
    assert!(n >= 3, "experiments/ should hold tiny, llama8b and llama8b_1m");
}

#[test]
fn check_prints_the_plan_for_8b_on_8_ranks() {
    let out = ulysses(&["check", "experiments/llama8b.toml", "--world-size", "8"], root());
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("8 ranks = dp 1 × sp 8"), "{t}");
    assert!(t.contains("each rank holds 32768 tokens"), "{t}");
    assert!(t.contains("4 query heads and 1 KV heads"), "{t}");
    assert!(t.contains("8.030B parameters"), "{t}");
}

#[test]
fn impossible_mesh_is_one_clear_error() {
    let out = ulysses(&["check", "experiments/tiny.toml", "--world-size", "3"], root());
    let t = assert_clean_failure(&out);
    assert!(t.contains("sp × dp = 2 × 2 = 4 but the job has 3 ranks"), "{t}");
}

#[test]
fn missing_experiment_file_names_it() {
    let out = ulysses(&["check", "experiments/nope.toml"], root());
    let t = assert_clean_failure(&out);
    assert!(t.contains("experiments/nope.toml"), "{t}");
}

#[test]
fn misspelled_key_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let text_in = std::fs::read_to_string(root().join("experiments/tiny.toml")).unwrap().replace("seq_len", "seqlen");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text_in).unwrap();
    let out = ulysses(&["check", path.to_str().unwrap()], dir.path());
    let t = assert_clean_failure(&out);
    assert!(t.contains("bad.toml") && t.contains("seqlen"), "{t}");
}

#[test]
fn invalid_values_are_listed_together() {
    let dir = tempfile::tempdir().unwrap();
    let text_in = std::fs::read_to_string(root().join("experiments/tiny.toml"))
        .unwrap()
        .replace("sp = 2", "sp = 3")
        .replace("lr = 3e-3", "lr = 0.0");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text_in).unwrap();
    let out = ulysses(&["check", path.to_str().unwrap(), "--world-size", "6"], dir.path());
    let t = assert_clean_failure(&out);
    assert!(
        t.contains("problem(s)") && t.contains("parallel.sp") && t.contains("train.lr") && t.contains("data.seq_len"),
        "{t}"
    );
}

#[test]
fn no_arguments_prints_usage() {
    let out = ulysses(&[], root());
    let t = assert_clean_failure(&out);
    assert!(t.contains("usage"), "{t}");
}
