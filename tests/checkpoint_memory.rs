//! Peak memory at save and load, measured on the real binary under mpirun
//! (`ulysses bench-checkpoint`, 4 ranks, ZeRO-3, a 77 M-parameter model: 0.3 GB of fp32
//! weights): with format 2 no rank's peak resident memory grows by more than a constant while it
//! saves (synchronously or asynchronously: the state is in host memory and written where it
//! lies, so there is no staging), or by more than its shard plus that constant while it loads
//! (bit-exact, checked by the bench). Format 1 in the same job is the control that shows the
//! measurement can tell: its rank 0 holds a whole state. GPU state's pinned staging is measured
//! by bench/checkpoint.sh on the GPU machine.
mod common;
use common::*;

/// What a save or load may hold beyond its shard and staging: buffers, headers, libtorch's and
/// MPI's allocations on the way.
const CONSTANT: u64 = 48 << 20;

#[test]
fn no_rank_holds_more_than_its_shard_and_staging_at_save_or_load() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 16000, "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 6, "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let exp = format!(
        "[run]\nname = \"mem\"\noutput_dir = \"{}\"\n[model]\nconfig = \"{}\"\n[parallel]\nsp = 2\ndp = 2\nzero_stage = 3\n\
         [data]\npaths = [\"unused\"]\nseq_len = 128\n",
        dir.join("runs").display(),
        dir.join("config.json").display()
    );
    std::fs::write(dir.join("mem.toml"), exp).unwrap();
    let json = dir.join("bench.json");
    let o = mpirun(4, &["bench-checkpoint", "mem.toml", "--json", json.to_str().unwrap()], dir, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let per_rank =
        |v: &serde_json::Value| -> Vec<u64> { v.as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect() };
    let shard = per_rank(&report["shard_bytes"]);
    let staging = per_rank(&report["async_staging_bytes"]);
    let params = report["params"].as_u64().unwrap();
    assert!(params > 70_000_000, "{params}");
    let run = |what: &str| {
        let r = report["runs"].as_array().unwrap().iter().find(|r| r["what"].as_str().unwrap().starts_with(what));
        per_rank(&r.unwrap_or_else(|| panic!("no `{what}` in {report}"))["peak_rss_delta"])
    };
    let (sync, asynchronous, load, format1) =
        (run("format 2 save, sync"), run("format 2 save, async"), run("format 2 load"), run("format 1"));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for r in 0..4 {
        // The state is in host memory (a CPU run): a save, synchronous or asynchronous, writes it
        // where it lies; it has no staging.
        assert!(sync[r] <= CONSTANT, "rank {r}: synchronous save grew {:.0} MiB", mib(sync[r]));
        assert_eq!(staging[r], 0, "rank {r}");
        assert!(asynchronous[r] <= CONSTANT, "rank {r}: asynchronous save grew {:.0} MiB", mib(asynchronous[r]));
        assert!(
            load[r] <= shard[r] + CONSTANT,
            "rank {r}: load grew {:.0} MiB, shard {:.0} MiB",
            mib(load[r]),
            mib(shard[r])
        );
    }
    // Format 1's rank 0 holds one whole fp32 state of the model: more than any bound above.
    assert!(format1[0] >= params * 4 * 9 / 10, "format 1 rank 0 grew only {:.0} MiB", mib(format1[0]));
    assert!(format1[0] > shard[0] + CONSTANT);
    println!("{}", text(&o));
}
