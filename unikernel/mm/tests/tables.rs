//! Property test: slab caches and mempools created and destroyed by the
//! thousand, with objects taken from them, against a model of which exist
//! and what they hold; the invariant checker runs after every step. memd-mm
//! keeps no table of fixed size for either, so nothing but memory may
//! refuse a creation, a destroyed cache's or pool's id is free again, and
//! once everything is gone the manager holds what it held at boot.

use memd_mm::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::ptr::NonNull;

const MIB: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    CacheCreate {
        size: usize,
        debug: bool,
    },
    CacheDestroy {
        pick: usize,
    },
    CacheAlloc {
        pick: usize,
    },
    PoolCreate {
        kind: u8,
        min_nr: usize,
        pick: usize,
    },
    PoolDestroy {
        pick: usize,
    },
    PoolAlloc {
        pick: usize,
    },
    Free {
        pick: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..3000, any::<bool>()).prop_map(|(size, debug)| Op::CacheCreate { size, debug }),
        3 => any::<usize>().prop_map(|pick| Op::CacheDestroy { pick }),
        3 => any::<usize>().prop_map(|pick| Op::CacheAlloc { pick }),
        4 => (0u8..3, 1usize..4, any::<usize>()).prop_map(|(kind, min_nr, pick)| Op::PoolCreate { kind, min_nr, pick }),
        3 => any::<usize>().prop_map(|pick| Op::PoolDestroy { pick }),
        3 => any::<usize>().prop_map(|pick| Op::PoolAlloc { pick }),
        4 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

enum Held {
    Object(CacheId, NonNull<u8>),
    Element(PoolId, PoolElement),
}

struct World {
    mm: HostMm,
    /// Live caches: object size.
    caches: BTreeMap<CacheId, usize>,
    /// Live pools: the cache they draw from, if any.
    pools: BTreeMap<PoolId, Option<CacheId>>,
    held: Vec<Held>,
}

fn nth<K: Copy, V>(m: &BTreeMap<K, V>, pick: usize) -> Option<K> {
    (!m.is_empty()).then(|| *m.keys().nth(pick % m.len()).unwrap())
}

