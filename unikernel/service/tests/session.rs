//! Service behaviour over the model memory manager: handshake, handles,
//! quotas, batches, hostile input, and release on close.

mod common;

use common::*;
use memd_service::{Config, DirectEnv, Flow};
use memd_wire::*;
use proptest::prelude::*;

fn harness() -> Harness<Model> {
    Harness::new(Model::new(64 << 20))
}

fn hello_req(version: u32, token: &str) -> Request {
    Request::Hello(Hello {
        version,
        token: token.into(),
        client: "x".into(),
    })
}

/// Fault injection: every slab allocation fails from now on.
fn fail_every_slab_alloc() -> Op {
    Op::FaultInject {
        target: FaultTarget::Slab,
        config: FaultConfig {
            probability: 100,
            interval: 1,
            times: -1,
        },
    }
}

fn closing_code(r: &Response) -> i32 {
    match r {
        Response::Error {
            error,
            closing: true,
        } => error.code,
        other => panic!("expected a closing error, got {other:?}"),
    }
}

#[test]
fn nothing_is_served_before_hello() {
    let mut h = harness();
    let c = h.connect();
    let (r, flow) = h.request(c, &Request::Call(Op::Status));
    assert_eq!(closing_code(&r), errno::EACCES);
    assert_eq!(flow, Flow::Close);
    // Further bytes on a closing connection are ignored.
    let (rs, flow) = h.send_raw(c, &to_frame(&hello_req(PROTOCOL_VERSION, TOKEN)).unwrap());
    assert!(rs.is_empty());
    assert_eq!(flow, Flow::Close);
}

#[test]
fn wrong_version_and_token_close() {
    let mut h = harness();
    let c = h.connect();
    let (r, flow) = h.request(c, &hello_req(PROTOCOL_VERSION + 1, TOKEN));
    assert_eq!(closing_code(&r), errno::EPROTO);
    assert_eq!(flow, Flow::Close);
    let c = h.connect();
    let (r, _) = h.request(c, &hello_req(PROTOCOL_VERSION, "s3cre"));
    assert_eq!(closing_code(&r), errno::EACCES);
    let c = h.connect();
    let (r, _) = h.request(c, &hello_req(PROTOCOL_VERSION, ""));
    assert_eq!(closing_code(&r), errno::EACCES);
    // A good client is unaffected.
    let good = h.login();
    assert!(matches!(h.ok(good, Op::Status), Reply::Status(s) if s.connections == 4));
}

#[test]
fn second_hello_is_an_error_not_a_close() {
    let mut h = harness();
    let c = h.login();
    let (r, flow) = h.request(c, &hello_req(PROTOCOL_VERSION, TOKEN));
    assert!(matches!(r, Response::Error { closing: false, error } if error.code == errno::EPROTO));
    assert_eq!(flow, Flow::Continue);
}

#[test]
fn oversize_frame_closes_before_buffering() {
    let mut h = harness();
    let c = h.login();
    let prefix = ((MAX_FRAME + 1) as u32).to_le_bytes();
    let (rs, flow) = h.send_raw(c, &prefix);
    assert_eq!(rs.len(), 1);
    assert_eq!(closing_code(&rs[0]), errno::E2BIG);
    assert_eq!(flow, Flow::Close);
}

#[test]
fn malformed_body_after_hello_keeps_the_connection() {
    let mut h = harness();
    let c = h.login();
    let mut frame = 3u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0xff, 0xff, 0xff]);
    let (rs, flow) = h.send_raw(c, &frame);
    assert!(
        matches!(&rs[..], [Response::Error { closing: false, error }] if error.code == errno::EPROTO)
    );
    assert_eq!(flow, Flow::Continue);
    assert!(matches!(h.ok(c, Op::Status), Reply::Status(_)));
}

