//! diffit-server: serving class-conditional latent DiffiT.

pub mod classes;
pub mod diffusion;
pub mod model;
pub mod pipeline;
pub mod png;
