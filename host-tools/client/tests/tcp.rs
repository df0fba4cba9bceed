//! The client against the real service and memd-mm, over TCP on loopback:
//! one server thread serving connections one at a time, as a stand-in for
//! the kernel's loop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use memd_client::{Client, Error, Options};
use memd_mm::arena::HostMm;
use memd_mm::MemoryManager;
use memd_service::{BlockDevice, Config, Env, Flow, Service};
use memd_wire::*;

struct HostEnv<'a>(&'a mut MemoryManager);

impl Env for HostEnv<'_> {
    type Mem = MemoryManager;
    fn with_mem<R>(
        &mut self,
        f: impl FnOnce(&mut MemoryManager, Option<&mut dyn BlockDevice>) -> R,
    ) -> R {
        f(self.0, None)
    }
    fn now_ns(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }
}

/// Serves `conns` connections on `listener`, then returns the free memory
/// before the first and after the last.
fn serve(listener: TcpListener, conns: usize) -> (u64, u64) {
    let mut mm = HostMm::three_zones(64 << 20, 0, "").unwrap();
    let mut svc: Service<MemoryManager> = Service::new(Config::new("tok"));
    mm.reclaim();
    let before = mm.meminfo().free;
    for _ in 0..conns {
        let (mut s, _) = listener.accept().unwrap();
        let id = svc.on_connect();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut out = Vec::new();
            let flow = svc.on_bytes(&mut HostEnv(&mut mm), id, &buf[..n], &mut out);
            if s.write_all(&out).is_err() || flow != Flow::Continue {
                break;
            }
        }
        svc.on_close(&mut HostEnv(&mut mm), id);
    }
    mm.reclaim();
    (before, mm.meminfo().free)
}

#[test]
fn typed_calls_over_tcp_and_memory_returns() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = thread::spawn(move || serve(listener, 3));

    // Wrong token: a final server error, not a retry loop.
    let err = Client::connect(&Options::new(&addr, "nope")).err().unwrap();
    assert_eq!(err.code(), Some(errno::EACCES), "{err}");

    let mut c = Client::connect(&Options::new(&addr, "tok")).unwrap();
    assert_eq!(c.hello().version, PROTOCOL_VERSION);
    let st = c.status().unwrap();
    assert!(st.free_bytes > 0 && st.connections == 1);
    assert_eq!(c.zoneinfo().unwrap().len(), 3);
    assert!(!c.buddyinfo().unwrap().is_empty());
    let (pages, _) = c.alloc_pages(2, Gfp::KERNEL).unwrap();
    let obj = c.kmalloc(1000, Gfp::KERNEL).unwrap();
    assert_eq!(obj.size, 1024);
    let cache = c
        .cache_create("tcp", 48, 0, SlabFlags::default(), Ctor::None)
        .unwrap();
    let o = c.cache_alloc(cache, Gfp::KERNEL).unwrap();
    assert!(c
        .slabinfo()
        .unwrap()
        .iter()
        .any(|s| s.name == "tcp" && s.active_objs == 1));
    let pool = c
        .pool_create(PoolBacking::Kmalloc { size: 256 }, 3)
        .unwrap();
    let el = c.pool_alloc(pool, Gfp::KERNEL).unwrap();
    assert_eq!(c.mempools().unwrap().len(), 1);
    c.pool_free(pool, el.handle).unwrap();
    c.pool_destroy(pool).unwrap();
    let buf = c.dma_alloc(10_000, 0, DmaMask::Bits32).unwrap();
    c.dma_write(buf.handle, 5, b"abc".to_vec()).unwrap();
    assert_eq!(c.dma_read(buf.handle, 5, 3).unwrap(), b"abc");
    c.dma_fill(buf.handle, 3).unwrap();
    let mut expect = vec![0u8; 10_000];
    fill_pattern(3, 0, &mut expect);
    assert_eq!(c.dma_checksum(buf.handle, 0, 0).unwrap(), checksum(&expect));
    assert_eq!(
        c.dma_write_disk(buf.handle, 0).unwrap_err().code(),
        Some(errno::EINVAL),
        "10000 is not whole sectors"
    );
    assert_eq!(c.dma_buffers().unwrap().len(), 1);
    assert!(c.check().unwrap().ok);
    assert!(c.stress(5000, 1).unwrap().check_ok);
    // Batch: 1000 allocations, then free them all.
    let r = c
        .batch(
            (0..1000)
                .map(|_| Op::Kmalloc {
                    size: 32,
                    gfp: Gfp::KERNEL,
                })
                .collect(),
            true,
        )
        .unwrap();
    let frees: Vec<Op> = r
        .iter()
        .map(|r| match r {
            Ok(Reply::Object { handle, .. }) => Op::Kfree { handle: *handle },
            r => panic!("{r:?}"),
        })
        .collect();
    assert!(c.batch(frees, true).unwrap().iter().all(|r| r.is_ok()));
    assert_eq!(
        c.kfree(obj.handle + 1_000_000).unwrap_err().code(),
        Some(errno::ENOENT)
    );
    c.cache_free(cache, o.handle).unwrap();
    // Leave the pages, the object, the cache and the DMA buffer to the close.
    let _ = (pages, obj);
    drop(c);

    // A client that vanishes mid-frame.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&100u32.to_le_bytes()).unwrap();
    s.write_all(&[1, 2, 3]).unwrap();
    drop(s);

    let (before, after) = server.join().unwrap();
    assert_eq!(before, after, "free memory back to the baseline");
}

#[test]
fn connect_waits_for_the_listener() {
    // Reserve a port, release it, and start listening on it only later.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let server = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        serve(TcpListener::bind(("127.0.0.1", port)).unwrap(), 1)
    });
    let mut opts = Options::new(&addr, "tok");
    opts.ready_timeout = Duration::from_secs(10);
    let mut c = Client::connect(&opts).unwrap();
    assert!(c.status().is_ok());
    drop(c);
    server.join().unwrap();

    // Nothing listening at all: a connection error after the timeout.
    let mut opts = Options::new(&addr, "tok");
    opts.ready_timeout = Duration::from_millis(200);
    assert!(matches!(Client::connect(&opts), Err(Error::Connect(_))));
}

#[test]
fn token_file_is_found_upwards() {
    let root = std::env::temp_dir().join(format!("memd-client-test-{}", std::process::id()));
    let deep = root.join("a/b/c");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::create_dir_all(root.join(".memd")).unwrap();
    std::fs::write(root.join(".memd/token"), "abc123\n").unwrap();
    let p = memd_client::find_memd_file(&deep, "token").unwrap();
    assert_eq!(std::fs::read_to_string(p).unwrap().trim(), "abc123");
    assert!(memd_client::find_memd_file(&deep, "nonexistent").is_none());
    assert_eq!(memd_client::discover_token(Some("x")).unwrap(), "x");
    std::fs::remove_dir_all(&root).unwrap();
}
