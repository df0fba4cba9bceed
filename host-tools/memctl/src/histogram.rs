//! `memctl buddy --histogram`: free blocks per order as terminal bars.
//!
//! A bar's length is the free memory held in blocks of that order (blocks ×
//! block size), scaled to the zone's largest order, so a zone whose free
//! memory sits in small blocks (fragmented) shows its mass at the top and
//! one that can still serve big blocks shows it at the bottom.

use std::fmt::Write as _;

use memd_wire::BuddyZone;

use crate::map::human;

/// Renders one histogram per zone, bars at most `width` cells long.
pub fn render(zones: &[BuddyZone], page_size: u64, width: usize) -> String {
    let mut s = String::new();
    let width = width.max(8);
    for z in zones {
        let bytes: Vec<u64> = z
            .free
            .iter()
            .enumerate()
            .map(|(o, n)| n * (page_size << o))
            .collect();
        let total: u64 = bytes.iter().sum();
        let max = bytes.iter().copied().max().unwrap_or(0);
        let _ = writeln!(
            s,
            "Node {}, zone {} — {} free",
            z.node,
            z.zone,
            human(total)
        );
        for (o, (&n, &b)) in z.free.iter().zip(&bytes).enumerate() {
            let bar = bar(b, max, width);
            let _ = writeln!(
                s,
                "  order {o:>2} {:>9} │{bar:<width$}│ {n:>7} blocks {:>10}",
                human(page_size << o),
                human(b),
            );
        }
    }
    s
}

/// `value/max` of `width` cells in eighths (▏▎▍▌▋▊▉█); a non-zero value
/// always shows at least one eighth.
fn bar(value: u64, max: u64, width: usize) -> String {
    if max == 0 || value == 0 {
        return String::new();
    }
    let eighths = ((value as u128 * width as u128 * 8) / max as u128).max(1) as usize;
    let mut s = "█".repeat(eighths / 8);
    const PART: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];
    s.push_str(PART[eighths % 8]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_proportional_to_free_bytes() {
        let z = BuddyZone {
            node: 0,
            zone: "DMA32".into(),
            // 8 order-0 blocks (32 KiB), 0 order-1, 1 order-2 (16 KiB),
            // 2 order-4 (128 KiB).
            free: vec![8, 0, 1, 0, 2],
        };
        let out = render(&[z], 4096, 32);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("DMA32") && lines[0].contains("176 KiB"));
        let cells = |l: &str| -> f64 {
            let inner = l.split('│').nth(1).unwrap();
            inner
                .chars()
                .map(|c| match c {
                    '█' => 1.0,
                    '▏' => 1.0 / 8.0,
                    '▎' => 2.0 / 8.0,
                    '▍' => 3.0 / 8.0,
                    '▌' => 4.0 / 8.0,
                    '▋' => 5.0 / 8.0,
                    '▊' => 6.0 / 8.0,
                    '▉' => 7.0 / 8.0,
                    _ => 0.0,
                })
                .sum()
        };
        assert_eq!(cells(lines[5]), 32.0, "the largest is full width");
        assert_eq!(cells(lines[1]), 8.0, "32 KiB of 128 KiB");
        assert_eq!(cells(lines[3]), 4.0, "16 KiB of 128 KiB");
        assert_eq!(cells(lines[2]), 0.0, "nothing free at order 1");
        assert!(lines[5].contains(" 2 blocks") && lines[5].contains("128 KiB"));
    }
}
