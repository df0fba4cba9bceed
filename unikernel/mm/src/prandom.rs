//! A small pseudo-random generator for choices that must be reproducible
//! from a seed and need no secrecy: which allocation a fault-injection rule
//! fails, what a stress run allocates, the traces the benchmarks replay
//! (Linux's `prandom_u32` serves the same kind of caller). xorshift64*.

/// xorshift64* state; never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prandom(u64);

impl Prandom {
    /// The generator for `seed`: equal seeds give equal sequences.
    pub const fn new(seed: u64) -> Prandom {
        Prandom(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` for `n` far below 2^64; `n` must not be 0.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_its_own_sequence() {
        let (mut a, mut b) = (Prandom::new(7), Prandom::new(7));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
        assert_ne!(Prandom::new(7).next_u64(), Prandom::new(8).next_u64());
        // Seed 0 is a seed like any other, not a stuck generator.
        let mut z = Prandom::new(0);
        assert_ne!(z.next_u64(), z.next_u64());
    }

    #[test]
    fn below_stays_below_and_reaches_every_value() {
        let mut r = Prandom::new(3);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[r.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
