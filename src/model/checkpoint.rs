//! Where both networks' tensors come from: a candle `VarBuilder` over a validated
//! [`WeightsFile`], or over random values of the asked shapes (benchmarks at the released
//! sizes without the 2 GB file: speed does not depend on the values).
//!
//! One loading style for `model/`: every module is built by `new(vb, …)` with `vb.pp("…")`
//! spelling its checkpoint key, as in candle-transformers, whatever the source. A custom
//! backend rather than candle's own (`from_mmaped_safetensors`, `VarMap`) because serving needs
//! three things those do not give: every tensor checked finite as it is read (a corrupt file
//! fails at start-up, naming the tensor, instead of producing black images), the typed
//! [`WeightsError`] kept for the caller, and random weights made directly on the device that are
//! plain tensors (a `VarMap` makes `Var`s, and ops on a `Var` record a backprop graph that keeps
//! every intermediate activation alive until the output is dropped).

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::weights::{WeightsError, WeightsFile};

/// Where a model's tensors come from.
enum Source<'a> {
    File {
        file: &'a WeightsFile,
        /// The name a tensor had in older files, tried when the current one is absent.
        legacy_name: fn(&str) -> Option<String>,
    },
    Random,
}

/// The tensors of one model load. Build modules from [`Checkpoint::var_builder`], then turn a
/// failure into the error to report with [`Checkpoint::error`].
pub struct Checkpoint<'a> {
    source: Source<'a>,
    /// The first refusal, kept typed: candle's error can only carry it as text.
    failure: Mutex<Option<WeightsError>>,
}

impl<'a> Checkpoint<'a> {
    pub fn file(file: &'a WeightsFile) -> Self {
        Self::file_with_legacy_names(file, |_| None)
    }

    /// A file whose tensors may still carry the names `legacy_name` maps current names to.
    pub fn file_with_legacy_names(
        file: &'a WeightsFile,
        legacy_name: fn(&str) -> Option<String>,
    ) -> Self {
        Self {
            source: Source::File { file, legacy_name },
            failure: Mutex::new(None),
        }
    }

    /// N(0, 0.02) values of whatever shape is asked for, made on the device (a 2 GB model need
    /// not pass through the host). Initialisation hints are ignored: `vb.get`'s default hint
    /// is zeros, and a benchmark wants every weight the same kind of number.
    pub fn random() -> Self {
        Self {
            source: Source::Random,
            failure: Mutex::new(None),
        }
    }

    pub fn var_builder(&'a self, dtype: DType, device: &Device) -> VarBuilder<'a> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// The error to report for a build that failed with `e`: the loader's own refusal when
    /// there was one (missing tensor, NaN, …), else `e` in the file's context.
    pub fn error(&self, what: &str, e: candle_core::Error) -> WeightsError {
        if let Some(failure) = self.failure.lock().ok().and_then(|mut f| f.take()) {
            return failure;
        }
        match &self.source {
            Source::File { file, .. } => file.invalid(format!("{what}: {e}")),
            Source::Random => WeightsError::Invalid {
                path: "<random weights>".into(),
                reason: format!("{what}: {e}"),
            },
        }
    }

    fn refuse(&self, err: WeightsError) -> candle_core::Error {
        let msg = err.to_string();
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert(err);
        }
        candle_core::Error::Msg(msg)
    }

    /// Reads `name` from the file as finite f32 on the CPU, under its legacy name if need be.
    fn read(
        &self,
        file: &WeightsFile,
        legacy: fn(&str) -> Option<String>,
        name: &str,
    ) -> Result<Tensor, WeightsError> {
        if file.shape(name).is_none() {
            if let Some(old) = legacy(name).filter(|old| file.shape(old).is_some()) {
                return file.load_f32_finite(&old);
            }
        }
        file.load_f32_finite(name)
    }
}

impl SimpleBackend for &Checkpoint<'_> {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hints: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (file, legacy) = match &self.source {
            Source::Random => {
                return Tensor::randn(0f32, 0.02, shape, dev)?.to_dtype(dtype);
            }
            Source::File { file, legacy_name } => (*file, *legacy_name),
        };
        let t = self.read(file, legacy, name).map_err(|e| self.refuse(e))?;
        // A linear layer stored as a 1×1 convolution (older VAE attention weights).
        let t = match (t.dims(), shape.dims()) {
            ([o, i, 1, 1], [o2, i2]) if (o, i) == (o2, i2) => t.reshape(shape.clone())?,
            _ => t,
        };
        if t.dims() != shape.dims() {
            return Err(self.refuse(WeightsError::Shape {
                path: file.path().to_path_buf(),
                tensor: name.to_string(),
                expected: shape.dims().to_vec(),
                got: t.dims().to_vec(),
            }));
        }
        t.to_dtype(dtype)
            .and_then(|t| t.to_device(dev))
            .map_err(|e| self.refuse(file.tensor_err(name, e)))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match &self.source {
            Source::Random => candle_core::bail!("random weights need a shape for '{name}'"),
            Source::File { file, legacy_name } => self
                .read(file, *legacy_name, name)
                .map_err(|e| self.refuse(e))?
                .to_dtype(dtype)?
                .to_device(dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.source {
            Source::Random => true,
            Source::File { file, legacy_name } => {
                file.shape(name).is_some()
                    || legacy_name(name).is_some_and(|n| file.shape(&n).is_some())
            }
        }
    }
}
