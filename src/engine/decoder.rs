//! VAE decoding of finished latents. On the CPU a worker thread of its own decodes, so
//! denoising steps go on meanwhile; it batches whatever is waiting (up to the decode chunk).
//! On CUDA the engine thread decodes inline, between steps: decoding from a second host
//! thread on the same device produced corrupted images (whole decode batches) on an H100
//! with candle 0.11, so the device is only ever driven from one thread.

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
    /// The served model's id (the `model` label of the decode histogram).
    pub model: String,
}

pub(super) enum Decoder {
    Inline {
        vae: Arc<VaeDecoder>,
        chunk: usize,
    },
    Worker {
        tx: Sender<DecodeWork>,
        thread: std::thread::JoinHandle<()>,
    },
}

impl Decoder {
    /// Hands the VAE up to `chunk` (`--decode-chunk`) finished latents at once; it decodes
    /// them in the passes `VaeDecoder::pass_sizes` decides, logged here for a full chunk of
    /// `latent_side`² latents.
    pub fn new(vae: Arc<VaeDecoder>, chunk: usize, latent_side: usize) -> Self {
        let chunk = chunk.max(1);
        let hw = (latent_side, latent_side);
        let passes = vae.pass_sizes(chunk, chunk, hw);
        if passes.len() > 1 {
            tracing::warn!(
                chunk,
                ?passes,
                max_pass = vae.max_pass(hw),
                "--decode-chunk {chunk} exceeds what one VAE pass can take at \
                 {latent_side}×{latent_side} (its im2col buffers): a full chunk decodes in \
                 passes of {passes:?}"
            );
        } else {
            tracing::info!(chunk, "the VAE decodes up to {chunk} latents in one pass");
        }
        if !vae.device().is_cpu() {
            return Self::Inline { vae, chunk };
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("diffit-decode".into())
            .spawn(move || run(&vae, chunk, rx))
            .expect("spawn decode thread");
        Self::Worker { tx, thread }
    }

    /// Decodes (inline) or queues (worker) the finished latents.
    pub fn submit(&self, work: Vec<DecodeWork>) -> anyhow::Result<()> {
        match self {
            Self::Inline { vae, chunk } => {
                for part in chunks(work, *chunk) {
                    decode_batch(vae, part, *chunk);
                }
                Ok(())
            }
            Self::Worker { tx, .. } => {
                for w in work {
                    tx.send(w)
                        .map_err(|_| anyhow::anyhow!("the decode worker stopped"))?;
                }
                Ok(())
            }
        }
    }

    /// Lets a worker finish what it holds, then waits for it.
    pub fn finish(self) {
        if let Self::Worker { tx, thread } = self {
            drop(tx);
            let _ = thread.join();
        }
    }
}

fn chunks(mut work: Vec<DecodeWork>, chunk: usize) -> Vec<Vec<DecodeWork>> {
    let mut out = Vec::new();
    while work.len() > chunk {
        let rest = work.split_off(chunk);
        out.push(std::mem::replace(&mut work, rest));
    }
    if !work.is_empty() {
        out.push(work);
    }
    out
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
        decode_batch(vae, batch, chunk);
    }
}

/// Decodes one batch and sends each image (or the failure) to its job.
fn decode_batch(vae: &VaeDecoder, mut batch: Vec<DecodeWork>, chunk: usize) {
    // A client that has gone away needs no image.
    batch.retain(|w| !w.events.is_closed());
    if batch.is_empty() {
        return;
    }
    let t0 = Instant::now();
    let latents: Vec<&Tensor> = batch.iter().map(|w| &w.latent).collect();
    let result = Tensor::cat(&latents, 0)
        .map_err(anyhow::Error::from)
        .and_then(|z| decode_pixels(vae, &z, chunk));
    let decode = t0.elapsed();
    // One engine's decoder: every latent of a batch is of its model.
    metrics::histogram!("diffit_decode_duration_seconds", "model" => batch[0].model.clone())
        .record(decode.as_secs_f64());
    let decode_batch = batch.len();
    match result {
        Ok(pixels) => {
            for (w, px) in batch.into_iter().zip(pixels) {
                let _ = w.events.send(JobEvent::Image {
                    index: w.index,
                    pixels: px,
                    denoise: w.denoise,
                    decode,
                    decode_batch,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KernelOptions;
    use crate::model::vae::tests::tiny_decoder;

    /// The engine hands the VAE as many finished latents as `--decode-chunk` says, in one
    /// pass, on the fused path too (it used to stop at 8).
    #[test]
    fn a_decode_chunk_of_16_is_one_pass_of_16() {
        let vae = Arc::new(tiny_decoder(&KernelOptions::fused()));
        for (requested, passes) in [(16, vec![16]), (5, vec![5, 5, 5, 1])] {
            let decoder = Decoder::Inline {
                chunk: requested,
                vae: vae.clone(),
            };
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let work = (0..16)
                .map(|index| DecodeWork {
                    latent: Tensor::randn(0f32, 1.0, (1, 4, 4, 4), &candle_core::Device::Cpu)
                        .unwrap(),
                    index,
                    denoise: Duration::ZERO,
                    events: tx.clone(),
                    model: "test".into(),
                })
                .collect();
            decoder.submit(work).unwrap();
            assert_eq!(vae.take_passes(), passes, "--decode-chunk {requested}");
            let mut images = 0;
            while let Ok(event) = rx.try_recv() {
                assert!(matches!(event, JobEvent::Image { .. }));
                images += 1;
            }
            assert_eq!(images, 16);
        }
    }
}
