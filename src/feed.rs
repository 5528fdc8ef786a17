//! The feed hub at `/hubs/feed`: authenticated users only; every connection is registered
//! under its user id, and the user's backplane channel is `feed-<userId>`.
//!
//! Feed events (RabbitMQ, `POST /api/feed`, `FeedUpdated` sends to users from Rust) are
//! appended to the user's history and reach every connection of the user on every node as
//! `FeedUpdated(<payload>)`, object payloads carrying `"offset"` (see
//! [`crate::backplane::history`]). A raw `PUBLISH feed-42 <json>` from anyone is delivered
//! live as `FeedUpdated(<json>)`, without an offset and without being stored.
//!
//! Methods:
//! - `WhoAmI()`: the connection's user id.
//! - `Recover(null | {"offset": <int>, "epoch": "<string>"})` →
//!   `{"events": [...], "recovered": <bool>, "offset": <int>, "epoch": "<string>"}`: the
//!   events after `offset` (the same objects `FeedUpdated` carries), or with `null` the
//!   newest ones (a page's first load). `recovered` is false, with no events, when the
//!   epoch differs (the history was lost), the offset is ahead of the history, or the
//!   missed events are no longer all kept or exceed the recover limit: then the client
//!   reloads from its own source and continues from the returned position. A malformed
//!   argument is a Completion error.

use bytes::Bytes;

use crate::backplane::channel::UserChannelStyle;
use crate::backplane::history::splice_offset;
use crate::backplane::HistoryPage;
use crate::hub::{HubBuilder, HubContext, HubDefinition, HubError};
use crate::ids::UserId;
use crate::metrics::{inc, METRICS};
use crate::protocol::Value;

/// The path of the feed hub.
pub const FEED_HUB_PATH: &str = "/hubs/feed";

/// The client method feed events invoke.
pub const FEED_TARGET: &str = "FeedUpdated";

/// The feed hub declaration.
pub fn feed_hub() -> HubDefinition {
    let hub = HubBuilder::new(FEED_HUB_PATH).configure(|o| {
        o.require_auth = true;
        o.user_channels = UserChannelStyle::Plain("feed-".to_string());
        o.feed_target = FEED_TARGET.to_string();
        // A feed must not lose events over a network blip: resume on a new socket.
        o.stateful_reconnect = true;
        // Offsets, Recover and gap repair.
        o.history = true;
    });
    feed_methods(hub).build()
}

/// Adds the feed hub's methods (`WhoAmI`, `Recover`) to a hub declaration (e.g. a test hub
/// built on the feed hub's options).
pub fn feed_methods(hub: HubBuilder) -> HubBuilder {
    hub
        // Lets a page show who it is connected as (and check the connection end to end).
        .method("WhoAmI", |ctx: HubContext, (): ()| async move {
            Ok::<_, HubError>(ctx.user_id().map(str::to_string))
        })
        .method("Recover", |ctx: HubContext, (arg,): (Value,)| async move {
            recover(&ctx, &arg).await
        })
}

/// Where a client's `Recover` asks to continue from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoverFrom {
    /// `null`: the newest events and the position (a first load).
    Newest,
    /// After `offset` (`None`: beyond any possible offset) of history `epoch`.
    After {
        /// The last offset the client applied.
        offset: Option<u64>,
        /// The epoch it was in.
        epoch: String,
    },
}

/// Parses `Recover`'s argument strictly: `null`, or an object with exactly an integer
/// `offset` ≥ 0 and a string `epoch`. Offsets too large for 64 bits are accepted (and will
/// not be recovered); anything else is an error with a message for the client.
pub fn parse_recover_arg(arg: &serde_json::Value) -> Result<RecoverFrom, String> {
    use serde_json::Value as J;
    const USAGE: &str = "Recover takes null or {\"offset\": <integer>, \"epoch\": <string>}";
    let obj = match arg {
        J::Null => return Ok(RecoverFrom::Newest),
        J::Object(o) => o,
        _ => return Err(format!("{USAGE}.")),
    };
    if let Some(k) = obj.keys().find(|k| *k != "offset" && *k != "epoch") {
        return Err(format!("{USAGE}: unknown field {k:?}."));
    }
    let offset = match obj.get("offset") {
        None => return Err(format!("{USAGE}: 'offset' is missing.")),
        Some(J::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Some(u)
            } else if n.as_i64().is_some() {
                return Err("'offset' must not be negative.".into());
            } else {
                match n.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 => {
                        if f >= u64::MAX as f64 {
                            None
                        } else {
                            Some(f as u64)
                        }
                    }
                    _ => return Err("'offset' must be a non-negative integer.".into()),
                }
            }
        }
        Some(_) => return Err("'offset' must be a non-negative integer.".into()),
    };
    let epoch = match obj.get("epoch") {
        None => return Err(format!("{USAGE}: 'epoch' is missing.")),
        Some(J::String(s)) => s.clone(),
        Some(_) => return Err("'epoch' must be a string.".into()),
    };
    Ok(RecoverFrom::After { offset, epoch })
}

