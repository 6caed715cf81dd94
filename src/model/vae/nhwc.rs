//! The VAE decoder channels-last ([B, H, W, C]) through the fused kernels. Every activation is
//! a [pixels, channels] matrix, so a 3×3 convolution is `im2col3x3` + one cuBLAS matmul whose
//! output is already in layout, the bias (and a residual) go into that matmul, and GroupNorm +
//! SiLU is one op. The 128-channel convolutions skip the im2col buffer: they run as implicit
//! GEMMs (`kernels::conv3x3_implicit`), where that beats im2col + cuBLAS. candle's NCHW conv2d
//! (im2col of its own plus layout copies) and its GroupNorm (a chain of broadcast ops) made the
//! decoder >10× slower than diffusers on an H100 (docs/perf.md).
//!
//! Built from the same checkpoint keys as the NCHW decoder (`nchw.rs`), with the weights laid
//! out for the matmuls at load; only one of the two is ever built (`VaeDecoder`).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{VaeConfig, NORM_EPS};
use crate::config::KernelOptions;
use crate::kernels::{self, Activation};

/// A convolution as a matmul over its im2col columns: weight [Cout, k·k·Cin] in (ky, kx, c)
/// order, bias [Cout].
struct ConvMat {
    mat: LinearMat,
    kernel: usize,
    /// For a convolution after nearest ×2 upsampling: the 2×2 phase weights [4, Cout, 4·Cin]
    /// (`kernels::up2_phase_weights`), where the input channels fit the phase kernels.
    phases: Option<Tensor>,
    /// 3×3 as an implicit GEMM where the kernel takes it (`KernelOptions::implicit_gemm_conv`).
    implicit: bool,
    /// The implicit GEMM's kernel (`KernelOptions::conv_tiling`).
    tiling: kernels::ConvTiling,
}

