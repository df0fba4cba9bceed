//! Test helpers: a model memory manager (a bookkeeping double that checks
//! every free against what it handed out), an environment over the real
//! memd-mm that flags every borrow like the kernel's lock, and a
//! client-side driver over either.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use memd_mm::{HostMm, MemoryManager};
use memd_service::{
    Backing, BlockDevice, Config, ConnId, DeviceDma, DirectEnv, DmaFacts, Env, Flow, MemError,
    Memory, Obj, Service, Transfer, View,
};
use memd_wire::*;

pub const TOKEN: &str = "s3cret";

thread_local! {
    static IN_MEM: Cell<bool> = const { Cell::new(false) };
}

/// Heap allocations and frees made inside [`under_lock`], counted by
/// [`Guard`].
pub static ALLOCS_UNDER_LOCK: AtomicU64 = AtomicU64::new(0);

/// A global allocator that forwards to the system one and counts what
/// happens inside [`under_lock`]. A test binary installs it with
/// `#[global_allocator] static GLOBAL: common::Guard = common::Guard;`.
pub struct Guard;

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if IN_MEM.with(|f| f.get()) {
            ALLOCS_UNDER_LOCK.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if IN_MEM.with(|f| f.get()) {
            ALLOCS_UNDER_LOCK.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

/// Runs `f` flagged as holding the memory manager (like the kernel's lock
/// around it), so [`Guard`] counts any heap use.
pub fn under_lock<R>(f: impl FnOnce() -> R) -> R {
    IN_MEM.with(|x| x.set(true));
    let r = f();
    IN_MEM.with(|x| x.set(false));
    r
}

/// An [`Env`] over the real memd-mm, like the kernel's: it lends the
/// manager (and the disk, if any) flagged as under the lock, so [`Guard`]
/// counts heap use inside, and it reports one ring a pretend device holds
/// for the DMA list.
pub struct LockEnv<'a> {
    pub mm: &'a mut MemoryManager,
    pub disk: Option<&'a mut RamDisk>,
}

impl<'a> LockEnv<'a> {
    /// The manager alone, no disk.
    pub fn new(mm: &'a mut MemoryManager) -> Self {
        LockEnv { mm, disk: None }
    }
}

impl Env for LockEnv<'_> {
    type Mem = MemoryManager;
    fn with_mem<R>(
        &mut self,
        f: impl FnOnce(&mut MemoryManager, Option<&mut dyn BlockDevice>) -> R,
    ) -> R {
        under_lock(|| match self.disk.as_deref_mut() {
            Some(d) => f(self.mm, Some(d)),
            None => f(self.mm, None),
        })
    }
    fn now_ns(&mut self) -> u64 {
        1
    }
    /// One ring a pretend device holds, for the DMA list.
    fn device_dma(&mut self) -> Vec<DeviceDma> {
        vec![DeviceDma {
            owner: "virtio-test queue 0 ring".into(),
            phys: 0x20_0000,
            len: 8192,
            cma: false,
        }]
    }
}

/// A model memory manager: a byte budget, and a record of every live
/// allocation with backing storage for DMA buffers. Freeing something it did
/// not hand out is an error (and is counted), so leaks and double frees in
/// the service show up; an allocation charged to no connection panics, so
/// does a missing [`Memory::as_owner`].
pub struct Model {
    pub capacity: u64,
    pub used: u64,
    next_addr: u64,
    pub live: BTreeMap<u64, (u64, &'static str)>,
    caches: BTreeMap<u32, (u64, u64)>,     // id -> (size, live)
    pools: BTreeMap<u32, (u64, u64, u32)>, // id -> (elem, live, min_nr)
    next_id: u32,
    dma: BTreeMap<u64, Vec<u8>>,
    pub bad_frees: u64,
    pub fault_slab: Option<FaultConfig>,
    /// The owner allocations are charged to; 0 is the kernel.
    pub owner: u64,
    /// Owner ids handed out and not freed.
    pub owners: std::collections::BTreeSet<u64>,
    next_owner: u64,
}

impl Model {
    pub fn new(capacity: u64) -> Self {
        Model {
            capacity,
            used: 0,
            next_addr: 0x10_0000,
            live: BTreeMap::new(),
            caches: BTreeMap::new(),
            pools: BTreeMap::new(),
            next_id: 1,
            dma: BTreeMap::new(),
            bad_frees: 0,
            fault_slab: None,
            owner: 0,
            owners: Default::default(),
            next_owner: 1,
        }
    }

