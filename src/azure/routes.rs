//! The data-plane REST API's routes: method, path and query in, a typed [`Route`] or the
//! error the service answers out. Pure: no I/O.
//!
//! api-version `2022-06-01` (and the later versions the SDKs send, which keep these paths),
//! every path under `/api/hubs/{hub}`:
//!
//! | operation | method and path after the hub | status |
//! |---|---|---|
//! | send to all / a user / a connection / a group | `POST /:send` [excluded], `/users/{u}/:send`, `/connections/{c}/:send`, `/groups/{g}/:send` [excluded] | 202 |
//! | add / remove a connection in a group | `PUT` / `DELETE /groups/{g}/connections/{c}` | 200 (404 when the connection does not exist) |
//! | remove a connection from all groups | `DELETE /connections/{c}/groups` | 200 |
//! | add a user to a group | `PUT /users/{u}/groups/{g}` [ttl] | 200 |
//! | remove a user from a group / all groups | `DELETE /users/{u}/groups/{g}`, `/users/{u}/groups` | 204 |
//! | exists? | `HEAD` (or `GET`) `/connections/{c}`, `/users/{u}`, `/groups/{g}`, `/users/{u}/groups/{g}` | 200 / 404 |
//! | close | `DELETE /connections/{c}` [reason] → 200; `POST /:closeConnections`, `/groups/{g}/:closeConnections`, `/users/{u}/:closeConnections` [excluded, reason] → 204 | |
//! | health | `HEAD` (or `GET`) `/api/health` | 200 |
//!
//! The legacy v1 API (`/api/v1/hubs/{hub}…`, no api-version) is mapped onto the same
//! actions: `POST /` (all), `POST /users/{u}`, `POST /connections/{c}`, `POST /groups/{g}`,
//! `DELETE /connections/{c}`, `PUT`/`DELETE /groups/{g}/connections/{c}`,
//! `GET`/`PUT`/`DELETE /users/{u}/groups/{g}` and `/groups/{g}/users/{u}`, and
//! `GET /api/v1/health`; its changes answer 202, as v1 did.
//!
//! Path segments are percent-decoded. Hub names must match
//! ``^[A-Za-z][A-Za-z0-9_`,.[\]]{0,127}$`` and are lowercased (the SDK lowercases them); the
//! `application` parameter is accepted and not used (one feedhub serves one application).
//! Groups are 1–1024 characters, not all whitespace, and (a feedhub limit) at most
//! [`crate::ids::MAX_ID_LEN`] bytes, as user and connection ids.

use http::Method;

use super::auth::percent_decode;
use crate::ids::{ConnectionId, GroupName, UserId};

/// api-versions accepted on `/api/hubs` (each uses these paths and statuses).
pub const API_VERSIONS: [&str; 7] = [
    "2020-10-01",
    "2021-10-01",
    "2022-06-01",
    "2022-11-01",
    "2023-07-01",
    "2024-01-01",
    "2024-12-01",
];

/// Most `excluded` connection ids in one request.
pub const MAX_EXCLUDED: usize = 1000;

