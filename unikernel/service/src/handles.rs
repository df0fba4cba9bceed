//! A connection's handle table: slots in fixed-size chunks, each slot with
//! a generation, like a file descriptor table that never hands out the same
//! number twice.
//!
//! A handle packs the owning connection, the slot and the slot's
//! generation, so a lookup is two indexings and two compares (a map keyed
//! by handle costs hundreds of instructions per batched operation). A
//! handle from another connection or a freed one is refused, however
//! slots are reused. Chunks keep every allocation small: 65 536 slots in one array
//! would need a block larger than the buddy's largest.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// Slot index bits: the most handles one connection can hold at once.
const INDEX_BITS: u32 = 20;
/// Generation bits: a slot is reused this many times before a stale handle
/// to it could match again.
const GEN_BITS: u32 = 20;
/// Connection tag bits (the rest of the 64).
const TAG_BITS: u32 = 64 - INDEX_BITS - GEN_BITS;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
/// Slots per chunk.
const CHUNK: usize = 1024;

/// Most handles one table holds.
pub const MAX_HANDLES: u64 = 1 << INDEX_BITS;

struct Slot<T> {
    /// Generation of the slot's current (or next) handle; never 0, so no
    /// handle is 0.
    generation: u32,
    value: Option<T>,
}

/// Handles of one connection.
pub struct HandleTable<T> {
    chunks: Vec<Box<[Slot<T>]>>,
    /// Free slot indices, most recently freed last.
    free: Vec<u32>,
    len: usize,
    tag: u64,
}

impl<T> HandleTable<T> {
    /// An empty table whose handles carry `owner` (a connection id).
    pub fn new(owner: u64) -> Self {
        HandleTable {
            chunks: Vec::new(),
            free: Vec::new(),
            len: 0,
            tag: owner & TAG_MASK,
        }
    }

