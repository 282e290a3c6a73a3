//! Ring attention (sp = ulysses × ring) equals one rank: real mpirun jobs on CPU in fp32, the
//! zigzag layout and ring attention against the single-rank run on the same samples, every step's
//! loss within 1e-6 relative and every parameter after the run within 1e-5 (the bounds of
//! tests/train_equivalence.rs). The tiny model has 4 query and 2 KV heads, so ulysses 4 × ring 2
//! replicates KV heads; attention kept (fused ring backward from the kept output) and recomputed
//! both run; one case is ZeRO-3 with dp = 2. A run resumes from a checkpoint in another
//! (ulysses, ring) layout, and bad layouts are refused with one message naming the value and a
//! valid one.
mod ckpt_common;
mod common;
use common::*;
use std::path::{Path, PathBuf};

const SEQ: usize = 240;

fn synth(dir: &Path) -> PathBuf {
    let out = dir.join("data");
    let args = ["data", "synth", "--task", "passkey", "--seq-len", &SEQ.to_string(), "--num", "16", "--seed", "3"];
    let o = ulysses(&[&args[..], &["--out", out.to_str().unwrap()]].concat(), dir);
    assert!(o.status.success(), "{}", text(&o));
    out
}

#[derive(Clone)]
struct Run {
    name: String,
    ulysses: usize,
    ring: usize,
    dp: usize,
    zero: u8,
    micro_batch: usize,
    keep_attention: bool,
    steps: usize,
    /// Checkpoint every this many steps (0: never).
    every: usize,
}

impl Run {
    fn new(ulysses: usize, ring: usize) -> Run {
        Run {
            name: String::new(),
            ulysses,
            ring,
            dp: 1,
            zero: 0,
            micro_batch: 1,
            keep_attention: true,
            steps: 3,
            every: 0,
        }
    }

    fn name(&self) -> String {
        match self.name.is_empty() {
            true => format!(
                "u{}-r{}-dp{}-z{}-mb{}-{}",
                self.ulysses,
                self.ring,
                self.dp,
                self.zero,
                self.micro_batch,
                if self.keep_attention { "kept" } else { "recomputed" }
            ),
            false => self.name.clone(),
        }
    }

    fn write(&self, dir: &Path, data: &Path) -> PathBuf {
        let toml = format!(
            "[run]\nname = \"{name}\"\noutput_dir = \"{out}\"\nseed = 11\n[model]\npreset = \"tiny\"\n\
             [parallel]\nsp = {sp}\nring = {ring}\ndp = {dp}\nzero_stage = {zero}\nkeep_attention = {keep}\n\
             [data]\npaths = [\"{data}\"]\nseq_len = {SEQ}\n[train]\nsteps = {steps}\nmicro_batch = {mb}\n\
             lr = 2e-3\nmin_lr = 2e-4\nwarmup_steps = 1\nweight_decay = 0.1\nclip_grad_norm = 0.5\n\
             [checkpoint]\nevery = {every}\nresume = \"auto\"\n",
            name = self.name(),
            out = dir.join("runs").display(),
            sp = self.ulysses * self.ring,
            ring = self.ring,
            dp = self.dp,
            zero = self.zero,
            keep = self.keep_attention,
            data = data.display(),
            steps = self.steps,
            mb = self.micro_batch,
            every = self.every,
        );
        let path = dir.join(format!("{}.toml", self.name()));
        std::fs::write(&path, toml).unwrap();
        path
    }

    fn run_dir(&self, dir: &Path) -> PathBuf {
        dir.join("runs").join(self.name())
    }

    /// Trains to the end; returns the job's output.
    fn train(&self, dir: &Path, data: &Path) -> String {
        let exp = self.write(dir, data);
        let out = mpirun(self.ulysses * self.ring * self.dp, &[exp.to_str().unwrap()], dir, &[]);
        assert!(out.status.success(), "{}: {}", self.name(), text(&out));
        let t = text(&out);
        if self.ring > 1 {
            let says = format!("ring attention: ulysses {} × ring {}", self.ulysses, self.ring);
            assert!(t.contains(&says), "{}: {t}", self.name());
        }
        t
    }

    fn outputs(&self, dir: &Path, data: &Path) -> RunOutputs {
        self.train(dir, data);
        let outputs = run_outputs(&self.run_dir(dir));
        assert_eq!(outputs.0.len(), self.steps);
        outputs
    }
}

#[test]
fn ulysses_times_ring_matches_one_rank_kept_and_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let single = Run::new(1, 1).outputs(dir, &data);
    for run in [
        Run::new(1, 2),
        Run { keep_attention: false, ..Run::new(1, 2) },
        Run { zero: 3, ..Run::new(2, 2) },
        Run { keep_attention: false, ..Run::new(1, 4) },
        // 8 ranks: ulysses 4 exceeds the 2 KV heads (each replicated twice).
        Run { zero: 3, ..Run::new(4, 2) },
    ] {
        let got = run.outputs(dir, &data);
        assert_same_run(&run.name(), &single, &got);
    }
}