#[test]
fn requests_split_and_coalesced() {
    let mut h = harness();
    let c = h.connect();
    let mut stream = to_frame(&hello_req(PROTOCOL_VERSION, TOKEN)).unwrap();
    stream.extend(
        to_frame(&Request::Call(Op::Kmalloc {
            size: 100,
            gfp: Gfp::KERNEL,
        }))
        .unwrap(),
    );
    stream.extend(to_frame(&Request::Call(Op::Status)).unwrap());
    // Byte by byte for the first half, then the rest at once.
    let half = stream.len() / 2;
    let mut got = Vec::new();
    for b in &stream[..half] {
        let (rs, flow) = h.send_raw(c, std::slice::from_ref(b));
        assert_eq!(flow, Flow::Continue);
        got.extend(rs);
    }
    let (rs, _) = h.send_raw(c, &stream[half..]);
    got.extend(rs);
    assert_eq!(got.len(), 3);
    assert!(matches!(got[0], Response::Hello(_)));
    assert!(matches!(
        got[1],
        Response::Call(Ok(Reply::Object { size: 128, .. }))
    ));
    assert!(matches!(got[2], Response::Call(Ok(Reply::Status(_)))));
}

#[test]
fn every_resource_is_released_on_close() {
    let mut h = harness();
    let c = h.login();
    h.ok(
        c,
        Op::AllocPages {
            order: 2,
            gfp: Gfp::KERNEL,
        },
    );
    h.ok(
        c,
        Op::Kmalloc {
            size: 3000,
            gfp: Gfp::KERNEL | Gfp::ZERO,
        },
    );
    let cache = handle(&h.ok(
        c,
        Op::CacheCreate(CacheSpec {
            name: "foo".into(),
            size: 96,
            align: 8,
            flags: SlabFlags::POISON,
            ctor: Ctor::Fill(0x5a),
        }),
    ));
    for _ in 0..10 {
        h.ok(
            c,
            Op::CacheAlloc {
                cache,
                gfp: Gfp::KERNEL,
            },
        );
    }
    let pool = h.pool_create(c, PoolBacking::Cache(cache), 4);
    h.ok(
        c,
        Op::PoolAlloc {
            pool,
            gfp: Gfp::ATOMIC,
        },
    );
    h.ok(
        c,
        Op::DmaAlloc {
            len: 1 << 20,
            align: 0,
            mask: DmaMask::Bits32,
            movable: false,
        },
    );
    assert!(h.mem.used > 0);
    assert_eq!(h.svc.handles_of(c), Some(16));
    h.close(c);
    assert_eq!(h.mem.used, 0, "memory back to baseline");
    assert!(h.mem.live.is_empty());
    assert_eq!(h.mem.bad_frees, 0);
    assert_eq!(h.svc.connections(), 0);
}

#[test]
fn cache_and_pool_lifecycles() {
    let mut h = harness();
    let c = h.login();
    let cache = h.cache_create(c, "obj", 64);
    let o = h.cache_alloc(c, cache);
    let e = h.call(c, Op::CacheDestroy { cache }).unwrap_err();
    assert_eq!(e.code, errno::EBUSY);
    assert!(e.message.contains("1 live"), "{}", e.message);
    let pool = h.pool_create(c, PoolBacking::Cache(cache), 2);
    // The object must go back to its own cache, through the right call.
    assert_eq!(h.code(c, Op::Kfree { handle: o }), errno::EINVAL);
    assert_eq!(h.code(c, Op::PoolFree { pool, object: o }), errno::EINVAL);
    h.ok(c, Op::CacheFree { cache, object: o });
    assert_eq!(
        h.code(c, Op::CacheDestroy { cache }),
        errno::EBUSY,
        "a pool still uses it"
    );
    let el = h.pool_alloc(c, pool, Gfp::KERNEL);
    assert_eq!(h.code(c, Op::PoolDestroy { pool }), errno::EBUSY);
    h.ok(c, Op::PoolFree { pool, object: el });
    h.ok(c, Op::PoolDestroy { pool });
    assert!(matches!(
        h.ok(c, Op::CacheShrink { cache }),
        Reply::Shrunk { .. }
    ));
    h.ok(c, Op::CacheDestroy { cache });
    assert_eq!(h.svc.handles_of(c), Some(0));
    assert_eq!(h.mem.used, 0);
    // Bad names.
    let long = "x".repeat(MAX_NAME_LEN + 1);
    assert_eq!(
        h.code(
            c,
            Op::CacheCreate(CacheSpec {
                name: long,
                size: 8,
                align: 0,
                flags: SlabFlags::default(),
                ctor: Ctor::None
            })
        ),
        errno::EINVAL
    );
}

