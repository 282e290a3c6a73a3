//! `data prepare --split`: which documents are held out for `data.eval_paths`, by their index in
//! input order and a seed, so the same inputs and seed hold out the same documents.
//! - A fraction decides each document on its own (a seeded hash of its index): it streams and
//!   keeps nothing, and the held-out share is the fraction on average.
//! - A count holds out exactly N documents, drawn uniformly (reservoir sampling, Algorithm R):
//!   the N candidates wait in memory until the input ends; one that a later document displaces
//!   goes to training then, a little later than its place in the input.
use crate::rng::{splitmix64, SplitMix64};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Split {
    /// Each document held out with this probability, in (0, 1).
    Fraction(f64),
    /// Exactly this many documents held out (all of them when the input has fewer).
    Count(u64),
}

impl std::str::FromStr for Split {
    type Err = String;

    /// `0.01` (a fraction in (0, 1)) or `200` (a count of documents, >= 1).
    fn from_str(s: &str) -> Result<Split, String> {
        let valid = "a fraction of the documents in (0, 1), e.g. 0.01, or a number of documents >= 1, e.g. 200";
        if let Ok(n) = s.parse::<u64>() {
            return if n >= 1 { Ok(Split::Count(n)) } else { Err(format!("{s} holds out nothing; give {valid}")) };
        }
        match s.parse::<f64>() {
            Ok(f) if f > 0.0 && f < 1.0 => Ok(Split::Fraction(f)),
            _ => Err(format!("{s} is not {valid}")),
        }
    }
}

/// Where `Splitter::route` sends a document.
pub enum Routed<D> {
    Train(D),
    HeldOut(D),
    /// A count's candidate, kept until `finish`.
    Kept,
}

/// Routes documents, in input order, to training or the held-out set.
pub struct Splitter<D> {
    split: Split,
    seed: u64,
    /// Index of the next document.
    next: u64,
    rng: SplitMix64,
    /// A count's candidates with their indices.
    reservoir: Vec<(u64, D)>,
}

impl<D> Splitter<D> {
    pub fn new(split: Split, seed: u64) -> Splitter<D> {
        Splitter { split, seed, next: 0, rng: SplitMix64::new(seed), reservoir: Vec::new() }
    }

    /// The next document: to training, to the held-out set, or kept as a candidate (a count); a
    /// candidate it displaces goes to training.
    pub fn route(&mut self, doc: D) -> Routed<D> {
        let i = self.next;
        self.next += 1;
        match self.split {
            Split::Fraction(f) if self.fraction_holds(i, f) => Routed::HeldOut(doc),
            Split::Fraction(_) => Routed::Train(doc),
            Split::Count(n) if i < n => {
                self.reservoir.push((i, doc));
                Routed::Kept
            }
            Split::Count(n) => {
                let j = self.rng.below(i + 1);
                if j < n {
                    Routed::Train(std::mem::replace(&mut self.reservoir[j as usize], (i, doc)).1)
                } else {
                    Routed::Train(doc)
                }
            }
        }
    }

    /// Whether the next document is held out, decided before it is read (a plain-text file
    /// streams into its set); None for a count, which must see the whole document first.
    pub fn next_is_held_out(&mut self) -> Option<bool> {
        match self.split {
            Split::Fraction(f) => {
                let held = self.fraction_holds(self.next, f);
                self.next += 1;
                Some(held)
            }
            Split::Count(_) => None,
        }
    }

    fn fraction_holds(&self, index: u64, fraction: f64) -> bool {
        let draw = splitmix64(self.seed ^ splitmix64(index));
        ((draw >> 11) as f64 / (1u64 << 53) as f64) < fraction
    }

    /// A count's held-out documents, in input order (none for a fraction).
    pub fn finish(mut self) -> Vec<D> {
        self.reservoir.sort_by_key(|(i, _)| *i);
        self.reservoir.into_iter().map(|(_, d)| d).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routes documents 0..n; returns the held-out indices in the order they were held out.
    fn held_out(split: Split, seed: u64, n: u64) -> (Vec<u64>, Vec<u64>) {
        let mut s = Splitter::new(split, seed);
        let (mut train, mut held) = (Vec::new(), Vec::new());
        for i in 0..n {
            match s.route(i) {
                Routed::Train(d) => train.push(d),
                Routed::HeldOut(d) => held.push(d),
                Routed::Kept => {}
            }
        }
        held.extend(s.finish());
        (train, held)
    }

    #[test]
    fn parses_fractions_and_counts() {
        assert_eq!("0.01".parse(), Ok(Split::Fraction(0.01)));
        assert_eq!("200".parse(), Ok(Split::Count(200)));
        for bad in ["0", "1.0", "1.5", "-3", "a", "0.0"] {
            assert!(bad.parse::<Split>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_count_holds_out_exactly_n_uniformly_and_by_seed() {
        let (train, held) = held_out(Split::Count(10), 7, 1000);
        assert_eq!(held.len(), 10);
        assert!(held.windows(2).all(|w| w[0] < w[1]), "input order: {held:?}");
        let mut all: Vec<u64> = train.iter().chain(&held).copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>(), "every document once");
        assert_eq!(held_out(Split::Count(10), 7, 1000).1, held, "the same seed, the same documents");
        assert_ne!(held_out(Split::Count(10), 8, 1000).1, held, "another seed, others");
        // Uniform: over many seeds each document is held out ~ n / N of the time.
        let mut hits = [0u32; 20];
        for seed in 0..20_000 {
            for i in held_out(Split::Count(5), seed, 20).1 {
                hits[i as usize] += 1;
            }
        }
        // Expected 5000 each; the binomial sd is ~61.
        assert!(hits.iter().all(|&h| (4700..5300).contains(&h)), "{hits:?}");
        assert_eq!(held_out(Split::Count(50), 1, 20).1.len(), 20, "fewer documents than N: all of them");
    }

    #[test]
    fn a_fraction_holds_out_about_that_share_by_seed() {
        let (train, held) = held_out(Split::Fraction(0.1), 3, 10_000);
        assert!((900..1100).contains(&held.len()), "{}", held.len());
        assert_eq!(train.len() + held.len(), 10_000);
        assert_eq!(held_out(Split::Fraction(0.1), 3, 10_000).1, held);
        assert_ne!(held_out(Split::Fraction(0.1), 4, 10_000).1, held);
        // Deciding ahead (plain text) agrees with routing.
        let mut s = Splitter::<()>::new(Split::Fraction(0.1), 3);
        let ahead: Vec<u64> = (0..10_000).filter(|_| s.next_is_held_out().unwrap()).collect();
        assert_eq!(ahead, held);
        assert_eq!(Splitter::<()>::new(Split::Count(3), 3).next_is_held_out(), None);
    }
}
