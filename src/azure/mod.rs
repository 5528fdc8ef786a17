//! The Azure SignalR Service data plane, served by feedhub (`--azure-access-key`): a backend
//! written for Azure SignalR (the management SDK's `ServiceManager`, or plain REST calls)
//! and its serverless negotiate work unchanged against the connection string
//! `Endpoint=http://<feedhub>;AccessKey=<key>;Version=1.0;`.
//!
//! - [`routes`]: the REST API's paths, methods and parameters (pure);
//! - [`auth`]: the access-key tokens of REST calls and of redirected clients (pure);
//! - [`payload`]: the message bodies of sends (pure);
//! - [`RestApi`]: the entry point: authenticates a request, runs it on the hub
//!   (`hub::HubLifetime`'s fan-out and its [`crate::hub::admin`] operations, so every
//!   operation reaches connections on every feedhub node) and answers with the service's
//!   statuses, `ErrorDetail` bodies and `x-ms-error-code` headers.
//!
//! Dependencies: `hub`, `auth`, and the HTTP layer's service traits: the composition root
//! mounts [`RestApi`] at [`ROUTE_PREFIXES`] (`http::mount::Mount`) and sets it as the
//! router's `http::mount::HubGateway` (the client redirect); the HTTP layer never names
//! this module.
//!
//! A hub's Azure name is the last segment of its route, lowercased (`feed` for
//! `/hubs/feed`); the SDK lowercases hub names. The `application` parameter (and the
//! `<app>_` prefix of a redirected client's `hub=`) is accepted and ignored: one feedhub
//! serves one application.
//!
//! **Serverless negotiate redirect.** A backend's negotiate answers
//! `{"url":"http://<feedhub>/client/?hub=feed","accessToken":"<client token>"}`; the
//! official clients then negotiate at `/client/negotiate?hub=feed` and connect to
//! `/client/?hub=feed&id=…` with that token. [`RestApi::rewrite_client_request`] maps those
//! paths onto the hub's own (same transports, same everything), and
//! [`RestApi::client_identity`] accepts the client token where the hub's own authentication
//! does not (user id from `asrs.s.uid`, `nameid` or `sub`).
//!
//! Errors (bodies `{"code":…,"message":…}`, the code also in `x-ms-error-code`):
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `Error.Request.Invalid` | bad hub name, group, id, api-version, ttl or body |
//! | 401 | `Error.Authentication.Invalid` | missing, malformed, badly signed or expired token, wrong `aud` |
//! | 404 | `Error.Request.NotFound`, `Error.Hub.NotExisted` | no such path; no hub of that name |
//! | 404 | `Warning.Connection.NotExisted`, `Warning.User.NotExisted`, `Warning.Group.NotExisted`, `Info.User.NotInGroup` | existence checks that say no |
//! | 404 | `Error.Connection.NotExisted` | adding or removing a connection that does not exist to or from a group |
//! | 405 | `Error.Request.MethodNotAllowed` | a known path with another method |
//! | 408 | `Error.Request.Timeout` | a body that does not arrive within [`BODY_READ_TIMEOUT`] |
//! | 413 | `Error.Request.PayloadTooLarge` | a body over [`MAX_BODY`] |
//! | 503 | `Error.Service.Unavailable` | the backplane failed |

pub mod auth;
pub mod payload;
pub mod routes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::auth::Identity;
use crate::hub::admin::CloseScope;
use crate::hub::{HubError, HubLifetime, Target};
use crate::metrics::{inc, METRICS};
use routes::{Action, HubRequest, Route, RouteError};

use crate::http::mount::{HubGateway, Mount};
use crate::http::respond::Body;

/// Where the composition root mounts [`RestApi`] (`http::mount::Route::prefix` each).
pub const ROUTE_PREFIXES: [&str; 4] = [
    "/api/hubs/",
    "/api/v1/hubs/",
    "/api/health",
    "/api/v1/health",
];

/// Largest send body accepted (the service's message limit is 1 MB).
pub const MAX_BODY: usize = 1024 * 1024;

/// A send's body must arrive within this (the HTTP layer's default body read timeout).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The error code header.
pub const ERROR_CODE_HEADER: &str = "x-ms-error-code";

