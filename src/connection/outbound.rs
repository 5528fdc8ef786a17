//! The per-connection outbound queue: bounded by message count and by bytes, with an
//! explicit slow-consumer policy.
//!
//! Producers (hub fan-out, backplane dispatch workers, the connection's own invocation
//! replies) call [`Outbound::push`], which never waits: a shared path must never be stalled by
//! one slow socket. The connection's session task is the only consumer; it takes everything
//! queued in one [`Outbound::next`] call and writes it as one transport frame.
//!
//! A `Mutex<VecDeque>` plus a `Notify` rather than an mpsc channel: it lets us account bytes
//! exactly, costs a few dozen bytes per idle connection (a channel preallocates a block), and
//! the critical section is a push or a swap.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// What to do when a connection's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowConsumerPolicy {
    /// Close the connection with a reason (`allowReconnect: true`), as Centrifugo's
    /// DisconnectSlow does. The default: a client that cannot keep up gets a clean restart
    /// instead of silently missing messages.
    #[default]
    Disconnect,
    /// Drop the new message and keep the connection (count it). For feeds where newer state
    /// supersedes older state.
    DropNewest,
}

/// Queue bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundLimits {
    /// Most messages queued at once.
    pub max_messages: usize,
    /// Most bytes queued at once (Centrifugo's `client_queue_max_size` is 1 MiB).
    pub max_bytes: usize,
}

impl Default for OutboundLimits {
    fn default() -> Self {
        OutboundLimits {
            max_messages: 4096,
            max_bytes: 1024 * 1024,
        }
    }
}

/// Why a push did not queue the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The queue is full; the slow-consumer policy was applied.
    #[error("outbound queue full")]
    Full,
    /// The connection is closing or closed.
    #[error("connection closed")]
    Closed,
}

/// A request to end the connection, carried to the session task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// Error text for the Close message (`None`: normal close).
    pub error: Option<String>,
    /// Whether the client may reconnect.
    pub allow_reconnect: bool,
}

/// What the session task gets from [`Outbound::next`].
#[derive(Debug)]
pub enum Outgoing {
    /// Framed messages to write, in order, as one transport frame.
    Frames(Vec<Bytes>),
    /// Write a Close message with this content, then end the connection.
    Close(CloseRequest),
}

#[derive(Debug, Default)]
struct State {
    items: VecDeque<Bytes>,
    bytes: usize,
    close: Option<CloseRequest>,
    /// Set once `next` has returned the close request: nothing more is accepted.
    closed: bool,
}

/// The queue itself.
#[derive(Debug)]
pub struct Outbound {
    state: Mutex<State>,
    notify: Notify,
    /// Woken when the session drains the queue (producers pacing themselves wait on it).
    space: Notify,
    limits: OutboundLimits,
    policy: SlowConsumerPolicy,
}

/// The Close reason sent to a connection that could not keep up.
pub const SLOW_CONSUMER_REASON: &str =
    "Connection closed with an error. Slow consumer: outbound queue full.";

