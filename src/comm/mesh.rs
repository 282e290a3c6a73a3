//! The dp × sp mesh. SP groups are contiguous ranks (`rank = dp_rank * sp + sp_rank`), so an SP
//! group, whose all-to-alls carry the most traffic, sits on one node whenever sp ≤ GPUs per node.
//! With ring attention (`ring` > 1) an SP group is ring × ulysses: its Ulysses groups (the
//! all-to-alls) are contiguous ranks (`sp_rank = ring_rank * ulysses + ulysses_rank`), one node
//! each when ulysses ≤ GPUs per node, and its ring groups take one rank of each, strided across
//! the nodes (the ring's point-to-point shifts ride the slower links).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh {
    pub sp: usize,
    pub dp: usize,
    /// Ring attention's degree (1: Ulysses alone); divides sp.
    pub ring: usize,
    pub world_rank: usize,
    pub sp_rank: usize,
    pub dp_rank: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MeshError {
    #[error("sp × dp = {sp} × {dp} = {} but the world has {world} ranks", sp * dp)]
    SizeMismatch { sp: usize, dp: usize, world: usize },
    #[error("sp and dp must be at least 1 (sp = {sp}, dp = {dp})")]
    Zero { sp: usize, dp: usize },
    #[error("rank {rank} is outside a world of {world}")]
    RankOutOfRange { rank: usize, world: usize },
    #[error("ring = {ring} does not divide sp = {sp}")]
    RingIndivisible { ring: usize, sp: usize },
}

impl Mesh {
    pub fn new(sp: usize, dp: usize, world_size: usize, world_rank: usize) -> Result<Mesh, MeshError> {
        if sp == 0 || dp == 0 {
            return Err(MeshError::Zero { sp, dp });
        }
        if sp * dp != world_size {
            return Err(MeshError::SizeMismatch { sp, dp, world: world_size });
        }
        if world_rank >= world_size {
            return Err(MeshError::RankOutOfRange { rank: world_rank, world: world_size });
        }
        Ok(Mesh { sp, dp, ring: 1, world_rank, sp_rank: world_rank % sp, dp_rank: world_rank / sp })
    }

    /// This mesh with each SP group split into `ring` ring ranks of sp / ring Ulysses ranks.
    pub fn with_ring(self, ring: usize) -> Result<Mesh, MeshError> {
        if ring == 0 || self.sp % ring != 0 {
            return Err(MeshError::RingIndivisible { ring, sp: self.sp });
        }
        Ok(Mesh { ring, ..self })
    }

    /// Ranks of a Ulysses group (the all-to-alls): sp / ring.
    pub fn ulysses(&self) -> usize {
        self.sp / self.ring
    }

    pub fn ulysses_rank(&self) -> usize {
        self.sp_rank % self.ulysses()
    }

    pub fn ring_rank(&self) -> usize {
        self.sp_rank / self.ulysses()
    }

    /// World ranks of this rank's Ulysses group (contiguous; the whole SP group when ring = 1).
    pub fn ulysses_group(&self) -> Vec<usize> {
        let first = self.dp_rank * self.sp + self.ring_rank() * self.ulysses();
        (first..first + self.ulysses()).collect()
    }

    /// World ranks of this rank's ring group (one rank of each Ulysses group of its SP group).
    pub fn ring_group(&self) -> Vec<usize> {
        (0..self.ring).map(|r| self.dp_rank * self.sp + r * self.ulysses() + self.ulysses_rank()).collect()
    }

    pub fn world_size(&self) -> usize {
        self.sp * self.dp
    }

    /// World ranks of this rank's SP group (same sample, consecutive chunks of the sequence).
    pub fn sp_group(&self) -> Vec<usize> {
        (0..self.sp).map(|r| self.dp_rank * self.sp + r).collect()
    }

    /// World ranks of this rank's DP group (same sequence chunk of different samples).
    pub fn dp_group(&self) -> Vec<usize> {
        (0..self.dp).map(|d| d * self.sp + self.sp_rank).collect()
    }

