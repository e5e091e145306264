"""cross_attention cases (plain, and with the masks real models pass) and the peers a user would
pick instead."""
import contextlib
import dataclasses

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.bench.backends import contenders


@dataclasses.dataclass
class AttentionCase:
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    padded: bool  # kv_lengths uniform in [Lk/4, Lk], else every key is real
    mode: str  # "fwd" or "fwd+bwd"
    memory_only: bool = False  # one call per provider: the case is about peak memory

    op = "cross_attention"

    @property
    def shape(self):
        return f"B{self.B} H{self.H} Lq{self.Lq} Lk{self.Lk} D{self.D}"

    def inputs(self, device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        make = lambda L: torch.randn(self.B, self.H, L, self.D, generator=g).to(device, dtype)
        q, k, v = make(self.Lq), make(self.Lk), make(self.Lk)
        lengths = None
        if self.padded:
            lengths = torch.randint(self.Lk // 4, self.Lk + 1, (self.B,), generator=g).to(device)
        return q, k, v, lengths

    def differentiable(self, inputs):
        q, k, v, lengths = inputs
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return leaves, (*leaves, lengths)

    def flops(self, lengths) -> float:
        """Counting only the real (unpadded) keys; backward is 2.5x the forward's matmuls."""
        keys = float(lengths.sum()) if lengths is not None else self.B * self.Lk
        fwd = 4.0 * self.H * self.Lq * keys * self.D
        return fwd * (3.5 if self.mode == "fwd+bwd" else 1.0)

    def lengths_label(self, lengths):
        return "-" if lengths is None else "/".join(str(int(x)) for x in lengths)


def _bool_mask(q, k, lengths):
    if lengths is None:
        return None
    return (torch.arange(k.shape[2], device=q.device) < lengths.view(-1, 1)).view(q.shape[0], 1, 1, -1)


def eager(q, k, v, lengths):
    """The composite of the math: materialises the (Lq, Lk) scores."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = _bool_mask(q, k, lengths)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _sdpa(backend):
    def run(q, k, v, lengths):
        ctx = torch.nn.attention.sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=_bool_mask(q, k, lengths))

    return run


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def run(q, k, v, lengths):
        key = (q.shape, k.shape, None if lengths is None else tuple(lengths.tolist()))
        if key not in cache:  # the BlockMask is built once per shape and lengths, as a user would
            if lengths is None:
                cache[key] = None
            else:
                mod = lambda b, h, qi, ki: ki < lengths[b]
                cache[key] = create_block_mask(mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
        return compiled(q, k, v, block_mask=cache[key])

    return run


def providers(case, device, dtype, full: bool):
    """name -> callable(q, k, v, lengths) -> out; the first peer is the correctness oracle."""
    out = {"eager": eager}
    for name in contenders("cross_attention", device, dtype, head_dim=case.D):
        out[f"mmkernels-{name}"] = (lambda backend: lambda q, k, v, lengths: mmkernels.cross_attention(q, k, v, kv_lengths=lengths, backend=backend))(name)
    out["sdpa"] = _sdpa(None)
    out["sdpa-math"] = _sdpa(torch.nn.attention.SDPBackend.MATH)
    if device.type == "cuda":
        out["sdpa-flash"] = _sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
        out["sdpa-efficient"] = _sdpa(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION)
        out["sdpa-cudnn"] = _sdpa(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
    if device.type == "cuda" or full:
        out["flex"] = _flex()
        out["compile"] = torch.compile(eager, dynamic=False)
    with contextlib.suppress(ImportError):
        from flash_attn import flash_attn_func

        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            out["flash-attn"] = lambda q, k, v, lengths: None if lengths is not None else flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return out


def _images(B, Lq, Lk, device):
    """Interleaved images: row 0 (BOS) sees nothing, the first half of the text sees image 1
    (the first half of the keys), the second half image 2."""
    i = torch.arange(Lq, device=device)
    start = torch.where(i < Lq // 2, 0, Lk // 2).expand(B, Lq).contiguous()
    end = torch.where(i < Lq // 2, Lk // 2, Lk).expand(B, Lq).contiguous()
    start[:, 0] = end[:, 0] = 0
    return start, end


@dataclasses.dataclass
class MaskedAttentionCase:
    """The masks real models pass. mask="images": per-row key ranges (two interleaved images),
    against SDPA given the equivalent boolean mask and FlexAttention with a cached BlockMask;
    mask="padding": a right-padded key_padding_mask against the equal kv_lengths; mask="none":
    every key seen (a decoding step over a full cache: Lq 1), against SDPA without a mask."""

    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    mask: str
    mode: str
    memory_only: bool = False

    op = "cross_attention"

    @staticmethod
    def peers(case, device, dtype, full):
        return masked_providers(case, device, dtype, full)

    @property
    def shape(self):
        return f"B{self.B} H{self.Hq}/{self.Hkv} Lq{self.Lq} Lk{self.Lk} D{self.D} {self.mask}"

    def inputs(self, device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        make = lambda H, L: torch.randn(self.B, H, L, self.D, generator=g).to(device, dtype)
        q, k, v = make(self.Hq, self.Lq), make(self.Hkv, self.Lk), make(self.Hkv, self.Lk)
        if self.mask == "images":
            start, end = _images(self.B, self.Lq, self.Lk, device)
            j = torch.arange(self.Lk, device=device)
            visible = (j >= start[..., None]) & (j < end[..., None])
            given = dict(kv_start=start, kv_end=end)
        elif self.mask == "none":
            visible = torch.ones(self.B, self.Lq, self.Lk, dtype=torch.bool, device=device)
            given = {}
        else:
            lengths = torch.randint(self.Lk // 4, self.Lk + 1, (self.B,), generator=g).to(device)
            padding = torch.arange(self.Lk, device=device) >= lengths[:, None]
            visible = (~padding).unsqueeze(1).expand(self.B, self.Lq, self.Lk)
            given = dict(kv_lengths=lengths, key_padding_mask=padding)
        return q, k, v, visible.unsqueeze(1), given

    def differentiable(self, inputs):
        q, k, v, visible, ranges = inputs
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        return leaves, (*leaves, visible, ranges)

    def flops(self, visible) -> float:
        """Counting only the visible (query, key) pairs."""
        fwd = 4.0 * self.Hq * self.D * float(visible.sum())
        return fwd * (3.5 if self.mode == "fwd+bwd" else 1.0)

    def lengths_label(self, visible):
        return self.mask


def masked_eager(q, k, v, visible, given):
    """The composite with the boolean mask; rows that see nothing give 0."""
    kx, vx = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    scores = ((q @ kx.transpose(-1, -2)) * q.shape[-1] ** -0.5).masked_fill(~visible, float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ vx


def _masked_flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def run(q, k, v, visible, given):
        key = (q.shape, k.shape, visible.data_ptr())
        if key not in cache:  # built once per mask, as a user would
            vis = visible[:, 0]
            cache[key] = create_block_mask(lambda b, h, qi, ki: vis[b, qi, ki], q.shape[0], None, q.shape[2], k.shape[2],
                                           device=q.device)
        return torch.nan_to_num(compiled(q, k, v, block_mask=cache[key], enable_gqa=q.shape[1] != k.shape[1]))

    return run


def masked_providers(case, device, dtype, full: bool):
    out = {"eager": masked_eager}
    for name in contenders("cross_attention", device, dtype, head_dim=case.D):
        if case.mask in ("images", "none"):
            out[f"mmkernels-{name}"] = (lambda backend: lambda q, k, v, vis, given: mmkernels.cross_attention(
                q, k, v, **given, backend=backend))(name)
        else:  # the same padding, given as lengths and as a mask
            for kind in ("kv_lengths", "key_padding_mask"):
                out[f"mmkernels-{name}-{kind.split('_')[-1]}"] = (lambda backend, kind: lambda q, k, v, vis, given: mmkernels.cross_attention(
                    q, k, v, **{kind: given[kind]}, backend=backend))(name, kind)
    gqa = case.Hq != case.Hkv
    if case.mask == "none":
        out["sdpa"] = lambda q, k, v, vis, given: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:
        out["sdpa"] = lambda q, k, v, vis, given: torch.nan_to_num(F.scaled_dot_product_attention(q, k, v, attn_mask=vis, enable_gqa=gqa))
    if case.mask == "images":
        out["flex"] = _masked_flex()
    return out
