# cuDNN (through PyTorch) 3x3 convolutions at the VAE decoder's shapes, channels-last bf16: speed, and whether a
# sample's output bits depend on the batch it is in.
import sys, torch, torch.nn.functional as F
torch.backends.cuda.matmul.allow_tf32 = False
dev = "cuda"
shapes = [  # (label, H=W, Cin, Cout)
    ("256px 128->128", 256, 128, 128), ("256px 256->128", 256, 256, 128),
    ("128px 256->256", 128, 256, 256), ("128px 512->256", 128, 512, 256),
    ("64px 512->512", 64, 512, 512), ("32px 512->512", 32, 512, 512),
    ("up 256px 256->256", 256, 256, 256), ("up 128px 512->512", 128, 512, 512),
]
def timeit(f, n=20):
    for _ in range(3): f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]
print(torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_name())
for bench in (False, True):
    torch.backends.cudnn.benchmark = bench
    print(f"\n## cudnn.benchmark={bench}")
    print("| shape | B | ms | TFLOP/s | bits of sample 0 same at B=1,3,8 |")
    print("|---|---|---|---|---|")
    for label, hw, ci, co in shapes:
        torch.manual_seed(0)
        w = (torch.randn(co, ci, 3, 3, device=dev) * 0.02).to(torch.bfloat16).to(memory_format=torch.channels_last)
        bias = torch.randn(co, device=dev).to(torch.bfloat16)
        for B in (8, 16):
            x = torch.randn(B, ci, hw, hw, device=dev).to(torch.bfloat16).to(memory_format=torch.channels_last)
            ms = timeit(lambda: F.conv2d(x, w, bias, padding=1))
            fl = 2 * 9 * ci * co * hw * hw * B
            same = ""
            if B == 8:
                y8 = F.conv2d(x, w, bias, padding=1)
                y1 = F.conv2d(x[:1].contiguous(memory_format=torch.channels_last), w, bias, padding=1)
                y3 = F.conv2d(x[:3].contiguous(memory_format=torch.channels_last), w, bias, padding=1)
                same = f"{torch.equal(y8[:1], y1)} / {torch.equal(y8[:3], y3)}"
            print(f"| {label} | {B} | {ms:.3f} | {fl/ms/1e9:.0f} | {same} |")
            del x
