//! Admission: who may open a connection or start a negotiate/connect, before any request
//! is parsed. Owns the connection counters (total, per address), the per-address token
//! buckets, and the minimal responses written to refused sockets. It holds no hub state and
//! never awaits a client socket on a shared path: refusals are written by a bounded number
//! of their own tasks.
//!
//! | limit | default | over it |
//! |---|---|---|
//! | open connections in total | 100,000, lowered below `RLIMIT_NOFILE` | the oldest connection without a request yet is evicted; if none, `503` + `Retry-After`, socket closed |
//! | open connections per address (IPv4 /32, IPv6 /64) | 1,024 | `429` + `Retry-After`, socket closed |
//! | negotiate / connect requests per address | 50/s, bursts of 250 | `429` + `Retry-After` |
//!
//! Why these numbers: one instance serves tens of thousands of connections (the idle
//! benchmark holds 100,000), so the total cap is there to keep descriptors for `/healthz`,
//! Redis and RabbitMQ, not to ration clients: it is lowered to the descriptor limit minus a
//! reserve (a tenth, at least 128) because an `accept` failing with `EMFILE` stops answering
//! everything, health checks included (issue 14: about 20,000 half-open connections did
//! that). Per address, 1,024 connections and 50 connects per second are far above what one
//! browser or one office NAT of official clients produces (a client negotiates and connects
//! once, then reconnects with back-off), and far below what a single attacking host needs to
//! hurt. Behind a reverse proxy every client has the proxy's address: set the per-address
//! limits to 0 (off) there and limit at the proxy.
//!
//! Time limits (header read, keep-alive idle, body read) live with the connection in
//! [`super::conn`]; the per-user cap lives with the hub (`HubOptions::max_connections_per_user`).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;
use std::sync::atomic::AtomicU8;
use std::sync::Mutex;

use dashmap::DashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{inc, METRICS};

/// Default header read timeout: the whole request head within 10 s of the connection
/// opening (official clients send it at once; hyper's own default is 30 s, nginx's 60 s).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default keep-alive idle timeout: an HTTP connection with no request in progress and no
/// byte received closes after 60 s (browsers reuse pooled connections well within that).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default body read timeout: a request body must arrive in full within 30 s (408 after).
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on open connections (lowered below the descriptor limit at start).
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
/// Default cap on open connections per address (IPv4 /32, IPv6 /64).
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 1024;
/// Default negotiate/connect requests per second per address.
pub const DEFAULT_CONNECT_RATE_PER_ADDRESS: u32 = 50;
/// Default burst of negotiate/connect requests per address.
pub const DEFAULT_CONNECT_BURST_PER_ADDRESS: u32 = 250;

/// Refusal tasks (writing a 503/429 to a refused socket) allowed at once; beyond, refused
/// sockets are closed without a response so a flood cannot pile up tasks or descriptors.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;
/// `Retry-After` of a connection refused at accept, in seconds.
pub const RETRY_AFTER_SECS: u64 = 5;
/// How long a refused socket is kept to deliver its response and drain the request.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The HTTP layer's limits. `0` turns a count or rate limit off.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// A request head must be complete within this time of the connection opening, or of
    /// the first byte after a keep-alive pause.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress and nothing received closes after this.
    pub idle_timeout: Duration,
    /// A request body must arrive in full within this time (408 otherwise).
    pub body_read_timeout: Duration,
    /// Open connections in total (lowered below the descriptor limit at start).
    pub max_connections: usize,
    /// Open connections per client address (IPv4 /32, IPv6 /64).
    pub max_connections_per_address: usize,
    /// Negotiate / connect (WebSocket, Server-Sent Events) requests per second per address.
    pub connect_rate_per_address: u32,
    /// Burst allowance of that rate.
    pub connect_burst_per_address: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            connect_rate_per_address: DEFAULT_CONNECT_RATE_PER_ADDRESS,
            connect_burst_per_address: DEFAULT_CONNECT_BURST_PER_ADDRESS,
        }
    }
}

impl LimitsConfig {
    /// No per-address limits (benchmarks and load tests that open many connections from
    /// one machine; deployments behind a reverse proxy).
    pub fn without_per_address_limits(mut self) -> Self {
        self.max_connections_per_address = 0;
        self.connect_rate_per_address = 0;
        self
    }
}

