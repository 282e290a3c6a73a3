//! Packed documents in one process (CPU, fp32): the layer-wise step with attention within
//! documents gives the loss and every gradient of running each document as its own sample (summed
//! token losses), on the kept path (CPU flash with a block-diagonal mask, fused backward) and the
//! recomputed one, every document by the masked kernel or the long ones by the causal kernel
//! one by one, with restarting or global positions, tiny documents and samples that differ;
//! the readable reference with its dense mask agrees; and a micro batch whose samples are one
//! document each takes exactly today's causal path, bit for bit. tests/packed_training.rs runs
//! the same under mpirun for sp ∈ {1, 2, 4}.
use tch::{Device, Kind, Tensor};
use ulysses::comm::Groups;
use ulysses::config::{DocumentKernels, FusedAttention, ZeroStage};
use ulysses::data::{sample_targets, Documents, PackedDocuments, Packing, Positions, IGNORE_INDEX};
use ulysses::metrics::profile::Profiler;
use ulysses::model::spec::{ModelSpec, Preset};
use ulysses::parallel::zero::ShardedParams;
use ulysses::plan::memory::{Place, Placement};
use ulysses::rng::SplitMix64;
use ulysses::train::reference::Reference;
use ulysses::train::step::{micro_step, MicroBatch, StepContext};
use ulysses::train::store::ActivationStore;

const S: usize = 40;

fn params(spec: &ModelSpec, groups: &Groups) -> ShardedParams {
    let mut rng = SplitMix64::new(5);
    ShardedParams::new(spec, ZeroStage::Replicated, groups.world.as_ref(), Device::Cpu, |u| {
        u.tensors
            .iter()
            .map(|(_, s)| {
                let n: i64 = s.iter().product();
                let u =
                    Tensor::from_slice(&(0..n).map(|_| rng.unit_f64() as f32).collect::<Vec<f32>>()).view(s.as_slice());
                if s.len() == 1 {
                    u + 0.5
                } else {
                    (u - 0.5) * 0.15
                }
            })
            .collect()
    })
    .unwrap()
}

