//! The chaos soak (issue 12, README "Delivery guarantees"): three feedhub instances behind
//! `rr_proxy`, a private Redis and RabbitMQ, thousands of SignalR clients and a fault
//! schedule; checks that every event reaches every client once (after deduplication by id)
//! and in order, and writes `soak.md`, `soak.json` and `soak_latency.png` to `--out`.
//!
//! ```sh
//! cargo build --release && cargo run --release --example soak -- --out soak-results
//! # the stalled client's control run:
//! cargo run --release --example soak -- --out soak-results/control --no-stall
//! # the one-minute smoke version (what protocol-tests/soak_smoke.rs runs):
//! cargo run --release --example soak -- --smoke --out /tmp/soak-smoke
//! ```
//!
//! Needs `redis-server` and `/usr/lib/rabbitmq/bin/rabbitmq-server` (started privately on
//! free ports below 32768; the shared 6379/5672 are never touched) and the release feedhub
//! binary (`cargo build --release`). Exits non-zero when anything was lost or reordered.

#[path = "../bench/support/soak/mod.rs"]
mod soak;

use std::path::PathBuf;

use clap::Parser;

/// Chaos soak for feedhub.
#[derive(Debug, Parser)]
#[command(name = "soak")]
struct Args {
    /// Where the report (soak.md, soak.json, soak_latency.png) and the processes' files go.
    #[arg(long, default_value = "soak-results")]
    out: PathBuf,
    /// The smoke version: about a minute, 200 clients, one fault of each kind.
    #[arg(long)]
    smoke: bool,
    /// Seconds of traffic (faults spread over it).
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Checked clients.
    #[arg(long)]
    clients: Option<usize>,
    /// Users.
    #[arg(long)]
    users: Option<usize>,
    /// Events per second.
    #[arg(long)]
    rate: Option<f64>,
    /// The control run: the stall user's client keeps reading.
    #[arg(long)]
    no_stall: bool,
    /// Fault kinds to run, comma-separated: kill, redis, rabbit, cut, stall (`none`: no
    /// faults; default: all).
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<String>>,
    /// The feedhub binary (default: `feedhub` next to this example's directory).
    #[arg(long)]
    binary: Option<PathBuf>,
}

fn default_binary() -> PathBuf {
    // target/release/examples/soak -> target/release/feedhub
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(|d| d.join("feedhub")))
        .unwrap_or_else(|| PathBuf::from("target/release/feedhub"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = args.binary.unwrap_or_else(default_binary);
    let dir = args.out.join("work");
    let mut cfg = if args.smoke {
        soak::Config::smoke(binary, dir)
    } else {
        soak::Config::full(binary, dir)
    };
    if let Some(d) = args.duration_secs {
        cfg.duration_secs = d;
        cfg.warmup_secs = cfg.warmup_secs.min(d / 10.0);
        cfg.cooldown_secs = cfg.cooldown_secs.min(d / 8.0);
    }
    if let Some(c) = args.clients {
        cfg.clients = c;
    }
    if let Some(u) = args.users {
        cfg.users = u;
    }
    if let Some(r) = args.rate {
        cfg.rate = r;
    }
    cfg.no_stall = args.no_stall;
    if let Some(f) = args.faults {
        cfg.faults = f;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let v = rt.block_on(soak::run(cfg))?;
    // The report next to `work/`.
    for f in ["soak.md", "soak.json", "soak_latency.png"] {
        let from = args.out.join("work").join(f);
        if from.exists() {
            std::fs::copy(&from, args.out.join(f))?;
        }
    }
    println!(
        "{}",
        std::fs::read_to_string(args.out.join("soak.md")).unwrap_or_default()
    );
    soak::verdict(&v)
}
