//! The DiffiT layers outside the blocks: the dense layer every module uses, the patch, timestep
//! and class embeddings, the final layer, and the affine-free LayerNorm.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{DiffitConfig, TIME_FREQ_DIM};
use crate::config::{BlockLinear, Fp8Layers, KernelOptions};
use crate::kernels::{self, Activation, Flash, Fp8Scaling, Fp8Weight, Prologue};

/// LayerNorm epsilon of every (affine-free) norm in the network.
const LN_EPS: f32 = 1e-6;

/// The kernel choices a forward makes, resolved for the device once, at construction.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    /// LayerNorm, the blocks and the patch embedding through the fused ops of `crate::kernels`
    /// instead of plain candle ops (the readable reference they are tested against).
    pub fused: bool,
    /// Fused path: which attention kernel (CUDA, bf16/f16; `Off`: the unfused ops).
    pub flash_attention: Flash,
    /// Biases, GELU and residual adds inside the cuBLASLt matmul (CUDA, bf16/f16).
    pub lt_epilogue: bool,
    /// With `lt_epilogue`: fc1's bias + GELU in cuBLASLt's GELU_BIAS epilogue too (else its
    /// matmul and then our bias + GELU kernel).
    pub lt_gelu_epilogue: bool,
    /// The block linear layers that run in FP8 (none unless `--dtype fp8`).
    pub fp8_layers: Fp8Layers,
    /// Under FP8: the first and last this many blocks stay bf16.
    fp8_edge_blocks: usize,
    /// Where FP8 layers apply their scales and epilogue (CUDA).
    pub fp8_scaling: Fp8Scaling,
}

impl Kernels {
    pub fn resolve(options: &KernelOptions, device: &Device) -> Self {
        Self {
            fused: options.fused.on_for(device),
            flash_attention: match (options.flash_attention, options.wgmma_attention.rows()) {
                (false, _) => Flash::Off,
                (true, None) => Flash::MmaSync,
                (true, Some(rows)) => Flash::Wgmma(rows),
            },
            lt_epilogue: options.lt_epilogue,
            lt_gelu_epilogue: options.lt_gelu_epilogue,
            fp8_layers: match options.fp8 {
                true => options.fp8_layers,
                false => Fp8Layers::NONE,
            },
            fp8_edge_blocks: options.fp8_edge_blocks,
            fp8_scaling: options.fp8_scaling,
        }
    }

    /// The choices for block `i` of `depth`: no FP8 in the edge blocks kept in bf16.
    pub fn for_block(self, i: usize, depth: usize) -> Self {
        let edge = self.fp8_edge_blocks;
        match i < edge || i + edge >= depth {
            true => Self {
                fp8_layers: Fp8Layers::NONE,
                ..self
            },
            false => self,
        }
    }
}

