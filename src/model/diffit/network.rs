//! The DiffiT network (an isotropic ViT with time-dependent multi-head self-attention): loading,
//! the forward pass, and the tracing hook the parity fixtures use.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::block::{Block, QkvTemb};
use super::config::{relative_position_index, DiffitConfig, TRAIN_TIMESTEPS};
use super::layers::{FinalLayer, Kernels, LabelEmbedder, LayerNorm, PatchEmbed, TimestepEmbedder};
use crate::config::KernelOptions;
use crate::model::checkpoint::Checkpoint;
use crate::model::weights::{WeightsError, WeightsFile};

/// Called with (name, activation) at each point the reference fixtures record.
pub type Trace<'a> = &'a mut dyn FnMut(&str, &Tensor);

/// The optional trace of one forward.
pub struct Tracer<'a>(Option<Trace<'a>>);

impl Tracer<'_> {
    pub fn on(&self) -> bool {
        self.0.is_some()
    }

    pub fn record(&mut self, name: &str, t: &Tensor) {
        if let Some(f) = self.0.as_mut() {
            f(name, t)
        }
    }
}

/// Struct fields mirror the checkpoint's module names, but for `qkv_temb`: every block's
/// `attn.qkv_temb` lives here, stacked (see `QkvTemb`).
pub struct DiffiT {
    config: DiffitConfig,
    dtype: DType,
    device: Device,
    kernels: Kernels,
    x_embedder: PatchEmbed,
    pos_embed: Tensor,
    /// Fused path: `x_embedder`'s bias plus `pos_embed`, [1, N·D] (`PatchEmbed::forward_plus`).
    pos_bias: Option<Tensor>,
    t_embedder: TimestepEmbedder,
    y_embedder: LabelEmbedder,
    qkv_temb: QkvTemb,
    blocks: Vec<Block>,
    final_layer: FinalLayer,
}