/// Most characters of a group name (the service's limit).
pub const MAX_GROUP_CHARS: usize = 1024;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/api/health`.
    Health,
    /// An operation on a hub.
    Hub(HubRequest),
}

/// An operation on one hub, with its query parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRequest {
    /// The hub's name as given (already lowercased).
    pub hub: String,
    /// The `application` parameter (lowercased; not used for routing).
    pub application: Option<String>,
    /// What to do.
    pub action: Action,
    /// `excluded` connection ids (sends to all or a group, closes).
    pub excluded: Vec<ConnectionId>,
    /// `reason` of a close.
    pub reason: Option<String>,
    /// `ttl` of a user's group membership, in seconds.
    pub ttl: Option<u64>,
    /// A v1 (legacy) request: changes answer 202.
    pub legacy: bool,
}

/// The operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send to every connection (except `excluded`).
    SendAll,
    /// Send to every connection of a user.
    SendUser(UserId),
    /// Send to one connection.
    SendConnection(ConnectionId),
    /// Send to a group's members (except `excluded`).
    SendGroup(GroupName),
    /// Add a connection to a group.
    AddConnectionToGroup(GroupName, ConnectionId),
    /// Remove a connection from a group.
    RemoveConnectionFromGroup(GroupName, ConnectionId),
    /// Remove a connection from every group.
    RemoveConnectionFromAllGroups(ConnectionId),
    /// Add a user to a group (`ttl`).
    AddUserToGroup(UserId, GroupName),
    /// Remove a user from a group.
    RemoveUserFromGroup(UserId, GroupName),
    /// Remove a user from every group.
    RemoveUserFromAllGroups(UserId),
    /// Is the user in the group?
    UserInGroup(UserId, GroupName),
    /// Does the connection exist?
    ConnectionExists(ConnectionId),
    /// Does the user have a connection?
    UserExists(UserId),
    /// Does the group have a member?
    GroupExists(GroupName),
    /// Close one connection (`reason`).
    CloseConnection(ConnectionId),
    /// Close every connection (except `excluded`; `reason`).
    CloseAll,
    /// Close a group's members (except `excluded`; `reason`).
    CloseGroup(GroupName),
    /// Close a user's connections (except `excluded`; `reason`).
    CloseUser(UserId),
}

impl Action {
    /// Whether the action sends a message (and so reads a body).
    pub fn is_send(&self) -> bool {
        matches!(
            self,
            Action::SendAll
                | Action::SendUser(_)
                | Action::SendConnection(_)
                | Action::SendGroup(_)
        )
    }
}

/// Why a request has no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// No such path.
    NotFound,
    /// The path exists, not with this method.
    MethodNotAllowed,
    /// A bad hub, group, id or parameter.
    BadRequest(String),
}

/// Whether `path` belongs to the REST API (the prefixes it serves).
pub fn is_rest_path(path: &str) -> bool {
    path.starts_with("/api/hubs/")
        || path.starts_with("/api/v1/hubs/")
        || matches!(path.trim_end_matches('/'), "/api/health" | "/api/v1/health")
}

/// Parses a request (`path` raw, percent-encoded; `query` without `?`).
pub fn parse(method: &Method, path: &str, query: &str) -> Result<Route, RouteError> {
    let trimmed = path.trim_end_matches('/');
    let q = Query::parse(query)?;
    if trimmed == "/api/health" || trimmed == "/api/v1/health" {
        if method != Method::HEAD && method != Method::GET {
            return Err(RouteError::MethodNotAllowed);
        }
        if trimmed == "/api/health" {
            q.check_version()?;
        }
        return Ok(Route::Health);
    }
    let (legacy, rest) = if let Some(r) = trimmed.strip_prefix("/api/v1/hubs/") {
        (true, r)
    } else if let Some(r) = trimmed.strip_prefix("/api/hubs/") {
        (false, r)
    } else {
        return Err(RouteError::NotFound);
    };
    let raw: Vec<&str> = rest.split('/').collect();
    let mut segs = Vec::with_capacity(raw.len());
    for s in &raw {
        segs.push(
            percent_decode(s)
                .ok_or_else(|| RouteError::BadRequest("A path segment is not UTF-8.".into()))?,
        );
    }
    let Some((hub, tail)) = segs.split_first() else {
        return Err(RouteError::NotFound);
    };
    let hub = valid_hub(hub)?;
    if !legacy {
        q.check_version()?;
    }
    let tail: Vec<&str> = tail.iter().map(String::as_str).collect();
    let action = if legacy {
        legacy_action(method, &tail)?
    } else {
        action(method, &tail)?
    };
    if let Some(app) = &q.application {
        valid_application(app)?;
    }
    Ok(Route::Hub(HubRequest {
        hub,
        application: q.application.map(|a| a.to_ascii_lowercase()),
        action,
        excluded: q.excluded,
        reason: q.reason,
        ttl: q.ttl,
        legacy,
    }))
}

fn action(method: &Method, tail: &[&str]) -> Result<Action, RouteError> {
    use Action as A;
    let m = method;
    let only = |want: &[Method], a: A| -> Result<A, RouteError> {
        if want.contains(m) {
            Ok(a)
        } else {
            Err(RouteError::MethodNotAllowed)
        }
    };
    let head_or_get = [Method::HEAD, Method::GET];
    match tail {
        [":send"] => only(&[Method::POST], A::SendAll),
        [":closeConnections"] => only(&[Method::POST], A::CloseAll),
        ["users", u] => only(&head_or_get, A::UserExists(user(u)?)),
        ["users", u, ":send"] => only(&[Method::POST], A::SendUser(user(u)?)),
        ["users", u, ":closeConnections"] => only(&[Method::POST], A::CloseUser(user(u)?)),
        ["users", u, "groups"] => only(&[Method::DELETE], A::RemoveUserFromAllGroups(user(u)?)),
        ["users", u, "groups", g] => {
            let (u, g) = (user(u)?, group(g)?);
            match *m {
                Method::PUT => Ok(A::AddUserToGroup(u, g)),
                Method::DELETE => Ok(A::RemoveUserFromGroup(u, g)),
                Method::HEAD | Method::GET => Ok(A::UserInGroup(u, g)),
                _ => Err(RouteError::MethodNotAllowed),
            }
        }
        ["connections", c] => {
            let c = connection(c)?;
            match *m {
                Method::DELETE => Ok(A::CloseConnection(c)),
                Method::HEAD | Method::GET => Ok(A::ConnectionExists(c)),
                _ => Err(RouteError::MethodNotAllowed),
            }
        }
        ["connections", c, ":send"] => only(&[Method::POST], A::SendConnection(connection(c)?)),
        ["connections", c, "groups"] => only(
            &[Method::DELETE],
            A::RemoveConnectionFromAllGroups(connection(c)?),
        ),
        ["groups", g] => only(&head_or_get, A::GroupExists(group(g)?)),
        ["groups", g, ":send"] => only(&[Method::POST], A::SendGroup(group(g)?)),
        ["groups", g, ":closeConnections"] => only(&[Method::POST], A::CloseGroup(group(g)?)),
        ["groups", g, "connections", c] => {
            let (g, c) = (group(g)?, connection(c)?);
            match *m {
                Method::PUT => Ok(A::AddConnectionToGroup(g, c)),
                Method::DELETE => Ok(A::RemoveConnectionFromGroup(g, c)),
                _ => Err(RouteError::MethodNotAllowed),
            }
        }
        _ => Err(RouteError::NotFound),
    }
}

fn legacy_action(method: &Method, tail: &[&str]) -> Result<Action, RouteError> {
    use Action as A;
    let m = method;
    let post = |a: A| {
        if m == Method::POST {
            Ok(a)
        } else {
            Err(RouteError::MethodNotAllowed)
        }
    };
    let user_group = |u: &str, g: &str| -> Result<A, RouteError> {
        let (u, g) = (user(u)?, group(g)?);
        match *m {
            Method::PUT => Ok(A::AddUserToGroup(u, g)),
            Method::DELETE => Ok(A::RemoveUserFromGroup(u, g)),
            Method::GET | Method::HEAD => Ok(A::UserInGroup(u, g)),
            _ => Err(RouteError::MethodNotAllowed),
        }
    };
    match tail {
        [] => post(A::SendAll),
        ["users", u] => post(A::SendUser(user(u)?)),
        ["groups", g] => post(A::SendGroup(group(g)?)),
        ["connections", c] => {
            let c = connection(c)?;
            match *m {
                Method::POST => Ok(A::SendConnection(c)),
                Method::DELETE => Ok(A::CloseConnection(c)),
                _ => Err(RouteError::MethodNotAllowed),
            }
        }
        ["groups", g, "connections", c] => {
            let (g, c) = (group(g)?, connection(c)?);
            match *m {
                Method::PUT => Ok(A::AddConnectionToGroup(g, c)),
                Method::DELETE => Ok(A::RemoveConnectionFromGroup(g, c)),
                _ => Err(RouteError::MethodNotAllowed),
            }
        }
        ["users", u, "groups", g] => user_group(u, g),
        ["groups", g, "users", u] => user_group(u, g),
        _ => Err(RouteError::NotFound),
    }
}

/// A hub name, lowercased; 400 unless it matches the service's pattern.
pub fn valid_hub(hub: &str) -> Result<String, RouteError> {
    let mut chars = hub.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_`,.[]".contains(c));
    if !first_ok || !rest_ok || hub.len() > 128 {
        return Err(RouteError::BadRequest(format!(
            "Invalid hub name '{hub}': it must start with a letter and contain only letters, digits and _`,.[] (at most 128 characters)."
        )));
    }
    Ok(hub.to_ascii_lowercase())
}

