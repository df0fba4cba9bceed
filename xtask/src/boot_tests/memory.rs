//! The memory a booted guest reports on its console (the firmware map,
//! memd-mm's reservations, its zones, the DMA reservation), and the check
//! that it adds up for the case's memory size and options.

use super::matrix::{mem_arg, Case};
use super::{GIB, MIB};

const PAGE: u64 = 4096;
/// Zone spans (physical), as in memd-mm: DMA < 16 MiB, DMA32 < 4 GiB.
const ZONES: [(&str, u64, u64); 3] = [
    ("DMA", 0, 16 * MIB),
    ("DMA32", 16 * MIB, 4 * GIB),
    ("Normal", 4 * GIB, u64::MAX),
];

/// A `[start-end) word` range from a console line, after `prefix`.
fn parse_range(line: &str, prefix: &str) -> Option<(u64, u64, String)> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let rest = rest.trim_start().strip_prefix('[')?;
    let (start, rest) = rest.split_once('-')?;
    let (end, rest) = rest.split_once(')')?;
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok();
    let word = rest.split_whitespace().next().unwrap_or("").to_string();
    Some((hex(start)?, hex(end)?, word))
}

/// `key=value` (decimal) on a line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// What the console says about memory.
#[derive(Debug, Default)]
pub(super) struct Report {
    /// Usable RAM of the firmware map.
    pub usable: Vec<(u64, u64)>,
    /// memd-mm's boot reservations (start, end, kind).
    pub reserved: Vec<(u64, u64, String)>,
    /// name → (start pfn, end pfn, managed pages).
    pub zones: Vec<(String, u64, u64, u64)>,
    pub dma_reserve: Option<(u64, u64)>,
}

/// What `console` says about memory.
pub(super) fn parse_report(console: &str) -> Report {
    let mut r = Report::default();
    for line in console.lines() {
        if let Some((s, e, kind)) = parse_range(line, "e820 ") {
            if kind == "usable" {
                r.usable.push((s, e));
            }
        } else if let Some((s, e, kind)) = parse_range(line, "mm: reserved ") {
            r.reserved.push((s, e, kind));
        } else if let Some((s, e, _)) = parse_range(line, "mm: dma_reserve ") {
            r.dma_reserve = Some((s, e));
        } else if let Some(i) = line.find("mm: zone ") {
            let rest = &line[i + "mm: zone ".len()..];
            let name = rest.split_whitespace().next().unwrap_or("").to_string();
            // Managed at boot, and the frames still to come with deferred
            // initialisation: together, what the memory map gives.
            if let (Some((s, e, _)), Some(managed)) =
                (parse_range(rest, "pfn "), field(rest, "managed"))
            {
                let to_come = field(rest, "to_come").unwrap_or(0);
                r.zones.push((name, s, e, managed + to_come));
            }
        }
    }
    r
}

/// Pages of `[s, e)` (rounded inwards to pages) not covered by `holes`.
fn pages_outside(s: u64, e: u64, holes: &[(u64, u64)]) -> u64 {
    let (s, e) = (s.next_multiple_of(PAGE), e / PAGE * PAGE);
    if s >= e {
        return 0;
    }
    let mut covered: Vec<(u64, u64)> = holes
        .iter()
        .map(|&(hs, he)| (hs / PAGE * PAGE, he.next_multiple_of(PAGE)))
        .filter_map(|(hs, he)| {
            let (a, b) = (hs.max(s), he.min(e));
            (a < b).then_some((a, b))
        })
        .collect();
    covered.sort();
    let mut n = 0;
    let mut pos = s;
    for (a, b) in covered {
        if a > pos {
            n += (a - pos) / PAGE;
        }
        pos = pos.max(b);
    }
    if e > pos {
        n += (e - pos) / PAGE;
    }
    n
}

