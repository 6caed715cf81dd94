//! The command line reproduces the fixtures, and `generate` writes a PNG with metadata.

mod common;

use std::process::Command;

use candle_core::Device;
use common::server::decode_png;
use common::{fixture, golden, rel_err};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diffit-server"))
}

fn out_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("diffit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn forward_reproduces_plain_and_guided_fixture_outputs() {
    let g = golden("diffit_tiny_golden.safetensors");
    let dir = out_dir();
    for (prefix, guided, want) in [("fwd.", false, "fwd.out"), ("cfg.", true, "cfg.out")] {
        let out = dir.join(format!("{prefix}out.safetensors"));
        let mut cmd = bin();
        cmd.args(["forward", "--device", "cpu", "--prefix", prefix])
            .arg("--model")
            .arg(fixture("diffit_tiny_model.safetensors"))
            .arg("--input")
            .arg(fixture("diffit_tiny_golden.safetensors"))
            .arg("--output")
            .arg(&out);
        if guided {
            cmd.args([
                "--guidance-scale",
                "4.4",
                "--guidance-schedule",
                "power-cosine",
            ]);
        }
        run_ok(&mut cmd);
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        let e = rel_err(&got["out"], &g[want]);
        assert!(e <= 1e-4, "{want}: rel err {e}");
    }
}

#[test]
fn decode_reproduces_fixture() {
    let g = golden("vae_tiny_golden.safetensors");
    let out = out_dir().join("decoded.safetensors");
    run_ok(
        bin()
            .args(["decode", "--device", "cpu", "--vae"])
            .arg(fixture("vae_tiny_model.safetensors"))
            .arg("--input")
            .arg(fixture("vae_tiny_golden.safetensors"))
            .arg("--output")
            .arg(&out),
    );
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(rel_err(&got["decoded"], &g["decoded"]) <= 1e-4);
    let a = got["pixels_u8"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let b = g["pixels_u8"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.abs_diff(*y) <= 1));
}

#[test]
fn generate_writes_png_with_metadata_and_is_deterministic() {
    let dir = out_dir();
    let mut paths = Vec::new();
    for name in ["a.png", "b.png"] {
        let p = dir.join(name);
        run_ok(
            bin()
                .args([
                    "generate", "--device", "cpu", "--class", "3", "--seed", "11", "--steps", "10",
                ])
                .args([
                    "--sampler",
                    "dpm-solver++",
                    "--guidance-scale",
                    "2.0",
                    "--model",
                ])
                .arg(fixture("diffit_tiny_model.safetensors"))
                .arg("--vae")
                .arg(fixture("vae_tiny_model.safetensors"))
                .arg("-o")
                .arg(&p),
        );
        paths.push(p);
    }
    let a = std::fs::read(&paths[0]).unwrap();
    assert_eq!(
        a,
        std::fs::read(&paths[1]).unwrap(),
        "same seed, same bytes"
    );
    let (w, h, _, _, text) = decode_png(&a);
    assert_eq!((w, h), (64, 64), "8×8 latent through a 4-level (×8) VAE");
    assert_eq!(text["seed"], "11");
    assert_eq!(text["class_label"], "3");
    assert_eq!(text["sampler"], "dpm-solver++");
    assert_eq!(text["steps"], "10");
    assert_eq!(text["model_sha256"].len(), 64);
}

#[test]
fn generate_rejects_unknown_class_name_with_suggestions() {
    let out = bin()
        .args([
            "generate",
            "--device",
            "cpu",
            "--class-name",
            "clas 3",
            "--model",
        ])
        .arg(fixture("diffit_tiny_model.safetensors"))
        .arg("--vae")
        .arg(fixture("vae_tiny_model.safetensors"))
        .output()
        .unwrap();
    // "clas 3" is no name, but "class 3" is close.
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown class name") && err.contains("class 3"),
        "{err}"
    );
}

