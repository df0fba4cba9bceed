//! Fault injection, like Linux's `fail_page_alloc` and `failslab`.
//!
//! Each attribute fails an allocation with a probability (percent), every
//! `interval`-th time, or both, at most `times` times (-1: no limit), so
//! error paths can be exercised on a running system.

use crate::Prandom;

/// One fault attribute (`/sys/kernel/debug/fail_*`): the rule as it
/// stands, with its counters. Shared with the protocol (memd-wire
/// re-exports it and reports both attributes in `FaultStatus`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FaultAttr {
    /// Percent chance that an eligible call fails (0..=100).
    pub probability: u8,
    /// Only every `interval`-th call is eligible (0 or 1: every call).
    pub interval: u32,
    /// Failures left; negative means unlimited.
    pub times: i64,
    /// Calls seen while enabled.
    pub calls: u64,
    /// Failures injected so far.
    pub injected: u64,
}

impl FaultAttr {
    /// An attribute that never fails anything.
    pub const fn disabled() -> Self {
        FaultAttr {
            probability: 0,
            interval: 0,
            times: 0,
            calls: 0,
            injected: 0,
        }
    }

    /// Whether the attribute may still fail a call.
    pub fn enabled(&self) -> bool {
        self.probability > 0 && self.times != 0
    }
}

/// Both attributes and the generator they draw from: the manager's fault
/// injection state.
/// The flags the hot paths read come first (`repr(C)`), on the manager's
/// second cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Faults {
    /// Cached `page.enabled() || slab.enabled()` for the hot paths.
    pub(crate) armed_page: bool,
    pub(crate) armed_slab: bool,
    pub page: FaultAttr,
    pub slab: FaultAttr,
    rng: Prandom,
}

impl Default for Faults {
    fn default() -> Self {
        Self::new()
    }
}

impl Faults {
    pub const fn new() -> Self {
        Faults {
            page: FaultAttr::disabled(),
            slab: FaultAttr::disabled(),
            armed_page: false,
            armed_slab: false,
            rng: Prandom::new(1),
        }
    }

    fn next_percent(&mut self) -> u8 {
        ((self.rng.next_u64() >> 32) % 100) as u8
    }

    fn should_fail(&mut self, slab: bool) -> bool {
        let roll = self.next_percent();
        let attr = if slab { &mut self.slab } else { &mut self.page };
        attr.calls += 1;
        if attr.interval > 1 && attr.calls % attr.interval as u64 != 0 {
            return false;
        }
        if roll >= attr.probability {
            return false;
        }
        if attr.times > 0 {
            attr.times -= 1;
        }
        attr.injected += 1;
        let still = attr.enabled();
        if slab {
            self.armed_slab = still;
        } else {
            self.armed_page = still;
        }
        true
    }

    #[inline(always)]
    pub(crate) fn fail_page(&mut self) -> bool {
        self.armed_page && self.should_fail(false)
    }

    #[inline(always)]
    pub(crate) fn fail_slab(&mut self) -> bool {
        self.armed_slab && self.should_fail(true)
    }
}

impl crate::MemoryManager {
    /// Configures `fail_page_alloc` (`slab == false`) or `failslab`.
    pub fn set_fault(
        &mut self,
        slab: bool,
        probability: u8,
        interval: u32,
        times: i64,
        seed: u64,
    ) -> Result<(), crate::MmError> {
        if probability > 100 {
            return Err(crate::MmError::Invalid("fault probability is a percentage"));
        }
        let attr = FaultAttr {
            probability,
            interval,
            times,
            calls: 0,
            injected: 0,
        };
        if seed != 0 {
            self.fault.rng = Prandom::new(seed);
        }
        if slab {
            self.fault.slab = attr;
            self.fault.armed_slab = attr.enabled();
        } else {
            self.fault.page = attr;
            self.fault.armed_page = attr.enabled();
        }
        Ok(())
    }

    pub fn faults(&self) -> (FaultAttr, FaultAttr) {
        (self.fault.page, self.fault.slab)
    }

    /// Runs `f` with both rules disarmed, neither consulting nor counting
    /// them. The global allocator (the kernel's own heap: connection state,
    /// socket buffers, reply frames) allocates through this, so injected
    /// faults land on the requests of clients, whose errors are reported,
    /// and never on the kernel itself, where a failed allocation is fatal.
    /// Linux's failslab restricts itself the same way with `cache-filter`.
    #[inline(always)]
    pub(crate) fn without_faults<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let (page, slab) = (self.fault.armed_page, self.fault.armed_slab);
        if !(page || slab) {
            return f(self);
        }
        self.fault.armed_page = false;
        self.fault.armed_slab = false;
        let r = f(self);
        self.fault.armed_page = page;
        self.fault.armed_slab = slab;
        r
    }
}
