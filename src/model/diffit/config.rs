//! The DiffiT architecture, read entirely off a checkpoint's tensor shapes, and the exact list of
//! tensors a checkpoint of that architecture must hold (checked before anything is loaded).

use std::collections::BTreeMap;

use crate::model::weights::{WeightsError, WeightsFile};

/// Width of the sinusoidal timestep features fed to `t_embedder.mlp.0`.
pub const TIME_FREQ_DIM: usize = 256;
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
