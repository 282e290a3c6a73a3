//! `mpirun -n N ulysses bench-checkpoint EXPERIMENT.toml`: saves and loads the experiment's
//! model state (its model, ZeRO stage, ranks and device, random values) the ways ulysses can,
//! on the job itself: format 1 (rank 0 gathers and writes), format 2 synchronous, format 2
//! asynchronous (what the step waits for, and the background write to the end), and the
//! format-2 load, which is checked bit for bit. For each: the slowest rank's time, the bytes and
//! the throughput, and each rank's peak resident memory beyond what it held before. Rank 0
//! prints a table and, with `--json`, writes the numbers (bench/checkpoint.sh,
//! tests/checkpoint_memory.rs). The checkpoints go to `RUN_DIR/bench-checkpoint/` and are
//! removed after each measurement.
use super::*;
use crate::comm::{broadcast_i64, Collective, Mesh};
use crate::config::{Experiment, StatePlacement};
use crate::metrics::memory::{host_resident_and_peak, reset_host_peak};
use crate::model::spec::ModelSpec;
use crate::parallel::zero::{ShardedParams, State, StateTiers};
use crate::plan::memory::{Place, DISK_CHUNK};
use crate::units::bytes;
use anyhow::{ensure, Context, Result};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One measured operation, over every rank.
#[derive(Debug, serde::Serialize)]
struct Measured {
    what: &'static str,
    /// The slowest rank's wall time, seconds: what the step waits for (an asynchronous save:
    /// the staging copy).
    blocking_s: f64,
    /// Until the checkpoint is published (or loaded), slowest rank.
    total_s: f64,
    /// Bytes written or read, all ranks.
    bytes: u64,
    gb_per_s: f64,
    /// Per rank: peak resident memory during the operation beyond the resident memory before it.
    peak_rss_delta: Vec<u64>,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    model: String,
    params: i64,
    world: usize,
    zero_stage: String,
    device: String,
    /// Per rank: its shard of the fp32 master weights, gradient and two moments.
    shard_bytes: Vec<u64>,
    /// Per rank: the host staging an asynchronous checkpointer keeps.
    async_staging_bytes: Vec<u64>,
    /// Seconds to allocate that staging (once per run, before training).
    async_staging_alloc_s: f64,
    runs: Vec<Measured>,
}

