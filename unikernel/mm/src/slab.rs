//! Slab caches (Linux's `kmem_cache`): fixed-size objects carved from
//! page blocks, with constructors, debug poisoning and red zones.
//!
//! Each cache keeps its slabs on partial / full / empty lists linked through
//! the frame table, and a per-CPU array of free objects in front of them
//! (the SLAB allocator's `array_cache`): the common alloc and free are a pop
//! and a push, and objects move to and from slabs in batches. Debug caches
//! (poison or red zone) bypass the array so that every free is checked.

use crate::access::{self, DirectMap};
use crate::frame::FrameState;
use crate::list::FrameList;
use crate::memblock::PAGE_SIZE;
use crate::sparse::Frames;

/// Longest cache name kept (longer names are cut at a character boundary).
pub const CACHE_NAME_LEN: usize = 32;
/// Objects held in a cache's per-CPU array.
pub const AC_LIMIT: usize = 120;
/// Objects moved between the array and the slabs at a time.
pub const AC_BATCH: usize = 60;
/// Largest object a cache may hold (order-5 slabs).
pub const MAX_OBJECT_SIZE: usize = 128 << 10;

/// Byte written over free objects of poisoned caches (Linux POISON_FREE).
pub const POISON_FREE: u8 = 0x6b;
/// Last byte of a poisoned object (Linux POISON_END).
pub const POISON_END: u8 = 0xa5;
/// Red zone of a free object.
pub const RED_INACTIVE: u8 = 0xbb;
/// Red zone of an allocated object.
pub const RED_ACTIVE: u8 = 0xcc;
const RED_ZONE_BYTES: usize = 8;
const NO_OBJECT: u16 = u16::MAX;

/// Constructor run once per object when a slab is populated, so objects
/// come out of the cache already initialised (and must go back that way).
pub type Ctor = fn(&mut [u8]);

/// Cache creation flags (`SLAB_*`). Shared with the protocol: memd-wire
/// re-exports it, so a decoded `SlabFlags` may hold any bits; whoever takes
/// one from outside passes it through [`SlabFlags::from_bits`].
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SlabFlags(pub u32);

impl SlabFlags {
    /// No flag.
    pub const NONE: SlabFlags = SlabFlags(0);
    /// Align objects to cache lines (64 bytes).
    pub const HWCACHE_ALIGN: SlabFlags = SlabFlags(1 << 0);
    /// Poison free objects to catch use after free.
    pub const POISON: SlabFlags = SlabFlags(1 << 1);
    /// Guard each object with a red zone to catch overruns and double frees.
    pub const RED_ZONE: SlabFlags = SlabFlags(1 << 2);
    const ALL: u32 = 0b111;
    /// Every flag, with its name.
    pub const NAMED: &'static [(&'static str, SlabFlags)] = &[
        ("HWCACHE_ALIGN", SlabFlags::HWCACHE_ALIGN),
        ("POISON", SlabFlags::POISON),
        ("RED_ZONE", SlabFlags::RED_ZONE),
    ];

    /// Flags from outside (the wire): `None` for unknown bits.
    pub const fn from_bits(bits: u32) -> Option<SlabFlags> {
        if bits & !Self::ALL != 0 {
            None
        } else {
            Some(SlabFlags(bits))
        }
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Parses `"HWCACHE_ALIGN|POISON"`: names of [`SlabFlags::NAMED`],
    /// case-insensitive, with or without `SLAB_`, `|` or `,` separated
    /// (`NONE` or nothing for none), or a number. `None` for an unknown
    /// name.
    pub fn parse(s: &str) -> Option<SlabFlags> {
        crate::flag_names::parse(s, Self::NAMED, SlabFlags::bits, "SLAB_", "NONE").map(SlabFlags)
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: SlabFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets' flags.
    pub const fn union(self, other: SlabFlags) -> SlabFlags {
        SlabFlags(self.0 | other.0)
    }

    /// Whether objects are checked on every free (poison or red zone).
    pub const fn is_debug(self) -> bool {
        self.0 & (Self::POISON.0 | Self::RED_ZONE.0) != 0
    }
}

/// Names `|` separated (`POISON|RED_ZONE`), unknown bits in hex, `NONE` for
/// none.
impl core::fmt::Display for SlabFlags {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        crate::flag_names::write(f, self.0, Self::NAMED, SlabFlags::bits, "NONE")
    }
}

