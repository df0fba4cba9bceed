//! The service's connections by id, remembering the last one looked up.
//!
//! Every operation of a request names the same connection, and dispatch
//! looks it up about three times per operation (quota, handle table,
//! counters). A map search each time would be a tenth of a batched kmalloc
//! or kfree in guest instructions; with the last id remembered, a repeated
//! lookup is a compare and an index.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::Cell;

/// A connection's id (ids start at 1; 0 is never one).
pub type ConnId = u64;

/// Connections in slots, indexed by id. The slot vector is always exactly
/// as long as its highest live slot (grown by one, shrunk to fit when its
/// last slot empties), so the table holds no more memory after a crowd of
/// clients left than before it came: the load tests compare free memory to
/// the byte.
pub struct ConnTable<C> {
    slots: Vec<Option<C>>,
    /// Id to slot, in id order (for listings).
    index: BTreeMap<ConnId, usize>,
    /// The last (id, slot) looked up; id 0 when none.
    last: Cell<(ConnId, usize)>,
}

impl<C> Default for ConnTable<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> ConnTable<C> {
    pub fn new() -> Self {
        ConnTable {
            slots: Vec::new(),
            index: BTreeMap::new(),
            last: Cell::new((0, 0)),
        }
    }

    fn slot_of(&self, id: ConnId) -> Option<usize> {
        let (last, at) = self.last.get();
        if last == id && id != 0 {
            return Some(at);
        }
        let at = *self.index.get(&id)?;
        self.last.set((id, at));
        Some(at)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn get(&self, id: &ConnId) -> Option<&C> {
        self.slots[self.slot_of(*id)?].as_ref()
    }

    pub fn get_mut(&mut self, id: &ConnId) -> Option<&mut C> {
        let at = self.slot_of(*id)?;
        self.slots[at].as_mut()
    }

    /// Adds connection `id` (a new id: an existing one is replaced).
    pub fn insert(&mut self, id: ConnId, conn: C) {
        if let Some(at) = self.slot_of(id) {
            self.slots[at] = Some(conn);
            return;
        }
        // Connections come and go rarely: a scan for a free slot is fine.
        let at = match self.slots.iter().position(Option::is_none) {
            Some(at) => {
                self.slots[at] = Some(conn);
                at
            }
            None => {
                self.slots.reserve_exact(1);
                self.slots.push(Some(conn));
                self.slots.len() - 1
            }
        };
        self.index.insert(id, at);
    }

    pub fn remove(&mut self, id: &ConnId) -> Option<C> {
        let at = self.index.remove(id)?;
        if self.last.get().0 == *id {
            self.last.set((0, 0));
        }
        let conn = self.slots[at].take();
        if self.slots.last().is_some_and(Option::is_none) {
            while self.slots.last().is_some_and(Option::is_none) {
                self.slots.pop();
            }
            self.slots.shrink_to_fit();
        }
        conn
    }

    /// Every connection, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&ConnId, &C)> {
        self.index
            .iter()
            .filter_map(|(id, at)| self.slots[*at].as_ref().map(|c| (id, c)))
    }

    /// Every connection, in id order.
    pub fn values(&self) -> impl Iterator<Item = &C> {
        self.iter().map(|(_, c)| c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn lookups_follow_inserts_and_removes() {
        let mut t = ConnTable::new();
        t.insert(1, "a");
        t.insert(2, "b");
        assert_eq!(t.get(&1), Some(&"a"));
        assert_eq!(t.get(&1), Some(&"a"), "remembered");
        assert_eq!(t.get(&2), Some(&"b"));
        assert_eq!(t.remove(&2), Some("b"));
        assert_eq!(t.get(&2), None, "the remembered id is forgotten on removal");
        t.insert(3, "c");
        assert_eq!(t.get(&3), Some(&"c"), "the freed slot is reused");
        assert_eq!(t.get(&1), Some(&"a"));
        assert_eq!(t.get(&0), None);
        *t.get_mut(&1).unwrap() = "A";
        let all: Vec<_> = t.iter().map(|(id, c)| (*id, *c)).collect();
        assert_eq!(all, vec![(1, "A"), (3, "c")]);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn slots_shrink_back_when_a_crowd_leaves() {
        let mut t = ConnTable::new();
        t.insert(1, [0u8; 100]);
        t.remove(&1);
        t.insert(2, [0u8; 100]);
        let alone = t.slots.capacity();
        for id in 3..40 {
            t.insert(id, [0u8; 100]);
        }
        assert!(t.slots.capacity() > alone);
        for id in (3..40).rev() {
            t.remove(&id);
        }
        assert_eq!(
            t.slots.capacity(),
            alone,
            "back to what one connection needs"
        );
        assert!(t.get(&2).is_some());
    }
}
