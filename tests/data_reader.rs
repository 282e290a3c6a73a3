//! The training reader: per-rank slices, label shift, dp dealing, order, resume, several shards.
mod data_common;

use data_common::{token, write_shard};
use std::collections::HashSet;
use std::path::PathBuf;
use ulysses::data::{
    build_batch, Batch, Dataset, Loader, LoaderSpec, LoaderState, LossOn, PackedDocuments, Packing, Positions,
    IGNORE_INDEX,
};

fn spec(dp: usize, dp_rank: usize, sp: usize, sp_rank: usize, micro_batch: usize) -> LoaderSpec {
    LoaderSpec {
        seed: 42,
        shuffle: true,
        dp,
        dp_rank,
        sp,
        sp_rank,
        ring: 1,
        micro_batch,
        loss_on: LossOn::All,
        packing: Packing::default(),
    }
}

/// A dataset of `sizes[k]` sequences in shard k (global indices run across shards in order).
fn dataset(dir: &tempfile::TempDir, sizes: &[usize], seq_len: usize) -> Dataset {
    let mut first = 0;
    for (k, &n) in sizes.iter().enumerate() {
        write_shard(&dir.path().join(format!("shard-{k:05}.h5")), first, n, seq_len);
        first += n;
    }
    Dataset::open(&[dir.path().to_path_buf()], seq_len).unwrap()
}

#[test]
fn sp_slices_concatenate_to_the_full_sample() {
    for seq_len in [120, 200] {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(&dir, &[3], seq_len);
        for sp in [1, 2, 4, 8] {
            let c = seq_len / sp;
            let (mut inputs, mut labels, mut positions) = (vec![Vec::new(); 2], vec![Vec::new(); 2], Vec::new());
            for r in 0..sp {
                let b = build_batch(&ds, &spec(1, 0, sp, r, 2), &[2, 0]).unwrap();
                assert_eq!((b.micro_batch, b.chunk_len, b.input_ids.len()), (2, c, 2 * c));
                for row in 0..2 {
                    inputs[row].extend_from_slice(&b.input_ids[row * c..(row + 1) * c]);
                    labels[row].extend_from_slice(&b.labels[row * c..(row + 1) * c]);
                }
                positions.extend_from_slice(&b.position_ids[..c]);
                assert_eq!(b.position_ids[c..], b.position_ids[..c], "every row has the same positions");
            }
            for (row, &i) in [2, 0].iter().enumerate() {
                let full: Vec<i64> = (0..seq_len).map(|p| token(i, p) as i64).collect();
                let mut shifted = full[1..].to_vec();
                shifted.push(IGNORE_INDEX);
                assert_eq!(inputs[row], full, "inputs, seq_len {seq_len}, sp {sp}, row {row}");
                assert_eq!(labels[row], shifted, "labels, seq_len {seq_len}, sp {sp}, row {row}");
            }
            assert_eq!(positions, (0..seq_len as i64).collect::<Vec<_>>(), "global positions, sp {sp}");
        }
    }
}

#[test]
fn labels_shift_exactly_at_chunk_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(&dir, &[2], 120);
    let c = 30;
    for r in 0..4 {
        let b = build_batch(&ds, &spec(1, 0, 4, r, 2), &[1, 0]).unwrap();
        for (row, i) in [(0, 1), (1, 0)] {
            let last = b.labels[row * c + c - 1];
            // The label of a chunk's last position is the next chunk's first token.
            let expected = if r < 3 { token(i, (r + 1) * c) as i64 } else { IGNORE_INDEX };
            assert_eq!(last, expected, "sp rank {r}, row {row}");
            assert_eq!(b.labels[row * c], token(i, r * c + 1) as i64);
            assert_eq!(b.position_ids[row * c], (r * c) as i64);
        }
    }
}

/// Every batch of one epoch for each dp rank: steps × dp batches.
fn epoch_batches(ds: impl Fn() -> Dataset, dp: usize, sp_rank: usize, steps: usize) -> Vec<Vec<Batch>> {
    (0..dp)
        .map(|d| {
            let mut loader =
                Loader::new(ds(), LoaderSpec { sp_rank, ..spec(dp, d, 2, 0, 2) }, LoaderState::default()).unwrap();
            assert_eq!(loader.steps_per_epoch(), steps as u64);
            (0..steps).map(|_| loader.next_batch().unwrap()).collect()
        })
        .collect()
}

