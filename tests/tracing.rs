//! A request's log lines follow it into the engine: filtered by its request id, the JSON logs
//! show its queue wait, the steps and batch sizes it ran in, and its decode and encode.

mod common;

use std::time::{Duration, Instant};

use common::server::TestServer;
use serde_json::Value;

#[tokio::test]
async fn a_request_id_s_logs_show_queue_steps_batches_decode_and_encode() {
    let (server, logs) = TestServer::start_logging(
        &["--log-format", "json"],
        "info,diffit_server::engine=debug",
    )
    .await;
    let r = server
        .client
        .post(server.url("/generate"))
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
        let line = logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the request's logs arrive");
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["span"]["id"] == "trace-me-1" {
            mine.push(v);
        }
    }
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
