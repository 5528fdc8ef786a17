//! Decoding feed events. Pure: no I/O, no logging; the caller counts and logs rejections.
//!
//! Two forms are accepted (the public contract):
//! - a body `{"recipients":["1002","1003"],"payload":{...},"id":"optional"}`;
//! - a routing key `feed.<userId>` with any JSON body, which is the payload.
//!
//! Event ids: an `id` in the body, or else the AMQP `message_id`, travels with the event.
//! RabbitMQ messages with neither get a stable id ([`stable_id`]: `h:` and a hash of the
//! routing key and the body), so a redelivered message carries the same id as its first
//! delivery. Clients see the id inside the payload: when the payload is a JSON object without a
//! top-level `id`, [`FeedEvent::payload_with_id`] inserts `"id":<id>` as its first member
//! (an existing `id` is never overwritten; non-object payloads are forwarded unchanged).
//! Retried deliveries (after a backplane failure) carry the same id, so clients can
//! deduplicate.
//!
//! The top-level member `offset` of an object payload is reserved: feedhub adds it at
//! delivery (the event's position in the user's history), so an event whose payload has
//! one is refused ([`EventError::ReservedOffset`]).

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::backplane::history::{has_reserved_offset, object_members};
use crate::ids::UserId;

/// Most recipients one event may name.
pub const MAX_RECIPIENTS: usize = 10_000;

/// Deepest nesting of arrays and objects in a payload: the bound every hub protocol can
/// carry (the MessagePack transcoder's, [`crate::protocol::transcode::MAX_DEPTH`]), checked
/// here so that an event either reaches JSON and MessagePack clients alike or nobody
/// (issue 14: a 100,000-deep payload reached JSON clients while MessagePack clients
/// silently lost it).
pub const MAX_PAYLOAD_DEPTH: usize = crate::protocol::transcode::MAX_DEPTH;

/// One feed event.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEvent {
    /// Optional event id (for client-side deduplication and tracing).
    pub id: Option<String>,
    /// Who receives it.
    pub recipients: Vec<UserId>,
    /// The payload's raw JSON text.
    pub payload: Bytes,
    /// It may have been delivered before (a RabbitMQ redelivery): the history append looks
    /// for its id among the user's newest events first.
    pub redelivered: bool,
}

impl FeedEvent {
    /// The payload as clients receive it: with `"id":<id>` inserted as the first member
    /// when the event has an id, the payload is an object, and it has no top-level `id`.
    /// Otherwise the payload's bytes unchanged.
    pub fn payload_with_id(&self) -> Bytes {
        let Some(id) = &self.id else {
            return self.payload.clone();
        };
        let text = match std::str::from_utf8(&self.payload) {
            Ok(t) => t.trim_start(),
            Err(_) => return self.payload.clone(),
        };
        let Some(rest) = text.strip_prefix('{') else {
            return self.payload.clone();
        };
        // One pass over the top-level keys (values skipped as raw JSON, without
        // serde_json's recursion limit, so a payload at the depth limit still gets its id).
        let members = match object_members(text) {
            Some(m) => m,
            None => return self.payload.clone(),
        };
        if members.id {
            return self.payload.clone();
        }
        let id_json = match serde_json::to_string(id) {
            Ok(j) => j,
            Err(_) => return self.payload.clone(),
        };
        let sep = if members.any { "," } else { "" };
        let mut out = String::with_capacity(text.len() + id_json.len() + 8);
        out.push_str("{\"id\":");
        out.push_str(&id_json);
        out.push_str(sep);
        out.push_str(rest);
        Bytes::from(out)
    }
}

