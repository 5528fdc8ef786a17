//! A one-backend TCP proxy that can cut the network for a while: [`CutProxy::cut`] closes
//! every live connection and refuses new ones (accepts and closes them at once) until the
//! cut ends. One sits between each feedhub instance and Redis, so the soak can cut one
//! instance off Redis while the others keep theirs. Bounded like `rr_proxy` (connection cap,
//! connect timeout, `copy_bidirectional`'s fixed buffers).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Most live connections at once.
const MAX_CONNECTIONS: usize = 4096;

struct Inner {
    backend: SocketAddr,
    live: AtomicUsize,
    cut: AtomicBool,
    generation: Mutex<CancellationToken>,
    stop: CancellationToken,
}

/// A running proxy; dropping it stops it.
pub struct CutProxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl CutProxy {
    /// Listens on `listen` and forwards to `backend`.
    pub async fn start(listen: SocketAddr, backend: SocketAddr) -> std::io::Result<CutProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            backend,
            live: AtomicUsize::new(0),
            cut: AtomicBool::new(false),
            generation: Mutex::new(CancellationToken::new()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, inner.clone()));
        Ok(CutProxy { addr, inner })
    }

    /// Where to connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts every connection and refuses new ones for `how_long`.
    pub async fn cut(&self, how_long: Duration) {
        self.inner.cut.store(true, Ordering::SeqCst);
        {
            let mut g = self
                .inner
                .generation
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            g.cancel();
            *g = CancellationToken::new();
        }
        tokio::time::sleep(how_long).await;
        self.inner.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.inner.stop.cancel();
        self.inner
            .generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancel();
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let accepted = tokio::select! {
            _ = inner.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if inner.cut.load(Ordering::SeqCst) || inner.live.load(Ordering::Relaxed) >= MAX_CONNECTIONS
        {
            drop(client);
            continue;
        }
        let cut = inner
            .generation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        inner.live.fetch_add(1, Ordering::Relaxed);
        let inner2 = inner.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = pipe(client, inner2.backend) => {}
            }
            inner2.live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn pipe(mut client: TcpStream, backend: SocketAddr) {
    let Ok(Ok(mut server)) =
        tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(backend)).await
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