#[test]
fn foreign_unknown_and_double_free() {
    let mut h = harness();
    let a = h.login();
    let b = h.login();
    let pages = handle(&h.ok(
        a,
        Op::AllocPages {
            order: 0,
            gfp: Gfp::KERNEL,
        },
    ));
    assert_eq!(h.code(b, Op::FreePages { handle: pages }), errno::ENOENT);
    assert_eq!(h.code(b, Op::FreePages { handle: 999_999 }), errno::ENOENT);
    h.ok(a, Op::FreePages { handle: pages });
    assert_eq!(h.code(a, Op::FreePages { handle: pages }), errno::ENOENT);
    let obj = handle(&h.ok(
        a,
        Op::Kmalloc {
            size: 8,
            gfp: Gfp::KERNEL,
        },
    ));
    assert_eq!(
        h.code(a, Op::FreePages { handle: obj }),
        errno::EINVAL,
        "wrong kind"
    );
    h.ok(a, Op::Kfree { handle: obj });
    assert_eq!(h.code(a, Op::Kfree { handle: obj }), errno::ENOENT);
    assert_eq!(
        h.mem.bad_frees, 0,
        "the memory manager never saw a bad free"
    );
}

#[test]
fn dma_buffer_io() {
    let mut h = harness();
    let c = h.login();
    let buf = match h.ok(
        c,
        Op::DmaAlloc {
            len: 8192,
            align: 4096,
            mask: DmaMask::Bits24,
            movable: false,
        },
    ) {
        Reply::Dma(info) => {
            assert_eq!((info.len, info.conn, info.mask), (8192, c, DmaMask::Bits24));
            info.handle
        }
        r => panic!("{r:?}"),
    };
    h.ok(
        c,
        Op::DmaWrite {
            handle: buf,
            offset: 100,
            data: b"hello".to_vec(),
        },
    );
    assert_eq!(
        h.ok(
            c,
            Op::DmaRead {
                handle: buf,
                offset: 100,
                len: 5
            }
        ),
        Reply::Data(b"hello".to_vec())
    );
    assert_eq!(
        h.code(
            c,
            Op::DmaWrite {
                handle: buf,
                offset: 8190,
                data: vec![1, 2, 3]
            }
        ),
        errno::EINVAL
    );
    assert_eq!(
        h.code(
            c,
            Op::DmaRead {
                handle: buf,
                offset: u64::MAX,
                len: 2
            }
        ),
        errno::EINVAL
    );
    assert_eq!(
        h.code(
            c,
            Op::DmaRead {
                handle: buf,
                offset: 0,
                len: MAX_IO as u32 + 1
            }
        ),
        errno::E2BIG
    );
    h.dma_fill(c, buf, 7);
    let mut expect = vec![0u8; 8192];
    fill_pattern(7, 0, &mut expect);
    h.assert_dma_holds(c, buf, &expect);
    assert_eq!(
        h.dma_checksum(c, buf, 4096, 100),
        Reply::Checksum(checksum(&expect[4096..4196]))
    );
    assert!(
        matches!(h.ok(c, Op::DmaBuffers { start: 0 }), Reply::DmaBuffers(v) if v.len() == 1 && v[0].handle == buf)
    );
    assert_eq!(
        h.code(
            c,
            Op::DmaAlloc {
                len: 4096,
                align: 3,
                mask: DmaMask::Bits64,
                movable: false
            }
        ),
        errno::EINVAL
    );
    assert_eq!(
        h.code(
            c,
            Op::DmaAlloc {
                len: 0,
                align: 0,
                mask: DmaMask::Bits64,
                movable: false
            }
        ),
        errno::EINVAL
    );
    // No disk: ENODEV.
    assert_eq!(
        h.code(
            c,
            Op::DmaWriteDisk {
                handle: buf,
                sector: 0
            }
        ),
        errno::ENODEV
    );
    h.disk = Some(RamDisk::new(vec![0; 64 * 512]));
    match h.write_disk(c, buf, 3) {
        Reply::Transfer(t) => {
            assert_eq!((t.bytes, t.sector, t.requests), (8192, 3, 1), "{t:?}")
        }
        r => panic!("write-disk replied {r:?}"),
    }
    assert_eq!(
        &h.disk.as_ref().unwrap().0[3 * 512..3 * 512 + 8192],
        &expect[..]
    );
    h.dma_fill(c, buf, 8);
    h.read_disk(c, buf, 3);
    h.assert_dma_holds(c, buf, &expect);
    assert_eq!(
        h.code(
            c,
            Op::DmaReadDisk {
                handle: buf,
                sector: 60
            }
        ),
        errno::EINVAL,
        "past the end"
    );
    h.ok(c, Op::DmaFree { handle: buf });
    assert_eq!(h.code(c, Op::DmaFree { handle: buf }), errno::ENOENT);
    assert_eq!(h.mem.used, 0);
}