fn valid_application(app: &str) -> Result<(), RouteError> {
    let mut chars = app.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && app.len() <= 128;
    if ok {
        Ok(())
    } else {
        Err(RouteError::BadRequest(format!(
            "Invalid application name '{app}'."
        )))
    }
}

fn user(s: &str) -> Result<UserId, RouteError> {
    UserId::new(s).map_err(|e| RouteError::BadRequest(format!("Invalid user id: {e}.")))
}

fn connection(s: &str) -> Result<ConnectionId, RouteError> {
    ConnectionId::new(s).map_err(|e| RouteError::BadRequest(format!("Invalid connection id: {e}.")))
}

/// A group name: 1–1024 characters, not all whitespace (and feedhub's id limits).
pub fn group(s: &str) -> Result<GroupName, RouteError> {
    let chars = s.chars().count();
    if chars == 0 || chars > MAX_GROUP_CHARS || s.trim().is_empty() {
        return Err(RouteError::BadRequest(
            "Invalid group name: it must be 1 to 1024 characters long and not only whitespace."
                .into(),
        ));
    }
    GroupName::new(s).map_err(|e| RouteError::BadRequest(format!("Invalid group name: {e}.")))
}

/// The query parameters the API reads.
#[derive(Debug, Default)]
struct Query {
    api_version: Option<String>,
    application: Option<String>,
    excluded: Vec<ConnectionId>,
    reason: Option<String>,
    ttl: Option<u64>,
}

