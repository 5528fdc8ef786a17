//! The soak's processes, all private to one run and stopped by PID: a `redis-server` with
//! AOF (`appendfsync always`, its own directory and free port), a RabbitMQ node started
//! directly from `/usr/lib/rabbitmq/bin/rabbitmq-server` with its own home, Mnesia base,
//! node name and ports (never the shared 6379/5672 ones), and feedhub instances
//! (`target/release/feedhub`) that can be `kill -9`ed and restarted on the same port.
//! Also `/proc` sampling (RSS, open descriptors) and free ports below 32768.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A free TCP port on 127.0.0.1 below the ephemeral range (so a client socket cannot take
/// it while a process restarts): tries ports from a per-process start.
pub fn free_low_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % 12_000;
    for _ in 0..2_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = (20_000 + (start + n * 7) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()
        {
            return Ok(p);
        }
    }
    bail!("no free port below 32768")
}

/// Whether `program` runs (`--version` or the given probe).
pub fn have(program: &str) -> bool {
    Path::new(program).is_file()
        || Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
}

/// RSS (KiB) and open descriptors of `pid`; `None` once it is gone.
pub fn rss_and_fds(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some((rss, fds))
}

/// CPU seconds (user + system) of `pid`.
pub fn cpu_secs(pid: u32) -> f64 {
    super::procstat::sample(&pid.to_string())
        .map(|s| s.cpu_secs)
        .unwrap_or(0.0)
}

