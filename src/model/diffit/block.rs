//! One DiffiT block (`blocks.{i}`): time-dependent multi-head self-attention (TMSA) and the MLP,
//! each with its plain candle path (the readable reference) and its fused-kernel path side by
//! side, chosen at construction. Plus `QkvTemb`, the time-dependent half of every block's qkv.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::DiffitConfig;
use super::layers::{BlockDense, Kernels, LayerNorm, Linear};
use super::network::Tracer;
use crate::config::BlockLinear;
use crate::kernels::{self, Activation};

/// Every block's `attn.qkv_temb` (c·W_tembᵀ + b_temb, one [3D] vector per sample) in one layer:
/// the weights stacked to [depth·3D, D], each block's `attn.qkv.bias` folded into the bias. One
/// per-sample matmul then makes every block's qkv bias at once, before the blocks (one launch,
/// not one per block), and this is the only copy of those weights (223 MB at ImageNet-256 in
/// bf16): block i reads columns i·3D..(i+1)·3D of the result.
#[derive(Debug, Clone)]
pub struct QkvTemb {
    stacked: Linear,
    width: usize,
    lt_epilogue: bool,
}

impl QkvTemb {
    /// `vb` is the `blocks` prefix.
    pub fn new(vb: VarBuilder, cfg: &DiffitConfig, kernels: Kernels) -> Result<Self> {
        let (d, width) = (cfg.hidden_size, 3 * cfg.hidden_size);
        let mut weights = Vec::with_capacity(cfg.depth);
        let mut biases = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let attn = vb.pp(i).pp("attn");
            let temb = attn.pp("qkv_temb");
            weights.push(temb.get((width, d), "weight")?);
            biases.push((temb.get(width, "bias")? + attn.pp("qkv").get(width, "bias")?)?);
        }
        Ok(Self {
            stacked: Linear::from_parts(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?)),
            width,
            lt_epilogue: kernels.lt_epilogue,
        })
    }

    /// The per-sample qkv biases of every block for conditioning `c` [B, D]: [B, depth·3D].
    pub fn forward(&self, c: &Tensor) -> Result<Tensor> {
        self.stacked.forward_per_sample(c, self.lt_epilogue)
    }

    /// Block `i`'s [B, 3D] columns of `forward`'s output (a view).
    pub fn block(&self, all: &Tensor, i: usize) -> Result<Tensor> {
        all.narrow(1, i * self.width, self.width)
    }
}

/// `attn`: TMSA. qkv = LN(x)·W_qkvᵀ + (per-sample bias from `QkvTemb`), softmax with a learned
/// relative-position bias per head, then `proj`.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Weight only: its bias is folded into `QkvTemb`.
    qkv: BlockDense,
    proj: BlockDense,
    /// `relative_position_bias_table` gathered by the relative-position index at load:
    /// [heads·N, N] (softmax row r of a sample takes row r mod heads·N).
    rel_bias: Tensor,
    num_heads: usize,
    kernels: Kernels,
}

impl Attention {
    /// `index`: the relative-position index [N·N] (u32) on the device.
    pub fn new(
        vb: VarBuilder,
        cfg: &DiffitConfig,
        index: &Tensor,
        kernels: Kernels,
    ) -> Result<Self> {
        let (d, heads, n) = (cfg.hidden_size, cfg.num_heads, cfg.num_tokens());
        let w = 2 * cfg.grid() - 1;
        let rel_bias = vb
            .get((w * w, heads), "relative_position_bias_table")?
            .index_select(index, 0)?
            .reshape((n, n, heads))?
            .permute((2, 0, 1))?
            .contiguous()?
            .reshape((heads * n, n))?;
        Ok(Self {
            qkv: BlockDense::new(vb.pp("qkv"), d, 3 * d, false, BlockLinear::Qkv, kernels)?,
            proj: BlockDense::new(vb.pp("proj"), d, d, true, BlockLinear::Proj, kernels)?,
            rel_bias,
            num_heads: heads,
            kernels,
        })
    }

