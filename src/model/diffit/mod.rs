//! DiffiT, laid out like a candle-transformers model: `config` (the architecture read off the
//! shapes, and the tensors a checkpoint must hold), `layers` (dense layer, embeddings, final
//! layer, LayerNorm), `block` (TMSA attention, MLP, block), `network` (loading and forward).

mod block;
mod config;
mod layers;
mod network;

pub use config::{relative_position_index, DiffitConfig, TIME_FREQ_DIM, TRAIN_TIMESTEPS};
pub use layers::timestep_features;
pub use network::{DiffiT, Trace};
