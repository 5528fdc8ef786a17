//! The soak's report: `soak.json` (everything), `soak.md` (the run's verdict, the per-fault
//! table, the stall window's latency next to the instances' CPU, RSS and descriptors per
//! instance) and `soak_latency.png` (per-second p99 and max delivery latency with the
//! faults marked), drawn with `plotters`' bitmap backend and a system TrueType font.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;

use serde::Serialize;

use super::stats::Stats;
use super::{Config, FaultResult, ProcSample};

/// The run's results (besides the per-phase counters in [`Stats`]).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Run id.
    pub run: String,
    /// Settings.
    pub config: Config,
    /// Clients whose check finished.
    pub clients_finished: usize,
    /// Clients per transport.
    pub transports: BTreeMap<String, usize>,
    /// Messages RabbitMQ confirmed.
    pub messages_published: u64,
    /// Per-recipient events those carried.
    pub recipient_events: u64,
    /// Publish failures (each retried).
    pub publish_failures: u64,
    /// Events published again after a failure.
    pub republished_events: u64,
    /// Events applied (first time) by all clients.
    pub applied: u64,
    /// Events never applied (gaps and tails).
    pub lost: u64,
    /// Of those: `k`s a client skipped (gaps it never filled).
    pub gaps: u64,
    /// Of those: events still undelivered when the drain ended (a client behind).
    pub undelivered: u64,
    /// Clients that lost any.
    pub lost_clients: usize,
    /// Out-of-order arrivals.
    pub out_of_order: u64,
    /// Violations logged.
    pub violations: u64,
    /// `recovered: false` answers (the app would reload).
    pub reloads: u64,
    /// Seconds until every client caught up after publishing stopped.
    pub drained_after_secs: f64,
    /// Per fault.
    pub faults: Vec<FaultResult>,
    /// Phase names and starts (seconds since the stats started).
    pub phase_bounds: Vec<(String, f64)>,
    /// When the faults' clock starts (seconds since the stats started).
    pub t0: f64,
    /// `feedhub_slow_consumer_closes_total` per instance at the end (current process).
    pub slow_consumer_closes: Vec<f64>,
    /// Selected counters summed over the instances' current processes (after restarts,
    /// only since their last start).
    pub instance_counters: BTreeMap<String, f64>,
    /// Publish → confirm time per batch (ms): p50, p99, max.
    pub confirm_ms: (f64, f64, f64),
    /// Close reasons the stalled client read.
    pub stall_closes: Vec<String>,
    /// Connections the stalled client opened.
    pub stall_connects: u64,
    /// `/proc/loadavg` before and after.
    pub load_before: String,
    /// `/proc/loadavg` after.
    pub load_after: String,
    /// Descriptor limit.
    pub nofile: u64,
    /// First violation per user (up to 20).
    pub first_violations: Vec<String>,
    /// Clients that lost events (up to 10).
    pub lost_examples: Vec<String>,
    /// `Recover` calls that failed (retried at the next gap).
    pub recover_errors: u64,
    /// Connect attempts that failed (retried).
    pub connect_failures: u64,
    /// The last one.
    pub last_connect_error: Option<String>,
    /// The publisher's last failure.
    pub publish_last_error: Option<String>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Writes the report files into `dir`; returns the JSON summary.
