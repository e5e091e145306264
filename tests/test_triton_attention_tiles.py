"""The triton attention kernels at the tile shapes a GPU runs, under the interpreter: the split of
each block's loop into partial and full runs must visit every visible key once whatever the tile
shape, and the guarantees paid for on partial tiles only must hold on every tile."""
import pytest
import torch
import triton

import mmkernels
from attention_cases import Case
from mmkernels.backends.triton import co_attention as co
from mmkernels.backends.triton import cross_attention as attention
from test_cross_attention import check_backend

# (BLOCK_M, BLOCK_N): square, wide, tall; every one splits the cases below into partial and full runs.
SHAPES = [(32, 32), (16, 64), (64, 16)]
KERNELS = [attention._fwd_kernel, attention._bwd_dkdv_kernel, attention._bwd_dq_kernel,
           co._fwd_co_kernel, co._bwd_dkdv_co_kernel, co._bwd_dq_co_kernel]


@pytest.fixture(params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def tiles(request, monkeypatch):
    block_m, block_n = request.param
    for kernel in KERNELS:
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4)])
    return request.param


CASES = [
    Case(Lq=70, Lk=150),  # plain: full tiles with a partial tail
    Case(Lq=64, Lk=128, D=32),  # plain, every tile full
    Case(Lq=40, Lk=150, kv_lengths=True, q_lengths=True),
    Case(Lq=100, Lk=60, causal=True),  # Lq > Lk: the first rows see nothing
    Case(Lq=50, Lk=130, causal=True, kv_lengths=True, layout="blhd"),
    Case(Lq=45, Lk=140, ranges=True),
    Case(Lq=33, Lk=100, key_padding_mask=True, Hq=4, Hkv=1),
    Case(Lq=48, Lk=96, dropout=0.2, causal=True),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cross_attention_at_gpu_tile_shapes(tiles, case):
    check_backend("triton", case, torch.float32)


def test_co_attention_at_gpu_tile_shapes(tiles):
    torch.manual_seed(0)
    a = [torch.randn(2, 2, 70, 32) for _ in range(3)]
    b = [torch.randn(2, 2, 45, 32) for _ in range(3)]
    kw = dict(lengths_a=torch.tensor([70, 21]), lengths_b=torch.tensor([33, 45]))
    leaves = [t.clone().requires_grad_() for t in (*a, *b)]
    wide = [t.double().requires_grad_() for t in (*a, *b)]
    out = mmkernels.co_attention(*leaves, backend="triton", **kw)
    ref = mmkernels.co_attention(*wide, backend="reference", **kw)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r.float(), atol=2e-5, rtol=1e-4)
    grads = torch.autograd.grad(sum(o.sum() for o in out), leaves)
    ref_grads = torch.autograd.grad(sum(r.sum() for r in ref), wide)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), atol=5e-5, rtol=1e-4)


def _nonfinite_like_reference(got, ref):
    assert torch.equal(~torch.isfinite(got), ~torch.isfinite(ref)), "non-finite entries differ from the reference"
    torch.testing.assert_close(got.nan_to_num(0, 0, 0), ref.nan_to_num(0, 0, 0).to(got.dtype), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["plain", "kv_lengths", "ranges", "causal", "key_padding_mask"])
def test_visible_nonfinite_values_reach_exactly_the_outputs_they_reach_in_the_reference(tiles, kind):
    """A NaN in a V row and in a dO row that some rows see and others do not: on a partial tile the
    kernel marks the outputs it reaches; on a full tile the plain product carries it."""
    torch.manual_seed(0)
    B, H, Lq, Lk, D = 2, 2, 40, 100, 16
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    kw = {"kv_lengths": dict(kv_lengths=torch.tensor([100, 70])),
          "ranges": dict(kv_start=torch.randint(0, 50, (B, Lq)), kv_end=torch.randint(40, 101, (B, Lq))),
          "causal": dict(causal=True),
          "key_padding_mask": dict(key_padding_mask=torch.rand(B, Lk) < 0.2),
          "plain": {}}[kind]
    v[0, 1, 3, 5] = float("nan")  # tile 0: full for most rows
    v[1, 0, 65, 2] = float("nan")  # near the kv_lengths, causal and range edges
    grad = torch.randn(B, H, Lq, D)
    grad[1, 1, 30, 7] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    out = mmkernels.cross_attention(*leaves, backend="triton", **kw)
    ref = mmkernels.cross_attention(*wide, backend="reference", **kw)
    _nonfinite_like_reference(out, ref)
    for g, r in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, wide, grad.double())):
        _nonfinite_like_reference(g, r)


def test_the_transposed_dropout_draw_is_the_draw_transposed():
    """The dK/dV kernel draws the keep mask in its own (keys, rows) layout."""
    import triton.language as tl

    @triton.jit
    def draw(Seed, Out, OutT, threshold, ROWS: tl.constexpr, KEYS: tl.constexpr):
        rows = tl.arange(0, ROWS)
        keys = tl.arange(0, KEYS)
        keep = attention._keep(Seed, 1000, rows, 8, threshold, KEYS)
        keep_t = attention._keep_t(Seed, 1000, rows, 8, threshold, KEYS)
        tl.store(Out + rows[:, None] * KEYS + keys[None, :], keep.to(tl.int32))
        tl.store(OutT + keys[:, None] * ROWS + rows[None, :], keep_t.to(tl.int32))

    seed = torch.tensor([123456789], dtype=torch.int64)
    out, out_t = torch.zeros(16, 32, dtype=torch.int32), torch.zeros(32, 16, dtype=torch.int32)
    draw[(1,)](seed, out, out_t, 2**31, ROWS=16, KEYS=32)
    assert 0 < out.sum() < out.numel()
    assert torch.equal(out.T, out_t)
