//! The WebSocket transport on tokio-tungstenite.
//!
//! - Read buffer 1 KiB instead of tungstenite's 128 KiB default: an idle connection would
//!   otherwise cost 128 KiB (anchors §1.8 measured 936 MB against 120 MB for 10k sockets).
//!   Clients send little (pings, small invocations), so 1 KiB reads cost nothing measurable
//!   and save 3 KiB per idle connection against 4 KiB (Centrifugo's tuned setting too).
//! - Frame and message sizes are bounded so a peer cannot make us buffer without limit.
//! - Frame types are ignored on receive (ASP.NET copies every frame's bytes into one stream);
//!   on send, JSON goes in text frames and MessagePack in binary frames.
//! - WebSocket pings are answered by tungstenite; SignalR keep-alive is the session's job.

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use std::future::Future;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::link::{Link, WireItem};
use super::{FrameSink, FrameSource, TransportError};
use crate::protocol::TransferFormat;

/// Bytes tungstenite reads from the socket at a time.
pub const READ_BUFFER_SIZE: usize = 1024;

/// The tungstenite configuration: small buffers, bounded messages.
pub fn config(max_message_size: usize) -> WebSocketConfig {
    // A WebSocket message may batch several hub messages, and the handshake can share a
    // frame with them: allow a few times the hub message limit, never unbounded.
    let max = max_message_size.saturating_mul(4).max(64 * 1024);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_SIZE)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Wraps an upgraded socket as a server-side WebSocket and splits it.
pub async fn accept<IO>(io: IO, max_message_size: usize) -> (WsSource<IO>, WsSink<IO>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws =
        WebSocketStream::from_raw_socket(io, Role::Server, Some(config(max_message_size))).await;
    let (sink, stream) = ws.split();
    (WsSource { stream }, WsSink { sink })
}

/// Reading half.
pub struct WsSource<IO> {
    stream: SplitStream<WebSocketStream<IO>>,
}