#[test]
fn dp_ranks_get_disjoint_samples_and_sp_ranks_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let open = || dataset(&dir, &[7, 10], 40);
    // 17 sequences, dp 3 × micro batch 2: 2 steps per epoch, 5 sequences dropped.
    let by_rank = epoch_batches(open, 3, 0, 2);
    let mut seen = HashSet::new();
    for batches in &by_rank {
        for b in batches {
            for (row, &i) in b.sample_indices.iter().enumerate() {
                assert!(seen.insert(i), "sample {i} dealt twice in one epoch");
                assert_eq!(b.input_ids[row * 20], token(i, 0) as i64, "row holds the sample it names");
            }
        }
    }
    assert_eq!(seen.len(), 12);
    let sp1 = epoch_batches(|| dataset(&dir, &[7, 10], 40), 3, 1, 2);
    for (a, b) in by_rank.iter().flatten().zip(sp1.iter().flatten()) {
        assert_eq!(a.sample_indices, b.sample_indices, "SP ranks of a dp group read the same samples");
        assert_eq!(b.input_ids[0], token(b.sample_indices[0], 20) as i64, "SP rank 1 reads the second half");
    }
}

fn indices(loader: &mut Loader, n: usize) -> Vec<Vec<usize>> {
    (0..n).map(|_| loader.next_batch().unwrap().sample_indices).collect()
}

#[test]
fn order_is_deterministic_for_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let _ = dataset(&dir, &[5, 6], 16);
    let open = || Dataset::open(&[dir.path().join("shard-00000.h5"), dir.path().join("shard-00001.h5")], 16).unwrap();
    let run = |seed, shuffle| {
        let mut l =
            Loader::new(open(), LoaderSpec { seed, shuffle, ..spec(1, 0, 1, 0, 2) }, LoaderState::default()).unwrap();
        indices(&mut l, 12) // 5 steps per epoch: crosses two epoch boundaries
    };
    let a = run(1, true);
    assert_eq!(a, run(1, true));
    assert_ne!(a, run(2, true));
    assert_ne!(a[..5], a[5..10], "each epoch has its own shuffle");
    let plain = run(1, false);
    assert_eq!(plain[..5].concat(), (0..10).collect::<Vec<_>>());
    assert_eq!(plain[5], vec![0, 1], "epoch 1 starts over");
}

#[test]
fn resume_restores_the_same_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let _ = dataset(&dir, &[9], 24);
    let open = || Dataset::open(&[PathBuf::from(dir.path())], 24).unwrap();
    let s = spec(2, 1, 2, 1, 2); // 9 sequences / (dp 2 × 2) = 2 steps per epoch
    for consumed in [0, 1, 2, 3, 5] {
        let mut first = Loader::new(open(), s, LoaderState::default()).unwrap();
        for _ in 0..consumed {
            first.next_batch().unwrap();
        }
        let state = first.state();
        assert_eq!(state, LoaderState { epoch: consumed as u64 / 2, position: consumed as u64 % 2 });
        let saved: LoaderState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let mut resumed = Loader::new(open(), s, saved).unwrap();
        for k in 0..3 {
            assert_eq!(resumed.next_batch().unwrap(), first.next_batch().unwrap(), "after {consumed} + {k} batches");
        }
        assert_eq!(resumed.state(), first.state());
    }
}

#[test]
fn several_shards_form_one_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset(&dir, &[2, 1, 3], 10);
    assert_eq!((ds.len(), ds.seq_len(), ds.vocab_size()), (6, 10, data_common::VOCAB));
    assert_eq!(ds.shard_paths().len(), 3);
    for i in 0..6 {
        assert_eq!(ds.read_span(i, 3, 7).unwrap(), (3..7).map(|p| token(i, p)).collect::<Vec<_>>());
    }
    assert!(ds.read_span(6, 0, 1).is_err(), "index past the end");
    assert!(ds.read_span(0, 5, 11).is_err(), "span past the sequence");
    assert_eq!(ds.passkey(3).unwrap(), None);
}

/// A shard of recognizable tokens whose sequences record document starts `starts[i]` (and,
/// where given, padding from `pads[i]`).
fn packed_shard(dir: &tempfile::TempDir, seq_len: usize, starts: &[&[i32]], pads: Option<&[usize]>) -> Dataset {
    let path = dir.path().join("packed.h5");
    let w = ulysses::data::format::ShardWriter::create(&path, seq_len, &data_common::meta(data_common::VOCAB), true)
        .unwrap();
    let mut w = if pads.is_some() { w.with_padding() } else { w };
    for (i, s) in starts.iter().enumerate() {
        let seq: Vec<i32> = (0..seq_len).map(|p| token(i, p)).collect();
        w.push_padded(&seq, s, pads.map_or(seq_len, |p| p[i])).unwrap();
    }
    w.finish().unwrap();
    Dataset::open(&[path], seq_len).unwrap()
}

