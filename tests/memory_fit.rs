//! A memory-fit run (`train.memory_fit`) runs every step's allocations under mpirun, says on
//! every step that it is no speed or loss figure (and the disk the activation store used), writes
//! no metrics, and is refused with checkpoints on (its weights mean nothing).
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;

#[test]
fn memory_fit_run_is_labelled_and_writes_no_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("fit", 2, 1, 2, 0);
    let path = exp.write(dir, &data);
    let toml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, toml.replace("[train]\n", "[train]\nmemory_fit = true\n")).unwrap();
    let refused = mpirun(2, &[path.to_str().unwrap()], dir, &[]);
    let msg = assert_clean_failure(&refused);
    assert!(msg.contains("train.memory_fit") && msg.contains("checkpoint.save_final = false"), "{msg}");

    let toml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, toml.replace("[checkpoint]\n", "[checkpoint]\nsave_final = false\n")).unwrap();
    let o = mpirun(2, &[path.to_str().unwrap()], dir, &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for step in 1..=2 {
        assert!(
            out.contains(&format!("memory-fit step {step}/2 completed (attention in the last layer only")),
            "{out}"
        );
    }
    assert!(!out.contains("tok/s"), "a memory-fit run printed a speed: {out}");
    assert!(!out.contains("disk "), "no layer input went to disk: {out}");
    assert!(!exp.run_dir(dir).join("metrics.h5").exists());

    // Layer inputs on disk: the activation store's peak disk use is reported on every step.
    let toml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, toml.replace("[parallel]\n", "[parallel]\nactivations = \"disk\"\n")).unwrap();
    let o = mpirun(2, &[path.to_str().unwrap()], dir, &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert_eq!(out.matches("GiB/rank  disk 0.0 GiB").count(), 2, "{out}");
}