    /// Tokens of the sample this rank holds, for a sequence of `seq_len` tokens, in the order it
    /// holds them (two zigzag pieces at most with a ring).
    pub fn spans(&self, seq_len: usize) -> Vec<std::ops::Range<usize>> {
        crate::layout::sp_spans(seq_len, self.ulysses(), self.ring, self.sp_rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_partition_the_world() {
        for (sp, dp) in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (8, 1)] {
            let world = sp * dp;
            let mut seen_sp = vec![0; world];
            let mut seen_dp = vec![0; world];
            for r in 0..world {
                let m = Mesh::new(sp, dp, world, r).unwrap();
                assert_eq!(m.dp_rank * sp + m.sp_rank, r);
                assert!(m.sp_group().contains(&r) && m.dp_group().contains(&r));
                // SP groups are contiguous.
                let g = m.sp_group();
                assert!(g.windows(2).all(|w| w[1] == w[0] + 1));
                if m.sp_rank == 0 {
                    g.iter().for_each(|&x| seen_sp[x] += 1);
                }
                if m.dp_rank == 0 {
                    m.dp_group().iter().for_each(|&x| seen_dp[x] += 1);
                }
            }
            assert!(seen_sp.iter().all(|&c| c == 1), "sp groups must partition {sp}x{dp}");
            assert!(seen_dp.iter().all(|&c| c == 1), "dp groups must partition {sp}x{dp}");
        }
    }

    #[test]
    fn chunks_tile_the_sequence() {
        let m = |r| Mesh::new(4, 1, 4, r).unwrap();
        assert_eq!(m(0).spans(12), [0..3]);
        assert_eq!(m(3).spans(12), [9..12]);
        let m = |r| Mesh::new(4, 1, 4, r).unwrap().with_ring(2).unwrap();
        assert_eq!(m(1).spans(16), [12..16]);
    }

    #[test]
    fn ulysses_groups_are_contiguous_and_ring_groups_strided() {
        for (ulysses, ring, dp) in [(1, 2, 1), (2, 2, 1), (1, 4, 1), (4, 2, 1), (2, 2, 2), (2, 1, 2)] {
            let (sp, world) = (ulysses * ring, ulysses * ring * dp);
            let mut seen = vec![(0, 0); world];
            for r in 0..world {
                let m = Mesh::new(sp, dp, world, r).unwrap().with_ring(ring).unwrap();
                let (u, g) = (m.ulysses_group(), m.ring_group());
                assert_eq!((u.len(), g.len()), (ulysses, ring));
                assert!(u.windows(2).all(|w| w[1] == w[0] + 1));
                assert!(g.windows(2).all(|w| w[1] == w[0] + ulysses));
                assert_eq!((u[m.ulysses_rank()], g[m.ring_rank()]), (r, r));
                assert!(u.iter().chain(&g).all(|x| m.sp_group().contains(x)));
                if m.ulysses_rank() == 0 {
                    u.iter().for_each(|&x| seen[x].0 += 1);
                }
                if m.ring_rank() == 0 {
                    g.iter().for_each(|&x| seen[x].1 += 1);
                }
            }
            assert!(seen.iter().all(|&c| c == (1, 1)), "groups partition ({ulysses}, {ring}) × dp {dp}");
        }
        let m = Mesh::new(4, 1, 4, 0).unwrap();
        assert_eq!(m.with_ring(3), Err(MeshError::RingIndivisible { ring: 3, sp: 4 }));
    }

    #[test]
    fn rejects_impossible_meshes() {
        assert_eq!(Mesh::new(3, 1, 4, 0), Err(MeshError::SizeMismatch { sp: 3, dp: 1, world: 4 }));
        assert_eq!(Mesh::new(0, 4, 4, 0), Err(MeshError::Zero { sp: 0, dp: 4 }));
        assert_eq!(Mesh::new(2, 2, 4, 4), Err(MeshError::RankOutOfRange { rank: 4, world: 4 }));
    }
}
