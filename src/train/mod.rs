//! The training loop. `run` sets a run up, in an order that fails early: the attention kernels,
//! the memory plan (before anything large is allocated, so a run that cannot fit stops with the
//! numbers), the step context, then the shards (fresh or from a checkpoint), the data and the
//! outputs. `Run::step` is one optimizer step, from its micro batches to its metrics row and
//! checkpoint, with a clean stop on preemption.
pub mod guard;
pub mod layer;
pub mod preempt;
pub mod reference;
pub mod schedule;
mod start;
pub mod step;
pub mod store;
mod validation;

use crate::checkpoint;
use crate::comm::{all_reduce_f64, Collective, Groups, Mesh};
use crate::config::Experiment;
use crate::data::{Dataset, Loader, LoaderSpec};
use crate::metrics::position::PositionLoss;
use crate::metrics::{memory, profile, progress, MetricsWriter, RunInfo, StepRow, StepTimes};
use crate::model::spec::ModelSpec;
use crate::optim::{clip_scale, grad_norm, AdamW};
use crate::parallel::attention::{allow_sdp_kernels, document_kernels};
use crate::parallel::frozen::FrozenParams;
use crate::parallel::zero::StateTiers;
use crate::plan::flops;
use crate::plan::memory::{self as memory_plan, Budget, DoesNotFit, Estimate, Placement, PlanInputs};
use anyhow::{bail, Context, Result};
use profile::Profiler;
use std::path::PathBuf;
use std::time::Instant;
use step::{micro_step, MicroBatch, StepContext};
use tch::{Device, Tensor};

/// How `run` ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The run has trained its last step (now or before).
    Complete,
    /// Stopped by SIGTERM/SIGUSR1 at a checkpoint; launching it again resumes it.
    Preempted,
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
) -> Result<Outcome> {
    if let Device::Cuda(_) = device {
        allow_sdp_kernels(exp.parallel.attention);
    }
    let kind = crate::model::kind_of(exp.train.dtype);
    let document_kernels = document_kernels(exp, spec, mesh.world_size(), kind, device)?;
    if let (Some(k), 0) = (document_kernels, mesh.world_rank) {
        log::info!(
            "attention within documents: {} (a micro batch of single-document samples: the causal kernel)",
            k.describe()
        );
    }
    let placement = plan_memory(exp, spec, mesh, groups.world.as_ref(), budget)?;
    // A LoRA run's base: in the compute dtype on the device, never updated.
    let base = match &exp.lora {
        Some(_) => Some(start::frozen_base(&start::StartSpec::of(exp), spec, groups.world.as_ref(), kind, device)?),
        None => None,
    };
    let profiler = Profiler::new(device, false);
    let ctx = StepContext {
        spec,
        groups,
        kind,
        device,
        mlp_tile: exp.parallel.mlp_tile,
        loss_tile: exp.parallel.loss_tile,
        profiler: &profiler,
        layers: StepContext::layers(&placement, exp.parallel.fused_attention(), exp.train.memory_fit),
        documents: document_kernels,
        // The config validator refused a ring without a kernel that returns the log-sum-exp.
        ring: (mesh.ring > 1).then(|| exp.parallel.fused_attention()).flatten(),
        frozen: base.as_ref().zip(exp.lora.as_ref()).map(|(base, lora)| step::Frozen {
            base,
            lora,
            seed: exp.run.seed,
        }),
    };
    if let (Some(k), 0) = (ctx.ring, mesh.world_rank) {
        log::info!(
            "ring attention: ulysses {} × ring {}, every hop by {}",
            mesh.ulysses(),
            mesh.ring,
            k.describe(false)
        );
    }
    let mut run = Run::start(exp, spec, mesh, groups.world.as_ref(), device, &placement, base.as_ref())?;
    if run.first_step > exp.train.steps {
        // Already complete; but a job killed between the last checkpoint and its export left
        // no `final/`.
        return run.finish(End::AlreadyComplete).map(|_| Outcome::Complete);
    }
    for step in run.first_step..=exp.train.steps {
        groups.progress.begin_step(step);
        if let Flow::Stop = run.step(&ctx, step)? {
            return Ok(Outcome::Preempted);
        }
    }
    Ok(Outcome::Complete)
}