impl core::fmt::Debug for SlabFlags {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

impl core::ops::BitOr for SlabFlags {
    type Output = SlabFlags;
    fn bitor(self, rhs: SlabFlags) -> SlabFlags {
        self.union(rhs)
    }
}

/// Handle of a slab cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheId(pub u16);

/// What the debug checks found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptionKind {
    /// A free object's poison was overwritten: someone wrote after free.
    UseAfterFree,
    /// An allocated object's red zone was overwritten: a write past its end.
    Overrun,
    /// The object was already free.
    DoubleFree,
}

/// One debug finding: which cache, which object, first bad byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Corruption {
    pub kind: CorruptionKind,
    pub cache: CacheId,
    pub object: usize,
    pub offset: usize,
}

/// Counters per cache (slabinfo's columns plus activity). Shared with the
/// protocol: memd-wire's `SlabInfo` carries it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct CacheCounters {
    /// Allocations.
    pub allocs: u64,
    /// Frees.
    pub frees: u64,
    /// Slabs added.
    pub grows: u64,
    /// Pages returned by shrinking.
    pub pages_shrunk: u64,
    /// Failed allocations.
    pub alloc_fail: u64,
    /// Corruptions found by the debug checks.
    pub corruptions: u64,
}

/// A cache's name, kept inline (at most [`CACHE_NAME_LEN`] bytes), so that
/// views of the cache need not borrow it.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheName {
    bytes: [u8; CACHE_NAME_LEN],
    len: u8,
}

impl CacheName {
    /// `name`, cut at a character boundary to fit.
    pub fn new(name: &str) -> CacheName {
        let mut n = name.len().min(CACHE_NAME_LEN);
        while !name.is_char_boundary(n) {
            n -= 1;
        }
        let mut bytes = [0; CACHE_NAME_LEN];
        bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        CacheName {
            bytes,
            len: n as u8,
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }
}

impl core::fmt::Display for CacheName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.pad(self.as_str())
    }
}

impl core::fmt::Debug for CacheName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self.as_str(), f)
    }
}

#[derive(Clone)]
pub(crate) struct ArrayCache {
    pub avail: usize,
    pub entry: [usize; AC_LIMIT],
}

#[derive(Clone)]
pub struct KmemCache {
    name: CacheName,
    pub object_size: usize,
    pub align: usize,
    /// Distance between objects in a slab (object + red zone + free pointer,
    /// aligned).
    pub stride: usize,
    /// `ceil(2^32 / stride)`: an object's index in its slab is
    /// `offset * stride_recip >> 32`, exact for offsets that are multiples of
    /// the stride (Linux's `obj_to_index` uses `reciprocal_divide` too). A
    /// division is a slow helper call under TCG, and this runs for every
    /// object returned to a slab.
    stride_recip: u64,
    pub flags: SlabFlags,
    pub ctor: Option<Ctor>,
    /// Where the free-list link lives inside a free object. 0 unless the
    /// object's bytes must survive while free (constructor, poison), as in
    /// SLUB.
    freeptr_offset: usize,
    pub order: u32,
    pub objs_per_slab: u32,
    pub partial: FrameList,
    pub full: FrameList,
    pub empty: FrameList,
    /// Objects handed out by slabs (including those parked in the array).
    pub slab_inuse: u64,
    pub(crate) ac: ArrayCache,
    pub counters: CacheCounters,
    /// True for kmalloc's caches, which cannot be destroyed.
    pub builtin: bool,
}

