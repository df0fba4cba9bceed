//! Host-only: run the memory manager over memory borrowed from the host
//! allocator, with a made-up physical layout.
//!
//! Tests and benchmarks describe the "machine" as physical ranges (say 1-16
//! MiB, 16-64 MiB and 4 GiB-4 GiB+32 MiB to get all three zones). One
//! virtual reservation spans from physical 0 to the end of the last range;
//! the host only commits the pages that are touched, so a sparse layout
//! above 4 GiB costs address space, not memory.

use crate::{BootInfo, MemRegion, MemoryManager, MmError, RegionKind, MAX_ORDER_LIMIT, PAGE_SIZE};
use core::cell::Cell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, Ordering};
use std::alloc::Layout;
use std::boxed::Box;

/// Takes `bytes` (plus a page for alignment) of zeroed host memory.
///
/// Asks for 16-byte alignment so that the system allocator uses `calloc`,
/// whose large blocks are fresh mappings the kernel zeroes lazily; a
/// page-aligned `alloc_zeroed` would memset the whole arena up front.
fn zeroed_arena(bytes: usize) -> Option<(*mut u8, Layout)> {
    let layout = Layout::from_size_align(bytes.checked_add(4096)?, 16).ok()?;
    // SAFETY: the layout has a non-zero size.
    let base = unsafe { std::alloc::GlobalAlloc::alloc_zeroed(&std::alloc::System, layout) };
    (!base.is_null()).then_some((base, layout))
}

fn page_align(p: *mut u8) -> usize {
    (p as usize).next_multiple_of(4096)
}

/// A memory manager that owns its host memory.
pub struct HostMm {
    // Dropped before `base` is released, so nothing points into freed memory.
    mm: Box<MemoryManager>,
    base: *mut u8,
    layout: Layout,
}

// SAFETY: the arena is exclusively owned by this value; moving it to another
// thread moves that ownership along.
unsafe impl Send for HostMm {}

impl HostMm {
    /// Boots a manager over `ranges` (physical `[start, end)`), with `cmdline`.
    pub fn boot(ranges: &[(u64, u64)], cmdline: &str) -> Result<HostMm, MmError> {
        Self::boot_with_hotplug(ranges, None, cmdline)
    }

    /// Boots over `ranges` with a hot-plug region `(start, size)` beyond
    /// them declared (`MemoryManager::add_memory_region`): its memory is
    /// part of the arena, so what is plugged there is real memory.
    pub fn boot_with_hotplug(
        ranges: &[(u64, u64)],
        region: Option<(u64, u64)>,
        cmdline: &str,
    ) -> Result<HostMm, MmError> {
        let end = ranges
            .iter()
            .map(|r| r.1)
            .chain(region.map(|(s, n)| s + n))
            .max()
            .unwrap_or(0);
        let (base, layout) = if end == 0 {
            (core::ptr::null_mut(), Layout::new::<u8>())
        } else {
            zeroed_arena(end as usize).ok_or(MmError::NoMemory)?
        };
        let regions: std::vec::Vec<MemRegion> = ranges
            .iter()
            .map(|&(start, end)| MemRegion {
                start,
                end,
                kind: RegionKind::Usable,
            })
            .collect();
        let mut mm = Box::new(MemoryManager::new());
        let boot = BootInfo {
            regions: &regions,
            cmdline,
            direct_map_offset: page_align(base) as u64,
            reserved: &[],
            zeroed: true,
            deferred_init: false,
        };
        // SAFETY: `base..base+end` is a fresh, zeroed, exclusively owned host
        // allocation that covers every range, and it outlives `mm` (see Drop).
        let result = unsafe { mm.init(&boot) };
        let mut host = HostMm { mm, base, layout };
        result?;
        if let Some((start, size)) = region {
            host.add_memory_region(start, size)?;
        }
        Ok(host)
    }

    /// All three zones: DMA 1-16 MiB, DMA32 16 MiB-`dma32_end`, Normal from
    /// 4 GiB for `normal` bytes.
    pub fn three_zones(dma32_end: u64, normal: u64, cmdline: &str) -> Result<HostMm, MmError> {
        let mut ranges = std::vec![(1 << 20, 16 << 20), (16 << 20, dma32_end)];
        if normal > 0 {
            ranges.push((4 << 30, (4 << 30) + normal));
        }
        HostMm::boot(&ranges, cmdline)
    }
}