/// The Azure SignalR data-plane REST API and serverless client redirect over this node's
/// hubs.
pub struct RestApi {
    /// The access key (its UTF-8 bytes are the HMAC key).
    key: String,
    /// Azure hub name (lowercase last route segment) → hub.
    hubs: HashMap<String, Arc<HubLifetime>>,
}

impl std::fmt::Debug for RestApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestApi")
            .field("hubs", &self.hubs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A hub's Azure name: the last segment of its route, lowercased (`/hubs/feed` → `feed`).
pub fn azure_hub_name(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
}

impl RestApi {
    /// The API over `hubs`, authenticated with `access_key`; turns on the hubs' user groups
    /// kept in the backplane. Two hubs with one Azure name: the first by route wins (logged).
    pub fn new<'a>(
        access_key: &str,
        hubs: impl IntoIterator<Item = &'a Arc<HubLifetime>>,
    ) -> RestApi {
        let mut sorted: Vec<&Arc<HubLifetime>> = hubs.into_iter().collect();
        sorted.sort_by(|a, b| a.definition().path.cmp(&b.definition().path));
        let mut map = HashMap::new();
        for hub in sorted {
            let name = azure_hub_name(&hub.definition().path);
            if routes::valid_hub(&name).is_err() {
                tracing::warn!(path = %hub.definition().path, "hub has no valid Azure name; not served by the REST API");
                continue;
            }
            if let Some(first) = map.get(&name) {
                let first: &Arc<HubLifetime> = first;
                tracing::warn!(name = %name, served = %first.definition().path, ignored = %hub.definition().path,
                    "two hubs share an Azure hub name; the REST API serves the first");
                continue;
            }
            hub.enable_user_groups();
            map.insert(name, hub.clone());
        }
        RestApi {
            key: access_key.to_string(),
            hubs: map,
        }
    }

    /// Serves one REST request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let url = auth::RequestUrl {
            host: host_header(&parts.headers, &parts.uri),
            path: parts.uri.path(),
            query: parts.uri.query().unwrap_or(""),
        };
        let token = bearer(&parts.headers).unwrap_or("");
        if let Err(e) = auth::verify_rest(&self.key, token, url) {
            inc(&METRICS.auth_failures);
            tracing::debug!(error = %e, path = %parts.uri.path(), "REST API call refused");
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "Error.Authentication.Invalid",
                &e.to_string(),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        let route = match routes::parse(&parts.method, url.path, url.query) {
            Ok(r) => r,
            Err(RouteError::NotFound) => {
                return error(
                    StatusCode::NOT_FOUND,
                    "Error.Request.NotFound",
                    "No such REST API path.",
                )
            }
            Err(RouteError::MethodNotAllowed) => {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "Error.Request.MethodNotAllowed",
                    &format!("{} is not allowed on this path.", parts.method),
                )
            }
            Err(RouteError::BadRequest(m)) => return invalid(&m),
        };
        let request = match route {
            Route::Health => return status(StatusCode::OK),
            Route::Hub(r) => r,
        };
        let Some(hub) = self.hubs.get(&request.hub).cloned() else {
            return error(
                StatusCode::NOT_FOUND,
                "Error.Hub.NotExisted",
                &format!("Hub '{}' does not exist.", request.hub),
            );
        };
        let payload = if request.action.is_send() {
            let bytes = match read_body(body).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let binary = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| {
                    ct.trim()
                        .to_ascii_lowercase()
                        .starts_with("application/octet-stream")
                });
            let decoded = if binary {
                payload::decode_binary(&bytes)
            } else {
                payload::decode_json(&bytes)
            };
            match decoded {
                Ok(p) => Some(p),
                Err(e) => return invalid(&e.0),
            }
        } else {
            None
        };
        match run(&hub, &request, payload).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(hub = %request.hub, error = %e, "REST API operation failed");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Error.Service.Unavailable",
                    &e.to_string(),
                )
            }
        }
    }

    /// A hub by the `hub=` value of a redirected client (`<hub>` or `<app>_<hub>`).
    fn client_hub(&self, name: &str) -> Option<&Arc<HubLifetime>> {
        let lower = name.to_ascii_lowercase();
        self.hubs.get(&lower).or_else(|| {
            lower
                .split_once('_')
                .and_then(|(_, hub)| self.hubs.get(hub))
        })
    }

    /// Maps a redirected client's `/client/negotiate?hub=X…` and `/client/?hub=X…` onto hub
    /// X's own negotiate and connect paths (query unchanged); any other request is returned
    /// as it came.
    pub fn rewrite_client_request(&self, mut req: Request<Incoming>) -> Request<Incoming> {
        let path = req.uri().path().trim_end_matches('/');
        let negotiate = match path {
            "/client" => false,
            "/client/negotiate" => true,
            _ => return req,
        };
        let query = req.uri().query().unwrap_or("").to_string();
        let Some(name) = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "hub")
            .map(|(_, v)| v.into_owned())
        else {
            return req;
        };
        let Some(hub) = self.client_hub(&name) else {
            return req;
        };
        let base = hub.definition().path.trim_end_matches('/');
        let path = if negotiate {
            format!("{base}/negotiate?{query}")
        } else {
            format!("{base}?{query}")
        };
        let mut parts = req.uri().clone().into_parts();
        match path.parse() {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(_) => return req,
        }
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        req
    }

    /// The identity of a client token for `hub` (signed with the access key, `aud`
    /// `…/client/?hub=<hub>` on this request's host), when `token` is one; `None` otherwise.
    pub fn client_identity(
        &self,
        hub: &HubLifetime,
        token: &str,
        headers: &HeaderMap,
    ) -> Option<Identity> {
        let name = azure_hub_name(&hub.definition().path);
        let served = self
            .hubs
            .get(&name)
            .is_some_and(|h| std::ptr::eq(Arc::as_ptr(h), hub));
        if !served {
            return None;
        }
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        match auth::verify_client(&self.key, token, &name, host) {
            Ok(t) => Some(Identity {
                user_id: t.user,
                claims: t.claims.into(),
                valid_until: t.valid_until,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "not an Azure client token");
                None
            }
        }
    }
}

