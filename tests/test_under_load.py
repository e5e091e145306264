"""The CPU kernels on a machine where another process keeps a core busy (a DataLoader worker,
a tokenizer, a second job): no cliff. Each kernel is timed side by side with what a user would
run instead, in the same machine state; the bounds are generous, this guards against the 50-100x
collapse that nested BLAS teams spinning at their barriers once caused, not a benchmark target.
Marked slow, and still run by `make test`. (On our machines the old code gave 1.7-1.8x SDPA's
time under load, not the 50-100x seen elsewhere; its root cause, kernels that ran on one thread,
is pinned deterministically by test_cpu_kernels_run_on_every_thread.)"""
import os

import pytest
import torch
import torch.nn.functional as F
import torch.utils.benchmark as tbench

import mmkernels
from mmkernels.bench.measure import busy_core

two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2 or torch.get_num_threads() < 2, reason="needs two cores and threads")


@two_cores
def test_cpu_kernels_run_on_every_thread():
    """at::parallel_for is header code that parallelises with OpenMP: an extension built without
    -fopenmp ran every CPU kernel on one thread, and only MKL's nested teams inside it used the
    other core (spinning at their barriers when a process shared it)."""
    assert mmkernels._C.parallel_threads() == torch.get_num_threads()


def median_ms(fn):
    fn()
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.3).median * 1e3


def attention_cases():
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g)
    q, k, v = make(4, 8, 128, 64), make(4, 8, 1024, 64), make(4, 8, 1024, 64)
    lengths = torch.randint(256, 1025, (4,), generator=g)
    mask = (torch.arange(1024) < lengths[:, None]).view(4, 1, 1, 1024)
    qb, kb, vb = (make(1, 8, 512, 64).requires_grad_() for _ in range(3))
    grad = make(1, 8, 512, 64)
    yield "fwd", lambda: mmkernels.cross_attention(q, k, v, backend="cpu"), lambda: F.scaled_dot_product_attention(q, k, v)
    yield ("fwd ragged", lambda: mmkernels.cross_attention(q, k, v, kv_lengths=lengths, backend="cpu"),
           lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    yield ("fwd+bwd", lambda: torch.autograd.grad(mmkernels.cross_attention(qb, kb, vb, backend="cpu"), (qb, kb, vb), grad),
           lambda: torch.autograd.grad(F.scaled_dot_product_attention(qb, kb, vb), (qb, kb, vb), grad))


def fusion_cases():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(16384, 256, generator=g) for _ in range(3)]
    weight, bias = torch.randn(3, 768, generator=g) / 28, torch.zeros(3)

    def eager():
        w = torch.softmax(F.linear(torch.cat(features, -1), weight, bias), -1)
        return (torch.stack(features, -1) * w.unsqueeze(-2)).sum(-1)

    logits = [torch.randn(4096, 1000, generator=g) for _ in range(3)]
    yield "concat_weighted_fusion", lambda: mmkernels.concat_weighted_fusion(features, weight, bias, backend="cpu"), eager
    yield ("decision_fusion", lambda: mmkernels.decision_fusion(logits, backend="cpu"),
           lambda: torch.stack([torch.softmax(x, -1) for x in logits]).mean(0))


@pytest.mark.slow
@two_cores
@pytest.mark.parametrize("kind", ["attention", "fusion"])
def test_no_cliff_with_a_busy_core(kind):
    cases = list(attention_cases() if kind == "attention" else fusion_cases())
    idle = {name: (median_ms(ours), median_ms(peer)) for name, ours, peer in cases}
    with busy_core():
        loaded = {name: (median_ms(ours), median_ms(peer)) for name, ours, peer in cases}
    report = {name: dict(ours_over_peer=round(loaded[name][0] / loaded[name][1], 2),
                         our_slowdown=round(loaded[name][0] / idle[name][0], 2),
                         peer_slowdown=round(loaded[name][1] / idle[name][1], 2)) for name in idle}
    for name, r in report.items():
        # Under load our time over the peer's should stay <= 1.4 (attention at >= 0.7x SDPA's
        # speed); the collapse this guards against was 50-100. And a busy core may slow us down
        # about as much as it slows ATen's own kernels, not several times more.
        assert r["ours_over_peer"] <= 3.0, f"{name} with a busy core: {r}"
        assert r["our_slowdown"] <= 1.5 * r["peer_slowdown"] + 0.5, f"{name} degrades more than its peer under load: {r}"
