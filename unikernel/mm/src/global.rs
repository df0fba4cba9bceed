//! `GlobalAlloc` over kmalloc, the buddy and vmalloc (Linux's `kvmalloc` /
//! `kvfree`), with per-CPU arrays of kmalloc objects and per-CPU page lists
//! in front of the manager when the environment says which CPU runs
//! ([`CpuIds`], `cpu_cache.rs`). Their batches take only their zone's or
//! cache's lock; the rest takes the whole manager (`node.rs`).
//!
//! The kernel's `#[global_allocator]` is this; so can a host program's be
//! (see the `arena` module), which is how memd-mm is benchmarked against
//! other allocators with ordinary Rust code. Only a manager built with
//! [`GlobalMm::with_vmalloc`] has vmalloc; without it (the host) large
//! requests are buddy blocks.

use crate::cpu_cache::{CpuArrays, CpuPages, PCP_MAX_ORDER};
use crate::gfp::Gfp;
use crate::kmalloc::{size_class, NR_KMALLOC};
use crate::node::{MmGuard, Node};
use crate::stats::{CpuStat, CpuStats};
use crate::vmalloc::VmapOps;
use crate::zone::NR_ZONES;
use crate::{BootInfo, DmaBuffer, DmaRequest, MmError, Owner};
use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{null_mut, NonNull};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Which CPU the caller runs on: the key to the per-CPU arrays.
///
/// # Safety
/// An implementation promises exclusive holding: while [`CpuIds::current`]
/// returns `Some(k)` to one thread (or CPU, with whatever keeps it from
/// being preempted by code that allocates), no other thread gets `k` from
/// `current` or [`CpuIds::try_hold`] until the holder stops allocating for
/// good (a thread's exit) or calls [`CpuIds::release`]; a hand-over
/// between holders is a release/acquire pair, so the next holder sees the
/// arrays as the last one left them.
pub unsafe trait CpuIds: Sync {
    /// The CPU the caller holds, if any (taking a free one on first use).
    fn current(&self) -> Option<usize>;
    /// Takes CPU `k` if no one holds it (to drain its arrays).
    fn try_hold(&self, k: usize) -> bool;
    /// Gives back a CPU taken with [`CpuIds::try_hold`].
    fn release(&self, k: usize);
    /// For environments that use the caches only on request: turns the
    /// caller's CPU's on, so that `current` names it until `leave`. The
    /// kernel does, so that the CPU running its network loop keeps exact
    /// counts outside work that asks for the caches. Nothing by default.
    fn enter(&self) {}
    /// Turns them off again (after [`GlobalMm::cpu_leave`] has emptied
    /// them). Nothing by default.
    fn leave(&self) {}
}

/// No CPUs: every request goes to the manager.
pub struct NoCpus;

// SAFETY: never hands out a CPU.
unsafe impl CpuIds for NoCpus {
    #[inline(always)]
    fn current(&self) -> Option<usize> {
        None
    }

    fn try_hold(&self, _: usize) -> bool {
        false
    }

    fn release(&self, _: usize) {}
}

/// One CPU's caches.
struct CpuCaches {
    arrays: CpuArrays,
    pages: CpuPages,
}

/// One CPU's caches, on cache lines of their own, and what readers on
/// other CPUs may see of them: the frames its page lists hold in each zone
/// and its hit and miss counters, written by the CPU alone.
#[repr(align(128))]
struct CpuSlot {
    caches: UnsafeCell<CpuCaches>,
    frames: [AtomicU32; NR_ZONES],
    pages: Counters,
    objects: [Counters; NR_KMALLOC],
}

/// One cache's hits and misses ([`CpuStat`]), counted by one CPU: a load
/// and a store, no locked instruction, as Linux's per-CPU event counters.
struct Counters([AtomicU64; 4]);

/// Which of [`Counters`].
#[derive(Clone, Copy)]
enum Event {
    AllocHit,
    AllocMiss,
    FreeHit,
    FreeMiss,
}

impl Counters {
    const fn new() -> Self {
        Counters([const { AtomicU64::new(0) }; 4])
    }

