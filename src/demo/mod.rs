//! The demo's post service and the feed page's assets (development mode only).
//!
//! Enabled when demo identities are (`ServerConfig::dev_identities`: development mode, or
//! `--dev-identities` with `--jwt-secret`) and a feed hub is mounted; otherwise its routes
//! answer 404. Routes (all JSON; the auth'd ones take the same JWT as the hub, as
//! `Authorization: Bearer` or `access_token`):
//!
//! | route | what |
//! |---|---|
//! | `GET /demo/users` | the demo users (1001 Alice, 1002 Bob, 1003 Carol) and their friends |
//! | `GET /demo/feed?limit=N` | auth'd: the newest posts in the caller's feed, newest first |
//! | `POST /demo/posts` `{"text":…}` | auth'd: store a post and publish it to the author and the author's friends |
//!
//! A post goes through the real pipeline: it is stored ([`store::PostStore`]: in memory, or
//! with `--redis-url` in Redis ([`redis_store::RedisStore`]) so every instance serves the
//! same history), then
//! published as a feed event `{"recipients":[…],"payload":{"id","author","text","createdAt"}}`
//! through a [`FeedPublisher`]: with `--amqp-url` to the RabbitMQ `FeedUpdate` exchange
//! ([`amqp_publisher::AmqpPublisher`], consumed by feedhub's own `ingest::amqp`), otherwise
//! [`HubPublisher`], the in-memory path `ingest::deliver`, exactly what `POST /api/feed` does.
//!
//! The page itself (`js-client-demo/`: `index.html`, `style.css` and the esbuild bundle
//! `dist/app.js`) is compiled into the binary and served at `/`, `/app.css`, `/app.js`.
//!
//! [`DemoRoutes`] is the page and the post service as one service the composition root
//! mounts on the router (`http::mount`): `GET /`, `GET /app.js`, `GET /app.css` exactly and
//! the prefix `/demo/`. It uses only the router's leaf modules (`http::mount`,
//! `http::respond`), never the router itself.

pub mod amqp_publisher;
pub mod redis_store;
pub mod store;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};

use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::auth::{token_from_request, Authenticator};
use crate::http::mount::Mount;
use crate::http::respond::{json as json_response, read_body, text as text_response, Body};
use crate::hub::HubLifetime;
use crate::ids::UserId;
use crate::ingest::event::FeedEvent;
use store::{PostStore, StoredPost};

/// The page's HTML (served at `/`).
pub const INDEX_HTML: &str = include_str!("../../js-client-demo/index.html");
/// The page's stylesheet (served at `/app.css`).
pub const APP_CSS: &str = include_str!("../../js-client-demo/style.css");
/// The page's script: `js-client-demo/src/*.js` bundled with the SignalR client by esbuild
/// (`npm run build` in `js-client-demo/`; served at `/app.js`).
pub const APP_JS: &str = include_str!("../../js-client-demo/dist/app.js");

/// Longest post text, in characters.
pub const MAX_POST_CHARS: usize = 1000;
/// Largest `POST /demo/posts` body, in bytes.
pub const MAX_POST_BODY: usize = 16 * 1024;
/// Most posts `GET /demo/feed` returns.
pub const MAX_FEED_LIMIT: usize = 100;
/// Posts the in-memory store keeps.
pub const MEMORY_STORE_CAPACITY: usize = 1000;

/// A demo user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DemoUser {
    /// User id (the JWT `sub`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Ids of this user's friends (friendship is mutual).
    pub friends: Vec<String>,
}

/// The demo users (id, name, friends): Alice and Bob are friends; Carol is friends with no
/// one.
pub const DEMO_USERS: &[(&str, &str, &[&str])] = &[
    ("1001", "Alice", &["1002"]),
    ("1002", "Bob", &["1001"]),
    ("1003", "Carol", &[]),
];

/// The demo users a server knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    users: Vec<DemoUser>,
}

impl Directory {
    /// [`DEMO_USERS`] as they are (1001, 1002, 1003).
    pub fn standard() -> Directory {
        Directory::with_prefix("")
    }