impl ConvMat {
    /// A k×k convolution (k = 1 or 3, stride 1, "same" padding): `weight` [Cout, Cin, k, k]
    /// and `bias` [Cout] under `vb`.
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        k: KernelOptions,
    ) -> Result<Self> {
        let w = vb.get((cout, cin, kernel, kernel), "weight")?;
        Self::from_nchw(&w, vb.get(cout, "bias")?, k)
    }

    fn from_nchw(w: &Tensor, bias: Tensor, k: KernelOptions) -> Result<Self> {
        let (o, i, kh, kw) = w.dims4()?;
        if kh != kw || !(kh == 1 || kh == 3) {
            candle_core::bail!("channels-last VAE: unsupported convolution {kh}×{kw}");
        }
        let weight = w
            .permute((0, 2, 3, 1))?
            .reshape((o, kh * kw * i))?
            .contiguous()?;
        Ok(Self {
            mat: LinearMat::new(weight, bias, k.lt_epilogue),
            kernel: kh,
            phases: None,
            implicit: k.implicit_gemm_conv && o <= k.implicit_gemm_conv_max_cout,
            tiling: k.conv_tiling,
        })
    }

    /// A 3×3 convolution that follows a nearest ×2 upsampling: it runs as four 2×2 phase
    /// convolutions of the low-resolution input (2.25× fewer FLOPs and im2col bytes) when the
    /// input and output channels are multiples of 8 (the kernels' 16-byte packs).
    fn new_after_upsampling(vb: VarBuilder, ch: usize, k: KernelOptions) -> Result<Self> {
        let w = vb.get((ch, ch, 3, 3), "weight")?;
        let mut c = Self::from_nchw(&w, vb.get(ch, "bias")?, k)?;
        if ch.is_multiple_of(8) {
            c.phases = Some(kernels::up2_phase_weights(&w)?.contiguous()?);
        }
        Ok(c)
    }

    /// x [B, H, W, Cin] → [B, H·up, W·up, Cout], plus `residual` (same shape as the output).
    fn forward(&self, x: &Tensor, up: usize, residual: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        if let (2, None, Some(phases)) = (up, residual, &self.phases) {
            let y = kernels::im2col_up2_phases(x)?.matmul(&phases.transpose(1, 2)?)?;
            return kernels::pixel_shuffle_bias(&y, &self.mat.bias, b, h, w);
        }
        if up == 1 && self.takes_small(x, residual) {
            return kernels::conv3x3_small(x, &self.mat.weight, &self.mat.bias);
        }
        if up == 1 && self.takes_implicit(x) {
            return kernels::conv3x3_implicit(
                x,
                &self.mat.weight,
                &self.mat.bias,
                residual,
                self.tiling,
            );
        }
        let cout = self.out_channels();
        let (ho, wo) = (h * up, w * up);
        let cols = match self.kernel {
            3 => kernels::im2col3x3(x, up)?,
            _ if up == 1 => x.reshape((b * h * w, c))?,
            _ => candle_core::bail!("channels-last VAE: a 1×1 convolution does not upsample"),
        };
        let res = residual
            .map(|r| r.reshape((b * ho * wo, cout)))
            .transpose()?;
        self.mat
            .forward(&cols, res.as_ref())?
            .reshape((b, ho, wo, cout))
    }

    /// `forward(&silu(norm(x)), 1, residual)`. Where that convolution takes the im2col path on
    /// the GPU, the GroupNorm + SiLU writes the im2col columns itself
    /// (`kernels::group_norm_silu_im2col3x3`: the same bits, one pass fewer over the activation);
    /// the hidden environment variable DIFFIT_GN_IM2COL=0 turns that off (for measuring).
    fn forward_normed(
        &self,
        x: &Tensor,
        norm: &GroupNormMat,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        static FUSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let fuse = *FUSE.get_or_init(|| std::env::var("DIFFIT_GN_IM2COL").as_deref() != Ok("0"));
        let on_im2col = self.kernel == 3
            && x.device().is_cuda()
            && !self.takes_small(x, residual)
            && !self.takes_implicit(x);
        if !(fuse && on_im2col) {
            return self.forward(&norm.forward(x, true)?, 1, residual);
        }
        let (b, h, w, _) = x.dims4()?;
        let cout = self.out_channels();
        let cols = kernels::group_norm_silu_im2col3x3(
            x,
            &norm.weight,
            &norm.bias,
            norm.groups,
            NORM_EPS as f32,
        )?;
        let res = residual.map(|r| r.reshape((b * h * w, cout))).transpose()?;
        self.mat
            .forward(&cols, res.as_ref())?
            .reshape((b, h, w, cout))
    }

    /// A 3×3 convolution without upsampling that runs as `kernels::conv3x3_small` (at most 4
    /// output channels, no residual). On the GPU only: the CPU fallback is a plain loop, slower
    /// than im2col + a threaded gemm.
    fn takes_small(&self, x: &Tensor, residual: Option<&Tensor>) -> bool {
        let c = x.dim(candle_core::D::Minus1).unwrap_or(0);
        self.kernel == 3
            && residual.is_none()
            && x.device().is_cuda()
            && kernels::conv3x3_small_fits(c, self.out_channels())
    }

    /// A 3×3 convolution without upsampling that runs as `kernels::conv3x3_implicit`.
    fn takes_implicit(&self, x: &Tensor) -> bool {
        self.kernel == 3 && self.implicit && kernels::conv3x3_implicit_fits(x, self.out_channels())
    }

    fn out_channels(&self) -> usize {
        self.mat.weight.dim(0).unwrap_or(0)
    }
}

struct GroupNormMat {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNormMat {
    fn new(vb: VarBuilder, groups: usize, ch: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(ch, "weight")?,
            bias: vb.get(ch, "bias")?,
            groups,
        })
    }

    fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        kernels::group_norm(
            x,
            &self.weight,
            &self.bias,
            self.groups,
            NORM_EPS as f32,
            silu,
        )
    }
}

struct Resnet {
    norm1: GroupNormMat,
    conv1: ConvMat,
    norm2: GroupNormMat,
    conv2: ConvMat,
    conv_shortcut: Option<ConvMat>,
}

impl Resnet {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        groups: usize,
        k: KernelOptions,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNormMat::new(vb.pp("norm1"), groups, cin)?,
            conv1: ConvMat::new(vb.pp("conv1"), cin, cout, 3, k)?,
            norm2: GroupNormMat::new(vb.pp("norm2"), groups, cout)?,
            conv2: ConvMat::new(vb.pp("conv2"), cout, cout, 3, k)?,
            conv_shortcut: if cin != cout {
                Some(ConvMat::new(vb.pp("conv_shortcut"), cin, cout, 1, k)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward_normed(x, &self.norm1, None)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x, 1, None)?,
            None => x.clone(),
        };
        self.conv2.forward_normed(&h, &self.norm2, Some(&skip))
    }
}

/// A linear layer on [rows, K]: weight [Cout, K], bias [Cout].
struct LinearMat {
    weight: Tensor,
    bias: Tensor,
    /// Bias and residual inside the cuBLASLt matmul (`KernelOptions::lt_epilogue`).
    lt_epilogue: bool,
}

