//! Parallelism wrapped around the model's seams: the Ulysses attention core (all-to-alls around
//! attention) and ZeRO-3 parameter sharding. The model itself never sees any of it.
pub mod attention;
pub mod deferred;
pub mod tiers;
pub mod ulysses;
pub mod units;
pub mod zero;
