//! Shared test helpers: fixture paths, error measures, the live server harness.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The tiny fixture model and VAE, loaded on the CPU in f32.
pub fn tiny_pipeline() -> diffit_server::pipeline::Pipeline {
    tiny_pipeline_with(Default::default())
}

/// The tiny fixture pipeline with these kernel options (e.g. `cuda_graphs: Toggle::On`).
pub fn tiny_pipeline_with(
    kernels: diffit_server::config::KernelOptions,
) -> diffit_server::pipeline::Pipeline {
    diffit_server::pipeline::Pipeline::load(&diffit_server::pipeline::LoadOptions {
        model: fixture("diffit_tiny_model.safetensors"),
        vae: fixture("vae_tiny_model.safetensors"),
        vae_config: None,
        device: Device::Cpu,
        dtype: DType::F32,
        decode_chunk: 8,
        kernels,
    })
    .expect("the tiny fixture loads")
}

pub fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).expect("fixture loads")
}

/// ‖a − b‖ / ‖b‖ over all elements, in f64 (the library's one measure).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    diffit_server::kernels::reference::rel_err(a, b).expect("comparable tensors")
}

pub fn ints(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
}

/// Replays a reference run's recorded start latent and per-iteration noise for one sample.
pub struct Replay {
    pub z: Vec<f32>,
    pub noise: Vec<Vec<f32>>,
}

impl diffit_server::diffusion::NoiseSource for Replay {
    fn initial(&mut self, len: usize) -> Vec<f32> {
        assert_eq!(len, self.z.len());
        self.z.clone()
    }
    fn step(&mut self, iteration: usize, len: usize) -> Vec<f32> {
        assert_eq!(len, self.noise[iteration].len());
        self.noise[iteration].clone()
    }
}

/// Row `j` of a recorded tensor, flattened.
pub fn row(t: &Tensor, j: usize) -> Vec<f32> {
    t.get(j)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

pub mod schema;
pub mod server;
