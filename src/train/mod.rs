//! The training loop: data, parameter shards (fresh or from a checkpoint), steps, metrics,
//! checkpoints, and a clean stop on preemption.
pub mod checkpoint;
pub mod flops;
pub mod memory;
pub mod metrics;
pub mod position;
pub mod preempt;
pub mod profile;
pub(crate) mod progress;
pub mod schedule;
mod start;
pub mod step;
pub mod store;

use crate::comm::all_reduce_f64;
use crate::comm::{Collective, Groups, Mesh};
use crate::config::{AttentionBackend, Dtype, Experiment};
use crate::data::{Dataset, Loader, LoaderSpec};
use crate::memory_plan::{self, Budget, DoesNotFit, MemoryPlan};
use crate::model::spec::ModelSpec;
use crate::parallel::zero::AdamW;
use anyhow::{bail, Context, Result};
use metrics::{MetricsWriter, RunInfo, StepRow, StepTimes};
use position::PositionLoss;
use profile::Profiler;
use std::time::Instant;
use step::{micro_step, MicroBatch, StepContext};
use tch::{Device, Kind, Tensor};

fn batch_tensors(b: &crate::data::Batch, device: Device) -> MicroBatch {
    let shape = [b.micro_batch as i64, b.chunk_len as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    MicroBatch { input_ids: t(&b.input_ids), labels: t(&b.labels), position_ids: t(&b.position_ids) }
}

/// Peak host memory, GPU memory and activation-store disk use of every rank (collective), each
/// `[world]` bytes.
fn memory_per_rank(world: &dyn Collective, device: Device, disk: u64) -> Result<[Vec<u64>; 3]> {
    let mine = [memory::peak_host_bytes(), memory::peak_gpu_bytes(device), disk].map(|b| b as i64);
    let all: Vec<i64> =
        Vec::try_from(world.all_gather(&Tensor::from_slice(&mine).to_device(world.device()))?.to_device(Device::Cpu))?;
    Ok([0, 1, 2].map(|i| all.iter().skip(i).step_by(3).map(|&v| v as u64).collect()))
}

/// The smallest budget of any rank, so that every rank makes the same plan: ranks must agree on
/// which layers recompute attention (the recompute runs all-to-alls), and MemAvailable differs
/// from rank to rank.
fn agreed_budget(world: &dyn Collective, mine: Budget) -> Result<Budget> {
    let parts = Tensor::from_slice(&[mine.gpu, mine.host, mine.disk]).to_device(world.device());
    let all: Vec<f64> = Vec::try_from(world.all_gather(&parts)?.to_device(Device::Cpu))?;
    Ok(all.chunks(3).map(|b| Budget { gpu: b[0], host: b[1], disk: b[2] }).fold(mine, Budget::min))
}

/// Trains on `device` (this rank's GPU, or the CPU) with the mesh's communicators, within this
/// rank's memory `budget` (`Budget::measure`).
pub fn run(
    exp: &Experiment,
    spec: &ModelSpec,
    mesh: &Mesh,
    groups: &Groups,
    device: Device,
    budget: Budget,
) -> Result<()> {
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
    let preemption = preempt::Preemption::install().context("installing the SIGTERM/SIGUSR1 handlers")?;
    let dataset = Dataset::open(&exp.data.paths, exp.data.seq_len)?;
    if dataset.vocab_size() > spec.vocab_size {
        bail!(
            "data: the shards' vocabulary has {} tokens but the model's has {}; prepare the data with the model's tokenizer",
            dataset.vocab_size(),
            spec.vocab_size
        );
    }
    let t = &exp.train;
    let world = groups.world.as_ref();
    // Where layer inputs and kept attention wait, decided before anything large is allocated, so a
    // run that cannot fit stops here with the numbers and what would help.
    let world_size = mesh.sp * mesh.dp;
    let budget = agreed_budget(world, budget)?;
    let plan = MemoryPlan::new(exp, spec, world_size, exp.data.seq_len);
    let placement = plan
        .placement(&budget)
        .map_err(|shortfall| DoesNotFit(memory_plan::refusal(exp, spec, world_size, &budget, &shortfall)))?;
    if mesh.world_rank == 0 {
        log::info!("memory plan: {}", memory_plan::summary(&plan.with_placement(&placement), &placement, &budget));
    }
    // The fp32 master weights and Adam moments live on the GPU, or in host memory when offloaded
    // (AdamW then runs on the CPU with libtorch's multi-threaded vectorized kernels).
    let state_device = if exp.parallel.offload_optimizer { Device::Cpu } else { device };
    let (mut params, loader_state, start) = start::start_point(exp, spec, mesh, world, state_device)?;
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
    let mut loader = Loader::new(dataset, loader_spec, loader_state)?;
    let adamw = AdamW { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };
    let (bins, every_pos) = (exp.metrics.position_bins, exp.metrics.position_loss_every);

    let run_dir = exp.run_dir();
    let mut metrics = if mesh.world_rank == 0 && !t.memory_fit {
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating run directory {}", run_dir.display()))?;
        let bin_starts = PositionLoss::bin_starts(bins, exp.data.seq_len);
        let info = RunInfo {
            world_size: mesh.sp * mesh.dp,
            peak_tflops: flops::H100_BF16_PEAK_TFLOPS,
            bin_starts: &bin_starts,
        };
        Some(MetricsWriter::open(&run_dir.join("metrics.h5"), exp, &info, (start > 0).then_some(start))?)
    } else {
        None
    };
    if start == t.steps as u64 && mesh.world_rank == 0 {
        println!("the run is already complete (step {start} of {}); nothing to do", t.steps);
    }
    let tokens = (exp.data.seq_len * mesh.dp * t.micro_batch * t.grad_accum) as u64;
    let step_flops = flops::step_flops(spec, exp.data.seq_len, mesh.dp * t.micro_batch * t.grad_accum);
    let kernel = memory_plan::kept_attention_kernel(&exp.parallel);
    let mut store = store::ActivationStore::new(device, &exp.memory.offload_dir, mesh.world_rank)?;
    let started = Instant::now();
    for step in start as usize + 1..=t.steps {
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
            placement: &placement,
            kernel,
            memory_fit: t.memory_fit,
        };
        memory::reset_peak_gpu(device);
        let mut times = StepTimes::default();
        let t0 = Instant::now();
        let batches: Vec<MicroBatch> =
            (0..t.grad_accum).map(|_| Ok(batch_tensors(&loader.next_batch()?, device))).collect::<Result<_>>()?;
        times.data = t0.elapsed().as_secs_f64();
        let n_local: i64 = batches.iter().map(MicroBatch::valid_labels).sum();
        let n_total = all_reduce_f64(world, n_local as f64)?;
        let mut positions =
            (every_pos > 0 && step % every_pos == 0).then(|| PositionLoss::new(bins, exp.data.seq_len, device));
        let mut loss_local = 0.0;
        for b in &batches {
            loss_local +=
                micro_step(&ctx, &mut params, &mut store, b, n_total.max(1.0), &mut times, positions.as_mut())?;
        }
        let loss = all_reduce_f64(world, loss_local)? / n_total.max(1.0);
        let t_opt = Instant::now();
        let grad_norm = params.grad_norm(world)?;
        let clip = if t.clip_grad_norm > 0.0 && grad_norm > t.clip_grad_norm {
            t.clip_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let lr = schedule::lr_at(t, step);
        params.adamw_step(&adamw, lr, step as i64, clip).map_err(anyhow::Error::msg)?;
        // GPU work is asynchronous: the step ends when the device is done.
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        times.optimizer = t_opt.elapsed().as_secs_f64();
        let step_time = t0.elapsed().as_secs_f64();

        let position_bins = positions.map(|p| p.reduce(world)).transpose()?;
        let [peak_host_mem, peak_gpu_mem, peak_disk] = memory_per_rank(world, device, store.disk_bytes().1)?;
        store.reset_peaks();
        let per_rank_tflops = |f: f64| f / step_time / (mesh.sp * mesh.dp) as f64 / 1e12;
        let mut row = StepRow {
            step: step as u64,
            tokens,
            loss,
            lr,
            grad_norm,
            step_time,
            tokens_per_s: tokens as f64 / step_time,
            tflops: per_rank_tflops(step_flops.model),
            mfu: per_rank_tflops(step_flops.model) / flops::H100_BF16_PEAK_TFLOPS,
            tflops_alst: per_rank_tflops(step_flops.alst),
            mfu_alst: per_rank_tflops(step_flops.alst) / flops::H100_BF16_PEAK_TFLOPS,
            times,
            checkpoint_time: 0.0,
            peak_host_mem,
            peak_gpu_mem,
            peak_disk,
        };
        if mesh.world_rank == 0 && t.memory_fit {
            progress::print_memory_fit(&row, t.steps);
        } else if mesh.world_rank == 0 {
            progress::print_progress(&row, t.steps, started.elapsed().as_secs_f64() / (step - start as usize) as f64);
            if profiler.is_on() {
                progress::print_time_split(step, &profiler.finish());
            }
        }
        let preempted = preemption.requested(world)?;
        let t_ckpt = Instant::now();
        let every = exp.checkpoint.every;
        let last = step == t.steps && exp.checkpoint.save_final;
        if preempted || last || (every > 0 && step % every == 0) {
            let state = start::run_state(exp, mesh, step as u64, &loader);
            let dir = checkpoint::save(&params, &state, spec, &run_dir, exp.checkpoint.keep, world)?;
            if mesh.world_rank == 0 {
                if step == t.steps {
                    checkpoint::link_final(&run_dir, &dir)?;
                }
                println!("saved checkpoint {}", dir.display());
            }
        }
        if let Some(m) = metrics.as_mut() {
            row.checkpoint_time = t_ckpt.elapsed().as_secs_f64();
            m.append(&row)?;
            if let Some(b) = &position_bins {
                m.append_positions(step as u64, b)?;
            }
        }
        if preempted && step < t.steps {
            if mesh.world_rank == 0 {
                println!(
                    "preempted (SIGTERM/SIGUSR1): stopped after step {step}; launch the same command again to resume"
                );
            }
            return Ok(());
        }
    }
    Ok(())
}
