//! The decoder half of a diffusers `AutoencoderKL` (kl-f8 for the ImageNet models): `config`
//! (read off the shapes and a side `config.json`), `nchw` (plain candle ops, the reference) and
//! `nhwc` (channels-last through the fused kernels). Both are built from the same checkpoint
//! keys; a `VaeDecoder` holds exactly one of them, chosen by `KernelOptions` at load.

mod config;
mod nchw;
mod nhwc;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use config::VaeConfig;

use super::checkpoint::Checkpoint;
use super::weights::{WeightsError, WeightsFile};
use crate::config::KernelOptions;

/// The one decoder a `VaeDecoder` runs.
enum Layout {
    /// Plain candle ops on NCHW tensors.
    Nchw(Box<nchw::Decoder>),
    /// Channels-last through `crate::kernels` (3×3 convolutions as im2col + one matmul with the
    /// nearest upsampling folded into the im2col, GroupNorm + SiLU in one op, biases and
    /// residual adds in the matmul's output pass). The default on CUDA; on the CPU the
    /// kernels' fallbacks compute the same.
    ChannelsLast(Box<nhwc::Decoder>),
}

pub struct VaeDecoder {
    config: VaeConfig,
    dtype: DType,
    device: Device,
    layout: Layout,
    /// Decode passes captured as CUDA graphs, one per latent shape (`--cuda-graphs`, on the
    /// channels-last path on a GPU); `None` where passes run directly.
    graphs: Option<std::sync::Mutex<PassGraphs>>,
    /// Batch sizes of the decoder passes run, for the tests of `pass_sizes`.
    #[cfg(test)]
    passes: std::sync::Mutex<Vec<usize>>,
}

/// One decode pass per latent shape, captured: the latents are copied into `input` before a
/// replay and the pixels out of `output` after it (both allocated outside the graph).
struct PassGraph {
    graph: crate::kernels::graph::Graph,
    input: Tensor,
    output: Tensor,
}

#[derive(Default)]
struct PassGraphs {
    by_shape: std::collections::HashMap<Vec<usize>, PassGraph>,
    /// `--cuda-graphs on`: a failed capture is an error, not a fallback to direct passes.
    required: bool,
    /// A capture failed under `auto`: every pass runs directly from then on.
    failed: bool,
}

/// Latents per chunk where the caller does not say (`decode`; `--decode-chunk` defaults to the
/// same). Larger passes are not faster: on an H100, B = 16 decoded at 334 images/s in passes of 8
/// and at 305 in passes of 14 + 2 (the im2col bound; docs/perf.md, "Decode chunk size").
pub const DEFAULT_DECODE_CHUNK: usize = 8;

/// Pass sizes for `batch` latents handed over `chunk` at a time, at most `max_pass` a pass:
/// each chunk in the fewest passes that fit, their sizes differing by at most one.
fn split_passes(batch: usize, chunk: usize, max_pass: usize) -> Vec<usize> {
    let (chunk, max_pass) = (chunk.max(1), max_pass.max(1));
    let mut sizes = Vec::new();
    let mut left = batch;
    while left > 0 {
        let group = left.min(chunk);
        let passes = group.div_ceil(max_pass);
        sizes.extend((0..passes).map(|i| group / passes + usize::from(i < group % passes)));
        left -= group;
    }
    sizes
}

