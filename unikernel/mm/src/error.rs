//! Errors of the memory manager. The service maps them to errno codes.

use crate::slab::Corruption;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmError {
    /// No memory satisfies the request (ENOMEM).
    NoMemory,
    /// Fault injection failed this allocation on purpose (ENOMEM).
    InjectedFault,
    /// The request is malformed: bad order, size, alignment, address (EINVAL).
    Invalid(&'static str),
    /// A cache or pool still has live objects (EBUSY).
    Busy { live: u64 },
    /// No such cache or pool (ENOENT).
    NotFound,
    /// Every id is taken (65 536 live caches, pools or owners), or a boot
    /// table (memblock's regions) is full (ENOSPC).
    TableFull,
    /// The object cannot be changed this way, e.g. destroying a kmalloc
    /// cache (EPERM).
    NotPermitted,
    /// A debug check found corruption (EFAULT).
    Corrupted(Corruption),
}

impl MmError {
    pub fn message(&self) -> &'static str {
        match self {
            MmError::NoMemory => "out of memory",
            MmError::InjectedFault => "allocation failed by fault injection",
            MmError::Invalid(why) => why,
            MmError::Busy { .. } => "objects still in use",
            MmError::NotFound => "no such cache or pool",
            MmError::TableFull => "every id of its kind is taken, or a boot table is full",
            MmError::NotPermitted => "operation not permitted on this object",
            MmError::Corrupted(c) => match c.kind {
                crate::slab::CorruptionKind::UseAfterFree => "poison overwritten: use after free",
                crate::slab::CorruptionKind::Overrun => "red zone overwritten: write past the end",
                crate::slab::CorruptionKind::DoubleFree => "double free",
            },
        }
    }
}

impl core::fmt::Display for MmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MmError::Busy { live } => write!(f, "{} ({live} live objects)", self.message()),
            MmError::Corrupted(c) => write!(
                f,
                "{} (cache {}, object {:#x}, byte {})",
                self.message(),
                c.cache.0,
                c.object,
                c.offset
            ),
            _ => f.write_str(self.message()),
        }
    }
}
