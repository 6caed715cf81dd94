//! Several models in one server (issue 13): routing by `model`, per-model defaults and classes,
//! 404 `model_not_found`, metrics labels, determinism and fairness between models, readiness
//! and drain across models, and start-up errors of the model flags.

mod common;

use std::time::{Duration, Instant};

use common::fixture;
use common::server::{b64, decode_png, serve_command, TestServer};
use serde_json::{json, Value};

fn tiny() -> String {
    fixture("diffit_tiny_model.safetensors")
        .to_str()
        .unwrap()
        .to_string()
}

fn tiny_vae() -> String {
    fixture("vae_tiny_model.safetensors")
        .to_str()
        .unwrap()
        .to_string()
}

/// `--model NAME=<tiny fixture>,vae=<tiny vae>[,extra]`.
fn tiny_as(name: &str, extra: &str) -> String {
    format!("{name}={},vae={}{extra}", tiny(), tiny_vae())
}

/// The first image of a /generate JSON response, decoded: (side, pixels, tEXt).
fn first_image(v: &Value) -> (u32, Vec<u8>, std::collections::HashMap<String, String>) {
    let (w, _, _, pixels, text) = decode_png(&b64(v["images"][0]["b64_png"].as_str().unwrap()));
    (w, pixels, text)
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn requests_route_by_model_with_its_defaults_classes_and_metrics() {
    let s = TestServer::start_with(&[
        "--model",
        "fashion=embedded,steps=5,sampler=ddim,guidance_scale=2",
        "--model",
        &tiny_as("tiny", ",steps=3"),
        "--max-queue",
        "40",
    ])
    .await;

    // Both models, in order, each with its own config, defaults and share of the queue.
    let (_, models) = json_of(s.get("/v1/models").await).await;
    let data = models["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["fashion", "tiny"]);
    assert_eq!(data[0]["defaults"]["steps"], 5);
    assert_eq!(data[0]["defaults"]["sampler"], "ddim");
    assert_eq!(data[0]["defaults"]["guidance_scale"], 2.0);
    assert_eq!(data[1]["defaults"]["steps"], 3);
    assert_eq!(
        data[1]["defaults"]["sampler"], "ddpm",
        "the checkpoint's own"
    );
    assert_eq!(
        (
            data[0]["image_size"].as_u64(),
            data[1]["image_size"].as_u64()
        ),
        (Some(32), Some(64))
    );
    for m in data {
        // 40 images for 2 models: a floor of 10 each, at most 30 for either.
        assert_eq!(m["limits"]["queue_floor"], 10);
        assert_eq!(m["limits"]["queue_max"], 30);
        assert_eq!(m["limits"]["queue_capacity"], 40);
    }
    let (status, one) = json_of(s.get("/v1/models/tiny").await).await;
    assert_eq!((status, one["id"].as_str()), (200, Some("tiny")));

    // Classes per model; with two models the id is required.
    let (_, fc) = json_of(s.get("/v1/classes?model=fashion").await).await;
    assert_eq!(fc["model"], "fashion");
    assert!(fc["classes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "Sneaker"));
    let (_, tc) = json_of(s.get("/v1/classes?model=tiny").await).await;
    assert_eq!(tc["classes"][3]["name"], "class 3");
    let (status, e) = json_of(s.get("/v1/classes").await).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (422, Some("model_required"))
    );

    // 404 model_not_found listing the served ids, on every route that takes a model.
    let not_found = |status: u16, e: &Value, what: &str| {
        assert_eq!(status, 404, "{what}: {e}");
        assert_eq!(e["error"]["code"], "model_not_found", "{what}");
        assert_eq!(e["error"]["param"], "model", "{what}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains("'fashion', 'tiny'"), "{what}: {msg}");
    };
    let (status, e) = json_of(
        s.post("/generate", json!({"model": "nope", "class_label": 1}))
            .await,
    )
    .await;
    not_found(status, &e, "/generate");
    let (status, e) = json_of(
        s.post(
            "/v1/images/generations",
            json!({"model": "dall-e-3", "prompt": "sneaker"}),
        )
        .await,
    )
    .await;
    not_found(status, &e, "/v1/images/generations");
    assert_eq!(
        e["error"]["type"], "invalid_request_error",
        "OpenAI's shape"
    );
    let (status, e) = json_of(s.get("/v1/classes?model=nope").await).await;
    not_found(status, &e, "/v1/classes");
    let (status, e) = json_of(s.get("/v1/models/nope").await).await;
    not_found(status, &e, "/v1/models/{id}");
    // No model named: required (422 native, 400 on the OpenAI route).
    let (status, e) = json_of(s.post("/generate", json!({"class_label": 1})).await).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (422, Some("model_required"))
    );
    let (status, e) = json_of(
        s.post("/v1/images/generations", json!({"prompt": "sneaker"}))
            .await,
    )
    .await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("model")));

    // Each model with its own defaults, classes and image size.
    let (status, f) = json_of(
        s.post(
            "/generate",
            json!({"model": "fashion", "class_name": "sneaker", "seed": 5}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{f}");
    assert_eq!(
        (f["model"].as_str(), f["steps"].as_u64()),
        (Some("fashion"), Some(5))
    );
    assert_eq!(
        (f["sampler"].as_str(), f["guidance_scale"].as_f64()),
        (Some("ddim"), Some(2.0))
    );
    let (side, _, text) = first_image(&f);
    assert_eq!((side, text["model"].as_str()), (32, "fashion"));
    let (status, t) = json_of(
        s.post(
            "/generate",
            json!({"model": "tiny", "class_label": 3, "n": 2}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(
        (t["model"].as_str(), t["steps"].as_u64()),
        (Some("tiny"), Some(3))
    );
    assert_eq!(t["images"][0]["class_name"], "class 3");
    assert_eq!(first_image(&t).0, 64);
    // A class of one model is not a class of the other.
    let (status, e) = json_of(
        s.post(
            "/generate",
            json!({"model": "tiny", "class_name": "sneaker"}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (422, Some("class_name"))
    );
    let (status, o) = json_of(
        s.post(
            "/v1/images/generations",
            json!({"model": "fashion", "prompt": "a red sneaker", "steps": 2}),
        )
        .await,
    )
    .await;
    assert_eq!((status, o["size"].as_str()), (200, Some("32x32")), "{o}");
    assert_eq!(o["data"][0]["revised_prompt"], "Sneaker");

    // Metrics: a model label on the per-model series, and only served ids in it.
    let g = |series: &str| {
        let s = &s;
        let series = series.to_string();
        async move { s.metric(&series).await }
    };
    assert_eq!(
        g("diffit_requests_total{route=\"/generate\",status=\"200\",model=\"fashion\"}").await,
        1.0
    );
    assert_eq!(
        g("diffit_requests_total{route=\"/generate\",status=\"200\",model=\"tiny\"}").await,
        1.0
    );
    assert_eq!(
        g("diffit_requests_total{route=\"/v1/images/generations\",status=\"200\",model=\"fashion\"}").await,
        1.0
    );
    assert_eq!(
        g("diffit_images_generated_total{model=\"fashion\"}").await,
        2.0
    );
    assert_eq!(
        g("diffit_images_generated_total{model=\"tiny\"}").await,
        2.0
    );
    assert!(
        s.wait_metric("diffit_queue_depth{model=\"tiny\"}", 0.0)
            .await
    );
    let text = s.get("/metrics").await.text().await.unwrap();
    for (series, model) in [
        (
            "diffit_step_duration_seconds_count{engine=\"0\",device=\"cpu\",model=",
            "tiny",
        ),
        (
            "diffit_batch_size_count{engine=\"0\",device=\"cpu\",model=",
            "fashion",
        ),
        ("diffit_queue_wait_seconds_count{model=", "tiny"),
        ("diffit_decode_duration_seconds_count{model=", "fashion"),
        ("diffit_encode_duration_seconds_count{model=", "tiny"),
        ("diffit_active_samples{model=", "fashion"),
        ("diffit_model_info{model=", "tiny"),
    ] {
        assert!(
            text.contains(&format!("{series}\"{model}\"")),
            "{series}{model} missing"
        );
    }
    let labels: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        labels.into_iter().collect::<Vec<_>>(),
        ["fashion", "tiny"],
        "the model label holds served ids only (no 'nope', no 'dall-e-3')"
    );
}

/// Pixels of one /generate call.
async fn pixels(s: &TestServer, body: Value) -> Vec<u8> {
    let (status, v) = json_of(s.post("/generate", body).await).await;
    assert_eq!(status, 200, "{v}");
    first_image(&v).1
}

#[tokio::test]
async fn each_model_is_deterministic_amid_the_other_models_load() {
    let s = TestServer::start_with(&[
        "--model",
        &tiny_as("a", ",steps=6"),
        "--model",
        &tiny_as("b", ",steps=6,sampler=ddim"),
        "--max-batch",
        "8",
    ])
    .await;
    let target_a = json!({"model": "a", "class_label": 3, "seed": 42});
    let target_b = json!({"model": "b", "class_label": 5, "seed": 9});
    let alone_a = pixels(&s, target_a.clone()).await;
    let alone_b = pixels(&s, target_b.clone()).await;
    // Same weights, different default samplers: the defaults are the models' own.
    assert_ne!(
        pixels(&s, json!({"model": "a", "class_label": 5, "seed": 9})).await,
        alone_b
    );
    assert_eq!(
        pixels(
            &s,
            json!({"model": "a", "class_label": 5, "seed": 9, "sampler": "ddim"})
        )
        .await,
        alone_b,
        "explicit settings: the same image from the same weights under either name"
    );

    // Each target again, in the middle of both models' traffic.
    let mut background = Vec::new();
    for i in 0..12u64 {
        let model = if i % 2 == 0 { "a" } else { "b" };
        let c = s.client.clone();
        let url = s.url("/generate");
        background.push(tokio::spawn(async move {
            c.post(url)
                .json(&json!({"model": model, "class_label": i % 10, "n": 2, "seed": 100 + i, "steps": 12}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (amid_a, amid_b) = tokio::join!(pixels(&s, target_a), pixels(&s, target_b));
    assert_eq!(amid_a, alone_a, "model a: same pixels alone and amid load");
    assert_eq!(amid_b, alone_b, "model b: same pixels alone and amid load");
    for t in background {
        assert_eq!(t.await.unwrap(), 200);
    }
}

/// Latencies (s) of `count` requests for `model`, one after another; panics on a non-200.
async fn sequential(s: &TestServer, model: &str, count: u64, steps: u64) -> (Vec<f64>, Vec<f64>) {
    let mut total = Vec::new();
    let mut queued = Vec::new();
    for i in 0..count {
        let t = Instant::now();
        let (status, v) = json_of(
            s.post(
                "/generate",
                json!({"model": model, "class_label": i % 10, "seed": i, "steps": steps}),
            )
            .await,
        )
        .await;
        assert_eq!(status, 200, "{model}: {v}");
        total.push(t.elapsed().as_secs_f64());
        queued.push(v["timings"]["queue_ms"].as_f64().unwrap() / 1e3);
    }
    (total, queued)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// The fairness bound: a flood for model `a` that fills its share of the queue does not push
/// model `b`'s requests behind it. `b` is never refused (its floor is reserved), its requests
/// wait for no queue at all (its own engine is free: queue wait ≤ 0.5 s), and its p99 (the
/// max of 8 requests) stays within 6× its p99 alone, plus 1 s, and under a third of the time
/// `a`'s backlog takes to drain, which is what a queue shared first-come-first-served would
/// have cost it. (The two engines share this machine's cores, so `b` does slow down a little.)
#[tokio::test]
async fn a_flood_for_one_model_does_not_starve_the_other() {
    let s = TestServer::start_with(&[
        "--model",
        &tiny_as("a", ""),
        "--model",
        &tiny_as("b", ""),
        "--max-queue",
        "64",
        "--max-batch",
        "4",
    ])
    .await;
    const STEPS: u64 = 40;
    let (solo, _) = sequential(&s, "b", 8, STEPS).await;
    let solo_p99 = max(&solo);

    // The flood: 80 one-image requests for a at once, of twice b's steps; a's share is
    // 64 − 16 = 48 queued.
    let flood_start = Instant::now();
    let flood: Vec<_> = (0..80u64)
        .map(|i| {
            let c = s.client.clone();
            let url = s.url("/generate");
            tokio::spawn(async move {
                let r = c
                    .post(url)
                    .json(&json!({"model": "a", "class_label": i % 10, "seed": i, "steps": 2 * STEPS}))
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            })
        })
        .collect();
    let mut backlog = 0.0;
    for _ in 0..400 {
        backlog = s.metric("diffit_queue_depth{model=\"a\"}").await;
        if backlog >= 40.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(backlog >= 40.0, "a's queue filled ({backlog})");

    let (loaded, waits) = sequential(&s, "b", 8, STEPS).await;
    let loaded_p99 = max(&loaded);
    let still_queued = s.metric("diffit_queue_depth{model=\"a\"}").await;
    let statuses: Vec<u16> = futures::future::join_all(flood)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let drain = flood_start.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|&&c| c == 200).count();
    let refused = statuses.iter().filter(|&&c| c == 429).count();
    eprintln!(
        "fairness: b p99 alone {solo_p99:.3} s, during a's flood {loaded_p99:.3} s (max queue wait \
         {:.3} s); a's flood: {ok} done, {refused} refused, drained in {drain:.2} s, {still_queued} \
         still queued when b finished",
        max(&waits)
    );
    assert_eq!(ok + refused, statuses.len(), "a: only 200s and 429s");
    assert!(
        refused > 0 && ok >= 48,
        "a filled its share: {ok} done, {refused} refused"
    );
    assert!(still_queued > 0.0, "b was measured while a's backlog stood");
    assert!(max(&waits) <= 0.5, "b never queued behind a: {waits:?}");
    assert!(
        loaded_p99 <= 6.0 * solo_p99 + 1.0,
        "b's p99 {loaded_p99:.3} s under a's flood vs {solo_p99:.3} s alone"
    );
    assert!(
        loaded_p99 < drain / 3.0,
        "b's p99 {loaded_p99:.3} s vs a's backlog draining in {drain:.2} s"
    );
}

#[tokio::test]
async fn sigterm_drains_both_models_requests() {
    let mut s =
        TestServer::start_with(&["--model", &tiny_as("a", ""), "--model", &tiny_as("b", "")]).await;
    let inflight: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|model| {
            let c = s.client.clone();
            let url = s.url("/generate");
            tokio::spawn(async move {
                c.post(url)
                    .json(&json!({"model": model, "class_label": 2, "steps": 400, "n": 2}))
                    .send()
                    .await
                    .unwrap()
            })
        })
        .collect();
    for model in ["a", "b"] {
        let series = format!("diffit_active_samples{{model=\"{model}\"}}");
        assert!(s.wait_metric(&series, 2.0).await, "{model} is denoising");
    }
    s.sigterm();
    for (t, model) in inflight.into_iter().zip(["a", "b"]) {
        let r = t.await.unwrap();
        assert_eq!(r.status(), 200, "{model}'s in-flight request finished");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (v["model"].as_str(), v["images"].as_array().unwrap().len()),
            (Some(model), 2)
        );
    }
    assert_eq!(s.wait_exit(Duration::from_secs(30)).await, Some(0));
}

/// `/readyz` is 200 only once every model's engines are warm: here model `b` can never warm
/// up (its defaults fail the warm-up step), so the server stays "warming up" naming `b`, while
/// `a` is ready; the failure names `b` (and `serve` exits on it).
#[tokio::test]
async fn readiness_waits_for_every_model() {
    use diffit_server::api::{router, AppState, Models};
    use diffit_server::engine::{start_models, EngineConfig};
    let load = |name: &str| {
        let mut p = common::tiny_pipeline();
        p.info.name = name.to_string();
        p
    };
    let mut broken = load("b");
    broken.info.defaults.guidance_scale = 1e30;
    let (handles, engines) =
        start_models(vec![vec![load("a")], vec![broken]], EngineConfig::default()).unwrap();
    let models = Models::new(handles).unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(30), models.failed())
        .await
        .expect("b's failure is reported");
    assert!(
        reason.contains("model 'b'") && reason.contains("warm-up failed"),
        "{reason}"
    );
    for _ in 0..600 {
        if models.all()[0].stats().ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(models.all()[0].stats().ready(), "a warmed up");
    assert!(!models.ready());

    let state = AppState {
        models: models.clone(),
        metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle(),
        api_keys: Default::default(),
        max_images_per_request: 4,
        max_body_bytes: 65536,
        png_compression: Default::default(),
        request_timeout: Duration::from_secs(30),
        max_request_timeout: Duration::from_secs(30),
        started_unix: 0,
        inflight: Default::default(),
        http: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let url = format!("http://{}/readyz", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({"status": "warming up", "warming": ["b"]}));
    server.abort();
    // The router (and its handles) goes with the task: wait for it before joining the engines.
    let _ = server.await;
    drop(models);
    engines.join();
}

/// Bad model flags end start-up at once, non-zero, naming the model and the problem.
#[test]
fn bad_model_settings_fail_start_up_naming_the_model() {
    let dir = std::env::temp_dir().join(format!("diffit-models-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("models.toml");
    std::fs::write(
        &file,
        format!(
            "[[models]]\nname = \"t\"\npath = \"{}\"\nvae = \"{}\"\ncolour = \"red\"\n",
            tiny(),
            tiny_vae()
        ),
    )
    .unwrap();
    let file_arg = file.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--model".into(),
                "x=embedded".into(),
                "--model".into(),
                "x=embedded".into(),
            ],
            "model 'x' is given twice",
        ),
        (
            vec!["--model".into(), tiny_as("t", ",colour=red")],
            "unknown key 'colour'",
        ),
        (
            vec![
                "--model".into(),
                "gone=/no/such/model.safetensors,vae=/no/vae".into(),
            ],
            "model 'gone': model file /no/such/model.safetensors does not exist",
        ),
        (vec!["--models".into(), file_arg], "unknown field `colour`"),
        (
            vec!["--model".into(), "t=embedded,steps=1".into()],
            "model 't'",
        ),
    ];
    for (args, want) in cases {
        let t = Instant::now();
        let out = serve_command(&args, "warn").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(want),
            "{args:?}: wanted '{want}' in: {stderr}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{args:?} failed at once"
        );
    }
    // The environment form: entries separated by ';'.
    let out = serve_command(&[] as &[&str], "warn")
        .env("DIFFIT_MODEL", "y=embedded;y=embedded,steps=9")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("model 'y' is given twice"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