    fn take(&mut self, size: u64, what: &'static str) -> Result<u64, MemError> {
        assert_ne!(self.owner, 0, "a client's {what} charged to the kernel");
        if self.used + size > self.capacity {
            return Err(MemError::new(errno::ENOMEM, "out of memory"));
        }
        self.used += size;
        let addr = self.next_addr;
        self.next_addr += size.max(8).next_multiple_of(4096);
        self.live.insert(addr, (size, what));
        Ok(addr)
    }

    fn give(&mut self, addr: u64, what: &'static str) -> Result<u64, MemError> {
        match self.live.get(&addr) {
            Some((size, w)) if *w == what => {
                let size = *size;
                self.live.remove(&addr);
                self.used -= size;
                Ok(size)
            }
            _ => {
                self.bad_frees += 1;
                Err(MemError::new(errno::EINVAL, "not allocated"))
            }
        }
    }
}

pub struct ModelDma(u64, u64);

/// A model buffer's bytes, out of the model while lent.
pub struct ModelLent(u64, Vec<u8>);

impl std::ops::Deref for ModelLent {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.1
    }
}

impl std::ops::DerefMut for ModelLent {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.1
    }
}

impl Memory for Model {
    type CacheId = u32;
    type PoolId = u32;
    type DmaBuf = ModelDma;
    type Lent = ModelLent;
    type Stats = Option<Reply>;

