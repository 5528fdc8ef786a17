//! The SignalR handshake: always JSON, 0x1E-terminated, whatever hub protocol follows. Pure.

use bytes::BytesMut;

/// The exact success response, `{}` + 0x1E.
pub const OK_RESPONSE: &[u8] = b"{}\x1e";

/// `{"protocol":"…","version":N}` from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRequest {
    /// Protocol name as sent (matched case-insensitively by the caller).
    pub protocol: String,
    /// Protocol version as sent.
    pub version: u32,
}

/// `{}` or `{"error":"…"}` from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// The server's error, if the handshake failed.
    pub error: Option<String>,
}

/// Why a handshake could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// More than the size limit arrived without a complete handshake.
    #[error("handshake exceeds the maximum message size of {limit}B")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// Not a JSON object with the required fields.
    #[error("{0}")]
    Malformed(String),
}

/// Parses the client's handshake request off the front of `buf`. `Ok(None)`: incomplete.
/// Bytes after the 0x1E stay in `buf` (they are hub messages).
pub fn parse_request(buf: &mut BytesMut, max_size: usize) -> Result<Option<HandshakeRequest>, HandshakeError> {
    let _ = (buf, max_size);
    todo!("handshake::parse_request")
}

/// Appends a handshake request (what a client sends).
pub fn write_request(protocol: &str, version: u32, out: &mut Vec<u8>) {
    let _ = (protocol, version, out);
    todo!("handshake::write_request")
}

/// The error response `{"error":"…"}` + 0x1E.
pub fn error_response(error: &str) -> Vec<u8> {
    let _ = error;
    todo!("handshake::error_response")
}

/// Parses the server's handshake response off the front of `buf` (client side).
pub fn parse_response(buf: &mut BytesMut) -> Result<Option<HandshakeResponse>, HandshakeError> {
    let _ = buf;
    todo!("handshake::parse_response")
}
