//! Where caches come from (Linux's `mm/slab_common.c`): the cache of
//! caches, boot-strapped the way Linux's `kmem_cache_init` does it, and the
//! registration of every other cache as an object of it.
//!
//! A cache's descriptor (`KmemCache`, about 1 KiB) is an object of the
//! `kmem_cache` cache, so a manager holds as many caches as memory allows,
//! and destroying one gives its memory back. The cache of caches cannot
//! hold its own descriptor before it exists: it starts in a block of its
//! own, allocates one of its objects and moves there, as Linux's
//! `bootstrap()` moves `boot_kmem_cache`. Mempool descriptors come from a
//! second cache of memd-mm's own, `mempool_t`.

use core::alloc::Layout;

use crate::gfp::Gfp;
use crate::idr::Idr;
use crate::kmalloc::NR_KMALLOC;
use crate::slab::{CacheId, KmemCache, SlabFlags};
use crate::{access, MemoryManager, MmError};

/// The cache of caches: the id after kmalloc's, so that a kmalloc size
/// class is its cache's id.
pub(crate) const KMEM_CACHE: CacheId = CacheId(NR_KMALLOC as u16);
/// Mempool descriptors: a cache of their own rather than kmalloc's, so
/// that `kfree` cannot reach them.
pub(crate) const MEMPOOL_CACHE: CacheId = CacheId(NR_KMALLOC as u16 + 1);

/// Whether `id` is one of memd-mm's own caches, whose objects are its
/// structures: the public cache calls, pools and `bytes_of` refuse them.
#[inline(always)]
pub(crate) fn is_internal(id: CacheId) -> bool {
    id == KMEM_CACHE || id == MEMPOOL_CACHE
}

fn caches(mm: &mut MemoryManager) -> &mut Idr<KmemCache> {
    &mut mm.caches
}

impl MemoryManager {
    /// Creates the cache of caches in an object of its own, then kmalloc's
    /// caches.
    pub(crate) fn kmem_cache_init(&mut self) -> Result<(), MmError> {
        let boot = self.builtin_cache("kmem_cache", Layout::new::<KmemCache>())?;
        self.idr_reserve(caches)?;
        let first = self.table_block(Layout::new::<KmemCache>())?;
        let at = KMEM_CACHE.0 as usize;
        self.caches
            .insert(at, access::object(first.as_ptr() as usize, boot));
        let home = self.slab_alloc(KMEM_CACHE, Gfp::KERNEL)?;
        let boot = self.caches.remove(at).ok_or(MmError::NotFound)?;
        let moved = access::object(home.as_ptr() as usize, boot.clone());
        self.caches.insert(at, moved);
        self.table_free_block(first);
        self.create_kmalloc_caches()?;
        let pools = self.builtin_cache("mempool_t", Layout::new::<crate::Mempool>())?;
        if self.cache_register(pools)? != MEMPOOL_CACHE {
            return Err(MmError::Invalid(
                "the mempool cache must follow the cache of caches",
            ));
        }
        Ok(())
    }

    /// A cache of memd-mm's own (kmalloc's, the cache of caches,
    /// `mempool_t`): plain objects of `layout`, never destroyed.
    pub(crate) fn builtin_cache(&self, name: &str, layout: Layout) -> Result<KmemCache, MmError> {
        let mut cache = KmemCache::new(
            name,
            layout.size(),
            layout.align(),
            SlabFlags::NONE,
            None,
            self.max_order,
        )
        .ok_or(MmError::Invalid("built-in cache layout"))?;
        cache.builtin = true;
        Ok(cache)
    }

    /// Gives `cache` a descriptor from the cache of caches and the lowest
    /// free id.
    pub(crate) fn cache_register(&mut self, cache: KmemCache) -> Result<CacheId, MmError> {
        let id = self.idr_alloc_object(caches, KMEM_CACHE, cache)?;
        Ok(CacheId(id as u16))
    }

    /// Frees the descriptor of cache `id`, which holds no slabs any more.
    pub(crate) fn cache_unregister(&mut self, id: CacheId) {
        self.idr_free_object(caches, KMEM_CACHE, id.0 as usize);
    }
}