impl KmemCache {
    /// Computes the layout of a new cache.
    pub fn new(
        name: &str,
        size: usize,
        align: usize,
        flags: SlabFlags,
        ctor: Option<Ctor>,
        max_order: u32,
    ) -> Option<KmemCache> {
        if size == 0
            || size > MAX_OBJECT_SIZE
            || !align.is_power_of_two()
            || align > PAGE_SIZE as usize
        {
            return None;
        }
        // A constructor's work would be overwritten by poison (Linux refuses
        // the combination too).
        if ctor.is_some() && flags.contains(SlabFlags::POISON) {
            return None;
        }
        let mut align = align.max(8);
        if flags.contains(SlabFlags::HWCACHE_ALIGN) {
            align = align.max(64);
        }
        let mut offset = size.next_multiple_of(8);
        if flags.contains(SlabFlags::RED_ZONE) {
            offset += RED_ZONE_BYTES;
        }
        let outside = ctor.is_some() || flags.is_debug();
        let freeptr_offset = if outside {
            offset += 8;
            offset - 8
        } else {
            0
        };
        let stride = offset.next_multiple_of(align);
        let order = slab_order(stride, max_order)?;
        let objs = ((PAGE_SIZE as usize) << order) / stride;
        Some(KmemCache {
            name: CacheName::new(name),
            object_size: size,
            align,
            stride,
            stride_recip: (1u64 << 32).div_ceil(stride as u64),
            flags,
            ctor,
            freeptr_offset,
            order,
            objs_per_slab: objs as u32,
            partial: FrameList::new(),
            full: FrameList::new(),
            empty: FrameList::new(),
            slab_inuse: 0,
            ac: ArrayCache {
                avail: 0,
                entry: [0; AC_LIMIT],
            },
            counters: CacheCounters::default(),
            builtin: false,
        })
    }

    pub fn name(&self) -> &str {
        self.name.as_str()
    }

    /// The name, by value (for views that outlive the borrow).
    pub fn cache_name(&self) -> CacheName {
        self.name
    }

    pub fn slab_bytes(&self) -> usize {
        (PAGE_SIZE as usize) << self.order
    }

    pub fn nr_slabs(&self) -> u64 {
        (self.partial.len + self.full.len + self.empty.len) as u64
    }

    /// Objects the caller holds: handed out by slabs, minus those parked in
    /// the per-CPU array.
    pub fn active_objects(&self) -> u64 {
        self.slab_inuse - self.ac.avail as u64
    }

    pub fn uses_array(&self) -> bool {
        !self.flags.is_debug()
    }

    fn slab_base(&self, dmap: DirectMap, head: u32) -> usize {
        dmap.virt((head as u64) * PAGE_SIZE)
    }

    /// The index of the object at `offset` in its slab; `offset` is a
    /// multiple of the stride (the caller established the object is one).
    fn index_of(&self, offset: usize) -> u16 {
        debug_assert_eq!(offset % self.stride, 0);
        ((offset as u64 * self.stride_recip) >> 32) as u16
    }

    fn link_at(&self, obj: usize) -> usize {
        obj + self.freeptr_offset
    }

    /// Lays out a fresh slab at `head`: tail frames point back, objects are
    /// linked into its free list and constructed (poisoned, red-zoned).
    pub(crate) fn init_slab(
        &mut self,
        frames: &mut Frames,
        dmap: DirectMap,
        head: u32,
        id: CacheId,
    ) {
        for tail in 1..(1u32 << self.order) {
            let f = &mut frames[(head + tail) as usize];
            f.set(FrameState::SlabTail, frames_zone(head), 0);
            f.next = head;
        }
        let f = &mut frames[head as usize];
        f.count = 0;
        f.owner = id.0;
        f.aux = 0;
        let base = self.slab_base(dmap, head);
        let objs = self.objs_per_slab as usize;
        for i in 0..objs {
            let obj = base + i * self.stride;
            if let Some(ctor) = self.ctor {
                ctor(access::bytes_mut(obj, self.object_size));
            }
            self.debug_on_free(obj);
            let next = if i + 1 == objs {
                NO_OBJECT
            } else {
                (i + 1) as u16
            };
            access::write_link(self.link_at(obj), next as u64);
        }
        self.empty.push(frames, head);
        self.counters.grows += 1;
    }

