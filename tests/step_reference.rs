//! The layer-wise step (forward without a graph, backward by recomputing each layer in segments
//! across the all-to-alls) gives exactly the gradients of plain autograd over the whole model.
use tch::{Device, Kind, Tensor};
use ulysses::comm::Groups;
use ulysses::memory_plan::{Place, Placement};
use ulysses::model::kept_attention::Kernel;
use ulysses::model::llama::{self, LocalAttention, ModelWeights};
use ulysses::model::spec::ModelSpec;
use ulysses::parallel::zero::ShardedParams;
use ulysses::train::profile::Profiler;
use ulysses::train::step::{micro_step, MicroBatch, StepContext};
use ulysses::train::store::ActivationStore;

fn setup(spec: &ModelSpec) -> (ShardedParams, Groups) {
    let groups = Groups::solo();
    tch::manual_seed(5);
    let params = ShardedParams::new(spec, 0, groups.world.as_ref(), Device::Cpu, |u| {
        u.tensors
            .iter()
            .map(|(_, s)| {
                if s.len() == 1 {
                    Tensor::rand(s.as_slice(), (Kind::Float, Device::Cpu)) + 0.5
                } else {
                    Tensor::randn(s.as_slice(), (Kind::Float, Device::Cpu)) * 0.05
                }
            })
            .collect()
    });
    (params, groups)
}

/// `inputs`: where layer inputs wait; `keep`: attention outputs kept (fused backward) or recomputed.
fn check(spec: ModelSpec, mlp_tile: usize, loss_tile: usize, inputs: Place, keep: bool) {
    let (mut params, groups) = setup(&spec);
    let s = 37;
    let ids = Tensor::randint(spec.vocab_size, [2, s], (Kind::Int64, Device::Cpu));
    let labels = ids.roll([-1], [1]);
    let _ = labels.narrow(1, s - 1, 1).fill_(-100);
    let _ = labels.narrow(1, 3, 4).fill_(-100);
    let positions = Tensor::arange(s, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([2, 1]);
    let batch = MicroBatch {
        input_ids: ids.shallow_clone(),
        labels: labels.shallow_clone(),
        position_ids: positions.shallow_clone(),
    };
    let n = batch.valid_labels() as f64;

    // Reference: one autograd graph over the whole model.
    let named: Vec<(String, Tensor)> = params
        .gather_named(groups.world.as_ref())
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.set_requires_grad(true)))
        .collect();
    let w =
        ModelWeights::from_named(&spec, named.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()).unwrap();
    let logits = llama::forward_logits(&spec, &w, &ids, &positions, &LocalAttention);
    let loss = logits.view([-1, spec.vocab_size]).cross_entropy_loss::<Tensor>(
        &labels.view([-1]),
        None,
        tch::Reduction::Sum,
        -100,
        0.0,
    ) / n;
    loss.backward();

    let profiler = Profiler::new(Device::Cpu, true);
    let layers = spec.num_hidden_layers as usize;
    let placement = Placement { inputs: vec![inputs; layers], attention: vec![keep.then_some(Place::Device); layers] };
    let kernel = keep.then_some(Kernel::CpuFlash);
    let dir = tempfile::tempdir().unwrap();
    let mut store = ActivationStore::new(Device::Cpu, dir.path(), 0).unwrap();
    let ctx = StepContext {
        spec: &spec,
        groups: &groups,
        kind: Kind::Float,
        device: Device::Cpu,
        mlp_tile,
        loss_tile,
        profiler: &profiler,
        placement: &placement,
        kernel,
        memory_fit: false,
    };
    let loss_sum = micro_step(&ctx, &mut params, &mut store, &batch, n, &mut Default::default(), None).unwrap();
    assert!(
        (loss_sum / n - loss.double_value(&[])).abs() < 1e-5,
        "loss {} vs {}",
        loss_sum / n,
        loss.double_value(&[])
    );
    let mut checked = 0;
    for u in 0..params.units.len() {
        for (name, g) in params.unit_grads(u) {
            let reference = named.iter().find(|(k, _)| *k == name).unwrap().1.grad();
            let scale = reference.abs().max().double_value(&[]).max(1e-6);
            let diff = (&g - &reference).abs().max().double_value(&[]);
            assert!(diff / scale < 1e-5, "{name}: max diff {diff:.3e} (scale {scale:.3e})");
            checked += 1;
        }
    }
    assert_eq!(checked, named.len());
    // The profiler saw every kind of region of the step.
    let split = profiler.finish();
    assert!(split.attention > 0.0 && split.compute > 0.0 && split.comm > 0.0, "{split:?}");
}

#[test]
fn layerwise_step_equals_autograd_untied() {
    check(ModelSpec::preset("tiny").unwrap(), 0, 0, Place::Device, false);
}

#[test]
fn kept_attention_step_equals_autograd() {
    check(ModelSpec::preset("tiny").unwrap(), 0, 0, Place::Device, true);
}

#[test]
fn inputs_on_disk_give_the_same_gradients() {
    check(ModelSpec::preset("tiny").unwrap(), 0, 0, Place::Disk, true);
}

#[test]
fn layerwise_step_equals_autograd_tied_and_tiled() {
    let spec = ModelSpec { tie_word_embeddings: true, ..ModelSpec::preset("tiny").unwrap() };
    check(spec, 10, 7, Place::Host, true);
}
