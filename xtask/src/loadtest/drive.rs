//! The measured run itself: the clients and the noisy neighbours on their
//! threads until the operation budget or the time bound, a progress bar
//! meanwhile, and their merged results.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use memd_client::{wire, Options};

use super::noisy;
use super::tally::{Shared, Tally};
use super::worker::worker;
use super::Args;

/// Operations each client runs in the warm-up.
pub(super) const WARM_UP_OPS_PER_CLIENT: u64 = 300;

/// Where the load's connections go: the clients' options and the noisy
/// neighbours' (the operator's token).
pub(super) struct Load<'a> {
    pub clients: &'a Options,
    pub noisy: &'a Options,
}

/// What [`drive`] measured.
pub(super) struct Driven {
    /// The clients' merged tally.
    pub tally: Tally,
    /// The failures of clients that died.
    pub fatal: Vec<String>,
    /// From the start until the last client stopped.
    pub elapsed: Duration,
    /// The noisy neighbours' merged outcome.
    pub noisy: noisy::Outcome,
    /// From the start until the last noisy neighbour stopped.
    pub noisy_elapsed: Duration,
}

/// How many of the large DMA slots the clients take (as many as there are
/// clients, so their profile is the same with or without neighbours) and
/// how many are left to the noisy neighbours.
fn share_large_slots(slots: u64, clients: u32, noisy: u32) -> (u64, u64) {
    let for_clients = slots.min(u64::from(clients));
    (for_clients, (slots - for_clients).min(u64::from(noisy)))
}

/// Runs the clients until `ops` or `bound`, and the noisy neighbours as
/// long as the clients run. In the measured run (`measured`) a progress
/// bar is shown; otherwise each noisy neighbour runs one whole round
/// first.
pub(super) fn drive(
    load: &Load,
    args: &Args,
    ops: Option<u64>,
    bound: Duration,
    large_slots: u64,
    measured: bool,
) -> Driven {
    let shared = Shared::new(ops, Instant::now() + bound);
    let (client_slots, noisy_slots) = share_large_slots(large_slots, args.clients, args.noisy);
    let results: Mutex<Vec<(Result<Tally, String>, Instant)>> = Mutex::new(Vec::new());
    let noisy_results: Mutex<Vec<(noisy::Outcome, Instant)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for i in 0..args.clients {
            let (shared, results) = (&shared, &results);
            let seed = args.seed.wrapping_add(i as u64);
            let profile = args.profile;
            let batch = args.batch.clamp(1, wire::MAX_BATCH_OPS as u32);
            s.spawn(move || {
                let r = worker(
                    load.clients,
                    shared,
                    seed,
                    i as u64 >= client_slots,
                    i,
                    profile,
                    batch,
                );
                results.lock().unwrap().push((r, Instant::now()));
            });
        }
        for i in 0..args.noisy {
            let (shared, noisy_results) = (&shared, &noisy_results);
            let seed = args
                .seed
                .wrapping_add(u64::from(args.clients) + u64::from(i));
            s.spawn(move || {
                let o = noisy::noisy(
                    load.noisy,
                    shared,
                    seed,
                    i,
                    u64::from(i) < noisy_slots,
                    !measured,
                );
                noisy_results.lock().unwrap().push((o, Instant::now()));
            });
        }
        progress(&shared, ops, bound, measured);
    });
    let since_start = |t: Instant| t.saturating_duration_since(started);
    let mut tally = Tally::default();
    let mut fatal = Vec::new();
    let mut elapsed = Duration::ZERO;
    for (r, done) in results.into_inner().unwrap() {
        elapsed = elapsed.max(since_start(done));
        match r {
            Ok(t) => tally.merge(t),
            Err(e) => fatal.push(e),
        }
    }
    let mut noisy = noisy::Outcome::default();
    let mut noisy_elapsed = Duration::ZERO;
    for (o, done) in noisy_results.into_inner().unwrap() {
        noisy_elapsed = noisy_elapsed.max(since_start(done));
        noisy.merge(o);
    }
    Driven {
        tally,
        fatal,
        elapsed,
        noisy,
        noisy_elapsed,
    }
}

/// The progress bar, until every worker has stopped claiming work.
fn progress(shared: &Shared, ops_bound: Option<u64>, bound: Duration, show: bool) {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let (len, by_ops) = match ops_bound {
        Some(n) => (n, true),
        None => (bound.as_secs().max(1), false),
    };
    let target = if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let pb = ProgressBar::with_draw_target(Some(len), target);
    pb.set_style(
        ProgressStyle::with_template(if by_ops {
            "{elapsed_precise} [{bar:40}] {pos}/{len} ops {msg}"
        } else {
            "{elapsed_precise} [{bar:40}] {pos}/{len} s {msg}"
        })
        .expect("valid template")
        .progress_chars("=> "),
    );
    let start = Instant::now();
    loop {
        let ops = shared.ops.load(Ordering::Relaxed);
        let t = start.elapsed();
        pb.set_position(if by_ops {
            ops.min(len)
        } else {
            t.as_secs().min(len)
        });
        pb.set_message(format!(
            "{ops} ops, {:.0} ops/s, {} errors",
            ops as f64 / t.as_secs_f64().max(1e-3),
            shared.errors.load(Ordering::Relaxed)
        ));
        let over = Instant::now() >= shared.deadline || ops_bound.is_some_and(|b| ops >= b);
        if over {
            shared.stop.store(true, Ordering::Relaxed);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pb.finish_and_clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_keep_their_large_slots_before_noisy_neighbours() {
        // Enough for everyone.
        assert_eq!(share_large_slots(27, 16, 4), (16, 4));
        // The clients as without neighbours; the neighbours get the rest.
        assert_eq!(share_large_slots(27, 16, 20), (16, 11));
        assert_eq!(share_large_slots(10, 16, 4), (10, 0));
        assert_eq!(share_large_slots(0, 16, 4), (0, 0));
        assert_eq!(share_large_slots(27, 16, 0), (16, 0));
    }
}