    /// Takes one object from the slabs: partial ones first, then empty ones
    /// (Linux's `____cache_alloc` refill order).
    pub(crate) fn slab_take(&mut self, frames: &mut Frames, dmap: DirectMap) -> Option<usize> {
        let (head, from_empty) = if !self.partial.is_empty() {
            (self.partial.head, false)
        } else if !self.empty.is_empty() {
            (self.empty.head, true)
        } else {
            return None;
        };
        let base = self.slab_base(dmap, head);
        let f = &mut frames[head as usize];
        let idx = f.aux;
        debug_assert_ne!(idx, NO_OBJECT);
        let obj = base + idx as usize * self.stride;
        f.aux = access::read_link(self.link_at(obj)) as u16;
        f.count += 1;
        let now_full = f.count as u32 == self.objs_per_slab;
        if from_empty {
            self.empty.remove(frames, head);
            if now_full {
                self.full.push(frames, head);
            } else {
                self.partial.push(frames, head);
            }
        } else if now_full {
            self.partial.remove(frames, head);
            self.full.push(frames, head);
        }
        self.slab_inuse += 1;
        Some(obj)
    }

    /// Returns an object to its slab.
    pub(crate) fn slab_put(&mut self, frames: &mut Frames, dmap: DirectMap, obj: usize, head: u32) {
        let base = self.slab_base(dmap, head);
        let idx = self.index_of(obj - base);
        let f = &mut frames[head as usize];
        access::write_link(self.link_at(obj), f.aux as u64);
        f.aux = idx;
        let was_full = f.count as u32 == self.objs_per_slab;
        f.count -= 1;
        let now_empty = f.count == 0;
        if was_full {
            self.full.remove(frames, head);
            if now_empty {
                self.empty.push(frames, head);
            } else {
                self.partial.push(frames, head);
            }
        } else if now_empty {
            self.partial.remove(frames, head);
            self.empty.push(frames, head);
        }
        self.slab_inuse -= 1;
    }

    /// Finds the slab head of `obj` and checks that `obj` is an object
    /// boundary of this cache.
    pub(crate) fn owning_slab(
        &self,
        frames: &Frames,
        dmap: DirectMap,
        id: CacheId,
        obj: usize,
    ) -> Option<u32> {
        let head = slab_head(frames, dmap, obj)?;
        let f = &frames[head as usize];
        if f.owner != id.0 {
            return None;
        }
        let offset = obj.checked_sub(self.slab_base(dmap, head))?;
        if offset % self.stride != 0 || offset / self.stride >= self.objs_per_slab as usize {
            return None;
        }
        Some(head)
    }

    /// Debug work when an object becomes free: red zone to inactive, poison.
    fn debug_on_free(&self, obj: usize) {
        if self.flags.contains(SlabFlags::RED_ZONE) {
            let start = self.object_size;
            let end = self.object_size.next_multiple_of(8) + RED_ZONE_BYTES;
            access::fill(obj + start, end - start, RED_INACTIVE);
        }
        if self.flags.contains(SlabFlags::POISON) {
            let bytes = access::bytes_mut(obj, self.object_size);
            bytes.fill(POISON_FREE);
            bytes[self.object_size - 1] = POISON_END;
        }
    }

