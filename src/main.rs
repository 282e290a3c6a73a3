//! `ulysses`: the command line. Parses, dispatches, and turns errors into one clear message and a
//! non-zero exit (on every rank of an MPI job: the first failing rank aborts the others).
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use ulysses::config::{validate, DeviceKind, Experiment};
use ulysses::launch::{init_logging, Backend, Launch};
use ulysses::plan::check::{self, CheckBudget};
use ulysses::plan::memory::{Budget, DoesNotFit};
use ulysses::plan::Plan;

#[derive(Parser)]
#[command(
    name = "ulysses",
    version,
    about = "Long-sequence LLM training: Ulysses sequence parallelism + ZeRO-3",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Experiment TOML to train (`mpirun -n N ulysses EXPERIMENT.toml`).
    experiment: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate an experiment and print its plan (mesh, per-rank shapes, shard sizes); no GPU, no MPI.
    Check {
        experiment: PathBuf,
        /// Number of ranks the job will run on (default: parallel.sp × parallel.dp).
        #[arg(long)]
        world_size: Option<usize>,
        /// GPU memory per GPU for torch's allocator, GiB (default: memory.gpu_gib, else 76: an
        /// 80 GB H100 less the CUDA context and NCCL).
        #[arg(long)]
        gpu_mem_gib: Option<f64>,
        /// Host memory per node for offloaded state, GiB (default: memory.host_gib, else 480).
        #[arg(long)]
        host_mem_gib: Option<f64>,
        /// Free disk per node for offloaded layer inputs, GiB (default: unlimited).
        #[arg(long)]
        disk_gib: Option<f64>,
        /// Ranks (GPUs) per node sharing that host memory and disk.
        #[arg(long, default_value_t = 8)]
        ranks_per_node: usize,
    },
    /// Exercise every collective over the MPI world with exact expected values, for every mesh
    /// (`mpirun -n N ulysses comm-check [--backend nccl]`).
    CommCheck {
        /// mpi: CPU tensors; nccl: CUDA tensors, one GPU per rank.
        #[arg(long, value_enum, default_value = "mpi")]
        backend: Backend,
        /// Then time each collective over the whole world with this many MiB per rank.
        #[arg(long, value_name = "MIB")]
        bench_mib: Option<usize>,
    },
    /// Long-context evaluation of a checkpoint: passkey / needle grid or per-position loss
    /// (`mpirun -n N ulysses eval EXPERIMENT.toml --task passkey`; docs/eval.md).
    Eval(ulysses::eval::cli::EvalArgs),
    /// Summarize a run's metrics.h5 and write PNG plots to RUN_DIR/plots/.
    Report { run_dir: PathBuf },
    /// Write a checkpoint as a Hugging Face model folder (safetensors files + index, config.json,
    /// tokenizer files), streamed in 64 MiB pieces: memory stays small whatever the model's size.
    Export {
        /// A checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN), of either format.
        checkpoint: PathBuf,
        /// The folder to write; replaced if it is an earlier export, refused if it is anything else.
        #[arg(long)]
        out: PathBuf,
        /// Weights' dtype (default: the checkpoint's train.dtype).
        #[arg(long, value_enum)]
        dtype: Option<ExportDtype>,
        /// Largest weight file, e.g. 5GB (as transformers counts: 10^9 bytes), 500MB, 2GiB.
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
    },
    /// Time saving and loading the experiment's model state on this job: format 2 synchronous
    /// and asynchronous against format 1, with each rank's peak memory
    /// (`mpirun -n N ulysses bench-checkpoint EXPERIMENT.toml`; writes under RUN_DIR, then removes it).
    BenchCheckpoint {
        experiment: PathBuf,
        /// Measure each operation this many times.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Also write the numbers to this JSON file (rank 0).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Make, convert and check HDF5 token shards (`ulysses data --help`).
    Data {
        #[command(subcommand)]
        cmd: ulysses::data::cli::DataCommand,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ExportDtype {
    Bf16,
    Fp32,
}

fn main() {
    // Long sequences fragment torch's CUDA caching allocator; expandable segments avoid most of
    // it. Set before anything initialises CUDA; a value the user exported wins.
    if std::env::var_os("PYTORCH_CUDA_ALLOC_CONF").is_none() {
        std::env::set_var("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True");
    }
    ulysses::launch::report_file_size_limits();
    let cli = Cli::parse();
    let result = match (cli.command, cli.experiment) {
        (Some(Command::Check { experiment, world_size, gpu_mem_gib, host_mem_gib, disk_gib, ranks_per_node }), _) => {
            let budget = CheckBudget { gpu_gib: gpu_mem_gib, host_gib: host_mem_gib, disk_gib, ranks_per_node };
            check_experiment(&experiment, world_size, &budget)
        }
        (Some(Command::CommCheck { backend, bench_mib }), _) => comm_check(backend, bench_mib),
        (Some(Command::Data { cmd }), _) => ulysses::data::cli::run(cmd),
        (Some(Command::Eval(args)), _) => ulysses::eval::cli::run(args),
        (Some(Command::Report { run_dir }), _) => ulysses::report::report(&run_dir).map(drop).map_err(Into::into),
        (Some(Command::Export { checkpoint, out, dtype, max_shard_size }), _) => {
            export(&checkpoint, &out, dtype, &max_shard_size)
        }
        (Some(Command::BenchCheckpoint { experiment, repeat, json }), _) => {
            bench_checkpoint(&experiment, repeat, json.as_deref())
        }
        (None, Some(exp)) => train(&exp),
        (None, None) => {
            eprintln!("usage: ulysses EXPERIMENT.toml | ulysses check EXPERIMENT.toml | ulysses --help");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn load_valid(path: &Path, world: Option<usize>) -> Result<(Experiment, ulysses::model::spec::ModelSpec)> {
    let exp = Experiment::load(path)?;
    match validate(&exp, world) {
        Ok(spec) => Ok((exp, spec)),
        Err(problems) => {
            let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
            bail!("{} has {} problem(s):\n{}", path.display(), problems.len(), list.join("\n"))
        }
    }
}

fn check_experiment(path: &Path, world_size: Option<usize>, flags: &CheckBudget) -> Result<()> {
    let exp = Experiment::load(path)?;
    let world = world_size.unwrap_or(exp.parallel.sp * exp.parallel.dp);
    let (exp, spec) = load_valid(path, Some(world))?;
    println!("{}: valid for {world} rank(s)", path.display());
    print!("{}", check::report(&exp, &spec, world, flags));
    Ok(())
}

fn train(path: &Path) -> Result<()> {
    let launch = Launch::init()?;
    init_logging(launch.rank);
    // The experiment is the same file on every rank, so its problems usually are too: rank 0
    // reports them and ends the job; another rank that fails alone (a file missing on its node)
    // reports after a moment unless rank 0 has ended the job already.
    let (exp, spec) = match load_valid(path, Some(launch.size)) {
        Ok(v) => v,
        Err(e) => {
            if launch.rank != 0 {
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            launch.abort(&e)
        }
    };
    let run = || -> Result<()> {
        let (mesh, groups, device) = job(&launch, &exp)?;
        let gpu = match device {
            tch::Device::Cuda(i) => Some(i),
            _ => None,
        };
        let budget = Budget::measure(&exp.memory, gpu, launch.local_size)?;
        if launch.rank == 0 {
            let plan = Plan::new(&exp.parallel, exp.data.seq_len, &spec, launch.size);
            print!("{}", plan.render(&exp.model.name(), &spec, &exp.train));
        }
        ulysses::train::run(&exp, &spec, &mesh, &groups, device, budget)
    };
    if let Err(e) = run() {
        if e.is::<DoesNotFit>() {
            // Every rank plans with the same budget (the smallest of any rank's), so all of them
            // stop here alike: rank 0 says why, the others give it a moment to.
            if launch.rank != 0 {
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            launch.abort(&e.context(path.display().to_string()));
        }
        launch.abort(&e);
    }
    Ok(())
}

/// The mesh, its communicators and this rank's device for an experiment's job.
fn job(launch: &Launch, exp: &Experiment) -> Result<(ulysses::comm::Mesh, ulysses::comm::Groups, tch::Device)> {
    let mesh = ulysses::comm::Mesh::new(exp.parallel.sp, exp.parallel.dp, launch.size, launch.rank)?;
    // CPU tensors move over MPI, CUDA tensors over NCCL (one GPU per rank: the node-local rank).
    let backend = match exp.parallel.device {
        DeviceKind::Cpu => Backend::Mpi,
        DeviceKind::Cuda => Backend::Nccl,
    };
    let device = launch.device(backend)?;
    let groups = launch.groups(backend, &mesh)?;
    Ok((mesh, groups, device))
}

fn export(checkpoint: &Path, out: &Path, dtype: Option<ExportDtype>, max_shard_size: &str) -> Result<()> {
    use ulysses::train::checkpoint::export;
    init_logging(0);
    let max_shard_bytes = export::parse_size(max_shard_size).map_err(|e| anyhow::anyhow!("--max-shard-size: {e}"))?;
    let dtype = match dtype {
        Some(ExportDtype::Bf16) => tch::Kind::BFloat16,
        Some(ExportDtype::Fp32) => tch::Kind::Float,
        None => export::training_dtype(checkpoint)?,
    };
    export::export(checkpoint, out, export::ExportOptions { dtype, max_shard_bytes })?;
    println!("exported {} to {}", checkpoint.display(), out.display());
    Ok(())
}

fn bench_checkpoint(path: &Path, repeat: usize, json: Option<&Path>) -> Result<()> {
    let launch = Launch::init()?;
    init_logging(launch.rank);
    let (exp, spec) = load_valid(path, Some(launch.size)).unwrap_or_else(|e| launch.abort(&e));
    let run = || -> Result<()> {
        let (mesh, groups, device) = job(&launch, &exp)?;
        ulysses::train::checkpoint::bench::run(&exp, &spec, &mesh, groups.world.as_ref(), device, repeat, json)
    };
    run().unwrap_or_else(|e| launch.abort(&e));
    Ok(())
}

fn comm_check(backend: Backend, bench_mib: Option<usize>) -> Result<()> {
    let launch = Launch::init()?;
    init_logging(launch.rank);
    launch.comm_check(backend).context("collective self-check").unwrap_or_else(|e| launch.abort(&e));
    if let Some(mib) = bench_mib {
        launch.comm_bench(backend, mib).context("collective bandwidth").unwrap_or_else(|e| launch.abort(&e));
    }
    Ok(())
}
