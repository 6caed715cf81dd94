//! A request's log lines follow it into the engine: filtered by its request id, the JSON logs
//! show its queue wait, the steps and batch sizes it ran in, and its decode and encode.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture;
use serde_json::Value;

#[tokio::test]
async fn a_request_id_s_logs_show_queue_steps_batches_decode_and_encode() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_diffit-server"))
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            "cpu",
        ])
        .args(["--log-format", "json", "--model"])
        .arg(fixture("diffit_tiny_model.safetensors"))
        .arg("--vae")
        .arg(fixture("vae_tiny_model.safetensors"))
        .env("RUST_LOG", "info,diffit_server::engine=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let base = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next().unwrap().unwrap();
        std::thread::spawn(move || for _ in lines {});
        line.rsplit(' ').next().unwrap().to_string()
    })
    .await
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client
        .post(format!("{base}/generate"))
        .header("x-request-id", "trace-me-1")
        .json(&serde_json::json!({"class_label": 3, "n": 2, "steps": 4, "seed": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The request's own "done" line is the last one it logs.
    let mut mine: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mine.iter().any(|v| v["fields"]["message"] == "done") {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the request's logs arrive");
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["span"]["id"] == "trace-me-1" {
            mine.push(v);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let find = |msg: &str| -> Vec<&Value> {
        mine.iter()
            .filter(|v| v["fields"]["message"] == msg)
            .map(|v| &v["fields"])
            .collect()
    };
    let admitted = find("admitted to a batch");
    assert_eq!(admitted.len(), 1, "{mine:#?}");
    assert!(admitted[0]["queue_wait_ms"].is_u64(), "{admitted:?}");
    assert_eq!(admitted[0]["images"], 2);
    let steps = find("step");
    assert_eq!(steps.len(), 4, "one debug line per step: {mine:#?}");
    assert!(steps.iter().all(|s| s["batch"] == 2), "{steps:?}");
    let denoised = find("denoised");
    assert_eq!(denoised.len(), 1, "{mine:#?}");
    assert_eq!(denoised[0]["steps"], 4);
    assert_eq!(denoised[0]["batch_max"], 2);
    let images = find("image decoded and encoded");
    assert_eq!(images.len(), 2, "{mine:#?}");
    for im in images {
        assert!(im["decode_ms"].is_f64() && im["encode_ms"].is_f64(), "{im}");
        assert!(im["decode_batch"].as_u64().unwrap() >= 1);
    }
}
