//! The msgpack hub protocol. Pure.

use bytes::BytesMut;

use super::{HubMessage, ProtocolError};

/// Decodes the next message; see [`super::ProtocolKind::decode`].
pub fn decode(buf: &mut BytesMut, max_message_size: usize) -> Result<Option<HubMessage>, ProtocolError> {
    let _ = (buf, max_message_size);
    todo!("msgpack::decode")
}

/// Appends one framed message.
pub fn encode(msg: &HubMessage, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let _ = (msg, out);
    todo!("msgpack::encode")
}
