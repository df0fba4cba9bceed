//! Self-test steps for vmalloc behind the global allocator: a vector larger
//! than any buddy block, and a 1 MiB vector when fragmentation leaves no
//! block of 1 MiB free.
//!
//! Vectors are allocated and dropped with the allocator's lock released
//! (the allocator takes it); figures are read under it, and nothing is
//! allocated while it is held.

use alloc::vec::Vec;

use log::info;
use memd_mm::stats::MemInfo;
use memd_mm::{Gfp, MemoryManager, PAGE_SIZE};

use super::{fail, TestResult};
use crate::ALLOC;

const MIB: usize = 1 << 20;
/// 1 MiB is an order-8 block.
const MIB_ORDER: u32 = 8;

fn meminfo() -> MemInfo {
    ALLOC.lock().meminfo()
}

/// A vector of `bytes` bytes (a multiple of 8) from the global allocator,
/// filled with a pattern and read back; checks it is a vmalloc area.
fn filled_vec(bytes: usize, seed: u64) -> Result<Vec<u64>, super::Failure> {
    let mut v: Vec<u64> = Vec::new();
    v.try_reserve_exact(bytes / 8)
        .map_err(|e| fail(format_args!("try_reserve_exact({bytes}): {e}")))?;
    let pattern = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
    v.extend((0..bytes / 8).map(pattern));
    if v.iter().enumerate().any(|(i, &x)| x != pattern(i)) {
        return Err(fail(format_args!(
            "a {bytes}-byte vector does not keep what was written"
        )));
    }
    if !ALLOC.lock().is_vmalloc_addr(v.as_ptr() as usize) {
        return Err(fail(format_args!(
            "a {bytes}-byte vector at {:p} is not in the vmalloc window",
            v.as_ptr()
        )));
    }
    Ok(v)
}

/// Twice the buddy's largest block, and at least 16 MiB, through a `Vec`:
/// VmallocUsed grows by exactly its size and comes back, and so does free
/// memory. The first round may grow kmalloc-64 by a slab for the area's
/// record (free + slab comes back); the second must give back every page.
pub fn larger_than_any_block() -> TestResult {
    let largest = (PAGE_SIZE as usize) << (ALLOC.lock().max_order() - 1);
    let bytes = (2 * largest).max(16 * MIB);
    let ops = ALLOC
        .vmap_ops()
        .ok_or_else(|| fail("the global allocator has no vmalloc"))?;
    for round in 0..2 {
        let before = meminfo();
        let v = filled_vec(bytes, round)?;
        let start = v.as_ptr() as u64;
        let during = meminfo();
        if during.vmalloc_used != before.vmalloc_used + bytes as u64 {
            return Err(fail(format_args!(
                "VmallocUsed {} with a {bytes}-byte vector, {} before",
                during.vmalloc_used, before.vmalloc_used
            )));
        }
        if during.free + bytes as u64 > before.free {
            return Err(fail(format_args!(
                "free memory {} with a {bytes}-byte vector, {} before",
                during.free, before.free
            )));
        }
        let listed = ALLOC
            .lock()
            .vmallocinfo()
            .any(|a| a.start == start && a.pages * PAGE_SIZE == bytes as u64);
        if !listed {
            return Err(fail(format_args!(
                "no {bytes}-byte vmalloc area at {start:#x}"
            )));
        }
        if ops.translate(start + bytes as u64).is_some() {
            return Err(fail("the guard page after the area is mapped"));
        }
        super::check_invariants("with a vmalloc area")?;
        drop(v);
        let after = meminfo();
        let back = if round == 0 {
            after.free + after.slab == before.free + before.slab
        } else {
            after.free == before.free
        };
        if after.vmalloc_used != before.vmalloc_used || !back {
            return Err(fail(format_args!(
                "round {round}: VmallocUsed {} -> {} -> {}, free {} -> {}, slab {} -> {}",
                before.vmalloc_used,
                during.vmalloc_used,
                after.vmalloc_used,
                before.free,
                after.free,
                before.slab,
                after.slab
            )));
        }
        if round == 1 {
            info!(
                "selftest: vmalloc: {} MiB vector at {start:#x}: VmallocUsed {} kB -> {} kB -> {} kB, free {} kB -> {} kB -> {} kB",
                bytes / MIB,
                before.vmalloc_used >> 10,
                during.vmalloc_used >> 10,
                after.vmalloc_used >> 10,
                before.free >> 10,
                during.free >> 10,
                after.free >> 10
            );
        }
    }
    Ok(())
}

/// Free blocks of order `MIB_ORDER` or more, over all zones.
fn free_mib_blocks(mm: &MemoryManager) -> u64 {
    mm.buddyinfo()
        .iter()
        .map(|(_, n)| n[MIB_ORDER as usize..].iter().sum::<u64>())
        .sum()
}

