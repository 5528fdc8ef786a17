//! The chaos soak (issue 12): three feedhub instances behind the round-robin proxy, a private
//! Redis (AOF, `appendfsync always`) reached by each instance through its own cut proxy, a
//! private RabbitMQ node, a publisher with confirms and per-user sequence numbers, and
//! thousands of SignalR clients (WebSockets with stateful reconnect, Long Polling, SSE) that
//! follow the documented recipe while faults run on a schedule: `kill -9` and restart of each
//! instance in turn, a Redis restart, a RabbitMQ restart (`stop_app`/`start_app`), a cut
//! between one instance and Redis, and a client that stops reading.
//!
//! Faults run in parallel with the traffic; a watcher measures each fault's time to recover
//! (every client connected and no client more than [`RECOVERED_LAG`] behind the publisher),
//! and samples RSS and open descriptors of every instance each second. At the end every
//! client is checked against the publisher's ground truth (lost, out of order, duplicates)
//! and a report is written: `soak.json`, `soak.md` and `soak_latency.png`.
//!
//! Used by `examples/soak.rs` (the full run) and `protocol-tests/soak_smoke.rs` (a minute).

#![allow(dead_code)]

#[path = "../report.rs"]
pub mod bench_report;
#[path = "../procstat.rs"]
pub mod procstat;
#[path = "../../../examples/rr_proxy.rs"]
pub mod rr_proxy;
#[path = "../signalr.rs"]
pub mod signalr;

pub mod checker;
pub mod client;
pub mod cutproxy;
pub mod procs;
pub mod publisher;
pub mod report;
pub mod stats;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use serde::Serialize;

use client::{Slot, Transport};
use procs::{Instance, Rabbit, Redis};
use publisher::{Oracle, PublishPlan};
use stats::Stats;

/// A client at most this far behind the publisher counts as caught up.
pub const RECOVERED_LAG: Duration = Duration::from_secs(1);

/// µs since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The soak's settings.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The feedhub binary.
    pub binary: PathBuf,
    /// Where Redis, RabbitMQ and the instances keep their files and logs, and the report goes.
    pub dir: PathBuf,
    /// Run length, seconds (faults spread over it after the warm-up).
    pub duration_secs: f64,
    /// Seconds before the first fault.
    pub warmup_secs: f64,
    /// Seconds after the last fault before publishing stops.
    pub cooldown_secs: f64,
    /// Checked clients.
    pub clients: usize,
    /// Users they are spread over.
    pub users: usize,
    /// Share of clients on Long Polling and on SSE (each).
    pub lp_share: f64,
    /// Share of clients on SSE.
    pub sse_share: f64,
    /// Events per second.
    pub rate: f64,
    /// Share of recipients-list events.
    pub multi_share: f64,
    /// Payload bytes.
    pub payload_bytes: usize,
    /// Instances.
    pub instances: usize,
    /// Kill every instance in turn (else only the first).
    pub kill_all: bool,
    /// The cut between one instance and Redis, seconds.
    pub cut_secs: f64,
    /// How long the stalled client stops reading, seconds.
    pub stall_secs: f64,
    /// No stalled client (the control run): the stall user's client reads normally.
    pub no_stall: bool,
    /// Stall user's traffic: events per second and their size.
    pub stall_rate: f64,
    /// Stall user's payload size.
    pub stall_bytes: usize,
    /// Source addresses 127.0.0.2 … for the clients (0: the default).
    pub source_ips: u8,
    /// Connections opened per second.
    pub connect_rate: f64,
    /// Seconds to wait for every client to catch up after publishing stops.
    pub drain_secs: f64,
    /// Which kinds of fault to run (`kill`, `redis`, `rabbit`, `cut`, `stall`); all by default.
    pub faults: Vec<String>,
}

