//! Every cuBLASLt matmul of the linear layers, through the raw API: bf16/f16 with no epilogue,
//! the BIAS or GELU_BIAS epilogue, or BIAS plus a residual (C with beta = 1), and FP8 with its
//! scale vectors and the same epilogues. Each shape's algorithm is chosen once and cached for
//! the process: by timing the heuristic's top candidates (`--matmul-autotune`, see `autotune`)
//! or as the heuristic's first.
//!
//! Row-major y [m, n] = x [m, k] · w [n, k]ᵀ is column-major yᵀ [n, m] = w · xᵀ: A = w (stored as
//! column-major [k, n], used transposed), B = x (column-major [k, m]).

use candle_core::backend::BackendStorage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::cublaslt::result::{self as lt, CublasError};
use candle_core::cuda_backend::cudarc::cublaslt::{sys, CudaBlasLT, Matmul, MatmulShared};
use candle_core::cuda_backend::cudarc::driver::{
    self, CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda_backend::{CudaDType, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Result};
use float8::F8E4M3;

use super::autotune::{self, Trial};
use crate::kernels::launch::{dispatch_half, view, In};

/// The cuBLASLt workspace of every matmul here (per device); candidates needing more are skipped.
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

/// One cuBLASLt handle per device, on the device's stream.
fn cublaslt(dev: &CudaDevice) -> Result<Arc<CudaBlasLT>> {
    static HANDLES: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaBlasLT>>>> = OnceLock::new();
    per_device(&HANDLES, dev, || {
        Ok(Arc::new(
            CudaBlasLT::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?,
        ))
    })
}

/// A 32 MiB cuBLASLt workspace per device, shared by the matmuls on its one stream.
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
    let epilogue = match gelu {
        true => Epilogue::GeluBias,
        false => Epilogue::Bias,
    };
    dispatch_half!(x.0.device(), x.0, "linear_bias_act", |T| half_lt::<T>(
        x,
        w,
        Some(b),
        None,
        dims,
        epilogue
    )?)
}

/// y [m, n] = x [m, k] · w [n, k]ᵀ without an epilogue (the qkv layer, whose bias is per
/// sample and added later), through the same tuned cuBLASLt path as the others.
pub fn linear_plain(x: In, w: In, dims: [usize; 3]) -> Result<CudaStorage> {
    dispatch_half!(x.0.device(), x.0, "linear_plain", |T| half_lt::<T>(
        x,
        w,
        None,
        None,
        dims,
        Epilogue::Default
    )?)
}

/// D [m, n] = x [m, k] · w [n, k]ᵀ + b [n] + res [m, n] in one cuBLASLt call (C = res with
/// beta = 1, the BIAS epilogue, D a new buffer): the bias and the residual add cost no pass of
/// their own. bf16/f16 only.
pub fn linear_bias_residual(x: In, w: In, b: In, res: In, dims: [usize; 3]) -> Result<CudaStorage> {
    dispatch_half!(x.0.device(), x.0, "linear_bias_residual", |T| half_lt::<T>(
        x,
        w,
        Some(b),
        Some(res),
        dims,
        Epilogue::Bias
    )?)
}

