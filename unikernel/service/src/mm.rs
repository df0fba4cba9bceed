//! [`Memory`] for memd-mm's `MemoryManager`.

use core::ptr::NonNull;

use memd_mm::{CacheId, DmaBuffer, FrameRun, MemoryManager, MmError, Owner, PoolElement, PoolId};
use memd_wire::{
    errno, CacheSpec, Ctor, DmaMask, FaultConfig, FaultStatus, FaultTarget, Gfp, Reply, SlabFlags,
};

use crate::memmap::{MapSnapshot, MAP_MAX_RANGES};
use crate::memory::{Backing, DmaFacts, MemError, Memory, Obj, View};

mod stats;

pub use stats::MmStats;

pub(crate) fn mm_err(e: MmError) -> MemError {
    let code = match e {
        MmError::NoMemory | MmError::InjectedFault => errno::ENOMEM,
        MmError::Invalid(_) => errno::EINVAL,
        MmError::Busy { .. } => errno::EBUSY,
        MmError::NotFound => errno::ENOENT,
        MmError::TableFull => errno::ENOSPC,
        MmError::NotPermitted => errno::EPERM,
        MmError::Corrupted(_) => errno::EFAULT,
    };
    MemError {
        code,
        message: e.message(),
        live: match e {
            MmError::Busy { live } => Some(live),
            _ => None,
        },
    }
}

/// GFP flags from a request: unknown bits, and the kernel's own MEMALLOC,
/// are refused.
fn gfp(g: Gfp) -> Result<Gfp, MemError> {
    Gfp::from_bits(g.bits()).ok_or(MemError::new(errno::EINVAL, "unknown GFP flag bits"))
}

/// A DMA request's length and alignment (0: a page) as memd-mm takes them.
pub(crate) fn dma_shape(len: u64, align: u64) -> Result<(usize, usize), MemError> {
    let too_big = MemError::new(errno::EINVAL, "length or alignment too large");
    let len = usize::try_from(len).map_err(|_| too_big)?;
    let align = if align == 0 {
        memd_mm::PAGE_SIZE
    } else {
        align
    };
    Ok((len, usize::try_from(align).map_err(|_| too_big)?))
}

fn ptr(addr: u64) -> Result<NonNull<u8>, MemError> {
    NonNull::new(addr as usize as *mut u8).ok_or(MemError::new(errno::EINVAL, "null address"))
}

fn fill<const B: u8>(obj: &mut [u8]) {
    obj.fill(B)
}

macro_rules! fill_table {
    ($($b:literal)*) => { [$(fill::<$b> as memd_mm::Ctor),*] };
}

/// One constructor per fill byte: memd-mm constructors are plain `fn`s.
static FILL_CTORS: [memd_mm::Ctor; 256] = fill_table!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60 61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90 91 92 93 94 95 96 97 98 99 100 101 102 103 104 105 106 107 108 109 110 111 112 113 114 115 116 117 118 119 120 121 122 123 124 125 126 127 128 129 130 131 132 133 134 135 136 137 138 139 140 141 142 143 144 145 146 147 148 149 150 151 152 153 154 155 156 157 158 159 160 161 162 163 164 165 166 167 168 169 170 171 172 173 174 175 176 177 178 179 180 181 182 183 184 185 186 187 188 189 190 191 192 193 194 195 196 197 198 199 200 201 202 203 204 205 206 207 208 209 210 211 212 213 214 215 216 217 218 219 220 221 222 223 224 225 226 227 228 229 230 231 232 233 234 235 236 237 238 239 240 241 242 243 244 245 246 247 248 249 250 251 252 253 254 255);

impl Memory for MemoryManager {
    type CacheId = CacheId;
    type PoolId = PoolId;
    type DmaBuf = DmaBuffer;
    type Lent = memd_mm::DmaLent;
    type Stats = MmStats;

    fn page_size(&self) -> u64 {
        memd_mm::PAGE_SIZE
    }

