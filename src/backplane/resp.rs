//! A minimal RESP2 reader and command writer for the Redis pub/sub connection.
//!
//! Why not the `redis` crate's `PubSub`: it resolves a multi-channel `SUBSCRIBE` at the first
//! of its per-channel confirmations and pairs the rest with later requests, and it buffers
//! inbound messages in an unbounded queue. The backplane needs exact confirmation counting
//! (a batch is active only when every channel is confirmed) and a bound on every buffer, so
//! the pub/sub connection speaks RESP itself; the publishing connection uses the crate.
//!
//! Bounds: a header line is at most [`MAX_LINE`] bytes, an array at most [`MAX_ARRAY`]
//! scalar elements (pub/sub replies have 3 or 4), a bulk string at most `max_bulk` bytes;
//! a longer bulk string is read past and reported as [`Frame::Oversize`] so one huge
//! `PUBLISH` cannot take the connection (or the memory) down.

use std::io;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

/// Longest header line (`*3\r\n`, `$123\r\n`, `-ERR ...\r\n`).
pub const MAX_LINE: u64 = 4096;
/// Most elements in one array reply.
pub const MAX_ARRAY: i64 = 16;

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `+OK`.
    Simple(String),
    /// `-ERR ...`.
    Error(String),
    /// `:42`.
    Int(i64),
    /// `$n` bulk string.
    Bulk(Bytes),
    /// `$-1` / `*-1`.
    Null,
    /// A bulk string longer than the limit (its length); its bytes were skipped.
    Oversize(usize),
    /// `*n` with scalar elements.
    Array(Vec<Frame>),
}

impl Frame {
    /// The bytes of a bulk or simple string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Frame::Bulk(b) => Some(b),
            Frame::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct RespReader<R> {
    inner: BufReader<R>,
    max_bulk: usize,
    line: Vec<u8>,
}

impl<R: AsyncRead + Unpin> RespReader<R> {
    /// A reader accepting bulk strings up to `max_bulk` bytes.
    pub fn new(inner: R, max_bulk: usize) -> Self {
        RespReader {
            inner: BufReader::with_capacity(64 * 1024, inner),
            max_bulk,
            line: Vec::with_capacity(64),
        }
    }

    async fn header(&mut self) -> io::Result<(u8, String)> {
        self.line.clear();
        let n = (&mut self.inner)
            .take(MAX_LINE)
            .read_until(b'\n', &mut self.line)
            .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by Redis",
            ));
        }
        if !self.line.ends_with(b"\r\n") {
            return Err(invalid("RESP header line too long or unterminated"));
        }
        let kind = self.line.first().copied().unwrap_or(b'?');
        let rest = self.line.get(1..self.line.len() - 2).unwrap_or(&[]);
        Ok((kind, String::from_utf8_lossy(rest).into_owned()))
    }

    async fn scalar(&mut self, kind: u8, rest: String) -> io::Result<Frame> {
        match kind {
            b'+' => Ok(Frame::Simple(rest)),
            b'-' => Ok(Frame::Error(rest)),
            b':' => rest
                .parse()
                .map(Frame::Int)
                .map_err(|_| invalid("bad RESP integer")),
            b'$' => {
                let len: i64 = rest.parse().map_err(|_| invalid("bad RESP bulk length"))?;
                if len < 0 {
                    return Ok(Frame::Null);
                }
                let len = usize::try_from(len).map_err(|_| invalid("bad RESP bulk length"))?;
                let with_crlf = len as u64 + 2;
                if len > self.max_bulk {
                    let skipped = tokio::io::copy(
                        &mut (&mut self.inner).take(with_crlf),
                        &mut tokio::io::sink(),
                    )
                    .await?;
                    if skipped != with_crlf {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed by Redis",
                        ));
                    }
                    return Ok(Frame::Oversize(len));
                }
                let mut buf = vec![0u8; len + 2];
                self.inner.read_exact(&mut buf).await?;
                if !buf.ends_with(b"\r\n") {
                    return Err(invalid("RESP bulk string not terminated"));
                }
                buf.truncate(len);
                Ok(Frame::Bulk(Bytes::from(buf)))
            }
            other => Err(invalid(format!("unexpected RESP type byte 0x{other:02x}"))),
        }
    }

    /// Reads one reply.
    pub async fn read_frame(&mut self) -> io::Result<Frame> {
        let (kind, rest) = self.header().await?;
        if kind != b'*' {
            return self.scalar(kind, rest).await;
        }
        let len: i64 = rest.parse().map_err(|_| invalid("bad RESP array length"))?;
        if len < 0 {
            return Ok(Frame::Null);
        }
        if len > MAX_ARRAY {
            return Err(invalid(format!("RESP array of {len} elements")));
        }
        let mut items = Vec::with_capacity(len as usize);
        for _ in 0..len {
            let (kind, rest) = self.header().await?;
            if kind == b'*' {
                return Err(invalid("nested RESP array on the pub/sub connection"));
            }
            items.push(self.scalar(kind, rest).await?);
        }
        Ok(Frame::Array(items))
    }
}

/// Appends a command (`*n` of bulk strings) to `out`.
pub fn write_command<'a>(out: &mut Vec<u8>, args: impl ExactSizeIterator<Item = &'a [u8]>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8], max: usize) -> Vec<io::Result<Frame>> {
        let mut r = RespReader::new(input, max);
        let mut out = Vec::new();
        loop {
            let f = r.read_frame().await;
            let stop = f.is_err();
            out.push(f);
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn reads_pubsub_replies() {
        let input =
            b"*3\r\n$9\r\nsubscribe\r\n$6\r\nfeed-1\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$6\r\nfeed-1\r\n$2\r\n{}\r\n+OK\r\n-ERR x\r\n";
        let f = frames(input, 100).await;
        assert_eq!(
            f[0].as_ref().unwrap(),
            &Frame::Array(vec![
                Frame::Bulk(Bytes::from_static(b"subscribe")),
                Frame::Bulk(Bytes::from_static(b"feed-1")),
                Frame::Int(1)
            ])
        );
        assert!(
            matches!(f[1].as_ref().unwrap(), Frame::Array(v) if v[2] == Frame::Bulk(Bytes::from_static(b"{}")))
        );
        assert_eq!(f[2].as_ref().unwrap(), &Frame::Simple("OK".into()));
        assert_eq!(f[3].as_ref().unwrap(), &Frame::Error("ERR x".into()));
        assert_eq!(
            f[4].as_ref().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn oversize_bulk_is_skipped_not_buffered() {
        let input = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$10\r\n0123456789\r\n:5\r\n";
        let f = frames(input, 4).await;
        assert!(matches!(f[0].as_ref().unwrap(), Frame::Array(v) if v[2] == Frame::Oversize(10)));
        assert_eq!(f[1].as_ref().unwrap(), &Frame::Int(5));
    }

    #[tokio::test]
    async fn hostile_input_is_an_error() {
        for bad in [
            &b"*999999999\r\n"[..],
            b"*1\r\n*1\r\n:1\r\n",
            b"$5\r\nab",
            b"$2\r\nabcd\r\n",
            b"?\r\n",
            b":x\r\n",
        ] {
            let f = frames(bad, 100).await;
            assert!(f.last().unwrap().is_err(), "{bad:?}");
        }
        let long = vec![b'+'; 10_000];
        assert!(frames(&long, 100).await[0].is_err());
    }

    #[test]
    fn writes_commands() {
        let mut out = Vec::new();
        write_command(&mut out, [&b"SUBSCRIBE"[..], b"a", b"bc"].into_iter());
        assert_eq!(out, b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$2\r\nbc\r\n");
    }
}
