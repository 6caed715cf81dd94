//! The VAE decoder's configuration: read off the tensor shapes, plus the two settings shapes
//! cannot tell (norm groups, scaling factor) from a diffusers `config.json` or the file's
//! metadata.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::weights::{WeightsError, WeightsFile};

/// Epsilon of every GroupNorm in the decoder.
pub(super) const NORM_EPS: f64 = 1e-6;
const DEFAULT_NORM_GROUPS: usize = 32;
const DEFAULT_SCALING_FACTOR: f64 = 0.18215;

/// The settings a VAE's shapes cannot tell; read from a diffusers `config.json` (flat, or
/// nested under "config") or the safetensors metadata key "config".
#[derive(Debug, Clone, Deserialize, Default)]
struct ConfigFile {
    norm_num_groups: Option<usize>,
    scaling_factor: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VaeConfig {
    pub latent_channels: usize,
    pub out_channels: usize,
    /// Encoder order (smallest first), as diffusers writes it.
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub mid_attention: bool,
    pub post_quant_conv: bool,
}

impl VaeConfig {
    /// `stabilityai/sd-vae-ft-ema` (kl-f8), the VAE of the released DiffiT models.
    pub fn sd_kl_f8() -> Self {
        Self {
            latent_channels: 4,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: DEFAULT_SCALING_FACTOR,
            mid_attention: true,
            post_quant_conv: true,
        }
    }

    /// Pixels per latent cell along each side.
    pub fn upscale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Decoder channels per level, in decoding order (largest first).
    pub(super) fn decoder_channels(&self) -> Vec<usize> {
        self.block_out_channels.iter().rev().copied().collect()
    }
}

fn parse_config(text: &str) -> Option<ConfigFile> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let inner = v.get("config").cloned().unwrap_or(v);
    serde_json::from_value(inner).ok()
}

/// Looks for the side configuration: the explicit path, the file's metadata, `config.json`
/// beside it, or `<name>_config.json` for a file named `<name>_model.safetensors`.
fn find_config(file: &WeightsFile, explicit: Option<&Path>) -> Result<ConfigFile, WeightsError> {
    let read = |p: &Path| -> Result<ConfigFile, WeightsError> {
        let text = std::fs::read_to_string(p).map_err(|error| WeightsError::Io {
            path: p.to_path_buf(),
            error,
        })?;
        parse_config(&text).ok_or_else(|| WeightsError::Header {
            path: p.to_path_buf(),
            reason: "VAE config is not a JSON object with diffusers config keys".into(),
        })
    };
    if let Some(p) = explicit {
        return read(p);
    }
    if let Some(cfg) = file.metadata().get("config").and_then(|t| parse_config(t)) {
        return Ok(cfg);
    }
    let path = file.path();
    let dir = path.parent().unwrap_or(Path::new("."));
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let candidates: Vec<PathBuf> = vec![
        dir.join("config.json"),
        dir.join(format!("{}_config.json", stem.trim_end_matches("_model"))),
    ];
    for c in candidates {
        if c.is_file() {
            return read(&c);
        }
    }
    Ok(ConfigFile::default())
}

fn count_indexed(file: &WeightsFile, prefix: &str) -> usize {
    file.tensors()
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

impl VaeConfig {
    /// The configuration of the VAE in `file`, with the side settings from `explicit` (a
    /// `config.json`) or found beside the file (see `find_config`).
    pub fn read(file: &WeightsFile, explicit: Option<&Path>) -> Result<Self, WeightsError> {
        Self::infer(file, &find_config(file, explicit)?)
    }

    fn infer(file: &WeightsFile, side: &ConfigFile) -> Result<Self, WeightsError> {
        let conv_in = file.required_shape("decoder.conv_in.weight", 4)?;
        let conv_out = file.required_shape("decoder.conv_out.weight", 4)?;
        let levels = count_indexed(file, "decoder.up_blocks.");
        if levels == 0 {
            return Err(file.invalid("no 'decoder.up_blocks.*' tensors: not an AutoencoderKL"));
        }
        let mut block_out_channels = Vec::with_capacity(levels);
        for i in 0..levels {
            let name = format!("decoder.up_blocks.{i}.resnets.0.conv2.weight");
            block_out_channels.push(file.required_shape(&name, 4)?[0]);
        }
        block_out_channels.reverse();
        let resnets = count_indexed(file, "decoder.up_blocks.0.resnets.");
        let norm_num_groups = side.norm_num_groups.unwrap_or(DEFAULT_NORM_GROUPS);
        if let Some(bad) = block_out_channels
            .iter()
            .find(|&&c| c % norm_num_groups != 0)
        {
            return Err(file.invalid(format!(
                "VAE channel count {bad} is not divisible by norm_num_groups {norm_num_groups} \
                 (set it in the VAE's config.json)"
            )));
        }
        Ok(Self {
            latent_channels: conv_in[1],
            out_channels: conv_out[0],
            block_out_channels,
            layers_per_block: resnets.saturating_sub(1),
            norm_num_groups,
            scaling_factor: side.scaling_factor.unwrap_or(DEFAULT_SCALING_FACTOR),
            mid_attention: file
                .tensors()
                .keys()
                .any(|k| k.starts_with("decoder.mid_block.attentions.0.")),
            post_quant_conv: file.shape("post_quant_conv.weight").is_some(),
        })
    }
}
