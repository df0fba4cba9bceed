//! `memctl watch`: a live full-screen view, like slabtop or top.
//!
//! Every refresh asks for all the views in one batch frame (status,
//! zoneinfo, slabinfo, mempools, CMA, clients) and redraws: zones with their
//! free pages against the min/low/high watermarks, buddy free blocks per
//! order, the busiest slab caches, mempools, CMA use and per-client usage.
//! `q`, Esc or Ctrl-C quits; `--iterations N` stops by itself.

use std::io;
use std::time::{Duration, Instant};

use memd_client::Client;
use memd_wire::*;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Direction, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};
use ratatui::Frame;

use crate::map::human;
use crate::print::ms;

/// Everything one refresh shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub status: Status,
    pub zones: Vec<ZoneInfo>,
    pub slabs: Vec<SlabInfo>,
    pub pools: Vec<MempoolInfo>,
    pub cma: CmaInfo,
    pub clients: Vec<ClientInfo>,
    /// The guest CPU's busy and halted shares since the previous snapshot.
    pub cpu: Option<CpuShare>,
    /// Each CPU's halted share since the previous snapshot (empty on the
    /// first).
    pub cpus_halted: Vec<f64>,
    /// The service loop's passes since the previous snapshot.
    pub passes: Option<IntervalPasses>,
}

/// How the guest's CPU spent an interval, as fractions of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuShare {
    /// Poll-loop passes that moved packets.
    pub busy: f64,
    /// Halted while idle.
    pub halted: f64,
}

/// Each CPU's halted share between two status replies, by position.
pub fn cpus_halted(before: &Status, after: &Status) -> Vec<f64> {
    before
        .cpus
        .iter()
        .zip(&after.cpus)
        .take_while(|(b, a)| b.apic_id == a.apic_id)
        .map(|(b, a)| {
            let span = (a.busy_ns + a.halted_ns).saturating_sub(b.busy_ns + b.halted_ns);
            a.halted_ns.saturating_sub(b.halted_ns) as f64 / span.max(1) as f64
        })
        .collect()
}

impl CpuShare {
    /// Between two status replies; None when the service does not measure
    /// both times or no time passed.
    pub fn between(before: &Status, after: &Status) -> Option<CpuShare> {
        let span = after.uptime_ns.checked_sub(before.uptime_ns)?;
        if span == 0 {
            return None;
        }
        let share = |a: Option<u64>, b: Option<u64>| -> Option<f64> {
            Some(b?.saturating_sub(a?) as f64 / span as f64)
        };
        Some(CpuShare {
            busy: share(before.busy_ns, after.busy_ns)?,
            halted: share(before.halted_ns, after.halted_ns)?,
        })
    }
}

/// The service loop's passes that did work over an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntervalPasses {
    /// How many.
    pub passes: u64,
    /// The 99th percentile of their durations.
    pub p99_ns: u64,
    /// The longest.
    pub max_ns: u64,
}

impl IntervalPasses {
    /// Between two status replies of one service; None unless both
    /// report the loop's passes and time went forward.
    pub fn between(before: &Status, after: &Status) -> Option<IntervalPasses> {
        if after.uptime_ns <= before.uptime_ns {
            return None;
        }
        let (a, b) = (before.loop_passes.as_ref()?, after.loop_passes.as_ref()?);
        let d = b.since_boot.since(&a.since_boot);
        Some(IntervalPasses {
            passes: d.passes(),
            p99_ns: d.quantile(990),
            max_ns: d.max_ns,
        })
    }
}

/// Fetches a snapshot: one batch frame, then the cache and pool listings a
/// page at a time (the busiest are picked from all of them).
pub fn fetch(c: &mut Client) -> Result<Snapshot, memd_client::Error> {
    let ops = vec![Op::Status, Op::Zoneinfo, Op::Cma, Op::Clients];
    let mut s = Snapshot {
        slabs: c.slabinfo()?,
        pools: c.mempools()?,
        ..Snapshot::default()
    };
    for r in c.batch(ops, false)? {
        match r.map_err(memd_client::Error::Server)? {
            Reply::Status(v) => s.status = *v,
            Reply::Zoneinfo(v) => s.zones = v,
            Reply::Cma(v) => s.cma = *v,
            Reply::Clients(v) => s.clients = v,
            _ => {}
        }
    }
    Ok(s)
}

