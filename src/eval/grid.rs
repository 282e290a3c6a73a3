//! Passkey / needle-in-a-haystack accuracy over a length × depth grid. Each cell holds `samples`
//! sequences made by the data synth code (`data::needle::needle_sample`), each from its own seed
//! (so every rank builds the same sequence without communication). Sequences are dealt to the DP
//! groups round-robin; the ranks of an SP group score their chunks of the same sequence, and one
//! sum over the world per length gathers every sample's score.
use super::forward::Evaluator;
use super::EvalError;
use crate::comm::{Collective, Mesh};
use crate::data::needle::needle_sample;
use crate::data::needle::SynthTask;
use crate::data::tokenizer::TextTokenizer;
use ndarray::{Array2, Array3, Axis};
use tch::Tensor;

/// What to evaluate: the task (passkey or niah) and the grid.
#[derive(Clone, Debug)]
pub struct GridSpec {
    pub task: SynthTask,
    pub lengths: Vec<usize>,
    /// Needle depths, fractions of the filler in [0, 1].
    pub depths: Vec<f32>,
    /// Sequences per cell.
    pub samples: usize,
    pub seed: u64,
    pub key_digits: u32,
}

/// Every sample's score, `[lengths, depths, samples]`; cell statistics are derived from these.
#[derive(Clone, Debug, PartialEq)]
pub struct GridResult {
    pub lengths: Vec<usize>,
    pub depths: Vec<f32>,
    /// log p(answer | prompt), summed over the answer's tokens (nats).
    pub logprob: Array3<f64>,
    /// Answer tokens whose greedy (argmax) prediction is right.
    pub correct_tokens: Array3<i64>,
    pub answer_tokens: Array3<i64>,
    /// Position of the needle's first token.
    pub needle_start: Array3<i64>,
    pub key: Array3<i64>,
}

impl GridResult {
    /// Exact match: the fraction of samples with every answer token right, `[L, D]`.
    pub fn accuracy(&self) -> Array2<f64> {
        let exact = ndarray::Zip::from(&self.correct_tokens)
            .and(&self.answer_tokens)
            .map_collect(|&c, &n| f64::from(u8::from(c == n && n > 0)));
        exact.mean_axis(Axis(2)).unwrap_or_default()
    }

    /// Fraction of answer tokens (digits, with the byte tokenizer) right, `[L, D]`.
    pub fn token_accuracy(&self) -> Array2<f64> {
        let correct = self.correct_tokens.sum_axis(Axis(2)).mapv(|v| v as f64);
        let total = self.answer_tokens.sum_axis(Axis(2)).mapv(|v| v.max(1) as f64);
        correct / total
    }

    /// Mean over samples of the answer's log-probability, `[L, D]`.
    pub fn mean_logprob(&self) -> Array2<f64> {
        self.logprob.mean_axis(Axis(2)).unwrap_or_default()
    }
}

