//! A small Redis (RESP2) client for the benchmark tools: pipelined commands on a plain
//! TCP connection and an incremental, bounded reply parser. The load generator uses it to
//! `PUBLISH` at a fixed rate and to query `PUBSUB`; the bare WebSocket peer uses it for its
//! `SUBSCRIBE`/`UNSUBSCRIBE` connection. It deliberately has no dependency on the server's
//! Redis backplane, so the peers and the load generator measure the same client code.

#![allow(dead_code)]

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest bulk string or array the parser accepts (a bound on what a reply can make us
/// buffer).
pub const MAX_BULK: usize = 16 * 1024 * 1024;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Int(i64),
    /// `$n ...` (`None` for `$-1`).
    Bulk(Option<Bytes>),
    /// `*n ...` (`None` for `*-1`).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Bulk(Some(b)) => Some(b),
            Reply::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
}

/// Appends one command in RESP array form.
pub fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Finds `\r\n` from `at`; returns the index of `\r`.
fn line_end(buf: &[u8], at: usize) -> Option<usize> {
    buf.get(at..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| at + p)
}

fn parse_int(bytes: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad RESP integer"))
}

/// Parses one reply starting at `at`; `Ok(None)` when incomplete. Returns the reply and
/// the index just past it.
fn parse_at(buf: &[u8], at: usize, depth: usize) -> io::Result<Option<(Reply, usize)>> {
    if depth > 8 {
        return Err(bad("RESP nesting too deep"));
    }
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(end) = line_end(buf, at + 1) else {
        if buf.len() - at > 1024 * 64 {
            return Err(bad("RESP header line too long"));
        }
        return Ok(None);
    };
    let line = &buf[at + 1..end];
    let next = end + 2;
    match kind {
        b'+' => Ok(Some((
            Reply::Simple(String::from_utf8_lossy(line).into_owned()),
            next,
        ))),
        b'-' => Ok(Some((
            Reply::Error(String::from_utf8_lossy(line).into_owned()),
            next,
        ))),
        b':' => Ok(Some((Reply::Int(parse_int(line)?), next))),
        b'$' => {
            let n = parse_int(line)?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let n = n as usize;
            if n > MAX_BULK {
                return Err(bad("RESP bulk string too large"));
            }
            if buf.len() < next + n + 2 {
                return Ok(None);
            }
            let data = Bytes::copy_from_slice(&buf[next..next + n]);
            Ok(Some((Reply::Bulk(Some(data)), next + n + 2)))
        }
        b'*' => {
            let n = parse_int(line)?;
            if n < 0 {
                return Ok(Some((Reply::Array(None), next)));
            }
            if n as usize > MAX_BULK / 8 {
                return Err(bad("RESP array too large"));
            }
            let mut items = Vec::with_capacity((n as usize).min(1024));
            let mut pos = next;
            for _ in 0..n {
                match parse_at(buf, pos, depth + 1)? {
                    Some((item, p)) => {
                        items.push(item);
                        pos = p;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), pos)))
        }
        _ => Err(bad("unknown RESP type byte")),
    }
}

/// Reads replies from any byte stream.
pub struct Reader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Wraps a read half.
    pub fn new(io: R) -> Self {
        Reader {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// The next reply; an error at EOF.
    pub async fn next(&mut self) -> io::Result<Reply> {
        loop {
            if let Some((reply, used)) = parse_at(&self.buf, 0, 0)? {
                self.buf.advance(used);
                return Ok(reply);
            }
            if self.buf.len() > MAX_BULK + 1024 {
                return Err(bad("RESP reply exceeds the buffer bound"));
            }
            self.buf.reserve(64 * 1024);
            let n = self.io.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                ));
            }
        }
    }
}

/// `host:port` (plus an optional password) from `redis://[:password@]host[:port][/db]`.
pub struct Target {
    /// `host:port`.
    pub addr: String,
    /// `AUTH` password, if any.
    pub password: Option<String>,
}

/// Parses a `redis://` URL.
pub fn parse_url(url: &str) -> io::Result<Target> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| bad("redis URL must start with redis://"))?;
    let rest = rest.split('/').next().unwrap_or(rest);
    let (password, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => {
            let pw = auth.rsplit(':').next().unwrap_or(auth);
            (Some(pw.to_string()).filter(|p| !p.is_empty()), host)
        }
        None => (None, rest),
    };
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:6379")
    };
    Ok(Target { addr, password })
}

/// Connects (and authenticates when the URL has a password).
pub async fn connect(url: &str) -> io::Result<TcpStream> {
    let target = parse_url(url)?;
    let mut stream = TcpStream::connect(&target.addr).await?;
    stream.set_nodelay(true)?;
    if let Some(pw) = target.password {
        let mut out = Vec::new();
        encode(&[b"AUTH", pw.as_bytes()], &mut out);
        stream.write_all(&out).await?;
        let mut r = Reader::new(&mut stream);
        if let Reply::Error(e) = r.next().await? {
            return Err(bad(&format!("redis AUTH failed: {e}")));
        }
    }
    Ok(stream)
}

/// Runs one command on a fresh connection and returns its reply (for occasional queries).
pub async fn command(url: &str, args: &[&[u8]]) -> io::Result<Reply> {
    let mut stream = connect(url).await?;
    let mut out = Vec::new();
    encode(args, &mut out);
    stream.write_all(&out).await?;
    let mut r = Reader::new(&mut stream);
    r.next().await
}

/// Number of channels matching `pattern` with at least one subscriber
/// (`PUBSUB CHANNELS pattern`).
pub async fn count_channels(url: &str, pattern: &str) -> io::Result<usize> {
    match command(url, &[b"PUBSUB", b"CHANNELS", pattern.as_bytes()]).await? {
        Reply::Array(Some(items)) => Ok(items.len()),
        Reply::Error(e) => Err(bad(&e)),
        other => Err(bad(&format!("unexpected PUBSUB reply {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_incrementally() {
        let full = b"*3\r\n$7\r\nmessage\r\n$6\r\nfeed-1\r\n$2\r\nhi\r\n:5\r\n";
        for cut in 0..full.len() {
            let r = parse_at(&full[..cut], 0, 0).unwrap();
            if cut < 37 {
                assert!(r.is_none(), "cut {cut}");
            }
        }
        let (reply, used) = parse_at(full, 0, 0).unwrap().unwrap();
        assert_eq!(used, 37);
        match reply {
            Reply::Array(Some(items)) => assert_eq!(items[2].as_bytes(), Some(&b"hi"[..])),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_at(full, used, 0).unwrap().unwrap().0, Reply::Int(5));
    }
}
