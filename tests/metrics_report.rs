//! metrics.h5 as docs/metrics.md documents it, read with h5py alone (no ulysses code): the same
//! datasets, dtypes, shapes and attributes; per-position loss consistent with the step loss;
//! then `ulysses report` prints its summary and writes the four PNGs.
mod ckpt_common;
mod common;
use ckpt_common::*;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

const H5PY_DUMP: &str = r#"
import h5py, json, sys
out = {"datasets": {}, "attrs": {}}
with h5py.File(sys.argv[1], "r") as f:
    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            out["datasets"][name] = {"dtype": str(obj.dtype), "shape": list(obj.shape),
                                     "described": "description" in obj.attrs, "values": obj[()].tolist()}
    f.visititems(visit)
    out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v if isinstance(v, str) else float(v)) for k, v in f.attrs.items()}
# NaN (no MFU on CPU, an empty bin) is not JSON: it becomes null.
print(json.dumps(out).replace("NaN", "null"))
"#;

/// (path, dtype, shape) rows of the dataset tables, and the attribute names, of docs/metrics.md.
fn documented() -> (Vec<(String, String, String)>, Vec<String>) {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md")).unwrap();
    let (mut datasets, mut attrs) = (Vec::new(), Vec::new());
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<String> = line.split('|').map(|c| c.trim().trim_matches('`').to_string()).collect();
        if cells[1].contains('/') {
            datasets.push((cells[1].clone(), cells[2].clone(), cells[3].clone()));
        } else {
            attrs.push(cells[1].clone());
        }
    }
    (datasets, attrs)
}

#[test]
fn metrics_file_is_as_documented_and_report_plots_it() {
    let dir = tempfile::tempdir().unwrap();
    let (dir, data) = (dir.path(), synth(dir.path()));
    let exp = Exp::new("metrics", 2, 2, 4, 0);
    exp.train(dir, &data);
    let file = exp.run_dir(dir).join("metrics.h5");
    let o = std::process::Command::new(PYTHON).args(["-c", H5PY_DUMP]).arg(&file).output().unwrap();
    assert!(o.status.success(), "h5py: {}", String::from_utf8_lossy(&o.stderr));
    let dump: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let datasets = dump["datasets"].as_object().unwrap();

    let (doc_datasets, doc_attrs) = documented();
    let doc_names: Vec<&String> = doc_datasets.iter().map(|(n, _, _)| n).collect();
    let mut file_names: Vec<&String> = datasets.keys().collect();
    let mut sorted_doc = doc_names.clone();
    sorted_doc.sort();
    file_names.sort();
    assert_eq!(file_names, sorted_doc, "datasets in the file vs docs/metrics.md");
    // No step of this run is measured (metrics.time_split_every = 0): /time_split is empty.
    let dims = BTreeMap::from([("n", 4), ("ranks", 4), ("m", 2), ("bins", 8), ("k", 0), ("r", 0)]);
    for (name, dtype, shape) in &doc_datasets {
        let d = &datasets[name.as_str()];
        assert_eq!(d["dtype"], dtype.as_str(), "{name}");
        let expected: Vec<i64> = shape.trim_matches(['[', ']']).split(", ").map(|k| dims[k]).collect();
        assert_eq!(d["shape"], serde_json::json!(expected), "{name}");
        assert_eq!(d["described"], true, "{name} has no description attribute");
    }
    let mut attrs: Vec<&String> = dump["attrs"].as_object().unwrap().keys().collect();
    attrs.sort();
    let mut doc_attrs: Vec<&String> = doc_attrs.iter().collect();
    doc_attrs.sort();
    assert_eq!(attrs, doc_attrs, "file attributes vs docs/metrics.md");
    assert_eq!(dump["attrs"]["schema_version"], 5.0);
    assert!(dump["attrs"]["peak_tflops"].is_null(), "a CPU run has no peak: NaN");
    assert!(datasets["steps/mfu"]["values"].as_array().unwrap().iter().all(|v| v.is_null()), "no MFU on CPU");
    assert!(dump["attrs"]["config_toml"].as_str().unwrap().contains("position_bins = 8"));

    let col = |name: &str| -> Vec<f64> {
        datasets[name]["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect()
    };
    assert_eq!(col("steps/step"), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(col("position_loss/step"), [2.0, 4.0]);
    // Every label but each sample's last trains (2 samples × 127 labels per step); no held-out set.
    assert_eq!(col("steps/trained_tokens"), [254.0; 4]);
    assert!(col("steps/eval_loss").iter().all(|v| v.is_nan()), "no held-out set: NaN");
    assert_eq!((col("steps/eval_tokens"), col("steps/time_eval")), (vec![0.0; 4], vec![0.0; 4]));
    let host = datasets["steps/peak_host_mem"]["values"].as_array().unwrap();
    assert!(
        host.iter().flat_map(|r| r.as_array().unwrap()).all(|v| v.as_u64().unwrap() > 10 << 20),
        "every rank's memory is recorded"
    );
    // The per-position loss is the step's loss split by position: its token-weighted mean is the
    // step loss, and every valid label is counted (2 samples × 127 labels per step).
    let rows = |name: &str| -> Vec<Vec<f64>> {
        datasets[name]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
            .collect()
    };
    let (pos_loss, pos_tokens, loss) = (rows("position_loss/loss"), rows("position_loss/tokens"), col("steps/loss"));
    for (i, step) in [2usize, 4].iter().enumerate() {
        let tokens: f64 = pos_tokens[i].iter().sum();
        assert_eq!(tokens, 2.0 * 127.0);
        let mean = pos_loss[i].iter().zip(&pos_tokens[i]).map(|(l, t)| l * t).sum::<f64>() / tokens;
        assert!((mean - loss[step - 1]).abs() < 1e-5 * loss[step - 1], "step {step}: {mean} vs {}", loss[step - 1]);
    }

    let o = ulysses(&["report", exp.run_dir(dir).to_str().unwrap()], dir);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    for piece in ["steps              4 (steps 1..4)", "final", "tokens/s", "MFU", "peak host memory", "step-000004"] {
        assert!(out.contains(piece), "report lacks {piece:?}:\n{out}");
    }
    for png in ["loss", "position_loss", "memory", "throughput"] {
        let bytes = std::fs::read(exp.run_dir(dir).join("plots").join(format!("{png}.png"))).unwrap();
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000, "{png}.png");
    }
    let missing = ulysses(&["report", dir.join("nowhere").to_str().unwrap()], dir);
    assert!(assert_clean_failure(&missing).contains("nowhere/metrics.h5"));
}
