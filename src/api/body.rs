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
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde names unknown fields in its message; otherwise the path names the field.
        let param = if let Some(rest) = msg.strip_prefix("unknown field `") {
            rest.split('`').next().map(str::to_string)
        } else if path != "." && !path.is_empty() {
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
