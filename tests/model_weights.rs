//! Weight containers and safetensors I/O: deterministic init, HF naming, bit-exact save/load,
//! dtype conversion, and clear errors (naming file, tensor and shapes) for bad checkpoints.
mod model_support;

use model_support::{scaled_weights, tiny};
use std::path::Path;
use tch::{Device, Kind, Tensor};
use ulysses::model::llama::{LayerWeights, ModelWeights};
use ulysses::model::weights::{load_hf, save_hf, WeightsError};

fn assert_same(a: &ModelWeights, b: &ModelWeights) {
    let (a, b) = (a.named_tensors(), b.named_tensors());
    assert_eq!(a.len(), b.len());
    for ((n1, t1), (n2, t2)) in a.iter().zip(&b) {
        assert_eq!(n1, n2);
        assert_eq!(t1.kind(), t2.kind(), "{n1}");
        assert!(t1.equal(t2), "{n1} differs");
    }
}

fn load_err(path: &Path, spec: &ulysses::model::spec::ModelSpec) -> String {
    match load_hf(path, spec, Kind::Float, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn init_is_deterministic_and_hf_named() {
    let spec = tiny(false);
    let a = ModelWeights::init(&spec, 7, Kind::Float, Device::Cpu);
    let b = ModelWeights::init(&spec, 7, Kind::Float, Device::Cpu);
    assert_same(&a, &b);
    let c = ModelWeights::init(&spec, 8, Kind::Float, Device::Cpu);
    assert!(!a.embed.equal(&c.embed), "another seed must give other weights");
    // One layer built alone equals that layer of the whole model.
    let l1 = LayerWeights::init(&spec, 1, 7, Kind::Float, Device::Cpu);
    for ((n, t1), (_, t2)) in l1.tensors().into_iter().zip(a.layers[1].tensors()) {
        assert!(t1.equal(t2), "LayerWeights::init differs at {n}");
    }
    assert!(!a.layers[0].wq.equal(&a.layers[1].wq), "layers must differ");
    let std = a.layers[0].w_up.std(true).double_value(&[]);
    assert!((std - 0.02).abs() < 0.002, "init std {std}");
    assert_eq!(a.norm.min().double_value(&[]), 1.0);
    let names: Vec<String> = a.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len() as i64, 3 + 9 * spec.num_hidden_layers);
    assert_eq!(names[0], "model.embed_tokens.weight");
    assert_eq!(names[2], "model.layers.0.self_attn.q_proj.weight");
    assert_eq!(names[names.len() - 2], "model.norm.weight");
    assert_eq!(names[names.len() - 1], "lm_head.weight");
    let total: i64 = a.named_tensors().iter().map(|(_, t)| t.numel() as i64).sum();
    assert_eq!(total, spec.total_params());

    let tied = ModelWeights::init(&tiny(true), 7, Kind::BFloat16, Device::Cpu);
    assert!(tied.lm_head.is_none() && tied.lm_head().equal(&tied.embed));
    assert_eq!(tied.embed.kind(), Kind::BFloat16);
    assert!(tied.named_tensors().iter().all(|(n, _)| n != "lm_head.weight"));
}

#[test]
fn save_load_is_bit_exact_and_converts_dtypes() {
    let spec = tiny(false);
    let dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Float, Kind::BFloat16] {
        let w = ModelWeights::init(&spec, 3, kind, Device::Cpu);
        // One file (no limit) and sharded.
        for max_shard in [0, 50_000] {
            let path = dir.path().join(format!("{kind:?}-{max_shard}"));
            save_hf(&w, &spec, &path, max_shard).unwrap();
            assert_eq!(path.join("model.safetensors").exists(), max_shard == 0);
            assert_eq!(path.join("model.safetensors.index.json").exists(), max_shard > 0);
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
            assert_eq!(config["dtype"], if kind == Kind::Float { "float32" } else { "bfloat16" });
            assert_same(&w, &load_hf(&path, &spec, kind, Device::Cpu).unwrap());
            // Converted on load: bf16 file -> fp32 weights equal the upcast.
            let f32 = load_hf(&path, &spec, Kind::Float, Device::Cpu).unwrap();
            assert!(f32.layers[1].w_down.equal(&w.layers[1].w_down.to_kind(Kind::Float)));
        }
    }
    // Saving again with fewer shards leaves no stale shard behind.
    let w = ModelWeights::init(&spec, 4, Kind::Float, Device::Cpu);
    let path = dir.path().join("Float-50000");
    save_hf(&w, &spec, &path, 0).unwrap();
    let left: Vec<_> = std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "expected config.json and model.safetensors only: {left:?}");
    assert_same(&w, &load_hf(&path, &spec, Kind::Float, Device::Cpu).unwrap());
    // A single file can be given directly.
    assert_same(&w, &load_hf(&path.join("model.safetensors"), &spec, Kind::Float, Device::Cpu).unwrap());
}

