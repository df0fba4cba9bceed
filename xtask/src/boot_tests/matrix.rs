//! The cases of the boot test matrix and the kernel command line each
//! boots with.

use super::{GIB, MIB};
use crate::qemu::Machine;

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
    /// A virtio-mem device with a region of this many bytes (q35).
    pub hotplug: Option<u64>,
    /// Virtual CPUs.
    pub smp: u32,
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
            hotplug: None,
            smp: 1,
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
            + &self
                .hotplug
                .map(|b| format!("-hotplug{}", mem_arg(b)))
                .unwrap_or_default()
            + &match self.smp {
                1 => String::new(),
                n => format!("-smp{n}"),
            }
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
    // The control plane, also with a second CPU (a stress run on both).
    for smp in [1, 2] {
        for machine in [Machine::Microvm, Machine::Q35, Machine::MicrovmPcie] {
            v.push(Case {
                net: true,
                smp,
                ..Case::new(machine, GIB)
            });
        }
    }
    // A contiguous region above 4 GiB: the self-test's large buffer comes
    // from it under a 64-bit mask, and a 32-bit request is refused.
    v.push(Case {
        dma_reserve: Some(Reserve::Normal),
        ..Case::new(Machine::Microvm, 6 * GIB)
    });
    // Memory plugged and unplugged at run time (see `hotplug_check`).
    v.push(Case {
        net: true,
        hotplug: Some(4 * GIB),
        ..Case::new(Machine::Q35, GIB)
    });
    // Large DMA buffers through virtio-blk (see `dma_disk_check`).
    v.push(Case {
        dma_reserve: Some(Reserve::Dma32),
        net: true,
        ..Case::new(Machine::Microvm, GIB)
    });
    v
}