/// The benchmark (collective); `repeat` times each operation. `gpu_budget`: this rank's bytes of
/// its GPU, as training measures them (`Budget::measure`: shared by the ranks on one GPU).
#[allow(clippy::too_many_arguments)]
pub fn run(
    exp: &Experiment,
    spec: &ModelSpec,
    mesh: &Mesh,
    world: &dyn Collective,
    device: Device,
    gpu_budget: f64,
    repeat: usize,
    json: Option<&Path>,
) -> Result<()> {
    crate::oom::set_phase("bench-checkpoint: the model state");
    let places = placement(exp, spec, world, device, gpu_budget)?;
    let tiers = StateTiers { places: Some(places), device, dir: exp.memory.offload_dir() };
    let params = ShardedParams::zeroed(spec, exp.parallel.zero_stage, world, tiers.clone())?;
    tch::manual_seed(mesh.world_rank as i64 + 1);
    for u in params.units() {
        let (_, len) = params.shard_range(u.id);
        for state in State::ALL {
            match params.memory_state(u.id, state) {
                // In place: no temporary a shard's size that the measured operations would reuse.
                Some(t) => {
                    let _ = t.shallow_clone().normal_(0.0, 0.02);
                }
                None => {
                    for at in (0..len).step_by(DISK_CHUNK as usize) {
                        let mut part = Tensor::empty([DISK_CHUNK.min(len - at)], (Kind::Float, Device::Cpu));
                        params.write_state(u.id, state, at, &part.normal_(0.0, 0.02))?;
                    }
                }
            }
        }
    }
    sync_device(device);
    let run_dir = exp.run_dir().join("bench-checkpoint");
    let state = run_state(exp, mesh);
    let root = mesh.world_rank == 0;
    let shard_bytes: u64 = params.units().iter().map(|u| params.shard_range(u.id).1 as u64 * 16).sum();
    let mut runs = Vec::new();
    let t = Instant::now();
    let mut asynchronous = Checkpointer::new(&run_dir, 1, true, Vec::new(), &params, world)?;
    let alloc_s = max_over(world, t.elapsed().as_secs_f64())?;
    let mut synchronous = Checkpointer::new(&run_dir, 1, false, Vec::new(), &params, world)?;
    let dir = checkpoints_dir(&run_dir).join(step_dir_name(state.step));
    for _ in 0..repeat.max(1) {
        runs.push(measure(world, "format 1 save (rank 0 gathers and writes)", || {
            format1::save(&params, &state, spec, &run_dir, world)?;
            Ok(None)
        })?);
        runs.last_mut().unwrap_or_else(|| unreachable!()).bytes = dir_bytes(&dir, world)?;
        remove(&run_dir, world)?;
        runs.push(measure(world, "format 2 save, synchronous", || {
            synchronous.save(&params, &state, spec, true, world)?;
            Ok(None)
        })?);
        runs.last_mut().unwrap_or_else(|| unreachable!()).bytes = dir_bytes(&dir, world)?;
        runs.push(measure(world, "format 2 load (and check)", || {
            let back = load_params(&dir, FORMAT, spec, exp.parallel.zero_stage, world, tiers.clone())?;
            sync_device(device);
            let waited = Instant::now();
            for u in params.units() {
                let (_, len) = params.shard_range(u.id);
                for s in State::ALL {
                    ensure!(
                        params.read_state(u.id, s, 0, len)?.equal(&back.read_state(u.id, s, 0, len)?),
                        "the loaded {} of {} differs from the saved one",
                        s.name(),
                        u.id
                    );
                }
            }
            // The check is not part of the load.
            Ok(Some(waited.elapsed().as_secs_f64()))
        })?);
        runs.last_mut().unwrap_or_else(|| unreachable!()).bytes = dir_bytes(&dir, world)?;
        remove(&run_dir, world)?;
        let mut blocked = 0.0;
        let mut m = measure(world, "format 2 save, asynchronous", || {
            let t = Instant::now();
            asynchronous.save(&params, &state, spec, false, world)?;
            blocked = t.elapsed().as_secs_f64();
            asynchronous.finish(world)?;
            Ok(None)
        })?;
        m.blocking_s = max_over(world, blocked)?;
        m.bytes = dir_bytes(&dir, world)?;
        runs.push(m);
        remove(&run_dir, world)?;
    }
    for m in &mut runs {
        m.gb_per_s = m.bytes as f64 / m.total_s / 1e9;
    }
    let gather = |v: u64| -> Result<Vec<u64>> {
        let all = world.all_gather(&Tensor::from_slice(&[v as i64]).to_device(world.device()))?;
        Ok(Vec::<i64>::try_from(all.to_device(Device::Cpu))?.into_iter().map(|b| b as u64).collect())
    };
    let report = Report {
        model: exp.model.name(),
        params: spec.total_params(),
        world: world.size(),
        zero_stage: exp.parallel.zero_stage.to_string(),
        device: format!("{device:?}"),
        shard_bytes: gather(shard_bytes)?,
        async_staging_bytes: gather(asynchronous.staging_bytes())?,
        async_staging_alloc_s: alloc_s,
        runs,
    };
    if root {
        print(&report);
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(&report)? + "\n";
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    Ok(())
}

/// Where each unit's state lies (collective): on the tier `parallel.offload_optimizer` forces, so
/// that each tier's saves and loads can be timed; "auto" plans as training does, within the
/// smallest GPU budget of any rank (`mine` is this rank's): units on the GPU while twice their state (the saved state and
/// the copy a load is checked against) and the largest unit gathered whole (format 1) fit, the
/// rest in host memory. A forced "device" that cannot fit is refused before anything is allocated.
fn placement(
    exp: &Experiment,
    spec: &ModelSpec,
    world: &dyn Collective,
    device: Device,
    mine: f64,
) -> Result<Vec<Place>> {
    let shards = match exp.parallel.zero_stage {
        crate::config::ZeroStage::Replicated => 1,
        crate::config::ZeroStage::Sharded => world.size() as i64,
    };
    let units = crate::parallel::zero::model_units(spec, shards);
    let forced = match exp.parallel.offload_optimizer {
        StatePlacement::Auto | StatePlacement::Device => Place::Device,
        StatePlacement::Host => Place::Host,
        StatePlacement::Disk => Place::Disk,
    };
    if !matches!(device, Device::Cuda(_)) || forced != Place::Device {
        return Ok(vec![forced; units.len()]);
    }
    let all = world.all_gather(&Tensor::from_slice(&[mine]).to_device(world.device()))?;
    let budget = Vec::<f64>::try_from(all.to_device(Device::Cpu))?.into_iter().fold(mine, f64::min);
    // fp32 master, gradient and two moments, twice; the largest unit whole, fp32, once.
    let need = |u: &crate::parallel::zero::Unit| (u.padded / shards) as f64 * 16.0 * 2.0;
    let gathered = units.iter().map(|u| u.numel as f64 * 4.0).fold(0.0, f64::max);
    let mut used = gathered;
    let places: Vec<Place> = units
        .iter()
        .map(|u| {
            let fits = used + need(u) <= budget;
            used += if fits { need(u) } else { 0.0 };
            if fits {
                Place::Device
            } else {
                Place::Host
            }
        })
        .collect();
    let on_gpu = places.iter().filter(|&&p| p == Place::Device).count();
    let total: f64 = gathered + units.iter().map(need).sum::<f64>();
    ensure!(
        on_gpu == units.len() || exp.parallel.offload_optimizer == StatePlacement::Auto,
        "bench-checkpoint: the model state on the GPU, the copy a load is checked against and a whole unit need \
         {} per rank but the GPU budget is {} (memory.gpu_gib, else the GPU less a reserve); use \
         parallel.offload_optimizer = \"auto\" (units that do not fit go to host memory) or \"host\", or more ranks",
        bytes(total),
        bytes(budget)
    );
    if world.rank() == 0 {
        println!(
            "bench-checkpoint: {on_gpu} of {} units' state on the GPU, the rest in host memory (the state, the copy a \
             load is checked against and a whole unit need {} per rank; the GPU budget is {})",
            units.len(),
            bytes(total),
            bytes(budget)
        );
    }
    crate::oom::set_plan(format!(
        "{} of state and load copies on the GPU per rank within a budget of {}",
        bytes(used),
        bytes(budget)
    ));
    Ok(places)
}

/// Runs `op` on every rank from a common start, with this rank's peak memory reset first.
/// `op` may return seconds of its own to leave out (a check after the load).
fn measure(world: &dyn Collective, what: &'static str, op: impl FnOnce() -> Result<Option<f64>>) -> Result<Measured> {
    world.barrier()?;
    crate::oom::set_phase(format!("bench-checkpoint: {what}"));
    let (before, _) = host_resident_and_peak();
    reset_host_peak().context("resetting the peak resident memory (/proc/self/clear_refs)")?;
    let t = Instant::now();
    let extra = op()?;
    let seconds = t.elapsed().as_secs_f64() - extra.unwrap_or(0.0);
    let (_, peak) = host_resident_and_peak();
    let total = max_over(world, seconds)?;
    let delta = peak.saturating_sub(before) as i64;
    let all = world.all_gather(&Tensor::from_slice(&[delta]).to_device(world.device()))?;
    let peak_rss_delta = Vec::<i64>::try_from(all.to_device(Device::Cpu))?.into_iter().map(|b| b as u64).collect();
    Ok(Measured { what, blocking_s: total, total_s: total, bytes: 0, gb_per_s: 0.0, peak_rss_delta })
}

fn max_over(world: &dyn Collective, x: f64) -> Result<f64> {
    let all = world.all_gather(&Tensor::from_slice(&[x]).to_device(world.device()))?;
    Ok(Vec::<f64>::try_from(all.to_device(Device::Cpu))?.into_iter().fold(0.0, f64::max))
}

fn sync_device(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The size of a checkpoint folder (rank 0 reads it, every rank gets it).
fn dir_bytes(dir: &Path, world: &dyn Collective) -> Result<u64> {
    let mut total = 0u64;
    if world.rank() == 0 {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    stack.push(e.path());
                } else {
                    total += e.metadata()?.len();
                }
            }
        }
    }
    Ok(broadcast_i64(world, total as i64, 0)? as u64)
}

