//! `memctl --fleet FILE`: the read-only views across many memds (the file
//! `cargo xtask libvirt start` keeps, see memd-client's `fleet`). Every
//! member is asked at once, once, and the view waits `--wait` seconds in
//! all: a member that has not answered by then is shown as down and never
//! holds the view.

use std::path::Path;
use std::time::{Duration, Instant};

use memd_client::fleet::{Fleet, Member};
use memd_client::wire::{MemInfo, Op, Reply, Status};
use serde_json::{json, Map, Value};

use crate::cli::Cmd;
use crate::print::{human_bytes, print_reply, table};
use crate::Fail;

/// What one member answered.
struct Answer<T> {
    member: Member,
    got: Result<T, String>,
}

/// Asks every member of `fleet` at once with `ask` and waits `timeout` in
/// all. A member still silent then is answered for as down; its thread is
/// left to end on its own read timeout.
fn ask_all<T: Send + 'static>(
    fleet: &Fleet,
    timeout: Duration,
    ask: impl Fn(&mut memd_client::Client) -> memd_client::Result<T> + Send + Sync + 'static,
) -> Vec<Answer<T>> {
    let ask = std::sync::Arc::new(ask);
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, m) in fleet.members.iter().enumerate() {
        let (tx, m, ask) = (tx.clone(), m.clone(), ask.clone());
        std::thread::spawn(move || {
            let got = m
                .connect(false, timeout)
                .and_then(|mut c| ask(&mut c))
                .map_err(|e| e.to_string());
            let _ = tx.send((i, got));
        });
    }
    drop(tx);
    let mut got: Vec<Option<Result<T, String>>> = fleet.members.iter().map(|_| None).collect();
    let deadline = Instant::now() + timeout;
    while got.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, answer)) => got[i] = Some(answer),
            Err(_) => break,
        }
    }
    fleet
        .members
        .iter()
        .zip(got)
        .map(|(m, got)| Answer {
            member: m.clone(),
            got: got.unwrap_or_else(|| Err(format!("no answer within {timeout:?}"))),
        })
        .collect()
}

pub(crate) fn run(path: &Path, cmd: Cmd, as_json: bool, wait: Duration) -> Result<(), Fail> {
    let fleet = Fleet::load(path).map_err(|e| Fail::Usage(e.to_string()))?;
    if fleet.members.is_empty() {
        return Err(Fail::Usage(format!("{}: no members", path.display())));
    }
    let timeout = wait.max(Duration::from_millis(200));
    const VIEWS: &str = "--fleet runs the read-only views (status, meminfo, watch, zoneinfo, buddyinfo, slabinfo, mempools, cma, clients, dma-list, fault)";
    match cmd {
        Cmd::Status => {
            let answers = ask_all(&fleet, timeout, |c| c.status());
            status(&answers, as_json);
            any_up(&answers)
        }
        Cmd::Meminfo => {
            let answers = ask_all(&fleet, timeout, |c| c.meminfo());
            meminfo(&answers, as_json);
            any_up(&answers)
        }
        Cmd::Batch { .. }
        | Cmd::Session
        | Cmd::Balloon { .. }
        | Cmd::Hotplug { .. }
        | Cmd::Completions { .. }
        | Cmd::Buddy {
            histogram: true, ..
        } => Err(Fail::Usage(VIEWS.into())),
        Cmd::Watch {
            interval_ms,
            iterations,
        } => {
            watch(
                &fleet,
                timeout,
                Duration::from_millis(interval_ms.max(200)),
                iterations,
            );
            Ok(())
        }
        cmd => {
            let op = crate::to_op(cmd.clone())?;
            let view = Op::VIEWS
                .iter()
                .any(|v| std::mem::discriminant(v) == std::mem::discriminant(&op));
            if !view || crate::wants_operator(&cmd) {
                return Err(Fail::Usage(VIEWS.into()));
            }
            let answers = ask_all(&fleet, timeout, move |c| fetch(c, op.clone()));
            each(&answers, as_json);
            any_up(&answers)
        }
    }
}

/// Fails (exit 3) when no member answered.
fn any_up<T>(answers: &[Answer<T>]) -> Result<(), Fail> {
    if answers.iter().any(|a| a.got.is_ok()) {
        Ok(())
    } else {
        Err(Fail::Conn("no memd of the fleet answered".into()))
    }
}

/// A view's whole reply: every page of a paged listing.
fn fetch(c: &mut memd_client::Client, op: Op) -> memd_client::Result<Reply> {
    Ok(match op {
        Op::Slabinfo { .. } => Reply::Slabinfo(c.slabinfo()?),
        Op::Mempools { .. } => Reply::Mempools(c.mempools()?),
        Op::DmaBuffers { .. } => Reply::DmaBuffers(c.dma_buffers()?),
        op => c.call(op)?,
    })
}

/// The answers as a JSON array: each member's name, address, whether it
/// answered, and its answer under `key` or its error.
fn print_rows<T: serde::Serialize>(answers: &[Answer<T>], key: &str) {
    let rows: Vec<Value> = answers
        .iter()
        .map(|a| {
            let mut row = json!({"name": a.member.name, "addr": a.member.addr});
            match &a.got {
                Ok(v) => {
                    row["up"] = json!(true);
                    row[key] = json!(v);
                }
                Err(e) => {
                    row["up"] = json!(false);
                    row["error"] = json!(e);
                }
            }
            row
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&rows).unwrap_or_default()
    );
}

