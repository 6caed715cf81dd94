//! The decoder half of a diffusers `AutoencoderKL` (kl-f8 for the ImageNet models).
//!
//! Written here rather than taken from candle-transformers because serving needs what its
//! `AutoEncoderKL` does not give: loading without the encoder's tensors, the legacy attention
//! names (also stored as 1×1 convolutions), a configuration read off the shapes, and decoding in
//! bounded chunks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::Deserialize;

use super::weights::{WeightsError, WeightsFile};
use crate::config::KernelOptions;

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
        1 << (self.block_out_channels.len() - 1)
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

/// Renames legacy attention keys to the current ones and flattens 1×1-conv-shaped
/// attention weights to linear ones.
fn normalize_key(name: &str, t: Tensor) -> candle_core::Result<(String, Tensor)> {
    const LEGACY: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    let mut name = name.to_string();
    if name.contains(".attentions.") {
        for (old, new) in LEGACY {
            name = name.replace(old, new);
        }
        if t.rank() == 4 {
            let (o, i, _, _) = t.dims4()?;
            return Ok((name, t.reshape((o, i))?));
        }
    }
    Ok((name, t))
}

/// GroupNorm whose parameters stay reachable (the channels-last path reads them).
pub(super) struct Norm {
    gn: candle_nn::GroupNorm,
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) groups: usize,
}

impl Norm {
    fn new(vb: VarBuilder, groups: usize, ch: usize) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(ch, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(ch, "bias", candle_nn::Init::Const(0.0))?;
        let gn = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), ch, groups, NORM_EPS)?;
        Ok(Self {
            gn,
            weight,
            bias,
            groups,
        })
    }
}

impl Module for Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.gn.forward(x)
    }
}

