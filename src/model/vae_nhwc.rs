//! The VAE decoder channels-last ([B, H, W, C]) through the fused kernels. Every activation is
//! a [pixels, channels] matrix, so a 3×3 convolution is `im2col3x3` + one cuBLAS matmul whose
//! output is already in layout, the bias (and a residual) go into that matmul, and GroupNorm +
//! SiLU is one op. candle's NCHW conv2d (im2col of its own plus
//! layout copies) and its GroupNorm (a chain of broadcast ops) made the decoder >10× slower
//! than diffusers on an H100 (docs/perf.md).

use candle_core::{DType, Tensor};
use candle_nn::Conv2d;

use super::vae::{AttentionBlock, Norm, ResnetBlock, VaeDecoder, NORM_EPS};
use crate::kernels::{self, Activation};

type Result<T> = candle_core::Result<T>;

/// Most elements one im2col buffer may hold (keeps the kernels' 32-bit indexing and the
/// buffer a few GB at most); the decoder runs in chunks of images that fit.
const MAX_IM2COL_ELEMS: usize = 1 << 31;
/// Most images decoded at once.
const MAX_CHUNK: usize = 8;

/// A convolution as a matmul over its im2col columns: weight [Cout, k·k·Cin] in (ky, kx, c)
/// order, bias [Cout].
struct ConvMat {
    mat: LinearMat,
    kernel: usize,
    /// For a convolution after nearest ×2 upsampling: the 2×2 phase weights [4, Cout, 4·Cin]
    /// (`kernels::up2_phase_weights`), where the input channels fit the phase kernels.
    phases: Option<Tensor>,
}

impl ConvMat {
    fn new(conv: &Conv2d, lt_epilogue: bool) -> Result<Self> {
        let w = conv.weight();
        let (o, i, kh, kw) = w.dims4()?;
        let cfg = conv.config();
        let supported = kh == kw
            && (kh == 1 || kh == 3)
            && cfg.padding == kh / 2
            && cfg.stride == 1
            && cfg.dilation == 1
            && cfg.groups == 1;
        if !supported {
            candle_core::bail!(
                "channels-last VAE: unsupported convolution {kh}×{kw} padding {} stride {}",
                cfg.padding,
                cfg.stride
            );
        }
        let weight = w
            .permute((0, 2, 3, 1))?
            .reshape((o, kh * kw * i))?
            .contiguous()?;
        Ok(Self {
            mat: LinearMat::new(weight, conv.bias(), lt_epilogue)?,
            kernel: kh,
            phases: None,
        })
    }

