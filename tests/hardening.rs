//! Hardening (issue 14), against the real server on a loopback port: slow, silent and
//! numerous connections, bounded drain, cheap close matches, fail-fast start-up, and the
//! smaller protocol items. Raw TCP where the point is what a misbehaving client does.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::fixture;
use common::server::TestServer;
use serde_json::{json, Value};

fn addr(s: &TestServer) -> String {
    s.base.trim_start_matches("http://").to_string()
}

/// Reads until EOF or `limit`; what arrived and whether the server closed the connection.
/// (Blocking std sockets: the tests only read where nothing else needs the runtime.)
async fn read_all(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut buf = Vec::new();
    let until = Instant::now() + limit;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (String::from_utf8_lossy(&buf).into(), false);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk) {
            Ok(0) => return (String::from_utf8_lossy(&buf).into(), true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (String::from_utf8_lossy(&buf).into(), false)
            }
            Err(_) => return (String::from_utf8_lossy(&buf).into(), true),
        }
    }
}

fn connect(s: &TestServer) -> TcpStream {
    TcpStream::connect(addr(s)).unwrap()
}

/// One raw request on a fresh connection; the whole answer (the server closes after it).
async fn raw(s: &TestServer, bytes: &[u8]) -> String {
    let mut c = connect(s);
    c.write_all(bytes).unwrap();
    read_all(&mut c, Duration::from_secs(10)).await.0
}

fn body_of(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {response}"))
}

/// Latency of one `/healthz` on a new connection.
async fn healthz_ms(s: &TestServer) -> f64 {
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let t = Instant::now();
    let r = c.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    t.elapsed().as_secs_f64() * 1e3
}