/// A dense layer `x·Wᵀ + b` that always multiplies as a 2-D matrix (faster than a batched
/// matmul over a broadcast weight).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` [out, in] and `bias` [out] under `vb`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: Some(vb.get(out_dim, "bias")?),
        })
    }

    /// Only the weight: for a layer whose bias is added elsewhere (see `block::QkvTemb`).
    pub fn new_no_bias(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: None,
        })
    }

    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The bias, or zeros for a layer without one (the fused kernels always take one).
    fn bias_or_zeros(&self) -> Result<Tensor> {
        match &self.bias {
            Some(b) => Ok(b.clone()),
            None => Tensor::zeros(
                self.weight.dim(0)?,
                self.weight.dtype(),
                self.weight.device(),
            ),
        }
    }

    pub fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        kernels::linear_no_bias(x, &self.weight, false)
    }

    /// `act(x·Wᵀ + b)` with the bias and activation in the matmul's output pass (fused kernels).
    pub fn forward_act(&self, x: &Tensor, act: Activation, lt_epilogue: bool) -> Result<Tensor> {
        kernels::linear_bias_act(x, &self.weight, &self.bias_or_zeros()?, act, lt_epilogue)
    }

    /// `residual + x·Wᵀ + b` with the bias and residual in the matmul's output pass (fused kernels).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        lt_epilogue: bool,
    ) -> Result<Tensor> {
        kernels::linear_bias_residual(
            x,
            &self.weight,
            &self.bias_or_zeros()?,
            residual,
            lt_epilogue,
        )
    }

    /// `forward` for a few per-sample rows [B, K], computed in fixed-shape chunks of
    /// `per_sample_rows` (zero-padded). Matmul kernels pick their reduction order by shape,
    /// so a sample's conditioning must not see B: this keeps its image independent of which
    /// other samples share the batch.
    pub fn forward_per_sample(&self, x: &Tensor, lt_epilogue: bool) -> Result<Tensor> {
        let (b, k) = x.dims2()?;
        let chunk_rows = per_sample_rows(x.device());
        let mut parts = Vec::with_capacity(b.div_ceil(chunk_rows));
        for start in (0..b).step_by(chunk_rows) {
            let rows = chunk_rows.min(b - start);
            let mut chunk = x.narrow(0, start, rows)?;
            if rows < chunk_rows {
                let pad = Tensor::zeros((chunk_rows - rows, k), x.dtype(), x.device())?;
                chunk = Tensor::cat(&[&chunk, &pad], 0)?;
            }
            let y = match (&self.bias, x.device().is_cuda()) {
                // The bias inside the matmul (cuBLASLt epilogue): no broadcast pass.
                (Some(bias), true) => kernels::linear_bias_act(
                    &chunk,
                    &self.weight,
                    bias,
                    Activation::Identity,
                    lt_epilogue,
                )?,
                _ => self.forward(&chunk)?,
            };
            parts.push(y.narrow(0, 0, rows)?);
        }
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        Tensor::cat(&parts, 0)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_no_bias(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// A block's linear layer in FP8: the e4m3 weight with per-output-channel scales (quantised
/// from the checkpoint's own values at load) and the bias in the run dtype (zeros for a layer
/// without one). See `kernels::fp8_linear`.
#[derive(Debug, Clone)]
pub struct Fp8Linear {
    weight: Fp8Weight,
    bias: Tensor,
    scaling: Fp8Scaling,
}

impl Fp8Linear {
    fn forward(
        &self,
        x: &Tensor,
        prologue: Prologue,
        act: Activation,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        kernels::fp8_linear(
            x,
            &self.weight,
            &self.bias,
            prologue,
            act,
            residual,
            self.scaling,
        )
    }

    /// `act(LN(x)·Wᵀ + b)`: on the fused path the norm is computed by the kernel that
    /// quantises x; on the plain path by `norm` first.
    fn forward_normed(&self, x: &Tensor, norm: &LayerNorm, act: Activation) -> Result<Tensor> {
        match norm.fused {
            true => self.forward(x, Prologue::LayerNorm { eps: LN_EPS }, act, None),
            false => self.forward(&norm.forward(x)?, Prologue::Quantize, act, None),
        }
    }
}

/// A DiffiT block's linear layer (qkv, proj, fc1, fc2): bf16 (or the run dtype), or FP8 under
/// `--dtype fp8` for the layers `--fp8-layers` names whose dims FP8 matmuls take (multiples of
/// 16; others stay in the run dtype).
#[derive(Debug, Clone)]
pub enum BlockDense {
    Dense(Linear),
    Fp8(Fp8Linear),
}

impl BlockDense {
    /// `weight` [out, in] (and `bias` [out] when `bias`) under `vb`, in FP8 when `kernels`
    /// says so for `layer`.
    pub fn new(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        layer: BlockLinear,
        kernels: Kernels,
    ) -> Result<Self> {
        if !(kernels.fp8_layers.contains(layer) && kernels::fp8_fits(out_dim, in_dim)) {
            return Ok(Self::Dense(match bias {
                true => Linear::new(vb, in_dim, out_dim)?,
                false => Linear::new_no_bias(vb, in_dim, out_dim)?,
            }));
        }
        // Quantised from the stored values (f32 for the checkpoints we ship), not from their
        // run-dtype rounding.
        let w =
            vb.get_with_hints_dtype((out_dim, in_dim), "weight", Default::default(), DType::F32)?;
        let bias = match bias {
            true => vb.get(out_dim, "bias")?,
            false => Tensor::zeros(out_dim, vb.dtype(), vb.device())?,
        };
        Ok(Self::Fp8(Fp8Linear {
            weight: Fp8Weight::quantize(&w)?,
            bias,
            scaling: kernels.fp8_scaling,
        }))
    }

    /// `x·Wᵀ` (the bias left to the caller; an FP8 layer made without one adds zeros).
    pub fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward_no_bias(x),
            Self::Fp8(l) => l.forward(x, Prologue::Quantize, Activation::Identity, None),
        }
    }

    /// `LN(x)·Wᵀ` (no bias; fused paths): the norm folded into the quantisation in FP8; in
    /// bf16/f16 on CUDA with `lt` the tuned cuBLASLt matmul.
    pub fn forward_normed_no_bias(&self, x: &Tensor, norm: &LayerNorm, lt: bool) -> Result<Tensor> {
        match self {
            Self::Dense(l) => kernels::linear_no_bias(&norm.forward(x)?, &l.weight, lt),
            Self::Fp8(l) => l.forward_normed(x, norm, Activation::Identity),
        }
    }

    /// `act(LN(x)·Wᵀ + b)` (fused paths): the norm folded into the quantisation in FP8.
    pub fn forward_normed_act(
        &self,
        x: &Tensor,
        norm: &LayerNorm,
        act: Activation,
        lt_epilogue: bool,
    ) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward_act(&norm.forward(x)?, act, lt_epilogue),
            Self::Fp8(l) => l.forward_normed(x, norm, act),
        }
    }

    /// `residual + x·Wᵀ + b` (fused paths).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        residual: &Tensor,
        lt_epilogue: bool,
    ) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward_residual(x, residual, lt_epilogue),
            Self::Fp8(l) => l.forward(x, Prologue::Quantize, Activation::Identity, Some(residual)),
        }
    }
}

