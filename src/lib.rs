//! diffit-server: serving class-conditional latent DiffiT.

pub mod api;
pub mod bench;
pub mod catalog;
pub mod classes;
pub mod cli;
pub mod config;
pub mod diffusion;
pub mod encode;
pub mod engine;
pub mod kernels;
pub mod loadgen;
pub mod model;
pub mod pipeline;
pub mod png;
pub mod server;
pub mod telemetry;
