//! Per-position loss: the mean token loss in `bins` equal ranges of positions across the whole
//! sequence, summed over every rank (each SP rank holds one chunk of positions, each dp rank other
//! samples). Shows whether the model uses long context: the loss should fall with position. The
//! position is the token's place in its sample, or within its document (`metrics.position_by`),
//! which on packed data shows what the context inside a document buys.
use crate::comm::{Collective, CommError};
use crate::config::PositionBy;
use crate::data::IGNORE_INDEX;
use tch::{Kind, Tensor};

pub struct PositionLoss {
    by: PositionBy,
    bins: i64,
    seq_len: i64,
    /// [bins] f64 sums of token losses and counts of valid labels.
    sums: Tensor,
    counts: Tensor,
}

/// The reduced result: mean loss (NaN for a bin with no valid label) and tokens per bin.
pub struct PositionBins {
    pub loss: Vec<f64>,
    pub tokens: Vec<u64>,
}

impl PositionLoss {
    pub fn new(by: PositionBy, bins: usize, seq_len: usize, device: tch::Device) -> PositionLoss {
        let bins = bins.clamp(1, seq_len.max(1)) as i64;
        let zeros = || Tensor::zeros([bins], (Kind::Double, device));
        PositionLoss { by, bins, seq_len: seq_len as i64, sums: zeros(), counts: zeros() }
    }

    /// Which position it bins by.
    pub fn by(&self) -> PositionBy {
        self.by
    }

    /// First position of each bin.
    pub fn bin_starts(bins: usize, seq_len: usize) -> Vec<u64> {
        let b = bins.clamp(1, seq_len.max(1)) as u64;
        (0..b).map(|i| (i * seq_len as u64).div_ceil(b)).collect()
    }

    /// Adds token losses [b, t] whose labels and positions (in the sample or in the document, as
    /// `by` says) are [b, t].
    pub fn add(&mut self, token_losses: &Tensor, labels: &Tensor, positions: &Tensor) {
        let valid = labels.ne(IGNORE_INDEX).reshape([-1]);
        // bin = position · bins / seq_len: equal ranges of global positions.
        let bin = (positions.reshape([-1]) * self.bins).floor_divide_scalar(self.seq_len).clamp(0, self.bins - 1);
        let loss = token_losses.detach().reshape([-1]).to_kind(Kind::Double) * valid.to_kind(Kind::Double);
        let _ = self.sums.scatter_add_(0, &bin, &loss);
        let _ = self.counts.scatter_add_(0, &bin, &valid.to_kind(Kind::Double));
    }

    /// Sums over every rank of `world` (collective) and returns the means.
    pub fn reduce(&self, world: &dyn Collective) -> Result<PositionBins, CommError> {
        let both = Tensor::cat(&[&self.sums, &self.counts], 0).to_device(world.device());
        let total: Vec<f64> = Vec::try_from(world.all_reduce(&both)?.to_kind(Kind::Double).to_device(tch::Device::Cpu))
            .unwrap_or_default();
        let (sums, counts) = total.split_at(self.bins as usize);
        let loss = sums.iter().zip(counts).map(|(s, &c)| if c > 0.0 { s / c } else { f64::NAN }).collect();
        Ok(PositionBins { loss, tokens: counts.iter().map(|&c| c as u64).collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::solo::Solo;

    #[test]
    fn bins_average_valid_tokens_by_global_position() {
        let mut p = PositionLoss::new(PositionBy::Sequence, 4, 8, tch::Device::Cpu);
        // Two chunks of one sample (as two SP ranks would hold them), positions 0..4 and 4..8.
        let losses = [Tensor::from_slice(&[1.0f32, 3.0, 5.0, 7.0]), Tensor::from_slice(&[2.0f32, 4.0, 6.0, 8.0])];
        let labels = [Tensor::from_slice(&[1i64, 1, -100, 1]), Tensor::from_slice(&[1i64, 1, 1, -100])];
        for (i, (l, y)) in losses.iter().zip(&labels).enumerate() {
            let pos = Tensor::arange_start(4 * i as i64, 4 * i as i64 + 4, (Kind::Int64, tch::Device::Cpu));
            p.add(&l.view([1, 4]), &y.view([1, 4]), &pos.view([1, 4]));
        }
        let r = p.reduce(&Solo).unwrap();
        assert_eq!(r.tokens, vec![2, 1, 2, 1]);
        assert_eq!(r.loss, vec![2.0, 7.0, 3.0, 6.0]);
        assert_eq!(PositionLoss::bin_starts(4, 8), vec![0, 2, 4, 6]);
        assert_eq!(PositionLoss::bin_starts(3, 10), vec![0, 4, 7]);
    }
}