#[test]
fn quotas_bound_one_client_only() {
    let mut h = Harness::with_config(
        Model::new(64 << 20),
        Config {
            quota: Quota {
                pages: 8,
                bytes: 64 << 10,
                handles: 4,
                caches: 8,
            },
            ..Config::new(TOKEN)
        },
    );
    let a = h.login();
    assert_eq!(
        h.code(
            a,
            Op::AllocPages {
                order: 4,
                gfp: Gfp::KERNEL
            }
        ),
        errno::EDQUOT
    );
    h.ok(
        a,
        Op::AllocPages {
            order: 3,
            gfp: Gfp::KERNEL,
        },
    );
    assert_eq!(
        h.code(
            a,
            Op::AllocPages {
                order: 0,
                gfp: Gfp::KERNEL
            }
        ),
        errno::EDQUOT
    );
    assert_eq!(
        h.code(
            a,
            Op::Kmalloc {
                size: 64 << 10,
                gfp: Gfp::KERNEL
            }
        ),
        errno::EDQUOT
    );
    for _ in 0..3 {
        h.ok(
            a,
            Op::Kmalloc {
                size: 16,
                gfp: Gfp::KERNEL,
            },
        );
    }
    assert_eq!(
        h.code(
            a,
            Op::Kmalloc {
                size: 16,
                gfp: Gfp::KERNEL
            }
        ),
        errno::EDQUOT,
        "handle quota"
    );
    let b = h.login();
    h.ok(
        b,
        Op::AllocPages {
            order: 3,
            gfp: Gfp::KERNEL,
        },
    );
    match h.ok(b, Op::Clients) {
        Reply::Clients(v) => {
            let ca = v.iter().find(|c| c.conn == a).unwrap();
            assert_eq!((ca.handles, ca.pages), (4, 8));
            assert!(ca.errors >= 4);
        }
        r => panic!("{r:?}"),
    }
    h.close(a);
    h.close(b);
    assert_eq!(h.mem.used, 0);
}

