//! The benchmark runner: one command that builds the tools, starts feedhub and its peers
//! (the bare tokio-tungstenite peer `examples/bench_peer_ws.rs` and the Socket.IO peer in
//! `bench/socketio/`) as child processes, drives each scenario with `examples/loadgen.rs`,
//! and writes `<out>/*.json`, `<out>/results.md` (the table) and `<out>/*.png` (the plots).
//!
//! ```sh
//! cargo run --release --example bench -- --out bench/results           # full sizes
//! cargo run --release --example bench -- --out /tmp/b --scale 0.1      # a quick run
//! ```
//!
//! Every scenario runs against every server that can do it; the ones a peer cannot do are
//! reported as such (Socket.IO and the bare peer have no RabbitMQ ingest; Socket.IO's
//! Redis adapter has no per-user subscriptions to leak). See `bench/README.md`.

#[path = "../bench/support/procstat.rs"]
mod procstat;
#[path = "../bench/support/report.rs"]
mod report;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use serde_json::{json, Value};

const SECRET: &str = "feedhub-bench-secret-of-at-least-32-bytes";
const API_KEY: &str = "feedhub-bench-key";

/// Runs every benchmark scenario against feedhub and its peers.
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// Output directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Multiplies every size (connections, cycles) by this factor (e.g. 0.1 for a quick run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Scenarios to run (idle, fanout, latency, broadcast, storm, churn).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,fanout,latency,broadcast,storm,churn"
    )]
    only: Vec<String>,
    /// Servers to run (feedhub, ws, socketio).
    #[arg(long, value_delimiter = ',', default_value = "feedhub,ws,socketio")]
    servers: Vec<String>,
    /// Redis URL shared by the servers and the load generator.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// RabbitMQ URL (latency scenario).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Idle density: connections (clamped to the descriptor limit).
    #[arg(long, default_value_t = 50_000)]
    idle_conns: usize,
    /// Idle density: seconds of idle CPU measurement.
    #[arg(long, default_value_t = 30.0)]
    idle_secs: f64,
    /// Fan-out, broadcast and storm: connections.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Fan-out, broadcast and storm: users (connections per user = conns / users).
    #[arg(long, default_value_t = 2_000)]
    users: usize,
    /// Fan-out delivery rates to step through (per second).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,20000,40000,60000,80000,120000,160000,200000"
    )]
    rates: Vec<f64>,
    /// Seconds per fan-out step.
    #[arg(long, default_value_t = 8.0)]
    step_secs: f64,
    /// End-to-end latency rates (deliveries per second).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    latency_rates: Vec<f64>,
    /// Seconds per latency rate.
    #[arg(long, default_value_t = 10.0)]
    latency_secs: f64,
    /// Churn: connect/disconnect cycles.
    #[arg(long, default_value_t = 100_000)]
    churn_cycles: usize,
    /// Only rebuild the report from the JSON files already in `--out` (e.g. after re-running
    /// one scenario into the same directory with `--only`).
    #[arg(long)]
    report_only: bool,
    /// Churn: cycles in flight.
    #[arg(long, default_value_t = 64)]
    churn_concurrency: usize,
}

/// The servers under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Feedhub,
    Ws,
    Socketio,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Feedhub => "feedhub",
            Kind::Ws => "ws",
            Kind::Socketio => "socketio",
        }
    }
}

/// Paths of the built tools.
struct Tools {
    feedhub: PathBuf,
    loadgen: PathBuf,
    peer: PathBuf,
    socketio_dir: PathBuf,
    /// feedhub accepts `--redis-url` (the Redis backplane is built in).
    feedhub_redis: bool,
    /// feedhub accepts `--amqp-url`.
    feedhub_amqp: bool,
}