impl Module for BlockDense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward(x),
            Self::Fp8(l) => l.forward(x, Prologue::Quantize, Activation::Identity, None),
        }
    }
}

/// Row count of every per-sample (conditioning) matmul; see `Linear::forward_per_sample`.
/// On a GPU such a matmul is bound by reading its weight (all blocks' conditioning projection
/// is 223 MB at ImageNet-256), once a chunk: 16-row chunks made a B = 64 guided step read it
/// 8 times (0.9 ms on an H100), so GPU chunks are 128 rows (a guided batch of 64 images). On the CPU
/// the cost grows with the padding, so chunks stay small there.
fn per_sample_rows(device: &Device) -> usize {
    if device.is_cuda() {
        128
    } else {
        16
    }
}

/// LayerNorm without affine parameters (eps 1e-6), as every norm of the network is.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Plain path: candle's layer_norm takes a weight and a bias; ones and zeros [D].
    ones: Tensor,
    zeros: Tensor,
    fused: bool,
}

impl LayerNorm {
    pub fn new(dim: usize, dtype: DType, device: &Device, kernels: Kernels) -> Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, dtype, device)?,
            zeros: Tensor::zeros(dim, dtype, device)?,
            fused: kernels.fused,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused {
            return kernels::layer_norm(x, LN_EPS);
        }
        candle_nn::ops::layer_norm(x, &self.ones, &self.zeros, LN_EPS)
    }
}

/// `x_embedder`: the patch convolution (kernel = stride = patch) as a matmul over flattened
/// patches.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// `proj` reshaped from [D, C, p, p] to [D, C·p·p].
    proj: Linear,
    in_channels: usize,
    patch: usize,
    grid: usize,
}

impl PatchEmbed {
    pub fn new(vb: VarBuilder, cfg: &DiffitConfig) -> Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.in_channels, cfg.patch_size);
        let vb = vb.pp("proj");
        let weight = vb.get((d, c, p, p), "weight")?.reshape((d, c * p * p))?;
        Ok(Self {
            proj: Linear::from_parts(weight, Some(vb.get(d, "bias")?)),
            in_channels: c,
            patch: p,
            grid: cfg.grid(),
        })
    }

    /// The patch bias, for the network to sum with the position embedding once at load.
    pub fn bias(&self) -> Option<&Tensor> {
        self.proj.bias.as_ref()
    }

    /// [B, C, g·p, g·p] → [B, g·g, C·p·p] in (c, kh, kw) order.
    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, (g, p)) = (x.dim(0)?, (self.grid, self.patch));
        x.reshape(vec![b, self.in_channels, g, p, g, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b, g * g, self.in_channels * p * p))
    }

    /// Fused path: the patch matmul, then one pass that adds `pos_bias` (the patch bias plus
    /// the position embedding, [1, N·D], summed at load: two broadcast adds took 1.4 ms of a
    /// B = 64 step on an H100).
    pub fn forward_plus(&self, x: &Tensor, pos_bias: &Tensor) -> Result<Tensor> {
        let y = self.proj.forward_no_bias(&self.patchify(x)?)?;
        let (b, n, d) = y.dims3()?;
        kernels::bias_act(
            &y.reshape((b, n * d))?,
            pos_bias,
            b,
            Activation::Identity,
            None,
        )?
        .reshape((b, n, d))
    }
}

