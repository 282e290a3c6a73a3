//! Which tokens of a sample each sequence-parallel rank holds: the one rule that the data reader,
//! the mesh, evaluation and `ulysses check` share. Plain arithmetic.
use std::ops::Range;

/// Tokens `[r·c, (r+1)·c)` (c = seq_len / sp) of a sample that SP rank `r` of `sp` holds:
/// consecutive equal chunks, so rank order is sequence order, which the all-to-alls rely on
/// (`parallel::ulysses`). `seq_len` must be a multiple of `sp` (the config validator checks).
pub fn sp_chunk(seq_len: usize, sp: usize, sp_rank: usize) -> Range<usize> {
    debug_assert!(sp > 0 && sp_rank < sp && seq_len % sp == 0, "sp_chunk({seq_len}, {sp}, {sp_rank})");
    let c = seq_len / sp;
    sp_rank * c..(sp_rank + 1) * c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_sequence_in_rank_order() {
        let chunks: Vec<Range<usize>> = (0..4).map(|r| sp_chunk(12, 4, r)).collect();
        assert_eq!(chunks, vec![0..3, 3..6, 6..9, 9..12]);
        assert_eq!(sp_chunk(240, 1, 0), 0..240);
    }
}
