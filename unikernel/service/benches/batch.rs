//! The service's cost per batched operation, natively: frames of 4096
//! kmalloc ops, then frames of 4096 kfree ops, through `Service::on_bytes`
//! over the real memd-mm on a host arena. Run with
//! `cargo bench -p memd-service --bench batch`; compare with what the load
//! test sees in a TCG guest to tell service cost from transport cost.

use memd_mm::HostMm;
use memd_service::{Config, DirectEnv, Service};
use memd_wire::*;
use std::time::Instant;

fn now() -> u64 {
    1
}

fn main() {
    let mut mm = HostMm::three_zones(256 << 20, 0, "").expect("boot");
    let mut svc = Service::new(Config::new("tok"));
    let conn = svc.on_connect();
    let mut out = Vec::new();
    let send = |svc: &mut Service<memd_mm::MemoryManager>,
                mm: &mut HostMm,
                req: &Request,
                out: &mut Vec<u8>| {
        out.clear();
        let mut env = DirectEnv {
            mem: &mut **mm,
            block: None,
            clock: now,
        };
        svc.on_bytes(&mut env, conn, &to_frame(req).unwrap(), out);
        let mut d = FrameDecoder::new();
        let mut input = &out[..];
        let body = d.feed(&mut input).unwrap().expect("a reply");
        decode_body::<Response>(&body).unwrap()
    };
    let hello = Request::Hello(Hello {
        version: PROTOCOL_VERSION,
        token: "tok".into(),
        client: "bench".into(),
    });
    send(&mut svc, &mut mm, &hello, &mut out);
    let rounds = 50;
    let n = MAX_BATCH_OPS;
    let (mut alloc_ns, mut free_ns) = (0u128, 0u128);
    for _ in 0..rounds {
        let ops = vec![
            Op::Kmalloc {
                size: 64,
                gfp: Gfp::KERNEL
            };
            n
        ];
        let t = Instant::now();
        let Response::Batch(results) = send(
            &mut svc,
            &mut mm,
            &Request::Batch(Batch {
                stop_on_error: true,
                ops,
            }),
            &mut out,
        ) else {
            panic!("batch reply")
        };
        alloc_ns += t.elapsed().as_nanos();
        assert_eq!(results.len(), n, "every kmalloc of the batch ran");
        let frees: Vec<Op> = results
            .into_iter()
            .map(|r| match r {
                Ok(Reply::Object { handle, .. }) => Op::Kfree { handle },
                other => panic!("{other:?}"),
            })
            .collect();
        let t = Instant::now();
        let freed = send(
            &mut svc,
            &mut mm,
            &Request::Batch(Batch {
                stop_on_error: true,
                ops: frees,
            }),
            &mut out,
        );
        free_ns += t.elapsed().as_nanos();
        // Every kfree ran and freed: a batch that stopped early would read
        // as a speed-up.
        match freed {
            Response::Batch(r)
                if r.len() == n && r.iter().all(|r| matches!(r, Ok(Reply::Done))) => {}
            other => panic!("kfree batch: {other:?}"),
        }
    }
    let per = |ns: u128| ns as f64 / (rounds * n) as f64;
    println!("kmalloc via batch: {:.0} ns/op; kfree via batch: {:.0} ns/op (native, incl. encode/decode)", per(alloc_ns), per(free_ns));
}
