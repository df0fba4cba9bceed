//! `cargo xtask profile`: where the guest's CPU goes while a load test
//! runs, like `perf top` for the unikernel.
//!
//! The kernel is built with line tables (in its own target directory) and
//! booted with a QEMU monitor socket; while the load runs, the vCPU's
//! instruction pointer is read through the monitor (`info registers`) at a
//! fixed rate, then every address is turned into its inline chain by
//! `addr2line`. Under TCG the saved instruction pointer is the last one
//! that called into QEMU: rdtsc, port and MMIO access, divisions, atomics,
//! exits to QEMU's main loop. Chained translated blocks do not save it, so
//! a sample is charged to the last such instruction before the vCPU was
//! stopped, and code that never calls out is charged to the call before
//! it. Time spent inside a call (an MMIO write waiting for QEMU's lock) is
//! charged where it belongs; read the rest as "since this point".

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::loadtest;

#[derive(Debug, Clone, clap::Args)]
pub struct ProfileArgs {
    /// Most samples to take.
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    /// Milliseconds between samples.
    #[arg(long, default_value_t = 10)]
    pub interval_ms: u64,
    /// Rows to print.
    #[arg(long, default_value_t = 25)]
    pub top: usize,
    /// The load that runs meanwhile (`cargo xtask loadtest`'s options).
    #[command(flatten)]
    pub load: loadtest::Args,
}

/// Where the samples fell, by place.
pub struct Profile {
    pub samples: usize,
    /// (samples, inline chain innermost first), most samples first.
    pub places: Vec<(usize, Vec<String>)>,
}

pub fn run(args: &ProfileArgs) -> Result<()> {
    let profile = profile(args)?;
    print(&profile, args.top);
    Ok(())
}