/// The key per-address limits count by: an IPv4 address, or an IPv6 /64 (one subscriber's
/// usual allocation; counting single IPv6 addresses would give every attacker 2^64 of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressKey {
    /// An IPv4 address (IPv4-mapped IPv6 included).
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl AddressKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(u32::from(v4)),
                None => AddressKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds its total cap of connections: 503.
    Total,
    /// The address holds its cap of connections: 429.
    Address,
}

/// A connection that has not sent a complete request yet, as the eviction queue sees it.
#[derive(Debug, Default)]
pub struct Fresh {
    /// [`FRESH`], [`SERVED`] or [`CLOSED`].
    state: AtomicU8,
    /// Cancelled to evict the connection.
    evict: CancellationToken,
}

const FRESH: u8 = 0;
const SERVED: u8 = 1;
const CLOSED: u8 = 2;

impl Fresh {
    /// Its first request has arrived: no longer evictable.
    pub fn served(&self) {
        self.state.store(SERVED, Ordering::Relaxed);
    }

    /// The connection is gone.
    pub fn closed(&self) {
        self.state.store(CLOSED, Ordering::Relaxed);
    }

    /// Resolves when the connection is evicted.
    pub async fn evicted(&self) {
        self.evict.cancelled().await
    }
}

/// One token bucket (negotiate/connect rate of one address).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The admission state of one server.
#[derive(Debug)]
pub struct Admission {
    config: LimitsConfig,
    /// The total cap in force (the configured one, lowered below the descriptor limit).
    max_total: usize,
    open: AtomicUsize,
    per_address: DashMap<AddressKey, usize>,
    buckets: DashMap<AddressKey, Bucket>,
    refusing: AtomicUsize,
    /// Connections without a first request yet, oldest first (stale entries are dropped as
    /// they reach the front; every entry goes stale within the header read timeout).
    fresh: Mutex<VecDeque<Arc<Fresh>>>,
}

/// An admitted connection's place in the counters; dropping it frees the place. It travels
/// with the socket (into an upgraded WebSocket too), so it is freed when the socket closes.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    key: Option<AddressKey>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::Relaxed);
        METRICS
            .http_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(key) = self.key {
            let _ = self.admission.per_address.remove_if_mut(&key, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }
}

impl Admission {
    /// Admission with `config`, the total cap lowered below `fd_limit` (the soft
    /// `RLIMIT_NOFILE`, if known).
    pub fn new(config: LimitsConfig, fd_limit: Option<u64>) -> Arc<Admission> {
        let max_total = effective_max_connections(config.max_connections, fd_limit);
        METRICS
            .http_connection_limit
            .store(max_total as i64, Ordering::Relaxed);
        Arc::new(Admission {
            config,
            max_total,
            open: AtomicUsize::new(0),
            per_address: DashMap::new(),
            buckets: DashMap::new(),
            refusing: AtomicUsize::new(0),
            fresh: Mutex::new(VecDeque::new()),
        })
    }

    /// The limits.
    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// The total cap in force (0: none).
    pub fn max_connections(&self) -> usize {
        self.max_total
    }