impl GridSpec {
    /// Every problem with the grid at once: empty axes, depths outside [0, 1], lengths that do
    /// not split over `sp` or cannot hold a needle sequence.
    pub fn check(&self, sp: usize, tokenizer: &TextTokenizer) -> Result<(), EvalError> {
        let mut problems = Vec::new();
        if self.lengths.is_empty() || self.depths.is_empty() || self.samples == 0 {
            problems.push("--lengths, --depths and --samples need at least one value each".into());
        }
        if let Some(d) = self.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
            problems.push(format!("--depths: {d} is outside [0, 1] (0 = start, 1 = end of the context)"));
        }
        for &len in &self.lengths {
            if len == 0 || len % sp != 0 {
                let lo = (len / sp * sp).max(sp);
                problems.push(format!(
                    "--lengths: {len} is not a multiple of sp = {sp} (the eval pads nothing); use e.g. {lo} or {}",
                    lo + sp
                ));
            } else if let Err(e) = needle_sample(tokenizer, self.task, len, 0.0, self.key_digits, 0) {
                problems.push(format!("--lengths: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(EvalError::Usage(problems.join("\n")))
        }
    }

    /// Seed of sample `s` of cell (length, depth index `d`): distinct per cell and sample, the
    /// same on every rank (the SplitMix64 finalizer over the combined indices).
    fn sample_seed(&self, length: usize, d: usize, s: usize) -> u64 {
        crate::rng::mix(
            self.seed
                ^ (length as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (d as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
                ^ (s as u64).wrapping_mul(0x1656_67B1_9E37_79F9),
        )
    }
}

/// Evaluates the grid. Collective over the world: every rank calls it with the same grid.
/// Rank 0 prints one row of accuracies per length as it completes.
pub fn run_grid(
    ev: &Evaluator,
    grid: &GridSpec,
    tokenizer: &TextTokenizer,
    mesh: &Mesh,
    world: &dyn Collective,
) -> Result<GridResult, EvalError> {
    grid.check(mesh.sp, tokenizer)?;
    let (nl, nd, ns) = (grid.lengths.len(), grid.depths.len(), grid.samples);
    let shape = (nl, nd, ns);
    let mut r = GridResult {
        lengths: grid.lengths.clone(),
        depths: grid.depths.clone(),
        logprob: Array3::zeros(shape),
        correct_tokens: Array3::zeros(shape),
        answer_tokens: Array3::zeros(shape),
        needle_start: Array3::zeros(shape),
        key: Array3::zeros(shape),
    };
    if mesh.world_rank == 0 {
        let depths: Vec<String> = grid.depths.iter().map(|d| format!("{d:>6.2}")).collect();
        let name = grid.task.name();
        println!("{name} exact-match accuracy, {ns} samples per cell");
        println!("{:<17}{}", "  depth", depths.join(""));
    }
    let cell = nd * ns;
    for (li, &len) in grid.lengths.iter().enumerate() {
        // Rows: logprob | correct, answer length, needle start, key; one slot per (depth, sample).
        // Ranks add their share; the SP ranks that do not hold the answer add zeros.
        let mut logprob = vec![0f64; cell];
        let mut ints = vec![0i64; 4 * cell];
        for j in (mesh.dp_rank..cell).step_by(mesh.dp) {
            let (di, si) = (j / ns, j % ns);
            let seed = grid.sample_seed(len, di, si);
            let (seq, info) = needle_sample(tokenizer, grid.task, len, grid.depths[di], grid.key_digits, seed)?;
            let score = ev.answer_score(&seq, info.answer_start)?;
            logprob[j] = score.logprob;
            ints[j] = score.correct;
            if mesh.sp_rank == 0 {
                ints[cell + j] = info.answer_tokens.len() as i64;
                ints[2 * cell + j] = info.needle_start as i64;
                ints[3 * cell + j] = info.key as i64;
            }
        }
        let logprob = sum_vec(world, &logprob)?;
        let ints = sum_vec(world, &ints)?;
        for j in 0..cell {
            let at = (li, j / ns, j % ns);
            r.logprob[at] = logprob[j];
            r.correct_tokens[at] = ints[j];
            r.answer_tokens[at] = ints[cell + j];
            r.needle_start[at] = ints[2 * cell + j];
            r.key[at] = ints[3 * cell + j];
        }
        if mesh.world_rank == 0 {
            let acc = r.accuracy();
            let row: Vec<String> = acc.row(li).iter().map(|a| format!("{a:>6.2}")).collect();
            let tok = r.token_accuracy().row(li).mean().unwrap_or(0.0);
            let lp = r.mean_logprob().row(li).mean().unwrap_or(0.0);
            println!("  length {len:>8}{}   (token accuracy {tok:.3}, answer log-prob {lp:.3})", row.join(""));
        }
    }
    Ok(r)
}

/// Element-wise sum of a vector over the group.
fn sum_vec<T: tch::kind::Element + Copy>(group: &dyn Collective, v: &[T]) -> Result<Vec<T>, EvalError> {
    let summed = group.all_reduce(&Tensor::from_slice(v).to_device(group.device()))?.to_device(tch::Device::Cpu);
    Ok(Vec::<T>::try_from(summed)?)
}
