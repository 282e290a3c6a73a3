//! Documents packed into one sample: where each begins over the whole sequence, checked as a shard
//! records them (`docs/starts`), and the length statistics `data prepare`, `data inspect` and
//! `ulysses check` print. Plain data: the attention masks built from it live with the kernels
//! (`model::mask`).
use super::{DataError, Dataset};

/// The documents of one sample over its whole sequence, in order: document j covers
/// `[starts[j], starts[j + 1])`, the last one ends at `seq_len`. The first starts at 0: a sequence
/// that begins inside a document (the rest of one cut at the previous sequence's end) counts that
/// part as its first document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Documents {
    starts: Vec<usize>,
    seq_len: usize,
}

impl Documents {
    /// The whole sequence as one document (plain causal attention).
    pub fn whole(seq_len: usize) -> Documents {
        Documents { starts: vec![0], seq_len }
    }

    /// From starts that passed [`check_starts`] (strictly increasing, each in `[0, seq_len)`).
    pub fn from_starts(starts: &[usize], seq_len: usize) -> Documents {
        debug_assert!(starts.windows(2).all(|w| w[0] < w[1]) && starts.iter().all(|&s| s < seq_len));
        let mut all = Vec::with_capacity(starts.len() + 1);
        if starts.first() != Some(&0) {
            all.push(0);
        }
        all.extend_from_slice(starts);
        Documents { starts: all, seq_len }
    }

    /// Documents of `len` tokens each from position 0 (the last one may be shorter).
    pub fn fixed(len: usize, seq_len: usize) -> Documents {
        Documents { starts: (0..seq_len).step_by(len.max(1)).collect(), seq_len }
    }

    pub fn count(&self) -> usize {
        self.starts.len()
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// Each document's length, in order.
    pub fn lens(&self) -> impl Iterator<Item = usize> + '_ {
        let ends = self.starts.iter().skip(1).copied().chain(std::iter::once(self.seq_len));
        self.starts.iter().zip(ends).map(|(s, e)| e - s)
    }

    pub fn max_len(&self) -> usize {
        self.lens().max().unwrap_or(0)
    }

    /// Σ len² over the documents: block-diagonal attention's cost in query-key pairs of a full
    /// square (one document: `seq_len²`), the unit `train::flops` counts attention in.
    pub fn square_sum(&self) -> f64 {
        self.lens().map(|l| (l as f64) * (l as f64)).sum()
    }

    /// Where the document holding position `p` begins.
    pub fn start_of(&self, p: usize) -> usize {
        self.starts[self.starts.partition_point(|&s| s <= p) - 1]
    }

    /// Whether `p` is a document's last position with another document after it: its next
    /// token begins another document, which attention within documents cannot predict.
    pub fn ends_before_next(&self, p: usize) -> bool {
        self.starts.binary_search(&(p + 1)).is_ok()
    }
}

/// What is wrong with one recorded document start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadStart {
    /// Its entry among the sequence's starts (0-based).
    pub entry: usize,
    pub value: i64,
    pub problem: String,
}

/// Checks one sequence's document starts as a shard records them: positions in `[0, seq_len)`,
/// strictly increasing (a repeated start would be an empty document). Returns the first bad one.
pub fn check_starts(starts: &[i64], seq_len: usize) -> Result<(), BadStart> {
    let mut previous: Option<i64> = None;
    for (entry, &value) in starts.iter().enumerate() {
        let problem = if value < 0 {
            Some("is negative: out of range".to_string())
        } else if value as u64 >= seq_len as u64 {
            Some(format!("is beyond the sequence (seq_len = {seq_len})"))
        } else {
            match previous {
                Some(p) if value == p => Some(format!("repeats the previous start {p}: an empty document")),
                Some(p) if value < p => Some(format!("is below the previous start {p}: the starts are unsorted")),
                _ => None,
            }
        };
        if let Some(problem) = problem {
            return Err(BadStart { entry, value, problem });
        }
        previous = Some(value);
    }
    Ok(())
}

/// Lengths of documents in constant memory: count, total, extremes and a histogram by powers of
/// two (bucket k holds lengths in `[2^k, 2^(k+1))`, the last one everything from 2^31).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LengthStats {
    count: u64,
    total: u64,
    min: u64,
    max: u64,
    buckets: [u64; 32],
}

impl LengthStats {
    /// Adds one length; 0 counts nowhere (an empty document is not a document).
    pub fn add(&mut self, len: u64) {
        if len == 0 {
            return;
        }
        self.min = if self.count == 0 { len } else { self.min.min(len) };
        self.max = self.max.max(len);
        self.count += 1;
        self.total += len;
        self.buckets[(63 - len.leading_zeros() as usize).min(31)] += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.total as f64 / self.count as f64
        }
    }

    /// The power-of-two range `[lo, hi)` that holds the median length.
    pub fn median_range(&self) -> Option<(u64, u64)> {
        let mut seen = 0;
        for (k, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if n > 0 && 2 * seen >= self.count {
                return Some((1 << k, 1u64.checked_shl(k as u32 + 1).unwrap_or(u64::MAX)));
            }
        }
        None
    }

    /// A few lines: the summary, then one line per non-empty bucket with its documents and
    /// their share of the tokens.
    pub fn render(&self) -> Vec<String> {
        if self.count == 0 {
            return vec!["no documents".into()];
        }
        let (lo, hi) = self.median_range().unwrap_or((0, 0));
        let mut lines = vec![format!(
            "{} documents, {} tokens: min {}, mean {:.1}, median in [{lo}, {hi}), max {}",
            self.count,
            self.total,
            self.min,
            self.mean(),
            self.max
        )];
        for (k, &n) in self.buckets.iter().enumerate().filter(|(_, &n)| n > 0) {
            let (lo, hi) = (1u64 << k, 1u64.checked_shl(k as u32 + 1).unwrap_or(u64::MAX));
            let share = 100.0 * n as f64 / self.count as f64;
            lines.push(format!("  [{lo:>8}, {hi:>8}) tokens: {n:>10} documents ({share:5.1}%)"));
        }
        lines
    }
}