    fn max_order(&self) -> u32 {
        MemoryManager::max_order(self)
    }

    fn total_bytes(&mut self) -> u64 {
        self.meminfo().total
    }

    fn free_bytes(&mut self) -> u64 {
        self.meminfo().free
    }

    fn reported_bytes(&mut self) -> u64 {
        MemoryManager::reported_bytes(self)
    }

    fn balloon_bytes(&mut self) -> u64 {
        self.meminfo().balloon
    }

    fn as_owner<R>(&mut self, owner: u64, f: impl FnOnce(&mut Self) -> R) -> R {
        // An id from `owner_new` is live until `owner_free`; anything else
        // leaves the kernel as the owner.
        let _ = MemoryManager::set_owner(self, Owner(owner as u16));
        let r = f(self);
        // Pages the kernel takes next (virtio buffers, its heap) are its
        // own, and only kernel-owned ATOMIC requests may use the reserve
        // below `min`.
        let _ = MemoryManager::set_owner(self, Owner::KERNEL);
        r
    }

    fn owner_new(&mut self) -> Result<u64, MemError> {
        match MemoryManager::owner_alloc(self) {
            Ok(o) => Ok(o.0 as u64),
            Err(MmError::TableFull) => Err(MemError::new(
                errno::ENOSPC,
                "every owner id is live or still charged with pages",
            )),
            Err(e) => Err(mm_err(e)),
        }
    }

    fn owner_free(&mut self, owner: u64) {
        if let Ok(owner) = u16::try_from(owner) {
            let _ = MemoryManager::owner_free(self, Owner(owner));
        }
    }

    fn owners_tidy(&mut self) {
        MemoryManager::owners_shrink(self)
    }

    fn owner_pages(&mut self, owner: u64) -> u64 {
        u16::try_from(owner).map_or(0, |o| MemoryManager::owner_pages(self, Owner(o)))
    }

    fn alloc_pages(&mut self, order: u8, g: Gfp) -> Result<u64, MemError> {
        MemoryManager::alloc_pages(self, order as u32, gfp(g)?).map_err(mm_err)
    }

    fn free_pages(&mut self, phys: u64, order: u8) -> Result<(), MemError> {
        MemoryManager::free_pages(self, phys, order as u32).map_err(mm_err)
    }

    fn kmalloc(&mut self, size: u64, g: Gfp) -> Result<Obj, MemError> {
        let size =
            usize::try_from(size).map_err(|_| MemError::new(errno::EINVAL, "size too large"))?;
        let p = MemoryManager::kmalloc(self, size, gfp(g)?).map_err(mm_err)?;
        Ok(Obj {
            addr: p.as_ptr() as usize as u64,
            size: memd_mm::kmalloc_size_roundup(size) as u64,
        })
    }

    fn kfree(&mut self, obj: Obj) -> Result<(), MemError> {
        // The object is the service's own record of what kmalloc returned,
        // so its size class is trusted and the frame table is not consulted.
        let layout = core::alloc::Layout::from_size_align(obj.size as usize, 8)
            .map_err(|_| MemError::new(errno::EINVAL, "not a kmalloc object"))?;
        MemoryManager::kfree_layout(self, ptr(obj.addr)?, layout);
        Ok(())
    }

    fn cache_create(&mut self, spec: &CacheSpec) -> Result<CacheId, MemError> {
        let flags = SlabFlags::from_bits(spec.flags.bits())
            .ok_or(MemError::new(errno::EINVAL, "unknown slab flag bits"))?;
        let ctor = match spec.ctor {
            Ctor::None => None,
            Ctor::Fill(b) => Some(FILL_CTORS[b as usize]),
        };
        // 0 means the default alignment: a machine word, as in Linux.
        let align = if spec.align == 0 {
            8
        } else {
            spec.align as usize
        };
        MemoryManager::cache_create(self, &spec.name, spec.size as usize, align, flags, ctor)
            .map_err(mm_err)
    }

