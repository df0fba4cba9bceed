//! Fault injection fails the requests made through the memory manager's
//! API (what memd's clients ask for) and never the global allocator (the
//! kernel's own heap), where a failed allocation would be fatal.

use memd_mm::HostGlobal;
use memd_mm::{Gfp, MmError};

#[global_allocator]
static MEMD: HostGlobal = HostGlobal::new(64 << 20);

#[test]
fn injected_faults_spare_the_global_allocator() {
    // Make sure the allocator is up before arming the rules.
    drop(vec![0u8; 16]);
    {
        let mut mm = MEMD.lock();
        mm.set_fault(true, 100, 1, -1, 7).unwrap();
        mm.set_fault(false, 100, 1, -1, 7).unwrap();
    }
    // The program's heap keeps working: small objects (slab classes) and a
    // large block (buddy pages).
    let small: Vec<Box<u64>> = (0..1000).map(Box::new).collect();
    let large = vec![1u8; 1 << 20];
    assert_eq!(small.iter().map(|b| **b).sum::<u64>(), 499_500);
    assert_eq!(large.len(), 1 << 20);
    // Requests through the API fail, and are counted.
    let (kmalloc, pages, faults) = {
        let mut mm = MEMD.lock();
        let k = mm.kmalloc(64, Gfp::KERNEL).map(|_| ());
        let p = mm.alloc_pages(0, Gfp::KERNEL).map(|_| ());
        let f = mm.faults();
        mm.set_fault(true, 0, 0, 0, 0).unwrap();
        mm.set_fault(false, 0, 0, 0, 0).unwrap();
        (k, p, f)
    };
    assert_eq!(kmalloc, Err(MmError::InjectedFault));
    assert_eq!(pages, Err(MmError::InjectedFault));
    let (page_attr, slab_attr) = faults;
    assert_eq!((slab_attr.calls, slab_attr.injected), (1, 1));
    assert_eq!((page_attr.calls, page_attr.injected), (1, 1));
    drop((small, large));
    let checked = MEMD.lock().check();
    checked.unwrap();
}