    /// Open connections.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a place for a new connection from `ip`, or says why not. At the total cap, the
    /// oldest connection that has not sent a complete request yet is evicted to make room
    /// (it is closing; the place is taken at once): half-open connections cannot lock
    /// everyone else, `/healthz` included, out of a full server. Only when every connection
    /// has sent a request is the new one refused with 503.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let open = self.open.fetch_add(1, Ordering::Relaxed);
        if self.max_total > 0 && open >= self.max_total && !self.evict_oldest_fresh() {
            self.open.fetch_sub(1, Ordering::Relaxed);
            inc(&METRICS.refused_total_cap);
            return Err(Refusal::Total);
        }
        let key = if self.config.max_connections_per_address > 0 {
            let key = AddressKey::of(ip);
            let mut n = self.per_address.entry(key).or_insert(0);
            if *n >= self.config.max_connections_per_address {
                drop(n);
                self.open.fetch_sub(1, Ordering::Relaxed);
                inc(&METRICS.refused_address_cap);
                return Err(Refusal::Address);
            }
            *n += 1;
            Some(key)
        } else {
            None
        };
        METRICS.http_connections.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            admission: self.clone(),
            key,
        })
    }

    /// Enters a new connection in the eviction queue; the caller marks it served or closed.
    pub fn register_fresh(&self) -> Arc<Fresh> {
        let fresh = Arc::new(Fresh::default());
        let mut q = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
        while q
            .front()
            .is_some_and(|f| f.state.load(Ordering::Relaxed) != FRESH)
        {
            q.pop_front();
        }
        q.push_back(fresh.clone());
        fresh
    }

    /// Evicts the oldest connection still without a request; false when there is none.
    fn evict_oldest_fresh(&self) -> bool {
        let mut q = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(f) = q.pop_front() {
            if f.state
                .compare_exchange(FRESH, CLOSED, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                f.evict.cancel();
                inc(&METRICS.evicted_fresh);
                return true;
            }
        }
        false
    }

    /// One negotiate/connect request from `ip`: `Err(retry_after)` when the address is over
    /// its rate.
    pub fn allow_connect(&self, ip: IpAddr) -> Result<(), Duration> {
        self.allow_connect_at(ip, Instant::now())
    }

    fn allow_connect_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let rate = self.config.connect_rate_per_address;
        if rate == 0 {
            return Ok(());
        }
        let burst = f64::from(self.config.connect_burst_per_address.max(1));
        let rate = f64::from(rate);
        let mut b = self.buckets.entry(AddressKey::of(ip)).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refilled = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if refilled >= 1.0 {
            b.tokens = refilled - 1.0;
            return Ok(());
        }
        b.tokens = refilled;
        inc(&METRICS.refused_rate);
        let wait = ((1.0 - refilled) / rate).ceil().max(1.0);
        Err(Duration::from_secs(wait as u64))
    }

    /// Forgets buckets that have refilled (addresses that stopped connecting), so the map
    /// only holds recently active addresses. Called periodically by the server.
    pub fn prune(&self) {
        self.prune_at(Instant::now());
    }

    fn prune_at(&self, now: Instant) {
        let rate = f64::from(self.config.connect_rate_per_address);
        let burst = f64::from(self.config.connect_burst_per_address.max(1));
        self.buckets
            .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
    }

    /// Answers a refused socket (`503` or `429` with `Retry-After`, `Connection: close`) and
    /// closes it, in its own task. At most [`MAX_REFUSALS_IN_FLIGHT`] at once: beyond that
    /// the socket is closed at once, without a response.
    pub fn refuse<IO>(self: &Arc<Self>, io: IO, why: Refusal)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if self.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSALS_IN_FLIGHT {
            self.refusing.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REFUSAL_LINGER, write_refusal(io, why)).await;
            me.refusing.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The bytes of a refusal response.