/// Boots the line-table kernel, runs the load, samples and symbolises.
pub fn profile(args: &ProfileArgs) -> Result<Profile> {
    let kernel = crate::build::build_kernel_with_lines()?;
    let monitor = std::env::temp_dir().join(format!("memd-monitor-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&monitor);
    let mut rips: Vec<u64> = Vec::new();
    let mut sampling_error = None;
    let mut task = |done: &AtomicBool| {
        if let Err(e) = sample(&monitor, args, done, &mut rips) {
            sampling_error = Some(e);
        }
    };
    let report = loadtest::boot_and_run_with(
        &args.load,
        Some(loadtest::Alongside {
            kernel: kernel.clone(),
            monitor: monitor.clone(),
            task: &mut task,
        }),
    )?;
    let _ = std::fs::remove_file(&monitor);
    if let Some(e) = sampling_error {
        return Err(e.context("sampling the vCPU"));
    }
    if !args.load.json {
        eprintln!(
            "profile: {} samples while {} clients ran {:.0} ops/s",
            rips.len(),
            report.load.clients,
            report.load.ops_per_sec()
        );
    }
    let chains = symbolize(&kernel, &rips)?;
    Ok(tally(&rips, &chains))
}

/// Reads the instruction pointer through the monitor until the load ends
/// or enough samples were taken.
fn sample(sock: &Path, args: &ProfileArgs, done: &AtomicBool, rips: &mut Vec<u64>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).context("connecting to QEMU's monitor"),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    read_to_prompt(&mut reader)?;
    while !done.load(Ordering::Relaxed) && rips.len() < args.samples {
        writer.write_all(b"info registers\n")?;
        if let Some(rip) = parse_rip(&read_to_prompt(&mut reader)?) {
            rips.push(rip);
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    Ok(())
}

/// Reads until the monitor's `(qemu) ` prompt.
fn read_to_prompt(r: &mut impl Read) -> Result<String> {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"(qemu) ") {
        if r.read(&mut byte)? == 0 {
            bail!("QEMU's monitor closed");
        }
        out.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `RIP=...` from `info registers`.
fn parse_rip(text: &str) -> Option<u64> {
    let at = text.find("RIP=")? + 4;
    let hex: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    u64::from_str_radix(&hex, 16).ok()
}

/// Each distinct address's inline chain, innermost function first, from
/// `addr2line -a -i -f -C`.
fn symbolize(elf: &Path, rips: &[u64]) -> Result<HashMap<u64, Vec<String>>> {
    let mut unique: Vec<u64> = rips.to_vec();
    unique.sort_unstable();
    unique.dedup();
    let mut child = Command::new("addr2line")
        .args(["-a", "-i", "-f", "-C", "-e"])
        .arg(elf)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running addr2line (binutils)")?;
    let mut stdin = child.stdin.take().context("addr2line stdin")?;
    let input: String = unique.iter().map(|a| format!("{a:#x}\n")).collect();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let mut text = String::new();
    child
        .stdout
        .take()
        .context("addr2line stdout")?
        .read_to_string(&mut text)?;
    let _ = writer.join();
    child.wait()?;
    Ok(parse_addr2line(&text))
}

/// addr2line prints (function, location) pairs; with inlining, the first
/// pair names the symbol (the outermost function) beside the innermost
/// location, and each later pair names the function holding its location,
/// innermost first, up to the symbol again (by its short name). The chain
/// kept is the innermost location's file and line, the inlined functions,
/// and the symbol by its full name.
fn parse_addr2line(text: &str) -> HashMap<u64, Vec<String>> {
    let mut pairs: HashMap<u64, Vec<(String, String)>> = HashMap::new();
    let mut current = None;
    let mut function = None;
    for line in text.lines() {
        if let Some(hex) = line.strip_prefix("0x") {
            current = u64::from_str_radix(hex, 16).ok();
            function = None;
            continue;
        }
        let Some(addr) = current else { continue };
        match function.take() {
            None => function = Some(strip_generics(line)),
            Some(f) => pairs
                .entry(addr)
                .or_default()
                .push((f, short_location(line))),
        }
    }
    pairs
        .into_iter()
        .map(|(addr, p)| {
            let mut chain = vec![p[0].1.clone()];
            if p.len() > 2 {
                chain.extend(p[1..p.len() - 1].iter().map(|(f, _)| f.clone()));
            }
            chain.push(p[0].0.clone());
            (addr, chain)
        })
        .collect()
}

/// `/long/path/src/net.rs:166` as `net.rs:166`.
fn short_location(loc: &str) -> String {
    loc.rsplit('/').next().unwrap_or(loc).to_string()
}

/// `a::B<T>::f` as `a::B::f`: generic arguments make names long and add
/// nothing here. A leading `<A as B>` (a trait method) stays.
fn strip_generics(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut depth = 0;
    let mut prev = ' ';
    for c in name.chars() {
        if depth > 0 {
            match c {
                '<' => depth += 1,
                '>' if prev != '-' => depth -= 1,
                _ => {}
            }
            prev = c;
            continue;
        }
        if c == '<' && (prev.is_alphanumeric() || prev == '_') {
            depth = 1;
            prev = c;
            continue;
        }
        out.push(c);
        prev = c;
    }
    out
}

fn tally(rips: &[u64], chains: &HashMap<u64, Vec<String>>) -> Profile {
    let unknown = vec!["??".to_string()];
    let mut counts: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for rip in rips {
        let chain = chains.get(rip).unwrap_or(&unknown);
        // The line, three inlined functions at most, the symbol.
        let mut key: Vec<String> = chain.iter().take(chain.len().min(4)).cloned().collect();
        if chain.len() > 4 {
            key.push(chain[chain.len() - 1].clone());
        }
        *counts.entry(key).or_default() += 1;
    }
    let mut places: Vec<(usize, Vec<String>)> = counts.into_iter().map(|(c, n)| (n, c)).collect();
    places.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    Profile {
        samples: rips.len(),
        places,
    }
}

fn print(p: &Profile, top: usize) {
    println!(
        "{:>7} {:>6}  where: innermost line, then its function < the function it is inlined into",
        "samples", "%"
    );
    for (n, chain) in p.places.iter().take(top) {
        println!(
            "{n:>7} {:>5.1}%  {}",
            *n as f64 * 100.0 / p.samples.max(1) as f64,
            chain.join(" < ")
        );
    }
}

/// The short run of `cargo xtask test`: a few seconds of batches; the
/// samples must be taken, nearly all must resolve to source lines, and
/// memd's own functions must be among them. (How many land there depends
/// on how busy the machine keeps the guest waiting.)
pub fn smoke() -> Result<()> {
    let args = ProfileArgs {
        samples: 300,
        interval_ms: 5,
        top: 10,
        load: loadtest::Args {
            profile: loadtest::Profile::Batch,
            clients: 2,
            ..loadtest::Args::smoke(2, 3, None)
        },
    };
    let p = profile(&args)?;
    let count = |pred: &dyn Fn(&[String]) -> bool| -> usize {
        p.places
            .iter()
            .filter(|(_, c)| pred(c))
            .map(|(n, _)| n)
            .sum()
    };
    let named = count(&|c| c.iter().any(|f| f.contains("memd_")));
    let unresolved = count(&|c| c.iter().all(|f| f.starts_with("??")));
    if p.samples < 100 || unresolved * 10 > p.samples || named == 0 {
        print(&p, 10);
        bail!(
            "profile smoke: {} samples, {unresolved} unresolved, {named} in memd's functions",
            p.samples
        );
    }
    println!(
        "  ok    profile: {} samples, {unresolved} unresolved, {:.0} % in memd's functions",
        p.samples,
        named as f64 * 100.0 / p.samples as f64
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rip_is_read_from_info_registers() {
        let text = "RAX=0000000000000001 RBX=0000000000000002\r\nRSI=0 RDI=0\r\nRIP=000000000012ef42 RFL=00000046 [---Z-P-] CPL=0\r\n(qemu) ";
        assert_eq!(parse_rip(text), Some(0x12ef42));
        assert_eq!(parse_rip("(qemu) "), None);
    }

    #[test]
    fn addr2line_chains_split_by_address() {
        let text = "0x000000000012ef42\nmemd_kernel::net::serve\n/x/rdtsc.rs:26\n\
                    rdtsc\n/k/arch/mod.rs:91\nuptime_ns\n/k/time.rs:116\nserve\n/k/net.rs:368\n\
                    0x0000000000154f06\n<memd_kernel::drivers::notify::FlagNotify<T> as Transport>::notify\n/k/notify.rs:44\n";
        let c = parse_addr2line(text);
        assert_eq!(
            c[&0x12ef42],
            vec![
                "rdtsc.rs:26",
                "rdtsc",
                "uptime_ns",
                "memd_kernel::net::serve"
            ]
        );
        assert_eq!(
            c[&0x154f06],
            vec![
                "notify.rs:44",
                "<memd_kernel::drivers::notify::FlagNotify as Transport>::notify"
            ]
        );
    }

    #[test]
    fn generic_arguments_are_dropped() {
        assert_eq!(
            strip_generics("memd_service::service::Service<M>::run_op"),
            "memd_service::service::Service::run_op"
        );
        assert_eq!(
            strip_generics("core::ptr::drop_in_place<alloc::vec::Vec<u8>>"),
            "core::ptr::drop_in_place"
        );
        assert_eq!(strip_generics("f<F: Fn() -> u8>"), "f");
    }

    #[test]
    fn places_are_counted_and_ordered() {
        let mut chains = HashMap::new();
        chains.insert(1, vec!["a".to_string(), "b".to_string()]);
        chains.insert(2, vec!["c".to_string()]);
        let p = tally(&[1, 2, 2, 3, 2], &chains);
        assert_eq!(p.samples, 5);
        assert_eq!(p.places[0], (3, vec!["c".to_string()]));
        assert_eq!(p.places[1].0, 1);
        assert!(p
            .places
            .iter()
            .any(|(n, c)| *n == 1 && c == &vec!["??".to_string()]));
    }
}
