//! The layer-wise step with LoRA (a frozen base in `FrozenParams`, the adapters and any module
//! trained in full as ZeRO units) gives the readable reference's loss and the gradient of every
//! trainable tensor (`Reference::with_lora`: one autograd graph, the base a constant), on the
//! recomputed and the kept-attention paths, with the MLP's projections recomputed or kept (the
//! hand-written MLP backward), tied and untied, with and without modules trained in full.
mod model_support;

use model_support::{positions, scaled_weights};
use tch::{Device, Kind, Tensor};
use ulysses::comm::Groups;
use ulysses::config::{FullModule, FusedAttention, LoraConfig, ZeroStage};
use ulysses::metrics::profile::Profiler;
use ulysses::model::spec::adapter::trainable_shapes;
use ulysses::model::spec::{ModelSpec, Preset};
use ulysses::parallel::frozen::FrozenParams;
use ulysses::parallel::units::lora_units;
use ulysses::parallel::zero::ShardedParams;
use ulysses::plan::memory::{Place, Placement};
use ulysses::rng::SplitMix64;
use ulysses::train::reference::Reference;
use ulysses::train::step::{micro_step, Frozen, MicroBatch, StepContext};
use ulysses::train::store::ActivationStore;

/// The run's seed the dropout masks are drawn from.
const SEED: u64 = 11;

fn named(list: &[(String, Tensor)], name: &str) -> Tensor {
    list.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1.shallow_clone()
}

/// Random trainable tensors (B too, so every adapter gradient is non-zero), keyed by name.
fn trainable(spec: &ModelSpec, lora: &LoraConfig, base: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let mut rng = SplitMix64::new(3);
    trainable_shapes(spec, lora)
        .into_iter()
        .map(|(n, s)| {
            let t = if n.contains(".lora_") {
                let v: Vec<f32> = (0..s.iter().product::<i64>()).map(|_| (rng.unit_f64() as f32 - 0.5) * 0.6).collect();
                Tensor::from_slice(&v).view(s.as_slice())
            } else {
                named(base, &n).copy()
            };
            (n, t)
        })
        .collect()
}

/// The frozen base of `base` and the ZeRO units of `train` on one process at `stage`.
fn shards(
    spec: &ModelSpec,
    lora: &LoraConfig,
    base: &[(String, Tensor)],
    train: &[(String, Tensor)],
    stage: ZeroStage,
    world: &dyn ulysses::comm::Collective,
) -> (FrozenParams, ShardedParams) {
    let frozen = FrozenParams::new(spec, stage, world, Kind::Float, Device::Cpu, |u| {
        u.tensors.iter().map(|(n, _)| named(base, n).copy()).collect()
    });
    let params = ShardedParams::new_units(
        |s| lora_units(spec, lora, s),
        stage,
        world,
        Device::Cpu,
        |u| u.tensors.iter().map(|(n, _)| named(train, n)).collect(),
    )
    .unwrap();
    (frozen, params)
}

/// The step's context on one CPU process over the base `frozen`: attention kept (`keep`) or
/// recomputed, the MLP's projections kept (`kept_mlp`) or recomputed.
fn context<'a>(
    spec: &'a ModelSpec,
    groups: &'a Groups,
    profiler: &'a Profiler,
    frozen: Frozen<'a>,
    keep: bool,
    kept_mlp: bool,
) -> StepContext<'a> {
    let layers = spec.num_hidden_layers as usize;
    let placement = Placement {
        state: vec![Place::Device; layers + 2],
        inputs: vec![Place::Device; layers],
        attention: vec![keep.then_some(Place::Device); layers],
        qkv_once: keep,
        mlp: vec![kept_mlp; layers],
    };
    StepContext {
        spec,
        groups,
        kind: Kind::Float,
        device: Device::Cpu,
        mlp_tile: 8,
        loss_tile: 16,
        profiler,
        layers: StepContext::layers(&placement, keep.then_some(FusedAttention::CpuFlash), false),
        documents: None,
        ring: None,
        frozen: Some(frozen),
    }
}