    /// `x + attention(norm(x))` for tokens `x` [B, N, D] and the block's per-sample qkv bias
    /// `qkv_bias` [B, 3D]. An FP8 qkv computes the norm in its quantising kernel.
    pub fn forward(&self, x: &Tensor, norm: &LayerNorm, qkv_bias: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(2)? / self.num_heads;
        let residual = x;
        if self.kernels.fused {
            // From the qkv matmul's output: the per-sample bias, the head split, the scores with
            // the relative-position bias and the softmax in `kernels::attention` (one
            // flash-attention kernel where it fits); then proj with its bias and the residual
            // inside the matmul.
            let ctx = kernels::attention(
                &self
                    .qkv
                    .forward_normed_no_bias(x, norm, self.kernels.lt_epilogue)?,
                qkv_bias,
                &self.rel_bias,
                self.num_heads,
                1.0 / (head_dim as f32).sqrt(),
                self.kernels.flash_attention,
            )?;
            return self
                .proj
                .forward_residual(&ctx, residual, self.kernels.lt_epilogue);
        }
        residual + self.forward_plain(&norm.forward(x)?, qkv_bias)?
    }

    fn forward_plain(&self, x: &Tensor, qkv_bias: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let (heads, hd) = (self.num_heads, d / self.num_heads);
        let qkv = self
            .qkv
            .forward_no_bias(x)?
            .broadcast_add(&qkv_bias.unsqueeze(1)?)?;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .reshape((b, n, heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (split(0)? * (1.0 / (hd as f64).sqrt()))?;
        let k = split(1)?;
        let v = split(2)?;
        let scores = q
            .matmul(&k.t()?)?
            .broadcast_add(&self.rel_bias.reshape((1, heads, n, n))?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        self.proj.forward(&ctx)
    }
}

/// `mlp`: fc1 → GELU (tanh approximation) → fc2.
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: BlockDense,
    fc2: BlockDense,
    kernels: Kernels,
}

impl Mlp {
    pub fn new(vb: VarBuilder, cfg: &DiffitConfig, kernels: Kernels) -> Result<Self> {
        let (d, m) = (cfg.hidden_size, cfg.mlp_hidden);
        Ok(Self {
            fc1: BlockDense::new(vb.pp("fc1"), d, m, true, BlockLinear::Fc1, kernels)?,
            fc2: BlockDense::new(vb.pp("fc2"), m, d, true, BlockLinear::Fc2, kernels)?,
            kernels,
        })
    }

    /// `x + mlp(norm(x))`. An FP8 fc1 computes the norm in its quantising kernel.
    pub fn forward(&self, x: &Tensor, norm: &LayerNorm) -> Result<Tensor> {
        let lt = self.kernels.lt_epilogue;
        if self.kernels.fused {
            // Bias + GELU, and bias + residual, inside the two matmuls.
            let lt_gelu = lt && self.kernels.lt_gelu_epilogue;
            let hidden = self
                .fc1
                .forward_normed_act(x, norm, Activation::GeluTanh, lt_gelu)?;
            return self.fc2.forward_residual(&hidden, x, lt);
        }
        x + self
            .fc2
            .forward(&self.fc1.forward(&norm.forward(x)?)?.gelu()?)?
    }
}

/// `blocks.{i}`: x + attn(LN(x)), then + mlp(LN(·)).
#[derive(Debug, Clone)]
pub struct Block {
    attn: Attention,
    mlp: Mlp,
    norm: LayerNorm,
    /// The checkpoint prefix (`blocks.{i}`): names this block's activations in a trace.
    name: String,
}

impl Block {
    pub fn new(
        vb: VarBuilder,
        cfg: &DiffitConfig,
        index: &Tensor,
        norm: LayerNorm,
        kernels: Kernels,
    ) -> Result<Self> {
        Ok(Self {
            attn: Attention::new(vb.pp("attn"), cfg, index, kernels)?,
            mlp: Mlp::new(vb.pp("mlp"), cfg, kernels)?,
            norm,
            name: vb.prefix(),
        })
    }

    /// `qkv_bias`: this block's columns of `QkvTemb::forward`. Records the attention and MLP
    /// branches and the block output when tracing.
    pub fn forward(&self, x: &Tensor, qkv_bias: &Tensor, trace: &mut Tracer) -> Result<Tensor> {
        let h = self.attn.forward(x, &self.norm, qkv_bias)?;
        let out = self.mlp.forward(&h, &self.norm)?;
        if trace.on() {
            // The branches as the reference records them, recovered from the sums.
            trace.record(&format!("{}.attn", self.name), &(&h - x)?);
            trace.record(&format!("{}.mlp", self.name), &(&out - &h)?);
            trace.record(&self.name, &out);
        }
        Ok(out)
    }
}