    /// [`DEMO_USERS`] with `prefix` before every id (`<prefix>1001`, ...), so tests sharing a
    /// Redis or RabbitMQ use user ids of their own.
    pub fn with_prefix(prefix: &str) -> Directory {
        Directory {
            users: DEMO_USERS
                .iter()
                .map(|(id, name, friends)| DemoUser {
                    id: format!("{prefix}{id}"),
                    name: (*name).to_string(),
                    friends: friends.iter().map(|f| format!("{prefix}{f}")).collect(),
                })
                .collect(),
        }
    }

    /// All users.
    pub fn users(&self) -> &[DemoUser] {
        &self.users
    }

    /// The user with this id.
    pub fn get(&self, id: &str) -> Option<&DemoUser> {
        self.users.iter().find(|u| u.id == id)
    }
}

/// Who receives a post by `author`: the author (their other tabs) and their friends.
pub fn recipients_of(author: &DemoUser) -> Vec<UserId> {
    std::iter::once(&author.id)
        .chain(author.friends.iter())
        .filter_map(|id| UserId::new(id).ok())
        .collect()
}

/// A post's author, as carried in the event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Author {
    /// User id.
    pub id: String,
    /// Display name.
    pub name: String,
}

/// A post: the payload of its feed event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Post {
    /// Unique id; also the event id clients deduplicate by.
    pub id: String,
    /// Who wrote it.
    pub author: Author,
    /// The text, as written (clients must render it as text).
    pub text: String,
    /// When it was posted (RFC 3339, UTC, milliseconds).
    #[serde(rename = "createdAt")]
    pub created_at: String,
}

/// The feed event for a post, as published to RabbitMQ or `POST /api/feed`.
#[derive(Debug, Serialize)]
pub struct FeedUpdate<'a> {
    /// Event id (= post id).
    pub id: &'a str,
    /// Who receives it.
    pub recipients: Vec<&'a str>,
    /// The post.
    pub payload: &'a Post,
}

/// Publishes a post's feed event to its recipients.
#[async_trait]
pub trait FeedPublisher: Send + Sync {
    /// A short name for logs ("in-memory", "amqp").
    fn name(&self) -> &'static str;
    /// Publishes `event` (its JSON form is `body`, a [`FeedUpdate`]).
    async fn publish(&self, event: &FeedEvent, body: &[u8]) -> Result<(), String>;
}

/// The in-memory path: hands the event to `ingest::deliver` on this instance's feed hub
/// (which reaches other instances through the backplane).
pub struct HubPublisher {
    hub: Arc<HubLifetime>,
}

impl HubPublisher {
    /// Publishes into `hub`.
    pub fn new(hub: Arc<HubLifetime>) -> HubPublisher {
        HubPublisher { hub }
    }
}

#[async_trait]
impl FeedPublisher for HubPublisher {
    fn name(&self) -> &'static str {
        "in-memory"
    }

    async fn publish(&self, event: &FeedEvent, _body: &[u8]) -> Result<(), String> {
        crate::ingest::deliver(&self.hub, event)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The post service.
pub struct DemoService {
    store: Arc<dyn PostStore>,
    publisher: Arc<dyn FeedPublisher>,
    directory: Directory,
}

impl std::fmt::Debug for DemoService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoService")
            .field("store", &self.store.name())
            .field("publisher", &self.publisher.name())
            .finish()
    }
}

/// Why a post was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    /// Empty or whitespace-only text.
    #[error("'text' must not be empty")]
    Empty,
    /// Text over [`MAX_POST_CHARS`].
    #[error("'text' is longer than {MAX_POST_CHARS} characters")]
    TooLong,
    /// The store failed.
    #[error("could not store the post: {0}")]
    Store(String),
    /// Publishing failed (the post is stored and shows after a refetch).
    #[error("the post was stored but could not be published: {0}")]
    Publish(String),
}

impl DemoService {
    /// A service for the users of `directory` over `store` and `publisher`.
    pub fn new(
        store: Arc<dyn PostStore>,
        publisher: Arc<dyn FeedPublisher>,
        directory: Directory,
    ) -> DemoService {
        tracing::info!(
            store = store.name(),
            publisher = publisher.name(),
            "demo post service enabled at /demo (development identities)"
        );
        DemoService {
            store,
            publisher,
            directory,
        }
    }

