//! The Redis side of the feed history: the Lua script `history.lua` (loaded once per
//! connection with `SCRIPT LOAD`, run with `EVALSHA`; a `NOSCRIPT` reply, after a Redis
//! restart or `SCRIPT FLUSH`, loads it again and retries the script calls that failed), and
//! the decoding of its replies.
//!
//! Cost: a batch of appends is one `EVALSHA` per group of up to [`APPEND_GROUP`] events
//! (the ingest's batches, 256 by default, are one call), all groups pipelined: **one round
//! trip per batch**. Inside, per distinct user of the call: one HMGET of the position and
//! two EXPIREs; per event: XADD with exact MAXLEN, HSET of the top offset, PUBLISH (plus
//! an XREVRANGE of up to 512 entries for a redelivery). Bytes sent per event: the payload
//! once, the event id, and about 20 bytes of framing and user index; per distinct user of
//! the call: its two keys, channel and envelope head (about 110 bytes with the default
//! prefixes). Reply: per event one integer (`:<offset>`), per user its epoch. Measured
//! (README, "Cost per event (Redis)"): Redis spends most of an event's time in the six
//! commands and the exact trim, not in the per-call overhead batching removed.
//!
//! **Order across the calls of one batch.** Calls after the first are chained by a fence
//! key (see `history.lua`): a call runs only if the one before it ran to its end, else it
//! answers `FENCED` and changes nothing. So when a call fails (a Redis error, or `NOSCRIPT`
//! because the script cache was emptied, even if another node loads the script again before
//! the rest of the pipeline runs), nothing after it is stored or published; after a
//! `NOSCRIPT` the calls from the first one that did not run are sent again, in order.
//!
//! **Redis Cluster.** One call touches the keys of many users, which standalone Redis (what
//! the backplane connects to) allows. A cluster refuses keys of several hash slots in one
//! script (`CROSSSLOT`): a cluster deployment would need the groups built per hash slot
//! (the `{<user>}` hash tag keeps each user's two keys in one slot, so a user's events stay
//! in one group sequence and keep their order), with a fence per slot, at the price of
//! more, smaller calls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::Value;

use super::history::{Appended, FeedAppend, HistoryConfig, HistoryPage, UserKey};
use super::{envelope, new_epoch, BackplaneError};

/// The script's text.
pub const SCRIPT: &str = include_str!("history.lua");

/// The script, its SHA1 (as `SCRIPT LOAD` answered), and whether the current connection
/// has loaded it.
#[derive(Debug)]
pub(super) struct HistoryScript {
    sha: std::sync::RwLock<String>,
    loaded: AtomicBool,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> BackplaneError {
    BackplaneError::Unavailable(format!("Redis {what}: {e}"))
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript))
}

/// The script's answer when an earlier call of the same batch did not run to its end.
fn is_fenced(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "FENCED")
}

impl HistoryScript {
    pub(super) fn new() -> HistoryScript {
        HistoryScript {
            sha: std::sync::RwLock::new(String::new()),
            loaded: AtomicBool::new(false),
        }
    }

