//! Owners: who holds which pages.
//!
//! Every page block handed out by `alloc_pages` is stamped with the
//! manager's current owner (the service sets it to the client it is
//! serving), so usage can be reported per client, like a memory cgroup's
//! page counter.
//!
//! Owner ids come from [`MemoryManager::owner_alloc`] and go back with
//! [`MemoryManager::owner_free`]. An id is handed out again only once it is
//! free and charged nothing, so a page's owner tag always names the one
//! owner that took it, however many owners come and go. The charges live in
//! a table memd-mm allocates from itself, doubling when every id is taken
//! and halving back as ids free up; ids are 16 bits wide, as in the frame.

use crate::MmError;

/// Ids of the smallest table: a page of entries.
const OWNERS_MIN: usize = 256;
/// Ids are 16 bits wide.
const OWNERS_MAX: usize = 1 << 16;

/// An owner tag. 0 is the kernel itself, 1 the balloon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(pub u16);

impl Owner {
    pub const KERNEL: Owner = Owner(0);
    /// Pages in the balloon: the host's until it gives them back.
    pub const BALLOON: Owner = Owner(1);
}

/// One id's entry.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct OwnerSlot {
    /// Pages charged.
    pub pages: u64,
    /// Handed out and not yet freed.
    pub live: bool,
}

pub(crate) struct OwnerTable {
    pub current: Owner,
    pub slots: &'static mut [OwnerSlot],
}

impl OwnerTable {
    pub const fn new() -> Self {
        OwnerTable {
            current: Owner::KERNEL,
            slots: &mut [],
        }
    }

    /// `owner` is a live id (`set_owner` checks) or one a frame carries,
    /// which stays in the table while it is charged.
    #[inline(always)]
    pub fn charge(&mut self, owner: u16, pages: u64) {
        debug_assert!((owner as usize) < self.slots.len());
        if let Some(s) = self.slots.get_mut(owner as usize) {
            s.pages += pages;
        }
    }

    #[inline(always)]
    pub fn uncharge(&mut self, owner: u16, pages: u64) {
        debug_assert!((owner as usize) < self.slots.len());
        if let Some(s) = self.slots.get_mut(owner as usize) {
            s.pages -= pages;
        }
    }

    /// Whether `owner` may be charged for new pages: the kernel, or an id
    /// handed out and not yet freed.
    pub fn is_live(&self, owner: Owner) -> bool {
        owner == Owner::KERNEL || self.slots.get(owner.0 as usize).is_some_and(|s| s.live)
    }

    /// `owner` when it is live, else the kernel: whom a request made for
    /// `owner` is charged to (`set_owner`'s rule).
    pub fn live_or_kernel(&self, owner: Owner) -> Owner {
        match self.is_live(owner) {
            true => owner,
            false => Owner::KERNEL,
        }
    }

    /// Pages charged to every owner together.
    pub fn charged(&self) -> u64 {
        self.slots.iter().map(|s| s.pages).sum()
    }

    /// One past the highest id live or charged.
    fn used_end(&self) -> usize {
        self.slots
            .iter()
            .rposition(|s| s.live || s.pages > 0)
            .map_or(0, |i| i + 1)
    }
}

impl crate::MemoryManager {
    /// The owner table at boot: the kernel's and the balloon's ids.
    pub(crate) fn owners_init(&mut self) -> Result<(), MmError> {
        let slots = self.table_alloc(OWNERS_MIN, OwnerSlot::default)?;
        slots[Owner::KERNEL.0 as usize].live = true;
        slots[Owner::BALLOON.0 as usize].live = true;
        self.owners.slots = slots;
        Ok(())
    }

    /// A new owner id: the lowest that is free and charged nothing, the
    /// table doubling when there is none. `TableFull` only when all 65 536
    /// ids are live or still charged.
    pub fn owner_alloc(&mut self) -> Result<Owner, MmError> {
        let free = |s: &OwnerSlot| !s.live && s.pages == 0;
        let id = match self.owners.slots.iter().position(free) {
            Some(id) => id,
            None => {
                let cap = self.owners.slots.len();
                if cap >= OWNERS_MAX {
                    return Err(MmError::TableFull);
                }
                let slots = self.table_alloc((cap * 2).min(OWNERS_MAX), OwnerSlot::default)?;
                slots[..cap].copy_from_slice(self.owners.slots);
                let old = core::mem::replace(&mut self.owners.slots, slots);
                self.table_free(old);
                cap
            }
        };
        self.owners.slots[id].live = true;
        Ok(Owner(id as u16))
    }

    /// Gives `owner` back. Its id is handed out again once the pages
    /// charged to it are freed. The kernel's and the balloon's ids are
    /// never freed.
    pub fn owner_free(&mut self, owner: Owner) -> Result<(), MmError> {
        if owner == Owner::KERNEL || owner == Owner::BALLOON {
            return Err(MmError::NotPermitted);
        }
        match self.owners.slots.get_mut(owner.0 as usize) {
            Some(s) if s.live => s.live = false,
            _ => return Err(MmError::Invalid("owner id is not live")),
        }
        if self.owners.current == owner {
            self.owners.current = Owner::KERNEL;
        }
        self.owners_shrink();
        Ok(())
    }

    /// Halves the table while the ids in use fit in a quarter of it (best
    /// effort, as for the id tables). Runs when an owner is freed; a caller
    /// that frees the last pages of an owner freed before (a buffer a device
    /// held past its client) runs it too.
    pub fn owners_shrink(&mut self) {
        let cap = self.owners.slots.len();
        let Some(want) = crate::idr::shrunk_len(self.owners.used_end(), cap, OWNERS_MIN) else {
            return;
        };
        let Ok(slots) = self.table_alloc(want, OwnerSlot::default) else {
            return;
        };
        slots.copy_from_slice(&self.owners.slots[..want]);
        let old = core::mem::replace(&mut self.owners.slots, slots);
        self.table_free(old);
    }

    /// Sets the owner stamped on subsequent page allocations: a live id.
    pub fn set_owner(&mut self, owner: Owner) -> Result<(), MmError> {
        match self.owners.is_live(owner) {
            true => {
                self.owners.current = owner;
                Ok(())
            }
            false => Err(MmError::Invalid("owner id is not live")),
        }
    }

    pub fn owner(&self) -> Owner {
        self.owners.current
    }

    /// Runs `f` with what it allocates stamped `owner` (any id, the
    /// kernel's and the balloon's too), then puts the current owner back.
    pub(crate) fn with_owner<T>(&mut self, owner: Owner, f: impl FnOnce(&mut Self) -> T) -> T {
        let was = core::mem::replace(&mut self.owners.current, owner);
        let r = f(self);
        self.owners.current = was;
        r
    }

    /// Pages currently charged to `owner`.
    pub fn owner_pages(&self, owner: Owner) -> u64 {
        self.owners
            .slots
            .get(owner.0 as usize)
            .map_or(0, |s| s.pages)
    }

    /// Owner ids the table has room for now.
    pub fn owner_capacity(&self) -> usize {
        self.owners.slots.len()
    }
}