impl LinearMat {
    fn new(weight: Tensor, bias: Tensor, lt_epilogue: bool) -> Self {
        Self {
            weight,
            bias,
            lt_epilogue,
        }
    }

    /// `weight` [dim, dim] and `bias` [dim] under `vb`.
    fn square(vb: VarBuilder, dim: usize, lt_epilogue: bool) -> Result<Self> {
        Ok(Self::new(
            vb.get((dim, dim), "weight")?,
            vb.get(dim, "bias")?,
            lt_epilogue,
        ))
    }

    /// x·Wᵀ + b (+ residual): the bias (and residual) inside the matmul on the GPU.
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        match residual {
            None => kernels::linear_bias_act(
                x,
                &self.weight,
                &self.bias,
                Activation::Identity,
                self.lt_epilogue,
            ),
            Some(r) => {
                kernels::linear_bias_residual(x, &self.weight, &self.bias, r, self.lt_epilogue)
            }
        }
    }
}

/// Single-head spatial self-attention of the mid block.
struct Attention {
    group_norm: GroupNormMat,
    to_q: LinearMat,
    to_k: LinearMat,
    to_v: LinearMat,
    to_out: LinearMat,
}

impl Attention {
    fn new(vb: VarBuilder, ch: usize, groups: usize, k: KernelOptions) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNormMat::new(vb.pp("group_norm"), groups, ch)?,
            to_q: LinearMat::square(vb.pp("to_q"), ch, k.lt_epilogue)?,
            to_k: LinearMat::square(vb.pp("to_k"), ch, k.lt_epilogue)?,
            to_v: LinearMat::square(vb.pp("to_v"), ch, k.lt_epilogue)?,
            to_out: LinearMat::square(vb.pp("to_out.0"), ch, k.lt_epilogue)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let n = h * w;
        let tokens = self.group_norm.forward(x, false)?.reshape((b * n, c))?;
        let q = self.to_q.forward(&tokens, None)?.reshape((b, n, c))?;
        let k = self.to_k.forward(&tokens, None)?.reshape((b, n, c))?;
        let v = self.to_v.forward(&tokens, None)?.reshape((b, n, c))?;
        let no_bias = Tensor::zeros((1, n), x.dtype(), x.device())?;
        let probs = kernels::softmax_bias(&q.matmul(&k.t()?)?, &no_bias, 1.0 / (c as f32).sqrt())?;
        let attn = probs.matmul(&v)?.reshape((b * n, c))?;
        self.to_out
            .forward(&attn, Some(&x.reshape((b * n, c))?))?
            .reshape((b, h, w, c))
    }
}

/// `decoder.up_blocks.{i}`: resnets, then (but for the last level) the ×2 upsampling conv.
struct UpBlock {
    resnets: Vec<Resnet>,
    upsampler: Option<ConvMat>,
}

/// `post_quant_conv` and `decoder.*`, channels-last.
pub(super) struct Decoder {
    post_quant_conv: Option<ConvMat>,
    conv_in: ConvMat,
    mid_resnets: [Resnet; 2],
    mid_attention: Option<Attention>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNormMat,
    conv_out: ConvMat,
    /// Output channels up to which the 3×3 convolutions run as implicit GEMMs (0: none; the
    /// option, on a GPU, in bf16/f16): those make no im2col buffer, so a pass may take more
    /// latents (`max_batch`).
    implicit_max_cout: usize,
}

