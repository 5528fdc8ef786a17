//! The two hub-protocol framings, with the max-message-size guard. Pure.
//!
//! - Text (JSON): each message ends with the record separator 0x1E.
//! - Binary (MessagePack): each message is prefixed by its length as a VarInt
//!   (7 bits per byte, least-significant group first, at most 5 bytes, at most 2^31 − 1).
//!
//! `split_*` return `Ok(None)` until a whole message is buffered and never consume a partial
//! one. A message larger than the limit is rejected as soon as that is certain, so a peer
//! cannot make us buffer without bound.

use bytes::{Bytes, BytesMut};

use super::ProtocolError;

/// Takes the next 0x1E-terminated record off the front of `buf`; the separator is consumed
/// and not returned.
pub fn split_text(buf: &mut BytesMut, max_message_size: usize) -> Result<Option<Bytes>, ProtocolError> {
    let _ = (buf, max_message_size);
    todo!("framing::split_text")
}

/// Takes the next VarInt-length-prefixed record off the front of `buf`; the prefix is
/// consumed and not returned.
pub fn split_binary(buf: &mut BytesMut, max_message_size: usize) -> Result<Option<Bytes>, ProtocolError> {
    let _ = (buf, max_message_size);
    todo!("framing::split_binary")
}

/// Appends `len` as a VarInt.
pub fn write_varint(len: usize, out: &mut Vec<u8>) {
    let _ = (len, out);
    todo!("framing::write_varint")
}