#[test]
fn ring_with_zero_3_and_data_parallel_matches_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    // dp = 2 ranks at micro batch 1 see the samples one rank sees at micro batch 2.
    let single = Run { micro_batch: 2, ..Run::new(1, 1) }.outputs(dir, &data);
    for run in
        [Run { dp: 2, zero: 3, ..Run::new(1, 2) }, Run { dp: 2, zero: 3, keep_attention: false, ..Run::new(1, 2) }]
    {
        assert_same_run(&run.name(), &single, &run.outputs(dir, &data));
    }
}

#[test]
fn a_run_resumes_across_ulysses_and_ring_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let full = Run { name: "full".into(), zero: 3, steps: 4, every: 2, ..Run::new(2, 2) };
    full.train(dir, &data);
    let (steps, reference) = ckpt_common::losses(&full.run_dir(dir));
    assert_eq!(steps, [1, 2, 3, 4]);
    for (name, ulysses, ring) in [("to-u1-r4", 1, 4), ("to-u4-r1", 4, 1), ("to-u1-r1", 1, 1)] {
        let run = Run { name: name.into(), zero: 3, steps: 4, every: 2, ..Run::new(ulysses, ring) };
        let from = full.run_dir(dir).join("checkpoints/step-000002");
        ckpt_common::copy_dir(&from, &run.run_dir(dir).join("checkpoints/step-000002"));
        let out = run.train(dir, &data);
        assert!(out.contains("resuming from") && out.contains("step-000002"), "{name}: {out}");
        let (steps, got) = ckpt_common::losses(&run.run_dir(dir));
        assert_eq!(steps, [3, 4], "{name}");
        for (a, b) in reference[2..].iter().zip(&got) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{name}: loss {b} vs {a} of the uninterrupted run");
        }
    }
}

#[test]
fn bad_layouts_are_refused_with_the_value_and_a_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    // Writes the run with its TOML edited by (from, to) pairs and checks it on `ranks` ranks.
    let check = |run: &Run, edits: &[(&str, &str)], ranks: usize| {
        let path = run.write(dir, &data);
        let mut toml = std::fs::read_to_string(&path).unwrap();
        for (from, to) in edits {
            toml = toml.replace(from, to);
        }
        std::fs::write(&path, toml).unwrap();
        let out = ulysses(&["check", path.to_str().unwrap(), "--world-size", &ranks.to_string()], dir);
        assert!(!out.status.success(), "{}", text(&out));
        text(&out)
    };
    let t = check(&Run::new(4, 1), &[("ring = 1", "ring = 3")], 4);
    assert!(t.contains("parallel.ring: = 3 does not divide parallel.sp = 4; use one of 1, 2, 4"), "{t}");
    // 2 × ring × ulysses = 16 does not divide 248 tokens.
    let t = check(&Run::new(2, 4), &[("seq_len = 240", "seq_len = 248")], 8);
    assert!(t.contains("data.seq_len: = 248 is not divisible by 2 × parallel.ring × ulysses = 2 × 4 × 2 = 16"), "{t}");
    assert!(t.contains("use e.g. 240 or 256"), "{t}");
    // Ulysses groups of 8 ranks do not divide the tiny model's 4 query heads.
    let t = check(&Run::new(8, 2), &[("seq_len = 240", "seq_len = 256")], 16);
    assert!(t.contains("parallel.ring: = 2 leaves Ulysses groups of sp / ring = 8 ranks"), "{t}");
    assert!(t.contains("use parallel.ring = 4, 8, 16"), "{t}");
}

#[test]
fn check_shows_the_groups_the_layout_the_ring_costs_and_a_longer_fit() {
    let check = |args: &[&str]| {
        let out = ulysses(
            &[&["check", "experiments/llama8b_ring.toml"][..], args].concat(),
            Path::new(env!("CARGO_MANIFEST_DIR")),
        );
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let t = check(&["--world-size", "16"]);
    assert!(t.contains("16 ranks = dp 1 × sp 16 (ulysses 8 × ring 2)"), "{t}");
    assert!(
        t.contains("ulysses groups [0, 1, 2, 3, 4, 5, 6, 7] [8, 9, 10, 11, 12, 13, 14, 15]; ring groups [0, 8] [1, 9]"),
        "{t}"
    );
    assert!(t.contains("4 zigzag chunks of 131072: ring rank r holds chunks r and 3−r"), "{t}");
    assert!(t.contains("per hop a rank sends 128.0 MiB forward (its K/V block) and 384.0 MiB backward"), "{t}");
    assert!(t.contains("forward hides") && t.contains("backward hides"), "{t}");
    // The verdict follows the link speed the user states: a slow link does not hide.
    let slow = check(&["--world-size", "16", "--set", "parallel.ring_link_gb_s=0.1"]);
    assert!(slow.contains("at 0.1 GB/s per link"), "{slow}");
    assert!(slow.contains("forward does NOT hide") && slow.contains("backward does NOT hide"), "{slow}");
    // The same Ulysses groups without the ring (half the ranks) fit half the tokens or so.
    let fit = |t: &str| -> usize {
        let line = t.lines().find(|l| l.starts_with("fits       up to ")).unwrap_or_else(|| panic!("{t}"));
        line["fits       up to ".len()..].split(' ').next().unwrap().parse().unwrap()
    };
    let plain = check(&["--world-size", "8", "--set", "parallel.sp=8", "--set", "parallel.ring=1"]);
    assert!(fit(&t) > fit(&plain) * 3 / 2, "ring 2: {} tokens, without: {}", fit(&t), fit(&plain));
}