/// Why an event was rejected. Every variant is a malformed ("poison") message: retrying it
/// cannot succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The body is not JSON.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// `recipients` missing, empty or not an array of strings.
    #[error("'recipients' must be a non-empty array of user ids")]
    NoRecipients,
    /// Too many recipients.
    #[error("too many recipients (at most {MAX_RECIPIENTS})")]
    TooManyRecipients,
    /// A recipient is not a valid user id.
    #[error("invalid user id {0:?}")]
    BadUserId(String),
    /// `payload` missing.
    #[error("'payload' is required")]
    NoPayload,
    /// The payload nests arrays/objects deeper than [`MAX_PAYLOAD_DEPTH`].
    #[error("payload nested deeper than {MAX_PAYLOAD_DEPTH} levels")]
    TooDeep,
    /// The routing key is not `feed.<userId>` and the body has no recipients.
    #[error("routing key {0:?} does not name a user and the body has no recipients")]
    NoAddress(String),
    /// The payload object has a top-level `offset`, which feedhub sets itself.
    #[error("the payload must not have a top-level 'offset': feedhub sets it (the event's position in the user's history)")]
    ReservedOffset,
}

#[derive(Deserialize)]
struct Body<'a> {
    recipients: Option<Vec<serde_json::Value>>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    id: Option<serde_json::Value>,
}

fn user_id(v: &serde_json::Value) -> Result<UserId, EventError> {
    let s = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => return Err(EventError::BadUserId(other.to_string())),
    };
    UserId::new(&s).map_err(|_| EventError::BadUserId(s))
}

/// [`EventError::TooDeep`] when `payload` nests deeper than [`MAX_PAYLOAD_DEPTH`].
fn check_depth(payload: &[u8]) -> Result<(), EventError> {
    if crate::protocol::json::nesting_exceeds(payload, MAX_PAYLOAD_DEPTH) {
        return Err(EventError::TooDeep);
    }
    Ok(())
}

/// Decodes a `{"recipients":[...],"payload":...}` body.
pub fn decode_recipients_body(body: &[u8]) -> Result<FeedEvent, EventError> {
    let parsed: Body<'_> =
        serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
    let recipients = parsed.recipients.ok_or(EventError::NoRecipients)?;
    if recipients.is_empty() {
        return Err(EventError::NoRecipients);
    }
    if recipients.len() > MAX_RECIPIENTS {
        return Err(EventError::TooManyRecipients);
    }
    let mut users = Vec::with_capacity(recipients.len());
    for r in &recipients {
        let u = user_id(r)?;
        if !users.contains(&u) {
            users.push(u);
        }
    }
    let payload = parsed.payload.ok_or(EventError::NoPayload)?;
    if has_reserved_offset(payload.get().as_bytes()) {
        return Err(EventError::ReservedOffset);
    }
    check_depth(payload.get().as_bytes())?;
    let id = parsed.id.map(|v| match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    });
    Ok(FeedEvent {
        id,
        recipients: users,
        payload: Bytes::copy_from_slice(payload.get().as_bytes()),
        redelivered: false,
    })
}