/// Writing half.
pub struct WsSink<IO> {
    sink: SplitSink<WebSocketStream<IO>, Message>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send> FrameSource for WsSource<IO> {
    async fn recv(&mut self) -> Option<Result<Bytes, TransportError>> {
        loop {
            match self.stream.next().await? {
                Ok(Message::Text(t)) => return Some(Ok(Bytes::from(t))),
                Ok(Message::Binary(b)) => return Some(Ok(b)),
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(_)) => return None,
                Err(tokio_tungstenite::tungstenite::Error::Capacity(_)) => {
                    return Some(Err(TransportError::TooLarge))
                }
                Err(e) => return Some(Err(TransportError::Closed(e.to_string()))),
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send> FrameSink for WsSink<IO> {
    async fn send(&mut self, data: Bytes, format: TransferFormat) -> Result<(), TransportError> {
        let msg = match format {
            TransferFormat::Binary => Message::Binary(data),
            TransferFormat::Text => match Utf8Bytes::try_from(data) {
                Ok(t) => Message::Text(t),
                Err(_) => return Err(TransportError::Closed("non-UTF-8 text frame".into())),
            },
        };
        self.sink
            .send(msg)
            .await
            .map_err(|e| TransportError::Closed(e.to_string()))
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from(reason.to_string()),
        };
        let _ = self.sink.send(Message::Close(Some(frame))).await;
        let _ = self.sink.close().await;
    }
}

/// How long one socket write may take before the transport counts as dead
/// (ASP.NET's `TransportSendTimeout`).
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `link` over an upgraded socket until either side ends: socket messages feed the
/// session, wire units become WebSocket messages, the wire's end marker becomes the close
/// frame. Reports the end of the socket to the session with [`Link::transport_gone`].
///
/// A combinator rather than an `async fn`: the socket and the link are moved once into the
/// accept and pump futures, not also kept as the outer future's arguments for the
/// connection's whole life (the idle memory budget in `bench/README.md`).
pub fn pump<IO>(io: IO, max_message_size: usize, link: Link) -> impl Future<Output = ()> + Send
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    accept(io, max_message_size).then(move |(source, sink)| pump_split(source, sink, link))
}

/// [`pump`] over an already accepted socket (the HTTP layer may have read a first frame to
/// decide what the socket is for; it feeds that frame to the link first).
#[allow(clippy::manual_async_fn)] // deliberately not an `async fn`, see below
pub fn pump_split<IO>(
    mut source: WsSource<IO>,
    mut sink: WsSink<IO>,
    link: Link,
) -> impl Future<Output = ()> + Send
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // An async block, not an `async fn`: the block works on its captures in place, where a
    // function would keep its arguments beside the locals they are moved into.
    async move {
        let reader = async {
            loop {
                match source.recv().await {
                    None => return None,
                    Some(Ok(bytes)) => {
                        if link.feed(bytes).await.is_err() {
                            return None;
                        }
                    }
                    Some(Err(TransportError::TooLarge)) => {
                        // The session answers with a Close naming the limit; stop reading.
                        let _ = link.feed_error(TransportError::TooLarge).await;
                        std::future::pending::<()>().await;
                    }
                    Some(Err(e)) => return Some(e.to_string()),
                }
            }
        };
        let writer = async {
            loop {
                match link.wire.next().await {
                    WireItem::Unit(data, format) => {
                        match tokio::time::timeout(WRITE_TIMEOUT, sink.send(data, format)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Some(e.to_string()),
                            Err(_) => return Some(super::SEND_TIMED_OUT.to_string()),
                        }
                    }
                    WireItem::End(code, reason) => {
                        let _ =
                            tokio::time::timeout(WRITE_TIMEOUT, sink.close(code, &reason)).await;
                        return None;
                    }
                }
            }
        };
        let gone = link.gone_token();
        let reason = tokio::select! {
            r = reader => r,
            r = writer => r,
            // The session ended the link another way (or a newer transport replaced this one).
            _ = gone.cancelled() => None,
        };
        link.transport_gone(reason);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::transport::link::Link;

    /// What the pump task of an idle WebSocket connection is made of (printed with
    /// `--nocapture`; the idle memory budget in `bench/README.md`), and a guard on it.
    #[tokio::test]
    async fn pump_parts() {
        let (a, _b) = tokio::io::duplex(64);
        let (link, _source) = Link::new();
        macro_rules! show {
            ($name:expr, $e:expr) => {{
                let f = $e;
                println!("{:>6}  {}", std::mem::size_of_val(&f), $name);
                drop(f);
            }};
        }
        show!("pump", pump(a, 1024, link.clone()));
        let (a, _b) = tokio::io::duplex(64);
        let (mut src, mut snk) = accept(a, 1024).await;
        show!("WsSource::recv", src.recv());
        show!("WsSink::send", snk.send(Bytes::new(), TransferFormat::Text));
        show!(
            "timeout(WsSink::send)",
            tokio::time::timeout(WRITE_TIMEOUT, snk.send(Bytes::new(), TransferFormat::Text))
        );
        show!("WsSink::close", snk.close(1000, ""));
        show!("Link::feed", link.feed(Bytes::new()));
        show!("Wire::next", link.wire.next());
        let pump_size = std::mem::size_of_val(&pump_split(src, snk, link.clone()));
        println!("{pump_size:>6}  pump_split");
        println!("{:>6}  Link", std::mem::size_of::<Link>());
        let (a, _b) = tokio::io::duplex(64);
        let whole = std::mem::size_of_val(&pump(a, 1024, link.clone()));
        if !cfg!(debug_assertions) {
            // Before issue 13's budget: 1,008 (pump), 960 (pump_split), 312 (Link::feed).
            assert!(whole <= 800, "the pump future grew to {whole} bytes");
            assert!(pump_size <= 800, "pump_split grew to {pump_size} bytes");
            let feed = std::mem::size_of_val(&link.feed(Bytes::new()));
            assert!(feed <= 200, "Link::feed grew to {feed} bytes");
        }
    }
}