fn header(h: &str) -> Row<'_> {
    Row::new(h.split('|').map(|c| Cell::from(c.to_string())))
        .style(Style::default().add_modifier(Modifier::BOLD))
}

fn boxed(title: &str) -> Block<'_> {
    Block::default().borders(Borders::ALL).title(Span::styled(
        format!(" {title} "),
        Style::default().add_modifier(Modifier::BOLD),
    ))
}

/// A bar of `width` cells: free pages on a log scale from 1 to the zone's
/// managed pages, with the min/low/high watermarks marked (M, L, H) and
/// the bar coloured by the lowest watermark the free count is under. The
/// watermarks are about a percent of a zone: on a log scale they sit apart
/// in the middle of the bar, and the bar's end meets them as free pages
/// run out.
fn watermark_bar(z: &ZoneInfo, width: usize) -> Line<'static> {
    let top = ((z.managed.max(1) + 1) as f64).ln();
    let cell = |pages: u64| -> usize {
        let at = ((pages + 1) as f64).ln() / top * width as f64;
        (at.floor() as usize).min(width.saturating_sub(1))
    };
    let filled = if z.free == 0 {
        0
    } else {
        ((((z.free + 1) as f64).ln() / top * width as f64).round() as usize).min(width)
    };
    let (lo_c, low_c, hi_c) = (
        cell(z.watermark.min),
        cell(z.watermark.low),
        cell(z.watermark.high),
    );
    let color = if z.free <= z.watermark.min {
        Color::Red
    } else if z.free <= z.watermark.low {
        Color::Yellow
    } else {
        Color::Green
    };
    let mut spans = Vec::new();
    for i in 0..width {
        let mark = if i == hi_c {
            Some('H')
        } else if i == low_c {
            Some('L')
        } else if i == lo_c {
            Some('M')
        } else {
            None
        };
        let ch = mark.unwrap_or(if i < filled { '█' } else { '·' });
        let style = if mark.is_some() {
            Style::default().fg(Color::White).bg(Color::DarkGray)
        } else {
            Style::default().fg(color)
        };
        spans.push(Span::styled(ch.to_string(), style));
    }
    Line::from(spans)
}

