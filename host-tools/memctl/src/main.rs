//! memctl: drive and observe memd from the host.
//!
//! Exit codes: 0 success, 1 the service returned an error (errno shown),
//! 2 usage error, 3 connection or protocol failure.
//!
//! Handles belong to the connection that made them and are released when it
//! closes, so a single `memctl kmalloc` allocates, prints and frees on exit.
//! To keep resources across commands, use `memctl session`, which reads
//! commands (same syntax, without `memctl`) from standard input and runs them
//! on one connection. In a session, `$last` stands for the handle the last
//! command created and `$N` for the handle of the N-th command (from 1).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use memd_client::{Client, Error, Options};
use memd_wire::*;
use serde::Serialize;

mod balloon;
mod cli;
mod fleet;
mod histogram;
mod hotplug;
mod map;
mod print;
mod progress;
mod session;
mod watch;

use cli::{parse_size, Cli, Cmd};
use print::{json, print_reply, reply_json};

enum Fail {
    Server(WireError),
    Conn(String),
    Usage(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        match e {
            Error::Server(w) => Fail::Server(w),
            e => Fail::Conn(e.to_string()),
        }
    }
}

pub(crate) fn to_op(cmd: Cmd) -> Result<Op, Fail> {
    Ok(match cmd {
        Cmd::Status => Op::Status,
        Cmd::Meminfo => Op::Meminfo,
        Cmd::Zoneinfo => Op::Zoneinfo,
        Cmd::Buddyinfo => Op::Buddyinfo,
        Cmd::Slabinfo => Op::Slabinfo { start: 0 },
        Cmd::Mempools => Op::Mempools { start: 0 },
        Cmd::Cma => Op::Cma,
        Cmd::Clients => Op::Clients,
        Cmd::DmaList => Op::DmaBuffers { start: 0 },
        Cmd::Map { .. } => Op::MemMap,
        Cmd::Buddy { .. } => Op::Buddyinfo,
        Cmd::AllocPages { order, gfp } => Op::AllocPages { order, gfp },
        Cmd::FreePages { handle } => Op::FreePages { handle },
        Cmd::Kmalloc { size, gfp } => Op::Kmalloc { size, gfp },
        Cmd::Kfree { handle } => Op::Kfree { handle },
        Cmd::CacheCreate {
            name,
            size,
            align,
            flags,
            ctor_fill,
        } => Op::CacheCreate(CacheSpec {
            name,
            size: u32::try_from(size).map_err(|_| Fail::Usage("object size too large".into()))?,
            align,
            flags,
            ctor: ctor_fill.map_or(Ctor::None, Ctor::Fill),
        }),
        Cmd::CacheAlloc { cache, gfp } => Op::CacheAlloc { cache, gfp },
        Cmd::CacheFree { cache, object } => Op::CacheFree { cache, object },
        Cmd::CacheShrink { cache } => Op::CacheShrink { cache },
        Cmd::CacheDestroy { cache } => Op::CacheDestroy { cache },
        Cmd::PoolCreate { backing, min_nr } => {
            let bad = || {
                Fail::Usage(format!(
                    "backing {backing:?}: use cache:HANDLE, kmalloc:SIZE or pages:ORDER"
                ))
            };
            let (kind, v) = backing.split_once(':').ok_or_else(bad)?;
            let backing = match kind {
                "cache" => PoolBacking::Cache(v.parse().map_err(|_| bad())?),
                "kmalloc" => PoolBacking::Kmalloc {
                    size: parse_size(v)
                        .ok()
                        .and_then(|s| u32::try_from(s).ok())
                        .ok_or_else(bad)?,
                },
                "pages" => PoolBacking::Pages {
                    order: v.parse().map_err(|_| bad())?,
                },
                _ => return Err(bad()),
            };
            Op::PoolCreate { backing, min_nr }
        }
        Cmd::PoolAlloc { pool, gfp } => Op::PoolAlloc { pool, gfp },
        Cmd::PoolFree { pool, object } => Op::PoolFree { pool, object },
        Cmd::PoolDestroy { pool } => Op::PoolDestroy { pool },
        Cmd::DmaAlloc {
            len,
            align,
            mask,
            movable,
        } => Op::DmaAlloc {
            len,
            align,
            mask,
            movable,
        },
        Cmd::DmaFree { handle } => Op::DmaFree { handle },
        Cmd::DmaWrite {
            handle,
            offset,
            data,
        } => Op::DmaWrite {
            handle,
            offset,
            data: data.into_bytes(),
        },
        Cmd::DmaRead {
            handle,
            offset,
            len,
        } => Op::DmaRead {
            handle,
            offset,
            len,
        },
        Cmd::DmaFill { handle, seed } => Op::DmaFill { handle, seed },
        Cmd::DmaChecksum {
            handle,
            offset,
            len,
        } => Op::DmaChecksum {
            handle,
            offset,
            len,
        },
        Cmd::DmaWriteDisk { handle, sector } => Op::DmaWriteDisk { handle, sector },
        Cmd::DmaReadDisk { handle, sector } => Op::DmaReadDisk { handle, sector },
        Cmd::Check => Op::Check,
        Cmd::DropCaches => Op::DropCaches,
        Cmd::Stress { ops, seed, cpus } => Op::Stress { ops, seed, cpus },
        Cmd::Shutdown => Op::Shutdown,
        Cmd::Fault { .. } => Op::Faults,
        Cmd::Batch { .. }
        | Cmd::Session
        | Cmd::Watch { .. }
        | Cmd::Completions { .. }
        | Cmd::Balloon { .. }
        | Cmd::Hotplug { .. } => {
            unreachable!("handled by the caller")
        }
    })
}

