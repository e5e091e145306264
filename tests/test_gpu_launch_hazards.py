"""What would break the first time the GPU kernels run, checked without a GPU: launches on the
wrong device, host syncs, grid axes past their limits, shared memory a GPU does not have, and
GPUs the binary cannot run on. (tests/test_gpu.py checks the rest on a GPU.)"""
import contextlib
import inspect
import os

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import mmkernels
from mmkernels import backends, spec
from mmkernels.backends import native
from mmkernels.backends.triton import budgets
from mmkernels.limits import CUDA_ATTENTION_TILES

TRITON_DIR = os.path.dirname(inspect.getfile(budgets))
GRID_LIMITS = (2**31 - 1, 65_535, 65_535)


@contextlib.contextmanager
def recorded_grids():
    """Triton launches record their grids instead of running (the interpreter's entry point)."""
    grids, run = [], InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        resolved = grid(kwargs) if callable(grid) else grid
        grids.append((self.fn.__name__, tuple(resolved)))

    InterpretedFunction.run = record
    try:
        yield grids
    finally:
        InterpretedFunction.run = run


def test_grid_axes_stay_within_limits_for_many_batches_and_heads():
    """B x H = 70,000 (past the 65,535 of a grid's second axis): every launch folds batch and heads
    into the first axis, which takes 2^31 - 1 programs."""
    B, H, L, D = 35_000, 2, 5, 16
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    with recorded_grids() as grids:
        out = mmkernels.cross_attention(q, k, v, kv_lengths=torch.full((B,), L), causal=True, backend="triton")
        out.sum().backward()
        mmkernels.cross_attention(q[:, :, :3], k, v, backend="triton")  # a decoding step
        a = [torch.randn(B, H, L, D, requires_grad=True) for _ in range(3)]
        outs = mmkernels.co_attention(*a, *a, backend="triton")
        sum(o.sum() for o in outs).backward()
    assert {name for name, _ in grids} >= {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_delta_kernel",
                                          "_fwd_co_kernel", "_bwd_dkdv_co_kernel", "_bwd_dq_co_kernel", "_decode_kernel"}
    for name, grid in grids:
        assert all(n <= limit for n, limit in zip(grid, GRID_LIMITS)), f"{name} grid {grid} exceeds {GRID_LIMITS}"


def _spy():
    def spy(*args):
        spy.device = torch.cuda.current_device()
        return "done"

    spy.device = None
    return spy


def test_triton_kernels_run_under_their_inputs_device(monkeypatch):
    """Triton launches on torch's current device and stream: every triton kernel the dispatcher
    hands out enters the device of its first tensor (a model spread over GPUs passes cuda:1
    tensors while cuda:0 is current)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    current = [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])

    @contextlib.contextmanager
    def device(d):
        saved, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = saved

    monkeypatch.setattr(torch.cuda, "device", device)
    with FakeTensorMode():
        on_1 = torch.empty(2, 3, device="cuda:1")
    spy = _spy()
    assert backends._on_inputs_device(spy)([on_1], 3) == "done" and spy.device == 1  # found inside a list too
    assert current[0] == 0
    names = [n for op in spec.SPECS for n in (op, f"{op}_backward") if "triton" in spec.SPECS[op].backends]
    for name in names:
        fn = backends.kernel("triton", name)
        assert fn.__code__ is backends._on_inputs_device(spy).__code__, f"triton {name} is not run under its inputs' device"


def test_triton_wrappers_build_no_device_tensors_from_python_values(monkeypatch):
    """torch.tensor([...], device=cuda) is a host-to-device copy and a sync on every call (and
    breaks CUDA-graph capture): kernel metadata travels as arguments. Every triton op, forward and
    backward, with torch.tensor and torch.as_tensor watched from the triton backend's files."""
    calls = []
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def watched(*args, _original=original, _name=name, **kwargs):
            caller = inspect.stack()[1].filename
            if caller.startswith(TRITON_DIR):
                calls.append(f"torch.{_name} in {os.path.basename(caller)}")
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, watched)
    for name, op in spec.SPECS.items():
        if "triton" not in op.backends:
            continue
        out = getattr(torch.ops.mmkernels, name)(*op.example(), "triton")
        outs = out if isinstance(out, (tuple, list)) else [out]
        loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    assert calls == []


def test_cuda_kernels_fit_the_smallest_shared_memory_they_run_on():
    """sm_86 and sm_89 run the sm_80 code with 101,376 B of shared memory per block."""
    for kernel, tiles in CUDA_ATTENTION_TILES.items():
        for head_dim, tile in tiles.items():
            assert tile["shared_bytes"] <= budgets.SMALLEST_SM80_SHARED, (kernel, head_dim, tile)


