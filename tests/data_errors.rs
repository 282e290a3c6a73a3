//! Bad input fails loudly: every error names the file, the dataset or attribute and the value,
//! and the CLI exits non-zero. Never a silent wrong slice.
mod data_common;

use data_common::{meta, ulysses, write_shard};
use ndarray::{arr1, Array2};
use std::path::{Path, PathBuf};
use ulysses::data::format::ShardWriter;
use ulysses::data::{Dataset, Loader, LoaderSpec, LoaderState, LossOn, PackedDocuments, Packing, Positions};

fn open_err(paths: &[PathBuf], seq_len: usize) -> String {
    match Dataset::open(paths, seq_len) {
        Ok(_) => panic!("{paths:?} opened although it is invalid"),
        Err(e) => e.to_string(),
    }
}

/// One rank's loader over a dataset, unshuffled, one sequence per micro batch.
fn loader_spec(sp: usize, sp_rank: usize, packing: Packing) -> LoaderSpec {
    LoaderSpec {
        seed: 0,
        shuffle: false,
        dp: 1,
        dp_rank: 0,
        sp,
        sp_rank,
        ring: 1,
        micro_batch: 1,
        loss_on: LossOn::All,
        packing,
    }
}

fn assert_names(message: &str, parts: &[&str]) {
    for p in parts {
        assert!(message.contains(p), "error lacks {p:?}: {message}");
    }
}

/// A valid shard whose `tokens` dataset is then replaced by `replace`.
fn with_tokens(dir: &Path, replace: impl FnOnce(&hdf5::File)) -> PathBuf {
    let path = write_shard(&dir.join("bad.h5"), 0, 2, 8);
    let file = hdf5::File::open_rw(&path).unwrap();
    file.unlink("tokens").unwrap();
    replace(&file);
    path
}

#[test]
fn missing_files_and_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.h5");
    assert_names(&open_err(&[missing.clone()], 8), &["nope.h5", "no such file"]);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_names(&open_err(&[empty], 8), &["empty", "no *.h5 shards"]);
    let no_tokens = with_tokens(dir.path(), |_| ());
    assert_names(&open_err(&[no_tokens], 8), &["bad.h5", "no dataset `tokens`"]);

    let (code, _, stderr) = ulysses(&["data", "inspect", missing.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_names(&stderr, &["error:", "nope.h5", "no such file"]);
}

#[test]
fn wrong_dtype_rank_or_seq_len() {
    let dir = tempfile::tempdir().unwrap();
    let int64 = with_tokens(dir.path(), |f| {
        drop(f.new_dataset_builder().with_data(&Array2::<i64>::zeros((2, 8))).create("tokens").unwrap())
    });
    assert_names(&open_err(&[int64], 8), &["bad.h5", "`tokens`", "dtype int64", "int32"]);
    let rank1 = with_tokens(dir.path(), |f| {
        drop(f.new_dataset_builder().with_data(&arr1(&[1i32, 2, 3])).create("tokens").unwrap())
    });
    assert_names(&open_err(&[rank1], 8), &["bad.h5", "`tokens`", "rank 1", "[num_sequences, seq_len]"]);

    let good = write_shard(&dir.path().join("good.h5"), 0, 2, 8);
    assert_names(
        &open_err(&[good.clone()], 16),
        &["good.h5", "`tokens`", "sequences of 8 tokens", "data.seq_len = 16"],
    );
    let file = hdf5::File::open_rw(&good).unwrap();
    file.delete_attr("format_version").unwrap();
    file.new_attr::<i64>().create("format_version").unwrap().write_scalar(&3).unwrap();
    drop(file);
    assert_names(
        &open_err(&[good], 8),
        &["good.h5", "`format_version`", "= 3", "expected 1 to 2 (the versions this build reads"],
    );
}

/// A valid shard of 2 sequences of 8 tokens with a `loss_mask` that `change` then alters.
fn with_mask(dir: &Path, change: impl FnOnce(&hdf5::File)) -> PathBuf {
    let path = dir.join("masked.h5");
    let mut w = ShardWriter::create(&path, 8, &meta(258), false).unwrap().with_loss_mask().unwrap();
    w.push_masked(&[7; 8], Some(&[0, 0, 1, 1, 1, 0, 0, 0]), &[], 8).unwrap();
    w.push_masked(&[7; 8], Some(&[1; 8]), &[], 8).unwrap();
    w.finish().unwrap();
    change(&hdf5::File::open_rw(&path).unwrap());
    path
}

#[test]
fn bad_loss_masks_name_the_file_and_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let replace = |f: &hdf5::File, mask: &dyn Fn(&hdf5::File)| {
        f.unlink("loss_mask").unwrap();
        mask(f);
    };
    let int32 = with_mask(dir.path(), |f| {
        replace(f, &|f| drop(f.new_dataset_builder().with_data(&Array2::<i32>::ones((2, 8))).create("loss_mask")))
    });
    assert_names(&open_err(&[int32], 8), &["masked.h5", "`loss_mask`", "dtype int32", "uint8"]);
    let short = with_mask(dir.path(), |f| {
        replace(f, &|f| drop(f.new_dataset_builder().with_data(&Array2::<u8>::ones((1, 8))).create("loss_mask")))
    });
    assert_names(&open_err(&[short], 8), &["masked.h5", "`loss_mask`", "shape [1, 8]", "shape of `tokens`, [2, 8]"]);
    let v1 = with_mask(dir.path(), |f| {
        f.delete_attr("format_version").unwrap();
        f.new_attr::<i64>().create("format_version").unwrap().write_scalar(&1).unwrap();
    });
    assert_names(&open_err(&[v1], 8), &["masked.h5", "`format_version`", "= 1", "`loss_mask`", "expected 2"]);
    let two = with_mask(dir.path(), |f| {
        let mut m = Array2::<u8>::ones((2, 8));
        m[[1, 5]] = 2;
        replace(f, &|f| drop(f.new_dataset_builder().with_data(&m).create("loss_mask")))
    });
    let ds = Dataset::open(&[two], 8).unwrap();
    assert_eq!(ds.loss_mask(1, 0, 5).unwrap(), Some(vec![1; 5]), "a clean span reads fine");
    let err = ds.loss_mask(1, 2, 8).unwrap_err().to_string();
    assert_names(&err, &["masked.h5", "`loss_mask`", "holds 2 at sequence 1", "position 5", "0 (not trained) or 1"]);
}

