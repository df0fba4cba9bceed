//! `memctl map`: the physical memory map as a picture (SVG, or PNG through
//! resvg) or as text.
//!
//! One horizontal axis is shared by every track: physical addresses, scaled
//! linearly inside each stretch of memory, with stretches that hold no RAM
//! squeezed into a fixed-width hatched gap. The tracks:
//!
//! - zones (one `rect.zone` per zone, width proportional to its bytes),
//! - boot reservations (`rect.reservation`, same scale),
//! - the CMA region with its buffers, and every client DMA buffer,
//! - frames: what every page is, wrapped over several rows so small blocks
//!   stay visible (free blocks shaded by order, slab, allocated, ...).
//!
//! Every proportional element carries `data-start`/`data-end` (bytes) so
//! tests and scripts can check it against the map.

use std::fmt::Write as _;

use memd_wire::{MemMap, RunKind};

/// Picture width in pixels.
pub const DEFAULT_WIDTH: u32 = 1200;
const MARGIN: f64 = 20.0;
const LABEL_W: f64 = 110.0;
const GAP_PX: f64 = 24.0;
const FRAME_ROWS: usize = 16;

/// A stretch of the axis: `[start, end)` in bytes, drawn from `x`.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: u64,
    end: u64,
    x: f64,
}

/// Physical addresses to x positions.
#[derive(Debug, Clone)]
pub struct Axis {
    segs: Vec<Segment>,
    /// Pixels per byte inside a segment.
    pub scale: f64,
    x0: f64,
    width: f64,
}

impl Axis {
    /// The axis for `map`, `width` pixels wide from `x0`: the union of RAM,
    /// zones and reservations, merged; what lies between is a gap.
    pub fn new(map: &MemMap, x0: f64, width: f64) -> Axis {
        let mut ranges: Vec<(u64, u64)> = map
            .memory
            .iter()
            .map(|r| (r.start, r.end))
            .chain(map.zones.iter().map(|z| (z.start, z.end)))
            .chain(map.reservations.iter().map(|r| (r.start, r.end)))
            .filter(|(s, e)| e > s)
            .collect();
        ranges.sort();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        if merged.is_empty() {
            merged.push((0, map.end.max(1)));
        }
        let bytes: u64 = merged.iter().map(|(s, e)| e - s).sum();
        let gaps = merged.len() - 1;
        let usable = (width - gaps as f64 * GAP_PX).max(width * 0.5);
        let scale = usable / bytes as f64;
        let mut x = x0;
        let segs = merged
            .into_iter()
            .map(|(start, end)| {
                let s = Segment { start, end, x };
                x += (end - start) as f64 * scale + GAP_PX;
                s
            })
            .collect();
        Axis {
            segs,
            scale,
            x0,
            width,
        }
    }

    /// Pieces of `[start, end)` that lie on the axis, as (start, end, x, w).
    fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64, f64, f64)> {
        self.segs
            .iter()
            .filter_map(|s| {
                let (a, b) = (start.max(s.start), end.min(s.end));
                (a < b).then(|| {
                    let x = s.x + (a - s.start) as f64 * self.scale;
                    (a, b, x, (b - a) as f64 * self.scale)
                })
            })
            .collect()
    }

    /// The gaps between segments: (x, bytes skipped).
    fn gaps(&self) -> Vec<(f64, u64)> {
        self.segs
            .windows(2)
            .map(|w| {
                let x = w[0].x + (w[0].end - w[0].start) as f64 * self.scale;
                (x, w[1].start - w[0].end)
            })
            .collect()
    }
}