#[test]
fn truncated_file_is_a_clear_error() {
    let spec = tiny(false);
    let dir = tempfile::tempdir().unwrap();
    save_hf(&scaled_weights(&spec, 1), &spec, dir.path(), 0).unwrap();
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(dir.path(), &spec);
    assert!(msg.contains(&file.display().to_string()) && msg.contains("truncated or corrupt"), "{msg}");
    // A file cut inside its header, and one that is not safetensors at all.
    std::fs::write(&file, &bytes[..20]).unwrap();
    let msg = load_err(&file, &spec);
    assert!(msg.contains("model.safetensors") && msg.contains("truncated or corrupt"), "{msg}");
    std::fs::write(&file, b"not a safetensors file").unwrap();
    assert!(load_err(&file, &spec).contains("truncated or corrupt"));
}

/// Writes `named` as a single-file checkpoint and returns the load error.
fn error_for(named: Vec<(String, Tensor)>, spec: &ulysses::model::spec::ModelSpec) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    Tensor::write_safetensors(&named, &file).unwrap();
    (load_err(dir.path(), spec), file.display().to_string())
}

#[test]
fn missing_extra_and_misshapen_tensors_are_named() {
    let spec = tiny(false);
    let good = ModelWeights::init(&spec, 1, Kind::Float, Device::Cpu).named_tensors();

    let named = good
        .iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .map(|(n, t)| (n.clone(), t.shallow_clone()));
    let (msg, file) = error_for(named.collect(), &spec);
    assert!(msg.contains(&file) && msg.contains("1 missing: [model.layers.1.mlp.up_proj.weight]"), "{msg}");

    let mut named: Vec<_> = good.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    named.push(("model.layers.2.self_attn.q_proj.weight".into(), Tensor::zeros([64, 64], (Kind::Float, Device::Cpu))));
    let (msg, _) = error_for(named, &spec);
    assert!(msg.contains("1 unexpected: [model.layers.2.self_attn.q_proj.weight]"), "{msg}");

    let named = good.iter().map(|(n, t)| {
        let t = if n == "model.layers.0.self_attn.k_proj.weight" {
            Tensor::zeros([64, 64], (Kind::Float, Device::Cpu))
        } else {
            t.shallow_clone()
        };
        (n.clone(), t)
    });
    let (msg, file) = error_for(named.collect(), &spec);
    assert!(
        msg.contains(&file)
            && msg.contains("model.layers.0.self_attn.k_proj.weight")
            && msg.contains("shape [64, 64], expected [32, 64]"),
        "{msg}"
    );

    // A checkpoint of another architecture: the error lists the first names and counts the rest.
    let (msg, _) =
        error_for(ModelWeights::init(&tiny(true), 1, Kind::Float, Device::Cpu).named_tensors(), &tiny(false));
    assert!(msg.contains("1 missing: [lm_head.weight]"), "{msg}");
    let mut deep = tiny(false);
    deep.num_hidden_layers = 4;
    let (msg, _) = error_for(good.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(), &deep);
    assert!(msg.contains("18 missing: [model.layers.2.input_layernorm.weight") && msg.contains("and 10 more"), "{msg}");

    // Integer tensors are not weights.
    let named = good.iter().map(|(n, t)| {
        let t = if n == "model.norm.weight" { t.to_kind(Kind::Int64) } else { t.shallow_clone() };
        (n.clone(), t)
    });
    let (msg, _) = error_for(named.collect(), &spec);
    assert!(msg.contains("`model.norm.weight` has dtype Int64"), "{msg}");
}