    /// Counts `e`; only the slot's CPU calls it.
    #[inline(always)]
    fn count(&self, e: Event) {
        let c = &self.0[e as usize];
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    fn read(&self) -> CpuStat {
        let r = |e: Event| self.0[e as usize].load(Ordering::Relaxed);
        CpuStat {
            allochit: r(Event::AllocHit),
            allocmiss: r(Event::AllocMiss),
            freehit: r(Event::FreeHit),
            freemiss: r(Event::FreeMiss),
        }
    }
}

impl CpuSlot {
    const fn new() -> Self {
        CpuSlot {
            caches: UnsafeCell::new(CpuCaches {
                arrays: CpuArrays::new(),
                pages: CpuPages::new(),
            }),
            frames: [const { AtomicU32::new(0) }; NR_ZONES],
            pages: Counters::new(),
            objects: [const { Counters::new() }; NR_KMALLOC],
        }
    }

    /// Publishes the frames the page lists hold.
    #[inline(always)]
    fn publish(&self, pages: &CpuPages) {
        for (f, n) in self.frames.iter().zip(pages.zone_frames()) {
            f.store(n, Ordering::Relaxed);
        }
    }
}

/// The caller's CPU, its kmalloc arrays, a size class and that class's
/// counters.
struct CpuArraysOf<'a> {
    cpu: usize,
    arrays: &'a mut CpuArrays,
    class: usize,
    counters: &'a Counters,
}

/// A page block from [`GlobalMm::alloc_pages`]: it frees only through
/// [`GlobalMm::free_pages`], once.
#[derive(Debug)]
#[must_use = "a page block frees only through GlobalMm::free_pages"]
pub struct PageBlock {
    phys: u64,
    order: u32,
    from: usize,
}

impl PageBlock {
    /// The block's physical address.
    pub fn phys(&self) -> u64 {
        self.phys
    }
}

/// An object from [`GlobalMm::kmalloc`]: it frees only through
/// [`GlobalMm::kfree`], once.
#[derive(Debug)]
#[must_use = "an object frees only through GlobalMm::kfree"]
pub struct KObj {
    ptr: NonNull<u8>,
    layout: Layout,
    from: usize,
}

// SAFETY: a `KObj` is the right to free one object, which any CPU may do;
// it gives no access to the object's bytes.
unsafe impl Send for KObj {}

/// What a drain gave back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// kmalloc objects from the per-CPU arrays.
    pub objects: usize,
    /// Page blocks from the per-CPU page lists.
    pub blocks: usize,
}

/// Requests larger than this (128 KiB, order 5) go straight to vmalloc:
/// the kernel's large buffers (reply frames, listings, tables) need only
/// contiguous addresses, not the contiguous frames that clients' DMA
/// buffers need and fragmentation destroys, and power-of-two rounding
/// would waste up to half such a block. Up to it, requests are kmalloc's
/// (a slab object or a buddy block), falling back to vmalloc when that
/// fails. The line sits just above the sockets' 128 KiB transmit buffers,
/// which live as long as their connection: kept in the buddy, they leave
/// the vmalloc window empty while memd is idle, so its bookkeeping (area
/// records, page tables) is back to nothing and free memory returns to
/// its baseline to the byte.
pub const VMALLOC_THRESHOLD: usize = 128 << 10;

/// memd-mm as a `GlobalAlloc`, with per-CPU arrays for `CPUS` CPUs as `I`
/// tells them apart (none by default).
pub struct GlobalMm<const CPUS: usize = 0, I: CpuIds = NoCpus> {
    /// The manager behind its node, zone and cache locks.
    node: Node,
    /// The architecture's page tables for vmalloc, if it has any.
    vmap: Option<&'static dyn VmapOps>,
    cpus: [CpuSlot; CPUS],
    /// Who runs where.
    ids: I,
}

// SAFETY: the manager is behind its lock; CPU `k`'s arrays are only touched
// by whoever holds `k` (`CpuIds`' contract), so no two threads reach one
// slot at once, and hand-overs are ordered by the implementation.
unsafe impl<const CPUS: usize, I: CpuIds> Sync for GlobalMm<CPUS, I> {}

impl Default for GlobalMm {
    fn default() -> Self {
        Self::new()
    }
}

impl GlobalMm {
    /// Without vmalloc and without per-CPU arrays.
    pub const fn new() -> Self {
        GlobalMm {
            node: Node::new(),
            vmap: None,
            cpus: [],
            ids: NoCpus,
        }
    }