/// The documents of some sequences of a dataset, as training would see them (padding excluded
/// from the lengths, included in the attention cost).
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentSummary {
    pub sequences: usize,
    /// Lengths of the documents as cut into sequences (a document crossing a sequence boundary
    /// counts once in each).
    pub lengths: LengthStats,
    /// Documents per sequence.
    pub per_sequence: LengthStats,
    /// Sequences with padding.
    pub padded: usize,
    /// Mean over the sequences of Σ len² (padding included: attention computes it), in units of
    /// `seq_len²`: the share of full causal attention's work that block-diagonal attention does.
    pub attention_share: f64,
}

/// Summarizes the documents of sequences `indices` of `dataset` (every start checked); None when
/// its shards record no boundaries.
pub fn summarize(dataset: &Dataset, indices: &[usize]) -> Result<Option<DocumentSummary>, DataError> {
    if dataset.shard_without_documents().is_some() || indices.is_empty() {
        return Ok(None);
    }
    let seq_len = dataset.seq_len();
    let (mut lengths, mut per_sequence, mut padded, mut share) =
        (LengthStats::default(), LengthStats::default(), 0, 0.0);
    for &i in indices {
        let docs = dataset.documents(i)?.unwrap_or_else(|| Documents::whole(seq_len));
        let pad = dataset.pad_start(i)?;
        padded += usize::from(pad.is_some());
        let mut n = 0;
        for (start, len) in docs.starts().iter().zip(docs.lens()) {
            if pad != Some(*start) {
                lengths.add(len as u64);
                n += 1;
            }
        }
        per_sequence.add(n);
        share += docs.square_sum() / (seq_len as f64 * seq_len as f64);
    }
    let sequences = indices.len();
    Ok(Some(DocumentSummary { sequences, lengths, per_sequence, padded, attention_share: share / sequences as f64 }))
}

/// Up to `n` sequence indices spread evenly over a dataset of `len` (all of them when `len <= n`).
pub fn spread(len: usize, n: usize) -> Vec<usize> {
    if len <= n {
        return (0..len).collect();
    }
    (0..n).map(|k| k * len / n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_cover_the_sequence_from_position_0() {
        let d = Documents::from_starts(&[3, 5, 9], 12);
        assert_eq!(d.starts(), [0, 3, 5, 9]);
        assert_eq!(d.lens().collect::<Vec<_>>(), vec![3, 2, 4, 3]);
        assert_eq!(d.count(), 4);
        assert_eq!(d.max_len(), 4);
        assert_eq!(d.square_sum(), 9.0 + 4.0 + 16.0 + 9.0);
        assert_eq!((0..12).map(|p| d.start_of(p)).collect::<Vec<_>>(), vec![0, 0, 0, 3, 3, 5, 5, 5, 5, 9, 9, 9]);
        let ends: Vec<usize> = (0..12).filter(|&p| d.ends_before_next(p)).collect();
        assert_eq!(ends, vec![2, 4, 8]);
        assert_eq!(Documents::from_starts(&[0, 4], 8), Documents::from_starts(&[4], 8));
        assert_eq!(Documents::whole(7).square_sum(), 49.0);
        assert_eq!(Documents::fixed(4, 10).lens().collect::<Vec<_>>(), vec![4, 4, 2]);
    }

    #[test]
    fn bad_starts_name_their_entry_value_and_problem() {
        assert_eq!(check_starts(&[0, 3, 7], 8), Ok(()));
        assert_eq!(check_starts(&[], 8), Ok(()));
        let bad = |s: &[i64]| check_starts(s, 8).unwrap_err();
        assert_eq!((bad(&[0, -2]).entry, bad(&[0, -2]).value), (1, -2));
        assert!(bad(&[0, -2]).problem.contains("negative"));
        assert!(bad(&[0, 8]).problem.contains("beyond the sequence (seq_len = 8)"));
        assert!(bad(&[0, 5, 3]).problem.contains("unsorted"));
        assert!(bad(&[0, 3, 3]).problem.contains("empty document"));
        assert_eq!(bad(&[1, 4, 4, 2]).entry, 2);
    }

    #[test]
    fn length_stats_summarize_in_power_of_two_buckets() {
        let mut s = LengthStats::default();
        for l in [1, 3, 3, 8, 100, 0] {
            s.add(l);
        }
        assert_eq!(s.count(), 5);
        assert_eq!(s.mean(), 23.0);
        assert_eq!(s.median_range(), Some((2, 4)));
        let lines = s.render();
        assert!(
            lines[0].starts_with("5 documents, 115 tokens: min 1, mean 23.0, median in [2, 4), max 100"),
            "{lines:?}"
        );
        assert_eq!(lines.len(), 1 + 4, "{lines:?}");
        assert_eq!(LengthStats::default().render(), vec!["no documents".to_string()]);
    }
}