#[test]
fn packed_documents_shape_labels_and_positions_the_same_on_every_sp_rank() {
    let dir = tempfile::tempdir().unwrap();
    // Sequence 0 starts inside a document (the rest of one from before), sequence 1 at one; the
    // documents cross the chunks of sp = 4 (10 tokens each), one has a single token.
    let ds = packed_shard(&dir, 40, &[&[13, 14, 31], &[0, 22]], None);
    let mask = Packing { documents: PackedDocuments::Mask, positions: Positions::Document };
    for (packing, ignored_ends, restart) in
        [(mask, true, true), (Packing { documents: PackedDocuments::Mask, positions: Positions::Global }, true, false)]
    {
        let (mut labels, mut positions) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
        for r in 0..4 {
            let b = build_batch(&ds, &LoaderSpec { packing, ..spec(1, 0, 4, r, 2) }, &[0, 1]).unwrap();
            assert_eq!(b.documents[0].starts(), [0, 13, 14, 31], "sp rank {r}: the whole sample's documents");
            assert_eq!(b.documents[1].starts(), [0, 22]);
            for row in 0..2 {
                labels[row].extend_from_slice(&b.labels[row * 10..(row + 1) * 10]);
                positions[row].extend_from_slice(&b.position_ids[row * 10..(row + 1) * 10]);
            }
        }
        for (row, ends) in [(0, vec![12, 13, 30]), (1, vec![21])] {
            for p in 0..40 {
                let next = if p == 39 || (ignored_ends && ends.contains(&p)) {
                    IGNORE_INDEX
                } else {
                    token(row, p + 1) as i64
                };
                assert_eq!(labels[row][p], next, "{packing:?}: row {row}, position {p}");
            }
        }
        let starts = [[0usize, 13, 14, 31].as_slice(), &[0, 22]];
        for (row, s) in starts.iter().enumerate() {
            let expected: Vec<i64> = (0..40)
                .map(|p| if restart { (p - s.iter().rev().find(|&&x| x <= p).unwrap()) as i64 } else { p as i64 })
                .collect();
            assert_eq!(positions[row], expected, "{packing:?}: row {row} positions");
        }
    }
    // Ignoring the boundaries leaves everything as on unpacked data, one document per sample.
    let plain = build_batch(&ds, &spec(1, 0, 1, 0, 2), &[0, 1]).unwrap();
    assert!(plain.documents.iter().all(|d| d.count() == 1));
    assert_eq!(plain.labels.iter().filter(|&&l| l == IGNORE_INDEX).count(), 2);
}

#[test]
fn padding_is_never_a_target() {
    let dir = tempfile::tempdir().unwrap();
    let ds = packed_shard(&dir, 16, &[&[0, 10], &[0]], Some(&[10, 16]));
    assert_eq!((ds.pad_start(0).unwrap(), ds.pad_start(1).unwrap()), (Some(10), None));
    let b = build_batch(&ds, &spec(1, 0, 2, 0, 2), &[0, 1]).unwrap();
    let b1 = build_batch(&ds, &spec(1, 0, 2, 1, 2), &[0, 1]).unwrap();
    let row0: Vec<i64> = [&b.labels[..8], &b1.labels[..8]].concat();
    // Position 9 (the document's EOS) would predict padding; 10.. are padding.
    let expected: Vec<i64> = (0..16).map(|p| if p >= 9 { IGNORE_INDEX } else { token(0, p + 1) as i64 }).collect();
    assert_eq!(row0, expected);
    assert_eq!(b1.labels[8..15], (9..16).map(|p| token(1, p) as i64).collect::<Vec<_>>()[..7]);
}

/// Which tokens of the masked test shard are trained: a pattern that changes within chunks and
/// across the chunk boundaries of sp = 2 and 4.
fn trained(i: usize, p: usize) -> bool {
    (p / 3 + i) % 2 == 0 || p % 7 == 0
}

