//! The client against the real service and memd-mm, over TCP on loopback:
//! one server thread serving connections one at a time, as a stand-in for
//! the kernel's loop.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use memd_client::{Client, Error, Options};
use memd_mm::HostMm;
use memd_service::host::{serve, serve_on, HostService};
use memd_wire::*;

/// A host service over a 64 MiB arena, and its free memory once the
/// caches are drained.
fn host() -> (Arc<Mutex<HostService>>, u64) {
    let shared = HostService::shared(HostMm::three_zones(64 << 20, 0, "").unwrap(), "tok");
    let free = drained_free(&shared);
    (shared, free)
}

fn drained_free(shared: &Mutex<HostService>) -> u64 {
    let mut h = shared.lock().unwrap();
    h.mm.reclaim();
    h.mm.meminfo().free
}

/// Waits until every connection has been closed by the service.
fn all_closed(shared: &Mutex<HostService>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.lock().unwrap().svc.connections() > 0 {
        assert!(Instant::now() < deadline, "connections still open");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn typed_calls_over_tcp_and_memory_returns() {
    let (shared, before) = host();
    let addr = serve(shared.clone()).unwrap();

    // Wrong token: a final server error, not a retry loop.
    let err = Client::connect(&Options::new(&addr, "nope")).err().unwrap();
    assert_eq!(err.code(), Some(errno::EACCES), "{err}");

    let mut c = Client::connect(&Options::new(&addr, "tok")).unwrap();
    assert_eq!(c.hello().version, PROTOCOL_VERSION);
    let st = c.status().unwrap();
    assert!(st.free_bytes > 0 && st.connections == 1);
    assert_eq!(
        c.zoneinfo().unwrap().len(),
        4,
        "DMA, DMA32, Normal, Movable"
    );
    assert!(!c.buddyinfo().unwrap().is_empty());
    let (pages, _) = c.alloc_pages(2, Gfp::KERNEL).unwrap();
    let obj = c.kmalloc(1000, Gfp::KERNEL).unwrap();
    assert_eq!(obj.size, 1024);
    let cache = c
        .cache_create(CacheSpec {
            name: "tcp".into(),
            size: 48,
            align: 0,
            flags: SlabFlags::default(),
            ctor: Ctor::None,
        })
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

    all_closed(&shared);
    assert_eq!(
        before,
        drained_free(&shared),
        "free memory back to the baseline"
    );
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn connect_waits_for_the_listener() {
    // Start listening on the port only later.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (shared, _) = host();
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        serve_on(TcpListener::bind(("127.0.0.1", port)).unwrap(), shared)
    });
    let mut opts = Options::new(&addr, "tok");
    opts.ready_timeout = Duration::from_secs(10);
    let mut c = Client::connect(&opts).unwrap();
    assert!(c.status().is_ok());
    drop(c);

    // Nothing listening at all: a connection error after the timeout.
    let addr = format!("127.0.0.1:{}", free_port());
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
