//! The VAE decode worker: a thread of its own, so denoising steps go on while finished
//! latents are decoded. It batches whatever is waiting (up to the decode chunk).

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use super::JobEvent;
use crate::model::VaeDecoder;
use crate::pipeline::decode_pixels;

/// One finished latent on its way to its job.
pub(super) struct DecodeWork {
    pub latent: Tensor,
    pub index: usize,
    pub denoise: Duration,
    pub events: UnboundedSender<JobEvent>,
}

pub(super) fn spawn(
    vae: Arc<VaeDecoder>,
    chunk: usize,
) -> (Sender<DecodeWork>, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("diffit-decode".into())
        .spawn(move || run(&vae, chunk.max(1), rx))
        .expect("spawn decode thread");
    (tx, handle)
}

fn run(vae: &VaeDecoder, chunk: usize, rx: Receiver<DecodeWork>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < chunk {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        // A client that has gone away needs no image.
        batch.retain(|w| !w.events.is_closed());
        if batch.is_empty() {
            continue;
        }
        let t0 = Instant::now();
        let latents: Vec<&Tensor> = batch.iter().map(|w| &w.latent).collect();
        let result = Tensor::cat(&latents, 0)
            .map_err(anyhow::Error::from)
            .and_then(|z| decode_pixels(vae, &z, chunk));
        let decode = t0.elapsed();
        metrics::histogram!("diffit_decode_duration_seconds").record(decode.as_secs_f64());
        match result {
            Ok(pixels) => {
                for (w, px) in batch.into_iter().zip(pixels) {
                    let _ = w.events.send(JobEvent::Image {
                        index: w.index,
                        pixels: px,
                        denoise: w.denoise,
                        decode,
                    });
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "VAE decode failed");
                for w in batch {
                    let _ = w
                        .events
                        .send(JobEvent::Failed(super::EngineError::Internal(format!(
                            "decode failed: {e}"
                        ))));
                }
            }
        }
    }
}
