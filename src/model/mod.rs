//! The networks: DiffiT (denoiser) and the VAE decoder, plus the weights loader they share.

mod checkpoint;
pub mod diffit;
pub mod vae;
pub mod weights;

pub use diffit::{DiffiT, DiffitConfig};
pub use vae::{VaeConfig, VaeDecoder};
pub use weights::{WeightsError, WeightsFile};
