//! Owner tags: who holds which pages.
//!
//! Every page block handed out by `alloc_pages` is stamped with the
//! manager's current owner (the service sets it to the client it is
//! serving), so usage can be reported per client, like a memory cgroup's
//! page counter.

pub const MAX_OWNERS: usize = 256;

/// An owner tag. 0 is the kernel itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(pub u16);

impl Owner {
    pub const KERNEL: Owner = Owner(0);
    /// Pages in the balloon: the host's until it gives them back.
    pub const BALLOON: Owner = Owner(MAX_OWNERS as u16 - 1);
}

pub(crate) struct OwnerTable {
    pub current: Owner,
    pub pages: [u64; MAX_OWNERS],
}

impl OwnerTable {
    pub const fn new() -> Self {
        OwnerTable {
            current: Owner::KERNEL,
            pages: [0; MAX_OWNERS],
        }
    }

    #[inline(always)]
    pub fn charge(&mut self, owner: u16, pages: u64) {
        self.pages[owner as usize % MAX_OWNERS] += pages;
    }

    #[inline(always)]
    pub fn uncharge(&mut self, owner: u16, pages: u64) {
        self.pages[owner as usize % MAX_OWNERS] -= pages;
    }
}

impl crate::MemoryManager {
    /// Sets the owner stamped on subsequent page allocations.
    pub fn set_owner(&mut self, owner: Owner) -> Result<(), crate::MmError> {
        if owner.0 as usize >= MAX_OWNERS {
            return Err(crate::MmError::Invalid("owner tag out of range"));
        }
        self.owners.current = owner;
        Ok(())
    }

    pub fn owner(&self) -> Owner {
        self.owners.current
    }

    /// Pages currently charged to `owner`.
    pub fn owner_pages(&self, owner: Owner) -> u64 {
        self.owners.pages[owner.0 as usize % MAX_OWNERS]
    }
}
