//! The `kmem_cache_*` API on the memory manager: create, alloc, free,
//! shrink, destroy.

use crate::access::DirectMap;
use crate::frame::FrameState;
use crate::gfp::Gfp;
use crate::page_alloc::ZoneParts;
use crate::pageblock::Held;
use crate::slab::{self, CacheId, CorruptionKind, Ctor, KmemCache, SlabFlags, AC_BATCH, AC_LIMIT};
use crate::slab_common::is_internal;
use crate::sparse::Frames;
use crate::{MemoryManager, MmError};
use core::ptr::NonNull;

impl MemoryManager {
    /// `kmem_cache_create`: a cache of `size`-byte objects.
    pub fn cache_create(
        &mut self,
        name: &str,
        size: usize,
        align: usize,
        flags: SlabFlags,
        ctor: Option<Ctor>,
    ) -> Result<CacheId, MmError> {
        let cache = KmemCache::new(name, size, align, flags, ctor, self.max_order).ok_or(
            MmError::Invalid("cache: size must be 1..=128 KiB, align a power of two <= 4096, no constructor with poison"),
        )?;
        self.cache_register(cache)
    }

    pub fn cache(&self, id: CacheId) -> Option<&KmemCache> {
        self.caches.get(id.0 as usize)
    }

    fn cache_mut(&mut self, id: CacheId) -> Result<&mut KmemCache, MmError> {
        self.caches.get_mut(id.0 as usize).ok_or(MmError::NotFound)
    }

    /// `kmem_cache_alloc`. memd-mm's own caches (`slab_common.rs`) are
    /// refused: their objects are its structures.
    pub fn cache_alloc(&mut self, id: CacheId, gfp: Gfp) -> Result<NonNull<u8>, MmError> {
        if is_internal(id) {
            return Err(MmError::NotPermitted);
        }
        self.slab_alloc(id, gfp)
    }

    /// [`MemoryManager::cache_alloc`] for any cache, memd-mm's own included.
    #[inline(never)]
    pub(crate) fn slab_alloc(&mut self, id: CacheId, gfp: Gfp) -> Result<NonNull<u8>, MmError> {
        if self.fault.fail_slab() {
            self.cache_mut(id)?.counters.alloc_fail += 1;
            return Err(MmError::InjectedFault);
        }
        let cache = self.cache_mut(id)?;
        if cache.ac.avail > 0 {
            cache.ac.avail -= 1;
            cache.counters.allocs += 1;
            let obj = cache.ac.entry[cache.ac.avail];
            return Ok(self.finish_alloc(obj, gfp, id));
        }
        self.cache_alloc_refill(id, gfp)
    }

    #[inline(always)]
    fn finish_alloc(&mut self, obj: usize, gfp: Gfp, id: CacheId) -> NonNull<u8> {
        if gfp.zero() {
            let size = self.caches.get(id.0 as usize).map_or(0, |c| c.object_size);
            crate::access::fill(obj, size, 0);
        }
        // Objects live in managed memory, which never includes address 0.
        NonNull::new(obj as *mut u8).expect("slab object at address 0")
    }

    /// Slow path: refill the per-CPU array from the slabs, growing the
    /// cache when they are all full; debug caches take one object directly.
    #[cold]
    fn cache_alloc_refill(&mut self, id: CacheId, gfp: Gfp) -> Result<NonNull<u8>, MmError> {
        let want = if self.cache_mut(id)?.uses_array() {
            AC_BATCH
        } else {
            1
        };
        let mut got = 0;
        let mut last = 0;
        while got < want {
            let dmap = self.dmap;
            let cache = self
                .caches
                .get_mut(id.0 as usize)
                .ok_or(MmError::NotFound)?;
            match cache.slab_take(&mut self.frames, dmap) {
                Some(obj) => {
                    if want > 1 {
                        cache.ac.entry[cache.ac.avail] = obj;
                        cache.ac.avail += 1;
                    } else {
                        last = obj;
                    }
                    got += 1;
                }
                None if got > 0 => break,
                None => {
                    if let Err(e) = self.cache_grow(id, gfp) {
                        self.cache_mut(id)?.counters.alloc_fail += 1;
                        return Err(e);
                    }
                }
            }
        }
        let cache = self
            .caches
            .get_mut(id.0 as usize)
            .ok_or(MmError::NotFound)?;
        cache.counters.allocs += 1;
        if want > 1 {
            cache.ac.avail -= 1;
            last = cache.ac.entry[cache.ac.avail];
        } else if let Some(c) = cache.debug_on_alloc(id, last) {
            self.corruption_log.record(c);
        }
        Ok(self.finish_alloc(last, gfp, id))
    }