    fn sha(&self) -> String {
        self.sha.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A new connection has not loaded the script yet.
    pub(super) fn reset(&self) {
        self.loaded.store(false, Ordering::Release);
    }

    /// `SCRIPT LOAD`s it (once per connection, and again after `NOSCRIPT`).
    pub(super) async fn load(
        &self,
        conn: &mut MultiplexedConnection,
        timeout: Duration,
    ) -> Result<(), BackplaneError> {
        let cmd = redis::cmd("SCRIPT").arg("LOAD").arg(SCRIPT).to_owned();
        let sha: String = tokio::time::timeout(timeout, cmd.query_async(conn))
            .await
            .map_err(|_| unavailable("SCRIPT LOAD", "timed out"))?
            .map_err(|e| unavailable("SCRIPT LOAD", e))?;
        if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unavailable(
                "SCRIPT LOAD",
                format!("unexpected SHA {sha:?}"),
            ));
        }
        *self.sha.write().unwrap_or_else(|p| p.into_inner()) = sha;
        self.loaded.store(true, Ordering::Release);
        Ok(())
    }

    async fn ensure_loaded(
        &self,
        conn: &mut MultiplexedConnection,
        timeout: Duration,
    ) -> Result<(), BackplaneError> {
        if self.loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        self.load(conn, timeout).await
    }

    /// Runs one pipeline of commands, returning one reply per command. A timeout is not a
    /// connection failure (the multiplexed connection drops the late replies).
    async fn run(
        conn: &mut MultiplexedConnection,
        cmds: Vec<redis::Cmd>,
        timeout: Duration,
    ) -> Result<Vec<Value>, Failure> {
        let mut pipe = redis::pipe();
        for c in cmds {
            pipe.add_command(c);
        }
        pipe.ignore_errors();
        match tokio::time::timeout(timeout, pipe.query_async::<Vec<Value>>(conn)).await {
            Ok(r) => r.map_err(Failure::Connection),
            Err(_) => Err(Failure::Refused(unavailable(
                "history script",
                format!("no reply within {timeout:?}"),
            ))),
        }
    }

    /// Appends (and publishes) `batch` in order: one EVALSHA per group of up to
    /// [`APPEND_GROUP`] events, all groups in one pipeline.
    pub(super) async fn append(
        &self,
        conn: &mut MultiplexedConnection,
        cfg: &HistoryConfig,
        origin: &str,
        batch: &[FeedAppend],
        timeout: Duration,
    ) -> Result<Vec<Appended>, Failure> {
        self.ensure_loaded(conn, timeout).await?;
        let sha = self.sha();
        let epoch = new_epoch();
        let groups: Vec<Group<'_>> = batch
            .chunks(APPEND_GROUP)
            .map(Group::new)
            .collect::<Result<_, _>>()
            .map_err(Failure::Refused)?;
        let mut done = Vec::with_capacity(batch.len());
        // Groups before `next` are appended. A retry starts at the first group that did
        // not run (NOSCRIPT, or FENCED behind one that did not run), in a new chain.
        let mut next = 0;
        for attempt in 0..2 {
            let rest = groups.get(next..).unwrap_or_default();
            let fence = (rest.len() > 1)
                .then(|| format!("{}:append:{:016x}", cfg.key_prefix, rand::random::<u64>()));
            let cmds = rest.iter().enumerate().map(|(k, g)| {
                let step = Step {
                    fence: fence.as_deref(),
                    step: k + 1,
                    steps: rest.len(),
                };
                g.command(&sha, cfg, origin, &epoch, &step)
            });
            let replies = Self::run(conn, cmds.collect(), timeout).await?;
            if replies.len() != rest.len() {
                return Err(Failure::Refused(bad("pipeline reply length")));
            }
            let mut rerun = false;
            for (g, reply) in rest.iter().zip(&replies) {
                if is_noscript(reply) || is_fenced(reply) {
                    rerun = true;
                    break;
                }
                done.extend(g.parse(reply)?);
                next += 1;
            }
            if !rerun {
                return Ok(done);
            }
            if attempt == 1 {
                return Err(Failure::Refused(unavailable(
                    "EVALSHA",
                    "NOSCRIPT (or FENCED) right after SCRIPT LOAD",
                )));
            }
            // The script cache was emptied (Redis restarted, SCRIPT FLUSH): load it and
            // retry the groups that did not run, in order.
            self.reset();
            self.load(conn, timeout).await?;
        }
        Err(Failure::Refused(bad("append retries exhausted")))
    }

    /// Reads `user`'s events after `since` (`None`: the newest), at most `limit`.
    pub(super) async fn read(
        &self,
        conn: &mut MultiplexedConnection,
        cfg: &HistoryConfig,
        user: &str,
        since: Option<u64>,
        limit: usize,
        timeout: Duration,
    ) -> Result<HistoryPage, Failure> {
        self.ensure_loaded(conn, timeout).await?;
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.sha())
            .arg(2)
            .arg(cfg.meta_key(user))
            .arg(cfg.stream_key(user))
            .arg("r")
            .arg(&*new_epoch())
            .arg(cfg.meta_ttl().as_secs().max(1))
            .arg(since.map(|s| s.to_string()).unwrap_or_default())
            .arg(limit);
        let mut reply = Self::run(conn, vec![c.clone()], timeout).await?;
        if reply.first().is_some_and(is_noscript) {
            self.reset();
            self.load(conn, timeout).await?;
            reply = Self::run(conn, vec![c], timeout).await?;
        }
        let reply = reply
            .into_iter()
            .next()
            .ok_or_else(|| Failure::Refused(unavailable("EVALSHA", "no reply")))?;
        parse_page(reply, since).map_err(Failure::Refused)
    }
}

