//! The pictures and the live view, against a host-side service (memd-service
//! over memd-mm's host arena on loopback, many connections at once):
//! `memctl map --out` draws every zone and reservation to scale, and
//! `memctl watch` runs in a pseudo-terminal, shows the zones and quits on q.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use memd_mm::HostMm;
use memd_service::host::{serve, HostService};

/// A host service on loopback with DMA, DMA32 and Normal, a CMA region
/// and a memmap= hole, serving any number of connections at once (the test
/// process exits at the end).
fn start_server() -> String {
    let mm = HostMm::three_zones(
        128 << 20,
        64 << 20,
        "memd.dma_reserve=16M@dma32 memmap=4M$0x2000000",
    )
    .unwrap();
    serve(HostService::shared(mm, "tok")).unwrap()
}

fn memctl(addr: &str, args: &[&str], stdin: &str) -> (i32, String, String) {
    common::memctl(addr, "tok", args, stdin)
}

/// One SVG element's attributes.
#[derive(Debug)]
struct Elem {
    class: String,
    attrs: Vec<(String, String)>,
}

impl Elem {
    fn get(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }
    fn num(&self, k: &str) -> f64 {
        self.get(k)
            .unwrap_or_else(|| panic!("{k} missing in {self:?}"))
            .parse()
            .unwrap()
    }
}

/// Every `<rect ...>` with a class, attributes parsed.
fn rects(svg: &str) -> Vec<Elem> {
    svg.split("<rect ")
        .skip(1)
        .map(|chunk| {
            let tag = &chunk[..chunk.find('>').unwrap()];
            let mut attrs = Vec::new();
            let mut rest = tag;
            while let Some(eq) = rest.find("=\"") {
                let name = rest[..eq].trim().to_string();
                let after = &rest[eq + 2..];
                let end = after.find('"').unwrap();
                attrs.push((name, after[..end].to_string()));
                rest = &after[end + 1..];
            }
            Elem {
                class: attrs
                    .iter()
                    .find(|(n, _)| n == "class")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                attrs,
            }
        })
        .collect()
}

