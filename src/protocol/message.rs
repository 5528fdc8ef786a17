//! The SignalR hub message model: one variant per message type of the hub protocol spec
//! (`HubProtocol.md`), independent of any wire encoding.
//!
//! Pure: no I/O, no logging. Field names follow the spec (`invocation_id`, `target`,
//! `arguments`, `stream_ids`, `allow_reconnect`) so code and spec can be grepped against each
//! other. Values (arguments, results, stream items) are [`Value`]s, kept in the encoding they
//! arrived in, so a message received from one client can be forwarded without re-encoding.

use super::value::Value;

/// Message headers (`headers` in JSON, a str→str map in MessagePack). Order is preserved as
/// received; receivers ignore keys they do not understand.
pub type Headers = Vec<(String, String)>;

/// Message type numbers from the spec (`HubProtocolConstants`).
pub mod message_type {
    /// Invocation: call a method on the other side.
    pub const INVOCATION: u8 = 1;
    /// StreamItem: one item of a stream (server results or client upload).
    pub const STREAM_ITEM: u8 = 2;
    /// Completion: end of an invocation or stream.
    pub const COMPLETION: u8 = 3;
    /// StreamInvocation: call a server method that streams results back.
    pub const STREAM_INVOCATION: u8 = 4;
    /// CancelInvocation: the client disposed a stream subscription.
    pub const CANCEL_INVOCATION: u8 = 5;
    /// Ping: keep-alive, both directions.
    pub const PING: u8 = 6;
    /// Close: graceful end, optionally with an error and a reconnect hint.
    pub const CLOSE: u8 = 7;
    /// Ack: stateful reconnect acknowledgement.
    pub const ACK: u8 = 8;
    /// Sequence: stateful reconnect resend start.
    pub const SEQUENCE: u8 = 9;
}

/// One hub protocol message.
#[derive(Debug, Clone, PartialEq)]
pub enum HubMessage {
    /// Type 1.
    Invocation(Invocation),
    /// Type 2.
    StreamItem(StreamItem),
    /// Type 3.
    Completion(Completion),
    /// Type 4: same fields as an invocation; `invocation_id` is required.
    StreamInvocation(Invocation),
    /// Type 5.
    CancelInvocation(CancelInvocation),
    /// Type 6.
    Ping,
    /// Type 7.
    Close(Close),
    /// Type 8.
    Ack(Ack),
    /// Type 9.
    Sequence(Sequence),
}

impl HubMessage {
    /// The spec's message type number.
    pub fn message_type(&self) -> u8 {
        use message_type::*;
        match self {
            HubMessage::Invocation(_) => INVOCATION,
            HubMessage::StreamItem(_) => STREAM_ITEM,
            HubMessage::Completion(_) => COMPLETION,
            HubMessage::StreamInvocation(_) => STREAM_INVOCATION,
            HubMessage::CancelInvocation(_) => CANCEL_INVOCATION,
            HubMessage::Ping => PING,
            HubMessage::Close(_) => CLOSE,
            HubMessage::Ack(_) => ACK,
            HubMessage::Sequence(_) => SEQUENCE,
        }
    }

    /// Whether stateful reconnect numbers and buffers this message (types 1 to 5).
    pub fn is_sequenced(&self) -> bool {
        (1..=5).contains(&self.message_type())
    }
}

/// Invocation (type 1) or StreamInvocation (type 4).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Invocation {
    /// Optional headers.
    pub headers: Headers,
    /// `None` (or, on the wire, an empty string) means non-blocking: never answered.
    pub invocation_id: Option<String>,
    /// The method name. Non-empty.
    pub target: String,
    /// Arguments, excluding upload streams.
    pub arguments: Vec<Value>,
    /// Ids of client-to-server upload streams, in parameter order.
    pub stream_ids: Vec<String>,
}

/// StreamItem (type 2).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamItem {
    /// Optional headers.
    pub headers: Headers,
    /// The stream invocation (server streams) or stream id (uploads) this item belongs to.
    pub invocation_id: String,
    /// The item; `null` is allowed.
    pub item: Value,
}

/// What a Completion carries (MessagePack result kinds 1, 2 and 3).
#[derive(Debug, Clone, PartialEq)]
pub enum CompletionResult {
    /// Kind 2: no result (end of a stream, end of an upload).
    Void,
    /// Kind 3: a result, which may be `null` (a void hub method answers with `null`).
    Value(Value),
    /// Kind 1: an error text.
    Error(String),
}

/// Completion (type 3).
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Optional headers.
    pub headers: Headers,
    /// The invocation being completed.
    pub invocation_id: String,
    /// Result, error or nothing.
    pub result: CompletionResult,
}

/// CancelInvocation (type 5).
#[derive(Debug, Clone, PartialEq)]
pub struct CancelInvocation {
    /// Optional headers.
    pub headers: Headers,
    /// The stream invocation to cancel.
    pub invocation_id: String,
}

/// Close (type 7).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Close {
    /// Why the connection closes; `None` for a normal close.
    pub error: Option<String>,
    /// Tells a client with automatic reconnect that it may reconnect.
    pub allow_reconnect: bool,
}

/// Ack (type 8): the highest sequence id received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Highest received sequence id.
    pub sequence_id: u64,
}

/// Sequence (type 9): the sequence id of the first message about to be (re)sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// First sequence id that follows.
    pub sequence_id: u64,
}

impl Completion {
    /// A successful completion carrying `value` (kind 3).
    pub fn with_result(invocation_id: impl Into<String>, value: Value) -> Self {
        Completion {
            headers: Vec::new(),
            invocation_id: invocation_id.into(),
            result: CompletionResult::Value(value),
        }
    }

    /// An error completion (kind 1).
    pub fn with_error(invocation_id: impl Into<String>, error: impl Into<String>) -> Self {
        Completion {
            headers: Vec::new(),
            invocation_id: invocation_id.into(),
            result: CompletionResult::Error(error.into()),
        }
    }

    /// An empty completion (kind 2), as sent at the end of a stream.
    pub fn empty(invocation_id: impl Into<String>) -> Self {
        Completion {
            headers: Vec::new(),
            invocation_id: invocation_id.into(),
            result: CompletionResult::Void,
        }
    }
}

impl Invocation {
    /// A non-blocking invocation of `target` (what `Clients.X.SendAsync` produces).
    pub fn send(target: impl Into<String>, arguments: Vec<Value>) -> Self {
        Invocation {
            headers: Vec::new(),
            invocation_id: None,
            target: target.into(),
            arguments,
            stream_ids: Vec::new(),
        }
    }
}
