"""Small calls of every GPU kernel, forward and backward: what tools/gpu_check.py runs under
compute-sanitizer (memcheck, racecheck, synccheck). Small shapes, padded and ragged, so that
edge tiles and skipped tiles are both exercised.

A backend that refuses a case its support table claims is an error here, not a note: a sanitizer
that saw no launch would report "clean" for nothing. The last line says how many calls ran, and
tools/gpu_check.py checks it against EXPECTED_CALLS."""
import torch

import mmkernels
from mmkernels import spec
from mmkernels.backends import native

CALLS = []


def claimed(backend, op, dtype, head_dim=0):
    """Whether the support table (the spec's capability: dtypes and head dims) claims the case."""
    capability = spec.SPECS[op].backends.get(backend)
    if capability is None or dtype not in capability.dtypes or (backend == "cuda" and not native.CUDA_COMPILED):
        return False
    return not head_dim or capability.head_dims is None or head_dim in capability.head_dims


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
        CALLS.append(f"{backend} cross_attention {dtype} hd{D} {'+'.join(kw)}")


def fusion(backend, dtype):
    feats = [torch.randn(300, d, device="cuda", dtype=dtype, requires_grad=True) for d in (64, 96, 40)]
    weight = torch.randn(3, 200, device="cuda", dtype=dtype, requires_grad=True)
    out = mmkernels.concat_weighted_fusion(feats, weight, None, backend=backend)
    torch.autograd.grad(out.float().sum(), feats)
    CALLS.append(f"{backend} concat_weighted_fusion {dtype}")
    if claimed(backend, "linear_fusion", dtype):
        ws = [torch.randn(128, f.shape[1], device="cuda", dtype=dtype) for f in feats]
        mmkernels.linear_fusion(feats, ws, activation="gelu", backend=backend).float().sum().backward()
        CALLS.append(f"{backend} linear_fusion {dtype}")
    if claimed(backend, "decision_fusion", dtype):
        logits = [torch.randn(300, 100, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
        mmkernels.decision_fusion(logits, backend=backend).float().sum().backward()
        CALLS.append(f"{backend} decision_fusion {dtype}")


def main():
    for backend in ("triton", "cuda"):
        for dtype in (torch.float16, torch.bfloat16):
            for D in (64, 128):
                if claimed(backend, "cross_attention", dtype, D):
                    attention(backend, dtype, D)
                else:
                    print(f"not claimed: {backend} cross_attention {dtype} hd{D}")
            if claimed(backend, "concat_weighted_fusion", dtype):
                fusion(backend, dtype)
    torch.cuda.synchronize()
    for call in CALLS:
        print(f"ran {call}")
    print(f"gpu_smoke: ran {len(CALLS)} calls")


if __name__ == "__main__":
    main()