    fn cache_alloc(&mut self, cache: CacheId, g: Gfp) -> Result<Obj, MemError> {
        let p = MemoryManager::cache_alloc(self, cache, gfp(g)?).map_err(mm_err)?;
        let size = self.cache(cache).map_or(0, |c| c.object_size as u64);
        Ok(Obj {
            addr: p.as_ptr() as usize as u64,
            size,
        })
    }

    fn cache_free(&mut self, cache: CacheId, addr: u64) -> Result<(), MemError> {
        MemoryManager::cache_free(self, cache, ptr(addr)?).map_err(mm_err)
    }

    fn cache_shrink(&mut self, cache: CacheId) -> Result<u64, MemError> {
        MemoryManager::cache_shrink(self, cache).map_err(mm_err)
    }

    fn drop_caches(&mut self) -> u64 {
        self.reclaim()
    }

    fn cache_destroy(&mut self, cache: CacheId) -> Result<(), MemError> {
        MemoryManager::cache_destroy(self, cache).map_err(mm_err)
    }

    fn pool_create(
        &mut self,
        backing: Backing<CacheId>,
        min_nr: u32,
    ) -> Result<(PoolId, u64), MemError> {
        let backing = match backing {
            Backing::Cache(c) => memd_mm::PoolBacking::Cache(c),
            Backing::Kmalloc(s) => memd_mm::PoolBacking::Kmalloc(s as usize),
            Backing::Pages(o) => memd_mm::PoolBacking::Pages(o as u32),
        };
        let id = self
            .mempool_create(backing, min_nr as usize)
            .map_err(mm_err)?;
        let elem = self.mempool(id).map_or(0, |p| p.element_size as u64);
        Ok((id, elem))
    }

    fn pool_alloc(&mut self, pool: PoolId, g: Gfp) -> Result<Obj, MemError> {
        let e = self.mempool_alloc(pool, gfp(g)?).map_err(mm_err)?;
        let size = self.mempool(pool).map_or(0, |p| p.element_size as u64);
        Ok(Obj {
            addr: e.virt as u64,
            size,
        })
    }

    fn pool_free(&mut self, pool: PoolId, addr: u64) -> Result<(), MemError> {
        let virt = addr as usize;
        let e = PoolElement {
            virt,
            phys: self.direct_map().phys(virt),
        };
        self.mempool_free(pool, e).map_err(mm_err)
    }

    fn pool_destroy(&mut self, pool: PoolId) -> Result<(), MemError> {
        self.mempool_destroy(pool).map_err(mm_err)
    }

    fn dma_alloc(
        &mut self,
        len: u64,
        align: u64,
        mask: DmaMask,
        movable: bool,
    ) -> Result<DmaBuffer, MemError> {
        let (len, align) = dma_shape(len, align)?;
        MemoryManager::dma_alloc_zeroed(self, len, align, mask, movable).map_err(mm_err)
    }

    fn dma_alloc_unzeroed(
        &mut self,
        len: u64,
        align: u64,
        mask: DmaMask,
        movable: bool,
    ) -> Result<DmaBuffer, MemError> {
        let (len, align) = dma_shape(len, align)?;
        MemoryManager::dma_alloc_unzeroed(self, len, align, mask, movable).map_err(mm_err)
    }

    fn dma_facts(&self, buf: &DmaBuffer) -> DmaFacts {
        DmaFacts {
            phys: buf.phys,
            len: buf.len as u64,
            source: buf.source,
        }
    }

    fn dma_bytes<'a>(&'a mut self, buf: &'a DmaBuffer) -> Result<&'a mut [u8], MemError> {
        MemoryManager::dma_bytes(self, buf).map_err(mm_err)
    }

    fn dma_span_bytes<'a>(&'a mut self, buf: &'a DmaBuffer) -> Result<&'a mut [u8], MemError> {
        MemoryManager::dma_span_bytes(self, buf).map_err(mm_err)
    }

