//! The report a person reads: `report.html` with the verdicts, the anomalies, the nemesis
//! log, a timeline of operations with fault intervals shaded, and latency and throughput
//! plots. Plain SVG, no scripts, so it opens anywhere.

use std::fmt::Write as _;

use crate::checker::Check;
use crate::history::{Completed, Event, Kind, Op, Process, FINAL_PROCESSES};

const W: f64 = 1100.0;
/// Large runs are thinned to this many operations in the plots (evenly).
const MAX_PLOTTED: usize = 20_000;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Nemesis intervals: (start ns, end ns, label).
fn intervals(events: &[Event]) -> Vec<(u64, u64, String)> {
    let end = events.last().map_or(0, |e| e.time_ns);
    let mut open: Vec<(u64, String)> = Vec::new();
    let mut out = Vec::new();
    for e in events {
        if let (Process::Nemesis(_), Op::Nemesis { fault, detail }) = (e.process, &e.op) {
            match e.kind {
                Kind::Invoke => open.push((e.time_ns, format!("{fault}: {detail}"))),
                _ => {
                    if let Some(i) = open.iter().position(|(_, l)| l.starts_with(&format!("{fault}:"))) {
                        let (t, l) = open.remove(i);
                        out.push((t, e.time_ns, l));
                    }
                }
            }
        }
    }
    out.extend(open.into_iter().map(|(t, l)| (t, end, l)));
    out
}

fn color(kind: Kind) -> &'static str {
    match kind {
        Kind::Ok => "#2e8b57",
        Kind::Fail => "#d9534f",
        Kind::Info => "#f0ad4e",
        Kind::Invoke => "#999",
    }
}

/// A fixed colour per fault family, so the same fault looks the same everywhere.
fn fault_color(label: &str) -> &'static str {
    let family = label.split(&[':', '-'][..]).next().unwrap_or("");
    match family {
        "partition" => "#4a7dcc",
        "packet" => "#4aa3a3",
        "kill" => "#c44a6a",
        "pause" => "#a05cc4",
        "membership" => "#7a8a3a",
        "clock" => "#cc7a4a",
        "disk" => "#555",
        _ => "#999",
    }
}

fn shade(svg: &mut String, iv: &[(u64, u64, String)], x: &dyn Fn(u64) -> f64, top: f64, h: f64) {
    for (a, b, label) in iv {
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="{top}" width="{:.1}" height="{h}" fill="{}" opacity="0.08"><title>{}</title></rect>"#,
            x(*a),
            (x(*b) - x(*a)).max(1.0),
            fault_color(label),
            esc(label)
        );
    }
}

