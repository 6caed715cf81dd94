//! Loader behaviour: configuration read off shapes, and clear errors for bad files.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::fixture;
use diffit_server::config::KernelOptions;
use diffit_server::model::{DiffiT, DiffitConfig, VaeDecoder, WeightsError, WeightsFile};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffit-loader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("diffit_tiny_model.safetensors"), &Device::Cpu).unwrap()
}

fn save(map: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(map, path).unwrap();
}

fn load_err(path: &Path) -> String {
    let err = match WeightsFile::open(path) {
        Err(e) => e,
        Ok(f) => match DiffiT::load(&f, DType::F32, &Device::Cpu, &KernelOptions::default()) {
            Err(e) => e,
            Ok(_) => panic!("{} loaded but should not", path.display()),
        },
    };
    err.to_string()
}

/// The released ImageNet-256 tensor list, depth cut to `depth`.
fn imagenet_shapes(depth: usize) -> Vec<(String, Vec<usize>, String)> {
    let text = std::fs::read_to_string(fixture("diffit_imagenet_keys.txt")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("# ImageNet-512") {
            break;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut cols = line.split('\t');
        let (name, shape, dtype) = (
            cols.next().unwrap(),
            cols.next().unwrap(),
            cols.next().unwrap(),
        );
        if let Some(rest) = name.strip_prefix("blocks.") {
            let i: usize = rest.split('.').next().unwrap().parse().unwrap();
            if i >= depth {
                continue;
            }
        }
        let shape: Vec<usize> = shape
            .trim_matches(|c| c == '[' || c == ']')
            .split(", ")
            .map(|d| d.parse().unwrap())
            .collect();
        out.push((name.to_string(), shape, dtype.to_string()));
    }
    out
}

#[test]
fn imagenet_256_layout_is_inferred_and_loads() {
    let shapes = imagenet_shapes(2);
    assert_eq!(
        shapes.len(),
        10 + 2 * 12,
        "2-block ImageNet checkpoint tensor count"
    );
    let mut map = HashMap::new();
    for (name, shape, dtype) in &shapes {
        let t = if dtype == "int64" {
            let grid = 16;
            let idx = diffit_server::model::diffit::relative_position_index(grid);
            Tensor::from_vec(idx, (256, 256), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::I64)
                .unwrap()
        } else {
            // Small values keep the forward finite; the loader only cares about names/shapes.
            Tensor::randn(0f32, 0.02, shape.as_slice(), &Device::Cpu).unwrap()
        };
        map.insert(name.clone(), t);
    }
    let path = tmp("imagenet256-depth2.safetensors");
    save(&map, &path);
    let file = WeightsFile::open(&path).unwrap();
    let cfg = DiffitConfig::infer(&file).unwrap();
    // Everything as released but the depth, which the test cut to 2.
    let released = DiffitConfig::imagenet(32);
    assert_eq!(
        cfg,
        DiffitConfig {
            depth: 2,
            ..released
        }
    );
    assert_eq!(
        (cfg.hidden_size, cfg.num_heads, cfg.patch_size),
        (1152, 16, 2)
    );
    assert_eq!(
        (cfg.num_classes, cfg.out_channels, cfg.input_size),
        (1000, 8, 32)
    );
    assert_eq!(cfg.grid(), 16);
    let model = DiffiT::load(&file, DType::F32, &Device::Cpu, &KernelOptions::default()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 4, 32, 32), &Device::Cpu).unwrap();
    let out = model.forward(&x, &[500], &[207]).unwrap();
    assert_eq!(out.dims(), &[1, 8, 32, 32]);
    std::fs::remove_file(&path).ok();
}

#[test]
fn full_imagenet_parameter_count_matches_release() {
    let cfg = DiffitConfig::imagenet(32);
    assert_eq!(cfg.num_parameters(), 561_035_232);
    let (required, optional) = cfg.expected_tensors();
    assert_eq!(required.len() + optional.len(), 346);
}

