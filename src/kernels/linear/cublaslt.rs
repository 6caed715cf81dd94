//! The linear layers with their epilogue inside one cuBLASLt matmul (bf16/f16 only): the bias
//! and GELU through cudarc's matmul, the bias plus a residual (C with beta = 1) through the raw
//! cuBLASLt API, which cudarc's wrapper does not expose.
//!
//! Row-major y [m, n] = x [m, k] · w [n, k]ᵀ is column-major yᵀ [n, m] = w · xᵀ: A = w (stored as
//! column-major [k, n], used transposed), B = x (column-major [k, m]).

use candle_core::backend::BackendStorage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::cublaslt::result::{self as lt, CublasError};
use candle_core::cuda_backend::cudarc::cublaslt::{
    sys, Activation as LtActivation, CudaBlasLT, Matmul, MatmulConfig, MatmulShared,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Result};
use float8::F8E4M3;

use crate::kernels::launch::{dispatch_half, view, In};

/// The cuBLASLt workspace of the residual matmul.
const LT_WORKSPACE: usize = 32 << 20;

/// One value per device, made on first use (cuBLASLt handles, workspaces).
fn per_device<V: Clone>(
    cache: &'static OnceLock<Mutex<HashMap<DeviceId, V>>>,
    dev: &CudaDevice,
    make: impl FnOnce() -> Result<V>,
) -> Result<V> {
    let mut map = cache
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(v) = map.get(&dev.id()) {
        return Ok(v.clone());
    }
    let v = make()?;
    map.insert(dev.id(), v.clone());
    Ok(v)
}

/// One cuBLASLt handle (with its 32 MiB workspace) per device, on the device's stream.
fn cublaslt(dev: &CudaDevice) -> Result<Arc<CudaBlasLT>> {
    static HANDLES: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaBlasLT>>>> = OnceLock::new();
    per_device(&HANDLES, dev, || {
        Ok(Arc::new(
            CudaBlasLT::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?,
        ))
    })
}

/// A 32 MiB cuBLASLt workspace per device (cudarc keeps its own private to its matmul).
fn lt_workspace(dev: &CudaDevice) -> Result<Arc<CudaSlice<u8>>> {
    static SPACES: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaSlice<u8>>>>> = OnceLock::new();
    per_device(&SPACES, dev, || {
        Ok(Arc::new(
            dev.cuda_stream().alloc_zeros::<u8>(LT_WORKSPACE).w()?,
        ))
    })
}

/// y [m, n] = act(x [m, k] · w [n, k]ᵀ + b [n]) through cuBLASLt's BIAS or GELU_BIAS epilogue.
pub fn linear_bias_act(x: In, w: In, b: In, dims: [usize; 3], gelu: bool) -> Result<CudaStorage> {
    dispatch_half!(x.0.device(), x.0, "linear_bias_act", |T| bias_act_lt::<T>(
        x, w, b, dims, gelu
    )?)
}

fn bias_act_lt<T: CudaDType + DeviceRepr>(
    x: In,
    w: In,
    b: In,
    [m, n, k]: [usize; 3],
    gelu: bool,
) -> Result<CudaSlice<T>>
where
    CudaBlasLT: Matmul<T>,
{
    let act = gelu.then_some(LtActivation::Gelu);
    let dev = x.0.device();
    let lt = cublaslt(dev)?;
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let (xv, wv, bv) = (view::<T>(x)?, view::<T>(w)?, view::<T>(b)?);
    let mut out = unsafe { dev.alloc::<T>(m * n)? };
    // SAFETY: the layouts above describe exactly the m·k, n·k and n elements the views hold;
    // out holds m·n.
    unsafe { lt.matmul(cfg, &wv, &xv, &mut out, Some(&bv), act.as_ref()) }
        .map_err(candle_core::Error::wrap)?;
    Ok(out)
}

/// Owns a cuBLASLt descriptor and destroys it on every path out.
struct LtHandle<H: Copy>(H, unsafe fn(H) -> std::result::Result<(), CublasError>);

impl<H: Copy> Drop for LtHandle<H> {
    fn drop(&mut self) {
        // SAFETY: created by the matching create function and destroyed only here.
        let _ = unsafe { (self.1)(self.0) };
    }
}

