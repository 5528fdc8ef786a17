//! The detachable link between a session task and whatever physical transport currently
//! serves it (ASP.NET's duplex pipe between `HttpConnectionContext` and its transports).
//!
//! A session does not own a socket. It reads from a [`LinkSource`] (a bounded queue that a
//! WebSocket reader or the POST handler feeds) and writes to a [`LinkSink`] (the bounded
//! [`Wire`], which a WebSocket writer, an SSE response body, or a long poll drains). The
//! session therefore runs as its own task, independent of any one HTTP request: polls come
//! and go, and a later transport swap (stateful reconnect) only has to attach a new drainer
//! and feeder to the same [`Link`].
//!
//! Bounds: the inbound queue holds [`INBOUND_CHUNKS`] chunks (feeders wait, which is
//! back-pressure on their own request or socket only); the wire holds at most
//! [`WIRE_MAX_BYTES`] (the session waits, under its send timeout, when no drainer keeps up).
//! The end of the transport is a [`CancellationToken`] with a reason, so signalling it never
//! waits.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{FrameSink, FrameSource, TransportError};
use crate::protocol::TransferFormat;

/// Inbound chunks buffered between a transport and its session.
pub const INBOUND_CHUNKS: usize = 16;

/// Most bytes waiting on the wire for a drainer (ASP.NET's `ApplicationMaxBufferSize` is
/// 64 KiB; a unit may be up to the session's 64 KiB batch, so allow two of them). A unit is
/// always accepted onto an empty wire, whatever its size.
pub const WIRE_MAX_BYTES: usize = 128 * 1024;

/// What a drainer gets from the wire.
#[derive(Debug, PartialEq, Eq)]
pub enum WireItem {
    /// One transport unit (whole hub messages only) and its format.
    Unit(Bytes, TransferFormat),
    /// The session ended the transport (WebSocket close code and reason); nothing follows.
    End(u16, String),
}

#[derive(Debug, Default)]
struct WireState {
    units: VecDeque<(Bytes, TransferFormat)>,
    bytes: usize,
    end: Option<(u16, String)>,
    /// Set once a drainer has taken the end marker.
    ended: bool,
}

/// The outbound queue between a session and its current physical transport.
#[derive(Debug)]
pub struct Wire {
    state: Mutex<WireState>,
    readable: Notify,
    writable: Notify,
    max_bytes: usize,
}

