//! The DiffiT network (isotropic ViT with time-dependent self-attention), written from
//! `spec/diffit.md` §1. Struct fields mirror the checkpoint's module names.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor};

use super::weights::{WeightsError, WeightsFile};
use crate::config::KernelOptions;
use crate::kernels::{self, Activation};

/// LayerNorm epsilon of every (affine-free) norm in the network.
const LN_EPS: f32 = 1e-6;
/// Width of the sinusoidal timestep features fed to `t_embedder.mlp.0`.
const TIME_FREQ_DIM: usize = 256;
/// Number of training timesteps; model timesteps are indices into it.
pub const TRAIN_TIMESTEPS: i64 = 1000;

/// The architecture, read entirely off tensor shapes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiffitConfig {
    /// Latent side length (32 for ImageNet-256).
    pub input_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub hidden_size: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_hidden: usize,
    /// Real classes; the embedding table has one more row, the null class.
    pub num_classes: usize,
    /// 2·in_channels with learned sigma (ε then the variance interpolation v), else in_channels.
    pub out_channels: usize,
}

impl DiffitConfig {
    /// The released ImageNet-256 (latent 32) or -512 (latent 64) architecture.
    pub fn imagenet(latent: usize) -> Self {
        Self {
            input_size: latent,
            patch_size: 2,
            in_channels: 4,
            hidden_size: 1152,
            depth: 28,
            num_heads: 16,
            mlp_hidden: 4608,
            num_classes: 1000,
            out_channels: 8,
        }
    }

    pub fn grid(&self) -> usize {
        self.input_size / self.patch_size
    }

    pub fn num_tokens(&self) -> usize {
        self.grid() * self.grid()
    }

    pub fn learn_sigma(&self) -> bool {
        self.out_channels == 2 * self.in_channels
    }

    pub fn null_class(&self) -> usize {
        self.num_classes
    }

    /// Trainable parameters, as the paper counts them (pos_embed and index buffers excluded).
    pub fn num_parameters(&self) -> usize {
        let (d, p, m) = (self.hidden_size, self.patch_size, self.mlp_hidden);
        let w = 2 * self.grid() - 1;
        let block = 2 * (3 * d * d + 3 * d)
            + (d * d + d)
            + (d * m + m)
            + (m * d + d)
            + w * w * self.num_heads;
        (d * self.in_channels * p * p + d)
            + (d * TIME_FREQ_DIM + d + d * d + d)
            + (self.num_classes + 1) * d
            + self.depth * block
            + (p * p * self.out_channels * d + p * p * self.out_channels)
    }

