//! Loading every configured model onto every device, one model after another, so that a
//! model that does not fit is named: the ones before it loaded, it did not.

use std::time::Instant;

use candle_core::Device;

use crate::catalog::ModelEntry;
use crate::config::{device_name, KernelOptions};
use crate::pipeline::{LoadOptions, Pipeline};

/// What every model shares: the devices and how to run on them.
pub struct Shared<'a> {
    pub devices: &'a [Device],
    pub decode_chunk: usize,
    pub kernels: KernelOptions,
}

/// One copy of each model per device (`result[m][d]`), named and with its defaults set as the
/// entry says.
pub fn load_all(entries: &[ModelEntry], shared: &Shared<'_>) -> anyhow::Result<Vec<Vec<Pipeline>>> {
    let mut loaded: Vec<Vec<Pipeline>> = Vec::with_capacity(entries.len());
    for entry in entries {
        let t0 = Instant::now();
        let pipelines = load_one(entry, shared).map_err(|e| {
            let before: Vec<&str> = entries[..loaded.len()]
                .iter()
                .map(|e| e.name.as_str())
                .collect();
            explain(e, entry, &before, shared.devices)
        })?;
        tracing::info!(model = %entry.name, file = %entry.model.display(), dtype = %entry.dtype,
            engines = pipelines.len(), elapsed = ?t0.elapsed(), "model loaded");
        loaded.push(pipelines);
    }
    Ok(loaded)
}

fn load_one(entry: &ModelEntry, shared: &Shared<'_>) -> anyhow::Result<Vec<Pipeline>> {
    let opts = LoadOptions {
        model: entry.model.clone(),
        vae: entry.vae.clone(),
        vae_config: entry.vae_config.clone(),
        device: shared.devices[0].clone(),
        dtype: entry.dtype.into(),
        decode_chunk: shared.decode_chunk,
        // FP8 linear layers for a model served at `fp8`.
        kernels: shared.kernels.with_precision(entry.dtype),
    };
    let mut pipelines = Pipeline::load_on_each(&opts, shared.devices)?;
    for p in &mut pipelines {
        p.info.name = entry.name.clone();
        p.info.defaults = entry
            .defaults
            .apply(p.info.defaults)
            .map_err(|e| e.context("its sampling defaults (steps, sampler, guidance_*)"))?;
    }
    Ok(pipelines)
}

/// The load error with the model's name in front, and for a device out of memory, which
/// models were already on it.
fn explain(
    e: anyhow::Error,
    entry: &ModelEntry,
    before: &[&str],
    devices: &[Device],
) -> anyhow::Error {
    let out_of_memory = e
        .chain()
        .any(|c| c.to_string().to_ascii_lowercase().contains("out of memory"));
    if out_of_memory {
        let devices: Vec<String> = devices.iter().map(device_name).collect();
        let beside = if before.is_empty() {
            "on its own".to_string()
        } else {
            format!("beside {}", before.join(", "))
        };
        e.context(format!(
            "model '{}' ({}, {}) does not fit in the memory of {} {beside}: serve fewer models, \
             a smaller dtype, or put it on another replica",
            entry.name,
            entry.model.display(),
            entry.dtype,
            devices.join(",")
        ))
    } else {
        e.context(format!(
            "cannot load model '{}' ({})",
            entry.name,
            entry.model.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Precision;

    fn entry(name: &str) -> ModelEntry {
        ModelEntry {
            name: name.into(),
            model: format!("/m/{name}.safetensors").into(),
            vae: "/m/vae".into(),
            vae_config: None,
            dtype: Precision::Bf16,
            defaults: Default::default(),
        }
    }

    #[test]
    fn a_model_that_does_not_fit_is_named_with_those_loaded_before_it() {
        let oom = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
            .context("loading blocks.3.attn.qkv.weight");
        let e = explain(oom, &entry("in512"), &["in256", "fmnist"], &[Device::Cpu]);
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with(
                "model 'in512' (/m/in512.safetensors, bf16) does not fit in the memory of cpu \
                 beside in256, fmnist"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("CUDA_ERROR_OUT_OF_MEMORY"),
            "the cause stays: {msg}"
        );
        let other = explain(
            anyhow::anyhow!("no tensor 'x'"),
            &entry("a"),
            &[],
            &[Device::Cpu],
        );
        assert_eq!(
            format!("{other:#}"),
            "cannot load model 'a' (/m/a.safetensors): no tensor 'x'"
        );
    }
}