    /// With vmalloc over `ops`' window: large requests, and requests
    /// kmalloc cannot serve, are mapped from order-0 frames.
    ///
    /// # Safety
    /// `ops.map_page` must make the frame it is given readable and
    /// writable at the address it is given until `unmap_page` removes it,
    /// and nothing but this allocator may use `ops.window()`: the memory
    /// vmalloc returns is only as real as those mappings.
    pub const unsafe fn with_vmalloc(ops: &'static dyn VmapOps) -> Self {
        GlobalMm {
            node: Node::new(),
            vmap: Some(ops),
            cpus: [],
            ids: NoCpus,
        }
    }
}

impl<const CPUS: usize, I: CpuIds> GlobalMm<CPUS, I> {
    /// Without vmalloc, with per-CPU arrays for the CPUs `ids` hands out
    /// (those below `CPUS`; others go to the manager every time).
    pub const fn with_cpus(ids: I) -> Self {
        GlobalMm {
            node: Node::new(),
            vmap: None,
            cpus: [const { CpuSlot::new() }; CPUS],
            ids,
        }
    }

    /// With vmalloc over `ops`' window (as [`GlobalMm::with_vmalloc`]) and
    /// per-CPU caches for the CPUs `ids` hands out.
    ///
    /// # Safety
    /// As for [`GlobalMm::with_vmalloc`].
    pub const unsafe fn with_vmalloc_cpus(ops: &'static dyn VmapOps, ids: I) -> Self {
        GlobalMm {
            node: Node::new(),
            vmap: Some(ops),
            cpus: [const { CpuSlot::new() }; CPUS],
            ids,
        }
    }

    /// The caller's CPU's slot, if it holds one.
    #[inline(always)]
    fn cpu_slot(&self) -> Option<(usize, &CpuSlot)> {
        if CPUS == 0 {
            return None;
        }
        let k = self.ids.current().filter(|&k| k < CPUS)?;
        Some((k, &self.cpus[k]))
    }