/// A matmul preference allowing the LT_WORKSPACE-byte workspace.
fn workspace_pref() -> Result<LtHandle<sys::cublasLtMatmulPreference_t>> {
    let pref = lt::create_matmul_pref()
        .map(|p| LtHandle(p, lt::destroy_matmul_pref))
        .map_err(candle_core::Error::wrap)?;
    let ws_size = LT_WORKSPACE;
    // SAFETY: the attribute's documented type (usize), live for the call.
    unsafe {
        lt::set_matmul_pref_attribute(
            pref.0,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            (&ws_size) as *const usize as *const _,
            std::mem::size_of::<usize>(),
        )
        .map_err(candle_core::Error::wrap)?;
    }
    Ok(pref)
}

/// D [m, n] = x [m, k] · w [n, k]ᵀ + b [n] + res [m, n] in one cuBLASLt call (C = res with
/// beta = 1, the BIAS epilogue, D a new buffer): the bias and the residual add cost no pass of
/// their own. bf16/f16 only.
pub fn linear_bias_residual(x: In, w: In, b: In, res: In, dims: [usize; 3]) -> Result<CudaStorage> {
    dispatch_half!(
        x.0.device(),
        x.0,
        "linear_bias_residual",
        |T| residual_lt::<T>(x, w, b, res, dims)?
    )
}

fn residual_lt<T: CudaDType + DeviceRepr>(
    x: In,
    w: In,
    b: In,
    res: In,
    [m, n, k]: [usize; 3],
) -> Result<CudaSlice<T>>
where
    CudaBlasLT: Matmul<T>,
{
    let dev = x.0.device();
    let handle = cublaslt(dev)?;
    let ws = lt_workspace(dev)?;
    let stream = dev.cuda_stream();
    let wrap = candle_core::Error::wrap;
    let dt = <CudaBlasLT as Matmul<T>>::matrix_type();
    let (xv, wv, bv, rv) = (view::<T>(x)?, view::<T>(w)?, view::<T>(b)?, view::<T>(res)?);
    let mut out = unsafe { dev.alloc::<T>(m * n)? };
    let layout = |rows: usize, cols: usize, ld: usize| {
        lt::create_matrix_layout(dt, rows as u64, cols as u64, ld as i64)
            .map(|l| LtHandle(l, lt::destroy_matrix_layout))
            .map_err(wrap)
    };
    // A = w stored column-major [k, n], used transposed; B = x column-major [k, m];
    // C = res and D = out column-major [n, m].
    let (a_l, b_l, c_l) = (layout(k, n, k)?, layout(k, m, k)?, layout(n, m, n)?);
    let desc = lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType_t::CUDA_R_32F,
    )
    .map(|d| LtHandle(d, lt::destroy_matmul_desc))
    .map_err(wrap)?;
    let (bias_ptr, _bias_sync) = bv.device_ptr(&stream);
    let transpose: i32 = 1;
    let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
    // SAFETY: attribute values of the documented types, live for the calls.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc.0,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            (&transpose) as *const i32 as *const _,
            std::mem::size_of::<i32>(),
        )
        .map_err(wrap)?;
        lt::set_matmul_desc_attribute(
            desc.0,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&epilogue) as *const _ as *const _,
            std::mem::size_of::<sys::cublasLtEpilogue_t>(),
        )
        .map_err(wrap)?;
        lt::set_matmul_desc_attribute(
            desc.0,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            (&bias_ptr) as *const _ as *const _,
            std::mem::size_of_val(&bias_ptr),
        )
        .map_err(wrap)?;
    }
    let pref = workspace_pref()?;
    let ws_size = LT_WORKSPACE;
    // SAFETY: the descriptors are live; the layouts describe exactly the views' sizes.
    let heuristic = unsafe {
        lt::get_matmul_algo_heuristic(*handle.handle(), desc.0, a_l.0, b_l.0, c_l.0, c_l.0, pref.0)
    }
    .map_err(wrap)?;
    let (alpha, beta) = (1f32, 1f32);
    {
        let (a_ptr, _a) = wv.device_ptr(&stream);
        let (b_ptr, _b) = xv.device_ptr(&stream);
        let (c_ptr, _c) = rv.device_ptr(&stream);
        let (ws_ptr, _w) = ws.device_ptr(&stream);
        let (d_ptr, _d) = out.device_ptr_mut(&stream);
        // SAFETY: every pointer is a live allocation of the size its layout states, on
        // this stream; the workspace is LT_WORKSPACE bytes.
        unsafe {
            lt::matmul(
                *handle.handle(),
                desc.0,
                (&alpha) as *const f32 as *const _,
                (&beta) as *const f32 as *const _,
                a_ptr as *const _,
                a_l.0,
                b_ptr as *const _,
                b_l.0,
                c_ptr as *const _,
                c_l.0,
                d_ptr as *mut _,
                c_l.0,
                (&heuristic.algo) as *const _,
                ws_ptr as *mut _,
                ws_size,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(wrap)?;
    }
    Ok(out)
}

/// Sets one matmul-descriptor attribute to `value`.
fn set_desc<V>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &V,
) -> Result<()> {
    // SAFETY: `value` is of the type the attribute documents (the callers pass i32 enums,
    // i8 flags and device pointers) and lives for the call, which copies it.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            value as *const V as *const _,
            std::mem::size_of::<V>(),
        )
    }
    .map_err(candle_core::Error::wrap)
}