/// Each member's view under its name, or why it is down.
fn each(answers: &[Answer<Reply>], as_json: bool) {
    if as_json {
        return print_rows(answers, "reply");
    }
    for a in answers {
        println!("=== {} ({})", a.member.name, a.member.addr);
        match &a.got {
            Ok(r) => print_reply(r),
            Err(e) => println!("down: {e}"),
        }
    }
}

fn status(answers: &[Answer<Status>], as_json: bool) {
    if as_json {
        return print_rows(answers, "status");
    }
    let mut t = table(&[
        "name", "addr", "state", "uptime", "total", "free", "balloon", "reported", "clients",
        "requests",
    ]);
    for a in answers {
        let (m, row) = (
            &a.member,
            match &a.got {
                Ok(s) => vec![
                    "up".to_string(),
                    format!("{:.1} s", s.uptime_ns as f64 / 1e9),
                    human_bytes(s.total_bytes),
                    human_bytes(s.free_bytes),
                    human_bytes(s.balloon_bytes),
                    human_bytes(s.reported_bytes),
                    s.connections.saturating_sub(1).to_string(),
                    s.requests.to_string(),
                ],
                Err(e) => {
                    let mut r = vec![format!("down: {e}")];
                    r.resize(8, String::new());
                    r
                }
            },
        );
        let mut cells = vec![m.name.clone(), m.addr.clone()];
        cells.extend(row);
        t.add_row(cells);
    }
    println!("{t}");
}

/// A meminfo's fields, by name.
fn fields(m: &MemInfo) -> Vec<(String, u64)> {
    match serde_json::to_value(m) {
        Ok(Value::Object(o)) => o
            .into_iter()
            .filter_map(|(k, v)| v.as_u64().map(|v| (k, v)))
            .collect(),
        _ => Vec::new(),
    }
}

fn meminfo(answers: &[Answer<MemInfo>], as_json: bool) {
    let up: Vec<(&Member, Vec<(String, u64)>)> = answers
        .iter()
        .filter_map(|a| a.got.as_ref().ok().map(|m| (&a.member, fields(m))))
        .collect();
    let names: Vec<String> = up
        .first()
        .map(|(_, f)| f.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let sum = |k: &str| -> u64 {
        up.iter()
            .flat_map(|(_, f)| f.iter().filter(|(n, _)| n == k).map(|(_, v)| *v))
            .sum()
    };
    if as_json {
        let mut total = Map::new();
        for k in &names {
            total.insert(k.clone(), json!(sum(k)));
        }
        let members: Vec<Value> = answers
            .iter()
            .map(|a| match &a.got {
                Ok(m) => json!({"name": a.member.name, "up": true, "meminfo": m}),
                Err(e) => json!({"name": a.member.name, "up": false, "error": e}),
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"members": members, "total": total}))
                .unwrap_or_default()
        );
        return;
    }
    let mut header = vec!["field (kB)".to_string()];
    header.extend(up.iter().map(|(m, _)| m.name.clone()));
    header.push("all".into());
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let mut t = table(&header);
    for k in &names {
        let mut row = vec![k.clone()];
        for (_, f) in &up {
            let v = f.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
            row.push((v / 1024).to_string());
        }
        row.push((sum(k) / 1024).to_string());
        t.add_row(row);
    }
    println!("{t}");
    for a in answers {
        if let Err(e) = &a.got {
            println!("{} ({}): down: {e}", a.member.name, a.member.addr);
        }
    }
}

/// One line per member, refreshed every `interval`: free memory against
/// total, the balloon, clients and requests per second.
fn watch(fleet: &Fleet, timeout: Duration, interval: Duration, iterations: Option<u64>) {
    let mut last: Vec<Option<(Instant, u64)>> = vec![None; fleet.members.len()];
    let mut n = 0;
    loop {
        let answers = ask_all(fleet, timeout, |c| c.status());
        let now = Instant::now();
        println!("--- {} memds", fleet.members.len());
        for (i, a) in answers.iter().enumerate() {
            match &a.got {
                Ok(s) => {
                    let rate = last[i].map_or(0.0, |(t, r)| {
                        s.requests.saturating_sub(r) as f64 / now.duration_since(t).as_secs_f64()
                    });
                    last[i] = Some((now, s.requests));
                    println!(
                        "{:<16} up    free {:>10} of {:>10}  balloon {:>10}  clients {:>3}  {:>8.0} req/s",
                        a.member.name,
                        human_bytes(s.free_bytes),
                        human_bytes(s.total_bytes),
                        human_bytes(s.balloon_bytes),
                        s.connections.saturating_sub(1),
                        rate
                    );
                }
                Err(e) => {
                    last[i] = None;
                    println!("{:<16} down  {e}", a.member.name);
                }
            }
        }
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return;
        }
        std::thread::sleep(interval);
    }
}
