//! The real server on a loopback port, over HTTP: routes, validation, auth, backpressure,
//! cancellation, deadlines, draining and determinism.

mod common;

use std::time::Duration;

use common::server::{b64, decode_png, TestServer};
use serde_json::{json, Value};

#[tokio::test]
async fn generate_json_png_stream_and_info_routes() {
    let s = TestServer::start(&[]).await;

    let health: Value = s.get("/healthz").await.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    let models: Value = s.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "diffit_tiny_model");
    assert_eq!(models["data"][0]["image_size"], 64);
    let classes: Value = s.get("/v1/classes").await.json().await.unwrap();
    assert_eq!(classes["num_classes"], 10);
    assert_eq!(classes["classes"][3]["name"], "class 3");

    // JSON with two images; image i has seed + i; PNGs decode at the model's size with metadata.
    let r = s
        .client
        .post(s.url("/generate"))
        .header("x-request-id", "req-123")
        .json(&json!({"class_label": 3, "n": 2, "seed": 40, "steps": 8, "sampler": "ddim"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-123");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["id"], "req-123");
    assert_eq!(body["images"].as_array().unwrap().len(), 2);
    for (i, img) in body["images"].as_array().unwrap().iter().enumerate() {
        assert_eq!(img["seed"], 40 + i as u64);
        let (w, h, c, _, text) = decode_png(&b64(img["b64_png"].as_str().unwrap()));
        assert_eq!((w, h, c), (64, 64, 3));
        assert_eq!(text["seed"], (40 + i).to_string());
        assert_eq!(text["class_label"], "3");
        assert_eq!(text["class_name"], "class 3");
        assert_eq!(text["sampler"], "ddim");
        assert_eq!(text["steps"], "8");
        assert_eq!(text["model_sha256"].len(), 64);
    }
    assert_ne!(body["images"][0]["b64_png"], body["images"][1]["b64_png"]);
    assert!(body["timings"]["total_ms"].as_f64().unwrap() > 0.0);

    // Raw PNG for Accept: image/png with n = 1, by class name.
    let r = s
        .client
        .post(s.url("/generate"))
        .header("accept", "image/png")
        .json(&json!({"class_name": "Class 3", "seed": 40, "steps": 8, "sampler": "ddim"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.headers()["x-seed"], "40");
    let png = r.bytes().await.unwrap();
    assert_eq!(
        png.as_ref(),
        b64(body["images"][0]["b64_png"].as_str().unwrap()).as_slice(),
        "same seed, same image"
    );

    // Server-sent progress: one event per step, then the result.
    let text = s
        .post(
            "/generate",
            json!({"class_label": 1, "steps": 5, "stream": true, "seed": 1}),
        )
        .await
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        events,
        ["progress"; 5]
            .iter()
            .chain(&["result"])
            .copied()
            .collect::<Vec<_>>()
    );
    let result_line = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .next_back()
        .unwrap();
    let result: Value = serde_json::from_str(result_line).unwrap();
    assert_eq!(result["images"][0]["seed"], 1);

    let metrics = s.get("/metrics").await.text().await.unwrap();
    for name in [
        "diffit_requests_total{route=\"/generate\",status=\"200\",model=\"diffit_tiny_model\"}",
        "diffit_request_duration_seconds_bucket",
        "diffit_queue_depth",
        "diffit_queue_wait_seconds_bucket",
        "diffit_batch_size_bucket",
        "diffit_step_duration_seconds_bucket",
        "diffit_images_generated_total",
        "diffit_decode_duration_seconds_bucket",
        "diffit_encode_duration_seconds_bucket",
        "diffit_rejections_total",
        "diffit_model_info{",
    ] {
        assert!(metrics.contains(name), "metric {name} missing");
    }
    assert_eq!(s.metric_total("diffit_images_generated_total").await, 4.0);
}

#[tokio::test]
async fn openai_sdk_request_and_response_shapes() {
    let s = TestServer::start(&[]).await;
    // What the OpenAI SDK sends for images.generate(model=…, prompt=…, n=…, size=…, response_format=…).
    let r = s
        .post(
            "/v1/images/generations",
            json!({"model": "diffit_tiny_model", "prompt": "class 7", "n": 2, "size": "64x64",
                   "response_format": "b64_json", "seed": 5, "steps": 6}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let (w, _, _, _, text) = decode_png(&b64(data[0]["b64_json"].as_str().unwrap()));
    assert_eq!(w, 64);
    assert_eq!(text["class_label"], "7");
    assert_eq!(data[0]["revised_prompt"], "class 7");
    // The prompt may be a number too.
    assert_eq!(
        s.post("/v1/images/generations", json!({"prompt": "7", "steps": 2}))
            .await
            .status(),
        200
    );
    // Errors come in OpenAI's shape, as 400s.
    for (body, param) in [
        (json!({"prompt": "no such thing", "steps": 2}), "prompt"),
        (json!({"prompt": "class 7", "size": "1024x1024"}), "size"),
        (
            json!({"prompt": "class 7", "response_format": "html"}),
            "response_format",
        ),
        (json!({"prompt": "class 7", "n": 0}), "n"),
    ] {
        let r = s.post("/v1/images/generations", body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{body}");
        assert!(e["error"]["message"].as_str().unwrap().len() > 10);
    }
    // A model that is not served: 404 model_not_found naming the one that is, as OpenAI does.
    let r = s
        .post(
            "/v1/images/generations",
            json!({"prompt": "class 7", "model": "dall-e-3"}),
        )
        .await;
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("'diffit_tiny_model'"));
}

#[tokio::test]
async fn every_field_is_validated_with_a_clear_error() {
    let s = TestServer::start(&[
        "--max-images-per-request",
        "8",
        "--max-request-timeout-secs",
        "60",
    ])
    .await;
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"class_label": 10}),
            422,
            "class_label",
            "between 0 and 9",
        ),
        (
            json!({"class_label": -1}),
            422,
            "class_label",
            "between 0 and 9",
        ),
        (
            json!({"class_label": "x"}),
            400,
            "class_label",
            "invalid type",
        ),
        (json!({}), 422, "class_label", "required"),
        (
            json!({"class_label": 1, "class_name": "class 1"}),
            422,
            "class_label",
            "not both",
        ),
        (
            json!({"class_name": "clas 4"}),
            422,
            "class_name",
            "class 4",
        ),
        (
            json!({"class_label": 1, "n": 0}),
            422,
            "n",
            "between 1 and 8",
        ),
        (
            json!({"class_label": 1, "n": 9}),
            422,
            "n",
            "between 1 and 8",
        ),
        (
            json!({"class_label": 1, "n": 1e9}),
            422,
            "n",
            "between 1 and 8",
        ),
        (
            json!({"class_label": 1, "n": 1.5}),
            400,
            "n",
            "invalid type",
        ),
        (
            json!({"class_label": 1, "seed": -5}),
            400,
            "seed",
            "invalid value",
        ),
        (
            json!({"class_label": 1, "steps": 1}),
            422,
            "steps",
            "between 2 and 1000",
        ),
        (
            json!({"class_label": 1, "steps": 100000}),
            422,
            "steps",
            "between 2 and 1000",
        ),
        (
            json!({"class_label": 1, "sampler": "euler"}),
            422,
            "sampler",
            "ddpm, ddim, dpm-solver++",
        ),
        (
            json!({"class_label": 1, "guidance_scale": -1.0}),
            422,
            "guidance_scale",
            "between 0 and 50",
        ),
        (
            json!({"class_label": 1, "guidance_scale": 1e30}),
            422,
            "guidance_scale",
            "between 0 and 50",
        ),
        (
            json!({"class_label": 1, "guidance_schedule": "linear"}),
            422,
            "guidance_schedule",
            "power-cosine or constant",
        ),
        (
            json!({"class_label": 1, "stream": "yes"}),
            400,
            "stream",
            "invalid type",
        ),
        (
            json!({"class_label": 1, "timeout_secs": 0}),
            422,
            "timeout_secs",
            "at most 60",
        ),
        (
            json!({"class_label": 1, "timeout_secs": 61}),
            422,
            "timeout_secs",
            "at most 60",
        ),
        (
            json!({"class_label": 1, "colour": "red"}),
            400,
            "colour",
            "unknown field",
        ),
        (json!([1, 2]), 400, "", "JSON object"),
        (json!([3, null, 1, 7, 2]), 400, "", "JSON object"),
    ];
    for (body, status, param, words) in cases {
        let r = s.post("/generate", body.clone()).await;
        assert_eq!(r.status().as_u16(), status, "{body}");
        let e: Value = r.json().await.unwrap();
        if !param.is_empty() {
            assert_eq!(e["error"]["param"], param, "{body}: {e}");
        }
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(words),
            "{body}: message '{msg}' lacks '{words}'"
        );
    }
    let raw = |bytes: Vec<u8>| s.client.post(s.url("/generate")).body(bytes).send();
    let r = raw(b"{\"class_label\": 1,".to_vec()).await.unwrap();
    assert_eq!(r.status(), 400, "truncated JSON");
    let r = raw(b"{\"class_label\": 1, \"steps\": 2} xyz".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "trailing bytes after the object");
    let r = raw(b"{\"class_label\": 1, \"steps\": 2}{\"class_label\": 2}".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a second object");
    // JSON Schema integers include 1.0; fractional values are still refused.
    let r = s
        .post(
            "/generate",
            json!({"class_label": 1, "n": 1.0, "steps": 2.0}),
        )
        .await;
    assert_eq!(r.status(), 200, "whole-number floats are integers");
    let r = s
        .post("/generate", json!({"class_label": 1, "steps": 2.5}))
        .await;
    assert_eq!(r.status(), 400, "fractional steps");
    let r = raw(b"{\"class_name\": \"\xff\xfe\"}".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "invalid UTF-8");
    let r = raw(Vec::new()).await.unwrap();
    assert_eq!(r.status(), 400, "empty body");
    let big = format!("{{\"class_name\": \"{}\"}}", "a".repeat(100_000));
    let r = raw(big.into_bytes()).await.unwrap();
    assert_eq!(r.status(), 413, "oversized body");
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("65536"));
    // Nothing above disturbed the server.
    assert_eq!(
        s.post("/generate", json!({"class_label": 2, "steps": 2}))
            .await
            .status(),
        200
    );
    assert_eq!(s.get("/nope").await.status(), 404);
}

