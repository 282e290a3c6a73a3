//! The training loop: data, parameter shards, steps, metrics, the final model.
pub mod flops;
pub mod metrics;
pub mod profile;
pub mod schedule;
pub mod step;

use crate::config::{ActivationPlacement, AttentionBackend, Dtype, Experiment};
use crate::data::{Dataset, Loader, LoaderSpec, LoaderState};
use crate::comm::{Groups, Mesh};
use crate::model::spec::ModelSpec;
use crate::model::weights;
use crate::model::params::init_tensor;
use crate::parallel::zero::{AdamW, ShardedParams};
use anyhow::{bail, Context, Result};
use metrics::{MetricsWriter, StepRow};
use std::time::Instant;
use step::{micro_step, sum_over, MicroBatch, StepContext};
use flops::{step_flops, H100_BF16_PEAK_TFLOPS};
use profile::Profiler;
use crate::comm::all_gather_f64;
use tch::{Device, Kind, Tensor};

fn batch_tensors(b: &crate::data::Batch, device: Device) -> MicroBatch {
    let shape = [b.micro_batch as i64, b.chunk_len as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    MicroBatch { input_ids: t(&b.input_ids), labels: t(&b.labels), position_ids: t(&b.position_ids) }
}

/// Trains on `device` (this rank's GPU, or the CPU) with the mesh's communicators.
pub fn run(exp: &Experiment, spec: &ModelSpec, mesh: &Mesh, groups: &Groups, device: Device) -> Result<()> {
    if let Device::Cuda(_) = device {
        let (flash, efficient, math, cudnn) = match exp.parallel.attention {
            AttentionBackend::Auto => (true, true, true, true),
            AttentionBackend::Cudnn => (false, false, false, true),
            AttentionBackend::Flash => (true, false, false, false),
            AttentionBackend::Efficient => (false, true, false, false),
            AttentionBackend::Math => (false, false, true, false),
        };
        crate::cuda::set_sdp_backends(flash, efficient, math, cudnn);
    }
    let kind = match exp.train.dtype {
        Dtype::Fp32 => Kind::Float,
        Dtype::Bf16 => Kind::BFloat16,
    };
    let dataset = Dataset::open(&exp.data.paths, exp.data.seq_len)?;
    if dataset.vocab_size() > spec.vocab_size {
        bail!(
            "data: the shards' vocabulary has {} tokens but the model's has {}; prepare the data with the model's tokenizer",
            dataset.vocab_size(),
            spec.vocab_size
        );
    }
    let t = &exp.train;
    let loader_spec = LoaderSpec {
        seed: exp.run.seed,
        shuffle: exp.data.shuffle,
        dp: mesh.dp,
        dp_rank: mesh.dp_rank,
        sp: mesh.sp,
        sp_rank: mesh.sp_rank,
        micro_batch: t.micro_batch,
        loss_on: exp.data.loss_on,
    };
    let mut loader = Loader::new(dataset, loader_spec, LoaderState::default())?;

    let world = groups.world.as_ref();
    let initial = match &exp.model.weights {
        Some(path) => Some(
            weights::load_hf(path, spec, Kind::Float, Device::Cpu)
                .with_context(|| format!("loading model.weights {}", path.display()))?
                .named_tensors(),
        ),
        None => None,
    };
    // The fp32 master weights and Adam moments live on the GPU, or in host memory when offloaded
    // (AdamW then runs on the CPU with libtorch's multi-threaded vectorized kernels).
    let state_device = if exp.parallel.offload_optimizer { Device::Cpu } else { device };
    let mut params = ShardedParams::new(spec, exp.parallel.zero_stage, world, state_device, |u| match &initial {
        Some(named) => u.tensors.iter().map(|(n, _)| named.iter().find(|(k, _)| k == n).expect("validated names").1.shallow_clone()).collect(),
        None => u.tensors.iter().map(|(n, shape)| init_tensor(n, shape, exp.run.seed as i64, Kind::Float, Device::Cpu)).collect(),
    });
    drop(initial);
    let adamw = AdamW { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };

    let run_dir = exp.run_dir();
    let mut metrics = if mesh.world_rank == 0 {
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating run directory {}", run_dir.display()))?;
        Some(MetricsWriter::create(&run_dir.join("metrics.h5"), exp)?)
    } else {
        None
    };
    let flops = step_flops(spec, exp.data.seq_len, mesh.dp * t.micro_batch * t.grad_accum);
    let gpu = match device {
        Device::Cuda(i) => Some(i),
        Device::Cpu | Device::Mps | Device::Vulkan => None,
    };
    let started = Instant::now();
    for step in 1..=t.steps {
        let split_every = exp.metrics.time_split_every;
        let profiler = Profiler::new(device, split_every > 0 && step % split_every == 0);
        let ctx = StepContext {
            spec,
            groups,
            kind,
            device,
            mlp_tile: exp.parallel.mlp_tile,
            loss_tile: exp.parallel.loss_tile,
            profiler: &profiler,
            offload_activations: exp.parallel.activations == ActivationPlacement::Host,
        };
        if let Some(i) = gpu {
            crate::cuda::reset_peak(i);
        }
        let t0 = Instant::now();
        let batches: Vec<MicroBatch> =
            (0..t.grad_accum).map(|_| Ok(batch_tensors(&loader.next_batch()?, device))).collect::<Result<_>>()?;
        let n_local: i64 = batches.iter().map(MicroBatch::valid_labels).sum();
        let n_total = sum_over(world, n_local as f64)?;
        let mut loss_local = 0.0;
        for b in &batches {
            loss_local += micro_step(&ctx, &mut params, b, n_total.max(1.0))?;
        }
        let loss = sum_over(world, loss_local)? / n_total.max(1.0);
        let grad_norm = params.grad_norm(world)?;
        let clip = if t.clip_grad_norm > 0.0 && grad_norm > t.clip_grad_norm { t.clip_grad_norm / (grad_norm + 1e-6) } else { 1.0 };
        let lr = schedule::lr_at(t, step);
        params.adamw_step(&adamw, lr, step as i64, clip);
        if let Some(i) = gpu {
            tch::Cuda::synchronize(i as i64);
        }
        let step_time = t0.elapsed().as_secs_f64();
        let split = profiler.finish();
        let peak_gib = gpu.and_then(crate::cuda::memory).map_or(0.0, |m| m.peak_allocated as f64 / (1u64 << 30) as f64);
        let peak_max = all_gather_f64(world, peak_gib)?.into_iter().fold(0.0, f64::max);
        let tflops = flops.model / step_time / mesh.world_size() as f64 / 1e12;
        let tokens = (exp.data.seq_len * mesh.dp * t.micro_batch * t.grad_accum) as u64;
        let row = StepRow { step: step as u64, loss, lr, grad_norm, tokens, step_time, tokens_per_s: tokens as f64 / step_time };
        if let Some(m) = metrics.as_mut() {
            m.append(&row)?;
            let eta = started.elapsed().as_secs_f64() / step as f64 * (t.steps - step) as f64;
            let mut line = format!(
                "step {step:>5}/{}  loss {loss:.4}  lr {lr:.2e}  grad_norm {grad_norm:.3}  {:.1} tok/s  {step_time:.2} s/step",
                t.steps, row.tokens_per_s
            );
            if gpu.is_some() {
                let alst = flops.alst / step_time / mesh.world_size() as f64 / 1e12;
                let mfu = 100.0 * tflops / H100_BF16_PEAK_TFLOPS;
                line += &format!("  {tflops:.1} TFLOP/s/GPU  MFU {mfu:.1}%  ALST {alst:.1} TFLOP/s/GPU  peak {peak_max:.1} GiB");
            }
            println!("{line}  eta {eta:.0} s");
            if profiler.is_on() {
                println!(
                    "step {step:>5} time split (synchronised): attention {:.2} s  other compute {:.2} s  communication {:.2} s  waiting {:.2} s",
                    split.attention, split.compute, split.comm, split.wait
                );
            }
        }
    }
    if !exp.checkpoint.save_final {
        world.barrier()?;
        return Ok(());
    }
    let named = params.gather_named(world)?;
    if mesh.world_rank == 0 {
        let dir = run_dir.join("final");
        let w = crate::model::llama::ModelWeights::from_named(spec, named)?;
        weights::save_hf(&w, spec, &dir, 2 << 30).with_context(|| format!("saving the final model to {}", dir.display()))?;
        println!("saved the final model (Hugging Face format) to {}", dir.display());
    }
    world.barrier()?;
    Ok(())
}