/// A running server process.
struct Server {
    kind: Kind,
    child: Child,
    port: u16,
    extra: Vec<String>,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

fn stop_child(child: &mut Child) {
    // SIGTERM first (feedhub shuts down gracefully), then SIGKILL.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("server exited before listening: {status}");
        }
        if Instant::now() > deadline {
            bail!("server did not listen on {port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_on(tools: &Tools, kind: Kind, port: u16, extra: &[String]) -> anyhow::Result<Server> {
    let mut cmd = match kind {
        Kind::Feedhub => {
            let mut c = Command::new(&tools.feedhub);
            c.args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--jwt-secret", SECRET, "--api-key", API_KEY])
                // Every client comes from a few 127.0.0.x addresses, many per user: the
                // per-address and per-user limits would refuse most of them (issue 14).
                .args([
                    "--max-connections-per-address",
                    "0",
                    "--connect-rate-per-address",
                    "0",
                    "--max-connections-per-user",
                    "0",
                ])
                .env("RUST_LOG", "warn");
            c
        }
        Kind::Ws => {
            let mut c = Command::new(&tools.peer);
            c.args(["--listen", &format!("127.0.0.1:{port}")]);
            c
        }
        Kind::Socketio => {
            let mut c = Command::new("node");
            c.current_dir(&tools.socketio_dir)
                .args(["server.mjs", "--port", &port.to_string()]);
            c
        }
    };
    cmd.args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", kind.name()))?;
    wait_port(port, &mut child, Duration::from_secs(30))?;
    Ok(Server {
        kind,
        child,
        port,
        extra: extra.to_vec(),
    })
}

fn spawn(tools: &Tools, kind: Kind, extra: &[String]) -> anyhow::Result<Server> {
    spawn_on(tools, kind, free_port()?, extra)
}

fn redis_args(tools: &Tools, kind: Kind, redis: &str) -> Vec<String> {
    match kind {
        Kind::Feedhub if !tools.feedhub_redis => Vec::new(),
        _ => vec!["--redis-url".to_string(), redis.to_string()],
    }
}

/// Endpoint URL of a server for the load generator.
fn endpoint(s: &Server) -> String {
    match s.kind {
        Kind::Feedhub => format!("http://127.0.0.1:{}/hubs/feed", s.port),
        Kind::Ws => format!("http://127.0.0.1:{}/ws", s.port),
        Kind::Socketio => format!("http://127.0.0.1:{}/socket.io/", s.port),
    }
}

fn mode_args(kind: Kind, msgpack: bool) -> Vec<String> {
    let mode = match (kind, msgpack) {
        (Kind::Feedhub, false) => "signalr-json",
        (Kind::Feedhub, true) => "signalr-msgpack",
        (Kind::Ws, _) => "ws",
        (Kind::Socketio, _) => "socketio",
    };
    vec!["--mode".into(), mode.into()]
}

/// The publisher each server consumes.
fn publisher_args(tools: &Tools, kind: Kind) -> Vec<String> {
    let p = match kind {
        Kind::Feedhub if !tools.feedhub_redis => "http",
        Kind::Feedhub | Kind::Ws => "redis",
        Kind::Socketio => "socketio",
    };
    vec!["--publisher".into(), p.into()]
}

/// Runs the load generator to completion and returns its JSON summary.
fn loadgen(tools: &Tools, args: &[String], json_path: &Path) -> anyhow::Result<Value> {
    eprintln!("  loadgen {}", args.join(" "));
    let status = Command::new(&tools.loadgen)
        .args(args)
        .arg("--json")
        .arg(json_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()?;
    if !status.success() {
        bail!("loadgen failed: {status}");
    }
    Ok(serde_json::from_str(&std::fs::read_to_string(json_path)?)?)
}

fn scaled(n: usize, scale: f64) -> usize {
    ((n as f64 * scale).round() as usize).max(1)
}

struct Runner {
    args: Args,
    tools: Tools,
    results: Vec<Value>,
}

impl Runner {
    fn kinds(&self) -> Vec<Kind> {
        let mut v = Vec::new();
        for s in &self.args.servers {
            match s.as_str() {
                "feedhub" => v.push(Kind::Feedhub),
                "ws" => v.push(Kind::Ws),
                "socketio" => v.push(Kind::Socketio),
                other => eprintln!("unknown server {other}"),
            }
        }
        v
    }

    /// Server variants: feedhub runs JSON and MessagePack where the protocol matters.
    fn variants(&self, with_msgpack: bool) -> Vec<(Kind, bool)> {
        let mut v = Vec::new();
        for k in self.kinds() {
            v.push((k, false));
            if k == Kind::Feedhub && with_msgpack {
                v.push((k, true));
            }
        }
        v
    }

    fn label(kind: Kind, msgpack: bool) -> String {
        match (kind, msgpack) {
            (Kind::Feedhub, false) => "feedhub-json".into(),
            (Kind::Feedhub, true) => "feedhub-msgpack".into(),
            (k, _) => k.name().into(),
        }
    }

    fn record(&mut self, scenario: &str, label: &str, setup: &str, result: anyhow::Result<Value>) {
        let entry = match result {
            Ok(v) => json!({"scenario": scenario, "server": label, "setup": setup, "result": v}),
            Err(e) => {
                eprintln!("  {scenario}/{label} FAILED: {e:#}");
                json!({"scenario": scenario, "server": label, "setup": setup, "error": format!("{e:#}")})
            }
        };
        let path = self.args.out.join(format!("{scenario}-{label}.json"));
        if let Err(e) = std::fs::write(
            &path,
            serde_json::to_string_pretty(&entry).unwrap_or_default(),
        ) {
            eprintln!("cannot write {}: {e}", path.display());
        }
        self.results.push(entry);
    }

    fn unsupported(&mut self, scenario: &str, label: &str, why: &str) {
        self.results
            .push(json!({"scenario": scenario, "server": label, "unsupported": why}));
    }

    fn common(&self, conns: usize, users: usize) -> Vec<String> {
        vec![
            "--conns".into(),
            conns.to_string(),
            "--users".into(),
            users.to_string(),
            "--jwt-secret".into(),
            SECRET.into(),
            "--api-key".into(),
            API_KEY.into(),
            "--redis-url".into(),
            self.args.redis_url.clone(),
            "--amqp-url".into(),
            self.args.amqp_url.clone(),
        ]
    }

    fn tmp_json(&self, name: &str) -> PathBuf {
        self.args.out.join(format!(".loadgen-{name}.json"))
    }

    fn idle(&mut self) {
        let (soft, _) = procstat::raise_nofile();
        let wanted = scaled(self.args.idle_conns, self.args.scale);
        // One descriptor per connection on each side, plus headroom.
        let conns = wanted.min(soft.saturating_sub(1000) as usize).max(1);
        let setup = if conns < wanted {
            format!(
                "{conns} of {wanted} connections: RLIMIT_NOFILE hard limit is {soft} on this machine"
            )
        } else {
            format!("{conns} connections, one instance")
        };
        for (kind, msgpack) in self.variants(false) {
            let label = Self::label(kind, msgpack);
            eprintln!("idle: {label} ({setup})");
            let result = (|| {
                let extra = redis_args(&self.tools, kind, &self.args.redis_url);
                let server = spawn(&self.tools, kind, &extra)?;
                std::thread::sleep(Duration::from_secs(1));
                let mut a = self.common(conns, (conns / 5).max(1));
                a.extend(mode_args(kind, msgpack));
                a.extend([
                    "--url".into(),
                    endpoint(&server),
                    "--server-pid".into(),
                    server.pid().to_string(),
                    "--scenario".into(),
                    "idle".into(),
                    "--idle-secs".into(),
                    self.args.idle_secs.to_string(),
                    "--connect-rate".into(),
                    "5000".into(),
                ]);
                loadgen(&self.tools, &a, &self.tmp_json("idle"))
            })();
            self.record("idle", &label, &setup, result);
        }
    }

    /// Two instances of `kind` (with Redis where the server supports it).
    fn pair(&self, kind: Kind, extra: &[String]) -> anyhow::Result<Vec<Server>> {
        let mut e = redis_args(&self.tools, kind, &self.args.redis_url);
        e.extend_from_slice(extra);
        if kind == Kind::Feedhub && !self.tools.feedhub_redis {
            return Ok(vec![spawn(&self.tools, kind, &e)?]);
        }
        Ok(vec![
            spawn(&self.tools, kind, &e)?,
            spawn(&self.tools, kind, &e)?,
        ])
    }

    fn pair_setup(&self, kind: Kind) -> String {
        if kind == Kind::Feedhub && !self.tools.feedhub_redis {
            "ONE instance, in-memory backplane, events via POST /api/feed (this build has no Redis backplane)".into()
        } else {
            "two instances over Redis, events via one Redis PUBLISH each".into()
        }
    }

    fn fanout(&mut self) {
        let conns = scaled(self.args.conns, self.args.scale);
        let users = scaled(self.args.users, self.args.scale);
        for (kind, msgpack) in self.variants(true) {
            let label = Self::label(kind, msgpack);
            let setup = format!(
                "{conns} connections over {users} users; {}",
                self.pair_setup(kind)
            );
            eprintln!("fanout: {label} ({setup})");
            let result = (|| {
                let servers = self.pair(kind, &[])?;
                std::thread::sleep(Duration::from_secs(1));
                let mut a = self.common(conns, users);
                a.extend(mode_args(kind, msgpack));
                a.extend(publisher_args(&self.tools, kind));
                let urls: Vec<String> = servers.iter().map(endpoint).collect();
                let pids: Vec<String> = servers.iter().map(|s| s.pid().to_string()).collect();
                let rates: Vec<String> = self.args.rates.iter().map(|r| r.to_string()).collect();
                a.extend([
                    "--url".into(),
                    urls.join(","),
                    "--server-pid".into(),
                    pids.join(","),
                    "--scenario".into(),
                    "publish".into(),
                    "--rates".into(),
                    rates.join(","),
                    "--step-secs".into(),
                    self.args.step_secs.to_string(),
                    "--connect-rate".into(),
                    "4000".into(),
                ]);
                loadgen(&self.tools, &a, &self.tmp_json("fanout"))
            })();
            self.record("fanout", &label, &setup, result);
        }
    }

    fn latency(&mut self) {
        let conns = scaled(self.args.conns, self.args.scale);
        let users = scaled(self.args.users, self.args.scale);
        for (kind, msgpack) in self.variants(false) {
            let label = Self::label(kind, msgpack);
            if kind != Kind::Feedhub {
                self.unsupported(
                    "latency",
                    &label,
                    "no RabbitMQ ingest (a separate bridge process would be needed)",
                );
                continue;
            }
            if !self.tools.feedhub_amqp {
                self.unsupported(
                    "latency",
                    &label,
                    "this feedhub build has no --amqp-url (RabbitMQ ingest not merged)",
                );
                continue;
            }
            let setup = format!(
                "{conns} connections over {users} users, one instance with RabbitMQ ingest{}",
                if self.tools.feedhub_redis {
                    " and the Redis backplane"
                } else {
                    ""
                }
            );
            eprintln!("latency: {label} ({setup})");
            let result = (|| {
                let mut extra = redis_args(&self.tools, kind, &self.args.redis_url);
                // A private exchange and queue: the broker is shared with other users.
                let tag = format!("bench{:08x}", rand::random::<u32>());
                let exchange = format!("{tag}.FeedUpdate");
                extra.extend([
                    "--amqp-url".to_string(),
                    self.args.amqp_url.clone(),
                    "--amqp-exchange".to_string(),
                    exchange.clone(),
                    "--amqp-queue".to_string(),
                    format!("{tag}.feed-updates"),
                ]);
                let server = spawn(&self.tools, kind, &extra)?;
                std::thread::sleep(Duration::from_secs(2));
                let mut a = self.common(conns, users);
                a.extend(mode_args(kind, msgpack));
                let rates: Vec<String> = self
                    .args
                    .latency_rates
                    .iter()
                    .map(|r| r.to_string())
                    .collect();
                a.extend([
                    "--amqp-exchange".into(),
                    exchange.clone(),
                    "--publisher".into(),
                    "amqp".into(),
                    "--url".into(),
                    endpoint(&server),
                    "--server-pid".into(),
                    server.pid().to_string(),
                    "--scenario".into(),
                    "publish".into(),
                    "--rates".into(),
                    rates.join(","),
                    "--step-secs".into(),
                    self.args.latency_secs.to_string(),
                    "--no-stop".into(),
                    "--p99-limit-ms".into(),
                    "5".into(),
                    "--connect-rate".into(),
                    "4000".into(),
                ]);
                loadgen(&self.tools, &a, &self.tmp_json("latency"))
            })();
            self.record("latency", &label, &setup, result);
        }
    }

    fn broadcast(&mut self) {
        let conns = scaled(self.args.conns, self.args.scale);
        let users = scaled(self.args.users, self.args.scale);
        for (kind, msgpack) in self.variants(false) {
            let label = Self::label(kind, msgpack);
            let how = match kind {
                Kind::Feedhub if !self.tools.feedhub_redis => {
                    "one POST /api/feed naming every user, one instance"
                }
                Kind::Feedhub => "one PUBLISH per user channel, two instances",
                Kind::Ws => "one PUBLISH per user channel, two instances",
                Kind::Socketio => "one emitter broadcast (io.emit), two instances",
            };
            let setup = format!("{conns} connections over {users} users; {how}");
            eprintln!("broadcast: {label} ({setup})");
            let result = (|| {
                let servers = self.pair(kind, &[])?;
                std::thread::sleep(Duration::from_secs(1));
                let mut a = self.common(conns, users);
                a.extend(mode_args(kind, msgpack));
                a.extend(publisher_args(&self.tools, kind));
                let urls: Vec<String> = servers.iter().map(endpoint).collect();
                let pids: Vec<String> = servers.iter().map(|s| s.pid().to_string()).collect();
                a.extend([
                    "--url".into(),
                    urls.join(","),
                    "--server-pid".into(),
                    pids.join(","),
                    "--scenario".into(),
                    "broadcast".into(),
                    "--repeat".into(),
                    "5".into(),
                    "--connect-rate".into(),
                    "4000".into(),
                ]);
                loadgen(&self.tools, &a, &self.tmp_json("broadcast"))
            })();
            self.record("broadcast", &label, &setup, result);
        }
    }

    fn storm(&mut self) {
        let conns = scaled(self.args.conns, self.args.scale);
        let users = scaled(self.args.users, self.args.scale);
        for (kind, msgpack) in self.variants(false) {
            let label = Self::label(kind, msgpack);
            let setup = format!(
                "{conns} connections as fast as 128 in flight allow, one instance; then the instance restarts on the same port"
            );
            eprintln!("storm: {label} ({setup})");
            let result = self.storm_one(kind, msgpack, conns, users);
            self.record("storm", &label, &setup, result);
        }
    }

    fn storm_one(
        &self,
        kind: Kind,
        msgpack: bool,
        conns: usize,
        users: usize,
    ) -> anyhow::Result<Value> {
        let extra = redis_args(&self.tools, kind, &self.args.redis_url);
        let mut server = spawn(&self.tools, kind, &extra)?;
        std::thread::sleep(Duration::from_secs(1));
        let json_path = self.tmp_json("storm");
        let mut a = self.common(conns, users);
        a.extend(mode_args(kind, msgpack));
        a.extend([
            "--url".into(),
            endpoint(&server),
            "--server-pid".into(),
            server.pid().to_string(),
            "--scenario".into(),
            "storm".into(),
            "--wait-restart".into(),
            "--timeout-secs".into(),
            "120".into(),
        ]);
        eprintln!("  loadgen {}", a.join(" "));
        let mut child = Command::new(&self.tools.loadgen)
            .args(&a)
            .arg("--json")
            .arg(&json_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut ready = false;
        for line in lines.by_ref() {
            if line?.trim() == "READY" {
                ready = true;
                break;
            }
        }
        let restart_ms;
        if ready {
            // Restart: SIGTERM (feedhub: graceful Close with allowReconnect), wait for the
            // exit, start again on the same port.
            let t0 = Instant::now();
            let port = server.port;
            let extra = server.extra.clone();
            stop_child(&mut server.child);
            let stopped = t0.elapsed();
            drop(server);
            let new_server = spawn_on(&self.tools, kind, port, &extra)?;
            restart_ms = Some(json!({
                "stop_ms": stopped.as_secs_f64() * 1000.0,
                "down_ms": t0.elapsed().as_secs_f64() * 1000.0,
            }));
            // Drain the rest of stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            let status = child.wait()?;
            drop(new_server);
            if !status.success() {
                bail!("loadgen failed: {status}");
            }
        } else {
            let status = child.wait()?;
            bail!("loadgen ended before READY: {status}");
        }
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("restart".into(), json!(restart_ms));
        }
        Ok(v)
    }

    fn churn(&mut self) {
        let cycles = scaled(self.args.churn_cycles, self.args.scale);
        for (kind, msgpack) in self.variants(false) {
            let label = Self::label(kind, msgpack);
            let setup = format!(
                "{cycles} connect+handshake+close cycles, {} in flight, 5,000 users, one instance",
                self.args.churn_concurrency
            );
            eprintln!("churn: {label} ({setup})");
            let result = (|| {
                let extra = redis_args(&self.tools, kind, &self.args.redis_url);
                let server = spawn(&self.tools, kind, &extra)?;
                std::thread::sleep(Duration::from_secs(1));
                let mut a = self.common(cycles, 5000);
                a.extend(mode_args(kind, msgpack));
                // `redis` makes the load generator count leftover `feed-<prefix>*` channels.
                let publisher = match kind {
                    Kind::Feedhub if self.tools.feedhub_redis => "redis",
                    Kind::Ws => "redis",
                    _ => "http",
                };
                a.extend([
                    "--publisher".into(),
                    publisher.into(),
                    "--url".into(),
                    endpoint(&server),
                    "--server-pid".into(),
                    server.pid().to_string(),
                    "--scenario".into(),
                    "churn".into(),
                    "--cycles".into(),
                    cycles.to_string(),
                    "--connect-concurrency".into(),
                    self.args.churn_concurrency.to_string(),
                ]);
                loadgen(&self.tools, &a, &self.tmp_json("churn"))
            })();
            self.record("churn", &label, &setup, result);
        }
    }
}

/// Whether feedhub starts with `flags` (listens within a few seconds).
fn feedhub_accepts(feedhub: &Path, flags: &[String]) -> bool {
    let Ok(port) = free_port() else { return false };
    let Ok(mut child) = Command::new(feedhub)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(flags)
        .args(["--jwt-secret", SECRET])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let ok = wait_port(port, &mut child, Duration::from_secs(10)).is_ok();
    stop_child(&mut child);
    ok
}

fn build_tools(redis_url: &str, amqp_url: &str) -> anyhow::Result<Tools> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building feedhub, loadgen and bench_peer_ws (release)");
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--bin",
            "feedhub",
            "--example",
            "loadgen",
            "--example",
            "bench_peer_ws",
        ])
        .status()?;
    if !status.success() {
        bail!("cargo build failed");
    }
    let exe = std::env::current_exe()?;
    let examples = exe.parent().context("exe dir")?.to_path_buf();
    let release = examples.parent().context("target dir")?.to_path_buf();
    let socketio_dir = root.join("bench").join("socketio");
    if !socketio_dir.join("node_modules").exists() {
        eprintln!("npm ci in bench/socketio");
        let status = Command::new("npm")
            .current_dir(&socketio_dir)
            .args(["ci", "--no-audit", "--no-fund"])
            .status()?;
        if !status.success() {
            bail!("npm ci in bench/socketio failed");
        }
    }
    let feedhub = release.join("feedhub");
    // Starting with a RabbitMQ URL would declare durable queues in the shared broker, so
    // the ingest is detected from the flags it documents.
    let help = Command::new(&feedhub)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let _ = amqp_url;
    Ok(Tools {
        feedhub_redis: feedhub_accepts(&feedhub, &["--redis-url".into(), redis_url.into()]),
        feedhub_amqp: help.contains("--amqp-queue") && help.contains("--amqp-exchange"),
        feedhub,
        loadgen: examples.join("loadgen"),
        peer: examples.join("bench_peer_ws"),
        socketio_dir,
    })
}

