//! The embedded Fashion-MNIST model in weights/: parity with the PyTorch sampler that trained
//! it, and `serve` with no model flags.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::server::{b64, decode_png, TestServer};
use common::{fixture, golden, ints, rel_err, row, Replay};
use diffit_server::config::KernelOptions;
use diffit_server::diffusion::{denoise_step, Guidance, SampleState, Schedule};
use diffit_server::model::{DiffiT, WeightsFile};
use serde_json::{json, Value};

fn weights(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("weights")
        .join(name)
}

#[test]
fn rust_sampler_matches_the_pytorch_sampler_on_the_embedded_model() {
    let meta_file = WeightsFile::open(fixture("fmnist_sample.safetensors")).unwrap();
    let meta = meta_file.metadata();
    let steps: usize = meta["steps"].parse().unwrap();
    let sampler = meta["sampler"].parse().unwrap();
    let guidance = Guidance::new(
        meta["guidance_scale"].parse().unwrap(),
        meta["guidance_schedule"].parse().unwrap(),
    )
    .unwrap();
    let g = golden("fmnist_sample.safetensors");
    let model = DiffiT::load(
        &WeightsFile::open(weights("diffit_fmnist.safetensors")).unwrap(),
        DType::F32,
        &Device::Cpu,
        &KernelOptions::default(),
    )
    .unwrap();
    let cfg = model.config().clone();
    let schedule = Arc::new(Schedule::new(steps).unwrap());
    let labels = ints(&g["y"]);
    let mut samples: Vec<SampleState> = (0..labels.len())
        .map(|j| {
            let noise = (0..steps)
                .map(|k| row(&g["noise"].get(k).unwrap(), j))
                .collect();
            SampleState::new(
                labels[j],
                sampler,
                guidance,
                schedule.clone(),
                Box::new(Replay {
                    z: row(&g["z"], j),
                    noise,
                }),
                (cfg.in_channels, cfg.input_size, cfg.input_size),
                &Device::Cpu,
            )
            .unwrap()
        })
        .collect();
    while samples.iter().any(|s| !s.is_done()) {
        let mut refs: Vec<&mut SampleState> = samples.iter_mut().collect();
        denoise_step(&model, &mut refs).unwrap();
    }
    let latents: Vec<&Tensor> = samples.iter().map(|s| s.latent()).collect();
    let e = rel_err(&Tensor::cat(&latents, 0).unwrap(), &g["final"]);
    eprintln!("embedded model, Rust vs PyTorch sampler: final latent rel err {e:.3e}");
    assert!(e <= 1e-3, "final latent rel err {e} vs the PyTorch sampler");
}

#[tokio::test]
async fn serve_without_model_flags_uses_the_embedded_model() {
    let s = TestServer::start_with(&[]).await;
    let models: Value = s.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "diffit_fmnist");
    let classes: Value = s.get("/v1/classes").await.json().await.unwrap();
    assert_eq!(classes["num_classes"], 10);
    assert_eq!(classes["classes"][7]["name"], "Sneaker");
    // A plain request uses the model's own defaults; class names and OpenAI prompts resolve.
    let r: Value = s
        .post("/generate", json!({"class_name": "Sneaker", "seed": 3}))
        .await
        .json()
        .await
        .unwrap();
    let defaults = &models["data"][0]["defaults"];
    assert_eq!(r["steps"], defaults["steps"]);
    assert_eq!(r["sampler"], defaults["sampler"]);
    let side = models["data"][0]["image_size"].as_u64().unwrap() as u32;
    let (w, h, _, _, text) = decode_png(&b64(r["images"][0]["b64_png"].as_str().unwrap()));
    assert_eq!((w, h), (side, side));
    assert_eq!(text["class_name"], "Sneaker");
    let o: Value = s
        .post(
            "/v1/images/generations",
            json!({"prompt": "sneaker", "n": 1}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(o["data"][0]["revised_prompt"], "Sneaker");
}

#[test]
fn generate_without_model_flags_uses_the_embedded_model() {
    let out = std::env::temp_dir().join(format!("embedded-{}.png", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_diffit-server"))
        .args([
            "generate",
            "--device",
            "cpu",
            "--class-name",
            "trainer",
            "--seed",
            "9",
            "--steps",
            "4",
            "-o",
        ])
        .arg(&out)
        .env_remove("DIFFIT_MODEL")
        .env_remove("DIFFIT_VAE")
        .status()
        .unwrap();
    assert!(status.success());
    let (w, h, channels, _, text) = decode_png(&std::fs::read(&out).unwrap());
    assert_eq!((w, h, channels), (32, 32, 1), "32×32 gray");
    assert_eq!(text["class_name"], "Sneaker");
    assert_eq!(text["model"], "diffit_fmnist");
}
