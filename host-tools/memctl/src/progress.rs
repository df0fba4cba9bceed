//! Progress on long work: a spinner with the elapsed time while memctl
//! waits for one long operation (a stress run, a disk transfer, a full
//! check), and a bar for work memctl splits into many frames (batches).
//!
//! Both draw on standard error and only when it is a terminal, so scripts
//! and `--json` output never see them.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use memd_wire::Op;

/// Whether `op` can take long enough to deserve a spinner.
pub fn is_long(op: &Op) -> bool {
    matches!(
        op,
        Op::Stress { .. }
            | Op::Check
            | Op::DmaFill { .. }
            | Op::DmaChecksum { .. }
            | Op::DmaWriteDisk { .. }
            | Op::DmaReadDisk { .. }
    )
}

/// A spinner that ticks on its own thread until dropped or finished.
pub fn spinner(msg: String, quiet: bool) -> ProgressBar {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    };
    pb.set_style(
        ProgressStyle::with_template("{spinner:.cyan} {msg} [{elapsed_precise}]")
            .expect("valid template"),
    );
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// A bar over `total` units.
pub fn bar(total: u64, msg: &str, quiet: bool) -> ProgressBar {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40.cyan/blue}] {pos}/{len} ({per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_bars_still_count() {
        let pb = bar(10, "x", true);
        pb.inc(4);
        assert_eq!(pb.position(), 4);
        assert!(is_long(&Op::Stress {
            ops: 1,
            seed: 1,
            cpus: 1
        }));
        assert!(!is_long(&Op::Status));
    }
}