/// Draws one frame of the view.
pub fn draw(f: &mut Frame, s: &Snapshot, refreshed: u64, error: Option<&str>) {
    let area = f.area();
    let zones: Vec<&ZoneInfo> = s.zones.iter().filter(|z| z.managed > 0).collect();
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([
            Constraint::Length(
                2 + s.status.hotplug.is_some() as u16 + (s.status.cpus.len() > 1) as u16,
            ),
            Constraint::Length(zones.len() as u16 + 3),
            Constraint::Length(zones.len() as u16 + 3),
            Constraint::Min(6),
            Constraint::Length(1),
        ])
        .split(area);

    // Status line.
    let st = &s.status;
    let used = st.total_bytes.saturating_sub(st.free_bytes);
    let cpu = s
        .cpu
        .map(|c| {
            format!(
                "  cpu busy {:.0}% halted {:.0}%",
                c.busy * 100.0,
                c.halted * 100.0
            )
        })
        .unwrap_or_default();
    let passes = s
        .passes
        .map(|p| {
            format!(
                "  {} passes, p99 {} max {}",
                p.passes,
                ms(p.p99_ns),
                ms(p.max_ns)
            )
        })
        .unwrap_or_default();
    let head = vec![
        Line::from(vec![
            Span::styled(
                "memd watch",
                Style::default()
                    .fg(Color::Cyan)
                    .add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                "  {}  up {:.0}s  {} connection(s)  {} requests{cpu}{passes}",
                st.server,
                st.uptime_ns as f64 / 1e9,
                st.connections,
                st.requests,
            )),
        ]),
        Line::from(format!(
            "memory {} total, {} used, {} free{}   CMA {}",
            human(st.total_bytes),
            human(used),
            human(st.free_bytes),
            match s.zones.iter().map(|z| z.deferred).sum::<u64>() {
                0 => String::new(),
                pages => format!(", {} not initialised yet", human(pages * 4096)),
            } + &match st.reported_bytes {
                0 => String::new(),
                b => format!(", {} given back to the host", human(b)),
            } + &match st.balloon_bytes {
                0 => String::new(),
                b => format!(", {} in the balloon", human(b)),
            },
            if s.cma.present {
                format!(
                    "{}/{} in {} buffer(s), largest free {}",
                    human(s.cma.usage.used),
                    human(s.cma.total),
                    s.cma.usage.buffers,
                    human(s.cma.usage.largest_free)
                )
            } else {
                "none".to_string()
            }
        )),
    ];
    let mut head = head;
    if st.cpus.len() > 1 {
        let cpus: Vec<String> = st
            .cpus
            .iter()
            .enumerate()
            .map(|(k, c)| {
                // Over the last interval, or since boot on the first draw.
                let up = (c.busy_ns + c.halted_ns).max(1) as f64;
                let halted = s
                    .cpus_halted
                    .get(k)
                    .copied()
                    .unwrap_or(c.halted_ns as f64 / up);
                format!("{k} {} {:.0} % halted", c.role, halted * 100.0)
            })
            .collect();
        head.push(Line::from(format!("cpus: {}", cpus.join(" · "))));
    }
    if let Some(h) = &st.hotplug {
        head.push(Line::from(format!(
            "hot-plug {} of {} requested, {} in use{}",
            human(h.plugged_bytes),
            human(h.requested_bytes),
            human(h.used_bytes),
            match h.shortfall_bytes {
                0 => String::new(),
                b => format!(", {} in use past the request", human(b)),
            }
        )));
    }
    f.render_widget(Paragraph::new(head), rows[0]);

    // Zones with watermarks.
    let bar_w = (rows[1].width as usize).saturating_sub(60).clamp(10, 60);
    let zrows: Vec<Row> = zones
        .iter()
        .map(|z| {
            Row::new(vec![
                Cell::from(z.name.clone()),
                Cell::from(z.free.to_string()),
                Cell::from(z.watermark.min.to_string()),
                Cell::from(z.watermark.low.to_string()),
                Cell::from(z.watermark.high.to_string()),
                Cell::from(z.managed.to_string()),
                Cell::from(watermark_bar(z, bar_w)),
            ])
        })
        .collect();
    let t = Table::new(
        zrows,
        [
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Length(bar_w as u16),
        ],
    )
    .header(header(
        "zone|free|min|low|high|managed|free pages, log scale, vs watermarks M L H",
    ))
    .block(boxed("zones (pages)"));
    f.render_widget(t, rows[1]);

    // Buddy free blocks per order.
    let orders = zones.iter().map(|z| z.free_blocks.len()).max().unwrap_or(0);
    let mut cols = vec![Constraint::Length(7)];
    cols.extend(std::iter::repeat_n(Constraint::Length(6), orders));
    let head: Vec<String> = std::iter::once("zone".to_string())
        .chain((0..orders).map(|o| format!("{o:>5}")))
        .collect();
    let brows: Vec<Row> = zones
        .iter()
        .map(|z| {
            Row::new(
                std::iter::once(Cell::from(z.name.clone()))
                    .chain(z.free_blocks.iter().map(|n| Cell::from(format!("{n:>5}")))),
            )
        })
        .collect();
    let t = Table::new(brows, cols)
        .header(
            Row::new(head.into_iter().map(Cell::from))
                .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .block(boxed("buddy free blocks per order"));
    f.render_widget(t, rows[2]);

    // Bottom: slabs | pools + clients.
    let bottom = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Percentage(55), Constraint::Percentage(45)])
        .split(rows[3]);
    let mut slabs: Vec<&SlabInfo> = s.slabs.iter().collect();
    slabs.sort_by_key(|c| {
        std::cmp::Reverse((c.num_slabs * c.pagesperslab, c.active_objs, c.name.clone()))
    });
    let room = bottom[0].height.saturating_sub(3) as usize;
    let srows: Vec<Row> = slabs
        .iter()
        .take(room)
        .map(|c| {
            Row::new(vec![
                c.name.clone(),
                c.active_objs.to_string(),
                c.num_objs.to_string(),
                c.objsize.to_string(),
                (c.num_slabs * c.pagesperslab).to_string(),
                c.counters.allocs.to_string(),
            ])
        })
        .collect();
    let t = Table::new(
        srows,
        [
            Constraint::Min(14),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(10),
        ],
    )
    .header(header("cache|active|objs|size|pages|allocs"))
    .block(boxed("busiest slab caches"));
    f.render_widget(t, bottom[0]);

    let right = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Percentage(50), Constraint::Percentage(50)])
        .split(bottom[1]);
    let prows: Vec<Row> = s
        .pools
        .iter()
        .map(|p| {
            Row::new(vec![
                p.id.to_string(),
                p.backing.clone(),
                format!("{}/{}", p.curr_nr, p.min_nr),
                human(p.reserve_bytes),
                p.in_use.to_string(),
            ])
        })
        .collect();
    let t = Table::new(
        prows,
        [
            Constraint::Length(4),
            Constraint::Min(12),
            Constraint::Length(9),
            Constraint::Length(10),
            Constraint::Length(7),
        ],
    )
    .header(header("id|backing|reserve|idle|in use"))
    .block(boxed("mempools"));
    f.render_widget(t, right[0]);
    let crows: Vec<Row> = s
        .clients
        .iter()
        .map(|c| {
            Row::new(vec![
                c.conn.to_string(),
                c.name.clone(),
                c.handles.to_string(),
                c.pages.to_string(),
                human(c.bytes),
            ])
        })
        .collect();
    let t = Table::new(
        crows,
        [
            Constraint::Length(5),
            Constraint::Min(10),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(10),
        ],
    )
    .header(header("conn|name|handles|pages|bytes"))
    .block(boxed("clients"));
    f.render_widget(t, right[1]);

    let foot = match error {
        Some(e) => Line::from(Span::styled(
            format!(" error: {e}"),
            Style::default().fg(Color::Red),
        )),
        None => Line::from(format!(" q quits · refresh #{refreshed}")),
    };
    f.render_widget(Paragraph::new(foot), rows[4]);
}