    /// Adds one slab to a cache (Linux's `cache_grow`).
    fn cache_grow(&mut self, id: CacheId, gfp: Gfp) -> Result<(), MmError> {
        let order = self.cache_mut(id)?.order;
        let pfn = self.alloc_frames(order, gfp.without(Gfp::ZERO).without(Gfp::MOVABLE))?;
        let z = self.frames[pfn as usize].zone() as usize;
        self.zone_parts(z).stamp_slab(pfn, order);
        let dmap = self.dmap;
        let cache = self.caches.get_mut(id.0 as usize).expect("checked above");
        cache.init_slab(&mut self.frames, dmap, pfn, id);
        Ok(())
    }

    /// `kmem_cache_free`. The pointer is checked to be an object of this
    /// cache; debug caches also check red zones (double free, overrun).
    /// memd-mm's own caches are refused, as by `cache_alloc`.
    pub fn cache_free(&mut self, id: CacheId, obj: NonNull<u8>) -> Result<(), MmError> {
        if is_internal(id) {
            return Err(MmError::NotPermitted);
        }
        self.slab_free(id, obj)
    }

    /// [`MemoryManager::cache_free`] for any cache, memd-mm's own included.
    #[inline]
    pub(crate) fn slab_free(&mut self, id: CacheId, obj: NonNull<u8>) -> Result<(), MmError> {
        let obj = obj.as_ptr() as usize;
        let dmap = self.dmap;
        let cache = self
            .caches
            .get_mut(id.0 as usize)
            .ok_or(MmError::NotFound)?;
        let head = cache
            .owning_slab(&self.frames, dmap, id, obj)
            .ok_or(MmError::Invalid("pointer is not an object of this cache"))?;
        if cache.uses_array() {
            self.free_to_array(id, obj);
            return Ok(());
        }
        let checked = cache.debug_check_free(id, obj);
        match checked {
            Err(c) if c.kind == CorruptionKind::DoubleFree => {
                cache.counters.corruptions += 1;
                self.corruption_log.record(c);
                return Err(MmError::Corrupted(c));
            }
            _ => {}
        }
        cache.counters.frees += 1;
        cache.debug_release(obj);
        cache.slab_put(&mut self.frames, dmap, obj, head);
        if let Err(c) = checked {
            cache.counters.corruptions += 1;
            self.corruption_log.record(c);
            return Err(MmError::Corrupted(c));
        }
        Ok(())
    }

    /// Pushes onto the per-CPU array, flushing a batch to the slabs when it
    /// is full. The caller has established that `obj` belongs to cache `id`.
    #[inline(always)]
    pub(crate) fn free_to_array(&mut self, id: CacheId, obj: usize) {
        let Some(cache) = self.caches.get_mut(id.0 as usize) else {
            return;
        };
        // `KmemCache::array_push` written out: through it, kmalloc-hot64
        // measured 3 % slower (BENCHMARKS.md, "The lock split").
        cache.counters.frees += 1;
        if cache.ac.avail < AC_LIMIT {
            cache.ac.entry[cache.ac.avail] = obj;
            cache.ac.avail += 1;
            return;
        }
        self.free_to_array_slow(id, obj);
    }