impl World {
    fn apply(&mut self, op: &Op) {
        match *op {
            Op::CacheCreate { size, debug } => {
                let flags = if debug {
                    SlabFlags::POISON | SlabFlags::RED_ZONE
                } else {
                    SlabFlags::NONE
                };
                let id = match self.mm.cache_create("t", size, 8, flags, None) {
                    Ok(id) => id,
                    // Memory, and nothing else, may refuse a cache.
                    Err(e) => return assert_eq!(e, MmError::NoMemory),
                };
                assert!(
                    self.caches.insert(id, size).is_none(),
                    "{id:?} handed out while live"
                );
                // The lowest free id: every id below it is taken.
                let builtin = self.mm.caches().filter(|(_, c)| c.builtin).count() as u16;
                assert!(
                    (builtin..id.0).all(|i| self.caches.contains_key(&CacheId(i))),
                    "{id:?} is not the lowest free id"
                );
            }
            Op::CacheDestroy { pick } => {
                let Some(id) = nth(&self.caches, pick) else {
                    return;
                };
                let live = self
                    .held
                    .iter()
                    .filter(|h| matches!(h, Held::Object(c, _) if *c == id))
                    .count() as u64;
                let backs_pool = self.pools.values().any(|p| *p == Some(id));
                match self.mm.cache_destroy(id) {
                    Ok(()) => {
                        assert_eq!(live, 0);
                        assert!(self.mm.cache(id).is_none());
                        self.caches.remove(&id);
                    }
                    Err(MmError::Busy { live: n }) => assert!(n > 0 && (n == live || backs_pool)),
                    Err(e) => panic!("destroy {id:?}: {e:?}"),
                }
            }
            Op::CacheAlloc { pick } => {
                let Some(id) = nth(&self.caches, pick) else {
                    return;
                };
                let Ok(p) = self.mm.cache_alloc(id, Gfp::KERNEL) else {
                    return;
                };
                assert_eq!(self.mm.cache(id).unwrap().object_size, self.caches[&id]);
                self.held.push(Held::Object(id, p));
            }
            Op::PoolCreate { kind, min_nr, pick } => {
                let (backing, cache) = match (kind, nth(&self.caches, pick)) {
                    (0, Some(c)) => (PoolBacking::Cache(c), Some(c)),
                    (1, _) => (PoolBacking::Pages(1), None),
                    _ => (PoolBacking::Kmalloc(1 + pick % 5000), None),
                };
                let id = match self.mm.mempool_create(backing, min_nr) {
                    Ok(id) => id,
                    Err(e) => return assert_eq!(e, MmError::NoMemory),
                };
                assert!(
                    self.pools.insert(id, cache).is_none(),
                    "{id:?} handed out while live"
                );
            }
            Op::PoolDestroy { pick } => {
                let Some(id) = nth(&self.pools, pick) else {
                    return;
                };
                let out = self
                    .held
                    .iter()
                    .filter(|h| matches!(h, Held::Element(p, _) if *p == id))
                    .count() as u64;
                match self.mm.mempool_destroy(id) {
                    Ok(()) => {
                        assert_eq!(out, 0);
                        assert!(self.mm.mempool(id).is_none());
                        self.pools.remove(&id);
                    }
                    Err(e) => assert_eq!(e, MmError::Busy { live: out }),
                }
            }
            Op::PoolAlloc { pick } => {
                let Some(id) = nth(&self.pools, pick) else {
                    return;
                };
                let Ok(e) = self.mm.mempool_alloc(id, Gfp::KERNEL) else {
                    return;
                };
                self.held.push(Held::Element(id, e));
            }
            Op::Free { pick } => {
                if self.held.is_empty() {
                    return;
                }
                match self.held.swap_remove(pick % self.held.len()) {
                    Held::Object(id, p) => self.mm.cache_free(id, p).unwrap(),
                    Held::Element(id, e) => self.mm.mempool_free(id, e).unwrap(),
                }
            }
        }
    }
}

fn settled_free(mm: &mut HostMm) -> u64 {
    mm.reclaim();
    mm.drain_all_pages();
    mm.meminfo().free
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(match std::env::var_os("PROPTEST_CASES") {
        Some(_) => ProptestConfig::default().cases,
        None => 16,
    }))]

    #[test]
    fn caches_and_pools_come_and_go_by_the_thousand(ops in prop::collection::vec(op(), 500..1500)) {
        let mut mm = HostMm::three_zones(96 * MIB, 0, "").unwrap();
        let before = settled_free(&mut mm);
        let boot_caches = mm.caches().count();
        let mut w = World { mm, caches: BTreeMap::new(), pools: BTreeMap::new(), held: Vec::new() };
        for op in &ops {
            w.apply(op);
            if let Err(e) = w.mm.check() {
                panic!("invariant broken after {op:?}: {e}");
            }
            prop_assert_eq!(w.mm.caches().count(), boot_caches + w.caches.len());
            prop_assert_eq!(w.mm.mempools().count(), w.pools.len());
        }
        for h in std::mem::take(&mut w.held) {
            match h {
                Held::Object(id, p) => w.mm.cache_free(id, p).unwrap(),
                Held::Element(id, e) => w.mm.mempool_free(id, e).unwrap(),
            }
        }
        for id in std::mem::take(&mut w.pools).into_keys() {
            w.mm.mempool_destroy(id).unwrap();
        }
        for id in std::mem::take(&mut w.caches).into_keys() {
            w.mm.cache_destroy(id).unwrap();
        }
        w.mm.check().unwrap();
        prop_assert_eq!(settled_free(&mut w.mm), before, "everything back");
    }
}