/// Blocks of 1 MiB or more still free after the page sweep (the reserve
/// below the watermarks), held so that none is left.
const MAX_HELD_BLOCKS: usize = 64;

/// Fragments memory so that no block of 1 MiB is free, with most memory
/// still free, then allocates 1 MiB through a `Vec`: vmalloc builds it
/// from single pages.
pub fn fragmented() -> TestResult {
    let mut held: Vec<u64> = Vec::new();
    let pages = (meminfo().total / PAGE_SIZE) as usize;
    held.try_reserve_exact(pages)
        .map_err(|e| fail(format_args!("room for {pages} page addresses: {e}")))?;
    let mut blocks = [(0u64, 0u32); MAX_HELD_BLOCKS];
    let mut nr_blocks = 0;
    let before = meminfo();
    {
        let mut mm = ALLOC.lock();
        // Every page the buddy will give (down to the ATOMIC reserve)...
        while held.len() < held.capacity() {
            match mm.alloc_pages(0, Gfp::ATOMIC | Gfp::NOWARN) {
                Ok(p) => held.push(p),
                Err(_) => break,
            }
        }
        // ... then every other one back: no two free frames are buddies.
        held.sort_unstable();
        let mut freed = 0u64;
        for &p in held.iter().filter(|&&p| (p / PAGE_SIZE).is_multiple_of(2)) {
            mm.free_pages(p, 0)
                .map_err(|e| fail(format_args!("free page {p:#x}: {e}")))?;
            freed += 1;
        }
        held.retain(|&p| (p / PAGE_SIZE) % 2 == 1);
        // What stayed free below the watermarks may be whole blocks: hold
        // those of 1 MiB or more, largest first so that none is split.
        for order in (MIB_ORDER..mm.max_order()).rev() {
            for zone in [Gfp::DMA, Gfp::DMA32, Gfp::NOWAIT] {
                while nr_blocks < MAX_HELD_BLOCKS
                    && mm
                        .buddyinfo()
                        .iter()
                        .any(|(z, n)| n[order as usize] > 0 && *z <= zone.highest_zone())
                {
                    let Ok(p) = mm.alloc_pages(order, Gfp::ATOMIC | Gfp::NOWARN | zone) else {
                        break;
                    };
                    blocks[nr_blocks] = (p, order);
                    nr_blocks += 1;
                }
            }
        }
        let left = free_mib_blocks(&mm);
        let mib_block = mm.alloc_pages(MIB_ORDER, Gfp::NOWAIT | Gfp::NOWARN);
        if let Ok(p) = mib_block {
            let _ = mm.free_pages(p, MIB_ORDER);
        }
        let free = mm.meminfo().free;
        drop(mm);
        info!(
            "selftest: vmalloc: {freed} single pages free between held ones, {} kB free, {left} free blocks of 1 MiB or more",
            free >> 10
        );
        if left != 0 || mib_block.is_ok() {
            release(&held, &blocks[..nr_blocks])?;
            return Err(fail(format_args!(
                "fragmenting left {left} free blocks of 1 MiB or more"
            )));
        }
    }
    let result = (|| {
        let base = meminfo().vmalloc_used;
        let v = filled_vec(MIB, 0x5eed)?;
        let used = meminfo().vmalloc_used;
        drop(v);
        if used != base + MIB as u64 {
            return Err(fail(format_args!(
                "VmallocUsed {used} with a 1 MiB vector, {base} before"
            )));
        }
        info!(
            "selftest: vmalloc: 1 MiB vector with no 1 MiB block free: VmallocUsed {} kB -> {} kB",
            base >> 10,
            used >> 10
        );
        Ok(())
    })();
    release(&held, &blocks[..nr_blocks])?;
    result?;
    let after = meminfo();
    if after.free + after.slab != before.free + before.slab
        || after.vmalloc_used != before.vmalloc_used
    {
        return Err(fail(format_args!(
            "after fragmenting: free {} + slab {} (was {} + {}), VmallocUsed {} (was {})",
            after.free,
            after.slab,
            before.free,
            before.slab,
            after.vmalloc_used,
            before.vmalloc_used
        )));
    }
    Ok(())
}

/// Frees what `fragmented` holds; every free must be accepted.
fn release(pages: &[u64], blocks: &[(u64, u32)]) -> TestResult {
    let mut mm = ALLOC.lock();
    let refused = pages
        .iter()
        .map(|&p| (p, 0))
        .chain(blocks.iter().copied())
        .filter(|&(p, order)| mm.free_pages(p, order).is_err())
        .count();
    if refused > 0 {
        return Err(fail(format_args!(
            "{refused} held blocks were refused when freed"
        )));
    }
    Ok(())
}
