//! The experiment TOML: strict parsing, every problem reported at once with its path, defaults.
use std::path::Path;
use ulysses::config::{validate, Experiment, Resume, ZeroStage};

const BASE: &str = r#"
[model]
preset = "tiny"
[parallel]
sp = 2
dp = 2
[data]
paths = ["data/x"]
seq_len = 1024
"#;

fn parse(text: &str) -> Experiment {
    Experiment::parse(text, "test.toml").expect("valid TOML")
}

fn problems(text: &str, world: Option<usize>) -> Vec<String> {
    validate(&parse(text), world).expect_err("should be invalid").iter().map(|p| p.to_string()).collect()
}

#[test]
fn defaults_fill_missing_sections() {
    let e = parse(BASE);
    assert_eq!(e.run.seed, 1234);
    assert_eq!(e.train.grad_accum, 1);
    assert_eq!(e.parallel.zero_stage, ZeroStage::Sharded);
    assert!(e.data.shuffle);
    let spec = validate(&e, Some(4)).expect("valid");
    assert_eq!(spec.num_attention_heads, 4);
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let err = Experiment::parse(&BASE.replace("sp = 2", "sp = 2\nspp = 3"), "exp.toml").unwrap_err().to_string();
    assert!(err.contains("exp.toml") && err.contains("spp"), "{err}");
}

#[test]
fn unknown_sections_are_all_named_at_once() {
    let text = format!("{BASE}\n[trian]\nsteps = 3\n[checkpiont]\nevery = 2\n");
    let err = Experiment::parse(&text, "exp.toml").unwrap_err().to_string();
    assert!(err.contains("exp.toml") && err.contains("unknown section(s) [checkpiont], [trian]"), "{err}");
    assert!(err.contains("the sections are [run], [model], [parallel], [data], [train], [checkpoint]"), "{err}");
    // Every listed section is one the experiment reads.
    for section in ulysses::config::SECTIONS {
        assert!(
            BASE.contains(&format!("[{section}]")) || Experiment::parse(&format!("{BASE}[{section}]\n"), "x").is_ok()
        );
    }
}

#[test]
fn optimizer_numbers_out_of_range_are_refused() {
    for (train, field, value) in [
        ("lr = 1e39", "train.lr", "= 1e39 must be a positive number within fp32's range"),
        ("lr = inf", "train.lr", "= inf must be a positive number"),
        ("eps = 1e-50", "train.eps", "= 1e-50 must be in [1e-30, 1]"),
        ("eps = inf", "train.eps", "= inf must be in [1e-30, 1]"),
        ("weight_decay = inf", "train.weight_decay", "= inf must be a finite number >= 0"),
        ("lr = 0.1\nweight_decay = 20.0", "train.weight_decay", "train.lr × train.weight_decay < 1"),
        ("beta2 = 1.0", "train.beta2", "= 1 must be in [0, 1)"),
    ] {
        let joined = problems(&format!("{BASE}\n[train]\n{train}\n"), Some(4)).join("\n");
        assert!(joined.contains(&format!("{field}: {value}")) || joined.contains(value), "{train}: {joined}");
        assert!(joined.contains(field), "{train}: {joined}");
    }
    let fine = parse(&format!("{BASE}\n[train]\nlr = 1.0\neps = 1e-30\nweight_decay = 0.5\n"));
    validate(&fine, Some(4)).expect("the range's ends are valid");
}

#[test]
fn one_rank_without_mpirun_says_how_to_launch() {
    let joined = problems(BASE, Some(1)).join("\n");
    assert!(joined.contains("sp × dp = 2 × 2 = 4 but the job has 1 rank: launch it under MPI"), "{joined}");
    assert!(joined.contains("mpirun -n 4 ulysses train"), "{joined}");
    assert!(!joined.contains("1 ranks"), "{joined}");
}

#[test]
fn wrong_type_is_an_error_naming_the_key() {
    let err =
        Experiment::parse(&BASE.replace("seq_len = 1024", "seq_len = \"long\""), "exp.toml").unwrap_err().to_string();
    assert!(err.contains("seq_len"), "{err}");
}

