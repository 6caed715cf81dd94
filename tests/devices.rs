//! Several engines (`--devices cpu,cpu`) sharing one queue, over HTTP: both do work, every
//! request succeeds, pixels equal a single-engine server's, streaming progress stays in order
//! when a request is split between engines, and SIGTERM waits for both.

mod common;

use std::time::Duration;

use common::server::{b64, decode_png, TestServer};
use serde_json::{json, Value};

/// The images' pixels of a `/generate` response, in order.
fn pixels(body: &Value) -> Vec<Vec<u8>> {
    body["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|img| decode_png(&b64(img["b64_png"].as_str().unwrap())).3)
        .collect()
}

fn bodies() -> Vec<Value> {
    (0..6u64)
        .map(|i| {
            let sampler = ["ddpm", "ddim", "dpm-solver++"][i as usize % 3];
            json!({"class_label": i % 10, "seed": 100 + 10 * i, "n": 2,
                   "steps": 12 + 2 * i, "sampler": sampler,
                   "guidance_scale": if i % 2 == 0 { 3.0 } else { 1.0 }})
        })
        .chain([json!({"class_label": 4, "seed": 7, "n": 5, "steps": 10})])
        .collect()
}

async fn run_all(s: &TestServer, bodies: &[Value]) -> Vec<Value> {
    let handles: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|body| {
            let c = s.client.clone();
            let url = s.url("/generate");
            tokio::spawn(async move {
                let r = c.post(url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200, "{body}");
                r.json::<Value>().await.unwrap()
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn two_engines_share_the_queue_and_match_one_engine() {
    let mut two = TestServer::start(&["--devices", "cpu,cpu", "--max-batch", "2"]).await;

    let models: Value = two.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["devices"], json!(["cpu", "cpu"]));
    assert_eq!(models["data"][0]["device"], "cpu,cpu");
    assert_eq!(two.metric("diffit_engines").await, 2.0);

    let bodies = bodies();
    let multi = run_all(&two, &bodies).await;
    for (body, got) in bodies.iter().zip(&multi) {
        assert_eq!(
            got["images"].as_array().unwrap().len() as u64,
            body["n"].as_u64().unwrap()
        );
    }
    for engine in ["0", "1"] {
        let steps = two
            .metric(&format!(
                "diffit_step_duration_seconds_count{{engine=\"{engine}\",device=\"cpu\",model=\"diffit_tiny_model\"}}"
            ))
            .await;
        assert!(steps > 0.0, "engine {engine} ran no step");
    }
    let images: usize = bodies
        .iter()
        .map(|b| b["n"].as_u64().unwrap() as usize)
        .sum();
    assert_eq!(
        two.metric_total("diffit_images_generated_total").await,
        images as f64
    );
    assert!(
        two.wait_metric("diffit_queue_depth{model=\"diffit_tiny_model\"}", 0.0)
            .await
    );
    assert!(
        two.wait_metric("diffit_active_samples{model=\"diffit_tiny_model\"}", 0.0)
            .await
    );

    // Streaming a request split over both engines (4 images, 2 slots each): progress only
    // moves forward and ends at the step count.
    let text = two
        .post(
            "/generate",
            json!({"class_label": 2, "n": 4, "steps": 9, "seed": 3, "stream": true}),
        )
        .await
        .text()
        .await
        .unwrap();
    let steps: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "progress in order: {steps:?}"
    );
    assert_eq!(steps.last(), Some(&9), "{steps:?}");
    assert!(text.contains("event: result"));

    // SIGTERM waits for the work on both engines.
    let long = json!({"class_label": 1, "n": 4, "steps": 300, "seed": 11});
    let c = two.client.clone();
    let url = two.url("/generate");
    let inflight =
        tokio::spawn(async move { c.post(url).json(&long).send().await.unwrap().status() });
    for _ in 0..400 {
        if two.metric_total("diffit_active_samples").await >= 4.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    two.sigterm();
    assert_eq!(inflight.await.unwrap(), 200, "drained, not dropped");
    assert_eq!(two.wait_exit(Duration::from_secs(60)).await, Some(0));
    drop(two);

    // The same requests on one engine with a large batch: identical pixels.
    let one = TestServer::start(&["--max-batch", "16"]).await;
    let single = run_all(&one, &bodies).await;
    for ((body, a), b) in bodies.iter().zip(&multi).zip(&single) {
        assert_eq!(pixels(a), pixels(b), "{body}: pixels depend on the engine");
    }
    let models: Value = one.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["devices"], json!(["cpu"]));
    assert_eq!(one.metric("diffit_engines").await, 1.0);
}

#[tokio::test]
async fn bad_device_lists_fail_at_start_up() {
    for (list, words) in [("cpu,,cpu", "empty entry"), ("cpu,tpu", "tpu")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_diffit-server"))
            .args([
                "serve",
                "--port",
                "0",
                "--host",
                "127.0.0.1",
                "--devices",
                list,
            ])
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{list}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(words), "{list}: {err}");
    }
}
