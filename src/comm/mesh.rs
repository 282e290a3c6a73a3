//! The dp × sp mesh. SP groups are contiguous ranks (`rank = dp_rank * sp + sp_rank`), so an SP
//! group, whose all-to-alls carry the most traffic, sits on one node whenever sp ≤ GPUs per node.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh {
    pub sp: usize,
    pub dp: usize,
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
        Ok(Mesh { sp, dp, world_rank, sp_rank: world_rank % sp, dp_rank: world_rank / sp })
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

    /// Tokens of the sample this rank holds, for a sequence of `seq_len` tokens.
    pub fn chunk(&self, seq_len: usize) -> std::ops::Range<usize> {
        crate::layout::sp_chunk(seq_len, self.sp, self.sp_rank)
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
        assert_eq!(m(0).chunk(12), 0..3);
        assert_eq!(m(3).chunk(12), 9..12);
    }

    #[test]
    fn rejects_impossible_meshes() {
        assert_eq!(Mesh::new(3, 1, 4, 0), Err(MeshError::SizeMismatch { sp: 3, dp: 1, world: 4 }));
        assert_eq!(Mesh::new(0, 4, 4, 0), Err(MeshError::Zero { sp: 0, dp: 4 }));
        assert_eq!(Mesh::new(2, 2, 4, 4), Err(MeshError::RankOutOfRange { rank: 4, world: 4 }));
    }
}