#[test]
fn class_names_come_from_a_side_file() {
    let dir = out_dir().join("side");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("m.safetensors");
    std::fs::copy(fixture("diffit_tiny_model.safetensors"), &model).unwrap();
    let names: Vec<Vec<String>> = (0..10)
        .map(|i| vec![format!("thing {i}"), format!("alias{i}")])
        .collect();
    std::fs::write(
        dir.join("m.classes.json"),
        serde_json::to_string(&names).unwrap(),
    )
    .unwrap();
    let out = dir.join("side.png");
    run_ok(
        bin()
            .args([
                "generate",
                "--device",
                "cpu",
                "--class-name",
                "ALIAS4",
                "--steps",
                "2",
                "--model",
            ])
            .arg(&model)
            .arg("--vae")
            .arg(fixture("vae_tiny_model.safetensors"))
            .arg("-o")
            .arg(&out),
    );
    let bytes = std::fs::read(&out).unwrap();
    let (_, _, _, _, text) = decode_png(&bytes);
    assert_eq!(text["class_label"], "4");
    assert_eq!(text["class_name"], "thing 4");
}

/// `bench serve` on the tiny fixture model with `extra` flags and `--json`: the printed table
/// and the JSON report.
fn bench_serve(name: &str, extra: &[&str]) -> (String, serde_json::Value) {
    let json_path = out_dir().join(name);
    let model = fixture("diffit_tiny_model.safetensors");
    let vae = fixture("vae_tiny_model.safetensors");
    let out = bin()
        .args(["bench", "serve", "--model"])
        .arg(&model)
        .arg("--vae")
        .arg(&vae)
        .args(extra.iter().map(|a| match *a {
            // The fixture's own paths, where a test names them.
            "MODEL" => model.as_os_str(),
            "VAE" => vae.as_os_str(),
            other => std::ffi::OsStr::new(other),
        }))
        .args(["--max-secs", "120", "--json"])
        .arg(&json_path)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench serve failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), report)
}

#[test]
fn bench_serve_reports_engine_png_and_http_throughput() {
    let (table, report) = bench_serve(
        "bench-serve.json",
        &[
            "--devices",
            "cpu,cpu",
            "--steps",
            "4",
            "--images",
            "12",
            "--n",
            "2",
            "--concurrency",
            "3",
            "--max-batch",
            "4",
        ],
    );
    for words in [
        "| path | requests | images | wall s | images/s | vs engine | p50 ms | p99 ms |",
        "| engine |",
        "| engine+png |",
        "| http |",
        "of engine-only throughput",
    ] {
        assert!(table.contains(words), "no '{words}' in:\n{table}");
    }
    assert_eq!(report["devices"], serde_json::json!(["cpu", "cpu"]));
    assert_eq!(report["images"], 12);
    let rows = report["rows"].as_array().unwrap();
    let paths: Vec<&str> = rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["engine", "engine+png", "http"]);
    for r in rows {
        assert_eq!(r["images"], 12, "{r}");
        assert_eq!(r["requests"], 6, "{r}");
        for field in [
            "wall_secs",
            "images_per_sec",
            "relative_to_engine",
            "p50_ms",
            "p99_ms",
        ] {
            let v = r[field].as_f64().unwrap_or(-1.0);
            assert!(v > 0.0 && v.is_finite(), "{field} = {v} in {r}");
        }
        assert!(r["p99_ms"].as_f64() >= r["p50_ms"].as_f64(), "{r}");
    }
    assert!(report["http_overhead_pct"].as_f64().unwrap().is_finite());
}