/// A colour per kind: free blocks from pale (order 0, fragmented) to deep
/// green (the largest orders).
pub fn color(kind: RunKind, max_order: u32) -> String {
    match kind {
        RunKind::Free(o) => {
            let t = o as f64 / (max_order.max(2) - 1) as f64;
            let t = t.clamp(0.0, 1.0);
            // #d9f2d0 → #1b7f3b
            let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
            format!(
                "#{:02x}{:02x}{:02x}",
                lerp(217.0, 27.0),
                lerp(242.0, 127.0),
                lerp(208.0, 59.0)
            )
        }
        RunKind::Pcp => "#b7e4f9".into(),
        RunKind::Allocated => "#3b6fd6".into(),
        RunKind::Slab => "#f08c2e".into(),
        RunKind::Large => "#9b59b6".into(),
        RunKind::Pool => "#e5c22b".into(),
        RunKind::Reserved => "#7f7f7f".into(),
        RunKind::Absent => "#ffffff".into(),
        // Free memory still to come: the free colour, washed out.
        RunKind::Uninitialised => "#eef7ea".into(),
        // The host's, until it gives it back: grey-blue.
        RunKind::Balloon => "#9fb3c8".into(),
    }
}

fn reservation_color(kind: &str) -> &'static str {
    match kind {
        "kernel" => "#c0392b",
        "frame-table" => "#8e44ad",
        "dma-reserve" => "#16a085",
        "memmap-hole" => "#34495e",
        _ => "#95a5a6",
    }
}

fn zone_color(name: &str) -> &'static str {
    match name {
        "DMA" => "#fde2e4",
        "DMA32" => "#e2ece9",
        _ => "#dfe7fd",
    }
}