/// Most events in one `EVALSHA` of the append script. Bounds the time Redis spends in one
/// script call (every other client waits meanwhile: about 3 ms for 256 events on an idle
/// machine) and the size of one command; a larger batch (a big recipients list) becomes
/// several calls in the same pipeline.
pub const APPEND_GROUP: usize = 256;

/// Where a script call stands in its batch's chain (see the fence in `history.lua`).
struct Step<'a> {
    /// The chain's key; `None` for a batch of one call.
    fence: Option<&'a str>,
    /// 1-based.
    step: usize,
    steps: usize,
}

/// The events of one script call, with the distinct users they go to (the call's keys).
struct Group<'a> {
    events: &'a [FeedAppend],
    /// Distinct users, in order of first appearance (user `u` is `users[u - 1]`).
    users: Vec<&'a str>,
    /// For each event, the 1-based index of its user in `users`.
    user_of: Vec<usize>,
}

impl<'a> Group<'a> {
    fn new(events: &'a [FeedAppend]) -> Result<Group<'a>, BackplaneError> {
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(events.len());
        let mut users = Vec::new();
        let mut user_of = Vec::with_capacity(events.len());
        for e in events {
            // The envelope carries the payload as a MessagePack str: it must be UTF-8.
            if std::str::from_utf8(&e.payload).is_err() {
                return Err(BackplaneError::Encode(
                    "JSON argument is not UTF-8".to_string(),
                ));
            }
            let u = *index.entry(e.user.as_str()).or_insert_with(|| {
                users.push(e.user.as_str());
                users.len()
            });
            user_of.push(u);
        }
        Ok(Group {
            events,
            users,
            user_of,
        })
    }

    /// `EVALSHA sha 2U(+1) <meta, stream per user> (fence) a epoch meta_ttl size ttl U step
    /// steps <channel, head per user> <±u, id, payload per event>` (see `history.lua`).
    fn command(
        &self,
        sha: &str,
        cfg: &HistoryConfig,
        origin: &str,
        epoch: &str,
        step: &Step<'_>,
    ) -> redis::Cmd {
        let (users, events) = (self.users.len(), self.events.len());
        let per_user = 2 * cfg.key_prefix.len() + cfg.channel_prefix.len() + origin.len() + 24;
        let data = 256
            + self
                .users
                .iter()
                .map(|u| 4 * u.len() + per_user)
                .sum::<usize>()
            + self
                .events
                .iter()
                .map(|e| e.payload.len() + e.id.len() + 8)
                .sum::<usize>();
        let mut c = redis::Cmd::with_capacity(12 + 4 * users + 3 * events, data);
        c.arg("EVALSHA")
            .arg(sha)
            .arg(2 * users + usize::from(step.fence.is_some()));
        // One scratch buffer for every key, channel and head (Cmd::arg copies).
        let mut text = String::with_capacity(64);
        for user in &self.users {
            cfg.write_key(&mut text, user, UserKey::Meta);
            c.arg(text.as_str());
            cfg.write_key(&mut text, user, UserKey::Stream);
            c.arg(text.as_str());
        }
        if let Some(fence) = step.fence {
            c.arg(fence);
        }
        c.arg("a")
            .arg(epoch)
            .arg(cfg.meta_ttl().as_secs().max(1))
            .arg(cfg.size.max(1))
            .arg(cfg.ttl.as_secs().max(1))
            .arg(users)
            .arg(step.step)
            .arg(step.steps);
        let mut head = Vec::with_capacity(64);
        for user in &self.users {
            cfg.write_channel(&mut text, user);
            envelope::write_feed_head(&mut head, origin, user);
            c.arg(text.as_str()).arg(head.as_slice());
        }
        for (e, u) in self.events.iter().zip(&self.user_of) {
            let u = *u as i64;
            c.arg(if e.redelivered { -u } else { u })
                .arg(&e.id)
                .arg(&e.payload[..]);
        }
        c
    }

    /// The script's reply: the users' epochs, then per event its offset (negative: a
    /// duplicate).
    fn parse(&self, v: &Value) -> Result<Vec<Appended>, BackplaneError> {
        if let Some(e) = server_error(v) {
            return Err(e);
        }
        let Value::Array(items) = v else {
            return Err(bad("append reply is not an array"));
        };
        if items.len() != self.users.len() + self.events.len() {
            return Err(bad("append reply length"));
        }
        let (epochs, offsets) = items.split_at(self.users.len());
        let epochs = epochs
            .iter()
            .map(|e| text(e).ok_or_else(|| bad("epoch")))
            .collect::<Result<Vec<_>, _>>()?;
        offsets
            .iter()
            .zip(&self.user_of)
            .map(|(o, u)| {
                let Value::Int(o) = o else {
                    return Err(bad("offset"));
                };
                let epoch = epochs.get(u - 1).ok_or_else(|| bad("user index"))?;
                Ok(Appended {
                    offset: o.unsigned_abs(),
                    epoch: epoch.clone(),
                    duplicate: *o < 0,
                })
            })
            .collect()
    }
}

/// Why a script call failed.
#[derive(Debug)]
pub(super) enum Failure {
    /// The connection failed (reconnect it).
    Connection(redis::RedisError),
    /// Redis answered with an error, or something unexpected.
    Refused(BackplaneError),
}

impl From<redis::RedisError> for Failure {
    fn from(e: redis::RedisError) -> Self {
        Failure::Connection(e)
    }
}

impl From<BackplaneError> for Failure {
    fn from(e: BackplaneError) -> Self {
        Failure::Refused(e)
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<Arc<str>> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok().map(Arc::from),
        Value::SimpleString(s) => Some(Arc::from(s.as_str())),
        _ => None,
    }
}

fn bad(what: &str) -> BackplaneError {
    BackplaneError::Unavailable(format!("unexpected reply from the history script: {what}"))
}

fn server_error(v: &Value) -> Option<BackplaneError> {
    match v {
        Value::ServerError(e) => Some(unavailable("history script", e)),
        _ => None,
    }
}

/// `<offset>-<n>` → offset.
fn entry_offset(id: &Value) -> Option<u64> {
    let t = text(id)?;
    t.split('-').next()?.parse().ok()
}

fn parse_page(v: Value, since: Option<u64>) -> Result<HistoryPage, BackplaneError> {
    if let Some(e) = server_error(&v) {
        return Err(e);
    }
    let Value::Array(items) = v else {
        return Err(bad("read reply is not an array"));
    };
    let [epoch, top, entries, newest_first] =
        <[Value; 4]>::try_from(items).map_err(|_| bad("read reply length"))?;
    let epoch = text(&epoch).ok_or_else(|| bad("epoch"))?;
    let top = int(&top).ok_or_else(|| bad("top"))?;
    let Value::Array(entries) = entries else {
        return Err(bad("entries"));
    };
    let mut events = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(parts) = entry else {
            return Err(bad("entry"));
        };
        let [id, fields] = <[Value; 2]>::try_from(parts).map_err(|_| bad("entry length"))?;
        let offset = entry_offset(&id).ok_or_else(|| bad("entry id"))?;
        let Value::Array(fields) = fields else {
            return Err(bad("entry fields"));
        };
        let mut payload = None;
        for pair in fields.chunks(2) {
            if let [Value::BulkString(k), Value::BulkString(val)] = pair {
                if k == b"d" {
                    payload = Some(Bytes::from(val.clone()));
                }
            }
        }
        events.push((offset, payload.ok_or_else(|| bad("entry without payload"))?));
    }
    if int(&newest_first) == Some(1) {
        events.reverse();
    }
    let complete = HistoryPage::is_complete(since, top, &events);
    Ok(HistoryPage {
        epoch,
        offset: top,
        events,
        complete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_decode() {
        let ev = |user: &str, redelivered: bool| FeedAppend {
            user: user.into(),
            id: "e".into(),
            payload: Bytes::from_static(b"{}"),
            redelivered,
        };
        let events = [ev("a", false), ev("b", true), ev("a", false)];
        let g = Group::new(&events).unwrap();
        assert_eq!(
            (g.users.as_slice(), g.user_of.as_slice()),
            (&["a", "b"][..], &[1, 2, 1][..])
        );
        let ep = |e: &str| Value::BulkString(e.as_bytes().to_vec());
        let done = g
            .parse(&Value::Array(vec![
                ep("ea"),
                ep("eb"),
                Value::Int(7),
                Value::Int(-3),
                Value::Int(8),
            ]))
            .unwrap();
        let got: Vec<_> = done
            .iter()
            .map(|a| (a.offset, &*a.epoch, a.duplicate))
            .collect();
        assert_eq!(got, [(7, "ea", false), (3, "eb", true), (8, "ea", false)]);
        assert!(g.parse(&Value::Nil).is_err());
        assert!(g
            .parse(&Value::Array(vec![ep("ea"), ep("eb"), Value::Int(7)]))
            .is_err());
        // The command: keys per user, then the fixed arguments, per user, per event.
        let cfg = HistoryConfig::default();
        let step = Step {
            fence: None,
            step: 1,
            steps: 1,
        };
        let args: Vec<Vec<u8>> = g
            .command("sha", &cfg, "n1", "ep", &step)
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let text = |i: usize| String::from_utf8_lossy(&args[i]).into_owned();
        assert_eq!(args.len(), 1 + 2 + 4 + 8 + 4 + 9);
        assert_eq!(
            (text(1), text(2), text(3)),
            ("sha".into(), "4".into(), "feedhub:{a}:m".into())
        );
        assert_eq!(text(6), "feedhub:{b}:h");
        assert_eq!(
            (text(7), text(8), text(12), text(13), text(14)),
            ("a".into(), "ep".into(), "2".into(), "1".into(), "1".into())
        );
        assert_eq!(text(15), "feed-a");
        assert_eq!(args[16], envelope::feed_head("n1", "a"));
        assert_eq!(
            (text(19), text(22), text(25)),
            ("1".into(), "-2".into(), "1".into())
        );
        let bad_utf8 = [FeedAppend {
            payload: Bytes::from_static(b"\xff"),
            ..ev("a", false)
        }];
        assert!(Group::new(&bad_utf8).is_err());
        let entry = |o: u64, d: &str| {
            Value::Array(vec![
                Value::BulkString(format!("{o}-0").into_bytes()),
                Value::Array(vec![
                    Value::BulkString(b"d".to_vec()),
                    Value::BulkString(d.as_bytes().to_vec()),
                    Value::BulkString(b"i".to_vec()),
                    Value::BulkString(b"x".to_vec()),
                ]),
            ])
        };
        let page = parse_page(
            Value::Array(vec![
                Value::BulkString(b"ep".to_vec()),
                Value::Int(3),
                Value::Array(vec![entry(3, "{}"), entry(2, "[1]")]),
                Value::Int(1),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(page.offset, 3);
        assert_eq!(
            page.events.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(page.complete);
        assert!(parse_page(Value::Array(vec![Value::Int(1)]), None).is_err());
    }
}