impl Deref for HostMm {
    type Target = MemoryManager;
    fn deref(&self) -> &MemoryManager {
        &self.mm
    }
}

impl DerefMut for HostMm {
    fn deref_mut(&mut self) -> &mut MemoryManager {
        &mut self.mm
    }
}

impl Drop for HostMm {
    fn drop(&mut self) {
        // Bytes lent out may still be in use: the arena stays.
        let lending = self.mm.dma_lending();
        // Drop the manager's view first: it holds a slice into the arena.
        *self.mm = MemoryManager::new();
        if !self.base.is_null() && !lending {
            // SAFETY: allocated in `boot` with this layout, freed once.
            unsafe {
                std::alloc::GlobalAlloc::dealloc(&std::alloc::System, self.base, self.layout)
            };
        }
    }
}

/// Per-CPU arrays a host program's threads may hold at once: a thread
/// takes a free "CPU" on its first allocation and gives it back when it
/// exits (threads beyond these take the manager's lock every time).
pub const HOST_CPUS: usize = 16;

/// Which host CPU slots are held.
static HELD: [AtomicBool; HOST_CPUS] = [const { AtomicBool::new(false) }; HOST_CPUS];

const UNSET: usize = usize::MAX;

/// Gives a thread's CPU slot back when the thread exits.
struct ThreadCpu(Cell<usize>);

impl Drop for ThreadCpu {
    fn drop(&mut self) {
        let k = self.0.get();
        if k < HOST_CPUS {
            // From here on the thread has no CPU: what it frees late in its
            // exit takes the lock. The slot's objects stay for its next
            // holder.
            THREAD_CPU.with(|c| c.set(HOST_CPUS));
            HELD[k].store(false, Ordering::Release);
        }
    }
}

std::thread_local! {
    /// The thread's CPU slot: `UNSET` before its first allocation,
    /// `HOST_CPUS` when none was free. No destructor, so reading it is a
    /// plain thread-local load.
    static THREAD_CPU: Cell<usize> = const { Cell::new(UNSET) };
    // Registered once, when the thread takes a slot (a destructor
    // registered with the C library's own memory, not this allocator's).
    static RELEASE: ThreadCpu = const { ThreadCpu(Cell::new(UNSET)) };
}

/// Threads as CPUs (see [`HOST_CPUS`]).
pub struct HostCpus;

// SAFETY: a slot is handed to one thread at a time: `current` takes it with
// a compare-exchange (acquire) and keeps it in the thread's own
// `THREAD_CPU` until the thread's exit releases it (release); `try_hold`
// takes only a slot no thread holds, by the same compare-exchange. A thread
// whose `THREAD_CPU` is gone (late in its exit) gets None.
unsafe impl crate::CpuIds for HostCpus {
    #[inline(always)]
    fn current(&self) -> Option<usize> {
        let k = THREAD_CPU.with(Cell::get);
        if k == UNSET {
            return take_cpu();
        }
        (k < HOST_CPUS).then_some(k)
    }

    fn try_hold(&self, k: usize) -> bool {
        k < HOST_CPUS
            && HELD[k]
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
    }

    fn release(&self, k: usize) {
        if k < HOST_CPUS {
            HELD[k].store(false, Ordering::Release);
        }
    }
}

/// A thread's first allocation: takes a free slot, if any, and arranges
/// for its release at the thread's exit.
#[cold]
fn take_cpu() -> Option<usize> {
    let k = (0..HOST_CPUS)
        .find(|&k| {
            HELD[k]
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })
        .unwrap_or(HOST_CPUS);
    // Late in a thread's exit its destructors are gone: no slot then.
    if k < HOST_CPUS && RELEASE.try_with(|r| r.0.set(k)).is_err() {
        HELD[k].store(false, Ordering::Release);
        THREAD_CPU.with(|c| c.set(HOST_CPUS));
        return None;
    }
    THREAD_CPU.with(|c| c.set(k));
    (k < HOST_CPUS).then_some(k)
}

/// A `#[global_allocator]` for host programs: memd-mm over an arena taken
/// from the system allocator on first use, with per-CPU arrays for up to
/// [`HOST_CPUS`] threads at once.
///
/// ```ignore
/// #[global_allocator]
/// static A: memd_mm::HostGlobal = memd_mm::HostGlobal::new(256 << 20);
/// ```
///
/// The arena never grows: once its `bytes` are taken, allocations fail
/// (null), as the kernel's heap does when memory is short.
pub struct HostGlobal {
    mm: crate::GlobalMm<HOST_CPUS, HostCpus>,
    /// The arena's page-aligned start (physical 0 of the made-up machine),
    /// once it is had; None when it could not be.
    ready: spin::Once<Option<usize>>,
    bytes: u64,
    /// Buddy orders `0..max_order`: the largest block, and so the largest
    /// allocation served, is `PAGE_SIZE << (max_order - 1)`.
    max_order: u32,
}