pub(super) struct ResnetBlock {
    pub(super) norm1: Norm,
    pub(super) conv1: Conv2d,
    pub(super) norm2: Norm,
    pub(super) conv2: Conv2d,
    pub(super) shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> candle_core::Result<Self> {
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            norm1: Norm::new(vb.pp("norm1"), groups, cin)?,
            conv1: candle_nn::conv2d(cin, cout, 3, pad1, vb.pp("conv1"))?,
            norm2: Norm::new(vb.pp("norm2"), groups, cout)?,
            conv2: candle_nn::conv2d(cout, cout, 3, pad1, vb.pp("conv2"))?,
            shortcut: if cin != cout {
                Some(candle_nn::conv2d(
                    cin,
                    cout,
                    1,
                    Default::default(),
                    vb.pp("conv_shortcut"),
                )?)
            } else {
                None
            },
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// Single-head spatial self-attention of the mid block.
pub(super) struct AttentionBlock {
    pub(super) norm: Norm,
    pub(super) q: candle_nn::Linear,
    pub(super) k: candle_nn::Linear,
    pub(super) v: candle_nn::Linear,
    pub(super) out: candle_nn::Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, ch: usize, groups: usize) -> candle_core::Result<Self> {
        Ok(Self {
            norm: Norm::new(vb.pp("group_norm"), groups, ch)?,
            q: candle_nn::linear(ch, ch, vb.pp("to_q"))?,
            k: candle_nn::linear(ch, ch, vb.pp("to_k"))?,
            v: candle_nn::linear(ch, ch, vb.pp("to_v"))?,
            out: candle_nn::linear(ch, ch, vb.pp("to_out.0"))?,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.q.forward(&tokens)?;
        let k = self.k.forward(&tokens)?;
        let v = self.v.forward(&tokens)?;
        let scores = (q.matmul(&k.t()?)? / (c as f64).sqrt())?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let out = self
            .out
            .forward(&attn)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + x
    }
}

pub(super) struct UpBlock {
    pub(super) resnets: Vec<ResnetBlock>,
    pub(super) upsample: Option<Conv2d>,
}

pub struct VaeDecoder {
    config: VaeConfig,
    dtype: DType,
    device: Device,
    pub(super) post_quant_conv: Option<Conv2d>,
    pub(super) conv_in: Conv2d,
    pub(super) mid: Vec<ResnetBlock>,
    pub(super) mid_attn: Option<AttentionBlock>,
    pub(super) up: Vec<UpBlock>,
    pub(super) norm_out: Norm,
    pub(super) conv_out: Conv2d,
    kernels: KernelOptions,
    /// The channels-last decoder through the fused kernels (`set_fused`).
    nhwc: Option<super::vae_nhwc::NhwcDecoder>,
}

impl VaeDecoder {
    /// Loads `decoder.*` and `post_quant_conv.*`; encoder tensors, if present, are ignored.
    pub fn load(
        file: &WeightsFile,
        config_path: Option<&Path>,
        dtype: DType,
        device: &Device,
        kernels: &KernelOptions,
    ) -> Result<Self, WeightsError> {
        let side = find_config(file, config_path)?;
        let config = VaeConfig::infer(file, &side)?;
        let mut tensors = HashMap::new();
        for name in file.tensors().keys() {
            if !(name.starts_with("decoder.") || name.starts_with("post_quant_conv.")) {
                continue;
            }
            let t = file.load_f32_finite(name)?;
            let (key, t) = normalize_key(name, t).map_err(|e| file.tensor_err(name, e))?;
            tensors.insert(key, t);
        }
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Self::build(vb, config, dtype, device, kernels)
            .map_err(|e| file.invalid(format!("VAE: {e}")))
    }

    /// A decoder of `config` with random weights (for benchmarks).
    pub fn random(
        config: VaeConfig,
        dtype: DType,
        device: &Device,
        kernels: &KernelOptions,
    ) -> candle_core::Result<Self> {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        Self::build(vb, config, dtype, device, kernels)
    }

    fn build(
        vb: VarBuilder,
        config: VaeConfig,
        dtype: DType,
        device: &Device,
        kernels: &KernelOptions,
    ) -> candle_core::Result<Self> {
        let groups = config.norm_num_groups;
        let chans: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let lat = config.latent_channels;
        let post_quant_conv = if config.post_quant_conv {
            Some(candle_nn::conv2d(
                lat,
                lat,
                1,
                Default::default(),
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        let d = vb.pp("decoder");
        let top = chans[0];
        let conv_in = candle_nn::conv2d(lat, top, 3, pad1, d.pp("conv_in"))?;
        let mid = vec![
            ResnetBlock::new(d.pp("mid_block.resnets.0"), top, top, groups)?,
            ResnetBlock::new(d.pp("mid_block.resnets.1"), top, top, groups)?,
        ];
        let mid_attn = if config.mid_attention {
            Some(AttentionBlock::new(
                d.pp("mid_block.attentions.0"),
                top,
                groups,
            )?)
        } else {
            None
        };
        let mut up = Vec::with_capacity(chans.len());
        let mut cin = top;
        for (i, &cout) in chans.iter().enumerate() {
            let ub = d.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::new();
            for j in 0..=config.layers_per_block {
                resnets.push(ResnetBlock::new(
                    ub.pp(format!("resnets.{j}")),
                    cin,
                    cout,
                    groups,
                )?);
                cin = cout;
            }
            let upsample = if i + 1 < chans.len() {
                Some(candle_nn::conv2d(
                    cout,
                    cout,
                    3,
                    pad1,
                    ub.pp("upsamplers.0.conv"),
                )?)
            } else {
                None
            };
            up.push(UpBlock { resnets, upsample });
        }
        let bottom = *chans.last().expect("at least one level");
        Ok(Self {
            norm_out: Norm::new(d.pp("conv_norm_out"), groups, bottom)?,
            conv_out: candle_nn::conv2d(bottom, config.out_channels, 3, pad1, d.pp("conv_out"))?,
            post_quant_conv,
            conv_in,
            mid,
            mid_attn,
            up,
            config,
            dtype,
            device: device.clone(),
            kernels: *kernels,
            nhwc: None,
        })
        .and_then(|mut d| {
            d.set_fused(kernels.fused.on_for(device))?;
            Ok(d)
        })
    }

    /// Decodes channels-last through the fused kernels (`crate::kernels`: 3×3 convolutions as
    /// im2col + one matmul with the nearest upsampling folded into the im2col, GroupNorm + SiLU
    /// in one op, biases and residual adds in the matmul's output pass) instead of candle's
    /// NCHW conv2d and GroupNorm. On by default on CUDA (`KernelOptions::fused`); on the
    /// CPU the kernels' fallbacks compute the same.
    pub fn set_fused(&mut self, on: bool) -> candle_core::Result<()> {
        self.nhwc = if on {
            Some(super::vae_nhwc::NhwcDecoder::new(
                self,
                self.kernels.lt_epilogue,
            )?)
        } else {
            None
        };
        Ok(())
    }

    pub fn is_fused(&self) -> bool {
        self.nhwc.is_some()
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `decode(z / scaling_factor)` for sampled latents z [B, C, h, w]; returns f32 pixels in
    /// roughly [-1, 1], [B, out_channels, h·f, w·f].
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = (z.to_dtype(DType::F32)? / self.config.scaling_factor)?.to_dtype(self.dtype)?;
        if let Some(nhwc) = &self.nhwc {
            return nhwc.decode(&z);
        }
        let mut x = match &self.post_quant_conv {
            Some(c) => c.forward(&z)?,
            None => z,
        };
        x = self.conv_in.forward(&x)?;
        x = self.mid[0].forward(&x)?;
        if let Some(a) = &self.mid_attn {
            x = a.forward(&x)?;
        }
        x = self.mid[1].forward(&x)?;
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = &block.upsample {
                let (_, _, h, w) = x.dims4()?;
                x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        x = self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)?;
        x.to_dtype(DType::F32)
    }

    /// Decodes in chunks of at most `chunk` latents so memory stays bounded at any batch size.
    pub fn decode_chunked(&self, z: &Tensor, chunk: usize) -> candle_core::Result<Tensor> {
        let b = z.dim(0)?;
        let chunk = chunk.max(1);
        if b <= chunk {
            return self.decode(z);
        }
        let parts = (0..b)
            .step_by(chunk)
            .map(|s| self.decode(&z.narrow(0, s, chunk.min(b - s))?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }
}

/// clamp((x + 1)·127.5, 0, 255) truncated to u8, as the reference converts decoded images.
pub fn to_pixels(decoded: &Tensor) -> candle_core::Result<Vec<u8>> {
    let v = decoded
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(v.iter()
        .map(|&x| ((x + 1.0) * 127.5).clamp(0.0, 255.0) as u8)
        .collect())
}
