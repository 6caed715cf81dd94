//! openapi.yaml is the contract: every documented route and status is requested from a live
//! server, and every response is checked against the documented status, content type and schema.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::schema::validate;
use common::server::TestServer;
use serde_json::{json, Value};

const KEY: &str = "contract-key";

struct Contract {
    spec: Value,
    seen: BTreeSet<(String, String, String)>,
}

impl Contract {
    fn load() -> Self {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
        let spec: Value = serde_norway::from_str(&text).unwrap();
        Self {
            spec,
            seen: BTreeSet::new(),
        }
    }

    fn documented(&self) -> BTreeSet<(String, String, String)> {
        let mut all = BTreeSet::new();
        for (path, ops) in self.spec["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                for status in op["responses"].as_object().unwrap().keys() {
                    all.insert((path.clone(), method.clone(), status.clone()));
                }
            }
        }
        all
    }

    /// Checks one live response against the spec and records that it was exercised.
    async fn check(&mut self, method: &str, path: &str, resp: reqwest::Response) -> (u16, Value) {
        let status = resp.status().as_u16().to_string();
        let op = &self.spec["paths"][path][method];
        assert!(op.is_object(), "undocumented route {method} {path}");
        let mut doc = op["responses"][&status].clone();
        assert!(
            doc.is_object(),
            "{method} {path}: undocumented status {status}"
        );
        if let Some(r) = doc.get("$ref").and_then(Value::as_str) {
            let name = r.trim_start_matches("#/components/responses/");
            doc = self.spec["components"]["responses"][name].clone();
        }
        if let Some(headers) = doc.get("headers").and_then(Value::as_object) {
            for h in headers.keys() {
                assert!(
                    resp.headers().contains_key(h.to_lowercase().as_str()),
                    "{method} {path} {status}: header {h} missing"
                );
            }
        }
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| {
                v.to_str()
                    .unwrap()
                    .split(';')
                    .next()
                    .unwrap()
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        let content = &doc["content"][&ctype];
        assert!(
            content.is_object(),
            "{method} {path} {status}: undocumented content type '{ctype}'"
        );
        let body = if ctype == "application/json" {
            let v: Value = resp.json().await.unwrap();
            validate(
                &self.spec,
                &content["schema"],
                &v,
                &format!("{method} {path} {status}"),
            )
            .unwrap_or_else(|e| panic!("schema violation: {e}"));
            v
        } else {
            let bytes = resp.bytes().await.unwrap();
            assert!(!bytes.is_empty());
            Value::Null
        };
        self.seen
            .insert((path.to_string(), method.to_string(), status.clone()));
        (status.parse().unwrap(), body)
    }
}

