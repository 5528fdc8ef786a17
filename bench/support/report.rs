//! The benchmark report: from the runner's per-scenario results, writes `summary.json`,
//! `results.md` (machine, goals with met/missed, detail tables) and PNG plots drawn with
//! `plotters`' bitmap backend. Text in the plots uses a TrueType font found on the system
//! (DejaVu/Liberation); without one the plots are skipped and the table says so.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

/// Display order and names of the servers.
pub const SERVERS: [(&str, &str); 4] = [
    ("feedhub-json", "feedhub (JSON)"),
    ("feedhub-msgpack", "feedhub (MessagePack)"),
    ("ws", "bare tokio-tungstenite"),
    ("socketio", "Socket.IO + redis-adapter"),
];

fn find<'a>(results: &'a [Value], scenario: &str, server: &str) -> Option<&'a Value> {
    results
        .iter()
        .find(|r| r["scenario"] == scenario && r["server"] == server)
}

fn res<'a>(results: &'a [Value], scenario: &str, server: &str) -> Option<&'a Value> {
    find(results, scenario, server).and_then(|r| r.get("result"))
}

fn cell(results: &[Value], scenario: &str, server: &str, f: impl Fn(&Value) -> String) -> String {
    match find(results, scenario, server) {
        None => "–".into(),
        Some(r) if r.get("unsupported").is_some() => "n/a".into(),
        Some(r) if r.get("error").is_some() => "error".into(),
        Some(r) => r.get("result").map(f).unwrap_or_else(|| "–".into()),
    }
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn fmt_n(v: f64) -> String {
    if v >= 100.0 {
        let s = format!("{:.0}", v);
        // Thousands separators.
        let mut out = String::new();
        for (i, c) in s.chars().rev().enumerate() {
            if i > 0 && i % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out.chars().rev().collect()
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(fmt_n).unwrap_or_else(|| "–".into())
}

/// Passed steps of a fan-out result.
fn steps(r: &Value) -> Vec<&Value> {
    r["steps"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn best_step(r: &Value) -> Option<&Value> {
    steps(r)
        .into_iter()
        .filter(|s| s["pass"] == json!(true))
        .max_by(|a, b| {
            num(&a["achieved_per_sec"])
                .unwrap_or(0.0)
                .total_cmp(&num(&b["achieved_per_sec"]).unwrap_or(0.0))
        })
}

/// The highest target rate every listed server passed.
fn common_rate(results: &[Value], servers: &[&str]) -> Option<f64> {
    let mut common: Option<f64> = None;
    for s in servers {
        let r = res(results, "fanout", s)?;
        let best = steps(r)
            .into_iter()
            .filter(|s| s["pass"] == json!(true))
            .filter_map(|s| num(&s["target_per_sec"]))
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))?;
        common = Some(common.map_or(best, |c| c.min(best)));
    }
    common
}

fn efficiency_at(results: &[Value], server: &str, rate: f64) -> Option<f64> {
    let r = res(results, "fanout", server)?;
    steps(r)
        .into_iter()
        .find(|s| num(&s["target_per_sec"]) == Some(rate))
        .and_then(|s| num(&s["deliveries_per_server_cpu_sec"]))
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

/// Writes `summary.json`, `results.md` and the plots into `out`.
pub fn write(out: &Path, meta: &Value, results: &[Value]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&json!({"meta": meta, "results": results}))?,
    )?;
    let plots = match plot_all(out, results) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("plots skipped: {e:#}");
            Vec::new()
        }
    };
    std::fs::write(out.join("results.md"), markdown(meta, results, &plots))?;
    Ok(())
}