/// The step's loss and every trainable gradient against the reference's, with adapters of
/// dropout `dropout` (the MLP tiles of 8 tokens cut the 29 tokens unevenly: a tile's mask must
/// be its tokens' part of the sequence's). Returns the loss.
fn check(tied: bool, full: &[FullModule], keep: bool, kept_mlp: bool, dropout: f64) -> f64 {
    let spec = ModelSpec { tie_word_embeddings: tied, ..ModelSpec::preset(Preset::Tiny) };
    let lora = LoraConfig { rank: 4, alpha: 8.0, dropout, train_fully: full.to_vec(), ..LoraConfig::default() };
    let base = scaled_weights(&spec, 9).named_tensors();
    let train = trainable(&spec, &lora, &base);
    let groups = Groups::solo();
    let world = groups.world.as_ref();
    let (frozen, mut params) = shards(&spec, &lora, &base, &train, ZeroStage::Sharded, world);

    let (b, s) = (2, 29);
    let mut rng = SplitMix64::new(8);
    let ids = Tensor::from_slice(&(0..b * s).map(|_| rng.below(spec.vocab_size as u64) as i64).collect::<Vec<_>>())
        .view([b, s]);
    let labels = ids.roll([-1], [1]);
    let _ = labels.narrow(1, s - 1, 1).fill_(-100);
    let batch =
        MicroBatch { step: 3, samples: vec![5, 2], ..MicroBatch::unpacked(ids, labels, positions(b, 0, s).copy()) };
    let n = batch.valid_labels() as f64;

    let copy = |l: &[(String, Tensor)]| l.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    let reference = Reference::with_lora(&spec, &lora, SEED, copy(&base), copy(&train));
    let (loss, grads) = reference.loss_and_grads(std::slice::from_ref(&batch));

    let profiler = Profiler::new(Device::Cpu, false);
    let ctx = context(&spec, &groups, &profiler, Frozen { base: &frozen, lora: &lora, seed: SEED }, keep, kept_mlp);
    let dir = tempfile::tempdir().unwrap();
    let mut store = ActivationStore::new(Device::Cpu, dir.path(), 0).unwrap();
    let sum = micro_step(&ctx, &mut params, &mut store, &batch, n, &mut Default::default(), None).unwrap();
    assert!((sum / n - loss).abs() <= 1e-5 * loss.abs(), "loss {} vs reference {loss}", sum / n);

    let mut checked = 0;
    for u in params.units().to_vec() {
        for (name, g) in params.unit_grads(u.id).unwrap() {
            let i = reference.named().iter().position(|(k, _)| *k == name).expect("a trainable tensor");
            let scale = grads[i].abs().max().double_value(&[]);
            assert!(scale > 0.0, "{name}: the reference gradient is zero");
            let diff = (&g - &grads[i]).abs().max().double_value(&[]);
            assert!(diff / scale < 1e-5, "{name}: max diff {diff:.3e} (scale {scale:.3e})");
            checked += 1;
        }
    }
    // Exactly the trainable tensors are units: the base has no gradient anywhere.
    assert_eq!(checked, reference.named().len());
    assert!(frozen.bytes() > 0);
    loss
}

#[test]
fn lora_step_equals_the_reference_recomputed_attention() {
    check(false, &[], false, false, 0.0);
}

#[test]
fn lora_step_equals_the_reference_kept_attention_and_mlp() {
    check(false, &[], true, true, 0.0);
}

#[test]
fn lora_step_with_the_lm_head_trained_in_full() {
    check(false, &[FullModule::LmHead], true, false, 0.0);
}

#[test]
fn lora_step_tied_with_the_embedding_trained_in_full() {
    check(true, &[FullModule::Embed], false, true, 0.0);
}

#[test]
fn lora_step_tied_with_a_frozen_embedding() {
    check(true, &[], true, true, 0.0);
}