    fn page_size(&self) -> u64 {
        4096
    }
    fn max_order(&self) -> u32 {
        11
    }
    fn total_bytes(&mut self) -> u64 {
        self.capacity
    }
    fn free_bytes(&mut self) -> u64 {
        self.capacity - self.used
    }
    fn owner_new(&mut self) -> Result<u64, MemError> {
        let id = self.next_owner;
        self.next_owner += 1;
        self.owners.insert(id);
        Ok(id)
    }
    fn owner_free(&mut self, owner: u64) {
        assert!(
            self.owners.remove(&owner),
            "owner {owner} freed but not live"
        );
    }
    fn owner_pages(&mut self, _owner: u64) -> u64 {
        0
    }
    fn as_owner<R>(&mut self, owner: u64, f: impl FnOnce(&mut Self) -> R) -> R {
        assert_eq!(self.owner, 0, "as_owner inside as_owner");
        assert!(
            self.owners.contains(&owner),
            "allocation for owner {owner}, not live"
        );
        self.owner = owner;
        let r = f(self);
        self.owner = 0;
        r
    }
    fn alloc_pages(&mut self, order: u8, _gfp: Gfp) -> Result<u64, MemError> {
        if order >= 11 {
            return Err(MemError::new(errno::EINVAL, "order too large"));
        }
        self.take(4096 << order, "pages")
    }
    fn free_pages(&mut self, phys: u64, order: u8) -> Result<(), MemError> {
        let size = self.give(phys, "pages")?;
        assert_eq!(size, 4096 << order);
        Ok(())
    }
    fn kmalloc(&mut self, size: u64, _gfp: Gfp) -> Result<Obj, MemError> {
        if size == 0 {
            return Err(MemError::new(errno::EINVAL, "zero size"));
        }
        let size = size.next_power_of_two().max(8);
        Ok(Obj {
            addr: self.take(size, "kmalloc")?,
            size,
        })
    }
    fn kfree(&mut self, obj: Obj) -> Result<(), MemError> {
        self.give(obj.addr, "kmalloc").map(|_| ())
    }
    fn cache_create(&mut self, spec: &CacheSpec) -> Result<u32, MemError> {
        if spec.size == 0 {
            return Err(MemError::new(errno::EINVAL, "zero size"));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.caches.insert(id, (spec.size as u64, 0));
        Ok(id)
    }
    fn cache_alloc(&mut self, cache: u32, _gfp: Gfp) -> Result<Obj, MemError> {
        if self
            .fault_slab
            .is_some_and(|f| f.probability == 100 && f.times != 0)
        {
            return Err(MemError::new(
                errno::ENOMEM,
                "allocation failed by fault injection",
            ));
        }
        let size = self.caches[&cache].0;
        let addr = self.take(size, "cache")?;
        self.caches.get_mut(&cache).unwrap().1 += 1;
        Ok(Obj { addr, size })
    }
    fn cache_free(&mut self, cache: u32, addr: u64) -> Result<(), MemError> {
        self.give(addr, "cache")?;
        self.caches.get_mut(&cache).unwrap().1 -= 1;
        Ok(())
    }
    fn cache_shrink(&mut self, _cache: u32) -> Result<u64, MemError> {
        Ok(0)
    }
    // The model caches nothing: every free returns its bytes at once.
    fn drop_caches(&mut self) -> u64 {
        0
    }
    fn cache_destroy(&mut self, cache: u32) -> Result<(), MemError> {
        let live = self.caches[&cache].1;
        if live > 0 {
            return Err(MemError {
                code: errno::EBUSY,
                message: "objects still in use",
                live: Some(live),
            });
        }
        self.caches.remove(&cache);
        Ok(())
    }
    fn pool_create(&mut self, backing: Backing<u32>, min_nr: u32) -> Result<(u32, u64), MemError> {
        let elem = match backing {
            Backing::Cache(c) => self.caches[&c].0,
            Backing::Kmalloc(s) => s as u64,
            Backing::Pages(o) => 4096 << o,
        };
        let id = self.next_id;
        self.next_id += 1;
        self.take(elem * min_nr as u64, "pool-reserve")?;
        self.pools.insert(id, (elem, 0, min_nr));
        Ok((id, elem))
    }
    fn pool_alloc(&mut self, pool: u32, _gfp: Gfp) -> Result<Obj, MemError> {
        let elem = self.pools[&pool].0;
        let addr = self.take(elem, "pool")?;
        self.pools.get_mut(&pool).unwrap().1 += 1;
        Ok(Obj { addr, size: elem })
    }
    fn pool_free(&mut self, pool: u32, addr: u64) -> Result<(), MemError> {
        self.give(addr, "pool")?;
        self.pools.get_mut(&pool).unwrap().1 -= 1;
        Ok(())
    }
    fn pool_destroy(&mut self, pool: u32) -> Result<(), MemError> {
        let (elem, live, min_nr) = self.pools[&pool];
        assert_eq!(live, 0, "service destroyed a pool with elements out");
        self.pools.remove(&pool);
        self.used -= elem * min_nr as u64;
        let key = self
            .live
            .iter()
            .find(|(_, (s, w))| *w == "pool-reserve" && *s == elem * min_nr as u64)
            .map(|(k, _)| *k);
        self.live.remove(&key.unwrap());
        Ok(())
    }
    fn dma_alloc(
        &mut self,
        len: u64,
        _align: u64,
        _mask: DmaMask,
        _movable: bool,
    ) -> Result<ModelDma, MemError> {
        let addr = self.take(len, "dma")?;
        self.dma.insert(addr, vec![0; len as usize]);
        Ok(ModelDma(addr, len))
    }
    fn dma_facts(&self, buf: &ModelDma) -> DmaFacts {
        DmaFacts {
            phys: buf.0,
            len: buf.1,
            source: DmaSource::Buddy,
        }
    }
    fn dma_bytes<'a>(&'a mut self, buf: &'a ModelDma) -> Result<&'a mut [u8], MemError> {
        self.dma
            .get_mut(&buf.0)
            .map(|v| &mut v[..])
            .ok_or(MemError::new(errno::EINVAL, "stale buffer"))
    }
    fn dma_free(&mut self, buf: ModelDma) -> Result<(), MemError> {
        if self.live.contains_key(&buf.0) && !self.dma.contains_key(&buf.0) {
            return Err(MemError::new(errno::EBUSY, "its bytes are lent"));
        }
        self.give(buf.0, "dma")?;
        self.dma.remove(&buf.0);
        Ok(())
    }
    fn dma_lend(&mut self, buf: &ModelDma, _span: bool) -> Result<ModelLent, MemError> {
        let bytes = self
            .dma
            .remove(&buf.0)
            .ok_or(MemError::new(errno::EINVAL, "stale or lent buffer"))?;
        Ok(ModelLent(buf.0, bytes))
    }
    fn dma_unlend(&mut self, lent: ModelLent) {
        self.dma.insert(lent.0, lent.1);
    }
    fn snapshot(&mut self, view: View, out: &mut Option<Reply>) {
        *out = Some(match view {
            View::Meminfo => Reply::Meminfo(Box::new(MemInfo {
                total: self.capacity,
                free: self.capacity - self.used,
                ..Default::default()
            })),
            View::Slabinfo { start } => Reply::Slabinfo(
                self.caches
                    .iter()
                    .skip(start)
                    .take(memd_wire::VIEW_PAGE)
                    .map(|(id, (size, live))| SlabInfo {
                        name: format!("c{id}"),
                        objsize: *size,
                        active_objs: *live,
                        ..Default::default()
                    })
                    .collect(),
            ),
            View::Zoneinfo => Reply::Zoneinfo(vec![]),
            View::Buddyinfo => Reply::Buddyinfo(vec![]),
            View::Mempools { .. } => Reply::Mempools(vec![]),
            View::Cma => Reply::Cma(Box::default()),
        });
    }
    fn view_len(&mut self, _view: View) -> usize {
        0
    }
    fn stats_room(_view: View, _entries: usize) -> Result<Option<Reply>, MemError> {
        Ok(None)
    }
    fn render(_view: View, stats: &Option<Reply>) -> Reply {
        stats.clone().unwrap()
    }
    fn check_step(
        &mut self,
        _walk: &mut memd_mm::CheckWalk,
        _pageblocks: usize,
    ) -> Result<bool, (&'static str, u64)> {
        if self.bad_frees == 0 {
            Ok(true)
        } else {
            Err(("bad frees", self.bad_frees))
        }
    }
    fn set_fault(&mut self, target: FaultTarget, config: FaultConfig) -> Result<(), MemError> {
        if target == FaultTarget::Slab {
            self.fault_slab = Some(config);
        }
        Ok(())
    }
    /// The slab rule as set (the model keeps no counters); pages are never
    /// failed by the model.
    fn faults(&self) -> FaultStatus {
        FaultStatus {
            slab: self.fault_slab.map_or(FaultAttr::default(), |f| FaultAttr {
                probability: f.probability,
                interval: f.interval,
                times: f.times,
                calls: 0,
                injected: 0,
            }),
            pages: FaultAttr::default(),
        }
    }
}

/// An in-memory disk. A request completes at the second poll after it
/// started, so work waits for the device at least one turn.
pub struct RamDisk(pub Vec<u8>, pub Option<(bool, u64, usize, u32)>);

impl RamDisk {
    pub fn new(bytes: Vec<u8>) -> Self {
        RamDisk(bytes, None)
    }
}

impl BlockDevice for RamDisk {
    fn capacity_sectors(&self) -> u64 {
        self.0.len() as u64 / 512
    }
    fn max_request(&self) -> usize {
        1 << 20
    }
    fn start(&mut self, write: bool, sector: u64, buf: &mut [u8]) -> Result<bool, &'static str> {
        if self.1.is_some() {
            return Ok(false);
        }
        self.1 = Some((write, sector, buf.len(), 0));
        Ok(true)
    }
    fn poll(&mut self, buf: &mut [u8]) -> Option<Result<Transfer, &'static str>> {
        let (write, sector, len, polls) = self.1.as_mut()?;
        assert_eq!(*len, buf.len(), "polled with another buffer");
        *polls += 1;
        if *polls < 2 {
            return None;
        }
        let s = *sector as usize * 512;
        if *write {
            self.0[s..s + buf.len()].copy_from_slice(buf);
        } else {
            buf.copy_from_slice(&self.0[s..s + buf.len()]);
        }
        self.1 = None;
        Some(Ok(Transfer {
            requests: 1,
            descriptors: 3,
            data_descriptors: 1,
        }))
    }
}