    fn red_zone(&self, obj: usize) -> &'static mut [u8] {
        let start = self.object_size;
        let end = self.object_size.next_multiple_of(8) + RED_ZONE_BYTES;
        access::bytes_mut(obj + start, end - start)
    }

    /// First byte of a free object whose poison is damaged.
    pub(crate) fn poison_damage(&self, obj: usize) -> Option<usize> {
        if !self.flags.contains(SlabFlags::POISON) {
            return None;
        }
        let bytes = access::bytes_mut(obj, self.object_size);
        let last = self.object_size - 1;
        bytes
            .iter()
            .enumerate()
            .position(|(i, &b)| b != if i == last { POISON_END } else { POISON_FREE })
    }

    /// Debug checks on allocation: poison intact (else a use after free is
    /// reported), red zone inactive; then marks the object active.
    pub(crate) fn debug_on_alloc(&mut self, id: CacheId, obj: usize) -> Option<Corruption> {
        let mut found = None;
        if let Some(offset) = self.poison_damage(obj) {
            found = Some(Corruption {
                kind: CorruptionKind::UseAfterFree,
                cache: id,
                object: obj,
                offset,
            });
        }
        if self.flags.contains(SlabFlags::RED_ZONE) {
            self.red_zone(obj).fill(RED_ACTIVE);
        }
        if found.is_some() {
            self.counters.corruptions += 1;
        }
        found
    }

    /// Debug checks on free. A double free is refused; an overrun is
    /// reported but the object is still released.
    pub(crate) fn debug_check_free(&mut self, id: CacheId, obj: usize) -> Result<(), Corruption> {
        if !self.flags.contains(SlabFlags::RED_ZONE) {
            return Ok(());
        }
        let zone = self.red_zone(obj);
        let report = |kind, offset| Corruption {
            kind,
            cache: id,
            object: obj,
            offset,
        };
        if zone.iter().all(|&b| b == RED_INACTIVE) {
            return Err(report(CorruptionKind::DoubleFree, 0));
        }
        if let Some(i) = zone.iter().position(|&b| b != RED_ACTIVE) {
            return Err(report(CorruptionKind::Overrun, self.object_size + i));
        }
        Ok(())
    }

    pub(crate) fn debug_release(&self, obj: usize) {
        self.debug_on_free(obj);
    }

    /// The first free object on the given slab lists whose poison is
    /// damaged (destroy and validate scan with this).
    pub(crate) fn first_poison_damage(
        &self,
        frames: &Frames,
        dmap: DirectMap,
        id: CacheId,
        lists: &[FrameList],
    ) -> Option<Corruption> {
        let mut damage = None;
        for list in lists {
            for head in list.iter(frames) {
                self.for_each_free_object(frames, dmap, head, |obj| {
                    if damage.is_none() {
                        damage = self.poison_damage(obj).map(|offset| Corruption {
                            kind: CorruptionKind::UseAfterFree,
                            cache: id,
                            object: obj,
                            offset,
                        });
                    }
                });
            }
        }
        damage
    }

    /// Every object index on a slab's free list (for checks and destroy).
    pub(crate) fn for_each_free_object(
        &self,
        frames: &Frames,
        dmap: DirectMap,
        head: u32,
        mut f: impl FnMut(usize),
    ) -> usize {
        let base = self.slab_base(dmap, head);
        let mut idx = frames[head as usize].aux;
        let mut n = 0;
        while idx != NO_OBJECT && n <= self.objs_per_slab as usize {
            if idx as u32 >= self.objs_per_slab {
                return usize::MAX;
            }
            let obj = base + idx as usize * self.stride;
            f(obj);
            n += 1;
            idx = access::read_link(self.link_at(obj)) as u16;
        }
        n
    }
}

fn frames_zone(head: u32) -> crate::zone::ZoneType {
    crate::zone::ZoneType::of_pfn(head as u64)
}

/// The slab head frame of an address, if the address is in a slab.
pub(crate) fn slab_head(frames: &Frames, dmap: DirectMap, obj: usize) -> Option<u32> {
    let pfn = (dmap.phys(obj) / PAGE_SIZE) as usize;
    let f = frames.get(pfn)?;
    match f.state() {
        FrameState::Slab => Some(pfn as u32),
        FrameState::SlabTail => Some(f.next),
        _ => None,
    }
}

