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
fn check_places_layer_inputs_and_kept_attention() {
    let out = ulysses(&["check", "experiments/llama8b.toml", "--world-size", "8"], root());
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("attention output + log-sum-exp kept (32 of 32 × 260.0 MiB)"), "{t}");
    let staging = t.lines().find(|l| l.contains("checkpoint staging (checkpoint.async)"));
    assert!(staging.is_some_and(|l| l.trim_end().ends_with("11.2 GiB")), "the host column: {t}");
    assert!(
        t.contains("budget                                                       76.0 GiB   60.0 GiB  unlimited"),
        "{t}"
    );
    assert!(
        t.contains("placement  layer inputs 0 GPU / 32 host / 0 disk; attention kept 32 of 32 layers (32 GPU, 0 host); GPU ~29.7 of 76.0 GiB, host ~19.2 of 60.0 GiB/rank"),
        "{t}"
    );
    assert!(t.contains("fits       up to "), "{t}");
}

#[test]
fn check_says_why_a_plan_does_not_fit_and_what_would_help() {
    let flags = ["--gpu-mem-gib", "30", "--host-mem-gib", "40", "--disk-gib", "100"];
    // The experiment's asynchronous checkpoints need 11.2 GiB of host staging per rank.
    let out = ulysses(&[&["check", "experiments/llama8b.toml"][..], &flags].concat(), root());
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("placement  does not fit in memory: the host staging of asynchronous checkpoints (11.2 GiB) needs 11.2 GiB of host memory but the budget is 5.0 GiB per rank."),
        "{t}"
    );
    assert!(
        t.contains(
            "- checkpoint.async = false: saves block training while they write, but need no host staging (11.2 GiB)"
        ),
        "{t}"
    );

    // Saving synchronously, it is the layer inputs that do not fit.
    let dir = tempfile::tempdir().unwrap();
    let toml = std::fs::read_to_string(root().join("experiments/llama8b.toml")).unwrap();
    let sync = dir.path().join("sync.toml");
    std::fs::write(&sync, toml.replace("[checkpoint]\n", "[checkpoint]\nasync = false\n")).unwrap();
    let out = ulysses(&[&["check", sync.to_str().unwrap()][..], &flags].concat(), root());
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("placement  does not fit in memory: the layer inputs need 8.0 GiB but host memory (after any offloaded optimizer state and checkpoint staging) leaves 5.0 GiB."),
        "{t}"
    );
    assert!(t.contains("budget per rank: GPU 30.0 GiB, host 5.0 GiB, disk 12.5 GiB"), "{t}");
    assert!(
        t.contains("- parallel.activations = \"auto\"") && t.contains("- a smaller data.seq_len: up to 163840 tokens"),
        "{t}"
    );

    // Without flags, the experiment's [memory] section is the budget.
    let toml = toml + "\n[memory]\ngpu_gib = 20.0\n";
    let path = dir.path().join("small.toml");
    std::fs::write(&path, toml).unwrap();
    let out = ulysses(&["check", path.to_str().unwrap()], dir.path());
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("need 21.6 GiB of GPU memory but the budget is 20.0 GiB"), "{t}");
    assert!(
        t.contains("- parallel.offload_optimizer = true: moves the optimizer state (15.0 GiB) to host memory"),
        "{t}"
    );
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

#[test]
fn check_says_which_kernel_and_what_attention_within_documents_costs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("docs");
    let args = ["data", "synth", "--task", "random", "--seq-len", "1024", "--num", "4", "--doc-len", "256"];
    let o = ulysses(&[&args[..], &["--out", data.to_str().unwrap()]].concat(), dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let text_in = std::fs::read_to_string(root().join("experiments/tiny.toml"))
        .unwrap()
        .replace("\"data/passkey-tiny\"", &format!("\"{}\"", data.display()))
        .replace("# documents = \"mask\"", "documents = \"mask\"");
    let path = dir.path().join("packed.toml");
    std::fs::write(&path, text_in).unwrap();
    let out = ulysses(&["check", path.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    for expected in [
        "kernel     CPU flash with a block-diagonal causal mask on samples of several documents, CPU flash (causal) on single-document ones",
        "documents  data.documents = \"mask\": attention within each document",
        "RoPE positions run on across documents",
        "within the documents of 4 of the 4 sequences (4.0 documents each, median length in [256, 512)):",
        "25.0% of full causal",
    ] {
        assert!(t.contains(expected), "check output lacks {expected:?}:\n{t}");
    }
}