#[async_trait::async_trait]
impl Mount for RestApi {
    async fn handle(&self, req: Request<Incoming>, _path: &str) -> Response<Body> {
        // The raw path, not the trimmed one: the token's `aud` is checked against it.
        RestApi::handle(self, req).await
    }
}

impl HubGateway for RestApi {
    fn rewrite(&self, req: Request<Incoming>) -> Request<Incoming> {
        self.rewrite_client_request(req)
    }

    fn identity(&self, hub: &HubLifetime, token: &str, headers: &HeaderMap) -> Option<Identity> {
        self.client_identity(hub, token, headers)
    }
}

/// Runs one hub operation; its success response.
async fn run(
    hub: &HubLifetime,
    r: &HubRequest,
    payload: Option<payload::Payload>,
) -> Result<Response<Body>, HubError> {
    // v1 answered 202 to every change.
    let changed = |s: StatusCode| {
        if r.legacy {
            status(StatusCode::ACCEPTED)
        } else {
            status(s)
        }
    };
    let exists = |yes: bool, code: &str, what: &str| {
        if yes {
            status(StatusCode::OK)
        } else {
            error(StatusCode::NOT_FOUND, code, what)
        }
    };
    let target = match &r.action {
        Action::SendAll => Some(Target::All {
            except: r.excluded.clone(),
        }),
        Action::SendUser(u) => Some(Target::Users(vec![u.clone()])),
        Action::SendConnection(c) => Some(Target::Connections(vec![c.clone()])),
        Action::SendGroup(g) => Some(Target::Groups {
            groups: vec![g.clone()],
            except: r.excluded.clone(),
        }),
        _ => None,
    };
    if let (Some(target), Some(p)) = (target, payload) {
        hub.send(&target, &p.target, p.arguments).await?;
        return Ok(status(StatusCode::ACCEPTED));
    }
    Ok(match &r.action {
        Action::AddConnectionToGroup(g, c) | Action::RemoveConnectionFromGroup(g, c) => {
            if !hub.connection_exists(c).await? {
                return Ok(error(
                    StatusCode::NOT_FOUND,
                    "Error.Connection.NotExisted",
                    &format!("Connection '{c}' does not exist."),
                ));
            }
            if matches!(r.action, Action::AddConnectionToGroup(..)) {
                hub.add_to_group(c, g).await?;
            } else {
                hub.remove_from_group(c, g).await?;
            }
            changed(StatusCode::OK)
        }
        Action::RemoveConnectionFromAllGroups(c) => {
            hub.remove_connection_from_all_groups(c).await?;
            changed(StatusCode::OK)
        }
        Action::AddUserToGroup(u, g) => {
            hub.add_user_to_group(u, g, r.ttl.map(Duration::from_secs))
                .await?;
            changed(StatusCode::OK)
        }
        Action::RemoveUserFromGroup(u, g) => {
            hub.remove_user_from_group(u, Some(g)).await?;
            changed(StatusCode::NO_CONTENT)
        }
        Action::RemoveUserFromAllGroups(u) => {
            hub.remove_user_from_group(u, None).await?;
            changed(StatusCode::NO_CONTENT)
        }
        Action::UserInGroup(u, g) => exists(
            hub.user_in_group(u, g).await?,
            "Info.User.NotInGroup",
            &format!("User '{u}' is not in group '{g}'."),
        ),
        Action::ConnectionExists(c) => exists(
            hub.connection_exists(c).await?,
            "Warning.Connection.NotExisted",
            &format!("Connection '{c}' does not exist."),
        ),
        Action::UserExists(u) => exists(
            hub.user_exists(u).await?,
            "Warning.User.NotExisted",
            &format!("User '{u}' has no connection."),
        ),
        Action::GroupExists(g) => exists(
            hub.group_exists(g).await?,
            "Warning.Group.NotExisted",
            &format!("Group '{g}' has no connection."),
        ),
        Action::CloseConnection(c) => {
            hub.close_connection(c, r.reason.clone()).await?;
            changed(StatusCode::OK)
        }
        Action::CloseAll | Action::CloseGroup(_) | Action::CloseUser(_) => {
            let scope = match &r.action {
                Action::CloseGroup(g) => CloseScope::Group(g.clone()),
                Action::CloseUser(u) => CloseScope::User(u.clone()),
                _ => CloseScope::All,
            };
            hub.close_connections(&scope, &r.excluded, r.reason.clone())
                .await?;
            changed(StatusCode::NO_CONTENT)
        }
        // Sends without a payload cannot happen (the body was read above).
        Action::SendAll
        | Action::SendUser(_)
        | Action::SendConnection(_)
        | Action::SendGroup(_) => invalid("The message body is missing."),
    })
}