impl Module for PatchEmbed {
    /// Tokens [B, N, D], without the position embedding.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.patchify(x)?)
    }
}

/// `t_embedder`: sinusoidal features, then `mlp.0`, SiLU, `mlp.2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    mlp0: Linear,
    mlp2: Linear,
    lt_epilogue: bool,
}

impl TimestepEmbedder {
    pub fn new(vb: VarBuilder, cfg: &DiffitConfig, kernels: Kernels) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            mlp0: Linear::new(vb.pp("mlp.0"), TIME_FREQ_DIM, d)?,
            mlp2: Linear::new(vb.pp("mlp.2"), d, d)?,
            lt_epilogue: kernels.lt_epilogue,
        })
    }

    /// The features of model timesteps `t` [B, 256] (f32), for the trace.
    pub fn features(&self, t: &[i64], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(timestep_features(t), (t.len(), TIME_FREQ_DIM), device)
    }

    /// Embeddings [B, D] in the weights' dtype from the features; per sample (see
    /// `Linear::forward_per_sample`).
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let lt = self.lt_epilogue;
        let h = self
            .mlp0
            .forward_per_sample(&features.to_dtype(self.mlp0.weight.dtype())?, lt)?;
        self.mlp2.forward_per_sample(&candle_nn::ops::silu(&h)?, lt)
    }
}

/// Sinusoidal timestep features [cos(t·f_k), sin(t·f_k)], computed in f32 exactly as the
/// reference does so the embedding matches it bit-for-bit where libm agrees.
pub fn timestep_features(t: &[i64]) -> Vec<f32> {
    let half = TIME_FREQ_DIM / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| (neg_log * k as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * TIME_FREQ_DIM);
    for &ti in t {
        let args: Vec<f32> = freqs.iter().map(|f| ti as f32 * f).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
    }
    out
}

/// `y_embedder`: one row per class plus the null class (the last row).
#[derive(Debug, Clone)]
pub struct LabelEmbedder {
    embedding_table: Tensor,
}

impl LabelEmbedder {
    pub fn new(vb: VarBuilder, cfg: &DiffitConfig) -> Result<Self> {
        Ok(Self {
            embedding_table: vb.get(
                (cfg.num_classes + 1, cfg.hidden_size),
                "embedding_table.weight",
            )?,
        })
    }

    /// `labels` (already range-checked by the network) as the u32 index `forward` takes.
    pub fn labels(&self, labels: &[i64]) -> Result<Tensor> {
        let labels: Vec<u32> = labels.iter().map(|&v| v as u32).collect();
        Tensor::new(labels, self.embedding_table.device())
    }

    /// Rows for the u32 labels `index` [B], [B, D].
    pub fn forward(&self, index: &Tensor) -> Result<Tensor> {
        self.embedding_table.index_select(index, 0)
    }
}

/// `final_layer`: LN → SiLU → `linear` (D → patch²·out_channels) per token.
#[derive(Debug, Clone)]
pub struct FinalLayer {
    norm: LayerNorm,
    linear: Linear,
}

impl FinalLayer {
    pub fn new(vb: VarBuilder, cfg: &DiffitConfig, norm: LayerNorm) -> Result<Self> {
        let p = cfg.patch_size;
        Ok(Self {
            norm,
            linear: Linear::new(vb.pp("linear"), cfg.hidden_size, p * p * cfg.out_channels)?,
        })
    }
}

impl Module for FinalLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear
            .forward(&candle_nn::ops::silu(&self.norm.forward(x)?)?)
    }
}
