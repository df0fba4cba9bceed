//! The load test's and the hostile suite's choices: memd-mm's generator
//! (deterministic, so a seed reproduces a run) with the draws they make.

use memd_mm::Prandom;

#[derive(Clone, Debug)]
pub struct Rng(Prandom);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(Prandom::new(seed))
    }
    pub fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
    /// True with `percent` % chance.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// An index chosen by weights.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut r = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if r < w {
                return i;
            }
            r -= w;
        }
        weights.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_choice_follows_weights() {
        let mut r = Rng::new(3);
        let mut n = [0u32; 3];
        for _ in 0..30_000 {
            n[r.weighted(&[1, 0, 2])] += 1;
        }
        assert_eq!(n[1], 0);
        assert!(n[2] > n[0] * 3 / 2, "{n:?}");
    }
}