/// Random tokens for `docs` (one entry per sample), labels and positions as the loader makes
/// them for `packing`.
fn packed(spec: &ModelSpec, docs: &[Documents], packing: Packing, seed: u64) -> (MicroBatch, Vec<Vec<i64>>) {
    let mut rng = SplitMix64::new(seed);
    let (mut ids, mut labels, mut positions, mut rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for d in docs {
        let row: Vec<i64> = (0..S).map(|_| rng.below(spec.vocab_size as u64) as i64).collect();
        let mut l: Vec<i64> = row[1..].to_vec();
        l.push(IGNORE_INDEX);
        positions.extend(sample_targets(d, &packing, None, 0, &mut l));
        ids.extend(&row);
        labels.extend(l);
        rows.push(row);
    }
    let b = docs.len() as i64;
    let t = |v: &[i64]| Tensor::from_slice(v).view([b, S as i64]);
    let mut batch = MicroBatch::unpacked(t(&ids), t(&labels), t(&positions));
    batch.documents = docs.to_vec();
    (batch, rows)
}

/// Every document of `batch` as its own one-sample micro batch: its tokens, the next-token
/// labels inside it (the last one -100), positions from 0.
fn each_document_alone(batch: &MicroBatch, rows: &[Vec<i64>]) -> Vec<MicroBatch> {
    let mut out = Vec::new();
    for (row, d) in rows.iter().zip(&batch.documents) {
        for (&start, len) in d.starts().iter().zip(d.lens()) {
            let ids = &row[start..start + len];
            let mut labels = ids[1..].to_vec();
            labels.push(IGNORE_INDEX);
            let t = |v: &[i64]| Tensor::from_slice(v).view([1, len as i64]);
            out.push(MicroBatch::unpacked(t(ids), t(&labels), t(&(0..len as i64).collect::<Vec<_>>())));
        }
    }
    out
}

/// The CPU's kernels within documents: documents of at least `min_len` tokens by the causal
/// kernel, the rest with the dense mask (0: every document with the mask).
fn cpu(min_len: usize) -> Option<DocumentKernels> {
    Some(DocumentKernels { varlen: FusedAttention::CpuFlash, causal: FusedAttention::CpuFlash, min_len })
}

/// The step's loss sum and gradients (divided by `n`) for `batch` with `documents` as the
/// kernels within documents (None: documents ignored), attention kept or recomputed.
fn step(
    spec: &ModelSpec,
    batch: &MicroBatch,
    documents: Option<DocumentKernels>,
    keep: bool,
    qkv_once: bool,
) -> (f64, Vec<(String, Tensor)>) {
    let groups = Groups::solo();
    let mut params = params(spec, &groups);
    let layers = spec.num_hidden_layers as usize;
    // Segment 1 once goes with the MLP projections kept, as the plan places them when everything
    // fits on the GPU: the fastest path beside the plain one.
    let placement = Placement {
        state: vec![Place::Device; layers + 2],
        inputs: vec![Place::Device; layers],
        attention: vec![keep.then_some(Place::Device); layers],
        qkv_once,
        mlp: vec![qkv_once; layers],
    };
    let profiler = Profiler::new(Device::Cpu, false);
    let ctx = StepContext {
        spec,
        groups: &groups,
        kind: Kind::Float,
        device: Device::Cpu,
        mlp_tile: 0,
        loss_tile: 0,
        profiler: &profiler,
        layers: StepContext::layers(&placement, Some(FusedAttention::CpuFlash), false),
        documents,
        ring: None,
        frozen: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut store = ActivationStore::new(Device::Cpu, dir.path(), 0).unwrap();
    let n = batch.valid_labels() as f64;
    let loss = micro_step(&ctx, &mut params, &mut store, batch, n, &mut Default::default(), None).unwrap();
    let grads = params.units().to_vec().iter().flat_map(|u| params.unit_grads(u.id).unwrap()).collect();
    (loss, grads)
}

fn assert_close(
    what: &str,
    loss_sum: f64,
    n: f64,
    grads: &[(String, Tensor)],
    reference: (f64, Vec<Tensor>),
    names: &[String],
) {
    let (loss, reference_grads) = reference;
    assert!((loss_sum / n - loss).abs() <= 1e-5 * loss.abs(), "{what}: loss {} vs {loss}", loss_sum / n);
    assert_eq!(grads.len(), names.len());
    for (name, g) in grads {
        let i = names.iter().position(|k| k == name).unwrap();
        let r = &reference_grads[i];
        let scale = r.abs().max().double_value(&[]).max(1e-6);
        let diff = (g - r).abs().max().double_value(&[]);
        assert!(diff / scale < 1e-5, "{what}: {name}: max diff {diff:.3e} (scale {scale:.3e})");
    }
}

/// Documents crossing nowhere in particular, tiny ones (1 and 2 tokens), and a second sample with
/// other boundaries, so the mask differs between the rows of the micro batch.
fn documents() -> Vec<Documents> {
    vec![Documents::from_starts(&[0, 7, 8, 10, 23], S), Documents::from_starts(&[0, 31, 32], S)]
}

#[test]
fn a_packed_step_equals_each_document_as_its_own_sample() {
    let spec = ModelSpec::preset(Preset::Tiny);
    let packing = Packing { documents: PackedDocuments::Mask, positions: Positions::Document };
    let (batch, rows) = packed(&spec, &documents(), packing, 7);
    let alone = each_document_alone(&batch, &rows);
    let n = batch.valid_labels() as f64;
    assert_eq!(n as i64, alone.iter().map(MicroBatch::valid_labels).sum::<i64>(), "the same labels count");
    assert_eq!(n as usize, 2 * S - 8, "the last position of every document is ignored");

    let groups = Groups::solo();
    let reference = Reference::new(&spec, params(&spec, &groups).gather_named(groups.world.as_ref()).unwrap());
    let names: Vec<String> = reference.named().iter().map(|(k, _)| k.clone()).collect();
    let per_document = reference.loss_and_grads(&alone);
    let masked_reference = reference.loss_and_grads(std::slice::from_ref(&batch));
    // min_len 5: documents of 7, 13, 17, 31 and 8 tokens one by one, the tiny ones with the mask.
    let paths =
        [(true, false, 0), (true, true, 0), (false, false, 0), (false, true, 0), (true, false, 5), (false, false, 5)];
    for (keep, qkv_once, min_len) in paths {
        let (loss, grads) = step(&spec, &batch, cpu(min_len), keep, qkv_once);
        let what = format!(
            "{} attention, qkv once: {qkv_once}, causal kernel from {min_len} tokens",
            if keep { "kept" } else { "recomputed" }
        );
        let clone = |r: &(f64, Vec<Tensor>)| (r.0, r.1.iter().map(Tensor::copy).collect());
        assert_close(&format!("{what} vs each document alone"), loss, n, &grads, clone(&per_document), &names);
        assert_close(
            &format!("{what} vs the reference's dense mask"),
            loss,
            n,
            &grads,
            clone(&masked_reference),
            &names,
        );
    }
    // Without the mask the documents see each other: the loss differs, so the test can fail.
    let (unmasked, _) = step(&spec, &batch, None, true, false);
    assert!(
        (unmasked / n - per_document.0).abs() > 1e-3,
        "masking changed nothing: {unmasked} vs {}",
        per_document.0 * n
    );
}

#[test]
fn global_positions_within_documents_give_the_same_attention() {
    // RoPE makes q·k depend on the distance between positions only, so attention within a
    // document is the same at global positions as at restarted ones, up to rounding.
    let spec = ModelSpec::preset(Preset::Tiny);
    let packing = Packing { documents: PackedDocuments::Mask, positions: Positions::Global };
    let (batch, rows) = packed(&spec, &documents(), packing, 9);
    assert_eq!(Vec::<i64>::try_from(batch.position_ids.get(0).narrow(0, 6, 3)).unwrap(), vec![6, 7, 8]);
    let groups = Groups::solo();
    let reference = Reference::new(&spec, params(&spec, &groups).gather_named(groups.world.as_ref()).unwrap());
    let names: Vec<String> = reference.named().iter().map(|(k, _)| k.clone()).collect();
    let (loss, grads) = step(&spec, &batch, cpu(0), true, false);
    let n = batch.valid_labels() as f64;
    let alone = reference.loss_and_grads(&each_document_alone(&batch, &rows));
    assert_close("global positions vs each document alone", loss, n, &grads, alone, &names);
}

#[test]
fn single_document_samples_take_the_causal_path_bit_for_bit() {
    let spec = ModelSpec::preset(Preset::Tiny);
    let packing = Packing { documents: PackedDocuments::Mask, positions: Positions::Document };
    let (batch, _) = packed(&spec, &[Documents::whole(S), Documents::from_starts(&[0], S)], packing, 11);
    for (keep, qkv_once) in [(true, false), (true, true), (false, false)] {
        let (loss_masked, masked) = step(&spec, &batch, cpu(0), keep, qkv_once);
        let (loss_plain, plain) = step(&spec, &batch, None, keep, qkv_once);
        assert_eq!(loss_masked.to_bits(), loss_plain.to_bits(), "keep = {keep}, qkv once {qkv_once}: loss");
        for ((name, a), (_, b)) in masked.iter().zip(&plain) {
            assert!(a.equal(b), "keep = {keep}, qkv once {qkv_once}: {name} differs");
        }
    }
}
