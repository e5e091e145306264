"""mmkernels in five steps, on a model built from stock PyTorch layers.

    python examples/tutorial.py              # tiny: a few seconds on a laptop CPU
    python examples/tutorial.py --size real  # the real dimensions (minutes on a CPU)

1. a text decoder that reads image tokens (nn.TransformerDecoder, padded image memory)
2. mmkernels.patch(): its nn.MultiheadAttention layers become CrossModalAttention, weights kept
3. mmkernels.profiling: time, memory and where the time went, stock against patched
4. state dicts: a patched model's weights load into a stock model and back
5. training: the patched model trains like the stock one (the loss falls)
"""
import argparse
import copy
import io

import torch
from torch import nn

import mmkernels
from mmkernels.profiling import profile, recipes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=recipes.SIZES)
    args = parser.parse_args()

    # 1. A stock model and the inputs a captioning / VQA head would see: causal text, and image
    #    tokens right-padded to the longest image in the batch.
    recipe = recipes.build("transformer_decoder", args.size)
    stock, inputs = recipe.model, recipe.inputs
    print(f"1. {recipe.title}")

    # 2. Patch a copy (patch() works in place; the stock model stays for comparison).
    patched = copy.deepcopy(stock)
    report = mmkernels.patch(patched)
    print(f"\n2. {report}")

    # 3. Profile: both models on the same inputs, outputs and gradients compared.
    result = profile(stock, inputs, fused=patched, iters=3, label=recipe.title)
    print(f"\n3. {result}")
    assert result.agree, "the patched model must compute what the stock one does"

    # 4. State dicts: parameter names are kept, so the weights move both ways.
    buffer = io.BytesIO()
    torch.save(patched.state_dict(), buffer)
    fresh_stock = _same_architecture(stock)
    fresh_patched = _same_architecture(stock)
    mmkernels.patch(fresh_patched)
    for model in (fresh_stock, fresh_patched):
        buffer.seek(0)
        model.load_state_dict(torch.load(buffer))
    with torch.no_grad():
        expected = patched(**inputs)
        diffs = [(m(**inputs) - expected).abs().max().item() for m in (fresh_stock, fresh_patched)]
    print(f"\n4. reloaded the patched weights: into a stock model, max |diff| {diffs[0]:.1e}; "
          f"into a patched one, {diffs[1]:.1e}")
    assert max(diffs) < 1e-4

    # 5. Train the patched model a few steps to reproduce a fixed random target.
    torch.manual_seed(1)
    target = torch.randn_like(expected)
    patched.train()
    optimizer = torch.optim.AdamW(patched.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(patched(**inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"\n5. training the patched model: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} AdamW steps")
    assert losses[-1] < losses[0], "the loss should fall"


def _same_architecture(model: nn.Module) -> nn.Module:
    """A model like `model` with other weights: what load_state_dict has to overwrite."""
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_(0, 0.02)
    return fresh


if __name__ == "__main__":
    main()
