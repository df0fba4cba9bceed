//! The bytes of the views whose types memd-mm defines.
//!
//! memd-wire carries memd-mm's [`MemInfo`], [`SlabInfo`] (with a `String`
//! name), [`FaultAttr`], [`RunKind`], [`DmaSource`], [`DmaMask`], [`Gfp`],
//! [`SlabFlags`], and the parts its own views embed ([`Watermarks`],
//! [`ZoneCounters`], [`CacheCounters`], [`CmaUsage`]), as they are
//! (docs/design-notes.md). postcard encodes a struct as its fields in
//! order, without names, so reordering, retyping, adding or removing a
//! field of one of those types in memd-mm changes the protocol. These tests
//! pin the bytes: if one fails, the change to memd-mm is a change to the
//! protocol, and wants a new `PROTOCOL_VERSION` (and the new bytes here).
//!
//! They also pin [`Op::CacheCreate`]: its fields moved from a struct
//! variant into [`CacheSpec`] without changing a byte.

use memd_wire::*;

fn bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).unwrap()
}

#[test]
fn meminfo() {
    let m = MemInfo {
        total: 300,
        free: 2,
        buddy_free: 3,
        pcp: 4,
        slab: 5,
        slab_reclaimable: 6,
        kmalloc_large: 7,
        pages_allocated: 8,
        mempool_reserve: 9,
        dma_buddy: 10,
        cma_total: 11,
        cma_free: 12,
        reserved: 13,
        frame_table: 14,
        vmalloc_total: 15,
        vmalloc_used: 16,
        vmalloc_chunk: 17,
        deferred: 18,
        reported: 19,
        balloon: 20,
    };
    assert_eq!(
        bytes(&m),
        [0xac, 0x02, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    );
}

#[test]
fn faults() {
    let f = FaultStatus {
        slab: FaultAttr {
            probability: 5,
            interval: 300,
            times: -1,
            calls: 7,
            injected: 2,
        },
        pages: FaultAttr::default(),
    };
    assert_eq!(bytes(&f), [5, 0xac, 0x02, 1, 7, 2, 0, 0, 0, 0, 0]);
}

#[test]
fn map_runs() {
    // Every variant: a free order, the rest of RAM, then what is not RAM
    // and what is not initialised yet.
    let kinds: [RunKind; 10] = [RunKind::Free(3)]
        .into_iter()
        .chain(RunKind::NOT_ON_FREE_LISTS)
        .chain([RunKind::Absent, RunKind::Uninitialised, RunKind::Balloon])
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    assert_eq!(bytes(&kinds), [0, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let run = MapRun {
        start: 4096,
        len: 8192,
        kind: RunKind::Slab,
    };
    assert_eq!(bytes(&run), [0x80, 0x20, 0x80, 0x40, 3]);
}

#[test]
fn dma_buffer() {
    let b = DmaBufferInfo {
        handle: 1,
        conn: 2,
        phys: 3,
        len: 4,
        align: 5,
        mask: DmaMask::Bits32,
        source: DmaSource::Cma,
        zone: "DMA".into(),
        owner: DmaOwner::Client { name: "c".into() },
    };
    assert_eq!(
        bytes(&b),
        [1, 2, 3, 4, 5, 1, 1, 3, b'D', b'M', b'A', 0, 1, b'c']
    );
    let masks = [DmaMask::Bits24, DmaMask::Bits32, DmaMask::Bits64];
    assert_eq!(bytes(&masks), [0, 1, 2]);
    assert_eq!(bytes(&[DmaSource::Buddy, DmaSource::Cma]), [0, 1]);
}

#[test]
fn flags() {
    assert_eq!(bytes(&(Gfp::KERNEL | Gfp::ZERO)), [0x11]);
    assert_eq!(bytes(&Gfp(1 << 30)), [0x80, 0x80, 0x80, 0x80, 0x04]);
    assert_eq!(bytes(&(SlabFlags::POISON | SlabFlags::RED_ZONE)), [6]);
}

#[test]
fn zoneinfo() {
    let z = ZoneInfo {
        node: 0,
        name: "DMA".into(),
        start_pfn: 1,
        spanned: 2,
        managed: 3,
        free: 4,
        watermark: Watermarks {
            min: 5,
            low: 6,
            high: 7,
        },
        lowmem_reserve: vec![8],
        free_blocks: vec![9, 10],
        pcp_count: 11,
        pcp_high: 12,
        pcp_batch: 13,
        cpu_pagesets: vec![CpuPageset {
            cpu: 22,
            count: 23,
            high: 24,
            batch: 25,
        }],
        counters: ZoneCounters {
            alloc_success: 14,
            alloc_fail: 15,
            atomic_reserve_used: 16,
            fallback: 17,
            pcp_refill: 18,
            pcp_drain: 19,
        },
        deferred: 20,
        balloon: 21,
    };
    assert_eq!(
        bytes(&z),
        [
            0, 3, b'D', b'M', b'A', 1, 2, 3, 4, 5, 6, 7, 1, 8, 2, 9, 10, 11, 12, 13, 1, 22, 23, 24,
            25, 14, 15, 16, 17, 18, 19, 20, 21
        ]
    );
}

#[test]
fn slabinfo() {
    let s = SlabInfo {
        name: "x".into(),
        active_objs: 1,
        num_objs: 2,
        objsize: 3,
        stride: 4,
        objperslab: 5,
        pagesperslab: 6,
        active_slabs: 7,
        num_slabs: 8,
        flags: SlabFlags::POISON,
        has_ctor: true,
        builtin: false,
        counters: CacheCounters {
            allocs: 9,
            frees: 10,
            grows: 11,
            pages_shrunk: 12,
            alloc_fail: 13,
            corruptions: 14,
        },
        cpustat: Some(CpuStat {
            allochit: 15,
            allocmiss: 16,
            freehit: 17,
            freemiss: 18,
        }),
    };
    assert_eq!(
        bytes(&s),
        [1, b'x', 1, 2, 3, 4, 5, 6, 7, 8, 2, 1, 0, 9, 10, 11, 12, 13, 14, 1, 15, 16, 17, 18]
    );
}

#[test]
fn cma() {
    let c = CmaInfo {
        present: true,
        base: 1,
        total: 2,
        zone: "DMA32".into(),
        usage: CmaUsage {
            used: 3,
            free: 4,
            largest_free: 5,
            buffers: 6,
            allocs: 7,
            failures: 8,
        },
    };
    assert_eq!(
        bytes(&c),
        [1, 1, 2, 5, b'D', b'M', b'A', b'3', b'2', 3, 4, 5, 6, 7, 8]
    );
}

/// `Op::CacheCreate`: the variant's index, then its [`CacheSpec`]'s fields
/// in order. It was a struct variant with these five fields; postcard
/// writes a newtype variant holding a struct just as it writes a struct
/// variant with that struct's fields, and these bytes, written for the
/// struct variant, still hold.
#[test]
fn cache_create() {
    let op = Op::CacheCreate(CacheSpec {
        name: "dentry".into(),
        size: 300,
        align: 64,
        flags: SlabFlags::HWCACHE_ALIGN | SlabFlags::POISON,
        ctor: Ctor::Fill(0xa5),
    });
    let old = [
        14, // Op::CacheCreate
        6, b'd', b'e', b'n', b't', b'r', b'y', // name
        0xac, 0x02, // size 300
        64,   // align
        3,    // flags HWCACHE_ALIGN | POISON
        1, 0xa5, // Ctor::Fill(0xa5)
    ];
    assert_eq!(bytes(&op), old);
    assert_eq!(postcard::from_bytes::<Op>(&old).unwrap(), op);
    let mut call = vec![1]; // Request::Call
    call.extend_from_slice(&old);
    assert_eq!(bytes(&Request::Call(op)), call);

    let plain = Op::CacheCreate(CacheSpec {
        name: "t".into(),
        size: 48,
        align: 0,
        flags: SlabFlags::default(),
        ctor: Ctor::None,
    });
    assert_eq!(bytes(&plain), [14, 1, b't', 48, 0, 0, 0]);
}