/// The boot option that sets the buddy's orders (at most two digits, as
/// [`MAX_ORDER_LIMIT`] is 18), written into `buf`: the allocator cannot
/// use the heap to format it.
fn max_order_option(max_order: u32, buf: &mut [u8; 17]) -> &str {
    const KEY: &[u8] = b"memd.max_order=";
    buf[..KEY.len()].copy_from_slice(KEY);
    let mut len = KEY.len();
    if max_order >= 10 {
        buf[len] = b'0' + (max_order / 10 % 10) as u8;
        len += 1;
    }
    buf[len] = b'0' + (max_order % 10) as u8;
    len += 1;
    core::str::from_utf8(&buf[..len]).unwrap_or("")
}

impl HostGlobal {
    /// An arena of `bytes` whose buddy has 256 MiB blocks (`max_order`
    /// 17): host programs grow vectors past the kernel's 4 MiB blocks,
    /// and the host has no vmalloc.
    pub const fn new(bytes: u64) -> Self {
        Self::with_max_order(bytes, 17)
    }

    /// An arena of `bytes` with buddy orders `0..max_order`. With
    /// [`crate::DEFAULT_MAX_ORDER`] it has the kernel's buddy: it serves
    /// one 4 MiB block and nothing larger (it has no vmalloc), and fails
    /// once the arena is used up. A test binary that installs it sees
    /// those limits instead of the system allocator's.
    ///
    /// # Panics
    /// When `max_order` is not in `1..=MAX_ORDER_LIMIT` (at compile time
    /// in a `static`).
    pub const fn with_max_order(bytes: u64, max_order: u32) -> Self {
        assert!(
            max_order >= 1 && max_order as usize <= MAX_ORDER_LIMIT,
            "max_order must be 1..=MAX_ORDER_LIMIT"
        );
        HostGlobal {
            mm: crate::GlobalMm::with_cpus(HostCpus),
            ready: spin::Once::new(),
            bytes,
            max_order,
        }
    }

    /// The largest allocation this allocator can serve: one buddy block of
    /// the highest order.
    pub const fn largest_block(&self) -> u64 {
        PAGE_SIZE << (self.max_order - 1)
    }

    fn ensure(&self) -> bool {
        self.ready
            .call_once(|| {
                let (base, _) = zeroed_arena(self.bytes as usize + (1 << 20))?;
                // The arena is never returned: it backs the allocator for the
                // rest of the program.
                let base = page_align(base);
                let regions = [MemRegion {
                    start: 1 << 20,
                    end: self.bytes + (1 << 20),
                    kind: RegionKind::Usable,
                }];
                let mut option = [0; 17];
                let boot = BootInfo {
                    regions: &regions,
                    cmdline: max_order_option(self.max_order, &mut option),
                    direct_map_offset: base as u64,
                    reserved: &[],
                    zeroed: true,
                    deferred_init: false,
                };
                // SAFETY: the arena is fresh, zeroed, owned by us forever.
                unsafe { self.mm.init(&boot) }.ok().map(|()| base)
            })
            .is_some()
    }

    /// Whether `ptr` points into this allocator's arena: a program that
    /// mixes it with another allocator frees each block to its own.
    pub fn owns(&self, ptr: *const u8) -> bool {
        let Some(Some(base)) = self.ready.get() else {
            return false;
        };
        (base + (1 << 20)..base + (1 << 20) + self.bytes as usize).contains(&(ptr as usize))
    }

    /// The manager, for statistics.
    pub fn lock(&self) -> crate::MmGuard<'_> {
        self.mm.lock()
    }

    /// Gives what the per-CPU caches of threads that are gone (joined: a
    /// thread gives its CPU slot back as it exits, after its closure
    /// returns) and the caller's own hold back to the manager, before a
    /// check or a baseline.
    pub fn drain_cpu_caches(&self) -> crate::Drained {
        self.mm.drain_cpu_caches()
    }

    /// The `GlobalMm` inside, once the arena is had: for what only it
    /// offers (page blocks through the caller's CPU page list, memd-service's
    /// per-CPU work).
    pub fn global_mm(&self) -> Option<&crate::GlobalMm<HOST_CPUS, HostCpus>> {
        self.ensure().then_some(&self.mm)
    }

    /// Where `block`'s bytes are in the arena.
    pub fn page_ptr(&self, block: &crate::PageBlock) -> Option<core::ptr::NonNull<u8>> {
        let base = (*self.ready.get()?)?;
        core::ptr::NonNull::new((base as u64 + block.phys()) as *mut u8)
    }
}

