//! The small HTTP helpers every part that answers requests shares: the response [`Body`]
//! type, text and JSON responses, and bounded, timed request body reads.
//!
//! A leaf: it imports nothing from the rest of the HTTP layer (but the default timeout of
//! the leaf [`super::limits`]), nor from the composition root or the services mounted on
//! the router (`crate::demo`, a REST API), so all of them may use it without an import
//! circle.

use std::convert::Infallible;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use super::limits::DEFAULT_BODY_READ_TIMEOUT;
use crate::metrics::{inc, METRICS};

/// Response body type: whole bodies, or a stream (Server-Sent Events).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Who sent a request, and its connection's limits: in every request's extensions (put
/// there by `http::conn`).
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: IpAddr,
    /// How long the request's body may take to arrive.
    pub body_read_timeout: Duration,
}

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// Reads a request body of at most `limit` bytes: 413 above it, 400 when it cannot be read,
/// 408 when it does not arrive within the connection's body read timeout.
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Body>> {
    let timeout = body_timeout(req.extensions());
    read_incoming(req.into_body(), limit, timeout).await
}

/// The body read timeout of a request (from its connection, see [`ConnInfo`]).
pub fn body_timeout(extensions: &http::Extensions) -> Duration {
    extensions
        .get::<ConnInfo>()
        .map_or(DEFAULT_BODY_READ_TIMEOUT, |i| i.body_read_timeout)
}

/// [`read_body`] for a body already split from its request.
pub async fn read_incoming(
    body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Response<Body>> {
    let read = tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await;
    let Ok(read) = read else {
        // A body that never arrives (a chunked POST left open) must not hold the
        // connection, or a per-connection send lock, forever.
        inc(&METRICS.body_read_timeouts);
        let mut r = text(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "The request body did not arrive within {} s.",
                timeout.as_secs_f64()
            ),
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(r);
    };
    match read {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(body_too_large(limit))
        }
        Err(e) => Err(text(
            StatusCode::BAD_REQUEST,
            format!("Could not read the request body: {e}"),
        )),
    }
}

/// 413 for a body over `limit` bytes.
pub fn body_too_large(limit: usize) -> Response<Body> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("The request body exceeds the limit of {limit} bytes."),
    )
}

/// A `text/plain` response.
pub fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(full(msg.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A non-cacheable `application/json` response.
pub fn json(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}