impl Wire {
    /// An empty wire holding at most `max_bytes`.
    pub fn new(max_bytes: usize) -> Wire {
        Wire {
            state: Mutex::new(WireState::default()),
            readable: Notify::new(),
            writable: Notify::new(),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WireState> {
        // A poisoned lock only means a panic elsewhere mid-push; the state is still valid.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a unit, waiting while the wire is full. Fails once the wire has ended or the
    /// transport is gone (`gone` fired).
    pub async fn push(
        &self,
        data: Bytes,
        format: TransferFormat,
        gone: &CancellationToken,
    ) -> Result<(), TransportError> {
        loop {
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            {
                let mut st = self.lock();
                if st.end.is_some() || st.ended {
                    return Err(TransportError::Closed("transport ended".into()));
                }
                if st.units.is_empty() || st.bytes + data.len() <= self.max_bytes {
                    st.bytes += data.len();
                    st.units.push_back((data, format));
                    drop(st);
                    self.readable.notify_waiters();
                    return Ok(());
                }
            }
            tokio::select! {
                _ = &mut writable => {}
                _ = gone.cancelled() => return Err(TransportError::Closed("transport gone".into())),
            }
        }
    }

    /// Marks the end of the stream after what is queued (the first end wins).
    pub fn end(&self, code: u16, reason: &str) {
        let mut st = self.lock();
        if st.end.is_none() && !st.ended {
            st.end = Some((code, reason.to_string()));
        }
        drop(st);
        self.readable.notify_waiters();
        self.writable.notify_waiters();
    }

    /// Whether the end marker was queued or taken.
    pub fn is_ended(&self) -> bool {
        let st = self.lock();
        st.end.is_some() || st.ended
    }

    /// Takes the next unit (or the end marker), waiting until there is one.
    pub async fn next(&self) -> WireItem {
        loop {
            let readable = self.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            if let Some(item) = self.try_next() {
                return item;
            }
            readable.await;
        }
    }

    /// Non-waiting form of [`Wire::next`]; after the end marker it keeps answering `End`.
    pub fn try_next(&self) -> Option<WireItem> {
        let mut st = self.lock();
        if let Some((data, format)) = st.units.pop_front() {
            st.bytes -= data.len();
            if st.units.is_empty() {
                // An idle connection holds no queue storage between its keep-alive pings
                // (a connection that keeps up never has more than a unit or two queued).
                st.units = VecDeque::new();
            }
            drop(st);
            self.writable.notify_waiters();
            return Some(WireItem::Unit(data, format));
        }
        if let Some((code, reason)) = st.end.take() {
            st.ended = true;
            return Some(WireItem::End(code, reason));
        }
        if st.ended {
            return Some(WireItem::End(1000, String::new()));
        }
        None
    }

    /// Takes everything queued as one body (a long-poll response), waiting until there is
    /// something. `None` means the wire ended with nothing left: the connection is over.
    pub async fn take_all(&self) -> Option<Bytes> {
        loop {
            let readable = self.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            {
                let mut st = self.lock();
                if !st.units.is_empty() {
                    let mut out = BytesMut::with_capacity(st.bytes);
                    for (u, _) in std::mem::take(&mut st.units) {
                        out.extend_from_slice(&u);
                    }
                    st.bytes = 0;
                    drop(st);
                    self.writable.notify_waiters();
                    return Some(out.freeze());
                }
                if st.end.is_some() || st.ended {
                    st.end = None;
                    st.ended = true;
                    return None;
                }
            }
            readable.await;
        }
    }

    /// Queued units and bytes.
    pub fn depth(&self) -> (usize, usize) {
        let st = self.lock();
        (st.units.len(), st.bytes)
    }
}

/// The inbound queue and the end of the transport: one allocation shared by a session's
/// [`Link`] handles, its [`LinkSource`] and its [`LinkSink`]s.
#[derive(Debug, Default)]
struct Shared {
    inbox: Mutex<Inbox>,
    /// Woken when a chunk is queued, the last feeder is gone or the transport is gone.
    readable: Notify,
    /// Woken when a chunk is taken, the session stops reading or the transport is gone.
    writable: Notify,
    /// Why the transport went away (`None`: a clean end).
    reason: Mutex<Option<String>>,
    token: CancellationToken,
}

/// Chunks fed to the session, at most [`INBOUND_CHUNKS`]. A hand-rolled queue rather than a
/// `tokio::sync::mpsc` channel: that one allocates a 32-slot block and a cache-padded
/// channel up front, ~1.6 KiB for every idle connection (the idle memory budget in
/// `bench/README.md`); this one holds nothing while empty.
#[derive(Debug, Default)]
struct Inbox {
    chunks: VecDeque<Result<Bytes, TransportError>>,
    /// Live [`Link`] handles: when none is left, the transport ended.
    feeders: usize,
    /// The session dropped its [`LinkSource`]: feeding fails.
    closed: bool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Queues `item`, waiting for room. Fails when the session no longer reads or the
    /// transport is gone.
    async fn feed(&self, item: Result<Bytes, TransportError>) -> Result<(), TransportError> {
        loop {
            let writable = self.writable.notified();
            tokio::pin!(writable);
            writable.as_mut().enable();
            {
                let mut inbox = self.lock();
                if inbox.closed {
                    return Err(TransportError::Closed("session ended".into()));
                }
                if self.token.is_cancelled() {
                    return Err(TransportError::Closed("transport gone".into()));
                }
                if inbox.chunks.len() < INBOUND_CHUNKS {
                    inbox.chunks.push_back(item);
                    drop(inbox);
                    self.readable.notify_waiters();
                    return Ok(());
                }
            }
            // `transport_gone` wakes this too: one waiter, not a second future for the token.
            writable.await;
        }
    }
}

/// Both directions of one session's transport, shared by the session and its transports.
#[derive(Debug)]
pub struct Link {
    /// What the session writes; drained by the transport.
    pub wire: Arc<Wire>,
    shared: Arc<Shared>,
}

impl Clone for Link {
    fn clone(&self) -> Link {
        self.shared.lock().feeders += 1;
        Link {
            wire: self.wire.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let mut inbox = self.shared.lock();
        inbox.feeders = inbox.feeders.saturating_sub(1);
        let last = inbox.feeders == 0;
        drop(inbox);
        if last {
            // Every feeder is gone: the session's reader sees the end.
            self.shared.readable.notify_waiters();
        }
    }
}

impl Link {
    /// A new link, and the source half the session reads from.
    pub fn new() -> (Link, LinkSource) {
        let shared = Arc::new(Shared::default());
        shared.lock().feeders = 1;
        let link = Link {
            wire: Arc::new(Wire::new(WIRE_MAX_BYTES)),
            shared: shared.clone(),
        };
        (link, LinkSource { shared })
    }

    /// The sink half the session writes to.
    pub fn sink(&self) -> LinkSink {
        LinkSink {
            wire: self.wire.clone(),
            gone: self.shared.clone(),
        }
    }

    /// Tells the session its transport went away: `None` for a clean end (the client closed
    /// or deleted the connection), `Some(reason)` for a failure. The first call wins.
    pub fn transport_gone(&self, reason: Option<String>) {
        {
            let mut r = self.shared.reason.lock().unwrap_or_else(|p| p.into_inner());
            if self.shared.token.is_cancelled() {
                return;
            }
            *r = reason;
        }
        self.shared.token.cancel();
        self.shared.readable.notify_waiters();
        self.shared.writable.notify_waiters();
    }

    /// Whether [`Link::transport_gone`] was called.
    pub fn is_gone(&self) -> bool {
        self.shared.token.is_cancelled()
    }

    /// Fires when the transport is gone.
    pub fn gone_token(&self) -> CancellationToken {
        self.shared.token.clone()
    }

    /// Hands a chunk of client bytes to the session, waiting for room. Fails when the
    /// session no longer reads (it ended) or the transport is gone.
    pub fn feed(&self, chunk: Bytes) -> impl Future<Output = Result<(), TransportError>> + '_ {
        // Not an `async fn`: that would hold `chunk` once more beside the queue's future.
        self.shared.feed(Ok(chunk))
    }

    /// Hands a transport error to the session (a frame over the size limit: the session
    /// answers with a Close naming the limit), waiting for room like [`Link::feed`].
    pub fn feed_error(
        &self,
        error: TransportError,
    ) -> impl Future<Output = Result<(), TransportError>> + '_ {
        self.shared.feed(Err(error))
    }
}

/// The session's reading half.
#[derive(Debug)]
pub struct LinkSource {
    shared: Arc<Shared>,
}

impl Drop for LinkSource {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.writable.notify_waiters();
    }
}

impl FrameSource for LinkSource {
    async fn recv(&mut self) -> Option<Result<Bytes, TransportError>> {
        loop {
            let readable = self.shared.readable.notified();
            tokio::pin!(readable);
            readable.as_mut().enable();
            {
                // Data already fed is processed before the end of the transport is noticed.
                let mut inbox = self.shared.lock();
                if let Some(item) = inbox.chunks.pop_front() {
                    if inbox.chunks.is_empty() {
                        // Idle connections hold no queue storage (clients send rarely).
                        inbox.chunks = VecDeque::new();
                    }
                    drop(inbox);
                    self.shared.writable.notify_waiters();
                    return Some(item);
                }
                // Every feeder is gone: the transport ended.
                if inbox.feeders == 0 {
                    return self.gone_result();
                }
            }
            if self.shared.token.is_cancelled() {
                return self.gone_result();
            }
            // `transport_gone` wakes this too.
            readable.await;
        }
    }
}

impl LinkSource {
    fn gone_result(&self) -> Option<Result<Bytes, TransportError>> {
        self.shared.reason().map(|r| Err(TransportError::Closed(r)))
    }
}

/// The session's writing half.
#[derive(Debug, Clone)]
pub struct LinkSink {
    wire: Arc<Wire>,
    gone: Arc<Shared>,
}

impl FrameSink for LinkSink {
    async fn send(&mut self, data: Bytes, format: TransferFormat) -> Result<(), TransportError> {
        self.wire
            .push(data, format, &self.gone.token)
            .await
            .map_err(|e| {
                // A write that failed because the transport went away fails with the
                // transport's reason (a socket write timeout, say), not a generic one.
                let reason = self.gone.reason.lock().unwrap_or_else(|p| p.into_inner());
                match reason.as_ref() {
                    Some(r) if self.gone.token.is_cancelled() => TransportError::Closed(r.clone()),
                    _ => e,
                }
            })
    }

