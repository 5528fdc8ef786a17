//! The SignalR client side shared by the benchmark tools (`examples/loadgen.rs`) and the
//! chaos soak (`examples/soak.rs`): endpoints, sockets bound to a chosen 127.0.0.x source
//! address, one-shot and keep-alive HTTP/1.1 exchanges (bounded), `POST <hub>/negotiate`,
//! the WebSocket upgrade and the hub handshake, done the way `@microsoft/signalr` does them.
//! No dependency on the server's transport code, so the tools exercise the wire, not the
//! implementation.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{anyhow, bail, Context as _};
use bytes::BytesMut;
use feedhub::protocol::{handshake, ProtocolKind};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest HTTP response body read into memory.
pub const MAX_HTTP_BODY: usize = 1 << 20;

/// Parsed `http://host:port/path`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// `host:port` for the Host header.
    pub host: String,
    /// The hub path (`/hubs/feed`).
    pub path: String,
}

/// Parses `http://ip:port/path` (or `ws://`).
pub fn parse_endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| anyhow!("endpoint must be http:// or ws://: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("endpoint host must be ip:port: {host}"))?;
    Ok(Endpoint {
        addr,
        host: host.to_string(),
        path: path.to_string(),
    })
}

/// A TCP connection to `addr`, bound to `source` first when the target is a loopback address
/// (so one client machine can exceed the 64k ports of one address pair).
pub async fn tcp_from(source: Option<Ipv4Addr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let (Some(ip), true) = (source, addr.ip().is_loopback()) {
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body (bounded).
pub async fn http_once(stream: &mut TcpStream, request: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HTTP_BODY {
            bail!("HTTP response too large");
        }
        if let Some(head) = parse_response_head(&buf)? {
            if let Some(len) = head.content_length {
                if buf.len() >= head.body_start + len {
                    return Ok((
                        head.status,
                        buf[head.body_start..head.body_start + len].to_vec(),
                    ));
                }
            }
        }
    }
    match parse_response_head(&buf)? {
        Some(head) => Ok((head.status, buf[head.body_start..].to_vec())),
        None => bail!("incomplete HTTP response"),
    }
}

/// A parsed HTTP response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Where the body starts in the buffer.
    pub body_start: usize,
    /// `Content-Length`, if given.
    pub content_length: Option<usize>,
    /// `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

/// The response head, once `buf` holds all of it.
pub fn parse_response_head(buf: &[u8]) -> anyhow::Result<Option<ResponseHead>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            bail!("HTTP response head too large");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| anyhow!("non-UTF-8 HTTP head"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line"))?;
    let mut content_length = None;
    let mut chunked = false;
    for (k, v) in lines.filter_map(|l| l.split_once(':')) {
        if k.trim().eq_ignore_ascii_case("content-length") {
            content_length = v.trim().parse().ok();
        } else if k.trim().eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        }
    }
    Ok(Some(ResponseHead {
        status,
        body_start: end + 4,
        content_length,
        chunked,
    }))
}

/// Decodes whole chunks of a `Transfer-Encoding: chunked` body from the front of `buf` into
/// `out`. Returns `Ok(true)` at the last (empty) chunk.
pub fn dechunk(buf: &mut BytesMut, out: &mut Vec<u8>) -> anyhow::Result<bool> {
    loop {
        let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
            if buf.len() > 32 {
                bail!("bad chunk size line");
            }
            return Ok(false);
        };
        let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| anyhow!("bad chunk size"))?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| anyhow!("bad chunk size {size_text:?}"))?;
        if size > MAX_HTTP_BODY {
            bail!("chunk too large");
        }
        if buf.len() < line_end + 2 + size + 2 {
            return Ok(false);
        }
        out.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        let _ = buf.split_to(line_end + 2 + size + 2);
        if size == 0 {
            return Ok(true);
        }
    }
}

/// A WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// Small read buffers, no write buffering, 16 MiB messages.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20))
}

/// Upgrades `path_and_query` on `ep`.
pub async fn ws_connect(
    source: Option<Ipv4Addr>,
    ep: &Endpoint,
    path_and_query: &str,
) -> anyhow::Result<Ws> {
    let stream = tcp_from(source, ep.addr).await?;
    ws_upgrade(stream, ep, path_and_query).await
}

/// Upgrades `path_and_query` over an already connected stream (one whose socket options the
/// caller set, e.g. a small receive buffer).
pub async fn ws_upgrade(
    stream: TcpStream,
    ep: &Endpoint,
    path_and_query: &str,
) -> anyhow::Result<Ws> {
    let url = format!("ws://{}{}", ep.host, path_and_query);
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await?;
    Ok(ws)
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// What `/negotiate` answered.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// The connection token (`id=` of every later request).
    pub token: String,
    /// The server agreed to stateful reconnect.
    pub stateful: bool,
}

/// `POST <hub>/negotiate?negotiateVersion=1[&useStatefulReconnect=true]` with the bearer
/// token, as `@microsoft/signalr` sends it.
pub async fn negotiate(
    source: Option<Ipv4Addr>,
    ep: &Endpoint,
    bearer: &str,
    stateful: bool,
) -> anyhow::Result<Negotiated> {
    let mut http = tcp_from(source, ep.addr).await?;
    let extra = if stateful {
        "&useStatefulReconnect=true"
    } else {
        ""
    };
    let req = format!(
        "POST {}/negotiate?negotiateVersion=1{extra} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nX-Requested-With: XMLHttpRequest\r\nContent-Type: text/plain;charset=UTF-8\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ep.path, ep.host, bearer
    );
    let (status, body) = http_once(&mut http, req.as_bytes()).await?;
    if status != 200 {
        bail!(
            "negotiate: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        connection_token: Option<String>,
        connection_id: Option<String>,
        #[serde(default)]
        use_stateful_reconnect: bool,
    }
    let neg: Body = serde_json::from_slice(&body)?;
    let token = neg
        .connection_token
        .or(neg.connection_id)
        .ok_or_else(|| anyhow!("negotiate: no connection token"))?;
    Ok(Negotiated {
        token,
        stateful: neg.use_stateful_reconnect,
    })
}

/// `<hub>?id=<token>&access_token=<jwt>`: the connect URL of every transport.
pub fn connect_path(ep: &Endpoint, token: &str, jwt: &str) -> String {
    format!(
        "{}?id={}&access_token={}",
        ep.path,
        urlencode(token),
        urlencode(jwt)
    )
}

/// Sends the handshake request (`version` 2 for stateful reconnect) and waits for the
/// response; returns what followed it in the same frames.
pub async fn ws_handshake(
    ws: &mut Ws,
    protocol: ProtocolKind,
    version: u32,
) -> anyhow::Result<BytesMut> {
    let mut hs = Vec::new();
    handshake::write_request(protocol.name(), version, &mut hs);
    ws.send(Message::Text(String::from_utf8(hs)?.into()))
        .await?;
    let mut buf = BytesMut::new();
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| anyhow!("closed during handshake"))??;
        match msg {
            Message::Text(t) => buf.extend_from_slice(t.as_bytes()),
            Message::Binary(b) => buf.extend_from_slice(&b),
            Message::Close(c) => bail!("closed during handshake: {c:?}"),
            _ => continue,
        }
        if let Some(resp) = handshake::parse_response(&mut buf)? {
            if let Some(err) = resp.error {
                bail!("handshake error: {err}");
            }
            return Ok(buf);
        }
    }
}