    pub fn infer(file: &WeightsFile) -> Result<Self, WeightsError> {
        let pe = file.required_shape("x_embedder.proj.weight", 4)?;
        let (hidden_size, in_channels, patch_size) = (pe[0], pe[1], pe[2]);
        if pe[3] != patch_size || patch_size == 0 {
            return Err(file.invalid(format!(
                "x_embedder.proj.weight has shape {pe:?}: the patch must be square"
            )));
        }
        let pos = file.required_shape("pos_embed", 3)?;
        let grid = (pos[1] as f64).sqrt().round() as usize;
        if pos[0] != 1 || grid * grid != pos[1] || grid == 0 {
            return Err(file.invalid(format!(
                "pos_embed has shape {pos:?}: expected [1, N, D] with N a square"
            )));
        }
        let table = file.required_shape("blocks.0.attn.relative_position_bias_table", 2)?;
        let num_heads = table[1];
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(file.invalid(format!(
                "blocks.0.attn.relative_position_bias_table has {num_heads} heads, which do not \
                 divide the hidden size {hidden_size}"
            )));
        }
        let emb = file.required_shape("y_embedder.embedding_table.weight", 2)?;
        if emb[0] < 2 {
            return Err(file.invalid(format!(
                "y_embedder.embedding_table.weight has shape {emb:?}: need at least one class \
                 plus the null row"
            )));
        }
        let fin = file.required_shape("final_layer.linear.weight", 2)?;
        if fin[0] % (patch_size * patch_size) != 0 {
            return Err(file.invalid(format!(
                "final_layer.linear.weight has shape {fin:?}: rows must be patch² × channels"
            )));
        }
        let mlp_hidden = file.required_shape("blocks.0.mlp.fc1.weight", 2)?[0];
        let depth = count_blocks(file)?;
        Ok(Self {
            input_size: grid * patch_size,
            patch_size,
            in_channels,
            hidden_size,
            depth,
            num_heads,
            mlp_hidden,
            num_classes: emb[0] - 1,
            out_channels: fin[0] / (patch_size * patch_size),
        })
    }

    /// Every tensor the checkpoint must hold, with its shape. The I64 index buffers are
    /// optional (they can be recomputed) and returned separately.
    pub fn expected_tensors(&self) -> (BTreeMap<String, Vec<usize>>, BTreeMap<String, Vec<usize>>) {
        let (d, p, m, n) = (
            self.hidden_size,
            self.patch_size,
            self.mlp_hidden,
            self.num_tokens(),
        );
        let w = 2 * self.grid() - 1;
        let mut req: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut add = |k: &str, s: &[usize]| req.insert(k.to_string(), s.to_vec());
        add("pos_embed", &[1, n, d]);
        add("x_embedder.proj.weight", &[d, self.in_channels, p, p]);
        add("x_embedder.proj.bias", &[d]);
        add("t_embedder.mlp.0.weight", &[d, TIME_FREQ_DIM]);
        add("t_embedder.mlp.0.bias", &[d]);
        add("t_embedder.mlp.2.weight", &[d, d]);
        add("t_embedder.mlp.2.bias", &[d]);
        add(
            "y_embedder.embedding_table.weight",
            &[self.num_classes + 1, d],
        );
        add("final_layer.linear.weight", &[p * p * self.out_channels, d]);
        add("final_layer.linear.bias", &[p * p * self.out_channels]);
        let mut opt = BTreeMap::new();
        for i in 0..self.depth {
            let b = format!("blocks.{i}");
            add(
                &format!("{b}.attn.relative_position_bias_table"),
                &[w * w, self.num_heads],
            );
            add(&format!("{b}.attn.qkv_temb.weight"), &[3 * d, d]);
            add(&format!("{b}.attn.qkv_temb.bias"), &[3 * d]);
            add(&format!("{b}.attn.qkv.weight"), &[3 * d, d]);
            add(&format!("{b}.attn.qkv.bias"), &[3 * d]);
            add(&format!("{b}.attn.proj.weight"), &[d, d]);
            add(&format!("{b}.attn.proj.bias"), &[d]);
            add(&format!("{b}.mlp.fc1.weight"), &[m, d]);
            add(&format!("{b}.mlp.fc1.bias"), &[m]);
            add(&format!("{b}.mlp.fc2.weight"), &[d, m]);
            add(&format!("{b}.mlp.fc2.bias"), &[d]);
            opt.insert(format!("{b}.attn.relative_position_index"), vec![n, n]);
        }
        (req, opt)
    }
}

fn count_blocks(file: &WeightsFile) -> Result<usize, WeightsError> {
    let mut depth = 0;
    for name in file.tensors().keys() {
        if let Some(rest) = name.strip_prefix("blocks.") {
            let idx = rest.split('.').next().unwrap_or("");
            let i: usize = idx.parse().map_err(|_| {
                file.invalid(format!("tensor '{name}': block index is not a number"))
            })?;
            depth = depth.max(i + 1);
        }
    }
    if depth == 0 {
        return Err(file.invalid("no 'blocks.*' tensors: not a DiffiT checkpoint"));
    }
    Ok(depth)
}

