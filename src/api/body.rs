//! Reading a JSON body: size limit (413) and parse errors that name the offending field (400).
//! The Content-Type is not enforced, so `curl -d '{…}'` works as typed.

use axum::body::Body;
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = read_limited(body, limit).await?;
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "request body is empty; send a JSON object",
        ));
    }
    // Parse the whole body as one JSON value first: trailing bytes, a second value, or
    // anything but an object is refused rather than silently ignored.
    let mut value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "request body must be a JSON object (see openapi.yaml)",
        ));
    }
    integral_floats_to_integers(&mut value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde names unknown fields in its message; otherwise the path names the field.
        let param = if let Some(rest) = msg.strip_prefix("unknown field `") {
            rest.split('`').next().map(str::to_string)
        } else if path != "." && path != "?" && !path.is_empty() {
            Some(path)
        } else {
            None
        };
        let mut err = ApiError::bad_request(match &param {
            Some(p) => format!("invalid request body at '{p}': {msg}"),
            None => format!("invalid JSON body: {msg}"),
        });
        err.param = param;
        err
    })
}

/// JSON Schema counts 1.0 as an integer; so do we (top-level fields only: the bodies are flat).
fn integral_floats_to_integers(v: &mut serde_json::Value) {
    if let Some(obj) = v.as_object_mut() {
        for field in obj.values_mut() {
            if let Some(f) = field.as_f64().filter(|_| field.is_f64()) {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    *field = serde_json::Value::from(f as i64);
                }
            }
        }
    }
}

/// Most bytes read (and discarded) from an oversized body before answering 413, so that a
/// client still sending gets the 413 rather than a reset connection.
const DRAIN_LIMIT: usize = 8 << 20;

async fn read_limited(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("cannot read request body: {e}")))?;
        total += chunk.len();
        if total <= limit {
            buf.extend_from_slice(&chunk);
        } else if total > DRAIN_LIMIT {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::too_large(limit));
    }
    Ok(buf)
}
