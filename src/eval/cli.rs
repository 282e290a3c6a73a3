//! `ulysses eval EXPERIMENT.toml --task passkey|niah|loss`: starts the ranks like training does
//! (mpirun, or a single process), builds the mesh, loads the checkpoint whole on every rank and
//! runs the task; rank 0 writes the results file and its PNGs.
use super::forward::Evaluator;
use super::grid::{run_grid, GridSpec};
use super::loss::{run_loss, LossSpec};
use super::results::{write_grid, write_loss, Provenance};
use super::{plot_eval, EvalTask};
use crate::checkpoint::load_weights;
use crate::comm::Mesh;
use crate::config::{validate, DeviceKind, Experiment, Overrides, PositionBy, SetArgs};
use crate::data::needle::SynthTask;
use crate::data::tokenizer::TextTokenizer;
use crate::launch::{init_logging, Backend, Launch};
use crate::metrics::tensorboard::Events;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use tch::Kind;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Experiment TOML: the model, parallel.sp and the tiles; its run directory holds the defaults.
    pub experiment: PathBuf,
    #[command(flatten)]
    pub set: SetArgs,
    /// What to measure: passkey or niah accuracy over a length × depth grid, or the loss by
    /// position over held-out shards (--data).
    #[arg(long, value_enum)]
    pub task: EvalTask,
    /// A Hugging Face model folder or a checkpoint folder [default: RUN_DIR/final, the exported model].
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Results file [default: RUN_DIR/eval/TASK.h5]; the PNGs are written next to it.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Ranks that share one sequence; dp = ranks / sp [default: parallel.sp under mpirun, 1 in a
    /// single process].
    #[arg(long)]
    pub sp: Option<usize>,
    /// Context lengths of the grid, each a multiple of sp [default: data.seq_len].
    #[arg(long, value_delimiter = ',')]
    pub lengths: Option<Vec<usize>>,
    /// Needle depths of the grid (0 = start of the context, 1 = end).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    pub depths: Vec<f32>,
    /// Sequences per grid cell (passkey, niah) [default: 10], or at most this many sequences
    /// (loss) [default: all].
    #[arg(long)]
    pub samples: Option<usize>,
    /// Seed of the grid's keys and filler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Digits of the grid's keys.
    #[arg(long, default_value_t = 5)]
    pub key_digits: u32,
    /// The model's tokenizer: `byte` or a tokenizer.json path [default: the checkpoint's
    /// tokenizer.json; the byte tokenizer for a checkpoint without one]. One that is not the
    /// checkpoint's own is refused.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Held-out shards (files or folders) for --task loss.
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Position bins of the loss curve.
    #[arg(long, default_value_t = 64)]
    pub bins: usize,
    /// What --task loss bins a token by: its position in the sequence, or within its document
    /// (packed data; needs the experiment's data.documents = "mask").
    #[arg(long, value_enum, default_value_t = PositionBy::Sequence)]
    pub by: PositionBy,
}

/// The eval's TensorBoard events (`metrics.tensorboard`): RUN_DIR/tensorboard/eval, at the
/// training step of the checkpoint (0 for one without a run state, such as imported weights).
fn eval_events(exp: &Experiment, checkpoint: &std::path::Path) -> Result<(u64, Events)> {
    // The training step the weights are from: a checkpoint's run state, or an export's marker
    // (`final/`); 0 for other Hugging Face folders.
    let step = crate::checkpoint::read_state(checkpoint)
        .map(|s| s.step)
        .ok()
        .or_else(|| crate::checkpoint::export::exported_step(checkpoint))
        .unwrap_or(0);
    let dir = exp.run_dir().join(crate::metrics::TENSORBOARD).join("eval");
    let events = Events::create(&dir, "eval").with_context(|| format!("TensorBoard events in {}", dir.display()))?;
    Ok((step, events))
}

/// `eval/TASK/exact_match/len_L` and `.../token_accuracy/len_L`: each length's mean over depths.
fn tensorboard_grid(
    exp: &Experiment,
    checkpoint: &std::path::Path,
    task: EvalTask,
    r: &crate::eval::grid::GridResult,
) -> Result<()> {
    let (step, mut events) = eval_events(exp, checkpoint)?;
    for (what, values) in [("exact_match", r.accuracy()), ("token_accuracy", r.token_accuracy())] {
        for (i, length) in r.lengths.iter().enumerate() {
            let mean = values.row(i).mean().unwrap_or(f64::NAN);
            events.scalar(&format!("eval/{}/{what}/len_{length}", task.name()), step, mean)?;
        }
    }
    Ok(())
}