#[test]
fn bad_enum_value_lists_nothing_silently() {
    let err = Experiment::parse(&format!("{BASE}\n[train]\ndtype = \"fp8\"\n"), "exp.toml").unwrap_err().to_string();
    assert!(err.contains("fp8") && err.contains("fp32") && err.contains("bf16"), "{err}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = BASE.replace("sp = 2", "sp = 3").replace("seq_len = 1024", "seq_len = 1000")
        + "\n[train]\nlr = -1.0\nsteps = 0\n";
    let p = problems(&text, Some(4));
    let joined = p.join("\n");
    assert!(joined.contains("parallel: sp × dp = 3 × 2 = 6 but the job has 4 ranks"), "{joined}");
    assert!(
        joined.contains("parallel.sp: = 3 does not divide the model's 4 query heads; use one of 1, 2, 4"),
        "{joined}"
    );
    assert!(
        joined.contains("data.seq_len: = 1000 is not divisible by parallel.sp = 3; use e.g. 999 or 1002"),
        "{joined}"
    );
    assert!(joined.contains("train.lr: = -1 must be a positive number"), "{joined}");
    assert!(joined.contains("train.steps: is 0"), "{joined}");
    assert!(p.len() >= 5, "{joined}");
}

#[test]
fn world_size_is_checked_only_when_known() {
    assert!(validate(&parse(BASE), None).is_ok());
    let p = problems(BASE, Some(8));
    assert_eq!(p.len(), 1, "{p:?}");
}

#[test]
fn unknown_preset_lists_the_valid_ones() {
    // A preset is a choice, parsed as one: an unknown name stops the parse with the valid names.
    let err = Experiment::parse(&BASE.replace("\"tiny\"", "\"llama4\""), "exp.toml").unwrap_err().to_string();
    assert!(err.contains("model.preset") && err.contains("llama4") && err.contains("llama3.1-8b"), "{err}");
}

#[test]
fn preset_and_config_are_exclusive_and_one_is_required() {
    let p = problems(&BASE.replace("preset = \"tiny\"", "preset = \"tiny\"\nconfig = \"x.json\""), None);
    assert!(p[0].contains("not both"), "{p:?}");
    let p = problems(&BASE.replace("preset = \"tiny\"", ""), None);
    assert!(p[0].contains("set `preset`"), "{p:?}");
}

#[test]
fn hf_config_json_is_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("config.json");
    let spec = ulysses::model::spec::ModelSpec::preset(ulysses::model::spec::Preset::Llama31_8b);
    std::fs::write(&good, spec.to_hf_json().to_string()).unwrap();
    let back = ulysses::model::spec::ModelSpec::from_hf_config(&good).unwrap();
    assert_eq!(back, spec);
    let text = BASE.replace("preset = \"tiny\"", &format!("config = {:?}", good.display().to_string()));
    assert!(validate(&parse(&text), Some(4)).is_ok());

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    let text = BASE.replace("preset = \"tiny\"", &format!("config = {:?}", bad.display().to_string()));
    let p = problems(&text, None);
    assert!(p[0].contains("bad.json") && p[0].contains("num_attention_heads"), "{p:?}");
}

#[test]
fn bf16_on_cpu_and_odd_zero_stage_are_rejected() {
    // The ZeRO stage is a choice (0 or 3), parsed as one; bf16 on CPU is a rule between sections.
    let err = Experiment::parse(&BASE.replace("dp = 2", "dp = 2\nzero_stage = 2"), "exp.toml").unwrap_err().to_string();
    assert!(err.contains("parallel.zero_stage: is 2") && err.contains("0 (replicated) and 3"), "{err}");
    let p = problems(&(BASE.to_string() + "\n[train]\ndtype = \"bf16\"\n"), None);
    let joined = p.join("\n");
    assert!(joined.contains("train.dtype"), "{joined}");
}

#[test]
fn memory_budgets_must_be_non_negative() {
    let joined = problems(&(BASE.to_string() + "\n[memory]\ngpu_gib = -1.0\nhost_gib = nan\n"), None).join("\n");
    assert!(joined.contains("memory.gpu_gib: = -1 must be a number of GiB >= 0"), "{joined}");
    assert!(joined.contains("memory.host_gib: = NaN"), "{joined}");
    let e = parse(&(BASE.to_string() + "\n[memory]\ngpu_gib = 70.0\noffload_dir = \"/scratch\"\n"));
    assert_eq!((e.memory.gpu_gib, e.memory.host_gib), (70.0, 0.0));
    assert!(validate(&e, None).is_ok());
}