    /// Stores and publishes a post by `author`.
    pub async fn create_post(&self, author: &DemoUser, text: &str) -> Result<Post, PostError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(PostError::Empty);
        }
        if text.chars().count() > MAX_POST_CHARS {
            return Err(PostError::TooLong);
        }
        let post = Post {
            id: format!("post-{}", crate::ids::random_token()),
            author: Author {
                id: author.id.clone(),
                name: author.name.clone(),
            },
            text: text.to_string(),
            created_at: rfc3339_millis(now_millis()),
        };
        let recipients = recipients_of(author);
        self.store
            .add(&StoredPost {
                post: post.clone(),
                recipients: recipients.clone(),
            })
            .await
            .map_err(PostError::Store)?;
        let payload = serde_json::to_vec(&post).map_err(|e| PostError::Publish(e.to_string()))?;
        let body = serde_json::to_vec(&FeedUpdate {
            id: &post.id,
            recipients: recipients.iter().map(UserId::as_str).collect(),
            payload: &post,
        })
        .map_err(|e| PostError::Publish(e.to_string()))?;
        let event = FeedEvent {
            id: Some(post.id.clone()),
            recipients,
            payload: Bytes::from(payload),
            redelivered: false,
        };
        self.publisher
            .publish(&event, &body)
            .await
            .map_err(PostError::Publish)?;
        Ok(post)
    }

    /// The newest posts of `user`'s feed.
    pub async fn feed(&self, user: &UserId, limit: usize) -> Result<Vec<Post>, String> {
        self.store.feed(user, limit.clamp(1, MAX_FEED_LIMIT)).await
    }
}

/// Milliseconds since the Unix epoch.
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the epoch (proleptic Gregorian, UTC).
pub fn rfc3339_millis(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Serves the page's static assets: `/`, `/app.js`, `/app.css`.
pub fn asset(path: &str, index_html: &str) -> Option<hyper::Response<Body>> {
    let (body, content_type) = match path {
        "/" => (index_html.to_string(), "text/html; charset=utf-8"),
        "/app.js" => (APP_JS.to_string(), "text/javascript; charset=utf-8"),
        "/app.css" => (APP_CSS.to_string(), "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut r = text_response(StatusCode::OK, body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    Some(r)
}

fn json_value(status: StatusCode, value: &impl Serialize) -> hyper::Response<Body> {
    json_response(status, serde_json::to_vec(value).unwrap_or_default())
}

/// The demo user a request is authenticated as, or the error response.
fn caller<'a>(
    service: &'a DemoService,
    auth: &Authenticator,
    req: &Request<Incoming>,
) -> Result<&'a DemoUser, Box<hyper::Response<Body>>> {
    let header_value = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let unauthorized = |why: &str| {
        let mut r = text_response(StatusCode::UNAUTHORIZED, format!("Unauthorized: {why}"));
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        r
    };
    let Some(token) = token_from_request(req.uri().query(), header_value) else {
        return Err(Box::new(unauthorized("an access token is required.")));
    };
    let identity = auth
        .verify(&token)
        .map_err(|e| Box::new(unauthorized(&e.to_string())))?;
    let user = identity.user_id.as_ref().map_or("", |u| u.as_str());
    service.directory.get(user).ok_or_else(|| {
        Box::new(text_response(
            StatusCode::FORBIDDEN,
            format!("User {user:?} is not a demo user."),
        ))
    })
}

/// The demo's routes as one mounted service: the page's assets ([`asset`]) and `/demo/*`
/// ([`handle`]). Mount it at `GET /`, `GET /app.js`, `GET /app.css` and the prefix
/// `/demo/` (see `app`).
pub struct DemoRoutes {
    service: Option<Arc<DemoService>>,
    auth: Arc<Authenticator>,
    index_html: String,
}

impl std::fmt::Debug for DemoRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoRoutes")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl DemoRoutes {
    /// The page `index_html` and the post service `service` (`None`: `/demo/*` answers 404),
    /// which authenticates callers with `auth`.
    pub fn new(
        service: Option<Arc<DemoService>>,
        auth: Arc<Authenticator>,
        index_html: String,
    ) -> DemoRoutes {
        DemoRoutes {
            service,
            auth,
            index_html,
        }
    }
}