/// The tokenizer the grid's text goes through: the checkpoint's own tokenizer.json when it
/// carries one (training copies it into every checkpoint and export), else the byte tokenizer
/// (what a run on byte-tokenized data leaves: no tokenizer files). `--tokenizer` may name the
/// same tokenizer, never another: the ids of another tokenizer mean other text to the model, and
/// the grid would score noise.
fn grid_tokenizer(arg: Option<&str>, checkpoint: &std::path::Path) -> Result<TextTokenizer> {
    let own = checkpoint.join("tokenizer.json");
    let own = own.is_file().then(|| own.display().to_string());
    let Some(arg) = arg else {
        return Ok(TextTokenizer::load(own.as_deref().unwrap_or("byte"), None)?);
    };
    let tokenizer = TextTokenizer::load(arg, None)?;
    if let Some(own) = own {
        let carried = TextTokenizer::load(&own, None)?;
        if tokenizer.name() != carried.name() {
            bail!(
                "--tokenizer {arg} ({}) is not the tokenizer the checkpoint carries, {own} ({}); leave --tokenizer out to use the checkpoint's",
                tokenizer.name(),
                carried.name()
            );
        }
    }
    Ok(tokenizer)
}

/// Runs on every rank; a failure on any rank ends the job (MPI_Abort) with its message.
pub fn run(args: EvalArgs) -> Result<()> {
    let launch = Launch::init()?;
    init_logging(launch.rank);
    if let Err(e) = run_rank(&launch, &args) {
        // Bad arguments fail on every rank alike: let rank 0's message be the one printed.
        if launch.rank != 0 {
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        launch.abort(&e);
    }
    Ok(())
}

fn run_rank(launch: &Launch, args: &EvalArgs) -> Result<()> {
    // The eval picks its own mesh below (--sp and the job's ranks), replacing the file's dp.
    let overrides = Overrides { set: &args.set.set, world: None, dp_replaced: true };
    let mut exp = Experiment::load_with(&args.experiment, &overrides)?;
    let sp = args.sp.unwrap_or(if launch.size > 1 { exp.parallel.sp } else { 1 });
    if sp == 0 || launch.size % sp != 0 {
        bail!(
            "sp = {sp} does not divide the {} rank(s) of this job; pass --sp with a divisor of {}, or run under `mpirun -n N` with N a multiple of {sp}",
            launch.size,
            launch.size
        );
    }
    // The eval's own mesh; validate checks it against the model (sp divides the heads) as for training.
    exp.parallel.sp = sp;
    exp.parallel.dp = launch.size / sp;
    // Evaluation attends with Ulysses alone (its forward has no ring attention), whatever ring
    // the run trained with: the weights are the same.
    exp.parallel.ring = 1;
    let spec = validate(&exp, Some(launch.size)).map_err(|problems| {
        let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
        anyhow::anyhow!(
            "{} has {} problem(s) for this eval (sp = {sp}):\n{}",
            args.experiment.display(),
            problems.len(),
            list.join("\n")
        )
    })?;
    let mesh = Mesh::new(sp, exp.parallel.dp, launch.size, launch.rank)?;
    // As in training: CPU tensors over MPI, or this rank's GPU over NCCL in the run's dtype.
    let (backend, kind) = match exp.parallel.device {
        DeviceKind::Cpu => (Backend::Mpi, Kind::Float),
        DeviceKind::Cuda => (Backend::Nccl, crate::model::kind_of(exp.train.dtype)),
    };
    let device = launch.device(backend)?;
    let groups = launch.groups(backend, &mesh)?;
    let checkpoint = args.checkpoint.clone().unwrap_or_else(|| exp.run_dir().join("final"));
    let weights = load_weights(&checkpoint, &spec, kind, device)
        .with_context(|| format!("loading the checkpoint {}", checkpoint.display()))?;
    // The grid's sequences are one document each; held-out packed data attends within its
    // documents when training did.
    let documents = match args.task {
        EvalTask::Loss => crate::parallel::attention::document_kernels(&exp, &spec, launch.size, kind, device)?,
        EvalTask::Passkey | EvalTask::Niah => None,
    };
    let ev = Evaluator {
        spec: &spec,
        weights: &weights,
        sp: groups.sp.as_ref(),
        device,
        mlp_tile: exp.parallel.mlp_tile,
        loss_tile: exp.parallel.loss_tile,
        documents,
    };
    let out = args.out.clone().unwrap_or_else(|| exp.run_dir().join("eval").join(format!("{}.h5", args.task.name())));
    let command: Vec<String> = std::env::args().collect();
    let (config_toml, command) = (exp.to_toml(), command.join(" "));
    let provenance =
        Provenance { checkpoint: &checkpoint, config_toml: &config_toml, command: &command, sp, dp: mesh.dp };
    if launch.rank == 0 {
        println!(
            "eval {}: {} on {} rank(s) (sp = {sp}, dp = {})",
            args.task.name(),
            checkpoint.display(),
            launch.size,
            mesh.dp
        );
    }
    let world = groups.world.as_ref();
    match args.task {
        EvalTask::Passkey | EvalTask::Niah => {
            let tokenizer = grid_tokenizer(args.tokenizer.as_deref(), &checkpoint)?;
            if tokenizer.vocab_size() > spec.vocab_size {
                bail!(
                    "tokenizer {}: {} tokens do not fit the model's vocabulary of {}",
                    tokenizer.name(),
                    tokenizer.vocab_size(),
                    spec.vocab_size
                );
            }
            if launch.rank == 0 {
                println!("tokenizer {}", tokenizer.name());
            }
            let lengths = args.lengths.clone().unwrap_or_else(|| vec![exp.data.seq_len]);
            for &len in &lengths {
                spec.check_seq_len(len).map_err(|e| anyhow::anyhow!("--lengths {len}: {e}"))?;
            }
            let grid = GridSpec {
                task: if args.task == EvalTask::Niah { SynthTask::Niah } else { SynthTask::Passkey },
                lengths,
                depths: args.depths.clone(),
                samples: args.samples.unwrap_or(10),
                seed: args.seed,
                key_digits: args.key_digits,
            };
            let result = run_grid(&ev, &grid, &tokenizer, &mesh, world)?;
            if launch.rank == 0 {
                write_grid(&out, args.task, &provenance, &grid, &tokenizer.name(), &result)?;
                if exp.metrics.tensorboard {
                    tensorboard_grid(&exp, &checkpoint, args.task, &result)?;
                }
            }
        }
        EvalTask::Loss => {
            if args.data.is_empty() {
                bail!("--task loss needs --data: held-out shard files or folders (make them like the training data, from text the model was not trained on)");
            }
            let spec = LossSpec {
                paths: args.data.clone(),
                bins: args.bins,
                max_sequences: args.samples,
                by: args.by,
                packing: exp.data.packing(),
            };
            let result = run_loss(&ev, &spec, &mesh, world)?;
            if launch.rank == 0 {
                write_loss(&out, &provenance, &args.data, &result)?;
                if exp.metrics.tensorboard {
                    // `eval/loss/P`: the loss of the bin starting at position P.
                    let (step, mut events) = eval_events(&exp, &checkpoint)?;
                    let digits = result.bin_start.last().map_or(1, |p| p.to_string().len());
                    for (start, &loss) in result.bin_start.iter().zip(&result.loss) {
                        events.scalar(&format!("eval/loss/{start:0digits$}"), step, loss)?;
                    }
                }
                let (first, last) = (result.loss.first().unwrap_or(&f64::NAN), result.loss.last().unwrap_or(&f64::NAN));
                println!(
                    "loss over {} sequences of {} tokens: first bin {first:.4}, last bin {last:.4} nats",
                    result.sequences, result.seq_len
                );
            }
        }
    }
    if launch.rank == 0 {
        let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
        let plots = plot_eval(&out, dir.unwrap_or(std::path::Path::new(".")))?;
        println!("wrote {}", out.display());
        for p in plots {
            println!("wrote {}", p.display());
        }
    }
    world.barrier()?;
    Ok(())
}
