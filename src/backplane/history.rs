//! Per-user feed history: the types of [`super::Backplane::append`] and
//! [`super::Backplane::history`], their bounds, and the offset splice. Pure.
//!
//! Every feed event feedhub ingests is appended to its recipient's bounded history in the
//! same atomic step that publishes it (Redis: one Lua script, `history.lua`; memory: one
//! locked step), and gets the user's next **offset** (1, 2, 3, … with no holes). An
//! **epoch** string names one history: it changes only when the history was lost (Redis
//! restarted without persistence, the meta key expired or was flushed; a restarted
//! embedded server), so "offset N of epoch E" names one event for as long as the history
//! lives, and a recovery across a loss can never be reported complete.
//!
//! Clients see the offset as the top-level field `"offset"` of object payloads
//! ([`splice_offset`], text splicing: the payload is never re-encoded); the epoch only in
//! answers of the feed hub's `Recover` method.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

/// Default events kept per user (`--history-size`).
pub const DEFAULT_HISTORY_SIZE: usize = 100;
/// Default age of the oldest kept event (`--history-ttl-secs`).
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(900);
/// Default largest number of events one `Recover` returns (`--recover-limit`).
pub const DEFAULT_RECOVER_LIMIT: usize = 300;
/// How far back a redelivered event is looked for (its id), in events.
pub const REDELIVERY_SCAN: usize = 512;
/// The least time a user's position (epoch and top offset) outlives its last event: a
/// client that is caught up still gets `recovered: true` long after the events expired.
pub const MIN_META_TTL: Duration = Duration::from_secs(24 * 3600);

/// Bounds and naming of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Events kept per user; older ones are trimmed.
    pub size: usize,
    /// Events older than this are dropped (the Redis stream's EXPIRE is refreshed on every
    /// append, so in Redis a user's whole history expires `ttl` after their last event).
    pub ttl: Duration,
    /// First part of the Redis keys: `<key_prefix>:{<userId>}:m` (epoch and top offset) and
    /// `<key_prefix>:{<userId>}:h` (the events). The braces keep both in one cluster slot.
    pub key_prefix: String,
    /// The user channel the append publishes on is `<channel_prefix><userId>` (the feed
    /// hub's `feed-<userId>`).
    pub channel_prefix: String,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: DEFAULT_HISTORY_SIZE,
            ttl: DEFAULT_HISTORY_TTL,
            key_prefix: "feedhub".to_string(),
            channel_prefix: "feed-".to_string(),
        }
    }
}

impl HistoryConfig {
    /// How long a user's position is kept after their last event: max(4 × ttl, 24 h).
    pub fn meta_ttl(&self) -> Duration {
        (self.ttl * 4).max(MIN_META_TTL)
    }

    /// The Redis key of `user`'s position (a hash: `e` epoch, `s` top offset).
    pub fn meta_key(&self, user: &str) -> String {
        let mut key = String::new();
        self.write_key(&mut key, user, UserKey::Meta);
        key
    }

    /// The Redis key of `user`'s events (a stream; entry id `<offset>-0`).
    pub fn stream_key(&self, user: &str) -> String {
        let mut key = String::new();
        self.write_key(&mut key, user, UserKey::Stream);
        key
    }

    /// Replaces `out` with one of `user`'s keys (`<key_prefix>:{<user>}:m` or `:h`), reusing
    /// its buffer.
    pub(crate) fn write_key(&self, out: &mut String, user: &str, which: UserKey) {
        out.clear();
        out.push_str(&self.key_prefix);
        out.push_str(":{");
        out.push_str(user);
        out.push_str(match which {
            UserKey::Meta => "}:m",
            UserKey::Stream => "}:h",
        });
    }

    /// The channel an append for `user` publishes on.
    pub fn channel(&self, user: &str) -> super::Channel {
        let mut name = String::new();
        self.write_channel(&mut name, user);
        super::Channel::new(&name)
    }

    /// Replaces `out` with the name of [`HistoryConfig::channel`], reusing its buffer.
    pub(crate) fn write_channel(&self, out: &mut String, user: &str) {
        out.clear();
        out.push_str(&self.channel_prefix);
        out.push_str(user);
    }
}

/// Which of a user's two Redis keys.
#[derive(Debug, Clone, Copy)]
pub(crate) enum UserKey {
    /// The position (hash).
    Meta,
    /// The events (stream).
    Stream,
}