pub fn write(
    dir: &Path,
    s: &Summary,
    stats: &Stats,
    samples: &[ProcSample],
) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(s)?;
    let phases: Vec<serde_json::Value> = s
        .phase_bounds
        .iter()
        .enumerate()
        .map(|(i, (name, at))| {
            let p = &stats.phases[i.min(stats.phases.len() - 1)];
            serde_json::json!({
                "phase": name,
                "at": at - s.t0,
                "live": p.live.load(Ordering::Relaxed),
                "repaired": p.repaired.load(Ordering::Relaxed),
                "duplicates": p.duplicates.load(Ordering::Relaxed),
                "offset_duplicates": p.offset_duplicates.load(Ordering::Relaxed),
                "out_of_order": p.out_of_order.load(Ordering::Relaxed),
                "violations": p.violations.load(Ordering::Relaxed),
                "worst_ms": ms(p.worst_us.load(Ordering::Relaxed)),
                "reconnects": p.reconnects.load(Ordering::Relaxed),
                "resumes": p.resumes.load(Ordering::Relaxed),
                "resume_failures": p.resume_failures.load(Ordering::Relaxed),
            })
        })
        .collect();
    v["phases"] = serde_json::Value::Array(phases.clone());
    let live = stats
        .live_hist
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    v["live_latency_ms"] = serde_json::json!({
        "count": live.len(),
        "p50": ms(live.value_at_quantile(0.5)),
        "p99": ms(live.value_at_quantile(0.99)),
        "p999": ms(live.value_at_quantile(0.999)),
        "max": ms(live.max()),
    });
    // The stall window against the same span before it: p99 of every other client's
    // deliveries, and the instances' CPU in each.
    if let Some(stall) = s.faults.iter().find(|f| f.name == "stalled client") {
        let from = s.t0 + stall.at;
        let to = from + stall.action_secs;
        let len = to - from;
        let before = (from - len - 2.0).max(s.t0);
        let p99 = |a: f64, b: f64| ms(stats.window(a, b).value_at_quantile(0.99));
        let cpu = |a: f64, b: f64| -> f64 {
            let mut total = 0.0;
            for i in 0..s.config.instances {
                let at = |t: f64| {
                    samples
                        .iter()
                        .filter(|x| x.instance == i && x.t <= t)
                        .map(|x| x.cpu_secs)
                        .next_back()
                };
                if let (Some(x), Some(y)) = (at(a), at(b)) {
                    if y >= x {
                        total += y - x;
                    }
                }
            }
            total
        };
        v["stall_window"] = serde_json::json!({
            "stalled": !s.config.no_stall,
            "from": from - s.t0,
            "secs": len,
            "p99_ms": p99(from, to),
            "p99_ms_before": p99(before, from - 2.0),
            "instances_cpu_secs": cpu(from, to),
            "instances_cpu_secs_before": cpu(before, from - 2.0),
        });
    }
    let per_second: Vec<(f64, f64, f64)> = stats
        .per_second
        .iter()
        .enumerate()
        .filter_map(|(sec, h)| {
            let h = h.lock().unwrap_or_else(|e| e.into_inner());
            (!h.is_empty()).then(|| {
                (
                    sec as f64 - s.t0,
                    ms(h.value_at_quantile(0.99)),
                    ms(h.max()),
                )
            })
        })
        .collect();
    v["per_second"] = serde_json::json!(per_second);
    v["proc_samples"] = serde_json::to_value(samples)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(&v)?)?;
    let plot = match plot(&dir.join("soak_latency.png"), &per_second, s) {
        Ok(()) => Some("soak_latency.png"),
        Err(e) => {
            eprintln!("soak: no plot: {e:#}");
            None
        }
    };
    std::fs::write(dir.join("soak.md"), markdown(&v, s, &phases, samples, plot))?;
    Ok(v)
}

