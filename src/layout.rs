//! Which tokens of a sample each sequence-parallel rank holds: the one rule that the data reader,
//! the mesh, evaluation and `ulysses check` share. Plain arithmetic.
//!
//! With ring attention (`parallel.ring = R > 1`, sp = ulysses × R) the sample is cut into 2·R
//! chunks and ring rank r holds chunks r and 2R−1−r (the zigzag layout): under the causal mask
//! every ring rank then has the same work at every hop. Within a ring rank, its ulysses group
//! splits those two chunks, laid end to end, into equal consecutive pieces, so that the
//! all-to-all (source-rank order = sequence order) rebuilds exactly the ring rank's two chunks.
use std::ops::Range;

/// Tokens `[r·c, (r+1)·c)` (c = seq_len / sp) of a sample that SP rank `r` of `sp` holds:
/// consecutive equal chunks, so rank order is sequence order, which the all-to-alls rely on
/// (`parallel::ulysses`). `seq_len` must be a multiple of `sp` (the config validator checks).
pub fn sp_chunk(seq_len: usize, sp: usize, sp_rank: usize) -> Range<usize> {
    debug_assert!(sp > 0 && sp_rank < sp && seq_len % sp == 0, "sp_chunk({seq_len}, {sp}, {sp_rank})");
    let c = seq_len / sp;
    sp_rank * c..(sp_rank + 1) * c
}

/// The two zigzag chunks ring rank `ring_rank` of `ring` holds, in sequence order: chunks r and
/// 2R−1−r of 2R equal chunks. `seq_len` must be a multiple of 2·ring.
pub fn ring_chunks(seq_len: usize, ring: usize, ring_rank: usize) -> [Range<usize>; 2] {
    debug_assert!(
        ring > 0 && ring_rank < ring && seq_len % (2 * ring) == 0,
        "ring_chunks({seq_len}, {ring}, {ring_rank})"
    );
    let c = seq_len / (2 * ring);
    let mirror = 2 * ring - 1 - ring_rank;
    [ring_rank * c..(ring_rank + 1) * c, mirror * c..(mirror + 1) * c]
}

/// The global token ranges SP rank `sp_rank` holds, in the order the rank holds them, for
/// sp = `ulysses` × `ring` (`sp_rank = ring_rank · ulysses + ulysses_rank`). With ring = 1 this is
/// `sp_chunk`; otherwise the ulysses rank's piece of its ring rank's zigzag chunks (one range, or
/// two when the piece straddles them). `seq_len` must be a multiple of 2·ring·ulysses.
pub fn sp_spans(seq_len: usize, ulysses: usize, ring: usize, sp_rank: usize) -> Vec<Range<usize>> {
    if ring == 1 {
        return vec![sp_chunk(seq_len, ulysses, sp_rank)];
    }
    debug_assert!(seq_len % (2 * ring * ulysses) == 0, "sp_spans({seq_len}, {ulysses}, {ring}, {sp_rank})");
    let (ring_rank, ulysses_rank) = (sp_rank / ulysses, sp_rank % ulysses);
    let [first, second] = ring_chunks(seq_len, ring, ring_rank);
    let piece = 2 * first.len() / ulysses;
    // The piece [a, b) of the two chunks laid end to end, mapped back to global positions.
    let (a, b) = (ulysses_rank * piece, (ulysses_rank + 1) * piece);
    let c = first.len();
    let mut spans = Vec::with_capacity(2);
    if a < c {
        spans.push(first.start + a..first.start + b.min(c));
    }
    if b > c {
        spans.push(second.start + a.max(c) - c..second.start + b - c);
    }
    spans
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

    #[test]
    fn zigzag_pairs_an_early_chunk_with_its_mirror() {
        assert_eq!(ring_chunks(16, 2, 0), [0..4, 12..16]);
        assert_eq!(ring_chunks(16, 2, 1), [4..8, 8..12]);
        assert_eq!(ring_chunks(8, 1, 0), [0..4, 4..8]);
    }

    #[test]
    fn spans_tile_the_sequence_once_and_ring_1_is_the_plain_chunk() {
        assert_eq!(sp_spans(12, 4, 1, 2), vec![6..9]);
        // ulysses 2 × ring 2 over 16 tokens: ring rank 0 holds [0, 4) and [12, 16).
        assert_eq!(sp_spans(16, 2, 2, 0), vec![0..4]);
        assert_eq!(sp_spans(16, 2, 2, 1), vec![12..16]);
        assert_eq!(sp_spans(16, 2, 2, 2), vec![4..8]);
        assert_eq!(sp_spans(16, 2, 2, 3), vec![8..12]);
        // ulysses 1: both chunks on one rank; ulysses 4 × ring 2 over 32 tokens: pieces of 4.
        assert_eq!(sp_spans(16, 1, 2, 0), vec![0..4, 12..16]);
        assert_eq!(sp_spans(32, 4, 2, 1), vec![4..8]);
        assert_eq!(sp_spans(32, 4, 2, 2), vec![24..28]);
        // A piece that straddles the two chunks: ulysses 3 × ring 2 over 24 tokens (chunks of 6+6
        // → pieces of 4).
        assert_eq!(sp_spans(24, 3, 2, 1), vec![4..6, 18..20]);
        for (u, r, s) in [(1, 2, 16), (2, 2, 16), (1, 4, 32), (4, 2, 32), (3, 2, 24), (2, 4, 64)] {
            let mut seen = vec![0; s];
            for rank in 0..u * r {
                let spans = sp_spans(s, u, r, rank);
                assert_eq!(spans.iter().map(|x| x.len()).sum::<usize>(), s / (u * r));
                spans.iter().flat_map(|x| x.clone()).for_each(|t| seen[t] += 1);
            }
            assert!(seen.iter().all(|&n| n == 1), "({u}, {r}, {s}) covers every token once");
        }
    }
}