/// Where layer inputs and kept attention wait, decided within the smallest budget of any rank (so
/// every rank makes the same plan: ranks must agree on which layers recompute attention, since
/// the recompute runs all-to-alls, and MemAvailable differs from rank to rank).
fn plan_memory(
    exp: &Experiment,
    spec: &ModelSpec,
    mesh: &Mesh,
    world: &dyn Collective,
    mine: Budget,
) -> Result<Placement> {
    let parts = Tensor::from_slice(&[mine.gpu, mine.host, mine.disk]).to_device(world.device());
    let all: Vec<f64> = Vec::try_from(world.all_gather(&parts)?.to_device(Device::Cpu))?;
    let budget = all.chunks(3).map(|b| Budget { gpu: b[0], host: b[1], disk: b[2] }).fold(mine, Budget::min);
    let inputs = PlanInputs::new(exp, spec, mesh.world_size());
    let estimate = Estimate::new(&inputs);
    let placement = estimate.placement(&budget).map_err(|shortfall| {
        DoesNotFit(memory_plan::refusal(&inputs, &budget, &shortfall, &exp.memory.offload_dir()))
    })?;
    let plan = estimate.with_placement(&placement);
    if mesh.world_rank == 0 {
        log::info!("memory plan: {}", memory_plan::summary(&plan, &placement, &budget));
    }
    if exp.parallel.device == crate::config::DeviceKind::Cuda {
        crate::oom::set_plan(format!(
            "a GPU peak of {} per rank within a budget of {}",
            crate::units::bytes(plan.gpu_peak()),
            crate::units::bytes(budget.gpu)
        ));
    }
    Ok(placement)
}

/// The MFU denominator of this rank's device (`flops::peak_tflops`), said once by rank 0's log.
fn peak_tflops(configured: f64, device: Device) -> Result<Option<f64>> {
    let name = match device {
        Device::Cuda(i) => Some(memory_plan::gpu_name(i)?),
        _ => None,
    };
    let peak = flops::peak_tflops(configured, name.as_deref());
    match (&peak, &name) {
        (Some((tflops, from)), _) => log::info!("MFU against a peak of {tflops} TFLOP/s ({from})"),
        (None, Some(name)) => log::info!("no MFU: the peak TFLOP/s of {name} is not known; set metrics.peak_tflops"),
        (None, None) => log::info!("no MFU on CPU (no known peak; metrics.peak_tflops sets one)"),
    }
    Ok(peak.map(|(tflops, _)| tflops))
}

/// What one optimizer step's samples cost over the whole job.
struct StepCost {
    documents: u64,
    flops: flops::StepFlops,
}

/// A step's loss, the labels it was taken over, and the held-out loss when it was evaluated.
struct StepLosses {
    loss: f64,
    trained: u64,
    held_out: Option<validation::HeldOut>,
}

/// How a job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Stopped by SIGTERM/SIGUSR1 before the last step.
    Preempted,
    /// The last step was trained now.
    Trained,
    /// The run had reached its last step before this job.
    AlreadyComplete,
}

/// Whether training goes on after a step.
enum Flow {
    Continue,
    /// Preempted (SIGTERM/SIGUSR1): the step's checkpoint is saved, the job ends here.
    Stop,
}