    /// Handles held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no handle is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn handle(&self, index: usize, generation: u32) -> u64 {
        (self.tag << (INDEX_BITS + GEN_BITS)) | ((generation as u64) << INDEX_BITS) | index as u64
    }

    /// The slot `handle` names, if it is this table's and current.
    fn locate(&self, handle: u64) -> Option<(usize, usize)> {
        if handle >> (INDEX_BITS + GEN_BITS) != self.tag {
            return None;
        }
        let index = (handle & INDEX_MASK) as usize;
        let (chunk, at) = (index / CHUNK, index % CHUNK);
        let slot = self.chunks.get(chunk)?.get(at)?;
        let current =
            slot.value.is_some() && slot.generation as u64 == (handle >> INDEX_BITS) & GEN_MASK;
        current.then_some((chunk, at))
    }

    /// Stores `value` under a new handle; gives it back when the table is
    /// full ([`MAX_HANDLES`]).
    pub fn insert(&mut self, value: T) -> Result<u64, T> {
        if self.free.is_empty() && !self.grow() {
            return Err(value);
        }
        self.insert_reserved(value)
    }

    /// [`HandleTable::insert`] into a slot already free: never allocates,
    /// so it may run under the memory manager's lock. Gives `value` back
    /// when no slot is free.
    pub fn insert_reserved(&mut self, value: T) -> Result<u64, T> {
        let Some(index) = self.free.pop() else {
            return Err(value);
        };
        let index = index as usize;
        let slot = &mut self.chunks[index / CHUNK][index % CHUNK];
        slot.value = Some(value);
        let generation = slot.generation;
        self.len += 1;
        Ok(self.handle(index, generation))
    }

    /// Adds a chunk of free slots; false when the table is at
    /// [`MAX_HANDLES`].
    fn grow(&mut self) -> bool {
        let index = self.chunks.len() * CHUNK;
        if index as u64 >= MAX_HANDLES {
            return false;
        }
        let chunk: Box<[Slot<T>]> = (0..CHUNK)
            .map(|_| Slot {
                generation: 1,
                value: None,
            })
            .collect();
        self.chunks.push(chunk);
        // Hand out the new chunk's slots lowest first.
        self.free
            .extend((index..index + CHUNK).rev().map(|i| i as u32));
        true
    }

    /// Allocates now what the first of `inserts` insertions and `removes`
    /// removals would, so that [`HandleTable::insert_reserved`] and
    /// [`HandleTable::remove`] can then run without touching the heap:
    /// a chunk when no slot is free (as `insert` would add it, so handles
    /// come out as they would one by one), and room in the free list.
    pub fn reserve(&mut self, inserts: usize, removes: usize) {
        if inserts > 0 && self.free.is_empty() {
            self.grow();
        }
        self.free.reserve(removes);
    }

    /// Slots free for [`HandleTable::insert_reserved`].
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Removals that can happen before one has to grow the free list.
    pub fn removes_without_growing(&self) -> usize {
        self.free.capacity() - self.free.len()
    }

    /// The value `handle` names, if it is this table's and still held.
    pub fn get(&self, handle: u64) -> Option<&T> {
        let (chunk, at) = self.locate(handle)?;
        self.chunks[chunk][at].value.as_ref()
    }

    /// [`HandleTable::get`], mutable.
    pub fn get_mut(&mut self, handle: u64) -> Option<&mut T> {
        let (chunk, at) = self.locate(handle)?;
        self.chunks[chunk][at].value.as_mut()
    }

    /// Takes the value out; the handle is dead from now on.
    pub fn remove(&mut self, handle: u64) -> Option<T> {
        let (chunk, at) = self.locate(handle)?;
        let slot = &mut self.chunks[chunk][at];
        let value = slot.value.take()?;
        slot.generation = match (slot.generation as u64 + 1) & GEN_MASK {
            0 => 1,
            g => g as u32,
        };
        self.free.push((chunk * CHUNK + at) as u32);
        self.len -= 1;
        Some(value)
    }

    /// Every (handle, value), in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .enumerate()
            .filter_map(|(i, s)| s.value.as_ref().map(|v| (self.handle(i, s.generation), v)))
    }

    /// Every value, in slot order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.iter().map(|(_, v)| v)
    }

    /// The table's values, to be taken out a few at a time: each chunk's
    /// memory goes back as soon as it is empty.
    pub fn drain(self) -> Drain<T> {
        Drain {
            chunks: self.chunks,
            at: 0,
            left: self.len,
        }
    }
}

/// [`HandleTable::drain`]: the values of a table nobody looks up any more,
/// last chunk first.
pub struct Drain<T> {
    chunks: Vec<Box<[Slot<T>]>>,
    /// Next slot to look at in the last chunk.
    at: usize,
    left: usize,
}

impl<T> Drain<T> {
    /// Values not taken yet.
    pub fn len(&self) -> usize {
        self.left
    }

    /// Whether every value was taken.
    pub fn is_empty(&self) -> bool {
        self.left == 0
    }
}