#[test]
fn broken_sharded_checkpoints_are_named() {
    let spec = tiny(false);
    let dir = tempfile::tempdir().unwrap();
    save_hf(&ModelWeights::init(&spec, 1, Kind::Float, Device::Cpu), &spec, dir.path(), 50_000).unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let file_of = |tensor: &str| dir.path().join(json["weight_map"][tensor].as_str().unwrap());
    // A shard the index names is gone.
    let shard = file_of("model.layers.0.self_attn.q_proj.weight");
    std::fs::rename(&shard, dir.path().join("moved")).unwrap();
    let msg = load_err(dir.path(), &spec);
    assert!(msg.contains("cannot read") && msg.contains(&shard.display().to_string()), "{msg}");
    std::fs::rename(dir.path().join("moved"), &shard).unwrap();
    // The same tensor in two shards.
    let first = Tensor::read_safetensors(file_of("model.embed_tokens.weight")).unwrap();
    let mut second = Tensor::read_safetensors(&shard).unwrap();
    second.push((first[0].0.clone(), first[0].1.shallow_clone()));
    Tensor::write_safetensors(&second, &shard).unwrap();
    let msg = load_err(dir.path(), &spec);
    assert!(msg.contains(&format!("`{}` appears more than once", first[0].0)), "{msg}");
    // An index naming a file outside the model folder is refused before anything is opened.
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(&shard, outside.path().join("stolen.safetensors")).unwrap();
    for name in ["../stolen.safetensors".to_string(), outside.path().join("stolen.safetensors").display().to_string()] {
        let mut escaped = json.clone();
        escaped["weight_map"]["model.norm.weight"] = name.clone().into();
        std::fs::write(&index, escaped.to_string()).unwrap();
        let msg = load_err(dir.path(), &spec);
        assert!(msg.contains(&name) && msg.contains("not a file inside the model folder"), "{msg}");
    }
    // A broken index.
    std::fs::write(&index, "{\"metadata\": {}}").unwrap();
    let msg = load_err(dir.path(), &spec);
    assert!(msg.contains("model.safetensors.index.json") && msg.contains("weight_map"), "{msg}");
    // No weights at all.
    let empty = tempfile::tempdir().unwrap();
    let msg = load_err(empty.path(), &spec);
    assert!(msg.contains("no Hugging Face weights") && msg.contains("model.safetensors.index.json"), "{msg}");
    assert!(load_err(&empty.path().join("absent"), &spec).contains("cannot read"));
}

#[test]
fn in_memory_weights_are_checked_too() {
    let spec = tiny(false);
    let w = ModelWeights::init(&spec, 1, Kind::Float, Device::Cpu);
    // from_tensors takes a layer's tensors by suffix name, in any order.
    let mut named: Vec<(String, Tensor)> =
        w.layers[0].tensors().into_iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect();
    named.reverse();
    let layer = LayerWeights::from_tensors(&spec, named).unwrap();
    assert!(layer.wk.equal(&w.layers[0].wk));
    let named = w.layers[0]
        .tensors()
        .into_iter()
        .map(|(n, t)| (n.to_string(), if n.contains("k_proj") { t.tr() } else { t.shallow_clone() }));
    match LayerWeights::from_tensors(&spec, named.collect()) {
        Err(e @ WeightsError::Shape { .. }) => {
            assert!(e.to_string().contains("self_attn.k_proj.weight"), "{e}")
        }
        other => panic!("expected a shape error, got {:?}", other.err()),
    }
    // Mixed dtypes would fail deep inside libtorch; they are refused up front.
    let named = w.named_tensors().into_iter().map(|(n, t)| {
        let t = if n == "model.norm.weight" { t.to_kind(Kind::BFloat16) } else { t };
        (n, t)
    });
    let msg = ModelWeights::from_named(&spec, named.collect()).err().expect("mixed dtypes").to_string();
    assert!(msg.contains("`model.norm.weight` is BFloat16 on Cpu") && msg.contains("Float on Cpu"), "{msg}");
    // save_hf refuses weights that do not match the spec, before writing anything.
    let dir = tempfile::tempdir().unwrap();
    let msg = save_hf(&w, &tiny(true), &dir.path().join("out"), 0).expect_err("mismatch").to_string();
    assert!(msg.contains("unexpected: [lm_head.weight]"), "{msg}");
    assert!(!dir.path().join("out").exists());
}