    /// The caller's CPU, its arrays and the kmalloc class of `layout`,
    /// when they exist.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    fn cpu_arrays(&self, layout: Layout) -> Option<CpuArraysOf<'_>> {
        if CPUS == 0 {
            return None;
        }
        let class = size_class(layout.size(), layout.align())?;
        let (cpu, slot) = self.cpu_slot()?;
        // SAFETY: the caller holds this CPU (`CpuIds`' contract), so no
        // one else touches its caches; the reference lives only within one
        // allocation or free, which never re-enters the allocator.
        let arrays = unsafe { &mut (*slot.caches.get()).arrays };
        Some(CpuArraysOf {
            cpu,
            arrays,
            class,
            counters: &slot.objects[class],
        })
    }

    /// `2^order` pages for the kernel: from the caller's CPU page list
    /// for orders up to [`PCP_MAX_ORDER`] (refilled with a batch under the
    /// zone's lock when empty), otherwise from the zone under its lock;
    /// from the whole manager when the zone is low. `None` when memory is
    /// short.
    pub fn alloc_pages(&self, order: u32) -> Option<PageBlock> {
        let cpu = self.cpu_slot();
        let phys = match cpu.filter(|_| order as usize <= PCP_MAX_ORDER) {
            Some((k, slot)) => {
                // SAFETY: as in `cpu_arrays`; the refill takes locks,
                // which never reaches back into these caches.
                let pages = unsafe { &mut (*slot.caches.get()).pages };
                slot.pages.count(match pages.held()[order as usize] {
                    0 => Event::AllocMiss,
                    _ => Event::AllocHit,
                });
                let got = pages.alloc(order as usize, |out| self.fill_pages(Some(k), order, out));
                slot.publish(pages);
                got?
            }
            None => {
                let mut one = [0];
                self.fill_pages(cpu.map(|c| c.0), order, &mut one)
                    .filter(|&n| n == 1)?;
                one[0]
            }
        };
        Some(PageBlock {
            phys,
            order,
            from: self.brand(),
        })
    }

    /// Frees a block [`GlobalMm::alloc_pages`] returned: to the caller's
    /// CPU page list (a batch going back under the zones' locks when it is
    /// full), or to its zone under the zone's lock.
    ///
    /// # Panics
    /// When `block` came from another allocator.
    pub fn free_pages(&self, block: PageBlock) {
        assert_eq!(block.from, self.brand(), "a block of another allocator");
        let PageBlock { phys, order, .. } = block;
        let cpu = self.cpu_slot();
        if let Some((k, slot)) = cpu.filter(|_| order as usize <= PCP_MAX_ORDER) {
            // SAFETY: as in `alloc_pages`.
            let pages = unsafe { &mut (*slot.caches.get()).pages };
            let gave = pages.free(phys, order as usize, |blocks| {
                self.give_pages(Some(k), order, blocks)
            });
            slot.pages.count(match gave {
                true => Event::FreeMiss,
                false => Event::FreeHit,
            });
            slot.publish(pages);
            return;
        }
        let freed = self.give_pages(cpu.map(|c| c.0), order, &[phys]);
        debug_assert!(freed.is_ok(), "free_pages({phys:#x}, {order}): {freed:?}");
    }

    /// Fills `out` with the kernel's page blocks of `order`: from the zone
    /// under its lock, else from the whole manager; how many (`None`
    /// before the manager is initialised).
    fn fill_pages(&self, cpu: Option<usize>, order: u32, out: &mut [u64]) -> Option<usize> {
        match self.node.rmqueue_bulk(cpu, order, out) {
            0 => {
                let mut mm = self.node.lock();
                mm.is_initialized().then(|| mm.alloc_pages_bulk(order, out))
            }
            got => Some(got),
        }
    }

    /// Gives the kernel's page blocks of `order` back: to their zones
    /// under their locks, else to the whole manager; the first refusal.
    fn give_pages(&self, cpu: Option<usize>, order: u32, blocks: &[u64]) -> Result<(), MmError> {
        self.node
            .free_pcppages_bulk(cpu, order, blocks)
            .unwrap_or_else(|| self.node.lock().free_pages_bulk(order, blocks))
    }

    /// The DMA buffer `req` asks for (the rules of
    /// [`MemoryManager::dma_alloc_zeroed`]), charged to `owner` when it is
    /// live, else to the kernel: a buddy block under its zone's lock or a
    /// range of the contiguous region under the DMA lock, else from the
    /// whole manager; zeroed, when asked, outside every lock.
    ///
    /// [`MemoryManager::dma_alloc_zeroed`]: crate::MemoryManager::dma_alloc_zeroed
    pub fn dma_alloc(&self, req: DmaRequest, owner: Owner) -> Result<DmaBuffer, MmError> {
        let cpu = self.cpu_slot().map(|c| c.0);
        let buf = match self.node.dma_alloc(cpu, &req, owner) {
            Some(got) => got,
            None => {
                let mut mm = self.node.lock();
                let owner = mm.owners.live_or_kernel(owner);
                mm.with_owner(owner, |mm| {
                    mm.dma_alloc_unzeroed(req.len, req.align, req.mask, req.movable)
                })
            }
        }?;
        if req.zeroed {
            crate::access::fill(buf.virt, buf.span(), 0);
        }
        Ok(buf)
    }

    /// Frees a buffer from [`GlobalMm::dma_alloc`] (or the manager's own
    /// `dma_alloc`): a block under the zones' locks, a range under the DMA
    /// lock, else under the whole manager. What the manager does not hold
    /// out as a DMA buffer or page block is refused, as its `dma_free`
    /// refuses it.
    pub fn dma_free(&self, buf: &DmaBuffer) -> Result<(), MmError> {
        let cpu = self.cpu_slot().map(|c| c.0);
        match self.node.dma_free(cpu, buf) {
            Some(freed) => freed,
            None => self.node.lock().dma_free(buf),
        }
    }

    /// `size` bytes (at least 1, 8-byte aligned) from kmalloc with
    /// `GFP_KERNEL`, through the caller's CPU arrays: unlike the heap's own
    /// requests it stops at the `min` watermark and never falls back to
    /// vmalloc.
    pub fn kmalloc(&self, size: usize) -> Option<KObj> {
        let layout = Layout::from_size_align(size.max(1), 8).ok()?;
        let ptr = match self.cpu_alloc(layout, Gfp::KERNEL) {
            Some(p) => p,
            None => {
                let mut mm = self.node.lock();
                if !mm.is_initialized() {
                    return None;
                }
                mm.kmalloc_layout(layout, Gfp::KERNEL).ok()?.as_ptr()
            }
        };
        let ptr = NonNull::new(ptr)?;
        Some(KObj {
            ptr,
            layout,
            from: self.brand(),
        })
    }

    /// Frees an object [`GlobalMm::kmalloc`] returned.
    ///
    /// # Panics
    /// When `obj` came from another allocator.
    pub fn kfree(&self, obj: KObj) {
        assert_eq!(obj.from, self.brand(), "an object of another allocator");
        // SAFETY: `obj` is this allocator's, allocated with `obj.layout`,
        // and is consumed here, so it is freed once.
        unsafe { self.dealloc(obj.ptr.as_ptr(), obj.layout) };
    }

    /// What tells this allocator's blocks and objects from others'.
    fn brand(&self) -> usize {
        self as *const Self as usize
    }

    /// Turns the caller's CPU caches on for the calls that follow, where
    /// the environment uses them only on request ([`CpuIds::enter`]).
    pub fn cpu_enter(&self) {
        self.ids.enter();
    }

    /// Turns the caller's CPU caches off again, keeping what they hold
    /// ([`CpuIds::leave`]).
    pub fn cpu_pause(&self) {
        self.ids.leave();
    }

    /// Gives back what the caller's CPU caches hold and turns them off
    /// again ([`CpuIds::leave`]); what was given back.
    pub fn cpu_leave(&self) -> Drained {
        let drained = match self.cpu_slot() {
            Some((_, slot)) => self.drain_slot(slot),
            None => Drained::default(),
        };
        self.ids.leave();
        drained
    }

    /// Frames each CPU's page lists hold now in each zone (the per-CPU
    /// pagesets' `count`), as last published by the CPU itself.
    pub fn cpu_pagesets(&self) -> impl Iterator<Item = [u64; NR_ZONES]> + '_ {
        self.cpus
            .iter()
            .map(|slot| core::array::from_fn(|z| slot.frames[z].load(Ordering::Relaxed) as u64))
    }

    /// Each CPU's hit and miss counters, by CPU number, as last written by
    /// the CPU itself (Linux SLAB's `cpustat`, per CPU: summing them is
    /// the reader's).
    pub fn cpu_stats(&self) -> impl Iterator<Item = CpuStats> + '_ {
        self.cpus.iter().map(|slot| CpuStats {
            pages: slot.pages.read(),
            objects: core::array::from_fn(|c| slot.objects[c].read()),
        })
    }

    /// An object from the caller's CPU arrays (refilled under the cache's
    /// with `gfp` when empty); `None` to take the full path.
    #[inline(always)]
    fn cpu_alloc(&self, layout: Layout, gfp: Gfp) -> Option<*mut u8> {
        let CpuArraysOf {
            cpu,
            arrays: a,
            class,
            counters,
        } = self.cpu_arrays(layout)?;
        if let Some(obj) = a.pop(class) {
            counters.count(Event::AllocHit);
            return Some(obj as *mut u8);
        }
        let obj = a.refill(class, |out| {
            match self.node.kmalloc_bulk(Some(cpu), class, gfp, out) {
                0 => {
                    let mut mm = self.node.lock();
                    match mm.is_initialized() {
                        true => mm.without_faults(|mm| mm.kmalloc_bulk(class, gfp, out)),
                        false => 0,
                    }
                }
                got => got,
            }
        })?;
        counters.count(Event::AllocMiss);
        Some(obj as *mut u8)
    }

    /// Keeps a freed kmalloc object in the caller's CPU arrays (giving a
    /// batch back under the cache's lock when full); false to take the full
    /// path.
    #[inline(always)]
    fn cpu_free(&self, ptr: NonNull<u8>, layout: Layout) -> bool {
        let Some(CpuArraysOf {
            cpu,
            arrays: a,
            class,
            counters,
        }) = self.cpu_arrays(layout)
        else {
            return false;
        };
        if let Some(ops) = self.vmap {
            let (start, size) = ops.window();
            if (start..start + size).contains(&(ptr.as_ptr() as u64)) {
                return false;
            }
        }
        let obj = ptr.as_ptr() as usize;
        if a.push(class, obj) {
            counters.count(Event::FreeHit);
            return true;
        }
        a.flush(class, |objs| {
            if !self.node.kfree_bulk(Some(cpu), class, objs) {
                self.node.lock().kfree_bulk(class, objs);
            }
        });
        a.push(class, obj);
        counters.count(Event::FreeMiss);
        true
    }

    /// Gives everything in the per-CPU caches back to the manager: the
    /// caller's own CPU's, and those of every CPU no one holds now.
    pub fn drain_cpu_caches(&self) -> Drained {
        let ids = &self.ids;
        let mine = ids.current();
        let mut drained = Drained::default();
        for (k, slot) in self.cpus.iter().enumerate() {
            let held = Some(k) == mine;
            if held || ids.try_hold(k) {
                // We hold CPU `k`: it is ours, or `try_hold` just took it.
                let d = self.drain_slot(slot);
                drained.objects += d.objects;
                drained.blocks += d.blocks;
                if !held {
                    ids.release(k);
                }
            }
        }
        drained
    }

    /// Gives back what `slot`'s caches hold; the caller holds its CPU.
    fn drain_slot(&self, slot: &CpuSlot) -> Drained {
        // SAFETY: the caller holds the slot's CPU, so no one else touches
        // its caches meanwhile.
        let c = unsafe { &mut *slot.caches.get() };
        let drained = Drained {
            objects: c.arrays.held(),
            blocks: c.pages.held().iter().map(|&n| n as usize).sum(),
        };
        let mut mm = self.node.lock();
        c.arrays.flush_all(&mut mm);
        let freed = c.pages.flush_all(&mut mm);
        drop(mm);
        debug_assert!(freed.is_ok(), "a CPU list's block: {freed:?}");
        slot.publish(&c.pages);
        drained
    }

    /// Initialises the manager in place, and vmalloc's window if there is
    /// one.
    ///
    /// # Safety
    /// As for [`MemoryManager::init`].
    pub unsafe fn init(&self, boot: &BootInfo) -> Result<(), MmError> {
        let mut mm = self.node.lock();
        // SAFETY: forwarded to the caller.
        unsafe { mm.init(boot) }?;
        if let Some(ops) = self.vmap {
            let (start, size) = ops.window();
            mm.vmalloc_init(start, size)?;
        }
        Ok(())
    }

    /// The architecture's vmalloc page-table operations, if any.
    pub fn vmap_ops(&self) -> Option<&'static dyn VmapOps> {
        self.vmap
    }

    /// `kvmalloc`: large requests from vmalloc; the rest from kmalloc, and
    /// from vmalloc when kmalloc fails (fragmentation leaves no block of
    /// the order it needs, or a slab cannot grow). `extra` is added to every
    /// request's flags (`Gfp::ZERO` for zeroed memory).
    #[inline(always)]
    fn kvmalloc(&self, layout: Layout, extra: Gfp) -> *mut u8 {
        if let Some(p) = self.cpu_alloc(layout, Gfp::KERNEL | Gfp::MEMALLOC) {
            if extra.zero() {
                // SAFETY: `p` is a fresh object of at least `layout.size()`
                // bytes.
                unsafe { p.write_bytes(0, layout.size()) };
            }
            return p;
        }
        let mut mm = self.node.lock();
        if !mm.is_initialized() {
            return null_mut();
        }
        let (size, align) = (layout.size(), layout.align());
        mm.without_faults(|mm| match self.vmap {
            // A large request is one the service can refuse (it reserves
            // fallibly): it stops at the `min` watermark and leaves the
            // reserve to the kernel's small allocations.
            Some(ops) if size > VMALLOC_THRESHOLD => {
                mm.vmalloc(size, align, Gfp::KERNEL | extra, ops)
            }
            vmap => mm
                .kmalloc_layout(layout, Gfp::KERNEL | Gfp::MEMALLOC | extra)
                .or_else(|_| mm.kmalloc_layout(layout, Gfp::ATOMIC | extra))
                .or_else(|e| match vmap {
                    Some(ops) => mm.vmalloc(size, align, Gfp::KERNEL | Gfp::MEMALLOC | extra, ops),
                    None => Err(e),
                }),
        })
        .map_or(null_mut(), |p| p.as_ptr())
    }

    #[cfg(test)]
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    /// The manager, for everything that is not plain allocation.
    pub fn lock(&self) -> MmGuard<'_> {
        self.node.lock()
    }
}