/// Reads a send's body: at most [`MAX_BODY`] bytes (413 above), within
/// [`BODY_READ_TIMEOUT`] (408 after).
async fn read_body(body: Incoming) -> Result<Bytes, Response<Body>> {
    let read = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        http_body_util::Limited::new(body, MAX_BODY).collect(),
    )
    .await;
    match read {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Error.Request.PayloadTooLarge",
                &format!("The message exceeds {MAX_BODY} bytes."),
            ))
        }
        Ok(Err(e)) => Err(invalid(&format!("The request body could not be read: {e}"))),
        Err(_) => {
            let mut r = error(
                StatusCode::REQUEST_TIMEOUT,
                "Error.Request.Timeout",
                "The request body did not arrive in time.",
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(r)
        }
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The request's host: the `Host` header, or the URI's authority (absolute form).
fn host_header<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
    *r.status_mut() = code;
    r
}

fn invalid(message: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, "Error.Request.Invalid", message)
}

/// An `ErrorDetail` response with `x-ms-error-code`.
fn error(code: StatusCode, error_code: &str, message: &str) -> Response<Body> {
    let body = serde_json::to_vec(&serde_json::json!({ "code": error_code, "message": message }))
        .unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(error_code) {
        h.insert(ERROR_CODE_HEADER, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_names() {
        assert_eq!(azure_hub_name("/hubs/feed"), "feed");
        assert_eq!(azure_hub_name("/hubs/Chat/"), "chat");
        assert_eq!(azure_hub_name("/testhub"), "testhub");
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  x.y "),
        );
        assert_eq!(bearer(&h), Some("x.y"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }
}