/// One event to append to one user's history (and publish on their channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedAppend {
    /// The recipient.
    pub user: String,
    /// The event id (empty: none). A redelivered event with the same id is found again
    /// instead of being appended twice.
    pub id: String,
    /// The payload's JSON text, the id already inserted (`FeedEvent::payload_with_id`).
    pub payload: Bytes,
    /// This event may have been appended before (a RabbitMQ redelivery): look for its id
    /// among the newest [`REDELIVERY_SCAN`] events first.
    pub redelivered: bool,
}

/// Where an append landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The event's offset in its user's history.
    pub offset: u64,
    /// The history's epoch.
    pub epoch: Arc<str>,
    /// The event was found already appended (redelivery): not stored or published again.
    pub duplicate: bool,
}

/// A read of one user's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The history's epoch.
    pub epoch: Arc<str>,
    /// The newest offset (0: nothing was ever appended in this epoch).
    pub offset: u64,
    /// The events asked for, oldest first: (offset, payload as appended, without offset).
    pub events: Vec<(u64, Bytes)>,
    /// The events are exactly `since+1 ..= offset`: nothing was trimmed, expired or cut by
    /// the limit, and `since` is not ahead of the top. Always true for `since = None`.
    pub complete: bool,
}

impl HistoryPage {
    /// Computes `complete` for a read after `since` that returned `events` with the top at
    /// `offset`.
    pub fn is_complete(since: Option<u64>, offset: u64, events: &[(u64, Bytes)]) -> bool {
        let Some(since) = since else {
            return true;
        };
        if since > offset {
            return false;
        }
        let want = offset - since;
        events.len() as u64 == want && events.first().is_none_or(|(o, _)| *o == since + 1)
    }
}

/// The payload as delivered: `"offset":<offset>` added as the last member when `payload` is
/// a JSON object; `None` when it is not an object (then it is delivered unchanged). The
/// text is spliced, not re-encoded, so numbers and key order survive. `payload` must be
/// valid JSON (it was validated at ingest).
pub fn splice_offset(payload: &[u8], offset: u64) -> Option<Bytes> {
    let start = payload.iter().position(|b| !b.is_ascii_whitespace())?;
    let end = payload.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if payload[start] != b'{' || payload[end] != b'}' || end <= start {
        return None;
    }
    let inner_empty = payload[start + 1..end]
        .iter()
        .all(|b| b.is_ascii_whitespace());
    let mut out = Vec::with_capacity(end - start + 32);
    if inner_empty {
        out.push(b'{');
    } else {
        out.extend_from_slice(&payload[start..end]);
        out.push(b',');
    }
    out.extend_from_slice(b"\"offset\":");
    out.extend_from_slice(offset.to_string().as_bytes());
    out.push(b'}');
    Some(Bytes::from(out))
}

/// Whether a JSON object payload has a top-level `offset` member (reserved by feedhub:
/// such events are refused at ingest). Non-objects and invalid JSON: false.
pub fn has_reserved_offset(payload: &[u8]) -> bool {
    std::str::from_utf8(payload)
        .ok()
        .and_then(object_members)
        .is_some_and(|m| m.offset)
}

/// What [`object_members`] found at the top level of a JSON object.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Members {
    /// The object has at least one member.
    pub any: bool,
    /// It has an `id` member.
    pub id: bool,
    /// It has an `offset` member.
    pub offset: bool,
}

/// The top-level members of `text` that feedhub cares about, when `text` is a JSON object
/// (leading and trailing whitespace allowed); `None` when it is not an object or not valid
/// JSON. One pass, nothing allocated: keys are compared as they are read (escapes
/// decoded), values are skipped as raw JSON, without serde_json's recursion limit (the
/// ingest bounds the depth itself).
pub fn object_members(text: &str) -> Option<Members> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::from_str::<MembersOf>(text).ok().map(|m| m.0)
}

struct MembersOf(Members);