/// Runs the view until `q` (or `iterations` refreshes, if given).
pub fn run(c: &mut Client, interval: Duration, iterations: Option<u64>) -> io::Result<()> {
    let mut terminal = ratatui::try_init()?;
    let result = (|| -> io::Result<()> {
        let mut refreshed = 0u64;
        let mut snap = Snapshot::default();
        loop {
            let error = match fetch(c) {
                Ok(mut s) => {
                    s.cpu = CpuShare::between(&snap.status, &s.status);
                    s.cpus_halted = cpus_halted(&snap.status, &s.status);
                    s.passes = IntervalPasses::between(&snap.status, &s.status);
                    snap = s;
                    None
                }
                Err(e) => Some(e.to_string()),
            };
            refreshed += 1;
            terminal.draw(|f| draw(f, &snap, refreshed, error.as_deref()))?;
            if iterations.is_some_and(|n| refreshed >= n) {
                return Ok(());
            }
            let next = Instant::now() + interval;
            loop {
                let left = next.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                if event::poll(left)? {
                    match event::read()? {
                        Event::Key(k) if k.kind != KeyEventKind::Release => match k.code {
                            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                                return Ok(())
                            }
                            _ => {}
                        },
                        Event::Resize(..) => {
                            terminal.draw(|f| draw(f, &snap, refreshed, error.as_deref()))?;
                        }
                        _ => {}
                    }
                }
            }
        }
    })();
    ratatui::try_restore()?;
    result
}