impl DiffiT {
    /// Validates the file against the configuration its shapes imply (every name and shape,
    /// before anything is read), then loads it.
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
        let checkpoint = Checkpoint::file(file);
        Self::new(checkpoint.var_builder(dtype, device), config, kernels)
            .map_err(|e| checkpoint.error("DiffiT", e))
    }

    /// A model of `config` with random weights, made on `device` (for benchmarks).
    pub fn random(
        config: DiffitConfig,
        dtype: DType,
        device: &Device,
        kernels: &KernelOptions,
    ) -> Result<Self, WeightsError> {
        let checkpoint = Checkpoint::random();
        Self::new(checkpoint.var_builder(dtype, device), config, kernels)
            .map_err(|e| checkpoint.error("DiffiT", e))
    }

    /// The network of `config` from the checkpoint behind `vb`. The kernel path is fixed here:
    /// fused on a device where `kernels.fused` says so (on the CPU the kernels' fallbacks
    /// compute the same), else plain candle ops.
    pub fn new(
        vb: VarBuilder,
        config: DiffitConfig,
        kernels: &KernelOptions,
    ) -> candle_core::Result<Self> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        crate::kernels::set_matmul_autotune(kernels.matmul_autotune);
        let kernels = Kernels::resolve(kernels, &device);
        let (n, d) = (config.num_tokens(), config.hidden_size);
        let index = Tensor::from_vec(relative_position_index(config.grid()), n * n, &Device::Cpu)?
            .to_device(&device)?;
        let norm = LayerNorm::new(d, dtype, &device, kernels)?;
        let x_embedder = PatchEmbed::new(vb.pp("x_embedder"), &config)?;
        let pos_embed = vb.get((1, n, d), "pos_embed")?;
        let pos_bias = match (kernels.fused, x_embedder.bias()) {
            (true, Some(bias)) => Some(pos_embed.broadcast_add(bias)?.reshape((1, n * d))?),
            _ => None,
        };
        let blocks = (0..config.depth)
            .map(|i| {
                let start = std::time::Instant::now();
                let block = Block::new(
                    vb.pp("blocks").pp(i),
                    &config,
                    &index,
                    norm.clone(),
                    kernels.for_block(i, config.depth),
                );
                // Where a slow start-up spends its time (docs/fp8.md).
                tracing::debug!(block = i, elapsed = ?start.elapsed(), "DiffiT block built");
                block
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            x_embedder,
            pos_embed,
            pos_bias,
            t_embedder: TimestepEmbedder::new(vb.pp("t_embedder"), &config, kernels)?,
            y_embedder: LabelEmbedder::new(vb.pp("y_embedder"), &config)?,
            qkv_temb: QkvTemb::new(vb.pp("blocks"), &config, kernels)?,
            blocks,
            final_layer: FinalLayer::new(vb.pp("final_layer"), &config, norm)?,
            config,
            dtype,
            device,
            kernels,
        })
    }

    /// Whether the blocks run through the fused kernels (`crate::kernels`).
    pub fn is_fused(&self) -> bool {
        self.kernels.fused
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
        self.forward_impl(x, t, y, Tracer(None))
    }

    /// `forward`, calling `trace` with the activations the reference fixtures record. On the
    /// fused path the patch embedding then runs plain, to record its two steps.
    pub fn forward_traced(
        &self,
        x: &Tensor,
        t: &[i64],
        y: &[i64],
        trace: Trace,
    ) -> candle_core::Result<Tensor> {
        self.forward_impl(x, t, y, Tracer(Some(trace)))
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

    /// `forward` with the conditioning already on the device: timestep features `t_features`
    /// [B, 256] (f32, `timestep_features`) and labels `labels` [B] (u32, checked by the caller).
    /// It reads nothing from the host and never waits on the device, so a CUDA graph can
    /// capture it (`pipeline::graphs`).
    pub fn forward_features(
        &self,
        x: &Tensor,
        t_features: &Tensor,
        labels: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.forward_core(x, t_features, labels, Tracer(None))
    }

    fn forward_impl(
        &self,
        x: &Tensor,
        t: &[i64],
        y: &[i64],
        trace: Tracer,
    ) -> candle_core::Result<Tensor> {
        self.check_inputs(x, t, y)?;
        let freq = self.t_embedder.features(t, &self.device)?;
        let labels = self.y_embedder.labels(y)?;
        self.forward_core(x, &freq, &labels, trace)
    }

    fn forward_core(
        &self,
        x: &Tensor,
        freq: &Tensor,
        labels: &Tensor,
        mut trace: Tracer,
    ) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let x = x.to_dtype(self.dtype)?;
        let mut h = match &self.pos_bias {
            Some(pos_bias) if !trace.on() => self.x_embedder.forward_plus(&x, pos_bias)?,
            _ => {
                let h = self.x_embedder.forward(&x)?;
                trace.record("x_embedder", &h);
                let h = h.broadcast_add(&self.pos_embed)?;
                trace.record("x_plus_pos", &h);
                h
            }
        };
        trace.record("t_freq", freq);
        let t_emb = self.t_embedder.forward(freq)?;
        trace.record("t_embedder", &t_emb);
        let y_emb = self.y_embedder.forward(labels)?;
        trace.record("y_embedder", &y_emb);
        let c = (t_emb + y_emb)?;
        trace.record("c", &c);

        let qkv_bias = self.qkv_temb.forward(&c)?;
        for (i, block) in self.blocks.iter().enumerate() {
            h = block.forward(&h, &self.qkv_temb.block(&qkv_bias, i)?, &mut trace)?;
        }

        let out = self.final_layer.forward(&h)?;
        trace.record("final_layer", &out);
        // Unpatchify: token (gh, gw) holds (p, q, c) → out[c, gh·p + p', gw·p + q'].
        let cfg = &self.config;
        let (p, g, oc) = (cfg.patch_size, cfg.grid(), cfg.out_channels);
        out.reshape(vec![b, g, g, p, p, oc])?
            .permute(vec![0, 5, 1, 3, 2, 4])?
            .contiguous()?
            .reshape((b, oc, g * p, g * p))
    }
}