fn markdown(
    v: &serde_json::Value,
    s: &Summary,
    phases: &[serde_json::Value],
    samples: &[ProcSample],
    plot: Option<&str>,
) -> String {
    let c = &s.config;
    let mut out = String::new();
    let _ = writeln!(out, "# Chaos soak, run `{}`\n", s.run);
    let _ = writeln!(
        out,
        "{} instances behind `rr_proxy`, private Redis (AOF, `appendfsync always`) and RabbitMQ; {} clients over {} users ({}), {:.0} events/s ({:.0}% recipients lists of 3), {:.0} s of traffic. Load average before: `{}`, after: `{}`.\n",
        c.instances,
        c.clients,
        c.users,
        s.transports
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        c.rate,
        c.multi_share * 100.0,
        c.duration_secs,
        s.load_before,
        s.load_after
    );
    let _ = writeln!(
        out,
        "**Result: {} lost ({} skipped, {} still undelivered when the drain ended), {} out of order, {} `recovered:false`** ({} `Recover` calls failed and were retried), over {} messages ({} per-recipient events) confirmed by RabbitMQ and {} first deliveries checked against the publisher's per-user sequence numbers; {} publish failures ({} events republished, so duplicates by id are expected). Every client caught up {:.1} s after publishing stopped. Live latency: p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms.\n",
        s.lost,
        s.gaps,
        s.undelivered,
        s.out_of_order,
        s.reloads,
        s.recover_errors,
        s.messages_published,
        s.recipient_events,
        s.applied,
        s.publish_failures,
        s.republished_events,
        s.drained_after_secs,
        v["live_latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        v["live_latency_ms"]["p99"].as_f64().unwrap_or(0.0),
        v["live_latency_ms"]["max"].as_f64().unwrap_or(0.0),
    );
    let _ = writeln!(
        out,
        "| fault | at (s) | action (s) | time to recover (s) | events repaired from history | duplicates (by id / by offset) | worst latency (ms) | reconnects / resumes |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in phases.iter().enumerate() {
        let fault = if i == 0 || i > s.faults.len() {
            None
        } else {
            s.faults.get(i - 1)
        };
        let name = p["phase"].as_str().unwrap_or("");
        let (at, action, rec) = match fault {
            Some(f) => (
                format!("{:.1}", f.at),
                format!("{:.1}", f.action_secs),
                match (&f.error, f.recover_secs) {
                    (Some(e), _) => format!("failed: {e}"),
                    (None, Some(r)) => format!("{r:.2}"),
                    (None, None) => format!("never ({})", f.not_recovered.as_deref().unwrap_or("")),
                },
            ),
            None => (
                format!("{:.1}", p["at"].as_f64().unwrap_or(0.0)),
                "–".into(),
                "–".into(),
            ),
        };
        let _ = writeln!(
            out,
            "| {name} | {at} | {action} | {rec} | {} | {} / {} | {:.0} | {} / {} |",
            p["repaired"],
            p["duplicates"],
            p["offset_duplicates"],
            p["worst_ms"].as_f64().unwrap_or(0.0),
            p["reconnects"],
            p["resumes"],
        );
    }
    let _ = writeln!(
        out,
        "\nTime to recover: from the fault's start until every client is connected and none is more than 1 s behind the publisher. A phase runs from its fault's start to the next one's; its counters cover that span.\n"
    );
    if let Some(w) = v.get("stall_window") {
        let _ = writeln!(
            out,
            "**Stalled client** ({}): during the {:.0} s window the other clients' p99 was {:.1} ms (the same span before it: {:.1} ms); the instances used {:.2} CPU-s (before: {:.2}). Slow-consumer closes per instance at the end: {:?}; the stalled client read {} Close message(s){}.\n",
            if w["stalled"].as_bool().unwrap_or(false) { "stalled" } else { "control run, not stalled" },
            w["secs"].as_f64().unwrap_or(0.0),
            w["p99_ms"].as_f64().unwrap_or(0.0),
            w["p99_ms_before"].as_f64().unwrap_or(0.0),
            w["instances_cpu_secs"].as_f64().unwrap_or(0.0),
            w["instances_cpu_secs_before"].as_f64().unwrap_or(0.0),
            s.slow_consumer_closes,
            s.stall_closes.len(),
            s.stall_closes.first().map(|r| format!(" (\"{r}\")")).unwrap_or_default(),
        );
    }
    let _ = writeln!(
        out,
        "| instance | RSS min / max / end (MiB) | descriptors min / max / end |"
    );
    let _ = writeln!(out, "|---|---:|---:|");
    for i in 0..c.instances {
        let xs: Vec<&ProcSample> = samples
            .iter()
            .filter(|x| x.instance == i && x.rss_kib > 0)
            .collect();
        if xs.is_empty() {
            continue;
        }
        let mib = |k: u64| k as f64 / 1024.0;
        let rmin = xs.iter().map(|x| x.rss_kib).min().unwrap_or(0);
        let rmax = xs.iter().map(|x| x.rss_kib).max().unwrap_or(0);
        let fmin = xs.iter().map(|x| x.fds).min().unwrap_or(0);
        let fmax = xs.iter().map(|x| x.fds).max().unwrap_or(0);
        let last = xs[xs.len() - 1];
        let _ = writeln!(
            out,
            "| {} | {:.0} / {:.0} / {:.0} | {fmin} / {fmax} / {} |",
            i + 1,
            mib(rmin),
            mib(rmax),
            mib(last.rss_kib),
            last.fds
        );
    }
    let _ = writeln!(out, "\n(Per-second samples are in `soak.json`.)\n");
    let _ = writeln!(
        out,
        "RabbitMQ publish → confirm per batch: p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms. Instance counters (current processes): {}.\n",
        s.confirm_ms.0,
        s.confirm_ms.1,
        s.confirm_ms.2,
        s.instance_counters
            .iter()
            .map(|(k, v)| format!("`{k}` {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(p) = plot {
        let _ = writeln!(out, "![delivery latency over time]({p})\n");
    }
    if !s.first_violations.is_empty() {
        let _ = writeln!(out, "First violations:\n");
        for l in &s.first_violations {
            let _ = writeln!(out, "- {l}");
        }
        let _ = writeln!(out);
    }
    if !s.lost_examples.is_empty() {
        let _ = writeln!(out, "Clients that lost events:\n");
        for l in &s.lost_examples {
            let _ = writeln!(out, "- {l}");
        }
    }
    out
}

fn plot(path: &Path, per_second: &[(f64, f64, f64)], s: &Summary) -> anyhow::Result<()> {
    use plotters::prelude::*;
    super::bench_report::register_font()?;
    if per_second.is_empty() {
        anyhow::bail!("no deliveries");
    }
    let root = BitMapBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = per_second.iter().map(|p| p.0).fold(1.0f64, f64::max) + 1.0;
    let x_min = per_second.iter().map(|p| p.0).fold(0.0f64, f64::min);
    let y_max = per_second.iter().map(|p| p.2).fold(1.0f64, f64::max) * 2.0;
    let y_min = per_second
        .iter()
        .map(|p| p.1)
        .fold(f64::MAX, f64::min)
        .max(0.05)
        / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Delivery latency per second ({} clients, {:.0} events/s): {} lost, {} out of order",
                s.config.clients, s.config.rate, s.lost, s.out_of_order
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds into the run")
        .y_desc("latency (ms, log scale)")
        .label_style(("sans-serif", 14))
        .draw()?;
    let blue = RGBColor(0x1f, 0x77, 0xb4);
    let red = RGBColor(0xd6, 0x27, 0x28);
    chart
        .draw_series(LineSeries::new(
            per_second.iter().map(|p| (p.0, p.2.max(y_min))),
            red.stroke_width(1),
        ))?
        .label("max")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            per_second.iter().map(|p| (p.0, p.1.max(y_min))),
            blue.stroke_width(2),
        ))?
        .label("p99")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
    let grey = RGBColor(0x55, 0x55, 0x55);
    for (i, f) in s.faults.iter().enumerate() {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(f.at, y_min), (f.at, y_max)],
            grey.stroke_width(1),
        )))?;
        let y = y_max / (1.6f64).powi(1 + (i % 4) as i32);
        chart.draw_series(std::iter::once(Text::new(
            f.name.clone(),
            (f.at + 0.5, y),
            ("sans-serif", 13).into_font().color(&grey),
        )))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