    /// A 3×3 convolution that follows a nearest ×2 upsampling: it runs as four 2×2 phase
    /// convolutions of the low-resolution input (2.25× fewer FLOPs and im2col bytes) when the
    /// input and output channels are multiples of 8 (the kernels' 16-byte packs).
    fn new_after_upsampling(conv: &Conv2d, lt_epilogue: bool) -> Result<Self> {
        let mut c = Self::new(conv, lt_epilogue)?;
        let out_channels = c.out_channels();
        if c.kernel == 3 && c.in_channels().is_multiple_of(8) && out_channels.is_multiple_of(8) {
            c.phases = Some(kernels::up2_phase_weights(conv.weight())?.contiguous()?);
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
        let cout = self.out_channels();
        // On the GPU only: the CPU fallback is a plain loop, slower than im2col + a threaded gemm.
        if self.kernel == 3
            && up == 1
            && residual.is_none()
            && x.device().is_cuda()
            && kernels::conv3x3_small_fits(c, cout)
        {
            return kernels::conv3x3_small(x, &self.mat.weight, &self.mat.bias);
        }
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

    fn in_channels(&self) -> usize {
        self.mat.weight.dim(1).unwrap_or(0) / (self.kernel * self.kernel)
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
    fn new(n: &Norm) -> Self {
        Self {
            weight: n.weight.clone(),
            bias: n.bias.clone(),
            groups: n.groups,
        }
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
    shortcut: Option<ConvMat>,
}

impl Resnet {
    fn new(r: &ResnetBlock, lt_epilogue: bool) -> Result<Self> {
        Ok(Self {
            norm1: GroupNormMat::new(&r.norm1),
            conv1: ConvMat::new(&r.conv1, lt_epilogue)?,
            norm2: GroupNormMat::new(&r.norm2),
            conv2: ConvMat::new(&r.conv2, lt_epilogue)?,
            shortcut: r
                .shortcut
                .as_ref()
                .map(|c| ConvMat::new(c, lt_epilogue))
                .transpose()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?, 1, None)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x, 1, None)?,
            None => x.clone(),
        };
        self.conv2
            .forward(&self.norm2.forward(&h, true)?, 1, Some(&skip))
    }
}

/// A linear layer on [rows, K]: weight [Cout, K], bias [Cout] (zeros for a layer without one).
struct LinearMat {
    weight: Tensor,
    bias: Tensor,
    /// Bias and residual inside the cuBLASLt matmul (`KernelOptions::lt_epilogue`).
    lt_epilogue: bool,
}

impl LinearMat {
    fn new(weight: Tensor, bias: Option<&Tensor>, lt_epilogue: bool) -> Result<Self> {
        let bias = match bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?,
        };
        Ok(Self {
            weight,
            bias,
            lt_epilogue,
        })
    }

    fn from_linear(l: &candle_nn::Linear, lt_epilogue: bool) -> Result<Self> {
        Self::new(l.weight().clone(), l.bias(), lt_epilogue)
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

struct Attention {
    norm: GroupNormMat,
    q: LinearMat,
    k: LinearMat,
    v: LinearMat,
    out: LinearMat,
}

impl Attention {
    fn new(a: &AttentionBlock, lt_epilogue: bool) -> Result<Self> {
        Ok(Self {
            norm: GroupNormMat::new(&a.norm),
            q: LinearMat::from_linear(&a.q, lt_epilogue)?,
            k: LinearMat::from_linear(&a.k, lt_epilogue)?,
            v: LinearMat::from_linear(&a.v, lt_epilogue)?,
            out: LinearMat::from_linear(&a.out, lt_epilogue)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let n = h * w;
        let tokens = self.norm.forward(x, false)?.reshape((b * n, c))?;
        let q = self.q.forward(&tokens, None)?.reshape((b, n, c))?;
        let k = self.k.forward(&tokens, None)?.reshape((b, n, c))?;
        let v = self.v.forward(&tokens, None)?.reshape((b, n, c))?;
        let no_bias = Tensor::zeros((1, n), x.dtype(), x.device())?;
        let probs = kernels::softmax_bias(&q.matmul(&k.t()?)?, &no_bias, 1.0 / (c as f32).sqrt())?;
        let attn = probs.matmul(&v)?.reshape((b * n, c))?;
        self.out
            .forward(&attn, Some(&x.reshape((b * n, c))?))?
            .reshape((b, h, w, c))
    }
}

pub(super) struct NhwcDecoder {
    post_quant_conv: Option<ConvMat>,
    conv_in: ConvMat,
    mid: Vec<Resnet>,
    mid_attn: Option<Attention>,
    /// Each level's resnets, and its upsampling convolution if it has one.
    up: Vec<(Vec<Resnet>, Option<ConvMat>)>,
    norm_out: GroupNormMat,
    conv_out: ConvMat,
    /// Largest im2col buffer per image, in elements, for a latent side of 1 (scales with h·w).
    im2col_per_pixel: usize,
}

impl NhwcDecoder {
    pub(super) fn new(d: &VaeDecoder, lt_epilogue: bool) -> Result<Self> {
        let up =
            d.up.iter()
                .map(|u| {
                    Ok((
                        u.resnets
                            .iter()
                            .map(|r| Resnet::new(r, lt_epilogue))
                            .collect::<Result<Vec<_>>>()?,
                        u.upsample
                            .as_ref()
                            .map(|c| ConvMat::new_after_upsampling(c, lt_epilogue))
                            .transpose()?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
        let mut dec = Self {
            post_quant_conv: d
                .post_quant_conv
                .as_ref()
                .map(|c| ConvMat::new(c, lt_epilogue))
                .transpose()?,
            conv_in: ConvMat::new(&d.conv_in, lt_epilogue)?,
            mid: d
                .mid
                .iter()
                .map(|r| Resnet::new(r, lt_epilogue))
                .collect::<Result<_>>()?,
            mid_attn: d
                .mid_attn
                .as_ref()
                .map(|a| Attention::new(a, lt_epilogue))
                .transpose()?,
            up,
            norm_out: GroupNormMat::new(&d.norm_out),
            conv_out: ConvMat::new(&d.conv_out, lt_epilogue)?,
            im2col_per_pixel: 0,
        };
        dec.im2col_per_pixel = dec.largest_im2col_per_latent_pixel();
        Ok(dec)
    }

    /// The largest 9·Cin·(output pixels per latent pixel) over the 3×3 convolutions.
    fn largest_im2col_per_latent_pixel(&self) -> usize {
        let mut scale = 1usize;
        let mut most = 9 * self.conv_in.in_channels();
        for (resnets, upsample) in &self.up {
            for r in resnets {
                most = most.max(scale * scale * 9 * r.conv1.in_channels());
                most = most.max(scale * scale * 9 * r.conv2.in_channels());
            }
            if let Some(c) = upsample {
                scale *= 2;
                most = most.max(scale * scale * 9 * c.in_channels());
            }
        }
        most.max(scale * scale * 9 * self.conv_out.in_channels())
    }

    /// z: scaled latents [B, C, h, w] in the run dtype → f32 pixels [B, out, h·f, w·f].
    pub(super) fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = z.dims4()?;
        let per_image = (self.im2col_per_pixel * h * w).max(1);
        let chunk = (MAX_IM2COL_ELEMS / per_image).clamp(1, MAX_CHUNK);
        let nhwc = z.permute((0, 2, 3, 1))?.contiguous()?;
        let mut parts = Vec::with_capacity(b.div_ceil(chunk));
        for start in (0..b).step_by(chunk) {
            let n = chunk.min(b - start);
            parts.push(self.decode_nhwc(&nhwc.narrow(0, start, n)?)?);
        }
        let out = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 0)?
        };
        out.permute((0, 3, 1, 2))?
            .to_dtype(DType::F32)?
            .contiguous()
    }

    fn decode_nhwc(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = match &self.post_quant_conv {
            Some(c) => c.forward(z, 1, None)?,
            None => z.clone(),
        };
        x = self.conv_in.forward(&x, 1, None)?;
        x = self.mid[0].forward(&x)?;
        if let Some(a) = &self.mid_attn {
            x = a.forward(&x)?;
        }
        for r in &self.mid[1..] {
            x = r.forward(&x)?;
        }
        for (resnets, upsample) in &self.up {
            for r in resnets {
                x = r.forward(&x)?;
            }
            if let Some(conv) = upsample {
                x = conv.forward(&x, 2, None)?;
            }
        }
        self.conv_out
            .forward(&self.norm_out.forward(&x, true)?, 1, None)
    }
}
