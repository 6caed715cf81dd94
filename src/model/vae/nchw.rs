//! The VAE decoder in plain candle ops on NCHW tensors: the readable reference the
//! channels-last path (`nhwc.rs`) is tested against. Written here rather than taken from
//! candle-transformers because serving needs what its `AutoEncoderKL` does not give: loading
//! without the encoder's tensors, the legacy attention names, a configuration read off the shapes.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};

use super::config::{VaeConfig, NORM_EPS};

const PAD1: Conv2dConfig = Conv2dConfig {
    padding: 1,
    stride: 1,
    dilation: 1,
    groups: 1,
    cudnn_fwd_algo: None,
};

fn group_norm(vb: VarBuilder, groups: usize, ch: usize) -> Result<GroupNorm> {
    GroupNorm::new(
        vb.get(ch, "weight")?,
        vb.get(ch, "bias")?,
        ch,
        groups,
        NORM_EPS,
    )
}

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), groups, cin)?,
            conv1: candle_nn::conv2d(cin, cout, 3, PAD1, vb.pp("conv1"))?,
            norm2: group_norm(vb.pp("norm2"), groups, cout)?,
            conv2: candle_nn::conv2d(cout, cout, 3, PAD1, vb.pp("conv2"))?,
            conv_shortcut: if cin != cout {
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
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// Single-head spatial self-attention of the mid block.
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: candle_nn::Linear,
    to_k: candle_nn::Linear,
    to_v: candle_nn::Linear,
    to_out: candle_nn::Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, ch: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(vb.pp("group_norm"), groups, ch)?,
            to_q: candle_nn::linear(ch, ch, vb.pp("to_q"))?,
            to_k: candle_nn::linear(ch, ch, vb.pp("to_k"))?,
            to_v: candle_nn::linear(ch, ch, vb.pp("to_v"))?,
            to_out: candle_nn::linear(ch, ch, vb.pp("to_out.0"))?,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let scores = (q.matmul(&k.t()?)? / (c as f64).sqrt())?;
        let attn = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let out = self
            .to_out
            .forward(&attn)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + x
    }
}

/// `decoder.up_blocks.{i}`: resnets, then (but for the last level) nearest ×2 and a 3×3 conv.
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

/// `post_quant_conv` and `decoder.*`, NCHW.
pub(super) struct Decoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: Option<AttentionBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// `vb` is the file's root (`post_quant_conv` sits beside `decoder`).
    pub(super) fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        let chans = cfg.decoder_channels();
        let (Some(&top), Some(&bottom)) = (chans.first(), chans.last()) else {
            candle_core::bail!("a VAE decoder needs at least one level");
        };
        let lat = cfg.latent_channels;
        let post_quant_conv = if cfg.post_quant_conv {
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
        let mid = d.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::new(mid.pp("resnets.0"), top, top, groups)?,
            ResnetBlock::new(mid.pp("resnets.1"), top, top, groups)?,
        ];
        let mid_attention = if cfg.mid_attention {
            Some(AttentionBlock::new(mid.pp("attentions.0"), top, groups)?)
        } else {
            None
        };
        let mut up_blocks = Vec::with_capacity(chans.len());
        let mut cin = top;
        for (i, &cout) in chans.iter().enumerate() {
            let ub = d.pp("up_blocks").pp(i);
            let mut resnets = Vec::with_capacity(cfg.layers_per_block + 1);
            for j in 0..=cfg.layers_per_block {
                resnets.push(ResnetBlock::new(ub.pp("resnets").pp(j), cin, cout, groups)?);
                cin = cout;
            }
            let upsampler = if i + 1 < chans.len() {
                Some(candle_nn::conv2d(
                    cout,
                    cout,
                    3,
                    PAD1,
                    ub.pp("upsamplers.0.conv"),
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        Ok(Self {
            post_quant_conv,
            conv_in: candle_nn::conv2d(lat, top, 3, PAD1, d.pp("conv_in"))?,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: group_norm(d.pp("conv_norm_out"), groups, bottom)?,
            conv_out: candle_nn::conv2d(bottom, cfg.out_channels, 3, PAD1, d.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    /// Scaled latents [B, C, h, w] in the run dtype → pixels [B, out, h·f, w·f], run dtype.
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        x = self.conv_in.forward(&x)?;
        x = self.mid_resnets[0].forward(&x)?;
        if let Some(a) = &self.mid_attention {
            x = a.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x)?;
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = &block.upsampler {
                let (_, _, h, w) = x.dims4()?;
                x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&x)?.silu()?)
    }
}