pub fn clock() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// What a [`Harness`] runs the service over, and the [`Env`] it lends the
/// service for each call.
pub trait Backend {
    type Mem: Memory;
    type Env<'a>: Env<Mem = Self::Mem>
    where
        Self: 'a;
    fn env<'a>(&'a mut self, disk: Option<&'a mut RamDisk>) -> Self::Env<'a>;
}

/// The model, lent as it is ([`DirectEnv`], the host's clock).
impl Backend for Model {
    type Mem = Model;
    type Env<'a> = DirectEnv<'a, Model>;
    fn env<'a>(&'a mut self, disk: Option<&'a mut RamDisk>) -> DirectEnv<'a, Model> {
        DirectEnv {
            mem: self,
            block: disk.map(|d| d as &mut dyn BlockDevice),
            clock,
        }
    }
}

/// The real memd-mm over a host arena, lent through [`LockEnv`].
impl Backend for HostMm {
    type Mem = MemoryManager;
    type Env<'a> = LockEnv<'a>;
    fn env<'a>(&'a mut self, disk: Option<&'a mut RamDisk>) -> LockEnv<'a> {
        LockEnv { mm: self, disk }
    }
}

/// Drives connections of a service as clients would, decoding replies.
pub struct Harness<B: Backend> {
    pub svc: Service<B::Mem>,
    pub mem: B,
    pub disk: Option<RamDisk>,
}