/// Rebuilds the report from `out/summary.json` and the per-scenario files next to it (a
/// file replaces the summary's entry for the same scenario and server).
fn report_only(out: &Path) -> anyhow::Result<()> {
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("summary.json")).context("reading summary.json")?,
    )?;
    let meta = summary["meta"].clone();
    let mut results: Vec<Value> = summary["results"].as_array().cloned().unwrap_or_default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.ends_with(".json") && name != "summary.json" && !name.starts_with('.')
        })
        .collect();
    files.sort();
    for f in files {
        let entry: Value = serde_json::from_str(&std::fs::read_to_string(&f)?)?;
        let key = (entry["scenario"].clone(), entry["server"].clone());
        match results
            .iter_mut()
            .find(|r| (r["scenario"].clone(), r["server"].clone()) == key)
        {
            Some(slot) => *slot = entry,
            None => results.push(entry),
        }
    }
    report::write(out, &meta, &results)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.report_only {
        report_only(&args.out)?;
        eprintln!("rewrote {}/results.md and summary.json", args.out.display());
        return Ok(());
    }
    if args.out.join("summary.json").exists() && args.only.len() < 6 {
        eprintln!(
            "note: {} already has results; run with --report-only afterwards to merge them",
            args.out.display()
        );
    }
    let (soft, hard) = procstat::raise_nofile();
    eprintln!("descriptor limit {soft} (hard {hard}); children inherit it");
    std::fs::create_dir_all(&args.out)?;
    let tools = build_tools(&args.redis_url, &args.amqp_url)?;
    eprintln!(
        "feedhub Redis backplane: {}; RabbitMQ ingest: {}",
        tools.feedhub_redis, tools.feedhub_amqp
    );
    let started = chrono_now();
    let load_start = procstat::loadavg();
    let mut runner = Runner {
        args,
        tools,
        results: Vec::new(),
    };
    let only = runner.args.only.clone();
    let t0 = Instant::now();
    for scenario in &only {
        match scenario.as_str() {
            "idle" => runner.idle(),
            "fanout" => runner.fanout(),
            "latency" => runner.latency(),
            "broadcast" => runner.broadcast(),
            "storm" => runner.storm(),
            "churn" => runner.churn(),
            other => eprintln!("unknown scenario {other}"),
        }
    }
    let meta = json!({
        "started_utc": started,
        "wall_secs": t0.elapsed().as_secs_f64(),
        "machine": procstat::machine(),
        "loadavg_start": load_start,
        "loadavg_end": procstat::loadavg(),
        "scale": runner.args.scale,
        "feedhub_redis": runner.tools.feedhub_redis,
        "feedhub_amqp": runner.tools.feedhub_amqp,
        "nofile_limit": soft,
    });
    for f in std::fs::read_dir(&runner.args.out)?.flatten() {
        if f.file_name().to_string_lossy().starts_with(".loadgen-") {
            let _ = std::fs::remove_file(f.path());
        }
    }
    report::write(&runner.args.out, &meta, &runner.results)?;
    eprintln!(
        "wrote {}/results.md, summary.json and plots",
        runner.args.out.display()
    );
    Ok(())
}

/// Current UTC time as `YYYY-MM-DD HH:MM:SS` (no date crate needed).
fn chrono_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}")
}
