//! One accepted connection, from its first byte to its close or upgrade: hyper's HTTP/1
//! server over any byte stream (plain TCP here; a TLS stream works the same), plus the time
//! limits hyper does not enforce the way a hub server needs.
//!
//! [`serve_connection`] wraps the stream in [`TrackedIo`] (which notes when bytes arrive
//! and carries the connection's admission [`Slot`]) and watches the connection:
//!
//! - **header read**: a request head must be complete within `header_read_timeout` of the
//!   connection opening, or of its first byte after a keep-alive pause (slowloris);
//! - **keep-alive idle**: between requests, a connection that sends nothing for
//!   `idle_timeout` is closed;
//! - while a request is in progress (its response not fully written: a long poll, a
//!   Server-Sent Events stream) neither applies; its body has `body_read_timeout`
//!   ([`super::respond::read_incoming`], 408).
//!
//! At the total connection cap, the oldest connection still without a complete request is
//! evicted to make room for a new one (see `limits::Admission::admit`).
//!
//! A timed-out connection is closed without a response (as nginx and hyper do): no request
//! is in progress on it. An upgraded connection (WebSocket) leaves this watch: the session's
//! handshake timeout and client timeout take over, and the [`Slot`] stays with the socket.

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::limits::{Fresh, Slot};
use super::state::HttpState;
use super::Body;
use crate::metrics::{inc, METRICS};

pub use super::respond::ConnInfo;

/// Milliseconds since the first call (never 0: 0 means "not yet").
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    Instant::now().duration_since(start).as_millis() as u64 + 1
}

/// What the watchdog needs to know about a connection, shared with its IO and its
/// in-flight requests.
#[derive(Debug)]
struct Activity {
    /// Requests whose response is not fully written yet.
    in_flight: AtomicU32,
    /// When the connection last became idle (opened, or a response ended).
    idle_since: AtomicU64,
    /// First byte received since then (0: none).
    first_byte: AtomicU64,
    /// A request has been served (the next idle period is a keep-alive pause).
    served: AtomicU32,
    /// The connection's entry in the eviction queue (`limits::Admission`), until its first
    /// request: then it is marked served and let go, so an upgraded socket (which keeps this
    /// record in its IO) does not hold it and its cancellation token for life.
    fresh: Mutex<Option<Arc<Fresh>>>,
}

impl Activity {
    fn new(fresh: Option<Arc<Fresh>>) -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(now_ms()),
            first_byte: AtomicU64::new(0),
            served: AtomicU32::new(0),
            fresh: Mutex::new(fresh),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if self.served.swap(1, Ordering::Relaxed) == 0 {
            let fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(f) = fresh {
                f.served();
            }
        }
        InFlight(self.clone())
    }
}

/// A request in progress, until its response body is written (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // Idle again from now: the next request's bytes start a header phase.
        a.first_byte.store(0, Ordering::Relaxed);
        a.idle_since.store(now_ms(), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which time limit closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The request head did not arrive in time.
    HeaderRead,
    /// Nothing arrived between requests.
    Idle,
}

/// The deadline the connection is under now (ms), and what expires then; `None` while a
/// request is in progress (re-checked after `recheck`).
fn deadline(a: &Activity, header: Duration, idle: Duration) -> Option<(u64, Expired)> {
    if a.in_flight.load(Ordering::Relaxed) > 0 {
        return None;
    }
    let since = a.idle_since.load(Ordering::Relaxed);
    let first = a.first_byte.load(Ordering::Relaxed);
    let header = header.as_millis() as u64;
    if a.served.load(Ordering::Relaxed) == 0 {
        // A fresh connection: its first head must be complete within the header timeout of
        // opening, however its bytes trickle in.
        return Some((since + header, Expired::HeaderRead));
    }
    if first != 0 {
        // After a keep-alive pause, the next head must be complete within the header
        // timeout of its first byte.
        return Some((first.max(since) + header, Expired::HeaderRead));
    }
    Some((since + idle.as_millis() as u64, Expired::Idle))
}