impl Query {
    fn parse(query: &str) -> Result<Query, RouteError> {
        let mut q = Query::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "api-version" => q.api_version = Some(v.into_owned()),
                "application" if !v.is_empty() => q.application = Some(v.into_owned()),
                "excluded" if !v.is_empty() => {
                    if q.excluded.len() >= MAX_EXCLUDED {
                        return Err(RouteError::BadRequest(format!(
                            "At most {MAX_EXCLUDED} excluded connection ids."
                        )));
                    }
                    q.excluded.push(connection(&v)?);
                }
                "reason" => q.reason = Some(v.into_owned()).filter(|r| !r.is_empty()),
                "ttl" => {
                    let ttl = v.parse::<i64>().ok().filter(|t| *t >= 0).ok_or_else(|| {
                        RouteError::BadRequest(format!(
                            "Invalid ttl '{v}': a non-negative number of seconds."
                        ))
                    })?;
                    q.ttl = Some(ttl as u64);
                }
                _ => {}
            }
        }
        Ok(q)
    }

    fn check_version(&self) -> Result<(), RouteError> {
        match self.api_version.as_deref() {
            Some(v) if API_VERSIONS.contains(&v) => Ok(()),
            Some(v) => Err(RouteError::BadRequest(format!(
                "Unsupported api-version '{v}'; supported: {}.",
                API_VERSIONS.join(", ")
            ))),
            None => Err(RouteError::BadRequest(
                "The api-version query parameter is required.".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: &str = "api-version=2022-06-01";

    fn hub(method: Method, path: &str, query: &str) -> Result<HubRequest, RouteError> {
        match parse(&method, path, query)? {
            Route::Hub(h) => Ok(h),
            Route::Health => panic!("health"),
        }
    }

    fn act(method: Method, path: &str) -> Action {
        hub(method, path, V).unwrap().action
    }

    fn u(s: &str) -> UserId {
        UserId::new(s).unwrap()
    }
    fn g(s: &str) -> GroupName {
        GroupName::new(s).unwrap()
    }
    fn c(s: &str) -> ConnectionId {
        ConnectionId::new(s).unwrap()
    }

    #[test]
    fn every_route() {
        use Action as A;
        let p = "/api/hubs/Feed";
        assert_eq!(act(Method::POST, &format!("{p}/:send")), A::SendAll);
        assert_eq!(
            act(Method::POST, &format!("{p}/:closeConnections")),
            A::CloseAll
        );
        assert_eq!(
            act(Method::HEAD, &format!("{p}/users/a%20b")),
            A::UserExists(u("a b"))
        );
        assert_eq!(
            act(Method::POST, &format!("{p}/users/1/:send")),
            A::SendUser(u("1"))
        );
        assert_eq!(
            act(Method::POST, &format!("{p}/users/1/:closeConnections")),
            A::CloseUser(u("1"))
        );
        assert_eq!(
            act(Method::DELETE, &format!("{p}/users/1/groups")),
            A::RemoveUserFromAllGroups(u("1"))
        );
        assert_eq!(
            act(Method::PUT, &format!("{p}/users/1/groups/x")),
            A::AddUserToGroup(u("1"), g("x"))
        );
        assert_eq!(
            act(Method::DELETE, &format!("{p}/users/1/groups/x")),
            A::RemoveUserFromGroup(u("1"), g("x"))
        );
        assert_eq!(
            act(Method::GET, &format!("{p}/users/1/groups/x")),
            A::UserInGroup(u("1"), g("x"))
        );
        assert_eq!(
            act(Method::HEAD, &format!("{p}/users/1/groups/x")),
            A::UserInGroup(u("1"), g("x"))
        );
        assert_eq!(
            act(Method::DELETE, &format!("{p}/connections/k")),
            A::CloseConnection(c("k"))
        );
        assert_eq!(
            act(Method::HEAD, &format!("{p}/connections/k")),
            A::ConnectionExists(c("k"))
        );
        assert_eq!(
            act(Method::POST, &format!("{p}/connections/k/:send")),
            A::SendConnection(c("k"))
        );
        assert_eq!(
            act(Method::DELETE, &format!("{p}/connections/k/groups")),
            A::RemoveConnectionFromAllGroups(c("k"))
        );
        assert_eq!(
            act(Method::HEAD, &format!("{p}/groups/x")),
            A::GroupExists(g("x"))
        );
        assert_eq!(
            act(Method::POST, &format!("{p}/groups/x/:send")),
            A::SendGroup(g("x"))
        );
        assert_eq!(
            act(Method::POST, &format!("{p}/groups/x/:closeConnections")),
            A::CloseGroup(g("x"))
        );
        assert_eq!(
            act(Method::PUT, &format!("{p}/groups/x/connections/k")),
            A::AddConnectionToGroup(g("x"), c("k"))
        );
        assert_eq!(
            act(Method::DELETE, &format!("{p}/groups/x/connections/k")),
            A::RemoveConnectionFromGroup(g("x"), c("k"))
        );
        assert_eq!(
            hub(Method::POST, &format!("{p}/:send"), V).unwrap().hub,
            "feed"
        );
        assert_eq!(parse(&Method::HEAD, "/api/health", V), Ok(Route::Health));
        assert_eq!(parse(&Method::GET, "/api/v1/health", ""), Ok(Route::Health));
    }

    #[test]
    fn legacy_routes() {
        use Action as A;
        let h = |m, p: &str| hub(m, p, "").unwrap();
        let r = h(Method::POST, "/api/v1/hubs/feed");
        assert_eq!((r.action, r.legacy), (A::SendAll, true));
        assert_eq!(
            h(Method::POST, "/api/v1/hubs/feed/users/1").action,
            A::SendUser(u("1"))
        );
        assert_eq!(
            h(Method::POST, "/api/v1/hubs/feed/groups/x").action,
            A::SendGroup(g("x"))
        );
        assert_eq!(
            h(Method::DELETE, "/api/v1/hubs/feed/connections/k").action,
            A::CloseConnection(c("k"))
        );
        assert_eq!(
            h(Method::PUT, "/api/v1/hubs/feed/groups/x/users/1").action,
            A::AddUserToGroup(u("1"), g("x"))
        );
        assert_eq!(
            h(Method::GET, "/api/v1/hubs/feed/users/1/groups/x").action,
            A::UserInGroup(u("1"), g("x"))
        );
    }

    #[test]
    fn query_parameters() {
        let r = hub(
            Method::POST,
            "/api/hubs/feed/:send",
            "application=App&api-version=2022-06-01&excluded=a&excluded=b&reason=bye&ttl=5",
        )
        .unwrap();
        assert_eq!(r.application.as_deref(), Some("app"));
        assert_eq!(r.excluded, vec![c("a"), c("b")]);
        assert_eq!(r.reason.as_deref(), Some("bye"));
        assert_eq!(r.ttl, Some(5));
    }

    #[test]
    fn errors() {
        let bad = |m: Method, p: &str, q: &str| match parse(&m, p, q) {
            Err(RouteError::BadRequest(_)) => {}
            other => panic!("{p}?{q}: {other:?}"),
        };
        bad(Method::POST, "/api/hubs/1feed/:send", V);
        bad(Method::POST, "/api/hubs/fe-ed/:send", V);
        bad(
            Method::POST,
            &format!("/api/hubs/{}/:send", "a".repeat(129)),
            V,
        );
        bad(Method::POST, "/api/hubs/feed/groups/%20%20/:send", V);
        bad(
            Method::POST,
            &format!("/api/hubs/feed/groups/{}/:send", "g".repeat(1025)),
            V,
        );
        bad(Method::POST, "/api/hubs/feed/:send", "");
        bad(
            Method::POST,
            "/api/hubs/feed/:send",
            "api-version=1999-01-01",
        );
        bad(
            Method::PUT,
            "/api/hubs/feed/users/u/groups/g",
            "api-version=2022-06-01&ttl=-1",
        );
        bad(
            Method::PUT,
            "/api/hubs/feed/users/u/groups/g",
            "api-version=2022-06-01&ttl=x",
        );
        bad(
            Method::POST,
            "/api/hubs/feed/:send",
            "api-version=2022-06-01&application=1x",
        );
        bad(Method::POST, "/api/hubs/feed/users/%ff/:send", V);
        bad(Method::HEAD, "/api/health", "");
        assert_eq!(
            parse(&Method::GET, "/api/hubs/feed/:send", V),
            Err(RouteError::MethodNotAllowed)
        );
        assert_eq!(
            parse(&Method::PUT, "/api/hubs/feed/connections/k", V),
            Err(RouteError::MethodNotAllowed)
        );
        assert_eq!(
            parse(&Method::POST, "/api/health", V),
            Err(RouteError::MethodNotAllowed)
        );
        assert_eq!(
            parse(&Method::POST, "/api/hubs/feed/nothing", V),
            Err(RouteError::NotFound)
        );
        assert_eq!(
            parse(&Method::POST, "/api/hubs/feed/users/a/b/c/d", V),
            Err(RouteError::NotFound)
        );
        assert!(is_rest_path("/api/hubs/feed/:send"));
        assert!(is_rest_path("/api/health"));
        assert!(!is_rest_path("/api/feed"));
    }
}