#[test]
fn batches_report_per_op_results() {
    let mut h = harness();
    let c = h.login();
    let ops: Vec<Op> = (0..1000)
        .map(|_| Op::Kmalloc {
            size: 64,
            gfp: Gfp::KERNEL,
        })
        .collect();
    let results = h.batch(c, ops, false);
    assert_eq!(results.len(), 1000);
    let handles: Vec<u64> = results
        .iter()
        .map(|r| handle(r.as_ref().unwrap()))
        .collect();
    let mut ops: Vec<Op> = handles.iter().map(|&h| Op::Kfree { handle: h }).collect();
    ops.insert(
        500,
        Op::Kfree {
            handle: 123_456_789,
        },
    );
    let results = h.batch(c, ops.clone(), false);
    assert_eq!(results.len(), 1001);
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    assert_eq!(results[500].as_ref().unwrap_err().code, errno::ENOENT);
    assert_eq!(h.mem.used, 0);
    // stop_on_error: everything already freed, so the first op fails and
    // nothing else runs.
    let results = h.batch(c, ops, true);
    assert_eq!(results.len(), 1);
}

#[test]
fn batch_reads_are_bounded_by_the_frame() {
    let mut h = harness();
    let c = h.login();
    let buf = h.dma_alloc(c, 1 << 20, 0, DmaMask::Bits64);
    let ops = vec![
        Op::DmaRead {
            handle: buf,
            offset: 0,
            len: 600 << 10
        };
        3
    ];
    let results = h.batch(c, ops, false);
    assert!(results[0].is_ok());
    assert_eq!(results[1].as_ref().unwrap_err().code, errno::E2BIG);
}

#[test]
fn huge_batches_of_errors_still_fit_a_frame() {
    let mut h = harness();
    let c = h.login();
    let ops = vec![Op::Kfree { handle: 77 }; MAX_BATCH_OPS];
    let (results, flow) = h.batch_flow(c, ops, false);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(
        results.len(),
        MAX_BATCH_OPS,
        "a full batch of errors fits one frame"
    );
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_err_and(|e| e.code == errno::ENOENT)));
    let ops = vec![Op::Kfree { handle: 77 }; MAX_BATCH_OPS + 1];
    let results = h.batch(c, ops, false);
    assert_eq!(results.len(), 1, "one op too many is refused whole");
    assert_eq!(results[0].as_ref().unwrap_err().code, errno::E2BIG);
}