/// Whether `cmd` connects with the operator's token: it runs an operation
/// only the operator may ([`Op::operator_only`]), or it is a session, whose
/// commands are read after it connects.
pub(crate) fn wants_operator(cmd: &Cmd) -> bool {
    match cmd {
        Cmd::Session => true,
        // Setting a rule is fault injection; without a target it only shows.
        Cmd::Fault { slab, page, .. } => *slab || *page,
        Cmd::Batch { .. }
        | Cmd::Watch { .. }
        | Cmd::Completions { .. }
        | Cmd::Balloon { .. }
        | Cmd::Hotplug { .. } => false,
        cmd => to_op(cmd.clone()).is_ok_and(|op| op.operator_only()),
    }
}

/// Operations per batch frame: small enough that the replies fit a frame.
const BATCH_CHUNK: u32 = memd_wire::MAX_BATCH_OPS as u32;

fn run_batch(c: &mut Client, count: u32, size: u64, as_json: bool) -> Result<(), Fail> {
    let t0 = std::time::Instant::now();
    let pb = progress::bar(2 * count as u64, "kmalloc + kfree", as_json);
    let mut allocs = Vec::with_capacity(count as usize);
    let mut left = count;
    while left > 0 {
        let n = left.min(BATCH_CHUNK);
        allocs.extend(
            c.batch(
                (0..n)
                    .map(|_| Op::Kmalloc {
                        size,
                        gfp: Gfp::KERNEL,
                    })
                    .collect(),
                false,
            )?,
        );
        pb.inc(n as u64);
        left -= n;
    }
    let handles: Vec<Handle> = allocs
        .iter()
        .filter_map(|r| match r {
            Ok(Reply::Object { handle, .. }) => Some(*handle),
            _ => None,
        })
        .collect();
    let failed = allocs.len() - handles.len();
    pb.inc(failed as u64);
    let mut frees = Vec::with_capacity(handles.len());
    for chunk in handles.chunks(BATCH_CHUNK as usize) {
        frees.extend(c.batch(
            chunk.iter().map(|&handle| Op::Kfree { handle }).collect(),
            false,
        )?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let ops = allocs.len() + frees.len();
    #[derive(Serialize)]
    struct Out {
        ops: usize,
        failed_allocs: usize,
        seconds: f64,
        ops_per_sec: f64,
    }
    let out = Out {
        ops,
        failed_allocs: failed,
        seconds: secs,
        ops_per_sec: ops as f64 / secs,
    };
    if as_json {
        json(&out);
    } else {
        println!(
            "{} ops ({} failed allocations) in {:.3} ms: {:.0} ops/s",
            out.ops,
            out.failed_allocs,
            secs * 1e3,
            out.ops_per_sec
        );
    }
    Ok(())
}

/// Writes the map picture: PNG for a `.png` path, SVG otherwise.
fn write_map(m: &MemMap, path: &std::path::Path, width: u32) -> Result<(), Fail> {
    let svg = map::svg(m, width);
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let bytes = if is_png {
        map::png(&svg).map_err(Fail::Usage)?
    } else {
        svg.into_bytes()
    };
    std::fs::write(path, bytes).map_err(|e| Fail::Usage(format!("{}: {e}", path.display())))
}

fn completions(shell: clap_complete::Shell) {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "memctl", &mut std::io::stdout());
}

/// Runs one command; returns the handle it created, if any.
fn run(c: &mut Client, cmd: Cmd, as_json: bool) -> Result<Option<Handle>, Fail> {
    match cmd {
        Cmd::Batch { count, size } => run_batch(c, count, size, as_json).map(|()| None),
        Cmd::Balloon { size, qmp } => balloon::balloon(c, size, qmp, as_json)
            .map(|()| None)
            .map_err(Fail::Usage),
        Cmd::Hotplug {
            size,
            qmp,
            for_secs,
        } => hotplug::hotplug(c, size, qmp, Duration::from_secs(for_secs), as_json)
            .map(|()| None)
            .map_err(Fail::Usage),
        Cmd::Fault {
            slab,
            page,
            probability,
            interval,
            times,
        } if slab || page => {
            let Some(probability) = probability else {
                return Err(Fail::Usage(
                    "fault --slab/--page needs --probability".into(),
                ));
            };
            let config = FaultConfig {
                probability,
                interval,
                times,
            };
            let mut ops: Vec<Op> = [(slab, FaultTarget::Slab), (page, FaultTarget::Pages)]
                .into_iter()
                .filter(|(on, _)| *on)
                .map(|(_, target)| Op::FaultInject { target, config })
                .collect();
            ops.push(Op::Faults);
            let replies = c.batch(ops, true)?;
            match replies.last() {
                Some(Ok(r @ Reply::Faults(_))) if as_json => reply_json(r),
                Some(Ok(r @ Reply::Faults(_))) => print_reply(r),
                Some(Err(e)) => return Err(Fail::Server(e.clone())),
                r => return Err(Fail::Conn(format!("unexpected reply {r:?}"))),
            }
            Ok(None)
        }
        Cmd::Session => Err(Fail::Usage("session cannot be nested".into())),
        Cmd::Watch {
            interval_ms,
            iterations,
        } => watch::run(c, Duration::from_millis(interval_ms.max(50)), iterations)
            .map(|()| None)
            .map_err(|e| Fail::Conn(format!("terminal: {e}"))),
        Cmd::Completions { shell } => {
            completions(shell);
            Ok(None)
        }
        // memd's figures, and beside them what its QEMU holds on this host.
        Cmd::Status => {
            let reply = c.call(Op::Status)?;
            let qemu = balloon::qemu_resident();
            match (&reply, as_json) {
                (Reply::Status(s), true) => {
                    let mut v = serde_json::to_value(s).map_err(|e| Fail::Usage(e.to_string()))?;
                    if let (Some((pid, rss)), Some(o)) = (qemu, v.as_object_mut()) {
                        o.insert("qemu_pid".into(), pid.into());
                        o.insert("qemu_resident_bytes".into(), rss.into());
                    }
                    json(&v);
                }
                (_, true) => reply_json(&reply),
                (_, false) => {
                    print_reply(&reply);
                    if let Some((pid, rss)) = qemu {
                        println!("QEMU (pid {pid}) resident on the host: {} MiB", rss >> 20);
                    }
                }
            }
            Ok(None)
        }
        // Every page of a listing, printed as one.
        Cmd::DmaList | Cmd::Slabinfo | Cmd::Mempools => {
            let all = match cmd {
                Cmd::Slabinfo => Reply::Slabinfo(c.slabinfo()?),
                Cmd::Mempools => Reply::Mempools(c.mempools()?),
                _ => Reply::DmaBuffers(c.dma_buffers()?),
            };
            if as_json {
                reply_json(&all);
            } else {
                print_reply(&all);
            }
            Ok(None)
        }
        Cmd::Map {
            out: Some(path),
            width,
        } => {
            let m = match c.call(Op::MemMap)? {
                Reply::MemMap(m) => m,
                r => return Err(Fail::Conn(format!("unexpected reply {r:?}"))),
            };
            write_map(&m, &path, width)?;
            if as_json {
                json(
                    &serde_json::json!({ "out": path, "runs": m.runs.len(), "granule": m.granule }),
                );
            } else {
                println!(
                    "wrote {} ({} zones, {} reservations, {} runs{})",
                    path.display(),
                    m.zones.len(),
                    m.reservations.len(),
                    m.runs.len(),
                    if m.granule > 1 {
                        format!(", cells of {} pages", m.granule)
                    } else {
                        String::new()
                    }
                );
            }
            Ok(None)
        }
        Cmd::Buddy {
            histogram: true,
            width,
        } if !as_json => {
            let replies = c.batch(vec![Op::Status, Op::Buddyinfo], true)?;
            match &replies[..] {
                [Ok(Reply::Status(s)), Ok(Reply::Buddyinfo(zones))] => {
                    print!("{}", histogram::render(zones, s.page_size, width))
                }
                [.., Err(e)] => return Err(Fail::Server(e.clone())),
                r => return Err(Fail::Conn(format!("unexpected reply {r:?}"))),
            }
            Ok(None)
        }
        cmd => {
            let op = to_op(cmd)?;
            let reply = if progress::is_long(&op) {
                let pb = progress::spinner(format!("memd: {}", op.name()), as_json);
                let r = c.call(op);
                pb.finish_and_clear();
                r?
            } else {
                c.call(op)?
            };
            if as_json {
                reply_json(&reply);
            } else {
                print_reply(&reply);
            }
            Ok(match &reply {
                Reply::Pages { handle, .. }
                | Reply::Object { handle, .. }
                | Reply::Created { handle } => Some(*handle),
                Reply::Dma(b) => Some(b.handle),
                _ => None,
            })
        }
    }
}

fn main() -> ExitCode {
    // Like any Unix tool, end quietly when the reader of our output goes
    // away (`memctl ... | head`): Rust ignores SIGPIPE, so every print would
    // fail with EPIPE and panic. Sockets are unaffected (std sends with
    // MSG_NOSIGNAL).
    sigpipe::reset();
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        completions(shell);
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.fleet {
        let wait = std::time::Duration::from_secs(cli.wait);
        return exit(fleet::run(path, cli.cmd, cli.json, wait), cli.json);
    }
    let operator = wants_operator(&cli.cmd);
    let mut opts = match Options::discover_for(cli.addr.as_deref(), cli.token.as_deref(), operator)
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("memctl: {e}");
            return ExitCode::from(2);
        }
    };
    opts.client = "memctl".into();
    opts.ready_timeout = std::time::Duration::from_secs(cli.wait);
    let result = Client::connect(&opts)
        .map_err(Fail::from)
        .and_then(|mut c| match cli.cmd {
            Cmd::Session => session::session(&mut c, cli.json),
            cmd => run(&mut c, cmd, cli.json).map(|_| ()),
        });
    exit(result, cli.json)
}

