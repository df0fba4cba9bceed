//! Turns: each `on_bytes_bounded` call is one connection's turn, bounded by
//! the budget of the env's clock. A fake clock that moves on by a fixed
//! step at every reading makes the budget run out after a few readings,
//! the same way on every run, so how work splits into turns is
//! deterministic.

mod common;

use std::cell::Cell;
use std::collections::HashSet;

use common::*;
use memd_service::{BlockDevice, Config, ConnId, DirectEnv, Flow, Memory, DEFAULT_BUDGET_NS};
use memd_wire::*;

/// How far the fake clock moves at every reading.
const STEP_NS: u64 = 50_000;

// The default budget is a few readings of the fake clock, not zero of them
// and not thousands: the turn counts below depend on it.
const _: () = assert!(DEFAULT_BUDGET_NS / STEP_NS >= 2);
const _: () = assert!(DEFAULT_BUDGET_NS / STEP_NS <= 10);

/// Most turns any one request here may take before the test gives up.
const MAX_TURNS: usize = 100_000;

const MIB: u64 = 1 << 20;

thread_local! {
    static NOW: Cell<u64> = const { Cell::new(1_000_000_000) };
}

/// A clock that advances [`STEP_NS`] on every reading (per test thread).
fn fake_clock() -> u64 {
    NOW.with(|n| {
        let t = n.get() + STEP_NS;
        n.set(t);
        t
    })
}

fn harness() -> Harness<Model> {
    Harness::new(Model::new(64 << 20))
}

/// A harness whose service has `config` (the token stays the harness's).
fn harness_with(config: Config) -> Harness<Model> {
    Harness::with_config(Model::new(64 << 20), config)
}

fn call_frame(op: Op) -> Vec<u8> {
    to_frame(&Request::Call(op)).unwrap()
}

fn batch_frame(ops: Vec<Op>) -> Vec<u8> {
    to_frame(&Request::Batch(Batch {
        stop_on_error: false,
        ops,
    }))
    .unwrap()
}

fn decode_all(out: &[u8]) -> Vec<Response> {
    let mut dec = FrameDecoder::new();
    let mut input = out;
    let mut resps = Vec::new();
    while let Some(body) = dec.feed(&mut input).unwrap() {
        resps.push(decode_body::<Response>(&body).unwrap());
    }
    assert!(
        input.is_empty() && dec.is_idle(),
        "a turn's output ends with a partial frame"
    );
    resps
}

/// What one turn did.
struct Turn {
    taken: usize,
    flow: Flow,
    out: Vec<u8>,
}

impl Turn {
    fn responses(&self) -> Vec<Response> {
        decode_all(&self.out)
    }
}

/// One turn of `conn` with `input`, on the fake clock.
fn turn(h: &mut Harness<Model>, conn: ConnId, input: &[u8]) -> Turn {
    let mut env = DirectEnv {
        mem: &mut h.mem,
        block: None,
        clock: fake_clock,
    };
    let mut out = Vec::new();
    let (taken, flow) = h
        .svc
        .on_bytes_bounded(&mut env, conn, input, &mut out, usize::MAX);
    assert!(taken <= input.len());
    Turn { taken, flow, out }
}

/// Turns of `conn` until all of `input` is taken and nothing is left to
/// do: the raw output of every turn.
fn drive_raw(h: &mut Harness<Model>, conn: ConnId, input: &[u8]) -> Vec<Vec<u8>> {
    let mut taken = 0;
    let mut outs = Vec::new();
    loop {
        assert!(outs.len() < MAX_TURNS, "no end after {MAX_TURNS} turns");
        let t = turn(h, conn, &input[taken..]);
        assert_eq!(t.flow, Flow::Continue);
        taken += t.taken;
        outs.push(t.out);
        if taken == input.len() && !h.svc.has_work(conn) {
            return outs;
        }
    }
}

/// As [`drive_raw`]: the decoded responses, and the number of turns.
fn drive(h: &mut Harness<Model>, conn: ConnId, input: &[u8]) -> (Vec<Response>, usize) {
    let outs = drive_raw(h, conn, input);
    (decode_all(&outs.concat()), outs.len())
}