fn kill9(pid: u32) {
    // SAFETY: kill has no memory preconditions; the PID is a child this run started.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

fn term(pid: u32) {
    // SAFETY: as above.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
}

async fn wait_port(port: u16, what: &str, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("{what} did not listen on port {port} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A private `redis-server` with AOF on every write.
pub struct Redis {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// Starts one in `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let mut r = Redis {
            port: free_low_port()?,
            dir: dir.to_path_buf(),
            child: None,
        };
        r.spawn().await?;
        Ok(r)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", "", "--maxclients", "20000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn redis-server")?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)).await {
                let mut buf = [0u8; 7];
                // PING answers -LOADING while the AOF loads; wait for +PONG.
                if s.write_all(b"PING\r\n").await.is_ok()
                    && tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
                        .await
                        .is_ok_and(|r| r.is_ok())
                    && &buf == b"+PONG\r\n"
                {
                    return Ok(());
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("redis-server on port {} did not start", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The PID, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops it (SIGTERM: it fsyncs and exits) and starts it again on the same port with
    /// the same AOF.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    /// Stops it and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            term(c.id());
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The RabbitMQ server scripts of the Debian package.
pub const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A private RabbitMQ node.
pub struct Rabbit {
    /// AMQP port.
    pub port: u16,
    /// Erlang node name (`soak<pid>@localhost`).
    pub node: String,
    dir: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Rabbit {
    /// Starts a node in `dir` and waits until it accepts AMQP connections.
    pub async fn start(dir: &Path) -> anyhow::Result<Rabbit> {
        if !Path::new(RABBITMQ_SERVER).is_file() {
            bail!("{RABBITMQ_SERVER} is missing");
        }
        let home = dir.join("home");
        for d in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let cookie = home.join(".erlang.cookie");
        if !cookie.exists() {
            std::fs::write(
                &cookie,
                format!("SOAK{}COOKIE", feedhub::ids::random_token()),
            )?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))?;
            }
        }
        std::fs::write(dir.join("rabbitmq.conf"), "loopback_users = none\n")?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        let port = free_low_port()?;
        let dist = free_low_port()?;
        let node = format!("soak{}x{}@localhost", std::process::id(), port);
        let rabbit_home = std::fs::read_dir("/usr/lib/rabbitmq/lib")?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("rabbitmq_server-"))
            })
            .ok_or_else(|| anyhow!("no /usr/lib/rabbitmq/lib/rabbitmq_server-*"))?;
        let s = |p: PathBuf| p.to_string_lossy().into_owned();
        let env = vec![
            ("HOME".into(), s(home)),
            ("RABBITMQ_HOME".into(), s(rabbit_home)),
            ("RABBITMQ_MNESIA_BASE".into(), s(dir.join("mnesia"))),
            ("RABBITMQ_LOG_BASE".into(), s(dir.join("log"))),
            ("RABBITMQ_NODENAME".into(), node.clone()),
            ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT".into(), port.to_string()),
            ("RABBITMQ_DIST_PORT".into(), dist.to_string()),
            ("RABBITMQ_CONFIG_FILE".into(), s(dir.join("rabbitmq.conf"))),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
                s(dir.join("enabled_plugins")),
            ),
            (
                "RABBITMQ_CONF_ENV_FILE".into(),
                s(dir.join("rabbitmq-env.conf")),
            ),
            ("RABBITMQ_PID_FILE".into(), s(dir.join("pid"))),
        ];
        let child = Command::new(RABBITMQ_SERVER)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::fs::File::create(dir.join("server.out"))?)
            .stderr(Stdio::null())
            .spawn()
            .context("spawn rabbitmq-server")?;
        let r = Rabbit {
            port,
            node,
            dir: dir.to_path_buf(),
            env,
            child: Some(child),
        };
        wait_port(port, "RabbitMQ", Duration::from_secs(240)).await?;
        Ok(r)
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The beam process (from the pid file), for sampling.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// `rabbitmqctl -n <node> <args>`.
    pub async fn ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut cmd = tokio::process::Command::new(RABBITMQCTL);
        cmd.arg("-n").arg(&self.node).args(args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .map_err(|_| anyhow!("rabbitmqctl {args:?} timed out"))??;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// `stop_app` then `start_app` (the broker restarts inside the running node); returns
    /// once AMQP accepts connections again.
    pub async fn restart_app(&self) -> anyhow::Result<()> {
        self.ctl(&["stop_app"]).await?;
        self.ctl(&["start_app"]).await?;
        wait_port(self.port, "RabbitMQ", Duration::from_secs(60)).await
    }

    fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let _ = Command::new(RABBITMQCTL)
            .arg("-n")
            .arg(&self.node)
            .arg("shutdown")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(pid) = self.pid() {
            if Path::new(&format!("/proc/{pid}")).exists() {
                kill9(pid);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One feedhub instance.
pub struct Instance {
    /// Index (0-based).
    pub index: usize,
    /// Its HTTP port.
    pub port: u16,
    binary: PathBuf,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// PIDs it had (one per start).
    pub pids: Vec<u32>,
}

impl Instance {
    /// An instance that runs `binary` with `env` (flags by their `FEEDHUB_*` twins).
    pub fn new(
        index: usize,
        binary: &Path,
        env: Vec<(String, String)>,
        log: PathBuf,
    ) -> anyhow::Result<Instance> {
        Ok(Instance {
            index,
            port: free_low_port()?,
            binary: binary.to_path_buf(),
            env,
            log,
            child: None,
            pids: Vec::new(),
        })
    }

    /// Starts it and waits until it listens.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.binary)
            .env("FEEDHUB_LISTEN", format!("127.0.0.1:{}", self.port))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("SOAK_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", self.binary.display()))?;
        self.pids.push(child.id());
        self.child = Some(child);
        wait_port(self.port, "feedhub", Duration::from_secs(30)).await
    }

    /// The current PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill9(c.id());
            let _ = c.wait();
        }
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let req = format!(
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.port
        );
        let (status, body) = tokio::time::timeout(
            Duration::from_secs(5),
            super::signalr::http_once(&mut s, req.as_bytes()),
        )
        .await
        .ok()?
        .ok()?;
        (status == 200).then(|| String::from_utf8_lossy(&body).into_owned())
    }

    /// `GET /metrics` and the value of one counter (summed over label sets).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics_text().await?;
        let mut total = None;
        for l in text.lines() {
            if l.starts_with(name)
                && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{'))
            {
                if let Some(v) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                    *total.get_or_insert(0.0) += v;
                }
            }
        }
        total
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            term(c.id());
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
