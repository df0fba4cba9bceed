//! Noisy neighbours (`--noisy N`): operator connections that loop over the
//! heaviest requests the service accepts while the ordinary clients run
//! their profile, so the ordinary figures show what a heavy neighbour costs
//! them. A noisy client's round is a stress run, a fill and checksum of the
//! largest DMA buffer it can hold (checked against the pattern computed
//! here), a disk write and read of that buffer when the service has a
//! disk, a batch of small stress runs, and a storm of cache and pool
//! creations and destructions. Its figures are kept apart from the
//! ordinary clients'.
//!
//! The disk transfers overwrite the disk from sector 0 on: a service with a
//! disk whose contents matter is no target for `--noisy`.

use memd_client::wire::{
    errno, fill_pattern, CacheSpec, Checksum, Ctor, DmaMask, Handle, Op, PoolBacking, Reply,
    SlabFlags,
};
use memd_client::{Client, Options};

use super::tally::{Shared, Tally};
use crate::rng::Rng;

/// Operations a noisy client asks of one stress run; halved for good when
/// the service answers E2BIG (its per-request limit).
pub const NOISY_STRESS_OPS: u64 = 1_000_000;
/// Stress runs in one batch frame.
const BATCH_STRESS_RUNS: usize = 64;
/// Operations of each stress run in the batch.
const BATCH_STRESS_OPS: u64 = 10_000;
/// Caches, and pools, created and destroyed by each storm.
const STORM: usize = 4;
/// The buffer a noisy client falls back to when the contiguous region has
/// no room for a large one.
const FALLBACK_DMA: u64 = 1 << 20;
/// Most rounds one noisy client runs; the run's end stops it long before.
const MAX_ROUNDS: u64 = 100_000;
/// Bytes of the pattern computed at a time for the expected checksum.
const PATTERN_CHUNK: usize = 64 << 10;

/// What the noisy clients did, merged.
#[derive(Default, Debug)]
pub(super) struct Outcome {
    pub tally: Tally,
    /// Checksums that differed from the pattern the buffer was filled with.
    pub mismatches: u64,
    /// Stress runs whose invariant check failed.
    pub stress_check_failures: u64,
    /// Clients whose connection failed.
    pub fatal: Vec<String>,
}

impl Outcome {
    pub fn merge(&mut self, o: Outcome) {
        self.tally.merge(o.tally);
        self.mismatches += o.mismatches;
        self.stress_check_failures += o.stress_check_failures;
        self.fatal.extend(o.fatal);
    }
}

/// One noisy client's connection, buffer and tally.
struct Noisy<'a> {
    c: Client,
    rng: Rng,
    shared: &'a Shared,
    out: Outcome,
    /// Ops of the next stress run (lowered on E2BIG).
    stress_ops: u64,
    /// The DMA buffer and its length, held for the whole run.
    dma: Option<(Handle, u64)>,
    /// Whether the service has a disk.
    disk: bool,
}

/// The result of a call: the value or the server's error code. A
/// connection or protocol failure is the `Err` around it.
type Call<T> = Result<Result<T, i32>, String>;

/// One step of a round; `Err` is a connection or protocol failure.
type Step<'a> = fn(&mut Noisy<'a>) -> Result<(), String>;

impl<'a> Noisy<'a> {
    /// Times one call; a server error is tallied and returned as its code.
    fn timed<T>(
        &mut self,
        kind: &'static str,
        f: impl FnOnce(&mut Client) -> memd_client::Result<T>,
    ) -> Call<T> {
        let c = &mut self.c;
        match self.out.tally.timed(kind, || f(c)) {
            Ok(r) => Ok(r.map_err(|e| e.code)),
            Err(e) => Err(format!("{kind}: {e}")),
        }
    }

    /// [`Self::timed`], for a call whose outcome only the tally needs.
    fn tallied<T>(
        &mut self,
        kind: &'static str,
        f: impl FnOnce(&mut Client) -> memd_client::Result<T>,
    ) -> Result<(), String> {
        self.timed(kind, f).map(drop)
    }

    /// Takes the buffer the rounds fill: a large one from the contiguous
    /// region when `large` (a slot of it is kept for this client), else or
    /// when that fails for want of memory, 1 MiB anywhere.
    fn take_buffer(&mut self, large: bool) -> Result<(), String> {
        if large {
            match self.timed("dma-alloc", |c| {
                c.dma_alloc(super::worker::LARGE_DMA, 0, DmaMask::Bits32)
            })? {
                Ok(b) => {
                    self.dma = Some((b.handle, b.len));
                    return Ok(());
                }
                Err(errno::ENOMEM) => {}
                Err(_) => return Ok(()),
            }
        }
        if let Ok(b) = self.timed("dma-alloc", |c| {
            c.dma_alloc(FALLBACK_DMA, 0, DmaMask::Bits64)
        })? {
            self.dma = Some((b.handle, b.len));
        }
        Ok(())
    }