    #[inline(never)]
    fn free_to_array_slow(&mut self, id: CacheId, obj: usize) {
        self.flush_array(id.0 as usize, AC_BATCH);
        if let Some(cache) = self.caches.get_mut(id.0 as usize) {
            cache.ac.entry[cache.ac.avail] = obj;
            cache.ac.avail += 1;
        }
    }

    /// The allocation fast path: pop from the per-CPU array. `None` sends
    /// the caller to [`MemoryManager::cache_alloc`]'s full path.
    #[inline(always)]
    pub(crate) fn alloc_from_array(&mut self, index: usize) -> Option<NonNull<u8>> {
        let cache = self.caches.get_mut(index)?;
        let avail = cache.ac.avail.checked_sub(1)?;
        cache.ac.avail = avail;
        cache.counters.allocs += 1;
        NonNull::new(cache.ac.entry[avail] as *mut u8)
    }

    /// Returns the `count` oldest objects of a cache's array to their slabs.
    fn flush_array(&mut self, index: usize, count: usize) {
        if let Some(cache) = self.caches.get_mut(index) {
            cache.flush_array(&mut self.frames, self.dmap, count);
        }
    }

    /// `kmem_cache_shrink`: returns empty slabs to the page allocator.
    pub fn cache_shrink(&mut self, id: CacheId) -> Result<u64, MmError> {
        self.cache_mut(id)?;
        Ok(self.shrink_cache_index(id.0 as usize))
    }

    pub(crate) fn shrink_cache_index(&mut self, index: usize) -> u64 {
        let avail = self.caches.get(index).map_or(0, |c| c.ac.avail);
        self.flush_array(index, avail);
        let mut freed = 0;
        loop {
            let Some(cache) = self.caches.get_mut(index) else {
                return freed;
            };
            let order = cache.order;
            let Some(head) = cache.empty.pop(&mut self.frames) else {
                break;
            };
            cache.counters.pages_shrunk += 1 << order;
            self.release_slab(head, order);
            freed += 1 << order;
        }
        freed
    }

    fn release_slab(&mut self, head: u32, order: u32) {
        for tail in 1..(1u32 << order) {
            self.frames[(head + tail) as usize].clear();
        }
        let zone = self.frames[head as usize].zone();
        let f = &mut self.frames[head as usize];
        f.set(FrameState::Allocated, zone, order);
        f.count = 0;
        f.owner = 0;
        f.aux = 0;
        self.slab_pages[zone as usize] -= 1 << order;
        self.pageblocks.sub(head, Held::Slab, 1 << order);
        self.free_frames(head, order);
    }

    /// `kmem_cache_destroy`. Fails with `Busy { live }` while objects are
    /// allocated (where Linux's warns "Slab cache still has objects" and
    /// leaves the cache in place); the cache stays usable then. For
    /// poisoned caches every free object is checked first, and damage is
    /// reported after the cache is gone.
    pub fn cache_destroy(&mut self, id: CacheId) -> Result<(), MmError> {
        let cache = self.cache_mut(id)?;
        if cache.builtin {
            return Err(MmError::NotPermitted);
        }
        let avail = cache.ac.avail;
        self.flush_array(id.0 as usize, avail);
        let dmap = self.dmap;
        let cache = self
            .caches
            .get_mut(id.0 as usize)
            .ok_or(MmError::NotFound)?;
        if cache.slab_inuse > 0 {
            return Err(MmError::Busy {
                live: cache.slab_inuse,
            });
        }
        let damage = cache.first_poison_damage(&self.frames, dmap, id, &[cache.empty]);
        self.shrink_cache_index(id.0 as usize);
        self.cache_unregister(id);
        if let Some(c) = damage {
            self.corruption_log.record(c);
            return Err(MmError::Corrupted(c));
        }
        Ok(())
    }