#[test]
fn truncated_file_names_the_tensor() {
    let bytes = std::fs::read(fixture("diffit_tiny_model.safetensors")).unwrap();
    let path = tmp("truncated.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = WeightsFile::open(&path)
        .err()
        .expect("truncated file must be refused");
    assert!(matches!(err, WeightsError::Truncated { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("tensor '") && msg.contains("truncated"),
        "{msg}"
    );
    // A file cut inside its header is refused too, with the reason.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let msg = WeightsFile::open(&path).err().unwrap().to_string();
    assert!(msg.contains("header"), "{msg}");
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let mut map = fixture_tensors();
    map.insert(
        "blocks.1.mlp.fc2.weight".into(),
        Tensor::zeros((64, 255), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = tmp("wrong-shape.safetensors");
    save(&map, &path);
    let msg = load_err(&path);
    assert!(msg.contains("blocks.1.mlp.fc2.weight"), "{msg}");
    assert!(
        msg.contains("[64, 255]") && msg.contains("[64, 256]"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let mut map = fixture_tensors();
    map.remove("blocks.0.attn.qkv_temb.bias");
    let path = tmp("missing.safetensors");
    save(&map, &path);
    let msg = load_err(&path);
    assert!(
        msg.contains("blocks.0.attn.qkv_temb.bias") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let mut map = fixture_tensors();
    map.insert(
        "blocks.0.attn.extra".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = tmp("extra.safetensors");
    save(&map, &path);
    let msg = load_err(&path);
    assert!(
        msg.contains("blocks.0.attn.extra") && msg.contains("unexpected"),
        "{msg}"
    );
}

#[test]
fn nan_weights_are_refused() {
    let mut map = fixture_tensors();
    let mut v = vec![0.1f32; 64 * 256];
    v[17] = f32::NAN;
    map.insert(
        "blocks.0.mlp.fc1.weight".into(),
        Tensor::from_vec(v, (256, 64), &Device::Cpu).unwrap(),
    );
    let path = tmp("nan.safetensors");
    save(&map, &path);
    let msg = load_err(&path);
    assert!(
        msg.contains("blocks.0.mlp.fc1.weight") && msg.contains("NaN"),
        "{msg}"
    );
}

#[test]
fn vae_loads_legacy_attention_names_and_conv_shapes() {
    let file = WeightsFile::open(fixture("vae_tiny_model.safetensors")).unwrap();
    let mut legacy = HashMap::new();
    for name in file.tensors().keys() {
        if name.starts_with("encoder.") || name.starts_with("quant_conv.") {
            continue; // serving must not need the encoder
        }
        let t = file.load(name).unwrap();
        let renamed = name
            .replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.");
        let t = if renamed != *name && t.rank() == 2 {
            let (o, i) = t.dims2().unwrap();
            t.reshape((o, i, 1, 1)).unwrap()
        } else {
            t
        };
        legacy.insert(renamed, t);
    }
    assert!(legacy.keys().any(|k| k.ends_with("proj_attn.weight")));
    let path = tmp("vae_legacy_model.safetensors");
    save(&legacy, &path);
    std::fs::copy(
        fixture("vae_tiny_config.json"),
        tmp("vae_legacy_config.json"),
    )
    .unwrap();
    let g = common::golden("vae_tiny_golden.safetensors");
    let vae = VaeDecoder::load(
        &WeightsFile::open(&path).unwrap(),
        None,
        DType::F32,
        &Device::Cpu,
        &KernelOptions::default(),
    )
    .unwrap();
    let e = common::rel_err(&vae.decode(&g["z"]).unwrap(), &g["decoded"]);
    assert!(e <= 1e-4, "legacy-layout decode rel err {e}");
}

#[test]
fn vae_missing_decoder_tensor_is_named() {
    let file = WeightsFile::open(fixture("vae_tiny_model.safetensors")).unwrap();
    let mut map = HashMap::new();
    for name in file.tensors().keys() {
        if name != "decoder.up_blocks.1.resnets.0.conv2.bias" {
            map.insert(name.clone(), file.load(name).unwrap());
        }
    }
    let path = tmp("vae_missing_model.safetensors");
    save(&map, &path);
    std::fs::copy(
        fixture("vae_tiny_config.json"),
        tmp("vae_missing_config.json"),
    )
    .unwrap();
    let err = VaeDecoder::load(
        &WeightsFile::open(&path).unwrap(),
        None,
        DType::F32,
        &Device::Cpu,
        &KernelOptions::default(),
    )
    .err()
    .expect("missing tensor must be refused");
    assert!(
        err.to_string()
            .contains("decoder.up_blocks.1.resnets.0.conv2.bias"),
        "{err}"
    );
}