/// With dropout the step's masks (forward without a graph, recompute with autograd, the MLP's
/// hand-written backward, kept or recomputed) are the reference's, which draws them once over
/// the whole sequence; and they drop something: the loss moves away from the undropped one.
#[test]
fn lora_step_with_dropout_equals_the_reference_recomputed_and_kept() {
    let plain = check(false, &[], false, false, 0.0);
    for (keep, kept_mlp) in [(false, false), (true, true), (true, false), (false, true)] {
        let dropped = check(false, &[], keep, kept_mlp, 0.3);
        assert!((dropped - plain).abs() > 1e-4 * plain, "dropout 0.3 changes the loss: {dropped} vs {plain}");
    }
}

/// `ulysses check` says what a `[lora]` section trains: for Llama-3.1-8B with rank 16 on every
/// projection, 41,943,040 trainable parameters (peft's `print_trainable_parameters` for the
/// same adapter) beside the 8.03B frozen.
#[test]
fn check_prints_trainable_and_frozen_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("exp.toml");
    std::fs::write(
        &exp,
        "[model]\npreset = \"llama3.1-8b\"\n[parallel]\nsp = 1\ndp = 1\n[data]\npaths = [\"nowhere\"]\nseq_len = 4096\n\
         [lora]\nrank = 16\nalpha = 32.0\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ulysses")).arg("check").arg(&exp).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(
            "lora       rank 16, alpha 32 (scale 2) on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        ),
        "{text}"
    );
    assert!(text.contains("trainable 41.94M parameters (0.52%), frozen 8.030B"), "{text}");
}

/// Training leaves the frozen base bit-identical: after micro steps and AdamW updates of the
/// adapters (and the LM head trained in full), every unit the base gathers equals the weights it
/// was built from, at ZeRO stage 0 (where a gather hands out views of the stored shard, so an
/// in-place write anywhere would land in it) and 3.
#[test]
fn training_leaves_the_frozen_base_bit_identical() {
    use ulysses::config::TrainConfig;
    use ulysses::optim::AdamW;
    use ulysses::parallel::units::model_units;
    for stage in [ZeroStage::Replicated, ZeroStage::Sharded] {
        let spec = ModelSpec::preset(Preset::Tiny);
        let lora = LoraConfig { rank: 4, alpha: 8.0, train_fully: vec![FullModule::LmHead], ..LoraConfig::default() };
        let base = scaled_weights(&spec, 9).named_tensors();
        let train = trainable(&spec, &lora, &base);
        let groups = Groups::solo();
        let world = groups.world.as_ref();
        let (frozen, mut params) = shards(&spec, &lora, &base, &train, stage, world);
        let profiler = Profiler::new(Device::Cpu, false);
        let ctx = context(&spec, &groups, &profiler, Frozen { base: &frozen, lora: &lora, seed: SEED }, true, true);
        let dir = tempfile::tempdir().unwrap();
        let mut store = ActivationStore::new(Device::Cpu, dir.path(), 0).unwrap();
        let adamw = AdamW::new(&TrainConfig { weight_decay: 0.1, ..TrainConfig::default() });
        let before = params.gather(world, ulysses::parallel::zero::UnitId::Layer(0), Kind::Float, Device::Cpu).unwrap();
        let before: Vec<Tensor> = before.iter().map(Tensor::copy).collect();
        let mut rng = SplitMix64::new(8);
        for step in 1..=3 {
            let (b, s) = (2, 29);
            let ids: Vec<i64> = (0..b * s).map(|_| rng.below(spec.vocab_size as u64) as i64).collect();
            let ids = Tensor::from_slice(&ids).view([b, s]);
            let batch = MicroBatch::unpacked(ids.copy(), ids.roll([-1], [1]), positions(b, 0, s).copy());
            micro_step(&ctx, &mut params, &mut store, &batch, (b * s) as f64, &mut Default::default(), None).unwrap();
            adamw.step(&mut params, 1e-2, step, 1.0).unwrap();
        }
        let after = params.gather(world, ulysses::parallel::zero::UnitId::Layer(0), Kind::Float, Device::Cpu).unwrap();
        assert!(before.iter().zip(&after).any(|(a, b)| !a.equal(b)), "{stage:?}: the adapters trained");
        for u in model_units(&spec, 1) {
            for ((name, _), t) in u.tensors.iter().zip(frozen.gather(world, u.id).unwrap()) {
                assert!(t.equal(&named(&base, name)), "{stage:?}: base tensor {name} changed");
            }
        }
    }
}

