//! What a checkpoint holds is what was saved, and worth resuming from: a state with NaN or
//! infinity is never saved (synchronously or not) and never loaded; every rank file's CRC-32 is
//! in index.json and checked on load, so rank files swapped with each other or a flipped byte
//! range are named, and `resume = "auto"` falls back to the checkpoint before them and then
//! trains exactly as the undamaged run did.
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;
use std::path::Path;
use tch::{Device, Kind};
use ulysses::checkpoint::{self, CheckpointError, Checkpointer, DataPosition, Layout, RunState, Versions};
use ulysses::comm::solo::Solo;
use ulysses::config::ZeroStage;
use ulysses::model::params::init_tensor;
use ulysses::model::spec::{ModelSpec, Preset};
use ulysses::parallel::zero::{ShardMut, ShardedParams};

fn run_state(step: u64) -> RunState {
    RunState {
        format: checkpoint::FORMAT,
        step,
        total_steps: 10,
        data: DataPosition { epoch: 1, samples: 2 },
        seed: 5,
        layout: Layout { world: 1, sp: 1, dp: 1, zero_stage: ZeroStage::Sharded, micro_batch: 2, grad_accum: 1 },
        versions: Versions::current(),
        model_dtype: "float32".into(),
        config_toml: "[run]\n".into(),
    }
}

fn tiny_params(spec: &ModelSpec) -> ShardedParams {
    ShardedParams::new(spec, ZeroStage::Sharded, &Solo, Device::Cpu, |u| {
        u.tensors.iter().map(|(n, s)| init_tensor(n, s, 3, Kind::Float, Device::Cpu)).collect()
    })
    .unwrap()
}

/// Saves step 1 of `params` into `run` (synchronously or not); the save's result.
fn save(run: &Path, params: &ShardedParams, spec: &ModelSpec, asynchronous: bool) -> Result<(), CheckpointError> {
    let mut c = Checkpointer::new(run, 2, asynchronous, Vec::new(), params, &Solo)?;
    c.save(params, &run_state(1), spec, false, &Solo)?;
    c.finish(&Solo)
}

#[test]
fn a_state_with_non_finite_values_is_never_saved() {
    let spec = ModelSpec::preset(Preset::Tiny);
    let mut params = tiny_params(&spec);
    let mut names = Vec::new();
    for (i, (unit, _, shard)) in params.shards_mut().unwrap().enumerate() {
        let ShardMut::Memory(s) = shard else { unreachable!("in memory") };
        // Two NaNs in the first unit's weights, three infinities in the last one's second moment.
        if i == 0 {
            let _ = s.master.narrow(0, 5, 2).fill_(f64::NAN);
            names.push(format!("{} master 2", unit.id.key()));
        }
        if i == 2 {
            let _ = s.exp_avg_sq.narrow(0, 0, 3).fill_(f64::INFINITY);
            names.push(format!("{} exp_avg_sq 3", unit.id.key()));
        }
    }
    for asynchronous in [false, true] {
        let run = tempfile::tempdir().unwrap();
        let e = save(run.path(), &params, &spec, asynchronous).unwrap_err().to_string();
        for expected in names.iter().map(String::as_str).chain(["5 non-finite value(s)", "not saved", "train.lr"]) {
            assert!(e.contains(expected), "async {asynchronous}: `{expected}` not in: {e}");
        }
        assert!(checkpoint::list_complete(run.path()).unwrap().is_empty(), "async {asynchronous}: published");
        let left: Vec<_> = std::fs::read_dir(run.path().join("checkpoints")).unwrap().collect();
        assert!(left.is_empty(), "async {asynchronous}: the refused save's folder is left: {left:?}");
    }
}

/// Flips `n` bytes of `path` at `at`.
fn flip(path: &Path, at: u64, n: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, at).unwrap();
    buf.iter_mut().for_each(|b| *b ^= 0x5a);
    f.write_all_at(&buf, at).unwrap();
}

