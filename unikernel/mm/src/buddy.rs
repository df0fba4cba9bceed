//! The binary buddy allocator over one zone's free lists.
//!
//! A free block of order `k` is `2^k` frames aligned to `2^k`; its buddy is
//! the block whose frame number differs only in bit `k`. Splitting and
//! coalescing are O(1) per order because the free lists are doubly linked
//! through the frame table, so any block can be unlinked by its number.

use crate::frame::FrameState;
use crate::pageblock::{Held, Pageblocks};
use crate::sparse::Frames;
use crate::zone::{Zone, ZoneType};

/// Takes a block of exactly `order` from the zone, splitting a larger one
/// when needed (Linux's `__rmqueue_smallest` + `expand`). The returned head
/// is unlinked and still marked `Buddy`; the caller gives it its new state.
#[inline]
pub fn take(
    zone: &mut Zone,
    frames: &mut Frames,
    blocks: &mut Pageblocks,
    order: u32,
    max_order: u32,
) -> Option<u32> {
    let mut current = order;
    while current < max_order {
        let area = &mut zone.free_area[current as usize];
        if let Some(pfn) = area.list.pop(frames) {
            if frames[pfn as usize].reported() {
                zone.reported -= 1 << current;
            }
            let mut size_order = current;
            while size_order > order {
                size_order -= 1;
                let half = pfn + (1 << size_order);
                frames[half as usize].set(FrameState::Buddy, zone.ty, size_order);
                zone.free_area[size_order as usize].list.push(frames, half);
            }
            // Rewritten whole: a reported mark does not follow the block
            // out of the free lists.
            frames[pfn as usize].set(FrameState::Buddy, zone.ty, order);
            zone.free -= 1 << order;
            blocks.sub(pfn, Held::Free, 1 << order);
            return Some(pfn);
        }
        current += 1;
    }
    None
}

/// Returns a block to the zone, merging with free buddies as far as they
/// go (Linux's `__free_one_page`).
#[inline]
pub fn give(
    zone: &mut Zone,
    frames: &mut Frames,
    blocks: &mut Pageblocks,
    pfn: u32,
    order: u32,
    max_order: u32,
) {
    zone.free += 1 << order;
    blocks.add(pfn, Held::Free, 1 << order);
    let mut pfn = pfn;
    let mut order = order;
    while order + 1 < max_order {
        let buddy = pfn ^ (1 << order);
        let Some(b) = frames.get(buddy as usize) else {
            break;
        };
        // A buddy in another zone (possible only with very large orders)
        // or in a hole reads as not free.
        if !b.is(FrameState::Buddy) || b.order as u32 != order || b.zone() != zone.ty {
            break;
        }
        if b.reported() {
            zone.reported -= 1 << order;
        }
        zone.free_area[order as usize].list.remove(frames, buddy);
        frames[buddy as usize].clear();
        frames[pfn as usize].clear();
        pfn &= !(1 << order);
        order += 1;
    }
    frames[pfn as usize].set(FrameState::Buddy, zone.ty, order);
    zone.free_area[order as usize].list.push(frames, pfn);
}

/// Hands a range of frames to the buddy at initialisation, in the largest
/// aligned blocks that fit (Linux's `__free_pages_memory`), counting them
/// as the pageblocks' managed frames. Only block heads are written.
pub fn give_range(
    zone: &mut Zone,
    frames: &mut Frames,
    blocks: &mut Pageblocks,
    start: u64,
    end: u64,
    max_order: u32,
) {
    for (pfn, order) in aligned_blocks(start, end, max_order) {
        debug_assert!(zone.ty == ZoneType::Movable || ZoneType::of_pfn(pfn as u64) == zone.ty);
        blocks.add_managed(pfn, 1 << order);
        give(zone, frames, blocks, pfn, order, max_order);
    }
}

/// Returns free frames `[start, end)`, already the zone's managed frames, to
/// the buddy in the largest aligned blocks that fit (what is left of a
/// block split around memory going offline).
pub fn free_range(
    zone: &mut Zone,
    frames: &mut Frames,
    blocks: &mut Pageblocks,
    start: u64,
    end: u64,
    max_order: u32,
) {
    for (pfn, order) in aligned_blocks(start, end, max_order) {
        give(zone, frames, blocks, pfn, order, max_order);
    }
}

/// `[start, end)` as the largest aligned blocks below `max_order` that fit:
/// each head and order.
fn aligned_blocks(start: u64, end: u64, max_order: u32) -> impl Iterator<Item = (u32, u32)> {
    let mut pfn = start;
    core::iter::from_fn(move || {
        if pfn >= end {
            return None;
        }
        let mut order = (max_order - 1).min(pfn.trailing_zeros());
        while pfn + (1 << order) > end {
            order -= 1;
        }
        let head = pfn as u32;
        pfn += 1 << order;
        Some((head, order))
    })
}
