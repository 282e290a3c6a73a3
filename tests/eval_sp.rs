//! SP evaluation equals single-rank evaluation: the same checkpoint scored by one process and
//! under mpirun with sp = 2 and sp = 4 (and sp = 2 × dp = 2) gives the same per-sample answer
//! log-likelihoods (within 1e-5), the same greedy correctness and the same loss curve. The
//! lengths (240, 400) split over 4 ranks, so the needle, the question and the answer each land on
//! different ranks depending on the depth; sp = 4 also replicates the tiny model's 2 KV heads.
mod common;
mod eval_common;
use common::*;
use eval_common::*;
use std::path::PathBuf;
use ulysses::eval::grid::GridResult;
use ulysses::eval::loss::LossResult;
use ulysses::eval::results::EvalResults;

struct Setup {
    dir: tempfile::TempDir,
    exp: PathBuf,
    checkpoint: PathBuf,
    data: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("heldout");
    let args = ["data", "synth", "--task", "niah", "--seq-len", "240", "--num", "5", "--seed", "9"];
    let o = ulysses(&[&args[..], &["--out", data.to_str().unwrap()]].concat(), dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let exp = experiment(dir.path(), &data);
    let checkpoint = random_checkpoint(dir.path(), 5);
    Setup { dir, exp, checkpoint, data }
}

/// Runs `ulysses eval` on `ranks` processes (1: no mpirun) and returns its results.
fn eval(s: &Setup, ranks: usize, sp: usize, task: &str) -> EvalResults {
    let out = s.dir.path().join(format!("{task}-n{ranks}-sp{sp}.h5"));
    let (sp_arg, out_arg) = (sp.to_string(), out.to_str().unwrap().to_string());
    let mut args = vec!["eval", s.exp.to_str().unwrap(), "--task", task, "--sp", &sp_arg, "--out", &out_arg];
    args.extend(["--checkpoint", s.checkpoint.to_str().unwrap()]);
    if task == "loss" {
        args.extend(["--data", s.data.to_str().unwrap(), "--bins", "7"]);
    } else {
        args.extend(["--lengths", "240,400", "--depths", "0,0.5,1", "--samples", "2", "--key-digits", "4"]);
    }
    let o = if ranks == 1 { ulysses(&args, s.dir.path()) } else { mpirun(ranks, &args, s.dir.path(), &[]) };
    assert!(o.status.success(), "{}", text(&o));
    // The plots are written next to the results, and are PNGs.
    let plots: &[&str] = if task == "loss" { &["by_position"] } else { &["accuracy", "token_accuracy"] };
    for plot in plots {
        let png = std::fs::read(out.with_file_name(format!("{task}-n{ranks}-sp{sp}_{plot}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 5000, "{task} {plot}: not a drawn PNG");
    }
    results(&out)
}

fn grid(r: EvalResults) -> GridResult {
    match r {
        EvalResults::Grid { result, .. } => *result,
        EvalResults::Loss(_) => panic!("expected a grid"),
    }
}

fn loss(r: EvalResults) -> LossResult {
    match r {
        EvalResults::Loss(l) => l,
        EvalResults::Grid { .. } => panic!("expected a loss curve"),
    }
}

fn assert_same_grid(what: &str, a: &GridResult, b: &GridResult) {
    assert_eq!((&a.lengths, &a.depths), (&b.lengths, &b.depths), "{what}: grid axes");
    assert_eq!(a.key, b.key, "{what}: keys");
    assert_eq!(a.needle_start, b.needle_start, "{what}: needle positions");
    assert_eq!(a.answer_tokens, b.answer_tokens, "{what}: answer lengths");
    assert_eq!(a.correct_tokens, b.correct_tokens, "{what}: greedy-correct answer tokens");
    for (x, y) in a.logprob.iter().zip(&b.logprob) {
        assert!((x - y).abs() <= 1e-5, "{what}: answer log-prob {y} vs single-rank {x}");
    }
    assert_eq!(a.accuracy(), b.accuracy(), "{what}: accuracy");
}

fn assert_same_loss(what: &str, a: &LossResult, b: &LossResult) {
    assert_eq!(
        (a.seq_len, a.sequences, &a.bin_start, &a.bin_end),
        (b.seq_len, b.sequences, &b.bin_start, &b.bin_end),
        "{what}: bins"
    );
    assert_eq!(a.tokens, b.tokens, "{what}: tokens per bin");
    for (x, y) in a.loss.iter().zip(&b.loss) {
        assert!((x - y).abs() <= 1e-5, "{what}: bin loss {y} vs single-rank {x}");
    }
}

/// The reference itself must be a real measurement, or equality would prove nothing.
fn assert_meaningful(g: &GridResult, l: &LossResult) {
    assert!(g.logprob.iter().all(|x| x.is_finite() && *x < 0.0), "log-probs: {:?}", g.logprob);
    assert!(g.answer_tokens.iter().all(|&n| n == 4), "4-digit keys: {:?}", g.answer_tokens);
    assert!(g.key.iter().all(|&k| (1000..10000).contains(&k)), "keys: {:?}", g.key);
    // The needle moves towards the end as the depth grows.
    for li in 0..2 {
        for s in 0..2 {
            let at = |d| g.needle_start[[li, d, s]];
            assert!(
                at(0) == 0 && at(1) <= at(2) && at(0) < at(2),
                "needle positions at depths 0, 0.5, 1: {:?}",
                g.needle_start
            );
        }
    }
    assert_eq!(l.bin_start.len(), 7);
    assert_eq!(l.tokens.iter().sum::<i64>(), 5 * 239, "every labelled position of 5 sequences is scored once");
    assert!(l.loss.iter().all(|x| x.is_finite() && *x > 0.0), "bin losses: {:?}", l.loss);
}

#[test]
fn sp2_and_sp4_match_one_rank() {
    let s = setup();
    let (passkey, niah, curve) =
        (grid(eval(&s, 1, 1, "passkey")), grid(eval(&s, 1, 1, "niah")), loss(eval(&s, 1, 1, "loss")));
    assert_meaningful(&passkey, &curve);
    assert_meaningful(&niah, &curve);
    assert_ne!(passkey.logprob, niah.logprob, "the two tasks score different text");
    assert_same_grid("passkey sp=2", &passkey, &grid(eval(&s, 2, 2, "passkey")));
    assert_same_loss("loss sp=2", &curve, &loss(eval(&s, 2, 2, "loss")));
    assert_same_grid("niah sp=4", &niah, &grid(eval(&s, 4, 4, "niah")));
    assert_same_loss("loss sp=4", &curve, &loss(eval(&s, 4, 4, "loss")));
    // sp = 2 × dp = 2: the two SP groups score different samples; the sums gather them all.
    assert_same_grid("passkey sp=2 dp=2", &passkey, &grid(eval(&s, 4, 2, "passkey")));
}
