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
    // Each rank attends over all 262144 tokens after the all-to-all: the forward runs in blocks.
    assert!(t.contains("kernel     cuDNN (causal), its forward in query blocks of 65536 tokens"), "{t}");
}

/// Issue 32's box (76 GiB GPU, 116 GiB host, 58 GiB disk): 8B with LoRA rank 16 fits at least
/// 512K tokens; the same run training every parameter fits less (the plan is arithmetic).
#[test]
fn check_prints_the_lora_fit_beside_full_fine_tuning_for_8b_on_one_h100() {
    let args = ["check", "experiments/llama8b_lora.toml", "--gpu-mem-gib", "76", "--host-mem-gib", "116"];
    let out = ulysses(&[&args[..], &["--disk-gib", "58"]].concat(), root());
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let number = |after: &str| -> usize {
        let rest = &t[t.find(after).unwrap_or_else(|| panic!("no `{after}` in {t}")) + after.len()..];
        rest.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{after}: {t}"))
    };
    let (lora, full) = (number("fits       up to "), number("(every parameter trains): up to "));
    assert!(lora >= 512 * 1024 && full < 512 * 1024, "LoRA {lora}, full {full}: {t}");
    assert!(t.contains("41.94M trained parameters per rank (640.0 MiB of fp32"), "{t}");
    assert!(t.contains("and 8.030B frozen (15.0 GiB in bf16, weights only)"), "{t}");
    let frozen = t.lines().find(|l| l.contains("frozen base ([lora]: weights only, no state)"));
    assert!(frozen.is_some_and(|l| l.contains("15.0 GiB")), "{t}");
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
        t.contains("placement  optimizer state of 34 units 34 GPU / 0 host / 0 disk; layer inputs 0 GPU / 32 host / 0 disk; attention kept 32 of 32 layers (32 GPU, 0 host); GPU ~29.7 of 76.0 GiB, host ~19.2 of 60.0 GiB/rank"),
        "{t}"
    );
    assert!(t.contains("fits       up to "), "{t}");
    // experiments/llama8b.toml sets no budget: all three are defaults, and the report says so.
    let defaults = "budgets    defaults, not this machine's, where not given: --gpu-mem-gib (memory.gpu_gib), \
                    --host-mem-gib (memory.host_gib), --disk-gib\n";
    assert!(t.contains(defaults), "{t}");
}