/// A stable event id for a message without one: `h:` and the first 16 bytes of
/// SHA-256(routing key, 0, body) in hex. The same message always gets the same id, so its
/// redeliveries can be recognized (two identical messages also share it: publishers that
/// repeat identical bodies should set `message_id`).
pub fn stable_id(routing_key: &str, body: &[u8]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(routing_key.as_bytes());
    h.update([0u8]);
    h.update(body);
    let digest = h.finalize();
    let mut out = String::with_capacity(2 + 32);
    out.push_str("h:");
    for b in &digest[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Decodes a RabbitMQ message like [`decode_message`], and gives it an id in every case:
/// the body's `id`, else `message_id`, else [`stable_id`].
pub fn decode_delivery(
    routing_key: &str,
    body: &[u8],
    message_id: Option<&str>,
) -> Result<FeedEvent, EventError> {
    let mut e = decode_message(routing_key, body, message_id)?;
    if e.id.is_none() {
        e.id = Some(stable_id(routing_key, body));
    }
    Ok(e)
}

/// Decodes a message by routing key and body: `feed.<userId>` addresses one user with the
/// whole body as payload; any other key needs a recipients body.
pub fn decode_message(
    routing_key: &str,
    body: &[u8],
    message_id: Option<&str>,
) -> Result<FeedEvent, EventError> {
    if let Some(user) = routing_key.strip_prefix("feed.") {
        if !user.is_empty() {
            let user = UserId::new(user).map_err(|_| EventError::BadUserId(user.to_string()))?;
            let text = std::str::from_utf8(body).map_err(|e| EventError::NotJson(e.to_string()))?;
            // Validated without serde_json's recursion limit (127 levels), so the depth bound
            // is ours, the same for both forms. An object is validated by the same pass that
            // looks for a top-level `offset`.
            let reserved = if text.trim_start().starts_with('{') {
                match object_members(text) {
                    Some(m) => m.offset,
                    None => {
                        let e = serde_json::from_str::<&RawValue>(text).err();
                        return Err(EventError::NotJson(
                            e.map(|e| e.to_string()).unwrap_or_default(),
                        ));
                    }
                }
            } else {
                serde_json::from_str::<&RawValue>(text)
                    .map_err(|e| EventError::NotJson(e.to_string()))?;
                false
            };
            check_depth(body)?;
            if reserved {
                return Err(EventError::ReservedOffset);
            }
            return Ok(FeedEvent {
                id: message_id.map(str::to_string),
                recipients: vec![user],
                payload: Bytes::copy_from_slice(text.trim().as_bytes()),
                redelivered: false,
            });
        }
    }
    match decode_recipients_body(body) {
        Ok(mut e) => {
            if e.id.is_none() {
                e.id = message_id.map(str::to_string);
            }
            Ok(e)
        }
        Err(EventError::NoRecipients) => Err(EventError::NoAddress(routing_key.to_string())),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_body() {
        let e = decode_recipients_body(
            br#"{"payload":{"a":[1, 2]},"recipients":["1002",1003,"1002"],"id":"e1"}"#,
        )
        .unwrap();
        assert_eq!(
            e.recipients.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            vec!["1002", "1003"]
        );
        assert_eq!(&e.payload[..], br#"{"a":[1, 2]}"#);
        assert_eq!(e.id.as_deref(), Some("e1"));
    }

    #[test]
    fn payload_depth_is_bounded_the_same_for_both_forms() {
        let nested = |d: usize| format!("{}{}", "[".repeat(d), "]".repeat(d));
        let ok = nested(MAX_PAYLOAD_DEPTH);
        let deep = nested(MAX_PAYLOAD_DEPTH + 1);
        let body = |p: &str| format!(r#"{{"recipients":["1"],"payload":{p}}}"#);
        assert!(decode_recipients_body(body(&ok).as_bytes()).is_ok());
        assert_eq!(
            decode_recipients_body(body(&deep).as_bytes()),
            Err(EventError::TooDeep)
        );
        assert!(decode_message("feed.1", ok.as_bytes(), None).is_ok());
        assert_eq!(
            decode_message("feed.1", deep.as_bytes(), None),
            Err(EventError::TooDeep)
        );
        let huge = nested(100_000);
        assert_eq!(
            decode_message("feed.1", huge.as_bytes(), None),
            Err(EventError::TooDeep)
        );
        // A payload at the limit transcodes for MessagePack clients.
        let mut out = Vec::new();
        crate::protocol::transcode::json_to_msgpack(ok.as_bytes(), &mut out).unwrap();
        assert!(crate::protocol::transcode::json_to_msgpack(deep.as_bytes(), &mut out).is_err());
    }

    #[test]
    fn rejects_malformed() {
        assert!(matches!(
            decode_recipients_body(b"nope"),
            Err(EventError::NotJson(_))
        ));
        assert_eq!(
            decode_recipients_body(br#"{"payload":1}"#),
            Err(EventError::NoRecipients)
        );
        assert_eq!(
            decode_recipients_body(br#"{"recipients":[],"payload":1}"#),
            Err(EventError::NoRecipients)
        );
        assert_eq!(
            decode_recipients_body(br#"{"recipients":["a"]}"#),
            Err(EventError::NoPayload)
        );
        assert!(matches!(
            decode_recipients_body(br#"{"recipients":[""],"payload":1}"#),
            Err(EventError::BadUserId(_))
        ));
        assert!(matches!(
            decode_recipients_body(br#"{"recipients":[{"x":1}],"payload":1}"#),
            Err(EventError::BadUserId(_))
        ));
    }

    #[test]
    fn id_is_injected_into_object_payloads_only() {
        let with = |payload: &str, id: Option<&str>| {
            let e = FeedEvent {
                id: id.map(str::to_string),
                recipients: vec![],
                payload: Bytes::copy_from_slice(payload.as_bytes()),
                redelivered: false,
            };
            String::from_utf8(e.payload_with_id().to_vec()).unwrap()
        };
        assert_eq!(with(r#"{"a":1}"#, Some("e1")), r#"{"id":"e1","a":1}"#);
        assert_eq!(with(r#" { } "#, Some("e\"1")), r#"{"id":"e\"1" } "#);
        assert_eq!(with(r#"{"id":7,"a":1}"#, Some("e1")), r#"{"id":7,"a":1}"#);
        assert_eq!(with(r#"{"\u0069d":7}"#, Some("e1")), r#"{"\u0069d":7}"#);
        assert_eq!(with(r#"[1,2]"#, Some("e1")), r#"[1,2]"#);
        assert_eq!(with(r#""text""#, Some("e1")), r#""text""#);
        assert_eq!(with(r#"{"a":1}"#, None), r#"{"a":1}"#);
        let injected = with(r#"{"a":{"id":1}}"#, Some("x"));
        let v: serde_json::Value = serde_json::from_str(&injected).unwrap();
        assert_eq!(v, serde_json::json!({"id":"x","a":{"id":1}}));
    }

    #[test]
    fn a_top_level_offset_is_refused() {
        assert_eq!(
            decode_recipients_body(br#"{"recipients":["1"],"payload":{"offset":3}}"#),
            Err(EventError::ReservedOffset)
        );
        assert_eq!(
            decode_message("feed.1", br#"{"a":1,"offset":3}"#, None),
            Err(EventError::ReservedOffset)
        );
        assert!(decode_message("feed.1", br#"{"a":{"offset":3}}"#, None).is_ok());
        assert!(
            decode_recipients_body(br#"{"recipients":["1"],"payload":[{"offset":3}]}"#).is_ok()
        );
    }

    #[test]
    fn routing_key_form() {
        let e = decode_message("feed.42", br#" {"text":"hi"} "#, Some("m1")).unwrap();
        assert_eq!(e.recipients[0].as_str(), "42");
        assert_eq!(&e.payload[..], br#"{"text":"hi"}"#);
        assert_eq!(e.id.as_deref(), Some("m1"));
        assert!(matches!(
            decode_message("feed.42", b"{oops", None),
            Err(EventError::NotJson(_))
        ));
        assert!(matches!(
            decode_message("other", br#"{"x":1}"#, None),
            Err(EventError::NoAddress(_))
        ));
        let e = decode_message(
            "anything",
            br#"{"recipients":["7"],"payload":"p"}"#,
            Some("m2"),
        )
        .unwrap();
        assert_eq!(e.id.as_deref(), Some("m2"));
    }

    #[test]
    fn deliveries_always_get_a_stable_id() {
        let a = decode_delivery("feed.42", br#"{"x":1}"#, None).unwrap();
        let again = decode_delivery("feed.42", br#"{"x":1}"#, None).unwrap();
        let id = a.id.clone().unwrap();
        assert!(id.starts_with("h:") && id.len() == 34, "{id}");
        assert_eq!(again.id, a.id, "a redelivery carries the same id");
        let other_key = decode_delivery("feed.43", br#"{"x":1}"#, None).unwrap();
        let other_body = decode_delivery("feed.42", br#"{"x":2}"#, None).unwrap();
        assert_ne!(other_key.id, a.id);
        assert_ne!(other_body.id, a.id);
        // The body's id, then message_id, win over the hash.
        let body = br#"{"recipients":["7"],"payload":{},"id":"b1"}"#;
        assert_eq!(
            decode_delivery("feed", body, Some("m"))
                .unwrap()
                .id
                .as_deref(),
            Some("b1")
        );
        assert_eq!(
            decode_delivery("feed.42", b"{}", Some("m"))
                .unwrap()
                .id
                .as_deref(),
            Some("m")
        );
        assert!(decode_delivery("feed.42", b"{oops", None).is_err());
    }
}