fn markdown(meta: &Value, results: &[Value], plots: &[String]) -> String {
    let mut md = String::new();
    let m = &meta["machine"];
    let _ = writeln!(md, "# feedhub benchmark results\n");
    let _ = writeln!(
        md,
        "Run {} UTC, {:.0} s. Machine: {} cores ({}), {} GiB RAM, Linux {}; server, peers, load generator, Redis and RabbitMQ all on this one machine. Load average (1 min) {} at start, {} at end. Descriptor limit {}. Scale {}.\n",
        meta["started_utc"].as_str().unwrap_or("?"),
        num(&meta["wall_secs"]).unwrap_or(0.0),
        m["cores"], m["cpu_model"].as_str().unwrap_or("?"), m["mem_gib"], m["kernel"].as_str().unwrap_or("?"),
        meta["loadavg_start"], meta["loadavg_end"], meta["nofile_limit"], meta["scale"],
    );
    if meta["feedhub_redis"] != json!(true) {
        let _ = writeln!(md, "> This feedhub build has no Redis backplane: feedhub ran as ONE instance with events via `POST /api/feed`; its fan-out numbers are not comparable with the two-instance peers.\n");
    }
    // Goals.
    let _ = writeln!(md, "## Goals\n");
    let _ = writeln!(md, "| goal | result | verdict |\n|---|---|---|");
    let idle = res(results, "idle", "feedhub-json");
    let rss = idle.and_then(|r| num(&r["server_rss_per_conn_kib"]));
    let cpu = idle.and_then(|r| num(&r["server_idle_cpu_pct"]));
    let idle_n = idle.and_then(|r| r["connected"].as_u64()).unwrap_or(0);
    let _ = writeln!(
        md,
        "| idle: ≤ 8 KiB RSS per connection (50,000 clients) | {} KiB at {} clients | {} |",
        opt(rss),
        idle_n,
        verdict(rss.map(|v| v <= 8.0))
    );
    let _ = writeln!(
        md,
        "| idle: < 5% of a core with keep-alive | {}% | {} |",
        opt(cpu),
        verdict(cpu.map(|v| v < 5.0))
    );
    let rate = common_rate(results, &["feedhub-json", "ws", "socketio"]);
    let fh = rate.and_then(|r| efficiency_at(results, "feedhub-json", r));
    let sio = rate.and_then(|r| efficiency_at(results, "socketio", r));
    let ws = rate.and_then(|r| efficiency_at(results, "ws", r));
    let vs_sio = fh.zip(sio).map(|(a, b)| a / b);
    let vs_ws = fh.zip(ws).map(|(a, b)| a / b);
    let _ = writeln!(
        md,
        "| fan-out: ≥ 5× Socket.IO's deliveries per CPU-second | {}× ({} vs {} at {}/s, the highest rate all passed) | {} |",
        opt(vs_sio), opt(fh), opt(sio), opt(rate), verdict(vs_sio.map(|v| v >= 5.0))
    );
    let _ = writeln!(
        md,
        "| fan-out: ≥ 70% of the bare tokio-tungstenite ceiling | {}% ({} vs {} deliveries per CPU-second) | {} |",
        opt(vs_ws.map(|v| v * 100.0)), opt(fh), opt(ws), verdict(vs_ws.map(|v| v >= 0.7))
    );
    let lat10k = res(results, "latency", "feedhub-json").and_then(|r| {
        steps(r)
            .into_iter()
            .find(|s| num(&s["target_per_sec"]) == Some(10_000.0))
            .and_then(|s| num(&s["p99_ms"]))
    });
    let _ = writeln!(
        md,
        "| latency: RabbitMQ → client p99 < 5 ms at 10,000 deliveries/s | {} ms | {} |",
        opt(lat10k),
        verdict(lat10k.map(|v| v < 5.0))
    );
    let churn = res(results, "churn", "feedhub-json");
    let growth = churn.and_then(|r| num(&r["rss_growth_pct"]));
    let leaked = churn.and_then(|r| r["redis_channels_left"].as_u64());
    let _ = writeln!(
        md,
        "| churn: RSS back within 10% | {}% growth | {} |",
        opt(growth),
        verdict(growth.map(|g| g <= 10.0))
    );
    let _ = writeln!(
        md,
        "| churn: no leaked Redis subscriptions | {} | {} |\n",
        leaked
            .map(|l| format!("{l} channels left"))
            .unwrap_or_else(|| "not measured (no Redis backplane)".into()),
        verdict(leaked.map(|l| l == 0))
    );

    // The comparison table.
    let _ = writeln!(md, "## All servers\n");
    let mut header = "| metric |".to_string();
    let mut sep = "|---|".to_string();
    for (_, name) in SERVERS {
        header.push_str(&format!(" {name} |"));
        sep.push_str("---|");
    }
    let _ = writeln!(md, "{header}\n{sep}");
    let row = |md: &mut String, label: &str, scenario: &str, f: &dyn Fn(&Value) -> String| {
        let mut line = format!("| {label} |");
        for (key, _) in SERVERS {
            line.push_str(&format!(" {} |", cell(results, scenario, key, f)));
        }
        let _ = writeln!(md, "{line}");
    };
    row(&mut md, "idle: connections held", "idle", &|r| {
        format!("{}", r["connected"])
    });
    row(
        &mut md,
        "idle: server RSS per connection (KiB)",
        "idle",
        &|r| opt(num(&r["server_rss_per_conn_kib"])),
    );
    row(&mut md, "idle: server CPU (% of a core)", "idle", &|r| {
        opt(num(&r["server_idle_cpu_pct"]))
    });
    row(
        &mut md,
        "idle: load generator CPU (% of a core)",
        "idle",
        &|r| opt(num(&r["client_idle_cpu_pct"])),
    );
    row(
        &mut md,
        "fan-out: max sustained deliveries/s (p99 < 50 ms)",
        "fanout",
        &|r| opt(num(&r["max_sustained_per_sec"])),
    );
    row(&mut md, "fan-out: p99 at that rate (ms)", "fanout", &|r| {
        opt(best_step(r).and_then(|s| num(&s["p99_ms"])))
    });
    row(
        &mut md,
        "fan-out: server CPU at that rate (% of a core, all instances)",
        "fanout",
        &|r| opt(best_step(r).and_then(|s| num(&s["server_cpu_pct"]))),
    );
    row(
        &mut md,
        "fan-out: deliveries per server CPU-second at that rate",
        "fanout",
        &|r| opt(best_step(r).and_then(|s| num(&s["deliveries_per_server_cpu_sec"]))),
    );
    if let Some(rate) = rate {
        let label = format!(
            "fan-out: deliveries per server CPU-second at {}/s",
            fmt_n(rate)
        );
        row(&mut md, &label, "fanout", &|r| {
            opt(steps(r)
                .into_iter()
                .find(|s| num(&s["target_per_sec"]) == Some(rate))
                .and_then(|s| num(&s["deliveries_per_server_cpu_sec"])))
        });
    }
    for lr in latency_rates(results) {
        let label = format!(
            "latency RabbitMQ → client at {}/s: p50 / p99 / p99.9 (ms)",
            fmt_n(lr)
        );
        row(&mut md, &label, "latency", &|r| {
            steps(r)
                .into_iter()
                .find(|s| num(&s["target_per_sec"]) == Some(lr))
                .map(|s| {
                    format!(
                        "{} / {} / {}",
                        opt(num(&s["p50_ms"])),
                        opt(num(&s["p99_ms"])),
                        opt(num(&s["p999_ms"]))
                    )
                })
                .unwrap_or_else(|| "–".into())
        });
    }
    row(
        &mut md,
        "broadcast to all: last receipt, median of 5 (ms)",
        "broadcast",
        &|r| opt(num(&r["last_receipt_ms_median"])),
    );
    row(
        &mut md,
        "connect storm: connections/s (negotiate + handshake)",
        "storm",
        &|r| opt(num(&r["connect"]["per_sec"])),
    );
    row(
        &mut md,
        "restart: seconds until every client is back",
        "storm",
        &|r| opt(num(&r["reconnect_secs"])),
    );
    row(&mut md, "churn: cycles/s", "churn", &|r| {
        opt(num(&r["cycles_per_sec"]))
    });
    row(
        &mut md,
        "churn: server RSS before → after (MiB)",
        "churn",
        &|r| {
            format!(
                "{} → {}",
                opt(num(&r["server_rss_before_kib"]).map(|v| v / 1024.0)),
                opt(num(&r["server_rss_after_kib"]).map(|v| v / 1024.0))
            )
        },
    );
    row(&mut md, "churn: RSS growth (%)", "churn", &|r| {
        opt(num(&r["rss_growth_pct"]))
    });
    row(&mut md, "churn: Redis channels left", "churn", &|r| {
        r["redis_channels_left"]
            .as_u64()
            .map(|v| v.to_string())
            .unwrap_or_else(|| "n/a".into())
    });
    let _ = writeln!(md);

    // Setups and unsupported cells.
    let _ = writeln!(md, "## Setups and notes\n");
    for r in results {
        let what = if let Some(u) = r["unsupported"].as_str() {
            format!("cannot run: {u}")
        } else if let Some(e) = r["error"].as_str() {
            format!("ERROR: {e}")
        } else {
            r["setup"].as_str().unwrap_or("").to_string()
        };
        let _ = writeln!(
            md,
            "- {} / {}: {}",
            r["scenario"].as_str().unwrap_or("?"),
            r["server"].as_str().unwrap_or("?"),
            what
        );
    }
    let _ = writeln!(md);

    // Fan-out steps.
    let _ = writeln!(md, "## Fan-out steps\n");
    let _ = writeln!(md, "| server | target/s | delivered/s | p50 ms | p99 ms | p99.9 ms | server CPU % | deliveries per CPU-s | load gen CPU s | pass |\n|---|---|---|---|---|---|---|---|---|---|");
    for (key, name) in SERVERS {
        if let Some(r) = res(results, "fanout", key) {
            for s in steps(r) {
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    opt(num(&s["target_per_sec"])),
                    opt(num(&s["achieved_per_sec"])),
                    opt(num(&s["p50_ms"])),
                    opt(num(&s["p99_ms"])),
                    opt(num(&s["p999_ms"])),
                    opt(num(&s["server_cpu_pct"])),
                    opt(num(&s["deliveries_per_server_cpu_sec"])),
                    opt(num(&s["client_cpu_secs"])),
                    if s["pass"] == json!(true) {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
        }
    }
    let _ = writeln!(md);
    if plots.is_empty() {
        let _ = writeln!(
            md,
            "(No plots: no TrueType font was found on this machine.)"
        );
    }
    for p in plots {
        let _ = writeln!(md, "![{p}]({p})\n");
    }
    md
}

fn latency_rates(results: &[Value]) -> Vec<f64> {
    res(results, "latency", "feedhub-json")
        .map(|r| {
            steps(r)
                .into_iter()
                .filter_map(|s| num(&s["target_per_sec"]))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Plots

const FONT_CANDIDATES: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

/// Registers a system TrueType font as `sans-serif` for `plotters` (once).
pub fn register_font() -> anyhow::Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONT_CANDIDATES
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| "no TrueType font found (install fonts-dejavu-core)".to_string())?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
            .map_err(|_| "font could not be loaded".to_string())
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

const COLORS: [plotters::style::RGBColor; 4] = [
    plotters::style::RGBColor(0x1f, 0x77, 0xb4),
    plotters::style::RGBColor(0x2c, 0xa0, 0x2c),
    plotters::style::RGBColor(0x7f, 0x7f, 0x7f),
    plotters::style::RGBColor(0xd6, 0x27, 0x28),
];

fn plot_all(out: &Path, results: &[Value]) -> anyhow::Result<Vec<String>> {
    register_font()?;
    let mut made = Vec::new();
    let series = |metric: &str| -> Vec<(usize, Vec<(f64, f64)>)> {
        SERVERS
            .iter()
            .enumerate()
            .filter_map(|(i, (key, _))| {
                let r = res(results, "fanout", key)?;
                let pts: Vec<(f64, f64)> = steps(r)
                    .into_iter()
                    .filter_map(|s| Some((num(&s["achieved_per_sec"])?, num(&s[metric])?)))
                    .collect();
                (!pts.is_empty()).then_some((i, pts))
            })
            .collect()
    };
    let lat = series("p99_ms");
    if !lat.is_empty() {
        line_plot(
            &out.join("fanout_p99.png"),
            "Fan-out: p99 latency vs delivered messages/s",
            "delivered messages per second",
            "p99 latency (ms, log scale)",
            &lat,
            true,
        )?;
        made.push("fanout_p99.png".to_string());
    }
    let eff = series("deliveries_per_server_cpu_sec");
    if !eff.is_empty() {
        line_plot(
            &out.join("fanout_efficiency.png"),
            "Fan-out: deliveries per server CPU-second",
            "delivered messages per second",
            "deliveries per CPU-second",
            &eff,
            false,
        )?;
        made.push("fanout_efficiency.png".to_string());
    }
    let bars: Vec<(usize, f64)> = SERVERS
        .iter()
        .enumerate()
        .filter_map(|(i, (key, _))| {
            Some((
                i,
                num(&res(results, "idle", key)?["server_rss_per_conn_kib"])?,
            ))
        })
        .collect();
    if !bars.is_empty() {
        bar_plot(
            &out.join("idle_rss.png"),
            "Idle: server RSS per connection (KiB)",
            &bars,
        )?;
        made.push("idle_rss.png".to_string());
    }
    Ok(made)
}

fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(usize, Vec<(f64, f64)>)],
    log_y: bool,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|v| v.0))
        .fold(1.0f64, f64::max)
        * 1.1;
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|v| v.1))
        .fold(1.0f64, f64::max)
        * 1.3;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80);
    if log_y {
        let y_min = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|v| v.1))
            .fold(f64::MAX, f64::min)
            .max(0.01)
            / 1.5;
        let mut chart = builder.build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, pts) in series {
            let c = COLORS[*i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
                .label(SERVERS[*i].1)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    } else {
        let mut chart = builder.build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, pts) in series {
            let c = COLORS[*i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
                .label(SERVERS[*i].1)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn bar_plot(path: &Path, title: &str, bars: &[(usize, f64)]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = BitMapBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let y_max = bars.iter().map(|b| b.1).fold(1.0f64, f64::max) * 1.25;
    let n = bars.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n as f64, 0.0..y_max)?;
    let names: Vec<&str> = bars.iter().map(|(i, _)| SERVERS[*i].1).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let k = (*x - 0.5).round();
            if (x - 0.5 - k).abs() < 0.01 && k >= 0.0 && (k as usize) < names.len() {
                names[k as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("KiB per connection")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (pos, (i, v)) in bars.iter().enumerate() {
        let c = COLORS[*i % COLORS.len()];
        let x0 = pos as f64 + 0.2;
        let x1 = pos as f64 + 0.8;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x0, 0.0), (x1, *v)],
            c.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{v:.1}"),
            (pos as f64 + 0.42, *v + y_max * 0.03),
            ("sans-serif", 16),
        )))?;
    }
    root.present()?;
    Ok(())
}