/// On a GPU (tests/gpu/run.sh PARTS=lora runs this binary from the bundle with `--ignored gpu_`):
/// the dropout masks drawn on CUDA are the CPU's bit for bit (every int64 op of the draw is
/// exact), over several mask tiles of a long input, and the adapter's dropped product and its
/// hand backward agree with the CPU's in fp32.
#[test]
#[ignore = "needs a CUDA GPU (tests/gpu/run.sh)"]
fn gpu_dropout_masks_on_cuda_equal_the_cpu() {
    use ulysses::config::LoraTarget;
    use ulysses::model::dropout::{Draw, TILE_ELEMENTS};
    assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
    let gpu = Device::Cuda(0);
    // 2 rows × 9000 tokens × 2048 features: 2.2 mask tiles of 2^24 elements.
    let (b, t, features, r) = (2i64, 9000i64, 2048i64, 8i64);
    assert!(b * t * features > 2 * TILE_ELEMENTS);
    let positions: Vec<i64> = (1000..1000 + t).collect();
    let draw = |device: Device| Draw::new(0.1, SEED, 7, &[3, 11], Tensor::from_slice(&positions).to_device(device));
    let (cpu, cuda) = (draw(Device::Cpu).layer(5), draw(gpu).layer(5));
    for target in [LoraTarget::Q, LoraTarget::Up] {
        let whole = |d: &ulysses::model::dropout::LayerDropout| {
            let m = d.mask(target, b, features);
            Tensor::cat(&m.tiles(t).map(|(_, _, m)| m.to_device(Device::Cpu)).collect::<Vec<_>>(), 1)
        };
        let (a, c) = (whole(&cpu), whole(&cuda));
        assert!(a.equal(&c), "{target}: the CUDA mask differs from the CPU's");
        let frac = c.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        println!("{target}: CUDA mask equals the CPU's over {} elements, dropped {frac:.5}", c.numel());
    }
    let mut rng = SplitMix64::new(4);
    let v: Vec<f32> = (0..b * t * features).map(|_| rng.unit_f64() as f32 - 0.5).collect();
    let x = Tensor::from_slice(&v).view([b, t, features]);
    let a = Tensor::from_slice(&v[..(r * features) as usize]).view([r, features]);
    let gu = Tensor::from_slice(&v[..(b * t * r) as usize]).view([b * t, r]);
    let on = |d: &ulysses::model::dropout::LayerDropout, device: Device| {
        let (x, a, gu) = (x.to_device(device), a.to_device(device), gu.to_device(device));
        let u = d.project(LoraTarget::K, &x, &a).to_device(Device::Cpu);
        let mut gx = x.zeros_like();
        let (ga, _) = d.backward(LoraTarget::K, &x, &a, &gu, &mut gx);
        (u, gx.to_device(Device::Cpu), ga.to_device(Device::Cpu))
    };
    let (cpu_out, cuda_out) = (on(&cpu, Device::Cpu), on(&cuda, gpu));
    for (name, want, got) in
        [("u", &cpu_out.0, &cuda_out.0), ("x grad", &cpu_out.1, &cuda_out.1), ("A grad", &cpu_out.2, &cuda_out.2)]
    {
        let scale = want.abs().max().double_value(&[]);
        let diff = (want - got).abs().max().double_value(&[]);
        println!("{name}: CUDA vs CPU max diff {diff:.2e} (scale {scale:.2e})");
        assert!(diff <= 1e-4 * scale, "{name}: CUDA differs from the CPU by {diff:e}");
    }
    println!("PASS LoRA dropout masks on CUDA equal the CPU's");
}
