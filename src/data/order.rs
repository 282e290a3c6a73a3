//! Which sample a rank reads at each step: a seeded per-epoch permutation dealt to dp ranks.
//! Pure functions of (seed, epoch, position), so a resumed run recomputes exactly the same order.

use crate::rng::SplitMix64;

/// Micro batches per dp rank per epoch: an incomplete tail is dropped so every dp rank takes
/// the same number of steps.
pub fn steps_per_epoch(num_sequences: usize, dp: usize, micro_batch: usize) -> usize {
    num_sequences / (dp * micro_batch)
}

/// The order of all sequence indices in `epoch`: a Fisher-Yates shuffle seeded by (seed, epoch),
/// or the identity without shuffling.
pub fn epoch_order(num_sequences: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..num_sequences).collect();
    if shuffle {
        // Mixing the epoch through one SplitMix step decorrelates neighbouring (seed, epoch) pairs.
        let mut rng = SplitMix64::new(SplitMix64::new(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03)).next_u64());
        for i in (1..num_sequences).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
    }
    order
}

/// Sequence indices of micro batch `step` (within the epoch) of dp rank `dp_rank`: positions
/// `(step * dp + dp_rank) * micro_batch ..` of the epoch's order.
pub fn micro_batch_indices(order: &[usize], step: usize, dp: usize, dp_rank: usize, micro_batch: usize) -> &[usize] {
    let first = (step * dp + dp_rank) * micro_batch;
    &order[first..first + micro_batch]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_permutation_and_differs_per_epoch() {
        let a = epoch_order(1000, 7, 0, true);
        let b = epoch_order(1000, 7, 1, true);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(1000, 7, 0, true));
        assert_eq!(epoch_order(5, 7, 3, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn dp_ranks_cover_each_step_without_overlap() {
        let order = epoch_order(23, 1, 0, true);
        let (dp, mb) = (3, 2);
        let steps = steps_per_epoch(23, dp, mb);
        assert_eq!(steps, 3);
        let mut seen = Vec::new();
        for k in 0..steps {
            for d in 0..dp {
                seen.extend_from_slice(micro_batch_indices(&order, k, dp, d, mb));
            }
        }
        assert_eq!(seen, order[..18].to_vec());
    }
}