impl<B: Backend> Harness<B> {
    pub fn new(mem: B) -> Self {
        Self::with_config(mem, Config::new(TOKEN))
    }

    /// A harness whose service has `config` (give it [`TOKEN`] to log in).
    pub fn with_config(mem: B, config: Config) -> Self {
        Harness {
            svc: Service::new(config),
            mem,
            disk: None,
        }
    }

    pub fn connect(&mut self) -> ConnId {
        self.svc.on_connect()
    }

    /// Send raw bytes; returns the decoded responses and the flow.
    pub fn send_raw(&mut self, conn: ConnId, bytes: &[u8]) -> (Vec<Response>, Flow) {
        let mut out = Vec::new();
        let mut env = self.mem.env(self.disk.as_mut());
        let flow = self.svc.on_bytes(&mut env, conn, bytes, &mut out);
        let mut dec = FrameDecoder::new();
        let mut input = &out[..];
        let mut resps = Vec::new();
        while let Some(body) = dec.feed(&mut input).unwrap() {
            resps.push(decode_body::<Response>(&body).unwrap());
        }
        assert!(input.is_empty() && dec.is_idle(), "partial reply frame");
        (resps, flow)
    }

    pub fn request(&mut self, conn: ConnId, req: &Request) -> (Response, Flow) {
        let (mut r, flow) = self.send_raw(conn, &to_frame(req).unwrap());
        assert_eq!(r.len(), 1, "one response per request");
        (r.remove(0), flow)
    }

    pub fn hello(&mut self, conn: ConnId) -> HelloAck {
        match self.request(
            conn,
            &Request::Hello(Hello {
                version: PROTOCOL_VERSION,
                token: TOKEN.into(),
                client: "t".into(),
            }),
        ) {
            (Response::Hello(ack), Flow::Continue) => ack,
            other => panic!("hello failed: {other:?}"),
        }
    }

    pub fn login(&mut self) -> ConnId {
        let c = self.connect();
        self.hello(c);
        c
    }

