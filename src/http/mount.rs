//! Services mounted on the router: the parts of the HTTP face the composition root adds
//! (the demo page and its post service, a REST API), each behind one trait, so the router
//! does not know them by name and they do not know the router.
//!
//! A service implements [`Mount`]; the composition root (`app`) puts it in a [`Mounts`]
//! table under one or more [`Route`]s, and the router (`http::route`) hands it every
//! request whose path matches, after its built-in routes (`/healthz`, `/readyz`,
//! `/metrics`, `/api/feed`, `/dev/token`) and before the hubs:
//!
//! ```ignore
//! let mut mounts = Mounts::new();
//! mounts
//!     .mount(Route::exact("/").method(Method::GET), demo.clone())
//!     .mount(Route::prefix("/demo/"), demo)
//!     .mount(Route::prefix("/api/hubs/"), rest_api.clone())
//!     .mount(Route::prefix("/api/v1/hubs/"), rest_api.clone())
//!     .mount(Route::prefix("/api/health"), rest_api);
//! ```
//!
//! Matching is on the request path with trailing slashes removed (`/` for an empty path),
//! the same path the service is handed:
//!
//! - [`Route::exact`]: that path only (`/app.js` matches `/app.js` and `/app.js/`);
//! - [`Route::prefix`] ending in `/`: every path that starts with it (`/demo/` matches
//!   `/demo/users`, not `/demo`);
//! - [`Route::prefix`] not ending in `/`: the path itself and the paths below it, at a
//!   segment boundary (`/api/health` matches `/api/health` and `/api/health/x`, not
//!   `/api/healthz`);
//! - [`Route::method`] restricts a route to one method; a request with another method
//!   goes on to the next route (and to the hubs, then 404), as if the route were not there.
//!
//! The first matching route in mount order wins. What the router does for every request
//! applies to mounted services too: `OPTIONS` is answered as a CORS preflight before any
//! route, and CORS headers are added to their responses for listed origins. Anything else
//! (authentication, body limits: [`super::respond`] has the helpers) is the service's.

use std::sync::Arc;

use async_trait::async_trait;
use http::{HeaderMap, Method, Request, Response};
use hyper::body::Incoming;

use super::respond::Body;
use crate::auth::Identity;
use crate::hub::HubLifetime;

/// A service the router dispatches requests to (see the module doc).
#[async_trait]
pub trait Mount: Send + Sync {
    /// Answers `req`; `path` is its path with trailing slashes removed (`/` when empty).
    async fn handle(&self, req: Request<Incoming>, path: &str) -> Response<Body>;
}

/// Another way into the hubs, set by the composition root (the Azure SignalR serverless
/// client redirect, `crate::azure`): before routing, the router lets it map its own paths
/// onto a hub's negotiate and connect paths ([`HubGateway::rewrite`]); and where a hub's
/// authenticator refuses a request's token, the gateway may vouch for it
/// ([`HubGateway::identity`]). Everything else (transports, limits, forwarding) is the
/// hub's own.
pub trait HubGateway: Send + Sync {
    /// `req` with its URI rewritten to a hub's path when it is on one of the gateway's
    /// paths; unchanged otherwise.
    fn rewrite(&self, req: Request<Incoming>) -> Request<Incoming>;

    /// The identity `token` proves for `hub` (request headers `headers`), if the gateway
    /// issued it; `None` otherwise.
    fn identity(&self, hub: &HubLifetime, token: &str, headers: &HeaderMap) -> Option<Identity>;
}

/// Which requests a mounted service gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    path: String,
    prefix: bool,
    method: Option<Method>,
}

impl Route {
    /// Exactly `path` (give it without a trailing slash, or `/`).
    pub fn exact(path: impl Into<String>) -> Route {
        Route {
            path: path.into(),
            prefix: false,
            method: None,
        }
    }

    /// `prefix` and below (see the module doc for the two forms).
    pub fn prefix(prefix: impl Into<String>) -> Route {
        Route {
            path: prefix.into(),
            prefix: true,
            method: None,
        }
    }

    /// Only requests with `method`.
    pub fn method(mut self, method: Method) -> Route {
        self.method = Some(method);
        self
    }

    /// Whether a request with `method` on (trimmed) `path` takes this route.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        if !self.prefix {
            return path == self.path;
        }
        if self.path.ends_with('/') {
            return path.starts_with(&self.path);
        }
        match path.strip_prefix(&self.path) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// The mounted services, in mount order.
#[derive(Default, Clone)]
pub struct Mounts {
    routes: Vec<(Route, Arc<dyn Mount>)>,
}

impl std::fmt::Debug for Mounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.routes.iter().map(|(r, _)| r))
            .finish()
    }
}

impl Mounts {
    /// No services.
    pub fn new() -> Mounts {
        Mounts::default()
    }

    /// Mounts `service` at `route` (after the routes mounted before).
    pub fn mount(&mut self, route: Route, service: Arc<dyn Mount>) -> &mut Mounts {
        self.routes.push((route, service));
        self
    }

    /// The service of the first route a request with `method` on (trimmed) `path` takes.
    pub fn find(&self, method: &Method, path: &str) -> Option<&Arc<dyn Mount>> {
        self.routes
            .iter()
            .find(|(route, _)| route.matches(method, path))
            .map(|(_, service)| service)
    }

    /// Whether nothing is mounted.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named;

    #[async_trait]
    impl Mount for Named {
        async fn handle(&self, _req: Request<Incoming>, _path: &str) -> Response<Body> {
            super::super::respond::text(http::StatusCode::OK, "")
        }
    }

    #[test]
    fn routes_match_exact_prefix_and_method() {
        let get = Method::GET;
        let post = Method::POST;
        let root = Route::exact("/").method(Method::GET);
        assert!(root.matches(&get, "/"));
        assert!(!root.matches(&post, "/"), "another method goes on");
        assert!(!root.matches(&get, "/x"));
        let demo = Route::prefix("/demo/");
        assert!(demo.matches(&get, "/demo/users"));
        assert!(demo.matches(&post, "/demo/posts"));
        assert!(
            !demo.matches(&get, "/demo"),
            "a prefix ending in / needs more"
        );
        assert!(!demo.matches(&get, "/demos/x"));
        let health = Route::prefix("/api/health");
        assert!(health.matches(&get, "/api/health"));
        assert!(health.matches(&get, "/api/health/x"));
        assert!(!health.matches(&get, "/api/healthz"), "segment boundary");
        assert!(!health.matches(&get, "/api"));
    }

    #[test]
    fn first_route_in_mount_order_wins() {
        let a: Arc<dyn Mount> = Arc::new(Named);
        let b: Arc<dyn Mount> = Arc::new(Named);
        let mut mounts = Mounts::new();
        assert!(mounts.is_empty());
        mounts
            .mount(Route::exact("/api/hubs/special"), a.clone())
            .mount(Route::prefix("/api/hubs/"), b.clone());
        let found = |p: &str| mounts.find(&Method::GET, p).cloned();
        assert!(Arc::ptr_eq(&found("/api/hubs/special").unwrap(), &a));
        assert!(Arc::ptr_eq(&found("/api/hubs/feed/users/1").unwrap(), &b));
        assert!(found("/api/feed").is_none());
        assert!(found("/").is_none());
    }
}