    /// Scans a poisoned cache's free objects now (Linux's slab validate).
    pub fn cache_validate(&mut self, id: CacheId) -> Result<(), MmError> {
        let dmap = self.dmap;
        let cache = self.cache(id).ok_or(MmError::NotFound)?;
        let damage =
            cache.first_poison_damage(&self.frames, dmap, id, &[cache.partial, cache.empty]);
        match damage {
            Some(c) => {
                self.corruption_log.record(c);
                Err(MmError::Corrupted(c))
            }
            None => Ok(()),
        }
    }

    /// Iterates the live caches.
    pub fn caches(&self) -> impl Iterator<Item = (CacheId, &KmemCache)> {
        self.caches.iter().map(|(i, c)| (CacheId(i as u16), c))
    }
}

impl ZoneParts<'_> {
    /// Makes the block of `order` at `pfn`, just taken from this zone, a
    /// slab's, counted as one (the rest of Linux's `cache_grow` is
    /// `KmemCache::init_slab`, still under the zone's lock: it stamps the
    /// tail frames).
    pub(crate) fn stamp_slab(&mut self, pfn: u32, order: u32) {
        let pages = 1 << order;
        self.frames[pfn as usize].set_state(FrameState::Slab);
        *self.slab_pages += pages as u64;
        self.blocks.add(pfn, Held::Slab, pages);
    }
}

impl KmemCache {
    /// Up to `out.len()` objects, from the cache's array and then its
    /// slabs, `grow` adding a slab when they are full (false when it
    /// cannot), under the cache's lock alone (`node.rs`; Linux's
    /// `kmem_cache_alloc_bulk`); how many. A debug cache takes the whole
    /// manager's path instead: none.
    pub(crate) fn alloc_bulk(
        &mut self,
        frames: &mut Frames,
        dmap: DirectMap,
        out: &mut [usize],
        mut grow: impl FnMut(&mut KmemCache, &mut Frames) -> bool,
    ) -> usize {
        if !self.uses_array() {
            return 0;
        }
        let mut got = 0;
        while got < out.len() {
            let obj = match self.ac.avail.checked_sub(1) {
                Some(n) => {
                    self.ac.avail = n;
                    Some(self.ac.entry[n])
                }
                None => self.slab_take(frames, dmap),
            };
            match obj {
                Some(obj) => {
                    out[got] = obj;
                    got += 1;
                }
                None if grow(self, frames) => {}
                None => break,
            }
        }
        self.counters.allocs += got as u64;
        got
    }

    /// Gives objects of this cache back to its array (a batch going to the
    /// slabs when it is full), under the cache's lock alone (Linux's
    /// `kmem_cache_free_bulk`).
    pub(crate) fn free_bulk(&mut self, frames: &mut Frames, dmap: DirectMap, objs: &[usize]) {
        for &obj in objs {
            self.free_to_array(frames, dmap, obj);
        }
    }

    /// Keeps `obj`, an object of this cache, in its array; false when the
    /// array is full.
    #[inline(always)]
    fn array_push(&mut self, obj: usize) -> bool {
        if self.ac.avail == AC_LIMIT {
            return false;
        }
        self.counters.frees += 1;
        self.ac.entry[self.ac.avail] = obj;
        self.ac.avail += 1;
        true
    }

    /// Pushes onto the cache's array, flushing a batch to the slabs first
    /// when it is full; `obj` is an object of this cache.
    #[inline(always)]
    pub(crate) fn free_to_array(&mut self, frames: &mut Frames, dmap: DirectMap, obj: usize) {
        if !self.array_push(obj) {
            self.flush_array(frames, dmap, AC_BATCH);
            self.array_push(obj);
        }
    }

    /// Returns the `count` oldest objects of the array to their slabs.
    pub(crate) fn flush_array(&mut self, frames: &mut Frames, dmap: DirectMap, count: usize) {
        let count = count.min(self.ac.avail);
        for i in 0..count {
            let obj = self.ac.entry[i];
            if let Some(head) = slab::slab_head(frames, dmap, obj) {
                self.slab_put(frames, dmap, obj, head);
            }
        }
        self.ac.entry.copy_within(count..self.ac.avail, 0);
        self.ac.avail -= count;
    }
}