/// What an FP8 matmul's algorithm depends on: its dims, output type and epilogue.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Fp8Key {
    device: DeviceId,
    dims: [usize; 3],
    out_type: i32,
    scaled: bool,
    gelu: bool,
    residual: bool,
}

/// The algorithm cuBLASLt's heuristic chose for each FP8 matmul shape (None: it has none), so
/// each later call skips the query (host time that sets the pace of small batches).
fn fp8_algo(
    key: Fp8Key,
    query: impl FnOnce() -> Option<sys::cublasLtMatmulAlgo_t>,
) -> Option<sys::cublasLtMatmulAlgo_t> {
    static ALGOS: OnceLock<Mutex<HashMap<Fp8Key, Option<sys::cublasLtMatmulAlgo_t>>>> =
        OnceLock::new();
    let mut map = ALGOS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    *map.entry(key).or_insert_with(query)
}

/// The e4m3 operands of [`fp8_matmul`], row-major: x [m, k] and w [n, k], each with one f32
/// scale a row (a token's, an output channel's).
pub struct Fp8Operands<'a> {
    pub xq: &'a CudaSlice<F8E4M3>,
    pub xs: &'a CudaSlice<f32>,
    pub wq: &'a CudaView<'a, F8E4M3>,
    pub ws: &'a CudaView<'a, f32>,
}

/// What [`fp8_matmul`] computes after the product.
pub enum Fp8Output<'a, T> {
    /// out = act(xs[r] · ws[c] · (x·wᵀ)[r, c] + bias[c]) (+ residual[r, c]): the scales as
    /// cuBLASLt's outer-vector scale modes (A: ws, length n; B: xs, length m), the bias and GELU
    /// in its BIAS / GELU_BIAS epilogue, the residual as C with beta = 1.
    Scaled {
        bias: &'a CudaView<'a, T>,
        gelu: bool,
        residual: Option<&'a CudaView<'a, T>>,
    },
    /// out = x·wᵀ unscaled, no epilogue (the caller applies scales and epilogue itself).
    Raw,
}

