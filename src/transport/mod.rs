//! Moves frames between a socket and a session. Knows nothing about hubs or users.
//!
//! A session reads from a [`FrameSource`] (whole transport messages: a WebSocket message, a
//! POST body) and writes to a [`FrameSink`]. Each `send` is one transport unit (one
//! WebSocket message, one SSE event, or part of one poll response) holding only whole hub
//! messages. Sessions are detached from sockets by a [`link::Link`]: the session reads the
//! link's inbound channel and writes its wire; [`websocket::pump`], the SSE response body and
//! long polls (in `http/`) feed and drain it.

pub mod link;
pub mod websocket;

use std::future::Future;

use bytes::Bytes;

use crate::protocol::TransferFormat;

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer went away or the socket failed.
    #[error("transport closed: {0}")]
    Closed(String),
    /// A write did not finish within the send timeout.
    #[error("send timed out")]
    SendTimeout,
    /// The peer sent a frame larger than the limit.
    #[error("frame too large")]
    TooLarge,
}

impl TransportError {
    /// Whether the transport ended because a write did not finish in time: the session's
    /// own send timeout, or the socket writer's (reported as the reason the transport is
    /// gone). A slow consumer, as far as the metrics are concerned.
    pub fn is_send_timeout(&self) -> bool {
        match self {
            TransportError::SendTimeout => true,
            TransportError::Closed(reason) => reason == SEND_TIMED_OUT,
            TransportError::TooLarge => false,
        }
    }
}

/// The reason a transport writer reports when a socket write timed out
/// (`TransportError::SendTimeout`'s text).
pub const SEND_TIMED_OUT: &str = "send timed out";

/// Inbound side of a transport.
pub trait FrameSource: Send {
    /// The next chunk of bytes from the client; `None` when the client closed cleanly.
    fn recv(&mut self) -> impl Future<Output = Option<Result<Bytes, TransportError>>> + Send;
}

/// Outbound side of a transport.
pub trait FrameSink: Send {
    /// Writes one transport unit.
    fn send(
        &mut self,
        data: Bytes,
        format: TransferFormat,
    ) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Ends the transport (WebSocket close frame with `code`).
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;
}