/// A run under way: its state and its outputs.
struct Run<'a> {
    exp: &'a Experiment,
    spec: &'a ModelSpec,
    mesh: &'a Mesh,
    world: &'a dyn Collective,
    device: Device,
    params: crate::parallel::zero::ShardedParams,
    loader: Loader,
    /// The held-out set (`data.eval_paths`) and how often it is evaluated.
    validation: Option<validation::Validation>,
    store: store::ActivationStore,
    /// Rank 0's metrics.h5 (no file on the other ranks and in memory-fit runs).
    metrics: Option<MetricsWriter>,
    preemption: preempt::Preemption,
    checkpointer: checkpoint::Checkpointer,
    /// Seconds this step's update waited for an asynchronous save to read the state.
    checkpoint_wait: f64,
    adamw: AdamW,
    /// Tokens of one optimizer step over all ranks.
    tokens: u64,
    /// The device's peak TFLOP/s, the MFU denominator; None: no MFU (CPU, an unknown GPU).
    peak_tflops: Option<f64>,
    run_dir: PathBuf,
    /// The checkpoint the run started from, if any.
    resumed_from: Option<PathBuf>,
    first_step: usize,
    started: Instant,
}

impl<'a> Run<'a> {
    /// The shards and data position to start from (fresh, or a checkpoint's), the data loader,
    /// the activation store and the metrics file.
    fn start(
        exp: &'a Experiment,
        spec: &'a ModelSpec,
        mesh: &'a Mesh,
        world: &'a dyn Collective,
        device: Device,
        placement: &Placement,
        base: Option<&FrozenParams>,
    ) -> Result<Run<'a>> {
        crate::oom::set_phase("setup (the model state, the data, the checkpoint staging)");
        let preemption = preempt::Preemption::install().context("installing the SIGTERM/SIGUSR1 handlers")?;
        let dataset = Dataset::open(&exp.data.paths, exp.data.seq_len)?;
        if dataset.vocab_size() > spec.vocab_size {
            bail!(
                "data: the shards' vocabulary has {} tokens but the model's has {}; prepare the data with the model's tokenizer",
                dataset.vocab_size(),
                spec.vocab_size
            );
        }
        let tokenizer = start::tokenizer_files(exp, &dataset)?;
        if mesh.world_rank == 0 {
            match tokenizer.first() {
                Some((from, _)) => {
                    println!("checkpoints carry the tokenizer files of {}", from.parent().unwrap_or(from).display())
                }
                None => println!(
                    "checkpoints carry no tokenizer files (none in the model folder; the data names no tokenizer.json)"
                ),
            }
        }
        // Each unit's fp32 master weights, gradient and Adam moments live where the plan put
        // them: on the GPU, in host memory (AdamW then runs on the CPU with libtorch's
        // multi-threaded vectorized kernel), or in files of the offload folder.
        let state = StateTiers { places: Some(placement.state.clone()), device, dir: exp.memory.offload_dir() };
        let (params, loader_state, start, resumed_from) =
            start::start_point(&start::StartSpec::of(exp), spec, mesh, world, &state, base)?;
        let t = &exp.train;
        let loader_spec = LoaderSpec {
            seed: exp.run.seed,
            shuffle: exp.data.shuffle,
            dp: mesh.dp,
            dp_rank: mesh.dp_rank,
            sp: mesh.sp,
            sp_rank: mesh.sp_rank,
            ring: mesh.ring,
            micro_batch: t.micro_batch,
            loss_on: exp.data.loss_on,
            packing: exp.data.packing(),
        };
        let loader = Loader::new(dataset, loader_spec, loader_state)?;
        let validation =
            validation::Validation::open(&exp.data.eval_paths, exp.data.seq_len, loader_spec, t.eval_every)?;
        if let Some(v) = &validation {
            if v.vocab_size() > spec.vocab_size {
                bail!(
                    "data.eval_paths: the shards' vocabulary has {} tokens but the model's has {}; prepare the held-out data with the model's tokenizer",
                    v.vocab_size(),
                    spec.vocab_size
                );
            }
            if mesh.world_rank == 0 {
                println!("held-out loss every {} steps over {} sequences", t.eval_every, v.len());
            }
        }
        let run_dir = exp.run_dir();
        let peak_tflops = peak_tflops(exp.metrics.peak_tflops, device)?;
        let metrics = if mesh.world_rank == 0 && !t.memory_fit {
            std::fs::create_dir_all(&run_dir)
                .with_context(|| format!("creating run directory {}", run_dir.display()))?;
            let bin_starts = PositionLoss::bin_starts(exp.metrics.position_bins, exp.data.seq_len);
            let info = RunInfo {
                config_toml: &exp.to_toml(),
                world_size: mesh.world_size(),
                peak_tflops,
                bin_starts: &bin_starts,
                tensorboard: exp.metrics.tensorboard.then(|| run_dir.join(crate::metrics::TENSORBOARD)),
                position_by: exp.metrics.position_by,
            };
            Some(MetricsWriter::open(&run_dir.join("metrics.h5"), &info, (start > 0).then_some(start))?)
        } else {
            None
        };
        if start == t.steps as u64 && mesh.world_rank == 0 {
            println!("the run is already complete (step {start} of {}); nothing to do", t.steps);
        }
        let c = &exp.checkpoint;
        if mesh.world_rank == 0 && c.save_final {
            // A user's folder named `final` is never replaced: say so now, not after training.
            checkpoint::export::check_replaceable(&run_dir.join(checkpoint::FINAL))?;
        }
        // Only periodic saves run in the background: after a preemption's save or the last one the
        // job waits for the write anyway.
        let asynchronous = c.is_async(exp.parallel.device) && c.every > 0;
        let checkpointer = checkpoint::Checkpointer::new(&run_dir, c.keep, asynchronous, tokenizer, &params, world)?;
        let store = store::ActivationStore::new(device, &exp.memory.offload_dir, mesh.world_rank)?;
        let samples = mesh.dp * t.micro_batch * t.grad_accum;
        Ok(Run {
            exp,
            spec,
            mesh,
            world,
            device,
            params,
            loader,
            validation,
            store,
            metrics,
            preemption,
            checkpointer,
            checkpoint_wait: 0.0,
            adamw: AdamW::new(t),
            tokens: (exp.data.seq_len * samples) as u64,
            peak_tflops,
            run_dir,
            resumed_from,
            first_step: start as usize + 1,
            started: Instant::now(),
        })
    }

    /// Optimizer step `step`: its micro batches forward and backward, the update, then its
    /// metrics row, its checkpoint when one is due, and the stop after a preemption.
    fn step(&mut self, ctx: &StepContext, step: usize) -> Result<Flow> {
        let (t, m) = (&self.exp.train, &self.exp.metrics);
        ctx.profiler.start_step(m.time_split_every > 0 && step % m.time_split_every == 0);
        memory::reset_peak_gpu(self.device);
        let mut times = StepTimes::default();
        let t0 = Instant::now();
        crate::oom::set_phase(format!("step {step}, forward and backward"));
        crate::oom::inject_for_tests("step");
        let batches = self.next_batches(step)?;
        times.data = t0.elapsed().as_secs_f64();
        let n_local: i64 = batches.iter().map(MicroBatch::valid_labels).sum();
        // A step whose labels are all ignored has loss 0 and no gradient, not 0 / 0.
        let trained = all_reduce_f64(self.world, n_local as f64)?;
        let n_total = trained.max(1.0);
        let cost = self.step_cost(&batches)?;
        let mut positions = (m.position_loss_every > 0 && step % m.position_loss_every == 0)
            .then(|| PositionLoss::new(m.position_by, m.position_bins, self.exp.data.seq_len, self.device));
        let mut loss_local = 0.0;
        for b in &batches {
            loss_local +=
                micro_step(ctx, &mut self.params, &mut self.store, b, n_total, &mut times, positions.as_mut())?;
        }
        let loss = all_reduce_f64(self.world, loss_local)? / n_total;
        let t_opt = Instant::now();
        crate::oom::set_phase(format!("step {step}, optimizer update"));
        let (grad_norm, lr) = ctx.profiler.phase(format_args!("optimizer"), || self.update(step, loss, loss_local))?;
        // A wait for a checkpoint's write is checkpoint time, not the optimizer's or the step's.
        times.optimizer = t_opt.elapsed().as_secs_f64() - self.checkpoint_wait;
        let step_time = t0.elapsed().as_secs_f64() - self.checkpoint_wait;
        let profile = ctx.profiler.is_on().then(|| ctx.profiler.finish());
        let position_bins = positions.map(|p| p.reduce(self.world)).transpose()?;
        let held_out = match &self.validation {
            Some(v) if v.due(step, t.steps) => {
                Some(v.run(ctx, &mut self.params, &mut self.store, self.world, self.device).context("held-out loss")?)
            }
            _ => None,
        };
        times.eval = held_out.map_or(0.0, |h| h.seconds);
        let losses = StepLosses { loss, trained: trained as u64, held_out };
        let row = self.row(step, losses, lr, grad_norm, step_time, times, cost)?;
        self.print(&row, step, profile.as_ref());
        // The step's row goes to metrics.h5 before its checkpoint can be published: a resume
        // from that checkpoint never lacks the row, and one from an earlier checkpoint drops it.
        if let Some(metrics) = self.metrics.as_mut() {
            metrics.append(&row)?;
            if let Some(b) = &position_bins {
                metrics.append_positions(step as u64, b)?;
            }
            if let Some(p) = &profile {
                metrics.append_time_split(step as u64, p)?;
            }
        }

        let t_ckpt = Instant::now();
        let in_flight = self.checkpointer.in_flight();
        self.checkpointer.poll(self.world).context("checkpoint")?;
        let preempted = self.preemption.requested(self.world)?;
        let stop = preempted && step < t.steps;
        let due = preempted || self.checkpoint_due(step);
        if due {
            self.save(step, stop || step == t.steps)?;
        }
        if stop {
            self.finish(End::Preempted)?;
        } else if step == t.steps {
            self.finish(End::Trained)?;
        }
        if let Some(metrics) = self.metrics.as_mut().filter(|_| in_flight || due || step == t.steps) {
            metrics.set_checkpoint_time(step as u64, self.checkpoint_wait + t_ckpt.elapsed().as_secs_f64())?;
        }
        if stop {
            if self.mesh.world_rank == 0 {
                println!(
                    "preempted (SIGTERM/SIGUSR1): stopped after step {step}; launch the same command again to resume"
                );
            }
            return Ok(Flow::Stop);
        }
        Ok(Flow::Continue)
    }

    /// Step `step`'s `train.grad_accum` micro batches, on the compute device.
    fn next_batches(&mut self, step: usize) -> Result<Vec<MicroBatch>> {
        (0..self.exp.train.grad_accum)
            .map(|_| {
                Ok(MicroBatch { step: step as u64, ..MicroBatch::from_batch(&self.loader.next_batch()?, self.device) })
            })
            .collect()
    }

    /// The step's documents and Σ len² over the whole job (collective): SP rank 0 of each dp
    /// group counts its samples, which every rank of the group shares.
    fn step_cost(&self, batches: &[MicroBatch]) -> Result<StepCost> {
        let (documents, squares) = if self.mesh.sp_rank == 0 { documents_and_squares(batches) } else { (0.0, 0.0) };
        let both = Tensor::from_slice(&[documents, squares]).to_device(self.world.device());
        let total: Vec<f64> = Vec::try_from(self.world.all_reduce(&both)?.to_device(Device::Cpu))?;
        Ok(StepCost {
            documents: total[0] as u64,
            flops: flops::flops(self.spec, self.exp.lora.as_ref(), self.tokens as f64, total[1]),
        })
    }

    /// The gradient norm, clipping and AdamW at the schedule's learning rate; returns both. GPU
    /// work is asynchronous: the update ends when the device is done.
    /// The optimizer step, after the non-finite guard on the step's `loss` (job-wide; this rank's
    /// part `loss_local`) and gradient norm.
    fn update(&mut self, step: usize, loss: f64, loss_local: f64) -> Result<(f64, f64)> {
        let t = &self.exp.train;
        let started = Instant::now();
        let norm = grad_norm(&mut self.params, self.world)?;
        let landed_and_normed = started.elapsed().as_secs_f64();
        guard::check(step, (loss, loss_local, norm), &mut self.params, self.mesh, self.world, &self.run_dir)?;
        // An asynchronous save may still be reading host-resident state that AdamW changes.
        self.checkpoint_wait = self.checkpointer.before_update().context("checkpoint")?;
        let lr = schedule::lr_at(t, step);
        let updating = Instant::now();
        self.adamw.step(&mut self.params, lr, step as i64, clip_scale(norm, t.clip_grad_norm))?;
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        if self.mesh.world_rank == 0
            && self.exp.metrics.time_split_every > 0
            && step % self.exp.metrics.time_split_every == 0
        {
            // Where an update with state off the GPU spends its time (rank 0's view). The host
            // units' AdamW is not in it: it runs beside the next step's forward.
            log::info!(
                "optimizer of step {step}: gradients landed and norm {landed_and_normed:.2} s, AdamW on the GPU and \
                 disk {:.2} s ({} threads)",
                updating.elapsed().as_secs_f64(),
                tch::get_num_threads()
            );
        }
        Ok((norm, lr))
    }

    /// The step's metrics row (collective: every rank's peak memory is gathered).
    fn row(
        &mut self,
        step: usize,
        losses: StepLosses,
        lr: f64,
        grad_norm: f64,
        step_time: f64,
        times: StepTimes,
        cost: StepCost,
    ) -> Result<StepRow> {
        let [peak_host_mem, peak_gpu_mem, peak_disk] = self.memory_per_rank()?;
        self.store.reset_peaks();
        let (tokens, step_flops) = (self.tokens, cost.flops);
        let per_rank_tflops = |f: f64| f / step_time / self.mesh.world_size() as f64 / 1e12;
        Ok(StepRow {
            step: step as u64,
            tokens,
            documents: cost.documents,
            loss: losses.loss,
            trained_tokens: losses.trained,
            eval_loss: losses.held_out.map_or(f64::NAN, |h| h.loss),
            eval_tokens: losses.held_out.map_or(0, |h| h.tokens),
            lr,
            grad_norm,
            step_time,
            tokens_per_s: tokens as f64 / step_time,
            tflops: per_rank_tflops(step_flops.model),
            mfu: per_rank_tflops(step_flops.model) / self.peak_tflops.unwrap_or(f64::NAN),
            tflops_alst: per_rank_tflops(step_flops.alst),
            mfu_alst: per_rank_tflops(step_flops.alst) / self.peak_tflops.unwrap_or(f64::NAN),
            times,
            checkpoint_time: 0.0,
            peak_host_mem,
            peak_gpu_mem,
            peak_disk,
        })
    }

    /// Peak host memory, GPU memory and activation-store disk use of every rank (collective),
    /// each `[world]` bytes.
    fn memory_per_rank(&self) -> Result<[Vec<u64>; 3]> {
        let disk = self.store.disk_bytes().1;
        let mine = [memory::peak_host_bytes(), memory::peak_gpu_bytes(self.device), disk].map(|b| b as i64);
        let mine = Tensor::from_slice(&mine).to_device(self.world.device());
        let all: Vec<i64> = Vec::try_from(self.world.all_gather(&mine)?.to_device(Device::Cpu))?;
        Ok([0, 1, 2].map(|i| all.iter().skip(i).step_by(3).map(|&v| v as u64).collect()))
    }

    /// Rank 0's step line (and the time split on measured steps).
    fn print(&self, row: &StepRow, step: usize, profile: Option<&profile::StepProfile>) {
        if self.mesh.world_rank != 0 {
            return;
        }
        let steps = self.exp.train.steps;
        if self.exp.train.memory_fit {
            progress::print_memory_fit(row, steps);
            return;
        }
        progress::print_progress(
            row,
            steps,
            self.started.elapsed().as_secs_f64() / (step + 1 - self.first_step) as f64,
        );
        if let Some(p) = profile {
            progress::print_time_split(step, p);
        }
    }

    /// Whether step `step` saves a checkpoint (besides a preemption's).
    fn checkpoint_due(&self, step: usize) -> bool {
        let c = &self.exp.checkpoint;
        (step == self.exp.train.steps && c.save_final) || (c.every > 0 && step % c.every == 0)
    }

    /// Saves the checkpoint of step `step` (collective; asynchronous saves return once staged,
    /// unless the job is about to end: `last`).
    fn save(&mut self, step: usize, last: bool) -> Result<()> {
        crate::oom::set_phase(format!("the checkpoint of step {step}"));
        if let Some(metrics) = &self.metrics {
            metrics.sync()?;
        }
        let state = start::run_state(self.exp, self.mesh, step as u64, &self.loader);
        self.checkpointer
            .save(&self.params, &state, self.spec, last, self.world)
            .with_context(|| format!("saving the checkpoint of step {step}"))
    }

    /// The end of a job (collective): waits for the checkpoint still being written; at the end
    /// of the run, exports the last step's checkpoint to `final/` for Hugging Face, a LoRA run's
    /// as a PEFT adapter folder (a run that was already complete only if `final/` is missing or older).
    fn finish(&mut self, end: End) -> Result<()> {
        self.checkpointer.finish(self.world).context("checkpoint")?;
        let steps = self.exp.train.steps;
        if end == End::Preempted || !self.checkpoint_due(steps) {
            return Ok(());
        }
        let just_trained = end == End::Trained;
        crate::oom::set_phase("the export to final/");
        let out = self.run_dir.join(checkpoint::FINAL);
        // Rank 0 looks, and tells the others.
        let current =
            self.mesh.world_rank == 0 && !just_trained && checkpoint::export::exported_step(&out) == Some(steps as u64);
        if all_reduce_f64(self.world, if current { 1.0 } else { 0.0 })? > 0.0 {
            return Ok(());
        }
        let checkpoint = match (&self.resumed_from, just_trained) {
            (Some(dir), false) => dir.clone(),
            _ => checkpoint::checkpoints_dir(&self.run_dir).join(checkpoint::step_dir_name(steps as u64)),
        };
        let exporting = || format!("exporting {} to {}", checkpoint.display(), out.display());
        let what = if self.exp.lora.is_some() {
            checkpoint::adapters::export_final(&checkpoint, &out, self.world).with_context(exporting)?;
            "the LoRA adapters as a PEFT folder, fp32".to_string()
        } else {
            let dtype = crate::model::kind_of(self.exp.train.dtype);
            let options =
                checkpoint::export::ExportOptions { dtype, max_shard_bytes: checkpoint::export::HF_MAX_SHARD_BYTES };
            checkpoint::export::export_collective(&checkpoint, &out, options, self.checkpointer.job(), self.world)
                .with_context(exporting)?;
            format!("{:?}, Hugging Face layout", self.exp.train.dtype)
        };
        if self.mesh.world_rank == 0 {
            println!("final model: {} (step {steps}, {what})", out.display());
        }
        Ok(())
    }
}

/// What a step's micro batches cost: the documents attention ran over and Σ len² over them.
fn documents_and_squares(batches: &[MicroBatch]) -> (f64, f64) {
    let docs = batches.iter().flat_map(|b| &b.documents);
    docs.fold((0.0, 0.0), |(n, squares), d| (n + d.count() as f64, squares + d.square_sum()))
}