/// The bf16/f16 cuBLASLt matmul: T in, f32 accumulation, T out; `epilogue` with `bias`, plus
/// `res` as C with beta = 1 when given. D is always a new buffer.
fn half_lt<T: CudaDType + DeviceRepr>(
    x: In,
    w: In,
    bias: Option<In>,
    res: Option<In>,
    [m, n, k]: [usize; 3],
    epilogue: Epilogue,
) -> Result<CudaSlice<T>>
where
    CudaBlasLT: Matmul<T>,
{
    use sys::cublasLtMatmulDescAttributes_t as A;
    let dev = x.0.device();
    let stream = dev.cuda_stream();
    let dt = <CudaBlasLT as Matmul<T>>::matrix_type();
    let (xv, wv) = (view::<T>(x)?, view::<T>(w)?);
    let bv = bias.map(view::<T>).transpose()?;
    let rv = res.map(view::<T>).transpose()?;
    if bv.is_some() != (epilogue != Epilogue::Default) {
        candle_core::bail!("cuBLASLt matmul: a bias needs a bias epilogue and vice versa");
    }
    let mut out = unsafe { dev.alloc::<T>(m * n)? };
    let mut call = LtCall::new(dev, [m, n, k], dt, dt)?;
    set_desc(
        call.desc.0,
        A::CUBLASLT_MATMUL_DESC_EPILOGUE,
        &epilogue.lt(),
    )?;
    // Device pointers, held (with their stream syncs) until the matmul is enqueued.
    let bias = bv.as_ref().map(|b| b.device_ptr(&stream));
    if let Some((ptr, _)) = &bias {
        set_desc(call.desc.0, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, ptr)?;
    }
    let (a, _a) = wv.device_ptr(&stream);
    let (b, _b) = xv.device_ptr(&stream);
    let c = rv.as_ref().map(|r| r.device_ptr(&stream));
    let (d, _d) = out.device_ptr_mut(&stream);
    let found = call.enqueue(dev, [a, b, d], c.as_ref().map(|(p, _)| *p), epilogue, false)?;
    if !found {
        candle_core::bail!(
            "cuBLASLt has no {epilogue:?} matmul for [{m}, {k}] x [{n}, {k}] in {dt:?} on this GPU"
        );
    }
    drop((_a, _b, _d, c, bias));
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

/// What a matmul adds to the product in cuBLASLt's epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Epilogue {
    /// Nothing.
    Default,
    Bias,
    GeluBias,
}

impl Epilogue {
    fn lt(self) -> sys::cublasLtEpilogue_t {
        use sys::cublasLtEpilogue_t as E;
        match self {
            Self::Default => E::CUBLASLT_EPILOGUE_DEFAULT,
            Self::Bias => E::CUBLASLT_EPILOGUE_BIAS,
            Self::GeluBias => E::CUBLASLT_EPILOGUE_GELU_BIAS,
        }
    }
}

/// Everything a matmul's algorithm depends on: device, dims, types, epilogue, scale mode,
/// whether C is read, and whether the algorithm was timed (`--matmul-autotune`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct AlgoKey {
    device: DeviceId,
    dims: [usize; 3],
    /// A's and B's data type (`cudaDataType_t`).
    in_type: i32,
    /// C's and D's.
    out_type: i32,
    epilogue: Epilogue,
    /// Outer-vector scales for A and B (FP8).
    scaled: bool,
    /// C is the residual, with beta = 1.
    residual: bool,
    tuned: bool,
}

/// One matmul ready to enqueue, row-major y [m, n] = x [m, k] · w [n, k]ᵀ as column-major
/// D [n, m] = A [k, n]ᵀ · B [k, m] (+ C): the descriptor, the layouts, the device pointers
/// (`[A, B, C, D]`; C = D when beta = 0) and beta; alpha is 1.
struct LtCall {
    handle: Arc<CudaBlasLT>,
    workspace: Arc<CudaSlice<u8>>,
    desc: LtHandle<sys::cublasLtMatmulDesc_t>,
    a_l: LtHandle<sys::cublasLtMatrixLayout_t>,
    b_l: LtHandle<sys::cublasLtMatrixLayout_t>,
    c_l: LtHandle<sys::cublasLtMatrixLayout_t>,
    ptrs: [u64; 4],
    beta: f32,
    /// `[m, n, k]` and the types `new` was given (the algorithm key's).
    dims: [usize; 3],
    in_type: sys::cudaDataType_t,
    out_type: sys::cudaDataType_t,
    /// D's rows (m) and the bytes of one row.
    rows: usize,
    row_bytes: usize,
}

