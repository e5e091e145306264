"""Small calls of every GPU kernel, forward and backward: what tools/gpu_check.py runs under
compute-sanitizer (memcheck, racecheck, synccheck). Small shapes, padded and ragged, so that
edge tiles and skipped tiles are both exercised."""
import torch

import mmkernels
from mmkernels.backends import BackendUnavailable


def attention(backend, dtype, D):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 37, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 70, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 70, D, device="cuda", dtype=dtype, requires_grad=True)
    lengths = torch.tensor([70, 33], device="cuda")
    mask = torch.rand(2, 70, device="cuda") < 0.2
    start = torch.randint(0, 30, (2, 37), device="cuda")
    for kw in (dict(kv_lengths=lengths), dict(key_padding_mask=mask, causal=True), dict(kv_start=start, dropout_p=0.1)):
        out = mmkernels.cross_attention(q, k, v, backend=backend, **kw)
        torch.autograd.grad(out.float().sum(), (q, k, v))


def fusion(backend, dtype):
    feats = [torch.randn(300, d, device="cuda", dtype=dtype, requires_grad=True) for d in (64, 96, 40)]
    weight = torch.randn(3, 200, device="cuda", dtype=dtype, requires_grad=True)
    out = mmkernels.concat_weighted_fusion(feats, weight, None, backend=backend)
    torch.autograd.grad(out.float().sum(), feats)
    ws = [torch.randn(128, f.shape[1], device="cuda", dtype=dtype) for f in feats]
    mmkernels.linear_fusion(feats, ws, activation="gelu", backend=backend).float().sum().backward()
    logits = [torch.randn(300, 100, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
    mmkernels.decision_fusion(logits, backend=backend).float().sum().backward()


def main():
    for backend in ("triton", "cuda"):
        for dtype in (torch.float16, torch.bfloat16):
            for D in (64, 128):
                try:
                    attention(backend, dtype, D)
                except BackendUnavailable as e:
                    print(f"{backend} attention {dtype} hd{D}: {e}")
            try:
                fusion(backend, dtype)
            except BackendUnavailable as e:
                print(f"{backend} fusion {dtype}: {e}")
    torch.cuda.synchronize()
    print("gpu_smoke: done")


if __name__ == "__main__":
    main()