    /// One round; `go` says whether to go on to the next step.
    fn round(&mut self, go: &dyn Fn() -> bool) -> Result<(), String> {
        let steps: [Step<'a>; 5] = [
            Self::stress,
            Self::fill_and_check,
            Self::disk_round_trip,
            Self::batch_stress,
            Self::storm,
        ];
        for step in steps {
            if !go() {
                break;
            }
            step(self)?;
        }
        Ok(())
    }

    fn stress(&mut self) -> Result<(), String> {
        let seed = self.rng.next();
        let mut ops = self.stress_ops;
        let r = halving_on_e2big(&mut ops, |n| self.timed("stress", |c| c.stress(n, seed)))?;
        self.stress_ops = ops;
        if let Ok(report) = r {
            if !report.check_ok {
                self.out.stress_check_failures += 1;
            }
        }
        Ok(())
    }

    /// Fills the buffer with a fresh seed's pattern and checks the
    /// service's checksum of it against the pattern's.
    fn fill_and_check(&mut self) -> Result<(), String> {
        let Some((h, len)) = self.dma else {
            return Ok(());
        };
        let seed = self.rng.next();
        if self.timed("dma-fill", |c| c.dma_fill(h, seed))?.is_err() {
            return Ok(());
        }
        if let Ok(sum) = self.timed("dma-checksum", |c| c.dma_checksum(h, 0, 0))? {
            if sum != pattern_checksum(seed, len) {
                self.out.mismatches += 1;
            }
        }
        Ok(())
    }

    /// Writes the buffer to the disk at sector 0 and reads it back (other
    /// noisy clients write there too, so what comes back is not checked).
    fn disk_round_trip(&mut self) -> Result<(), String> {
        let Some((h, _)) = self.dma.filter(|_| self.disk) else {
            return Ok(());
        };
        if self
            .timed("dma-write-disk", |c| c.dma_write_disk(h, 0))?
            .is_ok()
        {
            self.tallied("dma-read-disk", |c| c.dma_read_disk(h, 0))?;
        }
        Ok(())
    }

    /// Many small stress runs in one batch frame; each counts as an op.
    fn batch_stress(&mut self) -> Result<(), String> {
        let ops: Vec<Op> = (0..BATCH_STRESS_RUNS)
            .map(|_| Op::Stress {
                ops: BATCH_STRESS_OPS,
                seed: self.rng.next(),
                cpus: 1,
            })
            .collect();
        let Ok(results) = self.timed("batch-stress", |c| c.batch(ops, false))? else {
            return Ok(());
        };
        self.out.tally.ops += (results.len() as u64).saturating_sub(1);
        for r in results {
            match r {
                Ok(Reply::Stress(s)) if !s.check_ok => self.out.stress_check_failures += 1,
                Ok(Reply::Stress(_)) => {}
                Ok(other) => return Err(format!("batch-stress: unexpected reply {other:?}")),
                Err(e) => self.out.tally.record_error("batch-stress", &e),
            }
        }
        Ok(())
    }

    /// Creates caches and kmalloc-backed pools, then destroys them. The
    /// quota (EDQUOT) ends the creations of that kind.
    fn storm(&mut self) -> Result<(), String> {
        let mut caches = Vec::new();
        for _ in 0..STORM {
            let size = 16 + self.rng.below(4000) as u32;
            match self.timed("cache-create", |c| {
                c.cache_create(CacheSpec {
                    name: "lt-noisy".into(),
                    size,
                    align: 0,
                    flags: SlabFlags::HWCACHE_ALIGN,
                    ctor: Ctor::None,
                })
            })? {
                Ok(h) => caches.push(h),
                Err(errno::EDQUOT) => break,
                Err(_) => {}
            }
        }
        let mut pools = Vec::new();
        for _ in 0..STORM {
            let backing = PoolBacking::Kmalloc {
                size: 64 + self.rng.below(4000) as u32,
            };
            let min_nr = 1 + self.rng.below(8) as u32;
            match self.timed("pool-create", |c| c.pool_create(backing, min_nr))? {
                Ok(h) => pools.push(h),
                Err(errno::EDQUOT) => break,
                Err(_) => {}
            }
        }
        for h in pools {
            self.tallied("pool-destroy", |c| c.pool_destroy(h))?;
        }
        for h in caches {
            self.tallied("cache-destroy", |c| c.cache_destroy(h))?;
        }
        Ok(())
    }