impl LtCall {
    /// The descriptor (f32 compute and scale, A transposed) and layouts for `[m, n, k]` with
    /// A and B of `in_type` and C and D of `out_type`; no pointers yet.
    fn new(
        dev: &CudaDevice,
        [m, n, k]: [usize; 3],
        in_type: sys::cudaDataType_t,
        out_type: sys::cudaDataType_t,
    ) -> Result<Self> {
        let wrap = candle_core::Error::wrap;
        let layout = |ty, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
                .map(|l| LtHandle(l, lt::destroy_matrix_layout))
                .map_err(wrap)
        };
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map(|d| LtHandle(d, lt::destroy_matmul_desc))
        .map_err(wrap)?;
        set_desc(
            desc.0,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &1i32,
        )?;
        let out_bytes = match out_type {
            sys::cudaDataType_t::CUDA_R_32F => 4,
            _ => 2,
        };
        Ok(Self {
            handle: cublaslt(dev)?,
            workspace: lt_workspace(dev)?,
            desc,
            a_l: layout(in_type, k, n, k)?,
            b_l: layout(in_type, k, m, k)?,
            c_l: layout(out_type, n, m, n)?,
            ptrs: [0; 4],
            beta: 0.0,
            dims: [m, n, k],
            in_type,
            out_type,
            rows: m,
            row_bytes: n * out_bytes,
        })
    }

    /// Points the call at A, B and D, and at `c` as C with beta = 1 (the residual) when given,
    /// then enqueues it with the algorithm for its key ([`execute`]). `Ok(false)`: cuBLASLt has
    /// no algorithm for it.
    fn enqueue(
        &mut self,
        dev: &CudaDevice,
        [a, b, d]: [u64; 3],
        c: Option<u64>,
        epilogue: Epilogue,
        scaled: bool,
    ) -> Result<bool> {
        self.ptrs = [a, b, c.unwrap_or(d), d];
        self.beta = if c.is_some() { 1.0 } else { 0.0 };
        let key = AlgoKey {
            device: dev.id(),
            dims: self.dims,
            in_type: self.in_type as i32,
            out_type: self.out_type as i32,
            epilogue,
            scaled,
            residual: c.is_some(),
            tuned: autotune::enabled(),
        };
        execute(dev, key, self)
    }

    /// Enqueues the matmul with `algo` on the handle's stream.
    fn run(&self, algo: &sys::cublasLtMatmulAlgo_t) -> std::result::Result<(), CublasError> {
        let stream = self.handle.stream();
        let (ws, _ws) = self.workspace.device_ptr(stream);
        let [a, b, c, d] = self.ptrs;
        let alpha = 1f32;
        // SAFETY: the caller set every pointer to a live allocation of the size its layout
        // states, held on this stream until it is done with the call; C = D only with beta = 0
        // (C is then not read); the workspace is LT_WORKSPACE bytes.
        unsafe {
            lt::matmul(
                *self.handle.handle(),
                self.desc.0,
                (&alpha) as *const f32 as *const _,
                (&self.beta) as *const f32 as *const _,
                a as *const _,
                self.a_l.0,
                b as *const _,
                self.b_l.0,
                c as *const _,
                self.c_l.0,
                d as *mut _,
                self.c_l.0,
                algo as *const _,
                ws as *mut _,
                LT_WORKSPACE,
                stream.cu_stream() as *mut _,
            )
        }
    }

    /// Up to HEURISTIC_RESULTS algorithms in the heuristic's order that fit the workspace.
    fn candidates(&self) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let pref = workspace_pref()?;
        // SAFETY: plain-data C structs, written by the heuristic below.
        let mut found: Vec<sys::cublasLtMatmulHeuristicResult_t> = (0..autotune::HEURISTIC_RESULTS)
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        let mut count = 0i32;
        // SAFETY: the descriptors are live; `found` holds the HEURISTIC_RESULTS entries asked for.
        let status = unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                *self.handle.handle(),
                self.desc.0,
                self.a_l.0,
                self.b_l.0,
                self.c_l.0,
                self.c_l.0,
                pref.0,
                found.len() as i32,
                found.as_mut_ptr(),
                &mut count,
            )
        };
        match status {
            sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {}
            sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED => return Ok(Vec::new()),
            e => return Err(candle_core::Error::wrap(CublasError(e))),
        }
        found.truncate(count.max(0) as usize);
        Ok(found
            .into_iter()
            .filter(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .filter(|h| h.workspaceSize <= LT_WORKSPACE)
            .map(|h| h.algo)
            .collect())
    }

    /// Copies the rows of D that candidates are compared on to the host (synchronising).
    fn read_compared_rows(&self) -> Result<Vec<u8>> {
        let stream = self.handle.stream();
        let blocks = autotune::compared_rows(self.rows, self.row_bytes);
        let mut host = vec![0u8; blocks.iter().map(|(_, r)| r * self.row_bytes).sum()];
        let mut at = 0;
        for (start, rows) in blocks {
            let len = rows * self.row_bytes;
            let src = self.ptrs[3] + (start * self.row_bytes) as u64;
            // SAFETY: rows start..start + rows of D, inside its m × row_bytes; the host range
            // is `len` bytes and outlives the synchronize below.
            unsafe {
                driver::result::memcpy_dtoh_async(&mut host[at..at + len], src, stream.cu_stream())
            }
            .map_err(candle_core::Error::wrap)?;
            at += len;
        }
        stream.synchronize().map_err(candle_core::Error::wrap)?;
        Ok(host)
    }
}