impl Config {
    /// The full run: 10 minutes, 2,000 clients over 500 users, 2,000 events/s.
    pub fn full(binary: PathBuf, dir: PathBuf) -> Config {
        Config {
            binary,
            dir,
            duration_secs: 600.0,
            warmup_secs: 30.0,
            cooldown_secs: 40.0,
            clients: 2_000,
            users: 500,
            lp_share: 0.05,
            sse_share: 0.05,
            rate: 2_000.0,
            multi_share: 0.1,
            payload_bytes: 200,
            instances: 3,
            kill_all: true,
            cut_secs: 2.0,
            stall_secs: 30.0,
            no_stall: false,
            stall_rate: 200.0,
            stall_bytes: 8 * 1024,
            source_ips: 16,
            connect_rate: 500.0,
            drain_secs: 60.0,
            faults: ["kill", "redis", "rabbit", "cut", "stall"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }

    /// The smoke version: about a minute, one fault of each kind.
    pub fn smoke(binary: PathBuf, dir: PathBuf) -> Config {
        Config {
            duration_secs: 60.0,
            warmup_secs: 6.0,
            cooldown_secs: 8.0,
            clients: 200,
            users: 50,
            rate: 300.0,
            kill_all: false,
            stall_secs: 6.0,
            stall_rate: 100.0,
            connect_rate: 400.0,
            drain_secs: 40.0,
            ..Config::full(binary, dir)
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Fault {
    /// `kill -9` instance i, restart it a second later.
    Kill(usize),
    /// Stop and start Redis (AOF).
    RedisRestart,
    /// `rabbitmqctl stop_app` / `start_app`.
    RabbitRestart,
    /// Cut instance i from Redis for `cut_secs`.
    Cut(usize),
    /// The stalled client stops reading for `stall_secs`.
    Stall,
}

impl Fault {
    fn name(&self) -> String {
        match self {
            Fault::Kill(i) => format!("kill -9 instance {}", i + 1),
            Fault::RedisRestart => "Redis restart".into(),
            Fault::RabbitRestart => "RabbitMQ restart".into(),
            Fault::Cut(i) => format!("cut instance {} from Redis", i + 1),
            Fault::Stall => "stalled client".into(),
        }
    }
}

/// What one fault did.
#[derive(Debug, Clone, Serialize)]
pub struct FaultResult {
    /// Its name.
    pub name: String,
    /// Start, seconds into the run.
    pub at: f64,
    /// How long the action took (kill + restart, restart, cut, stall).
    pub action_secs: f64,
    /// From the start until recovered (see [`RECOVERED_LAG`]); `None` if it never did
    /// before the next fault.
    pub recover_secs: Option<f64>,
    /// The state when the watcher gave up, if it never recovered.
    pub not_recovered: Option<String>,
    /// Error of the action, if it failed.
    pub error: Option<String>,
}

/// A sample of one instance.
#[derive(Debug, Clone, Serialize)]
pub struct ProcSample {
    /// Seconds into the run.
    pub t: f64,
    /// Instance index.
    pub instance: usize,
    /// RSS, KiB (0 while down).
    pub rss_kib: u64,
    /// Open descriptors (0 while down).
    pub fds: u64,
    /// CPU seconds so far of the current process.
    pub cpu_secs: f64,
}

struct Env {
    redis: Redis,
    rabbit: Rabbit,
    cuts: Vec<cutproxy::CutProxy>,
    instances: Vec<Arc<tokio::sync::Mutex<Instance>>>,
    pids: Vec<Arc<Mutex<Option<u32>>>>,
    proxy: rr_proxy::RrProxy,
}

/// The schedule of a run.
pub fn schedule(cfg: &Config) -> Vec<(f64, Fault)> {
    let on = |k: &str| cfg.faults.iter().any(|f| f == k);
    let mut faults = Vec::new();
    if on("kill") {
        if cfg.kill_all {
            for i in 0..cfg.instances {
                faults.push(Fault::Kill(i));
            }
        } else {
            faults.push(Fault::Kill(0));
        }
    }
    if on("redis") {
        faults.push(Fault::RedisRestart);
    }
    if on("rabbit") {
        faults.push(Fault::RabbitRestart);
    }
    if on("cut") {
        faults.push(Fault::Cut(cfg.instances.saturating_sub(1).min(1)));
    }
    if on("stall") {
        faults.push(Fault::Stall);
    }
    if faults.is_empty() {
        return Vec::new();
    }
    let span = (cfg.duration_secs - cfg.warmup_secs - cfg.cooldown_secs).max(1.0);
    let step = span / faults.len() as f64;
    faults
        .into_iter()
        .enumerate()
        .map(|(i, f)| (cfg.warmup_secs + step * i as f64, f))
        .collect()
}

async fn ready(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let req =
        format!("GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    matches!(
        tokio::time::timeout(
            Duration::from_secs(3),
            signalr::http_once(&mut s, req.as_bytes())
        )
        .await,
        Ok(Ok((200, _)))
    )
}

async fn start_env(cfg: &Config, run: &str) -> anyhow::Result<Env> {
    if !procs::have("redis-server") {
        bail!("redis-server is not installed");
    }
    if !std::path::Path::new(procs::RABBITMQ_SERVER).is_file() {
        bail!("{} is not installed", procs::RABBITMQ_SERVER);
    }
    if !cfg.binary.is_file() {
        bail!(
            "feedhub binary {} is missing (cargo build --release)",
            cfg.binary.display()
        );
    }
    std::fs::create_dir_all(&cfg.dir)?;
    let redis = Redis::start(&cfg.dir.join("redis")).await?;
    eprintln!("soak: redis-server on port {} (AOF always)", redis.port);
    let rabbit = Rabbit::start(&cfg.dir.join("rabbitmq")).await?;
    eprintln!(
        "soak: RabbitMQ node {} on port {}",
        rabbit.node, rabbit.port
    );
    let mut cuts = Vec::new();
    let mut instances = Vec::new();
    let mut pids = Vec::new();
    for i in 0..cfg.instances {
        let cut = cutproxy::CutProxy::start(
            "127.0.0.1:0".parse()?,
            format!("127.0.0.1:{}", redis.port).parse()?,
        )
        .await?;
        let env = vec![
            (
                "FEEDHUB_REDIS_URL".to_string(),
                format!("redis://{}", cut.local_addr()),
            ),
            ("FEEDHUB_AMQP_URL".to_string(), rabbit.url()),
            ("FEEDHUB_JWT_SECRET".to_string(), jwt_secret(run)),
            ("FEEDHUB_API_KEY".to_string(), format!("soak-key-{run}")),
            ("FEEDHUB_CHANNEL_PREFIX".to_string(), format!("soak-{run}")),
            // Behind rr_proxy every client comes from the proxy's address: the per-address
            // limits belong to the proxy (README, Limits and timeouts).
            (
                "FEEDHUB_MAX_CONNECTIONS_PER_ADDRESS".to_string(),
                "0".to_string(),
            ),
            (
                "FEEDHUB_CONNECT_RATE_PER_ADDRESS".to_string(),
                "0".to_string(),
            ),
        ];
        let mut inst = Instance::new(
            i,
            &cfg.binary,
            env,
            cfg.dir.join(format!("instance-{}.log", i + 1)),
        )?;
        inst.start().await?;
        pids.push(Arc::new(Mutex::new(inst.pid())));
        instances.push(Arc::new(tokio::sync::Mutex::new(inst)));
        cuts.push(cut);
    }
    let mut backends = Vec::new();
    for inst in &instances {
        backends.push(format!("127.0.0.1:{}", inst.lock().await.port).parse()?);
    }
    let proxy = rr_proxy::RrProxy::start("127.0.0.1:0".parse()?, backends).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for inst in &instances {
        let port = inst.lock().await.port;
        while !ready(port).await {
            if Instant::now() > deadline {
                bail!(
                    "instance on port {port} not ready after 60 s (see its log in {})",
                    cfg.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "soak: {} instances ready behind rr_proxy {}",
        cfg.instances,
        proxy.local_addr()
    );
    Ok(Env {
        redis,
        rabbit,
        cuts,
        instances,
        pids,
        proxy,
    })
}

async fn do_fault(
    cfg: &Config,
    env: &mut Env,
    ctx: &client::Ctx,
    fault: &Fault,
) -> anyhow::Result<()> {
    match fault {
        Fault::Kill(i) => {
            {
                let mut inst = env.instances[*i].lock().await;
                inst.kill9();
                *env.pids[*i].lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut inst = env.instances[*i].lock().await;
            inst.start().await?;
            *env.pids[*i].lock().unwrap_or_else(|p| p.into_inner()) = inst.pid();
            Ok(())
        }
        Fault::RedisRestart => env.redis.restart().await,
        Fault::RabbitRestart => env.rabbit.restart_app().await,
        Fault::Cut(i) => {
            env.cuts[*i]
                .cut(Duration::from_secs_f64(cfg.cut_secs))
                .await;
            Ok(())
        }
        Fault::Stall => {
            if !cfg.no_stall {
                ctx.stalled.store(true, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_secs_f64(cfg.stall_secs)).await;
            ctx.stalled.store(false, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// Max lag (µs) over the checked clients, how many are connected, and the furthest one.
fn lag(ctx: &client::Ctx, now: u64) -> (u64, usize, usize) {
    let mut worst = 0u64;
    let mut worst_index = 0usize;
    let mut connected = 0usize;
    for (i, s) in ctx.slots.iter().enumerate() {
        if s.connected.load(Ordering::Relaxed) {
            connected += 1;
        }
        let k = s.last_k.load(Ordering::Relaxed);
        if ctx.oracle.confirmed(s.user) > k {
            if let Some(t) = ctx.oracle.time_of(s.user, k + 1) {
                if now.saturating_sub(t) > worst {
                    worst = now.saturating_sub(t);
                    worst_index = i;
                }
            }
        }
    }
    (worst, connected, worst_index)
}

/// Runs the soak and writes the report into `cfg.dir`; returns the summary (JSON).
pub async fn run(cfg: Config) -> anyhow::Result<serde_json::Value> {
    let run = feedhub::ids::random_token()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect::<String>();
    let (nofile, _) = procstat::raise_nofile();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut env = start_env(&cfg, &run).await?;

    // Users: u0..u(N-1), plus the stall user.
    let mut users: Vec<String> = (0..cfg.users).map(|i| format!("s{run}u{i}")).collect();
    let stall_user = format!("s{run}stall");
    users.push(stall_user.clone());
    let stall_index = users.len() - 1;
    let oracle = Arc::new(Oracle::new(users));
    let total_secs = (cfg.duration_secs + cfg.drain_secs + 120.0) as usize;
    let stats = Arc::new(Stats::new(total_secs));

    let mut slots = Vec::with_capacity(cfg.clients);
    let every = |share: f64| (share > 0.0).then(|| ((1.0 / share).round() as usize).max(3));
    let (lp_every, sse_every) = (every(cfg.lp_share), every(cfg.sse_share));
    for i in 0..cfg.clients {
        // Every 1/share-th client, offset so that they spread over users.
        let transport = if lp_every.is_some_and(|n| i % n == 1) {
            Transport::LongPolling
        } else if sse_every.is_some_and(|n| i % n == 2) {
            Transport::Sse
        } else {
            Transport::WebSockets
        };
        slots.push(Slot {
            user: i % cfg.users.max(1),
            transport,
            last_k: Default::default(),
            connected: Default::default(),
            missing: Default::default(),
        });
    }
    let ep = signalr::parse_endpoint(&format!("http://{}/hubs/feed", env.proxy.local_addr()))?;
    let ctx = Arc::new(client::Ctx::new(
        ep,
        feedhub::auth::Authenticator::new(Some(&jwt_secret(&run)), &Default::default())
            .expect("the soak secret is long enough"),
        oracle.clone(),
        stats.clone(),
        slots,
        cfg.source_ips,
    ));

    // Clients first (each starts with Recover(null)), then the publisher.
    let mut handles = Vec::with_capacity(cfg.clients);
    let connect_started = Instant::now();
    for i in 0..cfg.clients {
        if cfg.connect_rate > 0.0 {
            let due = connect_started + Duration::from_secs_f64(i as f64 / cfg.connect_rate);
            tokio::time::sleep_until(due.into()).await;
        }
        handles.push(tokio::spawn(client::run(ctx.clone(), i)));
    }
    let stall_task = tokio::spawn(client::stalled_client(ctx.clone(), stall_user));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, connected, _) = lag(&ctx, now_micros());
        if connected == cfg.clients {
            break;
        }
        if Instant::now() > deadline {
            let down: Vec<String> = ctx
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.connected.load(Ordering::Relaxed))
                .take(5)
                .map(|(i, s)| format!("{i} ({:?})", s.transport))
                .collect();
            bail!(
                "only {connected}/{} clients connected after 60 s (not: {down:?}…); last error: {:?}",
                cfg.clients,
                stats.last_connect_error.lock().unwrap_or_else(|p| p.into_inner())
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "soak: {} clients connected in {:.1}s",
        cfg.clients,
        connect_started.elapsed().as_secs_f64()
    );
    let t0 = stats.secs();

    let publisher_stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publisher::run(
        PublishPlan {
            amqp_url: env.rabbit.url(),
            exchange: "FeedUpdate".into(),
            rate: cfg.rate,
            multi_share: cfg.multi_share,
            multi_recipients: 3,
            payload_bytes: cfg.payload_bytes,
            stall_user: Some(stall_index),
            stall_rate: cfg.stall_rate,
            stall_bytes: cfg.stall_bytes,
            run: run.clone(),
        },
        oracle.clone(),
        publisher_stop.clone(),
    ));

    // Sampler: RSS and descriptors per instance, every second.
    let samples: Arc<Mutex<Vec<ProcSample>>> = Arc::default();
    let sampler_stop = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let samples = samples.clone();
        let pids = env.pids.clone();
        let stats = stats.clone();
        let stop = sampler_stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let t = stats.secs();
                let mut v = samples.lock().unwrap_or_else(|p| p.into_inner());
                for (i, p) in pids.iter().enumerate() {
                    let pid = *p.lock().unwrap_or_else(|e| e.into_inner());
                    let (rss_kib, fds) = pid.and_then(procs::rss_and_fds).unwrap_or((0, 0));
                    let cpu_secs = pid.map(procs::cpu_secs).unwrap_or(0.0);
                    v.push(ProcSample {
                        t,
                        instance: i,
                        rss_kib,
                        fds,
                        cpu_secs,
                    });
                }
            }
        })
    };

    // The schedule, relative to t0.
    let plan = schedule(&cfg);
    let mut pending = Vec::new();
    let mut phase_bounds: Vec<(String, f64)> = vec![("warm-up".into(), t0)];
    for (n, (at, fault)) in plan.iter().enumerate() {
        let start_at = t0 + at;
        while stats.secs() < start_at {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let start = stats.secs();
        stats.phase.store(n + 1, Ordering::SeqCst);
        phase_bounds.push((fault.name(), start));
        eprintln!("soak: {:>6.1}s {}", start - t0, fault.name());
        // The fault runs while a watcher measures recovery (it keeps watching while the
        // next faults run, up to 30 s past the next one's start).
        let action_done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let ctx = ctx.clone();
            let stats = stats.clone();
            let done = action_done.clone();
            let next_at = plan
                .get(n + 1)
                .map(|(a, _)| t0 + a)
                .unwrap_or(t0 + cfg.duration_secs);
            let clients = cfg.clients;
            tokio::spawn(async move {
                // Give the fault a moment to be noticed before looking for recovery.
                tokio::time::sleep(Duration::from_millis(300)).await;
                loop {
                    let now = stats.secs();
                    let (worst, connected, furthest) = lag(&ctx, now_micros());
                    if done.load(Ordering::SeqCst)
                        && connected == clients
                        && worst < RECOVERED_LAG.as_micros() as u64
                    {
                        return Ok(now);
                    }
                    if now > next_at + 30.0 {
                        let down: Vec<String> = ctx
                            .slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| !s.connected.load(Ordering::Relaxed))
                            .take(4)
                            .map(|(i, s)| format!("{i} {:?}", s.transport))
                            .collect();
                        return Err(format!(
                            "at {:.1}s: {connected}/{clients} connected (not: {}), the furthest client ({furthest} {:?}) {:.1}s behind",
                            now - start,
                            down.join(", "),
                            ctx.slots[furthest].transport,
                            worst as f64 / 1e6
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let r = do_fault(&cfg, &mut env, &ctx, fault).await;
        let action_secs = stats.secs() - start;
        action_done.store(true, Ordering::SeqCst);
        if let Err(e) = &r {
            eprintln!("soak: fault {} failed: {e:#}", fault.name());
        }
        pending.push((
            FaultResult {
                name: fault.name(),
                at: start - t0,
                action_secs,
                recover_secs: None,
                not_recovered: None,
                error: r.err().map(|e| format!("{e:#}")),
            },
            start,
            watcher,
        ));
    }
    let publish_until = t0 + cfg.duration_secs;
    while stats.secs() < publish_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stats.phase.store(plan.len() + 1, Ordering::SeqCst);
    phase_bounds.push(("drain".into(), stats.secs()));
    publisher_stop.store(true, Ordering::SeqCst);
    let _ = tokio::time::timeout(Duration::from_secs(60), publisher).await;
    let published_until = stats.secs();

    // Drain: every client catches up with the confirmed events.
    let drain_deadline = Instant::now() + Duration::from_secs_f64(cfg.drain_secs);
    loop {
        let behind = ctx
            .slots
            .iter()
            .filter(|s| s.last_k.load(Ordering::Relaxed) < oracle.confirmed(s.user))
            .count();
        if behind == 0 || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained_after = stats.secs() - published_until;
    let mut results: Vec<FaultResult> = Vec::new();
    for (mut res, start, watcher) in pending {
        match watcher.await {
            Ok(Ok(at)) => res.recover_secs = Some(at - start),
            Ok(Err(state)) => res.not_recovered = Some(state),
            Err(e) => res.not_recovered = Some(format!("watcher failed: {e}")),
        }
        eprintln!(
            "soak: {} recovered after {}",
            res.name,
            res.recover_secs
                .map(|s| format!("{s:.2}s"))
                .unwrap_or_else(|| format!(
                    "NEVER ({})",
                    res.not_recovered.clone().unwrap_or_default()
                ))
        );
        results.push(res);
    }
    ctx.stop.cancel();
    let mut ends = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(Ok(end)) = tokio::time::timeout(Duration::from_secs(30), h).await {
            ends.push(end);
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), stall_task).await;
    sampler_stop.cancel();
    let _ = sampler.await;

    // Slow-consumer closes per instance (counters of the current processes), and each
    // instance's /metrics for the record.
    let mut slow = Vec::new();
    let mut counters = std::collections::BTreeMap::new();
    for inst in &env.instances {
        let inst = inst.lock().await;
        slow.push(
            inst.metric("feedhub_slow_consumer_closes_total")
                .await
                .unwrap_or(-1.0),
        );
        if let Some(text) = inst.metrics_text().await {
            let _ = std::fs::write(
                cfg.dir
                    .join(format!("instance-{}.metrics.txt", inst.index + 1)),
                &text,
            );
        }
        for name in [
            "feedhub_gap_repairs_total",
            "feedhub_gap_repaired_events_total",
            "feedhub_gap_lost_events_total",
            "feedhub_recover_total",
            "feedhub_feed_duplicates_dropped_total",
            "feedhub_history_duplicates_total",
            "feedhub_backplane_dropped_total",
            "feedhub_outbound_dropped_total",
        ] {
            if let Some(v) = inst.metric(name).await {
                *counters.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // Final check against the ground truth.
    let mut lost = 0u64;
    let mut gaps = 0u64;
    let mut undelivered = 0u64;
    let mut lost_clients = 0usize;
    let mut applied = 0u64;
    let mut reloads = 0u64;
    let mut tail_examples = Vec::new();
    for end in &ends {
        let slot = &ctx.slots[end.index];
        let confirmed = oracle.confirmed(slot.user);
        let tail = confirmed.saturating_sub(end.track.last_k);
        let missing = end.track.missing() as u64;
        applied += end.track.applied;
        reloads += end.track.reloads;
        gaps += missing;
        undelivered += tail;
        if tail + missing > 0 {
            lost += tail + missing;
            lost_clients += 1;
            if tail_examples.len() < 10 {
                // When the first event it never got was published, in run time.
                let since = oracle
                    .time_of(slot.user, end.track.last_k + 1)
                    .map(|t| {
                        let ago = now_micros().saturating_sub(t) as f64 / 1e6;
                        format!("{:.1}s", stats.secs() - ago - t0)
                    })
                    .unwrap_or_else(|| "?".into());
                tail_examples.push(format!(
                    "client {} ({:?}, {} connections, position {:?}) of {}: last k {} of {confirmed} confirmed (the next was published at {since}), {missing} missing in between",
                    end.index, slot.transport, end.connections, end.position, end.track.user, end.track.last_k
                ));
            }
        }
    }
    let finished = ends.len();
    let summary = report::Summary {
        run: run.clone(),
        config: cfg.clone(),
        clients_finished: finished,
        transports: [
            (
                "WebSockets",
                ctx.slots
                    .iter()
                    .filter(|s| s.transport == Transport::WebSockets)
                    .count(),
            ),
            (
                "LongPolling",
                ctx.slots
                    .iter()
                    .filter(|s| s.transport == Transport::LongPolling)
                    .count(),
            ),
            (
                "SSE",
                ctx.slots
                    .iter()
                    .filter(|s| s.transport == Transport::Sse)
                    .count(),
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect(),
        messages_published: oracle.messages.load(Ordering::Relaxed),
        recipient_events: oracle.recipient_events.load(Ordering::Relaxed),
        publish_failures: oracle.failures.load(Ordering::Relaxed),
        republished_events: oracle.republished_events.load(Ordering::Relaxed),
        applied,
        lost,
        gaps,
        undelivered,
        lost_clients,
        out_of_order: stats
            .phases
            .iter()
            .map(|p| p.out_of_order.load(Ordering::Relaxed))
            .sum(),
        violations: stats.violations.load(Ordering::Relaxed),
        reloads,
        drained_after_secs: drained_after,
        faults: results,
        phase_bounds,
        t0,
        slow_consumer_closes: slow,
        instance_counters: counters,
        confirm_ms: oracle.confirm_summary(),
        stall_closes: stats
            .stall_closes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        stall_connects: stats.stall_connects.load(Ordering::Relaxed),
        load_before: load_before.trim().to_string(),
        load_after: load_after.trim().to_string(),
        nofile,
        first_violations: stats
            .first_violation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .take(20)
            .map(|(u, v)| format!("{u}: {v}"))
            .collect(),
        lost_examples: tail_examples,
        recover_errors: stats.recover_errors.load(Ordering::Relaxed),
        connect_failures: stats.connect_failures.load(Ordering::Relaxed),
        last_connect_error: stats
            .last_connect_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        publish_last_error: oracle
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    };
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let value = report::write(&cfg.dir, &summary, &stats, &samples)
        .with_context(|| format!("writing the report to {}", cfg.dir.display()))?;
    drop(env);
    Ok(value)
}

/// `Err` with the summary's first problems when the run lost or reordered anything.
pub fn verdict(v: &serde_json::Value) -> anyhow::Result<()> {
    let lost = v["lost"].as_u64().unwrap_or(u64::MAX);
    let ooo = v["out_of_order"].as_u64().unwrap_or(u64::MAX);
    let reloads = v["reloads"].as_u64().unwrap_or(u64::MAX);
    let finished = v["clients_finished"].as_u64().unwrap_or(0);
    let clients = v["config"]["clients"].as_u64().unwrap_or(1);
    if lost == 0 && ooo == 0 && reloads == 0 && finished == clients {
        return Ok(());
    }
    Err(anyhow!(
        "soak failed: lost {lost}, out of order {ooo}, reloads (recovered:false) {reloads}, clients finished {finished}/{clients}\nfirst violations: {:#}\nlost: {:#}",
        v["first_violations"],
        v["lost_examples"]
    ))
}

/// The instances' JWT secret for one run (at least 32 bytes, as feedhub requires).
fn jwt_secret(run: impl std::fmt::Display) -> String {
    format!("soak-{run}-jwt-secret-of-at-least-32-bytes")
}
