//! The table of connections with a live transport on this node (ASP.NET's
//! `HttpConnectionManager`): which transport each one is bound to, its [`Link`], the user it
//! belongs to, and the long-polling state (the current poll, when the last one ended).
//!
//! Connection tokens are stateless, so a token alone says nothing about what is running; this
//! table is what binds a token to one transport once used (a poll on a WebSocket connection
//! is refused), finds the session a POST feeds, and lets a newer poll cancel an older one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use crate::connection::TransportKind;
use crate::ids::ConnectionId;
use crate::transport::link::{Link, LinkSource};

/// One connection's HTTP-level state.
#[derive(Debug)]
pub struct HttpConnection {
    /// The connection id.
    pub id: ConnectionId,
    /// The transport the token is bound to (unset while only POSTs have arrived: a client
    /// may send its handshake before its first poll, as signalrcore does).
    transport: std::sync::OnceLock<TransportKind>,
    /// The session's reading half until a transport binds and the session starts.
    pending: Mutex<Option<LinkSource>>,
    /// The user of the request that started it ("" when anonymous).
    pub user: String,
    /// Negotiate v0: the `id=` value is the connection id itself.
    pub v0: bool,
    /// The session's link.
    pub link: Link,
    /// Serialises POST sends, as ASP.NET's `WriteLock` does (concurrent sends queue).
    pub send_lock: tokio::sync::Mutex<()>,
    poll: Mutex<PollState>,
    next_poll: AtomicU64,
}

#[derive(Debug)]
struct PollState {
    /// The running poll: its number and the token that cancels it.
    active: Option<(u64, CancellationToken)>,
    /// When the last poll ended (or the connection started).
    last_seen: Instant,
}

/// A poll admitted by [`HttpConnection::begin_poll`].
#[derive(Debug)]
pub struct PollTicket {
    /// This poll's number.
    pub number: u64,
    /// Fires when a newer poll supersedes this one.
    pub cancelled: CancellationToken,
}

impl HttpConnection {
    /// A new entry.
    pub fn new(
        id: ConnectionId,
        user: String,
        v0: bool,
        link: Link,
        source: LinkSource,
    ) -> HttpConnection {
        HttpConnection {
            id,
            transport: std::sync::OnceLock::new(),
            pending: Mutex::new(Some(source)),
            user,
            v0,
            link,
            send_lock: tokio::sync::Mutex::new(()),
            poll: Mutex::new(PollState {
                active: None,
                last_seen: Instant::now(),
            }),
            next_poll: AtomicU64::new(1),
        }
    }

    /// The transport, once bound.
    pub fn transport(&self) -> Option<TransportKind> {
        self.transport.get().copied()
    }

    /// Binds the connection to `kind` and hands out the session's reading half; `None` if
    /// a transport was already bound.
    pub fn bind(&self, kind: TransportKind) -> Option<LinkSource> {
        self.transport.set(kind).ok()?;
        self.touch();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Restarts the inactivity clock.
    pub fn touch(&self) {
        self.poll_state().last_seen = Instant::now();
    }

    fn poll_state(&self) -> std::sync::MutexGuard<'_, PollState> {
        self.poll.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a poll, cancelling the one still running (it answers 204).
    pub fn begin_poll(&self) -> PollTicket {
        let number = self.next_poll.fetch_add(1, Ordering::Relaxed);
        let cancelled = CancellationToken::new();
        let previous = self
            .poll_state()
            .active
            .replace((number, cancelled.clone()));
        if let Some((_, old)) = previous {
            old.cancel();
        }
        PollTicket { number, cancelled }
    }

    /// Ends a poll (if it is still the current one) and restarts the inactivity clock.
    pub fn end_poll(&self, number: u64) {
        let mut st = self.poll_state();
        if st.active.as_ref().is_some_and(|(n, _)| *n == number) {
            st.active = None;
        }
        st.last_seen = Instant::now();
    }

    /// How long no poll has been running (`None` while one is).
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        let st = self.poll_state();
        match st.active {
            Some(_) => None,
            None => Some(st.last_seen.elapsed()),
        }
    }
}

/// All connections with a transport on this node.
#[derive(Debug, Default)]
pub struct Connections {
    map: DashMap<ConnectionId, Arc<HttpConnection>>,
}

impl Connections {
    /// An empty table.
    pub fn new() -> Connections {
        Connections::default()
    }

    /// Looks a connection up.
    pub fn get(&self, id: &ConnectionId) -> Option<Arc<HttpConnection>> {
        self.map.get(id).map(|e| e.value().clone())
    }

    /// Adds `conn` unless its id is already present (then returns the existing entry).
    pub fn insert(&self, conn: Arc<HttpConnection>) -> Result<(), Arc<HttpConnection>> {
        match self.map.entry(conn.id.clone()) {
            dashmap::mapref::entry::Entry::Occupied(e) => Err(e.get().clone()),
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(conn);
                Ok(())
            }
        }
    }

    /// Removes `conn` (only that entry, not a newer one with the same id).
    pub fn remove(&self, conn: &Arc<HttpConnection>) {
        self.map.remove_if(&conn.id, |_, v| Arc::ptr_eq(v, conn));
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_poll_cancels_older_and_idle_clock_runs_between_polls() {
        let (link, src) = Link::new();
        let c = HttpConnection::new(ConnectionId::random(), String::new(), false, link, src);
        assert!(c.transport().is_none());
        assert!(c.bind(TransportKind::LongPolling).is_some());
        assert!(c.bind(TransportKind::LongPolling).is_none());
        let first = c.begin_poll();
        assert!(c.idle_for().is_none());
        let second = c.begin_poll();
        assert!(first.cancelled.is_cancelled());
        assert!(!second.cancelled.is_cancelled());
        c.end_poll(first.number);
        assert!(c.idle_for().is_none(), "the newer poll is still running");
        c.end_poll(second.number);
        assert!(c.idle_for().is_some());
    }
}
