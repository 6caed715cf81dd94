//! What the rest of the server knows about a loaded model without the model: its identity,
//! class names and sampling defaults, and the metadata each image carries.

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::ImageSpec;
use crate::classes::ClassNames;
use crate::diffusion::{GuidanceSchedule, SamplerKind};
use crate::encode::{encode, EncodeOptions};
use crate::model::{DiffitConfig, WeightsFile};

/// Sampling settings used when a request leaves them out.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SamplingDefaults {
    pub steps: usize,
    pub sampler: SamplerKind,
    pub guidance_scale: f32,
    pub guidance_schedule: GuidanceSchedule,
}

impl SamplingDefaults {
    /// The released settings: 250 DDPM steps; 4.4 power-cosine at 256 (latent ≤ 32), 1.49
    /// constant at 512.
    pub fn release(input_size: usize) -> Self {
        let (guidance_scale, guidance_schedule) = if input_size <= 32 {
            (4.4, GuidanceSchedule::PowerCosine)
        } else {
            (1.49, GuidanceSchedule::Constant)
        };
        Self {
            steps: 250,
            sampler: SamplerKind::Ddpm,
            guidance_scale,
            guidance_schedule,
        }
    }
}

/// What the rest of the server needs to know about the loaded model, without the model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The DiffiT file's stem, e.g. `diffit_256`: the model id in the API.
    pub name: String,
    pub config: DiffitConfig,
    pub classes: ClassNames,
    pub defaults: SamplingDefaults,
    /// SHA-256 of the DiffiT file: names the model in every PNG.
    pub model_sha256: String,
    pub image_size: usize,
    pub image_channels: usize,
    pub dtype: String,
    pub device: String,
}

impl ModelInfo {
    /// The tEXt entries recorded in every PNG.
    pub fn png_text(&self, spec: &ImageSpec) -> Vec<(&'static str, String)> {
        vec![
            ("seed", spec.seed.to_string()),
            ("class_label", spec.label.to_string()),
            ("class_name", self.classes.label(spec.label).to_string()),
            ("steps", spec.steps.to_string()),
            ("sampler", spec.sampler.to_string()),
            ("guidance_scale", spec.guidance.scale().to_string()),
            ("guidance_schedule", spec.guidance.schedule().to_string()),
            ("model", self.name.clone()),
            ("model_sha256", self.model_sha256.clone()),
            (
                "Software",
                format!("diffit-server {}", env!("CARGO_PKG_VERSION")),
            ),
        ]
    }

    /// One image of this model as a PNG (default settings), with its metadata.
    pub fn encode(&self, pixels: &[u8], spec: &ImageSpec) -> anyhow::Result<Vec<u8>> {
        self.encode_as(pixels, spec, EncodeOptions::default())
    }

    /// One image of this model as `options` say, with its metadata in that format's own place.
    pub fn encode_as(
        &self,
        pixels: &[u8],
        spec: &ImageSpec,
        options: EncodeOptions,
    ) -> anyhow::Result<Vec<u8>> {
        let side = self.image_size;
        let text = self.png_text(spec);
        Ok(encode(
            pixels,
            self.image_channels,
            side,
            side,
            &text,
            options,
        )?)
    }
}

/// Class names: the checkpoint's metadata `class_names`, else a side file `<model>.classes.json`
/// or `classes.json` beside it (a JSON list of names or of synonym lists), else ImageNet's for a
/// 1000-class model, else "class N".
pub(super) fn class_names(file: &WeightsFile, num_classes: usize) -> anyhow::Result<ClassNames> {
    let path = file.path();
    let side_files = [
        path.with_extension("classes.json"),
        path.with_file_name("classes.json"),
    ];
    let (text, origin) = if let Some(text) = file.metadata().get("class_names") {
        (
            text.clone(),
            format!("{}: metadata class_names", path.display()),
        )
    } else if let Some(side) = side_files.iter().find(|p| p.is_file()) {
        let text = std::fs::read_to_string(side)
            .with_context(|| format!("cannot read {}", side.display()))?;
        (text, side.display().to_string())
    } else if num_classes == 1000 {
        return Ok(ClassNames::imagenet());
    } else {
        return Ok(ClassNames::numbered(num_classes));
    };
    let names = ClassNames::from_json(&text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    anyhow::ensure!(
        names.len() == num_classes,
        "{origin}: {} class names for a {num_classes}-class model",
        names.len()
    );
    Ok(names)
}
