//! The wire format of backplane messages on an external bus (Redis). Pure.
//!
//! A channel carries two kinds of payload, told apart by the first byte:
//!
//! - **Foreign JSON**: anything not starting with [`MAGIC`], e.g. `PUBLISH feed-42
//!   {"text":"hi"}` from another service. It becomes [`BackplanePayload::RawJson`] with an
//!   empty origin, and the hub delivers it as `FeedUpdated(<json>)` (after validating it).
//! - **Envelope**: what feedhub publishes itself. It starts with the 4 bytes
//!   `FF 46 48 01` (`0xFF`, `"FH"`, version 1). `0xFF` never occurs in UTF-8 text, so no JSON
//!   document (nor any text) can be mistaken for an envelope. After the magic comes one
//!   MessagePack array `[origin, kind, ...]`:
//!
//! | kind | fields after `origin, kind` |
//! |---|---|
//! | 0 invocation | `target: str`, `args: array of (enc, value) pairs`, `exclude: array of str` |
//! | 1 raw JSON | `json: str` |
//! | 2 group | `connection: str`, `group: str`, `add: bool` |
//! | 3 close | `connection: str`, `error: str or nil` |
//! | 4 relay | `relay: uint`, `sub: uint`, then by `sub`: 0 open `connection: str, reply_node: str`; 1 opened `owner: str`; 2 data `seq: uint, data: bin, binary: bool`; 3 close (nothing); 4 request `reply_node: str, method: str, uri: str, headers: array of (str, bin) pairs, body: bin`; 5 head `status: uint, headers, body: bin, end: bool` |
//! | 5 feed | `user: str`, `offset: uint`, `epoch: str`, `id: str` (empty: none), `payload: str` (JSON text, without the offset) |
//! | 6 membership | `group: str or nil`, `add: bool`, `expires_ms: uint or nil` |
//! | 7 close targets | `exclude: array of str`, `error: str or nil` |
//!
//! **ASP.NET payloads** ([`super::aspnet`]) start with a MessagePack fixarray byte
//! (`0x91..=0x9F`), which neither JSON text nor an envelope can: they are passed through as
//! [`BackplanePayload::AspNet`] bytes, and published as is.
//!
//! Kind 5 is written by the history script inside Redis (`history.lua`), which knows the
//! offset and epoch only when it runs: [`feed_head`] gives the bytes before those fields
//! (the same for all of one user's events), and the script joins
//! `head .. cmsgpack.pack(offset, epoch, id, payload)`, so Rust and Lua produce the same
//! bytes as [`encode`] (the id and payload travel to Redis once, as script arguments).
//!
//! An argument keeps its original encoding: `enc` 0 is followed by a `str` holding JSON
//! text, `enc` 1 by the MessagePack value itself (inline, sliced out without copying on
//! decode). Rust-native values are written as JSON. Decoding checks every length against the
//! bytes present (nothing is allocated from a declared count), validates JSON and
//! MessagePack arguments, and never panics.

use bytes::Bytes;

use super::{BackplaneMessage, BackplanePayload, FeedMessage, RelayFrame, RelayKind};
use crate::ids::{ConnectionId, GroupName};
use crate::protocol::mp::{self, Reader};
use crate::protocol::Value;

/// The first bytes of every envelope.
pub const MAGIC: [u8; 4] = [0xFF, b'F', b'H', 1];

const KIND_INVOCATION: u64 = 0;
const KIND_RAW_JSON: u64 = 1;
const KIND_GROUP: u64 = 2;
const KIND_CLOSE: u64 = 3;
const KIND_RELAY: u64 = 4;
const KIND_FEED: u64 = 5;
const KIND_MEMBERSHIP: u64 = 6;
const KIND_CLOSE_TARGETS: u64 = 7;
const ENC_JSON: u64 = 0;
const ENC_MSGPACK: u64 = 1;

/// A payload that is neither foreign JSON nor a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed backplane envelope: {0}")]
pub struct EnvelopeError(pub String);

impl From<mp::MpError> for EnvelopeError {
    fn from(e: mp::MpError) -> Self {
        EnvelopeError(e.0)
    }
}