#[async_trait]
impl Mount for DemoRoutes {
    async fn handle(&self, req: Request<Incoming>, path: &str) -> hyper::Response<Body> {
        if path.starts_with("/demo/") {
            return handle(self.service.as_deref(), &self.auth, path, req).await;
        }
        asset(path, &self.index_html)
            .unwrap_or_else(|| text_response(StatusCode::NOT_FOUND, "Not Found"))
    }
}

#[derive(Deserialize)]
struct NewPost {
    text: String,
}

/// Routes `/demo/*`; `service` is `None` when demo identities are off (then 404).
pub async fn handle(
    service: Option<&DemoService>,
    auth: &Authenticator,
    path: &str,
    req: Request<Incoming>,
) -> hyper::Response<Body> {
    let Some(service) = service else {
        return text_response(
            StatusCode::NOT_FOUND,
            "The demo post service is disabled (it runs only with development identities).",
        );
    };
    let method = req.method().clone();
    match (path, method) {
        ("/demo/users", Method::GET) => json_value(StatusCode::OK, &service.directory.users()),
        ("/demo/feed", Method::GET) => {
            let user = match caller(service, auth, &req) {
                Ok(u) => u,
                Err(r) => return *r,
            };
            let limit = match form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .find(|(k, _)| k == "limit")
            {
                None => 50,
                Some((_, v)) => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_FEED_LIMIT).contains(&n) => n,
                    _ => {
                        return text_response(
                            StatusCode::BAD_REQUEST,
                            format!("'limit' must be a number from 1 to {MAX_FEED_LIMIT}."),
                        )
                    }
                },
            };
            let Ok(user_id) = UserId::new(&user.id) else {
                return text_response(StatusCode::INTERNAL_SERVER_ERROR, "bad demo user id");
            };
            match service.feed(&user_id, limit).await {
                Ok(posts) => json_value(
                    StatusCode::OK,
                    &serde_json::json!({ "user": user, "posts": posts }),
                ),
                Err(e) => text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("The post store failed: {e}"),
                ),
            }
        }
        ("/demo/posts", Method::POST) => {
            let user = match caller(service, auth, &req) {
                Ok(u) => u,
                Err(r) => return *r,
            };
            let body = match read_body(req, MAX_POST_BODY).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let new_post: NewPost = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => {
                    return text_response(
                        StatusCode::BAD_REQUEST,
                        format!("Body must be JSON {{\"text\": \"...\"}}: {e}"),
                    )
                }
            };
            match service.create_post(user, &new_post.text).await {
                Ok(post) => json_value(StatusCode::CREATED, &post),
                Err(e @ PostError::Empty) => text_response(StatusCode::BAD_REQUEST, e.to_string()),
                Err(e @ PostError::TooLong) => {
                    text_response(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "demo post failed");
                    text_response(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                }
            }
        }
        ("/demo/users" | "/demo/feed" | "/demo/posts", _) => {
            text_response(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        }
        _ => text_response(StatusCode::NOT_FOUND, "Not Found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            rfc3339_millis(1_798_761_599_999),
            "2026-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn friends_and_recipients() {
        let standard = Directory::standard();
        let alice = standard.get("1001").unwrap();
        let r = recipients_of(alice);
        let r: Vec<&str> = r.iter().map(UserId::as_str).collect();
        assert_eq!(r, vec!["1001", "1002"]);
        let carol = standard.get("1003").unwrap();
        let r = recipients_of(carol);
        let r: Vec<&str> = r.iter().map(UserId::as_str).collect();
        assert_eq!(r, vec!["1003"]);
        for u in standard.users() {
            for f in &u.friends {
                assert!(standard.get(f).unwrap().friends.contains(&u.id), "mutual");
            }
        }
        let prefixed = Directory::with_prefix("t1-");
        let bob = prefixed.get("t1-1002").unwrap();
        assert_eq!(bob.name, "Bob");
        assert_eq!(bob.friends, vec!["t1-1001"]);
        assert!(prefixed.get("1002").is_none());
    }
}