fn remove(run_dir: &Path, world: &dyn Collective) -> Result<()> {
    world.barrier()?;
    if world.rank() == 0 {
        let dir = checkpoints_dir(run_dir);
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    world.barrier()?;
    Ok(())
}

/// The run state of a checkpoint at step 1 of this experiment, as a run would record it.
fn run_state(exp: &Experiment, mesh: &Mesh) -> RunState {
    RunState::new(exp, mesh, 1, DataPosition { epoch: 0, samples: 0 })
}

fn print(r: &Report) {
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64;
    println!(
        "bench-checkpoint: {} ({} parameters) on {} rank(s), ZeRO stage {}, {}; shard per rank up to {}, async staging up to {} (allocated in {:.2} s)",
        r.model,
        crate::units::count(r.params),
        r.world,
        r.zero_stage,
        r.device,
        bytes(max(&r.shard_bytes)),
        bytes(max(&r.async_staging_bytes)),
        r.async_staging_alloc_s
    );
    println!(
        "{:<44} {:>11} {:>9} {:>10} {:>10} {:>16}",
        "", "blocking s", "total s", "size", "GB/s", "peak RSS +/rank"
    );
    for m in &r.runs {
        println!(
            "{:<44} {:>11.3} {:>9.3} {:>10} {:>10.2} {:>16}",
            m.what,
            m.blocking_s,
            m.total_s,
            bytes(m.bytes as f64),
            m.gb_per_s,
            bytes(max(&m.peak_rss_delta))
        );
    }
}
