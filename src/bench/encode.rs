//! `bench encode`: what writing one image costs, per output format and PNG deflate effort, on
//! images shaped like the server's (synthetic: no model needed, so it runs anywhere).
//!
//! Two contents bracket what a model produces: `smooth` (gradients, soft shapes and a little
//! grain, like a decoded natural image) and `noise` (uniform random bytes, what random weights
//! decode to and deflate's worst case).

use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::stats::median;
use crate::encode::{encode, EncodeOptions, OutputFormat, DEFAULT_QUALITY};
use crate::png::PngCompression;

#[derive(Debug, Args)]
pub struct EncodeArgs {
    /// Image side in pixels (256 and 512 are the ImageNet models').
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    pub sizes: Vec<usize>,
    /// Encodes timed per setting (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    size: usize,
    content: &'static str,
    format: String,
    ms: f64,
    kib: f64,
}

/// (C, H, W) RGB planes of one synthetic image.
fn synthetic(content: &str, side: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut grain = move || {
        // xorshift64*: reproducible grain without a dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
    };
    let plane = side * side;
    (0..3 * plane)
        .map(|i| {
            let (c, y, x) = (i / plane, (i % plane) / side, i % side);
            if content == "noise" {
                return grain();
            }
            let (u, v) = (x as f32 / side as f32, y as f32 / side as f32);
            let blob = (-((u - 0.5).powi(2) + (v - 0.45).powi(2)) * 12.0).exp();
            let base = 60.0 + 120.0 * blob + 50.0 * (u * 3.0 + c as f32).sin() * v;
            (base + (grain() as f32 - 128.0) / 32.0).clamp(0.0, 255.0) as u8
        })
        .collect()
}

pub fn run(a: EncodeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.iters > 0, "--iters must be at least 1");
    let text = [
        ("seed", "42".to_string()),
        ("class_name", "bench".to_string()),
    ];
    let mut settings: Vec<(String, EncodeOptions)> = PngCompression::ALL
        .into_iter()
        .map(|png| {
            let options = EncodeOptions {
                png,
                ..Default::default()
            };
            (format!("png/{png}"), options)
        })
        .collect();
    for format in [OutputFormat::Jpeg, OutputFormat::Webp] {
        let options = EncodeOptions {
            format,
            quality: DEFAULT_QUALITY,
            ..Default::default()
        };
        settings.push((format.to_string(), options));
    }
    let mut rows = Vec::new();
    for &side in &a.sizes {
        anyhow::ensure!(
            (8..=4096).contains(&side),
            "--sizes: {side} is not in 8..=4096"
        );
        for content in ["smooth", "noise"] {
            let pixels = synthetic(content, side);
            for (name, options) in &settings {
                let mut times = Vec::with_capacity(a.iters);
                let mut bytes = 0;
                for _ in 0..a.iters {
                    let t0 = Instant::now();
                    bytes = encode(&pixels, 3, side, side, &text, *options)?.len();
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                rows.push(Row {
                    size: side,
                    content,
                    format: name.clone(),
                    ms: median(times),
                    kib: bytes as f64 / 1024.0,
                });
            }
        }
    }
    println!("| size | content | format | ms / image | KiB |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.1} |",
            r.size, r.content, r.format, r.ms, r.kib
        );
    }
    if let Some(path) = &a.json {
        super::write_json(path, &rows)?;
    }
    Ok(())
}
