//! Middleware that refuses work before it costs anything: too many requests at once, and
//! requests that a browser sends on behalf of another web site.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{AppState, OPEN_ROUTES};

/// At most `--max-inflight-requests` requests are handled at once; beyond that, 503 at once
/// rather than queueing without bound. Probes and /metrics never wait behind the limit.
pub async fn limit_inflight(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if OPEN_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let Ok(_permit) = state.http.inflight_requests.clone().try_acquire_owned() else {
        metrics::counter!("diffit_rejections_total", "reason" => "overloaded").increment(1);
        let mut e = ApiError::unavailable("too many requests in flight; retry shortly");
        e.retry_after = Some(1);
        return e.into_response();
    };
    next.run(req).await
}

/// Refuses (403) a state-changing request that a browser sends from another site: an `Origin`
/// that is not this server's own, or `Sec-Fetch-Site: cross-site`. Without this, any web page
/// could make its visitors' browsers start generations on a server without API keys (a
/// `text/plain` POST needs no preflight). Clients that are not browsers (curl, SDKs) send
/// neither header and are unaffected. Origins listed with `--cors-allow-origin` are allowed and
/// get CORS headers, preflight included. GET and HEAD are never refused: they change nothing,
/// and a link to the server from another site must still open.
pub async fn cross_origin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let allowed = origin
        .as_deref()
        .filter(|o| is_allowed(&state.http.cors_origins, o))
        .map(str::to_string);
    if let Some(origin) = allowed {
        if req.method() == Method::OPTIONS
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return with_cors(StatusCode::NO_CONTENT.into_response(), &origin, true);
        }
        return with_cors(next.run(req).await, &origin, false);
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    if !safe && is_cross_site(headers, origin.as_deref()) {
        metrics::counter!("diffit_rejections_total", "reason" => "cross_origin").increment(1);
        return ApiError::forbidden(format!(
            "cross-origin browser request refused (Origin {}); an operator can allow an origin \
             with --cors-allow-origin",
            origin.as_deref().unwrap_or("absent")
        ))
        .into_response();
    }
    next.run(req).await
}

fn is_allowed(allowed: &[String], origin: &str) -> bool {
    let origin = origin.trim_end_matches('/');
    allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

/// A browser sent this for a page of another origin.
fn is_cross_site(headers: &HeaderMap, origin: Option<&str>) -> bool {
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if fetch_site.eq_ignore_ascii_case("cross-site") {
        return true;
    }
    let Some(origin) = origin else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    !same_origin(origin, host)
}

/// Whether `origin` (`scheme://host[:port]`) names the host the request was sent to. `null`
/// (sandboxed pages, files) is never the same origin.
fn same_origin(origin: &str, host: &str) -> bool {
    let origin = origin.trim().trim_end_matches('/');
    let (scheme, authority) = match origin.split_once("://") {
        Some((s, a)) => (s.to_ascii_lowercase(), a),
        None => return false,
    };
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let strip = |a: &str| -> String {
        let a = a.to_ascii_lowercase();
        a.strip_suffix(default_port)
            .map(str::to_string)
            .unwrap_or(a)
    };
    !host.is_empty() && strip(authority) == strip(host.trim())
}

fn with_cors(mut resp: Response, origin: &str, preflight: bool) -> Response {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, accept, x-request-id"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    } else {
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-request-id, x-seed, x-class-label, retry-after"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_compares_host_and_port() {
        assert!(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(same_origin("https://Example.com", "example.com"));
        assert!(same_origin("http://example.com:80", "example.com"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:8080"));
        assert!(!same_origin("http://127.0.0.1:9999", "127.0.0.1:8080"));
        assert!(!same_origin("null", "127.0.0.1:8080"));
        assert!(!same_origin("http://127.0.0.1:8080", ""));
    }

    #[test]
    fn allowed_origins() {
        let list = vec!["https://app.example.com".to_string()];
        assert!(is_allowed(&list, "https://app.example.com"));
        assert!(is_allowed(&list, "https://APP.example.com/"));
        assert!(!is_allowed(&list, "https://evil.example.com"));
        assert!(is_allowed(&["*".to_string()], "http://anything"));
    }
}