    async fn close(&mut self, code: u16, reason: &str) {
        self.wire.end(code, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wire_keeps_order_and_ends_after_queued_units() {
        let w = Wire::new(10);
        let gone = CancellationToken::new();
        w.push(Bytes::from_static(b"ab"), TransferFormat::Text, &gone)
            .await
            .unwrap();
        w.push(Bytes::from_static(b"cd"), TransferFormat::Text, &gone)
            .await
            .unwrap();
        w.end(1000, "");
        assert_eq!(w.take_all().await.as_deref(), Some(&b"abcd"[..]));
        assert_eq!(w.take_all().await, None);
        assert!(w
            .push(Bytes::from_static(b"x"), TransferFormat::Text, &gone)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn full_wire_waits_for_a_drainer_or_gone() {
        let w = Arc::new(Wire::new(4));
        let gone = CancellationToken::new();
        // An oversize unit is accepted on an empty wire.
        w.push(Bytes::from_static(b"12345"), TransferFormat::Binary, &gone)
            .await
            .unwrap();
        let w2 = w.clone();
        let g2 = gone.clone();
        let pusher = tokio::spawn(async move {
            w2.push(Bytes::from_static(b"6"), TransferFormat::Binary, &g2)
                .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!pusher.is_finished());
        assert!(matches!(w.next().await, WireItem::Unit(b, _) if b.len() == 5));
        pusher.await.unwrap().unwrap();
        let w3 = w.clone();
        let g3 = gone.clone();
        w.push(Bytes::from_static(b"789"), TransferFormat::Binary, &gone)
            .await
            .unwrap();
        let blocked = tokio::spawn(async move {
            w3.push(Bytes::from_static(b"abc"), TransferFormat::Binary, &g3)
                .await
        });
        gone.cancel();
        assert!(blocked.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn inbound_queue_is_bounded_and_ends_with_its_feeders_or_reader() {
        let (link, mut source) = Link::new();
        for i in 0..INBOUND_CHUNKS {
            link.feed(Bytes::from(vec![i as u8])).await.unwrap();
        }
        // Full: the next feed waits until the session takes a chunk.
        let l2 = link.clone();
        let blocked = tokio::spawn(async move { l2.feed(Bytes::from_static(b"last")).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!blocked.is_finished());
        assert_eq!(source.recv().await.unwrap().unwrap()[..], [0]);
        tokio::time::timeout(std::time::Duration::from_secs(5), blocked)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for i in 1..INBOUND_CHUNKS {
            assert_eq!(source.recv().await.unwrap().unwrap()[..], [i as u8]);
        }
        assert_eq!(&source.recv().await.unwrap().unwrap()[..], b"last");
        // A feeder blocked on a full queue is released when the transport goes.
        for _ in 0..INBOUND_CHUNKS {
            link.feed(Bytes::from_static(b"x")).await.unwrap();
        }
        let l3 = link.clone();
        let blocked = tokio::spawn(async move { l3.feed(Bytes::from_static(b"y")).await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        link.transport_gone(Some("gone".into()));
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), blocked)
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_err());
        // The session stopped reading: feeding fails at once.
        let (link, source) = Link::new();
        drop(source);
        assert!(link.feed(Bytes::from_static(b"z")).await.is_err());
        // Every feeder gone: the session reads a clean end.
        let (link, mut source) = Link::new();
        let l2 = link.clone();
        let reader = tokio::spawn(async move { source.recv().await.is_none() });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(link);
        assert!(!reader.is_finished());
        drop(l2);
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(5), reader)
                .await
                .unwrap()
                .unwrap()
        );
    }

    #[tokio::test]
    async fn source_delivers_fed_data_before_gone() {
        let (link, mut source) = Link::new();
        link.feed(Bytes::from_static(b"hi")).await.unwrap();
        link.transport_gone(Some("boom".into()));
        assert_eq!(
            source.recv().await.unwrap().unwrap(),
            Bytes::from_static(b"hi")
        );
        assert!(matches!(source.recv().await, Some(Err(TransportError::Closed(r))) if r == "boom"));
        let (link, mut source) = Link::new();
        link.transport_gone(None);
        assert!(source.recv().await.is_none());
    }
}