#[test]
fn check_says_why_a_plan_does_not_fit_and_what_would_help() {
    let flags = ["--gpu-mem-gib", "30", "--host-mem-gib", "40", "--disk-gib", "100"];
    // The experiment's asynchronous checkpoints need 11.2 GiB of host staging per rank.
    let out = ulysses(&[&["check", "experiments/llama8b.toml"][..], &flags].concat(), root());
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(!t.contains("budgets    defaults"), "every budget was given: {t}");
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
        t.contains("- parallel.offload_optimizer = \"auto\": moves the optimizer state (15.0 GiB) unit by unit to host memory, then disk, as far as the GPU needs"),
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

/// A tiny experiment in `dir` on data made there; returns its path.
fn tiny_experiment(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let args = ["data", "synth", "--task", "passkey", "--seq-len", "128", "--num", "16", "--out", "data"];
    let o = ulysses(&args, dir);
    assert!(o.status.success(), "{}", text(&o));
    let toml = format!(
        "[run]\nname = \"t\"\n[model]\npreset = \"tiny\"\n[parallel]\nsp = 2\ndp = 1\n[data]\npaths = [\"data\"]\nseq_len = 128\n\
         [train]\nsteps = 2\n[checkpoint]\nresume = \"none\"\n{extra}"
    );
    let path = dir.join("t.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

#[test]
fn set_overrides_are_checked_like_the_file_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(dir.path(), "");
    let exp = exp.to_str().unwrap();
    let check = |set: &[&str]| {
        let mut args = vec!["check", exp];
        for s in set {
            args.extend(["--set", s]);
        }
        ulysses(&args, dir.path())
    };
    let o = check(&["train.steps=7", "parallel.sp=1", "parallel.dp=2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("train      7 steps") && text(&o).contains("2 ranks = dp 2 × sp 1"), "{}", text(&o));
    for (set, says) in [
        ("train.steps=many", "invalid type: string \"many\", expected usize in `train.steps`"),
        ("train.stepz=3", "unknown field `stepz`"),
        ("trian.steps=3", "unknown section(s) [trian]"),
        ("steps=3", "--set steps=3: `steps` is not a key inside a section"),
        ("train.steps", "expected SECTION.KEY=VALUE"),
        ("train.lr=-1", "train.lr: = -1 must be a positive number"),
        ("parallel.sp=3", "parallel.sp: = 3 does not divide the model's 4 query heads"),
    ] {
        let t = assert_clean_failure(&check(&[set]));
        assert!(t.contains(says) && t.contains("t.toml"), "--set {set}:\n{t}");
    }

    // Training with overrides records them in metrics.h5 and in the checkpoint.
    let o = mpirun(2, &["train", exp, "--set", "train.lr=0.00125", "--set", "run.name=overridden"], dir.path(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let run = dir.path().join("runs/overridden");
    let f = hdf5::File::open(run.join("metrics.h5")).unwrap();
    let config: hdf5::types::VarLenUnicode = f.attr("config_toml").unwrap().read_scalar().unwrap();
    assert!(config.as_str().contains("lr = 0.00125") && config.as_str().contains("name = \"overridden\""), "{config}");
    let saved = std::fs::read_to_string(run.join("checkpoints/step-000002/experiment.toml")).unwrap();
    assert!(saved.contains("lr = 0.00125"), "{saved}");
}

#[test]
fn train_is_an_alias_and_dp_auto_fills_the_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(dir.path(), "");
    let auto = std::fs::read_to_string(&exp).unwrap().replace("dp = 1", "dp = \"auto\"");
    std::fs::write(&exp, auto).unwrap();
    let exp = exp.to_str().unwrap();
    let o = ulysses(&["check", exp, "--world-size", "8"], dir.path());
    assert!(o.status.success() && text(&o).contains("8 ranks = dp 4 × sp 2"), "{}", text(&o));
    let t = assert_clean_failure(&ulysses(&["check", exp], dir.path()));
    assert!(t.contains("parallel.dp = \"auto\"") && t.contains("--world-size"), "{t}");
    let t = assert_clean_failure(&ulysses(&["check", exp, "--world-size", "3"], dir.path()));
    assert!(t.contains("3 ranks are not a multiple of parallel.sp = 2"), "{t}");

    // `ulysses train EXP` under mpirun -n 4: dp = 4 / 2.
    let o = mpirun(4, &["train", exp], dir.path(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("4 ranks = dp 2 × sp 2") && text(&o).contains("step     2/2"), "{}", text(&o));
    let saved = std::fs::read_to_string(dir.path().join("runs/t/checkpoints/step-000002/experiment.toml")).unwrap();
    assert!(saved.contains("dp = 2"), "the resolved dp is recorded:\n{saved}");
}

#[test]
fn check_validates_the_data_and_says_what_it_did_not_check() {
    let dir = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(dir.path(), "");
    let path = exp.to_str().unwrap();
    let o = ulysses(&["check", path], dir.path());
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("valid for 2 rank(s), with its data"), "{t}");
    assert!(
        t.contains("data       16 sequences of 128 tokens in 1 shard(s); vocabulary 258 of the model's 512"),
        "{t}"
    );
    assert!(t.contains("not checked: token ids"), "{t}");

    // The whole data folder missing: the plan, and a loud "not checked".
    let o = ulysses(&["check", path, "--set", "data.paths=[\"nowhere\"]"], dir.path());
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("its data is not on this machine") && t.contains("NOT CHECKED: nowhere not found"), "{t}");
    // One path of several missing: a typo, an error.
    let t = assert_clean_failure(&ulysses(&["check", path, "--set", "data.paths=[\"data\", \"nowhere\"]"], dir.path()));
    assert!(t.contains("data.paths: \"nowhere\" does not exist"), "{t}");
    // Data of another sequence length.
    let t = assert_clean_failure(&ulysses(&["check", path, "--set", "data.seq_len=64"], dir.path()));
    assert!(t.contains("data problem") && t.contains("64"), "{t}");
    // loss_on = "answer" on data without answers.
    let random = ["data", "synth", "--task", "random", "--seq-len", "128", "--num", "4", "--out", "random"];
    assert!(ulysses(&random, dir.path()).status.success());
    let t = assert_clean_failure(&ulysses(
        &["check", path, "--set", "data.paths=[\"random\"]", "--set", "data.loss_on=answer"],
        dir.path(),
    ));
    assert!(t.contains("needs passkey answers"), "{t}");
    // A vocabulary larger than the model's: a Hugging Face config with 200 tokens.
    let small = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 200, "hidden_size": 64,
        "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.path().join("small.json"), small.to_string()).unwrap();
    let text_in = std::fs::read_to_string(&exp).unwrap().replace("preset = \"tiny\"", "config = \"small.json\"");
    std::fs::write(&exp, text_in).unwrap();
    let t = assert_clean_failure(&ulysses(&["check", path], dir.path()));
    assert!(
        t.contains("the data does not fit it")
            && t.contains("vocabulary has 258 tokens (tokenizer byte) but the model's has 200"),
        "{t}"
    );
}

#[test]
fn make_install_puts_ulysses_and_its_launcher_on_the_path_without_shadowing_mpirun() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("bash")
        .arg(root().join("scripts/install.sh"))
        .arg(dir.path())
        .arg(BIN)
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("is not on your PATH") && t.contains(&format!("export PATH=\"{}/bin:$PATH\"", dir.path().display())),
        "{t}"
    );
    let path = format!("{}/bin:/usr/bin:/bin", dir.path().display());
    for (cmd, says) in [("ulysses --version", "ulysses 0.1.0"), ("ulysses-mpirun --version", "HYDRA")] {
        let o = std::process::Command::new("sh").args(["-c", cmd]).env("PATH", &path).output().unwrap();
        assert!(o.status.success() && text(&o).contains(says), "{cmd}: {}", text(&o));
    }
    // A cluster's own `mpirun`, later on PATH, is not hidden.
    let installed: Vec<String> = std::fs::read_dir(dir.path().join("bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(!installed.contains(&"mpirun".to_string()), "{installed:?}");
    assert!(t.contains("does not hide another `mpirun`"), "{t}");
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
        "kernel     CPU flash (causal) on each document of ≥ 4096 tokens (one call per run of equal-length ones), CPU flash with a block-diagonal causal mask on the shorter ones; CPU flash (causal) on single-document samples",
        "documents  data.documents = \"mask\": attention within each document",
        "RoPE positions run on across documents",
        "within the documents of 4 of the 4 sequences (4.0 documents each, median length in [256, 512)):",
        "25.0% of full causal",
    ] {
        assert!(t.contains(expected), "check output lacks {expected:?}:\n{t}");
    }
}

#[test]
fn a_diverging_run_stops_on_the_first_non_finite_step_and_saves_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let exp = tiny_experiment(dir.path(), "every = 1");
    let diverging =
        std::fs::read_to_string(&exp).unwrap().replace("steps = 2", "steps = 5\nlr = 1e30\nwarmup_steps = 0");
    std::fs::write(&exp, diverging).unwrap();
    let o = mpirun(2, &["train", exp.to_str().unwrap()], dir.path(), &[]);
    let t = assert_clean_failure(&o);
    // lr = 1e30 makes the weights of step 1's update huge: step 2's loss is no longer finite.
    assert!(t.contains("step 2: the loss is") && t.contains("stopped before this step's optimizer update"), "{t}");
    assert!(t.contains("not finite"), "the message says where: {t}");
    assert_eq!(t.matches("stopped before this step's optimizer update").count(), 1, "said once (rank 0):\n{t}");
    let run = dir.path().join("runs/t");
    let mut saved: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") && !n.contains(".tmp"))
        .collect();
    saved.sort();
    assert_eq!(saved, ["step-000001"], "only the last finite step's checkpoint");
    assert!(!run.join("final").exists(), "no final model of a diverged run");
    // The metrics hold step 1 alone, and its loss is finite (read as a live file: the job was
    // aborted while it held it open for SWMR writing).
    let f = ulysses::h5::open_live(&run.join("metrics.h5")).unwrap();
    let losses: Vec<f64> = f.dataset("steps/loss").unwrap().read_raw().unwrap();
    assert!(losses.len() == 1 && losses[0].is_finite(), "{losses:?}");
}