// SAFETY: delegates to `GlobalMm`, which upholds the `GlobalAlloc` contract
// once initialised; before that (or if the arena cannot be had) it returns
// null, which callers treat as allocation failure.
unsafe impl std::alloc::GlobalAlloc for HostGlobal {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !self.ensure() {
            return core::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        unsafe { self.mm.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !self.ensure() {
            return core::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        unsafe { self.mm.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract; `ptr` came from `alloc` above.
        unsafe { self.mm.dealloc(ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_MAX_ORDER;
    use std::alloc::GlobalAlloc;
    use std::vec::Vec;

    #[test]
    fn the_max_order_option_is_written_without_the_heap() {
        let mut buf = [0; 17];
        assert_eq!(max_order_option(1, &mut buf), "memd.max_order=1");
        assert_eq!(max_order_option(11, &mut buf), "memd.max_order=11");
        assert_eq!(max_order_option(18, &mut buf), "memd.max_order=18");
        let parsed = crate::cmdline::MmOptions::parse(max_order_option(11, &mut buf)).unwrap();
        assert_eq!(parsed.max_order, Some(11));
    }

    /// With the kernel's orders and a bounded arena, the allocator serves
    /// one 4 MiB block but not a byte more, and runs out when the arena
    /// does; what is freed can be had again.
    #[test]
    fn kernel_limits_refuse_above_the_largest_block_and_past_the_arena() {
        let heap = HostGlobal::with_max_order(32 << 20, DEFAULT_MAX_ORDER as u32);
        let block = heap.largest_block() as usize;
        assert_eq!(block, 4 << 20);
        let largest = Layout::from_size_align(block, 8).unwrap();
        let over = Layout::from_size_align(block + 1, 8).unwrap();
        // SAFETY: non-zero layouts; every block taken is written within its
        // size and freed once with its layout.
        unsafe {
            assert!(heap.alloc(over).is_null(), "above the largest block");
            let mut held = Vec::new();
            loop {
                let p = heap.alloc(largest);
                if p.is_null() {
                    break;
                }
                p.write_bytes(0xa5, block);
                held.push(p);
                assert!(held.len() <= 8, "a 32 MiB arena holds at most 8 blocks");
            }
            assert!(held.len() >= 5, "only {} blocks of 4 MiB", held.len());
            assert!(heap.lock().check().is_ok());
            for p in held.drain(..) {
                heap.dealloc(p, largest);
            }
            let again = heap.alloc(largest);
            assert!(!again.is_null(), "freed blocks are served again");
            assert!(heap.owns(again) && heap.owns(again.add(block - 1)));
            heap.dealloc(again, largest);
        }
    }

    #[test]
    fn owns_tells_its_blocks_from_others() {
        let heap = HostGlobal::with_max_order(8 << 20, DEFAULT_MAX_ORDER as u32);
        let small = Layout::from_size_align(100, 8).unwrap();
        let other = std::boxed::Box::new(0u64);
        assert!(
            !heap.owns(&*other as *const u64 as *const u8),
            "nothing before the arena"
        );
        // SAFETY: non-zero layout; freed once with it.
        unsafe {
            let p = heap.alloc(small);
            assert!(!p.is_null());
            assert!(heap.owns(p));
            assert!(!heap.owns(&*other as *const u64 as *const u8));
            assert!(!heap.owns(core::ptr::null()));
            heap.dealloc(p, small);
        }
    }

    #[test]
    fn the_default_host_allocator_keeps_its_large_blocks() {
        let heap = HostGlobal::new(64 << 20);
        assert_eq!(heap.largest_block(), 256 << 20);
        let big = Layout::from_size_align(8 << 20, 8).unwrap();
        // SAFETY: non-zero layout; freed once with it.
        unsafe {
            let p = heap.alloc(big);
            assert!(!p.is_null(), "8 MiB is one block of a larger order");
            heap.dealloc(p, big);
        }
    }
}