#[test]
fn seq_len_must_divide_by_sp() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(&dir.path().join("s.h5"), 0, 4, 30);
    let spec = loader_spec(4, 0, Packing::default());
    let err = Loader::new(Dataset::open(&[path.clone()], 30).unwrap(), spec, LoaderState::default()).err().unwrap();
    assert_names(&err.to_string(), &["seq_len = 30", "sp = 4"]);
    let err =
        Loader::new(Dataset::open(&[path], 30).unwrap(), LoaderSpec { sp: 1, dp: 5, ..spec }, LoaderState::default())
            .err()
            .unwrap();
    assert_names(&err.to_string(), &["4 sequences", "dp × micro_batch = 5 × 1"]);
}

#[test]
fn token_ids_at_or_above_the_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.h5");
    let mut w = ShardWriter::create(&path, 16, &meta(258), false).unwrap();
    w.push(&[7; 16], &[]).unwrap();
    let mut bad = [7; 16];
    bad[13] = 258;
    w.push(&bad, &[]).unwrap();
    w.finish().unwrap();
    let ds = Dataset::open(&[path.clone()], 16).unwrap();
    assert_eq!(ds.read_span(1, 0, 13).unwrap(), vec![7; 13], "a clean span of the sequence reads fine");
    let err = ds.read_span(1, 8, 16).unwrap_err().to_string();
    assert_names(&err, &["v.h5", "`tokens`", "sequence 1", "position 13", "token id 258", "vocab_size = 258"]);

    let (code, stdout, stderr) = ulysses(&["data", "inspect", path.to_str().unwrap(), "--scan"]);
    assert_ne!(code, 0, "{stdout}");
    assert_names(&stderr, &["v.h5", "sequence 1", "position 13", "token id 258"]);

    // Through the loader, SP rank 1 of 2 reads tokens 8..16 of sequence 1 and must fail.
    let spec = loader_spec(2, 1, Packing::default());
    let mut loader = Loader::new(ds, spec, LoaderState::default()).unwrap();
    assert!(loader.next_batch().is_ok());
    assert_names(&loader.next_batch().unwrap_err().to_string(), &["v.h5", "token id 258"]);
}

