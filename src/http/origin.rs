//! The `--cors-origin` list: checked once at start, then used for CORS headers and for the
//! `Origin` of WebSocket upgrades and Server-Sent Events requests. Pure: no I/O, no logging.
//!
//! The server always answers CORS with credentials (the SignalR client sends them), so the
//! list may not hold `*` (any site could then act with a visitor's credentials) nor `null`
//! (sandboxed frames and `file:` pages send it: any site can produce it). Each entry is
//! `scheme://host[:port]`, compared without regard to case.
//!
//! Browsers do not apply CORS to WebSockets, and an `EventSource` request carries the
//! page's `Origin` too; when a list is configured, a WebSocket upgrade or SSE request whose
//! `Origin` is neither in it nor the server's own origin (same `Host`) gets 403. Requests
//! without `Origin` (non-browser clients) pass.

/// Checks the configured origins: `Err` with the reason for the first bad one.
pub fn validate(origins: &[String]) -> Result<(), String> {
    for o in origins {
        let t = o.trim();
        if t == "*" {
            return Err("'*' is refused: CORS responses carry credentials, so any site could act for a signed-in visitor. List the origins.".to_string());
        }
        if t.eq_ignore_ascii_case("null") {
            return Err("'null' is refused: sandboxed frames and file: pages of any site send it. List the origins.".to_string());
        }
        let Some((scheme, rest)) = t.split_once("://") else {
            return Err(format!("{t:?} is not an origin (scheme://host[:port])"));
        };
        let scheme_ok = !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
        let host_ok =
            !rest.is_empty() && !rest.contains(['/', '?', '#', '@', ' ']) && rest.is_ascii();
        if !scheme_ok || !host_ok {
            return Err(format!("{t:?} is not an origin (scheme://host[:port])"));
        }
    }
    Ok(())
}

/// Whether `origin` is in `allowed`.
pub fn listed(origin: &str, allowed: &[String]) -> bool {
    allowed
        .iter()
        .any(|a| a.trim().eq_ignore_ascii_case(origin))
}

/// Whether `origin` is the server's own (its host and port are the request's `Host`).
pub fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    match origin.split_once("://") {
        Some((_, rest)) => rest.eq_ignore_ascii_case(host),
        None => false,
    }
}

/// Whether a WebSocket upgrade or SSE request with `origin` may proceed: always without a
/// list or without `Origin`; otherwise only a listed or same origin.
pub fn upgrade_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match origin {
        None => true,
        Some(o) => listed(o, allowed) || same_origin(o, host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn wildcard_null_and_non_origins_are_refused() {
        assert!(validate(&v(&["*"])).unwrap_err().contains("'*'"));
        assert!(validate(&v(&["https://a.example", "null"]))
            .unwrap_err()
            .contains("'null'"));
        assert!(validate(&v(&["a.example"])).is_err());
        assert!(validate(&v(&["https://a.example/path"])).is_err());
        assert!(validate(&v(&["https://a.example", "http://localhost:5173"])).is_ok());
        assert!(validate(&[]).is_ok());
    }

    #[test]
    fn upgrades_need_a_listed_or_same_origin() {
        let list = v(&["https://app.example"]);
        assert!(upgrade_allowed(Some("https://APP.example"), None, &list));
        assert!(!upgrade_allowed(Some("https://evil.example"), None, &list));
        assert!(!upgrade_allowed(Some("null"), Some("hub:5000"), &list));
        assert!(upgrade_allowed(
            Some("http://hub:5000"),
            Some("hub:5000"),
            &list
        ));
        assert!(upgrade_allowed(None, None, &list));
        assert!(upgrade_allowed(Some("https://evil.example"), None, &[]));
    }
}
