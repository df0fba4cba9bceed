//! The in-guest self-test (`memd.selftest=1`): memd-mm on real guest memory.
//! Pages of every order and zone, kmalloc size classes, Rust collections on
//! the global allocator, a slab cache with a constructor (and its leak check
//! on destroy), a mempool, DMA buffers (buddy and, when reserved, the
//! contiguous region), vmalloc behind the global allocator (`vmalloc`), the
//! hermit-abi calls, and memd-mm's invariant checker
//! before and after. The result ends QEMU through isa-debug-exit.
//!
//! The tests hold the global allocator's lock (a spin lock, not reentrant)
//! while they call memd-mm, so a failure message is built in a buffer of
//! its own ([`Failure`]), never on the heap: allocating there would spin
//! on the lock the test holds.

// Results carry that buffer by value, on purpose.
#![allow(clippy::result_large_err)]

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};

use log::info;
use memd_mm::{DmaMask, DmaSource, Gfp, MemoryManager, MmError, PoolBacking, SlabFlags, PAGE_SIZE};

use crate::ALLOC;

mod vmalloc;

/// A failure message in a fixed buffer; longer messages are cut at a
/// character boundary.
pub struct Failure {
    buf: [u8; Failure::CAPACITY],
    len: usize,
}

impl Failure {
    const CAPACITY: usize = 256;

