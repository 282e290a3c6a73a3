//! The optimizer equals torch.optim.AdamW: the same initial parameters, gradients and learning
//! rates through `optim::AdamW::step` and through torch (tests/torch/adamw_reference.py, in
//! the venv's Python), three steps, weight decay on matrices only, fp32.
mod common;
use common::*;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};
use ulysses::comm::Groups;
use ulysses::config::ZeroStage;
use ulysses::model::spec::{ModelSpec, Preset};
use ulysses::optim::AdamW;
use ulysses::parallel::zero::{ShardMut, ShardedParams};

#[test]
fn adamw_equals_torch() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::preset(Preset::Tiny);
    let groups = Groups::solo();
    tch::manual_seed(3);
    let mut params = ShardedParams::new(&spec, ZeroStage::Replicated, groups.world.as_ref(), Device::Cpu, |u| {
        u.tensors.iter().map(|(_, s)| Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)) * 0.1).collect()
    })
    .unwrap();
    let h = AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let lrs = [1e-2, 5e-3, 2e-3];
    let named = |p: &ShardedParams| -> Vec<(String, Tensor)> { p.gather_named(groups.world.as_ref()).unwrap() };
    Tensor::write_safetensors(&named(&params), dir.path().join("init.safetensors")).unwrap();
    for (i, lr) in lrs.iter().enumerate() {
        // Gradients of very different scales, so Adam's normalisation is exercised.
        for (u, (_, _, shard)) in params.shards_mut().unwrap().enumerate() {
            let ShardMut::Memory(shard) = shard else { unreachable!("in memory") };
            let g =
                Tensor::randn(shard.grad.size().as_slice(), (Kind::Float, Device::Cpu)) * 10f64.powi(u as i32 % 3 - 1);
            shard.grad.copy_(&g);
        }
        let grads: Vec<(String, Tensor)> =
            params.units().iter().flat_map(|u| params.unit_grads(u.id).unwrap()).map(|(n, t)| (n, t.copy())).collect();
        Tensor::write_safetensors(&grads, dir.path().join(format!("grads-{}.safetensors", i + 1))).unwrap();
        h.step(&mut params, *lr, i as i64 + 1, 1.0).unwrap();
    }
    let cfg = serde_json::json!({"lrs": lrs, "beta1": h.beta1, "beta2": h.beta2, "eps": h.eps, "weight_decay": h.weight_decay});
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/torch/adamw_reference.py");
    let out = std::process::Command::new(PYTHON).arg(script).arg(dir.path()).output().expect("run the venv's python3");
    assert!(out.status.success(), "{}", text(&out));
    let reference: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("torch_final.safetensors")).unwrap().into_iter().collect();
    let ours = named(&params);
    assert_eq!(ours.len(), reference.len());
    let init: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("init.safetensors")).unwrap().into_iter().collect();
    let mut moved = 0.0f64;
    for (name, t) in &ours {
        let r = &reference[name];
        let diff = (t - r).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{name}: differs from torch.optim.AdamW by {diff:.2e}");
        moved = moved.max((t - &init[name]).abs().max().double_value(&[]));
    }
    assert!(moved > 1e-3, "the parameters did not move ({moved:.2e})");
}