#[test]
fn truncated_and_corrupt_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(&dir.path().join("t.h5"), 0, 40, 1000);
    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.path().join("truncated.h5");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(&open_err(&[truncated.clone()], 1000), &["truncated.h5", "cannot open as HDF5", "truncated"]);
    let (code, _, stderr) = ulysses(&["data", "inspect", truncated.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_names(&stderr, &["truncated.h5", "cannot open as HDF5"]);

    // Flip one byte inside sequence 5's data: the chunk checksum must catch it.
    let pattern: Vec<u8> = (500..504).flat_map(|p| data_common::token(5, p).to_le_bytes()).collect();
    let at =
        bytes.windows(pattern.len()).position(|w| w == pattern.as_slice()).expect("sequence 5 is stored in the file");
    let mut flipped = bytes.clone();
    flipped[at] ^= 0x01;
    let corrupt = dir.path().join("corrupt.h5");
    std::fs::write(&corrupt, &flipped).unwrap();
    let ds = Dataset::open(&[corrupt], 1000).unwrap();
    assert!(ds.read_span(4, 0, 1000).is_ok(), "other sequences still read");
    assert_names(
        &ds.read_span(5, 0, 10).unwrap_err().to_string(),
        &["corrupt.h5", "`tokens`", "sequence 5", "truncated or corrupt"],
    );
}

#[test]
fn shards_of_one_dataset_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    write_shard(&dir.path().join("a.h5"), 0, 2, 8);
    let mut w = ShardWriter::create(&dir.path().join("b.h5"), 8, &meta(512), false).unwrap();
    w.push(&[1; 8], &[]).unwrap();
    w.finish().unwrap();
    assert_names(&open_err(&[dir.path().to_path_buf()], 8), &["b.h5", "`vocab_size` = 512", "100000", "a.h5"]);
}

#[test]
fn bad_prepare_and_synth_input() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("in.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"fine\"}\n{\"body\": \"no text field\"}\n").unwrap();
    let out = dir.path().join("out");
    let (code, _, stderr) =
        ulysses(&["data", "prepare", jsonl.to_str().unwrap(), "--seq-len", "4", "--out", out.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert_names(&stderr, &["in.jsonl", "record 2", "field `messages`: is missing, and so is `text`", "--text-field"]);

    let tok = dir.path().join("tokenizer.json");
    std::fs::write(&tok, "{not json").unwrap();
    let (code, _, stderr) = ulysses(&[
        "data",
        "synth",
        "--task",
        "passkey",
        "--seq-len",
        "64",
        "--num",
        "1",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert_names(&stderr, &["tokenizer.json", "not a valid tokenizer.json"]);
}

/// A shard of 3 sequences of 16 tokens whose sequence 1 records `starts` (the others [0, 8]).
fn with_starts(dir: &Path, name: &str, starts: &[i32]) -> PathBuf {
    let path = dir.join(name);
    let mut w = ShardWriter::create(&path, 16, &meta(258), true).unwrap();
    for i in 0..3 {
        w.push(&[7; 16], if i == 1 { starts } else { &[0, 8] }).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn bad_document_starts_are_caught_at_open_naming_the_file_sequence_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[i32], &[&str]); 4] = [
        ("unsorted.h5", &[0, 9, 4], &["document start 4", "entry 2", "below the previous start 9", "unsorted"]),
        ("negative.h5", &[0, -3], &["document start -3", "negative", "out of range"]),
        ("beyond.h5", &[0, 16], &["document start 16", "beyond the sequence (seq_len = 16)"]),
        ("empty.h5", &[0, 5, 5], &["document start 5", "repeats the previous start 5", "empty document"]),
    ];
    for (name, starts, parts) in cases {
        let path = with_starts(dir.path(), name, starts);
        // At open, before any sequence is read: a run stops before it trains.
        let err = Dataset::open(&[path.clone()], 16).err().expect("a bad start is refused at open").to_string();
        assert_names(&err, &[name, "`docs/starts`", "sequence 1", "global index 1"]);
        assert_names(&err, parts);
        if name == "unsorted.h5" {
            // One case through the binary (each start of it loads libtorch, seconds on CI).
            let (code, stdout, stderr) = ulysses(&["data", "inspect", path.to_str().unwrap()]);
            assert_ne!(code, 0, "{stdout}");
            assert_names(&stderr, &[name, "sequence 1", parts[0]]);
        }
    }
    // The same starts in a later shard: the global index counts the shards before it.
    let good = with_starts(dir.path(), "a-good.h5", &[0, 8]);
    let bad = with_starts(dir.path(), "b-beyond.h5", &[0, 16]);
    let err = Dataset::open(&[good, bad], 16).err().expect("refused").to_string();
    assert_names(&err, &["b-beyond.h5", "sequence 1", "global index 4"]);
}

#[test]
fn document_settings_need_recorded_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(&dir.path().join("plain.h5"), 0, 4, 8);
    for (packing, message) in [
        (
            Packing { documents: PackedDocuments::Mask, positions: Positions::Global },
            ["plain.h5", "no document boundaries", "data.documents = \"mask\"", "data prepare", "--doc-len"],
        ),
        (
            Packing { documents: PackedDocuments::Ignore, positions: Positions::Document },
            [
                "data.positions = \"document\"",
                "needs data.documents = \"mask\"",
                "restart",
                "across documents",
                "later",
            ],
        ),
    ] {
        let spec = loader_spec(1, 0, packing);
        let err = Loader::new(Dataset::open(&[path.clone()], 8).unwrap(), spec, LoaderState::default()).err().unwrap();
        assert_names(&err.to_string(), &message);
    }
}