/// Reads `memctl --json map` for the byte ranges the picture must show.
fn json_map(addr: &str) -> serde_json::Value {
    let (code, out, err) = memctl(addr, &["--json", "map"], "");
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn map_picture_draws_zones_and_reservations_to_scale() {
    let addr = start_server();
    let dir = std::env::temp_dir().join(format!("memctl-visual-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg_path = dir.join("mem.svg");

    // Fragment a little and hold a CMA buffer, in one session that stays
    // open while the picture is taken.
    let session = format!(
        "kmalloc 100\ndma-alloc 8M --mask 32\nmap --out {}\n",
        svg_path.display()
    );
    let (code, out, err) = memctl(&addr, &["session"], &session);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("wrote"), "{out}");
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    let map = json_map(&addr);
    let all = rects(&svg);

    // One scale for every proportional element.
    let scale: f64 = {
        let s = &svg[svg.find("data-scale=\"").unwrap() + 12..];
        s[..s.find('"').unwrap()].parse().unwrap()
    };
    assert!(scale > 0.0);
    let check_scale = |e: &Elem| {
        let (a, b) = (e.num("data-start"), e.num("data-end"));
        let w = e.num("width");
        let want = (b - a) * scale;
        assert!(
            (w - want).abs() <= 1e-3 + want * 1e-6,
            "{} width {w} for {} bytes, want {want}",
            e.class,
            b - a
        );
    };

    // Zones: one element per zone (no holes inside them here), covering
    // exactly the zone's bytes, widths proportional.
    let zones = map["zones"].as_array().unwrap();
    assert_eq!(zones.len(), 3);
    let zone_rects: Vec<&Elem> = all.iter().filter(|e| e.class == "zone").collect();
    for z in zones {
        let name = z["name"].as_str().unwrap();
        let mine: Vec<&&Elem> = zone_rects
            .iter()
            .filter(|e| e.get("data-name") == Some(name))
            .collect();
        assert_eq!(mine.len(), 1, "zone {name}");
        let e = mine[0];
        assert_eq!(e.num("data-start") as u64, z["start"].as_u64().unwrap());
        assert_eq!(e.num("data-end") as u64, z["end"].as_u64().unwrap());
        check_scale(e);
    }
    // Zone widths relate as their sizes do.
    let w = |n: &str| {
        zone_rects
            .iter()
            .find(|e| e.get("data-name") == Some(n))
            .unwrap()
            .num("width")
    };
    let size = |n: &str| {
        let z = zones.iter().find(|z| z["name"] == n).unwrap();
        (z["end"].as_u64().unwrap() - z["start"].as_u64().unwrap()) as f64
    };
    let ratio = (w("DMA32") / w("DMA")) / (size("DMA32") / size("DMA"));
    assert!((ratio - 1.0).abs() < 1e-6, "DMA32:DMA ratio off by {ratio}");
    // Zones do not overlap and appear in address order.
    let mut xs: Vec<(f64, f64)> = zone_rects
        .iter()
        .map(|e| (e.num("x"), e.num("x") + e.num("width")))
        .collect();
    xs.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    for p in xs.windows(2) {
        assert!(p[0].1 <= p[1].0 + 1e-6, "zones overlap: {p:?}");
    }

    // Reservations: every one drawn, to scale, including the memmap hole
    // and the CMA region.
    let res = map["reservations"].as_array().unwrap();
    let kinds: Vec<&str> = res.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    for k in ["dma-reserve", "memmap-hole", "frame-table", "zero-page"] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    let res_rects: Vec<&Elem> = all.iter().filter(|e| e.class == "reservation").collect();
    for r in res {
        let (start, end) = (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap());
        let e = res_rects
            .iter()
            .find(|e| {
                e.get("data-kind") == r["kind"].as_str()
                    && e.num("data-start") as u64 == start
                    && e.num("data-end") as u64 == end
            })
            .unwrap_or_else(|| panic!("no element for reservation {r}"));
        check_scale(e);
    }
    let hole = res_rects
        .iter()
        .find(|e| e.get("data-kind") == Some("memmap-hole"))
        .unwrap();
    assert!((hole.num("width") - (4u64 << 20) as f64 * scale).abs() < 1e-3);

    // The CMA region, the buffer in it, and the free blocks by order.
    let cma = all.iter().find(|e| e.class == "cma").expect("CMA element");
    check_scale(cma);
    assert_eq!(
        cma.num("data-end") - cma.num("data-start"),
        (16 << 20) as f64
    );
    let dma: Vec<&Elem> = all.iter().filter(|e| e.class == "dma").collect();
    assert_eq!(dma.len(), 1, "the session's 8 MiB buffer");
    assert_eq!(
        dma[0].num("data-end") - dma[0].num("data-start"),
        (8 << 20) as f64
    );
    assert!(dma[0].num("data-start") >= cma.num("data-start"));
    let runs: Vec<&Elem> = all.iter().filter(|e| e.class == "run").collect();
    assert!(runs
        .iter()
        .any(|e| e.get("data-kind") == Some("free order 10")));
    assert!(runs.iter().any(|e| e.get("data-kind") == Some("slab")));
    // Runs wrap over rows but add up to what they stand for.
    let run_px: f64 = runs.iter().map(|e| e.num("width")).sum();
    let run_bytes: f64 = map["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] != "Absent")
        .map(|r| r["len"].as_f64().unwrap())
        .sum();
    let frame_scale: f64 = {
        let key = "<g class=\"frames\" data-scale=\"";
        let g = &svg[svg.find(key).unwrap() + key.len()..];
        g[..g.find('"').unwrap()].parse().unwrap()
    };
    assert!(
        (run_px - run_bytes * frame_scale).abs() / run_px < 1e-3,
        "{run_px} px for {run_bytes} bytes"
    );
    // A gap stands for the 3.8 GiB without RAM below 4 GiB.
    assert!(all.iter().any(|e| e.class == "gap"));

    // PNG through resvg: a real image of the SVG's size.
    let png_path = dir.join("mem.png");
    let (code, out, err) = memctl(
        &addr,
        &["map", "--out", png_path.to_str().unwrap(), "--width", "800"],
        "",
    );
    assert_eq!(code, 0, "{out} {err}");
    let png = std::fs::read(&png_path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 800);
    // MEMCTL_KEEP_PICTURES=1 keeps them to look at.
    if std::env::var_os("MEMCTL_KEEP_PICTURES").is_some() {
        eprintln!("pictures kept in {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn buddy_histogram_and_completions() {
    let addr = start_server();
    let (code, out, err) = memctl(&addr, &["buddy", "--histogram", "--width", "20"], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("zone DMA32"), "{out}");
    assert!(out.contains("order 10"), "{out}");
    // The fresh manager's free memory is mostly in the largest blocks: the
    // order-10 bar of DMA32 is the full 20 cells.
    let line = out
        .lines()
        .skip_while(|l| !l.contains("zone DMA32"))
        .find(|l| l.contains("order 10"))
        .unwrap();
    assert!(line.contains(&"█".repeat(20)), "{line}");

    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = memctl("127.0.0.1:1", &["completions", shell], "");
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains("memctl"), "{shell}");
        assert!(out.contains("dma-alloc"), "{shell}: subcommands completed");
    }
    let (code, out, _) = memctl("127.0.0.1:1", &["--help"], "");
    assert_eq!(code, 0);
    assert!(out.contains("Examples:") && out.contains("memctl map --out mem.svg"));
}

#[test]
fn watch_in_a_pseudo_terminal_shows_zones_and_quits_on_q() {
    use portable_pty::{native_pty_system, CommandBuilder, PtySize};

    let addr = start_server();
    let pty = native_pty_system()
        .openpty(PtySize {
            rows: 40,
            cols: 120,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut cmd = CommandBuilder::new(env!("CARGO_BIN_EXE_memctl"));
    cmd.args([
        "--addr",
        &addr,
        "--token",
        "tok",
        "watch",
        "--interval-ms",
        "200",
    ]);
    cmd.env("TERM", "xterm-256color");
    let mut child = pty.slave.spawn_command(cmd).unwrap();
    drop(pty.slave);
    let mut reader = pty.master.try_clone_reader().unwrap();
    // The bytes go through a terminal emulator, so the test reads the
    // screen as a person would see it (ratatui redraws only what changed).
    let screen = Arc::new(Mutex::new(vt100::Parser::new(40, 120, 0)));
    let sink = screen.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().process(&buf[..n]);
        }
    });
    let wait_for = |what: &[&str], secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = screen.lock().unwrap().screen().contents();
            if what.iter().all(|w| s.contains(w)) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what:?} not on screen:\n{s}");
            thread::sleep(Duration::from_millis(50));
        }
    };
    let s = wait_for(&["memd watch", "DMA32", "Normal", "buddy free blocks"], 20);
    // Zone rows: name, then free pages and the watermarks.
    for zone in ["DMA ", "DMA32", "Normal"] {
        let row = s
            .lines()
            .find(|l| l.trim_start_matches(['│', ' ']).starts_with(zone))
            .unwrap_or_else(|| panic!("no row for {zone} in\n{s}"));
        assert!(row.contains('M') && row.contains('H'), "{row}");
    }
    // It refreshes: the refresh counter moves.
    wait_for(&["refresh #3"], 20);
    assert!(child.try_wait().unwrap().is_none(), "still running");

    let mut writer = pty.master.take_writer().unwrap();
    writer.write_all(b"q").unwrap();
    writer.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("watch did not quit on q");
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
