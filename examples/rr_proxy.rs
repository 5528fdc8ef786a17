//! A tiny round-robin TCP proxy: each new TCP connection goes to the next backend, bytes are
//! copied both ways until either side closes. [`RrProxy::drop_connections`] cuts every live
//! connection at once (a proxy restart or a network blip, as a client sees it) while the
//! listener keeps accepting. Tests use it as a library (`#[path]` include); as a binary:
//!
//! ```sh
//! cargo run --release --example rr_proxy -- 127.0.0.1:8080 127.0.0.1:5001 127.0.0.1:5002
//! ```
//!
//! then type `drop` + Enter to cut all live connections.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] live connections (more are refused by closing them),
//! a backend connect timeout, and the fixed 8 KiB per-direction buffers of
//! `copy_bidirectional`. TCP_NODELAY on both sides, so the proxy adds no Nagle delay to the
//! latencies tests measure through it.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Most live connections at once.
pub const MAX_CONNECTIONS: usize = 10_000;
/// How long connecting to a backend may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Inner {
    backends: Vec<SocketAddr>,
    next: AtomicUsize,
    live: AtomicUsize,
    accepted: AtomicU64,
    /// Connections accepted per backend, in `backends` order.
    per_backend: Vec<AtomicU64>,
    /// Cancelled by `drop_connections`; replaced by a fresh one for later connections.
    generation: Mutex<CancellationToken>,
    stop: CancellationToken,
}

/// A running proxy; dropping it stops the listener and cuts every connection.
pub struct RrProxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl RrProxy {
    /// Listens on `listen` (port 0 picks a free port) and spreads connections over
    /// `backends` in turn.
    pub async fn start(listen: SocketAddr, backends: Vec<SocketAddr>) -> io::Result<RrProxy> {
        if backends.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "at least one backend is required",
            ));
        }
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let per_backend = backends.iter().map(|_| AtomicU64::new(0)).collect();
        let inner = Arc::new(Inner {
            backends,
            per_backend,
            next: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            generation: Mutex::new(CancellationToken::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, inner.clone()));
        Ok(RrProxy { addr, inner })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every live connection (both sides see the socket close); new connections are
    /// accepted as before.
    pub fn drop_connections(&self) {
        let mut g = self
            .inner
            .generation
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        g.cancel();
        *g = CancellationToken::new();
    }

    /// Live connections.
    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::Relaxed)
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Connections accepted since start per backend, in the order the backends were given
    /// (each was sent to that backend; it says nothing about whether the backend answered).
    pub fn accepted_per_backend(&self) -> Vec<u64> {
        self.inner
            .per_backend
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }

    /// A handle that can cut connections from elsewhere (a hub method in a test).
    pub fn dropper(&self) -> impl Fn() + Send + Sync + 'static {
        let inner = self.inner.clone();
        move || {
            let mut g = inner.generation.lock().unwrap_or_else(|p| p.into_inner());
            g.cancel();
            *g = CancellationToken::new();
        }
    }
}

impl Drop for RrProxy {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        self.drop_connections();
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let accepted = tokio::select! {
            _ = inner.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let client = match accepted {
            Ok((c, _)) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("rr_proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if inner.live.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            drop(client);
            continue;
        }
        inner.accepted.fetch_add(1, Ordering::Relaxed);
        let i = inner.next.fetch_add(1, Ordering::Relaxed) % inner.backends.len();
        let backend = inner.backends[i];
        inner.per_backend[i].fetch_add(1, Ordering::Relaxed);
        let cut = inner
            .generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let stop = inner.stop.clone();
        inner.live.fetch_add(1, Ordering::Relaxed);
        let inner2 = inner.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = stop.cancelled() => {}
                _ = pipe(client, backend) => {}
            }
            inner2.live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn pipe(mut client: TcpStream, backend: SocketAddr) {
    let mut server = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await
    {
        Ok(Ok(s)) => s,
        _ => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: rr_proxy <listen addr> <backend addr>...";
    let Some((listen, backends)) = args.split_first() else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let parse = |s: &String| {
        s.parse::<SocketAddr>().unwrap_or_else(|e| {
            eprintln!("{s}: {e}\n{usage}");
            std::process::exit(2)
        })
    };
    let proxy = RrProxy::start(parse(listen), backends.iter().map(parse).collect()).await?;
    println!(
        "rr_proxy on {} -> {backends:?}; type `drop` to cut all connections",
        proxy.local_addr()
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    loop {
        line.clear();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            n = tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line) => match n {
                Ok(0) | Err(_) => {
                    // stdin closed: keep serving until Ctrl-C.
                    let _ = tokio::signal::ctrl_c().await;
                    return Ok(());
                }
                Ok(_) if line.trim() == "drop" => {
                    proxy.drop_connections();
                    println!("dropped; {} accepted so far", proxy.accepted());
                }
                Ok(_) => println!("commands: drop"),
            }
        }
    }
}