/// Two models at once: the `mixed` pass reports images/s and p50/p99 for each.
#[test]
fn bench_serve_with_two_models_reports_each_under_a_mixed_workload() {
    let (table, report) = bench_serve(
        "bench-serve-two.json",
        &[
            "--device",
            "cpu",
            "--second-model",
            "MODEL",
            "--second-vae",
            "VAE",
            "--steps",
            "3",
            "--images",
            "6",
            "--concurrency",
            "4",
            "--max-batch",
            "4",
        ],
    );
    assert!(
        table.contains("| model | requests | images | images/s | p50 ms | p99 ms |"),
        "{table}"
    );
    let mixed = report["mixed"].as_array().unwrap();
    let names: Vec<&str> = mixed.iter().map(|r| r["model"].as_str().unwrap()).collect();
    assert_eq!(names, ["diffit_tiny_model", "diffit_tiny_model-2"]);
    for r in mixed {
        assert_eq!(
            (r["requests"].as_u64(), r["images"].as_u64()),
            (Some(6), Some(6)),
            "{r}"
        );
        let (rate, p50, p99) = (
            r["images_per_sec"].as_f64().unwrap(),
            r["p50_ms"].as_f64().unwrap(),
            r["p99_ms"].as_f64().unwrap(),
        );
        assert!(rate > 0.0 && p50 > 0.0 && p99 >= p50, "{r}");
    }
    assert!(report["mixed_wall_secs"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_serve_refuses_bad_settings() {
    for (flag, value, words) in [
        ("--images", "0", "--images must be between"),
        ("--resolution", "300", "--resolution must be 256 or 512"),
        ("--devices", "cpu,,cpu", "empty entry"),
    ] {
        let out = bin()
            .args(["bench", "serve", "--device", "cpu", flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(words), "{flag} {value}: {err}");
    }
}

/// `bench kernels` compares every fused op with its unfused candle version (here the CPU
/// fallbacks; on a GPU the CUDA kernels) and prints one table row per case.
#[test]
fn bench_kernels_checks_every_fused_op_and_refuses_a_bad_dtype() {
    let out = bin()
        .args([
            "bench", "kernels", "--device", "cpu", "--dtypes", "f32,bf16",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for op in [
        "bias_act",
        "softmax_bias",
        "layer_norm",
        "split_qkv",
        "merge_heads",
        "attention",
        "linear + bias",
        "conv3x3 via im2col3x3",
        "group_norm",
    ] {
        assert!(stdout.contains(op), "no {op} case in:\n{stdout}");
    }
    let rows = stdout.lines().filter(|l| l.ends_with("| yes |")).count();
    assert!(rows >= 100, "{rows} passing rows");
    assert!(!stdout.contains("| NO |"), "{stdout}");

    let bad = bin()
        .args(["bench", "kernels", "--device", "cpu", "--dtypes", "f8"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("f8"));
}

fn stderr_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Mistakes a newcomer makes with `generate` are explained before any work starts.
#[test]
fn generate_explains_bad_arguments_up_front() {
    let err = stderr_of(bin().args(["generate"]));
    assert!(
        err.contains("--class <CLASS>") && err.contains("--class-name <CLASS_NAME>"),
        "{err}"
    );
    let err = stderr_of(bin().args(["generate", "--class", "1", "--seed", "-1"]));
    assert!(
        err.contains("a seed is an integer from 0 to 18446744073709551615"),
        "{err}"
    );
    let err = stderr_of(bin().args([
        "generate",
        "--class",
        "1",
        "--seed",
        "18446744073709551615",
        "--n",
        "2",
    ]));
    assert!(err.contains("image i uses seed + i"), "{err}");
    let missing = out_dir().join("no-such-dir").join("x.png");
    let start = std::time::Instant::now();
    let err = stderr_of(bin().args(["generate", "--class", "1", "-o"]).arg(&missing));
    assert!(err.contains("does not exist"), "{err}");
    assert!(!missing.exists());
    // Refused before the model is even loaded.
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
    let err = stderr_of(bin().args([
        "generate",
        "--class",
        "1",
        "--model",
        "/nonexistent/model.safetensors",
        "--vae",
        "/nonexistent/vae.safetensors",
    ]));
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

/// `load` says when its time bound, not the server, ended the run.
#[test]
fn load_says_when_max_secs_stopped_it() {
    // A loopback listener that accepts and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(std::time::Duration::from_secs(3));
        drop(conns);
    });
    let out = bin()
        .args([
            "load",
            "--requests",
            "3",
            "--concurrency",
            "1",
            "--max-secs",
            "1",
        ])
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "stopped early: 1 of 3 requests sent before the time limit of 1 s (--max-secs)"
        ),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    held.join().unwrap();
}