/// One lane per fault family, a bar for each interval the fault held.
fn lanes(svg: &mut String, iv: &[(u64, u64, String)], x: &dyn Fn(u64) -> f64) -> f64 {
    let mut families: Vec<&str> = iv.iter().map(|(_, _, l)| l.split(':').next().unwrap_or("")).collect();
    families.sort_unstable();
    families.dedup();
    for (row, fam) in families.iter().enumerate() {
        let y = 12.0 * row as f64;
        let _ = write!(svg, r##"<text x="2" y="{:.1}" fill="#444">{}</text>"##, y + 9.0, esc(fam));
        for (a, b, label) in iv.iter().filter(|(_, _, l)| l.split(':').next() == Some(fam)) {
            let _ = write!(
                svg,
                r#"<rect x="{:.1}" y="{y}" width="{:.1}" height="9" fill="{}"><title>{}</title></rect>"#,
                x(*a),
                (x(*b) - x(*a)).max(1.0),
                fault_color(label),
                esc(label)
            );
        }
    }
    12.0 * families.len() as f64 + 4.0
}

fn thin(ops: &[Completed]) -> Vec<&Completed> {
    let stride = ops.len().div_ceil(MAX_PLOTTED).max(1);
    ops.iter().step_by(stride).collect()
}

fn timeline(ops: &[Completed], iv: &[(u64, u64, String)], end_ns: u64, workers: usize) -> String {
    let ops = thin(ops);
    // One row per worker (a retired process id p continues worker p mod workers), and one
    // for the final reads.
    let rows = workers + 1;
    let row_of = |p: u64| if p >= FINAL_PROCESSES { workers } else { (p % workers.max(1) as u64) as usize };
    let x = |t: u64| 100.0 + (t as f64 / end_ns.max(1) as f64) * (W - 120.0);
    let mut body = String::new();
    let top = lanes(&mut body, iv, &x);
    let h = top + 14.0 * rows as f64 + 30.0;
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-size="10">"#);
    shade(&mut svg, iv, &x, top, h - top - 20.0);
    svg += &body;
    for r in 0..rows {
        let label = if r == workers { "final reads".to_string() } else { format!("worker {r}") };
        let _ = write!(svg, r##"<text x="2" y="{:.1}" fill="#444">{label}</text>"##, top + 14.0 * r as f64 + 11.0);
    }
    for o in &ops {
        let y = top + 14.0 * row_of(o.process) as f64 + 2.0;
        let end = o.complete_ns.unwrap_or(end_ns);
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="{y}" width="{:.1}" height="10" fill="{}"><title>p{} {} {:?} {}</title></rect>"#,
            x(o.invoke_ns),
            (x(end) - x(o.invoke_ns)).max(0.8),
            color(o.kind),
            o.process,
            o.op.name(),
            o.kind,
            esc(&format!("{:?}", o.op))
        );
    }
    axis(&mut svg, end_ns, h - 16.0, &x);
    svg + "</svg>"
}

fn axis(svg: &mut String, end_ns: u64, y: f64, x: &dyn Fn(u64) -> f64) {
    let secs = end_ns / 1_000_000_000;
    let step = [1u64, 5, 10, 30, 60, 120, 300, 600].into_iter().find(|s| secs / s <= 12).unwrap_or(1200);
    let mut s = 0;
    while s <= secs {
        let _ = write!(svg, r##"<text x="{:.1}" y="{}" fill="#444">{s}s</text>"##, x(s * 1_000_000_000), y + 12.0);
        s += step;
    }
}

fn latency(ops: &[Completed], iv: &[(u64, u64, String)], end_ns: u64) -> String {
    let ops = thin(ops);
    let h = 260.0;
    let x = |t: u64| 40.0 + (t as f64 / end_ns.max(1) as f64) * (W - 60.0);
    // Log scale from 0.1 ms to 10 s.
    let y = |ms: f64| {
        let l = ms.max(0.1).log10();
        (h - 30.0) - (l + 1.0) / 5.0 * (h - 40.0)
    };
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-size="10">"#);
    shade(&mut svg, iv, &x, 0.0, h - 30.0);
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
        let _ = write!(
            svg,
            r##"<line x1="40" x2="{W}" y1="{0:.1}" y2="{0:.1}" stroke="#ddd"/><text x="2" y="{0:.1}">{ms}ms</text>"##,
            y(ms)
        );
    }
    for o in &ops {
        let Some(done) = o.complete_ns else { continue };
        let ms = (done - o.invoke_ns) as f64 / 1e6;
        let _ =
            write!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="1.5" fill="{}"/>"#, x(o.invoke_ns), y(ms), color(o.kind));
    }
    axis(&mut svg, end_ns, h - 26.0, &x);
    svg + "</svg>"
}

fn throughput(ops: &[Completed], iv: &[(u64, u64, String)], end_ns: u64) -> String {
    let buckets = (end_ns / 1_000_000_000 + 1) as usize;
    let mut counts = vec![[0u32; 3]; buckets];
    // The final reads are a burst of their own; the plot is about the workload under faults.
    for o in ops.iter().filter(|o| o.process < FINAL_PROCESSES) {
        let Some(t) = o.complete_ns else { continue };
        let k = match o.kind {
            Kind::Ok => 0,
            Kind::Fail => 1,
            _ => 2,
        };
        counts[(t / 1_000_000_000) as usize][k] += 1;
    }
    let max = counts.iter().flat_map(|c| c.iter()).copied().max().unwrap_or(1).max(1) as f64;
    let h = 220.0;
    let x = |t: u64| 40.0 + (t as f64 / end_ns.max(1) as f64) * (W - 60.0);
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-size="10">"#);
    shade(&mut svg, iv, &x, 0.0, h - 30.0);
    let _ = write!(svg, r##"<text x="2" y="12">{max} ops/s</text><text x="2" y="{}">0</text>"##, h - 30.0);
    for (k, kind) in [Kind::Ok, Kind::Fail, Kind::Info].into_iter().enumerate() {
        let pts: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!("{:.1},{:.1}", x(i as u64 * 1_000_000_000), (h - 30.0) - c[k] as f64 / max * (h - 45.0))
            })
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.2" points="{}"/>"#,
            color(kind),
            pts.join(" ")
        );
    }
    axis(&mut svg, end_ns, h - 26.0, &x);
    svg + "</svg>"
}

pub fn html(
    title: &str,
    events: &[Event],
    ops: &[Completed],
    checks: &[Check],
    summary: &serde_json::Value,
    workers: usize,
) -> String {
    let end_ns = events.last().map_or(1, |e| e.time_ns);
    let iv = intervals(events);
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><meta charset=utf-8><title>{t}</title><style>body{{font:14px sans-serif;margin:20px;max-width:1150px}}\
         td,th{{padding:2px 8px;text-align:left;vertical-align:top}}.valid{{color:#2e8b57}}.invalid{{color:#d9534f}}\
         .unknown{{color:#c98a00}}pre{{white-space:pre-wrap}}</style><h1>{t}</h1>",
        t = esc(title)
    );
    let _ = write!(out, "<pre>{}</pre>", esc(&serde_json::to_string_pretty(summary).unwrap_or_default()));
    out += "<h2>Checkers</h2><table><tr><th>checker<th>verdict<th>stats</tr>";
    for c in checks {
        let v = format!("{:?}", c.valid).to_lowercase();
        let stats: Vec<String> = c.stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = write!(out, "<tr><td>{}<td class={v}>{v}<td>{}</tr>", c.checker, esc(&stats.join(" ")));
    }
    out += "</table>";
    for c in checks {
        if !c.anomalies.is_empty() || !c.unknown.is_empty() {
            let _ = write!(out, "<h3>{}</h3><ul>", c.checker);
            for a in c.anomalies.iter().chain(&c.unknown) {
                let _ = write!(out, "<li>{}</li>", esc(a));
            }
            out += "</ul>";
        }
    }
    out += "<h2>Timeline</h2><p>Top: one lane per fault family, a bar while the fault held. Below: one row per \
            worker; green ok, red fail, orange info (indeterminate). Hover for details.</p>";
    out += &timeline(ops, &iv, end_ns, workers);
    out += "<h2>Latency</h2>";
    out += &latency(ops, &iv, end_ns);
    out += "<h2>Throughput (completions per second, before the final reads)</h2>";
    out += &throughput(ops, &iv, end_ns);
    out += "<h2>Nemesis</h2><table><tr><th>from<th>to<th>fault</tr>";
    for (a, b, l) in &iv {
        let _ = write!(out, "<tr><td>{:.1}s<td>{:.1}s<td>{}</tr>", *a as f64 / 1e9, *b as f64 / 1e9, esc(l));
    }
    out + "</table>"
}
