//! The handshake phase of a session: read the client's request under a deadline and a size
//! limit, pick the protocol, answer `{}` or an error with ASP.NET's exact texts.

use bytes::{Bytes, BytesMut};

use crate::connection::TransportKind;
use crate::hub::HubOptions;
use crate::metrics::{inc, METRICS};
use crate::protocol::handshake::{self, HandshakeError, HandshakeRequest};
use crate::protocol::{ProtocolKind, TransferFormat};
use crate::transport::{FrameSink, FrameSource};

/// Error texts, as ASP.NET's `HubConnectionContext.HandshakeAsync` words them.
pub mod texts {
    /// Timeout or oversize handshake.
    pub const CANCELED: &str = "Handshake was canceled.";
    /// Malformed request.
    pub const UNEXPECTED: &str = "An unexpected error occurred during connection handshake.";
}

/// What the request asks for, checked against what the server and transport can do.
pub fn select_protocol(
    req: &HandshakeRequest,
    transport: TransportKind,
) -> Result<ProtocolKind, String> {
    let Some(kind) = ProtocolKind::from_name(&req.protocol) else {
        return Err(format!("The protocol '{}' is not supported.", req.protocol));
    };
    if req.version > kind.version() {
        return Err(format!(
            "The server does not support version {} of the '{}' protocol.",
            req.version, req.protocol
        ));
    }
    if transport == TransportKind::ServerSentEvents
        && kind.transfer_format() == TransferFormat::Binary
    {
        return Err(format!(
            "Cannot use the '{}' protocol on the current transport. The transport does not support 'Binary' transfer format.",
            req.protocol
        ));
    }
    Ok(kind)
}

/// Runs the handshake. `Some((protocol, requested version))` on success: the request was
/// valid, and the caller sends the OK response with [`send_ok`] once the connection is
/// registered (so a client whose `start()` resolved is already subscribed on the backplane);
/// `None` if the session must end (an error response has been sent where there was one to
/// send). Bytes after the handshake stay in `inbuf`.
pub async fn perform<Src: FrameSource, Snk: FrameSink>(
    source: &mut Src,
    sink: &mut Snk,
    inbuf: &mut BytesMut,
    options: &HubOptions,
    transport: TransportKind,
) -> Option<(ProtocolKind, u32)> {
    let deadline = tokio::time::Instant::now() + options.handshake_timeout;
    let request = loop {
        match handshake::parse_request(inbuf, options.max_message_size) {
            Ok(Some(req)) => break Ok(req),
            Ok(None) => {}
            Err(HandshakeError::TooLarge { .. }) => break Err(texts::CANCELED.to_string()),
            Err(HandshakeError::Malformed(detail)) => {
                break Err(if options.detailed_errors {
                    format!("{} InvalidDataException: {detail}", texts::UNEXPECTED)
                } else {
                    texts::UNEXPECTED.to_string()
                })
            }
        }
        match tokio::time::timeout_at(deadline, source.recv()).await {
            Err(_) => break Err(texts::CANCELED.to_string()),
            // Closed before a handshake: nothing is written (ASP.NET does the same).
            Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(bytes))) => inbuf.extend_from_slice(&bytes),
        }
    };
    let result = request.and_then(|r| select_protocol(&r, transport).map(|k| (k, r.version)));
    match result {
        Ok((kind, version)) => Some((kind, version)),
        Err(text) => {
            inc(&METRICS.protocol_errors);
            tracing::debug!(error = %text, "handshake failed");
            send_error(sink, &text).await;
            None
        }
    }
}

/// Sends the handshake OK response; `None` when the transport is gone.
pub async fn send_ok<Snk: FrameSink>(sink: &mut Snk, kind: ProtocolKind) -> Option<()> {
    let ok = Bytes::from_static(handshake::OK_RESPONSE);
    sink.send(ok, kind.transfer_format()).await.ok()
}

/// Sends a handshake error response (`{"error":"..."}`).
pub async fn send_error<Snk: FrameSink>(sink: &mut Snk, text: &str) {
    // Before a protocol is chosen, ASP.NET answers in text.
    let _ = sink
        .send(
            Bytes::from(handshake::error_response(text)),
            TransferFormat::Text,
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(p: &str, v: u32) -> HandshakeRequest {
        HandshakeRequest {
            protocol: p.into(),
            version: v,
        }
    }

    #[test]
    fn protocol_selection_matches_aspnet_texts() {
        assert_eq!(
            select_protocol(&req("JSON", 1), TransportKind::WebSockets),
            Ok(ProtocolKind::Json)
        );
        assert_eq!(
            select_protocol(&req("messagepack", 2), TransportKind::WebSockets),
            Ok(ProtocolKind::MessagePack)
        );
        assert_eq!(
            select_protocol(&req("xml", 1), TransportKind::WebSockets),
            Err("The protocol 'xml' is not supported.".into())
        );
        assert_eq!(
            select_protocol(&req("json", 3), TransportKind::WebSockets),
            Err("The server does not support version 3 of the 'json' protocol.".into())
        );
        assert!(
            select_protocol(&req("messagepack", 1), TransportKind::ServerSentEvents)
                .unwrap_err()
                .contains("does not support 'Binary' transfer format")
        );
    }
}
