//! [`PreparedMessage`]: one hub message, encoded at most once per protocol, shared by every
//! recipient as cheap `Bytes` clones. Pure.
//!
//! This is ASP.NET's `SerializedHubMessage` and Centrifuge's `preparedData`: a broadcast to
//! 10,000 connections encodes twice at most (JSON and MessagePack), not 10,000 times. Slots
//! can also be pre-filled with bytes that arrived already encoded (from the backplane), so a
//! receiving node forwards them without re-encoding.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::{HubMessage, ProtocolError, ProtocolKind};

/// A message plus its lazily filled, framed encodings.
#[derive(Debug)]
pub struct PreparedMessage {
    message: HubMessage,
    /// One slot per [`ProtocolKind::index`]. An encoding error is kept as text so every
    /// recipient sees the same outcome without re-trying.
    encoded: [OnceLock<Result<Bytes, Arc<str>>>; 2],
}

impl PreparedMessage {
    /// Wraps a message for sharing.
    pub fn new(message: HubMessage) -> Arc<PreparedMessage> {
        Arc::new(PreparedMessage {
            message,
            encoded: [OnceLock::new(), OnceLock::new()],
        })
    }

    /// Wraps a message whose encoding for `kind` is already known (framed bytes).
    pub fn with_encoded(
        message: HubMessage,
        kind: ProtocolKind,
        framed: Bytes,
    ) -> Arc<PreparedMessage> {
        let prepared = PreparedMessage {
            message,
            encoded: [OnceLock::new(), OnceLock::new()],
        };
        let _ = prepared.encoded[kind.index()].set(Ok(framed));
        Arc::new(prepared)
    }

    /// The message itself.
    pub fn message(&self) -> &HubMessage {
        &self.message
    }

    /// The framed bytes for `kind`, encoding on first use.
    pub fn bytes_for(&self, kind: ProtocolKind) -> Result<Bytes, ProtocolError> {
        let slot = &self.encoded[kind.index()];
        let result = slot.get_or_init(|| {
            let mut out = Vec::new();
            kind.encode(&self.message, &mut out)
                .map(|()| Bytes::from(out))
                .map_err(|e| Arc::from(e.to_string()))
        });
        result
            .clone()
            .map_err(|e| ProtocolError::InvalidField(e.to_string()))
    }
}