/// A top-level key, as far as feedhub cares.
enum Key {
    Id,
    Offset,
    Other,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(match k {
                    "id" => Key::Id,
                    "offset" => Key::Offset,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

impl<'de> serde::Deserialize<'de> for MembersOf {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MembersOf, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MembersOf;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<MembersOf, A::Error> {
                let mut m = Members::default();
                while let Some(key) = map.next_key::<Key>()? {
                    m.any = true;
                    match key {
                        Key::Id => m.id = true,
                        Key::Offset => m.offset = true,
                        Key::Other => {}
                    }
                    map.next_value::<&'de serde_json::value::RawValue>()?;
                }
                Ok(MembersOf(m))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: Option<Bytes>) -> Option<String> {
        b.map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn offset_is_spliced_into_objects_only() {
        assert_eq!(
            s(splice_offset(br#"{"id":"e1","a":1}"#, 7)).as_deref(),
            Some(r#"{"id":"e1","a":1,"offset":7}"#)
        );
        assert_eq!(
            s(splice_offset(b" { } \n", 1)).as_deref(),
            Some(r#"{"offset":1}"#)
        );
        assert_eq!(
            s(splice_offset(b"{\"a\":{\"b\":[1,2]} }", u64::MAX)).as_deref(),
            Some("{\"a\":{\"b\":[1,2]} ,\"offset\":18446744073709551615}")
        );
        for not_object in [&b"[1,2]"[..], b"\"text\"", b"12", b"null", b"", b"  "] {
            assert_eq!(splice_offset(not_object, 3), None);
        }
        // Big numbers and key order survive (no re-encoding).
        let big = br#"{"n":123456789012345678901234567890,"z":1,"a":2}"#;
        let out = s(splice_offset(big, 2)).unwrap();
        assert!(out.starts_with(r#"{"n":123456789012345678901234567890,"z":1,"a":2"#));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["offset"], 2);
    }

    #[test]
    fn reserved_offset_is_detected() {
        assert!(has_reserved_offset(br#"{"offset":1}"#));
        assert!(has_reserved_offset(br#" {"a":1,"\u006fffset":1}"#));
        assert!(!has_reserved_offset(br#"{"a":{"offset":1}}"#));
        assert!(!has_reserved_offset(br#"[{"offset":1}]"#));
        assert!(!has_reserved_offset(b"{oops"));
        assert!(!has_reserved_offset(br#"{"offset":1} x"#));
        // Values are skipped without a recursion limit: a deep value does not hide it.
        let deep = format!(
            r#"{{"a":{}{},"offset":1}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert!(has_reserved_offset(deep.as_bytes()));
    }

    #[test]
    fn object_members_are_found_in_one_pass() {
        let m = |t: &str| object_members(t);
        let members = |any, id, offset| Some(Members { any, id, offset });
        assert_eq!(m(" {} "), members(false, false, false));
        assert_eq!(
            m(r#"{"a":{"id":1},"b":[{"offset":2}]}"#),
            members(true, false, false)
        );
        assert_eq!(
            m(r#"{"\u0069d":1,"offset":null}"#),
            members(true, true, true)
        );
        assert_eq!(m(r#"{"id":1,"id":2}"#), members(true, true, false));
        for not in [
            "[1]",
            "1",
            "\"{}\"",
            "{",
            "{\"a\"}",
            "{\"a\":1,}",
            "{} {}",
            "",
        ] {
            assert_eq!(m(not), None, "{not}");
        }
    }

    #[test]
    fn completeness() {
        let ev =
            |r: std::ops::RangeInclusive<u64>| r.map(|o| (o, Bytes::new())).collect::<Vec<_>>();
        assert!(HistoryPage::is_complete(None, 5, &ev(3..=5)));
        assert!(HistoryPage::is_complete(Some(5), 5, &[]));
        assert!(HistoryPage::is_complete(Some(2), 5, &ev(3..=5)));
        assert!(!HistoryPage::is_complete(Some(1), 5, &ev(3..=5)), "trimmed");
        assert!(!HistoryPage::is_complete(Some(6), 5, &[]), "ahead");
        assert!(!HistoryPage::is_complete(Some(0), 5, &ev(1..=3)), "limited");
        assert!(!HistoryPage::is_complete(Some(2), 5, &[]), "expired");
    }

    #[test]
    fn keys_share_a_slot() {
        let c = HistoryConfig::default();
        assert_eq!(c.meta_key("42"), "feedhub:{42}:m");
        assert_eq!(c.stream_key("42"), "feedhub:{42}:h");
        assert_eq!(c.channel("42").as_str(), "feed-42");
        assert_eq!(c.meta_ttl(), MIN_META_TTL);
    }
}