#[test]
fn index_json_holds_each_files_crc_and_a_load_checks_it_and_the_numbers() {
    let spec = ModelSpec::preset(Preset::Tiny);
    let params = tiny_params(&spec);
    let run = tempfile::tempdir().unwrap();
    save(run.path(), &params, &spec, false).unwrap();
    let dir = run.path().join("checkpoints/step-000001");
    let file = dir.join("rank-00000-of-00001.safetensors");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let crc = index["files"][0]["crc32"].as_str().unwrap().to_string();
    assert_eq!(crc, format!("{:08x}", crc32fast::hash(&std::fs::read(&file).unwrap())));
    let load = |dir: &Path| checkpoint::load_params(dir, 2, &spec, ZeroStage::Sharded, &Solo, Device::Cpu).map(|_| ());
    load(&dir).unwrap();

    // 64 bytes flipped in the data: named, as damage (resume = "auto" skips it).
    let len = std::fs::metadata(&file).unwrap().len();
    flip(&file, len / 2, 64);
    let e = load(&dir).unwrap_err();
    assert!(e.is_damage(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("rank-00000-of-00001.safetensors") && text.contains("CRC-32") && text.contains(&crc),
        "{text}"
    );

    // A checkpoint of a ulysses that recorded no checksum and saved an infinity: refused, naming
    // the unit and the state.
    flip(&file, len / 2, 64);
    let mut index = index;
    index["files"][0].as_object_mut().unwrap().remove("crc32");
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    load(&dir).unwrap();
    let slices = &index["units"][1]["slices"][0];
    let at = slices["bytes"][2].as_u64().unwrap() + 4 * 7;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&f32::INFINITY.to_le_bytes(), at).unwrap();
    let e = load(&dir).unwrap_err();
    let unit = index["units"][1]["unit"].as_str().unwrap();
    assert!(e.is_damage(), "{e}");
    let text = e.to_string();
    assert!(text.contains(&format!("unit `{unit}`'s exp_avg_sq")) && text.contains("1 non-finite"), "{text}");
    let w = checkpoint::load_weights(&dir, &spec, Kind::Float, Device::Cpu);
    assert!(w.is_ok(), "the weights themselves are finite: {:?}", w.err());
}

#[test]
fn swapped_or_flipped_rank_files_are_named_and_auto_resume_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let reference = Exp::new("reference", 1, 2, 6, 2);
    reference.train(dir, &data);
    let (_, expected) = losses(&reference.run_dir(dir));
    let ckpt = |run: &Path, step: &str, rank: usize| {
        run.join(format!("checkpoints/{step}/rank-0000{rank}-of-00002.safetensors"))
    };

    for damage in ["swapped", "flipped"] {
        let exp = Exp { name: damage, ..Exp::new("", 1, 2, 6, 2) };
        let run = exp.run_dir(dir);
        for step in ["step-000002", "step-000004"] {
            copy_dir(&reference.run_dir(dir).join("checkpoints").join(step), &run.join("checkpoints").join(step));
        }
        std::fs::copy(reference.run_dir(dir).join("metrics.h5"), run.join("metrics.h5")).unwrap();
        let (a, b) = (ckpt(&run, "step-000004", 0), ckpt(&run, "step-000004", 1));
        if damage == "swapped" {
            let size = |p: &Path| std::fs::metadata(p).unwrap().len();
            assert_eq!(size(&a), size(&b), "the size check alone would catch this swap");
            let tmp = run.join("tmp");
            std::fs::rename(&a, &tmp).unwrap();
            std::fs::rename(&b, &a).unwrap();
            std::fs::rename(&tmp, &b).unwrap();
        } else {
            flip(&b, std::fs::metadata(&b).unwrap().len() / 2, 64);
        }
        // Named explicitly, the damaged checkpoint stops the run with the file's name.
        let exp_path = exp.write(dir, &data);
        let from = format!("checkpoint.resume=\"{}\"", run.join("checkpoints/step-000004").display());
        let o = mpirun(2, &[exp_path.to_str().unwrap(), "--set", &from], dir, &[]);
        let out = assert_clean_failure(&o);
        assert!(out.contains("CRC-32") && out.contains("rank-0000"), "{damage}: {out}");
        // With resume = "auto" it is skipped with its name, and the run goes on from step 2.
        let out = exp.train(dir, &data);
        assert!(out.contains("CRC-32") && out.contains("skipping") && out.contains("step-000004"), "{damage}: {out}");
        assert!(out.contains("resuming from") && out.contains("step-000002"), "{damage}: {out}");
        let (steps, got) = losses(&run);
        assert_eq!(steps, (1..=6).collect::<Vec<u64>>(), "{damage}");
        assert_eq!(got, expected, "{damage}: the resumed run is the reference run");
    }
}
