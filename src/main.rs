//! `ulysses`: the command line. Parses, dispatches, and turns errors into one clear message and a
//! non-zero exit (on every rank of an MPI job: the first failing rank aborts the others).
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Duration;
use ulysses::comm::watchdog::{self, Watchdog};
use ulysses::config::{validate, DeviceKind, Experiment, Overrides, SetArgs};
use ulysses::launch::{end_job, explain, init_logging, Backend, Launch};
use ulysses::plan::check::{self, CheckBudget};
use ulysses::plan::data::check_data;
use ulysses::plan::memory::{Budget, DoesNotFit};
use ulysses::plan::Plan;
use ulysses::train::guard::NonFinite;
use ulysses::train::preempt::EXIT_PREEMPTED;
use ulysses::train::Outcome;

#[derive(Parser)]
#[command(
    name = "ulysses",
    version,
    about = "Long-sequence LLM training: Ulysses sequence parallelism + ZeRO-3",
    long_about = "Long-sequence LLM training: Ulysses sequence parallelism + ZeRO-3.\n\n\
        Train with `mpirun -n N ulysses train EXPERIMENT.toml` (or just `ulysses EXPERIMENT.toml`); \
        `ulysses COMMAND --help` describes each command.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Experiment TOML to train: `mpirun -n N ulysses EXPERIMENT.toml`, the same as
    /// `ulysses train EXPERIMENT.toml`.
    experiment: Option<PathBuf>,
    #[command(flatten)]
    set: SetArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train an experiment: `mpirun -n N ulysses train EXPERIMENT.toml` (N ranks = parallel.sp ×
    /// parallel.dp; `parallel.dp = "auto"` takes N / sp). Launching it again resumes it.
    Train {
        /// Experiment TOML (see experiments/tiny.toml for an annotated one).
        experiment: PathBuf,
        #[command(flatten)]
        set: SetArgs,
    },
    /// Validate an experiment and its data, and print its plan (mesh, per-rank shapes, shard
    /// sizes, memory estimate); no GPU, no MPI. Exits 1 when the job would fail.
    Check {
        /// Experiment TOML to check.
        experiment: PathBuf,
        #[command(flatten)]
        set: SetArgs,
        /// Number of ranks the job will run on (default: parallel.sp × parallel.dp; needed with
        /// parallel.dp = "auto").
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
    /// Summarize a run's metrics.h5 (also while the run writes it) and write PNG plots to
    /// RUN_DIR/plots/, or print its steps as CSV.
    Report {
        /// The run's folder: run.output_dir/run.name, e.g. runs/tiny-demo.
        run_dir: PathBuf,
        /// Print one CSV row per step (the /steps columns; memory as the largest rank's bytes) on
        /// stdout instead of the summary and plots.
        #[arg(long)]
        csv: bool,
    },
    /// Write a checkpoint as a Hugging Face model folder (safetensors files + index, config.json,
    /// tokenizer files), streamed in 64 MiB pieces: memory stays small whatever the model's size.
    /// A LoRA run's checkpoint: a PEFT adapter folder, or with --merge the merged model.
    Export {
        /// A checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN), of either format; with --merge
        /// also a PEFT adapter folder (a LoRA run's final/).
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
        /// LoRA adapters: write the base model (the run's model.path / model.weights, or the PEFT
        /// folder's base_model_name_or_path) with the adapters merged, as a Hugging Face model.
        #[arg(long)]
        merge: bool,
    },
    /// Time saving and loading the experiment's model state on this job: format 2 synchronous
    /// and asynchronous against format 1, with each rank's peak memory
    /// (`mpirun -n N ulysses bench-checkpoint EXPERIMENT.toml`; writes under RUN_DIR, then removes it).
    BenchCheckpoint {
        /// The experiment TOML whose model (dimensions, layout, device) is saved and loaded.
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
    if matches!(cli.command, Some(Command::Check { .. } | Command::Report { .. } | Command::Data { .. })) {
        quiet_on_closed_pipe();
    }
    let result = match (cli.command, cli.experiment) {
        (Some(Command::Train { experiment, set }), _) => train(&experiment, &set.set),
        (
            Some(Command::Check { experiment, set, world_size, gpu_mem_gib, host_mem_gib, disk_gib, ranks_per_node }),
            _,
        ) => {
            let budget = CheckBudget { gpu_gib: gpu_mem_gib, host_gib: host_mem_gib, disk_gib, ranks_per_node };
            check_experiment(&experiment, &set.set, world_size, &budget)
        }
        (Some(Command::CommCheck { backend, bench_mib }), _) => comm_check(backend, bench_mib),
        (Some(Command::Data { cmd }), _) => ulysses::data::cli::run(cmd),
        (Some(Command::Eval(args)), _) => ulysses::eval::cli::run(args),
        (Some(Command::Report { run_dir, csv: false }), _) => {
            ulysses::report::report(&run_dir).map(drop).map_err(Into::into)
        }
        (Some(Command::Report { run_dir, csv: true }), _) => ulysses::report::csv(&run_dir).map_err(Into::into),
        (Some(Command::Export { checkpoint, out, dtype, max_shard_size, merge }), _) => {
            export(&checkpoint, &out, dtype, &max_shard_size, merge)
        }
        (Some(Command::BenchCheckpoint { experiment, repeat, json }), _) => {
            bench_checkpoint(&experiment, repeat, json.as_deref())
        }
        (None, Some(exp)) => train(&exp, &cli.set.set),
        (None, None) => {
            eprintln!("usage: ulysses train EXPERIMENT.toml | ulysses check EXPERIMENT.toml | ulysses --help");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("error: {}", explain(&e));
        std::process::exit(1);
    }
}

/// The commands that only print (check, report, data) end quietly when their reader goes away
/// (`ulysses report RUN | head -1`), as `cat` does, instead of panicking on the failed write.
/// MPI jobs keep Rust's default (SIGPIPE ignored), so a closed socket is an error they report.
fn quiet_on_closed_pipe() {
    // SAFETY: restores the default disposition of one signal before any thread is started.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn load_valid(path: &Path, overrides: &Overrides) -> Result<(Experiment, ulysses::model::spec::ModelSpec)> {
    let exp = Experiment::load_with(path, overrides)?;
    match validate(&exp, overrides.world) {
        Ok(spec) => Ok((exp, spec)),
        Err(problems) => bail!("{} has {} problem(s):\n{}", path.display(), problems.len(), listed(&problems)),
    }
}

fn listed(problems: &[impl std::fmt::Display]) -> String {
    problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n")
}

fn check_experiment(path: &Path, set: &[String], world_size: Option<usize>, flags: &CheckBudget) -> Result<()> {
    let exp = Experiment::load_with(path, &Overrides { set, world: world_size, dp_replaced: false })?;
    let world = world_size.unwrap_or(exp.parallel.sp * exp.parallel.dp);
    let (exp, spec) = load_valid(path, &Overrides { set, world: Some(world), dp_replaced: false })?;
    let data = check_data(&exp, &spec);
    let verdict = match (data.checked, data.problems.is_empty()) {
        (true, true) => "valid for {world} rank(s), with its data",
        (false, _) => "valid for {world} rank(s); its data is not on this machine (not checked, see `data` below)",
        (true, false) => "the configuration is valid for {world} rank(s), but the data does not fit it",
    };
    println!("{}: {}", path.display(), verdict.replace("{world}", &world.to_string()));
    print!("{}", check::report(&exp, &spec, world, flags));
    print!("{}", data.report);
    if !data.problems.is_empty() {
        bail!("{} has {} data problem(s):\n{}", path.display(), data.problems.len(), listed(&data.problems));
    }
    Ok(())
}

fn train(path: &Path, set: &[String]) -> Result<()> {
    let launch = Launch::init()?;
    init_logging(launch.rank);
    let (exp, spec) = load_valid(path, &Overrides { set, world: Some(launch.size), dp_replaced: false })
        .unwrap_or_else(|e| launch.abort(&e));
    let run = || -> Result<Outcome> {
        let (mesh, groups, device) = job(&launch, &exp)?;
        let settings = watchdog::Settings {
            timeout: Duration::from_secs_f64(exp.parallel.collective_timeout_s),
            folder: exp.run_dir().join("watchdog"),
            rank: launch.rank,
            size: launch.size,
        };
        let folder = settings.folder.display().to_string();
        let _watchdog = Watchdog::start(groups.progress.clone(), settings, end_job)
            .with_context(|| format!("starting the collective watchdog in {folder}"))?;
        let budget = rank_budget(&launch, &exp, device)?;
        if device.is_cuda() {
            cpu_threads_for_host_work(launch.local_size, launch.rank);
        }
        let nodes = launch.describe_nodes(device);
        if launch.rank == 0 {
            let plan = Plan::new(&exp.parallel, exp.data.seq_len, &spec, launch.size);
            print!("{}", plan.render(&exp.model.name(), &spec, &exp.train, exp.lora.as_ref()));
            for (i, line) in nodes.lines().enumerate() {
                println!("{:<11}{line}", if i == 0 { "nodes" } else { "" });
            }
        }
        ulysses::train::run(&exp, &spec, &mesh, &groups, device, budget)
    };
    match run() {
        Ok(Outcome::Complete) => Ok(()),
        Ok(Outcome::Preempted) => {
            drop(launch); // MPI_Finalize: every rank is past the checkpoint's last collective
            std::process::exit(EXIT_PREEMPTED)
        }
        // The budget and the non-finite verdict are the job's, not a file's: say which experiment.
        Err(e) if e.is::<DoesNotFit>() || e.is::<NonFinite>() => launch.abort(&e.context(path.display().to_string())),
        Err(e) => launch.abort(&e),
    }
}

/// This rank's memory budget: its GPU's shared by the ranks on it (`ULYSSES_RANKS_PER_GPU`), the
/// node's host memory and disk by the node's ranks.
fn rank_budget(launch: &Launch, exp: &Experiment, device: tch::Device) -> Result<Budget> {
    let gpu = match device {
        tch::Device::Cuda(i) => Some(i),
        _ => None,
    };
    Ok(Budget::measure(&exp.memory, gpu, launch.local_size, launch.ranks_per_gpu())?)
}

/// Gives libtorch's CPU kernels (AdamW on state in host memory or on disk, the gradient norm
/// there) this rank's share of the node's cores. Under mpirun libtorch sized its thread pool to
/// one thread (measured on the H200 machine, 2026-12-02: 1 thread of 16 cores, where the same
/// binary run alone gets all of them). OMP_NUM_THREADS, when set, is the user's choice and stays.
/// CPU runs keep libtorch's own choice: their ranks share the cores for compute.
fn cpu_threads_for_host_work(ranks_on_node: usize, rank: usize) {
    if std::env::var_os("OMP_NUM_THREADS").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / ranks_on_node.max(1)).max(1);
    tch::set_num_threads(threads as i32);
    if rank == 0 {
        log::info!("CPU threads per rank: {threads} ({cores} cores for {ranks_on_node} rank(s) on this node)");
    }
}

/// The mesh, its communicators and this rank's device for an experiment's job.
fn job(launch: &Launch, exp: &Experiment) -> Result<(ulysses::comm::Mesh, ulysses::comm::Groups, tch::Device)> {
    let mesh = ulysses::comm::Mesh::new(exp.parallel.sp, exp.parallel.dp, launch.size, launch.rank)?
        .with_ring(exp.parallel.ring)?;
    // The all-to-alls' groups must stay on one node; a ring group may span nodes (docs/ring.md).
    launch.check_nodes(mesh.ulysses())?;
    log::info!(
        "on node {}: node-local rank {} of {}",
        launch.nodes.host[launch.rank],
        launch.local_rank,
        launch.local_size
    );
    // CPU tensors move over MPI, CUDA tensors over NCCL (one GPU per rank: the node-local rank).
    let backend = match exp.parallel.device {
        DeviceKind::Cpu => Backend::Mpi,
        DeviceKind::Cuda => Backend::Nccl,
    };
    let device = launch.device(backend)?;
    let groups = launch.groups(backend, &mesh)?;
    Ok((mesh, groups, device))
}

fn export(checkpoint: &Path, out: &Path, dtype: Option<ExportDtype>, max_shard_size: &str, merge: bool) -> Result<()> {
    use ulysses::checkpoint::{adapters::Adapters, export};
    init_logging(0);
    let max_shard_bytes = export::parse_size(max_shard_size).map_err(|e| anyhow::anyhow!("--max-shard-size: {e}"))?;
    let dtype = dtype.map(|d| match d {
        ExportDtype::Bf16 => tch::Kind::BFloat16,
        ExportDtype::Fp32 => tch::Kind::Float,
    });
    match (Adapters::open(checkpoint)?, merge) {
        (Some(a), true) => {
            a.export_merged(out, dtype.unwrap_or(a.trained_dtype), max_shard_bytes)?;
            println!("exported {} merged into its base to {}", checkpoint.display(), out.display());
        }
        (Some(a), false) if a.is_peft_folder() => bail!(
            "{} is a PEFT adapter folder already; add --merge to write the base model with these adapters merged",
            checkpoint.display()
        ),
        (Some(a), false) => {
            // Adapters are small: fp32 unless asked otherwise, as peft keeps them.
            a.export_peft(out, dtype.unwrap_or(tch::Kind::Float))?;
            println!(
                "exported the LoRA adapters of {} to {} (a PEFT adapter folder)",
                checkpoint.display(),
                out.display()
            );
        }
        (None, true) => bail!(
            "{} holds a whole model, not LoRA adapters (its experiment has no [lora] section): there is nothing to \
             merge; export it without --merge",
            checkpoint.display()
        ),
        (None, false) => {
            let dtype = match dtype {
                Some(d) => d,
                None => export::training_dtype(checkpoint)?,
            };
            export::export(checkpoint, out, export::ExportOptions { dtype, max_shard_bytes })?;
            println!("exported {} to {}", checkpoint.display(), out.display());
        }
    }
    Ok(())
}

fn bench_checkpoint(path: &Path, repeat: usize, json: Option<&Path>) -> Result<()> {
    let launch = Launch::init()?;
    init_logging(launch.rank);
    let (exp, spec) = load_valid(path, &Overrides { set: &[], world: Some(launch.size), dp_replaced: false })
        .unwrap_or_else(|e| launch.abort(&e));
    let run = || -> Result<()> {
        let (mesh, groups, device) = job(&launch, &exp)?;
        let gpu_budget = rank_budget(&launch, &exp, device)?.gpu;
        ulysses::checkpoint::bench::run(&exp, &spec, &mesh, groups.world.as_ref(), device, gpu_budget, repeat, json)
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

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every argument of every command says what it is in `--help`.
    #[test]
    fn every_argument_is_described() {
        fn visit(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} <{id}>"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (no description)", sub.get_name()));
                }
                visit(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        visit(&Cli::command(), "ulysses", &mut missing);
        assert!(missing.is_empty(), "arguments without help text: {missing:#?}");
    }
}