/// Encodes `msg` as an envelope.
pub fn encode(msg: &BackplaneMessage) -> Result<Vec<u8>, EnvelopeError> {
    if let BackplanePayload::AspNet(bytes) = &msg.payload {
        // Published as is, so ASP.NET servers read it.
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    match &msg.payload {
        BackplanePayload::AspNet(_) => {}
        BackplanePayload::Invocation {
            target,
            arguments,
            exclude,
        } => {
            mp::write_array_len(&mut out, 5);
            mp::write_str(&mut out, &msg.origin);
            mp::write_uint(&mut out, KIND_INVOCATION);
            mp::write_str(&mut out, target);
            mp::write_array_len(&mut out, arguments.len() * 2);
            let mut scratch = Vec::new();
            for arg in arguments {
                match arg {
                    Value::MsgPack(b) => {
                        mp::write_uint(&mut out, ENC_MSGPACK);
                        out.extend_from_slice(b);
                    }
                    Value::Json(b) => {
                        mp::write_uint(&mut out, ENC_JSON);
                        write_json_str(&mut out, b)?;
                    }
                    Value::Native(_) => {
                        scratch.clear();
                        arg.write_json(&mut scratch)
                            .map_err(|e| EnvelopeError(e.to_string()))?;
                        mp::write_uint(&mut out, ENC_JSON);
                        write_json_str(&mut out, &scratch)?;
                    }
                }
            }
            mp::write_array_len(&mut out, exclude.len());
            for c in exclude {
                mp::write_str(&mut out, c.as_str());
            }
        }
        BackplanePayload::RawJson(json) => {
            mp::write_array_len(&mut out, 3);
            mp::write_str(&mut out, &msg.origin);
            mp::write_uint(&mut out, KIND_RAW_JSON);
            write_json_str(&mut out, json)?;
        }
        BackplanePayload::Group {
            connection,
            group,
            add,
        } => {
            mp::write_array_len(&mut out, 5);
            mp::write_str(&mut out, &msg.origin);
            mp::write_uint(&mut out, KIND_GROUP);
            mp::write_str(&mut out, connection.as_str());
            mp::write_str(&mut out, group.as_str());
            mp::write_bool(&mut out, *add);
        }
        BackplanePayload::CloseConnection { connection, error } => {
            mp::write_array_len(&mut out, 4);
            mp::write_str(&mut out, &msg.origin);
            mp::write_uint(&mut out, KIND_CLOSE);
            mp::write_str(&mut out, connection.as_str());
            match error {
                Some(e) => mp::write_str(&mut out, e),
                None => mp::write_nil(&mut out),
            }
        }
        BackplanePayload::Membership {
            group,
            add,
            expires_ms,
        } => {
            mp::write_array_len(&mut out, 5);
            mp::write_str(&mut out, &msg.origin);
            mp::write_uint(&mut out, KIND_MEMBERSHIP);
            match group {
                Some(g) => mp::write_str(&mut out, g.as_str()),
                None => mp::write_nil(&mut out),
            }
            mp::write_bool(&mut out, *add);
            match expires_ms {
                Some(ms) => mp::write_uint(&mut out, *ms),
                None => mp::write_nil(&mut out),
            }
        }
        BackplanePayload::CloseTargets { exclude, error } => {
            mp::write_array_len(&mut out, 4);
            mp::write_str(&mut out, &msg.origin);
            mp::write_uint(&mut out, KIND_CLOSE_TARGETS);
            mp::write_array_len(&mut out, exclude.len());
            for c in exclude {
                mp::write_str(&mut out, c.as_str());
            }
            match error {
                Some(e) => mp::write_str(&mut out, e),
                None => mp::write_nil(&mut out),
            }
        }
        BackplanePayload::Feed(feed) => {
            out = feed_head(&msg.origin, &feed.user);
            mp::write_uint(&mut out, feed.offset);
            mp::write_str(&mut out, &feed.epoch);
            mp::write_str(&mut out, &feed.id);
            write_json_str(&mut out, &feed.payload)?;
        }
        BackplanePayload::Relay(RelayFrame { relay, kind }) => {
            let (sub, n) = match kind {
                RelayKind::Open { .. } => (0, 6),
                RelayKind::Opened { .. } => (1, 5),
                RelayKind::Data { .. } => (2, 7),
                RelayKind::Close => (3, 4),
                RelayKind::Request { .. } => (4, 9),
                RelayKind::Head { .. } => (5, 8),
                RelayKind::Claim { .. } => (6, 6),
            };
            mp::write_array_len(&mut out, n);
            mp::write_str(&mut out, &msg.origin);
            mp::write_uint(&mut out, KIND_RELAY);
            mp::write_uint(&mut out, *relay);
            mp::write_uint(&mut out, sub);
            match kind {
                RelayKind::Open {
                    connection,
                    reply_node,
                }
                | RelayKind::Claim {
                    connection,
                    reply_node,
                } => {
                    mp::write_str(&mut out, connection.as_str());
                    mp::write_str(&mut out, reply_node);
                }
                RelayKind::Opened { owner } => mp::write_str(&mut out, owner),
                RelayKind::Data { seq, data, binary } => {
                    mp::write_uint(&mut out, *seq);
                    write_bin(&mut out, data);
                    mp::write_bool(&mut out, *binary);
                }
                RelayKind::Close => {}
                RelayKind::Request {
                    reply_node,
                    method,
                    uri,
                    headers,
                    body,
                } => {
                    mp::write_str(&mut out, reply_node);
                    mp::write_str(&mut out, method);
                    mp::write_str(&mut out, uri);
                    write_headers(&mut out, headers);
                    write_bin(&mut out, body);
                }
                RelayKind::Head {
                    status,
                    headers,
                    body,
                    end,
                } => {
                    mp::write_uint(&mut out, u64::from(*status));
                    write_headers(&mut out, headers);
                    write_bin(&mut out, body);
                    mp::write_bool(&mut out, *end);
                }
            }
        }
    }
    Ok(out)
}

/// The bytes of a kind-5 (feed) envelope before its `offset`: `MAGIC, [origin, 5, user,`.
/// The history script in Redis appends the four fields it knows (`offset, epoch, id,
/// payload`) with `cmsgpack.pack`.
pub fn feed_head(origin: &str, user: &str) -> Vec<u8> {
    let mut head = Vec::with_capacity(16 + origin.len() + user.len());
    write_feed_head(&mut head, origin, user);
    head
}

/// [`feed_head`] into `out` (replacing its contents, reusing its buffer).
pub fn write_feed_head(out: &mut Vec<u8>, origin: &str, user: &str) {
    out.clear();
    out.extend_from_slice(&MAGIC);
    mp::write_array_len(out, 7);
    mp::write_str(out, origin);
    mp::write_uint(out, KIND_FEED);
    mp::write_str(out, user);
}

fn write_headers(out: &mut Vec<u8>, headers: &[(String, Bytes)]) {
    mp::write_array_len(out, headers.len() * 2);
    for (name, value) in headers {
        mp::write_str(out, name);
        write_bin(out, value);
    }
}

fn read_bin(r: &mut Reader<'_>, what: &str) -> Result<Bytes, EnvelopeError> {
    match r.item()? {
        mp::Item::Bin(b) => Ok(Bytes::copy_from_slice(b)),
        _ => Err(EnvelopeError(format!("relay {what} is not bin"))),
    }
}

fn read_headers(r: &mut Reader<'_>) -> Result<Vec<(String, Bytes)>, EnvelopeError> {
    let n = r.array_len("headers")?;
    if n % 2 != 0 || n as usize > r.remaining() {
        return Err(EnvelopeError("bad header list".to_string()));
    }
    let mut headers = Vec::with_capacity(n as usize / 2);
    for _ in 0..n / 2 {
        let name = r.str("header name")?.to_string();
        headers.push((name, read_bin(r, "header value")?));
    }
    Ok(headers)
}

fn write_bin(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len();
    if n < 256 {
        out.push(0xc4);
        out.push(n as u8);
    } else if n < 65_536 {
        out.push(0xc5);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(b);
}

fn write_json_str(out: &mut Vec<u8>, json: &[u8]) -> Result<(), EnvelopeError> {
    let text = std::str::from_utf8(json)
        .map_err(|_| EnvelopeError("JSON argument is not UTF-8".to_string()))?;
    mp::write_str(out, text);
    Ok(())
}

/// Whether a payload is in ASP.NET's backplane format: a MessagePack fixarray of 1 to 15
/// items (`0x91..=0x9F`). No JSON text starts with such a byte (it is a UTF-8 continuation
/// byte), and no envelope does (they start with `0xFF`).
pub fn is_aspnet(payload: &[u8]) -> bool {
    matches!(payload.first(), Some(0x91..=0x9f))
}

/// Decodes a payload received on a channel: an envelope, an ASP.NET payload (kept as
/// bytes, [`BackplanePayload::AspNet`]: the hub decodes it knowing the channel), or
/// foreign JSON.
pub fn decode(payload: Bytes) -> Result<BackplaneMessage, EnvelopeError> {
    if is_aspnet(&payload) {
        return Ok(BackplaneMessage {
            origin: String::new(),
            payload: BackplanePayload::AspNet(payload),
        });
    }
    if !payload.starts_with(&MAGIC) {
        return Ok(BackplaneMessage {
            origin: String::new(),
            payload: BackplanePayload::RawJson(payload),
        });
    }
    let body = payload.slice(MAGIC.len()..);
    let mut r = Reader::new(&body);
    let len = r.array_len("envelope")?;
    let origin = r.str("origin")?.to_string();
    let kind = r.uint("kind")?;
    let expect = |n: u32| {
        if len == n {
            Ok(())
        } else {
            Err(EnvelopeError(format!(
                "kind {kind} has {n} fields, got {len}"
            )))
        }
    };
    let payload = match kind {
        KIND_INVOCATION => {
            expect(5)?;
            let target = r.str("target")?.to_string();
            let n = r.array_len("arguments")?;
            if n % 2 != 0 || n as usize > r.remaining() {
                return Err(EnvelopeError("bad argument list".to_string()));
            }
            let mut arguments = Vec::with_capacity(n as usize / 2);
            for _ in 0..n / 2 {
                match r.uint("encoding")? {
                    ENC_JSON => {
                        let text = r.str("argument")?;
                        let v = Value::json_checked(Bytes::copy_from_slice(text.as_bytes()))
                            .map_err(|e| EnvelopeError(format!("JSON argument: {e}")))?;
                        arguments.push(v);
                    }
                    ENC_MSGPACK => {
                        let (start, end) = r.skip_value()?;
                        arguments.push(Value::MsgPack(body.slice(start..end)));
                    }
                    other => return Err(EnvelopeError(format!("unknown encoding {other}"))),
                }
            }
            let n = r.array_len("exclude")?;
            if n as usize > r.remaining() {
                return Err(EnvelopeError("bad exclude list".to_string()));
            }
            let mut exclude = Vec::with_capacity(n as usize);
            for _ in 0..n {
                exclude.push(connection_id(r.str("exclude")?)?);
            }
            BackplanePayload::Invocation {
                target,
                arguments,
                exclude,
            }
        }
        KIND_RAW_JSON => {
            expect(3)?;
            let text = r.str("json")?;
            BackplanePayload::RawJson(Bytes::copy_from_slice(text.as_bytes()))
        }
        KIND_GROUP => {
            expect(5)?;
            let connection = connection_id(r.str("connection")?)?;
            let group = GroupName::new(r.str("group")?)
                .map_err(|e| EnvelopeError(format!("group: {e}")))?;
            let add = r.bool("add")?;
            BackplanePayload::Group {
                connection,
                group,
                add,
            }
        }
        KIND_CLOSE => {
            expect(4)?;
            let connection = connection_id(r.str("connection")?)?;
            let error = r.str_or_nil("error")?.map(str::to_string);
            BackplanePayload::CloseConnection { connection, error }
        }
        KIND_MEMBERSHIP => {
            expect(5)?;
            let group = match r.str_or_nil("group")? {
                Some(g) => {
                    Some(GroupName::new(g).map_err(|e| EnvelopeError(format!("group: {e}")))?)
                }
                None => None,
            };
            let add = r.bool("add")?;
            let expires_ms = match r.item()? {
                mp::Item::Nil => None,
                mp::Item::Uint(n) => Some(n),
                _ => return Err(EnvelopeError("expires_ms is not uint or nil".to_string())),
            };
            BackplanePayload::Membership {
                group,
                add,
                expires_ms,
            }
        }
        KIND_CLOSE_TARGETS => {
            expect(4)?;
            let n = r.array_len("exclude")?;
            if n as usize > r.remaining() {
                return Err(EnvelopeError("bad exclude list".to_string()));
            }
            let mut exclude = Vec::with_capacity(n as usize);
            for _ in 0..n {
                exclude.push(connection_id(r.str("exclude")?)?);
            }
            let error = r.str_or_nil("error")?.map(str::to_string);
            BackplanePayload::CloseTargets { exclude, error }
        }
        KIND_FEED => {
            expect(7)?;
            let user = r.str("user")?.to_string();
            let offset = r.uint("offset")?;
            let epoch = r.str("epoch")?.into();
            let id = r.str("id")?.to_string();
            let text = r.str("payload")?;
            let payload = Bytes::copy_from_slice(text.as_bytes());
            BackplanePayload::Feed(FeedMessage {
                user,
                offset,
                epoch,
                id,
                payload,
            })
        }
        KIND_RELAY => {
            let relay = r.uint("relay")?;
            let kind = match r.uint("relay kind")? {
                0 => {
                    expect(6)?;
                    let connection = connection_id(r.str("connection")?)?;
                    let reply_node = r.str("reply node")?.to_string();
                    RelayKind::Open {
                        connection,
                        reply_node,
                    }
                }
                1 => {
                    expect(5)?;
                    RelayKind::Opened {
                        owner: r.str("owner")?.to_string(),
                    }
                }
                2 => {
                    expect(7)?;
                    let seq = r.uint("seq")?;
                    let data = read_bin(&mut r, "data")?;
                    let binary = r.bool("binary")?;
                    RelayKind::Data { seq, data, binary }
                }
                3 => {
                    expect(4)?;
                    RelayKind::Close
                }
                4 => {
                    expect(9)?;
                    RelayKind::Request {
                        reply_node: r.str("reply node")?.to_string(),
                        method: r.str("method")?.to_string(),
                        uri: r.str("uri")?.to_string(),
                        headers: read_headers(&mut r)?,
                        body: read_bin(&mut r, "body")?,
                    }
                }
                6 => {
                    expect(6)?;
                    RelayKind::Claim {
                        connection: connection_id(r.str("connection")?)?,
                        reply_node: r.str("reply node")?.to_string(),
                    }
                }
                5 => {
                    expect(8)?;
                    let status = u16::try_from(r.uint("status")?)
                        .map_err(|_| EnvelopeError("relay status out of range".to_string()))?;
                    RelayKind::Head {
                        status,
                        headers: read_headers(&mut r)?,
                        body: read_bin(&mut r, "body")?,
                        end: r.bool("end")?,
                    }
                }
                other => return Err(EnvelopeError(format!("unknown relay kind {other}"))),
            };
            BackplanePayload::Relay(RelayFrame { relay, kind })
        }
        other => return Err(EnvelopeError(format!("unknown kind {other}"))),
    };
    if r.remaining() != 0 {
        return Err(EnvelopeError("trailing bytes".to_string()));
    }
    Ok(BackplaneMessage { origin, payload })
}

fn connection_id(s: &str) -> Result<ConnectionId, EnvelopeError> {
    ConnectionId::new(s).map_err(|e| EnvelopeError(format!("connection id: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_frames_round_trip() {
        let kinds = vec![
            RelayKind::Open {
                connection: ConnectionId::new("c1").unwrap(),
                reply_node: "node-b".into(),
            },
            RelayKind::Opened {
                owner: "node-a".into(),
            },
            RelayKind::Data {
                seq: 7,
                data: Bytes::from(vec![0x1e; 70_000]),
                binary: true,
            },
            RelayKind::Close,
            RelayKind::Request {
                reply_node: "node-b".into(),
                method: "POST".into(),
                uri: "/hub?id=x".into(),
                headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
                body: Bytes::from_static(b"{}\x1e"),
            },
            RelayKind::Claim {
                connection: ConnectionId::new("c2").unwrap(),
                reply_node: "node-b".into(),
            },
            RelayKind::Head {
                status: 204,
                headers: vec![],
                body: Bytes::new(),
                end: true,
            },
        ];
        for kind in kinds {
            let msg = BackplaneMessage {
                origin: "node-a".into(),
                payload: BackplanePayload::Relay(RelayFrame { relay: 42, kind }),
            };
            let back = round_trip(msg.clone());
            assert_eq!(format!("{back:?}"), format!("{msg:?}"));
        }
    }

    #[test]
    fn membership_and_close_targets_round_trip() {
        let payloads = vec![
            BackplanePayload::Membership {
                group: Some(GroupName::new("g 1").unwrap()),
                add: true,
                expires_ms: Some(1_765_000_000_000),
            },
            BackplanePayload::Membership {
                group: None,
                add: false,
                expires_ms: None,
            },
            BackplanePayload::CloseTargets {
                exclude: vec![
                    ConnectionId::new("a").unwrap(),
                    ConnectionId::new("b").unwrap(),
                ],
                error: Some("bye".into()),
            },
            BackplanePayload::CloseTargets {
                exclude: vec![],
                error: None,
            },
        ];
        for payload in payloads {
            let msg = BackplaneMessage {
                origin: "node-a".into(),
                payload,
            };
            let back = round_trip(msg.clone());
            assert_eq!(format!("{back:?}"), format!("{msg:?}"));
        }
        // A membership with a non-integer end is refused, not misread.
        let mut bad = MAGIC.to_vec();
        mp::write_array_len(&mut bad, 5);
        mp::write_str(&mut bad, "n");
        mp::write_uint(&mut bad, KIND_MEMBERSHIP);
        mp::write_nil(&mut bad);
        mp::write_bool(&mut bad, true);
        mp::write_str(&mut bad, "soon");
        assert!(decode(Bytes::from(bad)).is_err());
    }

    fn round_trip(msg: BackplaneMessage) -> BackplaneMessage {
        let bytes = encode(&msg).expect("encode");
        assert!(bytes.starts_with(&MAGIC));
        decode(Bytes::from(bytes)).expect("decode")
    }

    #[test]
    fn invocation_keeps_argument_encodings() {
        let mut packed = Vec::new();
        mp::write_array_len(&mut packed, 2);
        mp::write_uint(&mut packed, 7);
        mp::write_str(&mut packed, "x");
        let msg = BackplaneMessage {
            origin: "node-a".into(),
            payload: BackplanePayload::Invocation {
                target: "Send".into(),
                arguments: vec![
                    Value::json_unchecked(Bytes::from_static(b"{\"a\":[1,2]}")),
                    Value::MsgPack(Bytes::from(packed.clone())),
                    Value::from_serialize(("n", 3)),
                ],
                exclude: vec![ConnectionId::new("c1").unwrap()],
            },
        };
        let back = round_trip(msg);
        assert_eq!(back.origin, "node-a");
        let BackplanePayload::Invocation {
            target,
            arguments,
            exclude,
        } = back.payload
        else {
            panic!("kind");
        };
        assert_eq!(target, "Send");
        assert!(matches!(&arguments[0], Value::Json(b) if &b[..] == b"{\"a\":[1,2]}"));
        assert!(matches!(&arguments[1], Value::MsgPack(b) if b[..] == packed[..]));
        assert_eq!(arguments[2].to_json_string().unwrap(), "[\"n\",3]");
        assert_eq!(exclude, vec![ConnectionId::new("c1").unwrap()]);
    }

    #[test]
    fn commands_round_trip() {
        let g = round_trip(BackplaneMessage {
            origin: "n".into(),
            payload: BackplanePayload::Group {
                connection: ConnectionId::new("c").unwrap(),
                group: GroupName::new("g").unwrap(),
                add: true,
            },
        });
        assert!(matches!(
            g.payload,
            BackplanePayload::Group { add: true, .. }
        ));
        let c = round_trip(BackplaneMessage {
            origin: "n".into(),
            payload: BackplanePayload::CloseConnection {
                connection: ConnectionId::new("c").unwrap(),
                error: None,
            },
        });
        assert!(matches!(
            c.payload,
            BackplanePayload::CloseConnection { error: None, .. }
        ));
        let r = round_trip(BackplaneMessage {
            origin: "n".into(),
            payload: BackplanePayload::RawJson(Bytes::from_static(b"[1]")),
        });
        assert!(matches!(r.payload, BackplanePayload::RawJson(b) if &b[..] == b"[1]"));
    }

    #[test]
    fn feed_round_trips_and_matches_its_parts() {
        let feed = FeedMessage {
            user: "42".into(),
            offset: 70_000,
            epoch: "00ab12cd34ef5678".into(),
            id: "e-1".into(),
            payload: Bytes::from_static(br#"{"id":"e-1","text":"hi"}"#),
        };
        let msg = BackplaneMessage {
            origin: "node-a".into(),
            payload: BackplanePayload::Feed(feed.clone()),
        };
        let bytes = encode(&msg).unwrap();
        // What the Lua script builds: head .. cmsgpack.pack(offset, epoch, id, payload).
        let mut joined = feed_head("node-a", "42");
        joined.extend_from_slice(&[0xce, 0x00, 0x01, 0x11, 0x70]);
        joined.push(0xa0 | 16);
        joined.extend_from_slice(b"00ab12cd34ef5678");
        joined.extend_from_slice(&[0xa3, b'e', b'-', b'1']);
        joined.push(0xa0 | 24);
        joined.extend_from_slice(&feed.payload);
        assert_eq!(bytes, joined);
        let back = decode(Bytes::from(bytes)).unwrap();
        assert_eq!(back.origin, "node-a");
        assert!(matches!(back.payload, BackplanePayload::Feed(f) if f == feed));
        // Truncations are errors, never panics.
        for cut in MAGIC.len()..joined.len() {
            assert!(decode(Bytes::copy_from_slice(&joined[..cut])).is_err());
        }
    }

    #[test]
    fn foreign_text_is_raw_json() {
        for text in [
            &b"{\"text\":\"hi\"}"[..],
            b" [1]",
            b"\"s\"",
            b"not json",
            b"",
        ] {
            let m = decode(Bytes::copy_from_slice(text)).unwrap();
            assert_eq!(m.origin, "");
            assert!(matches!(m.payload, BackplanePayload::RawJson(b) if &b[..] == text));
        }
    }

    #[test]
    fn malformed_envelopes_are_errors_not_panics() {
        let good = encode(&BackplaneMessage {
            origin: "n".into(),
            payload: BackplanePayload::Invocation {
                target: "T".into(),
                arguments: vec![Value::json_unchecked(Bytes::from_static(b"1"))],
                exclude: vec![],
            },
        })
        .unwrap();
        // Every truncation fails cleanly.
        for cut in MAGIC.len()..good.len() {
            assert!(
                decode(Bytes::copy_from_slice(&good[..cut])).is_err(),
                "{cut}"
            );
        }
        // Huge declared counts are refused without allocating.
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&[
            0x95, 0xa1, b'n', 0x00, 0xa1, b'T', 0xdd, 0xff, 0xff, 0xff, 0xfe,
        ]);
        assert!(decode(Bytes::from(huge)).is_err());
        // Invalid JSON inside an envelope is refused.
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&[
            0x95, 0xa1, b'n', 0x00, 0xa1, b'T', 0x92, 0x00, 0xa1, b'{', 0x90,
        ]);
        assert!(decode(Bytes::from(bad)).is_err());
        // Unknown kind.
        let mut unknown = MAGIC.to_vec();
        unknown.extend_from_slice(&[0x92, 0xa1, b'n', 0x09]);
        assert!(decode(Bytes::from(unknown)).is_err());
    }
}
