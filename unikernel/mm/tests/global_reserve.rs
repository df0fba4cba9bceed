//! With memory exhausted by KERNEL page allocations (what memd's clients
//! make), the global allocator (the kernel's own heap) still allocates from
//! the ATOMIC reserve below the `min` watermark.

use memd_mm::HostGlobal;
use memd_mm::{Gfp, MmError};

#[global_allocator]
static MEMD: HostGlobal = HostGlobal::new(32 << 20);

#[test]
fn kernel_heap_survives_exhaustion_through_the_reserve() {
    // Room for the page addresses, taken before memory runs out.
    let mut held: Vec<u64> = Vec::with_capacity(16 << 10);
    let (exhausted, zones) = {
        let mut mm = MEMD.lock();
        let mut exhausted = None;
        while held.len() < held.capacity() {
            match mm.alloc_pages(0, Gfp::KERNEL) {
                Ok(p) => held.push(p),
                Err(e) => {
                    exhausted = Some(e);
                    break;
                }
            }
        }
        // No heap under the lock (the allocator takes it too): an array.
        let zones = mm.zoneinfo().map(|z| (z.managed, z.free, z.watermark.min));
        (exhausted, zones)
    };
    assert_eq!(exhausted, Some(MmError::NoMemory), "memory ran out");
    assert!(zones.iter().any(|z| z.0 > 0));
    for (_, free, min) in zones.into_iter().filter(|z| z.0 > 0) {
        assert!(free >= min, "KERNEL requests stop at min: {free} < {min}");
    }
    // The program's heap keeps working: a few pages' worth of objects and
    // an order-2 block.
    let small: Vec<Box<[u8; 200]>> = (0..100).map(|_| Box::new([7u8; 200])).collect();
    let block = vec![1u8; 16 << 10];
    assert_eq!(small.len() + block.len(), 100 + (16 << 10));
    let used_reserve: u64 = MEMD
        .lock()
        .zoneinfo()
        .iter()
        .map(|z| z.counters.atomic_reserve_used)
        .sum();
    assert!(used_reserve > 0, "the heap was served from the reserve");
    drop((small, block));
    let checked = {
        let mut mm = MEMD.lock();
        for p in held.drain(..) {
            mm.free_pages(p, 0).unwrap();
        }
        mm.check()
    };
    checked.unwrap();
}
