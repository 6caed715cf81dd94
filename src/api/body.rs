//! Reading a JSON body: size limit (413) and parse errors that name the offending field (400).
//! The Content-Type is not enforced, so `curl -d '{…}'` works as typed.

use axum::body::Body;
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub async fn read_json<T: DeserializeOwned>(
    body: Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<T, ApiError> {
    // A client that announces more than it sends (or sends a byte a minute) is cut off.
    let bytes = tokio::time::timeout(timeout, read_limited(body, limit))
        .await
        .map_err(|_| ApiError::body_timeout(timeout))??;
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "request body is empty; send a JSON object",
        ));
    }
    // Only a JSON object is a request; serde's derive would also take an array positionally.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid type: the request body must be a JSON object (see openapi.yaml)",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // serde names unknown, duplicate and missing fields only in its message.
        let named = ["unknown field `", "duplicate field `", "missing field `"]
            .iter()
            .find_map(|p| msg.strip_prefix(p))
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string);
        let param = if named.is_some() {
            named
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
    })?;
    // Trailing bytes or a second value are refused, not silently ignored.
    de.end()
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// `deserialize_with` for optional integer fields: JSON Schema counts 1.0 as an integer, so a
/// whole-number float is accepted; 1.5 is not.
pub fn opt_integer<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i128>,
{
    use serde::de::{Deserialize, Error, Unexpected};
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let i: i128 = if let Some(i) = n.as_i64() {
        i.into()
    } else if let Some(u) = n.as_u64() {
        u.into()
    } else {
        let f = n.as_f64().unwrap_or(f64::NAN);
        if f.fract() != 0.0 || f.abs() >= 1.8e19 {
            return Err(D::Error::invalid_type(Unexpected::Float(f), &"an integer"));
        }
        f as i128
    };
    T::try_from(i).map(Some).map_err(|_| {
        D::Error::invalid_value(
            Unexpected::Other(&format!("integer {i}")),
            &"an integer in range",
        )
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