#[test]
fn parameter_counts_match_the_published_models() {
    use ulysses::model::spec::{ModelSpec, Preset};
    // Llama-3.1-8B: 8.03B parameters; Llama-3.2-1B: 1.24B (tied embeddings).
    let p8 = ModelSpec::preset(Preset::Llama31_8b).total_params();
    assert_eq!(p8, 8_030_261_248);
    let p1 = ModelSpec::preset(Preset::Llama32_1b).total_params();
    assert_eq!(p1, 1_235_814_400);
    // transformers' own counts (AutoModelForCausalLM.from_config on the meta device): Qwen3-8B
    // (q/k norms), Qwen2.5-7B (q/k/v biases), Mistral-7B-v0.3.
    assert_eq!(ModelSpec::preset(Preset::Qwen3_8b).total_params(), 8_190_735_360);
    assert_eq!(ModelSpec::preset(Preset::Qwen25_7b).total_params(), 7_615_616_512);
    assert_eq!(ModelSpec::preset(Preset::Mistral7b).total_params(), 7_248_023_552);
}

#[test]
fn shipped_experiments_parse_and_validate() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/experiments")).unwrap() {
        let path = entry.unwrap().path();
        let e = Experiment::load(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        validate(&e, None).unwrap_or_else(|p| panic!("{}: {p:?}", path.display()));
    }
}

#[test]
fn packed_documents_default_to_ignored_and_check_their_kernel() {
    use ulysses::data::{PackedDocuments, Positions};
    let e = parse(BASE);
    assert_eq!((e.data.documents, e.data.positions), (PackedDocuments::Ignore, Positions::Global));
    let masked = BASE.replace("seq_len = 1024", "seq_len = 1024\ndocuments = \"mask\"\npositions = \"document\"");
    let e = parse(&masked);
    assert_eq!((e.data.documents, e.data.positions), (PackedDocuments::Mask, Positions::Document));
    assert!(validate(&e, Some(4)).is_ok());
    let cuda = masked.replace("dp = 2", "dp = 2\ndevice = \"cuda\"\nattention = \"efficient\"");
    let p = problems(&cuda.replace("[data]", "[train]\ndtype = \"bf16\"\n[data]"), Some(4));
    assert!(
        p.iter().any(|m| m.starts_with("data.documents: = \"mask\"")
            && m.contains("\"efficient\"")
            && m.contains("\"flash\"")),
        "{p:?}"
    );
    let restart_across = BASE.replace("seq_len = 1024", "seq_len = 1024\npositions = \"document\"");
    let p = problems(&restart_across, Some(4));
    assert!(p.iter().any(|m| m.starts_with("data.positions: = \"document\" needs data.documents = \"mask\"")), "{p:?}");
    let by_document = format!("{BASE}\n[metrics]\nposition_by = \"document\"\n");
    let p = problems(&by_document, Some(4));
    assert!(p.iter().any(|m| m.starts_with("metrics.position_by") && m.contains("data.documents = \"mask\"")), "{p:?}");
    let err = Experiment::parse(&BASE.replace("seq_len = 1024", "seq_len = 1024\ndocuments = \"split\""), "x.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("split") && err.contains("mask") && err.contains("ignore"), "{err}");
}

/// A Hugging Face config.json of the `tiny` dimensions for `family`, written into `dir`.
fn family_config(dir: &std::path::Path, model_type: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v = serde_json::json!({
        "model_type": model_type, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "sliding_window": null, "transformers_version": "5.17.0"
    });
    edit(&mut v);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
}

fn with_model(model_lines: &str) -> String {
    BASE.replace("preset = \"tiny\"", model_lines)
}

#[test]
fn model_path_names_a_hugging_face_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("Qwen3-tiny");
    family_config(&model, "qwen3", |_| {});
    let text = with_model(&format!("path = {:?}", model.display().to_string()));
    let p = problems(&text, None).join("\n");
    assert!(p.contains("model.path") && p.contains("neither model.safetensors nor"), "{p}");
    std::fs::write(model.join("model.safetensors"), b"").unwrap();
    let spec = validate(&parse(&text), Some(4)).expect("valid");
    assert_eq!(spec.family, ulysses::model::spec::Family::Qwen3);
    assert!(spec.qk_norm);
    let e = parse(&text);
    assert_eq!(e.model.weights_path(), Some(model.as_path()));

    let both = with_model(&format!("path = {:?}\npreset = \"tiny\"", model.display().to_string()));
    let p = problems(&both, None);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("`path` names the whole model folder"), "{p:?}");
    let missing = with_model(&format!("path = {:?}", dir.path().join("nope").display().to_string()));
    assert!(problems(&missing, None)[0].contains("is not a folder"));
}