    pub fn call(&mut self, conn: ConnId, op: Op) -> Result<Reply, WireError> {
        match self.request(conn, &Request::Call(op)) {
            (Response::Call(r), _) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Sends `ops` as one batch; returns the per-op results and the flow.
    pub fn batch_flow(
        &mut self,
        conn: ConnId,
        ops: Vec<Op>,
        stop_on_error: bool,
    ) -> (Vec<Result<Reply, WireError>>, Flow) {
        match self.request(conn, &Request::Batch(Batch { stop_on_error, ops })) {
            (Response::Batch(results), flow) => (results, flow),
            other => panic!("a batch gets a batch reply, got {other:?}"),
        }
    }

    /// Sends `ops` as one batch; returns the per-op results.
    pub fn batch(
        &mut self,
        conn: ConnId,
        ops: Vec<Op>,
        stop_on_error: bool,
    ) -> Vec<Result<Reply, WireError>> {
        self.batch_flow(conn, ops, stop_on_error).0
    }

    pub fn ok(&mut self, conn: ConnId, op: Op) -> Reply {
        let name = op.name();
        self.call(conn, op)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// A slab cache `name` of `size`-byte objects (no alignment, flags or
    /// constructor); its handle.
    pub fn cache_create(&mut self, conn: ConnId, name: &str, size: u32) -> u64 {
        handle(&self.ok(
            conn,
            Op::CacheCreate(CacheSpec {
                name: name.into(),
                size,
                align: 0,
                flags: SlabFlags::default(),
                ctor: Ctor::None,
            }),
        ))
    }

    /// An object of `cache` (GFP_KERNEL); its handle.
    pub fn cache_alloc(&mut self, conn: ConnId, cache: u64) -> u64 {
        handle(&self.ok(
            conn,
            Op::CacheAlloc {
                cache,
                gfp: Gfp::KERNEL,
            },
        ))
    }

    /// A mempool over `backing` holding `min_nr` elements in reserve; its
    /// handle.
    pub fn pool_create(&mut self, conn: ConnId, backing: PoolBacking, min_nr: u32) -> u64 {
        handle(&self.ok(conn, Op::PoolCreate { backing, min_nr }))
    }

    /// An element of `pool`; its handle.
    pub fn pool_alloc(&mut self, conn: ConnId, pool: u64, gfp: Gfp) -> u64 {
        handle(&self.ok(conn, Op::PoolAlloc { pool, gfp }))
    }

    /// Frees `object` through `cache`, as [`Harness::call`].
    pub fn cache_free(
        &mut self,
        conn: ConnId,
        cache: u64,
        object: u64,
    ) -> Result<Reply, WireError> {
        self.call(conn, Op::CacheFree { cache, object })
    }

    /// Frees `object` through `pool`, as [`Harness::call`].
    pub fn pool_free(&mut self, conn: ConnId, pool: u64, object: u64) -> Result<Reply, WireError> {
        self.call(conn, Op::PoolFree { pool, object })
    }

    /// A DMA buffer; its handle.
    pub fn dma_alloc(&mut self, conn: ConnId, len: u64, align: u64, mask: DmaMask) -> u64 {
        handle(&self.ok(
            conn,
            Op::DmaAlloc {
                len,
                align,
                mask,
                movable: false,
            },
        ))
    }

    /// Fills DMA buffer `handle` with the pattern of `seed`.
    pub fn dma_fill(&mut self, conn: ConnId, handle: u64, seed: u64) -> Reply {
        self.ok(conn, Op::DmaFill { handle, seed })
    }

    /// Writes DMA buffer `handle` to the disk at `sector`.
    pub fn write_disk(&mut self, conn: ConnId, handle: u64, sector: u64) -> Reply {
        self.ok(conn, Op::DmaWriteDisk { handle, sector })
    }

    /// Reads DMA buffer `handle` from the disk at `sector`.
    pub fn read_disk(&mut self, conn: ConnId, handle: u64, sector: u64) -> Reply {
        self.ok(conn, Op::DmaReadDisk { handle, sector })
    }

    /// Asserts that the service's checksum of all of DMA buffer `handle` is
    /// that of `expect`.
    #[track_caller]
    pub fn assert_dma_holds(&mut self, conn: ConnId, handle: u64, expect: &[u8]) {
        assert_eq!(
            self.dma_checksum(conn, handle, 0, 0),
            Reply::Checksum(checksum(expect))
        );
    }

    /// The checksum of `len` bytes of DMA buffer `handle` from `offset`
    /// (0: to the end), as the service computes it.
    pub fn dma_checksum(&mut self, conn: ConnId, handle: u64, offset: u64, len: u64) -> Reply {
        self.ok(
            conn,
            Op::DmaChecksum {
                handle,
                offset,
                len,
            },
        )
    }

    pub fn code(&mut self, conn: ConnId, op: Op) -> i32 {
        match self.call(conn, op) {
            Err(e) => e.code,
            Ok(r) => panic!("expected an error, got {r:?}"),
        }
    }

    /// Closes `conn` at once (no disk: nothing waits for a device).
    pub fn close(&mut self, conn: ConnId) {
        let mut env = self.mem.env(None);
        self.svc.on_close_now(&mut env, conn);
    }
}

pub fn handle(r: &Reply) -> u64 {
    match r {
        Reply::Pages { handle, .. } | Reply::Object { handle, .. } | Reply::Created { handle } => {
            *handle
        }
        Reply::Dma(info) => info.handle,
        other => panic!("no handle in {other:?}"),
    }
}
