//! The socket as hyper sees it, with three additions:
//! - it tells the connection's state when bytes arrive (to time request heads);
//! - a read EOF after a request that announced it is the last (HTTP/1.0 or `Connection:
//!   close`) is the client half-closing its side: it is hidden from hyper, which would
//!   otherwise treat the client as gone and drop its request. Any other EOF is a client that
//!   left, and dropping its request is what frees its samples at once;
//! - hyper's own answers to requests it could not parse (400, 414, 431, written with an empty
//!   body) are replaced by the API's JSON error shape.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::conn::{ConnState, RequestGuard};

pub struct ConnIo {
    inner: TcpStream,
    state: Arc<ConnState>,
    /// The client half-closed; reads stay pending (hyper closes after the response).
    eof_held: bool,
    /// A replacement response still to be written, and how much of it is written.
    out: Vec<u8>,
    out_pos: usize,
    /// After an error response: read and discard what the client still sends before closing
    /// (bounded in bytes and time), so that closing with unread input does not reset the
    /// connection and destroy the answer before the client reads it.
    linger: Option<Linger>,
}

struct Linger {
    fin_sent: bool,
    discarded: usize,
    until: Pin<Box<tokio::time::Sleep>>,
}

/// Most bytes and time spent discarding a rejected client's input before closing.
const LINGER_BYTES: usize = 4 << 20;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);

impl ConnIo {
    pub fn new(inner: TcpStream, state: Arc<ConnState>) -> Self {
        Self {
            inner,
            state,
            eof_held: false,
            out: Vec::new(),
            out_pos: 0,
            linger: None,
        }
    }

    fn flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        Ok(()).into()
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.eof_held {
            return Poll::Pending;
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            self.state.on_bytes();
        } else if self.state.eof_is_half_close() {
            self.eof_held = true;
            return Poll::Pending;
        }
        Ok(()).into()
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.flush_out(cx))?;
        if let Some(status) = own_error_status(buf) {
            if self.state.take_head() {
                // Claim hyper's bytes as written and send ours instead.
                self.out = json_error_response(status);
                self.out_pos = 0;
                self.linger = Some(Linger {
                    fin_sent: false,
                    discarded: 0,
                    until: Box::pin(tokio::time::sleep(LINGER_TIME)),
                });
                let _ = self.flush_out(cx)?;
                return Ok(buf.len()).into();
            }
        } else if is_final_head(buf) {
            self.state.take_head();
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.flush_out(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.flush_out(cx))?;
        let this = &mut *self;
        let Some(linger) = this.linger.as_mut() else {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        };
        if !linger.fin_sent {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            linger.fin_sent = true;
        }
        let mut scratch = [0u8; 8192];
        loop {
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    linger.discarded += rb.filled().len();
                    if linger.discarded > LINGER_BYTES {
                        return Ok(()).into();
                    }
                }
                // EOF or an error: the client has its answer or is gone.
                Poll::Ready(_) => return Ok(()).into(),
                Poll::Pending => {
                    return match linger.until.as_mut().poll(cx) {
                        Poll::Ready(()) => Ok(()).into(),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

/// A response head other than 1xx starts this write.
fn is_final_head(buf: &[u8]) -> bool {
    buf.starts_with(b"HTTP/1.") && buf.get(9) != Some(&b'1')
}

/// The status of one of hyper's automatic parse-error responses (400, 414 or 431 with an empty
/// body), if this write is one.
fn own_error_status(buf: &[u8]) -> Option<u16> {
    let head = buf.strip_prefix(b"HTTP/1.1 ")?;
    let status: u16 = std::str::from_utf8(head.get(..3)?).ok()?.parse().ok()?;
    let empty = buf
        .windows(21)
        .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0\r\n"));
    (matches!(status, 400 | 414 | 431) && empty && buf.ends_with(b"\r\n\r\n")).then_some(status)
}

fn json_error_response(status: u16) -> Vec<u8> {
    let (reason, message) = match status {
        431 => (
            "Request Header Fields Too Large",
            "request head too large: the request line and headers must fit in 64 KiB",
        ),
        414 => ("URI Too Long", "request URI too long"),
        _ => (
            "Bad Request",
            "malformed HTTP request (request line or headers)",
        ),
    };
    let body = serde_json::json!({"error": {
        "type": "invalid_request_error", "message": message, "param": null, "code": null}})
    .to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A response body that keeps its request counted as in flight until it is finished or
/// dropped (streamed responses outlive their handler).
pub struct GuardedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl GuardedBody {
    pub fn new(inner: Body, guard: RequestGuard) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_empty_parse_error_responses_are_replaced() {
        let hyper_431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(own_error_status(hyper_431), Some(431));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 90\r\n\r\n{\"error\":1}";
        assert_eq!(own_error_status(ours), None);
        assert_eq!(
            own_error_status(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            None
        );
        assert!(is_final_head(b"HTTP/1.1 200 OK\r\n"));
        assert!(!is_final_head(b"HTTP/1.1 100 Continue\r\n\r\n"));
        let r = String::from_utf8(json_error_response(431)).unwrap();
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(r.contains(&format!("content-length: {}\r\n", body.len())));
    }
}