/// Checks the console of a successful boot against the case.
pub(super) fn check_report(case: &Case, r: &Report) -> Result<(), String> {
    if r.usable.is_empty() {
        return Err("no usable e820 ranges on the console".into());
    }
    let total: u64 = r.usable.iter().map(|(s, e)| e - s).sum();
    // The map loses the legacy hole below 1 MiB and a few firmware pages.
    if total > case.mem || case.mem - total > 2 * MIB {
        return Err(format!(
            "usable RAM {total:#x} does not account for -m {}",
            mem_arg(case.mem)
        ));
    }
    if case.mem > 4 * GIB && !r.usable.iter().any(|&(s, _)| s >= 4 * GIB) {
        return Err("guest larger than 4 GiB but no usable RAM above 4 GiB".into());
    }
    let holes: Vec<(u64, u64)> = r.reserved.iter().map(|&(s, e, _)| (s, e)).collect();
    for (name, lo, hi) in ZONES {
        let expected: u64 = r
            .usable
            .iter()
            .filter_map(|&(s, e)| {
                let (a, b) = (s.max(lo), e.min(hi));
                (a < b).then_some((a, b))
            })
            .map(|(a, b)| pages_outside(a, b, &holes))
            .sum();
        let got = r.zones.iter().find(|z| z.0 == name);
        match got {
            None if expected == 0 => {}
            None => {
                return Err(format!(
                    "zone {name}: expected {expected} managed pages, zone not reported"
                ))
            }
            Some(&(_, spfn, epfn, managed)) => {
                if managed != expected {
                    return Err(format!("zone {name}: managed {managed} pages, memory map minus reservations gives {expected}"));
                }
                if managed > 0
                    && (spfn * PAGE < lo || epfn * PAGE > hi.min(u64::MAX / 2) || spfn >= epfn)
                {
                    return Err(format!(
                        "zone {name}: pfn span [{spfn:#x}-{epfn:#x}) outside [{lo:#x}-{hi:#x})"
                    ));
                }
            }
        }
    }
    let populated = |n: &str| r.zones.iter().any(|z| z.0 == n && z.3 > 0);
    let want_normal = case.mem > 4 * GIB;
    if !populated("DMA") || !populated("DMA32") || populated("Normal") != want_normal {
        return Err(format!(
            "populated zones wrong for {}: {:?}",
            mem_arg(case.mem),
            r.zones
        ));
    }
    match (case.dma_reserve, r.dma_reserve) {
        (None, None) => {}
        (None, Some(x)) => return Err(format!("unrequested DMA reservation {x:x?}")),
        (Some(want), None) => {
            return Err(format!("{} given but no reservation reported", want.arg()))
        }
        (Some(want), Some((s, e))) => {
            if e - s != 64 * MIB {
                return Err(format!("DMA reservation is {:#x} bytes, not 64 MiB", e - s));
            }
            let (lo, hi) = want.span();
            if s < lo || e > hi {
                return Err(format!(
                    "DMA reservation [{s:#x}-{e:#x}) outside the zone of {}",
                    want.arg()
                ));
            }
            if !r.usable.iter().any(|&(us, ue)| us <= s && e <= ue) {
                return Err(format!(
                    "DMA reservation [{s:#x}-{e:#x}) not inside usable RAM"
                ));
            }
            if !r.reserved.iter().any(|&(rs, re, _)| rs <= s && e <= re) {
                return Err("DMA reservation not among the boot reservations".into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::matrix::Reserve;
    use super::*;
    use crate::qemu::Machine;

    const CONSOLE: &str = "\
[   0.004] INFO  e820 [0x000000000000-0x00000009fc00) usable 639 KiB
[   0.004] INFO  e820 [0x00000009fc00-0x0000000a0000) reserved 1 KiB
[   0.004] INFO  e820 [0x000000100000-0x000004000000) usable 64512 KiB
[   0.005] INFO  mm: reserved [0x000000000000-0x000000001000) zero
[   0.005] INFO  mm: reserved [0x000000100000-0x000000200000) kernel
[   0.005] INFO  mm: zone DMA pfn [0x1-0x1000) managed=3710 free=3710
[   0.005] INFO  mm: zone DMA32 pfn [0x1000-0x4000) managed=8192 to_come=4096 free=7900
";

    fn case() -> Case {
        Case::new(Machine::Microvm, 64 * MIB)
    }

    #[test]
    fn parses_console() {
        let r = parse_report(CONSOLE);
        assert_eq!(r.usable, vec![(0, 0x9fc00), (0x100000, 0x4000000)]);
        assert_eq!(r.reserved.len(), 2);
        assert_eq!(r.zones.len(), 2);
        assert_eq!(r.zones[1], ("DMA32".to_string(), 0x1000, 0x4000, 12288));
    }

    #[test]
    fn accepts_consistent_zones() {
        // DMA: 0x9f pages below 640K minus page 0, plus 0x100..0x1000 minus
        // the kernel's 0x100 pages: 158 + 3840 - 256 = 3742.
        let fixed = CONSOLE.replace("managed=3710", "managed=3742");
        check_report(&case(), &parse_report(&fixed)).unwrap();
    }

    #[test]
    fn rejects_wrong_counts_and_missing_reservation() {
        assert!(check_report(&case(), &parse_report(CONSOLE)).is_err());
        let fixed = CONSOLE.replace("managed=3710", "managed=3742");
        let with = Case {
            dma_reserve: Some(Reserve::Dma32),
            mem: GIB,
            ..case()
        };
        assert!(check_report(&with, &parse_report(&fixed)).is_err());
    }

    #[test]
    fn pages_outside_counts_holes() {
        assert_eq!(
            pages_outside(0, 10 * PAGE, &[(PAGE, 3 * PAGE), (2 * PAGE, 4 * PAGE)]),
            7
        );
        assert_eq!(pages_outside(0, 0x9fc00, &[]), 0x9f);
    }
}