impl Decoder {
    /// `vb` is the file's root (`post_quant_conv` sits beside `decoder`).
    pub(super) fn new(vb: VarBuilder, cfg: &VaeConfig, k: KernelOptions) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        let chans = cfg.decoder_channels();
        let (Some(&top), Some(&bottom)) = (chans.first(), chans.last()) else {
            candle_core::bail!("a VAE decoder needs at least one level");
        };
        let lat = cfg.latent_channels;
        let post_quant_conv = if cfg.post_quant_conv {
            Some(ConvMat::new(vb.pp("post_quant_conv"), lat, lat, 1, k)?)
        } else {
            None
        };
        let d = vb.pp("decoder");
        let mid = d.pp("mid_block");
        let mid_resnets = [
            Resnet::new(mid.pp("resnets.0"), top, top, groups, k)?,
            Resnet::new(mid.pp("resnets.1"), top, top, groups, k)?,
        ];
        let mid_attention = if cfg.mid_attention {
            Some(Attention::new(mid.pp("attentions.0"), top, groups, k)?)
        } else {
            None
        };
        let mut up_blocks = Vec::with_capacity(chans.len());
        let mut cin = top;
        for (i, &cout) in chans.iter().enumerate() {
            let ub = d.pp("up_blocks").pp(i);
            let mut resnets = Vec::with_capacity(cfg.layers_per_block + 1);
            for j in 0..=cfg.layers_per_block {
                resnets.push(Resnet::new(ub.pp("resnets").pp(j), cin, cout, groups, k)?);
                cin = cout;
            }
            let upsampler = if i + 1 < chans.len() {
                Some(ConvMat::new_after_upsampling(
                    ub.pp("upsamplers.0.conv"),
                    cout,
                    k,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsampler });
        }
        Ok(Self {
            post_quant_conv,
            conv_in: ConvMat::new(d.pp("conv_in"), lat, top, 3, k)?,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: GroupNormMat::new(d.pp("conv_norm_out"), groups, bottom)?,
            conv_out: ConvMat::new(d.pp("conv_out"), bottom, cfg.out_channels, 3, k)?,
            implicit_max_cout: if k.implicit_gemm_conv
                && vb.device().is_cuda()
                && matches!(vb.dtype(), DType::BF16 | DType::F16)
            {
                k.implicit_gemm_conv_max_cout
            } else {
                0
            },
        })
    }

    /// Most latents of `latent_hw` one pass may take (`max_batch` for this decoder's paths).
    pub(super) fn max_batch(&self, cfg: &VaeConfig, latent_hw: (usize, usize)) -> usize {
        max_batch(cfg, latent_hw, self.implicit_max_cout)
    }

    /// Scaled latents [B, C, h, w] in the run dtype → f32 pixels [B, out, h·f, w·f], in one
    /// pass: the caller keeps B within `max_batch`.
    pub(super) fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = z.permute((0, 2, 3, 1))?.contiguous()?;
        if let Some(c) = &self.post_quant_conv {
            x = c.forward(&x, 1, None)?;
        }
        x = self.conv_in.forward(&x, 1, None)?;
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
                x = conv.forward(&x, 2, None)?;
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&x, true)?, 1, None)?
            .permute((0, 3, 1, 2))?
            .to_dtype(candle_core::DType::F32)?
            .contiguous()
    }
}

/// Most elements one im2col buffer may hold: the kernels index it with 32 bits, and it stays a
/// few GB at most.
const MAX_IM2COL_ELEMS: usize = 1 << 31;

/// Most latents of `h`×`w` one pass may take: the largest buffer a pass makes (elements per
/// latent pixel, over the convolutions of `cfg`'s decoder) times the batch must stay within
/// `MAX_IM2COL_ELEMS`. With im2col that is a 3×3 convolution's column matrix, 9·Cin per output
/// pixel: 14 latents of 32×32 for kl-f8 (ImageNet-256), 3 of 64×64 (512). The convolutions with
/// at most `implicit_max_cout` outputs run as implicit GEMMs and make no columns; with all of
/// them so, only the upsampling convolutions' phase columns (4·C per output pixel), the input
/// convolution's (4 latent channels do not fit the kernel) and the activations remain.
pub(super) fn max_batch(
    cfg: &VaeConfig,
    (h, w): (usize, usize),
    implicit_max_cout: usize,
) -> usize {
    let chans = cfg.decoder_channels();
    let implicit = implicit_max_cout > 0;
    // Elements per output pixel of a 3×3 convolution from `cin` to `cout` channels.
    let conv3 = |cin: usize, cout: usize| {
        if cout <= implicit_max_cout && kernels::conv3x3_implicit_channels_fit(cin, cout) {
            cin.max(cout)
        } else {
            9 * cin.max(cout)
        }
    };
    let mut scale = 1usize;
    let mut most = 9 * cfg.latent_channels;
    let mut cin = chans.first().copied().unwrap_or(0);
    for (i, &cout) in chans.iter().enumerate() {
        // Each resnet's conv1 reads its input channels, conv2 its output channels.
        most = most.max(scale * scale * conv3(cin, cout));
        cin = cout;
        if i + 1 < chans.len() {
            scale *= 2;
            let per_pixel = if implicit { 4 * cout } else { 9 * cout };
            most = most.max(scale * scale * per_pixel);
        }
    }
    // conv_out: the direct kernel (no columns) on the GPU where it fits.
    let out_per_pixel = if implicit && kernels::conv3x3_small_fits(cin, cfg.out_channels) {
        cin
    } else {
        9 * cin
    };
    let per_image = (most.max(scale * scale * out_per_pixel) * h * w).max(1);
    (MAX_IM2COL_ELEMS / per_image).max(1)
}