/// Turns of `conn` with the input from `*taken` on until one writes a
/// reply; `quiet` looks at the harness after each turn that wrote none,
/// with the input taken so far. Every turn's output goes to `outs`.
fn until_answered(
    h: &mut Harness<Model>,
    conn: ConnId,
    input: &[u8],
    taken: &mut usize,
    outs: &mut Vec<Vec<u8>>,
    mut quiet: impl FnMut(&mut Harness<Model>, usize),
) {
    loop {
        assert!(outs.len() < MAX_TURNS);
        let t = turn(h, conn, &input[*taken..]);
        *taken += t.taken;
        let answered = !t.out.is_empty();
        outs.push(t.out);
        if answered {
            return;
        }
        quiet(h, *taken);
    }
}

/// Drives `batch`, which must be refused whole (one E2BIG entry) in one
/// turn with nothing run: no allocation, no handle.
fn refused_whole(h: &mut Harness<Model>, conn: ConnId, batch: &[u8]) {
    let (r, turns) = drive(h, conn, batch);
    assert_eq!(turns, 1);
    match &r[..] {
        [Response::Batch(b)] if b.len() == 1 => {
            assert_eq!(b[0].as_ref().unwrap_err().code, errno::E2BIG, "{b:?}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.mem.used, 0);
    assert_eq!(h.svc.handles_of(conn), Some(0));
}

/// The one call reply `drive` got for a single call.
fn only_call(resps: Vec<Response>) -> Result<Reply, WireError> {
    match <[Response; 1]>::try_from(resps) {
        Ok([Response::Call(r)]) => r,
        Ok(other) => panic!("expected a call reply, got {other:?}"),
        Err(v) => panic!("expected one reply, got {v:?}"),
    }
}

/// A DMA buffer of `len` for `conn`, allocated over as many turns as its
/// zeroing takes; returns its handle and the turns.
fn dma_alloc(h: &mut Harness<Model>, conn: ConnId, len: u64) -> (u64, usize) {
    let (r, turns) = drive(
        h,
        conn,
        &call_frame(Op::DmaAlloc {
            len,
            align: 0,
            mask: DmaMask::Bits64,
            movable: false,
        }),
    );
    let reply = only_call(r).expect("DMA alloc");
    match &reply {
        Reply::Dma(info) => assert_eq!(info.len, len),
        other => panic!("{other:?}"),
    }
    (handle(&reply), turns)
}

fn kmallocs(n: usize, size: u64) -> Vec<Op> {
    vec![
        Op::Kmalloc {
            size,
            gfp: Gfp::KERNEL
        };
        n
    ]
}

fn expected_checksum(seed: u64, len: u64) -> u64 {
    let mut bytes = vec![0u8; len as usize];
    fill_pattern(seed, 0, &mut bytes);
    checksum(&bytes)
}

#[test]
fn the_default_budget_is_the_one_measured_against() {
    assert_eq!(Config::new(TOKEN).budget_ns, DEFAULT_BUDGET_NS);
}

#[test]
fn a_long_fill_runs_over_turns_while_others_are_served() {
    let mut h = harness();
    let a = h.login();
    let b = h.login();
    let len = 4 * MIB;
    let (buf, alloc_turns) = dma_alloc(&mut h, a, len);
    assert!(
        alloc_turns > 1,
        "zeroing 4 MiB took {alloc_turns} turn(s): not run as work"
    );

    let seed = 0x5eed;
    let fill = call_frame(Op::DmaFill { handle: buf, seed });
    let t = turn(&mut h, a, &fill);
    assert_eq!(t.taken, fill.len());
    assert_eq!(t.flow, Flow::Continue);
    assert!(t.out.is_empty(), "the fill answered in its first turn");
    assert!(h.svc.has_work(a), "the fill is not the connection's job");

    // Another connection is served in its own turn meanwhile.
    let status = call_frame(Op::Status);
    let t = turn(&mut h, b, &status);
    assert_eq!(t.taken, status.len());
    match &t.responses()[..] {
        [Response::Call(Ok(Reply::Status(s)))] => assert_eq!(s.connections, 2),
        other => panic!("{other:?}"),
    }
    assert!(!h.svc.has_work(b));
    assert!(h.svc.has_work(a), "b's turn ran a's work to its end");

    // Turns with no input finish the fill.
    let (r, turns) = drive(&mut h, a, &[]);
    assert!(turns > 1, "the rest of the fill took {turns} turn(s)");
    assert_eq!(only_call(r), Ok(Reply::Done));

    // The checksum is long work too, and sees every byte filled.
    let (r, turns) = drive(
        &mut h,
        a,
        &call_frame(Op::DmaChecksum {
            handle: buf,
            offset: 0,
            len: 0,
        }),
    );
    assert!(turns > 1, "a 4 MiB checksum took {turns} turn(s)");
    assert_eq!(
        only_call(r),
        Ok(Reply::Checksum(expected_checksum(seed, len)))
    );
}

#[test]
fn quick_calls_run_during_a_job_and_their_replies_follow_it() {
    let mut h = harness();
    let c = h.login();
    let (buf, _) = dma_alloc(&mut h, c, 4 * MIB);
    let used = h.mem.used;
    let mut input = call_frame(Op::DmaFill {
        handle: buf,
        seed: 3,
    });
    input.extend(call_frame(Op::Status));
    input.extend(call_frame(Op::Kmalloc {
        size: 64,
        gfp: Gfp::KERNEL,
    }));
    // All of the input is taken while the fill still runs, and nothing is
    // answered yet.
    let mut taken = 0;
    let mut turns = 0;
    while taken < input.len() {
        let t = turn(&mut h, c, &input[taken..]);
        assert!(t.taken > 0, "a quick call waited for the job");
        assert!(t.out.is_empty(), "a reply came before the fill's");
        taken += t.taken;
        turns += 1;
        assert!(turns < 10);
    }
    assert!(h.svc.has_work(c), "the fill ended too soon to tell");
    // The kmalloc has run already.
    assert_eq!(h.mem.used, used + 64);
    assert_eq!(h.svc.handles_of(c), Some(2));
    let (r, _) = drive(&mut h, c, &[]);
    match &r[..] {
        [Response::Call(Ok(Reply::Done)), Response::Call(Ok(Reply::Status(_))), Response::Call(Ok(Reply::Object { size: 64, .. }))] =>
            {}
        other => panic!("replies out of order: {other:?}"),
    }
}

#[test]
fn a_leased_buffer_cannot_be_freed_until_its_work_ends() {
    let mut h = harness();
    let c = h.login();
    let (buf, _) = dma_alloc(&mut h, c, MIB);
    let mut input = call_frame(Op::DmaFill {
        handle: buf,
        seed: 9,
    });
    input.extend(call_frame(Op::DmaFree { handle: buf }));
    input.extend(call_frame(Op::Status));
    let (r, turns) = drive(&mut h, c, &input);
    assert!(turns > 1);
    match &r[..] {
        [Response::Call(Ok(Reply::Done)), Response::Call(Err(e)), Response::Call(Ok(Reply::Status(_)))] =>
        {
            assert_eq!(e.code, errno::EBUSY, "{e}");
            assert!(e.message.contains("fill"), "message: {}", e.message);
        }
        other => panic!("{other:?}"),
    }
    // Still there, and filled.
    assert_eq!(h.svc.handles_of(c), Some(1));
    let (r, _) = drive(
        &mut h,
        c,
        &call_frame(Op::DmaChecksum {
            handle: buf,
            offset: 0,
            len: 0,
        }),
    );
    assert_eq!(only_call(r), Ok(Reply::Checksum(expected_checksum(9, MIB))));
    // Once the work has ended the free goes through.
    let (r, _) = drive(&mut h, c, &call_frame(Op::DmaFree { handle: buf }));
    assert_eq!(only_call(r), Ok(Reply::Done));
    assert_eq!(h.svc.handles_of(c), Some(0));
    assert_eq!(h.mem.used, 0);
    assert_eq!(h.mem.bad_frees, 0);
}

#[test]
fn a_batch_behind_a_long_call_waits_for_it() {
    let mut h = harness();
    let c = h.login();
    let (buf, _) = dma_alloc(&mut h, c, 4 * MIB);
    let used = h.mem.used;
    let fill = call_frame(Op::DmaFill {
        handle: buf,
        seed: 1,
    });
    let batch = batch_frame(kmallocs(3, 128));
    let status = call_frame(Op::Status);
    let input = [fill.clone(), batch.clone(), status].concat();

    let t = turn(&mut h, c, &input);
    assert!(t.out.is_empty());
    assert!(
        t.taken < input.len(),
        "all of the input was taken in the first turn"
    );
    let mut taken = t.taken;
    let mut outs = vec![t.out];
    // Until the fill ends, input stops at the waiting batch and the batch
    // does not run.
    let mut waited = 0;
    until_answered(&mut h, c, &input, &mut taken, &mut outs, |h, taken| {
        assert!(
            taken <= fill.len() + batch.len(),
            "input behind a waiting batch was taken"
        );
        assert_eq!(h.mem.used, used, "the batch ran during the fill");
        assert_eq!(h.svc.handles_of(c), Some(1));
        if taken == fill.len() + batch.len() {
            waited += 1;
        }
    });
    assert!(waited > 1, "the batch waited {waited} turn(s): no test");
    outs.extend(drive_raw(&mut h, c, &input[taken..]));
    let r = decode_all(&outs.concat());
    match &r[..] {
        [Response::Call(Ok(Reply::Done)), Response::Batch(b), Response::Call(Ok(Reply::Status(_)))] =>
        {
            assert_eq!(b.len(), 3);
            assert!(b
                .iter()
                .all(|r| matches!(r, Ok(Reply::Object { size: 128, .. }))));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.mem.used, used + 3 * 128);
}

#[test]
fn a_long_call_behind_a_long_call_waits_for_it() {
    let mut h = harness();
    let c = h.login();
    let (buf, _) = dma_alloc(&mut h, c, 4 * MIB);
    let fill = call_frame(Op::DmaFill {
        handle: buf,
        seed: 2,
    });
    let sum = call_frame(Op::DmaChecksum {
        handle: buf,
        offset: 0,
        len: 0,
    });
    let status = call_frame(Op::Status);
    let input = [fill.clone(), sum.clone(), status].concat();
    let mut taken = 0;
    let mut outs = Vec::new();
    until_answered(&mut h, c, &input, &mut taken, &mut outs, |_, taken| {
        assert!(
            taken <= fill.len() + sum.len(),
            "input behind a waiting call was taken"
        );
    });
    outs.extend(drive_raw(&mut h, c, &input[taken..]));
    let r = decode_all(&outs.concat());
    // The checksum waited for the fill, so it sums the filled buffer.
    let want = expected_checksum(2, 4 * MIB);
    match &r[..] {
        [Response::Call(Ok(Reply::Done)), Response::Call(Ok(Reply::Checksum(sum))), Response::Call(Ok(Reply::Status(_)))] =>
        {
            assert_eq!(*sum, want)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_big_batch_runs_over_turns_into_one_frame() {
    let n = MAX_BATCH_OPS;
    assert_eq!(n, 4096);
    let input = batch_frame(kmallocs(n, 64));

    let mut h = harness();
    let c = h.login();
    let outs = drive_raw(&mut h, c, &input);
    assert!(outs.len() > 1, "the batch ran in {} turn(s)", outs.len());
    let (last, before) = outs.split_last().unwrap();
    assert!(
        before.iter().all(|o| o.is_empty()),
        "part of the batch reply went out before it ended"
    );
    let r = decode_all(last);
    let [Response::Batch(results)] = &r[..] else {
        panic!("{r:?}")
    };
    assert_eq!(results.len(), n);
    let handles: HashSet<u64> = results
        .iter()
        .map(|r| match r {
            Ok(reply @ Reply::Object { size: 64, .. }) => handle(reply),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(handles.len(), n, "handles repeat");
    assert_eq!(h.svc.handles_of(c), Some(n));
    assert_eq!(h.mem.used, 64 * n as u64);

    // The same batch in one turn of unlimited budget gives the same frame.
    let mut one = harness_with(Config {
        budget_ns: u64::MAX,
        ..Config::new(TOKEN)
    });
    let c1 = one.login();
    assert_eq!(c1, c);
    let t = turn(&mut one, c1, &input);
    assert_eq!(t.taken, input.len());
    assert!(!one.svc.has_work(c1), "an unlimited turn left work");
    let r1 = t.responses();
    let [Response::Batch(results1)] = &r1[..] else {
        panic!("{r1:?}")
    };
    assert_eq!(results1.len(), results.len());
    assert!(results1
        .iter()
        .zip(results)
        .all(|(a, b)| std::mem::discriminant(a.as_ref().unwrap())
            == std::mem::discriminant(b.as_ref().unwrap())));
    assert_eq!(t.out, *last, "the frame built over turns differs");
}

#[test]
fn a_batch_over_the_work_cap_is_refused_whole() {
    // Small limits, so a service that ran the batch anyway ends quickly.
    let mut h = harness_with(Config {
        max_stress_ops: 1000,
        max_request_work: 1500,
        ..Config::new(TOKEN)
    });
    let c = h.login();
    let requests = |h: &mut Harness<Model>| match h.ok(c, Op::Status) {
        Reply::Status(s) => s.requests,
        r => panic!("{r:?}"),
    };
    let stress = |ops| Op::Stress {
        ops,
        seed: 4,
        cpus: 1,
    };
    let before = requests(&mut h);
    let batch = batch_frame(vec![
        Op::Kmalloc {
            size: 64,
            gfp: Gfp::KERNEL,
        },
        stress(1000),
        stress(1000),
    ]);
    refused_whole(&mut h, c, &batch);
    // No request counted but the status.
    assert_eq!(requests(&mut h), before + 1);

    // At the cap exactly, it runs.
    let batch = batch_frame(vec![
        Op::Kmalloc {
            size: 64,
            gfp: Gfp::KERNEL,
        },
        stress(1000),
        stress(499),
    ]);
    let (r, _) = drive(&mut h, c, &batch);
    match &r[..] {
        [Response::Batch(b)] => {
            assert_eq!(b.len(), 3, "{b:?}");
            assert!(matches!(b[1], Ok(Reply::Stress(ref s)) if s.ops == 1000 && s.check_ok));
            assert!(matches!(b[2], Ok(Reply::Stress(ref s)) if s.ops == 499 && s.check_ok));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.svc.handles_of(c), Some(1));
}

#[test]
fn two_maximal_stress_ops_in_a_batch_are_refused_whole() {
    let mut h = harness();
    let c = h.login();
    let max = Config::new(TOKEN).max_stress_ops;
    let batch = batch_frame(vec![
        Op::Kmalloc {
            size: 64,
            gfp: Gfp::KERNEL,
        },
        Op::Stress {
            ops: max,
            seed: 1,
            cpus: 1,
        },
        Op::Stress {
            ops: max,
            seed: 2,
            cpus: 1,
        },
    ]);
    refused_whole(&mut h, c, &batch);
}

#[test]
fn a_connection_closed_mid_work_is_released_over_background_turns() {
    let mut h = harness();
    let baseline = h.mem.free_bytes();
    let c = h.login();
    let (r, _) = drive(&mut h, c, &batch_frame(kmallocs(2000, 64)));
    match &r[..] {
        [Response::Batch(b)] => {
            assert_eq!(b.len(), 2000);
            assert!(b.iter().all(|r| r.is_ok()));
        }
        other => panic!("{other:?}"),
    }
    let (buf, _) = dma_alloc(&mut h, c, 4 * MIB);
    let t = turn(
        &mut h,
        c,
        &call_frame(Op::DmaFill {
            handle: buf,
            seed: 5,
        }),
    );
    assert!(t.out.is_empty());
    assert!(h.svc.has_work(c));
    assert_eq!(h.svc.handles_of(c), Some(2001));

    let mut env = DirectEnv {
        mem: &mut h.mem,
        block: None,
        clock: fake_clock,
    };
    h.svc.on_close(&mut env, c);
    assert_eq!(h.svc.connections(), 0);
    assert!(!h.svc.has_work(c));
    let pending = h.svc.pending_release();
    assert!(pending > 0, "nothing queued for release");
    assert!(pending <= 2001);
    assert!(env.mem.free_bytes() < baseline, "freed before background");

    let mut busy = 0;
    let mut last_pending = pending;
    while h.svc.background(&mut env) {
        busy += 1;
        assert!(busy < MAX_TURNS);
        let now = h.svc.pending_release();
        assert!(now < last_pending, "a background turn freed nothing");
        last_pending = now;
    }
    assert!(busy > 1, "released in {} background turn(s)", busy + 1);
    assert_eq!(h.svc.pending_release(), 0);
    assert!(!h.svc.background(&mut env), "work left after the end");
    assert_eq!(env.mem.free_bytes(), baseline, "memory not back");
    assert!(env.mem.live.is_empty(), "{:?}", env.mem.live);
    assert_eq!(env.mem.bad_frees, 0);
}

#[test]
fn a_stress_run_is_work_over_turns() {
    let mut h = harness();
    let c = h.login();
    let stress = call_frame(Op::Stress {
        ops: 20_000,
        seed: 11,
        cpus: 1,
    });
    let t = turn(&mut h, c, &stress);
    assert_eq!(t.taken, stress.len());
    assert!(t.out.is_empty(), "20 000 stress ops in one turn");
    assert!(h.svc.has_work(c));
    let (r, turns) = drive(&mut h, c, &[]);
    assert!(turns > 1, "the rest took {turns} turn(s)");
    match only_call(r) {
        Ok(Reply::Stress(s)) => {
            assert_eq!(s.ops, 20_000);
            assert!(s.check_ok);
            assert!(s.elapsed_ns > 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.mem.used, 0, "stress left allocations");
    assert!(h.mem.live.is_empty());
    assert_eq!(h.mem.bad_frees, 0);
}

/// As [`drive_raw`], over the real memd-mm; `between` runs after each
/// turn that did not end the request, with the turns so far.
fn drive_mm(
    h: &mut Harness<memd_mm::HostMm>,
    conn: ConnId,
    input: &[u8],
    mut between: impl FnMut(&mut memd_mm::HostMm, usize),
) -> Vec<Vec<u8>> {
    let (mut taken, mut outs) = (0, Vec::new());
    loop {
        assert!(outs.len() < MAX_TURNS, "no end after {MAX_TURNS} turns");
        let mut env = DirectEnv {
            mem: &mut *h.mem,
            block: None,
            clock: fake_clock,
        };
        let mut out = Vec::new();
        let (n, flow) =
            h.svc
                .on_bytes_bounded(&mut env, conn, &input[taken..], &mut out, usize::MAX);
        assert_eq!(flow, Flow::Continue);
        taken += n;
        outs.push(out);
        if taken == input.len() && !h.svc.has_work(conn) {
            return outs;
        }
        between(&mut h.mem, outs.len());
    }
}

#[test]
fn a_check_walks_memory_over_turns_while_it_changes() {
    // 512 MiB: 128 pageblocks of 4 MiB, two a slice.
    let mut h = Harness::new(memd_mm::HostMm::three_zones(512 * MIB, 0, "").unwrap());
    let c = h.login();
    let mut held = Vec::new();
    let outs = drive_mm(&mut h, c, &call_frame(Op::Check), |mm, turns| {
        // Memory changes between the check's turns.
        held.push(mm.alloc_pages(turns as u32 % 4, Gfp::KERNEL).unwrap());
        if turns % 3 == 0 {
            let p = held.remove(0);
            let order = mm.frame(p).unwrap().order as u32;
            mm.free_pages(p, order).unwrap();
        }
    });
    assert!(
        outs.len() > 4,
        "a check of 512 MiB took {} turn(s)",
        outs.len()
    );
    match only_call(decode_all(&outs.concat())) {
        Ok(Reply::Check(r)) => assert!(r.ok && r.violations.is_empty(), "{r:?}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_small_dma_buffer_with_a_large_alignment_is_zeroed_over_turns() {
    // 4 KiB aligned to 4 MiB is a whole order-10 block from the buddy:
    // 4 MiB to zero, a slice a turn.
    let mut h = Harness::new(memd_mm::HostMm::three_zones(64 * MIB, 0, "").unwrap());
    let c = h.login();
    // Leave stale bytes in the memory the buffer will take.
    let stale = h.mem.alloc_pages(10, Gfp::KERNEL).unwrap();
    let virt = h.mem.direct_map().virt(stale);
    // SAFETY: the block was just allocated to this test, 4 MiB long.
    unsafe { std::ptr::write_bytes(virt as *mut u8, 0xa5, 4 * MIB as usize) };
    h.mem.free_pages(stale, 10).unwrap();
    let op = Op::DmaAlloc {
        len: 4096,
        align: 4 * MIB,
        mask: DmaMask::Bits64,
        movable: false,
    };
    let outs = drive_mm(&mut h, c, &call_frame(op), |_, _| {});
    assert!(outs.len() > 2, "4 MiB zeroed in {} turn(s)", outs.len());
    let info = match only_call(decode_all(&outs.concat())) {
        Ok(Reply::Dma(info)) => info,
        other => panic!("{other:?}"),
    };
    assert_eq!(info.phys % (4 * MIB), 0);
    // The buddy gives the last freed block first: the buffer is the one
    // left full of stale bytes, so the zero check below means something.
    assert_eq!(info.phys, stale, "the buffer reuses the stale block");
    let virt = h.mem.direct_map().virt(info.phys);
    // SAFETY: the buffer is the client's, 4 MiB of block, not yet freed.
    let block = unsafe { std::slice::from_raw_parts(virt as *const u8, 4 * MIB as usize) };
    assert!(block.iter().all(|&b| b == 0), "the whole block is zeroed");
}

#[test]
fn a_batch_with_a_long_op_runs_over_turns_in_order() {
    let mut h = harness();
    let a = h.login();
    let b = h.login();
    let (buf, _) = dma_alloc(&mut h, a, 4 * MIB);
    let batch = batch_frame(vec![
        Op::Kmalloc {
            size: 64,
            gfp: Gfp::KERNEL,
        },
        Op::DmaFill {
            handle: buf,
            seed: 6,
        },
        Op::DmaChecksum {
            handle: buf,
            offset: 0,
            len: 0,
        },
        Op::Kmalloc {
            size: 32,
            gfp: Gfp::KERNEL,
        },
    ]);
    let t = turn(&mut h, a, &batch);
    assert_eq!(t.taken, batch.len());
    assert!(t.out.is_empty(), "the batch ended in its first turn");
    assert!(h.svc.has_work(a));
    // The other connection is served meanwhile.
    let t = turn(&mut h, b, &call_frame(Op::Status));
    assert!(matches!(
        &t.responses()[..],
        [Response::Call(Ok(Reply::Status(_)))]
    ));
    let outs = drive_raw(&mut h, a, &[]);
    assert!(outs.len() > 1);
    let (last, before) = outs.split_last().unwrap();
    assert!(before.iter().all(|o| o.is_empty()));
    match &decode_all(last)[..] {
        [Response::Batch(r)] => {
            assert_eq!(r.len(), 4, "{r:?}");
            assert!(matches!(r[0], Ok(Reply::Object { size: 64, .. })));
            assert_eq!(r[1], Ok(Reply::Done));
            assert_eq!(r[2], Ok(Reply::Checksum(expected_checksum(6, 4 * MIB))));
            assert!(matches!(r[3], Ok(Reply::Object { size: 32, .. })));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_call_behind_a_batch_runs_after_the_batch() {
    // Pipelined: a batch that frees `k` as its last op, then a single free
    // of `k`. Run in order, the batch's free succeeds and the single one
    // finds no handle.
    let mut h = harness();
    let c = h.login();
    let (r, _) = drive(
        &mut h,
        c,
        &call_frame(Op::Kmalloc {
            size: 64,
            gfp: Gfp::KERNEL,
        }),
    );
    let k = handle(&only_call(r).unwrap());
    let mut ops = kmallocs(4000, 64);
    ops.push(Op::Kfree { handle: k });
    let input = [batch_frame(ops), call_frame(Op::Kfree { handle: k })].concat();
    let (r, turns) = drive(&mut h, c, &input);
    assert!(turns > 1, "the batch ran in one turn: no test");
    match &r[..] {
        [Response::Batch(b), Response::Call(single)] => {
            assert_eq!(b.len(), 4001);
            assert_eq!(b[4000], Ok(Reply::Done), "the batch's own free of {k}");
            assert_eq!(
                single.as_ref().map_err(|e| e.code),
                Err(errno::ENOENT),
                "the free sent after the batch ran before its end"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// One turn of `conn` with the harness's disk attached.
fn disk_turn(h: &mut Harness<Model>, conn: ConnId, input: &[u8]) -> Turn {
    let mut env = DirectEnv {
        mem: &mut h.mem,
        block: h.disk.as_mut().map(|d| d as &mut dyn BlockDevice),
        clock: fake_clock,
    };
    let mut out = Vec::new();
    let (taken, flow) = h
        .svc
        .on_bytes_bounded(&mut env, conn, input, &mut out, usize::MAX);
    Turn { taken, flow, out }
}

#[test]
fn a_disk_transfer_leases_its_buffer_until_the_device_gives_it_back() {
    let mut h = harness();
    h.disk = Some(RamDisk::new(vec![0; 4 << 20]));
    let c = h.login();
    let (buf, _) = dma_alloc(&mut h, c, MIB);
    // The device holds the buffer after the first turn (the RAM disk
    // completes at its second poll): a pipelined free is refused.
    let mut input = call_frame(Op::DmaWriteDisk {
        handle: buf,
        sector: 8,
    });
    input.extend(call_frame(Op::DmaFree { handle: buf }));
    let t = disk_turn(&mut h, c, &input);
    assert_eq!(t.flow, Flow::Continue);
    assert_eq!(t.taken, input.len());
    assert!(t.out.is_empty(), "{:?}", t.responses());
    assert!(h.svc.has_work(c));
    let t = disk_turn(&mut h, c, &[]);
    match &t.responses()[..] {
        [Response::Call(Ok(Reply::Transfer(x))), Response::Call(Err(e))] => {
            assert_eq!((x.bytes, x.sector, x.requests), (MIB, 8, 1));
            assert_eq!(e.code, errno::EBUSY);
            assert!(e.message.contains("disk write"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(h.ok(c, Op::DmaFree { handle: buf }), Reply::Done));
}

#[test]
fn a_buffer_left_with_the_device_is_freed_when_the_transfer_ends() {
    let mut h = harness();
    h.disk = Some(RamDisk::new(vec![0; 4 << 20]));
    let baseline = h.mem.free_bytes();
    let c = h.login();
    let (buf, _) = dma_alloc(&mut h, c, MIB);
    let t = disk_turn(
        &mut h,
        c,
        &call_frame(Op::DmaReadDisk {
            handle: buf,
            sector: 0,
        }),
    );
    assert!(t.out.is_empty());
    assert!(h.disk.as_ref().unwrap().1.is_some(), "no request in flight");
    let mut env = DirectEnv {
        mem: &mut h.mem,
        block: h.disk.as_mut().map(|d| d as &mut dyn BlockDevice),
        clock: fake_clock,
    };
    h.svc.on_close(&mut env, c);
    assert_eq!(
        h.svc.pending_release(),
        1,
        "the buffer waits for the device"
    );
    assert!(
        env.mem.free_bytes() < baseline,
        "freed while the device held it"
    );
    // The RAM disk completes at its second poll: the background's first.
    while h.svc.background(&mut env) {}
    assert_eq!(h.svc.pending_release(), 0);
    assert_eq!(env.mem.free_bytes(), baseline);
    assert!(
        h.disk.as_ref().unwrap().1.is_none(),
        "request never completed"
    );
}