/// The name a current key had in older diffusers files: the mid-block attention's
/// `to_q/to_k/to_v/to_out.0` were `query/key/value/proj_attn` (and stored as 1×1 convolutions,
/// which `Checkpoint` reshapes).
fn legacy_name(name: &str) -> Option<String> {
    const LEGACY: [(&str, &str); 4] = [
        (".to_q.", ".query."),
        (".to_k.", ".key."),
        (".to_v.", ".value."),
        (".to_out.0.", ".proj_attn."),
    ];
    if !name.contains(".attentions.") {
        return None;
    }
    LEGACY
        .iter()
        .find(|(new, _)| name.contains(new))
        .map(|(new, old)| name.replace(new, old))
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
        let config = VaeConfig::read(file, config_path)?;
        let checkpoint = Checkpoint::file_with_legacy_names(file, legacy_name);
        Self::new(checkpoint.var_builder(dtype, device), config, kernels)
            .map_err(|e| checkpoint.error("VAE", e))
    }

    /// A decoder of `config` with random weights, made on `device` (for benchmarks).
    pub fn random(
        config: VaeConfig,
        dtype: DType,
        device: &Device,
        kernels: &KernelOptions,
    ) -> candle_core::Result<Self> {
        let checkpoint = Checkpoint::random();
        Self::new(checkpoint.var_builder(dtype, device), config, kernels)
    }

    /// The decoder of `config` from the checkpoint behind `vb` (the file's root): channels-last
    /// where `kernels.fused` says so for this device, else NCHW.
    pub fn new(
        vb: VarBuilder,
        config: VaeConfig,
        kernels: &KernelOptions,
    ) -> candle_core::Result<Self> {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        crate::kernels::set_matmul_autotune(kernels.matmul_autotune);
        let layout = if kernels.fused.on_for(&device) {
            Layout::ChannelsLast(Box::new(nhwc::Decoder::new(vb, &config, *kernels)?))
        } else {
            Layout::Nchw(Box::new(nchw::Decoder::new(vb, &config)?))
        };
        let captured = cfg!(feature = "cuda")
            && device.is_cuda()
            && matches!(layout, Layout::ChannelsLast(_))
            && kernels.cuda_graphs != crate::config::Toggle::Off;
        let graphs = captured.then(|| {
            std::sync::Mutex::new(PassGraphs {
                required: kernels.cuda_graphs == crate::config::Toggle::On,
                ..Default::default()
            })
        });
        Ok(Self {
            config,
            dtype,
            device,
            layout,
            graphs,
            #[cfg(test)]
            passes: Default::default(),
        })
    }

    /// Whether decode passes are captured as CUDA graphs (one per latent shape, at its first
    /// pass): `--cuda-graphs` not off, on a GPU, on the channels-last path.
    pub fn captures_passes(&self) -> bool {
        self.graphs.is_some()
    }

    /// Whether decoding runs channels-last through the fused kernels.
    pub fn is_fused(&self) -> bool {
        matches!(self.layout, Layout::ChannelsLast(_))
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Most latents of `h`×`w` one decoder pass can take: any number on the NCHW path; on the
    /// channels-last path what its im2col buffers allow (`nhwc::max_batch`: 14 latents of
    /// 32×32, 3 of 64×64 for kl-f8).
    pub fn max_pass(&self, latent_hw: (usize, usize)) -> usize {
        match &self.layout {
            Layout::Nchw(_) => usize::MAX,
            Layout::ChannelsLast(d) => d.max_batch(&self.config, latent_hw),
        }
    }

    /// The decoder passes for `batch` latents of `h`×`w` handed over `chunk` at a time
    /// (`--decode-chunk`): one pass per chunk, unless a chunk exceeds `max_pass`; then the
    /// fewest passes that fit, of equal sizes (16 at ImageNet-256: 8 + 8, not 14 + 2). The one
    /// place decode passes are decided: `decode_chunked` runs them, the engine hands latents
    /// over `chunk` at a time and logs a full chunk's passes at start-up.
    pub fn pass_sizes(&self, batch: usize, chunk: usize, latent_hw: (usize, usize)) -> Vec<usize> {
        split_passes(batch, chunk, self.max_pass(latent_hw))
    }

    /// `decode(z / scaling_factor)` for sampled latents z [B, C, h, w]: f32 pixels in roughly
    /// [-1, 1], [B, out_channels, h·f, w·f]; in chunks of `DEFAULT_DECODE_CHUNK`.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.decode_chunked(z, DEFAULT_DECODE_CHUNK)
    }

    /// `decode` in chunks of `chunk` latents, each one pass where it fits (`pass_sizes`), so
    /// memory stays bounded at any batch size.
    pub fn decode_chunked(&self, z: &Tensor, chunk: usize) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = z.dims4()?;
        let sizes = self.pass_sizes(b, chunk, (h, w));
        if sizes.len() <= 1 {
            return self.decode_pass(z);
        }
        let mut parts = Vec::with_capacity(sizes.len());
        let mut start = 0;
        for n in sizes {
            parts.push(self.decode_pass(&z.narrow(0, start, n)?)?);
            start += n;
        }
        Tensor::cat(&parts, 0)
    }

    /// One pass of the decoder over all of `z`: a graph replay where passes are captured.
    fn decode_pass(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(test)]
        if let Ok(mut p) = self.passes.lock() {
            p.push(z.dim(0)?);
        }
        if let Some(graphs) = &self.graphs {
            if let Some(pixels) = self.decode_pass_captured(graphs, z)? {
                return Ok(pixels);
            }
        }
        self.decode_pass_direct(z)
    }

    /// `decode_pass` replayed from the graph of `z`'s shape, captured at its first pass (one
    /// uncaptured pass fills candle's upload cache and tunes the matmuls, then the capture).
    /// `None` where a capture failed under `--cuda-graphs auto` (logged once; passes then run
    /// directly). The same kernels in the same order, so the same bits as a direct pass.
    fn decode_pass_captured(
        &self,
        graphs: &std::sync::Mutex<PassGraphs>,
        z: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        use crate::kernels::graph::{warm_run, Graph};
        let mut g = graphs
            .lock()
            .map_err(|_| candle_core::Error::Msg("VAE pass graphs: a poisoned lock".into()))?;
        if g.failed {
            return Ok(None);
        }
        let key = z.dims().to_vec();
        if !g.by_shape.contains_key(&key) {
            let input = Tensor::zeros(z.shape(), DType::F32, &self.device)?;
            let made = (|| -> anyhow::Result<PassGraph> {
                let mut out = None;
                warm_run(&self.device, || {
                    let y = self.decode_pass_direct(&input)?;
                    out = Some(Tensor::zeros(y.shape(), y.dtype(), &self.device)?);
                    Ok(())
                })?;
                let output = out.ok_or_else(|| anyhow::anyhow!("the warm pass made no output"))?;
                let graph = Graph::capture(&self.device, || {
                    output.slice_set(&self.decode_pass_direct(&input)?, 0, 0)
                })?;
                Ok(PassGraph {
                    graph,
                    input,
                    output,
                })
            })();
            match made {
                Ok(pg) => {
                    tracing::info!(
                        shape = ?key,
                        nodes = pg.graph.nodes(),
                        graph_memory_mib = crate::kernels::graph::graph_memory_mib(&self.device),
                        "captured a CUDA graph of a VAE decode pass"
                    );
                    g.by_shape.insert(key.clone(), pg);
                }
                Err(e) if !g.required => {
                    tracing::warn!(error = %e, "capturing a VAE decode pass failed: passes run uncaptured");
                    g.failed = true;
                    return Ok(None);
                }
                Err(e) => candle_core::bail!("capturing a VAE decode pass: {e:#}"),
            }
        }
        let pg = &g.by_shape[&key];
        pg.input
            .slice_set(&z.to_dtype(DType::F32)?.contiguous()?, 0, 0)?;
        pg.graph
            .launch()
            .map_err(|e| candle_core::Error::Msg(format!("replaying a VAE decode pass: {e:#}")))?;
        // A fresh tensor: the next replay overwrites `output`.
        Ok(Some(pg.output.copy()?))
    }

    /// One pass of the decoder over all of `z`, enqueued op by op.
    fn decode_pass_direct(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = (z.to_dtype(DType::F32)? / self.config.scaling_factor)?.to_dtype(self.dtype)?;
        match &self.layout {
            Layout::ChannelsLast(d) => d.forward(&z),
            Layout::Nchw(d) => d.forward(&z)?.to_dtype(DType::F32),
        }
    }

    /// The batch sizes of the passes run since the last call.
    #[cfg(test)]
    pub(crate) fn take_passes(&self) -> Vec<usize> {
        self.passes
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
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

#[cfg(test)]
pub(crate) mod tests;
