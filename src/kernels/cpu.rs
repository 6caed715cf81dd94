//! What every family's CPU fallback shares: the ops read their inputs as f32, compute in f32 and
//! store the run dtype, as the kernels do.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result};

/// A contiguous CPU tensor's values as f32.
pub fn cpu_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: input is not contiguous".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("fused op: unsupported dtype {:?}", other.dtype()),
    })
}

/// `rows` rows of `cols` values from a 2-D layout with unit column stride and any row stride.
pub fn cpu_f32_strided_rows(
    s: &CpuStorage,
    l: &Layout,
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>> {
    let (start, stride) = (l.start_offset(), l.stride()[0]);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let lo = start + r * stride;
        match s {
            CpuStorage::F32(v) => out.extend_from_slice(&v[lo..lo + cols]),
            CpuStorage::BF16(v) => out.extend(v[lo..lo + cols].iter().map(|x| x.to_f32())),
            CpuStorage::F16(v) => out.extend(v[lo..lo + cols].iter().map(|x| x.to_f32())),
            other => candle_core::bail!("fused op: unsupported dtype {:?}", other.dtype()),
        }
    }
    Ok(out)
}

/// f32 values back in `dtype`.
pub fn cpu_store(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        other => candle_core::bail!("fused op: unsupported dtype {other:?}"),
    })
}

/// The rows of a tensor the row-wise ops iterate over, and the row length.
pub fn rows_cols(l: &Layout) -> (usize, usize) {
    let cols = *l.dims().last().unwrap_or(&1);
    (l.shape().elem_count() / cols.max(1), cols)
}