/// Resolves when the connection has broken a time limit.
async fn watch(a: Arc<Activity>, header: Duration, idle: Duration) -> Expired {
    let recheck = header.min(idle).max(Duration::from_millis(50));
    loop {
        match deadline(&a, header, idle) {
            None => tokio::time::sleep(recheck).await,
            Some((at, what)) => {
                let now = now_ms();
                if now >= at {
                    return what;
                }
                tokio::time::sleep(Duration::from_millis(at - now)).await;
            }
        }
    }
}

/// A byte stream that notes when bytes arrive (for the header and idle limits) and holds
/// its connection's admission [`Slot`] until it is dropped.
pub struct TrackedIo<IO> {
    inner: IO,
    activity: Arc<Activity>,
    _slot: Option<Slot>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for TrackedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before && this.activity.first_byte.load(Ordering::Relaxed) == 0 {
            this.activity.first_byte.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TrackedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that ends its request's [`InFlight`] when written in full or dropped.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves one accepted connection over `io` (plain TCP, or TLS wrapped by the caller) until
/// it closes, upgrades, breaks a time limit, or the server shuts down. `slot` is its place
/// in the admission counters, freed when the socket closes.
pub async fn serve_connection<IO>(io: IO, peer: IpAddr, slot: Option<Slot>, state: Arc<HttpState>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = state.admission.config().clone();
    // Evictable at the total cap until its first request arrives.
    let fresh = state.admission.register_fresh();
    let _closed = ClosedOnDrop(fresh.clone());
    let activity = Activity::new(Some(fresh.clone()));
    let io = TrackedIo {
        inner: io,
        activity: activity.clone(),
        _slot: slot,
    };
    let info = ConnInfo {
        peer,
        body_read_timeout: limits.body_read_timeout,
    };
    let svc_state = state.clone();
    let svc_activity = activity.clone();
    let service = service_fn(move |mut req| {
        let state = svc_state.clone();
        let in_flight = svc_activity.begin();
        req.extensions_mut().insert(info);
        async move {
            let resp = super::handle(state, req).await?;
            Ok::<_, Infallible>(resp.map(|inner| {
                Tracked {
                    inner,
                    _in_flight: in_flight,
                }
                .boxed_unsync()
            }))
        }
    });
    let conn = http1::Builder::new()
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let watchdog = watch(activity, limits.header_read_timeout, limits.idle_timeout);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection error");
            }
        }
        _ = fresh.evicted() => {
            tracing::debug!(%peer, "connection without a request evicted at the total cap");
        }
        expired = watchdog => {
            // Dropping the connection closes the socket.
            match expired {
                Expired::HeaderRead => inc(&METRICS.header_read_timeouts),
                Expired::Idle => inc(&METRICS.idle_timeouts),
            }
            tracing::debug!(%peer, ?expired, "http connection timed out");
        }
        _ = state.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Marks the connection closed in the eviction queue when its task ends.
struct ClosedOnDrop(Arc<Fresh>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity(served: bool, in_flight: u32, since: u64, first: u64) -> Activity {
        Activity {
            in_flight: AtomicU32::new(in_flight),
            idle_since: AtomicU64::new(since),
            first_byte: AtomicU64::new(first),
            served: AtomicU32::new(u32::from(served)),
            fresh: Mutex::new(None),
        }
    }

    #[test]
    fn deadlines_by_phase() {
        let h = Duration::from_secs(10);
        let i = Duration::from_secs(60);
        // Fresh and silent: header timeout from opening.
        assert_eq!(
            deadline(&activity(false, 0, 1_000, 0), h, i),
            Some((11_000, Expired::HeaderRead))
        );
        // Fresh, bytes trickling in: still from opening.
        assert_eq!(
            deadline(&activity(false, 0, 1_000, 2_000), h, i),
            Some((11_000, Expired::HeaderRead))
        );
        // Keep-alive pause: idle timeout.
        assert_eq!(
            deadline(&activity(true, 0, 1_000, 0), h, i),
            Some((61_000, Expired::Idle))
        );
        // Next head arriving after a pause: header timeout from its first byte.
        assert_eq!(
            deadline(&activity(true, 0, 1_000, 30_000), h, i),
            Some((40_000, Expired::HeaderRead))
        );
        // A request in progress: no deadline here.
        assert_eq!(deadline(&activity(true, 1, 1_000, 0), h, i), None);
    }
}