/// Whether an algorithm splits K (then its sums run in another order than the others'; with
/// one split its reduction scheme has nothing to reduce). Unreadable counts as splitting: only
/// algorithms known not to are timed.
fn splits_k(algo: &sys::cublasLtMatmulAlgo_t) -> bool {
    let mut splits = 1i32;
    let mut written = 0usize;
    // SAFETY: the attribute's documented type (int32), live for the call.
    let status = unsafe {
        sys::cublasLtMatmulAlgoConfigGetAttribute(
            algo,
            sys::cublasLtMatmulAlgoConfigAttributes_t::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
            (&mut splits) as *mut i32 as *mut _,
            std::mem::size_of::<i32>(),
            &mut written,
        )
    };
    status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || splits > 1
}

/// The algorithm chosen for each matmul key (None: cuBLASLt has none), fixed at the key's first
/// call for the life of the process.
fn algo_cache(
) -> std::sync::MutexGuard<'static, HashMap<AlgoKey, Option<sys::cublasLtMatmulAlgo_t>>> {
    static ALGOS: OnceLock<Mutex<HashMap<AlgoKey, Option<sys::cublasLtMatmulAlgo_t>>>> =
        OnceLock::new();
    ALGOS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Enqueues `call` with the algorithm for `key`: the cached one, or on the key's first call the