/// Smallest slab order that wastes at most 1/8 and holds at least 8
/// objects (then 4, then 1), up to order 3 for the first two; objects too
/// big for that get the smallest order that holds one.
fn slab_order(stride: usize, max_order: u32) -> Option<u32> {
    let page = PAGE_SIZE as usize;
    let limit = 5.min(max_order.saturating_sub(1));
    for (min_objs, top) in [(8, 3), (4, 3), (1, limit)] {
        for order in 0..=top.min(limit) {
            let bytes = page << order;
            if bytes / stride >= min_objs && bytes % stride <= bytes / 8 {
                return Some(order);
            }
        }
    }
    (0..=limit).find(|&order| (page << order) / stride >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn flags_parse_and_print() {
        assert_eq!(
            SlabFlags::parse("SLAB_HWCACHE_ALIGN|poison"),
            Some(SlabFlags::HWCACHE_ALIGN | SlabFlags::POISON)
        );
        assert_eq!(SlabFlags::parse("none"), Some(SlabFlags::NONE));
        assert_eq!(SlabFlags::parse("gfp_poison"), None);
        assert_eq!(
            (SlabFlags::POISON | SlabFlags(1 << 9)).to_string(),
            "POISON|0x200"
        );
        assert_eq!(SlabFlags::NONE.to_string(), "NONE");
    }

    #[test]
    fn cache_name_is_cut_at_a_character_boundary() {
        let long = "\u{e9}".repeat(CACHE_NAME_LEN);
        let n = CacheName::new(&long);
        assert_eq!(n.as_str(), &long[..CACHE_NAME_LEN]);
        assert_eq!(CacheName::new("dentry").to_string(), "dentry");
    }

    #[test]
    fn layout_puts_free_pointer_outside_when_contents_must_survive() {
        let plain = KmemCache::new("a", 24, 8, SlabFlags::NONE, None, 11).unwrap();
        assert_eq!((plain.stride, plain.freeptr_offset), (24, 0));
        fn ctor(b: &mut [u8]) {
            b.fill(1)
        }
        let c = KmemCache::new("b", 24, 8, SlabFlags::NONE, Some(ctor), 11).unwrap();
        assert_eq!((c.stride, c.freeptr_offset), (32, 24));
        let d = KmemCache::new(
            "c",
            20,
            8,
            SlabFlags::POISON | SlabFlags::RED_ZONE,
            None,
            11,
        )
        .unwrap();
        assert_eq!((d.stride, d.freeptr_offset), (40, 32));
        let h = KmemCache::new("d", 40, 8, SlabFlags::HWCACHE_ALIGN, None, 11).unwrap();
        assert_eq!(h.stride, 64);
    }

    #[test]
    fn reciprocal_index_is_exact_for_object_offsets() {
        for size in [8, 24, 40, 96, 100, 192, 700, 1000, 3000, 4096, 8192, 70_000] {
            let c = KmemCache::new("r", size, 8, SlabFlags::NONE, None, 11).unwrap();
            for idx in 0..c.objs_per_slab as usize {
                assert_eq!(
                    c.index_of(idx * c.stride) as usize,
                    idx,
                    "stride {}",
                    c.stride
                );
            }
        }
    }

    #[test]
    fn slab_orders_hold_enough_objects() {
        assert_eq!(slab_order(64, 11), Some(0));
        assert_eq!(slab_order(4096, 11), Some(3));
        assert_eq!(slab_order(8192, 11), Some(3));
        assert_eq!(slab_order(100 << 10, 11), Some(5));
        assert_eq!(slab_order(4096, 1), Some(0));
        assert!(KmemCache::new("big", MAX_OBJECT_SIZE + 1, 8, SlabFlags::NONE, None, 11).is_none());
        assert!(KmemCache::new("odd", 8, 3, SlabFlags::NONE, None, 11).is_none());
    }
}