/// One FP8 (e4m3 × e4m3, f32 accumulation) cuBLASLt matmul writing T (bf16/f16) [m, n]: A = w
/// stored column-major [k, n] used transposed, B = x column-major [k, m] (the "TN" layout FP8
/// needs on Hopper), D column-major [n, m]. Fast accumulation (no periodic promotion of the
/// tensor cores' partial sums), as FP8 inference usually runs. `Ok(None)` when cuBLASLt has no
/// algorithm for the combination (the caller falls back).
pub fn fp8_matmul<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    ops: &Fp8Operands,
    output: &Fp8Output<T>,
    [m, n, k]: [usize; 3],
) -> Result<Option<CudaSlice<T>>>
where
    CudaBlasLT: Matmul<T>,
{
    use sys::cublasLtMatmulDescAttributes_t as A;
    let handle = cublaslt(dev)?;
    let ws_buf = lt_workspace(dev)?;
    let stream = dev.cuda_stream();
    let wrap = candle_core::Error::wrap;
    let dt = <CudaBlasLT as Matmul<T>>::matrix_type();
    let e4m3 = sys::cudaDataType_t::CUDA_R_8F_E4M3;
    let mut out = unsafe { dev.alloc::<T>(m * n)? };
    let layout = |ty, rows: usize, cols: usize, ld: usize| {
        lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
            .map(|l| LtHandle(l, lt::destroy_matrix_layout))
            .map_err(wrap)
    };
    let (a_l, b_l, c_l) = (
        layout(e4m3, k, n, k)?,
        layout(e4m3, k, m, k)?,
        layout(dt, n, m, n)?,
    );
    let desc = lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType_t::CUDA_R_32F,
    )
    .map(|d| LtHandle(d, lt::destroy_matmul_desc))
    .map_err(wrap)?;
    set_desc(desc.0, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
    set_desc(desc.0, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
    // Device pointers, held (with their stream syncs) until the matmul is enqueued.
    let (ws_ptr, _ws_sync) = ops.ws.device_ptr(&stream);
    let (xs_ptr, _xs_sync) = ops.xs.device_ptr(&stream);
    let mut beta = 0f32;
    let mut c_view = None;
    let mut _bias_sync = None;
    if let Fp8Output::Scaled {
        bias,
        gelu,
        residual,
    } = output
    {
        let outer =
            sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F as i32;
        set_desc(desc.0, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
        set_desc(desc.0, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
        set_desc(desc.0, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws_ptr)?;
        set_desc(desc.0, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs_ptr)?;
        let epilogue = if *gelu {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        };
        set_desc(desc.0, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        let (bias_ptr, sync) = bias.device_ptr(&stream);
        _bias_sync = Some(sync);
        set_desc(desc.0, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
        if let Some(res) = residual {
            beta = 1.0;
            c_view = Some(res);
        }
    }
    let pref = workspace_pref()?;
    let ws_size = LT_WORKSPACE;
    let key = Fp8Key {
        device: dev.id(),
        dims: [m, n, k],
        out_type: dt as i32,
        scaled: matches!(output, Fp8Output::Scaled { .. }),
        gelu: matches!(output, Fp8Output::Scaled { gelu: true, .. }),
        residual: beta != 0.0,
    };
    // SAFETY: the descriptors are live; the layouts describe exactly the buffers' sizes.
    let algo = fp8_algo(key, || unsafe {
        lt::get_matmul_algo_heuristic(*handle.handle(), desc.0, a_l.0, b_l.0, c_l.0, c_l.0, pref.0)
            .ok()
            .map(|h| h.algo)
    });
    let Some(algo) = algo else {
        return Ok(None);
    };
    let alpha = 1f32;
    let (a_ptr, _a) = ops.wq.device_ptr(&stream);
    let (b_ptr, _b) = ops.xq.device_ptr(&stream);
    let (w_ptr, _w) = ws_buf.device_ptr(&stream);
    let (d_ptr, _d) = out.device_ptr_mut(&stream);
    let c = c_view.map(|v| v.device_ptr(&stream));
    let c_ptr = c.as_ref().map_or(d_ptr, |(p, _)| *p);
    // SAFETY: every pointer is a live allocation of the size its layout states, on this stream;
    // C is D itself when beta = 0 (never read); the workspace is LT_WORKSPACE bytes.
    let status = unsafe {
        lt::matmul(
            *handle.handle(),
            desc.0,
            (&alpha) as *const f32 as *const _,
            (&beta) as *const f32 as *const _,
            a_ptr as *const _,
            a_l.0,
            b_ptr as *const _,
            b_l.0,
            c_ptr as *const _,
            c_l.0,
            d_ptr as *mut _,
            c_l.0,
            (&algo) as *const _,
            w_ptr as *mut _,
            ws_size,
            stream.cu_stream() as *mut _,
        )
    };
    drop((_a, _b, _w, _d, c));
    status.map_err(wrap)?;
    Ok(Some(out))
}