#[tokio::test]
async fn slow_silent_and_idle_connections_are_closed_and_healthz_stays_served() {
    let s = TestServer::start(&[
        "--header-read-timeout-secs",
        "1",
        "--idle-timeout-secs",
        "3",
        "--body-read-timeout-secs",
        "1",
        "--max-connections",
        "32",
        "--max-inflight-requests",
        "1",
    ])
    .await;

    // Slowloris: 100 connections (three times the limit) each holding half a request head.
    let mut held = Vec::new();
    for _ in 0..100 {
        let mut c = connect(&s);
        let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
        held.push(c);
    }
    // A well-behaved client is served while they are held.
    for _ in 0..5 {
        let ms = healthz_ms(&s).await;
        assert!(ms < 1000.0, "/healthz took {ms} ms during the slowloris");
    }
    // Every held connection is closed (evicted at once, or at the 1 s header timeout).
    let t = Instant::now();
    for c in &mut held {
        let (_, closed) = read_all(c, Duration::from_secs(4)).await;
        assert!(closed, "a slow connection was not closed");
    }
    assert!(t.elapsed() < Duration::from_secs(3));
    let evicted = s
        .metric("diffit_connections_closed_total{reason=\"evicted\"}")
        .await;
    let timed_out = s
        .metric("diffit_connections_closed_total{reason=\"header_timeout\"}")
        .await;
    assert!(evicted >= 60.0, "evicted {evicted}");
    assert!(timed_out >= 1.0, "header timeouts {timed_out}");
    assert!(s.metric("diffit_connections_open").await <= 2.0);

    // A head trickled a byte every 300 ms is cut at the header timeout too.
    let mut c = connect(&s);
    let t = Instant::now();
    let mut closed_after = None;
    for b in b"GET /healthz HTTP/1.1\r\nHost: trickle\r\nX-Slow: aaaaaaaaaaaaaaaaa\r\n" {
        if c.write_all(&[*b]).is_err() {
            closed_after = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        if let Ok(0) = c.read(&mut [0u8; 1]) {
            closed_after = Some(t.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the trickling connection was never closed");
    assert!(
        closed_after < Duration::from_millis(2500),
        "{closed_after:?}"
    );

    // Keep-alive: an idle connection outlives the header timeout (1 s) but not the idle
    // timeout (3 s).
    let mut c = connect(&s);
    let req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    c.write_all(req).unwrap();
    let mut buf = [0u8; 2048];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1800)).await;
    c.write_all(req).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = c.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "kept alive past the header timeout"
    );
    let t = Instant::now();
    let (_, closed) = read_all(&mut c, Duration::from_secs(6)).await;
    assert!(closed, "idle connection closed");
    let idle = t.elapsed();
    assert!(
        idle > Duration::from_millis(2500) && idle < Duration::from_millis(4500),
        "{idle:?}"
    );

    // A Content-Length longer than the body: 408 with the JSON error at the body timeout.
    let mut c = connect(&s);
    c.write_all(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"class\"")
        .unwrap();
    let t = Instant::now();
    let (resp, closed) = read_all(&mut c, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(closed, "the connection is closed after a 408");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(body_of(&resp)["error"]["type"], "invalid_request_error");

    // In-flight bound (1 here): while one request is held reading its body, another gets 503
    // at once; probes are not counted.
    let mut holder = connect(&s);
    holder
        .write_all(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let r = s
        .post("/generate", json!({"class_label": 1, "steps": 2}))
        .await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(s.get("/healthz").await.status(), 200);
    drop(holder);
    assert!(
        s.wait_metric("diffit_rejections_total{reason=\"overloaded\"}", 1.0)
            .await
    );
}

#[tokio::test]
async fn when_every_connection_is_busy_a_new_one_is_refused_with_503() {
    let s = TestServer::start(&["--max-connections", "2", "--body-read-timeout-secs", "20"]).await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut c = connect(&s);
        c.write_all(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            .unwrap();
        busy.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let resp = raw(&s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(body_of(&resp)["error"]["type"], "unavailable_error");
    // Once the busy connections go, new ones are served again.
    drop(busy);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.metric("diffit_connections_refused_total").await >= 1.0);
    assert!(raw(
        &s,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .await
    .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn drain_ends_at_its_timeout_whatever_clients_do() {
    let mut s = TestServer::start(&[
        "--drain-timeout-secs",
        "2",
        "--header-read-timeout-secs",
        "60",
        "--body-read-timeout-secs",
        "60",
        "--max-batch",
        "4",
    ])
    .await;
    // Held: half a head, half a body, and generations far longer than the drain timeout.
    let mut head = connect(&s);
    head.write_all(b"GET /healthz HTTP/1.1\r\nHo").unwrap();
    let mut body = connect(&s);
    body.write_all(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 80\r\n\r\n{\"cl")
        .unwrap();
    let mut long = Vec::new();
    for _ in 0..2 {
        let c = s.client.clone();
        let url = s.url("/generate");
        long.push(tokio::spawn(async move {
            c.post(url)
                .json(&json!({"class_label": 1, "n": 4, "steps": 1000}))
                .send()
                .await
        }));
    }
    assert!(
        s.wait_metric("diffit_active_samples{model=\"diffit_tiny_model\"}", 4.0)
            .await
    );
    let t = Instant::now();
    s.sigterm();
    let code = s.wait_exit(Duration::from_secs(10)).await;
    let took = t.elapsed();
    assert!(took < Duration::from_millis(2600), "exited after {took:?}");
    assert_eq!(code, Some(1), "work was cut off: non-zero exit");
    for h in long {
        // Answered 503 just before the deadline (or, at worst, the connection closed).
        if let Ok(r) = h.await.unwrap() {
            assert_eq!(r.status(), 503);
            let e: Value = r.json().await.unwrap();
            assert!(e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("drain timeout"));
        }
    }
    assert!(
        read_all(&mut head, Duration::from_secs(1)).await.1,
        "held head closed"
    );
    assert!(
        read_all(&mut body, Duration::from_secs(1)).await.1,
        "held body closed"
    );
}

#[tokio::test]
async fn drain_with_only_a_held_partial_head_exits_zero_at_once() {
    let mut s = TestServer::start(&["--drain-timeout-secs", "30"]).await;
    let mut head = connect(&s);
    head.write_all(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // A kept-alive idle connection too.
    let r = s.get("/healthz").await;
    assert_eq!(r.status(), 200);
    let t = Instant::now();
    s.sigterm();
    assert_eq!(s.wait_exit(Duration::from_secs(10)).await, Some(0));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(read_all(&mut head, Duration::from_secs(1)).await.1);
}

/// The tiny fixture checkpoint with `defaults` metadata set to `defaults`.
fn checkpoint_with_defaults(defaults: &str, name: &str) -> std::path::PathBuf {
    let bytes = std::fs::read(fixture("diffit_tiny_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut meta = header
        .get("__metadata__")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    meta.insert("defaults".into(), Value::String(defaults.into()));
    header.insert("__metadata__".into(), Value::Object(meta));
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let dir = std::env::temp_dir().join(format!("diffit-hardening-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&text).unwrap();
    f.write_all(&bytes[8 + n..]).unwrap();
    path
}

/// Runs `serve` with these flags until it exits (at most 20 s): (exit code, stdout, stderr).
fn serve_until_exit(extra: &[&str]) -> (Option<i32>, String, String, Duration) {
    let t = Instant::now();
    let mut child = common::server::serve_command(extra, "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while t.elapsed() < Duration::from_secs(20) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
        t.elapsed(),
    )
}

#[test]
fn bad_metadata_or_settings_end_start_up_with_a_clear_message() {
    let vae = fixture("vae_tiny_model.safetensors");
    let vae = vae.to_str().unwrap();
    let zombie = checkpoint_with_defaults(
        r#"{"steps": 0, "sampler": "ddpm", "guidance_scale": 1e30, "guidance_schedule": "constant"}"#,
        "zombie.safetensors",
    );
    let huge = checkpoint_with_defaults(
        r#"{"steps": 50, "sampler": "ddpm", "guidance_scale": 1e30, "guidance_schedule": "constant"}"#,
        "huge-guidance.safetensors",
    );
    for (model, words) in [
        (&zombie, "steps must be between"),
        (&huge, "guidance_scale"),
    ] {
        let (code, stdout, stderr, took) =
            serve_until_exit(&["--model", model.to_str().unwrap(), "--vae", vae]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(!stdout.contains("listening"), "never listens: {stdout}");
        assert!(
            stderr.contains("metadata 'defaults' is not valid"),
            "{stderr}"
        );
        assert!(stderr.contains(words), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(took < Duration::from_secs(15));
    }
    let model = fixture("diffit_tiny_model.safetensors");
    let model = model.to_str().unwrap();
    for (flag, value) in [
        ("--max-request-timeout-secs", "inf"),
        ("--drain-timeout-secs", "inf"),
        ("--drain-timeout-secs", "NaN"),
        ("--max-request-timeout-secs", "1.8e19"),
        ("--request-timeout-secs", "0"),
        ("--header-read-timeout-secs", "0"),
        ("--body-read-timeout-secs", "-1"),
        ("--idle-timeout-secs", "1e12"),
        ("--cors-allow-origin", "evil.example"),
    ] {
        // `--flag=value`, so that clap reads "-1" as a value rather than a flag.
        let arg = format!("{flag}={value}");
        let (code, stdout, stderr, took) =
            serve_until_exit(&["--model", model, "--vae", vae, &arg]);
        assert_eq!(code, Some(1), "{flag} {value}: {stderr}");
        assert!(!stdout.contains("listening"), "{flag} {value}");
        assert!(stderr.contains(&flag[2..]), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(took < Duration::from_secs(5), "{flag}: {took:?}");
    }
}

#[tokio::test]
async fn unknown_class_names_cost_the_runtime_nothing() {
    let s = TestServer::start(&[]).await;
    let hostile = "x".repeat(60_000);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = s.client.clone();
        let url = s.url(if i % 2 == 0 {
            "/generate"
        } else {
            "/v1/images/generations"
        });
        let body = if i % 2 == 0 {
            json!({"class_name": hostile, "steps": 2})
        } else {
            json!({"prompt": hostile, "steps": 2})
        };
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), t.elapsed())
        }));
    }
    let mut worst = 0.0f64;
    for _ in 0..5 {
        worst = worst.max(healthz_ms(&s).await);
    }
    for t in tasks {
        let (status, took) = t.await.unwrap();
        assert!(status == 422 || status == 400, "{status}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    assert!(worst < 500.0, "/healthz took {worst} ms");
}

#[tokio::test]
async fn smaller_protocol_items() {
    let s = TestServer::start(&[
        "--api-key",
        "k1",
        "--cors-allow-origin",
        "http://app.example",
    ])
    .await;
    let auth = |rb: reqwest::RequestBuilder| rb.header("authorization", "Bearer k1");

    // The Bearer scheme is case-insensitive.
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = s
            .client
            .get(s.url("/v1/models"))
            .header("authorization", format!("{scheme} k1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }

    // Seeds: the last image's seed must fit; no silent wrap to 0.
    let r = auth(s.client.post(s.url("/generate")))
        .json(&json!({"class_label": 1, "steps": 2, "n": 2, "seed": u64::MAX}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "seed");
    let r = auth(s.client.post(s.url("/generate")))
        .json(&json!({"class_label": 1, "steps": 2, "n": 2, "seed": u64::MAX - 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["images"][1]["seed"], u64::MAX);

    // Errors name what was sent, and the field.
    let cases = [
        (
            r#"{"class_label": 1, "guidance_scale": 1e308}"#,
            "/generate",
            422,
            "guidance_scale",
            "1e308",
        ),
        (
            r#"{"class_label": 1, "class_label": 2}"#,
            "/generate",
            400,
            "class_label",
            "duplicate",
        ),
        (
            r#"{"n": 1}"#,
            "/v1/images/generations",
            400,
            "prompt",
            "missing",
        ),
        (
            r#"{"class_label": 1, "timeout_secs": 5e-324}"#,
            "/generate",
            422,
            "timeout_secs",
            "5e-324",
        ),
    ];
    for (body, path, status, param, words) in cases {
        let r = auth(s.client.post(s.url(path)))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(words) && !msg.contains("inf"), "{body}: {msg}");
    }

    // The stream's error event has the same four keys as every error body.
    let r = auth(s.client.post(s.url("/generate")))
        .json(
            &json!({"class_label": 1, "steps": 1000, "n": 4, "stream": true, "timeout_secs": 0.2}),
        )
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let data = text
        .split("event: error\ndata: ")
        .nth(1)
        .and_then(|t| t.lines().next())
        .unwrap_or_else(|| panic!("no error event: {text}"));
    let e: Value = serde_json::from_str(data).unwrap();
    let err = e["error"].as_object().unwrap();
    for key in ["type", "message", "param", "code"] {
        assert!(err.contains_key(key), "{key} missing: {e}");
    }
    assert_eq!(err["type"], "timeout_error");

    // x-request-id: a safe one is kept, one with quotes or braces is replaced.
    for (sent, kept) in [("req-1_a.b:c", true), ("a\"b}", false), ("x y", false)] {
        let r = s
            .client
            .get(s.url("/healthz"))
            .header("x-request-id", sent)
            .send()
            .await
            .unwrap();
        let got = r.headers()["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(got == sent, kept, "{sent} -> {got}");
        if !kept {
            assert!(uuid_like(&got), "{got}");
        }
    }

    // hyper's own rejections carry the JSON error shape.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let resp = raw(&s, big.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_eq!(body_of(&resp)["error"]["type"], "invalid_request_error");
    let resp = raw(&s, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(body_of(&resp)["error"]["message"].is_string());

    // Cross-origin browser requests: refused unless allowed; curl-style requests unaffected.
    let me = s.base.clone();
    let post = |origin: Option<&str>, site: Option<&str>| {
        let mut rb = auth(s.client.post(s.url("/generate")))
            .header("content-type", "text/plain")
            .body(r#"{"class_label": 1, "steps": 2}"#);
        if let Some(o) = origin {
            rb = rb.header("origin", o);
        }
        if let Some(f) = site {
            rb = rb.header("sec-fetch-site", f);
        }
        rb.send()
    };
    let r = post(Some("http://evil.example"), None).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "permission_error"
    );
    assert_eq!(post(None, Some("cross-site")).await.unwrap().status(), 403);
    assert_eq!(post(Some("null"), None).await.unwrap().status(), 403);
    assert_eq!(
        post(Some(&me), Some("same-origin")).await.unwrap().status(),
        200
    );
    let r = post(Some("http://app.example"), Some("cross-site"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    // curl -d: no Origin, form content type.
    let r = auth(s.client.post(s.url("/generate")))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"class_label": 1, "steps": 2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A preflight from the allowed origin; GET from anywhere is not refused.
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/generate"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let r = s
        .client
        .get(s.url("/healthz"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A client that half-closes after its last request still gets its answer.
    let mut c = connect(&s);
    let body = r#"{"class_label": 2, "steps": 2, "seed": 5}"#;
    let req = format!(
        "POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (resp, _) = read_all(&mut c, Duration::from_secs(20)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(body_of(&resp)["images"][0]["seed"], 5);

    // A non-streaming client that leaves is still counted and logged (as 499).
    let quitter = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = quitter
        .post(s.url("/generate"))
        .header("authorization", "Bearer k1")
        .json(&json!({"class_label": 1, "n": 4, "steps": 1000}))
        .send()
        .await;
    assert!(r.is_err());
    assert!(
        s.wait_metric(
            "diffit_requests_total{route=\"/generate\",status=\"499\",model=\"diffit_tiny_model\"}",
            1.0
        )
        .await
    );
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// An engine whose warm-up fails reports why, which is what makes `serve` exit non-zero
/// instead of listening forever without ever being ready. (Invalid `defaults` are refused at
/// load since issue 14, so the failure is injected after loading.)
#[tokio::test]
async fn an_engine_whose_warm_up_fails_reports_it() {
    use diffit_server::engine::{self, EngineConfig};
    let mut pipe = common::tiny_pipeline();
    pipe.info.defaults.guidance_scale = 1e30;
    let (handle, engines) = engine::start(vec![pipe], EngineConfig::default()).unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(30), handle.failed())
        .await
        .expect("the failure is reported");
    assert!(
        reason.contains("engine 0 on cpu could not start: warm-up failed"),
        "{reason}"
    );
    assert!(!handle.stats().ready());
    drop(handle);
    engines.join();
}
