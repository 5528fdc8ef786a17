//! Pure SignalR codecs: bytes in, a message or "not yet" (`Ok(None)`) out. No tokio, no
//! sockets, no logging; callers log and decide what an error means for the connection.
//!
//! - [`handshake`]: the JSON, 0x1E-terminated handshake (also on MessagePack connections).
//! - [`json`]: the JSON hub protocol (0x1E record separator framing).
//! - [`msgpack`]: the MessagePack hub protocol (VarInt length-prefix framing).
//! - [`framing`]: the two framings, with the max-message-size guard.
//! - [`prepared`]: a message encoded at most once per protocol and shared by all recipients.
//! - [`value`] / [`transcode`]: arguments kept raw, transcoded between JSON and MessagePack
//!   only when a recipient speaks the other protocol.
//! - `mp` (private): the bounds-checked MessagePack reader and writer behind [`msgpack`] and
//!   [`transcode`].
//!
//! Data comes from `session` (inbound transport bytes) and from `hub` (outbound messages);
//! encoded bytes go to the connection's outbound queue.

pub mod framing;
pub mod handshake;
pub mod json;
pub mod message;
pub(crate) mod mp;
pub mod msgpack;
pub mod prepared;
#[cfg(test)]
mod test_support;
pub mod transcode;
pub mod value;

use bytes::BytesMut;

pub use message::{
    Ack, CancelInvocation, Close, Completion, CompletionResult, Headers, HubMessage, Invocation,
    Sequence, StreamItem,
};
pub use prepared::PreparedMessage;
pub use value::{Binary, Timestamp, Value, ValueError};

/// ASP.NET's default `MaximumReceiveMessageSize`: 32 KiB per incoming message.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 32 * 1024;

/// The record separator that ends every JSON message and the handshake.
pub const RECORD_SEPARATOR: u8 = 0x1e;

/// How a transport must carry a protocol's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferFormat {
    /// UTF-8 text (WebSocket text frames, SSE).
    Text,
    /// Arbitrary bytes (WebSocket binary frames).
    Binary,
}

impl TransferFormat {
    /// The name used in negotiate's `transferFormats` and in error texts.
    pub fn name(self) -> &'static str {
        match self {
            TransferFormat::Text => "Text",
            TransferFormat::Binary => "Binary",
        }
    }
}

/// The hub protocols feedhub speaks. `Copy`, so the per-frame path dispatches with a `match`,
/// not a `dyn` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolKind {
    /// `json`.
    Json,
    /// `messagepack`.
    MessagePack,
}

impl ProtocolKind {
    /// Both protocols, in the order negotiate prefers them.
    pub const ALL: [ProtocolKind; 2] = [ProtocolKind::Json, ProtocolKind::MessagePack];

    /// The handshake name.
    pub fn name(self) -> &'static str {
        match self {
            ProtocolKind::Json => "json",
            ProtocolKind::MessagePack => "messagepack",
        }
    }

    /// Looks a handshake protocol name up, case-insensitively as ASP.NET does.
    pub fn from_name(name: &str) -> Option<ProtocolKind> {
        ProtocolKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }

    /// Highest protocol version supported (2: with Ack and Sequence).
    pub fn version(self) -> u32 {
        2
    }

    /// The transfer format the protocol needs.
    pub fn transfer_format(self) -> TransferFormat {
        match self {
            ProtocolKind::Json => TransferFormat::Text,
            ProtocolKind::MessagePack => TransferFormat::Binary,
        }
    }

    /// Index for per-protocol slots (`0` JSON, `1` MessagePack).
    pub fn index(self) -> usize {
        match self {
            ProtocolKind::Json => 0,
            ProtocolKind::MessagePack => 1,
        }
    }

    /// Decodes the next message from the front of `buf`, consuming its bytes.
    ///
    /// `Ok(None)` means more bytes are needed (nothing is consumed). Messages of an unknown
    /// type are consumed and skipped, as the spec asks. A message whose size exceeds
    /// `max_message_size` is [`ProtocolError::TooLarge`], detected as soon as that is certain.
    pub fn decode(
        self,
        buf: &mut BytesMut,
        max_message_size: usize,
    ) -> Result<Option<HubMessage>, ProtocolError> {
        match self {
            ProtocolKind::Json => json::decode(buf, max_message_size),
            ProtocolKind::MessagePack => msgpack::decode(buf, max_message_size),
        }
    }

    /// Appends one framed message (with its 0x1E or VarInt prefix) to `out`.
    pub fn encode(self, msg: &HubMessage, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        match self {
            ProtocolKind::Json => json::encode(msg, out),
            ProtocolKind::MessagePack => msgpack::encode(msg, out),
        }
    }
}

/// Why bytes could not be decoded or a message could not be encoded. "Incomplete" is not an
/// error: it is `Ok(None)`.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A message is larger than the configured limit. The text is ASP.NET's.
    #[error("The maximum message size of {limit}B was exceeded. The message size can be configured in AddHubOptions.")]
    TooLarge {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// A VarInt length prefix that does not fit 31 bits.
    #[error("Messages over 2GB in size are not supported.")]
    LengthPrefixOverflow,
    /// JSON text that is not UTF-8.
    #[error("Invalid UTF-8 in message.")]
    InvalidUtf8,
    /// A required field is missing.
    #[error("Missing required property '{0}'.")]
    MissingField(&'static str),
    /// A field has the wrong type or an invalid value.
    #[error("{0}")]
    InvalidField(String),
    /// The message body is not valid JSON.
    #[error("Invalid JSON: {0}")]
    Json(String),
    /// The message body is not valid MessagePack or not the expected layout.
    #[error("Invalid MessagePack: {0}")]
    MessagePack(String),
    /// A value could not be transcoded or serialized.
    #[error("{0}")]
    Value(#[from] ValueError),
}