    fn as_str(&self) -> &str {
        // `write_str` only ever appends whole characters.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl Write for Failure {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = Self::CAPACITY - self.len;
        let mut take = s.len().min(room);
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        Ok(())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type TestResult = Result<(), Failure>;
type Test = (&'static str, fn() -> TestResult);

fn fail(msg: impl fmt::Display) -> Failure {
    let mut f = Failure {
        buf: [0; Failure::CAPACITY],
        len: 0,
    };
    let _ = write!(f, "{msg}");
    f
}

fn check_invariants(when: &str) -> TestResult {
    ALLOC
        .lock()
        .check()
        .map_err(|e| fail(format_args!("memd-mm invariant broken {when}: {e}")))
}

/// The memory boot left uninitialised arrives 64 MiB at a time, with
/// the invariants checked whole at every step and in steps alongside; it
/// adds up to what the boot map promised. The tests after it run on all
/// of memory.
fn deferred_init() -> TestResult {
    let mut mm = ALLOC.lock();
    let m = mm.meminfo();
    let promised = m.total + m.deferred;
    let mut walk = memd_mm::CheckWalk::new();
    let mut steps = 0u32;
    loop {
        let done = mm.deferred_init_step(16);
        steps += 1;
        mm.check()
            .map_err(|e| fail(format_args!("invariant broken after step {steps}: {e}")))?;
        if mm
            .check_step(&mut walk, 3)
            .map_err(|e| fail(format_args!("a check in steps broke at step {steps}: {e}")))?
        {
            walk = memd_mm::CheckWalk::new();
        }
        let m = mm.meminfo();
        if m.total + m.deferred != promised {
            return Err(fail(format_args!(
                "step {steps}: {} managed + {} to come, not the {promised} promised",
                m.total, m.deferred
            )));
        }
        if done {
            break;
        }
    }
    if mm.meminfo().deferred != 0 {
        return Err(fail("memory left uninitialised after the last step"));
    }
    info!(
        "selftest: {steps} deferred steps, {} MiB in all",
        promised >> 20
    );
    Ok(())
}

/// Fills `len` bytes at `virt` with a position-dependent pattern and reads
/// it back.
fn scribble(mm: &mut MemoryManager, virt: usize, len: usize, seed: u8) -> TestResult {
    let b = mm
        .bytes_of(virt, len)
        .map_err(|e| fail(format_args!("bytes of {virt:#x}+{len}: {e}")))?;
    for (i, x) in b.iter_mut().enumerate() {
        *x = seed ^ (i as u8);
    }
    if b.iter().enumerate().any(|(i, &x)| x != seed ^ (i as u8)) {
        return Err(fail(format_args!(
            "memory at {virt:#x} does not keep what was written"
        )));
    }
    Ok(())
}

fn pages() -> TestResult {
    let mut mm = ALLOC.lock();
    let dmap = mm.direct_map();
    let before = mm.meminfo().free;
    for order in 0..mm.max_order() {
        let phys = mm
            .alloc_pages(order, Gfp::KERNEL)
            .map_err(|e| fail(format_args!("order {order}: {e}")))?;
        let len = (PAGE_SIZE << order) as usize;
        if phys % (len as u64) != 0 {
            return Err(fail(format_args!(
                "order {order} block {phys:#x} not naturally aligned"
            )));
        }
        // Touch the first and the last page of the block.
        scribble(&mut mm, dmap.virt(phys), PAGE_SIZE as usize, order as u8)?;
        scribble(
            &mut mm,
            dmap.virt(phys + len as u64 - PAGE_SIZE),
            PAGE_SIZE as usize,
            !(order as u8),
        )?;
        mm.free_pages(phys, order)
            .map_err(|e| fail(format_args!("free order {order}: {e}")))?;
    }
    for (gfp, limit, name) in [
        (Gfp::DMA, 16u64 << 20, "DMA"),
        (Gfp::DMA32, 4u64 << 30, "DMA32"),
    ] {
        let phys = mm
            .alloc_pages(0, gfp)
            .map_err(|e| fail(format_args!("{name} page: {e}")))?;
        if phys >= limit {
            return Err(fail(format_args!(
                "{name} page at {phys:#x}, above {limit:#x}"
            )));
        }
        mm.free_pages(phys, 0)
            .map_err(|e| fail(format_args!("free {name} page: {e}")))?;
    }
    // Many order-0 pages, then all back: free memory must return.
    let mut held = [0u64; 512];
    for p in held.iter_mut() {
        *p = mm
            .alloc_pages(0, Gfp::KERNEL)
            .map_err(|e| fail(format_args!("order-0 burst: {e}")))?;
    }
    for &p in held.iter() {
        mm.free_pages(p, 0)
            .map_err(|e| fail(format_args!("order-0 burst free: {e}")))?;
    }
    let after = mm.meminfo().free;
    if after != before {
        return Err(fail(format_args!(
            "free memory {before} before the page tests, {after} after"
        )));
    }
    Ok(())
}

fn kmalloc() -> TestResult {
    let mut mm = ALLOC.lock();
    for (i, &size) in [
        1usize,
        8,
        16,
        24,
        32,
        64,
        96,
        128,
        192,
        256,
        512,
        1024,
        2048,
        4096,
        8192,
        8193,
        65536,
        1 << 20,
    ]
    .iter()
    .enumerate()
    {
        let p = mm
            .kmalloc(size, Gfp::KERNEL)
            .map_err(|e| fail(format_args!("kmalloc({size}): {e}")))?;
        let usable = mm
            .ksize(p)
            .map_err(|e| fail(format_args!("ksize after kmalloc({size}): {e}")))?;
        if usable < size {
            return Err(fail(format_args!("ksize {usable} < kmalloc size {size}")));
        }
        scribble(&mut mm, p.as_ptr() as usize, size, i as u8)?;
        mm.kfree(p)
            .map_err(|e| fail(format_args!("kfree after kmalloc({size}): {e}")))?;
    }
    Ok(())
}

fn rust_alloc() -> TestResult {
    let mut v: Vec<u64> = Vec::new();
    for i in 0..100_000u64 {
        v.push(i * 7);
    }
    if v.iter().enumerate().any(|(i, &x)| x != i as u64 * 7) {
        return Err(fail("Vec contents changed while growing"));
    }
    let boxes: Vec<Box<[u8; 300]>> = (0..200).map(|i| Box::new([i as u8; 300])).collect();
    if boxes
        .iter()
        .enumerate()
        .any(|(i, b)| b.iter().any(|&x| x != i as u8))
    {
        return Err(fail("Box contents changed"));
    }
    let mut s = String::new();
    for i in 0..1000 {
        let _ = write!(s, "{i},");
    }
    if !s.starts_with("0,1,2,") || !s.ends_with("998,999,") {
        return Err(fail("String contents wrong"));
    }
    Ok(())
}

const OBJ_SIZE: usize = 200;
const CTOR_BYTE: u8 = 0xc7;

fn ctor(obj: &mut [u8]) {
    obj.fill(CTOR_BYTE);
}

fn slab_cache() -> TestResult {
    let mut mm = ALLOC.lock();
    let id = mm
        .cache_create(
            "selftest_obj",
            OBJ_SIZE,
            8,
            SlabFlags::HWCACHE_ALIGN,
            Some(ctor),
        )
        .map_err(|e| fail(format_args!("cache_create: {e}")))?;
    let mut objs = [None; 100];
    for o in objs.iter_mut() {
        let p = mm
            .cache_alloc(id, Gfp::KERNEL)
            .map_err(|e| fail(format_args!("cache_alloc: {e}")))?;
        if !(p.as_ptr() as usize).is_multiple_of(64) {
            return Err(fail("HWCACHE_ALIGN object not 64-byte aligned"));
        }
        if mm
            .bytes_of(p.as_ptr() as usize, OBJ_SIZE)
            .map_err(|e| fail(format_args!("constructed object: {e}")))?
            .iter()
            .any(|&b| b != CTOR_BYTE)
        {
            return Err(fail("fresh slab object not initialised by the constructor"));
        }
        *o = Some(p);
    }
    // Destroying a cache with live objects must fail and report them.
    if mm.cache_destroy(id).is_ok() {
        return Err(fail("cache_destroy succeeded with 100 live objects"));
    }
    for p in objs.iter().flatten() {
        mm.cache_free(id, *p)
            .map_err(|e| fail(format_args!("cache_free: {e}")))?;
    }
    mm.cache_destroy(id)
        .map_err(|e| fail(format_args!("cache_destroy after freeing all: {e}")))
}

fn mempool() -> TestResult {
    let mut mm = ALLOC.lock();
    let pool = mm
        .mempool_create(PoolBacking::Kmalloc(256), 4)
        .map_err(|e| fail(format_args!("mempool_create: {e}")))?;
    let idle = mm
        .mempool_info()
        .find(|p| p.id == pool.0)
        .map(|p| p.idle_bytes)
        .unwrap_or(0);
    if idle < 4 * 256 {
        return Err(fail(format_args!(
            "mempool of 4 x 256 B shows {idle} idle bytes"
        )));
    }
    let mut held = [None; 8];
    for e in held.iter_mut() {
        let el = mm
            .mempool_alloc(pool, Gfp::KERNEL)
            .map_err(|e| fail(format_args!("mempool_alloc: {e}")))?;
        scribble(&mut mm, el.virt, 256, 0x3c)?;
        *e = Some(el);
    }
    for e in held.iter().flatten() {
        mm.mempool_free(pool, *e)
            .map_err(|e| fail(format_args!("mempool_free: {e}")))?;
    }
    mm.mempool_destroy(pool)
        .map_err(|e| fail(format_args!("mempool_destroy: {e}")))
}

fn dma() -> TestResult {
    let mut mm = ALLOC.lock();
    for (mask, len) in [
        (DmaMask::Bits24, 8192usize),
        (DmaMask::Bits32, 64 << 10),
        (DmaMask::Bits64, 1 << 20),
    ] {
        let buf = mm
            .dma_alloc(len, 4096, mask)
            .map_err(|e| fail(format_args!("dma_alloc({len}, {}-bit): {e}", mask.bits())))?;
        if buf.phys % 4096 != 0 || buf.phys + buf.len as u64 > mask.limit() || buf.len < len {
            return Err(fail(format_args!(
                "DMA buffer {buf:?} violates its {}-bit mask or alignment",
                mask.bits()
            )));
        }
        let bytes = mm
            .dma_bytes(&buf)
            .map_err(|e| fail(format_args!("dma_bytes: {e}")))?;
        bytes.fill(0x77);
        if bytes.iter().any(|&b| b != 0x77) {
            return Err(fail("DMA buffer does not keep what was written"));
        }
        mm.dma_free(&buf)
            .map_err(|e| fail(format_args!("dma_free: {e}")))?;
    }
    if let Some(cma) = mm.cma_info() {
        // Larger than the largest buddy block: must come from the reservation.
        let len = (PAGE_SIZE << mm.max_order()) as usize * 2;
        let end = cma.base + cma.size;
        // The narrowest mask that reaches the whole reservation, as a device
        // driver would set it for a region in that zone.
        let mask = [DmaMask::Bits24, DmaMask::Bits32, DmaMask::Bits64]
            .into_iter()
            .find(|m| end <= m.limit())
            .unwrap_or(DmaMask::Bits64);
        if (len as u64) <= cma.size {
            // A mask the region lies beyond is refused: the buddy's blocks
            // are too small for the length, so nothing else can serve it.
            if cma.base >= DmaMask::Bits32.limit() {
                match mm.dma_alloc(len, 1 << 20, DmaMask::Bits32) {
                    Err(MmError::NoMemory) => {}
                    Ok(buf) => {
                        let _ = mm.dma_free(&buf);
                        return Err(fail(format_args!(
                            "a 32-bit dma_alloc({len}) was served at {:#x} by a reservation above 4 GiB",
                            buf.phys
                        )));
                    }
                    Err(e) => {
                        return Err(fail(format_args!(
                            "a 32-bit dma_alloc({len}) with the reservation above 4 GiB: want \"{}\", got \"{e}\"",
                            MmError::NoMemory
                        )))
                    }
                }
            }
            let buf = mm.dma_alloc(len, 1 << 20, mask).map_err(|e| {
                fail(format_args!(
                    "contiguous dma_alloc({len}, {}-bit) from the reservation in {}: {e}",
                    mask.bits(),
                    cma.zone.name()
                ))
            })?;
            if buf.source != DmaSource::Cma
                || buf.phys < cma.base
                || buf.phys + len as u64 > cma.base + cma.size
            {
                return Err(fail(format_args!(
                    "large DMA buffer {buf:?} not from the reservation"
                )));
            }
            scribble(&mut mm, buf.virt, len, 0x42)?;
            mm.dma_free(&buf)
                .map_err(|e| fail(format_args!("contiguous dma_free: {e}")))?;
        }
    }
    Ok(())
}

/// Runs every test; the first failure is returned.
pub fn run() -> TestResult {
    let tests: [Test; 11] = [
        ("invariants at boot", || check_invariants("at boot")),
        ("deferred initialisation", deferred_init),
        ("pages of every order", pages),
        ("kmalloc size classes", kmalloc),
        ("Rust collections on the global allocator", rust_alloc),
        ("slab cache with constructor", slab_cache),
        ("mempool", mempool),
        ("DMA buffers", dma),
        (
            "vmalloc: larger than any buddy block",
            vmalloc::larger_than_any_block,
        ),
        (
            "vmalloc: 1 MiB with no 1 MiB block free",
            vmalloc::fragmented,
        ),
        ("hermit-abi memory calls", || {
            crate::hermit::selftest().map_err(fail)
        }),
    ];
    for (name, test) in tests {
        test().map_err(|e| fail(format_args!("{name}: {e}")))?;
        info!("selftest: {name}: ok");
    }
    check_invariants("after the self-test")
}
