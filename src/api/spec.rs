//! `GET /openapi.yaml`: the API contract, embedded, so the 404 body's pointer leads somewhere.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

const SPEC: &str = include_str!("../../openapi.yaml");

pub async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml; charset=utf-8"),
        )],
        SPEC,
    )
        .into_response()
}