impl<T> Iterator for Drain<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        loop {
            let chunk = self.chunks.last_mut()?;
            while let Some(slot) = chunk.get_mut(self.at) {
                self.at += 1;
                if let Some(v) = slot.value.take() {
                    self.left -= 1;
                    return Some(v);
                }
            }
            self.chunks.pop();
            self.at = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_unique_and_die_when_removed() {
        let mut t = HandleTable::new(7);
        let a = t.insert("a").unwrap();
        let b = t.insert("b").unwrap();
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(t.get(a), Some(&"a"));
        assert_eq!(t.remove(a), Some("a"));
        assert_eq!(t.get(a), None, "a removed handle is dead");
        assert_eq!(t.remove(a), None, "double remove");
        let c = t.insert("c").unwrap();
        assert_ne!(c, a, "the reused slot has a new generation");
        assert_eq!(
            t.get(a),
            None,
            "the stale handle does not reach the new value"
        );
        assert_eq!(t.get(c), Some(&"c"));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn another_tables_handles_are_refused() {
        let mut mine = HandleTable::new(1);
        let mut theirs = HandleTable::new(2);
        let h = theirs.insert(5u32).unwrap();
        let own = mine.insert(6u32).unwrap();
        assert_eq!(h & INDEX_MASK, own & INDEX_MASK, "same slot in both");
        assert_eq!(mine.get(h), None);
        assert_eq!(mine.remove(h), None);
        assert_eq!(mine.get(own), Some(&6));
    }

    #[test]
    fn grows_by_chunks_and_iterates_everything() {
        let mut t = HandleTable::new(3);
        let handles: Vec<u64> = (0..3 * CHUNK as u32 + 5)
            .map(|v| t.insert(v).unwrap())
            .collect();
        assert_eq!(t.chunks.len(), 4);
        for (v, h) in handles.iter().enumerate() {
            assert_eq!(t.get(*h), Some(&(v as u32)));
        }
        for h in handles.iter().step_by(2) {
            t.remove(*h).unwrap();
        }
        let left: Vec<u32> = t.values().copied().collect();
        assert_eq!(left.len(), t.len());
        assert!(left.iter().all(|v| v % 2 == 1));
        let mut all: Vec<u32> = t.drain().collect();
        all.sort();
        assert_eq!(all, left);
    }

    #[test]
    fn generation_wraps_past_zero() {
        let mut t = HandleTable::new(0);
        let mut h = t.insert(()).unwrap();
        for _ in 0..GEN_MASK + 2 {
            t.remove(h).unwrap();
            h = t.insert(()).unwrap();
            assert_ne!(h, 0);
        }
    }

    #[test]
    fn reserved_inserts_and_removes_do_not_grow_anything() {
        let mut t = HandleTable::new(4);
        assert_eq!(t.insert_reserved(1u32), Err(1), "no slot yet");
        t.reserve(CHUNK + 3, 2 * CHUNK);
        let capacity = t.free.capacity();
        assert_eq!(t.free_slots(), CHUNK, "one chunk, as insert would add");
        let handles: Vec<u64> = (0..CHUNK as u32)
            .map(|v| t.insert_reserved(v).unwrap())
            .collect();
        assert_eq!(t.insert_reserved(9), Err(9), "reserved slots used up");
        assert!(t.removes_without_growing() >= handles.len());
        for h in &handles {
            t.remove(*h).unwrap();
        }
        assert_eq!(t.chunks.len(), 1);
        assert_eq!(t.free.capacity(), capacity, "the free list never grew");
    }

    #[test]
    fn reserving_hands_out_the_handles_one_by_one_insertion_would() {
        let (mut lazy, mut eager) = (HandleTable::new(5), HandleTable::new(5));
        let mut held = Vec::new();
        for v in 0..CHUNK as u32 + 300 {
            let h = lazy.insert(v).unwrap();
            assert_eq!(eager.insert(v), Ok(h));
            held.push(h);
        }
        // Free some old slots, then take more than are free.
        for h in held.iter().step_by(7) {
            lazy.remove(*h).unwrap();
            eager.remove(*h).unwrap();
        }
        for v in 0..2 * CHUNK as u32 {
            let want = lazy.insert(v).unwrap();
            if eager.free_slots() == 0 {
                eager.reserve(2 * CHUNK, 0);
            }
            assert_eq!(eager.insert_reserved(v), Ok(want), "insert {v}");
        }
    }

    #[test]
    fn drain_takes_every_value_once() {
        let mut t = HandleTable::new(3);
        let held: Vec<u64> = (0..2 * CHUNK as u32 + 5)
            .map(|v| t.insert(v).unwrap())
            .collect();
        for h in held.iter().step_by(3) {
            t.remove(*h).unwrap();
        }
        let want = t.len();
        let mut d = t.drain();
        let mut seen: Vec<u32> = d.by_ref().take(10).collect();
        assert_eq!(d.len(), want - 10);
        seen.extend(d.by_ref());
        assert!(d.is_empty());
        seen.sort_unstable();
        let expect: Vec<u32> = (0..2 * CHUNK as u32 + 5).filter(|v| v % 3 != 0).collect();
        assert_eq!(seen, expect);
    }
}