#[test]
fn layers_set_a_presets_depth_and_need_a_preset() {
    let spec = validate(&parse(&with_model("preset = \"qwen3-8b\"\nlayers = 8")), None).expect("valid");
    assert_eq!((spec.num_hidden_layers, spec.hidden_size, spec.vocab_size), (8, 4096, 151936));
    assert_eq!(parse(&with_model("preset = \"qwen3-8b\"\nlayers = 8")).model.name(), "qwen3-8b with 8 layers");
    let p = problems(&with_model("config = \"x.json\"\nlayers = 8"), None).join("\n");
    assert!(p.contains("model.layers: needs model.preset"), "{p}");
    let p = problems(&with_model("preset = \"tiny\"\nlayers = 0"), None).join("\n");
    assert!(p.contains("model.layers: = 0 must be at least 1"), "{p}");
}

/// Each bad config.json gives exactly one problem, naming the file, the field and its value.
#[test]
fn bad_model_configs_each_give_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &str, Box<dyn FnOnce(&mut serde_json::Value)>, &[&str])> = vec![
        ("gelu", "llama", Box::new(|v| v["hidden_act"] = "gelu".into()), &["`hidden_act` is \"gelu\"", "\"silu\""]),
        ("type", "gemma2", Box::new(|_| {}), &["`model_type` is \"gemma2\"", "\"qwen3\""]),
        (
            "no-type",
            "x",
            Box::new(|v| drop(v.as_object_mut().unwrap().remove("model_type"))),
            &["`model_type` is missing"],
        ),
        ("moe", "qwen3", Box::new(|v| v["num_experts"] = 64.into()), &["`num_experts` is 64", "dense models only"]),
        ("moe-type", "qwen3_moe", Box::new(|_| {}), &["\"qwen3_moe\" (a mixture-of-experts model)"]),
        (
            "missing",
            "mistral",
            Box::new(|v| drop(v.as_object_mut().unwrap().remove("vocab_size"))),
            &["`vocab_size` is missing"],
        ),
        ("bias", "llama", Box::new(|v| v["mlp_bias"] = true.into()), &["`mlp_bias` is true"]),
        (
            "rope",
            "qwen2",
            Box::new(|v| v["rope_scaling"] = serde_json::json!({"rope_type": "longrope"})),
            &["`rope_scaling.rope_type` is \"longrope\"", "\"yarn\""],
        ),
        (
            "window",
            "mistral",
            Box::new(|v| v["sliding_window"] = 512.into()),
            &["data.seq_len", "sliding_window = 512", "1024 tokens"],
        ),
    ];
    for (name, model_type, edit, expected) in cases {
        let folder = dir.path().join(name);
        family_config(&folder, model_type, edit);
        let file = folder.join("config.json");
        let p = problems(&with_model(&format!("config = {:?}", file.display().to_string())), Some(4));
        assert_eq!(p.len(), 1, "{name}: one message expected: {p:?}");
        for e in expected {
            assert!(p[0].contains(e), "{name}: {:?} lacks {e:?}", p[0]);
        }
        if name != "window" {
            assert!(p[0].starts_with("model.config: model config") && p[0].contains(&*file.to_string_lossy()), "{p:?}");
        }
    }
}

#[test]
fn a_window_as_long_as_the_sequence_is_plain_causal_attention() {
    let dir = tempfile::tempdir().unwrap();
    family_config(dir.path(), "mistral", |v| v["sliding_window"] = 1024.into());
    let file = dir.path().join("config.json");
    let spec = validate(&parse(&with_model(&format!("config = {:?}", file.display().to_string()))), Some(4));
    assert_eq!(spec.expect("valid").sliding_window, Some(1024));
}

fn with_timeout(seconds: &str) -> String {
    BASE.replace("dp = 2\n", &format!("dp = 2\ncollective_timeout_s = {seconds}\n"))
}