def test_cuda_attention_refused_where_the_gpu_has_too_little_shared_memory(monkeypatch):
    from mmkernels.backends.base import Problem

    p = Problem("cross_attention", torch.device("cuda", 0), torch.float16, head_dim=128)
    monkeypatch.setattr(native, "gpu_index", lambda device: 0)  # as on a machine with a GPU
    monkeypatch.setattr(native, "_shared_optin", lambda index: 48 * 1024)
    assert "shared memory" in native.attention_fits(p)
    monkeypatch.setattr(native, "_shared_optin", lambda index: budgets.SMALLEST_SM80_SHARED)
    assert native.attention_fits(p) is None


def test_triton_attention_refused_where_the_gpu_has_too_little_shared_memory(monkeypatch):
    """A 9.x-or-newer GPU with less shared memory per block than an H100 reads the sm_90 column,
    whose hd128 forward shapes need more than 101,376 B: refused with the reason (auto moves on)
    rather than an autotuner left with no config at launch."""
    from mmkernels.backends import triton as triton_backend
    from mmkernels.backends.base import Problem

    p = Problem("cross_attention", torch.device("cuda", 0), torch.float16, head_dim=128)
    monkeypatch.setattr(triton_backend, "gpu_index", lambda device: 0)  # as on a machine with a GPU
    for target, shared, refused in (("sm_90", 232_448, False), ("sm_90", budgets.SMALLEST_SM80_SHARED, True),
                                    ("sm_80", budgets.SMALLEST_SM80_SHARED, False)):
        monkeypatch.setattr(triton_backend, "_gpu_target", lambda index, t=target, s=shared: (t, s))
        why = triton_backend.attention_fits(p)
        assert (why is not None) == refused, (target, shared, why)
        if refused:
            assert f"fits the {shared} B of shared memory a block may use on this GPU" in why


@pytest.mark.parametrize("capability, runs", [((7, 5), False), ((8, 0), True), ((8, 6), True), ((8, 9), True),
                                              ((9, 0), True), ((10, 0), True), ((12, 0), True)])
def test_which_gpus_the_cuda_build_runs_on(capability, runs):
    """Cubins for sm_80 and sm_90 and the PTX of sm_90: an sm_86 runs the sm_80 cubin, a Blackwell
    compiles the PTX, a T4 (sm_75) is refused with the reason, so auto moves on."""
    why = native.runs_on(capability, archs=(80, 90))
    assert (why is None) == runs, why
    assert native.runs_on((8, 6), archs=(90,)) is not None  # no sm_8x cubin and older than the PTX


def _gpu_prune(monkeypatch, kernel):
    """The early_config_prune a GPU run of `kernel` gets, compiled for sm_90 (no GPU needed)."""
    from mmkernels.backends.triton import config

    monkeypatch.setattr(config, "INTERPRET", False)
    monkeypatch.setattr(budgets, "TARGET", "sm_90")
    tune = config.attention_autotune(kernel, key=["BLOCK_D"])
    return tune["configs"], tune["prune_configs_by"]["early_config_prune"]


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_deterministic_mode_takes_one_fixed_tile_without_timing(monkeypatch, kernel):
    """The autotuner picks by timing and the tile orders the online softmax's sums: with
    torch.use_deterministic_algorithms on (DETERMINISTIC), the prune leaves exactly the table's first
    shape, so there is nothing to time and every process runs the same tile."""
    configs, prune = _gpu_prune(monkeypatch, kernel)
    q = torch.empty(1, 1, 1, 64, dtype=torch.float16)
    flags = dict(BLOCK_D=64, HAS_MASK=False, DROPOUT=False, HAS_START=False, HAS_END=False, CAUSAL=False)
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    timed = prune(configs, {"q": q}, **flags, DETERMINISTIC=False)
    fixed = prune(configs, {"q": q}, **flags, DETERMINISTIC=True)
    table = budgets.fits(kernel, "float16", 64, "plain", "sm_90")
    assert [shape(c) for c in timed] == [s for s in budgets.ATTENTION_CANDIDATES[kernel] if s in table]
    assert len(timed) >= 1 and [shape(c) for c in fixed] == [shape(timed[0])]


def test_first_autotuning_is_serialised_across_threads(monkeypatch):
    """Triton's Autotuner is not thread-safe: the wrapper holds a lock around each run, so two
    threads' cold first calls never benchmark and write its state at once."""
    import threading
    import time

    from triton.runtime.autotuner import Autotuner

    from mmkernels.backends.triton import config

    inside, most = [0], [0]

    def slow_run(self, *args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        inside[0] -= 1

    monkeypatch.setattr(Autotuner, "run", slow_run)

    import triton

    @config.autotune("fwd", key=["BLOCK_D"])
    @triton.jit
    def kernel(x, BLOCK_D):
        pass

    threads = [threading.Thread(target=kernel.run, args=(1,), kwargs={"BLOCK_D": 16}) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