pub fn refusal_response(why: Refusal) -> Vec<u8> {
    let (status, body) = match why {
        Refusal::Total => (
            "503 Service Unavailable",
            "The server is at its connection limit. Try again later.",
        ),
        Refusal::Address => (
            "429 Too Many Requests",
            "Too many connections from this address. Try again later.",
        ),
    };
    format!(
        "HTTP/1.1 {status}\r\nRetry-After: {RETRY_AFTER_SECS}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Writes the refusal, then reads (and discards) what the client sent until it closes,
/// so the close does not reset the connection before the client has read the response.
async fn write_refusal<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO, why: Refusal) {
    if io.write_all(&refusal_response(why)).await.is_err() {
        return;
    }
    let _ = io.shutdown().await;
    let mut buf = [0u8; 1024];
    let mut total = 0usize;
    while let Ok(n) = io.read(&mut buf).await {
        total += n;
        if n == 0 || total > 64 * 1024 {
            break;
        }
    }
}

/// The total cap in force: `configured`, lowered to the descriptor limit minus a reserve
/// (a tenth of it, at least 128) for the listener, Redis, RabbitMQ and `/healthz`.
/// `configured == 0` (no cap) still gets the descriptor bound.
pub fn effective_max_connections(configured: usize, fd_limit: Option<u64>) -> usize {
    let Some(fds) = fd_limit else {
        return configured;
    };
    let fds = usize::try_from(fds).unwrap_or(usize::MAX);
    let reserve = (fds / 10).max(128);
    let bound = fds.saturating_sub(reserve).max(1);
    if configured == 0 {
        bound
    } else {
        configured.min(bound)
    }
}

/// The soft `RLIMIT_NOFILE` of this process, if it has one.
pub fn fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
        let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
        if r != 0 || rl.rlim_cur == libc::RLIM_INFINITY {
            return None;
        }
        Some(rl.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the binary does this at start: the
/// usual soft default of 1,024 would cap a hub server at a few hundred clients). Returns
/// the soft limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in `fd_limit`; setrlimit only reads the struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
                return None;
            }
            if rl.rlim_cur < rl.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: rl.rlim_max,
                    rlim_max: rl.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                    tracing::warn!("could not raise RLIMIT_NOFILE to the hard limit");
                }
            }
        }
    }
    fd_limit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn limits(per_address: usize, total: usize) -> LimitsConfig {
        LimitsConfig {
            max_connections: total,
            max_connections_per_address: per_address,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(AddressKey::of(a.into()), AddressKey::of(b.into()));
        assert_ne!(AddressKey::of(a.into()), AddressKey::of(c.into()));
        let mapped: Ipv6Addr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            AddressKey::of(mapped.into()),
            AddressKey::of(Ipv4Addr::new(10, 0, 0, 1).into())
        );
    }

    #[test]
    fn per_address_and_total_caps_and_release() {
        let adm = Admission::new(limits(2, 3), None);
        let one: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let two: IpAddr = Ipv4Addr::new(10, 0, 0, 2).into();
        let a = adm.admit(one).unwrap();
        let _b = adm.admit(one).unwrap();
        assert_eq!(adm.admit(one).unwrap_err(), Refusal::Address);
        let _c = adm.admit(two).unwrap();
        // Nothing registered as fresh (all have sent requests): refused.
        assert_eq!(adm.admit(two).unwrap_err(), Refusal::Total);
        drop(a);
        assert_eq!(adm.open_connections(), 2);
        let _d = adm.admit(one).unwrap();
        assert_eq!(adm.admit(one).unwrap_err(), Refusal::Total);
    }

    #[test]
    fn at_the_total_cap_the_oldest_connection_without_a_request_is_evicted() {
        let adm = Admission::new(limits(0, 2), None);
        let ip: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let _a = adm.admit(ip).unwrap();
        let a_fresh = adm.register_fresh();
        let _b = adm.admit(ip).unwrap();
        let b_fresh = adm.register_fresh();
        a_fresh.served();
        let _c = adm.admit(ip).unwrap();
        assert!(b_fresh.evict.is_cancelled());
        assert!(!a_fresh.evict.is_cancelled());
        let c_fresh = adm.register_fresh();
        c_fresh.served();
        assert_eq!(adm.admit(ip).unwrap_err(), Refusal::Total);
    }

    #[test]
    fn the_address_entry_goes_with_its_last_connection() {
        let adm = Admission::new(limits(5, 0), None);
        let ip: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let s = adm.admit(ip).unwrap();
        assert_eq!(adm.per_address.len(), 1);
        drop(s);
        assert_eq!(adm.per_address.len(), 0);
    }

    #[test]
    fn the_total_cap_stays_below_the_descriptor_limit() {
        assert_eq!(effective_max_connections(100_000, Some(20_000)), 18_000);
        assert_eq!(effective_max_connections(5_000, Some(20_000)), 5_000);
        assert_eq!(effective_max_connections(100_000, Some(1_024)), 896);
        assert_eq!(effective_max_connections(0, Some(1_024)), 896);
        assert_eq!(effective_max_connections(100_000, None), 100_000);
    }

    #[test]
    fn the_connect_rate_is_a_token_bucket() {
        let adm = Admission::new(
            LimitsConfig {
                connect_rate_per_address: 2,
                connect_burst_per_address: 3,
                ..LimitsConfig::default()
            },
            None,
        );
        let ip: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let t0 = Instant::now();
        for _ in 0..3 {
            adm.allow_connect_at(ip, t0).unwrap();
        }
        assert_eq!(adm.allow_connect_at(ip, t0), Err(Duration::from_secs(1)));
        let t1 = t0 + Duration::from_millis(500);
        adm.allow_connect_at(ip, t1).unwrap();
        assert!(adm.allow_connect_at(ip, t1).is_err());
        // Another address has its own bucket.
        adm.allow_connect_at(Ipv4Addr::new(10, 0, 0, 2).into(), t1)
            .unwrap();
        adm.prune_at(t1);
        assert_eq!(adm.buckets.len(), 2);
        adm.prune_at(t1 + Duration::from_secs(10));
        assert!(adm.buckets.is_empty());
    }
}