// SAFETY: allocations come from memory the manager owns exclusively (see
// `MemoryManager::init`): kmalloc returns blocks of at least
// `layout.size()` bytes aligned to `layout.align()` (size classes are
// naturally aligned, larger requests are buddy blocks aligned to their
// size); vmalloc returns whole pages, mapped by the architecture as
// `with_vmalloc`'s caller promised, at an address aligned to
// `layout.align()`, with nothing else mapped there until it is freed. The
// spin lock serialises all access. `dealloc` tells the two apart by
// address, since a small request may have fallen back to vmalloc.
//
// The heap is the kernel's own (connection state, reply frames, socket
// buffers): its small requests carry MEMALLOC, so when clients have taken
// memory down to the `min` watermark they dip into the reserve below it,
// whoever the current owner tag is (the service leaves it at the last
// client). Clients' requests stop at `min`, so they cannot take the
// kernel's lifeline.
unsafe impl<const CPUS: usize, I: CpuIds> GlobalAlloc for GlobalMm<CPUS, I> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.kvmalloc(layout, Gfp::default())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.kvmalloc(layout, Gfp::ZERO)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(ptr) = NonNull::new(ptr) else {
            return;
        };
        if self.cpu_free(ptr, layout) {
            return;
        }
        let mut mm = self.node.lock();
        match self.vmap {
            Some(ops) if mm.is_vmalloc_addr(ptr.as_ptr() as usize) => {
                let freed = mm.vfree(ptr, ops);
                // Report with the lock released: the message may allocate.
                drop(mm);
                debug_assert!(freed.is_ok(), "vfree({ptr:?}): {freed:?}");
            }
            _ => mm.kfree_layout(ptr, layout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::HostGlobal;
    use crate::cpu_cache::CPU_BATCH;

    static HOST: HostGlobal = HostGlobal::new(64 << 20);

    /// Sums every CPU's counters of kmalloc class `class` and of the page
    /// lists.
    fn summed(class: usize) -> (CpuStat, CpuStat) {
        let mut sum = (CpuStat::default(), CpuStat::default());
        for s in HOST.global_mm().unwrap().cpu_stats() {
            sum.0 += s.objects[class];
            sum.1 += s.pages;
        }
        sum
    }

    #[test]
    fn each_cpu_counts_its_hits_and_misses_and_readers_sum_them() {
        let layout = Layout::from_size_align(64, 8).unwrap();
        let class = size_class(64, 8).unwrap();
        let gm = HOST.global_mm().unwrap();
        let (objects, pages) = summed(class);
        assert_eq!((objects, pages), Default::default(), "nothing yet");
        // Both threads hold a CPU at once, so each starts with empty caches.
        let both = std::sync::Barrier::new(2);
        let run = || {
            // SAFETY: allocated with `layout` and freed once, below.
            let first = unsafe { HOST.alloc(layout) };
            both.wait();
            // SAFETY: as above.
            let rest = (1..100).map(|_| unsafe { HOST.alloc(layout) });
            let objs: std::vec::Vec<_> = core::iter::once(first).chain(rest).collect();
            for p in objs {
                // SAFETY: as above.
                unsafe { HOST.dealloc(p, layout) };
            }
            let blocks: std::vec::Vec<_> = (0..40).map(|_| gm.alloc_pages(0).unwrap()).collect();
            for b in blocks {
                gm.free_pages(b);
            }
        };
        std::thread::scope(|s| {
            s.spawn(run);
            s.spawn(run);
        });
        let (objects, pages) = summed(class);
        // An empty array refills with a batch: one miss in CPU_BATCH.
        let misses = 2 * 100usize.div_ceil(CPU_BATCH) as u64;
        assert_eq!(objects.allocmiss, misses);
        assert_eq!(objects.allochit, 200 - misses);
        assert_eq!(objects.freehit + objects.freemiss, 200);
        assert!(objects.freemiss > 0, "a full array gives a batch back");
        assert_eq!(pages.allochit + pages.allocmiss, 80);
        assert_eq!(pages.freehit + pages.freemiss, 80);
        assert!(pages.allocmiss >= 2, "each CPU's list started empty");
        gm.drain_cpu_caches();
        gm.lock().check().unwrap();
    }
}
