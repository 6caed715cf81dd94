# cuDNN's legacy convolution API (what cudarc wraps) through ctypes on PyTorch tensors, channels-last bf16 at the
# VAE's 3x3 shapes: every forward algorithm's speed, and whether a sample's bits depend on its batch; then the
# fused conv + bias + residual (cudnnConvolutionBiasActivationForward, identity activation).
import ctypes, glob, os, sys, torch, torch.nn.functional as F
import nvidia.cudnn
libdir = os.path.join(list(nvidia.cudnn.__path__)[0], "lib")
for n in ["libcudnn_graph.so.9", "libcudnn_engines_precompiled.so.9", "libcudnn_engines_runtime_compiled.so.9",
          "libcudnn_heuristic.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9"]:
    ctypes.CDLL(os.path.join(libdir, n), mode=ctypes.RTLD_GLOBAL)
L = ctypes.CDLL(os.path.join(libdir, "libcudnn.so.9"))
print("cudnn version", L.cudnnGetVersion())
P = ctypes.c_void_p
def ck(r, what):
    if r != 0:
        raise RuntimeError(f"{what}: {L.cudnnGetErrorString.__call__(r) if False else r}")
h = P(); ck(L.cudnnCreate(ctypes.byref(h)), "create")
ck(L.cudnnSetStream(h, P(torch.cuda.current_stream().cuda_stream)), "stream")
NHWC, BF16, F32 = 1, 9, 0
def tdesc(n, c, hh, ww, dt=BF16):
    d = P(); ck(L.cudnnCreateTensorDescriptor(ctypes.byref(d)), "td")
    ck(L.cudnnSetTensor4dDescriptor(d, NHWC, dt, n, c, hh, ww), "td set"); return d
def fdesc(k, c):
    d = P(); ck(L.cudnnCreateFilterDescriptor(ctypes.byref(d)), "fd")
    ck(L.cudnnSetFilter4dDescriptor(d, BF16, NHWC, k, c, 3, 3), "fd set"); return d
cd = P(); ck(L.cudnnCreateConvolutionDescriptor(ctypes.byref(cd)), "cd")
ck(L.cudnnSetConvolution2dDescriptor(cd, 1, 1, 1, 1, 1, 1, 1, F32), "cd set")
ck(L.cudnnSetConvolutionMathType(cd, 1), "math")
act = P(); ck(L.cudnnCreateActivationDescriptor(ctypes.byref(act)), "ad")
ck(L.cudnnSetActivationDescriptor(act, 5, 0, ctypes.c_double(0.0)), "ad set")
one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
ws = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
def conv(algo, x, w, y, fused=None):
    n, hh, ww, c = x.shape; k = w.shape[0]
    xd, yd, wd = tdesc(n, c, hh, ww), tdesc(n, k, hh, ww), fdesc(k, c)
    sz = ctypes.c_size_t()
    r = L.cudnnGetConvolutionForwardWorkspaceSize(h, xd, wd, cd, yd, algo, ctypes.byref(sz))
    if r != 0: return f"ws err {r}"
    if sz.value > ws.numel(): return f"ws {sz.value>>20} MiB"
    if fused is None:
        r = L.cudnnConvolutionForward(h, ctypes.byref(one), xd, P(x.data_ptr()), wd, P(w.data_ptr()), cd, algo,
                                      P(ws.data_ptr()), sz, ctypes.byref(zero), yd, P(y.data_ptr()))
    else:
        bias, z, bdt = fused
        bd = tdesc(1, k, 1, 1, bdt)
        r = L.cudnnConvolutionBiasActivationForward(h, ctypes.byref(one), xd, P(x.data_ptr()), wd, P(w.data_ptr()), cd,
              algo, P(ws.data_ptr()), sz, ctypes.byref(one), yd, P(z.data_ptr()), bd, P(bias.data_ptr()), act, yd,
              P(y.data_ptr()))
    return None if r == 0 else f"err {r}"
def timeit(f, n=15):
    f(); torch.cuda.synchronize(); ts = []
    for _ in range(n):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts) // 2]
shapes = [("256px 128->128", 256, 128, 128), ("256px 256->128", 256, 256, 128), ("128px 256->256", 128, 256, 256),
          ("128px 512->256", 128, 512, 256), ("64px 512->512", 64, 512, 512), ("32px 512->512", 32, 512, 512)]
print("| shape | algo | ms B=8 | TFLOP/s | sample 0 same at B=1 / B=3 | max |err| vs torch |")
print("|---|---|---|---|---|---|")
for label, hw, ci, co in shapes:
    torch.manual_seed(0)
    x = torch.randn(8, hw, hw, ci, device="cuda").bfloat16()
    w = (torch.randn(co, 3, 3, ci, device="cuda") * 0.02).bfloat16()
    ref = F.conv2d(x.permute(0, 3, 1, 2).float(), w.permute(0, 3, 1, 2).float(), padding=1).permute(0, 2, 3, 1)
    for algo in range(8):
        y = torch.empty(8, hw, hw, co, device="cuda", dtype=torch.bfloat16)
        e = conv(algo, x, w, y)
        if e: print(f"| {label} | {algo} | {e} | | | |"); continue
        ms = timeit(lambda: conv(algo, x, w, y))
        y1 = torch.empty(1, hw, hw, co, device="cuda", dtype=torch.bfloat16); conv(algo, x[:1].contiguous(), w, y1)
        y3 = torch.empty(3, hw, hw, co, device="cuda", dtype=torch.bfloat16); conv(algo, x[:3].contiguous(), w, y3)
        err = (y.float() - ref).abs().max().item()
        print(f"| {label} | {algo} | {ms:.3f} | {2*9*ci*co*hw*hw*8/ms/1e9:.0f} | {torch.equal(y[:1], y1)} / {torch.equal(y[:3], y3)} | {err:.3g} |")
    # fused bias + residual, algo 1
    for bdt, bt in ((BF16, torch.bfloat16), (F32, torch.float32)):
        bias = torch.randn(co, device="cuda", dtype=bt); z = torch.randn(8, hw, hw, co, device="cuda").bfloat16()
        y = torch.empty(8, hw, hw, co, device="cuda", dtype=torch.bfloat16)
        e = conv(1, x, w, y, (bias, z, bdt))
        if e: print(f"| {label} | fused bias {bt} | {e} | | | |"); continue
        ms = timeit(lambda: conv(1, x, w, y, (bias, z, bdt)))
        y1 = torch.empty(1, hw, hw, co, device="cuda", dtype=torch.bfloat16); conv(1, x[:1].contiguous(), w, y1, (bias, z[:1].contiguous(), bdt))
        err = (y.float() - (ref + bias.float() + z.float())).abs().max().item()
        print(f"| {label} | fused 1, bias {bt} | {ms:.3f} | {2*9*ci*co*hw*hw*8/ms/1e9:.0f} | {torch.equal(y[:1], y1)} / - | {err:.3g} |")
