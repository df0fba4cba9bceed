//! memd-mm as a host program's `#[global_allocator]`.

use memd_mm::HostGlobal;
use std::collections::{BTreeMap, HashMap};

#[global_allocator]
static MEMD: HostGlobal = HostGlobal::new(128 << 20);

#[test]
fn std_collections_run_on_memd() {
    let mut map = HashMap::new();
    let mut tree = BTreeMap::new();
    for i in 0..20_000u64 {
        map.insert(i, format!("value-{i}"));
        tree.insert(i, vec![i as u8; (i % 300) as usize]);
    }
    let big = vec![7u8; 3 << 20];
    assert_eq!(map[&12_345], "value-12345");
    assert_eq!(tree[&299].len(), 299);
    assert_eq!(big.iter().map(|&b| b as u64).sum::<u64>(), 7 * (3 << 20));
    // Read under the lock, assert after releasing it: a failing assert
    // allocates its message, which would wait on the held lock forever.
    let (used_slab, large, checked) = {
        let mm = MEMD.lock();
        let used: u64 = mm.slabinfo().map(|(_, s)| s.active_objs).sum();
        (used, mm.meminfo().kmalloc_large, mm.check())
    };
    assert!(
        used_slab >= 20_000,
        "the collections' values live in memd's slabs: {used_slab}"
    );
    assert!(
        large >= 3 << 20,
        "the 3 MiB vector is a buddy block: {large}"
    );
    checked.unwrap();
    drop((map, tree, big));
    let (large_after, checked) = {
        let mm = MEMD.lock();
        (mm.meminfo().kmalloc_large, mm.check())
    };
    // The test harness keeps a few buffers of its own alive.
    assert!(large_after + (3 << 20) <= large, "{large_after} vs {large}");
    checked.unwrap();
}