    fn dma_free(&mut self, buf: DmaBuffer) -> Result<(), MemError> {
        MemoryManager::dma_free(self, &buf).map_err(mm_err)
    }

    fn dma_lend(&mut self, buf: &DmaBuffer, span: bool) -> Result<memd_mm::DmaLent, MemError> {
        MemoryManager::dma_lend(self, buf, span).map_err(mm_err)
    }

    fn dma_unlend(&mut self, lent: memd_mm::DmaLent) {
        MemoryManager::dma_unlend(self, lent);
    }

    fn view_len(&mut self, view: View) -> usize {
        stats::view_len(self, view)
    }

    fn stats_room(view: View, entries: usize) -> Result<MmStats, MemError> {
        MmStats::with_room(view, entries)
            .ok_or(MemError::new(errno::ENOMEM, "no memory for the listing"))
    }

    fn snapshot(&mut self, view: View, out: &mut MmStats) {
        stats::snapshot(self, view, out)
    }

    fn render(view: View, s: &MmStats) -> Reply {
        stats::render(view, s)
    }

    fn memmap(&mut self, out: &mut MapSnapshot) -> Result<(), MemError> {
        let page = memd_mm::PAGE_SIZE;
        out.page_size = page;
        out.nr_frames = self.nr_frames() as u64;
        let mem = self.memory_ranges();
        out.nr_memory = mem.len().min(MAP_MAX_RANGES);
        out.memory[..out.nr_memory].copy_from_slice(&mem[..out.nr_memory]);
        // Memory plugged at run time is RAM too.
        for r in self.plugged_ranges() {
            if out.nr_memory == MAP_MAX_RANGES {
                break;
            }
            out.memory[out.nr_memory] = r;
            out.nr_memory += 1;
        }
        out.nr_zones = 0;
        for z in self.zoneinfo().iter().filter(|z| z.managed > 0) {
            out.zones[out.nr_zones] = (
                z.zone.name(),
                z.start_pfn * page,
                z.end_pfn * page,
                z.managed,
                z.free,
            );
            out.nr_zones += 1;
        }
        let res = self.reservations();
        out.nr_reservations = res.len().min(MAP_MAX_RANGES);
        for (slot, r) in out.reservations.iter_mut().zip(res) {
            *slot = (r.kind.name(), r.start, r.end);
        }
        out.cma = self.cma().map(|c| (c.base, c.end()));
        out.nr_cma_extents = 0;
        if let Some(c) = self.cma() {
            out.nr_cma_extents = c.extents().len().min(out.cma_extents.len());
            out.cma_used = (c.extents().len() as u64, c.used_pages * page);
            for (slot, e) in out.cma_extents.iter_mut().zip(c.extents()) {
                *slot = (e.start, e.start + e.pages * page);
            }
        }
        out.nr_runs = 0;
        out.granule = 1;
        Ok(())
    }

    fn memmap_runs(&mut self, from: u64, to: u64, take: &mut dyn FnMut(FrameRun)) {
        self.frame_runs_in(from, to).for_each(take);
    }

    fn check_step(
        &mut self,
        walk: &mut memd_mm::CheckWalk,
        pageblocks: usize,
    ) -> Result<bool, (&'static str, u64)> {
        MemoryManager::check_step(self, walk, pageblocks).map_err(|e| (e.what, e.pfn))
    }

    fn set_fault(&mut self, target: FaultTarget, c: FaultConfig) -> Result<(), MemError> {
        MemoryManager::set_fault(
            self,
            target == FaultTarget::Slab,
            c.probability,
            c.interval,
            c.times,
            0,
        )
        .map_err(mm_err)
    }

    fn faults(&self) -> FaultStatus {
        let (pages, slab) = MemoryManager::faults(self);
        FaultStatus { slab, pages }
    }
}