#[test]
fn stress_fault_check_shutdown() {
    let mut h = harness();
    let c = h.login();
    match h.ok(
        c,
        Op::Stress {
            ops: 20_000,
            seed: 1,
            cpus: 1,
        },
    ) {
        Reply::Stress(s) => {
            assert_eq!(s.ops, 20_000);
            assert!(s.ops_per_sec > 0 && s.check_ok);
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(h.mem.used, 0, "stress frees what it allocated");
    let cache = h.cache_create(c, "f", 32);
    h.ok(c, fail_every_slab_alloc());
    assert_eq!(
        h.code(
            c,
            Op::CacheAlloc {
                cache,
                gfp: Gfp::KERNEL
            }
        ),
        errno::ENOMEM
    );
    assert_eq!(
        h.code(
            c,
            Op::FaultInject {
                target: FaultTarget::Pages,
                config: FaultConfig {
                    probability: 101,
                    interval: 1,
                    times: 1
                }
            }
        ),
        errno::EINVAL
    );
    assert!(matches!(h.ok(c, Op::Check), Reply::Check(r) if r.ok));
    let (r, flow) = h.request(c, &Request::Call(Op::Shutdown));
    assert_eq!(r, Response::Call(Ok(Reply::Done)));
    assert_eq!(flow, Flow::Shutdown);
}

fn arb_op(handles: u64) -> impl Strategy<Value = Op> {
    let h = 0..handles.max(1) + 2;
    prop_oneof![
        (0u8..4).prop_map(|order| Op::AllocPages {
            order,
            gfp: Gfp::KERNEL
        }),
        h.clone().prop_map(|handle| Op::FreePages { handle }),
        (1u64..5000).prop_map(|size| Op::Kmalloc {
            size,
            gfp: Gfp::KERNEL
        }),
        h.clone().prop_map(|handle| Op::Kfree { handle }),
        (1u32..512).prop_map(|size| Op::CacheCreate(CacheSpec {
            name: "c".into(),
            size,
            align: 0,
            flags: SlabFlags::default(),
            ctor: Ctor::None
        })),
        h.clone().prop_map(|cache| Op::CacheAlloc {
            cache,
            gfp: Gfp::KERNEL
        }),
        (h.clone(), h.clone()).prop_map(|(cache, object)| Op::CacheFree { cache, object }),
        h.clone().prop_map(|cache| Op::CacheDestroy { cache }),
        (h.clone(), 0u32..4).prop_map(|(c, min_nr)| Op::PoolCreate {
            backing: PoolBacking::Cache(c),
            min_nr
        }),
        (0u8..3, 0u32..4).prop_map(|(order, min_nr)| Op::PoolCreate {
            backing: PoolBacking::Pages { order },
            min_nr
        }),
        h.clone().prop_map(|pool| Op::PoolAlloc {
            pool,
            gfp: Gfp::KERNEL
        }),
        (h.clone(), h.clone()).prop_map(|(pool, object)| Op::PoolFree { pool, object }),
        h.clone().prop_map(|pool| Op::PoolDestroy { pool }),
        (1u64..20000).prop_map(|len| Op::DmaAlloc {
            len,
            align: 0,
            mask: DmaMask::Bits32,
            movable: false
        }),
        h.clone().prop_map(|handle| Op::DmaFree { handle }),
        (h.clone(), 0u64..30000).prop_map(|(handle, offset)| Op::DmaWrite {
            handle,
            offset,
            data: vec![1; 10]
        }),
        (h, any::<u64>()).prop_map(|(handle, seed)| Op::DmaFill { handle, seed }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random operations from two clients, using each other's handles and
    /// stale ones, never confuse the memory manager, and closing both
    /// connections returns every byte.
    #[test]
    fn random_sessions_return_to_baseline(
        ops in proptest::collection::vec((any::<bool>(), arb_op(60)), 1..200)
    ) {
        let mut h = harness();
        let a = h.login();
        let b = h.login();
        for (first, op) in ops {
            let _ = h.call(if first { a } else { b }, op);
        }
        h.close(a);
        prop_assert_eq!(h.svc.handles_of(b).is_some(), true);
        h.close(b);
        prop_assert_eq!(h.mem.used, 0);
        prop_assert!(h.mem.live.is_empty());
        prop_assert_eq!(h.mem.bad_frees, 0);
    }

    /// Garbage never panics, before or after the hello, and never touches
    /// another connection.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096), auth in any::<bool>()) {
        let mut h = harness();
        let other = h.login();
        h.ok(other, Op::Kmalloc { size: 64, gfp: Gfp::KERNEL });
        let c = h.connect();
        if auth {
            h.hello(c);
        }
        let _ = h.send_raw(c, &bytes);
        h.close(c);
        prop_assert_eq!(h.svc.handles_of(other), Some(1));
        prop_assert!(matches!(h.ok(other, Op::Status), Reply::Status(_)));
    }
}

#[test]
fn objects_go_back_only_to_their_own_parent() {
    let mut h = harness();
    let c = h.login();
    let a = h.cache_create(c, "a", 32);
    let b = h.cache_create(c, "b", 32);
    let o = h.cache_alloc(c, a);
    let e = h.cache_free(c, b, o).unwrap_err();
    assert_eq!(e.code, errno::EINVAL);
    assert!(
        e.message
            .contains(&format!("belongs to cache {a}, not {b}")),
        "{}",
        e.message
    );
    let e = h.cache_free(c, o, o).unwrap_err();
    assert_eq!(
        e.code,
        errno::EINVAL,
        "a cache object is not a cache: {}",
        e.message
    );
    let p = h.pool_create(c, PoolBacking::Cache(a), 1);
    let q = h.pool_create(c, PoolBacking::Cache(b), 1);
    let el = h.pool_alloc(c, p, Gfp::KERNEL);
    let e = h.pool_free(c, q, el).unwrap_err();
    assert_eq!(e.code, errno::EINVAL);
    assert!(
        e.message.contains(&format!("belongs to pool {p}, not {q}")),
        "{}",
        e.message
    );
    assert_eq!(h.cache_free(c, a, el).unwrap_err().code, errno::EINVAL);
    // Nothing was released by the refused calls.
    h.cache_free(c, a, o).unwrap();
    h.pool_free(c, p, el).unwrap();
    for pool in [p, q] {
        h.ok(c, Op::PoolDestroy { pool });
    }
    for cache in [a, b] {
        h.ok(c, Op::CacheDestroy { cache });
    }
    assert_eq!(h.svc.handles_of(c), Some(0));
    assert_eq!(h.mem.used, 0);
}

/// A frame holding a batch that announces `count` operations, padded with
/// zero bytes to `len`: the hostile client's batch.
fn claimed_batch_frame(count: u64, len: usize) -> Vec<u8> {
    let mut body = batch_prefix(false, count);
    body.resize(len, 0);
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    frame
}

#[test]
fn before_hello_only_a_small_hello_is_taken() {
    let mut h = harness();
    // A frame above the hello limit: refused at its prefix, nothing of the
    // body is buffered, the connection closes.
    let c = h.connect();
    let prefix = ((memd_service::MAX_HELLO_FRAME + 1) as u32).to_le_bytes();
    let (rs, flow) = h.send_raw(c, &prefix);
    assert_eq!(closing_code(&rs[0]), errno::E2BIG);
    assert_eq!(flow, Flow::Close);
    // The hostile batch: count 200000 and zero bytes, before any hello.
    let c = h.connect();
    let frame = claimed_batch_frame(200_000, 600);
    let (rs, flow) = h.send_raw(c, &frame);
    assert_eq!(closing_code(&rs[0]), errno::EACCES);
    assert_eq!(flow, Flow::Close);
    // A real client is served all the while.
    let good = h.login();
    assert!(matches!(h.ok(good, Op::Status), Reply::Status(_)));
}

#[test]
fn an_oversized_batch_count_is_refused_before_it_is_reserved() {
    let mut h = harness();
    let c = h.login();
    let frame = claimed_batch_frame(200_000, 200_000);
    let (rs, flow) = h.send_raw(c, &frame);
    assert_eq!(flow, Flow::Continue);
    assert!(
        matches!(&rs[..], [Response::Batch(r)] if r.len() == 1 && r[0].as_ref().unwrap_err().code == errno::E2BIG),
        "{rs:?}"
    );
    assert!(matches!(h.ok(c, Op::Status), Reply::Status(_)));
}

#[test]
fn output_is_bounded_and_the_rest_of_the_input_waits() {
    let mut h = harness();
    let c = h.login();
    let buf = h.dma_alloc(c, 64 << 10, 4096, DmaMask::Bits64);
    // Eight pipelined reads of 64 KiB: 512 KiB of replies.
    let read = to_frame(&Request::Call(Op::DmaRead {
        handle: buf,
        offset: 0,
        len: 64 << 10,
    }))
    .unwrap();
    let input: Vec<u8> = read.iter().copied().cycle().take(read.len() * 8).collect();
    let mut env = DirectEnv {
        mem: &mut h.mem,
        block: None,
        clock,
    };
    let mut out = Vec::new();
    let (taken, flow) = h
        .svc
        .on_bytes_bounded(&mut env, c, &input, &mut out, 100 << 10);
    assert_eq!(flow, Flow::Continue);
    // At most two reads answered (the second passes the bound; the turn's
    // budget may end it after the first), the rest untouched.
    assert!(taken == read.len() * 2 || taken == read.len(), "{taken}");
    assert!(out.len() < (100 << 10) + (65 << 10));
    // The rest, in as many turns as the budget makes of it (a slow turn
    // may leave even the taken reads' replies for later turns: the clock
    // is the host's).
    let mut taken2 = 0;
    for _ in 0..100 {
        let (n, _) =
            h.svc
                .on_bytes_bounded(&mut env, c, &input[taken + taken2..], &mut out, usize::MAX);
        taken2 += n;
        if taken + taken2 == input.len() && !h.svc.has_work(c) {
            break;
        }
    }
    assert_eq!(taken + taken2, input.len());
    let mut dec = FrameDecoder::new();
    let mut o = &out[..];
    let mut n = 0;
    while let Some(body) = dec.feed(&mut o).unwrap() {
        assert!(
            matches!(decode_body::<Response>(&body).unwrap(), Response::Call(Ok(Reply::Data(d))) if d.len() == 64 << 10)
        );
        n += 1;
    }
    assert_eq!(n, 8, "every request answered once, in order");
}

#[test]
fn the_client_token_cannot_run_operator_operations() {
    let mut h = Harness::with_config(
        Model::new(64 << 20),
        Config::new(TOKEN).with_client_token("client-tok"),
    );
    let c = h.connect();
    let (r, _) = h.request(
        c,
        &Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            token: "client-tok".into(),
            client: "c".into(),
        }),
    );
    let Response::Hello(ack) = r else {
        panic!("{r:?}")
    };
    assert_eq!(ack.role, Role::Client);
    for op in [
        Op::Shutdown,
        Op::Check,
        Op::DropCaches,
        Op::Stress {
            ops: 10,
            seed: 1,
            cpus: 1,
        },
        fail_every_slab_alloc(),
    ] {
        assert_eq!(h.code(c, op), errno::EPERM);
    }
    assert!(!h.svc.shutdown_requested());
    assert!(matches!(
        h.ok(
            c,
            Op::Kmalloc {
                size: 64,
                gfp: Gfp::KERNEL
            }
        ),
        Reply::Object { .. }
    ));
    // The operator token does all of it.
    let op = h.connect();
    assert_eq!(h.hello(op).role, Role::Operator);
    assert!(matches!(h.ok(op, Op::Check), Reply::Check(r) if r.ok));
}

#[test]
fn caches_and_pools_count_against_the_quota() {
    let mut cfg = Config::new(TOKEN);
    cfg.quota.caches = 3;
    let mut h = Harness::with_config(Model::new(64 << 20), cfg);
    let create = |h: &mut Harness<Model>, c, i: usize| {
        h.call(
            c,
            Op::CacheCreate(CacheSpec {
                name: format!("c{i}"),
                size: 64,
                align: 8,
                flags: SlabFlags(0),
                ctor: Ctor::None,
            }),
        )
    };
    let a = h.login();
    for i in 0..2 {
        create(&mut h, a, i).unwrap();
    }
    let pool = h.ok(
        a,
        Op::PoolCreate {
            backing: PoolBacking::Kmalloc { size: 32 },
            min_nr: 1,
        },
    );
    // Two caches and a pool: the quota of three is reached.
    assert_eq!(create(&mut h, a, 9).unwrap_err().code, errno::EDQUOT);
    h.ok(
        a,
        Op::PoolDestroy {
            pool: handle(&pool),
        },
    );
    create(&mut h, a, 3).unwrap();
    // Another client has a quota of its own: what all hold together is
    // limited by memory alone.
    let b = h.login();
    let held: Vec<u64> = (4..7)
        .map(|i| handle(&create(&mut h, b, i).unwrap()))
        .collect();
    assert_eq!(create(&mut h, b, 7).unwrap_err().code, errno::EDQUOT);
    // A cache destroyed is counted out.
    h.ok(b, Op::CacheDestroy { cache: held[0] });
    create(&mut h, b, 8).unwrap();
}
