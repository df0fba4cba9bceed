//! The verdict on one boot of the matrix: what it printed and how it
//! ended, against what its case must do.

use super::matrix::Case;
use super::memory::{check_report, parse_report};
use super::MIB;
use crate::qemu::{self, Machine, RunOutcome};

/// The verdict on one boot: a served case by its client's checks, a
/// deliberate crash by the failure it must cause, a DMA reservation that
/// cannot fit by its clean refusal, any other by the self-test's success
/// and the memory its console reports (see [`check_report`]).
pub(super) fn judge(case: &Case, out: &RunOutcome) -> Result<(), String> {
    if out.timed_out {
        return Err("timed out (QEMU killed)".into());
    }
    if case.net {
        if out.panicked() {
            return Err("guest panicked".into());
        }
        return match &out.action {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(format!("control port: {e}")),
            None => Err(format!(
                "no `{}` line (status {:?})",
                qemu::READY_LINE,
                out.status
            )),
        };
    }
    if let Some(crash) = case.crash {
        let (marker, detail) = match crash {
            "panic" => ("memd: PANIC at src/", "deliberate panic"),
            _ => (
                "memd: FATAL exception 14 (page fault)",
                "cr2=0xffffff8000000000",
            ),
        };
        let seen = |s: &str| out.lines.iter().any(|(_, l)| l.contains(s));
        if out.status != Some(qemu::GUEST_FAILURE) || !seen(marker) || !seen(detail) {
            return Err(format!(
                "deliberate {crash}: want failure status and `{marker}`, got status {:?}",
                out.status
            ));
        }
        return Ok(());
    }
    if out.lines.iter().any(|(_, l)| l.contains("memd: FATAL")) {
        return Err("CPU exception in the guest".into());
    }
    if case.expect_reserve_failure() {
        let said = out.lines.iter().any(|(_, l)| {
            l.contains("dma_reserve") && (l.contains("PANIC") || l.contains("ERROR"))
        });
        if out.status != Some(qemu::GUEST_FAILURE) || !said {
            return Err(format!(
                "expected a clean failure naming dma_reserve, got status {:?}",
                out.status
            ));
        }
        return Ok(());
    }
    if out.panicked() {
        return Err("guest panicked".into());
    }
    if out.status != Some(qemu::GUEST_SUCCESS) {
        return Err(format!(
            "QEMU exit status {:?}, want {} (guest success)",
            out.status,
            qemu::GUEST_SUCCESS
        ));
    }
    if out.ready_after.is_none() {
        return Err(format!("no `{}` line", qemu::READY_LINE));
    }
    if !out
        .lines
        .iter()
        .any(|(_, l)| l.contains("selftest: passed"))
    {
        return Err("no `selftest: passed` line".into());
    }
    if case.machine == Machine::MicrovmNoPit
        && !out.lines.iter().any(|(_, l)| l.contains("tsc: no PIT"))
    {
        return Err(
            "no PIT, but the console does not say where the TSC frequency came from".into(),
        );
    }
    let report = parse_report(&out.console());
    if case.memmap {
        let hole = (512 * MIB, 576 * MIB, "memmap-hole".to_string());
        if !report.reserved.contains(&hole) {
            return Err(format!(
                "memmap=64M$512M: no hole [0x20000000-0x24000000) among {:?}",
                report.reserved
            ));
        }
        if let Some((s, e)) = report.dma_reserve {
            if s < hole.1 && e > hole.0 {
                return Err("the DMA reservation overlaps the memmap hole".into());
            }
        }
        if !out.lines.iter().any(|(_, l)| l.contains("max order 13")) {
            return Err("memd.max_order=13 not in effect".into());
        }
    }
    check_report(case, &report)
}