/// Relative-position index per the spec: for query a and key b on a W×W grid,
/// (r_a − r_b + W − 1)·(2W − 1) + (c_a − c_b + W − 1).
pub fn relative_position_index(grid: usize) -> Vec<u32> {
    let n = grid * grid;
    let w = 2 * grid - 1;
    let mut idx = Vec::with_capacity(n * n);
    for a in 0..n {
        for b in 0..n {
            let (ra, ca) = (a / grid, a % grid);
            let (rb, cb) = (b / grid, b % grid);
            idx.push(((ra + grid - 1 - rb) * w + (ca + grid - 1 - cb)) as u32);
        }
    }
    idx
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

/// A dense layer `x·Wᵀ + b` that always multiplies as a 2-D matrix (faster than a
/// batched matmul over a broadcast weight).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn forward_no_bias(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().expect("rank ≥ 1");
        let rows = x.elem_count() / k;
        let y = x.reshape((rows, k))?.matmul(&self.weight.t()?)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `forward` for a few per-sample rows [B, K], computed in fixed-shape chunks of
    /// `PER_SAMPLE_ROWS` (zero-padded). Matmul kernels pick their reduction order by shape,
    /// so a sample's conditioning must not see B: this keeps its image independent of which
    /// other samples share the batch.
    pub fn forward_per_sample(&self, x: &Tensor, lt_epilogue: bool) -> candle_core::Result<Tensor> {
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

/// A layer's bias, or zeros for a layer without one.
fn bias_or_zeros(l: &Linear) -> candle_core::Result<Tensor> {
    match &l.bias {
        Some(b) => Ok(b.clone()),
        None => Tensor::zeros(l.weight.dim(0)?, l.weight.dtype(), l.weight.device()),
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

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.forward_no_bias(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Where a model's tensors come from: a validated checkpoint, or random values of the right
/// shapes (benchmarks: speed does not depend on the values).
enum Source<'a> {
    File(&'a WeightsFile),
    Random(BTreeMap<String, Vec<usize>>),
}

/// Loads tensors by name, converting to the run dtype and device.
struct Loader<'a> {
    source: Source<'a>,
    dtype: DType,
    device: &'a Device,
}

impl Loader<'_> {
    fn err(&self, name: &str, e: candle_core::Error) -> WeightsError {
        match &self.source {
            Source::File(f) => f.tensor_err(name, e),
            Source::Random(_) => WeightsError::Tensor {
                path: "<random weights>".into(),
                tensor: name.to_string(),
                error: Box::new(e),
            },
        }
    }

    fn get(&self, name: &str) -> Result<Tensor, WeightsError> {
        let t = match &self.source {
            Source::File(f) => f.load_f32_finite(name)?,
            Source::Random(shapes) => {
                let shape = shapes[name].as_slice();
                // Generated on the device: a 2 GB model need not pass through the host.
                return Tensor::randn(0f32, 0.02, shape, self.device)
                    .and_then(|t| t.to_dtype(self.dtype))
                    .map_err(|e| self.err(name, e));
            }
        };
        t.to_dtype(self.dtype)
            .and_then(|t| t.to_device(self.device))
            .map_err(|e| self.err(name, e))
    }

    fn linear(&self, prefix: &str) -> Result<Linear, WeightsError> {
        Ok(Linear::new(
            self.get(&format!("{prefix}.weight"))?,
            Some(self.get(&format!("{prefix}.bias"))?),
        ))
    }
}

pub struct Attention {
    qkv: Linear,
    qkv_temb: Linear,
    proj: Linear,
    /// softmax bias [1, heads, N, N], gathered from the table once at load time.
    bias: Tensor,
}

pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

pub struct Block {
    attn: Attention,
    mlp: Mlp,
}

pub struct DiffiT {
    config: DiffitConfig,
    dtype: DType,
    device: Device,
    patch_weight: Linear,
    pos_embed: Tensor,
    t_mlp0: Linear,
    t_mlp2: Linear,
    y_table: Tensor,
    blocks: Vec<Block>,
    final_linear: Linear,
    ln_ones: Tensor,
    ln_zeros: Tensor,
    kernels: KernelOptions,
    /// Present when the block runs through the fused kernels (`set_fused`).
    fused: Option<FusedParts>,
}

/// What the fused block path precomputes at load time.
struct FusedParts {
    /// Every block's time/class projection in one layer: [depth·3D, D], with each block's qkv
    /// bias folded into its bias, so a step makes all per-sample qkv biases in one matmul.
    cond: Linear,
    /// Each block's relative-position bias as [heads·N, N] rows (softmax row r takes row
    /// r mod heads·N).
    attn_bias: Vec<Tensor>,
    /// The patch embedding's bias plus the position embedding, [1, N·D].
    pos_bias: Tensor,
}

/// Called with (name, activation) at each point the reference fixtures record.
pub type Trace<'a> = &'a mut dyn FnMut(&str, &Tensor);

impl DiffiT {
    /// Validates the file against the configuration its shapes imply, then loads it.
    pub fn load(
        file: &WeightsFile,
        dtype: DType,
        device: &Device,
        kernels: &KernelOptions,
    ) -> Result<Self, WeightsError> {
        let config = DiffitConfig::infer(file)?;
        let (required, optional) = config.expected_tensors();
        file.check_exact(&required, &optional)?;
        let index = relative_position_index(config.grid());
        for idx_name in optional.keys() {
            if file.shape(idx_name).is_some() {
                let stored = file
                    .load(idx_name)?
                    .to_dtype(DType::I64)
                    .and_then(|t| t.flatten_all()?.to_vec1::<i64>())
                    .map_err(|e| file.tensor_err(idx_name, e))?;
                if stored.iter().zip(&index).any(|(&s, &r)| s != r as i64) {
                    return Err(file.invalid(format!(
                        "tensor '{idx_name}' differs from the spec's relative-position layout"
                    )));
                }
            }
        }
        let loader = Loader {
            source: Source::File(file),
            dtype,
            device,
        };
        Self::build(&loader, config, kernels)
    }

    /// A model of `config` with random weights, made on `device` (for benchmarks).
    pub fn random(
        config: DiffitConfig,
        dtype: DType,
        device: &Device,
        kernels: &KernelOptions,
    ) -> Result<Self, WeightsError> {
        let (required, _) = config.expected_tensors();
        let loader = Loader {
            source: Source::Random(required),
            dtype,
            device,
        };
        Self::build(&loader, config, kernels)
    }

    fn build(
        ld: &Loader,
        config: DiffitConfig,
        kernels: &KernelOptions,
    ) -> Result<Self, WeightsError> {
        let (dtype, device) = (ld.dtype, ld.device);
        let (d, p, c) = (config.hidden_size, config.patch_size, config.in_channels);
        let n = config.num_tokens();
        let conv = ld.get("x_embedder.proj.weight")?;
        let patch_weight = Linear::new(
            conv.reshape((d, c * p * p))
                .map_err(|e| ld.err("x_embedder.proj.weight", e))?,
            Some(ld.get("x_embedder.proj.bias")?),
        );
        let index = relative_position_index(config.grid());
        let index_t = Tensor::from_vec(index, n * n, &Device::Cpu)
            .and_then(|t| t.to_device(device))
            .map_err(|e| ld.err("relative_position_index", e))?;
        let mut blocks = Vec::with_capacity(config.depth);
        for i in 0..config.depth {
            let b = format!("blocks.{i}");
            let table_name = format!("{b}.attn.relative_position_bias_table");
            let bias = ld
                .get(&table_name)?
                .index_select(&index_t, 0)
                .and_then(|t| {
                    t.reshape((n, n, config.num_heads))?
                        .permute((2, 0, 1))?
                        .contiguous()
                })
                .and_then(|t| t.unsqueeze(0))
                .map_err(|e| ld.err(&table_name, e))?;
            blocks.push(Block {
                attn: Attention {
                    qkv: ld.linear(&format!("{b}.attn.qkv"))?,
                    qkv_temb: ld.linear(&format!("{b}.attn.qkv_temb"))?,
                    proj: ld.linear(&format!("{b}.attn.proj"))?,
                    bias,
                },
                mlp: Mlp {
                    fc1: ld.linear(&format!("{b}.mlp.fc1"))?,
                    fc2: ld.linear(&format!("{b}.mlp.fc2"))?,
                },
            });
        }
        let consts = |v: f32| {
            Tensor::full(v, d, device)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| ld.err("layer-norm constants", e))
        };
        let mut model = Self {
            patch_weight,
            pos_embed: ld.get("pos_embed")?,
            t_mlp0: ld.linear("t_embedder.mlp.0")?,
            t_mlp2: ld.linear("t_embedder.mlp.2")?,
            y_table: ld.get("y_embedder.embedding_table.weight")?,
            blocks,
            final_linear: ld.linear("final_layer.linear")?,
            ln_ones: consts(1.0)?,
            ln_zeros: consts(0.0)?,
            kernels: *kernels,
            fused: None,
            config,
            dtype,
            device: device.clone(),
        };
        if kernels.fused.on_for(device) {
            model
                .set_fused(true)
                .map_err(|e| ld.err("fused-kernel tables", e))?;
        }
        Ok(model)
    }

    /// Runs the blocks through the fused kernels (`crate::kernels`: LayerNorm, attention from
    /// the qkv matmul with the per-sample bias and the relative-position bias added in its own
    /// passes, fc1 + bias + GELU and proj / fc2 + bias + residual in the matmuls) instead of
    /// plain candle ops. On by default on CUDA (`KernelOptions::fused`); on the CPU the
    /// kernels' fallbacks compute the same.
    pub fn set_fused(&mut self, on: bool) -> candle_core::Result<()> {
        if !on {
            self.fused = None;
            return Ok(());
        }
        let (n, heads) = (self.config.num_tokens(), self.config.num_heads);
        let mut weights = Vec::with_capacity(self.blocks.len());
        let mut biases = Vec::with_capacity(self.blocks.len());
        let mut attn_bias = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let a = &b.attn;
            weights.push(a.qkv_temb.weight.clone());
            biases.push((bias_or_zeros(&a.qkv_temb)? + bias_or_zeros(&a.qkv)?)?);
            attn_bias.push(a.bias.reshape((heads * n, n))?);
        }
        let pos_bias = self
            .pos_embed
            .broadcast_add(&bias_or_zeros(&self.patch_weight)?)?
            .reshape((1, n * self.config.hidden_size))?;
        self.fused = Some(FusedParts {
            cond: Linear::new(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?)),
            attn_bias,
            pos_bias,
        });
        Ok(())
    }

    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    pub fn config(&self) -> &DiffitConfig {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// ε (and v) prediction for latents `x` [B,C,H,W] at model timesteps `t` with labels `y`
    /// (`num_classes` is the null label). Output [B, out_channels, H, W] in the run dtype.
    pub fn forward(&self, x: &Tensor, t: &[i64], y: &[i64]) -> candle_core::Result<Tensor> {
        self.forward_impl(x, t, y, None)
    }

    pub fn forward_traced(
        &self,
        x: &Tensor,
        t: &[i64],
        y: &[i64],
        trace: Trace,
    ) -> candle_core::Result<Tensor> {
        self.forward_impl(x, t, y, Some(trace))
    }

    fn check_inputs(&self, x: &Tensor, t: &[i64], y: &[i64]) -> candle_core::Result<usize> {
        let cfg = &self.config;
        let (b, c, h, w) = x.dims4()?;
        if c != cfg.in_channels || h != cfg.input_size || w != cfg.input_size {
            candle_core::bail!(
                "input x has shape {:?}, the model takes [B, {}, {}, {}]",
                x.dims(),
                cfg.in_channels,
                cfg.input_size,
                cfg.input_size
            );
        }
        if t.len() != b || y.len() != b {
            candle_core::bail!(
                "batch of {b} latents needs {b} timesteps and labels, got {} and {}",
                t.len(),
                y.len()
            );
        }
        if let Some(bad) = t.iter().find(|&&v| !(0..TRAIN_TIMESTEPS).contains(&v)) {
            candle_core::bail!("timestep {bad} is outside 0..{}", TRAIN_TIMESTEPS - 1);
        }
        if let Some(bad) = y.iter().find(|&&v| v < 0 || v as usize > cfg.num_classes) {
            candle_core::bail!(
                "label {bad} is outside 0..{} ({} = null)",
                cfg.num_classes,
                cfg.num_classes
            );
        }
        Ok(b)
    }

    fn layer_norm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.fused.is_some() {
            return kernels::layer_norm(x, LN_EPS);
        }
        candle_nn::ops::layer_norm(x, &self.ln_ones, &self.ln_zeros, LN_EPS)
    }

    fn forward_impl(
        &self,
        x: &Tensor,
        t: &[i64],
        y: &[i64],
        mut trace: Option<Trace>,
    ) -> candle_core::Result<Tensor> {
        let b = self.check_inputs(x, t, y)?;
        let cfg = &self.config;
        let (p, g) = (cfg.patch_size, cfg.grid());
        let tracing = trace.is_some();
        let mut record = |name: &str, v: &Tensor| {
            if let Some(f) = trace.as_mut() {
                f(name, v)
            }
        };
        let x = x.to_dtype(self.dtype)?;
        // Patchify: [B,C,g·p,g·p] → [B, g·g, C·p·p] in (c, kh, kw) order, then the conv as a matmul.
        let patches = x
            .reshape(vec![b, cfg.in_channels, g, p, g, p])?
            .permute(vec![0, 2, 4, 1, 3, 5])?
            .contiguous()?
            .reshape((b, g * g, cfg.in_channels * p * p))?;
        let mut h = match &self.fused {
            // One pass after the matmul adds the patch bias and the position embedding, summed
            // at load (two broadcast adds took 1.4 ms of a B = 64 step on an H100).
            Some(fused) if !tracing => {
                let (n, d) = (g * g, cfg.hidden_size);
                let y = self
                    .patch_weight
                    .forward_no_bias(&patches)?
                    .reshape((b, n * d))?;
                kernels::bias_act(&y, &fused.pos_bias, b, Activation::Identity, None)?
                    .reshape((b, n, d))?
            }
            _ => {
                let h = self.patch_weight.forward(&patches)?;
                record("x_embedder", &h);
                let h = h.broadcast_add(&self.pos_embed)?;
                record("x_plus_pos", &h);
                h
            }
        };

        let freq = Tensor::from_vec(timestep_features(t), (b, TIME_FREQ_DIM), &self.device)?;
        record("t_freq", &freq);
        let lt = self.kernels.lt_epilogue;
        let t_emb = self.t_mlp2.forward_per_sample(
            &candle_nn::ops::silu(
                &self
                    .t_mlp0
                    .forward_per_sample(&freq.to_dtype(self.dtype)?, lt)?,
            )?,
            lt,
        )?;
        record("t_embedder", &t_emb);
        let labels: Vec<u32> = y.iter().map(|&v| v as u32).collect();
        let y_emb = self
            .y_table
            .index_select(&Tensor::new(labels, &self.device)?, 0)?;
        record("y_embedder", &y_emb);
        let c = (t_emb + y_emb)?;
        record("c", &c);

        if let Some(fused) = &self.fused {
            h = self.blocks_fused(fused, h, &c, tracing, &mut record)?;
        } else {
            for (i, block) in self.blocks.iter().enumerate() {
                let attn = self.attention(block, &h, &c)?;
                record(&format!("blocks.{i}.attn"), &attn);
                h = (h + attn)?;
                let mlp = block
                    .mlp
                    .fc2
                    .forward(&block.mlp.fc1.forward(&self.layer_norm(&h)?)?.gelu()?)?;
                record(&format!("blocks.{i}.mlp"), &mlp);
                h = (h + mlp)?;
                record(&format!("blocks.{i}"), &h);
            }
        }

        let out = self
            .final_linear
            .forward(&candle_nn::ops::silu(&self.layer_norm(&h)?)?)?;
        record("final_layer", &out);
        // Unpatchify: token (gh, gw) holds (p, q, c) → out[c, gh·p + p', gw·p + q'].
        let oc = cfg.out_channels;
        out.reshape(vec![b, g, g, p, p, oc])?
            .permute(vec![0, 5, 1, 3, 2, 4])?
            .contiguous()?
            .reshape((b, oc, g * p, g * p))
    }

    /// All blocks through the fused kernels; records the same activations as the plain path.
    fn blocks_fused(
        &self,
        fused: &FusedParts,
        mut h: Tensor,
        c: &Tensor,
        tracing: bool,
        record: &mut dyn FnMut(&str, &Tensor),
    ) -> candle_core::Result<Tensor> {
        let d = h.dim(2)?;
        let heads = self.config.num_heads;
        let scale = 1.0 / ((d / heads) as f32).sqrt();
        // Every block's per-sample qkv bias (time/class projection + qkv bias) at once.
        let lt = self.kernels.lt_epilogue;
        let cond = fused.cond.forward_per_sample(c, lt)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let (a, mlp) = (&block.attn, &block.mlp);
            let qkv = a.qkv.forward_no_bias(&kernels::layer_norm(&h, LN_EPS)?)?;
            let ctx = kernels::attention(
                &qkv,
                &cond.narrow(1, i * 3 * d, 3 * d)?,
                &fused.attn_bias[i],
                heads,
                scale,
                self.kernels.flash_attention,
            )?;
            let before = h.clone();
            h = kernels::linear_bias_residual(
                &ctx,
                &a.proj.weight,
                &bias_or_zeros(&a.proj)?,
                &h,
                lt,
            )?;
            if tracing {
                record(&format!("blocks.{i}.attn"), &(&h - &before)?);
            }
            let hidden = kernels::linear_bias_act(
                &kernels::layer_norm(&h, LN_EPS)?,
                &mlp.fc1.weight,
                &bias_or_zeros(&mlp.fc1)?,
                Activation::GeluTanh,
                lt,
            )?;
            let before = h.clone();
            h = kernels::linear_bias_residual(
                &hidden,
                &mlp.fc2.weight,
                &bias_or_zeros(&mlp.fc2)?,
                &h,
                lt,
            )?;
            if tracing {
                record(&format!("blocks.{i}.mlp"), &(&h - &before)?);
                record(&format!("blocks.{i}"), &h);
            }
        }
        Ok(h)
    }

    fn attention(&self, block: &Block, x: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, n, d) = x.dims3()?;
        let (heads, hd) = (cfg.num_heads, d / cfg.num_heads);
        let a = &block.attn;
        // The time/class projection is one [3D] vector per sample: fold it and the qkv bias
        // into a single per-sample bias instead of adding two broadcasts over every token.
        let mut sample_bias = a.qkv_temb.forward_per_sample(c, self.kernels.lt_epilogue)?;
        if let Some(bq) = a.qkv.bias() {
            sample_bias = sample_bias.broadcast_add(bq)?;
        }
        let qkv = a
            .qkv
            .forward_no_bias(&self.layer_norm(x)?)?
            .broadcast_add(&sample_bias.unsqueeze(1)?)?;
        let split = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .reshape((b, n, heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (split(0)? * scale)?;
        let k = split(1)?;
        let v = split(2)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = scores.broadcast_add(&a.bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        a.proj.forward(&ctx)
    }
}