/// The `Recover` answer's JSON text: the events (offset spliced into object payloads),
/// whether they are complete, and the position.
pub fn recover_reply(page: &HistoryPage, recovered: bool) -> Bytes {
    let events: &[(u64, Bytes)] = if recovered { &page.events } else { &[] };
    let mut out = Vec::with_capacity(64 + events.iter().map(|(_, p)| p.len() + 16).sum::<usize>());
    out.extend_from_slice(b"{\"events\":[");
    for (i, (offset, payload)) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match splice_offset(payload, *offset) {
            Some(b) => out.extend_from_slice(&b),
            None => out.extend_from_slice(payload),
        }
    }
    out.extend_from_slice(b"],\"recovered\":");
    out.extend_from_slice(if recovered { b"true" } else { b"false" });
    out.extend_from_slice(b",\"offset\":");
    out.extend_from_slice(page.offset.to_string().as_bytes());
    out.extend_from_slice(b",\"epoch\":");
    // An epoch is made by feedhub (hex digits), but escape it anyway.
    let epoch = serde_json::to_string(&*page.epoch).unwrap_or_else(|_| "\"\"".into());
    out.extend_from_slice(epoch.as_bytes());
    out.push(b'}');
    Bytes::from(out)
}

/// Which result a `Recover` had (the `feedhub_recover_total` label index).
fn count(result: usize) {
    if let Some(c) = METRICS.recover.get(result) {
        inc(c);
    }
}

async fn recover(ctx: &HubContext, arg: &Value) -> Result<Value, HubError> {
    let parsed = arg
        .to_json_string()
        .map_err(|e| e.to_string())
        .and_then(|text| {
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string())
        })
        .and_then(|v| parse_recover_arg(&v));
    let from = match parsed {
        Ok(f) => f,
        Err(e) => {
            count(2);
            return Err(HubError::new(e));
        }
    };
    let user = ctx
        .user_id()
        .and_then(|u| UserId::new(u).ok())
        .ok_or_else(|| HubError::new("Recover needs an authenticated user."))?;
    let hub = &ctx.lifetime;
    let limit = hub.definition().options.recover_limit.max(1);
    let (since, epoch) = match &from {
        RecoverFrom::Newest => (None, None),
        RecoverFrom::After { offset, epoch } => (Some(offset.unwrap_or(u64::MAX)), Some(epoch)),
    };
    let page = match hub.read_history(&user, since, limit).await {
        Ok(p) => p,
        Err(e) => {
            count(3);
            tracing::warn!(user = %user, error = %e, "Recover: history read failed");
            return Err(HubError::new(format!(
                "Recover failed: the history is unavailable ({e}); retry later."
            )));
        }
    };
    let recovered = match (&from, epoch) {
        (RecoverFrom::Newest, _) => true,
        (RecoverFrom::After { offset, .. }, Some(e)) => {
            offset.is_some() && **e == *page.epoch && page.complete
        }
        _ => false,
    };
    count(if recovered { 0 } else { 1 });
    Ok(Value::json_unchecked(recover_reply(&page, recovered)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    #[test]
    fn recover_arguments_are_parsed_strictly() {
        assert_eq!(parse_recover_arg(&json!(null)), Ok(RecoverFrom::Newest));
        assert_eq!(
            parse_recover_arg(&json!({"offset": 7, "epoch": "ab"})),
            Ok(RecoverFrom::After {
                offset: Some(7),
                epoch: "ab".into()
            })
        );
        assert_eq!(
            parse_recover_arg(&json!({"offset": 1e30, "epoch": "ab"})),
            Ok(RecoverFrom::After {
                offset: None,
                epoch: "ab".into()
            }),
            "huge: accepted, never recovered"
        );
        assert_eq!(
            parse_recover_arg(&json!({"offset": 3.0, "epoch": ""})),
            Ok(RecoverFrom::After {
                offset: Some(3),
                epoch: "".into()
            })
        );
        for bad in [
            json!(7),
            json!("x"),
            json!([1, "e"]),
            json!({}),
            json!({"offset": 1}),
            json!({"epoch": "e"}),
            json!({"offset": -1, "epoch": "e"}),
            json!({"offset": 1.5, "epoch": "e"}),
            json!({"offset": "1", "epoch": "e"}),
            json!({"offset": null, "epoch": "e"}),
            json!({"offset": 1, "epoch": 5}),
            json!({"offset": 1, "epoch": "e", "extra": true}),
        ] {
            let e = parse_recover_arg(&bad).expect_err(&bad.to_string());
            assert!(!e.is_empty());
        }
    }

    #[test]
    fn the_reply_carries_spliced_events_and_the_position() {
        let page = HistoryPage {
            epoch: Arc::from("e1"),
            offset: 3,
            events: vec![
                (2, Bytes::from_static(br#"{"id":"a","t":1}"#)),
                (3, Bytes::from_static(b"[1]")),
            ],
            complete: true,
        };
        let text = recover_reply(&page, true);
        let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(
            v,
            json!({"events":[{"id":"a","t":1,"offset":2},[1]],"recovered":true,"offset":3,"epoch":"e1"})
        );
        let v: serde_json::Value = serde_json::from_slice(&recover_reply(&page, false)).unwrap();
        assert_eq!(
            v,
            json!({"events":[],"recovered":false,"offset":3,"epoch":"e1"})
        );
    }
}