/// heuristic's first (untuned keys, and wherever timing is impossible: the stream capturing a
/// CUDA graph, or C = D read with beta = 1, which a repeat would change) or the fastest of its
/// candidates by [`autotune`]. The last run writes the real output. `Ok(false)`: cuBLASLt has
/// no algorithm for it.
fn execute(dev: &CudaDevice, key: AlgoKey, call: &LtCall) -> Result<bool> {
    let cached = algo_cache().get(&key).copied();
    if cached.is_none() && key.tuned && autotune::is_borrowing() {
        if let Some(algo) = borrowed(&key) {
            // Refused (this M does not fit its tiles): chosen below as any new shape is.
            if call.run(&algo).is_ok() {
                tracing::debug!(key = ?key, "cuBLASLt algorithm borrowed from a tuned shape");
                algo_cache().entry(key).or_insert(Some(algo));
                return Ok(true);
            }
        }
    }
    let algo = match cached {
        Some(algo) => algo,
        None => {
            let stream = dev.cuda_stream();
            let capturing = !matches!(
                stream.capture_status(),
                Ok(driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
            );
            let in_place = call.beta != 0.0 && call.ptrs[2] == call.ptrs[3];
            let found = call.candidates()?;
            // Timed: only algorithms that keep each dot product in one sequence (see
            // `autotune`); where the heuristic offers none, its first, as untimed keys take.
            let eligible: Vec<_> = match key.tuned {
                true => found.iter().copied().filter(|a| !splits_k(a)).collect(),
                false => Vec::new(),
            };
            let chosen = match !capturing && !in_place && eligible.len() > 1 {
                true => Some(tune(&key, call, &eligible)?),
                false => {
                    tracing::debug!(
                        key = ?key,
                        found = found.len(),
                        eligible = eligible.len(),
                        capturing,
                        in_place,
                        "cuBLASLt algorithm taken untimed (the heuristic's first)"
                    );
                    eligible.first().or(found.first()).copied()
                }
            };
            // A racing first call on another thread may have stored one already: keep that.
            *algo_cache().entry(key).or_insert(chosen)
        }
    };
    let Some(algo) = algo else {
        return Ok(false);
    };
    call.run(&algo).map_err(candle_core::Error::wrap)?;
    Ok(true)
}

/// The algorithm chosen for the shape nearest `key` in M and equal to it otherwise
/// (`autotune::borrowed_m`), among the chosen ones that do not split K.
fn borrowed(key: &AlgoKey) -> Option<sys::cublasLtMatmulAlgo_t> {
    let cache = algo_cache();
    let same_but_m = |k: &AlgoKey| {
        let m_as_key = AlgoKey {
            dims: [key.dims[0], k.dims[1], k.dims[2]],
            ..*k
        };
        m_as_key == *key
    };
    let usable = |k: &&AlgoKey, a: &&Option<sys::cublasLtMatmulAlgo_t>| {
        same_but_m(k) && a.as_ref().is_some_and(|a| !splits_k(a))
    };
    let m = autotune::borrowed_m(
        key.dims[0],
        cache
            .iter()
            .filter(|(k, a)| usable(k, a))
            .map(|(k, _)| k.dims[0]),
    )?;
    let mut from = *key;
    from.dims[0] = m;
    cache.get(&from).copied().flatten()
}

/// Runs each candidate (a warm-up, compared with the first one's output, then TIMED_RUNS timed
/// with CUDA events on the stream) and returns the fastest eligible one, or the first.
fn tune(
    key: &AlgoKey,
    call: &LtCall,
    candidates: &[sys::cublasLtMatmulAlgo_t],
) -> Result<sys::cublasLtMatmulAlgo_t> {
    let stream = call.handle.stream();
    let wrap = candle_core::Error::wrap;
    let timing = Some(driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let candidates = &candidates[..candidates.len().min(autotune::MAX_CANDIDATES)];
    let mut reference: Option<Vec<u8>> = None;
    let mut trials = Vec::with_capacity(candidates.len());
    for algo in candidates {
        if call.run(algo).is_err() {
            trials.push(Trial::Failed);
            continue;
        }
        let rows = call.read_compared_rows()?;
        match &reference {
            None => reference = Some(rows),
            Some(r) if *r != rows => {
                trials.push(Trial::Mismatch);
                continue;
            }
            Some(_) => {}
        }
        let mut marks = vec![stream.record_event(timing).map_err(wrap)?];
        let mut failed = false;
        for _ in 0..autotune::TIMED_RUNS {
            failed |= call.run(algo).is_err();
            marks.push(stream.record_event(timing).map_err(wrap)?);
        }
        let times = marks
            .windows(2)
            .map(|w| w[0].elapsed_ms(&w[1]).map_err(wrap))
            .collect::<Result<Vec<f32>>>()?;
        trials.push(match failed {
            true => Trial::Failed,
            false => Trial::Timed(times),
        });
    }
    let pick = autotune::pick_fastest(&trials);
    let ms = |i: usize| trials[i].median_ms().unwrap_or(f32::NAN);
    let count = |f: fn(&Trial) -> bool| trials.iter().filter(|t| f(t)).count();
    tracing::debug!(
        key = ?key,
        candidates = candidates.len(),
        mismatched = count(|t| matches!(t, Trial::Mismatch)),
        failed = count(|t| matches!(t, Trial::Failed)),
        chosen = ?pick,
        chosen_ms = pick.map_or(f32::NAN, ms),
        first_ms = ms(0),
        "cuBLASLt algorithm timed"
    );
    Ok(candidates[pick.unwrap_or(0)])
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
    let stream = dev.cuda_stream();
    let dt = <CudaBlasLT as Matmul<T>>::matrix_type();
    let e4m3 = sys::cudaDataType_t::CUDA_R_8F_E4M3;
    let mut out = unsafe { dev.alloc::<T>(m * n)? };
    let mut call = LtCall::new(dev, [m, n, k], e4m3, dt)?;
    let desc = call.desc.0;
    set_desc(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
    // Device pointers, held (with their stream syncs) until the matmul is enqueued.
    let (ws_ptr, _ws_sync) = ops.ws.device_ptr(&stream);
    let (xs_ptr, _xs_sync) = ops.xs.device_ptr(&stream);
    let mut epilogue = Epilogue::Default;
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
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws_ptr)?;
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs_ptr)?;
        epilogue = match *gelu {
            true => Epilogue::GeluBias,
            false => Epilogue::Bias,
        };
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue.lt())?;
        let (bias_ptr, sync) = bias.device_ptr(&stream);
        _bias_sync = Some(sync);
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
        c_view = *residual;
    }
    let (a, _a) = ops.wq.device_ptr(&stream);
    let (b, _b) = ops.xq.device_ptr(&stream);
    let (d, _d) = out.device_ptr_mut(&stream);
    let c = c_view.map(|v| v.device_ptr(&stream));
    let scaled = matches!(output, Fp8Output::Scaled { .. });
    let found = call.enqueue(
        dev,
        [a, b, d],
        c.as_ref().map(|(p, _)| *p),
        epilogue,
        scaled,
    )?;
    drop((_a, _b, _d, c));
    Ok(found.then_some(out))
}
