//! Starts the real `diffit-server serve` binary on a loopback port for integration tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::fixture;

pub struct TestServer {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

/// `serve` on a free loopback port on the CPU with `extra` flags and `RUST_LOG=rust_log`.
pub fn serve_command<S: AsRef<std::ffi::OsStr>>(extra: &[S], rust_log: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffit-server"));
    cmd.args([
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--device",
        "cpu",
    ])
    .args(extra)
    .env("RUST_LOG", rust_log);
    cmd
}

/// `--model` and `--vae` for the tiny fixture models, then `extra`.
pub fn fixture_args(extra: &[&str]) -> Vec<String> {
    let path = |name: &str| fixture(name).to_str().unwrap().to_string();
    let mut args = vec![
        "--model".to_string(),
        path("diffit_tiny_model.safetensors"),
        "--vae".to_string(),
        path("vae_tiny_model.safetensors"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl TestServer {
    /// Tiny fixture models on the CPU, any extra `serve` flags.
    pub async fn start(extra: &[&str]) -> Self {
        Self::spawn(&fixture_args(extra), "warn", Stdio::inherit()).await
    }

    /// `serve` on the CPU with exactly these extra flags (no model flags: the embedded model).
    pub async fn start_with(extra: &[&str]) -> Self {
        Self::spawn(extra, "warn", Stdio::inherit()).await
    }

    /// The fixture models with `RUST_LOG=rust_log`; the server's log lines arrive on the
    /// returned channel (stderr, one line a message).
    pub async fn start_logging(
        extra: &[&str],
        rust_log: &str,
    ) -> (Self, std::sync::mpsc::Receiver<String>) {
        let mut server = Self::spawn(&fixture_args(extra), rust_log, Stdio::piped()).await;
        let stderr = server.child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        (server, rx)
    }

    async fn spawn<S: AsRef<std::ffi::OsStr>>(extra: &[S], rust_log: &str, stderr: Stdio) -> Self {
        let mut child = serve_command(extra, rust_log)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start server");
        let stdout = child.stdout.take().unwrap();
        let base = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            let line = lines.next().expect("server printed its address").unwrap();
            // Keep draining stdout so the server never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            line.rsplit(' ').next().unwrap().to_string()
        })
        .await
        .unwrap();
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "server did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            base,
            client,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// The value of one metric series (exact name with labels) from /metrics.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    }

    /// The sum of every series of one metric, whatever its labels (e.g. over engines).
    pub async fn metric_total(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(name)?;
                let value = if rest.starts_with('{') {
                    rest.split_once("} ")?.1
                } else {
                    rest.strip_prefix(' ')?
                };
                value.trim().parse::<f64>().ok()
            })
            .sum()
    }

    /// Polls a metric until it equals `want` (at most 10 s); whether it did.
    pub async fn wait_metric(&self, series: &str, want: f64) -> bool {
        for _ in 0..200 {
            if self.metric(series).await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit and returns its status code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Decodes a PNG: (width, height, channels, pixels, tEXt entries).
pub fn decode_png(
    bytes: &[u8],
) -> (
    u32,
    u32,
    usize,
    Vec<u8>,
    std::collections::HashMap<String, String>,
) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let info = reader.info();
    let text = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    let (w, h) = (info.width, info.height);
    let channels = info.color_type.samples();
    let mut buf = vec![0; reader.output_buffer_size()];
    reader.next_frame(&mut buf).unwrap();
    (w, h, channels, buf, text)
}

pub fn b64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}