#[cfg(test)]
/// Renders a snapshot into a test backend of `w`×`h` cells and returns
/// the screen as text, one line per row.
pub fn render_text(s: &Snapshot, w: u16, h: u16) -> String {
    let backend = ratatui::backend::TestBackend::new(w, h);
    let mut t = ratatui::Terminal::new(backend).expect("test backend");
    t.draw(|f| draw(f, s, 1, None)).expect("draw");
    let buf = t.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..buf.area.height {
        for x in 0..buf.area.width {
            out.push_str(buf[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(name: &str, managed: u64, free: u64) -> ZoneInfo {
        ZoneInfo {
            name: name.into(),
            managed,
            free,
            watermark: Watermarks {
                min: managed / 20,
                low: managed / 16,
                high: managed / 12,
            },
            free_blocks: vec![3, 1, 0, 2],
            ..Default::default()
        }
    }

    #[test]
    fn screen_shows_every_panel() {
        let s = Snapshot {
            status: Status {
                server: "memd test".into(),
                total_bytes: 64 << 20,
                free_bytes: 60 << 20,
                cpus: vec![
                    memd_wire::Cpu {
                        apic_id: 0,
                        role: "network loop".into(),
                        busy_ns: 1,
                        halted_ns: 3,
                        ..Default::default()
                    },
                    memd_wire::Cpu {
                        apic_id: 1,
                        role: "idle".into(),
                        busy_ns: 0,
                        halted_ns: 4,
                        ..Default::default()
                    },
                ],
                hotplug: Some(memd_wire::Hotplug {
                    requested_bytes: 32 << 20,
                    plugged_bytes: 36 << 20,
                    used_bytes: 4 << 20,
                    shortfall_bytes: 4 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            },
            zones: vec![
                zone("DMA", 3840, 3000),
                zone("DMA32", 12000, 500),
                zone("Normal", 0, 0),
                zone("Movable", 9216, 8000),
            ],
            slabs: vec![
                SlabInfo {
                    name: "kmalloc-64".into(),
                    num_slabs: 2,
                    pagesperslab: 1,
                    ..Default::default()
                },
                SlabInfo {
                    name: "busy-cache".into(),
                    num_slabs: 9,
                    pagesperslab: 2,
                    ..Default::default()
                },
            ],
            pools: vec![MempoolInfo {
                id: 1,
                backing: "pages order 2".into(),
                ..Default::default()
            }],
            cma: CmaInfo {
                present: true,
                total: 8 << 20,
                ..Default::default()
            },
            clients: vec![ClientInfo {
                conn: 7,
                name: "walkthrough".into(),
                ..Default::default()
            }],
            cpu: Some(CpuShare {
                busy: 0.031,
                halted: 0.952,
            }),
            cpus_halted: vec![0.5, 1.0],
            passes: Some(IntervalPasses {
                passes: 812,
                p99_ns: 410_000,
                max_ns: 630_000,
            }),
        };
        let text = render_text(&s, 120, 40);
        for want in [
            "memd watch",
            "DMA32",
            "buddy free blocks per order",
            "busy-cache",
            "pages order 2",
            "walkthrough",
            "CMA 0 B/8 MiB in 0 buffer(s)",
            "hot-plug 36 MiB of 32 MiB requested, 4 MiB in use, 4 MiB in use past the request",
            "Movable",
            "cpus: 0 network loop 50 % halted · 1 idle 100 % halted",
            "cpu busy 3% halted 95%  812 passes, p99 0.41 ms max 0.63 ms",
            "q quits",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        // Busiest cache first; the empty Normal zone is left out.
        assert!(text.find("busy-cache").unwrap() < text.find("kmalloc-64").unwrap());
        assert!(!text.contains("Normal"));
    }

    #[test]
    fn cpu_share_is_the_growth_over_the_interval() {
        let at = |up: u64, busy: u64, halted: u64| Status {
            uptime_ns: up,
            busy_ns: Some(busy),
            halted_ns: Some(halted),
            ..Default::default()
        };
        let share = CpuShare::between(&at(1_000, 100, 500), &at(3_000, 600, 1_700)).unwrap();
        assert_eq!((share.busy, share.halted), (0.25, 0.6));
        assert_eq!(CpuShare::between(&at(1_000, 0, 0), &at(1_000, 0, 0)), None);
        let unmeasured = Status {
            uptime_ns: 5_000,
            ..Default::default()
        };
        assert_eq!(CpuShare::between(&at(1_000, 0, 0), &unmeasured), None);
    }

    #[test]
    fn each_cpu_halted_share_is_over_the_interval() {
        let cpus = |a: (u64, u64), b: (u64, u64), second_id: u32| Status {
            cpus: vec![
                memd_wire::Cpu {
                    apic_id: 0,
                    busy_ns: a.0,
                    halted_ns: a.1,
                    ..Default::default()
                },
                memd_wire::Cpu {
                    apic_id: second_id,
                    busy_ns: b.0,
                    halted_ns: b.1,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let shares = cpus_halted(
            &cpus((100, 900), (0, 1000), 1),
            &cpus((400, 1600), (0, 2000), 1),
        );
        assert_eq!(shares, [0.7, 1.0]);
        // A CPU list that changed is compared only as far as it agrees.
        let shares = cpus_halted(&cpus((0, 0), (0, 0), 1), &cpus((0, 10), (0, 10), 2));
        assert_eq!(shares, [1.0]);
    }

    #[test]
    fn passes_are_those_of_the_interval() {
        let mut h = PassHistogram::default();
        // A long pass before the interval, at boot.
        h.record(40_000_000);
        let at = |up: u64, h: &PassHistogram| Status {
            uptime_ns: up,
            busy_ns: Some(up / 10),
            halted_ns: Some(up / 2),
            loop_passes: Some(LoopPasses {
                budget_ns: 200_000,
                interval_ns: 1_000_000_000,
                last: PassHistogram::default(),
                since_boot: h.clone(),
            }),
            ..Default::default()
        };
        let before = at(1_000_000_000, &h);
        for _ in 0..95 {
            h.record(50_000);
        }
        for _ in 0..5 {
            h.record(600_000);
        }
        let after = at(3_000_000_000, &h);
        let p = IntervalPasses::between(&before, &after).unwrap();
        assert_eq!(p.passes, 100);
        assert!((600_000..=750_000).contains(&p.p99_ns), "{p:?}");
        assert!((600_000..=750_000).contains(&p.max_ns), "{p:?}");
        // The CPU shares come from the same two replies.
        let cpu = CpuShare::between(&before, &after).unwrap();
        assert_eq!((cpu.busy, cpu.halted), (0.1, 0.5));
        // The first refresh has nothing to compare with; a restarted
        // service neither.
        assert_eq!(IntervalPasses::between(&Status::default(), &after), None);
        assert_eq!(IntervalPasses::between(&after, &before), None);
        let unmeasured = Status {
            uptime_ns: 5_000_000_000,
            ..Default::default()
        };
        assert_eq!(IntervalPasses::between(&after, &unmeasured), None);
    }

    #[test]
    fn watermark_bar_marks_and_fills() {
        let text = |z: &ZoneInfo| -> String {
            watermark_bar(z, 100)
                .spans
                .iter()
                .map(|s| s.content.to_string())
                .collect()
        };
        let z = zone("DMA", 12000, 6000);
        let line = text(&z);
        assert_eq!(line.chars().count(), 100);
        let at = |c: char| line.chars().position(|x| x == c).unwrap();
        assert!(at('M') < at('L') && at('L') < at('H'), "{line}");
        let filled = line.chars().filter(|&c| c == '█').count() + 3;
        assert!(filled > at('H') && filled < 100, "{line}");
        // Out of memory: nothing filled, marks still shown.
        let empty = text(&zone("DMA", 12000, 0));
        assert_eq!(empty.chars().filter(|&c| c == '█').count(), 0);
        assert!(empty.contains('M') && empty.contains('H'));
        // All free: full bar.
        let full = text(&zone("DMA", 12000, 12000));
        assert_eq!(full.chars().filter(|&c| c == '·').count(), 0, "{full}");
    }
}