#[test]
fn the_collective_timeout_is_a_sane_number_of_seconds() {
    for bad in ["0", "0.5", "nan", "inf", "1e300"] {
        let p = problems(&with_timeout(bad), Some(4));
        assert!(
            p.len() == 1 && p[0].starts_with("parallel.collective_timeout_s") && p[0].contains("from 1 to 31536000"),
            "{bad}: {p:?}"
        );
    }
    for good in ["1", "4", "1800"] {
        assert!(validate(&parse(&with_timeout(good)), Some(4)).is_ok(), "{good}");
    }
}

#[test]
fn run_name_is_one_plain_folder_name() {
    // The run folder is output_dir/name; "." and ".." would make it output_dir or its parent.
    for name in ["", ".", "..", "a/b", "../x", "a\\b", "tab\tname"] {
        let text = format!("[run]\nname = {name:?}\n{BASE}");
        let p = problems(&text, Some(4));
        assert!(
            p.len() == 1 && p[0].starts_with("run.name") && p[0].contains("one plain folder name"),
            "{name:?}: {p:?}"
        );
    }
    assert!(validate(&parse(&format!("[run]\nname = \"llama-1m.v2\"\n{BASE}")), Some(4)).is_ok());
}

#[test]
fn offload_optimizer_is_a_placement_and_the_old_switch_still_reads() {
    use ulysses::config::StatePlacement;
    let with = |v: &str| BASE.replace("dp = 2", &format!("dp = 2\noffload_optimizer = {v}"));
    assert_eq!(parse(BASE).parallel.offload_optimizer, StatePlacement::Auto, "the default");
    for (v, want) in [
        ("\"auto\"", StatePlacement::Auto),
        ("\"device\"", StatePlacement::Device),
        ("\"host\"", StatePlacement::Host),
        ("\"disk\"", StatePlacement::Disk),
        ("true", StatePlacement::Host),
        ("false", StatePlacement::Device),
    ] {
        let e = parse(&with(v));
        assert_eq!(e.parallel.offload_optimizer, want, "{v}");
        // Written back as its name, and read again the same.
        assert_eq!(parse(&e.to_toml()).parallel.offload_optimizer, want, "{v} round trip");
    }
    for bad in ["\"gpu\"", "3"] {
        let err = Experiment::parse(&with(bad), "exp.toml").unwrap_err().to_string();
        assert!(err.contains("exp.toml") && err.contains("offload_optimizer"), "{err}");
        assert!(err.contains("\"auto\", \"device\", \"host\" or \"disk\""), "{err}");
    }
    // Forced off the GPU, the state needs ZeRO-3 shards.
    let p = problems(&with("\"disk\"").replace("dp = 2", "dp = 2\nzero_stage = 0"), None);
    assert!(p.iter().any(|m| m.contains("parallel.offload_optimizer") && m.contains("= \"disk\" needs parallel.zero_stage = 3")), "{p:?}");
}

#[test]
fn the_demo_experiment_resumes_as_the_readme_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exp = Experiment::load(&root.join("experiments/tiny.toml")).unwrap();
    assert_eq!(exp.checkpoint.resume, Resume::Auto, "experiments/tiny.toml");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("Launched again it resumes"), "the README says what the demo does again");
}

#[test]
fn held_out_loss_needs_both_its_keys() {
    let with = |data: &str, train: &str| format!("{BASE}{data}\n[train]\n{train}\n");
    let e = parse(&with("eval_paths = [\"data/held-out\"]", "eval_every = 50"));
    assert_eq!((e.data.eval_paths.len(), e.train.eval_every), (1, 50));
    assert!(validate(&e, Some(4)).is_ok());
    assert_eq!(parse(BASE).train.eval_every, 0, "off by default");

    let p = problems(&with("eval_paths = [\"data/held-out\"]", ""), None).join("\n");
    assert!(p.contains("data.eval_paths: is set but train.eval_every = 0 never evaluates it"), "{p}");
    let p = problems(&with("", "eval_every = 50\nmemory_fit = true"), None).join("\n");
    assert!(p.contains("train.eval_every: = 50 needs held-out shards in data.eval_paths"), "{p}");
    assert!(p.contains("train.eval_every: = 50 with train.memory_fit = true"), "{p}");
    let err = Experiment::parse(&with("eval_path = [\"x\"]", ""), "exp.toml").unwrap_err().to_string();
    assert!(err.contains("eval_path"), "an unknown key is named: {err}");
}