impl Outbound {
    /// An empty queue.
    pub fn new(limits: OutboundLimits, policy: SlowConsumerPolicy) -> Outbound {
        Outbound {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            space: Notify::new(),
            limits,
            policy,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-push; the queue state is
        // still a valid VecDeque, so keep going rather than take the process down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues one framed message without waiting.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let mut st = self.lock();
        if st.close.is_some() || st.closed {
            return Err(PushError::Closed);
        }
        if st.items.len() >= self.limits.max_messages
            || st.bytes + frame.len() > self.limits.max_bytes
        {
            if self.policy == SlowConsumerPolicy::Disconnect {
                st.items.clear();
                st.bytes = 0;
                st.close = Some(CloseRequest {
                    error: Some(SLOW_CONSUMER_REASON.to_string()),
                    allow_reconnect: true,
                });
                drop(st);
                self.notify.notify_one();
            }
            return Err(PushError::Full);
        }
        st.bytes += frame.len();
        st.items.push_back(frame);
        drop(st);
        self.notify.notify_one();
        Ok(())
    }

    /// Asks the session to send Close and end. Already queued messages are written first;
    /// the first close request wins.
    pub fn close(&self, request: CloseRequest) {
        let mut st = self.lock();
        if st.close.is_none() && !st.closed {
            st.close = Some(request);
        }
        drop(st);
        self.notify.notify_one();
    }

    /// Whether the connection is closing.
    pub fn is_closing(&self) -> bool {
        let st = self.lock();
        st.close.is_some() || st.closed
    }

    /// Number of queued messages and bytes.
    pub fn depth(&self) -> (usize, usize) {
        let st = self.lock();
        (st.items.len(), st.bytes)
    }

    /// Waits until the queue is at most half full (or closing). For producers that belong to
    /// this connection alone (its own streams), which may wait; shared paths never call this.
    pub async fn wait_for_space(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.close.is_some()
                    || st.closed
                    || (st.items.len() * 2 <= self.limits.max_messages
                        && st.bytes * 2 <= self.limits.max_bytes)
                {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Waits until a close is requested and returns it, leaving queued frames in place. The
    /// session waits on this instead of [`Outbound::next`] while it may not drain (a stateful
    /// connection without a transport, or with a full replay buffer): a close request (the
    /// slow-consumer policy, an app abort) must still end the connection.
    pub async fn closing(&self) -> CloseRequest {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if let Some(req) = st.close.take() {
                    st.closed = true;
                    return req;
                }
            }
            notified.await;
        }
    }

    /// Takes what is queued, waiting until there is something. Frames come before a
    /// pending close, so a Completion queued before a Close still reaches the client.
    pub async fn next(&self, max_batch_bytes: usize) -> Outgoing {
        self.next_limited(max_batch_bytes, usize::MAX).await
    }

    /// [`Outbound::next`] taking at most `max_frames` frames (at least one).
    pub async fn next_limited(&self, max_batch_bytes: usize, max_frames: usize) -> Outgoing {
        loop {
            if let Some(out) = self.try_next_limited(max_batch_bytes, max_frames) {
                return out;
            }
            self.notify.notified().await;
        }
    }

    /// Non-waiting form of [`Outbound::next`].
    pub fn try_next(&self, max_batch_bytes: usize) -> Option<Outgoing> {
        self.try_next_limited(max_batch_bytes, usize::MAX)
    }

    /// Non-waiting form of [`Outbound::next_limited`].
    pub fn try_next_limited(&self, max_batch_bytes: usize, max_frames: usize) -> Option<Outgoing> {
        let mut st = self.lock();
        if !st.items.is_empty() {
            let mut batch = Vec::new();
            let mut size = 0;
            while let Some(front) = st.items.front() {
                if !batch.is_empty()
                    && (size + front.len() > max_batch_bytes || batch.len() >= max_frames)
                {
                    break;
                }
                size += front.len();
                if let Some(f) = st.items.pop_front() {
                    batch.push(f);
                }
            }
            st.bytes -= size;
            drop(st);
            self.space.notify_waiters();
            return Some(Outgoing::Frames(batch));
        }
        if let Some(req) = st.close.take() {
            st.closed = true;
            return Some(Outgoing::Close(req));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(max_messages: usize, max_bytes: usize, policy: SlowConsumerPolicy) -> Outbound {
        Outbound::new(
            OutboundLimits {
                max_messages,
                max_bytes,
            },
            policy,
        )
    }

    #[test]
    fn batches_in_order_up_to_the_batch_size() {
        let o = q(10, 100, SlowConsumerPolicy::Disconnect);
        for i in 0..5u8 {
            o.push(Bytes::from(vec![i; 10])).unwrap();
        }
        match o.try_next(25).unwrap() {
            Outgoing::Frames(f) => assert_eq!(f.len(), 2),
            other => panic!("{other:?}"),
        }
        match o.try_next(1000).unwrap() {
            Outgoing::Frames(f) => {
                assert_eq!(f.iter().map(|b| b[0]).collect::<Vec<_>>(), vec![2, 3, 4])
            }
            other => panic!("{other:?}"),
        }
        assert!(o.try_next(1000).is_none());
        assert_eq!(o.depth(), (0, 0));
    }

    #[test]
    fn full_queue_disconnects_slow_consumer() {
        let o = q(2, 1000, SlowConsumerPolicy::Disconnect);
        o.push(Bytes::from_static(b"a")).unwrap();
        o.push(Bytes::from_static(b"b")).unwrap();
        assert_eq!(o.push(Bytes::from_static(b"c")), Err(PushError::Full));
        match o.try_next(1000).unwrap() {
            Outgoing::Close(c) => {
                assert!(c.allow_reconnect);
                assert_eq!(c.error.as_deref(), Some(SLOW_CONSUMER_REASON));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(o.push(Bytes::from_static(b"d")), Err(PushError::Closed));
    }

    #[test]
    fn byte_bound_with_drop_newest_keeps_connection() {
        let o = q(100, 10, SlowConsumerPolicy::DropNewest);
        o.push(Bytes::from(vec![0; 8])).unwrap();
        assert_eq!(o.push(Bytes::from(vec![0; 8])), Err(PushError::Full));
        assert!(!o.is_closing());
        assert!(matches!(o.try_next(100), Some(Outgoing::Frames(f)) if f.len() == 1));
    }

    #[test]
    fn frames_before_close() {
        let o = q(10, 100, SlowConsumerPolicy::Disconnect);
        o.push(Bytes::from_static(b"x")).unwrap();
        o.close(CloseRequest {
            error: None,
            allow_reconnect: false,
        });
        assert!(matches!(o.try_next(100), Some(Outgoing::Frames(_))));
        assert!(matches!(o.try_next(100), Some(Outgoing::Close(_))));
    }
}