#[test]
fn the_loss_mask_survives_packing_padding_positions_and_every_sp_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (seq_len, path) = (40, dir.path().join("masked.h5"));
    let starts: [&[i32]; 3] = [&[0, 13, 14, 31], &[0, 22], &[5]];
    let pads = [40, 30, 40];
    let w = ulysses::data::format::ShardWriter::create(&path, seq_len, &data_common::meta(data_common::VOCAB), true)
        .unwrap();
    let mut w = w.with_padding().with_loss_mask().unwrap();
    for (i, s) in starts.iter().enumerate() {
        let seq: Vec<i32> = (0..seq_len).map(|p| token(i, p)).collect();
        let mask: Vec<u8> = (0..seq_len).map(|p| u8::from(trained(i, p))).collect();
        w.push_masked(&seq, Some(&mask), s, pads[i]).unwrap();
    }
    w.finish().unwrap();
    let ds = Dataset::open(&[path], seq_len).unwrap();
    assert!(ds.has_loss_mask());
    assert_eq!(ds.loss_mask(1, 3, 6).unwrap(), Some((3..6).map(|p| u8::from(trained(1, p))).collect()));

    let layouts = [
        Packing::default(),
        Packing { documents: PackedDocuments::Mask, positions: Positions::Global },
        Packing { documents: PackedDocuments::Mask, positions: Positions::Document },
    ];
    for packing in layouts {
        let one = build_batch(&ds, &LoaderSpec { packing, ..spec(1, 0, 1, 0, 3) }, &[0, 1, 2]).unwrap();
        for (row, &i) in [0, 1, 2].iter().enumerate() {
            let docs = ds.documents(i).unwrap().unwrap();
            for p in 0..seq_len {
                let padded = p + 1 >= pads[i];
                let doc_end = packing.documents == PackedDocuments::Mask && docs.ends_before_next(p);
                let expected = if p + 1 == seq_len || padded || doc_end || !trained(i, p + 1) {
                    IGNORE_INDEX
                } else {
                    token(i, p + 1) as i64
                };
                assert_eq!(one.labels[row * seq_len + p], expected, "{packing:?}: sequence {i}, position {p}");
            }
        }
        for sp in [2, 4] {
            let c = seq_len / sp;
            let (mut labels, mut positions) = (vec![Vec::new(); 3], vec![Vec::new(); 3]);
            for r in 0..sp {
                let b = build_batch(&ds, &LoaderSpec { packing, ..spec(1, 0, sp, r, 3) }, &[0, 1, 2]).unwrap();
                for row in 0..3 {
                    labels[row].extend_from_slice(&b.labels[row * c..(row + 1) * c]);
                    positions[row].extend_from_slice(&b.position_ids[row * c..(row + 1) * c]);
                }
            }
            assert_eq!(labels.concat(), one.labels, "{packing:?}: sp = {sp} labels are the one-rank labels");
            assert_eq!(positions.concat(), one.position_ids, "{packing:?}: sp = {sp} positions");
        }
    }
    // A sequence whose mask trains nothing has no target at all (no error, no stray label).
    let dir2 = tempfile::tempdir().unwrap();
    let path = dir2.path().join("none.h5");
    let w = ulysses::data::format::ShardWriter::create(&path, 8, &data_common::meta(data_common::VOCAB), false);
    let mut w = w.unwrap().with_loss_mask().unwrap();
    w.push_masked(&[1; 8], Some(&[0; 8]), &[], 8).unwrap();
    w.push(&[2; 8], &[]).unwrap();
    w.finish().unwrap();
    let ds = Dataset::open(&[path], 8).unwrap();
    let b = build_batch(&ds, &spec(1, 0, 1, 0, 2), &[0, 1]).unwrap();
    assert!(b.labels[..8].iter().all(|&l| l == IGNORE_INDEX), "{:?}", b.labels);
    assert_eq!(b.labels[8..], [2, 2, 2, 2, 2, 2, 2, IGNORE_INDEX], "pushed without a mask: every token trained");
}

#[test]
fn version_1_shards_read_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_shard(&dir.path().join("v1.h5"), 0, 2, 16);
    let before = build_batch(&Dataset::open(&[path.clone()], 16).unwrap(), &spec(1, 0, 2, 1, 2), &[1, 0]).unwrap();
    {
        let file = hdf5::File::open_rw(&path).unwrap();
        file.delete_attr("format_version").unwrap();
        file.new_attr::<i64>().create("format_version").unwrap().write_scalar(&1).unwrap();
    }
    let ds = Dataset::open(&[path], 16).unwrap();
    assert!(!ds.has_loss_mask());
    assert_eq!(ds.loss_mask(0, 0, 16).unwrap(), None);
    assert_eq!(build_batch(&ds, &spec(1, 0, 2, 1, 2), &[1, 0]).unwrap(), before);
}