    fn teardown(&mut self) -> Result<(), String> {
        if let Some((h, _)) = self.dma.take() {
            self.tallied("dma-free", |c| c.dma_free(h))?;
        }
        Ok(())
    }
}

/// Calls `call` with `*ops`; on E2BIG lowers `*ops` to half (for later
/// calls too) and calls once more.
fn halving_on_e2big<T>(ops: &mut u64, mut call: impl FnMut(u64) -> Call<T>) -> Call<T> {
    let r = call(*ops)?;
    if r.as_ref().err() == Some(&errno::E2BIG) && *ops > 1 {
        *ops /= 2;
        return call(*ops);
    }
    Ok(r)
}

/// The checksum of the first `len` bytes of `seed`'s fill pattern, what
/// the service reports for a buffer of that length it filled.
fn pattern_checksum(seed: u64, len: u64) -> u64 {
    let mut sum = Checksum::new();
    let mut chunk = vec![0u8; PATTERN_CHUNK];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(PATTERN_CHUNK as u64) as usize;
        fill_pattern(seed, at, &mut chunk[..n]);
        sum.update(&chunk[..n]);
        at += n as u64;
    }
    sum.value()
}

/// Runs noisy client `idx` while the run is on (`large`: it may take a
/// large buffer). When `whole_first_round`, the first round runs to its end
/// whatever the run does, so a warm-up sees every kind of request.
pub(super) fn noisy(
    opts: &Options,
    shared: &Shared,
    seed: u64,
    idx: u32,
    large: bool,
    whole_first_round: bool,
) -> Outcome {
    let mut opts = opts.clone();
    opts.client = format!("loadtest-noisy-{idx}");
    let c = match Client::connect(&opts) {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                fatal: vec![format!("noisy client {idx}: connect: {e}")],
                ..Outcome::default()
            }
        }
    };
    let mut n = Noisy {
        c,
        rng: Rng::new(seed),
        shared,
        out: Outcome::default(),
        stress_ops: NOISY_STRESS_OPS,
        dma: None,
        disk: false,
    };
    let r = (|| -> Result<(), String> {
        n.disk = n
            .timed("status", |c| c.status())?
            .is_ok_and(|s| s.block_device);
        n.take_buffer(large)?;
        for round in 0..MAX_ROUNDS {
            let whole = whole_first_round && round == 0;
            if !whole && !n.shared.running() {
                break;
            }
            let shared = n.shared;
            n.round(&|| whole || shared.running())?;
        }
        n.teardown()
    })();
    if let Err(e) = r {
        n.out.fatal.push(format!("noisy client {idx}: {e}"));
    }
    n.out
}

#[cfg(test)]
mod tests {
    use super::*;
    use memd_client::wire::checksum;

    #[test]
    fn pattern_checksum_matches_one_whole_fill() {
        for len in [0u64, 1, 4095, PATTERN_CHUNK as u64, 200_003] {
            let mut whole = vec![0u8; len as usize];
            fill_pattern(9, 0, &mut whole);
            assert_eq!(pattern_checksum(9, len), checksum(&whole), "len {len}");
        }
        assert_ne!(pattern_checksum(9, 4096), pattern_checksum(10, 4096));
    }

    #[test]
    fn e2big_halves_once_and_is_remembered() {
        let limit = 300_000;
        let mut asked = Vec::new();
        let mut ops = NOISY_STRESS_OPS;
        let mut call = |n: u64| -> Call<u64> {
            asked.push(n);
            Ok(if n > limit { Err(errno::E2BIG) } else { Ok(n) })
        };
        // 1 000 000 refused, 500 000 refused: one retry only.
        assert_eq!(halving_on_e2big(&mut ops, &mut call), Ok(Err(errno::E2BIG)));
        assert_eq!(ops, 500_000);
        // The next call starts from the lowered value.
        assert_eq!(halving_on_e2big(&mut ops, &mut call), Ok(Ok(250_000)));
        assert_eq!(ops, 250_000);
        assert_eq!(halving_on_e2big(&mut ops, &mut call), Ok(Ok(250_000)));
        assert_eq!(asked, [1_000_000, 500_000, 500_000, 250_000, 250_000]);
        // Other errors and connection failures are passed on untouched.
        let mut ops = 8;
        assert_eq!(
            halving_on_e2big(&mut ops, |_| -> Call<()> { Ok(Err(errno::EPERM)) }),
            Ok(Err(errno::EPERM))
        );
        assert_eq!(ops, 8);
        assert!(halving_on_e2big(&mut ops, |_| -> Call<()> { Err("gone".into()) }).is_err());
    }
}