/// Human size: 4 KiB, 1.5 MiB, 3 GiB.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 || u == 0 {
        format!("{} {}", v as u64, UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The highest free order present, plus one (at least 11, Linux's default).
fn orders(map: &MemMap) -> u32 {
    map.runs
        .iter()
        .filter_map(|r| match r.kind {
            RunKind::Free(o) => Some(o as u32 + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0)
        .max(11)
}

/// Bytes per kind over the whole map, in a fixed order for the legend.
pub fn totals(map: &MemMap) -> Vec<(RunKind, u64)> {
    let mut kinds: Vec<RunKind> = (0..orders(map) as u8).map(RunKind::Free).collect();
    kinds.extend(RunKind::NOT_ON_FREE_LISTS);
    // Memory still to come and the balloon, only while there is some.
    for k in [RunKind::Uninitialised, RunKind::Balloon] {
        if map.runs.iter().any(|r| r.kind == k) {
            kinds.push(k);
        }
    }
    kinds
        .into_iter()
        .map(|k| {
            let b = map.runs.iter().filter(|r| r.kind == k).map(|r| r.len).sum();
            (k, b)
        })
        .collect()
}

/// Renders `map` as an SVG document `width` pixels wide.
pub fn svg(map: &MemMap, width: u32) -> String {
    let w = width.max(400) as f64;
    let track_x = MARGIN + LABEL_W;
    let track_w = w - track_x - MARGIN;
    let axis = Axis::new(map, track_x, track_w);
    let max_order = orders(map);
    let mut s = String::new();
    let mut y = MARGIN;
    let mut body = String::new();

    // Title.
    let ram: u64 = map.memory.iter().map(|r| r.end - r.start).sum();
    let _ = writeln!(
        body,
        r#"<text class="title" x="{MARGIN}" y="{:.1}" font-size="16" font-weight="bold">memd physical memory: {} of RAM, {} zones{}</text>"#,
        y + 14.0,
        human(ram),
        map.zones.len(),
        if map.granule > 1 {
            format!(
                ", summarised in cells of {}",
                human(map.granule * map.page_size)
            )
        } else {
            String::new()
        }
    );
    y += 30.0;

    let label = |body: &mut String, y: f64, h: f64, text: &str| {
        let _ = writeln!(
            body,
            r#"<text class="track-label" x="{MARGIN}" y="{:.1}" font-size="12">{}</text>"#,
            y + h / 2.0 + 4.0,
            esc(text)
        );
    };

    // Zones.
    let tracks_top = y;
    let h = 30.0;
    label(&mut body, y, h, "zones");
    for z in &map.zones {
        for (a, b, x, pw) in axis.pieces(z.start, z.end) {
            let _ = writeln!(
                body,
                r##"<rect class="zone" data-name="{name}" data-start="{a}" data-end="{b}" x="{x:.4}" y="{y:.1}" width="{pw:.4}" height="{h}" fill="{fill}" stroke="#555" stroke-width="0.5"><title>zone {name}: {lo:#x}-{hi:#x} ({size}), {free} of {managed} pages free</title></rect>"##,
                name = esc(&z.name),
                fill = zone_color(&z.name),
                lo = z.start,
                hi = z.end,
                size = human(z.end - z.start),
                free = z.free,
                managed = z.managed,
            );
            let text = format!("{} {}", z.name, human(b - a));
            if pw > text.len() as f64 * 7.5 + 8.0 {
                let _ = writeln!(
                    body,
                    r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
                    x + pw / 2.0,
                    y + h / 2.0 + 4.0,
                    esc(&text)
                );
            }
        }
    }
    // Gaps, drawn once across the tracks below.
    let gaps = axis.gaps();
    y += h + 8.0;

    // Reservations.
    let h = 20.0;
    label(&mut body, y, h, "reserved");
    for r in &map.reservations {
        let pieces = axis.pieces(r.start, r.end);
        for (a, b, x, pw) in &pieces {
            let _ = writeln!(
                body,
                r#"<rect class="reservation" data-kind="{kind}" data-start="{a}" data-end="{b}" x="{x:.4}" y="{y:.1}" width="{pw:.4}" height="{h}" fill="{fill}"><title>{kind}: {lo:#x}-{hi:#x} ({size})</title></rect>"#,
                kind = esc(&r.kind),
                fill = reservation_color(&r.kind),
                lo = r.start,
                hi = r.end,
                size = human(r.end - r.start),
            );
        }
        // Tiny reservations get a visible tick above them (not to scale).
        if let Some((_, _, x, pw)) = pieces.first() {
            if *pw < 3.0 {
                let _ = writeln!(
                    body,
                    r#"<path class="marker" d="M{:.2},{:.1} l-4,-7 h8 z" fill="{}"/>"#,
                    x + pw / 2.0,
                    y + 1.0,
                    reservation_color(&r.kind)
                );
            }
        }
    }
    y += h + 8.0;

    // CMA and DMA buffers.
    let h = 20.0;
    label(&mut body, y, h, "CMA / DMA");
    if let Some(c) = &map.cma {
        for (a, b, x, pw) in axis.pieces(c.base, c.end) {
            let _ = writeln!(
                body,
                r##"<rect class="cma" data-start="{a}" data-end="{b}" x="{x:.4}" y="{y:.1}" width="{pw:.4}" height="{h}" fill="#d5f5ee" stroke="#16a085" stroke-width="0.8"><title>CMA region {:#x}-{:#x} ({}), {} buffers</title></rect>"##,
                c.base,
                c.end,
                human(c.end - c.base),
                c.buffers
            );
        }
    }
    for d in &map.dma {
        for (a, b, x, pw) in axis.pieces(d.phys, d.phys + d.len) {
            let _ = writeln!(
                body,
                r##"<rect class="dma" data-handle="{handle}" data-start="{a}" data-end="{b}" x="{x:.4}" y="{:.1}" width="{:.4}" height="{:.1}" fill="#e74c3c"><title>DMA buffer {handle} (conn {conn}, {src:?}): {lo:#x}, {size}</title></rect>"##,
                y + 3.0,
                pw.max(0.5),
                h - 6.0,
                handle = d.handle,
                conn = d.conn,
                src = d.source,
                lo = d.phys,
                size = human(d.len),
            );
        }
    }
    let tracks_bottom = y + h;
    y += h + 14.0;

    // Frames, wrapped over rows.
    let row_h = 18.0;
    let rows = FRAME_ROWS;
    let row_w = track_w * rows as f64;
    // The frames have an axis of their own, `rows` times longer (so gaps
    // without RAM stay narrow), wrapped into rows: position p lands in row
    // p / track_w.
    let faxis = Axis::new(map, 0.0, row_w);
    let wrap = |p0: f64, pw: f64| -> Vec<(usize, f64, f64)> {
        let p1 = p0 + pw;
        let mut out = Vec::new();
        let mut p = p0;
        while p < p1 - 1e-9 {
            let row = ((p / track_w).floor() as usize).min(rows - 1);
            let row_end = (row + 1) as f64 * track_w;
            let q = p1.min(row_end);
            out.push((row, p - row as f64 * track_w, q - p));
            if row == rows - 1 {
                break;
            }
            p = q;
        }
        out
    };
    label(&mut body, y, row_h, "frames");
    let _ = writeln!(
        body,
        r#"<g class="frames" data-scale="{:e}" data-rows="{rows}">"#,
        faxis.scale
    );
    for r in &map.runs {
        if r.kind == RunKind::Absent {
            continue;
        }
        for (a, b, x, pw) in faxis.pieces(r.start, r.start + r.len) {
            for (row, off, len) in wrap(x, pw) {
                let _ = writeln!(
                    body,
                    r#"<rect class="run" data-kind="{kind}" data-start="{a}" data-end="{b}" x="{:.3}" y="{:.1}" width="{:.3}" height="{row_h}" fill="{}"><title>{kind}: {a:#x}, {size}</title></rect>"#,
                    track_x + off,
                    y + row as f64 * (row_h + 2.0),
                    len,
                    color(r.kind, max_order),
                    kind = r.kind,
                    size = human(b - a),
                );
            }
        }
    }
    let _ = writeln!(body, "</g>");
    let frames_top = y;
    y += rows as f64 * (row_h + 2.0) + 4.0;
    let _ = writeln!(
        body,
        r##"<text x="{track_x}" y="{:.1}" font-size="10" fill="#555">frames: read left to right, top to bottom ({rows} rows); hatched: no RAM</text>"##,
        y + 8.0
    );
    y += 20.0;

    // Gaps across the upper tracks, and in the frame rows where they fall.
    for (gx, bytes) in &gaps {
        let _ = writeln!(
            body,
            r##"<rect class="gap" data-bytes="{bytes}" x="{gx:.2}" y="{:.1}" width="{GAP_PX}" height="{:.1}" fill="url(#hatch)"><title>no RAM: {}</title></rect>"##,
            tracks_top,
            tracks_bottom - tracks_top,
            human(*bytes)
        );
    }
    for (gx, _) in faxis.gaps() {
        for (row, off, len) in wrap(gx, GAP_PX) {
            let _ = writeln!(
                body,
                r##"<rect class="gap" x="{:.3}" y="{:.1}" width="{:.3}" height="{row_h}" fill="url(#hatch)"/>"##,
                track_x + off,
                frames_top + row as f64 * (row_h + 2.0),
                len
            );
        }
    }

    // Legend with totals.
    let _ = writeln!(
        body,
        r#"<text x="{MARGIN}" y="{:.1}" font-size="13" font-weight="bold">legend</text>"#,
        y + 4.0
    );
    y += 12.0;
    let items = totals(map);
    let cols = ((w - 2.0 * MARGIN) / 290.0).floor().max(1.0) as usize;
    let col_w = (w - 2.0 * MARGIN) / cols as f64;
    for (i, (k, bytes)) in items.iter().enumerate() {
        let lx = MARGIN + (i % cols) as f64 * col_w;
        let ly = y + (i / cols) as f64 * 18.0;
        let extra = match k {
            RunKind::Free(o) => {
                let block = map.page_size << o;
                format!(" ({} blocks)", bytes / block.max(1))
            }
            _ => String::new(),
        };
        let _ = writeln!(
            body,
            r##"<rect class="legend" data-kind="{}" x="{lx:.1}" y="{ly:.1}" width="12" height="12" fill="{}" stroke="#555" stroke-width="0.5"/><text x="{:.1}" y="{:.1}" font-size="11">{}: {}{}</text>"##,
            k,
            color(*k, max_order),
            lx + 16.0,
            ly + 10.0,
            k,
            human(*bytes),
            extra
        );
    }
    let legend_rows = items.len().div_ceil(cols);
    y += legend_rows as f64 * 18.0 + 4.0;
    let mut lx = MARGIN;
    for (name, fill) in [
        ("DMA buffer", "#e74c3c"),
        ("CMA region", "#d5f5ee"),
        ("kernel", reservation_color("kernel")),
        ("frame table", reservation_color("frame-table")),
        ("dma-reserve", reservation_color("dma-reserve")),
        ("memmap hole", reservation_color("memmap-hole")),
    ] {
        let _ = writeln!(
            body,
            r##"<rect x="{lx:.1}" y="{y:.1}" width="12" height="12" fill="{fill}" stroke="#555" stroke-width="0.5"/><text x="{:.1}" y="{:.1}" font-size="11">{name}</text>"##,
            lx + 16.0,
            y + 10.0
        );
        lx += 130.0;
        if lx + 130.0 > w - MARGIN {
            lx = MARGIN;
            y += 18.0;
        }
    }
    y += 18.0 + MARGIN;

    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{:.0}" viewBox="0 0 {w} {:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" data-scale="{:e}">"#,
        y.ceil(),
        y.ceil(),
        axis.scale
    );
    let _ = writeln!(
        s,
        r##"<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#f4f4f4"/><line x1="0" y1="0" x2="0" y2="6" stroke="#aaa" stroke-width="2"/></pattern></defs>"##
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{w}" height="{:.0}" fill="white"/>"#,
        y.ceil()
    );
    let _ = writeln!(
        s,
        r##"<rect class="axis" x="{:.1}" y="0" width="{:.1}" height="0" fill="none"/>"##,
        axis.x0, axis.width
    );
    s.push_str(&body);
    s.push_str("</svg>\n");
    s
}

/// Renders an SVG document to PNG bytes.
pub fn png(svg: &str) -> Result<Vec<u8>, String> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    opt.fontdb_mut().load_system_fonts();
    let tree = usvg::Tree::from_str(svg, &opt).map_err(|e| format!("SVG: {e}"))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| "picture has no size".to_string())?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| format!("PNG: {e}"))
}

/// The map as text: zones, reservations, CMA, and bytes per kind.
pub fn text(map: &MemMap) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "physical memory: {} described, granule {} page(s)",
        human(map.end),
        map.granule
    );
    for z in &map.zones {
        let _ = writeln!(
            s,
            "zone {:<7} {:#014x}-{:#014x} {:>10}  {} of {} pages free",
            z.name,
            z.start,
            z.end,
            human(z.end - z.start),
            z.free,
            z.managed
        );
    }
    for r in &map.reservations {
        let _ = writeln!(
            s,
            "reserved {:<12} {:#014x}-{:#014x} {:>10}",
            r.kind,
            r.start,
            r.end,
            human(r.end - r.start)
        );
    }
    if let Some(c) = &map.cma {
        let _ = writeln!(
            s,
            "cma {:#014x}-{:#014x} {:>10}  {} in {} buffer(s)",
            c.base,
            c.end,
            human(c.end - c.base),
            human(c.used),
            c.buffers
        );
    }
    for d in &map.dma {
        let _ = writeln!(
            s,
            "dma buffer {:>5} conn {:>3} {:#014x} {:>10} {:?}",
            d.handle,
            d.conn,
            d.phys,
            human(d.len),
            d.source
        );
    }
    for (k, b) in totals(map) {
        if b > 0 {
            let _ = writeln!(s, "{:<16} {:>10}", k, human(b));
        }
    }
    s
}
