//! The cases of the boot test matrix, the kernel command line each boots
//! with, and the verdict on what each boot printed and how it ended.

use super::memory::{check_report, parse_report};
use super::{GIB, MIB};
use crate::qemu::{self, Machine, RunOutcome};

/// The zone `memd.dma_reserve=64M@ZONE` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reserve {
    Dma32,
    Normal,
}

impl Reserve {
    pub fn arg(self) -> &'static str {
        match self {
            Reserve::Dma32 => "memd.dma_reserve=64M@dma32",
            Reserve::Normal => "memd.dma_reserve=64M@normal",
        }
    }

    /// Where the zone lies, physically.
    pub fn span(self) -> (u64, u64) {
        match self {
            Reserve::Dma32 => (16 * MIB, 4 * GIB),
            Reserve::Normal => (4 * GIB, u64::MAX),
        }
    }
}

/// One boot of the matrix.
#[derive(Clone, Debug)]
pub(super) struct Case {
    pub machine: Machine,
    /// Guest memory in bytes.
    pub mem: u64,
    pub dma_reserve: Option<Reserve>,
    /// A deliberate crash (`memd.selftest=panic|fault`): the harness must
    /// see a failure (status, PANIC/FATAL line) quickly, not a hang.
    pub crash: Option<&'static str>,
    /// Boot with virtio-net and a disk, and talk to the control port from
    /// the host, instead of running the self-test.
    pub net: bool,
    /// `memmap=64M$512M memd.max_order=13`: a hole and a larger buddy.
    pub memmap: bool,
}

impl Case {
    /// The self-test on `machine` with `mem` bytes, nothing else.
    pub fn new(machine: Machine, mem: u64) -> Case {
        Case {
            machine,
            mem,
            dma_reserve: None,
            crash: None,
            net: false,
            memmap: false,
        }
    }

    pub fn name(&self) -> String {
        format!(
            "{}-{}{}{}",
            self.machine.name(),
            mem_arg(self.mem),
            match self.dma_reserve {
                None => "",
                Some(Reserve::Dma32) => "-dma_reserve",
                Some(Reserve::Normal) => "-dma_reserve_normal",
            },
            self.crash
                .map(|c| format!("-{c}-detected"))
                .unwrap_or_default()
        ) + if self.net { "-virtio-net" } else { "" }
            + if self.memmap { "-memmap-max_order" } else { "" }
    }

    /// Whether the reservation cannot fit: DMA32 below the guest's RAM top
    /// is smaller than 64 MiB plus the kernel's own needs.
    pub fn expect_reserve_failure(&self) -> bool {
        self.dma_reserve.is_some() && self.mem < 256 * MIB
    }

    /// The kernel command line besides `memd.port=`: the self-test (or the
    /// crash asked for) unless the case serves, then the reservation and
    /// the memory map's hole.
    pub fn cmdline(&self) -> String {
        let mut words = Vec::new();
        if !self.net {
            words.push(format!("memd.selftest={}", self.crash.unwrap_or("1")));
        }
        if let Some(reserve) = self.dma_reserve {
            words.push(reserve.arg().into());
        }
        if self.memmap {
            words.push("memmap=64M$512M memd.max_order=13".into());
        }
        words.join(" ")
    }
}

/// `mem` bytes in QEMU's `-m` syntax.
pub(super) fn mem_arg(mem: u64) -> String {
    if mem.is_multiple_of(GIB) {
        format!("{}G", mem / GIB)
    } else {
        format!("{}M", mem / MIB)
    }
}

/// Every case, in the order they are started.
pub(super) fn matrix() -> Vec<Case> {
    let mut v = Vec::new();
    for machine in [Machine::Microvm, Machine::Q35] {
        for mem in [64 * MIB, GIB, 5 * GIB] {
            for dma_reserve in [None, Some(Reserve::Dma32)] {
                v.push(Case {
                    dma_reserve,
                    ..Case::new(machine, mem)
                });
            }
        }
    }
    v.push(Case {
        crash: Some("panic"),
        ..Case::new(Machine::Microvm, GIB)
    });
    v.push(Case {
        crash: Some("fault"),
        ..Case::new(Machine::Q35, GIB)
    });
    for machine in [Machine::Microvm, Machine::Q35] {
        v.push(Case {
            dma_reserve: Some(Reserve::Dma32),
            memmap: true,
            ..Case::new(machine, GIB)
        });
    }
    // No PIT: boot must not hang, and must say where the TSC rate came from.
    v.push(Case::new(Machine::MicrovmNoPit, GIB));
    for machine in [Machine::Microvm, Machine::Q35, Machine::MicrovmPcie] {
        v.push(Case {
            net: true,
            ..Case::new(machine, GIB)
        });
    }
    // A contiguous region above 4 GiB: the self-test's large buffer comes
    // from it under a 64-bit mask, and a 32-bit request is refused.
    v.push(Case {
        dma_reserve: Some(Reserve::Normal),
        ..Case::new(Machine::Microvm, 6 * GIB)
    });
    // Large DMA buffers through virtio-blk (see `dma_disk_check`).
    v.push(Case {
        dma_reserve: Some(Reserve::Dma32),
        net: true,
        ..Case::new(Machine::Microvm, GIB)
    });
    v
}

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