/// The exit status for `result`, its error said on stderr.
fn exit(result: Result<(), Fail>, as_json: bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Server(e)) => {
            if as_json {
                json(&e);
            }
            eprintln!("memctl: {} ({}): {}", e.code_name(), e.code, e.message);
            ExitCode::from(1)
        }
        Err(Fail::Usage(e)) => {
            eprintln!("memctl: {e}");
            ExitCode::from(2)
        }
        Err(Fail::Conn(e)) => {
            eprintln!("memctl: {e}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert!(parse_size("12q").is_err());
    }

    #[test]
    fn every_command_parses() {
        for line in [
            "status",
            "meminfo",
            "zoneinfo",
            "buddyinfo",
            "slabinfo",
            "mempools",
            "cma",
            "clients",
            "dma-list",
            "map",
            "map --out m.svg --width 800",
            "buddy --histogram",
            "watch --interval-ms 200 --iterations 3",
            "completions zsh",
            "alloc-pages 3 --gfp KERNEL|ZERO",
            "free-pages 1",
            "kmalloc 4k",
            "kfree 2",
            "cache-create foo 96 --flags POISON --ctor-fill 90",
            "cache-alloc 3",
            "cache-free 3 4",
            "cache-shrink 3",
            "cache-destroy 3",
            "pool-create cache:3 4",
            "pool-alloc 5 --gfp ATOMIC",
            "pool-free 5 6",
            "pool-destroy 5",
            "dma-alloc 64M --align 1M --mask 32",
            "dma-free 7",
            "dma-write 7 0 hello",
            "dma-read 7 0 5",
            "dma-fill 7 42",
            "dma-checksum 7",
            "dma-write-disk 7 0",
            "dma-read-disk 7 0",
            "check",
            "stress 1000",
            "fault --slab --page --probability 5 --interval 2 --times 10",
            "fault",
            "batch 100 --size 32",
            "session",
            "shutdown",
            "balloon",
            "balloon 1G --qmp /tmp/q.sock",
            "hotplug",
            "hotplug 2G --qmp /tmp/q.sock --for 5",
        ] {
            let args = std::iter::once("memctl").chain(line.split_whitespace());
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{line}: {e}"));
            if !matches!(
                cli.cmd,
                Cmd::Batch { .. }
                    | Cmd::Session
                    | Cmd::Watch { .. }
                    | Cmd::Completions { .. }
                    | Cmd::Balloon { .. }
                    | Cmd::Hotplug { .. }
            ) {
                to_op(cli.cmd).unwrap_or_else(|_| panic!("{line}"));
            }
        }
        assert!(Cli::try_parse_from(["memctl", "alloc-pages", "1", "--gfp", "BOGUS"]).is_err());
        assert!(Cli::try_parse_from(["memctl", "dma-alloc", "4k", "--mask", "31"]).is_err());
    }

    #[test]
    fn operator_commands_and_sessions_want_the_operator_token() {
        let wants = |line: &str| {
            let args = std::iter::once("memctl").chain(line.split_whitespace());
            wants_operator(&Cli::try_parse_from(args).unwrap().cmd)
        };
        for line in [
            "shutdown",
            "check",
            "drop-caches",
            "stress 10",
            "fault --slab --probability 5",
            "fault --page --probability 0",
            "session",
        ] {
            assert!(wants(line), "{line}");
        }
        for line in [
            "status",
            "meminfo",
            "fault",
            "kmalloc 64",
            "dma-alloc 1M",
            "batch 10",
            "watch",
            "map",
        ] {
            assert!(!wants(line), "{line}");
        }
    }

    #[test]
    fn pool_backing_parses() {
        let op = |s: &str| {
            to_op(Cmd::PoolCreate {
                backing: s.into(),
                min_nr: 2,
            })
        };
        assert!(matches!(
            op("pages:2"),
            Ok(Op::PoolCreate {
                backing: PoolBacking::Pages { order: 2 },
                ..
            })
        ));
        assert!(matches!(
            op("kmalloc:1k"),
            Ok(Op::PoolCreate {
                backing: PoolBacking::Kmalloc { size: 1024 },
                ..
            })
        ));
        assert!(matches!(op("nonsense"), Err(Fail::Usage(_))));
    }
}