#[tokio::test]
async fn live_responses_match_openapi_for_every_route_and_status() {
    let mut c = Contract::load();
    let mut s = TestServer::start(&[
        "--api-key",
        KEY,
        "--max-batch",
        "1",
        "--max-queue",
        "2",
        "--request-timeout-secs",
        "1",
        "--max-request-timeout-secs",
        "600",
    ])
    .await;
    let auth = |rb: reqwest::RequestBuilder| rb.bearer_auth(KEY);
    let post = |path: &str, body: Value| auth(s.client.post(s.url(path))).json(&body);
    let gen = "/generate";
    let oai = "/v1/images/generations";

    // Plain successes.
    for path in ["/v1/models", "/v1/classes"] {
        let r = auth(s.client.get(s.url(path))).send().await.unwrap();
        assert_eq!(c.check("get", path, r).await.0, 200);
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(c.check("get", path, r).await.0, 401);
    }
    for path in ["/healthz", "/readyz", "/metrics", "/", "/openapi.yaml"] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(c.check("get", path, r).await.0, 200);
    }
    let one = "/v1/models/{id}";
    let r = auth(s.client.get(s.url("/v1/models/diffit_tiny_model")))
        .send()
        .await
        .unwrap();
    assert_eq!(c.check("get", one, r).await.0, 200);
    let r = auth(s.client.get(s.url("/v1/models/dall-e-3")))
        .send()
        .await
        .unwrap();
    assert_eq!(c.check("get", one, r).await.0, 404);
    let r = s
        .client
        .get(s.url("/v1/models/diffit_tiny_model"))
        .send()
        .await
        .unwrap();
    assert_eq!(c.check("get", one, r).await.0, 401);
    let ok = json!({"class_label": 1, "steps": 3, "n": 2});
    assert_eq!(
        c.check("post", gen, post(gen, ok.clone()).send().await.unwrap())
            .await
            .0,
        200
    );
    let r = post(gen, json!({"class_label": 1, "steps": 3}))
        .header("accept", "image/png")
        .send()
        .await
        .unwrap();
    assert_eq!(c.check("post", gen, r).await.0, 200);
    let r = post(
        gen,
        json!({"class_label": 1, "steps": 3, "stream": true, "preview": true}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(c.check("post", gen, r).await.0, 200);
    for accept in ["image/jpeg", "image/webp"] {
        let r = post(gen, json!({"class_label": 1, "steps": 3}))
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["content-type"], accept);
        assert_eq!(c.check("post", gen, r).await.0, 200);
    }
    let r = post(
        oai,
        json!({"prompt": "a photo of class 2", "steps": 3, "response_format": "url",
               "output_format": "webp", "size": "auto"}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(c.check("post", oai, r).await.0, 200);
    let r = post(oai, json!({"prompt": "class 2", "steps": 3, "n": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(c.check("post", oai, r).await.0, 200);

    // Client errors.
    for path in [gen, oai] {
        let r = s.client.post(s.url(path)).json(&ok).send().await.unwrap();
        assert_eq!(c.check("post", path, r).await.0, 401);
        let r = auth(s.client.post(s.url(path)))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(c.check("post", path, r).await.0, 400);
        let big = format!("{{\"prompt\": \"{}\"}}", "x".repeat(200_000));
        let r = auth(s.client.post(s.url(path)))
            .body(big)
            .send()
            .await
            .unwrap();
        assert_eq!(c.check("post", path, r).await.0, 413);
        let r = auth(s.client.post(s.url(path)))
            .header("origin", "http://evil.example")
            .json(&ok)
            .send()
            .await
            .unwrap();
        assert_eq!(c.check("post", path, r).await.0, 403);
    }
    let r = post(gen, json!({"class_label": 1, "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(c.check("post", gen, r).await.0, 422);
    let r = post(
        oai,
        json!({"prompt": "class 1", "background": "transparent"}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(c.check("post", oai, r).await.0, 422);

    // Deadlines: explicit on /generate, the server default (1 s) on the OpenAI route.
    let r = post(
        gen,
        json!({"class_label": 1, "steps": 1000, "timeout_secs": 0.2}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(c.check("post", gen, r).await.0, 504);
    let r = post(oai, json!({"prompt": "class 2", "steps": 1000, "n": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(c.check("post", oai, r).await.0, 504);

    // A full queue: one long request running, two waiting (the limit is 2 images).
    let long = json!({"class_label": 3, "steps": 300, "timeout_secs": 120});
    let mut background = Vec::new();
    for _ in 0..3 {
        let rb = post(gen, long.clone());
        background.push(tokio::spawn(async move {
            rb.send().await.unwrap().status().as_u16()
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for _ in 0..200 {
        if s.metric_total("diffit_queue_depth").await == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        s.metric_total("diffit_queue_depth").await,
        2.0,
        "queue filled"
    );
    let r = post(gen, json!({"class_label": 1, "steps": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(c.check("post", gen, r).await.0, 429);
    let r = post(oai, json!({"prompt": "class 1", "steps": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(c.check("post", oai, r).await.0, 429);

    // Draining: readiness and new work get 503 while the queued requests finish.
    s.sigterm();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = s.client.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(c.check("get", "/readyz", r).await.0, 503);
    for (path, body) in [
        (gen, json!({"class_label": 1, "steps": 2})),
        (oai, json!({"prompt": "class 1", "steps": 2})),
    ] {
        let r = post(path, body).send().await.unwrap();
        assert_eq!(c.check("post", path, r).await.0, 503);
    }
    for b in background {
        assert_eq!(
            b.await.unwrap(),
            200,
            "accepted requests complete during the drain"
        );
    }
    assert_eq!(s.wait_exit(Duration::from_secs(30)).await, Some(0));

    // Two models: `model` routes, is required, and an unknown id is a 404 on every route.
    let tiny = |name: &str| {
        format!(
            "{name}={},vae={}",
            common::fixture("diffit_tiny_model.safetensors").display(),
            common::fixture("vae_tiny_model.safetensors").display()
        )
    };
    let two = TestServer::start_with(&["--model", &tiny("a"), "--model", &tiny("b")]).await;
    let r = two.get("/v1/models").await;
    let (_, models) = c.check("get", "/v1/models", r).await;
    assert_eq!(models["data"].as_array().unwrap().len(), 2);
    for (query, want) in [
        ("?model=b", 200),
        ("?model=nope", 404),
        ("", 422),
        ("?model=a&model=b", 400),
    ] {
        let r = two.get(&format!("/v1/classes{query}")).await;
        assert_eq!(c.check("get", "/v1/classes", r).await.0, want, "{query}");
    }
    for (path, body) in [
        (gen, json!({"model": "b", "class_label": 1, "steps": 2})),
        (oai, json!({"model": "b", "prompt": "class 1", "steps": 2})),
    ] {
        let r = two.post(path, body.clone()).await;
        assert_eq!(c.check("post", path, r).await.0, 200, "{path}");
        let mut other = body;
        other["model"] = json!("dall-e-3");
        let r = two.post(path, other).await;
        let (status, e) = c.check("post", path, r).await;
        assert_eq!(
            (status, e["error"]["code"].as_str()),
            (404, Some("model_not_found"))
        );
    }
    drop(two);

    // Every documented (route, method, status) was seen, except internal failures, which no
    // valid request can provoke.
    // 408 needs a client that stalls mid-body, which reqwest cannot be: tests/hardening.rs
    // checks it over a raw socket.
    let never = [(gen, "500"), (oai, "500"), (gen, "408"), (oai, "408")];
    let missing: Vec<_> = c
        .documented()
        .into_iter()
        .filter(|k| !c.seen.contains(k) && !never.iter().any(|(p, st)| *p == k.0 && *st == k.2))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but never exercised: {missing:?}"
    );
}
