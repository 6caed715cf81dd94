//! `GET /`: the playground page, one self-contained HTML file embedded in the binary. It talks
//! only to the public API (`/v1/models`, `/v1/classes`, `/generate` with `stream`), loads
//! nothing from anywhere else, and works offline.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::AppState;

const PAGE: &str = include_str!("../../assets/playground.html");

/// What the page may do, enforced by the browser: scripts and styles only inline (the page's
/// own), images from itself, `data:` and `blob:` URLs, requests only to this origin. Nothing
/// can leave the origin even by mistake.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     img-src 'self' data: blob:; connect-src 'self' blob:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The page's `data-auth` attribute: whether it should ask for an API key before its first
/// request, so that a person never sees a bare 401 (the page itself needs no key).
fn page_html(keys_required: bool) -> String {
    let auth = if keys_required { "bearer" } else { "none" };
    PAGE.replacen("data-auth=\"none\"", &format!("data-auth=\"{auth}\""), 1)
}

pub async fn page(State(state): State<AppState>) -> Response {
    let mut resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        page_html(!state.api_keys.is_empty()),
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_says_whether_it_needs_a_key() {
        assert!(page_html(false).contains("data-auth=\"none\""));
        let with_keys = page_html(true);
        assert!(with_keys.contains("data-auth=\"bearer\""));
        assert!(!with_keys.contains("data-auth=\"none\""));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for needle in ["http://", "https://", "//cdn", "@import", "url(http"] {
            // The SVG namespace is a name, never fetched.
            let hits = PAGE
                .match_indices(needle)
                .filter(|(i, _)| !PAGE[*i..].starts_with("http://www.w3.org/2000/svg"))
                .count();
            assert_eq!(hits, 0, "the page mentions {needle}");
        }
    }
}