#[tokio::test]
async fn api_keys_are_required_when_configured() {
    let s = TestServer::start(&["--api-key", "k1", "--api-key", "second-key"]).await;
    let body = json!({"class_label": 0, "steps": 2});
    let r = s.post("/generate", body.clone()).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let wrong = s
        .client
        .post(s.url("/generate"))
        .bearer_auth("k2")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    for key in ["k1", "second-key"] {
        let ok = s
            .client
            .post(s.url("/generate"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), 200);
    }
    assert_eq!(s.get("/v1/models").await.status(), 401);
    // Probes and scrapes stay open.
    assert_eq!(s.get("/healthz").await.status(), 200);
    assert_eq!(s.get("/readyz").await.status(), 200);
    assert_eq!(s.get("/metrics").await.status(), 200);
    assert_eq!(
        s.metric("diffit_rejections_total{reason=\"unauthorized\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn full_queue_gets_429_with_retry_after_and_accepted_requests_complete() {
    let s = TestServer::start(&["--max-batch", "1", "--max-queue", "2"]).await;
    let reqs = (0..8).map(|i| {
        let c = s.client.clone();
        let url = s.url("/generate");
        tokio::spawn(async move {
            let r = c
                .post(url)
                .json(&json!({"class_label": 1, "steps": 150, "seed": i}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            let body: Value = r.json().await.unwrap();
            (status, retry, body)
        })
    });
    let results = futures::future::join_all(reqs).await;
    let mut ok = 0;
    let mut full = 0;
    for r in results {
        let (status, retry, body) = r.unwrap();
        match status {
            200 => {
                ok += 1;
                assert_eq!(body["images"].as_array().unwrap().len(), 1);
            }
            429 => {
                full += 1;
                assert!(retry.unwrap() >= 1);
                assert_eq!(body["error"]["type"], "rate_limit_error");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(full >= 1, "some requests must be refused");
    assert!(ok >= 2, "accepted requests complete ({ok})");
    assert_eq!(
        s.metric("diffit_rejections_total{reason=\"queue_full\",model=\"diffit_tiny_model\"}")
            .await,
        full as f64
    );
}

#[tokio::test]
async fn disconnected_client_frees_its_samples_and_deadline_gives_504() {
    let s = TestServer::start(&[]).await;
    // A client that gives up: its samples must leave the batch at the next step.
    let quitter = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = quitter
        .post(s.url("/generate"))
        .json(&json!({"class_label": 1, "n": 4, "steps": 1000}))
        .send()
        .await;
    assert!(r.is_err(), "the client timed out");
    assert!(
        s.wait_metric(
            "diffit_rejections_total{reason=\"disconnected\",model=\"diffit_tiny_model\"}",
            1.0
        )
        .await,
        "the disconnect is counted"
    );
    assert!(
        s.wait_metric("diffit_active_samples{model=\"diffit_tiny_model\"}", 0.0)
            .await,
        "disconnected samples left the batch"
    );

    let r = s
        .post(
            "/generate",
            json!({"class_label": 1, "steps": 1000, "n": 4, "timeout_secs": 0.3}),
        )
        .await;
    assert_eq!(r.status(), 504);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "timeout_error");
    assert!(
        s.wait_metric(
            "diffit_rejections_total{reason=\"deadline\",model=\"diffit_tiny_model\"}",
            1.0
        )
        .await,
        "the deadline rejection is counted"
    );
    assert!(
        s.wait_metric("diffit_active_samples{model=\"diffit_tiny_model\"}", 0.0)
            .await,
        "its samples left the batch"
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_work_then_exits_zero() {
    let mut s = TestServer::start(&[]).await;
    let c = s.client.clone();
    let url = s.url("/generate");
    let inflight = tokio::spawn(async move {
        c.post(url)
            .json(&json!({"class_label": 2, "steps": 600, "n": 2}))
            .send()
            .await
            .unwrap()
    });
    // SIGTERM only once the request is being denoised.
    for _ in 0..200 {
        if s.metric_total("diffit_active_samples").await > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    s.sigterm();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = s.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    let v: Value = ready.json().await.unwrap();
    assert_eq!(v["status"], "draining");
    let late = s
        .post("/generate", json!({"class_label": 2, "steps": 2}))
        .await;
    assert_eq!(late.status(), 503);
    let done = inflight.await.unwrap();
    assert_eq!(done.status(), 200, "the in-flight request finished");
    let body: Value = done.json().await.unwrap();
    assert_eq!(body["images"].as_array().unwrap().len(), 2);
    assert_eq!(s.wait_exit(Duration::from_secs(30)).await, Some(0));
}

#[tokio::test]
async fn same_request_same_pixels_alone_and_amid_concurrent_traffic() {
    let direct = alone_and_amid(&[]).await;
    // The padded steps that CUDA graphs replay (run uncaptured on the CPU): the same pixels.
    let padded = alone_and_amid(&["--cuda-graphs", "on"]).await;
    assert_eq!(direct, padded, "padded steps changed the pixels");
}

/// One request alone, then amid concurrent traffic of every sampler and guidance setting, on
/// a server started with `extra`: asserts both give the same pixels, and returns them.
async fn alone_and_amid(extra: &[&str]) -> Vec<u8> {
    let s = TestServer::start(&[&["--max-batch", "32"], extra].concat()).await;
    let target = json!({"class_label": 6, "seed": 1234, "steps": 30, "sampler": "ddpm", "guidance_scale": 3.0});
    let alone: Value = s
        .post("/generate", target.clone())
        .await
        .json()
        .await
        .unwrap();
    let others = [
        json!({"class_label": 1, "steps": 12, "sampler": "ddim", "n": 2}),
        json!({"class_label": 2, "steps": 50, "sampler": "dpm-solver++"}),
        json!({"class_label": 3, "steps": 7, "guidance_scale": 1.0}),
        json!({"class_label": 4, "steps": 41, "guidance_schedule": "constant", "n": 3}),
        json!({"class_label": 5, "steps": 20, "sampler": "ddim", "guidance_scale": 7.5}),
        json!({"class_label": 7, "steps": 33}),
        json!({"class_label": 8, "steps": 2, "n": 4}),
        json!({"class_label": 9, "steps": 64, "sampler": "dpm-solver++", "guidance_scale": 1.5}),
    ];
    let mut handles = Vec::new();
    for (i, body) in others.into_iter().enumerate() {
        let c = s.client.clone();
        let url = s.url("/generate");
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(15 * i as u64)).await;
            c.post(url).json(&body).send().await.unwrap().status()
        }));
    }
    tokio::time::sleep(Duration::from_millis(40)).await;
    let amid: Value = s.post("/generate", target).await.json().await.unwrap();
    for h in handles {
        assert_eq!(h.await.unwrap(), 200);
    }
    let px = |v: &Value| decode_png(&b64(v["images"][0]["b64_png"].as_str().unwrap())).3;
    assert_eq!(
        px(&alone),
        px(&amid),
        "pixels must not depend on batch mates"
    );
    let hist = s.metric_total("diffit_batch_size_sum").await
        / s.metric_total("diffit_batch_size_count").await;
    assert!(
        hist > 1.0,
        "requests really shared batches (mean batch {hist})"
    );
    px(&alone)
}

/// `--request-level-batching` (the baseline of `bench batching`) admits only into an empty
/// batch, but then takes as many queued requests as fit: requests that queued behind a running
/// batch start together.
#[tokio::test]
async fn request_level_batching_still_batches_queued_requests() {
    let s = TestServer::start(&["--request-level-batching", "--max-batch", "4"]).await;
    let mut handles = Vec::new();
    for i in 0..5 {
        let c = s.client.clone();
        let url = s.url("/generate");
        handles.push(tokio::spawn(async move {
            // The first request runs alone; the next four queue behind it.
            tokio::time::sleep(Duration::from_millis(if i == 0 { 0 } else { 50 })).await;
            let body = json!({"class_label": i, "steps": 30, "seed": i});
            c.post(url).json(&body).send().await.unwrap().status()
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), 200);
    }
    let batches = s.metric_total("diffit_batch_size_count").await;
    let images = s.metric_total("diffit_batch_size_sum").await;
    // Every step is observed once: with the four queued requests sharing a batch the mean
    // batch is near (30·1 + 30·4) / 60 = 2.5; run one at a time it would be 1.
    assert!(
        images / batches > 1.5,
        "mean batch {} over {batches} steps",
        images / batches
    );
}

/// `--png-compression` changes only how hard deflate works: a multi-image request gives the same
/// pixels and metadata at every level, and the level is what the file's zlib header says.
#[tokio::test]
async fn png_compression_levels_are_lossless_and_take_effect() {
    let body = json!({"class_label": 2, "seed": 77, "steps": 6, "n": 3});
    let mut decoded = Vec::new();
    for level in ["fast", "best"] {
        let s = TestServer::start(&["--png-compression", level]).await;
        let v: Value = s
            .post("/generate", body.clone())
            .await
            .json()
            .await
            .unwrap();
        let images = v["images"].as_array().unwrap();
        assert_eq!(images.len(), 3);
        let files: Vec<Vec<u8>> = images
            .iter()
            .map(|i| b64(i["b64_png"].as_str().unwrap()))
            .collect();
        for f in &files {
            // The zlib header's FLEVEL bits (top two of its second byte): fdeflate writes 0
            // (fastest) or 1, zlib at level 9 writes 3 (maximum).
            let idat = f.windows(4).position(|w| w == b"IDAT").unwrap();
            let flevel = f[idat + 5] >> 6;
            match level {
                "best" => assert_eq!(flevel, 3, "{level}"),
                _ => assert!(flevel <= 1, "{level}: FLEVEL {flevel}"),
            }
        }
        decoded.push(
            files
                .iter()
                .map(|f| {
                    let (_, _, _, px, text) = decode_png(f);
                    (px, text["seed"].clone())
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        decoded[0], decoded[1],
        "same pixels and seeds at every level"
    );
}

/// `--warmup-buckets` with the padded steps on (what CUDA graphs replay; uncaptured on the
/// CPU): before /readyz says ready, `all` has prepared every bucket a batch of up to
/// --max-batch images can need, `minimal` only one image's; the images are the same either way.
#[tokio::test]
async fn warm_up_prepares_the_buckets_batches_need_and_changes_no_pixels() {
    use diffit_server::pipeline::graphs::bucket;
    let max_batch = 3;
    // n images, g of them guided: n + g network rows.
    let reachable: std::collections::BTreeSet<usize> = (1..=max_batch)
        .flat_map(|n| (0..=n).map(move |g| bucket(n + g)))
        .collect();
    let one_image: std::collections::BTreeSet<usize> = [bucket(1), bucket(2)].into();
    // Three guided images: a bucket only `all` prepares.
    let request = json!({"class_label": 4, "seed": 99, "steps": 6, "n": 3,
        "guidance_scale": 3.0, "guidance_schedule": "constant"});
    assert!(!one_image.contains(&bucket(6)));
    let mut images = Vec::new();
    for (setting, expected) in [("all", &reachable), ("minimal", &one_image)] {
        let (s, logs) = TestServer::start_logging(
            &[
                "--cuda-graphs",
                "on",
                "--max-batch",
                &max_batch.to_string(),
                "--warmup-buckets",
                setting,
                "--log-format",
                "json",
            ],
            "info",
        )
        .await;
        // Logged before the engine counted as ready, so already sent.
        let ready = std::iter::from_fn(|| logs.recv_timeout(Duration::from_secs(10)).ok())
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .find(|v| {
                v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("step buckets ready"))
            })
            .expect("the warm-up logs the ready buckets");
        let fields = &ready["fields"];
        assert_eq!(fields["warmup"], setting, "{fields}");
        let logged: std::collections::BTreeSet<usize> = fields["buckets"]
            .as_str()
            .unwrap()
            .split(',')
            .map(|b| b.parse().unwrap())
            .collect();
        assert_eq!(&logged, expected, "--warmup-buckets {setting}: {fields}");
        assert_eq!(fields["count"], expected.len());
        let r = s.post("/generate", request.clone()).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let pngs: Vec<String> = v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["b64_png"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(pngs.len(), 3);
        images.push(pngs);
    }
    assert_eq!(images[0], images[1], "the warm-up changed the images");
}
