"""MultimodalClassifier, and training a stock model and its patched twin side by side."""
import copy

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.models import MultimodalClassifier
from stock_layers import AttentionFusionModule


def batch(B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 1000, (B, 12), generator=g)
    padding = torch.arange(12) >= torch.randint(4, 13, (B, 1), generator=g)
    image = torch.randn(B, 3, 16, 16, generator=g)
    audio = torch.randn(B, 10, 40, generator=g)
    lengths = torch.randint(1, 11, (B,), generator=g)
    labels = torch.randint(0, 10, (B,), generator=g)
    return (text, image, audio), dict(text_padding=padding, audio_lengths=lengths), labels


@pytest.mark.parametrize("fusion", ["concat_weighted", "cross_attention"])
def test_multimodal_classifier_learns_and_matches_reference(fusion):
    torch.manual_seed(0)
    model = MultimodalClassifier(fusion=fusion)
    args, kwargs, labels = batch()
    with mmkernels.use_backend("reference"):
        expected = model(*args, **kwargs)
    torch.testing.assert_close(model(*args, **kwargs), expected, atol=1e-5, rtol=1e-4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(*args, **kwargs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


class StockModel(nn.Module):
    """A tiny text-image model made of stock layers only: what a user already has."""

    def __init__(self, dim=32):
        super().__init__()
        self.token = nn.Embedding(1000, dim)
        self.patches = nn.Conv2d(3, dim, 8, 8)
        self.cross = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.audio = nn.Linear(40, dim)
        self.fusion = AttentionFusionModule({"text": dim, "image": dim, "audio": dim})
        self.head = nn.Linear(dim, 10)

    def forward(self, text, image, audio, text_padding, audio_lengths):
        t = self.token(text)
        img = self.patches(image).flatten(2).transpose(1, 2)
        attended, _ = self.cross(t, img, img, need_weights=False)
        a = self.audio(audio)
        valid = (torch.arange(a.shape[1]) < audio_lengths.view(-1, 1)).unsqueeze(-1).float()
        pooled = {"text": (t + attended).mean(1), "image": img.mean(1), "audio": (a * valid).sum(1) / valid.sum(1)}
        return self.head(self.fusion(pooled))


def test_convergence_stock_vs_patched():
    """Liger-Kernel style: same seed, same data, 30 steps; per-step losses and final weights agree."""
    torch.manual_seed(0)
    stock = StockModel()
    patched = copy.deepcopy(stock)
    report = mmkernels.patch(patched)
    assert len(report.replaced) == 2
    opts = [torch.optim.AdamW(m.parameters(), lr=2e-3) for m in (stock, patched)]
    for step in range(30):
        args, kwargs, labels = batch(seed=step)
        losses = []
        for model, opt in zip((stock, patched), opts):
            loss = nn.functional.cross_entropy(model(*args, **kwargs), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5), f"step {step}: {losses}"
        # The key bias has a gradient of exactly 0 in exact arithmetic (softmax does not change
        # when every score of a row moves by the same amount), so both models see rounding noise
        # there, which AdamW scales up to full steps: compare that slice by its gradient instead.
        E = stock.cross.embed_dim
        for model in (stock, patched):
            assert model.cross.in_proj_bias.grad[E : 2 * E].abs().max() < 1e-5
    E = stock.cross.embed_dim
    for (name, a), b in zip(stock.state_dict().items(), patched.state_dict().values()):
        if name == "cross.in_proj_bias":
            a, b = torch.cat([a[:E], a[2 * E :]]), torch.cat([b[:E], b[2 * E :]])
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=f"{name} drifted")
