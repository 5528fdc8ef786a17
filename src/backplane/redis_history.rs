//! The Redis side of the feed history: the Lua script `history.lua` (loaded once per
//! connection with `SCRIPT LOAD`, run with `EVALSHA`; a `NOSCRIPT` reply, after a Redis
//! restart or `SCRIPT FLUSH`, loads it again and retries the events that failed), and the
//! decoding of its replies.
//!
//! Cost per appended event: one `EVALSHA` (seven commands inside: HGET, XADD with exact
//! MAXLEN, HSET, two EXPIREs, PUBLISH; plus an XREVRANGE of up to 512 entries for a
//! redelivery); a batch of events is one pipeline, so **one round trip per batch**. Bytes
//! sent per event: the payload twice (stored, and inside the published envelope) plus the
//! keys, channel and about 60 bytes of arguments.
//!
//! A known limit: if the script cache is emptied in the middle of a pipeline *and* another
//! node loads the script again before the pipeline ends, events after the gap may be
//! appended before the failed ones are retried (their offsets still follow the order in
//! which they were stored and published).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::Value;

use super::history::{Appended, FeedAppend, HistoryConfig, HistoryPage};
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
        cmds: &[redis::Cmd],
        timeout: Duration,
    ) -> Result<Vec<Value>, Failure> {
        let mut pipe = redis::pipe();
        for c in cmds {
            pipe.add_command(c.clone());
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

    /// Appends (and publishes) `batch` in order: one pipeline of EVALSHAs.
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
        let meta_ttl = cfg.meta_ttl().as_secs().max(1);
        let ttl = cfg.ttl.as_secs().max(1);
        let mut cmds = Vec::with_capacity(batch.len());
        for e in batch {
            let (head, tail) = envelope::feed_parts(origin, &e.user, &e.id, &e.payload)
                .map_err(|err| Failure::Refused(BackplaneError::Encode(err.to_string())))?;
            let mut c = redis::cmd("EVALSHA");
            c.arg(&sha)
                .arg(2)
                .arg(cfg.meta_key(&e.user))
                .arg(cfg.stream_key(&e.user))
                .arg("a")
                .arg(&*epoch)
                .arg(meta_ttl)
                .arg(cfg.size.max(1))
                .arg(ttl)
                .arg(&e.id)
                .arg(if e.redelivered { "1" } else { "0" })
                .arg(&e.payload[..])
                .arg(cfg.channel(&e.user).as_str())
                .arg(head)
                .arg(tail);
            cmds.push(c);
        }
        let mut replies = Self::run(conn, &cmds, timeout).await?;
        let mut out: Vec<Option<Appended>> = vec![None; batch.len()];
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        for attempt in 0..2 {
            let mut noscript = Vec::new();
            for (i, reply) in pending.iter().zip(&replies) {
                if is_noscript(reply) {
                    noscript.push(*i);
                } else if let Some(slot) = out.get_mut(*i) {
                    *slot = Some(parse_appended(reply)?);
                }
            }
            if noscript.is_empty() {
                break;
            }
            if attempt == 1 {
                return Err(Failure::Refused(unavailable(
                    "EVALSHA",
                    "NOSCRIPT right after SCRIPT LOAD",
                )));
            }
            // The script cache was emptied (Redis restarted, SCRIPT FLUSH): load it and
            // retry the events that failed, in order.
            self.reset();
            self.load(conn, timeout).await?;
            let retry: Vec<redis::Cmd> = noscript.iter().map(|i| cmds[*i].clone()).collect();
            replies = Self::run(conn, &retry, timeout).await?;
            pending = noscript;
        }
        out.into_iter()
            .map(|a| a.ok_or_else(|| Failure::Refused(bad("missing append reply"))))
            .collect()
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
        let mut reply = Self::run(conn, std::slice::from_ref(&c), timeout).await?;
        if reply.first().is_some_and(is_noscript) {
            self.reset();
            self.load(conn, timeout).await?;
            reply = Self::run(conn, std::slice::from_ref(&c), timeout).await?;
        }
        let reply = reply
            .into_iter()
            .next()
            .ok_or_else(|| Failure::Refused(unavailable("EVALSHA", "no reply")))?;
        parse_page(reply, since).map_err(Failure::Refused)
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

fn parse_appended(v: &Value) -> Result<Appended, BackplaneError> {
    if let Some(e) = server_error(v) {
        return Err(e);
    }
    let Value::Array(items) = v else {
        return Err(bad("append reply is not an array"));
    };
    match items.as_slice() {
        [offset, epoch, dup] => Ok(Appended {
            offset: int(offset).ok_or_else(|| bad("offset"))?,
            epoch: text(epoch).ok_or_else(|| bad("epoch"))?,
            duplicate: int(dup).ok_or_else(|| bad("duplicate"))? == 1,
        }),
        _ => Err(bad("append reply length")),
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
        let a = parse_appended(&Value::Array(vec![
            Value::Int(7),
            Value::BulkString(b"ep".to_vec()),
            Value::Int(0),
        ]))
        .unwrap();
        assert_eq!((a.offset, &*a.epoch, a.duplicate), (7, "ep", false));
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
        assert!(parse_appended(&Value::Nil).is_err());
    }
}
