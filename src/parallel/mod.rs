//! Parallelism wrapped around the model's seams: the Ulysses attention core (all-to-alls around
//! attention), ring attention across the ring group, and ZeRO-3 parameter sharding. The model itself never sees any of it.
pub mod attention;
pub mod blocks;
pub mod deferred;
pub mod frozen;
pub mod ring;
pub mod tiers;
pub mod ulysses;
pub mod units;
pub mod zero;
